//! `cargo xtask dist`: the agent as shipped. Built with the `dist` profile (fat LTO, one
//! codegen unit, abort on panic), then split with binutils' objcopy: `target/ship/edgeplane`
//! without symbols or debug info, pointing by `.gnu_debuglink` at `target/ship/edgeplane.debug`,
//! which holds them (gdb and perf find it beside the binary or under /usr/lib/debug).

use std::{fs, path::PathBuf, process::Command};

use anyhow::Context as _;

use crate::toolchain::{run_checked, step, workspace_root};

#[derive(clap::Args, Default)]
pub struct Options {}

/// Builds and splits; returns the shipped binary's path.
pub fn run(_opts: &Options) -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    step("building the agent with the dist profile (fat LTO: a few minutes)");
    run_checked(crate::toolchain::cargo().current_dir(&root).args([
        "build",
        "--profile",
        "dist",
        "-p",
        "edgeplane",
        "--bin",
        "edgeplane",
    ]))?;
    let built = root.join("target/dist/edgeplane");
    let ship = root.join("target/ship");
    fs::create_dir_all(&ship).with_context(|| format!("creating {}", ship.display()))?;
    let (binary, debug) = (ship.join("edgeplane"), ship.join("edgeplane.debug"));
    let objcopy = |args: &[&std::ffi::OsStr]| {
        run_checked(Command::new("objcopy").args(args))
            .context("objcopy (Debian package binutils, installed by `cargo xtask setup`)")
    };
    objcopy(&[
        "--only-keep-debug".as_ref(),
        built.as_os_str(),
        debug.as_os_str(),
    ])?;
    // The debug link names the file only; the directory is wherever gdb looks.
    let link = format!("--add-gnu-debuglink={}", debug.display());
    objcopy(&[
        "--strip-all".as_ref(),
        link.as_ref(),
        built.as_os_str(),
        binary.as_os_str(),
    ])?;
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
