//! Kernel text that must not be patched while a test's traffic flows under qemu's TCG.
//!
//! qemu 7.2's multi-threaded TCG (Debian bookworm's, which the VM harness boots) can miss a
//! write to kernel text made by one vCPU while another vCPU runs that text: the other vCPU
//! keeps executing its old translation. `text_poke_bp` patches a static key site by writing an
//! int3 first, the new instruction after it, and the first byte last; a vCPU that translated the
//! site while the int3 was there then traps on it forever. The kernel's int3 handler finds the
//! new instruction in memory, backs up to re-run it, and the vCPU runs the stale int3 again:
//! an RCU stall with the vCPU in `asm_exc_int3`, at `netif_receive_skb_list_internal+0x49`
//! (the site of `netstamp_needed_key`, already the new bytes in memory), under `veth_poll`.
//! It happened in about 1 of 15 runs of the XDP restart tests on 5.10 and 6.1.
//!
//! The agent switches such keys whenever it starts and stops while frames flow: receive
//! timestamps (an `SO_TIMESTAMPNS` socket), the raw tracepoints latency capture attaches to, and
//! the cgroup skb hook (its socket delivery stage; 5.10 has one key for every cgroup hook,
//! the send path's included). The first test process of a VM under TCG switches them on before
//! it makes any traffic and hands them to a holder process that lives as long as the VM (the
//! VM's /init spares it between runs), so an agent's start and stop, and a test process's,
//! only move reference counts and patch nothing.
//! On real CPUs (the host, KVM) nothing is held: the tests see the kernel as users do.

use std::{
    io,
    os::fd::{FromRawFd as _, OwnedFd},
    sync::OnceLock,
};

/// The raw tracepoints latency capture attaches to on the UDP path (`agent/src/latency/mod.rs`).
const TRACEPOINTS: &[&str] = &["xdp_devmap_xmit", "consume_skb"];

/// Whether the VM harness runs this process under TCG (`EDGEPLANE_TEST_TCG=1`).
pub fn emulated() -> bool {
    std::env::var("EDGEPLANE_TEST_TCG").is_ok_and(|v| v == "1")
}

/// Switches one kernel path on; the descriptors keep it on while they are open.
type Holder = fn() -> io::Result<Vec<OwnedFd>>;

/// Under TCG, switches on the kernel paths the agent toggles, once per VM: the first test
/// process hands them to a holder process, later ones find it (if the holder can't be
/// started they are held until this process exits). A path that can't be held is reported and
/// left: the test goes on.
pub fn hold_static_keys() {
    static HELD: OnceLock<Vec<OwnedFd>> = OnceLock::new();
    if !emulated() {
        return;
    }
    HELD.get_or_init(|| {
        if let Some(pid) = holder() {
            eprintln!(
                "tcg: held on for the VM's life by process {pid} (see edgeplane_testbed::tcg)"
            );
            return Vec::new();
        }
        let holders: [(&str, Holder); 3] = [
            ("receive timestamps", || rx_timestamps().map(|fd| vec![fd])),
            ("the raw tracepoints", tracepoints),
            ("the cgroup skb hook", || {
                cgroup_skb_ingress().map(Vec::from)
            }),
        ];
        let mut held = Vec::new();
        let mut kept = Vec::new();
        for (what, hold) in holders {
            match hold() {
                Ok(fds) => {
                    held.extend(fds);
                    kept.push(what);
                }
                Err(e) => eprintln!("tcg: {what} not held on: {e}"),
            }
        }
        match hand_to_holder(&held) {
            Ok(pid) => eprintln!(
                "tcg: held on for the VM's life by process {pid}: {} (see edgeplane_testbed::tcg)",
                kept.join(", ")
            ),
            Err(e) => eprintln!(
                "tcg: held on while this process runs: {} (no holder process: {e})",
                kept.join(", ")
            ),
        }
        held
    });
}

/// Where the holder's pid is kept; the VM's /init spares that process between runs.
const HOLDER_PID: &str = "/run/edgeplane-tcg-holder.pid";

/// The live holder process that an earlier test process of this VM started, if any.
fn holder() -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(HOLDER_PID)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    std::path::Path::new(&format!("/proc/{pid}"))
        .exists()
        .then_some(pid)
}

/// Gives `held` to a process that outlives this one (a `sleep` that inherits the descriptors),
/// so the paths stay on across test processes: switching them on or off when a process
/// starts or exits would patch text while the kernel still tears down the last run's
/// namespaces (that stalled a vCPU in `consume_skb`, called from `cleanup_net`).
fn hand_to_holder(held: &[OwnedFd]) -> io::Result<u32> {
    use std::os::fd::AsRawFd as _;
    let set_cloexec = |on: bool| {
        for fd in held {
            let flags = if on { libc::FD_CLOEXEC } else { 0 };
            // SAFETY: F_SETFD on a descriptor this process owns.
            if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, flags) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    };
    set_cloexec(false)?;
    let child = std::process::Command::new("sleep")
        .arg("1000000")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    set_cloexec(true)?;
    let pid = child?.id();
    std::fs::write(HOLDER_PID, format!("{pid}\n"))?;
    Ok(pid)
}

