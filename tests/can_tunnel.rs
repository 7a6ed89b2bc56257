//! The CAN-over-UDP tunnel between two agents (run by `cargo xtask vm-test`): host A and host B
//! in two namespaces, each with a CAN bus and a veth between them. Frames go both ways in
//! cannelloni's format; malformed datagrams change nothing on the bus.

use std::{
    net::UdpSocket,
    time::{Duration, Instant},
};

use edgeplane_common::can::CAN_EFF_FLAG;
use edgeplane_testbed::{
    agent::{Agent, Start},
    http,
    netns::{Netns, veth},
    require_root,
};
use edgeplane_tests::can::{Bus, Frame, assert_same_frames_in_id_order, vxcan_pair};

const A_IP: &str = "198.18.7.1";
const B_IP: &str = "198.18.7.2";
const QUIET: Duration = Duration::from_millis(800);
const LIMIT: Duration = Duration::from_secs(30);

struct Hosts {
    a: Netns,
    b: Netns,
}

impl Hosts {
    fn new() -> Self {
        require_root();
        let (a, b) = (Netns::new("tuna").unwrap(), Netns::new("tunb").unwrap());
        veth(&a, "ta0", &b, "tb0").unwrap();
        a.ip(&["addr", "add", &format!("{A_IP}/24"), "dev", "ta0"])
            .unwrap();
        b.ip(&["addr", "add", &format!("{B_IP}/24"), "dev", "tb0"])
            .unwrap();
        vxcan_pair(&a, "a0", "a1", true).unwrap();
        vxcan_pair(&b, "b0", "b1", true).unwrap();
        Self { a, b }
    }
}

/// Each host tunnels everything from its bus to the other and writes what it receives to it.
fn config(bus: &str, peer_ip: &str, peer_port: u16, listen: &str, from: &str) -> String {
    format!(
        r#"[http]
listen = "127.0.0.1:9464"

[[can.route]]
name = "to-peer"
ingress = "{bus}"
filter = "0:0"
to = {{ udp = "{peer_ip}:{peer_port}" }}

[[can.receive]]
name = "from-peer"
listen = "{listen}"
iface = "{bus}"
peer = "{from}"
"#
    )
}

/// Every counter on the way from bus A to bus B, for a test that lost frames: each agent's
/// CAN and tunnel series, the CAN interfaces' drops and each namespace's UDP errors.
fn loss_report(h: &Hosts, a: &Agent, b: &Agent) -> String {
    let mut out = String::new();
    for (host, ns, agent, ifaces) in [("A", &h.a, a, ["a0", "a1"]), ("B", &h.b, b, ["b0", "b1"])] {
        let text = agent.scrape();
        let series: Vec<&str> = (text.lines())
            .filter(|l| l.starts_with("edgeplane_can_") && !l.contains("_bucket"))
            .collect();
        out.push_str(&format!("host {host} metrics:\n{}\n", series.join("\n")));
        for iface in ifaces {
            let link = ns.ip(&["-s", "link", "show", iface]).unwrap_or_default();
            out.push_str(&format!("{iface} (ip -s link):\n{link}"));
        }
        out.push_str(&format!("host {host} {}", ns.udp_counters()));
    }
    let softnet = std::fs::read_to_string("/proc/net/softnet_stat").unwrap_or_default();
    out.push_str(&format!(
        "/proc/net/softnet_stat (2nd column: backlog drops):\n{softnet}"
    ));
    out
}

fn m(text: &str, series: &str) -> f64 {
    http::metric(text, series).unwrap()
}

fn frames(n: u32) -> Vec<Frame> {
    (0..n)
        .map(|i| match i % 3 {
            // A few IDs, each seen many times: CAN's ordering promise is per ID.
            0 => Frame::classic(0x100 + (i / 3) % 4, &i.to_be_bytes()),
            1 => Frame::fd(0x1234_0000 | (i / 3) % 4 | CAN_EFF_FLAG, &[i as u8; 48]),
            _ => Frame::fd(0x7ff, &[(i >> 8) as u8, i as u8]),
        })
        .collect()
}

