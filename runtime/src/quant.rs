//! Smaller stored weights: how a CNF layer's matrix `W` is kept in the file
//! ([`MatrixEncoding`]), the conversions both sides use, and [`Matrix`], the
//! reader's view of one stored matrix. Everything is computed in `f32`: a
//! stored value is widened to the `f32` it stands for, then used exactly as a
//! weight of an `f32` file would be — so a quantized file scores to the bit
//! like the `f32` file that holds its dequantized weights (tested).

use serde::{Deserialize, Serialize};

use crate::format::Weights;

/// How a CNF stage stores its layers' matrices `W` (every other weight —
/// biases, gates, normalization, closed-form stages — stays `f32`). Since
/// format version 3 (FORMAT.md, "Matrix encodings").
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum MatrixEncoding {
    /// IEEE-754 `f32`, 4 bytes per weight.
    #[default]
    F32,
    /// IEEE-754 binary16, 2 bytes per weight (rounded to nearest, ties to even).
    F16,
    /// One `f32` scale per output row, then one signed byte per weight:
    /// `W[o][i] = s_o · q[o][i]` (evaluated in `f32`), `s_o = max_i |W[o][i]| / 127`.
    I8,
}

impl MatrixEncoding {
    /// Every encoding, smallest-to-largest reading aside, in declaration order.
    pub const ALL: [MatrixEncoding; 3] = [MatrixEncoding::F32, MatrixEncoding::F16, MatrixEncoding::I8];

    /// 4-byte words a `rows × cols` matrix occupies (the values, then zero
    /// bytes up to a whole word).
    pub fn matrix_words(self, rows: usize, cols: usize) -> Option<usize> {
        let n = rows.checked_mul(cols)?;
        // Without feature `quantized` only f32 matrices load; a constant
        // here keeps the layout arithmetic as small as before version 3.
        let encoding = if cfg!(feature = "quantized") { self } else { MatrixEncoding::F32 };
        match encoding {
            MatrixEncoding::F32 => Some(n),
            MatrixEncoding::F16 => Some(n.div_ceil(2)),
            MatrixEncoding::I8 => rows.checked_add(n.div_ceil(4)),
        }
    }

    /// The name used on the command line and in the JSON form (`f32`, `f16`, `i8`).
    pub fn name(self) -> &'static str {
        match self {
            MatrixEncoding::F32 => "f32",
            MatrixEncoding::F16 => "f16",
            MatrixEncoding::I8 => "i8",
        }
    }

    /// The encoding a [`MatrixEncoding::name`] names.
    pub fn from_name(name: &str) -> Option<Self> {
        MatrixEncoding::ALL.into_iter().find(|e| e.name() == name)
    }
}

/// The `f32` a binary16 value stands for (exact: every binary16 value is an `f32`).
#[inline]
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exponent = u32::from((h >> 10) & 0x1f);
    let mantissa = u32::from(h & 0x03ff);
    let magnitude = match exponent {
        // Zero and subnormals: mantissa · 2⁻²⁴, exact in f32.
        0 => (mantissa as f32 * (1.0 / 16_777_216.0)).to_bits(),
        // Infinities and NaNs (the loader rejects them).
        31 => 0x7f80_0000 | (mantissa << 13),
        // Rebias 15 → 127.
        e => ((e + 112) << 23) | (mantissa << 13),
    };
    f32::from_bits(sign | magnitude)
}

/// `x` rounded to the nearest binary16 (ties to even); overflow gives ±inf,
/// NaN a quiet NaN. The writer's side of [`MatrixEncoding::F16`].
pub fn f32_to_f16(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let abs = bits & 0x7fff_ffff;
    if abs >= 0x7f80_0000 {
        // inf stays inf; NaN stays NaN (quiet bit set).
        return sign | 0x7c00 | if abs > 0x7f80_0000 { 0x0200 } else { 0 };
    }
    let exponent = (abs >> 23) as i32 - 127;
    if exponent > 15 {
        return sign | 0x7c00;
    }
    // Bits of the f32 significand (with its implicit one) to drop: 13 for a
    // normal binary16, more below 2⁻¹⁴ where the result is subnormal.
    let significand = (abs & 0x007f_ffff) | 0x0080_0000;
    let shift = if exponent >= -14 { 13 } else { (-14 - exponent) as u32 + 13 };
    if shift > 24 {
        return sign; // below half the smallest subnormal: ±0
    }
    let half = 1u32 << (shift - 1);
    let kept = significand >> shift;
    let rest = significand & ((1u32 << shift) - 1);
    let rounded = if rest > half || (rest == half && kept & 1 == 1) { kept + 1 } else { kept };
    let h = if exponent >= -14 {
        // Normal: the implicit one in bit 10; a carry out of the significand
        // bumps the exponent (and 65520 and above rounds to inf), as it should.
        ((((exponent + 15) as u32) << 10) + (rounded - 0x400)) as u16
    } else {
        // Subnormal (a carry into bit 10 makes the smallest normal).
        rounded as u16
    };
    sign | h
}

