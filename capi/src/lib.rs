//! A C ABI over `ffjord-runtime`, for firmware and programs written in C.
//!
//! - No allocation: the caller owns the model bytes, the [`FfjordModel`]
//!   storage and the scratch buffers (their sizes come from
//!   [`ffjord_model_scratch_len`]).
//! - No panics across the boundary: every pointer is checked for null, every
//!   length is passed in, and every runtime error comes back as an
//!   [`FfjordStatus`] that maps one-to-one to the runtime's typed errors
//!   ([`ffjord_status_name`] names it).
//! - The header `include/ffjord.h` is generated from this file by cbindgen;
//!   a test fails when the committed header is stale.
//!
//! Zero-copy: a loaded model points into the caller's bytes, which must stay
//! unchanged and alive while the model is used.
#![cfg_attr(not(feature = "std"), no_std)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

use core::ffi::c_char;
use core::mem::{align_of, size_of};

use ffjord_runtime::{Dopri5, Error, Flow, LoadError, Model, SolveError, Solver, Verdict};
use rand_xoshiro::Xoshiro128PlusPlus;
use rand_xoshiro::rand_core::SeedableRng;

/// 64-bit words of storage an [`FfjordModel`] holds (enough on every target:
/// 64-bit hosts need the most; checked at compile time).
pub const FFJORD_MODEL_WORDS: usize = 104;

/// Storage for a loaded model, owned by the caller (static, stack or heap),
/// filled by [`ffjord_model_load`]. Its contents are private.
/// (An array of `uint64_t` so that C gives it 8-byte alignment.)
#[repr(C)]
pub struct FfjordModel {
    /// Private: written by [`ffjord_model_load`] only.
    pub opaque: [u64; FFJORD_MODEL_WORDS],
}

/// What an [`FfjordModel`]'s storage holds once loaded.
#[repr(C)]
struct Loaded {
    /// [`LOADED`] once [`ffjord_model_load`] succeeded: catches storage that
    /// was never loaded (not a guarantee — C can hand over any bytes).
    magic: u32,
    solver: Solver,
    /// Borrows the caller's bytes: the C contract keeps them alive.
    model: Model<'static>,
}

const LOADED: u32 = 0xFF7D_0A01;
const _: () = assert!(size_of::<Loaded>() <= size_of::<FfjordModel>());
const _: () = assert!(align_of::<Loaded>() <= align_of::<FfjordModel>());

/// Every outcome of a call (returned as `int32_t`): 0 is success; each runtime error has its own
/// negative code, the runtime's (load errors −1…−19, solve errors −20…−39),
/// and the ABI's own checks −40 and below.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FfjordStatus {
    /// Success.
    Ok = 0,
    /// The file ends before its header says it should.
    Truncated = -1,
    /// Not a model file (wrong magic bytes).
    BadMagic = -2,
    /// A format version this build does not read.
    UnsupportedVersion = -3,
    /// The checksum does not match: the file is corrupted.
    ChecksumMismatch = -4,
    /// The header does not decode.
    MalformedHeader = -5,
    /// A header field is out of range.
    InvalidField = -6,
    /// Layer widths do not chain, or the last does not equal the dimension.
    ShapeMismatch = -7,
    /// The weight section has the wrong number of floats.
    WeightCount = -8,
    /// A weight is NaN or infinite.
    NonFiniteWeight = -9,
    /// A scale (standardization, affine, linear diagonal) is zero.
    ZeroScale = -10,
    /// The padding before the weights is not zero.
    BadPadding = -11,
    /// The input row's length is not the model's dimension.
    InputDimension = -20,
    /// The input row has a NaN or infinite value.
    NonFiniteInput = -21,
    /// The scratch buffer is shorter than `ffjord_model_scratch_len`.
    ScratchTooSmall = -22,
    /// An output buffer's length does not match the rows.
    OutputLength = -23,
    /// The solver reached its step budget.
    MaxStepsReached = -24,
    /// The adaptive step size underflowed.
    StepSizeUnderflow = -25,
    /// The ODE state became NaN or infinite.
    NonFiniteState = -26,
    /// The step size became NaN or infinite.
    NonFiniteStep = -27,
    /// An invalid rows-per-block count.
    InvalidBlockSize = -28,
    /// An internal inconsistency (a bug: please report it).
    Internal = -29,
    /// Invalid solver settings.
    InvalidSolver = -30,
    /// An input value is outside [0, 1] (a model with a logit stage).
    InputOutOfRange = -31,
    /// A required pointer was null.
    NullPointer = -40,
    /// The model storage was never loaded by `ffjord_model_load`.
    NotLoaded = -41,
    /// The model carries no anomaly threshold.
    Uncalibrated = -42,
}

