//! Which pinned data plane a command means: `--bpffs DIR`, or a config's `[agent] bpffs`.

use std::path::PathBuf;

use anyhow::Context as _;
use edgeplane::{config::Config, kernel::pins};

#[derive(clap::Args)]
pub struct Target {
    /// Config file whose `[agent] bpffs` names the pin directory.
    #[arg(long, short, conflicts_with = "bpffs")]
    config: Option<PathBuf>,
    /// Pin directory of the data plane [default: /sys/fs/bpf/edgeplane].
    #[arg(long, value_name = "DIR")]
    bpffs: Option<PathBuf>,
}

impl Target {
    pub fn dir(&self) -> anyhow::Result<PathBuf> {
        if let Some(dir) = &self.bpffs {
            return Ok(dir.clone());
        }
        if let Some(path) = &self.config {
            let config = Config::load(path).context("reading the config for [agent] bpffs")?;
            return Ok(config.agent.bpffs);
        }
        Ok(PathBuf::from(pins::DEFAULT_DIR))
    }
}
