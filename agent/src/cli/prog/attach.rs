use anyhow::Context as _;

use crate::cli::target::Target;

#[derive(clap::Args)]
pub struct Args {
    /// Pinned program name (`edgeplane prog list`): XDP programs attach at XDP, tc programs at
    /// tc ingress.
    program: String,
    /// Interface to attach to.
    #[arg(long)]
    iface: String,
    #[command(flatten)]
    target: Target,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let dir = args.target.dir()?;
    let r = edgeplane::kernel::pinned::attach_pinned(&dir, &args.program, &args.iface)
        .with_context(|| format!("attaching {} to {}", args.program, args.iface))?;
    println!("attached {} to {} ({})", r.program, r.iface, r.hook);
    Ok(())
}
