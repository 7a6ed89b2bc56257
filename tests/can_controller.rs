//! CAN controller metrics against emulated controllers (run by `cargo xtask vm-test`, whose VM
//! has two Kvaser PCIcan cards, SJA1000 controllers, on one emulated CAN bus: can0 and can1).
//!
//! The controllers are moved into a test namespace with the agent; frames go from can0 to can1
//! over the emulated bus. Every controller metric must equal what the kernel says through
//! `ip -d -s -j link`, and the interface counters must equal the frames sent and received.

use std::time::{Duration, Instant};

use edgeplane_testbed::{agent::Agent, http, netns::Netns, require_root};
use edgeplane_tests::can::{Bus, Frame, vcan};

const CONTROLLERS: [&str; 2] = ["can0", "can1"];
const BITRATE: u32 = 500_000;
const FRAMES: u32 = 100;
/// can1's bit rate once it is stopped.
const NEW_BITRATE: u32 = 125_000;

/// The VM's controllers in a namespace of their own; back in the initial namespace once it is
/// gone (the kernel returns physical devices there).
struct Controllers {
    ns: Netns,
}

impl Controllers {
    fn take(tag: &str) -> Self {
        require_root();
        // A previous test's namespace may still be on its way out: its devices come back to
        // the initial namespace when the kernel has cleaned it up.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !CONTROLLERS.iter().all(|c| sysfs_exists(c)) {
            assert!(
                Instant::now() < deadline,
                "no CAN controllers can0 and can1: this test needs the VM of `cargo xtask \
                 vm-test` (qemu's kvaser_pci devices)"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let ns = Netns::new(tag).unwrap();
        for c in CONTROLLERS {
            let out = std::process::Command::new("ip")
                .args(["link", "set", c, "netns", &ns.name])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "moving {c}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            ns.ip(&[
                "link",
                "set",
                c,
                "type",
                "can",
                "bitrate",
                &BITRATE.to_string(),
            ])
            .unwrap();
            ns.ip(&["link", "set", c, "up"]).unwrap();
        }
        Self { ns }
    }

    fn agent(&self) -> Agent {
        // A counting route on each controller (and on vcan0): the config names them.
        let config = r#"[http]
listen = "127.0.0.1:9464"

[[can.route]]
name = "from-can0"
ingress = "can0"
filter = "0:0"
action = "count"

[[can.route]]
name = "from-can1"
ingress = "can1"
filter = "0:0"
action = "count"

[[can.route]]
name = "from-vcan0"
ingress = "vcan0"
filter = "0:0"
action = "count"
"#;
        Agent::start(&self.ns, config, "info").unwrap()
    }

    /// `ip -d -s -j link show dev IFACE`, parsed.
    fn ip_link(&self, iface: &str) -> serde_json::Value {
        let out = self
            .ns
            .ip(&["-d", "-s", "-j", "link", "show", "dev", iface])
            .unwrap();
        let mut links: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
        links.remove(0)
    }

    /// Checks every controller and interface gauge of `iface` in `text` against the kernel;
    /// returns the state the kernel reports.
    fn assert_metrics_match_kernel(&self, text: &str, iface: &str) -> String {
        let kernel = self.ip_link(iface);
        let linkinfo = &kernel["linkinfo"];
        assert_eq!(linkinfo["info_kind"], "can", "{kernel}");
        let data = &linkinfo["info_data"];
        let state = data["state"].as_str().unwrap().to_owned();
        for s in [
            "error_active",
            "error_warning",
            "error_passive",
            "bus_off",
            "stopped",
            "sleeping",
        ] {
            let expected = u64::from(state.to_lowercase().replace('-', "_") == s);
            assert_eq!(
                metric(
                    text,
                    &format!("edgeplane_can_controller_state{{iface=\"{iface}\",state=\"{s}\"}}")
                ),
                expected,
                "{iface}: kernel state {state}, metric for {s}"
            );
        }
        assert_eq!(
            metric(
                text,
                &format!("edgeplane_can_controller_bitrate_bits_per_second{{iface=\"{iface}\"}}")
            ),
            data["bittiming"]["bitrate"].as_u64().unwrap()
        );
        if let Some(berr) = data.get("berr_counter") {
            for (dir, key) in [("tx", "tx_errors"), ("rx", "rx_errors")] {
                assert_eq!(
                    metric(
                        text,
                        &format!("edgeplane_can_controller_{key}{{iface=\"{iface}\"}}")
                    ),
                    berr[dir].as_u64().unwrap(),
                    "{iface} {key}"
                );
            }
        }
        let xstats = &linkinfo["info_xstats"];
        for (ip_key, metric_name) in [
            ("bus_error", "bus_errors"),
            ("error_warning", "error_warning"),
            ("error_passive", "error_passive"),
            ("bus_off", "bus_off"),
            ("arbitration_lost", "arbitration_lost"),
            ("restarts", "restarts"),
        ] {
            assert_eq!(
                metric(
                    text,
                    &format!("edgeplane_can_controller_{metric_name}_total{{iface=\"{iface}\"}}")
                ),
                xstats[ip_key].as_u64().unwrap(),
                "{iface} {metric_name}: ip says {xstats}"
            );
        }
        // CAN interfaces carry no traffic of the stacks' own: the counters are exact.
        let stats = &kernel["stats64"];
        for (what, dir, key) in [
            ("receive_packets", "rx", "packets"),
            ("transmit_packets", "tx", "packets"),
            ("receive_bytes", "rx", "bytes"),
            ("transmit_bytes", "tx", "bytes"),
            ("receive_dropped", "rx", "dropped"),
            ("transmit_dropped", "tx", "dropped"),
            ("receive_errors", "rx", "errors"),
            ("transmit_errors", "tx", "errors"),
        ] {
            assert_eq!(
                interface_counter(text, iface, what),
                stats[dir][key].as_u64().unwrap(),
                "{iface} {what}: ip says {stats}"
            );
        }
        assert_eq!(
            metric(
                text,
                &format!("edgeplane_interface_tx_queue_length{{iface=\"{iface}\"}}")
            ),
            kernel["txqlen"].as_u64().unwrap()
        );
        assert_eq!(
            metric(
                text,
                &format!("edgeplane_interface_up{{iface=\"{iface}\"}}")
            ),
            u64::from(kernel["operstate"] == "UP"),
            "{iface}: operstate {}",
            kernel["operstate"]
        );
        state
    }
}

