//! The kernel density base (`Stage::KdeBase`, format version 5) against a
//! float64 reference: log p of a linear flow on a KDE base in closed form on
//! every path (one row, batch, packed blocks, the Dopri5 stream), samples
//! whose moments are the mixture's, and typed errors for malformed bases.

#![cfg(feature = "kde")]

mod common;

use common::*;
use ffjord_runtime::format::MAX_KDE_CENTRES;
use ffjord_runtime::{Activation, Dopri5, Field, Flow, KdeSpec, LayerKind, LoadError, Model, Solver, Stage};
use nalgebra::{DMatrix, DVector};

const TIGHT: Solver =
    Solver::Dopri5(Dopri5 { rtol: 1e-6, atol: 1e-7, max_steps: 100_000, min_step: 0.0, first_step: None });

/// `dz/dt = A z` over `[0, T]` on a KDE base with `centres` (row-major) and
/// bandwidth `h`, with standardization `(x − m) / s`.
fn linear_on_kde(a: &DMatrix<f64>, t: f32, m: &[f32], s: &[f32], centres: &[f32], h: f32, w: f32) -> Vec<u8> {
    let d = a.nrows();
    let kde = KdeSpec { centres: (centres.len() / d) as u32, bandwidth: h, normal_weight: w };
    let stages = vec![
        Stage::Cnf(cnf(d as u16, &[], &[LayerKind::Ignore], Activation::Identity, t)),
        Stage::KdeBase(kde),
    ];
    let mut w: Vec<f32> = m.iter().chain(s).copied().collect();
    w.extend((0..d * d).map(|k| a[(k / d, k % d)] as f32));
    w.extend(std::iter::repeat_n(0.0, d));
    w.extend_from_slice(centres);
    encode_model(&header(d as u16, true, stages, TIGHT), &w)
}

/// log ((1 − w)/n Σ N(z; c_i, h² I) + w N(z; 0, I)) in float64, by log-sum-exp.
fn kde_log_prob64(z: &[f64], centres: &[f32], h: f64, w: f64) -> f64 {
    let d = z.len();
    let v: Vec<f64> = centres
        .chunks(d)
        .map(|c| -z.iter().zip(c).map(|(a, &b)| (a - b as f64).powi(2)).sum::<f64>() / (2.0 * h * h))
        .collect();
    let max = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = max + v.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
    let kernels = lse
        - ((centres.len() / d) as f64).ln()
        - d as f64 * (0.5 * (2.0 * std::f64::consts::PI).ln() + h.ln());
    if w == 0.0 {
        return kernels;
    }
    let (a, b) = ((1.0 - w).ln() + kernels, w.ln() + std_normal_logprob64(z));
    a.max(b) + (-(a - b).abs()).exp().ln_1p()
}

struct Case {
    a: DMatrix<f64>,
    t: f64,
    m: Vec<f32>,
    s: Vec<f32>,
    centres: Vec<f32>,
    h: f32,
    w: f32,
}

