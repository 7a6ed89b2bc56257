//! edgeplane: an eBPF-accelerated data-plane agent for vehicles and edge boxes.
//!
//! The library holds everything; the `edgeplane` binary is a thin CLI over it.

pub mod agent;
pub mod attach;
pub mod can;
pub mod config;
pub mod dataplane;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod host;
pub mod host_stats;
pub mod http;
pub mod latency;
pub mod link_detach;
pub mod link_events;
pub mod loader;
mod maps;
pub mod metrics;
pub mod netdev;
pub mod pinned;
pub mod pins;
pub mod planes;
pub mod registry;
pub mod resolve;
pub mod slots;
pub mod state;
pub mod status;
pub mod supervise;
mod sys;
pub mod systemd;
pub mod udp_forward;
pub mod userspace;

pub use loader::EBPF_OBJECT;
pub use sys::netlink::NetlinkError;
