//! Throwaway test hosts for tests and the demo that need a real kernel: network namespaces and veth links, the agent as a
//! process, HTTP scrapes. Everything started here is torn down on drop.

pub mod agent;
pub mod bpffs;
pub mod http;
pub mod netns;
pub mod prometheus;
pub mod tcg;
pub mod usage;

use std::{
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::{Child, ExitStatus},
    time::{Duration, Instant},
};

/// SIGTERM, then wait for `child` to exit; SIGKILL if it is still running after `grace`.
pub fn terminate(child: &mut Child, grace: Duration) -> std::io::Result<ExitStatus> {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            child.kill()?;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait()
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.ancestors()
        .nth(2)
        .expect("tests/testbed is two levels below the root")
        .to_path_buf()
}

/// Fails the test early, with a useful message, when it can't do its job unprivileged. Under
/// qemu's TCG it also holds on the kernel paths an agent toggles ([`tcg::hold_static_keys`]).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test creates network namespaces and loads eBPF programs: run it as root \
         (`cargo xtask test` does)"
    );
    // Every test that makes traffic starts here, before it makes any.
    tcg::hold_static_keys();
}

/// A UDP socket bound to `addr` with a 16 MiB receive buffer: a test's reader may fall behind
/// a burst (emulated VMs especially), and skbs built from XDP frames are charged a whole page
/// each, so the default buffer holds only about 50 of them.
pub fn bind_udp_receiver(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let sock = UdpSocket::bind(addr)?;
    force_receive_buffer(sock.as_raw_fd(), 16 << 20)?;
    Ok(sock)
}

/// Sets a socket's receive buffer to `bytes` with SO_RCVBUFFORCE: root may exceed
/// `net.core.rmem_max`, so a test's buffer does not depend on the machine's sysctls.
pub fn force_receive_buffer(fd: std::os::fd::RawFd, bytes: usize) -> std::io::Result<()> {
    let size = libc::c_int::try_from(bytes).map_err(std::io::Error::other)?;
    // SAFETY: plain setsockopt with a valid int of the right length.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const size).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
