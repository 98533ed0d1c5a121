//! `trainer`: train FFJORD models on tch and export them for ffjord-runtime.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail, ensure};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use ffjord_runtime::{Flow, Model, Solver, Verdict};
use tch::{Device, Kind};

use ffjord_trainer::config::{ActivationArg, LayerArg, SolverArg, TrainConfig};
use ffjord_trainer::model::{self, TraceMode};
use ffjord_trainer::{data, modelfile, ode, train};

#[derive(Parser)]
#[command(
    name = "trainer",
    version,
    about = "Train FFJORD continuous normalizing flows and export them for ffjord-runtime"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DeviceArg {
    Cpu,
    Cuda,
    Auto,
}

impl DeviceArg {
    fn resolve(self) -> Result<Device> {
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
enum Command {
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
    /// Turn the JSON form (hand-written or from `export --format json`) into a model file.
    Import(ImportArgs),
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
struct DensityBaselineArgs {
    /// Training rows (CSV or NPY).
    #[arg(long)]
    train: PathBuf,
    /// Test rows.
    #[arg(long)]
    test: PathBuf,
    /// Mixture sizes to fit (1 = the Gaussian).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    components: Vec<i64>,
    /// EM iterations.
    #[arg(long, default_value_t = 100)]
    iterations: usize,
    #[arg(long, default_value_t = 0)]
    seed: i64,
}

#[derive(clap::Args)]
struct BenchmarkArgs {
    /// The run folder of the model's `fit` (its train/validation split is reused).
    #[arg(long)]
    run_dir: PathBuf,
    #[arg(long)]
    model: PathBuf,
    /// Labelled test rows.
    #[arg(long)]
    test: PathBuf,
    #[arg(long, default_value = "anomaly")]
    labels: String,
    /// Components of the Gaussian-mixture baseline.
    #[arg(long, default_value_t = 8)]
    components: i64,
    /// Also write the rows as JSON (for `benchmark-summary`).
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(clap::Args)]
struct BenchmarkSummaryArgs {
    /// `benchmark --json` files, one per split seed.
    files: Vec<PathBuf>,
}

#[derive(clap::Args)]
struct PrepareArgs {
    /// Data set: shuttle, satellite, cardio (anomaly presets), csv (your own labelled CSV,
    /// with --label and --outlier) or power (MAF preprocessing; use --seed 42).
    name: String,
    /// The raw file (`scripts/fetch-data NAME` prints its path).
    #[arg(long)]
    raw: PathBuf,
    #[arg(long)]
    out_dir: PathBuf,
    /// Split seed (the same seed gives the same split for every method).
    #[arg(long, default_value_t = 0)]
    seed: i64,
    /// `csv`: the label column (name, or 0-based index for a file without header).
    #[arg(long)]
    label: Option<String>,
    /// `csv`: label values that mark an outlier, comma separated.
    #[arg(long, value_delimiter = ',')]
    outlier: Option<Vec<String>>,
}

#[derive(clap::Args)]
struct ExportArgs {
    /// The run folder of a `fit` (holds config.toml and best.ot).
    #[arg(long)]
    run_dir: PathBuf,
    #[arg(long)]
    out: PathBuf,
    /// Anomaly threshold at this quantile of the run's validation scores (default: the run's).
    #[arg(long)]
    threshold_quantile: Option<f64>,
    /// Make the default solver the cheapest whose log p stays within this many
    /// nats of a tight Dopri5 reference on the validation rows.
    #[arg(long)]
    max_error: Option<f64>,
    #[arg(long, value_enum, default_value = "model")]
    format: train::Format,
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
}

#[derive(clap::Args)]
struct ImportArgs {
    /// JSON model.
    json: PathBuf,
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args)]
struct PlotArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    out: PathBuf,
    /// Pixels per side of each panel.
    #[arg(long, default_value_t = 300)]
    grid: i64,
    #[arg(long, default_value_t = 20_000)]
    samples: i64,
    #[arg(long, default_value_t = 0)]
    seed: i64,
    /// Dopri5 tolerance.
    #[arg(long, default_value_t = 1e-5)]
    tol: f64,
}

/// Flags override the `--config` file; the merged config is saved in the run folder.
#[derive(clap::Args)]
struct FitArgs {
    /// TOML config file (keys as the long flags, with underscores).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where the exported model goes.
    #[arg(long)]
    out: PathBuf,
    /// Run folder for checkpoints and metrics (default: OUT with extension `.run`).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Continue from the run folder's last checkpoint.
    #[arg(long)]
    resume: bool,
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// Built-in toy data set: 8gaussians, pinwheel, checkerboard, 2spirals, moons, circles, rings, swissroll.
    #[arg(long)]
    toy: Option<String>,
    /// CSV or NPY training data.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Columns to use (names or 0-based indices), comma separated.
    #[arg(long, value_delimiter = ',')]
    columns: Option<Vec<String>>,
    /// Label column (0 normal, 1 anomaly) in the data files: not a feature;
    /// only normal rows train and calibrate.
    #[arg(long)]
    label: Option<String>,
    /// Validation file (instead of a fraction of --data).
    #[arg(long)]
    valid_data: Option<PathBuf>,
    /// Test file (optional, with --valid-data).
    #[arg(long)]
    test_data: Option<PathBuf>,
    /// Dequantize columns on a decimal grid with ties, fresh noise each batch (true/false).
    #[arg(long)]
    dequantize: Option<bool>,
    /// Gaussian noise (standardized units) added to each training batch.
    #[arg(long)]
    input_noise: Option<f64>,
    /// Start as the full-covariance Gaussian: whiten, then CNFs initialised to the identity (true/false).
    #[arg(long)]
    whiten: Option<bool>,
    /// Use at most this many (seeded, random) validation rows.
    #[arg(long)]
    valid_rows: Option<usize>,
    /// Use at most this many (seeded, random) test rows.
    #[arg(long)]
    test_rows: Option<usize>,
    /// Hidden widths, e.g. 64,64,64.
    #[arg(long, value_delimiter = ',')]
    hidden: Option<Vec<i64>>,
    #[arg(long, value_enum)]
    layer: Option<LayerArg>,
    #[arg(long, value_enum)]
    activation: Option<ActivationArg>,
    /// Stacked CNF blocks.
    #[arg(long)]
    blocks: Option<usize>,
    /// Moving batch norm before the first and after every block (true/false).
    #[arg(long)]
    batch_norm: Option<bool>,
    /// Initial end time T.
    #[arg(long)]
    end_time: Option<f64>,
    /// Learn T = s² (true/false).
    #[arg(long)]
    train_end_time: Option<bool>,
    #[arg(long, value_enum)]
    trace: Option<TraceMode>,
    /// Gradients by backprop through the solver or by the continuous adjoint.
    #[arg(long, value_enum)]
    gradient: Option<model::Gradient>,
    /// Adjoint: exclude parameter adjoints from the backward error norm (true/false).
    #[arg(long)]
    seminorm: Option<bool>,
    /// RNODE kinetic-energy regularization coefficient (e.g. 0.01).
    #[arg(long)]
    kinetic: Option<f64>,
    /// RNODE Jacobian-Frobenius regularization coefficient (e.g. 0.01; Hutchinson trace only).
    #[arg(long)]
    jacobian: Option<f64>,
    #[arg(long, value_enum)]
    solver: Option<SolverArg>,
    #[arg(long)]
    rtol: Option<f64>,
    #[arg(long)]
    atol: Option<f64>,
    /// Steps of a fixed-step solver.
    #[arg(long)]
    steps: Option<u32>,
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    weight_decay: Option<f64>,
    #[arg(long)]
    batch: Option<i64>,
    #[arg(long)]
    iterations: Option<u64>,
    /// Passes over the training rows (overrides --iterations; data files only).
    #[arg(long)]
    epochs: Option<u64>,
    #[arg(long)]
    valid_every: Option<u64>,
    /// Early stopping after this many validations without improvement (0 = off).
    #[arg(long)]
    patience: Option<u64>,
    #[arg(long)]
    seed: Option<i64>,
    /// Dopri5 tolerance for validation, test and the exported default solver.
    #[arg(long)]
    eval_tol: Option<f64>,
    /// Anomaly threshold at this quantile of validation scores (0 < q < 1).
    #[arg(long)]
    threshold_quantile: Option<f64>,
}

macro_rules! override_fields {
    ($cfg:ident, $args:ident, $($f:ident),*) => { $( if let Some(v) = $args.$f.clone() { $cfg.$f = v; } )* };
}

impl FitArgs {
    fn config(&self) -> Result<TrainConfig> {
        let mut cfg = match &self.config {
            Some(p) => {
                let s = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
                toml::from_str(&s).with_context(|| format!("{}: invalid config", p.display()))?
            }
            None => TrainConfig::default(),
        };
        if self.toy.is_some() {
            cfg.toy = self.toy.clone();
            cfg.data = None;
        }
        if self.data.is_some() {
            cfg.data = self.data.clone();
            cfg.toy = None;
        }
        if self.columns.is_some() {
            cfg.columns = self.columns.clone();
        }
        if self.label.is_some() {
            cfg.label = self.label.clone();
        }
        for (field, value) in [(&mut cfg.valid_data, &self.valid_data), (&mut cfg.test_data, &self.test_data)]
        {
            if value.is_some() {
                *field = value.clone();
            }
        }
        for (field, value) in [(&mut cfg.valid_rows, self.valid_rows), (&mut cfg.test_rows, self.test_rows)] {
            if value.is_some() {
                *field = value;
            }
        }
        if self.threshold_quantile.is_some() {
            cfg.threshold_quantile = self.threshold_quantile;
        }
        if self.epochs.is_some() {
            cfg.epochs = self.epochs;
        }
        override_fields!(
            cfg,
            self,
            hidden,
            layer,
            activation,
            blocks,
            batch_norm,
            dequantize,
            input_noise,
            whiten,
            end_time,
            train_end_time,
            trace,
            gradient,
            seminorm,
            kinetic,
            jacobian,
            solver,
            rtol,
            atol,
            steps,
            lr,
            weight_decay,
            batch,
            iterations,
            valid_every,
            patience,
            seed,
            eval_tol
        );
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
struct DataArgs {
    /// CSV or NPY rows.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Or draw rows from a toy set.
    #[arg(long)]
    toy: Option<String>,
    /// Rows to draw from the toy set.
    #[arg(long, default_value_t = 2000)]
    n: i64,
    #[arg(long, value_delimiter = ',')]
    columns: Option<Vec<String>>,
    #[arg(long, default_value_t = 0)]
    seed: i64,
}

impl DataArgs {
    fn load(&self) -> Result<data::Table> {
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
    fn source(&self) -> String {
        match (&self.data, &self.toy) {
            (Some(p), _) => p.display().to_string(),
            (None, Some(name)) => format!("toy set '{name}'"),
            (None, None) => "data".into(),
        }
    }
}

#[derive(clap::Args)]
struct EvalArgs {
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    /// Dopri5 tolerance (rtol = atol).
    #[arg(long, default_value_t = 1e-8)]
    tol: f64,
    /// Write per-row log p (float64) to this CSV.
    #[arg(long)]
    rows_out: Option<PathBuf>,
    /// A 0/1 column marking anomalies: also report AUROC, average precision and
    /// precision/recall/false-positive rate at the model's threshold.
    #[arg(long)]
    labels: Option<String>,
}

#[derive(clap::Args)]
struct BudgetArgs {
    #[arg(long)]
    model: PathBuf,
    /// Largest |Δ log p| in nats allowed on every validation row.
    #[arg(long)]
    max_error: f64,
    /// Validation rows the choice is made on (at most 1,000 are used).
    #[command(flatten)]
    data: DataArgs,
    /// Test rows to report the chosen solver's error on (CSV or NPY; for a toy
    /// set, fresh rows are drawn with --seed + 1 instead).
    #[arg(long)]
    test: Option<PathBuf>,
    /// A label column of the test file to leave out (e.g. `anomaly`).
    #[arg(long)]
    test_labels: Option<String>,
}

#[derive(clap::Args)]
struct ScoreArgs {
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    /// Runtime solver: the model's default unless given.
    #[arg(long, value_enum)]
    solver: Option<SolverArg>,
    #[arg(long)]
    tol: Option<f32>,
    #[arg(long, default_value_t = 8)]
    steps: u32,
    /// Output CSV (stdout if omitted).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(clap::Args)]
struct SampleArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value_t = 1000)]
    n: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(clap::Args)]
struct ToyArgs {
    /// Toy set name.
    name: String,
    #[arg(long, default_value_t = 10_000)]
    n: i64,
    #[arg(long, default_value_t = 0)]
    seed: i64,
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args)]
struct InspectArgs {
    model: PathBuf,
    /// Also write the model in its documented JSON form.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn main() {
    ffjord_trainer::allocator::keep_freed_memory();
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn command_line() -> String {
    std::env::args().collect::<Vec<_>>().join(" ")
}

/// The CLI with `trainer fit`'s defaults shown in its help: they come from
/// `TrainConfig::default()` (the flags are optional so that a `--config` file
/// can set them), so the help cannot drift from the values used.
fn cli_command() -> clap::Command {
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

fn run() -> Result<()> {
    let cli = Cli::from_arg_matches(&cli_command().get_matches())?;
    match cli.command {
        Command::Fit(args) => {
            let cfg = args.config()?;
            let run_dir = args.run_dir.clone().unwrap_or_else(|| args.out.with_extension("run"));
            let device = args.device.resolve()?;
            train::fit(&cfg, &args.out, &train::RunDir { dir: run_dir }, args.resume, device, &command_line())
        }
        Command::Eval(args) => eval(&args),
        Command::Score(args) => score(&args),
        Command::Sample(args) => sample(&args),
        Command::Toy(args) => {
            tch::manual_seed(args.seed);
            let x = data::toy(&args.name, args.n)?;
            let t = data::Table::from_tensor(&x, vec!["x".into(), "y".into()])?;
            write_table(&args.out, &t.columns, (0..t.rows).map(|i| t.row(i).to_vec()))
        }
        Command::Inspect(args) => inspect(&args),
        Command::Budget(args) => budget(&args),
        Command::Export(a) => {
            let run = train::RunDir { dir: a.run_dir.clone() };
            train::export_run(
                &run,
                &a.out,
                a.threshold_quantile,
                a.max_error,
                a.format,
                a.device.resolve()?,
                &command_line(),
            )
        }
        Command::DensityBaselines(a) => {
            let train = data::load(&a.train, None)?.to_tensor();
            let test = data::load(&a.test, None)?.to_tensor();
            println!("| model | test NLL (nats) | seconds to fit |");
            println!("|---|---|---|");
            for k in a.components {
                let t0 = std::time::Instant::now();
                let m = ffjord_trainer::baselines::Mixture::fit(
                    &train,
                    k,
                    if k == 1 { 1 } else { a.iterations },
                    a.seed,
                )?;
                let secs = t0.elapsed().as_secs_f64();
                let lp = m.log_prob(&test)?;
                let nll = -lp.iter().sum::<f64>() / lp.len() as f64;
                let name = if k == 1 {
                    "Gaussian (full covariance)".to_string()
                } else {
                    format!("Gaussian mixture, K = {k}")
                };
                println!("| {name} | {nll:.4} | {secs:.0} |");
            }
            Ok(())
        }
        Command::Benchmark(a) => {
            let (test, labels) =
                ffjord_trainer::anomaly::split_labels(&data::load(&a.test, None)?, &a.labels)?;
            let rows =
                ffjord_trainer::anomaly::benchmark(&a.run_dir, &a.model, &test, &labels, a.components)?;
            let pos = labels.iter().filter(|&&l| l).count();
            println!(
                "{} test rows, {pos} anomalies; thresholds at quantiles of each method's validation scores",
                labels.len()
            );
            println!(
                "| method | AUROC | AP | precision (q=0.95) | recall | FPR | precision (q=0.99) | recall | FPR |"
            );
            println!("|---|---|---|---|---|---|---|---|---|");
            if let Some(path) = &a.json {
                modelfile::write_atomic(path, serde_json::to_string_pretty(&rows)?.as_bytes())?;
            }
            for r in rows {
                let (a, b) = (r.at_95, r.at_99);
                println!(
                    "| {} | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} |",
                    r.method,
                    a.auroc,
                    a.average_precision,
                    a.precision,
                    a.recall,
                    a.false_positive_rate,
                    b.precision,
                    b.recall,
                    b.false_positive_rate
                );
            }
            Ok(())
        }
        Command::BenchmarkSummary(a) => {
            let mut runs = Vec::new();
            for f in &a.files {
                let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
                runs.push(
                    serde_json::from_str(&text)
                        .with_context(|| format!("{}: not a `benchmark --json` file", f.display()))?,
                );
            }
            ensure!(!runs.is_empty(), "give at least one `benchmark --json` file");
            print!("{}", ffjord_trainer::anomaly::summary_table(&runs));
            Ok(())
        }
        Command::Prepare(a) if a.name == "power" => {
            ffjord_trainer::power::prepare(&a.raw, &a.out_dir, a.seed)
        }
        Command::Prepare(a) => {
            let outlier = a.outlier.clone().unwrap_or_default();
            let source = match (&a.label, a.outlier.is_some()) {
                (Some(label), true) => Some(ffjord_trainer::anomaly::CsvSource { label, outlier: &outlier }),
                (None, false) => None,
                _ => bail!("give both --label COLUMN and --outlier VALUE"),
            };
            ffjord_trainer::anomaly::prepare(&a.name, &a.raw, &a.out_dir, a.seed, source.as_ref())
        }
        Command::Import(a) => {
            let text =
                std::fs::read_to_string(&a.json).with_context(|| format!("reading {}", a.json.display()))?;
            let j: ffjord_trainer::json::JsonModel = serde_json::from_str(&text)
                .with_context(|| format!("{}: not a valid JSON model", a.json.display()))?;
            let bytes =
                ffjord_trainer::json::from_json(&j).with_context(|| format!("{}", a.json.display()))?;
            modelfile::write_atomic(&a.out, &bytes)?;
            println!("wrote {} ({} bytes)", a.out.display(), bytes.len());
            Ok(())
        }
        Command::Plot(a) => {
            let s = ffjord_trainer::plot::plot(&a.model, &a.out, a.grid, a.samples, a.seed, a.tol)?;
            let ([x0, x1], [y0, y1]) = ([s.range[0].0, s.range[0].1], [s.range[1].0, s.range[1].1]);
            println!(
                "wrote {}: x in [{x0:.2}, {x1:.2}], y in [{y0:.2}, {y1:.2}], mass of p in view {:.4}",
                a.out.display(),
                s.mass_in_view
            );
            Ok(())
        }
    }
}

fn write_table(
    path: &std::path::Path,
    header: &[String],
    rows: impl Iterator<Item = Vec<f64>>,
) -> Result<()> {
    let mut s = header.join(",") + "\n";
    for r in rows {
        s += &r.iter().map(|v| format!("{v}")).collect::<Vec<_>>().join(",");
        s.push('\n');
    }
    modelfile::write_atomic(path, s.as_bytes())
}

/// Reads a model file and data rows whose width matches the model.
fn model_and_rows(path: &std::path::Path, data: &DataArgs) -> Result<(Vec<u8>, data::Table)> {
    let bytes = modelfile::read_model_bytes(path)?;
    let dim = Model::from_bytes(&bytes).map_err(|e| anyhow::anyhow!("{e}"))?.dim();
    let table = data.load()?;
    check_width(&data.source(), &table, path, dim)?;
    Ok((bytes, table))
}

/// `what` ("data", "test data") must have the model's `dim` feature columns.
/// The rows' width against the model's dimension, naming both files.
fn check_width(source: &str, table: &data::Table, model: &std::path::Path, dim: usize) -> Result<()> {
    if table.dim() != dim {
        bail!("{source} has {} columns, the model {} expects {dim}", table.dim(), model.display());
    }
    Ok(())
}

/// Rows `trainer eval` integrates together.
const EVAL_CHUNK_ROWS: i64 = 4096;

fn eval(args: &EvalArgs) -> Result<()> {
    let (bytes, table, labels) = match &args.labels {
        Some(col) => {
            let bytes = modelfile::read_model_bytes(&args.model)?;
            let (table, labels) = ffjord_trainer::anomaly::split_labels(&args.data.load()?, col)?;
            (bytes, table, Some(labels))
        }
        None => {
            let (bytes, table) = model_and_rows(&args.model, &args.data)?;
            (bytes, table, None)
        }
    };
    let model = Model::from_bytes(&bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
    check_width(&args.data.source(), &table, &args.model, model.dim())?;
    let (_vs, chain) = modelfile::chain_from_model(&model, &bytes, Kind::Double, Device::Cpu)?;
    let x = table.to_tensor();
    let method = ode::Method::Dopri5 { rtol: args.tol, atol: args.tol, max_steps: 1_000_000 };
    let opts = model::SolveOptions::eval(method);
    // In chunks: memory stays bounded however many rows the file has (one
    // batch of 144k rows took 4 GB); each chunk takes its own adaptive steps.
    let (mut log_p, mut nfe) = (Vec::with_capacity(table.rows), 0u64);
    for chunk in x.split(EVAL_CHUNK_ROWS, 0) {
        let out = tch::no_grad(|| chain.log_prob(&chunk, &opts))?;
        log_p.extend(Vec::<f64>::try_from(&out.log_p)?);
        nfe += u64::from(out.stats.solve.nfe);
    }
    let nll = -log_p.iter().sum::<f64>() / log_p.len() as f64;
    let d = model.dim() as f64;
    println!(
        "rows {}  NLL {nll:.6} nats in data units ({:.6} bits/dim)  NFE {nfe} (summed over chunks of {EVAL_CHUNK_ROWS} rows)",
        log_p.len(),
        nll / d / 2f64.ln(),
    );
    if let Some(p) = &args.rows_out {
        write_table(p, &["log_p".into()], log_p.iter().map(|&v| vec![v]))?;
    }
    if let Some(labels) = labels {
        let scores: Vec<f64> = log_p.iter().map(|v| -v).collect();
        let threshold = model.threshold().map_or(f64::INFINITY, |t| f64::from(t.score));
        // f32's shortest form ("0.99"), not its f64 widening (0.9900000095367432).
        let q = model.threshold().map_or("none".to_string(), |t| t.quantile.to_string());
        let m = ffjord_trainer::anomaly::detection(&scores, &labels, threshold);
        let pos = labels.iter().filter(|&&a| a).count();
        println!("anomalies {pos} of {}", labels.len());
        println!(
            "| AUROC | average precision | precision | recall | false-positive rate | threshold (quantile) |"
        );
        println!("|---|---|---|---|---|---|");
        println!(
            "| {:.4} | {:.4} | {:.4} | {:.4} | {:.4} | {threshold:.3} ({q}) |",
            m.auroc, m.average_precision, m.precision, m.recall, m.false_positive_rate
        );
    }
    Ok(())
}

fn runtime_solver(model: &Model<'_>, solver: Option<SolverArg>, tol: Option<f32>, steps: u32) -> Solver {
    match solver {
        None => {
            let mut s = model.default_solver();
            if let (Solver::Dopri5(d), Some(t)) = (&mut s, tol) {
                d.rtol = t;
                d.atol = t;
            }
            s
        }
        Some(SolverArg::Dopri5) => Solver::Dopri5(ffjord_runtime::Dopri5 {
            max_steps: 100_000,
            ..ffjord_runtime::Dopri5::with_tolerance(tol.unwrap_or(1e-5))
        }),
        Some(SolverArg::Rk4) => Solver::Rk4 { steps },
        Some(SolverArg::Midpoint) => Solver::Midpoint { steps },
        Some(SolverArg::Euler) => Solver::Euler { steps },
    }
}

fn rows_f32(table: &data::Table, limit: usize) -> Vec<Vec<f32>> {
    (0..table.rows.min(limit)).map(|i| table.row(i).iter().map(|&v| v as f32).collect()).collect()
}

fn budget(args: &BudgetArgs) -> Result<()> {
    let (bytes, valid) = model_and_rows(&args.model, &args.data)?;
    let model = Model::from_bytes(&bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
    let valid = rows_f32(&valid, 1000);
    let (best, all) = ffjord_trainer::budget::choose(&bytes, &valid, args.max_error)?;
    println!("validation: {} rows; errors against Dopri5 1e-7\n", valid.len());
    println!("| solver | max error | mean error | mean NFE |");
    println!("|---|---|---|---|");
    for c in &all {
        println!("| {} | {:.2e} | {:.2e} | {:.1} |", c.solver, c.max_error, c.mean_error, c.mean_nfe);
    }
    let test = match (&args.test, &args.data.toy) {
        (Some(path), _) => match &args.test_labels {
            Some(col) => ffjord_trainer::anomaly::split_labels(&data::load(path, None)?, col)?.0,
            None => data::load(path, args.data.columns.as_deref())?,
        },
        (None, Some(_)) => DataArgs { seed: args.data.seed + 1, ..args.data.clone() }.load()?,
        (None, None) => bail!("--test is needed with --data (the choice is checked on other rows)"),
    };
    let source = args
        .test
        .as_ref()
        .map_or_else(|| format!("test rows from {}", args.data.source()), |p| p.display().to_string());
    check_width(&source, &test, &args.model, model.dim())?;
    let test = rows_f32(&test, 1000);
    let acc = ffjord_trainer::budget::accuracy(&bytes, &test, best.method.to_runtime())?;
    let flops = model.flops_per_evaluation() as f64 * acc.mean_nfe;
    println!(
        "\nchosen: {} (cheapest within {} nats) | test on {} rows: max error {:.2e}, mean error {:.2e}, mean NFE {:.1}, {:.0} FLOPs per log p",
        best.solver, args.max_error, acc.rows, acc.max_error, acc.mean_error, acc.mean_nfe, flops
    );
    Ok(())
}

fn score(args: &ScoreArgs) -> Result<()> {
    let (bytes, table) = model_and_rows(&args.model, &args.data)?;
    let model = Model::from_bytes(&bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
    let flow = Flow::new(&model, runtime_solver(&model, args.solver, args.tol, args.steps))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut scratch = vec![0.0f32; flow.scratch_len()];
    let mut out = String::from("row,log_p,score,verdict,nfe\n");
    let (mut anomalies, mut n) = (0, 0);
    for i in 0..table.rows {
        let x: Vec<f32> = table.row(i).iter().map(|&v| v as f32).collect();
        let s = flow.score(&x, &mut scratch).map_err(|e| anyhow::anyhow!("row {}: {e}", i + 1))?;
        let verdict = match s.verdict {
            Verdict::Normal => "normal",
            Verdict::Anomaly => {
                anomalies += 1;
                "anomaly"
            }
            Verdict::Uncalibrated => "uncalibrated",
        };
        n += 1;
        out += &format!("{i},{},{},{verdict},{}\n", s.log_density.log_p, s.score, s.log_density.stats.nfe);
    }
    match &args.out {
        Some(p) => modelfile::write_atomic(p, out.as_bytes())?,
        None => std::io::stdout().write_all(out.as_bytes())?,
    }
    eprintln!("{n} rows scored, {anomalies} anomalies");
    Ok(())
}

fn sample(args: &SampleArgs) -> Result<()> {
    use rand_xoshiro::rand_core::SeedableRng;
    let bytes = modelfile::read_model_bytes(&args.model)?;
    let model = Model::from_bytes(&bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
    let flow = Flow::new(&model, model.default_solver()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut scratch = vec![0.0f32; flow.scratch_len()];
    // Xoshiro128++ is what the firmware examples use, so seeds reproduce across devices.
    let mut rng = rand_xoshiro::Xoshiro128PlusPlus::seed_from_u64(args.seed);
    let mut rows = Vec::new();
    for _ in 0..args.n {
        let mut x = vec![0.0f32; model.dim()];
        let s = flow.sample(&mut rng, &mut x, &mut scratch).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut r: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
        r.push(f64::from(s.log_p));
        rows.push(r);
    }
    let mut header: Vec<String> = (0..model.dim()).map(|i| format!("x{i}")).collect();
    header.push("log_p".into());
    match &args.out {
        Some(p) => write_table(p, &header, rows.into_iter()),
        None => {
            for r in rows {
                println!("{}", r.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(","));
            }
            Ok(())
        }
    }
}

fn inspect(args: &InspectArgs) -> Result<()> {
    let bytes = modelfile::read_model_bytes(&args.model)?;
    let model = Model::from_bytes(&bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
    let h = model.header();
    println!("file        {} ({} bytes)", args.model.display(), bytes.len());
    println!("name        {}", h.metadata.name);
    println!("data        {}", h.metadata.description);
    println!("command     {}", h.metadata.command);
    println!("dimension   {}", model.dim());
    println!("parameters  {}", model.weight_count());
    for (i, s) in h.stages().enumerate() {
        match s {
            ffjord_runtime::Stage::Cnf(c) => {
                let widths: Vec<String> =
                    c.layers.iter().map(|l| format!("{:?}→{}", l.kind, l.out_dim)).collect();
                println!("stage {i}     CNF T={} {:?} [{}]", c.end_time, c.activation, widths.join(", "));
            }
            ffjord_runtime::Stage::Affine => println!("stage {i}     affine"),
            ffjord_runtime::Stage::Linear => println!("stage {i}     linear (lower-triangular)"),
        }
    }
    println!("solver      {:?}", model.default_solver());
    match model.threshold() {
        Some(t) => println!("threshold   score > {} (quantile {})", t.score, t.quantile),
        None => println!("threshold   none"),
    }
    println!("FLOPs/eval  {} (exact trace, D+1 lanes)", model.flops_per_evaluation());
    println!("scratch     {} floats with the default solver", model.scratch_len(&model.default_solver()));
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&ffjord_trainer::json::to_json(&model, &bytes)?)?;
        modelfile::write_atomic(path, json.as_bytes())?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
