//! The flow on tch: a dynamics network ([`VectorField`]) inside CNF blocks,
//! composed with other layers ([`FlowLayer`]) into a [`Chain`].
//!
//! Extension points: a new dynamics network (e.g. a convolutional ODE net for
//! images) implements [`VectorField`] and plugs into [`Cnf`] unchanged; a new
//! layer in the chain (squeeze, factor-out, logit) implements [`FlowLayer`].
//! Neither touches the solver (`ode.rs`) or the training loop (`train.rs`).

use anyhow::{Context, Result, bail};
use ffjord_runtime::{Activation, LayerKind, LayerSpec, Stage};
use tch::{Device, Kind, Tensor, nn};

use crate::kernel::{LayerShape, Mlp, Pass, Real};
use crate::ode::{Method, SolveStats, Step, all_controlled, odeint};

/// `f(t, z)`: the right-hand side of a CNF, batched over rows of `z`.
pub trait VectorField {
    /// `f(t, z)` for a scalar tensor `t` and a batch `z` of shape `[B, D]`.
    fn forward(&self, t: &Tensor, z: &Tensor) -> Tensor;
    /// Runtime layer specs and weights in the order `runtime/FORMAT.md` gives.
    fn export(&self) -> Result<(Vec<LayerSpec>, Activation, Vec<f32>)>;
    /// The trainable tensors (for the adjoint's parameter VJPs).
    fn parameters(&self) -> Vec<Tensor>;
    /// `f(t, z)` and the exact `Tr(∂f/∂z)` per row from one forward pass, if
    /// the field can carry the Jacobian along (forward-mode tangents). `None`
    /// makes the caller take `D` vector-Jacobian products instead.
    fn forward_with_trace(&self, _t: &Tensor, _z: &Tensor) -> Option<(Tensor, Tensor)> {
        None
    }
    /// Whether [`VectorField::eval_kernel`] and [`VectorField::vjp_kernel`]
    /// answer for tensors like `z` (device and dtype).
    fn has_kernel(&self, _z: &Tensor) -> bool {
        false
    }
    /// Graph-free `f(t, z)` and the divergence — exact, or with `noise` `e`
    /// Hutchinson's `eᵀ(∂f/∂z)e` — from a hand-written kernel, if the field
    /// has one for `z`'s device and dtype. `None` makes the caller use
    /// autograd.
    /// `keep` also returns the forward pass, to hand back to
    /// [`VectorField::vjp_kernel`] at the same point (its memory is the
    /// caller's to budget: [`KeptPass::bytes`]).
    fn eval_kernel(
        &self,
        _t: f64,
        _z: &Tensor,
        _noise: Option<&Tensor>,
        _keep: bool,
    ) -> Option<Result<KernelEval>> {
        None
    }
    /// What the adjoint asks at each evaluation, from a hand-written kernel
    /// without autograd: `f`, the divergence (as [`VectorField::eval_kernel`]),
    /// and the VJP of `Σ a_f·f + Σ a_tr·div` w.r.t. `z`, the parameters and
    /// `t`. `None` makes the caller differentiate with autograd. `kept`: a
    /// pass `eval_kernel` kept at this same `(t, z, noise)`, used instead of
    /// recomputing it (one from anywhere else is ignored and recomputed).
    fn vjp_kernel(
        &self,
        _t: f64,
        _z: &Tensor,
        _noise: Option<&Tensor>,
        _a_f: &Tensor,
        _a_tr: &Tensor,
        _kept: Option<KeptPass>,
    ) -> Option<Result<FieldVjp>> {
        None
    }
}

/// A field kernel's forward pass at one point, kept for a later
/// [`VectorField::vjp_kernel`] there (backprop through recorded steps).
pub struct KeptPass {
    pass: Box<dyn std::any::Any>,
    t: f64,
    bytes: usize,
}

impl KeptPass {
    /// Wraps a field's own pass type, computed at time `t`, holding `bytes`.
    pub fn new<P: 'static>(pass: P, t: f64, bytes: usize) -> Self {
        KeptPass { pass: Box::new(pass), t, bytes }
    }

    /// Memory held, in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The pass, if it was computed at time `t` and is a `P`.
    pub fn take<P: 'static>(self, t: f64) -> Option<P> {
        if self.t != t {
            return None;
        }
        self.pass.downcast::<P>().ok().map(|p| *p)
    }
}

/// [`VectorField::eval_kernel`]'s results.
pub struct KernelEval {
    /// `f(t, z)`, `[B, D]`.
    pub f: Tensor,
    /// The divergence, `[B]`.
    pub div: Tensor,
    /// The forward pass, if asked to keep it.
    pub kept: Option<KeptPass>,
}

/// [`VectorField::vjp_kernel`]'s results.
pub struct FieldVjp {
    /// `f(t, z)`, `[B, D]`.
    pub f: Tensor,
    /// The divergence, `[B]`.
    pub div: Tensor,
    /// `a_fᵀ ∂f/∂z + a_tr ∂div/∂z`, `[B, D]`.
    pub grad_z: Tensor,
    /// The same w.r.t. [`VectorField::parameters`], flattened and concatenated, summed over rows.
    pub grad_params: Tensor,
    /// The same w.r.t. `t`, summed over rows.
    pub grad_t: f64,
}

/// How the divergence `Tr(∂f/∂z)` is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TraceMode {
    /// Exact: one vector-Jacobian product per dimension.
    Exact,
    /// Hutchinson with N(0, I) noise, drawn once per solve.
    Gaussian,
    /// Hutchinson with ±1 noise, drawn once per solve.
    Rademacher,
}

/// One layer of the ODE net.
struct DiffeqLayer {
    kind: LayerKind,
    linear: nn::Linear,
    /// concatsquash: gate Linear(1 → out) and bias Linear(1 → out, no bias).
    hyper_gate: Option<nn::Linear>,
    hyper_bias: Option<nn::Linear>,
    d_out: i64,
}

impl DiffeqLayer {
    fn new(p: nn::Path<'_>, kind: LayerKind, d_in: i64, d_out: i64) -> Self {
        let in_features = if kind == LayerKind::Concat { d_in + 1 } else { d_in };
        let linear = nn::linear(&p / "_layer", in_features, d_out, torch_default_init(in_features, true));
        let (hyper_gate, hyper_bias) = if kind == LayerKind::ConcatSquash {
            (
                Some(nn::linear(&p / "_hyper_gate", 1, d_out, torch_default_init(1, true))),
                Some(nn::linear(&p / "_hyper_bias", 1, d_out, torch_default_init(1, false))),
            )
        } else {
            (None, None)
        };
        DiffeqLayer { kind, linear, hyper_gate, hyper_bias, d_out }
    }

    /// The layer at time `t` as one affine map of `x`: `W_eff x + b_eff` with
    /// `W_eff` `[out, in]` and `b_eff` `[1, out]`. Concat folds its time
    /// column into the bias, concatsquash its gate into the rows of `W` and
    /// its time terms into the bias (`(W x + b) ⊙ g + h t = (g ⊙ W) x + (g ⊙ b
    /// + h t)`), so a layer costs one `addmm` and its Jacobian is `W_eff`.
    fn affine_at(&self, t: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let w = &self.linear.ws;
        let out = w.size()[0];
        let b = match &self.linear.bs {
            Some(b) => b.reshape([1, out]),
            None => Tensor::zeros([1, out], (w.kind(), w.device())),
        };
        let t1 = t.to_kind(kind).reshape([1, 1]);
        match self.kind {
            LayerKind::Ignore => (w.shallow_clone(), b),
            LayerKind::Concat => {
                let d_in = w.size()[1] - 1;
                (w.narrow(1, 1, d_in), b + t1.matmul(&w.narrow(1, 0, 1).tr()))
            }
            LayerKind::ConcatSquash => {
                let gate = self.hyper_gate.as_ref().map_or_else(|| b.ones_like(), |g| t1.apply(g).sigmoid());
                let hyper = self.hyper_bias.as_ref().map_or_else(|| b.zeros_like(), |h| t1.apply(h));
                (w * gate.reshape([out, 1]), b * &gate + hyper)
            }
        }
    }

    fn forward(&self, t: &Tensor, x: &Tensor) -> Tensor {
        let (w, b) = self.affine_at(t, x.kind());
        b.addmm(x, &w.tr())
    }

