//! `cargo xtask vm-test`: the kernel tests inside qemu, on each kernel the product supports.
//!
//! The host's kernel may be newer than what users run and may lack features (CAN): each VM
//! boots one of Debian's kernels with an initramfs holding the agent, the test executables and
//! the tools they call, runs the tests as root, and reports one result line per executable.

mod cpio;
mod initramfs;
mod kernels;
mod qemu;
mod userland;

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{
    build::Arch,
    setup,
    toolchain::{output, step, workspace_root},
};

/// An integration-test executable of the edgeplane-tests package that runs in the VMs.
pub struct VmTest {
    /// Its `[[test]]` name.
    pub name: &'static str,
    /// The oldest kernel series it can run on and why, when that is newer than the oldest
    /// kernel the product supports; on older ones it is skipped.
    pub needs: Option<(&'static str, &'static str)>,
}

/// The tests that run in the VMs by default: the ones that need a real kernel.
pub const VM_TESTS: &[VmTest] = &[
    VmTest {
        name: "udp_forward_prog",
        needs: Some((
            "5.15",
            "it runs the XDP program by BPF_PROG_TEST_RUN with an xdp_md context \
             (ingress_ifindex), which the kernel accepts from 5.15 (EINVAL before)",
        )),
    },
    VmTest {
        name: "udp_forward_e2e",
        needs: None,
    },
    VmTest {
        name: "can_route",
        needs: None,
    },
    VmTest {
        name: "can_tunnel",
        needs: None,
    },
    VmTest {
        name: "interface_metrics",
        needs: None,
    },
    VmTest {
        name: "can_controller",
        needs: None,
    },
    VmTest {
        name: "can_userspace",
        needs: None,
    },
    VmTest {
        name: "latency",
        needs: None,
    },
    VmTest {
        name: "can_latency",
        needs: None,
    },
    VmTest {
        name: "least_privilege",
        needs: None,
    },
];

const DEFAULT_TIMEOUT_SECS: u64 = 20 * 60;
const DEFAULT_TEST_TIMEOUT_SECS: u64 = 10 * 60;
/// How much longer the default time limits are when qemu translates another architecture.
const FOREIGN_CPU_SLOWDOWN: u64 = 3;

#[derive(clap::Args)]
pub struct Options {
    /// Kernel series to boot (repeatable). All of them by default.
    #[arg(
        long = "kernel",
        value_name = "SERIES",
        value_parser = clap::builder::PossibleValuesParser::new(kernels::SERIES.iter().map(|s| s.name)),
    )]
    kernels: Vec<String>,
    /// Test executable to run (repeatable), e.g. udp_forward_e2e. By default every one in
    /// `vm::VM_TESTS`.
    #[arg(long = "test", value_name = "NAME")]
    tests: Vec<String>,
    /// Only run test functions whose name contains this (libtest's filter).
    filter: Option<String>,
    /// Look for newer kernel packages instead of using the cached ones.
    #[arg(long)]
    refresh_kernels: bool,
    /// Seconds one kernel may take from boot to power-off before qemu is killed [default:
    /// 1200, times FOREIGN_CPU_SLOWDOWN on another architecture].
    #[arg(long)]
    timeout: Option<u64>,
    /// Seconds one run of a test executable may take inside the VM; a run over it dumps the
    /// kernel's stacks and ends the VM, and the remaining runs go on in a new one [default:
    /// 600, times FOREIGN_CPU_SLOWDOWN on another architecture].
    #[arg(long)]
    test_timeout: Option<u64>,
    /// Run the chosen tests this many times on each kernel (all of them, then all again), and
    /// report every run. A run that ends the VM (a panic, a lockup) is reported and the
    /// remaining runs go on in a new VM.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    repeat: u32,
    /// How qemu runs the guest's CPUs (`EDGEPLANE_VM_KVM=1` means `kvm`).
    #[arg(long, value_enum, default_value_t = qemu::Accel::Tcg)]
    accel: qemu::Accel,
    /// Start qemu's gdb server on this port (loopback), to inspect a hung guest with
    /// `gdb -ex 'target remote :PORT'`; pair it with `--kernel-arg softlockup_panic=0
    /// --kernel-arg sysctl.kernel.panic_on_rcu_stall=0` to keep a stuck guest alive.
    #[arg(long, value_name = "PORT")]
    gdb: Option<u16>,
    /// Extra kernel command-line argument (repeatable), after the harness's own, e.g.
    /// `--kernel-arg watchdog_thresh=5` for earlier lockup reports with every CPU's stack.
    #[arg(long = "kernel-arg", value_name = "ARG")]
    kernel_args: Vec<String>,
    /// Show the whole serial console, not only test progress (it is always in the log).
    #[arg(long, short)]
    verbose: bool,
    /// Architecture of the kernels, the agent and the tests: arm64 cross-builds them and boots
    /// Debian's arm64 kernels under qemu-system-aarch64 (the `virt` machine).
    #[arg(long, value_enum, default_value_t = Arch::host())]
    arch: Arch,
}

