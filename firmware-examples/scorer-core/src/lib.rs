//! The program the QEMU firmware examples run, independent of the board:
//! score every golden row with every solver, compare log p (1e-5 relative),
//! NFE and verdict with the host's values, draw seeded samples and compare,
//! and report one line per result. Only integers are formatted (float
//! formatting would cost 8–10 KB of flash).
#![no_std]

pub mod stack;

use core::fmt::Write;

use ffjord_runtime::{Flow, Model, SolveError, Solver, Verdict};
use rand_xoshiro::Xoshiro128PlusPlus;
use rand_xoshiro::rand_core::SeedableRng;

/// What the host computed for one row and solver.
#[derive(Clone, Copy, Debug)]
pub struct Expected {
    pub log_p: f32,
    pub nfe: u32,
    pub anomaly: bool,
}

/// The board's output channel.
pub trait Console: Write {}
impl<W: Write> Console for W {}

/// Marks the start of one measured log-density (the instruction-counting
/// plugin starts counting when this function runs). Bodies differ so the
/// linker cannot fold the two.
#[inline(never)]
#[unsafe(no_mangle)]
pub extern "C" fn ffjord_mark_start(tag: u32) -> u32 {
    core::hint::black_box(tag).wrapping_add(1)
}

/// Marks the end of one measured log-density.
#[inline(never)]
#[unsafe(no_mangle)]
pub extern "C" fn ffjord_mark_end(tag: u32) -> u32 {
    core::hint::black_box(tag) ^ 0x5a5a_5a5a
}

/// `v` as a fixed-point decimal with six digits, using integer formatting only.
pub struct Fixed(pub f32);

impl core::fmt::Display for Fixed {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        if !self.0.is_finite() {
            return f.write_str("non-finite");
        }
        let micros = (self.0 as f64 * 1e6) as i64;
        let sign = if micros < 0 { "-" } else { "" };
        let m = micros.unsigned_abs();
        write!(f, "{sign}{}.{:06}", m / 1_000_000, m % 1_000_000)
    }
}

fn close(a: f32, b: f32, rel: f32) -> bool {
    (a - b).abs() <= rel * (1.0 + b.abs())
}

/// The generated tables of one example (see `ffjord-golden`).
pub struct Golden<'a, const D: usize> {
    pub model: &'a [u8],
    pub rows: &'a [[f32; D]],
    pub solvers: &'a [(&'a str, Solver)],
    /// `expected[solver][row]`.
    pub expected: &'a [&'a [Expected]],
    pub sample_seeds: &'a [u64],
    pub expected_samples: &'a [([f32; D], f32)],
    /// Mean mat-vec FLOPs of one log-density per solver (host-computed).
    pub flops: &'a [u64],
    /// Image models: tangent lanes per pass of the exact trace
    /// (`ImageTrace::Exact`; bounds the scratch), as the host computed the
    /// expected values; 0 for one pass.
    pub image_lanes_per_pass: u16,
}

/// A flow over `model` with `solver`, its image stages tracing in passes of
/// `lanes` tangent lanes (0: one pass).
fn flow_for<'m, 'a>(model: &'m Model<'a>, solver: Solver, lanes: u16) -> Result<Flow<'m, 'a>, SolveError> {
    let flow = Flow::new(model, solver)?;
    #[cfg(feature = "images")]
    if lanes > 0 {
        return flow.with_image_trace(ffjord_runtime::ImageTrace::Exact { lanes_per_pass: lanes });
    }
    let _ = lanes;
    Ok(flow)
}

/// Semihosting stdout as a `core::fmt::Write` (QEMU examples).
#[cfg(feature = "semihosting")]
pub struct Semihosting;

#[cfg(feature = "semihosting")]
impl Write for Semihosting {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        semihosting::print!("{s}");
        Ok(())
    }
}

#[cfg(feature = "semihosting")]
#[doc(hidden)]
pub use semihosting as __semihosting;

/// The `main` of a QEMU example: `scorer_core::qemu_main!(cortex_m_rt::entry);`
/// (or `riscv_rt::entry`) after `include!`-ing the generated golden values
/// (`DIM`, `SCRATCH`, `GOLDEN`). The runtime crate's linker script must put the
/// stack above all static data (`__sheap`) and below `_stack_start`, with no
/// heap — as cortex-m-rt and riscv-rt do.
#[cfg(feature = "semihosting")]
#[macro_export]
macro_rules! qemu_main {
    ($entry:path) => {
        unsafe extern "C" {
            static _stack_start: u32;
            static __sheap: u32;
        }

        #[$entry]
        fn main() -> ! {
            let (bottom, top) =
                (core::ptr::addr_of!(__sheap) as usize, core::ptr::addr_of!(_stack_start) as usize);
            // SAFETY: the runtime crate puts the stack above all static data
            // (`__sheap`) and below `_stack_start`; nothing uses a heap.
            let code = unsafe {
                $crate::firmware_main::<DIM, SCRATCH>(&mut $crate::Semihosting, &GOLDEN, bottom, top)
            };
            $crate::__semihosting::process::exit(code)
        }
    };
}

