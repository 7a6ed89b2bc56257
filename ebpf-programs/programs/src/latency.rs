//! Latency capture's maps, and what the forwarding programs share: a frame's start time, the
//! handoff to where it leaves (`latency_egress`, `latency_xdp_flush`), histograms and events.

use aya_ebpf::{
    helpers::bpf_probe_read_kernel,
    macros::map,
    maps::{Array, PerCpuArray, RingBuf},
};
use edgeplane_common::{
    hist::Log2Hist,
    latency::{
        CAN_FORWARD_SLOTS, FlowKey, HANDOFF_CAN, HANDOFF_ROUTES, HANDOFF_UDP, Handoff,
        LatencyConfig, LatencyEvent, PendingFrame, UDP_FORWARD_SLOTS, XDP_BULK, XDP_PENDING_SLOTS,
        XdpPending, event, flag,
    },
};

use crate::{atomic_hist, verifier::opaque};

#[map]
pub static LATENCY_CONFIG: Array<LatencyConfig> = Array::with_max_entries(1, 0);
#[map]
pub static LATENCY_HANDOFF: PerCpuArray<Handoff> = PerCpuArray::with_max_entries(1, 0);
#[map]
static LATENCY_XDP_PENDING: PerCpuArray<XdpPending> =
    PerCpuArray::with_max_entries(XDP_PENDING_SLOTS, 0);
#[map]
pub static UDP_FORWARD_LATENCY: Array<Log2Hist> = Array::with_max_entries(UDP_FORWARD_SLOTS, 0);
#[map]
pub static CAN_FORWARD_LATENCY: Array<Log2Hist> = Array::with_max_entries(CAN_FORWARD_SLOTS, 0);
#[map]
static LATENCY_EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);
#[map]
static LATENCY_EVENTS_DROPPED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The configuration, when forwarding latency is measured.
#[inline(always)]
pub fn forwarding() -> Option<&'static LatencyConfig> {
    enabled(flag::FORWARDING)
}

/// The configuration, when `flag` is set. The volatile pass keeps a branch: LLVM would select
/// between the pointer and null with a mask, and the verifier refuses arithmetic on pointers.
#[inline(always)]
pub fn enabled(flag: u32) -> Option<&'static LatencyConfig> {
    let c: *const LatencyConfig = LATENCY_CONFIG.get_ptr(0)?;
    // SAFETY: a live map value.
    if unsafe { (*c).flags } & flag == 0 {
        return None;
    }
    // SAFETY: as above.
    Some(unsafe { &*opaque(c) })
}

/// A frame's start: its receive timestamp (`tstamp`, CLOCK_REALTIME, 0 when the stack did not
/// stamp it) in CLOCK_MONOTONIC, or `hook_ns` without one or when the clocks moved apart.
#[inline(always)]
pub fn start_ns(tstamp: u64, cfg: &LatencyConfig, hook_ns: u64) -> u64 {
    if tstamp == 0 {
        return hook_ns;
    }
    let mono = (tstamp as i64).wrapping_sub(cfg.realtime_offset_ns);
    if mono <= 0 || mono as u64 > hook_ns {
        hook_ns
    } else {
        mono as u64
    }
}

/// Leaves a UDP frame redirected at tc for `latency_egress` on `egress`; returns where the
/// caller writes its flow.
#[inline(always)]
pub fn hand_off_udp(
    start_ns: u64,
    hook_ns: u64,
    slot: u32,
    egress: u32,
    len: u32,
) -> Option<*mut FlowKey> {
    let h = LATENCY_HANDOFF.get_ptr_mut(0)?;
    // SAFETY: per-CPU value, used by this CPU only until the egress program reads it.
    unsafe {
        (*h).kind = HANDOFF_UDP;
        (*h).routes = 1;
        (*h).start_ns = start_ns;
        (*h).hook_ns = hook_ns;
        (*h).len = len;
        (*h).egress[0] = egress;
        (*h).slot[0] = slot;
        Some(&raw mut (*h).flow)
    }
}

