//! Closed-form layers: [`Affine`] (standardization, batch norm's inference
//! form), [`Linear`] (whitening) and FFJORD's [`MovingBatchNorm`].

use anyhow::{Context, Result};
use ffjord_runtime::{Stage, StageParts};
use tch::{Device, Kind, Tensor, nn};

use super::*;

/// `y = x ⊙ scale + shift` (the inference form of batch norm; also input
/// standardization with `scale = 1/std`, `shift = −mean/std`).
pub struct Affine {
    pub scale: Tensor,
    pub shift: Tensor,
}

impl FlowLayer for Affine {
    fn forward(&self, x: &Tensor, _: &SolveOptions, _: &mut PassStats) -> Result<(Tensor, Tensor)> {
        let ld = self.scale.abs().log().sum(x.kind()).expand([x.size()[0]], false);
        Ok((x * &self.scale + &self.shift, ld))
    }

    fn inverse(&self, y: &Tensor, _: &SolveOptions, _: &mut PassStats) -> Result<(Tensor, Tensor)> {
        let ld = self.scale.abs().log().sum(y.kind()).expand([y.size()[0]], false);
        Ok(((y - &self.shift) / &self.scale, ld))
    }

    fn export(&self) -> Result<(Stage, Vec<f32>)> {
        let (scale, shift) = (floats(&self.scale)?, floats(&self.shift)?);
        let w = StageParts::Affine { scale: &scale, shift: &shift }.floats(scale.len())?.collect();
        Ok((Stage::Affine, w))
    }
}

/// `y = L x + b` with `L` lower-triangular: whitening by a covariance's
/// Cholesky factor, so that the chain starts as that full-covariance
/// Gaussian. Fixed during training (no-train variables, kept in checkpoints).
/// Exports as the runtime's `Linear` stage.
pub struct Linear {
    /// `L`, `[D, D]`, zero above the diagonal.
    pub matrix: Tensor,
    /// `b`, `[D]`.
    pub shift: Tensor,
}

impl Linear {
    /// Zeros in `p` (`L = 0` until [`Linear::set_whitening`] or a checkpoint fills it).
    pub fn new(p: &nn::Path<'_>, dim: i64) -> Self {
        Linear { matrix: p.zeros_no_train("matrix", &[dim, dim]), shift: p.zeros_no_train("shift", &[dim]) }
    }

    /// Sets `y = C^{-1/2}_{chol}(x − m)` for rows `x` `[N, D]` with mean `m`
    /// and covariance `C + diag(extra_var) + ridge·I` (`C = Lc Lcᵀ`, `L = Lc⁻¹`),
    /// so that `y` has identity covariance.
    pub fn set_whitening(&self, x: &Tensor, extra_var: &Tensor, ridge: f64) -> Result<()> {
        let x = x.to_kind(Kind::Double).to_device(Device::Cpu);
        let d = x.size()[1];
        let mean = x.mean_dim(0, false, Kind::Double);
        let cov = x.transpose(0, 1).cov(1, None::<Tensor>, None::<Tensor>).reshape([d, d])
            + extra_var.to_kind(Kind::Double).to_device(Device::Cpu).diag(0)
            + Tensor::eye(d, (Kind::Double, Device::Cpu)) * ridge;
        let chol =
            cov.f_linalg_cholesky(false).context("the training rows' covariance is not positive definite")?;
        let inverse =
            chol.linalg_solve_triangular(&Tensor::eye(d, (Kind::Double, Device::Cpu)), false, true, false);
        let shift = -inverse.matmul(&mean);
        tch::no_grad(|| {
            let mut m = self.matrix.shallow_clone();
            m.copy_(&inverse.to_kind(m.kind()).to_device(m.device()));
            let mut b = self.shift.shallow_clone();
            b.copy_(&shift.to_kind(b.kind()).to_device(b.device()));
        });
        Ok(())
    }

    fn log_det(&self, rows: i64, kind: Kind) -> Tensor {
        self.matrix.diagonal(0, 0, 1).abs().log().sum(kind).to_kind(kind).expand([rows], false)
    }
}

