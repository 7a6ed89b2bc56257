//! `edgeplane-bench`: measurements that compare in one run. `cargo xtask bench` runs it as root.

mod footprint;
mod forwarder;
mod frame_sender;
mod host_metrics;
mod isolation;
mod loss;
mod merge;
mod metrics_render;
mod prog_run;
mod report;
mod table;
mod traffic;
mod udp;
mod udp_report;

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
    /// UDP forwarding, one forwarding core: XDP, tc, the kernel with nftables DNAT, the userspace
    /// engines and socat on one veth topology.
    Udp(udp::Options),
    /// The agent's resident memory (no rules, 1,000 rules), idle CPU and binary size.
    Footprint(footprint::Options),
    /// Merge the suites' rows (and criterion's estimates) into latest.json and latest.md.
    Report(merge::Options),
}

fn main() -> anyhow::Result<()> {
    let suite = Cli::parse().suite;
    // Only merging the report needs no namespaces and no eBPF.
    if !matches!(suite, Suite::Report(_)) {
        edgeplane_testbed::require_root();
    }
    match suite {
        Suite::ProgRun(o) => prog_run::run(&o),
        Suite::MetricsRender(o) => metrics_render::run(&o),
        Suite::HostMetrics(o) => host_metrics::run(&o),
        Suite::Udp(o) => udp::run(&o),
        Suite::Footprint(o) => footprint::run(&o),
        Suite::Report(o) => merge::run(&o),
    }
}
