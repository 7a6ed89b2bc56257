//! The HTTP server: our own accept loop over hyper's HTTP/1 connections, so that no client
//! can hold the endpoints (or the agent's file descriptors) hostage.
//!
//! - Every connection is in one phase: waiting for a request header (`Header`, from accept
//!   or from the first byte of a later request: `header_timeout`), kept alive with no request
//!   (`Idle`: `idle_timeout`), or answering one (`Busy`). A response the client stops taking
//!   is dropped after `write_timeout` without progress. hyper's own header timeout is off: it
//!   runs one timer for both the header and the idle time, and we want two.
//! - At `max_connections`, a new connection takes the slot of the one that has waited longest
//!   for a request: half-open ones first, then idle ones, then those with nothing read yet
//!   (a client whose request is on its way), so a flood of half-open connections can't lock a
//!   scraper out; only when every connection is busy is the newcomer refused (503).
//! - Every connection is a task in a `JoinSet`: finished ones are reaped (a panic is logged),
//!   and on shutdown the loop stops accepting, closes waiting connections, lets busy ones
//!   finish for [`SHUTDOWN_GRACE`] and waits for every task.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    future::{Future, poll_fn},
    io,
    pin::{Pin, pin},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{Router, body::Bytes};
use http_body::{Frame, SizeHint};
use hyper::{
    Request, Response,
    body::Incoming,
    server::conn::http1::{self, Connection},
};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{Notify, watch},
    task::{JoinError, JoinSet},
    time::Instant,
};
use tracing::{error, warn};

use crate::{
    config::HttpConfig,
    metrics::{CloseReason, HttpMetrics},
};

/// How long busy connections may take to finish their response once the agent stops.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// hyper's read buffer cap (its minimum is 8 KiB): a request header can't be larger.
const MAX_BUF: usize = 16 * 1024;
/// Request line and headers at most; larger ones are answered 431.
const MAX_HEADER: usize = 8 * 1024;
/// Pause after an accept that failed for lack of resources (EMFILE, ENOBUFS...), which
/// would fail again at once.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// At most one log line per this interval for failing accepts (they are all counted).
const ACCEPT_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// File descriptors kept for everything else the agent opens (maps, programs, the userspace
/// engines' sockets, netlink): only for the warning below.
const FD_RESERVE: u64 = 512;

/// Raises the soft RLIMIT_NOFILE to the hard one (systemd's soft default of 1024 is for
/// programs that still use select(2)), and warns when `max_connections` may not fit.
pub fn raise_fd_limit(max_connections: usize) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    if max_connections as u64 + FD_RESERVE > limit.rlim_cur {
        warn!(
            "http.max_connections = {max_connections} and the agent's other file descriptors may not fit in RLIMIT_NOFILE ({}): raise LimitNOFILE= or lower http.max_connections; accepts that fail are counted in edgeplane_http_accept_errors_total",
            limit.rlim_cur
        );
    }
}

/// The listen backlog: a flood's bursts wait in the kernel instead of having their SYNs dropped
/// (which costs any client, a scraper too, a 1 s retransmission). The kernel caps it at
/// net.core.somaxconn.
const BACKLOG: u32 = 4096;

