//! Baseline anomaly scorers on the same splits as the flow: a full-covariance
//! Gaussian (Mahalanobis), a Gaussian mixture fitted by EM, and an isolation
//! forest (Liu, Ting & Zhou 2008). The isolation forests on crates.io take the
//! dimension as a const generic and cannot be seeded, so this is a small,
//! seeded implementation of the original algorithm.

use anyhow::{Result, ensure};
use tch::{Device, Kind, Tensor};

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
