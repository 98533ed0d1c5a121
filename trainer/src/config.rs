//! Training configuration: a TOML file that CLI flags override, saved with the run.

use std::path::PathBuf;

use ffjord_runtime::Solver;
use serde::{Deserialize, Serialize};

use crate::model::{Gradient, TraceMode};

/// Layer kinds as written in configs and flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LayerArg {
    Concatsquash,
    Concat,
    Ignore,
}

impl From<LayerArg> for ffjord_runtime::LayerKind {
    fn from(l: LayerArg) -> Self {
        match l {
            LayerArg::Concatsquash => ffjord_runtime::LayerKind::ConcatSquash,
            LayerArg::Concat => ffjord_runtime::LayerKind::Concat,
            LayerArg::Ignore => ffjord_runtime::LayerKind::Ignore,
        }
    }
}

/// Activations as written in configs and flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ActivationArg {
    Tanh,
    Softplus,
    Elu,
    Swish,
    Identity,
}

impl From<ActivationArg> for ffjord_runtime::Activation {
    fn from(a: ActivationArg) -> Self {
        use ffjord_runtime::Activation as A;
        match a {
            ActivationArg::Tanh => A::Tanh,
            ActivationArg::Softplus => A::Softplus,
            ActivationArg::Elu => A::Elu,
            ActivationArg::Swish => A::Swish { beta: 1.0 },
            ActivationArg::Identity => A::Identity,
        }
    }
}

/// Solvers as written in configs and flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SolverArg {
    Dopri5,
    Rk4,
    Midpoint,
    Euler,
}

