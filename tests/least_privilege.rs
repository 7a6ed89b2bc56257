//! Least privilege: the agent forwards in the kernel as a non-root user that holds only the
//! capabilities configs/edgeplane.service grants it (ambient, as systemd's
//! AmbientCapabilities= gives them), and each of them is needed.
//!
//! sender --veth-- gateway (edgeplane as uid 64000) --veth-- receiver, like udp_forward_e2e.

use std::{
    collections::BTreeSet,
    ffi::CString,
    net::{SocketAddr, UdpSocket},
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
    sync::mpsc,
    time::{Duration, Instant},
};

use edgeplane_testbed::{
    agent::{Agent, Start},
    http,
    netns::{Line, Netns},
};

const N: u32 = 2000;
/// A user and group that exist nowhere else on the machine, as a dedicated system user would.
const UID: u32 = 64_123;

/// What the unit's AmbientCapabilities= grants, in setpriv's spelling.
const CAPABILITIES: [&str; 3] = ["bpf", "net_admin", "perfmon"];

fn config(mode: &str) -> String {
    format!(
        r#"[http]
listen = "127.0.0.1:9464"

[udp]
mode = "{mode}"

[[udp.forward]]
name = "lidar"
ingress = "g0"
match = {{ dst_port = 5000 }}
to = {{ iface = "g1", dst_ip = "{}", dst_port = 6000 }}

# Every stage of latency capture, so that each hook is attached without root.
[latency]
udp_ports = [6000]
"#,
        Line::RECEIVER_V4
    )
}

/// A bpffs of its own, owned by [`UID`] (as the unit's ExecStartPre hands /sys/fs/bpf/edgeplane
/// to the agent's user); unmounted on drop.
struct UserBpffs {
    dir: PathBuf,
}

