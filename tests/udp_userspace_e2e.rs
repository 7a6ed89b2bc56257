//! End to end for the userspace engines: sender -- gateway (edgeplane, `mode = "userspace"`)
//! -- receiver in network namespaces, as in udp_forward_e2e. Every datagram must arrive
//! intact, the counters must equal the count, and the receiver sees the gateway's address as
//! the source (the documented difference from the kernel path). Also: `auto` without CAP_BPF
//! falls back to userspace and says so.

use std::{
    collections::BTreeSet,
    net::{SocketAddr, UdpSocket},
    sync::mpsc,
    time::{Duration, Instant},
};

use edgeplane_testbed::{
    agent::{Agent, Start},
    http,
    netns::{Line, Netns},
};

const N: u32 = 2000;

fn config(mode: &str, engine: &str, v4: bool) -> String {
    let to = if v4 {
        Line::RECEIVER_V4
    } else {
        Line::RECEIVER_V6
    };
    format!(
        r#"[http]
listen = "127.0.0.1:9464"

[udp]
mode = "{mode}"
engine = "{engine}"

[[udp.forward]]
name = "lidar"
ingress = "g0"
match = {{ dst_port = 5000 }}
to = {{ iface = "g1", dst_ip = "{to}", dst_port = 6000 }}
"#
    )
}

fn payload(seq: u32) -> Vec<u8> {
    let mut p = seq.to_be_bytes().to_vec();
    p.extend((0..96u32).map(|i| (seq.wrapping_mul(31).wrapping_add(i) & 0xff) as u8));
    p
}

/// Receives until N datagrams arrived or `quiet` passed without one; checks every payload and
/// returns the sequence numbers and the source addresses seen.
fn receive(
    ns: &Netns,
    bind: SocketAddr,
    ready: mpsc::Sender<()>,
) -> (BTreeSet<u32>, BTreeSet<SocketAddr>) {
    let _in = ns.enter().unwrap();
    let sock = edgeplane_testbed::bind_udp_receiver(bind).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    ready.send(()).unwrap();
    let (mut seen, mut from) = (BTreeSet::new(), BTreeSet::new());
    let mut buf = [0u8; 2048];
    while let Ok((len, src)) = sock.recv_from(&mut buf) {
        let seq = u32::from_be_bytes(buf[..4].try_into().unwrap());
        assert_eq!(&buf[..len], &payload(seq)[..], "datagram {seq} changed");
        assert!(seen.insert(seq), "datagram {seq} arrived twice");
        from.insert(src);
        if seen.len() == N as usize {
            break;
        }
    }
    (seen, from)
}

/// Sends N datagrams to the gateway's port 5000, 50 per millisecond at most.
fn exchange(line: &Line, v4: bool) -> (BTreeSet<u32>, BTreeSet<SocketAddr>) {
    exchange_while(line, v4, 50, || ())
}

/// Like [`exchange`] at `per_ms` datagrams per millisecond at most, running `during` on this
/// thread while they flow.
fn exchange_while(
    line: &Line,
    v4: bool,
    per_ms: u32,
    during: impl FnOnce() + Send,
) -> (BTreeSet<u32>, BTreeSet<SocketAddr>) {
    let (from, gw, rx): (SocketAddr, SocketAddr, SocketAddr) = if v4 {
        (
            format!("{}:4000", Line::SENDER_V4).parse().unwrap(),
            format!("{}:5000", Line::GATEWAY_IN_V4).parse().unwrap(),
            format!("{}:6000", Line::RECEIVER_V4).parse().unwrap(),
        )
    } else {
        (
            format!("[{}]:4000", Line::SENDER_V6).parse().unwrap(),
            format!("[{}]:5000", Line::GATEWAY_IN_V6).parse().unwrap(),
            format!("[{}]:6000", Line::RECEIVER_V6).parse().unwrap(),
        )
    };
    std::thread::scope(|s| {
        let (ready_tx, ready_rx) = mpsc::channel();
        let rx = s.spawn(|| receive(&line.receiver, rx, ready_tx));
        ready_rx.recv().unwrap();
        let tx = s.spawn(|| {
            let _in = line.sender.enter().unwrap();
            let sock = UdpSocket::bind(from).unwrap();
            let start = Instant::now();
            for seq in 0..N {
                sock.send_to(&payload(seq), gw).unwrap();
                if seq % per_ms == per_ms - 1 {
                    std::thread::sleep(Duration::from_millis(1));
                }
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "sending took too long"
                );
            }
        });
        during();
        tx.join().unwrap();
        rx.join().unwrap()
    })
}

