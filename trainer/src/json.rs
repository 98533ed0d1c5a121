//! The documented JSON form of a model file (`trainer export --format json`,
//! `trainer import`): every stage, layer kind, activation and weight by name,
//! so a model can be read by other tools or written by hand.

use anyhow::{Context, Result, anyhow, bail, ensure};
use ffjord_runtime::format::{Weights, encode, encoded_len, lower_triangle_row};
use ffjord_runtime::{
    Activation, CnfSpec, ConvCnfSpec, Header, ImageShape, LayerKind, LayerParts, LayerSpec, MatrixEncoding,
    Metadata, Model, ScoreKind, Solver, Stage, StageParts, StageWeights, Threshold,
};
use serde::{Deserialize, Serialize};

/// Top level of the JSON form.
#[derive(Serialize, Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct JsonModel {
    /// Always `"ffjord-model"`.
    pub format: String,
    /// The model file format version it corresponds to (1, or 2 with a `linear` stage).
    pub version: u16,
    pub dim: u16,
    /// Input standardization `(x − mean) / std`, if any.
    pub standardize: Option<JsonStandardize>,
    /// Stages from the data side to the latent side.
    pub stages: Vec<JsonStage>,
    pub solver: Solver,
    pub threshold: Option<Threshold>,
    pub metadata: JsonMetadata,
    /// What the anomaly score (and the threshold) is; absent means
    /// `NegLogDensity` (−log p), as in every file before version 6.
    #[serde(default, skip_serializing_if = "is_neg_log_density")]
    pub score: ScoreKind,
}

fn is_neg_log_density(kind: &ScoreKind) -> bool {
    *kind == ScoreKind::NegLogDensity
}

#[derive(Serialize, Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct JsonStandardize {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

#[derive(Serialize, Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct JsonMetadata {
    pub name: String,
    pub description: String,
    pub command: String,
}

#[derive(Serialize, Deserialize, Debug)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum JsonStage {
    /// A CNF block.
    Cnf {
        end_time: f32,
        activation: Activation,
        layers: Vec<JsonLayer>,
        /// How the file stores the layers' matrices (`F32` when absent; the
        /// values here are the widened ones the runtime computes with).
        #[serde(default, skip_serializing_if = "is_f32")]
        matrices: MatrixEncoding,
    },
    /// `y = x ⊙ scale + shift`.
    Affine { scale: Vec<f32>, shift: Vec<f32> },
    /// `y = L x + shift` with `L` lower-triangular: `lower[i]` is row `i` of
    /// `L` up to its diagonal (`i + 1` values).
    Linear { lower: Vec<Vec<f32>>, shift: Vec<f32> },
    /// `y = logit(α + (1 − 2α) x)` on every value (version 4).
    Logit { alpha: f32 },
    /// Squeeze of the first `C·H·W` values, read as `shape = [C, H, W]`, to
    /// `[4C, H/2, W/2]` (version 4).
    Squeeze { shape: [u16; 3] },
    /// A CNF block with a convolutional net on the first `C·H·W` values,
    /// read as `shape = [C, H, W]` (version 4).
    #[serde(rename = "conv_cnf")]
    ConvCnf { shape: [u16; 3], end_time: f32, activation: Activation, layers: Vec<JsonConvLayer> },
    /// The base density `(1 − w)/n Σ_i N(z; c_i, h² I) + w N(z; 0, I)` in
    /// place of `N(0, I)`: `centres[i]` is `c_i` (`D` values), `bandwidth` is
    /// `h`, `normal_weight` is `w`. Only as the last stage (version 5).
    #[serde(rename = "kde_base")]
    KdeBase { bandwidth: f32, normal_weight: f32, centres: Vec<Vec<f32>> },
}

/// One 3×3 conv layer: `weight` is `[out][in][3][3]` (`in + 1` for
/// `Concat`, the time channel first), PyTorch's `Conv2d.weight`.
pub type JsonConvLayer = JsonLayerOf<Vec<Vec<[[f32; 3]; 3]>>>;

fn shape_array(s: ImageShape) -> [u16; 3] {
    [s.channels, s.height, s.width]
}

fn image_shape([channels, height, width]: [u16; 3]) -> ImageShape {
    ImageShape { channels, height, width }
}

