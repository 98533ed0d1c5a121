//! Explicit Runge–Kutta stages shared by the fixed-step methods and Dopri5.

use super::tableau::{self, ButcherTableau};
use super::{Dynamics, Stats, take};
use crate::error::SolveError;

/// A Butcher tableau with `S` stages (strictly lower-triangular `a`).
pub(crate) struct Tableau<const S: usize> {
    pub c: [f32; S],
    pub a: [[f32; S]; S],
    pub b: [f32; S],
}

impl<const S: usize> Tableau<S> {
    /// Vectors of length n a fixed-step integration keeps: the stages and the trial state.
    pub const fn work_vectors(&self) -> usize {
        S.saturating_add(1)
    }

    /// The float64 tableau rounded once to f32 (at compile time).
    pub const fn from_f64(t: &ButcherTableau<S>) -> Self {
        Tableau { c: round(&t.c), a: round_rows(&t.a), b: round(&t.b) }
    }
}

/// Each value rounded to f32. (Used for constants: evaluated at compile time,
/// and `i < S` keeps every index in range.)
#[allow(clippy::indexing_slicing)]
pub(crate) const fn round<const S: usize>(v: &[f64; S]) -> [f32; S] {
    let mut out = [0.0f32; S];
    let mut i = 0;
    while i < S {
        out[i] = v[i] as f32;
        i = i.saturating_add(1);
    }
    out
}

#[allow(clippy::indexing_slicing)]
const fn round_rows<const S: usize>(a: &[[f64; S]; S]) -> [[f32; S]; S] {
    let mut out = [[0.0f32; S]; S];
    let mut i = 0;
    while i < S {
        out[i] = round(&a[i]);
        i = i.saturating_add(1);
    }
    out
}

pub(crate) const EULER: Tableau<1> = Tableau::from_f64(&tableau::EULER);
pub(crate) const MIDPOINT: Tableau<2> = Tableau::from_f64(&tableau::MIDPOINT);
pub(crate) const RK4: Tableau<4> = Tableau::from_f64(&tableau::RK4);
pub(crate) const RK38: Tableau<4> = Tableau::from_f64(&tableau::RK38);

/// `out = base + h Σ_j coeffs[j] k_j` over the first `coeffs.len()` stage
/// vectors in `ks` (each `base.len()` long). Zero coefficients are skipped.
pub(crate) fn combine(out: &mut [f32], base: &[f32], h: f32, coeffs: &[f32], ks: &[f32]) {
    out.copy_from_slice(base);
    axpy_stages(out, h, coeffs, ks);
}

/// `out += h Σ_j coeffs[j] k_j`, with `k_j` the `out.len()`-runs of `ks`.
pub(crate) fn axpy_stages(out: &mut [f32], h: f32, coeffs: &[f32], ks: &[f32]) {
    for (&c, k) in coeffs.iter().zip(ks.chunks_exact(out.len().max(1))) {
        if c != 0.0 {
            let s = h * c;
            for (o, &kv) in out.iter_mut().zip(k) {
                *o += s * kv;
            }
        }
    }
}

/// Evaluates stages `from..S` at `(t, y)` with step `h`: the stage input goes
/// to `ytmp`, `k_i` into the `i`-th `n`-run of `ks`. Returns the NFE spent.
#[allow(clippy::too_many_arguments)]
pub(crate) fn stages<D: Dynamics, const S: usize>(
    tab: &Tableau<S>,
    f: &D,
    t: f64,
    h: f64,
    y: &[f32],
    ks: &mut [f32],
    ytmp: &mut [f32],
    fwork: &mut [f32],
    from: usize,
) -> Result<u32, SolveError> {
    let n = y.len();
    let mut nfe: u32 = 0;
    for (i, (row, &c)) in tab.a.iter().zip(tab.c.iter()).enumerate().skip(from) {
        let (prev, rest) = take(ks, i.saturating_mul(n))?;
        let (ki, _) = take(rest, n)?;
        combine(ytmp, y, h as f32, row.get(..i).unwrap_or(&[]), prev);
        f.eval((t + f64::from(c) * h) as f32, ytmp, ki, fwork);
        nfe = nfe.saturating_add(1);
    }
    Ok(nfe)
}

/// `steps` equal steps of an explicit Runge–Kutta method.
pub(crate) fn integrate_fixed<D: Dynamics, const S: usize>(
    tab: &Tableau<S>,
    f: &D,
    t0: f64,
    t1: f64,
    steps: u32,
    y: &mut [f32],
    work: &mut [f32],
) -> Result<Stats, SolveError> {
    let n = y.len();
    let (ks, rest) = take(work, S.saturating_mul(n))?;
    let (ytmp, fwork) = take(rest, n)?;
    f.begin(fwork);
    let h = (t1 - t0) / f64::from(steps);
    let mut stats = Stats::default();
    for step in 0..steps {
        let t = t0 + f64::from(step) * h;
        stats.nfe = stats.nfe.saturating_add(stages(tab, f, t, h, y, ks, ytmp, fwork, 0)?);
        combine(ytmp, y, h as f32, &tab.b, ks);
        if crate::math::check_finite(ytmp).is_err() {
            return Err(SolveError::NonFiniteState { t: (t + h) as f32 });
        }
        y.copy_from_slice(ytmp);
        stats.accepted = stats.accepted.saturating_add(1);
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check<const S: usize>(tab: &Tableau<S>) {
        let sum_b: f32 = tab.b.iter().sum();
        assert!((sum_b - 1.0).abs() < 1e-6);
        for (row, c) in tab.a.iter().zip(tab.c) {
            let s: f32 = row.iter().sum();
            assert!((s - c).abs() < 1e-6, "row sum {s} != c {c}");
        }
    }

    #[test]
    fn tableaus_are_consistent() {
        check(&EULER);
        check(&MIDPOINT);
        check(&RK4);
        check(&RK38);
    }
}
