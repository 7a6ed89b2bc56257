//! Interfaces appearing and disappearing, from the kernel's rtnetlink link notifications.
//!
//! Any link event wakes the agent, which compares the interfaces its config names with what
//! exists now (a rename, a move to another namespace and a delete all look the same from
//! there). The notifications are parsed only to log what changed: one that can't be parsed
//! still wakes the agent, and one that was dropped (ENOBUFS) too.

use std::{io, time::Duration};

use libc::{IFLA_IFNAME, RTM_DELLINK, RTM_NEWLINK};
use tokio::io::unix::AsyncFd;
use tracing::{debug, warn};

use crate::sys::netlink::{self, NetlinkError, RecvError};

/// A burst of events (an interface and its peer going, a driver reloading) is one wake-up.
const SETTLE: Duration = Duration::from_millis(100);

/// One link notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkEvent {
    /// RTM_DELLINK: the interface is gone (or left the namespace); RTM_NEWLINK otherwise.
    pub removed: bool,
    pub ifindex: i32,
    pub name: String,
}

pub struct LinkEvents {
    socket: AsyncFd<netlink::Socket>,
}

impl LinkEvents {
    /// Subscribes to RTMGRP_LINK in the agent's network namespace.
    pub fn open() -> io::Result<Self> {
        let socket = netlink::Socket::subscribe(libc::RTMGRP_LINK as u32)?;
        // SAFETY: the AsyncFd owns the socket, so it stays open while registered.
        let socket =
            unsafe { AsyncFd::register_with_interest(socket, tokio::io::Interest::READABLE)? };
        Ok(Self { socket })
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
            let mut guard = self.socket.readable().await?;
            let r = guard.try_io(|s| match s.get_ref().recv(&mut buf) {
                Ok(datagram) => {
                    log_events(datagram);
                    Ok(())
                }
                // Longer than the buffer: what changed is unknown, which re-reading covers.
                Err(RecvError::Truncated { .. }) => Ok(()),
                Err(RecvError::Io(e)) => Err(e),
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

fn log_events(datagram: &[u8]) {
    match parse(datagram) {
        Ok(events) => debug!(?events, "interface events"),
        Err(e) => warn!("a malformed interface event ({e}); reading the interfaces anyway"),
    }
}

/// The link notifications in one datagram.
pub(crate) fn parse(datagram: &[u8]) -> Result<Vec<LinkEvent>, NetlinkError> {
    let mut out = Vec::new();
    for msg in netlink::messages(datagram) {
        let msg = msg?;
        if msg.ty != RTM_NEWLINK && msg.ty != RTM_DELLINK {
            continue;
        }
        // struct ifinfomsg: family, pad, type (u16), index (i32), flags, change.
        let (ifinfomsg, attrs) =
            msg.split::<{ size_of::<libc::ifinfomsg>() }>("a link event's struct ifinfomsg")?;
        let [_, _, _, _, i0, i1, i2, i3, ..] = *ifinfomsg;
        let name = attrs
            .first(IFLA_IFNAME)?
            .ok_or(NetlinkError::Missing("a link event's IFLA_IFNAME"))?
            .string()
            .into_owned();
        out.push(LinkEvent {
            removed: msg.ty == RTM_DELLINK,
            ifindex: i32::from_ne_bytes([i0, i1, i2, i3]),
            name,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::netlink::Request;

    fn event(ty: u16, ifindex: i32, name: &[u8]) -> Vec<u8> {
        let mut ifinfomsg = [0u8; 16];
        ifinfomsg[4..8].copy_from_slice(&ifindex.to_ne_bytes());
        Request::new(ty, 0, 0)
            .fixed(&ifinfomsg)
            .attr(IFLA_IFNAME, name)
            .attr(libc::IFLA_MTU, &1500u32.to_ne_bytes())
            .finish()
    }

    #[test]
    fn link_notifications_name_the_interface() {
        let mut d = event(RTM_NEWLINK, 7, b"can0\0");
        d.extend(event(RTM_DELLINK, 8, b"veth-gw\0"));
        // Other messages in the group are skipped.
        d.extend(
            Request::new(libc::RTM_NEWADDR, 0, 0)
                .fixed(&[0; 8])
                .finish(),
        );
        assert_eq!(
            parse(&d),
            Ok(vec![
                LinkEvent {
                    removed: false,
                    ifindex: 7,
                    name: "can0".into()
                },
                LinkEvent {
                    removed: true,
                    ifindex: 8,
                    name: "veth-gw".into()
                },
            ])
        );
    }

    #[test]
    fn malformed_notifications_are_errors() {
        let d = event(RTM_NEWLINK, 7, b"can0\0");
        for cut in 1..d.len() {
            assert!(parse(&d[..cut]).is_err(), "cut {cut}");
        }
        let no_name = Request::new(RTM_DELLINK, 0, 0).fixed(&[0; 16]).finish();
        assert_eq!(
            parse(&no_name),
            Err(NetlinkError::Missing("a link event's IFLA_IFNAME"))
        );
        let short = Request::new(RTM_DELLINK, 0, 0).fixed(&[0; 15]).finish();
        assert!(matches!(
            parse(&short),
            Err(NetlinkError::Short { need: 16, .. })
        ));
    }
}
