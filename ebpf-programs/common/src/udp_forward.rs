//! The UDP forwarder's maps: rules keyed by what they match, per-ingress settings and counters.

/// Largest number of forwarding rules (stats slots `0..MAX_RULES`).
pub const MAX_RULES: u32 = 4096;
/// Largest number of ingress interfaces (stats slots `MAX_RULES..MAX_RULES + MAX_INGRESS`).
pub const MAX_INGRESS: u32 = 256;

/// Map names, as the programs declare them. Each family has its own rule map, whose entries a
/// rule takes at most one of (`MAX_RULES` each); the IPv6 map keeps the name both shared once,
/// so its pin carries over.
pub const RULES_MAP: &str = "UDP_RULES";
pub const RULES_V4_MAP: &str = "UDP_RULES_V4";
pub const INGRESS_MAP: &str = "UDP_INGRESS";
pub const STATS_MAP: &str = "UDP_STATS";
pub const EGRESS_MAP: &str = "UDP_EGRESS";

/// Program names, as the programs declare them.
pub const XDP_PROGRAM: &str = "udp_forward_xdp";
pub const TC_PROGRAM: &str = "udp_forward_tc";
/// The benchmark's reference program (see `udp_forward_limit.rs`): never attached by the agent.
pub const LIMIT_PROGRAM: &str = "udp_forward_limit";
/// The global the limit program reads its one rewrite from, set at load time.
pub const LIMIT_REWRITE_GLOBAL: &str = "UDP_FORWARD_LIMIT_REWRITE";

/// Address family of a rule key: the packet's, never "any" (userspace expands those).
pub const FAMILY_IPV4: u8 = 4;
pub const FAMILY_IPV6: u8 = 6;

/// Which header fields a rule matches on, one bit each. A rule's set of fields is its "shape".
pub mod field {
    // Bit order sets the tie-break in SHAPE_ORDER: higher bits win among equally specific shapes.
    pub const SRC_PORT: u8 = 1 << 0;
    pub const DST_PORT: u8 = 1 << 1;
    pub const SRC_IP: u8 = 1 << 2;
    pub const DST_IP: u8 = 1 << 3;
    /// Number of distinct shapes (every subset of the four fields).
    pub const SHAPES: usize = 16;
}

/// The order in which the program tries shapes: more fields first, so the most specific rule
/// wins; among equally specific shapes, addresses before ports and destination before source.
pub const SHAPE_ORDER: [u8; field::SHAPES] = shape_order();

const fn shape_order() -> [u8; field::SHAPES] {
    let mut order = [0u8; field::SHAPES];
    let mut n = 0;
    let mut bits = 5u32;
    while bits > 0 {
        bits -= 1;
        // Highest value first within a popcount: DST_IP > SRC_IP > DST_PORT > SRC_PORT.
        let mut shape = field::SHAPES;
        while shape > 0 {
            shape -= 1;
            if (shape as u8).count_ones() == bits {
                order[n] = shape as u8;
                n += 1;
            }
        }
    }
    order
}

/// An address's bytes as the 16-bit words the program loads from the packet: the IP header sits
/// 2-byte aligned behind Ethernet, and checksums are sums of 16-bit words.
pub fn ip_words(octets: &[u8]) -> [u16; 8] {
    let mut words = [0u16; 8];
    let mut i = 0;
    while i + 1 < octets.len() && i < 16 {
        words[i / 2] = u16::from_ne_bytes([octets[i], octets[i + 1]]);
        i += 2;
    }
    words
}

/// Rule map key. Fields not in `fields` are zero, so a packet's key for a shape is built by
/// copying only that shape's fields.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UdpMatchKey {
    pub ifindex: u32,
    /// Bitset of [`field`] values.
    pub fields: u8,
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
    pub _pad: [u8; 2],
    /// Ports in network byte order.
    pub src_port: u16,
    pub dst_port: u16,
    /// Addresses as 16-bit words loaded from the wire (see [`ip_words`]); IPv4 uses the first
    /// two words, the rest are zero.
    pub src_ip: [u16; 8],
    pub dst_ip: [u16; 8],
}
crate::assert_size!(UdpMatchKey, 44);

