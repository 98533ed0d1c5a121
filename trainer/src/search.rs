//! `trainer fit --search`: a few network widths within a wall-clock budget,
//! the best by validation NLL kept.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use tch::Device;

use crate::config::TrainConfig;
use crate::modelfile::write_atomic;
use crate::run::{RUN_FILES, RunDir};
use crate::train::{fit, model_name};

/// Network widths `fit --search` tries, smallest first.
const SEARCH_WIDTHS: [&[i64]; 4] = [&[32, 32], &[64, 64], &[64, 64, 64], &[128, 128, 128]];

/// `trainer fit --search MINUTES`: trains the config with each of
/// [`SEARCH_WIDTHS`] (each candidate gets an equal share of what is left of
/// the budget, early stopping as configured), keeps the one with the best
/// validation NLL and writes it to `out`. Candidates live in
/// `RUN/search/N/` (model file and run folder), and RUN gets the chosen
/// one's run files; a table of what each reached is printed.
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
    let budget = minutes * 60.0;
    let start = Instant::now();
    let mut tried = Vec::new();
    for (i, hidden) in SEARCH_WIDTHS.iter().enumerate() {
        let left = budget - start.elapsed().as_secs_f64();
        if left <= 0.0 {
            eprintln!("search: budget spent after {i} of {} candidates", SEARCH_WIDTHS.len());
            break;
        }
        let share = left / (SEARCH_WIDTHS.len() - i) as f64;
        let cfg = TrainConfig { hidden: hidden.to_vec(), time_limit: Some(share), ..cfg.clone() };
        let dir = run.dir.join("search").join(i.to_string());
        // Named as the final file will be (the chosen one is copied there).
        let model = dir.join(format!("{}.ffjd", model_name(out)));
        eprintln!("search {}/{}: hidden {hidden:?}, up to {share:.0} s", i + 1, SEARCH_WIDTHS.len());
        let t0 = Instant::now();
        fit(&cfg, &model, &RunDir { dir: dir.join("run") }, false, device, command)?;
        let summary = dir.join("run/summary.json");
        let summary: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&summary).with_context(|| format!("reading {}", summary.display()))?,
        )?;
        let nll = summary["best_valid_nll"].as_f64().unwrap_or(f64::INFINITY);
        let iteration = summary["best_iteration"].as_u64().unwrap_or(0);
        tried.push((hidden, nll, iteration, t0.elapsed().as_secs_f64(), model));
    }
    let best = tried
        .iter()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .context("the search budget ended before a candidate finished")?;
    println!("| hidden | best validation NLL (nats, standardized) | at iteration | seconds |");
    println!("|---|---|---|---|");
    for (hidden, nll, iteration, seconds, _) in &tried {
        println!("| {hidden:?} | {nll:.4} | {iteration} | {seconds:.0} |");
    }
    let bytes = std::fs::read(&best.4).with_context(|| format!("reading {}", best.4.display()))?;
    write_atomic(out, &bytes)?;
    // RUN itself becomes the chosen candidate's run folder, so `export` and
    // `benchmark --run-dir RUN` work on the model written to `out`.
    let chosen_run = best.4.with_file_name("run");
    for name in RUN_FILES.iter().chain(&["config.toml"]) {
        let from = chosen_run.join(name);
        if from.exists() {
            let data = std::fs::read(&from).with_context(|| format!("reading {}", from.display()))?;
            write_atomic(&run.path(name), &data)?;
        }
    }
    println!(
        "chosen: hidden {:?} (validation NLL {:.4}); wrote {} ({} bytes)",
        best.0,
        best.1,
        out.display(),
        bytes.len()
    );
    Ok(())
}
