//! The UDP forwarder, shared by the XDP and tc attach points: parse, match, route, rewrite.
//!
//! Frames the forwarder does not fully understand go to the stack untouched and are counted by
//! reason. When the kernel's slow path must finish the job (next hop's MAC unknown, frame larger
//! than the egress MTU) the frame goes to the stack already rewritten, so the stack routes it to
//! the new destination and resolves the neighbour or fragments it.

use core::mem::size_of;

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_OUTPUT, bpf_fib_lookup as FibParams,
    },
    helpers::{bpf_fib_lookup, bpf_ktime_get_ns},
    macros::map,
    maps::{DevMapHash, HashMap, PerCpuArray},
};
use aya_log_ebpf::debug;
use edgeplane_common::{
    latency::FlowKey,
    udp_forward::{
        FAMILY_IPV4, FAMILY_IPV6, MAX_INGRESS, MAX_RULES, PassReason, SHAPE_ORDER,
        UdpForwardAction, UdpIngress, UdpMatchKey, UdpMatchKeyV4, UdpStats, field, rewrite,
    },
};

use crate::{csum, latency, net::*, verifier::opaque};

/// IPv6 rules.
#[map]
static UDP_RULES: HashMap<UdpMatchKey, UdpForwardAction> = HashMap::with_max_entries(MAX_RULES, 0);
/// IPv4 rules, with a key less than half IPv6's: hashing the key is most of a lookup.
#[map]
static UDP_RULES_V4: HashMap<UdpMatchKeyV4, UdpForwardAction> =
    HashMap::with_max_entries(MAX_RULES, 0);
#[map]
static UDP_INGRESS: HashMap<u32, UdpIngress> = HashMap::with_max_entries(MAX_INGRESS, 0);
#[map]
static UDP_STATS: PerCpuArray<UdpStats> = PerCpuArray::with_max_entries(MAX_RULES + MAX_INGRESS, 0);
/// XDP redirect targets, keyed by ifindex. The tc attach point redirects without it.
#[map]
pub static UDP_EGRESS: DevMapHash = DevMapHash::with_max_entries(MAX_INGRESS, 0);

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// An attach point's view of the frame: reading is direct packet access, writing goes through
/// whatever keeps that hook's checksum state right.
pub trait Frame {
    type Ctx: EbpfContext;
    /// Whether the FIB lookup checks the MTU against the IP length. tc leaves it to the kernel,
    /// which knows about GSO.
    const FIB_CHECKS_IP_LEN: bool;
    /// Whether the egress must be in [`UDP_EGRESS`] (XDP redirects only to devmap entries).
    const NEEDS_DEVMAP: bool;

    fn context(&self) -> &Self::Ctx;
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    fn ifindex(&self) -> u32;
    /// Bytes of the whole frame, including any part not in the linear data.
    fn len(&self) -> u64;
    /// Datagrams the frame carries: a tc skb may be a GSO packet (UDP GSO from a local sender,
    /// GRO), which leaves as that many datagrams, each with its own headers.
    fn segments(&self) -> u32;
    /// Writes 16-bit words at `offset`. `addr` marks IPv6 addresses, whose change the tc hook
    /// must fold into the skb's CHECKSUM_COMPLETE value itself.
    fn store<const N: usize>(&mut self, offset: usize, words: &[u16; N], addr: bool) -> Option<()>;
    fn store_macs(&mut self, macs: &[u8; 12]) -> Option<()>;
    /// Applies a partial-sum change to the IPv4 header checksum at `offset`.
    fn l3_csum(&mut self, offset: usize, diff: u32) -> Option<()>;
    /// Applies a partial-sum change to the UDP checksum at `offset`. `pseudo` marks changes to
    /// pseudo-header fields (addresses); `zero_is_none` keeps an IPv4 "no checksum" 0 as is.
    fn l4_csum(&mut self, offset: usize, diff: u32, pseudo: bool, zero_is_none: bool)
    -> Option<()>;
    fn redirect(&self, ifindex: u32) -> bool;
    /// The stack's receive timestamp (CLOCK_REALTIME), 0 when there is none (XDP never has).
    fn rx_tstamp(&self) -> u64;
    /// Leaves a redirected frame's times for where it leaves `egress`; returns where its flow
    /// goes.
    fn hand_off(&self, start_ns: u64, hook_ns: u64, slot: u32, egress: u32)
    -> Option<*mut FlowKey>;
}

