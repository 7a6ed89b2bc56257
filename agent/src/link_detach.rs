//! Detaching a pinned bpf_link at once (`BPF_LINK_DETACH`, Linux 5.9+), which aya doesn't offer.
//!
//! Unpinning alone is not enough to stop a program now: bpffs drops the pin's reference from an
//! RCU callback, and the link is released later still, from a workqueue. Under load or in a slow
//! VM, an XDP program kept forwarding for tens of milliseconds after `edgeplane down` returned.
//! Detaching the link first removes the program from the hook before we report it gone.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

use aya_obj::generated::bpf_cmd;

/// The leading fields of `union bpf_attr` for `BPF_OBJ_GET`; the kernel zero-fills the rest.
#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// The leading field of `union bpf_attr` for `BPF_LINK_DETACH`.
#[repr(C)]
struct LinkDetachAttr {
    link_fd: u32,
}

fn sys_bpf<T>(cmd: bpf_cmd, attr: &mut T) -> io::Result<i64> {
    // SAFETY: `attr` is a `repr(C)` prefix of `union bpf_attr` for `cmd`, valid for
    // `size_of::<T>()` bytes; the kernel reads no further than the size we pass.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Detaches the link pinned at `pin` from its hook. The link object stays until its last
/// reference (the pin, any fd) goes, but it no longer runs its program.
pub fn detach_pinned(pin: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = CString::new(pin.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut get = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    let fd = sys_bpf(bpf_cmd::BPF_OBJ_GET, &mut get)?;
    // SAFETY: BPF_OBJ_GET returned a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut detach = LinkDetachAttr {
        link_fd: fd.as_raw_fd() as u32,
    };
    sys_bpf(bpf_cmd::BPF_LINK_DETACH, &mut detach).map(drop)
}