/// Adds a CAN route of the frame (sent by can-gw to `egress`) to the handoff; `first` starts
/// the frame's handoff.
#[inline(always)]
pub fn hand_off_can(
    first: bool,
    start_ns: u64,
    hook_ns: u64,
    egress: u32,
    slot: u32,
    can_id: u32,
    ifindex: u32,
) {
    let Some(h) = LATENCY_HANDOFF.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU value, used by this CPU only until can-gw's clones leave.
    unsafe {
        if first {
            (*h).kind = HANDOFF_CAN;
            (*h).routes = 0;
            (*h).start_ns = start_ns;
            (*h).hook_ns = hook_ns;
            (*h).flow = FlowKey {
                can_id,
                ifindex,
                ..FlowKey::default()
            };
        }
        let i = opaque((*h).routes as usize);
        if i < HANDOFF_ROUTES {
            (*h).egress[i] = egress;
            (*h).slot[i] = slot;
            (*h).routes += 1;
        }
    }
}

/// Notes a frame XDP redirected to `egress`, for `latency_xdp_flush`; returns where the
/// caller writes its flow.
#[inline(always)]
pub fn pending_xdp(egress: u32, hook_ns: u64, slot: u32) -> Option<*mut FlowKey> {
    let p = LATENCY_XDP_PENDING.get_ptr_mut(egress % XDP_PENDING_SLOTS)?;
    // SAFETY: per-CPU value of this CPU's bulk queue to `egress`.
    unsafe {
        if (*p).ifindex != egress {
            (*p).ifindex = egress;
            (*p).count = 0;
        }
        let i = opaque((*p).count as usize);
        let f: *mut PendingFrame = (*p).frames.get_mut(i)?;
        (*f).hook_ns = hook_ns;
        (*f).slot = slot;
        (*p).count += 1;
        Some(&raw mut (*f).flow)
    }
}

/// The frames of this CPU's bulk queue to `egress`, for the flush to take.
#[inline(always)]
pub fn take_pending(egress: u32) -> Option<*mut XdpPending> {
    let p = LATENCY_XDP_PENDING.get_ptr_mut(egress % XDP_PENDING_SLOTS)?;
    // SAFETY: per-CPU value, read only.
    (unsafe { (*p).ifindex } == egress).then_some(p)
}

pub const FORWARD_UDP: u32 = event::UDP_FORWARD;
pub const FORWARD_CAN: u32 = event::CAN_FORWARD;

/// Records a forwarded frame's latency under its rule, and an event when it was slow.
#[inline(always)]
pub fn forwarded(
    cfg: &LatencyConfig,
    kind: u32,
    slot: u32,
    rx_ns: u64,
    hook_ns: u64,
    done_ns: u64,
    flow: &FlowKey,
) {
    let start = if rx_ns != 0 { rx_ns } else { hook_ns };
    let ns = done_ns.saturating_sub(start);
    let hist = if kind == FORWARD_UDP {
        UDP_FORWARD_LATENCY.get_ptr_mut(slot)
    } else {
        CAN_FORWARD_LATENCY.get_ptr_mut(slot)
    };
    if let Some(h) = hist {
        // SAFETY: a live map value.
        unsafe { atomic_hist::record(h, ns) };
    }
    if cfg.slow_ns != 0 && ns >= cfg.slow_ns {
        emit(&LatencyEvent {
            kind,
            slot,
            rx_ns,
            hook_ns,
            done_ns,
            flow: *flow,
        });
    }
}

/// Sends an event to the agent; counts it when the ring is full.
#[inline(always)]
pub fn emit(e: &LatencyEvent) {
    if LATENCY_EVENTS.output::<LatencyEvent>(e, 0).is_err()
        && let Some(c) = LATENCY_EVENTS_DROPPED.get_ptr_mut(0)
    {
        // SAFETY: per-CPU counter.
        unsafe { *c += 1 };
    }
}

/// Frames a bulk flush took, at most [`XDP_BULK`].
#[inline(always)]
pub fn flushed(count: u32, sent: i32, drops: i32) -> usize {
    let n = (sent.max(0) + drops.max(0)) as u32;
    (count.min(n) as usize).min(XDP_BULK)
}

/// A kernel field of type `T` at `base + offset` (an offset from [`KernelOffsets`], `u32::MAX`
/// where this kernel lacks the field).
///
/// [`KernelOffsets`]: edgeplane_common::latency::KernelOffsets
#[inline(always)]
pub fn field<T>(base: u64, offset: u32) -> Option<T> {
    if base == 0 || offset == u32::MAX {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel copes with any address.
    unsafe { bpf_probe_read_kernel((base + u64::from(offset)) as *const T) }.ok()
}
