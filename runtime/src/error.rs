//! Typed errors. All are `Copy`, carry no strings and need no allocator, so they
//! can be matched on, logged over semihosting or turned into a JavaScript
//! exception alike.

use core::fmt;

use crate::math::Decimal;

/// Why a model blob was rejected by [`crate::Model::from_bytes`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LoadError {
    /// Fewer bytes than the fixed-size parts of the format need.
    Truncated {
        /// Bytes present.
        len: u32,
        /// Bytes the format needs at least (given what was read so far).
        needed: u32,
    },
    /// The first four bytes are not [`crate::format::MAGIC`].
    BadMagic,
    /// The file was written by a format version this runtime does not read.
    UnsupportedVersion {
        /// Version in the file.
        found: u16,
        /// Version this runtime reads.
        supported: u16,
    },
    /// The CRC32 trailer does not match the contents: the file is corrupt.
    ChecksumMismatch {
        /// CRC stored in the file.
        stored: u32,
        /// CRC of the bytes as read.
        computed: u32,
    },
    /// The postcard header could not be decoded (or has more stages/layers than
    /// this runtime's fixed capacities allow).
    MalformedHeader,
    /// A header field is out of its valid range.
    InvalidField(Field),
    /// The last layer of a CNF block must map back to the data dimension.
    ShapeMismatch {
        /// Stage index in the chain.
        stage: u8,
        /// Layer index inside that stage.
        layer: u8,
        /// Width the layer must have.
        expected: u32,
        /// Width the header declares.
        found: u32,
    },
    /// The weight section is not the length the header's shapes imply.
    WeightCount {
        /// Number of `f32` weights the header implies.
        expected: u32,
        /// Number of whole `f32` weights present.
        found: u32,
    },
    /// A weight (or normalization constant) is NaN or infinite.
    NonFiniteWeight {
        /// Index into the weight section.
        index: u32,
    },
    /// A scale (standard deviation or affine scale) is zero, so the map is not
    /// invertible and its log-determinant is undefined.
    ZeroScale {
        /// Index into the weight section.
        index: u32,
    },
    /// The padding between header and weights is not zero.
    BadPadding,
}

/// Header fields that [`LoadError::InvalidField`] can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Field {
    /// `dim` is zero.
    Dim,
    /// The chain has no CNF stage.
    Stages,
    /// A CNF stage has no layers, or a layer of width zero.
    Layers,
    /// `end_time` is not finite and positive.
    EndTime,
    /// A solver parameter is out of range (steps 0, tolerances not positive, …).
    Solver,
    /// The anomaly threshold or its quantile is not finite / not in (0, 1).
    Threshold,
    /// An activation parameter (swish β) is not finite.
    Activation,
    /// The model needs more working memory than `u32` can count.
    Size,
    /// A stage is newer than the file's format version (a version-1 file
    /// with a `Linear` stage).
    StageVersion,
    /// A CNF stage stores its matrices as f16 or i8 and this runtime was
    /// built without feature `quantized`.
    MatrixEncoding,
    /// An image stage is malformed (logit α outside (0, 0.5), an empty
    /// image or one larger than the row, a squeeze of odd height or
    /// width), or this runtime was built without feature `images`.
    ImageStage,
    /// A kernel density base is malformed (no centres or more than
    /// [`crate::format::MAX_KDE_CENTRES`], a bandwidth not finite and
    /// positive) or is not the chain's last stage.
    KdeBase,
}

/// Why one evaluation (log-density, sample, score) did not finish.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum SolveError {
    /// The input row has the wrong number of values.
    InputDimension {
        /// The model's data dimension.
        expected: u32,
        /// Values given.
        found: u32,
    },
    /// The input contains NaN or an infinity.
    NonFiniteInput {
        /// Index of the first offending value.
        index: u32,
    },
    /// The caller's scratch buffer is smaller than [`crate::Model::scratch_len`].
    ScratchTooSmall {
        /// Floats needed.
        needed: u32,
        /// Floats given.
        capacity: u32,
    },
    /// An output buffer has the wrong length.
    OutputLength {
        /// Length needed.
        expected: u32,
        /// Length given.
        found: u32,
    },
    /// The adaptive solver used up its step budget before reaching the end time.
    MaxStepsReached {
        /// Time reached.
        t: f32,
        /// Steps attempted.
        steps: u32,
    },
    /// The adaptive step size fell below the minimum (or below float resolution).
    StepSizeUnderflow {
        /// Time reached.
        t: f32,
        /// Step size proposed.
        h: f32,
    },
    /// The state became NaN or infinite during integration.
    NonFiniteState {
        /// Time at which it was detected.
        t: f32,
    },
    /// The adaptive step size became NaN or infinite (the state or its
    /// derivative overflowed while the step was being chosen).
    NonFiniteStep {
        /// Time at which it was detected.
        t: f32,
    },
    /// `rows_per_block` (packed path) is zero, or a lockstep solve got no
    /// slots or more than it can hold.
    InvalidBlockSize,
    /// A stage of a model that passed [`crate::Model::from_bytes`] could not
    /// be read: a bug in the runtime, reported instead of panicking.
    Internal,
    /// The solver settings are invalid (zero steps, non-positive tolerance, …).
    InvalidSolver,
    /// An input value is outside the range the model's first transform
    /// takes: a model with a logit stage takes pixels scaled to `[0, 1]`.
    InputOutOfRange {
        /// Index of the first offending value.
        index: u32,
    },
}