    fn export(&self, out: &mut Vec<f32>) -> Result<()> {
        push(out, &self.linear.ws)?;
        match &self.linear.bs {
            Some(b) => push(out, b)?,
            None => out.extend(std::iter::repeat_n(0.0, self.d_out as usize)),
        }
        if let (Some(g), Some(b)) = (&self.hyper_gate, &self.hyper_bias) {
            push(out, &g.ws)?;
            push(out, g.bs.as_ref().context("hyper gate has a bias")?)?;
            push(out, &b.ws)?;
        }
        Ok(())
    }
}

/// PyTorch's `nn.Linear` initialisation (kaiming-uniform with a = √5, i.e.
/// weights and bias ~ U(±1/√fan_in)), which the spec's recipes assume; tch's
/// own default draws weights √6 ≈ 2.4× wider.
fn torch_default_init(fan_in: i64, bias: bool) -> nn::LinearConfig {
    let b = 1.0 / (fan_in as f64).sqrt();
    nn::LinearConfig {
        ws_init: nn::Init::Uniform { lo: -b, up: b },
        bs_init: Some(nn::Init::Uniform { lo: -b, up: b }),
        bias,
    }
}

/// Appends a tensor's values (row-major, as f32) to `out`.
pub fn push(out: &mut Vec<f32>, t: &Tensor) -> Result<()> {
    let flat = t.detach().to_device(tch::Device::Cpu).to_kind(Kind::Float).contiguous().view(-1);
    let v: Vec<f32> = Vec::<f32>::try_from(&flat)?;
    out.extend(v);
    Ok(())
}

/// FFJORD's ODE net (spec §2.2): diffeq layers with an activation after all but the last.
pub struct OdeNet {
    layers: Vec<DiffeqLayer>,
    activation: Activation,
}

impl OdeNet {
    /// Builds `dim → hidden… → dim` with one layer kind throughout.
    pub fn new(p: &nn::Path<'_>, dim: i64, hidden: &[i64], kind: LayerKind, activation: Activation) -> Self {
        let specs: Vec<(LayerKind, i64)> =
            hidden.iter().copied().chain(std::iter::once(dim)).map(|w| (kind, w)).collect();
        Self::from_layers(p, dim, &specs, activation)
    }

    /// Builds from `(kind, out_dim)` per layer (the last `out_dim` must be `dim`).
    pub fn from_layers(
        p: &nn::Path<'_>,
        dim: i64,
        specs: &[(LayerKind, i64)],
        activation: Activation,
    ) -> Self {
        let mut layers = Vec::new();
        let mut d_in = dim;
        for (i, &(kind, d_out)) in specs.iter().enumerate() {
            layers.push(DiffeqLayer::new(p / "layers" / i, kind, d_in, d_out));
            d_in = d_out;
        }
        OdeNet { layers, activation }
    }

    /// Zeroes the last layer (RNODE's initialisation: the flow starts as the identity).
    pub fn zero_last_layer(&mut self) {
        if let Some(last) = self.layers.last_mut() {
            tch::no_grad(|| {
                let _ = last.linear.ws.zero_();
                if let Some(b) = &mut last.linear.bs {
                    let _ = b.zero_();
                }
                if let Some(hb) = &mut last.hyper_bias {
                    let _ = hb.ws.zero_();
                }
            });
        }
    }

    /// Overwrites all parameters from `weights` (in export order); returns the count used.
    pub fn load_weights(&mut self, weights: &[f32]) -> Result<usize> {
        let mut off = 0;
        let mut take = |t: &mut Tensor| -> Result<()> {
            let n = t.numel();
            let src = weights.get(off..off + n).context("weight section too short")?;
            let v = Tensor::from_slice(src).to_kind(t.kind()).to_device(t.device()).reshape(t.size());
            tch::no_grad(|| t.copy_(&v));
            off += n;
            Ok(())
        };
        for l in &mut self.layers {
            take(&mut l.linear.ws)?;
            if let Some(b) = &mut l.linear.bs {
                take(b)?;
            }
            if let (Some(g), Some(b)) = (&mut l.hyper_gate, &mut l.hyper_bias) {
                take(&mut g.ws)?;
                take(g.bs.as_mut().context("hyper gate has a bias")?)?;
                take(&mut b.ws)?;
            }
        }
        Ok(off)
    }
}

fn activate(a: Activation, x: Tensor) -> Tensor {
    match a {
        Activation::Identity => x,
        Activation::Tanh => x.tanh(),
        Activation::Softplus => x.softplus(),
        Activation::Elu => x.elu(),
        Activation::Swish { beta } => &x * (&x * f64::from(beta)).sigmoid(),
    }
}

/// An activation and its derivative, elementwise.
fn activate_with_derivative(a: Activation, x: Tensor) -> (Tensor, Tensor) {
    match a {
        Activation::Identity => {
            let one = x.ones_like();
            (x, one)
        }
        Activation::Tanh => {
            let y = x.tanh();
            let dy = 1.0 - y.square();
            (y, dy)
        }
        Activation::Softplus => (x.softplus(), x.sigmoid()),
        Activation::Elu => {
            let y = x.elu();
            let dy = x.gt(0.0).to_kind(x.kind()) + x.le(0.0).to_kind(x.kind()) * (&y + 1.0);
            (y, dy)
        }
        Activation::Swish { beta } => {
            let beta = f64::from(beta);
            let s = (&x * beta).sigmoid();
            let dy = &s + &x * beta * &s * (1.0 - &s);
            (&x * &s, dy)
        }
    }
}

/// The kernel's results for one evaluation: `f`, the trace, the VJP if asked
/// and the forward pass if asked to keep it.
type KernelOut = (Tensor, Tensor, Option<(Tensor, Tensor, f64)>, Option<KeptPass>);

/// What the kernel is asked besides `f` and the trace.
struct KernelAsk<'a> {
    noise: Option<&'a Tensor>,
    /// Cotangents `(a_f, a_tr)`: compute the VJP.
    cot: Option<(&'a Tensor, &'a Tensor)>,
    keep: bool,
    kept: Option<KeptPass>,
}

impl OdeNet {
    /// The layer shapes for the hand-written kernel, if it covers this net
    /// (every layer with a bias, as the constructors make them).
    fn kernel_shapes(&self) -> Option<Vec<LayerShape>> {
        let mut d_in = usize::try_from(self.layers.first()?.linear.ws.size()[1]).ok()?;
        if self.layers[0].kind == LayerKind::Concat {
            d_in -= 1;
        }
        let mut shapes = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let has_biases = l.linear.bs.is_some() && l.hyper_gate.as_ref().is_none_or(|g| g.bs.is_some());
            if !has_biases {
                return None;
            }
            let d_out = usize::try_from(l.d_out).ok()?;
            shapes.push(LayerShape { kind: l.kind, d_in, d_out });
            d_in = d_out;
        }
        Some(shapes)
    }

    /// Runs the kernel in `z`'s float type if it is a CPU `f32`/`f64` tensor.
    fn run_kernel(&self, t: f64, z: &Tensor, ask: KernelAsk<'_>) -> Option<Result<KernelOut>> {
        if z.device() != tch::Device::Cpu || z.dim() != 2 {
            return None;
        }
        let shapes = self.kernel_shapes()?;
        match z.kind() {
            Kind::Float => Some(self.kernel_pass::<f32>(&shapes, t, z, ask)),
            Kind::Double => Some(self.kernel_pass::<f64>(&shapes, t, z, ask)),
            _ => None,
        }
    }

    fn kernel_pass<T: Real + tch::kind::Element>(
        &self,
        shapes: &[LayerShape],
        t: f64,
        z: &Tensor,
        ask: KernelAsk<'_>,
    ) -> Result<KernelOut> {
        fn values<T: tch::kind::Element>(x: &Tensor, kind: Kind) -> Result<Vec<T>> {
            let x = x.detach().to_kind(kind).contiguous();
            let mut out = vec![T::ZERO; x.numel()];
            x.f_copy_data(&mut out, x.numel())?;
            Ok(out)
        }
        let kind = z.kind();
        let flat: Vec<Tensor> = self.parameters().iter().map(|p| p.detach().reshape([-1])).collect();
        let params = values::<T>(&Tensor::cat(&flat, 0), kind)?;
        let t_at = T::from(t).context("time out of range")?;
        let mlp = Mlp::at(shapes, self.activation, &params, t_at)?;
        let (rows, d) = (z.size()[0], z.size()[1]);
        let noise = ask.noise.map(|e| values::<T>(e, kind)).transpose()?;
        let zs = values::<T>(z, kind)?;
        let kept = ask.kept.and_then(|k| k.take::<Pass<T>>(t)).filter(|p| p.matches(&zs, noise.as_deref()));
        let pass = match kept {
            Some(pass) => pass,
            None => mlp.forward(&zs, rows as usize, noise.as_deref()),
        };
        let f = Tensor::from_slice(&pass.f).view([rows, d]);
        let trace = Tensor::from_slice(&pass.trace);
        let vjp = match ask.cot {
            None => None,
            Some((a_f, a_tr)) => {
                let v = mlp.vjp(&pass, &values::<T>(a_f, kind)?, &values::<T>(a_tr, kind)?);
                let grad_t = v.grad_t.to_f64().context("non-finite time gradient")?;
                Some((
                    Tensor::from_slice(&v.grad_z).view([rows, d]),
                    Tensor::from_slice(&v.grad_params),
                    grad_t,
                ))
            }
        };
        let kept = ask.keep.then(|| {
            let bytes = pass.bytes();
            KeptPass::new(pass, t, bytes)
        });
        Ok((f, trace, vjp, kept))
    }
}

