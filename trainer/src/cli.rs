//! The command line: argument types of every command, and `trainer fit`'s
//! flags merged over a config file.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};
use tch::Device;

use ffjord_trainer::config::{ActivationArg, LayerArg, SolverArg, TrainConfig};
use ffjord_trainer::model::{self, TraceMode};
use ffjord_trainer::{data, train};

#[derive(Parser)]
#[command(
    name = "trainer",
    version,
    about = "Train FFJORD continuous normalizing flows and export them for ffjord-runtime"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum DeviceArg {
    Cpu,
    Cuda,
    Auto,
}

impl DeviceArg {
    pub(crate) fn resolve(self) -> Result<Device> {
        match self {
            DeviceArg::Cpu => Ok(Device::Cpu),
            DeviceArg::Cuda if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
            DeviceArg::Cuda => bail!(
                "--device cuda: no CUDA device is available (build with --features cuda on a GPU machine)"
            ),
            DeviceArg::Auto => Ok(Device::cuda_if_available()),
        }
    }
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Train a model and export the best checkpoint as a model file.
    Fit(Box<FitArgs>),
    /// Test NLL of a model file with tch in float64, exact trace, Dopri5 at a tight tolerance.
    Eval(EvalArgs),
    /// Per-row log p, anomaly score and verdict, computed by the runtime crate.
    Score(ScoreArgs),
    /// Draw samples with the runtime (seeded).
    Sample(SampleArgs),
    /// Write a toy data set as CSV.
    Toy(ToyArgs),
    /// Describe a model file.
    Inspect(InspectArgs),
    /// Cheapest runtime solver within ε nats of Dopri5 1e-7 on validation rows, checked on test rows.
    Budget(BudgetArgs),
    /// 2-D models: learned density heatmap (left) and a histogram of samples (right) as PNG.
    Plot(PlotArgs),
    /// Export a run's best checkpoint (model file or JSON), recalibrating the threshold.
    Export(ExportArgs),
    /// Image runs: seeded samples from the best checkpoint as a PNG grid.
    SampleImages(SampleImagesArgs),
    /// Turn the JSON form (hand-written or from `export --format json`) into a model file.
    Import(ImportArgs),
    /// Re-encode a model file's CNF matrices as f32, f16 or i8 (`--weights`).
    Convert(ConvertArgs),
    /// Turn a raw labelled data set into train/test splits (see `scripts/fetch-data`).
    Prepare(PrepareArgs),
    /// Anomaly detection table: the model against Gaussian, mixture and isolation-forest baselines.
    Benchmark(BenchmarkArgs),
    /// Mean ± sd over several `benchmark --json` files (e.g. split seeds 0, 1, 2).
    BenchmarkSummary(BenchmarkSummaryArgs),
    /// Density baselines: test NLL of a full-covariance Gaussian and Gaussian mixtures.
    DensityBaselines(DensityBaselineArgs),
}

#[derive(clap::Args)]
pub(crate) struct DensityBaselineArgs {
    /// Training rows (CSV or NPY).
    #[arg(long)]
    pub(crate) train: PathBuf,
    /// Test rows.
    #[arg(long)]
    pub(crate) test: PathBuf,
    /// Mixture sizes to fit (1 = the Gaussian).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub(crate) components: Vec<i64>,
    /// EM iterations.
    #[arg(long, default_value_t = 100)]
    pub(crate) iterations: usize,
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: i64,
}

#[derive(clap::Args)]
pub(crate) struct BenchmarkArgs {
    /// The run folder of the model's `fit` (its train/validation split is reused).
    #[arg(long)]
    pub(crate) run_dir: PathBuf,
    /// The model file; give it several times (flows trained on the same split,
    /// e.g. with other seeds) to benchmark their ensemble, log p = log mean p_k.
    #[arg(long, required = true)]
    pub(crate) model: Vec<PathBuf>,
    /// Labelled test rows.
    #[arg(long)]
    pub(crate) test: PathBuf,
    #[arg(long, default_value = "anomaly")]
    pub(crate) labels: String,
    /// Components of the Gaussian-mixture baseline.
    #[arg(long, default_value_t = 8)]
    pub(crate) components: i64,
    /// Also write the rows as JSON (for `benchmark-summary`).
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
}

