//! CAN routes in userspace (`can.mode = "userspace"`) inside a real kernel with CAN (run by
//! `cargo xtask vm-test`): the same frames and expectations as tests/can_route.rs's kernel
//! routes, byte for byte, with the same counters.

use std::time::Duration;

use edgeplane_common::can::{CAN_EFF_FLAG, CAN_RTR_FLAG};
use edgeplane_testbed::{agent::Agent, http, netns::Netns, require_root};
use edgeplane_tests::can::{Bus, Frame, vxcan_pair};

const QUIET: Duration = Duration::from_millis(500);
const LIMIT: Duration = Duration::from_secs(20);

/// Bus A (`a0` agent side, `a1` test side) and B, CAN FD; C classic only.
fn buses(tag: &str) -> Netns {
    require_root();
    let ns = Netns::new(tag).unwrap();
    vxcan_pair(&ns, "a0", "a1", true).unwrap();
    vxcan_pair(&ns, "b0", "b1", true).unwrap();
    vxcan_pair(&ns, "c0", "c1", false).unwrap();
    ns
}

fn agent(ns: &Netns, routes: &str) -> Agent {
    let config =
        format!("[http]\nlisten = \"127.0.0.1:9464\"\n\n[can]\nmode = \"userspace\"\n\n{routes}");
    Agent::start(ns, &config, "info").unwrap()
}

fn readyz(ns: &Netns, agent: &Agent) -> String {
    let _in = ns.enter().unwrap();
    http::get(agent.metrics, "/readyz").unwrap().1
}

fn metric(m: &str, series: &str) -> f64 {
    http::metric(m, series).unwrap()
}

#[test]
fn routes_what_the_filter_matches_classic_fd_extended_and_remote() {
    let ns = buses("cus");
    let agent = agent(
        &ns,
        r#"[[can.route]]
name = "body"
ingress = "a0"
filter = "100:7F0"
to = { iface = "b0" }
"#,
    );
    let (tx, rx) = (Bus::open(&ns, "a1").unwrap(), Bus::open(&ns, "b1").unwrap());
    let mut expected = Vec::new();
    for i in 0..16u32 {
        let f = Frame::classic(0x100 + i, &[i as u8; 8][..(i % 9) as usize]);
        tx.send(&f).unwrap();
        expected.push(f);
        tx.send(&Frame::classic(0x110 + i, &[0xee; 4])).unwrap();
    }
    let fd = Frame::fd(0x105, &(0..64).collect::<Vec<u8>>());
    // The filter's mask leaves the EFF flag out: the extended ID 0x100 matches too.
    let eff = Frame::classic(0x100 | CAN_EFF_FLAG, &[7]);
    let remote = Frame {
        can_id: 0x101 | CAN_RTR_FLAG,
        fd: false,
        flags: 0,
        len: 4,
        data: vec![],
    };
    for f in [fd, eff, remote] {
        tx.send(&f).unwrap();
        expected.push(f);
    }
    let got = rx.collect(QUIET, LIMIT);
    assert_eq!(got, expected, "routed frames differ");

    let m = agent.scrape();
    assert_eq!(
        metric(&m, "edgeplane_can_frames_total{rule=\"body\"}"),
        19.0
    );
    assert_eq!(
        metric(&m, "edgeplane_can_routed_total{rule=\"body\"}"),
        19.0,
        "{m}"
    );
    let ready = readyz(&ns, &agent);
    assert!(
        ready.contains("\"name\":\"userspace/body\"")
            && ready.contains("\"detail\":\"userspace engine socketcan\""),
        "{ready}"
    );
    // The routed frames were not routed back or echoed to local sockets on the egress.
    let local_b0 = Bus::open(&ns, "b0").unwrap();
    tx.send(&Frame::classic(0x100, &[1])).unwrap();
    assert!(local_b0.collect(QUIET, LIMIT).is_empty());
    eprintln!("routed 19 frames of 35 in userspace, each byte-identical");
}

#[test]
fn modifications_and_checksums_are_applied_like_cangw() {
    let ns = buses("cum");
    let agent = agent(
        &ns,
        r#"[[can.route]]
name = "mod"
ingress = "a0"
filter = "200:700"
to = { iface = "b0" }
modify = [
  { op = "set", id = 0x3A0 },
  { op = "xor", data = "FF" },
  { op = "or", data = "0001" },
  { op = "and", id = 0x0FF, data = "0F0F" },
]
checksum = { crc8 = { from = 0, to = 5, result = 6, init = 0xFF, final_xor = 0xFF }, xor = { from = 0, to = -2, result = -1, init = 0x5A } }
"#,
    );
    let (tx, rx) = (Bus::open(&ns, "a1").unwrap(), Bus::open(&ns, "b1").unwrap());
    let input = [0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0];
    tx.send(&Frame::classic(0x234, &input)).unwrap();
    let got = rx.collect(QUIET, LIMIT);
    // The same expectation as the kernel route's test, computed by hand.
    let mut d = input;
    d[0] = (0x12 & 0x0f) ^ 0xff;
    d[1] = (0x34 & 0x0f) | 0x01;
    let table = edgeplane::can::rules::crc8_table_for(0x1d);
    d[6] = d[..=5]
        .iter()
        .fold(0xffu8, |c, b| table[usize::from(c ^ b)])
        ^ 0xff;
    d[7] = d[..=6].iter().fold(0x5au8, |x, b| x ^ b);
    assert_eq!(got, vec![Frame::classic(0x3A0, &d)]);
    let m = agent.scrape();
    assert_eq!(metric(&m, "edgeplane_can_routed_total{rule=\"mod\"}"), 1.0);
}

