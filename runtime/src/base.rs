//! Standard-normal draws from any `rand_core::Rng` (Box–Muller through libm).

use rand_core::Rng;

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
