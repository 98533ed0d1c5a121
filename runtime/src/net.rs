//! The ODE net `f(t, z)` of one CNF block and its exact divergence.
//!
//! The divergence uses forward-mode tangents: the net is run once on `D + 1`
//! "lanes" at the same time — lane 0 carries the value, lane `1 + j` the
//! derivative along input direction `e_j`. Each weight is read once and applied
//! to all lanes, so the cost is `(D + 1)` mat-vecs per layer with a single pass
//! over the weights, and `Tr(∂f/∂z) = Σ_j (lane 1 + j of output j)` is exact.
//! Activations are stored lane-innermost (`unit × lanes`), which makes the inner
//! loop a contiguous multiply-add the compiler can vectorise.

use crate::format::{Activation, CnfSpec, LayerKind, Weights};
use crate::math::{sigmoid, softplus};
use crate::solver::Dynamics;

/// One CNF block as dynamics of the augmented state `[z (D values), ℓ]` with
/// `dz/dt = f(t, z)` and `dℓ/dt = −Tr(∂f/∂z)` (spec §1, code convention).
#[derive(Clone, Copy, Debug)]
pub struct CnfBlock<'m, 'a> {
    spec: &'m CnfSpec,
    weights: Weights<'a>,
    dim: usize,
    max_width: usize,
}

impl<'m, 'a> CnfBlock<'m, 'a> {
    /// A block over validated `spec` and its `weights` (from [`crate::Model`]).
    pub(crate) fn new(spec: &'m CnfSpec, weights: Weights<'a>, dim: usize, max_width: usize) -> Self {
        CnfBlock { spec, weights, dim, max_width }
    }

    /// End time `T` of this block.
    pub fn end_time(&self) -> f32 {
        self.spec.end_time
    }

    /// Scratch floats [`CnfBlock::velocity`] needs.
    pub fn velocity_work_len(&self) -> usize {
        2 * self.max_width
    }

    /// `f(t, z)` alone (no divergence): one lane.
    pub fn velocity(&self, t: f32, z: &[f32], out: &mut [f32], work: &mut [f32]) {
        let mut done = false;
        self.run(t, z, 1, work, |result| {
            for (o, unit) in out.iter_mut().zip(result) {
                *o = *unit;
            }
            done = true;
        });
        if !done {
            out.fill(f32::NAN);
        }
    }

    /// `f(t, z)` into `out` and the exact `Tr(∂f/∂z)` as return value.
    pub fn velocity_and_divergence(&self, t: f32, z: &[f32], out: &mut [f32], work: &mut [f32]) -> f32 {
        let lanes = self.dim + 1;
        let mut div = f32::NAN;
        self.run(t, z, lanes, work, |result| {
            let mut trace = 0.0;
            for (j, (o, unit)) in out.iter_mut().zip(result.chunks_exact(lanes)).enumerate() {
                *o = unit.first().copied().unwrap_or(f32::NAN);
                trace += unit.get(1 + j).copied().unwrap_or(f32::NAN);
            }
            div = trace;
        });
        div
    }

    /// Runs the net on `lanes` lanes and hands the output (`D × lanes`) to `finish`.
    /// Does nothing if `work` is too short (callers check lengths up front).
    fn run(&self, t: f32, z: &[f32], lanes: usize, work: &mut [f32], finish: impl FnOnce(&[f32])) {
        let width = self.max_width * lanes;
        let Some((a, rest)) = work.split_at_mut_checked(width) else { return };
        let Some((b, _)) = rest.split_at_mut_checked(width) else { return };
        // Seed: value z_i in lane 0, unit tangent e_i in lane 1 + i.
        for (i, (unit, &zi)) in a.chunks_exact_mut(lanes).zip(z).enumerate() {
            unit.fill(0.0);
            if let Some((v, tangents)) = unit.split_first_mut() {
                *v = zi;
                if let Some(e) = tangents.get_mut(i) {
                    *e = 1.0;
                }
            }
        }
        let (mut input, mut output) = (a, b);
        let mut d_in = self.dim;
        let mut offset = 0;
        let n_layers = self.spec.layers.len();
        for (l, layer) in self.spec.layers.iter().enumerate() {
            let d_out = usize::from(layer.out_dim);
            let count = layer.kind.weight_count(d_in, d_out).unwrap_or(0);
            let w = self.weights.slice(offset, count);
            let act = if l + 1 < n_layers { Some(self.spec.activation) } else { None };
            apply_layer(layer.kind, act, w, d_in, d_out, t, lanes, input, output);
            offset += count;
            d_in = d_out;
            core::mem::swap(&mut input, &mut output);
        }
        finish(input.get(..self.dim * lanes).unwrap_or(&[]));
    }
}

