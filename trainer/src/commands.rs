//! The bodies of the commands that read models and rows: eval, score,
//! sample, inspect, budget (fit, export and the data commands call into the library).

use std::io::Write;

use anyhow::{Context, Result, bail};
use ffjord_runtime::{Flow, Model, Solver, Verdict};
use tch::{Device, Kind};

use ffjord_trainer::config::SolverArg;
use ffjord_trainer::model;
use ffjord_trainer::{data, modelfile, ode};

use crate::cli::*;

pub(crate) fn write_table(
    path: &std::path::Path,
    header: &[String],
    rows: impl Iterator<Item = Vec<f64>>,
) -> Result<()> {
    let mut s = header.join(",") + "\n";
    for r in rows {
        s += &r.iter().map(|v| format!("{v}")).collect::<Vec<_>>().join(",");
        s.push('\n');
    }
    modelfile::write_atomic(path, s.as_bytes())
}

/// Reads a model file and data rows whose width matches the model.
pub(crate) fn model_and_rows(path: &std::path::Path, data: &DataArgs) -> Result<(Vec<u8>, data::Table)> {
    let bytes = modelfile::read_model_bytes(path)?;
    let dim = Model::from_bytes(&bytes)?.dim();
    let table = data.load()?;
    check_width(&data.source(), &table, path, dim)?;
    Ok((bytes, table))
}

/// The rows' width against the model's dimension, naming both files.
pub(crate) fn check_width(
    source: &str,
    table: &data::Table,
    model: &std::path::Path,
    dim: usize,
) -> Result<()> {
    if table.dim() != dim {
        bail!("{source} has {} columns, the model {} expects {dim}", table.dim(), model.display());
    }
    Ok(())
}

/// Rows `trainer eval` integrates together.
pub(crate) const EVAL_CHUNK_ROWS: i64 = 4096;

pub(crate) fn eval(args: &EvalArgs) -> Result<()> {
    let (bytes, table, labels) = match &args.labels {
        Some(col) => {
            let bytes = modelfile::read_model_bytes(&args.model)?;
            let (table, labels) = ffjord_trainer::anomaly::split_labels(&args.data.load()?, col)?;
            (bytes, table, Some(labels))
        }
        None => {
            let (bytes, table) = model_and_rows(&args.model, &args.data)?;
            (bytes, table, None)
        }
    };
    let model = Model::from_bytes(&bytes)?;
    check_width(&args.data.source(), &table, &args.model, model.dim())?;
    let (_vs, chain) = modelfile::chain_from_model(&model, Kind::Double, Device::Cpu)?;
    let x = table.to_tensor();
    let method = ode::dopri5_at(args.tol, 1_000_000);
    let opts = model::SolveOptions::eval(method);
    // In chunks: one batch of 144k rows took 4 GB.
    let rows = chain.log_prob_rows(&x, &opts, EVAL_CHUNK_ROWS)?;
    let (log_p, nfe) = (&rows.log_p, rows.nfe);
    let nll = -log_p.iter().sum::<f64>() / log_p.len() as f64;
    let d = model.dim() as f64;
    println!(
        "rows {}  NLL {nll:.6} nats in data units ({:.6} bits/dim)  NFE {nfe} (summed over chunks of {EVAL_CHUNK_ROWS} rows)",
        log_p.len(),
        nll / d / 2f64.ln(),
    );
    if let Some(p) = &args.rows_out {
        write_table(p, &["log_p".into()], log_p.iter().map(|&v| vec![v]))?;
    }
    if let Some(labels) = labels {
        // The file's kind of score, which its threshold is on.
        let kind = model.score_kind();
        let scores = ffjord_trainer::score_kind::row_scores(kind, &rows, chain.dim)?;
        let threshold = model.threshold().map_or(f64::INFINITY, |t| f64::from(t.score));
        // f32's shortest form ("0.99"), not its f64 widening (0.9900000095367432).
        let q = model.threshold().map_or("none".to_string(), |t| t.quantile.to_string());
        let m = ffjord_trainer::anomaly::detection(&scores, &labels, threshold);
        let pos = labels.iter().filter(|&&a| a).count();
        println!("anomalies {pos} of {}; score: {}", labels.len(), kind.name());
        println!(
            "| AUROC | average precision | precision | recall | false-positive rate | threshold (quantile) |"
        );
        println!("|---|---|---|---|---|---|");
        println!(
            "| {:.4} | {:.4} | {:.4} | {:.4} | {:.4} | {threshold:.3} ({q}) |",
            m.auroc, m.average_precision, m.precision, m.recall, m.false_positive_rate
        );
    }
    Ok(())
}

