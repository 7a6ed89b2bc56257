//! What the exporter shows of itself: `edgeplane_remote_write_*` and the `/readyz` component
//! of each endpoint, read from the queue's stats snapshot (never the queue itself).

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU64, Ordering},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

use super::queue::QueueStats;
use crate::{
    metrics::unix_now,
    runtime::status::{Component, State},
};

#[derive(Debug)]
pub struct EndpointStatus {
    name: String,
    queue: Arc<Mutex<QueueStats>>,
    retried: AtomicU64,
    /// The last send's error, `None` after a success.
    error: Mutex<Option<String>>,
    /// Seconds since the epoch, as f64 bits; 0 before the first.
    last_success: AtomicU64,
}

impl EndpointStatus {
    pub fn new(name: &str, queue: Arc<Mutex<QueueStats>>) -> Self {
        Self {
            name: name.to_owned(),
            queue,
            retried: AtomicU64::new(0),
            error: Mutex::new(None),
            last_success: AtomicU64::new(0),
        }
    }

    fn queue(&self) -> QueueStats {
        self.queue.lock().expect("stats lock").clone()
    }

    pub fn queued_samples(&self) -> u64 {
        self.queue().samples
    }

    pub fn retried(&self, samples: u64) {
        self.retried.fetch_add(samples, Ordering::Relaxed);
    }

    /// Records a failed send; true when it is the first of an outage (worth a log line).
    pub fn set_error(&self, e: String) -> bool {
        self.error.lock().expect("lock").replace(e).is_none()
    }

    /// Records a send the endpoint answered; true when it ends an outage.
    pub fn set_sent(&self, now: f64) -> bool {
        self.last_success.store(now.to_bits(), Ordering::Relaxed);
        self.error.lock().expect("lock").take().is_some()
    }

    fn last_success(&self) -> f64 {
        f64::from_bits(self.last_success.load(Ordering::Relaxed))
    }

    pub fn component(&self) -> Component {
        let q = self.queue();
        let error = self.error.lock().expect("lock").clone();
        let mut detail = format!("queue {} samples, {} bytes", q.samples, q.bytes);
        if q.oldest_ms > 0 {
            detail += &format!(
                ", oldest {:.1} s old",
                (unix_now() - q.oldest_ms as f64 / 1e3).max(0.0)
            );
        }
        let last = self.last_success();
        detail += &if last > 0.0 {
            format!("; last sent {:.1} s ago", (unix_now() - last).max(0.0))
        } else {
            "; nothing sent yet".into()
        };
        if q.dropped_full_total > 0 {
            detail += &format!("; {} samples dropped (queue full)", q.dropped_full_total);
        }
        if let Some(e) = &error {
            detail += &format!("; {e}");
        }
        Component {
            name: format!("remote_write/{}", self.name),
            state: if error.is_some() {
                State::Degraded
            } else {
                State::Up
            },
            hook: None,
            detail: Some(detail),
        }
    }
}

/// A metric of every endpoint: name, help, and how to read its value.
type PerEndpoint<T> = (
    &'static str,
    &'static str,
    fn(&QueueStats, &EndpointStatus) -> T,
);

#[derive(Debug)]
pub struct ExportCollector(pub Vec<Arc<EndpointStatus>>);

impl Collector for ExportCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let rows: Vec<(&str, QueueStats, &EndpointStatus)> = self
            .0
            .iter()
            .map(|s| (s.name.as_str(), s.queue(), &**s))
            .collect();
        let gauges: [PerEndpoint<f64>; 3] = [
            (
                "remote_write_queue_bytes",
                "Bytes of samples in the remote-write queue on disk",
                |q, _| q.bytes as f64,
            ),
            (
                "remote_write_queue_samples",
                "Samples in the remote-write queue, not yet acknowledged by the endpoint",
                |q, _| q.samples as f64,
            ),
            (
                "remote_write_last_success_timestamp_seconds",
                "When the endpoint last acknowledged a request (0: never since start)",
                |_, s| s.last_success(),
            ),
        ];
        for (name, help, value) in gauges {
            let mut f = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (endpoint, q, s) in &rows {
                ConstGauge::new(value(q, s))
                    .encode(f.encode_family(&[("endpoint", *endpoint)])?)?;
            }
        }
        let counters: [PerEndpoint<u64>; 3] = [
            (
                "remote_write_samples_queued",
                "Samples collected and appended to the remote-write queue",
                |q, _| q.queued_total,
            ),
            (
                "remote_write_samples_sent",
                "Samples the endpoint acknowledged",
                |q, _| q.sent_total,
            ),
            (
                "remote_write_samples_retried",
                "Samples in requests that failed and are sent again",
                |_, s| s.retried.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, value) in counters {
            let mut f = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (endpoint, q, s) in &rows {
                ConstCounter::new(value(q, s))
                    .encode(f.encode_family(&[("endpoint", *endpoint)])?)?;
            }
        }
        let mut f = encoder.encode_descriptor(
            "remote_write_samples_dropped",
            "Samples dropped, by reason: queue_full (the oldest go), rejected (by the endpoint, 4xx), write_error (the queue could not be written)",
            None,
            MetricType::Counter,
        )?;
        for (endpoint, q, _) in &rows {
            for (reason, n) in [
                ("queue_full", q.dropped_full_total),
                ("rejected", q.dropped_rejected_total),
                ("write_error", q.dropped_write_error_total),
            ] {
                ConstCounter::new(n)
                    .encode(f.encode_family(&[("endpoint", *endpoint), ("reason", reason)])?)?;
            }
        }
        let mut f = encoder.encode_descriptor(
            "remote_write_queue_cut_bytes",
            "Bytes of the queue's files cut off, by reason: torn (a record a crash left short), corrupt (failed its CRC)",
            None,
            MetricType::Counter,
        )?;
        for (endpoint, q, _) in &rows {
            for (reason, n) in [
                ("torn", q.cut_torn_bytes_total),
                ("corrupt", q.cut_corrupt_bytes_total),
            ] {
                ConstCounter::new(n)
                    .encode(f.encode_family(&[("endpoint", *endpoint), ("reason", reason)])?)?;
            }
        }
        Ok(())
    }
}
