//! Exports the CAN router's counters and watched IDs' cycle times at scrape time.

use std::sync::{Arc, RwLock};

use edgeplane_common::{
    can::{CanIngressStats, CanRuleStats, CanWatch, DropReason},
    hist::Log2Hist,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

use super::{
    CanView,
    router::{GwTotals, IngressStats, RuleStats, SharedGateway, WatchMap},
};
use tracing::warn;

use crate::{
    kernel::maps,
    metrics::encode_log2_hist,
    userspace::{CanRouteView, SharedUserspaceView},
};

pub struct CanCollector {
    pub rules: RuleStats,
    pub gateway: SharedGateway,
    pub ingress: IngressStats,
    pub watch: WatchMap,
    pub view: Arc<RwLock<CanView>>,
    /// Routes run in userspace: counted in the same families.
    pub userspace: SharedUserspaceView,
}

/// The route families of the userspace routes alone, when the kernel path is not loaded.
#[derive(Debug)]
pub struct UserspaceCanCollector {
    pub userspace: SharedUserspaceView,
}

impl Collector for UserspaceCanCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let user = self.userspace.read().expect("view lock").clone();
        let rows: Vec<_> = user.can.iter().map(userspace_row).collect();
        encode_routes(&mut encoder, &rows)?;
        encode_read_errors(&mut encoder, &user.can)
    }
}

/// Failed reads of the userspace routes' ingress sockets (the interface went down, ...): the
/// reader counts them and reads on.
fn encode_read_errors(
    encoder: &mut DescriptorEncoder,
    routes: &[CanRouteView],
) -> Result<(), std::fmt::Error> {
    use std::sync::atomic::Ordering::Relaxed;
    if routes.is_empty() {
        return Ok(());
    }
    let mut family = encoder.encode_descriptor(
        "can_userspace_read_errors",
        "Failed reads of a userspace route's ingress socket (e.g. the interface went down); \
         the route reads on",
        None,
        MetricType::Counter,
    )?;
    for r in routes {
        ConstCounter::new(r.counters.read_errors.load(Relaxed))
            .encode(family.encode_family(&[("rule", r.route.as_str())])?)?;
    }
    Ok(())
}

/// A userspace route's counters in the kernel path's terms: its writes are what can-gw's
/// `handled` counts, its deleted and refused frames can-gw's `deleted` and `dropped`.
fn userspace_row(r: &CanRouteView) -> (&str, CanRuleStats, GwTotals) {
    use std::sync::atomic::Ordering::Relaxed;
    let c = &r.counters;
    let mut s = CanRuleStats {
        frames: c.frames.load(Relaxed),
        bytes: c.bytes.load(Relaxed),
        ..CanRuleStats::default()
    };
    s.dropped[DropReason::FdToClassic as usize] = c.fd_to_classic.load(Relaxed);
    let g = GwTotals {
        handled: c.routed.load(Relaxed),
        dropped: c.dropped.load(Relaxed),
        deleted: c.deleted.load(Relaxed),
    };
    (r.route.as_str(), s, g)
}

impl std::fmt::Debug for CanCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CanCollector").finish_non_exhaustive()
    }
}

pub fn read_rule(stats: &RuleStats, slot: u32) -> CanRuleStats {
    maps::sum_slot(&stats.lock().expect("lock"), slot, |t, s| {
        t.frames += s.frames;
        t.bytes += s.bytes;
        t.routed += s.routed;
        for (t, v) in t.dropped.iter_mut().zip(s.dropped) {
            *t += v;
        }
    })
}

pub fn read_ingress(stats: &IngressStats, slot: u32) -> CanIngressStats {
    maps::sum_slot(&stats.lock().expect("lock"), slot, |t, s| {
        t.classic += s.classic;
        t.fd += s.fd;
        t.rtr += s.rtr;
        t.error += s.error;
        t.other += s.other;
    })
}

/// Picks one of a watched ID's histograms.
type HistOf = fn(&CanWatch) -> &Log2Hist;

