//! systemd integration: the unit file passes `systemd-analyze verify`, and the agent speaks
//! sd_notify to a real unix datagram socket the way systemd expects of a Type=notify service
//! with a watchdog.

use std::{
    os::unix::net::UnixDatagram,
    process::Command,
    time::{Duration, Instant},
};

use edgeplane_testbed::{
    agent::{Agent, Start},
    netns::Netns,
};

/// One datagram from the agent, and when it came.
struct Message {
    text: String,
    at: Instant,
}

/// Receives (and timestamps at once) until STOPPING=1 or `limit`.
fn receive(socket: UnixDatagram, limit: Duration) -> Vec<Message> {
    let until = Instant::now() + limit;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        socket
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match socket.recv(&mut buf) {
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let stopping = text == "STOPPING=1";
                out.push(Message {
                    text,
                    at: Instant::now(),
                });
                if stopping {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("recv: {e}"),
        }
    }
    out
}

/// The messages other than watchdog pings, with MONOTONIC_USEC's value blanked.
fn states(messages: &[Message]) -> Vec<String> {
    messages
        .iter()
        .filter(|m| m.text != "WATCHDOG=1")
        .map(|m| {
            m.text
                .lines()
                .map(|l| match l.split_once('=') {
                    Some(("MONOTONIC_USEC", v)) => {
                        assert!(v.parse::<u64>().is_ok_and(|v| v > 0), "{l}");
                        "MONOTONIC_USEC=*".to_owned()
                    }
                    _ => l.to_owned(),
                })
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect()
}

#[test]
fn notifies_ready_status_watchdog_reload_and_stopping() {
    edgeplane_testbed::require_root();
    let ns = Netns::new("sdn").unwrap();
    ns.ip(&["link", "add", "a0", "type", "veth", "peer", "name", "b0"])
        .unwrap();
    // A path socket: the agent reaches it from its own network namespace (an abstract one is
    // per namespace; the unit tests cover those).
    let path = std::env::temp_dir().join(format!("{}.notify", ns.name));
    let _ = std::fs::remove_file(&path);
    let socket = UnixDatagram::bind(&path).unwrap();
    let receiver = std::thread::spawn(move || receive(socket, Duration::from_secs(30)));
    let config = "[udp]\nmode = \"tc\"\n\n[[udp.forward]]\nname = \"lidar\"\ningress = \"a0\"\n\
                  match = { dst_port = 5000 }\nto = { iface = \"b0\", dst_port = 6000 }\n";
    // A 1 s watchdog: pings every 500 ms.
    let env = [
        ("NOTIFY_SOCKET", path.to_str().unwrap()),
        ("WATCHDOG_USEC", "1000000"),
    ];
    let start = Start {
        env: env.map(|(k, v)| (k.to_owned(), v.to_owned())).to_vec(),
        ..Start::default()
    };
    let mut agent = Agent::start_with(&ns, config, "info", &start).unwrap();

    std::thread::sleep(Duration::from_millis(2600));
    agent.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(600));
    let log = agent.stop_and_log().unwrap();
    let messages = receiver.join().unwrap();
    let _ = std::fs::remove_file(&path);

    let ready = "READY=1\nSTATUS=forwarding: 1 UDP rules, 0 CAN routes";
    assert_eq!(
        states(&messages),
        [ready, "RELOADING=1\nMONOTONIC_USEC=*", ready, "STOPPING=1"],
        "agent log:\n{log}"
    );
    // READY comes before the first ping, STOPPING after the last one.
    assert_eq!(messages[0].text, ready);
    assert_eq!(messages.last().unwrap().text, "STOPPING=1");

    let pings: Vec<Instant> = messages
        .iter()
        .filter(|m| m.text == "WATCHDOG=1")
        .map(|m| m.at)
        .collect();
    let gaps: Vec<Duration> = pings.windows(2).map(|w| w[1] - w[0]).collect();
    println!("watchdog pings {} apart", format_gaps(&gaps));
    // One ping per 500 ms from READY to STOPPING, the first at once.
    let ran = messages.last().unwrap().at - messages[0].at;
    let expected = (ran.as_millis() / 500 + 1) as usize;
    assert!(
        pings.len().abs_diff(expected) <= 1,
        "{} pings in {ran:?}, expected {expected}",
        pings.len()
    );
    for gap in &gaps {
        assert!(
            (Duration::from_millis(350)..Duration::from_millis(700)).contains(gap),
            "pings {} apart, expected 500 ms",
            format_gaps(&gaps)
        );
    }
}

fn format_gaps(gaps: &[Duration]) -> String {
    gaps.iter()
        .map(|g| format!("{} ms", g.as_millis()))
        .collect::<Vec<_>>()
        .join(", ")
}

#[test]
fn unit_file_verifies() {
    let workspace = edgeplane_testbed::workspace();
    let unit = std::fs::read_to_string(workspace.join("configs/edgeplane.service")).unwrap();
    for line in [
        "Type=notify",
        "WatchdogSec=30s",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "ExecStart=/usr/local/bin/edgeplane run --config /etc/edgeplane/edgeplane.toml --bpffs /run/edgeplane/bpffs",
        "NoNewPrivileges=yes",
        "User=edgeplane",
        // tests/least_privilege.rs forwards with exactly these.
        "AmbientCapabilities=CAP_BPF CAP_NET_ADMIN CAP_PERFMON",
        "CapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN CAP_PERFMON",
        "SystemCallFilter=bpf perf_event_open",
        "MemoryDenyWriteExecute=yes",
    ] {
        assert!(unit.lines().any(|l| l == line), "`{line}` missing");
    }
    // verify insists that ExecStart exists: point a copy at the binary the tests use.
    let bin = edgeplane_testbed::agent::binary();
    assert!(
        bin.is_file(),
        "{} missing: cargo build --release",
        bin.display()
    );
    let dir = std::env::temp_dir().join(format!("edgeplane-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("edgeplane.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/local/bin/edgeplane", bin.to_str().unwrap()),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("systemd-analyze (apt-get install systemd)");
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // verify exits 0 on directives it ignores, but names them: any output is a finding.
    assert!(out.status.success() && stderr.trim().is_empty(), "{stderr}");
}

/// The unit's exposure as `systemd-analyze security` rates it (0 safest, 10 unsafe): 3.0 or
/// lower. The hardening added for it is checked against the agent by tests/least_privilege.rs
/// (user, capabilities) and the unit's comments (system calls seen under strace).
#[test]
fn unit_exposure_is_at_most_3() {
    let unit = edgeplane_testbed::workspace().join("configs/edgeplane.service");
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze (apt-get install systemd)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let score: f64 = stdout
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for edgeplane.service: "))
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no exposure level in:\n{stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    println!("exposure {score}");
    assert!(score <= 3.0, "exposure {score} > 3.0:\n{stdout}");
}
