//! Interfaces appearing and disappearing, from the kernel's rtnetlink link notifications.
//!
//! The messages themselves are not parsed: any link event wakes the agent, which compares the
//! interfaces its config names with what exists now (a rename, a move to another namespace and
//! a delete all look the same from there).

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::Duration,
};

use tokio::io::unix::AsyncFd;

/// A burst of events (an interface and its peer going, a driver reloading) is one wake-up.
const SETTLE: Duration = Duration::from_millis(100);

pub struct LinkEvents {
    fd: AsyncFd<OwnedFd>,
}

impl LinkEvents {
    /// Subscribes to RTMGRP_LINK in the agent's network namespace.
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2); the fd is owned right after.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_ROUTE,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: a zeroed sockaddr_nl with family and groups set, of the size passed.
        let rc = unsafe {
            let mut addr: libc::sockaddr_nl = std::mem::zeroed();
            addr.nl_family = libc::AF_NETLINK as u16;
            addr.nl_groups = libc::RTMGRP_LINK as u32;
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the AsyncFd owns the descriptor, so it stays open while registered.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)? };
        Ok(Self { fd })
    }

    /// Waits for link events, then for them to settle.
    pub async fn changed(&mut self) -> io::Result<()> {
        self.drain_one().await?;
        loop {
            match tokio::time::timeout(SETTLE, self.drain_one()).await {
                Ok(r) => r?,
                Err(_) => return Ok(()),
            }
        }
    }

    async fn drain_one(&mut self) -> io::Result<()> {
        let mut buf = [0u8; 16 * 1024];
        loop {
            let mut guard = self.fd.readable().await?;
            let r = guard.try_io(|fd| {
                // SAFETY: reads into a buffer we own, of the length passed.
                let n =
                    unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(())
                }
            });
            match r {
                Ok(Ok(())) => return Ok(()),
                // The kernel dropped notifications (ENOBUFS): we re-read the interfaces anyway.
                Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => return Ok(()),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}
