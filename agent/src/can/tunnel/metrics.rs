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

/// Why a received datagram was rejected: decode errors, then `unknown_peer`.
pub const REJECT_LABELS: [&str; 6] = [
    DecodeError::LABELS[0],
    DecodeError::LABELS[1],
    DecodeError::LABELS[2],
    DecodeError::LABELS[3],
    DecodeError::LABELS[4],
    "unknown_peer",
];
pub const UNKNOWN_PEER: usize = 5;

#[derive(Debug, Default, Clone)]
pub struct TunnelCounters {
    pub tx_datagrams: u64,
    pub tx_frames: u64,
    pub send_errors: u64,
    pub rx_datagrams: u64,
    pub rx_frames: u64,
    pub write_errors: u64,
    pub rejected: [u64; 6],
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

    /// Keeps exactly these tunnels (new ones start at zero, gone ones disappear).
    pub fn retain(&self, tunnels: &[String]) {
        let mut m = self.by_tunnel.lock().expect("lock");
        m.retain(|k, _| tunnels.contains(k));
        for t in tunnels {
            m.entry(t.clone()).or_default();
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
