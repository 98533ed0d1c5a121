//! A hand-written CPU kernel for [`OdeNet`](crate::model::OdeNet)'s
//! dynamics: `f(t, z)`, the divergence `Tr ∂f/∂z` — exact, by forward-mode
//! tangent lanes, or Hutchinson's `eᵀ(∂f/∂z)e` from one tangent lane `e` —
//! and the vector-Jacobian product of both w.r.t. `z`, the parameters and
//! `t` — what every evaluation of the adjoint's backward solve asks for —
//! without an autograd graph or a dispatcher call per operation, with each
//! layer's elementwise work fused into one pass. Matrix products go through
//! the `gemm` crate; [`crate::shards`] splits a batch by rows over threads.
//!
//! Layout: a layer's lanes are one row-major matrix `[(1 + K)·B, width]`:
//! rows `0..B` hold the values, rows `k·B..(k+1)·B` the tangents
//! `(∂x/∂z) p_k` along the probes `p_k` (the `K = D` unit vectors for the
//! exact trace, the noise `e` for Hutchinson's), so one matrix product per
//! layer serves every lane (the same scheme as the runtime's packed kernel
//! and `OdeNet::forward_with_trace`). The divergence is `Σ_k p_kᵀ ȧ_{L,k}`.
//!
//! The forward pass of layer `l` (folded at time `t` into `A = X W_effᵀ + c`,
//! as `DiffeqLayer::affine_at` does) is `A_l = X_{l−1} W_lᵀ` on all lanes
//! plus `c_l` on the values; then `x = σ(a)` on the values and
//! `ẋ_k = σ'(a) ⊙ ȧ_k` on the tangents.
//! Its reverse pass needs `σ''` for the tangents' dependence on `a`.

use anyhow::{Result, ensure};
use ffjord_runtime::{Activation, LayerKind};

/// The float types the kernel runs in: `f32` for training, `f64` so the
/// gradient tests can check it against autograd to 1e-10.
pub trait Real:
    num_traits::Float + std::iter::Sum + Default + Send + Sync + std::fmt::Debug + 'static
{
    /// `σ` of every value in place and `σ'` into `slope`.
    fn activate(act: Activation, values: &mut [Self], slope: &mut [Self]) {
        activate_each(act, values, slope);
    }
}

/// [`Real::activate`] value by value.
fn activate_each<T: Real>(act: Activation, values: &mut [T], slope: &mut [T]) {
    for (v, s) in values.iter_mut().zip(slope.iter_mut()) {
        (*v, *s) = activate_scalar(act, *v);
    }
}

impl Real for f32 {
    fn activate(act: Activation, values: &mut [f32], slope: &mut [f32]) {
        match act {
            // The runtime's branch-free tanh (vectorised; 2e-7 absolute).
            Activation::Tanh => tanh_f32(values, slope),
            _ => activate_each(act, values, slope),
        }
    }
}

impl Real for f64 {}

/// The runtime's `tanh_in_place`, compiled for AVX2 where the CPU has it
/// (eight lanes instead of SSE2's four: tanh was 13% of an adjoint step).
/// Without fused multiply-adds (Rust never contracts `a * b + c`), so the
/// values are the portable build's, bit for bit.
fn tanh_f32(values: &mut [f32], slope: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe { tanh_avx2(values, slope) };
        return;
    }
    ffjord_runtime::math::tanh_in_place(values, slope);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn tanh_avx2(values: &mut [f32], slope: &mut [f32]) {
    ffjord_runtime::math::tanh_in_place(values, slope);
}

fn c<T: Real>(x: f64) -> T {
    T::from(x).expect("a float constant fits every Real")
}

fn sigmoid<T: Real>(x: T) -> T {
    T::one() / (T::one() + (-x).exp())
}

