//! `cargo xtask fuzz`: the libFuzzer targets in fuzz/ (cargo-fuzz on the pinned nightly), each
//! for a bounded time, with a table of what each did; fails if one crashed.
//!
//! Each target starts from its committed corpus (fuzz/corpus/<target>), copied into
//! target/fuzz/corpus/<target>: the inputs libFuzzer adds collect there across runs, and the
//! committed corpus does not churn. A crash's input is saved in target/fuzz/artifacts/<target>/
//! and the failure names the command that reproduces it; libFuzzer's whole output is in
//! target/fuzz/logs/<target>.log.
//!
//! The targets run without a sanitizer: they exercise safe Rust, where panics, overflows (debug
//! assertions are on) and hangs are the bugs to find, and AddressSanitizer would halve the
//! executions in search of memory errors safe Rust can't have.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::{
    setup,
    toolchain::{self, run_checked, step},
};

/// Each target, with the dictionary in fuzz/dict/ libFuzzer splices into its inputs.
pub const TARGETS: &[(&str, Option<&str>)] = &[
    ("tunnel_codec", None),
    ("config", Some("toml.dict")),
    ("rules_push", Some("toml.dict")),
    ("netlink", None),
    ("registry_record", None),
    ("remote_write_queue", None),
];

/// Where cargo-fuzz puts the target binaries (its default --target).
const TARGET_TRIPLE: &str = "x86_64-unknown-linux-gnu";
/// An input taking longer than this counts as a hang.
const HANG_SECS: u64 = 10;

#[derive(clap::Args)]
pub struct Options {
    /// Targets to run; all of them by default.
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(TARGETS.iter().map(|t| t.0)))]
    targets: Vec<String>,
    /// Seconds each target runs.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    setup::run(&setup::Options::default())?;
    let targets: Vec<&str> = if opts.targets.is_empty() {
        TARGETS.iter().map(|t| t.0).collect()
    } else {
        opts.targets.iter().map(String::as_str).collect()
    };
    run_after_setup(&targets, opts.seconds)
}

/// What one run of a target did, from libFuzzer's last status line and final statistics.
#[derive(Default)]
struct Outcome {
    runs: Option<u64>,
    execs_per_sec: Option<u64>,
    coverage: Option<u64>,
    features: Option<u64>,
    corpus: Option<String>,
    /// The saved input of a crash, hang or out-of-memory.
    artifact: Option<PathBuf>,
    /// Where the target panicked and with what message.
    panic: Option<String>,
}

impl Outcome {
    fn from_log(log: &str) -> Self {
        let mut o = Self::default();
        let mut lines = log.lines();
        while let Some(line) = lines.next() {
            // Status lines: `#4096 NEW cov: 950 ft: 2060 corp: 149/60Kb ... exec/s: 5226 ...`.
            let runs = line
                .strip_prefix('#')
                .and_then(|s| s.split_whitespace().next());
            if let Some(runs) = runs.and_then(|n| n.parse().ok()) {
                let field = |name: &str| {
                    line.split_whitespace()
                        .skip_while(|w| *w != name)
                        .nth(1)
                        .map(str::to_owned)
                };
                let number = |name: &str| field(name).and_then(|v| v.parse().ok());
                o.runs = Some(runs);
                o.coverage = number("cov:").or(o.coverage);
                o.features = number("ft:").or(o.features);
                o.corpus = field("corp:").or(o.corpus.take());
                o.execs_per_sec = number("exec/s:").or(o.execs_per_sec);
            } else if let Some(v) = line.strip_prefix("stat::number_of_executed_units:") {
                o.runs = v.trim().parse().ok().or(o.runs);
            } else if let Some(v) = line.strip_prefix("stat::average_exec_per_sec:") {
                o.execs_per_sec = v.trim().parse().ok().or(o.execs_per_sec);
            } else if let Some((_, path)) = line.split_once("Test unit written to ") {
                o.artifact = Some(PathBuf::from(path.trim()));
            } else if line.contains(" panicked at ") && o.panic.is_none() {
                let message = lines.next().unwrap_or_default();
                o.panic = Some(format!("{}\n    {message}", line.trim()));
            }
        }
        o
    }

    /// `ok`, or the kind of input libFuzzer saved: crash, timeout (a hang), oom, leak.
    fn result(&self) -> String {
        match &self.artifact {
            None => "ok".into(),
            Some(a) => a
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.split('-').next())
                .unwrap_or("crash")
                .to_uppercase(),
        }
    }
}

