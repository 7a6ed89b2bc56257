//! `edgeplane-bench`: measurements that compare in one run. `cargo xtask bench` runs it as root.

mod metrics_render;
mod prog_run;
mod report;
mod table;
mod traffic;
mod udp;
mod usage;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "edgeplane benchmarks (root: they create namespaces and load eBPF programs)")]
struct Cli {
    #[command(subcommand)]
    suite: Suite,
}

#[derive(Subcommand)]
enum Suite {
    /// ns per packet of each eBPF program under BPF_PROG_TEST_RUN.
    ProgRun(prog_run::Options),
    /// Time to render /metrics with many rules installed.
    MetricsRender(metrics_render::Options),
    /// UDP forwarding: XDP, tc, the userspace engines and socat on one veth topology.
    Udp(udp::Options),
}

fn main() -> anyhow::Result<()> {
    edgeplane_testbed::require_root();
    match Cli::parse().suite {
        Suite::ProgRun(o) => prog_run::run(&o),
        Suite::MetricsRender(o) => metrics_render::run(&o),
        Suite::Udp(o) => udp::run(&o),
    }
}
