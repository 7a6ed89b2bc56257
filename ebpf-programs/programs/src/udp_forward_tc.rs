//! `udp_forward` at tc (clsact ingress): for interfaces without (usable) XDP, such as veth.
//!
//! Writes go through the skb helpers so the kernel keeps the skb's checksum state right
//! (CHECKSUM_PARTIAL from local senders, CHECKSUM_COMPLETE from NICs).

use aya_ebpf::{
    bindings::{
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM, TC_ACT_REDIRECT,
        TC_ACT_UNSPEC,
    },
    helpers::bpf_redirect,
    macros::classifier,
    programs::TcContext,
};

use edgeplane_common::latency::FlowKey;

use crate::{
    latency,
    net::{ETH_HLEN, IPV6_HLEN, UDP_HLEN},
    udp_forward::{self, Action, Frame},
};

#[classifier]
pub fn udp_forward_tc(ctx: TcContext) -> i32 {
    // Headers must be in the linear part for direct reads.
    let want = ctx.len().min((ETH_HLEN + IPV6_HLEN + UDP_HLEN) as u32);
    if ctx.data_end() - ctx.data() < want as usize && ctx.pull_data(want).is_err() {
        return TC_ACT_UNSPEC;
    }
    match udp_forward::forward(&mut TcFrame(ctx)) {
        // UNSPEC: let the next classifier (or the default action) decide.
        Action::Pass => TC_ACT_UNSPEC,
        Action::Redirect => TC_ACT_REDIRECT as i32,
    }
}

struct TcFrame(TcContext);

impl Frame for TcFrame {
    type Ctx = TcContext;
    const FIB_CHECKS_IP_LEN: bool = false;
    const NEEDS_DEVMAP: bool = false;

    fn context(&self) -> &TcContext {
        &self.0
    }
    fn data(&self) -> usize {
        self.0.data()
    }
    fn data_end(&self) -> usize {
        self.0.data_end()
    }
    fn ifindex(&self) -> u32 {
        // SAFETY: the context is the kernel's __sk_buff for this program run.
        unsafe { (*self.0.skb.skb).ifindex }
    }
    fn len(&self) -> u64 {
        u64::from(self.0.len())
    }
    fn segments(&self) -> u32 {
        // SAFETY: the context is the kernel's __sk_buff for this program run.
        unsafe { (*self.0.skb.skb).gso_segs }.max(1)
    }

    #[inline(always)]
    fn store<const N: usize>(&mut self, offset: usize, words: &[u16; N], addr: bool) -> Option<()> {
        // IPv6 addresses have no header checksum to compensate their change, so a
        // CHECKSUM_COMPLETE value must follow it (IPv4 headers change sum-neutrally).
        let flags = if addr {
            u64::from(BPF_F_RECOMPUTE_CSUM)
        } else {
            0
        };
        self.0.store(offset, words, flags).ok()
    }

    #[inline(always)]
    fn store_macs(&mut self, macs: &[u8; 12]) -> Option<()> {
        self.0.store(0, macs, 0).ok()
    }

    #[inline(always)]
    fn l3_csum(&mut self, offset: usize, diff: u32) -> Option<()> {
        // Size 0: `diff` is a precomputed partial sum.
        self.0.l3_csum_replace(offset, 0, u64::from(diff), 0).ok()
    }

    #[inline(always)]
    fn l4_csum(
        &mut self,
        offset: usize,
        diff: u32,
        pseudo: bool,
        zero_is_none: bool,
    ) -> Option<()> {
        let mut flags = 0u64;
        if pseudo {
            flags |= u64::from(BPF_F_PSEUDO_HDR);
        }
        if zero_is_none {
            flags |= u64::from(BPF_F_MARK_MANGLED_0);
        }
        self.0
            .l4_csum_replace(offset, 0, u64::from(diff), flags)
            .ok()
    }

    #[inline(always)]
    fn redirect(&self, ifindex: u32) -> bool {
        // SAFETY: plain helper call; flags 0 = egress of `ifindex`.
        unsafe { bpf_redirect(ifindex, 0) == i64::from(TC_ACT_REDIRECT) }
    }

    #[inline(always)]
    fn rx_tstamp(&self) -> u64 {
        // SAFETY: the program's own __sk_buff.
        unsafe { (*self.0.skb.skb).tstamp }
    }

    #[inline(always)]
    fn hand_off(
        &self,
        start_ns: u64,
        hook_ns: u64,
        slot: u32,
        egress: u32,
    ) -> Option<*mut FlowKey> {
        latency::hand_off_udp(start_ns, hook_ns, slot, egress, self.0.len())
    }
}