/// The whole firmware program: paint the stack, run the checks with `N` floats
/// of scratch on the stack, report the peak stack use, return the exit code.
///
/// # Safety
/// `stack_bottom..stack_top` must be the stack region (see [`stack::paint`]),
/// called once at the start of `main`.
pub unsafe fn firmware_main<const D: usize, const N: usize>(
    out: &mut impl Console,
    golden: &Golden<'_, D>,
    stack_bottom: usize,
    stack_top: usize,
) -> i32 {
    // SAFETY: forwarded from the caller.
    unsafe { stack::paint(stack_bottom) };
    let failures = work::<D, N>(out, golden);
    // SAFETY: forwarded from the caller.
    let peak = unsafe { stack::high_water(stack_bottom, stack_top) };
    let _ = writeln!(out, "peak stack = {peak} bytes, failures = {failures}");
    if failures == 0 { 0 } else { 1 }
}

#[inline(never)]
fn work<const D: usize, const N: usize>(out: &mut impl Console, g: &Golden<'_, D>) -> u32 {
    let mut scratch = [0.0f32; N];
    run(out, g, &mut scratch)
}

/// Everything one example checks. Returns the number of disagreements.
pub fn run<const D: usize>(out: &mut impl Console, g: &Golden<'_, D>, scratch: &mut [f32]) -> u32 {
    let (model_bytes, rows, solvers, expected, sample_seeds, expected_samples) =
        (g.model, g.rows, g.solvers, g.expected, g.sample_seeds, g.expected_samples);
    let model = match Model::from_bytes(model_bytes) {
        Ok(m) => m,
        Err(e) => {
            let _ = writeln!(out, "model rejected: {e}");
            return 1;
        }
    };
    let mut failures = 0;
    let _ = writeln!(
        out,
        "model '{}': D = {}, {} weights",
        model.metadata().name,
        model.dim(),
        model.weight_count()
    );
    for (name, flops) in solvers.iter().map(|(n, _)| n).zip(g.flops) {
        let _ = writeln!(out, "flops {name} {flops}");
    }
    for (s, ((name, solver), exp)) in solvers.iter().zip(expected).enumerate() {
        let flow = match flow_for(&model, *solver, g.image_lanes_per_pass) {
            Ok(f) => f,
            Err(e) => {
                let _ = writeln!(out, "{name}: {e}");
                failures += 1;
                continue;
            }
        };
        for (r, (x, e)) in rows.iter().zip(exp.iter()).enumerate() {
            let tag = (s as u32) << 16 | r as u32;
            ffjord_mark_start(tag);
            let result = flow.score(x, scratch);
            ffjord_mark_end(tag);
            match result {
                Ok(score) => {
                    let ld = score.log_density;
                    let anomaly = score.verdict == Verdict::Anomaly;
                    let ok = close(ld.log_p, e.log_p, 1e-5) && ld.stats.nfe == e.nfe && anomaly == e.anomaly;
                    if !ok {
                        failures += 1;
                    }
                    let _ = writeln!(
                        out,
                        "{name} row {r}: log p = {}, nfe = {}, verdict = {}, {}",
                        Fixed(ld.log_p),
                        ld.stats.nfe,
                        if anomaly { "anomaly" } else { "normal" },
                        if ok { "ok" } else { "MISMATCH" }
                    );
                    if !ok {
                        let _ = writeln!(
                            out,
                            "  host: log p = {}, nfe = {}, anomaly = {}",
                            Fixed(e.log_p),
                            e.nfe,
                            e.anomaly
                        );
                    }
                }
                Err(err) => {
                    failures += 1;
                    let _ = writeln!(out, "{name} row {r}: error: {err}");
                }
            }
        }
    }
    let flow = match flow_for(&model, model.default_solver(), g.image_lanes_per_pass) {
        Ok(f) => f,
        Err(_) => return failures + 1,
    };
    for (&seed, (xs, lp)) in sample_seeds.iter().zip(expected_samples) {
        let mut rng = Xoshiro128PlusPlus::seed_from_u64(seed);
        let mut x = [0.0f32; D];
        match flow.sample(&mut rng, &mut x, scratch) {
            Ok(s) => {
                let ok = x.iter().zip(xs).all(|(a, b)| close(*a, *b, 1e-5)) && close(s.log_p, *lp, 1e-5);
                if !ok {
                    failures += 1;
                }
                let _ = write!(out, "sample seed {seed}:");
                for v in x {
                    let _ = write!(out, " {}", Fixed(v));
                }
                let _ = writeln!(out, ", log p = {}, {}", Fixed(s.log_p), if ok { "ok" } else { "MISMATCH" });
            }
            Err(err) => {
                failures += 1;
                let _ = writeln!(out, "sample seed {seed}: error: {err}");
            }
        }
    }
    failures
}
