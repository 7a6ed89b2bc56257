//! The UDP forwarder's userspace side: compile rules, install them without a gap, read counters.

mod forwarder;
mod rule_maps;
pub mod rules;
pub mod stats;

pub use forwarder::{IngressInfo, RuleInfo, StatsMap, UdpForwardError, UdpForwarder, UdpView};
