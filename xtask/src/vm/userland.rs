//! Where the guest's programs and their shared libraries come from.
//!
//! For the build machine's architecture, from the host itself (PATH, ldd). For another one
//! (arm64 on an x86_64 machine), from a sysroot of Debian's packages for that architecture,
//! downloaded with the same private apt configuration as the kernels and unpacked once; their
//! libraries are found by reading the ELF files (NEEDED, the program interpreter), as ldd
//! can't run a foreign binary.

use std::{
    collections::BTreeSet,
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use super::kernels::Apt;
use crate::{
    build::Arch,
    toolchain::{output, run_checked, step},
};

/// Debian packages holding the guest's programs (`initramfs::HOST_TOOLS` and busybox); apt
/// adds the libraries they depend on.
const PACKAGES: &[&str] = &[
    "busybox-static",
    "iproute2",
    "ethtool",
    "iputils-ping",
    "prometheus",
    "can-utils",
    "wireguard-tools",
    "util-linux",
];
/// The suite whose packages make a foreign sysroot: the host's own release (bookworm), whose
/// glibc the cross-built agent links against.
const SYSROOT_SUITE: &str = "bookworm";

pub enum Userland {
    Host,
    Sysroot { arch: Arch, root: PathBuf },
}

impl Userland {
    /// The userland for `arch`, downloading and unpacking a sysroot on first use.
    pub fn for_arch(arch: Arch, cache: &Path, refresh: bool) -> anyhow::Result<Self> {
        if arch == Arch::host() {
            return Ok(Self::Host);
        }
        let dir = cache.join(format!("sysroot-{SYSROOT_SUITE}-{}", arch.debian()));
        let root = dir.join("root");
        let stamp = dir.join("packages");
        let wanted = PACKAGES.join(" ");
        if !refresh && fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == wanted) {
            step(format_args!(
                "{} userland: cached in {}",
                arch.debian(),
                root.display()
            ));
            return Ok(Self::Sysroot { arch, root });
        }
        step(format_args!(
            "{} userland: downloading {wanted} and what they depend on (Debian {SYSROOT_SUITE})",
            arch.debian()
        ));
        let _ = fs::remove_file(&stamp);
        let _ = fs::remove_dir_all(&root);
        let debs = dir.join("debs");
        let _ = fs::remove_dir_all(&debs);
        fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
        let apt = Apt::new(
            SYSROOT_SUITE,
            arch,
            &cache
                .join("apt")
                .join(format!("{SYSROOT_SUITE}-{}", arch.debian())),
        )?;
        apt.update()?;
        apt.download_with_dependencies(PACKAGES, &debs)?;
        let mut count = 0;
        for deb in fs::read_dir(&debs)? {
            let deb = deb?.path();
            if deb.extension().is_some_and(|e| e == "deb") {
                run_checked(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
                count += 1;
            }
        }
        step(format_args!(
            "{} userland: {count} packages unpacked",
            arch.debian()
        ));
        fs::remove_dir_all(&debs)?;
        fs::write(&stamp, format!("{wanted}\n"))?;
        Ok(Self::Sysroot { arch, root })
    }

    /// A program by name, like the shell would find it, also in the sbin directories (which a
    /// non-login root shell may lack on its PATH).
    pub fn program(&self, name: &str) -> anyhow::Result<PathBuf> {
        let dirs: Vec<PathBuf> = match self {
            Self::Host => env::split_paths(&env::var_os("PATH").unwrap_or_default())
                .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
                .collect(),
            Self::Sysroot { root, .. } => ["usr/local/bin", "usr/bin", "bin", "usr/sbin", "sbin"]
                .map(|d| root.join(d))
                .to_vec(),
        };
        dirs.into_iter()
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
            .with_context(|| match self {
                Self::Host => {
                    format!("{name} is not installed: run `cargo xtask setup`, which installs it")
                }
                Self::Sysroot { root, .. } => format!(
                    "{name} is in none of the packages unpacked in {}: add its package to \
                     vm::userland::PACKAGES",
                    root.display()
                ),
            })
    }

    /// The shared libraries and dynamic loader `binary` needs, as (path in the guest, file to
    /// copy). The guest's loader searches the same multiarch directories.
    pub fn libraries(&self, binary: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
        match self {
            Self::Host => Ok(ldd(binary)?
                .into_iter()
                .map(|lib| (lib.display().to_string(), lib))
                .collect()),
            Self::Sysroot { arch, root } => sysroot_libraries(*arch, root, binary),
        }
    }
}

fn ldd(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // Static executables are fine: ldd says so and exits 1.
        let all = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
        if all.contains("not a dynamic executable") {
            return Ok(Vec::new());
        }
        bail!("ldd {}: {all}", binary.display());
    }
    let mut libs = Vec::new();
    for line in stdout.lines().map(str::trim) {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)", "/lib64/ld-linux-x86-64.so.2
        // (0x...)", and "linux-vdso.so.1 (0x...)", which the kernel provides.
        let path = match line.split_once(" => ") {
            Some((name, rest)) if rest.starts_with("not found") => {
                bail!("{}: shared library {name} not found", binary.display())
            }
            Some((_, rest)) => rest.split(" (").next().unwrap_or(rest),
            None if line.starts_with('/') => line.split(" (").next().unwrap_or(line),
            None => continue,
        };
        libs.push(PathBuf::from(path));
    }
    Ok(libs)
}

