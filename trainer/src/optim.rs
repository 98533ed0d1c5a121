//! Adam with L2 weight decay (added to the gradient, as `torch.optim.Adam`
//! does — unlike the reference's tabular copy, where it was a no-op), whose
//! moments are saved with checkpoints so `--resume` continues exactly.

use std::path::Path;

use anyhow::{Context, Result, bail};
use tch::{Tensor, nn};

pub struct Adam {
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    step: i64,
    /// (name, parameter, first moment, second moment), sorted by name.
    slots: Vec<(String, Tensor, Tensor, Tensor)>,
}

impl Adam {
    pub fn new(vs: &nn::VarStore, lr: f64, weight_decay: f64) -> Self {
        let mut vars: Vec<(String, Tensor)> =
            vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let slots = vars
            .into_iter()
            .map(|(n, p)| {
                let (m, v) = (p.zeros_like().detach(), p.zeros_like().detach());
                (n, p, m, v)
            })
            .collect();
        Adam { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay, step: 0, slots }
    }

    pub fn zero_grad(&mut self) {
        for (_, p, _, _) in &self.slots {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.detach_().zero_();
            }
        }
    }

    /// One Adam update from the accumulated gradients.
    pub fn step(&mut self) {
        self.step += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let bias1 = 1.0 - b1.powi(self.step as i32);
        let bias2 = 1.0 - b2.powi(self.step as i32);
        tch::no_grad(|| {
            for (_, p, m, v) in &mut self.slots {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let g =
                    if self.weight_decay != 0.0 { &g + &*p * self.weight_decay } else { g.shallow_clone() };
                let new_m = &*m * b1 + &g * (1.0 - b1);
                let new_v = &*v * b2 + g.square() * (1.0 - b2);
                m.copy_(&new_m);
                v.copy_(&new_v);
                let update = (&new_m / bias1) / ((new_v / bias2).sqrt() + self.eps) * self.lr;
                let _ = p.f_sub_(&update);
            }
        });
    }

    /// The step count and moments as named tensors (`adam.step`, `adam.m.NAME`, `adam.v.NAME`).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut named: Vec<(String, Tensor)> = vec![("adam.step".into(), Tensor::from(self.step))];
        for (n, _, m, v) in &self.slots {
            named.push((format!("adam.m.{n}"), m.shallow_clone()));
            named.push((format!("adam.v.{n}"), v.shallow_clone()));
        }
        named
    }

    /// Restores what [`Adam::state`] returned for the same parameters.
    pub fn restore(&mut self, named: &[(String, Tensor)], origin: &Path) -> Result<()> {
        let get = |k: &str| named.iter().find(|(n, _)| n == k).map(|(_, t)| t.shallow_clone());
        self.step = get("adam.step")
            .with_context(|| format!("{}: no optimizer state", origin.display()))?
            .int64_value(&[]);
        for (n, p, m, v) in &mut self.slots {
            let (Some(sm), Some(sv)) = (get(&format!("adam.m.{n}")), get(&format!("adam.v.{n}"))) else {
                bail!("{}: no optimizer state for {n} (a different model?)", origin.display());
            };
            if sm.size() != p.size() {
                bail!(
                    "{}: optimizer state for {n} has shape {:?}, the parameter {:?}",
                    origin.display(),
                    sm.size(),
                    p.size()
                );
            }
            tch::no_grad(|| {
                m.copy_(&sm);
                v.copy_(&sv);
            });
        }
        Ok(())
    }
}
