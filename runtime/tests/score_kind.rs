//! The score kind of format version 6 (`Header::score`): its bytes (after
//! the metadata, only in version 6 and later files), the latent-radius score
//! against a float64 closed form, the latent-base score of version 7 (the
//! radius on an `N(0, I)` base, the kernel estimate on a kernel base), the same score on every path (one row, batch, packed
//! blocks, the Dopri5 stream, with and without a kernel density base), and
//! typed errors for a bad kind byte or a version too old for it.

mod common;

use common::*;
use ffjord_runtime::format::{LATENT_BASE_VERSION, SCORE_KIND_VERSION, crc32};
use ffjord_runtime::{
    Activation, Dopri5, Flow, LayerKind, LoadError, Model, ScoreKind, Solver, Stage, Threshold, Verdict,
};

/// D = 1, f(z) = z/2 over T = 1 (so z(T) = e^{1/2} x), RK4 with 2 steps,
/// metadata "g", "", "": the golden model of `decode.rs`, scored as `kind`.
fn tiny(kind: ScoreKind) -> Vec<u8> {
    let mut h = header(
        1,
        false,
        vec![Stage::Cnf(cnf(1, &[], &[LayerKind::Ignore], Activation::Identity, 1.0))],
        Solver::Rk4 { steps: 2 },
    );
    h.metadata = ffjord_runtime::Metadata { name: "g", description: "", command: "" };
    h.score = kind;
    encode_model(&h, &[0.5, 0.0])
}

/// Replaces a file's trailing CRC after an edit, so only the edit is tested.
fn with_crc(mut bytes: Vec<u8>) -> Vec<u8> {
    let n = bytes.len() - 4;
    let crc = crc32(&bytes[..n]);
    bytes[n..].copy_from_slice(&crc.to_le_bytes());
    bytes
}

#[test]
fn the_kind_is_one_byte_after_the_metadata_of_a_version_6_file() {
    let density = tiny(ScoreKind::NegLogDensity);
    let radius = tiny(ScoreKind::LatentRadius);
    // −log p files keep version 1 and their bytes (decode.rs pins them).
    assert_eq!(&density[4..6], &[1, 0]);
    assert_eq!(&radius[4..6], &SCORE_KIND_VERSION.to_le_bytes());
    // The header ends at byte 25 in both; version 6 adds the kind (variant 1)
    // and one byte less padding, so the weights stay at byte 28.
    assert_eq!(density[6..25], radius[6..25]);
    assert_eq!(&density[25..28], &[0, 0, 0]);
    assert_eq!(&radius[25..28], &[0x01, 0, 0]);
    assert_eq!(density[28..36], radius[28..36]);
    assert_eq!(radius.len(), density.len());
    let model = Model::from_bytes(&radius).unwrap();
    assert_eq!(model.score_kind(), ScoreKind::LatentRadius);
    assert_eq!(model.header().version(), SCORE_KIND_VERSION);
    assert_eq!(Model::from_bytes(&density).unwrap().score_kind(), ScoreKind::NegLogDensity);
}

#[test]
fn a_bad_kind_byte_or_an_old_version_is_a_typed_error() {
    let radius = tiny(ScoreKind::LatentRadius);
    // An unknown kind (variant 7).
    let mut bad = radius.clone();
    bad[25] = 0x07;
    assert_eq!(Model::from_bytes(&with_crc(bad)).unwrap_err(), LoadError::MalformedHeader);
    // The same bytes declared version 5: the kind is read as padding, which must be zero.
    let mut old = radius.clone();
    old[4] = 5;
    assert_eq!(Model::from_bytes(&with_crc(old)).unwrap_err(), LoadError::BadPadding);
    // A version 6 file may say −log p explicitly (variant 0).
    let mut explicit = radius;
    explicit[25] = 0x00;
    let explicit = with_crc(explicit);
    assert_eq!(Model::from_bytes(&explicit).unwrap().score_kind(), ScoreKind::NegLogDensity);
    // A version this runtime does not know.
    let mut future = tiny(ScoreKind::LatentRadius);
    future[4] = 8;
    assert!(matches!(
        Model::from_bytes(&with_crc(future)).unwrap_err(),
        LoadError::UnsupportedVersion { found: 8, .. }
    ));
}

