//! An rpath to libtorch for the test binaries, as trainer/build.rs gives the
//! `trainer` binary (tch's own rpath does not reach downstream binaries).
fn main() {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
}
