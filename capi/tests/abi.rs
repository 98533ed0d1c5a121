//! The C ABI called as C would call it, against the runtime called directly
//! and the committed golden values: identical numbers, every status named,
//! null and unloaded handles refused with their own codes.

use ffjord_c::*;
use ffjord_runtime::{Flow, Model};

fn model_bytes(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/../models/{name}/model.ffjd", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn empty() -> FfjordModel {
    FfjordModel { opaque: [0; FFJORD_MODEL_WORDS] }
}

fn name(code: i32) -> String {
    // SAFETY: ffjord_status_name returns a static NUL-terminated string.
    unsafe { std::ffi::CStr::from_ptr(ffjord_status_name(code)) }.to_str().unwrap().to_string()
}

#[test]
fn scores_match_the_runtime_and_the_golden_values_bit_for_bit() {
    for set in ["8gaussians-mcu", "shuttle"] {
        let bytes = model_bytes(set);
        let mut m = empty();
        unsafe {
            assert_eq!(ffjord_model_load(bytes.as_ptr(), bytes.len(), &mut m), 0);
            let dim = ffjord_model_dim(&m);
            let mut scratch = vec![0f32; ffjord_model_scratch_len(&m)];
            let model = Model::from_bytes(&bytes).unwrap();
            let flow = Flow::new(&model, model.default_solver()).unwrap();
            let golden: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(format!(
                    "{}/../models/{set}/golden.json",
                    env!("CARGO_MANIFEST_DIR")
                ))
                .unwrap(),
            )
            .unwrap();
            let rows = golden["rows"].as_array().unwrap();
            let mut xs = Vec::new();
            for row in rows {
                let x: Vec<f32> =
                    row["x"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
                let mut out = FfjordScore { log_p: 0.0, score: 0.0, verdict: -1, nfe: 0 };
                let st = ffjord_score(&m, x.as_ptr(), dim, scratch.as_mut_ptr(), scratch.len(), &mut out);
                assert_eq!(st, 0, "{set}: {}", name(st));
                let direct = flow.score(&x, &mut scratch).unwrap();
                assert_eq!(out.log_p.to_bits(), direct.log_density.log_p.to_bits(), "{set}: log p");
                assert_eq!(out.nfe, direct.log_density.stats.nfe);
                let expected = row["log_p"].as_f64().unwrap();
                assert!(
                    (f64::from(out.log_p) - expected).abs() <= 1e-5 * (1.0 + expected.abs()),
                    "{set}: golden"
                );
                let verdict = if direct.verdict == ffjord_runtime::Verdict::Anomaly { 1 } else { 0 };
                assert_eq!(out.verdict, verdict);
                xs.extend(x);
            }
            // The batch call gives the same values.
            let mut log_p = vec![0f32; rows.len()];
            let mut failed = usize::MAX;
            let st = ffjord_log_density_batch(
                &m,
                xs.as_ptr(),
                rows.len(),
                dim,
                log_p.as_mut_ptr(),
                scratch.as_mut_ptr(),
                scratch.len(),
                &mut failed,
            );
            assert_eq!(st, 0);
            for (row, lp) in rows.iter().zip(&log_p) {
                let expected = row["log_p"].as_f64().unwrap();
                assert!((f64::from(*lp) - expected).abs() <= 1e-5 * (1.0 + expected.abs()));
            }
            // A NaN in row 2 names the row and the error.
            xs[2 * dim] = f32::NAN;
            let st = ffjord_log_density_batch(
                &m,
                xs.as_ptr(),
                rows.len(),
                dim,
                log_p.as_mut_ptr(),
                scratch.as_mut_ptr(),
                scratch.len(),
                &mut failed,
            );
            assert_eq!((st, failed), (FfjordStatus::NonFiniteInput as i32, 2));
            // Seeded samples equal the runtime's with the same generator.
            let mut sample = vec![0f32; dim];
            assert_eq!(
                ffjord_sample(&m, 7, sample.as_mut_ptr(), dim, scratch.as_mut_ptr(), scratch.len()),
                0
            );
            let mut rng =
                <rand_xoshiro::Xoshiro128PlusPlus as rand_xoshiro::rand_core::SeedableRng>::seed_from_u64(7);
            let mut direct = vec![0f32; dim];
            flow.sample(&mut rng, &mut direct, &mut scratch).unwrap();
            assert_eq!(sample, direct);
            // Threshold and solver switches.
            let (mut score, mut q) = (0f32, 0f32);
            assert_eq!(ffjord_model_threshold(&m, &mut score, &mut q), 0);
            assert_eq!((score, q), (model.threshold().unwrap().score, model.threshold().unwrap().quantile));
            assert_eq!(ffjord_model_use_rk4(&mut m, 0), FfjordStatus::InvalidSolver as i32);
            assert_eq!(ffjord_model_use_rk4(&mut m, 8), 0);
            let mut rk4 = vec![0f32; ffjord_model_scratch_len(&m)];
            let mut out = FfjordScore { log_p: 0.0, score: 0.0, verdict: -1, nfe: 0 };
            assert_eq!(ffjord_score(&m, xs.as_ptr(), dim, rk4.as_mut_ptr(), rk4.len(), &mut out), 0);
            assert_eq!(
                out.nfe,
                32 * model.header().stages().filter(|s| matches!(s, ffjord_runtime::Stage::Cnf(_))).count()
                    as u32
            );
            assert_eq!(ffjord_model_use_default_solver(&mut m), 0);
        }
    }
}

