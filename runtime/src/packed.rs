//! Many rows of one CNF block evaluated together: the throughput kernel.
//!
//! [`crate::net::CnfBlock`] evaluates one row on its `D + 1` forward-mode
//! lanes with one dot product per unit and lane — the right shape for a
//! microcontroller. On a server, rows arrive in thousands; here `R` rows are
//! packed side by side, each evaluated at its own time (Dopri5 keeps one
//! controller per row, see [`crate::solver::RowDynamics`]; fixed-step solvers
//! share their times), and the net runs once on all `R · (D + 1)` lanes as
//! small matrix products.
//!
//! Activations are stored **unit-major** (`buffer[unit · stride + lane]`) with
//! lanes ordered by direction, then row: lane `j · R + r` is row `r`'s value
//! (`j = 0`) or its tangent along `e_{j−1}`. A layer's product is then a
//! register-blocked `OB × LB` kernel in which every weight is broadcast over
//! `LB` contiguous lanes, and the per-unit work (bias, time terms, gate,
//! activation, chain rule) runs over contiguous rows.

use crate::format::{Activation, Weights};
use crate::math::{sigmoid, sigmoid_in_place, tanh_in_place};
use crate::net::{CnfBlock, LayerWeights};
use crate::quant::{Matrix, WIDEN_CHUNK};
use crate::solver::{Dynamics, RowDynamics};

/// Lanes per register block; the padded row count is a multiple of it.
const LB: usize = 8;
/// Output units per register block.
const OB: usize = 4;

/// `rows` rows of one CNF block as one packed system with shared steps.
///
/// State layout: row after row, each `[z (D values), ℓ]` as in
/// [`CnfBlock`]'s [`Dynamics`] implementation.
pub(crate) struct PackedBlock<'b, 'a> {
    block: &'b CnfBlock<'a>,
    rows: usize,
    /// `rows` rounded up to a multiple of [`LB`]; padding lanes are zero.
    padded: usize,
}

impl<'b, 'a> PackedBlock<'b, 'a> {
    pub(crate) fn new(block: &'b CnfBlock<'a>, rows: usize) -> Self {
        PackedBlock { block, rows, padded: padded_rows(rows) }
    }

    fn stride(&self) -> usize {
        self.padded * (self.block.data_dim() + 1)
    }
}

/// `rows` rounded up to the kernel's lane block.
pub(crate) fn padded_rows(rows: usize) -> usize {
    rows.div_ceil(LB).saturating_mul(LB)
}

/// Scratch floats of one packed evaluation with a time per row: two
/// activation buffers of `max_width × stride`, and per-row scale and gate
/// vectors.
pub(crate) fn packed_work_len(max_width: usize, dim: usize, rows: usize) -> usize {
    let padded = padded_rows(rows);
    let stride = padded.saturating_mul(dim + 1);
    max_width.saturating_mul(stride).saturating_mul(2).saturating_add(2 * padded)
}

/// As [`Dynamics`] (one time for all rows) the packed block serves the
/// fixed-step solvers only: its error split is not per row. Dopri5 runs it
/// through [`RowDynamics`], one controller per row.
impl Dynamics for PackedBlock<'_, '_> {
    fn dim(&self) -> usize {
        self.rows * (self.block.data_dim() + 1)
    }

    /// [`RowDynamics::rows_work_len`] plus the shared time copied per row.
    fn work_len(&self) -> usize {
        self.rows_work_len().saturating_add(self.rows)
    }

    fn eval(&self, t: f32, y: &[f32], dy: &mut [f32], work: &mut [f32]) {
        let Some((times, work)) = work.split_at_mut_checked(self.rows) else {
            dy.fill(f32::NAN);
            return;
        };
        times.fill(t);
        self.eval_rows(times, y, dy, work);
    }
}

impl RowDynamics for PackedBlock<'_, '_> {
    fn rows(&self) -> usize {
        self.rows
    }

    fn row_error_split(&self) -> usize {
        self.block.data_dim()
    }

    fn rows_work_len(&self) -> usize {
        packed_work_len(self.block.max_width(), self.block.data_dim(), self.rows)
    }

