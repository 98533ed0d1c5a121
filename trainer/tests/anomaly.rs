//! A user's own labelled CSV through the whole anomaly path: `prepare csv`
//! (ODDS protocol, column report), `fit --valid-data` without a test file
//! (dequantized integer column, constant column), scoring far from the data,
//! and `benchmark --json` + `benchmark-summary` over two split seeds.

use std::path::Path;
mod common;

use common::{number_after, trainer};

fn ok(args: &[&str], dir: &Path) -> (String, String) {
    let out = trainer(args, dir);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "trainer {args:?} failed:\n{stderr}");
    (String::from_utf8_lossy(&out.stdout).into_owned(), stderr)
}

/// Uniform numbers in [0, 1) from a seeded linear congruential generator
/// (test data without a dependency).
fn uniform(seed: u64) -> impl FnMut() -> f64 {
    let mut state = seed;
    move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// 600 normal rows and 40 outliers, no header: a continuous column, an
/// integer count, a column constant at 7, then the label ("ok" / "bad").
fn write_labelled(path: &Path) {
    let mut u = uniform(99);
    let mut s = String::new();
    for i in 0..640 {
        let outlier = i % 16 == 5;
        let g = u() + u() + u() - 1.5;
        let count = (u() * 4.0).floor() + if outlier { 3.0 } else { 0.0 };
        let a = g + if outlier { 2.5 } else { 0.0 };
        s += &format!("{a:.6},{count},7,{}\n", if outlier { "bad" } else { "ok" });
    }
    std::fs::write(path, s).unwrap();
}

fn csv_rows(path: &Path) -> Vec<Vec<f64>> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines().skip(1).map(|l| l.split(',').map(|v| v.parse().unwrap()).collect()).collect()
}

#[test]
fn a_labelled_csv_is_prepared_trained_scored_and_benchmarked() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_labelled(&d.join("raw.csv"));
    let mut summaries = Vec::new();
    for seed in ["0", "1"] {
        let split = format!("split{seed}");
        let (printed, warned) = ok(
            &[
                "prepare",
                "csv",
                "--raw",
                "raw.csv",
                "--label",
                "3",
                "--outlier",
                "bad",
                "--out-dir",
                &split,
                "--seed",
                seed,
            ],
            d,
        );
        // Half of the 600 normal rows train (10% of them validate), the other half and all 40 outliers test.
        assert!(
            printed.contains("train 270 normal rows, validation 30, test 340 rows (300 normal, 40 outliers); 2 of 3 columns quantized"),
            "{printed}"
        );
        assert!(warned.contains("column 'x2': constant (7)"), "{warned}");
        let report = std::fs::read_to_string(d.join(&split).join("columns.md")).unwrap();
        assert!(report.contains("| x1 | 4 | 1 | 1 |"), "{report}");
        // Without a header, the first row is data: 270 + 30 + 340 = 640 rows kept.
        let counted: usize = ["train.csv", "valid.csv", "test.csv"]
            .iter()
            .map(|f| csv_rows(&d.join(&split).join(f)).len())
            .sum();
        assert_eq!(counted, 640);

        let train = format!("{split}/train.csv");
        let valid = format!("{split}/valid.csv");
        let model = format!("{split}/model.ffjd");
        let (fitted, fit_log) = ok(
            &[
                "fit",
                "--data",
                &train,
                "--valid-data",
                &valid,
                "--out",
                &model,
                "--iterations",
                "60",
                "--valid-every",
                "30",
                "--hidden",
                "16,16",
                "--batch",
                "128",
                "--seed",
                seed,
            ],
            d,
        );
        assert!(fitted.contains("(no test rows)"), "{fitted}");
        assert!(fit_log.contains("dequantizing 2 of 3 columns") && fit_log.contains("x1 (1)"), "{fit_log}");

        // Rows off the constant column, ever farther: finite scores that grow with the distance.
        let mut far = String::from("x0,x1,x2\n");
        for delta in [0.0, 0.5, 2.0, 10.0, 1000.0] {
            far += &format!("0.1,2,{}\n", 7.0 + delta);
        }
        std::fs::write(d.join("far.csv"), far).unwrap();
        let (scored, _) = ok(&["score", "--model", &model, "--data", "far.csv"], d);
        let scores: Vec<f64> =
            scored.lines().skip(1).map(|l| l.split(',').nth(2).unwrap().parse().unwrap()).collect();
        assert!(scores.iter().all(|s| s.is_finite()), "{scored}");
        assert!(scores.windows(2).all(|w| w[1] > w[0]), "not monotone: {scored}");

        let json = format!("{split}/benchmark.json");
        let test = format!("{split}/test.csv");
        let (table, _) = ok(
            &[
                "benchmark",
                "--run-dir",
                &format!("{split}/model.run"),
                "--model",
                &model,
                "--test",
                &test,
                "--json",
                &json,
            ],
            d,
        );
        for method in [
            "FFJORD (this model)",
            "FFJORD −log p (same model)",
            "FFJORD latent radius −log N(z) (same model)",
            "Gaussian (full",
            "mixture",
            "Isolation forest",
            "Local outlier factor",
            "KDE",
        ] {
            assert!(table.contains(method), "{method} missing:\n{table}");
        }
        summaries.push(json);
    }
    let (summary, _) = ok(&["benchmark-summary", &summaries[0], &summaries[1]], d);
    assert!(summary.starts_with("| method (2 runs) | AUROC |"), "{summary}");
    assert_eq!(summary.lines().count(), 2 + 8, "{summary}");
    // The shifted outliers are easy: every method ranks them well on average.
    for line in summary.lines().skip(2) {
        let auroc: f64 = line.split('|').nth(2).unwrap().trim().split(' ').next().unwrap().parse().unwrap();
        assert!(auroc > 0.8, "{line}");
    }
}

