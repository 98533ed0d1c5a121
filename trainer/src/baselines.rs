//! Baseline anomaly scorers on the same splits as the flow: a full-covariance
//! Gaussian (Mahalanobis), a Gaussian mixture fitted by EM, an isolation
//! forest (Liu, Ting & Zhou 2008), local outlier factor (Breunig et al. 2000,
//! novelty scoring as scikit-learn's `novelty=True`) and a Gaussian kernel
//! density estimate with its bandwidth chosen by validation log-likelihood.
//! The dense algebra (distances, nearest neighbours by `topk`, Cholesky,
//! log-sum-exp) is libtorch's through tch; the isolation forests on crates.io
//! take the dimension as a const generic and cannot be seeded, so that one is a
//! small, seeded implementation of the original algorithm.

use anyhow::{Result, ensure};
use tch::{Device, Kind, Tensor};

pub use crate::kde::KernelDensity;

fn opts() -> (Kind, Device) {
    (Kind::Double, Device::Cpu)
}

/// A Gaussian mixture with full covariances (K = 1 is the Mahalanobis baseline).
pub struct Mixture {
    log_weights: Tensor,
    means: Tensor,
    /// Cholesky factors of the covariances, `[K, D, D]`.
    chol: Tensor,
}

impl Mixture {
    /// Fits by EM (`iterations` rounds) from `k` distinct random rows; covariances get a 1e-6 ridge.
    pub fn fit(x: &Tensor, k: i64, iterations: usize, seed: i64) -> Result<Self> {
        let (n, d) = (x.size()[0], x.size()[1]);
        ensure!(n > k * d, "{n} rows are too few for {k} full-covariance components in {d} dimensions");
        tch::manual_seed(seed);
        let eye = Tensor::eye(d, opts()) * 1e-6;
        let mut means = x.index_select(0, &Tensor::randperm(n, (Kind::Int64, Device::Cpu)).narrow(0, 0, k));
        let cov0 = x.transpose(0, 1).cov(1, None::<Tensor>, None::<Tensor>) + &eye;
        let mut chol = cov0.linalg_cholesky(false).unsqueeze(0).repeat([k, 1, 1]);
        let mut log_weights = Tensor::full([k], -(k as f64).ln(), opts());
        for _ in 0..iterations {
            let m = Mixture {
                log_weights: log_weights.shallow_clone(),
                means: means.shallow_clone(),
                chol: chol.shallow_clone(),
            };
            let comp = m.component_log_probs(x); // [N, K]
            let resp = (&comp - comp.logsumexp([1], true)).exp(); // [N, K]
            let nk = resp.sum_dim_intlist(0, false, Kind::Double) + 1e-10;
            log_weights = (&nk / n as f64).log();
            means = resp.transpose(0, 1).matmul(x) / nk.unsqueeze(1);
            let mut chols = Vec::new();
            for j in 0..k {
                let diff = x - means.get(j);
                let w = resp.select(1, j).unsqueeze(1);
                let cov = (&diff * &w).transpose(0, 1).matmul(&diff) / nk.get(j) + &eye;
                chols.push(cov.linalg_cholesky(false));
            }
            chol = Tensor::stack(&chols, 0);
        }
        Ok(Mixture { log_weights, means, chol })
    }

    /// `[N, K]` log w_k + log N(x | μ_k, Σ_k).
    fn component_log_probs(&self, x: &Tensor) -> Tensor {
        let k = self.means.size()[0];
        let d = x.size()[1] as f64;
        let mut cols = Vec::new();
        for j in 0..k {
            let l = self.chol.get(j);
            let diff = (x - self.means.get(j)).transpose(0, 1); // [D, N]
            let z = Tensor::linalg_solve_triangular(&l, &diff, false, true, false);
            let maha = z.square().sum_dim_intlist(0, false, Kind::Double);
            let log_det = l.diagonal(0, 0, 1).log().sum(Kind::Double) * 2.0;
            cols.push(
                -0.5 * maha - 0.5 * (log_det + d * (2.0 * std::f64::consts::PI).ln())
                    + self.log_weights.get(j),
            );
        }
        Tensor::stack(&cols, 1)
    }

