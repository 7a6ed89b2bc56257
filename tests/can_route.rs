//! can_route inside a real kernel with CAN (run by `cargo xtask vm-test`): a test bus sends on
//! one end of a vxcan pair, the agent routes from the other end to a second pair, the test reads
//! there. Every frame is compared byte for byte; the agent's counters must match exactly.

use std::time::{Duration, Instant};

use edgeplane_common::can::{CAN_EFF_FLAG, CAN_RTR_FLAG};
use edgeplane_testbed::{
    agent::{self, Agent},
    http,
    netns::Netns,
    require_root,
};
use edgeplane_tests::{
    can::{Bus, Frame, assert_same_frames_in_id_order, vcan, vxcan_pair},
    state_record::{Damage, damage as damage_record},
};

/// A namespace with bus A (agent side `a0`, test side `a1`), bus B (`b0`/`b1`), both CAN FD,
/// and a classic-only bus C (`c0`/`c1`).
struct Buses {
    ns: Netns,
}

impl Buses {
    fn new(tag: &str) -> Self {
        require_root();
        let ns = Netns::new(tag).unwrap();
        vxcan_pair(&ns, "a0", "a1", true).unwrap();
        vxcan_pair(&ns, "b0", "b1", true).unwrap();
        vxcan_pair(&ns, "c0", "c1", false).unwrap();
        Self { ns }
    }

    fn agent(&self, can: &str) -> Agent {
        let config = format!("[http]\nlisten = \"127.0.0.1:9464\"\n\n{can}");
        Agent::start(&self.ns, &config, "info").unwrap()
    }

    fn bus(&self, iface: &str) -> Bus {
        Bus::open(&self.ns, iface).unwrap()
    }
}

fn metric(m: &str, series: &str) -> f64 {
    http::metric(m, series).unwrap()
}

const QUIET: Duration = Duration::from_millis(500);
const LIMIT: Duration = Duration::from_secs(20);

#[test]
fn routes_what_the_filter_matches_classic_fd_extended_and_remote() {
    let b = Buses::new("canf");
    let agent = b.agent(
        r#"[[can.route]]
name = "body"
ingress = "a0"
filter = "100:7F0"
to = { iface = "b0" }

[[can.route]]
name = "j1939"
ingress = "a0"
filter = "18FEF100:1FFFFF00"
to = { iface = "b0" }
"#,
    );
    let (tx, rx) = (b.bus("a1"), b.bus("b1"));
    let mut sent_match = Vec::new();
    let mut sent = 0;
    for i in 0..16u32 {
        // 0x100..0x10F match the first route; 0x110.. do not.
        let f = Frame::classic(0x100 + i, &[i as u8; 8][..(i % 9) as usize]);
        tx.send(&f).unwrap();
        sent += 1;
        sent_match.push(f);
        let miss = Frame::classic(0x110 + i, &[0xee; 4]);
        tx.send(&miss).unwrap();
        sent += 1;
    }
    let fd = Frame::fd(0x105, &(0..64).collect::<Vec<u8>>());
    let eff = Frame::fd(
        0x18FE_F1AA | CAN_EFF_FLAG,
        &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
    );
    let eff_miss = Frame::classic(0x18FE_F2AA | CAN_EFF_FLAG, &[9]);
    // candump semantics: "100:7F0" leaves the EFF flag out of the mask, so the extended ID
    // 0x100 matches it too (a standard 0x100 does not match the 8-digit extended filter).
    let eff_0x100 = Frame::classic(0x100 | CAN_EFF_FLAG, &[7]);
    let remote = Frame {
        can_id: 0x101 | CAN_RTR_FLAG,
        fd: false,
        flags: 0,
        len: 4,
        data: vec![],
    };
    for f in [&fd, &eff, &eff_miss, &eff_0x100, &remote] {
        tx.send(f).unwrap();
        sent += 1;
    }
    sent_match.extend([fd, eff, eff_0x100, remote]);

    let got = rx.collect(QUIET, LIMIT);
    assert_eq!(
        got.len(),
        sent_match.len(),
        "routed {} frames, expected {}",
        got.len(),
        sent_match.len()
    );
    for (g, s) in got.iter().zip(&sent_match) {
        assert_eq!(g, s, "routed frame differs");
    }
    let m = agent.scrape();
    assert_eq!(
        metric(&m, "edgeplane_can_frames_total{rule=\"body\"}"),
        19.0
    );
    assert_eq!(
        metric(&m, "edgeplane_can_routed_total{rule=\"body\"}"),
        19.0,
        "{}",
        agent.log_so_far()
    );
    assert_eq!(
        metric(&m, "edgeplane_can_frames_total{rule=\"j1939\"}"),
        1.0
    );
    assert_eq!(
        metric(&m, "edgeplane_can_routed_total{rule=\"j1939\"}"),
        1.0
    );
    let kinds = ["classic", "fd", "rtr"].map(|k| {
        metric(
            &m,
            &format!("edgeplane_can_ingress_frames_total{{iface=\"a0\",kind=\"{k}\"}}"),
        )
    });
    assert_eq!(kinds[0] + kinds[1], f64::from(sent));
    assert_eq!((kinds[1], kinds[2]), (2.0, 1.0));
    eprintln!("sent {sent} frames, routed 20 (body 19, j1939 1), each byte-identical");
}

