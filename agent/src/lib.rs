//! edgeplane: an eBPF-accelerated data-plane agent for vehicles and edge boxes.
//!
//! The library holds everything; the `edgeplane` binary is a thin CLI over it.

pub mod agent;
pub mod attach;
pub mod config;
pub mod http;
pub mod loader;
pub mod metrics;
pub mod netdev;
pub mod status;
pub mod udp_forward;

pub use loader::EBPF_OBJECT;
