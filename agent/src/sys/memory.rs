//! Giving freed heap back to the kernel. Loading the data plane parses the kernel's BTF (tens
//! of MB, freed once the programs are attached); glibc's allocator keeps freed pages mapped
//! unless asked, so without this the agent would hold its start-up peak for as long as it runs.

/// Returns the free pages of every malloc arena to the kernel (glibc's `malloc_trim`); a no-op
/// where the C library has no such call. Cheap when little is free: call it after loading and
/// after each reload.
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers and is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}