#[derive(clap::Args)]
pub(crate) struct BenchmarkSummaryArgs {
    /// `benchmark --json` files, one per split seed.
    pub(crate) files: Vec<PathBuf>,
}

#[derive(clap::Args)]
pub(crate) struct PrepareArgs {
    /// Data set: shuttle, satellite, cardio, breastw, arrhythmia (anomaly presets), csv (your own labelled CSV,
    /// with --label and --outlier), power (MAF preprocessing; use --seed 42), or the image
    /// sets mnist and fashion-mnist (28×28, 14×14 and 8×8 uint8 splits).
    pub(crate) name: String,
    /// The raw file, or for images the folder (`scripts/fetch-data NAME` prints its path).
    #[arg(long)]
    pub(crate) raw: PathBuf,
    #[arg(long)]
    pub(crate) out_dir: PathBuf,
    /// Split seed (the same seed gives the same split for every method).
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: i64,
    /// `csv`: the label column (name, or 0-based index for a file without header).
    #[arg(long)]
    pub(crate) label: Option<String>,
    /// `csv`: label values that mark an outlier, comma separated.
    #[arg(long, value_delimiter = ',')]
    pub(crate) outlier: Option<Vec<String>>,
}

#[derive(clap::Args)]
pub(crate) struct ExportArgs {
    /// The run folder of a `fit` (holds config.toml and best.ot).
    #[arg(long)]
    pub(crate) run_dir: PathBuf,
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Anomaly threshold at this quantile of the run's validation scores (default: the run's).
    #[arg(long)]
    pub(crate) threshold_quantile: Option<f64>,
    /// Make the default solver the cheapest whose log p stays within this many
    /// nats of a tight Dopri5 reference on the validation rows.
    #[arg(long)]
    pub(crate) max_error: Option<f64>,
    #[arg(long, value_enum, default_value = "model")]
    pub(crate) format: train::Format,
    /// How the file stores the CNF matrices (f32, f16, i8; default: the run's `weights`).
    #[arg(long, value_parser = ["f32", "f16", "i8"])]
    pub(crate) weights: Option<String>,
    /// The base density: auto, normal or kde (default: the run's `base`).
    #[arg(long, value_enum)]
    pub(crate) base: Option<ffjord_trainer::kde::BaseArg>,
    /// The anomaly score: auto, density (−log p), radius (−log N(z)) or base
    /// (−log p_base(z), the kernel base alone) (default: the run's `score`).
    #[arg(long, value_enum)]
    pub(crate) score: Option<ffjord_trainer::score_kind::ScoreArg>,
    /// Most latent points of the KDE base (default: the run's `kde_centres`).
    #[arg(long)]
    pub(crate) kde_centres: Option<usize>,
    #[arg(long, value_enum, default_value = "cpu")]
    pub(crate) device: DeviceArg,
}

#[derive(clap::Args)]
pub(crate) struct ConvertArgs {
    /// The model file to convert.
    pub(crate) model: PathBuf,
    /// How the new file stores the CNF matrices: f32, f16 or i8.
    #[arg(long, value_parser = ["f32", "f16", "i8"])]
    pub(crate) weights: String,
    /// Recompute the stored threshold (same quantile) from the converted
    /// model's scores on these rows (CSV or NPY, data units, the model's columns).
    #[arg(long)]
    pub(crate) calibrate: Option<PathBuf>,
    #[arg(long)]
    pub(crate) out: PathBuf,
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["run_dir", "model"])))]
pub(crate) struct SampleImagesArgs {
    /// The run folder of an image `fit` (samples from its best checkpoint, in tch).
    #[arg(long)]
    pub(crate) run_dir: Option<PathBuf>,
    /// Or an exported image model file (samples drawn by the runtime).
    #[arg(long)]
    pub(crate) model: Option<PathBuf>,
    /// The PNG to write.
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Images to draw (a square-ish grid).
    #[arg(long, default_value_t = 64)]
    pub(crate) count: i64,
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: i64,
    /// Dopri5 tolerance of the inverse solves (`--run-dir`; a model file
    /// uses its own solver).
    #[arg(long, default_value_t = 1e-5)]
    pub(crate) tol: f64,
}

