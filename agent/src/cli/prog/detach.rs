use anyhow::Context as _;

use crate::cli::target::Target;

#[derive(clap::Args)]
pub struct Args {
    /// Pinned program name (`edgeplane prog list`).
    program: String,
    /// Interface to detach it from.
    #[arg(long)]
    iface: String,
    #[command(flatten)]
    target: Target,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let dir = args.target.dir()?;
    let r = edgeplane::kernel::pinned::detach_pinned(&dir, &args.program, &args.iface)
        .with_context(|| format!("detaching {} from {}", args.program, args.iface))?;
    println!("detached {} from {} ({})", r.program, r.iface, r.hook);
    Ok(())
}