impl VectorField for OdeNet {
    fn forward(&self, t: &Tensor, z: &Tensor) -> Tensor {
        let n = self.layers.len();
        let mut x = z.shallow_clone();
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(t, &x);
            if i + 1 < n {
                x = activate(self.activation, x);
            }
        }
        x
    }

    fn export(&self) -> Result<(Vec<LayerSpec>, Activation, Vec<f32>)> {
        let mut specs = Vec::new();
        let mut weights = Vec::new();
        for l in &self.layers {
            specs
                .push(LayerSpec { kind: l.kind, out_dim: u16::try_from(l.d_out).context("layer too wide")? });
            l.export(&mut weights)?;
        }
        Ok((specs, self.activation, weights))
    }

    fn parameters(&self) -> Vec<Tensor> {
        let mut p = Vec::new();
        for l in &self.layers {
            p.push(l.linear.ws.shallow_clone());
            p.extend(l.linear.bs.iter().map(Tensor::shallow_clone));
            if let (Some(g), Some(b)) = (&l.hyper_gate, &l.hyper_bias) {
                p.push(g.ws.shallow_clone());
                p.extend(g.bs.iter().map(Tensor::shallow_clone));
                p.push(b.ws.shallow_clone());
            }
        }
        p
    }

    fn has_kernel(&self, z: &Tensor) -> bool {
        z.device() == tch::Device::Cpu
            && matches!(z.kind(), Kind::Float | Kind::Double)
            && self.kernel_shapes().is_some()
    }

    fn eval_kernel(
        &self,
        t: f64,
        z: &Tensor,
        noise: Option<&Tensor>,
        keep: bool,
    ) -> Option<Result<KernelEval>> {
        let ask = KernelAsk { noise, cot: None, keep, kept: None };
        self.run_kernel(t, z, ask).map(|r| r.map(|(f, div, _, kept)| KernelEval { f, div, kept }))
    }

    fn vjp_kernel(
        &self,
        t: f64,
        z: &Tensor,
        noise: Option<&Tensor>,
        a_f: &Tensor,
        a_tr: &Tensor,
        kept: Option<KeptPass>,
    ) -> Option<Result<FieldVjp>> {
        let ask = KernelAsk { noise, cot: Some((a_f, a_tr)), keep: false, kept };
        self.run_kernel(t, z, ask).map(|r| {
            let (f, div, vjp, _) = r?;
            let (grad_z, grad_params, grad_t) = vjp.context("the kernel returned no VJP")?;
            Ok(FieldVjp { f, div, grad_z, grad_params, grad_t })
        })
    }

    /// Carries `J = ∂x/∂z` (`[B, D, width]`, batch-free `[1, D, width]` until
    /// the first activation) through the layers next to the values: a layer
    /// maps it to `J W_effᵀ`, an activation scales it by `σ'(pre)`. The
    /// trace is the diagonal of the final `[B, D, D]`. Per row this is `D + 1`
    /// lanes of the same matrix products the runtime runs, and it keeps the
    /// divergence in the first-order graph: training backpropagates once
    /// instead of through `D` double-backward passes.
    fn forward_with_trace(&self, t: &Tensor, z: &Tensor) -> Option<(Tensor, Tensor)> {
        let d = z.size()[1];
        let n = self.layers.len();
        let mut x = z.shallow_clone();
        let mut jac: Option<Tensor> = None;
        for (i, layer) in self.layers.iter().enumerate() {
            let (w, b) = layer.affine_at(t, x.kind());
            let w_t = w.tr();
            let pre = b.addmm(&x, &w_t);
            let mut j = match &jac {
                None => w_t.unsqueeze(0),
                Some(j) => j.matmul(&w_t),
            };
            if i + 1 < n {
                let (y, dy) = activate_with_derivative(self.activation, pre);
                // Not `*=`: that would write in place into a view of W.
                j = &j * dy.unsqueeze(1);
                x = y;
            } else {
                x = pre;
            }
            jac = Some(j);
        }
        let trace = jac?.diagonal(0, 1, 2).sum_dim_intlist(-1, false, x.kind());
        let trace = if trace.size()[0] == z.size()[0] { trace } else { trace.expand([z.size()[0]], false) };
        debug_assert_eq!(x.size()[1], d);
        Some((x, trace))
    }
}

/// How training gradients are computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Gradient {
    /// Backpropagate through the solver's steps (memory grows with the steps).
    Backprop,
    /// Continuous adjoint (spec §5): constant memory, a second solve backwards.
    Adjoint,
}

/// Settings of one evaluation of the chain.
#[derive(Clone, Copy, Debug)]
pub struct SolveOptions {
    pub method: Method,
    pub trace: TraceMode,
    /// Build a differentiable graph (training); otherwise results are detached.
    pub create_graph: bool,
    /// Leave the parameter adjoints out of the backward solve's error norm
    /// (Kidger, Chen & Lyons 2021).
    pub seminorm: bool,
    /// RNODE regularization (zero: off).
    pub regularization: Regularization,
    /// Graph-free forward solves keep their accepted steps, so that
    /// [`FlowLayer::backward`] backpropagates through the solver by reversing
    /// them with the field's hand-written VJP instead of the adjoint solve.
    pub record_steps: bool,
}

/// RNODE's regularizers (Finlay et al. 2020), integrated along the solve as
/// extra state channels that are excluded from error control:
/// kinetic energy ∫ ½·mean_i f_i² dt and Jacobian Frobenius ∫ ‖eᵀ∂f/∂z‖²/D dt
/// (the Hutchinson VJP reused), each per row, averaged over the batch and
/// added to the loss with its coefficient.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Regularization {
    pub kinetic: f64,
    pub jacobian: f64,
}

impl Regularization {
    pub fn active(&self) -> bool {
        self.kinetic != 0.0 || self.jacobian != 0.0
    }
}

impl SolveOptions {
    /// Evaluation: exact trace, no graph.
    pub fn eval(method: Method) -> Self {
        SolveOptions {
            method,
            trace: TraceMode::Exact,
            create_graph: false,
            seminorm: false,
            regularization: Regularization::default(),
            record_steps: false,
        }
    }
}

/// What one pass through the chain did.
#[derive(Debug, Default)]
pub struct PassStats {
    pub solve: SolveStats,
    /// Backward (adjoint) solves.
    pub backward: SolveStats,
    /// Σ over blocks of the weighted RNODE terms (a scalar with a graph in
    /// backprop training), if regularization is on.
    pub regularization: Option<Tensor>,
}

fn add_stats(into: &mut SolveStats, s: SolveStats) {
    into.nfe += s.nfe;
    into.accepted += s.accepted;
    into.rejected += s.rejected;
}

impl PassStats {
    fn add(&mut self, s: SolveStats) {
        add_stats(&mut self.solve, s);
    }

    fn add_regularization(&mut self, r: Tensor) {
        self.regularization = Some(match self.regularization.take() {
            Some(acc) => acc + r,
            None => r,
        });
    }
}

