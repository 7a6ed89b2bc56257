//! `edgeplane-bench`: measurements that compare in one run. `cargo xtask bench` runs it as root.

mod host_metrics;
mod metrics_render;
mod prog_run;
mod table;

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
    /// Time to render the host metrics of many interfaces.
    HostMetrics(host_metrics::Options),
}

fn main() -> anyhow::Result<()> {
    edgeplane_testbed::require_root();
    match Cli::parse().suite {
        Suite::ProgRun(o) => prog_run::run(&o),
        Suite::MetricsRender(o) => metrics_render::run(&o),
        Suite::HostMetrics(o) => host_metrics::run(&o),
    }
}
