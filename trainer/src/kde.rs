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

/// Candidate weights of `N(0, I)` in a flow's KDE base (a trained base
/// starts from one of those above 0: it learns the weight on a logit scale).
pub(crate) const NORMAL_WEIGHTS: [f64; 5] = [0.0, 0.01, 0.03, 0.1, 0.3];

/// `log((1 − w)·p_kde + w·N(z; 0, I))` per row from `log p_kde`,
/// `log N(z; 0, I)` and the logs of `1 − w` and `w` (numbers or trained
/// tensors): the one place the base's mixture is written, for the grid
/// search, the exported estimate and the trained base alike. `w = 0`
/// (`log w = −∞`) gives `log p_kde` exactly.
fn mixed_with_normal(log_kde: &Tensor, log_normal: &Tensor, log_1mw: &Tensor, log_w: &Tensor) -> Tensor {
    (log_kde + log_1mw).logaddexp(&(log_normal + log_w))
}

/// `log(1 − w)` and `log w` as scalar tensors.
fn weight_logs(w: f64) -> (Tensor, Tensor) {
    (Tensor::from((1.0 - w).ln()), Tensor::from(w.ln()))
}

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
        let (log_1mw, log_w) = weight_logs(w);
        let mixed = mixed_with_normal(&log_kde, &log_normal, &log_1mw, &log_w);
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
        let (log_1mw, log_w) = weight_logs(self.normal_weight);
        let normal = crate::model::standard_normal_log_prob(&q64);
        let log_p = mixed_with_normal(&(lse - c), &normal, &log_1mw, &log_w);
        log_p.to_kind(q.kind()).to_device(q.device())
    }

    /// log p of each row of `q`.
    pub fn log_prob(&self, q: &Tensor) -> Result<Vec<f64>> {
        Ok(Vec::<f64>::try_from(&self.log_prob_tensor(q).to_kind(Kind::Double))?)
    }
}

/// The base a flow is trained on (`fit --train-base`).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum TrainBaseArg {
    /// Both, the model file with the better validation NLL kept (data
    /// files; toy sets and images: `Normal`).
    #[default]
    Auto,
    /// `N(0, I)`, the paper's base; a KDE base may still be fitted after
    /// training (`--base`).
    Normal,
    /// A Gaussian KDE on training rows, its bandwidth and normal weight
    /// trained with the flow (see `TrainedKernelBase`).
    Kde,
}

/// A kernel density base trained together with the flow:
/// `p(z) = (1 − w) · (1/n) Σ_j N(z; c_j, h² I) + w · N(z; 0, I)`.
///
/// The centres `c_j` are the latent points of `n` training rows under the
/// chain as initialized (where the flow is the identity, or the whitening),
/// fixed from then on; the bandwidth `h` and the weight `w` are parameters
/// learned with the flow by maximum likelihood. A flow on `N(0, I)` must
/// carry every cluster of the data to one Gaussian and leaves bridges of
/// mass between them; on this base it starts as the kernel estimate (local,
/// one kernel per centre row) and learns what the kernels miss. A training
/// row that is itself a centre leaves its own kernel out of its likelihood
/// (leave-one-out), else the flow could learn to pin rows onto their kernels.
pub struct TrainedKernelBase {
    centres: Tensor,
    /// `log h` and `logit w`, each divided by [`BASE_PARAMETER_SCALE`].
    log_bandwidth: Tensor,
    normal_logit: Tensor,
}

/// The base's two parameters are stored divided by this, so that Adam (whose
/// steps are about the learning rate in the stored units) moves `log h` and
/// `logit w` this many times faster than a network weight: they are two
/// numbers that must travel O(1), not one of thousands of weights.
pub const BASE_PARAMETER_SCALE: f64 = 10.0;

impl TrainedKernelBase {
    /// The base's variables under `p`: `n` centres (not trained) in `d`
    /// dimensions, the log bandwidth and the logit of the normal weight.
    pub fn new(p: &tch::nn::Path<'_>, n: i64, d: i64) -> Self {
        TrainedKernelBase {
            centres: p.zeros_no_train("centres", &[n, d]),
            log_bandwidth: p.zeros("log_bandwidth", &[]),
            normal_logit: p.zeros("normal_logit", &[]),
        }
    }

    /// The trained parameters: the log bandwidth and the normal weight's
    /// logit, each divided by [`BASE_PARAMETER_SCALE`].
    pub fn parameters(&self) -> Vec<Tensor> {
        vec![self.log_bandwidth.shallow_clone(), self.normal_logit.shallow_clone()]
    }

    /// Number of centres.
    pub fn centre_count(&self) -> i64 {
        self.centres.size()[0]
    }

