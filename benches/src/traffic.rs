//! Traffic for the forwarding benchmarks: a saturating sender (several flows, one thread per
//! core, sendmmsg batches) and a paced sender whose datagrams carry their CLOCK_MONOTONIC send
//! time, read by the receiver. CLOCK_MONOTONIC is not namespaced by network namespaces, so
//! sender and receiver read the same clock. Every loop stops at a packet count and a deadline.

use std::{
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd as _,
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use edgeplane_testbed::netns::Netns;

/// UDP payload of every benchmark datagram: a 106-byte IPv4 frame, as in prog-run.
pub const PAYLOAD: usize = 64;
/// Datagrams per sendmmsg.
const BATCH: usize = 64;

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
    /// sendmmsg calls that failed with ENOBUFS, and with any other error.
    pub enobufs: u64,
    pub other_errors: u64,
}

/// Sends as fast as `threads` threads can (each its own source port: a flow), until `limit`
/// datagrams or `duration`, whichever comes first. The threads run where the caller may (the
/// UDP suite pins itself to the traffic CPU).
pub fn blast(
    ns: &Netns,
    to: SocketAddr,
    threads: usize,
    duration: Duration,
    limit: u64,
) -> anyhow::Result<Blast> {
    let start = Instant::now();
    let per_thread = limit / threads as u64;
    let counts = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| s.spawn(move || blast_thread(ns, to, duration, per_thread)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("sender thread"))
            .collect::<anyhow::Result<Vec<_>>>()
    })?;
    Ok(Blast {
        sent: counts.iter().map(|c| c.0).sum(),
        elapsed: start.elapsed(),
        enobufs: counts.iter().map(|c| c.1).sum(),
        other_errors: counts.iter().map(|c| c.2).sum(),
    })
}

/// Datagrams sent, sendmmsg calls failed with ENOBUFS, with another error.
fn blast_thread(
    ns: &Netns,
    to: SocketAddr,
    duration: Duration,
    limit: u64,
) -> anyhow::Result<(u64, u64, u64)> {
    let _in = ns.enter()?;
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    sock.connect(to)?;
    let payload = [0x5au8; PAYLOAD];
    // SAFETY: all-zero is valid for these C structs; the pointers are set below.
    let mut iov: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
    let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    for i in 0..BATCH {
        iov[i] = libc::iovec {
            iov_base: payload.as_ptr().cast_mut().cast(),
            iov_len: PAYLOAD,
        };
        msgs[i].msg_hdr.msg_iov = &raw mut iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    let deadline = Instant::now() + duration;
    let (mut sent, mut enobufs, mut other) = (0u64, 0u64, 0u64);
    while sent < limit && Instant::now() < deadline {
        // SAFETY: BATCH headers pointing at the payload; the socket is connected.
        let n = unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0) };
        // ENOBUFS and the like: the datagram is gone (counted), try the next batch.
        if n > 0 {
            sent += n as u64;
        } else if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOBUFS) {
            enobufs += 1;
        } else {
            other += 1;
        }
    }
    Ok((sent, enobufs, other))
}

/// A socket on the receiver that takes the datagrams (no ICMP port unreachable back) and
/// is not read: at saturation the receiving host's UDP counters tell what arrived.
pub fn sink(ns: &Netns, bind: SocketAddr) -> anyhow::Result<UdpSocket> {
    let _in = ns.enter()?;
    UdpSocket::bind(bind).with_context(|| format!("binding the receiver to {bind}"))
}

/// Datagrams that reached the UDP layer of `ns` (delivered or dropped at a full socket).
pub fn udp_arrived(ns: &Netns) -> anyhow::Result<u64> {
    let snmp = ns.exec(&["cat", "/proc/net/snmp"])?;
    let mut lines = snmp.lines().filter(|l| l.starts_with("Udp: "));
    let (names, values) = (
        lines.next().context("no Udp header in /proc/net/snmp")?,
        lines.next().context("no Udp values in /proc/net/snmp")?,
    );
    let field = |name: &str| -> anyhow::Result<u64> {
        let i = names
            .split_whitespace()
            .position(|n| n == name)
            .with_context(|| format!("no {name} in /proc/net/snmp"))?;
        Ok(values
            .split_whitespace()
            .nth(i)
            .context("short Udp line")?
            .parse()?)
    };
    Ok(field("InDatagrams")? + field("RcvbufErrors")?)
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
