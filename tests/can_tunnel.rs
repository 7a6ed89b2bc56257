//! The CAN-over-UDP tunnel between two agents (run by `cargo xtask vm-test`): host A and host B
//! in two namespaces, each with a CAN bus and a veth between them. Frames go both ways in
//! cannelloni's format; hostile datagrams change nothing on the bus but what the receiver's
//! rules allow; over WireGuard, nothing from outside the link gets in.

use std::{
    net::UdpSocket,
    time::{Duration, Instant},
};

use edgeplane_common::can::{CAN_EFF_FLAG, CAN_ERR_FLAG, CAN_RTR_FLAG, CanFrame};

/// The kernel's mark of a CAN FD frame.
const CANFD_FDF: u8 = 0x04;
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

/// Sends `frames` on `tx`, pausing `pause` after each frame `pause_after` picks, while a
/// thread collects what arrives on `rx` (until all came and the bus was quiet, or `LIMIT`).
fn send_and_collect(
    tx: &Bus,
    rx: &Bus,
    frames: &[Frame],
    pause_after: impl Fn(usize) -> bool,
    pause: Duration,
) -> Vec<Frame> {
    std::thread::scope(|s| {
        let reader = s.spawn(|| rx.collect_at_least(frames.len(), QUIET, LIMIT));
        for (i, f) in frames.iter().enumerate() {
            tx.send(f).unwrap();
            if pause_after(i) {
                std::thread::sleep(pause);
            }
        }
        reader.join().unwrap()
    })
}

fn m(text: &str, series: &str) -> f64 {
    http::metric(text, series).unwrap()
}

