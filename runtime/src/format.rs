//! The model file format, defined once: the trainer writes files with these
//! types and [`encode`], the runtime reads them with [`crate::Model::from_bytes`].
//! `runtime/FORMAT.md` specifies the bytes for readers in other languages.
//!
//! ```text
//! MAGIC "FFJD" | FORMAT_VERSION u16 LE | postcard(Header) | zero padding to a
//! multiple of 4 | weights: 4-byte words (f32 LE; a CNF stage's matrices may be
//! f16 or i8, crate::quant) | CRC-32/ISO-HDLC (u32 LE) of all bytes before it
//! ```

use serde::{Deserialize, Serialize};

use crate::error::{Field, LoadError};
use crate::quant::{MatrixEncoding, f32_to_f16, i8_quantize, i8_scale};
use crate::solver::Solver;

/// The first four bytes of every model file.
pub const MAGIC: [u8; 4] = *b"FFJD";
/// The newest format version this runtime reads and writes. Version 2 added
/// the [`Stage::Linear`] stage, version 3 CNF stages whose matrices are
/// stored as f16 or i8 ([`CnfSpec::matrices`]), version 4 the image stages
/// ([`Stage::Logit`], [`Stage::Squeeze`], [`Stage::ConvCnf`]), version 5
/// the kernel density base ([`Stage::KdeBase`]), version 6 the anomaly
/// score's kind ([`Header::score`], a field after the metadata), version 7
/// the score kind [`ScoreKind::LatentBase`]; [`encode`]
/// writes the oldest version that can hold a header ([`Header::version`]),
/// so files without them keep their old version.
pub const FORMAT_VERSION: u16 = 7;
/// The first format version whose header ends with [`Header::score`].
pub const SCORE_KIND_VERSION: u16 = 6;
/// The first format version that can hold [`ScoreKind::LatentBase`].
pub const LATENT_BASE_VERSION: u16 = 7;
/// The oldest format version this runtime reads.
pub const MIN_FORMAT_VERSION: u16 = 1;
/// Most stages (CNF blocks and affine layers) in one chain: room for ten
/// blocks with batch norm around each (FFJORD's HEPMASS model has 21).
pub const MAX_STAGES: usize = 32;
/// Most centres of a [`Stage::KdeBase`]: its log-density costs one distance
/// per centre, so this bounds the work of one call (65,536 centres of a
/// 9-dimensional model are 1.8 M FLOPs).
pub const MAX_KDE_CENTRES: u32 = 65_536;
/// Most layers in one CNF's ODE net (so at most `MAX_LAYERS - 1` hidden layers).
pub const MAX_LAYERS: usize = 8;
/// Bytes before the postcard header.
pub const PREAMBLE_LEN: usize = 6;
/// Bytes of the CRC trailer.
pub const CRC_LEN: usize = 4;

const CRC32: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);

/// CRC-32/ISO-HDLC (the zlib/PNG CRC) of `bytes`.
pub fn crc32(bytes: &[u8]) -> u32 {
    CRC32.checksum(bytes)
}

/// How a layer of the ODE net sees time `t` (FFJORD's "diffeq layers").
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    /// `W x + b`; `t` unused. Weights: `W[out×in]`, `b[out]`.
    Ignore,
    /// `W [t; x] + b` with `t` prepended as input 0. Weights: `W[out×(in+1)]`, `b[out]`.
    Concat,
    /// `(W x + b) ⊙ σ(w_g t + b_g) + w_b t`. Weights: `W[out×in]`, `b[out]`,
    /// `w_g[out]`, `b_g[out]`, `w_b[out]`.
    ConcatSquash,
}

impl LayerKind {
    /// Number of `f32` weights of a layer mapping `d_in` to `d_out` values.
    pub fn weight_count(self, d_in: usize, d_out: usize) -> Option<usize> {
        let matrix = match self {
            LayerKind::Concat => d_out.checked_mul(d_in.checked_add(1)?)?,
            LayerKind::Ignore | LayerKind::ConcatSquash => d_out.checked_mul(d_in)?,
        };
        let vectors = match self {
            LayerKind::ConcatSquash => 4,
            LayerKind::Ignore | LayerKind::Concat => 1,
        };
        matrix.checked_add(d_out.checked_mul(vectors)?)
    }

    /// Number of 4-byte words the layer occupies in the file when its matrix
    /// is stored as `matrices` (equal to [`LayerKind::weight_count`] for `f32`).
    pub fn word_count(self, d_in: usize, d_out: usize, matrices: MatrixEncoding) -> Option<usize> {
        let cols = self.cols(d_in)?;
        let vectors = self.weight_count(d_in, d_out)?.checked_sub(d_out.checked_mul(cols)?)?;
        matrices.matrix_words(d_out, cols)?.checked_add(vectors)
    }

    /// Columns of the layer's matrix: `d_in + 1` for [`LayerKind::Concat`] (time first).
    pub fn cols(self, d_in: usize) -> Option<usize> {
        match self {
            LayerKind::Concat => d_in.checked_add(1),
            LayerKind::Ignore | LayerKind::ConcatSquash => Some(d_in),
        }
    }
}

/// Activation applied after every layer of the ODE net except the last.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    /// `x`.
    Identity,
    /// `tanh x`.
    Tanh,
    /// `log(1 + eˣ)` (PyTorch's β = 1, threshold 20).
    Softplus,
    /// `x` for `x > 0`, `eˣ − 1` otherwise.
    Elu,
    /// `x σ(β x)`.
    Swish {
        /// The (trained) β.
        beta: f32,
    },
}

/// One layer of an ODE net: how it conditions on time and its output width.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerSpec {
    /// Time conditioning.
    pub kind: LayerKind,
    /// Output width; the last layer's must equal the data dimension.
    pub out_dim: u16,
}