impl UserBpffs {
    fn new(tag: &str) -> Self {
        let dir = PathBuf::from(format!("/run/edgeplane-tests/user-bpffs-{tag}"));
        let _ = umount(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        edgeplane_testbed::bpffs::mount(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(UID), Some(UID)).unwrap();
        Self { dir }
    }
}

fn umount(dir: &Path) -> std::io::Result<()> {
    let target = CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: umount2 of a NUL-terminated path.
    if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for UserBpffs {
    fn drop(&mut self) {
        let _ = umount(&self.dir);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// `setpriv` becoming [`UID`] with exactly `caps` (bounding, inheritable and ambient), under
/// an unlimited RLIMIT_MEMLOCK as the unit's LimitMEMLOCK=infinity sets it.
fn as_user(caps: &[&str]) -> Vec<String> {
    let set = |prefix: &str| {
        let mut s = format!("{prefix}-all");
        for c in caps {
            s.push_str(&format!(",+{c}"));
        }
        s
    };
    // A test runner without CAP_SYS_RESOURCE can't raise the limit: kernels from 5.11 on charge
    // BPF memory to the cgroup instead, and the agent runs with the limit it inherits.
    let memlock: &[&str] = if own_capability(24) {
        &["prlimit", "--memlock=unlimited:unlimited", "--"]
    } else {
        &[]
    };
    // `ip netns exec` mounts a fresh /sys, without the cgroup v2 hierarchy a systemd host has
    // at /sys/fs/cgroup (latency capture's socket delivery hooks there): mount it, as root and
    // only in this command's mount namespace, before becoming the user.
    let mut wrapper: Vec<String> = [
        "sh",
        "-c",
        "mount -t cgroup2 cgroup2 /sys/fs/cgroup && exec \"$@\"",
        "sh",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    wrapper.extend(memlock.iter().map(|s| (*s).to_owned()));
    wrapper.extend([
        "setpriv".to_owned(),
        format!("--reuid={UID}"),
        format!("--regid={UID}"),
        "--clear-groups".into(),
        set("--inh-caps="),
        set("--ambient-caps="),
        set("--bounding-set="),
        "--no-new-privs".into(),
        "--".into(),
    ]);
    wrapper
}

/// Whether this process holds capability number `cap`.
fn own_capability(cap: u32) -> bool {
    let eff = status(std::process::id(), "CapEff:");
    u64::from_str_radix(&eff, 16).is_ok_and(|m| m & (1 << cap) != 0)
}

fn start(line: &Line, mode: &str, bpffs: &UserBpffs, caps: &[&str]) -> anyhow::Result<Agent> {
    let wrapper = as_user(caps);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let opts = Start {
        bpffs: Some(bpffs.dir.join("edgeplane")),
        ..Start::default()
    };
    Agent::start_wrapped(&line.gateway, &config(mode), "info", &opts, &wrapper)
}

/// A line of `/proc/<pid>/status`.
fn status(pid: u32, field: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_owned()))
        .unwrap_or_else(|| panic!("{field} missing from /proc/{pid}/status"))
}

fn cap_mask(caps: &[&str]) -> u64 {
    caps.iter()
        .map(|c| match *c {
            "net_admin" => 1 << 12,
            "perfmon" => 1 << 38,
            "bpf" => 1 << 39,
            other => panic!("unknown capability {other}"),
        })
        .fold(0, |a, b| a | b)
}

fn exchange(line: &Line) -> BTreeSet<u32> {
    let from: SocketAddr = format!("{}:4000", Line::SENDER_V4).parse().unwrap();
    let gw: SocketAddr = format!("{}:5000", Line::GATEWAY_IN_V4).parse().unwrap();
    let rx: SocketAddr = format!("{}:6000", Line::RECEIVER_V4).parse().unwrap();
    std::thread::scope(|s| {
        let (ready_tx, ready_rx) = mpsc::channel();
        let receiver = s.spawn(|| receive(&line.receiver, rx, ready_tx));
        ready_rx.recv().unwrap();
        send(&line.sender, from, gw);
        receiver.join().unwrap()
    })
}

fn send(ns: &Netns, from: SocketAddr, to: SocketAddr) {
    let _in = ns.enter().unwrap();
    let sock = UdpSocket::bind(from).unwrap();
    let start = Instant::now();
    for seq in 0..N {
        sock.send_to(&seq.to_be_bytes(), to).unwrap();
        // Bursts of 10: a burst of 50 a millisecond overran g0's 256-frame XDP ring whenever
        // an emulated guest's NAPI ran late (1,727 of 2,000 arrived once, all lost before g0).
        if seq % 10 == 9 {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "sending took too long"
        );
    }
}

fn receive(ns: &Netns, bind: SocketAddr, ready: mpsc::Sender<()>) -> BTreeSet<u32> {
    let _in = ns.enter().unwrap();
    let sock = edgeplane_testbed::bind_udp_receiver(bind).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    ready.send(()).unwrap();
    let mut seen = BTreeSet::new();
    let mut buf = [0u8; 64];
    while let Ok((4, _)) = sock.recv_from(&mut buf) {
        seen.insert(u32::from_be_bytes(buf[..4].try_into().unwrap()));
        if seen.len() == N as usize {
            break;
        }
    }
    seen
}

fn forwards_without_root(mode: &str) {
    edgeplane_testbed::require_root();
    let line = Line::new(&format!("lp{mode}")).unwrap();
    let _peer_xdp = (mode == "xdp").then(|| {
        line.prepare_for_xdp().unwrap();
        edgeplane_tests::xdp_pass::attach(&line.receiver, "r0").unwrap()
    });
    line.resolve_neighbours().unwrap();
    let bpffs = UserBpffs::new(mode);
    let mut agent = start(&line, mode, &bpffs, &CAPABILITIES).unwrap();

    // The process that forwards is the user, with the unit's capabilities and no others.
    let pid = agent.pid();
    let uids = status(pid, "Uid:");
    assert!(
        uids.split_whitespace().all(|u| u == UID.to_string()),
        "Uid: {uids}"
    );
    let mask = format!("{:016x}", cap_mask(&CAPABILITIES));
    for field in ["CapEff:", "CapPrm:", "CapAmb:", "CapBnd:"] {
        assert_eq!(status(pid, field), mask, "{field}");
    }
    assert_eq!(status(pid, "NoNewPrivs:"), "1");

    let got = exchange(&line);
    let metrics = agent.scrape();
    let log = agent.stop_and_log().unwrap();
    assert_eq!(
        got.len(),
        N as usize,
        "{mode}: {} of {N} datagrams arrived\n{}\nagent log:\n{log}",
        got.len(),
        line.drop_counters()
    );
    assert_eq!(
        http::metric(
            &metrics,
            "edgeplane_udp_forward_packets_total{rule=\"lidar\"}"
        )
        .unwrap(),
        f64::from(N),
        "{metrics}"
    );
    let attached = format!("edgeplane_udp_forward_attached{{iface=\"g0\",hook=\"{mode}\"}}");
    assert_eq!(http::metric(&metrics, &attached).unwrap(), 1.0, "{metrics}");
    // Latency capture works as the user too: every datagram's forwarding is measured, and so
    // are both delivery stages (no hook needs root or tracefs; from 6.10 most reads are not
    // traced, see `udp_reads_are_traced`).
    assert!(!log.contains("not measured"), "{log}");
    assert!(!log.contains("latency capture:"), "{log}");
    assert_eq!(
        http::metric(
            &metrics,
            "edgeplane_udp_forward_latency_seconds_count{rule=\"lidar\"}"
        )
        .unwrap(),
        f64::from(N),
        "{metrics}"
    );
    let stages: &[&str] = if edgeplane_tests::udp_reads_are_traced() {
        &["queued", "read"]
    } else {
        &["queued"]
    };
    for stage in stages {
        let delivered = http::metric(
            &metrics,
            &format!(
                "edgeplane_socket_delivery_latency_seconds_count{{proto=\"udp\",port=\"6000\",stage=\"{stage}\"}}"
            ),
        )
        .unwrap_or(0.0);
        assert!(delivered > 0.0, "{stage}: nothing measured\n{metrics}");
    }
    // What it pinned belongs to the user, and `--detach-on-exit` could remove it all again.
    assert!(
        !bpffs.dir.join("edgeplane").exists(),
        "pins left behind: {log}"
    );
}

#[test]
fn forwards_at_tc_as_a_user_with_only_the_units_capabilities() {
    forwards_without_root("tc");
}

#[test]
fn forwards_at_xdp_as_a_user_with_only_the_units_capabilities() {
    forwards_without_root("xdp");
}

/// Without any one of the capabilities, an agent told to forward in the kernel refuses to
/// start and says what it lacks: the set is minimal.
#[test]
fn each_capability_is_needed() {
    edgeplane_testbed::require_root();
    let line = Line::new("lpmin").unwrap();
    line.resolve_neighbours().unwrap();
    let bpffs = UserBpffs::new("min");
    let mut failures = Vec::new();
    for lacking in CAPABILITIES {
        let caps: Vec<&str> = CAPABILITIES
            .iter()
            .copied()
            .filter(|c| *c != lacking)
            .collect();
        match start(&line, "tc", &bpffs, &caps) {
            Ok(mut agent) => {
                let log = agent.stop_and_log().unwrap();
                failures.push(format!("started without cap_{lacking}:\n{log}"));
            }
            Err(e) => println!("without cap_{lacking}: {e:#}"),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
