//! A validated, zero-copy view of a model file.

use crate::error::{LoadError, SolveError};
use crate::format::{
    CRC_LEN, FORMAT_VERSION, HeaderView, Layout, MAGIC, MAX_STAGES, MIN_FORMAT_VERSION, Metadata,
    PREAMBLE_LEN, Stage, Threshold, Weights, crc32,
};
use crate::net::CnfBlock;
use crate::quant::MatrixEncoding;
use crate::solver::Solver;

/// A model borrowed from its bytes (flash, `include_bytes!`, a browser upload).
///
/// Loading checks magic, version, CRC, every header field, the shapes against
/// the weight count, that every weight is finite and every scale non-zero —
/// so evaluation never meets malformed data.
#[derive(Clone, Debug)]
pub struct Model<'a> {
    header: HeaderView<'a>,
    layout: Layout,
    weights: Weights<'a>,
    /// log|det| of input standardization (`−Σ ln std`), 0 without it.
    standardize_log_det: f32,
    /// log|det| of each affine or linear stage (`Σ ln |scale|`, `Σ ln |L_ii|`),
    /// 0 for CNF stages.
    stage_log_dets: heapless::Vec<f32, MAX_STAGES>,
    /// The kernel density base and its centres, if the chain ends in one
    /// (otherwise the base is `N(0, I)`).
    #[cfg(feature = "kde")]
    kde: Option<(crate::format::KdeSpec, Weights<'a>)>,
}