#[derive(clap::Args)]
pub(crate) struct ImportArgs {
    /// JSON model.
    pub(crate) json: PathBuf,
    #[arg(long)]
    pub(crate) out: PathBuf,
}

#[derive(clap::Args)]
pub(crate) struct PlotArgs {
    #[arg(long)]
    pub(crate) model: PathBuf,
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Pixels per side of each panel.
    #[arg(long, default_value_t = 300)]
    pub(crate) grid: i64,
    #[arg(long, default_value_t = 20_000)]
    pub(crate) samples: i64,
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: i64,
    /// Dopri5 tolerance.
    #[arg(long, default_value_t = 1e-5)]
    pub(crate) tol: f64,
}

/// Flags override the `--config` file; the merged config is saved in the run
/// folder. Every flag but the first six is a [`TrainConfig`] key of the same
/// name: they are merged by name (serialized, `None` left out), so this struct
/// only declares the flags and their help, and a flag that names no key fails
/// a test (`every_config_flag_names_a_config_key`).
#[derive(clap::Args, Serialize)]
pub(crate) struct FitArgs {
    /// TOML config file (keys as the long flags, with underscores).
    #[arg(long)]
    #[serde(skip)]
    pub(crate) config: Option<PathBuf>,
    /// Where the exported model goes.
    #[arg(long)]
    #[serde(skip)]
    pub(crate) out: PathBuf,
    /// Run folder for checkpoints and metrics (default: OUT with extension `.run`).
    #[arg(long)]
    #[serde(skip)]
    pub(crate) run_dir: Option<PathBuf>,
    /// Continue from the run folder's last checkpoint.
    #[arg(long)]
    #[serde(skip)]
    pub(crate) resume: bool,
    /// Try several network widths within MINUTES of wall-clock time and keep
    /// the one with the best validation NLL (candidates in RUN/search/N).
    #[arg(long, value_name = "MINUTES", conflicts_with = "resume")]
    #[serde(skip)]
    pub(crate) search: Option<f64>,
    #[arg(long, value_enum, default_value = "cpu")]
    #[serde(skip)]
    pub(crate) device: DeviceArg,
    /// Built-in toy data set: 8gaussians, pinwheel, checkerboard, 2spirals, moons, circles, rings, swissroll.
    #[arg(long)]
    pub(crate) toy: Option<String>,
    /// CSV or NPY training data.
    #[arg(long)]
    pub(crate) data: Option<PathBuf>,
    /// Columns to use (names or 0-based indices), comma separated.
    #[arg(long, value_delimiter = ',')]
    pub(crate) columns: Option<Vec<String>>,
    /// Label column (0 normal, 1 anomaly) in the data files: not a feature;
    /// only normal rows train and calibrate.
    #[arg(long)]
    pub(crate) label: Option<String>,
    /// Validation file (instead of a fraction of --data).
    #[arg(long)]
    pub(crate) valid_data: Option<PathBuf>,
    /// Test file (optional, with --valid-data).
    #[arg(long)]
    pub(crate) test_data: Option<PathBuf>,
    /// Dequantize columns on a decimal grid with ties, fresh noise each batch (true/false).
    #[arg(long)]
    pub(crate) dequantize: Option<bool>,
    /// Widen the dequantization cell of a value repeated in many rows so it is no denser than a Gaussian peak at the column's spread (true/false).
    #[arg(long)]
    pub(crate) spread_spikes: Option<bool>,
    /// Gaussian noise (standardized units) added to each training batch.
    #[arg(long)]
    pub(crate) input_noise: Option<f64>,
    /// Start as the full-covariance Gaussian: whiten, then CNFs initialised to the identity (true/false).
    #[arg(long)]
    pub(crate) whiten: Option<bool>,
    /// Use at most this many (seeded, random) validation rows.
    #[arg(long)]
    pub(crate) valid_rows: Option<usize>,
    /// Use at most this many (seeded, random) test rows.
    #[arg(long)]
    pub(crate) test_rows: Option<usize>,
    /// Hidden widths, e.g. 64,64,64.
    #[arg(long, value_delimiter = ',')]
    pub(crate) hidden: Option<Vec<i64>>,
    #[arg(long, value_enum)]
    pub(crate) layer: Option<LayerArg>,
    #[arg(long, value_enum)]
    pub(crate) activation: Option<ActivationArg>,
    /// Stacked CNF blocks.
    #[arg(long)]
    pub(crate) blocks: Option<usize>,
    /// Moving batch norm before the first and after every block (true/false).
    #[arg(long)]
    pub(crate) batch_norm: Option<bool>,
    /// Initial end time T.
    #[arg(long)]
    pub(crate) end_time: Option<f64>,
    /// Learn T = s² (true/false).
    #[arg(long)]
    pub(crate) train_end_time: Option<bool>,
    /// How training computes the divergence [default: exact for --toy, gaussian for data files, rademacher for images]
    #[arg(long, value_enum)]
    pub(crate) trace: Option<TraceMode>,
    /// Gradients by backprop through the solver or by the continuous adjoint.
    #[arg(long, value_enum)]
    pub(crate) gradient: Option<model::Gradient>,
    /// Adjoint: exclude parameter adjoints from the backward error norm (true/false).
    #[arg(long)]
    pub(crate) seminorm: Option<bool>,
    /// RNODE kinetic-energy regularization coefficient (e.g. 0.01).
    #[arg(long)]
    pub(crate) kinetic: Option<f64>,
    /// RNODE Jacobian-Frobenius regularization coefficient (e.g. 0.01; Hutchinson trace only).
    #[arg(long)]
    pub(crate) jacobian: Option<f64>,
    #[arg(long, value_enum)]
    pub(crate) solver: Option<SolverArg>,
    #[arg(long)]
    pub(crate) rtol: Option<f64>,
    #[arg(long)]
    pub(crate) atol: Option<f64>,
    /// Steps of a fixed-step solver.
    #[arg(long)]
    pub(crate) steps: Option<u32>,
    #[arg(long)]
    pub(crate) lr: Option<f64>,
    /// Learning-rate schedule: constant, or cosine decay to 1 % at the last iteration.
    #[arg(long, value_enum)]
    pub(crate) lr_schedule: Option<ffjord_trainer::optim::LrSchedule>,
    /// Iterations of linear learning-rate warm-up.
    #[arg(long)]
    pub(crate) warmup: Option<u64>,
    /// Validate and export an exponential moving average of the weights with this decay (0 = off, e.g. 0.999).
    #[arg(long)]
    pub(crate) ema: Option<f64>,
    /// Most iterations of conditional flow matching (straight paths from
    /// training rows to N(0, I); no ODE solve) before maximum likelihood,
    /// stopping when its loss on validation rows stops improving (8
    /// evaluations, one per 250 iterations); one CNF block on N(0, I) only
    /// (0 = off; with --train-base auto, the N(0, I) run) [default: 10 per
    /// planned iteration for data files with one block on N(0, I), off for
    /// --toy, images, --blocks > 1, --batch-norm, --whiten]
    #[arg(long)]
    pub(crate) flow_matching: Option<u64>,
    /// How the exported model file stores the CNF matrices: f32, f16 (half the
    /// bytes) or i8 (a quarter, one f32 scale per row). Computed in f32 either way.
    #[arg(long, value_parser = ["f32", "f16", "i8"])]
    pub(crate) weights: Option<String>,
    #[arg(long)]
    pub(crate) weight_decay: Option<f64>,
    #[arg(long)]
    pub(crate) batch: Option<i64>,
    #[arg(long)]
    pub(crate) iterations: Option<u64>,
    /// Passes over the training rows (overrides --iterations; data files only).
    #[arg(long)]
    pub(crate) epochs: Option<u64>,
    #[arg(long)]
    pub(crate) valid_every: Option<u64>,
    /// Early stopping after this many validations without improvement (0 = off) [default: 10 for data files, off for --toy and images]
    #[arg(long)]
    pub(crate) patience: Option<u64>,
    /// Images: the logit transform's α (pixels squeezed into [α, 1 − α] before the logit).
    #[arg(long)]
    pub(crate) logit_alpha: Option<f64>,
    /// Stop at the first validation after this many seconds of training (a wall-clock budget that
    /// counts flow-matching pre-training, which stops there too).
    #[arg(long)]
    pub(crate) time_limit: Option<f64>,
    #[arg(long)]
    pub(crate) seed: Option<i64>,
    /// Dopri5 tolerance for validation, test and the exported default solver.
    #[arg(long)]
    pub(crate) eval_tol: Option<f64>,
    /// Anomaly threshold at this quantile of validation scores (0 < q < 1).
    #[arg(long)]
    pub(crate) threshold_quantile: Option<f64>,
    /// The model file's base density: auto (a Gaussian KDE over latent points
    /// of training rows where it gives the better validation likelihood),
    /// normal (N(0, I)) or kde.
    #[arg(long, value_enum)]
    pub(crate) base: Option<ffjord_trainer::kde::BaseArg>,
    /// The base the flow is trained on: normal (N(0, I); --base then decides
    /// the file's), kde (a Gaussian KDE on up to --kde-centres training rows,
    /// its bandwidth and N(0, I) weight trained with the flow; the file keeps
    /// it) or auto (with --data: both, the file with the better validation NLL
    /// kept, twice the training time; toy sets and images: normal). Kernel
    /// bases are fitted and compared on the validation rows with one fixed draw
    /// of the dequantization noise, so exact repeats of training rows do not
    /// pass for density.
    #[arg(long, value_enum)]
    pub(crate) train_base: Option<ffjord_trainer::kde::TrainBaseArg>,
    /// The model file's anomaly score (and what its threshold is on): auto
    /// (on tabular data, where it ranks synthetic outliers of the validation
    /// rows better than −log p: the latent radius −log N(z), or on a trained
    /// kernel base that base alone −log p_base(z)), density (−log p), radius
    /// or base.
    #[arg(long, value_enum)]
    pub(crate) score: Option<ffjord_trainer::score_kind::ScoreArg>,
    /// Most training rows whose latent points the KDE base keeps (n × D floats
    /// in the file; scoring costs one distance per point).
    #[arg(long)]
    pub(crate) kde_centres: Option<usize>,
}