/// What the attach point returns to the kernel.
pub enum Action {
    Pass,
    Redirect,
}

/// The header fields the forwarder reads, copied out of the frame.
pub struct Packet {
    v6: bool,
    /// Offset of the UDP header.
    l4: usize,
    /// IP total length (IPv4 `tot_len`, IPv6 payload + 40), host order.
    ip_len: u16,
    pub ttl: u8,
    /// The 16-bit word holding the TTL / hop limit, as loaded.
    ttl_word: [u8; 2],
    udp_check: u16,
    src_ip: [u16; 8],
    dst_ip: [u16; 8],
    src_port: u16,
    dst_port: u16,
}

pub fn forward<F: Frame>(frame: &mut F) -> Action {
    let ifindex = frame.ifindex();
    // SAFETY: values are Copy and read at once; userspace replaces them whole.
    let Some(ingress) = (unsafe { UDP_INGRESS.get(&ifindex) }).copied() else {
        // Attached but not (or no longer) configured: stay out of the way.
        return Action::Pass;
    };
    let packet = match parse(frame) {
        Ok(p) => p,
        Err(reason) => return pass(ingress.slot, reason),
    };
    let action = if packet.v6 {
        lookup_v6(&packet, ifindex, ingress.shapes)
    } else {
        lookup_v4(&packet, ifindex, ingress.shapes)
    };
    let Some(action) = action else {
        return pass(ingress.slot, PassReason::NoRule);
    };
    // SAFETY: a map value stays valid for the whole program run (RCU); userspace replaces
    // values whole, so the copy is consistent.
    let action = unsafe { *action };
    // Capture starts at the match, so frames no rule takes pay nothing for it; XDP frames
    // carry no receive timestamp, so their time starts here.
    let latency = latency::forwarding();
    // SAFETY: plain helper call.
    let hook_ns = latency.map_or(0, |_| unsafe { bpf_ktime_get_ns() });
    match unpack(route_and_rewrite(frame, &packet, &action)) {
        Ok(egress) if frame.redirect(egress) => {
            if let Some(stats) = UDP_STATS.get_ptr_mut(action.slot) {
                // A GSO packet's datagrams each carry the headers once on the wire.
                let segments = u64::from(frame.segments());
                let headers = (packet.l4 + UDP_HLEN) as u64;
                // SAFETY: per-CPU value, nothing else on this CPU touches it meanwhile.
                unsafe {
                    (*stats).packets += segments;
                    (*stats).bytes += frame.len() + (segments - 1) * headers;
                }
            }
            if let Some(cfg) = latency {
                let start = latency::start_ns(frame.rx_tstamp(), cfg, hook_ns);
                if let Some(flow) = frame.hand_off(start, hook_ns, action.slot, egress) {
                    fill_flow(flow, &packet, ifindex);
                }
            }
            Action::Redirect
        }
        Ok(_) => pass(action.slot, PassReason::NoEgress),
        Err(reason) => {
            debug!(
                frame.context(),
                "udp_forward: rule slot {} sent a frame to the stack: {}",
                action.slot,
                reason.label()
            );
            pass(action.slot, reason)
        }
    }
}

/// The frame's flow as it arrived (before the rewrite).
#[inline(always)]
fn fill_flow(flow: *mut FlowKey, p: &Packet, ifindex: u32) {
    // SAFETY: `flow` points into a per-CPU map value this program run owns.
    unsafe {
        (*flow).src_ip = p.src_ip;
        (*flow).dst_ip = p.dst_ip;
        (*flow).src_port = p.src_port;
        (*flow).dst_port = p.dst_port;
        (*flow).family = if p.v6 { FAMILY_IPV6 } else { FAMILY_IPV4 };
        (*flow).can_id = 0;
        (*flow).ifindex = ifindex;
    }
}

