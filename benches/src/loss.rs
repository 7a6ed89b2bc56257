//! Where the offered datagrams went at saturation: every counter on the way that can show a
//! datagram taken or dropped, read before and after the saturation phase.
//!
//! Sources: the sender's sendmmsg errors; each veth's `ip -s link` statistics and its
//! per-queue `ethtool -S` counters (a full NAPI ring, XDP drops and redirect errors); the IP and
//! UDP counters of /proc/net/snmp in each namespace (discards, a full socket buffer); the
//! kernel's softnet statistics (backlog drops, all namespaces: not ours alone); the agent's own
//! forwarded / passed / send-error counters.

use std::collections::BTreeMap;

use anyhow::Context as _;
use edgeplane_testbed::netns::{Line, Netns};
use serde::{Deserialize, Serialize};

/// One counter's change over the saturation phase.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Count {
    /// `sender`, `s0`, `g0`, `gateway`, `agent`, `g1`, `r0`, `receiver`, `kernel`.
    pub place: String,
    pub counter: String,
    pub count: u64,
    /// A drop or an error (else a stage datagrams passed).
    pub lost: bool,
}

impl Count {
    /// A count of the sender's own (not a kernel counter).
    pub fn sender(counter: &str, count: u64, lost: bool) -> Self {
        Self {
            place: "sender".into(),
            counter: counter.into(),
            count,
            lost,
        }
    }
}

/// Counter values at one moment, keyed by (place, counter).
#[derive(Debug, Default)]
pub struct Snapshot(BTreeMap<(String, String), u64>);

/// At saturation the receiver takes the datagrams at r0's ingress hook, counts and drops them:
/// its UDP stack would cost the traffic CPU more than the sender can spare.
pub const SINK: &str = "table netdev edgeplane_bench_sink {
  counter arrived {}
  chain ingress {
    type filter hook ingress device \"r0\" priority 0; policy accept;
    udp dport 6000 counter name \"arrived\" drop
  }
}
";

/// The sink's counter: datagrams that reached the receiver.
pub const SINK_COUNTER: &str = "nft ingress sink (arrived)";

/// Stages a datagram passes, in path order, shown even when nothing was lost: how far the
/// offered datagrams got.
const PASSED: &[(&str, &str)] = &[
    ("g0", "rx_queue_0_xdp_packets"),
    ("agent", "edgeplane_udp_forward_packets_total"),
    ("gateway", "Ip ForwDatagrams"),
    ("g1", "tx_packets"),
    ("r0", "rx_queue_0_xdp_packets"),
    ("receiver", SINK_COUNTER),
];

/// Whether a counter's name says it counts drops or errors.
fn is_loss(counter: &str) -> bool {
    let c = counter.to_ascii_lowercase();
    [
        "drop",
        "err",
        "discard",
        "noport",
        "noroute",
        "squeeze",
        "passed",
        "unmatched",
    ]
    .iter()
    .any(|w| c.contains(w))
}

impl Snapshot {
    /// Reads every counter of the line (and of the agent, given its /metrics text).
    pub fn take(line: &Line, agent_metrics: Option<&str>) -> anyhow::Result<Self> {
        let mut s = Self::default();
        for (ns, dev) in [
            (&line.sender, "s0"),
            (&line.gateway, "g0"),
            (&line.gateway, "g1"),
            (&line.receiver, "r0"),
        ] {
            s.link(ns, dev)?;
            s.ethtool(ns, dev)?;
        }
        for (ns, place) in [
            (&line.sender, "sender"),
            (&line.gateway, "gateway"),
            (&line.receiver, "receiver"),
        ] {
            s.snmp(ns, place)?;
        }
        s.softnet()?;
        s.sink(&line.receiver)?;
        if let Some(text) = agent_metrics {
            s.agent(text);
        }
        Ok(s)
    }

