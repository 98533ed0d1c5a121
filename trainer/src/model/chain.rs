//! The [`Chain`]: layers from data to a base density — `N(0, I)`, or after
//! training a kernel density estimate over latent points
//! ([`crate::kde::choose_base`]).

use anyhow::{Context, Result};
use tch::{Kind, Tensor};

use super::*;

/// The layers of a flow, data side first, on a base density.
pub struct Chain {
    pub layers: Vec<Box<dyn FlowLayer>>,
    pub dim: i64,
    /// A kernel density estimate in latent space as the base, fitted after
    /// training; `None`: `N(0, I)` (or the trained base, if any).
    pub base: Option<crate::kde::KernelDensity>,
    /// A kernel density base trained with the flow (`fit --train-base kde`);
    /// `None`: training uses `N(0, I)`.
    pub trained_base: Option<crate::kde::TrainedKernelBase>,
}

/// Per-row results of a pass through the chain.
pub struct ChainOutput {
    /// Latent points.
    pub z: Tensor,
    /// log p(x) per row (on the chain's input scale).
    pub log_p: Tensor,
    pub stats: PassStats,
}

/// [`Chain::log_prob_rows`]' result.
pub struct RowsLogProb {
    /// log p(x) per row.
    pub log_p: Vec<f64>,
    /// log p(z) under the chain's base per row: the part of log p that the
    /// latent point alone gives (the rest is the log volume change).
    pub log_p_base: Vec<f64>,
    /// The latent points `z`, row-major (`rows × D`).
    pub z: Vec<f64>,
    /// Function evaluations, summed over chunks.
    pub nfe: u64,
}

/// `Σ_i (−½ log 2π − z_i²/2)` per row.
pub fn standard_normal_log_prob(z: &Tensor) -> Tensor {
    let c = -0.5 * (2.0 * std::f64::consts::PI).ln();
    (z.square() * -0.5 + c).sum_dim_intlist(1, false, z.kind())
}

impl Chain {
    /// A chain on the `N(0, I)` base.
    pub fn new(layers: Vec<Box<dyn FlowLayer>>, dim: i64) -> Chain {
        Chain { layers, dim, base: None, trained_base: None }
    }

    /// log p(z) of latent rows under the base.
    pub fn base_log_prob(&self, z: &Tensor) -> Tensor {
        match (&self.base, &self.trained_base) {
            (Some(kde), _) => kde.log_prob_tensor(z),
            (None, Some(trained)) => trained.log_prob(z, None),
            (None, None) => standard_normal_log_prob(z),
        }
    }

    /// log p(z) under the base training uses: the trained kernel base with
    /// the rows' own kernels left out (`centre_of`), else `N(0, I)`.
    fn training_base_log_prob(&self, z: &Tensor, centre_of: Option<&Tensor>) -> Tensor {
        match &self.trained_base {
            Some(trained) => trained.log_prob(z, centre_of),
            None => standard_normal_log_prob(z),
        }
    }

    /// log p(x) per row.
    pub fn log_prob(&self, x: &Tensor, opts: &SolveOptions) -> Result<ChainOutput> {
        self.log_prob_on(x, opts, |z| self.base_log_prob(z))
    }

    /// log p(x) per row with `base` as the base's log density.
    fn log_prob_on(
        &self,
        x: &Tensor,
        opts: &SolveOptions,
        base: impl Fn(&Tensor) -> Tensor,
    ) -> Result<ChainOutput> {
        let mut stats = PassStats::default();
        let mut z = x.shallow_clone();
        let mut log_det = Tensor::zeros([x.size()[0]], (x.kind(), x.device()));
        for layer in &self.layers {
            let (y, ld) = layer.forward(&z, opts, &mut stats)?;
            z = y;
            log_det = &log_det + ld; // not in place: keeps autograd simple
        }
        let log_p = base(&z) + log_det;
        Ok(ChainOutput { z, log_p, stats })
    }

    /// `log p` of every row of `x`, without a graph, `chunk` rows at a time
    /// (memory stays bounded however many rows there are; each chunk takes
    /// its own adaptive steps). Returns the values (float64), the base
    /// density's share `log N(z)` of each, and the NFE summed over chunks.
    pub fn log_prob_rows(&self, x: &Tensor, opts: &SolveOptions, chunk: i64) -> Result<RowsLogProb> {
        let n = x.size()[0] as usize;
        let mut rows = RowsLogProb {
            log_p: Vec::with_capacity(n),
            log_p_base: Vec::with_capacity(n),
            z: Vec::with_capacity(n * self.dim.max(0) as usize),
            nfe: 0,
        };
        for part in x.split(chunk.max(1), 0) {
            let out = tch::no_grad(|| self.log_prob(&part, opts))?;
            rows.log_p.extend(Vec::<f64>::try_from(&out.log_p.to_kind(Kind::Double))?);
            let z = out.z.to_kind(Kind::Double);
            rows.log_p_base.extend(Vec::<f64>::try_from(&self.base_log_prob(&z).to_kind(Kind::Double))?);
            rows.z.extend(Vec::<f64>::try_from(&z.contiguous().view(-1))?);
            rows.nfe += u64::from(out.stats.solve.nfe);
        }
        Ok(rows)
    }

