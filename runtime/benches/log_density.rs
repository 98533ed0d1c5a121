//! Exact log-density cost on the host: µs per call (wall and CPU time of this
//! thread), NFE, and the arithmetic rate reached, one row at a time and
//! through the packed kernel (32 rows at a time), for D ∈ {2, 6, 16} with a
//! 3×64 concatsquash/tanh ODE net (one CNF block, T = 0.5, random weights in
//! PyTorch's default init range).
//!
//! Run: `cargo bench -p ffjord-runtime --bench log_density` (one thread).

#[path = "../tests/common/mod.rs"]
mod common;

use std::hint::black_box;
use std::time::Instant;

use common::*;
use ffjord_runtime::{Activation, Dopri5, Flow, LayerKind, Model, Solver, Stage};

fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0);
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    println!(
        "| D | solver | NFE | µs / log p (wall) | µs / log p (CPU) | µs / NFE | GFLOP/s | packed, 32 at a time: µs / log p (CPU) | GFLOP/s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for d in [2u16, 6, 16] {
        let h = header(
            d,
            false,
            vec![Stage::Cnf(cnf(d, &[64, 64, 64], &[LayerKind::ConcatSquash], Activation::Tanh, 0.5))],
            Solver::default(),
        );
        let bytes = encode_model(&h, &random_weights(&h, &mut rng(u64::from(d))));
        let model = Model::from_bytes(&bytes).expect("model");
        let points: Vec<Vec<f32>> = {
            let mut r = rng(99);
            (0..64).map(|_| (0..d).map(|_| uniform(&mut r, 2.0)).collect()).collect()
        };
        for (name, solver) in [
            ("RK4, 8 steps", Solver::Rk4 { steps: 8 }),
            ("Dopri5 1e-5", Solver::Dopri5(Dopri5::with_tolerance(1e-5))),
        ] {
            let flow = Flow::new(&model, solver).expect("solver");
            let mut scratch = vec![0.0; flow.scratch_len()];
            let mut nfe = 0u64;
            for x in &points {
                nfe += u64::from(flow.log_density(x, &mut scratch).expect("log p").stats.nfe);
            }
            // Repeat passes over the points until ~1 s (0.1 s with --quick).
            let budget = if quick { 0.1 } else { 1.0 };
            let (mut calls, t0, c0) = (0u64, Instant::now(), thread_cpu_seconds());
            while t0.elapsed().as_secs_f64() < budget {
                for x in &points {
                    black_box(flow.log_density(black_box(x), &mut scratch).expect("log p"));
                }
                calls += points.len() as u64;
            }
            let wall = t0.elapsed().as_secs_f64() / calls as f64;
            let cpu = (thread_cpu_seconds() - c0) / calls as f64;
            let mean_nfe = nfe as f64 / points.len() as f64;
            let flops = model.flops_per_evaluation() as f64 * mean_nfe;
            // The same points through the packed kernel, 32 rows at a time.
            let flat: Vec<f32> = points.iter().flatten().copied().collect();
            let mut out = vec![0.0f32; points.len()];
            let mut packed_scratch = vec![0.0; flow.packed_scratch_len(32)];
            let (mut packed_calls, mut packed_nfe, t1, c1) =
                (0u64, 0u64, Instant::now(), thread_cpu_seconds());
            while t1.elapsed().as_secs_f64() < budget {
                let s = flow
                    .log_density_packed(black_box(&flat), &mut out, 32, &mut packed_scratch)
                    .expect("log p");
                packed_nfe += u64::from(s.nfe);
                packed_calls += points.len() as u64;
            }
            let packed_cpu = (thread_cpu_seconds() - c1) / packed_calls as f64;
            let packed_flops = model.flops_per_evaluation() as f64 * packed_nfe as f64 / packed_calls as f64;
            println!(
                "| {d} | {name} | {mean_nfe:.1} | {:.1} | {:.1} | {:.2} | {:.2} | {:.1} | {:.2} |",
                wall * 1e6,
                cpu * 1e6,
                cpu * 1e6 / mean_nfe,
                flops / cpu * 1e-9,
                packed_cpu * 1e6,
                packed_flops / packed_cpu * 1e-9
            );
        }
    }
}
