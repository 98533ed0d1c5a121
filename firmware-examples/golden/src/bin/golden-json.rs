//! Prints a model's golden values as JSON, computed by the host runtime with
//! the model's default solver: the rows (from a labelled CSV, or the 2-D demo
//! rows), log p, the model's score, verdict and NFE per row — one row at a
//! time, and by the packed path (32 rows at a time, what the page uses) — and
//! seeded samples.
//! Usage: golden-json MODEL [ROWS.csv]
//!        golden-json --as-latent-base OUT.ffjd MODEL [ROWS.csv]
//! The second form first writes `MODEL` (a format version 6 file scored by
//! the latent radius) to `OUT.ffjd` as a version 7 file scored by the base
//! density alone, the same bytes otherwise, and gives that file's values, so
//! the WASM page is checked on that score kind too without a committed model
//! whose threshold was calibrated on another score.

use ffjord_runtime::format::{CRC_LEN, LATENT_BASE_VERSION, PREAMBLE_LEN, SCORE_KIND_VERSION, crc32};
use ffjord_runtime::{Flow, HeaderView, Model, ScoreKind, Verdict};
use rand_xoshiro::Xoshiro128PlusPlus;
use rand_xoshiro::rand_core::SeedableRng;

fn list(v: &[f32]) -> String {
    let items: Vec<String> = v.iter().map(|x| format!("{x:?}")).collect();
    format!("[{}]", items.join(", "))
}

/// Rows per block of the packed path (the page's setting).
const PACKED_ROWS: usize = 32;

/// `bytes` of a version 6 file re-declared as version 7 with the score kind
/// `LatentBase`: the kind is the header's last byte, so only that byte, the
/// version and the CRC change.
fn as_latent_base(bytes: &[u8]) -> Vec<u8> {
    let model = Model::from_bytes(bytes).expect("valid model");
    assert_eq!(model.header().version(), SCORE_KIND_VERSION, "a version 6 file");
    let payload = &bytes[PREAMBLE_LEN..bytes.len() - CRC_LEN];
    let (_, _, rest) = HeaderView::decode(payload, SCORE_KIND_VERSION).expect("header");
    let kind_at = PREAMBLE_LEN + payload.len() - rest.len() - 1;
    let mut out = bytes.to_vec();
    assert_eq!(out[kind_at], ScoreKind::LatentRadius as u8, "a file scored by the latent radius");
    out[4..6].copy_from_slice(&LATENT_BASE_VERSION.to_le_bytes());
    out[kind_at] = ScoreKind::LatentBase as u8;
    let n = out.len() - CRC_LEN;
    let crc = crc32(&out[..n]);
    out[n..].copy_from_slice(&crc.to_le_bytes());
    assert_eq!(
        Model::from_bytes(&out).expect("the rewritten file loads").score_kind(),
        ScoreKind::LatentBase
    );
    out
}

fn main() {
    let mut args: Vec<String> = std::env::args().collect();
    let rewrite = if args.get(1).map(String::as_str) == Some("--as-latent-base") {
        let out = args.get(2).expect("usage: golden-json --as-latent-base OUT.ffjd MODEL [ROWS.csv]").clone();
        args.drain(1..3);
        Some(out)
    } else {
        None
    };
    let model_path = args.get(1).expect("usage: golden-json MODEL [ROWS.csv]").clone();
    if let Some(out) = &rewrite {
        let bytes = std::fs::read(&model_path).expect("model file");
        std::fs::write(out, as_latent_base(&bytes)).expect("writing the rewritten model");
    }
    let model_path = rewrite.unwrap_or(model_path);
    let rows = match args.get(2) {
        Some(p) => ffjord_golden::rows_from_csv(std::path::Path::new(p)),
        None => ffjord_golden::eight_gaussians_rows(),
    };
    let bytes = std::fs::read(&model_path).expect("model file");
    let model = Model::from_bytes(&bytes).expect("valid model");
    let flow = Flow::new(&model, model.default_solver()).expect("solver");
    let mut scratch = vec![0.0; flow.scratch_len()];
    let xs: Vec<f32> = rows.iter().flat_map(|(x, _)| x.iter().copied()).collect();
    let mut packed = vec![0.0f32; rows.len()];
    let mut packed_scratch = vec![0.0; flow.packed_scratch_len(PACKED_ROWS)];
    let packed_stats =
        flow.log_density_packed(&xs, &mut packed, PACKED_ROWS, &mut packed_scratch).expect("host packed");
    let mut packed_scores = vec![0.0f32; rows.len()];
    flow.score_packed(&xs, &mut packed_scores, PACKED_ROWS, &mut packed_scratch).expect("host packed scores");
    let mut entries = Vec::new();
    for (((x, anomalous), &lp_packed), &score_packed) in rows.iter().zip(&packed).zip(&packed_scores) {
        let s = flow.score(x, &mut scratch).expect("host score");
        let verdict = s.verdict.name();
        let verdict_packed = Verdict::against(score_packed, model.threshold()).name();
        entries.push(format!(
            "    {{\"x\": {}, \"labelled_anomaly\": {anomalous}, \"log_p\": {:?}, \"score\": {:?}, \"verdict\": \"{verdict}\", \"nfe\": {}, \"log_p_packed\": {lp_packed:?}, \"score_packed\": {score_packed:?}, \"verdict_packed\": \"{verdict_packed}\"}}",
            list(x),
            s.log_density.log_p,
            s.score,
            s.log_density.stats.nfe
        ));
    }
    let mut samples = Vec::new();
    for seed in ffjord_golden::SAMPLE_SEEDS {
        let mut rng = Xoshiro128PlusPlus::seed_from_u64(seed);
        let mut x = vec![0.0f32; model.dim()];
        let s = flow.sample(&mut rng, &mut x, &mut scratch).expect("host sample");
        samples.push(format!("    {{\"seed\": {seed}, \"x\": {}, \"log_p\": {:?}}}", list(&x), s.log_p));
    }
    println!(
        "{{\n  \"model\": {model_path:?},\n  \"dim\": {},\n  \"format_version\": {},\n  \"score_kind\": \"{}\",\n  \"image_stages\": {},\n  \"kde_base\": {},\n  \"threshold\": {},\n  \"packed_nfe\": {},\n  \"rows\": [\n{}\n  ],\n  \"samples\": [\n{}\n  ]\n}}",
        model.dim(),
        model.header().version(),
        model.score_kind().name(),
        model.has_image_stages(),
        model.kde_base().is_some(),
        model.threshold().map_or("null".to_string(), |t| format!("{:?}", t.score)),
        packed_stats.nfe,
        entries.join(",\n"),
        samples.join(",\n")
    );
}
