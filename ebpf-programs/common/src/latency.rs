//! Latency capture: where forwarded frames and delivered datagrams spend their time.
//!
//! Times in the kernel are CLOCK_MONOTONIC (`bpf_ktime_get_ns`). A frame's receive timestamp
//! (`skb->tstamp`, set by the stack when timestamping is on) is CLOCK_REALTIME: programs convert
//! it with [`LatencyConfig::realtime_offset_ns`], which the agent keeps current.

use crate::{can, udp_forward};

/// Map names, as the programs declare them.
pub const CONFIG_MAP: &str = "LATENCY_CONFIG";
pub const UDP_FORWARD_MAP: &str = "UDP_FORWARD_LATENCY";
pub const CAN_FORWARD_MAP: &str = "CAN_FORWARD_LATENCY";
pub const DELIVERY_MAP: &str = "DELIVERY_LATENCY";
pub const DELIVERY_PORTS_MAP: &str = "DELIVERY_UDP_PORTS";
pub const DELIVERY_IFACES_MAP: &str = "DELIVERY_CAN_IFACES";
pub const EVENTS_RING: &str = "LATENCY_EVENTS";
pub const EVENTS_DROPPED_MAP: &str = "LATENCY_EVENTS_DROPPED";

/// Program names, as the programs declare them.
pub const EGRESS_PROGRAM: &str = "latency_egress";
pub const XDP_FLUSH_PROGRAM: &str = "latency_xdp_flush";
pub const UDP_QUEUED_PROGRAM: &str = "delivery_udp_queued";
pub const CAN_QUEUED_PROGRAM: &str = "delivery_can_queued";
pub const UDP_READ_PROGRAM: &str = "delivery_udp_read";
pub const CAN_READ_PROGRAM: &str = "delivery_can_read";

/// Delivery slots (local UDP ports and CAN interfaces), each with [`STAGES`] histograms.
pub const MAX_DELIVERY: u32 = 64;
/// Delivery stages: index in a slot's histograms.
pub const STAGE_QUEUED: u32 = 0;
pub const STAGE_READ: u32 = 1;
pub const STAGES: u32 = 2;
/// Frames XDP hands to one egress between two flushes: the devmap's bulk size.
pub const XDP_BULK: usize = 16;
/// Per-CPU bulk-queue notes, indexed by egress ifindex modulo this: an array lookup instead of
/// a hash one for every redirected frame. Two egresses of one slot share it (the later one
/// takes it over, so frames of the other go unmeasured); a flush comes at the end of every
/// driver poll, so that needs both within one poll on one CPU.
pub const XDP_PENDING_SLOTS: u32 = 64;
/// A frame's CAN routes to other netdevs that one handoff can carry.
pub const HANDOFF_ROUTES: usize = can::MAX_RULES_PER_IFACE;
/// Skbs queued on sockets whose queueing time is kept for the read stage's events.
pub const MAX_QUEUED: u32 = 16384;

/// [`LatencyConfig::flags`] bits.
pub mod flag {
    /// Forwarding latency is measured.
    pub const FORWARDING: u32 = 1 << 0;
    /// Socket delivery latency is measured (the kernel offsets are resolved).
    pub const DELIVERY: u32 = 1 << 1;
}

/// Offsets of the kernel fields the latency programs read, resolved by the agent from the
/// running kernel's BTF, so no layout is compiled in (and nothing is read from tracefs, which
/// only root may read). `u32::MAX` marks one this kernel lacks.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub skb_tstamp: u32,
    pub skb_iif: u32,
    pub sk_family: u32,
    /// `net_device.ifindex`: the raw tracepoint `xdp_devmap_xmit` is passed the egress device.
    pub netdev_ifindex: u32,
    /// `sk_buff.head` and its network and transport header offsets (u16): UDP's read stage
    /// finds the port in the datagram (UDP sockets don't own their queued skbs).
    pub skb_head: u32,
    pub skb_network_header: u32,
    pub skb_transport_header: u32,
    pub _pad: [u32; 5],
}
crate::assert_size!(KernelOffsets, 48);

/// The single entry of [`CONFIG_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LatencyConfig {
    pub flags: u32,
    pub _pad: u32,
    /// Frames slower than this go to the event ring; 0: none.
    pub slow_ns: u64,
    /// CLOCK_REALTIME minus CLOCK_MONOTONIC, in ns.
    pub realtime_offset_ns: i64,
    pub offsets: KernelOffsets,
}
crate::assert_size!(LatencyConfig, 24 + 48);

