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

use anyhow::{Result, bail, ensure};
use tch::{Kind, Tensor};

use crate::model::{Chain, Cnf};
use crate::optim::Adam;

/// Rows of a batch share one time (the network takes a scalar `t`); the
/// batch is cut into this many groups with stratified times, one per
/// stratum of `[0, 1)`, so every batch covers the whole interval.
pub const TIME_GROUPS: i64 = 16;

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
/// shape): the mean over rows of `‖f(Tτ_g, z_τ) − (ε − x)/T‖²`, the rows cut
/// into [`TIME_GROUPS`] groups with times `τ_g` (one per group).
pub fn loss(cnf: &Cnf, x: &Tensor, eps: &Tensor, taus: &[f64]) -> Tensor {
    let end_time = cnf.end_time();
    let rows = x.size()[0];
    let groups = taus.len() as i64;
    let mut total = Tensor::zeros([], (x.kind(), x.device()));
    let mut start = 0;
    for (g, &tau) in taus.iter().enumerate() {
        // Group g gets rows [start, end): sizes differ by at most one.
        let end = rows * (g as i64 + 1) / groups;
        if end == start {
            continue;
        }
        let (xg, eg) = (x.narrow(0, start, end - start), eps.narrow(0, start, end - start));
        let z = &xg * (1.0 - tau) + &eg * tau;
        let target = (&eg - &xg) / end_time;
        let residual = cnf.velocity(end_time * tau, &z) - target;
        total += residual.square().sum(x.kind());
        start = end;
    }
    total / rows as f64
}

/// Stratified times for one batch: one uniform draw in each of `groups`
/// equal strata of `[0, 1)`.
pub fn stratified_times(groups: i64) -> Result<Vec<f64>> {
    let u = Vec::<f64>::try_from(Tensor::rand([groups], (Kind::Double, tch::Device::Cpu)))?;
    Ok(u.iter().enumerate().map(|(g, u)| (g as f64 + u) / groups as f64).collect())
}

/// What [`pretrain`] did.
pub struct Report {
    /// Pre-training iterations run.
    pub iterations: u64,
    /// Mean loss over the first tenth of the iterations.
    pub first_loss: f64,
    /// Mean loss over the last tenth.
    pub last_loss: f64,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// `iterations` of Adam (rate `lr`, no weight decay: its moments are
/// discarded after) on the flow-matching loss, each batch from `batch()`.
/// The end time `T` stays where it is (the targets are scaled by it).
pub fn pretrain(
    chain: &Chain,
    vs: &tch::nn::VarStore,
    iterations: u64,
    lr: f64,
    seed: i64,
    mut batch: impl FnMut() -> Result<Tensor>,
) -> Result<Report> {
    let cnf = single_block(chain)?;
    let start = std::time::Instant::now();
    let mut opt = Adam::new(vs, lr, 0.0);
    let tenth = (iterations / 10).max(1);
    let (mut first, mut last) = (0.0, 0.0);
    for i in 0..iterations {
        // Its own seed stream: the likelihood iterations after it draw the same
        // batches and noise as a run without pre-training.
        tch::manual_seed(seed.wrapping_add(0x0466_6d00).wrapping_add(7_919_i64.wrapping_mul(i as i64 + 1)));
        let x = batch()?;
        let eps = x.randn_like();
        let taus = stratified_times(TIME_GROUPS.min(x.size()[0]))?;
        opt.zero_grad();
        let l = tch::with_grad(|| loss(cnf, &x, &eps, &taus));
        let value = l.double_value(&[]);
        ensure!(value.is_finite(), "flow matching: the loss became {value} at iteration {i}");
        tch::with_grad(|| l.f_backward())?;
        opt.step();
        if i < tenth {
            first += value / tenth as f64;
        }
        if i >= iterations - tenth {
            last += value / tenth as f64;
        }
    }
    opt.zero_grad();
    Ok(Report { iterations, first_loss: first, last_loss: last, seconds: start.elapsed().as_secs_f64() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TrainConfig;
    use crate::model::{SolveOptions, TraceMode};

    fn chain(cfg: &TrainConfig, vs: &tch::nn::VarStore, dim: i64) -> Chain {
        crate::train::build_chain(vs, cfg, dim, None).expect("chain")
    }

    /// The loss is the mean squared residual computed directly (float64).
    #[test]
    fn the_loss_is_the_mean_squared_velocity_residual() {
        tch::manual_seed(3);
        let mut vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let cfg = TrainConfig { hidden: vec![8], ..TrainConfig::default() };
        let c = chain(&cfg, &vs, 2);
        vs.double();
        let cnf = single_block(&c).expect("one block");
        let x = Tensor::randn([6, 2], (Kind::Double, tch::Device::Cpu));
        let eps = Tensor::randn([6, 2], (Kind::Double, tch::Device::Cpu));
        let taus = [0.1, 0.5, 0.9];
        let got = tch::no_grad(|| loss(cnf, &x, &eps, &taus)).double_value(&[]);
        let t_end = cnf.end_time();
        let mut want = 0.0;
        for (g, tau) in taus.iter().enumerate() {
            let (xg, eg) = (x.narrow(0, 2 * g as i64, 2), eps.narrow(0, 2 * g as i64, 2));
            let z = &xg * (1.0 - tau) + &eg * *tau;
            let f = tch::no_grad(|| cnf.velocity(t_end * tau, &z));
            want += f64::try_from((f - (&eg - &xg) / t_end).square().sum(Kind::Double)).expect("sum");
        }
        want /= 6.0;
        assert!((got - want).abs() < 1e-12 * want.max(1.0), "{got} vs {want}");
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
        let report = pretrain(&c, &vs, 1500, 3e-3, 0, || Ok(data(256))).expect("pretrain");
        let after = nll(&c);
        // Entropy of N(m, diag(sd²)): Σ ½ log(2πe sd²) = 1 + log 2π + log(0.5·2).
        let entropy = 1.0 + (2.0 * std::f64::consts::PI).ln() + (0.5f64 * 2.0).ln();
        assert!(report.last_loss < report.first_loss, "loss {} → {}", report.first_loss, report.last_loss);
        assert!(before > entropy + 1.0, "the untrained flow is already good: {before} vs {entropy}");
        assert!(after < entropy + 0.2, "NLL {before} → {after}, entropy {entropy}");
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