#[test]
fn modifications_and_checksums_are_applied_like_cangw() {
    let b = Buses::new("canm");
    // Listed out of order on purpose: AND, OR, XOR, SET always apply in that order.
    let agent = b.agent(
        r#"[[can.route]]
name = "mod"
ingress = "a0"
filter = "200:700"
to = { iface = "b0" }
modify = [
  { op = "set", id = 0x3A0 },
  { op = "xor", data = "FF" },
  { op = "or", data = "0001" },
  { op = "and", id = 0x0FF, data = "0F0F" },
]
checksum = { crc8 = { from = 0, to = 5, result = 6, init = 0xFF, final_xor = 0xFF }, xor = { from = 0, to = -2, result = -1, init = 0x5A } }
"#,
    );
    let (tx, rx) = (b.bus("a1"), b.bus("b1"));
    let input = [0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0];
    tx.send(&Frame::classic(0x234, &input)).unwrap();
    let got = rx.collect(QUIET, LIMIT);
    assert_eq!(got.len(), 1, "{got:?}");

    // By hand: data[0] = ((0x12 & 0x0F) | 0x00) ^ 0xFF, data[1] = (0x34 & 0x0F) | 0x01;
    // the id is ANDed then SET, so SET wins. Then CRC8 over data[0..=5] into data[6] (SAE
    // J1850 polynomial 0x1D), then XOR over data[0..=6] into data[7].
    let mut d = input;
    #[expect(
        clippy::identity_op,
        reason = "written as the route's and, or and xor steps"
    )]
    {
        d[0] = ((0x12 & 0x0f) | 0x00) ^ 0xff;
    }
    d[1] = (0x34 & 0x0f) | 0x01;
    let table = crc8_table(0x1d);
    d[6] = d[..=5]
        .iter()
        .fold(0xffu8, |c, b| table[usize::from(c ^ b)])
        ^ 0xff;
    d[7] = d[..=6].iter().fold(0x5au8, |x, b| x ^ b);
    assert_eq!(got[0], Frame::classic(0x3A0, &d));
    let m = agent.scrape();
    assert_eq!(metric(&m, "edgeplane_can_routed_total{rule=\"mod\"}"), 1.0);
}

fn crc8_table(poly: u8) -> [u8; 256] {
    std::array::from_fn(|i| {
        (0..8).fold(i as u8, |c, _| {
            if c & 0x80 != 0 {
                (c << 1) ^ poly
            } else {
                c << 1
            }
        })
    })
}

