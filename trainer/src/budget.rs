//! `trainer export --max-error ε`: choose the cheapest runtime solver whose
//! log p stays within ε nats of a tight Dopri5 reference on validation rows,
//! and make it the model's default (an MCU then spends exactly the work the
//! accuracy needs).

use anyhow::{Context, Result, bail};
use ffjord_runtime::{Dopri5, Flow, Model, Solver};

/// One candidate's measured accuracy and cost.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Candidate {
    pub solver: String,
    pub max_error: f64,
    pub mean_error: f64,
    pub mean_nfe: f64,
    #[serde(skip)]
    pub method: Solver,
}

fn candidates() -> Vec<Solver> {
    let mut v: Vec<Solver> = [1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64]
        .into_iter()
        .map(|steps| Solver::Rk4 { steps })
        .collect();
    v.extend([1e-2, 1e-3, 1e-4, 1e-5].into_iter().map(|t| crate::ode::dopri5_at(t, 10_000)));
    v
}

/// The candidates as a Markdown table (solver, max and mean error, mean NFE).
pub fn table(candidates: &[Candidate]) -> String {
    let mut s = String::from("| solver | max error | mean error | mean NFE |\n|---|---|---|---|\n");
    for c in candidates {
        s += &format!("| {} | {:.2e} | {:.2e} | {:.1} |\n", c.solver, c.max_error, c.mean_error, c.mean_nfe);
    }
    s
}

/// Measures every candidate on `rows` (data units) against Dopri5 at 1e-7 and
/// returns (the cheapest within `eps`, all candidates).
pub fn choose(model_bytes: &[u8], rows: &[Vec<f32>], eps: f64) -> Result<(Candidate, Vec<Candidate>)> {
    let model = Model::from_bytes(model_bytes)?;
    let reference = Solver::Dopri5(Dopri5 { max_steps: 1_000_000, ..Dopri5::with_tolerance(1e-7) });
    let log_p = |solver: Solver| -> Result<Vec<(f64, u32)>> {
        let flow = Flow::new(&model, solver)?;
        let mut scratch = vec![0.0; flow.scratch_len()];
        rows.iter()
            .map(|x| {
                let ld = flow.log_density(x, &mut scratch)?;
                Ok((f64::from(ld.log_p), ld.stats.nfe))
            })
            .collect()
    };
    let truth = log_p(reference)?;
    let mut all = Vec::new();
    for method in candidates() {
        let Ok(values) = log_p(method) else { continue };
        let errors: Vec<f64> = values.iter().zip(&truth).map(|((a, _), (b, _))| (a - b).abs()).collect();
        let max_error = errors.iter().cloned().fold(0.0, f64::max);
        all.push(Candidate {
            solver: method.to_string(),
            max_error: if max_error.is_finite() { max_error } else { f64::INFINITY },
            mean_error: errors.iter().sum::<f64>() / errors.len() as f64,
            mean_nfe: values.iter().map(|(_, n)| f64::from(*n)).sum::<f64>() / values.len() as f64,
            method,
        });
    }
    let best =
        all.iter().filter(|c| c.max_error <= eps).min_by(|a, b| a.mean_nfe.total_cmp(&b.mean_nfe)).cloned();
    match best {
        Some(b) => Ok((b, all)),
        None => {
            bail!("no candidate solver keeps log p within {eps} nats of the reference on the validation rows")
        }
    }
}

/// A solver's error against the tight reference and its cost on some rows.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Accuracy {
    pub rows: usize,
    pub max_error: f64,
    pub mean_error: f64,
    pub mean_nfe: f64,
}

/// Error of `solver` against Dopri5 1e-7 on `rows` (data units), and its NFE.
pub fn accuracy(model_bytes: &[u8], rows: &[Vec<f32>], solver: Solver) -> Result<Accuracy> {
    let model = Model::from_bytes(model_bytes)?;
    let reference = Solver::Dopri5(Dopri5 { max_steps: 1_000_000, ..Dopri5::with_tolerance(1e-7) });
    let (tight, flow) = (Flow::new(&model, reference)?, Flow::new(&model, solver)?);
    let mut scratch = vec![0.0; tight.scratch_len().max(flow.scratch_len())];
    let (mut max_error, mut sum, mut nfe) = (0.0f64, 0.0f64, 0u64);
    for (i, x) in rows.iter().enumerate() {
        let want = tight.log_density(x, &mut scratch).with_context(|| format!("row {}", i + 1))?;
        let got = flow.log_density(x, &mut scratch).with_context(|| format!("row {}", i + 1))?;
        let err = (f64::from(got.log_p) - f64::from(want.log_p)).abs();
        max_error = max_error.max(err);
        sum += err;
        nfe += u64::from(got.stats.nfe);
    }
    let n = rows.len().max(1) as f64;
    Ok(Accuracy { rows: rows.len(), max_error, mean_error: sum / n, mean_nfe: nfe as f64 / n })
}
