//! Structure-aware fuzzing of model loading and evaluation, seeded from the
//! committed models: each input is a committed model file with random
//! mutations (bit flips, byte writes, special floats written over weights,
//! truncation, insertion), its CRC resealed most of the time so the checks
//! after it are reached; whatever loads is evaluated on hostile rows by every
//! entry point (one row, score, packed, sample, inverse). Any panic is a
//! failure. Prints inputs, how many loaded, and the slowest input in CPU
//! seconds of this thread (wall time would count a machine shared with other
//! work).
//!
//! ```sh
//! cargo run --release -p ffjord-runtime --example fuzz -- --inputs 20000 --seed 1     # scripts/test
//! cargo run --release -p ffjord-runtime --example fuzz -- --seconds 3600 --seed 7     # a long run
//! cargo run --release -p ffjord-runtime --example fuzz -- --inputs 10000000 --seed 7 --threads 16
//! ```
//!
//! Deterministic for a given seed, input count and thread count (`--threads
//! N` splits the inputs over N workers on non-overlapping streams of the
//! seed; worker 0 is the one-thread run). Every 100,000 inputs a
//! progress line goes to stderr. Adaptive solves are capped
//! at `--max-steps` (default 2,000) steps per call so a pass has a known cost;
//! `--max-steps 0` keeps each model's own budget (at most the runtime's
//! ceiling), to look for slow calls.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

#[cfg(feature = "images")]
use ffjord_runtime::ImageTrace;
use ffjord_runtime::format::crc32;
use ffjord_runtime::{Flow, Model, Solver};
use rand_xoshiro::Xoshiro256PlusPlus;
use rand_xoshiro::rand_core::{Rng, SeedableRng};

/// Committed model files (folder/file under `models/`), f16 / i8 ones included.
const MODELS: [&str; 9] = [
    "8gaussians/model.ffjd",
    "8gaussians-mcu/model.ffjd",
    "8gaussians-mcu/model.i8.ffjd",
    "shuttle/model.ffjd",
    "shuttle/model.f16.ffjd",
    "satellite/model.ffjd",
    "cardio/model.ffjd",
    "power/model.ffjd",
    "mnist-8x8/model.ffjd",
];

struct Args {
    inputs: u64,
    seconds: Option<f64>,
    seed: u64,
    max_steps: u32,
    threads: u64,
}

fn args() -> Args {
    let mut a = Args { inputs: 10_000, seconds: None, seed: 1, max_steps: 2_000, threads: 1 };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    for pair in argv.chunks(2) {
        let value = pair.get(1).map(String::as_str).unwrap_or("");
        match pair[0].as_str() {
            "--inputs" => a.inputs = value.parse().expect("--inputs N"),
            "--seconds" => a.seconds = Some(value.parse().expect("--seconds S")),
            "--seed" => a.seed = value.parse().expect("--seed S"),
            "--max-steps" => a.max_steps = value.parse().expect("--max-steps N"),
            "--threads" => a.threads = value.parse().expect("--threads N"),
            other => panic!("unknown flag {other} (--inputs, --seconds, --seed, --max-steps, --threads)"),
        }
    }
    a
}

/// CPU time this thread has used.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec for the call's duration.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec.max(0) as u64, ts.tv_nsec.clamp(0, 999_999_999) as u32)
}

fn below(rng: &mut impl Rng, n: usize) -> usize {
    (rng.next_u64() % n.max(1) as u64) as usize
}

const SPECIAL: [f32; 9] =
    [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 1e30, -1e30, 1e-40, f32::MAX];