#[test]
fn drop_inverted_filter_fd_to_classic_and_bad_length() {
    let b = Buses::new("cand");
    let agent = b.agent(
        r#"[[can.route]]
name = "hide"
ingress = "a0"
filter = "7DF:7FF"
action = "drop"

[[can.route]]
name = "not-7df"
ingress = "a0"
filter = "7DF~7FF"
to = { iface = "c0" }

[[can.route]]
name = "grow"
ingress = "a0"
filter = "300:7FF"
to = { iface = "b0" }
modify = [ { op = "or", len = 0x40 } ]
"#,
    );
    let tx = b.bus("a1");
    // A local application on the ingress bus: dropped frames must not reach it.
    let local = b.bus("a0");
    let (to_c, to_b) = (b.bus("c1"), b.bus("b1"));
    tx.send(&Frame::classic(0x7DF, &[2, 1, 0])).unwrap();
    tx.send(&Frame::classic(0x123, &[1])).unwrap();
    // CAN FD frames can't go to the classic-only bus C.
    tx.send(&Frame::fd(0x124, &[1; 16])).unwrap();
    // 16 | 0x40 = 80 bytes: no CAN FD length, so can-gw deletes it.
    tx.send(&Frame::fd(0x300, &[3; 16])).unwrap();
    tx.send(&Frame::classic(0x301, &[3; 8])).unwrap();

    let seen_locally: Vec<u32> = local
        .collect(QUIET, LIMIT)
        .iter()
        .map(|f| f.can_id)
        .collect();
    assert!(
        !seen_locally.contains(&0x7DF),
        "dropped frame reached a local socket: {seen_locally:x?}"
    );
    assert!(seen_locally.contains(&0x123));
    assert_eq!(
        to_c.collect(QUIET, LIMIT),
        vec![Frame::classic(0x123, &[1]), Frame::classic(0x301, &[3; 8])]
    );
    let on_b = to_b.collect(QUIET, LIMIT);
    assert!(
        on_b.is_empty(),
        "a frame made invalid by a modification reached bus B: {on_b:?}"
    );
    let m = agent.scrape();
    let dropped = |rule: &str, reason: &str| {
        metric(
            &m,
            &format!("edgeplane_can_dropped_total{{rule=\"{rule}\",reason=\"{reason}\"}}"),
        )
    };
    assert_eq!(dropped("hide", "rule"), 1.0);
    assert_eq!(dropped("not-7df", "fd_to_classic"), 2.0);
    assert_eq!(
        metric(&m, "edgeplane_can_routed_total{rule=\"not-7df\"}"),
        2.0
    );
    assert_eq!(
        dropped("grow", "gateway_deleted"),
        1.0,
        "{}",
        agent.log_so_far()
    );
}

/// can-gw's hop limit: a chain of four virtual buses, each routed to the next with echo (so the
/// next route receives it). A frame goes `hops` steps down the chain and is then deleted.
/// (A loop back to the frame's first bus is broken earlier: can-gw never sends a frame back
/// to the interface it came from.)
#[test]
fn hop_limit_ends_chains_of_routes() {
    for hops in [1u8, 2] {
        let b = Buses::new("canh");
        for v in ["v0", "v1", "v2", "v3"] {
            vcan(&b.ns, v).unwrap();
        }
        let route = |name: &str, from: &str, to: &str| {
            format!(
                "[[can.route]]\nname = \"{name}\"\ningress = \"{from}\"\nfilter = \"0:0\"\nto = {{ iface = \"{to}\", echo = true }}\nhops = {hops}\n\n"
            )
        };
        let agent = b.agent(
            &(route("ab", "v0", "v1") + &route("bc", "v1", "v2") + &route("cd", "v2", "v3")),
        );
        b.bus("v0").send(&Frame::classic(0x42, &[1, 2])).unwrap();
        std::thread::sleep(Duration::from_millis(500));
        let m = agent.scrape();
        let routed: Vec<f64> = ["ab", "bc", "cd"]
            .iter()
            .map(|r| metric(&m, &format!("edgeplane_can_routed_total{{rule=\"{r}\"}}")))
            .collect();
        let deleted: f64 = ["ab", "bc", "cd"]
            .iter()
            .map(|r| {
                metric(
                    &m,
                    &format!(
                        "edgeplane_can_dropped_total{{rule=\"{r}\",reason=\"gateway_deleted\"}}"
                    ),
                )
            })
            .sum();
        let expected: Vec<f64> = (0..3)
            .map(|i| if i < usize::from(hops) { 1.0 } else { 0.0 })
            .collect();
        assert_eq!(routed, expected, "hops {hops}:\n{}", agent.log_so_far());
        assert_eq!(
            deleted, 1.0,
            "hops {hops}: the frame must be deleted at the limit"
        );
        eprintln!("hops = {hops}: routed along {routed:?}, then deleted");
    }
}

