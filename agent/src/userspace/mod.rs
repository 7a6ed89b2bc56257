//! The userspace data plane: the same UDP rules and CAN routes as the kernel path, run by the
//! agent itself on sockets, for hosts where eBPF can't run (no CAP_BPF, an old kernel) and as
//! the baseline the benchmark measures the kernel path against.
//!
//! - UDP: `udp_tokio` (tokio tasks, recvmmsg/sendmmsg batches) or `udp_uring` (io_uring via
//!   tokio-uring on a thread per listener); `udp` starts and stops them as rules change.
//! - CAN: `can_socketcan` reads each ingress CAN netdev and writes routed frames, modified as
//!   can-gw would, to the egress.

pub mod can_frame;
pub mod can_socketcan;
pub mod socket;
pub mod udp;
pub mod udp_rules;
mod udp_tokio;
mod udp_uring;

use std::{
    io,
    net::SocketAddr,
    sync::{Arc, RwLock, atomic::AtomicU64},
};

pub use can_socketcan::{CanCounters, CanUserspace};
pub use udp::UdpUserspace;

#[derive(Debug, thiserror::Error)]
pub enum UserspaceError {
    #[error(
        "rule `{rule}`: cannot bind a UDP socket to {addr} on `{iface}`: {source}; another \
         program may hold the port, or the address is not on that interface"
    )]
    Bind {
        rule: String,
        iface: String,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot register a socket with the tokio reactor: {0}")]
    Reactor(#[source] io::Error),
    #[error(
        "cannot start the io_uring engine: {0}; the kernel may lack io_uring (5.1+) or have it \
         disabled (sysctl kernel.io_uring_disabled): use engine = \"tokio\""
    )]
    Uring(#[source] io::Error),
    #[error(
        "route `{route}`: cannot open a CAN socket on `{iface}`: {source}; is it a CAN \
         interface, and is it up?"
    )]
    CanSocket {
        route: String,
        iface: String,
        #[source]
        source: io::Error,
    },
}

/// Counters of one userspace UDP rule; the engines add, the collector reads.
#[derive(Debug, Default)]
pub struct UdpCounters {
    pub packets: AtomicU64,
    /// As the kernel path counts them: the frame as received, Ethernet header included.
    pub bytes: AtomicU64,
    /// Datagrams the egress socket refused (a full queue, no route).
    pub send_errors: AtomicU64,
}

/// A userspace UDP rule as metrics and readiness see it.
#[derive(Debug, Clone)]
pub struct UdpRuleView {
    pub rule: String,
    pub ingress: String,
    pub engine: &'static str,
    pub counters: Arc<UdpCounters>,
}

/// A userspace CAN route as metrics and readiness see it.
#[derive(Debug, Clone)]
pub struct CanRouteView {
    pub route: String,
    pub ingress: String,
    pub counters: Arc<CanCounters>,
}

/// What runs in userspace, shared with the collectors and /readyz.
#[derive(Debug, Clone, Default)]
pub struct UserspaceView {
    pub udp: Vec<UdpRuleView>,
    /// Datagrams on each userspace listener (ingress interface, address) no rule took.
    pub udp_unmatched: Vec<(String, SocketAddr, Arc<AtomicU64>)>,
    pub can: Vec<CanRouteView>,
}

pub type SharedUserspaceView = Arc<RwLock<UserspaceView>>;
