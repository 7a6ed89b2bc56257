//! Boots a kernel with the initramfs in qemu, streams the serial console into a log file, and
//! reads the result lines /init prints.
//!
//! The initramfs is an uncompressed cpio: gzip (-6) of its ~70 MB took 4 s on the host and
//! made the emulated boot 1.5 s slower, while qemu copies the plain archive into guest memory
//! at once.

use std::{
    fs::File,
    io::{BufRead as _, BufReader, Read, Write as _},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::kernels::Kernel;
use crate::build::Arch;

/// What one boot produced.
pub struct Boot {
    /// When /init started, after qemu's start: the kernel booted and unpacked the initramfs.
    pub booted: Option<Duration>,
    /// /init got to the end and powered off.
    pub done: bool,
    /// Killed after the overall timeout.
    pub timed_out: bool,
    /// Set-up commands of /init that failed (mounts, insmod).
    pub setup_failures: Vec<String>,
    pub results: Vec<TestResult>,
    /// From qemu's start to its exit.
    pub wall: Duration,
    /// The last lines qemu wrote on stderr, for when it failed to start at all.
    pub qemu_stderr: String,
}

pub struct TestResult {
    pub test: String,
    /// Which run of `test` this was, from 1 (`--repeat`).
    pub run: u32,
    pub outcome: Outcome,
    pub exit_code: i32,
    pub secs: f64,
    /// libtest's names of the test functions that failed.
    pub failed: Vec<String>,
    /// The test function that was running when the VM died (a crash), if libtest named one.
    pub running_case: Option<String>,
    /// Headlines of kernel trouble (lockups, stalls, oopses, panics) printed during the run.
    pub kernel_trouble: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail,
    /// Over its time limit: /init dumped the stacks and ended the VM.
    Timeout,
    /// The VM ended during the run without a result: a kernel panic (a lockup, an RCU stall
    /// or an oops, which the kernel command line turns into panics) or qemu's own timeout.
    Crash,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Pass => "PASS",
            Self::Fail => "FAIL",
            Self::Timeout => "TIMEOUT",
            Self::Crash => "CRASH",
        })
    }
}

/// How qemu runs the guest's CPUs.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Accel {
    /// Software emulation, one host thread per vCPU (MTTCG).
    Tcg,
    /// Software emulation, every vCPU on one host thread in turn.
    TcgSingle,
    /// Hardware virtualisation (nested KVM hung at boot on the CI hosts).
    Kvm,
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Tcg => "TCG",
            Self::TcgSingle => "TCG, one thread",
            Self::Kvm => "KVM",
        })
    }
}

pub struct Settings<'a> {
    pub initrd: &'a Path,
    /// Appended to [`KERNEL_COMMAND_LINE`] (later arguments win).
    pub kernel_args: &'a [String],
    pub log: &'a Path,
    pub timeout: Duration,
    pub accel: Accel,
    /// qemu's gdb server on this TCP port, to inspect a hung guest (`target remote :PORT`).
    pub gdb_port: Option<u16>,
    /// Echo every console line, not just the progress lines.
    pub verbose: bool,
}

/// A lockup, a stall or an oops ends the VM at once with its trace, instead of a guest that
/// hangs until the harness's timeout:
/// - `panic=-1`: reboot at once on a panic, which `-no-reboot` turns into qemu exiting;
/// - `softlockup_panic`, `softlockup_all_cpu_backtrace`: a CPU stuck in the kernel for 20 s
///   prints every CPU's stack, then panics;
/// - `panic_on_rcu_stall`: an RCU stall (21 s) panics after its report;
/// - `hung_task_panic`: a task in uninterruptible sleep for 120 s panics after its stack;
/// - `oops=panic`: an oops panics instead of leaving a half-dead kernel for the next test;
/// - `loglevel=7`: the stacks are printed on the console, not just the headlines.
const KERNEL_COMMAND_LINE: &str = "panic=-1 loglevel=7 softlockup_panic=1 \
     softlockup_all_cpu_backtrace=1 sysctl.kernel.panic_on_rcu_stall=1 hung_task_panic=1 \
     oops=panic";

