//! Log-densities, anomaly scores and samples: the chain of stages around the solver.

use rand_core::Rng;

use crate::error::SolveError;
use crate::format::Stage;
use crate::math::{copy, standard_normal_log_prob};
use crate::model::{Direction, Model};
use crate::solver::{RowStream, Solver, Stats, take};

/// The log-density of one row and what it cost.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LogDensity {
    /// `log p(x)` in the data's own units (standardization included).
    pub log_p: f32,
    /// `log N(z; 0, I)` of the latent point.
    pub log_p_base: f32,
    /// `Δ` with `log_p = log_p_base − delta_log_p` (spec §1): the negated sum
    /// of every stage's log|det|.
    pub delta_log_p: f32,
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

/// An anomaly score: `−log p(x)`, with the verdict.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Score {
    /// `−log p(x)`; larger is more anomalous.
    pub score: f32,
    /// The verdict against [`Model::threshold`].
    pub verdict: Verdict,
    /// The underlying log-density.
    pub log_density: LogDensity,
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
}

impl<'m, 'a> Flow<'m, 'a> {
    /// A flow evaluated with `solver` (e.g. [`Model::default_solver`]).
    pub fn new(model: &'m Model<'a>, solver: Solver) -> Result<Self, SolveError> {
        solver.validate()?;
        Ok(Flow { model, solver })
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
                        model.apply_map(i, &stage, z, Direction::Forward).ok_or(SolveError::InvalidSolver)?;
                }
                Stage::Cnf(spec) => {
                    let block = model.cnf_block(i).ok_or(SolveError::InvalidSolver)?;
                    // State [z, ℓ] with ℓ(0) = 0; ℓ(T) = −∫ Tr J dt = −log|det| of this block.
                    let s = self.solver.integrate(&block, 0.0, spec.end_time, reset_ell(y), work)?;
                    stats = stats.merge(s);
                    log_det -= y.last().copied().unwrap_or(0.0);
                }
            }
        }
        let (z, _) = y.split_at(d);
        if let Some(out) = latent {
            if out.len() != d {
                return Err(SolveError::OutputLength { expected: d as u32, found: out.len() as u32 });
            }
            out.copy_from_slice(z);
        }
        let log_p_base = standard_normal_log_prob(z);
        Ok(LogDensity { log_p: log_p_base + log_det, log_p_base, delta_log_p: -log_det, stats })
    }

    /// Anomaly score `−log p(x)` and the verdict against the model's threshold.
    pub fn score(&self, x: &[f32], scratch: &mut [f32]) -> Result<Score, SolveError> {
        let log_density = self.log_density(x, scratch)?;
        let score = -log_density.log_p;
        let verdict = match self.model.threshold() {
            None => Verdict::Uncalibrated,
            Some(t) if score > t.score => Verdict::Anomaly,
            Some(_) => Verdict::Normal,
        };
        Ok(Score { score, verdict, log_density })
    }

    /// Draws one sample into `out` (length `D`) by integrating every stage in
    /// reverse from `z ~ N(0, I)`, carrying the log-density along the path.
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
        crate::base::fill_standard_normal(rng, out);
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
        let log_p_base = standard_normal_log_prob(x);
        let mut log_det = 0.0f32;
        let mut stats = Stats::default();
        for (i, stage) in model.stages().rev() {
            match stage {
                Stage::Affine | Stage::Linear => {
                    let (z, _) = y.split_at_mut(d);
                    log_det +=
                        model.apply_map(i, &stage, z, Direction::Inverse).ok_or(SolveError::InvalidSolver)?;
                }
                Stage::Cnf(spec) => {
                    let block = model.cnf_block(i).ok_or(SolveError::InvalidSolver)?;
                    // Integrating T → 0 from ℓ = 0 leaves ℓ(0) = +∫ Tr J dt.
                    let s = self.solver.integrate(&block, spec.end_time, 0.0, reset_ell(y), work)?;
                    stats = stats.merge(s);
                    log_det += y.last().copied().unwrap_or(0.0);
                }
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

    /// `log p` of each row of `xs` (row-major, `D` per row) into `log_p`.
    /// Returns the summed solver statistics, or the first failing row.
    pub fn log_density_batch(
        &self,
        xs: &[f32],
        log_p: &mut [f32],
        scratch: &mut [f32],
    ) -> Result<Stats, BatchError> {
        self.batch(xs, log_p, scratch, |ld| ld.log_p)
    }

    /// Anomaly scores `−log p` of each row of `xs` into `scores`.
    pub fn score_batch(
        &self,
        xs: &[f32],
        scores: &mut [f32],
        scratch: &mut [f32],
    ) -> Result<Stats, BatchError> {
        self.batch(xs, scores, scratch, |ld| -ld.log_p)
    }

    fn batch(
        &self,
        xs: &[f32],
        out: &mut [f32],
        scratch: &mut [f32],
        value: impl Fn(&LogDensity) -> f32,
    ) -> Result<Stats, BatchError> {
        let d = self.model.dim();
        check_batch(d, xs, out)?;
        let mut stats = Stats::default();
        for (row, (x, o)) in xs.chunks_exact(d).zip(out.iter_mut()).enumerate() {
            let ld = self.log_density(x, scratch).map_err(|error| BatchError { row, error })?;
            *o = value(&ld);
            stats = stats.merge(ld.stats);
        }
        Ok(stats)
    }

    /// Floats of scratch [`Flow::log_density_packed`] needs with
    /// `rows_per_block` rows per block.
    pub fn packed_scratch_len(&self, rows_per_block: usize) -> usize {
        let rows = rows_per_block.min(MAX_PACKED_ROWS);
        let d = self.model.dim();
        let n = rows.saturating_mul(d + 1);
        let dynamics = crate::packed::packed_work_len(self.model.max_width(), d, rows);
        // State, solver vectors (or the lockstep Dopri5's), a time per row,
        // the kernel's scratch.
        let solver = self.solver.work_len(n).max(crate::solver::Dopri5::stream_work_len(rows, d + 1));
        n.saturating_add(solver).saturating_add(2 * rows).saturating_add(dynamics)
    }

    /// `log p` of each row of `xs` (row-major, `D` per row) into `log_p`, for
    /// throughput: `rows_per_block` rows at a time (at most
    /// [`MAX_PACKED_ROWS`]) are integrated together, and the net runs on all
    /// their lanes as small matrix products.
    ///
    /// Every row takes the steps it takes in [`Flow::log_density_batch`]:
    /// Dopri5 keeps a time, step size and accept/reject decision per row
    /// (rows evaluate at their own times in one kernel call; finished rows
    /// wait for the block's slowest), fixed-step solvers share their steps.
    /// Values agree with the one-row path to rounding (the kernel sums in
    /// another order and uses a vectorised tanh), not bit for bit. Returns
    /// the solver statistics summed over rows. Bad input names its row; a
    /// failed solve names the first row of its block.
    pub fn log_density_packed(
        &self,
        xs: &[f32],
        log_p: &mut [f32],
        rows_per_block: usize,
        scratch: &mut [f32],
    ) -> Result<Stats, BatchError> {
        let d = self.model.dim();
        check_batch(d, xs, log_p)?;
        let rows_per_block = rows_per_block.min(MAX_PACKED_ROWS);
        let needed = self.packed_scratch_len(rows_per_block);
        if rows_per_block == 0 || scratch.len() < needed {
            let error = if rows_per_block == 0 {
                SolveError::InvalidSolver
            } else {
                crate::solver::scratch_error(needed, scratch.len())
            };
            return Err(BatchError { row: 0, error });
        }
        // Every path checks every row as the one-row path does, before any
        // work: NaN, ±inf (e.g. a CSV's 1e39 read as f32) → `NonFiniteInput`.
        for (row, x) in xs.chunks_exact(d).enumerate() {
            self.model.check_input(x).map_err(|error| BatchError { row, error })?;
        }
        // One CNF stage and Dopri5: stream every row through the slots.
        let cnf_stages = self.model.stages().filter(|(_, s)| matches!(s, Stage::Cnf(_))).count();
        if let (Solver::Dopri5(dopri), 1) = (self.solver, cnf_stages) {
            return self.packed_stream(dopri, xs, log_p, rows_per_block, scratch);
        }
        let mut stats = Stats::default();
        let blocks = xs.chunks(rows_per_block.saturating_mul(d)).zip(log_p.chunks_mut(rows_per_block));
        for (b, (x_block, out)) in blocks.enumerate() {
            let first = b * rows_per_block;
            let s =
                self.packed_block(x_block, out, scratch).map_err(|error| BatchError { row: first, error })?;
            stats = stats.merge(s);
        }
        Ok(stats)
    }

    /// [`Flow::log_density_packed`] for a chain with one CNF stage under
    /// Dopri5: every row streams through `slots` lockstep slots.
    fn packed_stream(
        &self,
        dopri: crate::solver::Dopri5,
        xs: &[f32],
        log_p: &mut [f32],
        slots: usize,
        scratch: &mut [f32],
    ) -> Result<Stats, BatchError> {
        let model = self.model;
        let at_start = |error| BatchError { row: 0, error };
        let (cnf, spec) = model
            .stages()
            .find_map(|(i, s)| if let Stage::Cnf(spec) = s { Some((i, spec)) } else { None })
            .ok_or(at_start(SolveError::InvalidSolver))?;
        let block = model.cnf_block(cnf).ok_or(at_start(SolveError::InvalidSolver))?;
        let slots = slots.min(log_p.len()).max(1);
        let packed = crate::packed::PackedBlock::new(&block, slots);
        let mut stream = ChainStream { model, cnf, xs, out: log_p, next: 0, stats: Stats::default() };
        dopri
            .integrate_stream(&packed, 0.0, spec.end_time, &mut stream, scratch)
            .map_err(|(row, error)| BatchError { row, error })?;
        Ok(stream.stats)
    }

    /// One block of [`Flow::log_density_packed`]: `out` first accumulates each
    /// row's log-determinant, then receives its log p.
    fn packed_block(&self, xs: &[f32], out: &mut [f32], scratch: &mut [f32]) -> Result<Stats, SolveError> {
        let model = self.model;
        let d = model.dim();
        let rows = out.len();
        let (y, work) = take(scratch, rows * (d + 1))?;
        for (state, x) in y.chunks_exact_mut(d + 1).zip(xs.chunks_exact(d)) {
            let (z, _) = state.split_at_mut(d);
            z.copy_from_slice(x);
        }
        out.fill(0.0);
        if let Some((mean, std)) = model.standardization() {
            for (state, ld) in y.chunks_exact_mut(d + 1).zip(out.iter_mut()) {
                for ((v, m), s) in state.iter_mut().zip(mean.iter()).zip(std.iter()) {
                    *v = (*v - m) / s;
                }
                *ld += model.standardize_log_det();
            }
        }
        let mut stats = Stats::default();
        for (i, stage) in model.stages() {
            match stage {
                Stage::Affine | Stage::Linear => {
                    for (state, ld) in y.chunks_exact_mut(d + 1).zip(out.iter_mut()) {
                        let (z, _) = state.split_at_mut(d);
                        *ld += model
                            .apply_map(i, &stage, z, Direction::Forward)
                            .ok_or(SolveError::InvalidSolver)?;
                    }
                }
                Stage::Cnf(spec) => {
                    let block = model.cnf_block(i).ok_or(SolveError::InvalidSolver)?;
                    for state in y.chunks_exact_mut(d + 1) {
                        reset_ell(state);
                    }
                    let packed = crate::packed::PackedBlock::new(&block, rows);
                    let s = match self.solver {
                        Solver::Dopri5(dopri) => {
                            let mut stream = BlockStream { y, len: d + 1, next: 0 };
                            dopri
                                .integrate_stream(&packed, 0.0, spec.end_time, &mut stream, work)
                                .map_err(|(_, e)| e)?
                        }
                        // Fixed steps: one shared step sequence, counted once per row.
                        fixed => {
                            let s = fixed.integrate(&packed, 0.0, spec.end_time, y, work)?;
                            Stats {
                                nfe: s.nfe.saturating_mul(rows as u32),
                                accepted: s.accepted.saturating_mul(rows as u32),
                                rejected: s.rejected.saturating_mul(rows as u32),
                            }
                        }
                    };
                    stats = stats.merge(s);
                    for (state, ld) in y.chunks_exact(d + 1).zip(out.iter_mut()) {
                        *ld -= state.last().copied().unwrap_or(0.0);
                    }
                }
            }
        }
        for (state, lp) in y.chunks_exact(d + 1).zip(out.iter_mut()) {
            let (z, _) = state.split_at(d);
            *lp += standard_normal_log_prob(z);
        }
        Ok(stats)
    }
}

/// The rows of one block's state, streamed through the lockstep solver in
/// order and written back in place.
struct BlockStream<'y> {
    y: &'y mut [f32],
    len: usize,
    next: usize,
}

