//! The row path's matrix products: `y_l = W x_l` for the `D + 1` forward-mode
//! lanes of one net evaluation ([`crate::net::CnfBlock`]).
//!
//! Every output is one accumulator summed over the columns in ascending
//! order, starting from zero. That order does not depend on how the work is
//! blocked, so every block shape below, the unaligned fallback and every
//! target give the same bits.
//!
//! Blocking is for the microcontroller: a block of four weight rows times
//! three lanes loads each weight once for three lanes and each input once
//! for four rows — seven loads for twelve multiply-adds, held in twelve of
//! the Cortex-M4F's 32 single-precision registers, instead of two loads per
//! multiply-add in a plain dot product.

use crate::format::Weights;
use crate::quant::{Matrix, WIDEN_CHUNK};

/// Rows of `W` per block.
const ROWS: usize = 4;

/// The layer's product on every lane: `input` holds `lanes` vectors of `d_in`
/// values, lane after lane; `output` gets `lanes` vectors of `d_out`. `W` is
/// `d_out` rows of `cols` floats, of which the first `skip` (a concat layer's
/// time column) are not used. Missing values (short slices) leave outputs
/// untouched; callers size everything up front.
pub(crate) fn matvec_lanes(
    matrix: Matrix<'_>,
    cols: usize,
    skip: usize,
    input: &[f32],
    output: &mut [f32],
    dims: Dims,
) {
    match matrix {
        // Feature `compact`: the plain path only (same bits, less code).
        Matrix::F32(w) => match w.as_f32() {
            Some(floats) if !cfg!(feature = "compact") => blocked(floats, cols, skip, input, output, dims),
            _ => plain(w, cols, skip, input, output, dims),
        },
        // Without feature `quantized` the loader admits f32 matrices only.
        Matrix::F16(_) | Matrix::I8 { .. } if cfg!(feature = "quantized") => {
            widened(matrix, cols, skip, input, output, dims)
        }
        Matrix::F16(_) | Matrix::I8 { .. } => {}
    }
}

/// `Σ_i w_i x_i` over the shorter of the two, one accumulator from zero in
/// ascending order: the summation order of every product in the runtime.
#[inline(always)]
pub(crate) fn ascending_dot(w: impl IntoIterator<Item = f32>, x: &[f32]) -> f32 {
    w.into_iter().zip(x).fold(0.0, |acc, (w, x)| acc + w * x)
}

/// Sizes of one layer's product.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    /// Inputs per lane (the columns of `W` that are used).
    pub d_in: usize,
    /// Outputs per lane (the rows of `W`).
    pub d_out: usize,
    /// Number of lanes.
    pub lanes: usize,
}

/// Weights not 4-aligned in memory (or feature `compact`): one dot product
/// per output and lane, read byte-wise, in the same order as [`blocked`].
fn plain(w: Weights<'_>, cols: usize, skip: usize, input: &[f32], output: &mut [f32], dims: Dims) {
    let Dims { d_in, d_out, lanes } = dims;
    let lanes_in = input.chunks_exact(d_in.max(1)).take(lanes);
    for (x, y) in lanes_in.zip(output.chunks_exact_mut(d_out.max(1))) {
        for (yo, row) in y.iter_mut().zip(w.rows(cols.max(1))) {
            let (_, used) = row.split_at(skip);
            *yo = used.dot(x);
        }
    }
}

