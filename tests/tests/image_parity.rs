//! Image models end to end: FFJORD's multiscale flow built by the trainer
//! (logit, conv CNFs, squeeze, factor-out) is exported through the runtime's
//! format types (version 4), read back into tch, and scored by the runtime:
//! the exported file reproduces the trainer's chain (float64, to 1e-6
//! nats), and the runtime's f32 log p agrees with the float64 evaluation
//! within the tolerance every shipped model meets.

use ffjord_e2e::{float64_log_p, runtime_tolerance};
use ffjord_runtime::{Activation, Dopri5, Flow, LayerKind, Model, Solver, Stage};
use ffjord_trainer::model::{MultiscaleConfig, SolveOptions, multiscale};
use ffjord_trainer::modelfile::{ExportInfo, export_bytes};
use ffjord_trainer::ode::dopri5_at;
use tch::{Device, Kind, Tensor, nn};

#[test]
fn exported_multiscale_model_matches_the_trainer_and_the_runtime_matches_float64() {
    tch::manual_seed(3);
    let vs = nn::VarStore::new(Device::Cpu);
    let cfg = MultiscaleConfig {
        shape: [1, 8, 8],
        hidden: vec![4],
        blocks: 1,
        layer: LayerKind::ConcatSquash,
        activation: Activation::Tanh,
        alpha: Some(1e-6),
        end_time: 0.5,
        train_end_time: false,
    };
    let chain = multiscale(&(vs.root() / "chain"), &cfg).unwrap();
    let dim = 64;
    let solver = Solver::Dopri5(Dopri5::with_tolerance(1e-5));
    let (mean, std) =
        (Tensor::zeros([dim], (Kind::Float, Device::Cpu)), Tensor::ones([dim], (Kind::Float, Device::Cpu)));
    let info = ExportInfo {
        mean: &mean,
        std: &std,
        solver,
        threshold: None,
        score: ffjord_runtime::ScoreKind::NegLogDensity,
        name: "multiscale-test",
        description: "8×8 random multiscale flow",
        command: "cargo test",
    };
    let bytes = export_bytes(&chain, &info).unwrap();
    assert_eq!(u16::from_le_bytes([bytes[4], bytes[5]]), 4);
    let model = Model::from_bytes(&bytes).unwrap();
    let kinds: Vec<&str> = model
        .header()
        .stages()
        .map(|s| match s {
            Stage::Logit { .. } => "logit",
            Stage::Squeeze(_) => "squeeze",
            Stage::ConvCnf(_) => "conv",
            _ => "other",
        })
        .collect();
    // 8×8: one CNF, squeeze, one CNF, factor out half; then one CNF on [2, 4, 4].
    assert_eq!(kinds, ["logit", "conv", "squeeze", "conv", "conv"]);
    // The JSON form holds every image stage: it re-encodes to the same bytes.
    let json = ffjord_trainer::json::to_json(&model).unwrap();
    let text = serde_json::to_string(&json).unwrap();
    assert!(text.contains("\"logit\"") && text.contains("\"squeeze\"") && text.contains("\"conv_cnf\""));
    let again: ffjord_trainer::json::JsonModel = serde_json::from_str(&text).unwrap();
    assert!(ffjord_trainer::json::from_json(&again).unwrap() == bytes, "JSON round trip changed the file");

    // Dequantized pixels in [0, 1).
    let rows = 4;
    let x = Tensor::rand([rows, dim], (Kind::Double, Device::Cpu));
    let x64 = Vec::<f64>::try_from(&x.reshape([-1])).unwrap();
    // The trainer's own chain in float64 against the exported file read back.
    let mut vs = vs;
    vs.double();
    let opts = SolveOptions::eval(dopri5_at(1e-8, 1_000_000));
    let trained = tch::no_grad(|| chain.log_prob(&x, &opts)).unwrap();
    let trained = Vec::<f64>::try_from(&trained.log_p).unwrap();
    let reread = float64_log_p(&model, &x64);
    for (a, b) in trained.iter().zip(&reread) {
        assert!((a - b).abs() < 1e-6 * (1.0 + b.abs()), "trainer {a} vs exported file {b}");
    }
    // The runtime (f32, Dopri5 1e-5) against float64.
    let flow = Flow::new(&model, solver).unwrap();
    let mut scratch = vec![0.0; flow.scratch_len()];
    for (row, reference) in x64.chunks(dim as usize).zip(&reread) {
        let xf: Vec<f32> = row.iter().map(|&v| v as f32).collect();
        let got = flow.log_density(&xf, &mut scratch).unwrap().log_p as f64;
        // The rows are f32-rounded for the runtime: log p moves by the
        // logit's slope times that rounding, far below the tolerance.
        assert!(
            (got - reference).abs() <= runtime_tolerance(*reference),
            "runtime {got} vs float64 {reference}"
        );
        eprintln!("runtime {got:.6}, float64 {reference:.6}, |Δ| = {:.2e}", (got - reference).abs());
    }
}