#[test]
fn the_latent_base_kind_is_variant_2_of_a_version_7_file_and_refused_in_version_6() {
    let radius = tiny(ScoreKind::LatentRadius);
    let base = tiny(ScoreKind::LatentBase);
    assert_eq!(&base[4..6], &LATENT_BASE_VERSION.to_le_bytes());
    assert_eq!(LATENT_BASE_VERSION, 7);
    // Only the version and the kind byte differ from the radius file.
    assert_eq!(base[6..25], radius[6..25]);
    assert_eq!(&base[25..28], &[0x02, 0, 0]);
    assert_eq!(base[28..base.len() - 4], radius[28..radius.len() - 4]);
    let model = Model::from_bytes(&base).unwrap();
    assert_eq!(model.score_kind(), ScoreKind::LatentBase);
    assert_eq!(model.header().version(), LATENT_BASE_VERSION);
    // The same bytes declared version 6: a kind that version cannot hold.
    let mut old = base;
    old[4] = 6;
    assert_eq!(
        Model::from_bytes(&with_crc(old)).unwrap_err(),
        LoadError::InvalidField(ffjord_runtime::Field::StageVersion)
    );
}

/// On an `N(0, I)` base the latent-base score is the radius, bit for bit.
#[test]
fn the_latent_base_score_on_a_normal_base_is_the_radius() {
    for (kind, expected) in [(ScoreKind::LatentBase, true), (ScoreKind::NegLogDensity, false)] {
        let bytes = tiny(kind);
        let model = Model::from_bytes(&bytes).unwrap();
        let flow = Flow::new(&model, Solver::Rk4 { steps: 64 }).unwrap();
        let mut scratch = vec![0.0; flow.scratch_len()];
        for x in [-2.5f32, 0.0, 0.7, 4.0] {
            let s = flow.score(&[x], &mut scratch).unwrap();
            assert_eq!(s.score == -s.log_density.log_p_normal, expected, "{kind:?} x = {x}");
        }
    }
}

/// z = e^{1/2} x, so −log N(z) = z²/2 + ½ ln 2π and −log p = that − 1/2
/// (the volume change of the flow is e^{1/2}), in float64; RK4 with 64 steps
/// is within 1e-6 of the exponential.
#[test]
fn the_radius_is_the_latent_points_normal_log_density() {
    let bytes = tiny(ScoreKind::LatentRadius);
    let model = Model::from_bytes(&bytes).unwrap();
    let flow = Flow::new(&model, Solver::Rk4 { steps: 64 }).unwrap();
    let mut scratch = vec![0.0; flow.scratch_len()];
    for x in [-2.5f32, -0.3, 0.0, 0.7, 4.0] {
        let z = f64::from(x) * 0.5f64.exp();
        let radius = 0.5 * z * z + 0.5 * (2.0 * std::f64::consts::PI).ln();
        let s = flow.score(&[x], &mut scratch).unwrap();
        assert!(
            (f64::from(s.score) - radius).abs() < 1e-5 * (1.0 + radius),
            "x = {x}: {} vs {radius}",
            s.score
        );
        // log p is still the density's: the radius minus the volume change.
        let log_p = -(radius - 0.5);
        assert!((f64::from(s.log_density.log_p) - log_p).abs() < 1e-5 * (1.0 + radius));
        assert_eq!(s.score, -s.log_density.log_p_normal);
        assert_eq!(s.log_density.score(ScoreKind::NegLogDensity), -s.log_density.log_p);
    }
}

