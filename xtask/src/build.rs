//! `cargo xtask build`: the release agent, with its eBPF programs, for one architecture.
//!
//! The agent's build script builds the programs through aya-build, which sets
//! `bpf_target_arch` from the target cargo builds the agent for: a cross build gets programs
//! whose kprobes read that architecture's registers, never the build machine's.

use std::path::PathBuf;

use anyhow::{Context as _, bail};

use crate::toolchain::{self, run_checked, step};

/// The architectures edgeplane is built, packaged and tested for.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Arch {
    Amd64,
    Arm64,
}

impl Arch {
    pub const ALL: [Arch; 2] = [Arch::Amd64, Arch::Arm64];

    pub fn from_rust_target(triple: &str) -> anyhow::Result<Arch> {
        Arch::ALL
            .into_iter()
            .find(|a| a.rust_target() == triple)
            .with_context(|| {
                format!(
                    "unsupported target {triple}: edgeplane builds for {}",
                    Arch::ALL.map(|a| a.rust_target()).join(", ")
                )
            })
    }

    /// The machine this runs on.
    pub fn host() -> Arch {
        if cfg!(target_arch = "aarch64") {
            Arch::Arm64
        } else {
            Arch::Amd64
        }
    }

    pub fn rust_target(self) -> &'static str {
        match self {
            Arch::Amd64 => "x86_64-unknown-linux-gnu",
            Arch::Arm64 => "aarch64-unknown-linux-gnu",
        }
    }

    /// Debian's name, as in package file names and `apt-get download pkg:ARCH`.
    pub fn debian(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }

    /// ELF e_machine of this architecture's executables.
    fn elf_machine(self) -> u16 {
        match self {
            Arch::Amd64 => 62,  // EM_X86_64
            Arch::Arm64 => 183, // EM_AARCH64
        }
    }

    /// Debian's multiarch triple: library directories, cross tools' prefix, cross sysroot.
    pub fn multiarch(self) -> &'static str {
        match self {
            Arch::Amd64 => "x86_64-linux-gnu",
            Arch::Arm64 => "aarch64-linux-gnu",
        }
    }

    /// Prefix of Debian's cross binutils (gcc-aarch64-linux-gnu); none for the host's own.
    pub fn binutils_prefix(self) -> String {
        if self == Arch::host() {
            String::new()
        } else {
            format!("{}-", self.multiarch())
        }
    }
}

#[derive(clap::Args)]
pub struct Options {
    /// Rust target to build for (x86_64-unknown-linux-gnu, aarch64-unknown-linux-gnu); the
    /// build machine's by default.
    #[arg(long)]
    target: Option<String>,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    crate::setup::run(&crate::setup::Options::default())?;
    let arch = match &opts.target {
        Some(t) => Arch::from_rust_target(t)?,
        None => Arch::host(),
    };
    let binary = agent(arch)?;
    println!("{}", binary.display());
    Ok(())
}

/// Builds the release agent for `arch` and returns its path, checked to be that
/// architecture's executable. The host's build goes where the tests look for it
/// (target/release); another architecture's under target/<triple>/release.
pub fn agent(arch: Arch) -> anyhow::Result<PathBuf> {
    let root = toolchain::workspace_root();
    step(format_args!(
        "building the agent for {}",
        arch.rust_target()
    ));
    let mut cmd = toolchain::cargo();
    cmd.current_dir(&root)
        .args(["build", "--release", "--bin", "edgeplane"]);
    let binary = if arch == Arch::host() {
        root.join("target/release/edgeplane")
    } else {
        cmd.args(["--target", arch.rust_target()]);
        root.join("target")
            .join(arch.rust_target())
            .join("release/edgeplane")
    };
    run_checked(&mut cmd)?;
    let machine = elf_machine(&binary)?;
    if machine != arch.elf_machine() {
        bail!(
            "{} is an ELF for machine {machine}, not {} ({})",
            binary.display(),
            arch.debian(),
            arch.elf_machine()
        );
    }
    smoke_run(arch, &binary)?;
    Ok(binary)
}

/// `edgeplane --version` with the built binary: natively, or under Debian's qemu-user for
/// another architecture (with that architecture's libc from the cross packages).
fn smoke_run(arch: Arch, binary: &std::path::Path) -> anyhow::Result<()> {
    let mut cmd = if arch == Arch::host() {
        std::process::Command::new(binary)
    } else {
        let qemu = match arch {
            Arch::Amd64 => "qemu-x86_64",
            Arch::Arm64 => "qemu-aarch64",
        };
        let mut cmd = std::process::Command::new(qemu);
        cmd.arg("-L")
            .arg(format!("/usr/{}", arch.multiarch()))
            .arg(binary);
        cmd
    };
    let printed = toolchain::output(cmd.arg("--version"))
        .with_context(|| format!("running the {} build", arch.debian()))?;
    if !printed.starts_with("edgeplane ") {
        bail!("{} --version printed {printed:?}", binary.display());
    }
    step(format_args!("{} runs: {}", arch.debian(), printed.trim()));
    Ok(())
}

/// Splits `built` into `binary` (no symbols or debug info, with a `.gnu_debuglink` naming
/// `debug`) and `debug` (the symbols and debug info), with `arch`'s binutils. gdb and perf find
/// the debug file beside the binary, by its name, or under /usr/lib/debug by build ID.
pub fn split_debug(
    arch: Arch,
    built: &std::path::Path,
    binary: &std::path::Path,
    debug: &std::path::Path,
) -> anyhow::Result<()> {
    let objcopy = format!("{}objcopy", arch.binutils_prefix());
    let run = |args: &[&std::ffi::OsStr]| {
        run_checked(std::process::Command::new(&objcopy).args(args)).with_context(|| {
            format!("{objcopy} (Debian: binutils, or gcc-aarch64-linux-gnu for arm64)")
        })
    };
    run(&[
        "--only-keep-debug".as_ref(),
        built.as_os_str(),
        debug.as_os_str(),
    ])?;
    // The debug link names the file only; the directory is wherever gdb looks.
    let link = format!("--add-gnu-debuglink={}", debug.display());
    run(&[
        "--strip-all".as_ref(),
        link.as_ref(),
        built.as_os_str(),
        binary.as_os_str(),
    ])
}

fn elf_machine(path: &std::path::Path) -> anyhow::Result<u16> {
    let mut header = [0u8; 20];
    std::io::Read::read_exact(
        &mut std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?,
        &mut header,
    )
    .with_context(|| format!("reading the ELF header of {}", path.display()))?;
    if &header[..4] != b"\x7fELF" || header[5] != 1 {
        bail!("{} is not a little-endian ELF file", path.display());
    }
    Ok(u16::from_le_bytes([header[18], header[19]]))
}
