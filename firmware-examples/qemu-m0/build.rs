//! Generates the golden tables (on the host, with the same runtime) from the
//! example model — or `FFJORD_MODEL` with `FFJORD_ROWS` — and puts memory.x on
//! the linker path.
use std::path::PathBuf;

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    ffjord_golden::write_for_example(&manifest, &out);
    std::fs::copy(manifest.join("memory.x"), out.join("memory.x")).unwrap();
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rerun-if-changed=memory.x");
}
