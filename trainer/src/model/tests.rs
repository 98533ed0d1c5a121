//! Unit tests of the model code: forward/inverse consistency, forward-mode
//! trace against the VJP trace, the kernel against autograd, whitening.

use super::*;
use crate::ode::dopri5_at;
use cnf::divergence;
use ffjord_runtime::Solver;
use ffjord_runtime::{Activation, LayerKind};
use tch::{Device, Kind, Tensor, nn};

/// Every activation the runtime knows.
const ACTIVATIONS: [Activation; 5] = [
    Activation::Tanh,
    Activation::Softplus,
    Activation::Elu,
    Activation::Swish { beta: 0.7 },
    Activation::Identity,
];

/// libtorch's generator is global; tests on other threads must not draw in between.
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn chain(vs: &nn::VarStore, dim: i64) -> Chain {
    let layers: Vec<Box<dyn FlowLayer>> = (0..2)
        .map(|b| {
            let p = vs.root() / "chain" / b;
            let net =
                OdeNet::new(&(&p / "odefunc"), dim, &[16, 16], LayerKind::ConcatSquash, Activation::Tanh);
            Box::new(Cnf::new(&p, Box::new(net), 0.5, true)) as Box<dyn FlowLayer>
        })
        .collect();
    Chain::new(layers, dim)
}

#[test]
fn sampling_inverts_the_forward_pass_and_carries_log_p() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(1);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let c = chain(&vs, 3);
    vs.double();
    let opts = SolveOptions::eval(dopri5_at(1e-9, 10_000));
    let x = Tensor::randn([5, 3], (Kind::Double, Device::Cpu));
    let fwd = c.log_prob(&x, &opts).unwrap();
    let back = c.sample_from(&fwd.z, &opts).unwrap();
    assert!(f64::try_from((back.z - &x).abs().max()).unwrap() < 1e-6);
    assert!(f64::try_from((back.log_p - fwd.log_p).abs().max()).unwrap() < 1e-6);
}

/// Whitening: the outputs have identity covariance, and a chain of the
/// whitening stage and a zero-initialised CNF is exactly the fitted
/// Gaussian `N(m, C)` (float64 closed form, 1e-9 nats); the inverse solves
/// back to the rows.
#[test]
fn whitening_starts_the_chain_as_the_full_covariance_gaussian() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(5);
    let opts = (Kind::Double, Device::Cpu);
    let mixing = Tensor::from_slice(&[1.0, 0.0, 0.0, 0.9, 0.3, 0.0, -0.5, 2.0, 0.1]).reshape([3, 3]);
    let x =
        Tensor::randn([400, 3], opts).matmul(&mixing.transpose(0, 1)) + Tensor::from_slice(&[1.0, -2.0, 0.5]);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let linear = Linear::new(&(vs.root() / "w"), 3);
    let mut net = OdeNet::new(&(vs.root() / "f"), 3, &[8], LayerKind::ConcatSquash, Activation::Tanh);
    net.zero_last_layer();
    let cnf = Cnf::new(&(vs.root() / "c"), Box::new(net), 0.5, true);
    vs.double();
    linear.set_whitening(&x, &Tensor::zeros([3], opts), 0.0).unwrap();
    let (y, _) =
        linear.forward(&x, &SolveOptions::eval(Solver::Rk4 { steps: 2 }), &mut PassStats::default()).unwrap();
    let cov = y.transpose(0, 1).cov(1, None::<Tensor>, None::<Tensor>);
    assert!(f64::try_from((cov - Tensor::eye(3, opts)).abs().max()).unwrap() < 1e-10);
    let chain = Chain::new(vec![Box::new(linear), Box::new(cnf)], 3);
    let eval = SolveOptions::eval(dopri5_at(1e-9, 10_000));
    let out = chain.log_prob(&x, &eval).unwrap();
    // log N(x; m, C) with the sample mean and (unbiased) covariance.
    let m = x.mean_dim(0, false, Kind::Double);
    let c = x.transpose(0, 1).cov(1, None::<Tensor>, None::<Tensor>);
    let diff = &x - &m;
    let maha = (diff.matmul(&c.inverse()) * &diff).sum_dim_intlist(1, false, Kind::Double);
    let expected: Tensor = maha * -0.5 - c.logdet() * 0.5 - 1.5 * (2.0 * std::f64::consts::PI).ln();
    assert!(f64::try_from((&out.log_p - expected).abs().max()).unwrap() < 1e-9);
    let back = chain.sample_from(&out.z, &eval).unwrap();
    assert!(f64::try_from((back.z - &x).abs().max()).unwrap() < 1e-9);
}