#[test]
fn cycle_times_are_measured_against_the_period() {
    let b = Buses::new("canc");
    let agent = b.agent(
        r#"[[can.watch]]
iface = "a0"
id = 0x123
period_ms = 10

[[can.watch]]
iface = "a0"
id = 0x18DAF110
period_ms = 10
tolerance = 1.5
"#,
    );
    let (tx, rx) = (b.bus("a1"), b.bus("a0"));
    // 0x123 on time every 10 ms; the extended ID every 20 ms, twice as slow as expected.
    // Under emulation the sender's sleeps overrun now and then, and tc ingress may run a few
    // ms after the write. So the test brackets the moment tc ingress stamps each frame
    // (after the write began, before a reader on a0, which tc ingress precedes, has it), and
    // the kernel's figures must lie within what those brackets allow.
    let (on_time_id, slow_id) = (0x123, 0x18DA_F110 | CAN_EFF_FLAG);
    let send = |id: u32, data: &[u8]| {
        let before = Instant::now();
        tx.send(&Frame::classic(id, data)).unwrap();
        while rx.recv().expect("a frame written on a1 reaches a0").can_id != id {}
        Stamp {
            before,
            after: Instant::now(),
        }
    };
    let (mut on_time_at, mut slow_at) = (Vec::new(), Vec::new());
    let start = Instant::now();
    for i in 0..200u32 {
        let due = start + Duration::from_millis(10 * u64::from(i));
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        on_time_at.push(send(on_time_id, &i.to_le_bytes()));
        if i % 2 == 0 {
            slow_at.push(send(slow_id, &[0; 8]));
        }
    }
    std::thread::sleep(Duration::from_millis(100));
    let m = agent.scrape();
    let s = |series: &str| metric(&m, series);
    // Late by the watch's deadline (period × the default tolerance 1.5).
    let late = (0.015, f64::INFINITY);

    let on_time = "iface=\"a0\",id=\"123\"";
    let gaps = Gaps::between(&on_time_at);
    assert_eq!(
        s(&format!("edgeplane_can_id_frames_total{{{on_time}}}")),
        200.0
    );
    assert_eq!(
        s(&format!("edgeplane_can_cycle_seconds_count{{{on_time}}}")),
        199.0
    );
    let sum = s(&format!("edgeplane_can_cycle_seconds_sum{{{on_time}}}"));
    // 10 ms lies in the bucket (8.39 ms, 16.78 ms].
    let below = s(&format!(
        "edgeplane_can_cycle_seconds_bucket{{{on_time},le=\"0.008388608\"}}"
    ));
    let within = s(&format!(
        "edgeplane_can_cycle_seconds_bucket{{{on_time},le=\"0.016777216\"}}"
    )) - below;
    let missed = s(&format!("edgeplane_can_deadline_missed_total{{{on_time}}}"));
    let sent_sum = gaps.total();
    let sent_within = gaps.count((0.008388608, 0.016777216));
    let sent_late = gaps.count(late);
    eprintln!(
        "0x123 at 10 ms: mean cycle {:.3} ms (as sent {:.3}..{:.3}), {within} of 199 in \
         (8.4, 16.8] ms (as sent {sent_within:?}), {missed} missed deadlines (as sent {sent_late:?})",
        sum / 199.0 * 1e3,
        sent_sum.0 / 199.0 * 1e3,
        sent_sum.1 / 199.0 * 1e3,
    );
    assert!(
        (sent_sum.0..=sent_sum.1).contains(&sum),
        "cycles sum to {sum} s, {sent_sum:?} s as sent"
    );
    assert!(
        (sent_within.0..=sent_within.1).contains(&within),
        "{within} of 199 cycles in (8.4, 16.8] ms, {sent_within:?} as sent\n{m}"
    );
    assert!(
        (sent_late.0..=sent_late.1).contains(&missed),
        "{missed} deadlines missed, {sent_late:?} gaps over 15 ms as sent"
    );
    // The sender kept its period most of the time, or the figures above say little. An
    // emulated arm64 guest keeps it far less often (46 of 199 on 6.1, with 75 late gaps, both
    // measured alike by the kernel): a tenth there.
    let kept = if agent::foreign_cpu() { 20.0 } else { 100.0 };
    assert!(
        sent_within.0 >= kept,
        "the sender surely kept its 10 ms only {} times",
        sent_within.0
    );

    let slow = "iface=\"a0\",id=\"18DAF110\"";
    let gaps = Gaps::between(&slow_at);
    let slow_missed = s(&format!("edgeplane_can_deadline_missed_total{{{slow}}}"));
    let slow_cycles = s(&format!("edgeplane_can_cycle_seconds_count{{{slow}}}"));
    let slow_jitter = s(&format!("edgeplane_can_jitter_seconds_sum{{{slow}}}"));
    let sent_late = gaps.count(late);
    let sent_jitter = gaps.jitter(0.010);
    eprintln!(
        "0x18DAF110 at 20 ms, expected 10 ms: {slow_missed} of {slow_cycles} missed (as sent \
         {sent_late:?}), mean jitter {:.3} ms (as sent {:.3}..{:.3})",
        slow_jitter / 99.0 * 1e3,
        sent_jitter.0 / 99.0 * 1e3,
        sent_jitter.1 / 99.0 * 1e3,
    );
    assert_eq!(slow_cycles, 99.0);
    assert!(
        (sent_late.0..=sent_late.1).contains(&slow_missed),
        "{slow_missed} of 99 late frames counted, {sent_late:?} as sent"
    );
    assert!(
        (sent_jitter.0..=sent_jitter.1).contains(&slow_jitter),
        "jitter sums to {slow_jitter} s, {sent_jitter:?} s as sent"
    );
    // Most gaps were surely late, or the count says little. A loaded TCG host leaves 86..99
    // of 99 so; an emulated arm64 guest fewer.
    let surely = if agent::foreign_cpu() { 25.0 } else { 70.0 };
    assert!(
        sent_late.0 >= surely,
        "only {} of 99 gaps were surely late",
        sent_late.0
    );
    assert_eq!(
        s(&format!("edgeplane_can_expected_period_seconds{{{slow}}}")),
        0.01
    );
}

