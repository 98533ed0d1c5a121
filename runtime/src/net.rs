//! The ODE net `f(t, z)` of one CNF block and its exact divergence.
//!
//! The divergence uses forward-mode tangents: the net is run on `D + 1`
//! "lanes" — lane 0 carries the value, lane `1 + j` the derivative along input
//! direction `e_j` — so the cost is `(D + 1)` mat-vecs per layer and
//! `Tr(∂f/∂z) = Σ_j (lane 1 + j)_j` is exact. Lanes are stored lane-major so
//! every mat-vec row is a contiguous dot product ([`Weights::dot`], eight
//! independent accumulators, which the compiler vectorises); the gate and
//! activation of each unit are computed once, on lane 0, and applied to the
//! tangent lanes as one scale factor per unit.

use crate::format::{Activation, CnfSpec, LayerKind, LayerSpec, Weights};
use crate::math::{copy, sigmoid, softplus, tanh_with_derivative};
use crate::matvec::{Dims, matvec_lanes};
use crate::quant::{Matrix, MatrixEncoding};
use crate::solver::Dynamics;

/// One CNF block as dynamics of the augmented state `[z (D values), ℓ]` with
/// `dz/dt = f(t, z)` and `dℓ/dt = −Tr(∂f/∂z)` (spec §1, code convention).
#[derive(Clone, Debug)]
pub struct CnfBlock<'a> {
    spec: CnfSpec,
    weights: Weights<'a>,
    dim: usize,
    max_width: usize,
    /// Whether [`Dynamics::eval`] reuses the gates of the previous
    /// evaluation when `t` is the same (see [`CnfBlock::with_gate_cache`]).
    cache_gates: bool,
}

impl<'a> CnfBlock<'a> {
    /// A block over validated `spec` and its `weights` (from [`crate::Model`]).
    pub(crate) fn new(spec: CnfSpec, weights: Weights<'a>, dim: usize, max_width: usize) -> Self {
        CnfBlock { spec, weights, dim, max_width, cache_gates: false }
    }

    /// This block with a gate cache for [`Dynamics::eval`]: a concatsquash
    /// layer's gates `σ(w_g t + b_g)` depend on `t` alone, and a solver
    /// evaluates several times at one `t` (RK4's two midpoint stages, a
    /// step's end and the next one's start, Dopri5's last two stages), so
    /// the gates of the last `t` stay in the scratch and are reused when `t`
    /// repeats — the same values, computed once (M4F, 2-D model, RK4-8:
    /// 15 of 32 evaluations). Only for the runtime's own solves: every
    /// integrator calls [`Dynamics::begin`], which empties the cache, before
    /// its first evaluation, so a scratch that held another block's gates is
    /// never read. Blocks from [`crate::Model::cnf_block`] have no cache.
    pub(crate) fn with_gate_cache(mut self) -> Self {
        self.cache_gates = true;
        self
    }

    /// Data dimension `D`.
    pub(crate) fn data_dim(&self) -> usize {
        self.dim
    }

    /// Widest layer output (sizes the activation buffers).
    pub(crate) fn max_width(&self) -> usize {
        self.max_width
    }

