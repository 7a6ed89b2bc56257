//! A flood of half-open HTTP connections against a real agent: 3,000 connections that each
//! sent half a request header. While they are open, /metrics answers, a SIGHUP reload
//! completes, the userspace engine keeps forwarding and the etcd registration keeps its lease;
//! the agent closes them at `http.header_timeout_ms`. At `http.max_connections` the flood
//! evicts itself (the oldest waiting first) and never locks a scraper out, and `/events`
//! streams beyond `http.max_event_streams` get a 503 naming the key.
//!
//! Everything runs in network namespaces the tests create, on their loopbacks and veths.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread::{Scope, ScopedJoinHandle},
    time::{Duration, Instant},
};

use edgeplane_testbed::{
    agent::Agent,
    http,
    netns::{Line, Netns},
};
use edgeplane_tests::etcd::{Etcd, PLAIN_URL, Security};

const FLOOD: usize = 3000;
const HALF_HEADER: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: flood\r\nUser-Agent: half-open\r\n";
const VIN: &str = "WVWZZZ1JZXW000001";
const KEY: &str = "/edgeplane/v1/vehicles/WVWZZZ1JZXW000001/agents/gw";
/// A scrape during the flood must answer within this (they take milliseconds when idle).
const SCRAPE_BOUND: Duration = Duration::from_secs(2);

/// The floods share two cores with everything else: one at a time keeps the bounds honest.
static ONE_FLOOD_AT_A_TIME: Mutex<()> = Mutex::new(());

/// 9,000 sockets and more: the soft limit is often 1,024.
fn raise_fd_limit() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        l.rlim_cur = l.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &l);
    }
    assert!(
        l.rlim_cur as usize > WAVES * FLOOD + 200,
        "RLIMIT_NOFILE hard limit {} is too low for the flood",
        l.rlim_cur
    );
}

/// Opens `n` connections to `addr` (from the calling thread's namespace) that each send half
/// a request header; returns them with the time each began connecting.
fn half_open(addr: SocketAddr, n: usize) -> Vec<(TcpStream, Instant)> {
    let mut slowest = Duration::ZERO;
    let conns = (0..n)
        .map(|i| {
            // Before connect: the agent may accept before this thread runs again after it.
            let at = Instant::now();
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("connection {i} of the flood: {e}"));
            slowest = slowest.max(at.elapsed());
            s.write_all(HALF_HEADER).unwrap();
            (s, at)
        })
        .collect();
    eprintln!("{n} connections opened, the slowest connect took {slowest:?}");
    conns
}

/// Watches every connection for the agent's close (EOF or reset) until all are closed or
/// `limit` passed; returns when each closed.
fn closes(conns: &[(TcpStream, Instant)], limit: Duration) -> Vec<Option<Instant>> {
    let mut closed = vec![None; conns.len()];
    for (s, _) in conns {
        s.set_nonblocking(true).unwrap();
    }
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 256];
    loop {
        let open: Vec<usize> = (0..conns.len()).filter(|&i| closed[i].is_none()).collect();
        if open.is_empty() || Instant::now() > deadline {
            return closed;
        }
        let mut fds: Vec<libc::pollfd> = open
            .iter()
            .map(|&i| libc::pollfd {
                fd: conns[i].0.as_raw_fd(),
                events: libc::POLLIN | libc::POLLRDHUP,
                revents: 0,
            })
            .collect();
        // SAFETY: a valid array of pollfds.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 50) };
        let now = Instant::now();
        for (k, fd) in fds.iter().enumerate() {
            if fd.revents == 0 {
                continue;
            }
            let i = open[k];
            match (&conns[i].0).read(&mut buf) {
                Ok(0) => closed[i] = Some(now),
                Ok(n) => panic!(
                    "the agent answered a half-open connection: {:?}",
                    String::from_utf8_lossy(&buf[..n])
                ),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => closed[i] = Some(now),
                Err(_) => {}
            }
        }
    }
}

