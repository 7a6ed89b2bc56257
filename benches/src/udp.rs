//! UDP forwarding, engine against engine on the same veth topology in one run:
//! sender -- gateway -- receiver (see `Line`), the gateway forwarding port 5000 to the
//! receiver's port 6000 with XDP, tc, the userspace engines, or socat.
//!
//! For each engine: a paced phase measures one-way latency (CLOCK_MONOTONIC stamped in the
//! payload by the sender, read by the receiver; sender, receiver and forwarder at a real-time
//! priority, as the machine is shared); a saturation phase blasts from one thread per core and
//! counts what reached the receiver's UDP layer, the CPU time of the benchmark's own work
//! (sender and receive path, forwarder, ksoftirqd) and the forwarder's CPU time and peak RSS.

use std::{
    net::SocketAddr,
    process::{Child, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};
use edgeplane_testbed::{agent::Agent, netns::Line, usage};

use crate::{
    report::Row,
    traffic::{self, quantile},
};

#[derive(clap::Args)]
pub struct Options {
    /// Engines to measure, in order. `xdp-nocapture` and `tc-nocapture` run with latency
    /// capture off (`[latency] enabled = false`), to measure what capture costs end to end.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "xdp,tc,tokio,tokio-uring,socat"
    )]
    engines: Vec<String>,
    /// Seconds of saturation per engine and round.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Rounds over all engines; the report takes the median round's rates.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Datagrams per second of the latency phase: moderate, below every engine's saturation.
    #[arg(long, default_value_t = 10_000)]
    latency_rate: u64,
    /// Seconds of the latency phase.
    #[arg(long, default_value_t = 2.0)]
    latency_seconds: f64,
    /// Sender threads at saturation (default: one per CPU).
    #[arg(long)]
    threads: Option<usize>,
    /// Upper bound on the datagrams one saturation phase sends.
    #[arg(long, default_value_t = 50_000_000)]
    max_packets: u64,
    /// Write the rows as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

const RULE: &str = r#"
[[udp.forward]]
name = "bench"
ingress = "g0"
match = { dst_port = 5000 }
to = { iface = "g1", dst_ip = "198.18.2.2", dst_port = 6000 }
"#;

/// A forwarder running on the gateway.
enum Forwarder {
    /// The agent; with XDP, the receiving veth's `xdp_pass` link lives as long as this.
    Agent(
        Agent,
        #[expect(dead_code, reason = "held so the receiving veth keeps its XDP program")]
        Option<Box<aya::Ebpf>>,
    ),
    Socat(Child),
}

