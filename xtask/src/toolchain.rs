//! Where things are: the workspace, the pinned nightly, bpf-linker.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// Version of bpf-linker that `setup` builds. Bumping it rebuilds on the next setup.
pub const BPF_LINKER_VERSION: &str = "0.13.0";
/// Version of cargo-fuzz that `setup` installs for `cargo xtask fuzz`.
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// The nightly channel pinned in `ebpf-programs/rust-toolchain.toml`.
pub fn pinned_nightly() -> anyhow::Result<String> {
    #[derive(serde::Deserialize)]
    struct File {
        toolchain: Toolchain,
    }
    #[derive(serde::Deserialize)]
    struct Toolchain {
        channel: String,
    }
    let path = workspace_root().join("ebpf-programs/rust-toolchain.toml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let file: File =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(file.toolchain.channel)
}

pub fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo")
        })
}

/// bpf-linker goes where `cargo install` puts binaries, so it is on PATH for users too.
pub fn bpf_linker_path() -> PathBuf {
    cargo_home().join("bin/bpf-linker")
}

/// Our state beside it: the LLVM prefix bpf-linker links against and the build stamp.
pub fn state_dir() -> PathBuf {
    cargo_home().join("edgeplane")
}

/// A `cargo` command without what `cargo run` set for xtask itself (CARGO_MANIFEST_DIR and
/// friends): build scripts that track them (ring's does) would otherwise rebuild on every
/// switch between `cargo xtask ...` and a plain `cargo build`.
pub fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_BIN_")
            || matches!(
                &*key,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
            )
        {
            cmd.env_remove(&*key);
        }
    }
    cmd
}

/// Runs a command, failing with its full command line when it does not succeed.
pub fn run_checked(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("could not start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Runs a command and returns its stdout, failing on a non-zero exit.
pub fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("could not start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Prints a progress line for a step of long work.
pub fn step(msg: impl std::fmt::Display) {
    eprintln!("==> {msg}");
}

/// Fails with what to do when not running as root.
pub fn require_root(why: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "this needs root: {why}; run it as root, e.g. `sudo -E env PATH=\"$PATH\" cargo xtask ...`"
        );
    }
    Ok(())
}