/// f16 / i8 matrices: [`ROWS`] rows' used weights at a time are widened to
/// `f32`, [`WIDEN_CHUNK`] columns per pass, into a stack buffer that the
/// `f32` path's kernel then applies to every lane (one conversion per weight,
/// not per weight and lane). Between passes the running sums wait in
/// `output` and the kernel continues from them, so every output is still one
/// accumulator from zero over ascending columns: the bits of an `f32` matrix
/// holding the widened values.
fn widened(matrix: Matrix<'_>, cols: usize, skip: usize, input: &[f32], output: &mut [f32], dims: Dims) {
    let Dims { d_in, d_out, lanes } = dims;
    let (d_in, d_out) = (d_in.max(1), d_out.max(1));
    let Some(x) = input.get(..lanes.saturating_mul(d_in)) else { return };
    let Some(y) = output.get_mut(..lanes.saturating_mul(d_out)) else { return };
    y.fill(0.0);
    let mut buf = [0.0f32; ROWS * WIDEN_CHUNK];
    for o0 in (0..d_out).step_by(ROWS) {
        let rows = ROWS.min(d_out - o0);
        for start in (0..d_in).step_by(WIDEN_CHUNK) {
            let n = WIDEN_CHUNK.min(d_in - start);
            let w = buf.get_mut(..rows * n).unwrap_or(&mut []);
            for (r, row) in w.chunks_exact_mut(n).enumerate() {
                matrix.widen((o0 + r).saturating_mul(cols).saturating_add(skip + start), row);
            }
            let shape = Shape { cols: n, skip: 0, d_in: n };
            // The lanes' columns `start..` and outputs `o0..`, three lanes at a
            // time as in `blocked` (one shared helper for both measured 1 %
            // more instructions on the M4F's f32 path, so the loop is repeated).
            fn lane_x(l: &[f32], start: usize) -> &[f32] {
                l.get(start..).unwrap_or(&[])
            }
            let mut x3 = x.chunks_exact(3 * d_in);
            let mut y3 = y.chunks_exact_mut(3 * d_out);
            for (x, y) in (&mut x3).zip(&mut y3) {
                let (x0, x) = x.split_at(d_in);
                let (x1, x2) = x.split_at(d_in);
                let (y0, y) = y.split_at_mut(d_out);
                let (y1, y2) = y.split_at_mut(d_out);
                let ys = [y0, y1, y2].map(|l| l.get_mut(o0..).unwrap_or(&mut []));
                lane_block::<3, true>(
                    w,
                    shape,
                    [lane_x(x0, start), lane_x(x1, start), lane_x(x2, start)],
                    ys,
                    rows4_lanes3,
                );
            }
            for (x, y) in x3.remainder().chunks_exact(d_in).zip(y3.into_remainder().chunks_exact_mut(d_out)) {
                let ys = [y.get_mut(o0..).unwrap_or(&mut [])];
                lane_block::<1, true>(w, shape, [lane_x(x, start)], ys, rows4_lanes1);
            }
        }
    }
}

/// Aligned weights: lanes in groups of three (then one by one), rows of `W`
/// in groups of [`ROWS`] (then one at a time).
fn blocked(w: &[f32], cols: usize, skip: usize, input: &[f32], output: &mut [f32], dims: Dims) {
    let Dims { d_in, d_out, lanes } = dims;
    let (d_in, d_out, cols) = (d_in.max(1), d_out.max(1), cols.max(1));
    let Some(w) = w.get(..d_out.saturating_mul(cols)) else { return };
    let Some(x) = input.get(..lanes.saturating_mul(d_in)) else { return };
    let Some(y) = output.get_mut(..lanes.saturating_mul(d_out)) else { return };
    let shape = Shape { cols, skip, d_in };
    let mut x3 = x.chunks_exact(3 * d_in);
    let mut y3 = y.chunks_exact_mut(3 * d_out);
    for (x, y) in (&mut x3).zip(&mut y3) {
        let (x0, x) = x.split_at(d_in);
        let (x1, x2) = x.split_at(d_in);
        let (y0, y) = y.split_at_mut(d_out);
        let (y1, y2) = y.split_at_mut(d_out);
        lane_block::<3, false>(w, shape, [x0, x1, x2], [y0, y1, y2], rows4_lanes3);
    }
    // One or two lanes left: one at a time (a two-lane kernel would cost
    // flash for little; D + 1 = 3k + 2 lanes only).
    for (x, y) in x3.remainder().chunks_exact(d_in).zip(y3.into_remainder().chunks_exact_mut(d_out)) {
        lane_block::<1, false>(w, shape, [x], [y], rows4_lanes1);
    }
}

/// Where a row's used weights lie: `skip` unused columns, then `d_in`, in
/// rows of `cols`.
#[derive(Clone, Copy)]
struct Shape {
    cols: usize,
    skip: usize,
    d_in: usize,
}

