//! Sequence tracking per peer: cannelloni's 8-bit sequence number says which datagrams were
//! lost, came out of order or came twice (a replay, dropped). A jump far ahead or behind is
//! a peer that started again, not loss.

use std::{
    collections::HashMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

/// Datagrams behind the newest one that are remembered: a datagram that arrives up to this
/// far behind is reordered (or a duplicate), one that never arrived by then is lost.
pub const WINDOW: u8 = 64;
/// Peers tracked per receiver (`peer = "any"` admits many; the least recently heard goes).
const MAX_PEERS: usize = 16;
/// A peer silent this long may have restarted: what looks like a duplicate starts a new
/// sequence instead of being dropped.
const RESTART_IDLE: Duration = Duration::from_secs(3);

/// What a datagram's sequence number said, indexes of [`super::metrics::SEQUENCE_LABELS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Lost = 0,
    Reordered = 1,
    Duplicate = 2,
    Restart = 3,
}

/// The verdict on one datagram: whether to write its frames, and the events to count.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    pub duplicate: bool,
    /// Counts by [`Event`].
    pub events: [u64; 4],
}

struct PeerSequence {
    /// The newest sequence number seen.
    newest: u8,
    /// Bit i: `newest - i` arrived.
    seen: u64,
    /// How many of the bits are sequence numbers since the start (the rest were never due).
    known: u8,
    heard: Instant,
}

impl PeerSequence {
    fn new(seq: u8, now: Instant) -> Self {
        Self {
            newest: seq,
            seen: 1,
            known: 1,
            heard: now,
        }
    }

    fn observe(&mut self, seq: u8, now: Instant, v: &mut Verdict) {
        let idle = now.duration_since(self.heard) >= RESTART_IDLE;
        self.heard = now;
        let ahead = seq.wrapping_sub(self.newest);
        let behind = self.newest.wrapping_sub(seq);
        if (1..=WINDOW).contains(&ahead) {
            // Numbers leaving the window that never arrived are lost.
            let n = u32::from(ahead);
            for bit in u32::from(WINDOW) - n..u32::from(self.known) {
                if self.seen & (1 << bit) == 0 {
                    v.events[Event::Lost as usize] += 1;
                }
            }
            self.seen = if n >= 64 { 0 } else { self.seen << n } | 1;
            self.newest = seq;
            self.known = (u32::from(self.known) + n).min(u32::from(WINDOW)) as u8;
        } else if behind < self.known && !idle {
            let bit = 1u64 << behind;
            if self.seen & bit != 0 {
                v.duplicate = true;
                v.events[Event::Duplicate as usize] += 1;
            } else {
                self.seen |= bit;
                v.events[Event::Reordered as usize] += 1;
            }
        } else {
            // Far ahead, far behind, or anything after a silence: the peer started again.
            *self = Self::new(seq, now);
            v.events[Event::Restart as usize] += 1;
        }
    }
}

/// Sequence state of each peer a receiver hears from.
#[derive(Default)]
pub struct Sequences {
    peers: HashMap<SocketAddr, PeerSequence>,
}

impl Sequences {
    pub fn observe(&mut self, from: SocketAddr, seq: u8, now: Instant) -> Verdict {
        let mut v = Verdict::default();
        if let Some(p) = self.peers.get_mut(&from) {
            p.observe(seq, now, &mut v);
            return v;
        }
        if self.peers.len() >= MAX_PEERS
            && let Some(oldest) = self
                .peers
                .iter()
                .min_by_key(|(_, p)| p.heard)
                .map(|(a, _)| *a)
        {
            self.peers.remove(&oldest);
        }
        self.peers.insert(from, PeerSequence::new(seq, now));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(seqs: &[u8]) -> (Vec<bool>, [u64; 4]) {
        let mut s = Sequences::default();
        let from: SocketAddr = "192.0.2.1:1".parse().unwrap();
        let now = Instant::now();
        let mut total = [0; 4];
        let mut dup = Vec::new();
        for (i, q) in seqs.iter().enumerate() {
            let v = s.observe(from, *q, now + Duration::from_millis(i as u64));
            dup.push(v.duplicate);
            for (t, e) in total.iter_mut().zip(v.events) {
                *t += e;
            }
        }
        (dup, total)
    }

    #[test]
    fn in_order_across_the_wrap_counts_nothing() {
        let seqs: Vec<u8> = (0..600u32).map(|i| (i + 200) as u8).collect();
        let (dup, total) = run(&seqs);
        assert!(dup.iter().all(|d| !d));
        assert_eq!(total, [0; 4]);
    }

    #[test]
    fn duplicates_are_dropped_and_reorders_counted() {
        let (dup, total) = run(&[1, 2, 2, 4, 3, 3, 1, 5]);
        assert_eq!(dup, [false, false, true, false, false, true, true, false]);
        assert_eq!(total, [0, 1, 3, 0]);
    }

    #[test]
    fn a_gap_is_lost_once_it_leaves_the_window() {
        let mut seqs = vec![0, 1, 3, 6];
        let (_, total) = run(&seqs);
        assert_eq!(total[Event::Lost as usize], 0, "2, 4, 5 may still come");
        seqs.extend(7..=70);
        let (_, total) = run(&seqs);
        assert_eq!(total, [3, 0, 0, 0]);
        // Not before the start: a tracker that began at 200 lost nothing before it.
        let seqs: Vec<u8> = (0..100u32).map(|i| (i + 200) as u8).collect();
        assert_eq!(run(&seqs).1, [0; 4]);
    }

    #[test]
    fn a_jump_is_a_restart_not_loss() {
        let mut seqs: Vec<u8> = (100..120).collect();
        seqs.extend(0..5); // 120 behind: the peer started again at 0
        seqs.extend(200..=255); // 195 ahead of 4
        let (dup, total) = run(&seqs);
        assert!(dup.iter().all(|d| !d));
        assert_eq!(total, [0, 0, 0, 2]);
    }

    #[test]
    fn after_a_silence_a_duplicate_is_a_restart() {
        let mut s = Sequences::default();
        let from: SocketAddr = "192.0.2.1:1".parse().unwrap();
        let t = Instant::now();
        for q in 0..10 {
            assert!(!s.observe(from, q, t).duplicate);
        }
        assert!(s.observe(from, 0, t).duplicate);
        let v = s.observe(from, 0, t + RESTART_IDLE);
        assert!(!v.duplicate);
        assert_eq!(v.events, [0, 0, 0, 1]);
    }

    #[test]
    fn peers_are_tracked_apart_and_bounded() {
        let mut s = Sequences::default();
        let t = Instant::now();
        for port in 0..100u16 {
            let from = SocketAddr::from(([192, 0, 2, 1], port));
            assert!(!s.observe(from, 7, t).duplicate);
        }
        assert_eq!(s.peers.len(), MAX_PEERS);
        let last = SocketAddr::from(([192, 0, 2, 1], 99));
        assert!(s.observe(last, 7, t).duplicate);
    }
}