impl Options {
    /// Every test on every kernel, as `cargo xtask test` runs them.
    pub fn all(filter: Option<String>) -> Self {
        Self {
            kernels: Vec::new(),
            tests: Vec::new(),
            filter,
            refresh_kernels: false,
            timeout: None,
            test_timeout: None,
            repeat: 1,
            accel: qemu::Accel::Tcg,
            gdb: None,
            kernel_args: Vec::new(),
            verbose: false,
            arch: Arch::host(),
        }
    }
}

impl Options {
    /// The time limits given, or the defaults for the architecture: an emulated foreign CPU
    /// is several times slower (udp_forward_e2e took over 10 minutes on arm64 6.1 under TCG
    /// on a loaded host, 588 s on 5.10).
    fn limits(&self) -> (u64, u64) {
        let scale = if self.arch == Arch::host() {
            1
        } else {
            FOREIGN_CPU_SLOWDOWN
        };
        (
            self.timeout.unwrap_or(DEFAULT_TIMEOUT_SECS * scale),
            self.test_timeout
                .unwrap_or(DEFAULT_TEST_TIMEOUT_SECS * scale),
        )
    }

    /// The same runs on `arch`'s kernels, with `arch`'s build.
    pub fn on(self, arch: Arch) -> Self {
        Self { arch, ..self }
    }

    /// `tests` on `kernels`, with the default time limits.
    pub fn only(tests: Vec<String>, kernels: Vec<String>) -> Self {
        Self {
            kernels,
            tests,
            ..Self::all(None)
        }
    }
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    setup::run(&setup::Options::default())?;
    run_after_setup(opts)
}

/// [`run`] on a machine `cargo xtask setup` has prepared.
pub fn run_after_setup(opts: &Options) -> anyhow::Result<()> {
    let series = select_series(&opts.kernels);
    let wanted: Vec<&str> = if opts.tests.is_empty() {
        VM_TESTS.iter().map(|t| t.name).collect()
    } else {
        opts.tests.iter().map(String::as_str).collect()
    };

    step(format_args!(
        "building the agent and the test executables (release, {})",
        opts.arch.rust_target()
    ));
    let (agent, tests) = build(&wanted, opts.arch)?;

    let target = target_dir()?;
    let cache = target.join("vm-cache");
    let logs = target.join("vm-logs");
    fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let accel = if std::env::var_os("EDGEPLANE_VM_KVM").is_some_and(|v| v == "1") {
        qemu::Accel::Kvm
    } else {
        opts.accel
    };

    let userland = userland::Userland::for_arch(opts.arch, &cache, opts.refresh_kernels)?;
    let mut reports = Vec::new();
    for s in series {
        let kernel = kernels::fetch(s, opts.arch, &cache, opts.refresh_kernels)?;
        // amd64 keeps the file names it had before there was another architecture.
        let label = match opts.arch {
            Arch::Amd64 => s.name.to_owned(),
            other => format!("{}-{}", s.name, other.debian()),
        };
        let (runnable, skipped): (Vec<_>, Vec<_>) = tests
            .iter()
            .cloned()
            .partition(|(name, _)| too_old_for(s.name, name).is_none());
        let skipped: Vec<String> = skipped.into_iter().map(|(name, _)| name).collect();
        for name in &skipped {
            let (min, why) = too_old_for(s.name, name).expect("partitioned on it");
            step(format_args!(
                "kernel {}: skipping {name}, which needs {min}+: {why}",
                s.name
            ));
        }
        let jobs: Vec<(String, u32)> = (1..=opts.repeat)
            .flat_map(|run| runnable.iter().map(move |(name, _)| (name.clone(), run)))
            .collect();
        let mut boots = Vec::new();
        let mut left = jobs.as_slice();
        // Each boot does at least one run, or its trouble is reported and the kernel left.
        while !left.is_empty() {
            let number = boots.len() + 1;
            let payload = initramfs::Payload {
                userland: &userland,
                agent: &agent,
                tests: &runnable,
                jobs: left,
                filter: opts.filter.as_deref(),
                test_timeout_secs: opts.limits().1,
                // Under TCG an arm64 guest took 30 s to load the programs (verifier and JIT; a loaded
                // 2-core x86_64 host, 6.1): the time the tests allow for it grows to match.
                agent_ready_secs: if opts.arch == Arch::host() { 20 } else { 120 },
                foreign_cpu: opts.arch != Arch::host(),
                tcg: accel != qemu::Accel::Kvm,
            };
            let initrd = cache.join(format!("initramfs-{label}.cpio"));
            let size = initramfs::build(&kernel, &payload, &initrd)?;
            let log = logs.join(if number == 1 {
                format!("{label}.log")
            } else {
                format!("{label}-boot{number}.log")
            });
            step(format_args!(
                "kernel {}: booting {} ({} MB initramfs, {}, {} run(s) to do), console log {}",
                s.name,
                kernel.release,
                size >> 20,
                accel,
                left.len(),
                log.display()
            ));
            let boot = qemu::boot(
                &kernel,
                &qemu::Settings {
                    initrd: &initrd,
                    kernel_args: &opts.kernel_args,
                    log: &log,
                    timeout: Duration::from_secs(opts.limits().0),
                    accel,
                    gdb_port: opts.gdb,
                    verbose: opts.verbose,
                },
            )?;
            step(format_args!(
                "kernel {}: VM finished in {} after {} run(s)",
                s.name,
                minutes(boot.wall),
                boot.results.len()
            ));
            let done = boot.results.len().min(left.len());
            boots.push(BootReport { log, boot });
            if done == 0 {
                break;
            }
            left = &left[done..];
        }
        reports.push(Report {
            kernel,
            boots,
            skipped,
        });
    }
    summarize(&reports, &wanted, opts.repeat)
}