/// One layer: `weight` is `[out][in]` (`[out][in + 1]` for `Concat`, time first).
pub type JsonLayer = JsonLayerOf<Vec<Vec<f32>>>;

/// A layer of a dense (`W = Vec<Vec<f32>>`) or convolutional net: its
/// kind, weight, bias and, for concatsquash, the hyper-net vectors.
#[derive(Serialize, Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct JsonLayerOf<W> {
    pub kind: LayerKind,
    pub weight: W,
    pub bias: Vec<f32>,
    /// `ConcatSquash` only: `_hyper_gate.weight`, `_hyper_gate.bias`, `_hyper_bias.weight`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate_weight: Option<Vec<f32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate_bias: Option<Vec<f32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hyper_bias: Option<Vec<f32>>,
}

/// The JSON form of a loaded model (through the runtime's weight views).
pub fn to_json(model: &Model<'_>) -> Result<JsonModel> {
    let vec = |w: Weights<'_>| w.iter().collect::<Vec<f32>>();
    let h = model.header();
    let standardize =
        model.standardization().map(|(mean, std)| JsonStandardize { mean: vec(mean), std: vec(std) });
    let mut stages = Vec::new();
    for i in 0..model.stage_count() {
        match model.stage_weights(i).context("stage weights")? {
            StageWeights::Affine { scale, shift } => {
                stages.push(JsonStage::Affine { scale: vec(scale), shift: vec(shift) })
            }
            StageWeights::Linear { lower, shift } => {
                let lower = (0..model.dim()).map(|r| vec(lower_triangle_row(lower, r))).collect();
                stages.push(JsonStage::Linear { lower, shift: vec(shift) });
            }
            StageWeights::Cnf(block) => {
                let layers = block
                    .layers()
                    .map(|(spec, w)| {
                        let squash = |v: Weights<'_>| w.squash.then(|| vec(v));
                        JsonLayer {
                            kind: spec.kind,
                            weight: w
                                .matrix
                                .iter()
                                .collect::<Vec<f32>>()
                                .chunks(w.cols.max(1))
                                .map(<[f32]>::to_vec)
                                .collect(),
                            bias: vec(w.bias),
                            gate_weight: squash(w.gate_w),
                            gate_bias: squash(w.gate_b),
                            hyper_bias: squash(w.hyper_b),
                        }
                    })
                    .collect();
                let spec = block.spec();
                stages.push(JsonStage::Cnf {
                    end_time: spec.end_time,
                    activation: spec.activation,
                    layers,
                    matrices: spec.matrices,
                });
            }
            StageWeights::None => stages.push(match h.stage(i) {
                Some(Stage::Logit { alpha }) => JsonStage::Logit { alpha },
                Some(Stage::Squeeze(shape)) => JsonStage::Squeeze { shape: shape_array(shape) },
                other => bail!("stage {i}: no weights expected for {other:?}"),
            }),
            StageWeights::KdeCentres(w) => {
                let Some(Stage::KdeBase(spec)) = h.stage(i) else {
                    bail!("stage {i}: KDE centres for another stage")
                };
                let centres =
                    w.iter().collect::<Vec<f32>>().chunks(model.dim()).map(<[f32]>::to_vec).collect();
                stages.push(JsonStage::KdeBase {
                    bandwidth: spec.bandwidth,
                    normal_weight: spec.normal_weight,
                    centres,
                });
            }
            StageWeights::ConvCnf(w) => {
                let Some(Stage::ConvCnf(spec)) = h.stage(i) else {
                    bail!("stage {i}: conv weights for another stage")
                };
                let mut layers = Vec::new();
                let mut c_in = usize::from(spec.shape.channels);
                let mut rest = w;
                for l in &spec.layers {
                    let c_out = usize::from(l.out_dim);
                    let cols = l.kind.cols(c_in).context("layer width")?;
                    let (kernel, r) = rest.split_at(c_out * cols * 9);
                    let (bias, r) = r.split_at(c_out);
                    rest = r;
                    let kernel = vec(kernel);
                    let weight = kernel
                        .chunks(cols * 9)
                        .map(|o| {
                            o.chunks(9)
                                .map(|k| [[k[0], k[1], k[2]], [k[3], k[4], k[5]], [k[6], k[7], k[8]]])
                                .collect()
                        })
                        .collect();
                    let mut hyper = [None, None, None];
                    if l.kind == LayerKind::ConcatSquash {
                        for slot in &mut hyper {
                            let (v, r) = rest.split_at(c_out);
                            *slot = Some(vec(v));
                            rest = r;
                        }
                    }
                    let [gate_weight, gate_bias, hyper_bias] = hyper;
                    layers.push(JsonConvLayer {
                        kind: l.kind,
                        weight,
                        bias: vec(bias),
                        gate_weight,
                        gate_bias,
                        hyper_bias,
                    });
                    c_in = c_out;
                }
                stages.push(JsonStage::ConvCnf {
                    shape: shape_array(spec.shape),
                    end_time: spec.end_time,
                    activation: spec.activation,
                    layers,
                });
            }
        }
    }
    let m = &h.metadata;
    Ok(JsonModel {
        format: "ffjord-model".into(),
        version: h.version(),
        dim: h.dim,
        standardize,
        stages,
        solver: h.solver,
        threshold: h.threshold,
        score: h.score,
        metadata: JsonMetadata {
            name: m.name.into(),
            description: m.description.into(),
            command: m.command.into(),
        },
    })
}

