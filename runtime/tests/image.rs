//! The image stages (format version 4) against float64 references: the
//! convolutional CNF's velocity and exact divergence through RK4 against a
//! float64 convolution net with a finite-difference trace, a block acting
//! on a prefix of the row, the logit transform's log-determinant in closed
//! form, squeeze as a permutation, inverse round trips, and typed errors.

#![cfg(feature = "images")]

mod common;

use common::*;
use ffjord_runtime::format::conv_weight_count;
use ffjord_runtime::{
    Activation, ConvCnfSpec, Field, Flow, ImageShape, LayerKind, LayerSpec, LoadError, Model, SolveError,
    Solver, Stage,
};

fn shape(channels: u16, height: u16, width: u16) -> ImageShape {
    ImageShape { channels, height, width }
}

fn conv(shape: ImageShape, hidden: &[u16], kind: LayerKind, activation: Activation, end_time: f32) -> Stage {
    let mut layers = heapless::Vec::new();
    for &c in hidden.iter().chain([shape.channels].iter()) {
        layers.push(LayerSpec { kind, out_dim: c }).unwrap();
    }
    Stage::ConvCnf(ConvCnfSpec { shape, layers, activation, end_time })
}

/// Float64 reference of a convolutional ODE net (FORMAT.md's weight order).
struct RefConv {
    shape: (usize, usize, usize),
    layers: Vec<(LayerKind, usize, usize, Vec<f64>)>,
    activation: Activation,
}

impl RefConv {
    fn new(stage: &Stage, weights: &[f32]) -> Self {
        let Stage::ConvCnf(spec) = stage else { panic!("not a conv stage") };
        let s = spec.shape;
        let mut c_in = s.channels as usize;
        let mut at = 0;
        let mut layers = Vec::new();
        for l in &spec.layers {
            let c_out = l.out_dim as usize;
            let n = conv_weight_count(l.kind, c_in, c_out).unwrap();
            layers.push((l.kind, c_in, c_out, weights[at..at + n].iter().map(|&v| v as f64).collect()));
            at += n;
            c_in = c_out;
        }
        assert_eq!(at, weights.len());
        RefConv {
            shape: (s.channels as usize, s.height as usize, s.width as usize),
            layers,
            activation: spec.activation,
        }
    }

    fn eval(&self, t: f64, z: &[f64]) -> Vec<f64> {
        let (_, h, w) = self.shape;
        let mut x = z.to_vec();
        let n = self.layers.len();
        for (li, (kind, c_in, c_out, p)) in self.layers.iter().enumerate() {
            let concat = *kind == LayerKind::Concat;
            let cols = c_in + concat as usize;
            // Input channels, the time channel first for concat.
            let mut xin = Vec::new();
            if concat {
                xin.extend(std::iter::repeat_n(t, h * w));
            }
            xin.extend_from_slice(&x);
            let kernel = &p[..c_out * cols * 9];
            let bias = &p[c_out * cols * 9..c_out * cols * 9 + c_out];
            let mut y = vec![0.0; c_out * h * w];
            for o in 0..*c_out {
                for i in 0..h {
                    for j in 0..w {
                        let mut acc = bias[o];
                        for c in 0..cols {
                            for di in 0..3 {
                                for dj in 0..3 {
                                    let (r, q) = (i as i64 + di as i64 - 1, j as i64 + dj as i64 - 1);
                                    if r < 0 || q < 0 || r >= h as i64 || q >= w as i64 {
                                        continue;
                                    }
                                    acc += kernel[((o * cols + c) * 3 + di) * 3 + dj]
                                        * xin[(c * h + r as usize) * w + q as usize];
                                }
                            }
                        }
                        y[(o * h + i) * w + j] = acc;
                    }
                }
            }
            if *kind == LayerKind::ConcatSquash {
                let rest = &p[c_out * cols * 9 + c_out..];
                for o in 0..*c_out {
                    let gate = 1.0 / (1.0 + (-(rest[o] * t + rest[c_out + o])).exp());
                    for v in &mut y[o * h * w..(o + 1) * h * w] {
                        *v = *v * gate + rest[2 * c_out + o] * t;
                    }
                }
            }
            if li + 1 < n {
                for v in &mut y {
                    *v = act64(self.activation, *v);
                }
            }
            x = y;
        }
        x
    }

