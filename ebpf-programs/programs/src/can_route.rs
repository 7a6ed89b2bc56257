//! `can_route` at tc (clsact ingress) on CAN and CAN FD netdevs: matches frames against the
//! interface's rules like CAN_RAW / can-gw filters, counts them per rule and per kind, drops
//! the ones a `drop` rule names, hands tunnelled ones to the agent through a ring buffer, and
//! measures the cycle time and jitter of watched IDs.
//!
//! Routes to another CAN netdev are counted here but sent by the kernel's can-gw (programmed by
//! the agent): `bpf_redirect` refuses skbs without a link-layer header, which CAN skbs are.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_skb_load_bytes},
    macros::{classifier, map},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::TcContext,
};
use edgeplane_common::can::{
    CAN_EFF_FLAG, CAN_EFF_MASK, CAN_ERR_FLAG, CAN_MTU, CAN_RTR_FLAG, CANFD_MAX_DLEN, CANFD_MTU,
    CanFrame, CanIngress, CanIngressStats, CanRule, CanRuleStats, CanTunnelRecord, CanWatch,
    CanWatchKey, DropReason, ETH_P_CAN, ETH_P_CANFD, MAX_INGRESS, MAX_RULES, MAX_RULES_PER_IFACE,
    MAX_TUNNEL_SOCKETS, MAX_WATCHES, action, rule_flag,
};

use crate::{
    atomic_hist::{add, record},
    latency,
    verifier::opaque,
};

#[map]
static CAN_RULES: Array<CanRule> = Array::with_max_entries(MAX_RULES, 0);
#[map]
static CAN_INGRESS: HashMap<u32, CanIngress> = HashMap::with_max_entries(MAX_INGRESS, 0);
#[map]
static CAN_RULE_STATS: PerCpuArray<CanRuleStats> = PerCpuArray::with_max_entries(MAX_RULES, 0);
#[map]
static CAN_INGRESS_STATS: PerCpuArray<CanIngressStats> =
    PerCpuArray::with_max_entries(MAX_INGRESS, 0);
#[map]
static CAN_WATCH: HashMap<CanWatchKey, CanWatch> = HashMap::with_max_entries(MAX_WATCHES, 0);
#[map]
static CAN_TUNNEL: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);
#[map]
static CAN_TUNNEL_SOCKETS: HashMap<u64, u8> = HashMap::with_max_entries(MAX_TUNNEL_SOCKETS, 0);

#[classifier]
pub fn can_route(ctx: TcContext) -> i32 {
    try_can_route(&ctx).unwrap_or(TC_ACT_UNSPEC)
}

/// What tunnelling needs to know about the frame.
struct FrameInfo {
    fd: bool,
    /// Gateway hops the frame already made: 1 when the agent's tunnel wrote it to this bus.
    hops: u8,
    ifindex: u32,
    now: u64,
}