/// The minimum series and the reason, when `test` can't run on `series`.
fn too_old_for(series: &str, test: &str) -> Option<(&'static str, &'static str)> {
    let (min, why) = VM_TESTS.iter().find(|t| t.name == test)?.needs?;
    (version(series) < version(min)).then_some((min, why))
}

/// "5.10" -> [5, 10], so that 5.10 < 5.15 < 6.1.
fn version(series: &str) -> Vec<u32> {
    series.split('.').filter_map(|p| p.parse().ok()).collect()
}

/// The series named on the command line (clap checked the names), or all of them.
fn select_series(names: &[String]) -> Vec<&'static kernels::Series> {
    kernels::SERIES
        .iter()
        .filter(|s| names.is_empty() || names.iter().any(|n| n == s.name))
        .collect()
}

/// Builds the agent and the integration tests in one `cargo build --release --all-targets`,
/// the command `cargo xtask test` builds the host tests with: the same packages and targets
/// resolve the same dependency features, so nothing is built twice (building the agent alone
/// resolved others and rebuilt rustls, tonic and the agent, minutes each time). Returns the
/// agent's path and the executables of `wanted`, by name.
fn build(wanted: &[&str], arch: Arch) -> anyhow::Result<(PathBuf, Vec<(String, PathBuf)>)> {
    // Named one by one: the CAN tests have `test = false` (the host can't run them), and
    // cargo leaves those out of `--all-targets` even when they are also named with `--test`.
    let mut args = vec!["build", "--release", "--bin", "edgeplane"];
    if arch != Arch::host() {
        args.extend(["--target", arch.rust_target()]);
    }
    for name in wanted {
        args.extend(["--test", name]);
    }
    let artifacts = cargo_artifacts(&args)?;
    let agent = artifacts
        .get(&("bin", "edgeplane".to_owned()))
        .cloned()
        .context("cargo built no edgeplane binary")?;
    let tests = wanted
        .iter()
        .map(|name| match artifacts.get(&("test", (*name).to_owned())) {
            Some(path) => Ok((name.to_string(), path.clone())),
            None => {
                let known: Vec<_> = artifacts
                    .keys()
                    .filter(|(kind, _)| *kind == "test")
                    .map(|(_, n)| n.as_str())
                    .collect();
                bail!(
                    "no test executable {name} in edgeplane-tests: choose from {}",
                    known.join(", ")
                )
            }
        })
        .collect::<anyhow::Result<_>>()?;
    Ok((agent, tests))
}

