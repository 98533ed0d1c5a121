//! `trainer fit`: the training loop (Adam, validation with the exact trace,
//! best-checkpoint keeping, early stopping, resume, metrics log, export).

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use tch::{Device, Kind, Tensor, nn};

use crate::config::TrainConfig;
use crate::data::{self, Splits};
pub use crate::image_runs::{EXACT_TRACE_MAX_DIM, bits_per_dim, eval_options, sample_run_images};
use crate::kde::TrainedKernelBase;
use crate::model::{Chain, Cnf, FlowLayer, Linear, MovingBatchNorm, OdeNet, SolveOptions};
use crate::modelfile::{ExportInfo, export_bytes, write_atomic};
use crate::optim::{Adam, Ema, scheduled_lr};
pub use crate::run::RunDir;
use crate::run::{
    RUN_FILES, RunState, crash_point, load_last, save_checkpoint, save_last, truncate_metrics,
    with_eval_weights,
};
pub use crate::search::{compare_bases, compares_bases, search};

/// Ridge added to the whitening covariance (standardized units): keeps the
/// Cholesky factor finite for collinear or constant columns, as the Gaussian
/// baseline's 1e-6.
const WHITENING_RIDGE: f64 = 1e-6;

/// Builds the chain the config describes under `vs`.
/// With `batch_norm`: BN, CNF₁, BN, CNF₂, …, BN (spec §2.6). With `whiten`,
/// a whitening stage comes first, fitted to `splits`' training rows (as the
/// flow sees them: dequantization noise included) when given — else left
/// for a checkpoint to fill — and every CNF's net starts at zero.
pub fn build_chain(vs: &nn::VarStore, cfg: &TrainConfig, dim: i64, splits: Option<&Splits>) -> Result<Chain> {
    if let Some(shape) = &cfg.image_shape {
        return crate::image_runs::build_image_chain(vs, cfg, shape, dim);
    }
    let mut layers: Vec<Box<dyn FlowLayer>> = Vec::new();
    if cfg.whiten {
        let linear = Linear::new(&(vs.root() / "chain" / 0), dim);
        if let Some(s) = splits {
            linear.set_whitening(&s.train, &(s.noise.square() / 12.0), WHITENING_RIDGE)?;
        }
        layers.push(Box::new(linear));
    }
    let bn = |layers: &mut Vec<Box<dyn FlowLayer>>| {
        let i = layers.len();
        layers.push(Box::new(MovingBatchNorm::new(&(vs.root() / "chain" / i), dim)));
    };
    if cfg.batch_norm {
        bn(&mut layers);
    }
    for _ in 0..cfg.blocks {
        let p = vs.root() / "chain" / layers.len();
        let mut net =
            OdeNet::new(&(&p / "odefunc"), dim, &cfg.hidden, cfg.layer.into(), cfg.activation.into());
        let kernel_base = cfg.train_base == crate::kde::TrainBaseArg::Kde;
        if cfg.kinetic != 0.0 || cfg.jacobian != 0.0 || cfg.whiten || kernel_base {
            // RNODE's initialisation; with whitening start as the Gaussian, on
            // a trained kernel base as the kernel estimate.
            net.zero_last_layer();
        }
        layers.push(Box::new(Cnf::new(&p, Box::new(net), cfg.end_time, cfg.train_end_time)));
        if cfg.batch_norm {
            bn(&mut layers);
        }
    }
    let mut chain = Chain::new(layers, dim);
    if cfg.train_base == crate::kde::TrainBaseArg::Kde {
        // Its centres are set by `init_kernel_base` (a fresh run) or a checkpoint.
        chain.trained_base = Some(TrainedKernelBase::new(&(vs.root() / "base"), cfg.kde_centres as i64, dim));
    }
    Ok(chain)
}

/// The base a run in `run` trained on, from its config (`normal` for runs
/// from before `train_base` existed, or none yet): what `fit --resume` with
/// `--train-base auto` continues.
pub fn run_train_base(run: &RunDir) -> Result<crate::kde::TrainBaseArg> {
    let path = run.path("config.toml");
    let base = match std::fs::read_to_string(&path) {
        Ok(s) => {
            toml::from_str::<TrainConfig>(&s)
                .with_context(|| format!("{}: invalid config", path.display()))?
                .train_base
        }
        Err(_) => crate::kde::TrainBaseArg::Normal,
    };
    Ok(match base {
        crate::kde::TrainBaseArg::Auto => crate::kde::TrainBaseArg::Normal,
        b => b,
    })
}

/// Seed offset of the choice of a trained kernel base's centre rows.
const CENTRE_SEED: i64 = 0x6b64_6501;

/// Which training rows are a trained kernel base's centres: per training
/// row the centre it is, or −1 (seeded; the same at every resume).
fn centre_rows(n_train: i64, centres: i64, seed: i64, device: Device) -> (Tensor, Tensor) {
    tch::manual_seed(seed.wrapping_add(CENTRE_SEED));
    let pick = Tensor::randperm(n_train, (Kind::Int64, Device::Cpu)).narrow(0, 0, centres);
    let centre_of = Tensor::full([n_train], -1, (Kind::Int64, Device::Cpu));
    let _ = centre_of.shallow_clone().index_put_(
        &[Some(&pick)],
        &Tensor::arange(centres, (Kind::Int64, Device::Cpu)),
        false,
    );
    (pick.to_device(device), centre_of.to_device(device))
}

