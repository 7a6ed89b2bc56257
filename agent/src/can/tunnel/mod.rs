//! The CAN-over-UDP tunnel in cannelloni's format: frames the kernel hands over through a ring
//! buffer go out in batched datagrams; datagrams that arrive are checked and their frames
//! written to a CAN netdev.

pub mod codec;
pub mod metrics;
mod policy;
mod receiver;
pub mod sender;
mod sequence;

use std::{collections::HashMap, net::SocketAddr, os::fd::AsRawFd as _, sync::Arc, time::Duration};

use aya::maps::{MapData, RingBuf};
use socketcan::Socket as _;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use self::{
    metrics::TunnelMetrics,
    sender::{Sender, SenderConfig},
};
use super::router::TunnelSockets;
use crate::{
    config::{CanConfig, CanReceive, TunnelPeer},
    userspace::socket,
};

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
    #[error(
        "can.receive `{name}`: cannot bind to interface {iface} (bind_iface: check that it exists; binding a new socket needs no capability since Linux 5.7): {source}"
    )]
    BindDevice {
        name: String,
        iface: String,
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
    /// Cookies of the receivers' CAN sockets, so can_route knows their frames' origin.
    sockets: TunnelSockets,
    sender: Option<Sender>,
    receivers: HashMap<String, Receiver>,
}

struct Receiver {
    config: CanReceive,
    cookie: u64,
    task: JoinHandle<()>,
}

impl Tunnels {
    pub fn new(ring: RingBuf<MapData>, mut sockets: TunnelSockets) -> Self {
        // The map is pinned: a previous agent's cookies are still in it. Cookies are never
        // reused, so they can only take room.
        let stale: Vec<u64> = sockets.keys().filter_map(Result::ok).collect();
        for cookie in stale {
            let _ = sockets.remove(&cookie);
        }
        Self {
            metrics: Arc::new(TunnelMetrics::default()),
            ring: Some(ring),
            sockets,
            sender: None,
            receivers: HashMap::new(),
        }
    }

    pub fn metrics(&self) -> Arc<TunnelMetrics> {
        Arc::clone(&self.metrics)
    }

    /// Stops a receiver and waits for it, so its UDP port is free again.
    async fn stop(&mut self, name: &str) {
        if let Some(r) = self.receivers.remove(name) {
            r.task.abort();
            let _ = r.task.await;
            let _ = self.sockets.remove(&r.cookie);
        }
    }