#[test]
fn frames_cross_both_ways_and_do_not_echo() {
    let h = Hosts::new();
    // Each agent stays on one CPU: veth and vxcan queue what a thread sends on that thread's
    // CPU, so an agent whose tunnel task moved between CPUs could reorder datagrams (and so
    // frames of one ID) on these virtual links — seen once on 5.10. Real CAN and Ethernet
    // devices queue in order; the README says so.
    let one_cpu = ["taskset", "-c", "0"];
    let agent_a = Agent::start_wrapped(
        &h.a,
        &config("a0", B_IP, 20000, &format!("{A_IP}:20001"), B_IP),
        "info",
        &Start::default(),
        &one_cpu,
    )
    .unwrap();
    let agent_b = Agent::start_wrapped(
        &h.b,
        &config("b0", A_IP, 20001, &format!("{B_IP}:20000"), A_IP),
        "info",
        &Start::default(),
        &one_cpu,
    )
    .unwrap();
    let (a_tx, b_rx) = (
        Bus::open(&h.a, "a1").unwrap(),
        Bus::open(&h.b, "b1").unwrap(),
    );

    let n = 3000;
    let sent = frames(n);
    let start = Instant::now();
    std::thread::scope(|s| {
        let reader = s.spawn(|| b_rx.collect(QUIET, LIMIT));
        for (i, f) in sent.iter().enumerate() {
            a_tx.send(f).unwrap();
            // About 3 frames per ms: a busy CAN FD bus.
            if i % 3 == 2 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let got = reader.join().unwrap();
        assert_eq!(
            got.len(),
            sent.len(),
            "A -> B: {} of {} frames arrived; where they were lost:\n{}",
            got.len(),
            sent.len(),
            loss_report(&h, &agent_a, &agent_b)
        );
        assert_same_frames_in_id_order(&got, &sent, "A -> B");
    });
    eprintln!(
        "A -> B: {n} frames in {:.2} s",
        start.elapsed().as_secs_f64()
    );

    // Opened now: a socket on a1 also receives what a_tx sent there (CAN's local loopback).
    let (b_tx, a_rx) = (
        Bus::open(&h.b, "b1").unwrap(),
        Bus::open(&h.a, "a1").unwrap(),
    );
    let back = frames(300);
    std::thread::scope(|s| {
        let reader = s.spawn(|| a_rx.collect(QUIET, LIMIT));
        for f in &back {
            b_tx.send(f).unwrap();
            std::thread::sleep(Duration::from_micros(300));
        }
        let got: Vec<Frame> = reader
            .join()
            .unwrap()
            .into_iter()
            .filter(|f| back.contains(f))
            .collect();
        assert_same_frames_in_id_order(&got, &back, "B -> A");
    });

    let (ma, mb) = (agent_a.scrape(), agent_b.scrape());
    let tx_a = format!("tunnel=\"{B_IP}:20000\"");
    assert_eq!(
        m(
            &ma,
            &format!("edgeplane_can_tunnel_frames_total{{{tx_a},direction=\"tx\"}}")
        ),
        f64::from(n)
    );
    assert_eq!(
        m(
            &mb,
            "edgeplane_can_tunnel_frames_total{tunnel=\"from-peer\",direction=\"rx\"}"
        ),
        f64::from(n)
    );
    // Frames B wrote to its bus come back through its tc ingress; they must not go back to A.
    assert_eq!(
        m(
            &mb,
            "edgeplane_can_dropped_total{rule=\"to-peer\",reason=\"hop_limit\"}"
        ),
        f64::from(n),
        "{mb}"
    );
    assert_eq!(
        m(&mb, "edgeplane_can_routed_total{rule=\"to-peer\"}"),
        300.0
    );
    let datagrams = m(
        &ma,
        &format!("edgeplane_can_tunnel_datagrams_total{{{tx_a},direction=\"tx\"}}"),
    );
    let queued = m(
        &ma,
        &format!("edgeplane_can_tunnel_queue_seconds_count{{{tx_a}}}"),
    );
    let below_1ms = m(
        &ma,
        &format!("edgeplane_can_tunnel_queue_seconds_bucket{{{tx_a},le=\"0.001048576\"}}"),
    );
    let mean_us = m(
        &ma,
        &format!("edgeplane_can_tunnel_queue_seconds_sum{{{tx_a}}}"),
    ) / queued
        * 1e6;
    eprintln!(
        "A batched {n} frames into {datagrams} datagrams ({:.1} frames each); time in the tunnel queue: mean {mean_us:.0} µs, {:.1}% under 1.05 ms",
        f64::from(n) / datagrams,
        below_1ms / queued * 100.0
    );
    assert_eq!(queued, f64::from(n));
}

#[test]
fn malformed_datagrams_change_nothing_on_the_bus() {
    let h = Hosts::new();
    let agent_b = Agent::start(
        &h.b,
        &config("b0", A_IP, 20001, &format!("{B_IP}:20000"), A_IP),
        "info",
    )
    .unwrap();
    let b_rx = Bus::open(&h.b, "b1").unwrap();
    let _in = h.a.enter().unwrap();
    let sock = UdpSocket::bind(format!("{A_IP}:0")).unwrap();
    let to = format!("{B_IP}:20000");
    // One good classic frame (0x123, 2 bytes): header, id, len, data.
    let good: Vec<u8> = vec![2, 0, 0, 0, 1, 0, 0, 0x01, 0x23, 2, 0xab, 0xcd];
    let mut cases: Vec<(&str, Vec<u8>)> = vec![("truncated", good[..4].to_vec())];
    let mut v = good.clone();
    v[0] = 3;
    cases.push(("bad_version", v));
    let mut v = good.clone();
    v[1] = 1;
    cases.push(("bad_op_code", v));
    let mut v = good.clone();
    v[9] = 0x80 | 65; // CAN FD length 65
    cases.push(("bad_length", v));
    let mut v = good.clone();
    v[9] = 9; // classic length 9
    cases.push(("bad_length", v));
    let mut v = good.clone();
    v[4] = 2; // count overruns the datagram
    cases.push(("truncated", v));
    let mut v = good.clone();
    v.push(0x55);
    cases.push(("trailing_bytes", v));
    for (_, d) in &cases {
        sock.send_to(d, &to).unwrap();
    }
    // From an address that is not the configured peer.
    h.a.ip(&["addr", "add", "198.18.7.9/24", "dev", "ta0"])
        .unwrap();
    let stranger = UdpSocket::bind("198.18.7.9:0").unwrap();
    stranger.send_to(&good, &to).unwrap();

    assert!(
        b_rx.collect(QUIET, LIMIT).is_empty(),
        "a malformed datagram reached the bus"
    );
    let mb = agent_b.scrape();
    for reason in [
        "truncated",
        "bad_version",
        "bad_op_code",
        "bad_length",
        "trailing_bytes",
        "unknown_peer",
    ] {
        let want = cases
            .iter()
            .filter(|c| c.0 == reason)
            .count()
            .max(usize::from(reason == "unknown_peer")) as f64;
        assert_eq!(
            m(
                &mb,
                &format!(
                    "edgeplane_can_tunnel_rejected_total{{tunnel=\"from-peer\",reason=\"{reason}\"}}"
                )
            ),
            want,
            "{reason}"
        );
    }
    // The good one still goes through.
    sock.send_to(&good, &to).unwrap();
    assert_eq!(
        b_rx.collect(QUIET, LIMIT),
        vec![Frame::classic(0x123, &[0xab, 0xcd])]
    );
}

/// A tunnel peer given by a name the resolver can't give an address for: first no DNS server
/// at all (refused at once), then one that never answers (the 5 s limit). The route waits
/// and says why in /readyz, the other routes run, interfaces are still followed, and once the
/// name resolves (here: added to the hosts file) the tunnel runs without a reload.
#[test]
fn a_peer_that_does_not_resolve_waits_and_nothing_else_does() {
    require_root();
    let ns = Netns::new("tunres").unwrap();
    vxcan_pair(&ns, "a0", "a1", true).unwrap();
    vxcan_pair(&ns, "b0", "b1", true).unwrap();
    ns.set_etc(
        "resolv.conf",
        "nameserver 127.0.0.1\noptions timeout:30 attempts:1\n",
    )
    .unwrap();
    ns.set_etc("hosts", "127.0.0.1 localhost\n").unwrap();
    ns.set_etc("nsswitch.conf", "hosts: files dns\n").unwrap();
    let config = r#"[http]
listen = "127.0.0.1:9464"

[[can.route]]
name = "body"
ingress = "a0"
filter = "100:700"
to = { iface = "b0" }

[[can.route]]
name = "tunnel"
ingress = "a0"
filter = "200:700"
to = { udp = "peer.test:20000" }
"#;
    let opts = Start {
        not_ready_ok: true,
        ..Start::default()
    };
    let agent = Agent::start_with(&ns, config, "info", &opts).unwrap();
    let readyz = || {
        let _in = ns.enter().unwrap();
        let (code, body) = http::get(agent.metrics, "/readyz").unwrap();
        (code, body)
    };
    let wait_for_detail = |needle: &str| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (code, body) = readyz();
            if body.contains(needle) {
                assert_eq!(code, 503, "{body}");
                assert!(
                    body.contains(r#""name":"can_tunnel/tunnel","state":"peer_unresolved""#),
                    "{body}"
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no `{needle}` in /readyz: {body}\n{}",
                agent.log_so_far()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let (tx, rx) = (Bus::open(&ns, "a1").unwrap(), Bus::open(&ns, "b1").unwrap());
    let body_frames = |first: u32| -> Vec<Frame> {
        (first..first + 5)
            .map(|i| Frame::classic(0x100 + i, &[i as u8]))
            .collect()
    };

    // No DNS server: the lookup is refused at once. The route to b0 runs meanwhile.
    wait_for_detail("does not resolve");
    for f in body_frames(0) {
        tx.send(&f).unwrap();
    }
    tx.send(&Frame::classic(0x200, &[9])).unwrap();
    assert_eq!(rx.collect(QUIET, LIMIT), body_frames(0));

    // A DNS server that reads the queries and never answers: each try takes the 5 s limit.
    let server = {
        let _in = ns.enter().unwrap();
        UdpSocket::bind("127.0.0.1:53").unwrap()
    };
    wait_for_detail("did not resolve within 5 s");
    server.set_nonblocking(true).unwrap();
    assert!(
        server.recv_from(&mut [0u8; 512]).is_ok(),
        "the agent did not ask the server"
    );

    // Interfaces are still followed: b0 goes and comes back (a new index); the route to it
    // waits and is installed again.
    ns.ip(&["link", "del", "b0"]).unwrap();
    vxcan_pair(&ns, "b0", "b1", true).unwrap();
    let rx = Bus::open(&ns, "b1").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        tx.send(&Frame::classic(0x10f, &[0])).unwrap();
        if !rx.collect(Duration::from_millis(300), LIMIT).is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the route to b0 was not installed again:\n{}",
            agent.log_so_far()
        );
    }
    for f in body_frames(5) {
        tx.send(&f).unwrap();
    }
    assert_eq!(rx.collect(QUIET, LIMIT), body_frames(5));

    // The name resolves now: the next try finds it, and frames go into the tunnel.
    let peer = {
        let _in = ns.enter().unwrap();
        UdpSocket::bind("127.0.0.1:20000").unwrap()
    };
    peer.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    ns.set_etc("hosts", "127.0.0.1 localhost\n127.0.0.1 peer.test\n")
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    while !agent.log_so_far().contains("tunnel peer resolved") {
        assert!(
            Instant::now() < deadline,
            "the peer was not resolved again:\n{}",
            agent.log_so_far()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (code, body) = readyz();
    assert_eq!(code, 200, "{body}");
    let mut got = 0;
    for i in 0..5u8 {
        tx.send(&Frame::classic(0x201, &[i])).unwrap();
    }
    let mut buf = [0u8; 2048];
    let until = Instant::now() + Duration::from_secs(10);
    while got < 5 && Instant::now() < until {
        if let Ok(n) = peer.recv(&mut buf) {
            // cannelloni: 5-byte header, then frames of 5 bytes (id, len) + data.
            got += usize::from(u16::from_be_bytes([buf[3], buf[4]])) * usize::from(n > 5);
        }
    }
    assert_eq!(got, 5, "frames through the tunnel\n{}", agent.log_so_far());
    let log = agent.log_so_far();
    assert!(log.contains("tunnel route waits for its peer"), "{log}");
    drop(server);
}
