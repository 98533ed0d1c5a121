//! Seconds per training iteration of the fixed toy configuration:
//! 8gaussians, 3×64 concatsquash/tanh, one CNF block with trainable T (0.5),
//! batch 512, Dopri5 rtol = atol = 1e-5, exact trace, Adam 1e-3, one thread.
//!
//! `cargo bench -p ffjord-trainer --bench train_step -- [--gradient adjoint|backprop]
//!   [--iterations N] [--init-json PATH]` prints one JSON line. `--init-json`
//! writes the initial weights in the documented JSON form so the Python
//! comparator (`bench/ffjord_torch.py`) starts from the same model.
//! `bench/train_speed.sh` runs both side by side.

use std::time::Instant;

use ffjord_trainer::config::TrainConfig;
use ffjord_trainer::data;
use ffjord_trainer::model::{Gradient, SolveOptions, TraceMode};
use ffjord_trainer::modelfile::{ExportInfo, export_bytes};
use ffjord_trainer::ode::dopri5_at;
use tch::{Device, Kind, Tensor, nn, nn::OptimizerConfig};

fn cpu_seconds() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0);
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn main() -> anyhow::Result<()> {
    // As the `trainer` binary does.
    ffjord_trainer::allocator::keep_freed_memory();
    tch::set_num_threads(1);
    tch::manual_seed(0);
    let gradient = match arg("--gradient").as_deref() {
        Some("backprop") => Gradient::Backprop,
        _ => Gradient::Adjoint,
    };
    let iterations: u32 = arg("--iterations").map_or(Ok(20), |s| s.parse())?;
    let cfg = TrainConfig { hidden: vec![64, 64, 64], ..Default::default() };
    let vs = nn::VarStore::new(Device::Cpu);
    let chain = ffjord_trainer::train::build_chain(&vs, &cfg, 2, None).unwrap();
    if let Some(path) = arg("--init-json") {
        let zeros = Tensor::zeros([2], (Kind::Double, Device::Cpu));
        let info = ExportInfo {
            mean: &zeros,
            std: &zeros.ones_like(),
            solver: dopri5_at(1e-5, 10_000),
            threshold: None,
            score: ffjord_runtime::ScoreKind::NegLogDensity,
            name: "bench-init",
            description: "initial weights of the train_step benchmark",
            command: "cargo bench -p ffjord-trainer --bench train_step",
        };
        let bytes = export_bytes(&chain, &info)?;
        let model = ffjord_runtime::Model::from_bytes(&bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
        std::fs::write(&path, serde_json::to_string(&ffjord_trainer::json::to_json(&model)?)?)?;
    }
    let mut opt = nn::Adam::default().build(&vs, 1e-3)?;
    let opts = SolveOptions {
        method: dopri5_at(1e-5, 10_000),
        trace: TraceMode::Exact,
        create_graph: true,
        seminorm: false,
        regularization: Default::default(),
        record_steps: false,
    };
    let (mut wall, mut cpu, mut nfe_f, mut nfe_b) = (0.0, 0.0, 0u64, 0u64);
    for it in 0..iterations + 2 {
        let x = data::toy("8gaussians", 512)?.to_kind(Kind::Float);
        let (t0, c0) = (Instant::now(), cpu_seconds());
        opt.zero_grad();
        let (_, stats) = chain.loss_and_gradients(&x, &opts, gradient, None)?;
        opt.step();
        if it >= 2 {
            // The first two iterations warm up allocators and caches.
            wall += t0.elapsed().as_secs_f64();
            cpu += cpu_seconds() - c0;
            nfe_f += u64::from(stats.solve.nfe);
            nfe_b += u64::from(stats.backward.nfe);
        }
    }
    let n = f64::from(iterations);
    println!(
        "{}",
        serde_json::json!({
            "impl": "ffjord-trainer (tch)", "gradient": format!("{gradient:?}").to_lowercase(),
            "iterations": iterations, "wall_s_per_iter": wall / n, "cpu_s_per_iter": cpu / n,
            "nfe_forward": nfe_f as f64 / n, "nfe_backward": nfe_b as f64 / n,
        })
    );
    Ok(())
}
