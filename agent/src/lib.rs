//! edgeplane: an eBPF-accelerated data-plane agent for vehicles and edge boxes.
//!
//! The library holds everything; the `edgeplane` binary is a thin CLI over it.

pub mod can;
pub mod config;
pub mod export;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod host;
pub mod kernel;
pub mod latency;
pub mod metrics;
pub mod registry;
pub mod runtime;
mod sys;
pub mod udp_forward;
pub mod userspace;

pub use kernel::loader::EBPF_OBJECT;
pub use sys::netlink::NetlinkError;
