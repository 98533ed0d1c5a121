//! Dormand–Prince 5(4) with Shampine's embedded weights, torchdiffeq's
//! "mixed" RMS error norm and its step-size controller (spec §4).

use serde::{Deserialize, Serialize};

use super::rk::{Tableau, axpy_stages, combine, round, stages};
use super::tableau;
pub(crate) use super::tableau::{initial_h0, initial_h1, step_factor};
use super::{Dynamics, Stats, take};
use crate::error::SolveError;

pub(crate) const STAGES: usize = 7;
/// Vectors of length n the solver keeps: 7 stages, the trial state, the error.
pub(crate) const WORK_VECTORS: usize = STAGES + 2;

pub(crate) const TABLEAU: Tableau<STAGES> = Tableau::from_f64(&tableau::DOPRI5);

/// `b − b*` rounded once from float64, so the small differences keep their digits.
pub(crate) const ERR: [f32; STAGES] = round(&tableau::DOPRI5_ERR);

/// Adaptive Dormand–Prince 5(4) settings.
///
/// | name | default | purpose | range |
/// |---|---|---|---|
/// | `rtol` | 1e-5 | relative tolerance per element | > 0 |
/// | `atol` | 1e-5 | absolute tolerance per element | > 0 |
/// | `max_steps` | 10 000 | attempted steps before [`SolveError::MaxStepsReached`] | 1 ..= [`super::MAX_STEPS`] |
/// | `min_step` | 0 | smallest step before [`SolveError::StepSizeUnderflow`] (float resolution always applies) | ≥ 0 |
/// | `first_step` | `None` | initial step; `None` selects it (Hairer–Nørsett–Wanner, 2 NFE) | > 0 |
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Dopri5 {
    /// Relative tolerance.
    pub rtol: f32,
    /// Absolute tolerance.
    pub atol: f32,
    /// Most attempted steps (accepted + rejected).
    pub max_steps: u32,
    /// Smallest allowed |step|.
    pub min_step: f32,
    /// Initial |step|, or `None` to select it automatically.
    pub first_step: Option<f32>,
}

impl Default for Dopri5 {
    fn default() -> Self {
        Dopri5 { rtol: 1e-5, atol: 1e-5, max_steps: 10_000, min_step: 0.0, first_step: None }
    }
}

impl Dopri5 {
    /// Default settings with both tolerances set to `tol`.
    pub fn with_tolerance(tol: f32) -> Self {
        Dopri5 { rtol: tol, atol: tol, ..Dopri5::default() }
    }

    pub(crate) fn validate(&self) -> Result<(), SolveError> {
        let positive = |v: f32| v.is_finite() && v > 0.0;
        let ok = positive(self.rtol)
            && positive(self.atol)
            && self.max_steps > 0
            && self.max_steps <= super::MAX_STEPS
            && self.min_step.is_finite()
            && self.min_step >= 0.0
            && self.first_step.is_none_or(positive);
        if ok { Ok(()) } else { Err(SolveError::InvalidSolver) }
    }

    /// The error ratio ‖v / (atol + rtol · max(|a|, |b|))‖ with the mixed norm.
    pub(crate) fn ratio(&self, v: &[f32], a: &[f32], b: &[f32], split: usize) -> f64 {
        let (mut s0, mut s1) = (0.0f64, 0.0f64);
        for (i, ((&vi, &ai), &bi)) in v.iter().zip(a).zip(b).enumerate() {
            let sc = self.atol + self.rtol * ai.abs().max(bi.abs());
            let r = f64::from(vi / sc);
            if i < split { s0 += r * r } else { s1 += r * r }
        }
        let n = v.len();
        let rms0 = if split > 0 { libm::sqrt(s0 / split as f64) } else { 0.0 };
        let rms1 = match n.checked_sub(split) {
            Some(rest) if rest > 0 => libm::sqrt(s1 / rest as f64),
            _ => 0.0,
        };
        rms0.max(rms1)
    }

    /// Initial step (spec §4.3, order 4). `f0` holds f(t0, y0); uses `y1` and
    /// `f1` as scratch. Returns |h| and spends one NFE.
    #[allow(clippy::too_many_arguments)]
    fn initial_step<D: Dynamics>(
        &self,
        f: &D,
        t0: f64,
        dir: f64,
        y0: &[f32],
        f0: &[f32],
        y1: &mut [f32],
        f1: &mut [f32],
        fwork: &mut [f32],
    ) -> f64 {
        let split = f.error_split();
        let d0 = self.ratio(y0, y0, y0, split);
        let d1 = self.ratio(f0, y0, y0, split);
        let h0 = initial_h0(d0, d1);
        combine(y1, y0, (dir * h0) as f32, &[1.0], f0);
        f.eval((t0 + dir * h0) as f32, y1, f1, fwork);
        for (a, &b) in f1.iter_mut().zip(f0) {
            *a -= b;
        }
        let d2 = self.ratio(f1, y0, y0, split) / h0;
        (100.0 * h0).min(initial_h1(h0, d1, d2))
    }