/// One invertible layer of the chain, mapping data side → latent side.
pub trait FlowLayer {
    /// `(y, log|det ∂y/∂x|)` per row.
    fn forward(&self, x: &Tensor, opts: &SolveOptions, stats: &mut PassStats) -> Result<(Tensor, Tensor)>;
    /// `(x, log|det ∂y/∂x| at x)` per row, from `y`.
    fn inverse(&self, y: &Tensor, opts: &SolveOptions, stats: &mut PassStats) -> Result<(Tensor, Tensor)>;
    /// The runtime stage and its weights.
    fn export(&self) -> Result<(Stage, Vec<f32>)>;

    /// Whether [`FlowLayer::backward`] gives the backprop-through-the-solver
    /// gradient for inputs like `x` with `record_steps` set (layers without a
    /// solver always do).
    fn reverses_steps(&self, _x: &Tensor, _opts: &SolveOptions) -> bool {
        true
    }

    /// Given the input `x` of the last [`FlowLayer::forward`], its output `y` and
    /// the loss gradients w.r.t. `y` and the log-determinant, accumulates the
    /// parameter gradients (into `.grad()`) and returns the gradient w.r.t. `x`.
    /// The default recomputes the forward pass with a graph and backpropagates.
    fn backward(
        &self,
        x: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
        grad_log_det: &Tensor,
        opts: &SolveOptions,
        stats: &mut PassStats,
    ) -> Result<Tensor> {
        backward_by_recompute(self, x, grad_y, grad_log_det, opts, stats)
    }
}

/// [`FlowLayer::backward`] by autograd: the forward pass again with a graph,
/// then backpropagation of `Σ y·ḡ_y + Σ log|det|·ḡ_ld` (+ the layer's
/// regularizers, whose weight in the loss is one).
fn backward_by_recompute<L: FlowLayer + ?Sized>(
    layer: &L,
    x: &Tensor,
    grad_y: &Tensor,
    grad_log_det: &Tensor,
    opts: &SolveOptions,
    stats: &mut PassStats,
) -> Result<Tensor> {
    let x = x.detach().set_requires_grad(true);
    let graph_opts = SolveOptions { create_graph: true, record_steps: false, ..*opts };
    let mut local = PassStats::default();
    let (y, ld) = tch::with_grad(|| layer.forward(&x, &graph_opts, &mut local))?;
    add_stats(&mut stats.backward, local.solve);
    tch::with_grad(|| {
        let mut surrogate = (y * grad_y).sum(x.kind()) + (ld * grad_log_det).sum(x.kind());
        if let Some(r) = &local.regularization {
            surrogate = &surrogate + r.to_kind(x.kind());
        }
        surrogate.f_backward()
    })?;
    let g = x.grad();
    Ok(if g.defined() { g.detach() } else { x.zeros_like() })
}

/// A continuous normalizing flow block over `t ∈ [0, T]`, `T = s²`.
pub struct Cnf {
    field: Box<dyn VectorField>,
    sqrt_end_time: Tensor,
    /// Hutchinson noise of the last forward solve, reused by the adjoint
    /// (as the reference ODEfunc keeps `e` between forward and backward).
    noise: std::cell::RefCell<Option<Tensor>>,
    /// The last forward solve's record, if it kept one.
    tape: std::cell::RefCell<Option<Tape>>,
    /// Bytes of kernel forward passes a recorded solve may keep.
    kept_pass_budget: std::cell::Cell<usize>,
}

/// A recorded forward solve: its accepted steps, and per call of the field
/// the kernel's forward pass if it was kept.
struct Tape {
    steps: Vec<Step>,
    kept: Vec<Option<KeptPass>>,
}

/// Default of [`Cnf::set_kept_pass_budget`].
pub const KEPT_PASS_BUDGET: usize = 256 << 20;

impl Cnf {
    /// `end_time` is T₀; `train_end_time` makes `s = √T` a parameter.
    pub fn new(p: &nn::Path<'_>, field: Box<dyn VectorField>, end_time: f64, train_end_time: bool) -> Self {
        let init = Tensor::from(end_time.sqrt());
        let sqrt_end_time = if train_end_time {
            p.var_copy("sqrt_end_time", &init)
        } else {
            p.var_copy("sqrt_end_time", &init).set_requires_grad(false)
        };
        Cnf {
            field,
            sqrt_end_time,
            noise: Default::default(),
            tape: Default::default(),
            kept_pass_budget: std::cell::Cell::new(KEPT_PASS_BUDGET),
        }
    }

    /// Memory for the field's forward passes kept from a recorded solve
    /// until its reversal (default [`KEPT_PASS_BUDGET`]): within it the
    /// reverse pass reuses them, beyond it it recomputes them.
    pub fn set_kept_pass_budget(&self, bytes: usize) {
        self.kept_pass_budget.set(bytes);
    }

    /// The end time `T`.
    pub fn end_time(&self) -> f64 {
        self.sqrt_end_time.double_value(&[]).powi(2)
    }

    /// Draws this solve's Hutchinson noise (none for the exact trace).
    fn draw_noise(&self, z: &Tensor, trace: TraceMode) -> Option<Tensor> {
        let noise = match trace {
            TraceMode::Exact => None,
            TraceMode::Gaussian => Some(z.randn_like()),
            TraceMode::Rademacher => Some(z.rand_like().ge(0.5).to_kind(z.kind()) * 2.0 - 1.0),
        };
        *self.noise.borrow_mut() = noise.as_ref().map(Tensor::shallow_clone);
        noise
    }

    /// `T·f(Tτ, z)` and `−T·Tr(∂f/∂z)` at normalised time τ; `z` is made a
    /// graph leaf if it is not part of one (returned third).
    fn dynamics(
        &self,
        tau: f64,
        z: &Tensor,
        noise: Option<&Tensor>,
        create_graph: bool,
        reg: Regularization,
        keep: bool,
    ) -> Result<Rates> {
        // No graph wanted (the adjoint's forward solve, evaluation): the
        // field's kernel if it has one (not with the Jacobian regularizer,
        // which needs Hutchinson's eᵀ∂f/∂z itself; `keep` keeps its forward
        // pass), else for the exact trace its forward-mode pass under
        // no_grad. No autograd either way.
        if !create_graph {
            let z = z.detach();
            if reg.jacobian == 0.0 {
                let end_time = self.end_time();
                if let Some(eval) = self.field.eval_kernel(end_time * tau, &z, noise, keep) {
                    let KernelEval { f, div, kept } = eval?;
                    let t_end = Tensor::from(end_time).to_kind(z.kind());
                    return Ok(Rates { kept, ..Rates::new(f, div, None, z, &t_end, reg)? });
                }
            }
            if noise.is_none() {
                let fast = tch::no_grad(|| {
                    let t_end = self.sqrt_end_time.square().to_kind(z.kind());
                    let fd = self.field.forward_with_trace(&(&t_end * tau), &z);
                    fd.map(|(f, div)| Rates::new(f, div, None, z.shallow_clone(), &t_end, reg))
                });
                if let Some(rates) = fast {
                    return rates;
                }
            }
        }
        tch::with_grad(|| {
            let z = if z.requires_grad() { z.shallow_clone() } else { z.detach().set_requires_grad(true) };
            let t_end = self.sqrt_end_time.square().to_kind(z.kind());
            let t = &t_end * tau;
            let forward_mode = if noise.is_none() { self.field.forward_with_trace(&t, &z) } else { None };
            let (f, div, vjp) = match forward_mode {
                Some((f, div)) => (f, div, None),
                None => {
                    let f = self.field.forward(&t, &z);
                    let (div, vjp) = divergence(&f, &z, noise, create_graph)?;
                    (f, div, vjp)
                }
            };
            Rates::new(f, div, vjp, z, &t_end, reg)
        })
    }

