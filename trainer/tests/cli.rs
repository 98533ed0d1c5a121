//! End-to-end tests of the `trainer` binary: train → export → the runtime
//! scores identically; bad input gets errors that name the problem; a killed
//! run resumes from its last checkpoint.

mod common;

use std::path::Path;
use std::process::Command;

use common::{number_after, trainer};

use ffjord_runtime::{Dopri5, Flow, Model, Solver};

fn ok(args: &[&str], dir: &Path) -> String {
    let out = trainer(args, dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "trainer {args:?} failed:\n{stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn err(args: &[&str], dir: &Path) -> String {
    let out = trainer(args, dir);
    assert!(!out.status.success(), "trainer {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn read_csv(path: &Path) -> Vec<Vec<f64>> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(|v| v.parse().unwrap()).collect())
        .collect()
}

/// Correlated 6-D data from a fixed linear map of a deterministic sequence.
fn write_6d(path: &Path, rows: usize) {
    let mut s = String::from("a,b,c,d,e,f\n");
    let mut state = 12345u64;
    let mut u = || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    };
    for _ in 0..rows {
        let g: Vec<f64> = (0..6).map(|_| u() + u() + u()).collect();
        let x = [g[0], g[0] * 0.8 + g[1], g[2] * 3.0 + 10.0, g[3] - g[2], g[4] * 0.1, g[5] + g[0] * g[0]];
        s += &x.iter().map(|v| format!("{v:.6}")).collect::<Vec<_>>().join(",");
        s.push('\n');
    }
    std::fs::write(path, s).unwrap();
}

/// Runtime (f32, Dopri5 1e-6) vs. trainer eval (tch float64, exact trace,
/// Dopri5 1e-8) on the same 200 rows: at most 1e-3 nats apart.
fn assert_parity(dir: &Path, model: &str, points: &str) {
    let model_name = model;
    ok(&["eval", "--model", model, "--data", points, "--tol", "1e-8", "--rows-out", "tch.csv"], dir);
    let tch: Vec<f64> = read_csv(&dir.join("tch.csv")).into_iter().map(|r| r[0]).collect();
    let bytes = std::fs::read(dir.join(model)).unwrap();
    let model = Model::from_bytes(&bytes).unwrap();
    let solver = Solver::Dopri5(Dopri5 { max_steps: 100_000, ..Dopri5::with_tolerance(1e-6) });
    let flow = Flow::new(&model, solver).unwrap();
    let mut scratch = vec![0.0; flow.scratch_len()];
    let rows = read_csv(&dir.join(points));
    assert_eq!(rows.len(), 200);
    let mut worst = 0.0f64;
    for (row, t) in rows.iter().zip(&tch) {
        let x: Vec<f32> = row.iter().map(|&v| v as f32).collect();
        let rt = flow.log_density(&x, &mut scratch).unwrap().log_p as f64;
        worst = worst.max((rt - t).abs());
    }
    assert!(worst <= 1e-3, "max |runtime − trainer| = {worst} nats");
    // One row at a time, the two Dopri5 implementations take the same steps
    // (same tableau, norm, controller, initial step and end-time clipping).
    let solver = Solver::Dopri5(Dopri5 { max_steps: 100_000, ..Dopri5::with_tolerance(1e-5) });
    let flow = Flow::new(&model, solver).unwrap();
    for (i, row) in rows.iter().take(3).enumerate() {
        let file = format!("row{i}.csv");
        let line: Vec<String> = row.iter().map(|v| v.to_string()).collect();
        std::fs::write(dir.join(&file), format!("{}\n", line.join(","))).unwrap();
        let printed = ok(&["eval", "--model", model_name, "--data", &file, "--tol", "1e-5"], dir);
        let tch_nfe: u32 =
            printed.rsplit("NFE ").next().unwrap().split_whitespace().next().unwrap().parse().unwrap();
        let x: Vec<f32> = row.iter().map(|&v| v as f32).collect();
        let rt_nfe = flow.log_density(&x, &mut scratch).unwrap().stats.nfe;
        assert_eq!(rt_nfe, tch_nfe, "row {i}: runtime NFE {rt_nfe}, trainer NFE {tch_nfe}");
    }
}

#[test]
fn trained_models_score_identically_in_runtime_and_trainer() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 2-D: briefly trained on 8gaussians.
    ok(
        &[
            "fit",
            "--toy",
            "8gaussians",
            "--out",
            "toy.ffjd",
            "--iterations",
            "30",
            "--valid-every",
            "15",
            "--hidden",
            "32,32",
            "--batch",
            "256",
            "--base",
            "kde",
            "--kde-centres",
            "200",
        ],
        d,
    );
    ok(&["toy", "8gaussians", "--n", "200", "--seed", "3", "--out", "toy.csv"], d);
    assert_parity(d, "toy.ffjd", "toy.csv");
    // It ends in a KDE base (format version 5), which the JSON form carries.
    assert!(ok(&["inspect", "toy.ffjd"], d).contains("base: Gaussian KDE on 200 latent points"));
    ok(&["export", "--run-dir", "toy.run", "--out", "toy.json", "--format", "json"], d);
    assert!(std::fs::read_to_string(d.join("toy.json")).unwrap().contains("\"kde_base\""));
    ok(&["import", "toy.json", "--out", "toy-imported.ffjd"], d);
    let score = |m: &str| ok(&["score", "--model", m, "--data", "toy.csv"], d);
    assert_eq!(score("toy.ffjd"), score("toy-imported.ffjd"));
    // The plotted density integrates to ~1 over the view (central 99% of samples, padded).
    let plotted =
        ok(&["plot", "--model", "toy.ffjd", "--out", "toy.png", "--grid", "120", "--samples", "4000"], d);
    let mass: f64 = plotted.trim().rsplit(' ').next().unwrap().parse().unwrap();
    assert!((0.9..1.02).contains(&mass), "{plotted}");
    assert!(std::fs::read(d.join("toy.png")).unwrap().starts_with(b"\x89PNG"));
    // 6-D: BN, CNF, BN, CNF, BN with concat layers, Hutchinson training, 4 epochs, from a CSV with a header.
    write_6d(&d.join("six.csv"), 1200);
    ok(
        &[
            "fit",
            "--data",
            "six.csv",
            "--out",
            "six.ffjd",
            "--iterations",
            "20",
            "--valid-every",
            "10",
            "--hidden",
            "24,24",
            "--blocks",
            "2",
            "--layer",
            "concat",
            "--activation",
            "softplus",
            "--trace",
            "gaussian",
            "--batch",
            "256",
            "--batch-norm",
            "true",
            "--epochs",
            "4",
        ],
        d,
    );
    write_6d(&d.join("six-200.csv"), 200);
    assert_parity(d, "six.ffjd", "six-200.csv");
    let inspected = ok(&["inspect", "six.ffjd"], d);
    assert_eq!(inspected.matches("affine").count(), 3, "{inspected}");
    // The recorded command names the program, not this machine's path to it.
    assert!(inspected.contains("command     trainer fit --data six.csv"), "{inspected}");
    // Whitened: a linear stage (format version 2) before the CNF; the runtime's
    // triangular map agrees with the trainer's, and JSON round-trips it.
    let whitened = "fit --data six.csv --out white.ffjd --iterations 20 --valid-every 10 --hidden 24,24 \
                    --trace gaussian --batch 256 --whiten true --base normal --train-base normal";
    ok(&whitened.split_whitespace().collect::<Vec<_>>(), d);
    assert_parity(d, "white.ffjd", "six-200.csv");
    assert!(ok(&["inspect", "white.ffjd"], d).contains("linear"));
    let white = std::fs::read(d.join("white.ffjd")).unwrap();
    assert_eq!(u16::from_le_bytes([white[4], white[5]]), 2);
    ok(&["export", "--run-dir", "white.run", "--out", "white.json", "--format", "json"], d);
    ok(&["import", "white.json", "--out", "white-imported.ffjd"], d);
    let scores = |m: &str| ok(&["score", "--model", m, "--data", "six-200.csv"], d);
    assert_eq!(scores("white.ffjd"), scores("white-imported.ffjd"));
    // `fit --weights f16` exports the f16 file directly (and the run keeps the setting).
    let fitted = "fit --data six.csv --out six-fit-f16.ffjd --iterations 10 --valid-every 10 --hidden 8 \
                  --trace gaussian --batch 256 --weights f16";
    ok(&fitted.split_whitespace().collect::<Vec<_>>(), d);
    assert!(ok(&["inspect", "six-fit-f16.ffjd"], d).contains("matrices f16"));
    assert!(
        std::fs::read_to_string(d.join("six-fit-f16.run/config.toml")).unwrap().contains("weights = \"f16\"")
    );
    // f16 / i8 matrices (format version 3): the trainer's float64 evaluation
    // reads the widened values and agrees with the runtime as for f32 files
    // (concat layers, batch norm and the time column included).
    ok(&["convert", "six.ffjd", "--weights", "f16", "--out", "six-f16.ffjd"], d);
    assert_parity(d, "six-f16.ffjd", "six-200.csv");
    ok(&["convert", "white.ffjd", "--weights", "i8", "--out", "white-i8.ffjd"], d);
    assert_parity(d, "white-i8.ffjd", "six-200.csv");
    let small = std::fs::read(d.join("white-i8.ffjd")).unwrap();
    assert_eq!(u16::from_le_bytes([small[4], small[5]]), 3);
    assert!(small.len() < white.len() / 2, "{} vs {} bytes", small.len(), white.len());
    assert!(ok(&["inspect", "white-i8.ffjd"], d).contains("matrices i8"));
    // At export: the threshold is recalibrated on the run's validation rows with the i8 file.
    ok(&["export", "--run-dir", "white.run", "--out", "white-export-i8.ffjd", "--weights", "i8"], d);
    let exported = std::fs::read(d.join("white-export-i8.ffjd")).unwrap();
    let m = Model::from_bytes(&exported).unwrap();
    assert!(m.header().stages().any(
        |s| matches!(s, ffjord_runtime::Stage::Cnf(c) if c.matrices == ffjord_runtime::MatrixEncoding::I8)
    ));
    assert!(m.threshold().is_some());
    assert!(err(&["convert", "white.ffjd", "--weights", "f8", "--out", "x.ffjd"], d).contains("f8"));
    // `convert --calibrate ROWS`: the stored threshold becomes the same
    // quantile of the converted model's −log p on those rows (runtime scores,
    // rank ⌈q (n + 1)⌉ as everywhere in the trainer).
    ok(
        &[
            "convert",
            "white.ffjd",
            "--weights",
            "i8",
            "--calibrate",
            "six-200.csv",
            "--out",
            "white-cal.ffjd",
        ],
        d,
    );
    let cal = std::fs::read(d.join("white-cal.ffjd")).unwrap();
    let m = Model::from_bytes(&cal).unwrap();
    let t = m.threshold().unwrap();
    let flow = Flow::new(&m, m.default_solver()).unwrap();
    let mut scratch = vec![0.0; flow.scratch_len()];
    let mut scores: Vec<f64> = read_csv(&d.join("six-200.csv"))
        .iter()
        .map(|r| {
            let x: Vec<f32> = r.iter().map(|&v| v as f32).collect();
            -f64::from(flow.log_density(&x, &mut scratch).unwrap().log_p)
        })
        .collect();
    scores.sort_by(f64::total_cmp);
    // The ⌈q (n + 1)⌉-th smallest (ffjord_trainer::anomaly::quantile).
    let n = scores.len();
    let expected = scores[((0.99 * (n + 1) as f64 - 1e-9).ceil() as usize).min(n) - 1];
    assert_eq!(f64::from(t.quantile), f64::from(0.99f32));
    assert_eq!(t.score, expected as f32);
    assert!(
        err(&["convert", "white.ffjd", "--weights", "i8", "--calibrate", "toy.csv", "--out", "x.ffjd"], d)
            .contains("2 columns, the model has 6")
    );
    let metrics = std::fs::read_to_string(d.join("six.run/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 16, "4 epochs of 960 rows in batches of 256");
    // A solver budget at export: the cheapest solver within ε of the reference becomes the default.
    let nfe_at = |eps: &str, file: &str| -> (Solver, f64) {
        let printed = ok(&["export", "--run-dir", "toy.run", "--out", file, "--max-error", eps], d);
        assert!(printed.contains("chosen: "), "{printed}");
        let bytes = std::fs::read(d.join(file)).unwrap();
        let model = Model::from_bytes(&bytes).unwrap();
        let solver = model.default_solver();
        let (flow, tight) = (
            Flow::new(&model, solver).unwrap(),
            Flow::new(&model, Solver::Dopri5(Dopri5 { max_steps: 100_000, ..Dopri5::with_tolerance(1e-7) }))
                .unwrap(),
        );
        let mut scratch = vec![0.0; tight.scratch_len().max(flow.scratch_len())];
        let (mut worst, mut nfe) = (0.0f64, 0.0);
        for row in read_csv(&d.join("toy.csv")) {
            let x: Vec<f32> = row.iter().map(|&v| v as f32).collect();
            let a = flow.log_density(&x, &mut scratch).unwrap();
            let b = tight.log_density(&x, &mut scratch).unwrap();
            worst = worst.max((a.log_p - b.log_p).abs() as f64);
            nfe += f64::from(a.stats.nfe);
        }
        let limit: f64 = eps.parse().unwrap();
        // Chosen on validation rows, checked here on other rows: allow 3× the budget.
        assert!(worst <= 3.0 * limit, "ε = {eps}: {solver:?} is off by {worst} on test rows");
        (solver, nfe)
    };
    let (loose, loose_nfe) = nfe_at("0.05", "budget-loose.ffjd");
    let (tight, tight_nfe) = nfe_at("0.0005", "budget-tight.ffjd");
    assert!(tight_nfe >= loose_nfe, "{tight:?} ({tight_nfe}) cheaper than {loose:?} ({loose_nfe})");
    // `trainer budget` on a model file: checked on the rows it chose on, the
    // reported error must be within ε and no listed candidate within ε cheaper.
    let printed = ok(
        &[
            "budget",
            "--model",
            "budget-loose.ffjd",
            "--max-error",
            "0.05",
            "--data",
            "toy.csv",
            "--test",
            "toy.csv",
        ],
        d,
    );
    let chosen = printed.lines().find(|l| l.starts_with("chosen: ")).expect("chosen line");
    let test_part = &chosen[chosen.find("test on").expect("test part")..];
    let value_after = |key: &str| -> f64 {
        let rest =
            &test_part[test_part.find(key).unwrap_or_else(|| panic!("{key} in {chosen}")) + key.len()..];
        rest.split([',', ' ']).find(|t| !t.is_empty()).unwrap().parse().unwrap()
    };
    assert!(value_after("max error ") <= 0.05, "{chosen}");
    let chosen_nfe = value_after("mean NFE ");
    for row in printed.lines().filter(|l| l.starts_with("| RK4") || l.starts_with("| Dopri5")) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let (err, nfe): (f64, f64) = (cells[2].parse().unwrap(), cells[4].parse().unwrap());
        assert!(err > 0.05 || nfe >= chosen_nfe, "{row} is within ε and cheaper than {chosen}");
    }
    // Re-export from the run folder as JSON and import it: the same numbers.
    ok(
        &[
            "export",
            "--run-dir",
            "six.run",
            "--out",
            "six.json",
            "--format",
            "json",
            "--threshold-quantile",
            "0.9",
        ],
        d,
    );
    ok(&["import", "six.json", "--out", "six-imported.ffjd"], d);
    let a = ok(&["score", "--model", "six.ffjd", "--data", "six-200.csv"], d);
    let b = ok(&["score", "--model", "six-imported.ffjd", "--data", "six-200.csv"], d);
    let log_p =
        |s: &str| s.lines().skip(1).map(|l| l.split(',').nth(1).unwrap().to_string()).collect::<Vec<_>>();
    assert_eq!(log_p(&a), log_p(&b));
    // `score` uses the runtime and the stored threshold.
    let scored = ok(&["score", "--model", "six.ffjd", "--data", "six-200.csv"], d);
    assert_eq!(scored.lines().count(), 201);
    assert!(scored.lines().skip(1).all(|l| l.contains(",normal,") || l.contains(",anomaly,")));
    // With a label column: it is not a feature, it is copied to the output,
    // and every row's log p splits into the latent's share and the volume term.
    let rows = std::fs::read_to_string(d.join("six-200.csv")).unwrap();
    let labelled: String = rows
        .lines()
        .enumerate()
        .map(|(i, l)| if i == 0 { format!("{l},outlier\n") } else { format!("{l},{}\n", u8::from(i > 150)) })
        .collect();
    std::fs::write(d.join("six-labelled.csv"), labelled).unwrap();
    let with_label =
        ok(&["score", "--model", "six.ffjd", "--data", "six-labelled.csv", "--label", "outlier"], d);
    let mut lines = with_label.lines();
    assert_eq!(
        lines.next().unwrap(),
        "row,log_p,score,verdict,nfe,log_p_base,delta_log_p,log_p_normal,label"
    );
    // The score is the file's kind on every row: −log p, −log N(z) or −log p_base(z).
    let inspected = ok(&["inspect", "six.ffjd"], d);
    let kind = ["neg-log-density", "latent-radius", "latent-base"]
        .into_iter()
        .find(|k| inspected.contains(&format!("score       {k} ")))
        .unwrap_or_else(|| panic!("no score kind in {inspected}"));
    for (i, (line, plain)) in lines.zip(scored.lines().skip(1)).enumerate() {
        let f: Vec<&str> = line.split(',').collect();
        assert_eq!(f[..8].join(","), plain, "row {i}: the label column changed the features");
        let v = |k: usize| f[k].parse::<f64>().unwrap();
        assert!((v(1) - (v(5) - v(6))).abs() <= 1e-4 * (1.0 + v(1).abs()), "{line}");
        let expected = match kind {
            "latent-radius" => -v(7),
            "latent-base" => -v(5),
            _ => -v(1),
        };
        assert_eq!(v(2), expected, "{line}");
        assert_eq!(f[8], if i + 1 > 150 { "1" } else { "0" });
    }
    assert!(
        err(&["score", "--model", "six.ffjd", "--data", "six-200.csv", "--label", "nope"], d)
            .contains("no label column 'nope'")
    );
}

/// `fit --search`: every width is tried within the budget, the one with the
/// best validation NLL is written to --out under the final name, and the
/// table it prints says which.
#[test]
fn search_keeps_the_candidate_with_the_best_validation_nll() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let printed = ok(
        &[
            "fit",
            "--toy",
            "moons",
            "--out",
            "s.ffjd",
            "--search",
            "0.05",
            "--valid-every",
            "5",
            "--batch",
            "128",
            // (The KDE base's choice would take part of the 3 s budget.)
            "--base",
            "normal",
        ],
        d,
    );
    let rows: Vec<(String, f64)> = printed
        .lines()
        .filter(|l| l.starts_with("| ["))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            (cells[1].to_string(), cells[2].parse().unwrap())
        })
        .collect();
    assert_eq!(rows.len(), 4, "{printed}");
    let best = rows.iter().min_by(|a, b| a.1.total_cmp(&b.1)).unwrap();
    assert!(
        printed.contains(&format!("chosen: hidden {} (validation NLL {:.4})", best.0, best.1)),
        "{printed}"
    );
    let bytes = std::fs::read(d.join("s.ffjd")).unwrap();
    assert_eq!(Model::from_bytes(&bytes).unwrap().metadata().name, "s");
    // s.run is the chosen candidate's run folder: export re-creates the model.
    ok(&["export", "--run-dir", "s.run", "--out", "again.ffjd"], d);
    ok(&["toy", "moons", "--n", "20", "--out", "p.csv"], d);
    let score = |m: &str| ok(&["score", "--model", m, "--data", "p.csv"], d);
    assert_eq!(score("s.ffjd"), score("again.ffjd"));
    assert!(
        err(&["fit", "--toy", "moons", "--out", "s.ffjd", "--search", "0"], d)
            .contains("positive number of minutes")
    );
    assert!(
        err(&["fit", "--toy", "moons", "--out", "s.ffjd", "--search", "1", "--resume"], d)
            .contains("cannot be used with")
    );
}

