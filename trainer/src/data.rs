//! Data: CSV and NPY files, the toy 2-D generators (spec §6.1), splits and
//! standardization. Errors name the file, line and column.

use std::path::Path;

use anyhow::{Context, Result, bail};
use tch::{Kind, Tensor};

/// A table of rows (f64, row-major) with its column names.
#[derive(Clone, Debug)]
pub struct Table {
    pub columns: Vec<String>,
    pub rows: usize,
    pub values: Vec<f64>,
}

impl Table {
    pub fn dim(&self) -> usize {
        self.columns.len()
    }

    pub fn to_tensor(&self) -> Tensor {
        Tensor::from_slice(&self.values).reshape([self.rows as i64, self.dim() as i64])
    }

    pub fn from_tensor(t: &Tensor, columns: Vec<String>) -> Result<Self> {
        let t = t.to_kind(Kind::Double).contiguous();
        let rows = t.size()[0] as usize;
        let values = Vec::<f64>::try_from(&t.view(-1))?;
        Ok(Table { columns, rows, values })
    }

    /// The rows for which `keep(row index)` holds.
    pub fn keep_rows(&self, keep: impl Fn(usize) -> bool) -> Table {
        let d = self.dim();
        let kept: Vec<usize> = (0..self.rows).filter(|&i| keep(i)).collect();
        let values = kept.iter().flat_map(|&i| self.values[i * d..(i + 1) * d].iter().copied()).collect();
        Table { columns: self.columns.clone(), rows: kept.len(), values }
    }

    pub fn row(&self, i: usize) -> &[f64] {
        let d = self.dim();
        &self.values[i * d..(i + 1) * d]
    }
}

/// Reads a CSV or NPY file (by extension). `columns` selects columns by name
/// (CSV with header) or 0-based index.
pub fn load(path: &Path, columns: Option<&[String]>) -> Result<Table> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("npy") => load_npy(path, columns),
        _ => load_csv(path, columns),
    }
}

fn load_npy(path: &Path, columns: Option<&[String]>) -> Result<Table> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let npy = npyz::NpyFile::new(&bytes[..])
        .with_context(|| format!("{}: not a valid NPY file", path.display()))?;
    let shape = npy.shape().to_vec();
    let (rows, dim) = match shape.as_slice() {
        [r, d] => (*r as usize, *d as usize),
        [r] => (*r as usize, 1),
        _ => bail!("{}: expected a 1-D or 2-D array, found shape {shape:?}", path.display()),
    };
    if npy.order() == npyz::Order::Fortran {
        bail!("{}: Fortran-ordered arrays are not supported; save with C order", path.display());
    }
    let values: Vec<f64> = match npy.dtype() {
        npyz::DType::Plain(t) if t.type_char() == npyz::TypeChar::Float && t.size_field() == 4 => {
            npy.into_vec::<f32>()?.into_iter().map(f64::from).collect()
        }
        npyz::DType::Plain(t) if t.type_char() == npyz::TypeChar::Float && t.size_field() == 8 => {
            npy.into_vec::<f64>()?
        }
        other => bail!("{}: unsupported dtype {other:?} (use float32 or float64)", path.display()),
    };
    let all: Vec<String> = (0..dim).map(|i| format!("x{i}")).collect();
    let table = Table { columns: all, rows, values };
    check_values(&table, path)?;
    select(table, columns, path)
}

/// Whether a CSV's first row is a header: only when none of its fields is a
/// number, so a first data row with a typo is reported, never taken for names
/// (every CSV reader in the trainer uses this rule).
pub fn is_header_row<S: AsRef<str>>(fields: &[S]) -> bool {
    fields.iter().all(|f| f.as_ref().trim().parse::<f64>().is_err())
}