pub fn boot(kernel: &Kernel, s: &Settings) -> anyhow::Result<Boot> {
    // The PC's first serial port, or the virt machine's PL011 UART.
    let (qemu, package, console) = match kernel.arch {
        Arch::Amd64 => ("qemu-system-x86_64", "qemu-system-x86", "ttyS0"),
        Arch::Arm64 => ("qemu-system-aarch64", "qemu-system-arm", "ttyAMA0"),
    };
    let mut cmd = Command::new(qemu);
    if kernel.arch == Arch::Arm64 {
        // A Cortex-A72 rather than `max`: TCG emulates pointer authentication slowly.
        cmd.args(["-machine", "virt", "-cpu", "cortex-a72"]);
    }
    match s.accel {
        Accel::Kvm if kernel.arch != Arch::host() => {
            bail!(
                "KVM runs only the build machine's architecture, not {}",
                kernel.arch.debian()
            )
        }
        Accel::Kvm => cmd.args(["-accel", "kvm", "-cpu", "host"]),
        Accel::Tcg => cmd.args(["-accel", "tcg,thread=multi"]),
        Accel::TcgSingle => cmd.args(["-accel", "tcg,thread=single"]),
    };
    if let Some(port) = s.gdb_port {
        cmd.arg("-gdb").arg(format!("tcp:127.0.0.1:{port}"));
    }
    cmd.args([
        "-smp",
        "2",
        "-m",
        "2048",
        "-nographic",
        "-no-reboot",
        "-nic",
        "none",
        // Two real CAN controllers on one emulated bus (qemu's SJA1000 model behind Kvaser
        // PCIcan cards; Debian's kernels drive them with kvaser_pci): can0 and can1 in the
        // guest, for the CAN controller metrics.
        "-object",
        "can-bus,id=canbus0",
        "-device",
        "kvaser_pci,canbus=canbus0",
        "-device",
        "kvaser_pci,canbus=canbus0",
    ])
    .arg("-kernel")
    .arg(&kernel.vmlinuz)
    .arg("-initrd")
    .arg(s.initrd)
    .arg("-append")
    .arg(
        [format!("console={console}").as_str(), KERNEL_COMMAND_LINE]
            .into_iter()
            .chain(s.kernel_args.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(" "),
    )
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = KillOnDrop(
        cmd.spawn()
            .with_context(|| format!("starting {qemu} (Debian package {package})"))?,
    );
    let mut log = File::create(s.log).with_context(|| format!("creating {}", s.log.display()))?;

    let (tx, rx) = mpsc::channel();
    let stdout = child.0.stdout.take().expect("piped");
    let stderr = child.0.stderr.take().expect("piped");
    let readers = [
        forward_lines(stdout, Stream::Console, tx.clone()),
        forward_lines(stderr, Stream::Qemu, tx),
    ];

    let mut boot = Boot {
        booted: None,
        done: false,
        timed_out: false,
        setup_failures: Vec::new(),
        results: Vec::new(),
        wall: Duration::ZERO,
        qemu_stderr: String::new(),
    };
    // The run /init started and has not reported, with what it printed so far.
    let mut running: Option<TestResult> = None;
    // Inside libtest's list of failed test functions.
    let mut in_failures = false;
    let deadline = start + s.timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (stream, line) = match rx.recv_timeout(left) {
            Ok(item) => item,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                boot.timed_out = true;
                progress(kernel, start, "timed out: killing qemu");
                child.0.kill().context("killing qemu")?;
                break;
            }
        };
        writeln!(log, "{line}").with_context(|| format!("writing {}", s.log.display()))?;
        if stream == Stream::Qemu {
            boot.qemu_stderr.push_str(&line);
            boot.qemu_stderr.push('\n');
            progress(kernel, start, &format!("qemu: {line}"));
            continue;
        }
        let parsed = parse(&line);
        if !matches!(parsed, Some(Line::Indented(_))) {
            in_failures = matches!(parsed, Some(Line::FailuresList));
        }
        let show =
            s.verbose || is_progress(&line) || matches!(parsed, Some(Line::KernelTrouble(_)));
        match parsed {
            Some(Line::Booted) => boot.booted = Some(start.elapsed()),
            Some(Line::SetupFailed(what)) => boot.setup_failures.push(what.to_owned()),
            Some(Line::Start { test, run }) => {
                running = Some(TestResult::started(test, run, start.elapsed()));
            }
            Some(Line::Result(mut result)) => {
                if let Some(r) = running.take_if(|r| r.test == result.test && r.run == result.run) {
                    result.failed = r.failed;
                    result.kernel_trouble = r.kernel_trouble;
                }
                boot.results.push(result);
            }
            Some(Line::Done) => boot.done = true,
            Some(Line::CaseStarted(name)) => {
                if let Some(r) = &mut running {
                    r.running_case = Some(name.to_owned());
                }
            }
            Some(Line::FailuresList) => in_failures = true,
            Some(Line::Indented(name)) => {
                if let Some(r) = running.as_mut().filter(|_| in_failures)
                    && !r.failed.iter().any(|f| f == name)
                {
                    r.failed.push(name.to_owned());
                }
            }
            Some(Line::KernelTrouble(headline)) => {
                if let Some(r) = &mut running {
                    r.kernel_trouble.push(headline.to_owned());
                }
            }
            None => {}
        }
        if show {
            progress(kernel, start, &line);
        }
    }
    child.0.wait().context("waiting for qemu")?;
    if let Some(mut r) = running {
        // The VM ended (panic, or killed) in the middle of this run.
        r.outcome = Outcome::Crash;
        r.secs = start.elapsed().as_secs_f64() - r.secs;
        boot.results.push(r);
    }
    for r in readers {
        // A reader ends when its pipe closes, which qemu's exit (or kill) does.
        let _ = r.join();
    }
    boot.wall = start.elapsed();
    Ok(boot)
}

