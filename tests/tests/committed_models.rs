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

/// `models/*/model.{f16,i8}.ffjd` are `trainer convert` of the folder's
/// `model.ffjd` (byte for byte), and on its golden rows they stay within the
/// stated distance of the f32 model's log p (the README's table has the
/// measured errors on whole test sets).
#[test]
fn committed_quantized_models_are_conversions_of_their_f32_models() {
    use ffjord_runtime::MatrixEncoding;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let folder = entry.unwrap().path();
        // Tolerance: absolute nats plus a share of |log p| (outlier rows sit
        // far out, where the same weight error moves log p more).
        for (encoding, abs, rel) in [(MatrixEncoding::F16, 0.02, 1e-3), (MatrixEncoding::I8, 0.5, 0.02)] {
            let path = folder.join(format!("model.{}.ffjd", encoding.name()));
            if !path.exists() {
                continue;
            }
            let f32_bytes = std::fs::read(folder.join("model.ffjd")).unwrap();
            let bytes = std::fs::read(&path).unwrap();
            let converted = ffjord_trainer::modelfile::with_matrices(&f32_bytes, encoding, None).unwrap();
            assert!(bytes == converted, "{} is not `trainer convert` of model.ffjd", path.display());
            let (q, f) = (Model::from_bytes(&bytes).unwrap(), Model::from_bytes(&f32_bytes).unwrap());
            assert_eq!(q.threshold(), f.threshold());
            let golden: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(folder.join("golden.json")).unwrap()).unwrap();
            let flow = Flow::new(&q, q.default_solver()).unwrap();
            let mut scratch = vec![0.0; flow.scratch_len()];
            for row in golden["rows"].as_array().unwrap() {
                let x: Vec<f32> =
                    row["x"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
                let lp = f64::from(flow.log_density(&x, &mut scratch).unwrap().log_p);
                let reference = row["log_p"].as_f64().unwrap();
                let tolerance = abs + rel * reference.abs();
                assert!(
                    (lp - reference).abs() <= tolerance,
                    "{}: log p {lp} vs the f32 model's {reference} (tolerance {tolerance} nats)",
                    path.display()
                );
            }
            count += 1;
        }
    }
    assert!(count >= 4, "expected the committed f16 / i8 models in {}", dir.display());
}
