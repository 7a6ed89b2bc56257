//! UDP forwarding, engine against engine on the same veth topology in one run:
//! sender -- gateway -- receiver (see `Line`), the gateway forwarding port 5000 to the
//! receiver's port 6000 with XDP, tc, the userspace engines, or socat.
//!
//! For each engine: a paced phase measures one-way latency (CLOCK_MONOTONIC stamped in the
//! payload by the sender, read by the receiver); a saturation phase blasts from one thread per
//! core and counts what reached the receiver's UDP layer, the machine's CPU time (its idle
//! baseline subtracted) and the forwarding process's own CPU time and peak RSS.

use std::{
    net::SocketAddr,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use edgeplane_common::XDP_PASS_PROGRAM;
use edgeplane_testbed::{
    agent::Agent,
    netns::{Line, Netns},
    usage,
};

use crate::{
    report::Row,
    traffic::{self, quantile},
};

#[derive(clap::Args)]
pub struct Options {
    /// Engines to measure, in order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "xdp,tc,tokio,tokio-uring,socat"
    )]
    engines: Vec<String>,
    /// Seconds of saturation per engine.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
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
        Option<aya::Ebpf>,
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
    let agent = |mode: &str, engine: &str| {
        let config = format!(
            "[http]\nlisten = \"127.0.0.1:9464\"\n[udp]\nmode = \"{mode}\"\nengine = \"{engine}\"\n{RULE}"
        );
        Agent::start(&line.gateway, &config, "warn")
    };
    Ok(match engine {
        "xdp" => {
            line.prepare_for_xdp()?;
            let pass = attach_xdp_pass(&line.receiver, "r0")?;
            Forwarder::Agent(agent("xdp", "tokio")?, Some(pass))
        }
        "tc" => Forwarder::Agent(agent("tc", "tokio")?, None),
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
        other => bail!("unknown engine {other}: choose xdp, tc, tokio, tokio-uring, socat"),
    })
}

/// XDP redirects into a veth reach its peer only when the peer runs XDP (before 5.13).
fn attach_xdp_pass(ns: &Netns, iface: &str) -> anyhow::Result<aya::Ebpf> {
    let _in = ns.enter()?;
    let mut ebpf = edgeplane::loader::load(&[XDP_PASS_PROGRAM])?;
    let p: &mut aya::programs::Xdp = ebpf
        .program_mut(XDP_PASS_PROGRAM)
        .context("xdp_pass missing")?
        .try_into()?;
    p.attach(iface, aya::programs::XdpMode::Driver)?;
    Ok(ebpf)
}

pub fn measure(opts: &Options) -> anyhow::Result<Vec<Row>> {
    let threads = opts
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, std::num::NonZero::get));
    let mut rows = Vec::new();
    for engine in &opts.engines {
        eprintln!("[bench] udp: {engine}");
        rows.push(measure_engine(engine, opts, threads)?);
    }
    Ok(rows)
}

fn measure_engine(engine: &str, opts: &Options, threads: usize) -> anyhow::Result<Row> {
    let line = Line::new("bu")?;
    line.resolve_neighbours()?;
    let fwd = start(engine, &line)?;
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

    let lat = traffic::latency(
        &line.sender,
        &line.receiver,
        to,
        bind,
        opts.latency_rate,
        Duration::from_secs_f64(opts.latency_seconds),
    )?;
    let mut s = lat.samples.clone();
    s.sort_unstable();
    let us = |q: f64| quantile(&s, q).map(|ns| ns as f64 / 1e3);

    // Idle baseline of the machine (other work on it), then saturation.
    let _sink = traffic::sink(&line.receiver, bind)?;
    let idle_start = (Instant::now(), usage::machine_busy_ns()?);
    std::thread::sleep(Duration::from_millis(500));
    let idle_rate = (usage::machine_busy_ns()? - idle_start.1) as f64
        / idle_start.0.elapsed().as_nanos() as f64;

    let pid = fwd.pid();
    let (arrived0, busy0, proc0) = (
        traffic::udp_arrived(&line.receiver)?,
        usage::machine_busy_ns()?,
        usage::process_cpu_ns(pid)?,
    );
    let blast = traffic::blast(
        &line.sender,
        to,
        threads,
        Duration::from_secs_f64(opts.seconds),
        opts.max_packets,
    )?;
    // Let queued datagrams drain before counting.
    std::thread::sleep(Duration::from_millis(200));
    let elapsed = blast.elapsed.as_secs_f64();
    let arrived = traffic::udp_arrived(&line.receiver)? - arrived0;
    let busy = (usage::machine_busy_ns()? - busy0) as f64 - idle_rate * (elapsed + 0.2) * 1e9;
    let proc_ns = (usage::process_cpu_ns(pid)? - proc0) as f64;
    let rss = usage::peak_rss(pid)?;
    drop(fwd);

    let per_packet = |ns: f64| (arrived > 0).then(|| ns.max(0.0) / arrived as f64);
    Ok(Row {
        suite: "udp".into(),
        engine: engine.into(),
        pps: Some(arrived as f64 / elapsed),
        p50_us: us(0.5),
        p99_us: us(0.99),
        p999_us: us(0.999),
        cpu_ns_per_packet: per_packet(busy),
        rss_bytes: Some(rss),
        sender_pps: Some(blast.sent as f64 / elapsed),
        process_cpu_ns_per_packet: per_packet(proc_ns),
        latency_received: Some(format!("{}/{}", lat.samples.len(), lat.sent)),
        ns_per_op: None,
        note: None,
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
