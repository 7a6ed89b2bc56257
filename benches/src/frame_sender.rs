//! The saturating sender: whole Ethernet/IPv4/UDP frames, built once, written with sendmmsg
//! to an AF_PACKET socket on the sender's veth, past the qdisc (PACKET_QDISC_BYPASS).
//!
//! Through a UDP socket each datagram also pays the sender's UDP and IP output, route and
//! neighbour lookups: on this machine one CPU then offered less than one forwarding CPU takes,
//! and the figure was the sender's. The frames are what the socket sent (full IPv4 and UDP
//! checksums, as XDP needs), so every engine sees the same datagrams.

use std::{net::Ipv4Addr, os::fd::FromRawFd as _, os::fd::OwnedFd, time::Instant};

use anyhow::bail;
use edgeplane_testbed::netns::Netns;

use crate::traffic::PAYLOAD;

/// Frames per sendmmsg.
const BATCH: usize = 64;
const ETH: usize = 14;
const IP: usize = 20;
const UDP: usize = 8;
pub const FRAME: usize = ETH + IP + UDP + PAYLOAD;

/// Where the frames go: out of `dev` in the sender's namespace to `dst_mac`, `dst`:`dst_port`.
#[derive(Debug, Clone, Copy)]
pub struct Flow<'a> {
    pub dev: &'a str,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub src_port: u16,
    pub dst_port: u16,
}

/// An IPv4/UDP frame with correct checksums.
pub fn frame(f: &Flow) -> [u8; FRAME] {
    let mut b = [0u8; FRAME];
    b[0..6].copy_from_slice(&f.dst_mac);
    b[6..12].copy_from_slice(&f.src_mac);
    b[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut b[ETH..ETH + IP];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((IP + UDP + PAYLOAD) as u16).to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64; // TTL
    ip[9] = 17; // UDP
    ip[12..16].copy_from_slice(&f.src.octets());
    ip[16..20].copy_from_slice(&f.dst.octets());
    let sum = checksum(0, ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let udp_len = (UDP + PAYLOAD) as u16;
    {
        let udp = &mut b[ETH + IP..];
        udp[0..2].copy_from_slice(&f.src_port.to_be_bytes());
        udp[2..4].copy_from_slice(&f.dst_port.to_be_bytes());
        udp[4..6].copy_from_slice(&udp_len.to_be_bytes());
        udp[UDP..].fill(0x5a);
    }
    // The pseudo header: addresses, protocol, UDP length.
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&f.src.octets());
    pseudo[4..8].copy_from_slice(&f.dst.octets());
    pseudo[9] = 17;
    pseudo[10..12].copy_from_slice(&udp_len.to_be_bytes());
    let mut sum = checksum(sum32(0, &pseudo), &b[ETH + IP..]);
    if sum == 0 {
        sum = 0xffff; // 0 means "no checksum" in UDP over IPv4
    }
    b[ETH + IP + 6..ETH + IP + 8].copy_from_slice(&sum.to_be_bytes());
    b
}

fn sum32(mut acc: u32, data: &[u8]) -> u32 {
    for pair in data.chunks(2) {
        let hi = u32::from(pair[0]) << 8;
        acc += hi | pair.get(1).map_or(0, |&lo| u32::from(lo));
    }
    acc
}

/// The Internet checksum of `data`, continuing the partial sum `acc`.
fn checksum(acc: u32, data: &[u8]) -> u16 {
    let mut s = sum32(acc, data);
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// What one sending thread did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Sent {
    /// Frames the device took.
    pub sent: u64,
    /// Frames refused with ENOBUFS (the peer veth's ring was full: dropped).
    pub enobufs: u64,
    /// sendmmsg calls failed otherwise.
    pub other_errors: u64,
}

/// Sends the flow's frame until `limit` frames or `deadline`.
pub fn send(ns: &Netns, flow: &Flow, deadline: Instant, limit: u64) -> anyhow::Result<Sent> {
    let _in = ns.enter()?;
    let ifindex = ns.ifindex(flow.dev)?;
    let sock = packet_socket(ifindex)?;
    let frame = frame(flow);
    // SAFETY: all-zero is valid for these C structs; the pointers are set below.
    let mut iov: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
    let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    for i in 0..BATCH {
        iov[i] = libc::iovec {
            iov_base: frame.as_ptr().cast_mut().cast(),
            iov_len: FRAME,
        };
        msgs[i].msg_hdr.msg_iov = &raw mut iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    let mut out = Sent::default();
    while out.sent + out.enobufs < limit && Instant::now() < deadline {
        // SAFETY: BATCH headers pointing at the frame; the socket is bound to the device.
        let n = unsafe {
            libc::sendmmsg(
                std::os::fd::AsRawFd::as_raw_fd(&sock),
                msgs.as_mut_ptr(),
                BATCH as u32,
                0,
            )
        };
        if n > 0 {
            out.sent += n as u64;
        } else if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOBUFS) {
            // With the qdisc bypassed, the frame the veth dropped comes back as this error.
            out.enobufs += 1;
        } else {
            out.other_errors += 1;
        }
    }
    Ok(out)
}

/// An AF_PACKET socket that only sends, bound to `ifindex`, past the qdisc.
fn packet_socket(ifindex: u32) -> anyhow::Result<OwnedFd> {
    // SAFETY: socket has no memory-safety preconditions. Protocol 0: it receives nothing.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: a socket we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // SAFETY: an int option of the size given.
    if unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as u32,
        )
    } != 0
    {
        bail!("PACKET_QDISC_BYPASS: {}", std::io::Error::last_os_error());
    }
    // SAFETY: all-zero is a valid sockaddr_ll.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: a sockaddr_ll of the size given.
    if unsafe {
        libc::bind(
            fd,
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_ll>() as u32,
        )
    } != 0
    {
        bail!(
            "binding the AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(sock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_verify_to_zero() {
        let f = Flow {
            dev: "s0",
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            src: Ipv4Addr::new(198, 18, 1, 2),
            dst: Ipv4Addr::new(198, 18, 1, 1),
            src_port: 40000,
            dst_port: 5000,
        };
        let b = frame(&f);
        // A header with its checksum in sums to 0xffff: its checksum over all is 0.
        assert_eq!(checksum(0, &b[ETH..ETH + IP]), 0);
        let mut pseudo = [0u8; 12];
        pseudo[0..4].copy_from_slice(&f.src.octets());
        pseudo[4..8].copy_from_slice(&f.dst.octets());
        pseudo[9] = 17;
        pseudo[10..12].copy_from_slice(&((UDP + PAYLOAD) as u16).to_be_bytes());
        assert_eq!(checksum(sum32(0, &pseudo), &b[ETH + IP..]), 0);
        assert_eq!(b.len(), 106);
    }
}
