//! `cargo xtask dist`: the agent as shipped, the binary the Debian package holds. The release
//! build split with binutils' objcopy: `target/ship/edgeplane` without symbols or debug info,
//! pointing by `.gnu_debuglink` at `target/ship/edgeplane.debug`, which holds them (gdb and
//! perf find it beside the binary or under /usr/lib/debug). `--small` builds with the `dist`
//! profile instead (dependencies optimised for size, abort on panic): 9.3 MB stripped against
//! the release build's 12.2 MB, a build of its own of about 12 minutes on 2 cores, so the
//! package and the tests keep the release build for now.

use std::{fs, path::PathBuf};

use anyhow::Context as _;

use crate::{
    build::Arch,
    toolchain::{run_checked, step, workspace_root},
};

#[derive(clap::Args, Default)]
pub struct Options {
    /// Build with the `dist` profile (dependencies optimised for size, abort on panic): a
    /// quarter smaller, a build of its own.
    #[arg(long)]
    small: bool,
}

/// Builds and splits; returns the shipped binary's path.
pub fn run(opts: &Options) -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    let built = if opts.small {
        step("building the agent with the dist profile (dependencies optimised for size)");
        run_checked(crate::toolchain::cargo().current_dir(&root).args([
            "build",
            "--profile",
            "dist",
            "--bin",
            "edgeplane",
        ]))?;
        root.join("target/dist/edgeplane")
    } else {
        crate::build::agent(Arch::host())?
    };
    let ship = root.join("target/ship");
    fs::create_dir_all(&ship).with_context(|| format!("creating {}", ship.display()))?;
    let (binary, debug) = (ship.join("edgeplane"), ship.join("edgeplane.debug"));
    crate::build::split_debug(Arch::host(), &built, &binary, &debug)?;
    let size = |p: &PathBuf| fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    step(format_args!(
        "{} ({:.1} MB) and its debug symbols {} ({:.1} MB)",
        binary.display(),
        size(&binary) as f64 / 1e6,
        debug.display(),
        size(&debug) as f64 / 1e6
    ));
    Ok(binary)
}