/// Starts a trained kernel base as the kernel estimate the validation rows
/// prefer: its centres are the latent points of the `pick`ed training rows
/// under the chain as initialized, its bandwidth and normal weight those of
/// the grids with the best validation likelihood (the weight at least 0.01:
/// it is learned on a logit scale). `valid` should carry one draw of the
/// dequantization noise ([`Splits::with_fixed_noise`]): at the cell centres,
/// rows that repeat a training row pick the smallest bandwidth of the grid.
fn init_kernel_base(
    chain: &Chain,
    train: &Tensor,
    valid: &Tensor,
    pick: &Tensor,
    opts: &SolveOptions,
) -> Result<()> {
    let Some(base) = &chain.trained_base else { return Ok(()) };
    let d = chain.dim;
    let latent = |x: &Tensor| -> Result<Tensor> {
        Ok(Tensor::from_slice(&chain.log_prob_rows(x, opts, 2000)?.z).view([-1, d]))
    };
    let centres = latent(&train.index_select(0, pick))?;
    let kde =
        crate::kde::KernelDensity::fit_mixed(&centres, &latent(valid)?, &crate::kde::NORMAL_WEIGHTS[1..])?;
    base.initialise(&centres, kde.bandwidth, kde.normal_weight)?;
    eprintln!(
        "kernel base: {} centres, starting at bandwidth {:.4} and N(0, I) weight {} (validation likelihood); both trained with the flow",
        base.centre_count(),
        kde.bandwidth,
        kde.normal_weight
    );
    Ok(())
}

/// Seed offsets of the validation and test evaluations' Hutchinson probes (images).
const VALID_SEED: i64 = 55_555;
const TEST_SEED: i64 = 77_777;

