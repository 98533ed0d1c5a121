//! The flow against float64 references: closed-form densities of linear
//! flows, exact divergence vs. finite differences, inverse round trips and
//! sampling, and typed errors on bad input.

mod common;

use common::*;
use ffjord_runtime::{
    Activation, Dopri5, Flow, LayerKind, Model, SolveError, Solver, Stage, Threshold, Verdict,
};
use nalgebra::DMatrix;

const TIGHT: Solver =
    Solver::Dopri5(Dopri5 { rtol: 1e-6, atol: 1e-7, max_steps: 100_000, min_step: 0.0, first_step: None });

/// `f(z) = A z`: one `ignore` layer, identity activation, zero bias.
fn linear_model(
    a: &DMatrix<f64>,
    t: f32,
    standardize: Option<(&[f32], &[f32])>,
    affine: Option<(&[f32], &[f32])>,
) -> Vec<u8> {
    let d = a.nrows();
    let mut stages = vec![Stage::Cnf(cnf(d as u16, &[], &[LayerKind::Ignore], Activation::Identity, t))];
    let mut w = Vec::new();
    if let Some((m, s)) = standardize {
        w.extend_from_slice(m);
        w.extend_from_slice(s);
    }
    for i in 0..d {
        for j in 0..d {
            w.push(a[(i, j)] as f32);
        }
    }
    w.extend(std::iter::repeat_n(0.0, d));
    if let Some((scale, shift)) = affine {
        stages.push(Stage::Affine);
        w.extend_from_slice(scale);
        w.extend_from_slice(shift);
    }
    let h = header(d as u16, standardize.is_some(), stages, TIGHT);
    encode_model(&h, &w)
}

fn random_matrix(d: usize, seed: u64) -> DMatrix<f64> {
    let mut r = rng(seed);
    DMatrix::from_fn(d, d, |_, _| uniform(&mut r, 0.6) as f64)
}

/// log p(x) = log N(e^{AT} x) + T·tr(A)  (data at t = 0; Δ = −T tr A).
fn linear_closed_form(a: &DMatrix<f64>, t: f64, x: &[f64]) -> f64 {
    let z = (a * t).exp() * nalgebra::DVector::from_column_slice(x);
    std_normal_logprob64(z.as_slice()) + t * a.trace()
}

#[test]
fn linear_flow_matches_closed_form() {
    for (d, seed) in [(2, 1), (3, 2), (6, 3)] {
        let a = random_matrix(d, seed);
        let t = 0.8;
        let bytes = linear_model(&a, t, None, None);
        let model = Model::from_bytes(&bytes).unwrap();
        let flow = Flow::new(&model, TIGHT).unwrap();
        let mut scratch = vec![0.0; flow.scratch_len()];
        let mut r = rng(seed + 100);
        for _ in 0..10 {
            let x: Vec<f32> = (0..d).map(|_| uniform(&mut r, 2.0)).collect();
            let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            let expected = linear_closed_form(&a, t as f64, &x64);
            let got = flow.log_density(&x, &mut scratch).unwrap();
            // Stated tolerance: 1e-5 nats absolute (f32 state, Dopri5 rtol 1e-6).
            assert!((got.log_p as f64 - expected).abs() < 1e-5, "d={d}: {} vs {expected}", got.log_p);
            assert!((got.delta_log_p as f64 + t as f64 * a.trace()).abs() < 1e-5);
        }
    }
}

