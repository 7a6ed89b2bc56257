//! Wire headers. Addresses are arrays of 16-bit words: Ethernet leaves the IP header only
//! 2-byte aligned, and checksums are computed over 16-bit words anyway.

use core::mem::size_of;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const IPPROTO_UDP: u8 = 17;

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    /// Big-endian EtherType.
    pub proto: u16,
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub saddr: [u16; 2],
    pub daddr: [u16; 2],
}

#[repr(C)]
pub struct Ipv6Hdr {
    pub version_class_flow: [u8; 4],
    pub payload_len: u16,
    pub nexthdr: u8,
    pub hop_limit: u8,
    pub saddr: [u16; 8],
    pub daddr: [u16; 8],
}

#[repr(C)]
pub struct UdpHdr {
    pub source: u16,
    pub dest: u16,
    pub len: u16,
    pub check: u16,
}

pub const ETH_HLEN: usize = size_of::<EthHdr>();
pub const IPV4_HLEN: usize = size_of::<Ipv4Hdr>();
pub const IPV6_HLEN: usize = size_of::<Ipv6Hdr>();
pub const UDP_HLEN: usize = size_of::<UdpHdr>();

const _: () = assert!(ETH_HLEN == 14 && IPV4_HLEN == 20 && IPV6_HLEN == 40 && UDP_HLEN == 8);

/// Offsets of fields the rewrite touches, from the start of their header.
pub const IPV4_TTL_OFF: usize = 8;
pub const IPV4_CHECK_OFF: usize = 10;
pub const IPV4_SADDR_OFF: usize = 12;
pub const IPV4_DADDR_OFF: usize = 16;
pub const IPV6_HOP_LIMIT_OFF: usize = 7;
pub const IPV6_SADDR_OFF: usize = 8;
pub const IPV6_DADDR_OFF: usize = 24;
pub const UDP_SOURCE_OFF: usize = 0;
pub const UDP_DEST_OFF: usize = 2;
pub const UDP_CHECK_OFF: usize = 6;

/// IPv4 flags/fragment offset: "more fragments" and the offset bits.
pub const IPV4_MF_OFFSET_MASK: u16 = 0x3fff;

/// IPv6 next-header values that are extension headers (RFC 8200 §4, plus HIP/shim6).
#[inline(always)]
pub fn is_ipv6_ext_header(nexthdr: u8) -> bool {
    matches!(nexthdr, 0 | 43 | 50 | 51 | 60 | 135 | 139 | 140)
}
pub const IPV6_FRAGMENT: u8 = 44;

/// Returns a pointer to a `T` at `offset` into the packet, or `None` past its end.
#[inline(always)]
pub fn ptr_at<T>(data: usize, data_end: usize, offset: usize) -> Option<*mut T> {
    if data + offset + size_of::<T>() > data_end {
        return None;
    }
    Some((data + offset) as *mut T)
}
