//! Per-interface host metrics and CAN controller metrics, read from the kernel at scrape time.
//!
//! One rtnetlink dump (RTM_GETLINK) per scrape answers everything: each interface's 64-bit
//! counters (IFLA_STATS64), transmit queue length and operational state, and for CAN
//! controllers the state, error counters and bit rate the driver reports under IFLA_LINKINFO
//! (kind `can`). Virtual CAN devices (vcan, vxcan) have kinds of their own and no controller,
//! so they get the interface metrics only.

use std::{
    io,
    sync::{Arc, RwLock},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};
use tracing::warn;

use crate::sys::netlink::{self, Attrs, NLM_F_DUMP, NLM_F_REQUEST, NetlinkError, RecvError};

use libc::{
    IFLA_IFNAME, IFLA_INFO_DATA, IFLA_INFO_KIND, IFLA_INFO_XSTATS, IFLA_LINKINFO, IFLA_OPERSTATE,
    IFLA_STATS64, IFLA_TXQLEN, RTM_GETLINK, RTM_NEWLINK,
};

// linux/can/netlink.h: attributes nested in IFLA_INFO_DATA of a `can` link (libc: c_int).
const IFLA_CAN_BITTIMING: u16 = libc::IFLA_CAN_BITTIMING as u16;
const IFLA_CAN_STATE: u16 = libc::IFLA_CAN_STATE as u16;
const IFLA_CAN_BERR_COUNTER: u16 = libc::IFLA_CAN_BERR_COUNTER as u16;

/// struct ifinfomsg: family, pad, type, index, flags, change.
const IFINFOMSG_LEN: usize = size_of::<libc::ifinfomsg>();
/// IF_OPER_* (linux/if.h, RFC 2863 operational states): up.
const IF_OPER_UP: u8 = libc::IF_OPER_UP as u8;
/// IFLA_INFO_KIND of CAN controllers' netdevs (drivers/net/can/dev/netlink.c).
const CAN_LINK_KIND: &str = "can";

/// Room for one dump batch: the kernel fills at most 32 KiB per read (less the skb overhead)
/// unless a single interface needs more, which MSG_TRUNC reports.
const RECV_BUFFER: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HostStatsError {
    #[error(
        "cannot open an rtnetlink socket to read interface counters: {0}; the agent's host \
         metrics need NETLINK_ROUTE, which a seccomp or LSM policy may forbid"
    )]
    Socket(#[source] io::Error),
    #[error("asking the kernel for its interfaces (RTM_GETLINK dump) failed: {0}")]
    Request(#[source] io::Error),
    #[error("the kernel refused the interface dump (RTM_GETLINK): {0}")]
    Refused(#[source] io::Error),
    #[error(
        "an interface dump message of {len} bytes did not fit the {RECV_BUFFER}-byte buffer; \
         please report it with the output of `ip -d -s link`"
    )]
    Truncated { len: usize },
    #[error(
        "malformed message in the interface dump ({0}); please report it with the kernel \
         version (`uname -r`)"
    )]
    Malformed(#[from] NetlinkError),
}

/// struct rtnl_link_stats64's first eight counters (the struct grows at its end).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkCounters {
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_errors: u64,
    pub tx_errors: u64,
    pub rx_dropped: u64,
    pub tx_dropped: u64,
}

/// enum can_state in linux/can/netlink.h, in its order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CanState {
    ErrorActive,
    ErrorWarning,
    ErrorPassive,
    BusOff,
    Stopped,
    Sleeping,
}

impl CanState {
    pub const ALL: [Self; 6] = [
        Self::ErrorActive,
        Self::ErrorWarning,
        Self::ErrorPassive,
        Self::BusOff,
        Self::Stopped,
        Self::Sleeping,
    ];