/// The flags of `fit` that are not [`TrainConfig`] keys (`#[serde(skip)]` above).
#[cfg(test)]
const RUN_FLAGS: [&str; 6] = ["config", "out", "run_dir", "resume", "search", "device"];

impl FitArgs {
    pub(crate) fn config(&self) -> Result<TrainConfig> {
        let mut table = match &self.config {
            Some(p) => {
                let s = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
                // Parsed as the config first, so that a bad key names its line.
                toml::from_str::<TrainConfig>(&s)
                    .with_context(|| format!("{}: invalid config", p.display()))?;
                toml::from_str::<toml::Table>(&s)
                    .with_context(|| format!("{}: invalid config", p.display()))?
            }
            None => toml::Table::new(),
        };
        let flags = toml::Table::try_from(self).context("reading the flags")?;
        // One data source: a flag's source replaces the config file's other one.
        for (given, other) in [("toy", "data"), ("data", "toy")] {
            if flags.contains_key(given) {
                table.remove(other);
            }
        }
        table.extend(flags);
        let cfg = TrainConfig::deserialize(table).context("merging the flags into the config")?;
        cfg.validate()?;
        if let Some(name) = &cfg.toy
            && !data::TOYS.contains(&name.as_str())
        {
            bail!("unknown toy data set '{name}' (choose one of {})", data::TOYS.join(", "));
        }
        Ok(cfg)
    }
}

