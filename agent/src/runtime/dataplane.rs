//! Everything the agent runs in the kernel and beside it, applied from one prepared config.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::Path,
    sync::{Arc, RwLock},
};

use anyhow::Context as _;
use aya::Ebpf;
use edgeplane_common::{
    XDP_PASS_PROGRAM, can,
    udp_forward::{TC_PROGRAM, XDP_PROGRAM},
};
use prometheus_client::collector::Collector;
use tokio::{io::unix::AsyncFd, sync::broadcast};
use tracing::{info, warn};

use crate::{
    can::{
        CanRouter, CanView,
        router::WantedWatch,
        rules::{self as can_rules, CompiledRoute},
        stats::CanCollector,
        tunnel::Tunnels,
    },
    config::{Config, Overrides, UdpForwardRule},
    host::netdev,
    host::resolve::{self, Peers, RESOLVE_TIMEOUT, ResolveError},
    host::{Host, ThisHost},
    kernel::attach::{self, Hook},
    kernel::loader,
    kernel::pins::{DirLock, PinDir},
    kernel::state::{AgentRecord, AgentState, StateStore},
    latency::{self, Latency},
    runtime::status::{AttachedProgram, Readiness},
    udp_forward::{
        UdpForwarder, UdpView,
        rules::{self as udp_rules, CompiledRule},
        stats::UdpCollector,
    },
    userspace::SharedUserspaceView,
};

/// A validated, host-checked config with its rules compiled: applying it can only fail in the
/// kernel (an attach refused) or on a socket.
#[derive(Clone, PartialEq)]
pub struct Prepared {
    pub config: Config,
    udp: Vec<CompiledRule>,
    can_routes: Vec<CompiledRoute>,
    can_watches: Vec<(
        String,
        u32,
        edgeplane_common::can::CanWatchKey,
        edgeplane_common::can::CanWatch,
    )>,
    /// Rules left out because an interface they need is missing.
    pub waiting: Vec<Waiting>,
    /// Tunnel peers resolved (by their `host:port`), and why the others are not.
    peers: Peers,
    peer_errors: BTreeMap<String, ResolveError>,
    /// Tunnel routes left out because their peer did not resolve: retried.
    pub unresolved: Vec<Unresolved>,
}

/// A tunnel route waiting for its peer's name to resolve.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Unresolved {
    pub route: String,
    /// The configured `host:port`.
    pub peer: String,
    pub error: String,
}

/// A rule waiting for its interface to (re)appear.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Waiting {
    /// `udp_forward`, `can_route`, `can_watch` or `can_receive`.
    pub kind: &'static str,
    pub name: String,
    pub iface: String,
}

