//! The committed models' golden values (`models/*/golden.json`) are written by
//! the runtime itself (f32, the model's default solver). This checks them
//! once against an independent evaluation: the trainer's tch chain in float64,
//! exact trace, Dopri5 at 1e-8 — another implementation of the network, the
//! trace and the solver.

use ffjord_runtime::Model;
use ffjord_trainer::model::SolveOptions;
use ffjord_trainer::modelfile::chain_from_model;
use ffjord_trainer::ode::dopri5_at;
use tch::{Device, Kind, Tensor};

/// Stated tolerance: the goldens come from f32 arithmetic and Dopri5 at the
/// model's exported tolerance (1e-5 relative for all committed models), so
/// they may differ from the tight float64 value by that much of |log p| plus
/// f32 rounding of the state.
fn tolerance(log_p: f64) -> f64 {
    2e-3 + 1e-4 * log_p.abs()
}

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
        let (_vs, chain) = chain_from_model(&model, Kind::Double, Device::Cpu).unwrap();
        let rows = golden["rows"].as_array().unwrap();
        let x: Vec<f64> = rows
            .iter()
            .flat_map(|r| r["x"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()))
            .collect();
        let x = Tensor::from_slice(&x).reshape([rows.len() as i64, model.dim() as i64]);
        let opts = SolveOptions::eval(dopri5_at(1e-8, 1_000_000));
        let log_p = Vec::<f64>::try_from(&tch::no_grad(|| chain.log_prob(&x, &opts)).unwrap().log_p).unwrap();
        let mut worst = 0.0f64;
        for (row, reference) in rows.iter().zip(&log_p) {
            let stored = row["log_p"].as_f64().unwrap();
            let err = (stored - reference).abs();
            assert!(
                err <= tolerance(*reference),
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
