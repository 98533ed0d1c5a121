//! Scalar math through `libm`, so host, WASM and microcontrollers compute the
//! same functions (std's float intrinsics differ between platforms).

/// `log(2π) / 2`.
pub const HALF_LN_2PI: f32 = 0.918_938_5;

/// Logistic sigmoid, branch-free (it vectorises in [`sigmoid_in_place`]):
/// `1 / (1 + e^{−|x|})` or its complement, with [`tanh_with_derivative`]'s
/// exponential. Max error 1e-7 absolute, and 2.5e-7 relative for x ≥ −80
/// (inputs are clamped at ±87), against float64 (tested; 2.0e-7 measured
/// on every 37th float below 32). The one sigmoid of
/// both evaluation paths (gates, softplus' derivative, swish).
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    // `a > 87` is false for NaN, which then flows through the arithmetic
    // and comes out NaN (no separate NaN test).
    let a = f32::from_bits(x.to_bits() & 0x7fff_ffff);
    let a = if a > 87.0 { 87.0 } else { a };
    let (scale, m) = exp_parts(-a);
    let e = scale + scale * m;
    let p = 1.0 / (1.0 + e);
    if x >= 0.0 { p } else { e * p }
}

/// PyTorch's softplus with β = 1 and threshold 20: `x` above the threshold.
#[inline]
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 { x } else { libm::log1pf(libm::expf(x)) }
}

/// Log-density of the standard normal over all coordinates:
/// `Σ_i (−½ log 2π − z_i² / 2)`.
pub fn standard_normal_log_prob(z: &[f32]) -> f32 {
    z.iter().map(|&v| -HALF_LN_2PI - 0.5 * v * v).sum()
}

/// `tanh(x)` and its derivative `1 − tanh²(x)`, branch-free so the compiler
/// vectorises it in [`tanh_in_place`]. Max error 1.6e-7 absolute and
/// 2.5e-7 relative against float64 (tested; 1.5e-7 and 2.0e-7 measured on
/// every 37th float below 32), derivative 3.5e-7. The one tanh of both evaluation paths:
/// on the Cortex-M4F about a quarter of `libm::tanhf`'s instructions, which
/// calls `expm1f` with branches. `#[inline(always)]` so that a caller compiled
/// for wider vectors (the trainer's AVX2 path) gets it compiled for them too.
#[inline(always)]
pub fn tanh_with_derivative(x: f32) -> (f32, f32) {
    // Bit operations and plain compares (not fabsf/min/copysignf, which
    // LLVM keeps scalar here). `a > 9` is false for NaN, which flows through
    // the arithmetic and comes out NaN.
    let a = f32::from_bits(x.to_bits() & 0x7fff_ffff);
    let a = if a > 9.0 { 9.0 } else { a };
    // tanh a = −m / (2 + m) with m = e^{−2a} − 1, and m from its parts
    // without cancellation (`1 − 2ⁿ` is exact, and 0 for small a), so one
    // formula is accurate from 0 up (no separate series for small |x|).
    let (scale, m) = exp_parts(-2.0 * a);
    let minus_m = (1.0 - scale) - scale * m;
    let t = minus_m / (2.0 - minus_m);
    let y = f32::from_bits(t.to_bits() | (x.to_bits() & 0x8000_0000));
    (y, 1.0 - y * y)
}

/// [`tanh_with_derivative`] of every value: `tanh` in place, `1 − tanh²` into
/// `derivative` (the packed kernel's activation).
#[inline]
pub fn tanh_in_place(values: &mut [f32], derivative: &mut [f32]) {
    for (v, d) in values.iter_mut().zip(derivative.iter_mut()) {
        (*v, *d) = tanh_with_derivative(*v);
    }
}

/// [`sigmoid`] of every value in place (per-row gates of the packed kernel).
pub fn sigmoid_in_place(values: &mut [f32]) {
    for v in values.iter_mut() {
        *v = sigmoid(*v);
    }
}