/// `(σ(a), σ'(a))`, as `model::activate_with_derivative` defines them.
fn activate_scalar<T: Real>(act: Activation, a: T) -> (T, T) {
    match act {
        Activation::Identity => (a, T::one()),
        Activation::Tanh => {
            let y = a.tanh();
            (y, T::one() - y * y)
        }
        // PyTorch's softplus: linear above the threshold 20.
        Activation::Softplus => (if a > c(20.0) { a } else { a.exp().ln_1p() }, sigmoid(a)),
        Activation::Elu => {
            if a > T::zero() {
                (a, T::one())
            } else {
                let e = a.exp();
                (e - T::one(), e)
            }
        }
        Activation::Swish { beta } => {
            let u = a * c(f64::from(beta));
            let s = sigmoid(u);
            (a * s, s + u * s * (T::one() - s))
        }
    }
}

/// `σ''(a)` given `y = σ(a)` and `s = σ'(a)`.
fn second_derivative<T: Real>(act: Activation, a: T, y: T, s: T) -> T {
    match act {
        Activation::Identity => T::zero(),
        Activation::Tanh => c::<T>(-2.0) * y * s,
        Activation::Softplus => s * (T::one() - s),
        Activation::Elu => {
            if a > T::zero() {
                T::zero()
            } else {
                y + T::one()
            }
        }
        Activation::Swish { beta } => {
            let beta: T = c(f64::from(beta));
            let u = a * beta;
            let g = sigmoid(u);
            beta * g * (T::one() - g) * (c::<T>(2.0) + u * (T::one() - c::<T>(2.0) * g))
        }
    }
}

/// `dst[m×n] (+)= op(lhs)[m×k] · op(rhs)[k×n]`, all row-major; `lhs_t`
/// means `lhs` is stored as `[k×m]`, `rhs_t` that `rhs` is stored `[n×k]`.
#[allow(clippy::too_many_arguments)]
fn matmul<T: Real>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    lhs: &[T],
    lhs_t: bool,
    rhs: &[T],
    rhs_t: bool,
    accumulate: bool,
) {
    assert!(dst.len() >= m * n && lhs.len() >= m * k && rhs.len() >= k * n, "matmul operands too short");
    if m == 0 || n == 0 {
        return;
    }
    let (lhs_rs, lhs_cs) = if lhs_t { (1, m as isize) } else { (k as isize, 1) };
    let (rhs_rs, rhs_cs) = if rhs_t { (1, k as isize) } else { (n as isize, 1) };
    let alpha = if accumulate { T::one() } else { T::zero() };
    // SAFETY: the asserts above make every index the strides reach —
    // (m−1, k−1) of lhs, (k−1, n−1) of rhs, (m−1, n−1) of dst — lie inside
    // the slices; `dst` is borrowed mutably, so it aliases neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs,
            lhs_rs,
            rhs.as_ptr(),
            rhs_cs,
            rhs_rs,
            alpha,
            T::one(),
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// One layer's shape: its kind and widths (`d_in` without a time column).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerShape {
    pub kind: LayerKind,
    pub d_in: usize,
    pub d_out: usize,
}

impl LayerShape {
    /// Parameters in `OdeNet::parameters` order: `W` (with the time column
    /// first for concat), `b`, and for concatsquash the gate's weight and
    /// bias and the hyper-bias weight.
    pub fn numel(&self) -> usize {
        let in_features = self.d_in + usize::from(self.kind == LayerKind::Concat);
        let hyper = if self.kind == LayerKind::ConcatSquash { 3 * self.d_out } else { 0 };
        self.d_out * in_features + self.d_out + hyper
    }
}

/// One layer folded at time `t`: `a = x W_effᵀ + c`.
struct Folded<'p, T> {
    shape: LayerShape,
    /// This layer's slice of the flat parameters.
    raw: &'p [T],
    w_eff: Vec<T>,
    c: Vec<T>,
    /// concatsquash: the gate σ(g t + g_b) per output.
    gate: Vec<T>,
}

/// The network at one time `t`, ready to evaluate.
pub struct Mlp<'p, T> {
    pub(crate) dim: usize,
    act: Activation,
    t: T,
    layers: Vec<Folded<'p, T>>,
}

