//! The benchmark report: rows in JSON for tracking over time, and a Markdown table with each
//! engine's ratio to the userspace tokio engine of the same suite.

use std::path::Path;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::{loss::Count, table::markdown};

/// One engine measured in one suite.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    /// `udp` or `can`.
    pub suite: String,
    /// `xdp`, `tc`, `tokio`, `tokio-uring`, `socat`, `can-gw (edgeplane)`, ...
    pub engine: String,
    /// Packets (frames) per second forwarded at saturation.
    pub pps: Option<f64>,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub p999_us: Option<f64>,
    /// CPU time per forwarded packet at saturation of the benchmark's whole path: the sender
    /// and the receive path it runs in softirq, the forwarder, ksoftirqd (UDP suite); the whole
    /// VM (CAN suite).
    pub cpu_ns_per_packet: Option<f64>,
    /// Peak RSS of the forwarding process (the agent, or the peer).
    pub rss_bytes: Option<u64>,
    /// The sender's own rate in the same run: what was offered.
    pub sender_pps: Option<f64>,
    /// CPU time of the forwarding process alone per forwarded packet (kernel-path work runs
    /// in softirq and is not charged to the agent).
    pub process_cpu_ns_per_packet: Option<f64>,
    /// UDP suite: CPU time of the forwarding CPU's work (the gateway's ingress NAPI kthread and
    /// the forwarding process) per forwarded packet.
    #[serde(default)]
    pub forwarder_cpu_ns_per_packet: Option<f64>,
    /// Latency datagrams that arrived, of those sent.
    pub latency_received: Option<String>,
    /// Micro benchmarks (suite `micro`): time per operation.
    pub ns_per_op: Option<f64>,
    /// Suite `footprint`: a file's size (the shipped binary).
    #[serde(default)]
    pub size_bytes: Option<u64>,
    pub note: Option<String>,
    /// UDP suite: where the offered datagrams went at saturation (the median round).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<Vec<Count>>,
}

impl Row {
    /// A micro benchmark's row.
    pub fn micro(name: impl Into<String>, ns: f64, note: impl Into<String>) -> Self {
        Self {
            suite: "micro".into(),
            engine: name.into(),
            pps: None,
            p50_us: None,
            p99_us: None,
            p999_us: None,
            cpu_ns_per_packet: None,
            rss_bytes: None,
            sender_pps: None,
            process_cpu_ns_per_packet: None,
            forwarder_cpu_ns_per_packet: None,
            latency_received: None,
            ns_per_op: Some(ns),
            size_bytes: None,
            note: Some(note.into()),
            loss: None,
        }
    }
}

/// Every row of a run, saved as a JSON list.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Report {
    pub rows: Vec<Row>,
}

impl Report {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// The Markdown report: one table per suite, then the micro benchmarks.
    pub fn markdown(&self) -> String {
        let udp: Vec<&Row> = self.rows.iter().filter(|r| r.suite == "udp").collect();
        let mut out = crate::udp_report::markdown_tables(&udp);
        let can: Vec<&Row> = self.rows.iter().filter(|r| r.suite == "can").collect();
        if !can.is_empty() {
            let base = can
                .iter()
                .find(|r| r.engine == "socketcan (edgeplane userspace)");
            let table: Vec<Vec<String>> = can
                .iter()
                .map(|r| {
                    vec![
                        r.engine.clone(),
                        fmt(r.pps, 0),
                        ratio(r.pps, base.and_then(|b| b.pps)),
                        fmt(r.sender_pps, 0),
                        fmt(r.p50_us, 1),
                        fmt(r.p99_us, 1),
                        ratio(r.p99_us, base.and_then(|b| b.p99_us)),
                        fmt(r.p999_us, 1),
                        fmt(r.cpu_ns_per_packet, 0),
                        fmt(r.process_cpu_ns_per_packet, 0),
                        r.rss_bytes.map_or("-".into(), |b| {
                            format!("{:.1}", b as f64 / (1 << 20) as f64)
                        }),
                        r.note.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            let base_name = base.map_or("-", |b| b.engine.as_str());
            out += &format!(
                "### CAN routing, vxcan → gateway → vxcan (qemu TCG emulation: compare ratios, not absolute numbers)\n\nRatios are to `{base_name}`.\n\n{}\n",
                markdown(
                    &[
                        "engine",
                        "pps",
                        "pps ratio",
                        "sender pps",
                        "p50 µs",
                        "p99 µs",
                        "p99 ratio",
                        "p99.9 µs",
                        "CPU ns/pkt (all)",
                        "CPU ns/pkt (forwarder process)",
                        "RSS MiB",
                        "note",
                    ],
                    &table
                )
            );
        }
        let footprint: Vec<&Row> = self
            .rows
            .iter()
            .filter(|r| r.suite == "footprint")
            .collect();
        if !footprint.is_empty() {
            let table: Vec<Vec<String>> = footprint
                .iter()
                .map(|r| {
                    vec![
                        r.engine.clone(),
                        r.rss_bytes.or(r.size_bytes).map_or("-".into(), |b| {
                            format!(
                                "{:.1} MB ({:.1} MiB)",
                                b as f64 / 1e6,
                                b as f64 / (1 << 20) as f64
                            )
                        }),
                        r.note.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            out += &format!(
                "### Footprint\n\n{}\n",
                markdown(&["what", "bytes", "how"], &table)
            );
        }
        let micro: Vec<&Row> = self.rows.iter().filter(|r| r.suite == "micro").collect();
        if !micro.is_empty() {
            let table: Vec<Vec<String>> = micro
                .iter()
                .map(|m| {
                    vec![
                        m.engine.clone(),
                        fmt(m.ns_per_op, 1),
                        m.note.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            out += &format!(
                "### Micro benchmarks\n\n{}\n",
                markdown(&["benchmark", "ns", "how"], &table)
            );
        }
        out
    }
}

/// `v / b` as `1.23×`, or `-` without both.
pub fn ratio(v: Option<f64>, b: Option<f64>) -> String {
    match (v, b) {
        (Some(v), Some(b)) if b > 0.0 => format!("{:.2}×", v / b),
        _ => "-".into(),
    }
}

pub fn fmt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.digits$}"))
}