#[test]
fn prepare_and_fit_reject_what_they_cannot_use() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_labelled(&d.join("raw.csv"));
    let fails = |args: &[&str]| {
        let out = trainer(args, d);
        assert!(!out.status.success(), "{args:?} should fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = fails(&[
        "prepare",
        "csv",
        "--raw",
        "raw.csv",
        "--label",
        "label",
        "--outlier",
        "bad",
        "--out-dir",
        "o",
    ]);
    assert!(e.contains("no label column 'label' (columns: x0, x1, x2, x3)"), "{e}");
    let e = fails(&["prepare", "csv", "--raw", "raw.csv", "--label", "3", "--out-dir", "o"]);
    assert!(e.contains("give both --label COLUMN and --outlier VALUE"), "{e}");
    let e =
        fails(&["prepare", "csv", "--raw", "raw.csv", "--label", "3", "--outlier", "none", "--out-dir", "o"]);
    assert!(e.contains("no row is labelled an outlier"), "{e}");
    std::fs::write(d.join("typo.csv"), "1.0,2,7,ok\n1.5,x,7,ok\n").unwrap();
    let e =
        fails(&["prepare", "csv", "--raw", "typo.csv", "--label", "3", "--outlier", "bad", "--out-dir", "o"]);
    assert!(e.contains("typo.csv:2:2: 'x' in column 'x1' is not a number"), "{e}");
    let e = fails(&["fit", "--data", "raw.csv", "--test-data", "raw.csv", "--out", "m.ffjd"]);
    assert!(e.contains("--test-data needs --valid-data"), "{e}");
    let e = fails(&["fit", "--toy", "moons", "--iterations", "0", "--out", "m.ffjd"]);
    assert!(e.contains("iterations and epochs must be at least 1"), "{e}");
    let e = fails(&["fit", "--toy", "moons", "--valid-rows", "0", "--out", "m.ffjd"]);
    assert!(e.contains("valid_rows must be at least 1"), "{e}");
    assert!(!d.join("m.run").exists(), "a rejected fit leaves no run folder");
}

