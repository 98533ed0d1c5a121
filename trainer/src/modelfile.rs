//! Model files: export a trained chain through the runtime's own format types,
//! load a model file back into tch (for float64 evaluation), atomic writes.

use std::path::Path;

use anyhow::{Context, Result, bail};
use ffjord_runtime::format::{encode, encoded_len};
use ffjord_runtime::{Header, Metadata, Model, Stage, Threshold};
use tch::{Device, Kind, Tensor, nn};

use crate::model::{Affine, Chain, Cnf, Linear, OdeNet, push};
use ffjord_runtime::Solver;

/// What goes into the header besides the chain.
pub struct ExportInfo<'a> {
    pub mean: &'a Tensor,
    pub std: &'a Tensor,
    pub solver: Solver,
    pub threshold: Option<Threshold>,
    pub name: &'a str,
    pub description: &'a str,
    pub command: &'a str,
}

/// Encodes `chain` (trained on standardized data) as a model file.
pub fn export_bytes(chain: &Chain, info: &ExportInfo<'_>) -> Result<Vec<u8>> {
    let mut weights = Vec::new();
    push(&mut weights, info.mean)?;
    push(&mut weights, info.std)?;
    let mut stages = heapless::Vec::new();
    for layer in &chain.layers {
        let (stage, w) = layer.export()?;
        stages
            .push(stage)
            .map_err(|_| anyhow::anyhow!("more than {} stages", ffjord_runtime::format::MAX_STAGES))?;
        weights.extend(w);
    }
    let header = Header {
        dim: u16::try_from(chain.dim).context("dimension too large")?,
        standardize: true,
        stages,
        solver: info.solver,
        threshold: info.threshold,
        metadata: Metadata { name: info.name, description: info.description, command: info.command },
    };
    let mut out = vec![0u8; encoded_len(&header)?];
    encode(&header, &weights, &mut out)?;
    // Round trip through the loader: a file we write must load.
    Model::from_bytes(&out).context("exported model does not load")?;
    Ok(out)
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
pub fn chain_from_model(
    model: &Model<'_>,
    bytes: &[u8],
    kind: Kind,
    device: Device,
) -> Result<(nn::VarStore, Chain)> {
    let n = model.weight_count();
    let weights: Vec<f32> = bytes[bytes.len() - 4 - 4 * n..bytes.len() - 4]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let d = model.dim();
    let dim = d as i64;
    let vs = nn::VarStore::new(device);
    let mut layers: Vec<Box<dyn crate::model::FlowLayer>> = Vec::new();
    let mut off = 0;
    let t = |w: &[f32]| Tensor::from_slice(w).to_kind(kind).to_device(device);
    if model.header().standardize {
        let (mean, std) = (t(&weights[..d]), t(&weights[d..2 * d]));
        layers.push(Box::new(Affine { scale: std.reciprocal(), shift: -(mean / &std) }));
        off = 2 * d;
    }
    for (i, stage) in model.header().stages().enumerate() {
        match stage {
            Stage::Affine => {
                layers.push(Box::new(Affine {
                    scale: t(&weights[off..off + d]),
                    shift: t(&weights[off + d..off + 2 * d]),
                }));
                off += 2 * d;
            }
            Stage::Linear => {
                let mut matrix = vec![0f32; d * d];
                for i in 0..d {
                    let row = &weights[off + i * (i + 1) / 2..off + (i + 1) * (i + 2) / 2];
                    matrix[i * d..i * d + i + 1].copy_from_slice(row);
                }
                off += d * (d + 1) / 2;
                let linear =
                    Linear { matrix: t(&matrix).reshape([dim, dim]), shift: t(&weights[off..off + d]) };
                layers.push(Box::new(linear));
                off += d;
            }
            Stage::Cnf(spec) => {
                let p = vs.root() / "chain" / i;
                let specs: Vec<_> = spec.layers.iter().map(|l| (l.kind, i64::from(l.out_dim))).collect();
                let mut net = OdeNet::from_layers(&(&p / "odefunc"), dim, &specs, spec.activation);
                off += net.load_weights(&weights[off..])?;
                let cnf = Cnf::new(&p, Box::new(net), f64::from(spec.end_time), false);
                layers.push(Box::new(cnf));
            }
        }
    }
    if off != n {
        bail!("model weights: used {off} of {n}");
    }
    let mut vs = vs;
    if kind == Kind::Double {
        vs.double();
        // The variables were created in f32, so √T came back rounded: set it
        // again from the file's T, so float64 evaluation integrates to exactly
        // the end time the runtime uses (it was off by up to 1e-7 relative).
        let variables = vs.variables();
        for (i, stage) in model.header().stages().enumerate() {
            if let (Stage::Cnf(spec), Some(v)) = (stage, variables.get(&format!("chain.{i}.sqrt_end_time"))) {
                let _ = tch::no_grad(|| v.shallow_clone().fill_(f64::from(spec.end_time).sqrt()));
            }
        }
    }
    Ok((vs, Chain { layers, dim }))
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
            let (vs, _) = chain_from_model(&model, &bytes, Kind::Double, Device::Cpu).unwrap();
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
