//! The CAN-over-UDP tunnel in cannelloni's format: frames the kernel hands over through a ring
//! buffer go out in batched datagrams; datagrams that arrive are checked and their frames
//! written to a CAN netdev.

pub mod codec;
pub mod metrics;
mod receiver;
pub mod sender;

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use aya::maps::{MapData, RingBuf};
use tokio::task::JoinHandle;
use tracing::info;

use self::{
    metrics::TunnelMetrics,
    sender::{Sender, SenderConfig},
};
use crate::config::{CanConfig, CanReceive};

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("can.tunnel_bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("can.receive `{name}`: cannot listen on {addr}: {source}")]
    Listen {
        name: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("can.receive `{name}`: cannot open a CAN FD socket on {iface}: {source}")]
    CanSocket {
        name: String,
        iface: String,
        #[source]
        source: std::io::Error,
    },
}

pub struct Tunnels {
    metrics: Arc<TunnelMetrics>,
    ring: Option<RingBuf<MapData>>,
    sender: Option<Sender>,
    receivers: HashMap<String, (CanReceive, JoinHandle<()>)>,
}

impl Tunnels {
    pub fn new(ring: RingBuf<MapData>) -> Self {
        Self {
            metrics: Arc::new(TunnelMetrics::default()),
            ring: Some(ring),
            sender: None,
            receivers: HashMap::new(),
        }
    }

    pub fn metrics(&self) -> Arc<TunnelMetrics> {
        Arc::clone(&self.metrics)
    }

    /// Runs the tunnel for `peers` (indexed by the kernel's tunnel ids) and the config's
    /// receivers. New sockets are opened before anything running changes, so an error leaves
    /// the previous tunnel as it was.
    pub async fn apply(
        &mut self,
        can: &CanConfig,
        peers: &[SocketAddr],
    ) -> Result<(), TunnelError> {
        let mut started = Vec::new();
        for r in &can.receive {
            if self.receivers.get(&r.name).is_some_and(|(old, _)| old == r) {
                continue;
            }
            // A receiver that keeps its address must give it up before it is bound again.
            if self
                .receivers
                .get(&r.name)
                .is_some_and(|(old, _)| old.listen == r.listen)
            {
                let (_, task) = self.receivers.remove(&r.name).expect("checked above");
                task.abort();
                let _ = task.await;
            }
            let udp = bind_udp(r)?;
            let can_sock = socketcan::tokio::CanFdSocket::open(&r.iface).map_err(|source| {
                TunnelError::CanSocket {
                    name: r.name.clone(),
                    iface: r.iface.clone(),
                    source,
                }
            })?;
            started.push((r.clone(), udp, can_sock));
        }

        let config = SenderConfig {
            peers: peers.to_vec(),
            flush: Duration::from_micros(u64::from(can.flush_timeout_us)),
            max_datagram: usize::from(can.max_datagram),
            bind: can.tunnel_bind,
        };
        let mut labels: Vec<String> = peers.iter().map(ToString::to_string).collect();
        labels.extend(can.receive.iter().map(|r| r.name.clone()));
        self.metrics.retain(&labels);
        match (&self.sender, self.ring.take()) {
            (Some(s), _) => s.reconfigure(config),
            (None, Some(ring)) => {
                let addr = config.bind;
                self.sender = Some(
                    Sender::start(ring, config, Arc::clone(&self.metrics))
                        .map_err(|source| TunnelError::Bind { addr, source })?,
                );
            }
            (None, None) => unreachable!("the ring is either unused or owned by the sender"),
        }

        self.receivers.retain(|name, (_, task)| {
            let keep = can.receive.iter().any(|r| &r.name == name);
            if !keep {
                task.abort();
            }
            keep
        });
        for (r, udp, can_sock) in started {
            info!(tunnel = r.name, listen = %r.listen, iface = r.iface, "can tunnel receiver started");
            let task = receiver::spawn(
                r.name.clone(),
                udp,
                can_sock,
                r.peer,
                Arc::clone(&self.metrics),
            );
            if let Some((_, old)) = self.receivers.insert(r.name.clone(), (r, task)) {
                old.abort();
            }
        }
        Ok(())
    }

    /// Stops the receivers and flushes and stops the sender.
    pub fn shutdown(&mut self) {
        for (_, (_, task)) in self.receivers.drain() {
            task.abort();
        }
        self.sender = None;
    }
}

fn bind_udp(r: &CanReceive) -> Result<tokio::net::UdpSocket, TunnelError> {
    let err = |source| TunnelError::Listen {
        name: r.name.clone(),
        addr: r.listen,
        source,
    };
    let std_sock = std::net::UdpSocket::bind(r.listen).map_err(err)?;
    std_sock.set_nonblocking(true).map_err(err)?;
    tokio::net::UdpSocket::from_std(std_sock).map_err(err)
}