#[inline(always)]
fn pass(slot: u32, reason: PassReason) -> Action {
    if let Some(stats) = UDP_STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU value; the index is a valid enum discriminant below COUNT.
        unsafe {
            if let Some(c) = (*stats).passed.get_mut(opaque(reason as usize)) {
                *c += 1;
            }
        }
    }
    Action::Pass
}

/// Reads the headers from the linear data (`data`..`end`, where the attach point made sure they
/// are) and checks the IP length against `len`, the whole frame's: a tc skb may carry its
/// payload in page fragments (header split, GRO, UDP GSO), past `end`.
#[inline(always)]
fn parse<F: Frame>(f: &F) -> Result<Packet, PassReason> {
    let (data, end, len) = (f.data(), f.data_end(), f.len());
    let eth: *const EthHdr = ptr_at(data, end, 0).ok_or(PassReason::Truncated)?;
    // SAFETY: bounds checked by ptr_at.
    match u16::from_be(unsafe { (*eth).proto }) {
        ETH_P_IP => parse_ipv4(data, end, len),
        ETH_P_IPV6 => parse_ipv6(data, end, len),
        _ => Err(PassReason::NotUdp),
    }
}

#[inline(always)]
pub fn parse_ipv4(data: usize, end: usize, len: u64) -> Result<Packet, PassReason> {
    let ip: *const Ipv4Hdr = ptr_at(data, end, ETH_HLEN).ok_or(PassReason::Truncated)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    if ip.version_ihl >> 4 != 4 || ip.proto != IPPROTO_UDP {
        return Err(PassReason::NotUdp);
    }
    match ip.version_ihl & 0x0f {
        5 => {}
        ihl if ihl > 5 => return Err(PassReason::IpOptions),
        _ => return Err(PassReason::Truncated),
    }
    if u16::from_be(ip.frag_off) & IPV4_MF_OFFSET_MASK != 0 {
        return Err(PassReason::Fragment);
    }
    // The constant-offset bounds check comes first: LLVM would otherwise derive it from the
    // length check below, which the verifier cannot follow.
    let l4 = ETH_HLEN + IPV4_HLEN;
    let udp: *const UdpHdr = ptr_at(data, end, l4).ok_or(PassReason::Truncated)?;
    let ip_len = u16::from_be(ip.tot_len);
    // Verifiers before 6.x lose a byte swap's bounds; no XDP or tc frame holds this much anyway.
    if ip_len > 0xfff0 {
        return Err(PassReason::Truncated);
    }
    if (ip_len as usize) < IPV4_HLEN + UDP_HLEN || (ETH_HLEN + ip_len as usize) as u64 > len {
        return Err(PassReason::Truncated);
    }
    // SAFETY: bounds checked by ptr_at.
    let udp = unsafe { &*udp };
    let mut src_ip = [0u16; 8];
    let mut dst_ip = [0u16; 8];
    src_ip[..2].copy_from_slice(&ip.saddr);
    dst_ip[..2].copy_from_slice(&ip.daddr);
    Ok(Packet {
        v6: false,
        l4,
        ip_len,
        ttl: ip.ttl,
        ttl_word: [ip.ttl, ip.proto],
        udp_check: udp.check,
        src_ip,
        dst_ip,
        src_port: udp.source,
        dst_port: udp.dest,
    })
}

#[inline(always)]
fn parse_ipv6(data: usize, end: usize, len: u64) -> Result<Packet, PassReason> {
    let ip: *const Ipv6Hdr = ptr_at(data, end, ETH_HLEN).ok_or(PassReason::Truncated)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    if ip.version_class_flow[0] >> 4 != 6 {
        return Err(PassReason::NotUdp);
    }
    match ip.nexthdr {
        IPPROTO_UDP => {}
        IPV6_FRAGMENT => return Err(PassReason::Fragment),
        n if is_ipv6_ext_header(n) => return Err(PassReason::IpOptions),
        _ => return Err(PassReason::NotUdp),
    }
    let l4 = ETH_HLEN + IPV6_HLEN;
    let udp: *const UdpHdr = ptr_at(data, end, l4).ok_or(PassReason::Truncated)?;
    let payload = u16::from_be(ip.payload_len) as usize;
    // As for IPv4's length: a bound older verifiers can see.
    if payload > 0xffc0 {
        return Err(PassReason::Truncated);
    }
    if payload < UDP_HLEN || (ETH_HLEN + IPV6_HLEN + payload) as u64 > len {
        return Err(PassReason::Truncated);
    }
    // SAFETY: bounds checked by ptr_at.
    let udp = unsafe { &*udp };
    Ok(Packet {
        v6: true,
        l4,
        ip_len: (payload + IPV6_HLEN) as u16,
        ttl: ip.hop_limit,
        ttl_word: [ip.nexthdr, ip.hop_limit],
        udp_check: udp.check,
        src_ip: ip.saddr,
        dst_ip: ip.daddr,
        src_port: udp.source,
        dst_port: udp.dest,
    })
}

