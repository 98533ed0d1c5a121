//! Decoding: golden bytes pin the encoding; random, truncated, bit-flipped and
//! hostile (valid-CRC) blobs all return a typed error and never panic.

mod common;

use common::*;
use ffjord_runtime::format::{FORMAT_VERSION, crc32, encode, encoded_len};
use ffjord_runtime::{Activation, Field, LayerKind, LoadError, Model, Solver, Stage};
use proptest::prelude::*;

/// A hand-made model: D = 1, one `ignore` layer `f(z) = 0.5 z`, RK4 with 2 steps.
fn tiny() -> (ffjord_runtime::Header<'static>, Vec<f32>) {
    let mut h = header(
        1,
        false,
        vec![Stage::Cnf(cnf(1, &[], &[LayerKind::Ignore], Activation::Identity, 1.0))],
        Solver::Rk4 { steps: 2 },
    );
    h.metadata = ffjord_runtime::Metadata { name: "g", description: "", command: "" };
    (h, vec![0.5, 0.0])
}

/// Derived by hand from FORMAT.md (the CRC from zlib.crc32 of the first 36 bytes).
const GOLDEN: [u8; 40] = [
    b'F', b'F', b'J', b'D', 0x01, 0x00, // magic, version 1
    0x01, // dim = 1
    0x00, // standardize = false
    0x01, // 1 stage
    0x00, // Stage::Cnf
    0x01, 0x00, 0x01, // 1 layer: Ignore, out_dim 1
    0x00, // Activation::Identity
    0x00, 0x00, 0x80, 0x3F, // end_time = 1.0
    0x02, 0x02, // Solver::Rk4 { steps: 2 }
    0x00, // threshold: None
    0x01, b'g', 0x00, 0x00, // metadata "g", "", ""
    0x00, 0x00, 0x00, // padding to 28
    0x00, 0x00, 0x00, 0x3F, 0x00, 0x00, 0x00, 0x00, // weights 0.5, 0.0
    0xB3, 0xCE, 0x88, 0x87, // CRC32
];

#[test]
fn golden_bytes_pin_the_encoding() {
    let (h, w) = tiny();
    let bytes = encode_model(&h, &w);
    assert_eq!(bytes, GOLDEN, "{bytes:02X?}");
    let model = Model::from_bytes(&GOLDEN).unwrap();
    let v = model.header();
    assert_eq!(
        (v.dim, v.standardize, v.solver, v.threshold, v.metadata),
        (h.dim, h.standardize, h.solver, h.threshold, h.metadata)
    );
    assert_eq!(v.stages().collect::<Vec<_>>(), h.stages.to_vec());
    assert_eq!(model.weight_count(), 2);
    // f(z) = z/2 over T = 1: log p(x) = log N(e^{1/2} x) + 1/2, exact for RK4 up to its error.
    let flow = ffjord_runtime::Flow::new(&model, Solver::Rk4 { steps: 64 }).unwrap();
    let mut scratch = vec![0.0; flow.scratch_len()];
    let got = flow.log_density(&[0.7], &mut scratch).unwrap().log_p as f64;
    let z = 0.7 * 0.5f64.exp();
    let expected = -0.5 * (2.0 * std::f64::consts::PI).ln() - 0.5 * z * z + 0.5;
    assert!((got - expected).abs() < 1e-5, "{got} vs {expected}");
}

#[test]
fn every_truncation_is_rejected() {
    let bytes = GOLDEN.to_vec();
    for n in 0..bytes.len() {
        assert!(Model::from_bytes(&bytes[..n]).is_err(), "prefix of {n} bytes accepted");
    }
    assert!(matches!(Model::from_bytes(&bytes[..3]), Err(LoadError::Truncated { .. })));
    // Once the header is whole, its layout says how long the file must be:
    // "truncated: N of 40 bytes", not a checksum mismatch.
    for n in 28..bytes.len() {
        assert_eq!(
            Model::from_bytes(&bytes[..n]).unwrap_err(),
            LoadError::Truncated { len: n as u32, needed: 40 }
        );
    }
}

#[test]
fn typed_errors_for_magic_version_and_crc() {
    let mut b = GOLDEN.to_vec();
    b[0] = b'X';
    assert_eq!(Model::from_bytes(&b).unwrap_err(), LoadError::BadMagic);
    let mut b = GOLDEN.to_vec();
    b[4] = 9;
    assert_eq!(
        Model::from_bytes(&b).unwrap_err(),
        LoadError::UnsupportedVersion { found: 9, supported: FORMAT_VERSION }
    );
    let mut b = GOLDEN.to_vec();
    b[4] = 0;
    reseal(&mut b);
    assert_eq!(
        Model::from_bytes(&b).unwrap_err(),
        LoadError::UnsupportedVersion { found: 0, supported: FORMAT_VERSION }
    );
    let mut b = GOLDEN.to_vec();
    b[30] ^= 0x10;
    assert!(matches!(Model::from_bytes(&b), Err(LoadError::ChecksumMismatch { .. })));
}