/// A socket asking for receive timestamps: `netstamp_needed_key` stays on while it is open. The
/// agent opens the same (`agent/src/latency/kernel.rs`); the testbed can't call it, as xtask
/// builds the testbed before the eBPF toolchain the agent's crate needs is installed.
fn rx_timestamps() -> io::Result<OwnedFd> {
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
    Ok(fd)
}

/// `union bpf_attr` for `BPF_PROG_LOAD`, up to `expected_attach_type`.
#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

const _: () = assert!(size_of::<ProgLoadAttr>() == 72);

/// `union bpf_attr` for `BPF_LINK_CREATE`, up to `flags`.
#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_CGROUP_SKB: u32 = 8;
const BPF_CGROUP_INET_INGRESS: u32 = 0;

fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<OwnedFd> {
    // SAFETY: bpf(2) with an attr of the size passed; the fd is owned right after.
    let raw = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_ref(attr),
            size_of::<T>() as libc::c_uint,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw as i32) })
}

/// A program of `prog_type` that only returns `r0` (`r0 = value; exit`).
fn load_returning(
    prog_type: u32,
    expected_attach_type: u32,
    value: u32,
    prog_name: [u8; 16],
) -> io::Result<OwnedFd> {
    // BPF_ALU64 | BPF_MOV | BPF_K into r0 (the immediate in the upper half), then
    // BPF_JMP | BPF_EXIT.
    let insns: [u64; 2] = [0xb7 | (u64::from(value) << 32), 0x95];
    let license = c"GPL";
    bpf(
        BPF_PROG_LOAD,
        &ProgLoadAttr {
            prog_type,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 0,
            log_size: 0,
            log_buf: 0,
            kern_version: 0,
            prog_flags: 0,
            prog_name,
            prog_ifindex: 0,
            expected_attach_type,
        },
    )
}

/// A program that lets every skb through (`r0 = 1; exit`), linked at the root cgroup's ingress
/// beside whatever else is there (links always stack): the hook's key stays on while the link
/// is open.
fn cgroup_skb_ingress() -> io::Result<[OwnedFd; 2]> {
    use std::os::fd::AsRawFd as _;
    let prog = load_returning(
        BPF_PROG_TYPE_CGROUP_SKB,
        BPF_CGROUP_INET_INGRESS,
        1,
        *b"tcg_hold_key\0\0\0\0",
    )?;
    let root = std::fs::File::open(cgroup2_root()?)?;
    let link = bpf(
        BPF_LINK_CREATE,
        &LinkCreateAttr {
            prog_fd: prog.as_raw_fd() as u32,
            target_fd: root.as_raw_fd() as u32,
            attach_type: BPF_CGROUP_INET_INGRESS,
            flags: 0,
        },
    )?;
    Ok([prog, link])
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup` in the VM; hosts with both
/// hierarchies have it elsewhere).
fn cgroup2_root() -> io::Result<String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let dir = f.nth(1)?;
            (f.next()? == "cgroup2").then(|| dir.to_owned())
        })
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cgroup2 mount"))
}

/// `union bpf_attr` for `BPF_RAW_TRACEPOINT_OPEN`.
#[repr(C)]
struct RawTracepointOpenAttr {
    name: u64,
    prog_fd: u32,
    _pad: u32,
}

const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
const BPF_PROG_TYPE_RAW_TRACEPOINT: u32 = 17;

/// Two programs that do nothing (`r0 = 0; exit`) on each of [`TRACEPOINTS`]. One probe would
/// hold the tracepoint's static key, but a tracepoint calls a single probe directly and two or
/// more through an iterator, and the kernel patches that call (a static call) when the count
/// goes from one to two and back; from two to three it stays the iterator.
fn tracepoints() -> io::Result<Vec<OwnedFd>> {
    use std::os::fd::AsRawFd as _;
    let mut fds = Vec::new();
    for _ in 0..2 {
        let prog = load_returning(
            BPF_PROG_TYPE_RAW_TRACEPOINT,
            0,
            0,
            *b"tcg_hold_tp\0\0\0\0\0",
        )?;
        for name in TRACEPOINTS {
            let name = std::ffi::CString::new(*name).expect("no NUL");
            fds.push(bpf(
                BPF_RAW_TRACEPOINT_OPEN,
                &RawTracepointOpenAttr {
                    name: name.as_ptr() as u64,
                    prog_fd: prog.as_raw_fd() as u32,
                    _pad: 0,
                },
            )?);
        }
        fds.push(prog);
    }
    Ok(fds)
}
