//! `trainer`: train FFJORD models on tch and export them for ffjord-runtime.

mod cli;
mod commands;

use anyhow::{Context, Result, bail, ensure};
use clap::FromArgMatches;

use ffjord_trainer::{data, modelfile, train};

use cli::*;
use commands::*;

fn main() {
    ffjord_trainer::allocator::keep_freed_memory();
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// The command as recorded in a model's metadata: the program by its name
/// (not the machine's absolute path to it), then the arguments as given.
fn command_line() -> String {
    let mut args: Vec<String> = std::env::args().collect();
    if let Some(program) = args.first_mut()
        && let Some(name) = std::path::Path::new(program.as_str()).file_name()
    {
        *program = name.to_string_lossy().into_owned();
    }
    args.join(" ")
}

fn run() -> Result<()> {
    let cli = Cli::from_arg_matches(&cli_command().get_matches())?;
    match cli.command {
        Command::Fit(args) => {
            let cfg = args.config()?;
            let run_dir = args.run_dir.clone().unwrap_or_else(|| args.out.with_extension("run"));
            let device = args.device.resolve()?;
            let run = train::RunDir { dir: run_dir };
            match args.search {
                Some(minutes) => train::search(&cfg, minutes, &args.out, &run, device, &command_line()),
                None if args.resume && cfg.train_base == ffjord_trainer::kde::TrainBaseArg::Auto => {
                    // A run chose its base when it started: continue on that one.
                    let cfg = ffjord_trainer::config::TrainConfig {
                        train_base: train::run_train_base(&run)?,
                        ..cfg
                    };
                    train::fit(&cfg, &args.out, &run, true, device, &command_line())
                }
                None if train::compares_bases(&cfg) => {
                    train::compare_bases(&cfg, &args.out, &run, device, &command_line())
                }
                None => train::fit(&cfg, &args.out, &run, args.resume, device, &command_line()),
            }
        }
        Command::Eval(args) => eval(&args),
        Command::Score(args) => score(&args),
        Command::Sample(args) => sample(&args),
        Command::Toy(args) => {
            tch::manual_seed(args.seed);
            let x = data::toy(&args.name, args.n)?;
            let t = data::Table::from_tensor(&x, vec!["x".into(), "y".into()])?;
            write_table(&args.out, &t.columns, (0..t.rows).map(|i| t.row(i).to_vec()))
        }
        Command::Inspect(args) => inspect(&args),
        Command::Budget(args) => budget(&args),
        Command::Export(a) => {
            let run = train::RunDir { dir: a.run_dir.clone() };
            let opts = train::ExportOptions {
                threshold_quantile: a.threshold_quantile,
                max_error: a.max_error,
                format: a.format,
                weights: a.weights.as_deref().and_then(ffjord_runtime::MatrixEncoding::from_name),
                base: a.base,
                score: a.score,
                kde_centres: a.kde_centres,
            };
            train::export_run(&run, &a.out, &opts, a.device.resolve()?, &command_line())
        }
        Command::SampleImages(a) => {
            let grid = match (&a.run_dir, &a.model) {
                (Some(dir), _) => {
                    train::sample_run_images(&train::RunDir { dir: dir.clone() }, a.count, a.seed, a.tol)?
                }
                (None, Some(path)) => {
                    let bytes = modelfile::read_model_bytes(path)?;
                    let count =
                        usize::try_from(a.count).map_err(|_| anyhow::anyhow!("count must be at least 1"))?;
                    ffjord_trainer::image_runs::sample_model_images(&bytes, count, a.seed as u64)?
                }
                (None, None) => bail!("sample-images needs --run-dir or --model"),
            };
            grid.save_png(&a.out)?;
            println!(
                "wrote {} ({} samples, {}×{} pixels each)",
                a.out.display(),
                a.count,
                grid.height,
                grid.width
            );
            Ok(())
        }
        Command::DensityBaselines(a) => {
            let train = data::load(&a.train, None)?.to_tensor();
            let test = data::load(&a.test, None)?.to_tensor();
            println!("| model | test NLL (nats) | seconds to fit |");
            println!("|---|---|---|");
            for k in a.components {
                let t0 = std::time::Instant::now();
                let m = ffjord_trainer::baselines::Mixture::fit(
                    &train,
                    k,
                    if k == 1 { 1 } else { a.iterations },
                    a.seed,
                )?;
                let secs = t0.elapsed().as_secs_f64();
                let lp = m.log_prob(&test)?;
                let nll = -lp.iter().sum::<f64>() / lp.len() as f64;
                let name = if k == 1 {
                    "Gaussian (full covariance)".to_string()
                } else {
                    format!("Gaussian mixture, K = {k}")
                };
                println!("| {name} | {nll:.4} | {secs:.0} |");
            }
            Ok(())
        }
        Command::Benchmark(a) => {
            let (test, labels) =
                ffjord_trainer::anomaly::split_labels(&data::load(&a.test, None)?, &a.labels)?;
            let rows =
                ffjord_trainer::anomaly::benchmark(&a.run_dir, &a.model, &test, &labels, a.components)?;
            let pos = labels.iter().filter(|&&l| l).count();
            println!(
                "{} test rows, {pos} anomalies; thresholds at quantiles of each method's validation scores",
                labels.len()
            );
            println!(
                "| method | AUROC | AP | precision (q=0.95) | recall | FPR | precision (q=0.99) | recall | FPR |"
            );
            println!("|---|---|---|---|---|---|---|---|---|");
            if let Some(path) = &a.json {
                modelfile::write_atomic(path, serde_json::to_string_pretty(&rows)?.as_bytes())?;
            }
            for r in rows {
                let (a, b) = (r.at_95, r.at_99);
                println!(
                    "| {} | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} |",
                    r.method,
                    a.auroc,
                    a.average_precision,
                    a.precision,
                    a.recall,
                    a.false_positive_rate,
                    b.precision,
                    b.recall,
                    b.false_positive_rate
                );
            }
            Ok(())
        }
        Command::BenchmarkSummary(a) => {
            let mut runs = Vec::new();
            for f in &a.files {
                let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
                runs.push(
                    serde_json::from_str(&text)
                        .with_context(|| format!("{}: not a `benchmark --json` file", f.display()))?,
                );
            }
            ensure!(!runs.is_empty(), "give at least one `benchmark --json` file");
            print!("{}", ffjord_trainer::anomaly::summary_table(&runs));
            Ok(())
        }
        Command::Prepare(a) if a.name == "power" => {
            ffjord_trainer::power::prepare(&a.raw, &a.out_dir, a.seed)
        }
        Command::Prepare(a) if a.name == "mnist" || a.name == "fashion-mnist" => {
            ffjord_trainer::images::prepare(&a.name, &a.raw, &a.out_dir)
        }
        Command::Prepare(a) => {
            let outlier = a.outlier.clone().unwrap_or_default();
            let source = match (&a.label, a.outlier.is_some()) {
                (Some(label), true) => Some(ffjord_trainer::anomaly::CsvSource { label, outlier: &outlier }),
                (None, false) => None,
                _ => bail!("give both --label COLUMN and --outlier VALUE"),
            };
            ffjord_trainer::anomaly::prepare(&a.name, &a.raw, &a.out_dir, a.seed, source.as_ref())
        }
        Command::Convert(a) => {
            let bytes = modelfile::read_model_bytes(&a.model)?;
            let matrices = ffjord_runtime::MatrixEncoding::from_name(&a.weights)
                .with_context(|| format!("--weights {}: f32, f16 or i8", a.weights))?;
            let rows = match &a.calibrate {
                Some(path) => {
                    let model = ffjord_runtime::Model::from_bytes(&bytes)?;
                    let table = ffjord_trainer::data::load(path, None)?;
                    anyhow::ensure!(
                        table.dim() == model.dim(),
                        "{}: {} columns, the model has {}",
                        path.display(),
                        table.dim(),
                        model.dim()
                    );
                    let rows = table.values.chunks(table.dim().max(1));
                    Some(rows.map(|r| r.iter().map(|&v| v as f32).collect::<Vec<f32>>()).collect::<Vec<_>>())
                }
                None => None,
            };
            let out = modelfile::with_matrices(&bytes, matrices, rows.as_deref())
                .with_context(|| format!("converting {}", a.model.display()))?;
            modelfile::write_atomic(&a.out, &out)?;
            println!("wrote {} ({} bytes; was {})", a.out.display(), out.len(), bytes.len());
            Ok(())
        }
        Command::Import(a) => {
            let text =
                std::fs::read_to_string(&a.json).with_context(|| format!("reading {}", a.json.display()))?;
            let j: ffjord_trainer::json::JsonModel = serde_json::from_str(&text)
                .with_context(|| format!("{}: not a valid JSON model", a.json.display()))?;
            let bytes =
                ffjord_trainer::json::from_json(&j).with_context(|| format!("{}", a.json.display()))?;
            modelfile::write_atomic(&a.out, &bytes)?;
            println!("wrote {} ({} bytes)", a.out.display(), bytes.len());
            Ok(())
        }
        Command::Plot(a) => {
            let s = ffjord_trainer::plot::plot(&a.model, &a.out, a.grid, a.samples, a.seed, a.tol)?;
            let ([x0, x1], [y0, y1]) = ([s.range[0].0, s.range[0].1], [s.range[1].0, s.range[1].1]);
            println!(
                "wrote {}: x in [{x0:.2}, {x1:.2}], y in [{y0:.2}, {y1:.2}], mass of p in view {:.4}",
                a.out.display(),
                s.mass_in_view
            );
            Ok(())
        }
    }
}
