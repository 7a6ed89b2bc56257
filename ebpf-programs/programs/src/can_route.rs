//! `can_route` at tc (clsact ingress) on CAN and CAN FD netdevs: filters frames like CAN_RAW /
//! can-gw, counts them, drops, routes (clone + redirect, with can-gw style modifications and
//! checksums), or hands them to the agent's UDP tunnel through a ring buffer. Watched IDs get
//! cycle-time and jitter histograms.
//!
//! Two programs: `can_route` matches the frame against the interface's rules and queues the
//! ones that send it somewhere; `can_route_act` sends it for one queued rule and tail-calls
//! itself for the next. The verifier then checks the sending code once, not once per rule.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_skb_load_bytes, bpf_skb_store_bytes},
    macros::{classifier, map},
    maps::{Array, HashMap, PerCpuArray, ProgramArray, RingBuf},
    programs::TcContext,
};
use edgeplane_common::{
    can::{
        CAN_EFF_FLAG, CAN_EFF_MASK, CAN_ERR_FLAG, CAN_MAX_DLEN, CAN_MTU, CAN_RTR_FLAG,
        CANFD_MAX_DLEN, CANFD_MTU, CanCrc8, CanFrame, CanIngress, CanIngressStats, CanRule,
        CanRuleStats, CanTunnelRecord, CanWatch, CanWatchKey, CanXor, DropReason, ETH_P_CAN,
        ETH_P_CANFD, HOP_MARK_SHIFT, MAX_INGRESS, MAX_RULES, MAX_RULES_PER_IFACE,
        MAX_TUNNEL_SOCKETS, MAX_WATCHES, action, crc8_profile, rule_flag,
    },
    hist::{Log2Hist, bucket},
};

#[map]
static CAN_RULES: Array<CanRule> = Array::with_max_entries(MAX_RULES, 0);
#[map]
static CAN_CRC8: Array<[u8; 256]> = Array::with_max_entries(MAX_RULES, 0);
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
/// Per-CPU frame buffers: [0] the frame as received, [1] the modified copy.
#[map]
static CAN_SCRATCH: PerCpuArray<CanFrame> = PerCpuArray::with_max_entries(2, 0);
/// The rules queued for `can_route_act`, per CPU (a tail-call chain stays on its CPU).
#[map]
static CAN_PENDING: PerCpuArray<Pending> = PerCpuArray::with_max_entries(1, 0);
#[map]
static CAN_TUNNEL_SOCKETS: HashMap<u64, u8> = HashMap::with_max_entries(MAX_TUNNEL_SOCKETS, 0);
/// Slot 0: `can_route_act`, installed by the agent.
#[map]
static CAN_ACT: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// What `can_route_act` needs: the queued rule slots and facts about the frame.
#[repr(C)]
struct Pending {
    slots: [u16; MAX_RULES_PER_IFACE],
    count: u8,
    next: u8,
    fd: u8,
    /// Gateway hops the frame already made.
    hops: u8,
    mark: u32,
    ifindex: u32,
    /// What the chain returns: TC_ACT_SHOT when a drop rule matched.
    verdict: i32,
    now: u64,
}

#[classifier]
pub fn can_route(ctx: TcContext) -> i32 {
    try_can_route(&ctx).unwrap_or(TC_ACT_UNSPEC)
}