    /// `Tr(∂f/∂z)` by central differences.
    fn fd_trace(&self, t: f64, z: &[f64]) -> f64 {
        let eps = 1e-5;
        (0..z.len())
            .map(|j| {
                let (mut a, mut b) = (z.to_vec(), z.to_vec());
                a[j] += eps;
                b[j] -= eps;
                (self.eval(t, &a)[j] - self.eval(t, &b)[j]) / (2.0 * eps)
            })
            .sum()
    }

    /// RK4 with `steps` steps over [0, T] of the augmented state `[z, ℓ]`,
    /// `dℓ/dt = −Tr(∂f/∂z)`; returns `(z(T), ℓ(T))`.
    fn rk4(&self, z0: &[f64], end_time: f64, steps: usize) -> (Vec<f64>, f64) {
        let rate = |t: f64, y: &[f64]| -> Vec<f64> {
            let (z, _) = y.split_at(z0.len());
            let mut out = self.eval(t, z);
            out.push(-self.fd_trace(t, z));
            out
        };
        let mut y: Vec<f64> = z0.iter().copied().chain([0.0]).collect();
        let h = end_time / steps as f64;
        for s in 0..steps {
            let t = s as f64 * h;
            let add =
                |a: &[f64], k: &[f64], c: f64| a.iter().zip(k).map(|(a, k)| a + c * k).collect::<Vec<_>>();
            let k1 = rate(t, &y);
            let k2 = rate(t + h / 2.0, &add(&y, &k1, h / 2.0));
            let k3 = rate(t + h / 2.0, &add(&y, &k2, h / 2.0));
            let k4 = rate(t + h, &add(&y, &k3, h));
            for i in 0..y.len() {
                y[i] += h / 6.0 * (k1[i] + 2.0 * k2[i] + 2.0 * k3[i] + k4[i]);
            }
        }
        let ell = y.pop().unwrap();
        (y, ell)
    }
}

fn std_normal64(z: &[f64]) -> f64 {
    std_normal_logprob64(z)
}

#[test]
fn conv_cnf_matches_a_float64_net_through_rk4() {
    let solver = Solver::Rk4 { steps: 2 };
    let cases = [
        (shape(1, 3, 4), LayerKind::Concat, Activation::Tanh),
        (shape(2, 2, 3), LayerKind::ConcatSquash, Activation::Softplus),
        (shape(2, 4, 2), LayerKind::Ignore, Activation::Swish { beta: 1.2 }),
    ];
    for (case, (s, kind, act)) in cases.into_iter().enumerate() {
        let d = s.len() as u16;
        let stage = conv(s, &[3, 4], kind, act, 0.6);
        let h = header(d, false, vec![stage.clone()], solver);
        let w = random_weights(&h, &mut rng(10 + case as u64));
        let bytes = encode_model(&h, &w);
        assert_eq!(u16::from_le_bytes([bytes[4], bytes[5]]), 4, "image stages are version 4");
        let model = Model::from_bytes(&bytes).unwrap();
        let flow = Flow::new(&model, solver).unwrap();
        let reference = RefConv::new(&stage, &w);
        let mut scratch = vec![0.0; flow.scratch_len()];
        let mut r = rng(99);
        for _ in 0..3 {
            let x: Vec<f32> = (0..d).map(|_| uniform(&mut r, 1.5)).collect();
            let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            let (z, ell) = reference.rk4(&x64, 0.6, 2);
            let want = std_normal64(&z) - ell;
            let got = flow.log_density(&x, &mut scratch).unwrap();
            // f32 network, f64 reference with a finite-difference trace.
            assert!(
                (got.log_p as f64 - want).abs() < 2e-4 * (1.0 + want.abs()),
                "case {case}: {} vs {want}",
                got.log_p
            );
            assert_eq!(got.stats.nfe, 8);
        }
    }
}