impl FlowLayer for Linear {
    fn forward(&self, x: &Tensor, _: &SolveOptions, _: &mut PassStats) -> Result<(Tensor, Tensor)> {
        let (m, b) = (self.matrix.to_kind(x.kind()), self.shift.to_kind(x.kind()));
        Ok((x.matmul(&m.transpose(0, 1)) + b, self.log_det(x.size()[0], x.kind())))
    }

    fn inverse(&self, y: &Tensor, _: &SolveOptions, _: &mut PassStats) -> Result<(Tensor, Tensor)> {
        let (m, b) = (self.matrix.to_kind(y.kind()), self.shift.to_kind(y.kind()));
        // x = L⁻¹(y − b) for every row: solve L Xᵀ = (Y − b)ᵀ.
        let x = m.linalg_solve_triangular(&(y - b).transpose(0, 1), false, true, false).transpose(0, 1);
        Ok((x, self.log_det(y.size()[0], y.kind())))
    }

    fn export(&self) -> Result<(Stage, Vec<f32>)> {
        let (dense, shift) = (floats(&self.matrix)?, floats(&self.shift)?);
        let w = StageParts::Linear { dense: &dense, shift: &shift }.floats(shift.len())?.collect();
        Ok((Stage::Linear, w))
    }
}

/// FFJORD's moving batch norm (spec §2.5): `y = (x − m)/√(v + ε) · e^w + b`
/// with the running statistics *before* this batch's update (`bn_lag = 0`), so
/// no gradient flows through batch statistics and training and evaluation use
/// the same map. A training pass (`create_graph`) then moves the running
/// statistics 10% towards the batch mean and unbiased variance. Exports as the
/// runtime's `Affine` stage.
pub struct MovingBatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
}

const BN_EPS: f64 = 1e-4;
const BN_DECAY: f64 = 0.1;

impl MovingBatchNorm {
    pub fn new(p: &nn::Path<'_>, dim: i64) -> Self {
        MovingBatchNorm {
            weight: p.zeros("weight", &[dim]),
            bias: p.zeros("bias", &[dim]),
            running_mean: p.zeros_no_train("running_mean", &[dim]),
            running_var: p.ones_no_train("running_var", &[dim]),
        }
    }

    /// (scale, shift) of the affine map with the current running statistics.
    fn affine(&self, kind: Kind) -> (Tensor, Tensor) {
        // Copies, not views: the in-place update of the running statistics must
        // not touch tensors autograd saved for this batch's backward pass.
        let scale = self.weight.exp() / (self.running_var.detach().copy() + BN_EPS).sqrt();
        let shift = &self.bias - self.running_mean.detach().copy() * &scale;
        (scale.to_kind(kind), shift.to_kind(kind))
    }
}

impl FlowLayer for MovingBatchNorm {
    fn forward(&self, x: &Tensor, opts: &SolveOptions, _: &mut PassStats) -> Result<(Tensor, Tensor)> {
        let (scale, shift) = self.affine(x.kind());
        let y = x * &scale + shift;
        let ld = scale.log().sum(x.kind()).expand([x.size()[0]], false);
        if opts.create_graph && x.size()[0] > 1 {
            tch::no_grad(|| {
                let xd = x.detach().to_kind(self.running_mean.kind());
                let mean = xd.mean_dim(0, false, xd.kind());
                let var = xd.var_dim(0, true, false);
                let mut rm = self.running_mean.shallow_clone();
                let mut rv = self.running_var.shallow_clone();
                let new_mean = &rm - (&rm - mean) * BN_DECAY;
                let new_var = &rv - (&rv - var) * BN_DECAY;
                rm.copy_(&new_mean);
                rv.copy_(&new_var);
            });
        }
        Ok((y, ld))
    }

    fn inverse(&self, y: &Tensor, _: &SolveOptions, _: &mut PassStats) -> Result<(Tensor, Tensor)> {
        let (scale, shift) = self.affine(y.kind());
        let ld = scale.log().sum(y.kind()).expand([y.size()[0]], false);
        Ok(((y - shift) / &scale, ld))
    }

    fn export(&self) -> Result<(Stage, Vec<f32>)> {
        let (scale, shift) = self.affine(Kind::Double);
        let (scale, shift) = (floats(&scale)?, floats(&shift)?);
        let w = StageParts::Affine { scale: &scale, shift: &shift }.floats(scale.len())?.collect();
        Ok((Stage::Affine, w))
    }
}
