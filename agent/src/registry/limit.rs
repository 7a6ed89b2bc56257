//! What the agent takes of pushed rule sets: a size cap, and a token bucket on how often.

use tokio::time::Instant;

/// Why a push was refused before it was applied.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "the rule set is {len} bytes, more than registry.rules_max_bytes ({max}): push a \
         smaller one, or raise the limit in the agent's config"
    )]
    TooLarge { len: usize, max: u64 },
    #[error(
        "more than {burst} rule sets pushed in a row: the agent takes {per_minute} per minute \
         (registry.rules_per_minute, rules_burst); push the rule set again later"
    )]
    TooFrequent { per_minute: u32, burst: u32 },
}

/// Admits pushes of at most `max_bytes`, `burst` at once and `per_minute` sustained.
#[derive(Debug)]
pub struct PushLimit {
    max_bytes: u64,
    per_minute: u32,
    burst: u32,
    tokens: f64,
    last: Option<Instant>,
}

impl PushLimit {
    pub fn new(max_bytes: u64, per_minute: u32, burst: u32) -> Self {
        Self {
            max_bytes,
            per_minute,
            burst,
            tokens: f64::from(burst),
            last: None,
        }
    }

    /// Takes a push of `len` bytes now, or says why not. A refused size costs no token.
    pub fn admit(&mut self, len: usize) -> Result<(), Refusal> {
        self.admit_at(len, Instant::now())
    }

    fn admit_at(&mut self, len: usize, now: Instant) -> Result<(), Refusal> {
        if len as u64 > self.max_bytes {
            return Err(Refusal::TooLarge {
                len,
                max: self.max_bytes,
            });
        }
        if let Some(last) = self.last {
            let refill = now.duration_since(last).as_secs_f64() * f64::from(self.per_minute) / 60.0;
            self.tokens = (self.tokens + refill).min(f64::from(self.burst));
        }
        self.last = Some(now);
        if self.tokens < 1.0 {
            return Err(Refusal::TooFrequent {
                per_minute: self.per_minute,
                burst: self.burst,
            });
        }
        self.tokens -= 1.0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_burst_then_the_sustained_rate() {
        let mut l = PushLimit::new(100, 6, 2);
        let t = Instant::now();
        assert!(l.admit_at(10, t).is_ok());
        assert!(l.admit_at(10, t).is_ok());
        assert!(matches!(
            l.admit_at(10, t + Duration::from_secs(1)),
            Err(Refusal::TooFrequent { .. })
        ));
        // 6 per minute: one more token 10 s on.
        assert!(l.admit_at(10, t + Duration::from_secs(11)).is_ok());
        assert!(l.admit_at(10, t + Duration::from_secs(12)).is_err());
        // Never more than the burst saved up.
        let later = t + Duration::from_secs(3600);
        assert!(l.admit_at(10, later).is_ok());
        assert!(l.admit_at(10, later).is_ok());
        assert!(l.admit_at(10, later).is_err());
    }

    #[test]
    fn oversize_is_refused_without_costing_a_token() {
        let mut l = PushLimit::new(100, 6, 1);
        let t = Instant::now();
        assert_eq!(
            l.admit_at(101, t),
            Err(Refusal::TooLarge { len: 101, max: 100 })
        );
        assert!(l.admit_at(100, t).is_ok());
    }
}