/// GET `path`, timed; panics on failure or when slower than [`SCRAPE_BOUND`].
fn timed_get(addr: SocketAddr, path: &str) -> (String, Duration) {
    let start = Instant::now();
    let (code, body) = http::get(addr, path).unwrap_or_else(|e| panic!("GET {path}: {e:#}"));
    let took = start.elapsed();
    assert_eq!(code, 200, "GET {path}: {body}");
    assert!(took < SCRAPE_BOUND, "GET {path} took {took:?}");
    (body, took)
}

fn value(metrics: &str, series: &str) -> f64 {
    http::metric(metrics, series).unwrap()
}

fn closed_by(metrics: &str, reason: &str) -> f64 {
    value(
        metrics,
        &format!("edgeplane_http_connections_closed_total{{reason=\"{reason}\"}}"),
    )
}

fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Datagrams sent from the line's sender through the gateway's userspace rule, one every
/// 2 ms until stopped; the receiver notes when each arrived.
struct Stream<'scope> {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU32>,
    sender: Option<ScopedJoinHandle<'scope, ()>>,
    receiver: Option<ScopedJoinHandle<'scope, Vec<Instant>>>,
}

/// A failed assertion must not leave the sender running: its scope would wait for it forever.
impl Drop for Stream<'_> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

impl<'scope> Stream<'scope> {
    fn start<'env>(scope: &'scope Scope<'scope, 'env>, line: &'env Line) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU32::new(0));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let rx_stop = stop.clone();
        let receiver = scope.spawn(move || {
            let _in = line.receiver.enter().unwrap();
            let sock = edgeplane_testbed::bind_udp_receiver(
                format!("{}:6000", Line::RECEIVER_V4).parse().unwrap(),
            )
            .unwrap();
            sock.set_read_timeout(Some(Duration::from_millis(1500)))
                .unwrap();
            ready_tx.send(()).unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 2048];
            loop {
                match sock.recv(&mut buf) {
                    Ok(_) => got.push(Instant::now()),
                    // Stopped, and nothing more for 1.5 s.
                    Err(_) if rx_stop.load(Ordering::Acquire) => return got,
                    Err(_) => {}
                }
            }
        });
        ready_rx.recv().unwrap();
        let (tx_stop, tx_sent) = (stop.clone(), sent.clone());
        let sender = scope.spawn(move || {
            let _in = line.sender.enter().unwrap();
            let sock = UdpSocket::bind(format!("{}:4000", Line::SENDER_V4)).unwrap();
            let to = format!("{}:5000", Line::GATEWAY_IN_V4);
            let mut seq = 0u32;
            while !tx_stop.load(Ordering::Acquire) {
                sock.send_to(&seq.to_be_bytes(), &to).unwrap();
                seq += 1;
                tx_sent.store(seq, Ordering::Release);
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        Self {
            stop,
            sent,
            sender: Some(sender),
            receiver: Some(receiver),
        }
    }

    /// Stops sending; returns (sent, arrival times).
    fn finish(mut self) -> (u32, Vec<Instant>) {
        self.stop.store(true, Ordering::Release);
        self.sender.take().expect("once").join().unwrap();
        let arrivals = self.receiver.take().expect("once").join().unwrap();
        (self.sent.load(Ordering::Acquire), arrivals)
    }
}

/// Long enough for the checks below on a loaded 2-core machine (opening the flood alone took
/// 8 s there once), and many times the registration's lease TTL.
const HEADER_TIMEOUT: Duration = Duration::from_secs(20);

fn userspace_config(extra_http: &str) -> String {
    format!(
        r#"[http]
listen = "127.0.0.1:9464"
header_timeout_ms = {}
max_connections = 4000
{extra_http}

[udp]
mode = "userspace"

[[udp.forward]]
name = "lidar"
ingress = "g0"
match = {{ dst_port = 5000 }}
to = {{ iface = "g1", dst_ip = "{}", dst_port = 6000 }}

[agent]
service_name = "gw"
vin = "{VIN}"

[registry]
endpoints = ["{PLAIN_URL}"]
lease_ttl = 2
"#,
        HEADER_TIMEOUT.as_millis(),
        Line::RECEIVER_V4
    )
}

/// 3,000 half-open connections within the cap: they stay until the header timeout, and
/// meanwhile nothing else of the agent notices.
#[test]
fn a_flood_of_half_open_connections_stops_nothing_and_is_closed_at_the_header_timeout() {
    edgeplane_testbed::require_root();
    let _one = ONE_FLOOD_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    raise_fd_limit();
    let line = Line::new("hf").unwrap();
    let dir = std::env::temp_dir().join(&line.gateway.name);
    let _ = std::fs::remove_dir_all(&dir);
    let etcd = Etcd::start(&line.gateway, &dir, Security::Plain, None).unwrap();
    let agent = Agent::start(&line.gateway, &userspace_config(""), "info").unwrap();
    let lease = wait_for("the registration's lease", Duration::from_secs(10), || {
        etcd.lease_of(&line.gateway, KEY).unwrap()
    });
    std::thread::scope(|scope| {
        flood_within_the_cap(scope, &line, &agent, &etcd, &lease);
    });
}

fn flood_within_the_cap<'scope, 'env>(
    scope: &'scope Scope<'scope, 'env>,
    line: &'env Line,
    agent: &Agent,
    etcd: &Etcd,
    lease: &str,
) {
    let _in = line.gateway.enter().unwrap();
    let addr = agent.metrics;
    let stream = Stream::start(scope, line);
    std::thread::sleep(Duration::from_millis(300));

    let started = Instant::now();
    let flood = half_open(addr, FLOOD);
    let opened = started.elapsed();
    eprintln!("flood opened in {opened:?}");
    let open = wait_for(
        "the agent to hold the flood",
        Duration::from_secs(10),
        || {
            let (m, _) = timed_get(addr, "/metrics");
            let n = value(&m, "edgeplane_http_connections");
            (n > FLOOD as f64).then_some(n)
        },
    );

    // While they are open: scrapes, a reload (with new HTTP limits), forwarding, the lease.
    let mut slowest = Duration::ZERO;
    for _ in 0..5 {
        slowest = slowest.max(timed_get(addr, "/metrics").1);
        std::thread::sleep(Duration::from_millis(200));
    }
    std::fs::write(&agent.config, userspace_config("idle_timeout_ms = 30000")).unwrap();
    let hup = Instant::now();
    agent.signal(libc::SIGHUP);
    wait_for("the reload", Duration::from_secs(5), || {
        agent.log_so_far().contains("reload applied").then_some(())
    });
    let reloaded = hup.elapsed();
    eprintln!(
        "reloaded in {reloaded:?}, {:?} after the flood began",
        started.elapsed()
    );
    for _ in 0..5 {
        slowest = slowest.max(timed_get(addr, "/metrics").1);
        std::thread::sleep(Duration::from_millis(200));
    }
    let (m, _) = timed_get(addr, "/metrics");
    assert_eq!(
        value(&m, "edgeplane_config_reloads_total{result=\"success\"}"),
        1.0
    );
    // The first of the flood closes first: until then, all of it was open.
    let checked = flood[0].1.elapsed();
    assert!(
        checked < HEADER_TIMEOUT,
        "the checks ended {checked:?} after the flood's first connection: too late, they \
         prove nothing"
    );

    // The agent closes each at the header timeout counted from its accept, not before.
    let closed = closes(&flood, HEADER_TIMEOUT + Duration::from_secs(20));
    let mut after = Vec::new();
    for (i, ((_, at), closed)) in flood.iter().zip(&closed).enumerate() {
        let closed = closed.unwrap_or_else(|| panic!("connection {i} still open"));
        let t = closed - *at;
        assert!(
            t >= HEADER_TIMEOUT,
            "connection {i} closed after only {t:?}"
        );
        after.push(t);
    }
    after.sort();
    // A connection is counted just after its socket closes: the last may lag our EOF.
    let m = wait_for("every close counted", Duration::from_secs(5), || {
        let (m, _) = timed_get(addr, "/metrics");
        (closed_by(&m, "header_timeout") >= FLOOD as f64).then_some(m)
    });
    assert_eq!(closed_by(&m, "header_timeout"), FLOOD as f64);
    assert_eq!(closed_by(&m, "evicted"), 0.0);
    assert_eq!(
        value(&m, "edgeplane_http_connections"),
        1.0,
        "just this scrape"
    );

    // Forwarding went on throughout: everything arrived, and never a gap of a second.
    let (sent, arrivals) = stream.finish();
    assert_eq!(
        arrivals.len() as u32,
        sent,
        "datagrams lost during the flood"
    );
    let gap = arrivals
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    assert!(
        gap < Duration::from_secs(1),
        "forwarding stalled for {gap:?}"
    );

    // The registration kept its lease (TTL 2 s, several times over during the flood).
    drop(_in);
    assert_eq!(
        etcd.lease_of(&line.gateway, KEY).unwrap().as_deref(),
        Some(lease),
        "the record lost its lease during the flood"
    );
    eprintln!(
        "{FLOOD} half-open connections opened in {opened:?} ({open} open at the agent); \
         /metrics at most {slowest:?} meanwhile; SIGHUP applied in {reloaded:?}; closed \
         {:?} to {:?} after opening (header timeout {HEADER_TIMEOUT:?}); {sent} datagrams \
         forwarded, longest gap {gap:?}",
        after[0],
        after[after.len() - 1]
    );
}

/// A namespace with a veth pair for a tc rule: the kernel path, so /events streams exist.
fn kernel_host(tag: &str) -> Netns {
    let ns = Netns::new(tag).unwrap();
    ns.ip(&["link", "add", "a0", "type", "veth", "peer", "name", "b0"])
        .unwrap();
    ns.ip(&["link", "set", "a0", "up"]).unwrap();
    ns.ip(&["link", "set", "b0", "up"]).unwrap();
    ns
}

const CAP: usize = 64;
const WAVES: usize = 3;

fn capped_config() -> String {
    format!(
        r#"[http]
listen = "127.0.0.1:9464"
header_timeout_ms = 60000
max_connections = {CAP}
max_event_streams = 2

[udp]
mode = "tc"

[[udp.forward]]
name = "lidar"
ingress = "a0"
match = {{ dst_port = 5000 }}
to = {{ iface = "b0", dst_port = 6000 }}
"#
    )
}

/// Opens an /events stream; returns the connection and the status line's code with the body
/// when it is not 200.
fn open_events(addr: SocketAddr) -> (BufReader<TcpStream>, u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET /events HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status).unwrap();
    let code = status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut head = String::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).unwrap() == 0 || h == "\r\n" {
            break;
        }
        head += &h;
    }
    let mut body = String::new();
    if code != 200 {
        let len = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length: ")
                    .map(str::to_owned)
            })
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let mut buf = vec![0; len];
        r.read_exact(&mut buf).unwrap();
        body = String::from_utf8(buf).unwrap();
    }
    (r, code, body)
}

