//! What latency capture needs from the running kernel: receive timestamps switched on, the
//! offset between its clocks, and struct field offsets from its BTF — so no kernel layout is
//! compiled into the programs, and nothing is read from tracefs (root's only).

use std::{
    ffi::CString,
    io,
    os::fd::{FromRawFd as _, OwnedFd},
    path::PathBuf,
};

use edgeplane_common::latency::KernelOffsets;

use super::{LatencyError, btf::Btf};

const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// A socket asking for receive timestamps: while one exists, the stack stamps every received
/// skb (`skb->tstamp`, CLOCK_REALTIME) as the driver hands it over.
pub struct RxTimestamps(#[allow(dead_code, reason = "held open for its effect")] OwnedFd);

pub fn enable_rx_timestamps() -> io::Result<RxTimestamps> {
    // SAFETY: plain socket(2); the fd is owned right after.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with an int of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as u32,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(RxTimestamps(fd))
}

fn clock_ns(clock: libc::clockid_t) -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime into a timespec we own.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

/// CLOCK_REALTIME minus CLOCK_MONOTONIC, read between two monotonic reads (the closest pair of
/// three tries) so a preemption in between does not skew it.
pub fn realtime_offset_ns() -> i64 {
    (0..3)
        .map(|_| {
            let before = clock_ns(libc::CLOCK_MONOTONIC);
            let real = clock_ns(libc::CLOCK_REALTIME);
            let after = clock_ns(libc::CLOCK_MONOTONIC);
            (after - before, real - (before + (after - before) / 2))
        })
        .min_by_key(|(spread, _)| *spread)
        .map(|(_, offset)| offset)
        .expect("three tries")
}

/// The root of the cgroup v2 hierarchy, mounting it at /sys/fs/cgroup when there is none
/// (systemd hosts have it there, or at /sys/fs/cgroup/unified in hybrid mode).
pub fn cgroup2_root() -> Result<PathBuf, LatencyError> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").map_err(LatencyError::Cgroup)?;
    if let Some(dir) = mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let dir = f.nth(1)?;
        (f.next()? == "cgroup2").then(|| PathBuf::from(dir))
    }) {
        return Ok(dir);
    }
    let target = CString::new("/sys/fs/cgroup").expect("no NUL");
    // SAFETY: NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            c"cgroup2".as_ptr(),
            target.as_ptr(),
            c"cgroup2".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(LatencyError::Cgroup(io::Error::last_os_error()));
    }
    Ok(PathBuf::from("/sys/fs/cgroup"))
}

/// Offsets of the socket, skb and net_device fields the latency programs read, from the
/// running kernel's BTF.
pub fn offsets() -> Result<KernelOffsets, LatencyError> {
    let bytes = std::fs::read(VMLINUX_BTF).map_err(LatencyError::NoBtf)?;
    let btf = Btf::parse(&bytes).map_err(|e| LatencyError::Btf {
        field: "(parse)".into(),
        reason: e.to_string(),
    })?;
    let byte_offset = |ty: &str, path: &str| -> Result<u32, LatencyError> {
        btf.offset_of(ty, path).map_err(|e| LatencyError::Btf {
            field: format!("{ty}.{path}"),
            reason: e.to_string(),
        })
    };
    Ok(KernelOffsets {
        skb_tstamp: byte_offset("sk_buff", "tstamp")?,
        skb_iif: byte_offset("sk_buff", "skb_iif")?,
        sk_family: byte_offset("sock", "__sk_common.skc_family")?,
        netdev_ifindex: byte_offset("net_device", "ifindex")?,
        skb_head: byte_offset("sk_buff", "head")?,
        skb_network_header: byte_offset("sk_buff", "network_header")?,
        skb_transport_header: byte_offset("sk_buff", "transport_header")?,
        _pad: [0; 5],
    })
}

/// The first of `candidates` the kernel has (in /proc/kallsyms) for a kprobe.
pub fn kprobe_target(candidates: &[&'static str]) -> Result<&'static str, LatencyError> {
    let syms = std::fs::read_to_string("/proc/kallsyms").map_err(LatencyError::Kallsyms)?;
    candidates
        .iter()
        .find(|c| {
            syms.lines()
                .any(|l| l.split_whitespace().nth(2) == Some(**c))
        })
        .copied()
        .ok_or_else(|| LatencyError::NoKprobeTarget(candidates.join(" or ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_offset_is_the_realtime_minus_monotonic_distance() {
        let offset = realtime_offset_ns();
        let direct = clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_MONOTONIC);
        // Monotonic counts from boot, realtime from 1970: decades apart.
        assert!(offset > 1_000_000_000 * 3600 * 24 * 365 * 40);
        assert!((offset - direct).abs() < 1_000_000, "{offset} vs {direct}");
    }
}
