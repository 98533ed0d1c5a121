//! POWER (UCI household electric power, the FFJORD/MAF tabular benchmark):
//! the MAF preprocessing of `shared/datasets.md`, step by step.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, ensure};
use tch::{Device, Kind, Tensor};

/// `trainer prepare power`: drop the rows the package filled in (equal to the
/// minute one day earlier), add minutes since midnight, shuffle (seeded), drop
/// Global_intensity and Global_reactive_power, add U(0,1) noise scaled
/// 0.001 / 0.01 / 1 / 1 / 1 / 0, split test = last 10%, validation = last 10%
/// of the rest, standardize with train+validation statistics, write NPY.
pub fn prepare(raw: &Path, out_dir: &Path, seed: i64) -> Result<()> {
    const HEADER: &str = "date_time,Global_active_power,Global_reactive_power,Voltage,Global_intensity,Sub_metering_1,Sub_metering_2,Sub_metering_3";
    let file = std::fs::File::open(raw).with_context(|| format!("reading {}", raw.display()))?;
    let mut reader = csv::ReaderBuilder::new().has_headers(true).from_reader(std::io::BufReader::new(file));
    let header = reader.headers()?.iter().collect::<Vec<_>>().join(",");
    ensure!(header == HEADER, "{}: header is '{header}', expected '{HEADER}'", raw.display());
    let mut rows: Vec<[f64; 8]> = Vec::with_capacity(2_100_000);
    for (i, rec) in reader.records().enumerate() {
        let rec = rec.with_context(|| format!("{}: malformed CSV", raw.display()))?;
        let line = i + 2;
        let time = rec.get(0).unwrap_or_default();
        let minute = (|| -> Option<f64> {
            let hm = time.split(' ').nth(1)?;
            let mut p = hm.split(':');
            Some(p.next()?.parse::<f64>().ok()? * 60.0 + p.next()?.parse::<f64>().ok()?)
        })()
        .with_context(|| format!("{}:{line}:1: '{time}' is not 'YYYY-MM-DD HH:MM:SS'", raw.display()))?;
        let mut r = [0.0; 8];
        for (j, v) in r.iter_mut().take(7).enumerate() {
            let f = rec.get(j + 1).unwrap_or_default();
            *v = f
                .parse()
                .with_context(|| format!("{}:{line}:{}: '{f}' is not a number", raw.display(), j + 2))?;
        }
        r[7] = minute;
        rows.push(r);
    }
    ensure!(rows.len() == 2_075_259, "{}: {} rows, expected 2,075,259", raw.display(), rows.len());
    // 1. Drop the filled minutes: all 7 measurements equal to the row 1,440 minutes earlier.
    let keep: Vec<usize> =
        (0..rows.len()).filter(|&i| i < 1440 || rows[i][..7] != rows[i - 1440][..7]).collect();
    ensure!(
        keep.len() == 2_049_258,
        "{} rows left after dropping filled minutes, expected 2,049,258",
        keep.len()
    );
    // 3. Shuffle.
    tch::manual_seed(seed);
    let perm = Vec::<i64>::try_from(&Tensor::randperm(keep.len() as i64, (Kind::Int64, Device::Cpu)))?;
    // 4–5. Columns GAP, Voltage, Sub_1..3, time with scaled uniform noise.
    let cols = [0usize, 2, 4, 5, 6, 7];
    let scale = [0.001, 0.01, 1.0, 1.0, 1.0, 0.0];
    let n = keep.len();
    let noise = Vec::<f64>::try_from(&Tensor::rand([(n * 6) as i64], (Kind::Double, Device::Cpu)))?;
    let mut data = vec![0.0f64; n * 6];
    for (k, &p) in perm.iter().enumerate() {
        let r = &rows[keep[p as usize]];
        for (j, (&c, &s)) in cols.iter().zip(&scale).enumerate() {
            data[k * 6 + j] = r[c] + s * noise[k * 6 + j];
        }
    }
    // 6. Splits.
    let n_test = n / 10;
    let n_rest = n - n_test;
    let n_valid = n_rest / 10;
    let n_train = n_rest - n_valid;
    // 7. Standardize with train + validation statistics (population std, as NumPy).
    let mut mean = [0.0f64; 6];
    let mut var = [0.0f64; 6];
    for r in data[..n_rest * 6].chunks_exact(6) {
        for j in 0..6 {
            mean[j] += r[j];
        }
    }
    mean.iter_mut().for_each(|m| *m /= n_rest as f64);
    for r in data[..n_rest * 6].chunks_exact(6) {
        for j in 0..6 {
            var[j] += (r[j] - mean[j]).powi(2);
        }
    }
    let std: Vec<f64> = var.iter().map(|v| (v / n_rest as f64).sqrt()).collect();
    let standardized: Vec<f32> = data
        .chunks_exact(6)
        .flat_map(|r| (0..6).map(|j| ((r[j] - mean[j]) / std[j]) as f32).collect::<Vec<_>>())
        .collect();
    std::fs::create_dir_all(out_dir)?;
    crate::npy::write_f32(&out_dir.join("train.npy"), n_train, 6, &standardized[..n_train * 6])?;
    crate::npy::write_f32(&out_dir.join("valid.npy"), n_valid, 6, &standardized[n_train * 6..n_rest * 6])?;
    crate::npy::write_f32(&out_dir.join("test.npy"), n_test, 6, &standardized[n_rest * 6..])?;
    let mut f = std::fs::File::create(out_dir.join("README.txt"))?;
    writeln!(f, "POWER prepared by `trainer prepare power` (seed {seed}) from {}", raw.display())?;
    writeln!(
        f,
        "columns: Global_active_power, Voltage, Sub_metering_1, Sub_metering_2, Sub_metering_3, minute"
    )?;
    writeln!(
        f,
        "train {n_train}, valid {n_valid}, test {n_test}; standardized with train+valid mean {mean:?} std {std:?}"
    )?;
    println!(
        "power: train {n_train}, validation {n_valid}, test {n_test} rows (6 columns, standardized) in {}",
        out_dir.display()
    );
    Ok(())
}
