//! Where agents under test pin their data planes: a bpffs mounted once at [`ROOT`] in the
//! host's mount namespace. `ip netns exec` remounts /sys, so /sys/fs/bpf is not the same bpffs
//! inside and outside a namespace; a mount under /run is.

use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
    sync::Mutex,
};

use anyhow::bail;

pub const ROOT: &str = "/run/edgeplane-tests/bpffs";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The pin directory for an agent of namespace `name` (not created: the agent does that).
pub fn dir_for(name: &str) -> anyhow::Result<PathBuf> {
    static MOUNTED: Mutex<bool> = Mutex::new(false);
    let mut mounted = MOUNTED.lock().expect("lock");
    let root = Path::new(ROOT);
    if !*mounted && !is_bpffs(root) {
        std::fs::create_dir_all(root)?;
        if let Err(e) = mount(root)
            && !is_bpffs(root)
        {
            bail!("mounting bpffs at {ROOT}: {e}");
        }
    }
    *mounted = true;
    Ok(root.join(name))
}

/// Mounts a new bpffs instance (mode 0700) at the existing directory `at`.
pub fn mount(at: &Path) -> std::io::Result<()> {
    let target = CString::new(at.as_os_str().as_bytes())?;
    // SAFETY: NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn is_bpffs(p: &Path) -> bool {
    let Ok(c) = CString::new(p.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs into a zeroed struct we own.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}