/// Forward-mode tangents give the same velocity and exact trace as `D`
/// vector-Jacobian products, for every layer kind and activation (float64,
/// 1e-10), at several times, and gradients flow through the trace.
#[test]
fn forward_mode_trace_equals_the_vjp_trace() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(3);
    for kind in [LayerKind::ConcatSquash, LayerKind::Concat, LayerKind::Ignore] {
        for act in ACTIVATIONS {
            let mut vs = nn::VarStore::new(Device::Cpu);
            let net = OdeNet::new(&vs.root(), 3, &[8, 5], kind, act);
            vs.double();
            for t in [0.0, 0.3, 1.7] {
                let t = Tensor::from(t).to_kind(Kind::Double);
                let z = Tensor::randn([6, 3], (Kind::Double, Device::Cpu)).set_requires_grad(true);
                let (f, tr) = net.forward_with_trace(&t, &z).expect("OdeNet has a forward-mode trace");
                let f_ref = net.forward(&t, &z);
                let (tr_ref, _) = divergence(&f_ref, &z, None, false).unwrap();
                let err = |a: &Tensor, b: &Tensor| f64::try_from((a - b).abs().max()).unwrap();
                assert!(err(&f, &f_ref) < 1e-10, "{kind:?} {act:?}");
                assert!(err(&tr, &tr_ref) < 1e-10, "{kind:?} {act:?}: {tr} vs {tr_ref}");
                // (A linear net's trace does not depend on z: no gradient then.)
                let g = Tensor::run_backward(&[tr.sum(Kind::Double)], &[&z], false, false);
                assert!(!g[0].defined() || f64::try_from(g[0].abs().sum(Kind::Double)).unwrap().is_finite());
            }
        }
    }
}

