//! ODE solvers on tensors, for training and evaluation.
//!
//! The state is a tuple of tensors (e.g. `[z, ℓ]`); the batch shares one step
//! sequence. Dopri5 follows spec §4 exactly as the runtime does (same tableau,
//! Shampine error weights, max-over-components RMS norm, controller, initial
//! step, last step clipped onto the end time), so the two agree step for step
//! up to float rounding. Gradients flow through the steps when the inputs
//! require them (backprop through the solver); a solve can instead record its
//! accepted steps ([`Step`]) for a hand-written reverse pass (`model.rs`).
//! Step sizes come from detached values either way: they are constants to the
//! gradient.

use anyhow::{Result, bail};
use ffjord_runtime::solver::tableau as rt;
use ffjord_runtime::{Dopri5, Solver, Stats};
use tch::Tensor;

/// An ODE right-hand side on a tuple state.
pub type Rhs<'a> = dyn FnMut(f64, &[Tensor]) -> Result<Vec<Tensor>> + 'a;

/// Dopri5 at tolerance `tol` (relative and absolute) with `max_steps`: the
/// common case, as the runtime's [`Solver`] (one type describes a solver on
/// both sides; tolerances are stored as f32 there, and used so here).
pub fn dopri5_at(tol: f64, max_steps: u32) -> Solver {
    Solver::Dopri5(Dopri5 { rtol: tol as f32, atol: tol as f32, max_steps, ..Dopri5::default() })
}

/// Which state components take part in adaptive error control (regulariser
/// channels do not, as in RNODE).
pub fn all_controlled(n: usize) -> Vec<bool> {
    vec![true; n]
}

fn axpy(y: &[Tensor], h: f64, coeffs: &[f64], ks: &[Vec<Tensor>]) -> Vec<Tensor> {
    y.iter()
        .enumerate()
        .map(|(c, yc)| {
            let mut acc = yc.shallow_clone();
            for (a, k) in coeffs.iter().zip(ks) {
                if *a != 0.0 {
                    // Not `+=`: that would add in place into the state tensor `acc` aliases.
                    acc = &acc + &k[c] * (h * a);
                }
            }
            acc
        })
        .collect()
}

/// An explicit Runge–Kutta scheme: stage times `c`, stage weights `a`
/// (row `i` combines the stages before `i`), solution weights `b`.
#[derive(Debug)]
pub struct Tableau {
    pub c: &'static [f64],
    pub a: &'static [&'static [f64]],
    pub b: &'static [f64],
}