pub(crate) fn runtime_solver(
    model: &Model<'_>,
    solver: Option<SolverArg>,
    tol: Option<f32>,
    steps: u32,
) -> Solver {
    match solver {
        None => {
            let mut s = model.default_solver();
            if let (Solver::Dopri5(d), Some(t)) = (&mut s, tol) {
                d.rtol = t;
                d.atol = t;
            }
            s
        }
        Some(SolverArg::Dopri5) => Solver::Dopri5(ffjord_runtime::Dopri5 {
            max_steps: 100_000,
            ..ffjord_runtime::Dopri5::with_tolerance(tol.unwrap_or(1e-5))
        }),
        Some(SolverArg::Rk4) => Solver::Rk4 { steps },
        Some(SolverArg::Midpoint) => Solver::Midpoint { steps },
        Some(SolverArg::Euler) => Solver::Euler { steps },
    }
}

pub(crate) fn rows_f32(table: &data::Table, limit: usize) -> Vec<Vec<f32>> {
    (0..table.rows.min(limit)).map(|i| table.row(i).iter().map(|&v| v as f32).collect()).collect()
}

pub(crate) fn budget(args: &BudgetArgs) -> Result<()> {
    let (bytes, valid) = model_and_rows(&args.model, &args.data)?;
    let model = Model::from_bytes(&bytes)?;
    let valid = rows_f32(&valid, 1000);
    let (best, all) = ffjord_trainer::budget::choose(&bytes, &valid, args.max_error)?;
    println!("validation: {} rows; errors against Dopri5 1e-7\n", valid.len());
    print!("{}", ffjord_trainer::budget::table(&all));
    let test = match (&args.test, &args.data.toy) {
        (Some(path), _) => match &args.test_labels {
            Some(col) => ffjord_trainer::anomaly::split_labels(&data::load(path, None)?, col)?.0,
            None => data::load(path, args.data.columns.as_deref())?,
        },
        (None, Some(_)) => DataArgs { seed: args.data.seed + 1, ..args.data.clone() }.load()?,
        (None, None) => bail!("--test is needed with --data (the choice is checked on other rows)"),
    };
    let source = args
        .test
        .as_ref()
        .map_or_else(|| format!("test rows from {}", args.data.source()), |p| p.display().to_string());
    check_width(&source, &test, &args.model, model.dim())?;
    let test = rows_f32(&test, 1000);
    let acc = ffjord_trainer::budget::accuracy(&bytes, &test, best.method)?;
    let flops = model.flops_per_evaluation() as f64 * acc.mean_nfe;
    println!(
        "\nchosen: {} (cheapest within {} nats) | test on {} rows: max error {:.2e}, mean error {:.2e}, mean NFE {:.1}, {:.0} FLOPs per log p",
        best.solver, args.max_error, acc.rows, acc.max_error, acc.mean_error, acc.mean_nfe, flops
    );
    Ok(())
}