/// When tc ingress can have stamped a frame: after its write began, before a reader had it.
struct Stamp {
    before: Instant,
    after: Instant,
}

/// The shortest and the longest each gap between consecutive frames can have been for tc
/// ingress, in seconds.
struct Gaps<'a> {
    at: &'a [Stamp],
    bounds: Vec<(f64, f64)>,
}

impl<'a> Gaps<'a> {
    /// bpf_ktime_get_ns reads the monotonic clock through its NMI-safe fast path, which may
    /// lag clock_gettime by a few µs.
    const CLOCKS_APART: f64 = 50e-6;

    fn between(at: &'a [Stamp]) -> Self {
        let bounds = (at.windows(2)).map(|w| Self::apart(&w[0], &w[1])).collect();
        Self { at, bounds }
    }

    fn apart(first: &Stamp, then: &Stamp) -> (f64, f64) {
        let shortest = then.before.saturating_duration_since(first.after);
        let longest = then.after - first.before;
        (
            shortest.as_secs_f64() - Self::CLOCKS_APART,
            longest.as_secs_f64() + Self::CLOCKS_APART,
        )
    }

    /// How many gaps surely, and how many possibly, lie in the range (low, high].
    fn count(&self, (low, high): (f64, f64)) -> (f64, f64) {
        let n =
            |f: &dyn Fn(f64, f64) -> bool| self.bounds.iter().filter(|(a, b)| f(*a, *b)).count();
        (
            n(&|a, b| a > low && b <= high) as f64,
            n(&|a, b| b > low && a <= high) as f64,
        )
    }