/// A rule map key a packet's fields are copied into, shape by shape.
trait ShapeKey {
    /// Sets the key to `p`'s fields of `shape`, the others to zero.
    fn fill(&mut self, shape: u8, p: &Packet);
    fn find(&self) -> Option<*const UdpForwardAction>;
}

/// `v` when `shape` has `field`, else zero.
#[inline(always)]
fn when<T: Default>(shape: u8, field: u8, v: T) -> T {
    if shape & field != 0 { v } else { T::default() }
}

impl ShapeKey for UdpMatchKeyV4 {
    #[inline(always)]
    fn fill(&mut self, shape: u8, p: &Packet) {
        self.fields = shape;
        self.src_port = when(shape, field::SRC_PORT, p.src_port);
        self.dst_port = when(shape, field::DST_PORT, p.dst_port);
        self.src_ip = when(shape, field::SRC_IP, [p.src_ip[0], p.src_ip[1]]);
        self.dst_ip = when(shape, field::DST_IP, [p.dst_ip[0], p.dst_ip[1]]);
    }
    #[inline(always)]
    fn find(&self) -> Option<*const UdpForwardAction> {
        UDP_RULES_V4.get_ptr(self)
    }
}

impl ShapeKey for UdpMatchKey {
    #[inline(always)]
    fn fill(&mut self, shape: u8, p: &Packet) {
        self.fields = shape;
        self.src_port = when(shape, field::SRC_PORT, p.src_port);
        self.dst_port = when(shape, field::DST_PORT, p.dst_port);
        self.src_ip = when(shape, field::SRC_IP, p.src_ip);
        self.dst_ip = when(shape, field::DST_IP, p.dst_ip);
    }
    #[inline(always)]
    fn find(&self) -> Option<*const UdpForwardAction> {
        UDP_RULES.get_ptr(self)
    }
}

/// Tries the shapes in use on this interface, most specific first.
#[inline(always)]
fn lookup<K: ShapeKey>(mut key: K, p: &Packet, shapes: u16) -> Option<*const UdpForwardAction> {
    for shape in SHAPE_ORDER {
        if shapes & (1 << shape) == 0 {
            continue;
        }
        key.fill(shape, p);
        if let Some(action) = key.find() {
            return Some(action);
        }
    }
    None
}

/// [`lookup`] in the IPv4 rules.
// Not inlined: one key on its own stack frame instead of one per unrolled iteration. Returns a
// pointer into the map: BPF subprograms return one register, never a struct.
#[inline(never)]
fn lookup_v4(p: &Packet, ifindex: u32, shapes: u16) -> Option<*const UdpForwardAction> {
    let key = UdpMatchKeyV4 {
        ifindex,
        ..UdpMatchKeyV4::default()
    };
    lookup(key, p, shapes)
}

/// [`lookup`] in the IPv6 rules.
#[inline(never)]
fn lookup_v6(p: &Packet, ifindex: u32, shapes: u16) -> Option<*const UdpForwardAction> {
    let key = UdpMatchKey {
        ifindex,
        family: FAMILY_IPV6,
        ..UdpMatchKey::default()
    };
    lookup(key, p, shapes)
}

/// [`route_and_rewrite`]'s result in one register: the egress ifindex, or a pass reason.
#[inline(always)]
fn unpack(v: u64) -> Result<u32, PassReason> {
    if v >> 32 == 0 {
        return Ok(v as u32);
    }
    let i = (v & 0xff) as usize;
    Err(if i < PassReason::COUNT {
        PassReason::ALL[i]
    } else {
        PassReason::NoRoute
    })
}

