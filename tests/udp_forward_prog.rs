//! The udp_forward programs run through BPF_PROG_TEST_RUN with crafted frames, in a private
//! network namespace whose routes and neighbours the FIB lookup really consults. Every frame the
//! programs rewrite has its checksums recomputed by an independent implementation (etherparse).

use edgeplane_common::udp_forward::PassReason;
use edgeplane_tests::udp_program::{
    DEFAULTS, Fixture, NEXT_HOP_MAC, Options, Prog, SENDER_MAC, TC_ACT_REDIRECT, XDP_PASS, inspect,
};
use etherparse::PacketBuilder;

const PAYLOAD: &[u8] = b"lidar frame 0042: 0123456789abcdefghijklmnopqrstuvwxyz";

fn ip(s: &str) -> std::net::IpAddr {
    s.parse().unwrap()
}

#[test]
fn forwards_ipv4_rewriting_destination_with_valid_checksums() {
    let f = Fixture::new(
        r#"[[udp.forward]]
           name = "lidar"
           ingress = "in0"
           match = { dst_port = 5000 }
           to = { iface = "eg0", dst_ip = "198.18.2.2", dst_port = 6000 }"#,
        DEFAULTS,
    );
    for (n, prog) in [Prog::Xdp, Prog::Tc].into_iter().enumerate() {
        let frame = f.udp4([198, 18, 1, 2], [198, 18, 1, 1], 4000, 5000, 64, PAYLOAD);
        let (ret, out) = f.run(prog, &frame);
        assert_eq!(ret, prog.redirect(), "{prog:?}");
        let s = inspect(&out);
        assert_eq!(
            (s.eth_dst, s.eth_src),
            (NEXT_HOP_MAC, f.eg_mac),
            "{prog:?}: MACs from the neighbour table"
        );
        assert_eq!(
            (s.src, s.dst),
            (ip("198.18.1.2"), ip("198.18.2.2")),
            "{prog:?}"
        );
        assert_eq!((s.sport, s.dport, s.ttl), (4000, 6000, 63), "{prog:?}");
        assert_eq!(s.payload, PAYLOAD, "{prog:?}");
        let st = f.rule_stats("lidar");
        assert_eq!(
            (st.packets, st.bytes),
            (n as u64 + 1, (n as u64 + 1) * frame.len() as u64),
            "{prog:?}"
        );
        assert_eq!(st.passed, [0; PassReason::COUNT]);
    }
}

#[test]
fn forwards_ipv6_and_rewrites_source_too() {
    let f = Fixture::new(
        r#"[[udp.forward]]
           name = "radar6"
           ingress = "in0"
           match = { dst_ip = "fd18:1::1", dst_port = 5000 }
           to = { iface = "eg0", dst_ip = "fd18:2::2", dst_port = 6000, src_ip = "fd18:2::1", src_port = 7000 }"#,
        DEFAULTS,
    );
    for prog in [Prog::Xdp, Prog::Tc] {
        let frame = f.udp6("fd18:1::2", "fd18:1::1", 4000, 5000, 64, PAYLOAD);
        let (ret, out) = f.run(prog, &frame);
        assert_eq!(ret, prog.redirect(), "{prog:?}");
        let s = inspect(&out);
        assert_eq!((s.eth_dst, s.eth_src), (NEXT_HOP_MAC, f.eg_mac));
        assert_eq!(
            (s.src, s.dst),
            (ip("fd18:2::1"), ip("fd18:2::2")),
            "{prog:?}"
        );
        assert_eq!((s.sport, s.dport, s.ttl), (7000, 6000, 63), "{prog:?}");
        assert_eq!(s.payload, PAYLOAD);
        // The same datagram to another port is not this rule's.
        let other = f.udp6("fd18:1::2", "fd18:1::1", 4000, 5001, 64, PAYLOAD);
        assert_eq!(f.run(prog, &other), (prog.pass(), other.clone()));
    }
    assert_eq!(f.rule_stats("radar6").packets, 2);
    assert_eq!(f.ingress_stats().passed[PassReason::NoRule as usize], 2);
}

