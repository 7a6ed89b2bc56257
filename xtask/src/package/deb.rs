//! One .deb from a staged tree: files, control data, maintainer scripts, dpkg-deb.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{
    build::Arch,
    toolchain::{output, run_checked},
};

/// Where the unit in configs/ expects the binary (a hand install), and where the package puts it.
const UNIT_BINARY: &str = "/usr/local/bin/edgeplane";
pub const PACKAGE_BINARY: &str = "/usr/bin/edgeplane";
pub const CONFFILE: &str = "/etc/edgeplane/edgeplane.toml";
pub const UNIT_PATH: &str = "/lib/systemd/system/edgeplane.service";
/// The service's user, for systemd-sysusers (postinst runs it).
pub const SYSUSERS_PATH: &str = "/usr/lib/sysusers.d/edgeplane.conf";

pub struct Inputs {
    pub arch: Arch,
    pub version: String,
    pub binary: PathBuf,
    pub unit: PathBuf,
    pub config: PathBuf,
    pub sysusers: PathBuf,
    pub example: PathBuf,
    pub scripts: PathBuf,
    pub out: PathBuf,
}

pub fn build(inputs: &Inputs) -> anyhow::Result<PathBuf> {
    let arch = inputs.arch.debian();
    let stem = format!("edgeplane_{}_{arch}", inputs.version);
    let stage = inputs.out.join(format!("stage-{arch}"));
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    }
    fs::create_dir_all(&stage)?;

    // The binary, stripped; its debug info in a file of its own beside the .deb.
    let debug = inputs.out.join(format!("{stem}.debug"));
    let shipped = stage.join(PACKAGE_BINARY.trim_start_matches('/'));
    fs::create_dir_all(shipped.parent().unwrap())?;
    crate::build::split_debug(inputs.arch, &inputs.binary, &shipped, &debug)?;
    fs::set_permissions(&shipped, fs::Permissions::from_mode(0o755))?;

    let unit = packaged_unit(&fs::read_to_string(&inputs.unit)?)
        .with_context(|| inputs.unit.display().to_string())?;
    write(&stage, UNIT_PATH, unit.as_bytes(), 0o644)?;
    write(&stage, CONFFILE, &fs::read(&inputs.config)?, 0o644)?;
    write(&stage, SYSUSERS_PATH, &fs::read(&inputs.sysusers)?, 0o644)?;
    write(
        &stage,
        "/usr/share/doc/edgeplane/examples/edgeplane.toml",
        &fs::read(&inputs.example)?,
        0o644,
    )?;
    write(
        &stage,
        "/usr/share/doc/edgeplane/copyright",
        COPYRIGHT.as_bytes(),
        0o644,
    )?;

    let depends = depends(inputs.arch, &inputs.binary)?;
    let installed_kib = tree_size(&stage)?.div_ceil(1024);
    let control = format!(
        "Package: edgeplane\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: edgeplane developers <edgeplane@users.noreply.github.com>\n\
         Installed-Size: {installed_kib}\n\
         Depends: {depends}\n\
         Recommends: kmod\n\
         Suggests: can-utils\n\
         Section: net\n\
         Priority: optional\n\
         Homepage: https://github.com/edgeplane/edgeplane\n\
         Description: eBPF-accelerated data-plane agent for vehicles and edge boxes\n \
         Forwards UDP streams (XDP, tc) and CAN frames (can-gw, a cannelloni-format\n \
         tunnel) in the kernel, measures how late every frame is, exports Prometheus\n \
         metrics and registers with a fleet registry in etcd. Needs Linux 5.10 or later.\n",
        version = inputs.version,
    );
    let md5sums = md5sums(&stage)?;
    write(&stage, "/DEBIAN/control", control.as_bytes(), 0o644)?;
    write(&stage, "/DEBIAN/md5sums", md5sums.as_bytes(), 0o644)?;
    write(
        &stage,
        "/DEBIAN/conffiles",
        format!("{CONFFILE}\n").as_bytes(),
        0o644,
    )?;
    for script in ["postinst", "prerm", "postrm"] {
        let body = fs::read(inputs.scripts.join(script))
            .with_context(|| format!("{}/{script}", inputs.scripts.display()))?;
        write(&stage, &format!("/DEBIAN/{script}"), &body, 0o755)?;
    }

    let deb = inputs.out.join(format!("{stem}.deb"));
    run_checked(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&stage)
            .arg(&deb),
    )?;
    fs::remove_dir_all(&stage)?;
    Ok(deb)
}