/// What the forward pass keeps for the reverse pass.
pub struct Pass<T> {
    rows: usize,
    /// Tangent lanes (probes) per row.
    lanes: usize,
    /// Whether the probe is Hutchinson's noise (else the unit vectors).
    hutchinson: bool,
    /// `f(t, z)`, `[B, D]`.
    pub f: Vec<T>,
    /// The divergence per row (exact, or Hutchinson's estimate).
    pub trace: Vec<T>,
    /// Per layer: its input lanes, pre-activation lanes, and `σ'` of the values.
    inputs: Vec<Vec<T>>,
    pre: Vec<Vec<T>>,
    slopes: Vec<Vec<T>>,
}

impl<T: Real> Pass<T> {
    /// Whether this pass was computed for `z` (and `noise`, if given):
    /// its input lanes are `[z; probes]`.
    pub fn matches(&self, z: &[T], noise: Option<&[T]>) -> bool {
        let x0 = &self.inputs[0];
        let n = z.len();
        self.hutchinson == noise.is_some()
            && x0.len() >= n
            && x0[..n] == *z
            && noise.is_none_or(|e| x0[n..] == *e)
    }

    /// Memory held, in bytes.
    pub fn bytes(&self) -> usize {
        let vecs = self.inputs.iter().chain(&self.pre).chain(&self.slopes);
        (vecs.map(Vec::len).sum::<usize>() + self.f.len() + self.trace.len()) * std::mem::size_of::<T>()
    }
}

/// The reverse pass's results for cotangents `(ā_f, ā_tr)` on `(f, trace)`.
pub struct Vjp<T> {
    /// `ā_fᵀ ∂f/∂z + ā_tr ∂tr/∂z`, `[B, D]`.
    pub grad_z: Vec<T>,
    /// The same w.r.t. the flat parameters (`OdeNet::parameters` order), summed over rows.
    pub grad_params: Vec<T>,
    /// The same w.r.t. `t`, summed over rows.
    pub grad_t: T,
}

impl<'p, T: Real> Mlp<'p, T> {
    /// Folds every layer's time dependence at `t` (as `DiffeqLayer::affine_at`).
    pub fn at(shapes: &[LayerShape], act: Activation, params: &'p [T], t: T) -> Result<Self> {
        let total: usize = shapes.iter().map(LayerShape::numel).sum();
        ensure!(params.len() == total, "{} parameters given, the layers hold {total}", params.len());
        ensure!(!shapes.is_empty(), "a network needs a layer");
        let dim = shapes[0].d_in;
        ensure!(shapes.last().is_some_and(|s| s.d_out == dim), "the last layer must map back to {dim}");
        let mut layers = Vec::with_capacity(shapes.len());
        let mut off = 0;
        for &shape in shapes {
            let raw = &params[off..off + shape.numel()];
            off += shape.numel();
            let LayerShape { kind, d_in, d_out } = shape;
            let in_features = shape.d_in + usize::from(kind == LayerKind::Concat);
            let (w, rest) = raw.split_at(d_out * in_features);
            let b = &rest[..d_out];
            let (w_eff, c, gate) = match kind {
                LayerKind::Ignore => (w.to_vec(), b.to_vec(), Vec::new()),
                LayerKind::Concat => {
                    let w_eff = (0..d_out)
                        .flat_map(|o| w[o * in_features + 1..(o + 1) * in_features].to_vec())
                        .collect();
                    let c = (0..d_out).map(|o| b[o] + t * w[o * in_features]).collect();
                    (w_eff, c, Vec::new())
                }
                LayerKind::ConcatSquash => {
                    let (gw, gb, h) =
                        (&rest[d_out..2 * d_out], &rest[2 * d_out..3 * d_out], &rest[3 * d_out..]);
                    let gate: Vec<T> = (0..d_out).map(|o| sigmoid(gw[o] * t + gb[o])).collect();
                    let w_eff = (0..d_out * d_in).map(|i| w[i] * gate[i / d_in]).collect();
                    let c = (0..d_out).map(|o| b[o] * gate[o] + h[o] * t).collect();
                    (w_eff, c, gate)
                }
            };
            layers.push(Folded { shape, raw, w_eff, c, gate });
        }
        Ok(Mlp { dim, act, t, layers })
    }

