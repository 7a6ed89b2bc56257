//! Internet checksum arithmetic for incremental updates (RFC 1624).
//!
//! Values are 16-bit words exactly as loaded from the packet; one's complement sums don't depend
//! on byte order as long as every word is treated alike.

/// Accumulates the change from `old` to `new` words as a 32-bit partial sum (a `__wsum`).
#[inline(always)]
pub fn diff(acc: u32, old: &[u16], new: &[u16]) -> u32 {
    let mut acc = acc;
    let n = if old.len() < new.len() {
        old.len()
    } else {
        new.len()
    };
    let mut i = 0;
    while i < n {
        acc += u32::from(!old[i]) + u32::from(new[i]);
        i += 1;
    }
    acc
}

/// Folds a 32-bit partial sum to 16 bits with end-around carry.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Applies a partial-sum change to a stored checksum: HC' = ~(~HC + diff).
#[inline(always)]
pub fn apply(check: u16, diff: u32) -> u16 {
    !fold(u32::from(!check) + fold(diff) as u32)
}
