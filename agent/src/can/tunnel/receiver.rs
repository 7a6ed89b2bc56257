//! The tunnel's receiving side: datagrams on a UDP socket, from the configured peer only,
//! decoded and checked whole, replays dropped, and the frames the receiver's rules allow
//! written to a CAN netdev (CAN_RAW, CAN FD enabled) with exactly the bytes the datagram
//! carried.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use edgeplane_common::can::CanFrame;
use socketcan::CanFdSocket;
use tokio::{io::unix::AsyncFd, net::UdpSocket, task::JoinHandle};
use tracing::debug;

use super::{
    codec::decode,
    metrics::{REPLAY, TunnelMetrics, UNKNOWN_PEER},
    policy::FramePolicy,
    sequence::Sequences,
};
use crate::{config::CanReceive, userspace::can_socketcan};

pub fn spawn(
    config: CanReceive,
    udp: UdpSocket,
    can: AsyncFd<CanFdSocket>,
    metrics: Arc<TunnelMetrics>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let name = config.name.clone();
        let (peer, max_frames) = (config.peer, config.max_frames_per_datagram);
        let mut policy = FramePolicy::new(config, Instant::now());
        let mut sequences = Sequences::default();
        let mut buf = vec![0u8; 65536];
        loop {
            let Ok((n, from)) = udp.recv_from(&mut buf).await else {
                continue;
            };
            if !peer.admits(from) {
                metrics.update(&name, |c| c.rejected[UNKNOWN_PEER] += 1);
                continue;
            }
            let d = &buf[..n];
            let frames = match decode(d, max_frames) {
                Ok(f) => f,
                Err(e) => {
                    debug!(tunnel = name, %from, "rejected datagram: {e}");
                    metrics.update(&name, |c| c.rejected[e.index()] += 1);
                    continue;
                }
            };
            let verdict = sequences.observe(from, d[2], Instant::now());
            metrics.update(&name, |c| {
                for (total, n) in c.sequence.iter_mut().zip(verdict.events) {
                    *total += n;
                }
                c.rejected[REPLAY] += u64::from(verdict.duplicate);
            });
            if verdict.duplicate {
                debug!(tunnel = name, %from, seq = d[2], "dropped a replayed datagram");
                continue;
            }
            let mut written = 0;
            let mut failed = 0;
            let mut dropped = [0u64; super::metrics::DROP_LABELS.len()];
            for f in &frames {
                if let Err(reason) = policy.admit(f, Instant::now()) {
                    dropped[reason as usize] += 1;
                    continue;
                }
                match write(&can, &f.frame, f.fd).await {
                    Ok(()) => written += 1,
                    Err(e) => {
                        debug!(tunnel = name, "frame not written: {e}");
                        failed += 1;
                    }
                }
            }
            metrics.update(&name, |c| {
                c.rx_datagrams += 1;
                c.rx_frames += written;
                c.write_errors += failed;
                for (total, n) in c.dropped.iter_mut().zip(dropped) {
                    *total += n;
                }
            });
        }
    })
}

/// How long a frame may wait for room in the interface's transmit queue: a CAN controller
/// drains a full queue (txqueuelen 10 by default) in well under this at any bitrate in use,
/// so only a bus that stopped (bus-off, no ACK) makes the frame count as a write error.
const WRITE_PATIENCE: Duration = Duration::from_millis(200);

/// Writes `frame`, waiting out a full transmit queue: the qdisc refuses a frame with ENOBUFS
/// rather than blocking (a datagram carries a burst of frames; a real bus takes them at its
/// bitrate).
async fn write(can: &AsyncFd<CanFdSocket>, frame: &CanFrame, fd: bool) -> std::io::Result<()> {
    let deadline = Instant::now() + WRITE_PATIENCE;
    let mut pause = Duration::from_micros(500);
    loop {
        match can_socketcan::write(can, frame, fd).await {
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) && Instant::now() < deadline => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(20));
            }
            r => return r,
        }
    }
}