    /// Integrates `[z, ℓ]` in normalised time τ (t = T τ) so that T's gradient
    /// flows through the dynamics: d/dτ [z, ℓ] = T · [f(Tτ, z), −Tr ∂f/∂z].
    fn solve(
        &self,
        z: &Tensor,
        tau0: f64,
        tau1: f64,
        noise: Option<&Tensor>,
        opts: &SolveOptions,
        stats: &mut PassStats,
    ) -> Result<(Tensor, Tensor)> {
        let create_graph = opts.create_graph;
        let reg = opts.regularization;
        let extra = [reg.kinetic, reg.jacobian].iter().filter(|&&c| c != 0.0).count();
        let recording = opts.record_steps && !create_graph && extra == 0;
        // Per call of the field, its kept forward pass (while within budget).
        let (mut kept, mut budget) = (Vec::new(), self.kept_pass_budget.get());
        let mut rhs = |tau: f64, state: &[Tensor]| -> Result<Vec<Tensor>> {
            let mut r = self.dynamics(tau, &state[0], noise, create_graph, reg, recording && budget > 0)?;
            if recording {
                budget = budget.saturating_sub(r.kept.as_ref().map_or(0, KeptPass::bytes));
                kept.push(r.kept.take());
            }
            let mut out = vec![r.dz, r.dl];
            out.extend(r.kinetic);
            out.extend(r.jacobian);
            Ok(if create_graph { out } else { out.iter().map(Tensor::detach).collect() })
        };
        let rows = z.size()[0];
        let zero = || Tensor::zeros([rows], (z.kind(), z.device()));
        let mut state = vec![z.shallow_clone(), zero()];
        let mut controlled = all_controlled(2);
        for _ in 0..extra {
            // Regularizer channels are quadratures: excluded from error control (RNODE).
            state.push(zero());
            controlled.push(false);
        }
        let mut steps = Vec::new();
        let record = recording.then_some(&mut steps);
        let (out, s) =
            odeint(&mut rhs, state, tau0, tau1, opts.method, &controlled, self.end_time(), record)?;
        *self.tape.borrow_mut() = recording.then(|| Tape { steps, kept });
        stats.add(s);
        let mut out = out.into_iter();
        let (Some(z), Some(ell)) = (out.next(), out.next()) else {
            bail!("solver returned a malformed state")
        };
        let coefficients = [reg.kinetic, reg.jacobian].into_iter().filter(|&c| c != 0.0);
        for (integral, c) in out.zip(coefficients) {
            stats.add_regularization(integral.mean(integral.kind()) * c);
        }
        Ok((z, ell))
    }

    /// From the field's VJP at `t = Tτ` with cotangents `(T a_z, −T a_ℓ)`:
    /// the gradients of the surrogate `S = Σ a_z·g_z + Σ a_ℓ·g_ℓ` of the
    /// rates `g = (T f(Tτ, z), −T Tr)` w.r.t. `z`, the network (flat) and, if
    /// trained, `√T` — `∂S/∂T = Σ a_z·f − Σ a_ℓ·Tr + τ ∂S/∂t` and `∂/∂√T =
    /// 2√T ∂/∂T` — with `g_z` first.
    fn rate_gradients(
        &self,
        vjp: FieldVjp,
        a_z: &Tensor,
        a_ell: &Tensor,
        tau: f64,
        sqrt_t: f64,
    ) -> Result<(Tensor, Tensor, Tensor, Option<f64>)> {
        let FieldVjp { f, div, grad_z, grad_params, grad_t } = vjp;
        let end_time = sqrt_t * sqrt_t;
        let grad_sqrt_t = if self.sqrt_end_time.requires_grad() {
            let sum = |x: Tensor| f64::try_from(x.sum(Kind::Double));
            let d_end = sum(a_z * &f)? - sum(a_ell * &div)? + tau * grad_t;
            Some(2.0 * sqrt_t * d_end)
        } else {
            None
        };
        Ok((&f * end_time, grad_z, grad_params, grad_sqrt_t))
    }

    /// The adjoint's rates `[g_z, −∂S/∂z, −∂S/∂θ (flat), −∂S/∂√T if trained]`
    /// ([`Cnf::rate_gradients`]).
    fn adjoint_rates(
        &self,
        vjp: FieldVjp,
        a_z: &Tensor,
        a_ell: &Tensor,
        tau: f64,
        sqrt_t: f64,
        net_params: bool,
    ) -> Result<Vec<Tensor>> {
        let (g_z, grad_z, grad_params, grad_sqrt_t) = self.rate_gradients(vjp, a_z, a_ell, tau, sqrt_t)?;
        let mut out = vec![g_z, -grad_z];
        if net_params {
            out.push(-grad_params);
        }
        if let Some(g) = grad_sqrt_t {
            out.push(Tensor::from(-g).to_kind(self.sqrt_end_time.kind()));
        }
        Ok(out)
    }

    /// Backpropagation through the recorded steps of the forward solve, with
    /// the field's hand-written VJP at every stage (recomputing its forward
    /// pass there) instead of an autograd graph: per step `y' = y + h Σ b_i
    /// k_i`, `k_i = g(τ + c_i h, Y_i)`, `Y_i = y + h Σ_{j<i} a_ij k_j`, the
    /// stage cotangents `k̄_i = h b_i ȳ' + Σ_{j>i} h a_ji Ȳ_j` are taken in
    /// reverse. The step sizes are constants (the solver computes them from
    /// detached values), so this equals autograd's gradient. Accumulates into
    /// the parameters' `.grad` and returns `∂L/∂x`; `None` if the field has no
    /// kernel.
    fn backward_through_steps(
        &self,
        tape: Tape,
        grad_y: &Tensor,
        grad_log_det: &Tensor,
        stats: &mut PassStats,
    ) -> Result<Option<Tensor>> {
        let noise = self.noise.borrow().as_ref().map(Tensor::shallow_clone);
        let a_ell = -grad_log_det.detach();
        let (sqrt_t, end_time) = (self.sqrt_end_time.double_value(&[]), self.end_time());
        let mut y_bar = grad_y.detach();
        let mut theta_bar: Option<Tensor> = None;
        let mut sqrt_t_bar = 0.0;
        let Tape { steps, mut kept } = tape;
        for Step { t, h, tableau, stages, evals } in steps.iter().rev() {
            let mut k_bar: Vec<Tensor> = tableau.b.iter().map(|&b| &y_bar * (h * b)).collect();
            for i in (0..stages.len()).rev() {
                let tau = t + tableau.c[i] * h;
                let a_ell_i = &a_ell * (h * tableau.b[i]);
                let (a_f, a_tr) = (&k_bar[i] * end_time, &a_ell_i * -end_time);
                // The forward solve's pass at this stage, if it kept one.
                let pass = evals.get(i).and_then(|&call| kept.get_mut(call)).and_then(Option::take);
                let z_i = &stages[i][0];
                let Some(vjp) = self.field.vjp_kernel(end_time * tau, z_i, noise.as_ref(), &a_f, &a_tr, pass)
                else {
                    return Ok(None);
                };
                stats.backward.nfe += 1;
                let (_, grad_z, grad_params, grad_sqrt_t) =
                    self.rate_gradients(vjp?, &k_bar[i], &a_ell_i, tau, sqrt_t)?;
                for (j, &a) in tableau.a[i].iter().enumerate() {
                    if a != 0.0 {
                        k_bar[j] = &k_bar[j] + &grad_z * (h * a);
                    }
                }
                y_bar = &y_bar + grad_z;
                theta_bar = Some(match theta_bar {
                    Some(acc) => acc + grad_params,
                    None => grad_params,
                });
                sqrt_t_bar += grad_sqrt_t.unwrap_or(0.0);
            }
            stats.backward.accepted += 1;
        }
        let n_net = self.field.parameters().len();
        let mut rest = Vec::new();
        if self.sqrt_end_time.requires_grad() {
            rest.push(Tensor::from(sqrt_t_bar).to_kind(self.sqrt_end_time.kind()));
        }
        self.accumulate_gradients(theta_bar.filter(|_| n_net > 0), rest)?;
        Ok(Some(y_bar))
    }

    /// Adds `∂L/∂θ` — the network's as one flat tensor, then one tensor per
    /// further parameter (√T) — to the parameters' `.grad`, through the
    /// linear surrogate `Σ θ·ḡ`.
    fn accumulate_gradients(&self, flat_net: Option<Tensor>, rest: Vec<Tensor>) -> Result<()> {
        let params = self.parameters();
        let n_net = self.field.parameters().len();
        let mut grads: Vec<Tensor> = Vec::with_capacity(params.len());
        if let Some(flat) = flat_net {
            let sizes: Vec<i64> = params.iter().take(n_net).map(|p| p.numel() as i64).collect();
            for (piece, p) in flat.split_with_sizes(&sizes, 0).into_iter().zip(&params) {
                grads.push(piece.reshape(p.size()));
            }
        }
        grads.extend(rest);
        if params.is_empty() {
            return Ok(());
        }
        let kind = params[0].kind();
        let surrogate = params
            .iter()
            .zip(grads)
            .map(|(p, g)| (p * g.to_kind(p.kind())).sum(kind))
            .fold(Tensor::from(0.0).to_kind(kind), |a, b| a + b);
        tch::with_grad(|| surrogate.f_backward())?;
        Ok(())
    }

