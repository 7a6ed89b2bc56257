//! The `[latency]` section: what latency the kernel measures, and what counts as slow.

use serde::Deserialize;

use super::Problem;
use crate::{host::Host, host::netdev};

/// Local UDP ports and CAN interfaces whose socket delivery can be measured, together.
pub const MAX_DELIVERY: usize = edgeplane_common::latency::MAX_DELIVERY as usize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatencyCapture {
    /// Forwarding latency of every UDP rule and CAN route.
    #[serde(default = "LatencyCapture::default_enabled")]
    pub enabled: bool,
    /// Frames slower than this (µs) are reported one by one (`edgeplane events`); 0: none.
    #[serde(default = "LatencyCapture::default_slow")]
    pub slow_threshold_us: u64,
    /// Socket delivery latency of datagrams to these local UDP ports.
    #[serde(default)]
    pub udp_ports: Vec<u16>,
    /// Socket delivery latency of frames from these CAN interfaces to CAN_RAW sockets.
    #[serde(default)]
    pub can_ifaces: Vec<String>,
}

impl LatencyCapture {
    fn default_enabled() -> bool {
        true
    }
    fn default_slow() -> u64 {
        1000
    }

    pub(super) fn problems(&self, out: &mut Vec<Problem>) {
        if self.udp_ports.len() + self.can_ifaces.len() > MAX_DELIVERY {
            out.push(Problem {
                key: "latency".into(),
                message: format!(
                    "at most {MAX_DELIVERY} udp_ports and can_ifaces together, not {}",
                    self.udp_ports.len() + self.can_ifaces.len()
                ),
            });
        }
        for (i, p) in self.udp_ports.iter().enumerate() {
            if *p == 0 {
                out.push(Problem {
                    key: format!("latency.udp_ports[{i}]"),
                    message: "port 0 is not a port a socket receives on".into(),
                });
            } else if self.udp_ports[..i].contains(p) {
                out.push(Problem {
                    key: format!("latency.udp_ports[{i}]"),
                    message: format!("port {p} is listed twice"),
                });
            }
        }
        for (i, iface) in self.can_ifaces.iter().enumerate() {
            let key = format!("latency.can_ifaces[{i}]");
            if let Err(message) = netdev::check_name(iface) {
                out.push(Problem { key, message });
            } else if self.can_ifaces[..i].contains(iface) {
                out.push(Problem {
                    key,
                    message: format!("`{iface}` is listed twice"),
                });
            }
        }
    }

    pub(super) fn host_problems(&self, host: &dyn Host, out: &mut Vec<Problem>) {
        for (i, iface) in self.can_ifaces.iter().enumerate() {
            let key = format!("latency.can_ifaces[{i}]");
            if host.ifindex(iface).is_none() {
                out.push(Problem {
                    key,
                    message: format!(
                        "interface `{iface}` does not exist on this host (see `ip link`)"
                    ),
                });
            } else if !host.is_can(iface) {
                out.push(Problem {
                    key,
                    message: format!("`{iface}` is not a CAN interface"),
                });
            }
        }
    }
}

impl Default for LatencyCapture {
    fn default() -> Self {
        Self {
            enabled: Self::default_enabled(),
            slow_threshold_us: Self::default_slow(),
            udp_ports: Vec::new(),
            can_ifaces: Vec::new(),
        }
    }
}
