//! The committed models' golden values (`models/*/golden.json`) are written by
//! the runtime itself (f32, the model's default solver). This checks them
//! once against an independent evaluation: the trainer's tch chain in float64,
//! exact trace, Dopri5 at 1e-8 — another implementation of the network, the
//! trace and the solver.

use ffjord_e2e::{float64_log_p, runtime_tolerance};
use ffjord_runtime::Model;

#[test]
fn committed_golden_values_agree_with_a_float64_evaluation() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
    let mut checked = 0;
    for entry in std::fs::read_dir(&root).unwrap() {
        let folder = entry.unwrap().path();
        let Ok(text) = std::fs::read_to_string(folder.join("golden.json")) else { continue };
        let golden: serde_json::Value = serde_json::from_str(&text).unwrap();
        let bytes = std::fs::read(folder.join("model.ffjd")).unwrap();
        let model = Model::from_bytes(&bytes).unwrap();
        let rows = golden["rows"].as_array().unwrap();
        let x: Vec<f64> = rows
            .iter()
            .flat_map(|r| r["x"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()))
            .collect();
        let log_p = float64_log_p(&model, &x);
        let mut worst = 0.0f64;
        for (row, reference) in rows.iter().zip(&log_p) {
            let stored = row["log_p"].as_f64().unwrap();
            let err = (stored - reference).abs();
            assert!(
                err <= runtime_tolerance(*reference),
                "{}: golden log p {stored}, float64 {reference} (|Δ| = {err:.2e})",
                folder.display()
            );
            worst = worst.max(err);
        }
        eprintln!("{}: {} rows, max |golden − float64| = {worst:.2e} nats", folder.display(), rows.len());
        checked += 1;
    }
    assert!(checked >= 6, "expected every committed model to have golden values, found {checked}");
}
