//! Throwaway test hosts for tests and the demo that need a real kernel: network namespaces and veth links, the agent as a
//! process, HTTP scrapes. Everything started here is torn down on drop.

pub mod agent;
pub mod bpffs;
pub mod http;
pub mod netns;
pub mod usage;

use std::{
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd as _,
    path::PathBuf,
};

/// The workspace root.
pub fn workspace() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.ancestors()
        .nth(2)
        .expect("tests/testbed is two levels below the root")
        .to_path_buf()
}

/// Fails the test early, with a useful message, when it can't do its job unprivileged.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test creates network namespaces and loads eBPF programs: run it as root \
         (`cargo xtask test` does)"
    );
}

/// A UDP socket bound to `addr` with a 16 MiB receive buffer: a test's reader may fall behind
/// a burst (emulated VMs especially), and skbs built from XDP frames are charged a whole page
/// each, so the default buffer holds only about 50 of them.
pub fn bind_udp_receiver(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let sock = UdpSocket::bind(addr)?;
    let size: libc::c_int = 16 << 20;
    // SAFETY: plain setsockopt with a valid int. FORCE: root may exceed rmem_max.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const size).cast(),
            4,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(sock)
}