/// One CNF block: `dz/dt = f(t, z)` integrated over `[0, end_time]`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct CnfSpec {
    /// The ODE net's layers, input to output.
    pub layers: heapless::Vec<LayerSpec, MAX_LAYERS>,
    /// Activation between layers.
    pub activation: Activation,
    /// End time `T` (`sqrt_end_time²` in the reference code).
    pub end_time: f32,
    /// How the layers' matrices are stored. Not part of this struct's
    /// encoding: a stage with `f32` matrices is written as
    /// [`Stage::Cnf`]'s wire form of versions 1–2, any other as a version-3
    /// variant that carries the encoding (FORMAT.md).
    #[serde(skip)]
    pub matrices: MatrixEncoding,
}

impl CnfSpec {
    /// Units whose output is gated by `σ(w_g t + b_g)` (the outputs of
    /// concatsquash layers).
    pub fn gate_count(&self) -> usize {
        let gated = self.layers.iter().filter(|l| l.kind == LayerKind::ConcatSquash);
        gated.map(|l| usize::from(l.out_dim)).sum()
    }
}

/// One stage of the chain, applied in order from data to latent.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(from = "WireStage", into = "WireStage")]
pub enum Stage {
    /// A continuous normalizing flow block.
    Cnf(CnfSpec),
    /// `y = x ⊙ scale + shift`: the inference form of moving batch norm.
    /// Weights: `scale[dim]`, `shift[dim]`.
    Affine,
    /// `y = L x + b` with `L` lower-triangular (every diagonal entry non-zero),
    /// e.g. whitening by a covariance's Cholesky factor. Weights: the lower
    /// triangle of `L` row by row (`D(D+1)/2` floats: row `i` holds
    /// `L[i][0..=i]`), then `b[dim]`. Since format version 2.
    Linear,
    /// `y = logit(α + (1 − 2α) x)` on every coordinate, for pixels scaled
    /// to `[0, 1]`; inputs outside `[0, 1]` are refused. No weights. Since
    /// format version 4.
    Logit {
        /// The squeeze towards the open interval that keeps the logit finite
        /// (FFJORD: 1e-6), in `(0, 0.5)`.
        alpha: f32,
    },
    /// Squeeze of the first `C·H·W` coordinates, read as a `[C, H, W]`
    /// image, to `[4C, H/2, W/2]` (channel `4c + 2dy + dx` takes pixel
    /// `(2h + dy, 2w + dx)` of channel `c`); the rest of the row passes
    /// through. A permutation: log-det 0. No weights. Since version 4.
    Squeeze(ImageShape),
    /// A CNF block whose ODE net is FFJORD's convolutional one, on the first
    /// `C·H·W` coordinates read as an image (the rest — what earlier scales
    /// factored out — pass through). Since format version 4.
    ConvCnf(ConvCnfSpec),
    /// Not a map: the base density at the end of the chain in place of
    /// `N(0, I)`, a Gaussian kernel density estimate over `n` centres (latent
    /// points of training rows) mixed with `N(0, I)` by weight `w`:
    /// `p(z) = (1 − w)/n Σ_i N(z; c_i, h² I) + w N(z; 0, I)` (the normal part
    /// keeps points far from every centre from scoring as far as the kernels
    /// alone would send them). Only as the last stage. Weights: the centres,
    /// `n × D` floats row by row. Since format version 5.
    KdeBase(KdeSpec),
}

/// A [`Stage::KdeBase`]: how many centres, the kernel's width and the
/// weight of the standard normal.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct KdeSpec {
    /// Number of centres `n`, in `1..=MAX_KDE_CENTRES`.
    pub centres: u32,
    /// The kernel's standard deviation `h` in latent units, finite and
    /// positive.
    pub bandwidth: f32,
    /// The weight `w` of `N(0, I)` in the mixture, in `[0, 1)`.
    pub normal_weight: f32,
}

impl KdeSpec {
    /// Number of `f32` weights (the centres) in dimension `dim`.
    pub fn weight_count(&self, dim: usize) -> Option<usize> {
        (self.centres as usize).checked_mul(dim)
    }
}

/// `[C, H, W]` of an image stage's input, which is the first `C·H·W`
/// coordinates of the row in C order (channel, then row, then column).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageShape {
    /// Channels.
    pub channels: u16,
    /// Rows of pixels.
    pub height: u16,
    /// Columns of pixels.
    pub width: u16,
}

impl ImageShape {
    /// Pixels per channel, `H·W`.
    pub fn pixels(&self) -> usize {
        usize::from(self.height) * usize::from(self.width)
    }

    /// Coordinates, `C·H·W`.
    pub fn len(&self) -> usize {
        usize::from(self.channels) * self.pixels()
    }

    /// Whether any side is zero.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A CNF block with FFJORD's convolutional ODE net: every layer a 3×3
/// convolution (stride 1, zero padding 1, so the image size stays) with
/// time entering as in the dense net — [`LayerKind::Concat`] adds a first
/// input channel filled with `t` (zero-padded like the rest),
/// [`LayerKind::ConcatSquash`] gates each output channel by `σ(w_g t + b_g)`
/// and adds `w_b t`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ConvCnfSpec {
    /// The image the block acts on.
    pub shape: ImageShape,
    /// The net's layers; `out_dim` counts output channels (the last layer's
    /// must equal `shape.channels`).
    pub layers: heapless::Vec<LayerSpec, MAX_LAYERS>,
    /// Activation between layers.
    pub activation: Activation,
    /// End time `T`.
    pub end_time: f32,
}

impl ConvCnfSpec {
    /// The net's widest activation in values (`channels × H·W`, input
    /// included).
    pub fn max_width(&self) -> usize {
        let widest = self.layers.iter().map(|l| usize::from(l.out_dim)).max().unwrap_or(0);
        widest.max(usize::from(self.shape.channels)).saturating_mul(self.shape.pixels())
    }
}

/// Number of `f32` weights of a conv layer of `kind` from `c_in` to `c_out`
/// channels: the kernel `[c_out, c_in (+1 for concat: the time channel
/// first), 3, 3]`, then the vectors of [`LayerKind::weight_count`].
pub fn conv_weight_count(kind: LayerKind, c_in: usize, c_out: usize) -> Option<usize> {
    let kernel = c_out.checked_mul(kind.cols(c_in)?)?.checked_mul(9)?;
    let vectors = kind.weight_count(c_in, c_out)?.checked_sub(c_out.checked_mul(kind.cols(c_in)?)?)?;
    kernel.checked_add(vectors)
}

