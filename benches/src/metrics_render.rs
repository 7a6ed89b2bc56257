//! Rendering /metrics with many rules installed: each scrape reads every rule's per-CPU
//! counters from the kernel. A scrape every 500 ms with 1,000 rules is normal use.

use std::time::Instant;

use edgeplane::{
    metrics::{self, AgentMetrics},
    udp_forward::stats::UdpCollector,
};
use edgeplane_tests::udp_program::{DEFAULTS, Fixture};

use crate::{
    report::{Report, Row},
    table::markdown,
};

#[derive(clap::Args)]
pub struct Options {
    /// Rules to install.
    #[arg(long, default_value_t = 1000)]
    rules: u16,
    /// Renders to time.
    #[arg(long, default_value_t = 200)]
    renders: usize,
    /// Write the result as a JSON row here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

pub struct Result {
    pub rules: u16,
    pub mean_ms: f64,
    pub p99_ms: f64,
    pub bytes: usize,
}

pub fn measure(opts: &Options) -> Result {
    let mut toml = String::new();
    for i in 0..opts.rules {
        toml += &format!(
            "[[udp.forward]]\nname = \"rule-{i}\"\ningress = \"in0\"\nmatch = {{ dst_port = {} }}\nto = {{ iface = \"eg0\", dst_ip = \"198.18.2.2\" }}\n",
            10_000 + i
        );
    }
    let f = Fixture::new(&toml, DEFAULTS);
    let view = std::sync::Arc::new(std::sync::RwLock::new(f.udp.view()));
    let registry = metrics::registry(
        &AgentMetrics::default(),
        vec![Box::new(UdpCollector {
            stats: Some(f.udp.stats()),
            view,
            userspace: Default::default(),
        })],
    );
    let mut times: Vec<f64> = Vec::with_capacity(opts.renders);
    let mut bytes = 0;
    for _ in 0..opts.renders {
        let start = Instant::now();
        bytes = metrics::render(&registry).len();
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Result {
        rules: opts.rules,
        mean_ms: times.iter().sum::<f64>() / times.len() as f64,
        p99_ms: times[(times.len() * 99 / 100).min(times.len() - 1)],
        bytes,
    }
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    let r = measure(opts);
    println!(
        "/metrics rendering, {} renders\n\n{}",
        opts.renders,
        markdown(
            &["rules", "mean ms", "p99 ms", "body bytes"],
            &[vec![
                r.rules.to_string(),
                format!("{:.2}", r.mean_ms),
                format!("{:.2}", r.p99_ms),
                r.bytes.to_string()
            ]]
        )
    );
    if let Some(path) = &opts.json {
        let row = Row::micro(
            format!("/metrics render, {} kernel rules", r.rules),
            r.mean_ms * 1e6,
            format!(
                "mean of {} renders (p99 {:.2} ms, {} bytes), per-CPU counters read from the maps",
                opts.renders, r.p99_ms, r.bytes
            ),
        );
        Report { rows: vec![row] }.save(path)?;
    }
    Ok(())
}