fn frames(n: u32) -> Vec<Frame> {
    (0..n)
        .map(|i| match i % 3 {
            // A few IDs, each seen many times: CAN's ordering promise is per ID.
            0 => Frame::classic(0x100 + (i / 3) % 4, &i.to_be_bytes()),
            1 => Frame::fd(0x1234_0000 | ((i / 3) % 4) | CAN_EFF_FLAG, &[i as u8; 48]),
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
    // About 3 frames per ms: a busy CAN FD bus.
    let got = send_and_collect(
        &a_tx,
        &b_rx,
        &sent,
        |i| i % 3 == 2,
        Duration::from_millis(1),
    );
    assert_eq!(
        got.len(),
        sent.len(),
        "A -> B: {} of {} frames arrived; where they were lost:\n{}",
        got.len(),
        sent.len(),
        loss_report(&h, &agent_a, &agent_b)
    );
    assert_same_frames_in_id_order(&got, &sent, "A -> B");
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
    let got: Vec<Frame> =
        send_and_collect(&b_tx, &a_rx, &back, |_| true, Duration::from_micros(300))
            .into_iter()
            .filter(|f| back.contains(f))
            .collect();
    assert_same_frames_in_id_order(&got, &back, "B -> A");

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

/// A frame as a test puts it into a datagram: CAN FD when `fd` has its flags byte.
struct Wire {
    can_id: u32,
    fd: Option<u8>,
    /// The length byte (without 0x80), for lengths that do not match the data.
    len: Option<u8>,
    data: Vec<u8>,
}

fn classic(can_id: u32, data: &[u8]) -> Wire {
    Wire {
        can_id,
        fd: None,
        len: None,
        data: data.to_vec(),
    }
}

fn fd(can_id: u32, flags: u8, data: &[u8]) -> Wire {
    Wire {
        can_id,
        fd: Some(flags),
        len: None,
        data: data.to_vec(),
    }
}

/// A cannelloni v2 datagram: header with `seq` and the frame count, then the frames.
fn datagram(seq: u8, frames: &[Wire]) -> Vec<u8> {
    let mut d = vec![2, 0, seq];
    d.extend_from_slice(&(frames.len() as u16).to_be_bytes());
    for f in frames {
        d.extend_from_slice(&f.can_id.to_be_bytes());
        let len = f.len.unwrap_or(f.data.len() as u8);
        match f.fd {
            Some(flags) => d.extend_from_slice(&[len | 0x80, flags]),
            None => d.push(len),
        }
        d.extend_from_slice(&f.data);
    }
    d
}

/// The bytes a reader should see for a frame the receiver wrote: a classic frame's 16 bytes,
/// or the CAN FD frame with its flags as carried, plus CANFD_FDF where the kernel adds it to
/// every CAN FD frame sent through CAN_RAW (`kernel_fdf`: 6.1 does, 5.10 does not).
fn on_the_bus(f: &Wire, kernel_fdf: u8) -> (CanFrame, bool) {
    let mut raw = CanFrame {
        can_id: f.can_id,
        len: f.data.len() as u8,
        flags: f.fd.map_or(0, |flags| flags | kernel_fdf),
        ..CanFrame::default()
    };
    if f.can_id & CAN_RTR_FLAG != 0 {
        raw.len = f.len.unwrap_or(0);
    }
    raw.data[..f.data.len()].copy_from_slice(&f.data);
    (raw, f.fd.is_some())
}

/// What this kernel does to a CAN FD frame written through CAN_RAW without CANFD_FDF.
fn kernel_adds_fdf(ns: &Netns, from: &str, to: &str) -> u8 {
    let (tx, rx) = (Bus::open(ns, from).unwrap(), Bus::open(ns, to).unwrap());
    let probe = Frame::fd(0x7ff, &[1, 2, 3]);
    tx.send(&probe).unwrap();
    let (raw, is_fd) = rx.recv_raw().expect("the probe frame arrived");
    assert!(is_fd && raw.can_id == 0x7ff, "{raw:?}");
    raw.flags & CANFD_FDF
}

fn rejected(text: &str, tunnel: &str, reason: &str) -> f64 {
    m(
        text,
        &format!("edgeplane_can_tunnel_rejected_total{{tunnel=\"{tunnel}\",reason=\"{reason}\"}}"),
    )
}

/// Every class of hostile datagram against one receiver, in sequence: from an unknown
/// address or a spoofed port, malformed (each decode error), error and remote frames, IDs the
/// `accept` filters refuse, a CAN FD remote frame, lengths that do not match, a count over
/// the maximum, a replay, a reorder, a gap, a restarted peer and a flood over the rate. The
/// bus gets exactly the frames the rules allow, byte for byte, and each class is counted by
/// reason.
#[test]
fn hostile_datagrams_change_nothing_on_the_bus_but_what_the_rules_allow() {
    let h = Hosts::new();
    let kernel_fdf = kernel_adds_fdf(&h.b, "b0", "b1");
    let config = format!(
        r#"[http]
listen = "127.0.0.1:9464"

[[can.receive]]
name = "from-peer"
listen = "{B_IP}:20000"
iface = "b0"
peer = "{A_IP}:30000"
accept = ["100:700"]
accept_remote_frames = false
max_frame_rate = 4
max_burst = 40
max_frames_per_datagram = 100

[[can.receive]]
name = "open"
listen = "{B_IP}:20002"
iface = "b0"
peer = "any"
accept_fd_frames = false
"#
    );
    let agent_b = Agent::start(&h.b, &config, "info").unwrap();
    assert!(
        agent_b
            .log_so_far()
            .contains("accepts datagrams from any sender"),
        "no warning for peer = \"any\":\n{}",
        agent_b.log_so_far()
    );
    let b_rx = Bus::open(&h.b, "b1").unwrap();
    h.a.ip(&["addr", "add", "198.18.7.9/24", "dev", "ta0"])
        .unwrap();
    let _in = h.a.enter().unwrap();
    let peer = UdpSocket::bind(format!("{A_IP}:30000")).unwrap();
    let other_port = UdpSocket::bind(format!("{A_IP}:30001")).unwrap();
    let stranger = UdpSocket::bind("198.18.7.9:30000").unwrap();
    let to = format!("{B_IP}:20000");
    let send = |d: &[u8]| {
        peer.send_to(d, &to).unwrap();
    };
    let mut allowed: Vec<Wire> = Vec::new();

    // Good frames, byte for byte: classic, CAN FD with BRS, CAN FD carrying FDF itself, a
    // classic frame without data.
    let first = vec![
        classic(0x123, &[0xab, 0xcd]),
        fd(0x150, 0x01, &[0x5a; 12]),
        fd(0x151, 0x05, &[1, 2, 3, 4, 5, 6, 7, 8]),
        classic(0x160, &[]),
    ];
    let first_datagram = datagram(0, &first);
    send(&first_datagram);
    allowed.extend(first);
    // Unknown address; the peer's address from another port.
    stranger.send_to(&first_datagram, &to).unwrap();
    other_port.send_to(&first_datagram, &to).unwrap();
    // Kinds and IDs: an error frame, a remote frame, IDs outside 100:700.
    send(&datagram(
        1,
        &[classic(0x100 | CAN_ERR_FLAG, &[0; 8]), classic(0x124, &[1])],
    ));
    allowed.push(classic(0x124, &[1]));
    let mut rtr = classic(0x125 | CAN_RTR_FLAG, &[]);
    rtr.len = Some(4);
    send(&datagram(2, &[rtr]));
    send(&datagram(
        3,
        &[
            classic(0x300, &[3]),
            classic(0x18FE_F200 | CAN_EFF_FLAG, &[3]),
        ],
    ));
    // Rejected whole: each is a datagram that decodes to nothing the bus can carry as is.
    let mut malformed: Vec<(&str, Vec<u8>)> = Vec::new();
    malformed.push((
        "fd_remote",
        datagram(4, &[fd(0x126 | CAN_RTR_FLAG, 0x01, &[])]),
    ));
    for (len, data) in [(9u8, 8usize), (13, 13), (65, 64)] {
        let mut w = if len == 9 {
            classic(0x127, &vec![0; data])
        } else {
            fd(0x127, 0x01, &vec![0; data])
        };
        w.len = Some(len);
        malformed.push(("bad_length", datagram(4, &[w])));
    }
    malformed.push(("bad_flags", datagram(4, &[fd(0x127, 0x11, &[1])])));
    malformed.push(("bad_id", datagram(4, &[classic(0x800, &[1])])));
    let oversize: Vec<Wire> = (0..101).map(|_| classic(0x170, &[])).collect();
    malformed.push(("too_many_frames", datagram(4, &oversize)));
    let good = datagram(4, &[classic(0x127, &[7])]);
    malformed.push(("truncated", good[..4].to_vec()));
    let mut v = good.clone();
    v[4] = 2; // announces two frames, carries one
    malformed.push(("truncated", v));
    let mut v = good.clone();
    v[0] = 3;
    malformed.push(("bad_version", v));
    let mut v = good.clone();
    v[1] = 1;
    malformed.push(("bad_op_code", v));
    let mut v = good.clone();
    v.push(0x55);
    malformed.push(("trailing_bytes", v));
    for (_, d) in &malformed {
        send(d);
    }
    // A replay of the first datagram; then 6 before 5 (reordered); 7 never comes.
    send(&first_datagram);
    send(&datagram(6, &[classic(0x126, &[6])]));
    send(&datagram(5, &[classic(0x127, &[5])]));
    send(&datagram(8, &[classic(0x128, &[8])]));
    allowed.extend([
        classic(0x126, &[6]),
        classic(0x127, &[5]),
        classic(0x128, &[8]),
    ]);
    // 4 and 7 are lost once they fall 64 datagrams behind.
    for seq in 9..=72 {
        send(&datagram(seq, &[]));
    }
    // The peer starts again, far from where it was.
    send(&datagram(200, &[classic(0x129, &[9])]));
    allowed.push(classic(0x129, &[9]));
    // The "open" receiver takes anyone's classic frames but no CAN FD frames.
    stranger
        .send_to(
            &datagram(0, &[classic(0x140, &[4]), fd(0x141, 0x01, &[4])]),
            format!("{B_IP}:20002"),
        )
        .unwrap();

    // The two receivers write concurrently: each one's frames in order.
    let expected: Vec<(CanFrame, bool)> =
        allowed.iter().map(|f| on_the_bus(f, kernel_fdf)).collect();
    let (open, got): (Vec<_>, Vec<_>) =
        (b_rx.collect_raw(QUIET, LIMIT).into_iter()).partition(|(f, _)| f.can_id == 0x140);
    assert_eq!(
        got, expected,
        "the bus got other frames than the rules allow"
    );
    assert_eq!(open, [on_the_bus(&classic(0x140, &[4]), kernel_fdf)]);

    // A flood: 100 frames in one datagram once the bucket is full again (40 frames, filling
    // at 4 per second: the 9 taken are back after 2.25 s); those over the burst are dropped.
    std::thread::sleep(Duration::from_millis(2500));
    let flood: Vec<Wire> = (0..100u8).map(|i| classic(0x130, &[i])).collect();
    send(&datagram(201, &flood));
    let got = b_rx.collect_raw(QUIET, LIMIT);
    let written = got.len();
    // The burst, and what the rate refilled while the receiver wrote it (one per 250 ms).
    assert!(
        (40..=45).contains(&written),
        "{written} of 100 flood frames written, for a burst of 40 at 4 frames/s"
    );
    let bus: Vec<(CanFrame, bool)> = flood.iter().map(|f| on_the_bus(f, kernel_fdf)).collect();
    assert_eq!(got[..40], bus[..40]);
    let mut at = 40;
    for f in &got[40..] {
        at += bus[at..]
            .iter()
            .position(|b| b == f)
            .expect("a flood frame, in order")
            + 1;
    }

    let mb = agent_b.scrape();
    let mut reasons: Vec<(&str, usize)> = vec![("unknown_peer", 2), ("replay", 1)];
    for reason in [
        "truncated",
        "bad_version",
        "bad_op_code",
        "bad_length",
        "trailing_bytes",
        "too_many_frames",
        "bad_flags",
        "bad_id",
        "fd_remote",
    ] {
        reasons.push((reason, malformed.iter().filter(|c| c.0 == reason).count()));
    }
    let mut summary = Vec::new();
    for (reason, want) in &reasons {
        assert!(*want > 0, "{reason}: no case");
        assert_eq!(
            rejected(&mb, "from-peer", reason),
            *want as f64,
            "{reason}\n{mb}"
        );
        summary.push(format!("{reason} {want}"));
    }
    let dropped = |tunnel: &str, reason: &str| {
        m(
            &mb,
            &format!(
                "edgeplane_can_tunnel_dropped_total{{tunnel=\"{tunnel}\",reason=\"{reason}\"}}"
            ),
        )
    };
    for (reason, want) in [
        ("error_frame", 1),
        ("remote_frame", 1),
        ("filter", 2),
        ("fd_frame", 0),
        ("rate_limit", 100 - written),
    ] {
        assert_eq!(dropped("from-peer", reason), want as f64, "{reason}\n{mb}");
        summary.push(format!("{reason} {want}"));
    }
    assert_eq!(dropped("open", "fd_frame"), 1.0, "{mb}");
    for (event, want) in [
        ("lost", 2),
        ("reordered", 1),
        ("duplicate", 1),
        ("restart", 1),
    ] {
        assert_eq!(
            m(
                &mb,
                &format!(
                    "edgeplane_can_tunnel_sequence_total{{tunnel=\"from-peer\",event=\"{event}\"}}"
                )
            ),
            f64::from(want),
            "{event}\n{mb}"
        );
        summary.push(format!("sequence {event} {want}"));
    }
    assert_eq!(
        m(
            &mb,
            "edgeplane_can_tunnel_frames_total{tunnel=\"from-peer\",direction=\"rx\"}"
        ),
        (allowed.len() + written) as f64
    );
    eprintln!(
        "hostile classes (kernel adds FDF: {}): {}",
        kernel_fdf != 0,
        summary.join(", ")
    );
}

/// WireGuard's fixed test keys (private; the public ones are derived with `wg pubkey`).
const WG_KEYS: [&str; 2] = [
    "2/kwqDjW4KpS/grYbmJLNZp3V9CIsY538dqJBhGl3L4=",
    "rSOARFEKtOW0+5epwdBQbjIOj8GsVxkCPkMtqWXNfZw=",
];
const WG_A: &str = "10.77.0.1";
const WG_B: &str = "10.77.0.2";

fn wg_pubkey(private: &str) -> String {
    use std::io::Write as _;
    let mut c = std::process::Command::new("wg")
        .arg("pubkey")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("wg (wireguard-tools) runs");
    c.stdin
        .take()
        .unwrap()
        .write_all(private.as_bytes())
        .unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A wg0 in `ns` with address `ip`, talking to the peer at `endpoint` that owns `peer_ip`.
fn wireguard(ns: &Netns, i: usize, ip: &str, peer_ip: &str, endpoint: &str) {
    let key = format!("/tmp/wg-{}-{i}.key", std::process::id());
    std::fs::write(&key, WG_KEYS[i]).unwrap();
    ns.ip(&["link", "add", "wg0", "type", "wireguard"]).unwrap();
    ns.exec(&[
        "wg",
        "set",
        "wg0",
        "private-key",
        &key,
        "listen-port",
        "51820",
        "peer",
        &wg_pubkey(WG_KEYS[1 - i]),
        "allowed-ips",
        &format!("{peer_ip}/32"),
        "endpoint",
        endpoint,
    ])
    .unwrap();
    std::fs::remove_file(&key).unwrap();
    ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "wg0"])
        .unwrap();
    ns.ip(&["link", "set", "wg0", "up"]).unwrap();
}

/// WireGuard's handshake waits for the kernel's random generator (get_random_bytes_wait).
/// The 5.10 VM has no entropy source and initialises it only about 2 minutes after boot,
/// unless a blocking getrandom() makes the kernel gather timer jitter, which takes seconds.
fn wait_for_kernel_random() {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 16];
        // SAFETY: writes at most 16 bytes into buf.
        let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
        let _ = tx.send(n);
    });
    let n = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the kernel's random generator was not ready within 60 s");
    assert_eq!(n, 16, "getrandom: {}", std::io::Error::last_os_error());
}

