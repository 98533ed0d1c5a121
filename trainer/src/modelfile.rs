//! Model files: export a trained chain through the runtime's own format types,
//! load a model file back into tch (for float64 evaluation), atomic writes.

use std::path::Path;

use anyhow::{Context, Result};
use ffjord_runtime::format::{Weights, encode, encoded_len, lower_triangle_row};
use ffjord_runtime::{Header, Metadata, Model, ScoreKind, Stage, StageParts, StageWeights, Threshold};
use tch::{Device, Kind, Tensor, nn};

use crate::model::{Affine, Chain, Cnf, Linear, OdeNet, Prefix, floats};
use ffjord_runtime::Solver;

/// What goes into the header besides the chain.
pub struct ExportInfo<'a> {
    pub mean: &'a Tensor,
    pub std: &'a Tensor,
    pub solver: Solver,
    pub threshold: Option<Threshold>,
    /// What the threshold (and every score of the file) is on.
    pub score: ScoreKind,
    pub name: &'a str,
    pub description: &'a str,
    pub command: &'a str,
}

/// Encodes `chain` (trained on standardized data) as a model file. (Image
/// runs standardize bytes to `(x + 0.5) / 256`, so their files take 8-bit
/// pixel values and the logit stage sees `(0, 1)`.)
pub fn export_bytes(chain: &Chain, info: &ExportInfo<'_>) -> Result<Vec<u8>> {
    // Standardization has the affine layout: mean, then std.
    let (mean, std) = (floats(info.mean)?, floats(info.std)?);
    let mut weights: Vec<f32> =
        StageParts::Affine { scale: &mean, shift: &std }.floats(mean.len())?.collect();
    let mut stages = heapless::Vec::new();
    for layer in &chain.layers {
        let (stage, w) = layer.export()?;
        stages
            .push(stage)
            .map_err(|_| anyhow::anyhow!("more than {} stages", ffjord_runtime::format::MAX_STAGES))?;
        weights.extend(w);
    }
    if let Some(kde) = &chain.base {
        let centres = kde.centres();
        let spec = ffjord_runtime::KdeSpec {
            centres: u32::try_from(centres.size()[0]).context("too many KDE centres")?,
            bandwidth: kde.bandwidth as f32,
            normal_weight: kde.normal_weight as f32,
        };
        stages
            .push(Stage::KdeBase(spec))
            .map_err(|_| anyhow::anyhow!("more than {} stages", ffjord_runtime::format::MAX_STAGES))?;
        weights.extend(floats(&centres.contiguous().view(-1))?);
    }
    let header = Header {
        dim: u16::try_from(chain.dim).context("dimension too large")?,
        standardize: true,
        stages,
        solver: info.solver,
        threshold: info.threshold,
        metadata: Metadata { name: info.name, description: info.description, command: info.command },
        score: info.score,
    };
    let mut out = vec![0u8; encoded_len(&header)?];
    encode(&header, &weights, &mut out)?;
    // Round trip through the loader: a file we write must load.
    Model::from_bytes(&out).context("exported model does not load")?;
    Ok(out)
}

/// Re-encodes a model file with every CNF stage's matrices stored as
/// `matrices` (through the JSON form, whose values are what the runtime
/// computes with). With `calibration_rows` (data units) and a stored
/// threshold, the threshold is recomputed at the same quantile from the
/// re-encoded model's scores on those rows, so it stays calibrated on what
/// scoring computes.
pub fn with_matrices(
    bytes: &[u8],
    matrices: ffjord_runtime::MatrixEncoding,
    calibration_rows: Option<&[Vec<f32>]>,
) -> Result<Vec<u8>> {
    let model = Model::from_bytes(bytes)?;
    let mut j = crate::json::to_json(&model)?;
    for stage in &mut j.stages {
        if let crate::json::JsonStage::Cnf { matrices: m, .. } = stage {
            *m = matrices;
        }
    }
    let out = crate::json::from_json(&j)?;
    let (Some(rows), Some(threshold)) = (calibration_rows, j.threshold) else { return Ok(out) };
    let model = Model::from_bytes(&out)?;
    let flow = ffjord_runtime::Flow::new(&model, model.default_solver())?;
    let mut scratch = vec![0.0f32; flow.scratch_len()];
    let mut scores = Vec::with_capacity(rows.len());
    for row in rows {
        scores.push(f64::from(flow.score(row, &mut scratch)?.score));
    }
    let score = crate::anomaly::quantile(&scores, f64::from(threshold.quantile));
    anyhow::ensure!(score.is_finite(), "no finite validation scores to calibrate the threshold on");
    j.threshold = Some(Threshold { score: score as f32, ..threshold });
    crate::json::from_json(&j)
}

/// Writes `bytes` to `path` atomically (temp file in the same folder, then rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path.file_name().context("output path has no file name")?.to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        std::io::Write::write_all(&mut f, bytes)?;
        f.sync_all() // the bytes reach the disk before the rename publishes them
    });
    let renamed = written.with_context(|| format!("writing {}", tmp.display())).and_then(|()| {
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
    });
    if renamed.is_err() {
        let _ = std::fs::remove_file(&tmp); // a failed write leaves no temporary file behind
    }
    renamed
}

/// Reads and validates a model file, naming the file in every error.
pub fn read_model_bytes(path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading model {}", path.display()))?;
    Model::from_bytes(&bytes).with_context(|| format!("{}", path.display()))?;
    Ok(bytes)
}

