//! The udp_forward programs under BPF_PROG_TEST_RUN: a private namespace with real routes and
//! neighbours, the programs loaded and rules installed by the agent's own code, and a runner.

use std::{path::Path, time::Duration};

use aya::{
    Ebpf,
    programs::{SchedClassifier, TestRun as _, TestRunOptions, Xdp},
};
use edgeplane::{
    config::Config,
    kernel::loader,
    kernel::pins::PinDir,
    udp_forward::{UdpForwarder, rules, stats},
};
use edgeplane_common::udp_forward::{
    LIMIT_PROGRAM, LIMIT_REWRITE_GLOBAL, LimitRewrite, TC_PROGRAM, UdpStats, XDP_PROGRAM,
};
use edgeplane_testbed::netns::{Entered, Netns};
use etherparse::{Ipv4Header, NetSlice, PacketBuilder, SlicedPacket, TransportSlice};

pub const XDP_PASS: u32 = 2;
pub const XDP_REDIRECT: u32 = 4;
pub const TC_ACT_UNSPEC: u32 = -1i32 as u32;
pub const TC_ACT_REDIRECT: u32 = 7;

/// The receiver's MAC, as a permanent neighbour entry on the egress interface.
pub const NEXT_HOP_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x22];
pub const SENDER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x11];

/// UAPI `struct xdp_md` (linux/bpf.h), the XDP test-run context.
#[repr(C)]
#[derive(Default)]
pub struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

/// The leading part of UAPI `struct __sk_buff` up to `ifindex`, the tc test-run context.
#[repr(C)]
#[derive(Default)]
pub struct SkBuffHead {
    len: u32,
    pkt_type: u32,
    mark: u32,
    queue_mapping: u32,
    protocol: u32,
    vlan_present: u32,
    vlan_tci: u32,
    vlan_proto: u32,
    priority: u32,
    ingress_ifindex: u32,
    ifindex: u32,
}

