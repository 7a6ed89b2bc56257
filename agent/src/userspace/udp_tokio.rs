//! The tokio engine: one task per listener on the agent's runtime. Each wake-up takes up to
//! [`BATCH`] datagrams with one recvmmsg and sends them with one sendmmsg per egress socket, so
//! the syscall cost is shared by a batch under load and a lone datagram is not delayed.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket},
    os::fd::AsRawFd as _,
    sync::atomic::Ordering::Relaxed,
};

use tokio::{io::unix::AsyncFd, task::JoinHandle};
use tracing::warn;

use super::udp::{Listener, LiveRoute};

/// Datagrams per recvmmsg.
const BATCH: usize = 32;
/// Room for the largest UDP datagram, so none is ever truncated. The buffers are zeroed pages
/// the kernel maps on first touch: small datagrams make only their first page resident.
const SLOT: usize = 1 << 16;

pub(super) fn spawn(l: Listener) -> io::Result<JoinHandle<()>> {
    let socket = super::socket::register(l.socket)?;
    let egress = l
        .egress
        .into_iter()
        .map(super::socket::register)
        .collect::<io::Result<Vec<_>>>()?;
    let fwd = Forward {
        socket,
        egress,
        table: l.table,
        routes: l.routes,
        unmatched: l.unmatched,
    };
    Ok(tokio::spawn(fwd.run()))
}

struct Forward {
    socket: AsyncFd<UdpSocket>,
    egress: Vec<AsyncFd<UdpSocket>>,
    table: super::udp_rules::RuleTable,
    routes: Vec<LiveRoute>,
    unmatched: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Forward {
    async fn run(self) {
        let mut b = Batch::new();
        loop {
            let n = match self.recv(&mut b).await {
                Ok(n) => n,
                Err(e) => {
                    // recvmmsg fails only on a broken socket; say so once and stop.
                    warn!("userspace UDP listener stopped: recvmmsg: {e}");
                    return;
                }
            };
            self.forward(&mut b, n).await;
        }
    }

    async fn recv(&self, b: &mut Batch) -> io::Result<usize> {
        loop {
            let mut ready = self.socket.readable().await?;
            if let Ok(r) = ready.try_io(|s| b.recvmmsg(s.get_ref())) {
                return r;
            }
        }
    }

    /// Looks up each received datagram's rule and sends it, grouped by egress socket.
    async fn forward(&self, b: &mut Batch, n: usize) {
        let mut out = 0;
        for i in 0..n {
            let Some(src) = sockaddr(&b.names[i]) else {
                continue;
            };
            let Some(r) = self.table.lookup(&src) else {
                self.unmatched.fetch_add(1, Relaxed);
                continue;
            };
            b.sends[out] = Send {
                slot: i,
                len: b.msgs[i].msg_len as usize,
                route: r,
            };
            out += 1;
        }
        // Runs of datagrams for the same egress socket go out in one sendmmsg each.
        let mut start = 0;
        while start < out {
            let egress = self.routes[b.sends[start].route].egress;
            let mut end = start + 1;
            while end < out && self.routes[b.sends[end].route].egress == egress {
                end += 1;
            }
            self.send(b, start, end, &self.egress[egress]).await;
            start = end;
        }
    }

    /// Sends `b.sends[start..end]` on `sock`, counting each datagram on its rule.
    async fn send(&self, b: &mut Batch, start: usize, end: usize, sock: &AsyncFd<UdpSocket>) {
        b.prepare_sends(start, end, &self.routes);
        let mut next = start;
        while next < end {
            let sent = loop {
                let Ok(mut ready) = sock.writable().await else {
                    break Err(io::Error::other("egress socket deregistered"));
                };
                if let Ok(r) = ready.try_io(|s| b.sendmmsg(s.get_ref(), next - start, end - start))
                {
                    break r;
                }
            };
            match sent {
                Ok(k) => {
                    for s in &b.sends[next..next + k] {
                        let route = &self.routes[s.route];
                        route.counters.packets.fetch_add(1, Relaxed);
                        route
                            .counters
                            .bytes
                            .fetch_add(route.header_bytes + s.len as u64, Relaxed);
                    }
                    next += k;
                }
                // The first unsent datagram was refused (ENOBUFS, no route): count it, go on.
                Err(_) => {
                    self.routes[b.sends[next].route]
                        .counters
                        .send_errors
                        .fetch_add(1, Relaxed);
                    next += 1;
                }
            }
        }
    }
}

#[derive(Clone, Copy, Default)]
struct Send {
    slot: usize,
    len: usize,
    route: usize,
}

/// recvmmsg/sendmmsg state: the buffers and the headers pointing into them. The pointers are
/// set right before each call, so the batch may move between calls.
struct Batch {
    bufs: Vec<u8>,
    names: Vec<libc::sockaddr_storage>,
    iov: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
    sends: Vec<Send>,
    out_iov: Vec<libc::iovec>,
    out: Vec<libc::mmsghdr>,
}

// SAFETY: the raw pointers in the headers point only into this batch's own buffers (or the
// routes' addresses, which outlive the task), and are rewritten before every use.
unsafe impl std::marker::Send for Batch {}

impl Batch {
    fn new() -> Self {
        Self {
            bufs: vec![0; BATCH * SLOT],
            names: zeroed(),
            iov: zeroed(),
            msgs: zeroed(),
            sends: vec![Send::default(); BATCH],
            out_iov: zeroed(),
            out: zeroed(),
        }
    }