#[test]
fn a_block_on_a_prefix_leaves_the_rest_alone() {
    // 2 × 4 × 4 image; after a squeeze and factor-out, blocks act on the
    // first 16 of 32 coordinates.
    let solver = Solver::Rk4 { steps: 2 };
    let stage = conv(shape(1, 4, 4), &[2], LayerKind::ConcatSquash, Activation::Tanh, 0.5);
    let h = header(32, false, vec![stage.clone()], solver);
    let w = random_weights(&h, &mut rng(5));
    let bytes = encode_model(&h, &w);
    let model = Model::from_bytes(&bytes).unwrap();
    let flow = Flow::new(&model, solver).unwrap();
    let mut scratch = vec![0.0; flow.scratch_len()];
    let mut r = rng(6);
    let x: Vec<f32> = (0..32).map(|_| uniform(&mut r, 1.0)).collect();
    let mut z = vec![0.0; 32];
    let got = flow.forward(&x, Some(&mut z), &mut scratch).unwrap();
    assert_eq!(&z[16..], &x[16..]);
    let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let (zp, ell) = RefConv::new(&stage, &w).rk4(&x64[..16], 0.5, 2);
    let want = std_normal64(&zp) + std_normal64(&x64[16..]) - ell;
    assert!((got.log_p as f64 - want).abs() < 2e-4 * (1.0 + want.abs()), "{} vs {want}", got.log_p);
    for (a, b) in z[..16].iter().zip(&zp) {
        assert!((*a as f64 - b).abs() < 1e-4);
    }
}

/// A conv block whose weights are all zero (f = 0), so the chain's log p is
/// that of its closed-form stages.
fn with_zero_net(stages: Vec<Stage>, d: u16) -> Vec<u8> {
    let h = header(d, false, stages, Solver::Euler { steps: 1 });
    let n = random_weights(&h, &mut rng(0)).len();
    encode_model(&h, &vec![0.0; n])
}

#[test]
fn logit_log_det_and_squeeze_match_closed_forms() {
    let alpha = 1e-6f32;
    let s = shape(1, 4, 4);
    let bytes = with_zero_net(
        vec![
            Stage::Logit { alpha },
            Stage::Squeeze(s),
            conv(shape(4, 2, 2), &[2], LayerKind::Concat, Activation::Tanh, 1.0),
        ],
        16,
    );
    let model = Model::from_bytes(&bytes).unwrap();
    let flow = Flow::new(&model, model.default_solver()).unwrap();
    let mut scratch = vec![0.0; flow.scratch_len()];
    let mut r = rng(8);
    // Pixels in [0, 1], both ends included (0 and 1 are dequantized pixel
    // values' limits).
    let mut x: Vec<f32> = (0..16).map(|_| 0.5 + 0.5 * uniform(&mut r, 1.0)).collect();
    x[0] = 0.0;
    x[1] = 1.0;
    let mut z = vec![0.0; 16];
    let got = flow.forward(&x, Some(&mut z), &mut scratch).unwrap();
    let (a, mut want, mut logits) = (alpha as f64, 0.0, Vec::new());
    for &v in &x {
        let (s, s1) = (a + (1.0 - 2.0 * a) * v as f64, a + (1.0 - 2.0 * a) * (1.0 - v as f64));
        logits.push(s.ln() - s1.ln());
        want += (1.0 - 2.0 * a).ln() - s.ln() - s1.ln();
    }
    want += std_normal64(&logits);
    assert!((got.log_p as f64 - want).abs() < 1e-5 * want.abs(), "{} vs {want}", got.log_p);
    // Squeeze: channel 4c + 2dy + dx holds pixel (2h + dy, 2w + dx).
    for dy in 0..2 {
        for dx in 0..2 {
            for i in 0..2 {
                for j in 0..2 {
                    let from = (2 * i + dy) * 4 + 2 * j + dx;
                    let to = ((2 * dy + dx) * 2 + i) * 2 + j;
                    assert!((z[to] as f64 - logits[from]).abs() < 1e-4 * (1.0 + logits[from].abs()));
                }
            }
        }
    }
}