impl Stage {
    /// The oldest format version that has this stage.
    pub fn min_version(&self) -> u16 {
        match self {
            Stage::Cnf(spec) if spec.matrices != MatrixEncoding::F32 => 3,
            Stage::Cnf(_) | Stage::Affine => 1,
            Stage::Linear => 2,
            Stage::Logit { .. } | Stage::Squeeze(_) | Stage::ConvCnf(_) => 4,
            Stage::KdeBase(_) => 5,
        }
    }
}

/// [`Stage`] as the file has it: version 3 appended a CNF variant that names
/// its matrix encoding, version 4 the image stages, version 5 the kernel
/// density base, so older versions decode unchanged.
#[derive(Serialize, Deserialize, Clone)]
enum WireStage {
    Cnf(CnfSpec),
    Affine,
    Linear,
    // Without features `quantized` and `images` this variant, without
    // `images` the image variants and without `kde` the base are bare
    // placeholders (no decoder linked: the small builds count bytes), so
    // every variant keeps its index; [`HeaderView::decode`] refuses them by
    // index, naming the missing feature, before decoding a stage.
    #[cfg(any(feature = "quantized", feature = "images"))]
    CnfEncoded(CnfSpec, MatrixEncoding),
    #[cfg(not(any(feature = "quantized", feature = "images")))]
    CnfEncoded,
    #[cfg(feature = "images")]
    Logit {
        alpha: f32,
    },
    #[cfg(not(feature = "images"))]
    Logit,
    #[cfg(feature = "images")]
    Squeeze(ImageShape),
    #[cfg(not(feature = "images"))]
    Squeeze,
    #[cfg(feature = "images")]
    ConvCnf(ConvCnfSpec),
    #[cfg(not(feature = "images"))]
    ConvCnf,
    #[cfg(feature = "kde")]
    KdeBase(KdeSpec),
    #[cfg(not(feature = "kde"))]
    KdeBase,
}

/// Wire indices of [`WireStage::CnfEncoded`] and [`WireStage::KdeBase`]
/// (postcard writes an enum's variant index as a varint before its fields;
/// the image variants are 4 to 6).
const WIRE_CNF_ENCODED: u8 = 3;
const WIRE_KDE_BASE: u8 = 7;

impl From<WireStage> for Stage {
    fn from(w: WireStage) -> Self {
        match w {
            // `matrices` is not on the wire: it decodes as its default, f32.
            WireStage::Cnf(spec) => Stage::Cnf(spec),
            #[cfg(any(feature = "quantized", feature = "images"))]
            WireStage::CnfEncoded(spec, matrices) => Stage::Cnf(CnfSpec { matrices, ..spec }),
            WireStage::Affine => Stage::Affine,
            WireStage::Linear => Stage::Linear,
            #[cfg(feature = "images")]
            WireStage::Logit { alpha } => Stage::Logit { alpha },
            #[cfg(feature = "images")]
            WireStage::Squeeze(shape) => Stage::Squeeze(shape),
            #[cfg(feature = "images")]
            WireStage::ConvCnf(spec) => Stage::ConvCnf(spec),
            #[cfg(feature = "kde")]
            WireStage::KdeBase(spec) => Stage::KdeBase(spec),
            // Placeholders of stages this build leaves out: never reached
            // through the loader, which refuses them by index first
            // (`HeaderView::decode`). A `Header` decoded directly with serde
            // in such a build must be checked with `Header::layout`, which
            // a placeholder read as `Affine` would pass: decode through
            // `Model::from_bytes` instead. (Mapping them to refused stages
            // costs the small WASM build 193 bytes it does not have.)
            #[cfg(not(feature = "kde"))]
            WireStage::KdeBase => Stage::Affine,
            #[cfg(not(any(feature = "quantized", feature = "images")))]
            WireStage::CnfEncoded => Stage::Affine,
            #[cfg(not(feature = "images"))]
            WireStage::Logit | WireStage::Squeeze | WireStage::ConvCnf => Stage::Affine,
        }
    }
}

impl From<Stage> for WireStage {
    fn from(s: Stage) -> Self {
        match s {
            #[cfg(feature = "quantized")]
            Stage::Cnf(spec) if spec.matrices != MatrixEncoding::F32 => {
                let matrices = spec.matrices;
                WireStage::CnfEncoded(spec, matrices)
            }
            // (Without feature `quantized`, `validate` refuses such a stage
            // before anything is written.)
            Stage::Cnf(spec) => WireStage::Cnf(spec),
            Stage::Affine => WireStage::Affine,
            Stage::Linear => WireStage::Linear,
            #[cfg(feature = "images")]
            Stage::Logit { alpha } => WireStage::Logit { alpha },
            #[cfg(feature = "images")]
            Stage::Squeeze(shape) => WireStage::Squeeze(shape),
            #[cfg(feature = "images")]
            Stage::ConvCnf(spec) => WireStage::ConvCnf(spec),
            // (Without feature `images`, `validate` refuses image stages
            // before anything is written.)
            #[cfg(not(feature = "images"))]
            Stage::Logit { .. } | Stage::Squeeze(_) | Stage::ConvCnf(_) => WireStage::Affine,
            #[cfg(feature = "kde")]
            Stage::KdeBase(spec) => WireStage::KdeBase(spec),
            // (Without feature `kde`, `validate` refuses it before anything
            // is written.)
            #[cfg(not(feature = "kde"))]
            Stage::KdeBase(_) => WireStage::Affine,
        }
    }
}

/// Number of `f32` weights of a [`Stage::Linear`] in dimension `dim`: the
/// packed lower triangle and the shift.
pub fn linear_weight_count(dim: usize) -> Option<usize> {
    dim.checked_mul(dim.checked_add(1)?)?.checked_div(2)?.checked_add(dim)
}