/// Encodes the JSON form as a model file, naming the stage, layer and field of any inconsistency.
pub fn from_json(j: &JsonModel) -> Result<Vec<u8>> {
    ensure!(j.format == "ffjord-model", "\"format\" must be \"ffjord-model\", found \"{}\"", j.format);
    let (oldest, newest) =
        (ffjord_runtime::format::MIN_FORMAT_VERSION, ffjord_runtime::format::FORMAT_VERSION);
    ensure!(
        (oldest..=newest).contains(&j.version),
        "\"version\" {} is not supported (this build reads {oldest} to {newest})",
        j.version,
    );
    let d = usize::from(j.dim);
    let mut weights = Vec::new();
    if let Some(s) = &j.standardize {
        let parts = StageParts::Affine { scale: &s.mean, shift: &s.std };
        weights.extend(parts.floats(d).map_err(|e| anyhow!("standardize: {e}"))?);
    }
    let mut stages = heapless::Vec::new();
    for (si, stage) in j.stages.iter().enumerate() {
        let spec = match stage {
            JsonStage::Affine { scale, shift } => {
                let parts = StageParts::Affine { scale, shift };
                weights.extend(parts.floats(d).map_err(|e| anyhow!("stages[{si}] affine: {e}"))?);
                Stage::Affine
            }
            JsonStage::Linear { lower, shift } => {
                ensure!(j.version >= 2, "stages[{si}] linear needs \"version\": 2");
                ensure!(lower.len() == d, "stages[{si}] linear: lower needs {d} rows, found {}", lower.len());
                // The JSON form holds the triangle's rows; the writer takes L dense.
                let mut dense = vec![0.0; d * d];
                for (r, (row, out)) in lower.iter().zip(dense.chunks_exact_mut(d)).enumerate() {
                    ensure!(
                        row.len() == r + 1,
                        "stages[{si}] linear: lower[{r}] needs {} values (up to the diagonal), found {}",
                        r + 1,
                        row.len()
                    );
                    out[..=r].copy_from_slice(row);
                }
                let parts = StageParts::Linear { dense: &dense, shift };
                weights.extend(parts.floats(d).map_err(|e| anyhow!("stages[{si}] linear: {e}"))?);
                Stage::Linear
            }
            JsonStage::Cnf { end_time, activation, layers, matrices } => {
                let mut specs = heapless::Vec::new();
                let mut d_in = d;
                for (li, l) in layers.iter().enumerate() {
                    let at = format!("stages[{si}].layers[{li}]");
                    let d_out = l.weight.len();
                    let cols = if l.kind == LayerKind::Concat { d_in + 1 } else { d_in };
                    let mut matrix = Vec::with_capacity(d_out * cols);
                    for (r, row) in l.weight.iter().enumerate() {
                        ensure!(
                            row.len() == cols,
                            "{at}.weight[{r}]: {} values, expected {cols} (input width {d_in}{})",
                            row.len(),
                            if l.kind == LayerKind::Concat { " plus time" } else { "" }
                        );
                        matrix.extend(row);
                    }
                    let squash = l.kind == LayerKind::ConcatSquash;
                    let mut gates: [&[f32]; 3] = [&[]; 3];
                    let hyper = [
                        ("gate_weight", &l.gate_weight),
                        ("gate_bias", &l.gate_bias),
                        ("hyper_bias", &l.hyper_bias),
                    ];
                    for ((name, v), slot) in hyper.into_iter().zip(&mut gates) {
                        match (squash, v) {
                            (true, Some(v)) => *slot = v,
                            (true, None) => bail!("{at}: ConcatSquash needs {name}"),
                            (false, Some(_)) => bail!("{at}: {name} is only for ConcatSquash layers"),
                            (false, None) => {}
                        }
                    }
                    let [gate_w, gate_b, hyper_b] = gates;
                    let parts = LayerParts { matrix: &matrix, bias: &l.bias, gate_w, gate_b, hyper_b };
                    weights.extend(parts.floats(l.kind, d_in, d_out).map_err(|e| anyhow!("{at}.{e}"))?);
                    let out_dim = u16::try_from(d_out).with_context(|| format!("{at}: too wide"))?;
                    specs
                        .push(LayerSpec { kind: l.kind, out_dim })
                        .map_err(|_| anyhow::anyhow!("stages[{si}]: too many layers"))?;
                    d_in = d_out;
                }
                Stage::Cnf(CnfSpec {
                    layers: specs,
                    activation: *activation,
                    end_time: *end_time,
                    matrices: *matrices,
                })
            }
            JsonStage::Logit { alpha } => Stage::Logit { alpha: *alpha },
            JsonStage::Squeeze { shape } => Stage::Squeeze(image_shape(*shape)),
            JsonStage::KdeBase { bandwidth, normal_weight, centres } => {
                for (ci, c) in centres.iter().enumerate() {
                    ensure!(
                        c.len() == d,
                        "stages[{si}] kde_base: centres[{ci}] has {} values, dim is {d}",
                        c.len()
                    );
                    weights.extend_from_slice(c);
                }
                let n = u32::try_from(centres.len())
                    .map_err(|_| anyhow!("stages[{si}] kde_base: too many centres"))?;
                Stage::KdeBase(ffjord_runtime::KdeSpec {
                    centres: n,
                    bandwidth: *bandwidth,
                    normal_weight: *normal_weight,
                })
            }
            JsonStage::ConvCnf { shape, end_time, activation, layers } => {
                let mut specs = heapless::Vec::new();
                let mut c_in = usize::from(shape[0]);
                for (li, l) in layers.iter().enumerate() {
                    let at = format!("stages[{si}].layers[{li}]");
                    let c_out = l.weight.len();
                    let cols = if l.kind == LayerKind::Concat { c_in + 1 } else { c_in };
                    for (o, k) in l.weight.iter().enumerate() {
                        ensure!(
                            k.len() == cols,
                            "{at}.weight[{o}]: {} input channels, expected {cols} ({c_in}{})",
                            k.len(),
                            if l.kind == LayerKind::Concat { " plus time" } else { "" }
                        );
                        weights.extend(k.iter().flatten().flatten());
                    }
                    ensure!(l.bias.len() == c_out, "{at}.bias: {} values, expected {c_out}", l.bias.len());
                    weights.extend(&l.bias);
                    let squash = l.kind == LayerKind::ConcatSquash;
                    for (name, v) in [
                        ("gate_weight", &l.gate_weight),
                        ("gate_bias", &l.gate_bias),
                        ("hyper_bias", &l.hyper_bias),
                    ] {
                        match (squash, v) {
                            (true, Some(v)) => {
                                ensure!(
                                    v.len() == c_out,
                                    "{at}.{name}: {} values, expected {c_out}",
                                    v.len()
                                );
                                weights.extend(v);
                            }
                            (true, None) => bail!("{at}: ConcatSquash needs {name}"),
                            (false, Some(_)) => bail!("{at}: {name} is only for ConcatSquash layers"),
                            (false, None) => {}
                        }
                    }
                    let out_dim = u16::try_from(c_out).with_context(|| format!("{at}: too many channels"))?;
                    specs
                        .push(LayerSpec { kind: l.kind, out_dim })
                        .map_err(|_| anyhow::anyhow!("stages[{si}]: too many layers"))?;
                    c_in = c_out;
                }
                Stage::ConvCnf(ConvCnfSpec {
                    shape: image_shape(*shape),
                    layers: specs,
                    activation: *activation,
                    end_time: *end_time,
                })
            }
        };
        stages.push(spec).map_err(|_| anyhow::anyhow!("too many stages"))?;
    }
    let m = &j.metadata;
    let header = Header {
        dim: j.dim,
        standardize: j.standardize.is_some(),
        stages,
        solver: j.solver,
        threshold: j.threshold,
        metadata: Metadata { name: &m.name, description: &m.description, command: &m.command },
        score: j.score,
    };
    let mut out = vec![0u8; encoded_len(&header)?];
    encode(&header, &weights, &mut out)?;
    Ok(out)
}

