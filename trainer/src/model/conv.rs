//! FFJORD's convolutional dynamics for images (spec §2.6): 3×3 convolutions
//! (stride 1, zero padding 1, so every layer keeps the image size) with the
//! time entering as in the dense net — `concat` adds a channel filled with
//! `t`, `concatsquash` gates each output channel by `σ(a t + b)` and adds
//! `c t` — and the activation between layers. It is a [`VectorField`] on
//! flat rows `[B, C·H·W]` (C-order `[C, H, W]`), so [`super::Cnf`], both
//! gradient modes and Hutchinson's estimator take it unchanged, through
//! autograd (no hand-written kernel).

use anyhow::{Context, Result, ensure};
use ffjord_runtime::format::{Weights, conv_weight_count};
use ffjord_runtime::{Activation, LayerKind, LayerSpec};
use tch::{Tensor, nn};

use super::field::{VectorField, activate, floats, set_tensor, torch_default_init};

/// One conv layer of the net.
struct ConvLayer {
    kind: LayerKind,
    conv: nn::Conv2D,
    /// concatsquash: gate Linear(1 → out) and bias Linear(1 → out, no bias).
    hyper: Option<(nn::Linear, nn::Linear)>,
}

impl ConvLayer {
    fn new(p: nn::Path<'_>, kind: LayerKind, c_in: i64, c_out: i64) -> Self {
        let c_in_t = if kind == LayerKind::Concat { c_in + 1 } else { c_in };
        // PyTorch's default: U(±1/√fan_in) for weights and bias, fan_in = c_in·3·3.
        let bound = 1.0 / ((c_in_t * 9) as f64).sqrt();
        let init = nn::Init::Uniform { lo: -bound, up: bound };
        let cfg = nn::ConvConfig { padding: 1, ws_init: init, bs_init: init, ..Default::default() };
        let conv = nn::conv2d(&p / "_layer", c_in_t, c_out, 3, cfg);
        let hyper = (kind == LayerKind::ConcatSquash).then(|| {
            (
                nn::linear(&p / "_hyper_gate", 1, c_out, torch_default_init(1, true)),
                nn::linear(&p / "_hyper_bias", 1, c_out, torch_default_init(1, false)),
            )
        });
        ConvLayer { kind, conv, hyper }
    }

    fn forward(&self, t: &Tensor, x: &Tensor) -> Tensor {
        let t1 = t.to_kind(x.kind()).reshape([1, 1]);
        match self.kind {
            LayerKind::Ignore => x.apply(&self.conv),
            LayerKind::Concat => {
                let s = x.size();
                let tt = t1.reshape([1, 1, 1, 1]).expand([s[0], 1, s[2], s[3]], false);
                Tensor::cat(&[&tt, x], 1).apply(&self.conv)
            }
            LayerKind::ConcatSquash => {
                let y = x.apply(&self.conv);
                match &self.hyper {
                    Some((gate, bias)) => {
                        let g = t1.apply(gate).sigmoid().reshape([1, -1, 1, 1]);
                        let h = t1.apply(bias).reshape([1, -1, 1, 1]);
                        y * g + h
                    }
                    None => y,
                }
            }
        }
    }
}

/// FFJORD's conv ODE net on `[C, H, W]` images given as flat rows.
pub struct ConvOdeNet {
    /// `[C, H, W]` of the rows.
    shape: [i64; 3],
    layers: Vec<ConvLayer>,
    activation: Activation,
}

impl ConvOdeNet {
    /// `C → hidden… → C` channels with one layer kind throughout.
    pub fn new(
        p: &nn::Path<'_>,
        shape: [i64; 3],
        hidden: &[i64],
        kind: LayerKind,
        activation: Activation,
    ) -> Result<Self> {
        let specs: Vec<_> = hidden.iter().chain(std::iter::once(&shape[0])).map(|&c| (kind, c)).collect();
        Self::from_layers(p, shape, &specs, activation)
    }

