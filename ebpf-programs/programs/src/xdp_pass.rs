//! `xdp_pass`: passes every frame. Attached to the far end of a veth, it gives that end the
//! NAPI context XDP redirects into the veth need (kernels before 5.13 offer no other way).

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}