/// The hand-written kernel's `f`, divergence and VJP (w.r.t. `z`, every
/// parameter and `t`) equal autograd's — through `forward_with_trace` for
/// the exact trace, through the VJP `eᵀ∂f/∂z` for Hutchinson's — for
/// every layer kind and activation: float64 to 1e-10, and the float32
/// kernel against the float64 autograd reference to 1e-4 relative.
#[test]
fn kernel_vjp_equals_autograd() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(5);
    let rel = |a: &Tensor, b: &Tensor| {
        let scale = f64::try_from(b.abs().max()).unwrap().max(1e-3);
        f64::try_from((a.to_kind(Kind::Double) - b).abs().max()).unwrap() / scale
    };
    for kind in [LayerKind::ConcatSquash, LayerKind::Concat, LayerKind::Ignore] {
        for act in ACTIVATIONS {
            let mut vs = nn::VarStore::new(Device::Cpu);
            let net = OdeNet::new(&vs.root(), 3, &[8, 5], kind, act);
            vs.double();
            for (t, hutchinson) in [(0.0, false), (0.3, false), (1.7, false), (0.0, true), (0.9, true)] {
                let t_leaf = Tensor::from(t).to_kind(Kind::Double).set_requires_grad(true);
                let z = Tensor::randn([6, 3], (Kind::Double, Device::Cpu)).set_requires_grad(true);
                let a_f = Tensor::randn([6, 3], (Kind::Double, Device::Cpu));
                let a_tr = Tensor::randn([6], (Kind::Double, Device::Cpu));
                let e = Tensor::randn([6, 3], (Kind::Double, Device::Cpu));
                let noise = hutchinson.then_some(&e);
                let (f, tr) = if hutchinson {
                    let f = net.forward(&t_leaf, &z);
                    let (tr, _) = divergence(&f, &z, noise, true).unwrap();
                    (f, tr)
                } else {
                    net.forward_with_trace(&t_leaf, &z).unwrap()
                };
                let surrogate = (&f * &a_f).sum(Kind::Double) + (&tr * &a_tr).sum(Kind::Double);
                let mut inputs = vec![z.shallow_clone(), t_leaf.shallow_clone()];
                inputs.extend(net.parameters());
                let g = Tensor::run_backward(&[surrogate], &inputs, false, true);
                let grad =
                    |i: usize| if g[i].defined() { g[i].shallow_clone() } else { inputs[i].zeros_like() };
                let flat: Vec<Tensor> = (2..inputs.len()).map(|i| grad(i).reshape([-1])).collect();
                let (g_z, g_t, g_params) = (grad(0), grad(1), Tensor::cat(&flat, 0));
                let case = format!("{kind:?} {act:?} t={t} hutchinson={hutchinson}");
                let v = net
                    .vjp_kernel(t, &z.detach(), noise, &a_f, &a_tr, None)
                    .expect("OdeNet has a kernel")
                    .unwrap();
                for (got, want, what) in [
                    (&v.f, &f, "f"),
                    (&v.div, &tr, "trace"),
                    (&v.grad_z, &g_z, "∂z"),
                    (&v.grad_params, &g_params, "∂θ"),
                ] {
                    assert!(rel(got, &want.detach()) < 1e-10, "{case}: {what}");
                }
                assert!(rel(&Tensor::from(v.grad_t), &g_t) < 1e-10, "{case}: ∂t {} vs {g_t}", v.grad_t);
                let z32 = z.detach().to_kind(Kind::Float);
                let (a_f32, a_tr32) = (a_f.to_kind(Kind::Float), a_tr.to_kind(Kind::Float));
                vs.float();
                let e32 = e.to_kind(Kind::Float);
                let v32 = net
                    .vjp_kernel(t, &z32, hutchinson.then_some(&e32), &a_f32, &a_tr32, None)
                    .unwrap()
                    .unwrap();
                vs.double();
                assert_eq!(v32.grad_params.kind(), Kind::Float);
                for (got, want, what) in
                    [(&v32.f, &f, "f"), (&v32.div, &tr, "trace"), (&v32.grad_z, &g_z, "∂z")]
                {
                    assert!(rel(got, &want.detach()) < 1e-4, "{case} f32: {what}");
                }
                assert!(rel(&v32.grad_params, &g_params) < 1e-4, "{case} f32: ∂θ");
                let KernelEval { f: ef, div: etr, kept } =
                    net.eval_kernel(t, &z.detach(), noise, true).unwrap().unwrap();
                assert!(rel(&ef, &f.detach()) < 1e-12 && rel(&etr, &tr.detach()) < 1e-12, "{case}: eval");
                // A kept pass gives the recomputed VJP exactly; one kept at
                // another time is not used (the VJP is still right).
                let kept = kept.expect("asked to keep the pass");
                assert!(kept.bytes() > 0);
                let elsewhere = net.eval_kernel(t + 0.5, &z.detach(), noise, true).unwrap().unwrap().kept;
                for pass in [Some(kept), elsewhere] {
                    let w = net.vjp_kernel(t, &z.detach(), noise, &a_f, &a_tr, pass).unwrap().unwrap();
                    assert_eq!(rel(&w.grad_params, &v.grad_params), 0.0, "{case}: kept pass");
                    assert_eq!(rel(&w.grad_z, &v.grad_z), 0.0, "{case}: kept pass");
                }
            }
        }
    }
}

#[test]
fn hutchinson_is_unbiased_for_the_exact_trace() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(2);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let c = chain(&vs, 4);
    vs.double();
    let x = Tensor::randn([1, 4], (Kind::Double, Device::Cpu)).repeat([4000, 1]);
    let method = Solver::Rk4 { steps: 4 };
    let exact = c.log_prob(&x, &SolveOptions::eval(method)).unwrap();
    for trace in [TraceMode::Gaussian, TraceMode::Rademacher] {
        let est = c.log_prob(&x, &SolveOptions { trace, ..SolveOptions::eval(method) }).unwrap();
        let (mean, std) = (est.log_p.mean(Kind::Double), est.log_p.std(true));
        let err = f64::try_from((mean - exact.log_p.get(0)).abs()).unwrap();
        let se = f64::try_from(std).unwrap() / 4000f64.sqrt();
        // Within 4 standard errors of the exact value.
        assert!(err < 4.0 * se + 1e-9, "{trace:?}: error {err}, standard error {se}");
    }
}

