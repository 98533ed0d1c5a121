//! Every committed model in `models/*/model.ffjd` decodes and evaluates.

use ffjord_runtime::{Flow, Model};

#[test]
fn committed_models_decode_and_evaluate() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path().join("model.ffjd");
        if !path.exists() {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let model = Model::from_bytes(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let flow = Flow::new(&model, model.default_solver()).unwrap();
        let mut scratch = vec![0.0; flow.scratch_len()];
        let x = vec![0.1; model.dim()];
        let ld = flow.log_density(&x, &mut scratch).unwrap();
        assert!(ld.log_p.is_finite(), "{}", path.display());
        assert!(model.threshold().is_some(), "{}: exported without a threshold", path.display());
        count += 1;
    }
    assert!(count >= 1, "no committed models found in {}", dir.display());
}