fn try_can_route(ctx: &TcContext) -> Option<i32> {
    // SAFETY: the program's own __sk_buff.
    let (ifindex, protocol, mark) = unsafe {
        let skb = &*ctx.skb.skb;
        (skb.ifindex, u16::from_be(skb.protocol as u16), skb.mark)
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

    let pending = CAN_PENDING.get_ptr_mut(0)?;
    let mut queued = 0usize;
    let mut verdict = TC_ACT_UNSPEC;
    for i in 0..MAX_RULES_PER_IFACE {
        if i >= usize::from(ingress.count) {
            break;
        }
        let slot = ingress.rules[i];
        let Some(rule) = CAN_RULES.get(u32::from(slot)) else {
            continue;
        };
        let hit = (can_id ^ rule.filter_id) & rule.filter_mask == 0;
        if hit == (rule.flags & rule_flag::INVERT != 0) {
            continue;
        }
        let Some(stats) = CAN_RULE_STATS.get_ptr_mut(u32::from(slot)) else {
            continue;
        };
        // SAFETY: per-CPU values; `queued` stays below MAX_RULES_PER_IFACE like `i`.
        unsafe {
            (*stats).frames += 1;
            (*stats).bytes += payload;
            match rule.action {
                action::DROP => {
                    verdict = TC_ACT_SHOT;
                    (*stats).dropped[DropReason::Rule as usize] += 1;
                }
                action::ROUTE | action::TUNNEL => {
                    if let Some(s) = (*pending).slots.get_mut(queued) {
                        *s = slot;
                        queued += 1;
                    }
                }
                _ => {}
            }
        }
    }
    if queued == 0 {
        return Some(verdict);
    }
    // SAFETY: per-CPU value, ours until the chain ends.
    unsafe {
        (*pending).count = queued as u8;
        (*pending).next = 0;
        (*pending).fd = u8::from(fd);
        (*pending).hops = (mark >> HOP_MARK_SHIFT) as u8;
        // Written by the tunnel's receiver: it crossed the remote gateway already.
        let cookie = bpf_get_socket_cookie(ctx.skb.skb.cast());
        if cookie != 0 && (*pending).hops == 0 && CAN_TUNNEL_SOCKETS.get(&cookie).is_some() {
            (*pending).hops = 1;
        }
        (*pending).mark = mark;
        (*pending).ifindex = ifindex;
        (*pending).verdict = verdict;
        (*pending).now = now;
        // Only returns when can_route_act is not installed.
        let _ = CAN_ACT.tail_call(ctx, 0);
    }
    Some(verdict)
}

#[classifier]
pub fn can_route_act(ctx: TcContext) -> i32 {
    try_can_route_act(&ctx).unwrap_or(TC_ACT_UNSPEC)
}

fn try_can_route_act(ctx: &TcContext) -> Option<i32> {
    let pending = CAN_PENDING.get_ptr_mut(0)?;
    // SAFETY: per-CPU value filled by can_route on this CPU for this frame.
    let p = unsafe { &mut *pending };
    if p.next >= p.count {
        return Some(p.verdict);
    }
    let slot = u32::from(*p.slots.get(usize::from(p.next))?);
    p.next += 1;
    let info = FrameInfo {
        fd: p.fd != 0,
        hops: p.hops,
        mark: p.mark,
        ifindex: p.ifindex,
        now: p.now,
        slot,
    };
    let rule = CAN_RULES.get(slot)?;
    let outcome = match rule.action {
        action::ROUTE => try_route(ctx, rule, &info),
        action::TUNNEL => try_tunnel(ctx, rule, &info),
        _ => Ok(()),
    };
    if let Some(stats) = CAN_RULE_STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU value; reasons are enum discriminants below COUNT.
        unsafe {
            match outcome {
                Ok(()) => (*stats).routed += 1,
                Err(reason) => {
                    if let Some(c) = (*stats).dropped.get_mut(reason as usize) {
                        *c += 1;
                    }
                }
            }
        }
    }
    if p.next < p.count {
        // SAFETY: tail call into this same program for the next queued rule.
        let _ = unsafe { CAN_ACT.tail_call(ctx, 0) };
    }
    Some(p.verdict)
}

/// What sending needs to know about the frame.
struct FrameInfo {
    fd: bool,
    /// Gateway hops the frame already made.
    hops: u8,
    mark: u32,
    ifindex: u32,
    now: u64,
    /// The matching rule's slot.
    slot: u32,
}

impl FrameInfo {
    /// Bytes of the frame in the skb: `struct can_frame` or `struct canfd_frame`.
    #[inline(always)]
    fn size(&self) -> u32 {
        if self.fd {
            CANFD_MTU as u32
        } else {
            CAN_MTU as u32
        }
    }
}

/// Sends a copy of the frame (modified as the rule says) out of the egress interface.
#[inline(always)]
fn try_route(ctx: &TcContext, rule: &CanRule, f: &FrameInfo) -> Result<(), DropReason> {
    if f.hops >= rule.hops {
        return Err(DropReason::HopLimit);
    }
    if f.fd && rule.flags & rule_flag::EGRESS_FD == 0 {
        return Err(DropReason::FdToClassic);
    }
    let modified = prepare(ctx, rule, f)?;
    if modified {
        store(ctx, 1, f)?;
    }
    let hop_mark = (f.mark & !(0xff << HOP_MARK_SHIFT)) | (u32::from(f.hops) + 1) << HOP_MARK_SHIFT;
    ctx.set_mark(hop_mark);
    let sent = ctx.clone_redirect(rule.egress_ifindex, 0);
    // The original goes on to local sockets as it arrived.
    ctx.set_mark(f.mark);
    if modified {
        store(ctx, 0, f)?;
    }
    sent.map_err(|_| DropReason::RedirectFailed)
}