    /// log p(x) per row.
    pub fn log_prob(&self, x: &Tensor) -> Result<Vec<f64>> {
        Ok(Vec::<f64>::try_from(&self.component_log_probs(x).logsumexp([1], false))?)
    }
}

/// Squared Euclidean distances `[Q, N]` between rows of `q` and `x`, in query chunks, reduced by `f`.
pub(crate) fn by_distance_chunks(q: &Tensor, x: &Tensor, mut f: impl FnMut(Tensor) -> Tensor) -> Tensor {
    let n = q.size()[0];
    let chunk = (1 << 24) / x.size()[0].max(1);
    let chunk = chunk.clamp(1, 4096);
    let x_sq = x.square().sum_dim_intlist(1, false, Kind::Double);
    let mut parts = Vec::new();
    let mut s = 0;
    while s < n {
        let len = chunk.min(n - s);
        let qc = q.narrow(0, s, len);
        let q_sq = qc.square().sum_dim_intlist(1, true, Kind::Double);
        let d2 = (q_sq + x_sq.unsqueeze(0) - qc.matmul(&x.transpose(0, 1)) * 2.0).clamp_min(0.0);
        parts.push(f(d2));
        s += len;
    }
    Tensor::cat(&parts, 0)
}

/// Local outlier factor with `k` neighbours, fitted on `x`; scores new rows
/// (novelty detection). Larger is more anomalous (≈ 1 inside the data).
pub struct LocalOutlierFactor {
    x: Tensor,
    k: i64,
    /// k-distance of every training row (its own row excluded).
    k_distance: Tensor,
    /// Local reachability density of every training row.
    lrd: Tensor,
}

impl LocalOutlierFactor {
    /// Fits on the rows of `x` (`[N, D]`, f64), `k < N`.
    pub fn fit(x: &Tensor, k: i64) -> Result<Self> {
        let n = x.size()[0];
        ensure!(n > k, "{n} rows are too few for LOF with k = {k}");
        // k + 1 nearest including the row itself (distance 0), then drop the first.
        let near = by_distance_chunks(x, x, |d2| {
            let (v, i) = d2.topk(k + 1, 1, false, true);
            Tensor::cat(&[v.sqrt(), i.to_kind(Kind::Double)], 1)
        });
        let dist = near.narrow(1, 1, k);
        let idx = near.narrow(1, k + 2, k).to_kind(Kind::Int64);
        let k_distance = dist.select(1, k - 1);
        let reach = dist.maximum(&k_distance.index_select(0, &idx.reshape([-1])).reshape([n, k]));
        let lrd = 1.0 / (reach.mean_dim(1, false, Kind::Double) + 1e-10);
        Ok(LocalOutlierFactor { x: x.shallow_clone(), k, k_distance, lrd })
    }

    /// LOF of each row of `q`.
    pub fn score(&self, q: &Tensor) -> Result<Vec<f64>> {
        let k = self.k;
        let near = by_distance_chunks(q, &self.x, |d2| {
            let (v, i) = d2.topk(k, 1, false, true);
            Tensor::cat(&[v.sqrt(), i.to_kind(Kind::Double)], 1)
        });
        let m = q.size()[0];
        let dist = near.narrow(1, 0, k);
        let idx = near.narrow(1, k, k).to_kind(Kind::Int64).reshape([-1]);
        let reach = dist.maximum(&self.k_distance.index_select(0, &idx).reshape([m, k]));
        let lrd_q = 1.0 / (reach.mean_dim(1, false, Kind::Double) + 1e-10);
        let lrd_o = self.lrd.index_select(0, &idx).reshape([m, k]).mean_dim(1, false, Kind::Double);
        Ok(Vec::<f64>::try_from(&(lrd_o / lrd_q))?)
    }
}