    /// Sets the centres, the bandwidth and the normal weight (in `(0, 1)`).
    pub fn initialise(&self, centres: &Tensor, bandwidth: f64, normal_weight: f64) -> Result<()> {
        ensure!(
            centres.size() == self.centres.size(),
            "centres of shape {:?}, expected {:?}",
            centres.size(),
            self.centres.size()
        );
        ensure!(
            bandwidth > 0.0 && normal_weight > 0.0 && normal_weight < 1.0,
            "bandwidth {bandwidth} or normal weight {normal_weight} out of range"
        );
        tch::no_grad(|| {
            let mut c = self.centres.shallow_clone();
            c.copy_(&centres.to_kind(c.kind()).to_device(c.device()));
            let _ = self.log_bandwidth.shallow_clone().fill_(bandwidth.ln() / BASE_PARAMETER_SCALE);
            let logit = (normal_weight / (1.0 - normal_weight)).ln();
            let _ = self.normal_logit.shallow_clone().fill_(logit / BASE_PARAMETER_SCALE);
        });
        Ok(())
    }

    /// The bandwidth `h`.
    pub fn bandwidth(&self) -> f64 {
        (self.log_bandwidth.double_value(&[]) * BASE_PARAMETER_SCALE).exp()
    }

    /// The weight `w` of `N(0, I)`.
    pub fn normal_weight(&self) -> f64 {
        1.0 / (1.0 + (-self.normal_logit.double_value(&[]) * BASE_PARAMETER_SCALE).exp())
    }

    /// log p(z) per row, differentiable in `z`, `h` and `w`. `centre_of`
    /// gives, per row, the index of the centre that row is (−1: none); that
    /// kernel is left out and the mean taken over the others.
    pub fn log_prob(&self, z: &Tensor, centre_of: Option<&Tensor>) -> Tensor {
        let (n, d) = (self.centre_count(), self.centres.size()[1]);
        let c = self.centres.to_kind(z.kind());
        let d2 = (z.square().sum_dim_intlist(1, true, z.kind())
            + c.square().sum_dim_intlist(1, false, z.kind()).unsqueeze(0)
            - z.matmul(&c.transpose(0, 1)) * 2.0)
            .clamp_min(0.0);
        let log_h = self.log_bandwidth.to_kind(z.kind()) * BASE_PARAMETER_SCALE;
        let mut exponents = &d2 * (&log_h * -2.0).exp() * -0.5;
        let mut count = Tensor::full([z.size()[0]], n as f64, (z.kind(), z.device()));
        if let Some(idx) = centre_of {
            let own = idx.unsqueeze(1).eq_tensor(&Tensor::arange(n, (Kind::Int64, z.device())).unsqueeze(0));
            exponents = exponents.masked_fill(&own, f64::NEG_INFINITY);
            count -= own.any_dim(1, false).to_kind(z.kind());
        }
        let log_kde = exponents.logsumexp([1], false)
            - count.log()
            - (&log_h * d as f64 + d as f64 / 2.0 * (2.0 * std::f64::consts::PI).ln());
        let logit = self.normal_logit.to_kind(z.kind()) * BASE_PARAMETER_SCALE;
        let log_w = -(-&logit).exp().log1p(); // log sigmoid
        let log_1mw = -logit.exp().log1p(); // log (1 − sigmoid)
        mixed_with_normal(&log_kde, &crate::model::standard_normal_log_prob(z), &log_1mw, &log_w)
    }

