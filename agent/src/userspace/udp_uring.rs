//! The tokio-uring engine: each listener runs on a thread of its own with an io_uring runtime;
//! every receive and send is one io_uring operation (tokio-uring has no multi-message receive),
//! completed without readiness polling.

use std::{io, sync::atomic::Ordering::Relaxed, thread};

use tokio::sync::oneshot;
use tracing::warn;

use super::udp::Listener;

/// Room for the largest UDP datagram, so none is ever truncated.
const SLOT: usize = 1 << 16;

/// A listener's thread; stopped and joined on drop.
pub(super) struct UringWorker {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Drop for UringWorker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts the listener's thread; fails when this kernel has no usable io_uring.
pub(super) fn spawn(l: Listener) -> io::Result<UringWorker> {
    // io_uring completes operations on blocking sockets asynchronously; on a non-blocking one
    // it would hand EAGAIN back instead of waiting.
    l.socket.set_nonblocking(false)?;
    for e in &l.egress {
        e.set_nonblocking(false)?;
    }
    let (stop, stopped) = oneshot::channel();
    let (started, start_result) = std::sync::mpsc::channel();
    let thread = thread::Builder::new()
        .name("edgeplane-uring".into())
        .spawn(move || {
            let rt = match tokio_uring::Runtime::new(&tokio_uring::builder()) {
                Ok(rt) => {
                    let _ = started.send(Ok(()));
                    rt
                }
                Err(e) => {
                    let _ = started.send(Err(e));
                    return;
                }
            };
            rt.block_on(async move {
                tokio::select! {
                    _ = stopped => {}
                    () = forward(l) => {}
                }
            });
        })?;
    let worker = UringWorker {
        stop: Some(stop),
        thread: Some(thread),
    };
    start_result
        .recv()
        .map_err(|_| io::Error::other("the io_uring thread exited while starting"))??;
    Ok(worker)
}

async fn forward(l: Listener) {
    let socket = tokio_uring::net::UdpSocket::from_std(l.socket);
    let egress: Vec<tokio_uring::net::UdpSocket> = l
        .egress
        .into_iter()
        .map(tokio_uring::net::UdpSocket::from_std)
        .collect();
    let mut buf = Vec::with_capacity(SLOT);
    loop {
        buf.clear();
        let (res, b) = socket.recv_from(buf).await;
        buf = b;
        let (len, src) = match res {
            Ok(r) => r,
            Err(e) => {
                warn!("userspace UDP listener stopped: io_uring recv: {e}");
                return;
            }
        };
        let Some(r) = l.table.lookup(&src) else {
            l.unmatched.fetch_add(1, Relaxed);
            continue;
        };
        let route = &l.routes[r];
        let (res, b) = egress[route.egress].send_to(buf, route.dst).await;
        buf = b;
        let c = &route.counters;
        match res {
            Ok(_) => {
                c.packets.fetch_add(1, Relaxed);
                c.bytes.fetch_add(route.header_bytes + len as u64, Relaxed);
            }
            Err(_) => {
                c.send_errors.fetch_add(1, Relaxed);
            }
        }
    }
}
