//! `cargo xtask setup`: everything a fresh machine needs, idempotent and quick when done.

use std::{fs, os::unix::fs::symlink, path::Path, process::Command};

use anyhow::Context as _;

use crate::toolchain::{
    self, BPF_LINKER_VERSION, CARGO_FUZZ_VERSION, output, require_root, run_checked, step,
};

/// Debian packages the build, demo and tests use, with why.
const APT_PACKAGES: &[(&str, &str)] = &[
    (
        "iproute2",
        "ip netns / veth topologies in the demo and tests",
    ),
    ("ethtool", "veth offload settings in tests"),
    ("iputils-ping", "neighbour resolution in tests"),
    (
        "prometheus",
        "promtool check metrics, and a real Prometheus server, in tests",
    ),
    (
        "can-utils",
        "cansend, candump, cangw in the CAN tests (VM only)",
    ),
    (
        "qemu-system-x86",
        "the VM tests on Debian's 5.10 and 6.1 kernels",
    ),
    (
        "wireguard-tools",
        "wg: the WireGuard link of the CAN tunnel test (VM only)",
    ),
    ("busybox-static", "the VM tests' initramfs userland"),
    ("kmod", "depmod: modules.dep of the VM tests' kernels"),
    ("xz-utils", "decompressing .ko.xz modules for the VM tests"),
    ("etcd-server", "the etcd the registry tests register with"),
    (
        "etcd-client",
        "etcdctl: the registry tests read what the agent wrote",
    ),
    (
        "systemd",
        "systemd-analyze verify of configs/edgeplane.service",
    ),
    (
        "nginx-light",
        "the proxy that requires a bearer token in front of Prometheus in the remote_write tests",
    ),
    (
        "socat",
        "the userspace relay `cargo xtask bench` compares the engines with",
    ),
    (
        "nftables",
        "nft: `cargo xtask bench`'s linux-nat engine (DNAT on the gateway) and its receiver's counting sink",
    ),
    ("g++", "libFuzzer, which the fuzz targets link, is C++"),
    (
        "gcc-aarch64-linux-gnu",
        "cross-linking the arm64 agent (`cargo xtask build --target aarch64-unknown-linux-gnu`)",
    ),
    (
        "libc6-dev-arm64-cross",
        "the arm64 C library the cross-linked agent links against",
    ),
    (
        "qemu-system-arm",
        "qemu-system-aarch64: the VM tests on Debian's arm64 kernels (`vm-test --arch arm64`)",
    ),
    (
        "qemu-user",
        "running the cross-built agent once after building it (`edgeplane --version`)",
    ),
    (
        "binutils",
        "objcopy: `cargo xtask dist` splits the debug symbols off",
    ),
];

/// Rust targets the agent is cross-built for (`cargo xtask build --target`, `package`).
const CROSS_TARGETS: &[&str] = &["aarch64-unknown-linux-gnu"];

#[derive(clap::Args, Default)]
pub struct Options {
    /// Don't install Debian packages (they must already be there).
    #[arg(long)]
    no_apt: bool,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    if !opts.no_apt {
        apt_packages()?;
    }
    let nightly = toolchain::pinned_nightly()?;
    nightly_toolchain(&nightly)?;
    cross_targets()?;
    bpf_linker(&nightly)?;
    cargo_fuzz()?;
    step("setup complete");
    Ok(())
}