/// `fit --score radius` stores the latent radius (format version 6) with its
/// threshold calibrated on it; `export --score` switches a run's file to
/// −log p (an older version, the threshold recalibrated) or lets the
/// synthetic check choose, printing what it measured.
#[test]
fn the_score_kind_is_stored_calibrated_and_switchable() {
    let dir = prepared_split();
    let d = dir.path();
    // The radius is the score of a flow on N(0, I).
    let (fitted, _) =
        small_fit(d, "radius.ffjd", "30", false, &["--score", "radius", "--train-base", "normal"]);
    assert!(fitted.contains("score: latent-radius"), "{fitted}");
    // Scores of the file's rows: (score, log p, log N(z)) per row, and the verdicts.
    let scored = |model: &str, data: &str| -> (Vec<(f64, f64, f64)>, usize) {
        let (out, _) = ok(&["score", "--model", model, "--data", data], d);
        let mut lines = out.lines();
        assert_eq!(lines.next().unwrap(), "row,log_p,score,verdict,nfe,log_p_base,delta_log_p,log_p_normal");
        let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
        let flagged = rows.iter().filter(|f| f[3] == "anomaly").count();
        let v = |f: &Vec<&str>, k: usize| f[k].parse::<f64>().unwrap();
        (rows.iter().map(|f| (v(f, 2), v(f, 1), v(f, 7))).collect(), flagged)
    };
    let (inspected, _) = ok(&["inspect", "radius.ffjd"], d);
    assert!(inspected.contains("format      version 6"), "{inspected}");
    assert!(inspected.contains("score       latent-radius"), "{inspected}");
    let (rows, flagged) = scored("radius.ffjd", "s/valid.csv");
    assert!(rows.iter().all(|&(s, _, normal)| s == -normal), "{rows:?}");
    // Calibrated at the 0.99 quantile of these 30 validation rows on this
    // score: none above it (one allowed for f32 against float64 rounding).
    assert!(flagged <= 1, "{flagged} of 30 validation rows above the threshold");

    // `eval --labels` ranks by the file's kind too: its AUROC (float64
    // through tch) is the runtime's (`score --label`, f32) to rounding.
    let (evaluated, _) =
        ok(&["eval", "--model", "radius.ffjd", "--data", "s/test.csv", "--labels", "anomaly"], d);
    assert!(evaluated.contains("; score: latent-radius"), "{evaluated}");
    let eval_auroc: f64 =
        evaluated.lines().last().unwrap().split('|').nth(1).unwrap().trim().parse().unwrap();
    let (_, log) = ok(&["score", "--model", "radius.ffjd", "--data", "s/test.csv", "--label", "anomaly"], d);
    let runtime_auroc = number_after(&log, "score (latent-radius) against 'anomaly': AUROC ");
    assert!((eval_auroc - runtime_auroc).abs() <= 0.002, "eval {eval_auroc}, score {runtime_auroc}");

    let export = |kind: &str, out: &str| {
        ok(&["export", "--run-dir", "radius.run", "--out", out, "--score", kind], d).0
    };
    export("density", "density.ffjd");
    let (inspected, _) = ok(&["inspect", "density.ffjd"], d);
    assert!(inspected.contains("score       neg-log-density"), "{inspected}");
    assert!(!inspected.contains("format      version 6"), "{inspected}");
    let (rows, flagged) = scored("density.ffjd", "s/valid.csv");
    assert!(rows.iter().all(|&(s, log_p, _)| s == -log_p), "{rows:?}");
    assert!(flagged <= 1, "{flagged} of 30 validation rows above the threshold");
    // `auto` measures both on synthetic outliers of the validation rows.
    let printed = export("auto", "auto.ffjd");
    assert!(
        printed
            .contains("score: AUROC on 30 validation rows against 120 synthetic outliers (up to 2 columns"),
        "{printed}"
    );
    let chosen = if printed.contains("→ latent-radius") { "latent-radius" } else { "neg-log-density" };
    let (inspected, _) = ok(&["inspect", "auto.ffjd"], d);
    assert!(inspected.contains(&format!("score       {chosen}")), "{inspected}");
}

