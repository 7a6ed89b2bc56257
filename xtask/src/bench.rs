//! `cargo xtask bench`: every benchmark in one run, compared side by side, reported as
//! target/bench/latest.md (printed at the end) and target/bench/latest.json.
//!
//! Suites, in order: criterion's userspace micro benchmarks; BPF_PROG_TEST_RUN ns/packet of
//! the eBPF programs; /metrics rendering with 1,000 kernel rules and with the host metrics of
//! 256 interfaces; UDP forwarding with XDP, tc, both userspace engines and socat on one veth
//! topology; CAN routing inside qemu (TCG).

use std::{fs, path::Path, process::Command, time::Instant};

use anyhow::Context as _;

use crate::{
    setup,
    toolchain::{require_root, run_checked, step, workspace_root},
    vm,
};

/// The kernel the CAN suite boots: the newest supported one (one VM keeps the run short).
const CAN_KERNEL: &str = "6.1";
/// Marks a result row on the VM's console (see tests/can_bench.rs).
const ROW_MARK: &str = "EDGEPLANE-BENCH ";

#[derive(clap::Args)]
pub struct Options {
    /// Skip the CAN suite (qemu with software emulation, the slowest part).
    #[arg(long)]
    no_can: bool,
    /// Seconds of saturation per UDP engine.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    require_root("the benchmarks create network namespaces and load eBPF programs")?;
    setup::run(&setup::Options::default())?;
    let started = Instant::now();
    let root = workspace_root();
    let out = root.join("target/bench");
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let bench_bin = root.join("target/release/edgeplane-bench");
    let bench = |args: &[&str]| -> anyhow::Result<()> {
        run_checked(
            Command::new(&bench_bin)
                .args(args)
                .env("EDGEPLANE_BIN", root.join("target/release/edgeplane")),
        )
    };
    let path = |name: &str| out.join(name).to_string_lossy().into_owned();

    step("building the agent and the benchmarks (release)");
    run_checked(crate::toolchain::cargo().current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "edgeplane",
        "-p",
        "edgeplane-benches",
    ]))?;
    step("criterion: tunnel codec, userspace rule lookup, /metrics with 1,000 userspace rules");
    run_checked(crate::toolchain::cargo().current_dir(&root).args([
        "bench",
        "-p",
        "edgeplane-benches",
        "--bench",
        "userspace",
        "--",
        "--warm-up-time",
        "1",
        "--measurement-time",
        "2",
    ]))?;
    step("BPF_PROG_TEST_RUN: ns per packet of udp_forward (XDP, tc), matched and unmatched");
    bench(&["prog-run", "--json", &path("prog-run.json")])?;
    step("/metrics rendering with 1,000 kernel rules");
    bench(&["metrics-render", "--json", &path("metrics-render.json")])?;
    step("/metrics host metrics of 256 interfaces (one rtnetlink dump)");
    bench(&["host-metrics", "--json", &path("host-metrics.json")])?;
    step("UDP forwarding: xdp, tc, tokio, tokio-uring, socat");
    bench(&[
        "udp",
        "--seconds",
        &opts.seconds.to_string(),
        "--json",
        &path("udp.json"),
    ])?;
    let mut parts = vec![path("udp.json")];
    if opts.no_can {
        step("CAN suite skipped (--no-can)");
    } else {
        step(format_args!(
            "CAN routing in qemu (kernel {CAN_KERNEL}, TCG): edgeplane can-gw, cangw, edgeplane userspace"
        ));
        match can_suite(&root, &out.join("can.json")) {
            Ok(()) => parts.push(path("can.json")),
            Err(e) => eprintln!("[bench] the CAN suite failed, reporting without it: {e:#}"),
        }
    }
    parts.extend([
        path("prog-run.json"),
        path("metrics-render.json"),
        path("host-metrics.json"),
    ]);
    step(format_args!(
        "report: {} and {} ({:.0} s in all)",
        out.join("latest.md").display(),
        out.join("latest.json").display(),
        started.elapsed().as_secs_f64()
    ));
    let mut args = vec![
        "report".to_owned(),
        "--out".to_owned(),
        out.to_string_lossy().into_owned(),
        "--criterion".to_owned(),
        root.join("target/criterion").to_string_lossy().into_owned(),
    ];
    args.extend(parts);
    run_checked(Command::new(&bench_bin).args(&args))
}

/// Runs tests/can_bench.rs in the VM and collects the rows it printed.
fn can_suite(root: &Path, json: &Path) -> anyhow::Result<()> {
    vm::run_after_setup(&vm::Options::only(
        vec!["can_bench".into()],
        vec![CAN_KERNEL.into()],
    ))?;
    let log = root.join(format!("target/vm-logs/{CAN_KERNEL}.log"));
    let text = fs::read_to_string(&log).with_context(|| format!("reading {}", log.display()))?;
    let rows: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| l.split_once(ROW_MARK).map(|(_, row)| row.trim()))
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("parsing the CAN rows")?;
    anyhow::ensure!(!rows.is_empty(), "no {ROW_MARK}rows in {}", log.display());
    fs::write(json, serde_json::to_string_pretty(&rows)?)
        .with_context(|| format!("writing {}", json.display()))
}
