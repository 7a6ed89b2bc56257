use std::{collections::BTreeSet, path::PathBuf};

use edgeplane::{config::Config, dataplane};

#[derive(clap::Args)]
pub struct Args {
    /// Config file to check.
    file: PathBuf,
    /// Skip checks against this host (that interfaces exist): for configs meant for another box.
    #[arg(long)]
    offline: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let config = if args.offline {
        Config::load(&args.file)?
    } else {
        dataplane::prepare(&args.file)?.config
    };
    let ingress: BTreeSet<&str> = config
        .udp
        .forward
        .iter()
        .map(|r| r.ingress.as_str())
        .collect();
    let c = &config.can;
    println!(
        "{}: OK ({} UDP rule(s) on {} ingress interface(s), mode {}; {} CAN route(s), {} watched ID(s), {} tunnel receiver(s){})",
        args.file.display(),
        config.udp.forward.len(),
        ingress.len(),
        config.udp.mode,
        c.route.len(),
        c.watch.len(),
        c.receive.len(),
        if args.offline {
            "; host checks skipped"
        } else {
            ""
        }
    );
    Ok(())
}