impl FfjordStatus {
    /// The status for a runtime error code ([`ffjord_runtime::error::CODES`]);
    /// `Internal` for a code this build does not know (none: tested).
    fn from_code(code: i32) -> Self {
        NAMES.iter().map(|(s, _)| *s).find(|s| *s as i32 == code).unwrap_or(FfjordStatus::Internal)
    }
}

impl From<LoadError> for FfjordStatus {
    fn from(e: LoadError) -> Self {
        FfjordStatus::from_code(e.code())
    }
}

impl From<SolveError> for FfjordStatus {
    fn from(e: SolveError) -> Self {
        FfjordStatus::from_code(e.code())
    }
}

impl From<Error> for FfjordStatus {
    fn from(e: Error) -> Self {
        FfjordStatus::from_code(e.code())
    }
}

/// Every status with its name, NUL-terminated for C. The runtime's errors
/// carry the runtime's own codes and names (`ffjord_runtime::error::CODES`;
/// a test checks that the two tables agree entry by entry).
const NAMES: [(FfjordStatus, &str); 27] = [
    (FfjordStatus::Ok, "ok\0"),
    (FfjordStatus::Truncated, "truncated\0"),
    (FfjordStatus::BadMagic, "bad magic\0"),
    (FfjordStatus::UnsupportedVersion, "unsupported version\0"),
    (FfjordStatus::ChecksumMismatch, "checksum mismatch\0"),
    (FfjordStatus::MalformedHeader, "malformed header\0"),
    (FfjordStatus::InvalidField, "invalid header field\0"),
    (FfjordStatus::ShapeMismatch, "shape mismatch\0"),
    (FfjordStatus::WeightCount, "wrong weight count\0"),
    (FfjordStatus::NonFiniteWeight, "non-finite weight\0"),
    (FfjordStatus::ZeroScale, "zero scale\0"),
    (FfjordStatus::BadPadding, "bad padding\0"),
    (FfjordStatus::InputDimension, "input dimension mismatch\0"),
    (FfjordStatus::NonFiniteInput, "non-finite input\0"),
    (FfjordStatus::ScratchTooSmall, "scratch too small\0"),
    (FfjordStatus::OutputLength, "output length mismatch\0"),
    (FfjordStatus::MaxStepsReached, "max steps reached\0"),
    (FfjordStatus::StepSizeUnderflow, "step size underflow\0"),
    (FfjordStatus::NonFiniteState, "non-finite state\0"),
    (FfjordStatus::NonFiniteStep, "non-finite step size\0"),
    (FfjordStatus::InvalidBlockSize, "invalid block size\0"),
    (FfjordStatus::Internal, "internal error\0"),
    (FfjordStatus::InvalidSolver, "invalid solver\0"),
    (FfjordStatus::InputOutOfRange, "input out of range\0"),
    (FfjordStatus::NullPointer, "null pointer\0"),
    (FfjordStatus::NotLoaded, "model not loaded\0"),
    (FfjordStatus::Uncalibrated, "model has no threshold\0"),
];

/// The verdict of [`ffjord_score`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FfjordVerdict {
    /// Score at or below the threshold.
    Normal = 0,
    /// Score above the threshold.
    Anomaly = 1,
    /// The model carries no threshold.
    Uncalibrated = 2,
}

/// What a model's anomaly score is (`ffjord_model_score_kind`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FfjordScoreKind {
    /// `−log p(x)`, the model's density (every file before format version 6).
    NegLogDensity = 0,
    /// `−log N(z; 0, I)` of the latent point: the volume change (and any
    /// kernel density base) left out. Format version 6.
    LatentRadius = 1,
    /// `−log p_base(z)`: the base density (a kernel density base, or
    /// `N(0, I)`) at the latent point, the volume change left out. Format
    /// version 7.
    LatentBase = 2,
}