#[derive(clap::Args, Clone)]
pub(crate) struct DataArgs {
    /// CSV or NPY rows.
    #[arg(long)]
    pub(crate) data: Option<PathBuf>,
    /// Or draw rows from a toy set.
    #[arg(long)]
    pub(crate) toy: Option<String>,
    /// Rows to draw from the toy set.
    #[arg(long, default_value_t = 2000)]
    pub(crate) n: i64,
    #[arg(long, value_delimiter = ',')]
    pub(crate) columns: Option<Vec<String>>,
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: i64,
}

impl DataArgs {
    pub(crate) fn load(&self) -> Result<data::Table> {
        tch::manual_seed(self.seed);
        match (&self.data, &self.toy) {
            (Some(p), None) => data::load(p, self.columns.as_deref()),
            (None, Some(name)) => {
                data::Table::from_tensor(&data::toy(name, self.n)?, vec!["x".into(), "y".into()])
            }
            _ => bail!("give exactly one of --data FILE or --toy NAME"),
        }
    }

    /// Where the rows come from, for messages.
    pub(crate) fn source(&self) -> String {
        match (&self.data, &self.toy) {
            (Some(p), _) => p.display().to_string(),
            (None, Some(name)) => format!("toy set '{name}'"),
            (None, None) => "data".into(),
        }
    }
}