/// Hands the frame (modified as the rule says) to the agent's tunnel.
#[inline(always)]
fn try_tunnel(ctx: &TcContext, rule: &CanRule, f: &FrameInfo) -> Result<(), DropReason> {
    if f.hops >= rule.hops {
        return Err(DropReason::HopLimit);
    }
    let modified = prepare(ctx, rule, f)?;
    let mut entry = CAN_TUNNEL
        .reserve::<CanTunnelRecord>(0)
        .ok_or(DropReason::TunnelFull)?;
    let rec = entry.as_mut_ptr();
    // SAFETY: the reserved record is ours until submitted or discarded.
    unsafe {
        (*rec).ts_ns = f.now;
        (*rec).tunnel = rule.tunnel;
        (*rec).ifindex = f.ifindex;
        (*rec).fd = u8::from(f.fd);
        (*rec)._pad = [0; 7];
        (*rec).frame = CanFrame::default();
    }
    let copied = if modified {
        match CAN_SCRATCH.get_ptr(1) {
            Some(work) => {
                // SAFETY: per-CPU buffer filled by prepare().
                unsafe { (*rec).frame = *work };
                true
            }
            None => false,
        }
    } else {
        // SAFETY: the record's frame holds a whole canfd_frame; the skb helper writes at most
        // the frame's size into it.
        unsafe {
            let dst = core::ptr::addr_of_mut!((*rec).frame);
            bpf_skb_load_bytes(ctx.skb.skb.cast(), 0, dst.cast(), f.size()) == 0
        }
    };
    if !copied {
        entry.discard(0);
        return Err(DropReason::TunnelFull);
    }
    entry.submit(0);
    Ok(())
}

/// Applies the rule's modifications and checksums to a copy of the frame in scratch buffer 1,
/// keeping the original in buffer 0. Returns whether there was anything to do.
#[inline(always)]
fn prepare(ctx: &TcContext, rule: &CanRule, f: &FrameInfo) -> Result<bool, DropReason> {
    if rule.flags & (rule_flag::MODIFY | rule_flag::XOR | rule_flag::CRC8) == 0 {
        return Ok(false);
    }
    let orig = CAN_SCRATCH.get_ptr_mut(0).ok_or(DropReason::BadLength)?;
    let work = CAN_SCRATCH.get_ptr_mut(1).ok_or(DropReason::BadLength)?;
    // SAFETY: per-CPU buffers; lengths are the constant frame sizes.
    unsafe {
        *orig = CanFrame::default();
        if bpf_skb_load_bytes(ctx.skb.skb.cast(), 0, orig.cast(), f.size()) != 0 {
            return Err(DropReason::BadLength);
        }
        *work = *orig;
        let w = &mut *work;
        if rule.flags & rule_flag::MODIFY != 0 {
            let m = &rule.modify;
            w.can_id = ((((w.can_id & m.id.and) | m.id.or) ^ m.id.xor) & !m.id.set_mask) | m.id.set;
            w.len = ((((w.len & m.len.and) | m.len.or) ^ m.len.xor) & !m.len.set_mask) | m.len.set;
            w.flags = ((((w.flags & m.flags.and) | m.flags.or) ^ m.flags.xor) & !m.flags.set_mask)
                | m.flags.set;
            let words: *mut [u32; 16] = core::ptr::addr_of_mut!(w.data).cast();
            for i in 0..16 {
                let d = (*words)[i];
                (*words)[i] = ((((d & m.data.and[i]) | m.data.or[i]) ^ m.data.xor[i])
                    & !m.data.set_mask[i])
                    | m.data.set[i];
            }
        }
        let max = if f.fd { CANFD_MAX_DLEN } else { CAN_MAX_DLEN };
        if w.len > max {
            return Err(DropReason::BadLength);
        }
        if rule.flags & rule_flag::CRC8 != 0 {
            if let Some(table) = CAN_CRC8.get(f.slot) {
                crc8(w, &rule.crc8, table);
            }
        }
        if rule.flags & rule_flag::XOR != 0 {
            xor(w, &rule.xor);
        }
    }
    Ok(true)
}

