//! The dynamics network: the [`VectorField`] trait a CNF integrates, and
//! FFJORD's MLP ([`OdeNet`]) with its hand-written CPU kernel hooks.

use anyhow::{Context, Result, ensure};
use ffjord_runtime::Matrix;
use ffjord_runtime::{Activation, LayerKind, LayerParts, LayerSpec, LayerWeights};
use tch::{Kind, Tensor, nn};

use crate::kernel::{LayerShape, Mlp, Real};
use crate::shards::ShardedPass;

/// `f(t, z)`: the right-hand side of a CNF, batched over rows of `z`.
pub trait VectorField {
    /// `f(t, z)` for a scalar tensor `t` and a batch `z` of shape `[B, D]`.
    fn forward(&self, t: &Tensor, z: &Tensor) -> Tensor;
    /// Runtime layer specs and weights in the order `runtime/FORMAT.md` gives.
    fn export(&self) -> Result<(Vec<LayerSpec>, Activation, Vec<f32>)>;
    /// `[C, H, W]` if the field is convolutional on images given as flat
    /// rows (exported as a `ConvCnf` stage, `out_dim` counting channels).
    fn image_shape(&self) -> Option<[i64; 3]> {
        None
    }
    /// The trainable tensors (for the adjoint's parameter VJPs).
    fn parameters(&self) -> Vec<Tensor>;
    /// `f(t, z)` and the exact `Tr(∂f/∂z)` per row from one forward pass, if
    /// the field can carry the Jacobian along (forward-mode tangents). `None`
    /// makes the caller take `D` vector-Jacobian products instead.
    fn forward_with_trace(&self, _t: &Tensor, _z: &Tensor) -> Option<(Tensor, Tensor)> {
        None
    }
    /// `f(t_i, z_i)` with one time per row (`t` of shape `[B, 1]`), for
    /// objectives that are not solves (flow matching draws a time per row),
    /// if the field can take it. `None`: only one time per call.
    fn forward_rows(&self, _t: &Tensor, _z: &Tensor) -> Option<Tensor> {
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

    /// The layer with one time per row (`t` `[B, 1]`): the same maps as
    /// [`DiffeqLayer::forward`] without folding the time terms into one
    /// weight matrix, which needs a single `t`.
    fn forward_rows(&self, t: &Tensor, x: &Tensor) -> Tensor {
        let t = t.to_kind(x.kind());
        match self.kind {
            LayerKind::Ignore => x.apply(&self.linear),
            LayerKind::Concat => Tensor::cat(&[&t, x], 1).apply(&self.linear),
            LayerKind::ConcatSquash => {
                let h = x.apply(&self.linear);
                let h = match &self.hyper_gate {
                    Some(g) => h * t.apply(g).sigmoid(),
                    None => h,
                };
                match &self.hyper_bias {
                    Some(hb) => h + t.apply(hb),
                    None => h,
                }
            }
        }
    }

    /// Appends the layer's weights in file order (the runtime's [`LayerParts`] lays them out).
    fn export(&self, d_in: usize, out: &mut Vec<f32>) -> Result<()> {
        let d_out = self.d_out as usize;
        let matrix = floats(&self.linear.ws)?;
        let bias = match &self.linear.bs {
            Some(b) => floats(b)?,
            None => vec![0.0; d_out],
        };
        let (gate_w, gate_b, hyper_b) = match (&self.hyper_gate, &self.hyper_bias) {
            (Some(g), Some(h)) => {
                (floats(&g.ws)?, floats(g.bs.as_ref().context("hyper gate has a bias")?)?, floats(&h.ws)?)
            }
            _ => Default::default(),
        };
        let parts =
            LayerParts { matrix: &matrix, bias: &bias, gate_w: &gate_w, gate_b: &gate_b, hyper_b: &hyper_b };
        out.extend(parts.floats(self.kind, d_in, d_out)?);
        Ok(())
    }
}

/// Sets `t` to `values` (as many as it has elements; `what` names them in
/// the error), without recording gradients: loading a model file's weights.
pub(super) fn set_tensor(t: &mut Tensor, values: Vec<f32>, what: &str) -> Result<()> {
    ensure!(
        values.len() as i64 == t.numel() as i64,
        "{what}: {} floats for a tensor of {}",
        values.len(),
        t.numel()
    );
    let v = Tensor::from_slice(&values).to_kind(t.kind()).to_device(t.device()).reshape(t.size());
    tch::no_grad(|| t.copy_(&v));
    Ok(())
}

/// PyTorch's `nn.Linear` initialisation (kaiming-uniform with a = √5, i.e.
/// weights and bias ~ U(±1/√fan_in)), which the spec's recipes assume; tch's
/// own default draws weights √6 ≈ 2.4× wider.
pub(super) fn torch_default_init(fan_in: i64, bias: bool) -> nn::LinearConfig {
    let b = 1.0 / (fan_in as f64).sqrt();
    nn::LinearConfig {
        ws_init: nn::Init::Uniform { lo: -b, up: b },
        bs_init: Some(nn::Init::Uniform { lo: -b, up: b }),
        bias,
    }
}

/// A tensor's values, row-major, as f32.
pub fn floats(t: &Tensor) -> Result<Vec<f32>> {
    let flat = t.detach().to_device(tch::Device::Cpu).to_kind(Kind::Float).contiguous().view(-1);
    Ok(Vec::<f32>::try_from(&flat)?)
}

/// FFJORD's ODE net (spec §2.2): diffeq layers with an activation after all but the last.
pub struct OdeNet {
    layers: Vec<DiffeqLayer>,
    activation: Activation,
}

impl OdeNet {
    /// The layers in turn with the activation between them, each applied by `layer`.
    fn through_layers(&self, z: &Tensor, layer: impl Fn(&DiffeqLayer, &Tensor) -> Tensor) -> Tensor {
        let n = self.layers.len();
        let mut x = z.shallow_clone();
        for (i, l) in self.layers.iter().enumerate() {
            x = layer(l, &x);
            if i + 1 < n {
                x = activate(self.activation, x);
            }
        }
        x
    }

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

