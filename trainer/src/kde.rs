//! Gaussian kernel density estimates: a baseline detector on the data
//! (bandwidth by validation likelihood), and a flow's base density in latent
//! space (the model file's `Stage::KdeBase`), which [`choose_base`] keeps only
//! where validation likelihood prefers it to `N(0, I)`.

use anyhow::{Result, ensure};
use tch::{Device, Kind, Tensor};

use crate::baselines::by_distance_chunks;
use crate::model::{Chain, SolveOptions};

/// A Gaussian kernel density estimate on the rows of `x`, bandwidth `h`:
/// `log p(q) = logsumexp_i(−|q − x_i|²/(2h²)) − log N − D/2·log(2πh²)`,
/// optionally mixed with `N(0, I)` by weight `w` (a flow's base: far from
/// every row the density is the normal's instead of falling off at the
/// kernels' scale).
pub struct KernelDensity {
    x: Tensor,
    /// The bandwidth (same units as the rows).
    pub bandwidth: f64,
    /// The weight `w` of `N(0, I)`: `p = (1 − w) KDE + w N(0, I)`.
    pub normal_weight: f64,
}

/// Candidate weights of `N(0, I)` in a flow's KDE base.
const NORMAL_WEIGHTS: [f64; 5] = [0.0, 0.01, 0.03, 0.1, 0.3];

/// Candidate bandwidths: 25 log-spaced values in `[0.02, 3]`·(the rows' mean
/// per-column standard deviation).
fn bandwidth_grid(x: &Tensor) -> Vec<f64> {
    let scale = x.std_dim(0, true, false).mean(Kind::Double).double_value(&[]).max(1e-12);
    (0..25).map(|i| scale * 0.02 * (150f64).powf(i as f64 / 24.0)).collect()
}

/// Per row and candidate bandwidth the log-sum-exp of the kernel exponents
/// (`[Q, H]`) of `q` against the rows of `x`.
fn kernel_sums(q: &Tensor, x: &Tensor, grid: &[f64]) -> Tensor {
    by_distance_chunks(q, x, |d2| {
        let per_h: Vec<Tensor> = grid.iter().map(|h| (&d2 / (-2.0 * h * h)).logsumexp([1], false)).collect();
        Tensor::stack(&per_h, 1)
    })
}

/// The (bandwidth, normal weight) pair of the grids with the best mean
/// log-likelihood of the rows `q`, given `kernel_sums(q, x, grid)` (`ll`)
/// for `n` rows of `x` in `d` dimensions.
fn best_parameters(
    ll: &Tensor,
    q: &Tensor,
    grid: &[f64],
    weights: &[f64],
    n: f64,
    d: f64,
) -> Result<(f64, f64)> {
    let norm: Vec<f64> =
        grid.iter().map(|h| n.ln() + d / 2.0 * (2.0 * std::f64::consts::PI * h * h).ln()).collect();
    let log_kde = ll - Tensor::from_slice(&norm).to_device(ll.device()).unsqueeze(0); // [Q, H]
    let log_normal = crate::model::standard_normal_log_prob(&q.to_kind(Kind::Double)).unsqueeze(1);
    let mut best = (f64::NEG_INFINITY, grid[0], 0.0);
    for &w in weights {
        let mixed = if w == 0.0 {
            log_kde.shallow_clone()
        } else {
            (&log_kde + (1.0 - w).ln()).logaddexp(&(&log_normal + w.ln()))
        };
        let mean = Vec::<f64>::try_from(&mixed.mean_dim(0, false, Kind::Double))?;
        for (&score, &h) in mean.iter().zip(grid) {
            if score > best.0 {
                best = (score, h, w);
            }
        }
    }
    Ok((best.1, best.2))
}

impl KernelDensity {
    /// Chooses the bandwidth from [`bandwidth_grid`] by mean log-likelihood
    /// on `valid`.
    pub fn fit(x: &Tensor, valid: &Tensor) -> Result<Self> {
        Self::fit_mixed(x, valid, &[0.0])
    }

    /// [`KernelDensity::fit`] with the weight of `N(0, I)` chosen too, from
    /// `weights`, jointly with the bandwidth by mean log-likelihood on `valid`.
    pub fn fit_mixed(x: &Tensor, valid: &Tensor, weights: &[f64]) -> Result<Self> {
        ensure!(x.size()[0] >= 2, "KDE needs at least two rows");
        let grid = bandwidth_grid(x);
        // One pass over the distances keeps, per validation row and bandwidth, the log-sum-exp.
        let ll = kernel_sums(valid, x, &grid); // [Q, H]
        let (n, d) = (x.size()[0] as f64, x.size()[1] as f64);
        let (bandwidth, normal_weight) = best_parameters(&ll, valid, &grid, weights, n, d)?;
        Ok(KernelDensity { x: x.shallow_clone(), bandwidth, normal_weight })
    }

