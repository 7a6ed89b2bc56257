//! The metrics registry: the agent's own metrics under `edgeplane_`, plus the standard
//! `process_*` metrics every Prometheus client library exports under those exact names.

use std::{
    sync::atomic::{AtomicI64, AtomicU64},
    time::{SystemTime, UNIX_EPOCH},
};

use edgeplane_common::hist::{self, Log2Hist};
use prometheus_client::{
    collector::Collector,
    encoding::{
        DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, MetricEncoder,
        NoLabelSet,
    },
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        info::Info,
    },
    registry::Registry,
};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub result: ReloadResult,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ReloadResult {
    success,
    failure,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseLabels {
    pub reason: CloseReason,
}

/// Why the HTTP server closed a connection (or refused it).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum CloseReason {
    /// The client closed between requests, or the exchange ended with `Connection: close`.
    completed,
    /// A request hyper rejected (bad syntax, a header too large): it answered 4xx.
    malformed,
    /// The client went away mid-request or mid-response, or the socket failed.
    aborted,
    header_timeout,
    idle_timeout,
    write_timeout,
    /// Its slot went to a new connection while it waited for a request.
    evicted,
    /// Accepted at the cap with no connection waiting to evict: answered 503 and closed.
    refused,
    /// The agent stopped.
    shutdown,
    /// Its task panicked (a bug; logged).
    internal_error,
}

impl CloseReason {
    pub const ALL: [Self; 10] = [
        Self::completed,
        Self::malformed,
        Self::aborted,
        Self::header_timeout,
        Self::idle_timeout,
        Self::write_timeout,
        Self::evicted,
        Self::refused,
        Self::shutdown,
        Self::internal_error,
    ];
}

/// The HTTP server's own metrics.
#[derive(Debug, Clone)]
pub struct HttpMetrics {
    pub connections: Gauge<i64, AtomicI64>,
    pub accepted: Counter<u64, AtomicU64>,
    pub closed: Family<CloseLabels, Counter<u64, AtomicU64>>,
    pub accept_errors: Counter<u64, AtomicU64>,
    pub event_streams: Gauge<i64, AtomicI64>,
    pub event_streams_refused: Counter<u64, AtomicU64>,
}

impl Default for HttpMetrics {
    fn default() -> Self {
        let m = Self {
            connections: Gauge::default(),
            accepted: Counter::default(),
            closed: Family::default(),
            accept_errors: Counter::default(),
            event_streams: Gauge::default(),
            event_streams_refused: Counter::default(),
        };
        for reason in CloseReason::ALL {
            let _ = m.closed.get_or_create(&CloseLabels { reason });
        }
        m
    }
}

impl HttpMetrics {
    pub fn closed(&self, reason: CloseReason) {
        self.closed.get_or_create(&CloseLabels { reason }).inc();
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "http_connections",
            "Open HTTP connections",
            self.connections.clone(),
        );
        r.register(
            "http_connections_accepted",
            "HTTP connections accepted (including those refused at the cap)",
            self.accepted.clone(),
        );
        r.register(
            "http_connections_closed",
            "HTTP connections closed, by reason",
            self.closed.clone(),
        );
        r.register(
            "http_accept_errors",
            "Failed accepts on the HTTP listener (e.g. out of file descriptors)",
            self.accept_errors.clone(),
        );
        r.register(
            "http_event_streams",
            "Open GET /events streams",
            self.event_streams.clone(),
        );
        r.register(
            "http_event_streams_refused",
            "GET /events requests answered 503 because http.max_event_streams were open",
            self.event_streams_refused.clone(),
        );
    }
}

/// Metrics the agent updates itself (the data plane's are read from maps at scrape time).
#[derive(Debug)]
pub struct AgentMetrics {
    pub config_reloads: Family<ReloadLabels, Counter<u64, AtomicU64>>,
    pub config_last_reload_successful: Gauge<i64, AtomicI64>,
    pub http: HttpMetrics,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        let m = Self {
            config_reloads: Family::default(),
            config_last_reload_successful: Gauge::default(),
            http: HttpMetrics::default(),
        };
        // Series exist from the start, so rate() and alerts see the first reload.
        for result in [ReloadResult::success, ReloadResult::failure] {
            let _ = m.config_reloads.get_or_create(&ReloadLabels { result });
        }
        m.config_last_reload_successful.set(1);
        m
    }
}

impl AgentMetrics {
    pub fn reloaded(&self, ok: bool) {
        let result = if ok {
            ReloadResult::success
        } else {
            ReloadResult::failure
        };
        self.config_reloads
            .get_or_create(&ReloadLabels { result })
            .inc();
        self.config_last_reload_successful.set(i64::from(ok));
    }
}

pub fn registry(agent: &AgentMetrics, collectors: Vec<Box<dyn Collector>>) -> Registry {
    let mut root = Registry::default();
    root.register_collector(Box::new(ProcessCollector::new()));
    let ours = root.sub_registry_with_prefix("edgeplane");
    ours.register(
        "build",
        "Build information of the running agent",
        Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
    );
    ours.register(
        "config_reloads",
        "Configuration reloads (SIGHUP), by result",
        agent.config_reloads.clone(),
    );
    ours.register(
        "config_last_reload_successful",
        "1 if the last configuration reload succeeded (or none happened), 0 if it was rejected",
        agent.config_last_reload_successful.clone(),
    );
    agent.http.register(ours);
    for c in collectors {
        ours.register_collector(c);
    }
    root
}