#[test]
fn adjoint_training_runs_a_backward_solve_and_logs_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = trainer(
        &[
            "fit",
            "--toy",
            "moons",
            "--out",
            "a.ffjd",
            "--iterations",
            "4",
            "--valid-every",
            "2",
            "--hidden",
            "16",
            "--gradient",
            "adjoint",
            "--seminorm",
            "true",
            "--trace",
            "rademacher",
            "--batch",
            "64",
        ],
        d,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("iteration 2: validation NLL"), "{stderr}");
    let metrics = std::fs::read_to_string(d.join("a.run/metrics.jsonl")).unwrap();
    for line in metrics.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(v["nfe_backward"].as_u64().unwrap() > 0, "{line}");
    }
    let config = std::fs::read_to_string(d.join("a.run/config.toml")).unwrap();
    assert!(config.contains("gradient = \"adjoint\"") && config.contains("seminorm = true"), "{config}");
}

/// A version-1.0 NPY file: magic, header dict padded to 64 bytes, raw data.
fn write_npy(path: &Path, descr: &str, shape: &[usize], data: &[u8]) {
    let dims: String = shape.iter().map(|s| format!("{s}, ")).collect();
    let mut dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({dims}), }}");
    while (10 + dict.len() + 1) % 64 != 0 {
        dict.push(' ');
    }
    dict.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((dict.len() as u16).to_le_bytes());
    bytes.extend(dict.as_bytes());
    bytes.extend(data);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn bad_input_gets_errors_that_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("ragged.csv"), "a,b\n1,2\n3\n").unwrap();
    std::fs::write(d.join("text.csv"), "a,b\n1,2\n3,oops\n").unwrap();
    std::fs::write(d.join("nan.csv"), "1,2\nNaN,4\n").unwrap();
    std::fs::write(d.join("three.csv"), "1,2,3\n").unwrap();
    std::fs::write(d.join("foreign.ffjd"), b"PK\x03\x04 not a model").unwrap();
    let fit = |data: &str| err(&["fit", "--data", data, "--out", "m.ffjd", "--iterations", "1"], d);
    assert!(fit("ragged.csv").contains("ragged.csv:3: 1 fields, expected 2"));
    assert!(fit("text.csv").contains("text.csv:3:2: 'oops' is not a number"));
    assert!(fit("nan.csv").contains("nan.csv:2:1: value 'NaN' is not finite"));
    assert!(fit("missing.csv").contains("missing.csv"));
    // A first row with a typo is a data row with an error, not a header; values
    // outside float32, empty and header-only files get named errors too.
    std::fs::write(d.join("typo.csv"), "1,2x\n3,4\n").unwrap();
    std::fs::write(d.join("huge.csv"), "a,b\n1,2\n1e39,4\n").unwrap();
    std::fs::write(d.join("empty.csv"), "").unwrap();
    std::fs::write(d.join("names.csv"), "a,b\n").unwrap();
    assert!(fit("typo.csv").contains("typo.csv:1:2: '2x' is not a number"));
    assert!(fit("huge.csv").contains("huge.csv:3:1: value '1e39' is outside the float32 range"));
    assert!(fit("empty.csv").contains("empty.csv: no data rows"));
    assert!(fit("names.csv").contains("names.csv: no data rows"));
    // NPY: a non-finite value names its row and column; other shapes and dtypes are refused.
    write_npy(
        &d.join("nan.npy"),
        "<f8",
        &[2, 2],
        &[1.0f64, 2.0, f64::NAN, 4.0].map(f64::to_le_bytes).concat(),
    );
    write_npy(&d.join("cube.npy"), "<f8", &[1, 1, 1], &1.0f64.to_le_bytes());
    write_npy(&d.join("ints.npy"), "<i4", &[2], &[1i32, 2].map(i32::to_le_bytes).concat());
    write_npy(&d.join("none.npy"), "<f4", &[0, 3], &[]);
    assert!(fit("nan.npy").contains("nan.npy: row 2, column 1: value is not finite"));
    assert!(fit("cube.npy").contains("cube.npy: expected a 1-D or 2-D array, found shape [1, 1, 1]"));
    assert!(fit("ints.npy").contains("ints.npy: unsupported dtype"));
    assert!(fit("none.npy").contains("none.npy: no data rows"));
    assert!(!d.join("m.run").exists(), "a fit that failed before its first checkpoint leaves no run folder");
    assert!(err(&["fit", "--toy", "spiral", "--out", "m.ffjd"], d).contains("unknown toy data set 'spiral'"));
    assert!(
        err(&["fit", "--toy", "moons", "--out", "m.ffjd", "--layers", "3"], d)
            .contains("unexpected argument")
    );
    assert!(
        err(&["fit", "--toy", "moons", "--out", "m.ffjd", "--solver", "rk5"], d)
            .contains("invalid value 'rk5'")
    );
    assert!(err(&["inspect", "foreign.ffjd"], d).contains("foreign.ffjd: not an FFJORD model file"));
    ok(
        &[
            "fit",
            "--toy",
            "moons",
            "--out",
            "m.ffjd",
            "--iterations",
            "2",
            "--valid-every",
            "1",
            "--hidden",
            "8",
        ],
        d,
    );
    assert!(
        err(&["score", "--model", "m.ffjd", "--data", "three.csv"], d)
            .contains("three.csv has 3 columns, the model m.ffjd expects 2")
    );
    // Settings no run can use are refused up front; a loss that overflows stops the run.
    assert!(
        err(&["fit", "--toy", "moons", "--out", "m2.ffjd", "--lr", "inf"], d)
            .contains("lr must be finite and positive")
    );
    assert!(
        err(&["fit", "--toy", "moons", "--out", "m2.ffjd", "--threshold-quantile", "1.5"], d)
            .contains("threshold_quantile")
    );
    let blown = err(
        &[
            "fit",
            "--toy",
            "moons",
            "--out",
            "m2.ffjd",
            "--end-time",
            "1e20",
            "--solver",
            "euler",
            "--steps",
            "1",
        ],
        d,
    );
    assert!(blown.contains("loss became inf at iteration 0; training stopped"), "{blown}");
    assert!(!d.join("m2.ffjd").exists());
    // A truncated copy of a real model is refused with the file named.
    let bytes = std::fs::read(d.join("m.ffjd")).unwrap();
    std::fs::write(d.join("cut.ffjd"), &bytes[..bytes.len() / 2]).unwrap();
    let cut = err(&["inspect", "cut.ffjd"], d);
    assert!(
        cut.contains(&format!(
            "cut.ffjd: model truncated: {} bytes, at least {} needed",
            bytes.len() / 2,
            bytes.len()
        )),
        "{cut}"
    );
}