/// Binds the HTTP listener (with `SO_REUSEADDR`, as a restarted agent needs).
pub fn bind(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Serves `router` on `listener` until `stop` turns true (or its sender goes), then drains.
pub async fn run(
    listener: TcpListener,
    router: Router,
    limits: watch::Receiver<HttpConfig>,
    metrics: HttpMetrics,
    mut stop: watch::Receiver<bool>,
) {
    let tracker = Arc::new(Tracker {
        limits,
        metrics,
        slots: Mutex::new(Slots::default()),
    });
    let mut builder = http1::Builder::new();
    builder
        .max_buf_size(MAX_BUF)
        .max_header_size(MAX_HEADER)
        .header_read_timeout(None)
        .keep_alive(true);
    let connections_stop = stop.clone();
    let mut tasks = JoinSet::new();
    let mut last_accept_log: Option<Instant> = None;
    loop {
        tokio::select! {
            biased;
            // (The Ref wait_for returns must not live across the awaits below.)
            () = async { drop(stop.wait_for(|s| *s).await) } => break,
            Some(done) = tasks.join_next() => report(done),
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tracker.metrics.accepted.inc();
                    // Let the connections accepted so far run before the next accept: during a
                    // flood, accept is always ready, and without this (tokio's budget allows
                    // 128 accepts in a row) a scraper whose request is already here could be
                    // evicted before its task ever parsed it.
                    tokio::task::yield_now().await;
                    match tracker.admit() {
                        Some(slot) => {
                            let conn = serve_connection(
                                stream,
                                slot,
                                builder.clone(),
                                router.clone(),
                                connections_stop.clone(),
                            );
                            tasks.spawn(conn);
                        }
                        None => {
                            tracker.metrics.closed(CloseReason::refused);
                            refuse(stream, tracker.limits.borrow().max_connections);
                        }
                    }
                }
                Err(e) => {
                    tracker.metrics.accept_errors.inc();
                    if last_accept_log.is_none_or(|t| t.elapsed() >= ACCEPT_LOG_INTERVAL) {
                        last_accept_log = Some(Instant::now());
                        warn!("HTTP: accepting a connection failed (counted in edgeplane_http_accept_errors_total): {e}");
                    }
                    if is_resource_error(&e) {
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                }
            },
        }
    }
    drop(listener);
    // Each connection closes itself within SHUTDOWN_GRACE; the margin is for a loaded machine.
    let drained = tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(2), async {
        while let Some(done) = tasks.join_next().await {
            report(done);
        }
    })
    .await;
    if drained.is_err() {
        warn!(
            connections = tasks.len(),
            "HTTP connections still open after the shutdown grace period: closing them"
        );
        tasks.abort_all();
        while let Some(done) = tasks.join_next().await {
            report(done);
        }
    }
}

/// A finished connection task: only a panic has something to say (the task counted itself).
fn report(done: Result<(), JoinError>) {
    let Err(e) = done else { return };
    if e.is_panic() {
        let panic = e.into_panic();
        let text = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        error!("HTTP connection task panicked, connection closed: {text}");
    }
}

fn is_resource_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// At the cap with every connection busy: say so, without waiting on the client.
fn refuse(stream: TcpStream, max: usize) {
    let body = format!(
        "too many connections: {max} are open and busy (http.max_connections); try again\n"
    );
    let reply = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    // Take what the client already sent, or closing would reset the connection (and drop
    // the reply) instead of ending it.
    let mut scratch = [0u8; 4096];
    while matches!(stream.try_read(&mut scratch), Ok(n) if n > 0) {}
    let _ = stream.try_write(reply.as_bytes());
}

/// Shared by the accept loop and every connection.
struct Tracker {
    limits: watch::Receiver<HttpConfig>,
    metrics: HttpMetrics,
    slots: Mutex<Slots>,
}

#[derive(Default)]
struct Slots {
    open: usize,
    next_ticket: u64,
    /// Connections waiting for a request, per [`Waiting`] class, by ticket: the first of
    /// each has waited longest.
    waiting: [BTreeMap<u64, Arc<Conn>>; 3],
}

/// What a connection waiting for a request is doing, in the order eviction takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waiting {
    /// It sent part of a header and stopped: what a flood of half-open connections looks like
    /// (real clients send a request whole).
    Partial = 0,
    /// Kept alive between requests: its client reconnects when it needs to.
    Idle = 1,
    /// Accepted, nothing read yet: most likely a client whose request is on its way.
    Fresh = 2,
}

impl Tracker {
    fn slots(&self) -> MutexGuard<'_, Slots> {
        // Nothing under this lock can leave it inconsistent: a panic elsewhere must not
        // stop the server.
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A slot for a new connection, waiting for its first request: a free one, or the one
    /// of the connection that has waited longest for a request, half-open ones first (it is
    /// told to go). None when every connection is busy.
    fn admit(self: &Arc<Self>) -> Option<Slot> {
        let max = self.limits.borrow().max_connections;
        let conn = Arc::new(Conn::new(Instant::now()));
        let mut slots = self.slots();
        if slots.open >= max {
            let (_, victim) = slots.waiting.iter_mut().find_map(BTreeMap::pop_first)?;
            // Its slot is now the newcomer's: it must not free it again (nor wait again).
            victim.evicted.store(true, Ordering::Release);
            victim.evict.notify_one();
        } else {
            slots.open += 1;
            self.metrics.connections.set(slots.open as i64);
        }
        let ticket = slots.next_ticket;
        slots.next_ticket += 1;
        Self::enqueue(&mut slots, &conn, &mut conn.state(), Waiting::Fresh, ticket);
        Some(Slot {
            tracker: self.clone(),
            conn,
            reason: None,
        })
    }