#[test]
fn ipv4_source_rewrite_and_zero_checksum() {
    let f = Fixture::new(
        r#"[[udp.forward]]
           name = "snat"
           ingress = "in0"
           match = { src_ip = "198.18.1.2", src_port = 4000 }
           to = { iface = "eg0", dst_ip = "198.18.2.2", src_ip = "198.18.2.1", src_port = 40000 }"#,
        DEFAULTS,
    );
    for prog in [Prog::Xdp, Prog::Tc] {
        let frame = f.udp4([198, 18, 1, 2], [198, 18, 1, 1], 4000, 5000, 9, PAYLOAD);
        let (ret, out) = f.run(prog, &frame);
        assert_eq!(ret, prog.redirect());
        let s = inspect(&out);
        assert_eq!(
            (s.src, s.dst, s.sport, s.dport, s.ttl),
            (ip("198.18.2.1"), ip("198.18.2.2"), 40000, 5000, 8)
        );

        // IPv4 allows "no checksum" (0): it must stay 0, not become a wrong value.
        let mut zero = frame.clone();
        zero[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&[0, 0]);
        let (ret, out) = f.run(prog, &zero);
        assert_eq!(ret, prog.redirect());
        let s = inspect(&out);
        assert_eq!(s.udp_checksum, 0, "{prog:?}");
        assert_eq!((s.src, s.sport), (ip("198.18.2.1"), 40000));
    }
}

#[test]
fn every_match_field_selects_its_rule_and_the_most_specific_wins() {
    let f = Fixture::new(
        r#"[[udp.forward]]
           name = "by-dport"
           ingress = "in0"
           match = { dst_port = 5000 }
           to = { iface = "eg0", dst_ip = "198.18.2.2", dst_port = 6000 }
           [[udp.forward]]
           name = "by-sport"
           ingress = "in0"
           match = { src_port = 4444 }
           to = { iface = "eg0", dst_ip = "198.18.2.2", dst_port = 6001 }
           [[udp.forward]]
           name = "by-dip"
           ingress = "in0"
           match = { dst_ip = "198.18.1.1" }
           to = { iface = "eg0", dst_ip = "198.18.2.2", dst_port = 6002 }
           [[udp.forward]]
           name = "by-sip"
           ingress = "in0"
           match = { src_ip = "198.18.1.99" }
           to = { iface = "eg0", dst_ip = "198.18.2.2", dst_port = 6003 }
           [[udp.forward]]
           name = "by-all"
           ingress = "in0"
           match = { src_ip = "198.18.1.99", dst_ip = "198.18.1.1", src_port = 4444, dst_port = 5000 }
           to = { iface = "eg0", dst_ip = "198.18.2.2", dst_port = 6004 }"#,
        DEFAULTS,
    );
    // (source, destination, source port, destination port, the port the winning rule sends to)
    type Case = ([u8; 4], [u8; 4], u16, u16, u16);
    let cases: [Case; 6] = [
        ([198, 18, 1, 2], [198, 18, 1, 50], 1000, 5000, 6000),
        ([198, 18, 1, 2], [198, 18, 1, 50], 4444, 7000, 6001),
        ([198, 18, 1, 2], [198, 18, 1, 1], 1000, 7000, 6002),
        ([198, 18, 1, 99], [198, 18, 1, 50], 1000, 7000, 6003),
        // Matches all five rules: the one with every field wins.
        ([198, 18, 1, 99], [198, 18, 1, 1], 4444, 5000, 6004),
        // dst_ip and dst_port rules tie on specificity: addresses win over ports.
        ([198, 18, 1, 2], [198, 18, 1, 1], 1000, 5000, 6002),
    ];
    for prog in [Prog::Xdp, Prog::Tc] {
        for (src, dst, sport, dport, want) in cases {
            let (ret, out) = f.run(prog, &f.udp4(src, dst, sport, dport, 64, PAYLOAD));
            assert_eq!(ret, prog.redirect(), "{prog:?} {src:?}->{dst:?}:{dport}");
            assert_eq!(
                inspect(&out).dport,
                want,
                "{prog:?} {src:?}:{sport} -> {dst:?}:{dport}"
            );
        }
    }
    let counts: Vec<u64> = ["by-dport", "by-sport", "by-dip", "by-sip", "by-all"]
        .iter()
        .map(|r| f.rule_stats(r).packets)
        .collect();
    assert_eq!(counts, [2, 2, 4, 2, 2]);
}

