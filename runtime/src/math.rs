//! Scalar math through `libm`, so host, WASM and microcontrollers compute the
//! same functions (std's float intrinsics differ between platforms).

/// `log(2π) / 2`.
pub const HALF_LN_2PI: f32 = 0.918_938_5;

/// Logistic sigmoid, stable for large |x|.
#[inline]
pub fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + libm::expf(-x))
    } else {
        let e = libm::expf(x);
        e / (1.0 + e)
    }
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
        let (mantissa, exponent) = if (1e-3..1e7).contains(&a) {
            (a, None)
        } else {
            let e = libm::floorf(libm::log10f(a));
            (a / libm::powf(10.0, e), Some(e as i32))
        };
        let micros = libm::round(f64::from(mantissa) * 1e6) as u64;
        write!(f, "{sign}{}.{:06}", micros / 1_000_000, micros % 1_000_000)?;
        match exponent {
            Some(e) => write!(f, "e{e}"),
            None => Ok(()),
        }
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
        assert_eq!(format!("{}", Decimal(f32::NAN)), "NaN");
        assert_eq!(format!("{}", Decimal(f32::NEG_INFINITY)), "-inf");
        assert_eq!(format!("{}", Decimal(2.5e-7)), "2.500000e-7");
        assert_eq!(format!("{}", Decimal(3.0e12)), "3.000000e12");
    }

    #[test]
    fn standard_normal_at_origin() {
        let lp = standard_normal_log_prob(&[0.0, 0.0]);
        assert!((lp as f64 + (2.0 * core::f64::consts::PI).ln()).abs() < 1e-6);
    }
}
