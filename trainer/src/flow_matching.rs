//! Simulation-free pre-training by conditional flow matching (Lipman et al.,
//! ICLR 2023, the optimal-transport path with σ_min = 0): before maximum
//! likelihood, the CNF's network is regressed onto the velocity of straight
//! lines from training rows to draws of `N(0, I)`,
//!
//! `z_τ = (1 − τ) x + τ ε`, target `dz/dt = (ε − x) / T` at `t = T τ`,
//!
//! in this crate's direction (data at `t = 0`, latent at `t = T`). Each
//! iteration costs one forward and one backward pass of the network, no ODE
//! solve, so thousands of them cost what a few dozen likelihood iterations
//! do; maximum likelihood then starts from a flow that already carries the
//! data near `N(0, I)` (`fit --flow-matching N`).

use anyhow::{Context, Result, bail, ensure};
use tch::{Kind, Tensor};

use crate::model::{Chain, Cnf};
use crate::optim::Adam;

/// The single CNF block flow matching can pre-train: the chain must be one
/// CNF on the `N(0, I)` base (no whitening, batch norm, further blocks or
/// kernel base, whose paths would not be straight lines to `N(0, I)`).
pub fn single_block(chain: &Chain) -> Result<&Cnf> {
    ensure!(
        chain.trained_base.is_none(),
        "--flow-matching pre-trains a flow on N(0, I); this run trains a kernel base (--train-base kde)"
    );
    match chain.layers.as_slice() {
        [layer] => match layer.as_cnf() {
            Some(cnf) => Ok(cnf),
            None => bail!("--flow-matching needs the chain to be one CNF block"),
        },
        _ => bail!(
            "--flow-matching needs the chain to be one CNF block (got {} layers: leave out --blocks > 1, --batch-norm and --whiten)",
            chain.layers.len()
        ),
    }
}

/// The flow-matching loss of one batch `x` with base draws `eps` (same
/// shape) and one time `τ_i` per row (`taus`, `[B, 1]`): the mean over rows
/// of `‖f(Tτ_i, z_i) − (ε_i − x_i)/T‖²`, `z_i = (1 − τ_i) x_i + τ_i ε_i`.
pub fn loss(cnf: &Cnf, x: &Tensor, eps: &Tensor, taus: &Tensor) -> Result<Tensor> {
    let end_time = cnf.end_time();
    let taus = taus.to_kind(x.kind());
    let z = x * (1.0 - &taus) + eps * &taus;
    let target = (eps - x) / end_time;
    let velocity = cnf
        .velocity_rows(&(&taus * end_time), &z)
        .context("flow matching needs a network that takes one time per row (the tabular MLP)")?;
    Ok((velocity - target).square().sum_dim_intlist(1, false, x.kind()).mean(x.kind()))
}

/// Stratified times for a batch of `rows`: row `i` gets a uniform draw in
/// `[i/rows, (i+1)/rows)`, so every batch covers `[0, 1)` evenly (the rows
/// are a random batch, so which row gets which stratum does not matter).
pub fn stratified_times(rows: i64, device: tch::Device) -> Tensor {
    let options = (Kind::Float, device);
    ((Tensor::arange(rows, options) + Tensor::rand([rows], options)) / rows as f64).reshape([rows, 1])
}

/// Pre-training iterations between two evaluations of the validation loss.
pub const CHECK_EVERY: u64 = 250;
/// Evaluations without a better validation loss before pre-training stops
/// (the weights go back to the best evaluation's).
pub const PATIENCE: u64 = 8;
/// Most validation rows the loss is evaluated on.
pub const MAX_VALID_ROWS: i64 = 4096;

/// Validation rows with one fixed draw of base points and times, so that
/// successive evaluations of the loss differ only by the weights.
pub struct Validation {
    x: Tensor,
    eps: Tensor,
    taus: Tensor,
    /// Iterations between evaluations ([`CHECK_EVERY`]).
    pub every: u64,
    /// Evaluations without improvement before stopping ([`PATIENCE`]).
    pub patience: u64,
}