#[test]
fn a_resumed_run_continues_exactly_as_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let common = [
        "--toy",
        "rings",
        "--hidden",
        "16,16",
        "--batch",
        "128",
        "--valid-every",
        "5",
        "--trace",
        "gaussian",
    ];
    let run = |extra: &[&str]| {
        let mut a = vec!["fit"];
        a.extend_from_slice(&common);
        a.extend_from_slice(extra);
        ok(&a, d);
    };
    run(&["--out", "whole.ffjd", "--iterations", "20"]);
    run(&["--out", "split.ffjd", "--iterations", "10"]);
    // A state.json from another moment (as a kill between two writes used to
    // leave) must not steer the resumed run: the bookkeeping travels inside
    // last.ot. With this bogus best, no later validation would count as an
    // improvement and best.ot would stay at iteration 10.
    std::fs::write(
        d.join("split.run/state.json"),
        r#"{"iteration": 10, "best_valid": -1e9, "best_iteration": 0, "stale_validations": 0}"#,
    )
    .unwrap();
    run(&["--out", "split.ffjd", "--iterations", "20", "--resume"]);
    ok(&["toy", "rings", "--n", "50", "--out", "pts.csv"], d);
    let whole = ok(&["score", "--model", "whole.ffjd", "--data", "pts.csv"], d);
    let split = ok(&["score", "--model", "split.ffjd", "--data", "pts.csv"], d);
    assert_eq!(whole, split, "parameters, Adam moments and per-iteration seeds all carry over");
    // A fresh run in a folder that holds another run replaces it, saying so:
    // one folder never mixes two runs' metrics or checkpoints.
    let mut again = vec!["fit"];
    again.extend_from_slice(&common);
    again.extend_from_slice(&["--out", "whole.ffjd", "--iterations", "10"]);
    let out = trainer(&again, d);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("starting a fresh run in whole.run"));
    let metrics = std::fs::read_to_string(d.join("whole.run/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 10);
}

/// With a weight average and a warm-up, a resumed run still continues
/// exactly (the average travels in last.ot), and the export is the average:
/// it scores differently from the same run without one.
#[test]
fn a_resumed_run_with_a_weight_average_continues_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let common =
        ["--toy", "rings", "--hidden", "16,16", "--batch", "128", "--valid-every", "5", "--warmup", "8"];
    let run = |extra: &[&str]| {
        let mut a = vec!["fit"];
        a.extend_from_slice(&common);
        a.extend_from_slice(extra);
        ok(&a, d);
    };
    run(&["--out", "whole.ffjd", "--iterations", "20", "--ema", "0.9"]);
    run(&["--out", "plain.ffjd", "--iterations", "20"]);
    run(&["--out", "split.ffjd", "--iterations", "10", "--ema", "0.9"]);
    run(&["--out", "split.ffjd", "--iterations", "20", "--ema", "0.9", "--resume"]);
    ok(&["toy", "rings", "--n", "50", "--out", "pts.csv"], d);
    let score = |m: &str| ok(&["score", "--model", m, "--data", "pts.csv"], d);
    assert_eq!(score("whole.ffjd"), score("split.ffjd"), "the average carries over a resume");
    assert_ne!(score("whole.ffjd"), score("plain.ffjd"), "the export is the averaged model");
    let err = err(&["fit", "--toy", "rings", "--out", "x.ffjd", "--ema", "1"], d);
    assert!(err.contains("ema must be in [0, 1)"), "{err}");
}

