//! Sockets of the userspace engines: bound to an interface, so a rule's datagrams come in and
//! go out by the interfaces the rule names, as on the kernel path.

use std::{io, net::SocketAddr, os::fd::AsRawFd as _};

use socket2::{Domain, Protocol, Socket, Type};

/// Receive buffer asked for on listeners: bursts at line rate outrun a userspace loop that the
/// scheduler delays; the kernel's default (about 200 KiB) holds only ~2,000 small datagrams.
const RCVBUF: libc::c_int = 8 << 20;

/// A non-blocking UDP socket on `iface`, bound to `addr` with SO_REUSEADDR (so a reload can
/// bind the replacement before closing the old socket).
pub fn udp(addr: SocketAddr, iface: &str, listener: bool) -> io::Result<std::net::UdpSocket> {
    let s = Socket::new(
        Domain::for_address(addr),
        Type::DGRAM.nonblocking().cloexec(),
        Some(Protocol::UDP),
    )?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.bind_device(Some(iface.as_bytes()))?;
    if listener {
        grow_rcvbuf(&s);
    }
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// SO_RCVBUFFORCE passes rmem_max with CAP_NET_ADMIN (which the agent has); without it the
/// kernel's limit applies.
fn grow_rcvbuf(s: &Socket) {
    let size = RCVBUF;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: setsockopt with a valid int option value.
        let r = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&raw const size).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            return;
        }
    }
}

/// Registers an owned socket with the tokio reactor.
pub fn register<T: std::os::fd::AsRawFd>(inner: T) -> io::Result<tokio::io::unix::AsyncFd<T>> {
    // SAFETY: the AsyncFd owns `inner`, so its fd stays open for as long as it is registered.
    Ok(unsafe { tokio::io::unix::AsyncFd::register(inner) }?)
}