/// Routes the rewritten packet through the rule's egress interface and, when it can go there
/// directly, rewrites it completely. Returns the egress ifindex, or why not, packed by
/// [`unpack`]'s rules: BPF subprograms return one register.
// Not inlined: its FIB parameters need not share a stack frame with the parser's copies.
#[inline(never)]
fn route_and_rewrite<F: Frame>(f: &mut F, p: &Packet, a: &UdpForwardAction) -> u64 {
    match try_route_and_rewrite(f, p, a) {
        Ok(ifindex) => u64::from(ifindex),
        Err(reason) => (1 << 32) | reason as u64,
    }
}

#[inline(always)]
fn try_route_and_rewrite<F: Frame>(
    f: &mut F,
    p: &Packet,
    a: &UdpForwardAction,
) -> Result<u32, PassReason> {
    if p.v6 && p.udp_check == 0 {
        return Err(PassReason::ZeroChecksum);
    }
    if p.ttl <= 1 {
        return Err(PassReason::TtlExceeded);
    }
    let src_ip = if a.rewrite & rewrite::SRC_IP != 0 {
        &a.src_ip
    } else {
        &p.src_ip
    };
    let dst_ip = if a.rewrite & rewrite::DST_IP != 0 {
        &a.dst_ip
    } else {
        &p.dst_ip
    };

    // SAFETY: all-zero is a valid bpf_fib_lookup.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    fib.family = if p.v6 { AF_INET6 } else { AF_INET };
    fib.l4_protocol = IPPROTO_UDP;
    fib.sport = if a.rewrite & rewrite::SRC_PORT != 0 {
        a.src_port
    } else {
        p.src_port
    };
    fib.dport = if a.rewrite & rewrite::DST_PORT != 0 {
        a.dst_port
    } else {
        p.dst_port
    };
    fib.__bindgen_anon_1.tot_len = if F::FIB_CHECKS_IP_LEN { p.ip_len } else { 0 };
    fib.ifindex = a.egress_ifindex;
    // The unions hold addresses as on the wire; the word arrays have that same byte layout.
    // SAFETY: [u16; N] and [u32; N/2] have the same size and every bit pattern is valid.
    unsafe {
        if p.v6 {
            fib.__bindgen_anon_3.ipv6_src = core::mem::transmute::<[u16; 8], [u32; 4]>(*src_ip);
            fib.__bindgen_anon_4.ipv6_dst = core::mem::transmute::<[u16; 8], [u32; 4]>(*dst_ip);
        } else {
            fib.__bindgen_anon_3.ipv4_src =
                core::mem::transmute::<[u16; 2], u32>([src_ip[0], src_ip[1]]);
            fib.__bindgen_anon_4.ipv4_dst =
                core::mem::transmute::<[u16; 2], u32>([dst_ip[0], dst_ip[1]]);
        }
    }
    // Output lookup on the egress device: routes and neighbours of that interface only.
    // SAFETY: fib is a valid bpf_fib_lookup of the size passed.
    let rc = unsafe {
        bpf_fib_lookup(
            f.context().as_ptr(),
            &mut fib,
            size_of::<FibParams>() as i32,
            BPF_FIB_LOOKUP_OUTPUT,
        )
    };
    match rc {
        r if r == BPF_FIB_LKUP_RET_SUCCESS as i64 => {}
        r if r == BPF_FIB_LKUP_RET_NO_NEIGH as i64 => {
            rewrite_addresses(f, p, a).ok_or(PassReason::Truncated)?;
            return Err(PassReason::NoNeighbour);
        }
        r if r == BPF_FIB_LKUP_RET_FRAG_NEEDED as i64 => {
            rewrite_addresses(f, p, a).ok_or(PassReason::Truncated)?;
            return Err(PassReason::TooBig);
        }
        r if r == BPF_FIB_LKUP_RET_FWD_DISABLED as i64 => {
            return Err(PassReason::ForwardingDisabled);
        }
        _ => return Err(PassReason::NoRoute),
    }
    if fib.ifindex != a.egress_ifindex {
        return Err(PassReason::NoRoute);
    }
    if F::NEEDS_DEVMAP && UDP_EGRESS.get_ifindex(fib.ifindex).is_none() {
        return Err(PassReason::NoEgress);
    }

    rewrite_addresses(f, p, a).ok_or(PassReason::Truncated)?;
    decrement_ttl(f, p).ok_or(PassReason::Truncated)?;
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&fib.dmac);
    macs[6..].copy_from_slice(&fib.smac);
    f.store_macs(&macs).ok_or(PassReason::Truncated)?;
    Ok(fib.ifindex)
}

