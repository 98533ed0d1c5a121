//! Scores the golden rows with the embedded model on an emulated Cortex-M4F
//! (QEMU mps2-an386) and exits with 0 when every value agrees with the host.
#![no_std]
#![no_main]

use cortex_m_rt::entry;
use ffjord_runtime::{Dopri5, Solver};
use scorer_core::{Expected, Golden};

include!(concat!(env!("OUT_DIR"), "/golden.rs"));

unsafe extern "C" {
    static _stack_start: u32;
    static __sheap: u32;
}

#[entry]
fn main() -> ! {
    let (bottom, top) = (core::ptr::addr_of!(__sheap) as usize, core::ptr::addr_of!(_stack_start) as usize);
    // SAFETY: cortex-m-rt puts the stack above all static data (`__sheap`) and
    // below `_stack_start`; nothing uses a heap.
    let code = unsafe {
        scorer_core::firmware_main::<DIM, SCRATCH>(&mut scorer_core::Semihosting, &GOLDEN, bottom, top)
    };
    semihosting::process::exit(code)
}