#[test]
fn inverted_filter_fd_to_classic_and_bad_length() {
    let ns = buses("cud");
    let agent = agent(
        &ns,
        r#"[[can.route]]
name = "not-7df"
ingress = "a0"
filter = "7DF~7FF"
to = { iface = "c0" }

[[can.route]]
name = "grow"
ingress = "a0"
filter = "300:7FF"
to = { iface = "b0" }
modify = [ { op = "or", len = 0x40 } ]
"#,
    );
    let tx = Bus::open(&ns, "a1").unwrap();
    let (to_c, to_b) = (Bus::open(&ns, "c1").unwrap(), Bus::open(&ns, "b1").unwrap());
    tx.send(&Frame::classic(0x7DF, &[2, 1, 0])).unwrap();
    tx.send(&Frame::classic(0x123, &[1])).unwrap();
    tx.send(&Frame::fd(0x124, &[1; 16])).unwrap();
    // 16 | 0x40 = 80 bytes: no CAN FD length, deleted as can-gw deletes it.
    tx.send(&Frame::fd(0x300, &[3; 16])).unwrap();
    tx.send(&Frame::classic(0x301, &[3; 8])).unwrap();
    assert_eq!(
        to_c.collect(QUIET, LIMIT),
        vec![Frame::classic(0x123, &[1]), Frame::classic(0x301, &[3; 8])]
    );
    assert!(to_b.collect(QUIET, LIMIT).is_empty());
    let m = agent.scrape();
    let dropped = |rule: &str, reason: &str| {
        metric(
            &m,
            &format!("edgeplane_can_dropped_total{{rule=\"{rule}\",reason=\"{reason}\"}}"),
        )
    };
    assert_eq!(dropped("not-7df", "fd_to_classic"), 2.0, "{m}");
    assert_eq!(dropped("grow", "gateway_deleted"), 1.0, "{m}");
    assert_eq!(
        metric(&m, "edgeplane_can_routed_total{rule=\"not-7df\"}"),
        2.0
    );
}

#[test]
fn a_reader_comes_back_when_its_interface_does() {
    let ns = buses("cuu");
    let mut agent = agent(
        &ns,
        r#"[[can.route]]
name = "body"
ingress = "a0"
filter = "100:700"
to = { iface = "b0" }

[[can.route]]
name = "side"
ingress = "c0"
filter = "200:700"
to = { iface = "b0" }
"#,
    );
    let (a, c) = (Bus::open(&ns, "a1").unwrap(), Bus::open(&ns, "c1").unwrap());
    let rx = Bus::open(&ns, "b1").unwrap();
    let body = |i: u32| Frame::classic(0x100 + i, &[i as u8; 4]);
    let side = |i: u32| Frame::classic(0x200 + i, &[i as u8; 2]);
    a.send(&body(0)).unwrap();
    c.send(&side(0)).unwrap();
    // Two readers: their frames may arrive in either order.
    let by_id = |mut frames: Vec<Frame>| {
        frames.sort_by_key(|f| f.can_id);
        frames
    };
    assert_eq!(by_id(rx.collect(QUIET, LIMIT)), vec![body(0), side(0)]);

    // The ingress goes down: the reader's socket fails a read (ENETDOWN). The other route
    // keeps routing meanwhile.
    ns.ip(&["link", "set", "a0", "down"]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    c.send(&side(1)).unwrap();
    assert_eq!(rx.collect(QUIET, LIMIT), vec![side(1)]);
    ns.ip(&["link", "set", "a0", "up"]).unwrap();
    std::thread::sleep(Duration::from_millis(300));

    // Up again: frames flow on the same route, with its counters.
    let again: Vec<Frame> = (1..=8).map(body).collect();
    for f in &again {
        a.send(f).unwrap();
    }
    c.send(&side(2)).unwrap();
    let mut want = again.clone();
    want.push(side(2));
    assert_eq!(by_id(rx.collect(QUIET, LIMIT)), want);
    let m = agent.scrape();
    assert_eq!(
        metric(&m, "edgeplane_can_routed_total{rule=\"body\"}"),
        9.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "edgeplane_can_routed_total{rule=\"side\"}"),
        3.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "edgeplane_can_userspace_read_errors_total{rule=\"body\"}"
        ) >= 1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "edgeplane_can_userspace_read_errors_total{rule=\"side\"}"
        ),
        0.0,
        "{m}"
    );
    let log = agent.stop_and_log().unwrap();
    assert!(
        log.contains("userspace CAN reader") && log.contains("a0"),
        "{log}"
    );
}