/// Row `i` of a [`Stage::Linear`]'s packed lower triangle: `L[i][0..=i]`, the
/// `i + 1` floats from `i(i+1)/2` (its last one is the diagonal).
pub fn lower_triangle_row<'a>(lower: Weights<'a>, i: usize) -> Weights<'a> {
    lower.slice(i * (i + 1) / 2, i + 1)
}

/// The oldest format version that has every one of `stages`.
fn version_of(stages: impl Iterator<Item = Stage>) -> u16 {
    stages.map(|s| s.min_version()).max().unwrap_or(MIN_FORMAT_VERSION)
}

/// What a model's anomaly score is. Every path that scores (`Flow::score`,
/// `score_batch`, `score_packed`, the C API, the firmware, the WASM page)
/// computes this one, and the stored [`Threshold`] is on it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ScoreKind {
    /// `−log p(x)`, the model's full density (every file before version 6).
    #[default]
    NegLogDensity = 0,
    /// `−log N(z; 0, I) = ½‖z‖² + (D/2) ln 2π` of the latent point `z` the
    /// chain maps `x` to: where the row lands, without the volume change
    /// along the flow and without a kernel density base. The volume change
    /// carries what the flow learned about fine detail (for instance a
    /// column's repeated values), which can rank outliers worse than the
    /// radius does; the trainer keeps this kind only where it ranks
    /// synthetic outliers of the validation rows better. Since version 6.
    LatentRadius = 1,
    /// `−log p_base(z)`: the base density at the latent point `z`, without
    /// the volume change along the flow. For a kernel density base
    /// ([`Stage::KdeBase`]) that is the kernel estimate, trained with the
    /// flow; for an `N(0, I)` base it equals [`ScoreKind::LatentRadius`].
    /// The trainer keeps it for a trained kernel base where it ranks
    /// synthetic outliers of the validation rows better than `−log p`.
    /// Since version 7.
    LatentBase = 2,
}

impl ScoreKind {
    /// The oldest format version that can hold this kind.
    pub fn min_version(self) -> u16 {
        match self {
            ScoreKind::NegLogDensity => MIN_FORMAT_VERSION,
            ScoreKind::LatentRadius => SCORE_KIND_VERSION,
            ScoreKind::LatentBase => LATENT_BASE_VERSION,
        }
    }

    /// Decodes the kind's postcard bytes (its variant index, one byte) by
    /// hand: serde's generated decoder costs the small WASM build about a
    /// kilobyte. Returns the kind and the bytes after it (whether the
    /// file's version can hold the kind is checked with its stages').
    fn take(bytes: &[u8]) -> Result<(ScoreKind, &[u8]), LoadError> {
        match bytes.split_first() {
            Some((0, rest)) => Ok((ScoreKind::NegLogDensity, rest)),
            Some((1, rest)) => Ok((ScoreKind::LatentRadius, rest)),
            Some((2, rest)) => Ok((ScoreKind::LatentBase, rest)),
            _ => Err(LoadError::MalformedHeader),
        }
    }

    /// `"neg-log-density"`, `"latent-radius"` or `"latent-base"` (as the
    /// trainer's outputs write it).
    pub fn name(self) -> &'static str {
        match self {
            ScoreKind::NegLogDensity => "neg-log-density",
            ScoreKind::LatentRadius => "latent-radius",
            ScoreKind::LatentBase => "latent-base",
        }
    }
}

/// An anomaly threshold on the model's score ([`ScoreKind`]; `−log p(x)`
/// unless the header says otherwise).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct Threshold {
    /// Rows scoring above this are anomalies.
    pub score: f32,
    /// The quantile of validation scores the threshold was set at (e.g. 0.99).
    pub quantile: f32,
}

/// Free-form, human-readable provenance. Borrowed from the file (zero-copy).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Metadata<'a> {
    /// Short model name.
    pub name: &'a str,
    /// What the data is (source, columns, units).
    pub description: &'a str,
    /// The command that trained and exported the model.
    pub command: &'a str,
}

/// Everything about a model except its weights. Files are read through
/// [`crate::Model::from_bytes`] ([`HeaderView`]); decoding a `Header` with
/// serde directly is for builds with every feature (the trainer): in a build
/// without `quantized`, `images` or `kde` the stages it leaves out are
/// placeholders that such a decode does not refuse.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Header<'a> {
    /// Data dimension `D`.
    pub dim: u16,
    /// Whether the weight section starts with `mean[D]`, `std[D]` for input
    /// standardization `(x − mean) / std`, whose log-determinant is part of log p.
    pub standardize: bool,
    /// The chain, data side first.
    pub stages: heapless::Vec<Stage, MAX_STAGES>,
    /// The solver a model is evaluated with unless the caller picks another.
    pub solver: Solver,
    /// Anomaly threshold, if the model was calibrated.
    pub threshold: Option<Threshold>,
    /// Provenance.
    #[serde(borrow)]
    pub metadata: Metadata<'a>,
    /// What the anomaly score is. Not part of the derived encoding: [`encode`]
    /// writes it after the metadata only in version 6 and later, so files
    /// scored by `−log p` keep their bytes and their older version.
    #[serde(skip)]
    pub score: ScoreKind,
}

/// Where things are in the weight section, derived from a validated [`Header`].
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    /// Total number of 4-byte words in the weight section (one per weight
    /// unless a CNF stage stores its matrices as f16 or i8).
    pub word_count: usize,
    /// Total number of weights as values (what [`encode`] takes).
    pub value_count: usize,
    /// Offset (in words) of each stage's weights.
    pub stage_offsets: heapless::Vec<usize, MAX_STAGES>,
    /// Widest layer input or output (at least `dim`).
    pub max_width: usize,
    /// Most gated units (outputs of concatsquash layers) in one CNF stage:
    /// the row path keeps their gates for one time point in its scratch.
    pub max_gates: usize,
    /// Floats of scratch the image stages need besides the state (the
    /// largest of a [`Stage::ConvCnf`]'s net evaluation and a
    /// [`Stage::Squeeze`]'s copy); 0 without image stages.
    pub image_work: usize,
    /// Whether any stage is a dense [`Stage::Cnf`] (whose net needs
    /// `D + 1` lanes of scratch).
    pub dense_cnf: bool,
    /// The chain's [`Stage::KdeBase`] (its last stage), if it has one;
    /// otherwise the base is `N(0, I)`.
    pub kde_base: Option<KdeSpec>,
    /// The oldest format version that has every stage (a file must declare
    /// at least this one).
    pub min_version: u16,
}

