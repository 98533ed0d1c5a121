//! Image runs of `fit`: the multiscale chain a config describes, bits/dim,
//! and samples from a run's best checkpoint.

use anyhow::{Context, Result, bail};
use tch::{Device, Kind, Tensor, nn};

use crate::config::TrainConfig;
use crate::model::{Chain, SolveOptions};
use crate::run::RunDir;
use crate::train::build_chain;

/// FFJORD's multiscale flow for `[C, H, W]` images: `blocks` conv CNFs
/// around each squeeze, `hidden` channels, the logit transform first.
pub(crate) fn build_image_chain(
    vs: &nn::VarStore,
    cfg: &TrainConfig,
    shape: &[i64],
    dim: i64,
) -> Result<Chain> {
    let &[c, h, w] = shape else { bail!("image_shape must be [C, H, W], got {shape:?}") };
    anyhow::ensure!(c * h * w == dim, "image shape {shape:?} does not hold {dim} values");
    anyhow::ensure!(
        !cfg.whiten && !cfg.batch_norm,
        "--whiten and --batch-norm are for tabular data, not images"
    );
    let ms = crate::model::MultiscaleConfig {
        shape: [c, h, w],
        hidden: cfg.hidden.clone(),
        blocks: cfg.blocks,
        layer: cfg.layer.into(),
        activation: cfg.activation.into(),
        alpha: Some(cfg.logit_alpha),
        end_time: cfg.end_time,
        train_end_time: cfg.train_end_time,
    };
    crate::model::multiscale(&(vs.root() / "chain"), &ms)
}

/// Bits per dimension from a mean NLL in nats on the `[0, 1)` scale images
/// are trained on (spec §7: `−(log p(x̃)/D − log 256)/log 2`).
pub fn bits_per_dim(nll: f64, dim: i64) -> f64 {
    (nll / dim as f64 + 256f64.ln()) / std::f64::consts::LN_2
}

/// Image runs: `count` seeded samples from the best checkpoint — latent
/// `N(0, I)` points mapped back through the flow (float64, Dopri5 `tol`),
/// scaled by 256 and floored to bytes.
pub fn sample_run_images(run: &RunDir, count: i64, seed: i64, tol: f64) -> Result<crate::images::Images> {
    let cfg = run.config()?;
    let Some(&[c, h, w]) = cfg.image_shape.as_deref() else {
        bail!("{}: not an image run (no image_shape)", run.path("config.toml").display())
    };
    anyhow::ensure!(c == 1, "sampling draws single-channel images; this run has {c} channels");
    anyhow::ensure!(count >= 1, "count must be at least 1");
    let dim = h * w;
    let mut vs = nn::VarStore::new(Device::Cpu);
    let chain = build_chain(&vs, &cfg, dim, None)?;
    let best = run.path("best.ot");
    vs.load(&best).with_context(|| format!("loading {}", best.display()))?;
    vs.double();
    tch::manual_seed(seed);
    let z = Tensor::randn([count, dim], (Kind::Double, Device::Cpu));
    let x = tch::no_grad(|| {
        chain.sample_from(&z, &SolveOptions::eval(crate::ode::dopri5_at(tol, cfg.max_steps)))
    })?
    .z;
    let bytes = (x * 256.0).floor().clamp(0.0, 255.0).to_kind(Kind::Uint8).reshape([-1]);
    let pixels = Vec::<u8>::try_from(&bytes)?;
    Ok(crate::images::Images { n: count as usize, height: h as usize, width: w as usize, pixels })
}

/// Seeded samples from an exported image model file, drawn by the runtime
/// (Xoshiro128++ from `seed`, as `trainer sample` and the firmware draw):
/// each latent point mapped back through every stage; pixels are the
/// file's 8-bit values rounded and clamped to 0–255. The path is integrated
/// with a one-probe Hutchinson trace: the log-density it carries along is
/// not used, and the exact trace would cost one lane per pixel.
pub fn sample_model_images(bytes: &[u8], count: usize, seed: u64) -> Result<crate::images::Images> {
    use ffjord_runtime::{Flow, ImageTrace, Model, Stage};
    use rand_xoshiro::rand_core::SeedableRng;
    let model = Model::from_bytes(bytes)?;
    let shape = model
        .header()
        .stages()
        .find_map(|s| match s {
            Stage::ConvCnf(spec) => Some(spec.shape),
            Stage::Squeeze(shape) => Some(shape),
            _ => None,
        })
        .context("not an image model (no convolutional or squeeze stage)")?;
    anyhow::ensure!(
        shape.channels == 1,
        "sampling draws single-channel images; this model has {}",
        shape.channels
    );
    anyhow::ensure!(
        shape.len() == model.dim(),
        "the image ({} values) is not the whole row ({})",
        shape.len(),
        model.dim()
    );
    anyhow::ensure!(count >= 1, "count must be at least 1");
    let flow = Flow::new(&model, model.default_solver())?
        .with_image_trace(ImageTrace::Hutchinson { probes: 1, seed: 0 })?;
    let mut scratch = vec![0.0; flow.scratch_len()];
    let mut rng = rand_xoshiro::Xoshiro128PlusPlus::seed_from_u64(seed);
    let mut x = vec![0.0f32; model.dim()];
    let mut pixels = Vec::with_capacity(count * model.dim());
    for i in 0..count {
        flow.sample(&mut rng, &mut x, &mut scratch).with_context(|| format!("sample {i}"))?;
        pixels.extend(x.iter().map(|v| v.round().clamp(0.0, 255.0) as u8));
    }
    Ok(crate::images::Images {
        n: count,
        height: usize::from(shape.height),
        width: usize::from(shape.width),
        pixels,
    })
}

/// Pixels above which images are evaluated with Hutchinson's estimator
/// (the exact trace costs one VJP per pixel per evaluation).
pub const EXACT_TRACE_MAX_DIM: i64 = 256;

/// How validation and test rows are evaluated: the exact trace, or for
/// images of more than [`EXACT_TRACE_MAX_DIM`] pixels Hutchinson's
/// (Rademacher) estimate, which is unbiased for `log p`.
pub fn eval_options(cfg: &TrainConfig, dim: i64) -> SolveOptions {
    let estimate = cfg.image_shape.is_some() && dim > EXACT_TRACE_MAX_DIM;
    let trace = if estimate { crate::model::TraceMode::Rademacher } else { crate::model::TraceMode::Exact };
    SolveOptions { trace, ..SolveOptions::eval(cfg.eval_method()) }
}