/// `L` lanes through every row of `W`: [`ROWS`] rows at a time by `kernel`,
/// the rest one by one. With `ACC` every sum continues from the value in `y`
/// (a later pass over more columns), else it starts from zero.
#[inline(always)]
fn lane_block<const L: usize, const ACC: bool>(
    w: &[f32],
    shape: Shape,
    x: [&[f32]; L],
    y: [&mut [f32]; L],
    kernel: impl Fn([&[f32]; ROWS], [&[f32]; L], [[f32; L]; ROWS]) -> [[f32; L]; ROWS],
) {
    let Shape { cols, skip, d_in } = shape;
    let used = move |row| used_part(row, skip, d_in);
    let blocks = w.chunks_exact(ROWS * cols);
    let tail = blocks.remainder();
    let full = (w.len() - tail.len()) / cols;
    let [mut ys_full, mut ys_tail] = [[(); L].map(|_| &mut [][..]), [(); L].map(|_| &mut [][..])];
    for ((full_j, tail_j), y) in ys_full.iter_mut().zip(ys_tail.iter_mut()).zip(y) {
        (*full_j, *tail_j) = y.split_at_mut(full.min(y.len()));
    }
    for (b, block) in blocks.enumerate() {
        let mut rows = block.chunks_exact(cols).map(used);
        let r = [(); ROWS].map(|_| rows.next().unwrap_or(&[]));
        let mut init = [[0.0f32; L]; ROWS];
        if ACC {
            for (j, y) in ys_full.iter().enumerate() {
                for (i, now) in init.iter_mut().zip(y.get(b * ROWS..).unwrap_or(&[])) {
                    if let Some(v) = i.get_mut(j) {
                        *v = *now;
                    }
                }
            }
        }
        let acc = kernel(r, x, init);
        for (j, y) in ys_full.iter_mut().enumerate() {
            if let Some(out) = y.get_mut(b * ROWS..b * ROWS + ROWS) {
                for (o, a) in out.iter_mut().zip(&acc) {
                    *o = a.get(j).copied().unwrap_or(0.0);
                }
            }
        }
    }
    for (k, row) in tail.chunks_exact(cols).map(used).enumerate() {
        for (y, x) in ys_tail.iter_mut().zip(x) {
            if let Some(o) = y.get_mut(k) {
                let from = if ACC { *o } else { 0.0 };
                *o = row.iter().zip(x.iter()).fold(from, |acc, (w, x)| acc + w * x);
            }
        }
    }
}

/// The `d_in` weights of `row` after its `skip` unused ones.
#[inline(always)]
fn used_part(row: &[f32], skip: usize, d_in: usize) -> &[f32] {
    row.get(skip..skip.saturating_add(d_in)).unwrap_or(&[])
}

#[inline(always)]
fn rows4_lanes3(r: [&[f32]; ROWS], x: [&[f32]; 3], init: [[f32; 3]; ROWS]) -> [[f32; 3]; ROWS] {
    let [r0, r1, r2, r3] = r;
    let [x0, x1, x2] = x;
    let mut a = init;
    let weights = r0.iter().zip(r1).zip(r2.iter().zip(r3));
    let inputs = x0.iter().zip(x1).zip(x2);
    // Written out: at opt-level "s" (firmware) a loop over the rows here is
    // not unrolled and keeps the twelve sums in memory (measured: 5.8
    // instructions per FLOP instead of 3.5 on the 2-D model); unrolling two
    // columns per iteration cost more than it saved (3.6).
    for (((w0, w1), (w2, w3)), ((x0, x1), x2)) in weights.zip(inputs) {
        a[0][0] += w0 * x0;
        a[0][1] += w0 * x1;
        a[0][2] += w0 * x2;
        a[1][0] += w1 * x0;
        a[1][1] += w1 * x1;
        a[1][2] += w1 * x2;
        a[2][0] += w2 * x0;
        a[2][1] += w2 * x1;
        a[2][2] += w2 * x2;
        a[3][0] += w3 * x0;
        a[3][1] += w3 * x1;
        a[3][2] += w3 * x2;
    }
    a
}