/// One row's result.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FfjordScore {
    /// `log p(x)` in nats.
    pub log_p: f32,
    /// The model's anomaly score (`ffjord_model_score_kind`): `−log p(x)`,
    /// the latent radius `−log N(z)`, or the base density's `−log p_base(z)`.
    pub score: f32,
    /// Against the model's threshold: an `FfjordVerdict` value.
    pub verdict: i32,
    /// Function evaluations the solver spent.
    pub nfe: u32,
}

type Status = Result<(), FfjordStatus>;

/// The status code a C function returns (an `FfjordStatus` value as
/// `int32_t`: a C enum's size is the C compiler's choice, an `int32_t` is not).
fn finish(r: Status) -> i32 {
    r.err().unwrap_or(FfjordStatus::Ok) as i32
}

/// The loaded model behind `model`.
///
/// # Safety
/// `model` is null or points to an `FfjordModel` the caller owns.
unsafe fn loaded<'m>(model: *const FfjordModel) -> Result<&'m Loaded, FfjordStatus> {
    // SAFETY: non-null, aligned for `Loaded` (checked at compile time), and
    // the magic is read before anything else is trusted.
    let l = unsafe { model.cast::<Loaded>().as_ref() }.ok_or(FfjordStatus::NullPointer)?;
    if l.magic != LOADED {
        return Err(FfjordStatus::NotLoaded);
    }
    Ok(l)
}

/// # Safety
/// As [`loaded`], and no other reference to the model is live.
unsafe fn loaded_mut<'m>(model: *mut FfjordModel) -> Result<&'m mut Loaded, FfjordStatus> {
    // SAFETY: as in `loaded`.
    unsafe { loaded(model)? };
    // SAFETY: checked above; the caller gives exclusive access.
    unsafe { model.cast::<Loaded>().as_mut() }.ok_or(FfjordStatus::NullPointer)
}

/// A slice from C, or `NullPointer` (an empty slice may have a null pointer).
///
/// # Safety
/// `ptr` is null or valid for `len` reads.
unsafe fn slice<'s, T>(ptr: *const T, len: usize) -> Result<&'s [T], FfjordStatus> {
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(FfjordStatus::NullPointer);
    }
    // SAFETY: the caller's contract.
    Ok(unsafe { core::slice::from_raw_parts(ptr, len) })
}

/// # Safety
/// `ptr` is null or valid for `len` writes, not aliased.
unsafe fn slice_mut<'s, T>(ptr: *mut T, len: usize) -> Result<&'s mut [T], FfjordStatus> {
    if len == 0 {
        return Ok(&mut []);
    }
    if ptr.is_null() {
        return Err(FfjordStatus::NullPointer);
    }
    // SAFETY: the caller's contract.
    Ok(unsafe { core::slice::from_raw_parts_mut(ptr, len) })
}

fn flow(l: &Loaded) -> Result<Flow<'_, 'static>, FfjordStatus> {
    Ok(Flow::new(&l.model, l.solver)?)
}

/// Validates a model file (`len` bytes at `bytes`) and fills `out`. The model
/// reads its weights from `bytes` in place: keep them alive and unchanged
/// while `out` is used. On error `out` is left not loaded.
///
/// # Safety
/// `bytes` is valid for `len` reads; `out` points to caller-owned storage.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ffjord_model_load(bytes: *const u8, len: usize, out: *mut FfjordModel) -> i32 {
    let run = || -> Status {
        if out.is_null() {
            return Err(FfjordStatus::NullPointer);
        }
        // SAFETY: `out` is caller-owned storage, aligned for `Loaded`, whose
        // first field (repr(C)) is the magic: cleared, the storage reads as
        // not loaded until the load succeeds.
        unsafe { out.cast::<u32>().write(0) };
        // SAFETY: the caller keeps `bytes` alive while the model is used (the
        // C contract stands in for the lifetime Rust cannot see).
        let bytes: &'static [u8] = unsafe { slice(bytes, len)? };
        let model = Model::from_bytes(bytes)?;
        let solver = model.default_solver();
        // SAFETY: size and alignment checked at compile time.
        unsafe { out.cast::<Loaded>().write(Loaded { magic: LOADED, solver, model }) };
        Ok(())
    };
    finish(run())
}

