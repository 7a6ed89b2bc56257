//! Project automation: `cargo xtask <command>`.

mod bench;
mod build;
mod demo;
mod dist;
mod fuzz;
mod package;
mod setup;
mod test;
mod toolchain;
mod vm;

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
    /// Build everything, forward real traffic across a throwaway netns topology, print metrics.
    Demo(demo::Options),
    /// Set up, build, and run every test (unit, eBPF program, end-to-end), a short fuzzing pass,
    /// then the VM tests.
    Test(test::Options),
    /// Run the kernel tests inside qemu on each supported Debian kernel (5.10, 6.1).
    VmTest(vm::Options),
    /// Build the agent as shipped: target/ship/edgeplane (stripped) and edgeplane.debug.
    Dist(dist::Options),
    /// Benchmark every engine side by side; writes target/bench/latest.{md,json}.
    Bench(bench::Options),
    /// Build the release agent with its eBPF programs for one architecture (cross builds too).
    Build(build::Options),
    /// Build Debian packages (amd64, arm64) into target/package/.
    Package(package::Options),
    /// Run the fuzz targets (cargo-fuzz, libFuzzer) for a bounded time each; fails on a crash.
    Fuzz(fuzz::Options),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup(opts) => setup::run(&opts),
        Command::Demo(opts) => demo::run(&opts),
        Command::Test(opts) => test::run(&opts),
        Command::VmTest(opts) => vm::run(&opts),
        Command::Dist(opts) => dist::run(&opts).map(drop),
        Command::Bench(opts) => bench::run(&opts),
        Command::Fuzz(opts) => fuzz::run(&opts),
        Command::Build(opts) => build::run(&opts),
        Command::Package(opts) => package::run(&opts),
    }
}
