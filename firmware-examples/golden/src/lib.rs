//! Generates `golden.rs` for a firmware example at build time: the model
//! bytes, a table of input rows (normal and anomalous), and the values the
//! device must reproduce — log p, NFE and verdict per solver, and seeded
//! samples — all computed on the host by the same `ffjord-runtime`.
//! Nothing here is typed by hand.

use std::fmt::Write as _;
use std::path::Path;

use ffjord_runtime::{Dopri5, Flow, Model, Solver, Verdict};
use rand_xoshiro::Xoshiro128PlusPlus;
use rand_xoshiro::rand_core::SeedableRng;

/// The solvers every example runs, by name.
pub fn solvers() -> Vec<(&'static str, Solver)> {
    vec![
        ("rk4-4", Solver::Rk4 { steps: 4 }),
        ("rk4-8", Solver::Rk4 { steps: 8 }),
        ("rk4-16", Solver::Rk4 { steps: 16 }),
        ("dopri5-1e-5", Solver::Dopri5(Dopri5::with_tolerance(1e-5))),
    ]
}

/// Seeds of the on-device sampling check.
pub const SAMPLE_SEEDS: [u64; 3] = [1, 2, 3];

fn solver_expr(s: &Solver) -> String {
    match s {
        Solver::Rk4 { steps } => format!("Solver::Rk4 {{ steps: {steps} }}"),
        Solver::Dopri5(d) => format!(
            "Solver::Dopri5(Dopri5 {{ rtol: {:?}, atol: {:?}, max_steps: {}, min_step: {:?}, first_step: None }})",
            d.rtol, d.atol, d.max_steps, d.min_step
        ),
        other => panic!("unsupported solver in golden tables: {other:?}"),
    }
}

/// Rows for a 2-D 8gaussians model: 12 draws from the data distribution
/// (seeded) and 4 points the model should flag (centre hole and far out).
pub fn eight_gaussians_rows() -> Vec<(Vec<f32>, bool)> {
    let mut rng = Xoshiro128PlusPlus::seed_from_u64(2026);
    let s = std::f32::consts::FRAC_1_SQRT_2;
    let centres = [(1.0, 0.0), (-1.0, 0.0), (0.0, 1.0), (0.0, -1.0), (s, s), (s, -s), (-s, s), (-s, -s)];
    let mut rows = Vec::new();
    for i in 0..12 {
        let mut n = [0.0f32; 2];
        ffjord_runtime::fill_standard_normal(&mut rng, &mut n);
        let (cx, cy) = centres[i % 8];
        rows.push((vec![(4.0 * cx + 0.5 * n[0]) / 1.414, (4.0 * cy + 0.5 * n[1]) / 1.414], false));
    }
    for p in [[0.0f32, 0.0], [0.3, -0.2], [5.5, 5.5], [-6.0, 1.0]] {
        rows.push((p.to_vec(), true));
    }
    rows
}

/// Rows from a CSV file with a header whose last column is a 0/1 `anomaly`
/// label (e.g. `models/shuttle/golden-rows.csv`: real rows of the test split).
pub fn rows_from_csv(path: &Path) -> Vec<(Vec<f32>, bool)> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default();
    assert!(header.ends_with("anomaly"), "{}: the last column must be `anomaly`", path.display());
    lines
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            let mut v: Vec<f32> = l
                .split(',')
                .map(|x| {
                    x.trim()
                        .parse()
                        .unwrap_or_else(|_| panic!("{}:{}: not a number: {x}", path.display(), i + 2))
                })
                .collect();
            let label = v.pop().expect("a label column") == 1.0;
            (v, label)
        })
        .collect()
}