/// A linear stage `y = L x + b` before a CNF whose net is zero (the identity
/// map): the model is the Gaussian `N(−L⁻¹b, (LᵀL)⁻¹)`, whose log-density is
/// `log N(L x + b; 0, I) + Σ ln |L_ii|` — checked in float64 on the one-row,
/// batch and packed paths, and the inverse maps latents back exactly.
#[test]
fn linear_stage_gives_the_gaussian_it_whitens() {
    let d = 5usize;
    let stages = vec![
        Stage::Linear,
        Stage::Cnf(cnf(d as u16, &[8], &[LayerKind::ConcatSquash], Activation::Tanh, 0.5)),
    ];
    let h = header(d as u16, true, stages, TIGHT);
    let mut w = random_weights(&h, &mut rng(31));
    // Keep standardization and the linear stage; zero the CNF's net.
    let linear_end = 2 * d + d * (d + 1) / 2 + d;
    w[linear_end..].fill(0.0);
    let bytes = encode_model(&h, &w);
    assert_eq!(u16::from_le_bytes([bytes[4], bytes[5]]), 2, "a linear stage needs format version 2");
    let model = Model::from_bytes(&bytes).unwrap();
    let (mean, std) = (&w[..d], &w[d..2 * d]);
    let tri = &w[2 * d..2 * d + d * (d + 1) / 2];
    let b = &w[2 * d + d * (d + 1) / 2..linear_end];
    let l = DMatrix::from_fn(d, d, |i, j| if j <= i { tri[i * (i + 1) / 2 + j] as f64 } else { 0.0 });
    let log_det =
        (0..d).map(|i| l[(i, i)].abs().ln()).sum::<f64>() - std.iter().map(|&s| (s as f64).ln()).sum::<f64>();
    let flow = Flow::new(&model, TIGHT).unwrap();
    let mut scratch = vec![0.0; flow.scratch_len()];
    let mut r = rng(32);
    let xs: Vec<f32> = (0..20 * d).map(|_| uniform(&mut r, 2.0)).collect();
    let mut expected = Vec::new();
    for x in xs.chunks_exact(d) {
        let u = nalgebra::DVector::from_fn(d, |i, _| ((x[i] - mean[i]) / std[i]) as f64);
        let z = &l * u + nalgebra::DVector::from_fn(d, |i, _| b[i] as f64);
        let want = std_normal_logprob64(z.as_slice()) + log_det;
        let mut latent = vec![0.0f32; d];
        let got = flow.forward(x, Some(&mut latent), &mut scratch).unwrap();
        // Stated tolerance: 1e-5 nats (f32 arithmetic on values of order 10).
        assert!((got.log_p as f64 - want).abs() < 1e-5 * (1.0 + want.abs()), "{} vs {want}", got.log_p);
        for (a, e) in latent.iter().zip(z.iter()) {
            assert!((*a as f64 - e).abs() < 1e-5, "latent {a} vs {e}");
        }
        // The inverse (forward substitution) takes the latent back to x.
        let back = flow.inverse(&mut latent, &mut scratch).unwrap();
        for (a, e) in latent.iter().zip(x) {
            assert!((a - e).abs() < 1e-4 * (1.0 + e.abs()), "inverse {a} vs {e}");
        }
        assert!((back.log_p - got.log_p).abs() < 1e-4 * (1.0 + want.abs() as f32));
        expected.push(want);
    }
    let mut packed = vec![0.0f32; 20];
    let mut packed_scratch = vec![0.0; flow.packed_scratch_len(8)];
    flow.log_density_packed(&xs, &mut packed, 8, &mut packed_scratch).unwrap();
    for (a, e) in packed.iter().zip(&expected) {
        assert!((*a as f64 - e).abs() < 1e-5 * (1.0 + e.abs()), "packed {a} vs {e}");
    }
}

/// A zero on the linear stage's diagonal is not invertible: rejected at load,
/// naming the weight.
#[test]
fn linear_stage_with_a_zero_diagonal_is_rejected() {
    let stages = vec![Stage::Linear, Stage::Cnf(cnf(3, &[4], &[LayerKind::Concat], Activation::Tanh, 1.0))];
    let h = header(3, false, stages, TIGHT);
    let mut w = random_weights(&h, &mut rng(5));
    // Row 2 of the packed triangle starts at 3; its diagonal is entry 3 + 2.
    w[5] = 0.0;
    let bytes = encode_model(&h, &w);
    assert_eq!(Model::from_bytes(&bytes).unwrap_err(), ffjord_runtime::LoadError::ZeroScale { index: 5 });
}

