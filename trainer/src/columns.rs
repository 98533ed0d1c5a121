//! What each data column looks like before a density is fitted to it:
//! constant, quantized on a decimal grid (integers, counts, rates recorded to
//! three decimals), binary, or dominated by one repeated value (zeros standing
//! for "missing"). Quantized columns are dequantized at training time, and the
//! standardization accounts for that noise, so a density never collapses onto
//! a lattice or a single value.

use crate::data::Table;

/// One column's profile in the training rows.
#[derive(Clone, Debug, PartialEq)]
pub struct ColumnProfile {
    /// Column name.
    pub name: String,
    /// Rows profiled.
    pub rows: usize,
    /// Distinct values.
    pub distinct: usize,
    /// The coarsest power of ten every value is a multiple of (10⁻⁶ … 1), if any.
    pub grid: Option<f64>,
    /// Share of rows holding the most frequent value.
    pub top_share: f64,
    /// The most frequent value.
    pub top_value: f64,
}

impl ColumnProfile {
    /// Every row holds the same value.
    pub fn constant(&self) -> bool {
        self.distinct == 1
    }

    /// Exactly two distinct values.
    pub fn binary(&self) -> bool {
        self.distinct == 2
    }

    /// Width of the uniform dequantization noise this column gets at training
    /// time, in data units: the grid step for a quantized column with ties
    /// (at most half as many distinct values as rows) or a constant column;
    /// `None` for a continuous column. A constant column off every decimal
    /// grid gets 10⁻³ of its magnitude (at least 10⁻³).
    pub fn dequantization(&self) -> Option<f64> {
        let tied = self.distinct * 2 <= self.rows;
        match self.grid {
            Some(step) if tied || self.constant() => Some(step),
            None if self.constant() => Some(1e-3 * self.top_value.abs().max(1.0)),
            _ => None,
        }
    }

    /// Warnings a user should read before training on this column.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if self.constant() {
            w.push(format!(
                "constant ({}) in every training row: modelled as uniform noise of width {} around it, so rows that differ there score as far out",
                self.top_value,
                fmt_g(self.dequantization().unwrap_or(0.0))
            ));
        } else if self.top_share >= 0.5 {
            w.push(format!(
                "{:.0}% of rows are {} (a stand-in for missing values?)",
                100.0 * self.top_share,
                self.top_value
            ));
        }
        if self.binary() {
            w.push("binary".into());
        }
        w
    }
}

/// A short number: 1, 0.001, 1e-6.
pub fn fmt_g(v: f64) -> String {
    if v != 0.0 && (v.abs() < 1e-4 || v.abs() >= 1e6) { format!("{v:e}") } else { format!("{v}") }
}

/// `v` to three significant digits (for measured widths, not exact grids).
pub fn fmt_sig3(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let decimals = (2 - v.abs().log10().floor() as i32).max(0) as usize;
    fmt_g(format!("{v:.decimals$}").parse().unwrap_or(v))
}

/// The coarsest power of ten (10⁻⁶ … 1) all of `values` are multiples of
/// (within the rounding of decimal text to f64). Capped at 1: integers that
/// happen to be multiples of 10 are still counted in ones.
fn decimal_grid(values: impl Iterator<Item = f64> + Clone) -> Option<f64> {
    (-6..=0).rev().map(|k| 10f64.powi(k)).find(|&step| {
        values.clone().all(|v| (v - (v / step).round() * step).abs() <= 1e-9 * v.abs().max(step))
    })
}

/// Profiles every column of `table`.
pub fn profile(table: &Table) -> Vec<ColumnProfile> {
    let d = table.dim();
    (0..d)
        .map(|j| {
            let column = (0..table.rows).map(move |i| table.values[i * d + j]);
            let mut sorted: Vec<f64> = column.clone().collect();
            sorted.sort_by(f64::total_cmp);
            let (mut distinct, mut best, mut top_value, mut run) = (0, 0, f64::NAN, 0);
            for (i, &v) in sorted.iter().enumerate() {
                if i == 0 || v != sorted[i - 1] {
                    distinct += 1;
                    run = 0;
                }
                run += 1;
                if run > best {
                    best = run;
                    top_value = v;
                }
            }
            ColumnProfile {
                name: table.columns[j].clone(),
                rows: table.rows,
                distinct,
                grid: decimal_grid(column),
                top_share: best as f64 / table.rows.max(1) as f64,
                top_value,
            }
        })
        .collect()
}