    /// An estimate on `centres` with a given bandwidth and normal weight (a
    /// model file's base).
    pub fn from_parts(centres: Tensor, bandwidth: f64, normal_weight: f64) -> Self {
        KernelDensity { x: centres, bandwidth, normal_weight }
    }

    /// The rows the kernels sit on (`n × D`).
    pub fn centres(&self) -> &Tensor {
        &self.x
    }

    /// log p of each row of `q`, as a tensor of `q`'s kind (computed in
    /// float64 on the centres' device).
    pub fn log_prob_tensor(&self, q: &Tensor) -> Tensor {
        let (h, d, n) = (self.bandwidth, self.x.size()[1] as f64, self.x.size()[0] as f64);
        let x = self.x.to_kind(Kind::Double);
        let q64 = q.to_kind(Kind::Double).to_device(x.device());
        let lse = by_distance_chunks(&q64, &x, |d2| (d2 / (-2.0 * h * h)).logsumexp([1], false));
        let c = n.ln() + d / 2.0 * (2.0 * std::f64::consts::PI * h * h).ln();
        let w = self.normal_weight;
        let log_p = if w == 0.0 {
            lse - c
        } else {
            let normal = crate::model::standard_normal_log_prob(&q64);
            (lse - c + (1.0 - w).ln()).logaddexp(&(normal + w.ln()))
        };
        log_p.to_kind(q.kind()).to_device(q.device())
    }

    /// log p of each row of `q`.
    pub fn log_prob(&self, q: &Tensor) -> Result<Vec<f64>> {
        Ok(Vec::<f64>::try_from(&self.log_prob_tensor(q).to_kind(Kind::Double))?)
    }
}

/// Which base a model file gets (`fit --base`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BaseArg {
    /// The kernel density base where validation likelihood prefers it.
    Auto,
    /// Always `N(0, I)`.
    Normal,
    /// Always the kernel density base.
    Kde,
}

/// What [`choose_base`] measured and chose.
pub struct BaseChoice {
    /// The latent KDE (centres, bandwidth by validation likelihood).
    pub kde: KernelDensity,
    /// Mean validation log p with the `N(0, I)` base and with the KDE base,
    /// the latter two-fold cross-validated (nats, the chain's input units).
    pub valid_log_p_normal: f64,
    pub valid_log_p_kde: f64,
    /// Whether the chain should end in the KDE base.
    pub chosen: bool,
}