    /// The least and the most all gaps can sum to: from the first frame to the last.
    fn total(&self) -> (f64, f64) {
        Self::apart(&self.at[0], &self.at[self.at.len() - 1])
    }

    /// The least and the most the gaps' distances from `period` can sum to.
    fn jitter(&self, period: f64) -> (f64, f64) {
        (self.bounds.iter()).fold((0.0, 0.0), |(least, most), &(a, b)| {
            let nearest = if (a..=b).contains(&period) {
                0.0
            } else {
                (a - period).abs().min((b - period).abs())
            };
            (
                least + nearest,
                most + (a - period).abs().max((b - period).abs()),
            )
        })
    }
}

/// can-gw's jobs in `ns` as the kernel lists them, in a stable order.
fn can_gw_jobs(ns: &Netns) -> Vec<edgeplane::can::gateway::Job> {
    let _in = ns.enter().unwrap();
    let mut gw = edgeplane::can::gateway::Gateway::open().unwrap();
    let mut jobs: Vec<_> = gw.dump().unwrap().into_iter().map(|(_, j)| j).collect();
    jobs.sort_by_key(|j| (j.src_ifindex, j.dst_ifindex, j.flags, j.filter_id, j.uid));
    jobs
}

/// The agent's can-gw client against the real kernel: add a job, route a frame, read its
/// counters from a dump, remove the job.
#[test]
fn gateway_client_adds_dumps_and_removes_jobs() {
    use edgeplane::can::gateway::{Gateway, Job, UID_PREFIX};
    let b = Buses::new("cangw");
    let _in = b.ns.enter().unwrap();
    let (src, dst) = (b.ns.ifindex("a0").unwrap(), b.ns.ifindex("b0").unwrap());
    let job = Job {
        uid: UID_PREFIX | 0x42,
        src_ifindex: src,
        dst_ifindex: dst,
        filter_id: 0,
        filter_mask: 0,
        flags: 0,
        hops: 1,
        mods: vec![],
        xor: None,
        crc8: None,
    };
    let mut gw = Gateway::open().unwrap();
    gw.add(&job).unwrap();
    let (tx, rx) = (b.bus("a1"), b.bus("b1"));
    tx.send(&Frame::classic(0x7, &[1])).unwrap();
    assert_eq!(rx.collect(QUIET, LIMIT), vec![Frame::classic(0x7, &[1])]);
    // Without modifications can-gw keeps no user id: the job is known by its description.
    let kept = job.as_kernel_keeps_it();
    let jobs = gw.dump().unwrap();
    let (c, _) = jobs
        .iter()
        .find(|(_, j)| *j == kept)
        .expect("our job in the dump");
    assert_eq!(c.handled, 1, "{jobs:?}");
    gw.remove(&job).unwrap();
    assert!(gw.dump().unwrap().iter().all(|(_, j)| *j != kept));
}

/// Frames flow (a routed ID without modifications, a routed ID with one, both watched) while
/// the agent exits leaving the data plane running, nothing runs for a while, and a new agent
/// takes over: every frame arrives, can-gw's jobs and the counters carry on, and `down`
/// removes it all.
#[test]
fn restart_keeps_routing_and_counting() {
    restart_keeps_routing_and_counting_with(None);
}

/// The same restart with the state record truncated, garbled or of another version in
/// between: the new agent recovers from what runs, so can-gw's jobs are adopted (none is
/// removed or added again) and every counter carries on.
#[test]
fn restart_with_a_damaged_state_record_keeps_the_jobs() {
    for how in Damage::ALL {
        restart_keeps_routing_and_counting_with(Some(how));
    }
}