/// A table of the profiles (markdown), one line per column.
pub fn report(profiles: &[ColumnProfile]) -> String {
    let mut s = String::from("| column | distinct | grid | dequantized (width) | most frequent | notes |\n");
    s += "|---|---|---|---|---|---|\n";
    for p in profiles {
        s += &format!(
            "| {} | {} | {} | {} | {} ({:.0}%) | {} |\n",
            p.name,
            p.distinct,
            p.grid.map_or("-".into(), fmt_g),
            p.dequantization().map_or("no".into(), fmt_g),
            p.top_value,
            100.0 * p.top_share,
            p.warnings().join("; ")
        );
    }
    s
}

/// At most this many per-column lines on stderr: a file with hundreds of
/// columns gets the first ones and a count, not a screenful.
pub const SHOWN_COLUMN_NOTES: usize = 12;

/// `items` joined by ", ", the first `keep` of them and then how many more.
pub fn abridged(items: &[String], keep: usize) -> String {
    let shown = items[..items.len().min(keep)].join(", ");
    match items.len().saturating_sub(keep) {
        0 => shown,
        more => format!("{shown}, … and {more} more"),
    }
}

/// Prints [`warnings`] to stderr, at most [`SHOWN_COLUMN_NOTES`] of them and
/// then a count of the rest (`where_all`: where every column is listed).
pub fn print_warnings(profiles: &[ColumnProfile], where_all: &str) {
    let all = warnings(profiles);
    for w in all.iter().take(SHOWN_COLUMN_NOTES) {
        eprintln!("warning: {w}");
    }
    if all.len() > SHOWN_COLUMN_NOTES {
        eprintln!("warning: … and {} more columns like these ({where_all})", all.len() - SHOWN_COLUMN_NOTES);
    }
}

/// One line per column that needs the user's attention (constant, mostly one value).
pub fn warnings(profiles: &[ColumnProfile]) -> Vec<String> {
    profiles
        .iter()
        .flat_map(|p| {
            p.warnings()
                .into_iter()
                .filter(|w| w != "binary")
                .map(move |w| format!("column '{}': {w}", p.name))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_list_is_cut_with_a_count() {
        let items: Vec<String> = (0..5).map(|i| format!("c{i}")).collect();
        assert_eq!(abridged(&items, 5), "c0, c1, c2, c3, c4");
        assert_eq!(abridged(&items, 2), "c0, c1, … and 3 more");
        assert_eq!(abridged(&[], 2), "");
    }

    fn table(cols: &[&[f64]]) -> Table {
        let rows = cols[0].len();
        let values = (0..rows).flat_map(|i| cols.iter().map(move |c| c[i])).collect();
        Table { columns: (0..cols.len()).map(|j| format!("c{j}")).collect(), rows, values }
    }

    #[test]
    fn measured_widths_print_three_significant_digits() {
        assert_eq!(fmt_sig3(1.7756538655298368), "1.78");
        assert_eq!(fmt_sig3(18.765371090441832), "18.8");
        assert_eq!(fmt_sig3(0.0030175121744869748), "0.00302");
        assert_eq!(fmt_sig3(1234.6), "1235");
        assert_eq!(fmt_sig3(0.0), "0");
    }

    #[test]
    fn finds_grids_ties_constants_and_repeats() {
        let ints = [3.0, 4.0, 4.0, 7.0, 3.0, 7.0];
        let rates = [0.007, 0.0, 0.0, 0.001, 0.0, 0.002];
        let tens = [10.0, 20.0, 10.0, 30.0, 20.0, 30.0]; // counted in ones
        let constant = [2.5, 2.5, 2.5, 2.5, 2.5, 2.5];
        let odd = [0.123_456_789, 0.123_456_789, 0.123_456_789, 0.123_456_789, 0.123_456_789, 0.123_456_789];
        let continuous = [0.313_1, -1.270_44, 2.000_17, 0.5, 0.25, -0.75];
        let p = profile(&table(&[&ints, &rates, &tens, &constant, &odd, &continuous]));
        assert_eq!(p[0].grid, Some(1.0));
        assert_eq!(p[0].dequantization(), Some(1.0));
        assert_eq!(p[1].grid, Some(0.001));
        assert_eq!((p[1].top_value, p[1].top_share), (0.0, 0.5));
        assert!(p[1].warnings()[0].contains("50% of rows are 0"));
        assert_eq!(p[2].dequantization(), Some(1.0));
        assert!(p[3].constant() && p[3].grid == Some(0.1) && p[3].dequantization() == Some(0.1));
        assert!(p[3].warnings()[0].starts_with("constant (2.5)"));
        assert_eq!((p[4].grid, p[4].dequantization()), (None, Some(1e-3)));
        // Six distinct values on a 1e-5 grid: no ties, so no dequantization.
        assert_eq!(p[5].distinct, 6);
        assert_eq!(p[5].dequantization(), None);
        assert!(report(&p).lines().count() == 8);
        assert_eq!(warnings(&p).len(), 3);
    }
}
