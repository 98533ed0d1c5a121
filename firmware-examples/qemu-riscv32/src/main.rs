//! Scores the golden rows with the embedded model on an emulated RV32IMC core
//! (QEMU virt, soft float) and exits with 0 when every value agrees with the host.
#![no_std]
#![no_main]

use ffjord_runtime::{Dopri5, Solver};
use scorer_core::{Expected, Golden};

include!(concat!(env!("OUT_DIR"), "/golden.rs"));

scorer_core::qemu_main!(riscv_rt::entry);