/// IPv4 rule map key: a [`UdpMatchKey`] of family [`FAMILY_IPV4`] without the family (the map
/// says it) and the unused address words. 20 bytes instead of 44: the kernel's hash takes two
/// 12-byte rounds over it instead of four, and the compare is shorter.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UdpMatchKeyV4 {
    pub ifindex: u32,
    /// As in [`UdpMatchKey`]: the words loaded from the wire, zero when not in `fields`.
    pub src_ip: [u16; 2],
    pub dst_ip: [u16; 2],
    pub src_port: u16,
    pub dst_port: u16,
    pub fields: u8,
    pub _pad: [u8; 3],
}
crate::assert_size!(UdpMatchKeyV4, 20);

impl UdpMatchKeyV4 {
    /// `key` in the IPv4 map's form; `None` for an IPv6 key.
    pub fn from_key(key: &UdpMatchKey) -> Option<Self> {
        (key.family == FAMILY_IPV4).then_some(Self {
            ifindex: key.ifindex,
            src_ip: [key.src_ip[0], key.src_ip[1]],
            dst_ip: [key.dst_ip[0], key.dst_ip[1]],
            src_port: key.src_port,
            dst_port: key.dst_port,
            fields: key.fields,
            _pad: [0; 3],
        })
    }

    /// The family-neutral key this one stands for.
    pub fn to_key(&self) -> UdpMatchKey {
        let mut src_ip = [0u16; 8];
        let mut dst_ip = [0u16; 8];
        src_ip[..2].copy_from_slice(&self.src_ip);
        dst_ip[..2].copy_from_slice(&self.dst_ip);
        UdpMatchKey {
            ifindex: self.ifindex,
            fields: self.fields,
            family: FAMILY_IPV4,
            _pad: [0; 2],
            src_port: self.src_port,
            dst_port: self.dst_port,
            src_ip,
            dst_ip,
        }
    }
}

/// What to rewrite: bits of [`UdpForwardAction::rewrite`].
pub mod rewrite {
    pub const DST_IP: u8 = 1 << 0;
    pub const DST_PORT: u8 = 1 << 1;
    pub const SRC_IP: u8 = 1 << 2;
    pub const SRC_PORT: u8 = 1 << 3;
}

/// Rule map value: the rule's stats slot and its rewrite.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpForwardAction {
    /// Index into the stats map.
    pub slot: u32,
    /// Interface the rewritten packet must leave by (also the FIB lookup's output device).
    pub egress_ifindex: u32,
    /// Bitset of [`rewrite`] values.
    pub rewrite: u8,
    pub _pad: [u8; 3],
    /// Network byte order.
    pub src_port: u16,
    pub dst_port: u16,
    /// As in [`UdpMatchKey`]; IPv4 uses the first two words.
    pub src_ip: [u16; 8],
    pub dst_ip: [u16; 8],
}
crate::assert_size!(UdpForwardAction, 48);

/// The limit program's fixed rewrite of every IPv4/UDP frame: destination address and port,
/// MACs, egress. A global of the object, not a map value: the program looks nothing up.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LimitRewrite {
    /// As in [`UdpMatchKey`] (see [`ip_words`]).
    pub dst_ip: [u16; 2],
    /// Network byte order.
    pub dst_port: u16,
    pub _pad: u16,
    pub egress_ifindex: u32,
    /// Destination MAC, then source MAC, as the Ethernet header holds them.
    pub macs: [u8; 12],
}
crate::assert_size!(LimitRewrite, 24);

impl LimitRewrite {
    /// To `dst`:`dst_port` (host order) out of `egress_ifindex`, from `egress_mac` to
    /// `next_hop_mac`: what a rule's rewrite and its FIB lookup would do.
    pub fn new(
        dst: [u8; 4],
        dst_port: u16,
        egress_ifindex: u32,
        next_hop_mac: [u8; 6],
        egress_mac: [u8; 6],
    ) -> Self {
        let ip = ip_words(&dst);
        let mut macs = [0u8; 12];
        macs[..6].copy_from_slice(&next_hop_mac);
        macs[6..].copy_from_slice(&egress_mac);
        Self {
            dst_ip: [ip[0], ip[1]],
            dst_port: dst_port.to_be(),
            _pad: 0,
            egress_ifindex,
            macs,
        }
    }
}

/// Per-ingress settings, keyed by ifindex.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpIngress {
    /// Bit `s` set when some rule on this interface has shape `s`; the program looks up only those.
    pub shapes: u16,
    pub _pad: u16,
    /// Stats slot for packets no rule accounts for.
    pub slot: u32,
}
crate::assert_size!(UdpIngress, 8);

