//! `cargo xtask dist`: the agent as shipped, the binary the Debian package holds. The release
//! build split with binutils' objcopy: `target/ship/edgeplane` without symbols or debug info,
//! pointing by `.gnu_debuglink` at `target/ship/edgeplane.debug`, which holds them (gdb and
//! perf find it beside the binary or under /usr/lib/debug). `--lto` builds with the `dist`
//! profile instead (fat LTO, one codegen unit, abort on panic): smaller, but its final link
//! did not finish within 40 minutes on a loaded 2-core machine, so nothing depends on it yet.

use std::{fs, path::PathBuf};

use anyhow::Context as _;

use crate::{
    build::Arch,
    toolchain::{run_checked, step, workspace_root},
};

#[derive(clap::Args, Default)]
pub struct Options {
    /// Build with the `dist` profile (fat LTO; very long on small machines).
    #[arg(long)]
    lto: bool,
}

/// Builds and splits; returns the shipped binary's path.
pub fn run(opts: &Options) -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    let built = if opts.lto {
        step("building the agent with the dist profile (fat LTO)");
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
