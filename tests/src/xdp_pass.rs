//! The agent's own `xdp_pass` program on a test veth: XDP redirects into a veth reach its peer
//! only when the peer runs XDP (or, from 5.13, has GRO on).

use anyhow::Context as _;
use edgeplane_common::XDP_PASS_PROGRAM;
use edgeplane_testbed::netns::Netns;

/// Attaches `xdp_pass` to `iface` in `ns`; the link lives as long as the returned object.
pub fn attach(ns: &Netns, iface: &str) -> anyhow::Result<aya::Ebpf> {
    let _in = ns.enter()?;
    let mut ebpf = edgeplane::kernel::loader::load(&[XDP_PASS_PROGRAM])?;
    let p: &mut aya::programs::Xdp = ebpf
        .program_mut(XDP_PASS_PROGRAM)
        .context("xdp_pass missing from the eBPF object")?
        .try_into()?;
    p.attach(iface, aya::programs::XdpMode::Driver)?;
    Ok(ebpf)
}