/// Any runtime error.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// Loading the model failed.
    Load(LoadError),
    /// An evaluation failed.
    Solve(SolveError),
}

/// Stable numeric codes, one per error variant, for C callers, firmware
/// logs and other places that cannot carry the typed value: load errors are
/// −1…−19, solve errors −20…−39 (0 is success). [`CODES`] names them all.
impl LoadError {
    /// This error's code (see [`CODES`]).
    pub const fn code(&self) -> i32 {
        match self {
            LoadError::Truncated { .. } => -1,
            LoadError::BadMagic => -2,
            LoadError::UnsupportedVersion { .. } => -3,
            LoadError::ChecksumMismatch { .. } => -4,
            LoadError::MalformedHeader => -5,
            LoadError::InvalidField(_) => -6,
            LoadError::ShapeMismatch { .. } => -7,
            LoadError::WeightCount { .. } => -8,
            LoadError::NonFiniteWeight { .. } => -9,
            LoadError::ZeroScale { .. } => -10,
            LoadError::BadPadding => -11,
        }
    }
}

impl SolveError {
    /// This error's code (see [`CODES`]).
    pub const fn code(&self) -> i32 {
        match self {
            SolveError::InputDimension { .. } => -20,
            SolveError::NonFiniteInput { .. } => -21,
            SolveError::ScratchTooSmall { .. } => -22,
            SolveError::OutputLength { .. } => -23,
            SolveError::MaxStepsReached { .. } => -24,
            SolveError::StepSizeUnderflow { .. } => -25,
            SolveError::NonFiniteState { .. } => -26,
            SolveError::NonFiniteStep { .. } => -27,
            SolveError::InvalidBlockSize => -28,
            SolveError::Internal => -29,
            SolveError::InvalidSolver => -30,
            SolveError::InputOutOfRange { .. } => -31,
        }
    }
}

impl Error {
    /// The wrapped error's code (see [`CODES`]).
    pub const fn code(&self) -> i32 {
        match self {
            Error::Load(e) => e.code(),
            Error::Solve(e) => e.code(),
        }
    }
}

/// Every error code with a short name, in code order within each group.
pub const CODES: [(i32, &str); 23] = [
    (-1, "truncated"),
    (-2, "bad magic"),
    (-3, "unsupported version"),
    (-4, "checksum mismatch"),
    (-5, "malformed header"),
    (-6, "invalid header field"),
    (-7, "shape mismatch"),
    (-8, "wrong weight count"),
    (-9, "non-finite weight"),
    (-10, "zero scale"),
    (-11, "bad padding"),
    (-20, "input dimension mismatch"),
    (-21, "non-finite input"),
    (-22, "scratch too small"),
    (-23, "output length mismatch"),
    (-24, "max steps reached"),
    (-25, "step size underflow"),
    (-26, "non-finite state"),
    (-27, "non-finite step size"),
    (-28, "invalid block size"),
    (-29, "internal error"),
    (-30, "invalid solver"),
    (-31, "input out of range"),
];

impl From<LoadError> for Error {
    fn from(e: LoadError) -> Self {
        Error::Load(e)
    }
}

impl From<SolveError> for Error {
    fn from(e: SolveError) -> Self {
        Error::Solve(e)
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Field::Dim => "dim must be at least 1",
            Field::Stages => "the chain must contain at least one CNF stage",
            Field::Layers => "every CNF stage needs at least one layer and every width must be positive",
            Field::EndTime => "end_time must be finite and positive",
            Field::Solver => "solver settings out of range",
            Field::Threshold => "threshold must be finite and its quantile in (0, 1)",
            Field::Activation => "activation parameter must be finite",
            Field::Size => "model too large to address",
            Field::StageVersion => "a stage is newer than the file's format version",
            Field::MatrixEncoding => "f16 / i8 matrices need feature `quantized`",
            // (Short: every byte counts in the 64 KiB WASM build.)
            Field::ImageStage => "bad image stage, or no feature `images`",
            Field::KdeBase => "bad KDE base (not last, or no feature `kde`)",
        })
    }
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            LoadError::Truncated { len, needed } => {
                write!(f, "model truncated: {len} bytes, at least {needed} needed")
            }
            LoadError::BadMagic => f.write_str("not an FFJORD model file (bad magic bytes)"),
            LoadError::UnsupportedVersion { found, supported } => write!(
                f,
                "model format version {found} is not supported (this runtime reads versions 1 to {supported})"
            ),
            LoadError::ChecksumMismatch { stored, computed } => write!(
                f,
                "model checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): file is corrupt"
            ),
            LoadError::MalformedHeader => {
                f.write_str("model header is malformed or exceeds the runtime's capacities")
            }
            LoadError::InvalidField(field) => write!(f, "invalid model header: {field}"),
            LoadError::ShapeMismatch { stage, layer, expected, found } => write!(
                f,
                "stage {stage} layer {layer}: width {found}, expected {expected} (the data dimension)"
            ),
            LoadError::WeightCount { expected, found } => {
                write!(f, "weight section holds {found} floats, the header's shapes need {expected}")
            }
            LoadError::NonFiniteWeight { index } => {
                write!(f, "weight {index} is NaN or infinite")
            }
            LoadError::ZeroScale { index } => {
                write!(f, "scale at weight {index} is zero: the map is not invertible")
            }
            LoadError::BadPadding => f.write_str("non-zero padding between header and weights"),
        }
    }
}