/// The kernel's count of UDP datagrams that found no socket (`Udp: ... NoPorts`).
fn udp_no_ports(ns: &Netns) -> u64 {
    let snmp = ns.exec(&["cat", "/proc/net/snmp"]).unwrap();
    let udp: Vec<Vec<&str>> = (snmp.lines())
        .filter(|l| l.starts_with("Udp: "))
        .map(|l| l.split_whitespace().collect())
        .collect();
    let at = udp[0].iter().position(|h| *h == "NoPorts").unwrap();
    udp[1][at].parse().unwrap()
}

/// The recommended deployment: the tunnel over a WireGuard link, the receiver bound to it.
/// Frames cross; datagrams to the receiver's port from outside the link — to B's underlay
/// address, or to its WireGuard address with the peer's WireGuard address as a spoofed
/// source, from a host on B's Ethernet — never reach the receiver: the kernel refuses them
/// (counted in NoPorts) and nothing else reaches the bus.
#[test]
fn the_tunnel_over_wireguard_takes_frames_from_the_link_only() {
    let h = Hosts::new();
    wait_for_kernel_random();
    wireguard(&h.a, 0, WG_A, WG_B, &format!("{B_IP}:51820"));
    wireguard(&h.b, 1, WG_B, WG_A, &format!("{A_IP}:51820"));
    // An attacker on B's Ethernet claiming A's WireGuard address.
    let m_ns = Netns::new("tunm").unwrap();
    veth(&m_ns, "tm0", &h.b, "tb1").unwrap();
    h.b.ip(&["link", "set", "tb1", "up"]).unwrap();
    for (key, value) in [
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.tb1.rp_filter", "0"),
    ] {
        h.b.sysctl(key, value).unwrap();
    }
    m_ns.ip(&["addr", "add", &format!("{WG_A}/32"), "dev", "tm0"])
        .unwrap();
    m_ns.ip(&["link", "set", "tm0", "up"]).unwrap();
    m_ns.ip(&["route", "add", &format!("{WG_B}/32"), "dev", "tm0"])
        .unwrap();
    let mac = h.b.mac("tb1").unwrap();
    let mac = mac.map(|b| format!("{b:02x}")).join(":");
    m_ns.ip(&["neigh", "add", WG_B, "lladdr", &mac, "dev", "tm0"])
        .unwrap();

    let config_a = format!(
        r#"[http]
listen = "127.0.0.1:9464"

[[can.route]]
name = "to-b"
ingress = "a0"
filter = "0:0"
to = {{ udp = "{WG_B}:20000" }}
"#
    );
    let config_b = format!(
        r#"[http]
listen = "127.0.0.1:9464"

[[can.receive]]
name = "from-a"
listen = "0.0.0.0:20000"
bind_iface = "wg0"
iface = "b0"
peer = "{WG_A}"
"#
    );
    let agent_a = Agent::start(&h.a, &config_a, "info").unwrap();
    let agent_b = Agent::start(&h.b, &config_b, "info").unwrap();
    let (a_tx, b_rx) = (
        Bus::open(&h.a, "a1").unwrap(),
        Bus::open(&h.b, "b1").unwrap(),
    );

    let sent = frames(300);
    let got = send_and_collect(&a_tx, &b_rx, &sent, |_| true, Duration::from_micros(500));
    assert_eq!(
        got.len(),
        sent.len(),
        "{}",
        loss_report(&h, &agent_a, &agent_b)
    );
    assert_same_frames_in_id_order(&got, &sent, "A -> B over WireGuard");

    // From outside the link, to the same port: a good datagram each time.
    let good = datagram(0, &[classic(0x123, &[0xab, 0xcd])]);
    let no_ports = udp_no_ports(&h.b);
    let n = 20;
    {
        let _in = h.a.enter().unwrap();
        let s = UdpSocket::bind(format!("{A_IP}:0")).unwrap();
        for _ in 0..n {
            s.send_to(&good, format!("{B_IP}:20000")).unwrap();
        }
    }
    {
        let _in = m_ns.enter().unwrap();
        let s = UdpSocket::bind(format!("{WG_A}:0")).unwrap();
        for _ in 0..n {
            s.send_to(&good, format!("{WG_B}:20000")).unwrap();
        }
    }
    assert!(
        b_rx.collect(QUIET, LIMIT).is_empty(),
        "a datagram from outside the WireGuard link reached the bus"
    );
    let refused = udp_no_ports(&h.b) - no_ports;
    assert_eq!(refused, 2 * n, "{}", h.b.udp_counters());
    let mb = agent_b.scrape();
    assert_eq!(
        m(
            &mb,
            "edgeplane_can_tunnel_frames_total{tunnel=\"from-a\",direction=\"rx\"}"
        ),
        sent.len() as f64
    );
    assert_eq!(rejected(&mb, "from-a", "unknown_peer"), 0.0);
    eprintln!(
        "over WireGuard: {} frames crossed; {refused} datagrams from outside the link refused by the kernel (Udp NoPorts), none reached the receiver",
        sent.len()
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