    /// The block's layers with their weights, input to output.
    pub fn layers(&self) -> impl Iterator<Item = (LayerSpec, LayerWeights<'a>)> + '_ {
        let mut d_in = self.dim;
        let mut offset = 0;
        self.spec.layers.iter().map(move |layer| {
            let d_out = usize::from(layer.out_dim);
            let count = layer.kind.word_count(d_in, d_out, self.spec.matrices).unwrap_or(0);
            let w = self.weights.slice(offset, count);
            let w = LayerWeights::split(layer.kind, self.spec.matrices, w, d_in, d_out);
            offset += count;
            d_in = d_out;
            (*layer, w)
        })
    }

    /// The block's layers, activation and end time.
    pub fn spec(&self) -> &CnfSpec {
        &self.spec
    }

    /// End time `T` of this block.
    pub fn end_time(&self) -> f32 {
        self.spec.end_time
    }

    /// Scratch floats [`CnfBlock::velocity`] needs.
    pub fn velocity_work_len(&self) -> usize {
        self.work_len_for(1)
    }

    fn work_len_for(&self, lanes: usize) -> usize {
        net_work_len(self.max_width, self.spec.gate_count(), lanes)
    }

    /// `f(t, z)` alone (no divergence): one lane.
    pub fn velocity(&self, t: f32, z: &[f32], out: &mut [f32], work: &mut [f32]) {
        out.fill(f32::NAN);
        self.run(t, z, 1, false, work, |result| copy(out, result));
    }

    /// `f(t, z)` into `out` and the exact `Tr(∂f/∂z)` as return value.
    pub fn velocity_and_divergence(&self, t: f32, z: &[f32], out: &mut [f32], work: &mut [f32]) -> f32 {
        self.velocity_and_divergence_with(t, z, out, false, work)
    }

    /// [`CnfBlock::velocity_and_divergence`], reusing cached gates if
    /// `cached` (and `work` holds them for this `t`).
    fn velocity_and_divergence_with(
        &self,
        t: f32,
        z: &[f32],
        out: &mut [f32],
        cached: bool,
        work: &mut [f32],
    ) -> f32 {
        let d = self.dim;
        let mut div = f32::NAN;
        out.fill(f32::NAN);
        self.run(t, z, d + 1, cached, work, |result| {
            let mut lanes = result.chunks_exact(d);
            if let Some(value) = lanes.next() {
                copy(out, value);
            }
            // Lane 1 + j holds J e_j; its j-th entry is ∂f_j/∂z_j.
            div = lanes.enumerate().map(|(j, lane)| lane.get(j).copied().unwrap_or(f32::NAN)).sum();
        });
        div
    }

    /// Runs the net on `lanes` lanes and hands the output (`lanes × D`,
    /// lane-major) to `finish`. Does nothing if `work` is too short (callers
    /// check lengths up front). With `cached`, the gates in `work` are
    /// reused if they are for this `t`; without, they are recomputed and
    /// marked as for no time.
    fn run(
        &self,
        t: f32,
        z: &[f32],
        lanes: usize,
        cached: bool,
        work: &mut [f32],
        finish: impl FnOnce(&[f32]),
    ) {
        let width = self.max_width * lanes;
        // Work: [time of the gates, gates (concatsquash units in layer
        // order), a, b, scale]; the time first so `begin` finds it.
        let Some((gate_time, rest)) = work.split_first_mut() else { return };
        let Some((gates, rest)) = rest.split_at_mut_checked(self.spec.gate_count()) else { return };
        // `==` (never true for the NaN that marks "no time"); ±0 give the
        // same gates. On a miss each layer computes its gates and stores them.
        let hit = cached && *gate_time == t;
        *gate_time = if cached { t } else { f32::NAN };
        let mut gates = gates;
        let Some((a, rest)) = rest.split_at_mut_checked(width) else { return };
        let Some((b, rest)) = rest.split_at_mut_checked(width) else { return };
        let Some((scale, _)) = rest.split_at_mut_checked(self.max_width) else { return };
        let d = self.dim;
        // Seed: lane 0 is z, lane 1 + j is the unit vector e_j.
        for (l, lane) in a.chunks_exact_mut(d).take(lanes).enumerate() {
            if l == 0 {
                copy(lane, z);
            } else {
                lane.fill(0.0);
                if let Some(e) = lane.get_mut(l - 1) {
                    *e = 1.0;
                }
            }
        }
        let (mut input, mut output) = (a, b);
        let mut d_in = d;
        let mut offset = 0;
        let n_layers = self.spec.layers.len();
        for (l, layer) in self.spec.layers.iter().enumerate() {
            let d_out = usize::from(layer.out_dim);
            let count = layer.kind.word_count(d_in, d_out, self.spec.matrices).unwrap_or(0);
            let w = LayerWeights::split(
                layer.kind,
                self.spec.matrices,
                self.weights.slice(offset, count),
                d_in,
                d_out,
            );
            let act = if l + 1 < n_layers { Some(self.spec.activation) } else { None };
            let dims = LayerDims { d_in, d_out, lanes };
            let split = if w.squash { d_out.min(gates.len()) } else { 0 };
            let (layer_gates, rest) = core::mem::take(&mut gates).split_at_mut(split);
            gates = rest;
            let time = LayerTime { t, gates: layer_gates, hit };
            apply_layer(w, time, act, dims, input, output, scale);
            offset += count;
            d_in = d_out;
            core::mem::swap(&mut input, &mut output);
        }
        finish(input.get(..d * lanes).unwrap_or(&[]));
    }
}

impl Dynamics for CnfBlock<'_> {
    fn dim(&self) -> usize {
        self.dim + 1
    }

