//! Keeps freed tensor memory in the process.
//!
//! A training step allocates and frees the same activation-sized buffers
//! (batch × width floats, 128 KiB and up) hundreds of times. glibc serves
//! blocks of 128 KiB and more with `mmap` and returns them on free, so every
//! one costs page faults and zeroing in the kernel: 11% of a CPU training
//! step in `perf`, and 20% of its time (trainer/README.md). Raising the mmap
//! threshold and the trim threshold makes those blocks reusable heap memory.

/// Tunes glibc's allocator for training (no-op on other C libraries).
/// Returns whether the settings were applied.
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // glibc caps the mmap threshold at 32 MiB on 64-bit targets.
        const THRESHOLD: libc::c_int = 32 << 20;
        // SAFETY: mallopt only changes allocator parameters; it is called
        // before the training threads start and takes plain integers.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
