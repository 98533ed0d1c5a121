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
        let taus = stratified_times(x.size()[0], x.device());
        opt.zero_grad();
        let l = tch::with_grad(|| loss(cnf, &x, &eps, &taus))?;
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