    /// The training loss `−mean log p(x)` (+ RNODE's terms) and its parameter
    /// gradients, accumulated into `.grad`, by `gradient`: the continuous
    /// adjoint, or backprop through the solver — by reversing the recorded
    /// steps with the fields' hand-written VJPs where every layer can, else by
    /// autograd over the whole pass. A non-finite loss is returned without
    /// gradients. With a trained kernel base, `centre_of` gives per row the
    /// centre it is (−1: none), whose kernel its likelihood leaves out.
    pub fn loss_and_gradients(
        &self,
        x: &Tensor,
        opts: &SolveOptions,
        gradient: Gradient,
        centre_of: Option<&Tensor>,
    ) -> Result<(f64, PassStats)> {
        anyhow::ensure!(self.base.is_none(), "training uses N(0, I) or the trained kernel base");
        match gradient {
            Gradient::Adjoint => self.backward_by_layers(x, opts, centre_of),
            Gradient::Backprop if self.layers.iter().all(|l| l.reverses_steps(x, opts)) => {
                self.backward_by_layers(x, &SolveOptions { record_steps: true, ..*opts }, centre_of)
            }
            Gradient::Backprop => {
                let opts = SolveOptions { create_graph: true, ..*opts };
                let out = self.log_prob_on(x, &opts, |z| self.training_base_log_prob(z, centre_of))?;
                let nll = -out.log_p.mean(out.log_p.kind());
                let loss = match &out.stats.regularization {
                    Some(r) => &nll + r.to_kind(nll.kind()),
                    None => nll,
                };
                let value = loss.double_value(&[]);
                if value.is_finite() {
                    loss.f_backward()?;
                }
                Ok((value, out.stats))
            }
        }
    }

    /// Computes the NLL loss `−mean log p(x)` and accumulates its parameter
    /// gradients layer by layer through [`FlowLayer::backward`] (the adjoint for
    /// CNF blocks, or the reversed steps with `record_steps`), without keeping
    /// a graph of the forward solves. `centre_of` as in
    /// [`Chain::loss_and_gradients`].
    pub fn backward_by_layers(
        &self,
        x: &Tensor,
        opts: &SolveOptions,
        centre_of: Option<&Tensor>,
    ) -> Result<(f64, PassStats)> {
        let fwd_opts = SolveOptions { create_graph: false, ..*opts };
        let mut stats = PassStats::default();
        let mut inputs = Vec::new();
        let mut log_dets = Vec::new();
        let mut z = x.detach();
        for layer in &self.layers {
            let (y, ld) = tch::no_grad(|| layer.forward(&z, &fwd_opts, &mut stats))?;
            inputs.push(z);
            log_dets.push(ld.detach().set_requires_grad(true));
            z = y.detach();
        }
        let z_leaf = z.set_requires_grad(true);
        let (loss, grads) = tch::with_grad(|| -> Result<(f64, Vec<Tensor>)> {
            let base = self.training_base_log_prob(&z_leaf, centre_of);
            let total = log_dets.iter().fold(base, |a, ld| a + ld);
            let loss = -total.mean(z_leaf.kind());
            let mut leaves = vec![z_leaf.shallow_clone()];
            leaves.extend(log_dets.iter().map(Tensor::shallow_clone));
            let base_params = self.trained_base.as_ref().map_or(Vec::new(), |b| b.parameters());
            leaves.extend(base_params.iter().map(Tensor::shallow_clone));
            let mut grads = Tensor::f_run_backward(&[&loss], &leaves, false, false)?;
            // The trained base's parameters take theirs into `.grad` now (the
            // layers do so in their backward passes below).
            let base_grads = grads.split_off(1 + log_dets.len());
            if !base_params.is_empty() {
                let surrogate = base_params
                    .iter()
                    .zip(&base_grads)
                    .fold(Tensor::from(0.0), |a, (p, g)| a + (p * g).sum(p.kind()));
                surrogate.f_backward()?;
            }
            Ok((loss.double_value(&[]), grads))
        })?;
        let loss = loss + stats.regularization.as_ref().map_or(0.0, |r| r.double_value(&[]));
        let mut grads = grads.into_iter();
        let mut grad_y = grads.next().context("no gradient for z")?;
        let grad_log_dets: Vec<Tensor> = grads.collect();
        let mut y = z_leaf.detach();
        for ((layer, x_in), g_ld) in self.layers.iter().zip(&inputs).zip(&grad_log_dets).rev() {
            grad_y = layer.backward(x_in, &y, &grad_y, g_ld, opts, &mut stats)?;
            y = x_in.shallow_clone();
        }
        Ok((loss, stats))
    }

    /// Maps latent `z` to data and returns log p of the result.
    pub fn sample_from(&self, z: &Tensor, opts: &SolveOptions) -> Result<ChainOutput> {
        let mut stats = PassStats::default();
        let base = self.base_log_prob(z);
        let mut x = z.shallow_clone();
        let mut log_det = Tensor::zeros([z.size()[0]], (z.kind(), z.device()));
        for layer in self.layers.iter().rev() {
            let (prev, ld) = layer.inverse(&x, opts, &mut stats)?;
            x = prev;
            log_det = &log_det + ld; // not in place: keeps autograd simple
        }
        Ok(ChainOutput { z: x, log_p: base + log_det, stats })
    }
}