/// Everything `trainer fit` needs. Defaults follow the reference toy recipe
/// (spec §6.1) except where noted.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Built-in toy data set (fresh batches every iteration).
    pub toy: Option<String>,
    /// CSV or NPY training file.
    pub data: Option<PathBuf>,
    /// Columns to use (names or 0-based indices); all by default.
    pub columns: Option<Vec<String>>,
    /// A label column in the data files (0 = normal, 1 = anomaly): it is not a
    /// feature; training uses only the rows labelled normal.
    pub label: Option<String>,
    /// Explicit validation and test files (instead of fractions of `data`);
    /// the test file is optional.
    pub valid_data: Option<PathBuf>,
    pub test_data: Option<PathBuf>,
    /// Dequantize columns quantized on a decimal grid with ties (integers,
    /// counts, rates to three decimals) with fresh uniform noise of one grid
    /// step in every training batch; also gives constant columns a scale.
    pub dequantize: bool,
    /// Cap the density of a repeated value's dequantization cell: a value
    /// held by a share `s` of the training rows gets noise of width
    /// `max(grid, s·σ·√(2π))` (σ the column's standard deviation), so its
    /// cell is never denser than the peak of a Gaussian with the column's
    /// spread — a spike of exact repeats (zeros standing for "none") is not
    /// learned as a sharp peak.
    pub spread_spikes: bool,
    /// Standard deviation of Gaussian noise added to every training batch, in
    /// standardized units (0: none). Smooths the learned density at that scale.
    pub input_noise: f64,
    /// Start the chain as the training rows' full-covariance Gaussian: a
    /// fixed whitening stage (`L⁻¹(x − m)`, `C = L Lᵀ`) before the CNF blocks,
    /// whose nets start at zero (the identity map). A config file without
    /// this field (from before it existed) means `false`.
    #[serde(default)]
    pub whiten: bool,
    /// Use at most this many (seeded, random) validation / test rows.
    pub valid_rows: Option<usize>,
    pub test_rows: Option<usize>,
    /// Fractions of the file held out for validation and test.
    pub valid_fraction: f64,
    pub test_fraction: f64,
    pub hidden: Vec<i64>,
    pub layer: LayerArg,
    pub activation: ActivationArg,
    pub blocks: usize,
    /// Moving batch norm before the first and after every CNF block.
    pub batch_norm: bool,
    pub end_time: f64,
    pub train_end_time: bool,
    /// How training computes the divergence. Unset, the reference recipe for
    /// the data ([`TrainConfig::trace_mode`]); a run's `config.toml` records
    /// the mode it used.
    pub trace: Option<TraceMode>,
    /// Backprop through the solver, or the continuous adjoint.
    pub gradient: Gradient,
    /// Adjoint only: leave parameter adjoints out of the backward error norm.
    pub seminorm: bool,
    /// RNODE kinetic-energy coefficient (0: off).
    pub kinetic: f64,
    /// RNODE Jacobian-Frobenius coefficient (0: off; needs a Hutchinson trace).
    pub jacobian: f64,
    pub solver: SolverArg,
    pub rtol: f64,
    pub atol: f64,
    pub steps: u32,
    pub max_steps: u32,
    pub lr: f64,
    /// Learning-rate schedule over the planned iterations.
    pub lr_schedule: crate::optim::LrSchedule,
    /// Iterations of linear learning-rate warm-up (0: none).
    pub warmup: u64,
    /// Decay of an exponential moving average of the weights used for
    /// validation and export (0: off; e.g. 0.999).
    pub ema: f64,
    /// Iterations of flow-matching pre-training before maximum likelihood
    /// (0: none; [`crate::flow_matching`]). Unset, the default for the data
    /// and the chain ([`TrainConfig::flow_matching_iterations`]).
    pub flow_matching: Option<u64>,
    /// How the exported file stores the CNF matrices (`f32`, `f16`, `i8`).
    pub weights: ffjord_runtime::MatrixEncoding,
    pub weight_decay: f64,
    pub batch: i64,
    pub iterations: u64,
    /// If set, overrides `iterations` with this many passes over the training rows.
    pub epochs: Option<u64>,
    pub valid_every: u64,
    /// Stop after this many validations without improvement (0: never).
    /// Unset, the default for the data ([`TrainConfig::patience`]).
    pub patience: Option<u64>,
    pub seed: i64,
    /// Evaluation tolerance (Dopri5) for validation and test NLL.
    pub eval_tol: f64,
    /// Rows drawn for the toy validation and test sets.
    pub toy_eval_rows: i64,
    /// Stop training at the first validation after this many seconds,
    /// counted from the start of flow-matching pre-training, which stops at
    /// it too (`fit --search` gives each candidate its share of the budget).
    #[serde(default)]
    pub time_limit: Option<f64>,
    /// `[C, H, W]` when the data are 8-bit images (set by `fit` from the
    /// data file's shape): the model is FFJORD's multiscale conv flow.
    #[serde(default)]
    pub image_shape: Option<Vec<i64>>,
    /// The logit transform's α for images (spec: 1e-6).
    #[serde(default = "default_logit_alpha")]
    pub logit_alpha: f64,
    /// Anomaly threshold quantile of validation scores written at export.
    pub threshold_quantile: Option<f64>,
    /// The exported model's base density (tabular models): `auto` ends the
    /// chain in a Gaussian KDE over latent points of training rows where
    /// that gives the better mean validation log p, `normal` keeps
    /// `N(0, I)`, `kde` always ends in the KDE. Configs from before it
    /// existed mean `auto`.
    pub base: crate::kde::BaseArg,
    /// The base the flow is trained on: `normal` (`N(0, I)`, then `base`
    /// decides the file's), `kde`, a Gaussian KDE on up to `kde_centres`
    /// training rows whose bandwidth and normal weight are trained with the
    /// flow ([`crate::kde::TrainedKernelBase`]; the file keeps it), or `auto`:
    /// on a data file `fit` trains both and keeps the model file with the
    /// better validation NLL ([`crate::search::compare_bases`]); elsewhere,
    /// and in a config from before this key existed, `normal`.
    #[serde(default)]
    pub train_base: crate::kde::TrainBaseArg,
    /// The exported model's anomaly score: `auto` stores the latent radius
    /// `−log N(z)` where it ranks synthetic outliers of the validation rows
    /// better than `−log p` (tabular data; `crate::score_kind`), `density`
    /// always `−log p`, `radius` always the radius. The threshold is
    /// calibrated on the chosen score. Configs from before it existed mean
    /// `auto`.
    pub score: crate::score_kind::ScoreArg,
    /// Most training rows whose latent points the KDE base keeps (the file
    /// holds `n × D` floats; scoring costs one distance per point).
    pub kde_centres: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            toy: None,
            data: None,
            columns: None,
            label: None,
            valid_data: None,
            test_data: None,
            dequantize: true,
            spread_spikes: false,
            input_noise: 0.0,
            whiten: false,
            valid_rows: None,
            test_rows: None,
            valid_fraction: 0.1,
            test_fraction: 0.1,
            hidden: vec![64, 64, 64],
            layer: LayerArg::Concatsquash,
            activation: ActivationArg::Tanh,
            blocks: 1,
            batch_norm: false,
            end_time: 0.5,
            train_end_time: true,
            trace: None,
            gradient: Gradient::Backprop,
            seminorm: false,
            kinetic: 0.0,
            jacobian: 0.0,
            solver: SolverArg::Dopri5,
            rtol: 1e-5,
            atol: 1e-5,
            steps: 8,
            max_steps: 10_000,
            lr: 1e-3,
            lr_schedule: crate::optim::LrSchedule::Constant,
            warmup: 0,
            ema: 0.0,
            flow_matching: None,
            weights: ffjord_runtime::MatrixEncoding::F32,
            weight_decay: 1e-5,
            batch: 512,
            iterations: 2000,
            epochs: None,
            valid_every: 100,
            patience: None,
            seed: 0,
            eval_tol: 1e-5,
            toy_eval_rows: 2000,
            time_limit: None,
            image_shape: None,
            logit_alpha: default_logit_alpha(),
            threshold_quantile: Some(0.99),
            base: crate::kde::BaseArg::Auto,
            score: crate::score_kind::ScoreArg::Auto,
            kde_centres: 1024,
            train_base: crate::kde::TrainBaseArg::Auto,
        }
    }
}

