//! Fleet registration: the agent keeps a record of itself in etcd under a lease, and (with
//! `watch_rules`) takes rule sets pushed to its vehicle's `rules` key.
//!
//! The registry never holds the data plane up: it runs in its own task, the agent starts and
//! forwards whether etcd answers or not, and lost connections are retried with backoff. What
//! it needs from the data plane comes through a watch channel of attached programs; pushed rule
//! sets go to the agent's reload path, which reports the outcome back.

pub(crate) mod backoff;
pub mod client;
mod limit;
pub mod record;
pub mod tls;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    sync::atomic::{AtomicI64, AtomicU64},
    time::{Duration, SystemTime},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::Counter, gauge::Gauge},
};
use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
    time::MissedTickBehavior,
};
use tracing::{info, warn};

use self::{
    backoff::Backoff,
    client::{Etcd, KeepAlive, pb::event::EventType},
    limit::{PushLimit, Refusal},
    record::{Identity, RulesRejection, RulesState},
    tls::Tls,
};
use crate::{
    config::Config,
    runtime::status::{AttachedProgram, Component, State},
};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot read {key} {path}: {source}")]
    File {
        key: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not a usable certificate or key: {reason}; give a PEM X.509 certificate (a PEM private key for a key)"
    )]
    Certificate { path: PathBuf, reason: String },
    #[error(
        "the client certificate {cert} has {found}, but agent.spiffe_id is {configured}: use a \
         certificate issued for {configured}, or set agent.spiffe_id (--spiffe-id) to the \
         certificate's ID"
    )]
    SpiffeMismatch {
        cert: PathBuf,
        found: String,
        configured: String,
    },
    #[error("a client certificate needs TLS: give the CA that signed etcd's certificate too")]
    NoCa,
    #[error(
        "no etcd endpoint answered ({0}); check registry.endpoints, TLS settings and that etcd runs"
    )]
    Unreachable(String),
    #[error("etcd {call} failed: {} ({:?})", .status.message(), .status.code())]
    Rpc {
        call: &'static str,
        status: Box<tonic::Status>,
    },
    #[error("etcd refused {call}: {message}")]
    Refused { call: &'static str, message: String },
    #[error("etcd did not answer {0} within {secs}s", secs = client::CALL_TIMEOUT.as_secs())]
    Timeout(&'static str),
    #[error("etcd closed the {0} stream")]
    Closed(&'static str),
    #[error("lease {0:x} expired: registering again under a new lease")]
    LeaseExpired(i64),
    #[error("etcd canceled the watch on the rules key: {0}")]
    WatchCanceled(String),
}

/// Everything registration needs, resolved from the config at start (TLS files read, the
/// certificate's SPIFFE ID checked), so a wrong setting stops the agent before it attaches.
pub struct Settings {
    endpoints: Vec<String>,
    tls: Option<Tls>,
    lease_ttl: i64,
    key: String,
    rules_key: Option<String>,
    limit: PushLimit,
    identity: Identity,
}

impl Settings {
    /// `None` when the config has no `[registry]`.
    pub fn from_config(config: &Config) -> Result<Option<Self>, RegistryError> {
        let Some(r) = &config.registry else {
            return Ok(None);
        };
        let a = &config.agent;
        // Validation guarantees both with [registry].
        let (Some(service_name), Some(vin)) = (&a.service_name, &a.vin) else {
            unreachable!("validated: [registry] requires agent.service_name and agent.vin")
        };
        let tls = tls::client_config(r, a.spiffe_id.as_deref())?;
        if r.watch_rules && tls.is_none() {
            // Validation refuses this without allow_insecure_rules.
            warn!(
                "registry: taking pushed rule sets over plain http:// (allow_insecure_rules): \
                 anyone on the path to etcd can change what this agent forwards"
            );
        }
        Ok(Some(Self {
            endpoints: r.endpoints.clone(),
            tls,
            lease_ttl: r.lease_ttl as i64,
            key: r.agent_key(vin, service_name),
            rules_key: r.watch_rules.then(|| r.rules_key(vin)),
            limit: PushLimit::new(r.rules_max_bytes, r.rules_per_minute, r.rules_burst),
            identity: Identity {
                service_name: service_name.clone(),
                vin: vin.clone(),
                spiffe_id: a.spiffe_id.clone().unwrap_or_default(),
                kernel_release: record::kernel_release(),
                start_time_unix_ms: record::unix_ms(SystemTime::now()),
                http_endpoints: vec![http_url(config.http.listen)],
            },
        }))
    }
}

fn http_url(listen: SocketAddr) -> String {
    format!("http://{listen}")
}

/// A rule set pushed to this vehicle, to be applied like a SIGHUP reload.
#[derive(Debug)]
pub struct Push {
    value: Vec<u8>,
    /// etcd's revision of this value.
    pub revision: i64,
    /// `<key>@<revision>`: names the push in errors.
    pub origin: PathBuf,
}

impl Push {
    /// The value etcd holds at `key` at `revision`.
    pub(crate) fn new(key: &[u8], revision: i64, value: Vec<u8>) -> Self {
        let key = String::from_utf8_lossy(key);
        Self {
            origin: PathBuf::from(format!("{key}@{revision}")),
            revision,
            value,
        }
    }

    /// The config text.
    pub fn text(&self) -> anyhow::Result<&str> {
        std::str::from_utf8(&self.value).map_err(|e| {
            anyhow::anyhow!(
                "{}: not UTF-8 text ({e}): push a complete TOML config",
                self.origin.display()
            )
        })
    }
}

/// The registry's state for /readyz.
#[derive(Debug, Clone)]
pub enum Health {
    Up,
    Degraded(String),
}

impl Health {
    pub fn component(&self) -> Component {
        let (state, detail) = match self {
            Self::Up => (State::Up, None),
            Self::Degraded(e) => (State::Degraded, Some(e.clone())),
        };
        Component {
            name: "registry".into(),
            state,
            hook: None,
            detail,
        }
    }
}

/// `edgeplane_registry_up`, `edgeplane_registry_reconnects_total` and
/// `edgeplane_registry_pushes_refused_total{reason}`.
#[derive(Debug, Default, Clone)]
struct RegistryMetrics {
    up: Gauge<i64, AtomicI64>,
    reconnects: Counter<u64, AtomicU64>,
    too_large: Counter<u64, AtomicU64>,
    too_frequent: Counter<u64, AtomicU64>,
}

impl Collector for RegistryMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        self.up.encode(encoder.encode_descriptor(
            "registry_up",
            "1 while the agent is registered in etcd with a live lease",
            None,
            MetricType::Gauge,
        )?)?;
        self.reconnects.encode(encoder.encode_descriptor(
            "registry_reconnects",
            "Attempts to reach etcd again after a failure",
            None,
            MetricType::Counter,
        )?)?;
        let mut refused = encoder.encode_descriptor(
            "registry_pushes_refused",
            "Pushed rule sets refused before they were applied, by reason",
            None,
            MetricType::Counter,
        )?;
        for (reason, counter) in [
            ("too_large", &self.too_large),
            ("too_frequent", &self.too_frequent),
        ] {
            counter.encode(refused.encode_family(&[("reason", reason)])?)?;
        }
        Ok(())
    }
}

