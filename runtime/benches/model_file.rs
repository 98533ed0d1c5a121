//! Exact log-density of a model file on given rows, one thread: µs per row
//! one at a time, rows per second over all of them one at a time
//! (`log_density_batch`), and rows per second with the packed kernel
//! (`log_density_packed`) at several block sizes; wall and CPU time. Prints
//! one JSON line.
//!
//! `cargo bench -p ffjord-runtime --bench model_file -- MODEL ROWS.csv [TOL]`
//! (ROWS.csv: a header, then D values per line; extra columns are ignored).
//! `bench/runtime_speed.sh` runs it next to torch + torchdiffeq.

use std::hint::black_box;
use std::time::Instant;

fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0);
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

use ffjord_runtime::{Dopri5, Flow, Model, Solver};

fn main() {
    let args: Vec<String> = std::env::args().filter(|a| a != "--bench").collect();
    let (Some(model_path), Some(rows_path)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: model_file MODEL ROWS.csv [TOL]");
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
    let flow =
        Flow::new(&model, Solver::Dopri5(Dopri5 { max_steps: 100_000, ..Dopri5::with_tolerance(tol) }))
            .expect("solver");
    let mut scratch = vec![0.0; flow.scratch_len()];
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
    // All rows, one at a time.
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    let mut out = vec![0.0f32; rows.len()];
    let (t1, c1) = (Instant::now(), thread_cpu_seconds());
    let stats = flow.log_density_batch(&flat, &mut out, &mut scratch).expect("log p");
    let (all_s, all_cpu) = (t1.elapsed().as_secs_f64(), thread_cpu_seconds() - c1);
    let one = out.clone();
    // All rows, packed blocks.
    let mut packed = Vec::new();
    for per_block in [8usize, 16, 32, 64] {
        let mut scratch = vec![0.0; flow.packed_scratch_len(per_block)];
        let (t, c) = (Instant::now(), thread_cpu_seconds());
        let s = flow.log_density_packed(&flat, &mut out, per_block, &mut scratch).expect("log p");
        let (wall, cpu) = (t.elapsed().as_secs_f64(), thread_cpu_seconds() - c);
        let max_diff = out.iter().zip(&one).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        packed.push(format!(
            "{{\"rows_per_block\": {per_block}, \"rows_per_s\": {:.1}, \"rows_per_cpu_s\": {:.1}, \"mean_nfe\": {:.1}, \"max_abs_diff\": {max_diff:.2e}}}",
            rows.len() as f64 / wall,
            rows.len() as f64 / cpu,
            f64::from(s.nfe) / rows.len() as f64
        ));
    }
    println!(
        "{{\"impl\": \"ffjord-runtime (f32)\", \"rows\": {}, \"single_us\": {single_us:.2}, \"rows_per_s\": {:.1}, \"rows_per_cpu_s\": {:.1}, \"mean_nfe\": {:.1}, \"packed\": [{}]}}",
        rows.len(),
        rows.len() as f64 / all_s,
        rows.len() as f64 / all_cpu,
        f64::from(stats.nfe) / rows.len() as f64,
        packed.join(", ")
    );
}
