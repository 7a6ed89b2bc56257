use std::path::PathBuf;

use edgeplane::agent::RunOptions;

#[derive(clap::Args)]
pub struct Args {
    /// Config file (see configs/edgeplane.toml).
    #[arg(long, short)]
    config: PathBuf,
    /// bpffs directory for the pinned data plane; overrides `[agent] bpffs`.
    #[arg(long, value_name = "DIR")]
    bpffs: Option<PathBuf>,
    /// On exit, detach the programs and unpin everything instead of leaving the data plane
    /// running for the next agent.
    #[arg(long)]
    detach_on_exit: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(edgeplane::agent::run(
            args.config,
            RunOptions {
                bpffs: args.bpffs,
                detach_on_exit: args.detach_on_exit,
            },
        ))
}
