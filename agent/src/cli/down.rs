use std::time::Duration;

use anyhow::Context as _;

use super::target::Target;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    target: Target,
    /// Seconds to wait for a running agent to exit after SIGTERM.
    #[arg(long, default_value_t = 30)]
    wait: u64,
    /// Print what was removed as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let dir = args.target.dir()?;
    let removed = edgeplane::kernel::pinned::down(&dir, Duration::from_secs(args.wait), |step| {
        eprintln!("{step}")
    })
    .with_context(|| format!("removing the data plane pinned in {}", dir.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&removed)?);
    } else if removed.unpinned.is_none() {
        println!("nothing is pinned in {}", dir.display());
    } else {
        println!(
            "data plane removed: {} attachment(s) detached, {} can-gw job(s) removed, {} unpinned",
            removed.detached.len(),
            removed.can_gw_jobs,
            dir.display()
        );
    }
    Ok(())
}
