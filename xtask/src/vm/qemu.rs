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

use anyhow::Context as _;

use super::kernels::Kernel;

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
    pub outcome: Outcome,
    pub exit_code: i32,
    pub secs: f64,
    /// libtest's names of the test functions that failed.
    pub failed: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail,
    Timeout,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Pass => "PASS",
            Self::Fail => "FAIL",
            Self::Timeout => "TIMEOUT",
        })
    }
}

pub struct Settings<'a> {
    pub initrd: &'a Path,
    pub log: &'a Path,
    pub timeout: Duration,
    /// Hardware virtualisation instead of TCG (nested KVM hung at boot on the CI hosts).
    pub kvm: bool,
    /// Echo every console line, not just the progress lines.
    pub verbose: bool,
}

pub fn boot(kernel: &Kernel, s: &Settings) -> anyhow::Result<Boot> {
    let mut cmd = Command::new("qemu-system-x86_64");
    if s.kvm {
        cmd.args(["-accel", "kvm", "-cpu", "host"]);
    } else {
        cmd.args(["-accel", "tcg,thread=multi"]);
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
    // panic=-1: reboot at once on a panic, which -no-reboot turns into qemu exiting.
    .args(["-append", "console=ttyS0 panic=-1 quiet"])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = KillOnDrop(
        cmd.spawn()
            .context("starting qemu-system-x86_64 (Debian package qemu-system-x86)")?,
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
    let mut running: Option<String> = None;
    let mut failed = Vec::new();
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
        match parse(&line) {
            Some(Line::Booted) => boot.booted = Some(start.elapsed()),
            Some(Line::SetupFailed(what)) => boot.setup_failures.push(what.to_owned()),
            Some(Line::Start(test)) => {
                running = Some(test.to_owned());
                failed.clear();
            }
            Some(Line::Result(mut result)) => {
                if running.as_deref() == Some(result.test.as_str()) {
                    result.failed = std::mem::take(&mut failed);
                }
                running = None;
                boot.results.push(result);
            }
            Some(Line::Done) => boot.done = true,
            Some(Line::CaseFailed(name)) => failed.push(name.to_owned()),
            None => {}
        }
        if s.verbose || is_progress(&line) {
            progress(kernel, start, &line);
        }
    }
    child.0.wait().context("waiting for qemu")?;
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

enum Line<'a> {
    Booted,
    SetupFailed(&'a str),
    Start(&'a str),
    Result(TestResult),
    Done,
    /// libtest's `test name ... FAILED`.
    CaseFailed(&'a str),
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
            return Some(Line::Start(rest.trim()));
        }
        return None;
    }
    let name = line.strip_prefix("test ")?.strip_suffix(" ... FAILED")?;
    Some(Line::CaseFailed(name))
}

/// `<test> PASS|FAIL|TIMEOUT <exit code> <seconds>`
fn parse_result(rest: &str) -> Option<TestResult> {
    let mut fields = rest.split_whitespace();
    let test = fields.next()?.to_owned();
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
        outcome,
        exit_code,
        secs,
        failed: Vec::new(),
    })
}

/// Lines worth showing while the VM runs: our markers, libtest's per-test lines and summary,
/// and a kernel's dying words.
fn is_progress(line: &str) -> bool {
    line.contains("EDGEPLANE-VM")
        || line.starts_with("test ")
        || line.starts_with("running ")
        || line.starts_with("test result:")
        || line.contains("Kernel panic")
}

fn progress(kernel: &Kernel, start: Instant, line: &str) {
    let secs = start.elapsed().as_secs();
    eprintln!("   [{} {:>3}s] {line}", kernel.series, secs);
}
