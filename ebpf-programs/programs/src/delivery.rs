//! Socket delivery latency: from a datagram's receive timestamp to it being queued on a local
//! socket, and to the application reading it, per configured UDP port and CAN interface.
//!
//! Queued: a cgroup skb ingress program for UDP (it runs as the socket filters it, before it
//! queues), and a kprobe on `sock_queue_rcv_skb` (its `_reason` variant from 6.0), where CAN_RAW
//! queues (cgroup programs see IPv4/IPv6 sockets only). Read: the `skb:consume_skb` tracepoint
//! (UDP frees a datagram right after copying it out; up to 6.9) and a kprobe on `skb_free_datagram(sk, skb)`, which
//! CAN_RAW calls once it copied a frame out. Kernel struct fields are read at offsets the agent
//! resolves from the running kernel's BTF, so no layout is compiled in.

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    helpers::bpf_sk_fullsock,
    macros::{cgroup_skb, kprobe, map, raw_tracepoint},
    maps::{Array, HashMap, LruHashMap},
    programs::{ProbeContext, RawTracePointContext, SkBuffContext},
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
    latency::{self, field},
};

const AF_CAN: u16 = 29;
const IPPROTO_UDP: u32 = 17;

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

/// cgroup (v2 root) ingress runs in `sk_filter`, right before an IPv4/IPv6 socket queues the
/// skb: stable context fields only (the socket's protocol and local port, the skb's tstamp).
#[cgroup_skb(ingress)]
pub fn delivery_udp_queued(ctx: SkBuffContext) -> i32 {
    let _ = try_udp_queued(&ctx);
    1 // Always let it through: this only measures.
}

fn try_udp_queued(ctx: &SkBuffContext) -> Option<()> {
    let cfg = config()?;
    let skb = ctx.skb.skb;
    // SAFETY: context fields readable by cgroup skb programs; `sk` is checked for null.
    let (port, tstamp) = unsafe {
        let sk = (*skb).__bindgen_anon_2.sk;
        if sk.is_null() {
            return None;
        }
        let full = bpf_sk_fullsock(sk);
        if full.is_null() || (*full).protocol != IPPROTO_UDP {
            return None;
        }
        ((*full).src_port as u16, (*skb).tstamp)
    };
    // SAFETY: read only.
    let slot = unsafe { DELIVERY_UDP_PORTS.get(&port) }.copied()?;
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    if tstamp == 0 {
        return None;
    }
    let rx = latency::start_ns(tstamp, cfg, now);
    if rx >= now {
        return None;
    }
    record(slot, STAGE_QUEUED, now - rx);
    Some(())
}

#[kprobe]
pub fn delivery_can_queued(ctx: ProbeContext) -> u32 {
    let _ = can_queued(ctx.arg(0), ctx.arg(1));
    0
}

/// The raw tracepoint `consume_skb` (its first argument is the skb): UDP frees a datagram
/// right after `recvmsg` copied it out (the copy has no tracepoint for linear skbs). Kernels
/// from 6.10 free it on a path without this tracepoint (deferred to the allocating CPU): there
/// the read stage sees nothing.
#[raw_tracepoint(tracepoint = "consume_skb")]
pub fn delivery_udp_read(ctx: RawTracePointContext) -> u32 {
    let _ = (|| {
        let cfg = config()?;
        let skb: u64 = ctx.arg(0);
        let (slot, flow) = udp_slot(&cfg.offsets, skb)?;
        read(cfg, slot, flow, skb, event::UDP_DELIVERY)
    })();
    0
}

/// The delivery slot of a UDP datagram by its destination port, from its headers: a UDP
/// socket does not own the skbs it queued, so `skb->sk` does not lead to it.
#[inline(always)]
fn udp_slot(o: &KernelOffsets, skb: u64) -> Option<(u32, FlowKey)> {
    let head: u64 = field(skb, o.skb_head)?;
    let nh: u16 = field(skb, o.skb_network_header)?;
    let th: u16 = field(skb, o.skb_transport_header)?;
    let version: u8 = field(head, u32::from(nh))?;
    let (protocol_at, family) = match version >> 4 {
        4 => (9, 4),
        6 => (6, 6),
        _ => return None,
    };
    let protocol: u8 = field(head, u32::from(nh) + protocol_at)?;
    if protocol != IPPROTO_UDP as u8 {
        return None;
    }
    let port: u16 = field(head, u32::from(th) + 2)?;
    // SAFETY: read only.
    let slot = unsafe { DELIVERY_UDP_PORTS.get(&u16::from_be(port)) }.copied()?;
    let iif: i32 = field(skb, o.skb_iif).unwrap_or(0);
    Some((
        slot,
        FlowKey {
            dst_port: port,
            family,
            ifindex: iif as u32,
            ..FlowKey::default()
        },
    ))
}

#[kprobe]
pub fn delivery_can_read(ctx: ProbeContext) -> u32 {
    let _ = (|| {
        let cfg = config()?;
        let (sk, skb) = (ctx.arg(0)?, ctx.arg(1)?);
        let (slot, flow) = can_slot(&cfg.offsets, sk, skb)?;
        read(cfg, slot, flow, skb, event::CAN_DELIVERY)
    })();
    0
}

#[inline(always)]
fn config() -> Option<&'static LatencyConfig> {
    latency::enabled(flag::DELIVERY)
}

/// The delivery slot of a socket and skb, and the flow to report: a configured local UDP
/// port of an IPv4/IPv6 datagram socket, or a configured CAN interface of an AF_CAN socket.
#[inline(always)]
fn can_slot(o: &KernelOffsets, sk: u64, skb: u64) -> Option<(u32, FlowKey)> {
    let family: u16 = field(sk, o.sk_family)?;
    if family != AF_CAN {
        return None;
    }
    let iif: i32 = field(skb, o.skb_iif)?;
    let flow = FlowKey {
        ifindex: iif as u32,
        ..FlowKey::default()
    };
    // SAFETY: read only.
    let slot = unsafe { DELIVERY_CAN_IFACES.get(&flow.ifindex) }.copied()?;
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

fn can_queued(sk: Option<u64>, skb: Option<u64>) -> Option<()> {
    let cfg = config()?;
    let (sk, skb) = (sk?, skb?);
    let (slot, _) = can_slot(&cfg.offsets, sk, skb)?;
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let rx = rx_ns(cfg, skb, now)?;
    record(slot, STAGE_QUEUED, now - rx);
    let _ = DELIVERY_QUEUED.insert(&skb, &now, 0);
    Some(())
}

#[inline(always)]
fn read(cfg: &LatencyConfig, slot: u32, flow: FlowKey, skb: u64, kind: u32) -> Option<()> {
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
            kind,
            slot,
            rx_ns: rx,
            hook_ns: queued_ns,
            done_ns: now,
            flow,
        });
    }
    Some(())
}
