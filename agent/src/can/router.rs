//! Installs compiled routes and watches into the kernel maps and attaches `can_route` at tc
//! ingress of every CAN interface that has either.
//!
//! Rules live in an array indexed by a slot that stays with the route's name; an interface's
//! value lists its rule slots in order. A changed rule is one map write; a new rule is written
//! before the list that names it, a removed one leaves the list first: frames always see a
//! consistent rule set.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use aya::{
    Ebpf,
    maps::{Array, HashMap as BpfHashMap, MapData, MapError, PerCpuArray, RingBuf},
};
use edgeplane_common::can::{
    CanIngress, CanIngressStats, CanRuleStats, CanWatch, CanWatchKey, INGRESS_MAP,
    INGRESS_STATS_MAP, MAX_INGRESS, MAX_RULES, MAX_RULES_PER_IFACE, PROGRAM, RULE_STATS_MAP,
    RULES_MAP, TUNNEL_RING, TUNNEL_SOCKETS_MAP, WATCH_MAP,
};
use edgeplane_common::{hist::Log2Hist, latency};
use tracing::{info, warn};

use super::{
    gateway::{
        CGW_FLAGS_CAN_FD, Gateway, GatewayError, Job, JobCounters, UID_PREFIX, UID_PREFIX_MASK,
    },
    id_label,
    rules::CompiledRoute,
};
use crate::{
    kernel::attach::{self, AttachError, Attachment, Hook},
    kernel::loader::LoadError,
    kernel::maps,
    kernel::pins::PinDir,
    kernel::slots::{Slots, Waiting},
    kernel::state::{AttachmentRecord, CanState, PlainJob},
    latency::HistMap,
};

pub type RuleStats = Arc<Mutex<PerCpuArray<MapData, CanRuleStats>>>;
pub type IngressStats = Arc<Mutex<PerCpuArray<MapData, CanIngressStats>>>;
pub type WatchMap = Arc<Mutex<BpfHashMap<MapData, CanWatchKey, CanWatch>>>;
/// Cookies of the tunnel's CAN sockets; see `TUNNEL_SOCKETS_MAP`.
pub type TunnelSockets = BpfHashMap<MapData, u64, u8>;

/// The can-gw netlink socket and the running totals of our jobs' counters.
pub type SharedGateway = Arc<Mutex<GatewayState>>;

#[derive(Debug, thiserror::Error)]
pub enum CanRouterError {
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    #[error("updating map {map} failed: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("more than {0} CAN routes or interfaces")]
    OutOfSlots(usize),
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> CanRouterError {
    move |source| CanRouterError::Map { map, source }
}

/// What the router runs, for metrics, readiness and the tunnel.
#[derive(Debug, Clone, Default)]
pub struct CanView {
    pub routes: Vec<RouteInfo>,
    /// Interfaces with `can_route` attached.
    pub ingress: Vec<IngressInfo>,
    /// Interfaces that should have it (every route's ingress and watched interface).
    pub wanted: Vec<String>,
    pub watches: Vec<WatchInfo>,
    /// Tunnel peers, indexed by the tunnel id in the kernel's records.
    pub tunnels: Vec<SocketAddr>,
}

#[derive(Debug, Clone)]
pub struct IngressInfo {
    pub iface: String,
    /// Stats slot.
    pub slot: u32,
    /// Kernel id and tag of the program attached there.
    pub prog_id: u32,
    pub tag: u64,
}

#[derive(Debug, Clone)]
pub struct RouteInfo {
    pub name: String,
    pub slot: u32,
    pub ingress: String,
    /// can-gw jobs routing for this route, as the kernel keeps them.
    pub jobs: Vec<Job>,
    /// Counters of this route's earlier jobs, replaced when the route changed.
    pub carried: GwTotals,
}

/// Totals of can-gw's per-job counters, made monotonic across u32 wraps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GwTotals {
    pub handled: u64,
    pub dropped: u64,
    pub deleted: u64,
}

impl std::ops::AddAssign for GwTotals {
    fn add_assign(&mut self, o: Self) {
        self.handled += o.handled;
        self.dropped += o.dropped;
        self.deleted += o.deleted;
    }
}