/// `--flow-matching N` pre-trains before the likelihood iterations: the run
/// says so and validates the pre-trained flow (iteration 0 of
/// metrics.jsonl), its model differs from the same run without it, a resumed run
/// continues exactly (the pre-training is in the checkpoint, not repeated),
/// and chains it cannot pre-train are refused by name.
#[test]
fn flow_matching_pretrains_once_and_a_resumed_run_continues_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let common = ["--toy", "rings", "--hidden", "16,16", "--batch", "128", "--valid-every", "5"];
    let run = |extra: &[&str]| {
        let mut a = vec!["fit"];
        a.extend_from_slice(&common);
        a.extend_from_slice(extra);
        let out = trainer(&a, d);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "trainer {a:?} failed:\n{stderr}");
        stderr
    };
    let said = run(&["--out", "whole.ffjd", "--iterations", "20", "--flow-matching", "50"]);
    assert!(said.contains("flow matching: 50 iterations"), "{said}");
    // The pre-trained flow is validated before the first likelihood step: a
    // candidate for best.ot like every later validation.
    assert!(said.contains("after flow matching: validation NLL"), "{said}");
    let metrics = std::fs::read_to_string(d.join("whole.run/metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    assert_eq!(first["iteration"], 0, "{first}");
    assert!(first["valid_nll"].as_f64().is_some_and(f64::is_finite), "{first}");
    run(&["--out", "plain.ffjd", "--iterations", "20"]);
    run(&["--out", "split.ffjd", "--iterations", "10", "--flow-matching", "50"]);
    let resumed = run(&["--out", "split.ffjd", "--iterations", "20", "--flow-matching", "50", "--resume"]);
    assert!(!resumed.contains("flow matching:"), "a resume does not pre-train again: {resumed}");
    ok(&["toy", "rings", "--n", "50", "--out", "pts.csv"], d);
    let score = |m: &str| ok(&["score", "--model", m, "--data", "pts.csv"], d);
    assert_eq!(score("whole.ffjd"), score("split.ffjd"), "a resumed pre-trained run continues exactly");
    assert_ne!(score("whole.ffjd"), score("plain.ffjd"), "the pre-training changed the model");
    for (flags, says) in [
        (&["--blocks", "2"][..], "blocks > 1"),
        (&["--whiten", "true"][..], "whiten"),
        (&["--train-base", "kde"][..], "train_base kde"),
    ] {
        let mut a = vec!["fit", "--toy", "rings", "--out", "x.ffjd", "--flow-matching", "5"];
        a.extend_from_slice(flags);
        let e = err(&a, d);
        assert!(e.contains(says), "{flags:?}: {e}");
    }
}

/// A run stopped at each point of the checkpoint commit (before best.ot, after
/// it, after last.ot, after state.json — deterministic fault injection, no
/// timing) resumes to the same model as an uninterrupted run, and its
/// metrics.jsonl logs every iteration once.
#[test]
fn a_stop_at_any_point_of_a_checkpoint_resumes_to_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let args = |out: &str| -> Vec<String> {
        format!("fit --toy rings --hidden 16,16 --batch 128 --valid-every 5 --trace gaussian --iterations 20 --out {out}")
            .split_whitespace()
            .map(String::from)
            .collect()
    };
    let run = |out: &str, extra: &[&str], crash: Option<&str>| {
        let mut a = args(out);
        a.extend(extra.iter().map(|s| s.to_string()));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_trainer"));
        cmd.args(&a).current_dir(d).env("OMP_NUM_THREADS", "1");
        if let Some(c) = crash {
            cmd.env("FFJORD_CRASH_AT", c);
        }
        cmd.output().unwrap()
    };
    assert!(run("whole.ffjd", &[], None).status.success());
    ok(&["toy", "rings", "--n", "50", "--out", "pts.csv"], d);
    let whole = ok(&["score", "--model", "whole.ffjd", "--data", "pts.csv"], d);
    for point in ["before-best", "after-best", "after-last", "after-state"] {
        let out = format!("{point}.ffjd");
        let stopped = run(&out, &[], Some(&format!("{point}:10")));
        assert_eq!(stopped.status.code(), Some(86), "{point}: {}", String::from_utf8_lossy(&stopped.stderr));
        let resumed = run(&out, &["--resume"], None);
        assert!(resumed.status.success(), "{point}: {}", String::from_utf8_lossy(&resumed.stderr));
        let from = if point == "before-best" || point == "after-best" { 5 } else { 10 };
        assert!(
            String::from_utf8_lossy(&resumed.stderr).contains(&format!("resumed at iteration {from}")),
            "{point}"
        );
        assert_eq!(ok(&["score", "--model", &out, "--data", "pts.csv"], d), whole, "{point}");
        let logged: Vec<u64> = std::fs::read_to_string(d.join(format!("{point}.run/metrics.jsonl")))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["iteration"].as_u64().unwrap())
            .collect();
        assert_eq!(logged, (1..=20).collect::<Vec<_>>(), "{point}");
    }
}