#[test]
fn multiscale_chain_inverts_and_samples_consistently() {
    let solver = Solver::Rk4 { steps: 4 };
    let stages = vec![
        Stage::Logit { alpha: 0.05 },
        conv(shape(1, 4, 4), &[4], LayerKind::ConcatSquash, Activation::Tanh, 0.5),
        Stage::Squeeze(shape(1, 4, 4)),
        conv(shape(4, 2, 2), &[4], LayerKind::Concat, Activation::Softplus, 0.5),
        // Factor out half the channels: the last block acts on 8 of 16.
        conv(shape(2, 2, 2), &[4], LayerKind::ConcatSquash, Activation::Tanh, 0.5),
    ];
    let h = header(16, false, stages, solver);
    let w: Vec<f32> = random_weights(&h, &mut rng(21)).iter().map(|v| 0.5 * v).collect();
    let bytes = encode_model(&h, &w);
    let model = Model::from_bytes(&bytes).unwrap();
    let flow = Flow::new(&model, solver).unwrap();
    let mut scratch = vec![0.0; flow.scratch_len()];
    let mut r = rng(22);
    let x: Vec<f32> = (0..16).map(|_| 0.5 + 0.45 * uniform(&mut r, 1.0)).collect();
    let mut z = vec![0.0; 16];
    let fwd = flow.forward(&x, Some(&mut z), &mut scratch).unwrap();
    let back = flow.inverse(&mut z, &mut scratch).unwrap();
    for (a, b) in z.iter().zip(&x) {
        assert!((a - b).abs() < 1e-3, "round trip {a} vs {b}");
    }
    assert!((back.log_p - fwd.log_p).abs() < 1e-2, "{} vs {}", back.log_p, fwd.log_p);
    // A sample's log p is the log p of the sample (to the solver's error).
    let mut s = vec![0.0; 16];
    let sample = flow.sample(&mut rng(3), &mut s, &mut scratch).unwrap();
    let again = flow.log_density(&s, &mut scratch).unwrap();
    assert!((sample.log_p - again.log_p).abs() < 1e-2, "{} vs {}", sample.log_p, again.log_p);
    // The batch paths take image models one row at a time: the same bits.
    let mut out = [0.0; 2];
    let xs: Vec<f32> = x.iter().chain(&x).copied().collect();
    let mut packed_scratch = vec![0.0; flow.packed_scratch_len(32)];
    flow.log_density_packed(&xs, &mut out, 32, &mut packed_scratch).unwrap();
    assert_eq!(out, [fwd.log_p; 2]);
}

#[test]
fn image_inputs_and_stages_get_typed_errors() {
    let bytes = with_zero_net(
        vec![
            Stage::Logit { alpha: 1e-6 },
            conv(shape(1, 2, 2), &[1], LayerKind::Ignore, Activation::Tanh, 1.0),
        ],
        4,
    );
    let model = Model::from_bytes(&bytes).unwrap();
    let flow = Flow::new(&model, model.default_solver()).unwrap();
    let mut scratch = vec![0.0; flow.scratch_len()];
    assert_eq!(
        flow.log_density(&[0.5, 1.5, 0.5, 0.5], &mut scratch).unwrap_err(),
        SolveError::InputOutOfRange { index: 1 }
    );
    assert_eq!(
        flow.log_density(&[0.5, 0.5, -0.1, 0.5], &mut scratch).unwrap_err(),
        SolveError::InputOutOfRange { index: 2 }
    );
    let bad = |stages: Vec<Stage>, d: u16| {
        let h = header(d, false, stages, Solver::Euler { steps: 1 });
        let mut out = vec![0u8; 1 << 16];
        ffjord_runtime::format::encode(&h, &[], &mut out).unwrap_err()
    };
    let net = || conv(shape(1, 2, 2), &[1], LayerKind::Ignore, Activation::Tanh, 1.0);
    let field = |e| {
        matches!(e, ffjord_runtime::format::EncodeError::Invalid(LoadError::InvalidField(Field::ImageStage)))
    };
    assert!(field(bad(vec![Stage::Logit { alpha: 0.5 }, net()], 4)));
    assert!(field(bad(vec![Stage::Logit { alpha: f32::NAN }, net()], 4)));
    assert!(field(bad(vec![Stage::Squeeze(shape(1, 3, 2)), net()], 6)));
    // An image larger than the row.
    assert!(field(bad(vec![conv(shape(1, 4, 4), &[1], LayerKind::Ignore, Activation::Tanh, 1.0)], 8)));
}