/// The conv field on a tiny image: the exact divergence (one VJP per pixel)
/// is the trace of the Jacobian by central differences, Hutchinson's
/// `eᵀ(∂f/∂z)e` is `eᵀ(J e)` with `J e` by central differences (float64,
/// 1e-6 absolute), the time enters every layer kind, and the export has
/// the model file's layout.
#[test]
fn conv_field_divergences_match_finite_differences() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(21);
    let opts = (Kind::Double, Device::Cpu);
    for kind in [LayerKind::Concat, LayerKind::ConcatSquash, LayerKind::Ignore] {
        let mut vs = nn::VarStore::new(Device::Cpu);
        let net = ConvOdeNet::new(&vs.root(), [2, 3, 3], &[4, 4], kind, Activation::Softplus).unwrap();
        vs.double();
        let d = net.dim();
        let t = Tensor::from(0.3f64);
        let z = Tensor::randn([2, d], opts).set_requires_grad(true);
        let f = net.forward(&t, &z);
        assert_eq!(f.size(), [2, d]);
        let (exact, _) = divergence(&f, &z, None, false).unwrap();
        let e = Tensor::randint(2, [2, d], opts) * 2.0 - 1.0;
        let (hutch, _) = divergence(&f, &z, Some(&e), false).unwrap();
        let h = 1e-5;
        let central = |dz: &Tensor| {
            tch::no_grad(|| (net.forward(&t, &(&z + dz * h)) - net.forward(&t, &(&z - dz * h))) / (2.0 * h))
        };
        let mut trace = Tensor::zeros([2], opts);
        for i in 0..d {
            let unit = Tensor::zeros([2, d], opts).index_fill(1, &Tensor::from_slice(&[i]), 1.0);
            trace += central(&unit).select(1, i);
        }
        let e_je = (&e * central(&e)).sum_dim_intlist(1, false, Kind::Double);
        let gap = |a: &Tensor, b: &Tensor| f64::try_from((a - b).abs().max()).unwrap();
        assert!(gap(&exact, &trace) < 1e-6, "{kind:?}: exact {exact} vs {trace}");
        assert!(gap(&hutch, &e_je) < 1e-6, "{kind:?}: Hutchinson {hutch} vs {e_je}");
        let later = tch::no_grad(|| net.forward(&Tensor::from(0.7f64), &z));
        let moved = gap(&later, &f.detach());
        assert_eq!(moved > 1e-9, kind != LayerKind::Ignore, "{kind:?}: time dependence {moved}");
        // Exported in the model file's layout (format version 4).
        let (specs, _, weights) = net.export().unwrap();
        let mut c_in = 2;
        let mut count = 0;
        for l in &specs {
            count += ffjord_runtime::format::conv_weight_count(l.kind, c_in, l.out_dim as usize).unwrap();
            c_in = l.out_dim as usize;
        }
        assert_eq!((weights.len(), c_in), (count, 2));
    }
    let vs = nn::VarStore::new(Device::Cpu);
    assert!(ConvOdeNet::new(&vs.root(), [1, 0, 3], &[4], LayerKind::Concat, Activation::Tanh).is_err());
}

/// The logit transform's log-det is the sum of log dy/dx (autograd, float64,
/// 1e-10) and its inverse returns the input; squeeze moves pixel
/// `(2h + dy, 2w + dx)` of channel `c` to channel `4c + 2dy + dx` at `(h, w)`,
/// as the reference does, and unsqueeze undoes it exactly.
#[test]
fn logit_and_squeeze_invert_exactly_with_their_log_dets() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(8);
    let opts = SolveOptions::eval(Solver::Rk4 { steps: 1 });
    let mut stats = PassStats::default();
    let logit = LogitTransform { alpha: 1e-3 };
    let x = Tensor::rand([3, 8], (Kind::Double, Device::Cpu)).set_requires_grad(true);
    let (y, ld) = logit.forward(&x, &opts, &mut stats).unwrap();
    let dy = Tensor::f_run_backward(&[y.sum(Kind::Double)], &[&x], false, false).unwrap().remove(0);
    let want = dy.log().sum_dim_intlist(1, false, Kind::Double);
    assert!(f64::try_from((&ld - want).abs().max()).unwrap() < 1e-10);
    let (back, ld_back) = logit.inverse(&y.detach(), &opts, &mut stats).unwrap();
    assert!(f64::try_from((back - x.detach()).abs().max()).unwrap() < 1e-12);
    assert!(f64::try_from((ld_back - ld.detach()).abs().max()).unwrap() < 1e-9);

    let (c, h, w) = (2i64, 4i64, 6i64);
    let squeeze = Squeeze::new([c, h, w]).unwrap();
    assert_eq!(squeeze.output_shape(), [8, 2, 3]);
    let x = Tensor::arange(c * h * w, (Kind::Double, Device::Cpu)).reshape([1, c * h * w]);
    let (y, ld) = squeeze.forward(&x, &opts, &mut stats).unwrap();
    assert_eq!(f64::try_from(ld.abs().max()).unwrap(), 0.0);
    let at = |t: &Tensor, i: i64| t.double_value(&[0, i]);
    for ci in 0..c {
        for yy in 0..h {
            for xx in 0..w {
                let (dy, dx, ho, wo) = (yy % 2, xx % 2, yy / 2, xx / 2);
                let out = ((ci * 4 + dy * 2 + dx) * (h / 2) + ho) * (w / 2) + wo;
                assert_eq!(at(&y, out), at(&x, (ci * h + yy) * w + xx), "c {ci} y {yy} x {xx}");
            }
        }
    }
    let (back, _) = squeeze.inverse(&y, &opts, &mut stats).unwrap();
    assert!(back.equal(&x));
    assert!(Squeeze::new([1, 3, 4]).is_err());
}