    /// One counter's value (0 if it was not read).
    pub fn get(&self, place: &str, counter: &str) -> u64 {
        self.0
            .get(&(place.to_owned(), counter.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    fn set(&mut self, place: &str, counter: impl Into<String>, v: u64) {
        *self.0.entry((place.into(), counter.into())).or_default() += v;
    }

    /// `ip -s link`: rx/tx packets, dropped, errors.
    fn link(&mut self, ns: &Netns, dev: &str) -> anyhow::Result<()> {
        let out = ns.ip(&["-s", "-j", "link", "show", "dev", dev])?;
        let v: serde_json::Value = serde_json::from_str(&out).context("parsing ip -j -s link")?;
        let stats = &v[0]["stats64"];
        for dir in ["rx", "tx"] {
            for field in ["packets", "dropped", "errors"] {
                if let Some(n) = stats[dir][field].as_u64() {
                    self.set(dev, format!("{dir}_{field}"), n);
                }
            }
        }
        Ok(())
    }

    /// veth's per-queue counters (`ethtool -S`).
    fn ethtool(&mut self, ns: &Netns, dev: &str) -> anyhow::Result<()> {
        for line in ns.exec(&["ethtool", "-S", dev])?.lines() {
            if let Some((k, v)) = line.trim().split_once(": ")
                && k != "peer_ifindex"
                && let Ok(n) = v.trim().parse()
            {
                self.set(dev, k, n);
            }
        }
        Ok(())
    }

    /// The namespace's Ip and Udp counters (/proc/net/snmp).
    fn snmp(&mut self, ns: &Netns, place: &str) -> anyhow::Result<()> {
        let text = ns.exec(&["cat", "/proc/net/snmp"])?;
        let lines: Vec<&str> = text.lines().collect();
        for pair in lines.chunks(2) {
            let [names, values] = pair else { continue };
            let proto = names.split(':').next().unwrap_or_default();
            if proto != "Ip" && proto != "Udp" {
                continue;
            }
            for (n, v) in names
                .split_whitespace()
                .zip(values.split_whitespace())
                .skip(1)
            {
                if let Ok(v) = v.parse() {
                    self.set(place, format!("{proto} {n}"), v);
                }
            }
        }
        Ok(())
    }

    /// The receiver's sink: its nftables counter, once [`SINK`] is loaded.
    fn sink(&mut self, ns: &Netns) -> anyhow::Result<()> {
        let Ok(out) = ns.exec(&[
            "nft",
            "-j",
            "list",
            "counter",
            "netdev",
            "edgeplane_bench_sink",
            "arrived",
        ]) else {
            return Ok(());
        };
        let v: serde_json::Value = serde_json::from_str(&out).context("parsing nft -j")?;
        let packets = v["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .find_map(|o| o["counter"]["packets"].as_u64())
            .context("no counter in nft -j list counter")?;
        self.set("receiver", SINK_COUNTER, packets);
        Ok(())
    }

    /// /proc/net/softnet_stat, summed over CPUs: backlog drops and squeezed polls (global).
    fn softnet(&mut self) -> anyhow::Result<()> {
        let text = std::fs::read_to_string("/proc/net/softnet_stat")?;
        for line in text.lines() {
            let f: Vec<u64> = line
                .split_whitespace()
                .filter_map(|x| u64::from_str_radix(x, 16).ok())
                .collect();
            self.set(
                "kernel",
                "softnet dropped (all netns)",
                f.get(1).copied().unwrap_or(0),
            );
            self.set(
                "kernel",
                "softnet time_squeeze (all netns)",
                f.get(2).copied().unwrap_or(0),
            );
        }
        Ok(())
    }

    /// The agent's UDP forwarding counters, summed over their labels.
    fn agent(&mut self, metrics: &str) {
        for name in [
            "edgeplane_udp_forward_packets_total",
            "edgeplane_udp_forward_passed_total",
            "edgeplane_udp_forward_ingress_passed_total",
            "edgeplane_udp_forward_userspace_send_errors_total",
            "edgeplane_udp_forward_userspace_unmatched_total",
        ] {
            let sum: f64 = metrics
                .lines()
                .filter(|l| {
                    l.strip_prefix(name)
                        .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
                })
                .filter_map(|l| l.rsplit_once(' ')?.1.trim().parse::<f64>().ok())
                .sum();
            self.set("agent", name, sum as u64);
        }
    }

    /// What changed since `before`: the stages datagrams passed, then every drop or error
    /// counter that moved, in path order.
    pub fn since(&self, before: &Self) -> Vec<Count> {
        let delta =
            |k: &(String, String)| self.0[k].saturating_sub(before.0.get(k).copied().unwrap_or(0));
        let order = [
            "sender", "s0", "g0", "gateway", "agent", "kernel", "g1", "r0", "receiver",
        ];
        let mut out: Vec<Count> = Vec::new();
        for place in order {
            for k in self.0.keys().filter(|k| k.0 == place) {
                let passed = PASSED.contains(&(k.0.as_str(), k.1.as_str()));
                let lost = is_loss(&k.1);
                let n = delta(k);
                if passed || (lost && n > 0) {
                    out.push(Count {
                        place: k.0.clone(),
                        counter: k.1.clone(),
                        count: n,
                        lost: lost && !passed,
                    });
                }
            }
        }
        out
    }
}
