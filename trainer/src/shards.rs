//! The CPU kernel's batches split by rows into shards that run on their own
//! threads ([`Mlp::forward_sharded`], [`Mlp::vjp_sharded`]): rows are
//! independent, and the shards' parameter gradients are summed in shard
//! order, so a given thread count always gives the same bits.

use crate::kernel::{Mlp, Pass, Real, Vjp};

/// Rows below which a batch is not split: a thread costs tens of
/// microseconds, a shard of this many rows of a 64-wide net about as much.
const MIN_ROWS_PER_SHARD: usize = 64;

/// A forward pass over a batch split by rows into contiguous shards.
pub struct ShardedPass<T> {
    /// Each shard's rows and pass, in row order.
    shards: Vec<(std::ops::Range<usize>, Pass<T>)>,
    /// `f(t, z)`, `[B, D]`.
    pub f: Vec<T>,
    /// The divergence per row.
    pub trace: Vec<T>,
}

impl<T: Real> ShardedPass<T> {
    /// Whether this pass was computed for `z` (and `noise`, if given).
    pub fn matches(&self, z: &[T], noise: Option<&[T]>) -> bool {
        let d = if self.trace.is_empty() { 0 } else { z.len() / self.trace.len() };
        z.len() == self.trace.len() * d
            && noise.is_none_or(|e| e.len() == z.len())
            && self.shards.iter().all(|(r, pass)| {
                let cols = r.start * d..r.end * d;
                pass.matches(&z[cols.clone()], noise.map(|e| &e[cols]))
            })
    }

    /// Memory held, in bytes.
    pub fn bytes(&self) -> usize {
        let own = (self.f.len() + self.trace.len()) * std::mem::size_of::<T>();
        own + self.shards.iter().map(|(_, p)| p.bytes()).sum::<usize>()
    }
}

/// The row ranges `rows` is split into for `threads` threads.
fn shard_ranges(rows: usize, threads: usize) -> Vec<std::ops::Range<usize>> {
    let n = threads.min(rows / MIN_ROWS_PER_SHARD).max(1);
    (0..n).map(|i| rows * i / n..rows * (i + 1) / n).collect()
}

/// Runs `work` on every shard on rayon's pool (threads that persist, so
/// their stacks and allocator arenas are reused across calls), returning
/// the results in shard order.
fn on_shards<I: Sync, R: Send>(shards: &[I], work: impl Fn(&I) -> R + Sync + Send) -> Vec<R> {
    use rayon::prelude::*;
    match shards {
        [one] => vec![work(one)],
        _ => shards.par_iter().map(work).collect(),
    }
}

impl<T: Real> Mlp<'_, T> {
    /// [`Mlp::forward`] with the rows split over up to `threads` threads.
    pub fn forward_sharded(
        &self,
        z: &[T],
        rows: usize,
        noise: Option<&[T]>,
        threads: usize,
    ) -> ShardedPass<T> {
        let d = self.dim;
        assert_eq!(z.len(), rows * d, "z is not [rows, D]");
        let ranges = shard_ranges(rows, threads);
        let passes = on_shards(&ranges, |r: &std::ops::Range<usize>| {
            let cols = r.start * d..r.end * d;
            self.forward(&z[cols.clone()], r.len(), noise.map(|e| &e[cols]))
        });
        let f = passes.iter().flat_map(|p| p.f.iter().copied()).collect();
        let trace = passes.iter().flat_map(|p| p.trace.iter().copied()).collect();
        ShardedPass { shards: ranges.into_iter().zip(passes).collect(), f, trace }
    }

    /// [`Mlp::vjp`] of a sharded pass, each shard on its own thread; the
    /// parameter and time gradients are summed in shard order.
    pub fn vjp_sharded(&self, pass: &ShardedPass<T>, a_f: &[T], a_tr: &[T]) -> Vjp<T> {
        let d = self.dim;
        assert!(
            a_f.len() == pass.trace.len() * d && a_tr.len() == pass.trace.len(),
            "cotangents do not match"
        );
        let parts = on_shards(&pass.shards, |(r, shard)| {
            self.vjp(shard, &a_f[r.start * d..r.end * d], &a_tr[r.clone()])
        });
        let mut parts = parts.into_iter();
        let mut total = parts.next().expect("at least one shard");
        for part in parts {
            total.grad_z.extend_from_slice(&part.grad_z);
            for (g, &v) in total.grad_params.iter_mut().zip(&part.grad_params) {
                *g = *g + v;
            }
            total.grad_t = total.grad_t + part.grad_t;
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::LayerShape;
    use ffjord_runtime::{Activation, LayerKind};

    /// Splitting a batch over threads changes nothing but the order in which
    /// the shards' parameter gradients are summed (float64, 1e-12 relative).
    #[test]
    fn sharded_passes_equal_the_single_pass() {
        let shapes = [
            LayerShape { kind: LayerKind::ConcatSquash, d_in: 3, d_out: 8 },
            LayerShape { kind: LayerKind::Concat, d_in: 8, d_out: 8 },
            LayerShape { kind: LayerKind::ConcatSquash, d_in: 8, d_out: 3 },
        ];
        let n: usize = shapes.iter().map(LayerShape::numel).sum();
        let wave = |i: usize, a: f64| (i as f64 * a).sin();
        let params: Vec<f64> = (0..n).map(|i| 0.4 * wave(i, 1.7)).collect();
        let mlp = Mlp::at(&shapes, Activation::Tanh, &params, 0.3).unwrap();
        let rows = 3 * MIN_ROWS_PER_SHARD + 5;
        let z: Vec<f64> = (0..rows * 3).map(|i| wave(i, 0.61)).collect();
        let e: Vec<f64> = (0..rows * 3).map(|i| wave(i, 2.3).signum()).collect();
        let a_f: Vec<f64> = (0..rows * 3).map(|i| wave(i, 0.37)).collect();
        let a_tr: Vec<f64> = (0..rows).map(|i| wave(i, 1.1)).collect();
        let close = |a: &[f64], b: &[f64], what: &str| {
            assert_eq!(a.len(), b.len(), "{what}");
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() <= 1e-12 * (1.0 + y.abs()), "{what}: {x} vs {y}");
            }
        };
        assert_eq!(shard_ranges(rows, 3).len(), 3);
        assert_eq!(shard_ranges(MIN_ROWS_PER_SHARD + 1, 8).len(), 1, "small batches stay whole");
        for noise in [None, Some(e.as_slice())] {
            let one = mlp.forward(&z, rows, noise);
            let split = mlp.forward_sharded(&z, rows, noise, 3);
            assert!(split.matches(&z, noise) && !split.matches(&a_f, noise));
            close(&split.f, &one.f, "f");
            close(&split.trace, &one.trace, "trace");
            let (v1, v3) = (mlp.vjp(&one, &a_f, &a_tr), mlp.vjp_sharded(&split, &a_f, &a_tr));
            close(&v3.grad_z, &v1.grad_z, "grad z");
            close(&v3.grad_params, &v1.grad_params, "grad params");
            close(&[v3.grad_t], &[v1.grad_t], "grad t");
        }
    }
}