/// Row `i` of a strictly lower-triangular `a`: its first `i` entries.
const fn row<const S: usize>(a: &'static [[f64; S]; S], i: usize) -> &'static [f64] {
    a[i].split_at(i).0
}

// The tableaus are the runtime's (`ffjord_runtime::solver::tableau`, float64),
// so trainer and runtime integrate with the same coefficients.
const EULER: Tableau = Tableau { c: &rt::EULER.c, a: &[row(&rt::EULER.a, 0)], b: &rt::EULER.b };
const MIDPOINT: Tableau = Tableau {
    c: &rt::MIDPOINT.c,
    a: &[row(&rt::MIDPOINT.a, 0), row(&rt::MIDPOINT.a, 1)],
    b: &rt::MIDPOINT.b,
};
const RK4: Tableau = Tableau {
    c: &rt::RK4.c,
    a: &[row(&rt::RK4.a, 0), row(&rt::RK4.a, 1), row(&rt::RK4.a, 2), row(&rt::RK4.a, 3)],
    b: &rt::RK4.b,
};
const RK38: Tableau = Tableau {
    c: &rt::RK38.c,
    a: &[row(&rt::RK38.a, 0), row(&rt::RK38.a, 1), row(&rt::RK38.a, 2), row(&rt::RK38.a, 3)],
    b: &rt::RK38.b,
};
/// Dopri5's accepted step as a plain scheme: the six stages the fifth-order
/// solution combines (the seventh, at the new point, is the next step's first).
const DOPRI5: Tableau = Tableau {
    c: rt::DOPRI5.c.split_at(6).0,
    a: &[
        row(&rt::DOPRI5.a, 0),
        row(&rt::DOPRI5.a, 1),
        row(&rt::DOPRI5.a, 2),
        row(&rt::DOPRI5.a, 3),
        row(&rt::DOPRI5.a, 4),
        row(&rt::DOPRI5.a, 5),
    ],
    b: row(&rt::DOPRI5.a, 6),
};

/// One accepted step, as a reverse pass needs it: `y_{n+1} = y_n + h Σ_i
/// b_i f(t + c_i h, Y_i)` with the stage inputs `Y_i`, and for each stage
/// which call of `f` (counting from 0 in this solve) evaluated it.
pub struct Step {
    pub t: f64,
    pub h: f64,
    pub tableau: &'static Tableau,
    pub stages: Vec<Vec<Tensor>>,
    pub evals: Vec<usize>,
}

/// Integrates `y` from `t0` to `t1` with `solver` (the runtime's settings
/// type). `controlled[c]` says whether
/// component `c` enters the adaptive error norm. `time_scale` is how many units
/// of the physical time one unit of `t` is (a CNF solved in τ = t/T passes T):
/// only Dopri5's initial step depends on it (the rest of the algorithm is
/// invariant under rescaling time), so the step sequence equals that of the
/// same problem solved in physical time — as the runtime solves it.
/// `tape`, if given, receives the accepted steps in order.
#[allow(clippy::too_many_arguments)]
pub fn odeint(
    f: &mut Rhs<'_>,
    y0: Vec<Tensor>,
    t0: f64,
    t1: f64,
    solver: Solver,
    controlled: &[bool],
    time_scale: f64,
    tape: Option<&mut Vec<Step>>,
) -> Result<(Vec<Tensor>, Stats)> {
    if solver.validate().is_err() {
        bail!("invalid solver settings: {solver:?}");
    }
    match solver {
        Solver::Euler { steps } => fixed(f, y0, t0, t1, steps, &EULER, tape),
        Solver::Midpoint { steps } => fixed(f, y0, t0, t1, steps, &MIDPOINT, tape),
        Solver::Rk4 { steps } => fixed(f, y0, t0, t1, steps, &RK4, tape),
        Solver::Rk38 { steps } => fixed(f, y0, t0, t1, steps, &RK38, tape),
        Solver::Dopri5(d) => dopri5(f, y0, t0, t1, d, controlled, time_scale, tape),
    }
}

fn shallow(y: &[Tensor]) -> Vec<Tensor> {
    y.iter().map(Tensor::shallow_clone).collect()
}

fn fixed(
    f: &mut Rhs<'_>,
    mut y: Vec<Tensor>,
    t0: f64,
    t1: f64,
    steps: u32,
    tab: &'static Tableau,
    mut tape: Option<&mut Vec<Step>>,
) -> Result<(Vec<Tensor>, Stats)> {
    if steps == 0 {
        bail!("a fixed-step solver needs at least one step");
    }
    let h = (t1 - t0) / f64::from(steps);
    let mut stats = Stats::default();
    for s in 0..steps {
        let t = t0 + f64::from(s) * h;
        let mut ks: Vec<Vec<Tensor>> = Vec::with_capacity(tab.c.len());
        let (mut stages, mut evals) = (Vec::new(), Vec::new());
        for (c, a) in tab.c.iter().zip(tab.a) {
            let yi = axpy(&y, h, a, &ks);
            let call = stats.nfe as usize;
            ks.push(f(t + c * h, &yi)?);
            stats.nfe += 1;
            if tape.is_some() {
                stages.push(yi);
                evals.push(call);
            }
        }
        if let Some(tape) = tape.as_deref_mut() {
            tape.push(Step { t, h, tableau: tab, stages, evals });
        }
        y = axpy(&y, h, tab.b, &ks);
        stats.accepted += 1;
    }
    Ok((y, stats))
}

/// max over controlled components of RMS(v / (atol + rtol·max(|a|, |b|))).
fn ratio(v: &[Tensor], a: &[Tensor], b: &[Tensor], rtol: f64, atol: f64, controlled: &[bool]) -> f64 {
    let mut r = 0.0f64;
    for (((v, a), b), &on) in v.iter().zip(a).zip(b).zip(controlled) {
        if !on || v.numel() == 0 {
            continue;
        }
        let sc = a.detach().abs().maximum(&b.detach().abs()) * rtol + atol;
        let rms = (v.detach() / sc).square().mean(tch::Kind::Double).sqrt().double_value(&[]);
        r = r.max(if rms.is_nan() { f64::INFINITY } else { rms });
    }
    r
}

#[allow(clippy::too_many_arguments)] // odeint's arguments, passed through
fn dopri5(
    f: &mut Rhs<'_>,
    mut y: Vec<Tensor>,
    t0: f64,
    t1: f64,
    settings: Dopri5,
    controlled: &[bool],
    time_scale: f64,
    mut tape: Option<&mut Vec<Step>>,
) -> Result<(Vec<Tensor>, Stats)> {
    let (rtol, atol, max_steps) = (f64::from(settings.rtol), f64::from(settings.atol), settings.max_steps);
    let min_step = f64::from(settings.min_step);
    let mut stats = Stats::default();
    if t0 == t1 {
        return Ok((y, stats));
    }
    let dir = if t1 > t0 { 1.0 } else { -1.0 };
    let span = (t1 - t0).abs();
    let mut k1 = f(t0, &y)?;
    let mut k1_call = 0;
    stats.nfe += 1;
    // Initial step (Hairer–Nørsett–Wanner II.4, order 4), as in the runtime,
    // computed in physical time (derivatives divided by `time_scale`).
    let mut h = if let Some(first) = settings.first_step {
        // A first step given in physical time, like the runtime's.
        f64::from(first) / time_scale
    } else {
        let s = time_scale;
        let d0 = ratio(&y, &y, &y, rtol, atol, controlled);
        let d1 = ratio(&k1, &y, &y, rtol, atol, controlled) / s;
        let h0 = rt::initial_h0(d0, d1);
        let y1: Vec<Tensor> =
            y.iter().zip(&k1).map(|(a, k)| a.detach() + k.detach() * (dir * h0 / s)).collect();
        let f1 = f(t0 + dir * h0 / s, &y1)?;
        stats.nfe += 1;
        let diff: Vec<Tensor> = f1.iter().zip(&k1).map(|(a, b)| a.detach() - b.detach()).collect();
        let d2 = ratio(&diff, &y, &y, rtol, atol, controlled) / s / h0;
        (100.0 * h0).min(rt::initial_h1(h0, d1, d2)) / s
    };
    let mut t = t0;
    loop {
        let remaining = (t1 - t).abs();
        if remaining == 0.0 {
            return Ok((y, stats));
        }
        if stats.accepted + stats.rejected >= max_steps {
            bail!(
                "Dopri5 gave up after {max_steps} steps at t = {t:.6} (raise max_steps or loosen tolerances)"
            );
        }
        if !h.is_finite() {
            bail!("Dopri5 step size became {h} at t = {t:.6}: the state or its derivative overflowed");
        }
        let last = h >= remaining;
        let step = if last { remaining } else { h };
        if step * time_scale < min_step || t + dir * step == t || step <= span * 1e-12 {
            bail!(
                "Dopri5 step size underflow ({step:e}) at t = {t:.6}: the dynamics are too stiff or non-finite"
            );
        }
        let hs = dir * step;
        let mut ks: Vec<Vec<Tensor>> = vec![shallow(&k1)];
        let mut y_new = Vec::new();
        let (mut stages, mut evals) = (Vec::new(), Vec::new());
        for i in 1..7 {
            let (c, a) = (rt::DOPRI5.c[i], row(&rt::DOPRI5.a, i));
            let yi = axpy(&y, hs, a, &ks);
            evals.push(stats.nfe as usize);
            ks.push(f(t + c * hs, &yi)?);
            stats.nfe += 1;
            if tape.is_some() {
                stages.push(shallow(&yi));
            }
            y_new = yi;
        }
        let zeros: Vec<Tensor> = y.iter().map(|c| c.zeros_like()).collect();
        let err = axpy(&zeros, hs, &rt::DOPRI5_ERR, &ks);
        let r = ratio(&err, &y, &y_new, rtol, atol, controlled);
        if r <= 1.0 {
            // The last call was at y_new: the next step's first stage (FSAL).
            let last_call = evals.pop().unwrap_or_default();
            if let Some(tape) = tape.as_deref_mut() {
                // Stage 1 is y itself; the last recorded input is y_new.
                stages.pop();
                stages.insert(0, shallow(&y));
                evals.insert(0, k1_call);
                tape.push(Step { t, h: hs, tableau: &DOPRI5, stages, evals });
            }
            k1_call = last_call;
            y = y_new;
            k1 = ks.pop().unwrap_or_default();
            t = if last { t1 } else { t + hs };
            stats.accepted += 1;
        } else {
            stats.rejected += 1;
        }
        h = step * rt::step_factor(r);
    }
}