#[test]
fn standardization_and_affine_log_dets_are_in_log_p() {
    let d = 3;
    let a = random_matrix(d, 7);
    let t = 0.5;
    let (mean, std) = ([0.3f32, -1.0, 2.0], [2.0f32, 0.5, 1.5]);
    let (scale, shift) = ([1.5f32, -0.8, 0.9], [0.1f32, 0.2, -0.3]);
    let bytes = linear_model(&a, t, Some((&mean, &std)), Some((&scale, &shift)));
    let model = Model::from_bytes(&bytes).unwrap();
    let flow = Flow::new(&model, TIGHT).unwrap();
    let mut scratch = vec![0.0; flow.scratch_len()];
    let x = [1.0f32, -0.5, 2.5];
    let u: Vec<f64> = (0..d).map(|i| ((x[i] - mean[i]) / std[i]) as f64).collect();
    let z = (&a * t as f64).exp() * nalgebra::DVector::from_column_slice(&u);
    let w: Vec<f64> = (0..d).map(|i| z[i] * scale[i] as f64 + shift[i] as f64).collect();
    let expected = std_normal_logprob64(&w) + t as f64 * a.trace()
        - std.iter().map(|&s| (s as f64).ln()).sum::<f64>()
        + scale.iter().map(|&s| (s.abs() as f64).ln()).sum::<f64>();
    let mut latent = [0.0f32; 3];
    let got = flow.forward(&x, Some(&mut latent), &mut scratch).unwrap();
    assert!((got.log_p as f64 - expected).abs() < 1e-5, "{} vs {expected}", got.log_p);
    for i in 0..d {
        assert!((latent[i] as f64 - w[i]).abs() < 1e-5);
    }
}

fn random_model(
    dim: u16,
    hidden: &[u16],
    kinds: &[LayerKind],
    act: Activation,
    blocks: usize,
    seed: u64,
) -> Vec<u8> {
    let mut stages = Vec::new();
    for b in 0..blocks {
        if b > 0 {
            stages.push(Stage::Affine);
        }
        stages.push(Stage::Cnf(cnf(dim, hidden, kinds, act, 0.5)));
    }
    let h = header(dim, true, stages, TIGHT);
    let w = random_weights(&h, &mut rng(seed));
    encode_model(&h, &w)
}

#[test]
fn exact_divergence_equals_finite_difference_trace() {
    let kinds_list: [&[LayerKind]; 3] =
        [&[LayerKind::ConcatSquash], &[LayerKind::Concat], &[LayerKind::Ignore, LayerKind::Concat]];
    let acts = [Activation::Tanh, Activation::Softplus, Activation::Elu, Activation::Swish { beta: 1.3 }];
    let mut case = 0u64;
    for d in [2u16, 6, 16] {
        for kinds in kinds_list {
            for act in acts {
                case += 1;
                let bytes = random_model(d, &[32, 24], kinds, act, 1, case);
                let model = Model::from_bytes(&bytes).unwrap();
                let block = model.cnf_block(0).unwrap();
                let spec = match model.header().stage(0).unwrap() {
                    Stage::Cnf(c) => c,
                    _ => unreachable!(),
                };
                // Network weights follow mean/std in the weight section.
                let all = weights_of(&bytes, &model);
                let reference = RefNet::new(&spec, d as usize, &all[2 * d as usize..]);
                let mut work = vec![0.0; ffjord_runtime::Dynamics::work_len(&block)];
                let mut r = rng(1000 + case);
                for t in [0.0f32, 0.25, 0.5] {
                    let z: Vec<f32> = (0..d).map(|_| uniform(&mut r, 1.5)).collect();
                    let z64: Vec<f64> = z.iter().map(|&v| v as f64).collect();
                    let mut f = vec![0.0; d as usize];
                    let div = block.velocity_and_divergence(t, &z, &mut f, &mut work);
                    let fd = reference.fd_trace(t as f64, &z64);
                    // f32 forward mode vs float64 central differences.
                    assert!(
                        (div as f64 - fd).abs() < 1e-4 * (1.0 + fd.abs()),
                        "d={d} {kinds:?} {act:?} t={t}: {div} vs {fd}"
                    );
                    let f64ref = reference.eval(t as f64, &z64);
                    for (a, b) in f.iter().zip(&f64ref) {
                        assert!((*a as f64 - b).abs() < 1e-5 * (1.0 + b.abs()), "velocity {a} vs {b}");
                    }
                    let mut f1 = vec![0.0; d as usize];
                    block.velocity(t, &z, &mut f1, &mut work);
                    assert_eq!(f, f1, "one-lane and D+1-lane passes must agree exactly");
                }
            }
        }
    }
}