    fn eval_rows(&self, times: &[f32], y: &[f32], dy: &mut [f32], work: &mut [f32]) {
        let d = self.block.data_dim();
        let (rows, padded, stride) = (self.rows, self.padded, self.stride());
        let width = self.block.max_width() * stride;
        dy.fill(f32::NAN);
        let Some((a, rest)) = work.split_at_mut_checked(width) else { return };
        let Some((b, rest)) = rest.split_at_mut_checked(width) else { return };
        let Some((scale, rest)) = rest.split_at_mut_checked(padded) else { return };
        let Some((gates, _)) = rest.split_at_mut_checked(padded) else { return };
        let times = times.get(..rows).unwrap_or(&[]);
        // One time for all rows (fixed steps, Dopri5's first evaluation): the
        // time terms are computed once per unit.
        let shared_t = times.first().copied().filter(|&t0| times.iter().all(|&t| t == t0));
        let time = RowTimes { times, shared: shared_t };
        // Seed: value lanes carry z, tangent block j carries e_{j-1}.
        for (k, unit) in a.chunks_exact_mut(stride).take(d).enumerate() {
            unit.fill(0.0);
            for (lane, row) in unit.iter_mut().zip(y.chunks_exact(d + 1)) {
                *lane = row.get(k).copied().unwrap_or(f32::NAN);
            }
            let tangent = unit.get_mut((k + 1) * padded..(k + 2) * padded).unwrap_or(&mut []);
            tangent.get_mut(..rows).unwrap_or(&mut []).fill(1.0);
        }
        let (mut input, mut output) = (a, b);
        let mut d_in = d;
        let spec = self.block.spec();
        let n_layers = spec.layers.len();
        for (l, (layer, w)) in self.block.layers().enumerate() {
            let d_out = usize::from(layer.out_dim);
            let act = if l + 1 < n_layers { Some(spec.activation) } else { None };
            let shape = Shape { d_in, d_out, rows, padded, directions: d };
            packed_layer(w, act, shape, time, input, output, Scratch { scale, gates });
            d_in = d_out;
            core::mem::swap(&mut input, &mut output);
        }
        // Output: unit i's value lanes are dz_i; row r's divergence is the sum
        // over j of unit j's tangent lane along e_j.
        for (r, out) in dy.chunks_exact_mut(d + 1).enumerate() {
            let mut div = 0.0f32;
            for (i, unit) in input.chunks_exact(stride).take(d).enumerate() {
                if let Some(v) = out.get_mut(i) {
                    *v = unit.get(r).copied().unwrap_or(f32::NAN);
                }
                div += unit.get((i + 1) * padded + r).copied().unwrap_or(f32::NAN);
            }
            if let Some(dl) = out.get_mut(d) {
                *dl = -div;
            }
        }
    }
}

/// The evaluation time of every row, and the common value if they agree.
#[derive(Clone, Copy)]
struct RowTimes<'t> {
    times: &'t [f32],
    shared: Option<f32>,
}

/// Per-row scratch of one layer.
struct Scratch<'s> {
    scale: &'s mut [f32],
    gates: &'s mut [f32],
}

#[derive(Clone, Copy)]
struct Shape {
    d_in: usize,
    d_out: usize,
    rows: usize,
    padded: usize,
    /// Tangent directions `D`; lanes per unit are `(D + 1) · padded`.
    directions: usize,
}

impl Shape {
    fn stride(&self) -> usize {
        (self.directions + 1) * self.padded
    }
}

