//! Installs compiled rules into the kernel maps and attaches the programs to ingress interfaces.
//!
//! Updates are ordered so that rules that did not change keep forwarding throughout: new
//! entries go in before stale ones come out, and an interface's set of shapes is widened before
//! and narrowed after.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
};

use aya::{
    Ebpf,
    maps::{DevMapHash, HashMap as BpfHashMap, MapData, MapError, PerCpuArray, xdp::XdpMapError},
};
use edgeplane_common::udp_forward::{
    EGRESS_MAP, FAMILY_IPV4, INGRESS_MAP, MAX_INGRESS, MAX_RULES, STATS_MAP, TC_PROGRAM,
    UdpIngress, UdpStats, XDP_PROGRAM,
};
use edgeplane_common::{hist::Log2Hist, latency};
use tracing::{info, warn};

use super::{
    rule_maps::RuleMaps,
    rules::{CompiledRule, MapContents},
};
use crate::{
    config::{AttachMode, Family},
    host::netdev,
    kernel::attach::{self, AttachError, Attachment, Hook},
    kernel::loader::LoadError,
    kernel::maps,
    kernel::pins::PinDir,
    kernel::slots::Slots,
    kernel::slots::Waiting,
    kernel::state::{AttachmentRecord, UdpState},
    latency::HistMap,
};

/// The per-CPU counters, shared with the metrics collector.
pub type StatsMap = Arc<Mutex<PerCpuArray<MapData, UdpStats>>>;

#[derive(Debug, thiserror::Error)]
pub enum UdpForwardError {
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error(
        "interface {iface} cannot receive XDP redirects ({source}); its driver lacks ndo_xdp_xmit: \
         use mode = \"tc\" for rules whose ingress sends to it"
    )]
    Egress {
        iface: String,
        #[source]
        source: XdpMapError,
    },
    #[error("updating map {map} failed: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("more than {0} rules or ingress interfaces")]
    OutOfSlots(usize),
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> UdpForwardError {
    move |source| UdpForwardError::Map { map, source }
}