#[derive(clap::Args)]
pub(crate) struct EvalArgs {
    #[arg(long)]
    pub(crate) model: PathBuf,
    #[command(flatten)]
    pub(crate) data: DataArgs,
    /// Dopri5 tolerance (rtol = atol).
    #[arg(long, default_value_t = 1e-8)]
    pub(crate) tol: f64,
    /// Write per-row log p (float64) to this CSV.
    #[arg(long)]
    pub(crate) rows_out: Option<PathBuf>,
    /// A 0/1 column marking anomalies: also report AUROC, average precision and
    /// precision/recall/false-positive rate at the model's threshold.
    #[arg(long)]
    pub(crate) labels: Option<String>,
}

#[derive(clap::Args)]
pub(crate) struct BudgetArgs {
    #[arg(long)]
    pub(crate) model: PathBuf,
    /// Largest |Δ log p| in nats allowed on every validation row.
    #[arg(long)]
    pub(crate) max_error: f64,
    /// Validation rows the choice is made on (at most 1,000 are used).
    #[command(flatten)]
    pub(crate) data: DataArgs,
    /// Test rows to report the chosen solver's error on (CSV or NPY; for a toy
    /// set, fresh rows are drawn with --seed + 1 instead).
    #[arg(long)]
    pub(crate) test: Option<PathBuf>,
    /// A label column of the test file to leave out (e.g. `anomaly`).
    #[arg(long)]
    pub(crate) test_labels: Option<String>,
}

#[derive(clap::Args)]
pub(crate) struct ScoreArgs {
    #[arg(long)]
    pub(crate) model: PathBuf,
    #[command(flatten)]
    pub(crate) data: DataArgs,
    /// Runtime solver: the model's default unless given.
    #[arg(long, value_enum)]
    pub(crate) solver: Option<SolverArg>,
    #[arg(long)]
    pub(crate) tol: Option<f32>,
    #[arg(long, default_value_t = 8)]
    pub(crate) steps: u32,
    /// A 0/1 label column (1 = outlier) in the rows: not a feature; copied to
    /// the output, and AUROC and average precision are printed.
    #[arg(long)]
    pub(crate) label: Option<String>,
    /// Output CSV (stdout if omitted).
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
    /// Image models: training images (uint8 NPY) for a background density —
    /// independent per-pixel histograms — and a likelihood-ratio score
    /// `−(log p(x) − log p_background(x))`, written next to −log p and, with
    /// --label, its AUROC (it discounts what pixel statistics alone explain).
    #[arg(long)]
    pub(crate) background: Option<PathBuf>,
    /// Image models: Hutchinson's estimate of the trace over this many
    /// Rademacher probes (seeded by --probe-seed, the same for every row)
    /// instead of the exact trace, which costs one tangent lane per pixel —
    /// for 28×28 images hundreds of times more. 0: the exact trace.
    #[arg(long, default_value_t = 0)]
    pub(crate) probes: u16,
    /// Seed of the Hutchinson probes (with --probes).
    #[arg(long, default_value_t = 0)]
    pub(crate) probe_seed: u32,
}

