//! Golden tables (computed on the host by the same runtime) and memory.x:
//! see `ffjord_golden::example_build_script`.
fn main() {
    ffjord_golden::example_build_script();
}