fn load_csv(path: &Path, columns: Option<&[String]>) -> Result<Table> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .comment(Some(b'#'))
        .from_path(path)
        .with_context(|| format!("reading {}", path.display()))?;
    let mut header: Option<Vec<String>> = None;
    let mut width = None;
    let mut values = Vec::new();
    let mut rows = 0usize;
    for (i, record) in reader.records().enumerate() {
        let record = record.with_context(|| format!("{}: malformed CSV", path.display()))?;
        let line = record.position().map_or(i as u64 + 1, |p| p.line());
        let fields: Vec<&str> = record.iter().map(str::trim).collect();
        // A header only when no field of the first row is a number: a first
        // data row with one typo is an error naming it, never silently taken
        // for column names (which would drop the row and shift row numbers).
        if i == 0 && is_header_row(&fields) {
            header = Some(fields.iter().map(|s| s.to_string()).collect());
            width = Some(fields.len());
            continue;
        }
        let w = *width.get_or_insert(fields.len());
        if fields.len() != w {
            bail!("{}:{line}: {} fields, expected {w} (as in the first row)", path.display(), fields.len());
        }
        for (c, f) in fields.iter().enumerate() {
            let v: f64 = f
                .parse()
                .map_err(|_| anyhow::anyhow!("{}:{line}:{}: '{f}' is not a number", path.display(), c + 1))?;
            if !v.is_finite() {
                bail!("{}:{line}:{}: value '{f}' is not finite", path.display(), c + 1);
            }
            if v.abs() > f64::from(f32::MAX) {
                bail!(
                    "{}:{line}:{}: value '{f}' is outside the float32 range the model computes in (|x| ≤ 3.4e38)",
                    path.display(),
                    c + 1
                );
            }
            values.push(v);
        }
        rows += 1;
    }
    let w = width.unwrap_or(0);
    if rows == 0 {
        bail!("{}: no data rows", path.display());
    }
    let names = header.unwrap_or_else(|| (0..w).map(|i| format!("x{i}")).collect());
    select(Table { columns: names, rows, values }, columns, path)
}

/// Every value finite and within float32's range; at least one row.
fn check_values(t: &Table, path: &Path) -> Result<()> {
    if t.rows == 0 || t.dim() == 0 {
        bail!("{}: no data rows", path.display());
    }
    if let Some(i) = t.values.iter().position(|v| !v.is_finite() || v.abs() > f64::from(f32::MAX)) {
        let what = if t.values[i].is_finite() { "outside the float32 range" } else { "not finite" };
        bail!("{}: row {}, column {}: value is {what}", path.display(), i / t.dim() + 1, i % t.dim() + 1);
    }
    Ok(())
}

fn select(t: Table, columns: Option<&[String]>, path: &Path) -> Result<Table> {
    let Some(columns) = columns else { return Ok(t) };
    let mut idx = Vec::new();
    for c in columns {
        let i = match t.columns.iter().position(|n| n == c) {
            Some(i) => i,
            None => c.parse::<usize>().ok().filter(|&i| i < t.dim()).with_context(|| {
                format!("{}: no column '{c}' (columns: {})", path.display(), t.columns.join(", "))
            })?,
        };
        idx.push(i);
    }
    let d = t.dim();
    let mut values = Vec::with_capacity(t.rows * idx.len());
    for r in 0..t.rows {
        for &i in &idx {
            values.push(t.values[r * d + i]);
        }
    }
    Ok(Table { columns: idx.iter().map(|&i| t.columns[i].clone()).collect(), rows: t.rows, values })
}

/// Train/validation/test tensors and the standardization fitted on train.
pub struct Splits {
    pub train: Tensor,
    pub valid: Tensor,
    pub test: Tensor,
    pub mean: Tensor,
    pub std: Tensor,
    /// Width of the uniform dequantization noise per column, in standardized
    /// units (0 for a continuous column). Training batches get
    /// `(U(0, 1) − ½) · noise`; validation, test and scoring use the rows as
    /// they are, i.e. the centres of the quantization cells.
    pub noise: Tensor,
    /// Per training row and column widths `[rows, D]` (standardized units)
    /// where they differ between rows ([`spike_widths`]); `noise` then holds
    /// their root mean square per column.
    pub row_noise: Option<Tensor>,
    /// The training file's column profile (empty for toy sets).
    pub profiles: Vec<crate::columns::ColumnProfile>,
    /// `[C, H, W]` for 8-bit images ([`Splits::images`]), else `None`.
    pub image_shape: Option<[i64; 3]>,
}