pub fn bytes_of<T>(v: &T) -> &[u8] {
    // SAFETY: plain repr(C) structs of u32 fields, no padding.
    unsafe { std::slice::from_raw_parts((v as *const T).cast(), size_of::<T>()) }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Prog {
    Xdp,
    Tc,
    /// The benchmark's reference, once [`Fixture::load_limit`] loaded it.
    Limit,
}

impl Prog {
    pub fn pass(self) -> u32 {
        match self {
            Self::Xdp | Self::Limit => XDP_PASS,
            Self::Tc => TC_ACT_UNSPEC,
        }
    }
    pub fn redirect(self) -> u32 {
        match self {
            Self::Xdp | Self::Limit => XDP_REDIRECT,
            Self::Tc => TC_ACT_REDIRECT,
        }
    }
}

/// A namespace with an ingress veth `in0` and an egress veth `eg0` (198.18.2.1/24,
/// fd18:2::1/64) whose next hops 198.18.2.2 and fd18:2::2 have permanent neighbour entries;
/// the programs loaded and the rules installed by the agent's own code.
pub struct Fixture {
    // Drop order: maps and links first, then leave the namespace, then delete it.
    pub udp: UdpForwarder,
    pub ebpf: Ebpf,
    /// Its own object: the limit program's rewrite is a global set at load time.
    limit: Option<Ebpf>,
    _entered: Entered,
    pub ns: Netns,
    pub in_ifindex: u32,
    pub eg_mac: [u8; 6],
    pub in_mac: [u8; 6],
    _pins: ScratchPins,
}

/// A pin directory removed on drop.
struct ScratchPins(PinDir);

impl Drop for ScratchPins {
    fn drop(&mut self) {
        if let Ok(ours) = edgeplane::kernel::loader::pin_names() {
            let _ = self.0.remove(&ours);
        }
    }
}

pub struct Options {
    pub mode: &'static str,
    pub forwarding: bool,
    pub egress_mtu: u32,
}

pub const DEFAULTS: Options = Options {
    mode: "xdp",
    forwarding: true,
    egress_mtu: 1500,
};

impl Fixture {
    pub fn new(rules_toml: &str, opts: Options) -> Self {
        edgeplane_testbed::require_root();
        let ns = Netns::new("prog").unwrap();
        for (a, b) in [("in0", "in0p"), ("eg0", "eg0p")] {
            ns.ip(&["link", "add", a, "type", "veth", "peer", "name", b])
                .unwrap();
            // The peers send nothing of their own: an MLD report (IPv6 with a hop-by-hop
            // header) or router solicitation from in0p would reach the attached programs and
            // count as a pass reason while a test counts its own frames.
            ns.sysctl(&format!("net.ipv6.conf.{b}.disable_ipv6"), "1")
                .unwrap();
            ns.ip(&["link", "set", a, "up"]).unwrap();
            ns.ip(&["link", "set", b, "up"]).unwrap();
        }
        ns.ip(&["link", "set", "eg0", "mtu", &opts.egress_mtu.to_string()])
            .unwrap();
        ns.ip(&["addr", "add", "198.18.1.1/24", "dev", "in0"])
            .unwrap();
        ns.ip(&["addr", "add", "198.18.2.1/24", "dev", "eg0"])
            .unwrap();
        ns.ip(&["-6", "addr", "add", "fd18:2::1/64", "dev", "eg0", "nodad"])
            .unwrap();
        let mac = NEXT_HOP_MAC.map(|b| format!("{b:02x}")).join(":");
        for ip in ["198.18.2.2", "fd18:2::2"] {
            ns.ip(&[
                "neigh",
                "add",
                ip,
                "lladdr",
                &mac,
                "dev",
                "eg0",
                "nud",
                "permanent",
            ])
            .unwrap();
        }
        if opts.forwarding {
            ns.enable_forwarding().unwrap();
        }
        let in_ifindex = ns.ifindex("in0").unwrap();
        let (in_mac, eg_mac) = (ns.mac("in0").unwrap(), ns.mac("eg0").unwrap());
        let entered = ns.enter().unwrap();

        let text = format!("[udp]\nmode = \"{}\"\n{rules_toml}", opts.mode);
        let config = Config::parse(&text, Path::new("test.toml")).unwrap();
        let compiled = config
            .udp
            .forward
            .iter()
            .map(|r| rules::compile(r, &edgeplane::host::netdev::index).unwrap())
            .collect();
        let pins = PinDir::create(&edgeplane_testbed::bpffs::dir_for(&ns.name).unwrap()).unwrap();
        let mut ebpf = loader::load(&[XDP_PROGRAM, TC_PROGRAM]).unwrap();
        let hist =
            edgeplane::latency::take_hist(&mut ebpf, edgeplane_common::latency::UDP_FORWARD_MAP)
                .unwrap();
        let mut udp = UdpForwarder::new(&mut ebpf, &pins, hist).unwrap();
        let mode = config.udp.mode.attach().expect("a kernel mode");
        udp.apply(&mut ebpf, mode, compiled, &Default::default())
            .unwrap();
        Self {
            udp,
            ebpf,
            limit: None,
            _entered: entered,
            ns,
            in_ifindex,
            eg_mac,
            in_mac,
            _pins: ScratchPins(pins),
        }
    }

    /// Loads the limit program (`udp_forward_limit.rs`) with a fixed rewrite to `dst`:`dst_port`
    /// out of `eg0` to [`NEXT_HOP_MAC`], what a rule with `to = { iface = "eg0", ... }` does.
    pub fn load_limit(&mut self, dst: [u8; 4], dst_port: u16) {
        let rewrite = LimitRewrite::new(
            dst,
            dst_port,
            self.ns.ifindex("eg0").unwrap(),
            NEXT_HOP_MAC,
            self.eg_mac,
        );
        self.limit = Some(
            loader::load_with_global(&[LIMIT_PROGRAM], LIMIT_REWRITE_GLOBAL, &rewrite).unwrap(),
        );
    }

    /// Runs one frame through a program; returns its verdict and the frame as it left.
    pub fn run(&self, prog: Prog, frame: &[u8]) -> (u32, Vec<u8>) {
        let (ret, out, _) = self.run_repeated(prog, frame, 1);
        (ret, out)
    }

    /// Runs a frame `repeat` times in the kernel; also returns the mean run time the kernel
    /// measured (program time only, no syscall).
    pub fn run_repeated(&self, prog: Prog, frame: &[u8], repeat: u32) -> (u32, Vec<u8>, Duration) {
        let mut out = vec![0u8; frame.len() + 256];
        let (ret, size, took) = match prog {
            Prog::Xdp | Prog::Limit => {
                let ctx = XdpMd {
                    data_end: frame.len() as u32,
                    ingress_ifindex: self.in_ifindex,
                    ..Default::default()
                };
                let p: &Xdp = if prog == Prog::Limit {
                    let limit = self.limit.as_ref().expect("load_limit first");
                    limit.program(LIMIT_PROGRAM).unwrap().try_into().unwrap()
                } else {
                    self.ebpf.program(XDP_PROGRAM).unwrap().try_into().unwrap()
                };
                let r = p
                    .test_run(TestRunOptions {
                        data_in: Some(frame),
                        data_out: Some(&mut out),
                        ctx_in: Some(bytes_of(&ctx)),
                        repeat,
                        ..Default::default()
                    })
                    .unwrap();
                (r.return_value, r.data_size_out, r.duration)
            }
            Prog::Tc => {
                let ctx = SkBuffHead {
                    ifindex: self.in_ifindex,
                    ..Default::default()
                };
                let p: &SchedClassifier =
                    self.ebpf.program(TC_PROGRAM).unwrap().try_into().unwrap();
                let r = p
                    .test_run(TestRunOptions {
                        data_in: Some(frame),
                        data_out: Some(&mut out),
                        ctx_in: Some(bytes_of(&ctx)),
                        repeat,
                        ..Default::default()
                    })
                    .unwrap();
                (r.return_value, r.data_size_out, r.duration)
            }
        };
        out.truncate(size as usize);
        (ret, out, took)
    }

    /// Switches the programs' forwarding latency capture (what the agent's `[latency] enabled`
    /// does) on or off.
    pub fn set_latency_capture(&mut self, on: bool) {
        use edgeplane_common::latency::{CONFIG_MAP, LatencyConfig, flag};
        let mut config: aya::maps::Array<_, LatencyConfig> = self
            .ebpf
            .map_mut(CONFIG_MAP)
            .expect("the latency config map")
            .try_into()
            .unwrap();
        let value = LatencyConfig {
            flags: if on { flag::FORWARDING } else { 0 },
            ..LatencyConfig::default()
        };
        config.set(0, value, 0).unwrap();
    }

    pub fn rule_stats(&self, rule: &str) -> UdpStats {
        let view = self.udp.view();
        let slot = view.rules.iter().find(|r| r.name == rule).unwrap().slot;
        stats::read(&self.udp.stats(), slot)
    }

    pub fn ingress_stats(&self) -> UdpStats {
        let view = self.udp.view();
        stats::read(
            &self.udp.stats(),
            view.ingress.iter().find(|i| i.iface == "in0").unwrap().slot,
        )
    }

    pub fn udp4(
        &self,
        src: [u8; 4],
        dst: [u8; 4],
        sport: u16,
        dport: u16,
        ttl: u8,
        payload: &[u8],
    ) -> Vec<u8> {
        let b = PacketBuilder::ethernet2(SENDER_MAC, self.in_mac)
            .ipv4(src, dst, ttl)
            .udp(sport, dport);
        let mut out = Vec::with_capacity(b.size(payload.len()));
        b.write(&mut out, payload).unwrap();
        out
    }

    pub fn udp6(
        &self,
        src: &str,
        dst: &str,
        sport: u16,
        dport: u16,
        hops: u8,
        payload: &[u8],
    ) -> Vec<u8> {
        let ip = |s: &str| s.parse::<std::net::Ipv6Addr>().unwrap().octets();
        let b = PacketBuilder::ethernet2(SENDER_MAC, self.in_mac)
            .ipv6(ip(src), ip(dst), hops)
            .udp(sport, dport);
        let mut out = Vec::with_capacity(b.size(payload.len()));
        b.write(&mut out, payload).unwrap();
        out
    }
}

/// What a forwarded or rewritten frame looks like, checked against a reference implementation.
pub struct Seen {
    pub eth_dst: [u8; 6],
    pub eth_src: [u8; 6],
    pub src: std::net::IpAddr,
    pub dst: std::net::IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub ttl: u8,
    pub payload: Vec<u8>,
    pub udp_checksum: u16,
}

/// Parses a frame and asserts that its IPv4 header and UDP checksums are what a from-scratch
/// computation gives.
pub fn inspect(frame: &[u8]) -> Seen {
    let p = SlicedPacket::from_ethernet(frame).unwrap();
    let Some(TransportSlice::Udp(udp)) = p.transport else {
        panic!("not UDP")
    };
    let payload = udp.payload().to_vec();
    let header = udp.to_header();
    let (src, dst, ttl) = match p.net.unwrap() {
        NetSlice::Ipv4(ip) => {
            let h: Ipv4Header = ip.header().to_header();
            assert_eq!(
                h.header_checksum,
                h.calc_header_checksum(),
                "IPv4 header checksum"
            );
            if header.checksum != 0 {
                assert_eq!(
                    header.checksum,
                    header.calc_checksum_ipv4(&h, &payload).unwrap(),
                    "UDP/IPv4 checksum"
                );
            }
            (
                std::net::IpAddr::from(h.source),
                std::net::IpAddr::from(h.destination),
                h.time_to_live,
            )
        }
        NetSlice::Ipv6(ip) => {
            let h = ip.header().to_header();
            assert_eq!(
                header.checksum,
                header.calc_checksum_ipv6(&h, &payload).unwrap(),
                "UDP/IPv6 checksum"
            );
            (
                std::net::IpAddr::from(h.source),
                std::net::IpAddr::from(h.destination),
                h.hop_limit,
            )
        }
        _ => panic!("not IP"),
    };
    Seen {
        eth_dst: frame[..6].try_into().unwrap(),
        eth_src: frame[6..12].try_into().unwrap(),
        src,
        dst,
        sport: header.source_port,
        dport: header.destination_port,
        ttl,
        payload,
        udp_checksum: header.checksum,
    }
}
