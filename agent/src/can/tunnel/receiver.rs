//! The tunnel's receiving side: datagrams on a UDP socket, decoded and checked whole, their
//! frames written to a CAN netdev through a CAN_RAW socket with CAN FD enabled.

use std::{
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use edgeplane_common::can::{CAN_MTU, CanFrame};
use socketcan::{CanAnyFrame, tokio::CanFdSocket};
use tokio::{net::UdpSocket, task::JoinHandle};
use tracing::debug;

use super::{
    codec::{TunnelFrame, decode},
    metrics::{TunnelMetrics, UNKNOWN_PEER},
};

pub fn spawn(
    name: String,
    udp: UdpSocket,
    can: CanFdSocket,
    peer: Option<IpAddr>,
    metrics: Arc<TunnelMetrics>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        loop {
            let Ok((n, from)) = udp.recv_from(&mut buf).await else {
                continue;
            };
            if peer.is_some_and(|p| p != from.ip()) {
                metrics.update(&name, |c| c.rejected[UNKNOWN_PEER] += 1);
                continue;
            }
            let frames = match decode(&buf[..n]) {
                Ok(f) => f,
                Err(e) => {
                    debug!(tunnel = name, %from, "rejected datagram: {e}");
                    metrics.update(&name, |c| {
                        let i = super::codec::DecodeError::LABELS
                            .iter()
                            .position(|l| *l == e.label())
                            .unwrap_or(0);
                        c.rejected[i] += 1;
                    });
                    continue;
                }
            };
            let mut written = 0;
            let mut failed = 0;
            for f in &frames {
                match write(&can, &to_socketcan(f)).await {
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
async fn write(can: &CanFdSocket, frame: &CanAnyFrame) -> std::io::Result<()> {
    let deadline = Instant::now() + WRITE_PATIENCE;
    let mut pause = Duration::from_micros(500);
    loop {
        match can.write_frame(frame).await {
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) && Instant::now() < deadline => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

fn to_socketcan(f: &TunnelFrame) -> CanAnyFrame {
    let bytes: &[u8; size_of::<CanFrame>()] =
        // SAFETY: CanFrame is repr(C) plain data of exactly this size.
        unsafe { &*(&raw const f.frame).cast() };
    if f.fd {
        // SAFETY: CanFrame has canfd_frame's layout (asserted in edgeplane-common).
        let raw: libc::canfd_frame = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        CanAnyFrame::from(raw)
    } else {
        // SAFETY: its first CAN_MTU bytes have can_frame's layout.
        let raw: libc::can_frame =
            unsafe { std::ptr::read_unaligned(bytes[..CAN_MTU].as_ptr().cast()) };
        CanAnyFrame::from(raw)
    }
}
