//! Throwaway test hosts for tests and the demo that need a real kernel: network namespaces and veth links, the agent as a
//! process, HTTP scrapes. Everything started here is torn down on drop.

pub mod agent;
pub mod bpffs;
pub mod http;
pub mod netns;
pub mod usage;

use std::path::PathBuf;

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
