//! `trainer plot`: a 2-D model's learned density as a heatmap next to a
//! histogram of its samples, written as a PNG (pure Rust, no system fonts).

use std::path::Path;

use anyhow::{Context, Result, bail};
use ffjord_runtime::Model;
use tch::{Device, Kind, Tensor};

use crate::model::SolveOptions;
use crate::modelfile::{chain_from_model, write_atomic};
use crate::ode::dopri5_at;

/// Anchor colours of a perceptually ordered dark-to-bright map (magma-like).
const MAP: [[f64; 3]; 5] =
    [[0.0, 0.0, 4.0], [81.0, 18.0, 124.0], [183.0, 55.0, 121.0], [252.0, 137.0, 97.0], [252.0, 253.0, 191.0]];

fn colour(v: f64) -> [u8; 3] {
    let v = v.clamp(0.0, 1.0) * (MAP.len() - 1) as f64;
    let i = (v.floor() as usize).min(MAP.len() - 2);
    let f = v - i as f64;
    let mut c = [0u8; 3];
    for (k, ck) in c.iter_mut().enumerate() {
        *ck = (MAP[i][k] * (1.0 - f) + MAP[i + 1][k] * f).round() as u8;
    }
    c
}

/// What `plot` measured, for the caller to print.
pub struct PlotSummary {
    pub range: [(f64, f64); 2],
    /// ∫ p over the plotted square (a check that the density is normalized and in range).
    pub mass_in_view: f64,
}

/// Renders `grid × grid` density and sample panels for a 2-D model file.
pub fn plot(
    model_path: &Path,
    out: &Path,
    grid: i64,
    samples: i64,
    seed: i64,
    tol: f64,
) -> Result<PlotSummary> {
    let bytes = std::fs::read(model_path).with_context(|| format!("reading {}", model_path.display()))?;
    let model = Model::from_bytes(&bytes).with_context(|| format!("{}", model_path.display()))?;
    if model.dim() != 2 {
        bail!("plot needs a 2-D model; {} has dimension {}", model_path.display(), model.dim());
    }
    let (_vs, chain) = chain_from_model(&model, Kind::Float, Device::Cpu)?;
    tch::manual_seed(seed);
    let opts = SolveOptions::eval(dopri5_at(tol, 100_000));
    let z = Tensor::randn([samples, 2], (Kind::Float, Device::Cpu));
    let xs = tch::no_grad(|| chain.sample_from(&z, &opts))?.z;
    // View: the central 99% of the samples, padded by 10%.
    let mut range = [(0.0, 0.0); 2];
    for (d, r) in range.iter_mut().enumerate() {
        let col = xs.select(1, d as i64).to_kind(Kind::Double);
        let lo = col.quantile_scalar(0.005, None, false, "linear").double_value(&[]);
        let hi = col.quantile_scalar(0.995, None, false, "linear").double_value(&[]);
        let pad = 0.1 * (hi - lo).max(1e-6);
        *r = (lo - pad, hi + pad);
    }
    let axis = |d: usize| {
        let (lo, hi) = range[d];
        Tensor::linspace(lo, hi, grid, (Kind::Float, Device::Cpu))
    };
    // Row r is y from top (high) to bottom (low); column c is x.
    let gy = axis(1).flip([0]);
    let gx = axis(0);
    let mesh = Tensor::meshgrid_indexing(&[gy, gx], "ij");
    let points = Tensor::stack(&[mesh[1].reshape([-1]), mesh[0].reshape([-1])], 1);
    let log_p = tch::no_grad(|| chain.log_prob(&points, &opts))?.log_p.to_kind(Kind::Double);
    let density = log_p.exp();
    let cell = (range[0].1 - range[0].0) / (grid - 1) as f64 * (range[1].1 - range[1].0) / (grid - 1) as f64;
    let mass_in_view = density.sum(Kind::Double).double_value(&[]) * cell;
    let dens: Vec<f64> = Vec::try_from(&(&density / density.max()))?;
    // Sample histogram on the same grid.
    let mut hist = vec![0f64; (grid * grid) as usize];
    let sx: Vec<f64> = Vec::try_from(&xs.to_kind(Kind::Double).reshape([-1]))?;
    for p in sx.chunks_exact(2) {
        let c = ((p[0] - range[0].0) / (range[0].1 - range[0].0) * (grid - 1) as f64).round();
        let r = ((range[1].1 - p[1]) / (range[1].1 - range[1].0) * (grid - 1) as f64).round();
        if c >= 0.0 && r >= 0.0 && c < grid as f64 && r < grid as f64 {
            hist[(r as i64 * grid + c as i64) as usize] += 1.0;
        }
    }
    let hmax = hist.iter().cloned().fold(1.0, f64::max);
    let (w, h, gap) = (2 * grid as usize + 8, grid as usize, 8usize);
    let mut pixels = vec![255u8; w * h * 3];
    for r in 0..h {
        for c in 0..grid as usize {
            let i = r * grid as usize + c;
            let left = colour(dens[i]);
            let right = colour((hist[i] / hmax).sqrt());
            pixels[(r * w + c) * 3..(r * w + c) * 3 + 3].copy_from_slice(&left);
            let c2 = c + grid as usize + gap;
            pixels[(r * w + c2) * 3..(r * w + c2) * 3 + 3].copy_from_slice(&right);
        }
    }
    let mut png_bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut png_bytes, w as u32, h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header()?;
        writer.write_image_data(&pixels)?;
    }
    write_atomic(out, &png_bytes)?;
    Ok(PlotSummary { range, mass_in_view })
}
