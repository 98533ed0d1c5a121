//! A run folder: where `fit` keeps checkpoints, bookkeeping and metrics, and
//! how they are committed so that a kill at any moment resumes exactly.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use tch::{Tensor, nn};

use crate::modelfile::write_atomic;
use crate::optim::{Adam, Ema};

/// Where a run keeps its files.
pub struct RunDir {
    pub dir: PathBuf,
}

impl RunDir {
    /// A file in the run folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The run's saved config (`config.toml`).
    pub fn config(&self) -> Result<crate::config::TrainConfig> {
        let path = self.path("config.toml");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("{}: invalid config", path.display()))
    }
}

#[derive(serde::Serialize, serde::Deserialize, Default)]
pub(crate) struct RunState {
    pub(crate) iteration: u64,
    pub(crate) best_valid: Option<f64>,
    pub(crate) best_iteration: u64,
    pub(crate) stale_validations: u64,
}

/// Moves a fully written temporary file into place: its bytes reach the disk
/// before the rename, and the rename before the next step (a power cut leaves
/// the old file or the new one, never a torn one).
pub(crate) fn commit_file(tmp: &Path, path: &Path) -> Result<()> {
    std::fs::File::open(tmp)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", tmp.display()))?;
    std::fs::rename(tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty())
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all(); // not supported everywhere; the rename itself is atomic
    }
    Ok(())
}

pub(crate) fn save_checkpoint(vs: &nn::VarStore, path: &Path) -> Result<()> {
    let tmp = path.with_extension("tmp.ot");
    vs.save(&tmp).with_context(|| format!("saving {}", tmp.display()))?;
    commit_file(&tmp, path)
}

/// Saves parameters, optimizer state, iteration and the run's bookkeeping
/// (best validation NLL, its iteration, stale validations) in one file,
/// atomically: a kill at any moment leaves either the previous or the new
/// checkpoint, never parameters from one validation with bookkeeping from
/// another (which could let a worse model overwrite `best.ot` later).
pub(crate) fn save_last(
    vs: &nn::VarStore,
    opt: &Adam,
    ema: Option<&Ema>,
    state: &RunState,
    path: &Path,
) -> Result<()> {
    let mut named: Vec<(String, Tensor)> =
        vs.variables().into_iter().map(|(n, t)| (format!("param.{n}"), t.detach())).collect();
    named.extend(opt.state());
    named.extend(ema.map(Ema::state).unwrap_or_default());
    named.push(("run.iteration".into(), Tensor::from(state.iteration as i64)));
    named.push(("run.state".into(), Tensor::from_slice(serde_json::to_string(state)?.as_bytes())));
    let tmp = path.with_extension("tmp.ot");
    Tensor::save_multi(&named, &tmp).with_context(|| format!("saving {}", tmp.display()))?;
    commit_file(&tmp, path)
}

/// Restores [`save_last`]'s file into `vs` and `opt`; returns the run state
/// it was taken with (from `state.json` for checkpoints written before the
/// state travelled inside them).
pub(crate) fn load_last(
    vs: &nn::VarStore,
    opt: &mut Adam,
    ema: Option<&mut Ema>,
    path: &Path,
    state_json: &Path,
) -> Result<RunState> {
    let named = Tensor::load_multi(path).with_context(|| format!("resuming from {}", path.display()))?;
    let get = |k: &str| named.iter().find(|(n, _)| n == k).map(|(_, t)| t.shallow_clone());
    for (n, t) in vs.variables() {
        let saved =
            get(&format!("param.{n}")).with_context(|| format!("{}: no parameter {n}", path.display()))?;
        if saved.size() != t.size() {
            bail!(
                "{}: {n} has shape {:?}, the model {:?} (was the config changed?)",
                path.display(),
                saved.size(),
                t.size()
            );
        }
        tch::no_grad(|| t.shallow_clone().copy_(&saved));
    }
    opt.restore(&named, path)?;
    if let Some(ema) = ema {
        ema.restore(&named, path)?;
    }
    let iteration = get("run.iteration")
        .with_context(|| format!("{}: no iteration", path.display()))?
        .int64_value(&[]) as u64;
    let mut state: RunState = match get("run.state") {
        Some(bytes) => serde_json::from_slice(&Vec::<u8>::try_from(&bytes)?)
            .with_context(|| format!("{}: unreadable run state", path.display()))?,
        None => {
            let s = std::fs::read_to_string(state_json)
                .with_context(|| format!("reading {} to resume", state_json.display()))?;
            serde_json::from_str(&s).with_context(|| format!("{}: invalid", state_json.display()))?
        }
    };
    state.iteration = iteration;
    Ok(state)
}

/// Runs `f` with the weights that are validated and exported: the moving
/// average where the run keeps one, else the trained weights.
pub(crate) fn with_eval_weights<T>(ema: Option<&Ema>, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match ema {
        Some(ema) => ema.with_averaged(f),
        None => f(),
    }
}

/// Fault injection for the tests: `FFJORD_CRASH_AT=POINT:ITERATION` ends the
/// process at that point of the checkpoint commit, as a kill or power cut
/// would (no further writes), so resuming from every point is tested
/// deterministically rather than by the timing of a kill.
pub(crate) fn crash_point(point: &str, iteration: u64) {
    if std::env::var("FFJORD_CRASH_AT").is_ok_and(|v| v == format!("{point}:{iteration}")) {
        eprintln!("FFJORD_CRASH_AT: stopping at {point} of iteration {iteration}");
        std::process::exit(86);
    }
}

/// Keeps the lines of `metrics.jsonl` up to `iteration`: a resumed run
/// replays the iterations after its checkpoint, which must not be logged twice.
pub(crate) fn truncate_metrics(path: &Path, iteration: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("iteration").and_then(serde_json::Value::as_u64))
                .is_some_and(|i| i <= iteration)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    if kept.len() != text.len() {
        write_atomic(path, kept.as_bytes())?;
    }
    Ok(())
}

/// The files of one run; a fresh run in a folder that holds another run's
/// removes them first, so one folder never mixes two runs.
pub(crate) const RUN_FILES: [&str; 5] = ["best.ot", "last.ot", "state.json", "metrics.jsonl", "summary.json"];