    fn work_len(&self) -> usize {
        self.work_len_for(self.dim + 1)
    }

    fn error_split(&self) -> usize {
        self.dim
    }

    fn begin(&self, work: &mut [f32]) {
        if let Some(gate_time) = work.first_mut() {
            *gate_time = f32::NAN;
        }
    }

    fn eval(&self, t: f32, y: &[f32], dy: &mut [f32], work: &mut [f32]) {
        let (z, _) = y.split_at(self.dim.min(y.len()));
        let (dz, dl) = dy.split_at_mut(self.dim.min(dy.len()));
        let div = self.velocity_and_divergence_with(t, z, dz, self.cache_gates, work);
        if let Some(dl) = dl.first_mut() {
            *dl = -div;
        }
    }
}

/// Scratch of one net evaluation on `lanes` lanes with `gates` gated
/// units: the gates and the time they are for, two activation buffers and
/// one per-unit scale vector.
pub(crate) fn net_work_len(max_width: usize, gates: usize, lanes: usize) -> usize {
    1 + gates + (2 * lanes + 1) * max_width
}

/// One layer's weight section, split as FORMAT.md lays it out — the one
/// reading of that layout (the runtime's kernels and the trainer's loaders
/// and JSON form all go through it).
#[derive(Clone, Copy, Debug)]
pub struct LayerWeights<'a> {
    /// `W`, `d_out` rows of `cols` values (row-major `[out, in]`), stored
    /// as the stage's [`CnfSpec::matrices`] says.
    pub matrix: Matrix<'a>,
    /// Columns of `W`: `d_in`, plus the time column (first) for concat.
    pub cols: usize,
    /// Whether `W`'s first column multiplies `t` (concat).
    pub concat: bool,
    /// Whether the gate and hyper-bias vectors follow (concatsquash).
    pub squash: bool,
    /// `b[d_out]`.
    pub bias: Weights<'a>,
    /// Concatsquash: the gate's weight `w_g[d_out]` (empty otherwise).
    pub gate_w: Weights<'a>,
    /// Concatsquash: the gate's bias `b_g[d_out]` (empty otherwise).
    pub gate_b: Weights<'a>,
    /// Concatsquash: the hyper-bias weight `w_b[d_out]` (empty otherwise).
    pub hyper_b: Weights<'a>,
}

impl<'a> LayerWeights<'a> {
    /// Splits one layer's `w` (exactly [`LayerKind::word_count`] words, or
    /// fewer: missing parts come back empty) mapping `d_in` to `d_out` values,
    /// its matrix stored as `matrices`.
    pub fn split(
        kind: LayerKind,
        matrices: MatrixEncoding,
        w: Weights<'a>,
        d_in: usize,
        d_out: usize,
    ) -> Self {
        let concat = kind == LayerKind::Concat;
        let squash = kind == LayerKind::ConcatSquash;
        let cols = if concat { d_in + 1 } else { d_in };
        let words = matrices.matrix_words(d_out, cols).unwrap_or(usize::MAX);
        let (matrix_words, rest) = w.split_at(words);
        let matrix = Matrix::new(matrices, matrix_words, d_out, cols);
        let (bias, rest) = rest.split_at(d_out);
        let (gate_w, rest) = rest.split_at(if squash { d_out } else { 0 });
        let (gate_b, hyper_b) = rest.split_at(gate_w.len());
        LayerWeights { matrix, cols, concat, squash, bias, gate_w, gate_b, hyper_b }
    }
}

/// A layer's per-unit parameters after its product: bias, time terms, gate,
/// activation.
struct UnitParams<'a> {
    bias: Weights<'a>,
    gate_w: Weights<'a>,
    gate_b: Weights<'a>,
    hyper_b: Weights<'a>,
    squash: bool,
    act: Option<Activation>,
    t: f32,
}

