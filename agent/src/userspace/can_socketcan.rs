//! CAN routes in userspace: one CAN_RAW socket (socketcan) per interface, reading the routes'
//! ingress frames and writing routed ones, processed by the same can-gw job descriptions the
//! kernel path installs (see [`super::can_frame`]).
//!
//! One socket per interface both reads and writes, with local loopback off: frames it routes
//! out of an interface are seen neither by its own reader there nor by other local sockets on
//! it, as with can-gw without `echo`. So a routed frame is never routed again (the hop limit
//! of 1 the config validation requires in userspace).

use std::{
    collections::BTreeMap,
    io,
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use edgeplane_common::can::{CAN_MTU, CANFD_MTU, CanFrame, rule_flag};
use socketcan::{CanFdSocket, Socket as _, SocketOptions as _};
use tokio::{io::unix::AsyncFd, task::JoinHandle};
use tracing::{info, warn};

use super::{CanRouteView, SharedUserspaceView, UserspaceError, can_frame::Outcome};
use crate::can::rules::CompiledRoute;

/// Counters of one userspace CAN route, named like the kernel path's.
#[derive(Debug, Default)]
pub struct CanCounters {
    pub frames: AtomicU64,
    pub bytes: AtomicU64,
    pub routed: AtomicU64,
    /// CAN FD frames matched by a route to a classic-only interface.
    pub fd_to_classic: AtomicU64,
    /// Frames a modification left with an invalid length (can-gw's `deleted`).
    pub deleted: AtomicU64,
    /// Frames the egress refused (can-gw's `dropped`).
    pub dropped: AtomicU64,
    /// Failed reads of the ingress socket; the reader reads on.
    pub read_errors: AtomicU64,
}

/// Pauses of a reader after failed reads, doubling while they fail: the first is short, so
/// frames flow again soon after an interface comes back up; the last keeps a lasting error
/// from filling the log.
const READ_RETRY_FIRST: Duration = Duration::from_millis(50);
const READ_RETRY_MAX: Duration = Duration::from_secs(5);

type Sock = Arc<AsyncFd<CanFdSocket>>;

/// Aborts the reader task on drop.
struct Reader(JoinHandle<()>);

impl Drop for Reader {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub struct CanUserspace {
    counters: BTreeMap<String, Arc<CanCounters>>,
    routes: Vec<CompiledRoute>,
    readers: Vec<Reader>,
    view: SharedUserspaceView,
}

impl CanUserspace {
    pub fn new(view: SharedUserspaceView) -> Self {
        Self {
            counters: BTreeMap::new(),
            routes: Vec::new(),
            readers: Vec::new(),
            view,
        }
    }

    /// Makes `routes` (validated for userspace) the running ones; unchanged routes keep their
    /// sockets. On error the previous routes keep running. Runs inside the tokio runtime.
    pub fn apply(&mut self, routes: &[CompiledRoute]) -> Result<(), UserspaceError> {
        if routes == self.routes.as_slice() {
            return Ok(());
        }
        // Every interface a route reads or writes, with its socket.
        let mut sockets: BTreeMap<u32, Sock> = BTreeMap::new();
        let mut open = |ifindex: u32, route: &str| -> Result<Sock, UserspaceError> {
            if let Some(s) = sockets.get(&ifindex) {
                return Ok(Arc::clone(s));
            }
            let s = open(ifindex).map_err(|source| UserspaceError::CanSocket {
                route: route.to_owned(),
                iface: iface_name(ifindex),
                source,
            })?;
            sockets.insert(ifindex, Arc::clone(&s));
            Ok(s)
        };
        let mut per_ingress: BTreeMap<u32, Vec<Live>> = BTreeMap::new();
        for r in routes {
            open(r.ingress_ifindex, &r.name)?;
            let mut jobs = Vec::new();
            for j in &r.jobs {
                jobs.push((j.clone(), open(j.dst_ifindex, &r.name)?));
            }
            per_ingress
                .entry(r.ingress_ifindex)
                .or_default()
                .push(Live {
                    route: r.clone(),
                    jobs,
                    counters: Arc::clone(self.counters.entry(r.name.clone()).or_default()),
                });
        }
        let readers = per_ingress
            .into_iter()
            .map(|(ifindex, live)| {
                let iface = live[0].route.ingress.clone();
                Reader(tokio::spawn(read(
                    Arc::clone(&sockets[&ifindex]),
                    iface,
                    live,
                )))
            })
            .collect();
        self.readers = readers;
        self.routes = routes.to_vec();
        self.counters
            .retain(|name, _| routes.iter().any(|r| r.name == *name));
        for r in routes {
            info!(
                route = r.name,
                ingress = r.ingress,
                "userspace CAN route running"
            );
        }
        self.publish();
        Ok(())
    }

    pub fn shutdown(&mut self) {
        self.readers.clear();
        self.routes.clear();
        self.publish();
    }

    fn publish(&self) {
        self.view.write().expect("view lock").can = self
            .routes
            .iter()
            .map(|r| CanRouteView {
                route: r.name.clone(),
                ingress: r.ingress.clone(),
                counters: Arc::clone(&self.counters[&r.name]),
            })
            .collect();
    }
}

/// For error messages: the interface's name, or its index if it vanished.
fn iface_name(ifindex: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has the IF_NAMESIZE bytes if_indextoname writes at most.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return format!("ifindex {ifindex}");
    }
    // SAFETY: on success buf holds a NUL-terminated name.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

fn open(ifindex: u32) -> io::Result<Sock> {
    let s = CanFdSocket::open_iface(ifindex)?;
    s.set_loopback(false)?;
    s.set_nonblocking(true)?;
    Ok(Arc::new(super::socket::register(s)?))
}

/// A route with its jobs' egress sockets.
struct Live {
    route: CompiledRoute,
    jobs: Vec<(crate::can::gateway::Job, Sock)>,
    counters: Arc<CanCounters>,
}

impl Live {
    /// The route's filter, as the kernel program applies it.
    fn matches(&self, can_id: u32) -> bool {
        let r = &self.route.rule;
        let hit = can_id & r.filter_mask == r.filter_id & r.filter_mask;
        hit != (r.flags & rule_flag::INVERT != 0)
    }
}

/// Reads `iface` for its routes until dropped. A failed read (ENETDOWN when the interface goes
/// down) is logged and counted, and reading goes on: CAN_RAW reports the error once and the
/// socket stays bound, so frames come again when the interface is up. An interface that is
/// removed is followed by link events, which restart its routes on the new one.
async fn read(sock: Sock, iface: String, routes: Vec<Live>) {
    let mut pause = READ_RETRY_FIRST;
    loop {
        let (frame, fd) = match next_frame(&sock).await {
            Ok(f) => {
                pause = READ_RETRY_FIRST;
                f
            }
            Err(e) => {
                for live in &routes {
                    live.counters.read_errors.fetch_add(1, Relaxed);
                }
                warn!(
                    iface,
                    "userspace CAN reader: {e}; reading on in {pause:?} (frames come again when \
                     the interface is up)"
                );
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(READ_RETRY_MAX);
                continue;
            }
        };
        // Every matching route acts, in config order, as on the kernel path.
        for live in routes.iter().filter(|l| l.matches(frame.can_id)) {
            let c = &live.counters;
            c.frames.fetch_add(1, Relaxed);
            c.bytes.fetch_add(u64::from(frame.len), Relaxed);
            if fd
                && live.route.rule.flags & rule_flag::EGRESS_FD == 0
                && !live.route.jobs.is_empty()
            {
                c.fd_to_classic.fetch_add(1, Relaxed);
                continue;
            }
            for (job, egress) in &live.jobs {
                match job.process(&frame, fd) {
                    Outcome::Skip => {}
                    Outcome::Deleted => {
                        c.deleted.fetch_add(1, Relaxed);
                    }
                    Outcome::Send(out) => match write(egress, &out, fd).await {
                        Ok(()) => {
                            c.routed.fetch_add(1, Relaxed);
                        }
                        Err(_) => {
                            c.dropped.fetch_add(1, Relaxed);
                        }
                    },
                }
            }
        }
    }
}

/// The next frame and whether it is CAN FD.
async fn next_frame(sock: &Sock) -> io::Result<(CanFrame, bool)> {
    loop {
        let mut ready = sock.readable().await?;
        let mut raw = CanFrame::default();
        let r = ready.try_io(|s| {
            // SAFETY: reads at most sizeof(CanFrame) bytes into a plain struct.
            let n = unsafe {
                libc::read(
                    s.get_ref().as_raw_fd(),
                    (&raw mut raw).cast(),
                    size_of::<CanFrame>(),
                )
            };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        match r {
            Ok(Ok(CAN_MTU)) => return Ok((raw, false)),
            Ok(Ok(CANFD_MTU)) => return Ok((raw, true)),
            // CAN_RAW delivers whole frames of these two sizes only.
            Ok(Ok(_)) => continue,
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
}

/// Writes exactly these bytes: a classic frame's first CAN_MTU bytes or the whole CAN FD
/// frame, flags as they are (socketcan's frame types would add CANFD_FDF and pad lengths).
pub(crate) async fn write(
    sock: &AsyncFd<CanFdSocket>,
    frame: &CanFrame,
    fd: bool,
) -> io::Result<()> {
    let n = if fd { CANFD_MTU } else { CAN_MTU };
    loop {
        let mut ready = sock.writable().await?;
        let r = ready.try_io(|s| {
            // SAFETY: writes `n` bytes of a plain struct at least that long.
            let w = unsafe { libc::write(s.get_ref().as_raw_fd(), (&raw const *frame).cast(), n) };
            if w < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        });
        if let Ok(result) = r {
            return result;
        }
    }
}
