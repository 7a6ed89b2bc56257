//! Host metrics end to end: two namespaces joined by a veth, the agent on one side with a rule
//! that sends datagrams back out of the interface they came in by, real datagrams. The
//! interface counters in /metrics must have moved by at least what was sent, and the queue
//! length and state must be what `ip -d link` says.

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

const N: u64 = 500;
const PAYLOAD: usize = 200;
/// Ethernet, IPv4 and UDP headers: what the interface counts besides the payload.
const HEADERS: u64 = 14 + 20 + 8;

const PEER_V4: &str = "198.18.1.2";
const BOX_V4: &str = "198.18.1.1";

/// `peer` p0 ---- b0 `box` (the agent).
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
        veth(&hosts.peer, "p0", &hosts.gateway, "b0").unwrap();
        hosts
            .peer
            .ip(&["addr", "add", &format!("{PEER_V4}/24"), "dev", "p0"])
            .unwrap();
        hosts
            .gateway
            .ip(&["addr", "add", &format!("{BOX_V4}/24"), "dev", "b0"])
            .unwrap();
        hosts.gateway.enable_forwarding().unwrap();
        // The gateway learns the peer's MAC, so the rule's FIB lookup finds its next hop.
        hosts
            .gateway
            .exec(&["ping", "-c1", "-W2", PEER_V4])
            .unwrap();
        hosts
    }

    fn scrape(&self, agent: &Agent) -> String {
        let _in = self.gateway.enter().unwrap();
        http::get(agent.metrics, "/metrics").unwrap().1
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
}

fn metric(text: &str, series: &str) -> u64 {
    http::metric(text, series).unwrap() as u64
}

/// The counters of `b0` in a scrape, in the order of [`COUNTERS`].
fn counters(text: &str) -> Vec<u64> {
    COUNTERS
        .iter()
        .map(|c| {
            metric(
                text,
                &format!("edgeplane_interface_{c}_total{{iface=\"b0\"}}"),
            )
        })
        .collect()
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

#[test]
fn interface_counters_queue_length_and_state_follow_the_kernel() {
    let h = Hosts::new("ifm");
    let agent = Agent::start(
        &h.gateway,
        &format!(
            r#"[http]
listen = "127.0.0.1:9464"

[[udp.forward]]
name = "echo"
ingress = "b0"
match = {{ dst_port = 5000 }}
to = {{ iface = "b0", dst_ip = "{PEER_V4}", dst_port = 6000, src_ip = "{BOX_V4}" }}
"#
        ),
        "info",
    )
    .unwrap();

    let before = counters(&h.scrape(&agent));
    let received = {
        let _in = h.peer.enter().unwrap();
        let rx = UdpSocket::bind((PEER_V4, 6000)).unwrap();
        rx.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let tx = UdpSocket::bind((PEER_V4, 0)).unwrap();
        let mut received = 0u64;
        let mut buf = [0u8; 2048];
        for i in 0..N {
            tx.send_to(&[i as u8; PAYLOAD], (BOX_V4, 5000)).unwrap();
            // One at a time: the socket buffers can't overflow and drop some.
            if rx.recv(&mut buf).is_ok_and(|n| n == PAYLOAD) {
                received += 1;
            }
        }
        received
    };
    assert_eq!(received, N, "{}", agent.log_so_far());

    let started = Instant::now();
    let text = h.scrape(&agent);
    let scrape_ms = started.elapsed().as_secs_f64() * 1e3;
    let after = counters(&text);
    let kernel = h.ip_link("b0");
    let moved: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    eprintln!(
        "b0 moved by {:?} ({COUNTERS:?}) for {N} datagrams in and {N} out; scrape {scrape_ms:.1} ms",
        moved
    );
    assert_eq!(
        metric(&text, "edgeplane_udp_forward_packets_total{rule=\"echo\"}"),
        N
    );
    let wire = N * (HEADERS + PAYLOAD as u64);
    assert!(moved[0] >= N && moved[1] >= N, "{moved:?}");
    assert!(moved[2] >= wire && moved[3] >= wire, "{moved:?}");
    // The kernel's own counters, read after the scrape, can only be ahead of it.
    let stats = &kernel["stats64"];
    for (i, (key, dir)) in [
        ("packets", "rx"),
        ("packets", "tx"),
        ("bytes", "rx"),
        ("bytes", "tx"),
        ("dropped", "rx"),
        ("dropped", "tx"),
        ("errors", "rx"),
        ("errors", "tx"),
    ]
    .into_iter()
    .enumerate()
    {
        let now = stats[dir][key].as_u64().unwrap();
        assert!(
            after[i] <= now && now - after[i] < N,
            "{dir} {key}: metric {} but ip says {now}",
            after[i]
        );
    }

    // Queue length and state as `ip -d link` says, here and after they change.
    h.gateway
        .ip(&["link", "set", "b0", "txqueuelen", "321"])
        .unwrap();
    h.peer.ip(&["link", "set", "p0", "down"]).unwrap();
    let kernel = h.ip_link("b0");
    let text = h.scrape(&agent);
    assert_eq!(kernel["txqlen"], 321);
    assert_eq!(
        metric(&text, "edgeplane_interface_tx_queue_length{iface=\"b0\"}"),
        321
    );
    // A veth whose peer is down has no carrier: "LOWERLAYERDOWN", not up.
    assert_ne!(kernel["operstate"], "UP");
    assert_eq!(metric(&text, "edgeplane_interface_up{iface=\"b0\"}"), 0);
    h.peer.ip(&["link", "set", "p0", "up"]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.ip_link("b0")["operstate"] != "UP" {
        assert!(Instant::now() < deadline, "b0 did not come up again");
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = h.scrape(&agent);
    assert_eq!(metric(&text, "edgeplane_interface_up{iface=\"b0\"}"), 1);

    // Only the interfaces the config names.
    for other in ["lo", "p0"] {
        assert!(
            !text.contains(&format!("iface=\"{other}\"")),
            "{other} exported:\n{text}"
        );
    }
    // veth is no CAN controller.
    assert!(!text.contains("edgeplane_can_controller_state{"), "{text}");
}