/// One stage's weights, by kind ([`Model::stage_weights`]).
#[derive(Clone, Debug)]
pub enum StageWeights<'a> {
    /// `y = x ⊙ scale + shift`.
    Affine {
        /// `scale[D]`.
        scale: Weights<'a>,
        /// `shift[D]`.
        shift: Weights<'a>,
    },
    /// `y = L x + shift`, `L` lower-triangular.
    Linear {
        /// The lower triangle of `L` row by row (row `i` is the `i + 1`
        /// floats from `i(i+1)/2`).
        lower: Weights<'a>,
        /// `shift[D]`.
        shift: Weights<'a>,
    },
    /// A CNF block: its spec and layers ([`CnfBlock::layers`]).
    Cnf(CnfBlock<'a>),
    /// A stage without weights ([`Stage::Logit`], [`Stage::Squeeze`]).
    None,
    /// A convolutional CNF block's weights, layer after layer, each as
    /// [`crate::format::conv_weight_count`] counts them (FORMAT.md).
    ConvCnf(Weights<'a>),
    /// A kernel density base's centres, `n × D` row by row.
    KdeCentres(Weights<'a>),
}

/// Which way a stage maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Direction {
    /// Data side → latent side.
    Forward,
    /// Latent side → data side.
    Inverse,
}

fn truncated(len: usize, needed: usize) -> LoadError {
    LoadError::Truncated {
        len: len.min(u32::MAX as usize) as u32,
        needed: needed.min(u32::MAX as usize) as u32,
    }
}

impl<'a> Model<'a> {
    /// Decodes and validates a model file without copying its weights.
    pub fn from_bytes(bytes: &'a [u8]) -> Result<Self, LoadError> {
        let len = bytes.len();
        let (magic, rest) = bytes.split_first_chunk::<4>().ok_or(truncated(len, PREAMBLE_LEN + CRC_LEN))?;
        if *magic != MAGIC {
            return Err(LoadError::BadMagic);
        }
        let (version, _) = rest.split_first_chunk::<2>().ok_or(truncated(len, PREAMBLE_LEN + CRC_LEN))?;
        let version = u16::from_le_bytes(*version);
        if !(MIN_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(LoadError::UnsupportedVersion { found: version, supported: FORMAT_VERSION });
        }
        // A stage this build leaves out (f16 / i8 matrices without feature
        // `quantized`, image stages without `images`) is named when the
        // header is decoded.
        let (body, trailer) =
            bytes.split_last_chunk::<CRC_LEN>().ok_or(truncated(len, PREAMBLE_LEN + CRC_LEN))?;
        // The header is decoded once, before the CRC is checked (decoding is
        // bounds-checked on any bytes): when the CRC fails, a header that
        // decodes says how long the file must be, so a file cut short is
        // reported as truncated. One decode keeps the stack of a load small.
        let after_preamble = bytes.get(PREAMBLE_LEN..).ok_or(truncated(len, PREAMBLE_LEN + CRC_LEN))?;
        let decoded = HeaderView::decode(after_preamble, version);
        let stored = u32::from_le_bytes(*trailer);
        let computed = crc32(body);
        if stored != computed {
            if let Ok((_, layout, after)) = &decoded {
                let header_end = len - after.len();
                let needed = (header_end + (4 - header_end % 4) % 4)
                    .saturating_add(layout.word_count.saturating_mul(4))
                    .saturating_add(CRC_LEN);
                if len < needed {
                    return Err(truncated(len, needed));
                }
            }
            return Err(LoadError::ChecksumMismatch { stored, computed });
        }
        let (header, layout, after) = decoded?;
        if layout.min_version.max(header.score.min_version()) > version {
            return Err(LoadError::InvalidField(crate::error::Field::StageVersion));
        }
        // The header must end before the CRC trailer.
        let after_header =
            after.get(..after.len().saturating_sub(CRC_LEN)).filter(|_| after.len() >= CRC_LEN);
        let after_header = after_header.ok_or(truncated(len, len - after.len() + CRC_LEN))?;
        let header_end = body.len() - after_header.len();
        let pad = (4 - header_end % 4) % 4;
        let (padding, weight_bytes) =
            after_header.split_at_checked(pad).ok_or(truncated(len, header_end + pad + CRC_LEN))?;
        if padding.iter().any(|&b| b != 0) {
            return Err(LoadError::BadPadding);
        }
        if weight_bytes.len() != 4 * layout.word_count {
            return Err(LoadError::WeightCount {
                expected: layout.word_count as u32,
                found: (weight_bytes.len() / 4).min(u32::MAX as usize) as u32,
            });
        }
        let weights = Weights::new(weight_bytes);
        if let Some(index) = first_non_finite(&header, &layout, weights) {
            return Err(LoadError::NonFiniteWeight { index: index.min(u32::MAX as usize) as u32 });
        }
        let dim = usize::from(header.dim);
        // Σ ln |w| over the weights at these indices, none of which may be zero.
        let log_abs_sum = |indices: &mut dyn Iterator<Item = usize>| -> Result<f32, LoadError> {
            let mut sum = 0.0f32;
            for index in indices {
                let s = weights.get(index).unwrap_or(0.0);
                if s == 0.0 {
                    return Err(LoadError::ZeroScale { index: index as u32 });
                }
                sum += libm::logf(libm::fabsf(s));
            }
            Ok(sum)
        };
        let standardize_log_det = if header.standardize { -log_abs_sum(&mut (dim..2 * dim))? } else { 0.0 };
        let mut stage_log_dets = heapless::Vec::new();
        for (stage, &offset) in header.stages().zip(layout.stage_offsets.iter()) {
            let ld = match stage {
                Stage::Affine => log_abs_sum(&mut (offset..offset + dim))?,
                // The diagonal is the last entry of each row of the packed triangle.
                Stage::Linear => log_abs_sum(&mut (0..dim).map(|i| offset + i * (i + 1) / 2 + i))?,
                // (The logit's log-det depends on the row.)
                Stage::Cnf(_)
                | Stage::Logit { .. }
                | Stage::Squeeze(_)
                | Stage::ConvCnf(_)
                | Stage::KdeBase(_) => 0.0,
            };
            stage_log_dets.push(ld).map_err(|_| LoadError::MalformedHeader)?;
        }
        // A kernel density base is the last stage: its centres end the weights.
        // (Without feature `kde` a chain never has one: `validate`.)
        #[cfg(feature = "kde")]
        let kde = match (layout.kde_base, layout.stage_offsets.last()) {
            (Some(spec), Some(&offset)) => Some((spec, weights.slice(offset, layout.word_count - offset))),
            _ => None,
        };
        Ok(Model {
            header,
            layout,
            weights,
            standardize_log_det,
            stage_log_dets,
            #[cfg(feature = "kde")]
            kde,
        })
    }

    /// Data dimension `D`.
    pub fn dim(&self) -> usize {
        usize::from(self.header.dim)
    }

    /// The header (stages are decoded on demand: [`HeaderView::stage`]).
    pub fn header(&self) -> &HeaderView<'a> {
        &self.header
    }

    /// Provenance strings (borrowed from the file).
    pub fn metadata(&self) -> &Metadata<'a> {
        &self.header.metadata
    }

    /// The calibrated anomaly threshold, if any.
    pub fn threshold(&self) -> Option<Threshold> {
        self.header.threshold
    }

    /// The solver the model was exported with.
    pub fn default_solver(&self) -> Solver {
        self.header.solver
    }

    /// Number of parameters (network weights and normalization constants),
    /// however they are stored.
    pub fn weight_count(&self) -> usize {
        self.layout.value_count
    }

    /// Bytes of the weight section (4 per `f32` parameter; fewer when CNF
    /// matrices are stored as f16 or i8).
    pub fn weight_bytes(&self) -> usize {
        self.layout.word_count.saturating_mul(4)
    }

    /// Number of stages in the chain.
    pub fn stage_count(&self) -> usize {
        self.header.stage_count()
    }

    /// Floats of scratch that evaluating this model with `solver` needs.
    pub fn scratch_len(&self, solver: &Solver) -> usize {
        let n = self.dim() + 1;
        // (With all lanes in one pass a conv block needs more than the dense
        // net's D + 1 lanes of D values, so the maximum needs no flag.)
        let dense = crate::net::net_work_len(self.layout.max_width, self.layout.max_gates, n);
        n.saturating_add(solver.work_len(n)).saturating_add(dense.max(self.layout.image_work))
    }

    /// [`Model::scratch_len`] when convolutional CNF stages compute their
    /// trace as `trace` says ([`crate::Flow::with_image_trace`]).
    pub fn scratch_len_with(&self, solver: &Solver, trace: crate::ImageTrace) -> usize {
        // (Image stages only load with feature `images`.) Every call of the
        // row path asks, so a dense model decodes no stage here.
        if !(cfg!(feature = "images") && self.has_image_stages()) || trace == crate::ImageTrace::default() {
            return self.scratch_len(solver);
        }
        let n = self.dim() + 1;
        let mut image = 0usize;
        // A chain of image stages alone needs no dense net's scratch (which
        // would be D + 1 lanes of D values: more than bounded passes save).
        let dense = if self.layout.dense_cnf {
            crate::net::net_work_len(self.layout.max_width, self.layout.max_gates, n)
        } else {
            0
        };
        for (_, stage) in self.stages() {
            let work = match stage {
                Stage::Squeeze(shape) => shape.len(),
                Stage::ConvCnf(spec) => crate::image::conv_work_len(&spec, trace).unwrap_or(usize::MAX),
                _ => 0,
            };
            image = image.max(work);
        }
        n.saturating_add(solver.work_len(n)).saturating_add(dense.max(image))
    }

    /// Whether the chain has image stages (format version 4), which only the
    /// one-row path evaluates.
    pub fn has_image_stages(&self) -> bool {
        self.layout.image_work > 0
    }

    /// Network FLOPs (multiply-adds counted as 2) of one function evaluation
    /// with the exact divergence (`D + 1` lanes). An evaluation is of one
    /// CNF stage, and NFE counts them over all stages, so this is the mean
    /// over the CNF stages: FLOPs = this × NFE, exactly when the stages have
    /// one size or take equal NFE (fixed steps). (Until 2026-12-03 it was
    /// the sum, which counted a two-stage model's FLOPs twice.) Activations
    /// and gates are not counted. A convolutional block counts its 3×3
    /// products on all `C·H·W + 1` lanes in one pass (bounded passes,
    /// [`crate::ImageTrace::Exact`], recompute the value lane once per pass).
    pub fn flops_per_evaluation(&self) -> u64 {
        let lanes = self.dim() as u64 + 1;
        let (mut flops, mut stages) = (0u64, 0u64);
        for stage in self.header.stages() {
            if let Stage::Cnf(cnf) = &stage {
                stages += 1;
                let mut d_in = self.dim() as u64;
                for layer in &cnf.layers {
                    let d_out = u64::from(layer.out_dim);
                    flops += 2 * d_in * d_out * lanes;
                    d_in = d_out;
                }
            }
            // A conv block: 9 multiply-adds per input channel, output channel
            // and pixel, on its C·H·W + 1 lanes (one pass; the time channel
            // of a concat layer, on the value lane only, is not counted).
            if let Stage::ConvCnf(conv) = stage {
                stages += 1;
                let pixels = conv.shape.pixels() as u64;
                let lanes = conv.shape.len() as u64 + 1;
                let mut c_in = u64::from(conv.shape.channels);
                for layer in &conv.layers {
                    let c_out = u64::from(layer.out_dim);
                    flops += 2 * 9 * c_in * c_out * pixels * lanes;
                    c_in = c_out;
                }
            }
        }
        flops / stages.max(1)
    }

    /// The `i`-th stage as CNF dynamics, if it is a CNF stage.
    pub fn cnf_block(&self, i: usize) -> Option<CnfBlock<'a>> {
        match self.header.stage(i)? {
            Stage::Cnf(spec) => {
                let offset = *self.layout.stage_offsets.get(i)?;
                let next = self.layout.stage_offsets.get(i + 1).copied().unwrap_or(self.layout.word_count);
                let w = self.weights.slice(offset, next - offset);
                Some(CnfBlock::new(spec, w, self.dim(), self.layout.max_width))
            }
            Stage::Affine
            | Stage::Linear
            | Stage::Logit { .. }
            | Stage::Squeeze(_)
            | Stage::ConvCnf(_)
            | Stage::KdeBase(_) => None,
        }
    }

    /// The `i`-th stage as convolutional CNF dynamics, if it is one.
    pub(crate) fn conv_block(
        &self,
        i: usize,
        trace: crate::ImageTrace,
    ) -> Option<crate::image::ConvCnfBlock<'a>> {
        match self.header.stage(i)? {
            Stage::ConvCnf(spec) => {
                let offset = *self.layout.stage_offsets.get(i)?;
                let next = self.layout.stage_offsets.get(i + 1).copied().unwrap_or(self.layout.word_count);
                let w = self.weights.slice(offset, next - offset);
                Some(crate::image::ConvCnfBlock::new(spec, w, trace))
            }
            _ => None,
        }
    }

    /// Widest layer output over all CNF stages.
    pub(crate) fn max_width(&self) -> usize {
        self.layout.max_width
    }

    pub(crate) fn stages(&self) -> impl DoubleEndedIterator<Item = (usize, Stage)> + '_ {
        (0..self.header.stage_count()).filter_map(|i| self.header.stage(i).map(|s| (i, s)))
    }

    /// Stage `i`'s weights by kind, as FORMAT.md lays them out.
    pub fn stage_weights(&self, i: usize) -> Option<StageWeights<'a>> {
        let d = self.dim();
        let offset = *self.layout.stage_offsets.get(i)?;
        Some(match self.header.stage(i)? {
            Stage::Affine => StageWeights::Affine {
                scale: self.weights.slice(offset, d),
                shift: self.weights.slice(offset + d, d),
            },
            Stage::Linear => {
                let triangle = crate::format::linear_weight_count(d)? - d;
                StageWeights::Linear {
                    lower: self.weights.slice(offset, triangle),
                    shift: self.weights.slice(offset + triangle, d),
                }
            }
            Stage::Cnf(_) => StageWeights::Cnf(self.cnf_block(i)?),
            Stage::Logit { .. } | Stage::Squeeze(_) => StageWeights::None,
            Stage::ConvCnf(_) => {
                let next = self.layout.stage_offsets.get(i + 1).copied().unwrap_or(self.layout.word_count);
                StageWeights::ConvCnf(self.weights.slice(offset, next - offset))
            }
            Stage::KdeBase(_) => {
                StageWeights::KdeCentres(self.weights.slice(offset, self.layout.word_count - offset))
            }
        })
    }

    /// The kernel density base ([`Stage::KdeBase`]), if the chain ends in
    /// one; otherwise the base is `N(0, I)`.
    pub fn kde_base(&self) -> Option<crate::format::KdeSpec> {
        self.layout.kde_base
    }

    /// What the model's anomaly score is (`−log p` unless the file says otherwise).
    pub fn score_kind(&self) -> crate::ScoreKind {
        self.header.score
    }

    /// `log p(z)` of a latent point under the base density and `log N(z; 0, I)`
    /// (one value twice when the base is `N(0, I)`).
    pub(crate) fn latent_log_probs(&self, z: &[f32]) -> (f32, f32) {
        let base = self.base_log_prob(z);
        (base, if self.kde_base().is_some() { crate::math::standard_normal_log_prob(z) } else { base })
    }

    /// The model's anomaly score ([`Model::score_kind`]) of a row that the
    /// chain maps to `z` with the summed log-determinant `log_det`.
    pub(crate) fn score_of(&self, z: &[f32], log_det: f32) -> f32 {
        match self.score_kind() {
            crate::ScoreKind::NegLogDensity => -(self.base_log_prob(z) + log_det),
            crate::ScoreKind::LatentRadius => -crate::math::standard_normal_log_prob(z),
            crate::ScoreKind::LatentBase => -self.base_log_prob(z),
        }
    }

    /// `log p(z)` of a latent point under the model's base density: `N(0, I)`
    /// or its kernel density estimate.
    pub fn base_log_prob(&self, z: &[f32]) -> f32 {
        #[cfg(feature = "kde")]
        if let Some((spec, centres)) = self.kde {
            return crate::base::kde_log_prob(spec, centres, z);
        }
        crate::math::standard_normal_log_prob(z)
    }

    /// Draws a latent point from the base density into `out` (length `D`).
    pub(crate) fn sample_base<R: rand_core::Rng + ?Sized>(&self, rng: &mut R, out: &mut [f32]) {
        #[cfg(feature = "kde")]
        if let Some((spec, centres)) = self.kde {
            return crate::base::kde_sample(spec, centres, rng, out);
        }
        crate::base::fill_standard_normal(rng, out)
    }

    /// `(mean, std)` of input standardization, if the model has it.
    pub fn standardization(&self) -> Option<(Weights<'a>, Weights<'a>)> {
        let d = self.dim();
        self.header.standardize.then(|| (self.weights.slice(0, d), self.weights.slice(d, d)))
    }

    pub(crate) fn standardize_log_det(&self) -> f32 {
        self.standardize_log_det
    }

    /// Applies stage `i` (`stage`, as decoded from the header) in place to `z`
    /// (length `D`) if it is a closed-form map (affine or linear), in
    /// `direction`, and returns its log|det ∂y/∂x| (the same value both ways);
    /// `None` for a CNF stage.
    pub(crate) fn apply_map(
        &self,
        i: usize,
        stage: &Stage,
        z: &mut [f32],
        direction: Direction,
    ) -> Option<f32> {
        let d = self.dim();
        let offset = *self.layout.stage_offsets.get(i)?;
        let log_det = *self.stage_log_dets.get(i)?;
        match stage {
            Stage::Cnf(_)
            | Stage::Logit { .. }
            | Stage::Squeeze(_)
            | Stage::ConvCnf(_)
            | Stage::KdeBase(_) => {
                return None;
            }
            Stage::Affine => {
                let (scale, shift) = (self.weights.slice(offset, d), self.weights.slice(offset + d, d));
                for ((v, a), b) in z.iter_mut().zip(scale.iter()).zip(shift.iter()) {
                    *v = match direction {
                        Direction::Forward => *v * a + b,
                        Direction::Inverse => (*v - b) / a,
                    };
                }
            }
            Stage::Linear => {
                let triangle = crate::format::linear_weight_count(d)? - d;
                let shift = self.weights.slice(offset + triangle, d);
                let lower = self.weights.slice(offset, triangle);
                let row = |i: usize| crate::format::lower_triangle_row(lower, i);
                match direction {
                    // y_i = Σ_{j≤i} L_ij x_j + b_i, last row first, so every
                    // row reads inputs not yet overwritten.
                    Direction::Forward => {
                        for i in (0..d.min(z.len())).rev() {
                            let y = row(i).dot(z) + shift.get(i).unwrap_or(0.0);
                            if let Some(v) = z.get_mut(i) {
                                *v = y;
                            }
                        }
                    }
                    // Forward substitution: x_i = (y_i − b_i − Σ_{j<i} L_ij x_j) / L_ii.
                    Direction::Inverse => {
                        for i in 0..d.min(z.len()) {
                            let (l, diag) = row(i).split_at(i);
                            let (solved, rest) = z.split_at_mut(i);
                            if let Some(v) = rest.first_mut() {
                                *v = (*v - shift.get(i).unwrap_or(0.0) - l.dot(solved))
                                    / diag.get(0).unwrap_or(1.0);
                            }
                        }
                    }
                }
            }
        }
        Some(log_det)
    }

    /// Checks an input row's length and values.
    pub(crate) fn check_input(&self, x: &[f32]) -> Result<(), SolveError> {
        if x.len() != self.dim() {
            return Err(SolveError::InputDimension { expected: self.dim() as u32, found: x.len() as u32 });
        }
        crate::math::check_finite(x).map_err(|i| SolveError::NonFiniteInput { index: i as u32 })
    }
}