/// The scale of one output row for [`MatrixEncoding::I8`]: `max |w| / 127`
/// (zero for a zero row).
pub fn i8_scale(row: &[f32]) -> f32 {
    row.iter().fold(0.0f32, |m, w| if w.abs() > m { w.abs() } else { m }) / 127.0
}

/// `w / scale` rounded to the nearest integer in −127..=127 (0 when `scale` is 0).
pub fn i8_quantize(w: f32, scale: f32) -> i8 {
    if scale == 0.0 {
        return 0;
    }
    let q = libm::roundf(w / scale);
    q.clamp(-127.0, 127.0) as i8
}

/// One stored matrix `W` (`rows × cols`, row-major), as the reader sees it.
#[derive(Clone, Copy, Debug)]
pub enum Matrix<'a> {
    /// `f32` values.
    F32(Weights<'a>),
    /// binary16 values, little-endian.
    F16(&'a [[u8; 2]]),
    /// Row scales and signed bytes.
    I8 {
        /// `s_o`, one per row.
        scales: Weights<'a>,
        /// `q`, row-major.
        values: &'a [u8],
        /// Row length.
        cols: usize,
    },
}

impl<'a> Matrix<'a> {
    /// Views `rows × cols` values stored as `encoding` at the start of `words`.
    pub fn new(encoding: MatrixEncoding, words: Weights<'a>, rows: usize, cols: usize) -> Self {
        let n = rows.saturating_mul(cols);
        // Without feature `quantized` the loader admits f32 matrices only;
        // the constant arm lets the compiler drop the widening code.
        let encoding = if cfg!(feature = "quantized") { encoding } else { MatrixEncoding::F32 };
        match encoding {
            MatrixEncoding::F32 => Matrix::F32(words.slice(0, n)),
            MatrixEncoding::F16 => {
                let halves = words.bytes().as_chunks::<2>().0;
                Matrix::F16(halves.get(..n).unwrap_or(&[]))
            }
            MatrixEncoding::I8 => {
                let (scales, rest) = words.split_at(rows);
                let values = rest.bytes();
                Matrix::I8 { scales, values: values.get(..n).unwrap_or(&[]), cols }
            }
        }
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        match *self {
            Matrix::F32(w) => w.len(),
            Matrix::F16(h) => h.len(),
            Matrix::I8 { values, .. } => values.len(),
        }
    }

    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values in row-major order, as `f32`.
    pub fn iter(&self) -> impl Iterator<Item = f32> + use<'a> {
        let m = *self;
        (0..m.len()).filter_map(move |i| m.get(i))
    }

    /// Value `i` in row-major order, as `f32`, if in range.
    #[inline]
    pub fn get(&self, i: usize) -> Option<f32> {
        match *self {
            Matrix::F32(w) => w.get(i),
            // (Never built without feature `quantized`: see `Matrix::new`.)
            Matrix::F16(h) if cfg!(feature = "quantized") => {
                h.get(i).map(|b| f16_to_f32(u16::from_le_bytes(*b)))
            }
            Matrix::I8 { scales, values, cols } if cfg!(feature = "quantized") => {
                let q = *values.get(i)?;
                Some(scales.get(i / cols.max(1))? * f32::from(q as i8))
            }
            Matrix::F16(_) | Matrix::I8 { .. } => None,
        }
    }
}

/// Values widened per pass by the kernels for f16 / i8 matrices (a stack
/// buffer of this many `f32`; a pass never crosses a row).
pub(crate) const WIDEN_CHUNK: usize = 32;

