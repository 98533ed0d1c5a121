//! Log-densities, anomaly scores and samples: the chain of stages around the
//! solver, one row at a time. Many rows at a time (batch, packed blocks,
//! streaming slots) are in [`rows`].

mod rows;

use rand_core::Rng;

use crate::error::SolveError;
use crate::format::Stage;
use crate::model::{Direction, Model};
use crate::solver::{Solver, Stats, take};

/// The log-density of one row and what it cost.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LogDensity {
    /// `log p(x)` in the data's own units (standardization included).
    pub log_p: f32,
    /// `log p(z)` of the latent point under the base density (`N(0, I)`, or
    /// the model's kernel density base). Its negation is the latent-base
    /// score ([`crate::ScoreKind::LatentBase`]).
    pub log_p_base: f32,
    /// `Δ` with `log_p = log_p_base − delta_log_p` (spec §1): the negated sum
    /// of every stage's log|det|.
    pub delta_log_p: f32,
    /// `log N(z; 0, I)` of the latent point: equal to `log_p_base` unless the
    /// model has a kernel density base. Its negation is the latent-radius
    /// score ([`crate::ScoreKind::LatentRadius`]).
    pub log_p_normal: f32,
    /// Solver work, summed over CNF stages.
    pub stats: Stats,
}

/// An anomaly verdict against the model's calibrated threshold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Score at or below the threshold.
    Normal,
    /// Score above the threshold.
    Anomaly,
    /// The model carries no threshold.
    Uncalibrated,
}

impl Verdict {
    /// The rule every path applies: anomaly when `score` (the model's
    /// [`crate::ScoreKind`]) is above the threshold's score, uncalibrated
    /// without a threshold.
    pub fn against(score: f32, threshold: Option<crate::Threshold>) -> Verdict {
        match threshold {
            None => Verdict::Uncalibrated,
            Some(t) if score > t.score => Verdict::Anomaly,
            Some(_) => Verdict::Normal,
        }
    }

    /// `"normal"`, `"anomaly"` or `"uncalibrated"` (as CSV and JSON outputs write it).
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Normal => "normal",
            Verdict::Anomaly => "anomaly",
            Verdict::Uncalibrated => "uncalibrated",
        }
    }
}

/// An anomaly score of the model's [`crate::ScoreKind`] (`−log p(x)` unless
/// the file says otherwise), with the verdict.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Score {
    /// The score; larger is more anomalous.
    pub score: f32,
    /// The verdict against [`Model::threshold`].
    pub verdict: Verdict,
    /// The underlying log-density.
    pub log_density: LogDensity,
}

impl LogDensity {
    /// The anomaly score of `kind` this row has.
    pub fn score(&self, kind: crate::ScoreKind) -> f32 {
        match kind {
            crate::ScoreKind::NegLogDensity => -self.log_p,
            crate::ScoreKind::LatentRadius => -self.log_p_normal,
            crate::ScoreKind::LatentBase => -self.log_p_base,
        }
    }
}

/// A drawn sample's log-density, carried along the sampling path.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    /// `log p(x)` of the sample written to the output buffer.
    pub log_p: f32,
    /// Solver work, summed over CNF stages.
    pub stats: Stats,
}

/// A failure of one row inside a batch call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchError {
    /// Index of the row that failed.
    pub row: usize,
    /// Why.
    pub error: SolveError,
}

impl core::fmt::Display for BatchError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "row {}: {}", self.row, self.error)
    }
}

impl core::error::Error for BatchError {}

/// Most rows [`Flow::log_density_packed`] integrates together (larger
/// requests are split into blocks of this size).
pub const MAX_PACKED_ROWS: usize = crate::solver::MAX_LOCKSTEP_ROWS;

/// A model together with the solver used to evaluate it.
#[derive(Clone, Copy, Debug)]
pub struct Flow<'m, 'a> {
    model: &'m Model<'a>,
    solver: Solver,
    // (Only with feature `images`: the small WASM build counts bytes.)
    #[cfg(feature = "images")]
    image_trace: crate::ImageTrace,
}

impl<'m, 'a> Flow<'m, 'a> {
    /// A flow evaluated with `solver` (e.g. [`Model::default_solver`]).
    pub fn new(model: &'m Model<'a>, solver: Solver) -> Result<Self, SolveError> {
        solver.validate()?;
        Ok(Flow {
            model,
            solver,
            #[cfg(feature = "images")]
            image_trace: crate::ImageTrace::default(),
        })
    }

    /// This flow with convolutional CNF stages computing their trace as
    /// `trace` says: the exact trace in passes of a bounded number of lanes
    /// (less scratch, more time), or Hutchinson's seeded estimate (an
    /// unbiased estimate of log p, much faster on large images). Dense CNF
    /// stages always take the exact trace. A Hutchinson trace with no
    /// probes is an [`SolveError::InvalidSolver`].
    #[cfg(feature = "images")]
    pub fn with_image_trace(self, trace: crate::ImageTrace) -> Result<Self, SolveError> {
        if matches!(trace, crate::ImageTrace::Hutchinson { probes: 0, .. }) {
            return Err(SolveError::InvalidSolver);
        }
        Ok(Flow { image_trace: trace, ..self })
    }