/// Mean NLL (nats, standardized data) over rows in batches, its standard
/// error over rows, and the NFE.
pub fn mean_nll(chain: &Chain, x: &Tensor, opts: &SolveOptions, batch: i64) -> Result<(f64, f64, u32)> {
    let rows = chain.log_prob_rows(x, opts, batch)?;
    let (log_p, nfe) = (rows.log_p, rows.nfe);
    let n = log_p.len().max(1) as f64;
    let nll = -log_p.iter().sum::<f64>() / n;
    let var = log_p.iter().map(|v| (-v - nll).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    Ok((nll, (var / n).sqrt(), u32::try_from(nfe).unwrap_or(u32::MAX)))
}

/// Trains, keeps the best checkpoint, and exports the best model to `out`.
pub fn fit(
    cfg: &TrainConfig,
    out: &Path,
    run: &RunDir,
    resume: bool,
    device: Device,
    command: &str,
) -> Result<()> {
    let created = !run.dir.exists();
    let result = fit_in_run_dir(cfg, out, run, resume, device, command);
    if result.is_err() && created && !run.path("last.ot").exists() {
        // A run that failed before its first checkpoint leaves no folder behind.
        let _ = std::fs::remove_dir_all(&run.dir);
    }
    result
}

fn fit_in_run_dir(
    cfg: &TrainConfig,
    out: &Path,
    run: &RunDir,
    resume: bool,
    device: Device,
    command: &str,
) -> Result<()> {
    tch::manual_seed(cfg.seed);
    tch::set_num_threads(tch::get_num_threads().max(1));
    // The data first: a run that cannot start must not touch an earlier run's folder.
    let (splits, description) = prepare_data(cfg)?;
    // The image shape the model is built for comes from the data and is part
    // of the run's config (so resume and later commands rebuild the same model).
    // So is the trace mode when the recipe's default applies.
    let trace = cfg.trace_mode(splits.image_shape.is_some());
    if cfg.trace.is_none() {
        eprintln!("trace: {trace:?} (the recipe's default for this data; --trace sets another)");
    }
    let kernel_base = cfg.train_base == crate::kde::TrainBaseArg::Kde;
    if kernel_base && splits.image_shape.is_some() {
        bail!("--train-base kde is for tabular data, not images");
    }
    if kernel_base && splits.train.size()[0] < 2 {
        bail!("--train-base kde needs at least two training rows (its kernels sit on them)");
    }
    let cfg = &TrainConfig {
        image_shape: splits.image_shape.map(|s| s.to_vec()),
        trace: Some(trace),
        // A trained kernel base has one centre per training row up to the cap
        // (the checkpoint's shape).
        kde_centres: if kernel_base {
            cfg.kde_centres.min(splits.train.size()[0] as usize)
        } else {
            cfg.kde_centres
        },
        ..cfg.clone()
    };
    if let Some([c, h, w]) = splits.image_shape {
        eprintln!(
            "images {c}×{h}×{w}: scaled to [0, 1) by 256, dequantized with fresh uniform noise of one byte per batch, logit α {}",
            cfg.logit_alpha
        );
    }
    std::fs::create_dir_all(&run.dir).with_context(|| format!("creating {}", run.dir.display()))?;
    if !resume {
        let earlier: Vec<_> = RUN_FILES.iter().map(|f| run.path(f)).filter(|p| p.exists()).collect();
        if !earlier.is_empty() {
            eprintln!(
                "starting a fresh run in {}: the earlier run's checkpoints and metrics there are replaced (--resume continues it instead)",
                run.dir.display()
            );
        }
        for p in earlier {
            std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    write_atomic(&run.path("config.toml"), toml::to_string_pretty(cfg)?.as_bytes())?;

    crate::columns::print_warnings(&splits.profiles, "`trainer prepare` writes a table of every column");
    // The grid step per column, and with `spread_spikes` the widest cell a
    // repeated value got (data units).
    let widths = Vec::<f64>::try_from(&(&splits.noise * &splits.std))?;
    let widest = match &splits.row_noise {
        Some(r) => Vec::<f64>::try_from(&(r * &splits.std).amax([0].as_slice(), false))?,
        None => widths.clone(),
    };
    let dequantized: Vec<String> = (splits.profiles.iter().zip(&widths).zip(&widest))
        .filter(|((_, w), _)| **w > 0.0)
        .map(|((p, _), widest)| {
            let step = p.dequantization().unwrap_or(*widest);
            if *widest > step * (1.0 + 1e-9) {
                format!(
                    "{} ({}; repeats up to {})",
                    p.name,
                    crate::columns::fmt_g(step),
                    crate::columns::fmt_sig3(*widest)
                )
            } else {
                format!("{} ({})", p.name, crate::columns::fmt_g(step))
            }
        })
        .collect();
    if !dequantized.is_empty() {
        eprintln!(
            "dequantizing {} of {} columns with fresh uniform noise of one grid step per batch{} (scored at the cell centres): {}",
            dequantized.len(),
            widths.len(),
            if splits.row_noise.is_some() {
                ", wider for heavily repeated values (--spread-spikes)"
            } else {
                ""
            },
            crate::columns::abridged(&dequantized, crate::columns::SHOWN_COLUMN_NOTES)
        );
    }
    let dim = splits.dim();
    let iterations = match (cfg.epochs, &cfg.toy) {
        (None, _) => cfg.iterations,
        (Some(_), Some(_)) => bail!("--epochs needs --data (toy sets draw fresh batches; use --iterations)"),
        (Some(e), None) => e * (splits.train.size()[0] as u64).div_ceil(cfg.batch.max(1) as u64),
    };
    let to_dev = |t: &Tensor| t.to_kind(Kind::Float).to_device(device);
    let (train, valid, test) = (to_dev(&splits.train), to_dev(&splits.valid), to_dev(&splits.test));
    let noise = splits.dequantizes().then(|| to_dev(&splits.noise));
    let row_noise = splits.row_noise.as_ref().map(to_dev);

    let mut vs = nn::VarStore::new(device);
    let mut chain = build_chain(&vs, cfg, dim, Some(&splits))?;
    let eval_opts = eval_options(cfg, dim);
    let n_train = train.size()[0];
    let centre_of = match &chain.trained_base {
        Some(base) => {
            let (pick, centre_of) = centre_rows(n_train, base.centre_count(), cfg.seed, device);
            if !resume {
                let valid_noised = splits.with_fixed_noise(&valid, cfg.seed);
                init_kernel_base(&chain, &train, &valid_noised, &pick, &eval_opts)?;
            }
            Some(centre_of)
        }
        None => None,
    };
    // One training batch as the flow sees it (dequantization and input noise
    // drawn here) and, on a trained kernel base, the centre each row is.
    let draw_batch = || -> Result<(Tensor, Option<Tensor>)> {
        if let Some(name) = &cfg.toy {
            return Ok((to_dev(&((data::toy(name, cfg.batch)? - &splits.mean) / &splits.std)), None));
        }
        let idx = Tensor::randint(n_train, [cfg.batch.min(n_train)], (Kind::Int64, device));
        let batch = train.index_select(0, &idx);
        let batch_centres = centre_of.as_ref().map(|c| c.index_select(0, &idx));
        let batch = match (&row_noise, &noise) {
            (Some(w), _) => &batch + (batch.rand_like() - 0.5) * w.index_select(0, &idx),
            (None, Some(w)) => &batch + (batch.rand_like() - 0.5) * w,
            (None, None) => batch,
        };
        let batch = if cfg.input_noise > 0.0 { &batch + batch.randn_like() * cfg.input_noise } else { batch };
        Ok((batch, batch_centres))
    };
    let flow_matching = cfg.flow_matching_iterations(iterations);
    let pretrained = flow_matching > 0 && !resume;
    // `--time-limit` counts pre-training too (a `--search` share is a budget
    // for the whole candidate).
    let limit_start = Instant::now();
    let deadline =
        cfg.time_limit.map(|limit| limit_start + std::time::Duration::from_secs_f64(limit.max(0.0)));
    if pretrained {
        let valid_rows =
            crate::flow_matching::Validation::new(&splits.with_fixed_noise(&valid, cfg.seed), cfg.seed);
        let r = crate::flow_matching::pretrain(
            &chain,
            &vs,
            (flow_matching, cfg.lr, cfg.seed),
            (valid_rows.as_ref(), deadline),
            || Ok(draw_batch()?.0),
        )?;
        let checked = match r.validation {
            Some((before, best, at)) => format!(
                "; validation loss {before:.4} → {best:.4} at iteration {at}{}",
                match r.stopped {
                    Some(crate::flow_matching::Stop::Plateau) =>
                        " (stopped: no better one in the last evaluations)",
                    Some(crate::flow_matching::Stop::TimeLimit) => " (stopped at the time limit)",
                    None => "",
                }
            ),
            None => String::new(),
        };
        eprintln!(
            "flow matching: {} iterations, loss {:.4} → {:.4} (first and last tenth){checked}, {:.1} s",
            r.iterations, r.first_loss, r.last_loss, r.seconds
        );
    }
    let mut opt = Adam::new(&vs, cfg.lr, cfg.weight_decay);
    let mut ema = (cfg.ema > 0.0).then(|| Ema::new(&vs, cfg.ema));
    let mut state = RunState::default();
    if resume {
        state = load_last(&vs, &mut opt, ema.as_mut(), &run.path("last.ot"), &run.path("state.json"))?;
        truncate_metrics(&run.path("metrics.jsonl"), state.iteration)?;
        eprintln!("resumed at iteration {}", state.iteration);
    }
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(run.path("metrics.jsonl"))
        .context("opening metrics.jsonl")?;
    if pretrained && valid.size()[0] > 0 {
        // The pre-trained flow is a candidate like every validated checkpoint:
        // where likelihood training only loses, best.ot stays this one.
        let (nll, nfe) = validation_nll(&chain, &valid, &eval_opts, ema.as_ref(), cfg.seed)?;
        writeln!(metrics, "{}", serde_json::json!({"iteration": 0, "valid_nll": nll, "valid_nfe": nfe}))?;
        state.best_valid = Some(nll);
        save_checkpoint(&vs, &run.path("best.ot"))?;
        eprintln!("after flow matching: validation NLL {nll:.4} nats on standardized data");
    }
    let train_opts = SolveOptions {
        method: cfg.method(),
        trace,
        create_graph: true,
        seminorm: cfg.seminorm,
        regularization: crate::model::Regularization { kinetic: cfg.kinetic, jacobian: cfg.jacobian },
        record_steps: false,
    };
    let bar = indicatif::ProgressBar::new(iterations);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_position(state.iteration);
    let t_start = Instant::now();
    let start_iteration = state.iteration;
    while state.iteration < iterations {
        // Each iteration's randomness (batch, Hutchinson noise) comes from its own
        // seed, so a resumed run continues exactly as an uninterrupted one.
        tch::manual_seed(cfg.seed.wrapping_add(1_000_003_i64.wrapping_mul(state.iteration as i64 + 1)));
        let (batch, batch_centres) = draw_batch()?;
        let t0 = Instant::now();
        opt.zero_grad();
        let (loss_value, stats) =
            chain.loss_and_gradients(&batch, &train_opts, cfg.gradient, batch_centres.as_ref())?;
        if !loss_value.is_finite() {
            let last = run.path("last.ot");
            let kept = if last.exists() {
                format!("the last good checkpoint {} is kept (resume with --resume)", last.display())
            } else {
                "no checkpoint had been written yet".to_string()
            };
            bail!(
                "loss became {loss_value} at iteration {}; training stopped and {kept}. Try a lower --lr, a smaller --end-time or tighter tolerances",
                state.iteration
            );
        }
        let (nfe_forward, nfe_backward) = (stats.solve.nfe, stats.backward.nfe);
        let reg_value = stats.regularization.as_ref().map(|r| r.double_value(&[]));
        opt.set_lr(scheduled_lr(cfg.lr, cfg.lr_schedule, cfg.warmup, state.iteration, iterations));
        opt.step();
        if let Some(ema) = &mut ema {
            ema.update();
        }
        state.iteration += 1;
        let dt = t0.elapsed().as_secs_f64();
        let its = (state.iteration - start_iteration) as f64 / t_start.elapsed().as_secs_f64();
        bar.set_position(state.iteration);
        bar.set_message(format!("loss {loss_value:.4} nfe {nfe_forward}/{nfe_backward} {its:.2} it/s"));
        let mut record = serde_json::json!({
            "iteration": state.iteration, "loss": loss_value, "nfe_forward": nfe_forward, "nfe_backward": nfe_backward,
            "regularization": reg_value,
            "seconds": dt,
        });
        let validation = if state.iteration % cfg.valid_every == 0 || state.iteration == iterations {
            let (nll, nfe) = validation_nll(&chain, &valid, &eval_opts, ema.as_ref(), cfg.seed)?;
            record["valid_nll"] = nll.into();
            record["valid_nfe"] = nfe.into();
            Some(nll)
        } else {
            None
        };
        // The iteration's record first: a checkpoint never refers to a record
        // that is missing (a resume drops records after its checkpoint).
        writeln!(metrics, "{record}")?;
        let Some(nll) = validation else { continue };
        metrics.sync_data().context("syncing metrics.jsonl")?;
        // The checkpoint commit: best.ot (if better), then last.ot with the run
        // state in the same file, then state.json for people. A kill between
        // any two steps resumes from the last.ot before it (tested at each point).
        crash_point("before-best", state.iteration);
        if state.best_valid.is_none_or(|b| nll < b) {
            state.best_valid = Some(nll);
            state.best_iteration = state.iteration;
            state.stale_validations = 0;
            with_eval_weights(ema.as_ref(), || save_checkpoint(&vs, &run.path("best.ot")))?;
        } else {
            state.stale_validations += 1;
        }
        crash_point("after-best", state.iteration);
        save_last(&vs, &opt, ema.as_ref(), &state, &run.path("last.ot"))?;
        crash_point("after-last", state.iteration);
        write_atomic(&run.path("state.json"), serde_json::to_string_pretty(&state)?.as_bytes())?;
        crash_point("after-state", state.iteration);
        say(
            &bar,
            match cfg.image_shape {
                Some(_) => format!(
                    "iteration {}: validation {:.4} bits/dim (best {:.4})",
                    state.iteration,
                    bits_per_dim(nll, dim),
                    bits_per_dim(state.best_valid.unwrap_or(nll), dim)
                ),
                None => format!(
                    "iteration {}: validation NLL {nll:.4} nats on standardized data (best {:.4})",
                    state.iteration,
                    state.best_valid.unwrap_or(nll)
                ),
            },
        );
        if cfg.patience() > 0 && state.stale_validations >= cfg.patience() {
            say(&bar, format!("early stop: {} validations without improvement", cfg.patience()));
            break;
        }
        if let Some(limit) = cfg.time_limit
            && limit_start.elapsed().as_secs_f64() >= limit
        {
            say(&bar, format!("time limit: stopping at iteration {} after {limit:.0} s", state.iteration));
            break;
        }
    }
    bar.finish_and_clear();

    vs.load(run.path("best.ot")).context("loading the best checkpoint")?;
    let log_std: f64 = splits.std.log().sum(Kind::Double).double_value(&[]);
    let (test_nll, test_nfe) = if test.size()[0] > 0 {
        tch::manual_seed(cfg.seed.wrapping_add(TEST_SEED));
        let (nll, se, nfe) = tch::no_grad(|| mean_nll(&chain, &test, &eval_opts, 1000))?;
        match cfg.image_shape {
            Some(_) => println!(
                "best iteration {}: validation {:.4} bits/dim, test {:.4} ± {:.4} bits/dim ({}), NFE {nfe}",
                state.best_iteration,
                bits_per_dim(state.best_valid.unwrap_or(f64::NAN), dim),
                bits_per_dim(nll, dim),
                se / (dim as f64 * std::f64::consts::LN_2),
                if eval_opts.trace == crate::model::TraceMode::Exact {
                    "exact trace; ± is the standard error over images"
                } else {
                    "Hutchinson estimate; ± is the standard error over images and probes"
                },
            ),
            None => println!(
                "best iteration {}: validation NLL {:.4}, test NLL {nll:.4} nats on standardized data ({:.4} nats in data units), NFE {nfe}",
                state.best_iteration,
                state.best_valid.unwrap_or(f64::NAN),
                nll + log_std
            ),
        }
        (Some(nll), Some(nfe))
    } else {
        let valid_nll = state.best_valid.unwrap_or(f64::NAN);
        match cfg.image_shape {
            Some(_) => println!(
                "best iteration {}: validation {:.4} bits/dim (no test rows)",
                state.best_iteration,
                bits_per_dim(valid_nll, dim)
            ),
            None => println!(
                "best iteration {}: validation NLL {valid_nll:.4} nats on standardized data (no test rows)",
                state.best_iteration
            ),
        }
        (None, None)
    };
    if cfg.image_shape.is_some() {
        let summary = serde_json::json!({
            "best_iteration": state.best_iteration, "best_valid_nll": state.best_valid,
            "best_valid_bits_per_dim": state.best_valid.map(|v| bits_per_dim(v, dim)),
            "test_nll": test_nll, "test_bits_per_dim": test_nll.map(|v| bits_per_dim(v, dim)), "test_nfe": test_nfe,
        });
        write_atomic(&run.path("summary.json"), serde_json::to_string_pretty(&summary)?.as_bytes())?;
        // The model file takes 8-bit pixel values (its standardization maps
        // a byte to its cell centre); the threshold is calibrated on the
        // validation images, for out-of-distribution scoring.
        let q = cfg.threshold_quantile;
        let bytes =
            export(&mut chain, &splits, &valid, cfg, q, &description, command, out, Format::Model, None)?
                .bytes;
        println!("wrote {} ({} bytes)", out.display(), bytes.len());
        return Ok(());
    }
    let exported = export(
        &mut chain,
        &splits,
        &valid,
        cfg,
        cfg.threshold_quantile,
        &description,
        command,
        out,
        Format::Model,
        None,
    )?;
    // With a KDE base fitted after training the exported model's test NLL is
    // not the one above (which is the flow on N(0, I)): say what the file gives.
    let test_nll_exported = match (&chain.base, test_nll) {
        (Some(_), Some(_)) if chain.trained_base.is_none() => {
            tch::manual_seed(cfg.seed.wrapping_add(TEST_SEED));
            let (nll, _, _) = tch::no_grad(|| mean_nll(&chain, &test, &eval_opts, 1000))?;
            println!(
                "the exported model (KDE base): test NLL {nll:.4} nats on standardized data ({:.4} nats in data units)",
                nll + log_std
            );
            Some(nll)
        }
        _ => test_nll,
    };
    let summary = serde_json::json!({
        "best_iteration": state.best_iteration, "best_valid_nll": state.best_valid,
        "test_nll": test_nll, "test_nll_data_units": test_nll.map(|v| v + log_std), "test_nfe": test_nfe,
        "test_nll_exported": test_nll_exported, "kde_base": chain.base.is_some(),
        "trained_base": chain.trained_base.is_some(),
        // The file's validation NLL, what `--train-base auto` compares
        // ([`Exported::valid_log_p`]).
        "valid_nll_exported": exported.valid_log_p.map_or(state.best_valid, |lp| Some(-lp)),
        "model": out, "bytes": exported.bytes.len(),
    });
    write_atomic(&run.path("summary.json"), serde_json::to_string_pretty(&summary)?.as_bytes())?;
    println!("wrote {} ({} bytes)", out.display(), exported.bytes.len());
    Ok(())
}

/// The name a model written to `out` gets: `models/NAME/model.ffjd` is named
/// NAME, other files by their stem.
pub(crate) fn model_name(out: &Path) -> String {
    let stem = out.file_stem().map_or("model".into(), |s| s.to_string_lossy().to_string());
    match out.parent().and_then(|p| p.file_name()) {
        Some(dir) if stem == "model" => dir.to_string_lossy().to_string(),
        _ => stem,
    }
}

/// The data splits a config describes. Call right after `tch::manual_seed(cfg.seed)`:
/// the same seed gives the same splits (so `trainer export` can recalibrate on
/// the run's own validation rows).
pub fn prepare_data(cfg: &TrainConfig) -> Result<(Splits, String)> {
    Ok(match (&cfg.toy, &cfg.data) {
        (Some(name), None) => {
            let train = data::toy(name, 20_000)?;
            let valid = data::toy(name, cfg.toy_eval_rows)?;
            let test = data::toy(name, cfg.toy_eval_rows)?;
            (Splits::standardized(train, valid, test), format!("toy data set '{name}'"))
        }
        (None, Some(path)) if crate::images::is_image_file(path) => {
            let (train, shape) = crate::images::load_rows(path)?;
            let valid_path = cfg
                .valid_data
                .as_ref()
                .context("images need --valid-data (prepare writes valid-images.npy)")?;
            let (valid, valid_shape) = crate::images::load_rows(valid_path)?;
            let (test, test_shape) = match &cfg.test_data {
                Some(t) => crate::images::load_rows(t)?,
                None => (Tensor::zeros([0, train.size()[1]], (Kind::Double, Device::Cpu)), shape),
            };
            for (name, other) in [("validation", valid_shape), ("test", test_shape)] {
                anyhow::ensure!(other == shape, "{name} images are {other:?}, training images {shape:?}");
            }
            let description = format!("{} ({}×{} images, 8-bit)", display_path(path), shape[1], shape[2]);
            (Splits { image_shape: Some(shape), ..Splits::images(&train, &valid, &test) }, description)
        }
        (None, Some(path)) => {
            let load = |p: &Path, training: bool| -> Result<data::Table> {
                let t = data::load(p, cfg.columns.as_deref())?;
                match &cfg.label {
                    None => Ok(t),
                    Some(col) => {
                        let (features, labels) = crate::anomaly::split_labels(&t, col)
                            .with_context(|| format!("{}", p.display()))?;
                        // Training rows: the normal ones only.
                        Ok(if training { features.keep_rows(|i| !labels[i]) } else { features })
                    }
                }
            };
            let train = load(path, true)?;
            let profiles = crate::columns::profile(&train);
            let widths: Vec<f64> = profiles
                .iter()
                .map(|p| if cfg.dequantize { p.dequantization().unwrap_or(0.0) } else { 0.0 })
                .collect();
            let described = format!("{} (columns {})", display_path(path), train.columns.join(", "));
            let s = match (&cfg.valid_data, &cfg.test_data) {
                (Some(v), t) => {
                    let valid = load(v, true)?;
                    let test = match t {
                        Some(t) => load(t, false)?,
                        None => data::Table { columns: train.columns.clone(), rows: 0, values: vec![] },
                    };
                    for (name, other) in [("validation", &valid), ("test", &test)] {
                        if other.columns.len() != train.columns.len() {
                            bail!(
                                "{name} data has {} columns, training data {}",
                                other.columns.len(),
                                train.columns.len()
                            );
                        }
                    }
                    Splits::dequantized(
                        train.to_tensor(),
                        valid.to_tensor(),
                        test.to_tensor(),
                        &widths,
                        cfg.spread_spikes,
                    )
                }
                (None, None) => Splits::from_table(
                    &train,
                    cfg.valid_fraction,
                    cfg.test_fraction,
                    &widths,
                    cfg.spread_spikes,
                )?,
                (None, Some(_)) => bail!("--test-data needs --valid-data"),
            };
            (Splits { profiles, ..s }, described)
        }
        _ => bail!("give exactly one of --toy NAME or --data FILE"),
    })
    .map(|(mut s, description)| {
        // Seeded subsets of large validation / test sets (exact-trace evaluation is costly).
        let subset = |t: &Tensor, cap: Option<usize>| match cap {
            Some(k) if (k as i64) < t.size()[0] => t.index_select(
                0,
                &Tensor::randperm(t.size()[0], (Kind::Int64, Device::Cpu)).narrow(0, 0, k as i64),
            ),
            _ => t.shallow_clone(),
        };
        s.valid = subset(&s.valid, cfg.valid_rows);
        s.test = subset(&s.test, cfg.test_rows);
        (s, description)
    })
}

/// A path as recorded in a model's metadata: relative to the working directory when inside it.
fn display_path(p: &Path) -> String {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| p.strip_prefix(cwd).ok().map(|r| r.display().to_string()))
        .unwrap_or_else(|| p.display().to_string())
}

/// Output form of an export.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// The binary model file the runtime loads.
    Model,
    /// The documented JSON form (`trainer import` turns it back into a model file).
    Json,
}

/// Exports `chain` (with a threshold at quantile `q` of the validation scores)
/// to `out`, atomically; a tabular chain first gets the base `cfg.base` says
/// ([`crate::kde::choose_base`]).
#[allow(clippy::too_many_arguments)]
pub fn export(
    chain: &mut Chain,
    splits: &Splits,
    valid: &Tensor,
    cfg: &TrainConfig,
    q: Option<f64>,
    description: &str,
    command: &str,
    out: &Path,
    format: Format,
    max_error: Option<f64>,
) -> Result<Exported> {
    let log_std: f64 = splits.std.log().sum(Kind::Double).double_value(&[]);
    let data_file = cfg.tabular_file();
    // Likelihoods that decide between bases are taken on the validation rows
    // as training sees data (one fixed draw of the dequantization noise).
    let valid_noised = splits.with_fixed_noise(valid, cfg.seed);
    let noised_note = if splits.dequantizes() { ", one fixed draw of dequantization noise" } else { "" };
    let opts = SolveOptions::eval(cfg.eval_method());
    let mut valid_log_p = None;
    if let Some(trained) = &chain.trained_base {
        let kde = trained.snapshot();
        println!(
            "base: the Gaussian KDE trained with the flow on {} centres, bandwidth {:.4}, N(0, I) weight {:.4}",
            trained.centre_count(),
            kde.bandwidth,
            kde.normal_weight
        );
        chain.base = Some(kde);
    } else if cfg.image_shape.is_none() && cfg.base != crate::kde::BaseArg::Normal && chain.base.is_none() {
        let train = splits.train.to_kind(valid.kind()).to_device(valid.device());
        let c = crate::kde::choose_base(
            chain,
            &train,
            &valid_noised,
            &opts,
            cfg.kde_centres,
            cfg.seed,
            cfg.base,
        )?;
        println!(
            "base: mean validation log p {:.4} with N(0, I), {:.4} with a Gaussian KDE on {} latent points \
             (two-fold cross-validated; bandwidth {:.4} and N(0, I) weight {} by validation likelihood; \
             nats, standardized units{noised_note}) → {}",
            c.valid_log_p_normal,
            c.valid_log_p_kde,
            c.kde.centres().size()[0],
            c.kde.bandwidth,
            c.kde.normal_weight,
            if c.chosen { "KDE base" } else { "N(0, I)" }
        );
        valid_log_p = Some(if c.chosen { c.valid_log_p_kde } else { c.valid_log_p_normal });
        if c.chosen {
            chain.base = Some(c.kde);
        }
    }
    if data_file && valid_log_p.is_none() && valid.size()[0] > 0 {
        let rows = chain.log_prob_rows(&valid_noised, &opts, 2000)?;
        let lp = rows.log_p.iter().sum::<f64>() / rows.log_p.len().max(1) as f64;
        println!("the model file's mean validation log p: {lp:.4} (nats, standardized units{noised_note})");
        valid_log_p = Some(lp);
    }
    let score =
        crate::score_kind::choose(chain, &splits.train, valid, &opts, cfg.seed, cfg.score, data_file)?;
    if data_file || cfg.score != crate::score_kind::ScoreArg::Auto {
        println!("{}", score.describe());
    }
    let threshold = match q {
        Some(q) => Some(calibrate(chain, valid, cfg, q, log_std, score.kind)?),
        None => None,
    };
    let name = model_name(out);
    let info = ExportInfo {
        mean: &splits.mean,
        std: &splits.std,
        solver: cfg.export_method(),
        threshold,
        score: score.kind,
        name: &name,
        description,
        command,
    };
    let mut bytes = export_bytes(chain, &info)?;
    // Validation rows in data units, as the runtime reads them.
    let data_rows = |limit: i64| -> Result<Vec<Vec<f32>>> {
        let t = (valid.to_kind(Kind::Double).to_device(Device::Cpu) * &splits.std + &splits.mean)
            .narrow(0, 0, valid.size()[0].min(limit))
            .contiguous();
        let d = t.size()[1] as usize;
        let flat = Vec::<f64>::try_from(&t.view(-1))?;
        Ok(flat.chunks(d).map(|r| r.iter().map(|&v| v as f32).collect()).collect())
    };
    if let Some(eps) = max_error {
        let rows = data_rows(1000)?;
        let (best, all) = crate::budget::choose(&bytes, &rows, eps)?;
        println!(
            "solver budget (max |Δ log p| ≤ {eps} nats on {} validation rows, vs Dopri5 1e-7):",
            rows.len()
        );
        print!("{}", crate::budget::table(&all));
        println!("chosen: {} (mean NFE {:.1}, max error {:.2e})", best.solver, best.mean_nfe, best.max_error);
        bytes = export_bytes(chain, &ExportInfo { solver: best.method, ..info })?;
    }
    if cfg.weights != ffjord_runtime::MatrixEncoding::F32 {
        // Stored smaller; the threshold recalibrated on what the runtime now computes.
        bytes = crate::modelfile::with_matrices(&bytes, cfg.weights, Some(&data_rows(i64::MAX)?))?;
    }
    match format {
        Format::Model => write_atomic(out, &bytes)?,
        Format::Json => {
            let model = ffjord_runtime::Model::from_bytes(&bytes)?;
            let json = serde_json::to_string_pretty(&crate::json::to_json(&model)?)?;
            write_atomic(out, json.as_bytes())?;
        }
    }
    Ok(Exported { bytes, valid_log_p })
}

/// What [`export`] wrote.
pub struct Exported {
    /// The model file's bytes.
    pub bytes: Vec<u8>,
    /// Tabular data files: the file's mean log p over the validation rows
    /// with one fixed draw of dequantization noise
    /// ([`Splits::with_fixed_noise`]; nats, standardized units); with a KDE
    /// base fitted after training, its two-fold cross-validated value. What
    /// `--train-base auto` compares.
    pub valid_log_p: Option<f64>,
}

/// What `trainer export` may change about a run's export.
#[derive(Clone, Copy, Debug)]
pub struct ExportOptions {
    /// Recalibrate the threshold at this quantile (default: the run's).
    pub threshold_quantile: Option<f64>,
    /// Make the cheapest solver within this many nats the default.
    pub max_error: Option<f64>,
    pub format: Format,
    /// How the file stores the CNF matrices (default: the run's `weights`).
    pub weights: Option<ffjord_runtime::MatrixEncoding>,
    /// The base density (default: the run's `base`).
    pub base: Option<crate::kde::BaseArg>,
    /// The anomaly score (default: the run's `score`).
    pub score: Option<crate::score_kind::ScoreArg>,
    /// Most latent points of a KDE base (default: the run's `kde_centres`).
    pub kde_centres: Option<usize>,
}

/// `trainer export`: re-exports a run's best checkpoint, recalibrating the
/// threshold on the run's validation rows.
pub fn export_run(
    run: &RunDir,
    out: &Path,
    opts: &ExportOptions,
    device: Device,
    command: &str,
) -> Result<()> {
    let ExportOptions { threshold_quantile: q, max_error, format, weights, base, score, kde_centres } = *opts;
    let mut cfg = run.config()?;
    if cfg.train_base == crate::kde::TrainBaseArg::Kde && (base.is_some() || kde_centres.is_some()) {
        bail!(
            "{} trained on a kernel base (train_base = \"kde\"): the file keeps that base, so --base and --kde-centres do not apply",
            run.dir.display()
        );
    }
    cfg.weights = weights.unwrap_or(cfg.weights);
    cfg.base = base.unwrap_or(cfg.base);
    cfg.score = score.unwrap_or(cfg.score);
    cfg.kde_centres = kde_centres.unwrap_or(cfg.kde_centres);
    cfg.validate()?;
    tch::manual_seed(cfg.seed);
    let (splits, description) = prepare_data(&cfg)?;
    let mut vs = nn::VarStore::new(device);
    let mut chain = build_chain(&vs, &cfg, splits.dim(), None)?;
    let best = run.path("best.ot");
    vs.load(&best).with_context(|| format!("loading {}", best.display()))?;
    let valid = splits.valid.to_kind(Kind::Float).to_device(device);
    let q = q.or(cfg.threshold_quantile);
    let bytes =
        export(&mut chain, &splits, &valid, &cfg, q, &description, command, out, format, max_error)?.bytes;
    match format {
        Format::Model => println!("wrote {} ({} bytes)", out.display(), bytes.len()),
        Format::Json => println!("wrote {}", out.display()),
    }
    Ok(())
}

/// Prints above the progress bar, or to stderr when the bar is hidden (not a terminal).
/// Validation NLL and its function evaluations, with the weights
/// validation uses (the average, with `--ema`) and the same probes at every
/// validation (when the trace is estimated).
fn validation_nll(
    chain: &Chain,
    valid: &Tensor,
    opts: &SolveOptions,
    ema: Option<&Ema>,
    seed: i64,
) -> Result<(f64, u32)> {
    tch::manual_seed(seed.wrapping_add(VALID_SEED));
    let (nll, _, nfe) = with_eval_weights(ema, || tch::no_grad(|| mean_nll(chain, valid, opts, 1000)))?;
    Ok((nll, nfe))
}

fn say(bar: &indicatif::ProgressBar, msg: String) {
    use std::io::IsTerminal;
    if std::io::stderr().is_terminal() { bar.println(msg) } else { eprintln!("{msg}") }
}

/// The share of new normal rows expected above a threshold at the `q`
/// quantile of `n` validation scores, `(n − rank)/(n + 1)` for the order
/// statistic the threshold is, where it exceeds `1 − q` by more than half.
fn coarse_threshold_rate(n: usize, q: f64) -> Option<f64> {
    let expected = (n - crate::anomaly::quantile_rank(n, q)) as f64 / (n + 1) as f64;
    (n > 0 && expected > 1.5 * (1.0 - q)).then_some(expected)
}

/// "largest", "2nd largest", "3rd largest", "4th largest", … (`k` ≥ 1).
fn kth_largest(k: usize) -> String {
    let suffix = match (k % 10, k % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    if k <= 1 { "largest".into() } else { format!("{k}{suffix} largest") }
}

/// Threshold on the anomaly score of `kind` at quantile `q` of validation
/// rows: −log p in data units, or the latent radius −log N(z) (which does not
/// depend on the data's units).
///
/// The rows are evaluated as validation evaluates them: with the exact trace,
/// except for images above [`EXACT_TRACE_MAX_DIM`](crate::image_runs::EXACT_TRACE_MAX_DIM)
/// pixels, which get the seeded Hutchinson estimate (the exact trace of 500
/// 28×28 images takes about an hour on two cores; the estimate's noise widens
/// the quantile a little, so the threshold is slightly conservative for a
/// caller that scores with the exact trace).
fn calibrate(
    chain: &Chain,
    valid: &Tensor,
    cfg: &TrainConfig,
    q: f64,
    log_std: f64,
    kind: ffjord_runtime::ScoreKind,
) -> Result<ffjord_runtime::Threshold> {
    if !(q > 0.0 && q < 1.0) {
        bail!("--threshold-quantile must be in (0, 1), got {q}");
    }
    let opts = crate::image_runs::eval_options(cfg, valid.size()[1]);
    tch::manual_seed(cfg.seed.wrapping_add(VALID_SEED));
    // One chunk: the rows are solved together, as validation solves them.
    let rows = chain.log_prob_rows(valid, &opts, valid.size()[0].max(1))?;
    let mut scores = crate::score_kind::row_scores(kind, &rows, chain.dim)?;
    if kind == ffjord_runtime::ScoreKind::NegLogDensity {
        // −log p in the data's units, as the runtime scores it.
        scores.iter_mut().for_each(|s| *s += log_std);
    }
    let score = crate::anomaly::quantile(&scores, q);
    if !score.is_finite() {
        bail!("no finite validation scores to calibrate the threshold on");
    }
    if let Some(expected) = coarse_threshold_rate(scores.len(), q) {
        eprintln!(
            "warning: {} validation rows resolve the {q} quantile only coarsely: the threshold is the {} \
             validation score, so about {:.1} % of normal rows are expected above it, not {:.1} % \
             (more validation rows tighten it)",
            scores.len(),
            kth_largest(scores.len() - crate::anomaly::quantile_rank(scores.len(), q)),
            100.0 * expected,
            100.0 * (1.0 - q)
        );
    }
    Ok(ffjord_runtime::Threshold { score: score as f32, quantile: q as f32 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_threshold_from_few_validation_rows_is_flagged_with_its_real_rate() {
        // 22 rows: the 0.99 quantile is the largest score, exceeded by 1/23 of new rows.
        assert!((coarse_threshold_rate(22, 0.99).unwrap() - 1.0 / 23.0).abs() < 1e-12);
        // 40 rows: the largest, 1/41 ≈ 2.4 %.
        assert!((coarse_threshold_rate(40, 0.99).unwrap() - 1.0 / 41.0).abs() < 1e-12);
        // 83 rows (cardio): the largest, 1/84 ≈ 1.2 %, close enough to 1 %.
        assert_eq!(coarse_threshold_rate(83, 0.99), None);
        // 220 rows (satellite): the 2nd largest, 2/221 ≈ 0.9 %.
        assert_eq!(coarse_threshold_rate(220, 0.99), None);
        assert_eq!(coarse_threshold_rate(22, 0.5), None);
        assert_eq!(
            [1, 2, 3, 4, 11, 12, 13, 21, 22, 23].map(kth_largest),
            [
                "largest",
                "2nd largest",
                "3rd largest",
                "4th largest",
                "11th largest",
                "12th largest",
                "13th largest",
                "21st largest",
                "22nd largest",
                "23rd largest"
            ]
        );
    }
}
