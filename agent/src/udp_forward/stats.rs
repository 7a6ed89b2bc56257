//! Exports the forwarder's per-CPU counters as Prometheus metrics at scrape time.

use std::sync::{Arc, RwLock, atomic::Ordering::Relaxed};

use edgeplane_common::udp_forward::{PassReason, UdpStats};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

use super::{StatsMap, UdpView};
use crate::{kernel::maps, userspace::SharedUserspaceView};

/// Reads the counters of every installed rule and ingress interface on each scrape, kernel and
/// userspace rules alike (one metric family each, whichever engine runs a rule).
pub struct UdpCollector {
    /// The kernel's counters; None when the kernel path is not loaded.
    pub stats: Option<StatsMap>,
    pub view: Arc<RwLock<UdpView>>,
    pub userspace: SharedUserspaceView,
}

impl std::fmt::Debug for UdpCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpCollector").finish_non_exhaustive()
    }
}

/// Sums a slot's counters over all CPUs; a slot that can't be read counts as zero.
pub fn read(stats: &StatsMap, slot: u32) -> UdpStats {
    maps::sum_slot(&stats.lock().expect("stats lock"), slot, |t, s| {
        t.packets += s.packets;
        t.bytes += s.bytes;
        for (t, v) in t.passed.iter_mut().zip(s.passed) {
            *t += v;
        }
    })
}

impl UdpCollector {
    fn read(&self, slot: u32) -> UdpStats {
        self.stats
            .as_ref()
            .map_or_else(UdpStats::default, |s| read(s, slot))
    }
}

impl Collector for UdpCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let view = self.view.read().expect("view lock").clone();
        let user = self.userspace.read().expect("view lock").clone();
        let rules: Vec<(&str, UdpStats)> = view
            .rules
            .iter()
            .map(|r| (r.name.as_str(), self.read(r.slot)))
            .collect();
        // (rule, packets, bytes) of both engines.
        let totals: Vec<(&str, u64, u64)> = rules
            .iter()
            .map(|(rule, s)| (*rule, s.packets, s.bytes))
            .chain(user.udp.iter().map(|u| {
                (
                    u.rule.as_str(),
                    u.counters.packets.load(Relaxed),
                    u.counters.bytes.load(Relaxed),
                )
            }))
            .collect();
        let ingress: Vec<(&str, UdpStats)> = view
            .ingress
            .iter()
            .map(|i| (i.iface.as_str(), self.read(i.slot)))
            .collect();

        let mut family = encoder.encode_descriptor(
            "udp_forward_packets",
            "UDP datagrams forwarded (in the kernel, or by the userspace engine), per rule",
            None,
            MetricType::Counter,
        )?;
        for (rule, packets, _) in &totals {
            ConstCounter::new(*packets).encode(family.encode_family(&[("rule", *rule)])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "udp_forward_bytes",
            "Bytes of forwarded frames (Ethernet header included, as received), per rule",
            None,
            MetricType::Counter,
        )?;
        for (rule, _, bytes) in &totals {
            ConstCounter::new(*bytes).encode(family.encode_family(&[("rule", *rule)])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "udp_forward_engine",
            "1 for each rule, with the engine running it: xdp, tc, tokio or tokio-uring",
            None,
            MetricType::Gauge,
        )?;
        for r in &view.rules {
            if let Some(i) = view.ingress.iter().find(|i| i.iface == r.ingress) {
                let hook = i.hook.to_string();
                ConstGauge::new(1i64).encode(
                    family
                        .encode_family(&[("rule", r.name.as_str()), ("engine", hook.as_str())])?,
                )?;
            }
        }
        for u in &user.udp {
            ConstGauge::new(1i64).encode(
                family.encode_family(&[("rule", u.rule.as_str()), ("engine", u.engine)])?,
            )?;
        }
        let mut family = encoder.encode_descriptor(
            "udp_forward_userspace_send_errors",
            "Datagrams of a userspace rule its egress socket refused (full queue, no route)",
            None,
            MetricType::Counter,
        )?;
        for u in &user.udp {
            ConstCounter::new(u.counters.send_errors.load(Relaxed))
                .encode(family.encode_family(&[("rule", u.rule.as_str())])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "udp_forward_userspace_unmatched",
            "Datagrams a userspace listener received that no rule's source match took, dropped",
            None,
            MetricType::Counter,
        )?;
        for (iface, listen, n) in &user.udp_unmatched {
            let listen = listen.to_string();
            ConstCounter::new(n.load(Relaxed)).encode(
                family.encode_family(&[("iface", iface.as_str()), ("listen", listen.as_str())])?,
            )?;
        }
        let mut family = encoder.encode_descriptor(
            "udp_forward_passed",
            "Datagrams a rule matched but handed to the network stack, by reason",
            None,
            MetricType::Counter,
        )?;
        for (rule, s) in &rules {
            for reason in PassReason::ALL.into_iter().filter(|r| !r.is_ingress()) {
                ConstCounter::new(s.passed[reason as usize]).encode(
                    family.encode_family(&[("rule", *rule), ("reason", reason.label())])?,
                )?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "udp_forward_ingress_passed",
            "Frames on an ingress interface that no rule took, handed to the stack untouched, by reason",
            None,
            MetricType::Counter,
        )?;
        for (iface, s) in &ingress {
            for reason in PassReason::ALL.into_iter().filter(|r| r.is_ingress()) {
                ConstCounter::new(s.passed[reason as usize]).encode(
                    family.encode_family(&[("iface", *iface), ("reason", reason.label())])?,
                )?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "udp_forward_attached",
            "1 for each ingress interface the forwarder is attached to, with its hook (xdp or tc)",
            None,
            MetricType::Gauge,
        )?;
        for i in &view.ingress {
            let hook = i.hook.to_string();
            ConstGauge::new(1i64).encode(
                family.encode_family(&[("iface", i.iface.as_str()), ("hook", hook.as_str())])?,
            )?;
        }
        let rules_gauge = ConstGauge::new((view.rules.len() + user.udp.len()) as i64);
        rules_gauge.encode(encoder.encode_descriptor(
            "udp_forward_rules",
            "UDP forwarding rules installed",
            None,
            rules_gauge.metric_type(),
        )?)?;
        Ok(())
    }
}