/// Builds and runs `targets` on a machine `cargo xtask setup` has prepared.
pub fn run_after_setup(targets: &[&str], seconds: u64) -> anyhow::Result<()> {
    let root = toolchain::workspace_root();
    let nightly = toolchain::pinned_nightly()?;
    step(format_args!(
        "building the fuzz targets (cargo fuzz, {nightly}, debug assertions, no sanitizer)"
    ));
    let mut build = toolchain::cargo();
    build.current_dir(&root).arg(format!("+{nightly}")).args([
        "fuzz",
        "build",
        "--fuzz-dir",
        "fuzz",
        "--sanitizer",
        "none",
    ]);
    if let [only] = targets {
        build.arg(only);
    }
    run_checked(&mut build)?;

    let scratch = root.join("target/fuzz");
    let mut rows = Vec::new();
    for &target in targets {
        step(format_args!("fuzzing {target} for {seconds} s"));
        let started = Instant::now();
        let outcome = run_target(&root, &scratch, target, seconds)?;
        rows.push((target, started.elapsed().as_secs(), outcome));
    }

    eprintln!();
    eprintln!(
        "{:<16} {:>6} {:>11} {:>8} {:>9} {:>9} {:>12}  result",
        "target", "secs", "runs", "execs/s", "coverage", "features", "corpus"
    );
    let show = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
    for (target, secs, o) in &rows {
        eprintln!(
            "{:<16} {:>6} {:>11} {:>8} {:>9} {:>9} {:>12}  {}",
            target,
            secs,
            show(o.runs),
            show(o.execs_per_sec),
            show(o.coverage),
            show(o.features),
            o.corpus.as_deref().unwrap_or("-"),
            o.result()
        );
    }
    eprintln!(
        "(coverage: edges reached; corpus: inputs/bytes; logs in {}/logs)",
        scratch.display()
    );
    let failed: Vec<String> = rows
        .iter()
        .filter_map(|(target, _, o)| {
            let artifact = o.artifact.as_ref()?;
            Some(format!(
                "{target}: {} saved in {}\n  {}\n  reproduce: cargo +{nightly} fuzz run --fuzz-dir \
                 fuzz --sanitizer none {target} {}\n  then add the input as a regression test in \
                 the crate that owns the parser",
                o.result().to_lowercase(),
                artifact.display(),
                o.panic
                    .as_deref()
                    .unwrap_or("(no panic message: see the log)"),
                artifact.display()
            ))
        })
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} fuzz target(s) failed:\n{}",
            failed.len(),
            failed.join("\n")
        );
    }
    Ok(())
}

/// Runs one target for `seconds` from its committed corpus; its log goes to
/// `scratch/logs/<target>.log`.
fn run_target(root: &Path, scratch: &Path, target: &str, seconds: u64) -> anyhow::Result<Outcome> {
    let corpus = scratch.join("corpus").join(target);
    let artifacts = scratch.join("artifacts").join(target);
    let logs = scratch.join("logs");
    for dir in [&corpus, &artifacts, &logs] {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let committed = root.join("fuzz/corpus").join(target);
    for seed in
        fs::read_dir(&committed).with_context(|| format!("reading {}", committed.display()))?
    {
        let seed = seed?.path();
        let copy = corpus.join(seed.file_name().context("a seed without a name")?);
        fs::copy(&seed, &copy).with_context(|| format!("copying {}", seed.display()))?;
    }
    let log_path = logs.join(format!("{target}.log"));
    let log =
        fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let binary = root
        .join("target")
        .join(TARGET_TRIPLE)
        .join("release")
        .join(target);
    let mut cmd = Command::new(&binary);
    cmd.arg(&corpus)
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={HANG_SECS}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg("-print_final_stats=1")
        .stdout(Stdio::null())
        .stderr(log);
    if let Some((_, Some(dict))) = TARGETS.iter().find(|t| t.0 == target) {
        cmd.arg(format!(
            "-dict={}",
            root.join("fuzz/dict").join(dict).display()
        ));
    }
    let status = cmd
        .status()
        .with_context(|| format!("could not start {}", binary.display()))?;
    let text =
        fs::read_to_string(&log_path).with_context(|| format!("reading {}", log_path.display()))?;
    let outcome = Outcome::from_log(&text);
    if !status.success() && outcome.artifact.is_none() {
        bail!(
            "{target} failed ({status}) without saving an input; see {}",
            log_path.display()
        );
    }
    Ok(outcome)
}