#[test]
fn a_killed_run_resumes_from_its_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let args = [
        "fit",
        "--toy",
        "circles",
        "--out",
        "c.ffjd",
        "--iterations",
        "60",
        "--valid-every",
        "5",
        "--hidden",
        "16,16",
        "--batch",
        "128",
    ];
    let mut child = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(args)
        .current_dir(d)
        .env("OMP_NUM_THREADS", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let state = d.join("c.run/state.json");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        if let Ok(s) = std::fs::read_to_string(&state) {
            let v: serde_json::Value =
                serde_json::from_str(&s).expect("state.json is always whole (atomic writes)");
            if v["iteration"].as_u64().unwrap() >= 10 {
                break;
            }
        }
        assert!(std::time::Instant::now() < deadline, "no checkpoint after 120 s");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!d.join("c.ffjd").exists(), "killed before the end: no model yet");
    let resumed_from: u64 = {
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
        v["iteration"].as_u64().unwrap()
    };
    let mut resume = args.to_vec();
    resume.push("--resume");
    let out = trainer(&resume, d);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // last.ot is committed just before state.json: the kill may fall between.
    let at = |i: u64| stderr.contains(&format!("resumed at iteration {i}"));
    assert!(at(resumed_from) || at(resumed_from + 5), "{stderr}");
    // Replayed iterations are logged once: metrics.jsonl holds 1..=60 in order.
    let logged: Vec<u64> = std::fs::read_to_string(d.join("c.run/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["iteration"].as_u64().unwrap())
        .collect();
    assert_eq!(logged, (1..=60).collect::<Vec<_>>());
    let bytes = std::fs::read(d.join("c.ffjd")).unwrap();
    Model::from_bytes(&bytes).unwrap();
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    assert_eq!(v["iteration"].as_u64().unwrap(), 60);
}

/// `fit` on 8-bit images (a uint8 NPY `[N, H, W]`) trains FFJORD's
/// multiscale conv flow: validation and test in bits/dim, the image shape
/// kept in the run's config (so resume rebuilds the same model), a model
/// file the runtime scores to the trainer's bits/dim; validation images of
/// another size are an error that names both shapes.
#[test]
fn fit_trains_the_multiscale_flow_on_images() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A bright 3×3 square on a dark 8×8 frame, at a position that varies.
    let images = |n: usize, side: usize| -> Vec<u8> {
        (0..n)
            .flat_map(|i| {
                (0..side * side).map(move |p| {
                    let (y, x, o) = (p / side, p % side, i % (side.saturating_sub(2)).max(1));
                    if (o..o + 3).contains(&y) && (o..o + 3).contains(&x) {
                        200 + (i % 50) as u8
                    } else {
                        (p % 7) as u8
                    }
                })
            })
            .collect()
    };
    write_npy(&d.join("train.npy"), "|u1", &[48, 8, 8], &images(48, 8));
    write_npy(&d.join("valid.npy"), "|u1", &[8, 8, 8], &images(8, 8));
    write_npy(&d.join("test.npy"), "|u1", &[8, 8, 8], &images(8, 8));
    write_npy(&d.join("small.npy"), "|u1", &[8, 4, 4], &images(8, 4));
    let common = [
        "fit",
        "--data",
        "train.npy",
        "--hidden",
        "4",
        "--blocks",
        "1",
        "--layer",
        "concat",
        "--activation",
        "softplus",
        "--trace",
        "rademacher",
        "--batch",
        "16",
        "--iterations",
        "4",
        "--valid-every",
        "2",
    ];
    let out = ok(
        &[&common[..], &["--valid-data", "valid.npy", "--test-data", "test.npy", "--out", "img.ffjd"]]
            .concat(),
        d,
    );
    assert!(out.contains("validation") && out.contains("bits/dim (exact trace"), "{out}");
    let config = std::fs::read_to_string(d.join("img.run/config.toml")).unwrap();
    assert!(config.contains("image_shape = [\n    1,\n    8,\n    8,\n]"), "{config}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("img.run/summary.json")).unwrap()).unwrap();
    let bpd = summary["test_bits_per_dim"].as_f64().unwrap();
    assert!(bpd.is_finite() && bpd > 0.0, "{summary}");
    // The model file (format version 4) takes 8-bit pixels; the runtime's
    // bits/dim on the test images, −log₂ p(bytes) / D, is the trainer's.
    let bytes = std::fs::read(d.join("img.ffjd")).unwrap();
    let model = ffjord_runtime::Model::from_bytes(&bytes).unwrap();
    assert_eq!(u16::from_le_bytes([bytes[4], bytes[5]]), 4);
    assert!(model.threshold().is_some());
    let flow = ffjord_runtime::Flow::new(&model, model.default_solver()).unwrap();
    let mut scratch = vec![0.0; flow.scratch_len()];
    let test = images(8, 8);
    let mut sum = 0.0;
    for image in test.chunks(64) {
        let x: Vec<f32> = image.iter().map(|&b| f32::from(b)).collect();
        sum -= f64::from(flow.log_density(&x, &mut scratch).unwrap().log_p) / (64.0 * std::f64::consts::LN_2);
    }
    let runtime_bpd = sum / 8.0;
    assert!((runtime_bpd - bpd).abs() < 2e-3, "runtime {runtime_bpd} vs trainer {bpd} bits/dim");
    // `score` on image rows (pixel values and an anomaly label): −log p and,
    // against a per-pixel background fitted on the training images, the
    // likelihood-ratio score, each with its AUROC.
    let mut csv = (0..64).map(|i| format!("p{i}")).collect::<Vec<_>>().join(",") + ",anomaly\n";
    for (k, image) in test.chunks(64).enumerate().take(4) {
        let row: Vec<String> = image.iter().map(u8::to_string).collect();
        csv += &format!("{},0\n", row.join(","));
        // An outlier: the same image turned upside down and brightened.
        let flipped: Vec<String> = image.iter().rev().map(|&b| (b / 2 + 120 + k as u8).to_string()).collect();
        csv += &format!("{},1\n", flipped.join(","));
    }
    std::fs::write(d.join("rows.csv"), csv).unwrap();
    let run = trainer(
        &[
            "score",
            "--model",
            "img.ffjd",
            "--data",
            "rows.csv",
            "--label",
            "anomaly",
            "--background",
            "train.npy",
        ],
        d,
    );
    let (out, log) = (String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    assert!(run.status.success(), "{log}");
    assert!(out.contains("log_p_background,ratio_score"), "{out}");
    assert!(log.contains("likelihood ratio against the per-pixel background: AUROC"), "{log}");
    // The other score kind (the latent radius of an image model scored by
    // −log p): the printed AUROC is the one of the written `log_p_normal` column.
    assert!(log.contains("score (neg-log-density) against 'anomaly': AUROC"), "{log}");
    let printed = number_after(&log, "latent-radius (not this model's score): AUROC ");
    let rows: Vec<(f64, bool)> = out
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (-f[7].parse::<f64>().unwrap(), f[f.len() - 1] == "1")
        })
        .collect();
    let (mut wins, mut pairs) = (0.0, 0.0);
    for (p, _) in rows.iter().filter(|r| r.1) {
        for (n, _) in rows.iter().filter(|r| !r.1) {
            pairs += 1.0;
            wins += if p > n {
                1.0
            } else if p == n {
                0.5
            } else {
                0.0
            };
        }
    }
    assert!((printed - wins / pairs).abs() < 1e-4, "printed {printed}, from the CSV {}", wins / pairs);
    // `score --probes K`: Hutchinson's estimate instead of the exact trace.
    // Unbiased: over 16 probe seeds the mean log p of each row is the exact
    // one within 4 standard errors (+ 1e-2 nats for the solver's steps,
    // which the estimate's error control can move); and it is an estimate,
    // not the exact value again.
    let log_p = |extra: &[&str]| -> Vec<f64> {
        let out = ok(
            &[&["score", "--model", "img.ffjd", "--data", "rows.csv", "--label", "anomaly"], extra].concat(),
            d,
        );
        out.lines().skip(1).map(|l| l.split(',').nth(1).unwrap().parse().unwrap()).collect()
    };
    let exact = log_p(&[]);
    let estimates: Vec<Vec<f64>> =
        (0..16).map(|s| log_p(&["--probes", "2", "--probe-seed", &s.to_string()])).collect();
    for (row, &e) in exact.iter().enumerate() {
        let v: Vec<f64> = estimates.iter().map(|r| r[row]).collect();
        let mean = v.iter().sum::<f64>() / 16.0;
        let se = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 15.0).sqrt() / 4.0;
        assert!((mean - e).abs() <= 4.0 * se + 1e-2, "row {row}: exact {e}, estimates {v:?}");
    }
    assert!(estimates.iter().any(|r| r != &exact), "--probes gave the exact values");
    let dense = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/8gaussians/model.ffjd");
    std::fs::write(d.join("xy.csv"), "x,y\n0.1,0.2\n").unwrap();
    let e = err(&["score", "--model", dense.to_str().unwrap(), "--data", "xy.csv", "--probes", "2"], d);
    assert!(e.contains("--probes applies to image models"), "{e}");
    // Samples from the best checkpoint as a PNG grid: 5 images → 3 × 2 cells of 8 + 1 pixels.
    let out = ok(&["sample-images", "--run-dir", "img.run", "--out", "s.png", "--count", "5"], d);
    assert!(out.contains("5 samples, 8×8"), "{out}");
    let png = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(d.join("s.png")).unwrap()));
    let info = png.read_info().unwrap().info().clone();
    assert_eq!((info.width, info.height, info.color_type), (28, 19, png::ColorType::Grayscale));
    // The same from the exported file, drawn by the runtime: seeded, so the
    // same seed writes the same PNG and another seed another one.
    let grid = |seed: &str, out: &str| {
        let printed =
            ok(&["sample-images", "--model", "img.ffjd", "--out", out, "--count", "5", "--seed", seed], d);
        assert!(printed.contains("5 samples, 8×8"), "{printed}");
        std::fs::read(d.join(out)).unwrap()
    };
    let (a, b, c) = (grid("1", "m1.png"), grid("1", "m1b.png"), grid("2", "m2.png"));
    assert!(a == b && a != c);
    let png = png::Decoder::new(std::io::Cursor::new(a));
    assert_eq!(png.read_info().unwrap().info().width, 28);
    assert!(err(&["sample-images", "--out", "x.png"], d).contains("--run-dir"));
    let e = err(&[&common[..], &["--valid-data", "small.npy", "--out", "bad.ffjd"]].concat(), d);
    assert!(e.contains("validation images are [1, 4, 4], training images [1, 8, 8]"), "{e}");
}