/// can-gw access shared by the router (which adds and removes jobs) and the metrics collector
/// (which reads counters): one netlink socket, and wrap tracking per job.
pub struct GatewayState {
    gw: Option<Gateway>,
    /// Per job (as the kernel keeps it): last raw counters and the totals they give.
    seen: Vec<(Job, JobCounters, GwTotals)>,
}

impl GatewayState {
    /// Current totals of every job can-gw has, keyed by the job. A raw counter below its last
    /// value wrapped (they are u32).
    pub fn totals(&mut self) -> Result<Vec<(Job, GwTotals)>, GatewayError> {
        let Some(gw) = self.gw.as_mut() else {
            return Ok(Vec::new());
        };
        let jobs = gw.dump()?;
        let mut seen = Vec::with_capacity(jobs.len());
        for (c, job) in jobs {
            let (last, mut total) = self
                .seen
                .iter()
                .find(|(j, _, _)| *j == job)
                .map(|(_, l, t)| (*l, *t))
                .unwrap_or_default();
            let step = |now: u32, before: u32| u64::from(now.wrapping_sub(before));
            total.handled += step(c.handled, last.handled);
            total.dropped += step(c.dropped, last.dropped);
            total.deleted += step(c.deleted, last.deleted);
            seen.push((job, c, total));
        }
        self.seen = seen;
        Ok(self.seen.iter().map(|(j, _, t)| (j.clone(), *t)).collect())
    }

    fn gw(&mut self) -> Result<&mut Gateway, GatewayError> {
        if self.gw.is_none() {
            self.gw = Some(Gateway::open()?);
        }
        Ok(self.gw.as_mut().expect("opened above"))
    }

    /// Adds a job unless an identical one runs already (left by a previous agent).
    fn add(&mut self, job: &Job) -> Result<(), GatewayError> {
        let kept = job.as_kernel_keeps_it();
        if self.gw()?.dump()?.iter().any(|(_, j)| *j == kept) {
            info!(
                src = job.src_ifindex,
                dst = job.dst_ifindex,
                "adopting a can-gw job that already runs"
            );
            return Ok(());
        }
        self.gw()?.add(job)
    }

    /// Removes a job and returns its final totals. A job that is gone already (can-gw drops
    /// the jobs of an interface that disappears, counters and all) gives the totals last read.
    fn remove(&mut self, job: &Job) -> Result<GwTotals, GatewayError> {
        let kept = job.as_kernel_keeps_it();
        let last_read = self
            .seen
            .iter()
            .find(|(j, _, _)| *j == kept)
            .map(|(_, _, t)| *t);
        let Some(totals) = self
            .totals()?
            .into_iter()
            .find(|(j, _)| *j == kept)
            .map(|(_, t)| t)
        else {
            return Ok(last_read.unwrap_or_default());
        };
        self.gw()?.remove(job)?;
        self.seen.retain(|(j, _, _)| *j != kept);
        Ok(totals)
    }
}

#[derive(Debug, Clone)]
pub struct WatchInfo {
    pub iface: String,
    /// candump-style ID, the metrics' `id` label.
    pub id: String,
    pub key: CanWatchKey,
    pub period_ns: u64,
}

/// A watch to install: its interface name, key and initial value.
pub struct WantedWatch {
    pub iface: String,
    pub key: CanWatchKey,
    pub value: CanWatch,
}

pub struct CanRouter {
    rules: Array<MapData, edgeplane_common::can::CanRule>,
    ingress_map: BpfHashMap<MapData, u32, CanIngress>,
    rule_stats: RuleStats,
    latency: HistMap,
    ingress_stats: IngressStats,
    watch: WatchMap,
    tunnel_ring: Option<(RingBuf<MapData>, TunnelSockets)>,
    gateway: SharedGateway,
    /// Our can-gw jobs, per route name.
    installed_jobs: HashMap<String, Vec<Job>>,
    carried: HashMap<String, GwTotals>,
    rule_slots: Slots,
    ingress_slots: Slots,
    installed_ingress: HashMap<u32, CanIngress>,
    /// Watch keys in the map, with the (period, deadline) they were installed with.
    installed_watch: HashMap<CanWatchKey, (u64, u64)>,
    installed_rules: HashMap<u32, CompiledRoute>,
    attachments: BTreeMap<String, Attachment>,
    /// Interfaces whose attachment still runs the previous agent's program.
    inherited: std::collections::BTreeSet<String>,
    view: CanView,
    pins: PinDir,
    /// The state record was unreadable: route slots are found in the maps and in can-gw by
    /// the next apply, and `orphans`, our jobs with modifications whose owner is unknown,
    /// wait for it to claim them (those no route claims are removed then).
    recovering: bool,
    orphans: Vec<Job>,
}