impl fmt::Display for SolveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            SolveError::InputDimension { expected, found } => {
                write!(f, "input has {found} values, the model's dimension is {expected}")
            }
            SolveError::NonFiniteInput { index } => {
                write!(f, "input value {index} is NaN or infinite")
            }
            SolveError::ScratchTooSmall { needed, capacity } => {
                write!(f, "scratch holds {capacity} floats, {needed} needed")
            }
            SolveError::OutputLength { expected, found } => {
                write!(f, "output buffer holds {found} values, {expected} needed")
            }
            SolveError::MaxStepsReached { t, steps } => {
                write!(f, "solver gave up after {steps} steps at t = {}", Decimal(t))
            }
            SolveError::NonFiniteStep { t } => {
                write!(
                    f,
                    "step size became NaN or infinite at t = {} (the state or its derivative overflowed)",
                    Decimal(t)
                )
            }
            SolveError::StepSizeUnderflow { t, h } => {
                write!(f, "step size {} below the minimum at t = {}", Decimal(h), Decimal(t))
            }
            SolveError::NonFiniteState { t } => {
                write!(f, "state became NaN or infinite at t = {}", Decimal(t))
            }
            SolveError::InvalidSolver => f.write_str("invalid solver settings"),
            SolveError::InputOutOfRange { index } => {
                write!(f, "input value {index} is outside [0, 1]")
            }
            SolveError::InvalidBlockSize => f.write_str("rows per block must be at least 1"),
            SolveError::Internal => {
                f.write_str("internal error: a validated model's stage could not be read")
            }
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Load(e) => e.fmt(f),
            Error::Solve(e) => e.fmt(f),
        }
    }
}

impl core::error::Error for LoadError {}
impl core::error::Error for SolveError {}
impl core::error::Error for Error {}

#[cfg(test)]
mod code_tests {
    use super::*;

    /// One variant of each kind, so a new variant without a code fails to
    /// compile (the matches above) and one with a duplicate or unnamed code
    /// fails here.
    #[test]
    fn every_error_has_its_own_named_code() {
        let all: [i32; 23] = [
            LoadError::Truncated { len: 0, needed: 1 }.code(),
            LoadError::BadMagic.code(),
            LoadError::UnsupportedVersion { found: 9, supported: 2 }.code(),
            LoadError::ChecksumMismatch { stored: 0, computed: 1 }.code(),
            LoadError::MalformedHeader.code(),
            LoadError::InvalidField(Field::Dim).code(),
            LoadError::ShapeMismatch { stage: 0, layer: 0, expected: 1, found: 2 }.code(),
            LoadError::WeightCount { expected: 1, found: 2 }.code(),
            LoadError::NonFiniteWeight { index: 0 }.code(),
            LoadError::ZeroScale { index: 0 }.code(),
            LoadError::BadPadding.code(),
            SolveError::InputDimension { expected: 1, found: 2 }.code(),
            SolveError::NonFiniteInput { index: 0 }.code(),
            SolveError::ScratchTooSmall { needed: 1, capacity: 0 }.code(),
            SolveError::OutputLength { expected: 1, found: 2 }.code(),
            SolveError::MaxStepsReached { t: 0.0, steps: 1 }.code(),
            SolveError::StepSizeUnderflow { t: 0.0, h: 0.0 }.code(),
            SolveError::NonFiniteState { t: 0.0 }.code(),
            SolveError::NonFiniteStep { t: 0.0 }.code(),
            SolveError::InvalidBlockSize.code(),
            SolveError::Internal.code(),
            SolveError::InvalidSolver.code(),
            SolveError::InputOutOfRange { index: 0 }.code(),
        ];
        for (i, code) in all.iter().enumerate() {
            assert_eq!(CODES[i].0, *code, "{} is listed as {}", code, CODES[i].1);
            assert!(!all[..i].contains(code), "code {code} used twice");
        }
        assert_eq!(Error::Load(LoadError::BadMagic).code(), -2);
        assert_eq!(Error::Solve(SolveError::Internal).code(), -29);
    }
}
