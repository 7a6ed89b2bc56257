//! The CAN router's maps: per-interface rule lists, rules with their modifications and
//! checksums, counters, watched IDs with cycle-time state, and tunnel records.

use crate::hist::Log2Hist;

pub const MAX_RULES: u32 = 256;
pub const MAX_INGRESS: u32 = 64;
/// Rules evaluated per frame on one interface, in config order.
pub const MAX_RULES_PER_IFACE: usize = 16;
pub const MAX_WATCHES: u32 = 1024;

pub const RULES_MAP: &str = "CAN_RULES";
pub const INGRESS_MAP: &str = "CAN_INGRESS";
pub const RULE_STATS_MAP: &str = "CAN_RULE_STATS";
pub const INGRESS_STATS_MAP: &str = "CAN_INGRESS_STATS";
pub const WATCH_MAP: &str = "CAN_WATCH";
pub const TUNNEL_RING: &str = "CAN_TUNNEL";
/// Cookies of the agent's own CAN sockets (the tunnel's receivers): frames they write come
/// back through tc ingress by the CAN core's loopback and count as having made one hop.
pub const TUNNEL_SOCKETS_MAP: &str = "CAN_TUNNEL_SOCKETS";
pub const MAX_TUNNEL_SOCKETS: u32 = 64;
pub const PROGRAM: &str = "can_route";

/// `can_id` flag bits (linux/can.h).
pub const CAN_EFF_FLAG: u32 = 0x8000_0000;
pub const CAN_RTR_FLAG: u32 = 0x4000_0000;
pub const CAN_ERR_FLAG: u32 = 0x2000_0000;
pub const CAN_SFF_MASK: u32 = 0x0000_07ff;
pub const CAN_EFF_MASK: u32 = 0x1fff_ffff;
/// Frame sizes on the wire of the socket API: `struct can_frame` and `struct canfd_frame`.
pub const CAN_MTU: usize = 16;
pub const CANFD_MTU: usize = 72;
pub const CAN_MAX_DLEN: u8 = 8;
pub const CANFD_MAX_DLEN: u8 = 64;
/// skb->protocol values (big-endian on the wire of the skb field).
pub const ETH_P_CAN: u16 = 0x000c;
pub const ETH_P_CANFD: u16 = 0x000d;

/// A CAN or CAN FD frame as `struct canfd_frame` lays it out; classic frames use the first 16
/// bytes (`len` is the DLC, data has 8 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CanFrame {
    pub can_id: u32,
    pub len: u8,
    pub flags: u8,
    pub res0: u8,
    pub res1: u8,
    pub data: [u8; 64],
}
crate::assert_size!(CanFrame, CANFD_MTU);

impl Default for CanFrame {
    fn default() -> Self {
        Self {
            can_id: 0,
            len: 0,
            flags: 0,
            res0: 0,
            res1: 0,
            data: [0; 64],
        }
    }
}

/// What a rule does with a matching frame.
pub mod action {
    pub const COUNT: u8 = 0;
    pub const DROP: u8 = 1;
    pub const ROUTE: u8 = 2;
    pub const TUNNEL: u8 = 3;
}

/// Bits of [`CanRule::flags`].
pub mod rule_flag {
    /// Match frames the filter does *not* match (candump's `~`).
    pub const INVERT: u8 = 1 << 0;
    /// The route's egress carries CAN FD (MTU 72); FD frames for a classic egress are counted
    /// as `fd_to_classic`.
    pub const EGRESS_FD: u8 = 1 << 1;
}

/// A rule, indexed by its slot in [`RULES_MAP`] (the same slot indexes its counters).
///
/// The kernel refuses `bpf_redirect` for CAN skbs (they carry no link-layer header), so routes
/// to another CAN netdev are executed by the kernel's can-gw, which the agent programs; the
/// program counts, drops, watches and tunnels.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CanRule {
    /// Matches when `can_id & filter_mask == filter_id & filter_mask` (on the full `can_id`,
    /// flags included, like CAN_RAW filters), or the opposite with `INVERT`.
    pub filter_id: u32,
    pub filter_mask: u32,
    /// [`action`] value.
    pub action: u8,
    /// [`rule_flag`] bits.
    pub flags: u8,
    /// Tunnel rules: frames that already made this many hops are not tunnelled (at least 1).
    pub hops: u8,
    pub _pad: u8,
    /// Tunnel id for [`action::TUNNEL`].
    pub tunnel: u32,
    /// [`action::ROUTE`]: the netdev can-gw sends to, where the frame's latency ends.
    pub egress: u32,
    pub _pad2: u32,
}
crate::assert_size!(CanRule, 24);