#[test]
fn frames_no_rule_takes_pass_untouched_counted_by_reason() {
    let f = Fixture::new(
        r#"[[udp.forward]]
           name = "r"
           ingress = "in0"
           match = { dst_port = 5000 }
           to = { iface = "eg0", dst_ip = "198.18.2.2" }"#,
        DEFAULTS,
    );
    let good4 = f.udp4([198, 18, 1, 2], [198, 18, 1, 1], 4000, 5000, 64, PAYLOAD);
    let good6 = f.udp6("fd18:1::2", "fd18:1::1", 4000, 5000, 64, PAYLOAD);

    let mut cases: Vec<(&str, Vec<u8>, PassReason)> = Vec::new();
    let tcp = {
        let b = PacketBuilder::ethernet2(SENDER_MAC, f.in_mac)
            .ipv4([198, 18, 1, 2], [198, 18, 1, 1], 64)
            .tcp(4000, 5000, 1, 1024);
        let mut v = Vec::new();
        b.write(&mut v, PAYLOAD).unwrap();
        v
    };
    cases.push(("tcp", tcp, PassReason::NotUdp));
    let mut arp = good4[..42].to_vec();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    cases.push(("arp", arp, PassReason::NotUdp));
    // (Only XDP: the skb flavour of BPF_PROG_TEST_RUN rejects frames this short itself.)
    cases.push((
        "half an IPv4 header",
        good4[..24].to_vec(),
        PassReason::Truncated,
    ));
    cases.push((
        "cut ipv4",
        good4[..good4.len() - 10].to_vec(),
        PassReason::Truncated,
    ));
    cases.push((
        "cut ipv6",
        good6[..good6.len() - 10].to_vec(),
        PassReason::Truncated,
    ));
    cases.push((
        "ipv4 header only",
        good4[..14 + 20].to_vec(),
        PassReason::Truncated,
    ));
    let mut frag = good4.clone();
    frag[14 + 6] |= 0x20; // more fragments
    cases.push(("ipv4 first fragment", frag, PassReason::Fragment));
    let mut frag = good4.clone();
    frag[14 + 7] = 0x10; // offset 128 bytes
    cases.push(("ipv4 later fragment", frag, PassReason::Fragment));
    let mut frag6 = good6.clone();
    frag6[14 + 6] = 44;
    cases.push(("ipv6 fragment header", frag6, PassReason::Fragment));
    let mut opts = good4[..14 + 20].to_vec();
    opts.extend_from_slice(&[1, 1, 1, 1]); // four NOP options
    opts.extend_from_slice(&good4[14 + 20..]);
    opts[14] = 0x46;
    let tot = u16::from_be_bytes([opts[16], opts[17]]) + 4;
    opts[16..18].copy_from_slice(&tot.to_be_bytes());
    cases.push(("ipv4 options", opts, PassReason::IpOptions));
    let mut hbh = good6.clone();
    hbh[14 + 6] = 0; // hop-by-hop options header
    cases.push(("ipv6 hop-by-hop", hbh, PassReason::IpOptions));
    cases.push((
        "other port",
        f.udp4([198, 18, 1, 2], [198, 18, 1, 1], 4000, 5001, 64, PAYLOAD),
        PassReason::NoRule,
    ));

    for prog in [Prog::Xdp, Prog::Tc] {
        for (what, frame, reason) in &cases {
            if prog == Prog::Tc && frame.len() < 14 + 20 {
                continue;
            }
            let before = f.ingress_stats().passed[*reason as usize];
            let (ret, out) = f.run(prog, frame);
            assert_eq!(ret, prog.pass(), "{prog:?} {what}");
            assert_eq!(
                &out, frame,
                "{prog:?} {what}: the frame must pass untouched"
            );
            assert_eq!(
                f.ingress_stats().passed[*reason as usize],
                before + 1,
                "{prog:?} {what}: {reason:?}"
            );
        }
    }
    assert!(
        PassReason::ALL
            .iter()
            .filter(|r| r.is_ingress())
            .all(|r| cases.iter().any(|c| c.2 == *r))
    );
    assert_eq!(f.rule_stats("r").packets, 0);
}

