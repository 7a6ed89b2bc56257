//! The CAN suite of `cargo xtask bench`, run inside qemu (CAN needs the VM's kernel): frames
//! from one vxcan bus routed to another by edgeplane's can-gw route, by can-gw configured with
//! `cangw` directly, and by edgeplane's userspace route. Prints one `EDGEPLANE-BENCH <json>`
//! row per engine for the report. Not a correctness test: tests/can_route.rs and
//! tests/can_userspace.rs are.
//!
//! The VM runs under TCG emulation: compare the engines' ratios, not the absolute numbers.

use std::time::{Duration, Instant};

use edgeplane_testbed::{agent::Agent, netns::Netns, require_root, usage};
use edgeplane_tests::can::{Bus, Frame, vxcan_pair};

/// Frames per second of the latency phase (TCG is slow: keep it well below saturation).
const LATENCY_RATE: u64 = 1000;
const LATENCY_TIME: Duration = Duration::from_secs(2);
const SATURATION_TIME: Duration = Duration::from_secs(3);
/// Upper bound on the frames one saturation phase sends.
const MAX_FRAMES: u64 = 5_000_000;

fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// What routes: the agent (stopped on drop), or a can-gw job `cangw` added, which goes with
/// its interfaces when the namespace is deleted.
enum Engine {
    Agent(Agent),
    Cangw,
}

fn rx_packets(ns: &Netns, iface: &str) -> u64 {
    ns.exec(&[
        "cat",
        &format!("/sys/class/net/{iface}/statistics/rx_packets"),
    ])
    .unwrap()
    .trim()
    .parse()
    .unwrap()
}

fn measure(name: &str, ns: &Netns, engine: &Engine) {
    let (tx, rx) = (Bus::open(ns, "a1").unwrap(), Bus::open(ns, "b1").unwrap());
    // Latency: each frame carries its CLOCK_MONOTONIC send time.
    let count = LATENCY_RATE * LATENCY_TIME.as_secs();
    let mut samples = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut out = Vec::new();
            let start = Instant::now();
            while (out.len() as u64) < count && start.elapsed() < LATENCY_TIME * 3 {
                if let Some(f) = rx.recv() {
                    let sent = u64::from_ne_bytes(f.data[..8].try_into().unwrap());
                    out.push(now_ns().saturating_sub(sent));
                }
            }
            out
        });
        let interval = 1_000_000_000 / LATENCY_RATE;
        let start = now_ns();
        for i in 0..count {
            let due = start + i * interval;
            while now_ns() < due {
                std::thread::sleep(Duration::from_micros(50));
            }
            tx.send(&Frame::classic(0x123, &now_ns().to_ne_bytes()))
                .unwrap();
        }
        reader.join().unwrap()
    });
    samples.sort_unstable();
    let q = |p: f64| {
        (!samples.is_empty())
            .then(|| samples[((samples.len() - 1) as f64 * p).round() as usize] as f64 / 1e3)
    };

    // Saturation: frames that arrived on the far end of bus B, and CPU.
    let pid = match engine {
        Engine::Agent(a) => Some(a.pid()),
        Engine::Cangw => None,
    };
    let (rx0, busy0) = (rx_packets(ns, "b1"), usage::machine_busy_ns().unwrap());
    let proc0 = pid.map(|p| usage::process_cpu_ns(p).unwrap());
    let start = Instant::now();
    let mut sent = 0u64;
    let frame = Frame::classic(0x123, &[0x5a; 8]);
    while sent < MAX_FRAMES && start.elapsed() < SATURATION_TIME {
        // ENOBUFS when the queue is full: the frame is lost, go on.
        if tx.send(&frame).is_ok() {
            sent += 1;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(300));
    let arrived = rx_packets(ns, "b1") - rx0;
    let busy = (usage::machine_busy_ns().unwrap() - busy0) as f64;
    let proc_ns = pid.map(|p| (usage::process_cpu_ns(p).unwrap() - proc0.unwrap()) as f64);
    let per = |ns: f64| (arrived > 0).then(|| ns / arrived as f64);
    let row = serde_json::json!({
        "suite": "can",
        "engine": name,
        "pps": arrived as f64 / elapsed,
        "p50_us": q(0.5),
        "p99_us": q(0.99),
        "p999_us": q(0.999),
        "cpu_ns_per_packet": per(busy),
        "rss_bytes": pid.map(|p| usage::peak_rss(p).unwrap()),
        "sender_pps": sent as f64 / elapsed,
        "process_cpu_ns_per_packet": proc_ns.and_then(per),
        "latency_received": format!("{}/{count}", samples.len()),
        "note": "qemu TCG",
    });
    println!("EDGEPLANE-BENCH {row}");
}

fn buses(tag: &str) -> Netns {
    let ns = Netns::new(tag).unwrap();
    vxcan_pair(&ns, "a0", "a1", true).unwrap();
    vxcan_pair(&ns, "b0", "b1", true).unwrap();
    ns
}

fn agent(ns: &Netns, mode: &str) -> Engine {
    let config = format!(
        "[http]\nlisten = \"127.0.0.1:9464\"\n[can]\nmode = \"{mode}\"\n[[can.route]]\nname = \"bench\"\ningress = \"a0\"\nfilter = \"0:0\"\nto = {{ iface = \"b0\" }}\n"
    );
    Engine::Agent(Agent::start(ns, &config, "warn").unwrap())
}

#[test]
fn can_engines_side_by_side() {
    require_root();
    let ns = buses("cbk");
    let e = agent(&ns, "kernel");
    measure("edgeplane (can-gw)", &ns, &e);
    drop(e);
    drop(ns);

    let ns = buses("cbc");
    ns.exec(&["cangw", "-A", "-s", "a0", "-d", "b0"]).unwrap();
    measure("cangw (can-utils)", &ns, &Engine::Cangw);
    drop(ns);

    let ns = buses("cbu");
    let e = agent(&ns, "userspace");
    measure("socketcan (edgeplane userspace)", &ns, &e);
}