/// Rewrites addresses and ports and fixes the IPv4 and UDP checksums incrementally.
#[inline(always)]
pub fn rewrite_addresses<F: Frame>(f: &mut F, p: &Packet, a: &UdpForwardAction) -> Option<()> {
    let zero_is_none = !p.v6;
    let (mut l3, mut l4) = (0u32, 0u32);
    let mut addr_changed = false;
    if a.rewrite & rewrite::DST_IP != 0 {
        addr_changed = true;
        if p.v6 {
            f.store(ETH_HLEN + IPV6_DADDR_OFF, &a.dst_ip, true)?;
            l4 = csum::diff(l4, &p.dst_ip, &a.dst_ip);
        } else {
            f.store(
                ETH_HLEN + IPV4_DADDR_OFF,
                &[a.dst_ip[0], a.dst_ip[1]],
                false,
            )?;
            l3 = csum::diff(l3, &p.dst_ip[..2], &a.dst_ip[..2]);
            l4 = csum::diff(l4, &p.dst_ip[..2], &a.dst_ip[..2]);
        }
    }
    if a.rewrite & rewrite::SRC_IP != 0 {
        addr_changed = true;
        if p.v6 {
            f.store(ETH_HLEN + IPV6_SADDR_OFF, &a.src_ip, true)?;
            l4 = csum::diff(l4, &p.src_ip, &a.src_ip);
        } else {
            f.store(
                ETH_HLEN + IPV4_SADDR_OFF,
                &[a.src_ip[0], a.src_ip[1]],
                false,
            )?;
            l3 = csum::diff(l3, &p.src_ip[..2], &a.src_ip[..2]);
            l4 = csum::diff(l4, &p.src_ip[..2], &a.src_ip[..2]);
        }
    }
    if addr_changed {
        if !p.v6 {
            f.l3_csum(ETH_HLEN + IPV4_CHECK_OFF, l3)?;
        }
        f.l4_csum(p.l4 + UDP_CHECK_OFF, l4, true, zero_is_none)?;
    }

    let mut ports = 0u32;
    let mut port_changed = false;
    if a.rewrite & rewrite::DST_PORT != 0 {
        port_changed = true;
        f.store(p.l4 + UDP_DEST_OFF, &[a.dst_port], false)?;
        ports = csum::diff(ports, &[p.dst_port], &[a.dst_port]);
    }
    if a.rewrite & rewrite::SRC_PORT != 0 {
        port_changed = true;
        f.store(p.l4 + UDP_SOURCE_OFF, &[a.src_port], false)?;
        ports = csum::diff(ports, &[p.src_port], &[a.src_port]);
    }
    if port_changed {
        f.l4_csum(p.l4 + UDP_CHECK_OFF, ports, false, zero_is_none)?;
    }
    Some(())
}

/// We are a router: the TTL / hop limit goes down by one (only the IPv4 header has a checksum).
#[inline(always)]
pub fn decrement_ttl<F: Frame>(f: &mut F, p: &Packet) -> Option<()> {
    let old = u16::from_ne_bytes(p.ttl_word);
    if p.v6 {
        let new = u16::from_ne_bytes([p.ttl_word[0], p.ttl - 1]);
        f.store(ETH_HLEN + IPV6_HOP_LIMIT_OFF - 1, &[new], false)
    } else {
        let new = u16::from_ne_bytes([p.ttl - 1, p.ttl_word[1]]);
        f.store(ETH_HLEN + IPV4_TTL_OFF, &[new], false)?;
        f.l3_csum(ETH_HLEN + IPV4_CHECK_OFF, csum::diff(0, &[old], &[new]))
    }
}
