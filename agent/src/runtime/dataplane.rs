//! The kernel plane: the eBPF programs and maps pinned under bpffs, and everything applied to
//! them (UDP rules, CAN routes and watches, tunnels, latency capture) from one prepared config.

use std::{path::Path, sync::Arc};

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
    can::{CanRouter, router::WantedWatch, stats::CanCollector, tunnel::Tunnels},
    kernel::attach::{self, Hook},
    kernel::loader,
    kernel::pins::{DirLock, PinDir},
    kernel::state::{AgentRecord, AgentState, StateStore},
    latency::{self, Latency},
    runtime::status::AttachedProgram,
    udp_forward::{UdpForwarder, stats::UdpCollector},
};

use super::{prepare::Prepared, views::Views};

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
        let removed = crate::kernel::loader::pin_names()
            .map_err(|e| e.to_string())
            .and_then(|ours| self.pins.remove(&ours).map_err(|e| e.to_string()));
        match removed {
            Ok(foreign) if !foreign.is_empty() => warn!(
                "left {} entries in {} that edgeplane did not pin",
                foreign.len(),
                self.pins.root().display()
            ),
            Ok(_) => {}
            Err(e) => warn!("{e}"),
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
