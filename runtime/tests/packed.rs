//! The packed throughput path (`Flow::log_density_packed`) against the
//! one-row path and a tight reference: same values with fixed steps, each
//! row's own adaptive steps, and typed errors.

mod common;

use common::*;
use ffjord_runtime::{Activation, BatchError, Dopri5, Flow, LayerKind, Model, SolveError, Solver, Stage};

fn model_bytes(dim: u16, kinds: &[LayerKind], act: Activation, blocks: usize, seed: u64) -> Vec<u8> {
    let mut stages = Vec::new();
    for b in 0..blocks {
        if b > 0 {
            stages.push(Stage::Affine);
        }
        stages.push(Stage::Cnf(cnf(dim, &[32, 20, 24], kinds, act, 0.5)));
    }
    let h = header(dim, true, stages, Solver::default());
    encode_model(&h, &random_weights(&h, &mut rng(seed)))
}

fn rows(dim: usize, n: usize, seed: u64) -> Vec<f32> {
    let mut r = rng(seed);
    (0..n * dim).map(|_| uniform(&mut r, 2.0)).collect()
}

fn one_at_a_time(flow: &Flow<'_, '_>, xs: &[f32]) -> (Vec<f32>, u32) {
    let n = xs.len() / flow.model().dim();
    let mut out = vec![0.0; n];
    let mut scratch = vec![0.0; flow.scratch_len()];
    let stats = flow.log_density_batch(xs, &mut out, &mut scratch).unwrap();
    (out, stats.nfe)
}

fn packed(flow: &Flow<'_, '_>, xs: &[f32], per_block: usize) -> (Vec<f32>, u32) {
    let n = xs.len() / flow.model().dim();
    let mut out = vec![0.0; n];
    let mut scratch = vec![0.0; flow.packed_scratch_len(per_block)];
    let stats = flow.log_density_packed(xs, &mut out, per_block, &mut scratch).unwrap();
    (out, stats.nfe)
}

/// Packed Dopri5 against the one-row path: total NFE within 1% (rounding can
/// flip a borderline accept/reject), values within 1e-4 relative.
fn assert_packed_matches_one_row(flow: &Flow<'_, '_>, xs: &[f32], per_block: usize) {
    let (single, nfe_single) = one_at_a_time(flow, xs);
    let (many, nfe_many) = packed(flow, xs, per_block);
    assert!((f64::from(nfe_many) / f64::from(nfe_single) - 1.0).abs() <= 0.01, "{nfe_many} vs {nfe_single}");
    for (a, s) in many.iter().zip(&single) {
        assert!((a - s).abs() <= 1e-4 * (1.0 + s.abs()), "packed {a}, one-row {s}");
    }
}