impl CanRouter {
    /// `latency` is the routes' forwarding latency histograms, cleared with their counters.
    pub fn new(ebpf: &mut Ebpf, pins: &PinDir, latency: HistMap) -> Result<Self, LoadError> {
        let gateway = GatewayState {
            gw: Gateway::open().ok(),
            seen: Vec::new(),
        };
        Ok(Self {
            rules: maps::take(ebpf, RULES_MAP)?,
            ingress_map: maps::take(ebpf, INGRESS_MAP)?,
            rule_stats: Arc::new(Mutex::new(maps::take(ebpf, RULE_STATS_MAP)?)),
            latency,
            ingress_stats: Arc::new(Mutex::new(maps::take(ebpf, INGRESS_STATS_MAP)?)),
            watch: Arc::new(Mutex::new(maps::take(ebpf, WATCH_MAP)?)),
            tunnel_ring: Some((
                maps::take(ebpf, TUNNEL_RING)?,
                maps::take(ebpf, TUNNEL_SOCKETS_MAP)?,
            )),
            gateway: Arc::new(Mutex::new(gateway)),
            installed_jobs: HashMap::new(),
            carried: HashMap::new(),
            rule_slots: Slots::new(0, MAX_RULES),
            ingress_slots: Slots::new(0, MAX_INGRESS),
            installed_ingress: HashMap::new(),
            installed_watch: HashMap::new(),
            installed_rules: HashMap::new(),
            attachments: BTreeMap::new(),
            inherited: Default::default(),
            view: CanView::default(),
            pins: pins.clone(),
            recovering: false,
            orphans: Vec::new(),
        })
    }

    /// Takes over what a previous agent left: slot owners, the pinned maps' contents, its
    /// can-gw jobs and its attachments (which keep running until [`Self::apply`] swaps this
    /// agent's program in). Jobs with our user id that no route owns are removed.
    /// `recovering`: `state` is not a record but what was found in the kernel; nothing is
    /// removed before [`Self::apply`] has seen the config.
    pub fn adopt(
        &mut self,
        state: &CanState,
        attachments: &[AttachmentRecord],
        recovering: bool,
    ) -> Result<(), CanRouterError> {
        self.recovering = recovering;
        self.rule_slots = Slots::with_owners(0, MAX_RULES, &state.routes);
        self.ingress_slots = Slots::with_owners(0, MAX_INGRESS, &state.ingress);
        for entry in self.ingress_map.iter() {
            let (k, v) = entry.map_err(map_err(INGRESS_MAP))?;
            self.installed_ingress.insert(k, v);
        }
        for entry in self.watch.lock().expect("lock").iter() {
            let (k, v) = entry.map_err(map_err(WATCH_MAP))?;
            self.installed_watch.insert(k, (v.period_ns, v.late_ns));
        }
        let jobs = {
            let mut gw = self.gateway.lock().expect("lock");
            match gw.gw() {
                Ok(g) => g.dump()?,
                Err(_) => Vec::new(),
            }
        };
        let owner_of_slot: HashMap<u32, String> =
            state.routes.iter().map(|(n, &s)| (s, n.clone())).collect();
        for (_, job) in jobs {
            let owner = if job.uid & UID_PREFIX_MASK == UID_PREFIX {
                let owner = owner_of_slot.get(&((job.uid & !UID_PREFIX_MASK) >> 1));
                if owner.is_none() && recovering {
                    self.orphans.push(job);
                    continue;
                }
                if owner.is_none() {
                    info!(
                        uid = format_args!("{:#x}", job.uid),
                        "removing a can-gw job of ours that no route owns"
                    );
                    self.gateway.lock().expect("lock").gw()?.remove(&job)?;
                }
                owner
            } else {
                let plain = PlainJob::of(&job);
                state
                    .plain_jobs
                    .iter()
                    .find(|(_, jobs)| jobs.contains(&plain))
                    .map(|(name, _)| name)
            };
            if let Some(name) = owner {
                self.installed_jobs
                    .entry(name.clone())
                    .or_default()
                    .push(job);
            }
        }
        for r in attachments.iter().filter(|r| r.program == PROGRAM) {
            if let Some(a) = attach::recorded(&self.pins, r) {
                self.inherited.insert(a.iface.clone());
                self.attachments.insert(a.iface.clone(), a);
            }
        }
        Ok(())
    }