/// Ends qemu when the harness fails half-way (say, the log can't be written): a VM left
/// running would hold two cores.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // After a normal exit both are no-ops.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Stream {
    Console,
    Qemu,
}

/// Sends each line of `from` to `tx`, without terminal escape sequences (the firmware clears
/// the screen); serial output is not guaranteed UTF-8 and ends lines with \r\n.
fn forward_lines(
    from: impl Read + Send + 'static,
    stream: Stream,
    tx: mpsc::Sender<(Stream, String)>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut reader = BufReader::new(from);
        let mut buf = Vec::new();
        while reader.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
            let line = strip_escapes(&String::from_utf8_lossy(&buf))
                .trim_end_matches(['\r', '\n'])
                .to_owned();
            if tx.send((stream, line)).is_err() {
                return;
            }
            buf.clear();
        }
    })
}

/// Removes ANSI escape sequences: CSI (`ESC [ params final`) and two-character ones (`ESC c`).
fn strip_escapes(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\x1b' {
            out.push(c);
            continue;
        }
        if chars.next() == Some('[') {
            // Parameters and intermediates, up to the final byte in @..~.
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        }
    }
    out
}

impl TestResult {
    /// A run /init has started; `secs` holds the time since boot until it ends.
    fn started(test: &str, run: u32, since_boot: Duration) -> Self {
        Self {
            test: test.to_owned(),
            run,
            outcome: Outcome::Crash,
            exit_code: -1,
            secs: since_boot.as_secs_f64(),
            failed: Vec::new(),
            running_case: None,
            kernel_trouble: Vec::new(),
        }
    }
}

