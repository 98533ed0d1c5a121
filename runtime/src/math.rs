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
    fn standard_normal_at_origin() {
        let lp = standard_normal_log_prob(&[0.0, 0.0]);
        assert!((lp as f64 + (2.0 * core::f64::consts::PI).ln()).abs() < 1e-6);
    }
}