fn is_f32(m: &MatrixEncoding) -> bool {
    *m == MatrixEncoding::F32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip_reproduces_the_model_file_byte_for_byte() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/8gaussians/model.ffjd");
        let bytes = std::fs::read(path).unwrap();
        let model = Model::from_bytes(&bytes).unwrap();
        let json = serde_json::to_string(&to_json(&model).unwrap()).unwrap();
        let back: JsonModel = serde_json::from_str(&json).unwrap();
        assert_eq!(from_json(&back).unwrap(), bytes);
    }

    #[test]
    fn hand_written_json_with_every_kind_imports() {
        let json = r#"{
            "format": "ffjord-model", "version": 1, "dim": 2,
            "standardize": {"mean": [0.0, 1.0], "std": [2.0, 0.5]},
            "stages": [
                {"cnf": {"end_time": 0.5, "activation": {"Swish": {"beta": 1.5}}, "layers": [
                    {"kind": "Concat", "weight": [[0.1, 0.2, 0.3], [0.0, -0.1, 0.2], [0.3, 0.1, 0.0]], "bias": [0.0, 0.1, 0.2]},
                    {"kind": "ConcatSquash", "weight": [[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]], "bias": [0.0, 0.0],
                     "gate_weight": [1.0, -1.0], "gate_bias": [0.0, 0.5], "hyper_bias": [0.1, 0.1]}]}},
                {"affine": {"scale": [1.0, 2.0], "shift": [0.0, -1.0]}},
                {"cnf": {"end_time": 1.0, "activation": "Identity", "layers": [
                    {"kind": "Ignore", "weight": [[-0.5, 0.0], [0.0, -0.5]], "bias": [0.0, 0.0]}]}}
            ],
            "solver": {"Rk4": {"steps": 8}},
            "threshold": {"score": 5.0, "quantile": 0.99},
            "metadata": {"name": "hand", "description": "hand-written", "command": ""}
        }"#;
        for act in ["\"Tanh\"", "\"Softplus\"", "\"Elu\""] {
            let j: JsonModel = serde_json::from_str(&json.replace("\"Identity\"", act)).unwrap();
            let bytes = from_json(&j).unwrap();
            let model = Model::from_bytes(&bytes).unwrap();
            assert_eq!(model.stage_count(), 3);
            let flow = ffjord_runtime::Flow::new(&model, model.default_solver()).unwrap();
            let mut scratch = vec![0.0; flow.scratch_len()];
            assert!(flow.log_density(&[0.3, 0.7], &mut scratch).unwrap().log_p.is_finite());
        }
        let missing_gate = json.replace(r#""gate_weight": [1.0, -1.0], "#, "");
        let err = from_json(&serde_json::from_str(&missing_gate).unwrap()).unwrap_err().to_string();
        assert!(err.contains("stages[0].layers[1]: ConcatSquash needs gate_weight"), "{err}");
        let bad_row = json.replace("[0.3, 0.1, 0.0]", "[0.3, 0.1]");
        let err = from_json(&serde_json::from_str(&bad_row).unwrap()).unwrap_err().to_string();
        assert!(err.contains("stages[0].layers[0].weight[2]: 2 values, expected 3"), "{err}");
    }
}
