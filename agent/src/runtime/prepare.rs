//! Preparing a config: read, validated and host-checked, tunnel peers resolved, rules
//! compiled. What comes out can only fail to apply in the kernel or on a socket.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::Path,
};

use tracing::warn;

use crate::{
    can::rules::{self as can_rules, CompiledRoute},
    config::{Config, Overrides, UdpForwardRule},
    host::netdev,
    host::resolve::{self, Peers, RESOLVE_TIMEOUT, ResolveError},
    host::{Host, ThisHost},
    udp_forward::rules::{self as udp_rules, CompiledRule},
};

/// A validated, host-checked config with its rules compiled: applying it can only fail in the
/// kernel (an attach refused) or on a socket.
#[derive(Clone, PartialEq)]
pub struct Prepared {
    pub config: Config,
    pub(super) udp: Vec<CompiledRule>,
    pub(super) can_routes: Vec<CompiledRoute>,
    pub(super) can_watches: Vec<(
        String,
        u32,
        edgeplane_common::can::CanWatchKey,
        edgeplane_common::can::CanWatch,
    )>,
    /// Rules left out because an interface they need is missing.
    pub waiting: Vec<Waiting>,
    /// Tunnel peers resolved (by their `host:port`), and why the others are not.
    pub(super) peers: Peers,
    pub(super) peer_errors: BTreeMap<String, ResolveError>,
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
        // The bound interface (a WireGuard link, say) is waited for like the bus: a socket
        // bound to a vanished interface's index would never receive again.
        for iface in std::iter::once(&r.iface).chain(&r.bind_iface) {
            if host.ifindex(iface).is_none() {
                anyhow::ensure!(!strict, "interface {iface} vanished");
                wait("can_receive", &r.name, iface);
            }
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
