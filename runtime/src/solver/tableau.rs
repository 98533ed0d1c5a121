//! The Runge–Kutta tableaus and Dopri5's step-size controller, defined once
//! in float64: the runtime's f32 solvers round the coefficients once at
//! compile time, and the trainer's tensor solver uses them as they are, so
//! both take the same steps.

/// A Butcher tableau with `S` stages: `a` strictly lower-triangular (row `i`
/// uses its first `i` entries), stage times `c`, weights `b`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ButcherTableau<const S: usize> {
    /// Stage times as fractions of the step.
    pub c: [f64; S],
    /// Stage coefficients.
    pub a: [[f64; S]; S],
    /// Weights of the solution.
    pub b: [f64; S],
}

/// Forward Euler.
pub const EULER: ButcherTableau<1> = ButcherTableau { c: [0.0], a: [[0.0]], b: [1.0] };

/// The explicit midpoint rule.
pub const MIDPOINT: ButcherTableau<2> =
    ButcherTableau { c: [0.0, 0.5], a: [[0.0, 0.0], [0.5, 0.0]], b: [0.0, 1.0] };

/// The classic fourth-order Runge–Kutta method.
pub const RK4: ButcherTableau<4> = ButcherTableau {
    c: [0.0, 0.5, 0.5, 1.0],
    a: [[0.0, 0.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0], [0.0, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]],
    b: [1.0 / 6.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 6.0],
};

/// Kutta's 3/8 rule (torchdiffeq's `rk4`).
pub const RK38: ButcherTableau<4> = ButcherTableau {
    c: [0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0],
    a: [[0.0, 0.0, 0.0, 0.0], [1.0 / 3.0, 0.0, 0.0, 0.0], [-1.0 / 3.0, 1.0, 0.0, 0.0], [1.0, -1.0, 1.0, 0.0]],
    b: [0.125, 0.375, 0.375, 0.125],
};

/// Dormand–Prince 5(4). FSAL: the fifth-order weights equal the last row of
/// `a`, so stage 7's input is the new point `y₁` and its derivative is the
/// next step's first stage.
pub const DOPRI5: ButcherTableau<7> = ButcherTableau {
    c: [0.0, 1.0 / 5.0, 3.0 / 10.0, 4.0 / 5.0, 8.0 / 9.0, 1.0, 1.0],
    a: [
        [0.0; 7],
        [1.0 / 5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [3.0 / 40.0, 9.0 / 40.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [44.0 / 45.0, -56.0 / 15.0, 32.0 / 9.0, 0.0, 0.0, 0.0, 0.0],
        [19372.0 / 6561.0, -25360.0 / 2187.0, 64448.0 / 6561.0, -212.0 / 729.0, 0.0, 0.0, 0.0],
        [9017.0 / 3168.0, -355.0 / 33.0, 46732.0 / 5247.0, 49.0 / 176.0, -5103.0 / 18656.0, 0.0, 0.0],
        [35.0 / 384.0, 0.0, 500.0 / 1113.0, 125.0 / 192.0, -2187.0 / 6784.0, 11.0 / 84.0, 0.0],
    ],
    b: [35.0 / 384.0, 0.0, 500.0 / 1113.0, 125.0 / 192.0, -2187.0 / 6784.0, 11.0 / 84.0, 0.0],
};

/// `b − b*` with Shampine's b* = (1951/21600, 0, 22642/50085, 451/720,
/// −12231/42400, 649/6300, 1/60): the local error estimate is `h Σ ERR_i k_i`.
pub const DOPRI5_ERR: [f64; 7] = [
    35.0 / 384.0 - 1951.0 / 21600.0,
    0.0,
    500.0 / 1113.0 - 22642.0 / 50085.0,
    125.0 / 192.0 - 451.0 / 720.0,
    -2187.0 / 6784.0 + 12231.0 / 42400.0,
    11.0 / 84.0 - 649.0 / 6300.0,
    -1.0 / 60.0,
];

const SAFETY: f64 = 0.9;
const MAX_GROWTH: f64 = 10.0;
const MAX_SHRINK: f64 = 0.2;

/// Step-size factor after a trial step with error ratio `r` (spec §4.3):
/// accepted steps never shrink, rejected ones shrink at most 5×, growth is at
/// most 10×; a non-finite ratio (overflow inside the trial step) shrinks as
/// hard as allowed.
pub fn step_factor(r: f64) -> f64 {
    if r == 0.0 {
        MAX_GROWTH
    } else if !r.is_finite() {
        MAX_SHRINK
    } else {
        let floor = if r < 1.0 { 1.0 } else { MAX_SHRINK };
        (SAFETY * libm::pow(r, -1.0 / 5.0)).clamp(floor, MAX_GROWTH)
    }
}

/// First trial step of the initial-step selection (Hairer–Nørsett–Wanner
/// II.4, spec §4.3) from the error norms `d0 = ‖y0‖` and `d1 = ‖f0‖`.
pub fn initial_h0(d0: f64, d1: f64) -> f64 {
    if d0 < 1e-5 || d1 < 1e-5 { 1e-6 } else { 0.01 * d0 / d1 }
}

/// The order-4 estimate from `d1 = ‖f0‖` and `d2 = ‖f1 − f0‖ / h0`; the
/// initial step is `min(100 h0, initial_h1(h0, d1, d2))`.
pub fn initial_h1(h0: f64, d1: f64, d2: f64) -> f64 {
    if d1 <= 1e-15 && d2 <= 1e-15 { (h0 * 1e-3).max(1e-6) } else { libm::pow(0.01 / d1.max(d2), 1.0 / 5.0) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Quadrature conditions Σ b_i c_i^k = 1/(k+1): up to k = 4 for Dopri5's
    /// fifth-order weights, k = 3 for the embedded fourth-order ones
    /// (b* = b − ERR) and RK4/RK38; row sums of `a` equal `c` (float64, 1e-14).
    #[test]
    fn quadrature_and_row_sum_conditions_hold() {
        fn check<const S: usize>(t: &ButcherTableau<S>, b: &[f64; S], order: i32) {
            for k in 0..order {
                let sum: f64 = (0..S).map(|i| b[i] * t.c[i].powi(k)).sum();
                assert!((sum - 1.0 / f64::from(k + 1)).abs() < 1e-14, "k = {k}: {sum}");
            }
            for i in 0..S {
                let row: f64 = t.a[i].iter().sum();
                assert!((row - t.c[i]).abs() < 1e-14, "row {i}");
            }
        }
        check(&DOPRI5, &DOPRI5.b, 5);
        let embedded: [f64; 7] = core::array::from_fn(|i| DOPRI5.b[i] - DOPRI5_ERR[i]);
        check(&DOPRI5, &embedded, 4);
        check(&RK4, &RK4.b, 4);
        check(&RK38, &RK38.b, 4);
        check(&MIDPOINT, &MIDPOINT.b, 2);
        check(&EULER, &EULER.b, 1);
    }
}