/// `fit --train-base kde` on a labelled CSV: the flow trains on a kernel
/// base over training rows (leave-one-out), learns its bandwidth, keeps it
/// in the file, weighs −log p against the kernel base alone under `--score
/// auto`, and resumes exactly (the centres travel in the checkpoint).
/// `export --score base` stores the base alone (format version 7), with its
/// threshold calibrated on it.
#[test]
fn a_kernel_base_trained_with_the_flow_is_kept_and_resumes_exactly() {
    let dir = prepared_split();
    let d = dir.path();
    let fit = |out: &str, iterations: &str, resume: bool| {
        small_fit(d, out, iterations, resume, &["--train-base", "kde", "--kde-centres", "100"])
    };
    let (printed, warned) = fit("whole.ffjd", "40", false);
    let start = number_after(&warned, "kernel base: 100 centres, starting at bandwidth ");
    let trained =
        number_after(&printed, "base: the Gaussian KDE trained with the flow on 100 centres, bandwidth ");
    assert!(
        start > 0.0 && (trained / start - 1.0).abs() > 1e-3,
        "bandwidth {start} → {trained}: not trained"
    );
    assert!(
        printed.contains("score: AUROC on 30 validation rows against 120 synthetic outliers")
            && printed.contains(", kernel base alone −log p_base(z) "),
        "{printed}"
    );
    let chosen = if printed.contains("→ latent-base") { "latent-base" } else { "neg-log-density" };
    let (inspected, _) = ok(&["inspect", "whole.ffjd"], d);
    assert!(inspected.contains("base: Gaussian KDE on 100 latent points"), "{inspected}");
    assert!(inspected.contains(&format!("score       {chosen}")), "{inspected}");
    // The base alone: −log p_base(z) per row, the threshold calibrated on it.
    ok(&["export", "--run-dir", "whole.run", "--out", "base.ffjd", "--score", "base"], d);
    let (inspected, _) = ok(&["inspect", "base.ffjd"], d);
    assert!(inspected.contains("format      version 7"), "{inspected}");
    assert!(inspected.contains("score       latent-base"), "{inspected}");
    let (out, _) = ok(&["score", "--model", "base.ffjd", "--data", "s/valid.csv"], d);
    let rows: Vec<Vec<&str>> = out.lines().skip(1).map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 30);
    for f in &rows {
        // score = −log_p_base, and log p still has the volume change.
        assert_eq!(f[2].parse::<f64>().unwrap(), -f[5].parse::<f64>().unwrap(), "{f:?}");
        assert_ne!(f[1], f[5], "{f:?}");
    }
    let flagged = rows.iter().filter(|f| f[3] == "anomaly").count();
    assert!(flagged <= 1, "{flagged} of 30 validation rows above the threshold");
    // Its JSON form keeps the kind: imported back, the same scores.
    ok(&["export", "--run-dir", "whole.run", "--out", "base.json", "--format", "json", "--score", "base"], d);
    assert!(std::fs::read_to_string(d.join("base.json")).unwrap().contains("\"score\": \"LatentBase\""));
    ok(&["import", "base.json", "--out", "base-imported.ffjd"], d);
    let (again, _) = ok(&["score", "--model", "base-imported.ffjd", "--data", "s/valid.csv"], d);
    assert_eq!(again, out);
    // The base is part of what was trained: export cannot choose another.
    let refused = trainer(&["export", "--run-dir", "whole.run", "--out", "x.ffjd", "--base", "normal"], d);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && said.contains("trained on a kernel base"), "{said}");
    assert!(!d.join("x.ffjd").exists());
    fit("split.ffjd", "20", false);
    let (_, resumed) = fit("split.ffjd", "40", true);
    assert!(!resumed.contains("kernel base:"), "a resumed run keeps its base: {resumed}");
    let score = |m: &str| ok(&["score", "--model", m, "--data", "s/test.csv", "--label", "anomaly"], d).0;
    assert_eq!(score("whole.ffjd"), score("split.ffjd"), "centres, bandwidth and weight all carry over");
}