impl Matrix<'_> {
    /// Fills `out` with the values from row-major index `from` on, widened to
    /// `f32` (zero past the end). `out` must not run past the end of a row.
    #[inline]
    pub(crate) fn widen(&self, from: usize, out: &mut [f32]) {
        out.fill(0.0);
        match *self {
            Matrix::F32(w) => {
                let n = out.len();
                for (o, v) in out.iter_mut().zip(w.slice(from, n).iter()) {
                    *o = v;
                }
            }
            Matrix::F16(h) => {
                for (o, b) in out.iter_mut().zip(h.get(from..).unwrap_or(&[])) {
                    *o = f16_to_f32(u16::from_le_bytes(*b));
                }
            }
            Matrix::I8 { scales, values, cols } => {
                let s = scales.get(from / cols.max(1)).unwrap_or(0.0);
                for (o, &b) in out.iter_mut().zip(values.get(from..).unwrap_or(&[])) {
                    *o = s * f32::from(b as i8);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    /// binary16 by its definition, in float64.
    fn f16_reference(h: u16) -> f64 {
        let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
        let e = i32::from((h >> 10) & 0x1f);
        let m = f64::from(h & 0x3ff);
        match e {
            0 => sign * m * 2f64.powi(-24),
            31 if m == 0.0 => sign * f64::INFINITY,
            31 => f64::NAN,
            e => sign * (1.0 + m / 1024.0) * 2f64.powi(e - 15),
        }
    }

    #[test]
    fn every_binary16_widens_to_its_value() {
        for h in 0..=u16::MAX {
            let (got, want) = (f64::from(f16_to_f32(h)), f16_reference(h));
            assert!(got == want || (got.is_nan() && want.is_nan()), "{h:#06x}: {got} vs {want}");
            if want.is_finite() {
                // Rounding back is the identity on representable values.
                assert_eq!(f32_to_f16(f16_to_f32(h)), h, "{h:#06x}");
            }
        }
    }

    #[test]
    fn narrowing_rounds_to_the_nearest_binary16_ties_to_even() {
        // Against a float64 search over the two neighbours of every input.
        let mut finite: std::vec::Vec<(f64, u16)> = (0..0x7c00u16).map(|h| (f16_reference(h), h)).collect();
        finite.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut state = 0x1234_5678_9abc_def0u64;
        for i in 0..200_000u32 {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            // Magnitudes 2⁻³⁰ … 2¹⁷, plus exact midpoints every 16th draw.
            let mut x = f32::from_bits(0x3000_0000 + ((state >> 33) as u32 % 0x1100_0000));
            if i % 16 == 0 {
                let k = (state >> 20) as usize % (finite.len() - 1);
                x = ((finite[k].0 + finite[k + 1].0) / 2.0) as f32;
            }
            let got = f32_to_f16(x);
            let ax = f64::from(x);
            let above = finite.partition_point(|&(v, _)| v < ax);
            let want = if above == finite.len() {
                // Beyond 65504: inf once at or past the midpoint to 65536.
                if ax >= 65520.0 { 0x7c00 } else { 0x7bff }
            } else if finite[above].0 == ax {
                finite[above].1
            } else {
                let (lo, hi) = (finite[above - 1], finite[above]);
                let (dl, dh) = (ax - lo.0, hi.0 - ax);
                if dl < dh || (dl == dh && lo.1 & 1 == 0) { lo.1 } else { hi.1 }
            };
            assert_eq!(got, want, "{x:e}");
            assert_eq!(f32_to_f16(-x), want | 0x8000, "-{x:e}");
        }
        assert_eq!(f32_to_f16(f32::INFINITY), 0x7c00);
        assert_eq!(f32_to_f16(1e-9), 0);
        assert!(f16_to_f32(f32_to_f16(f32::NAN)).is_nan());
    }

    #[test]
    fn i8_rows_use_the_full_range_and_round_to_nearest() {
        let row = [0.5f32, -1.27, 0.004, 0.0];
        let s = i8_scale(&row);
        assert_eq!(s, 1.27 / 127.0);
        let q: std::vec::Vec<i8> = row.iter().map(|&w| i8_quantize(w, s)).collect();
        assert_eq!(q, [50, -127, 0, 0]);
        assert_eq!(i8_quantize(3.0, 0.0), 0);
        assert_eq!(i8_quantize(1e9, 1.0), 127);
        // Within half a step of the value.
        for &w in &row {
            assert!((s * f32::from(i8_quantize(w, s)) - w).abs() <= s / 2.0 * 1.0001);
        }
    }
}