#[derive(clap::Args)]
pub(crate) struct SampleArgs {
    #[arg(long)]
    pub(crate) model: PathBuf,
    #[arg(long, default_value_t = 1000)]
    pub(crate) n: usize,
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
}

#[derive(clap::Args)]
pub(crate) struct ToyArgs {
    /// Toy set name.
    pub(crate) name: String,
    #[arg(long, default_value_t = 10_000)]
    pub(crate) n: i64,
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: i64,
    #[arg(long)]
    pub(crate) out: PathBuf,
}

#[derive(clap::Args)]
pub(crate) struct InspectArgs {
    pub(crate) model: PathBuf,
    /// Also write the model in its documented JSON form.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
}

/// The CLI with `trainer fit`'s defaults shown in its help: they come from
/// `TrainConfig::default()` (the flags are optional so that a `--config` file
/// can set them), so the help cannot drift from the values used.
pub(crate) fn cli_command() -> clap::Command {
    let defaults = toml::Value::try_from(TrainConfig::default()).ok();
    let table = defaults.as_ref().and_then(toml::Value::as_table).cloned().unwrap_or_default();
    Cli::command().mut_subcommand("fit", |fit| {
        let ids: Vec<String> = fit.get_arguments().map(|a| a.get_id().to_string()).collect();
        ids.into_iter().fold(fit, |fit, id| match table.get(&id) {
            Some(value) => fit.mut_arg(id, |arg| {
                let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
                let shown = match value {
                    toml::Value::Array(v) => v.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
                    toml::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                arg.help(format!("{help} [default: {shown}]").trim_start().to_string())
            }),
            None => fit,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `fit` flag but the run-level ones must be a `TrainConfig` key:
    /// the merge is by name, so a flag renamed on one side only would be
    /// refused here (as an unknown field) rather than ignored.
    #[test]
    fn every_config_flag_names_a_config_key() {
        let cli = Cli::command();
        let fit = cli.find_subcommand("fit").expect("fit exists");
        let mut checked = 0;
        for arg in fit.get_arguments() {
            let id = arg.get_id().as_str();
            if RUN_FLAGS.contains(&id) || id == "help" {
                continue;
            }
            let mut table = toml::Table::new();
            // A value of any type: a wrong type is an error too, but never "unknown field".
            table.insert(id.to_string(), toml::Value::Boolean(true));
            let err = TrainConfig::deserialize(table).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(!err.contains("unknown field"), "flag --{id} is no TrainConfig key: {err}");
            checked += 1;
        }
        assert!(checked > 30, "only {checked} flags checked");
        let mut table = toml::Table::new();
        table.insert("no_such_key".into(), toml::Value::Boolean(true));
        let err = TrainConfig::deserialize(table).unwrap_err().to_string();
        assert!(err.contains("unknown field"), "{err}");
    }

    /// Flags override the config file key by key; a flag's data source
    /// replaces the file's other one.
    #[test]
    fn flags_override_the_config_file() {
        let dir = std::env::temp_dir().join(format!("ffjord-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("fit.toml");
        std::fs::write(&file, "toy = \"moons\"\nlr = 0.01\nhidden = [8, 8]\n").unwrap();
        let parse = |extra: &[&str]| {
            let mut argv = vec!["trainer", "fit", "--out", "m.ffjd", "--config", file.to_str().unwrap()];
            argv.extend_from_slice(extra);
            let Command::Fit(args) = Cli::try_parse_from(argv).unwrap().command else { panic!("not fit") };
            args.config().unwrap()
        };
        let cfg = parse(&[]);
        assert_eq!((cfg.toy.as_deref(), cfg.lr, cfg.hidden.clone()), (Some("moons"), 0.01, vec![8, 8]));
        let cfg = parse(&["--lr", "0.002", "--data", "rows.csv"]);
        assert_eq!((cfg.toy, cfg.lr, cfg.hidden), (None, 0.002, vec![8, 8]));
        assert_eq!(cfg.data.as_deref(), Some(std::path::Path::new("rows.csv")));
        assert_eq!(cfg.batch, TrainConfig::default().batch);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