/// The model and rows an example embeds: `FFJORD_MODEL` and `FFJORD_ROWS`
/// (a labelled CSV) when set, else the 2-D 8gaussians demo model and its rows.
pub fn write_for_example(manifest_dir: &Path, out_dir: &Path) {
    println!("cargo:rerun-if-env-changed=FFJORD_MODEL");
    println!("cargo:rerun-if-env-changed=FFJORD_ROWS");
    for var in ["FFJORD_SOLVERS", "FFJORD_SAMPLES", "FFJORD_LANES_PER_PASS"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let model = std::env::var("FFJORD_MODEL")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| manifest_dir.join("../../models/8gaussians-mcu/model.ffjd"));
    println!("cargo:rerun-if-changed={}", model.display());
    let rows = match std::env::var("FFJORD_ROWS") {
        Ok(p) => {
            println!("cargo:rerun-if-changed={p}");
            rows_from_csv(Path::new(&p))
        }
        Err(_) => eight_gaussians_rows(),
    };
    write(&model, &rows, out_dir);
}

/// The whole build script of a firmware example: golden tables into
/// `OUT_DIR`, and the crate's `memory.x` on the linker path — or the file
/// `FFJORD_MEMORY_X` names (a bigger memory map, to measure models that do
/// not fit the example's budget; `m4f-table.sh`).
pub fn example_build_script() {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let manifest = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    write_for_example(&manifest, &out);
    let memory = match std::env::var("FFJORD_MEMORY_X") {
        Ok(path) => std::path::PathBuf::from(path),
        Err(_) => manifest.join("memory.x"),
    };
    std::fs::copy(&memory, out.join("memory.x")).unwrap_or_else(|e| panic!("{}: {e}", memory.display()));
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rerun-if-changed={}", memory.display());
    println!("cargo:rerun-if-env-changed=FFJORD_MEMORY_X");
}