/// Re-seals a mutated file with a correct CRC so validation past it is exercised.
fn reseal(b: &mut [u8]) {
    let n = b.len() - 4;
    let crc = crc32(&b[..n]);
    b[n..].copy_from_slice(&crc.to_le_bytes());
}

/// Files are written at the oldest version that holds them: without a
/// `Linear` stage version 1 (what older runtimes read), with one version 2; a
/// version-1 file that claims a `Linear` stage is rejected.
#[test]
fn version_follows_the_stages() {
    assert_eq!(u16::from_le_bytes([GOLDEN[4], GOLDEN[5]]), 1);
    let stages = vec![Stage::Linear, Stage::Cnf(cnf(2, &[4], &[LayerKind::Concat], Activation::Tanh, 1.0))];
    let h = header(2, false, stages, Solver::Rk4 { steps: 2 });
    let w = random_weights(&h, &mut rng(3));
    let mut b = encode_model(&h, &w);
    assert_eq!(u16::from_le_bytes([b[4], b[5]]), 2);
    assert!(Model::from_bytes(&b).is_ok());
    b[4] = 1;
    reseal(&mut b);
    assert_eq!(Model::from_bytes(&b).unwrap_err(), LoadError::InvalidField(Field::StageVersion));
}

#[test]
fn hostile_headers_with_valid_crc_are_rejected_by_field() {
    // Non-finite weight.
    let mut b = GOLDEN.to_vec();
    b[28..32].copy_from_slice(&f32::NAN.to_le_bytes());
    reseal(&mut b);
    assert_eq!(Model::from_bytes(&b).unwrap_err(), LoadError::NonFiniteWeight { index: 0 });
    // Negative end time.
    let mut b = GOLDEN.to_vec();
    b[14..18].copy_from_slice(&(-1.0f32).to_le_bytes());
    reseal(&mut b);
    assert_eq!(Model::from_bytes(&b).unwrap_err(), LoadError::InvalidField(Field::EndTime));
    // Zero RK4 steps.
    let mut b = GOLDEN.to_vec();
    b[19] = 0;
    reseal(&mut b);
    assert_eq!(Model::from_bytes(&b).unwrap_err(), LoadError::InvalidField(Field::Solver));
    // RK4 steps above the ceiling (a hostile u32::MAX): the varint grows, so
    // the file is laid out again around the new header.
    for steps in [ffjord_runtime::solver::MAX_STEPS + 1, u32::MAX] {
        let (mut h, w) = tiny();
        h.solver = Solver::Rk4 { steps };
        let mut buf = [0u8; 256];
        let header = postcard::to_slice(&h, &mut buf).unwrap();
        let mut b = b"FFJD\x01\x00".to_vec();
        b.extend(&*header);
        b.resize(b.len().next_multiple_of(4), 0);
        b.extend(w.iter().flat_map(|v| v.to_le_bytes()));
        b.extend([0; 4]);
        reseal(&mut b);
        assert_eq!(Model::from_bytes(&b).unwrap_err(), LoadError::InvalidField(Field::Solver), "{steps}");
    }
    // Last layer width ≠ dim.
    let mut b = GOLDEN.to_vec();
    b[12] = 2;
    reseal(&mut b);
    assert!(matches!(Model::from_bytes(&b), Err(LoadError::ShapeMismatch { expected: 1, found: 2, .. })));
    // Non-zero padding.
    let mut b = GOLDEN.to_vec();
    b[26] = 1;
    reseal(&mut b);
    assert_eq!(Model::from_bytes(&b).unwrap_err(), LoadError::BadPadding);
    // A weight too many.
    let mut b = GOLDEN[..36].to_vec();
    b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
    reseal(&mut b);
    assert_eq!(Model::from_bytes(&b).unwrap_err(), LoadError::WeightCount { expected: 2, found: 3 });
    // Headers that declare huge models but ship two weights.
    for (width, expect_size_error) in [(65535u16, true), (20000, false)] {
        let mut big = tiny().0;
        big.stages[0] = Stage::Cnf(cnf(1, &[width, width], &[LayerKind::Concat], Activation::Tanh, 1.0));
        let mut buf = vec![0u8; 256];
        let hlen = postcard::to_slice(&big, &mut buf).unwrap().len();
        let mut b = GOLDEN[..6].to_vec();
        b.extend_from_slice(&buf[..hlen]);
        while !b.len().is_multiple_of(4) {
            b.push(0);
        }
        b.extend_from_slice(&[0; 12]);
        reseal(&mut b);
        let e = Model::from_bytes(&b).unwrap_err();
        if expect_size_error {
            assert_eq!(e, LoadError::InvalidField(Field::Size));
        } else {
            assert!(matches!(e, LoadError::WeightCount { found: 2, .. }), "{e:?}");
        }
    }
}

