//! ODE solvers over caller-provided working memory.
//!
//! | solver | order | NFE | use it when |
//! |---|---|---|---|
//! | [`Solver::Euler`] | 1 | `steps` | tests, the cheapest possible bound |
//! | [`Solver::Midpoint`] | 2 | `2·steps` | very small budgets |
//! | [`Solver::Rk4`] | 4 | `4·steps` | fixed, predictable time on a microcontroller |
//! | [`Solver::Rk38`] | 4 | `4·steps` | parity with torchdiffeq's `rk4` (Kutta's 3/8 rule) |
//! | [`Solver::Dopri5`] | 5(4) | `2 + 6·(accepted + rejected)` | accuracy to a tolerance (the reference) |
//!
//! Time and step size are kept in `f64` and stage times cast to `f32` before
//! each evaluation, as torchdiffeq does; the state is `f32`.
//!
//! Integer arithmetic here — step and evaluation counters, scratch offsets —
//! is checked or saturating (the lint below makes a plain `+` an error): a
//! hostile step count or row count ends in a typed error, never an overflow.
#![deny(clippy::arithmetic_side_effects)]

mod dopri5;
mod lockstep;
mod rk;
pub mod tableau;

use serde::{Deserialize, Serialize};

use crate::error::SolveError;

pub use dopri5::Dopri5;
pub(crate) use lockstep::{MAX_LOCKSTEP_ROWS, RowDynamics, RowStream};

/// A right-hand side `dy/dt = f(t, y)` that needs some scratch to evaluate.
///
/// Implementations are infallible and allocation-free: solvers check buffer
/// lengths once before integrating.
pub trait Dynamics {
    /// Length of the state `y`.
    fn dim(&self) -> usize;
    /// Floats of scratch one evaluation needs.
    fn work_len(&self) -> usize;
    /// The adaptive error norm is the maximum of the RMS over `y[..split]` and
    /// over `y[split..]` (torchdiffeq's norm over the tuple `(z, Δ)`); equal to
    /// [`Dynamics::dim`] for one plain vector.
    fn error_split(&self) -> usize {
        self.dim()
    }
    /// Writes `f(t, y)` into `dy`.
    fn eval(&self, t: f32, y: &[f32], dy: &mut [f32], work: &mut [f32]);

    /// Called by every integrator once per solve, before its first
    /// [`Dynamics::eval`], with the `work` slice that solve's evaluations
    /// get. Dynamics that keep a per-solve cache in `work` (the runtime's
    /// gate cache) empty it here; the default does nothing.
    fn begin(&self, work: &mut [f32]) {
        let _ = work;
    }
}

/// Work counters of one integration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Function (dynamics) evaluations.
    pub nfe: u32,
    /// Accepted steps (every step, for fixed-step solvers).
    pub accepted: u32,
    /// Rejected steps (adaptive solvers only).
    pub rejected: u32,
}

impl Stats {
    /// Field-wise sum, saturating.
    pub fn merge(self, other: Stats) -> Stats {
        Stats {
            nfe: self.nfe.saturating_add(other.nfe),
            accepted: self.accepted.saturating_add(other.accepted),
            rejected: self.rejected.saturating_add(other.rejected),
        }
    }
}

/// An ODE solver and its settings. Stored in model files as the default.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Solver {
    /// Forward Euler, fixed steps.
    Euler {
        /// Number of equal steps over the interval.
        steps: u32,
    },
    /// Explicit midpoint, fixed steps.
    Midpoint {
        /// Number of equal steps over the interval.
        steps: u32,
    },
    /// Classic Runge–Kutta 4, fixed steps.
    Rk4 {
        /// Number of equal steps over the interval.
        steps: u32,
    },
    /// Kutta's 3/8 rule (what torchdiffeq calls `rk4`), fixed steps.
    Rk38 {
        /// Number of equal steps over the interval.
        steps: u32,
    },
    /// Dormand–Prince 5(4), adaptive.
    Dopri5(Dopri5),
}

/// The most steps any solver may take in one integration: fixed `steps` and
/// Dopri5's `max_steps` above it are invalid (a model file that asks for more
/// is rejected at load), so no file can make one call run for hours. A caller
/// that needs a tighter bound per call passes its own solver to
/// [`crate::Flow::new`] (e.g. a smaller `max_steps`), which is honoured with
/// [`SolveError::MaxStepsReached`].
pub const MAX_STEPS: u32 = 1_000_000;

impl Default for Solver {
    fn default() -> Self {
        Solver::Dopri5(Dopri5::default())
    }
}

