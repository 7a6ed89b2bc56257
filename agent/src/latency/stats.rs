//! Exports the latency histograms and the slow-event counters at scrape time.

use std::sync::{Arc, RwLock, atomic::Ordering::Relaxed};

use aya::maps::{MapData, PerCpuArray};
use edgeplane_common::{
    hist::Log2Hist,
    latency::{STAGE_QUEUED, STAGE_READ, STAGES},
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter},
};

use super::{DeliveryTarget, DeliveryView, HistMap, events::EventCounts};
use crate::{can::CanView, metrics::encode_log2_hist, udp_forward::UdpView};

pub struct LatencyCollector {
    pub(super) udp_forward: HistMap,
    pub(super) can_forward: HistMap,
    pub(super) delivery: HistMap,
    pub(super) delivery_view: DeliveryView,
    pub(super) events_dropped: Arc<PerCpuArray<MapData, u64>>,
    pub(super) events: Arc<EventCounts>,
    pub(super) udp: Arc<RwLock<UdpView>>,
    pub(super) can: Arc<RwLock<CanView>>,
}

impl std::fmt::Debug for LatencyCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatencyCollector").finish_non_exhaustive()
    }
}

fn read(map: &HistMap, index: u32) -> Log2Hist {
    map.lock().expect("lock").get(&index, 0).unwrap_or_default()
}

impl Collector for LatencyCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let udp: Vec<(String, u32)> = (self.udp.read().expect("lock").rules.iter())
            .map(|r| (r.name.clone(), r.slot))
            .collect();
        let mut family = encoder.encode_descriptor(
            "udp_forward_latency_seconds",
            "Time from a datagram's receive timestamp (or the forwarding hook) to it leaving \
             the egress device, per rule",
            None,
            MetricType::Histogram,
        )?;
        for (rule, slot) in &udp {
            encode_log2_hist(
                family.encode_family(&[("rule", rule.as_str())])?,
                &read(&self.udp_forward, *slot),
            )?;
        }
        let can: Vec<(String, u32)> = (self.can.read().expect("lock").routes.iter())
            .map(|r| (r.name.clone(), r.slot))
            .collect();
        let mut family = encoder.encode_descriptor(
            "can_forward_latency_seconds",
            "Time from a CAN frame's receive timestamp (or the routing hook) to it leaving the \
             egress device, per route",
            None,
            MetricType::Histogram,
        )?;
        for (rule, slot) in &can {
            encode_log2_hist(
                family.encode_family(&[("rule", rule.as_str())])?,
                &read(&self.can_forward, *slot),
            )?;
        }
        let delivery = self.delivery_view.read().expect("lock").clone();
        let mut family = encoder.encode_descriptor(
            "socket_delivery_latency_seconds",
            "Time from a frame's receive timestamp to it being queued on a local socket \
             (stage=queued) and read by the application (stage=read)",
            None,
            MetricType::Histogram,
        )?;
        for (target, slot) in &delivery {
            for (stage, name) in [(STAGE_QUEUED, "queued"), (STAGE_READ, "read")] {
                let h = read(&self.delivery, slot * STAGES + stage);
                match target {
                    DeliveryTarget::UdpPort(p) => encode_log2_hist(
                        family.encode_family(&[
                            ("proto", "udp"),
                            ("port", p.to_string().as_str()),
                            ("stage", name),
                        ])?,
                        &h,
                    )?,
                    DeliveryTarget::CanIface(i) => encode_log2_hist(
                        family.encode_family(&[
                            ("proto", "can"),
                            ("iface", i.as_str()),
                            ("stage", name),
                        ])?,
                        &h,
                    )?,
                }
            }
        }
        let dropped: u64 = self
            .events_dropped
            .get(&0, 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0);
        for (name, help, value) in [
            (
                "latency_events",
                "Slow-frame events read from the kernel's ring buffer",
                self.events.received.load(Relaxed),
            ),
            (
                "latency_events_dropped",
                "Slow-frame events lost because the ring buffer was full",
                dropped,
            ),
        ] {
            let family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(value).encode(family)?;
        }
        Ok(())
    }
}
