//! `cargo xtask bench`: every benchmark in one run, compared side by side, reported as
//! target/bench/latest.md (printed at the end) and target/bench/latest.json.
//!
//! Suites, in order: criterion's userspace micro benchmarks; BPF_PROG_TEST_RUN ns/packet of
//! the eBPF programs; /metrics rendering with 1,000 kernel rules and with the host metrics of
//! 256 interfaces; UDP forwarding with XDP, tc, the kernel's forwarding with nftables DNAT,
//! both userspace engines and socat on one veth topology, the forwarder on a CPU of its own;
//! the agent's footprint (RSS idle and with 1,000 rules, idle CPU, the shipped binary's size
//! from `cargo xtask dist`); CAN routing inside qemu (TCG).

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
    /// Run only these suites (comma-separated: criterion, prog-run, metrics-render,
    /// host-metrics, udp, footprint, can); the report holds what ran.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
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
    let wanted = |suite: &str| opts.only.is_empty() || opts.only.iter().any(|s| s == suite);
    const SUITES: [&str; 7] = [
        "criterion",
        "prog-run",
        "metrics-render",
        "host-metrics",
        "udp",
        "footprint",
        "can",
    ];
    if let Some(unknown) = opts.only.iter().find(|s| !SUITES.contains(&s.as_str())) {
        anyhow::bail!("unknown suite {unknown}: choose from {}", SUITES.join(", "));
    }
    let mut parts = Vec::new();

    step("building the agent and the benchmarks (release)");
    run_checked(crate::toolchain::cargo().current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "edgeplane",
        "-p",
        "edgeplane-benches",
    ]))?;
    if wanted("criterion") {
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
    }
    // Run before the UDP suite as always; reported after it.
    let mut micro = Vec::new();
    for (suite, what, file) in [
        (
            "prog-run",
            "BPF_PROG_TEST_RUN: ns per packet of udp_forward (XDP, tc), matched and unmatched",
            "prog-run.json",
        ),
        (
            "metrics-render",
            "/metrics rendering with 1,000 kernel rules",
            "metrics-render.json",
        ),
        (
            "host-metrics",
            "/metrics host metrics of 256 interfaces (one rtnetlink dump)",
            "host-metrics.json",
        ),
    ] {
        if wanted(suite) {
            step(what);
            bench(&[suite, "--json", &path(file)])?;
            micro.push(path(file));
        }
    }
    if wanted("udp") {
        step(
            "UDP forwarding, one forwarding CPU: xdp, tc, linux-nat (nftables DNAT), tokio, tokio-uring, socat",
        );
        bench(&[
            "udp",
            "--seconds",
            &opts.seconds.to_string(),
            "--json",
            &path("udp.json"),
        ])?;
        parts.push(path("udp.json"));
    }
    if !wanted("can") {
        step("CAN suite skipped");
    } else if opts.no_can {
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
    if wanted("footprint") {
        let shipped = crate::dist::run(&crate::dist::Options::default())?;
        step(
            "footprint: RSS with no rules (and idle CPU over 20 s), with 1,000 UDP rules; binary size",
        );
        run_checked(
            Command::new(&bench_bin)
                .args(["footprint", "--shipped"])
                .arg(&shipped)
                .args(["--json", &path("footprint.json")])
                .env("EDGEPLANE_BIN", &shipped),
        )?;
        parts.push(path("footprint.json"));
    }
    parts.extend(micro);
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
    ];
    if wanted("criterion") {
        args.push("--criterion".to_owned());
        args.push(root.join("target/criterion").to_string_lossy().into_owned());
    }
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
