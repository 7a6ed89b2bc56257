//! The bpffs directory through which the data plane outlives the agent: pinned maps, programs
//! and links, the agent's state, and the lock that keeps two agents off one data plane.
//!
//! ```text
//! <dir>/maps/<MAP>             every map of the programs (counters, rules, the tunnel ring)
//! <dir>/progs/<program>        the programs the running data plane uses
//! <dir>/links/<program>@<if>   XDP links (tc filters live in the qdisc, see attach.rs)
//! <dir>/state                  the agent's bookkeeping (see state.rs)
//! ```

use std::{
    collections::BTreeSet,
    ffi::CString,
    fs::File,
    io,
    os::{fd::AsRawFd as _, unix::ffi::OsStrExt as _},
    path::{Path, PathBuf},
};

use tracing::{info, warn};

/// Where the data plane is pinned unless `[agent] bpffs` says otherwise.
pub const DEFAULT_DIR: &str = "/sys/fs/bpf/edgeplane";
/// Where bpffs is conventionally mounted.
const BPFFS_MOUNT: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(
        "{dir} is not on a bpffs and mounting one at {mount} failed ({source}): mount it with \
         `mount -t bpf bpf {mount}` (needs CAP_SYS_ADMIN), or point [agent] bpffs at a bpffs"
    )]
    Mount {
        dir: PathBuf,
        mount: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{dir} is not on a bpffs: nothing of edgeplane is pinned there")]
    NotBpffs { dir: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "another edgeplane agent{} manages the data plane pinned in {dir}: stop it first \
         (`systemctl stop edgeplane` or `edgeplane down`), or give this one another [agent] bpffs",
        .pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    Locked { dir: PathBuf, pid: Option<u32> },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PinError + '_ {
    move |source| PinError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A bpffs directory holding (or about to hold) a data plane.
#[derive(Debug, Clone)]
pub struct PinDir {
    root: PathBuf,
}

impl PinDir {
    /// Makes `root` ready: bpffs mounted (at /sys/fs/bpf when `root` is under it, else at
    /// `root` itself), and the directory tree created.
    pub fn create(root: &Path) -> Result<Self, PinError> {
        if !is_bpffs(root) {
            let mount = if root.starts_with(BPFFS_MOUNT) {
                Path::new(BPFFS_MOUNT)
            } else {
                root
            };
            std::fs::create_dir_all(mount).map_err(io_err(mount))?;
            mount_bpffs(mount).map_err(|source| PinError::Mount {
                dir: root.to_owned(),
                mount: mount.to_owned(),
                source,
            })?;
            info!(mount = %mount.display(), "mounted bpffs");
            if !in_initial_mount_namespace() {
                warn!(
                    mount = %mount.display(),
                    "this bpffs belongs to the agent's own mount namespace (as under `ip netns exec`, \
                     which remounts /sys) and goes with it: a restarted agent will not find the data \
                     plane; point [agent] bpffs at a bpffs mounted outside /sys"
                );
            }
        }
        let dir = Self {
            root: root.to_owned(),
        };
        for d in [
            dir.root.join("maps"),
            dir.root.join("progs"),
            dir.root.join("links"),
        ] {
            std::fs::create_dir_all(&d).map_err(io_err(&d))?;
        }
        Ok(dir)
    }

    /// An existing pin directory, for the CLI: nothing is mounted or created.
    pub fn existing(root: &Path) -> Result<Self, PinError> {
        if !is_bpffs(root) {
            return Err(PinError::NotBpffs {
                dir: root.to_owned(),
            });
        }
        Ok(Self {
            root: root.to_owned(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.root.join("maps").join(name)
    }

    pub fn program(&self, name: &str) -> PathBuf {
        self.root.join("progs").join(name)
    }

    pub fn link(&self, program: &str, iface: &str) -> PathBuf {
        self.root.join("links").join(format!("{program}@{iface}"))
    }

    pub fn state(&self) -> PathBuf {
        self.root.join("state")
    }

    /// Names of the pinned programs.
    pub fn programs(&self) -> Result<Vec<String>, PinError> {
        list(&self.root.join("progs"))
    }

    /// Takes the directory's lock, held for as long as the returned value lives. `pid` says
    /// who holds it when it is taken already.
    pub fn lock(&self, pid: impl FnOnce() -> Option<u32>) -> Result<DirLock, PinError> {
        let file = File::open(&self.root).map_err(io_err(&self.root))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(PinError::Locked {
                    dir: self.root.clone(),
                    pid: pid(),
                });
            }
            return Err(io_err(&self.root)(e));
        }
        Ok(DirLock { _file: file })
    }

    /// Whether an agent holds the lock now.
    pub fn is_locked(&self) -> bool {
        matches!(self.lock(|| None), Err(PinError::Locked { .. }))
    }

    /// Unpins what the agent pinned (`ours` names it) and removes the directories it made,
    /// unless something else was put there: another tool's pins in the same directory stay,
    /// and are returned. Objects still in use elsewhere (an open fd, an attached tc filter)
    /// live on until released.
    pub fn remove(&self, ours: &PinNames) -> Result<Vec<PathBuf>, PinError> {
        let mut foreign = Vec::new();
        for sub in ["maps", "progs", "links"] {
            let dir = self.root.join(sub);
            for name in list(&dir)? {
                let is_ours = match sub {
                    "maps" => ours.maps.contains(&name),
                    "progs" => ours.programs.contains(&name),
                    _ => name
                        .split_once('@')
                        .is_some_and(|(program, _)| ours.programs.contains(program)),
                };
                if is_ours {
                    remove_entry(&dir.join(&name))?;
                } else {
                    foreign.push(dir.join(&name));
                }
            }
            remove_empty_dir(&dir)?;
        }
        for name in list(&self.root)? {
            let path = self.root.join(&name);
            if matches!(name.as_str(), "state" | "state-new") {
                remove_entry(&path)?;
            } else if !matches!(name.as_str(), "maps" | "progs" | "links") {
                foreign.push(path);
            }
        }
        remove_empty_dir(&self.root)?;
        foreign.sort();
        Ok(foreign)
    }
}

/// The names under which the agent pins its objects: its maps in `maps/`, its programs in
/// `progs/` and their links (`<program>@<iface>`) in `links/`; the rest of a pin directory is
/// not the agent's to remove.
#[derive(Debug, Clone, Default)]
pub struct PinNames {
    pub maps: BTreeSet<String>,
    pub programs: BTreeSet<String>,
}

fn remove_entry(path: &Path) -> Result<(), PinError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(path)(e)),
        _ => Ok(()),
    }
}