/// `cargo build --release --all-targets`: what `cargo xtask test` builds for the host (the
/// same workspace selection as the VM's build, so one does not rebuild what the other built).
pub fn release_build_args() -> Vec<&'static str> {
    vec!["build", "--release", "--all-targets"]
}

/// Runs cargo with JSON messages and returns the executables it built, by target kind
/// (`bin`, `test`) and name.
fn cargo_artifacts(args: &[&str]) -> anyhow::Result<BTreeMap<(&'static str, String), PathBuf>> {
    let mut cmd = crate::toolchain::cargo();
    cmd.current_dir(workspace_root())
        .args(args)
        // Diagnostics still reach the terminal rendered; only the artifacts come as JSON.
        .arg("--message-format=json-render-diagnostics")
        .stderr(Stdio::inherit());
    let out = output(&mut cmd)?;
    let mut found = BTreeMap::new();
    for line in out.lines() {
        let msg: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("cargo printed {line:?}"))?;
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        // `--all-targets` also builds each binary's unit tests: a libtest harness under the
        // binary's name, which must not stand in for the binary.
        let target = &msg["target"];
        if msg["profile"]["test"] == true && target["kind"] != serde_json::json!(["test"]) {
            continue;
        }
        let Some(kind) = ["bin", "test"].into_iter().find(|kind| {
            target["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == kind))
        }) else {
            continue;
        };
        if let (Some(name), Some(exe)) = (target["name"].as_str(), msg["executable"].as_str()) {
            found.insert((kind, name.to_owned()), PathBuf::from(exe));
        }
    }
    Ok(found)
}

fn target_dir() -> anyhow::Result<PathBuf> {
    let out = output(
        crate::toolchain::cargo()
            .current_dir(workspace_root())
            .args(["metadata", "--no-deps", "--format-version", "1"]),
    )?;
    let meta: serde_json::Value = serde_json::from_str(&out).context("parsing cargo metadata")?;
    meta["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .context("cargo metadata has no target_directory")
}

struct Report {
    kernel: kernels::Kernel,
    /// One VM per boot: the first, and one more after each run that ended its VM.
    boots: Vec<BootReport>,
    /// Tests this kernel is too old for.
    skipped: Vec<String>,
}

struct BootReport {
    log: PathBuf,
    boot: qemu::Boot,
}

impl Report {
    /// Every run of `test`, in order, with the log of the VM it ran in.
    fn runs<'a>(&'a self, test: &'a str) -> impl Iterator<Item = (&'a qemu::TestResult, &'a Path)> {
        self.boots.iter().flat_map(move |b| {
            b.boot
                .results
                .iter()
                .filter(move |r| r.test == test)
                .map(|r| (r, b.log.as_path()))
        })
    }
}

