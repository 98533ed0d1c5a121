//! The image layers of FFJORD's multiscale model (spec §2.5–2.7) on flat
//! rows `[B, C·H·W]` (C-order `[C, H, W]`): the logit transform, squeeze,
//! and factor-out — expressed as [`Prefix`], a layer that acts on the first
//! `keep` coordinates and passes the rest through. Factor-out keeps the
//! first half of the channels, which in C order is a prefix of the row, and
//! every later scale keeps a prefix of that prefix, so the whole multiscale
//! model ([`multiscale`]) is one flat [`Chain`] whose latent is the
//! concatenation of what each scale factored out (a permutation of the
//! reference's order, which leaves a standard-normal base unchanged).

use anyhow::{Result, bail, ensure};
use ffjord_runtime::{Activation, LayerKind, Stage};
use tch::{Tensor, nn};

use super::*;

/// `y = logit(α + (1 − 2α) x)` elementwise for `x` in `[0, 1]`
/// (dequantized pixels), with log-det `Σ log(1 − 2α) − log(s − s²)`.
pub struct LogitTransform {
    /// The squeeze towards `(0, 1)` that keeps the logit finite.
    pub alpha: f64,
}

impl LogitTransform {
    fn log_det(&self, s: &Tensor) -> Tensor {
        let per = (s - s.square()).log().neg() + (1.0 - 2.0 * self.alpha).ln();
        per.sum_dim_intlist(1, false, s.kind())
    }
}

impl FlowLayer for LogitTransform {
    fn forward(&self, x: &Tensor, _: &SolveOptions, _: &mut PassStats) -> Result<(Tensor, Tensor)> {
        let s = x * (1.0 - 2.0 * self.alpha) + self.alpha;
        let y = s.log() - s.neg().log1p();
        Ok((y, self.log_det(&s)))
    }

    fn inverse(&self, y: &Tensor, _: &SolveOptions, _: &mut PassStats) -> Result<(Tensor, Tensor)> {
        let s = y.sigmoid();
        let x = (&s - self.alpha) / (1.0 - 2.0 * self.alpha);
        Ok((x, self.log_det(&s)))
    }

    fn export(&self) -> Result<(Stage, Vec<f32>)> {
        Ok((Stage::Logit { alpha: self.alpha as f32 }, Vec::new()))
    }
}

/// The model file's form of a `[C, H, W]` shape.
pub fn image_shape([c, h, w]: [i64; 3]) -> Result<ffjord_runtime::ImageShape> {
    let side =
        |n: i64| u16::try_from(n).map_err(|_| anyhow::anyhow!("image side {n} too large for the model file"));
    Ok(ffjord_runtime::ImageShape { channels: side(c)?, height: side(h)?, width: side(w)? })
}

/// Squeeze: `[C, 2H, 2W] → [4C, H, W]`, channel `c·4 + dy·2 + dx` taking
/// pixel `(2h + dy, 2w + dx)` of channel `c` (a permutation, log-det 0).
pub struct Squeeze {
    /// `[C, H, W]` of the input rows (H and W even).
    pub shape: [i64; 3],
}

impl Squeeze {
    /// A squeeze of `[C, H, W]` rows; `H` and `W` must be even.
    pub fn new(shape: [i64; 3]) -> Result<Self> {
        ensure!(
            shape.iter().all(|&n| n >= 1) && shape[1] % 2 == 0 && shape[2] % 2 == 0,
            "cannot squeeze {shape:?}: height and width must be even"
        );
        Ok(Squeeze { shape })
    }

    /// The output shape `[4C, H/2, W/2]`.
    pub fn output_shape(&self) -> [i64; 3] {
        let [c, h, w] = self.shape;
        [4 * c, h / 2, w / 2]
    }
}

impl FlowLayer for Squeeze {
    fn forward(&self, x: &Tensor, _: &SolveOptions, _: &mut PassStats) -> Result<(Tensor, Tensor)> {
        let [c, h, w] = self.shape;
        let b = x.size()[0];
        let y = x.reshape([b, c, h / 2, 2, w / 2, 2]).permute([0, 1, 3, 5, 2, 4]).reshape([b, c * h * w]);
        Ok((y, Tensor::zeros([b], (x.kind(), x.device()))))
    }

    fn inverse(&self, y: &Tensor, _: &SolveOptions, _: &mut PassStats) -> Result<(Tensor, Tensor)> {
        let [c, h, w] = self.shape;
        let b = y.size()[0];
        let x = y.reshape([b, c, 2, 2, h / 2, w / 2]).permute([0, 1, 4, 2, 5, 3]).reshape([b, c * h * w]);
        Ok((x, Tensor::zeros([b], (y.kind(), y.device()))))
    }

    fn export(&self) -> Result<(Stage, Vec<f32>)> {
        Ok((Stage::Squeeze(image_shape(self.shape)?), Vec::new()))
    }
}

/// A layer applied to the first `keep` coordinates of each row; the rest
/// (what earlier scales factored out) pass through unchanged.
pub struct Prefix {
    /// Coordinates the layer acts on.
    pub keep: i64,
    /// The layer, on rows of `keep` coordinates.
    pub layer: Box<dyn FlowLayer>,
}

impl Prefix {
    /// `layer` on the first `keep` of `dim` coordinates: itself when it
    /// covers the whole row, else wrapped.
    pub fn around(keep: i64, dim: i64, layer: Box<dyn FlowLayer>) -> Box<dyn FlowLayer> {
        if keep == dim { layer } else { Box::new(Prefix { keep, layer }) }
    }

