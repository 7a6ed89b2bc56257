//! Latency capture: the kernel measures how long forwarded frames take from ingress to the
//! egress device, and how long datagrams and CAN frames take to be queued on and read from
//! local sockets; this module switches it on, keeps its clock offset current, attaches what
//! ends each measurement and names the histogram slots.
//!
//! Capture runs while the agent runs: the egress filters and probes go with it (forwarding
//! does not), and the histograms, pinned, continue when the next agent starts.

mod btf;
pub mod events;
pub mod kernel;
mod stats;

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use aya::{
    Ebpf,
    maps::{Array, HashMap as BpfHashMap, MapData, MapError, PerCpuArray, RingBuf},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, KProbe, ProgramError, RawTracePoint,
    },
};
use edgeplane_common::{
    hist::Log2Hist,
    latency::{
        CAN_QUEUED_PROGRAM, CAN_READ_PROGRAM, CONFIG_MAP, DELIVERY_IFACES_MAP, DELIVERY_MAP,
        DELIVERY_PORTS_MAP, EGRESS_PROGRAM, EVENTS_DROPPED_MAP, EVENTS_RING, KernelOffsets,
        LatencyConfig, MAX_DELIVERY, STAGES, UDP_QUEUED_PROGRAM, UDP_READ_PROGRAM,
        XDP_FLUSH_PROGRAM, flag,
    },
};
use tracing::{info, warn};

pub use self::stats::LatencyCollector;
use crate::{
    config::LatencyCapture,
    host::netdev,
    kernel::attach::{self, AttachError, Attachment, Hook},
    kernel::loader::{self, LoadError},
    kernel::maps,
    kernel::pins::PinDir,
    kernel::slots::Slots,
};

/// A kernel log2 histogram array shared by the code that clears its slots and the collector.
pub type HistMap = Arc<Mutex<Array<MapData, Log2Hist>>>;

/// Takes a forwarding latency histogram array out of the loaded object.
pub fn take_hist(ebpf: &mut Ebpf, name: &'static str) -> Result<HistMap, LoadError> {
    Ok(Arc::new(Mutex::new(maps::take(ebpf, name)?)))
}