    /// The trainable tensors of this block (network and, if trained, √T).
    fn parameters(&self) -> Vec<Tensor> {
        let mut p = self.field.parameters();
        if self.sqrt_end_time.requires_grad() {
            p.push(self.sqrt_end_time.shallow_clone());
        }
        p
    }
}

/// d/dτ of the state channels at one point, and the leaf `z` they were computed at.
struct Rates {
    dz: Tensor,
    dl: Tensor,
    z: Tensor,
    kinetic: Option<Tensor>,
    jacobian: Option<Tensor>,
    /// The field kernel's forward pass, if asked to keep it.
    kept: Option<KeptPass>,
}

impl Rates {
    /// From `f(Tτ, z)`, `Tr ∂f/∂z` and (Hutchinson) `eᵀ ∂f/∂z`: the rates in τ
    /// (scaled by `T`) and the regularizer integrands asked for.
    fn new(
        f: Tensor,
        div: Tensor,
        vjp: Option<Tensor>,
        z: Tensor,
        t_end: &Tensor,
        reg: Regularization,
    ) -> Result<Self> {
        let d = z.size()[1] as f64;
        let kinetic = (reg.kinetic != 0.0).then(|| f.square().mean_dim(1, false, f.kind()) * 0.5 * t_end);
        let jacobian = match (reg.jacobian != 0.0, &vjp) {
            (false, _) => None,
            (true, Some(v)) => Some(v.square().sum_dim_intlist(1, false, v.kind()) / d * t_end),
            (true, None) => {
                bail!("the Jacobian regularizer needs a Hutchinson trace (--trace gaussian|rademacher)")
            }
        };
        Ok(Rates { dz: &f * t_end, dl: -(div * t_end), z, kinetic, jacobian, kept: None })
    }
}

/// `Tr(∂f/∂z)` per row: exact (D VJPs) or Hutchinson `eᵀ (∂f/∂z) e` with fixed `e`.
fn divergence(
    f: &Tensor,
    z: &Tensor,
    noise: Option<&Tensor>,
    create_graph: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    match noise {
        Some(e) => {
            let g = Tensor::f_run_backward(&[(f * e).sum(f.kind())], &[z], true, create_graph)?;
            let v = g[0].shallow_clone(); // eᵀ ∂f/∂z
            Ok(((&v * e).sum_dim_intlist(1, false, f.kind()), Some(v)))
        }
        None => {
            let d = z.size()[1];
            let mut div = Tensor::zeros([z.size()[0]], (f.kind(), f.device()));
            for i in 0..d {
                let g = Tensor::f_run_backward(&[f.select(1, i).sum(f.kind())], &[z], true, create_graph)?;
                div = &div + g[0].select(1, i);
            }
            Ok((div, None))
        }
    }
}

impl FlowLayer for Cnf {
    fn forward(&self, x: &Tensor, opts: &SolveOptions, stats: &mut PassStats) -> Result<(Tensor, Tensor)> {
        let noise = self.draw_noise(x, opts.trace);
        let (z, ell) = self.solve(x, 0.0, 1.0, noise.as_ref(), opts, stats)?;
        // ℓ(T) = −∫ Tr J dt = −log|det|.
        Ok((z, -ell))
    }

    fn inverse(&self, y: &Tensor, opts: &SolveOptions, stats: &mut PassStats) -> Result<(Tensor, Tensor)> {
        // Integrating back from ℓ = 0 leaves ℓ(0) = +∫ Tr J dt = log|det|.
        let noise = self.draw_noise(y, opts.trace);
        self.solve(y, 1.0, 0.0, noise.as_ref(), opts, stats)
    }

    fn reverses_steps(&self, x: &Tensor, opts: &SolveOptions) -> bool {
        !opts.regularization.active() && self.field.has_kernel(x)
    }

    /// With `record_steps`: backprop through the recorded solver steps
    /// ([`Cnf::backward_through_steps`]; autograd on a recomputed forward
    /// pass if the field has no kernel). Otherwise the continuous adjoint
    /// (spec §5.1): integrate [z, a_z, a_θ] from τ = 1 back to 0 with
    /// a_z' = −a_zᵀ ∂g_z/∂z − a_ℓ ∂g_ℓ/∂z and a_θ' = −(the same VJP w.r.t.
    /// θ), reusing the forward solve's noise.
    fn backward(
        &self,
        x: &Tensor,
        y: &Tensor,
        grad_y: &Tensor,
        grad_log_det: &Tensor,
        opts: &SolveOptions,
        stats: &mut PassStats,
    ) -> Result<Tensor> {
        if opts.record_steps {
            let tape = self.tape.borrow_mut().take();
            if let Some(tape) = tape
                && let Some(grad_x) = self.backward_through_steps(tape, grad_y, grad_log_det, stats)?
            {
                return Ok(grad_x);
            }
            return backward_by_recompute(self, x, grad_y, grad_log_det, opts, stats);
        }
        let noise = self.noise.borrow().as_ref().map(Tensor::shallow_clone);
        let params = self.parameters();
        let n_net = self.field.parameters().len();
        // log|det| = −ℓ(1), so the cotangent of ℓ is −∂L/∂log|det| (constant in τ).
        let a_ell = -grad_log_det.detach();
        let reg = opts.regularization;
        // The loss holds c · mean over rows of each regularizer integral.
        let rows = y.size()[0] as f64;
        // Without regularizers: the field's hand-written VJP if it has one.
        let kernel = !reg.active();
        let (sqrt_t, end_time) = (self.sqrt_end_time.double_value(&[]), self.end_time());
        let mut rhs = |tau: f64, state: &[Tensor]| -> Result<Vec<Tensor>> {
            if kernel {
                let (z, a_z) = (&state[0], &state[1]);
                let (a_f, a_tr) = (a_z * end_time, &a_ell * -end_time);
                if let Some(vjp) = self.field.vjp_kernel(end_time * tau, z, noise.as_ref(), &a_f, &a_tr, None)
                {
                    return self.adjoint_rates(vjp?, a_z, &a_ell, tau, sqrt_t, n_net > 0);
                }
            }
            let Rates { dz: gz, dl: gl, z, kinetic, jacobian, .. } =
                self.dynamics(tau, &state[0], noise.as_ref(), true, reg, false)?;
            let a_z = &state[1];
            let mut surrogate = (&gz * a_z).sum(gz.kind()) + (&gl * &a_ell).sum(gl.kind());
            if let Some(k) = kinetic {
                surrogate = &surrogate + k.sum(k.kind()) * (reg.kinetic / rows);
            }
            if let Some(j) = jacobian {
                surrogate = &surrogate + j.sum(j.kind()) * (reg.jacobian / rows);
            }
            let mut inputs = vec![z];
            inputs.extend(params.iter().map(Tensor::shallow_clone));
            let grads = tch::with_grad(|| Tensor::f_run_backward(&[surrogate], &inputs, false, false))?;
            let neg = |g: &Tensor, like: &Tensor| {
                if g.defined() { -g.detach() } else { like.zeros_like().detach() }
            };
            let (g_z, g_params) = grads.split_at(1.min(grads.len()));
            let mut out = vec![gz.detach()];
            out.extend(g_z.iter().zip(&inputs).map(|(g, like)| neg(g, like)));
            // The network's parameter adjoints travel as one flat tensor: the
            // solver then combines stages with a few kernels per stage instead
            // of a few per parameter tensor.
            let (g_net, g_rest) = g_params.split_at(n_net.min(g_params.len()));
            let flat: Vec<Tensor> = g_net.iter().zip(&params).map(|(g, p)| neg(g, p).reshape([-1])).collect();
            if !flat.is_empty() {
                out.push(Tensor::cat(&flat, 0));
            }
            out.extend(g_rest.iter().zip(params.iter().skip(n_net)).map(|(g, p)| neg(g, p)));
            Ok(out)
        };
        let mut state = vec![y.detach(), grad_y.detach()];
        let net_numel: i64 = params.iter().take(n_net).map(|p| p.numel() as i64).sum();
        if n_net > 0 {
            state.push(Tensor::zeros([net_numel], (y.kind(), y.device())));
        }
        state.extend(params.iter().skip(n_net).map(|p| p.zeros_like().detach()));
        // Error control: z and a_z always; the network's a_θ (RMS over all its
        // entries) unless `seminorm`; the quadrature for √T never (the
        // reference gets dT from the endpoint term a(T)·f(T, z(T)), outside the
        // backward solve's norm).
        let mut controlled = vec![true, true];
        if n_net > 0 {
            controlled.push(!opts.seminorm);
        }
        controlled.extend(params.iter().skip(n_net).map(|_| false));
        let (out, s) = odeint(&mut rhs, state, 1.0, 0.0, opts.method, &controlled, self.end_time(), None)?;
        add_stats(&mut stats.backward, s);
        let mut out = out.into_iter();
        out.next(); // z(0), re-integrated
        let grad_x = out.next().context("adjoint state lost a_z")?;
        let flat = if n_net > 0 { Some(out.next().context("adjoint state lost a_θ")?) } else { None };
        self.accumulate_gradients(flat, out.collect())?;
        Ok(grad_x)
    }

