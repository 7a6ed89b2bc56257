//! Detaching a pinned bpf_link at once (`BPF_LINK_DETACH`, Linux 5.9+), which aya doesn't offer.
//!
//! Unpinning alone is not enough to stop a program now: bpffs drops the pin's reference from an
//! RCU callback, and the link is released later still, from a workqueue. Under load or in a slow
//! VM, an XDP program kept forwarding for tens of milliseconds after `edgeplane down` returned.
//! Detaching the link first removes the program from the hook before we report it gone.

use std::{ffi::CString, io, os::fd::AsFd as _, os::unix::ffi::OsStrExt as _, path::Path};

use crate::sys::bpf;

/// Detaches the link pinned at `pin` from its hook. The link object stays until its last
/// reference (the pin, any fd) goes, but it no longer runs its program.
pub fn detach_pinned(pin: &Path) -> io::Result<()> {
    let path = CString::new(pin.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let link = bpf::obj_get(&path)?;
    bpf::link_detach(link.as_fd())
}