/// Prints one row per kernel and test (with `--repeat`, the passes out of the runs, the mean
/// time and every run), then every problem; fails if there was one.
fn summarize(reports: &[Report], wanted: &[&str], repeat: u32) -> anyhow::Result<()> {
    let mut problems = Vec::new();
    let row = |k: &kernels::Kernel, what: &str, result: &str, time: Option<f64>| {
        let time = time.map_or_else(|| "-".to_owned(), |t| format!("{t:.1} s"));
        eprintln!(
            "{:<7} {:<17} {:<22} {:<12} {:>9}",
            k.series, k.release, what, result, time
        );
    };
    let mut run_lines = Vec::new();
    eprintln!();
    eprintln!(
        "{:<7} {:<17} {:<22} {:<12} {:>9}",
        "kernel", "release", "test", "result", "time"
    );
    for r in reports {
        let k = &r.kernel;
        for (i, b) in r.boots.iter().enumerate() {
            let what = if r.boots.len() == 1 {
                "(boot to /init)".to_owned()
            } else {
                format!("(boot {} to /init)", i + 1)
            };
            let booted = b.boot.booted.map(|d| d.as_secs_f64());
            row(
                k,
                &what,
                if booted.is_some() { "ok" } else { "FAIL" },
                booted,
            );
        }
        for name in wanted {
            if r.skipped.iter().any(|s| s == name) {
                row(k, name, "SKIP", None);
                continue;
            }
            let runs: Vec<_> = r.runs(name).collect();
            if runs.is_empty() {
                row(k, name, "MISSING", None);
                continue;
            }
            let passed = runs
                .iter()
                .filter(|(t, _)| t.outcome == qemu::Outcome::Pass)
                .count();
            let mean = runs.iter().map(|(t, _)| t.secs).sum::<f64>() / runs.len() as f64;
            let result = match (repeat, runs.as_slice()) {
                (1, [(only, _)]) => only.outcome.to_string(),
                _ => {
                    let word = if passed == runs.len() { "PASS" } else { "FAIL" };
                    format!("{word} {passed}/{repeat}")
                }
            };
            row(k, name, &result, Some(mean));
            if repeat > 1 {
                let each: Vec<String> = runs
                    .iter()
                    .map(|(t, _)| format!("{} {} {:.0}s", t.run, t.outcome, t.secs))
                    .collect();
                run_lines.push(format!("{} {name}: {}", k.series, each.join(", ")));
            }
            for (t, log) in runs
                .iter()
                .filter(|(t, _)| t.outcome != qemu::Outcome::Pass)
            {
                problems.push(run_problem(k, t, log));
            }
        }
        let wall: Duration = r.boots.iter().map(|b| b.boot.wall).sum();
        let finished = r.boots.last().is_some_and(|b| b.boot.done);
        row(
            k,
            if r.boots.len() == 1 {
                "(whole VM)"
            } else {
                "(all VMs)"
            },
            if finished { "ok" } else { "FAIL" },
            Some(wall.as_secs_f64()),
        );
        for b in &r.boots {
            problems.extend(vm_problems(k, b));
        }
        if r.boots.last().is_some_and(|b| b.boot.booted.is_some()) {
            let missing: Vec<&str> = wanted
                .iter()
                .copied()
                .filter(|n| r.runs(n).next().is_none() && !r.skipped.iter().any(|s| s == n))
                .collect();
            if !missing.is_empty() {
                problems.push(format!(
                    "{}: no result for {}",
                    k.series,
                    missing.join(", ")
                ));
            }
        }
    }
    if !run_lines.is_empty() {
        eprintln!();
        eprintln!("every run (number, result, seconds):");
        for l in &run_lines {
            eprintln!("  {l}");
        }
    }
    eprintln!();
    if problems.is_empty() {
        step("VM tests passed on every kernel");
        return Ok(());
    }
    for p in &problems {
        eprintln!("  - {p}");
    }
    bail!("{} problem(s) in the VM tests", problems.len())
}

/// One run that did not pass: which, how, and where its console is.
fn run_problem(k: &kernels::Kernel, t: &qemu::TestResult, log: &Path) -> String {
    let mut p = format!(
        "{}: {} run {} {} (exit code {}){}",
        k.series,
        t.test,
        t.run,
        t.outcome,
        t.exit_code,
        failed_cases(&t.failed)
    );
    if let Some(case) = t
        .running_case
        .as_ref()
        .filter(|_| t.outcome != qemu::Outcome::Fail)
    {
        p.push_str(&format!(", in {case}"));
    }
    if let Some(first) = t.kernel_trouble.first() {
        p.push_str(&format!("; the kernel said: {first}"));
    }
    p.push_str(&format!(" (see {})", log.display()));
    p
}

/// What went wrong with a VM as a whole: no boot, set-up failures, qemu's timeout.
fn vm_problems(k: &kernels::Kernel, b: &BootReport) -> Vec<String> {
    let (b, log) = (&b.boot, b.log.display());
    let mut problems = Vec::new();
    if b.booted.is_none() {
        let qemu = if b.qemu_stderr.is_empty() {
            String::new()
        } else {
            format!("; qemu said:\n{}", b.qemu_stderr.trim_end())
        };
        problems.push(format!(
            "{}: {} did not start /init (see {log}){qemu}",
            k.series, k.package
        ));
    }
    for f in &b.setup_failures {
        problems.push(format!(
            "{}: set-up command failed: {f} (see {log})",
            k.series
        ));
    }
    if b.timed_out {
        problems.push(format!(
            "{}: killed after {}; the console up to then is in {log}",
            k.series,
            minutes(b.wall)
        ));
    } else if b.booted.is_some()
        && !b.done
        && !b
            .results
            .last()
            .is_some_and(|r| matches!(r.outcome, qemu::Outcome::Crash | qemu::Outcome::Timeout))
    {
        problems.push(format!(
            "{}: /init stopped before the end (see {log})",
            k.series
        ));
    }
    problems
}

fn failed_cases(failed: &[String]) -> String {
    if failed.is_empty() {
        String::new()
    } else {
        format!(": {}", failed.join(", "))
    }
}

fn minutes(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}m{:02}s", s / 60, s % 60)
}
