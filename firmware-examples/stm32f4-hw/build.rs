//! Generates the golden tables from the example model (on the host, with the
//! same runtime) and puts memory.x on the linker path.
use std::path::PathBuf;

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let model = std::env::var("FFJORD_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|_| manifest.join("../../models/8gaussians-mcu/model.ffjd"));
    println!("cargo:rerun-if-env-changed=FFJORD_MODEL");
    println!("cargo:rerun-if-changed={}", model.display());
    ffjord_golden::write(&model, &ffjord_golden::eight_gaussians_rows(), &out);
    std::fs::copy(manifest.join("memory.x"), out.join("memory.x")).unwrap();
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rerun-if-changed=memory.x");
}