#[test]
fn exact_trace_in_passes_and_hutchinson_estimates() {
    use ffjord_runtime::ImageTrace;
    let solver = Solver::Rk4 { steps: 4 };
    let stages = vec![
        conv(shape(1, 4, 4), &[4], LayerKind::ConcatSquash, Activation::Tanh, 0.5),
        Stage::Squeeze(shape(1, 4, 4)),
        conv(shape(2, 2, 2), &[4], LayerKind::Concat, Activation::Softplus, 0.5),
    ];
    let h = header(16, false, stages, solver);
    let w = random_weights(&h, &mut rng(31));
    let bytes = encode_model(&h, &w);
    let model = Model::from_bytes(&bytes).unwrap();
    let exact = Flow::new(&model, solver).unwrap();
    let x: Vec<f32> = {
        let mut r = rng(32);
        (0..16).map(|_| uniform(&mut r, 1.0)).collect()
    };
    let mut z_all = vec![0.0; 16];
    let all = exact.forward(&x, Some(&mut z_all), &mut vec![0.0; exact.scratch_len()]).unwrap();
    // Fewer lanes per pass: less scratch, the same path (z to the bit) and
    // the same trace up to summation order.
    for lanes_per_pass in [1u16, 3, 7, 16, 100] {
        let flow = exact.with_image_trace(ImageTrace::Exact { lanes_per_pass }).unwrap();
        if lanes_per_pass < 16 {
            assert!(flow.scratch_len() < exact.scratch_len(), "{lanes_per_pass}");
        }
        let mut z = vec![0.0; 16];
        let got = flow.forward(&x, Some(&mut z), &mut vec![0.0; flow.scratch_len()]).unwrap();
        assert_eq!(z, z_all, "{lanes_per_pass} lanes per pass");
        assert!(
            (got.log_p - all.log_p).abs() < 1e-5 * (1.0 + all.log_p.abs()),
            "{} vs {}",
            got.log_p,
            all.log_p
        );
    }
    // Hutchinson: a seed fixes the estimate; over seeds it averages to the
    // exact log p (unbiased: within 4 standard errors of 400 draws).
    let estimate = |probes: u16, seed: u32| {
        let flow = exact.with_image_trace(ImageTrace::Hutchinson { probes, seed }).unwrap();
        let mut z = vec![0.0; 16];
        let ld = flow.forward(&x, Some(&mut z), &mut vec![0.0; flow.scratch_len()]).unwrap();
        assert_eq!(z, z_all, "the path does not depend on the probes");
        ld.log_p as f64
    };
    assert_eq!(estimate(2, 7), estimate(2, 7));
    let draws: Vec<f64> = (0..400).map(|s| estimate(1, s)).collect();
    let mean = draws.iter().sum::<f64>() / 400.0;
    let sd = (draws.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 399.0).sqrt();
    assert!(sd > 1e-4, "the estimates vary with the seed");
    assert!(
        (mean - all.log_p as f64).abs() < 4.0 * sd / 20.0,
        "mean {mean} ± {} vs exact {}",
        sd / 20.0,
        all.log_p
    );
    // More probes, less spread.
    let draws8: Vec<f64> = (0..100).map(|s| estimate(8, 1000 + s)).collect();
    let mean8 = draws8.iter().sum::<f64>() / 100.0;
    let sd8 = (draws8.iter().map(|v| (v - mean8).powi(2)).sum::<f64>() / 99.0).sqrt();
    assert!(sd8 < 0.6 * sd, "8 probes: sd {sd8}, 1 probe: {sd}");
    assert_eq!(
        exact.with_image_trace(ImageTrace::Hutchinson { probes: 0, seed: 1 }).unwrap_err(),
        SolveError::InvalidSolver
    );
}