impl Collector for CanCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let view = self.view.read().expect("view lock").clone();
        // can-gw's counters of our jobs, one netlink dump per scrape.
        let jobs = match self.gateway.lock().expect("lock").totals() {
            Ok(t) => t,
            Err(e) => {
                warn!("reading can-gw's counters: {e}");
                Vec::new()
            }
        };
        let user = self.userspace.read().expect("view lock").clone();
        let rules: Vec<(&str, CanRuleStats, GwTotals)> = view
            .routes
            .iter()
            .map(|r| {
                let mut gw = r.carried;
                for job in &r.jobs {
                    gw += jobs
                        .iter()
                        .find(|(j, _)| j == job)
                        .map(|(_, t)| *t)
                        .unwrap_or_default();
                }
                (r.name.as_str(), read_rule(&self.rules, r.slot), gw)
            })
            .chain(user.can.iter().map(userspace_row))
            .collect();
        encode_routes(&mut encoder, &rules)?;
        encode_read_errors(&mut encoder, &user.can)?;

        let mut family = encoder.encode_descriptor(
            "can_ingress_frames",
            "Frames seen on a CAN interface by kind (rtr frames also count as classic)",
            None,
            MetricType::Counter,
        )?;
        for i in &view.ingress {
            let s = read_ingress(&self.ingress, i.slot);
            for (kind, v) in [
                ("classic", s.classic),
                ("fd", s.fd),
                ("rtr", s.rtr),
                ("error", s.error),
                ("other", s.other),
            ] {
                ConstCounter::new(v).encode(
                    family.encode_family(&[("iface", i.iface.as_str()), ("kind", kind)])?,
                )?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "can_attached",
            "1 for each CAN interface can_route is attached to",
            None,
            MetricType::Gauge,
        )?;
        for i in &view.ingress {
            ConstGauge::new(1i64).encode(family.encode_family(&[("iface", i.iface.as_str())])?)?;
        }

        // Watched IDs: one consistent read of each value.
        let watches: Vec<(&str, &str, u64, CanWatch)> = {
            let map = self.watch.lock().expect("lock");
            view.watches
                .iter()
                .map(|w| {
                    (
                        w.iface.as_str(),
                        w.id.as_str(),
                        w.period_ns,
                        map.get(&w.key, 0).unwrap_or_default(),
                    )
                })
                .collect()
        };
        let hists: [(&str, &str, HistOf); 2] = [
            (
                "can_cycle_seconds",
                "Time between consecutive frames of a watched ID",
                |w| &w.cycle,
            ),
            (
                "can_jitter_seconds",
                "Deviation of a watched ID's cycle time from its expected period",
                |w| &w.jitter,
            ),
        ];
        for (name, help, hist) in hists {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
            for (iface, id, _, w) in &watches {
                encode_log2_hist(
                    family.encode_family(&[("iface", *iface), ("id", *id)])?,
                    hist(w),
                )?;
            }
        }
        for (name, help, value) in [
            (
                "can_deadline_missed",
                "Frames of a watched ID later than period × tolerance after the previous one",
                (|w: &CanWatch| w.missed) as fn(&CanWatch) -> u64,
            ),
            ("can_id_frames", "Frames of a watched ID", |w| w.frames),
            (
                "can_id_bytes",
                "Payload bytes of a watched ID's frames",
                |w| w.bytes,
            ),
        ] {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (iface, id, _, w) in &watches {
                ConstCounter::new(value(w))
                    .encode(family.encode_family(&[("iface", *iface), ("id", *id)])?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "can_expected_period_seconds",
            "The configured period of a watched ID",
            None,
            MetricType::Gauge,
        )?;
        for (iface, id, period_ns, _) in &watches {
            ConstGauge::new(*period_ns as f64 / 1e9)
                .encode(family.encode_family(&[("iface", *iface), ("id", *id)])?)?;
        }
        Ok(())
    }
}

/// can_frames, can_bytes, can_routed and can_dropped for every route, kernel or userspace.
fn encode_routes(
    encoder: &mut DescriptorEncoder,
    rules: &[(&str, CanRuleStats, GwTotals)],
) -> Result<(), std::fmt::Error> {
    for (name, help, value) in [
        (
            "can_frames",
            "CAN frames a route's filter matched",
            (|s: &CanRuleStats, _: &GwTotals| s.frames) as fn(&CanRuleStats, &GwTotals) -> u64,
        ),
        (
            "can_bytes",
            "Payload bytes of the frames a route matched",
            |s, _| s.bytes,
        ),
        (
            "can_routed",
            "Frames a route sent out of its egress interface (by can-gw) or into its tunnel",
            |s, g| s.routed + g.handled,
        ),
    ] {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (rule, s, g) in rules {
            ConstCounter::new(value(s, g)).encode(family.encode_family(&[("rule", *rule)])?)?;
        }
    }
    let mut family = encoder.encode_descriptor(
        "can_dropped",
        "Frames a route matched but did not send (or dropped), by reason",
        None,
        MetricType::Counter,
    )?;
    for (rule, s, g) in rules {
        for reason in DropReason::ALL {
            ConstCounter::new(s.dropped[reason as usize])
                .encode(family.encode_family(&[("rule", *rule), ("reason", reason.label())])?)?;
        }
        // can-gw deletes frames over its hop limit or made invalid by a modification, and
        // drops frames it could not send.
        for (reason, v) in [
            ("gateway_deleted", g.deleted),
            ("gateway_dropped", g.dropped),
        ] {
            ConstCounter::new(v)
                .encode(family.encode_family(&[("rule", *rule), ("reason", reason)])?)?;
        }
    }

    Ok(())
}