fn apt_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| !dpkg_installed(name))
        .collect();
    if missing.is_empty() {
        step("apt packages: all present");
        return Ok(());
    }
    require_root(&format!(
        "installing the Debian packages {}",
        missing.join(" ")
    ))?;
    step(format_args!(
        "apt packages: installing {}",
        missing.join(" ")
    ));
    run_checked(Command::new("apt-get").arg("update").arg("-q"))?;
    run_checked(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn dpkg_installed(name: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", name])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn nightly_toolchain(channel: &str) -> anyhow::Result<()> {
    let sysroot =
        output(Command::new("rustup").args(["run", channel, "rustc", "--print", "sysroot"]));
    if let Ok(sysroot) = &sysroot
        && Path::new(sysroot.trim())
            .join("lib/rustlib/src/rust/library/core")
            .is_dir()
    {
        step(format_args!("toolchain {channel} with rust-src: present"));
        return Ok(());
    }
    step(format_args!(
        "toolchain {channel}: installing with rust-src"
    ));
    run_checked(Command::new("rustup").args([
        "toolchain",
        "install",
        channel,
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ]))
}

/// The standard library of each cross target, for the stable toolchain that builds the agent.
fn cross_targets() -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    let missing: Vec<&str> = (CROSS_TARGETS.iter().copied())
        .filter(|t| !installed.lines().any(|l| l.trim() == *t))
        .collect();
    if missing.is_empty() {
        step("cross targets: present");
        return Ok(());
    }
    step(format_args!("cross targets: adding {}", missing.join(" ")));
    run_checked(
        Command::new("rustup")
            .args(["target", "add"])
            .args(&missing),
    )
}

/// cargo-fuzz, which builds the fuzz targets (`cargo xtask fuzz`).
fn cargo_fuzz() -> anyhow::Result<()> {
    let wanted = format!("cargo-fuzz {CARGO_FUZZ_VERSION}");
    if output(toolchain::cargo().args(["fuzz", "--version"])).is_ok_and(|v| v.trim() == wanted) {
        step(format_args!("{wanted}: present"));
        return Ok(());
    }
    step(format_args!("{wanted}: installing (a few minutes)"));
    run_checked(
        toolchain::cargo()
            .args([
                "install",
                "cargo-fuzz",
                "--locked",
                "--version",
                CARGO_FUZZ_VERSION,
                "--root",
            ])
            .arg(toolchain::cargo_home()),
    )
}

/// Builds bpf-linker against the nightly's own libLLVM: the bitcode rustc emits must be read by
/// the same LLVM major, and Debian's LLVM is a different one.
fn bpf_linker(channel: &str) -> anyhow::Result<()> {
    let version = output(Command::new("rustup").args(["run", channel, "rustc", "-vV"]))?;
    let llvm_major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc -vV printed no LLVM version")?
        .to_owned();
    let sysroot =
        output(Command::new("rustup").args(["run", channel, "rustc", "--print", "sysroot"]))?;
    let libdir = Path::new(sysroot.trim()).join("lib");
    let libllvm = fs::read_dir(&libdir)
        .with_context(|| format!("reading {}", libdir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| format!("no libLLVM.so.* in {}", libdir.display()))?;

    let stamp_text = format!(
        "bpf-linker {BPF_LINKER_VERSION} llvm-{llvm_major} {channel} {}\n",
        libllvm.display()
    );
    let state = toolchain::state_dir();
    let stamp = state.join("bpf-linker.stamp");
    let linker = toolchain::bpf_linker_path();
    if fs::read_to_string(&stamp).is_ok_and(|s| s == stamp_text)
        && Command::new(&linker)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    {
        step(format_args!(
            "bpf-linker {BPF_LINKER_VERSION} (LLVM {llvm_major}): present"
        ));
        return Ok(());
    }

    step(format_args!(
        "bpf-linker {BPF_LINKER_VERSION}: building against {} (about a minute)",
        libllvm.display()
    ));
    // bpf-linker's build looks for `$LLVM_PREFIX/lib/libLLVM.so`; its rpath keeps pointing there,
    // so this prefix must outlive the build.
    let prefix = state.join(format!("llvm-{channel}"));
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    for name in [
        "libLLVM.so".into(),
        libllvm.file_name().expect("file has a name").to_owned(),
    ] {
        let link = prefix_lib.join(name);
        let _ = fs::remove_file(&link);
        symlink(&libllvm, &link).with_context(|| format!("linking {}", link.display()))?;
    }
    run_checked(
        toolchain::cargo()
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--force",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                &format!("llvm-{llvm_major}"),
                "--root",
            ])
            .arg(toolchain::cargo_home())
            .env("LLVM_PREFIX", &prefix),
    )?;
    fs::write(&stamp, stamp_text).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(())
}