    fn from_kernel(v: u32) -> Option<Self> {
        Self::ALL.get(usize::try_from(v).ok()?).copied()
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::ErrorActive => "error_active",
            Self::ErrorWarning => "error_warning",
            Self::ErrorPassive => "error_passive",
            Self::BusOff => "bus_off",
            Self::Stopped => "stopped",
            Self::Sleeping => "sleeping",
        }
    }
}

/// struct can_device_stats: how often the controller went through each error state, lost
/// arbitration, and was restarted. The kernel keeps them as u32.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CanDeviceStats {
    pub bus_error: u32,
    pub error_warning: u32,
    pub error_passive: u32,
    pub bus_off: u32,
    pub arbitration_lost: u32,
    pub restarts: u32,
}

/// What a CAN controller's driver reports; each part only where the driver has it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CanController {
    /// None for a state this agent does not know (a newer kernel's).
    pub state: Option<CanState>,
    /// Transmit and receive error counters (TEC, REC), struct can_berr_counter: only drivers
    /// that can read them from the controller report them.
    pub berr: Option<(u16, u16)>,
    /// Bits per second, once a bit rate was set.
    pub bitrate: Option<u32>,
    pub device_stats: Option<CanDeviceStats>,
}

/// One interface as its RTM_NEWLINK message describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    pub counters: Option<LinkCounters>,
    pub tx_queue_len: Option<u32>,
    /// IF_OPER_* (RFC 2863): 6 is up.
    pub oper_state: Option<u8>,
    /// Present for CAN controllers (link kind `can`), not for virtual CAN devices.
    pub can: Option<CanController>,
}

impl Link {
    pub fn is_up(&self) -> bool {
        self.oper_state == Some(IF_OPER_UP)
    }
}

/// Dumps every interface of the calling thread's network namespace and returns those whose
/// name `wanted` accepts, in the kernel's order.
pub fn links(wanted: impl Fn(&str) -> bool) -> Result<Vec<Link>, HostStatsError> {
    let socket = netlink::Socket::route().map_err(HostStatsError::Socket)?;
    let request = netlink::Request::new(RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, 1)
        .fixed(&[0u8; IFINFOMSG_LEN]) // AF_UNSPEC: every interface
        .finish();
    socket.send(&request).map_err(HostStatsError::Request)?;

    let mut out = Vec::new();
    let mut buf = vec![0u8; RECV_BUFFER];
    loop {
        let batch = socket.recv(&mut buf).map_err(|e| match e {
            RecvError::Io(e) => HostStatsError::Request(e),
            RecvError::Truncated { len, .. } => HostStatsError::Truncated { len },
        })?;
        if parse_batch(batch, &wanted, &mut out)? {
            return Ok(out);
        }
    }
}

/// Parses one read of the dump into `out`; true once the dump is complete.
pub(crate) fn parse_batch(
    batch: &[u8],
    wanted: &impl Fn(&str) -> bool,
    out: &mut Vec<Link>,
) -> Result<bool, HostStatsError> {
    netlink::read_dump(batch, HostStatsError::Refused, |msg| {
        if msg.ty == RTM_NEWLINK {
            let (_, attrs) = msg.split::<IFINFOMSG_LEN>("RTM_NEWLINK's struct ifinfomsg")?;
            out.extend(parse_link(attrs, wanted)?);
        }
        Ok(())
    })
}

/// Parses an RTM_NEWLINK message's attributes; None when the interface is not wanted.
fn parse_link(
    attrs: Attrs<'_>,
    wanted: &impl Fn(&str) -> bool,
) -> Result<Option<Link>, NetlinkError> {
    let name = attrs
        .clone()
        .first(IFLA_IFNAME)?
        .ok_or(NetlinkError::Missing("an interface's IFLA_IFNAME"))?
        .string();
    if !wanted(&name) {
        return Ok(None);
    }
    let mut link = Link {
        name: name.into_owned(),
        ..Link::default()
    };
    for a in attrs {
        let a = a?;
        match a.ty {
            IFLA_STATS64 => link.counters = Some(parse_counters(&a)?),
            IFLA_TXQLEN => link.tx_queue_len = Some(a.u32()?),
            IFLA_OPERSTATE => link.oper_state = Some(a.u8()?),
            IFLA_LINKINFO => link.can = parse_can(a.nested())?,
            _ => {}
        }
    }
    Ok(Some(link))
}