/// Fits a Gaussian KDE to the latent points of up to `max_centres` training
/// rows (a seeded random subset) and compares the chain's mean validation
/// log p with it as the base against `N(0, I)`; `mode` says whether the
/// better one (`Auto`) or a fixed one is chosen. `chain` must have the
/// standard-normal base.
///
/// The bandwidth and the weight of `N(0, I)` are chosen on validation rows:
/// rows the flow trained on are not a fair judge (their latent points keep
/// detail the flow learned from them, and held-out training rows picked a
/// bandwidth three times too small on shuttle). So that the comparison does
/// not favour the KDE by the parameters it fitted there, its validation
/// log p is two-fold cross-validated: each half is scored with the
/// parameters the other half chose. The exported ones are those all
/// validation rows choose.
pub fn choose_base(
    chain: &Chain,
    train: &Tensor,
    valid: &Tensor,
    opts: &SolveOptions,
    max_centres: usize,
    seed: i64,
    mode: BaseArg,
) -> Result<BaseChoice> {
    ensure!(chain.base.is_none(), "the chain already has a kernel density base");
    ensure!(max_centres >= 2, "kde_centres must be at least 2");
    let (n, m) = (train.size()[0], valid.size()[0]);
    ensure!(n >= 2 && m >= 2, "a kernel density base needs at least two training and two validation rows");
    tch::manual_seed(seed.wrapping_add(0x6b64_6500)); // not the training stream
    let pick = Tensor::randperm(n, (Kind::Int64, Device::Cpu)).narrow(0, 0, (max_centres as i64).min(n));
    let d = chain.dim;
    let centres = chain.log_prob_rows(&train.index_select(0, &pick.to_device(train.device())), opts, 2000)?;
    let centres = Tensor::from_slice(&centres.z).view([-1, d]);
    let v = chain.log_prob_rows(valid, opts, 2000)?;
    let z = Tensor::from_slice(&v.z).view([-1, d]);
    let kde = KernelDensity::fit_mixed(&centres, &z, &NORMAL_WEIGHTS)?;
    // Two folds of the validation rows; out-of-fold log KDE(z) per row.
    let order = Tensor::randperm(m, (Kind::Int64, Device::Cpu));
    let folds = [order.narrow(0, 0, m / 2), order.narrow(0, m / 2, m - m / 2)];
    let mut out_of_fold = vec![0.0; m as usize];
    for (fit_on, score) in [(&folds[0], &folds[1]), (&folds[1], &folds[0])] {
        let fold = KernelDensity::fit_mixed(&centres, &z.index_select(0, fit_on), &NORMAL_WEIGHTS)?;
        let lp = fold.log_prob(&z.index_select(0, score))?;
        for (i, l) in Vec::<i64>::try_from(score)?.into_iter().zip(lp) {
            out_of_fold[i as usize] = l;
        }
    }
    let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len().max(1) as f64;
    let valid_log_p_normal = mean(&v.log_p);
    let with_kde: Vec<f64> =
        v.log_p.iter().zip(&v.log_p_base).zip(&out_of_fold).map(|((lp, g), k)| lp - g + k).collect();
    let valid_log_p_kde = mean(&with_kde);
    let chosen = match mode {
        BaseArg::Auto => valid_log_p_kde > valid_log_p_normal,
        BaseArg::Kde => true,
        BaseArg::Normal => false,
    };
    Ok(BaseChoice { kde, valid_log_p_normal, valid_log_p_kde, chosen })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn choose(train: &Tensor, valid: &Tensor) -> BaseChoice {
        // No layers: the latent points are the rows themselves.
        let chain = Chain::new(Vec::new(), train.size()[1]);
        let opts = SolveOptions::eval(crate::ode::dopri5_at(1e-5, 1000));
        choose_base(&chain, train, valid, &opts, 500, 0, BaseArg::Auto).unwrap()
    }

    /// Rows from N(0, I) itself: the true density beats every KDE on
    /// held-out rows, and the cross-validated comparison says so.
    #[test]
    fn the_normal_base_is_kept_when_it_is_the_truth() {
        tch::manual_seed(3);
        let opts = (Kind::Double, Device::Cpu);
        let c = choose(&Tensor::randn([2000, 3], opts), &Tensor::randn([400, 3], opts));
        assert!(!c.chosen, "normal {} vs KDE {}", c.valid_log_p_normal, c.valid_log_p_kde);
    }

    /// Rows in four tight clusters: the KDE base is far more likely, its
    /// bandwidth is near the clusters' scale, and the stored estimate
    /// integrates to 1 (trapezoid rule on a grid).
    #[test]
    fn a_kde_base_is_chosen_for_clustered_latents_and_is_a_density() {
        tch::manual_seed(4);
        let opts = (Kind::Double, Device::Cpu);
        let centres = Tensor::from_slice(&[1.0, 1.0, -1.0, 1.0, 1.0, -1.0, -1.0, -1.0]).view([4, 2]);
        let rows = |n: i64| {
            let k = Tensor::randint(4, [n], (Kind::Int64, Device::Cpu));
            centres.index_select(0, &k) + Tensor::randn([n, 2], opts) * 0.05
        };
        let c = choose(&rows(3000), &rows(400));
        assert!(c.chosen && c.valid_log_p_kde > c.valid_log_p_normal + 2.0, "{}", c.valid_log_p_kde);
        assert!((0.005..0.1).contains(&c.kde.bandwidth), "bandwidth {}", c.kde.bandwidth);
        assert_eq!(c.kde.centres().size(), [500, 2]);
        // The kernels' part integrates to 1 (on a grid over the clusters;
        // the normal part is N(0, I)'s, which does).
        let kernels = KernelDensity::from_parts(c.kde.centres().shallow_clone(), c.kde.bandwidth, 0.0);
        let g = Tensor::linspace(-2.0, 2.0, 801, opts);
        let grid = Tensor::stack(&[g.repeat_interleave_self_int(801, 0, None), g.repeat([801])], 1);
        let cell = (4.0 / 800.0f64).powi(2);
        let integral = kernels.log_prob_tensor(&grid).exp().sum(Kind::Double).double_value(&[]) * cell;
        assert!((integral - 1.0).abs() < 2e-3, "∫ p = {integral}");
    }
}
