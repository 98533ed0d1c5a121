//! Format version 3: CNF matrices stored as f16 or i8. A quantized file must
//! score, sample and run the packed path to the bit like the f32 file that
//! holds its dequantized weights (the runtime widens each stored value to the
//! f32 it stands for and computes exactly as for an f32 file); old files keep
//! their version; bad stored values are rejected. Without feature
//! `quantized` such files are refused with the reason.

mod common;

use common::*;
use ffjord_runtime::{
    Activation, Dopri5, Flow, Header, LayerKind, LoadError, MatrixEncoding, Model, Solver, Stage,
};

/// A chain with two CNF stages (concat and concatsquash layers, widths that
/// leave partial words) and an affine stage between them.
fn chain(dim: u16, matrices: MatrixEncoding) -> Header<'static> {
    // 40 wide: the next layer widens its rows in two passes.
    let mut a = cnf(dim, &[7, 40], &[LayerKind::ConcatSquash], Activation::Tanh, 0.7);
    let mut b = cnf(dim, &[9], &[LayerKind::Concat, LayerKind::Ignore], Activation::Softplus, 0.5);
    a.matrices = matrices;
    b.matrices = matrices;
    let solver = Solver::Dopri5(Dopri5::with_tolerance(1e-5));
    header(dim, true, vec![Stage::Cnf(a), Stage::Affine, Stage::Cnf(b)], solver)
}

/// `weights` with every CNF matrix replaced by the values `matrices` stores,
/// widened back to f32 — computed here from the public conversions, in
/// FORMAT.md's order.
#[cfg(feature = "quantized")]
fn dequantized(h: &Header<'_>, weights: &[f32], matrices: MatrixEncoding) -> Vec<f32> {
    use ffjord_runtime::quant::{f16_to_f32, f32_to_f16, i8_quantize, i8_scale};
    let d = h.dim as usize;
    let mut out = Vec::new();
    let mut at = 0;
    let copy = |n: usize, at: &mut usize, out: &mut Vec<f32>| {
        out.extend_from_slice(&weights[*at..*at + n]);
        *at += n;
    };
    if h.standardize {
        copy(2 * d, &mut at, &mut out);
    }
    for stage in &h.stages {
        match stage {
            Stage::Affine => copy(2 * d, &mut at, &mut out),
            Stage::Linear
            | Stage::Logit { .. }
            | Stage::Squeeze(_)
            | Stage::ConvCnf(_)
            | Stage::KdeBase(_) => {
                unreachable!()
            }
            Stage::Cnf(c) => {
                let mut d_in = d;
                for l in &c.layers {
                    let d_out = l.out_dim as usize;
                    let cols = l.kind.cols(d_in).unwrap();
                    let matrix = &weights[at..at + d_out * cols];
                    for row in matrix.chunks(cols) {
                        let scale = i8_scale(row);
                        out.extend(row.iter().map(|&w| match matrices {
                            MatrixEncoding::F32 => w,
                            MatrixEncoding::F16 => f16_to_f32(f32_to_f16(w)),
                            MatrixEncoding::I8 => scale * f32::from(i8_quantize(w, scale)),
                        }));
                    }
                    at += d_out * cols;
                    copy(l.kind.weight_count(d_in, d_out).unwrap() - d_out * cols, &mut at, &mut out);
                    d_in = d_out;
                }
            }
        }
    }
    assert_eq!(at, weights.len());
    out
}

#[cfg(feature = "quantized")]
#[test]
fn quantized_files_compute_exactly_like_their_dequantized_weights() {
    for dim in [2u16, 3, 5] {
        for matrices in [MatrixEncoding::F16, MatrixEncoding::I8] {
            let mut r = rng(u64::from(dim) * 7 + matrices as u64);
            let hq = chain(dim, matrices);
            let hf = chain(dim, MatrixEncoding::F32);
            let w = random_weights(&hf, &mut r);
            let bytes_q = encode_model(&hq, &w);
            let bytes_f = encode_model(&hf, &dequantized(&hf, &w, matrices));
            let bytes_orig = encode_model(&hf, &w);
            assert_eq!(u16::from_le_bytes([bytes_q[4], bytes_q[5]]), 3, "quantized files are version 3");
            assert_eq!(u16::from_le_bytes([bytes_f[4], bytes_f[5]]), 1, "f32 files keep version 1");
            assert!(
                bytes_q.len() < bytes_f.len(),
                "{matrices:?}: {} vs {} bytes",
                bytes_q.len(),
                bytes_f.len()
            );
            let (mq, mf, mo) = (
                Model::from_bytes(&bytes_q).unwrap(),
                Model::from_bytes(&bytes_f).unwrap(),
                Model::from_bytes(&bytes_orig).unwrap(),
            );
            assert_eq!(mq.weight_count(), mf.weight_count());
            assert!(mq.weight_bytes() < mf.weight_bytes());
            for solver in [mq.default_solver(), Solver::Rk4 { steps: 6 }] {
                let (fq, ff, fo) = (
                    Flow::new(&mq, solver).unwrap(),
                    Flow::new(&mf, solver).unwrap(),
                    Flow::new(&mo, solver).unwrap(),
                );
                let mut s = vec![0.0; fq.scratch_len()];
                let rows: Vec<f32> = (0..8 * dim as usize).map(|_| uniform(&mut r, 2.0)).collect();
                for x in rows.chunks(dim as usize) {
                    let (a, b) = (fq.log_density(x, &mut s).unwrap(), ff.log_density(x, &mut s).unwrap());
                    assert_eq!(
                        a.log_p.to_bits(),
                        b.log_p.to_bits(),
                        "{matrices:?} {solver}: {} vs {}",
                        a.log_p,
                        b.log_p
                    );
                    assert_eq!(a.stats, b.stats);
                    // And close to the unquantized model (a loose sanity bound:
                    // the table in trainer/README.md has the measured errors).
                    let o = fo.log_density(x, &mut s).unwrap().log_p;
                    let tol = if matrices == MatrixEncoding::F16 { 0.01 } else { 0.2 };
                    assert!((a.log_p - o).abs() < tol, "{matrices:?}: {} vs f32 {}", a.log_p, o);
                }
                // The packed path and sampling, too.
                let n = rows.len() / dim as usize;
                let (mut pq, mut pf) = (vec![0.0; n], vec![0.0; n]);
                let mut ps = vec![0.0; fq.packed_scratch_len(4)];
                fq.log_density_packed(&rows, &mut pq, 4, &mut ps).unwrap();
                ff.log_density_packed(&rows, &mut pf, 4, &mut ps).unwrap();
                assert_eq!(
                    pq.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    pf.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                );
                let (mut xq, mut xf) = (vec![0.0; dim as usize], vec![0.0; dim as usize]);
                use rand_xoshiro::Xoshiro128PlusPlus;
                use rand_xoshiro::rand_core::SeedableRng;
                fq.sample(&mut Xoshiro128PlusPlus::seed_from_u64(5), &mut xq, &mut s).unwrap();
                ff.sample(&mut Xoshiro128PlusPlus::seed_from_u64(5), &mut xf, &mut s).unwrap();
                assert_eq!(xq, xf);
            }
        }
    }
}