#[test]
fn bad_input_gets_its_own_status() {
    let bytes = model_bytes("8gaussians-mcu");
    let mut m = empty();
    let mut scratch = vec![0f32; 4096];
    let mut out = FfjordScore { log_p: 0.0, score: 0.0, verdict: -1, nfe: 0 };
    unsafe {
        // Never loaded: refused, and no number comes back.
        assert_eq!(ffjord_model_dim(&m), 0);
        let x = [0.0f32, 0.0];
        let st = ffjord_score(&m, x.as_ptr(), 2, scratch.as_mut_ptr(), scratch.len(), &mut out);
        assert_eq!(st, FfjordStatus::NotLoaded as i32);
        assert_eq!(ffjord_model_dim(std::ptr::null()), 0);
        assert_eq!(ffjord_model_load(std::ptr::null(), 10, &mut m), FfjordStatus::NullPointer as i32);
        assert_eq!(
            ffjord_model_load(bytes.as_ptr(), bytes.len(), std::ptr::null_mut()),
            FfjordStatus::NullPointer as i32
        );
        // Corrupted and truncated files: the runtime's own codes.
        let mut bad = bytes.clone();
        bad[bytes.len() / 2] ^= 0x40;
        assert_eq!(ffjord_model_load(bad.as_ptr(), bad.len(), &mut m), FfjordStatus::ChecksumMismatch as i32);
        assert_eq!(ffjord_model_load(bytes.as_ptr(), 3, &mut m), FfjordStatus::Truncated as i32);
        assert_eq!(ffjord_model_dim(&m), 0, "a failed load leaves the storage not loaded");
        assert_eq!(ffjord_model_load(bytes.as_ptr(), bytes.len(), &mut m), 0);
        // Wrong dimension, short scratch, null output.
        let st = ffjord_score(&m, x.as_ptr(), 1, scratch.as_mut_ptr(), scratch.len(), &mut out);
        assert_eq!(st, FfjordStatus::InputDimension as i32);
        let st = ffjord_score(&m, x.as_ptr(), 2, scratch.as_mut_ptr(), 3, &mut out);
        assert_eq!(st, FfjordStatus::ScratchTooSmall as i32);
        let st = ffjord_score(&m, x.as_ptr(), 2, scratch.as_mut_ptr(), scratch.len(), std::ptr::null_mut());
        assert_eq!(st, FfjordStatus::NullPointer as i32);
        let st = ffjord_score(&m, std::ptr::null(), 2, scratch.as_mut_ptr(), scratch.len(), &mut out);
        assert_eq!(st, FfjordStatus::NullPointer as i32);
    }
}

