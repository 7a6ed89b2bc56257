//! Frames as an interface receives them (an `AF_PACKET` socket), with the kernel's checksum
//! state, so a test can check the checksums of forwarded frames whatever offload they carry.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::Duration,
};

use anyhow::Context as _;
use edgeplane_testbed::netns::Netns;

/// One received frame.
pub struct Captured {
    pub frame: Vec<u8>,
    /// `CHECKSUM_PARTIAL`: the L4 checksum field holds the pseudo-header sum that a NIC (or
    /// the stack's segmentation) completes; see [`complete_l4_checksum`].
    pub checksum_partial: bool,
}

/// A raw socket receiving every frame of one interface.
pub struct Capture {
    fd: OwnedFd,
}

impl Capture {
    /// Starts capturing on `iface` in `ns`; frames arriving before this are not seen.
    pub fn open(ns: &Netns, iface: &str) -> anyhow::Result<Self> {
        let ifindex = ns.ifindex(iface)?;
        let _in = ns.enter()?;
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2).
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        if raw < 0 {
            return Err(io::Error::last_os_error()).context("AF_PACKET socket");
        }
        // SAFETY: a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let on: libc::c_int = 1;
        setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_AUXDATA, &on)?;
        let size: libc::c_int = 64 << 20;
        setsockopt(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &size)?;
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = ifindex as i32;
        // SAFETY: addr is a valid sockaddr_ll of the size passed.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error()).context(format!("binding to {iface}"));
        }
        Ok(Self { fd })
    }

    /// The frames received so far and until `quiet` passes without one.
    pub fn collect(&self, quiet: Duration) -> anyhow::Result<Vec<Captured>> {
        let tv = libc::timeval {
            tv_sec: quiet.as_secs() as libc::time_t,
            tv_usec: quiet.subsec_micros() as libc::suseconds_t,
        };
        setsockopt(&self.fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv)?;
        let mut frames = Vec::new();
        // A GSO frame is captured whole, before segmentation.
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let mut control = [0u64; 16];
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // SAFETY: all-zero is a valid msghdr; the pointers set below outlive the call.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = &raw mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = size_of_val(&control);
            // SAFETY: msg describes valid buffers.
            let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &raw mut msg, libc::MSG_TRUNC) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    return Ok(frames);
                }
                return Err(e).context("recvmsg on the capture socket");
            }
            let len = n as usize;
            anyhow::ensure!(
                len <= buf.len(),
                "captured a {len}-byte frame, more than 64 KiB"
            );
            frames.push(Captured {
                frame: buf[..len].to_vec(),
                checksum_partial: aux_status(&msg) & libc::TP_STATUS_CSUMNOTREADY != 0,
            });
        }
    }
}

/// `tp_status` of the PACKET_AUXDATA control message, 0 without one.
fn aux_status(msg: &libc::msghdr) -> u32 {
    // SAFETY: the CMSG macros walk the control buffer recvmsg filled in, within its length.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_PACKET && (*c).cmsg_type == libc::PACKET_AUXDATA {
                let aux: libc::tpacket_auxdata =
                    std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                return aux.tp_status;
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    0
}

fn setsockopt<T>(fd: &OwnedFd, level: i32, name: i32, value: &T) -> anyhow::Result<()> {
    // SAFETY: value is a valid T of the size passed.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(value).cast(),
            size_of::<T>() as u32,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error()).context(format!("setsockopt {level}/{name}"));
    }
    Ok(())
}

/// Does what a NIC does to a `CHECKSUM_PARTIAL` frame: sums the L4 header and payload, whose
/// checksum field holds the pseudo-header sum, and stores the complement. The frame then has
/// a valid checksum exactly when that pseudo-header sum was right for its (rewritten) addresses
/// and length. `l4` is the UDP header's offset.
pub fn complete_l4_checksum(frame: &mut [u8], l4: usize, check_offset: usize) {
    let mut sum: u32 = 0;
    for chunk in frame[l4..].chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let mut check = !(sum as u16);
    // UDP over IPv4 sends a computed 0 as 0xffff (0 means "no checksum").
    if check == 0 {
        check = 0xffff;
    }
    frame[l4 + check_offset..l4 + check_offset + 2].copy_from_slice(&check.to_be_bytes());
}
