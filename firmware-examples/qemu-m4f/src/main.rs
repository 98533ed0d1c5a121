//! Scores the golden rows with the embedded model on an emulated Cortex-M4F
//! (QEMU mps2-an386) and exits with 0 when every value agrees with the host.
#![no_std]
#![no_main]

#[allow(unused_imports)] // Dopri5: when the generated tables name it (FFJORD_SOLVERS may not)
use ffjord_runtime::{Dopri5, Solver};
use scorer_core::{Expected, Golden};

include!(concat!(env!("OUT_DIR"), "/golden.rs"));

scorer_core::qemu_main!(cortex_m_rt::entry);
