//! Bakes an rpath to libtorch into the `trainer` binary so it runs without
//! LD_LIBRARY_PATH (tch's own rpath does not reach downstream binaries), and
//! force-links libtorch_cuda under the `cuda` feature.
fn main() {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
    if std::env::var("CARGO_FEATURE_CUDA").is_ok() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
