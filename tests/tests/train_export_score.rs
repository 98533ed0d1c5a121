//! Train → export → score across the crates, without the CLI: the trainer's
//! library trains a small flow on a toy set and exports it through the
//! runtime's format types; the runtime loads the file and scores it; the
//! scores agree with the trainer's own float64 evaluation of the same file,
//! the packed path agrees with the per-row path, and the exported threshold
//! flags the rows whose score exceeds it.

use ffjord_e2e::{float64_log_p, runtime_tolerance};
use ffjord_runtime::{Flow, Model, Verdict};
use ffjord_trainer::config::TrainConfig;
use ffjord_trainer::kde::{BaseArg, TrainBaseArg};
use ffjord_trainer::train::{RunDir, fit};

#[test]
fn a_trained_model_scores_the_same_in_the_runtime_and_the_trainer() {
    let model = train_and_check(BaseArg::Normal, TrainBaseArg::Normal);
    assert!(model.is_none());
}

/// The same with the base forced to the latent KDE (`fit --base kde`): the
/// model file ends in a `KdeBase` stage that every path scores alike.
#[test]
fn a_model_on_a_kde_base_scores_the_same_in_the_runtime_and_the_trainer() {
    let kde = train_and_check(BaseArg::Kde, TrainBaseArg::Normal).expect("a KDE base");
    assert!(kde.centres >= 2 && kde.bandwidth > 0.0, "{kde:?}");
}

/// Trained on a kernel base (`fit --train-base kde`): the file keeps that
/// base, with all of its centres, and every path scores it alike.
#[test]
fn a_model_trained_on_a_kernel_base_scores_the_same_in_the_runtime_and_the_trainer() {
    let kde = train_and_check(BaseArg::Normal, TrainBaseArg::Kde).expect("the trained kernel base");
    assert!(kde.centres == 300 && kde.bandwidth > 0.0 && kde.normal_weight > 0.0, "{kde:?}");
}

/// Fits 8gaussians on `train_base` with `base`, checks runtime against
/// float64, packed against per-row and the threshold rule; returns the
/// file's KDE base.
fn train_and_check(base: BaseArg, train_base: TrainBaseArg) -> Option<ffjord_runtime::KdeSpec> {
    let dir = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        toy: Some("8gaussians".into()),
        hidden: vec![16, 16],
        iterations: 40,
        valid_every: 20,
        batch: 128,
        base,
        train_base,
        kde_centres: 300,
        ..TrainConfig::default()
    };
    cfg.validate().unwrap();
    let out = dir.path().join("model.ffjd");
    let run = RunDir { dir: dir.path().join("model.run") };
    fit(&cfg, &out, &run, false, tch::Device::Cpu, "e2e test").unwrap();

    let bytes = std::fs::read(&out).unwrap();
    let model = Model::from_bytes(&bytes).unwrap();
    assert_eq!(model.dim(), 2);
    let flow = Flow::new(&model, model.default_solver()).unwrap();
    let mut scratch = vec![0.0; flow.scratch_len()];
    // A grid from the modes (|x| ≈ 2.8 after the toy's scaling) out to the tails.
    let rows: Vec<f32> = (0..64).flat_map(|i| [i as f32 * 0.11 - 3.5, (i % 8) as f32 * 0.9 - 3.2]).collect();
    let runtime: Vec<f64> =
        rows.chunks_exact(2).map(|x| f64::from(flow.log_density(x, &mut scratch).unwrap().log_p)).collect();
    let reference = float64_log_p(&model, &rows.iter().map(|&v| f64::from(v)).collect::<Vec<_>>());
    for (i, (r, f)) in runtime.iter().zip(&reference).enumerate() {
        assert!((r - f).abs() <= runtime_tolerance(*f), "row {i}: runtime {r}, float64 {f}");
    }

    // The packed path: the same rows in blocks, within 1e-4 relative of the per-row path.
    let mut packed = vec![0.0f32; runtime.len()];
    let mut packed_scratch = vec![0.0; flow.packed_scratch_len(8)];
    flow.log_density_packed(&rows, &mut packed, 8, &mut packed_scratch).unwrap();
    for (i, (p, r)) in packed.iter().zip(&runtime).enumerate() {
        assert!((f64::from(*p) - r).abs() <= 1e-4 * (1.0 + r.abs()), "row {i}: packed {p}, per row {r}");
    }

    // The exported threshold is applied as documented: anomaly ⇔ −log p > threshold.
    let threshold = model.threshold().expect("fit calibrates a threshold").score;
    let mut flagged = 0;
    for (x, log_p) in rows.chunks_exact(2).zip(&runtime) {
        let verdict = flow.score(x, &mut scratch).unwrap().verdict;
        let expected = if -*log_p > f64::from(threshold) { Verdict::Anomaly } else { Verdict::Normal };
        assert_eq!(verdict, expected, "row {x:?}: −log p {}, threshold {threshold}", -log_p);
        flagged += usize::from(verdict == Verdict::Anomaly);
    }
    assert!(
        flagged > 0 && flagged < runtime.len(),
        "the grid reaches both sides of the threshold ({flagged} flagged)"
    );
    model.kde_base()
}