/// The verdict compares the file's kind of score with the threshold.
#[test]
fn the_verdict_is_taken_on_the_files_score() {
    let mut h = header(
        1,
        false,
        vec![Stage::Cnf(cnf(1, &[], &[LayerKind::Ignore], Activation::Identity, 1.0))],
        Solver::Rk4 { steps: 64 },
    );
    // −log N(z) at x = 1 is about 2.28, −log p about 1.78: a threshold of 2.0
    // is between the two.
    h.threshold = Some(Threshold { score: 2.0, quantile: 0.99 });
    for (kind, verdict) in
        [(ScoreKind::NegLogDensity, Verdict::Normal), (ScoreKind::LatentRadius, Verdict::Anomaly)]
    {
        h.score = kind;
        let bytes = encode_model(&h, &[0.5, 0.0]);
        let model = Model::from_bytes(&bytes).unwrap();
        let flow = Flow::new(&model, model.default_solver()).unwrap();
        let mut scratch = vec![0.0; flow.scratch_len()];
        assert_eq!(flow.score(&[1.0], &mut scratch).unwrap().verdict, verdict, "{kind:?}");
    }
}

fn random_model(dim: u16, kind: ScoreKind, kde: bool, solver: Solver, seed: u64) -> Vec<u8> {
    let mut stages = vec![
        Stage::Affine,
        Stage::Cnf(cnf(dim, &[16, 16], &[LayerKind::ConcatSquash; 3], Activation::Tanh, 0.5)),
    ];
    if kde {
        stages.push(Stage::KdeBase(ffjord_runtime::KdeSpec {
            centres: 5,
            bandwidth: 0.4,
            normal_weight: 0.2,
        }));
    }
    let mut h = header(dim, true, stages, solver);
    h.score = kind;
    encode_model(&h, &random_weights(&h, &mut rng(seed)))
}

/// `score`, `score_batch` and `score_packed` give one score per row for
/// every kind: the batch bit for bit, the packed kernel to rounding (1e-4
/// relative), with blocks of fixed steps and with the Dopri5 stream, with
/// and without a kernel density base (which the radius ignores and the
/// latent-base score is).
#[test]
fn every_path_scores_the_files_kind() {
    let dopri =
        Solver::Dopri5(Dopri5 { rtol: 1e-5, atol: 1e-5, max_steps: 10_000, min_step: 0.0, first_step: None });
    let d = 4;
    let mut r = rng(3);
    let xs: Vec<f32> = (0..23 * d).map(|_| uniform(&mut r, 2.0)).collect();
    for kde in [false, true] {
        if kde && !cfg!(feature = "kde") {
            continue;
        }
        for solver in [Solver::Rk4 { steps: 6 }, dopri] {
            for kind in [ScoreKind::NegLogDensity, ScoreKind::LatentRadius, ScoreKind::LatentBase] {
                let bytes = random_model(d as u16, kind, kde, solver, 11);
                let model = Model::from_bytes(&bytes).unwrap();
                let flow = Flow::new(&model, solver).unwrap();
                let mut scratch = vec![0.0; flow.scratch_len()];
                let one: Vec<f32> =
                    xs.chunks(d).map(|x| flow.score(x, &mut scratch).unwrap().score).collect();
                let expected: Vec<f32> = xs
                    .chunks(d)
                    .map(|x| {
                        let ld = flow.log_density(x, &mut scratch).unwrap();
                        match kind {
                            ScoreKind::NegLogDensity => -ld.log_p,
                            ScoreKind::LatentRadius => -ld.log_p_normal,
                            ScoreKind::LatentBase => -ld.log_p_base,
                        }
                    })
                    .collect();
                assert_eq!(one, expected);
                let mut batch = vec![0.0; one.len()];
                flow.score_batch(&xs, &mut batch, &mut scratch).unwrap();
                assert_eq!(batch, one);
                for per_block in [1, 5, 64] {
                    let mut packed = vec![0.0; one.len()];
                    let mut packed_scratch = vec![0.0; flow.packed_scratch_len(per_block)];
                    flow.score_packed(&xs, &mut packed, per_block, &mut packed_scratch).unwrap();
                    for (p, o) in packed.iter().zip(&one) {
                        assert!(
                            (p - o).abs() <= 1e-4 * (1.0 + o.abs()),
                            "{kind:?} kde {kde} {solver:?}: {p} vs {o}"
                        );
                    }
                }
                // With a KDE base, log p_base is not the radius's log N(z).
                if kde {
                    let x = &xs[..d];
                    let ld = flow.log_density(x, &mut scratch).unwrap();
                    assert_ne!(ld.log_p_base, ld.log_p_normal);
                }
            }
        }
    }
}