/// The word index of the first NaN or infinite weight, if any: every word is
/// an `f32` except in CNF matrices stored as f16 (each half is checked) or
/// i8 (the row scales are checked; bytes are always finite).
fn first_non_finite(header: &HeaderView<'_>, layout: &Layout, weights: Weights<'_>) -> Option<usize> {
    if !cfg!(feature = "quantized") {
        // Every word is an f32.
        return weights.iter().position(|w| !w.is_finite());
    }
    let f32_words = |start: usize, n: usize| {
        weights.slice(start, n).iter().position(|w| !w.is_finite()).map(|i| start + i)
    };
    let mut checked = 0; // words before this are checked
    for (stage, &offset) in header.stages().zip(layout.stage_offsets.iter()) {
        if let Some(i) = f32_words(checked, offset - checked) {
            return Some(i);
        }
        checked = offset;
        let Stage::Cnf(spec) = stage else { continue };
        if spec.matrices == MatrixEncoding::F32 || !cfg!(feature = "quantized") {
            continue;
        }
        let mut d_in = usize::from(header.dim);
        for layer in &spec.layers {
            let d_out = usize::from(layer.out_dim);
            let cols = layer.kind.cols(d_in).unwrap_or(0);
            let matrix_words = spec.matrices.matrix_words(d_out, cols).unwrap_or(0);
            let words = layer.kind.word_count(d_in, d_out, spec.matrices).unwrap_or(0);
            let bad = match spec.matrices {
                // Exponent 31: infinity or NaN.
                MatrixEncoding::F16 => {
                    let halves = weights.slice(checked, matrix_words).bytes().as_chunks::<2>().0;
                    let mut values = halves.iter().take(d_out.saturating_mul(cols));
                    values.position(|b| u16::from_le_bytes(*b) & 0x7c00 == 0x7c00).map(|i| checked + i / 2)
                }
                MatrixEncoding::I8 => f32_words(checked, d_out),
                MatrixEncoding::F32 => f32_words(checked, matrix_words),
            };
            if bad.is_some() {
                return bad;
            }
            if let Some(i) = f32_words(checked + matrix_words, words - matrix_words) {
                return Some(i);
            }
            checked += words;
            d_in = d_out;
        }
    }
    f32_words(checked, layout.word_count.saturating_sub(checked))
}