#[derive(Debug, thiserror::Error)]
pub enum LatencyError {
    #[error(
        "reading the kernel's BTF at /sys/kernel/btf/vmlinux failed ({0}): socket delivery \
         latency needs a kernel built with CONFIG_DEBUG_INFO_BTF"
    )]
    NoBtf(#[source] io::Error),
    #[error("the kernel's BTF has no usable `{field}`: {reason}")]
    Btf { field: String, reason: String },
    #[error(
        "no cgroup v2 hierarchy and mounting one at /sys/fs/cgroup failed ({0}): UDP socket \
         delivery latency is measured by a cgroup program"
    )]
    Cgroup(#[source] io::Error),
    #[error("reading /proc/kallsyms: {0}")]
    Kallsyms(#[source] io::Error),
    #[error("this kernel has no {0} to probe")]
    NoKprobeTarget(String),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("latency map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("attaching `{program}` to {target} failed: {}", chain(source))]
    Probe {
        program: &'static str,
        target: String,
        source: ProgramError,
    },
    #[error(transparent)]
    Egress(#[from] AttachError),
}

/// An error with its causes, for messages that must say which errno the kernel gave.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> LatencyError {
    move |source| LatencyError::Map { map, source }
}

/// A delivery histogram's owner: a local UDP port or a CAN interface.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum DeliveryTarget {
    UdpPort(u16),
    CanIface(String),
}

impl DeliveryTarget {
    fn key(&self) -> String {
        match self {
            Self::UdpPort(p) => format!("udp:{p}"),
            Self::CanIface(i) => format!("can:{i}"),
        }
    }
}

/// Delivery slots in use, for the collector.
pub type DeliveryView = Arc<RwLock<Vec<(DeliveryTarget, u32)>>>;

/// Kernel probes attached for socket delivery, by the program they run.
#[derive(Default)]
struct Probes {
    attached: BTreeSet<&'static str>,
    failed: BTreeSet<&'static str>,
}

pub struct Latency {
    config: Array<MapData, LatencyConfig>,
    /// Kernel offsets, or why socket delivery and XDP forwarding latency can't be measured.
    offsets: Result<KernelOffsets, String>,
    udp_forward: HistMap,
    can_forward: HistMap,
    delivery: HistMap,
    delivery_ports: BpfHashMap<MapData, u16, u32>,
    delivery_ifaces: BpfHashMap<MapData, u32, u32>,
    delivery_slots: Slots,
    delivery_view: DeliveryView,
    events_dropped: Arc<PerCpuArray<MapData, u64>>,
    ring: Option<RingBuf<MapData>>,
    probes: Probes,
    xdp_flush: bool,
    egress: BTreeMap<String, Attachment>,
    wanted: LatencyCapture,
    rx_timestamps: Option<kernel::RxTimestamps>,
    clock: Option<tokio::task::JoinHandle<()>>,
    pins: PinDir,
}

/// Programs of latency capture: loaded at start, but a kernel that refuses one only loses that
/// measurement (forwarding must not depend on it).
pub const PROGRAMS: [&str; 6] = [
    EGRESS_PROGRAM,
    XDP_FLUSH_PROGRAM,
    UDP_QUEUED_PROGRAM,
    CAN_QUEUED_PROGRAM,
    UDP_READ_PROGRAM,
    CAN_READ_PROGRAM,
];

impl Latency {
    /// Takes latency capture's maps out of the loaded object; the forwarding histograms are
    /// `udp_forward` and `can_forward` (their owners clear them with their rule counters).
    pub fn new(
        ebpf: &mut Ebpf,
        pins: &PinDir,
        udp_forward: HistMap,
        can_forward: HistMap,
    ) -> Result<Self, LatencyError> {
        let delivery_ports: BpfHashMap<MapData, u16, u32> = maps::take(ebpf, DELIVERY_PORTS_MAP)?;
        let delivery_ifaces: BpfHashMap<MapData, u32, u32> = maps::take(ebpf, DELIVERY_IFACES_MAP)?;
        // The maps are pinned: a previous agent's slot owners are what they hold.
        let mut owners = BTreeMap::new();
        for (port, slot) in delivery_ports.iter().flatten() {
            owners.insert(DeliveryTarget::UdpPort(port).key(), slot);
        }
        for (ifindex, slot) in delivery_ifaces.iter().flatten() {
            if let Some(name) = netdev::name(ifindex) {
                owners.insert(DeliveryTarget::CanIface(name).key(), slot);
            }
        }
        let offsets = kernel::offsets().map_err(|e| e.to_string());
        Ok(Self {
            config: maps::take(ebpf, CONFIG_MAP)?,
            offsets,
            udp_forward,
            can_forward,
            delivery: Arc::new(Mutex::new(maps::take(ebpf, DELIVERY_MAP)?)),
            delivery_ports,
            delivery_ifaces,
            delivery_slots: Slots::with_owners(0, MAX_DELIVERY, &owners),
            delivery_view: DeliveryView::default(),
            events_dropped: Arc::new(maps::take(ebpf, EVENTS_DROPPED_MAP)?),
            ring: Some(maps::take(ebpf, EVENTS_RING)?),
            probes: Probes::default(),
            xdp_flush: false,
            egress: BTreeMap::new(),
            wanted: LatencyCapture {
                enabled: false,
                ..LatencyCapture::default()
            },
            rx_timestamps: None,
            clock: None,
            pins: pins.clone(),
        })
    }

    pub fn delivery_view(&self) -> DeliveryView {
        Arc::clone(&self.delivery_view)
    }

    /// The slow-event ring, for the reader (once).
    pub fn take_ring(&mut self) -> Option<RingBuf<MapData>> {
        self.ring.take()
    }

    pub fn collector(
        &self,
        udp: Arc<RwLock<crate::udp_forward::UdpView>>,
        can: Arc<RwLock<crate::can::CanView>>,
        events: Arc<events::EventCounts>,
    ) -> LatencyCollector {
        LatencyCollector {
            udp_forward: Arc::clone(&self.udp_forward),
            can_forward: Arc::clone(&self.can_forward),
            delivery: Arc::clone(&self.delivery),
            delivery_view: Arc::clone(&self.delivery_view),
            events_dropped: Arc::clone(&self.events_dropped),
            events,
            udp,
            can,
        }
    }

    /// Makes `wanted` the capture configuration; `egress` are the interfaces forwarded frames
    /// leave by (each gets `latency_egress`). Failures are reported and leave that part off:
    /// forwarding never depends on latency capture.
    pub fn apply(&mut self, ebpf: &mut Ebpf, wanted: &LatencyCapture, egress: &BTreeSet<String>) {
        let mut flags = 0;
        if wanted.enabled {
            flags |= flag::FORWARDING;
            self.start_clock();
            if let Err(e) = self.attach_egress(ebpf, egress) {
                warn!("forwarding latency: {e}");
            }
            if !self.xdp_flush {
                match self.attach_xdp_flush(ebpf) {
                    Ok(()) => self.xdp_flush = true,
                    Err(e) => warn!("forwarding latency of XDP rules is not measured: {e}"),
                }
            }
        } else {
            self.detach_egress(&BTreeSet::new());
        }
        let delivery = !wanted.udp_ports.is_empty() || !wanted.can_ifaces.is_empty();
        if delivery {
            match self.apply_delivery(ebpf, wanted) {
                Ok(()) => flags |= flag::DELIVERY,
                Err(e) => warn!("socket delivery latency is not measured: {e}"),
            }
        } else {
            *self.delivery_view.write().expect("lock") = Vec::new();
        }
        if flags != 0 && self.rx_timestamps.is_none() {
            match kernel::enable_rx_timestamps() {
                Ok(t) => self.rx_timestamps = Some(t),
                Err(e) => warn!(
                    "receive timestamps unavailable ({e}): latency counts from the first hook"
                ),
            }
        }
        self.write_config(flags, wanted.slow_threshold_us.saturating_mul(1000));
        if *wanted != self.wanted {
            info!(
                forwarding = wanted.enabled,
                delivery_ports = ?wanted.udp_ports,
                delivery_can = ?wanted.can_ifaces,
                slow_us = wanted.slow_threshold_us,
                "latency capture configured"
            );
        }
        self.wanted = wanted.clone();
    }

    fn write_config(&mut self, flags: u32, slow_ns: u64) {
        let value = LatencyConfig {
            flags,
            _pad: 0,
            slow_ns,
            realtime_offset_ns: kernel::realtime_offset_ns(),
            offsets: self.offsets.clone().unwrap_or_default(),
        };
        if let Err(e) = self.config.set(0, value, 0) {
            warn!("latency capture: writing {CONFIG_MAP}: {e}");
        }
    }

    /// Rx timestamps are CLOCK_REALTIME, the programs' clock is CLOCK_MONOTONIC: NTP and
    /// settimeofday move the distance, so it is refreshed every second.
    fn start_clock(&mut self) {
        if self.clock.is_some() {
            return;
        }
        let Ok(config) = aya::maps::MapData::from_pin(self.pins.map(CONFIG_MAP)) else {
            warn!("latency capture: {CONFIG_MAP} is not pinned; the clock offset is not refreshed");
            return;
        };
        let Ok(mut config) =
            Array::<MapData, LatencyConfig>::try_from(aya::maps::Map::Array(config))
        else {
            return;
        };
        self.clock = Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                if let Ok(mut c) = config.get(&0, 0) {
                    c.realtime_offset_ns = kernel::realtime_offset_ns();
                    let _ = config.set(0, c, 0);
                }
            }
        }));
    }

    fn attach_egress(
        &mut self,
        ebpf: &mut Ebpf,
        egress: &BTreeSet<String>,
    ) -> Result<(), LatencyError> {
        self.detach_egress(egress);
        for iface in egress {
            if self.egress.contains_key(iface) {
                continue;
            }
            let Some(ifindex) = netdev::index(iface) else {
                continue;
            };
            let a = attach::attach(
                ebpf,
                &self.pins,
                EGRESS_PROGRAM,
                Hook::TcEgress,
                iface,
                ifindex,
            )?;
            self.egress.insert(iface.clone(), a);
        }
        Ok(())
    }

    /// Detaches `latency_egress` from interfaces not in `keep`.
    fn detach_egress(&mut self, keep: &BTreeSet<String>) {
        let gone: Vec<String> = self
            .egress
            .keys()
            .filter(|i| !keep.contains(*i))
            .cloned()
            .collect();
        for iface in gone {
            if let Some(a) = self.egress.remove(&iface)
                && let Err(e) = attach::detach(a)
            {
                warn!("latency capture: {e}");
            }
        }
    }

    fn attach_xdp_flush(&mut self, ebpf: &mut Ebpf) -> Result<(), LatencyError> {
        self.offsets.clone().map_err(|e| LatencyError::Btf {
            field: "(the offsets latency capture reads)".into(),
            reason: e,
        })?;
        attach_raw_tracepoint(ebpf, XDP_FLUSH_PROGRAM, "xdp_devmap_xmit")
    }

    fn apply_delivery(
        &mut self,
        ebpf: &mut Ebpf,
        wanted: &LatencyCapture,
    ) -> Result<(), LatencyError> {
        if let Err(e) = &self.offsets {
            return Err(LatencyError::Btf {
                field: "kernel offsets".into(),
                reason: e.clone(),
            });
        }
        if !wanted.udp_ports.is_empty() {
            self.attach_probe(ebpf, UDP_QUEUED_PROGRAM, attach_cgroup_ingress);
            self.attach_probe(ebpf, UDP_READ_PROGRAM, |e| {
                attach_raw_tracepoint(e, UDP_READ_PROGRAM, "consume_skb")
            });
        }
        if !wanted.can_ifaces.is_empty() {
            self.attach_probe(ebpf, CAN_QUEUED_PROGRAM, |e| {
                attach_kprobe(
                    e,
                    CAN_QUEUED_PROGRAM,
                    &["sock_queue_rcv_skb_reason", "sock_queue_rcv_skb"],
                )
            });
            self.attach_probe(ebpf, CAN_READ_PROGRAM, |e| {
                attach_kprobe(e, CAN_READ_PROGRAM, &["skb_free_datagram"])
            });
        }
        let targets: Vec<DeliveryTarget> = wanted
            .udp_ports
            .iter()
            .map(|p| DeliveryTarget::UdpPort(*p))
            .chain(
                wanted
                    .can_ifaces
                    .iter()
                    .cloned()
                    .map(DeliveryTarget::CanIface),
            )
            .collect();
        let keys: Vec<String> = targets.iter().map(DeliveryTarget::key).collect();
        self.delivery_slots.retain(|k| keys.iter().any(|w| w == k));
        let fresh = self
            .delivery_slots
            .assign(keys.iter().map(String::as_str))
            .expect("config allows at most MAX_DELIVERY");
        {
            let mut hist = self.delivery.lock().expect("lock");
            for slot in fresh {
                for stage in 0..STAGES {
                    hist.set(slot * STAGES + stage, Log2Hist::default(), 0)
                        .map_err(map_err(DELIVERY_MAP))?;
                }
            }
        }
        let mut view = Vec::new();
        let ports: Vec<u16> = self.delivery_ports.keys().flatten().collect();
        for p in ports {
            if !wanted.udp_ports.contains(&p) {
                let _ = self.delivery_ports.remove(&p);
            }
        }
        let mut ifindexes = BTreeSet::new();
        for (t, key) in targets.iter().zip(&keys) {
            let slot = self.delivery_slots.get(key).expect("assigned above");
            match t {
                DeliveryTarget::UdpPort(p) => {
                    self.delivery_ports
                        .insert(p, slot, 0)
                        .map_err(map_err(DELIVERY_PORTS_MAP))?;
                }
                DeliveryTarget::CanIface(i) => {
                    // A missing interface shows no histogram until it is back.
                    let Some(ifindex) = netdev::index(i) else {
                        continue;
                    };
                    ifindexes.insert(ifindex);
                    self.delivery_ifaces
                        .insert(ifindex, slot, 0)
                        .map_err(map_err(DELIVERY_IFACES_MAP))?;
                }
            }
            view.push((t.clone(), slot));
        }
        let stale: Vec<u32> = self
            .delivery_ifaces
            .keys()
            .flatten()
            .filter(|i| !ifindexes.contains(i))
            .collect();
        for i in stale {
            let _ = self.delivery_ifaces.remove(&i);
        }
        *self.delivery_view.write().expect("lock") = view;
        Ok(())
    }

    /// Attaches one stage's program once; a kernel without its hook loses that stage only
    /// (reported once), the other stages go on.
    fn attach_probe(
        &mut self,
        ebpf: &mut Ebpf,
        program: &'static str,
        attach: impl FnOnce(&mut Ebpf) -> Result<(), LatencyError>,
    ) {
        if self.probes.attached.contains(program) || self.probes.failed.contains(program) {
            return;
        }
        match attach(ebpf) {
            Ok(()) => {
                self.probes.attached.insert(program);
            }
            Err(e) => {
                warn!("a socket delivery stage is not measured: {e}");
                self.probes.failed.insert(program);
            }
        }
    }

    /// Switches capture off and removes the egress filters: forwarding keeps running without
    /// it (the probes go with the agent's process).
    pub fn stop(&mut self) {
        if let Some(c) = self.clock.take() {
            c.abort();
        }
        self.detach_egress(&BTreeSet::new());
        self.write_config(0, 0);
    }
}