fn parse_counters(a: &netlink::Attr<'_>) -> Result<LinkCounters, NetlinkError> {
    Ok(LinkCounters {
        rx_packets: a.u64_at(0)?,
        tx_packets: a.u64_at(1)?,
        rx_bytes: a.u64_at(2)?,
        tx_bytes: a.u64_at(3)?,
        rx_errors: a.u64_at(4)?,
        tx_errors: a.u64_at(5)?,
        rx_dropped: a.u64_at(6)?,
        tx_dropped: a.u64_at(7)?,
    })
}

/// The controller facts in IFLA_LINKINFO, when the link's kind is `can`.
fn parse_can(linkinfo: Attrs<'_>) -> Result<Option<CanController>, NetlinkError> {
    let Some(kind) = linkinfo.clone().first(IFLA_INFO_KIND)? else {
        return Ok(None);
    };
    if kind.string() != CAN_LINK_KIND {
        return Ok(None);
    }
    let mut can = CanController::default();
    for a in linkinfo {
        let a = a?;
        match a.ty {
            IFLA_INFO_DATA => {
                for a in a.nested() {
                    let a = a?;
                    match a.ty {
                        IFLA_CAN_STATE => can.state = CanState::from_kernel(a.u32()?),
                        // struct can_berr_counter { __u16 txerr; __u16 rxerr; }
                        IFLA_CAN_BERR_COUNTER => {
                            let [t0, t1, r0, r1] = a.array()?;
                            can.berr =
                                Some((u16::from_ne_bytes([t0, t1]), u16::from_ne_bytes([r0, r1])));
                        }
                        // struct can_bittiming starts with __u32 bitrate.
                        IFLA_CAN_BITTIMING => can.bitrate = Some(a.u32()?),
                        _ => {}
                    }
                }
            }
            // struct can_device_stats
            IFLA_INFO_XSTATS => {
                can.device_stats = Some(CanDeviceStats {
                    bus_error: a.u32_at(0)?,
                    error_warning: a.u32_at(1)?,
                    error_passive: a.u32_at(2)?,
                    bus_off: a.u32_at(3)?,
                    arbitration_lost: a.u32_at(4)?,
                    restarts: a.u32_at(5)?,
                });
            }
            _ => {}
        }
    }
    Ok(Some(can))
}

/// Exports the interfaces the running config names, one rtnetlink dump per scrape.
pub struct HostCollector {
    /// Sorted names, from [`crate::config::Config::interfaces`]; an interface that is missing
    /// right now has no series.
    pub interfaces: Arc<RwLock<Vec<String>>>,
}

impl std::fmt::Debug for HostCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostCollector").finish_non_exhaustive()
    }
}

type CounterOf = fn(&LinkCounters) -> u64;
type DeviceStatOf = fn(&CanDeviceStats) -> u32;

impl Collector for HostCollector {
    fn encode(&self, encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let names = self.interfaces.read().expect("lock").clone();
        if names.is_empty() {
            return Ok(());
        }
        let mut links = match links(|n| names.binary_search_by(|w| w.as_str().cmp(n)).is_ok()) {
            Ok(l) => l,
            Err(e) => {
                warn!("host metrics: {e}");
                return Ok(());
            }
        };
        links.sort_by(|a, b| a.name.cmp(&b.name));
        encode_links(&links, encoder)
    }
}