/// One diffeq layer on all packed lanes (see [`crate::net`] for the maths;
/// the order of operations per lane is the same).
#[allow(clippy::too_many_arguments)]
fn packed_layer(
    w: LayerWeights<'_>,
    act: Option<Activation>,
    shape: Shape,
    time: RowTimes<'_>,
    input: &[f32],
    output: &mut [f32],
    scratch: Scratch<'_>,
) {
    let Shape { d_in, d_out, rows, padded, .. } = shape;
    let stride = shape.stride();
    let LayerWeights { matrix, cols, concat, squash, bias, gate_w, gate_b, hyper_b } = w;

    // 1. Every lane: W x (the t column of a concat layer skipped).
    let skip = usize::from(concat);
    match matrix {
        Matrix::F32(m) => matmul(m, cols, skip, d_in, d_out, stride, input, output),
        // Without feature `quantized` the loader admits f32 matrices only.
        Matrix::F16(_) | Matrix::I8 { .. } if cfg!(feature = "quantized") => {
            matmul_widened(matrix, cols, skip, d_in, d_out, stride, input, output)
        }
        Matrix::F16(_) | Matrix::I8 { .. } => {}
    }

    // 2. Per unit: the value lanes get bias, time terms, gate and activation;
    //    the tangent lanes the chain-rule factor. Each pass runs over the
    //    contiguous rows, so it vectorises.
    let mut t_weights = (0..d_out).map(|o| if concat { matrix.get(o * cols).unwrap_or(0.0) } else { 0.0 });
    let mut gate_params = gate_w.iter().zip(gate_b.iter()).zip(hyper_b.iter());
    let scale = scratch.scale.get_mut(..rows).unwrap_or(&mut []);
    let gates = scratch.gates.get_mut(..rows).unwrap_or(&mut []);
    for (unit, b) in output.chunks_exact_mut(stride).take(d_out).zip(bias.iter()) {
        let tw = t_weights.next().unwrap_or(0.0);
        let (value, tangents) = unit.split_at_mut(padded.min(unit.len()));
        let value = value.get_mut(..rows).unwrap_or(&mut []);
        match time.shared {
            Some(t) => {
                let t_term = tw * t;
                for v in value.iter_mut() {
                    *v = *v + b + t_term;
                }
            }
            None => {
                for (v, &t) in value.iter_mut().zip(time.times) {
                    *v = *v + b + tw * t;
                }
            }
        }
        // The gate: one value for a shared time, else one per row (in `gates`).
        let mut shared_gate = 1.0;
        let mut row_gates = false;
        if squash {
            let ((gw, gb), hb) = gate_params.next().unwrap_or(((0.0, 0.0), 0.0));
            match time.shared {
                Some(t) => {
                    shared_gate = sigmoid(gw * t + gb);
                    let hyper = hb * t;
                    for v in value.iter_mut() {
                        *v = *v * shared_gate + hyper;
                    }
                }
                None => {
                    for (g, &t) in gates.iter_mut().zip(time.times) {
                        *g = gw * t + gb;
                    }
                    sigmoid_in_place(gates);
                    for ((v, &g), &t) in value.iter_mut().zip(gates.iter()).zip(time.times) {
                        *v = *v * g + hb * t;
                    }
                    row_gates = true;
                }
            }
        }
        match act {
            None => {
                if !squash {
                    continue;
                }
                scale.fill(1.0);
            }
            Some(Activation::Tanh) => tanh_in_place(value, scale),
            Some(other) => {
                for (v, s) in value.iter_mut().zip(scale.iter_mut()) {
                    let (y, dy) = activate(other, *v);
                    *v = y;
                    *s = dy;
                }
            }
        }
        if row_gates {
            for (s, &g) in scale.iter_mut().zip(gates.iter()) {
                *s *= g;
            }
        } else if squash {
            for s in scale.iter_mut() {
                *s *= shared_gate;
            }
        }
        for direction in tangents.chunks_exact_mut(padded.max(1)) {
            for (y, &s) in direction.iter_mut().zip(scale.iter()) {
                *y *= s;
            }
        }
    }
}

/// `y[o][l] = Σ_k W[o][skip + k] · x[k][l]` for `o < d_out`, `l < stride`
/// (`stride` a multiple of [`LB`]), register-blocked `OB` units × `LB` lanes.
#[allow(clippy::too_many_arguments)]
#[inline(never)]
fn matmul(
    matrix: Weights<'_>,
    cols: usize,
    skip: usize,
    d_in: usize,
    d_out: usize,
    stride: usize,
    x: &[f32],
    y: &mut [f32],
) {
    let x = x.get(..d_in * stride).unwrap_or(&[]);
    let row = |o: usize| matrix.slice(o * cols + skip, d_in);
    let mut o = 0;
    for y_block in y.chunks_exact_mut(OB * stride).take(d_out / OB) {
        let (w0, w1, w2, w3) = (row(o), row(o + 1), row(o + 2), row(o + 3));
        for lane0 in (0..stride).step_by(LB) {
            let mut acc = [[0.0f32; LB]; OB];
            let weights = w0.iter().zip(w1.iter()).zip(w2.iter()).zip(w3.iter());
            for (xs, (((a, b), c), d)) in lane_rows(x, stride, lane0).zip(weights) {
                let [acc0, acc1, acc2, acc3] = &mut acc;
                axpy(acc0, a, xs);
                axpy(acc1, b, xs);
                axpy(acc2, c, xs);
                axpy(acc3, d, xs);
            }
            store(y_block, stride, lane0, &acc);
        }
        o += OB;
    }
    for y_unit in y.chunks_exact_mut(stride).take(d_out).skip(o) {
        let w = row(o);
        for lane0 in (0..stride).step_by(LB) {
            let mut acc = [[0.0f32; LB]; 1];
            for (xs, a) in lane_rows(x, stride, lane0).zip(w.iter()) {
                let [acc0] = &mut acc;
                axpy(acc0, a, xs);
            }
            store(y_unit, stride, lane0, &acc);
        }
        o += 1;
    }
}