/// Early stopping's patience on tabular data files when none is given:
/// validations without improvement (1,000 iterations at the default
/// `valid_every`). Small tables overfit long before the planned iterations
/// (arrhythmia's fits are best at iteration 200 or 300 of 2,000); with 10, no
/// best checkpoint of the benchmark fits in trainer/README.md moves, where 5
/// would have moved two of breastw's.
pub const DATA_FILE_PATIENCE: u64 = 10;

/// The most flow-matching iterations per planned likelihood iteration on
/// data files when none are given; pre-training stops before that when its
/// validation loss stops improving ([`crate::flow_matching::PATIENCE`]). One
/// flow-matching iteration is a forward and a backward pass of the network
/// with a time per row (no solve): about 2 ms for satellite's 3×64 net and
/// batch 512, against about 90 ms for a likelihood iteration. On split 0 of
/// the benchmark sets the validation loss was best after 5,250 (shuttle) to
/// 21,250 (POWER) iterations (trainer/README.md).
pub const FLOW_MATCHING_PER_ITERATION: f64 = 10.0;

impl TrainConfig {
    /// Whether the rows come from a tabular data file (not a toy set, not images).
    pub fn tabular_file(&self) -> bool {
        self.image_shape.is_none() && self.toy.is_none()
    }

    /// Early stopping's patience in validations (0: off): the one given,
    /// else [`DATA_FILE_PATIENCE`] on tabular data files and off for the
    /// toy sets (fresh batches every iteration) and images.
    pub fn patience(&self) -> u64 {
        self.patience.unwrap_or(if self.tabular_file() { DATA_FILE_PATIENCE } else { 0 })
    }