#[cfg(feature = "quantized")]
#[test]
fn a_quantized_file_is_its_json_weights_requantized() {
    // Encoding the widened values again gives the same bytes: f16 values are
    // representable, i8 rows keep their scale (max |s·q| = 127 s).
    for matrices in [MatrixEncoding::F16, MatrixEncoding::I8] {
        let h = chain(3, matrices);
        let w = random_weights(&chain(3, MatrixEncoding::F32), &mut rng(11));
        let first = encode_model(&h, &w);
        let again = encode_model(&h, &dequantized(&h, &w, matrices));
        assert_eq!(first, again, "{matrices:?}");
    }
}

#[cfg(feature = "quantized")]
#[test]
fn bad_stored_values_and_versions_are_rejected() {
    let h = chain(2, MatrixEncoding::F16);
    let w = random_weights(&chain(2, MatrixEncoding::F32), &mut rng(3));
    let good = encode_model(&h, &w);
    let model = Model::from_bytes(&good).unwrap();
    // The weight section ends before the CRC; its first CNF matrix starts
    // right after standardization (4 words).
    let matrix_start = |bytes: &[u8], m: &Model<'_>| bytes.len() - 4 - m.weight_bytes() + 4 * 4;
    let start = matrix_start(&good, &model);
    let mut inf = good.clone();
    inf[start + 2..start + 4].copy_from_slice(&0x7c00u16.to_le_bytes()); // value 1: +inf
    reseal(&mut inf);
    assert_eq!(Model::from_bytes(&inf).unwrap_err(), LoadError::NonFiniteWeight { index: 4 });
    // i8: a NaN row scale.
    let hi = chain(2, MatrixEncoding::I8);
    let mut nan = encode_model(&hi, &w);
    let start = matrix_start(&nan, &Model::from_bytes(&nan).unwrap());
    nan[start..start + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    reseal(&mut nan);
    assert_eq!(Model::from_bytes(&nan).unwrap_err(), LoadError::NonFiniteWeight { index: 4 });
    // A version-3 stage in a file that says version 2.
    let mut old = good.clone();
    old[4] = 2;
    reseal(&mut old);
    assert!(matches!(Model::from_bytes(&old), Err(LoadError::InvalidField(_))));
    // Without image stages a quantized file is written as version 3.
    assert_eq!(u16::from_le_bytes([good[4], good[5]]), 3);
}

#[cfg(not(feature = "quantized"))]
#[test]
fn without_the_feature_quantized_files_are_refused_with_the_reason() {
    use ffjord_runtime::Field;
    let w = random_weights(&chain(2, MatrixEncoding::F32), &mut rng(3));
    // The writer refuses them too (the same validation).
    let h = chain(2, MatrixEncoding::I8);
    let mut out = vec![0u8; 1 << 16];
    assert!(ffjord_runtime::format::encode(&h, &w, &mut out).is_err());
    // A version-3 file (the committed i8 model) is refused at load.
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/shuttle/model.i8.ffjd");
    let bytes = std::fs::read(path).unwrap();
    let e = Model::from_bytes(&bytes).unwrap_err();
    assert_eq!(e, LoadError::InvalidField(Field::MatrixEncoding));
    assert!(e.to_string().contains("need feature `quantized`"), "{e}");
    // f32 files still load and score.
    let bytes = encode_model(&chain(2, MatrixEncoding::F32), &w);
    let model = Model::from_bytes(&bytes).unwrap();
    let flow = Flow::new(&model, model.default_solver()).unwrap();
    let mut s = vec![0.0; flow.scratch_len()];
    assert!(flow.log_density(&[0.1, -0.2], &mut s).unwrap().log_p.is_finite());
}

#[cfg(feature = "quantized")]
fn reseal(b: &mut [u8]) {
    let n = b.len() - 4;
    let crc = ffjord_runtime::format::crc32(&b[..n]);
    b[n..].copy_from_slice(&crc.to_le_bytes());
}