/// ldd's answer for a foreign binary: its interpreter and NEEDED libraries, transitively,
/// looked up in the sysroot's library directories.
fn sysroot_libraries(
    arch: Arch,
    root: &Path,
    binary: &Path,
) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let multiarch = arch.multiarch();
    let dirs = [
        format!("/lib/{multiarch}"),
        format!("/usr/lib/{multiarch}"),
        "/lib".to_owned(),
        "/usr/lib".to_owned(),
    ];
    let mut found: Vec<(String, PathBuf)> = Vec::new();
    let mut seen = BTreeSet::new();
    let mut todo = vec![binary.to_path_buf()];
    while let Some(file) = todo.pop() {
        let (interp, needed) = dynamic_info(&file)?;
        let mut guest_paths = Vec::new();
        if let Some(interp) = interp {
            guest_paths.push(interp);
        }
        for name in needed {
            let guest = dirs
                .iter()
                .map(|d| format!("{d}/{name}"))
                .find(|g| in_sysroot(root, g).is_some())
                .with_context(|| {
                    format!(
                        "{}: shared library {name} is in none of {dirs:?} under {}",
                        file.display(),
                        root.display()
                    )
                })?;
            guest_paths.push(guest);
        }
        for guest in guest_paths {
            if seen.insert(guest.clone()) {
                let host = in_sysroot(root, &guest)
                    .with_context(|| format!("{guest} is not under {}", root.display()))?;
                todo.push(host.clone());
                found.push((guest, host));
            }
        }
    }
    Ok(found)
}

/// The program interpreter and NEEDED entries of an ELF file (none for a static one).
fn dynamic_info(file: &Path) -> anyhow::Result<(Option<String>, Vec<String>)> {
    let headers = output(Command::new("readelf").arg("-lW").arg(file))?;
    let interp = headers
        .lines()
        .find_map(|l| l.split_once("Requesting program interpreter: "))
        .and_then(|(_, rest)| rest.strip_suffix(']'))
        .map(str::to_owned);
    let dynamic = output(Command::new("readelf").arg("-dW").arg(file))?;
    let needed = dynamic
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| l.rsplit('[').next()?.strip_suffix(']'))
        .map(str::to_owned)
        .collect();
    Ok((interp, needed))
}

/// The file a guest path names in the sysroot, following symlinks inside the sysroot (an
/// absolute link target is the guest's path, not the host's).
fn in_sysroot(root: &Path, guest: &str) -> Option<PathBuf> {
    let mut path = root.join(guest.trim_start_matches('/'));
    for _ in 0..16 {
        let meta = fs::symlink_metadata(&path).ok()?;
        if !meta.file_type().is_symlink() {
            return meta.is_file().then_some(path);
        }
        let target = fs::read_link(&path).ok()?;
        path = if target.is_absolute() {
            root.join(target.strip_prefix("/").ok()?)
        } else {
            path.parent()?.join(target)
        };
    }
    None
}
