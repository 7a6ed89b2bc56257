//! Project automation: `cargo xtask <command>`.

mod setup;
mod toolchain;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "edgeplane project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make this machine ready to build and test: nightly + rust-src, bpf-linker, apt packages.
    Setup(setup::Options),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup(opts) => setup::run(&opts),
    }
}