    /// Runs the tunnel for `peers` (indexed by the kernel's tunnel ids) and the config's
    /// receivers. New sockets are opened before anything else changes, so an error leaves the
    /// running tunnel as it was (except a changed receiver that keeps its address, which must
    /// give the address up first).
    pub async fn apply(
        &mut self,
        can: &CanConfig,
        peers: &[SocketAddr],
    ) -> Result<(), TunnelError> {
        let mut started = Vec::new();
        for r in &can.receive {
            if self
                .receivers
                .get(&r.name)
                .is_some_and(|old| old.config == *r)
            {
                continue;
            }
            if self
                .receivers
                .get(&r.name)
                .is_some_and(|old| old.config.listen == r.listen)
            {
                self.stop(&r.name).await;
            }
            let udp = bind_udp(r)?;
            let can_err = |source| TunnelError::CanSocket {
                name: r.name.clone(),
                iface: r.iface.clone(),
                source,
            };
            let can_sock = socketcan::CanFdSocket::open(&r.iface)
                .and_then(|s| s.set_nonblocking(true).map(|()| s))
                .and_then(socket::register)
                .map_err(can_err)?;
            let cookie = socket_cookie(&can_sock).map_err(can_err)?;
            self.sockets
                .insert(cookie, 1, 0)
                .map_err(|e| can_err(std::io::Error::other(e)))?;
            started.push((r.clone(), udp, can_sock, cookie));
        }

        let config = SenderConfig {
            peers: peers.to_vec(),
            flush: Duration::from_micros(u64::from(can.flush_timeout_us)),
            max_datagram: usize::from(can.max_datagram),
            bind: can.tunnel_bind,
        };
        let senders: Vec<String> = peers.iter().map(ToString::to_string).collect();
        let receivers: Vec<String> = can.receive.iter().map(|r| r.name.clone()).collect();
        self.metrics.retain(&senders, &receivers);
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

        let gone: Vec<String> = self
            .receivers
            .keys()
            .filter(|name| {
                !can.receive.iter().any(|r| &r.name == *name)
                    || started.iter().any(|s| &s.0.name == *name)
            })
            .cloned()
            .collect();
        for name in gone {
            self.stop(&name).await;
        }
        for (config, udp, can_sock, cookie) in started {
            info!(tunnel = config.name, listen = %config.listen, iface = config.iface, peer = %config.peer, bind_iface = config.bind_iface.as_deref().unwrap_or("(any)"), "can tunnel receiver started");
            if config.peer == TunnelPeer::Any {
                warn!(
                    tunnel = config.name,
                    "can tunnel receiver accepts datagrams from any sender (peer = \"any\"): anyone who can reach {} can write to {}; name the peer, or bind the receiver to an authenticated link (bind_iface)",
                    config.listen,
                    config.iface
                );
            }
            let task = receiver::spawn(config.clone(), udp, can_sock, Arc::clone(&self.metrics));
            self.receivers.insert(
                config.name.clone(),
                Receiver {
                    config,
                    cookie,
                    task,
                },
            );
        }
        Ok(())
    }

    /// Stops the receivers and flushes and stops the sender.
    pub fn shutdown(&mut self) {
        for (_, r) in self.receivers.drain() {
            r.task.abort();
            let _ = self.sockets.remove(&r.cookie);
        }
        self.sender = None;
    }
}

/// The kernel's cookie of a socket (SO_COOKIE), as bpf_get_socket_cookie() reports it.
fn socket_cookie(s: &impl std::os::fd::AsRawFd) -> std::io::Result<u64> {
    const SO_COOKIE: libc::c_int = 57;
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd and out pointers of the right size.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

fn bind_udp(r: &CanReceive) -> Result<tokio::net::UdpSocket, TunnelError> {
    let err = |source| TunnelError::Listen {
        name: r.name.clone(),
        addr: r.listen,
        source,
    };
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(r.listen),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .map_err(err)?;
    set_receive_buffer(&sock);
    if let Some(iface) = &r.bind_iface {
        sock.bind_device(Some(iface.as_bytes()))
            .map_err(|e| TunnelError::BindDevice {
                name: r.name.clone(),
                iface: iface.clone(),
                source: e,
            })?;
    }
    sock.bind(&r.listen.into()).map_err(err)?;
    sock.set_nonblocking(true).map_err(err)?;
    tokio::net::UdpSocket::from_std(sock.into()).map_err(err)
}

/// Room for this many bytes of datagrams waiting for the receiver: a peer's burst (a datagram
/// carries up to a few hundred frames) must not overflow the socket while the receiver writes
/// the previous one to a slow bus. The default (`net.core.rmem_default`, 208 KiB) holds well
/// under a second of a busy CAN FD bus.
const RECEIVE_BUFFER: usize = 4 << 20;

/// Sets [`RECEIVE_BUFFER`], past `net.core.rmem_max` where the agent has CAP_NET_ADMIN
/// (SO_RCVBUFFORCE), else as far as rmem_max allows.
fn set_receive_buffer(sock: &socket2::Socket) {
    let size = RECEIVE_BUFFER as libc::c_int;
    // SAFETY: a valid socket and a c_int option value of the right length.
    let forced = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const size).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    } == 0;
    if !forced {
        let _ = sock.set_recv_buffer_size(RECEIVE_BUFFER);
    }
}