    pub fn has_jobs(&self) -> bool {
        self.installed_jobs.values().any(|j| !j.is_empty())
    }

    /// What a next agent needs to take over.
    pub fn state(&self) -> (CanState, Vec<AttachmentRecord>) {
        let plain_jobs = self
            .installed_jobs
            .iter()
            .filter_map(|(name, jobs)| {
                let plain: Vec<PlainJob> = jobs
                    .iter()
                    .filter(|j| j.as_kernel_keeps_it().uid == 0)
                    .map(PlainJob::of)
                    .collect();
                (!plain.is_empty()).then(|| (name.clone(), plain))
            })
            .collect();
        (
            CanState {
                routes: self.rule_slots.owners(),
                ingress: self.ingress_slots.owners(),
                plain_jobs,
            },
            self.attachments.values().map(Attachment::record).collect(),
        )
    }

    pub fn gateway(&self) -> SharedGateway {
        Arc::clone(&self.gateway)
    }

    /// The tunnel's ring buffer and socket set; the tunnel owns them once taken.
    pub fn take_tunnel_maps(&mut self) -> Option<(RingBuf<MapData>, TunnelSockets)> {
        self.tunnel_ring.take()
    }

    pub fn rule_stats(&self) -> RuleStats {
        Arc::clone(&self.rule_stats)
    }
    pub fn ingress_stats(&self) -> IngressStats {
        Arc::clone(&self.ingress_stats)
    }
    pub fn watch_map(&self) -> WatchMap {
        Arc::clone(&self.watch)
    }
    pub fn view(&self) -> CanView {
        self.view.clone()
    }

