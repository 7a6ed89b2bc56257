//! A real Prometheus server (Debian's `prometheus`, installed by `cargo xtask setup`) scrapes
//! the agent every 500 ms while it forwards: the scrapes succeed at that rate, and the server
//! stores the counters and the latency histograms with the values the agent counted.

use std::{net::UdpSocket, time::Duration};

use edgeplane_testbed::{agent::Agent, http, netns::Line, prometheus::Prometheus};

const N: u32 = 300;
const PROMETHEUS: &str = "127.0.0.1:9090";

#[test]
fn a_prometheus_server_scraping_every_500_ms_stores_the_histograms() {
    edgeplane_testbed::require_root();
    let line = Line::new("pm").unwrap();
    line.resolve_neighbours().unwrap();
    let config = format!(
        r#"[http]
listen = "127.0.0.1:9464"

[udp]
mode = "tc"

[[udp.forward]]
name = "lidar"
ingress = "g0"
match = {{ dst_port = 5000 }}
to = {{ iface = "g1", dst_ip = "{}", dst_port = 6000 }}
"#,
        Line::RECEIVER_V4
    );
    let mut agent = Agent::start(&line.gateway, &config, "info").unwrap();
    let prometheus = Prometheus::start(
        &line.gateway,
        PROMETHEUS.parse().unwrap(),
        &format!(
            "\n  - job_name: edgeplane\n    static_configs:\n      - targets: ['{}']",
            agent.metrics
        ),
        &[],
    );
    let up = prometheus.wait_for("up{job=\"edgeplane\"}", 1.0, Duration::from_secs(30));
    assert_eq!(up, Some(1.0), "no successful scrape\n{}", prometheus.log());

    // Forward N datagrams, received at once.
    let rx = {
        let _in = line.receiver.enter().unwrap();
        let rx = edgeplane_testbed::bind_udp_receiver(
            format!("{}:6000", Line::RECEIVER_V4).parse().unwrap(),
        )
        .unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        rx
    };
    {
        let _in = line.sender.enter().unwrap();
        let tx = UdpSocket::bind(format!("{}:0", Line::SENDER_V4)).unwrap();
        for seq in 0..N {
            tx.send_to(&seq.to_be_bytes(), format!("{}:5000", Line::GATEWAY_IN_V4))
                .unwrap();
            if seq % 20 == 19 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    let mut buf = [0u8; 64];
    let received = (0..N).take_while(|_| rx.recv(&mut buf).is_ok()).count();
    assert_eq!(received, N as usize);

    // The server stored what the agent counted: the counter and the histogram's count and
    // its +Inf bucket, per rule.
    let n = f64::from(N);
    for promql in [
        "edgeplane_udp_forward_packets_total{rule=\"lidar\"}",
        "edgeplane_udp_forward_latency_seconds_count{rule=\"lidar\"}",
        "edgeplane_udp_forward_latency_seconds_bucket{rule=\"lidar\",le=\"+Inf\"}",
    ] {
        let v = prometheus.wait_for(promql, n, Duration::from_secs(10));
        assert_eq!(v, Some(n), "{promql}\n{}", prometheus.log());
    }
    // Every bucket the agent exports is a series of the server's, and the server can compute
    // a quantile from them.
    let exported = {
        let _in = line.gateway.enter().unwrap();
        http::get(agent.metrics, "/metrics").unwrap().1
    }
    .lines()
    .filter(|l| {
        l.starts_with("edgeplane_udp_forward_latency_seconds_bucket{") && l.contains("lidar")
    })
    .count();
    let stored =
        prometheus.query("count(edgeplane_udp_forward_latency_seconds_bucket{rule=\"lidar\"})");
    assert!(exported > 20, "{exported} buckets exported");
    assert_eq!(stored, Some(exported as f64));
    let p99 = prometheus
        .query(
        "histogram_quantile(0.99, sum by (le) (edgeplane_udp_forward_latency_seconds_bucket{rule=\"lidar\"}))",
    )
    .expect("p99");
    assert!(p99 > 0.0 && p99 < 0.016_777_216, "p99 {p99} s");

    // Scrapes keep coming every 500 ms: at least 4 of the 6 a 3 s window can hold (the
    // server aligns its schedule, so allow for one at each end), and each one quick.
    std::thread::sleep(Duration::from_secs(3));
    let scrapes = prometheus
        .query("count_over_time(up{job=\"edgeplane\"}[3s])")
        .unwrap_or(0.0);
    assert!(
        scrapes >= 4.0,
        "{scrapes} scrapes in 3 s\n{}",
        prometheus.log()
    );
    let worst = prometheus.query("min_over_time(up{job=\"edgeplane\"}[3s])");
    assert_eq!(worst, Some(1.0), "a scrape failed\n{}", prometheus.log());
    let duration = prometheus
        .query("max_over_time(scrape_duration_seconds[3s])")
        .expect("scrape_duration_seconds");
    eprintln!(
        "Prometheus scraping every 500 ms: {N} forwarded and stored (count, +Inf bucket, \
         counter), p99 {:.1} µs, {scrapes} scrapes in 3 s, slowest {:.1} ms",
        p99 * 1e6,
        duration * 1e3
    );
    agent.stop_and_log().unwrap();
}
