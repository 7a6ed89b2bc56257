//! The agent's footprint: resident memory with no rules and with 1,000 UDP rules, idle CPU,
//! and the size of the shipped binary (`cargo xtask dist`: stripped, debug symbols beside it).
//!
//! RSS is VmRSS after start-up settled and one /metrics scrape (what a Prometheus server
//! scraping it sees), with the start-up peak (VmHWM) in the note. Idle CPU is the agent's
//! threads' scheduler time over `--idle-seconds` with no traffic and no scrapes.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use edgeplane_testbed::{
    agent::{self, Agent},
    netns::{Line, Netns},
    usage,
};

use crate::report::{Report, Row};

/// The targets (issue 15), in bytes.
const RSS_IDLE_TARGET: u64 = 20_000_000;
const RSS_RULES_TARGET: u64 = 32_000_000;
const BINARY_TARGET: u64 = 8_000_000;

#[derive(clap::Args)]
pub struct Options {
    /// UDP rules of the loaded case.
    #[arg(long, default_value_t = 1000)]
    rules: u16,
    /// Seconds over which idle CPU is measured.
    #[arg(long, default_value_t = 20.0)]
    idle_seconds: f64,
    /// The shipped (stripped) binary whose size is reported; by default the agent run.
    #[arg(long)]
    shipped: Option<PathBuf>,
    /// Write the rows as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

struct Measured {
    rss: u64,
    peak: u64,
    idle_cpu_percent: Option<f64>,
}

/// Settles, scrapes once, and reads the agent's memory (and, if asked, idle CPU).
fn measure(agent: &Agent, idle: Option<Duration>) -> anyhow::Result<Measured> {
    std::thread::sleep(Duration::from_secs(1));
    let (status, _) = agent.get("/metrics")?;
    anyhow::ensure!(status == 200, "/metrics answered {status}");
    let pid = agent.pid();
    let rss = usage::rss(pid)?;
    let peak = usage::peak_rss(pid)?;
    let idle_cpu_percent = match idle {
        None => None,
        Some(span) => {
            let before = usage::threads_cpu_ns(pid)?;
            std::thread::sleep(span);
            let used = usage::threads_cpu_ns(pid)? - before;
            Some(used as f64 / span.as_nanos() as f64 * 100.0)
        }
    };
    Ok(Measured {
        rss,
        peak,
        idle_cpu_percent,
    })
}

fn rules_config(rules: u16) -> String {
    let mut toml = String::from("[http]\nlisten = \"127.0.0.1:9464\"\n[udp]\nmode = \"tc\"\n");
    for i in 0..rules {
        toml += &format!(
            "[[udp.forward]]\nname = \"rule-{i}\"\ningress = \"g0\"\nmatch = {{ dst_port = {} }}\nto = {{ iface = \"g1\", dst_ip = \"{}\" }}\n",
            10_000 + u32::from(i),
            Line::RECEIVER_V4
        );
    }
    toml
}

fn row(engine: &str, rss: Option<u64>, size: Option<u64>, note: String) -> Row {
    let mut r = Row::micro(engine, 0.0, note);
    r.suite = "footprint".into();
    r.ns_per_op = None;
    r.rss_bytes = rss;
    r.size_bytes = size;
    r
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn verdict(value: u64, target: u64) -> &'static str {
    if value < target { "met" } else { "missed" }
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    let idle_span = Duration::from_secs_f64(opts.idle_seconds);
    let ns = Netns::new("fpidle")?;
    let idle = {
        let agent = Agent::start(&ns, "[http]\nlisten = \"127.0.0.1:9464\"\n", "warn")?;
        measure(&agent, Some(idle_span))?
    };
    drop(ns);
    let line = Line::new("fpr")?;
    line.resolve_neighbours()?;
    let loaded = {
        let agent = Agent::start(&line.gateway, &rules_config(opts.rules), "warn")?;
        measure(&agent, None)?
    };
    drop(line);
    let shipped = opts.shipped.clone().unwrap_or_else(agent::binary);
    let size = std::fs::metadata(&shipped)
        .with_context(|| format!("{} (run `cargo xtask dist`)", shipped.display()))?
        .len();
    let debug = shipped.with_extension("debug");
    let debug_note = match std::fs::metadata(&debug) {
        Ok(m) => format!("debug symbols in {} ({})", debug.display(), mb(m.len())),
        Err(_) => "no separate debug symbols found beside it".into(),
    };
    let cpu = idle.idle_cpu_percent.unwrap_or_default();
    let rows = vec![
        row(
            "rss idle",
            Some(idle.rss),
            None,
            format!(
                "no rules, after one scrape; start-up peak {}; idle CPU {cpu:.3}% of a core over {:.0} s; target < 20 MB: {}",
                mb(idle.peak),
                opts.idle_seconds,
                verdict(idle.rss, RSS_IDLE_TARGET)
            ),
        ),
        row(
            &format!("rss {} rules", opts.rules),
            Some(loaded.rss),
            None,
            format!(
                "{} UDP rules (tc), no CAN routes (no CAN on this host), after one scrape; start-up peak {}; target < 32 MB: {}",
                opts.rules,
                mb(loaded.peak),
                verdict(loaded.rss, RSS_RULES_TARGET)
            ),
        ),
        row(
            "binary size",
            None,
            Some(size),
            format!(
                "{}, stripped; {debug_note}; target < 8 MB: {}",
                shipped.display(),
                verdict(size, BINARY_TARGET)
            ),
        ),
    ];
    let report = Report { rows };
    println!("{}", report.markdown());
    if let Some(path) = &opts.json {
        report.save(path)?;
    }
    Ok(())
}