/// Per-interface settings, keyed by ifindex.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CanIngress {
    /// Rule slots in evaluation order; `count` are valid.
    pub rules: [u16; MAX_RULES_PER_IFACE],
    pub count: u8,
    /// Nonzero when some ID on this interface is watched.
    pub watch: u8,
    pub _pad: [u8; 2],
    /// Slot in [`INGRESS_STATS_MAP`].
    pub slot: u32,
}
crate::assert_size!(CanIngress, 2 * MAX_RULES_PER_IFACE + 8);

/// Why a matching frame was not routed or tunnelled (or was dropped), as the program counts
/// it. can-gw's own counters add `gateway_deleted` and `gateway_dropped` in the agent.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The rule's action is `drop`: the frame does not reach local sockets (nor can-gw).
    Rule = 0,
    /// A tunnel rule saw a frame that already made `hops` hops (the tunnel's own writes).
    HopLimit,
    /// A CAN FD frame for an egress that only carries classic CAN.
    FdToClassic,
    /// The tunnel ring buffer was full: the agent is not keeping up.
    TunnelFull,
}

impl DropReason {
    pub const COUNT: usize = 4;
    pub const ALL: [Self; Self::COUNT] = [
        Self::Rule,
        Self::HopLimit,
        Self::FdToClassic,
        Self::TunnelFull,
    ];

    pub const fn label(self) -> &'static str {
        match self {
            Self::Rule => "rule",
            Self::HopLimit => "hop_limit",
            Self::FdToClassic => "fd_to_classic",
            Self::TunnelFull => "tunnel_full",
        }
    }
}

/// Per-rule counters, per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CanRuleStats {
    /// Frames the rule matched.
    pub frames: u64,
    /// Their payload bytes (0 for remote frames).
    pub bytes: u64,
    /// Frames handed to the tunnel (can-gw counts the frames it routes itself).
    pub routed: u64,
    pub dropped: [u64; DropReason::COUNT],
}
crate::assert_size!(CanRuleStats, 24 + 8 * DropReason::COUNT);

/// Frame kinds seen on an interface, per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CanIngressStats {
    pub classic: u64,
    pub fd: u64,
    /// Remote (RTR) frames; also counted in `classic`.
    pub rtr: u64,
    /// Error frames: counted, never routed.
    pub error: u64,
    /// CAN XL or anything else: passed untouched.
    pub other: u64,
}
crate::assert_size!(CanIngressStats, 5 * 8);

/// A watched ID on an interface. `can_id` includes `CAN_EFF_FLAG` for extended IDs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CanWatchKey {
    pub ifindex: u32,
    pub can_id: u32,
}
crate::assert_size!(CanWatchKey, 8);

/// A watched ID's expectation (set by the agent) and what the kernel measured.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CanWatch {
    pub period_ns: u64,
    /// A frame later than this after the previous one missed its deadline.
    pub late_ns: u64,
    pub last_ns: u64,
    pub frames: u64,
    pub bytes: u64,
    pub missed: u64,
    /// Inter-arrival times.
    pub cycle: Log2Hist,
    /// |inter-arrival - period|.
    pub jitter: Log2Hist,
}
crate::assert_size!(CanWatch, 6 * 8 + 2 * size_of::<Log2Hist>());

/// A frame for the tunnel, from kernel to agent through [`TUNNEL_RING`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CanTunnelRecord {
    /// bpf_ktime_get_ns() at ingress.
    pub ts_ns: u64,
    pub tunnel: u32,
    pub ifindex: u32,
    /// Nonzero for CAN FD.
    pub fd: u8,
    pub _pad: [u8; 3],
    /// The route's slot, for its latency histogram.
    pub slot: u32,
    pub frame: CanFrame,
}
crate::assert_size!(CanTunnelRecord, 24 + CANFD_MTU);

crate::pod!(
    CanFrame,
    CanRule,
    CanIngress,
    CanRuleStats,
    CanIngressStats,
    CanWatchKey,
    CanWatch,
    CanTunnelRecord
);