/// The multiscale model's layout (the reference's counts: 28×28 → 3 scales,
/// 10 CNFs with 2 blocks) and its log-density: on 8×8 images (2 scales, a
/// squeeze and a factor-out) `log p(x)` from the chain equals
/// `log N(f(x)) + log|det ∂f/∂x|` with the 64×64 Jacobian of the whole
/// chain by autograd (float64, Dopri5 1e-9; agreement to 1e-5 nats); the
/// inverse returns the image.
#[test]
fn multiscale_log_density_is_the_change_of_variables() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(17);
    assert_eq!(
        (scale_count(28, 28), scale_count(14, 14), scale_count(8, 8), scale_count(3, 3)),
        (3, 2, 2, 1)
    );
    let cfg = |shape, hidden: &[i64], blocks| MultiscaleConfig {
        shape,
        hidden: hidden.to_vec(),
        blocks,
        layer: LayerKind::Concat,
        activation: Activation::Softplus,
        alpha: Some(0.05),
        end_time: 0.5,
        train_end_time: true,
    };
    let vs = nn::VarStore::new(Device::Cpu);
    let mnist = multiscale(&vs.root(), &cfg([1, 28, 28], &[8], 2)).unwrap();
    assert_eq!((mnist.dim, mnist.layers.len()), (784, 1 + 4 + 1 + 4 + 1 + 2));

    let mut vs = nn::VarStore::new(Device::Cpu);
    let chain = multiscale(&vs.root(), &cfg([1, 8, 8], &[4], 1)).unwrap();
    vs.double();
    assert_eq!(chain.layers.len(), 1 + 1 + 1 + 1 + 1); // logit, CNF, squeeze, CNF, (factor-out) CNF
    let opts = SolveOptions::eval(dopri5_at(1e-9, 100_000));
    let x = (Tensor::rand([1, 64], (Kind::Double, Device::Cpu)) * 0.9 + 0.05).set_requires_grad(true);
    let out = chain.log_prob(&x, &opts).unwrap();
    let graph_opts = SolveOptions { create_graph: true, ..opts };
    let z = tch::with_grad(|| {
        let mut stats = PassStats::default();
        let mut z = x.shallow_clone();
        for layer in &chain.layers {
            z = layer.forward(&z, &graph_opts, &mut stats).unwrap().0;
        }
        z
    });
    let rows: Vec<Tensor> = (0..64)
        .map(|i| {
            Tensor::f_run_backward(&[z.select(1, i).sum(Kind::Double)], &[&x], true, false).unwrap().remove(0)
        })
        .collect();
    let jac = Tensor::cat(&rows, 0);
    let (_, log_abs_det) = jac.slogdet();
    let want = standard_normal_log_prob(&z.detach()) + log_abs_det;
    let got = out.log_p.double_value(&[0]);
    assert!((got - want.double_value(&[0])).abs() < 1e-5, "chain {got} vs change of variables {want}");
    let back = chain.sample_from(&out.z.detach(), &opts).unwrap();
    assert!(f64::try_from((back.z - x.detach()).abs().max()).unwrap() < 1e-6);
    assert!((back.log_p.double_value(&[0]) - got).abs() < 1e-5);
}
