//! Remote-write push to a real Prometheus (Debian's `prometheus` with
//! `--web.enable-remote-write-receiver`) while the agent forwards: the server stores the
//! agent's values; an outage (with an agent restart in it) loses nothing and keeps every
//! sample's timestamp; a full queue drops the oldest, counted; kill -9 loses at most the
//! record being written; mutual TLS, basic auth and (through nginx) bearer tokens are
//! checked by servers that require them.

use std::{
    net::{SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use edgeplane::export::queue::{self, Queue};
use edgeplane_testbed::{
    agent::{self, Agent, Start},
    http,
    netns::{Line, Netns},
    prometheus::Prometheus,
};
use edgeplane_tests::auth_proxy::AuthProxy;

/// A free port on the namespace's loopback.
fn free_port(ns: &Netns) -> SocketAddr {
    let _in = ns.enter().unwrap();
    let s = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    s.local_addr().unwrap()
}

fn receiver(line: &Line) -> Prometheus {
    let listen = free_port(&line.gateway);
    Prometheus::start(
        &line.gateway,
        listen,
        " []",
        &["--web.enable-remote-write-receiver"],
    )
}

/// A receiver behind the web config `web` (TLS, basic auth), and where it listens.
fn receiver_behind(line: &Line, web: &Path) -> (Prometheus, SocketAddr) {
    let listen = free_port(&line.gateway);
    let web_arg = format!("--web.config.file={}", web.display());
    let prometheus = Prometheus::start(
        &line.gateway,
        listen,
        " []",
        &["--web.enable-remote-write-receiver", &web_arg],
    );
    (prometheus, listen)
}

/// The agent's config: one UDP rule, and remote write to `prometheus` labelled `test=<tag>`.
fn config(tag: &str, prometheus: SocketAddr, dir: &Path, extra: &str) -> String {
    format!(
        r#"[http]
listen = "127.0.0.1:9464"

[udp]
mode = "tc"

[[udp.forward]]
name = "lidar"
ingress = "g0"
match = {{ dst_port = 5000 }}
to = {{ iface = "g1", dst_ip = "{}", dst_port = 6000 }}

[export.remote_write]
dir = "{}"
labels = {{ test = "{tag}" }}
{extra}

[[export.remote_write.endpoints]]
name = "prom"
url = "http://{prometheus}/api/v1/write"
timeout_ms = 2000
"#,
        Line::RECEIVER_V4,
        dir.display()
    )
}

fn queue_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("edgeplane-{tag}-remote-write"));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Datagrams through the rule at about `per_second` until stopped (or 5 minutes).
struct Traffic {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
    _rx: UdpSocket,
}

impl Traffic {
    fn start(line: &Line, per_second: u64) -> Self {
        let rx = {
            let _in = line.receiver.enter().unwrap();
            edgeplane_testbed::bind_udp_receiver(
                format!("{}:6000", Line::RECEIVER_V4).parse().unwrap(),
            )
            .unwrap()
        };
        let tx = {
            let _in = line.sender.enter().unwrap();
            UdpSocket::bind(format!("{}:0", Line::SENDER_V4)).unwrap()
        };
        let (stop, sent) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let (s, n) = (stop.clone(), sent.clone());
        let thread = std::thread::spawn(move || {
            let start = Instant::now();
            while !s.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(300) {
                let seq = n.fetch_add(1, Ordering::Relaxed) as u32;
                let _ = tx.send_to(&seq.to_be_bytes(), format!("{}:5000", Line::GATEWAY_IN_V4));
                std::thread::sleep(Duration::from_micros(1_000_000 / per_second));
            }
        });
        Self {
            stop,
            sent,
            thread: Some(thread),
            _rx: rx,
        }
    }

    /// Stops sending; the number of datagrams sent.
    fn stop(&mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.sent.load(Ordering::Relaxed)
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How many of `tag`'s series have a sample at exactly `ts_ms`.
fn series_at(p: &Prometheus, tag: &str, ts_ms: i64) -> f64 {
    p.raw_samples(
        &format!("{{test=\"{tag}\"}}[1ms]"),
        Some(ts_ms as f64 / 1000.0),
    )
    .iter()
    .filter(|s| s.1 == ts_ms)
    .count() as f64
}

/// All of `tag`'s samples Prometheus holds from the last 5 minutes.
fn all_samples(p: &Prometheus, tag: &str) -> usize {
    p.raw_samples(&format!("{{test=\"{tag}\"}}[5m]"), None)
        .len()
}

/// Waits (at most `limit`) until every record's samples are in Prometheus at its timestamp;
/// returns the records that are not.
fn wait_arrived(
    p: &Prometheus,
    tag: &str,
    records: &[(i64, u32)],
    limit: Duration,
) -> Vec<(i64, u32, f64)> {
    let deadline = Instant::now() + limit;
    loop {
        // The newest first: when it is there, the backlog before it has been sent.
        let last = records.last().unwrap();
        if series_at(p, tag, last.0) == f64::from(last.1) || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    records
        .iter()
        .map(|&(ts, n)| (ts, n, series_at(p, tag, ts)))
        .filter(|&(_, n, got)| got != f64::from(n))
        .collect()
}

/// A field `key=N` of the agent's "remote write stopped" log line.
fn stopped_field(log: &str, key: &str) -> u64 {
    let line = log
        .lines()
        .find(|l| l.contains("remote write stopped"))
        .unwrap_or_else(|| panic!("no 'remote write stopped' line in:\n{log}"));
    let at = line.find(&format!("{key}=")).unwrap() + key.len() + 1;
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

#[test]
fn prometheus_stores_the_forwarded_packet_counter_the_agent_pushes() {
    edgeplane_testbed::require_root();
    let tag = "rw1";
    let line = Line::new(tag).unwrap();
    line.resolve_neighbours().unwrap();
    let prometheus = receiver(&line);
    let dir = queue_dir(tag);
    let mut agent = Agent::start(
        &line.gateway,
        &config(tag, prometheus.listen, &dir, ""),
        "info",
    )
    .unwrap();
    let mut traffic = Traffic::start(&line, 100);
    std::thread::sleep(Duration::from_secs(3));
    let sent = traffic.stop();
    std::thread::sleep(Duration::from_millis(300));
    let counter = "edgeplane_udp_forward_packets_total{rule=\"lidar\"}";
    let served = http::metric(&agent.scrape(), counter).unwrap();
    assert_eq!(served, sent as f64, "the agent forwarded every datagram");
    let stored = prometheus.wait_for(counter, served, Duration::from_secs(20));
    assert_eq!(stored, Some(served), "{}", prometheus.log());
    // The series carry the extra label, and the histograms come too.
    for promql in [
        format!("edgeplane_udp_forward_packets_total{{rule=\"lidar\",test=\"{tag}\"}}"),
        "edgeplane_udp_forward_latency_seconds_count{rule=\"lidar\"}".into(),
    ] {
        assert_eq!(
            prometheus.wait_for(&promql, served, Duration::from_secs(5)),
            Some(served),
            "{promql}"
        );
    }
    // The counter's earlier values came at their own times, rising as traffic flowed.
    let history = prometheus.samples(&format!("{counter}[1m]"), None);
    assert!(history.len() >= 6, "{history:?}");
    assert!(
        history
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1)
    );

    // /readyz and `edgeplane status` show the endpoint and its queue.
    let (code, body) = agent.get("/readyz").unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("remote_write/prom") && body.contains("\"up\""),
        "{body}"
    );
    let status = line
        .gateway
        .exec(&[
            agent::binary().to_str().unwrap(),
            "status",
            "--bpffs",
            agent.bpffs.to_str().unwrap(),
        ])
        .unwrap();
    assert!(
        status.contains("remote_write/prom") && status.contains("queue "),
        "{status}"
    );

    // What the queue costs: the agent's CPU per collection and the bytes per sample on disk,
    // over 10 s of pushing every 500 ms (the agent's other work, scrapes excepted, included).
    let metrics = agent.scrape();
    let queued0 = http::metric(
        &metrics,
        "edgeplane_remote_write_samples_queued_total{endpoint=\"prom\"}",
    )
    .unwrap();
    let cpu0 = cpu_seconds(agent.pid());
    std::thread::sleep(Duration::from_secs(10));
    let cpu = cpu_seconds(agent.pid()) - cpu0;
    let metrics = agent.scrape();
    let queued = http::metric(
        &metrics,
        "edgeplane_remote_write_samples_queued_total{endpoint=\"prom\"}",
    )
    .unwrap()
        - queued0;
    eprintln!(
        "remote write: {served} forwarded and stored; over 10 s {queued} samples queued and sent, \
         agent CPU {:.3} s ({:.1} µs per sample)",
        cpu,
        cpu * 1e6 / queued
    );
    agent.stop_and_log().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_outage_with_an_agent_restart_loses_no_sample_and_no_timestamp() {
    edgeplane_testbed::require_root();
    let tag = "rw2";
    let line = Line::new(tag).unwrap();
    line.resolve_neighbours().unwrap();
    let mut prometheus = receiver(&line);
    let dir = queue_dir(tag);
    let config = config(tag, prometheus.listen, &dir, "max_backfill_rate = 5000");
    // The data plane stays across the restart (the product's default), so do its counters.
    let bpffs = edgeplane_testbed::bpffs::dir_for(&line.gateway.name).unwrap();
    let start = Start {
        leave_running: true,
        bpffs: Some(bpffs.clone()),
        ..Start::default()
    };
    let mut agent = Agent::start_with(&line.gateway, &config, "info", &start).unwrap();
    let mut traffic = Traffic::start(&line, 50);
    let counter = "edgeplane_udp_forward_packets_total{rule=\"lidar\"}";
    let deadline = Instant::now() + Duration::from_secs(20);
    while prometheus.query(counter).unwrap_or(0.0) < 10.0 {
        assert!(
            Instant::now() < deadline,
            "nothing arrived\n{}",
            prometheus.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // 60 s without the server, the agent restarted in the middle.
    let outage = Instant::now();
    prometheus.stop();
    std::thread::sleep(Duration::from_secs(30));
    let first_log = agent.stop_and_log().unwrap();
    drop(agent);
    let agent = Agent::start_with(&line.gateway, &config, "info", &start).unwrap();
    std::thread::sleep(Duration::from_secs(60).saturating_sub(outage.elapsed()));
    let metrics = agent.scrape();
    let offline = queue::inspect(&dir.join("prom")).unwrap();
    let offline_samples: u64 = offline.iter().map(|r| u64::from(r.1)).sum();
    let queue_bytes = http::metric(
        &metrics,
        "edgeplane_remote_write_queue_bytes{endpoint=\"prom\"}",
    )
    .unwrap();
    let span = (offline.last().unwrap().0 - offline[0].0) as f64 / 1e3;
    assert!(span > 55.0, "the queue holds {span} s of the 60 s outage");
    let readyz = agent.get("/readyz").unwrap().1;
    assert!(readyz.contains("\"degraded\""), "{readyz}");

    let back = Instant::now();
    prometheus.resume();
    let missing = wait_arrived(&prometheus, tag, &offline, Duration::from_secs(60));
    let backfill = back.elapsed();
    let sent = traffic.stop();
    let arrived: f64 = offline
        .iter()
        .map(|&(ts, _)| series_at(&prometheus, tag, ts))
        .sum();
    eprintln!(
        "outage: {} collections, {offline_samples} samples taken offline over {span:.1} s \
         ({:.1} bytes per sample queued); {arrived} arrived, each at its own timestamp, \
         backlog sent in {:.1} s at max_backfill_rate 5000; {sent} datagrams",
        offline.len(),
        queue_bytes / offline_samples as f64,
        backfill.as_secs_f64()
    );
    assert!(
        missing.is_empty(),
        "samples missing at (ts, taken, arrived): {missing:?}\n{}",
        prometheus.log()
    );
    assert_eq!(arrived, offline_samples as f64);
    // The backlog went no faster than the rate allows (less the first request's worth).
    assert!(
        backfill.as_secs_f64() > (offline_samples as f64 - 5000.0) / 5000.0 - 0.5,
        "{offline_samples} samples in {backfill:?}"
    );
    // The counter's samples over the outage: one per collection, rising with the traffic
    // across the restart.
    let last = offline.last().unwrap().0;
    let history = prometheus.samples(
        &format!("{counter}[{}ms]", last - offline[0].0),
        Some(last as f64 / 1000.0),
    );
    let stamps: Vec<i64> = history.iter().map(|s| s.0).collect();
    let taken: Vec<i64> = offline.iter().map(|r| r.0).collect();
    assert_eq!(stamps, taken);
    assert!(history.windows(2).all(|w| w[0].1 <= w[1].1), "{history:?}");
    assert!(history.last().unwrap().1 - history[0].1 > 1000.0);
    let mut agent = agent;
    let log = agent.stop_and_log().unwrap();
    for l in [&first_log, &log] {
        assert_eq!(stopped_field(l, "rejected"), 0, "{l}");
        assert_eq!(stopped_field(l, "dropped_queue_full"), 0, "{l}");
    }
    drop(agent);
    agent::down(&line.gateway.name, &bpffs).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_full_queue_drops_the_oldest_counts_them_and_loses_nothing_else() {
    edgeplane_testbed::require_root();
    let tag = "rw3";
    let line = Line::new(tag).unwrap();
    line.resolve_neighbours().unwrap();
    let dir = queue_dir(tag);
    let listen = free_port(&line.gateway);
    let max_bytes = 16384;
    let config = config(
        tag,
        listen,
        &dir,
        &format!("interval_ms = 200\nmax_bytes = {max_bytes}"),
    );
    let mut agent = Agent::start(&line.gateway, &config, "info").unwrap();
    let started_ms = (edgeplane::metrics::unix_now() * 1000.0) as i64;
    let _traffic = Traffic::start(&line, 50);
    // No server yet: the queue fills, then drops its oldest.
    std::thread::sleep(Duration::from_secs(8));
    let metrics = agent.scrape();
    let dropped = http::metric(
        &metrics,
        "edgeplane_remote_write_samples_dropped_total{endpoint=\"prom\",reason=\"queue_full\"}",
    )
    .unwrap();
    let bytes = http::metric(
        &metrics,
        "edgeplane_remote_write_queue_bytes{endpoint=\"prom\"}",
    )
    .unwrap();
    assert!(dropped > 0.0, "nothing dropped");
    assert!(bytes <= max_bytes as f64, "{bytes} bytes queued");
    let on_disk: u64 = std::fs::read_dir(dir.join("prom"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(on_disk <= max_bytes + 4096 + 64, "{on_disk} bytes on disk");

    let prometheus = Prometheus::start(
        &line.gateway,
        listen,
        " []",
        &["--web.enable-remote-write-receiver"],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while all_samples(&prometheus, tag) < 10 {
        assert!(
            Instant::now() < deadline,
            "nothing arrived\n{}",
            prometheus.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    std::thread::sleep(Duration::from_secs(2));
    let log = agent.stop_and_log().unwrap();
    let remaining: u64 = queue::inspect(&dir.join("prom"))
        .unwrap()
        .iter()
        .map(|r| u64::from(r.1))
        .sum();
    let (queued, sent, full) = (
        stopped_field(&log, "queued"),
        stopped_field(&log, "sent"),
        stopped_field(&log, "dropped_queue_full"),
    );
    assert_eq!(stopped_field(&log, "remaining"), remaining);
    assert_eq!(
        queued,
        sent + full
            + stopped_field(&log, "rejected")
            + stopped_field(&log, "write_errors")
            + remaining,
        "{log}"
    );
    assert_eq!(stopped_field(&log, "rejected"), 0, "{log}");
    // Prometheus has exactly the samples sent: the newest, every one at its time, after a
    // contiguous run of collections (the dropped ones were the oldest).
    let arrived = all_samples(&prometheus, tag) as f64;
    assert_eq!(arrived, sent as f64, "{log}");
    let stamps: Vec<i64> = prometheus
        .samples("edgeplane_build_info[5m]", None)
        .iter()
        .map(|s| s.0)
        .collect();
    let per_collection = (arrived / stamps.len() as f64).round();
    for &ts in &stamps {
        assert_eq!(series_at(&prometheus, tag, ts), per_collection, "at {ts}");
    }
    assert!(
        stamps[0] > started_ms + 2000,
        "the oldest were not dropped: {stamps:?}"
    );
    let gaps: Vec<i64> = stamps.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps.iter().all(|&g| g < 1500),
        "a gap in the arrived samples: {gaps:?}"
    );
    eprintln!(
        "full queue ({max_bytes} bytes): {queued} samples queued, {full} dropped (oldest), \
         {sent} sent and stored, {remaining} left queued"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn kill_9_during_writes_loses_at_most_the_torn_record() {
    edgeplane_testbed::require_root();
    let tag = "rw4";
    let line = Line::new(tag).unwrap();
    line.resolve_neighbours().unwrap();
    let dir = queue_dir(tag);
    let qdir = dir.join("prom");
    let listen = free_port(&line.gateway);
    let config = config(tag, listen, &dir, "interval_ms = 100");
    let bpffs = edgeplane_testbed::bpffs::dir_for(&line.gateway.name).unwrap();
    let start = Start {
        leave_running: true,
        bpffs: Some(bpffs.clone()),
        ..Start::default()
    };
    let _traffic = Traffic::start(&line, 50);
    let mut kept = 0;
    for round in 0..4u64 {
        let mut agent = Agent::start_with(&line.gateway, &config, "info", &start).unwrap();
        std::thread::sleep(Duration::from_millis(1500 + 317 * round));
        let before = queue::inspect(&qdir).unwrap();
        agent.signal(libc::SIGKILL);
        let log = agent.stop_and_log().unwrap();
        drop(agent);
        // Reopened, the queue holds everything a reader saw before the kill, and anything
        // written after (a torn record is cut: at most one).
        let q = Queue::open(&qdir, 64 << 20).unwrap();
        let stats = q.stats().lock().unwrap().clone();
        drop(q);
        let after = queue::inspect(&qdir).unwrap();
        assert!(
            after.len() >= before.len() && after[..before.len()] == before[..],
            "{log}"
        );
        assert!(after.len() > kept, "round {round}: nothing new queued");
        assert!(stats.cut_torn_bytes_total < 64 << 10, "{stats:?}");
        eprintln!(
            "kill -9 round {round}: {} records seen before, {} after reopening, {} torn bytes cut",
            before.len(),
            after.len(),
            stats.cut_torn_bytes_total
        );
        kept = after.len();
    }
    // A torn tail as a crash mid-write leaves it: the agent cuts it, counts it, keeps the rest.
    let last = std::fs::read_dir(&qdir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .max()
        .unwrap();
    let mut bytes = std::fs::read(&last).unwrap();
    let tail = bytes[bytes.len() - 40..].to_vec();
    bytes.extend_from_slice(&tail);
    std::fs::write(&last, &bytes).unwrap();
    let records = queue::inspect(&qdir).unwrap();
    let mut agent = Agent::start_with(&line.gateway, &config, "info", &start).unwrap();
    let torn = http::metric(
        &agent.scrape(),
        "edgeplane_remote_write_queue_cut_bytes_total{endpoint=\"prom\",reason=\"torn\"}",
    );
    // 40 bytes that do not make a record: cut as torn, or as corrupt when they happen to
    // hold an impossible length.
    let cut = torn.unwrap()
        + http::metric(
            &agent.scrape(),
            "edgeplane_remote_write_queue_cut_bytes_total{endpoint=\"prom\",reason=\"corrupt\"}",
        )
        .unwrap();
    assert_eq!(cut, 40.0);
    // And everything kept arrives once the server is there.
    let prometheus = Prometheus::start(
        &line.gateway,
        listen,
        " []",
        &["--web.enable-remote-write-receiver"],
    );
    let missing = wait_arrived(&prometheus, tag, &records, Duration::from_secs(60));
    assert!(missing.is_empty(), "missing: {missing:?}");
    eprintln!(
        "after 4 kills: all {} queued records arrived",
        records.len()
    );
    agent.stop_and_log().unwrap();
    drop(agent);
    agent::down(&line.gateway.name, &bpffs).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `edgeplane_remote_write_samples_sent_total` of one endpoint.
fn samples_sent(agent: &Agent, endpoint: &str) -> f64 {
    http::metric(
        &agent.scrape(),
        &format!("edgeplane_remote_write_samples_sent_total{{endpoint=\"{endpoint}\"}}"),
    )
    .unwrap()
}

/// Waits up to 20 s until `endpoint` has sent `samples`.
fn wait_sent(agent: &Agent, endpoint: &str, samples: f64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while samples_sent(agent, endpoint) < samples {
        assert!(Instant::now() < deadline, "{}", agent.log_so_far());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The state and detail of component `name` in a /readyz answer.
fn component(readyz: &str, name: &str) -> (String, String) {
    let json: serde_json::Value = serde_json::from_str(readyz).unwrap();
    json["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .map(|c| {
            (
                c["state"].as_str().unwrap().to_owned(),
                c["detail"].to_string(),
            )
        })
        .unwrap_or_else(|| panic!("no component {name} in {readyz}"))
}

#[test]
fn mutual_tls_to_a_server_that_requires_client_certificates() {
    edgeplane_testbed::require_root();
    let tag = "rw5";
    let line = Line::new(tag).unwrap();
    let dir = queue_dir(tag);
    let pki = edgeplane_tests::etcd::Pki::new(&dir.join("pki")).unwrap();
    let (client_cert, client_key) = pki.client("agent", "spiffe://test/agent").unwrap();
    let (server_cert, server_key) = pki.server();
    let web = dir.join("web.yml");
    std::fs::write(
        &web,
        format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\n  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {}\n",
            server_cert.display(),
            server_key.display(),
            pki.ca.display()
        ),
    )
    .unwrap();
    let (_prometheus, listen) = receiver_behind(&line, &web);
    // Two endpoints, one queue each: with the client certificate, and without.
    let config = format!(
        "{}\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\n[[export.remote_write.endpoints]]\nname = \"nocert\"\nurl = \"https://{listen}/api/v1/write\"\nca = \"{}\"\n",
        config(tag, listen, &dir, "").replace("http://", "https://"),
        pki.ca.display(),
        client_cert.display(),
        client_key.display(),
        pki.ca.display()
    );
    let mut agent = Agent::start(&line.gateway, &config, "info").unwrap();
    wait_sent(&agent, "prom", 1000.0);
    assert_eq!(samples_sent(&agent, "nocert"), 0.0);
    let readyz = agent.get("/readyz").unwrap().1;
    let state = |name: &str| component(&readyz, name);
    assert_eq!(state("remote_write/prom").0, "up", "{readyz}");
    let (nocert, detail) = state("remote_write/nocert");
    assert_eq!(nocert, "degraded", "{readyz}");
    eprintln!(
        "mTLS: the server took {} samples with the client certificate; without: {detail}",
        samples_sent(&agent, "prom")
    );
    agent.stop_and_log().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// bcrypt (cost 4) of [`PASSWORD`], for Prometheus's `basic_auth_users`.
const PASSWORD_BCRYPT: &str = "$2b$04$yrujgsJGafGNiaTdmL3meuGFDXJX.oJcdOTArV3bwTpEnXEm9ci6m";
const PASSWORD: &str = "edgeplane-test";

#[test]
fn basic_auth_to_a_server_that_requires_it() {
    edgeplane_testbed::require_root();
    let tag = "rw6";
    let line = Line::new(tag).unwrap();
    let dir = queue_dir(tag);
    std::fs::create_dir_all(&dir).unwrap();
    let web = dir.join("web.yml");
    std::fs::write(
        &web,
        format!("basic_auth_users:\n  agent: {PASSWORD_BCRYPT}\n"),
    )
    .unwrap();
    let right = dir.join("password");
    std::fs::write(&right, format!("{PASSWORD}\n")).unwrap();
    let wrong = dir.join("wrong-password");
    std::fs::write(&wrong, "not-the-password\n").unwrap();
    let (_prometheus, listen) = receiver_behind(&line, &web);
    // Two endpoints, one queue each: with the password, and with a wrong one.
    let config = format!(
        "{}basic_auth = {{ username = \"agent\", password_file = \"{}\" }}\n\n\
         [[export.remote_write.endpoints]]\nname = \"wrong\"\nurl = \"http://{listen}/api/v1/write\"\n\
         basic_auth = {{ username = \"agent\", password_file = \"{}\" }}\n",
        config(tag, listen, &dir, ""),
        right.display(),
        wrong.display()
    );
    let mut agent = Agent::start(&line.gateway, &config, "info").unwrap();
    wait_sent(&agent, "prom", 1000.0);
    let readyz = agent.get("/readyz").unwrap().1;
    let state = |name: &str| component(&readyz, name);
    assert_eq!(state("remote_write/prom").0, "up", "{readyz}");
    let (wrong_state, detail) = state("remote_write/wrong");
    assert_eq!(wrong_state, "degraded", "{readyz}");
    assert!(
        detail.contains("401") && detail.contains("basic_auth"),
        "{readyz}"
    );
    // Refused credentials drop nothing: the samples wait in the wrong endpoint's queue.
    let m = agent.scrape();
    let of_wrong =
        |metric: &str| http::metric(&m, &format!("{metric}{{endpoint=\"wrong\"}}")).unwrap_or(0.0);
    assert_eq!(
        of_wrong("edgeplane_remote_write_samples_sent_total"),
        0.0,
        "{m}"
    );
    assert!(
        of_wrong("edgeplane_remote_write_queue_samples") >= 1000.0,
        "{m}"
    );
    assert!(
        of_wrong("edgeplane_remote_write_samples_retried_total") > 0.0,
        "{m}"
    );
    let dropped: f64 = m
        .lines()
        .filter(|l| {
            l.starts_with("edgeplane_remote_write_samples_dropped_total")
                && l.contains("endpoint=\"wrong\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(dropped, 0.0, "{m}");
    eprintln!(
        "basic auth: the server took {} samples with the password; with a wrong one {} wait \
         queued, none dropped: {detail}",
        samples_sent(&agent, "prom"),
        of_wrong("edgeplane_remote_write_queue_samples")
    );
    agent.stop_and_log().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The token [`AuthProxy`] lets through.
const TOKEN: &str = "edgeplane-test-token";

#[test]
fn bearer_token_through_a_proxy_that_requires_it_picks_up_a_rotated_token() {
    edgeplane_testbed::require_root();
    let tag = "rw7";
    let line = Line::new(tag).unwrap();
    let dir = queue_dir(tag);
    std::fs::create_dir_all(&dir).unwrap();
    let prometheus = receiver(&line);
    let listen = free_port(&line.gateway);
    let proxy = AuthProxy::start(&line.gateway, listen, prometheus.listen, TOKEN, &dir).unwrap();
    let token_file = dir.join("token");
    std::fs::write(&token_file, "the-token-before-rotation\n").unwrap();
    let config = format!(
        "{}bearer_token_file = \"{}\"\n",
        config(tag, listen, &dir, ""),
        token_file.display()
    );
    let mut agent = Agent::start(&line.gateway, &config, "info").unwrap();
    // The stale token is refused: the samples wait in the queue.
    let queued = || {
        http::metric(
            &agent.scrape(),
            "edgeplane_remote_write_queue_samples{endpoint=\"prom\"}",
        )
        .unwrap_or(0.0)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while queued() < 1000.0 || proxy.answered(401) < 3 {
        assert!(
            Instant::now() < deadline,
            "{} queued, {} refused\n{}",
            queued(),
            proxy.answered(401),
            agent.log_so_far()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let readyz = agent.get("/readyz").unwrap().1;
    let (state, detail) = component(&readyz, "remote_write/prom");
    assert_eq!(state, "degraded", "{readyz}");
    assert!(
        detail.contains("401") && detail.contains("bearer_token_file"),
        "{readyz}"
    );
    assert_eq!(samples_sent(&agent, "prom"), 0.0);
    let waiting = queue::inspect(&dir.join("prom")).unwrap();
    let waiting_samples: u32 = waiting.iter().map(|r| r.1).sum();

    // The token rotates, replaced by rename as a secrets agent does: the next retry carries
    // it, and everything that waited arrives at its own timestamp.
    let rotated = dir.join("token.new");
    std::fs::write(&rotated, format!("{TOKEN}\n")).unwrap();
    std::fs::rename(&rotated, &token_file).unwrap();
    let rotated_at = Instant::now();
    let missing = wait_arrived(&prometheus, tag, &waiting, Duration::from_secs(40));
    assert!(
        missing.is_empty(),
        "samples missing at (ts, taken, arrived): {missing:?}\n{}",
        proxy.log()
    );
    let (refused, passed) = (proxy.answered(401), proxy.answered(204));
    eprintln!(
        "bearer token: {refused} requests refused with the stale token, {waiting_samples} samples \
         waited in {} collections; after the rotation all arrived in {:.1} s (requests \
         passed: {passed})",
        waiting.len(),
        rotated_at.elapsed().as_secs_f64()
    );
    let log = agent.stop_and_log().unwrap();
    assert_eq!(stopped_field(&log, "rejected"), 0, "{log}");
    assert_eq!(stopped_field(&log, "dropped_queue_full"), 0, "{log}");
    drop(proxy);
    let _ = std::fs::remove_dir_all(&dir);
}