    /// Under the slots lock, so an eviction can't slip in between the check and the insert.
    fn enqueue(
        slots: &mut Slots,
        conn: &Arc<Conn>,
        state: &mut ConnState,
        class: Waiting,
        ticket: u64,
    ) {
        Self::dequeue(slots, state);
        if !conn.evicted.load(Ordering::Acquire) {
            slots.waiting[class as usize].insert(ticket, conn.clone());
            state.queued = Some((class, ticket));
        }
    }

    fn dequeue(slots: &mut Slots, state: &mut ConnState) {
        if let Some((class, ticket)) = state.queued.take() {
            slots.waiting[class as usize].remove(&ticket);
        }
    }

    /// Request bytes arrived.
    fn read_some(&self, conn: &Arc<Conn>) {
        let mut state = conn.state();
        match (state.phase, state.queued) {
            // A fresh connection's first bytes: its place stays (it has waited since accept).
            (Phase::Header { .. }, Some((Waiting::Fresh, ticket))) => {
                Self::enqueue(
                    &mut self.slots(),
                    conn,
                    &mut state,
                    Waiting::Partial,
                    ticket,
                );
            }
            // A kept-alive connection's next request begins: its header deadline starts now.
            (Phase::Idle { .. }, _) => {
                state.phase = Phase::Header {
                    since: Instant::now(),
                };
                let mut slots = self.slots();
                let ticket = slots.next_ticket;
                slots.next_ticket += 1;
                Self::enqueue(&mut slots, conn, &mut state, Waiting::Partial, ticket);
            }
            _ => {}
        }
    }

    fn request_started(&self, conn: &Conn) {
        let mut state = conn.state();
        state.phase = Phase::Busy;
        if state.queued.is_some() {
            Self::dequeue(&mut self.slots(), &mut state);
        }
    }

    fn response_finished(&self, conn: &Arc<Conn>) {
        let mut state = conn.state();
        state.phase = Phase::Idle {
            since: Instant::now(),
        };
        let mut slots = self.slots();
        let ticket = slots.next_ticket;
        slots.next_ticket += 1;
        Self::enqueue(&mut slots, conn, &mut state, Waiting::Idle, ticket);
    }

    fn release(&self, conn: &Conn, reason: CloseReason) {
        let mut state = conn.state();
        let mut slots = self.slots();
        Self::dequeue(&mut slots, &mut state);
        if !conn.evicted.load(Ordering::Acquire) {
            slots.open -= 1;
            self.metrics.connections.set(slots.open as i64);
        }
        self.metrics.closed(reason);
    }
}

/// A connection's hold on its slot, released (and the close counted) however its task ends.
struct Slot {
    tracker: Arc<Tracker>,
    conn: Arc<Conn>,
    reason: Option<CloseReason>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let reason = self.reason.unwrap_or(if std::thread::panicking() {
            CloseReason::internal_error
        } else {
            // Only the final abort of a shutdown that overran drops a task unfinished.
            CloseReason::shutdown
        });
        self.tracker.release(&self.conn, reason);
    }
}

/// One connection's state, shared by its task, its socket wrapper and its service.
struct Conn {
    state: Mutex<ConnState>,
    /// Woken when a newcomer took this connection's slot.
    evict: Notify,
    evicted: AtomicBool,
}

struct ConnState {
    phase: Phase,
    /// Its place among the connections waiting for a request.
    queued: Option<(Waiting, u64)>,
    /// Since when a write has been waiting for the client to take data.
    write_blocked_since: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    /// The request header must be complete by `since + header_timeout`.
    Header { since: Instant },
    /// Kept alive, no byte of a next request yet.
    Idle { since: Instant },
    /// A request is being answered.
    Busy,
}

impl Conn {
    fn new(now: Instant) -> Self {
        Self {
            state: Mutex::new(ConnState {
                phase: Phase::Header { since: now },
                queued: None,
                write_blocked_since: None,
            }),
            evict: Notify::new(),
            evicted: AtomicBool::new(false),
        }
    }