    /// Makes `routes` and `watches` the running set; `waiting` routes (an interface is missing)
    /// keep their counters for when it is back. On an attach error the previous set stays
    /// and attachments made by this call are undone.
    pub fn apply(
        &mut self,
        ebpf: &mut Ebpf,
        mut routes: Vec<CompiledRoute>,
        watches: Vec<WantedWatch>,
        waiting: &Waiting,
    ) -> Result<(), CanRouterError> {
        // Interfaces in use, with their ifindex.
        let mut ifaces: BTreeMap<String, u32> = BTreeMap::new();
        for r in &routes {
            ifaces.insert(r.ingress.clone(), r.ingress_ifindex);
        }
        for w in &watches {
            ifaces.insert(w.iface.clone(), w.key.ifindex);
        }

        // 1. Attach where needed (tc: CAN netdevs have no XDP).
        let mut fresh = Vec::new();
        let mut replaced = Vec::new();
        let mut take_over: Vec<(String, u32)> = Vec::new();
        let undo = |fresh: Vec<Attachment>| {
            for a in fresh {
                if let Err(e) = attach::detach(a) {
                    warn!("rolling back: {e}");
                }
            }
        };
        for (iface, &ifindex) in &ifaces {
            let same = match self.attachments.get(iface) {
                Some(a) if a.ifindex == ifindex => true,
                Some(_) => {
                    replaced.push(iface.clone());
                    false
                }
                None => false,
            };
            if same {
                if self.inherited.contains(iface) {
                    take_over.push((iface.clone(), ifindex));
                }
                continue;
            }
            match attach::attach(ebpf, &self.pins, PROGRAM, Hook::Tc, iface, ifindex) {
                Ok(a) => fresh.push(a),
                Err(e) => {
                    undo(fresh);
                    return Err(e.into());
                }
            }
        }

        // 2. Slots; new ones start with cleared counters. After an unreadable state record,
        // routes get the slots the kernel shows them in first.
        if std::mem::take(&mut self.recovering) {
            self.claim_running_slots(&routes, &ifaces)?;
        }
        let fresh_rules = self
            .rule_slots
            .assign(routes.iter().map(|r| r.name.as_str()))
            .map_err(CanRouterError::OutOfSlots)?;
        for slot in fresh_rules {
            maps::clear_slot(&mut self.rule_stats.lock().expect("lock"), slot)
                .map_err(map_err(RULE_STATS_MAP))?;
            (self.latency.lock().expect("lock"))
                .set(slot, Log2Hist::default(), 0)
                .map_err(map_err(latency::CAN_FORWARD_MAP))?;
        }
        let fresh_ifaces = self
            .ingress_slots
            .assign(ifaces.keys().map(String::as_str))
            .map_err(CanRouterError::OutOfSlots)?;
        for slot in fresh_ifaces {
            maps::clear_slot(&mut self.ingress_stats.lock().expect("lock"), slot)
                .map_err(map_err(INGRESS_STATS_MAP))?;
        }

        // 3. Number the tunnel peers; write rules (and CRC tables) into their slots.
        let mut tunnels: Vec<SocketAddr> = Vec::new();
        for r in &mut routes {
            if let Some(peer) = r.peer {
                let id = tunnels.iter().position(|p| *p == peer).unwrap_or_else(|| {
                    tunnels.push(peer);
                    tunnels.len() - 1
                });
                r.rule.tunnel = id as u32;
            }
        }
        let mut slot_of: HashMap<String, u32> = HashMap::new();
        for r in &routes {
            let slot = self.rule_slots.get(&r.name).expect("assigned above");
            slot_of.insert(r.name.clone(), slot);
            if self.installed_rules.get(&slot) == Some(r) {
                continue;
            }
            self.rules
                .set(slot, r.rule, 0)
                .map_err(map_err(RULES_MAP))?;
        }

        // 3b. can-gw jobs, with user ids from the slot: unchanged routes keep theirs (and
        // their counters); a changed route's jobs are replaced, its counters carried over.
        for r in &mut routes {
            let slot = slot_of[r.name.as_str()];
            for job in &mut r.jobs {
                job.uid = UID_PREFIX | slot << 1 | u32::from(job.flags & CGW_FLAGS_CAN_FD != 0);
            }
        }
        {
            let mut gw = self.gateway.lock().expect("lock");
            for r in &routes {
                let old = self
                    .installed_jobs
                    .get(&r.name)
                    .cloned()
                    .unwrap_or_default();
                if as_kernel_keeps_them(&old) == as_kernel_keeps_them(&r.jobs) {
                    // Unchanged (possibly adopted from a previous agent): keep running.
                    self.installed_jobs.insert(r.name.clone(), r.jobs.clone());
                    continue;
                }
                for job in &old {
                    let t = gw.remove(job)?;
                    *self.carried.entry(r.name.clone()).or_default() += t;
                }
                for job in &r.jobs {
                    gw.add(job)?;
                }
                self.installed_jobs.insert(r.name.clone(), r.jobs.clone());
            }
            let gone: Vec<String> = self
                .installed_jobs
                .keys()
                .filter(|n| !routes.iter().any(|r| &r.name == *n))
                .cloned()
                .collect();
            for name in gone {
                let mut totals = GwTotals::default();
                for job in self.installed_jobs.remove(&name).unwrap_or_default() {
                    totals += gw.remove(&job)?;
                }
                if waiting.rules.contains(&name) {
                    // Its interface went (and can-gw dropped the job): count on when it is back.
                    *self.carried.entry(name).or_default() += totals;
                } else {
                    self.carried.remove(&name);
                }
            }
        }

        // 4. Per-interface rule lists, in config order.
        let mut wanted_ingress: HashMap<u32, CanIngress> = HashMap::new();
        for (iface, &ifindex) in &ifaces {
            let mut v = CanIngress {
                slot: self.ingress_slots.get(iface).expect("assigned above"),
                watch: u8::from(watches.iter().any(|w| w.key.ifindex == ifindex)),
                ..CanIngress::default()
            };
            for r in routes
                .iter()
                .filter(|r| r.ingress_ifindex == ifindex)
                .take(MAX_RULES_PER_IFACE)
            {
                v.rules[usize::from(v.count)] = slot_of[r.name.as_str()] as u16;
                v.count += 1;
            }
            wanted_ingress.insert(ifindex, v);
        }
        for (ifindex, v) in &wanted_ingress {
            if self.installed_ingress.get(ifindex) != Some(v) {
                self.ingress_map
                    .insert(ifindex, v, 0)
                    .map_err(map_err(INGRESS_MAP))?;
            }
        }
        for ifindex in self
            .installed_ingress
            .keys()
            .filter(|i| !wanted_ingress.contains_key(i))
        {
            self.ingress_map
                .remove(ifindex)
                .map_err(map_err(INGRESS_MAP))?;
        }
        self.installed_ingress = wanted_ingress;

        // 5. Watches: new or changed ones start afresh, unchanged ones keep measuring.
        let mut installed_watch = HashMap::new();
        {
            let mut map = self.watch.lock().expect("lock");
            for w in &watches {
                let expect = (w.value.period_ns, w.value.late_ns);
                if self.installed_watch.get(&w.key) != Some(&expect) {
                    map.insert(w.key, w.value, 0).map_err(map_err(WATCH_MAP))?;
                }
                installed_watch.insert(w.key, expect);
            }
            for key in self
                .installed_watch
                .keys()
                .filter(|k| !installed_watch.contains_key(k))
            {
                map.remove(key).map_err(map_err(WATCH_MAP))?;
            }
        }
        self.installed_watch = installed_watch;

        // 6. Detach what is no longer needed; keep the new attachments.
        let gone: Vec<String> = self
            .attachments
            .keys()
            .filter(|i| !ifaces.contains_key(*i) || replaced.contains(i))
            .cloned()
            .collect();
        for iface in gone {
            let a = self.attachments.remove(&iface).expect("listed above");
            self.inherited.remove(&iface);
            info!(iface, "detaching can_route");
            if let Err(e) = attach::detach(a) {
                warn!("{e}");
            }
        }
        for a in fresh {
            info!(iface = a.iface, "can_route attached");
            self.attachments.insert(a.iface.clone(), a);
        }
        // Attachments a previous agent left run its program: swap in ours, in place, now that
        // the maps hold what it needs.
        for (iface, ifindex) in take_over {
            match attach::attach(ebpf, &self.pins, PROGRAM, Hook::Tc, &iface, ifindex) {
                Ok(a) => {
                    info!(iface, "can_route taken over from the previous agent");
                    // The old handle refers to the same attachment: dropping it leaves it.
                    drop(self.attachments.insert(iface.clone(), a));
                    self.inherited.remove(&iface);
                }
                Err(e) => warn!("{e}; the previous agent's program keeps running there"),
            }
        }

        // 7. Free slots of removed routes and interfaces; publish the view.
        self.rule_slots
            .retain(|n| routes.iter().any(|r| r.name == n) || waiting.rules.contains(n));
        self.ingress_slots
            .retain(|i| ifaces.contains_key(i) || waiting.ifaces.contains(i));
        self.installed_rules = routes
            .iter()
            .map(|r| (slot_of[r.name.as_str()], r.clone()))
            .collect();
        let mut iface_of: HashMap<u32, String> = HashMap::new();
        for (iface, ifindex) in &ifaces {
            iface_of.insert(*ifindex, iface.clone());
        }
        self.view = CanView {
            routes: routes
                .iter()
                .map(|r| RouteInfo {
                    name: r.name.clone(),
                    slot: slot_of[r.name.as_str()],
                    ingress: r.ingress.clone(),
                    jobs: r.jobs.iter().map(Job::as_kernel_keeps_it).collect(),
                    carried: self.carried.get(&r.name).copied().unwrap_or_default(),
                })
                .collect(),
            ingress: self
                .attachments
                .values()
                .map(|a| IngressInfo {
                    iface: a.iface.clone(),
                    slot: self
                        .ingress_slots
                        .get(&a.iface)
                        .expect("attached interfaces have slots"),
                    prog_id: a.prog_id,
                    tag: a.tag,
                })
                .collect(),
            wanted: ifaces.keys().cloned().collect(),
            watches: watches
                .iter()
                .map(|w| WatchInfo {
                    iface: w.iface.clone(),
                    id: id_label(w.key.can_id),
                    key: w.key,
                    period_ns: w.value.period_ns,
                })
                .collect(),
            tunnels,
        };
        Ok(())
    }

