//! `cargo xtask package`: Debian packages of the agent for amd64 and arm64.
//!
//! Built with dpkg-deb from a staged tree, so no packaging tool beyond dpkg is needed:
//! `/usr/bin/edgeplane` (stripped; its debug symbols beside the .deb as
//! `edgeplane_<version>_<arch>.debug`, linked by build ID and debuglink), the systemd unit, a
//! config that forwards nothing as the conffile `/etc/edgeplane/edgeplane.toml`, the commented
//! example under `/usr/share/doc/edgeplane/examples/`, and the maintainer scripts in
//! `configs/package/` (user and group, state directory, the unit enabled but not started,
//! a purge that leaves nothing).

mod deb;
pub mod install_test;

use std::path::PathBuf;

use crate::{
    build::{self, Arch},
    toolchain::{self, step},
};

#[derive(clap::Args)]
pub struct Options {
    /// Architectures to package (repeatable); both by default.
    #[arg(long = "arch", value_enum)]
    arch: Vec<Arch>,
    /// Then install the host architecture's package on this machine, check it and purge it
    /// (needs root; changes the system while it runs, leaves nothing).
    #[arg(long)]
    install_test: bool,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    crate::setup::run(&crate::setup::Options::default())?;
    let archs = if opts.arch.is_empty() {
        Arch::ALL.to_vec()
    } else {
        opts.arch.clone()
    };
    let mut built = Vec::new();
    for arch in archs {
        built.push((arch, package(arch)?));
    }
    for (arch, deb) in &built {
        let size = std::fs::metadata(deb).map(|m| m.len()).unwrap_or(0);
        println!(
            "{:<6} {} ({:.1} MB)",
            arch.debian(),
            deb.display(),
            size as f64 / 1e6
        );
    }
    if opts.install_test {
        let host = Arch::host();
        let deb = match built.iter().find(|(a, _)| *a == host) {
            Some((_, deb)) => deb.clone(),
            None => package(host)?,
        };
        install_test::run(&deb)?;
    }
    Ok(())
}

/// Builds the agent for `arch` and its .deb; returns the .deb's path.
pub fn package(arch: Arch) -> anyhow::Result<PathBuf> {
    let binary = build::agent(arch)?;
    let root = toolchain::workspace_root();
    let out = root.join("target/package");
    step(format_args!("packaging edgeplane for {}", arch.debian()));
    deb::build(&deb::Inputs {
        arch,
        version: workspace_version(&root)?,
        binary,
        unit: root.join("configs/edgeplane.service"),
        config: root.join("configs/package/edgeplane.toml"),
        sysusers: root.join("configs/edgeplane.sysusers"),
        example: root.join("configs/edgeplane.toml"),
        scripts: root.join("configs/package"),
        out,
    })
}

fn workspace_version(root: &std::path::Path) -> anyhow::Result<String> {
    use anyhow::Context as _;
    let text = std::fs::read_to_string(root.join("Cargo.toml"))?;
    let manifest: toml::Table = toml::from_str(&text)?;
    manifest
        .get("workspace")
        .and_then(|w| w.get("package"))
        .and_then(|p| p.get("version"))
        .and_then(|v| v.as_str())
        .map(str::to_owned)
        .context("Cargo.toml: no workspace.package.version")
}