/// Writes `out_dir/golden.rs` for `model_path` and `rows`. The file expects
/// `Solver`, `Dopri5`, `Expected` and `Golden` in scope.
pub fn write(model_path: &Path, rows: &[(Vec<f32>, bool)], out_dir: &Path) {
    let bytes = std::fs::read(model_path).unwrap_or_else(|e| panic!("reading {}: {e}", model_path.display()));
    let model = Model::from_bytes(&bytes).unwrap_or_else(|e| panic!("{}: {e}", model_path.display()));
    let d = model.dim();
    // Large models (images) check fewer solvers and samples: FFJORD_SOLVERS
    // names them (comma-separated), FFJORD_SAMPLES counts the seeds, and
    // FFJORD_LANES_PER_PASS bounds an image model's trace lanes (its RAM).
    let mut solvers = solvers();
    if let Ok(names) = std::env::var("FFJORD_SOLVERS") {
        let names: Vec<&str> = names.split(',').map(str::trim).collect();
        solvers.retain(|(n, _)| names.contains(n));
        assert!(!solvers.is_empty(), "FFJORD_SOLVERS={names:?} names none of the solvers");
    }
    let samples =
        std::env::var("FFJORD_SAMPLES").map_or(SAMPLE_SEEDS.len(), |v| v.parse().expect("FFJORD_SAMPLES"));
    let seeds = &SAMPLE_SEEDS[..samples.min(SAMPLE_SEEDS.len())];
    let lanes: u16 =
        std::env::var("FFJORD_LANES_PER_PASS").map_or(0, |v| v.parse().expect("FFJORD_LANES_PER_PASS"));
    let trace = ffjord_runtime::ImageTrace::Exact { lanes_per_pass: lanes };
    let flow_for =
        |solver: Solver| Flow::new(&model, solver).and_then(|f| f.with_image_trace(trace)).expect("solver");
    let mut s = String::new();
    let abs = model_path.canonicalize().expect("model path");
    writeln!(s, "// Generated by ffjord-golden from {}; do not edit.", abs.display()).unwrap();
    writeln!(s, "pub const DIM: usize = {d};").unwrap();
    // 4-aligned, so that the runtime reads the weights as f32 (one `vldr` each
    // on the Cortex-M4F instead of an unaligned `ldr` and a `vmov`).
    writeln!(s, "#[repr(C, align(4))]\nstruct Aligned<T: ?Sized>(T);").unwrap();
    writeln!(
        s,
        "static ALIGNED: &Aligned<[u8]> = &Aligned(*include_bytes!({:?}));",
        abs.display().to_string()
    )
    .unwrap();
    writeln!(s, "pub static MODEL: &[u8] = &ALIGNED.0;").unwrap();
    writeln!(s, "pub static ROWS: [[f32; {d}]; {}] = [", rows.len()).unwrap();
    for (r, _) in rows {
        let vals: Vec<String> = r.iter().map(|v| format!("{v:?}")).collect();
        writeln!(s, "    [{}],", vals.join(", ")).unwrap();
    }
    writeln!(s, "];").unwrap();
    let labels: Vec<String> = rows.iter().map(|(_, a)| a.to_string()).collect();
    writeln!(s, "pub static ANOMALOUS: [bool; {}] = [{}];", rows.len(), labels.join(", ")).unwrap();
    writeln!(s, "pub static SOLVERS: [(&str, Solver); {}] = [", solvers.len()).unwrap();
    for (name, solver) in &solvers {
        writeln!(s, "    ({name:?}, {}),", solver_expr(solver)).unwrap();
    }
    writeln!(s, "];").unwrap();
    writeln!(s, "pub static EXPECTED: [&[Expected]; {}] = [", solvers.len()).unwrap();
    let mut flops = Vec::new();
    for (_, solver) in &solvers {
        let flow = flow_for(*solver);
        let mut scratch = vec![0.0; flow.scratch_len()];
        writeln!(s, "    &[").unwrap();
        let mut total_nfe = 0u64;
        for (r, _) in rows {
            let score = flow.score(r, &mut scratch).expect("host score");
            let anomaly = score.verdict == Verdict::Anomaly;
            total_nfe += u64::from(score.log_density.stats.nfe);
            writeln!(
                s,
                "        Expected {{ log_p: {:?}, nfe: {}, anomaly: {anomaly} }},",
                score.log_density.log_p, score.log_density.stats.nfe
            )
            .unwrap();
        }
        writeln!(s, "    ],").unwrap();
        flops.push(model.flops_per_evaluation() * total_nfe / rows.len() as u64);
    }
    writeln!(s, "];").unwrap();
    let fl: Vec<String> = flops.iter().map(|f| f.to_string()).collect();
    writeln!(s, "/// Mean mat-vec FLOPs of one log-density per solver (host-computed).").unwrap();
    writeln!(s, "pub static FLOPS: [u64; {}] = [{}];", flops.len(), fl.join(", ")).unwrap();
    // Seeded samples with the model's default solver.
    let flow = flow_for(model.default_solver());
    let mut scratch = vec![0.0; flow.scratch_len()];
    writeln!(s, "pub static SAMPLE_SEEDS: [u64; {}] = {:?};", seeds.len(), seeds).unwrap();
    writeln!(s, "pub static EXPECTED_SAMPLES: [([f32; {d}], f32); {}] = [", seeds.len()).unwrap();
    for &seed in seeds {
        let mut rng = Xoshiro128PlusPlus::seed_from_u64(seed);
        let mut x = vec![0.0f32; d];
        let smp = flow.sample(&mut rng, &mut x, &mut scratch).expect("host sample");
        let vals: Vec<String> = x.iter().map(|v| format!("{v:?}")).collect();
        writeln!(s, "    ([{}], {:?}),", vals.join(", "), smp.log_p).unwrap();
    }
    writeln!(s, "];").unwrap();
    let needed = solvers
        .iter()
        .map(|(_, so)| model.scratch_len_with(so, trace))
        .max()
        .unwrap_or(0)
        .max(flow.scratch_len());
    writeln!(s, "pub const SCRATCH: usize = {needed};").unwrap();
    writeln!(
        s,
        "pub static GOLDEN: Golden<'static, DIM> = Golden {{ model: MODEL, rows: &ROWS, solvers: &SOLVERS, expected: &EXPECTED, sample_seeds: &SAMPLE_SEEDS, expected_samples: &EXPECTED_SAMPLES, flops: &FLOPS, image_lanes_per_pass: {lanes} }};"
    )
    .unwrap();
    std::fs::write(out_dir.join("golden.rs"), s).expect("writing golden.rs");
}