    fn recvmmsg(&mut self, sock: &UdpSocket) -> io::Result<usize> {
        for i in 0..BATCH {
            self.iov[i] = libc::iovec {
                iov_base: self.bufs[i * SLOT..].as_mut_ptr().cast(),
                iov_len: SLOT,
            };
            let h = &mut self.msgs[i].msg_hdr;
            h.msg_name = (&raw mut self.names[i]).cast();
            h.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &raw mut self.iov[i];
            h.msg_iovlen = 1;
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
            h.msg_flags = 0;
        }
        // SAFETY: BATCH headers, each pointing at its own name and a SLOT-byte buffer.
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                self.msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Points the send headers of `sends[start..end]` at their datagrams and destinations.
    fn prepare_sends(&mut self, start: usize, end: usize, routes: &[LiveRoute]) {
        for (k, s) in self.sends[start..end].iter().enumerate() {
            self.out_iov[k] = libc::iovec {
                iov_base: self.bufs[s.slot * SLOT..].as_mut_ptr().cast(),
                iov_len: s.len,
            };
            let dst = &routes[s.route].dst_raw;
            let h = &mut self.out[k].msg_hdr;
            h.msg_name = dst.as_ptr().cast_mut().cast();
            h.msg_namelen = dst.len();
            h.msg_iov = &raw mut self.out_iov[k];
            h.msg_iovlen = 1;
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
            h.msg_flags = 0;
        }
    }

    /// sendmmsg of the prepared headers `from..to`; returns how many went out.
    fn sendmmsg(&mut self, sock: &UdpSocket, from: usize, to: usize) -> io::Result<usize> {
        // SAFETY: headers from..to were prepared by prepare_sends and point at live buffers.
        let n = unsafe {
            libc::sendmmsg(
                sock.as_raw_fd(),
                self.out[from..].as_mut_ptr(),
                (to - from) as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

/// BATCH all-zero C structs.
fn zeroed<T>() -> Vec<T> {
    // SAFETY: only used for plain C structs, for which all-zero is a valid value.
    (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect()
}

/// The source address recvmmsg wrote.
fn sockaddr(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(s.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says it is a sockaddr_in, which fits in sockaddr_storage.
            let a: &libc::sockaddr_in = unsafe { &*(s as *const libc::sockaddr_storage).cast() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let a: &libc::sockaddr_in6 = unsafe { &*(s as *const libc::sockaddr_storage).cast() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}