#[test]
fn encoder_refuses_what_the_loader_would_refuse() {
    let (h, w) = tiny();
    let mut out = vec![0u8; 64];
    assert!(encode(&h, &w[..1], &mut out).is_err());
    assert!(encode(&h, &[f32::INFINITY, 0.0], &mut out).is_err());
    assert!(encode(&h, &w, &mut out[..10]).is_err());
    let mut no_cnf = h.clone();
    no_cnf.stages.clear();
    assert!(encoded_len(&no_cnf).is_err());
}

fn realistic() -> Vec<u8> {
    let h = header(
        6,
        true,
        vec![
            Stage::Cnf(cnf(6, &[16, 16], &[LayerKind::ConcatSquash], Activation::Tanh, 0.5)),
            Stage::Affine,
            Stage::Cnf(cnf(6, &[16], &[LayerKind::Concat], Activation::Softplus, 1.0)),
        ],
        Solver::default(),
    );
    let w = random_weights(&h, &mut rng(77));
    encode_model(&h, &w)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Model::from_bytes(&bytes);
        let mut with_magic = b"FFJD\x01\x00".to_vec();
        with_magic.extend_from_slice(&bytes);
        let _ = Model::from_bytes(&with_magic);
        reseal_if_possible(&mut with_magic);
        let _ = Model::from_bytes(&with_magic);
    }

    #[test]
    fn bit_flips_are_detected(pos in 0usize..10_000, bit in 0u8..8) {
        let mut b = realistic();
        let pos = pos % b.len();
        b[pos] ^= 1 << bit;
        prop_assert!(Model::from_bytes(&b).is_err());
    }

    #[test]
    fn resealed_mutations_never_panic_and_loaded_models_evaluate(
        edits in proptest::collection::vec((0usize..10_000, any::<u8>()), 1..6),
        cut in 0usize..64,
    ) {
        let mut b = realistic();
        for (pos, val) in edits {
            let n = b.len() - 4;
            b[pos % n] = val;
        }
        let keep = b.len().saturating_sub(cut).max(4);
        b.truncate(keep);
        reseal_if_possible(&mut b);
        if let Ok(model) = Model::from_bytes(&b) {
            // Whatever loads must evaluate to a value or a typed error, without panicking.
            let solver = Solver::Dopri5(ffjord_runtime::Dopri5 { max_steps: 200, ..Default::default() });
            let flow = ffjord_runtime::Flow::new(&model, solver).unwrap();
            let mut scratch = vec![0.0; flow.scratch_len()];
            let x = vec![0.5; model.dim()];
            let _ = flow.log_density(&x, &mut scratch);
        }
    }
}

fn reseal_if_possible(b: &mut [u8]) {
    if b.len() >= 4 {
        reseal(b);
    }
}

#[test]
fn misaligned_bytes_load_and_evaluate_identically() {
    let bytes = realistic();
    let model = Model::from_bytes(&bytes).unwrap();
    let flow = ffjord_runtime::Flow::new(&model, Solver::Rk4 { steps: 4 }).unwrap();
    let mut scratch = vec![0.0; flow.scratch_len()];
    let x = [0.1f32, -0.2, 0.3, 0.4, -0.5, 0.6];
    let expected = flow.log_density(&x, &mut scratch).unwrap();
    for shift in 1..4 {
        let mut buf = vec![0u8; bytes.len() + shift];
        buf[shift..].copy_from_slice(&bytes);
        let m = Model::from_bytes(&buf[shift..]).unwrap();
        let f = ffjord_runtime::Flow::new(&m, Solver::Rk4 { steps: 4 }).unwrap();
        assert_eq!(f.log_density(&x, &mut scratch).unwrap(), expected, "offset {shift}");
    }
}

/// The error loading committed model `name` (under `models/`), after
/// checking that its file declares format `version`.
#[cfg(not(all(feature = "images", feature = "kde")))]
fn committed_model_error(name: &str, version: u16) -> LoadError {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models").join(name);
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(u16::from_le_bytes([bytes[4], bytes[5]]), version, "{name}");
    Model::from_bytes(&bytes).unwrap_err()
}

/// Without feature `images`, a version-4 file (the committed image model) is
/// refused with the reason, not as a malformed header.
#[cfg(not(feature = "images"))]
#[test]
fn without_the_feature_image_models_are_refused_with_the_reason() {
    let e = committed_model_error("mnist-8x8/model.ffjd", 4);
    assert_eq!(e, LoadError::InvalidField(Field::ImageStage));
}

/// Without feature `kde`, a file that ends in a kernel density base (the
/// committed cardio model, format version 6: it is also scored by the latent
/// radius) is refused with the reason, not as a malformed header.
#[cfg(not(feature = "kde"))]
#[test]
fn without_the_feature_kde_base_models_are_refused_with_the_reason() {
    let e = committed_model_error("cardio/model.ffjd", 6);
    assert_eq!(e, LoadError::InvalidField(Field::KdeBase));
    assert!(e.to_string().contains("feature `kde`"), "{e}");
}
