//! A real Prometheus server (Debian's `prometheus`, installed by `cargo xtask setup`) scrapes
//! the agent every 500 ms while it forwards: the scrapes succeed at that rate, and the server
//! stores the counters and the latency histograms with the values the agent counted.

use std::{
    net::{SocketAddr, UdpSocket},
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use edgeplane_testbed::{
    agent::Agent,
    http,
    netns::{Line, Netns},
};

const N: u32 = 300;
const PROMETHEUS: &str = "127.0.0.1:9090";

/// Prometheus in `ns`, with its data in a directory of its own; killed and removed on drop.
struct Prometheus {
    child: Child,
    dir: PathBuf,
}

impl Prometheus {
    fn start(ns: &Netns, target: SocketAddr) -> Self {
        let dir = std::env::temp_dir().join(format!("{}-prometheus", ns.name));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 500ms\n  scrape_timeout: 400ms\n\
                 scrape_configs:\n  - job_name: edgeplane\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = ns
            .command("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={PROMETHEUS}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting prometheus (Debian package prometheus; `cargo xtask setup`)");
        Self { child, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The value of an instant query's single sample, or None while the server has none.
fn query(ns: &Netns, promql: &str) -> Option<f64> {
    let _in = ns.enter().unwrap();
    let path = format!("/api/v1/query?query={}", percent_encode(promql));
    let (code, body) = http::get(PROMETHEUS.parse().unwrap(), &path).ok()?;
    if code != 200 {
        return None;
    }
    let json: serde_json::Value = serde_json::from_str(&body).ok()?;
    let result = json["data"]["result"].as_array()?;
    match result.as_slice() {
        [one] => one["value"][1].as_str()?.parse().ok(),
        _ => None,
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Polls `promql` until it equals `want` or `limit` passes; returns the last value.
fn wait_for(ns: &Netns, promql: &str, want: f64, limit: Duration) -> Option<f64> {
    let start = Instant::now();
    loop {
        let v = query(ns, promql);
        if v == Some(want) || start.elapsed() > limit {
            return v;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

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
    let prometheus = Prometheus::start(&line.gateway, agent.metrics);
    let up = wait_for(
        &line.gateway,
        "up{job=\"edgeplane\"}",
        1.0,
        Duration::from_secs(30),
    );
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
        let v = wait_for(&line.gateway, promql, n, Duration::from_secs(10));
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
    let stored = query(
        &line.gateway,
        "count(edgeplane_udp_forward_latency_seconds_bucket{rule=\"lidar\"})",
    );
    assert!(exported > 20, "{exported} buckets exported");
    assert_eq!(stored, Some(exported as f64));
    let p99 = query(
        &line.gateway,
        "histogram_quantile(0.99, sum by (le) (edgeplane_udp_forward_latency_seconds_bucket{rule=\"lidar\"}))",
    )
    .expect("p99");
    assert!(p99 > 0.0 && p99 < 0.016_777_216, "p99 {p99} s");

    // Scrapes keep coming every 500 ms: at least 4 of the 6 a 3 s window can hold (the
    // server aligns its schedule, so allow for one at each end), and each one quick.
    std::thread::sleep(Duration::from_secs(3));
    let scrapes = query(&line.gateway, "count_over_time(up{job=\"edgeplane\"}[3s])").unwrap_or(0.0);
    assert!(
        scrapes >= 4.0,
        "{scrapes} scrapes in 3 s\n{}",
        prometheus.log()
    );
    let worst = query(&line.gateway, "min_over_time(up{job=\"edgeplane\"}[3s])");
    assert_eq!(worst, Some(1.0), "a scrape failed\n{}", prometheus.log());
    let duration = query(&line.gateway, "max_over_time(scrape_duration_seconds[3s])")
        .expect("scrape_duration_seconds");
    eprintln!(
        "Prometheus scraping every 500 ms: {N} forwarded and stored (count, +Inf bucket, \
         counter), p99 {:.1} µs, {scrapes} scrapes in 3 s, slowest {:.1} ms",
        p99 * 1e6,
        duration * 1e3
    );
    agent.stop_and_log().unwrap();
}