impl Splits {
    /// Shuffles (seeded) and splits `table` by fractions; `widths` and
    /// `spread` as in [`Splits::dequantized`].
    pub fn from_table(
        table: &Table,
        valid_fraction: f64,
        test_fraction: f64,
        widths: &[f64],
        spread: bool,
    ) -> Result<Self> {
        let x = table.to_tensor();
        let n = table.rows as i64;
        let perm = Tensor::randperm(n, (Kind::Int64, tch::Device::Cpu));
        let x = x.index_select(0, &perm);
        let n_test = ((n as f64) * test_fraction).round() as i64;
        let n_valid = ((n as f64) * valid_fraction).round() as i64;
        let n_train = n - n_test - n_valid;
        if n_train < 2 || n_valid < 1 {
            bail!("{n} rows are too few to split into train/validation/test");
        }
        let train = x.narrow(0, 0, n_train);
        let valid = x.narrow(0, n_train, n_valid);
        let test = x.narrow(0, n_train + n_valid, n_test);
        Ok(Self::dequantized(train, valid, test, widths, spread))
    }

    /// Standardizes with train statistics (std floored at 1e-12), no dequantization.
    pub fn standardized(train: Tensor, valid: Tensor, test: Tensor) -> Self {
        let d = train.size()[1] as usize;
        Self::dequantized(train, valid, test, &vec![0.0; d], false)
    }

    /// Standardizes with the statistics of the training rows *as the flow sees
    /// them*: a column dequantized with uniform noise of width `w` (data units)
    /// has variance `var + w²/12`, so a constant or nearly constant quantized
    /// column keeps a finite scale. With `spread`, repeated values get the
    /// wider cells of [`spike_widths`].
    pub fn dequantized(train: Tensor, valid: Tensor, test: Tensor, widths: &[f64], spread: bool) -> Self {
        let w = Tensor::from_slice(widths).to_kind(Kind::Double);
        let mean = train.mean_dim(0, false, Kind::Double);
        let var = if train.size()[0] > 1 { train.var_dim(0, true, false) } else { mean.zeros_like() };
        let row_widths = spread.then(|| {
            let std = Vec::<f64>::try_from((&var + w.square() / 12.0).sqrt()).unwrap_or_default();
            spike_widths(&train.to_kind(Kind::Double), widths, &std)
        });
        // Mean square of the noise width per column: what the variance gains.
        let w2 = match &row_widths {
            Some(r) => r.square().mean_dim(0, false, Kind::Double),
            None => w.square(),
        };
        let std = (var + &w2 / 12.0).sqrt().clamp_min(1e-12);
        let f = |x: &Tensor| (x - &mean) / &std;
        let noise = w2.sqrt() / &std;
        let row_noise = row_widths.map(|r| r / &std);
        Splits {
            train: f(&train),
            valid: f(&valid),
            test: f(&test),
            mean,
            std,
            noise,
            row_noise,
            profiles: Vec::new(),
            image_shape: None,
        }
    }

    /// 8-bit images as rows of pixel bytes: scaled to `[0, 1)` by 256 (no
    /// per-pixel standardization: a border pixel that is always 0 is data),
    /// at the cell centres `(x + ½)/256`, and dequantized in training by
    /// one byte's width, so batches are `(x + u)/256`, `u ~ U(0, 1)` — the
    /// spec's dequantization, on the scale its bits/dim are defined on.
    pub fn images(train: &Tensor, valid: &Tensor, test: &Tensor) -> Self {
        let d = train.size()[1];
        let opts = (Kind::Double, tch::Device::Cpu);
        let f = |x: &Tensor| (x.to_kind(Kind::Double) + 0.5) / 256.0;
        Splits {
            train: f(train),
            valid: f(valid),
            test: f(test),
            mean: Tensor::full([d], -0.5, opts),
            std: Tensor::full([d], 256.0, opts),
            noise: Tensor::full([d], 1.0 / 256.0, opts),
            row_noise: None,
            profiles: Vec::new(),
            image_shape: None,
        }
    }

