//! `edgeplane prog`: the pinned programs, one file per subcommand.

mod attach;
mod detach;
mod list;
mod show;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum Command {
    /// List the programs pinned by the agent, with where they are attached.
    List(list::Args),
    /// Show one program in detail: kernel facts, statistics, maps, attachments.
    Show(show::Args),
    /// Attach a pinned program to an interface (only while no agent runs; a running agent
    /// follows its config).
    Attach(attach::Args),
    /// Detach a pinned program from an interface (only while no agent runs).
    Detach(detach::Args),
}

pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::List(a) => list::run(a),
        Command::Show(a) => show::run(a),
        Command::Attach(a) => attach::run(a),
        Command::Detach(a) => detach::run(a),
    }
}
