//! Pushing telemetry: every `interval_ms` the agent's series (what `/metrics` serves) are
//! collected, appended to each endpoint's store-and-forward queue on disk, and sent from
//! there, oldest first, with the Prometheus remote-write 1.0 protocol.
//!
//! Nothing here runs on the data plane or the HTTP server's tasks: collection and disk I/O run
//! on blocking threads, each endpoint's sender on a task of its own, and `/metrics` and
//! `/readyz` read a snapshot of the queue's stats, never the queue.

pub mod collect;
pub mod proto;
pub mod queue;
mod sender;
mod stats;

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use prometheus_client::registry::Registry;
use tokio::{sync::Notify, task::JoinHandle, time::MissedTickBehavior};
use tracing::{info, warn};

use self::{
    queue::Queue,
    sender::{SendError, Sender},
    stats::{EndpointStatus, ExportCollector},
};
use crate::{
    config::{Config, RemoteWriteConfig},
    metrics::unix_now,
    registry::{RegistryError, backoff::Backoff},
    runtime::status::Component,
};

/// Samples in one request at most; a backlog goes in requests of this size.
const MAX_SAMPLES_PER_SEND: u64 = 5_000;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(
        "cannot open the remote-write queue {dir}: {source}; check export.remote_write.dir is writable"
    )]
    Queue {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("`{0}` is not a usable remote-write URL")]
    Url(String),
    #[error("cannot read {key} {path}: {source}")]
    Secret {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the bearer token or basic auth credentials hold characters an HTTP header cannot")]
    BadSecret,
    #[error(transparent)]
    Tls(#[from] RegistryError),
}

/// One endpoint: its queue, how to reach it, and what `/readyz` and the metrics show.
struct Endpoint {
    name: String,
    queue: Arc<Mutex<Queue>>,
    sender: Option<Sender>,
    status: Arc<EndpointStatus>,
}

/// The exporter, opened at start (queues scanned, certificates and secrets read) and started
/// once the registry it collects from exists.
pub struct RemoteWrite {
    config: RemoteWriteConfig,
    labels: Vec<(String, String)>,
    endpoints: Vec<Endpoint>,
    tasks: Vec<JoinHandle<()>>,
}

impl RemoteWrite {
    /// `None` without `[export.remote_write]`.
    pub fn open(config: &Config) -> Result<Option<Self>, ExportError> {
        let Some(rw) = &config.export.remote_write else {
            return Ok(None);
        };
        let mut endpoints = Vec::new();
        for e in &rw.endpoints {
            let dir = rw.dir.join(&e.name);
            let queue = Queue::open(&dir, rw.max_bytes).map_err(|source| ExportError::Queue {
                dir: dir.clone(),
                source,
            })?;
            let status = Arc::new(EndpointStatus::new(&e.name, queue.stats()));
            let s = queue.stats().lock().expect("stats").clone();
            info!(
                endpoint = e.name,
                queued_samples = s.samples,
                queued_bytes = s.bytes,
                "remote-write queue opened"
            );
            endpoints.push(Endpoint {
                name: e.name.clone(),
                queue: Arc::new(Mutex::new(queue)),
                sender: Some(Sender::new(e)?),
                status,
            });
        }
        Ok(Some(Self {
            labels: rw.extra_labels(&config.agent),
            config: rw.clone(),
            endpoints,
            tasks: Vec::new(),
        }))
    }

    /// The exporter's own metrics, for the agent's registry.
    pub fn collector(&self) -> Box<dyn prometheus_client::collector::Collector> {
        Box::new(ExportCollector(self.statuses()))
    }

    /// What `/readyz` shows of each endpoint.
    pub fn health(&self) -> Health {
        Health(self.statuses())
    }

    fn statuses(&self) -> Vec<Arc<EndpointStatus>> {
        self.endpoints.iter().map(|e| e.status.clone()).collect()
    }

    /// Starts collecting from `registry` and sending.
    pub fn start(&mut self, registry: Arc<Registry>) {
        let appended = Arc::new(Notify::new());
        let queues: Vec<_> = self.endpoints.iter().map(|e| e.queue.clone()).collect();
        self.tasks.push(tokio::spawn(collect_loop(
            registry,
            self.labels.clone(),
            Duration::from_millis(self.config.interval_ms),
            queues,
            appended.clone(),
        )));
        for e in &mut self.endpoints {
            let sender = e.sender.take().expect("started once");
            self.tasks.push(tokio::spawn(send_loop(
                e.name.clone(),
                e.queue.clone(),
                sender,
                e.status.clone(),
                self.config.max_backfill_rate,
                appended.clone(),
            )));
        }
    }

    /// Stops collecting and sending; what is queued stays on disk for the next start.
    pub async fn shutdown(self) {
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks {
            let _ = t.await;
        }
        for e in &self.endpoints {
            let q = e.queue.lock().expect("queue lock");
            let s = q.stats();
            let s = s.lock().expect("stats").clone();
            info!(
                endpoint = e.name,
                queued = s.queued_total,
                sent = s.sent_total,
                dropped_queue_full = s.dropped_full_total,
                rejected = s.dropped_rejected_total,
                write_errors = s.dropped_write_error_total,
                remaining = s.samples,
                "remote write stopped; the remaining samples stay queued for the next start"
            );
        }
    }
}

/// The endpoints' states for `/readyz`: degraded while an endpoint is unreachable (samples
/// wait on disk), never failed: the data plane does not depend on it.
#[derive(Clone)]
pub struct Health(Vec<Arc<EndpointStatus>>);

impl Health {
    pub fn components(&self) -> Vec<Component> {
        self.0.iter().map(|s| s.component()).collect()
    }
}

/// Collects every `interval` and appends the collection to every queue.
async fn collect_loop(
    registry: Arc<Registry>,
    labels: Vec<(String, String)>,
    interval: Duration,
    queues: Vec<Arc<Mutex<Queue>>>,
    appended: Arc<Notify>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let (registry, labels, queues) = (registry.clone(), labels.clone(), queues.clone());
        // Rendering reads maps and appending syncs to disk: both off the async workers.
        let done = tokio::task::spawn_blocking(move || {
            let timestamp_ms = (unix_now() * 1000.0) as i64;
            let wr = collect::collect(&registry, &labels, timestamp_ms);
            let samples = wr.timeseries.len() as u32;
            let payload = queue::format::compress(&prost::Message::encode_to_vec(&wr));
            for q in &queues {
                if let Err(e) =
                    q.lock()
                        .expect("queue lock")
                        .append(samples, timestamp_ms, &payload)
                {
                    warn!(
                        "remote write: cannot queue a collection ({samples} samples dropped): {e}"
                    );
                }
            }
        })
        .await;
        if let Err(e) = done {
            warn!("remote write: collection failed: {e}");
        }
        appended.notify_waiters();
    }
}

