//! Starts, keeps and stops the userspace UDP listeners as the rules change.
//!
//! A listener whose rules did not change keeps running (and its socket), so a reload loses
//! nothing on it; a changed one is bound anew before the old one closes (SO_REUSEADDR).
//! Counters belong to the rule's name and survive reloads, as on the kernel path.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, UdpSocket},
    sync::{Arc, atomic::AtomicU64},
};

use tracing::info;

use super::{
    SharedUserspaceView, UdpCounters, UdpRuleView, UserspaceError, socket,
    udp_rules::{self, ListenerSpec, RuleTable},
    udp_tokio, udp_uring,
};
use crate::config::{UdpForwardRule, UserspaceEngine};

/// What an engine runs for one listener.
pub(super) struct Listener {
    pub socket: UdpSocket,
    pub table: RuleTable,
    pub routes: Vec<LiveRoute>,
    /// One socket per distinct egress binding of the routes.
    pub egress: Vec<UdpSocket>,
    pub unmatched: Arc<AtomicU64>,
}

/// A rule as a listener runs it.
pub(super) struct LiveRoute {
    pub counters: Arc<UdpCounters>,
    /// Index into [`Listener::egress`].
    pub egress: usize,
    pub dst: SocketAddr,
    pub dst_raw: socket2::SockAddr,
    pub header_bytes: u64,
}

enum Worker {
    Tokio(tokio::task::JoinHandle<()>),
    Uring(
        #[expect(dead_code, reason = "held for its Drop, which stops the thread")]
        udp_uring::UringWorker,
    ),
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Self::Tokio(task) = self {
            task.abort();
        }
    }
}

struct Running {
    spec: ListenerSpec,
    engine: UserspaceEngine,
    unmatched: Arc<AtomicU64>,
    _worker: Worker,
}

pub struct UdpUserspace {
    counters: BTreeMap<String, Arc<UdpCounters>>,
    running: BTreeMap<(String, SocketAddr), Running>,
    view: SharedUserspaceView,
}

impl UdpUserspace {
    pub fn new(view: SharedUserspaceView) -> Self {
        Self {
            counters: BTreeMap::new(),
            running: BTreeMap::new(),
            view,
        }
    }

    /// Makes `rules` (validated for userspace) the running ones. On error nothing changed.
    /// Must run inside the agent's tokio runtime (the tokio engine spawns tasks on it).
    pub fn apply(
        &mut self,
        engine: UserspaceEngine,
        rules: &[UdpForwardRule],
    ) -> Result<(), UserspaceError> {
        let wanted = udp_rules::listeners(rules);
        let mut fresh = BTreeMap::new();
        for (key, spec) in &wanted {
            if self
                .running
                .get(key)
                .is_some_and(|r| r.spec == *spec && r.engine == engine)
            {
                continue;
            }
            let listener = self.bind(spec)?;
            let unmatched = Arc::clone(&listener.unmatched);
            let worker = match engine {
                UserspaceEngine::Tokio => {
                    Worker::Tokio(udp_tokio::spawn(listener).map_err(UserspaceError::Reactor)?)
                }
                UserspaceEngine::TokioUring => {
                    Worker::Uring(udp_uring::spawn(listener).map_err(UserspaceError::Uring)?)
                }
            };
            info!(
                iface = spec.ingress,
                listen = %spec.bind,
                engine = engine.label(),
                rules = spec.routes.len(),
                "userspace UDP listener started"
            );
            fresh.insert(
                key.clone(),
                Running {
                    spec: spec.clone(),
                    engine,
                    unmatched,
                    _worker: worker,
                },
            );
        }
        self.running.retain(|k, _| wanted.contains_key(k));
        self.running.extend(fresh);
        self.counters
            .retain(|name, _| rules.iter().any(|r| r.name == *name));
        self.publish();
        Ok(())
    }

    /// Stops every listener.
    pub fn shutdown(&mut self) {
        self.running.clear();
        self.publish();
    }

    /// Binds the listener's socket and its egress sockets.
    fn bind(&mut self, spec: &ListenerSpec) -> Result<Listener, UserspaceError> {
        let socket =
            socket::udp(spec.bind, &spec.ingress, true).map_err(|source| UserspaceError::Bind {
                rule: spec.routes[0].rule.clone(),
                iface: spec.ingress.clone(),
                addr: spec.bind,
                source,
            })?;
        let mut egress_binds: Vec<(&str, SocketAddr)> = Vec::new();
        let mut egress = Vec::new();
        let mut routes = Vec::new();
        for r in &spec.routes {
            let at = (r.egress.as_str(), r.egress_bind);
            let index = match egress_binds.iter().position(|e| *e == at) {
                Some(i) => i,
                None => {
                    egress.push(socket::udp(r.egress_bind, &r.egress, false).map_err(
                        |source| UserspaceError::Bind {
                            rule: r.rule.clone(),
                            iface: r.egress.clone(),
                            addr: r.egress_bind,
                            source,
                        },
                    )?);
                    egress_binds.push(at);
                    egress_binds.len() - 1
                }
            };
            routes.push(LiveRoute {
                counters: Arc::clone(self.counters.entry(r.rule.clone()).or_default()),
                egress: index,
                dst: r.dst,
                dst_raw: r.dst.into(),
                header_bytes: r.header_bytes(),
            });
        }
        Ok(Listener {
            socket,
            table: RuleTable::new(&spec.routes),
            routes,
            egress,
            unmatched: Arc::default(),
        })
    }

    fn publish(&self) {
        let mut view = self.view.write().expect("view lock");
        view.udp = self
            .running
            .values()
            .flat_map(|run| {
                run.spec.routes.iter().map(|r| UdpRuleView {
                    rule: r.rule.clone(),
                    ingress: run.spec.ingress.clone(),
                    engine: run.engine.label(),
                    counters: Arc::clone(&self.counters[&r.rule]),
                })
            })
            .collect();
        view.udp_unmatched = self
            .running
            .values()
            .map(|run| {
                (
                    run.spec.ingress.clone(),
                    run.spec.bind,
                    Arc::clone(&run.unmatched),
                )
            })
            .collect();
    }
}
