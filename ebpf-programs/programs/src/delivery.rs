//! Socket delivery latency: from a datagram's receive timestamp to it being queued on a local
//! socket, and to the application reading it, per configured UDP port and CAN interface.
//!
//! Queued: kprobes on `__udp_enqueue_schedule_skb(sk, skb)` and on `sock_queue_rcv_skb` (its
//! `_reason` variant from 6.0), where CAN_RAW queues. Read: the `skb:skb_copy_datagram_iovec`
//! tracepoint (UDP copies through it) and a kprobe on `skb_free_datagram(sk, skb)`, which
//! CAN_RAW calls once it copied a frame out. Kernel struct fields are read at offsets the agent
//! resolves from the running kernel's BTF, so no layout is compiled in.

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{kprobe, map, tracepoint},
    maps::{Array, HashMap, LruHashMap},
    programs::{ProbeContext, TracePointContext},
};
use edgeplane_common::{
    hist::Log2Hist,
    latency::{
        FlowKey, KernelOffsets, LatencyConfig, LatencyEvent, MAX_DELIVERY, MAX_QUEUED,
        STAGE_QUEUED, STAGE_READ, STAGES, event, flag,
    },
};

use crate::{
    atomic_hist,
    latency::{self, LATENCY_CONFIG},
};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const AF_CAN: u16 = 29;
const SOCK_DGRAM: u16 = 2;

/// Local UDP port (host order) -> delivery slot.
#[map]
static DELIVERY_UDP_PORTS: HashMap<u16, u32> = HashMap::with_max_entries(MAX_DELIVERY, 0);
/// CAN ifindex -> delivery slot.
#[map]
static DELIVERY_CAN_IFACES: HashMap<u32, u32> = HashMap::with_max_entries(MAX_DELIVERY, 0);
/// `slot * STAGES + stage`.
#[map]
static DELIVERY_LATENCY: Array<Log2Hist> = Array::with_max_entries(MAX_DELIVERY * STAGES, 0);
/// skb address -> when it was queued, for the read stage's events.
#[map]
static DELIVERY_QUEUED: LruHashMap<u64, u64> = LruHashMap::with_max_entries(MAX_QUEUED, 0);

#[kprobe]
pub fn delivery_udp_queued(ctx: ProbeContext) -> u32 {
    let _ = queued(ctx.arg(0), ctx.arg(1), false);
    0
}

#[kprobe]
pub fn delivery_can_queued(ctx: ProbeContext) -> u32 {
    let _ = queued(ctx.arg(0), ctx.arg(1), true);
    0
}

#[tracepoint]
pub fn delivery_udp_read(ctx: TracePointContext) -> u32 {
    let _ = (|| {
        let cfg = config()?;
        // SAFETY: the offset of `skbaddr` in this tracepoint's record, from its format file.
        let skb: u64 = unsafe { ctx.read_at(cfg.offsets.copy_skbaddr as usize) }.ok()?;
        let sk: u64 = field(skb, cfg.offsets.skb_sk)?;
        read(cfg, sk, skb, false)
    })();
    0
}

#[kprobe]
pub fn delivery_can_read(ctx: ProbeContext) -> u32 {
    let _ = (|| {
        let cfg = config()?;
        read(cfg, ctx.arg(0)?, ctx.arg(1)?, true)
    })();
    0
}

#[inline(always)]
fn config() -> Option<&'static LatencyConfig> {
    LATENCY_CONFIG.get(0).filter(|c| c.flags & flag::DELIVERY != 0)
}

/// A kernel field of type `T` at `base + offset`.
#[inline(always)]
fn field<T>(base: u64, offset: u32) -> Option<T> {
    if base == 0 || offset == u32::MAX {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel copes with any address.
    unsafe { bpf_probe_read_kernel((base + u64::from(offset)) as *const T) }.ok()
}

/// The delivery slot of a socket and skb, and the flow to report: a configured local UDP
/// port of an IPv4/IPv6 datagram socket, or a configured CAN interface of an AF_CAN socket.
#[inline(always)]
fn slot_of(o: &KernelOffsets, sk: u64, skb: u64, can: bool) -> Option<(u32, FlowKey)> {
    let family: u16 = field(sk, o.sk_family)?;
    let mut flow = FlowKey::default();
    if can {
        if family != AF_CAN {
            return None;
        }
        let iif: i32 = field(skb, o.skb_iif)?;
        flow.ifindex = iif as u32;
        // SAFETY: read only.
        let slot = unsafe { DELIVERY_CAN_IFACES.get(&flow.ifindex) }.copied()?;
        return Some((slot, flow));
    }
    if family != AF_INET && family != AF_INET6 {
        return None;
    }
    let ty: u16 = field(sk, o.sk_type)?;
    if ty != SOCK_DGRAM {
        return None;
    }
    let port: u16 = field(sk, o.sk_num)?;
    // SAFETY: read only.
    let slot = unsafe { DELIVERY_UDP_PORTS.get(&port) }.copied()?;
    flow.dst_port = port.to_be();
    flow.family = if family == AF_INET { 4 } else { 6 };
    let iif: i32 = field(skb, o.skb_iif).unwrap_or(0);
    flow.ifindex = iif as u32;
    Some((slot, flow))
}

/// The datagram's receive time in CLOCK_MONOTONIC; none without a receive timestamp.
#[inline(always)]
fn rx_ns(cfg: &LatencyConfig, skb: u64, now: u64) -> Option<u64> {
    let tstamp: u64 = field(skb, cfg.offsets.skb_tstamp)?;
    let start = latency::start_ns(tstamp, cfg, now);
    (tstamp != 0 && start < now).then_some(start)
}

#[inline(always)]
fn record(slot: u32, stage: u32, ns: u64) {
    if let Some(h) = DELIVERY_LATENCY.get_ptr_mut(slot * STAGES + stage) {
        // SAFETY: a live map value.
        unsafe { atomic_hist::record(h, ns) };
    }
}

fn queued(sk: Option<u64>, skb: Option<u64>, can: bool) -> Option<()> {
    let cfg = config()?;
    let (sk, skb) = (sk?, skb?);
    let (slot, _) = slot_of(&cfg.offsets, sk, skb, can)?;
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let rx = rx_ns(cfg, skb, now)?;
    record(slot, STAGE_QUEUED, now - rx);
    let _ = DELIVERY_QUEUED.insert(&skb, &now, 0);
    Some(())
}

#[inline(always)]
fn read(cfg: &LatencyConfig, sk: u64, skb: u64, can: bool) -> Option<()> {
    let (slot, flow) = slot_of(&cfg.offsets, sk, skb, can)?;
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: read at once, then removed.
    let queued_ns = unsafe { DELIVERY_QUEUED.get(&skb) }.copied().unwrap_or(0);
    let _ = DELIVERY_QUEUED.remove(&skb);
    let rx = rx_ns(cfg, skb, now)?;
    let ns = now - rx;
    record(slot, STAGE_READ, ns);
    if cfg.slow_ns != 0 && ns >= cfg.slow_ns {
        latency::emit(&LatencyEvent {
            kind: if can {
                event::CAN_DELIVERY
            } else {
                event::UDP_DELIVERY
            },
            slot,
            rx_ns: rx,
            hook_ns: queued_ns,
            done_ns: now,
            flow,
        });
    }
    Some(())
}