pub(crate) fn score(args: &ScoreArgs) -> Result<()> {
    let bytes = modelfile::read_model_bytes(&args.model)?;
    let model = Model::from_bytes(&bytes)?;
    let table = args.data.load()?;
    let (table, labels) = match &args.label {
        Some(column) => {
            let (features, labels) =
                ffjord_trainer::anomaly::split_labels(&table, column).with_context(|| args.data.source())?;
            (features, Some(labels))
        }
        None => (table, None),
    };
    check_width(&args.data.source(), &table, &args.model, model.dim())?;
    let mut flow = Flow::new(&model, runtime_solver(&model, args.solver, args.tol, args.steps))?;
    if args.probes > 0 {
        anyhow::ensure!(
            model.has_image_stages(),
            "--probes applies to image models; {} has no image stages (its log p uses the exact trace)",
            args.model.display()
        );
        let trace = ffjord_runtime::ImageTrace::Hutchinson { probes: args.probes, seed: args.probe_seed };
        flow = flow.with_image_trace(trace)?;
    }
    // log_p = log_p_base (the base density at z: N(0, I) or the file's KDE
    // base) − delta_log_p (the log volume change along the flow,
    // standardization included); log_p_normal = log N(z; 0, I), whose
    // negation is the latent-radius score.
    // A background density for the likelihood-ratio score (image models).
    let background = match &args.background {
        Some(path) => {
            let images = ffjord_trainer::images::Images::load(path)?;
            anyhow::ensure!(
                images.dim() == model.dim(),
                "{}: images of {} pixels, the model takes {}",
                path.display(),
                images.dim(),
                model.dim()
            );
            Some(ffjord_trainer::images::PixelHistograms::fit(&images, 0.1)?)
        }
        None => None,
    };
    let mut out = String::from("row,log_p,score,verdict,nfe,log_p_base,delta_log_p,log_p_normal");
    if background.is_some() {
        out += ",log_p_background,ratio_score";
    }
    out += if labels.is_some() { ",label\n" } else { "\n" };
    let (mut anomalies, mut scores, mut ratio_scores) = (0, Vec::with_capacity(table.rows), Vec::new());
    // The score kind the file does not use, for comparison (trainer/README.md,
    // "which part of the score ranks").
    let kind = model.score_kind();
    let other = match kind {
        ffjord_runtime::ScoreKind::NegLogDensity => ffjord_runtime::ScoreKind::LatentRadius,
        _ => ffjord_runtime::ScoreKind::NegLogDensity,
    };
    let mut other_scores = Vec::with_capacity(table.rows);
    // Rows are independent: score them on every core (libtorch's thread count,
    // `OMP_NUM_THREADS`), each thread with its own scratch; a row's value does
    // not depend on the thread, and the output keeps the rows' order.
    let threads = usize::try_from(tch::get_num_threads()).unwrap_or(1).max(1);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
    let results: Vec<_> = pool.install(|| {
        use rayon::prelude::*;
        (0..table.rows)
            .into_par_iter()
            .map_init(
                || vec![0.0f32; flow.scratch_len()],
                |scratch, i| {
                    let x: Vec<f32> = table.row(i).iter().map(|&v| v as f32).collect();
                    flow.score(&x, scratch)
                },
            )
            .collect()
    });
    for (i, result) in results.into_iter().enumerate() {
        let s = result.with_context(|| format!("row {}", i + 1))?;
        anomalies += usize::from(s.verdict == Verdict::Anomaly);
        let verdict = s.verdict.name();
        let ld = s.log_density;
        out += &format!(
            "{i},{},{},{verdict},{},{},{},{}",
            ld.log_p, s.score, ld.stats.nfe, ld.log_p_base, ld.delta_log_p, ld.log_p_normal
        );
        if let Some(bg) = &background {
            let lb = bg.log_prob(table.row(i)).with_context(|| {
                format!("row {}: the background takes pixel values, integers 0–255", i + 1)
            })?;
            let ratio = lb - f64::from(ld.log_p);
            out += &format!(",{lb},{ratio}");
            ratio_scores.push(ratio);
        }
        match &labels {
            Some(l) => out += &format!(",{}\n", u8::from(l[i])),
            None => out += "\n",
        }
        scores.push(f64::from(s.score));
        other_scores.push(f64::from(ld.score(other)));
    }
    match &args.out {
        Some(p) => modelfile::write_atomic(p, out.as_bytes())?,
        None => std::io::stdout().write_all(out.as_bytes())?,
    }
    eprintln!("{} rows scored, {anomalies} above the stored threshold", table.rows);
    if let Some(labels) = &labels {
        let threshold = model.threshold().map_or(f64::INFINITY, |t| f64::from(t.score));
        let d = ffjord_trainer::anomaly::detection(&scores, labels, threshold);
        eprintln!(
            "score ({}) against '{}': AUROC {:.4}, average precision {:.4}; at the stored threshold recall {:.4}, false-positive rate {:.4}",
            kind.name(),
            args.label.as_deref().unwrap_or_default(),
            d.auroc,
            d.average_precision,
            d.recall,
            d.false_positive_rate
        );
        // No stored threshold for the other kind.
        let o = ffjord_trainer::anomaly::detection(&other_scores, labels, f64::INFINITY);
        eprintln!(
            "{} (not this model's score): AUROC {:.4}, average precision {:.4}",
            other.name(),
            o.auroc,
            o.average_precision
        );
        if background.is_some() {
            // No stored threshold for the ratio: AUROC and average precision only.
            let r = ffjord_trainer::anomaly::detection(&ratio_scores, labels, f64::INFINITY);
            eprintln!(
                "likelihood ratio against the per-pixel background: AUROC {:.4}, average precision {:.4}",
                r.auroc, r.average_precision
            );
        }
    }
    Ok(())
}

