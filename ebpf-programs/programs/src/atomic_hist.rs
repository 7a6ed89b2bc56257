//! Histograms and counters in map values shared by every CPU: atomic adds.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use edgeplane_common::hist::{Log2Hist, bucket};

use crate::verifier::opaque;

/// Counts `ns` into `h`.
///
/// # Safety
/// `h` points into a live map value.
#[inline(always)]
pub unsafe fn record(h: *mut Log2Hist, ns: u64) {
    // SAFETY: as the caller promises.
    unsafe {
        // LLVM turns bucket()'s clamp into arithmetic the verifier can't bound.
        if let Some(b) = (*h).buckets.get_mut(opaque(bucket(ns))) {
            add(b, 1);
        }
        add(&raw mut (*h).sum_ns, ns);
        add(&raw mut (*h).count, 1);
    }
}

/// # Safety
/// `p` is an aligned u64 in a live map value.
#[inline(always)]
pub unsafe fn add(p: *mut u64, v: u64) {
    // SAFETY: as the caller promises. The result is unused, which compiles to the atomic add
    // (BPF_XADD) every kernel since 4.x supports; the BPF target has no AtomicU64.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, v) };
}