/// `score` spreads rows over threads: with 1 and with 3 threads it writes the
/// same bytes, in the rows' order, and those are the committed image model's
/// golden values (the runtime's, within 1e-5 relative).
#[test]
fn score_on_several_threads_writes_the_same_rows_in_order() {
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/mnist-8x8");
    let run = |threads: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_trainer"))
            .args(["score", "--model", "model.ffjd", "--data", "golden-rows.csv", "--label", "anomaly"])
            .current_dir(&models)
            .env("OMP_NUM_THREADS", threads)
            .output()
            .expect("trainer runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let one = run("1");
    assert_eq!(one, run("3"));
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(models.join("golden.json")).unwrap()).unwrap();
    let expected: Vec<f64> =
        golden["rows"].as_array().unwrap().iter().map(|r| r["log_p"].as_f64().unwrap()).collect();
    let got: Vec<f64> = one.lines().skip(1).map(|l| l.split(',').nth(1).unwrap().parse().unwrap()).collect();
    assert_eq!(got.len(), expected.len());
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        assert!((g - e).abs() <= 1e-5 * (1.0 + e.abs()), "row {i}: {g} vs golden {e}");
    }
}

/// Without `--trace`, training uses the reference recipe's divergence for the
/// data — Hutchinson with Gaussian noise for a data file, the exact trace for
/// a toy set — and the run's `config.toml` records it (so a resume and a
/// reader see the mode used); `--trace` still decides when given.
#[test]
fn the_trace_mode_defaults_to_the_recipe_for_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_6d(&d.join("six.csv"), 200);
    let trace_of = |run: &str| {
        let config = std::fs::read_to_string(d.join(run).join("config.toml")).unwrap();
        config.lines().find(|l| l.starts_with("trace =")).map(str::to_string).unwrap_or_default()
    };
    let small = ["--hidden", "8", "--iterations", "2", "--valid-every", "1", "--batch", "64"];
    ok(&[&["fit", "--data", "six.csv", "--out", "data.ffjd"][..], &small].concat(), d);
    assert_eq!(trace_of("data.run"), r#"trace = "gaussian""#);
    ok(&[&["fit", "--toy", "8gaussians", "--out", "toy.ffjd"][..], &small].concat(), d);
    assert_eq!(trace_of("toy.run"), r#"trace = "exact""#);
    ok(&[&["fit", "--data", "six.csv", "--trace", "exact", "--out", "given.ffjd"][..], &small].concat(), d);
    assert_eq!(trace_of("given.run"), r#"trace = "exact""#);
}