/// The weight section decoded back to floats (for the float64 reference).
fn weights_of(bytes: &[u8], model: &Model<'_>) -> Vec<f32> {
    let n = model.weight_count();
    let start = bytes.len() - 4 - 4 * n;
    bytes[start..start + 4 * n].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

#[test]
fn forward_then_inverse_returns_the_start_point() {
    let bytes = random_model(6, &[64, 64, 64], &[LayerKind::ConcatSquash], Activation::Tanh, 2, 42);
    let model = Model::from_bytes(&bytes).unwrap();
    let flow = Flow::new(&model, TIGHT).unwrap();
    let mut scratch = vec![0.0; flow.scratch_len()];
    let mut r = rng(5);
    for _ in 0..5 {
        let x: Vec<f32> = (0..6).map(|_| uniform(&mut r, 2.0)).collect();
        let mut z = vec![0.0; 6];
        let ld = flow.forward(&x, Some(&mut z), &mut scratch).unwrap();
        let back = flow.inverse(&mut z, &mut scratch).unwrap();
        for (a, b) in z.iter().zip(&x) {
            assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
        }
        // The reverse pass carries the same log-density along the path.
        assert!((back.log_p - ld.log_p).abs() < 1e-4, "{} vs {}", back.log_p, ld.log_p);
    }
}

#[test]
fn sampled_log_density_agrees_with_log_density_of_the_sample() {
    let bytes = random_model(2, &[32, 32], &[LayerKind::ConcatSquash], Activation::Softplus, 2, 9);
    let model = Model::from_bytes(&bytes).unwrap();
    for solver in [TIGHT, Solver::Rk4 { steps: 64 }] {
        let flow = Flow::new(&model, solver).unwrap();
        let mut scratch = vec![0.0; flow.scratch_len()];
        let mut r = rng(11);
        for _ in 0..20 {
            let mut x = [0.0f32; 2];
            let s = flow.sample(&mut r, &mut x, &mut scratch).unwrap();
            let ld = flow.log_density(&x, &mut scratch).unwrap();
            assert!((s.log_p - ld.log_p).abs() < 1e-3, "{solver:?}: {} vs {}", s.log_p, ld.log_p);
        }
    }
}

#[test]
fn same_seed_same_samples() {
    let bytes = random_model(2, &[16], &[LayerKind::ConcatSquash], Activation::Tanh, 1, 3);
    let model = Model::from_bytes(&bytes).unwrap();
    let flow = Flow::new(&model, Solver::Rk4 { steps: 8 }).unwrap();
    let mut scratch = vec![0.0; flow.scratch_len()];
    let draw = |seed| {
        let mut r = rng(seed);
        let mut x = [0.0f32; 2];
        let mut scratch = scratch.clone();
        flow.sample(&mut r, &mut x, &mut scratch).unwrap();
        x
    };
    assert_eq!(draw(1), draw(1));
    assert_ne!(draw(1), draw(2));
    scratch.clear();
}

#[test]
fn scores_and_verdicts_follow_the_threshold() {
    let mut h = header(
        2,
        false,
        vec![Stage::Cnf(cnf(2, &[8], &[LayerKind::ConcatSquash], Activation::Tanh, 0.5))],
        Solver::Rk4 { steps: 8 },
    );
    let w = random_weights(&h, &mut rng(4));
    let plain = encode_model(&h, &w);
    let model = Model::from_bytes(&plain).unwrap();
    let flow = Flow::new(&model, model.default_solver()).unwrap();
    let mut scratch = vec![0.0; flow.scratch_len()];
    let near = flow.score(&[0.0, 0.0], &mut scratch).unwrap();
    assert_eq!(near.verdict, Verdict::Uncalibrated);
    let far = flow.score(&[8.0, -8.0], &mut scratch).unwrap();
    h.threshold = Some(Threshold { score: (near.score + far.score) / 2.0, quantile: 0.99 });
    let calibrated = encode_model(&h, &w);
    let model = Model::from_bytes(&calibrated).unwrap();
    let flow = Flow::new(&model, model.default_solver()).unwrap();
    assert_eq!(flow.score(&[0.0, 0.0], &mut scratch).unwrap().verdict, Verdict::Normal);
    let s = flow.score(&[8.0, -8.0], &mut scratch).unwrap();
    assert_eq!(s.verdict, Verdict::Anomaly);
    assert_eq!(s.score, -s.log_density.log_p);

    // Batch helpers agree with the single-row calls.
    let xs = [0.0f32, 0.0, 8.0, -8.0, 1.0, 1.0];
    let mut scores = [0.0f32; 3];
    let stats = flow.score_batch(&xs, &mut scores, &mut scratch).unwrap();
    assert_eq!(stats.nfe, 3 * 32);
    for (row, s) in xs.chunks(2).zip(scores) {
        assert_eq!(flow.score(row, &mut scratch).unwrap().score, s);
    }
}

#[test]
fn bad_input_is_a_typed_error() {
    let bytes = random_model(3, &[8], &[LayerKind::ConcatSquash], Activation::Tanh, 1, 1);
    let model = Model::from_bytes(&bytes).unwrap();
    let flow = Flow::new(&model, TIGHT).unwrap();
    let mut scratch = vec![0.0; flow.scratch_len()];
    assert_eq!(
        flow.log_density(&[1.0, 2.0], &mut scratch).unwrap_err(),
        SolveError::InputDimension { expected: 3, found: 2 }
    );
    assert_eq!(
        flow.log_density(&[1.0, f32::NAN, 0.0], &mut scratch).unwrap_err(),
        SolveError::NonFiniteInput { index: 1 }
    );
    assert_eq!(
        flow.log_density(&[1.0, 0.0, f32::NEG_INFINITY], &mut scratch).unwrap_err(),
        SolveError::NonFiniteInput { index: 2 }
    );
    let mut small = vec![0.0; flow.scratch_len() - 1];
    assert!(matches!(
        flow.log_density(&[1.0, 2.0, 3.0], &mut small),
        Err(SolveError::ScratchTooSmall { .. })
    ));
    let mut out = [0.0f32; 2];
    let e = flow.log_density_batch(&[0.0; 7], &mut out, &mut scratch).unwrap_err();
    assert_eq!(e.row, 2);
    let e = flow.log_density_batch(&[0.0, 0.0, 0.0, 1.0, f32::NAN, 0.0], &mut out, &mut scratch).unwrap_err();
    assert_eq!((e.row, e.error), (1, SolveError::NonFiniteInput { index: 1 }));
    assert!(Flow::new(&model, Solver::Rk4 { steps: 0 }).is_err());
}

#[test]
fn stiff_dynamics_hit_the_step_budget_with_an_error() {
    // A fast linear flow (eigenvalues ~ -3000) under a tight tolerance and tiny budget.
    let a = DMatrix::from_diagonal_element(2, 2, -3000.0);
    let bytes = linear_model(&a, 1.0, None, None);
    let model = Model::from_bytes(&bytes).unwrap();
    let solver = Solver::Dopri5(Dopri5 { max_steps: 50, ..Dopri5::with_tolerance(1e-6) });
    let flow = Flow::new(&model, solver).unwrap();
    let mut scratch = vec![0.0; flow.scratch_len()];
    let e = flow.log_density(&[1.0, 1.0], &mut scratch).unwrap_err();
    assert!(matches!(e, SolveError::MaxStepsReached { steps: 50, .. }), "{e:?}");
}
