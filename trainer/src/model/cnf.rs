//! A continuous normalizing flow block ([`Cnf`]): the solve, the exact or
//! Hutchinson trace, and both gradient paths (continuous adjoint, reversed steps).

use anyhow::{Context, Result, bail};
use ffjord_runtime::Stage;
use tch::{Kind, Tensor, nn};

use crate::ode::{Step, all_controlled, odeint};

use super::*;

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

    /// `f(t, z)` with autograd (`t` in the block's own time, `0 ≤ t ≤ T`):
    /// the velocity flow matching regresses.
    pub fn velocity(&self, t: f64, z: &Tensor) -> Tensor {
        self.field.forward(&Tensor::from(t).to_kind(z.kind()).to_device(z.device()), z)
    }

    /// `f(t_i, z_i)` with autograd and one time per row (`t` `[B, 1]`), if
    /// the block's network takes per-row times (the tabular MLP does).
    pub fn velocity_rows(&self, t: &Tensor, z: &Tensor) -> Option<Tensor> {
        self.field.forward_rows(t, z)
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
pub(super) fn divergence(
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
    fn as_cnf(&self) -> Option<&Cnf> {
        Some(self)
    }

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
        stats.backward = stats.backward.merge(s);
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
        let end_time = self.end_time() as f32;
        if let Some([c, h, w]) = self.field.image_shape() {
            let shape = super::image::image_shape([c, h, w])?;
            let spec = ffjord_runtime::ConvCnfSpec { shape, layers: spec_layers, activation, end_time };
            return Ok((Stage::ConvCnf(spec), weights));
        }
        let spec = ffjord_runtime::CnfSpec {
            layers: spec_layers,
            activation,
            end_time,
            matrices: Default::default(),
        };
        Ok((Stage::Cnf(spec), weights))
    }
}