fn rule_map_err((map, source): (&'static str, MapError)) -> UdpForwardError {
    UdpForwardError::Map { map, source }
}

/// What the forwarder is doing, for metrics and readiness.
#[derive(Debug, Clone, Default)]
pub struct UdpView {
    pub rules: Vec<RuleInfo>,
    pub ingress: Vec<IngressInfo>,
}

#[derive(Debug, Clone)]
pub struct RuleInfo {
    pub name: String,
    pub slot: u32,
    pub ingress: String,
    pub egress: String,
}

#[derive(Debug, Clone)]
pub struct IngressInfo {
    pub iface: String,
    pub slot: u32,
    pub hook: Hook,
    pub program: String,
    /// Kernel id and tag of the program attached there.
    pub prog_id: u32,
    pub tag: u64,
}

pub struct UdpForwarder {
    rules_maps: RuleMaps,
    ingress_map: BpfHashMap<MapData, u32, UdpIngress>,
    egress_map: DevMapHash<MapData>,
    stats: StatsMap,
    latency: HistMap,
    rule_slots: Slots,
    ingress_slots: Slots,
    /// What the maps hold now.
    installed: MapContents,
    egress: BTreeMap<u32, String>,
    attachments: BTreeMap<String, Attachment>,
    /// Interfaces whose attachment still runs the previous agent's program.
    inherited: BTreeSet<String>,
    rules: Vec<CompiledRule>,
    pins: PinDir,
    /// The slot owners were lost (an unreadable state record): the next apply finds them
    /// in the maps.
    recovering: bool,
}

impl UdpForwarder {
    /// Takes the forwarder's maps out of the loaded object.
    /// `latency` is the rules' forwarding latency histograms, cleared with their counters.
    pub fn new(ebpf: &mut Ebpf, pins: &PinDir, latency: HistMap) -> Result<Self, LoadError> {
        Ok(Self {
            rules_maps: RuleMaps::take(ebpf)?,
            ingress_map: maps::take(ebpf, INGRESS_MAP)?,
            egress_map: maps::take(ebpf, EGRESS_MAP)?,
            stats: Arc::new(Mutex::new(maps::take(ebpf, STATS_MAP)?)),
            latency,
            rule_slots: Slots::new(0, MAX_RULES),
            ingress_slots: Slots::new(MAX_RULES, MAX_INGRESS),
            installed: MapContents::default(),
            egress: BTreeMap::new(),
            attachments: BTreeMap::new(),
            inherited: BTreeSet::new(),
            rules: Vec::new(),
            pins: pins.clone(),
            recovering: false,
        })
    }

    /// Takes over what a previous agent left: its slot owners, what its maps hold (they are
    /// the pinned ones), and its attachments, which keep running until [`Self::apply`] puts
    /// this agent's program in their place.
    /// `recovering`: `state` is not a record but what was found in the kernel, so the slot
    /// owners are found in the maps by the first [`Self::apply`].
    pub fn adopt(
        &mut self,
        state: &UdpState,
        attachments: &[AttachmentRecord],
        recovering: bool,
    ) -> Result<(), UdpForwardError> {
        self.recovering = recovering;
        self.rule_slots = Slots::with_owners(0, MAX_RULES, &state.rules);
        self.ingress_slots = Slots::with_owners(MAX_RULES, MAX_INGRESS, &state.ingress);
        for (k, v) in self.rules_maps.entries().map_err(rule_map_err)? {
            self.installed.rules.insert(k, v);
        }
        for entry in self.ingress_map.iter() {
            let (k, v) = entry.map_err(map_err(INGRESS_MAP))?;
            self.installed.ingress.insert(k, v);
        }
        for ifindex in self.egress_map.keys() {
            let ifindex = ifindex.map_err(map_err(EGRESS_MAP))?;
            self.egress.insert(
                ifindex,
                netdev::name(ifindex).unwrap_or_else(|| format!("ifindex {ifindex}")),
            );
        }
        for r in attachments
            .iter()
            .filter(|r| r.program == XDP_PROGRAM || r.program == TC_PROGRAM)
        {
            if let Some(a) = attach::recorded(&self.pins, r) {
                self.inherited.insert(a.iface.clone());
                self.attachments.insert(a.iface.clone(), a);
            }
        }
        Ok(())
    }

    /// What a next agent needs to take over: slot owners and attachments.
    pub fn state(&self) -> (UdpState, Vec<AttachmentRecord>) {
        (
            UdpState {
                rules: self.rule_slots.owners(),
                ingress: self.ingress_slots.owners(),
            },
            self.attachments.values().map(Attachment::record).collect(),
        )
    }

    pub fn stats(&self) -> StatsMap {
        Arc::clone(&self.stats)
    }

    pub fn view(&self) -> UdpView {
        UdpView {
            rules: self
                .rules
                .iter()
                .map(|r| RuleInfo {
                    name: r.name.clone(),
                    slot: self
                        .rule_slots
                        .get(&r.name)
                        .expect("installed rules have slots"),
                    ingress: r.ingress.clone(),
                    egress: r.egress.clone(),
                })
                .collect(),
            ingress: self
                .attachments
                .values()
                .filter_map(|a| {
                    Some(IngressInfo {
                        iface: a.iface.clone(),
                        // Inherited attachments no rule uses any more have none.
                        slot: self.ingress_slots.get(&a.iface)?,
                        hook: a.hook,
                        program: a.program.clone(),
                        prog_id: a.prog_id,
                        tag: a.tag,
                    })
                })
                .collect(),
        }
    }

    /// Makes `rules` the running rule set; `waiting` rules (their interface is missing) keep
    /// their counters for when it is back. On error the previous rules keep running and
    /// attachments made by this call are undone.
    pub fn apply(
        &mut self,
        ebpf: &mut Ebpf,
        mode: AttachMode,
        rules: Vec<CompiledRule>,
        waiting: &Waiting,
    ) -> Result<(), UdpForwardError> {
        // Ingress interfaces, with the egress interfaces their rules send to.
        let mut ingresses: BTreeMap<&str, (u32, BTreeSet<&str>)> = BTreeMap::new();
        for r in &rules {
            let e = ingresses
                .entry(&r.ingress)
                .or_insert((r.ingress_ifindex, BTreeSet::new()));
            e.1.insert(&r.egress);
        }

        // 1. Attach where needed. Replacements are attached before the old link goes.
        let mut fresh: Vec<Attachment> = Vec::new();
        let mut replaced: Vec<String> = Vec::new();
        let mut take_over: Vec<(String, u32)> = Vec::new();
        for (&iface, (ifindex, egresses)) in &ingresses {
            let wanted = wanted_hook(mode, iface, egresses);
            let current = self.attachments.get(iface);
            let keep = match (current, &wanted) {
                (Some(a), Wanted::Xdp) => a.ifindex == *ifindex && a.hook == Hook::Xdp,
                (Some(a), Wanted::Tc) => a.ifindex == *ifindex && a.hook == Hook::Tc,
                (Some(a), Wanted::XdpOrTc) => a.ifindex == *ifindex,
                (None, _) => false,
            };
            if keep {
                if self.inherited.contains(iface) {
                    take_over.push((iface.to_owned(), *ifindex));
                }
                continue;
            }
            if current.is_some() {
                replaced.push(iface.to_owned());
            }
            match attach_ingress(ebpf, &self.pins, mode, wanted, iface, *ifindex) {
                Ok(a) => fresh.push(a),
                Err(e) => {
                    undo(fresh);
                    return Err(e);
                }
            }
        }
        let hook_of = |iface: &str| {
            fresh
                .iter()
                .find(|a| a.iface == iface)
                .or_else(|| self.attachments.get(iface))
                .map(|a| a.hook)
        };

        // 2. XDP redirects need their egress in the devmap.
        let wanted_egress: BTreeMap<u32, String> = rules
            .iter()
            .filter(|r| hook_of(&r.ingress) == Some(Hook::Xdp))
            .map(|r| (r.egress_ifindex, r.egress.clone()))
            .collect();
        for (&ifindex, iface) in &wanted_egress {
            if !self.egress.contains_key(&ifindex)
                && let Err(source) = self.egress_map.insert(ifindex, ifindex, None, 0)
            {
                undo(fresh);
                return Err(UdpForwardError::Egress {
                    iface: iface.clone(),
                    source,
                });
            }
        }

        // 3. Slots: new names get slots with cleared counters. After an unreadable state
        // record, a rule whose key is in the map keeps the slot it counts in there.
        if std::mem::take(&mut self.recovering) {
            self.claim_installed_slots(&rules);
        }
        let fresh_slots = self
            .rule_slots
            .assign(rules.iter().map(|r| r.name.as_str()))
            .map_err(UdpForwardError::OutOfSlots)?
            .into_iter()
            .chain(
                self.ingress_slots
                    .assign(ingresses.keys().copied())
                    .map_err(UdpForwardError::OutOfSlots)?,
            );
        for slot in fresh_slots {
            self.clear_stats(slot)?;
        }
        let wanted = MapContents::build(
            &rules,
            |n| self.rule_slots.get(n).expect("assigned above"),
            |i| self.ingress_slots.get(i).expect("assigned above"),
        );

        // 4. Widen each interface's shapes, so both old and new keys are looked up.
        for (ifindex, new) in &wanted.ingress {
            let shapes = new.shapes
                | self
                    .installed
                    .ingress
                    .get(ifindex)
                    .map_or(0, |old| old.shapes);
            self.ingress_map
                .insert(ifindex, UdpIngress { shapes, ..*new }, 0)
                .map_err(map_err(INGRESS_MAP))?;
        }
        // 5. New and changed rules in, then stale ones out.
        for (key, action) in &wanted.rules {
            if self.installed.rules.get(key) != Some(action) {
                self.rules_maps.insert(key, action).map_err(rule_map_err)?;
            }
        }
        for key in self
            .installed
            .rules
            .keys()
            .filter(|k| !wanted.rules.contains_key(k))
        {
            self.rules_maps.remove(key).map_err(rule_map_err)?;
        }
        // 6. Narrow the shapes; forget interfaces no rule uses.
        for (ifindex, new) in &wanted.ingress {
            self.ingress_map
                .insert(ifindex, new, 0)
                .map_err(map_err(INGRESS_MAP))?;
        }
        for ifindex in self
            .installed
            .ingress
            .keys()
            .filter(|i| !wanted.ingress.contains_key(i))
        {
            self.ingress_map
                .remove(ifindex)
                .map_err(map_err(INGRESS_MAP))?;
        }
        self.installed = wanted;

        // 7. Detach what was replaced or is no longer needed; install the new attachments.
        let gone: Vec<String> = self
            .attachments
            .keys()
            .filter(|i| !ingresses.contains_key(i.as_str()) || replaced.contains(i))
            .cloned()
            .collect();
        for iface in gone {
            let a = self.attachments.remove(&iface).expect("listed above");
            self.inherited.remove(&iface);
            info!(iface, hook = %a.hook, "detaching udp_forward");
            if let Err(e) = attach::detach(a) {
                warn!("{e}");
            }
        }
        for a in fresh {
            info!(iface = a.iface, hook = %a.hook, "udp_forward attached");
            self.attachments.insert(a.iface.clone(), a);
        }
        // Attachments a previous agent left run its program: swap in ours, in place, now that
        // the maps hold what it needs.
        for (iface, ifindex) in take_over {
            let hook = self.attachments[&iface].hook;
            let program = if hook == Hook::Xdp {
                XDP_PROGRAM
            } else {
                TC_PROGRAM
            };
            match attach::attach(ebpf, &self.pins, program, hook, &iface, ifindex) {
                Ok(a) => {
                    info!(iface, %hook, "udp_forward taken over from the previous agent");
                    // The old handle refers to the same attachment: dropping it leaves it.
                    drop(self.attachments.insert(iface.clone(), a));
                    self.inherited.remove(&iface);
                }
                Err(e) => warn!("{e}; the previous agent's program keeps running there"),
            }
        }

        // 8. Drop unused redirect targets and free slots of removed rules and interfaces.
        for (&ifindex, iface) in &self.egress {
            if !wanted_egress.contains_key(&ifindex)
                && let Err(e) = self.egress_map.remove(ifindex)
            {
                warn!("removing {iface} from {EGRESS_MAP}: {e}");
            }
        }
        self.egress = wanted_egress;
        self.rule_slots
            .retain(|n| rules.iter().any(|r| r.name == n) || waiting.rules.contains(n));
        self.ingress_slots
            .retain(|i| ingresses.contains_key(i) || waiting.ifaces.contains(i));
        warn_if_not_forwarding(&rules);
        self.rules = rules;
        Ok(())
    }

    /// Gives rules and ingress interfaces without an owner record the slots the installed
    /// map entries count in.
    fn claim_installed_slots(&mut self, rules: &[CompiledRule]) {
        let mut claimed = 0;
        for r in rules {
            let installed = r.keys.iter().find_map(|k| self.installed.rules.get(k));
            if let Some(action) = installed
                && self.rule_slots.claim(&r.name, action.slot)
            {
                claimed += 1;
            }
            if let Some(ingress) = self.installed.ingress.get(&r.ingress_ifindex) {
                self.ingress_slots.claim(&r.ingress, ingress.slot);
            }
        }
        info!(
            rules = rules.len(),
            found = claimed,
            "UDP rules found in the pinned maps keep their counters"
        );
    }

    /// Detaches every program.
    pub fn shutdown(&mut self) {
        self.inherited.clear();
        for (_, a) in std::mem::take(&mut self.attachments) {
            info!(iface = a.iface, hook = %a.hook, "detaching udp_forward");
            if let Err(e) = attach::detach(a) {
                warn!("{e}");
            }
        }
    }

    /// Leaves every program attached, for the next agent to take over.
    pub fn release(&mut self) {
        self.inherited.clear();
        // Dropped attachments stay attached.
        self.attachments.clear();
    }

    fn clear_stats(&mut self, slot: u32) -> Result<(), UdpForwardError> {
        maps::clear_slot(&mut self.stats.lock().expect("stats lock"), slot)
            .map_err(map_err(STATS_MAP))?;
        if slot < MAX_RULES {
            (self.latency.lock().expect("latency lock"))
                .set(slot, Log2Hist::default(), 0)
                .map_err(map_err(latency::UDP_FORWARD_MAP))?;
        }
        Ok(())
    }
}

enum Wanted {
    Xdp,
    Tc,
    /// auto mode on a physical interface: XDP if the driver takes it, else tc.
    XdpOrTc,
}

fn wanted_hook(mode: AttachMode, ingress: &str, egresses: &BTreeSet<&str>) -> Wanted {
    match mode {
        AttachMode::Xdp => Wanted::Xdp,
        AttachMode::Tc => Wanted::Tc,
        AttachMode::Auto
            if netdev::is_veth(ingress) || egresses.iter().any(|e| netdev::is_veth(e)) =>
        {
            Wanted::Tc
        }
        AttachMode::Auto => Wanted::XdpOrTc,
    }
}

fn attach_ingress(
    ebpf: &mut Ebpf,
    pins: &PinDir,
    mode: AttachMode,
    wanted: Wanted,
    iface: &str,
    ifindex: u32,
) -> Result<Attachment, UdpForwardError> {
    match wanted {
        Wanted::Xdp => Ok(attach::attach(
            ebpf,
            pins,
            XDP_PROGRAM,
            Hook::Xdp,
            iface,
            ifindex,
        )?),
        Wanted::Tc => {
            if mode == AttachMode::Auto {
                info!(
                    iface,
                    "auto mode: veth involved, using tc (XDP redirects into a veth need XDP on its peer)"
                );
            }
            Ok(attach::attach(
                ebpf,
                pins,
                TC_PROGRAM,
                Hook::Tc,
                iface,
                ifindex,
            )?)
        }
        Wanted::XdpOrTc => match attach::attach(ebpf, pins, XDP_PROGRAM, Hook::Xdp, iface, ifindex)
        {
            Ok(a) => Ok(a),
            Err(e) => {
                warn!(iface, "auto mode: XDP unavailable, falling back to tc: {e}");
                Ok(attach::attach(
                    ebpf,
                    pins,
                    TC_PROGRAM,
                    Hook::Tc,
                    iface,
                    ifindex,
                )?)
            }
        },
    }
}

fn undo(attachments: Vec<Attachment>) {
    for a in attachments {
        if let Err(e) = attach::detach(a) {
            warn!("rolling back: {e}");
        }
    }
}

/// bpf_fib_lookup refuses to route when forwarding is off on the egress: say so up front.
fn warn_if_not_forwarding(rules: &[CompiledRule]) {
    let mut seen = BTreeSet::new();
    for r in rules {
        for key in &r.keys {
            let family = if key.family == FAMILY_IPV4 {
                Family::V4
            } else {
                Family::V6
            };
            if seen.insert((&r.egress, family))
                && matches!(netdev::forwarding_enabled(&r.egress, family), Ok(false))
            {
                warn!(
                    iface = r.egress,
                    "{family} forwarding is disabled on {}: rules sending there pass their datagrams to the \
                     stack (reason forwarding_disabled); enable it with sysctl",
                    r.egress
                );
            }
        }
    }
}
