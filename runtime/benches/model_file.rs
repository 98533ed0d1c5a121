//! Exact log-density of a model file on given rows, one thread: µs per row
//! one at a time, and rows per second over all of them (the runtime has no
//! batched kernel: a batch is a loop over rows). Prints one JSON line.
//!
//! `cargo bench -p ffjord-runtime --bench model_file -- MODEL ROWS.csv [TOL]`
//! (ROWS.csv: a header, then D values per line; extra columns are ignored).
//! `bench/runtime_speed.sh` runs it next to torch + torchdiffeq.

use std::hint::black_box;
use std::time::Instant;

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
    // All rows.
    let mut nfe = 0u64;
    let t1 = Instant::now();
    for x in &rows {
        nfe += u64::from(flow.log_density(x, &mut scratch).expect("log p").stats.nfe);
    }
    let all_s = t1.elapsed().as_secs_f64();
    println!(
        "{{\"impl\": \"ffjord-runtime (f32)\", \"rows\": {}, \"single_us\": {single_us:.2}, \"rows_per_s\": {:.1}, \"mean_nfe\": {:.1}}}",
        rows.len(),
        rows.len() as f64 / all_s,
        nfe as f64 / rows.len() as f64
    );
}