/// The model's data dimension (values per row); 0 if `model` is not loaded.
///
/// # Safety
/// `model` is null or points to an `FfjordModel`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ffjord_model_dim(model: *const FfjordModel) -> usize {
    // SAFETY: as documented.
    unsafe { loaded(model) }.map_or(0, |l| l.model.dim())
}

/// Floats of scratch each scoring or sampling call needs with the model's
/// current solver; 0 if `model` is not loaded.
///
/// # Safety
/// `model` is null or points to an `FfjordModel`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ffjord_model_scratch_len(model: *const FfjordModel) -> usize {
    // SAFETY: as documented.
    unsafe { loaded(model) }.map_or(0, |l| l.model.scratch_len(&l.solver))
}

/// What the model's anomaly score is: an `FfjordScoreKind` value, or a
/// negative status if `model` is not loaded.
///
/// # Safety
/// `model` is null or points to an `FfjordModel`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ffjord_model_score_kind(model: *const FfjordModel) -> i32 {
    // SAFETY: as documented.
    match unsafe { loaded(model) } {
        Ok(l) => match l.model.score_kind() {
            ffjord_runtime::ScoreKind::LatentRadius => FfjordScoreKind::LatentRadius as i32,
            ffjord_runtime::ScoreKind::NegLogDensity => FfjordScoreKind::NegLogDensity as i32,
            ffjord_runtime::ScoreKind::LatentBase => FfjordScoreKind::LatentBase as i32,
        },
        Err(status) => status as i32,
    }
}

/// The stored anomaly threshold on the model's score
/// (`ffjord_model_score_kind`) and the validation quantile it was set at;
/// `Uncalibrated` if the model has none.
///
/// # Safety
/// `model` as above; `score` and `quantile` are null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ffjord_model_threshold(
    model: *const FfjordModel,
    score: *mut f32,
    quantile: *mut f32,
) -> i32 {
    let run = || -> Status {
        // SAFETY: as documented.
        let t = unsafe { loaded(model)? }.model.threshold().ok_or(FfjordStatus::Uncalibrated)?;
        // SAFETY: each pointer is null (skipped) or writable.
        unsafe {
            if let Some(s) = score.as_mut() {
                *s = t.score;
            }
            if let Some(q) = quantile.as_mut() {
                *q = t.quantile;
            }
        }
        Ok(())
    };
    finish(run())
}

/// Evaluates with fixed-step RK4, `steps` steps per CNF block (scratch needs
/// may change: ask `ffjord_model_scratch_len` again).
///
/// # Safety
/// `model` is null or points to an `FfjordModel` not used concurrently.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ffjord_model_use_rk4(model: *mut FfjordModel, steps: u32) -> i32 {
    // SAFETY: as documented.
    unsafe { set_solver(model, Solver::Rk4 { steps }) }
}

/// Evaluates with adaptive Dopri5 at `rtol = atol = tol`.
///
/// # Safety
/// As [`ffjord_model_use_rk4`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ffjord_model_use_dopri5(model: *mut FfjordModel, tol: f32) -> i32 {
    // SAFETY: as documented.
    unsafe { set_solver(model, Solver::Dopri5(Dopri5::with_tolerance(tol))) }
}

/// Back to the solver stored in the model file.
///
/// # Safety
/// As [`ffjord_model_use_rk4`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ffjord_model_use_default_solver(model: *mut FfjordModel) -> i32 {
    let run = || -> Status {
        // SAFETY: as documented.
        let l = unsafe { loaded_mut(model)? };
        l.solver = l.model.default_solver();
        Ok(())
    };
    finish(run())
}

/// # Safety
/// As [`ffjord_model_use_rk4`].
unsafe fn set_solver(model: *mut FfjordModel, solver: Solver) -> i32 {
    let run = || -> Status {
        solver.validate()?;
        // SAFETY: the callers' contract.
        unsafe { loaded_mut(model)? }.solver = solver;
        Ok(())
    };
    finish(run())
}