/// [`matmul`] for f16 / i8 matrices: one unit at a time, its used weights
/// widened [`WIDEN_CHUNK`] at a time into a stack buffer; the running sums
/// wait in `y` between passes (same order, same bits as an `f32` matrix of
/// the widened values).
#[allow(clippy::too_many_arguments)]
#[inline(never)]
fn matmul_widened(
    matrix: Matrix<'_>,
    cols: usize,
    skip: usize,
    d_in: usize,
    d_out: usize,
    stride: usize,
    x: &[f32],
    y: &mut [f32],
) {
    let x = x.get(..d_in * stride).unwrap_or(&[]);
    let mut buf = [0.0f32; WIDEN_CHUNK];
    for (o, y_unit) in y.chunks_exact_mut(stride).take(d_out).enumerate() {
        y_unit.fill(0.0);
        let row_start = o * cols + skip;
        for start in (0..d_in).step_by(WIDEN_CHUNK) {
            let w = buf.get_mut(..WIDEN_CHUNK.min(d_in - start)).unwrap_or(&mut []);
            matrix.widen(row_start + start, w);
            let xs = x.get(start * stride..).unwrap_or(&[]);
            for lane0 in (0..stride).step_by(LB) {
                let mut acc = [[0.0f32; LB]; 1];
                let [acc0] = &mut acc;
                if let Some(now) = y_unit.get(lane0..).and_then(|s| s.first_chunk::<LB>()) {
                    *acc0 = *now;
                }
                for (xr, &a) in lane_rows(xs, stride, lane0).zip(w.iter()) {
                    axpy(acc0, a, xr);
                }
                store(y_unit, stride, lane0, &acc);
            }
        }
    }
}

/// The `LB` lanes from `lane0` of every unit of `x` (`stride` apart). The
/// callers' shapes keep every block in range; a `filter_map` (rather than a
/// fallback value) keeps the loop body straight-line, so it vectorises.
#[inline(always)]
fn lane_rows(x: &[f32], stride: usize, lane0: usize) -> impl Iterator<Item = &[f32; LB]> {
    x.chunks_exact(stride)
        .filter_map(move |unit| unit.get(lane0..lane0 + LB).and_then(|s| s.first_chunk::<LB>()))
}

#[inline(always)]
fn axpy(acc: &mut [f32; LB], w: f32, x: &[f32; LB]) {
    for (a, x) in acc.iter_mut().zip(x) {
        *a += w * x;
    }
}

/// Writes `N` units' accumulated lanes into `y` (unit-major, `stride` apart).
#[inline(always)]
fn store<const N: usize>(y: &mut [f32], stride: usize, lane0: usize, acc: &[[f32; LB]; N]) {
    for (a, unit) in acc.iter().zip(y.chunks_exact_mut(stride)) {
        if let Some(dst) = unit.get_mut(lane0..).and_then(|s| s.first_chunk_mut::<LB>()) {
            *dst = *a;
        }
    }
}

/// An activation's value and derivative at `x` (as in [`crate::net`]).
#[inline]
fn activate(act: Activation, x: f32) -> (f32, f32) {
    crate::net::activate(act, x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_rounds_up_to_the_lane_block() {
        assert_eq!(padded_rows(1), LB);
        assert_eq!(padded_rows(LB), LB);
        assert_eq!(padded_rows(LB + 1), 2 * LB);
        assert_eq!(packed_work_len(64, 2, 16), 2 * 64 * 48 + 2 * 16);
    }
}
