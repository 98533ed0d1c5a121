//! The base density at the end of the chain: `N(0, I)`, or a Gaussian kernel
//! density estimate over stored latent points ([`crate::format::Stage::KdeBase`]).
//! Standard-normal draws from any `rand_core::Rng` (Box–Muller through libm).

use rand_core::Rng;

#[cfg(feature = "kde")]
use crate::format::{KdeSpec, Weights};
#[cfg(feature = "kde")]
use crate::math::{HALF_LN_2PI, standard_normal_log_prob};

/// A uniform draw in (0, 1] with 24 random bits.
fn uniform_open0<R: Rng + ?Sized>(rng: &mut R) -> f32 {
    ((rng.next_u32() >> 8) + 1) as f32 * (1.0 / 16_777_216.0)
}

/// Fills `out` with independent N(0, 1) draws (two per pair of uniforms).
pub fn fill_standard_normal<R: Rng + ?Sized>(rng: &mut R, out: &mut [f32]) {
    for pair in out.chunks_mut(2) {
        let u1 = uniform_open0(rng);
        let u2 = uniform_open0(rng);
        let r = libm::sqrtf(-2.0 * libm::logf(u1));
        let (s, c) = libm::sincosf(2.0 * core::f32::consts::PI * u2);
        let mut vals = [r * c, r * s].into_iter();
        for o in pair {
            *o = vals.next().unwrap_or(0.0);
        }
    }
}

/// Draws from `(1 − w)/n Σ_i N(c_i, h² I) + w N(0, I)` into `out`: with
/// probability `w` a standard normal, else a uniformly chosen centre plus
/// `h` times a standard normal.
#[cfg(feature = "kde")]
pub(crate) fn kde_sample<R: Rng + ?Sized>(spec: KdeSpec, centres: Weights<'_>, rng: &mut R, out: &mut [f32]) {
    fill_standard_normal(rng, out);
    if uniform_open0(rng) <= spec.normal_weight {
        return;
    }
    // A centre by the high bits of n · u (u uniform in [0, 2³²)).
    let i = ((u64::from(rng.next_u32()) * u64::from(spec.centres)) >> 32) as usize;
    let centre = centres.slice(i.saturating_mul(out.len()), out.len());
    for (o, c) in out.iter_mut().zip(centre.iter()) {
        *o = c + spec.bandwidth * *o;
    }
}

/// `log ((1 − w)/n Σ_i N(z; c_i, h² I) + w N(z; 0, I))`: the kernels by a
/// running log-sum-exp in `f32` over the centres in file order (one pass,
/// no scratch), then the normal part by one more log-add-exp. A point so far
/// from every centre that its squared distance overflows gets the normal
/// part alone (`−∞` when that overflows too, as for the Gaussian base).
#[cfg(feature = "kde")]
pub(crate) fn kde_log_prob(spec: KdeSpec, centres: Weights<'_>, z: &[f32]) -> f32 {
    let d = z.len();
    let h = spec.bandwidth;
    let scale = -0.5 / (h * h);
    let (mut max, mut sum) = (f32::NEG_INFINITY, 0.0f32);
    for c in centres.rows(d) {
        let mut dist2 = 0.0f32;
        for (zi, ci) in z.iter().zip(c.iter()) {
            let e = zi - ci;
            dist2 += e * e;
        }
        let v = dist2 * scale;
        if v > max {
            sum = sum * libm::expf(max - v) + 1.0;
            max = v;
        } else {
            sum += libm::expf(v - max);
        }
    }
    let norm = libm::logf(spec.centres as f32) + d as f32 * (HALF_LN_2PI + libm::logf(h));
    let kernels = max + libm::logf(sum) - norm;
    let w = spec.normal_weight;
    if w <= 0.0 {
        return kernels;
    }
    let a = libm::log1pf(-w) + kernels;
    let b = libm::logf(w) + standard_normal_log_prob(z);
    let (hi, lo) = if a >= b { (a, b) } else { (b, a) };
    if hi == f32::NEG_INFINITY { hi } else { hi + libm::log1pf(libm::expf(lo - hi)) }
}