impl Controllers {
    /// Prints every controller series of `iface`: what the emulated device reports.
    fn log_controller(&self, text: &str, iface: &str) {
        let label = format!("iface=\"{iface}\"");
        let series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("edgeplane_can_controller_") && l.contains(&label))
            .filter(|l| !l.starts_with("edgeplane_can_controller_state") || l.ends_with(" 1"))
            .collect();
        eprintln!("{iface}: {}", series.join(", "));
    }
}

/// Whether the running kernel is `major.minor` or newer.
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap());
    (parts.next().unwrap(), parts.next().unwrap()) >= (major, minor)
}

fn sysfs_exists(iface: &str) -> bool {
    std::path::Path::new(&format!("/sys/class/net/{iface}")).exists()
}

fn metric(text: &str, series: &str) -> u64 {
    http::metric(text, series).unwrap() as u64
}

fn interface_counter(text: &str, iface: &str, what: &str) -> u64 {
    metric(
        text,
        &format!("edgeplane_interface_{what}_total{{iface=\"{iface}\"}}"),
    )
}

#[test]
fn controller_state_bitrate_and_counters_follow_the_kernel() {
    let c = Controllers::take("canc");
    // A virtual CAN device named by the config too: interface metrics, but no controller.
    vcan(&c.ns, "vcan0").unwrap();
    let agent = c.agent();
    let text = agent.scrape();
    for iface in CONTROLLERS {
        assert_eq!(c.assert_metrics_match_kernel(&text, iface), "ERROR-ACTIVE");
    }
    metric(&text, "edgeplane_interface_up{iface=\"vcan0\"}");
    assert!(
        !text.contains("edgeplane_can_controller_state{iface=\"vcan0\""),
        "vcan0 has no controller:\n{text}"
    );
    let counters = |text: &str| {
        [
            interface_counter(text, "can0", "transmit_packets"),
            interface_counter(text, "can0", "transmit_bytes"),
            interface_counter(text, "can1", "receive_packets"),
            interface_counter(text, "can1", "receive_bytes"),
        ]
    };
    let before = counters(&text);

    let (tx, rx) = (
        Bus::open(&c.ns, "can0").unwrap(),
        Bus::open(&c.ns, "can1").unwrap(),
    );
    let mut payload_bytes = 0u64;
    for i in 0..FRAMES {
        let f = Frame::classic(0x100 + (i % 0x100), &[i as u8; 8][..(i % 9) as usize]);
        // One at a time: the controller sends one frame per interrupt and a CAN netdev's
        // queue is 10 frames long, so a burst would be refused (ENOBUFS).
        tx.send(&f).unwrap();
        let got = (0..10).find_map(|_| rx.recv());
        assert_eq!(got, Some(f.clone()), "frame {i} did not arrive on can1");
        payload_bytes += f.data.len() as u64;
    }
    let text = agent.scrape();
    let after = counters(&text);
    let moved: Vec<u64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
    eprintln!(
        "{FRAMES} frames, {payload_bytes} payload bytes can0 -> can1: can0 tx packets/bytes, \
         can1 rx packets/bytes moved by {moved:?}"
    );
    // The SJA1000 driver counts a sent frame's bytes from the echo of the frame since 5.17;
    // before, it read them from the controller's frame information register, which in
    // operating mode holds the receive buffer's: on can0, which receives nothing here, 0.
    let can0_tx_bytes = if kernel_at_least(5, 17) {
        payload_bytes
    } else {
        0
    };
    assert_eq!(
        moved,
        [
            u64::from(FRAMES),
            can0_tx_bytes,
            u64::from(FRAMES),
            payload_bytes
        ]
    );
    for iface in CONTROLLERS {
        assert_eq!(c.assert_metrics_match_kernel(&text, iface), "ERROR-ACTIVE");
        c.log_controller(&text, iface);
    }

    // A stopped controller: can1 down. On a real bus can0's frames would then go
    // unacknowledged (a lone node): TEC climbs by 8 per attempt, error-passive at 128. qemu's
    // emulated bus has no acknowledgement and its SJA1000 no error counters (they read 0): the
    // frames count as sent and can0 stays error-active. Whatever the controller makes of it,
    // the metrics must say what the kernel says.
    c.ns.ip(&["link", "set", "can1", "down"]).unwrap();
    let can0_tx = interface_counter(&text, "can0", "transmit_packets");
    for i in 0..3u8 {
        tx.send(&Frame::classic(0x7f0, &[i])).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = agent.scrape();
    assert_eq!(c.assert_metrics_match_kernel(&text, "can1"), "STOPPED");
    let can0 = c.assert_metrics_match_kernel(&text, "can0");
    let sent = interface_counter(&text, "can0", "transmit_packets") - can0_tx;
    eprintln!("can0 after 3 frames with no receiver on the bus: state {can0}, {sent} counted sent");
    assert_eq!(
        (can0.as_str(), sent),
        ("ERROR-ACTIVE", 3),
        "qemu's CAN bus acknowledges every frame: has the emulation learnt bus errors?"
    );
    c.log_controller(&text, "can0");
    c.log_controller(&text, "can1");

    // The bit rate of a stopped controller changes; the metric follows.
    c.ns.ip(&[
        "link",
        "set",
        "can1",
        "type",
        "can",
        "bitrate",
        &NEW_BITRATE.to_string(),
    ])
    .unwrap();
    let text = agent.scrape();
    assert_eq!(c.assert_metrics_match_kernel(&text, "can1"), "STOPPED");
    assert_eq!(
        metric(
            &text,
            "edgeplane_can_controller_bitrate_bits_per_second{iface=\"can1\"}"
        ),
        u64::from(NEW_BITRATE)
    );
    assert_eq!(
        metric(
            &text,
            "edgeplane_can_controller_bitrate_bits_per_second{iface=\"can0\"}"
        ),
        u64::from(BITRATE)
    );
}
