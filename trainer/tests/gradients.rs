//! Gradients: the continuous adjoint agrees with backprop through the solver,
//! backprop by reversing the recorded steps with the hand-written kernel
//! equals autograd's, and backprop agrees with finite differences (float64,
//! tight tolerances).

use ffjord_runtime::Solver;
use ffjord_runtime::{Activation, LayerKind};
use ffjord_trainer::model::{
    Chain, Cnf, ConvOdeNet, FlowLayer, Gradient, KEPT_PASS_BUDGET, MultiscaleConfig, OdeNet, SolveOptions,
    TraceMode, multiscale,
};
use ffjord_trainer::ode::dopri5_at;
use tch::{Device, Kind, Tensor, nn};

const TOL: f64 = 1e-9;

/// libtorch's random generator is global and the test harness runs tests on
/// several threads: each test holds this lock so its seeded draws (the
/// Hutchinson noise the two gradient methods must share) are its own.
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    RNG.lock().unwrap_or_else(|e| e.into_inner())
}

/// CNF blocks that may keep `budget` bytes of forward passes for backprop.
fn chain(vs: &nn::VarStore, dim: i64, blocks: usize, kind: LayerKind, budget: usize) -> Chain {
    let layers: Vec<Box<dyn FlowLayer>> = (0..blocks)
        .map(|b| {
            let p = vs.root() / "chain" / b;
            let net = OdeNet::new(&(&p / "odefunc"), dim, &[8, 8], kind, Activation::Tanh);
            let cnf = Cnf::new(&p, Box::new(net), 0.5, true);
            cnf.set_kept_pass_budget(budget);
            Box::new(cnf) as Box<dyn FlowLayer>
        })
        .collect();
    Chain::new(layers, dim)
}

fn opts(trace: TraceMode, create_graph: bool) -> SolveOptions {
    SolveOptions {
        method: dopri5_at(TOL, 100_000),
        trace,
        create_graph,
        seminorm: false,
        regularization: Default::default(),
        record_steps: false,
    }
}