/// `fit` on a data file trains on both bases by default (`--train-base
/// auto`), keeps the model file with the better validation NLL, makes the
/// run folder that candidate's (its config names the base), and a
/// `--resume` continues on that base.
#[test]
fn the_default_fit_keeps_the_base_with_the_better_validation_nll() {
    let dir = prepared_split();
    let d = dir.path();
    let fit = |iterations: &str, resume: bool| small_fit(d, "m.ffjd", iterations, resume, &[]);
    let (printed, _) = fit("20", false);
    let nll = |label: &str| number_after(&printed, &format!("| {label} | "));
    let (normal, kernel) = (nll("N(0, I)"), nll("kernel base"));
    let (chosen, base) = if kernel < normal { ("kernel base", "kde") } else { ("N(0, I)", "normal") };
    assert!(
        printed.contains(&format!("chosen: train base {chosen} (validation NLL {:.4})", normal.min(kernel))),
        "{printed}"
    );
    let config = std::fs::read_to_string(d.join("m.run/config.toml")).unwrap();
    assert!(config.contains(&format!("train_base = \"{base}\"")), "{config}");
    // Both candidates' files exist; the chosen one is m.ffjd byte for byte.
    let chosen_file = d.join(format!("m.run/bases/{}/m.ffjd", usize::from(base == "kde")));
    assert_eq!(std::fs::read(chosen_file).unwrap(), std::fs::read(d.join("m.ffjd")).unwrap());
    let (resumed, warned) = fit("30", true);
    assert!(warned.contains("resumed at iteration 20"), "{warned}");
    assert!(!resumed.contains("chosen:"), "a resumed run trains its own base only: {resumed}");
}

/// More columns than training rows (as on arrhythmia: 274 columns, 174
/// rows): the full-covariance baselines cannot be fitted, and `benchmark`
/// compares the flow with the others instead of failing.
#[test]
fn a_benchmark_with_more_columns_than_rows_leaves_out_what_cannot_be_fitted() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut u = uniform(7);
    let mut raw = String::new();
    for i in 0..80 {
        let outlier = i % 5 == 0;
        let row: Vec<String> =
            (0..40).map(|_| format!("{:.6}", u() + u() - 1.0 + if outlier { 1.5 } else { 0.0 })).collect();
        raw += &format!("{},{}\n", row.join(","), u8::from(outlier));
    }
    std::fs::write(d.join("raw.csv"), raw).unwrap();
    let (prepared, _) =
        ok(&["prepare", "csv", "--raw", "raw.csv", "--label", "40", "--outlier", "1", "--out-dir", "s"], d);
    assert!(prepared.contains("train 29 normal rows"), "{prepared}");
    small_fit(d, "m.ffjd", "20", false, &["--train-base", "normal"]);
    let (table, notes) =
        ok(&["benchmark", "--run-dir", "m.run", "--model", "m.ffjd", "--test", "s/test.csv"], d);
    for method in ["FFJORD (this model)", "Isolation forest", "Local outlier factor", "Gaussian KDE"] {
        assert!(table.contains(method), "{method} missing: {table}");
    }
    assert!(!table.contains("Gaussian (full covariance)") && !table.contains("Gaussian mixture"), "{table}");
    for note in [
        "Gaussian (full covariance): left out (29 rows are too few for 1 full-covariance components in 40 dimensions)",
        "Gaussian mixture (K = 8): left out",
    ] {
        assert!(notes.contains(note), "{note}: {notes}");
    }
}

/// `fit` on the prepared split `s/` in `d`: a 2×16 net, batches of 64,
/// validation every 10 iterations, `--resume` if asked, then `extra`.
fn small_fit(d: &Path, out: &str, iterations: &str, resume: bool, extra: &[&str]) -> (String, String) {
    let mut a = vec![
        "fit",
        "--data",
        "s/train.csv",
        "--valid-data",
        "s/valid.csv",
        "--out",
        out,
        "--iterations",
        iterations,
        "--valid-every",
        "10",
        "--hidden",
        "16,16",
        "--batch",
        "64",
    ];
    if resume {
        a.push("--resume");
    }
    a.extend_from_slice(extra);
    ok(&a, d)
}

/// A temporary folder with the labelled CSV prepared (split seed 0) in `s/`.
fn prepared_split() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_labelled(&dir.path().join("raw.csv"));
    ok(
        &["prepare", "csv", "--raw", "raw.csv", "--label", "3", "--outlier", "bad", "--out-dir", "s"],
        dir.path(),
    );
    dir
}
