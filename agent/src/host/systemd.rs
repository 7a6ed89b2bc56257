//! systemd's service notifications (sd_notify(3)): READY=1 once the programs are attached,
//! STATUS= lines, RELOADING=1 around reloads, STOPPING=1, and WATCHDOG=1 keep-alives.
//!
//! The protocol is one datagram of `KEY=value` lines to the unix socket named by
//! `$NOTIFY_SOCKET` (a path, or an abstract name written with a leading `@`); it is small
//! enough not to need libsystemd. Without `$NOTIFY_SOCKET` (not run by systemd) every call
//! does nothing.

use std::{
    io,
    os::{linux::net::SocketAddrExt as _, unix::net::SocketAddr},
    time::Duration,
};

use std::os::unix::net::UnixDatagram;

use tokio::task::JoinHandle;
use tracing::{debug, warn};

pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET`; a value that can't be used is logged and ignored, since
    /// notifications must never stop the agent.
    pub fn from_env() -> Self {
        let target = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let path = path.to_string_lossy().into_owned();
            match open(&path) {
                Ok(t) => Some(t),
                Err(e) => {
                    warn!("NOTIFY_SOCKET={path} is unusable, no systemd notifications: {e}");
                    None
                }
            }
        });
        Self { target }
    }

    /// Sends `state` (newline-separated `KEY=value` assignments).
    pub fn notify(&self, state: &str) {
        let Some((socket, addr)) = &self.target else {
            return;
        };
        // Non-blocking: a datagram goes at once or fails; the agent never waits on systemd.
        if let Err(e) = socket.send_to_addr(state.as_bytes(), addr) {
            debug!("sd_notify `{state}` failed: {e}");
        }
    }

    /// READY=1 with the status line.
    pub fn ready(&self, status: &str) {
        self.notify(&format!("READY=1\nSTATUS={status}"));
    }

    /// RELOADING=1 with the time systemd's notify-reload services expect beside it.
    pub fn reloading(&self) {
        self.notify(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
    }

    pub fn stopping(&self) {
        self.notify("STOPPING=1");
    }

    /// Sends WATCHDOG=1 at half the interval systemd asked for (`$WATCHDOG_USEC`, for this
    /// process when `$WATCHDOG_PID` names it), from a task on the agent's runtime: if the
    /// runtime stops making progress, the pings stop and systemd restarts the agent.
    pub fn spawn_watchdog(self: &std::sync::Arc<Self>) -> Option<JoinHandle<()>> {
        self.target.as_ref()?;
        let interval = watchdog_interval(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
        )?;
        let this = std::sync::Arc::clone(self);
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            loop {
                tick.tick().await;
                this.notify("WATCHDOG=1");
            }
        }))
    }
}

fn open(path: &str) -> io::Result<(UnixDatagram, SocketAddr)> {
    let addr = match path.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None if path.starts_with('/') => SocketAddr::from_pathname(path)?,
        None => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "neither an absolute path nor an abstract name (@...)",
            ));
        }
    };
    let socket = UnixDatagram::unbound()?;
    socket.set_nonblocking(true)?;
    Ok((socket, addr))
}

/// Half the watchdog timeout, when systemd set one for this process.
fn watchdog_interval(usec: Option<&str>, pid: Option<&str>) -> Option<Duration> {
    if let Some(pid) = pid
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    let usec: u64 = usec?.parse().ok().filter(|&u| u > 0)?;
    Some(Duration::from_micros(usec / 2))
}

fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the valid timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_runs_at_half_the_timeout_for_this_process_only() {
        let me = std::process::id().to_string();
        assert_eq!(
            watchdog_interval(Some("30000000"), None),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            watchdog_interval(Some("2000000"), Some(&me)),
            Some(Duration::from_secs(1))
        );
        assert_eq!(watchdog_interval(Some("2000000"), Some("1")), None);
        assert_eq!(watchdog_interval(None, None), None);
        assert_eq!(watchdog_interval(Some("0"), None), None);
    }

    #[test]
    fn notifies_path_and_abstract_sockets() {
        let dir = std::env::temp_dir().join(format!("ep-notify-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let path_socket = UnixDatagram::bind(&dir).unwrap();
        let name = format!("ep-notify-test-{}", std::process::id());
        let abstract_socket =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
        for (target, socket) in [
            (dir.to_str().unwrap().to_owned(), &path_socket),
            (format!("@{name}"), &abstract_socket),
        ] {
            let n = Notifier {
                target: Some(open(&target).unwrap()),
            };
            n.ready("forwarding: 0 UDP rules, 0 CAN routes");
            let mut buf = [0u8; 256];
            let len = socket.recv(&mut buf).unwrap();
            assert_eq!(
                &buf[..len],
                b"READY=1\nSTATUS=forwarding: 0 UDP rules, 0 CAN routes"
            );
        }
        let _ = std::fs::remove_file(&dir);
        assert!(open("relative").is_err());
    }
}