fn restart_keeps_routing_and_counting_with(damage: Option<Damage>) {
    let tag = match damage {
        None => "canr".to_owned(),
        Some(d) => format!("cand{}", Damage::ALL.iter().position(|x| *x == d).unwrap()),
    };
    let b = Buses::new(&tag);
    let dir = edgeplane_testbed::bpffs::dir_for(&b.ns.name).unwrap();
    struct LeftRunning<'a>(&'a str, &'a std::path::Path);
    impl Drop for LeftRunning<'_> {
        fn drop(&mut self) {
            let _ = agent::down(self.0, self.1);
        }
    }
    let _cleanup = LeftRunning(&b.ns.name, &dir);
    let config = r#"[http]
listen = "127.0.0.1:9464"

[[can.route]]
name = "plain"
ingress = "a0"
filter = "100:7FF"
to = { iface = "b0" }

[[can.route]]
name = "mod"
ingress = "a0"
filter = "200:7FF"
to = { iface = "b0" }
modify = [{ op = "xor", data = "FF" }]

[[can.watch]]
iface = "a0"
id = 0x100
period_ms = 4
"#;
    let opts = agent::Start {
        leave_running: true,
        bpffs: Some(dir.clone()),
        ..agent::Start::default()
    };
    let mut first = Agent::start_with(&b.ns, config, "info", &opts).unwrap();
    let (tx, rx) = (b.bus("a1"), b.bus("b1"));
    let n = 1000u32;
    let (got, second) = std::thread::scope(|s| {
        let reader = s.spawn(|| rx.collect(QUIET, LIMIT));
        // 0.5 s in: the agent exits; 100 ms later a new one starts, while frames flow.
        let restart = s.spawn(|| {
            std::thread::sleep(Duration::from_millis(500));
            let log = first.stop_and_log().unwrap();
            assert!(log.contains("the data plane keeps running"), "{log}");
            let jobs_before = can_gw_jobs(&b.ns);
            if let Some(how) = damage {
                damage_record(&dir, how).unwrap();
            }
            std::thread::sleep(Duration::from_millis(100));
            let second = Agent::start_with(&b.ns, config, "info", &opts).unwrap();
            // The very jobs that ran before: none removed, none added.
            assert_eq!(can_gw_jobs(&b.ns), jobs_before, "{}", second.log_so_far());
            second
        });
        let start = Instant::now();
        for i in 0..n {
            // 0x100 and 0x200 in turn, one every 2 ms: 0x100 every 4 ms.
            let due = start + Duration::from_millis(2 * u64::from(i));
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            let id = if i % 2 == 0 { 0x100 } else { 0x200 };
            tx.send(&Frame::classic(id, &i.to_be_bytes())).unwrap();
        }
        let second = restart.join().unwrap();
        (reader.join().unwrap(), second)
    });
    let mut want: Vec<Frame> = Vec::new();
    for i in 0..n {
        let mut d = i.to_be_bytes();
        let id = if i % 2 == 0 {
            0x100
        } else {
            d[0] ^= 0xff;
            0x200
        };
        want.push(Frame::classic(id, &d));
    }
    assert_same_frames_in_id_order(&got, &want, "a -> b across the restart");

    let m = second.scrape();
    let log = second.log_so_far();
    if damage.is_some() {
        assert!(
            log.contains("is unreadable") && log.contains("taking over what the kernel runs"),
            "{log}"
        );
        assert!(
            log.contains("found=2") && !log.contains("removing a can-gw job"),
            "{log}"
        );
    } else {
        assert!(log.contains("taking over the data plane"), "{log}");
    }
    let half = f64::from(n / 2);
    for rule in ["plain", "mod"] {
        assert_eq!(
            metric(
                &m,
                &format!("edgeplane_can_frames_total{{rule=\"{rule}\"}}")
            ),
            half,
            "{rule}\n{m}"
        );
        // can-gw's job was adopted, not replaced: its counter covers the whole run.
        assert_eq!(
            metric(
                &m,
                &format!("edgeplane_can_routed_total{{rule=\"{rule}\"}}")
            ),
            half,
            "{rule}\n{m}"
        );
    }
    let watched = "iface=\"a0\",id=\"100\"";
    assert_eq!(
        metric(&m, &format!("edgeplane_can_id_frames_total{{{watched}}}")),
        half
    );
    assert_eq!(
        metric(
            &m,
            &format!("edgeplane_can_cycle_seconds_count{{{watched}}}")
        ),
        half - 1.0,
        "the watch kept measuring across the restart\n{m}"
    );
    eprintln!(
        "CAN restart{}: {n} frames sent, {} received; frames and routed counters {half} per rule after the restart",
        damage.map_or(String::new(), |d| format!(" ({d:?} record)")),
        got.len()
    );

    let out = agent::down(&b.ns.name, &dir).unwrap();
    // Two routes, each a classic and a CAN FD job.
    assert!(out.contains("removed 4 can-gw job(s)"), "{out}");
    drop(second);
    tx.send(&Frame::classic(0x100, &[1])).unwrap();
    assert!(rx.collect(QUIET, LIMIT).is_empty(), "routed after down");
}

