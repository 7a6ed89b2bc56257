//! Traffic for the forwarding benchmarks: a saturating sender (several flows, whole frames in
//! sendmmsg batches, see `frame_sender`) and a paced sender whose datagrams carry their CLOCK_MONOTONIC send
//! time, read by the receiver. CLOCK_MONOTONIC is not namespaced by network namespaces, so
//! sender and receiver read the same clock. Every loop stops at a packet count and a deadline.

use std::{
    net::{SocketAddr, UdpSocket},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use edgeplane_testbed::netns::Netns;

use crate::frame_sender::{self, Flow};

/// UDP payload of every benchmark datagram: a 106-byte IPv4 frame, as in prog-run.
pub const PAYLOAD: usize = 64;

pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// What the saturating sender did.
pub struct Blast {
    pub sent: u64,
    pub elapsed: Duration,
    /// Frames refused with ENOBUFS (dropped at a full veth ring), and other failed calls.
    pub enobufs: u64,
    pub other_errors: u64,
}

/// Sends `flow`'s frames as fast as `threads` threads can (each its own source port: a flow),
/// until `limit` frames or `duration`, whichever comes first. The threads run where the caller
/// may (the UDP suite pins itself to the traffic CPU).
pub fn blast(
    ns: &Netns,
    flow: &Flow,
    threads: usize,
    duration: Duration,
    limit: u64,
) -> anyhow::Result<Blast> {
    let start = Instant::now();
    let deadline = start + duration;
    let per_thread = limit / threads as u64;
    let counts = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let flow = Flow {
                    src_port: flow.src_port + i as u16,
                    ..*flow
                };
                s.spawn(move || {
                    crate::isolation::set_nice(0, crate::isolation::SATURATION_NICE);
                    frame_sender::send(ns, &flow, deadline, per_thread)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("sender thread"))
            .collect::<anyhow::Result<Vec<_>>>()
    })?;
    Ok(Blast {
        sent: counts.iter().map(|c| c.sent).sum(),
        elapsed: start.elapsed(),
        enobufs: counts.iter().map(|c| c.enobufs).sum(),
        other_errors: counts.iter().map(|c| c.other_errors).sum(),
    })
}

/// One-way latencies in ns of datagrams sent at `rate` per second for `duration`.
pub struct Latency {
    pub samples: Vec<u64>,
    pub sent: u64,
}

pub fn latency(
    sender: &Netns,
    receiver: &Netns,
    to: SocketAddr,
    bind: SocketAddr,
    rate: u64,
    duration: Duration,
) -> anyhow::Result<Latency> {
    let count = rate * duration.as_secs_f64() as u64;
    std::thread::scope(|s| {
        let (ready_tx, ready_rx) = mpsc::channel();
        let rx = s.spawn(move || realtime(|| receive_timestamps(receiver, bind, count, ready_tx)));
        ready_rx
            .recv()
            .context("the latency receiver did not start")?;
        realtime(|| send_paced(sender, to, rate, count)).and_then(|sent| {
            Ok(Latency {
                samples: rx.join().expect("latency receiver")?,
                sent,
            })
        })
    })
}

/// Sends `count` timestamped datagrams at `rate` per second.
fn send_paced(sender: &Netns, to: SocketAddr, rate: u64, count: u64) -> anyhow::Result<u64> {
    {
        let _in = sender.enter()?;
        let sock = UdpSocket::bind("0.0.0.0:0")?;
        sock.connect(to)?;
        let interval = 1_000_000_000 / rate;
        let start = now_ns();
        let mut payload = [0u8; PAYLOAD];
        let mut sent = 0;
        for seq in 0..count {
            let due = start + seq * interval;
            // Sleep most of the way, spin the rest (a real-time thread's sleep has no slack).
            let now = now_ns();
            if due > now + SPIN_NS {
                std::thread::sleep(Duration::from_nanos(due - now - SPIN_NS));
            }
            while now_ns() < due {
                std::hint::spin_loop();
            }
            payload[..8].copy_from_slice(&now_ns().to_ne_bytes());
            if sock.send(&payload).is_ok() {
                sent += 1;
            }
        }
        Ok(sent)
    }
}

/// How long before a paced datagram is due the sender stops sleeping and spins.
const SPIN_NS: u64 = 20_000;
/// SCHED_FIFO priority of the latency phase's threads and of the forwarder meanwhile: the
/// machine is shared, and the latency of the data path is measured, not the scheduler's.
pub const LATENCY_PRIORITY: i32 = 10;

/// Runs `f` with this thread at SCHED_FIFO [`LATENCY_PRIORITY`], then back to SCHED_OTHER.
fn realtime<T>(f: impl FnOnce() -> T) -> T {
    set_policy(0, libc::SCHED_FIFO, LATENCY_PRIORITY);
    let out = f();
    set_policy(0, libc::SCHED_OTHER, 0);
    out
}

/// Sets the policy of thread `tid` (0: the calling one); failures leave it as it was.
pub fn set_policy(tid: i32, policy: i32, priority: i32) {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: a valid sched_param; a failure (no such thread) changes nothing.
    unsafe { libc::sched_setscheduler(tid, policy, &param) };
}

/// Sets the policy of every thread of process `pid`.
pub fn set_process_policy(pid: u32, policy: i32, priority: i32) -> anyhow::Result<()> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        if let Some(tid) = task?.file_name().to_str().and_then(|t| t.parse().ok()) {
            set_policy(tid, policy, priority);
        }
    }
    Ok(())
}

fn receive_timestamps(
    ns: &Netns,
    bind: SocketAddr,
    count: u64,
    ready: mpsc::Sender<()>,
) -> anyhow::Result<Vec<u64>> {
    let _in = ns.enter()?;
    let sock = UdpSocket::bind(bind)?;
    sock.set_read_timeout(Some(Duration::from_millis(500)))?;
    ready.send(())?;
    let mut samples = Vec::with_capacity(count as usize);
    let mut buf = [0u8; 2048];
    while (samples.len() as u64) < count {
        let Ok(n) = sock.recv(&mut buf) else {
            break;
        };
        let now = now_ns();
        if n >= 8 {
            let sent = u64::from_ne_bytes(buf[..8].try_into().expect("8 bytes"));
            samples.push(now.saturating_sub(sent));
        }
    }
    Ok(samples)
}

/// The `q` quantile (0..=1) of sorted samples.
pub fn quantile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    Some(sorted[i])
}

#[cfg(test)]
mod tests {
    use super::quantile;

    #[test]
    fn quantiles_of_sorted_samples() {
        let s: Vec<u64> = (1..=1000).collect();
        assert_eq!(quantile(&s, 0.5), Some(501));
        assert_eq!(quantile(&s, 0.99), Some(990));
        assert_eq!(quantile(&s, 0.999), Some(999));
        assert_eq!(quantile(&[], 0.5), None);
    }
}
