use std::{collections::BTreeSet, path::PathBuf};

use edgeplane::{config::Config, runtime::prepare};

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
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let prepared = runtime.block_on(prepare::prepare(
            &args.file,
            &Default::default(),
            &Default::default(),
        ));
        // Not waiting for a lookup that timed out (getaddrinfo can't be cancelled).
        runtime.shutdown_background();
        let prepared = prepared?;
        // The agent runs such a config, the route waiting for its peer; a check says so.
        if !prepared.unresolved.is_empty() {
            let lines: Vec<String> = (prepared.unresolved.iter())
                .map(|u| format!("  - can.route `{}`.to.udp: {}", u.route, u.error))
                .collect();
            anyhow::bail!(
                "{}: {} tunnel peer(s) do not resolve on this host:\n{}",
                args.file.display(),
                lines.len(),
                lines.join("\n")
            );
        }
        prepared.config
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