/// `eˣ = 2ⁿ (1 + m)` for `−87 ≤ x ≤ 0` (callers clamp; NaN gives NaN),
/// returned as `(2ⁿ, m)`, without calls or branches: round to
/// `x = n ln 2 + r` (|r| ≤ ln2 / 2, Cody–Waite split), then
/// `m = eʳ − 1 = r·p(r)` with `p` of degree 5 interpolating `(eʳ − 1)/r` at
/// Chebyshev nodes on ±0.35 (2.6e-8 relative with its f32 coefficients),
/// and `2ⁿ` from the bits. Keeping `m` apart gives both `eˣ` and `eˣ − 1`
/// to full relative accuracy.
#[inline(always)]
fn exp_parts(x: f32) -> (f32, f32) {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2²³: adding it rounds to an integer
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const P2: f32 = 1.666_649_9e-1;
    const P3: f32 = 4.166_645_6e-2;
    const P4: f32 = 8.369_861e-3;
    const P5: f32 = 1.393_453_2e-3;
    let shifted = x * core::f32::consts::LOG2_E + MAGIC;
    let n = shifted - MAGIC;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let m = r * (1.0 + r * (0.5 + r * (P2 + r * (P3 + r * (P4 + r * P5)))));
    // The low mantissa bits of `shifted` hold n (two's complement).
    let n_bits = shifted.to_bits().wrapping_sub(MAGIC.to_bits()) as i32;
    let scale = f32::from_bits((n_bits.wrapping_add(127) as u32) << 23);
    (scale, m)
}

/// Formats an `f32` with integer arithmetic only, so error messages do not
/// pull `core`'s float formatting (8–10 KB of flash) into firmware. Six
/// significant decimals: fixed notation for 1e-3 ≤ |v| < 1e7, else `m.mmmmmme±x`.
#[derive(Clone, Copy, Debug)]
pub struct Decimal(pub f32);

impl core::fmt::Display for Decimal {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let v = self.0;
        if v.is_nan() {
            return f.write_str("NaN");
        }
        let sign = if v.is_sign_negative() { "-" } else { "" };
        let a = libm::fabsf(v);
        if a.is_infinite() {
            return write!(f, "{sign}inf");
        }
        if a == 0.0 {
            return f.write_str("0");
        }
        // Decimal exponent by repeated scaling in f64 (exact enough for six
        // digits, and no `log10f`/`powf` in the binary).
        let mut mantissa = f64::from(a);
        let mut exponent = None;
        if !(1e-3..1e7).contains(&a) {
            let mut e = 0i32;
            while mantissa >= 10.0 {
                mantissa /= 10.0;
                e += 1;
            }
            while mantissa < 1.0 {
                mantissa *= 10.0;
                e -= 1;
            }
            exponent = Some(e);
        }
        // Non-negative, so adding one half and truncating rounds to nearest.
        let mut micros = (mantissa * 1e6 + 0.5) as u64;
        if let Some(e) = exponent.as_mut()
            && micros >= 10_000_000
        {
            // 9.9999996 rounded up to 10.000000: renormalize.
            micros /= 10;
            *e += 1;
        }
        write!(f, "{sign}{}.{:06}", micros / 1_000_000, micros % 1_000_000)?;
        match exponent {
            Some(e) => write!(f, "e{e}"),
            None => Ok(()),
        }
    }
}

/// Copies the common prefix of `src` into `dst` (callers size both alike;
/// unlike `copy_from_slice` this never panics).
pub(crate) fn copy(dst: &mut [f32], src: &[f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = s;
    }
}