impl Header<'_> {
    /// The format version [`encode`] writes for this header: the oldest that
    /// has every stage in it and its score kind.
    pub fn version(&self) -> u16 {
        version_of(self.stages.iter().cloned()).max(self.score.min_version())
    }

    /// Checks every field and derives the weight layout.
    pub fn layout(&self) -> Result<Layout, LoadError> {
        validate(self.dim, self.standardize, &self.solver, self.threshold, self.stages.iter().cloned())
    }
}

/// Checks a header's fields and its stages (in order) and derives the layout.
fn validate(
    dim: u16,
    standardize: bool,
    solver: &Solver,
    threshold: Option<Threshold>,
    stages: impl Iterator<Item = Stage>,
) -> Result<Layout, LoadError> {
    let dim = usize::from(dim);
    if dim == 0 {
        return Err(LoadError::InvalidField(Field::Dim));
    }
    solver.validate().map_err(|_| LoadError::InvalidField(Field::Solver))?;
    if let Some(t) = threshold
        && !(t.score.is_finite() && t.quantile > 0.0 && t.quantile < 1.0)
    {
        return Err(LoadError::InvalidField(Field::Threshold));
    }
    let mut count: usize = if standardize { 2 * dim } else { 0 };
    let mut values = count;
    let mut max_width = dim;
    let mut max_gates = 0;
    let mut image_work = 0usize;
    let mut dense_cnf = false;
    let mut stage_offsets = heapless::Vec::new();
    let mut any_cnf = false;
    let mut kde_base = None;
    let mut min_version = MIN_FORMAT_VERSION;
    for (s, stage) in stages.enumerate() {
        // The base ends the chain: nothing after it, a second one included.
        if kde_base.is_some() {
            return Err(LoadError::InvalidField(Field::KdeBase));
        }
        min_version = min_version.max(stage.min_version());
        stage_offsets.push(count).map_err(|_| LoadError::MalformedHeader)?;
        let (stage_words, stage_values) = match &stage {
            Stage::Affine => (2 * dim, 2 * dim),
            Stage::Linear => {
                let n = linear_weight_count(dim).ok_or(LoadError::InvalidField(Field::Size))?;
                (n, n)
            }
            Stage::Cnf(cnf) => {
                any_cnf = true;
                dense_cnf = true;
                max_gates = max_gates.max(cnf.gate_count());
                validate_cnf(cnf, s, dim, &mut max_width)?
            }
            Stage::Logit { alpha } => {
                image_stages_supported()?;
                if !(*alpha > 0.0 && *alpha < 0.5) {
                    return Err(LoadError::InvalidField(Field::ImageStage));
                }
                (0, 0)
            }
            Stage::Squeeze(shape) => {
                image_stages_supported()?;
                let even = shape.height % 2 == 0 && shape.width % 2 == 0;
                if shape.is_empty() || shape.len() > dim || !even {
                    return Err(LoadError::InvalidField(Field::ImageStage));
                }
                image_work = image_work.max(shape.len());
                (0, 0)
            }
            Stage::ConvCnf(conv) => {
                image_stages_supported()?;
                any_cnf = true;
                let (words, work) = validate_conv_cnf(conv, s, dim)?;
                image_work = image_work.max(work);
                (words, words)
            }
            Stage::KdeBase(kde) => {
                let valid = cfg!(feature = "kde")
                    && (1..=MAX_KDE_CENTRES).contains(&kde.centres)
                    && kde.bandwidth.is_finite()
                    && kde.bandwidth > 0.0
                    && (0.0..1.0).contains(&kde.normal_weight);
                if !valid {
                    return Err(LoadError::InvalidField(Field::KdeBase));
                }
                kde_base = Some(*kde);
                let n = kde.weight_count(dim).ok_or(LoadError::InvalidField(Field::Size))?;
                (n, n)
            }
        };
        count = count.checked_add(stage_words).ok_or(LoadError::InvalidField(Field::Size))?;
        values = values.checked_add(stage_values).ok_or(LoadError::InvalidField(Field::Size))?;
    }
    if !any_cnf {
        return Err(LoadError::InvalidField(Field::Stages));
    }
    if values > u32::MAX as usize / 4 {
        return Err(LoadError::InvalidField(Field::Size));
    }
    Ok(Layout {
        word_count: count,
        value_count: values,
        stage_offsets,
        max_width,
        max_gates,
        image_work,
        dense_cnf,
        kde_base,
        min_version,
    })
}

/// A model header as the runtime keeps it: the fixed fields by value and the
/// stage list left in the file, decoded one stage at a time. A decoded
/// [`Header`] holds every stage by value (≈ 1.7 KB); copying that through
/// loading cost several KB of stack on a microcontroller.
#[derive(Clone, Debug)]
pub struct HeaderView<'a> {
    /// Data dimension `D`.
    pub dim: u16,
    /// Whether the weights start with `mean[D]`, `std[D]`.
    pub standardize: bool,
    /// The default solver.
    pub solver: Solver,
    /// Anomaly threshold, if calibrated.
    pub threshold: Option<Threshold>,
    /// Provenance.
    pub metadata: Metadata<'a>,
    /// What the anomaly score is ([`ScoreKind::NegLogDensity`] before version 6).
    pub score: ScoreKind,
    /// The postcard bytes of the stage elements.
    stages_raw: &'a [u8],
    /// Byte offset of each stage in `stages_raw`.
    stage_starts: heapless::Vec<u32, MAX_STAGES>,
}