impl Dynamics for CnfBlock<'_, '_> {
    fn dim(&self) -> usize {
        self.dim + 1
    }

    fn work_len(&self) -> usize {
        2 * self.max_width * (self.dim + 1)
    }

    fn error_split(&self) -> usize {
        self.dim
    }

    fn eval(&self, t: f32, y: &[f32], dy: &mut [f32], work: &mut [f32]) {
        let (z, _) = y.split_at(self.dim.min(y.len()));
        let (dz, dl) = dy.split_at_mut(self.dim.min(dy.len()));
        let div = self.velocity_and_divergence(t, z, dz, work);
        if let Some(dl) = dl.first_mut() {
            *dl = -div;
        }
    }
}

/// One diffeq layer on `lanes` lanes: `input` is `d_in × lanes`, `output` gets `d_out × lanes`.
#[allow(clippy::too_many_arguments)]
fn apply_layer(
    kind: LayerKind,
    act: Option<Activation>,
    w: Weights<'_>,
    d_in: usize,
    d_out: usize,
    t: f32,
    lanes: usize,
    input: &[f32],
    output: &mut [f32],
) {
    let cols = if kind == LayerKind::Concat { d_in + 1 } else { d_in };
    let (matrix, rest) = w.split_at(d_out * cols);
    let (bias, rest) = rest.split_at(d_out);
    let (gate_w, rest) = rest.split_at(if kind == LayerKind::ConcatSquash { d_out } else { 0 });
    let (gate_b, hyper_b) = rest.split_at(gate_w.len());
    let mut gate_w = gate_w.iter();
    let mut gate_b = gate_b.iter();
    let mut hyper_b = hyper_b.iter();
    let units = output.chunks_exact_mut(lanes).zip(matrix.rows(cols)).zip(bias.iter());
    for ((unit, row), b) in units {
        unit.fill(0.0);
        let mut row = row.iter();
        let mut value_offset = b;
        if kind == LayerKind::Concat {
            // t is input 0 of a concat layer; it has no tangent.
            value_offset += row.next().unwrap_or(0.0) * t;
        }
        for (wv, x) in row.zip(input.chunks_exact(lanes)) {
            for (acc, &xv) in unit.iter_mut().zip(x) {
                *acc += wv * xv;
            }
        }
        if let Some(v) = unit.first_mut() {
            *v += value_offset;
        }
        if kind == LayerKind::ConcatSquash {
            let gw = gate_w.next().unwrap_or(0.0);
            let gb = gate_b.next().unwrap_or(0.0);
            let hb = hyper_b.next().unwrap_or(0.0);
            let gate = sigmoid(gw * t + gb);
            for acc in unit.iter_mut() {
                *acc *= gate;
            }
            if let Some(v) = unit.first_mut() {
                *v += hb * t;
            }
        }
        if let Some(act) = act {
            if let Some((v, tangents)) = unit.split_first_mut() {
                let (y, dy) = activate(act, *v);
                *v = y;
                for tan in tangents {
                    *tan *= dy;
                }
            }
        }
    }
}

/// An activation's value and derivative at `x`.
#[inline]
fn activate(act: Activation, x: f32) -> (f32, f32) {
    match act {
        Activation::Identity => (x, 1.0),
        Activation::Tanh => {
            let y = libm::tanhf(x);
            (y, 1.0 - y * y)
        }
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