    /// Loads the layers' weights from the runtime's views of a model file
    /// (`CnfBlock::layers`), in this net's layer order.
    pub fn load_layers<'a>(&mut self, weights: impl Iterator<Item = LayerWeights<'a>>) -> Result<()> {
        let take = |t: &mut Tensor, w: Matrix<'_>| set_tensor(t, w.iter().collect(), "layer weights");
        let mut count = 0;
        for (l, w) in self.layers.iter_mut().zip(weights) {
            take(&mut l.linear.ws, w.matrix)?;
            if let Some(b) = &mut l.linear.bs {
                take(b, Matrix::F32(w.bias))?;
            }
            if let (Some(g), Some(b)) = (&mut l.hyper_gate, &mut l.hyper_bias) {
                take(&mut g.ws, Matrix::F32(w.gate_w))?;
                take(g.bs.as_mut().context("hyper gate has a bias")?, Matrix::F32(w.gate_b))?;
                take(&mut b.ws, Matrix::F32(w.hyper_b))?;
            }
            count += 1;
        }
        ensure!(
            count == self.layers.len(),
            "the model file has {count} layers, the net {}",
            self.layers.len()
        );
        Ok(())
    }
}

pub(super) fn activate(a: Activation, x: Tensor) -> Tensor {
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

/// Threads the kernel splits a batch over: libtorch's intra-op thread
/// count, so `OMP_NUM_THREADS` / `tch::set_num_threads` govern both.
fn kernel_threads() -> usize {
    usize::try_from(tch::get_num_threads()).unwrap_or(1).max(1)
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
        let kept =
            ask.kept.and_then(|k| k.take::<ShardedPass<T>>(t)).filter(|p| p.matches(&zs, noise.as_deref()));
        let pass = match kept {
            Some(pass) => pass,
            None => mlp.forward_sharded(&zs, rows as usize, noise.as_deref(), kernel_threads()),
        };
        let f = Tensor::from_slice(&pass.f).view([rows, d]);
        let trace = Tensor::from_slice(&pass.trace);
        let vjp = match ask.cot {
            None => None,
            Some((a_f, a_tr)) => {
                let v = mlp.vjp_sharded(&pass, &values::<T>(a_f, kind)?, &values::<T>(a_tr, kind)?);
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
        self.through_layers(z, |l, x| l.forward(t, x))
    }

    fn forward_rows(&self, t: &Tensor, z: &Tensor) -> Option<Tensor> {
        Some(self.through_layers(z, |l, x| l.forward_rows(t, x)))
    }

    fn export(&self) -> Result<(Vec<LayerSpec>, Activation, Vec<f32>)> {
        let mut specs = Vec::new();
        let mut weights = Vec::new();
        // The net maps the data dimension to itself: the last layer's width.
        let mut d_in = self.layers.last().map_or(0, |l| l.d_out as usize);
        for l in &self.layers {
            specs
                .push(LayerSpec { kind: l.kind, out_dim: u16::try_from(l.d_out).context("layer too wide")? });
            l.export(d_in, &mut weights)?;
            d_in = l.d_out as usize;
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