/// The error that names the feature a stage needs, when `stage` (the bytes
/// of a stage, not yet decoded) is one this build leaves out.
fn not_built(stage: &[u8]) -> Option<LoadError> {
    // (Variant indices below 128 are one byte of varint.)
    let field = match *stage.first()? {
        WIRE_CNF_ENCODED if !cfg!(any(feature = "quantized", feature = "images")) => Field::MatrixEncoding,
        4..=6 if !cfg!(feature = "images") => Field::ImageStage,
        WIRE_KDE_BASE if !cfg!(feature = "kde") => Field::KdeBase,
        _ => return None,
    };
    Some(LoadError::InvalidField(field))
}

fn take<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<(T, &'a [u8]), LoadError> {
    postcard::take_from_bytes::<T>(bytes).map_err(|_| LoadError::MalformedHeader)
}

impl<'a> HeaderView<'a> {
    /// Decodes a postcard header of format `version` (the same bytes
    /// [`encode`] writes for a [`Header`]) and validates it; returns the
    /// view, its layout and the bytes after it.
    pub fn decode(payload: &'a [u8], version: u16) -> Result<(Self, Layout, &'a [u8]), LoadError> {
        let (dim, rest) = take::<u16>(payload)?;
        let (standardize, rest) = take::<bool>(rest)?;
        // A sequence is its length (a varint) followed by the elements.
        let (n, stages_start) = take::<u32>(rest)?;
        if n as usize > MAX_STAGES {
            return Err(LoadError::MalformedHeader);
        }
        let mut stage_starts = heapless::Vec::new();
        let mut rest = stages_start;
        for _ in 0..n {
            let offset = (stages_start.len() - rest.len()) as u32;
            stage_starts.push(offset).map_err(|_| LoadError::MalformedHeader)?;
            if let Some(e) = not_built(rest) {
                return Err(e);
            }
            rest = take::<Stage>(rest)?.1;
        }
        let stages_raw = stages_start.get(..stages_start.len() - rest.len()).unwrap_or(&[]);
        let (solver, rest) = take::<Solver>(rest)?;
        let (threshold, rest) = take::<Option<Threshold>>(rest)?;
        let (metadata, rest) = take::<Metadata<'a>>(rest)?;
        let (score, rest) =
            if version >= SCORE_KIND_VERSION { ScoreKind::take(rest)? } else { (ScoreKind::default(), rest) };
        let view =
            HeaderView { dim, standardize, solver, threshold, metadata, score, stages_raw, stage_starts };
        let layout = validate(dim, standardize, &solver, threshold, view.stages())?;
        Ok((view, layout, rest))
    }

    /// Number of stages.
    pub fn stage_count(&self) -> usize {
        self.stage_starts.len()
    }

    /// The oldest format version that has every stage of this header and
    /// its score kind (a file must declare at least this one).
    pub fn version(&self) -> u16 {
        version_of(self.stages()).max(self.score.min_version())
    }

    /// Stage `i`, decoded from the file.
    pub fn stage(&self, i: usize) -> Option<Stage> {
        let start = *self.stage_starts.get(i)? as usize;
        postcard::take_from_bytes::<Stage>(self.stages_raw.get(start..)?).ok().map(|(s, _)| s)
    }

    /// The stages in order, data side first.
    pub fn stages(&self) -> impl DoubleEndedIterator<Item = Stage> + '_ {
        (0..self.stage_count()).filter_map(|i| self.stage(i))
    }
}

/// `Ok` if this runtime was built with the image stages (feature `images`).
fn image_stages_supported() -> Result<(), LoadError> {
    if cfg!(feature = "images") { Ok(()) } else { Err(LoadError::InvalidField(Field::ImageStage)) }
}

/// Checks one convolutional CNF stage; returns its weight words (all f32)
/// and the scratch floats of one evaluation of its net with the exact trace.
fn validate_conv_cnf(conv: &ConvCnfSpec, stage: usize, dim: usize) -> Result<(usize, usize), LoadError> {
    if !(conv.end_time.is_finite() && conv.end_time > 0.0) {
        return Err(LoadError::InvalidField(Field::EndTime));
    }
    if let Activation::Swish { beta } = conv.activation
        && !beta.is_finite()
    {
        return Err(LoadError::InvalidField(Field::Activation));
    }
    let shape = conv.shape;
    if shape.is_empty() || shape.len() > dim {
        return Err(LoadError::InvalidField(Field::ImageStage));
    }
    let n = conv.layers.len();
    if n == 0 {
        return Err(LoadError::InvalidField(Field::Layers));
    }
    let size = LoadError::InvalidField(Field::Size);
    let mut c_in = usize::from(shape.channels);
    let mut words = 0usize;
    for (l, layer) in conv.layers.iter().enumerate() {
        let c_out = usize::from(layer.out_dim);
        if c_out == 0 {
            return Err(LoadError::InvalidField(Field::Layers));
        }
        if l + 1 == n && c_out != usize::from(shape.channels) {
            return Err(LoadError::ShapeMismatch {
                stage: stage as u8,
                layer: l as u8,
                expected: u32::from(shape.channels),
                found: c_out as u32,
            });
        }
        words = words.checked_add(conv_weight_count(layer.kind, c_in, c_out).ok_or(size)?).ok_or(size)?;
        c_in = c_out;
    }
    let work = crate::image::conv_work_len(conv, crate::image::ImageTrace::default()).ok_or(size)?;
    if work > u32::MAX as usize / 4 {
        return Err(size);
    }
    Ok((words, work))
}