    pub fn dim(&self) -> i64 {
        self.mean.size()[0]
    }

    /// Whether any column is dequantized.
    pub fn dequantizes(&self) -> bool {
        self.noise.abs().max().double_value(&[]) > 0.0
    }

    /// `rows` (standardized) as training sees data: each dequantized column
    /// with one seeded draw of its uniform noise (with `--spread-spikes`, the
    /// column's root-mean-square width). Kernel estimates are fitted and
    /// compared on these rather than on the cell centres: a row that repeats
    /// a training row exactly would sit on that row's kernel and reward a
    /// vanishing bandwidth — the likelihood of a point mass, not of the
    /// density the flow is trained on. Rows without dequantization come back
    /// unchanged.
    pub fn with_fixed_noise(&self, rows: &Tensor, seed: i64) -> Tensor {
        if !self.dequantizes() || rows.size()[0] == 0 {
            return rows.shallow_clone();
        }
        tch::manual_seed(seed.wrapping_add(FIXED_NOISE_SEED));
        let u = Tensor::rand(rows.size(), (Kind::Double, tch::Device::Cpu)) - 0.5;
        let noised = rows.to_kind(Kind::Double).to_device(tch::Device::Cpu) + u * &self.noise;
        noised.to_kind(rows.kind()).to_device(rows.device())
    }
}

/// Seed offset of [`Splits::with_fixed_noise`] (not a training stream).
const FIXED_NOISE_SEED: i64 = 0x6e6f_6973;

/// Dequantization widths per training row and column `[rows, D]` (data
/// units) that cap every cell's density. A value held by a share `s` of the
/// rows of a column with grid step `w > 0` and standard deviation `σ` gets
/// the cell width `max(w, s·σ·√(2π))`: its uniform block of mass `s` is then
/// at most as dense as the peak of `N(·; m, σ²)`. Ordinary lattice values
/// (each a few percent of the rows) keep one grid step; only heavy repeats
/// widen. Continuous columns (`w = 0`) stay 0.
pub fn spike_widths(train: &Tensor, widths: &[f64], std: &[f64]) -> Tensor {
    let (n, d) = (train.size()[0] as usize, widths.len());
    let x = Vec::<f64>::try_from(train.reshape([-1])).unwrap_or_default();
    let mut out = vec![0.0; n * d];
    let scale = (2.0 * std::f64::consts::PI).sqrt();
    for j in 0..d {
        let w = widths[j];
        if w <= 0.0 || n == 0 || x.len() != n * d {
            continue;
        }
        // Values on the grid, grouped by their cell index.
        let cells: Vec<i64> = (0..n).map(|i| (x[i * d + j] / w).round() as i64).collect();
        let mut counts = std::collections::HashMap::<i64, usize>::new();
        for c in &cells {
            *counts.entry(*c).or_default() += 1;
        }
        for (i, c) in cells.iter().enumerate() {
            let share = counts[c] as f64 / n as f64;
            out[i * d + j] = w.max(share * std[j] * scale);
        }
    }
    Tensor::from_slice(&out).reshape([n as i64, d as i64])
}

/// The toy 2-D data sets of spec §6.1.
pub const TOYS: [&str; 8] =
    ["8gaussians", "pinwheel", "checkerboard", "2spirals", "moons", "circles", "rings", "swissroll"];