/// The series of `links` (sorted by name).
fn encode_links(links: &[Link], mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
    let counters: [(&str, &str, CounterOf); 8] = [
        (
            "interface_receive_packets",
            "Packets the interface received (the kernel's rx_packets)",
            |c| c.rx_packets,
        ),
        (
            "interface_transmit_packets",
            "Packets the interface transmitted (tx_packets)",
            |c| c.tx_packets,
        ),
        (
            "interface_receive_bytes",
            "Bytes the interface received (rx_bytes; CAN: payload bytes)",
            |c| c.rx_bytes,
        ),
        (
            "interface_transmit_bytes",
            "Bytes the interface transmitted (tx_bytes; CAN: payload bytes)",
            |c| c.tx_bytes,
        ),
        (
            "interface_receive_dropped",
            "Received packets the interface or the stack dropped (rx_dropped)",
            |c| c.rx_dropped,
        ),
        (
            "interface_transmit_dropped",
            "Packets dropped on their way out of the interface (tx_dropped)",
            |c| c.tx_dropped,
        ),
        (
            "interface_receive_errors",
            "Receive errors the driver counted (rx_errors)",
            |c| c.rx_errors,
        ),
        (
            "interface_transmit_errors",
            "Transmit errors the driver counted (tx_errors)",
            |c| c.tx_errors,
        ),
    ];
    for (name, help, value) in counters {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for l in links {
            if let Some(c) = &l.counters {
                ConstCounter::new(value(c))
                    .encode(family.encode_family(&[("iface", l.name.as_str())])?)?;
            }
        }
    }
    let mut family = encoder.encode_descriptor(
        "interface_tx_queue_length",
        "Length of the interface's transmit queue in packets (txqueuelen)",
        None,
        MetricType::Gauge,
    )?;
    for l in links {
        if let Some(q) = l.tx_queue_len {
            ConstGauge::new(q).encode(family.encode_family(&[("iface", l.name.as_str())])?)?;
        }
    }
    let mut family = encoder.encode_descriptor(
        "interface_up",
        "1 when the interface's operational state is up, 0 otherwise (down, no carrier, \
             or unknown as virtual devices without a carrier report)",
        None,
        MetricType::Gauge,
    )?;
    for l in links {
        ConstGauge::new(i64::from(l.is_up()))
            .encode(family.encode_family(&[("iface", l.name.as_str())])?)?;
    }

    let controllers: Vec<(&str, &CanController)> = links
        .iter()
        .filter_map(|l| Some((l.name.as_str(), l.can.as_ref()?)))
        .collect();
    let mut family = encoder.encode_descriptor(
        "can_controller_state",
        "1 for the CAN controller's current state, 0 for the others",
        None,
        MetricType::Gauge,
    )?;
    for (iface, c) in &controllers {
        for s in CanState::ALL {
            ConstGauge::new(i64::from(c.state == Some(s)))
                .encode(family.encode_family(&[("iface", *iface), ("state", s.label())])?)?;
        }
    }
    for (name, help, pick) in [
        (
            "can_controller_tx_errors",
            "The CAN controller's transmit error counter (TEC)",
            (|b: (u16, u16)| b.0) as fn((u16, u16)) -> u16,
        ),
        (
            "can_controller_rx_errors",
            "The CAN controller's receive error counter (REC)",
            |b| b.1,
        ),
    ] {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (iface, c) in &controllers {
            if let Some(b) = c.berr {
                ConstGauge::new(i64::from(pick(b)))
                    .encode(family.encode_family(&[("iface", *iface)])?)?;
            }
        }
    }
    let device_stats: [(&str, &str, DeviceStatOf); 6] = [
        (
            "can_controller_bus_errors",
            "Bus errors the CAN controller signalled",
            |s| s.bus_error,
        ),
        (
            "can_controller_error_warning",
            "Changes of the CAN controller to the error-warning state (a counter reached 96)",
            |s| s.error_warning,
        ),
        (
            "can_controller_error_passive",
            "Changes of the CAN controller to the error-passive state (a counter reached 128)",
            |s| s.error_passive,
        ),
        (
            "can_controller_bus_off",
            "Times the CAN controller went bus-off (TEC reached 256)",
            |s| s.bus_off,
        ),
        (
            "can_controller_arbitration_lost",
            "Arbitrations the CAN controller lost",
            |s| s.arbitration_lost,
        ),
        (
            "can_controller_restarts",
            "Restarts of the CAN controller after bus-off",
            |s| s.restarts,
        ),
    ];
    for (name, help, value) in device_stats {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (iface, c) in &controllers {
            if let Some(s) = &c.device_stats {
                ConstCounter::new(value(s)).encode(family.encode_family(&[("iface", *iface)])?)?;
            }
        }
    }
    let mut family = encoder.encode_descriptor(
        "can_controller_bitrate_bits_per_second",
        "The CAN controller's configured (nominal) bit rate",
        None,
        MetricType::Gauge,
    )?;
    for (iface, c) in &controllers {
        if let Some(b) = c.bitrate {
            ConstGauge::new(b).encode(family.encode_family(&[("iface", *iface)])?)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;

    use super::*;
    use crate::{
        metrics::{self, AgentMetrics},
        sys::netlink::{NLA_F_NESTED, NLMSG_DONE, NLMSG_ERROR},
    };

    fn sysfs(iface: &str, attr: &str) -> String {
        std::fs::read_to_string(format!("/sys/class/net/{iface}/{attr}"))
            .unwrap()
            .trim()
            .to_owned()
    }

    fn lo() -> Link {
        let mut links = links(|n| n == "lo").unwrap();
        assert_eq!(links.len(), 1, "{links:?}");
        links.pop().unwrap()
    }

    #[test]
    fn the_dump_reads_loopback_like_sysfs_and_sees_datagrams_arrive() {
        let before = lo();
        assert_eq!(
            before.tx_queue_len,
            Some(sysfs("lo", "tx_queue_len").parse().unwrap())
        );
        // Loopback has no carrier to report: its operational state is "unknown" (0).
        assert_eq!(sysfs("lo", "operstate"), "unknown");
        assert_eq!(before.oper_state, Some(0));
        assert!(!before.is_up());
        assert_eq!(before.can, None);

        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        const DATAGRAMS: u64 = 5;
        for _ in 0..DATAGRAMS {
            tx.send_to(&[0u8; 100], rx.local_addr().unwrap()).unwrap();
        }
        let after = lo().counters.unwrap();
        let sysfs_rx: u64 = sysfs("lo", "statistics/rx_packets").parse().unwrap();
        let before = before.counters.unwrap();
        assert!(after.rx_packets >= before.rx_packets + DATAGRAMS);
        assert!(after.tx_packets >= before.tx_packets + DATAGRAMS);
        // Each is an IPv4 + UDP header and 100 bytes: loopback counts a packet after it has
        // taken its Ethernet header off (eth_type_trans in loopback_xmit).
        let bytes = DATAGRAMS * (20 + 8 + 100);
        assert!(
            after.rx_bytes >= before.rx_bytes + bytes,
            "{before:?} {after:?}"
        );
        assert!(
            after.tx_bytes >= before.tx_bytes + bytes,
            "{before:?} {after:?}"
        );
        assert!(after.rx_packets <= sysfs_rx);
    }

    #[test]
    fn only_wanted_interfaces_are_kept() {
        assert!(links(|_| false).unwrap().is_empty());
        let all = links(|_| true).unwrap();
        assert!(all.iter().any(|l| l.name == "lo"), "{all:?}");
    }

    #[test]
    fn the_collector_exports_the_configured_interfaces_present() {
        let interfaces = Arc::new(RwLock::new(vec!["lo".to_owned(), "no-such-if0".to_owned()]));
        let registry = metrics::registry(
            &AgentMetrics::default(),
            vec![Box::new(HostCollector {
                interfaces: Arc::clone(&interfaces),
            })],
        );
        let text = metrics::to_prometheus_text(&metrics::render(&registry));
        let qlen = sysfs("lo", "tx_queue_len");
        for series in [
            "edgeplane_interface_receive_packets_total{iface=\"lo\"} ",
            "edgeplane_interface_transmit_errors_total{iface=\"lo\"} 0",
            &format!("edgeplane_interface_tx_queue_length{{iface=\"lo\"}} {qlen}"),
            "edgeplane_interface_up{iface=\"lo\"} 0",
        ] {
            assert!(text.contains(series), "{series} missing from:\n{text}");
        }
        assert!(!text.contains("no-such-if0"), "{text}");
        assert!(!text.contains("edgeplane_can_controller_state{"), "{text}");

        interfaces.write().unwrap().clear();
        let text = metrics::render(&registry);
        assert!(!text.contains("edgeplane_interface"), "{text}");
    }

    /// A netlink attribute, padded.
    fn attr(ty: u16, payload: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        netlink::put_attr(&mut a, ty, payload);
        a
    }

    fn u32s(v: &[u32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_ne_bytes()).collect()
    }

    /// An RTM_NEWLINK message as a CAN controller's driver has the kernel write it (with
    /// figures the VM's emulated controllers never reach: they have no bus errors), followed by
    /// NLMSG_DONE.
    fn controller_dump(name: &str, kind: &str, state: u32) -> Vec<u8> {
        let mut stats64 = Vec::new();
        for v in [1000u64, 900, 8000, 7200, 3, 2, 5, 4] {
            stats64.extend_from_slice(&v.to_ne_bytes());
        }
        // struct rtnl_link_stats64 has more fields after the eight the agent reads.
        stats64.resize(24 * 8, 0);
        let mut bittiming = u32s(&[250_000]);
        bittiming.resize(32, 0);
        let data = [
            attr(IFLA_CAN_BITTIMING, &bittiming),
            attr(IFLA_CAN_STATE, &u32s(&[state])),
            attr(
                IFLA_CAN_BERR_COUNTER,
                &[130u16.to_ne_bytes(), 7u16.to_ne_bytes()].concat(),
            ),
        ]
        .concat();
        let linkinfo = [
            attr(IFLA_INFO_KIND, format!("{kind}\0").as_bytes()),
            attr(IFLA_INFO_DATA | NLA_F_NESTED, &data),
            attr(IFLA_INFO_XSTATS, &u32s(&[11, 3, 2, 1, 4, 1])),
        ]
        .concat();
        let mut dump = netlink::Request::new(RTM_NEWLINK, 0, 0)
            .fixed(&[0u8; IFINFOMSG_LEN])
            .attr(IFLA_IFNAME, format!("{name}\0").as_bytes())
            .attr(IFLA_TXQLEN, &u32s(&[10]))
            .attr(IFLA_OPERSTATE, &[IF_OPER_UP])
            .attr(IFLA_LINKINFO | NLA_F_NESTED, &linkinfo)
            .attr(IFLA_STATS64, &stats64)
            .finish();
        dump.extend(
            netlink::Request::new(NLMSG_DONE, 0, 0)
                .fixed(&[0u8; 4])
                .finish(),
        );
        dump
    }

    fn parse(dump: &[u8]) -> Vec<Link> {
        let mut out = Vec::new();
        assert!(parse_batch(dump, &|_: &str| true, &mut out).unwrap());
        out
    }

    #[test]
    fn a_controllers_state_error_counters_and_statistics_are_read() {
        let links = parse(&controller_dump("can0", "can", 2));
        assert_eq!(
            links,
            [Link {
                name: "can0".into(),
                counters: Some(LinkCounters {
                    rx_packets: 1000,
                    tx_packets: 900,
                    rx_bytes: 8000,
                    tx_bytes: 7200,
                    rx_errors: 3,
                    tx_errors: 2,
                    rx_dropped: 5,
                    tx_dropped: 4,
                }),
                tx_queue_len: Some(10),
                oper_state: Some(IF_OPER_UP),
                can: Some(CanController {
                    state: Some(CanState::ErrorPassive),
                    berr: Some((130, 7)),
                    bitrate: Some(250_000),
                    device_stats: Some(CanDeviceStats {
                        bus_error: 11,
                        error_warning: 3,
                        error_passive: 2,
                        bus_off: 1,
                        arbitration_lost: 4,
                        restarts: 1,
                    }),
                }),
            }]
        );
        // A state of a newer kernel: no state series, the rest stays.
        let links = parse(&controller_dump("can0", "can", 9));
        let can = links[0].can.unwrap();
        assert_eq!((can.state, can.berr), (None, Some((130, 7))));
        // Virtual CAN devices have no controller.
        let links = parse(&controller_dump("vcan0", "vcan", 0));
        assert_eq!(links[0].can, None);
        assert_eq!(links[0].counters.unwrap().tx_packets, 900);
        // An interface nobody asked for is skipped.
        let mut out = Vec::new();
        assert!(
            parse_batch(
                &controller_dump("can0", "can", 0),
                &|_: &str| false,
                &mut out
            )
            .unwrap()
        );
        assert!(out.is_empty());
    }

    #[test]
    fn truncated_messages_are_refused() {
        let dump = controller_dump("can0", "can", 0);
        let mut out = Vec::new();
        assert!(matches!(
            parse_batch(&dump[..40], &|_: &str| true, &mut out),
            Err(HostStatsError::Malformed(_))
        ));
        // Every cut: an error, or (between the messages) a dump not yet complete.
        for cut in 0..dump.len() {
            let mut out = Vec::new();
            match parse_batch(&dump[..cut], &|_: &str| true, &mut out) {
                Ok(done) => assert!(!done, "cut {cut}"),
                Err(e) => assert!(matches!(e, HostStatsError::Malformed(_)), "cut {cut}: {e}"),
            }
        }
    }

    #[test]
    fn malformed_attributes_and_errors_are_refused() {
        let parse_err = |dump: &[u8]| {
            let mut out = Vec::new();
            match parse_batch(dump, &|_: &str| true, &mut out) {
                Err(HostStatsError::Malformed(e)) => e,
                other => panic!("expected Malformed, got {other:?}"),
            }
        };
        let link = |attrs: &[(u16, &[u8])]| {
            let mut r = netlink::Request::new(RTM_NEWLINK, 0, 0).fixed(&[0u8; IFINFOMSG_LEN]);
            for (ty, payload) in attrs {
                r = r.attr(*ty, payload);
            }
            r.finish()
        };
        assert_eq!(
            parse_err(&link(&[(IFLA_TXQLEN, &[1, 0])])),
            NetlinkError::Missing("an interface's IFLA_IFNAME")
        );
        assert_eq!(
            parse_err(&link(&[(IFLA_IFNAME, b"lo\0"), (IFLA_TXQLEN, &[1, 0])])),
            NetlinkError::ShortAttr {
                ty: IFLA_TXQLEN,
                len: 2,
                need: 4
            }
        );
        assert!(matches!(
            parse_err(&link(&[(IFLA_IFNAME, b"lo\0"), (IFLA_STATS64, &[0; 60])])),
            NetlinkError::ShortAttr { need: 64, .. }
        ));
        assert!(matches!(
            parse_err(&link(&[(IFLA_IFNAME, b"lo\0"), (IFLA_OPERSTATE, &[])])),
            NetlinkError::ShortAttr { need: 1, .. }
        ));
        // A CAN link whose error counters are cut short.
        let mut linkinfo = attr(IFLA_INFO_KIND, b"can\0");
        linkinfo.extend(attr(IFLA_INFO_DATA, &attr(IFLA_CAN_BERR_COUNTER, &[1, 0])));
        assert!(matches!(
            parse_err(&link(&[
                (IFLA_IFNAME, b"can0\0"),
                (IFLA_LINKINFO, &linkinfo)
            ])),
            NetlinkError::ShortAttr { need: 4, .. }
        ));
        // A body shorter than struct ifinfomsg.
        let short = netlink::Request::new(RTM_NEWLINK, 0, 0)
            .fixed(&[0; 8])
            .finish();
        assert!(matches!(
            parse_err(&short),
            NetlinkError::Short { need: 16, .. }
        ));
        // NLMSG_ERROR without its error code, and with one.
        let error = netlink::Request::new(NLMSG_ERROR, 0, 0);
        assert!(matches!(
            parse_err(&error.finish()),
            NetlinkError::Short { need: 4, .. }
        ));
        let refused = netlink::Request::new(NLMSG_ERROR, 0, 0)
            .fixed(&(-libc::EPERM).to_ne_bytes())
            .finish();
        let mut out = Vec::new();
        match parse_batch(&refused, &|_: &str| true, &mut out) {
            Err(HostStatsError::Refused(e)) => assert_eq!(e.raw_os_error(), Some(libc::EPERM)),
            other => panic!("{other:?}"),
        }
    }

    /// Renders fixed links, as the collector renders what the kernel reports.
    struct Fixed(Vec<Link>);

    impl std::fmt::Debug for Fixed {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Fixed")
        }
    }

    impl Collector for Fixed {
        fn encode(&self, encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            encode_links(&self.0, encoder)
        }
    }

    #[test]
    fn controller_series_are_named_and_labelled_as_documented() {
        let mut links = parse(&controller_dump("can0", "can", 3));
        links.extend(parse(&controller_dump("vcan0", "vcan", 0)));
        let registry = metrics::registry(&AgentMetrics::default(), vec![Box::new(Fixed(links))]);
        let text = metrics::to_prometheus_text(&metrics::render(&registry));
        for series in [
            "edgeplane_interface_receive_packets_total{iface=\"can0\"} 1000",
            "edgeplane_interface_transmit_packets_total{iface=\"vcan0\"} 900",
            "edgeplane_interface_receive_errors_total{iface=\"can0\"} 3",
            "edgeplane_interface_transmit_dropped_total{iface=\"can0\"} 4",
            "edgeplane_interface_tx_queue_length{iface=\"can0\"} 10",
            "edgeplane_interface_up{iface=\"can0\"} 1",
            "edgeplane_can_controller_state{iface=\"can0\",state=\"bus_off\"} 1",
            "edgeplane_can_controller_state{iface=\"can0\",state=\"error_active\"} 0",
            "edgeplane_can_controller_tx_errors{iface=\"can0\"} 130",
            "edgeplane_can_controller_rx_errors{iface=\"can0\"} 7",
            "edgeplane_can_controller_bus_errors_total{iface=\"can0\"} 11",
            "edgeplane_can_controller_error_warning_total{iface=\"can0\"} 3",
            "edgeplane_can_controller_error_passive_total{iface=\"can0\"} 2",
            "edgeplane_can_controller_bus_off_total{iface=\"can0\"} 1",
            "edgeplane_can_controller_arbitration_lost_total{iface=\"can0\"} 4",
            "edgeplane_can_controller_restarts_total{iface=\"can0\"} 1",
            "edgeplane_can_controller_bitrate_bits_per_second{iface=\"can0\"} 250000",
        ] {
            assert!(text.contains(series), "{series} missing from:\n{text}");
        }
        assert_eq!(
            text.matches("edgeplane_can_controller_state{").count(),
            CanState::ALL.len()
        );
        assert!(!text.contains("edgeplane_can_controller_tx_errors{iface=\"vcan0\""));
    }
}