/// Scores one row `x` (`dim` values): `log p`, `−log p`, the verdict against
/// the stored threshold and the solver's function evaluations, into `out`.
///
/// # Safety
/// `model` as above; `x` valid for `dim` reads; `scratch` valid for
/// `scratch_len` writes; `out` null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ffjord_score(
    model: *const FfjordModel,
    x: *const f32,
    dim: usize,
    scratch: *mut f32,
    scratch_len: usize,
    out: *mut FfjordScore,
) -> i32 {
    let run = || -> Status {
        // SAFETY: the documented contract, for each pointer.
        let (l, x, scratch) = unsafe { (loaded(model)?, slice(x, dim)?, slice_mut(scratch, scratch_len)?) };
        let out = unsafe { out.as_mut() }.ok_or(FfjordStatus::NullPointer)?;
        let s = flow(l)?.score(x, scratch)?;
        let verdict = match s.verdict {
            Verdict::Normal => FfjordVerdict::Normal,
            Verdict::Anomaly => FfjordVerdict::Anomaly,
            Verdict::Uncalibrated => FfjordVerdict::Uncalibrated,
        };
        *out = FfjordScore {
            log_p: s.log_density.log_p,
            score: s.score,
            verdict: verdict as i32,
            nfe: s.log_density.stats.nfe,
        };
        Ok(())
    };
    finish(run())
}

/// `log p` of `rows` rows (row-major, `dim` values each, `dim` the model's)
/// into `log_p` (`rows` floats). On a failing row, its index goes to
/// `failed_row` (if not null) and its status is returned.
///
/// # Safety
/// `model` as above; `xs` valid for `rows × dim` reads; `log_p` for `rows`
/// writes; `scratch` for `scratch_len` writes; `failed_row` null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ffjord_log_density_batch(
    model: *const FfjordModel,
    xs: *const f32,
    rows: usize,
    dim: usize,
    log_p: *mut f32,
    scratch: *mut f32,
    scratch_len: usize,
    failed_row: *mut usize,
) -> i32 {
    let run = || -> Status {
        let values = rows.checked_mul(dim).ok_or(FfjordStatus::OutputLength)?;
        // SAFETY: the documented contract, for each pointer.
        let (l, xs, out, scratch) = unsafe {
            (loaded(model)?, slice(xs, values)?, slice_mut(log_p, rows)?, slice_mut(scratch, scratch_len)?)
        };
        if dim != l.model.dim() {
            return Err(FfjordStatus::InputDimension);
        }
        flow(l)?.log_density_batch(xs, out, scratch).map(|_| ()).map_err(|e| {
            // SAFETY: null or writable.
            if let Some(r) = unsafe { failed_row.as_mut() } {
                *r = e.row;
            }
            e.error.into()
        })
    };
    finish(run())
}

/// Draws one sample (`dim` values) into `out` from the seeded generator
/// Xoshiro128++ (the generator of the Rust firmware examples and the WASM
/// page, so a seed gives the same sample everywhere).
///
/// # Safety
/// `model` as above; `out` valid for `dim` writes; `scratch` for
/// `scratch_len` writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ffjord_sample(
    model: *const FfjordModel,
    seed: u64,
    out: *mut f32,
    dim: usize,
    scratch: *mut f32,
    scratch_len: usize,
) -> i32 {
    let run = || -> Status {
        // SAFETY: the documented contract, for each pointer.
        let (l, out, scratch) =
            unsafe { (loaded(model)?, slice_mut(out, dim)?, slice_mut(scratch, scratch_len)?) };
        let mut rng = Xoshiro128PlusPlus::seed_from_u64(seed);
        flow(l)?.sample(&mut rng, out, scratch)?;
        Ok(())
    };
    finish(run())
}

/// A status code's name as a static NUL-terminated string (`"unknown
/// status"` for a code that is none).
#[unsafe(no_mangle)]
pub extern "C" fn ffjord_status_name(status: i32) -> *const c_char {
    NAMES
        .iter()
        .find(|(s, _)| *s as i32 == status)
        .map_or("unknown status\0", |(_, name)| name)
        .as_ptr()
        .cast()
}

#[cfg(not(feature = "std"))]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    // The runtime never panics on any input (fuzzed); should a bug reach
    // here, stop rather than unwind into C.
    loop {
        core::hint::spin_loop();
    }
}