    /// What keeps flow-matching pre-training from this run's chain, if
    /// anything: it pre-trains one CNF block on `N(0, I)`.
    pub fn flow_matching_obstacle(&self) -> Option<&'static str> {
        if self.blocks != 1 {
            Some("blocks > 1")
        } else if self.batch_norm {
            Some("batch_norm")
        } else if self.whiten {
            Some("whiten")
        } else if self.image_shape.is_some() {
            Some("images")
        } else if self.train_base == crate::kde::TrainBaseArg::Kde {
            Some("train_base kde (use train_base normal or auto)")
        } else {
            None
        }
    }

    /// The most flow-matching iterations before `planned` likelihood
    /// iterations (pre-training stops earlier when its validation loss stops
    /// improving): the number given, else [`FLOW_MATCHING_PER_ITERATION`] × `planned` on
    /// tabular data files whose chain has no
    /// [obstacle](TrainConfig::flow_matching_obstacle), and none elsewhere
    /// (toy sets and images keep the reference recipes).
    pub fn flow_matching_iterations(&self, planned: u64) -> u64 {
        let pretrainable = self.tabular_file() && self.flow_matching_obstacle().is_none();
        self.flow_matching.unwrap_or(if pretrainable {
            (planned as f64 * FLOW_MATCHING_PER_ITERATION).round() as u64
        } else {
            0
        })
    }

    /// The divergence mode training uses: the one given, else the reference
    /// recipes' (spec §6): the exact trace for the 2-D toy sets, Hutchinson's
    /// estimate with Gaussian noise for data files (the tabular recipe; one
    /// vector-Jacobian product per evaluation instead of `D`) and with
    /// Rademacher noise for images. A toy run with the RNODE Jacobian
    /// penalty, which reuses Hutchinson's product, gets Gaussian noise too.
    pub fn trace_mode(&self, images: bool) -> TraceMode {
        match self.trace {
            Some(mode) => mode,
            None if images => TraceMode::Rademacher,
            None if self.toy.is_some() && self.jacobian == 0.0 => TraceMode::Exact,
            None => TraceMode::Gaussian,
        }
    }

    /// Rejects values no training run can use, naming the setting.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.logit_alpha > 0.0 && self.logit_alpha < 0.5,
            "logit_alpha must be in (0, 0.5), got {}",
            self.logit_alpha
        );
        let positive = |name: &str, v: f64| {
            anyhow::ensure!(v.is_finite() && v > 0.0, "{name} must be finite and positive, got {v}");
            Ok(())
        };
        positive("lr", self.lr)?;
        positive("end_time", self.end_time)?;
        positive("rtol", self.rtol)?;
        positive("atol", self.atol)?;
        positive("eval_tol", self.eval_tol)?;
        anyhow::ensure!(
            self.weight_decay.is_finite() && self.weight_decay >= 0.0,
            "weight_decay must be ≥ 0"
        );
        anyhow::ensure!((0.0..1.0).contains(&self.ema), "ema must be in [0, 1) (0: off), got {}", self.ema);
        anyhow::ensure!(self.batch >= 1, "batch must be at least 1");
        if self.flow_matching.unwrap_or(0) > 0
            && let Some(obstacle) = self.flow_matching_obstacle()
        {
            anyhow::bail!(
                "flow_matching pre-trains one CNF block on N(0, I): it cannot be combined with {obstacle}"
            );
        }
        anyhow::ensure!(
            self.iterations >= 1 && self.epochs != Some(0),
            "iterations and epochs must be at least 1"
        );
        anyhow::ensure!(
            self.valid_rows != Some(0),
            "valid_rows must be at least 1 (the threshold is calibrated on them)"
        );
        anyhow::ensure!(
            self.test_data.is_none() || self.valid_data.is_some(),
            "--test-data needs --valid-data"
        );
        anyhow::ensure!(
            self.input_noise.is_finite() && self.input_noise >= 0.0,
            "input_noise must be finite and ≥ 0"
        );
        anyhow::ensure!(
            self.kinetic.is_finite()
                && self.kinetic >= 0.0
                && self.jacobian.is_finite()
                && self.jacobian >= 0.0,
            "kinetic and jacobian must be finite and ≥ 0"
        );
        anyhow::ensure!(
            self.jacobian == 0.0 || self.trace != Some(TraceMode::Exact),
            "--jacobian reuses the Hutchinson vector-Jacobian product: use --trace gaussian or rademacher"
        );
        anyhow::ensure!(self.valid_every >= 1, "valid_every must be at least 1");
        let ceiling = ffjord_runtime::solver::MAX_STEPS;
        anyhow::ensure!(
            (1..=ceiling).contains(&self.steps) && (1..=ceiling).contains(&self.max_steps),
            "steps and max_steps must be in 1..={ceiling} (the runtime's ceiling)"
        );
        anyhow::ensure!(self.blocks >= 1, "blocks must be at least 1");
        anyhow::ensure!(
            (2..=ffjord_runtime::format::MAX_KDE_CENTRES as usize).contains(&self.kde_centres),
            "kde_centres must be in 2..={} (the runtime's ceiling)",
            ffjord_runtime::format::MAX_KDE_CENTRES
        );
        anyhow::ensure!(self.hidden.iter().all(|&h| h >= 1), "hidden widths must be at least 1");

        anyhow::ensure!(
            self.hidden.len() < ffjord_runtime::format::MAX_LAYERS,
            "at most {} hidden layers",
            ffjord_runtime::format::MAX_LAYERS - 1
        );
        anyhow::ensure!(
            (0.0..0.9).contains(&(self.valid_fraction + self.test_fraction)) && self.valid_fraction > 0.0,
            "valid_fraction must be positive and valid_fraction + test_fraction below 0.9"
        );
        if let Some(q) = self.threshold_quantile {
            anyhow::ensure!(q > 0.0 && q < 1.0, "threshold_quantile must be in (0, 1), got {q}");
        }
        if let Some(s) = self.time_limit {
            anyhow::ensure!(
                s.is_finite() && s > 0.0,
                "time_limit must be a positive number of seconds, got {s}"
            );
        }
        Ok(())
    }

    /// The training solver.
    pub fn method(&self) -> Solver {
        match self.solver {
            SolverArg::Dopri5 => Solver::Dopri5(ffjord_runtime::Dopri5 {
                rtol: self.rtol as f32,
                atol: self.atol as f32,
                max_steps: self.max_steps,
                ..Default::default()
            }),
            SolverArg::Rk4 => Solver::Rk4 { steps: self.steps },
            SolverArg::Midpoint => Solver::Midpoint { steps: self.steps },
            SolverArg::Euler => Solver::Euler { steps: self.steps },
        }
    }

    /// The exported model's default solver: Dopri5 at `eval_tol` with the
    /// `max_steps` asked for (validation in the trainer allows more:
    /// [`TrainConfig::eval_method`]).
    pub fn export_method(&self) -> Solver {
        crate::ode::dopri5_at(self.eval_tol, self.max_steps)
    }

    /// The evaluation solver (Dopri5 at `eval_tol`).
    pub fn eval_method(&self) -> Solver {
        crate::ode::dopri5_at(self.eval_tol, self.max_steps.max(100_000))
    }
}