/// Whether every value is finite; `Err(index)` of the first that is not.
pub(crate) fn check_finite(xs: &[f32]) -> Result<(), usize> {
    match xs.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(i),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_sigmoid_matches_float64() {
        extern crate std;
        let mut xs: std::vec::Vec<f32> = (-100_000..=100_000).map(|i| i as f32 * 1e-3).collect();
        xs.extend([1e-30f32, -1e-30, 90.0, -90.0, 1e30, -1e30, f32::MAX, f32::MIN]);
        let mut ys = xs.clone();
        sigmoid_in_place(&mut ys);
        for (&x, &y) in xs.iter().zip(&ys) {
            let want = 1.0 / (1.0 + (-(x as f64)).exp());
            assert!((y as f64 - want).abs() <= 1e-7, "sigmoid({x}) = {y}, want {want}");
            // Relative accuracy down to e^-80; below that the input is clamped at -87.
            if x >= -80.0 {
                assert!(
                    (y as f64 - want).abs() <= 2.5e-7 * want,
                    "sigmoid({x}) = {y}, want {want} (relative)"
                );
            }
        }
        let mut nan = [f32::NAN, -f32::NAN];
        sigmoid_in_place(&mut nan);
        assert!(nan.iter().all(|v| v.is_nan()));
        assert_eq!((sigmoid(f32::INFINITY), sigmoid(f32::NEG_INFINITY) < 1e-37), (1.0, true));
    }

    #[test]
    fn vector_tanh_matches_float64() {
        extern crate std;
        let mut xs: std::vec::Vec<f32> = (-200_000..=200_000).map(|i| i as f32 * 1e-4).collect();
        xs.extend([1e-30f32, -1e-8, 0.0999, 0.1, 0.1001, 9.5, -40.0, 1e30, f32::MAX, f32::MIN_POSITIVE]);
        let mut ys = xs.clone();
        let mut ds = std::vec![0.0; xs.len()];
        tanh_in_place(&mut ys, &mut ds);
        for ((&x, &y), &d) in xs.iter().zip(&ys).zip(&ds) {
            let want = (x as f64).tanh();
            let err = (y as f64 - want).abs();
            assert!(err <= 1.6e-7 && err <= 2.5e-7 * want.abs(), "tanh({x}) = {y}, want {want}");
            assert!((d as f64 - (1.0 - want * want)).abs() <= 3.5e-7, "tanh'({x}) = {d}");
        }
        let mut nan = [f32::NAN, -f32::NAN];
        tanh_in_place(&mut nan, &mut [0.0; 2]);
        assert!(nan.iter().all(|v| v.is_nan()));
        // Signed zeros and infinities keep their sign.
        assert_eq!(tanh_with_derivative(0.0), (0.0, 1.0));
        assert!(tanh_with_derivative(0.0).0.is_sign_positive());
        assert!(tanh_with_derivative(-0.0).0.is_sign_negative());
        assert_eq!(tanh_with_derivative(f32::INFINITY).0, 1.0);
        assert_eq!(tanh_with_derivative(f32::NEG_INFINITY).0, -1.0);
    }

    #[test]
    fn sigmoid_is_symmetric_and_stable() {
        for &x in &[-100.0f32, -5.0, -0.5, 0.0, 0.5, 5.0, 100.0] {
            let s = sigmoid(x);
            assert!((s + sigmoid(-x) - 1.0).abs() < 1e-6);
            assert!(s.is_finite());
        }
        assert_eq!(sigmoid(0.0), 0.5);
    }

    #[test]
    fn softplus_matches_definition_and_threshold() {
        for &x in &[-10.0f32, -1.0, 0.0, 1.0, 10.0] {
            let r = (1.0f64 + (x as f64).exp()).ln();
            assert!((softplus(x) as f64 - r).abs() < 1e-6);
        }
        assert_eq!(softplus(25.0), 25.0);
    }

    #[test]
    fn decimal_formats_without_float_formatting() {
        extern crate std;
        use std::format;
        assert_eq!(format!("{}", Decimal(0.5)), "0.500000");
        assert_eq!(format!("{}", Decimal(-12.25)), "-12.250000");
        assert_eq!(format!("{}", Decimal(0.0)), "0");
        assert_eq!(format!("{}", Decimal(-0.0)), "0");
        assert_eq!(format!("{}", Decimal(f32::NAN)), "NaN");
        assert_eq!(format!("{}", Decimal(f32::NEG_INFINITY)), "-inf");
        assert_eq!(format!("{}", Decimal(2.5e-7)), "2.500000e-7");
        assert_eq!(format!("{}", Decimal(3.0e12)), "3.000000e12");
        assert_eq!(format!("{}", Decimal(f32::MAX)), "3.402823e38");
        // A subnormal: the f32 nearest to -1e-40.
        assert_eq!(format!("{}", Decimal(-1e-40)), "-9.999946e-41");
        assert_eq!(format!("{}", Decimal(1e-30)), "1.000000e-30");
        assert_eq!(format!("{}", Decimal(1e-3)), "0.001000");
    }

    #[test]
    fn standard_normal_at_origin() {
        let lp = standard_normal_log_prob(&[0.0, 0.0]);
        assert!((lp as f64 + (2.0 * core::f64::consts::PI).ln()).abs() < 1e-6);
    }
}
