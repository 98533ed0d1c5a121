//! Model selection inside `fit`, by the exported file's validation NLL:
//! `--search MINUTES` tries a few network widths within a wall-clock
//! budget, and `--train-base auto` (the default for tabular data files)
//! trains on `N(0, I)` and on a kernel base and keeps the better.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use tch::Device;

use crate::config::TrainConfig;
use crate::kde::TrainBaseArg;
use crate::modelfile::write_atomic;
use crate::run::{RUN_FILES, RunDir};
use crate::train::{fit, model_name};

/// Network widths `fit --search` tries, smallest first.
const SEARCH_WIDTHS: [&[i64]; 4] = [&[32, 32], &[64, 64], &[64, 64, 64], &[128, 128, 128]];

/// One configuration a selection trains.
struct Candidate {
    /// How the table names it.
    label: String,
    cfg: TrainConfig,
}

/// A trained candidate.
struct Tried {
    label: String,
    /// The model file's validation NLL (nats, standardized units).
    valid_nll: f64,
    best_iteration: u64,
    seconds: f64,
    model: PathBuf,
}

/// The bases `--train-base` leaves to choose: both for `auto`, else the one named.
fn bases(cfg: &TrainConfig) -> Vec<TrainBaseArg> {
    match cfg.train_base {
        TrainBaseArg::Auto => vec![TrainBaseArg::Normal, TrainBaseArg::Kde],
        other => vec![other],
    }
}

/// Whether `fit` compares bases for `cfg` (`--train-base auto` on a data file).
pub fn compares_bases(cfg: &TrainConfig) -> bool {
    cfg.train_base == TrainBaseArg::Auto && cfg.data.is_some()
}

/// `trainer fit --search MINUTES`: trains the config with each of
/// [`SEARCH_WIDTHS`] (on each base `--train-base` leaves open; each
/// candidate gets an equal share of what is left of the budget, early
/// stopping as configured) and keeps the one whose model file has the best
/// validation NLL. Candidates live in `RUN/search/N/` (model file and run
/// folder), and RUN gets the chosen one's run files; a table of what each
/// reached is printed.
pub fn search(
    cfg: &TrainConfig,
    minutes: f64,
    out: &Path,
    run: &RunDir,
    device: Device,
    command: &str,
) -> Result<()> {
    ensure!(
        minutes.is_finite() && minutes > 0.0,
        "--search needs a positive number of minutes, got {minutes}"
    );
    let bases = if cfg.data.is_some() { bases(cfg) } else { vec![TrainBaseArg::Normal] };
    let mut candidates = Vec::new();
    for hidden in SEARCH_WIDTHS {
        for &train_base in &bases {
            let label = match bases.len() {
                1 => format!("{hidden:?}"),
                _ => format!("{hidden:?} on {}", base_name(train_base)),
            };
            candidates.push(Candidate {
                label,
                cfg: TrainConfig { hidden: hidden.to_vec(), ..on_base(cfg, train_base) },
            });
        }
    }
    select(candidates, Some(minutes * 60.0), out, run, ("search", "hidden"), device, command)
}

/// `trainer fit --train-base auto` on a data file: trains the config on
/// `N(0, I)` (where `--base` may then fit a KDE base) and on a kernel base
/// trained with the flow, in `RUN/bases/N/`, and keeps the model file with
/// the better validation NLL (the post-hoc KDE base's cross-validated).
/// Images keep `N(0, I)` without a second fit.
pub fn compare_bases(
    cfg: &TrainConfig,
    out: &Path,
    run: &RunDir,
    device: Device,
    command: &str,
) -> Result<()> {
    let candidates = bases(cfg)
        .into_iter()
        .map(|train_base| Candidate { label: base_name(train_base).into(), cfg: on_base(cfg, train_base) })
        .collect();
    select(candidates, None, out, run, ("bases", "train base"), device, command)
}

/// `cfg` trained on `train_base`. Flow-matching pre-training draws straight
/// paths to `N(0, I)`, so only the `N(0, I)` candidate keeps it.
fn on_base(cfg: &TrainConfig, train_base: TrainBaseArg) -> TrainConfig {
    let flow_matching = if train_base == TrainBaseArg::Kde { Some(0) } else { cfg.flow_matching };
    TrainConfig { train_base, flow_matching, ..cfg.clone() }
}

