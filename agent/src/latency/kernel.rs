//! What latency capture needs from the running kernel: receive timestamps switched on, the
//! offset between its clocks, tracepoint field offsets from tracefs, and struct field offsets
//! from its BTF — so no kernel layout is compiled into the programs.

use std::{
    ffi::CString,
    io,
    os::fd::{FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use edgeplane_common::latency::KernelOffsets;

use super::{LatencyError, btf::Btf};

const TRACEFS: &str = "/sys/kernel/tracing";
const DEBUGFS_TRACING: &str = "/sys/kernel/debug/tracing";
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

/// The tracefs mount, mounting it at /sys/kernel/tracing when there is none.
pub fn tracefs() -> Result<PathBuf, LatencyError> {
    for dir in [TRACEFS, DEBUGFS_TRACING] {
        if Path::new(dir).join("events").is_dir() {
            return Ok(PathBuf::from(dir));
        }
    }
    let target = CString::new(TRACEFS).expect("no NUL");
    // SAFETY: NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            c"tracefs".as_ptr(),
            target.as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(LatencyError::Tracefs(io::Error::last_os_error()));
    }
    Ok(PathBuf::from(TRACEFS))
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

/// The offset of `field` in the records of tracepoint `category:name`, from its format file.
pub fn tracepoint_field(
    tracefs: &Path,
    category: &str,
    name: &str,
    field: &str,
) -> Result<u32, LatencyError> {
    let path = tracefs
        .join("events")
        .join(category)
        .join(name)
        .join("format");
    let format = std::fs::read_to_string(&path).map_err(|source| LatencyError::Tracepoint {
        tracepoint: format!("{category}:{name}"),
        source,
    })?;
    parse_format_offset(&format, field).ok_or_else(|| LatencyError::TracepointField {
        tracepoint: format!("{category}:{name}"),
        field: field.to_owned(),
    })
}

/// `field:int to_ifindex; offset:16; size:4; signed:1;` -> 16 for `to_ifindex`.
fn parse_format_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let decl = line.trim().strip_prefix("field:")?.split(';').next()?;
        let name = decl
            .rsplit(|c: char| c.is_whitespace() || c == '*')
            .next()?;
        if name != field {
            return None;
        }
        line.split(';')
            .find_map(|part| part.trim().strip_prefix("offset:"))?
            .trim()
            .parse()
            .ok()
    })
}

/// Offsets of the socket and skb fields the delivery programs read, from the running kernel's
/// BTF, plus the tracepoint fields they and the XDP flush program read.
pub fn offsets(tracefs: &Path) -> Result<KernelOffsets, LatencyError> {
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
        devmap_to_ifindex: tracepoint_field(tracefs, "xdp", "xdp_devmap_xmit", "to_ifindex")?,
        devmap_sent: tracepoint_field(tracefs, "xdp", "xdp_devmap_xmit", "sent")?,
        devmap_drops: tracepoint_field(tracefs, "xdp", "xdp_devmap_xmit", "drops")?,
        skb_head: byte_offset("sk_buff", "head")?,
        skb_network_header: byte_offset("sk_buff", "network_header")?,
        skb_transport_header: byte_offset("sk_buff", "transport_header")?,
        consume_skbaddr: tracepoint_field(tracefs, "skb", "consume_skb", "skbaddr")?,
        _pad: [0; 2],
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
    fn format_offsets_are_read_by_field_name() {
        let format = "name: xdp_devmap_xmit\nID: 1234\nformat:\n\
            \tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
            \tfield:int from_ifindex;\toffset:8;\tsize:4;\tsigned:1;\n\
            \tfield:u32 act;\toffset:12;\tsize:4;\tsigned:0;\n\
            \tfield:int to_ifindex;\toffset:16;\tsize:4;\tsigned:1;\n\
            \tfield:const void * skbaddr;\toffset:24;\tsize:8;\tsigned:0;\n";
        assert_eq!(parse_format_offset(format, "to_ifindex"), Some(16));
        assert_eq!(parse_format_offset(format, "act"), Some(12));
        assert_eq!(parse_format_offset(format, "skbaddr"), Some(24));
        assert_eq!(parse_format_offset(format, "ifindex"), None);
    }

    #[test]
    fn the_clock_offset_is_the_realtime_minus_monotonic_distance() {
        let offset = realtime_offset_ns();
        let direct = clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_MONOTONIC);
        // Monotonic counts from boot, realtime from 1970: decades apart.
        assert!(offset > 1_000_000_000 * 3600 * 24 * 365 * 40);
        assert!((offset - direct).abs() < 1_000_000, "{offset} vs {direct}");
    }
}
