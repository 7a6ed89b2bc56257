//! Log2 histograms of nanosecond values, filled in the kernel and exported in seconds.

/// Bucket `k` counts values below `2^(MIN_SHIFT + k)` ns (and at least the previous bound);
/// the last bucket counts everything from `2^(MIN_SHIFT + BUCKETS - 2)` ns up.
pub const MIN_SHIFT: u32 = 7; // 128 ns: forwarding in the kernel takes a few hundred
pub const BUCKETS: usize = 31; // last finite bound 2^36 ns ≈ 68.7 s

/// The bucket of a value, in constant time.
#[inline(always)]
pub const fn bucket(ns: u64) -> usize {
    let bits = 64 - ns.leading_zeros(); // ns < 2^bits
    let k = bits.saturating_sub(MIN_SHIFT);
    if (k as usize) < BUCKETS {
        k as usize
    } else {
        BUCKETS - 1
    }
}

/// Upper bound of bucket `k` in ns, or `None` for the last (open) bucket.
pub const fn upper_bound_ns(k: usize) -> Option<u64> {
    if k + 1 < BUCKETS {
        Some(1u64 << (MIN_SHIFT as usize + k))
    } else {
        None
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Log2Hist {
    pub buckets: [u64; BUCKETS],
    pub sum_ns: u64,
    pub count: u64,
}
crate::assert_size!(Log2Hist, 8 * (BUCKETS + 2));

impl Default for Log2Hist {
    fn default() -> Self {
        Self {
            buckets: [0; BUCKETS],
            sum_ns: 0,
            count: 0,
        }
    }
}

crate::pod!(Log2Hist);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_log2_with_open_ends() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(127), 0);
        assert_eq!(bucket(128), 1);
        assert_eq!(bucket(255), 1);
        assert_eq!(bucket(256), 2);
        assert_eq!(bucket(10_000_000), 17); // 10 ms < 2^24 ns = 16.8 ms
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
        for ns in [1u64, 999, 1024, 5_000, 10_000_000, 1 << 35, (1 << 36) - 1] {
            let k = bucket(ns);
            assert!(ns < upper_bound_ns(k).unwrap(), "{ns} in {k}");
            if k > 0 {
                assert!(ns >= upper_bound_ns(k - 1).unwrap(), "{ns} in {k}");
            }
        }
        assert_eq!(upper_bound_ns(BUCKETS - 1), None);
    }
}
