//! CAN latency capture inside a real kernel with CAN (run by `cargo xtask vm-test`): frames
//! routed from bus A to bus B land in the route's forwarding histogram, one count each, and a
//! CAN_RAW application on bus B that reads only after a deliberate sleep shows that sleep in
//! the read stage of the delivery histogram and not in the queued stage.

use std::time::{Duration, Instant};

use edgeplane_testbed::{
    agent::{self, Agent},
    http,
    netns::Netns,
    require_root,
};
use edgeplane_tests::can::{Bus, Frame, vxcan_pair};

const FRAMES: u32 = 100;
/// How long the application sleeps before reading: 2^27 ns < 200 ms < 2^28 ns.
const SLEEP: Duration = Duration::from_millis(200);
const EVENTS: u32 = 5;

fn value(metrics: &str, series: &str) -> f64 {
    http::metric(metrics, series).unwrap_or_else(|e| panic!("{series}: {e}\n{metrics}"))
}

#[test]
fn routed_frames_and_a_late_reader_are_measured() {
    require_root();
    let ns = Netns::new("canl").unwrap();
    vxcan_pair(&ns, "a0", "a1", true).unwrap();
    vxcan_pair(&ns, "b0", "b1", true).unwrap();
    let config = r#"[http]
listen = "127.0.0.1:9464"

[latency]
slow_threshold_us = 1
can_ifaces = ["b1"]

[[can.route]]
name = "body"
ingress = "a0"
filter = "100:700"
to = { iface = "b0" }
"#;
    let mut agent = Agent::start(&ns, config, "info").unwrap();
    let mut events = agent.stream_events(EVENTS).unwrap();

    // The application's socket exists before the frames come, so they queue on it while it
    // sleeps; it reads them all only afterwards.
    let (tx, rx) = (Bus::open(&ns, "a1").unwrap(), Bus::open(&ns, "b1").unwrap());
    let start = Instant::now();
    for i in 0..FRAMES {
        tx.send(&Frame::classic(0x100 + i % 16, &i.to_be_bytes()))
            .unwrap();
        if i % 10 == 9 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    std::thread::sleep(SLEEP);
    let got = rx.collect(Duration::from_millis(500), Duration::from_secs(20));
    assert_eq!(got.len(), FRAMES as usize, "routed frames read on b1");
    let sending = start.elapsed();

    let metrics = {
        let _in = ns.enter().unwrap();
        http::get(agent.metrics, "/metrics").unwrap().1
    };
    let events = agent::output_within(&mut events, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"));
    let log = agent.stop_and_log().unwrap();
    assert!(
        !log.contains("latency capture:"),
        "a latency program failed:\n{log}"
    );

    // Forwarding: every routed frame once; none slower than 67 ms (2^26 ns), even emulated.
    let f = |s: &str, le: &str| {
        value(
            &metrics,
            &format!("edgeplane_can_forward_latency_seconds_{s}{{rule=\"body\"{le}}}"),
        )
    };
    let n = f64::from(FRAMES);
    assert_eq!(f("count", ""), n, "forwarding count\n{metrics}");
    assert_eq!(
        f("bucket", ",le=\"0.067108864\""),
        n,
        "forwarding over 67 ms\n{metrics}"
    );

    // Delivery to the application on b1: queued at once, read after the sleep.
    let d = |stage: &str, s: &str, le: &str| {
        value(
            &metrics,
            &format!(
                "edgeplane_socket_delivery_latency_seconds_{s}{{proto=\"can\",iface=\"b1\",stage=\"{stage}\"{le}}}"
            ),
        )
    };
    assert_eq!(d("queued", "count", ""), n, "queued count\n{metrics}");
    assert_eq!(
        d("queued", "bucket", ",le=\"0.067108864\""),
        n,
        "queued late\n{metrics}"
    );
    assert_eq!(d("read", "count", ""), n, "read count\n{metrics}");
    // Every frame waited through the sleep (> 2^27 ns), and none longer than the whole run.
    assert_eq!(
        d("read", "bucket", ",le=\"0.134217728\""),
        0.0,
        "read before the application's sleep ended\n{metrics}"
    );
    let read_sum = d("read", "sum", "");
    assert!(
        read_sum / n >= SLEEP.as_secs_f64() && read_sum / n <= sending.as_secs_f64(),
        "mean read latency {:.3} s, expected {:?}..{sending:?}\n{metrics}",
        read_sum / n,
        SLEEP
    );

    // Slow events: routed frames of the route, with their ingress and ID.
    let lines: Vec<serde_json::Value> = events
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), EVENTS as usize, "{events}");
    let routed: Vec<_> = lines
        .iter()
        .filter(|e| e["kind"] == "can_forward")
        .collect();
    assert!(!routed.is_empty(), "{events}");
    for e in routed {
        assert_eq!(e["target"], "body", "{e}");
        assert_eq!(e["flow"]["iface"], "a0", "{e}");
        let id = u32::from_str_radix(e["flow"]["id"].as_str().unwrap(), 16).unwrap();
        assert!((0x100..0x110).contains(&id), "{e}");
    }
    http::promtool_accepts(&metrics);
    eprintln!(
        "{FRAMES} frames routed a0 -> b0: forwarding mean {:.1} µs; b1 reader: queued mean {:.1} µs, read mean {:.1} ms after a {SLEEP:?} sleep",
        f("sum", "") / n * 1e6,
        d("queued", "sum", "") / n * 1e6,
        read_sum / n * 1e3,
    );
}
