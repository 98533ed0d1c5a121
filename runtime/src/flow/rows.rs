//! Many rows at a time: one after another ([`Flow::log_density_batch`]), or
//! integrated together for throughput ([`Flow::log_density_packed`]: blocks of
//! rows through the packed kernel, or rows streamed through the lockstep
//! Dopri5's slots).

use super::{BatchError, Flow, MAX_PACKED_ROWS, reset_ell};
use crate::error::SolveError;
use crate::format::Stage;
use crate::math::copy;
use crate::model::{Direction, Model};
use crate::solver::{RowStream, Solver, Stats, take};

impl<'m, 'a> Flow<'m, 'a> {
    /// `log p` of each row of `xs` (row-major, `D` per row) into `log_p`.
    /// Returns the summed solver statistics, or the first failing row.
    pub fn log_density_batch(
        &self,
        xs: &[f32],
        log_p: &mut [f32],
        scratch: &mut [f32],
    ) -> Result<Stats, BatchError> {
        self.batch(xs, log_p, scratch, RowValue::LogP)
    }

    /// The model's anomaly score ([`Model::score_kind`]) of each row of `xs`
    /// into `scores`.
    pub fn score_batch(
        &self,
        xs: &[f32],
        scores: &mut [f32],
        scratch: &mut [f32],
    ) -> Result<Stats, BatchError> {
        self.batch(xs, scores, scratch, RowValue::Score)
    }

    fn batch(
        &self,
        xs: &[f32],
        out: &mut [f32],
        scratch: &mut [f32],
        value: RowValue,
    ) -> Result<Stats, BatchError> {
        // (One copy of the row loop for every value: not generic, so the
        // small WASM build carries the solve once.)
        let d = self.model.dim();
        check_batch(d, xs, out)?;
        let kind = self.model.score_kind();
        let mut stats = Stats::default();
        for (row, (x, o)) in xs.chunks_exact(d).zip(out.iter_mut()).enumerate() {
            let ld = self.log_density(x, scratch).map_err(|error| BatchError { row, error })?;
            *o = match value {
                RowValue::LogP => ld.log_p,
                RowValue::Score => ld.score(kind),
            };
            stats = stats.merge(ld.stats);
        }
        Ok(stats)
    }

    /// Floats of scratch [`Flow::log_density_packed`] needs with
    /// `rows_per_block` rows per block.
    pub fn packed_scratch_len(&self, rows_per_block: usize) -> usize {
        if self.model.has_image_stages() {
            // Scored one row at a time (below).
            return self.scratch_len();
        }
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
        self.packed(xs, log_p, rows_per_block, scratch, RowValue::LogP)
    }

    /// The model's anomaly score ([`Model::score_kind`]) of each row of `xs`
    /// into `scores`, integrated as [`Flow::log_density_packed`] integrates
    /// (the same steps, the same scratch; values agree with
    /// [`Flow::score_batch`] to rounding).
    pub fn score_packed(
        &self,
        xs: &[f32],
        scores: &mut [f32],
        rows_per_block: usize,
        scratch: &mut [f32],
    ) -> Result<Stats, BatchError> {
        self.packed(xs, scores, rows_per_block, scratch, RowValue::Score)
    }

    fn packed(
        &self,
        xs: &[f32],
        out: &mut [f32],
        rows_per_block: usize,
        scratch: &mut [f32],
        value: RowValue,
    ) -> Result<Stats, BatchError> {
        let d = self.model.dim();
        check_batch(d, xs, out)?;
        let rows_per_block = rows_per_block.min(MAX_PACKED_ROWS);
        let needed = self.packed_scratch_len(rows_per_block);
        if rows_per_block == 0 || scratch.len() < needed {
            let error = if rows_per_block == 0 {
                SolveError::InvalidBlockSize
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
        // Image models (format version 4) have no packed kernel: one row at
        // a time, the same values as `log_density_batch`.
        if self.model.has_image_stages() {
            return self.batch(xs, out, scratch, value);
        }
        // One CNF stage and Dopri5: stream every row through the slots.
        let cnf_stages = self.model.stages().filter(|(_, s)| matches!(s, Stage::Cnf(_))).count();
        if let (Solver::Dopri5(dopri), 1) = (self.solver, cnf_stages) {
            return self.packed_stream(dopri, xs, out, rows_per_block, scratch, value);
        }
        let mut stats = Stats::default();
        let blocks = xs.chunks(rows_per_block.saturating_mul(d)).zip(out.chunks_mut(rows_per_block));
        for (b, (x_block, out_block)) in blocks.enumerate() {
            let first = b * rows_per_block;
            let s = self
                .packed_block(x_block, out_block, scratch, value)
                .map_err(|error| BatchError { row: first, error })?;
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
        out: &mut [f32],
        slots: usize,
        scratch: &mut [f32],
        value: RowValue,
    ) -> Result<Stats, BatchError> {
        let model = self.model;
        let at_start = |error| BatchError { row: 0, error };
        let (cnf, spec) = model
            .stages()
            .find_map(|(i, s)| if let Stage::Cnf(spec) = s { Some((i, spec)) } else { None })
            .ok_or(at_start(SolveError::Internal))?;
        let block = model.cnf_block(cnf).ok_or(at_start(SolveError::Internal))?;
        let slots = slots.min(out.len()).max(1);
        let packed = crate::packed::PackedBlock::new(&block, slots);
        let mut stream = ChainStream { model, cnf, xs, out, value, next: 0, stats: Stats::default() };
        dopri
            .integrate_stream(&packed, 0.0, spec.end_time, &mut stream, scratch)
            .map_err(|(row, error)| BatchError { row, error })?;
        Ok(stream.stats)
    }

    /// One block of [`Flow::log_density_packed`]: `out` first accumulates each
    /// row's log-determinant, then receives its `value`.
    fn packed_block(
        &self,
        xs: &[f32],
        out: &mut [f32],
        scratch: &mut [f32],
        value: RowValue,
    ) -> Result<Stats, SolveError> {
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
                        *ld +=
                            model.apply_map(i, &stage, z, Direction::Forward).ok_or(SolveError::Internal)?;
                    }
                }
                Stage::Cnf(spec) => {
                    let block = model.cnf_block(i).ok_or(SolveError::Internal)?;
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
                // (Image models take the one-row path: `log_density_packed`.)
                Stage::Logit { .. } | Stage::Squeeze(_) | Stage::ConvCnf(_) => {
                    return Err(SolveError::Internal);
                }
                // The base, read below.
                Stage::KdeBase(_) => {}
            }
        }
        for (state, o) in y.chunks_exact(d + 1).zip(out.iter_mut()) {
            let (z, _) = state.split_at(d);
            *o = value.finish(model, z, *o);
        }
        Ok(stats)
    }
}

/// What a packed call writes per row.
#[derive(Clone, Copy, Debug)]
enum RowValue {
    /// `log p(x)`.
    LogP,
    /// The model's anomaly score ([`Model::score_kind`]).
    Score,
}

impl RowValue {
    /// The value of a row the chain maps to `z` with summed log-determinant `log_det`.
    fn finish(self, model: &Model<'_>, z: &[f32], log_det: f32) -> f32 {
        match self {
            RowValue::LogP => model.base_log_prob(z) + log_det,
            RowValue::Score => model.score_of(z, log_det),
        }
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
    value: RowValue,
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
            *o = self.value.finish(model, z, *o + log_det);
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