    /// `f(t, z)` and the divergence for `z` `[rows, D]` (row-major): exact,
    /// or with `noise` `[rows, D]` Hutchinson's `eᵀ(∂f/∂z)e`.
    pub fn forward(&self, z: &[T], rows: usize, noise: Option<&[T]>) -> Pass<T> {
        let d = self.dim;
        assert_eq!(z.len(), rows * d, "z is not [rows, D]");
        let lanes = if noise.is_some() { 1 } else { d };
        let m = (1 + lanes) * rows;
        // Input lanes: the values, then the probes.
        let mut x = vec![T::zero(); m * d];
        x[..rows * d].copy_from_slice(z);
        match noise {
            Some(e) => {
                assert_eq!(e.len(), rows * d, "noise is not [rows, D]");
                x[rows * d..].copy_from_slice(e);
            }
            None => {
                for k in 0..d {
                    for r in 0..rows {
                        x[((1 + k) * rows + r) * d + k] = T::one();
                    }
                }
            }
        }
        let n_layers = self.layers.len();
        let (mut inputs, mut pre, mut slopes) = (Vec::new(), Vec::new(), Vec::new());
        for (l, layer) in self.layers.iter().enumerate() {
            let LayerShape { d_in, d_out, .. } = layer.shape;
            let mut a = vec![T::zero(); m * d_out];
            matmul((m, d_out, d_in), &mut a, &x, false, &layer.w_eff, true, false);
            for row in a[..rows * d_out].chunks_exact_mut(d_out) {
                for (v, &b) in row.iter_mut().zip(&layer.c) {
                    *v = *v + b;
                }
            }
            let mut slope = Vec::new();
            let next = if l + 1 < n_layers {
                let mut y = a.clone();
                slope = vec![T::zero(); rows * d_out];
                let (values, tangents) = y.split_at_mut(rows * d_out);
                T::activate(self.act, values, &mut slope);
                for lane in tangents.chunks_exact_mut(rows * d_out) {
                    for (v, &s) in lane.iter_mut().zip(&slope) {
                        *v = *v * s;
                    }
                }
                y
            } else {
                Vec::new()
            };
            inputs.push(std::mem::replace(&mut x, next));
            pre.push(a);
            slopes.push(slope);
        }
        let out = pre.last().expect("at least one layer");
        let f = out[..rows * d].to_vec();
        let probes = &inputs[0][rows * d..];
        let trace = (0..rows)
            .map(|r| {
                let lane = |k: usize| (k * rows + r) * d..(k * rows + r + 1) * d;
                (0..lanes)
                    .map(|k| {
                        probes[lane(k)].iter().zip(&out[rows * d..][lane(k)]).map(|(&p, &v)| p * v).sum()
                    })
                    .sum()
            })
            .collect();
        Pass { rows, lanes, hutchinson: noise.is_some(), f, trace, inputs, pre, slopes }
    }

