//! The writer side of the weight layout: the parts of a layer or stage, as a
//! trainer or importer holds them, put in file order. The reader side is
//! [`crate::LayerWeights`] and [`crate::StageWeights`]; FORMAT.md is the
//! specification both follow. Nothing here allocates: a writer gets an
//! iterator of floats to append wherever it keeps them.

use core::fmt;

use crate::format::LayerKind;

/// A part whose length is not what its layer or stage needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartError {
    /// The part's name as FORMAT.md and the JSON form call it
    /// (`weight`, `bias`, `gate_weight`, `gate_bias`, `hyper_bias`, `scale`,
    /// `shift`, `lower`).
    pub part: &'static str,
    /// The length the layout needs.
    pub expected: usize,
    /// The length given.
    pub found: usize,
}

impl fmt::Display for PartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} values, expected {}", self.part, self.found, self.expected)
    }
}

impl core::error::Error for PartError {}

fn check(part: &'static str, values: &[f32], expected: usize) -> Result<(), PartError> {
    if values.len() == expected { Ok(()) } else { Err(PartError { part, expected, found: values.len() }) }
}

/// One ODE-net layer's parts. `matrix` is row-major `[d_out, cols]` with
/// `cols = d_in + 1` for [`LayerKind::Concat`] (time first) and `d_in`
/// otherwise; the three gate vectors are for [`LayerKind::ConcatSquash`]
/// only and empty otherwise.
#[derive(Clone, Copy, Debug, Default)]
pub struct LayerParts<'a> {
    /// `W`.
    pub matrix: &'a [f32],
    /// `b[d_out]`.
    pub bias: &'a [f32],
    /// `w_g[d_out]` (concatsquash).
    pub gate_w: &'a [f32],
    /// `b_g[d_out]` (concatsquash).
    pub gate_b: &'a [f32],
    /// `w_b[d_out]` (concatsquash).
    pub hyper_b: &'a [f32],
}

impl<'a> LayerParts<'a> {
    /// The layer's floats in file order, after checking every part's length
    /// for a `kind` layer mapping `d_in` to `d_out` values (the first part
    /// that does not fit is named). Together they are exactly
    /// [`LayerKind::weight_count`] floats.
    pub fn floats(
        &self,
        kind: LayerKind,
        d_in: usize,
        d_out: usize,
    ) -> Result<impl Iterator<Item = f32> + 'a, PartError> {
        let cols = if kind == LayerKind::Concat { d_in.saturating_add(1) } else { d_in };
        check("weight", self.matrix, d_out.saturating_mul(cols))?;
        check("bias", self.bias, d_out)?;
        let gates = if kind == LayerKind::ConcatSquash { d_out } else { 0 };
        check("gate_weight", self.gate_w, gates)?;
        check("gate_bias", self.gate_b, gates)?;
        check("hyper_bias", self.hyper_b, gates)?;
        let order = [self.matrix, self.bias, self.gate_w, self.gate_b, self.hyper_b];
        Ok(order.into_iter().flat_map(|part| part.iter().copied()))
    }
}

/// A closed-form stage's (or the input standardization's) parts.
#[derive(Clone, Copy, Debug)]
pub enum StageParts<'a> {
    /// [`crate::Stage::Affine`]: `scale[D]`, `shift[D]`. Input
    /// standardization has the same layout with `mean` for `scale` and `std`
    /// for `shift`.
    Affine {
        /// `scale[D]` (or the standardization's mean).
        scale: &'a [f32],
        /// `shift[D]` (or the standardization's std).
        shift: &'a [f32],
    },
    /// [`crate::Stage::Linear`] from a dense row-major `L[D×D]` (only its
    /// lower triangle is stored) and `shift[D]`.
    Linear {
        /// `L`, row-major `D×D`.
        dense: &'a [f32],
        /// `b[D]`.
        shift: &'a [f32],
    },
}