impl UnitParams<'_> {
    /// The value lane `value` (= `W x`, in place) through bias, time terms,
    /// gate and activation; `scale` gets d(output)/d(W x) per unit for the
    /// tangent lanes. `t_weight(o)` is unit `o`'s time-column weight (0
    /// without one). Concatsquash gates are read from `gates` if `hit`,
    /// else computed and stored there. Returns whether any scale differs
    /// from 1.
    #[inline(always)]
    fn apply(
        &self,
        value: &mut [f32],
        scale: &mut [f32],
        gates: &mut [f32],
        hit: bool,
        t_weight: impl Fn(usize) -> f32,
    ) -> bool {
        let t = self.t;
        let params = self.gate_w.iter().zip(self.gate_b.iter()).zip(self.hyper_b.iter());
        let mut gates = params.zip(gates.iter_mut());
        let mut any_scale = false;
        for (o, ((v, s), b)) in value.iter_mut().zip(scale.iter_mut()).zip(self.bias.iter()).enumerate() {
            let mut pre = *v + b + t_weight(o) * t;
            let mut ds = 1.0;
            // (A validated model has every concatsquash unit's parameters
            // and cache slot.)
            if self.squash
                && let Some((((gw, gb), hb), g)) = gates.next()
            {
                let gate = if hit { *g } else { sigmoid(gw * t + gb) };
                *g = gate;
                pre = pre * gate + hb * t;
                ds = gate;
            }
            if let Some(act) = self.act {
                // Tanh (the usual one) inline in both copies, the rest by a
                // call (feature `compact`: every one by a call).
                let (y, dy) = match act {
                    Activation::Tanh if !cfg!(feature = "compact") => tanh_with_derivative(pre),
                    other => activate(other, pre),
                };
                pre = y;
                ds *= dy;
            }
            *v = pre;
            *s = ds;
            any_scale |= ds != 1.0;
        }
        any_scale
    }
}

/// The time a layer is evaluated at, with the layer's slots of the gate
/// cache: its concatsquash gates at `t` if `hit`, else the place to store
/// them.
struct LayerTime<'a> {
    t: f32,
    gates: &'a mut [f32],
    hit: bool,
}

#[derive(Clone, Copy)]
struct LayerDims {
    d_in: usize,
    d_out: usize,
    lanes: usize,
}

/// One diffeq layer on `lanes` lanes: `input` is `lanes × d_in` (lane-major),
/// `output` gets `lanes × d_out`; `scale` (`d_out`) is scratch for the factor
/// that carries tangents through gate and activation.
fn apply_layer(
    w: LayerWeights<'_>,
    time: LayerTime<'_>,
    act: Option<Activation>,
    dims: LayerDims,
    input: &[f32],
    output: &mut [f32],
    scale: &mut [f32],
) {
    let LayerDims { d_in, d_out, lanes } = dims;
    let LayerWeights { matrix, cols, concat, squash, bias, gate_w, gate_b, hyper_b } = w;

    // 1. Every lane: y_l = W x_l (the t column of a concat layer skipped).
    matvec_lanes(matrix, cols, usize::from(concat), input, output, Dims { d_in, d_out, lanes });
    // 2. The value lane: bias, time terms, gate, activation. `scale` keeps
    //    d(output)/d(W x) per unit for the tangent lanes.
    let (value, tangents) = output.split_at_mut(d_out.min(output.len()));
    let LayerTime { t, gates, hit } = time;
    let units = UnitParams { bias, gate_w, gate_b, hyper_b, squash, act, t };
    // Two copies of the loop: the common case (no time column) keeps the
    // matrix out of it (M4F, 2-D model: 3.69 → 3.62 instructions per FLOP);
    // feature `compact` keeps one copy.
    let t_weight = |o: usize| if concat { matrix.get(o * cols).unwrap_or(0.0) } else { 0.0 };
    let any_scale = if concat || cfg!(feature = "compact") {
        units.apply(value, scale, gates, hit, t_weight)
    } else {
        units.apply(value, scale, gates, hit, |_| 0.0)
    };
    // 3. Tangent lanes: chain rule through gate and activation.
    if any_scale {
        for lane in tangents.chunks_exact_mut(d_out.max(1)).take(lanes.saturating_sub(1)) {
            for (y, &s) in lane.iter_mut().zip(scale.iter()) {
                *y *= s;
            }
        }
    }
}

/// An activation's value and derivative at `x`.
#[inline]
pub(crate) fn activate(act: Activation, x: f32) -> (f32, f32) {
    match act {
        Activation::Identity => (x, 1.0),
        Activation::Tanh => tanh_with_derivative(x),
        Activation::Softplus => (softplus(x), sigmoid(x)),
        Activation::Elu => {
            if x > 0.0 {
                (x, 1.0)
            } else {
                let e = libm::expm1f(x);
                (e, e + 1.0)
            }
        }
        Activation::Swish { beta } => {
            let s = sigmoid(beta * x);
            (x * s, s + beta * x * s * (1.0 - s))
        }
    }
}