    /// The reverse pass of [`Mlp::forward`] for cotangents `a_f` `[rows, D]`
    /// on `f` and `a_tr` `[rows]` on the trace.
    pub fn vjp(&self, pass: &Pass<T>, a_f: &[T], a_tr: &[T]) -> Vjp<T> {
        let (d, rows) = (self.dim, pass.rows);
        assert!(a_f.len() == rows * d && a_tr.len() == rows, "cotangents do not match the pass");
        let m = (1 + pass.lanes) * rows;
        // Cotangent of the last pre-activation lanes: a_f on the values, and
        // a_tr times the probe on each tangent lane (the divergence is Σ_k p_kᵀ ȧ_k).
        let mut bar = pass.inputs[0].clone();
        bar[..rows * d].copy_from_slice(a_f);
        for (i, row) in bar[rows * d..].chunks_exact_mut(d).enumerate() {
            let g = a_tr[i % rows];
            for v in row {
                *v = *v * g;
            }
        }
        let mut grad_params: Vec<Vec<T>> = Vec::with_capacity(self.layers.len());
        let mut grad_t = T::zero();
        let mut grad_z = vec![T::zero(); rows * d];
        for (l, layer) in self.layers.iter().enumerate().rev() {
            let LayerShape { d_in, d_out, .. } = layer.shape;
            // ∂/∂W_eff over every lane; ∂/∂c over the values only.
            let mut g_w = vec![T::zero(); d_out * d_in];
            matmul((d_out, d_in, m), &mut g_w, &bar, true, &pass.inputs[l], false, false);
            let mut g_c = vec![T::zero(); d_out];
            for row in bar[..rows * d_out].chunks_exact(d_out) {
                for (g, &v) in g_c.iter_mut().zip(row) {
                    *g = *g + v;
                }
            }
            grad_params.push(self.unfold(layer, &g_w, &g_c, &mut grad_t));
            if l == 0 {
                // The tangent inputs are constants: only the values reach z.
                matmul(
                    (rows, d_in, d_out),
                    &mut grad_z,
                    &bar[..rows * d_out],
                    false,
                    &layer.w_eff,
                    false,
                    false,
                );
                break;
            }
            let mut x_bar = vec![T::zero(); m * d_in];
            matmul((m, d_in, d_out), &mut x_bar, &bar, false, &layer.w_eff, false, false);
            bar = self.activation_backward(&pass.pre[l - 1], &pass.inputs[l], &pass.slopes[l - 1], x_bar);
        }
        grad_params.reverse();
        Vjp { grad_z, grad_params: grad_params.concat(), grad_t }
    }

    /// From the cotangent of a layer's output lanes to that of its
    /// pre-activation lanes: tangents `ā_k = σ' ⊙ x̄_k`; values
    /// `ā = σ' ⊙ x̄ + σ'' ⊙ Σ_k x̄_k ⊙ ȧ_k`.
    fn activation_backward(&self, pre: &[T], out: &[T], slope: &[T], mut x_bar: Vec<T>) -> Vec<T> {
        let n = slope.len();
        let (values, tangents) = x_bar.split_at_mut(n);
        let mut slope_bar = vec![T::zero(); n];
        for (k, lane) in tangents.chunks_exact_mut(n).enumerate() {
            let a_dot = &pre[(1 + k) * n..(2 + k) * n];
            for (((v, sb), &ad), &s) in lane.iter_mut().zip(slope_bar.iter_mut()).zip(a_dot).zip(slope) {
                *sb = *sb + *v * ad;
                *v = *v * s;
            }
        }
        for i in 0..n {
            let dd = second_derivative(self.act, pre[i], out[i], slope[i]);
            values[i] = slope[i] * values[i] + dd * slope_bar[i];
        }
        x_bar
    }