/// Reads, validates and host-checks a config with the command line's `overrides` applied,
/// resolves its tunnel peers and compiles its rules: every interface must exist. A peer that
/// does not resolve now keeps the address in `known` (the running config's), or leaves its
/// route waiting (see [`Prepared::unresolved`]).
pub async fn prepare(
    path: &Path,
    overrides: &Overrides,
    known: &Peers,
) -> anyhow::Result<Prepared> {
    let text =
        std::fs::read_to_string(path).map_err(|source| crate::config::ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
    prepare_text(&text, path, overrides, known).await
}

/// [`prepare`] for config text from elsewhere (a rule set pushed through the registry);
/// `origin` names it in errors.
pub async fn prepare_text(
    text: &str,
    origin: &Path,
    overrides: &Overrides,
    known: &Peers,
) -> anyhow::Result<Prepared> {
    let config = Config::parse_with(text, origin, overrides)?;
    config.check_host(origin)?;
    let resolved = resolve::resolve_all(tunnel_peers(&config), RESOLVE_TIMEOUT).await;
    let (peers, peer_errors) = merge_peers(resolved, known);
    compile(config, true, &ThisHost, peers, peer_errors)
}

/// [`prepare_text`] with what `host` tells about interfaces, addresses and files, and no
/// name service: tunnel peers must be address literals (tests and fuzz targets).
pub fn prepare_text_on(text: &str, origin: &Path, host: &dyn Host) -> anyhow::Result<Prepared> {
    let config = Config::parse(text, origin)?;
    config.check_host_on(origin, host)?;
    let resolved = (tunnel_peers(&config).into_iter())
        .map(|p| (p.to_owned(), resolve::literal(p)))
        .collect();
    let (peers, peer_errors) = merge_peers(resolved, &Peers::new());
    compile(config, true, host, peers, peer_errors)
}

/// The configured `host:port` of every tunnel route.
pub fn tunnel_peers(config: &Config) -> BTreeSet<&str> {
    (config.can.route.iter())
        .filter_map(|r| r.to.as_ref()?.udp.as_deref())
        .collect()
}

/// Fresh resolutions, falling back to a `known` address where one failed: a peer that
/// resolved once keeps its route running through a resolver outage.
fn merge_peers(
    resolved: BTreeMap<String, Result<SocketAddr, ResolveError>>,
    known: &Peers,
) -> (Peers, BTreeMap<String, ResolveError>) {
    let mut peers = Peers::new();
    let mut errors = BTreeMap::new();
    for (peer, r) in resolved {
        match (r, known.get(&peer)) {
            (Ok(a), _) => {
                peers.insert(peer, a);
            }
            (Err(e), Some(&a)) => {
                warn!("{e}; the tunnel keeps sending to {a}, its last address");
                peers.insert(peer, a);
            }
            (Err(e), None) => {
                errors.insert(peer, e);
            }
        }
    }
    (peers, errors)
}

/// Compiles an accepted config again for the interfaces there are now: rules whose interface
/// is missing wait for it (see [`Prepared::waiting`]) while the others run. Tunnel peers are
/// not resolved again.
pub fn prepare_for_present(current: &Prepared) -> anyhow::Result<Prepared> {
    prepare_for_present_on(current, &ThisHost)
}

/// [`prepare_for_present`] for the interfaces `host` has.
pub fn prepare_for_present_on(current: &Prepared, host: &dyn Host) -> anyhow::Result<Prepared> {
    compile(
        current.config.clone(),
        false,
        host,
        current.peers.clone(),
        current.peer_errors.clone(),
    )
}

impl Prepared {
    /// The tunnel peers resolved so far.
    pub fn peers(&self) -> &Peers {
        &self.peers
    }

    /// The tunnel peers still waiting to resolve.
    pub fn unresolved_peers(&self) -> BTreeSet<&str> {
        self.unresolved.iter().map(|u| u.peer.as_str()).collect()
    }

    /// This config with fresh resolutions of (some of) its peers: [`prepare_for_present`]
    /// with the new addresses and errors.
    pub fn with_resolved(
        &self,
        resolved: BTreeMap<String, Result<SocketAddr, ResolveError>>,
    ) -> anyhow::Result<Self> {
        let mut peers = self.peers.clone();
        let mut errors = self.peer_errors.clone();
        let (fresh, failed) = merge_peers(resolved, &self.peers);
        for (peer, a) in fresh {
            errors.remove(&peer);
            peers.insert(peer, a);
        }
        errors.extend(failed);
        compile(self.config.clone(), false, &ThisHost, peers, errors)
    }
}

fn compile(
    config: Config,
    strict: bool,
    host: &dyn Host,
    peers: Peers,
    peer_errors: BTreeMap<String, ResolveError>,
) -> anyhow::Result<Prepared> {
    let mut waiting = Vec::new();
    let mut wait = |kind, name: &str, iface: &str| {
        waiting.push(Waiting {
            kind,
            name: name.to_owned(),
            iface: iface.to_owned(),
        })
    };
    let mut udp = Vec::new();
    for r in &config.udp.forward {
        match udp_rules::compile(r, &|iface| host.ifindex(iface)) {
            Ok(c) => udp.push(c),
            Err(e) if !strict => wait("udp_forward", &r.name, &e.iface),
            Err(e) => return Err(e.into()),
        }
    }
    let mut can_routes = Vec::new();
    let mut unresolved = Vec::new();
    for r in &config.can.route {
        match can_rules::compile(r, host, &peers) {
            Ok(c) => can_routes.push(c),
            Err(can_rules::CompileError::UnknownInterface { iface, .. }) if !strict => {
                wait("can_route", &r.name, &iface)
            }
            Err(can_rules::CompileError::Peer { peer, .. }) => {
                let error = peer_errors.get(&peer).map_or_else(
                    || format!("`{peer}` is not resolved yet"),
                    |e| e.to_string(),
                );
                unresolved.push(Unresolved {
                    route: r.name.clone(),
                    peer,
                    error,
                });
            }
            Err(e) => return Err(e.into()),
        }
    }
    let mut can_watches = Vec::new();
    for w in &config.can.watch {
        let Some(ifindex) = host.ifindex(&w.iface) else {
            anyhow::ensure!(!strict, "interface {} vanished", w.iface);
            wait("can_watch", &format!("{:X}", w.id), &w.iface);
            continue;
        };
        let (key, value) = can_rules::watch(w, ifindex);
        can_watches.push((w.iface.clone(), ifindex, key, value));
    }
    for r in &config.can.receive {
        if host.ifindex(&r.iface).is_none() {
            anyhow::ensure!(!strict, "interface {} vanished", r.iface);
            wait("can_receive", &r.name, &r.iface);
        }
    }
    Ok(Prepared {
        config,
        udp,
        can_routes,
        can_watches,
        waiting,
        peers,
        peer_errors,
        unresolved,
    })
}

impl Prepared {
    /// The compiled CAN routes (the userspace engine runs the same can-gw jobs).
    pub fn can_routes(&self) -> &[CompiledRoute] {
        &self.can_routes
    }

    /// Interfaces forwarded frames leave by: where `latency_egress` ends their latency.
    pub fn egress_ifaces(&self) -> BTreeSet<String> {
        let udp = self.udp.iter().map(|r| r.egress.clone());
        let can = (self.can_routes.iter())
            .filter(|r| r.rule.egress != 0)
            .filter_map(|r| netdev::name(r.rule.egress));
        udp.chain(can).collect()
    }

    /// The configured UDP rules whose interfaces are present (the others wait for them).
    pub fn udp_rules(&self) -> Vec<UdpForwardRule> {
        let present = |r: &&UdpForwardRule| self.udp.iter().any(|c| c.name == r.name);
        self.config
            .udp
            .forward
            .iter()
            .filter(present)
            .cloned()
            .collect()
    }

    /// This config without its UDP rules (`udp`) or CAN routes (`can`), for the kernel path
    /// when the userspace engine runs them.
    pub fn without(&self, udp: bool, can: bool) -> Self {
        let mut p = self.clone();
        if udp {
            p.config.udp.forward.clear();
            p.udp.clear();
        }
        if can {
            p.config.can.route.clear();
            p.can_routes.clear();
        }
        p
    }
}

/// Views shared with the HTTP side.
#[derive(Clone, Default)]
pub struct Views {
    pub udp: Arc<RwLock<UdpView>>,
    pub can: Arc<RwLock<CanView>>,
    pub waiting: Arc<RwLock<Vec<Waiting>>>,
    /// Tunnel routes waiting for their peer's name to resolve.
    pub unresolved: Arc<RwLock<Vec<Unresolved>>>,
    /// Interfaces the running config names (kernel and userspace parts), for the host
    /// metrics; [`crate::runtime::planes::Planes::apply`] sets it.
    pub interfaces: Arc<RwLock<Vec<String>>>,
    /// Rules and routes the userspace engine runs.
    pub userspace: SharedUserspaceView,
}

impl Views {
    pub fn readiness(&self) -> Readiness {
        Readiness::of(
            &self.udp.read().expect("lock"),
            &self.can.read().expect("lock"),
            &self.waiting.read().expect("lock"),
        )
        .with_unresolved(&self.unresolved.read().expect("lock"))
        .with_userspace(&self.userspace.read().expect("lock"))
    }
}

/// The data plane, pinned under a bpffs directory so that it outlives the agent.
pub struct Dataplane {
    ebpf: Ebpf,
    udp: UdpForwarder,
    can: CanRouter,
    tunnels: Tunnels,
    latency: Latency,
    events: broadcast::Sender<Arc<latency::events::Event>>,
    event_counts: Arc<latency::events::EventCounts>,
    views: Views,
    pins: PinDir,
    state: StateStore,
    /// The record was unreadable and what it should say is being recovered: it is not
    /// overwritten until a config has been applied (so an agent that dies before that leaves
    /// the next one the same recovery, not a record that knows less than the kernel).
    recovering: bool,
    agent: AgentRecord,
    _lock: DirLock,
}

/// Programs loaded into every data plane, attached or not: a verifier rejection shows at start.
const PROGRAMS: [&str; 4] = [XDP_PROGRAM, TC_PROGRAM, can::PROGRAM, XDP_PASS_PROGRAM];

impl Dataplane {
    /// Loads every program with the maps pinned in `bpffs` and takes over what a previous agent
    /// left there: its maps (rules and counters), and its attachments, which keep forwarding
    /// until [`Self::apply`] swaps this agent's programs into them. `views` are shared with the
    /// userspace engine.
    pub fn load(bpffs: &Path, agent: AgentRecord, views: Views) -> anyhow::Result<Self> {
        let pins = PinDir::create(bpffs)?;
        let state = StateStore::open_or_create(&pins)?;
        let lock = pins.lock(|| state.load().ok()?.agent.map(|a| a.pid))?;
        // An unreadable record is not a reason to drop anything that runs: what it would have
        // said is recovered from the kernel (our attachments here; rule slots and can-gw jobs
        // from the pinned maps and can-gw when the config is applied).
        let (previous, recovering) = match state.load() {
            Ok(s) => (s, false),
            Err(e) => {
                let attachments = attach::find_ours(&pins);
                warn!(
                    attachments = attachments.len(),
                    "{e}; taking over what the kernel runs instead: our attachments, the rules \
                     in the pinned maps and our can-gw jobs (counters continue for the rules \
                     found there)"
                );
                let recovered = AgentState {
                    attachments,
                    ..AgentState::default()
                };
                (recovered, true)
            }
        };
        if let Some(p) = &previous.agent {
            info!(
                pid = p.pid,
                version = p.version,
                attachments = previous.attachments.len(),
                "taking over the data plane pinned in {}",
                pins.root().display()
            );
        }
        let mut ebpf = loader::load_pinned(&PROGRAMS, &pins)?;
        latency::load_programs(&mut ebpf, &pins);
        forward_kernel_logs(&mut ebpf);
        let udp_latency =
            latency::take_hist(&mut ebpf, edgeplane_common::latency::UDP_FORWARD_MAP)?;
        let can_latency =
            latency::take_hist(&mut ebpf, edgeplane_common::latency::CAN_FORWARD_MAP)?;
        let mut latency = Latency::new(
            &mut ebpf,
            &pins,
            Arc::clone(&udp_latency),
            Arc::clone(&can_latency),
        )
        .context("latency capture's maps")?;
        let event_counts = Arc::new(latency::events::EventCounts::default());
        let names = latency::events::Names {
            udp: Arc::clone(&views.udp),
            can: Arc::clone(&views.can),
            delivery: latency.delivery_view(),
        };
        let events = match latency.take_ring() {
            Some(ring) => latency::events::spawn_reader(ring, names, Arc::clone(&event_counts)),
            None => broadcast::channel(1).0,
        };
        let mut udp = UdpForwarder::new(&mut ebpf, &pins, udp_latency)?;
        udp.adopt(&previous.udp, &previous.attachments, recovering)
            .context("reading the pinned UDP maps")?;
        let mut can = CanRouter::new(&mut ebpf, &pins, can_latency)?;
        can.adopt(&previous.can, &previous.attachments, recovering)
            .context("taking over the CAN routes")?;
        let (ring, sockets) = can
            .take_tunnel_maps()
            .context("the CAN tunnel maps were already taken")?;
        let mut dataplane = Self {
            ebpf,
            udp,
            can,
            tunnels: Tunnels::new(ring, sockets),
            latency,
            events,
            event_counts,
            views,
            pins,
            state,
            recovering,
            agent,
            _lock: lock,
        };
        dataplane.save_state();
        Ok(dataplane)
    }

    /// The programs attached now, with their kernel id and tag.
    pub fn attached_programs(&self) -> Vec<AttachedProgram> {
        let udp = self
            .udp
            .view()
            .ingress
            .into_iter()
            .map(|i| AttachedProgram {
                name: i.program,
                kind: i.hook,
                attach_point: i.iface,
                id: i.prog_id,
                tag: i.tag,
            });
        let can = self
            .can
            .view()
            .ingress
            .into_iter()
            .map(|i| AttachedProgram {
                name: can::PROGRAM.to_owned(),
                kind: Hook::Tc,
                attach_point: i.iface,
                id: i.prog_id,
                tag: i.tag,
            });
        udp.chain(can).collect()
    }

    pub fn views(&self) -> Views {
        self.views.clone()
    }

    /// Collectors reading this data plane's counters at scrape time.
    pub fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(UdpCollector {
                stats: Some(self.udp.stats()),
                view: Arc::clone(&self.views.udp),
                userspace: Arc::clone(&self.views.userspace),
            }),
            Box::new(CanCollector {
                rules: self.can.rule_stats(),
                gateway: self.can.gateway(),
                ingress: self.can.ingress_stats(),
                watch: self.can.watch_map(),
                view: Arc::clone(&self.views.can),
                userspace: Arc::clone(&self.views.userspace),
            }),
            Box::new(self.tunnels.metrics()),
            Box::new(self.latency.collector(
                Arc::clone(&self.views.udp),
                Arc::clone(&self.views.can),
                Arc::clone(&self.event_counts),
            )),
            Box::new(crate::runtime::status::WaitingCollector(Arc::clone(
                &self.views.waiting,
            ))),
        ]
    }

    /// Makes `p` the running configuration. On an error the previous one is restored (as far
    /// as it had been applied) and keeps running.
    pub async fn apply(&mut self, p: &Prepared, previous: Option<&Prepared>) -> anyhow::Result<()> {
        let result = self.apply_parts(p).await;
        if result.is_ok() {
            self.recovering = false;
        }
        let mut running = p;
        if let Err(e) = &result
            && let Some(prev) = previous
        {
            running = prev;
            if let Err(again) = self.apply_parts(prev).await {
                warn!("restoring the previous configuration after `{e:#}` failed too: {again:#}");
            }
        }
        *self.views.waiting.write().expect("lock") = running.waiting.clone();
        *self.views.unresolved.write().expect("lock") = running.unresolved.clone();
        self.publish();
        result
    }

    async fn apply_parts(&mut self, p: &Prepared) -> anyhow::Result<()> {
        let waiting = |kinds: &[&str]| {
            let mut w = crate::kernel::slots::Waiting::default();
            for x in p.waiting.iter().filter(|x| kinds.contains(&x.kind)) {
                w.rules.insert(x.name.clone());
                w.ifaces.insert(x.iface.clone());
            }
            // Tunnel routes waiting for their peer keep their counters too.
            if kinds.contains(&"can_route") {
                w.rules.extend(p.unresolved.iter().map(|u| u.route.clone()));
            }
            w
        };
        self.udp
            .apply(
                &mut self.ebpf,
                p.config.udp.mode.attach().unwrap_or_default(),
                p.udp.clone(),
                &waiting(&["udp_forward"]),
            )
            .context("installing the UDP rules")?;
        let watches = p
            .can_watches
            .iter()
            .map(|(iface, _, key, value)| WantedWatch {
                iface: iface.clone(),
                key: *key,
                value: *value,
            })
            .collect();
        self.can
            .apply(
                &mut self.ebpf,
                p.can_routes.clone(),
                watches,
                &waiting(&["can_route", "can_watch"]),
            )
            .context("installing the CAN routes")?;
        let mut can = p.config.can.clone();
        can.receive.retain(|r| {
            !p.waiting
                .iter()
                .any(|w| w.kind == "can_receive" && w.name == r.name)
        });
        self.tunnels
            .apply(&can, &self.can.view().tunnels)
            .await
            .context("starting the CAN tunnel")?;
        self.latency
            .apply(&mut self.ebpf, &p.config.latency, &p.egress_ifaces());
        Ok(())
    }

    fn publish(&mut self) {
        *self.views.udp.write().expect("lock") = self.udp.view();
        *self.views.can.write().expect("lock") = self.can.view();
        self.save_state();
    }

    /// Records what a next agent needs to take over.
    fn save_state(&mut self) {
        if self.recovering {
            return;
        }
        let (udp, mut attachments) = self.udp.state();
        let (can, can_attachments) = self.can.state();
        attachments.extend(can_attachments);
        let state = AgentState {
            agent: Some(self.agent.clone()),
            attachments,
            udp,
            can,
        };
        if let Err(e) = self.state.save(&state) {
            warn!("{e}; a restarted agent will not find this one's counters");
        }
    }

    /// The slow-event stream, for `GET /events`.
    pub fn events(&self) -> broadcast::Sender<Arc<latency::events::Event>> {
        self.events.clone()
    }

    pub fn pins(&self) -> &PinDir {
        &self.pins
    }

    /// Stops the userspace parts (the tunnel) and leaves the kernel's running: programs
    /// attached, maps pinned, can-gw jobs in place, for the next agent to take over.
    pub fn leave_running(mut self) {
        self.latency.stop();
        self.tunnels.shutdown();
        self.save_state();
        self.udp.release();
        self.can.release();
        info!(
            "the data plane keeps running, pinned in {}; `edgeplane down` removes it",
            self.pins.root().display()
        );
    }

    /// Detaches every program, stops the tunnel, removes our can-gw jobs and unpins it all.
    pub fn shutdown(mut self) {
        self.latency.stop();
        self.tunnels.shutdown();
        self.udp.shutdown();
        self.can.shutdown();
        if let Err(e) = self.pins.remove() {
            warn!("{e}");
        }
    }

    /// Whether nothing runs in the kernel: no attachment, no can-gw job.
    pub fn is_idle(&self) -> bool {
        self.udp.state().1.is_empty() && self.can.state().1.is_empty() && !self.can.has_jobs()
    }
}

/// Relays aya-log records from the programs into the agent's log.
fn forward_kernel_logs(ebpf: &mut Ebpf) {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(l) => l,
        Err(e) => {
            warn!("kernel program logs unavailable: {e}");
            return;
        }
    };
    // SAFETY: the AsyncFd owns the logger, so the fd stays open for as long as it is registered.
    let registered =
        unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            warn!("kernel program logs unavailable: {e}");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}
