//! The row path's gate cache (`CnfBlock::with_gate_cache`) changes no bit:
//! `Flow::log_density` equals an integration of the uncached block, and a
//! scratch buffer that last held another model's or another stage's gates
//! (at the same times) gives the same result as a fresh one.

mod common;

use common::*;
use ffjord_runtime::math::standard_normal_log_prob;
use ffjord_runtime::{Activation, Dopri5, Flow, LayerKind, Model, Solver, Stage};

const SOLVERS: [Solver; 3] = [
    Solver::Rk4 { steps: 8 },
    Solver::Midpoint { steps: 5 },
    Solver::Dopri5(Dopri5 { rtol: 1e-5, atol: 1e-5, max_steps: 10_000, min_step: 0.0, first_step: None }),
];

/// A concatsquash model with `blocks` CNF stages (Affine between them).
fn model_bytes(dim: u16, blocks: usize, solver: Solver, seed: u64) -> Vec<u8> {
    let mut stages = Vec::new();
    for b in 0..blocks {
        if b > 0 {
            stages.push(Stage::Affine);
        }
        stages.push(Stage::Cnf(cnf(dim, &[16, 16], &[LayerKind::ConcatSquash], Activation::Tanh, 0.5)));
    }
    let h = header(dim, false, stages, solver);
    encode_model(&h, &random_weights(&h, &mut rng(seed)))
}

fn points(dim: usize) -> Vec<Vec<f32>> {
    let mut r = rng(7);
    (0..6).map(|_| (0..dim).map(|_| uniform(&mut r, 2.0)).collect()).collect()
}

#[test]
fn cached_gates_give_the_uncached_blocks_bits() {
    for solver in SOLVERS {
        for dim in [2u16, 5] {
            let bytes = model_bytes(dim, 1, solver, u64::from(dim));
            let model = Model::from_bytes(&bytes).unwrap();
            let flow = Flow::new(&model, solver).unwrap();
            let mut scratch = vec![0.0; flow.scratch_len()];
            // The public block has no cache: every evaluation computes its gates.
            let block = model.cnf_block(0).unwrap();
            let d = usize::from(dim);
            for x in points(d) {
                let got = flow.log_density(&x, &mut scratch).unwrap();
                let mut y: Vec<f32> = x.iter().copied().chain([0.0]).collect();
                let mut work = vec![0.0; scratch.len()];
                let stats = solver.integrate(&block, 0.0, 0.5, &mut y, &mut work).unwrap();
                assert_eq!(got.stats, stats, "{solver}");
                assert_eq!(got.delta_log_p.to_bits(), y[d].to_bits(), "{solver}, D = {dim}");
                assert_eq!(got.log_p_base.to_bits(), standard_normal_log_prob(&y[..d]).to_bits());
            }
        }
    }
}

#[test]
fn a_scratch_with_other_gates_in_it_changes_nothing() {
    for solver in SOLVERS {
        // Same shapes and times, different weights: a stale gate would be
        // read at the same place and the same t.
        let (a, b) = (model_bytes(3, 2, solver, 1), model_bytes(3, 2, solver, 2));
        let (ma, mb) = (Model::from_bytes(&a).unwrap(), Model::from_bytes(&b).unwrap());
        let (fa, fb) = (Flow::new(&ma, solver).unwrap(), Flow::new(&mb, solver).unwrap());
        assert_eq!(fa.scratch_len(), fb.scratch_len());
        for x in points(3) {
            let mut fresh = vec![0.0; fb.scratch_len()];
            let want = fb.log_density(&x, &mut fresh).unwrap();
            let mut used = vec![0.0; fa.scratch_len()];
            fa.log_density(&x, &mut used).unwrap();
            let got = fb.log_density(&x, &mut used).unwrap();
            assert_eq!(got.log_p.to_bits(), want.log_p.to_bits(), "{solver}");
            // Sampling (the reverse direction, T → 0) after scoring.
            let mut z = x.clone();
            let mut z_fresh = x.clone();
            fa.log_density(&x, &mut used).unwrap();
            let s = fb.inverse(&mut z, &mut used).unwrap();
            let s_fresh = fb.inverse(&mut z_fresh, &mut vec![0.0; fb.scratch_len()]).unwrap();
            assert_eq!(s.log_p.to_bits(), s_fresh.log_p.to_bits(), "{solver}");
            assert_eq!(z, z_fresh);
        }
    }
}