impl<'a> StageParts<'a> {
    /// The stage's floats in file order for dimension `dim`, after checking
    /// every part's length.
    pub fn floats(&self, dim: usize) -> Result<impl Iterator<Item = f32> + 'a, PartError> {
        let (first, triangle, shift): (&'a [f32], bool, &'a [f32]) = match *self {
            StageParts::Affine { scale, shift } => {
                check("scale", scale, dim)?;
                (scale, false, shift)
            }
            StageParts::Linear { dense, shift } => {
                check("lower", dense, dim.saturating_mul(dim))?;
                (dense, true, shift)
            }
        };
        check("shift", shift, dim)?;
        let width = dim.max(1);
        let head = first.chunks(width).enumerate().flat_map(move |(r, row)| {
            // The Linear stage keeps row r up to its diagonal (FORMAT.md).
            let keep = if triangle { r + 1 } else { row.len() };
            row.iter().take(keep).copied()
        });
        Ok(head.chain(shift.iter().copied()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{Weights, lower_triangle_row};
    use crate::net::LayerWeights;

    fn bytes(v: &[f32]) -> [u8; 64] {
        let mut b = [0u8; 64];
        for (chunk, x) in b.chunks_exact_mut(4).zip(v) {
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        b
    }

    /// What the writer lays out, the reader splits back into the same parts.
    #[test]
    fn writer_and_reader_agree_on_every_layer_kind() {
        let matrix: [f32; 6] = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let gates: [f32; 2] = [7.0, 8.0];
        for (kind, d_in, squash) in
            [(LayerKind::Ignore, 3, false), (LayerKind::Concat, 2, false), (LayerKind::ConcatSquash, 3, true)]
        {
            let g: &[f32] = if squash { &gates } else { &[] };
            let parts = LayerParts { matrix: &matrix, bias: &[9.0, 10.0], gate_w: g, gate_b: g, hyper_b: g };
            let mut flat = [0f32; 16];
            let mut n = 0;
            for (slot, x) in flat.iter_mut().zip(parts.floats(kind, d_in, 2).unwrap()) {
                *slot = x;
                n += 1;
            }
            assert_eq!(Some(n), kind.weight_count(d_in, 2));
            let b = bytes(&flat[..n]);
            let read =
                LayerWeights::split(kind, crate::MatrixEncoding::F32, Weights::new(&b[..4 * n]), d_in, 2);
            assert!(read.matrix.iter().eq(matrix.iter().copied()));
            assert!(read.bias.iter().eq([9.0, 10.0]));
            assert!(read.gate_w.iter().eq(g.iter().copied()));
            assert!(read.hyper_b.iter().eq(g.iter().copied()));
        }
    }

    #[test]
    fn a_part_of_the_wrong_length_is_named() {
        let parts = LayerParts { matrix: &[0.0; 6], bias: &[0.0; 2], ..Default::default() };
        let err = parts.floats(LayerKind::ConcatSquash, 3, 2).err().unwrap();
        assert_eq!(err, PartError { part: "gate_weight", expected: 2, found: 0 });
        let err = parts.floats(LayerKind::Concat, 3, 2).err().unwrap();
        assert_eq!(err, PartError { part: "weight", expected: 8, found: 6 });
        let err = StageParts::Affine { scale: &[1.0], shift: &[0.0] }.floats(2).err().unwrap();
        assert_eq!(err.part, "scale");
    }

    #[test]
    fn a_linear_stage_keeps_the_lower_triangle_row_by_row() {
        let dense = [1.0, 0.0, 0.0, 2.0, 3.0, 0.0, 4.0, 5.0, 6.0];
        let mut flat = [0f32; 9];
        let mut n = 0;
        for (slot, x) in flat
            .iter_mut()
            .zip(StageParts::Linear { dense: &dense, shift: &[7.0, 8.0, 9.0] }.floats(3).unwrap())
        {
            *slot = x;
            n += 1;
        }
        assert_eq!(Some(n), crate::format::linear_weight_count(3));
        let b = bytes(&flat[..n]);
        let lower = Weights::new(&b[..4 * 6]);
        assert!(lower_triangle_row(lower, 1).iter().eq([2.0, 3.0]));
        assert!(lower_triangle_row(lower, 2).iter().eq([4.0, 5.0, 6.0]));
        assert_eq!(&flat[6..9], &[7.0, 8.0, 9.0]);
    }
}
