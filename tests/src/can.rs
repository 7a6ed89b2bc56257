//! CAN test buses: vxcan pairs in a namespace, and raw CAN_RAW sockets that send and receive
//! exact `can_frame` / `canfd_frame` bytes.

use std::{
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use edgeplane_common::can::{CAN_MTU, CANFD_MTU, CanFrame};
use edgeplane_testbed::netns::Netns;
use socketcan::{CanFdSocket, Socket as _};

/// A frame as a test writes and expects it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// With the EFF/RTR flags.
    pub can_id: u32,
    pub fd: bool,
    /// CAN FD flags (BRS, ESI).
    pub flags: u8,
    /// Length or DLC; for remote frames the requested DLC.
    pub len: u8,
    pub data: Vec<u8>,
}

impl Frame {
    pub fn classic(can_id: u32, data: &[u8]) -> Self {
        Self {
            can_id,
            fd: false,
            flags: 0,
            len: data.len() as u8,
            data: data.to_vec(),
        }
    }

    pub fn fd(can_id: u32, data: &[u8]) -> Self {
        Self {
            can_id,
            fd: true,
            flags: 0x01,
            len: data.len() as u8,
            data: data.to_vec(),
        }
    }

    /// A frame as the kernel delivered it, CAN FD or not.
    fn from_raw(raw: &CanFrame, fd: bool) -> Self {
        let rtr = raw.can_id & edgeplane_common::can::CAN_RTR_FLAG != 0;
        let data_len = if rtr { 0 } else { usize::from(raw.len.min(64)) };
        Frame {
            can_id: raw.can_id,
            fd,
            // Newer kernels (Debian's 6.1 among them) mark CAN FD frames with CANFD_FDF (0x04)
            // themselves: not compared here (`recv_raw` gives the exact bytes).
            flags: if fd { raw.flags & !0x04 } else { 0 },
            len: raw.len,
            data: raw.data[..data_len].to_vec(),
        }
    }

    fn raw(&self) -> CanFrame {
        let mut f = CanFrame {
            can_id: self.can_id,
            len: self.len,
            flags: self.flags,
            ..CanFrame::default()
        };
        f.data[..self.data.len()].copy_from_slice(&self.data);
        f
    }
}

/// Creates a vxcan pair `a` <-> `b` in `ns`, both up; CAN FD capable (MTU 72) if `fd`, else
/// classic CAN only (MTU 16; vxcan's default is 72).
pub fn vxcan_pair(ns: &Netns, a: &str, b: &str, fd: bool) -> anyhow::Result<()> {
    ns.ip(&["link", "add", a, "type", "vxcan", "peer", "name", b])?;
    for i in [a, b] {
        ns.ip(&["link", "set", i, "mtu", if fd { "72" } else { "16" }])?;
        ns.ip(&["link", "set", i, "up"])?;
    }
    Ok(())
}

/// Creates a vcan (a virtual bus of its own, no peer) in `ns`, up.
pub fn vcan(ns: &Netns, name: &str) -> anyhow::Result<()> {
    ns.ip(&["link", "add", "dev", name, "type", "vcan"])?;
    ns.ip(&["link", "set", name, "up"])?;
    Ok(())
}

fn stay_on_this_cpu() -> anyhow::Result<()> {
    thread_local!(static PINNED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });
    if PINNED.get() {
        return Ok(());
    }
    // SAFETY: plain syscalls on a zeroed cpu_set_t owned by this frame.
    unsafe {
        let cpu = libc::sched_getcpu();
        anyhow::ensure!(
            cpu >= 0,
            "sched_getcpu: {}",
            std::io::Error::last_os_error()
        );
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            anyhow::bail!("sched_setaffinity: {}", std::io::Error::last_os_error());
        }
    }
    PINNED.set(true);
    Ok(())
}

/// A CAN_RAW socket with CAN FD frames enabled, bound to one interface.
pub struct Bus {
    sock: CanFdSocket,
    pub iface: String,
}

impl Bus {
    /// Opens the socket from inside `ns`; it keeps working from any thread afterwards.
    pub fn open(ns: &Netns, iface: &str) -> anyhow::Result<Self> {
        let _in = ns.enter()?;
        let sock = CanFdSocket::open(iface)?;
        sock.set_read_timeout(Duration::from_millis(200))?;
        // A reader thread the VM's scheduler leaves waiting must not lose frames to a full
        // receive buffer (208 KiB holds about 250 CAN FD frames): that would be the test's
        // loss, not the product's.
        edgeplane_testbed::force_receive_buffer(sock.as_raw_fd(), 8 << 20)
            .with_context(|| format!("SO_RCVBUFFORCE on {iface}"))?;
        Ok(Self {
            sock,
            iface: iface.to_owned(),
        })
    }

