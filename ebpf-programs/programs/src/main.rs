//! edgeplane's eBPF object: one file per attach point over shared forwarding logic.
#![no_std]
#![no_main]
// Atomic adds on map values: the BPF target's core has no AtomicU64.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod atomic_hist;
mod can_route;
mod csum;
mod delivery;
mod latency;
mod latency_egress;
mod latency_xdp_flush;
mod net;
mod udp_forward;
mod udp_forward_limit;
mod udp_forward_tc;
mod udp_forward_xdp;
mod verifier;
mod xdp_pass;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Never reached: the verifier rejects programs with a path into this loop.
    loop {}
}

// GPL-compatible: bpf_fib_lookup and the ring buffer helpers are GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