fn default_logit_alpha() -> f64 {
    1e-6
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Early stopping is on by default for data files only; a given value,
    /// 0 included (what every run before this default recorded), wins.
    #[test]
    fn patience_defaults_by_the_data() {
        let data = TrainConfig { toy: None, data: Some("rows.csv".into()), ..TrainConfig::default() };
        assert_eq!(data.patience(), DATA_FILE_PATIENCE);
        let toy = TrainConfig { toy: Some("moons".into()), data: None, ..TrainConfig::default() };
        assert_eq!(toy.patience(), 0);
        let images = TrainConfig { image_shape: Some(vec![1, 8, 8]), ..data.clone() };
        assert_eq!(images.patience(), 0);
        for given in [0, 3] {
            assert_eq!(TrainConfig { patience: Some(given), ..data.clone() }.patience(), given);
        }
        // An older run's config.toml names its patience and resumes with it.
        let old: TrainConfig = toml::from_str("data = \"rows.csv\"\npatience = 0\n").unwrap();
        assert_eq!(old.patience(), 0);
    }

    #[test]
    fn flow_matching_defaults_by_the_data_and_the_chain() {
        let data = TrainConfig { toy: None, data: Some("rows.csv".into()), ..TrainConfig::default() };
        assert_eq!(data.flow_matching_iterations(2000), 20_000);
        assert_eq!(data.flow_matching_iterations(20), 200);
        let toy = TrainConfig { toy: Some("moons".into()), data: None, ..TrainConfig::default() };
        assert_eq!(toy.flow_matching_iterations(2000), 0);
        let images = TrainConfig { image_shape: Some(vec![1, 8, 8]), ..data.clone() };
        assert_eq!(images.flow_matching_iterations(2000), 0);
        for unfit in [
            TrainConfig { blocks: 2, ..data.clone() },
            TrainConfig { batch_norm: true, ..data.clone() },
            TrainConfig { whiten: true, ..data.clone() },
            TrainConfig { train_base: crate::kde::TrainBaseArg::Kde, ..data.clone() },
        ] {
            assert_eq!(unfit.flow_matching_iterations(2000), 0, "{unfit:?}");
            unfit.validate().expect("the default is never refused");
        }
        assert_eq!(TrainConfig { flow_matching: Some(7), ..toy.clone() }.flow_matching_iterations(2000), 7);
        let given = TrainConfig { flow_matching: Some(5), blocks: 2, ..data.clone() };
        assert!(given.validate().unwrap_err().to_string().contains("blocks > 1"));
        let old: TrainConfig = toml::from_str("data = \"rows.csv\"\n").unwrap();
        assert_eq!(old.flow_matching_iterations(100), 1000);
    }
}
