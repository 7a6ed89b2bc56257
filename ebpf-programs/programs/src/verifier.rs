//! Helping the verifier see bounds that LLVM knows but compiles away.

/// Returns `v` through a volatile read, so LLVM forgets what it knows about the value and keeps
/// the bounds check that follows; older verifiers need that check to see the bound.
#[inline(always)]
pub fn opaque<T: Copy>(v: T) -> T {
    // SAFETY: reading a local through a reference to it.
    unsafe { core::ptr::read_volatile(&v) }
}