    fn export(&self) -> Result<(Stage, Vec<f32>)> {
        let (layers, activation, weights) = self.field.export()?;
        let mut spec_layers = heapless::Vec::new();
        for l in layers {
            spec_layers
                .push(l)
                .map_err(|_| anyhow::anyhow!("more than {} layers", ffjord_runtime::format::MAX_LAYERS))?;
        }
        let spec =
            ffjord_runtime::CnfSpec { layers: spec_layers, activation, end_time: self.end_time() as f32 };
        Ok((Stage::Cnf(spec), weights))
    }
}

/// `y = x ⊙ scale + shift` (the inference form of batch norm; also input
/// standardization with `scale = 1/std`, `shift = −mean/std`).
pub struct Affine {
    pub scale: Tensor,
    pub shift: Tensor,
}

impl FlowLayer for Affine {
    fn forward(&self, x: &Tensor, _: &SolveOptions, _: &mut PassStats) -> Result<(Tensor, Tensor)> {
        let ld = self.scale.abs().log().sum(x.kind()).expand([x.size()[0]], false);
        Ok((x * &self.scale + &self.shift, ld))
    }

    fn inverse(&self, y: &Tensor, _: &SolveOptions, _: &mut PassStats) -> Result<(Tensor, Tensor)> {
        let ld = self.scale.abs().log().sum(y.kind()).expand([y.size()[0]], false);
        Ok(((y - &self.shift) / &self.scale, ld))
    }

    fn export(&self) -> Result<(Stage, Vec<f32>)> {
        let mut w = Vec::new();
        push(&mut w, &self.scale)?;
        push(&mut w, &self.shift)?;
        Ok((Stage::Affine, w))
    }
}

/// `y = L x + b` with `L` lower-triangular: whitening by a covariance's
/// Cholesky factor, so that the chain starts as that full-covariance
/// Gaussian. Fixed during training (no-train variables, kept in checkpoints).
/// Exports as the runtime's `Linear` stage.
pub struct Linear {
    /// `L`, `[D, D]`, zero above the diagonal.
    pub matrix: Tensor,
    /// `b`, `[D]`.
    pub shift: Tensor,
}

impl Linear {
    /// Zeros in `p` (`L = 0` until [`Linear::set_whitening`] or a checkpoint fills it).
    pub fn new(p: &nn::Path<'_>, dim: i64) -> Self {
        Linear { matrix: p.zeros_no_train("matrix", &[dim, dim]), shift: p.zeros_no_train("shift", &[dim]) }
    }

    /// Sets `y = C^{-1/2}_{chol}(x − m)` for rows `x` `[N, D]` with mean `m`
    /// and covariance `C + diag(extra_var) + ridge·I` (`C = Lc Lcᵀ`, `L = Lc⁻¹`),
    /// so that `y` has identity covariance.
    pub fn set_whitening(&self, x: &Tensor, extra_var: &Tensor, ridge: f64) -> Result<()> {
        let x = x.to_kind(Kind::Double).to_device(Device::Cpu);
        let d = x.size()[1];
        let mean = x.mean_dim(0, false, Kind::Double);
        let cov = x.transpose(0, 1).cov(1, None::<Tensor>, None::<Tensor>).reshape([d, d])
            + extra_var.to_kind(Kind::Double).to_device(Device::Cpu).diag(0)
            + Tensor::eye(d, (Kind::Double, Device::Cpu)) * ridge;
        let chol =
            cov.f_linalg_cholesky(false).context("the training rows' covariance is not positive definite")?;
        let inverse =
            chol.linalg_solve_triangular(&Tensor::eye(d, (Kind::Double, Device::Cpu)), false, true, false);
        let shift = -inverse.matmul(&mean);
        tch::no_grad(|| {
            let mut m = self.matrix.shallow_clone();
            m.copy_(&inverse.to_kind(m.kind()).to_device(m.device()));
            let mut b = self.shift.shallow_clone();
            b.copy_(&shift.to_kind(b.kind()).to_device(b.device()));
        });
        Ok(())
    }

    fn log_det(&self, rows: i64, kind: Kind) -> Tensor {
        self.matrix.diagonal(0, 0, 1).abs().log().sum(kind).to_kind(kind).expand([rows], false)
    }
}

impl FlowLayer for Linear {
    fn forward(&self, x: &Tensor, _: &SolveOptions, _: &mut PassStats) -> Result<(Tensor, Tensor)> {
        let (m, b) = (self.matrix.to_kind(x.kind()), self.shift.to_kind(x.kind()));
        Ok((x.matmul(&m.transpose(0, 1)) + b, self.log_det(x.size()[0], x.kind())))
    }

    fn inverse(&self, y: &Tensor, _: &SolveOptions, _: &mut PassStats) -> Result<(Tensor, Tensor)> {
        let (m, b) = (self.matrix.to_kind(y.kind()), self.shift.to_kind(y.kind()));
        // x = L⁻¹(y − b) for every row: solve L Xᵀ = (Y − b)ᵀ.
        let x = m.linalg_solve_triangular(&(y - b).transpose(0, 1), false, true, false).transpose(0, 1);
        Ok((x, self.log_det(y.size()[0], y.kind())))
    }

    fn export(&self) -> Result<(Stage, Vec<f32>)> {
        let d = self.matrix.size()[0];
        let mut w = Vec::new();
        for i in 0..d {
            push(&mut w, &self.matrix.get(i).narrow(0, 0, i + 1))?;
        }
        push(&mut w, &self.shift)?;
        Ok((Stage::Linear, w))
    }
}

/// FFJORD's moving batch norm (spec §2.5): `y = (x − m)/√(v + ε) · e^w + b`
/// with the running statistics *before* this batch's update (`bn_lag = 0`), so
/// no gradient flows through batch statistics and training and evaluation use
/// the same map. A training pass (`create_graph`) then moves the running
/// statistics 10% towards the batch mean and unbiased variance. Exports as the
/// runtime's `Affine` stage.
pub struct MovingBatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
}

const BN_EPS: f64 = 1e-4;
const BN_DECAY: f64 = 0.1;

impl MovingBatchNorm {
    pub fn new(p: &nn::Path<'_>, dim: i64) -> Self {
        MovingBatchNorm {
            weight: p.zeros("weight", &[dim]),
            bias: p.zeros("bias", &[dim]),
            running_mean: p.zeros_no_train("running_mean", &[dim]),
            running_var: p.ones_no_train("running_var", &[dim]),
        }
    }

    /// (scale, shift) of the affine map with the current running statistics.
    fn affine(&self, kind: Kind) -> (Tensor, Tensor) {
        // Copies, not views: the in-place update of the running statistics must
        // not touch tensors autograd saved for this batch's backward pass.
        let scale = self.weight.exp() / (self.running_var.detach().copy() + BN_EPS).sqrt();
        let shift = &self.bias - self.running_mean.detach().copy() * &scale;
        (scale.to_kind(kind), shift.to_kind(kind))
    }
}

impl FlowLayer for MovingBatchNorm {
    fn forward(&self, x: &Tensor, opts: &SolveOptions, _: &mut PassStats) -> Result<(Tensor, Tensor)> {
        let (scale, shift) = self.affine(x.kind());
        let y = x * &scale + shift;
        let ld = scale.log().sum(x.kind()).expand([x.size()[0]], false);
        if opts.create_graph && x.size()[0] > 1 {
            tch::no_grad(|| {
                let xd = x.detach().to_kind(self.running_mean.kind());
                let mean = xd.mean_dim(0, false, xd.kind());
                let var = xd.var_dim(0, true, false);
                let mut rm = self.running_mean.shallow_clone();
                let mut rv = self.running_var.shallow_clone();
                let new_mean = &rm - (&rm - mean) * BN_DECAY;
                let new_var = &rv - (&rv - var) * BN_DECAY;
                rm.copy_(&new_mean);
                rv.copy_(&new_var);
            });
        }
        Ok((y, ld))
    }