/// The unit as installed: the binary where the package puts it, and the hand-install
/// instructions at its top replaced.
fn packaged_unit(unit: &str) -> anyhow::Result<String> {
    if !unit.contains(&format!("ExecStart={UNIT_BINARY} ")) {
        bail!("no `ExecStart={UNIT_BINARY} ...` line to point at {PACKAGE_BINARY}");
    }
    let body = unit.trim_start_matches(|c| c != '[');
    Ok(format!(
        "# systemd unit of the edgeplane agent, installed by its Debian package.\n\
         # `systemctl reload edgeplane` re-reads /etc/edgeplane/edgeplane.toml (SIGHUP).\n\n{}",
        body.replace(UNIT_BINARY, PACKAGE_BINARY)
    ))
}

/// Depends from the binary's NEEDED libraries and the newest glibc symbol version it uses.
fn depends(arch: Arch, binary: &Path) -> anyhow::Result<String> {
    let prefix = arch.binutils_prefix();
    let dynamic = output(
        Command::new(format!("{prefix}readelf"))
            .arg("-dW")
            .arg(binary),
    )?;
    let mut depends = Vec::new();
    for line in dynamic.lines().filter(|l| l.contains("(NEEDED)")) {
        let lib = line
            .rsplit('[')
            .next()
            .and_then(|s| s.strip_suffix(']'))
            .with_context(|| format!("readelf line {line:?}"))?;
        let package = match lib {
            "libc.so.6"
            | "libm.so.6"
            | "libdl.so.2"
            | "libpthread.so.0"
            | "librt.so.1"
            | "ld-linux-x86-64.so.2"
            | "ld-linux-aarch64.so.1" => "libc6",
            "libgcc_s.so.1" => "libgcc-s1",
            other => bail!(
                "{} needs {other}: add the Debian package that ships it to xtask's package/deb.rs",
                binary.display()
            ),
        };
        if !depends.contains(&package) {
            depends.push(package);
        }
    }
    let symbols = output(
        Command::new(format!("{prefix}objdump"))
            .arg("-T")
            .arg(binary),
    )?;
    let glibc = symbols
        .split_whitespace()
        // `GLIBC_2.34` or, for a symbol's non-default version, `(GLIBC_2.2.5)`.
        .filter_map(|w| w.trim_matches(['(', ')']).strip_prefix("GLIBC_"))
        .filter_map(|v| {
            let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
            Some((parts.next()??, parts.next().flatten().unwrap_or(0)))
        })
        .max()
        .context("the binary uses no versioned glibc symbol: is it static?")?;
    Ok(depends
        .into_iter()
        .map(|p| match p {
            "libc6" => format!("libc6 (>= {}.{})", glibc.0, glibc.1),
            other => other.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(", "))
}

fn write(stage: &Path, path: &str, body: &[u8], mode: u32) -> anyhow::Result<()> {
    let file = stage.join(path.trim_start_matches('/'));
    fs::create_dir_all(file.parent().unwrap())?;
    fs::write(&file, body).with_context(|| format!("writing {}", file.display()))?;
    fs::set_permissions(&file, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Files under `stage` (relative, sorted), DEBIAN/ left out.
pub fn files(stage: &Path) -> anyhow::Result<Vec<PathBuf>> {
    fn walk(dir: &Path, base: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            let rel = path.strip_prefix(base)?.to_path_buf();
            if rel.starts_with("DEBIAN") {
                continue;
            }
            if path.is_dir() {
                walk(&path, base, out)?;
            } else {
                out.push(rel);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(stage, stage, &mut out)?;
    out.sort();
    Ok(out)
}

fn tree_size(stage: &Path) -> anyhow::Result<u64> {
    files(stage)?
        .iter()
        .map(|f| Ok(fs::metadata(stage.join(f))?.len()))
        .sum()
}

fn md5sums(stage: &Path) -> anyhow::Result<String> {
    let files = files(stage)?;
    let listing = output(Command::new("md5sum").current_dir(stage).args(&files))?;
    Ok(listing)
}

const COPYRIGHT: &str = "\
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: edgeplane
Source: https://github.com/edgeplane/edgeplane

Files: *
Copyright: edgeplane developers
License: MIT or Apache-2.0
 On Debian systems the Apache License 2.0 is in /usr/share/common-licenses/Apache-2.0.
";
