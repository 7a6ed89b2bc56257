//! The tunnel's sending side: a thread that drains the kernel's ring buffer and batches frames
//! into datagrams per peer, sending one when it is full or its first frame has waited
//! `flush` long. A thread with `ppoll` rather than a tokio task: tokio's timers have
//! millisecond resolution, the flush deadline is sub-millisecond.

use std::{
    net::{SocketAddr, UdpSocket},
    os::fd::{AsFd as _, AsRawFd as _},
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use edgeplane_common::can::CanTunnelRecord;
use tracing::warn;

use super::{
    codec::{Encoder, TunnelFrame},
    metrics::TunnelMetrics,
};

/// What the sender does; the agent replaces it on reload.
#[derive(Debug, Clone, PartialEq)]
pub struct SenderConfig {
    /// Indexed by the tunnel id in the kernel's records.
    pub peers: Vec<SocketAddr>,
    pub flush: Duration,
    pub max_datagram: usize,
    pub bind: SocketAddr,
}

pub struct Sender {
    config: Arc<RwLock<(u64, SenderConfig)>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

struct Batch {
    peer: SocketAddr,
    label: String,
    enc: Encoder,
    /// Monotonic ns by which the batch must leave; 0 when empty.
    deadline: u64,
    /// Kernel arrival times of the batched frames.
    arrivals: Vec<u64>,
    seq: u8,
}

impl Sender {
    pub fn start(
        ring: RingBuf<MapData>,
        config: SenderConfig,
        metrics: Arc<TunnelMetrics>,
    ) -> std::io::Result<Self> {
        let socket = UdpSocket::bind(config.bind)?;
        let shared = Arc::new(RwLock::new((0, config)));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("can-tunnel-tx".into())
            .spawn({
                let (shared, stop) = (Arc::clone(&shared), Arc::clone(&stop));
                move || run(ring, socket, &shared, &stop, &metrics)
            })?;
        Ok(Self {
            config: shared,
            stop,
            thread: Some(thread),
        })
    }

    pub fn reconfigure(&self, config: SenderConfig) {
        let mut c = self.config.write().expect("lock");
        if c.1 != config {
            *c = (c.0 + 1, config);
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out pointer; CLOCK_MONOTONIC is bpf_ktime_get_ns()'s clock.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn batches_for(c: &SenderConfig) -> Vec<Batch> {
    c.peers
        .iter()
        .map(|p| Batch {
            peer: *p,
            label: p.to_string(),
            enc: Encoder::new(c.max_datagram),
            deadline: 0,
            arrivals: Vec::new(),
            seq: 0,
        })
        .collect()
}

fn run(
    mut ring: RingBuf<MapData>,
    mut socket: UdpSocket,
    shared: &RwLock<(u64, SenderConfig)>,
    stop: &AtomicBool,
    metrics: &TunnelMetrics,
) {
    let (mut generation, mut config) = shared.read().expect("lock").clone();
    let mut batches = batches_for(&config);
    let mut bound = config.bind;
    let ring_fd = ring.as_fd().as_raw_fd();
    while !stop.load(Ordering::Relaxed) {
        // Reconfigured: send what is batched under the old settings first.
        let latest = shared.read().expect("lock").0;
        if latest != generation {
            for b in &mut batches {
                send(&socket, b, metrics);
            }
            (generation, config) = shared.read().expect("lock").clone();
            if config.bind != bound {
                match UdpSocket::bind(config.bind) {
                    Ok(s) => {
                        socket = s;
                        bound = config.bind;
                    }
                    Err(e) => warn!(
                        "can tunnel: cannot bind {}: {e}; keeping the old socket",
                        config.bind
                    ),
                }
            }
            batches = batches_for(&config);
        }

        while let Some(item) = ring.next() {
            if item.len() < size_of::<CanTunnelRecord>() {
                continue;
            }
            // SAFETY: the kernel wrote a whole CanTunnelRecord; read it unaligned.
            let rec: CanTunnelRecord = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            drop(item);
            let Some(b) = batches.get_mut(rec.tunnel as usize) else {
                continue;
            };
            let frame = TunnelFrame {
                frame: rec.frame,
                fd: rec.fd != 0,
            };
            if !b.enc.push(&frame) {
                send(&socket, b, metrics);
                b.enc.push(&frame);
            }
            // The deadline runs from the frame's arrival in the kernel, not from when this
            // thread saw it: a late wake-up then shortens the wait instead of adding to it.
            if b.deadline == 0 {
                b.deadline = rec.ts_ns + config.flush.as_nanos() as u64;
            }
            b.arrivals.push(rec.ts_ns);
        }

        let now = monotonic_ns();
        for b in batches
            .iter_mut()
            .filter(|b| b.deadline != 0 && b.deadline <= now)
        {
            send(&socket, b, metrics);
        }
        // Sleep until the next deadline or new records (100 ms at most, to notice stop).
        let next = batches
            .iter()
            .filter(|b| b.deadline != 0)
            .map(|b| b.deadline)
            .min();
        let wait = next.map_or(100_000_000, |d| {
            d.saturating_sub(monotonic_ns()).min(100_000_000)
        });
        let ts = libc::timespec {
            tv_sec: (wait / 1_000_000_000) as libc::time_t,
            tv_nsec: (wait % 1_000_000_000) as libc::c_long,
        };
        let mut pfd = libc::pollfd {
            fd: ring_fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; a null signal mask.
        unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
    }
    for b in &mut batches {
        send(&socket, b, metrics);
    }
}

fn send(socket: &UdpSocket, b: &mut Batch, metrics: &TunnelMetrics) {
    if b.enc.is_empty() {
        return;
    }
    let frames = u64::from(b.enc.count());
    let datagram = b.enc.finish(b.seq);
    b.seq = b.seq.wrapping_add(1);
    b.deadline = 0;
    let result = socket.send_to(&datagram, b.peer);
    let now = monotonic_ns();
    metrics.update(&b.label, |c| match result {
        Ok(_) => {
            c.tx_datagrams += 1;
            c.tx_frames += frames;
            for t in &b.arrivals {
                c.record_queue(now.saturating_sub(*t));
            }
        }
        Err(_) => {
            c.send_errors += 1;
            c.unsent_frames += frames;
        }
    });
    b.arrivals.clear();
}
