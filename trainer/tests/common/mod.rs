//! Shared by the trainer's end-to-end tests.

use std::path::Path;
use std::process::{Command, Output};

/// Runs the `trainer` binary in `dir` (one thread).
pub fn trainer(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(args)
        .current_dir(dir)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .expect("trainer runs")
}

/// The number printed right after `label` in `text`, up to the next comma or
/// space (as `score --label` prints "…: AUROC 0.9512, average precision …").
pub fn number_after(text: &str, label: &str) -> f64 {
    text.split(label)
        .nth(1)
        .and_then(|rest| rest.trim_start().split([',', ' ', '\n']).next())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no number after {label:?} in {text}"))
}
