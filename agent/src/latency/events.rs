//! The slow-event stream: frames above `latency.slow_threshold_us`, read from the kernel's ring
//! buffer and fanned out to `GET /events` clients as JSON lines.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
};

use aya::maps::{MapData, RingBuf};
use edgeplane_common::latency::{FlowKey, LatencyEvent, event};
use serde::Serialize;
use tokio::{io::unix::AsyncFd, sync::broadcast};
use tracing::warn;

use super::DeliveryView;
use crate::{can::CanView, host::netdev, udp_forward::UdpView};

/// Events kept for a slow client before it misses some (it is told how many).
const BACKLOG: usize = 4096;

#[derive(Debug, Default)]
pub struct EventCounts {
    /// Events read from the ring.
    pub received: AtomicU64,
}

/// One slow frame, as clients see it.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// `udp_forward`, `can_forward`, `udp_delivery` or `can_delivery`.
    pub kind: &'static str,
    /// The rule or route (forwarding), or `udp:PORT` / `can:IFACE` (delivery).
    pub target: String,
    /// Total: from the receive timestamp (or the first hook) to the end.
    pub latency_us: f64,
    /// Receive timestamp to the ingress hook (forwarding) or to the socket queue (delivery);
    /// absent without a receive timestamp.
    pub rx_to_hook_us: Option<f64>,
    /// Hook (or socket queue) to egress (or the application's read).
    pub hook_to_done_us: Option<f64>,
    pub flow: Flow,
    /// CLOCK_MONOTONIC ns when it ended.
    pub done_ns: u64,
}

#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Flow {
    Udp {
        iface: Option<String>,
        src: Option<String>,
        dst: Option<String>,
        src_port: u16,
        dst_port: u16,
    },
    Can {
        iface: Option<String>,
        id: String,
    },
}

/// Names an event's slot: a rule, route or delivery target.
#[derive(Clone)]
pub struct Names {
    pub udp: Arc<RwLock<UdpView>>,
    pub can: Arc<RwLock<CanView>>,
    pub delivery: DeliveryView,
}

impl Names {
    fn of(&self, kind: u32, slot: u32) -> String {
        let found = match kind {
            event::UDP_FORWARD => self
                .udp
                .read()
                .expect("lock")
                .rules
                .iter()
                .find(|r| r.slot == slot)
                .map(|r| r.name.clone()),
            event::CAN_FORWARD => self
                .can
                .read()
                .expect("lock")
                .routes
                .iter()
                .find(|r| r.slot == slot)
                .map(|r| r.name.clone()),
            _ => self
                .delivery
                .read()
                .expect("lock")
                .iter()
                .find(|(_, s)| *s == slot)
                .map(|(t, _)| t.key()),
        };
        found.unwrap_or_else(|| format!("slot {slot}"))
    }
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

fn ip(words: &[u16; 8], family: u8) -> Option<String> {
    let b: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    match family {
        4 => Some(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])).to_string()),
        6 => Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&b[..]).ok()?)).to_string()),
        _ => None,
    }
}

fn flow(kind: u32, f: &FlowKey) -> Flow {
    let iface = (f.ifindex != 0).then(|| netdev::name(f.ifindex)).flatten();
    if kind == event::CAN_FORWARD || kind == event::CAN_DELIVERY {
        let extended = f.can_id & 0x8000_0000 != 0;
        let id = f.can_id & if extended { 0x1fff_ffff } else { 0x7ff };
        return Flow::Can {
            iface,
            id: if extended {
                format!("{id:08X}")
            } else {
                format!("{id:03X}")
            },
        };
    }
    let nonzero = |w: &[u16; 8]| w.iter().any(|x| *x != 0);
    Flow::Udp {
        iface,
        src: nonzero(&f.src_ip)
            .then(|| ip(&f.src_ip, f.family))
            .flatten(),
        dst: nonzero(&f.dst_ip)
            .then(|| ip(&f.dst_ip, f.family))
            .flatten(),
        src_port: u16::from_be(f.src_port),
        dst_port: u16::from_be(f.dst_port),
    }
}

pub fn decode(e: &LatencyEvent, names: &Names) -> Event {
    let kind = match e.kind {
        event::UDP_FORWARD => "udp_forward",
        event::CAN_FORWARD => "can_forward",
        event::UDP_DELIVERY => "udp_delivery",
        _ => "can_delivery",
    };
    let start = if e.rx_ns != 0 { e.rx_ns } else { e.hook_ns };
    Event {
        kind,
        target: names.of(e.kind, e.slot),
        latency_us: us(e.done_ns.saturating_sub(start)),
        rx_to_hook_us: (e.rx_ns != 0 && e.hook_ns != 0)
            .then(|| us(e.hook_ns.saturating_sub(e.rx_ns))),
        hook_to_done_us: (e.hook_ns != 0).then(|| us(e.done_ns.saturating_sub(e.hook_ns))),
        flow: flow(e.kind, &e.flow),
        done_ns: e.done_ns,
    }
}

/// Reads the ring as events arrive and broadcasts them; returns the sender clients subscribe to.
pub fn spawn_reader(
    ring: RingBuf<MapData>,
    names: Names,
    counts: Arc<EventCounts>,
) -> broadcast::Sender<Arc<Event>> {
    let (tx, _) = broadcast::channel(BACKLOG);
    let sender = tx.clone();
    // SAFETY: the AsyncFd owns the ring, so the fd stays open for as long as it is registered.
    let registered =
        unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            warn!("slow events unavailable: {e}");
            return sender;
        }
    };
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                if item.len() < size_of::<LatencyEvent>() {
                    continue;
                }
                // SAFETY: the kernel writes whole LatencyEvents; read unaligned from its bytes.
                let e: LatencyEvent =
                    unsafe { item.as_ptr().cast::<LatencyEvent>().read_unaligned() };
                counts.received.fetch_add(1, Relaxed);
                // No subscriber is fine: the counter still moves.
                let _ = tx.send(Arc::new(decode(&e, &names)));
            }
            guard.clear_ready();
        }
    });
    sender
}
