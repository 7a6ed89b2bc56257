//! `udp_forward` at XDP: rewrites in place and redirects through the devmap.
//!
//! XDP sees raw frames without checksum metadata, so checksums are updated in software. It
//! expects complete checksums, as frames from NICs carry (a veth sender with TX checksum
//! offload leaves a partial one: use the tc attach point there).

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

use edgeplane_common::latency::FlowKey;

use crate::{
    csum, latency,
    net::ptr_at,
    udp_forward::{self, Action, Frame, UDP_EGRESS},
};

#[xdp]
pub fn udp_forward_xdp(ctx: XdpContext) -> u32 {
    match udp_forward::forward(&mut XdpFrame(ctx)) {
        Action::Pass => xdp_action::XDP_PASS,
        Action::Redirect => xdp_action::XDP_REDIRECT,
    }
}

pub struct XdpFrame(pub XdpContext);

impl XdpFrame {
    #[inline(always)]
    fn word(&mut self, offset: usize) -> Option<*mut u16> {
        ptr_at(self.0.data(), self.0.data_end(), offset)
    }
}

impl Frame for XdpFrame {
    type Ctx = XdpContext;
    const FIB_CHECKS_IP_LEN: bool = true;
    const NEEDS_DEVMAP: bool = true;

    fn context(&self) -> &XdpContext {
        &self.0
    }
    fn data(&self) -> usize {
        self.0.data()
    }
    fn data_end(&self) -> usize {
        self.0.data_end()
    }
    fn ifindex(&self) -> u32 {
        self.0.ingress_ifindex() as u32
    }
    fn len(&self) -> u64 {
        (self.0.data_end() - self.0.data()) as u64
    }
    fn segments(&self) -> u32 {
        // Programs are loaded without XDP fragments: a frame is one datagram.
        1
    }

    #[inline(always)]
    fn store<const N: usize>(
        &mut self,
        offset: usize,
        words: &[u16; N],
        _addr: bool,
    ) -> Option<()> {
        let p: *mut [u16; N] = ptr_at(self.0.data(), self.0.data_end(), offset)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe { *p = *words };
        Some(())
    }

    #[inline(always)]
    fn store_macs(&mut self, macs: &[u8; 12]) -> Option<()> {
        let p: *mut [u8; 12] = ptr_at(self.0.data(), self.0.data_end(), 0)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe { *p = *macs };
        Some(())
    }

    #[inline(always)]
    fn l3_csum(&mut self, offset: usize, diff: u32) -> Option<()> {
        let p = self.word(offset)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe { *p = csum::apply(*p, diff) };
        Some(())
    }

    #[inline(always)]
    fn l4_csum(
        &mut self,
        offset: usize,
        diff: u32,
        _pseudo: bool,
        zero_is_none: bool,
    ) -> Option<()> {
        let p = self.word(offset)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            if zero_is_none && *p == 0 {
                return Some(());
            }
            let new = csum::apply(*p, diff);
            // A computed 0 is sent as 0xffff: on the wire 0 means "no checksum".
            *p = if new == 0 { 0xffff } else { new };
        }
        Some(())
    }

    #[inline(always)]
    fn redirect(&self, ifindex: u32) -> bool {
        UDP_EGRESS.redirect(ifindex, 0).is_ok()
    }

    fn rx_tstamp(&self) -> u64 {
        0
    }

    #[inline(always)]
    fn hand_off(
        &self,
        _start_ns: u64,
        hook_ns: u64,
        slot: u32,
        egress: u32,
    ) -> Option<*mut FlowKey> {
        latency::pending_xdp(egress, hook_ns, slot)
    }
}