    pub(crate) fn integrate<D: Dynamics>(
        &self,
        f: &D,
        t0: f64,
        t1: f64,
        y: &mut [f32],
        work: &mut [f32],
    ) -> Result<Stats, SolveError> {
        let n = y.len();
        let split = f.error_split();
        let (ks, rest) = take(work, STAGES.saturating_mul(n))?;
        let (ytmp, rest) = take(rest, n)?;
        let (err, fwork) = take(rest, n)?;
        f.begin(fwork);
        let mut stats = Stats::default();
        if t1 == t0 {
            return Ok(stats);
        }
        let dir = if t1 > t0 { 1.0 } else { -1.0 };
        let span = (t1 - t0).abs();

        let mut h = {
            let (k1, rest) = take(ks, n)?;
            f.eval(t0 as f32, y, k1, fwork);
            stats.nfe = stats.nfe.saturating_add(1);
            match self.first_step {
                Some(h) => f64::from(h),
                None => {
                    let (k2, _) = take(rest, n)?;
                    stats.nfe = stats.nfe.saturating_add(1);
                    self.initial_step(f, t0, dir, y, k1, ytmp, k2, fwork)
                }
            }
        };
        let mut t = t0;
        loop {
            let Some(Step { step, last }) = self.plan_step(t, t1, h, span, &stats)? else {
                return Ok(stats);
            };
            let hs = dir * step;
            stats.nfe = stats.nfe.saturating_add(stages(&TABLEAU, f, t, hs, y, ks, ytmp, fwork, 1)?);
            // ytmp holds y₁, the input of stage 7 (FSAL); the error is h Σ ERR_i k_i.
            err.fill(0.0);
            axpy_stages(err, hs as f32, &ERR, ks);
            let r = self.ratio(err, y, ytmp, split);
            if r <= 1.0 {
                if crate::math::check_finite(ytmp).is_err() {
                    return Err(SolveError::NonFiniteState { t: (t + hs) as f32 });
                }
                y.copy_from_slice(ytmp);
                let (k1, rest) = take(ks, n)?;
                let (_, k7) = take(rest, STAGES.saturating_sub(2).saturating_mul(n))?;
                k1.copy_from_slice(k7);
                t = if last { t1 } else { t + hs };
                stats.accepted = stats.accepted.saturating_add(1);
            } else {
                stats.rejected = stats.rejected.saturating_add(1);
            }
            h = step * step_factor(r);
        }
    }

    /// The next step of one system at `t` with proposed size `h`: `None` once
    /// it has reached `t1`; errors when the step budget is spent or the step
    /// underflows. The last step is clipped onto `t1` (torchdiffeq overshoots
    /// and interpolates).
    pub(crate) fn plan_step(
        &self,
        t: f64,
        t1: f64,
        h: f64,
        span: f64,
        stats: &Stats,
    ) -> Result<Option<Step>, SolveError> {
        let remaining = (t1 - t).abs();
        if remaining == 0.0 {
            return Ok(None);
        }
        let attempted = stats.accepted.saturating_add(stats.rejected);
        if attempted >= self.max_steps {
            return Err(SolveError::MaxStepsReached { t: t as f32, steps: attempted });
        }
        // A NaN or infinite proposal (from an overflowed state or derivative
        // in the initial-step estimate) would fail every comparison below and
        // burn the whole step budget: fail at once instead.
        if !h.is_finite() {
            return Err(SolveError::NonFiniteStep { t: t as f32 });
        }
        let last = h >= remaining;
        let step = if last { remaining } else { h };
        let dir = if t1 > t { 1.0 } else { -1.0 };
        if step < f64::from(self.min_step) || t + dir * step == t || step <= span * 1e-12 {
            return Err(SolveError::StepSizeUnderflow { t: t as f32, h: (dir * step) as f32 });
        }
        Ok(Some(Step { step, last }))
    }
}

/// One planned step: its size |h| and whether it lands on the end time.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Step {
    pub step: f64,
    pub last: bool,
}
