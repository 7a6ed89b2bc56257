//! Host metrics end to end: two namespaces joined by veth links, the agent on one side with a
//! rule that sends datagrams back out of the interface they came in by, real datagrams; once
//! with the rule in the kernel (eBPF) and once in the userspace engine, whose /metrics must
//! carry the host metrics as well.
//!
//! The interface counters in /metrics must move by what was sent, each in its own direction
//! (more is received than sent back), drops must count datagrams the veth could not hand to
//! its peer, the queue length and state must be what `ip -d link` says, and after a reload the
//! metrics follow the interfaces the new config names.

use std::{
    net::UdpSocket,
    time::{Duration, Instant},
};

use edgeplane_testbed::{
    agent::Agent,
    http,
    netns::{Netns, veth},
    require_root,
};

/// Datagrams the rule echoes: in and out of b0.
const N: u64 = 400;
/// Datagrams to a socket of the gateway: into b0 only.
const M: u64 = 300;
/// Datagrams the gateway sends the peer that are too big for the peer's MTU: dropped on b0's
/// way out.
const D: u64 = 50;
const BIG_PAYLOAD: usize = 1200;
const PAYLOAD: usize = 200;
/// Ethernet, IPv4 and UDP headers: what the interface counts besides the payload.
const HEADERS: u64 = 14 + 20 + 8;
/// Packets the stacks send on their own while the test runs (ARP, IPv6 neighbour discovery,
/// MLD): what a counter may move by beyond the test's datagrams.
const BACKGROUND: u64 = 20;

const PEER_V4: &str = "198.18.1.2";
const BOX_V4: &str = "198.18.1.1";
const PEER1_V4: &str = "198.18.2.2";
const BOX1_V4: &str = "198.18.2.1";

/// `peer` p0 ---- b0 `box` (the agent), and p1 ---- b1 for the reload.
struct Hosts {
    peer: Netns,
    gateway: Netns,
}

impl Hosts {
    fn new(tag: &str) -> Self {
        require_root();
        let hosts = Self {
            peer: Netns::new(&format!("{tag}p")).unwrap(),
            gateway: Netns::new(&format!("{tag}b")).unwrap(),
        };
        for (p, b, peer_ip, box_ip) in [
            ("p0", "b0", PEER_V4, BOX_V4),
            ("p1", "b1", PEER1_V4, BOX1_V4),
        ] {
            veth(&hosts.peer, p, &hosts.gateway, b).unwrap();
            hosts
                .peer
                .ip(&["addr", "add", &format!("{peer_ip}/24"), "dev", p])
                .unwrap();
            hosts
                .gateway
                .ip(&["addr", "add", &format!("{box_ip}/24"), "dev", b])
                .unwrap();
        }
        hosts.gateway.enable_forwarding().unwrap();
        // The gateway learns the peer's MAC, so the rule's FIB lookup finds its next hop.
        for ip in [PEER_V4, PEER1_V4] {
            hosts.gateway.exec(&["ping", "-c1", "-W2", ip]).unwrap();
        }
        hosts
    }

    /// `ip -s -d -j link show dev IFACE` in the gateway, parsed.
    fn ip_link(&self, iface: &str) -> serde_json::Value {
        let out = self
            .gateway
            .ip(&["-s", "-d", "-j", "link", "show", "dev", iface])
            .unwrap();
        let mut links: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
        links.remove(0)
    }

