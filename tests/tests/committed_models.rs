//! Every committed model in `models/*/model.ffjd` decodes, carries a
//! threshold, and reproduces its committed `golden.json` (log p within 1e-5
//! relative and the same NFE with the model's default solver; seeded samples
//! within 1e-5) — a regression pin on the runtime's numbers.

use ffjord_runtime::{Flow, Model};
use rand_xoshiro::Xoshiro128PlusPlus;
use rand_xoshiro::rand_core::SeedableRng;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-5 * (1.0 + b.abs())
}

#[test]
fn committed_models_reproduce_their_golden_values() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let folder = entry.unwrap().path();
        let path = folder.join("model.ffjd");
        if !path.exists() {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let model = Model::from_bytes(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(model.threshold().is_some(), "{}: exported without a threshold", path.display());
        let golden: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(folder.join("golden.json"))
                .unwrap_or_else(|_| panic!("{} has no golden.json", folder.display())),
        )
        .unwrap();
        assert_eq!(golden["dim"].as_u64().unwrap() as usize, model.dim());
        let flow = Flow::new(&model, model.default_solver()).unwrap();
        let mut scratch = vec![0.0; flow.scratch_len()];
        for row in golden["rows"].as_array().unwrap() {
            let x: Vec<f32> =
                row["x"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
            let ld = flow.log_density(&x, &mut scratch).unwrap();
            let expected = row["log_p"].as_f64().unwrap();
            assert!(close(ld.log_p as f64, expected), "{}: {} vs {expected}", path.display(), ld.log_p);
            assert_eq!(u64::from(ld.stats.nfe), row["nfe"].as_u64().unwrap(), "{}", path.display());
        }
        for s in golden["samples"].as_array().unwrap() {
            let mut rng = Xoshiro128PlusPlus::seed_from_u64(s["seed"].as_u64().unwrap());
            let mut x = vec![0.0f32; model.dim()];
            flow.sample(&mut rng, &mut x, &mut scratch).unwrap();
            for (a, b) in x.iter().zip(s["x"].as_array().unwrap()) {
                assert!(close(*a as f64, b.as_f64().unwrap()), "{}: sample {a} vs {b}", path.display());
            }
        }
        count += 1;
    }
    assert!(count >= 5, "expected the committed models in {}", dir.display());
}
