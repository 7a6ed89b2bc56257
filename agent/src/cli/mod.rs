//! Subcommands, one file each.

mod check_config;
mod client;
mod down;
mod prog;
mod registry;
mod run;
mod status;
mod table;
mod target;

use std::{io::IsTerminal as _, process::ExitCode};

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "edgeplane",
    version,
    about = "eBPF data-plane agent for vehicles and edge boxes"
)]
pub struct Cli {
    /// Log filter (tracing EnvFilter syntax, e.g. `info` or `edgeplane=debug`); RUST_LOG overrides.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent in the foreground.
    Run(run::Args),
    /// Validate a config file and exit: 0 when it is good, 1 with the offending keys when not.
    CheckConfig(check_config::Args),
    /// Read the fleet registry in etcd.
    Registry(registry::Args),
    /// Show the agent, the pinned programs and where they are attached, and what the running
    /// agent reports.
    Status(status::Args),
    /// Inspect and manage the pinned programs.
    #[command(subcommand)]
    Prog(prog::Command),
    /// Remove the data plane: stop a running agent, detach every program, remove our can-gw
    /// jobs, unpin everything.
    Down(down::Args),
}

impl Cli {
    pub fn run(self) -> ExitCode {
        let filter = EnvFilter::try_from_default_env()
            .or_else(|_| EnvFilter::try_new(&self.log_level))
            .unwrap_or_else(|_| EnvFilter::new("info"));
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .init();
        let result = match self.command {
            Command::Run(args) => run::run(args),
            Command::CheckConfig(args) => check_config::run(args),
            Command::Registry(args) => registry::run(args),
            Command::Status(args) => status::run(args),
            Command::Prog(command) => prog::run(command),
            Command::Down(args) => down::run(args),
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        }
    }
}