/// The running registration task.
pub struct Registry {
    pushes: mpsc::Receiver<Push>,
    rules: Arc<watch::Sender<RulesState>>,
    health: watch::Receiver<Health>,
    metrics: RegistryMetrics,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Registry {
    /// Starts registering; `programs` carries what the data plane runs after every apply.
    pub fn spawn(settings: Settings, programs: watch::Receiver<Vec<AttachedProgram>>) -> Self {
        let (push_tx, pushes) = mpsc::channel(4);
        let (rules, rules_rx) = watch::channel(RulesState::default());
        let rules = Arc::new(rules);
        let (health_tx, health) = watch::channel(Health::Degraded("connecting to etcd".into()));
        let metrics = RegistryMetrics::default();
        let (stop, stopped) = oneshot::channel();
        let session = Session {
            settings,
            programs,
            rules: rules_rx,
            outcomes: rules.clone(),
            pushes: push_tx,
            health: health_tx,
            metrics: metrics.clone(),
            etcd: None,
            lease: None,
            last_push_revision: 0,
        };
        let task = tokio::spawn(session.run(stopped));
        Self {
            pushes,
            rules,
            health,
            metrics,
            stop,
            task,
        }
    }

    pub async fn next_push(&mut self) -> Option<Push> {
        self.pushes.recv().await
    }

    /// Records the outcome of applying `push`; the record shows it.
    pub fn report(&self, push: &Push, result: Result<(), String>) {
        report(&self.rules, push.revision, result);
    }

    pub fn health(&self) -> watch::Receiver<Health> {
        self.health.clone()
    }

    pub fn collector(&self) -> Box<dyn Collector> {
        Box::new(self.metrics.clone())
    }

    /// Stops registering and revokes the lease, so the record goes at once rather than a
    /// lease TTL later (bounded: an unreachable etcd does not hold the exit up).
    pub async fn shutdown(self) {
        let _ = self.stop.send(());
        if tokio::time::timeout(client::CALL_TIMEOUT, self.task)
            .await
            .is_err()
        {
            warn!(
                "registry: etcd did not confirm the lease revocation; the record expires with its lease"
            );
        }
    }
}

/// Records the outcome of the push of `revision` in the state the record shows.
fn report(rules: &watch::Sender<RulesState>, revision: i64, result: Result<(), String>) {
    rules.send_modify(|s| match result {
        Ok(()) => {
            s.applied_revision = revision;
            s.rejection = None;
        }
        Err(error) => {
            s.rejection = Some(RulesRejection {
                revision,
                error,
                time_unix_ms: record::unix_ms(SystemTime::now()),
            });
        }
    });
}

struct Session {
    settings: Settings,
    programs: watch::Receiver<Vec<AttachedProgram>>,
    rules: watch::Receiver<RulesState>,
    /// For refusing a push without the agent's loop (its result goes in the record).
    outcomes: Arc<watch::Sender<RulesState>>,
    pushes: mpsc::Sender<Push>,
    health: watch::Sender<Health>,
    metrics: RegistryMetrics,
    /// The last connection, for revoking the lease at shutdown.
    etcd: Option<Etcd>,
    /// The lease of the last session, reused while etcd still has it.
    lease: Option<i64>,
    /// The revision of the last rule set handed to the agent, so a reconnect does not push the
    /// same one again.
    last_push_revision: i64,
}

impl Session {
    async fn run(mut self, mut stopped: oneshot::Receiver<()>) {
        let mut backoff = Backoff::new();
        loop {
            let e = tokio::select! {
                e = self.session(&mut backoff) => e,
                _ = &mut stopped => break,
            };
            self.metrics.up.set(0);
            let delay = backoff.next_delay();
            warn!(
                "registry: {e}; data plane unaffected, retrying in {} ms",
                delay.as_millis()
            );
            self.health.send_replace(Health::Degraded(e.to_string()));
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = &mut stopped => break,
            }
            self.metrics.reconnects.inc();
        }
        if let (Some(etcd), Some(lease)) = (&self.etcd, self.lease)
            && self.metrics.up.get() == 1
        {
            match etcd.revoke(lease).await {
                Ok(()) => info!("registry: lease revoked, record removed"),
                Err(e) => warn!("registry: revoking the lease failed: {e}"),
            }
        }
    }