    /// The base as it stands, for evaluation and export (the model file's
    /// `KdeBase` stage).
    pub fn snapshot(&self) -> KernelDensity {
        KernelDensity::from_parts(self.centres.detach().copy(), self.bandwidth(), self.normal_weight())
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
    /// Rows of a small discrete set (3 columns with values 0, 1, 2): the
    /// validation rows repeat training rows exactly. At the cell centres the
    /// bandwidth collapses to the smallest of the grid (a point mass wins the
    /// likelihood); on the rows as training sees them (one draw of the
    /// dequantization noise) it is of the order of the cells.
    #[test]
    fn repeated_rows_pick_a_cell_sized_bandwidth_once_dequantized() {
        tch::manual_seed(3);
        let draw = |n: i64| Tensor::randint(3, [n, 3], (Kind::Double, Device::Cpu));
        let splits = crate::data::Splits::dequantized(draw(300), draw(100), draw(0), &[1.0; 3], false);
        let smallest = bandwidth_grid(&splits.train)[0];
        let at_centres = choose(&splits.train, &splits.valid);
        assert!(at_centres.kde.bandwidth <= smallest * 1.000_001, "{}", at_centres.kde.bandwidth);
        let noised = choose(&splits.train, &splits.with_fixed_noise(&splits.valid, 0));
        // One grid step is 1/σ ≈ 1.15 standardized units wide (σ² = 2/3 + 1/12).
        assert!((0.2..1.0).contains(&noised.kde.bandwidth), "{}", noised.kde.bandwidth);
        // A point mass is not a density: on the noised rows the kernels gain
        // nothing like what they seemed to gain at the centres.
        let gain = |c: &BaseChoice| c.valid_log_p_kde - c.valid_log_p_normal;
        assert!(gain(&at_centres) > 2.0 && gain(&noised) < 1.0, "{} {}", gain(&at_centres), gain(&noised));
    }

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

    fn trained_base(centres: &Tensor, h: f64, w: f64) -> (tch::nn::VarStore, TrainedKernelBase) {
        let mut vs = tch::nn::VarStore::new(Device::Cpu);
        vs.set_kind(Kind::Double);
        let size = centres.size();
        let base = TrainedKernelBase::new(&vs.root(), size[0], size[1]);
        base.initialise(centres, h, w).unwrap();
        (vs, base)
    }

    /// Without leave-one-out the trained base is the stored estimate (the
    /// model file's `KdeBase`, as `KernelDensity` computes it in float64).
    #[test]
    fn the_trained_base_is_the_estimate_it_exports() {
        tch::manual_seed(5);
        let opts = (Kind::Double, Device::Cpu);
        let (_vs, base) = trained_base(&Tensor::randn([50, 3], opts), 0.4, 0.1);
        assert!((base.bandwidth() - 0.4).abs() < 1e-12 && (base.normal_weight() - 0.1).abs() < 1e-12);
        let q = Tensor::randn([20, 3], opts) * 2.0;
        let trained = Vec::<f64>::try_from(&base.log_prob(&q, None)).unwrap();
        let exported = base.snapshot().log_prob(&q).unwrap();
        for (a, b) in trained.iter().zip(&exported) {
            assert!((a - b).abs() < 1e-8, "{a} vs {b}"); // the same sums in another order
        }
    }

    /// A row that is centre j scores as the estimate on the other centres
    /// (the mean over n − 1 kernels), and no other row is affected.
    #[test]
    fn a_centre_row_leaves_its_own_kernel_out() {
        tch::manual_seed(6);
        let opts = (Kind::Double, Device::Cpu);
        let centres = Tensor::randn([6, 2], opts);
        let (_vs, base) = trained_base(&centres, 0.3, 0.05);
        let rows = Tensor::cat(&[centres.narrow(0, 2, 1), Tensor::randn([1, 2], opts)], 0);
        let centre_of = Tensor::from_slice(&[2i64, -1]);
        let loo = Vec::<f64>::try_from(&base.log_prob(&rows, Some(&centre_of))).unwrap();
        let others = Tensor::cat(&[centres.narrow(0, 0, 2), centres.narrow(0, 3, 3)], 0);
        let expected =
            KernelDensity::from_parts(others, 0.3, 0.05).log_prob(&rows.narrow(0, 0, 1)).unwrap()[0];
        assert!((loo[0] - expected).abs() < 1e-8, "{} vs {expected}", loo[0]);
        let full = base.snapshot().log_prob(&rows.narrow(0, 1, 1)).unwrap()[0];
        // 1e-8: both expand |q − c|² = q² + c² − 2q·c, in another order.
        assert!((loo[1] - full).abs() < 1e-8, "{} vs {full}", loo[1]);
    }

    /// The bandwidth and weight gradients are those of the log-likelihood
    /// (central differences, float64).
    #[test]
    fn the_base_parameters_get_the_likelihood_gradient() {
        tch::manual_seed(7);
        let opts = (Kind::Double, Device::Cpu);
        let centres = Tensor::randn([30, 2], opts);
        let q = Tensor::randn([10, 2], opts);
        let value = |h: f64, w: f64| {
            let (_vs, b) = trained_base(&centres, h, w);
            b.log_prob(&q, None).sum(Kind::Double).double_value(&[])
        };
        let (h, w) = (0.5, 0.2);
        let (_vs, base) = trained_base(&centres, h, w);
        base.log_prob(&q, None).sum(Kind::Double).backward();
        // Per stored parameter: the scale times the derivative in log h / logit w.
        let grads: Vec<f64> =
            base.parameters().iter().map(|p| p.grad().double_value(&[]) / BASE_PARAMETER_SCALE).collect();
        // d/d log h and d/d logit w by central differences.
        let e: f64 = 1e-5;
        let d_log_h = (value(h * e.exp(), w) - value(h * (-e).exp(), w)) / (2.0 * e);
        let logit = (w / (1.0 - w)).ln();
        let sig = |l: f64| 1.0 / (1.0 + (-l).exp());
        let d_logit = (value(h, sig(logit + e)) - value(h, sig(logit - e))) / (2.0 * e);
        assert!((grads[0] - d_log_h).abs() < 1e-6 * d_log_h.abs().max(1.0), "{} vs {d_log_h}", grads[0]);
        assert!((grads[1] - d_logit).abs() < 1e-6 * d_logit.abs().max(1.0), "{} vs {d_logit}", grads[1]);
    }
}