    /// Writes one frame. The calling thread stays on the CPU it first sent from: vxcan hands
    /// each frame to the sending CPU's backlog, so a sender migrating between CPUs lets two
    /// CPUs process its frames concurrently and reorder them, which a CAN controller's single
    /// receive queue never does.
    pub fn send(&self, f: &Frame) -> anyhow::Result<()> {
        stay_on_this_cpu()?;
        let raw = f.raw();
        let n = if f.fd { CANFD_MTU } else { CAN_MTU };
        // SAFETY: writes `n` bytes of a plain struct at least that long.
        let w = unsafe { libc::write(self.sock.as_raw_fd(), (&raw const raw).cast(), n) };
        anyhow::ensure!(
            w == n as isize,
            "write to {}: {}",
            self.iface,
            std::io::Error::last_os_error()
        );
        Ok(())
    }

    /// The next frame exactly as the kernel delivered it (the bytes past a classic frame's
    /// CAN_MTU zero) and whether it is CAN FD, or None after the read timeout.
    pub fn recv_raw(&self) -> Option<(CanFrame, bool)> {
        let mut raw = CanFrame::default();
        // SAFETY: reads at most sizeof(CanFrame) bytes into it.
        let n = unsafe {
            libc::read(
                self.sock.as_raw_fd(),
                (&raw mut raw).cast(),
                size_of::<CanFrame>(),
            )
        };
        match usize::try_from(n).ok()? {
            CAN_MTU => Some((raw, false)),
            CANFD_MTU => Some((raw, true)),
            _ => None,
        }
    }

    /// [`Self::recv_raw`] until `quiet` passes without a frame (at most `limit` total).
    pub fn collect_raw(&self, quiet: Duration, limit: Duration) -> Vec<(CanFrame, bool)> {
        self.collect_raw_at_least(0, quiet, limit)
    }

    /// [`Self::collect_raw`], but a quiet spell ends it only once `n` frames arrived: a link
    /// that stalls a while (a WireGuard handshake, a VM's vCPU descheduled) must not end it.
    pub fn collect_raw_at_least(
        &self,
        n: usize,
        quiet: Duration,
        limit: Duration,
    ) -> Vec<(CanFrame, bool)> {
        let start = Instant::now();
        let mut last = Instant::now();
        let mut out = Vec::new();
        while start.elapsed() < limit && (out.len() < n || last.elapsed() < quiet) {
            if let Some(f) = self.recv_raw() {
                out.push(f);
                last = Instant::now();
            }
        }
        out
    }

    /// The next frame, or None after the read timeout.
    pub fn recv(&self) -> Option<Frame> {
        let (raw, fd) = self.recv_raw()?;
        Some(Frame::from_raw(&raw, fd))
    }

    /// Everything that arrives until `quiet` passes without a frame (at most `limit` total).
    pub fn collect(&self, quiet: Duration, limit: Duration) -> Vec<Frame> {
        self.collect_at_least(0, quiet, limit)
    }

    /// [`Self::collect`] that a quiet spell ends only once `n` frames arrived.
    pub fn collect_at_least(&self, n: usize, quiet: Duration, limit: Duration) -> Vec<Frame> {
        (self.collect_raw_at_least(n, quiet, limit).into_iter())
            .map(|(raw, fd)| Frame::from_raw(&raw, fd))
            .collect()
    }
}

/// Asserts that `got` holds exactly the frames of `sent`, each CAN ID's frames in the order
/// sent: CAN's ordering promise is per ID (arbitration orders different IDs by priority, and
/// virtual CAN devices hand frames to the writing CPU's backlog, so a writer that migrates
/// can interleave IDs differently). Prints how many frames changed places across IDs.
pub fn assert_same_frames_in_id_order(got: &[Frame], sent: &[Frame], what: &str) {
    let key = |f: &&Frame| (f.can_id, f.fd, f.flags, f.len, f.data.clone());
    let (mut g, mut s): (Vec<_>, Vec<_>) = (got.iter().collect(), sent.iter().collect());
    g.sort_by_key(key);
    s.sort_by_key(key);
    assert!(
        g == s,
        "{what}: {} frames arrived for {} sent, and they are not the same frames",
        got.len(),
        sent.len()
    );
    let mut ids: Vec<u32> = sent.iter().map(|f| f.can_id).collect();
    ids.sort_unstable();
    ids.dedup();
    for id in ids {
        let of = |v: &[Frame]| {
            v.iter()
                .filter(|f| f.can_id == id)
                .cloned()
                .collect::<Vec<_>>()
        };
        let (g, s) = (of(got), of(sent));
        if let Some(i) = g.iter().zip(&s).position(|(a, b)| a != b) {
            panic!(
                "{what}: frames of ID {id:#x} out of order at their #{i}:\n  got:  {:?}\n  sent: {:?}",
                &g[i..(i + 3).min(g.len())],
                &s[i..(i + 3).min(s.len())]
            );
        }
    }
    let moved = got.iter().zip(sent).filter(|(a, b)| a != b).count();
    eprintln!(
        "{what}: {} frames, each ID in order; {moved} at another place across IDs",
        got.len()
    );
}