/// Sends one endpoint's queue, oldest first: a request is removed from the queue once the
/// endpoint acknowledged it, retried with backoff while the endpoint is away, and dropped
/// (counted) when the endpoint rejects it. A backlog goes at `max_backfill_rate`.
async fn send_loop(
    name: String,
    queue: Arc<Mutex<Queue>>,
    mut sender: Sender,
    status: Arc<EndpointStatus>,
    max_backfill_rate: u64,
    appended: Arc<Notify>,
) {
    let mut backoff = Backoff::new();
    loop {
        let wait = appended.notified();
        let q = queue.clone();
        let batch = tokio::task::spawn_blocking(move || {
            let batch = q.lock().expect("queue lock").peek(MAX_SAMPLES_PER_SEND)?;
            batch
                .map(|b| {
                    let mut body = Vec::new();
                    for p in &b.payloads {
                        match queue::format::decompress(p) {
                            Ok(wr) => body.extend(wr),
                            // Written by us and CRC-checked: a bug, the record is not sent.
                            Err(e) => warn!("remote write: a queued record does not decode: {e}"),
                        }
                    }
                    Ok::<_, std::io::Error>((b.last, b.samples, queue::format::compress(&body)))
                })
                .transpose()
        })
        .await;
        let (last, samples, body) = match batch {
            Ok(Ok(Some(b))) => b,
            Ok(Ok(None)) => {
                wait.await;
                continue;
            }
            Ok(Err(e)) => {
                warn!(endpoint = name, "remote write: reading the queue: {e}");
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
            Err(e) => {
                warn!(endpoint = name, "remote write: reading the queue: {e}");
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        let outcome = sender.send(body).await;
        let delivered = match &outcome {
            Ok(()) => true,
            Err(SendError::Rejected(_)) => false,
            Err(SendError::Retry(e)) => {
                if status.set_error(e.clone()) {
                    warn!(
                        endpoint = name,
                        "remote write: {e}; samples wait in the queue"
                    );
                }
                status.retried(samples);
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        if let Err(SendError::Rejected(e)) = &outcome {
            warn!(
                endpoint = name,
                samples, "remote write: {e}; these samples are dropped"
            );
        }
        backoff.reset();
        let q = queue.clone();
        let acked =
            tokio::task::spawn_blocking(move || q.lock().expect("queue lock").ack(last, delivered))
                .await;
        if let Ok(Err(e)) = acked {
            warn!(
                endpoint = name,
                "remote write: recording the acknowledgement: {e}"
            );
        }
        if status.set_sent(unix_now()) {
            info!(
                endpoint = name,
                "remote write: the endpoint takes samples again"
            );
        }
        // More waiting: a backlog, sent no faster than the backfill rate.
        if status.queued_samples() > 0 {
            tokio::time::sleep(Duration::from_secs_f64(
                samples as f64 / max_backfill_rate as f64,
            ))
            .await;
        }
    }
}