fn program_err(program: &'static str, target: &str) -> impl FnOnce(ProgramError) -> LatencyError {
    let target = target.to_owned();
    move |source| LatencyError::Probe {
        program,
        target,
        source,
    }
}

/// A raw tracepoint, attached by name (no tracefs, which only root may read).
fn attach_raw_tracepoint(
    ebpf: &mut Ebpf,
    program: &'static str,
    name: &str,
) -> Result<(), LatencyError> {
    let target = format!("raw tracepoint {name}");
    let p: &mut RawTracePoint = ebpf
        .program_mut(program)
        .ok_or(LoadError::MissingProgram(program))?
        .try_into()
        .map_err(program_err(program, &target))?;
    p.attach(name).map_err(program_err(program, &target))?;
    Ok(())
}

/// `delivery_udp_queued` on the root of the cgroup v2 hierarchy: every socket of the host.
fn attach_cgroup_ingress(ebpf: &mut Ebpf) -> Result<(), LatencyError> {
    let program = UDP_QUEUED_PROGRAM;
    let root = kernel::cgroup2_root()?;
    let target = format!("cgroup {} ingress", root.display());
    let cgroup = std::fs::File::open(&root).map_err(|source| LatencyError::Probe {
        program,
        target: target.clone(),
        source: ProgramError::IOError(source),
    })?;
    let p: &mut CgroupSkb = ebpf
        .program_mut(program)
        .ok_or(LoadError::MissingProgram(program))?
        .try_into()
        .map_err(program_err(program, &target))?;
    // Through a bpf_link (5.7+) programs always stack, and the kernel wants no mode flag.
    p.attach(
        &cgroup,
        CgroupSkbAttachType::Ingress,
        CgroupAttachMode::Single,
    )
    .map_err(program_err(program, &target))?;
    Ok(())
}

fn attach_kprobe(
    ebpf: &mut Ebpf,
    program: &'static str,
    candidates: &[&'static str],
) -> Result<(), LatencyError> {
    let function = kernel::kprobe_target(candidates)?;
    let target = format!("kprobe {function}");
    let p: &mut KProbe = ebpf
        .program_mut(program)
        .ok_or(LoadError::MissingProgram(program))?
        .try_into()
        .map_err(program_err(program, &target))?;
    p.attach(function, 0)
        .map_err(program_err(program, &target))?;
    Ok(())
}

/// Loads latency capture's programs; one the kernel refuses is reported and left out.
pub fn load_programs(ebpf: &mut Ebpf, pins: &PinDir) {
    for name in PROGRAMS {
        if let Err(e) = loader::load_program(ebpf, name) {
            warn!("latency capture: {e}");
            continue;
        }
        let path = pins.program(name);
        let _ = std::fs::remove_file(&path);
        if let Some(p) = ebpf.program_mut(name)
            && let Err(e) = p.pin(&path)
        {
            warn!("latency capture: pinning {name}: {e}");
        }
    }
}