/// Writes scratch buffer `which` over the frame in the skb.
#[inline(always)]
fn store(ctx: &TcContext, which: u32, f: &FrameInfo) -> Result<(), DropReason> {
    let buf = CAN_SCRATCH.get_ptr(which).ok_or(DropReason::BadLength)?;
    // SAFETY: the buffer holds a whole canfd_frame.
    let rc = unsafe { bpf_skb_store_bytes(ctx.skb.skb.cast(), 0, buf.cast(), f.size(), 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(DropReason::RedirectFailed)
    }
}

/// can-gw's index rule: negative counts back from the length. Branch-free: `(index, ok)`.
#[inline(always)]
fn index(i: i8, len: u8) -> (i64, bool) {
    let i = i64::from(i);
    let len = i64::from(len);
    let v = i + ((i >> 63) & len);
    // Inside the data: 0 <= v < len (len is at most 64).
    (v, (v | (len - 1 - v)) >= 0)
}

/// The three indexes of a checksum, or None when one falls outside the frame's data (can-gw
/// then leaves the frame alone). One branch for all three keeps the verifier's paths few.
#[inline(always)]
fn indexes(from: i8, to: i8, result: i8, len: u8) -> Option<(i64, i64, usize)> {
    let (f, f_ok) = index(from, len);
    let (t, t_ok) = index(to, len);
    let (r, r_ok) = index(result, len);
    if !(f_ok & t_ok & r_ok) {
        return None;
    }
    Some((f & 63, t & 63, (r & 63) as usize))
}

/// 0xff when step `k` is within `0..=n`, else 0, without a branch: every loop below runs a
/// fixed 64 steps with masks, so the verifier walks each step once instead of every path
/// through data-dependent exits.
#[inline(always)]
fn within(k: i64, n: i64) -> u8 {
    !((((n - k) | k) >> 63) as u8)
}

#[inline(always)]
fn xor(w: &mut CanFrame, x: &CanXor) {
    let Some((from, to, res)) = indexes(x.from, x.to, x.result, w.len) else {
        return;
    };
    // XOR does not care about direction.
    let lo = from.min(to);
    let n = (from - to).abs();
    let mut val = x.init;
    for k in 0..64i64 {
        let m = within(k, n);
        val ^= w.data[((lo + k) & 63) as usize] & m;
    }
    w.data[res & 63] = val;
}

#[inline(always)]
fn crc8(w: &mut CanFrame, c: &CanCrc8, table: &[u8; 256]) {
    let Some((from, to, res)) = indexes(c.from, c.to, c.result, w.len) else {
        return;
    };
    // CRC runs in order: from `from` towards `to`, either way.
    let n = (from - to).abs();
    let dir = if from <= to { 1 } else { -1 };
    let mut crc = c.init;
    for k in 0..64i64 {
        let m = within(k, n);
        let i = ((from + k * dir) & 63) as usize;
        let next = table[usize::from(crc ^ w.data[i])];
        crc = (next & m) | (crc & !m);
    }
    crc = match c.profile {
        crc8_profile::ONE_U8 => table[usize::from(crc ^ c.profile_data[0])],
        crc8_profile::SIXTEEN_U8 => {
            table[usize::from(crc ^ c.profile_data[usize::from(w.data[1] & 0xf)])]
        }
        crc8_profile::SFF_ID_XOR => {
            table[usize::from(crc ^ (w.can_id as u8) ^ ((w.can_id >> 8) as u8))]
        }
        _ => crc,
    };
    w.data[res & 63] = crc ^ c.final_xor;
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

#[inline(always)]
unsafe fn record(h: *mut Log2Hist, ns: u64) {
    // SAFETY: `h` points into a live map value.
    unsafe {
        // LLVM turns bucket()'s clamp into arithmetic the verifier can't bound; a volatile
        // read hides the value from LLVM, so the check below stays for the verifier to see.
        let k = core::ptr::read_volatile(&bucket(ns));
        if let Some(b) = (*h).buckets.get_mut(k) {
            add(b, 1);
        }
        add(&raw mut (*h).sum_ns, ns);
        add(&raw mut (*h).count, 1);
    }
}

#[inline(always)]
unsafe fn add(p: *mut u64, v: u64) {
    // SAFETY: an aligned u64 in a map value. The result is unused, which compiles to the
    // atomic add (BPF_XADD) every kernel since 4.x supports; the BPF target has no AtomicU64.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, v) };
}