    fn state(&self) -> MutexGuard<'_, ConnState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn waiting_for_request(&self) -> bool {
        !matches!(self.state().phase, Phase::Busy)
    }

    /// The next deadline and what closes the connection at it; none while a response is being
    /// made or sent without stalling.
    fn deadline(
        &self,
        limits: &HttpConfig,
        stopping_since: Option<Instant>,
    ) -> Option<(Instant, CloseReason)> {
        let state = self.state();
        let phase = match state.phase {
            Phase::Header { since } => {
                Some((since + limits.header_timeout(), CloseReason::header_timeout))
            }
            Phase::Idle { since } => {
                Some((since + limits.idle_timeout(), CloseReason::idle_timeout))
            }
            Phase::Busy => None,
        };
        let write = state
            .write_blocked_since
            .map(|t| (t + limits.write_timeout(), CloseReason::write_timeout));
        let stop = stopping_since.map(|t| (t + SHUTDOWN_GRACE, CloseReason::shutdown));
        [phase, write, stop]
            .into_iter()
            .flatten()
            .min_by_key(|(at, _)| *at)
    }

    fn wrote<T>(&self, result: &Poll<io::Result<T>>) {
        match result {
            Poll::Pending => {
                self.state()
                    .write_blocked_since
                    .get_or_insert_with(Instant::now);
            }
            Poll::Ready(_) => self.state().write_blocked_since = None,
        }
    }
}

/// Serves one connection until it ends or a deadline closes it; counts how it ended.
async fn serve_connection(
    stream: TcpStream,
    mut slot: Slot,
    builder: http1::Builder,
    router: Router,
    stop: watch::Receiver<bool>,
) {
    // Responses are written whole; don't hold their last segment back (Nagle).
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(TrackedIo {
        stream,
        tracker: slot.tracker.clone(),
        conn: slot.conn.clone(),
    });
    let service = TrackedService {
        router,
        tracker: slot.tracker.clone(),
        conn: slot.conn.clone(),
    };
    let connection = builder.serve_connection(io, service);
    let reason = drive(connection, &slot.conn, &slot.tracker.limits, stop).await;
    slot.reason = Some(reason);
}

async fn drive(
    connection: Connection<TokioIo<TrackedIo>, TrackedService>,
    conn: &Conn,
    limits: &watch::Receiver<HttpConfig>,
    mut stop: watch::Receiver<bool>,
) -> CloseReason {
    let mut connection = pin!(connection);
    let mut evicted = pin!(conn.evict.notified());
    let mut stopped = pin!(async move {
        let _ = stop.wait_for(|s| *s).await;
    });
    let mut timer = pin!(tokio::time::sleep(Duration::ZERO));
    let mut armed: Option<Instant> = None;
    let mut stopping_since: Option<Instant> = None;
    poll_fn(|cx| {
        if stopping_since.is_none() && stopped.as_mut().poll(cx).is_ready() {
            stopping_since = Some(Instant::now());
            if conn.waiting_for_request() {
                return Poll::Ready(CloseReason::shutdown);
            }
            // Finish the response in progress, then close.
            connection.as_mut().graceful_shutdown();
        }
        if evicted.as_mut().poll(cx).is_ready() {
            return Poll::Ready(CloseReason::evicted);
        }
        if let Poll::Ready(result) = connection.as_mut().poll(cx) {
            return Poll::Ready(match result {
                Ok(()) if stopping_since.is_some() => CloseReason::shutdown,
                Ok(()) => CloseReason::completed,
                Err(e) if e.is_parse() || e.is_parse_too_large() => CloseReason::malformed,
                Err(_) => CloseReason::aborted,
            });
        }
        // The deadline as the connection stands after that poll, which may have moved it.
        let Some((at, reason)) = conn.deadline(&limits.borrow(), stopping_since) else {
            return Poll::Pending;
        };
        if armed != Some(at) {
            timer.as_mut().reset(at);
            armed = Some(at);
        }
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(reason),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// The socket, telling its connection when request bytes arrive and when writes stall.
struct TrackedIo {
    stream: TcpStream,
    tracker: Arc<Tracker>,
    conn: Arc<Conn>,
}

impl AsyncRead for TrackedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.stream).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.tracker.read_some(&this.conn);
        }
        result
    }
}