#[test]
fn matched_frames_the_kernel_must_handle_pass_by_reason() {
    let f = Fixture::new(
        r#"[[udp.forward]]
           name = "ok"
           ingress = "in0"
           match = { dst_port = 5000 }
           to = { iface = "eg0", dst_ip = "198.18.2.2", dst_port = 6000 }
           [[udp.forward]]
           name = "ok6"
           ingress = "in0"
           match = { dst_ip = "fd18:1::1", dst_port = 5000 }
           to = { iface = "eg0", dst_ip = "fd18:2::2" }
           [[udp.forward]]
           name = "unrouted"
           ingress = "in0"
           match = { dst_port = 5001 }
           to = { iface = "eg0", dst_ip = "203.0.113.9" }
           [[udp.forward]]
           name = "unresolved"
           ingress = "in0"
           match = { dst_port = 5002 }
           to = { iface = "eg0", dst_ip = "198.18.2.3", dst_port = 6002 }"#,
        DEFAULTS,
    );
    for prog in [Prog::Xdp, Prog::Tc] {
        // A hop limit / TTL of 1 must not be forwarded; the stack answers with ICMP.
        let ttl1 = f.udp4([198, 18, 1, 2], [198, 18, 1, 1], 4000, 5000, 1, PAYLOAD);
        assert_eq!(f.run(prog, &ttl1), (prog.pass(), ttl1.clone()), "{prog:?}");
        // IPv6 forbids UDP checksum 0.
        let mut zero6 = f.udp6("fd18:1::2", "fd18:1::1", 4000, 5000, 64, PAYLOAD);
        zero6[14 + 40 + 6..14 + 40 + 8].copy_from_slice(&[0, 0]);
        assert_eq!(
            f.run(prog, &zero6),
            (prog.pass(), zero6.clone()),
            "{prog:?}"
        );
        // No route to the rewritten destination through eg0.
        let unrouted = f.udp4([198, 18, 1, 2], [198, 18, 1, 1], 4000, 5001, 64, PAYLOAD);
        assert_eq!(
            f.run(prog, &unrouted),
            (prog.pass(), unrouted.clone()),
            "{prog:?}"
        );
        // Next hop unknown: the stack gets the rewritten datagram, to route it and resolve the
        // neighbour; TTL and MACs are left to the stack.
        let unresolved = f.udp4([198, 18, 1, 2], [198, 18, 1, 1], 4000, 5002, 64, PAYLOAD);
        let (ret, out) = f.run(prog, &unresolved);
        assert_eq!(ret, prog.pass(), "{prog:?}");
        let s = inspect(&out);
        assert_eq!(
            (s.dst, s.dport, s.ttl, s.eth_src),
            (ip("198.18.2.3"), 6002, 64, SENDER_MAC),
            "{prog:?}"
        );
        assert_eq!(s.payload, PAYLOAD);
    }
    let reason = |rule: &str, r: PassReason| f.rule_stats(rule).passed[r as usize];
    assert_eq!(reason("ok", PassReason::TtlExceeded), 2);
    assert_eq!(reason("ok6", PassReason::ZeroChecksum), 2);
    assert_eq!(reason("unrouted", PassReason::NoRoute), 2);
    assert_eq!(reason("unresolved", PassReason::NoNeighbour), 2);
    assert_eq!(
        f.rule_stats("ok").packets + f.rule_stats("unresolved").packets,
        0
    );
}

