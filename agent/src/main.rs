//! The `edgeplane` command line: a thin layer over the library.

mod cli;

use clap::Parser as _;

fn main() -> std::process::ExitCode {
    cli::Cli::parse().run()
}