/// Removes `dir` if it exists and is empty.
fn remove_empty_dir(dir: &Path) -> Result<(), PinError> {
    match std::fs::remove_dir(dir) {
        Err(e)
            if e.kind() != io::ErrorKind::NotFound
                && e.kind() != io::ErrorKind::DirectoryNotEmpty =>
        {
            Err(io_err(dir)(e))
        }
        _ => Ok(()),
    }
}

/// The pin directory's lock; see [`PinDir::lock`].
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

fn list(dir: &Path) -> Result<Vec<String>, PinError> {
    let mut names = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(names),
        Err(e) => return Err(io_err(dir)(e)),
    };
    for e in entries {
        let e = e.map_err(io_err(dir))?;
        names.push(e.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// Whether `path`, or the nearest ancestor that exists, is on a bpffs.
fn is_bpffs(path: &Path) -> bool {
    let Some(existing) = path.ancestors().find(|p| p.exists()) else {
        return false;
    };
    let Ok(c) = CString::new(existing.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs into a zeroed struct we own, with a NUL-terminated path.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

fn in_initial_mount_namespace() -> bool {
    match (
        std::fs::read_link("/proc/self/ns/mnt"),
        std::fs::read_link("/proc/1/ns/mnt"),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => true,
    }
}

fn mount_bpffs(at: &Path) -> io::Result<()> {
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
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