    /// Leaves every program attached and every can-gw job running, for the next agent.
    pub fn release(&mut self) {
        self.inherited.clear();
        // Dropped attachments stay attached.
        self.attachments.clear();
    }

    /// Detaches every program and removes our can-gw jobs.
    pub fn shutdown(&mut self) {
        let mut gw = self.gateway.lock().expect("lock");
        for (_, jobs) in std::mem::take(&mut self.installed_jobs) {
            for job in jobs {
                if let Err(e) = gw.remove(&job) {
                    warn!("{e}");
                }
            }
        }
        drop(gw);
        self.inherited.clear();
        for (_, a) in std::mem::take(&mut self.attachments) {
            info!(iface = a.iface, "detaching can_route");
            if let Err(e) = attach::detach(a) {
                warn!("{e}");
            }
        }
    }
}

impl CanRouter {
    /// Finds the slots of routes and interfaces that have no owner record: a route with
    /// modifications in the user id of its running can-gw job, any other in the rule its
    /// ingress interface lists. Claimed jobs become the route's (kept as they run); our jobs
    /// no route claims are removed.
    fn claim_running_slots(
        &mut self,
        routes: &[CompiledRoute],
        ifaces: &BTreeMap<String, u32>,
    ) -> Result<(), CanRouterError> {
        let slot_of_uid = |uid: u32| (uid & !UID_PREFIX_MASK) >> 1;
        let mut claimed = 0;
        for r in routes {
            let running = self.orphans.iter().find(|o| {
                r.jobs.iter().any(|j| {
                    Job {
                        uid: o.uid,
                        ..j.clone()
                    }
                    .as_kernel_keeps_it()
                        == o.as_kernel_keeps_it()
                })
            });
            if let Some(slot) = running.map(|o| slot_of_uid(o.uid))
                && self.rule_slots.claim(&r.name, slot)
            {
                let (mine, others) = std::mem::take(&mut self.orphans)
                    .into_iter()
                    .partition(|o| slot_of_uid(o.uid) == slot);
                self.orphans = others;
                self.installed_jobs.insert(r.name.clone(), mine);
                claimed += 1;
                continue;
            }
            let listed = self
                .installed_ingress
                .get(&r.ingress_ifindex)
                .map(|i| i.rules[..usize::from(i.count).min(i.rules.len())].to_vec())
                .unwrap_or_default();
            for slot in listed.into_iter().map(u32::from) {
                let Ok(k) = self.rules.get(&slot, 0) else {
                    continue;
                };
                let w = &r.rule;
                let same = (
                    k.filter_id,
                    k.filter_mask,
                    k.action,
                    k.flags,
                    k.hops,
                    k.egress,
                ) == (
                    w.filter_id,
                    w.filter_mask,
                    w.action,
                    w.flags,
                    w.hops,
                    w.egress,
                );
                if same && self.rule_slots.claim(&r.name, slot) {
                    claimed += 1;
                    break;
                }
            }
        }
        for (iface, ifindex) in ifaces {
            if let Some(i) = self.installed_ingress.get(ifindex) {
                self.ingress_slots.claim(iface, i.slot);
            }
        }
        info!(
            routes = routes.len(),
            found = claimed,
            "CAN routes found running keep their can-gw jobs and counters"
        );
        let mut gw = self.gateway.lock().expect("lock");
        for job in std::mem::take(&mut self.orphans) {
            info!(
                uid = format_args!("{:#x}", job.uid),
                "removing a can-gw job of ours that no route owns"
            );
            gw.gw()?.remove(&job)?;
        }
        Ok(())
    }
}

/// Jobs compared as can-gw reports them, in a stable order.
fn as_kernel_keeps_them(jobs: &[Job]) -> Vec<Job> {
    let mut v: Vec<Job> = jobs.iter().map(Job::as_kernel_keeps_it).collect();
    v.sort_by_key(|j| {
        (
            j.src_ifindex,
            j.dst_ifindex,
            j.flags,
            j.filter_id,
            j.filter_mask,
            j.uid,
        )
    });
    v
}

impl PlainJob {
    fn of(j: &Job) -> Self {
        Self {
            src_ifindex: j.src_ifindex,
            dst_ifindex: j.dst_ifindex,
            filter_id: j.filter_id,
            filter_mask: j.filter_mask,
            flags: j.flags,
            hops: j.hops,
        }
    }
}