/// Draws `n` points of a toy set (f64, CPU) from tch's seeded generator.
pub fn toy(name: &str, n: i64) -> Result<Tensor> {
    let opts = (Kind::Double, tch::Device::Cpu);
    let pi = std::f64::consts::PI;
    let x = match name {
        "8gaussians" => {
            let s = 1.0 / 2f64.sqrt();
            let centers =
                Tensor::from_slice(&[1.0, 0.0, -1.0, 0.0, 0.0, 1.0, 0.0, -1.0, s, s, s, -s, -s, s, -s, -s])
                    .reshape([8, 2])
                    * 4.0;
            let idx = Tensor::randint(8, [n], (Kind::Int64, tch::Device::Cpu));
            (Tensor::randn([n, 2], opts) * 0.5 + centers.index_select(0, &idx)) / 1.414
        }
        "pinwheel" => {
            let per = n / 5;
            let m = per * 5;
            let feats = Tensor::randn([m, 2], opts) * Tensor::from_slice(&[0.3, 0.1]);
            let f0 = feats.select(1, 0) + 1.0;
            let f1 = feats.select(1, 1);
            let labels = Tensor::arange(5, opts).repeat_interleave_self_int(per, 0, None::<i64>);
            let angle = labels * (2.0 * pi / 5.0) + f0.exp() * 0.25;
            let xo = &f0 * angle.cos() + &f1 * angle.sin();
            let yo = -(&f0 * angle.sin()) + &f1 * angle.cos();
            let out = Tensor::stack(&[xo, yo], 1) * 2.0;
            out.index_select(0, &Tensor::randperm(m, (Kind::Int64, tch::Device::Cpu)))
        }
        "checkerboard" => {
            let x1 = Tensor::rand([n], opts) * 4.0 - 2.0;
            let x2 = Tensor::rand([n], opts) - Tensor::randint(2, [n], opts) * 2.0;
            let x2 = x2 + x1.floor().remainder(2.0);
            Tensor::stack(&[x1, x2], 1) * 2.0
        }
        "2spirals" => {
            let h = n / 2;
            let r = Tensor::rand([h], opts).sqrt() * (540.0 * 2.0 * pi / 360.0);
            let dx = -(r.cos() * &r) + Tensor::rand([h], opts) * 0.5;
            let dy = r.sin() * &r + Tensor::rand([h], opts) * 0.5;
            let arm = Tensor::stack(&[dx, dy], 1);
            let x = Tensor::cat(&[arm.shallow_clone(), -arm], 0) / 3.0;
            &x + x.randn_like() * 0.1
        }
        "moons" => {
            let outer = n / 2;
            let inner = n - outer;
            let to = Tensor::linspace(0.0, pi, outer, opts);
            let ti = Tensor::linspace(0.0, pi, inner, opts);
            let a = Tensor::stack(&[to.cos(), to.sin()], 1);
            let b = Tensor::stack(&[-ti.cos() + 1.0, -ti.sin() + 0.5], 1);
            let x = Tensor::cat(&[a, b], 0);
            let x = x.index_select(0, &Tensor::randperm(n, (Kind::Int64, tch::Device::Cpu)));
            let x = &x + x.randn_like() * 0.1;
            x * 2.0 + Tensor::from_slice(&[-1.0, -0.2])
        }
        "circles" => {
            let outer = n / 2;
            let inner = n - outer;
            let ring = |k: i64, r: f64| {
                let t = Tensor::arange(k, opts) * (2.0 * pi / k as f64);
                Tensor::stack(&[t.cos() * r, t.sin() * r], 1)
            };
            let x = Tensor::cat(&[ring(outer, 1.0), ring(inner, 0.5)], 0);
            let x = x.index_select(0, &Tensor::randperm(n, (Kind::Int64, tch::Device::Cpu)));
            (&x + x.randn_like() * 0.08) * 3.0
        }
        "rings" => {
            let q = n / 4;
            let counts = [q, q, q, n - 3 * q];
            let radii = [1.0, 0.75, 0.5, 0.25];
            let parts: Vec<Tensor> = counts
                .iter()
                .zip(radii)
                .map(|(&k, r)| {
                    let t = Tensor::arange(k, opts) * (2.0 * pi / k.max(1) as f64);
                    Tensor::stack(&[t.cos() * r, t.sin() * r], 1)
                })
                .collect();
            let x = Tensor::cat(&parts, 0) * 3.0;
            let x = x.index_select(0, &Tensor::randperm(n, (Kind::Int64, tch::Device::Cpu)));
            &x + x.randn_like() * 0.08
        }
        "swissroll" => {
            let t = (Tensor::rand([n], opts) * 2.0 + 1.0) * (1.5 * pi);
            let x = Tensor::stack(&[t.cos() * &t, t.sin() * &t], 1);
            (&x + x.randn_like()) / 5.0
        }
        other => bail!("unknown toy data set '{other}' (choose one of {})", TOYS.join(", ")),
    };
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One fixed draw of the dequantization noise: the same for the same
    /// seed, within half a cell of each value, none on a continuous column.
    #[test]
    fn fixed_noise_stays_in_its_cell_and_repeats_with_the_seed() {
        let n = 50;
        let train = Tensor::stack(
            &[
                Tensor::arange(n, (Kind::Double, tch::Device::Cpu)).remainder(4),
                Tensor::linspace(0.0, 1.0, n, (Kind::Double, tch::Device::Cpu)),
            ],
            1,
        );
        let s = Splits::dequantized(train.shallow_clone(), train.shallow_clone(), train, &[1.0, 0.0], false);
        let a = s.with_fixed_noise(&s.valid, 7);
        assert!(a.equal(&s.with_fixed_noise(&s.valid, 7)));
        assert!(!a.equal(&s.with_fixed_noise(&s.valid, 8)));
        let moved = Vec::<f64>::try_from((&a - &s.valid).abs().amax([0].as_slice(), false)).unwrap();
        let half_cell = Vec::<f64>::try_from(&s.noise / 2.0).unwrap();
        assert!(moved[0] > 0.5 * half_cell[0] && moved[0] <= half_cell[0], "{moved:?} {half_cell:?}");
        assert_eq!(moved[1], 0.0);
    }

    /// A column where 80 % of the rows are 0 and the rest spread over
    /// 1 … 20, next to a continuous column: only the zeros' cells widen, to
    /// `0.8·σ·√(2π)`, and the standardization counts the wider noise.
    #[test]
    fn only_heavy_repeats_get_wider_cells() {
        let n = 100;
        let mut rows = Vec::new();
        for i in 0..n {
            let quantized = if i < 80 { 0.0 } else { (i - 79) as f64 };
            rows.extend([quantized, 0.37 * i as f64 + 0.001 * (i * i) as f64]);
        }
        let train = Tensor::from_slice(&rows).reshape([n, 2]);
        let widths = [1.0, 0.0];
        let var = Vec::<f64>::try_from(train.var_dim(0, true, false)).unwrap();
        let sigma = (var[0] + 1.0 / 12.0).sqrt();
        let w = Vec::<f64>::try_from(spike_widths(&train, &widths, &[sigma, 1.0]).reshape([-1])).unwrap();
        let spike = 0.8 * sigma * (2.0 * std::f64::consts::PI).sqrt();
        assert!(spike > 1.0, "the test needs a spike wider than the grid: {spike}");
        for i in 0..n as usize {
            let expected = if i < 80 { spike } else { 1.0 };
            assert!((w[2 * i] - expected).abs() < 1e-12, "row {i}: {} vs {expected}", w[2 * i]);
            assert_eq!(w[2 * i + 1], 0.0, "a continuous column stays undequantized");
        }
        let s = Splits::dequantized(
            train.shallow_clone(),
            train.shallow_clone(),
            train.shallow_clone(),
            &widths,
            true,
        );
        let mean_square = (80.0 * spike * spike + 20.0) / 100.0;
        let std = Vec::<f64>::try_from(&s.std).unwrap();
        assert!((std[0] - (var[0] + mean_square / 12.0).sqrt()).abs() < 1e-9);
        let row_noise = Vec::<f64>::try_from(s.row_noise.unwrap().reshape([-1])).unwrap();
        assert!((row_noise[0] - spike / std[0]).abs() < 1e-12);
        assert!((row_noise[2 * 90] - 1.0 / std[0]).abs() < 1e-12);
        // Without `spread` every row of the column keeps one grid step.
        let plain = Splits::dequantized(train.shallow_clone(), train.shallow_clone(), train, &widths, false);
        assert!(plain.row_noise.is_none());
    }
}