fn forwards_and_counts_exactly(engine: &str, v4: bool) {
    edgeplane_testbed::require_root();
    let line = Line::new(if v4 { "u4" } else { "u6" }).unwrap();
    let mut agent = Agent::start(&line.gateway, &config("userspace", engine, v4), "info").unwrap();
    let (got, from) = exchange(&line, v4);
    let metrics = agent.scrape();
    let log = agent.stop_and_log().unwrap();
    assert_eq!(
        got.len(),
        N as usize,
        "{engine}: {} of {N} arrived\n{log}",
        got.len()
    );
    // The receiver sees the gateway's egress address (the kernel path keeps the sender's).
    let gateway_out: std::net::IpAddr = if v4 {
        Line::GATEWAY_OUT_V4.parse().unwrap()
    } else {
        "fd18:2::1".parse().unwrap()
    };
    assert!(from.iter().all(|a| a.ip() == gateway_out), "{from:?}");

    let value = |series: &str| http::metric(&metrics, series).unwrap();
    assert_eq!(
        value("edgeplane_udp_forward_packets_total{rule=\"lidar\"}"),
        f64::from(N),
        "{metrics}"
    );
    let frame_len = 14 + if v4 { 20 } else { 40 } + 8 + payload(0).len();
    assert_eq!(
        value("edgeplane_udp_forward_bytes_total{rule=\"lidar\"}"),
        f64::from(N) * frame_len as f64
    );
    assert_eq!(
        value(&format!(
            "edgeplane_udp_forward_engine{{rule=\"lidar\",engine=\"{engine}\"}}"
        )),
        1.0
    );
    assert_eq!(
        value("edgeplane_udp_forward_userspace_send_errors_total{rule=\"lidar\"}"),
        0.0
    );
    assert_eq!(value("edgeplane_udp_forward_rules"), 1.0);
    http::promtool_accepts(&metrics);
    assert!(log.contains("userspace UDP listener started"), "{log}");

    // Agent gone: nothing reaches the receiver.
    let (got, _) = exchange(&line, v4);
    assert!(
        got.is_empty(),
        "{} datagrams arrived with the agent stopped",
        got.len()
    );
}

#[test]
fn tokio_engine_ipv4() {
    forwards_and_counts_exactly("tokio", true);
}

#[test]
fn tokio_engine_ipv6() {
    forwards_and_counts_exactly("tokio", false);
}

#[test]
fn tokio_uring_engine_ipv4() {
    forwards_and_counts_exactly("tokio-uring", true);
}

#[test]
fn tokio_uring_engine_ipv6() {
    forwards_and_counts_exactly("tokio-uring", false);
}

/// SIGHUP while datagrams flow: the listener whose rules did not change keeps its socket and
/// loses nothing; the added rule forwards too.
#[test]
fn reload_keeps_unchanged_listeners_without_a_gap() {
    edgeplane_testbed::require_root();
    let line = Line::new("uh").unwrap();
    let base = config("userspace", "tokio", true);
    let agent = Agent::start(&line.gateway, &base, "info").unwrap();
    let added = format!(
        "{base}\n[[udp.forward]]\nname = \"radar\"\ningress = \"g0\"\nmatch = {{ dst_port = 5001 }}\nto = {{ iface = \"g1\", dst_ip = \"{}\", dst_port = 6000 }}\n",
        Line::RECEIVER_V4
    );
    // 2000 datagrams at about 5 per ms: the reload happens mid-stream.
    let (got, _) = exchange_while(&line, true, 5, || {
        std::thread::sleep(Duration::from_millis(100));
        std::fs::write(&agent.config, &added).unwrap();
        agent.signal(libc::SIGHUP);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !agent.log_so_far().contains("reload applied") {
            assert!(Instant::now() < deadline, "{}", agent.log_so_far());
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    assert_eq!(
        got.len(),
        N as usize,
        "lost across the reload:\n{}",
        agent.log_so_far()
    );
    let log = agent.log_so_far();
    assert_eq!(
        log.matches("userspace UDP listener started").count(),
        2,
        "only the new listener starts:\n{log}"
    );
    let metrics = agent.scrape();
    assert_eq!(
        http::metric(
            &metrics,
            "edgeplane_udp_forward_packets_total{rule=\"lidar\"}"
        )
        .unwrap(),
        f64::from(N)
    );
    assert_eq!(
        http::metric(
            &metrics,
            "edgeplane_udp_forward_engine{rule=\"radar\",engine=\"tokio\"}"
        )
        .unwrap(),
        1.0
    );
}

/// Without CAP_BPF (and CAP_SYS_ADMIN, which stands in for it) the programs can't load:
/// `auto` says so and runs the rule in userspace, with the engine metric telling which.
#[test]
fn auto_falls_back_to_userspace_when_ebpf_cannot_load() {
    edgeplane_testbed::require_root();
    let line = Line::new("fb").unwrap();
    let drop_bpf = ["setpriv", "--bounding-set=-bpf,-sys_admin,-perfmon", "--"];

    let mut agent = Agent::start_wrapped(
        &line.gateway,
        &config("auto", "tokio", true),
        "info",
        &Start::default(),
        &drop_bpf,
    )
    .unwrap();
    let (got, _) = exchange(&line, true);
    let metrics = agent.scrape();
    let log = agent.stop_and_log().unwrap();
    assert_eq!(got.len(), N as usize, "{log}");
    assert!(log.contains("the kernel path can't run"), "{log}");
    let value = |series: &str| http::metric(&metrics, series).unwrap();
    assert_eq!(
        value("edgeplane_udp_forward_packets_total{rule=\"lidar\"}"),
        f64::from(N)
    );
    assert_eq!(
        value("edgeplane_udp_forward_engine{rule=\"lidar\",engine=\"tokio\"}"),
        1.0,
        "{metrics}"
    );
    http::promtool_accepts(&metrics);
}
