//! The [`FlowLayer`] trait every layer of the chain implements.

use anyhow::Result;
use ffjord_runtime::Stage;
use tch::Tensor;

use super::*;

/// One invertible layer of the chain, mapping data side → latent side.
pub trait FlowLayer {
    /// `(y, log|det ∂y/∂x|)` per row.
    fn forward(&self, x: &Tensor, opts: &SolveOptions, stats: &mut PassStats) -> Result<(Tensor, Tensor)>;
    /// `(x, log|det ∂y/∂x| at x)` per row, from `y`.
    fn inverse(&self, y: &Tensor, opts: &SolveOptions, stats: &mut PassStats) -> Result<(Tensor, Tensor)>;
    /// The runtime stage and its weights.
    fn export(&self) -> Result<(Stage, Vec<f32>)>;

    /// The layer as a CNF block, if it is one (what flow-matching
    /// pre-training regresses: [`crate::flow_matching`]).
    fn as_cnf(&self) -> Option<&Cnf> {
        None
    }

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
pub(super) fn backward_by_recompute<L: FlowLayer + ?Sized>(
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
    stats.backward = stats.backward.merge(local.solve);
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