/// Rebuilds a model file as a tch chain in `kind` (standardization included as
/// the first layer, so `log_prob` is in the data's units).
pub fn chain_from_model(model: &Model<'_>, kind: Kind, device: Device) -> Result<(nn::VarStore, Chain)> {
    let d = model.dim();
    let dim = d as i64;
    let vs = nn::VarStore::new(device);
    let mut layers: Vec<Box<dyn crate::model::FlowLayer>> = Vec::new();
    let mut base = None;
    // Every weight is read through the runtime's views of the layout.
    let t =
        |w: Weights<'_>| Tensor::from_slice(&w.iter().collect::<Vec<f32>>()).to_kind(kind).to_device(device);
    if let Some((mean, std)) = model.standardization() {
        let (mean, std) = (t(mean), t(std));
        layers.push(Box::new(Affine { scale: std.reciprocal(), shift: -(mean / &std) }));
    }
    for i in 0..model.stage_count() {
        match model.stage_weights(i).context("stage weights")? {
            StageWeights::Affine { scale, shift } => {
                layers.push(Box::new(Affine { scale: t(scale), shift: t(shift) }))
            }
            StageWeights::Linear { lower, shift } => {
                let mut matrix = vec![0f32; d * d];
                for (r, row) in matrix.chunks_exact_mut(d).enumerate() {
                    for (c, v) in lower_triangle_row(lower, r).iter().enumerate() {
                        row[c] = v;
                    }
                }
                let matrix = Tensor::from_slice(&matrix).reshape([dim, dim]).to_kind(kind).to_device(device);
                layers.push(Box::new(Linear { matrix, shift: t(shift) }));
            }
            StageWeights::Cnf(block) => {
                let spec = block.spec();
                let p = vs.root() / "chain" / i;
                let specs: Vec<_> = spec.layers.iter().map(|l| (l.kind, i64::from(l.out_dim))).collect();
                let mut net = OdeNet::from_layers(&(&p / "odefunc"), dim, &specs, spec.activation);
                net.load_layers(block.layers().map(|(_, w)| w))?;
                let cnf = Cnf::new(&p, Box::new(net), f64::from(spec.end_time), false);
                layers.push(Box::new(cnf));
            }
            StageWeights::None => match model.header().stage(i) {
                Some(Stage::Logit { alpha }) => {
                    layers.push(Box::new(crate::model::LogitTransform { alpha: f64::from(alpha) }))
                }
                Some(Stage::Squeeze(shape)) => {
                    let squeeze = crate::model::Squeeze::new(shape_of(shape))?;
                    layers.push(Prefix::around(shape.len() as i64, dim, Box::new(squeeze)));
                }
                other => anyhow::bail!("stage {i}: no weights expected for {other:?}"),
            },
            StageWeights::ConvCnf(w) => {
                let Some(Stage::ConvCnf(spec)) = model.header().stage(i) else {
                    anyhow::bail!("stage {i}: conv weights for another stage")
                };
                let p = vs.root() / "chain" / i;
                let specs: Vec<_> = spec.layers.iter().map(|l| (l.kind, i64::from(l.out_dim))).collect();
                let mut net = crate::model::ConvOdeNet::from_layers(
                    &(&p / "odefunc"),
                    shape_of(spec.shape),
                    &specs,
                    spec.activation,
                )?;
                net.load(w)?;
                let cnf = Cnf::new(&p, Box::new(net), f64::from(spec.end_time), false);
                layers.push(Prefix::around(spec.shape.len() as i64, dim, Box::new(cnf)));
            }
            StageWeights::KdeCentres(w) => {
                let spec = model.kde_base().context("KDE centres without a KDE base")?;
                let centres = t(w).view([-1, dim]);
                base = Some(crate::kde::KernelDensity::from_parts(
                    centres,
                    f64::from(spec.bandwidth),
                    f64::from(spec.normal_weight),
                ));
            }
        }
    }
    let mut vs = vs;
    if kind == Kind::Double {
        vs.double();
        // The variables were created in f32, so √T came back rounded: set it
        // again from the file's T, so float64 evaluation integrates to exactly
        // the end time the runtime uses (it was off by up to 1e-7 relative).
        let variables = vs.variables();
        for (i, stage) in model.header().stages().enumerate() {
            let end_time = match stage {
                Stage::Cnf(spec) => spec.end_time,
                Stage::ConvCnf(spec) => spec.end_time,
                _ => continue,
            };
            if let Some(v) = variables.get(&format!("chain.{i}.sqrt_end_time")) {
                let _ = tch::no_grad(|| v.shallow_clone().fill_(f64::from(end_time).sqrt()));
            }
        }
    }
    Ok((vs, Chain { layers, dim, base, trained_base: None }))
}

/// `[C, H, W]` of a model file's image shape.
fn shape_of(s: ffjord_runtime::ImageShape) -> [i64; 3] {
    [i64::from(s.channels), i64::from(s.height), i64::from(s.width)]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In float64 every CNF integrates to the file's end time exactly (as the
    /// runtime does), not to the square of an f32-rounded √T.
    #[test]
    fn float64_chains_use_the_files_end_time() {
        for name in ["8gaussians", "power", "shuttle"] {
            let path = format!("{}/../models/{name}/model.ffjd", env!("CARGO_MANIFEST_DIR"));
            let bytes = std::fs::read(path).unwrap();
            let model = Model::from_bytes(&bytes).unwrap();
            let (vs, _) = chain_from_model(&model, Kind::Double, Device::Cpu).unwrap();
            let variables = vs.variables();
            for (i, stage) in model.header().stages().enumerate() {
                if let Stage::Cnf(spec) = stage {
                    let s = variables[&format!("chain.{i}.sqrt_end_time")].double_value(&[]);
                    let t = f64::from(spec.end_time);
                    assert!((s * s - t).abs() <= 1e-15 * t, "{name} stage {i}: {} vs {t}", s * s);
                }
            }
        }
    }
}