/// (name, gradient) for every trainable variable, sorted by name.
fn grads(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .map(|(n, t)| {
            let g = t.grad();
            (n, if g.defined() { g.detach().copy() } else { t.zeros_like() })
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn zero_grads(vs: &nn::VarStore) {
    for (_, t) in vs.variables() {
        let mut g = t.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
}

/// Stated tolerance: relative error ≤ 1e-3 (in norm) on every parameter tensor.
fn assert_grads_agree(bp: &[(String, Tensor)], adj: &[(String, Tensor)], case: &str) {
    assert_eq!(bp.len(), adj.len());
    for ((name, a), (name_b, b)) in bp.iter().zip(adj) {
        assert_eq!(name, name_b);
        let rel = f64::try_from((a - b).norm()).unwrap() / f64::try_from(a.norm()).unwrap().max(1e-12);
        assert!(rel <= 1e-3, "{case} {name}: relative error {rel:e}");
    }
}

fn backprop_loss(c: &Chain, x: &Tensor, trace: TraceMode) -> Tensor {
    -c.log_prob(x, &opts(trace, true)).unwrap().log_p.mean(Kind::Double)
}

fn setup(dim: i64, blocks: usize, kind: LayerKind, seed: i64) -> (nn::VarStore, Chain, Tensor) {
    setup_with_budget(dim, blocks, kind, seed, KEPT_PASS_BUDGET)
}

fn setup_with_budget(
    dim: i64,
    blocks: usize,
    kind: LayerKind,
    seed: i64,
    budget: usize,
) -> (nn::VarStore, Chain, Tensor) {
    tch::manual_seed(seed);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let c = chain(&vs, dim, blocks, kind, budget);
    vs.double();
    let x = Tensor::randn([16, dim], (Kind::Double, Device::Cpu));
    (vs, c, x)
}

/// Backprop through the solver by reversing its recorded steps with the
/// kernel's VJPs is the same computation as autograd through the same steps:
/// loss to 1e-12 and every parameter's gradient to 1e-9 relative (float64),
/// for Dopri5 and RK4, exact and Hutchinson traces, one and two blocks —
/// with every stage's forward pass kept from the forward solve, none (all
/// recomputed), and some.
#[test]
fn reversed_steps_equal_autograd_backprop() {
    let _rng = lock();
    let rk4 = Solver::Rk4 { steps: 5 };
    let cases = [
        (2, 1, LayerKind::ConcatSquash, TraceMode::Exact, None),
        (3, 2, LayerKind::Concat, TraceMode::Gaussian, None),
        (3, 1, LayerKind::Ignore, TraceMode::Rademacher, Some(rk4)),
        (2, 2, LayerKind::ConcatSquash, TraceMode::Exact, Some(rk4)),
    ];
    let budgets = [KEPT_PASS_BUDGET, 0, 20_000];
    for ((dim, blocks, kind, trace, method), budget) in
        cases.into_iter().flat_map(|c| budgets.map(|b| (c, b)))
    {
        let (vs, c, x) = setup_with_budget(dim, blocks, kind, 9, budget);
        let o = SolveOptions { method: method.unwrap_or(opts(trace, true).method), ..opts(trace, true) };
        zero_grads(&vs);
        tch::manual_seed(100);
        let loss_graph = -c.log_prob(&x, &o).unwrap().log_p.mean(Kind::Double);
        loss_graph.backward();
        let graph = grads(&vs);
        zero_grads(&vs);
        tch::manual_seed(100); // the same Hutchinson noise
        let (loss, stats) = c.loss_and_gradients(&x, &o, Gradient::Backprop, None).unwrap();
        let reversed = grads(&vs);
        let case = format!("{dim}-D {blocks} blocks {kind:?} {trace:?} {:?} budget {budget}", o.method);
        assert!((loss_graph.double_value(&[]) - loss).abs() < 1e-12, "{case}: loss");
        // One kernel VJP per stage of every accepted step: no fallback ran.
        let stages = if method.is_some() { 4 } else { 6 };
        assert!(stats.backward.nfe > 0 && stats.backward.nfe == stages * stats.backward.accepted, "{case}");
        for ((name, a), (_, b)) in graph.iter().zip(&reversed) {
            let rel = f64::try_from((a - b).norm()).unwrap() / f64::try_from(a.norm()).unwrap().max(1e-12);
            assert!(rel <= 1e-9, "{case} {name}: relative error {rel:e}");
        }
    }
}

/// The continuous adjoint against backprop through the solver with the same
/// Hutchinson noise: loss to 1e-9, every parameter's gradient as
/// [`assert_grads_agree`] states, and a backward solve that ran.
fn assert_adjoint_matches_backprop(vs: &nn::VarStore, c: &Chain, x: &Tensor, trace: TraceMode, case: &str) {
    zero_grads(vs);
    tch::manual_seed(100);
    let loss_bp = backprop_loss(c, x, trace);
    loss_bp.backward();
    let bp = grads(vs);
    zero_grads(vs);
    tch::manual_seed(100); // the same Hutchinson noise
    let (loss_adj, stats) = c.backward_by_layers(x, &opts(trace, true), None).unwrap();
    let adj = grads(vs);
    assert!((loss_bp.double_value(&[]) - loss_adj).abs() < 1e-9, "{case}: loss");
    assert!(stats.backward.nfe > 0, "{case}");
    assert_grads_agree(&bp, &adj, case);
}

#[test]
fn adjoint_matches_backprop_on_every_parameter() {
    let _rng = lock();
    for (dim, blocks, kind, trace) in [
        (2, 1, LayerKind::ConcatSquash, TraceMode::Exact),
        (3, 2, LayerKind::Concat, TraceMode::Gaussian),
        (3, 1, LayerKind::ConcatSquash, TraceMode::Rademacher),
    ] {
        let (vs, c, x) = setup(dim, blocks, kind, 7);
        assert_adjoint_matches_backprop(&vs, &c, &x, trace, &format!("{dim}-D {kind:?} {trace:?}"));
    }
}

#[test]
fn adjoint_matches_backprop_with_rnode_regularization() {
    let _rng = lock();
    let (vs, c, x) = setup(3, 2, LayerKind::ConcatSquash, 11);
    let reg = ffjord_trainer::model::Regularization { kinetic: 0.5, jacobian: 0.3 };
    let o = SolveOptions { regularization: reg, ..opts(TraceMode::Gaussian, true) };
    zero_grads(&vs);
    tch::manual_seed(200);
    let out = c.log_prob(&x, &o).unwrap();
    let r = out.stats.regularization.expect("regularization terms");
    let loss_bp = -out.log_p.mean(Kind::Double) + &r;
    assert!(r.double_value(&[]) > 0.0);
    loss_bp.backward();
    let bp = grads(&vs);
    zero_grads(&vs);
    tch::manual_seed(200);
    let (loss_adj, _) = c.backward_by_layers(&x, &o, None).unwrap();
    let adj = grads(&vs);
    assert!(
        (loss_bp.double_value(&[]) - loss_adj).abs() < 1e-7,
        "{} vs {loss_adj}",
        loss_bp.double_value(&[])
    );
    assert_grads_agree(&bp, &adj, "");
}

#[test]
fn gradients_agree_with_batch_norm_between_blocks() {
    let _rng = lock();
    let cfg = ffjord_trainer::config::TrainConfig {
        hidden: vec![8],
        blocks: 2,
        batch_norm: true,
        ..Default::default()
    };
    tch::manual_seed(5);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let c = ffjord_trainer::train::build_chain(&vs, &cfg, 3, None).unwrap();
    vs.double();
    assert_eq!(c.layers.len(), 5);
    // Move the running statistics and the BN log-scales off their initial values.
    tch::no_grad(|| {
        for (name, mut t) in vs.variables() {
            if name.contains("running_var") {
                let _ = t.fill_(1.7);
            } else if name.contains("running_mean")
                || (name.ends_with(".weight") && t.dim() == 1 && !name.contains("hyper"))
            {
                let _ = t.fill_(0.3);
            }
        }
    });
    let running = |vs: &nn::VarStore| -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(n, _)| n.contains("running"))
            .map(|(n, t)| (n, t.copy()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let before = running(&vs);
    let x = Tensor::randn([16, 3], (Kind::Double, Device::Cpu));
    zero_grads(&vs);
    backprop_loss(&c, &x, TraceMode::Exact).backward();
    let bp = grads(&vs);
    // The training pass moved the running statistics: restore them for the adjoint run.
    let after = running(&vs);
    assert!(
        before.iter().zip(&after).any(|((_, a), (_, b))| f64::try_from((a - b).abs().max()).unwrap() > 1e-6)
    );
    let vars = vs.variables();
    // The adjoint, and backprop by reversed steps (equal to autograd's to 1e-9).
    for gradient in [Gradient::Adjoint, Gradient::Backprop] {
        tch::no_grad(|| {
            for (n, t) in &before {
                vars[n].shallow_clone().copy_(t);
            }
        });
        zero_grads(&vs);
        let (_, stats) = c.loss_and_gradients(&x, &opts(TraceMode::Exact, true), gradient, None).unwrap();
        let other = grads(&vs);
        assert!(stats.backward.nfe > 0, "{gradient:?} ran a backward pass");
        assert_eq!(running(&vs).len(), after.len());
        for ((_, a), (_, b)) in running(&vs).iter().zip(&after) {
            assert!(
                f64::try_from((a - b).abs().max()).unwrap() < 1e-12,
                "{gradient:?} updates the statistics exactly once"
            );
        }
        assert_grads_agree(&bp, &other, &format!("{gradient:?}"));
        if gradient == Gradient::Backprop {
            for ((name, a), (_, b)) in bp.iter().zip(&other) {
                let rel =
                    f64::try_from((a - b).norm()).unwrap() / f64::try_from(a.norm()).unwrap().max(1e-12);
                assert!(rel <= 1e-9, "reversed steps {name}: relative error {rel:e}");
            }
        }
    }
}

#[test]
fn backprop_matches_finite_differences() {
    let _rng = lock();
    let (vs, c, x) = setup(2, 1, LayerKind::ConcatSquash, 3);
    assert_backprop_matches_finite_differences(&vs, &c, &x);
}

/// Backprop's gradient of the mean NLL (exact trace) against central
/// differences on the first, middle and last entry of every variable.
fn assert_backprop_matches_finite_differences(vs: &nn::VarStore, c: &Chain, x: &Tensor) {
    zero_grads(vs);
    backprop_loss(c, x, TraceMode::Exact).backward();
    let g = grads(vs);
    let vars = vs.variables();
    let eps = 1e-5;
    for (name, grad) in &g {
        let var = vars[name].shallow_clone();
        let n = var.numel() as i64;
        for idx in [0, n / 2, n - 1] {
            let flat_idx = idx;
            let orig = var.view(-1).double_value(&[flat_idx]);
            let set = |v: f64| {
                tch::no_grad(|| {
                    let _ = var.view(-1).get(flat_idx).fill_(v);
                })
            };
            set(orig + eps);
            let lp = tch::no_grad(|| {
                -c.log_prob(x, &SolveOptions::eval(opts(TraceMode::Exact, false).method))
                    .unwrap()
                    .log_p
                    .mean(Kind::Double)
            })
            .double_value(&[]);
            set(orig - eps);
            let lm = tch::no_grad(|| {
                -c.log_prob(x, &SolveOptions::eval(opts(TraceMode::Exact, false).method))
                    .unwrap()
                    .log_p
                    .mean(Kind::Double)
            })
            .double_value(&[]);
            set(orig);
            let fd = (lp - lm) / (2.0 * eps);
            let an = grad.view(-1).double_value(&[flat_idx]);
            // Central differences in float64 at tolerance 1e-9: agreement to 1e-5 absolute + 1e-4 relative.
            assert!(
                (fd - an).abs() <= 1e-5 + 1e-4 * an.abs(),
                "{name}[{flat_idx}]: finite difference {fd:e}, backprop {an:e}"
            );
        }
    }
}

/// FFJORD's convolutional field inside CNF blocks (a 1×3×3 image, two
/// blocks): the adjoint agrees with backprop on every parameter (1e-3
/// relative, as for the dense nets) with the exact trace and Hutchinson's,
/// and backprop agrees with central differences (as above).
#[test]
fn conv_field_gradients_agree_across_modes_and_with_finite_differences() {
    let _rng = lock();
    tch::manual_seed(13);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let layers: Vec<Box<dyn FlowLayer>> = (0..2)
        .map(|b| {
            let p = vs.root() / "chain" / b;
            let net = ConvOdeNet::new(
                &(&p / "odefunc"),
                [1, 3, 3],
                &[4],
                LayerKind::ConcatSquash,
                Activation::Tanh,
            )
            .unwrap();
            Box::new(Cnf::new(&p, Box::new(net), 0.5, true)) as Box<dyn FlowLayer>
        })
        .collect();
    let c = Chain::new(layers, 9);
    vs.double();
    let x = Tensor::randn([6, 9], (Kind::Double, Device::Cpu));
    for trace in [TraceMode::Exact, TraceMode::Rademacher] {
        assert_adjoint_matches_backprop(&vs, &c, &x, trace, &format!("conv {trace:?}"));
    }
    assert_backprop_matches_finite_differences(&vs, &c, &x);
}

/// The multiscale model (8×8 images: logit, CNF, squeeze, CNF, factor-out,
/// CNF): the adjoint through every layer — including the factored-out
/// scale's `Prefix` — agrees with backprop on every parameter (1e-3
/// relative), with Hutchinson's trace.
#[test]
fn multiscale_gradients_agree_across_modes() {
    let _rng = lock();
    tch::manual_seed(19);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let cfg = MultiscaleConfig {
        shape: [1, 8, 8],
        hidden: vec![4],
        blocks: 1,
        layer: LayerKind::Concat,
        activation: Activation::Softplus,
        alpha: Some(0.05),
        end_time: 0.5,
        train_end_time: true,
    };
    let c = multiscale(&vs.root(), &cfg).unwrap();
    vs.double();
    let x = Tensor::rand([3, 64], (Kind::Double, Device::Cpu)) * 0.9 + 0.05;
    assert_adjoint_matches_backprop(&vs, &c, &x, TraceMode::Rademacher, "multiscale");
}
