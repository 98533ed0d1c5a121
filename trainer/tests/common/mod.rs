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