impl Validation {
    /// Up to [`MAX_VALID_ROWS`] of `rows` (as the flow sees data: with
    /// dequantization noise drawn once) and their fixed draws, from `seed`.
    pub fn new(rows: &Tensor, seed: i64) -> Option<Validation> {
        let n = rows.size()[0].min(MAX_VALID_ROWS);
        if n == 0 {
            return None;
        }
        tch::manual_seed(seed.wrapping_add(0x0466_6d76));
        let x = rows.narrow(0, 0, n).shallow_clone();
        let eps = x.randn_like();
        let taus = stratified_times(n, x.device()).to_kind(x.kind());
        Some(Validation { x, eps, taus, every: CHECK_EVERY, patience: PATIENCE })
    }

    /// The flow-matching loss of these rows under the current weights.
    pub fn loss(&self, cnf: &Cnf) -> Result<f64> {
        Ok(tch::no_grad(|| loss(cnf, &self.x, &self.eps, &self.taus))?.double_value(&[]))
    }
}

/// Why [`pretrain`] ended early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The validation loss stopped improving.
    Plateau,
    /// The deadline passed (`fit --time-limit` counts pre-training).
    TimeLimit,
}

/// What [`pretrain`] did.
pub struct Report {
    /// Pre-training iterations run.
    pub iterations: u64,
    /// Mean training loss over the first tenth of the iterations.
    pub first_loss: f64,
    /// Mean training loss over the last tenth.
    pub last_loss: f64,
    /// Validation loss before pre-training, and the best one with its
    /// iteration (the weights kept), when validation rows were given.
    pub validation: Option<(f64, f64, u64)>,
    /// Why pre-training ended before `iterations`, if it did.
    pub stopped: Option<Stop>,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// At most `iterations` of Adam (rate `lr`, no weight decay: its moments
/// are discarded after; batches and noise from `seed`) on the flow-matching loss, each batch from
/// `batch()`. With `valid`, the validation loss is evaluated every
/// `valid.every` iterations; pre-training stops after `valid.patience`
/// evaluations without improvement and keeps the best evaluation's weights.
/// Past `deadline` it stops after the iteration at hand (evaluated, when
/// validating, like a last iteration). The end time `T` stays where it is
/// (the targets are scaled by it).
pub fn pretrain(
    chain: &Chain,
    vs: &tch::nn::VarStore,
    (iterations, lr, seed): (u64, f64, i64),
    (valid, deadline): (Option<&Validation>, Option<std::time::Instant>),
    mut batch: impl FnMut() -> Result<Tensor>,
) -> Result<Report> {
    let cnf = single_block(chain)?;
    let start = std::time::Instant::now();
    let mut opt = Adam::new(vs, lr, 0.0);
    let (mut first, mut last) = (Vec::new(), std::collections::VecDeque::new());
    let tenth = (iterations / 10).max(1) as usize;
    let mut best = match valid {
        Some(v) => Some((v.loss(cnf)?, 0, snapshot(vs))),
        None => None,
    };
    let initial = best.as_ref().map(|b| b.0);
    let (mut stale, mut run, mut stopped) = (0, 0, None);
    for i in 0..iterations {
        // Its own seed stream: the likelihood iterations after it draw the same
        // batches and noise as a run without pre-training.
        tch::manual_seed(seed.wrapping_add(0x0466_6d00).wrapping_add(7_919_i64.wrapping_mul(i as i64 + 1)));
        let x = batch()?;
        let eps = x.randn_like();
        let taus = stratified_times(x.size()[0], x.device());
        opt.zero_grad();
        let l = tch::with_grad(|| loss(cnf, &x, &eps, &taus))?;
        let value = l.double_value(&[]);
        ensure!(value.is_finite(), "flow matching: the loss became {value} at iteration {i}");
        tch::with_grad(|| l.f_backward())?;
        opt.step();
        run = i + 1;
        if first.len() < tenth {
            first.push(value);
        }
        last.push_back(value);
        if last.len() > tenth {
            last.pop_front();
        }
        let out_of_time = deadline.is_some_and(|d| std::time::Instant::now() >= d);
        // Evaluated every `v.every` iterations and after the last one, so the
        // final weights are always a candidate.
        if let (Some(v), Some(b)) = (valid, best.as_mut())
            && (run % v.every.max(1) == 0 || run == iterations || out_of_time)
        {
            let loss = v.loss(cnf)?;
            if loss < b.0 {
                *b = (loss, run, snapshot(vs));
                stale = 0;
            } else {
                stale += 1;
                if stale >= v.patience {
                    stopped = Some(Stop::Plateau);
                    break;
                }
            }
        }
        if out_of_time && run < iterations {
            stopped = Some(Stop::TimeLimit);
            break;
        }
    }
    opt.zero_grad();
    let validation = match (initial, best) {
        (Some(initial), Some((loss, at, weights))) => {
            restore(vs, &weights);
            Some((initial, loss, at))
        }
        _ => None,
    };
    Ok(Report {
        iterations: run,
        first_loss: first.iter().sum::<f64>() / first.len().max(1) as f64,
        last_loss: last.iter().sum::<f64>() / last.len().max(1) as f64,
        validation,
        stopped,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Copies of the trainable variables, by name.
fn snapshot(vs: &tch::nn::VarStore) -> Vec<(String, Tensor)> {
    let _guard = tch::no_grad_guard();
    vs.variables().into_iter().map(|(name, t)| (name, t.detach().copy())).collect()
}

/// Puts back the variables [`snapshot`] copied.
fn restore(vs: &tch::nn::VarStore, saved: &[(String, Tensor)]) {
    let _guard = tch::no_grad_guard();
    let mut vars = vs.variables();
    for (name, value) in saved {
        if let Some(t) = vars.get_mut(name) {
            t.copy_(value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TrainConfig;
    use crate::model::{SolveOptions, TraceMode};

    fn chain(cfg: &TrainConfig, vs: &tch::nn::VarStore, dim: i64) -> Chain {
        crate::train::build_chain(vs, cfg, dim, None).expect("chain")
    }

    /// The loss with one time per row equals the mean squared residual
    /// computed row by row with the network's scalar-time forward pass, which
    /// folds the time terms into the weights (float64), for every layer kind.
    #[test]
    fn the_loss_is_the_mean_squared_velocity_residual() {
        use crate::config::LayerArg;
        for layer in [LayerArg::Concatsquash, LayerArg::Concat, LayerArg::Ignore] {
            loss_matches_row_by_row(layer);
        }
    }

    fn loss_matches_row_by_row(layer: crate::config::LayerArg) {
        tch::manual_seed(3);
        let mut vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let cfg = TrainConfig { hidden: vec![8, 8], layer, ..TrainConfig::default() };
        let c = chain(&cfg, &vs, 3);
        vs.double();
        let cnf = single_block(&c).expect("one block");
        let rows = 6;
        let x = Tensor::randn([rows, 3], (Kind::Double, tch::Device::Cpu));
        let eps = Tensor::randn([rows, 3], (Kind::Double, tch::Device::Cpu));
        let taus = stratified_times(rows, tch::Device::Cpu).to_kind(Kind::Double);
        let got = tch::no_grad(|| loss(cnf, &x, &eps, &taus)).expect("loss").double_value(&[]);
        let t_end = cnf.end_time();
        let mut want = 0.0;
        for i in 0..rows {
            let tau = taus.double_value(&[i, 0]);
            assert!((i as f64 / rows as f64..(i + 1) as f64 / rows as f64).contains(&tau), "row {i}: {tau}");
            let (xi, ei) = (x.narrow(0, i, 1), eps.narrow(0, i, 1));
            let z = &xi * (1.0 - tau) + &ei * tau;
            let f = tch::no_grad(|| cnf.velocity(t_end * tau, &z));
            want += f64::try_from((f - (&ei - &xi) / t_end).square().sum(Kind::Double)).expect("sum");
        }
        want /= rows as f64;
        assert!((got - want).abs() < 1e-12 * want.max(1.0), "{layer:?}: {got} vs {want}");
    }

    /// A flow pre-trained on a shifted, scaled Gaussian carries it to about
    /// `N(0, I)`: its exact log-likelihood of the data rises from the
    /// identity's to within 0.2 nats of the true density's entropy.
    #[test]
    fn pretraining_alone_fits_a_gaussian() {
        tch::manual_seed(5);
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let cfg = TrainConfig { hidden: vec![32, 32], ..TrainConfig::default() };
        let c = chain(&cfg, &vs, 2);
        let (mean, sd) = (Tensor::from_slice(&[1.5f32, -1.0]), Tensor::from_slice(&[0.5f32, 2.0]));
        let data = |n: i64| Tensor::randn([n, 2], (Kind::Float, tch::Device::Cpu)) * &sd + &mean;
        let test = data(4000);
        let opts = SolveOptions::eval(crate::ode::dopri5_at(1e-6, 100_000));
        let nll = |c: &Chain| -> f64 {
            let out = tch::no_grad(|| c.log_prob(&test, &opts)).expect("log p");
            -out.log_p.mean(Kind::Double).double_value(&[])
        };
        assert_eq!(opts.trace, TraceMode::Exact);
        let before = nll(&c);
        let report = pretrain(&c, &vs, (1500, 3e-3, 0), (None, None), || Ok(data(256))).expect("pretrain");
        let after = nll(&c);
        // Entropy of N(m, diag(sd²)): Σ ½ log(2πe sd²) = 1 + log 2π + log(0.5·2).
        let entropy = 1.0 + (2.0 * std::f64::consts::PI).ln() + (0.5f64 * 2.0).ln();
        assert!(report.last_loss < report.first_loss, "loss {} → {}", report.first_loss, report.last_loss);
        assert!(before > entropy + 1.0, "the untrained flow is already good: {before} vs {entropy}");
        assert!(after < entropy + 0.2, "NLL {before} → {after}, entropy {entropy}");
    }

    /// With validation rows, the weights that come back are the best
    /// evaluation's, and a loss that never improves (learning rate 0) stops
    /// pre-training after exactly `patience` evaluations.
    #[test]
    fn pretraining_keeps_the_best_validation_weights_and_stops_when_they_stop_improving() {
        tch::manual_seed(11);
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let cfg = TrainConfig { hidden: vec![16], ..TrainConfig::default() };
        let c = chain(&cfg, &vs, 2);
        let data = |n: i64| Tensor::randn([n, 2], (Kind::Float, tch::Device::Cpu)) * 0.5 + 2.0;
        let mut valid = Validation::new(&data(300), 1).expect("rows");
        valid.every = 20;
        valid.patience = 3;
        let report =
            pretrain(&c, &vs, (400, 1e-2, 0), (Some(&valid), None), || Ok(data(128))).expect("pretrain");
        let (before, best, at) = report.validation.expect("validated");
        assert!(best < before, "validation loss {before} → {best}");
        assert!(at > 0 && at % 20 == 0 && at <= report.iterations, "best at {at} of {}", report.iterations);
        let now = valid.loss(single_block(&c).expect("one block")).expect("loss");
        assert_eq!(now, best, "the kept weights are the best evaluation's");

        // A run shorter than the evaluation interval is evaluated at its end:
        // its weights are kept when they are better.
        valid.every = 1000;
        let short =
            pretrain(&c, &vs, (50, 1e-2, 0), (Some(&valid), None), || Ok(data(128))).expect("pretrain");
        let (_, short_best, short_at) = short.validation.expect("validated");
        assert!(short_best < best && short_at == 50, "{best} → {short_best} at {short_at}");

        valid.every = 20;
        let frozen =
            pretrain(&c, &vs, (400, 0.0, 0), (Some(&valid), None), || Ok(data(128))).expect("pretrain");
        assert_eq!(frozen.stopped, Some(Stop::Plateau));
        assert_eq!(frozen.iterations, 60, "3 evaluations of 20 iterations without improvement");
        assert_eq!(frozen.validation.map(|v| v.2), Some(0));

        // A deadline already past stops it after one iteration, evaluated.
        let now = std::time::Instant::now();
        let late =
            pretrain(&c, &vs, (400, 1e-2, 0), (Some(&valid), Some(now)), || Ok(data(128))).expect("pretrain");
        assert_eq!((late.iterations, late.stopped), (1, Some(Stop::TimeLimit)));
        assert_eq!(late.validation.map(|v| v.2 <= 1), Some(true));
    }

    #[test]
    fn chains_it_cannot_pretrain_are_refused_by_name() {
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let two = chain(&TrainConfig { blocks: 2, hidden: vec![8], ..TrainConfig::default() }, &vs, 2);
        let err = single_block(&two).err().expect("two blocks refused").to_string();
        assert!(err.contains("one CNF block"), "{err}");
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let kde = TrainConfig {
            train_base: crate::kde::TrainBaseArg::Kde,
            hidden: vec![8],
            ..TrainConfig::default()
        };
        let err = single_block(&chain(&kde, &vs, 2)).err().expect("kernel base refused").to_string();
        assert!(err.contains("kernel base"), "{err}");
    }
}