/// The ABI's codes and names are the runtime's, entry by entry, and every
/// code has a distinct name.
#[test]
fn every_runtime_error_code_has_its_status_and_name() {
    for (code, runtime_name) in ffjord_runtime::error::CODES {
        assert_eq!(name(code), runtime_name, "code {code}");
    }
    let mut names: Vec<String> = (-50..=0).map(name).filter(|n| n != "unknown status").collect();
    let count = names.len();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), count, "two codes share a name");
    assert_eq!(
        count,
        ffjord_runtime::error::CODES.len() + 4,
        "the runtime's codes, ok and three of the ABI's own"
    );
    assert_eq!(name(1234), "unknown status");
}

/// A tiny model (D = 2, f(z) = −z/2 over T = 1) scored as `kind`.
fn tiny(kind: ffjord_runtime::ScoreKind) -> Vec<u8> {
    use ffjord_runtime::{Activation, CnfSpec, Header, LayerKind, LayerSpec, Metadata, Solver, Stage};
    let layers = [LayerSpec { kind: LayerKind::Ignore, out_dim: 2 }].into_iter().collect();
    let cnf =
        CnfSpec { layers, activation: Activation::Identity, end_time: 1.0, matrices: Default::default() };
    let header = Header {
        dim: 2,
        standardize: false,
        stages: [Stage::Cnf(cnf)].into_iter().collect(),
        solver: Solver::Rk4 { steps: 8 },
        threshold: Some(ffjord_runtime::Threshold { score: 2.0, quantile: 0.99 }),
        metadata: Metadata { name: "tiny", description: "", command: "" },
        score: kind,
    };
    let mut bytes = vec![0u8; ffjord_runtime::format::encoded_len(&header).unwrap()];
    ffjord_runtime::format::encode(&header, &[-0.5, 0.0, 0.0, -0.5, 0.0, 0.0], &mut bytes).unwrap();
    bytes
}

#[test]
fn the_score_kind_is_reported_and_scored() {
    use ffjord_runtime::ScoreKind;
    for (kind, code) in [
        (ScoreKind::NegLogDensity, FfjordScoreKind::NegLogDensity),
        (ScoreKind::LatentRadius, FfjordScoreKind::LatentRadius),
        (ScoreKind::LatentBase, FfjordScoreKind::LatentBase),
    ] {
        let bytes = tiny(kind);
        let mut m = empty();
        unsafe {
            assert_eq!(ffjord_model_load(bytes.as_ptr(), bytes.len(), &mut m), 0);
            assert_eq!(ffjord_model_score_kind(&m), code as i32);
            let mut scratch = vec![0f32; ffjord_model_scratch_len(&m)];
            let x = [1.5f32, -0.5];
            let mut out = FfjordScore { log_p: 0.0, score: 0.0, verdict: -1, nfe: 0 };
            assert_eq!(ffjord_score(&m, x.as_ptr(), 2, scratch.as_mut_ptr(), scratch.len(), &mut out), 0);
            let model = Model::from_bytes(&bytes).unwrap();
            let flow = Flow::new(&model, model.default_solver()).unwrap();
            let ld = flow.log_density(&x, &mut scratch).unwrap();
            let expected = ld.score(kind);
            assert_eq!(out.score.to_bits(), expected.to_bits(), "{kind:?}");
            assert_eq!(out.verdict, i32::from(expected > 2.0));
        }
    }
    // An unloaded handle is refused with its status.
    let m = empty();
    assert_eq!(unsafe { ffjord_model_score_kind(&m) }, FfjordStatus::NotLoaded as i32);
}
