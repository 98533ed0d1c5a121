//! The same checks as the QEMU examples on real hardware: every result line
//! goes out over RTT through defmt; the last line says whether all agreed.
#![no_std]
#![no_main]

use cortex_m_rt::entry;
use defmt_rtt as _;
use ffjord_runtime::{Dopri5, Solver};
use panic_probe as _;
use scorer_core::{Expected, Golden};

include!(concat!(env!("OUT_DIR"), "/golden.rs"));

/// Collects one line at a time and logs it with defmt.
struct DefmtLines {
    buf: [u8; 160],
    len: usize,
}

impl core::fmt::Write for DefmtLines {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for &b in s.as_bytes() {
            if b == b'\n' || self.len == self.buf.len() {
                let line = core::str::from_utf8(&self.buf[..self.len]).unwrap_or("<non-UTF-8>");
                defmt::info!("{=str}", line);
                self.len = 0;
            }
            if b != b'\n' {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
        Ok(())
    }
}

unsafe extern "C" {
    static _stack_start: u32;
    static __sheap: u32;
}

#[entry]
fn main() -> ! {
    let (bottom, top) = (core::ptr::addr_of!(__sheap) as usize, core::ptr::addr_of!(_stack_start) as usize);
    let mut out = DefmtLines { buf: [0; 160], len: 0 };
    // SAFETY: cortex-m-rt puts the stack above all static data (`__sheap`) and
    // below `_stack_start`; nothing uses a heap.
    let code = unsafe { scorer_core::firmware_main::<DIM, SCRATCH>(&mut out, &GOLDEN, bottom, top) };
    if code == 0 {
        defmt::info!("all results agree with the host");
    } else {
        defmt::error!("some results disagree with the host");
    }
    loop {
        cortex_m::asm::wfi();
    }
}