impl AsyncWrite for TrackedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.stream).poll_write(cx, data);
        this.conn.wrote(&result);
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.conn.wrote(&result);
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The router, with each request marking its connection busy until its response is sent.
#[derive(Clone)]
struct TrackedService {
    router: Router,
    tracker: Arc<Tracker>,
    conn: Arc<Conn>,
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<Response<TrackedBody>, Infallible>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for TrackedService {
    type Response = Response<TrackedBody>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        self.tracker.request_started(&self.conn);
        let done = ResponseDone {
            tracker: self.tracker.clone(),
            conn: self.conn.clone(),
        };
        let mut router = self.router.clone();
        // A Router is always ready (its poll_ready is `Ready(Ok(()))`): call it directly.
        Box::pin(async move {
            let response = tower_service::Service::call(&mut router, request).await?;
            Ok(response.map(|inner| TrackedBody { inner, _done: done }))
        })
    }
}

/// Marks the connection idle when the response is done with: hyper drops the body once it
/// has taken all of it (or when the connection goes).
struct ResponseDone {
    tracker: Arc<Tracker>,
    conn: Arc<Conn>,
}

impl Drop for ResponseDone {
    fn drop(&mut self) {
        self.tracker.response_finished(&self.conn);
    }
}

struct TrackedBody {
    inner: axum::body::Body,
    _done: ResponseDone,
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    //! Real sockets on loopback: std clients in blocking threads against the server.

    use std::{
        io::{Read as _, Write as _},
        net::{SocketAddr, TcpStream as StdStream},
        time::Instant as StdInstant,
    };

    use axum::routing::get;

    use super::*;

    struct TestServer {
        addr: SocketAddr,
        metrics: HttpMetrics,
        stop: watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
        _config: watch::Sender<HttpConfig>,
    }

    fn config(header_ms: u64, idle_ms: u64, write_ms: u64, max_connections: usize) -> HttpConfig {
        HttpConfig {
            header_timeout_ms: header_ms,
            idle_timeout_ms: idle_ms,
            write_timeout_ms: write_ms,
            max_connections,
            max_event_streams: 0,
            ..HttpConfig::default()
        }
    }