/// One to four random mutations of `bytes`, then (70%) a correct CRC.
fn mutate(bytes: &mut Vec<u8>, rng: &mut impl Rng) {
    for _ in 0..1 + below(rng, 4) {
        if bytes.is_empty() {
            break;
        }
        let at = below(rng, bytes.len());
        match below(rng, 6) {
            0 => bytes[at] ^= 1 << below(rng, 8),
            1 => bytes[at] = rng.next_u32() as u8,
            2 => {
                // A special float over an aligned word (weights are 4-aligned).
                let at = at & !3;
                if at + 4 <= bytes.len() {
                    bytes[at..at + 4].copy_from_slice(&SPECIAL[below(rng, SPECIAL.len())].to_le_bytes());
                }
            }
            3 => bytes.truncate(at),
            4 => bytes.insert(at, rng.next_u32() as u8),
            _ => {
                // A header byte (the first 64 hold sizes, kinds and the solver).
                let h = below(rng, bytes.len().min(64));
                bytes[h] = [0u8, 1, 2, 0x7F, 0x80, 0xFF][below(rng, 6)];
            }
        }
    }
    if bytes.len() >= 8 && below(rng, 10) < 7 {
        let n = bytes.len() - 4;
        let crc = crc32(&bytes[..n]);
        bytes[n..].copy_from_slice(&crc.to_le_bytes());
    }
}

/// The model's own solver, with adaptive budgets capped at `max_steps` (0:
/// uncapped); image models at 50 steps (an evaluation costs C·H·W lanes).
fn solver_for(model: &Model<'_>, max_steps: u32, rng: &mut impl Rng) -> Solver {
    let max_steps = if model.has_image_stages() { 50 } else { max_steps };
    match (model.default_solver(), below(rng, 4)) {
        (_, 0) => Solver::Rk4 { steps: 1 + below(rng, 8) as u32 },
        (Solver::Dopri5(mut d), _) if max_steps > 0 => {
            d.max_steps = d.max_steps.min(max_steps);
            Solver::Dopri5(d)
        }
        (s, _) => s,
    }
}

fn hostile_row(dim: usize, rng: &mut impl Rng) -> Vec<f32> {
    let scale = [1.0f32, 10.0, 1e3, 1e30][below(rng, 4)];
    (0..dim)
        .map(|_| {
            if below(rng, 50) == 0 {
                SPECIAL[below(rng, SPECIAL.len())]
            } else {
                ((rng.next_u32() >> 8) as f32 / 16_777_216.0 * 2.0 - 1.0) * scale
            }
        })
        .collect()
}

/// Loads and, if that succeeds, evaluates by every entry point. Errors are
/// fine; only a panic (caught by the caller) is a failure.
fn exercise(bytes: &[u8], max_steps: u32, rng: &mut Xoshiro256PlusPlus) -> bool {
    let Ok(model) = Model::from_bytes(bytes) else { return false };
    let d = model.dim();
    let Ok(flow) = Flow::new(&model, solver_for(&model, max_steps, rng)) else { return true };
    // Image models: both trace modes — mostly Hutchinson's (cheap), one in
    // eight the exact trace in passes of up to 16 lanes. (Without feature
    // `images` they do not load.)
    #[cfg(feature = "images")]
    let flow = if !model.has_image_stages() {
        flow
    } else {
        let trace = if below(rng, 8) == 0 {
            ImageTrace::Exact { lanes_per_pass: below(rng, 17) as u16 }
        } else {
            ImageTrace::Hutchinson { probes: 1 + below(rng, 3) as u16, seed: rng.next_u32() }
        };
        match flow.with_image_trace(trace) {
            Ok(f) => f,
            Err(_) => return true,
        }
    };
    let mut scratch = vec![0.0; flow.scratch_len()];
    let x = hostile_row(d, rng);
    let _ = flow.log_density(&x, &mut scratch);
    let _ = flow.score(&x, &mut scratch);
    let rows: Vec<f32> = (0..3).flat_map(|_| hostile_row(d, rng)).collect();
    let mut out = [0.0f32; 3];
    let mut packed = vec![0.0; flow.packed_scratch_len(2)];
    let _ = flow.log_density_packed(&rows, &mut out, 2, &mut packed);
    let mut sample = vec![0.0f32; d];
    let _ = flow.sample(rng, &mut sample, &mut scratch);
    let mut z = hostile_row(d, rng);
    let _ = flow.inverse(&mut z, &mut scratch);
    true
}

