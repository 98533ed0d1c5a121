//! Cross-crate checks. The tests (in `tests/`) need more than one crate of the
//! workspace, or the repository's committed models; this library holds what
//! they share: an independent float64 evaluation of a model file. What needs
//! an emulator or a browser (QEMU firmware, WASM in Node and Chromium) is
//! driven by `firmware-examples/run-tests` and `firmware-examples/wasm/run-tests`,
//! which `scripts/test` runs.

use ffjord_runtime::Model;
use ffjord_trainer::model::SolveOptions;
use ffjord_trainer::modelfile::chain_from_model;
use ffjord_trainer::ode::dopri5_at;
use tch::{Device, Kind, Tensor};

/// `log p` of each row (`rows.len() / dim` rows, row-major) by the trainer's
/// tch chain rebuilt from the model file in float64: exact trace, Dopri5 at
/// 1e-8 — another implementation of the network, the trace and the solver
/// than the runtime's f32 one.
pub fn float64_log_p(model: &Model<'_>, rows: &[f64]) -> Vec<f64> {
    let (_vs, chain) = chain_from_model(model, Kind::Double, Device::Cpu).expect("model rebuilds in tch");
    let d = model.dim();
    let x = Tensor::from_slice(rows).reshape([(rows.len() / d) as i64, d as i64]);
    let opts = SolveOptions::eval(dopri5_at(1e-8, 1_000_000));
    let out = tch::no_grad(|| chain.log_prob(&x, &opts)).expect("float64 evaluation");
    Vec::<f64>::try_from(&out.log_p).expect("log p as f64")
}

/// The tolerance between a runtime value (f32 arithmetic, Dopri5 at the
/// model's exported tolerance, 1e-5 relative for every model here) and
/// [`float64_log_p`]: that much of |log p| plus f32 rounding of the state.
pub fn runtime_tolerance(log_p: f64) -> f64 {
    2e-3 + 1e-4 * log_p.abs()
}