    /// Parameter gradients from `∂/∂W_eff` and `∂/∂c` (chain rule through the
    /// time folding), adding the layer's `∂/∂t` to `grad_t`.
    fn unfold(&self, layer: &Folded<'p, T>, g_w: &[T], g_c: &[T], grad_t: &mut T) -> Vec<T> {
        let LayerShape { kind, d_in, d_out } = layer.shape;
        let t = self.t;
        match kind {
            LayerKind::Ignore => [g_w, g_c].concat(),
            LayerKind::Concat => {
                let in_features = d_in + 1;
                let mut g = Vec::with_capacity(layer.raw.len());
                for o in 0..d_out {
                    g.push(g_c[o] * t);
                    g.extend_from_slice(&g_w[o * d_in..(o + 1) * d_in]);
                    *grad_t = *grad_t + g_c[o] * layer.raw[o * in_features];
                }
                g.extend_from_slice(g_c);
                g
            }
            LayerKind::ConcatSquash => {
                let (w, rest) = layer.raw.split_at(d_out * d_in);
                let (b, gw, h) = (&rest[..d_out], &rest[d_out..2 * d_out], &rest[3 * d_out..]);
                let s = &layer.gate;
                let mut g_raw_w = Vec::with_capacity(d_out * d_in);
                let (mut g_b, mut g_gw, mut g_gb, mut g_h) = (vec![], vec![], vec![], vec![]);
                for o in 0..d_out {
                    let row = o * d_in..(o + 1) * d_in;
                    let mut g_s = b[o] * g_c[o];
                    for (&gwe, &wv) in g_w[row.clone()].iter().zip(&w[row]) {
                        g_raw_w.push(s[o] * gwe);
                        g_s = g_s + gwe * wv;
                    }
                    let g_pre = g_s * s[o] * (T::one() - s[o]);
                    g_b.push(s[o] * g_c[o]);
                    g_gw.push(g_pre * t);
                    g_gb.push(g_pre);
                    g_h.push(g_c[o] * t);
                    *grad_t = *grad_t + g_pre * gw[o] + g_c[o] * h[o];
                }
                [g_raw_w, g_b, g_gw, g_gb, g_h].concat()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_handles_every_transpose() {
        // lhs [2×3], rhs [3×2], against a hand product.
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b = [1.0, -1.0, 0.5, 2.0, -2.0, 0.0];
        let want = [-4.0, 3.0, -5.5, 6.0];
        let a_t = [1.0, 4.0, 2.0, 5.0, 3.0, 6.0];
        let b_t = [1.0, 0.5, -2.0, -1.0, 2.0, 0.0];
        for (lhs, lt) in [(&a, false), (&a_t, true)] {
            for (rhs, rt) in [(&b, false), (&b_t, true)] {
                let mut dst = [0.0f64; 4];
                matmul((2, 2, 3), &mut dst, lhs, lt, rhs, rt, false);
                assert_eq!(dst, want, "lhs_t {lt} rhs_t {rt}");
                matmul((2, 2, 3), &mut dst, lhs, lt, rhs, rt, true);
                assert_eq!(dst, want.map(|v| 2.0 * v));
            }
        }
    }

    /// The AVX2 build of the runtime's tanh gives the portable build's bits.
    #[test]
    fn dispatched_tanh_equals_the_portable_one() {
        let xs: Vec<f32> =
            (-4000..4000).map(|i| i as f32 * 2.5e-3).chain([f32::INFINITY, -0.0, 1e-30]).collect();
        let (mut fast, mut fast_d) = (xs.clone(), vec![0.0; xs.len()]);
        let (mut portable, mut portable_d) = (xs.clone(), vec![0.0; xs.len()]);
        tanh_f32(&mut fast, &mut fast_d);
        ffjord_runtime::math::tanh_in_place(&mut portable, &mut portable_d);
        for i in 0..xs.len() {
            assert_eq!(fast[i].to_bits(), portable[i].to_bits(), "tanh({})", xs[i]);
            assert_eq!(fast_d[i].to_bits(), portable_d[i].to_bits(), "tanh'({})", xs[i]);
        }
        let (mut nan, mut d) = ([f32::NAN], [0.0]);
        tanh_f32(&mut nan, &mut d);
        assert!(nan[0].is_nan());
    }

    #[test]
    fn second_derivatives_match_finite_differences() {
        let acts = [Activation::Tanh, Activation::Softplus, Activation::Elu, Activation::Swish { beta: 0.7 }];
        for act in acts {
            for a in [-2.5f64, -0.3, 0.4, 1.9] {
                let h = 1e-6;
                let (y, s) = activate_scalar(act, a);
                let (_, s_plus) = activate_scalar(act, a + h);
                let (_, s_minus) = activate_scalar(act, a - h);
                let fd = (s_plus - s_minus) / (2.0 * h);
                let dd = second_derivative(act, a, y, s);
                assert!((fd - dd).abs() < 1e-7, "{act:?} at {a}: {dd} vs {fd}");
            }
        }
    }
}
