//! UDP forwarding, engine against engine on the same veth topology in one run:
//! sender -- gateway -- receiver (see `Line`), the gateway forwarding port 5000 to the
//! receiver's port 6000 with XDP, tc, the kernel's forwarding with nftables DNAT, the
//! userspace engines, or socat.
//!
//! The forwarding stage has a CPU of its own (see `isolation`): the gateway's ingress NAPI
//! kthread and the forwarding process on one CPU, the sender, the receiver and its NAPI on the
//! other. For each engine: a paced phase measures one-way latency (CLOCK_MONOTONIC stamped in
//! the payload by the sender, read by the receiver; sender, receiver, forwarder and the NAPI
//! kthreads at a real-time priority, as the machine is shared); a saturation phase blasts and
//! counts what the gateway sent on, what reached the receiver, where the rest was dropped, and
//! the CPU time of the forwarding CPU's work per forwarded datagram.

use std::{net::SocketAddr, time::Duration};

use anyhow::bail;
use edgeplane_testbed::{netns::Line, usage};

use crate::{
    forwarder,
    frame_sender::Flow,
    isolation::{self, CpuTime, Cpus},
    loss::{self, Snapshot},
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
        default_value = "xdp,tc,linux-nat,limit,tokio,tokio-uring,socat"
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
    /// Sender threads at saturation (each a flow), all on the traffic CPU.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Upper bound on the datagrams one saturation phase sends.
    #[arg(long, default_value_t = 50_000_000)]
    max_packets: u64,
    /// Write the rows as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

pub fn measure(opts: &Options) -> anyhow::Result<Vec<Row>> {
    if opts.threads == 0 {
        bail!("--threads must be at least 1");
    }
    let cpus = Cpus::pick()?;
    // This process (the sender and receiver threads, and the commands it runs) stays on the
    // traffic CPU; the forwarder is moved off it once started.
    isolation::pin(0, cpus.traffic)?;
    eprintln!(
        "[bench] udp: forwarding on CPU {}, sender and receiver on CPU {}",
        cpus.forwarding, cpus.traffic
    );
    // Rounds interleave the engines, so a burst of other work on the machine hits them alike.
    let mut runs: Vec<Vec<Run>> = opts.engines.iter().map(|_| Vec::new()).collect();
    for round in 1..=opts.rounds {
        for (engine, runs) in opts.engines.iter().zip(&mut runs) {
            eprintln!("[bench] udp round {round}/{}: {engine}", opts.rounds);
            let run = measure_engine(engine, opts, cpus)?;
            eprintln!("[bench]   {}", run.describe());
            runs.push(run);
        }
    }
    Ok(opts
        .engines
        .iter()
        .zip(runs)
        .map(|(engine, runs)| summarize(engine, runs))
        .collect())
}

/// One engine's measurements in one round.
struct Run {
    latency_ns: Vec<u64>,
    latency_sent: u64,
    /// Datagrams the gateway sent on out of g1 (what the forwarding CPU produced), including
    /// those the receiver's full ring dropped.
    forwarded: u64,
    /// Datagrams that reached the receiver's UDP layer.
    arrived: u64,
    sent: u64,
    seconds: f64,
    /// CPU of the whole path: this process, the forwarder, the NAPI kthreads, ksoftirqd.
    cpu_ns: u64,
    /// CPU of the forwarding stage: the gateway's ingress NAPI kthread and the forwarder.
    forwarder_cpu_ns: u64,
    napi_ns: u64,
    process_cpu_ns: u64,
    /// /proc/stat of the forwarding and the traffic CPU over the phase.
    forwarding_cpu: CpuTime,
    traffic_cpu: CpuTime,
    /// Where the gateway's and the receiver's NAPI kthreads and the forwarder's threads last ran.
    placement: String,
    loss: Vec<loss::Count>,
    rss: Option<u64>,
}

impl Run {
    fn wall_ns(&self) -> f64 {
        self.seconds * 1e9
    }

    /// How the forwarding CPU's time was spent: the isolation, checked.
    fn isolation(&self) -> String {
        let busy = self.forwarding_cpu.busy();
        let share = |ns: u64| 100.0 * ns as f64 / self.wall_ns();
        format!(
            "forwarding CPU busy {:.0}% (sys {:.0}%, softirq {:.0}%, user {:.0}%), the forwarder {:.0}% \
             (napi/g0 {:.0}%, process {:.0}%); traffic CPU busy {:.0}% (softirq {:.0}%); {}",
            share(busy),
            share(self.forwarding_cpu.system),
            share(self.forwarding_cpu.softirq),
            share(self.forwarding_cpu.user),
            share(self.forwarder_cpu_ns),
            share(self.napi_ns),
            share(self.process_cpu_ns),
            share(self.traffic_cpu.busy()),
            share(self.traffic_cpu.softirq),
            self.placement,
        )
    }

    fn describe(&self) -> String {
        format!(
            "offered {:.0}/s, forwarded {:.0}/s, arrived {:.0}/s; {}",
            self.sent as f64 / self.seconds,
            self.forwarded as f64 / self.seconds,
            self.arrived as f64 / self.seconds,
            self.isolation()
        )
    }
}

/// The median round's rates (its loss counts and isolation too), latency quantiles over every
/// round's samples, CPU over all.
fn summarize(engine: &str, mut runs: Vec<Run>) -> Row {
    let mut sender: Vec<f64> = runs.iter().map(|r| r.sent as f64 / r.seconds).collect();
    sender.sort_by(f64::total_cmp);
    let mut lat: Vec<u64> = runs
        .iter()
        .flat_map(|r| r.latency_ns.iter().copied())
        .collect();
    lat.sort_unstable();
    let us = |q: f64| quantile(&lat, q).map(|ns| ns as f64 / 1e3);
    let forwarded: u64 = runs.iter().map(|r| r.forwarded).sum();
    let per_packet = |ns: u64| (forwarded > 0).then(|| ns as f64 / forwarded as f64);
    let latency_received = format!(
        "{}/{}",
        lat.len(),
        runs.iter().map(|r| r.latency_sent).sum::<u64>()
    );
    let cpu_ns_per_packet = per_packet(runs.iter().map(|r| r.cpu_ns).sum());
    let forwarder_cpu_ns_per_packet = per_packet(runs.iter().map(|r| r.forwarder_cpu_ns).sum());
    let process_cpu_ns_per_packet = per_packet(runs.iter().map(|r| r.process_cpu_ns).sum());
    let rss_bytes = runs.iter().filter_map(|r| r.rss).max();
    let rounds = runs.len();
    runs.sort_by(|a, b| {
        (a.forwarded as f64 / a.seconds).total_cmp(&(b.forwarded as f64 / b.seconds))
    });
    let median = runs.swap_remove(rounds / 2);
    Row {
        suite: "udp".into(),
        engine: engine.into(),
        pps: Some(median.forwarded as f64 / median.seconds),
        p50_us: us(0.5),
        p99_us: us(0.99),
        p999_us: us(0.999),
        cpu_ns_per_packet,
        rss_bytes,
        sender_pps: Some(sender[sender.len() / 2]),
        process_cpu_ns_per_packet,
        forwarder_cpu_ns_per_packet,
        latency_received: Some(latency_received),
        ns_per_op: None,
        size_bytes: None,
        loss: Some(median.loss.clone()),
        note: Some(format!("median of {rounds} rounds; {}", median.isolation())),
    }
}

fn measure_engine(engine: &str, opts: &Options, cpus: Cpus) -> anyhow::Result<Run> {
    let line = Line::new("bu")?;
    isolation::prepare_veths(&line)?;
    line.resolve_neighbours()?;
    let fwd = forwarder::start(engine, &line)?;
    let pid = fwd.pid();
    if let Some(pid) = pid {
        isolation::pin_process(pid, cpus.forwarding)?;
    }
    let placed = isolation::place(&line, cpus)?;
    let to: SocketAddr = format!("{}:5000", Line::GATEWAY_IN_V4).parse()?;
    let bind: SocketAddr = format!("{}:6000", Line::RECEIVER_V4).parse()?;

    // Warm-up: neighbours, caches, conntrack, the engines' first wake-ups.
    traffic::latency(
        &line.sender,
        &line.receiver,
        to,
        bind,
        1000,
        Duration::from_millis(200),
    )?;

    // The forwarder and both NAPI kthreads run at the latency threads' real-time priority.
    let realtime = |policy: i32, priority: i32| -> anyhow::Result<()> {
        if let Some(pid) = pid {
            traffic::set_process_policy(pid, policy, priority)?;
        }
        placed.gateway_in.set_policy(policy, priority);
        placed.receiver_in.set_policy(policy, priority);
        Ok(())
    };
    realtime(libc::SCHED_FIFO, traffic::LATENCY_PRIORITY)?;
    let lat = traffic::latency(
        &line.sender,
        &line.receiver,
        to,
        bind,
        opts.latency_rate,
        Duration::from_secs_f64(opts.latency_seconds),
    );
    realtime(libc::SCHED_OTHER, 0)?;
    let lat = lat?;

    // Saturation, the benchmark's threads at a high nice value (see `isolation`).
    forwarder::nft(&line.receiver, loss::SINK)?;
    let nice = |nice: i32| {
        isolation::set_autogroup_nice(nice);
        if let Some(pid) = pid {
            isolation::set_process_nice(pid, nice);
        }
        placed.gateway_in.set_nice(nice);
        placed.receiver_in.set_nice(nice);
    };
    let cpu = || -> anyhow::Result<Cpu> {
        let process = pid.map_or(Ok(0), usage::threads_cpu_ns)?;
        Ok(Cpu {
            all: usage::self_cpu_ns()
                + process
                + placed.gateway_in.cpu_ns()
                + placed.receiver_in.cpu_ns()
                + usage::ksoftirqd_cpu_ns()?,
            napi: placed.gateway_in.cpu_ns(),
            process,
            forwarding: isolation::cpu_time(cpus.forwarding)?,
            traffic: isolation::cpu_time(cpus.traffic)?,
        })
    };
    let (counters0, cpu0) = (
        Snapshot::take(&line, fwd.agent_metrics().as_deref())?,
        cpu()?,
    );
    let flow = Flow {
        dev: "s0",
        src_mac: line.sender.mac("s0")?,
        dst_mac: line.gateway.mac("g0")?,
        src: Line::SENDER_V4.parse()?,
        dst: Line::GATEWAY_IN_V4.parse()?,
        src_port: 40000,
        dst_port: 5000,
    };
    nice(isolation::SATURATION_NICE);
    let blast = traffic::blast(
        &line.sender,
        &flow,
        opts.threads,
        Duration::from_secs_f64(opts.seconds),
        opts.max_packets,
    );
    let cpu1 = cpu();
    // Back to nice 0 before any error returns: the autogroup outlives this function.
    nice(0);
    let (blast, cpu1) = (blast?, cpu1?);
    // Let queued datagrams drain before counting.
    std::thread::sleep(Duration::from_millis(200));
    let counters1 = Snapshot::take(&line, fwd.agent_metrics().as_deref())?;
    let arrived = counters1.get("receiver", loss::SINK_COUNTER)
        - counters0.get("receiver", loss::SINK_COUNTER);
    let mut loss = counters1.since(&counters0);
    // Frames the sender wrote: those the device took, and those the veth dropped at g0's full
    // ring (s0's TX drops: the first of a batch comes back as ENOBUFS, a later one ends the
    // batch short, uncounted by sendmmsg).
    let offered =
        blast.sent + (counters1.get("s0", "tx_dropped") - counters0.get("s0", "tx_dropped"));
    loss.insert(
        0,
        loss::Count::sender("offered (frames written)", offered, false),
    );
    for (what, n) in [
        ("sendmmsg ENOBUFS (calls: g0's ring full)", blast.enobufs),
        ("sendmmsg other errors (calls)", blast.other_errors),
    ] {
        if n > 0 {
            loss.insert(1, loss::Count::sender(what, n, true));
        }
    }
    // What the gateway sent on: out of g1, into the receiver's ring or dropped there because
    // it was full (the receiving CPU's shortfall, not the forwarder's).
    let out_of_g1 = |s: &Snapshot| s.get("g1", "tx_packets") + s.get("g1", "tx_dropped");
    let forwarded = out_of_g1(&counters1) - out_of_g1(&counters0);
    let mut placement: Vec<String> =
        vec![placed.gateway_in.describe(), placed.receiver_in.describe()];
    if let Some(pid) = pid {
        placement.push(format!("forwarder on CPU {}", isolation::last_cpus(pid)));
    }
    Ok(Run {
        latency_ns: lat.samples,
        latency_sent: lat.sent,
        forwarded,
        arrived,
        sent: offered,
        seconds: blast.elapsed.as_secs_f64(),
        cpu_ns: cpu1.all - cpu0.all,
        forwarder_cpu_ns: (cpu1.napi + cpu1.process) - (cpu0.napi + cpu0.process),
        napi_ns: cpu1.napi - cpu0.napi,
        process_cpu_ns: cpu1.process - cpu0.process,
        forwarding_cpu: cpu1.forwarding.since(&cpu0.forwarding),
        traffic_cpu: cpu1.traffic.since(&cpu0.traffic),
        placement: placement.join(", "),
        loss,
        rss: pid.map(usage::peak_rss).transpose()?,
    })
}

/// CPU time at one moment (see `Run`).
struct Cpu {
    all: u64,
    napi: u64,
    process: u64,
    forwarding: CpuTime,
    traffic: CpuTime,
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
