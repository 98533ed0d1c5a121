//! Dopri5 on many independent rows at once. Every row keeps its own time,
//! step size, accept/reject decisions and counters — the one-row controller
//! of [`Dopri5::integrate`] — while each round evaluates one stage of every
//! row in a single call of [`RowDynamics::eval_rows`] (one time per row).
//! Rows come from a [`RowStream`]: when one finishes, its slot takes the
//! next row at once, so slots do not idle while slow rows finish.

use super::dopri5::{ERR, STAGES, Step, TABLEAU, initial_h0, initial_h1, step_factor};
use super::{Dopri5, Dynamics, Stats, take};
use crate::error::SolveError;
use crate::math::copy;

/// Most rows one lockstep integration carries at a time (their controller
/// state lives on the stack: no allocator).
pub(crate) const MAX_LOCKSTEP_ROWS: usize = 64;

/// Dynamics of independent rows (slots) of equal length, packed one after
/// another in the state, that can be evaluated at a different time for each.
pub(crate) trait RowDynamics: Dynamics {
    /// Number of rows (slots) in the state.
    fn rows(&self) -> usize;
    /// The error split (see [`Dynamics::error_split`]) inside one row.
    fn row_error_split(&self) -> usize;
    /// Scratch floats of one [`RowDynamics::eval_rows`].
    fn rows_work_len(&self) -> usize;
    /// Writes `f(times[r], y_r)` for every slot `r` into `dy`.
    fn eval_rows(&self, times: &[f32], y: &[f32], dy: &mut [f32], work: &mut [f32]);
}

/// Where the rows of a streaming integration come from and go to.
pub(crate) trait RowStream {
    /// Writes the next row's initial state into `y` and returns its index,
    /// or `None` when no rows are left.
    fn next_row(&mut self, y: &mut [f32]) -> Option<usize>;
    /// Receives row `row`'s final state (the slot's, free to overwrite: it is
    /// reloaded next) and its solver statistics.
    fn finish_row(&mut self, row: usize, y: &mut [f32], stats: Stats);
}

/// What a slot evaluates in the next round.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
enum Phase {
    /// No row: rides along at `t0`.
    #[default]
    Idle,
    /// `k1 = f(t0, y0)`.
    First,
    /// The initial-step probe `f(t0 + h0, y0 + h0 k1)`.
    Probe,
    /// Stage `i` (1..=6) of a Dopri5 step (`k1` is known).
    Stage(usize),
}

/// One slot's row and controller.
#[derive(Clone, Copy, Default)]
struct Slot {
    row: usize,
    phase: Phase,
    t: f64,
    /// Proposed |h|; during the probe, h0.
    h: f64,
    /// The step in flight (signed) and whether it lands on the end time.
    hs: f64,
    last: bool,
    stats: Stats,
}

impl Dopri5 {
    /// Scratch floats of [`Dopri5::integrate_stream`] besides the dynamics'
    /// own, for `slots` slots of `len` floats.
    pub(crate) fn stream_work_len(slots: usize, len: usize) -> usize {
        let n = slots.saturating_mul(len);
        // State, 7 stages, stage input, output, error; a time per slot.
        n.saturating_mul(STAGES + 4).saturating_add(slots)
    }