enum Node {
    Leaf { size: usize },
    Split { feature: usize, threshold: f64, left: Box<Node>, right: Box<Node> },
}

/// An isolation forest: `trees` trees on subsamples of `sample` rows.
pub struct IsolationForest {
    trees: Vec<Node>,
    sample: usize,
}

/// Average path length of an unsuccessful search in a binary search tree of n points.
fn c(n: usize) -> f64 {
    if n <= 1 {
        0.0
    } else {
        let n = n as f64;
        2.0 * ((n - 1.0).ln() + 0.577_215_664_901_532_9) - 2.0 * (n - 1.0) / n
    }
}

/// SplitMix64: a small seeded generator for tree building.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl IsolationForest {
    /// Builds `trees` trees (depth limit ⌈log2 sample⌉) on rows of `x` (`n × d`, row-major).
    pub fn fit(x: &[f64], d: usize, trees: usize, sample: usize, seed: u64) -> Self {
        let n = x.len() / d;
        let sample = sample.min(n);
        let limit = (sample as f64).log2().ceil() as usize;
        let mut rng = Rng(seed);
        let trees = (0..trees)
            .map(|_| {
                let idx: Vec<usize> = (0..sample).map(|_| rng.below(n)).collect();
                build(x, d, idx, 0, limit, &mut rng)
            })
            .collect();
        IsolationForest { trees, sample }
    }

    /// Anomaly score in (0, 1): `2^(−E[h(x)] / c(sample))`; larger is more anomalous.
    pub fn score(&self, row: &[f64]) -> f64 {
        let mean: f64 = self.trees.iter().map(|t| path(t, row, 0)).sum::<f64>() / self.trees.len() as f64;
        2f64.powf(-mean / c(self.sample))
    }
}

fn build(x: &[f64], d: usize, idx: Vec<usize>, depth: usize, limit: usize, rng: &mut Rng) -> Node {
    if depth >= limit || idx.len() <= 1 {
        return Node::Leaf { size: idx.len() };
    }
    // A feature with spread among these rows, tried a few times.
    for _ in 0..d.max(4) {
        let f = rng.below(d);
        let (lo, hi) = idx.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &i| {
            (lo.min(x[i * d + f]), hi.max(x[i * d + f]))
        });
        if hi > lo {
            let t = lo + rng.unit() * (hi - lo);
            let (l, r): (Vec<usize>, Vec<usize>) = idx.iter().partition(|&&i| x[i * d + f] < t);
            return Node::Split {
                feature: f,
                threshold: t,
                left: Box::new(build(x, d, l, depth + 1, limit, rng)),
                right: Box::new(build(x, d, r, depth + 1, limit, rng)),
            };
        }
    }
    Node::Leaf { size: idx.len() }
}