/// With fixed steps both paths do the same arithmetic up to the summation
/// order of the matrix products: 2e-5 relative (f32, a 3-layer net, 8 RK4
/// steps, two blocks). Covers every layer kind, activations, D from 1 to 16
/// and block sizes that leave partial and padded blocks.
#[test]
fn fixed_steps_agree_with_the_one_row_path() {
    let kinds_list: [&[LayerKind]; 3] =
        [&[LayerKind::ConcatSquash], &[LayerKind::Concat], &[LayerKind::Ignore, LayerKind::Concat]];
    let acts = [Activation::Tanh, Activation::Softplus, Activation::Swish { beta: 0.8 }];
    let mut case = 0;
    for dim in [1u16, 2, 6, 16] {
        for kinds in kinds_list {
            for act in acts {
                case += 1;
                let bytes = model_bytes(dim, kinds, act, 1 + (case % 2) as usize, case);
                let model = Model::from_bytes(&bytes).unwrap();
                let flow = Flow::new(&model, Solver::Rk4 { steps: 8 }).unwrap();
                let xs = rows(dim as usize, 37, 100 + case);
                let (single, nfe_single) = one_at_a_time(&flow, &xs);
                for per_block in [1, 8, 13, 64] {
                    let (many, nfe_many) = packed(&flow, &xs, per_block);
                    assert_eq!(nfe_many, nfe_single, "fixed steps: same NFE per row");
                    for (r, (a, b)) in many.iter().zip(&single).enumerate() {
                        assert!(
                            (a - b).abs() <= 2e-5 * (1.0 + b.abs()),
                            "D={dim} {kinds:?} {act:?} block {per_block} row {r}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }
}

/// Dopri5 keeps one controller per row, so packed rows take the steps they
/// take alone: the NFE totals agree (to 1%: the kernel rounds differently,
/// which can flip a borderline accept/reject), every value is within 1e-4
/// nats of the one-row path, and both are within 2e-4 nats of a tight
/// reference (Dopri5 1e-7) at rtol = atol = 1e-5. One CNF block or two (an
/// affine stage between), D = 2, 6, 16, full, partial and single-row blocks.
#[test]
fn adaptive_rows_take_their_own_steps() {
    // One CNF stage streams rows through the slots; two go block by block.
    for (dim, seed, blocks) in [(2u16, 1u64, 1), (2, 4, 2), (6, 2, 1), (6, 5, 2), (16, 3, 1)] {
        let bytes = model_bytes(dim, &[LayerKind::ConcatSquash], Activation::Tanh, blocks, seed);
        let model = Model::from_bytes(&bytes).unwrap();
        let tight = Flow::new(&model, Solver::Dopri5(Dopri5 { rtol: 1e-7, atol: 1e-7, ..Dopri5::default() }))
            .unwrap();
        let flow = Flow::new(&model, Solver::Dopri5(Dopri5::with_tolerance(1e-5))).unwrap();
        let xs = rows(dim as usize, 50, 10 + seed);
        let (reference, _) = one_at_a_time(&tight, &xs);
        let (single, nfe_single) = one_at_a_time(&flow, &xs);
        for per_block in [1, 16, 64] {
            let (many, nfe_many) = packed(&flow, &xs, per_block);
            let ratio = f64::from(nfe_many) / f64::from(nfe_single);
            assert!((ratio - 1.0).abs() <= 0.01, "D={dim} block {per_block}: NFE {nfe_many} vs {nfe_single}");
            for (r, ((a, s), want)) in many.iter().zip(&single).zip(&reference).enumerate() {
                assert!((a - s).abs() <= 1e-4, "D={dim} block {per_block} row {r}: packed {a}, one-row {s}");
                assert!((a - want).abs() <= 2e-4, "D={dim} row {r}: packed {a}, reference {want}");
                assert!((s - want).abs() <= 2e-4, "D={dim} row {r}: one-row {s}, reference {want}");
            }
        }
    }
}

/// Affine stages before and after a single CNF block are applied as rows
/// enter and leave the streaming slots.
#[test]
fn streaming_applies_the_stages_around_the_cnf() {
    let stages = vec![
        Stage::Affine,
        Stage::Cnf(cnf(4, &[16, 16], &[LayerKind::ConcatSquash], Activation::Tanh, 0.7)),
        Stage::Affine,
    ];
    let h = header(4, true, stages, Solver::default());
    let bytes = encode_model(&h, &random_weights(&h, &mut rng(21)));
    let model = Model::from_bytes(&bytes).unwrap();
    let flow = Flow::new(&model, Solver::Dopri5(Dopri5::with_tolerance(1e-5))).unwrap();
    let xs = rows(4, 100, 22);
    assert_packed_matches_one_row(&flow, &xs, 8);
}

/// The concat layer's time column and other activations with per-row times.
#[test]
fn adaptive_rows_with_concat_layers_and_softplus() {
    let bytes = model_bytes(3, &[LayerKind::Concat], Activation::Softplus, 1, 9);
    let model = Model::from_bytes(&bytes).unwrap();
    let flow = Flow::new(&model, Solver::Dopri5(Dopri5::with_tolerance(1e-6))).unwrap();
    let xs = rows(3, 40, 12);
    assert_packed_matches_one_row(&flow, &xs, 13);
}

#[test]
fn bad_batches_are_typed_errors() {
    let bytes = model_bytes(2, &[LayerKind::ConcatSquash], Activation::Tanh, 1, 3);
    let model = Model::from_bytes(&bytes).unwrap();
    let flow = Flow::new(&model, Solver::Rk4 { steps: 2 }).unwrap();
    let mut scratch = vec![0.0; flow.packed_scratch_len(8)];
    let mut out = vec![0.0; 3];
    let err = flow.log_density_packed(&[0.0; 5], &mut out, 8, &mut scratch).unwrap_err();
    assert_eq!(err.error, SolveError::InputDimension { expected: 2, found: 1 });
    let err = flow.log_density_packed(&[0.0; 4], &mut out, 8, &mut scratch).unwrap_err();
    assert_eq!(err.error, SolveError::OutputLength { expected: 2, found: 3 });
    let mut out = vec![0.0; 3];
    let err = flow.log_density_packed(&[0.0; 6], &mut out, 0, &mut scratch).unwrap_err();
    assert_eq!(err.error, SolveError::InvalidBlockSize);
    let err = flow.log_density_packed(&[0.0; 6], &mut out, 16, &mut scratch).unwrap_err();
    assert!(matches!(err.error, SolveError::ScratchTooSmall { .. }), "{err:?}");
    // Bad input names its own row.
    let mut xs = rows(2, 20, 4);
    xs[21] = f32::NAN;
    let mut out = vec![0.0; 20];
    let err = flow.log_density_packed(&xs, &mut out, 8, &mut scratch).unwrap_err();
    assert!(matches!(err, BatchError { row: 10, error: SolveError::NonFiniteInput { index: 1 } }), "{err:?}");
    // The same on the streaming path (one CNF, Dopri5: the default for
    // batches and the WASM page), for NaN and both infinities.
    let dopri = Flow::new(&model, Solver::Dopri5(Dopri5::with_tolerance(1e-5))).unwrap();
    let mut scratch = vec![0.0; dopri.packed_scratch_len(8)];
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut xs = rows(2, 20, 5);
        xs[26] = bad;
        let err = dopri.log_density_packed(&xs, &mut out, 8, &mut scratch).unwrap_err();
        assert_eq!(err, BatchError { row: 13, error: SolveError::NonFiniteInput { index: 0 } }, "{bad}");
    }
}