    async fn start(config: HttpConfig) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new()
            .route("/", get(|| async { "ok\n" }))
            .route("/big", get(|| async { vec![b'x'; 64 << 20] }))
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    "slow\n"
                }),
            )
            .route(
                "/stream",
                get(|| async {
                    axum::body::Body::from_stream(
                        tokio_stream::pending::<Result<Bytes, Infallible>>(),
                    )
                }),
            );
        let metrics = HttpMetrics::default();
        let (config_tx, config_rx) = watch::channel(config);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(listener, router, config_rx, metrics.clone(), stop_rx));
        TestServer {
            addr,
            metrics,
            stop,
            task,
            _config: config_tx,
        }
    }

    impl TestServer {
        fn closed(&self, reason: CloseReason) -> u64 {
            self.metrics
                .closed
                .get_or_create(&crate::metrics::CloseLabels { reason })
                .get()
        }

        /// Waits (at most 5 s) until `reason` counted `n` closes.
        async fn wait_closed(&self, reason: CloseReason, n: u64) {
            let deadline = StdInstant::now() + Duration::from_secs(5);
            while self.closed(reason) != n {
                assert!(
                    StdInstant::now() < deadline,
                    "{reason:?}: {} closes, not {n}",
                    self.closed(reason)
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }

        async fn wait_open(&self, n: i64) {
            let deadline = StdInstant::now() + Duration::from_secs(5);
            while self.metrics.connections.get() != n {
                assert!(
                    StdInstant::now() < deadline,
                    "{} connections open, not {n}",
                    self.metrics.connections.get()
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    fn connect(addr: SocketAddr, send: &[u8]) -> StdStream {
        let mut s = StdStream::connect(addr).unwrap();
        s.write_all(send).unwrap();
        s
    }

    /// Reads until EOF (or a reset); returns what came and how long it took. Panics after
    /// `limit`.
    fn read_to_close(s: &mut StdStream, limit: Duration) -> (Vec<u8>, Duration) {
        let start = StdInstant::now();
        s.set_read_timeout(Some(limit)).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 65536];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!(
                    "still open after {:?} ({e}); got {:?}",
                    start.elapsed(),
                    String::from_utf8_lossy(&got)
                ),
            }
        }
        (got, start.elapsed())
    }

    /// One response on a kept-alive connection (the bodies here have a Content-Length).
    fn read_response(s: &mut StdStream) -> String {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).unwrap();
            assert!(
                n > 0,
                "closed mid-response: {:?}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length: ")
                            .map(str::to_owned)
                    })
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if body.len() >= len {
                    return text;
                }
            }
        }
    }

    fn still_open(s: &mut StdStream) -> bool {
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        match s.read(&mut [0u8; 64]) {
            Ok(0) => false,
            Ok(n) => panic!("{n} bytes on a connection that sent no request"),
            Err(e) => matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
        }
    }

    async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        tokio::task::spawn_blocking(f).await.unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_half_open_connection_closes_at_the_header_timeout() {
        let server = start(config(300, 10_000, 10_000, 16)).await;
        let addr = server.addr;
        let took = blocking(move || {
            let mut s = connect(addr, b"GET / HTTP/1.1\r\nHost: x\r\n");
            read_to_close(&mut s, Duration::from_secs(5)).1
        })
        .await;
        assert!(took >= Duration::from_millis(280), "{took:?}");
        server.wait_closed(CloseReason::header_timeout, 1).await;
        server.wait_open(0).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_header_sent_byte_by_byte_does_not_extend_the_deadline() {
        let server = start(config(400, 10_000, 10_000, 16)).await;
        let addr = server.addr;
        let took = blocking(move || {
            let start = StdInstant::now();
            let mut s = StdStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            for b in b"GET / HTTP/1.1\r\nHost: xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx".iter().cycle() {
                if s.write_all(&[*b]).is_err() {
                    break;
                }
                match s.read(&mut [0u8; 64]) {
                    Ok(_) => break,
                    Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
                    Err(_) => {}
                }
                assert!(start.elapsed() < Duration::from_secs(5), "still open");
            }
            start.elapsed()
        })
        .await;
        assert!(took >= Duration::from_millis(380), "{took:?}");
        server.wait_closed(CloseReason::header_timeout, 1).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_kept_alive_connection_closes_at_the_idle_timeout() {
        let server = start(config(5_000, 400, 10_000, 16)).await;
        let addr = server.addr;
        let took = blocking(move || {
            let mut s = connect(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
            assert!(read_response(&mut s).ends_with("\r\n\r\nok\n"));
            // Kept alive: a second request on it is answered.
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            assert!(read_response(&mut s).starts_with("HTTP/1.1 200"));
            read_to_close(&mut s, Duration::from_secs(4)).1
        })
        .await;
        assert!(
            (Duration::from_millis(380)..Duration::from_secs(3)).contains(&took),
            "{took:?}"
        );
        server.wait_closed(CloseReason::idle_timeout, 1).await;
        assert_eq!(server.closed(CloseReason::header_timeout), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_later_request_has_the_header_timeout_from_its_first_byte() {
        let server = start(config(400, 10_000, 10_000, 16)).await;
        let addr = server.addr;
        let took = blocking(move || {
            let mut s = connect(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
            read_response(&mut s);
            // Idle for longer than the header timeout: the idle timeout applies.
            std::thread::sleep(Duration::from_millis(800));
            s.write_all(b"GET / HTTP/1.1\r\n").unwrap();
            read_to_close(&mut s, Duration::from_secs(4)).1
        })
        .await;
        assert!(
            (Duration::from_millis(380)..Duration::from_secs(3)).contains(&took),
            "{took:?}"
        );
        server.wait_closed(CloseReason::header_timeout, 1).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_stops_reading_is_closed_at_the_write_timeout() {
        let server = start(config(5_000, 10_000, 300, 16)).await;
        let addr = server.addr;
        // 64 MiB never read: the socket buffers fill and the writes stall.
        let s = blocking(move || connect(addr, b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")).await;
        server.wait_closed(CloseReason::write_timeout, 1).await;
        server.wait_open(0).await;
        drop(s);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn at_the_cap_the_connection_waiting_longest_is_evicted() {
        let server = start(config(30_000, 30_000, 10_000, 3)).await;
        let addr = server.addr;
        let mut waiting = Vec::new();
        for n in 1..=3 {
            waiting.push(blocking(move || connect(addr, b"GET / HTTP/1.1\r\n")).await);
            server.wait_open(n).await;
        }
        let (mut waiting, answer) = blocking(move || {
            let mut s = connect(
                addr,
                b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            );
            let answer = read_to_close(&mut s, Duration::from_secs(5)).0;
            (waiting, answer)
        })
        .await;
        assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
        server.wait_closed(CloseReason::evicted, 1).await;
        let open = blocking(move || {
            let first = read_to_close(&mut waiting[0], Duration::from_secs(2)).1;
            assert!(first < Duration::from_secs(2));
            (still_open(&mut waiting[1]), still_open(&mut waiting[2]))
        })
        .await;
        assert_eq!(open, (true, true), "only the oldest goes");
        assert_eq!(server.metrics.accepted.get(), 4);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn half_open_connections_are_evicted_before_a_fresh_one() {
        let server = start(config(30_000, 30_000, 10_000, 3)).await;
        let addr = server.addr;
        // The oldest sent nothing yet (a client whose request is on its way).
        let mut fresh = blocking(move || connect(addr, b"")).await;
        server.wait_open(1).await;
        let mut half = Vec::new();
        for n in 2..=3 {
            half.push(blocking(move || connect(addr, b"GET / HTTP/1.1\r\n")).await);
            server.wait_open(n).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _newcomer = blocking(move || connect(addr, b"")).await;
        server.wait_closed(CloseReason::evicted, 1).await;
        let (fresh_open, first_half) = blocking(move || {
            let first_half = read_to_close(&mut half[0], Duration::from_secs(2)).1;
            (still_open(&mut fresh), first_half)
        })
        .await;
        assert!(fresh_open, "the fresh connection was evicted");
        assert!(first_half < Duration::from_secs(2));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn at_the_cap_with_every_connection_busy_a_newcomer_is_refused() {
        let server = start(config(30_000, 30_000, 10_000, 2)).await;
        let addr = server.addr;
        let mut streams = Vec::new();
        for n in 1..=2 {
            streams.push(
                blocking(move || connect(addr, b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")).await,
            );
            server.wait_open(n).await;
        }
        // Busy, not waiting: wait until both streams' heads were parsed.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let answer = blocking(move || {
            // Nothing sent: a request not yet read when the refusal closes would turn the
            // close into a reset (refuse() takes only what has arrived).
            let mut s = connect(addr, b"");
            String::from_utf8(read_to_close(&mut s, Duration::from_secs(5)).0).unwrap()
        })
        .await;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(answer.contains("(http.max_connections)"), "{answer}");
        assert_eq!(server.closed(CloseReason::refused), 1);
        assert_eq!(server.closed(CloseReason::evicted), 0);
        assert_eq!(server.metrics.connections.get(), 2);
        drop(streams);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn malformed_and_oversized_requests_are_answered_and_counted() {
        let server = start(config(5_000, 5_000, 5_000, 16)).await;
        let addr = server.addr;
        let (bad, big) = blocking(move || {
            let mut s = connect(addr, b"NOT HTTP AT ALL\r\n\r\n");
            let bad = read_to_close(&mut s, Duration::from_secs(5)).0;
            let mut s = StdStream::connect(addr).unwrap();
            let mut huge = b"GET / HTTP/1.1\r\nX: ".to_vec();
            huge.extend(std::iter::repeat_n(b'a', 20_000));
            let _ = s.write_all(&huge);
            let big = read_to_close(&mut s, Duration::from_secs(5)).0;
            (
                String::from_utf8_lossy(&bad).into_owned(),
                String::from_utf8_lossy(&big).into_owned(),
            )
        })
        .await;
        assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
        assert!(big.is_empty() || big.starts_with("HTTP/1.1 431"), "{big}");
        server.wait_closed(CloseReason::malformed, 2).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_closes_waiting_connections_and_lets_a_response_finish() {
        let mut server = start(config(30_000, 30_000, 10_000, 16)).await;
        let addr = server.addr;
        let waiting = blocking(move || connect(addr, b"GET / HTTP/1.1\r\n")).await;
        let slow = blocking(move || connect(addr, b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")).await;
        server.wait_open(2).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let stopped = StdInstant::now();
        server.stop.send_replace(true);
        let (waited, answer) = blocking(move || {
            let (mut waiting, mut slow) = (waiting, slow);
            let waited = read_to_close(&mut waiting, Duration::from_secs(2)).1;
            let answer = read_to_close(&mut slow, Duration::from_secs(5)).0;
            (waited, String::from_utf8(answer).unwrap())
        })
        .await;
        assert!(waited < Duration::from_millis(300), "{waited:?}");
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("slow\n"),
            "{answer}"
        );
        tokio::time::timeout(Duration::from_secs(3), &mut server.task)
            .await
            .expect("the server returns once its connections are done")
            .unwrap();
        assert!(stopped.elapsed() < Duration::from_secs(2));
        assert_eq!(server.closed(CloseReason::shutdown), 2);
        assert_eq!(server.metrics.connections.get(), 0);
    }
}
