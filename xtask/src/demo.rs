//! `cargo xtask demo`: build everything, then forward real UDP traffic in the kernel across a
//! throwaway three-namespace topology and show what the agent's metrics say about it.

use std::{
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use edgeplane_testbed::{
    agent::Agent,
    http,
    netns::{self, Line},
};

use crate::{
    setup,
    toolchain::{self, require_root, run_checked, step},
};

#[derive(clap::Args)]
pub struct Options {
    /// Datagrams to send.
    #[arg(long, default_value_t = 10_000)]
    count: u32,
    /// Forwarder hook: xdp, tc or auto.
    #[arg(long, default_value = "auto")]
    mode: String,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    require_root("the demo creates network namespaces and attaches eBPF programs")?;
    setup::run(&setup::Options::default())?;
    let root = toolchain::workspace_root();
    step("building the agent with its eBPF programs (cargo build --release)");
    run_checked(crate::toolchain::cargo().current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "edgeplane",
    ]))?;

    netns::remove_stale("demo");
    step(
        "creating a throwaway topology: sender --veth-- gateway --veth-- receiver (network namespaces)",
    );
    let line = Line::new("demo")?;
    if opts.mode == "xdp" {
        line.prepare_for_xdp()?;
    }
    line.resolve_neighbours()?;
    let config = format!(
        r#"[http]
listen = "127.0.0.1:9464"

[udp]
mode = "{mode}"

[[udp.forward]]
name = "lidar-front"
ingress = "g0"
match = {{ dst_port = 5000 }}
to = {{ iface = "g1", dst_ip = "{rx}", dst_port = 6000 }}
"#,
        mode = opts.mode,
        rx = Line::RECEIVER_V4
    );
    println!("\nconfig:\n{config}");
    step("starting `edgeplane run` on the gateway");
    let agent = Agent::start(&line.gateway, &config, "info")?;
    {
        let _in = line.gateway.enter()?;
        let (_, ready) = http::get(agent.metrics, "/readyz")?;
        println!("GET /readyz -> {ready}");
    }

    step(format_args!(
        "sending {} datagrams from the sender to {}:5000 (the gateway); the receiver listens on {}:6000",
        opts.count,
        Line::GATEWAY_IN_V4,
        Line::RECEIVER_V4
    ));
    let (received, elapsed) = exchange(&line, opts.count)?;
    println!(
        "received {received} of {} at {}:6000 in {:.2} s (destination rewritten in the kernel)",
        opts.count,
        Line::RECEIVER_V4,
        elapsed.as_secs_f64()
    );

    let metrics = {
        let _in = line.gateway.enter()?;
        http::get(agent.metrics, "/metrics")?.1
    };
    println!("\nGET /metrics (edgeplane_udp_forward_*):");
    for l in metrics
        .lines()
        .filter(|l| l.starts_with("edgeplane_udp_forward") && !l.ends_with(" 0"))
    {
        println!("  {l}");
    }
    let forwarded = http::metric(
        &metrics,
        "edgeplane_udp_forward_packets_total{rule=\"lidar-front\"}",
    )?;
    ensure!(
        received == opts.count,
        "only {received} of {} datagrams arrived",
        opts.count
    );
    ensure!(
        forwarded == f64::from(opts.count),
        "the kernel counted {forwarded} forwarded datagrams"
    );
    step("demo passed: every datagram was forwarded by the eBPF program; cleaning up");
    Ok(())
}

/// Sends `count` paced datagrams; returns how many the receiver got and how long it took.
fn exchange(line: &Line, count: u32) -> anyhow::Result<(u32, Duration)> {
    let to: SocketAddr = format!("{}:5000", Line::GATEWAY_IN_V4).parse()?;
    let bind: SocketAddr = format!("{}:6000", Line::RECEIVER_V4).parse()?;
    std::thread::scope(|s| {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let receiver = s.spawn(move || -> anyhow::Result<u32> {
            let _in = line.receiver.enter()?;
            // A large buffer: a slow machine's receiver may fall behind a burst.
            let sock = edgeplane_testbed::bind_udp_receiver(bind)?;
            sock.set_read_timeout(Some(Duration::from_millis(1000)))?;
            ready_tx.send(())?;
            let mut got = 0;
            let mut buf = [0u8; 2048];
            while got < count && sock.recv(&mut buf).is_ok() {
                got += 1;
            }
            Ok(got)
        });
        ready_rx.recv().context("receiver failed to start")?;
        let start = Instant::now();
        {
            let _in = line.sender.enter()?;
            let sock = UdpSocket::bind("0.0.0.0:0")?;
            for seq in 0..count {
                sock.send_to(format!("frame {seq:08}").as_bytes(), to)?;
                // Paced (~50 per ms) so the receiver's socket buffer keeps up.
                if seq % 50 == 49 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        let got = receiver.join().expect("receiver thread")?;
        Ok((got, start.elapsed()))
    })
}