/// At the cap, the flood takes its own slots (the oldest half-open goes first) and scrapes keep
/// getting in; /events streams are capped, never evicted, and end when the agent stops.
#[test]
fn at_the_cap_a_flood_evicts_itself_and_event_streams_are_capped() {
    edgeplane_testbed::require_root();
    let _one = ONE_FLOOD_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    raise_fd_limit();
    let ns = kernel_host("hcap");
    let mut agent = Agent::start(&ns, &capped_config(), "info").unwrap();
    let _in = ns.enter().unwrap();
    let addr = agent.metrics;

    let (mut first, code, _) = open_events(addr);
    assert_eq!(code, 200);
    let (second, code, _) = open_events(addr);
    assert_eq!(code, 200);
    let (_, code, body) = open_events(addr);
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("at most 2") && body.contains("http.max_event_streams"),
        "{body}"
    );

    // Scrape every 100 ms from another thread while the flood comes.
    let scraping = AtomicBool::new(true);
    let (flood, opened, (slowest, scrapes)) = std::thread::scope(|scope| {
        let scraper = scope.spawn(|| {
            let _in = ns.enter().unwrap();
            let mut slowest = Duration::ZERO;
            let mut n = 0;
            while scraping.load(Ordering::Acquire) || n < 5 {
                slowest = slowest.max(timed_get(addr, "/metrics").1);
                n += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            (slowest, n)
        });
        // Waves of the flood, so that the scrapes meet it for longer; each wave evicts the
        // one before.
        let started = Instant::now();
        let mut flood = Vec::new();
        for _ in 0..WAVES {
            flood.extend(half_open(addr, FLOOD));
        }
        let opened = started.elapsed();
        std::thread::sleep(Duration::from_millis(500));
        scraping.store(false, Ordering::Release);
        (flood, opened, scraper.join().unwrap())
    });

    // The evicted are closed at once; at most the cap's worth (less the two streams) stay,
    // and those are the newest.
    let total = WAVES * FLOOD;
    let closed = closes(&flood, Duration::from_secs(5));
    let open: Vec<usize> = (0..total).filter(|&i| closed[i].is_none()).collect();
    assert!(open.len() <= CAP - 2, "{} still open", open.len());
    // The newest, but for the odd one the agent had read nothing from yet when it was the
    // oldest: those go last (they look like a client whose request is on its way).
    let stragglers: Vec<usize> = open.iter().copied().filter(|&i| i < total - CAP).collect();
    assert!(
        stragglers.len() <= 5,
        "older connections outlived newer ones: {stragglers:?} of {open:?}"
    );
    let (m, _) = timed_get(addr, "/metrics");
    let evicted = closed_by(&m, "evicted");
    assert!(evicted >= (total - CAP) as f64, "{evicted} evicted");
    assert!(value(&m, "edgeplane_http_connections") <= CAP as f64);
    assert_eq!(
        closed_by(&m, "refused"),
        0.0,
        "nothing refused: the flood was evictable"
    );
    assert_eq!(value(&m, "edgeplane_http_event_streams"), 2.0);
    assert_eq!(value(&m, "edgeplane_http_event_streams_refused_total"), 1.0);

    // The streams were not evicted: still open, and nothing came on them.
    first
        .get_ref()
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut byte = [0u8; 1];
    let err = first.read(&mut byte).expect_err("the first stream ended");
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{err}"
    );
    // A stream's end frees its place.
    drop(second);
    wait_for("the stream's place", Duration::from_secs(5), || {
        let (m, _) = timed_get(addr, "/metrics");
        (value(&m, "edgeplane_http_event_streams") == 1.0).then_some(())
    });
    let (_third, code, body) = open_events(addr);
    assert_eq!(code, 200, "{body}");
    drop(flood);

    // Stopping ends the streams instead of waiting for their clients.
    drop(_in);
    let stopping = Instant::now();
    let log = agent.stop_and_log().unwrap();
    let stopped = stopping.elapsed();
    assert!(
        stopped < Duration::from_secs(4),
        "stopping took {stopped:?}:\n{log}"
    );
    assert!(log.ends_with("[exit status: exit status: 0]"), "{log}");
    first
        .get_ref()
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut rest = Vec::new();
    let _ = first.read_to_end(&mut rest);
    assert!(
        rest.ends_with(b"0\r\n\r\n"),
        "the stream did not end cleanly: {:?}",
        String::from_utf8_lossy(&rest)
    );
    eprintln!(
        "{WAVES} × {FLOOD} half-open connections at a cap of {CAP} opened in {opened:?}: {evicted} \
         evicted, {} left open (the newest, {} older stragglers); {scrapes} scrapes meanwhile, the slowest \
         {slowest:?}; the agent stopped in {stopped:?} with an /events stream open",
        open.len(),
        stragglers.len()
    );
}