#[inline(always)]
fn rows4_lanes1(r: [&[f32]; ROWS], x: [&[f32]; 1], init: [[f32; 1]; ROWS]) -> [[f32; 1]; ROWS] {
    let [r0, r1, r2, r3] = r;
    let [x] = x;
    let mut a = init;
    let weights = r0.iter().zip(r1).zip(r2.iter().zip(r3));
    for (((w0, w1), (w2, w3)), x) in weights.zip(x) {
        a[0][0] += w0 * x;
        a[1][0] += w1 * x;
        a[2][0] += w2 * x;
        a[3][0] += w3 * x;
    }
    a
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::format::Weights;

    /// Every block shape against a float64 reference, and the blocked path
    /// against the unaligned one bit for bit (same summation order).
    #[test]
    fn blocked_and_plain_paths_agree_for_every_shape() {
        // 40 inputs: the widening path's rows take two passes of 32 columns.
        for d_in in [1usize, 2, 5, 9, 40] {
            for d_out in [1usize, 2, 3, 4, 5, 9] {
                for lanes in 1usize..=7 {
                    for skip in [0usize, 1] {
                        let cols = d_in + skip;
                        let w: std::vec::Vec<f32> =
                            (0..d_out * cols).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.173).collect();
                        let x: std::vec::Vec<f32> =
                            (0..lanes * d_in).map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.311).collect();
                        let bytes: std::vec::Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
                        // One copy at offset 0 of an aligned buffer, one shifted by a byte.
                        let mut aligned = std::vec![0u32; w.len() + 1];
                        let aligned_bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut aligned);
                        aligned_bytes[..bytes.len()].copy_from_slice(&bytes);
                        let mut shifted = std::vec![0u8; bytes.len() + 1];
                        shifted[1..].copy_from_slice(&bytes);
                        let fast = Weights::new(&aligned_bytes[..bytes.len()]);
                        let slow = Weights::new(&shifted[1..]);
                        assert!(fast.as_f32().is_some() && slow.as_f32().is_none());
                        let dims = Dims { d_in, d_out, lanes };
                        let mut y_fast = std::vec![f32::NAN; lanes * d_out];
                        let mut y_slow = std::vec![f32::NAN; lanes * d_out];
                        matvec_lanes(Matrix::F32(fast), cols, skip, &x, &mut y_fast, dims);
                        matvec_lanes(Matrix::F32(slow), cols, skip, &x, &mut y_slow, dims);
                        for l in 0..lanes {
                            for o in 0..d_out {
                                let exact: f64 = (0..d_in)
                                    .map(|i| f64::from(w[o * cols + skip + i]) * f64::from(x[l * d_in + i]))
                                    .sum();
                                let (a, b) = (y_fast[l * d_out + o], y_slow[l * d_out + o]);
                                assert_eq!(a.to_bits(), b.to_bits(), "{d_in} {d_out} {lanes} {skip}");
                                assert!((f64::from(a) - exact).abs() <= 1e-5 * (1.0 + exact.abs()));
                            }
                        }
                        if cfg!(feature = "quantized") {
                            widened_equals_blocked_on_the_widened_values(&w, cols, skip, &x, dims);
                        }
                    }
                }
            }
        }
    }

    /// f16 and i8 matrices through the widening path give the bits of the
    /// blocked `f32` path on the values they stand for.
    fn widened_equals_blocked_on_the_widened_values(
        w: &[f32],
        cols: usize,
        skip: usize,
        x: &[f32],
        dims: Dims,
    ) {
        use crate::quant::{MatrixEncoding, f16_to_f32, f32_to_f16, i8_quantize, i8_scale};
        let d_out = dims.d_out;
        // f16: the halves, and the f32 values they stand for.
        let halves: std::vec::Vec<u8> = w.iter().flat_map(|&v| f32_to_f16(v).to_le_bytes()).collect();
        let w16: std::vec::Vec<f32> = w.iter().map(|&v| f16_to_f32(f32_to_f16(v))).collect();
        // i8: row scales (f32 words), then the bytes.
        let mut i8_bytes: std::vec::Vec<u8> = std::vec::Vec::new();
        let mut w8 = std::vec::Vec::new();
        let scales: std::vec::Vec<f32> = w.chunks(cols).map(i8_scale).collect();
        for s in &scales {
            i8_bytes.extend(s.to_le_bytes());
        }
        for (row, &s) in w.chunks(cols).zip(&scales) {
            for &v in row {
                let q = i8_quantize(v, s);
                i8_bytes.push(q as u8);
                w8.push(s * f32::from(q));
            }
        }
        for (encoding, bytes, values) in
            [(MatrixEncoding::F16, &halves, &w16), (MatrixEncoding::I8, &i8_bytes, &w8)]
        {
            let mut words = std::vec![0u32; bytes.len().div_ceil(4)];
            bytemuck::cast_slice_mut::<u32, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
            let m = Matrix::new(encoding, Weights::new(bytemuck::cast_slice(&words)), d_out, cols);
            let mut y_q = std::vec![f32::NAN; dims.lanes * d_out];
            let mut y_f = std::vec![f32::NAN; dims.lanes * d_out];
            widened(m, cols, skip, x, &mut y_q, dims);
            blocked(values, cols, skip, x, &mut y_f, dims);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<std::vec::Vec<_>>();
            assert_eq!(bits(&y_q), bits(&y_f), "{encoding:?} {dims:?} skip {skip}");
        }
    }
}