impl RowStream for BlockStream<'_> {
    fn next_row(&mut self, slot: &mut [f32]) -> Option<usize> {
        let row = self.next;
        let src = self.y.get(row * self.len..(row + 1) * self.len)?;
        copy(slot, src);
        self.next += 1;
        Some(row)
    }

    fn finish_row(&mut self, row: usize, slot: &mut [f32], _: Stats) {
        if let Some(dst) = self.y.get_mut(row * self.len..(row + 1) * self.len) {
            copy(dst, slot);
        }
    }
}

/// Rows of a one-CNF chain streamed through the lockstep solver: a row's
/// standardization and leading affine stages are applied as it enters a
/// slot, the trailing ones and the base density as it leaves.
struct ChainStream<'m, 'a, 'x> {
    model: &'m Model<'a>,
    cnf: usize,
    xs: &'x [f32],
    out: &'x mut [f32],
    next: usize,
    stats: Stats,
}

impl RowStream for ChainStream<'_, '_, '_> {
    fn next_row(&mut self, y: &mut [f32]) -> Option<usize> {
        let model = self.model;
        let d = model.dim();
        let row = self.next;
        let x = self.xs.get(row * d..(row + 1) * d)?;
        self.next += 1;
        let (z, ell) = y.split_at_mut(d.min(y.len()));
        copy(z, x);
        ell.fill(0.0);
        let mut log_det = 0.0f32;
        if let Some((mean, std)) = model.standardization() {
            for ((v, m), s) in z.iter_mut().zip(mean.iter()).zip(std.iter()) {
                *v = (*v - m) / s;
            }
            log_det += model.standardize_log_det();
        }
        for (i, stage) in model.stages().take_while(|&(i, _)| i < self.cnf) {
            log_det += model.apply_map(i, &stage, z, Direction::Forward).unwrap_or(0.0);
        }
        if let Some(o) = self.out.get_mut(row) {
            *o = log_det;
        }
        Some(row)
    }

    fn finish_row(&mut self, row: usize, y: &mut [f32], stats: Stats) {
        let model = self.model;
        let d = model.dim();
        // ℓ(T) = −log|det| of the CNF block.
        let mut log_det = -y.get(d).copied().unwrap_or(f32::NAN);
        let (z, _) = y.split_at_mut(d.min(y.len()));
        for (i, stage) in model.stages().skip_while(|&(i, _)| i <= self.cnf) {
            log_det += model.apply_map(i, &stage, z, Direction::Forward).unwrap_or(0.0);
        }
        if let Some(o) = self.out.get_mut(row) {
            *o += standard_normal_log_prob(z) + log_det;
        }
        self.stats = self.stats.merge(stats);
    }
}

/// Checks a batch's shapes; returns the number of rows.
fn check_batch(d: usize, xs: &[f32], out: &[f32]) -> Result<usize, BatchError> {
    if !xs.len().is_multiple_of(d) {
        return Err(BatchError {
            row: xs.len() / d,
            error: SolveError::InputDimension { expected: d as u32, found: (xs.len() % d) as u32 },
        });
    }
    let rows = xs.len() / d;
    if out.len() != rows {
        return Err(BatchError {
            row: 0,
            error: SolveError::OutputLength { expected: rows as u32, found: out.len() as u32 },
        });
    }
    Ok(rows)
}

/// Sets the log-density channel (the last element) of the state to zero.
fn reset_ell(y: &mut [f32]) -> &mut [f32] {
    if let Some(ell) = y.last_mut() {
        *ell = 0.0;
    }
    y
}