/// Checks one CNF stage; returns its (words, values) in the weight section.
fn validate_cnf(
    cnf: &CnfSpec,
    stage: usize,
    dim: usize,
    max_width: &mut usize,
) -> Result<(usize, usize), LoadError> {
    if !(cnf.end_time.is_finite() && cnf.end_time > 0.0) {
        return Err(LoadError::InvalidField(Field::EndTime));
    }
    if let Activation::Swish { beta } = cnf.activation
        && !beta.is_finite()
    {
        return Err(LoadError::InvalidField(Field::Activation));
    }
    if cnf.matrices != MatrixEncoding::F32 && !cfg!(feature = "quantized") {
        return Err(LoadError::InvalidField(Field::MatrixEncoding));
    }
    let n = cnf.layers.len();
    if n == 0 {
        return Err(LoadError::InvalidField(Field::Layers));
    }
    let mut d_in = dim;
    let (mut words, mut values) = (0usize, 0usize);
    for (l, layer) in cnf.layers.iter().enumerate() {
        let d_out = usize::from(layer.out_dim);
        if d_out == 0 {
            return Err(LoadError::InvalidField(Field::Layers));
        }
        if l + 1 == n && d_out != dim {
            return Err(LoadError::ShapeMismatch {
                stage: stage as u8,
                layer: l as u8,
                expected: dim as u32,
                found: d_out as u32,
            });
        }
        *max_width = (*max_width).max(d_out);
        let size = LoadError::InvalidField(Field::Size);
        let v = layer.kind.weight_count(d_in, d_out).ok_or(size)?;
        let w = layer.kind.word_count(d_in, d_out, cnf.matrices).ok_or(size)?;
        values = values.checked_add(v).ok_or(size)?;
        words = words.checked_add(w).ok_or(size)?;
        d_in = d_out;
    }
    Ok((words, values))
}

/// Why [`encode`] could not write a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EncodeError {
    /// The header is invalid (the same checks the loader makes).
    Invalid(LoadError),
    /// `weights.len()` is not what the header's shapes need.
    WeightCount {
        /// Floats the header needs.
        expected: usize,
        /// Floats given.
        found: usize,
    },
    /// A weight is NaN or infinite.
    NonFiniteWeight {
        /// Its index.
        index: usize,
    },
    /// The output buffer is smaller than [`encoded_len`].
    BufferTooSmall {
        /// Bytes needed.
        needed: usize,
    },
    /// postcard refused the header.
    Serialize,
}

impl core::fmt::Display for EncodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            EncodeError::Invalid(e) => write!(f, "invalid header: {e}"),
            EncodeError::WeightCount { expected, found } => {
                write!(f, "{found} weights given, the header's shapes need {expected}")
            }
            EncodeError::NonFiniteWeight { index } => write!(f, "weight {index} is NaN or infinite"),
            EncodeError::BufferTooSmall { needed } => {
                write!(f, "output buffer too small: {needed} bytes needed")
            }
            EncodeError::Serialize => f.write_str("header could not be serialized"),
        }
    }
}

impl core::error::Error for EncodeError {}

fn padding(header_end: usize) -> usize {
    (4 - header_end % 4) % 4
}

/// The header's fields after the derived encoding: the score kind, from
/// version 6 on.
fn trailing_fields(header: &Header<'_>) -> Option<ScoreKind> {
    (header.version() >= SCORE_KIND_VERSION).then_some(header.score)
}

/// Bytes of the encoded header (the derived fields, then [`trailing_fields`]).
fn header_len(header: &Header<'_>) -> Result<usize, EncodeError> {
    let trailing = match trailing_fields(header) {
        Some(score) => postcard_size(&score)?,
        None => 0,
    };
    Ok(postcard_size(header)? + trailing)
}

fn postcard_size<T: Serialize>(value: &T) -> Result<usize, EncodeError> {
    postcard::serialize_with_flavor(value, postcard::ser_flavors::Size::default())
        .map_err(|_| EncodeError::Serialize)
}

/// Size in bytes of the file [`encode`] writes for `header`.
pub fn encoded_len(header: &Header<'_>) -> Result<usize, EncodeError> {
    let layout = header.layout().map_err(EncodeError::Invalid)?;
    let header_end = PREAMBLE_LEN + header_len(header)?;
    Ok(header_end + padding(header_end) + 4 * layout.word_count + CRC_LEN)
}

/// Writes a model file into `out`; returns the number of bytes written.
/// `weights` are the values in the order [`Header::layout`] and `FORMAT.md`
/// describe ([`Layout::value_count`] of them); a CNF stage whose
/// [`CnfSpec::matrices`] is f16 or i8 has its matrices stored that way here
/// (rounded to nearest; i8 with one scale per row, [`crate::quant`]).
pub fn encode(header: &Header<'_>, weights: &[f32], out: &mut [u8]) -> Result<usize, EncodeError> {
    let layout = header.layout().map_err(EncodeError::Invalid)?;
    if weights.len() != layout.value_count {
        return Err(EncodeError::WeightCount { expected: layout.value_count, found: weights.len() });
    }
    if let Some(index) = weights.iter().position(|w| !w.is_finite()) {
        return Err(EncodeError::NonFiniteWeight { index });
    }
    let needed = encoded_len(header)?;
    let out = out.get_mut(..needed).ok_or(EncodeError::BufferTooSmall { needed })?;
    let (preamble, rest) = out.split_at_mut(PREAMBLE_LEN);
    let (magic, version) = preamble.split_at_mut(4);
    magic.copy_from_slice(&MAGIC);
    version.copy_from_slice(&header.version().to_le_bytes());
    let mut header_len = postcard::to_slice(header, rest).map_err(|_| EncodeError::Serialize)?.len();
    if let Some(score) = trailing_fields(header) {
        let tail = rest.get_mut(header_len..).ok_or(EncodeError::Serialize)?;
        header_len += postcard::to_slice(&score, tail).map_err(|_| EncodeError::Serialize)?.len();
    }
    let (_, rest) = rest.split_at_mut(header_len);
    let pad = padding(PREAMBLE_LEN + header_len);
    let (pad_bytes, rest) = rest.split_at_mut(pad);
    pad_bytes.fill(0);
    let (weight_bytes, _) = rest.split_at_mut(4 * layout.word_count);
    write_weights(header, weights, weight_bytes)?;
    let (body, trailer) = out.split_at_mut(needed - CRC_LEN);
    trailer.copy_from_slice(&crc32(body).to_le_bytes());
    Ok(needed)
}