/// Why a packet went to the network stack instead of being forwarded.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PassReason {
    /// Not an IPv4/IPv6 UDP frame we parse (ARP, TCP, VLAN-tagged, ...). Counted per ingress.
    NotUdp = 0,
    /// Shorter than its headers claim. Counted per ingress.
    Truncated,
    /// An IP fragment: ports are not in every fragment. Counted per ingress.
    Fragment,
    /// IPv4 options or IPv6 extension headers. Counted per ingress.
    IpOptions,
    /// UDP, but no rule matched. Counted per ingress.
    NoRule,
    /// IPv6 UDP with checksum 0, which IPv6 forbids.
    ZeroChecksum,
    /// TTL / hop limit would reach zero: the stack sends the ICMP error.
    TtlExceeded,
    /// No route to the rewritten destination through the rule's egress interface.
    NoRoute,
    /// IP forwarding is disabled on the interface (sysctl net.ipv4.ip_forward / ipv6 forwarding).
    ForwardingDisabled,
    /// Next hop's MAC unknown: the stack resolves it with ARP/ND.
    NoNeighbour,
    /// Larger than the egress MTU: the stack fragments or sends "packet too big".
    TooBig,
    /// The egress interface is not in the redirect map (gone or not yet added).
    NoEgress,
}

impl PassReason {
    pub const COUNT: usize = 12;
    pub const ALL: [Self; Self::COUNT] = [
        Self::NotUdp,
        Self::Truncated,
        Self::Fragment,
        Self::IpOptions,
        Self::NoRule,
        Self::ZeroChecksum,
        Self::TtlExceeded,
        Self::NoRoute,
        Self::ForwardingDisabled,
        Self::NoNeighbour,
        Self::TooBig,
        Self::NoEgress,
    ];

    /// Metric label value.
    pub const fn label(self) -> &'static str {
        match self {
            Self::NotUdp => "not_udp",
            Self::Truncated => "truncated",
            Self::Fragment => "fragment",
            Self::IpOptions => "ip_options",
            Self::NoRule => "no_rule",
            Self::ZeroChecksum => "zero_checksum",
            Self::TtlExceeded => "ttl_exceeded",
            Self::NoRoute => "no_route",
            Self::ForwardingDisabled => "forwarding_disabled",
            Self::NoNeighbour => "no_neighbour",
            Self::TooBig => "too_big",
            Self::NoEgress => "no_egress",
        }
    }

    /// Reasons decided before any rule matched: counted in the ingress interface's slot.
    pub const fn is_ingress(self) -> bool {
        (self as u32) <= (Self::NoRule as u32)
    }
}

/// Counters of one stats slot (a rule, or an ingress interface), per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpStats {
    /// Frames forwarded (redirected to the egress interface).
    pub packets: u64,
    /// Their size in bytes, Ethernet header included, as received.
    pub bytes: u64,
    /// Frames passed to the stack, indexed by [`PassReason`].
    pub passed: [u64; PassReason::COUNT],
}
crate::assert_size!(UdpStats, 16 + 8 * PassReason::COUNT);

crate::pod!(
    UdpMatchKey,
    UdpMatchKeyV4,
    UdpForwardAction,
    UdpIngress,
    UdpStats,
    LimitRewrite
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_order_is_a_permutation_most_specific_first() {
        let mut seen = [false; field::SHAPES];
        for w in SHAPE_ORDER.windows(2) {
            assert!(w[0].count_ones() >= w[1].count_ones());
        }
        for s in SHAPE_ORDER {
            assert!(!seen[s as usize]);
            seen[s as usize] = true;
        }
        assert_eq!(SHAPE_ORDER[0], 0b1111);
        assert_eq!(SHAPE_ORDER[field::SHAPES - 1], 0);
    }

    #[test]
    fn ipv4_keys_convert_both_ways_and_ipv6_keys_stay_out() {
        let key = UdpMatchKey {
            ifindex: 7,
            fields: field::DST_IP | field::SRC_PORT,
            family: FAMILY_IPV4,
            src_port: 4000u16.to_be(),
            dst_ip: ip_words(&[198, 18, 2, 2]),
            ..UdpMatchKey::default()
        };
        let v4 = UdpMatchKeyV4::from_key(&key).unwrap();
        assert_eq!((v4.ifindex, v4.dst_ip), (7, [key.dst_ip[0], key.dst_ip[1]]));
        assert_eq!(v4.to_key(), key);
        let v6 = UdpMatchKey {
            family: FAMILY_IPV6,
            ..key
        };
        assert_eq!(UdpMatchKeyV4::from_key(&v6), None);
    }

    #[test]
    fn reasons_are_indexed_by_discriminant() {
        for (i, r) in PassReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }
}