    /// Connects, registers, and keeps the registration until something fails.
    async fn session(&mut self, backoff: &mut Backoff) -> RegistryError {
        let (etcd, ka) = match self.register().await {
            Ok(r) => r,
            Err(e) => return e,
        };
        backoff.reset();
        self.etcd = Some(etcd.clone());
        self.serve(etcd, ka).await
    }

    async fn register(&mut self) -> Result<(Etcd, KeepAlive), RegistryError> {
        let s = &self.settings;
        let etcd = Etcd::connect(&s.endpoints, s.tls.as_ref()).await?;
        let lease_ttl = s.lease_ttl;
        // A lease that survived the outage is kept; one that expired is replaced.
        let mut kept = None;
        if let Some(id) = self.lease {
            let (ka, ttl) = etcd.keep_alive(id).await?;
            if ttl > 0 {
                kept = Some((id, ka));
            }
        }
        let (lease, ka) = match kept {
            Some(k) => k,
            None => {
                let id = etcd.grant(lease_ttl).await?;
                let (ka, _) = etcd.keep_alive(id).await?;
                (id, ka)
            }
        };
        self.lease = Some(lease);
        self.put_record(&etcd).await?;
        info!(
            endpoint = %etcd.endpoint,
            key = %self.settings.key,
            lease = format_args!("{lease:x}"),
            "registry: registered"
        );
        self.metrics.up.set(1);
        self.health.send_replace(Health::Up);
        Ok((etcd, ka))
    }

