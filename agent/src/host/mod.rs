//! The machine beside the data plane: its network devices and their events, host metrics,
//! systemd, name resolution, and the facts a config is checked against. Nothing here loads or
//! touches an eBPF program (that is [`crate::kernel`]).

mod facts;
pub mod link_events;
pub mod netdev;
pub mod resolve;
pub mod stats;
pub mod systemd;

#[cfg(any(test, feature = "fuzzing"))]
pub use facts::{FakeHost, FakeKind};
pub use facts::{Host, ThisHost};