/// How the tables name a training base.
fn base_name(base: TrainBaseArg) -> &'static str {
    match base {
        TrainBaseArg::Auto => "auto",
        TrainBaseArg::Normal => "N(0, I)",
        TrainBaseArg::Kde => "kernel base",
    }
}

/// Trains `candidates` in `RUN/<folder>/N/` (with `budget` seconds shared out
/// equally among those not yet trained), writes the one with the best
/// validation NLL to `out`, makes RUN its run folder and prints the table,
/// whose first column is headed `what`.
fn select(
    candidates: Vec<Candidate>,
    budget: Option<f64>,
    out: &Path,
    run: &RunDir,
    (folder, what): (&str, &str),
    device: Device,
    command: &str,
) -> Result<()> {
    let start = Instant::now();
    let total = candidates.len();
    let mut tried: Vec<Tried> = Vec::new();
    for (i, c) in candidates.into_iter().enumerate() {
        let share = match budget {
            Some(b) => {
                let left = b - start.elapsed().as_secs_f64();
                if left <= 0.0 {
                    eprintln!("{folder}: budget spent after {i} of {total} candidates");
                    break;
                }
                Some(left / (total - i) as f64)
            }
            None => None,
        };
        // Images have no kernel base: once a candidate's run says the data
        // are images, the others on a kernel base are skipped.
        if c.cfg.train_base == TrainBaseArg::Kde && tried.iter().any(|t| is_image_run(&t.model)) {
            continue;
        }
        let cfg = TrainConfig { time_limit: share.or(c.cfg.time_limit), ..c.cfg };
        let dir = run.dir.join(folder).join(i.to_string());
        // Named as the final file will be (the chosen one is copied there).
        let model = dir.join(format!("{}.ffjd", model_name(out)));
        match share {
            Some(s) => eprintln!("{folder} {}/{total}: {}, up to {s:.0} s", i + 1, c.label),
            None => eprintln!("{folder} {}/{total}: {}", i + 1, c.label),
        }
        let t0 = Instant::now();
        fit(&cfg, &model, &RunDir { dir: dir.join("run") }, false, device, command)?;
        let summary = dir.join("run/summary.json");
        let summary: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&summary).with_context(|| format!("reading {}", summary.display()))?,
        )?;
        let valid_nll = summary["valid_nll_exported"]
            .as_f64()
            .or(summary["best_valid_nll"].as_f64())
            .unwrap_or(f64::INFINITY);
        let best_iteration = summary["best_iteration"].as_u64().unwrap_or(0);
        tried.push(Tried {
            label: c.label,
            valid_nll,
            best_iteration,
            seconds: t0.elapsed().as_secs_f64(),
            model,
        });
    }
    let best = tried
        .iter()
        .min_by(|a, b| a.valid_nll.total_cmp(&b.valid_nll))
        .context("the search budget ended before a candidate finished")?;
    println!("| {what} | validation NLL of the model file (nats, standardized) | best iteration | seconds |");
    println!("|---|---|---|---|");
    for t in &tried {
        println!("| {} | {:.4} | {} | {:.0} |", t.label, t.valid_nll, t.best_iteration, t.seconds);
    }
    let bytes = std::fs::read(&best.model).with_context(|| format!("reading {}", best.model.display()))?;
    write_atomic(out, &bytes)?;
    // RUN itself becomes the chosen candidate's run folder, so `export`,
    // `benchmark --run-dir RUN` and `--resume` work on the model written to `out`.
    let chosen_run = best.model.with_file_name("run");
    for name in RUN_FILES.iter().chain(&["config.toml"]) {
        let from = chosen_run.join(name);
        if from.exists() {
            let data = std::fs::read(&from).with_context(|| format!("reading {}", from.display()))?;
            write_atomic(&run.path(name), &data)?;
        }
    }
    println!(
        "chosen: {what} {} (validation NLL {:.4}); wrote {} ({} bytes)",
        best.label,
        best.valid_nll,
        out.display(),
        bytes.len()
    );
    Ok(())
}

/// Whether the run next to a candidate's model file trained on images.
fn is_image_run(model: &Path) -> bool {
    let config = model.with_file_name("run").join("config.toml");
    std::fs::read_to_string(config)
        .ok()
        .and_then(|s| toml::from_str::<TrainConfig>(&s).ok())
        .is_some_and(|c| c.image_shape.is_some())
}