    async fn put_record(&mut self, etcd: &Etcd) -> Result<(), RegistryError> {
        let value = record::encode(
            &self.settings.identity,
            &self.programs.borrow_and_update(),
            &self.rules.borrow_and_update(),
        );
        let lease = self.lease.expect("a lease is held while registered");
        etcd.put(&self.settings.key, value, lease).await
    }

    async fn serve(&mut self, etcd: Etcd, mut ka: KeepAlive) -> RegistryError {
        let lease = self.lease.expect("registered");
        // Renewing three times per TTL survives one lost renewal.
        let mut renew =
            tokio::time::interval(Duration::from_secs(self.settings.lease_ttl as u64) / 3);
        renew.set_missed_tick_behavior(MissedTickBehavior::Delay);
        renew.reset();
        let mut watch = match self.settings.rules_key.clone() {
            Some(key) => match self.start_watch(&etcd, &key).await {
                Ok(w) => Some(w),
                Err(e) => return e,
            },
            None => None,
        };
        loop {
            let result = tokio::select! {
                _ = renew.tick() => match ka.renew().await {
                    Ok(0) => {
                        self.lease = None;
                        Err(RegistryError::LeaseExpired(lease))
                    }
                    Ok(_) => Ok(()),
                    Err(e) => Err(e),
                },
                Ok(()) = self.programs.changed() => self.put_record(&etcd).await,
                Ok(()) = self.rules.changed() => self.put_record(&etcd).await,
                message = next_watch(&mut watch) => self.on_watch(message).await,
            };
            if let Err(e) = result {
                return e;
            }
        }
    }

    /// Reads the rules key (a rule set pushed while the agent was away is applied now) and
    /// watches it from the next revision on.
    async fn start_watch(
        &mut self,
        etcd: &Etcd,
        key: &str,
    ) -> Result<tonic::Streaming<client::pb::WatchResponse>, RegistryError> {
        let (kv, revision) = etcd.get(key).await?;
        if let Some(kv) = kv {
            self.push(kv).await;
        }
        etcd.watch(key, revision + 1).await
    }

    async fn on_watch(
        &mut self,
        message: Result<Option<client::pb::WatchResponse>, tonic::Status>,
    ) -> Result<(), RegistryError> {
        let response = match message {
            Ok(Some(r)) => r,
            Ok(None) => return Err(RegistryError::Closed("Watch")),
            Err(status) => {
                return Err(RegistryError::Rpc {
                    call: "Watch",
                    status: Box::new(status),
                });
            }
        };
        if response.canceled {
            return Err(RegistryError::WatchCanceled(response.cancel_reason));
        }
        for event in response.events {
            match (event.r#type(), event.kv) {
                (EventType::Put, Some(kv)) => self.push(kv).await,
                (EventType::Delete, _) => {
                    info!("registry: the pushed rule set was deleted; the running rules stay");
                }
                (EventType::Put, None) => {}
            }
        }
        Ok(())
    }

    async fn push(&mut self, kv: client::pb::KeyValue) {
        if kv.mod_revision <= self.last_push_revision {
            return;
        }
        self.last_push_revision = kv.mod_revision;
        let push = Push::new(&kv.key, kv.mod_revision, kv.value);
        if let Err(refusal) = self.settings.limit.admit(push.value.len()) {
            match refusal {
                Refusal::TooLarge { .. } => self.metrics.too_large.inc(),
                Refusal::TooFrequent { .. } => self.metrics.too_frequent.inc(),
            };
            warn!(
                origin = %push.origin.display(),
                "registry: pushed rule set refused, the running rules stay: {refusal}"
            );
            report(&self.outcomes, push.revision, Err(refusal.to_string()));
            return;
        }
        info!(origin = %push.origin.display(), "registry: rule set pushed");
        // The agent's loop takes pushes one at a time; it is gone only when shutting down.
        let _ = self.pushes.send(push).await;
    }
}

async fn next_watch(
    watch: &mut Option<tonic::Streaming<client::pb::WatchResponse>>,
) -> Result<Option<client::pb::WatchResponse>, tonic::Status> {
    match watch {
        Some(w) => w.message().await,
        None => std::future::pending().await,
    }
}
