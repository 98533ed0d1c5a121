//! Exact log-density of a model file on given rows, one thread. Measures:
//! µs per row one at a time; rows per second over all rows one at a time
//! (`log_density_batch`) and with the packed kernel (`log_density_packed`)
//! at several block sizes, in wall and CPU time (fastest of three passes); each path's largest error
//! against a tight one-row reference (Dopri5 1e-7); and the arithmetic rate
//! reached next to this machine's multiply-add ceiling for the same build
//! (the kernel's register block over L1-resident data, nothing else), i.e.
//! the fraction of the FLOP floor `NFE × (D + 1) lanes × net multiply-adds`. Prints one JSON
//! line; with a fifth argument also writes the reference log p per row there.
//!
//! `cargo bench -p ffjord-runtime --bench model_file -- MODEL ROWS.csv [TOL] [REF_OUT.csv]`
//! (ROWS.csv: a header, then D values per line; extra columns are ignored).
//! `bench/runtime_speed.sh` runs it next to torch + torchdiffeq.

use std::hint::black_box;
use std::time::Instant;

use ffjord_runtime::{Dopri5, Flow, Model, Solver};

fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0);
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// GFLOP/s of the packed kernel's ideal inner loop for this build: a 4 × 8
/// register block of `acc += w · x` over 256 L1-resident `x` rows (no
/// activations, no solver) — the rate the FLOP floor could be done at.
fn multiply_add_ceiling() -> f64 {
    let x: Vec<[f32; 8]> =
        (0..256).map(|k| core::array::from_fn(|j| 1.0 + (k * 8 + j) as f32 * 1e-4)).collect();
    let w: Vec<[f32; 4]> = (0..256).map(|k| core::array::from_fn(|i| 1e-3 * (k + i) as f32)).collect();
    let (x, w) = (black_box(x), black_box(w));
    let reps = 40_000u64;
    // The fastest of five runs (noise only ever adds time).
    let mut cpu = f64::INFINITY;
    for _ in 0..5 {
        let c0 = thread_cpu_seconds();
        for _ in 0..reps {
            let mut acc = [[0.0f32; 8]; 4];
            for (xk, wk) in x.iter().zip(&w) {
                for (a, &wi) in acc.iter_mut().zip(wk) {
                    for (aj, xj) in a.iter_mut().zip(xk) {
                        *aj += wi * xj;
                    }
                }
            }
            black_box(acc);
        }
        cpu = cpu.min(thread_cpu_seconds() - c0);
    }
    (reps * 256 * 4 * 8 * 2) as f64 / cpu * 1e-9
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn main() {
    let args: Vec<String> = std::env::args().filter(|a| a != "--bench").collect();
    let (Some(model_path), Some(rows_path)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: model_file MODEL ROWS.csv [TOL] [REF_OUT.csv]");
        return;
    };
    let tol: f32 = args.get(3).map_or(1e-5, |t| t.parse().expect("tolerance"));
    let bytes = std::fs::read(model_path).expect("model file");
    let model = Model::from_bytes(&bytes).expect("valid model");
    let d = model.dim();
    let rows: Vec<Vec<f32>> = std::fs::read_to_string(rows_path)
        .expect("rows")
        .lines()
        .skip(1)
        .map(|l| l.split(',').take(d).map(|v| v.trim().parse().expect("number")).collect())
        .collect();
    let n = rows.len();
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    let dopri = |tol: f32| Solver::Dopri5(Dopri5 { max_steps: 100_000, ..Dopri5::with_tolerance(tol) });
    let flow = Flow::new(&model, dopri(tol)).expect("solver");
    let mut scratch = vec![0.0; flow.scratch_len()];

    // Tight one-row reference.
    let tight = Flow::new(&model, dopri(1e-7)).expect("solver");
    let mut reference = vec![0.0f32; n];
    tight.log_density_batch(&flat, &mut reference, &mut scratch).expect("reference log p");
    if let Some(path) = args.get(4) {
        let text: String = reference.iter().map(|v| format!("{v}\n")).collect();
        std::fs::write(path, format!("log_p\n{text}")).expect("writing the reference");
    }

    // One at a time: the first 200 rows, repeated for about half a second.
    let single: Vec<&Vec<f32>> = rows.iter().take(200).collect();
    let (mut calls, t0) = (0u64, Instant::now());
    while t0.elapsed().as_secs_f64() < 0.5 {
        for x in &single {
            black_box(flow.log_density(black_box(x), &mut scratch).expect("log p"));
        }
        calls += single.len() as u64;
    }
    let single_us = t0.elapsed().as_secs_f64() / calls as f64 * 1e6;

    let flops_per_nfe = model.flops_per_evaluation() as f64;
    let entry = |label: String, wall: f64, cpu: f64, nfe: u32, out: &[f32]| {
        let mean_nfe = f64::from(nfe) / n as f64;
        format!(
            "{{\"path\": \"{label}\", \"rows_per_s\": {:.1}, \"rows_per_cpu_s\": {:.1}, \"mean_nfe\": {mean_nfe:.1}, \"gflops_cpu\": {:.2}, \"max_abs_err\": {:.2e}}}",
            n as f64 / wall,
            n as f64 / cpu,
            flops_per_nfe * f64::from(nfe) / cpu * 1e-9,
            max_abs_diff(out, &reference)
        )
    };
    let mut paths = Vec::new();
    // Each pass over all rows runs three times; the fastest counts (the
    // machines are shared, and noise only ever adds time).
    let best_of_3 = |run: &mut dyn FnMut() -> u32| {
        let (mut wall, mut cpu, mut nfe) = (f64::INFINITY, f64::INFINITY, 0);
        for _ in 0..3 {
            let (t, c) = (Instant::now(), thread_cpu_seconds());
            nfe = run();
            wall = wall.min(t.elapsed().as_secs_f64());
            cpu = cpu.min(thread_cpu_seconds() - c);
        }
        (wall, cpu, nfe)
    };
    // All rows, one at a time.
    let mut out = vec![0.0f32; n];
    let (wall, cpu, nfe) =
        best_of_3(&mut || flow.log_density_batch(&flat, &mut out, &mut scratch).expect("log p").nfe);
    paths.push(entry("one row at a time".into(), wall, cpu, nfe, &out));
    // All rows, packed.
    for per_block in [8usize, 16, 32, 64] {
        let mut scratch = vec![0.0; flow.packed_scratch_len(per_block)];
        let (wall, cpu, nfe) = best_of_3(&mut || {
            flow.log_density_packed(&flat, &mut out, per_block, &mut scratch).expect("log p").nfe
        });
        paths.push(entry(format!("packed, {per_block} rows at a time"), wall, cpu, nfe, &out));
    }
    // The instruction set this binary was compiled for (the kernel has no
    // run-time dispatch): `RUSTFLAGS="-C target-cpu=native"` enables AVX2.
    let build = if cfg!(target_feature = "avx2") { "AVX2 build" } else { "baseline build" };
    println!(
        "{{\"impl\": \"ffjord-runtime (f32, {build})\", \"rows\": {n}, \"single_us\": {single_us:.2}, \"flops_per_nfe\": {flops_per_nfe}, \"ceiling_gflops\": {:.2}, \"paths\": [{}]}}",
        multiply_add_ceiling(),
        paths.join(", ")
    );
}