/// What one worker saw.
#[derive(Default)]
struct Totals {
    inputs: u64,
    loaded: u64,
    panics: u64,
    /// The slowest input's CPU time and its index within the worker.
    slowest: (Duration, u64),
}

/// One worker: `inputs` inputs (or until `seconds` have passed) from the
/// stream `rng`, reporting progress under `tag`.
fn run(corpus: &[Vec<u8>], a: &Args, mut rng: Xoshiro256PlusPlus, inputs: u64, tag: &str) -> Totals {
    let start = Instant::now();
    let mut t = Totals::default();
    loop {
        let done = match a.seconds {
            Some(s) => start.elapsed().as_secs_f64() >= s,
            None => t.inputs >= inputs,
        };
        if done {
            break;
        }
        let mut bytes = corpus[below(&mut rng, corpus.len())].clone();
        mutate(&mut bytes, &mut rng);
        let mut eval_rng = Xoshiro256PlusPlus::seed_from_u64(rng.next_u64());
        let t0 = thread_cpu_time();
        match catch_unwind(AssertUnwindSafe(|| exercise(&bytes, a.max_steps, &mut eval_rng))) {
            Ok(true) => t.loaded += 1,
            Ok(false) => {}
            Err(_) => {
                t.panics += 1;
                eprintln!("{tag}panic on input {} (seed {}): {} bytes", t.inputs, a.seed, bytes.len());
            }
        }
        let dt = thread_cpu_time().saturating_sub(t0);
        if dt > t.slowest.0 {
            t.slowest = (dt, t.inputs);
        }
        t.inputs += 1;
        // A long run reports as it goes, so a run stopped early still counts.
        if t.inputs % 100_000 == 0 {
            eprintln!(
                "{tag}{} inputs, {} loaded, {} panics, slowest {:.3} s CPU, {:.0} s",
                t.inputs,
                t.loaded,
                t.panics,
                t.slowest.0.as_secs_f64(),
                start.elapsed().as_secs_f64()
            );
        }
    }
    t
}

fn main() {
    let a = args();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
    let corpus: Vec<Vec<u8>> =
        MODELS.iter().map(|m| std::fs::read(root.join(m)).unwrap_or_else(|e| panic!("{m}: {e}"))).collect();
    std::panic::set_hook(Box::new(|_| {})); // panics are counted and reported below
    let start = Instant::now();
    // Worker k draws from the seed's stream jumped k times (2¹²⁸ apart, so
    // the workers never overlap); worker 0 is the one-thread run.
    let threads = a.threads.max(1);
    let mut streams = Vec::new();
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(a.seed);
    for _ in 0..threads {
        streams.push(rng.clone());
        rng.jump();
    }
    let all: Vec<Totals> = std::thread::scope(|scope| {
        let workers: Vec<_> = streams
            .into_iter()
            .enumerate()
            .map(|(k, stream)| {
                let (corpus, a) = (&corpus, &a);
                let share = a.inputs / threads + u64::from((k as u64) < a.inputs % threads);
                let tag = if threads > 1 { format!("[worker {k}] ") } else { String::new() };
                scope.spawn(move || run(corpus, a, stream, share, &tag))
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap_or_default()).collect()
    });
    let (inputs, loaded, panics) =
        all.iter().fold((0, 0, 0), |(i, l, p), t| (i + t.inputs, l + t.loaded, p + t.panics));
    let (k, slow) = all
        .iter()
        .enumerate()
        .max_by_key(|(_, t)| t.slowest.0)
        .map(|(k, t)| (k, t.slowest))
        .unwrap_or_default();
    println!(
        "fuzz seed {}, {threads} thread(s): {inputs} inputs, {loaded} loaded and evaluated, {panics} panics, slowest input {} of worker {k} ({:.3} s CPU), {:.1} s in all",
        a.seed,
        slow.1,
        slow.0.as_secs_f64(),
        start.elapsed().as_secs_f64()
    );
    if panics > 0 {
        std::process::exit(1);
    }
}
