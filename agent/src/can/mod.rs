//! The CAN data plane's userspace side: compile routes and watches, install them, export their
//! counters and cycle times, and run the UDP tunnel.

pub mod gateway;
pub mod router;
pub mod rules;
pub mod stats;
pub mod tunnel;

pub use router::{CanRouter, CanView, RouteInfo, WantedWatch, WatchInfo};

/// A CAN ID as candump writes it: 3 hex digits for standard IDs, 8 for extended ones.
pub fn id_label(can_id: u32) -> String {
    use edgeplane_common::can::{CAN_EFF_FLAG, CAN_EFF_MASK, CAN_SFF_MASK};
    if can_id & CAN_EFF_FLAG != 0 {
        format!("{:08X}", can_id & CAN_EFF_MASK)
    } else {
        format!("{:03X}", can_id & CAN_SFF_MASK)
    }
}
