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

    /// Sets the rate for the next steps (a schedule's value).
    pub fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
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

/// An exponential moving average of the trainable weights, for evaluation:
/// `shadow ← d·shadow + (1 − d)·param` after every step, with the decay
/// ramped as `min(d, (1 + t)/(10 + t))` so the first steps are not averaged
/// with the initialisation. Validation, `best.ot` and the export use the
/// averaged weights; training continues from the raw ones.
pub struct Ema {
    decay: f64,
    updates: i64,
    /// (name, parameter, shadow), sorted by name.
    slots: Vec<(String, Tensor, Tensor)>,
}

impl Ema {
    pub fn new(vs: &nn::VarStore, decay: f64) -> Self {
        let mut vars: Vec<(String, Tensor)> =
            vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let slots = vars.into_iter().map(|(n, p)| (n, p.shallow_clone(), p.detach().copy())).collect();
        Ema { decay, updates: 0, slots }
    }

    /// Moves every shadow towards its parameter's current value.
    pub fn update(&mut self) {
        self.updates += 1;
        let t = self.updates as f64;
        let d = self.decay.min((1.0 + t) / (10.0 + t));
        tch::no_grad(|| {
            for (_, p, s) in &mut self.slots {
                let _ = s.f_mul_scalar_(d).and_then(|mut s| s.f_add_(&(p.detach() * (1.0 - d))));
            }
        });
    }

    /// Runs `f` with the averaged weights in the parameters, then puts the
    /// raw weights back (also when `f` fails).
    pub fn with_averaged<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let raw: Vec<Tensor> = self.slots.iter().map(|(_, p, _)| p.detach().copy()).collect();
        tch::no_grad(|| self.slots.iter().for_each(|(_, p, s)| p.detach().copy_(s)));
        let out = f();
        tch::no_grad(|| self.slots.iter().zip(&raw).for_each(|((_, p, _), r)| p.detach().copy_(r)));
        out
    }

    /// The shadows and update count as named tensors (`ema.updates`, `ema.NAME`).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut named: Vec<(String, Tensor)> = vec![("ema.updates".into(), Tensor::from(self.updates))];
        named.extend(self.slots.iter().map(|(n, _, s)| (format!("ema.{n}"), s.shallow_clone())));
        named
    }

    /// Restores what [`Ema::state`] returned for the same parameters.
    pub fn restore(&mut self, named: &[(String, Tensor)], origin: &Path) -> Result<()> {
        let get = |k: &str| named.iter().find(|(n, _)| n == k).map(|(_, t)| t.shallow_clone());
        self.updates = get("ema.updates")
            .with_context(|| {
                format!("{}: no weight average (was the run started without --ema?)", origin.display())
            })?
            .int64_value(&[]);
        for (n, p, s) in &mut self.slots {
            let saved = get(&format!("ema.{n}")).with_context(|| {
                format!("{}: no weight average for {n} (a different model?)", origin.display())
            })?;
            if saved.size() != p.size() {
                bail!(
                    "{}: weight average for {n} has shape {:?}, the parameter {:?}",
                    origin.display(),
                    saved.size(),
                    p.size()
                );
            }
            tch::no_grad(|| s.copy_(&saved));
        }
        Ok(())
    }
}

/// The learning rate at step `step` (0-based) of `total`: linear warm-up over
/// `warmup` steps, then constant or cosine decay to 1 % of `lr` at `total`.
pub fn scheduled_lr(lr: f64, schedule: LrSchedule, warmup: u64, step: u64, total: u64) -> f64 {
    let warm = if warmup > 0 { ((step + 1) as f64 / warmup as f64).min(1.0) } else { 1.0 };
    let decay = match schedule {
        LrSchedule::Constant => 1.0,
        LrSchedule::Cosine => {
            let span = total.saturating_sub(warmup).max(1) as f64;
            let progress = (step.saturating_sub(warmup) as f64 / span).clamp(0.0, 1.0);
            0.01 + 0.99 * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    };
    lr * warm * decay
}

/// How the learning rate changes over a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    /// The same rate throughout (after any warm-up).
    Constant,
    /// Half a cosine from the rate down to 1 % of it at the last iteration.
    Cosine,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_warms_up_then_decays_to_one_percent() {
        let lr = |s| scheduled_lr(1.0, LrSchedule::Cosine, 10, s, 110);
        assert!((lr(0) - 0.1).abs() < 1e-12);
        assert!((lr(9) - 1.0).abs() < 1e-12);
        assert!((lr(60) - 0.505).abs() < 1e-12, "{}", lr(60)); // half way: (1 + 0.01) / 2
        assert!((lr(110) - 0.01).abs() < 1e-12);
        assert!((scheduled_lr(1.0, LrSchedule::Constant, 0, 5, 10) - 1.0).abs() < 1e-12);
    }

    /// The average of a parameter that walks 0, 1, 2, … lags it by the
    /// geometric mean age, and `with_averaged` swaps it in and back.
    #[test]
    fn the_average_lags_and_swaps_back() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let p = vs.root().zeros("w", &[1]);
        let mut ema = Ema::new(&vs, 0.5);
        let mut expected = 0.0;
        for step in 1..=20 {
            let _ = tch::no_grad(|| p.detach().fill_(step as f64));
            ema.update();
            let t = step as f64;
            let d = 0.5f64.min((1.0 + t) / (10.0 + t));
            expected = d * expected + (1.0 - d) * t;
        }
        let averaged = ema.with_averaged(|| Ok(p.double_value(&[0]))).unwrap();
        assert!((averaged - expected).abs() < 1e-4, "{averaged} vs {expected}");
        assert!(averaged < 20.0 && averaged > 18.0);
        assert_eq!(p.double_value(&[0]), 20.0);
    }
}