    /// Waits (at most 5 s) until b0's operational state is or is not UP.
    fn wait_b0_up(&self, up: bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while (self.ip_link("b0")["operstate"] == "UP") != up {
            assert!(Instant::now() < deadline, "b0 did not become up={up}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn config(mode: &str, iface: &str, peer: &str, local: &str) -> String {
    format!(
        r#"[http]
listen = "127.0.0.1:9464"

[udp]
mode = "{mode}"

[[udp.forward]]
name = "echo"
ingress = "{iface}"
match = {{ dst_port = 5000 }}
to = {{ iface = "{iface}", dst_ip = "{peer}", dst_port = 6000, src_ip = "{local}" }}
"#
    )
}

fn metric(text: &str, series: &str) -> u64 {
    http::metric(text, series).unwrap() as u64
}

const COUNTERS: [&str; 8] = [
    "receive_packets",
    "transmit_packets",
    "receive_bytes",
    "transmit_bytes",
    "receive_dropped",
    "transmit_dropped",
    "receive_errors",
    "transmit_errors",
];
/// The same counters in `ip -s -j link`'s stats64: (direction, key).
const IP_STATS: [(&str, &str); 8] = [
    ("rx", "packets"),
    ("tx", "packets"),
    ("rx", "bytes"),
    ("tx", "bytes"),
    ("rx", "dropped"),
    ("tx", "dropped"),
    ("rx", "errors"),
    ("tx", "errors"),
];

/// The counters of `iface` in a scrape, in the order of [`COUNTERS`].
fn counters(text: &str, iface: &str) -> [u64; 8] {
    COUNTERS.map(|c| {
        metric(
            text,
            &format!("edgeplane_interface_{c}_total{{iface=\"{iface}\"}}"),
        )
    })
}

/// The kernel's counters of `iface`, read after the scrape, can only be ahead of the metrics,
/// and only by what the stacks sent on their own in between.
fn assert_kernel_agrees(h: &Hosts, iface: &str, scraped: &[u64; 8]) {
    let stats = &h.ip_link(iface)["stats64"];
    for (i, (dir, key)) in IP_STATS.into_iter().enumerate() {
        let now = stats[dir][key].as_u64().unwrap();
        let slack = if key == "bytes" {
            BACKGROUND * 100
        } else {
            BACKGROUND
        };
        assert!(
            scraped[i] <= now && now - scraped[i] <= slack,
            "{iface} {dir} {key}: metric {} but ip says {now}",
            scraped[i]
        );
    }
}

fn in_range(what: &str, moved: u64, at_least: u64, slack: u64) {
    assert!(
        (at_least..=at_least + slack).contains(&moved),
        "{what} moved by {moved}, expected {at_least} (+ at most {slack} of the stacks' own)"
    );
}

fn counters_queue_length_state_and_reload(tag: &str, mode: &str) {
    let h = Hosts::new(tag);
    let agent = Agent::start(&h.gateway, &config(mode, "b0", PEER_V4, BOX_V4), "info").unwrap();

    // Sockets stay in the namespace they were made in.
    let sink = {
        let _in = h.gateway.enter().unwrap();
        let s = UdpSocket::bind((BOX_V4, 5001)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        s
    };
    let (rx, tx) = {
        let _in = h.peer.enter().unwrap();
        let rx = UdpSocket::bind((PEER_V4, 6000)).unwrap();
        rx.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        (rx, UdpSocket::bind((PEER_V4, 0)).unwrap())
    };

    let before = counters(&agent.scrape(), "b0");
    let mut buf = [0u8; 2048];
    // One at a time: the socket buffers can't overflow and drop some.
    let (mut echoed, mut sunk) = (0u64, 0u64);
    for i in 0..N {
        tx.send_to(&[i as u8; PAYLOAD], (BOX_V4, 5000)).unwrap();
        if rx.recv(&mut buf).is_ok_and(|n| n == PAYLOAD) {
            echoed += 1;
        }
    }
    for i in 0..M {
        tx.send_to(&[i as u8; PAYLOAD], (BOX_V4, 5001)).unwrap();
        if sink.recv(&mut buf).is_ok_and(|n| n == PAYLOAD) {
            sunk += 1;
        }
    }
    assert_eq!((echoed, sunk), (N, M), "{}", agent.log_so_far());

    let started = Instant::now();
    let text = agent.scrape();
    let scrape_ms = started.elapsed().as_secs_f64() * 1e3;
    let after = counters(&text, "b0");
    assert_kernel_agrees(&h, "b0", &after);
    let moved: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    eprintln!(
        "{mode}: b0 moved by {moved:?} ({COUNTERS:?}) for {N} datagrams echoed and {M} received \
         of {PAYLOAD} bytes; scrape {scrape_ms:.1} ms"
    );
    assert_eq!(
        metric(&text, "edgeplane_udp_forward_packets_total{rule=\"echo\"}"),
        N
    );
    let wire = |n: u64| n * (HEADERS + PAYLOAD as u64);
    in_range("rx packets", moved[0], N + M, BACKGROUND);
    in_range("tx packets", moved[1], N, BACKGROUND);
    in_range("rx bytes", moved[2], wire(N + M), BACKGROUND * 100);
    in_range("tx bytes", moved[3], wire(N), BACKGROUND * 100);
    for (i, what) in [
        (4, "rx dropped"),
        (5, "tx dropped"),
        (6, "rx errors"),
        (7, "tx errors"),
    ] {
        in_range(what, moved[i], 0, 0);
    }
    http::promtool_accepts(&text);

    // Drops: the peer's MTU shrinks below the datagrams the gateway sends it, so b0's veth
    // can't hand them over and drops each (counted as b0's tx_dropped on every kernel; a
    // peer that is down would not do: older kernels then drop in the qdisc, not the device).
    h.peer.ip(&["link", "set", "p0", "mtu", "1000"]).unwrap();
    let before = after;
    {
        let _in = h.gateway.enter().unwrap();
        let out = UdpSocket::bind((BOX_V4, 0)).unwrap();
        for i in 0..D {
            out.send_to(&[i as u8; BIG_PAYLOAD], (PEER_V4, 6000))
                .unwrap();
        }
    }
    let text = agent.scrape();
    let after = counters(&text, "b0");
    assert_kernel_agrees(&h, "b0", &after);
    let moved: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    eprintln!(
        "{mode}: {D} datagrams of {BIG_PAYLOAD} bytes to a peer with MTU 1000: b0 moved by \
         {moved:?}"
    );
    in_range("tx dropped", moved[5], D, 0);
    in_range("tx packets", moved[1], 0, BACKGROUND);
    in_range("rx packets", moved[0], 0, BACKGROUND);
    h.peer.ip(&["link", "set", "p0", "mtu", "1500"]).unwrap();

    // Queue length and state as `ip -d link` says, after they changed.
    h.gateway
        .ip(&["link", "set", "b0", "txqueuelen", "321"])
        .unwrap();
    h.peer.ip(&["link", "set", "p0", "down"]).unwrap();
    h.wait_b0_up(false);
    let kernel = h.ip_link("b0");
    let text = agent.scrape();
    eprintln!(
        "{mode}: peer down: ip says operstate {}, txqlen {}",
        kernel["operstate"], kernel["txqlen"]
    );
    assert_eq!(kernel["txqlen"], 321);
    assert_eq!(
        metric(&text, "edgeplane_interface_tx_queue_length{iface=\"b0\"}"),
        321
    );
    // A veth whose peer is down has no carrier: "DOWN" (NO-CARRIER), not up.
    assert_ne!(kernel["operstate"], "UP");
    assert_eq!(metric(&text, "edgeplane_interface_up{iface=\"b0\"}"), 0);
    h.peer.ip(&["link", "set", "p0", "up"]).unwrap();
    h.wait_b0_up(true);
    let text = agent.scrape();
    assert_eq!(metric(&text, "edgeplane_interface_up{iface=\"b0\"}"), 1);

    // Only the interfaces the config names.
    for other in ["lo", "p0", "b1"] {
        assert!(
            !text.contains(&format!("iface=\"{other}\"")),
            "{other} exported:\n{text}"
        );
    }
    // veth is no CAN controller.
    assert!(!text.contains("edgeplane_can_controller_state{"), "{text}");

    // A reload to a rule on b1: the metrics follow the new config's interfaces.
    std::fs::write(&agent.config, config(mode, "b1", PEER1_V4, BOX1_V4)).unwrap();
    agent.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = agent.scrape();
        if http::metric(&text, "edgeplane_config_reloads_total{result=\"success\"}")
            .is_ok_and(|v| v >= 1.0)
        {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "reload not applied:\n{}",
            agent.log_so_far()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!text.contains("iface=\"b0\""), "b0 still exported:\n{text}");
    let b1 = counters(&text, "b1");
    assert_kernel_agrees(&h, "b1", &b1);
    assert_eq!(metric(&text, "edgeplane_interface_up{iface=\"b1\"}"), 1);
}

#[test]
fn kernel_rules_interface_counters_queue_length_state_and_reload() {
    counters_queue_length_state_and_reload("ifk", "tc");
}

/// Everything in userspace (no eBPF data plane loaded): the host metrics are there all the
/// same.
#[test]
fn userspace_rules_interface_counters_queue_length_state_and_reload() {
    counters_queue_length_state_and_reload("ifu", "userspace");
}
