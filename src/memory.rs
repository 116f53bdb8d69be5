//! How eagerly freed memory goes back to the operating system.
//!
//! The binary allocates with mimalloc (see `main.rs`). By default mimalloc (v3) keeps freed
//! pages for a second before returning them, and under a run's steady churn of large Arrow
//! buffers that means pages are reused rather than faulted in again: fast, but resident memory
//! holds freed pages too, and creeps up over many batches. When a run is given a memory budget
//! (`--max-bytes-per-batch`), pages are returned as soon as they are free instead, so the peak
//! follows the batch; the price is page faults (on the shared test machine, seconds of system
//! time per ten million events). Where mimalloc is not the allocator (tests), this changes
//! nothing. (Separately, `main.rs` has the async runtime's idle workers collect the frees other
//! threads made of their memory, in every run.)

/// `mi_option_purge_delay` in mimalloc.h (v3): milliseconds before freed memory is returned
/// (1000 by default; the header's comment still says 10).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
/// `mi_option_arena_purge_mult`: the multiplier of that delay for arena memory (1).
const MI_OPTION_ARENA_PURGE_MULT: libmimalloc_sys::mi_option_t = 24;

/// Returns freed memory to the operating system at once from now on.
pub fn return_freed_memory_at_once() {
    // SAFETY: setting an option takes no pointers and is allowed at any time, from any thread.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0);
        libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_PURGE_MULT, 1);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_option_numbers_are_mimallocs() {
        // mimalloc v3's defaults (options.c): a 1000 ms purge delay, once that for arenas.
        let get = |o| unsafe { libmimalloc_sys::mi_option_get(o) };
        assert_eq!(get(super::MI_OPTION_PURGE_DELAY), 1000);
        assert_eq!(get(super::MI_OPTION_ARENA_PURGE_MULT), 1);
    }
}