    fn split(&self, x: &Tensor) -> (Tensor, Tensor) {
        let d = x.size()[1];
        (x.narrow(1, 0, self.keep), x.narrow(1, self.keep, d - self.keep))
    }
}

impl FlowLayer for Prefix {
    fn forward(&self, x: &Tensor, opts: &SolveOptions, stats: &mut PassStats) -> Result<(Tensor, Tensor)> {
        let (head, rest) = self.split(x);
        let (y, ld) = self.layer.forward(&head, opts, stats)?;
        Ok((Tensor::cat(&[&y, &rest], 1), ld))
    }

    fn inverse(&self, y: &Tensor, opts: &SolveOptions, stats: &mut PassStats) -> Result<(Tensor, Tensor)> {
        let (head, rest) = self.split(y);
        let (x, ld) = self.layer.inverse(&head, opts, stats)?;
        Ok((Tensor::cat(&[&x, &rest], 1), ld))
    }

    /// The inner layer's stage: an image stage acts on the prefix its
    /// shape covers, which must be this one.
    fn export(&self) -> Result<(Stage, Vec<f32>)> {
        let (stage, weights) = self.layer.export()?;
        let len = match &stage {
            Stage::Squeeze(shape) => shape.len(),
            Stage::ConvCnf(spec) => spec.shape.len(),
            _ => bail!("only image stages act on a prefix of the row"),
        };
        ensure!(len as i64 == self.keep, "an image stage of {len} values inside a prefix of {}", self.keep);
        Ok((stage, weights))
    }

    fn reverses_steps(&self, x: &Tensor, opts: &SolveOptions) -> bool {
        self.layer.reverses_steps(&x.narrow(1, 0, self.keep), opts)
    }

    fn backward(
        &self,
        x: &Tensor,
        y: &Tensor,
        grad_y: &Tensor,
        grad_log_det: &Tensor,
        opts: &SolveOptions,
        stats: &mut PassStats,
    ) -> Result<Tensor> {
        let (x_head, _) = self.split(x);
        let (y_head, _) = self.split(y);
        let (g_head, g_rest) = self.split(grad_y);
        let g = self.layer.backward(&x_head, &y_head, &g_head, grad_log_det, opts, stats)?;
        Ok(Tensor::cat(&[&g, &g_rest], 1))
    }
}

/// The multiscale model's shape: what [`multiscale`] builds.
#[derive(Clone, Debug)]
pub struct MultiscaleConfig {
    /// `[C, H, W]` of the images.
    pub shape: [i64; 3],
    /// Hidden channel counts of every CNF's conv net (reference: 64, 64, 64).
    pub hidden: Vec<i64>,
    /// CNF blocks before and after each squeeze (reference: 2).
    pub blocks: usize,
    /// Layer kind of the conv nets (reference: concat).
    pub layer: LayerKind,
    /// Reference: softplus.
    pub activation: Activation,
    /// Logit transform's α (reference: 1e-6); `None`: no logit transform.
    pub alpha: Option<f64>,
    /// Every CNF's integration time, and whether it is trained.
    pub end_time: f64,
    pub train_end_time: bool,
}

/// Scales of the multiscale model: halvings while both sides are at least 4
/// (28 → 3, 14 → 2, 8 → 2), as the reference counts them.
pub fn scale_count(height: i64, width: i64) -> usize {
    let (mut h, mut w, mut n) = (height, width, 0);
    while h >= 4 && w >= 4 {
        n += 1;
        h /= 2;
        w /= 2;
    }
    n.max(1)
}

/// FFJORD's multiscale image flow (ODENVP, spec §2.7) as one flat chain:
/// at every scale but the last, `blocks` CNFs, squeeze, `blocks` CNFs, and
/// the second half of the channels factored out; at the last scale,
/// `blocks` CNFs. The logit transform comes first.
pub fn multiscale(p: &nn::Path<'_>, cfg: &MultiscaleConfig) -> Result<Chain> {
    let [c0, h0, w0] = cfg.shape;
    ensure!(c0 >= 1 && h0 >= 1 && w0 >= 1, "image shape {:?} has an empty side", cfg.shape);
    let dim = c0 * h0 * w0;
    let scales = scale_count(h0, w0);
    let mut layers: Vec<Box<dyn FlowLayer>> = Vec::new();
    if let Some(alpha) = cfg.alpha {
        ensure!(alpha > 0.0 && alpha < 0.5, "logit alpha must be in (0, 0.5), got {alpha}");
        layers.push(Box::new(LogitTransform { alpha }));
    }
    let mut shape = cfg.shape;
    let mut n_cnf = 0;
    for scale in 0..scales {
        let last = scale + 1 == scales;
        let stages = if last { 1 } else { 2 };
        for stage in 0..stages {
            for _ in 0..cfg.blocks {
                let q = p / "cnf" / n_cnf;
                n_cnf += 1;
                let net = ConvOdeNet::new(&(&q / "odefunc"), shape, &cfg.hidden, cfg.layer, cfg.activation)?;
                let keep = shape.iter().product();
                layers.push(Prefix::around(
                    keep,
                    dim,
                    Box::new(Cnf::new(&q, Box::new(net), cfg.end_time, cfg.train_end_time)),
                ));
            }
            if stage == 0 && !last {
                let squeeze = Squeeze::new(shape)?;
                let keep = shape.iter().product();
                shape = squeeze.output_shape();
                layers.push(Prefix::around(keep, dim, Box::new(squeeze)));
            }
        }
        if !last {
            // Factor out the second half of the channels: later layers act on the first half.
            ensure!(shape[0] % 2 == 0, "cannot factor out half of {} channels", shape[0]);
            shape[0] /= 2;
        }
    }
    Ok(Chain::new(layers, dim))
}