/// Encodes a kernel log2 histogram of nanoseconds as a Prometheus histogram in seconds. The
/// count is the buckets' sum, so it always equals the +Inf bucket even if the kernel was
/// mid-update.
pub fn encode_log2_hist(enc: MetricEncoder<'_>, h: &Log2Hist) -> Result<(), std::fmt::Error> {
    let buckets: Vec<(f64, u64)> = (0..hist::BUCKETS)
        .map(|k| {
            (
                hist::upper_bound_ns(k).map_or(f64::INFINITY, |ns| ns as f64 / 1e9),
                h.buckets[k],
            )
        })
        .collect();
    let count = h.buckets.iter().sum();
    let mut enc = enc;
    enc.encode_histogram::<NoLabelSet>(h.sum_ns as f64 / 1e9, count, &buckets, None)
}

/// Renders the registry in the OpenMetrics text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::with_capacity(64 * 1024);
    prometheus_client::encoding::text::encode(&mut out, registry)
        .expect("writing to a String cannot fail");
    out
}

/// Converts OpenMetrics text to the Prometheus text format 0.0.4, for clients that don't ask for
/// OpenMetrics (curl, promtool, older scrapers): counters are named with their `_total` suffix,
/// info metrics become `_info` gauges, and `# UNIT` / `# EOF` lines go.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            // Held until TYPE says what the family is called in this format.
            help = Some(rest);
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (name, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "info" => (format!("{name}_info"), "gauge"),
                "gauge" | "histogram" | "summary" => (name.to_owned(), kind),
                _ => (name.to_owned(), "untyped"),
            };
            if let Some(h) = help.take() {
                let text = h.split_once(' ').map_or("", |(_, t)| t);
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
        } else if line.starts_with("# UNIT ")
            || line == "# EOF"
            || line.contains("_created{")
            || line.contains("_created ")
        {
            continue;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// CPU, memory, file descriptors and start time of this process, from /proc/self.
#[derive(Debug)]
struct ProcessCollector {
    ticks_per_second: f64,
    page_size: u64,
    boot_time: f64,
}

impl ProcessCollector {
    fn new() -> Self {
        // SAFETY: sysconf has no preconditions.
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        let boot_time = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("btime ").and_then(|v| v.trim().parse().ok()))
            })
            .unwrap_or(0.0);
        Self {
            ticks_per_second: ticks.max(1) as f64,
            page_size: page.max(1) as u64,
            boot_time,
        }
    }
}

/// Fields of /proc/self/stat we use, after the command name.
struct ProcStat {
    utime: u64,
    stime: u64,
    start_ticks: u64,
    vsize: u64,
    rss_pages: u64,
}

fn proc_stat() -> Option<ProcStat> {
    let text = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name is in parentheses and may contain spaces: split after its closing one.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); see proc(5).
    let field = |n: usize| f.get(n - 3)?.parse::<u64>().ok();
    Some(ProcStat {
        utime: field(14)?,
        stime: field(15)?,
        start_ticks: field(22)?,
        vsize: field(23)?,
        rss_pages: field(24)?,
    })
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(s) = proc_stat() else { return Ok(()) };
        let cpu = ConstCounter::new((s.utime + s.stime) as f64 / self.ticks_per_second);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            MetricType::Counter,
        )?)?;
        for (name, help, value) in [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                (s.rss_pages * self.page_size) as f64,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                s.vsize as f64,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                self.boot_time + s.start_ticks as f64 / self.ticks_per_second,
            ),
        ] {
            ConstGauge::new(value).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Gauge,
            )?)?;
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            ConstGauge::new(fds.count() as i64).encode(encoder.encode_descriptor(
                "process_open_fds",
                "Number of open file descriptors",
                None,
                MetricType::Gauge,
            )?)?;
        }
        Ok(())
    }
}

/// Seconds since the epoch, for logs and status.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_metrics_are_read_from_proc() {
        let s = proc_stat().expect("/proc/self/stat parses");
        assert!(s.rss_pages > 0 && s.vsize > 0);
        let text = render(&registry(&AgentMetrics::default(), vec![]));
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_start_time_seconds",
            "edgeplane_build_info{version=\"",
            "edgeplane_config_reloads_total",
            "edgeplane_http_connections_closed_total{reason=\"header_timeout\"} 0",
            "edgeplane_http_connections 0",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
        let start: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("process_start_time_seconds "))
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            (start - unix_now()).abs() < 3600.0,
            "start time {start} is not recent"
        );
    }

    #[test]
    fn prometheus_text_names_families_like_their_samples() {
        let om = "# HELP a_total_thing x.\n# TYPE a counter\n# UNIT a seconds\na_total{l=\"1\"} 3\na_created{l=\"1\"} 1.0\n\
                  # HELP b Build info.\n# TYPE b info\nb_info{version=\"1\"} 1\n\
                  # HELP c A gauge.\n# TYPE c gauge\nc 2\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP a_total x.\n# TYPE a_total counter\na_total{l=\"1\"} 3\n\
             # HELP b_info Build info.\n# TYPE b_info gauge\nb_info{version=\"1\"} 1\n\
             # HELP c A gauge.\n# TYPE c gauge\nc 2\n"
        );
    }
}