impl Case {
    fn new(d: usize, n: usize, h: f32, w: f32, seed: u64) -> Case {
        let mut r = rng(seed);
        Case {
            a: DMatrix::from_fn(d, d, |_, _| uniform(&mut r, 0.6) as f64),
            t: 0.7,
            m: (0..d).map(|_| uniform(&mut r, 1.0)).collect(),
            s: (0..d).map(|_| 0.6 + uniform(&mut r, 0.3).abs()).collect(),
            centres: (0..n * d).map(|_| uniform(&mut r, 2.0)).collect(),
            h,
            w,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        linear_on_kde(&self.a, self.t as f32, &self.m, &self.s, &self.centres, self.h, self.w)
    }

    /// log p(x) = log KDE(e^{AT} (x − m)/s) + T tr A − Σ ln s.
    fn log_p64(&self, x: &[f32]) -> f64 {
        let y: Vec<f64> = x
            .iter()
            .zip(&self.m)
            .zip(&self.s)
            .map(|((&x, &m), &s)| (x as f64 - m as f64) / s as f64)
            .collect();
        let z = (&self.a * self.t).exp() * DVector::from_column_slice(&y);
        let log_s: f64 = self.s.iter().map(|&s| (s as f64).ln()).sum();
        kde_log_prob64(z.as_slice(), &self.centres, self.h as f64, self.w as f64) + self.t * self.a.trace()
            - log_s
    }
}

/// Tolerance: the solver at rtol 1e-6 and f32 arithmetic over a few
/// hundred centres; 2e-4 nats absolute (values are O(1–100) nats).
const TOL: f64 = 2e-4;

#[test]
fn log_density_on_a_kde_base_matches_the_closed_form_on_every_path() {
    for (d, n, h, w, seed) in [(2, 1, 0.3, 0.0, 1), (3, 50, 0.5, 0.2, 2), (6, 300, 0.25, 0.05, 3)] {
        let case = Case::new(d, n, h, w, seed);
        let bytes = case.bytes();
        let model = Model::from_bytes(&bytes).unwrap();
        assert_eq!(u16::from_le_bytes([bytes[4], bytes[5]]), 5, "written as version 5");
        assert_eq!(model.kde_base(), Some(KdeSpec { centres: n as u32, bandwidth: h, normal_weight: w }));
        let mut r = rng(seed + 100);
        let rows: Vec<f32> = (0..7 * d).map(|_| uniform(&mut r, 2.5)).collect();
        let expected: Vec<f64> = rows.chunks(d).map(|x| case.log_p64(x)).collect();
        for solver in [TIGHT, Solver::Rk4 { steps: 200 }] {
            let flow = Flow::new(&model, solver).unwrap();
            let mut scratch = vec![0.0; flow.scratch_len()];
            for (x, &e) in rows.chunks(d).zip(&expected) {
                let ld = flow.log_density(x, &mut scratch).unwrap();
                assert!((ld.log_p as f64 - e).abs() < TOL, "d={d} n={n}: {} vs {e}", ld.log_p);
                assert!((ld.log_p - (ld.log_p_base - ld.delta_log_p)).abs() < 1e-4);
            }
            let mut batch = vec![0.0; 7];
            flow.log_density_batch(&rows, &mut batch, &mut scratch).unwrap();
            // Packed: RK4 takes the block path, Dopri5 the stream path.
            let mut packed = vec![0.0; 7];
            let mut ps = vec![0.0; flow.packed_scratch_len(3)];
            flow.log_density_packed(&rows, &mut packed, 3, &mut ps).unwrap();
            for ((b, p), &e) in batch.iter().zip(&packed).zip(&expected) {
                assert!((*b as f64 - e).abs() < TOL && (*p as f64 - e).abs() < TOL, "{b} {p} vs {e}");
            }
        }
    }
}

#[test]
fn far_from_every_centre_the_base_stays_finite_and_monotone() {
    // One centre at the origin: log p falls as −|z|²/(2h²) with no underflow
    // to −∞ (the log-sum-exp keeps the largest term), until |z|² overflows.
    // With the normal part the tail is the normal's, −|z|²/2 + log w.
    for w in [0.0, 0.1] {
        let case = Case { centres: vec![0.0, 0.0], ..Case::new(2, 1, 0.1, w, 4) };
        let bytes = case.bytes();
        let model = Model::from_bytes(&bytes).unwrap();
        let flow = Flow::new(&model, Solver::Rk4 { steps: 50 }).unwrap();
        let mut scratch = vec![0.0; flow.scratch_len()];
        let mut last = f32::INFINITY;
        for k in 0..8 {
            let x = [case.m[0] + 10f32.powi(k), case.m[1]];
            let lp = flow.log_density(&x, &mut scratch).unwrap().log_p;
            assert!(lp.is_finite() && lp < last, "w={w} 10^{k}: {lp} after {last}");
            let e = case.log_p64(&x);
            assert!(((lp as f64 - e) / e).abs() < 1e-4, "w={w} 10^{k}: {lp} vs {e}");
            last = lp;
        }
    }
}

#[test]
fn samples_have_the_mixtures_moments_and_their_own_log_density() {
    // A = 0: the flow is the identity after standardization, so samples are
    // x = m + s ⊙ u with u from the base: c_I + h ε (I uniform) with
    // probability 1 − w, else ε. So E u = (1 − w) mean(c) and
    // E u² = (1 − w)(mean(c²) + h²) + w.
    let d = 2;
    let case = Case { a: DMatrix::zeros(d, d), ..Case::new(d, 5, 0.2, 0.3, 5) };
    let bytes = case.bytes();
    let model = Model::from_bytes(&bytes).unwrap();
    let flow = Flow::new(&model, Solver::Rk4 { steps: 4 }).unwrap();
    let mut scratch = vec![0.0; flow.scratch_len()];
    let mut r = rng(6);
    let n = 20_000;
    let mut xs = vec![0.0f32; n * d];
    for x in xs.chunks_mut(d) {
        let s = flow.sample(&mut r, x, &mut scratch).unwrap();
        let check = flow.log_density(x, &mut scratch).unwrap().log_p;
        assert!((s.log_p - check).abs() < 1e-4, "{} vs {check}", s.log_p);
    }
    for j in 0..d {
        let c: Vec<f64> = case.centres.chunks(d).map(|c| c[j] as f64).collect();
        let c_mean = c.iter().sum::<f64>() / c.len() as f64;
        let c_sq = c.iter().map(|v| v * v).sum::<f64>() / c.len() as f64;
        let (m, s, w) = (case.m[j] as f64, case.s[j] as f64, case.w as f64);
        let u_mean = (1.0 - w) * c_mean;
        let u_var = (1.0 - w) * (c_sq + (case.h as f64).powi(2)) + w - u_mean * u_mean;
        let v: Vec<f64> = xs.chunks(d).map(|x| x[j] as f64).collect();
        let mean = v.iter().sum::<f64>() / n as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        let want_var = s * s * u_var;
        // Standard errors: sd/√n for the mean, about var·√(2/n)·2 for the
        // variance (heavier tails than a Gaussian); bounds at 5 of them.
        assert!((mean - (m + s * u_mean)).abs() < 5.0 * (want_var / n as f64).sqrt(), "mean {mean}");
        assert!((var - want_var).abs() < 5.0 * want_var * (8.0 / n as f64).sqrt(), "var {var} vs {want_var}");
    }
}

#[test]
fn malformed_kde_bases_are_refused_with_the_field() {
    let d = 2u16;
    let cnf_stage = Stage::Cnf(cnf(d, &[4], &[LayerKind::ConcatSquash], Activation::Tanh, 0.5));
    let refused = |stages: Vec<Stage>| {
        let h = header(d, false, stages, TIGHT);
        // The writer validates as the loader does.
        let w = vec![0.5f32; 1 << 12];
        let mut out = vec![0u8; 1 << 16];
        assert!(ffjord_runtime::format::encode(&h, &w, &mut out).is_err());
        h.layout().unwrap_err()
    };
    let kde = |centres, bandwidth| Stage::KdeBase(KdeSpec { centres, bandwidth, normal_weight: 0.1 });
    let weighted = |normal_weight| Stage::KdeBase(KdeSpec { centres: 3, bandwidth: 0.5, normal_weight });
    let bad = LoadError::InvalidField(Field::KdeBase);
    assert_eq!(refused(vec![cnf_stage.clone(), kde(0, 0.5)]), bad);
    assert_eq!(refused(vec![cnf_stage.clone(), kde(MAX_KDE_CENTRES + 1, 0.5)]), bad);
    assert_eq!(refused(vec![cnf_stage.clone(), kde(3, 0.0)]), bad);
    assert_eq!(refused(vec![cnf_stage.clone(), kde(3, f32::NAN)]), bad);
    assert_eq!(refused(vec![cnf_stage.clone(), kde(3, f32::INFINITY)]), bad);
    for w in [-0.1, 1.0, f32::NAN] {
        assert_eq!(refused(vec![cnf_stage.clone(), weighted(w)]), bad, "normal weight {w}");
    }
    // Only as the last stage, and only once.
    assert_eq!(refused(vec![kde(3, 0.5), cnf_stage.clone()]), bad);
    assert_eq!(refused(vec![cnf_stage.clone(), kde(3, 0.5), kde(3, 0.5)]), bad);
    // A base alone is no flow.
    assert_eq!(refused(vec![kde(3, 0.5)]), LoadError::InvalidField(Field::Stages));
    // A non-finite centre is caught like any weight.
    let h = header(d, false, vec![cnf_stage.clone(), kde(3, 0.5)], TIGHT);
    let mut w = random_weights(&h, &mut rng(7));
    let last = w.len() - 1;
    w[last] = f32::NAN;
    let mut out = vec![0u8; 1 << 16];
    if let Ok(n) = ffjord_runtime::format::encode(&h, &w, &mut out) {
        assert!(matches!(Model::from_bytes(&out[..n]), Err(LoadError::NonFiniteWeight { .. })));
    }
    // A version-4 file may not hold one.
    let w = random_weights(&h, &mut rng(7));
    let mut bytes = encode_model(&h, &w);
    bytes[4] = 4;
    let n = bytes.len() - 4;
    let crc = ffjord_runtime::format::crc32(&bytes[..n]);
    bytes[n..].copy_from_slice(&crc.to_le_bytes());
    assert_eq!(Model::from_bytes(&bytes).unwrap_err(), LoadError::InvalidField(Field::StageVersion));
}
