//! The host metrics' share of a scrape: one rtnetlink dump of every interface, and the
//! per-interface and CAN controller series of the interfaces the config names. A config names
//! at most 256 ingress interfaces plus their egresses.

use std::{
    sync::{Arc, RwLock},
    time::Instant,
};

use edgeplane::{
    host::stats::HostCollector,
    metrics::{self, AgentMetrics},
};
use edgeplane_testbed::netns::Netns;

use crate::{
    report::{Report, Row},
    table::markdown,
};

#[derive(clap::Args)]
pub struct Options {
    /// Interfaces (veth ends, in pairs) in the namespace, all named by the config.
    #[arg(long, default_value_t = 256)]
    interfaces: u16,
    /// Renders to time.
    #[arg(long, default_value_t = 200)]
    renders: usize,
    /// Write the result as a JSON row here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    let ns = Netns::new("hmb")?;
    let mut names = Vec::new();
    for i in 0..opts.interfaces.div_ceil(2) {
        let (a, b) = (format!("va{i}"), format!("vb{i}"));
        ns.ip(&["link", "add", &a, "type", "veth", "peer", "name", &b])?;
        ns.ip(&["link", "set", &a, "up"])?;
        ns.ip(&["link", "set", &b, "up"])?;
        names.extend([a, b]);
    }
    names.truncate(usize::from(opts.interfaces));
    names.sort();
    let registry = metrics::registry(
        &AgentMetrics::default(),
        vec![Box::new(HostCollector {
            interfaces: Arc::new(RwLock::new(names)),
        })],
    );
    // The dump reads the namespace the calling thread is in.
    let _in = ns.enter()?;
    let mut times: Vec<f64> = Vec::with_capacity(opts.renders);
    let mut bytes = 0;
    for _ in 0..opts.renders {
        let start = Instant::now();
        bytes = metrics::render(&registry).len();
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    let p99 = times[(times.len() * 99 / 100).min(times.len() - 1)];
    println!(
        "host metrics rendering (one RTM_GETLINK dump each), {} renders\n\n{}",
        opts.renders,
        markdown(
            &["interfaces", "mean ms", "p99 ms", "body bytes"],
            &[vec![
                opts.interfaces.to_string(),
                format!("{mean:.2}"),
                format!("{p99:.2}"),
                bytes.to_string()
            ]]
        )
    );
    if let Some(path) = &opts.json {
        let row = Row::micro(
            format!("/metrics host metrics, {} interfaces", opts.interfaces),
            mean * 1e6,
            format!(
                "mean of {} renders (p99 {p99:.2} ms, {bytes} bytes), one RTM_GETLINK dump each",
                opts.renders
            ),
        );
        Report { rows: vec![row] }.save(path)?;
    }
    Ok(())
}