    /// How convolutional CNF stages compute their trace.
    pub fn image_trace(&self) -> crate::ImageTrace {
        #[cfg(feature = "images")]
        return self.image_trace;
        #[cfg(not(feature = "images"))]
        crate::ImageTrace::default()
    }

    /// The model.
    pub fn model(&self) -> &'m Model<'a> {
        self.model
    }

    /// The solver.
    pub fn solver(&self) -> Solver {
        self.solver
    }

    /// Floats of scratch each call needs.
    pub fn scratch_len(&self) -> usize {
        #[cfg(feature = "images")]
        return self.model.scratch_len_with(&self.solver, self.image_trace);
        #[cfg(not(feature = "images"))]
        self.model.scratch_len(&self.solver)
    }

    fn split_scratch<'s>(
        &self,
        scratch: &'s mut [f32],
    ) -> Result<(&'s mut [f32], &'s mut [f32]), SolveError> {
        let needed = self.scratch_len();
        if scratch.len() < needed {
            return Err(crate::solver::scratch_error(needed, scratch.len()));
        }
        take(scratch, self.model.dim() + 1)
    }

    /// Exact `log p(x)` for one row `x` of length `D`.
    pub fn log_density(&self, x: &[f32], scratch: &mut [f32]) -> Result<LogDensity, SolveError> {
        self.forward(x, None, scratch)
    }

    /// Like [`Flow::log_density`], also writing the latent point `z` (length `D`).
    pub fn forward(
        &self,
        x: &[f32],
        latent: Option<&mut [f32]>,
        scratch: &mut [f32],
    ) -> Result<LogDensity, SolveError> {
        let model = self.model;
        model.check_input(x)?;
        let d = model.dim();
        let (y, work) = self.split_scratch(scratch)?;
        y.split_at_mut(d).0.copy_from_slice(x);
        let mut log_det = 0.0f32;
        if let Some((mean, std)) = model.standardization() {
            for ((v, m), s) in y.iter_mut().zip(mean.iter()).zip(std.iter()) {
                *v = (*v - m) / s;
            }
            log_det += model.standardize_log_det();
        }
        let mut stats = Stats::default();
        for (i, stage) in model.stages() {
            match stage {
                Stage::Affine | Stage::Linear => {
                    let (z, _) = y.split_at_mut(d);
                    log_det +=
                        model.apply_map(i, &stage, z, Direction::Forward).ok_or(SolveError::Internal)?;
                }
                Stage::Cnf(spec) => {
                    let block = model.cnf_block(i).ok_or(SolveError::Internal)?.with_gate_cache();
                    // State [z, ℓ] with ℓ(0) = 0; ℓ(T) = −∫ Tr J dt = −log|det| of this block.
                    let s = self.solver.integrate(&block, 0.0, spec.end_time, reset_ell(y), work)?;
                    stats = stats.merge(s);
                    log_det -= y.last().copied().unwrap_or(0.0);
                }
                Stage::Logit { alpha } if cfg!(feature = "images") => {
                    let (z, _) = y.split_at_mut(d);
                    log_det += crate::image::logit_forward(alpha, z)?;
                }
                Stage::Squeeze(shape) if cfg!(feature = "images") => {
                    crate::image::squeeze(shape, y, work, true)
                }
                Stage::ConvCnf(spec) if cfg!(feature = "images") => {
                    let block = model.conv_block(i, self.image_trace()).ok_or(SolveError::Internal)?;
                    let (s, ell) = integrate_prefix(&self.solver, &block, (0.0, spec.end_time), y, work)?;
                    stats = stats.merge(s);
                    log_det -= ell;
                }
                // (Not decoded without feature `images`: its code is left out.)
                Stage::Logit { .. } | Stage::Squeeze(_) | Stage::ConvCnf(_) => {
                    return Err(SolveError::Internal);
                }
                // The base, not a map: read after the chain.
                Stage::KdeBase(_) => {}
            }
        }
        let (z, _) = y.split_at(d);
        if let Some(out) = latent {
            if out.len() != d {
                return Err(SolveError::OutputLength { expected: d as u32, found: out.len() as u32 });
            }
            out.copy_from_slice(z);
        }
        let (log_p_base, log_p_normal) = model.latent_log_probs(z);
        Ok(LogDensity { log_p: log_p_base + log_det, log_p_base, delta_log_p: -log_det, log_p_normal, stats })
    }

    /// The model's anomaly score ([`Model::score_kind`]: `−log p(x)`, or the
    /// latent radius `−log N(z)`) and the verdict against its threshold.
    pub fn score(&self, x: &[f32], scratch: &mut [f32]) -> Result<Score, SolveError> {
        let log_density = self.log_density(x, scratch)?;
        let score = log_density.score(self.model.score_kind());
        let verdict = Verdict::against(score, self.model.threshold());
        Ok(Score { score, verdict, log_density })
    }

    /// Draws one sample into `out` (length `D`) by integrating every stage in
    /// reverse from a draw of the base density (`N(0, I)` or the model's
    /// kernel density base), carrying the log-density along the path.
    pub fn sample<R: Rng + ?Sized>(
        &self,
        rng: &mut R,
        out: &mut [f32],
        scratch: &mut [f32],
    ) -> Result<Sample, SolveError> {
        let d = self.model.dim();
        if out.len() != d {
            return Err(SolveError::OutputLength { expected: d as u32, found: out.len() as u32 });
        }
        self.model.sample_base(rng, out);
        self.inverse(out, scratch)
    }

    /// Maps a latent point `z` (in `x`, length `D`) to data space in place and
    /// returns the data-space log-density of the result.
    pub fn inverse(&self, x: &mut [f32], scratch: &mut [f32]) -> Result<Sample, SolveError> {
        let model = self.model;
        model.check_input(x)?;
        let d = model.dim();
        let (y, work) = self.split_scratch(scratch)?;
        y.split_at_mut(d).0.copy_from_slice(x);
        let log_p_base = model.base_log_prob(x);
        let mut log_det = 0.0f32;
        let mut stats = Stats::default();
        for (i, stage) in model.stages().rev() {
            match stage {
                Stage::Affine | Stage::Linear => {
                    let (z, _) = y.split_at_mut(d);
                    log_det +=
                        model.apply_map(i, &stage, z, Direction::Inverse).ok_or(SolveError::Internal)?;
                }
                Stage::Cnf(spec) => {
                    let block = model.cnf_block(i).ok_or(SolveError::Internal)?.with_gate_cache();
                    // Integrating T → 0 from ℓ = 0 leaves ℓ(0) = +∫ Tr J dt.
                    let s = self.solver.integrate(&block, spec.end_time, 0.0, reset_ell(y), work)?;
                    stats = stats.merge(s);
                    log_det += y.last().copied().unwrap_or(0.0);
                }
                Stage::Logit { alpha } if cfg!(feature = "images") => {
                    let (z, _) = y.split_at_mut(d);
                    log_det += crate::image::logit_inverse(alpha, z);
                }
                Stage::Squeeze(shape) if cfg!(feature = "images") => {
                    crate::image::squeeze(shape, y, work, false)
                }
                Stage::ConvCnf(spec) if cfg!(feature = "images") => {
                    let block = model.conv_block(i, self.image_trace()).ok_or(SolveError::Internal)?;
                    let (s, ell) = integrate_prefix(&self.solver, &block, (spec.end_time, 0.0), y, work)?;
                    stats = stats.merge(s);
                    log_det += ell;
                }
                // (Not decoded without feature `images`: its code is left out.)
                Stage::Logit { .. } | Stage::Squeeze(_) | Stage::ConvCnf(_) => {
                    return Err(SolveError::Internal);
                }
                // The base, not a map: read after the chain.
                Stage::KdeBase(_) => {}
            }
        }
        if let Some((mean, std)) = model.standardization() {
            for ((v, m), s) in y.iter_mut().zip(mean.iter()).zip(std.iter()) {
                *v = *v * s + m;
            }
            log_det += model.standardize_log_det();
        }
        let (z, _) = y.split_at(d);
        x.copy_from_slice(z);
        Ok(Sample { log_p: log_p_base + log_det, stats })
    }
}