#[test]
fn oversized_frames_and_disabled_forwarding_pass() {
    let rule = r#"[[udp.forward]]
                  name = "r"
                  ingress = "in0"
                  match = { dst_port = 5000 }
                  to = { iface = "eg0", dst_ip = "198.18.2.2", dst_port = 6000 }"#;
    let f = Fixture::new(
        rule,
        Options {
            egress_mtu: 1280,
            ..DEFAULTS
        },
    );
    let big = f.udp4(
        [198, 18, 1, 2],
        [198, 18, 1, 1],
        4000,
        5000,
        64,
        &[7u8; 1300],
    );
    for prog in [Prog::Xdp, Prog::Tc] {
        let (ret, out) = f.run(prog, &big);
        assert_eq!(ret, prog.pass(), "{prog:?}");
        // Rewritten, so the stack fragments it towards the new destination.
        assert_eq!(inspect(&out).dport, 6000);
    }
    assert_eq!(f.rule_stats("r").passed[PassReason::TooBig as usize], 2);
    drop(f);

    let f = Fixture::new(
        rule,
        Options {
            forwarding: false,
            ..DEFAULTS
        },
    );
    let frame = f.udp4([198, 18, 1, 2], [198, 18, 1, 1], 4000, 5000, 64, PAYLOAD);
    for prog in [Prog::Xdp, Prog::Tc] {
        assert_eq!(
            f.run(prog, &frame),
            (prog.pass(), frame.clone()),
            "{prog:?}"
        );
    }
    assert_eq!(
        f.rule_stats("r").passed[PassReason::ForwardingDisabled as usize],
        2
    );
}

#[test]
fn xdp_passes_when_the_egress_is_not_a_redirect_target() {
    // In tc mode the agent puts no egress into the XDP devmap; the XDP program must notice.
    let f = Fixture::new(
        r#"[[udp.forward]]
           name = "r"
           ingress = "in0"
           match = { dst_port = 5000 }
           to = { iface = "eg0", dst_ip = "198.18.2.2" }"#,
        Options {
            mode: "tc",
            ..DEFAULTS
        },
    );
    let frame = f.udp4([198, 18, 1, 2], [198, 18, 1, 1], 4000, 5000, 64, PAYLOAD);
    assert_eq!(f.run(Prog::Xdp, &frame), (XDP_PASS, frame.clone()));
    assert_eq!(f.rule_stats("r").passed[PassReason::NoEgress as usize], 1);
    // The tc program redirects without the devmap.
    assert_eq!(f.run(Prog::Tc, &frame).0, TC_ACT_REDIRECT);
    let _ = &f.ns;
}

/// The benchmark's limit program must do the work a rule's rewrite does, or the ratio to it
/// would flatter (or wrong) the real program: it leaves frames byte for byte as udp_forward_xdp
/// does, and gives the stack what it cannot forward.
#[test]
fn limit_program_rewrites_exactly_as_udp_forward_xdp() {
    let mut f = Fixture::new(
        r#"[[udp.forward]]
           name = "lidar"
           ingress = "in0"
           match = { dst_port = 5000 }
           to = { iface = "eg0", dst_ip = "198.18.2.2", dst_port = 6000 }"#,
        DEFAULTS,
    );
    f.load_limit([198, 18, 2, 2], 6000);
    let mut zero_checksum = f.udp4([198, 18, 1, 2], [198, 18, 1, 1], 4000, 5000, 64, PAYLOAD);
    zero_checksum[14 + 20 + 6..14 + 20 + 8].fill(0);
    let forwarded = [
        f.udp4([198, 18, 1, 2], [198, 18, 1, 1], 4000, 5000, 64, PAYLOAD),
        f.udp4([10, 9, 8, 7], [198, 18, 1, 1], 65535, 5000, 2, &[0xff; 301]),
        zero_checksum,
    ];
    for frame in &forwarded {
        let (ret, want) = f.run(Prog::Xdp, frame);
        assert_eq!(ret, Prog::Xdp.redirect());
        let (ret, got) = f.run(Prog::Limit, frame);
        assert_eq!(ret, Prog::Limit.redirect());
        assert_eq!(
            got, want,
            "the limit's frame differs from udp_forward_xdp's"
        );
        assert_eq!(inspect(&got).dport, 6000);
    }
    let mut truncated = forwarded[0].clone();
    truncated.truncate(14 + 20 + 4);
    let passed = [
        f.udp4([198, 18, 1, 2], [198, 18, 1, 1], 4000, 5000, 1, PAYLOAD),
        f.udp6("fd18:1::2", "fd18:1::1", 4000, 5000, 64, PAYLOAD),
        truncated,
    ];
    for frame in &passed {
        let (ret, out) = f.run(Prog::Limit, frame);
        assert_eq!((ret, &out), (XDP_PASS, frame));
    }
}
