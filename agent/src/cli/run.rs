use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Config file (see configs/edgeplane.toml).
    #[arg(long, short)]
    config: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(edgeplane::agent::run(args.config))
}
