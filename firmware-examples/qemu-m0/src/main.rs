//! Scores the golden rows with the embedded model on an emulated Cortex-M0 (soft float)
//! (QEMU microbit) and exits with 0 when every value agrees with the host.
#![no_std]
#![no_main]

use ffjord_runtime::{Dopri5, Solver};
use scorer_core::{Expected, Golden};

include!(concat!(env!("OUT_DIR"), "/golden.rs"));

scorer_core::qemu_main!(cortex_m_rt::entry);