/// Integrates a block that acts on the first `P` coordinates of the state
/// `y` (`[z (D), ℓ]`) over `t0 → t1`: the coordinate after the prefix is
/// set aside and its slot carries the block's `ℓ` from 0 (for `P = D` that
/// slot is `ℓ`'s own). Returns the statistics and `ℓ(t1)`.
fn integrate_prefix<B: crate::solver::Dynamics>(
    solver: &Solver,
    block: &B,
    (t0, t1): (f32, f32),
    y: &mut [f32],
    work: &mut [f32],
) -> Result<(Stats, f32), SolveError> {
    let p = block.dim().saturating_sub(1);
    let state = y.get_mut(..=p).ok_or(SolveError::Internal)?;
    let (_, ell) = state.split_at_mut(p);
    let ell = ell.first_mut().ok_or(SolveError::Internal)?;
    let kept = core::mem::replace(ell, 0.0);
    let stats = solver.integrate(block, t0, t1, state, work);
    let ell = state.last_mut().ok_or(SolveError::Internal)?;
    let delta = core::mem::replace(ell, kept);
    Ok((stats?, delta))
}

/// Sets the log-density channel (the last element) of the state to zero.
fn reset_ell(y: &mut [f32]) -> &mut [f32] {
    if let Some(ell) = y.last_mut() {
        *ell = 0.0;
    }
    y
}