impl Forwarder {
    fn pid(&self) -> u32 {
        match self {
            Self::Agent(a, _) => a.pid(),
            Self::Socat(c) => c.id(),
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        if let Self::Socat(c) = self {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn start(engine: &str, line: &Line) -> anyhow::Result<Forwarder> {
    // `-nocapture`: the same kernel path with latency capture off, to measure its cost.
    let capture = !engine.ends_with("-nocapture");
    let agent = |mode: &str, engine: &str| {
        let config = format!(
            "[http]\nlisten = \"127.0.0.1:9464\"\n[latency]\nenabled = {capture}\n[udp]\nmode = \"{mode}\"\nengine = \"{engine}\"\n{RULE}"
        );
        Agent::start(&line.gateway, &config, "warn")
    };
    Ok(match engine {
        "xdp" | "xdp-nocapture" => {
            line.prepare_for_xdp()?;
            let pass = edgeplane_tests::xdp_pass::attach(&line.receiver, "r0")?;
            Forwarder::Agent(agent("xdp", "tokio")?, Some(Box::new(pass)))
        }
        "tc" | "tc-nocapture" => Forwarder::Agent(agent("tc", "tokio")?, None),
        "tokio" | "tokio-uring" => Forwarder::Agent(agent("userspace", engine)?, None),
        "socat" => {
            let child = line
                .gateway
                .command("socat")
                .args([
                    "-u",
                    &format!("UDP4-RECV:5000,bind={},rcvbuf=8388608", Line::GATEWAY_IN_V4),
                    &format!("UDP4-SENDTO:{}:6000", Line::RECEIVER_V4),
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context(
                    "starting socat (Debian package socat, installed by `cargo xtask setup`)",
                )?;
            let mut f = Forwarder::Socat(child);
            // socat binds right after exec; give it that moment and check it stayed up.
            std::thread::sleep(Duration::from_millis(300));
            if let Forwarder::Socat(c) = &mut f
                && let Some(status) = c.try_wait()?
            {
                bail!("socat exited with {status}");
            }
            f
        }
        other => bail!(
            "unknown engine {other}: choose xdp, tc, xdp-nocapture, tc-nocapture, tokio, tokio-uring, socat"
        ),
    })
}

pub fn measure(opts: &Options) -> anyhow::Result<Vec<Row>> {
    let threads = opts
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, std::num::NonZero::get));
    // Rounds interleave the engines, so a burst of other work on the machine hits them alike.
    let mut runs: Vec<Vec<Run>> = opts.engines.iter().map(|_| Vec::new()).collect();
    for round in 1..=opts.rounds {
        for (engine, runs) in opts.engines.iter().zip(&mut runs) {
            eprintln!("[bench] udp round {round}/{}: {engine}", opts.rounds);
            runs.push(measure_engine(engine, opts, threads)?);
        }
    }
    Ok(opts
        .engines
        .iter()
        .zip(runs)
        .map(|(engine, runs)| summarize(engine, &runs))
        .collect())
}

/// One engine's measurements in one round.
struct Run {
    latency_ns: Vec<u64>,
    latency_sent: u64,
    arrived: u64,
    sent: u64,
    seconds: f64,
    cpu_ns: u64,
    process_cpu_ns: u64,
    rss: u64,
}

/// The median round's rates, latency quantiles over every round's samples, CPU over all.
fn summarize(engine: &str, runs: &[Run]) -> Row {
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut pps: Vec<f64> = runs.iter().map(|r| r.arrived as f64 / r.seconds).collect();
    let mut sender: Vec<f64> = runs.iter().map(|r| r.sent as f64 / r.seconds).collect();
    let mut lat: Vec<u64> = runs
        .iter()
        .flat_map(|r| r.latency_ns.iter().copied())
        .collect();
    lat.sort_unstable();
    let us = |q: f64| quantile(&lat, q).map(|ns| ns as f64 / 1e3);
    let arrived: u64 = runs.iter().map(|r| r.arrived).sum();
    let per_packet = |ns: u64| (arrived > 0).then(|| ns as f64 / arrived as f64);
    Row {
        suite: "udp".into(),
        engine: engine.into(),
        pps: Some(median(&mut pps)),
        p50_us: us(0.5),
        p99_us: us(0.99),
        p999_us: us(0.999),
        cpu_ns_per_packet: per_packet(runs.iter().map(|r| r.cpu_ns).sum()),
        rss_bytes: runs.iter().map(|r| r.rss).max(),
        sender_pps: Some(median(&mut sender)),
        process_cpu_ns_per_packet: per_packet(runs.iter().map(|r| r.process_cpu_ns).sum()),
        latency_received: Some(format!(
            "{}/{}",
            lat.len(),
            runs.iter().map(|r| r.latency_sent).sum::<u64>()
        )),
        ns_per_op: None,
        size_bytes: None,
        note: Some(format!("median of {} rounds", runs.len())),
    }
}

fn measure_engine(engine: &str, opts: &Options, threads: usize) -> anyhow::Result<Run> {
    let line = Line::new("bu")?;
    line.resolve_neighbours()?;
    let fwd = start(engine, &line)?;
    let pid = fwd.pid();
    let to: SocketAddr = format!("{}:5000", Line::GATEWAY_IN_V4).parse()?;
    let bind: SocketAddr = format!("{}:6000", Line::RECEIVER_V4).parse()?;

    // Warm-up: neighbours, caches, the engines' first wake-ups.
    traffic::latency(
        &line.sender,
        &line.receiver,
        to,
        bind,
        1000,
        Duration::from_millis(200),
    )?;

    // The forwarder runs at the latency threads' real-time priority meanwhile.
    traffic::set_process_policy(pid, libc::SCHED_FIFO, traffic::LATENCY_PRIORITY)?;
    let lat = traffic::latency(
        &line.sender,
        &line.receiver,
        to,
        bind,
        opts.latency_rate,
        Duration::from_secs_f64(opts.latency_seconds),
    );
    traffic::set_process_policy(pid, libc::SCHED_OTHER, 0)?;
    let lat = lat?;

    // Saturation. CPU is what this process (sender threads, and the receive path they run in
    // softirq), the forwarder and ksoftirqd spent: other work on the machine is not counted.
    let _sink = traffic::sink(&line.receiver, bind)?;
    let cpu = || -> anyhow::Result<(u64, u64)> {
        let forwarder = usage::process_cpu_ns(pid)?;
        Ok((
            usage::self_cpu_ns() + forwarder + usage::ksoftirqd_cpu_ns()?,
            forwarder,
        ))
    };
    let (arrived0, (cpu0, proc0)) = (traffic::udp_arrived(&line.receiver)?, cpu()?);
    let blast = traffic::blast(
        &line.sender,
        to,
        threads,
        Duration::from_secs_f64(opts.seconds),
        opts.max_packets,
    )?;
    // Let queued datagrams drain before counting.
    std::thread::sleep(Duration::from_millis(200));
    let arrived = traffic::udp_arrived(&line.receiver)? - arrived0;
    let (cpu1, proc1) = cpu()?;
    Ok(Run {
        latency_ns: lat.samples,
        latency_sent: lat.sent,
        arrived,
        sent: blast.sent,
        seconds: blast.elapsed.as_secs_f64(),
        cpu_ns: cpu1 - cpu0,
        process_cpu_ns: proc1 - proc0,
        rss: usage::peak_rss(pid)?,
    })
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    let rows = measure(opts)?;
    let report = crate::report::Report { rows };
    println!("{}", report.markdown());
    if let Some(path) = &opts.json {
        report.save(path)?;
    }
    Ok(())
}