fn path(node: &Node, row: &[f64], depth: usize) -> f64 {
    match node {
        Node::Leaf { size } => depth as f64 + c(*size),
        Node::Split { feature, threshold, left, right } => {
            path(if row[*feature] < *threshold { left } else { right }, row, depth + 1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaussian_baseline_is_the_normal_density() {
        tch::manual_seed(0);
        let x = Tensor::randn([4000, 2], opts()) * Tensor::from_slice(&[2.0, 0.5])
            + Tensor::from_slice(&[1.0, -1.0]);
        let g = Mixture::fit(&x, 1, 3, 0).unwrap();
        let lp = g.log_prob(&Tensor::from_slice(&[1.0, -1.0]).reshape([1, 2])).unwrap()[0];
        let exact = -(2.0 * std::f64::consts::PI).ln() - (2.0f64 * 0.5).ln();
        assert!((lp - exact).abs() < 0.05, "{lp} vs {exact}");
    }

    #[test]
    fn lof_matches_a_direct_computation_and_flags_an_isolated_row() {
        tch::manual_seed(2);
        let x = Tensor::randn([60, 3], opts());
        let k = 5;
        let lof = LocalOutlierFactor::fit(&x, k).unwrap();
        // Direct O(N²) definition, for two query rows.
        let rows = Vec::<f64>::try_from(&x.reshape([-1])).unwrap();
        let row = |i: usize| &rows[i * 3..i * 3 + 3];
        let dist = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(p, q)| (p - q).powi(2)).sum::<f64>().sqrt();
        let knn = |q: &[f64], skip: Option<usize>| {
            let mut v: Vec<(f64, usize)> =
                (0..60).filter(|&j| Some(j) != skip).map(|j| (dist(q, row(j)), j)).collect();
            v.sort_by(|a, b| a.0.total_cmp(&b.0));
            v.truncate(k as usize);
            v
        };
        let kdist = |j: usize| knn(row(j), Some(j)).last().unwrap().0;
        let lrd = |q: &[f64], skip: Option<usize>| {
            let nn = knn(q, skip);
            1.0 / (nn.iter().map(|&(d, j)| d.max(kdist(j))).sum::<f64>() / k as f64 + 1e-10)
        };
        for q in [[0.1, -0.2, 0.3], [4.0, 4.0, -4.0]] {
            let nn = knn(&q, None);
            let direct =
                nn.iter().map(|&(_, j)| lrd(row(j), Some(j))).sum::<f64>() / k as f64 / lrd(&q, None);
            let got = lof.score(&Tensor::from_slice(&q).reshape([1, 3])).unwrap()[0];
            assert!((got - direct).abs() < 1e-9 * direct, "{got} vs {direct}");
        }
        let s = lof.score(&Tensor::from_slice(&[0.0, 0.0, 0.0, 6.0, 6.0, 6.0]).reshape([2, 3])).unwrap();
        assert!(s[0] < 1.5 && s[1] > 3.0, "{s:?}");
    }

    #[test]
    fn kde_is_a_normalized_density_and_picks_a_sensible_bandwidth() {
        tch::manual_seed(3);
        let x = Tensor::randn([2000, 1], opts());
        let valid = Tensor::randn([500, 1], opts());
        let kde = KernelDensity::fit(&x, &valid).unwrap();
        // Silverman's rule for N(0, 1), n = 2000: 1.06 · 2000^(−1/5) ≈ 0.24.
        assert!(kde.bandwidth > 0.1 && kde.bandwidth < 0.6, "{}", kde.bandwidth);
        // ∫ p = 1 by the trapezoid rule on [−8, 8].
        let grid = Tensor::linspace(-8.0, 8.0, 4001, opts()).unsqueeze(1);
        let p: Vec<f64> = kde.log_prob(&grid).unwrap().iter().map(|l| l.exp()).collect();
        let mass: f64 = p.windows(2).map(|w| (w[0] + w[1]) / 2.0 * 0.004).sum();
        assert!((mass - 1.0).abs() < 1e-6, "{mass}");
    }

    #[test]
    fn mixture_finds_two_clusters_and_isolation_forest_flags_outliers() {
        tch::manual_seed(1);
        let a = Tensor::randn([1000, 2], opts()) * 0.3 + 5.0;
        let b = Tensor::randn([1000, 2], opts()) * 0.3 - 5.0;
        let x = Tensor::cat(&[a, b], 0);
        let one = Mixture::fit(&x, 1, 5, 0).unwrap();
        let two = Mixture::fit(&x, 2, 30, 3).unwrap();
        let mean = |m: &Mixture| m.log_prob(&x).unwrap().iter().sum::<f64>() / 2000.0;
        assert!(mean(&two) > mean(&one) + 2.0);
        let flat = Vec::<f64>::try_from(&x.reshape([-1])).unwrap();
        let forest = IsolationForest::fit(&flat, 2, 100, 256, 7);
        assert!(forest.score(&[0.0, 0.0]) > forest.score(&[5.0, 5.0]) + 0.1);
        assert!(forest.score(&[12.0, -9.0]) > 0.6);
    }
}