fn try_can_route(ctx: &TcContext) -> Option<i32> {
    // SAFETY: the program's own __sk_buff.
    let (ifindex, protocol) = unsafe {
        let skb = &*ctx.skb.skb;
        (skb.ifindex, u16::from_be(skb.protocol as u16))
    };
    // SAFETY: read at once; the agent replaces values whole.
    let ingress = unsafe { CAN_INGRESS.get(&ifindex) }?;
    let kinds = CAN_INGRESS_STATS.get_ptr_mut(ingress.slot)?;
    let fd = match protocol {
        ETH_P_CAN => false,
        ETH_P_CANFD => true,
        _ => {
            // SAFETY: per-CPU value.
            unsafe { (*kinds).other += 1 };
            return None;
        }
    };
    let can_id: u32 = ctx.load(0).ok()?;
    let len: u8 = ctx.load(4).ok()?;
    // SAFETY: per-CPU value.
    unsafe {
        if can_id & CAN_ERR_FLAG != 0 {
            (*kinds).error += 1;
            return None;
        }
        if fd {
            (*kinds).fd += 1;
        } else {
            (*kinds).classic += 1;
            if can_id & CAN_RTR_FLAG != 0 {
                (*kinds).rtr += 1;
            }
        }
    }
    let payload = if can_id & CAN_RTR_FLAG != 0 {
        0
    } else {
        u64::from(len.min(CANFD_MAX_DLEN))
    };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    if ingress.watch != 0 && can_id & CAN_RTR_FLAG == 0 {
        watch(ifindex, can_id, payload, now);
    }

    let mut info = FrameInfo {
        fd,
        hops: 0,
        ifindex,
        now,
    };
    // Written by the tunnel's receiver (the CAN core loops local writes back through here): it
    // crossed the remote gateway already.
    // SAFETY: plain helper call on the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    // SAFETY: read only.
    if cookie != 0 && unsafe { CAN_TUNNEL_SOCKETS.get(&cookie) }.is_some() {
        info.hops = 1;
    }
    let latency = latency::forwarding();
    let mut handed_off = false;
    let mut verdict = TC_ACT_UNSPEC;
    for i in 0..MAX_RULES_PER_IFACE {
        if i >= usize::from(ingress.count) {
            break;
        }
        let slot = u32::from(ingress.rules[i]);
        let Some(rule) = CAN_RULES.get(slot) else {
            continue;
        };
        let hit = (can_id ^ rule.filter_id) & rule.filter_mask == 0;
        if hit == (rule.flags & rule_flag::INVERT != 0) {
            continue;
        }
        let Some(stats) = CAN_RULE_STATS.get_ptr_mut(slot) else {
            continue;
        };
        let outcome = match rule.action {
            action::DROP => {
                verdict = TC_ACT_SHOT;
                Err(DropReason::Rule)
            }
            action::ROUTE if fd && rule.flags & rule_flag::EGRESS_FD == 0 => {
                Err(DropReason::FdToClassic)
            }
            // can-gw sends it and counts that; latency_egress sees it leave.
            action::ROUTE => {
                if let Some(cfg) = latency {
                    // SAFETY: the program's own __sk_buff.
                    let tstamp = unsafe { (*ctx.skb.skb).tstamp };
                    let start = latency::start_ns(tstamp, cfg, now);
                    latency::hand_off_can(
                        !handed_off,
                        start,
                        now,
                        rule.egress,
                        slot,
                        can_id,
                        ifindex,
                    );
                    handed_off = true;
                }
                Ok(false)
            }
            action::TUNNEL => tunnel(ctx, rule, slot, &info).map(|()| true),
            _ => Ok(false),
        };
        // SAFETY: per-CPU value; reasons are enum discriminants below COUNT.
        unsafe {
            (*stats).frames += 1;
            (*stats).bytes += payload;
            match outcome {
                Ok(true) => (*stats).routed += 1,
                Ok(false) => {}
                Err(reason) => {
                    if let Some(c) = (*stats).dropped.get_mut(opaque(reason as usize)) {
                        *c += 1;
                    }
                }
            }
        }
    }
    Some(verdict)
}

/// Hands the frame to the agent's tunnel through the ring buffer.
#[inline(always)]
fn tunnel(ctx: &TcContext, rule: &CanRule, slot: u32, f: &FrameInfo) -> Result<(), DropReason> {
    if f.hops >= rule.hops {
        return Err(DropReason::HopLimit);
    }
    let mut entry = CAN_TUNNEL
        .reserve::<CanTunnelRecord>(0)
        .ok_or(DropReason::TunnelFull)?;
    let rec = entry.as_mut_ptr();
    let size = if f.fd { CANFD_MTU } else { CAN_MTU } as u32;
    // SAFETY: the reserved record is ours until submitted or discarded; the skb helper writes
    // at most a canfd_frame into the record's frame.
    let copied = unsafe {
        (*rec).ts_ns = f.now;
        (*rec).tunnel = rule.tunnel;
        (*rec).ifindex = f.ifindex;
        (*rec).fd = u8::from(f.fd);
        (*rec)._pad = [0; 3];
        (*rec).slot = slot;
        (*rec).frame = CanFrame::default();
        let dst = core::ptr::addr_of_mut!((*rec).frame);
        bpf_skb_load_bytes(ctx.skb.skb.cast(), 0, dst.cast(), size) == 0
    };
    if !copied {
        entry.discard(0);
        return Err(DropReason::TunnelFull);
    }
    entry.submit(0);
    Ok(())
}

/// Updates a watched ID's counters and cycle-time histograms. Frames of one ID arrive in bus
/// order, so the read-then-write of the last timestamp does not race in practice; counters use
/// atomic adds because they are shared across CPUs.
#[inline(always)]
fn watch(ifindex: u32, can_id: u32, payload: u64, now: u64) {
    let key = CanWatchKey {
        ifindex,
        can_id: can_id & (CAN_EFF_FLAG | CAN_EFF_MASK),
    };
    let Some(w) = CAN_WATCH.get_ptr_mut(&key) else {
        return;
    };
    // SAFETY: a map value; atomics for what several CPUs add to.
    unsafe {
        add(&raw mut (*w).frames, 1);
        add(&raw mut (*w).bytes, payload);
        let last = (*w).last_ns;
        (*w).last_ns = now;
        if last == 0 || now <= last {
            return;
        }
        let dt = now - last;
        record(&raw mut (*w).cycle, dt);
        record(&raw mut (*w).jitter, dt.abs_diff((*w).period_ns));
        if (*w).late_ns != 0 && dt > (*w).late_ns {
            add(&raw mut (*w).missed, 1);
        }
    }
}