/// Writes the weight section: every value as an f32 word, except CNF
/// matrices stored as f16 or i8.
fn write_weights(header: &Header<'_>, weights: &[f32], out: &mut [u8]) -> Result<(), EncodeError> {
    let dim = usize::from(header.dim);
    let mut values = weights;
    let mut bytes = out;
    let mut put = |n: usize, enc: Option<(MatrixEncoding, usize)>| -> Result<(), EncodeError> {
        let (part, rest) = values.split_at_checked(n).ok_or(EncodeError::Serialize)?;
        values = rest;
        let encoding = enc.map(|(e, _)| e).unwrap_or(MatrixEncoding::F32);
        let rows = enc.map(|(_, rows)| rows).unwrap_or(n);
        let cols = n.checked_div(rows).unwrap_or(0);
        let words = encoding.matrix_words(rows, cols).ok_or(EncodeError::Serialize)?;
        let (dst, rest) =
            core::mem::take(&mut bytes).split_at_mut_checked(4 * words).ok_or(EncodeError::Serialize)?;
        bytes = rest;
        dst.fill(0);
        match encoding {
            MatrixEncoding::F32 => {
                for (d, w) in dst.chunks_exact_mut(4).zip(part) {
                    d.copy_from_slice(&w.to_le_bytes());
                }
            }
            MatrixEncoding::F16 => {
                for (d, &w) in dst.chunks_exact_mut(2).zip(part) {
                    d.copy_from_slice(&f32_to_f16(w).to_le_bytes());
                }
            }
            MatrixEncoding::I8 => {
                let (scales, q) = dst.split_at_mut(4 * rows);
                for ((d, row), q_row) in
                    scales.chunks_exact_mut(4).zip(part.chunks(cols.max(1))).zip(q.chunks_mut(cols.max(1)))
                {
                    let scale = i8_scale(row);
                    d.copy_from_slice(&scale.to_le_bytes());
                    for (b, &w) in q_row.iter_mut().zip(row) {
                        *b = i8_quantize(w, scale) as u8;
                    }
                }
            }
        }
        Ok(())
    };
    if header.standardize {
        put(2 * dim, None)?;
    }
    for stage in &header.stages {
        match stage {
            Stage::Affine => put(2 * dim, None)?,
            Stage::Linear => put(linear_weight_count(dim).ok_or(EncodeError::Serialize)?, None)?,
            Stage::Cnf(cnf) => {
                let mut d_in = dim;
                for layer in &cnf.layers {
                    let d_out = usize::from(layer.out_dim);
                    let cols = layer.kind.cols(d_in).ok_or(EncodeError::Serialize)?;
                    let total = layer.kind.weight_count(d_in, d_out).ok_or(EncodeError::Serialize)?;
                    let matrix = d_out * cols;
                    put(matrix, Some((cnf.matrices, d_out)))?;
                    put(total - matrix, None)?;
                    d_in = d_out;
                }
            }
            Stage::Logit { .. } | Stage::Squeeze(_) => {}
            Stage::ConvCnf(conv) => {
                let mut c_in = usize::from(conv.shape.channels);
                for layer in &conv.layers {
                    let c_out = usize::from(layer.out_dim);
                    put(conv_weight_count(layer.kind, c_in, c_out).ok_or(EncodeError::Serialize)?, None)?;
                    c_in = c_out;
                }
            }
            Stage::KdeBase(kde) => put(kde.weight_count(dim).ok_or(EncodeError::Serialize)?, None)?,
        }
    }
    Ok(())
}

/// A view of little-endian `f32` values inside borrowed bytes. Any alignment
/// is fine and nothing is copied to RAM; 4-aligned values are read as `f32`
/// directly ([`Weights::as_f32`]), others through `f32::from_le_bytes`.
#[derive(Clone, Copy, Debug)]
pub struct Weights<'a> {
    words: &'a [[u8; 4]],
}

impl<'a> Weights<'a> {
    /// Wraps bytes; a trailing partial value (fewer than 4 bytes) is ignored.
    #[inline]
    pub fn new(bytes: &'a [u8]) -> Self {
        Weights { words: bytes.as_chunks::<4>().0 }
    }

    /// Number of floats.
    #[inline]
    pub fn len(&self) -> usize {
        self.words.len()
    }

    /// Whether there are no floats.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// Float `i`, if in range.
    #[inline]
    pub fn get(&self, i: usize) -> Option<f32> {
        self.words.get(i).map(|w| f32::from_le_bytes(*w))
    }

    /// The `count` floats starting at `start`; empty if out of range.
    #[inline]
    pub fn slice(&self, start: usize, count: usize) -> Weights<'a> {
        let words = start.checked_add(count).and_then(|end| self.words.get(start..end)).unwrap_or(&[]);
        Weights { words }
    }

    /// Splits after `count` floats (clamped to the length).
    #[inline]
    pub fn split_at(&self, count: usize) -> (Weights<'a>, Weights<'a>) {
        let (a, b) = self.words.split_at(count.min(self.words.len()));
        (Weights { words: a }, Weights { words: b })
    }

    /// Consecutive runs of `n` floats (rows of a row-major matrix).
    #[inline]
    pub fn rows(&self, n: usize) -> impl Iterator<Item = Weights<'a>> + 'a {
        self.words.chunks_exact(n.max(1)).map(|words| Weights { words })
    }

    /// `Σ_i self[i] · x[i]` over the shorter of the two, summed in ascending
    /// order from zero — the same order as the net's products
    /// (the runtime's `matvec` module), so every target gives the same bits.
    #[inline]
    pub fn dot(&self, x: &[f32]) -> f32 {
        crate::matvec::ascending_dot(self.iter(), x)
    }

    /// The underlying bytes.
    #[inline]
    pub fn bytes(&self) -> &'a [u8] {
        self.words.as_flattened()
    }

    /// The values as `f32` in place, when they lie 4-aligned in memory on a
    /// little-endian target (a model loaded from a 4-aligned buffer: the file
    /// aligns its weight section); `None` otherwise.
    #[inline]
    pub fn as_f32(&self) -> Option<&'a [f32]> {
        if cfg!(target_endian = "little") { bytemuck::try_cast_slice(self.words).ok() } else { None }
    }

    /// The floats in order.
    #[inline]
    pub fn iter(&self) -> impl Iterator<Item = f32> + use<'a> {
        self.words.iter().map(|w| f32::from_le_bytes(*w))
    }
}