    /// Integrates every row of `stream` from `t0` to `t1` with its own steps
    /// on `f.rows()` slots. Returns the statistics summed over rows, or the
    /// failing row and why.
    pub(crate) fn integrate_stream<D: RowDynamics, S: RowStream>(
        &self,
        f: &D,
        t0: f32,
        t1: f32,
        stream: &mut S,
        work: &mut [f32],
    ) -> Result<Stats, (usize, SolveError)> {
        let fail = |e: SolveError| (0usize, e);
        self.validate().map_err(fail)?;
        let slots = f.rows();
        let n = f.dim();
        if slots == 0 || slots > MAX_LOCKSTEP_ROWS || !n.is_multiple_of(slots) {
            return Err(fail(SolveError::InvalidBlockSize));
        }
        let len = n.checked_div(slots).unwrap_or(0);
        let split = f.row_error_split();
        let needed = Self::stream_work_len(slots, len).saturating_add(f.rows_work_len());
        if work.len() < needed {
            return Err(fail(super::scratch_error(needed, work.len())));
        }
        let (y, rest) = take(work, n).map_err(fail)?;
        let (ks, rest) = take(rest, STAGES.saturating_mul(n)).map_err(fail)?;
        let (input, rest) = take(rest, n).map_err(fail)?;
        let (output, rest) = take(rest, n).map_err(fail)?;
        let (err, rest) = take(rest, n).map_err(fail)?;
        let (times, fwork) = take(rest, slots).map_err(fail)?;
        let (t0, t1) = (f64::from(t0), f64::from(t1));
        let dir = if t1 >= t0 { 1.0 } else { -1.0 };
        let span = (t1 - t0).abs();
        let mut total = Stats::default();
        let mut state = [Slot::default(); MAX_LOCKSTEP_ROWS];
        let state = state.get_mut(..slots).unwrap_or(&mut []);
        y.fill(0.0);
        for (s, slot) in state.iter_mut().enumerate() {
            load(slot, stream, chunk_mut(y, s, len), t0);
        }
        loop {
            // Rows that are done at once (t0 = t1, or a step plan says so)
            // leave before the round; their slots load the next rows.
            let mut any = false;
            for (s, slot) in state.iter_mut().enumerate() {
                while slot.phase == Phase::Stage(1) || (slot.phase == Phase::First && span == 0.0) {
                    if span > 0.0 {
                        let plan = self.plan_step(slot.t, t1, slot.h, span, &slot.stats);
                        if let Some(Step { step, last }) = plan.map_err(|e| (slot.row, e))? {
                            slot.hs = dir * step;
                            slot.last = last;
                            break;
                        }
                    }
                    stream.finish_row(slot.row, chunk_mut(y, s, len), slot.stats);
                    total = total.merge(slot.stats);
                    load(slot, stream, chunk_mut(y, s, len), t0);
                }
                any |= slot.phase != Phase::Idle;
            }
            if !any {
                return Ok(total);
            }
            // This round's input and time of every slot.
            for (s, slot) in state.iter().enumerate() {
                let inp = chunk_mut(input, s, len);
                copy(inp, chunk(y, s, len));
                let t = match slot.phase {
                    Phase::Idle | Phase::First => t0,
                    Phase::Probe => {
                        for (o, &k) in inp.iter_mut().zip(chunk(stage(ks, 0, n), s, len)) {
                            *o += (dir * slot.h) as f32 * k;
                        }
                        t0 + dir * slot.h
                    }
                    Phase::Stage(i) => {
                        let a = TABLEAU.a.get(i).copied().unwrap_or_default();
                        for (j, &coef) in a.iter().enumerate().take(i) {
                            if coef != 0.0 {
                                let c = slot.hs as f32 * coef;
                                for (o, &k) in inp.iter_mut().zip(chunk(stage(ks, j, n), s, len)) {
                                    *o += c * k;
                                }
                            }
                        }
                        slot.t + f64::from(TABLEAU.c.get(i).copied().unwrap_or(0.0)) * slot.hs
                    }
                };
                if let Some(ts) = times.get_mut(s) {
                    *ts = t as f32;
                }
            }
            f.eval_rows(times, input, output, fwork);
            // Advance every slot on its output.
            for (s, slot) in state.iter_mut().enumerate() {
                let out = chunk(output, s, len);
                match slot.phase {
                    Phase::Idle => {}
                    Phase::First => {
                        slot.stats.nfe = slot.stats.nfe.saturating_add(1);
                        copy(chunk_mut(stage_mut(ks, 0, n), s, len), out);
                        match self.first_step {
                            Some(h) => {
                                slot.h = f64::from(h);
                                slot.phase = Phase::Stage(1);
                            }
                            None => {
                                let (y0, f0) = (chunk(y, s, len), chunk(stage(ks, 0, n), s, len));
                                let d0 = self.ratio(y0, y0, y0, split);
                                let d1 = self.ratio(f0, y0, y0, split);
                                slot.h = initial_h0(d0, d1);
                                slot.phase = Phase::Probe;
                            }
                        }
                    }
                    Phase::Probe => {
                        slot.stats.nfe = slot.stats.nfe.saturating_add(1);
                        let (y0, f0) = (chunk(y, s, len), chunk(stage(ks, 0, n), s, len));
                        let diff = chunk_mut(err, s, len);
                        for ((d, &a), &b) in diff.iter_mut().zip(out).zip(f0) {
                            *d = a - b;
                        }
                        let h0 = slot.h;
                        let d1 = self.ratio(f0, y0, y0, split);
                        let d2 = self.ratio(diff, y0, y0, split) / h0;
                        slot.h = (100.0 * h0).min(initial_h1(h0, d1, d2));
                        slot.phase = Phase::Stage(1);
                    }
                    Phase::Stage(i) if i.saturating_add(1) < STAGES => {
                        slot.stats.nfe = slot.stats.nfe.saturating_add(1);
                        copy(chunk_mut(stage_mut(ks, i, n), s, len), out);
                        slot.phase = Phase::Stage(i.saturating_add(1));
                    }
                    Phase::Stage(i) => {
                        slot.stats.nfe = slot.stats.nfe.saturating_add(1);
                        copy(chunk_mut(stage_mut(ks, i, n), s, len), out);
                        // The last stage's input is y₁ (FSAL); error h Σ ERR_j k_j.
                        let e = chunk_mut(err, s, len);
                        e.fill(0.0);
                        for (j, &coef) in ERR.iter().enumerate() {
                            if coef != 0.0 {
                                let c = slot.hs as f32 * coef;
                                for (o, &k) in e.iter_mut().zip(chunk(stage(ks, j, n), s, len)) {
                                    *o += c * k;
                                }
                            }
                        }
                        let y1 = chunk(input, s, len);
                        let ratio = self.ratio(e, chunk(y, s, len), y1, split);
                        if ratio <= 1.0 {
                            if crate::math::check_finite(y1).is_err() {
                                let t = (slot.t + slot.hs) as f32;
                                return Err((slot.row, SolveError::NonFiniteState { t }));
                            }
                            copy(chunk_mut(y, s, len), y1);
                            // FSAL: this row's k7 is its next k1.
                            let (k1s, rest) = ks.split_at_mut(n.min(ks.len()));
                            copy(chunk_mut(k1s, s, len), chunk(stage(rest, STAGES - 2, n), s, len));
                            slot.t = if slot.last { t1 } else { slot.t + slot.hs };
                            slot.stats.accepted = slot.stats.accepted.saturating_add(1);
                        } else {
                            slot.stats.rejected = slot.stats.rejected.saturating_add(1);
                        }
                        slot.h = slot.hs.abs() * step_factor(ratio);
                        slot.phase = Phase::Stage(1);
                    }
                }
            }
        }
    }
}

/// Starts `slot` on the stream's next row (state written into `y`), or idles it.
fn load<S: RowStream>(slot: &mut Slot, stream: &mut S, y: &mut [f32], t0: f64) {
    *slot = match stream.next_row(y) {
        Some(row) => Slot { row, phase: Phase::First, t: t0, ..Slot::default() },
        None => Slot::default(),
    };
}

/// Stage `j`'s vectors of all slots.
fn stage(ks: &[f32], j: usize, n: usize) -> &[f32] {
    ks.get(super::span(j, n)).unwrap_or(&[])
}

fn stage_mut(ks: &mut [f32], j: usize, n: usize) -> &mut [f32] {
    ks.get_mut(super::span(j, n)).unwrap_or(&mut [])
}

/// Slot `s` (length `len`) of a slot-major buffer; empty if out of range.
fn chunk(buf: &[f32], s: usize, len: usize) -> &[f32] {
    buf.get(super::span(s, len)).unwrap_or(&[])
}

fn chunk_mut(buf: &mut [f32], s: usize, len: usize) -> &mut [f32] {
    buf.get_mut(super::span(s, len)).unwrap_or(&mut [])
}