pub(crate) fn sample(args: &SampleArgs) -> Result<()> {
    use rand_xoshiro::rand_core::SeedableRng;
    let bytes = modelfile::read_model_bytes(&args.model)?;
    let model = Model::from_bytes(&bytes)?;
    let flow = Flow::new(&model, model.default_solver())?;
    let mut scratch = vec![0.0f32; flow.scratch_len()];
    // Xoshiro128++ is what the firmware examples use, so seeds reproduce across devices.
    let mut rng = rand_xoshiro::Xoshiro128PlusPlus::seed_from_u64(args.seed);
    let mut rows = Vec::new();
    for _ in 0..args.n {
        let mut x = vec![0.0f32; model.dim()];
        let s = flow.sample(&mut rng, &mut x, &mut scratch)?;
        let mut r: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
        r.push(f64::from(s.log_p));
        rows.push(r);
    }
    let mut header: Vec<String> = (0..model.dim()).map(|i| format!("x{i}")).collect();
    header.push("log_p".into());
    match &args.out {
        Some(p) => write_table(p, &header, rows.into_iter()),
        None => {
            for r in rows {
                println!("{}", r.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(","));
            }
            Ok(())
        }
    }
}

pub(crate) fn inspect(args: &InspectArgs) -> Result<()> {
    let bytes = modelfile::read_model_bytes(&args.model)?;
    let model = Model::from_bytes(&bytes)?;
    let h = model.header();
    println!("file        {} ({} bytes)", args.model.display(), bytes.len());
    println!("name        {}", h.metadata.name);
    println!("data        {}", h.metadata.description);
    println!("command     {}", h.metadata.command);
    // (A loaded file is at least the 6-byte preamble long.)
    println!("format      version {}", u16::from_le_bytes([bytes[4], bytes[5]]));
    println!("dimension   {}", model.dim());
    println!("parameters  {} ({} bytes of weights)", model.weight_count(), model.weight_bytes());
    for (i, s) in h.stages().enumerate() {
        match s {
            ffjord_runtime::Stage::Cnf(c) => {
                let widths: Vec<String> =
                    c.layers.iter().map(|l| format!("{:?}→{}", l.kind, l.out_dim)).collect();
                println!(
                    "stage {i}     CNF T={} {:?} [{}], matrices {}",
                    c.end_time,
                    c.activation,
                    widths.join(", "),
                    c.matrices.name()
                );
            }
            ffjord_runtime::Stage::Affine => println!("stage {i}     affine"),
            ffjord_runtime::Stage::KdeBase(k) => println!(
                "stage {i}     base: Gaussian KDE on {} latent points, bandwidth {}, mixed with N(0, I) by {} ({} bytes)",
                k.centres,
                k.bandwidth,
                k.normal_weight,
                4 * k.centres as usize * model.dim()
            ),
            ffjord_runtime::Stage::Linear => println!("stage {i}     linear (lower-triangular)"),
            ffjord_runtime::Stage::Logit { alpha } => {
                println!("stage {i}     logit transform, alpha {alpha:e}")
            }
            ffjord_runtime::Stage::Squeeze(s) => {
                println!(
                    "stage {i}     squeeze {}×{}×{} → {}×{}×{}",
                    s.channels,
                    s.height,
                    s.width,
                    4 * s.channels,
                    s.height / 2,
                    s.width / 2
                )
            }
            ffjord_runtime::Stage::ConvCnf(c) => {
                let widths: Vec<String> =
                    c.layers.iter().map(|l| format!("{:?}→{}", l.kind, l.out_dim)).collect();
                let s = c.shape;
                println!(
                    "stage {i}     conv CNF on {}×{}×{} (the first {} values) T={} {:?} [{}] channels",
                    s.channels,
                    s.height,
                    s.width,
                    s.len(),
                    c.end_time,
                    c.activation,
                    widths.join(", ")
                );
            }
        }
    }
    println!("solver      {:?}", model.default_solver());
    match model.threshold() {
        Some(t) => println!("threshold   score > {} (quantile {})", t.score, t.quantile),
        None => println!("threshold   none"),
    }
    match model.score_kind() {
        ffjord_runtime::ScoreKind::LatentRadius => {
            println!("score       latent-radius (−log N(z) of the latent point; the volume change left out)")
        }
        ffjord_runtime::ScoreKind::LatentBase => println!(
            "score       latent-base (−log p_base(z): the base density at the latent point; the volume change \
             left out)"
        ),
        kind => println!("score       {} (−log p)", kind.name()),
    }
    println!("FLOPs/eval  {} (exact trace, D+1 lanes)", model.flops_per_evaluation());
    println!("scratch     {} floats with the default solver", model.scratch_len(&model.default_solver()));
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&ffjord_trainer::json::to_json(&model)?)?;
        modelfile::write_atomic(path, json.as_bytes())?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
