//! `udp_forward_limit`: the benchmark's reference, not a product feature. The agent never
//! attaches it.
//!
//! It does what every forwarded IPv4/UDP frame must cost at XDP and nothing else: the same
//! parse and bounds checks as `udp_forward`, then one fixed rewrite (destination address and
//! port with incremental IPv4 and UDP checksum updates, TTL decrement, MACs) and a redirect.
//! No map is looked up: the rewrite is a global set at load time ([`LimitRewrite`]) and the
//! redirect goes straight to its ifindex. `cargo xtask bench` reports `udp_forward`'s time as
//! a ratio to this program's, measured in the same run.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_redirect, macros::xdp, programs::XdpContext};
use edgeplane_common::udp_forward::{LimitRewrite, UdpForwardAction, rewrite};

use crate::{
    net::{ETH_P_IP, EthHdr, ptr_at},
    udp_forward::{Frame, decrement_ttl, parse_ipv4, rewrite_addresses},
    udp_forward_xdp::XdpFrame,
};

/// Set by the loader (aya's `EbpfLoader::override_global`); all zero means "not configured".
#[unsafe(no_mangle)]
static UDP_FORWARD_LIMIT_REWRITE: LimitRewrite = LimitRewrite {
    dst_ip: [0; 2],
    dst_port: 0,
    _pad: 0,
    egress_ifindex: 0,
    macs: [0; 12],
};

#[xdp]
pub fn udp_forward_limit(ctx: XdpContext) -> u32 {
    match rewrite_frame(&mut XdpFrame(ctx)) {
        // SAFETY: plain helper call; it returns XDP_REDIRECT, or XDP_ABORTED for bad flags.
        Some(ifindex) => unsafe { bpf_redirect(ifindex, 0) as u32 },
        None => xdp_action::XDP_PASS,
    }
}

/// Rewrites an IPv4/UDP frame in place; returns the egress ifindex, `None` for the stack.
#[inline(always)]
fn rewrite_frame(f: &mut XdpFrame) -> Option<u32> {
    let (data, end, len) = (f.data(), f.data_end(), f.len());
    let eth: *const EthHdr = ptr_at(data, end, 0)?;
    // SAFETY: bounds checked by ptr_at.
    if u16::from_be(unsafe { (*eth).proto }) != ETH_P_IP {
        return None;
    }
    let packet = parse_ipv4(data, end, len).ok()?;
    if packet.ttl <= 1 {
        return None;
    }
    // SAFETY: a global of the object's read-only data; volatile, so LLVM does not fold the
    // compile-time zeros in.
    let r = unsafe { core::ptr::read_volatile(&UDP_FORWARD_LIMIT_REWRITE) };
    if r.egress_ifindex == 0 {
        return None;
    }
    let action = UdpForwardAction {
        rewrite: rewrite::DST_IP | rewrite::DST_PORT,
        dst_port: r.dst_port,
        dst_ip: [r.dst_ip[0], r.dst_ip[1], 0, 0, 0, 0, 0, 0],
        egress_ifindex: r.egress_ifindex,
        ..UdpForwardAction::default()
    };
    rewrite_addresses(f, &packet, &action)?;
    decrement_ttl(f, &packet)?;
    f.store_macs(&r.macs)?;
    Some(r.egress_ifindex)
}
