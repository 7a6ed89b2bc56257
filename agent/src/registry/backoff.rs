//! Capped exponential backoff with jitter, so a fleet that lost etcd does not come back in step.

use std::{
    hash::{BuildHasher as _, RandomState},
    time::Duration,
};

pub struct Backoff {
    first: Duration,
    cap: Duration,
    next: Duration,
}

impl Backoff {
    /// 200 ms, doubling up to 10 s.
    pub fn new() -> Self {
        Self::with(Duration::from_millis(200), Duration::from_secs(10))
    }

    fn with(first: Duration, cap: Duration) -> Self {
        Self {
            first,
            cap,
            next: first,
        }
    }

    /// The next delay: half the current step plus a random part of the other half ("equal
    /// jitter"), so it never drops to zero and never exceeds the cap.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.next;
        self.next = (step * 2).min(self.cap);
        let half = step / 2;
        half + half.mul_f64(random_fraction())
    }

    /// After a success: start from the first delay again.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

/// A number in [0, 1): std's per-process random hash keys, without a random number crate.
fn random_fraction() -> f64 {
    let bits = RandomState::new().hash_one(std::time::Instant::now());
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap_with_bounded_jitter() {
        let mut b = Backoff::new();
        let steps_ms = [200, 400, 800, 1600, 3200, 6400, 10_000, 10_000];
        for step in steps_ms {
            let d = b.next_delay().as_millis() as u64;
            assert!(d >= step / 2 && d <= step, "{d} ms for step {step} ms");
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(200));
    }

    #[test]
    fn jitter_varies() {
        let mut seen: Vec<u64> = (0..20).map(|_| (random_fraction() * 1e6) as u64).collect();
        seen.sort_unstable();
        seen.dedup();
        assert!(seen.len() > 10, "{seen:?}");
    }
}