impl core::fmt::Display for Solver {
    /// `RK4 × 8`, `Dopri5 1e-5` (or `Dopri5 rtol 1e-5 atol 1e-7`), as the
    /// trainer's tables print solvers.
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            Solver::Euler { steps } => write!(f, "Euler × {steps}"),
            Solver::Midpoint { steps } => write!(f, "midpoint × {steps}"),
            Solver::Rk4 { steps } => write!(f, "RK4 × {steps}"),
            Solver::Rk38 { steps } => write!(f, "RK4 (3/8 rule) × {steps}"),
            Solver::Dopri5(d) if d.rtol == d.atol => write!(f, "Dopri5 {:e}", d.rtol),
            Solver::Dopri5(d) => write!(f, "Dopri5 rtol {:e} atol {:e}", d.rtol, d.atol),
        }
    }
}

impl Solver {
    /// Checks the settings.
    pub fn validate(&self) -> Result<(), SolveError> {
        match *self {
            Solver::Euler { steps }
            | Solver::Midpoint { steps }
            | Solver::Rk4 { steps }
            | Solver::Rk38 { steps } => {
                if steps == 0 || steps > MAX_STEPS {
                    return Err(SolveError::InvalidSolver);
                }
                Ok(())
            }
            Solver::Dopri5(d) => d.validate(),
        }
    }

    /// Floats of solver scratch for a state of length `n` (not counting the
    /// dynamics' own [`Dynamics::work_len`]).
    pub fn work_len(&self, n: usize) -> usize {
        let vectors = match self {
            Solver::Euler { .. } => rk::EULER.work_vectors(),
            Solver::Midpoint { .. } => rk::MIDPOINT.work_vectors(),
            Solver::Rk4 { .. } | Solver::Rk38 { .. } => rk::RK4.work_vectors(),
            Solver::Dopri5(_) => dopri5::WORK_VECTORS,
        };
        n.saturating_mul(vectors)
    }

    /// Integrates `y` from `t0` to `t1` (either direction) in place.
    ///
    /// `work` must hold at least `self.work_len(f.dim()) + f.work_len()` floats.
    pub fn integrate<D: Dynamics>(
        &self,
        f: &D,
        t0: f32,
        t1: f32,
        y: &mut [f32],
        work: &mut [f32],
    ) -> Result<Stats, SolveError> {
        self.validate()?;
        let n = f.dim();
        if y.len() != n {
            return Err(SolveError::OutputLength { expected: n as u32, found: y.len() as u32 });
        }
        let needed = self.work_len(n).saturating_add(f.work_len());
        if work.len() < needed {
            return Err(SolveError::ScratchTooSmall {
                needed: needed.min(u32::MAX as usize) as u32,
                capacity: work.len().min(u32::MAX as usize) as u32,
            });
        }
        let (t0, t1) = (f64::from(t0), f64::from(t1));
        match *self {
            Solver::Euler { steps } => rk::integrate_fixed(&rk::EULER, f, t0, t1, steps, y, work),
            Solver::Midpoint { steps } => rk::integrate_fixed(&rk::MIDPOINT, f, t0, t1, steps, y, work),
            Solver::Rk4 { steps } => rk::integrate_fixed(&rk::RK4, f, t0, t1, steps, y, work),
            Solver::Rk38 { steps } => rk::integrate_fixed(&rk::RK38, f, t0, t1, steps, y, work),
            Solver::Dopri5(d) => d.integrate(f, t0, t1, y, work),
        }
    }
}

/// The error returned when a split of scratch that was checked up front fails.
pub(crate) fn scratch_error(needed: usize, capacity: usize) -> SolveError {
    SolveError::ScratchTooSmall {
        needed: needed.min(u32::MAX as usize) as u32,
        capacity: capacity.min(u32::MAX as usize) as u32,
    }
}

/// The range `i·len .. (i + 1)·len`, or an empty one where that overflows
/// (callers slice with `get`, so it reads as out of range).
pub(crate) fn span(i: usize, len: usize) -> core::ops::Range<usize> {
    match (i.checked_mul(len), i.checked_add(1).and_then(|j| j.checked_mul(len))) {
        (Some(start), Some(end)) => start..end,
        _ => 0..0,
    }
}

/// Splits `n` floats off the front of `buf`.
pub(crate) fn take(buf: &mut [f32], n: usize) -> Result<(&mut [f32], &mut [f32]), SolveError> {
    let cap = buf.len();
    buf.split_at_mut_checked(n).ok_or(scratch_error(n, cap))
}
