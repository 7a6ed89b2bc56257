//! Tunnel counters per peer or receiver, and the time frames wait before their datagram leaves.

use std::{collections::BTreeMap, sync::Mutex};

use edgeplane_common::hist::{Log2Hist, bucket};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter},
};

use super::codec::DecodeError;
use crate::metrics::encode_log2_hist;

/// Why a received datagram was rejected whole: decode errors, then the receiver's own.
pub const REJECT_LABELS: [&str; 11] = {
    let d = DecodeError::LABELS;
    [
        d[0],
        d[1],
        d[2],
        d[3],
        d[4],
        d[5],
        d[6],
        d[7],
        d[8],
        "unknown_peer",
        "replay",
    ]
};
pub const UNKNOWN_PEER: usize = 9;
pub const REPLAY: usize = 10;

/// Why a frame of an accepted datagram was not written, in [`DropReason`] order.
pub const DROP_LABELS: [&str; 5] = [
    "error_frame",
    "remote_frame",
    "fd_frame",
    "filter",
    "rate_limit",
];

/// A frame the receiver's rules keep off the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    ErrorFrame,
    RemoteFrame,
    FdFrame,
    Filter,
    RateLimit,
}

/// What the sequence numbers of a peer's datagrams said, in [`super::sequence::Event`] order.
pub const SEQUENCE_LABELS: [&str; 4] = ["lost", "reordered", "duplicate", "restart"];

#[derive(Debug, Default, Clone)]
pub struct TunnelCounters {
    /// A receiver's (by name), else a sender's (by peer address).
    pub is_receiver: bool,
    pub tx_datagrams: u64,
    pub tx_frames: u64,
    pub send_errors: u64,
    pub rx_datagrams: u64,
    pub rx_frames: u64,
    pub write_errors: u64,
    /// Frames of datagrams whose send failed.
    pub unsent_frames: u64,
    pub rejected: [u64; REJECT_LABELS.len()],
    pub dropped: [u64; DROP_LABELS.len()],
    pub sequence: [u64; SEQUENCE_LABELS.len()],
    /// From the frame's arrival in the kernel to its datagram being sent.
    pub queue: Log2Hist,
}

impl TunnelCounters {
    pub fn record_queue(&mut self, ns: u64) {
        self.queue.buckets[bucket(ns)] += 1;
        self.queue.sum_ns += ns;
        self.queue.count += 1;
    }
}

/// Counters keyed by tunnel label: the peer address for senders, the name for receivers.
#[derive(Debug, Default)]
pub struct TunnelMetrics {
    by_tunnel: Mutex<BTreeMap<String, TunnelCounters>>,
}

impl TunnelMetrics {
    pub fn update(&self, tunnel: &str, f: impl FnOnce(&mut TunnelCounters)) {
        let mut m = self.by_tunnel.lock().expect("lock");
        if let Some(c) = m.get_mut(tunnel) {
            f(c);
        }
    }

    /// Keeps exactly these tunnels, senders by peer address and receivers by name (new ones
    /// start at zero, gone ones disappear).
    pub fn retain(&self, senders: &[String], receivers: &[String]) {
        let mut m = self.by_tunnel.lock().expect("lock");
        m.retain(|k, _| senders.contains(k) || receivers.contains(k));
        for t in senders {
            m.entry(t.clone()).or_default();
        }
        for t in receivers {
            m.entry(t.clone()).or_default().is_receiver = true;
        }
    }

    pub fn get(&self, tunnel: &str) -> Option<TunnelCounters> {
        self.by_tunnel.lock().expect("lock").get(tunnel).cloned()
    }
}

impl Collector for TunnelMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = self.by_tunnel.lock().expect("lock").clone();
        let mut family = encoder.encode_descriptor(
            "can_tunnel_datagrams",
            "UDP datagrams of the CAN tunnel, by direction (tx to a peer, rx by a receiver)",
            None,
            MetricType::Counter,
        )?;
        for (t, c) in &m {
            for (dir, v) in [("tx", c.tx_datagrams), ("rx", c.rx_datagrams)] {
                ConstCounter::new(v)
                    .encode(family.encode_family(&[("tunnel", t.as_str()), ("direction", dir)])?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "can_tunnel_frames",
            "CAN frames carried by the tunnel, by direction (rx: written to the bus)",
            None,
            MetricType::Counter,
        )?;
        for (t, c) in &m {
            for (dir, v) in [("tx", c.tx_frames), ("rx", c.rx_frames)] {
                ConstCounter::new(v)
                    .encode(family.encode_family(&[("tunnel", t.as_str()), ("direction", dir)])?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "can_tunnel_rejected",
            "Received datagrams rejected whole (nothing written to the bus), by reason",
            None,
            MetricType::Counter,
        )?;
        for (t, c) in &m {
            for (reason, v) in REJECT_LABELS.iter().zip(c.rejected) {
                ConstCounter::new(v).encode(
                    family.encode_family(&[("tunnel", t.as_str()), ("reason", *reason)])?,
                )?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "can_tunnel_dropped",
            "Frames of accepted datagrams a receiver's rules kept off the bus, by reason",
            None,
            MetricType::Counter,
        )?;
        for (t, c) in m.iter().filter(|(_, c)| c.is_receiver) {
            for (reason, v) in DROP_LABELS.iter().zip(c.dropped) {
                ConstCounter::new(v).encode(
                    family.encode_family(&[("tunnel", t.as_str()), ("reason", *reason)])?,
                )?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "can_tunnel_sequence",
            "Datagrams a receiver's peers sent, by what their sequence numbers said: lost (never came within 64 datagrams), reordered, duplicate (dropped), restart (a jump: the peer started again)",
            None,
            MetricType::Counter,
        )?;
        for (t, c) in m.iter().filter(|(_, c)| c.is_receiver) {
            for (event, v) in SEQUENCE_LABELS.iter().zip(c.sequence) {
                ConstCounter::new(v)
                    .encode(family.encode_family(&[("tunnel", t.as_str()), ("event", *event)])?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "can_tunnel_unsent_frames",
            "Frames a sender lost to failed sends (each failed datagram counts its frames)",
            None,
            MetricType::Counter,
        )?;
        for (t, c) in m.iter().filter(|(_, c)| !c.is_receiver) {
            ConstCounter::new(c.unsent_frames)
                .encode(family.encode_family(&[("tunnel", t.as_str())])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "can_tunnel_errors",
            "Failed socket operations: send (UDP to the peer) or write (frame to the CAN bus)",
            None,
            MetricType::Counter,
        )?;
        for (t, c) in &m {
            for (op, v) in [("send", c.send_errors), ("write", c.write_errors)] {
                ConstCounter::new(v)
                    .encode(family.encode_family(&[("tunnel", t.as_str()), ("op", op)])?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "can_tunnel_queue_seconds",
            "Time from a frame's arrival in the kernel to its datagram being sent",
            None,
            MetricType::Histogram,
        )?;
        for (t, c) in m
            .iter()
            .filter(|(_, c)| c.queue.count > 0 || c.tx_frames > 0)
        {
            encode_log2_hist(family.encode_family(&[("tunnel", t.as_str())])?, &c.queue)?;
        }
        Ok(())
    }
}