/// A frame's flow, as events report it: the UDP 5-tuple as received, or the CAN ID.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowKey {
    /// 16-bit words as the packet carries them (see `udp_forward::ip_words`); IPv4 in the
    /// first two.
    pub src_ip: [u16; 8],
    pub dst_ip: [u16; 8],
    /// Big-endian, as the packet carries them.
    pub src_port: u16,
    pub dst_port: u16,
    /// 4 or 6 for UDP, 0 for CAN.
    pub family: u8,
    pub _pad: [u8; 3],
    pub can_id: u32,
    pub ifindex: u32,
}
crate::assert_size!(FlowKey, 48);

/// Handoff kinds.
pub const HANDOFF_NONE: u32 = 0;
pub const HANDOFF_UDP: u32 = 1;
pub const HANDOFF_CAN: u32 = 2;

/// What an ingress program leaves, per CPU, for `latency_egress`: the kernel hands a redirected
/// skb (tc) or a can-gw clone to the egress device on the same CPU, synchronously, before this
/// CPU takes another frame.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Handoff {
    pub kind: u32,
    /// Number of (egress, slot) pairs in use.
    pub routes: u32,
    /// Receive timestamp (monotonic) or, without one, `hook_ns`.
    pub start_ns: u64,
    /// The ingress program's time: a CAN frame's entry, a UDP datagram's rule match.
    pub hook_ns: u64,
    /// UDP: the skb length, which the egress must see unchanged.
    pub len: u32,
    pub _pad: u32,
    pub egress: [u32; HANDOFF_ROUTES],
    pub slot: [u32; HANDOFF_ROUTES],
    pub flow: FlowKey,
}
crate::assert_size!(Handoff, 32 + 8 * HANDOFF_ROUTES + 48);

/// One XDP-redirected frame waiting in the devmap's bulk queue.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PendingFrame {
    pub hook_ns: u64,
    pub slot: u32,
    pub _pad: u32,
    pub flow: FlowKey,
}
crate::assert_size!(PendingFrame, 64);

/// Per CPU, in slot `egress ifindex % XDP_PENDING_SLOTS`: frames redirected to `ifindex`
/// since its last flush, in order. One more than a bulk: the program notes a frame before the
/// kernel enqueues it, and a full queue is flushed at that enqueue, so the 17th frame is noted
/// while the 16 before it still wait for their flush.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct XdpPending {
    pub count: u32,
    pub ifindex: u32,
    pub frames: [PendingFrame; XDP_BULK + 1],
}
crate::assert_size!(XdpPending, 8 + 64 * (XDP_BULK + 1));

impl Default for XdpPending {
    fn default() -> Self {
        Self {
            count: 0,
            ifindex: 0,
            frames: [PendingFrame::default(); XDP_BULK + 1],
        }
    }
}

/// Event kinds.
pub mod event {
    pub const UDP_FORWARD: u32 = 1;
    pub const CAN_FORWARD: u32 = 2;
    pub const UDP_DELIVERY: u32 = 3;
    pub const CAN_DELIVERY: u32 = 4;
}

/// A frame slower than the threshold, with its per-stage times (monotonic ns; 0 where a
/// stage was not seen).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LatencyEvent {
    pub kind: u32,
    /// Rule slot (forwarding) or delivery slot.
    pub slot: u32,
    /// Receive timestamp, if the frame had one.
    pub rx_ns: u64,
    /// Forwarding: ingress hook entry. Delivery: queued on the socket.
    pub hook_ns: u64,
    /// Forwarding: handed to the egress device. Delivery: read by the application.
    pub done_ns: u64,
    pub flow: FlowKey,
}
crate::assert_size!(LatencyEvent, 32 + 48);

/// Forwarding latency histograms are indexed by rule slot.
pub const UDP_FORWARD_SLOTS: u32 = udp_forward::MAX_RULES;
pub const CAN_FORWARD_SLOTS: u32 = can::MAX_RULES;

crate::pod!(
    KernelOffsets,
    LatencyConfig,
    FlowKey,
    Handoff,
    PendingFrame,
    XdpPending,
    LatencyEvent
);