    fn inverse(&self, y: &Tensor, _: &SolveOptions, _: &mut PassStats) -> Result<(Tensor, Tensor)> {
        let (scale, shift) = self.affine(y.kind());
        let ld = scale.log().sum(y.kind()).expand([y.size()[0]], false);
        Ok(((y - shift) / &scale, ld))
    }

    fn export(&self) -> Result<(Stage, Vec<f32>)> {
        let (scale, shift) = self.affine(Kind::Double);
        let mut w = Vec::new();
        push(&mut w, &scale)?;
        push(&mut w, &shift)?;
        Ok((Stage::Affine, w))
    }
}

/// The layers of a flow, data side first, on a standard-normal base.
pub struct Chain {
    pub layers: Vec<Box<dyn FlowLayer>>,
    pub dim: i64,
}

/// Per-row results of a pass through the chain.
pub struct ChainOutput {
    /// Latent points.
    pub z: Tensor,
    /// log p(x) per row (on the chain's input scale).
    pub log_p: Tensor,
    pub stats: PassStats,
}

/// `Σ_i (−½ log 2π − z_i²/2)` per row.
pub fn standard_normal_log_prob(z: &Tensor) -> Tensor {
    let c = -0.5 * (2.0 * std::f64::consts::PI).ln();
    (z.square() * -0.5 + c).sum_dim_intlist(1, false, z.kind())
}

impl Chain {
    /// log p(x) per row.
    pub fn log_prob(&self, x: &Tensor, opts: &SolveOptions) -> Result<ChainOutput> {
        let mut stats = PassStats::default();
        let mut z = x.shallow_clone();
        let mut log_det = Tensor::zeros([x.size()[0]], (x.kind(), x.device()));
        for layer in &self.layers {
            let (y, ld) = layer.forward(&z, opts, &mut stats)?;
            z = y;
            log_det = &log_det + ld; // not in place: keeps autograd simple
        }
        let log_p = standard_normal_log_prob(&z) + log_det;
        Ok(ChainOutput { z, log_p, stats })
    }

    /// The training loss `−mean log p(x)` (+ RNODE's terms) and its parameter
    /// gradients, accumulated into `.grad`, by `gradient`: the continuous
    /// adjoint, or backprop through the solver — by reversing the recorded
    /// steps with the fields' hand-written VJPs where every layer can, else by
    /// autograd over the whole pass. A non-finite loss is returned without
    /// gradients.
    pub fn loss_and_gradients(
        &self,
        x: &Tensor,
        opts: &SolveOptions,
        gradient: Gradient,
    ) -> Result<(f64, PassStats)> {
        match gradient {
            Gradient::Adjoint => self.backward_by_layers(x, opts),
            Gradient::Backprop if self.layers.iter().all(|l| l.reverses_steps(x, opts)) => {
                self.backward_by_layers(x, &SolveOptions { record_steps: true, ..*opts })
            }
            Gradient::Backprop => {
                let out = self.log_prob(x, &SolveOptions { create_graph: true, ..*opts })?;
                let nll = -out.log_p.mean(out.log_p.kind());
                let loss = match &out.stats.regularization {
                    Some(r) => &nll + r.to_kind(nll.kind()),
                    None => nll,
                };
                let value = loss.double_value(&[]);
                if value.is_finite() {
                    loss.f_backward()?;
                }
                Ok((value, out.stats))
            }
        }
    }

    /// Computes the NLL loss `−mean log p(x)` and accumulates its parameter
    /// gradients layer by layer through [`FlowLayer::backward`] (the adjoint for
    /// CNF blocks, or the reversed steps with `record_steps`), without keeping
    /// a graph of the forward solves.
    pub fn backward_by_layers(&self, x: &Tensor, opts: &SolveOptions) -> Result<(f64, PassStats)> {
        let fwd_opts = SolveOptions { create_graph: false, ..*opts };
        let mut stats = PassStats::default();
        let mut inputs = Vec::new();
        let mut log_dets = Vec::new();
        let mut z = x.detach();
        for layer in &self.layers {
            let (y, ld) = tch::no_grad(|| layer.forward(&z, &fwd_opts, &mut stats))?;
            inputs.push(z);
            log_dets.push(ld.detach().set_requires_grad(true));
            z = y.detach();
        }
        let z_leaf = z.set_requires_grad(true);
        let (loss, grads) = tch::with_grad(|| -> Result<(f64, Vec<Tensor>)> {
            let total = log_dets.iter().fold(standard_normal_log_prob(&z_leaf), |a, ld| a + ld);
            let loss = -total.mean(z_leaf.kind());
            let mut leaves = vec![z_leaf.shallow_clone()];
            leaves.extend(log_dets.iter().map(Tensor::shallow_clone));
            let grads = Tensor::f_run_backward(&[&loss], &leaves, false, false)?;
            Ok((loss.double_value(&[]), grads))
        })?;
        let loss = loss + stats.regularization.as_ref().map_or(0.0, |r| r.double_value(&[]));
        let mut grads = grads.into_iter();
        let mut grad_y = grads.next().context("no gradient for z")?;
        let grad_log_dets: Vec<Tensor> = grads.collect();
        let mut y = z_leaf.detach();
        for ((layer, x_in), g_ld) in self.layers.iter().zip(&inputs).zip(&grad_log_dets).rev() {
            grad_y = layer.backward(x_in, &y, &grad_y, g_ld, opts, &mut stats)?;
            y = x_in.shallow_clone();
        }
        Ok((loss, stats))
    }

    /// Maps latent `z` to data and returns log p of the result.
    pub fn sample_from(&self, z: &Tensor, opts: &SolveOptions) -> Result<ChainOutput> {
        let mut stats = PassStats::default();
        let base = standard_normal_log_prob(z);
        let mut x = z.shallow_clone();
        let mut log_det = Tensor::zeros([z.size()[0]], (z.kind(), z.device()));
        for layer in self.layers.iter().rev() {
            let (prev, ld) = layer.inverse(&x, opts, &mut stats)?;
            x = prev;
            log_det = &log_det + ld; // not in place: keeps autograd simple
        }
        Ok(ChainOutput { z: x, log_p: base + log_det, stats })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ode::Method;
    use tch::Device;

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
        Chain { layers, dim }
    }

    #[test]
    fn sampling_inverts_the_forward_pass_and_carries_log_p() {
        let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(1);
        let mut vs = nn::VarStore::new(Device::Cpu);
        let c = chain(&vs, 3);
        vs.double();
        let opts = SolveOptions::eval(Method::Dopri5 { rtol: 1e-9, atol: 1e-9, max_steps: 10_000 });
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
        let x = Tensor::randn([400, 3], opts).matmul(&mixing.transpose(0, 1))
            + Tensor::from_slice(&[1.0, -2.0, 0.5]);
        let mut vs = nn::VarStore::new(Device::Cpu);
        let linear = Linear::new(&(vs.root() / "w"), 3);
        let mut net = OdeNet::new(&(vs.root() / "f"), 3, &[8], LayerKind::ConcatSquash, Activation::Tanh);
        net.zero_last_layer();
        let cnf = Cnf::new(&(vs.root() / "c"), Box::new(net), 0.5, true);
        vs.double();
        linear.set_whitening(&x, &Tensor::zeros([3], opts), 0.0).unwrap();
        let (y, _) = linear
            .forward(&x, &SolveOptions::eval(Method::Rk4 { steps: 2 }), &mut PassStats::default())
            .unwrap();
        let cov = y.transpose(0, 1).cov(1, None::<Tensor>, None::<Tensor>);
        assert!(f64::try_from((cov - Tensor::eye(3, opts)).abs().max()).unwrap() < 1e-10);
        let chain = Chain { layers: vec![Box::new(linear), Box::new(cnf)], dim: 3 };
        let eval = SolveOptions::eval(Method::Dopri5 { rtol: 1e-9, atol: 1e-9, max_steps: 10_000 });
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
                    assert!(
                        !g[0].defined() || f64::try_from(g[0].abs().sum(Kind::Double)).unwrap().is_finite()
                    );
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
        let method = Method::Rk4 { steps: 4 };
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
}