enum Line<'a> {
    Booted,
    SetupFailed(&'a str),
    Start {
        test: &'a str,
        run: u32,
    },
    Result(TestResult),
    Done,
    /// libtest's `test name ... ` as a test function starts (with --nocapture its result may
    /// come lines later).
    CaseStarted(&'a str),
    /// libtest's `failures:`, before the names of the test functions that failed.
    FailuresList,
    /// A line of four spaces and one word: in libtest's failures list, a failed test function.
    Indented(&'a str),
    /// A kernel message that says the kernel is in trouble.
    KernelTrouble(&'a str),
}

/// Headlines of the kernel's reports of its own trouble.
const KERNEL_TROUBLE: &[&str] = &[
    "BUG: ",
    "watchdog: BUG: soft lockup",
    "rcu: INFO:",
    "INFO: rcu_",
    "INFO: task ",
    "WARNING: CPU:",
    "general protection fault",
    "Oops:",
    "Kernel panic",
];

/// The message of a kernel console line (`[   12.345678] message`), None for other lines.
fn kernel_message(line: &str) -> Option<&str> {
    let rest = line.trim_start().strip_prefix('[')?;
    let (stamp, message) = rest.split_once(']')?;
    let stamp = stamp.trim();
    (!stamp.is_empty() && stamp.chars().all(|c| c.is_ascii_digit() || c == '.'))
        .then(|| message.trim_start())
}

/// Recognises /init's markers anywhere in a line: a kernel message may have been printed on
/// the console just before one without a newline in between.
fn parse(line: &str) -> Option<Line<'_>> {
    if let Some(at) = line.find("EDGEPLANE-VM") {
        let marker = &line[at..];
        if let Some(rest) = marker.strip_prefix("EDGEPLANE-VM: ") {
            return parse_result(rest).map(Line::Result);
        }
        if marker.starts_with("EDGEPLANE-VM-BOOTED") {
            return Some(Line::Booted);
        }
        if marker.starts_with("EDGEPLANE-VM-DONE") {
            return Some(Line::Done);
        }
        if let Some(rest) = marker.strip_prefix("EDGEPLANE-VM-SETUP: FAIL ") {
            return Some(Line::SetupFailed(rest));
        }
        if let Some(rest) = marker.strip_prefix("EDGEPLANE-VM-START: ") {
            let (test, run) = rest.trim().split_once(' ')?;
            return Some(Line::Start {
                test,
                run: run.parse().ok()?,
            });
        }
        return None;
    }
    if let Some(message) = kernel_message(line) {
        return KERNEL_TROUBLE
            .iter()
            .any(|t| message.contains(t))
            .then_some(Line::KernelTrouble(message));
    }
    if line == "failures:" {
        return Some(Line::FailuresList);
    }
    if let Some(name) = line.strip_prefix("    ")
        && !name.is_empty()
        && !name.contains(char::is_whitespace)
    {
        return Some(Line::Indented(name));
    }
    // "test name ... ", then whatever the test prints on stderr (--nocapture), then its result.
    let (name, rest) = line.strip_prefix("test ")?.split_once(" ... ")?;
    match rest.trim() {
        "ok" | "ignored" => None,
        _ => Some(Line::CaseStarted(name)),
    }
}

/// `<test> <run> PASS|FAIL|TIMEOUT <exit code> <seconds>`
fn parse_result(rest: &str) -> Option<TestResult> {
    let mut fields = rest.split_whitespace();
    let test = fields.next()?.to_owned();
    let run = fields.next()?.parse().ok()?;
    let outcome = match fields.next()? {
        "PASS" => Outcome::Pass,
        "FAIL" => Outcome::Fail,
        "TIMEOUT" => Outcome::Timeout,
        _ => return None,
    };
    let exit_code = fields.next()?.parse().ok()?;
    let secs = fields.next()?.parse().ok()?;
    Some(TestResult {
        test,
        run,
        outcome,
        exit_code,
        secs,
        failed: Vec::new(),
        running_case: None,
        kernel_trouble: Vec::new(),
    })
}

/// Lines worth showing while the VM runs besides the kernel's trouble: our markers, libtest's
/// per-test lines and summary.
fn is_progress(line: &str) -> bool {
    line.contains("EDGEPLANE-VM")
        || line.starts_with("test ")
        || line.starts_with("running ")
        || line.starts_with("test result:")
}

fn progress(kernel: &Kernel, start: Instant, line: &str) {
    let secs = start.elapsed().as_secs();
    eprintln!("   [{} {:>3}s] {line}", kernel.series, secs);
}