    /// A net with the given `(kind, output channels)` layers (the last must
    /// give back `C` channels), as a model file describes one.
    pub fn from_layers(
        p: &nn::Path<'_>,
        shape: [i64; 3],
        specs: &[(LayerKind, i64)],
        activation: Activation,
    ) -> Result<Self> {
        ensure!(shape.iter().all(|&n| n >= 1), "image shape {shape:?} has an empty side");
        ensure!(specs.iter().all(|&(_, c)| c >= 1), "channel counts must be at least 1");
        ensure!(
            specs.last().map(|l| l.1) == Some(shape[0]),
            "the last layer must give {} channels",
            shape[0]
        );
        let mut layers = Vec::with_capacity(specs.len());
        let mut c_in = shape[0];
        for (i, &(kind, c_out)) in specs.iter().enumerate() {
            layers.push(ConvLayer::new(p / "layers" / i, kind, c_in, c_out));
            c_in = c_out;
        }
        Ok(ConvOdeNet { shape, layers, activation })
    }

    /// Sets every layer's weights from a model file's conv stage (`w` in
    /// FORMAT.md's order: per layer the kernel `[out, in (+1 time), 3, 3]`,
    /// bias, and for concatsquash the gate weight, gate bias, hyper-bias).
    pub fn load(&mut self, w: Weights<'_>) -> Result<()> {
        let take = |t: &mut Tensor, w: Weights<'_>| set_tensor(t, w.iter().collect(), "conv weights");
        let mut rest = w;
        for l in &mut self.layers {
            let (c_out, kernel) = (l.conv.ws.size()[0] as usize, l.conv.ws.numel());
            let (k, r) = rest.split_at(kernel);
            take(&mut l.conv.ws, k)?;
            let (b, r) = r.split_at(c_out);
            take(l.conv.bs.as_mut().context("conv layers have a bias")?, b)?;
            rest = r;
            if let Some((gate, bias)) = &mut l.hyper {
                let (gw, r) = rest.split_at(c_out);
                let (gb, r) = r.split_at(c_out);
                let (hb, r) = r.split_at(c_out);
                take(&mut gate.ws, gw)?;
                take(gate.bs.as_mut().context("the hyper gate has a bias")?, gb)?;
                take(&mut bias.ws, hb)?;
                rest = r;
            }
        }
        ensure!(rest.is_empty(), "conv stage: {} weights left over", rest.len());
        Ok(())
    }

    /// Pixels per row (`C·H·W`).
    pub fn dim(&self) -> i64 {
        self.shape.iter().product()
    }
}

impl VectorField for ConvOdeNet {
    fn forward(&self, t: &Tensor, z: &Tensor) -> Tensor {
        let [c, h, w] = self.shape;
        let rows = z.size()[0];
        let mut x = z.reshape([rows, c, h, w]);
        let n = self.layers.len();
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(t, &x);
            if i + 1 < n {
                x = activate(self.activation, x);
            }
        }
        x.reshape([rows, c * h * w])
    }

    fn export(&self) -> Result<(Vec<LayerSpec>, Activation, Vec<f32>)> {
        let mut specs = Vec::new();
        let mut weights = Vec::new();
        let mut c_in = self.shape[0] as usize;
        for l in &self.layers {
            let c_out = l.conv.ws.size()[0] as usize;
            let before = weights.len();
            // Kernel [out, in (+1: the time channel first), 3, 3], as PyTorch holds it.
            weights.extend(floats(&l.conv.ws)?);
            weights.extend(floats(l.conv.bs.as_ref().context("conv layers have a bias")?)?);
            if let Some((gate, bias)) = &l.hyper {
                weights.extend(floats(&gate.ws)?);
                weights.extend(floats(gate.bs.as_ref().context("the hyper gate has a bias")?)?);
                weights.extend(floats(&bias.ws)?);
            }
            ensure!(
                Some(weights.len() - before) == conv_weight_count(l.kind, c_in, c_out),
                "conv layer weights do not match the file layout"
            );
            let out_dim = u16::try_from(c_out).context("too many channels for the model file")?;
            specs.push(LayerSpec { kind: l.kind, out_dim });
            c_in = c_out;
        }
        Ok((specs, self.activation, weights))
    }

    fn image_shape(&self) -> Option<[i64; 3]> {
        Some(self.shape)
    }

    fn parameters(&self) -> Vec<Tensor> {
        let mut p = Vec::new();
        for l in &self.layers {
            p.push(l.conv.ws.shallow_clone());
            p.extend(l.conv.bs.iter().map(Tensor::shallow_clone));
            if let Some((g, b)) = &l.hyper {
                p.push(g.ws.shallow_clone());
                p.extend(g.bs.iter().map(Tensor::shallow_clone));
                p.push(b.ws.shallow_clone());
            }
        }
        p
    }
}
