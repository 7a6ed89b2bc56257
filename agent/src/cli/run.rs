use std::path::PathBuf;

use edgeplane::{config::Overrides, runtime::run::RunOptions};

#[derive(clap::Args)]
pub struct Args {
    /// Config file (see configs/edgeplane.toml).
    #[arg(long, short)]
    config: PathBuf,
    /// Overrides agent.service_name.
    #[arg(long)]
    service_name: Option<String>,
    /// Overrides registry.endpoints (comma-separated); enables registration without [registry].
    #[arg(long, value_delimiter = ',')]
    etcd_endpoints: Option<Vec<String>>,
    /// Overrides agent.spiffe_id.
    #[arg(long)]
    spiffe_id: Option<String>,
    /// Overrides agent.vin.
    #[arg(long)]
    vin: Option<String>,
    /// bpffs directory for the pinned data plane; overrides `[agent] bpffs`.
    #[arg(long, value_name = "DIR")]
    bpffs: Option<PathBuf>,
    /// On exit, detach the programs and unpin everything instead of leaving the data plane
    /// running for the next agent.
    #[arg(long)]
    detach_on_exit: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let overrides = Overrides {
        service_name: args.service_name,
        vin: args.vin,
        spiffe_id: args.spiffe_id,
        etcd_endpoints: args.etcd_endpoints,
    };
    edgeplane::runtime::supervise::install_panic_hook();
    let runtime = edgeplane::runtime::supervise::runtime()?;
    let result = runtime.block_on(edgeplane::runtime::run::run(
        args.config,
        RunOptions {
            bpffs: args.bpffs,
            detach_on_exit: args.detach_on_exit,
            overrides,
        },
    ));
    // A name lookup can't be cancelled: one still waiting on its DNS server (on the blocking
    // pool) must not hold up the exit.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    result
}