/// CAN interfaces disappear while the agent runs (a watched vcan, a route's destination): it
/// reports them missing, keeps the rest running, and installs everything again when they are
/// back, counters continuing.
#[test]
fn interfaces_that_come_and_go_are_followed() {
    let b = Buses::new("cang");
    vcan(&b.ns, "v0").unwrap();
    let agent = b.agent(
        r#"[[can.route]]
name = "r"
ingress = "a0"
filter = "100:7FF"
to = { iface = "b0" }

[[can.watch]]
iface = "v0"
id = 0x42
period_ms = 10
"#,
    );
    let readyz = |code: u16| -> serde_json::Value {
        let _in = b.ns.enter().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (c, body) = http::get(agent.metrics, "/readyz").unwrap();
            if c == code {
                return serde_json::from_str(&body).unwrap();
            }
            assert!(Instant::now() < deadline, "/readyz {c}: {body}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let missing = |name: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let body = readyz(503);
            let state = body["components"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == name)
                .map(|c| c["state"].clone());
            if state == Some("interface_missing".into()) {
                return;
            }
            assert!(Instant::now() < deadline, "{name} not missing: {body}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let routed_one = || {
        let (tx, rx) = (b.bus("a1"), b.bus("b1"));
        tx.send(&Frame::classic(0x100, &[7])).unwrap();
        rx.collect(QUIET, LIMIT)
    };
    assert_eq!(routed_one().len(), 1);

    // The watched vcan goes; the route does not notice.
    b.ns.ip(&["link", "del", "v0"]).unwrap();
    missing("can_watch/v0");
    assert_eq!(routed_one().len(), 1, "the route stopped while v0 was gone");
    // can-gw deletes a job with its counters when an interface goes: the agent carries what
    // it read last (every scrape reads them).
    agent.scrape();

    // The route's destination goes too; both come back.
    b.ns.ip(&["link", "del", "b0"]).unwrap();
    missing("can_route/b0");
    vxcan_pair(&b.ns, "b0", "b1", true).unwrap();
    vcan(&b.ns, "v0").unwrap();
    readyz(200);
    assert_eq!(routed_one().len(), 1, "the route after b0 came back");

    let v = b.bus("v0");
    v.send(&Frame::classic(0x42, &[1])).unwrap();
    v.send(&Frame::classic(0x42, &[2])).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let m = agent.scrape();
    assert_eq!(
        metric(&m, "edgeplane_can_frames_total{rule=\"r\"}"),
        3.0,
        "{m}"
    );
    // can-gw dropped the job with b0; the new job's count adds to the old one's.
    assert_eq!(
        metric(&m, "edgeplane_can_routed_total{rule=\"r\"}"),
        3.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "edgeplane_can_id_frames_total{iface=\"v0\",id=\"042\"}"),
        2.0,
        "{m}"
    );
    let log = agent.log_so_far();
    assert!(
        log.contains("interface missing") && log.contains("interface back"),
        "{log}"
    );
}
