//! Peak stack measurement by painting: fill the free stack with a pattern
//! before the work, find the deepest overwritten word after it.

const PATTERN: u32 = 0xDEAD_BEEF;

/// The current stack pointer, approximately (the address of a local).
#[inline(always)]
pub fn approx_sp() -> usize {
    let marker = 0u8;
    core::ptr::addr_of!(marker) as usize
}

/// Paints `[bottom, approx_sp() − 256)` with the pattern.
///
/// # Safety
/// `bottom` must be the lowest address of the stack region (above all static
/// data and heap), word-aligned, with nothing live between it and the current
/// stack pointer — true at the start of `main` when nothing uses a heap.
pub unsafe fn paint(bottom: usize) {
    let top = (approx_sp() - 256) & !3;
    let mut p = bottom;
    while p < top {
        // SAFETY: the caller guarantees [bottom, sp) is unused, writable RAM.
        unsafe { core::ptr::write_volatile(p as *mut u32, PATTERN) };
        p += 4;
    }
}

/// Bytes of stack used at the deepest point since [`paint`], given the stack top.
///
/// # Safety
/// Same region as [`paint`]; call after the measured work.
pub unsafe fn high_water(bottom: usize, top: usize) -> usize {
    let mut p = bottom;
    // SAFETY: reads within the painted region, which the caller owns.
    while p < top && unsafe { core::ptr::read_volatile(p as *const u32) } == PATTERN {
        p += 4;
    }
    top - p
}
