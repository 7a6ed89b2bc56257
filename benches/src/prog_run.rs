//! BPF_PROG_TEST_RUN: kernel-measured run time per packet of udp_forward at XDP and tc, for a
//! datagram a rule forwards and one no rule takes, with forwarding latency capture off and on.
//! Each matched case is also given as a ratio to the limit program (`udp_forward_limit.rs`:
//! the same parse and rewrite, no lookups), measured in the same rounds.
//! A test run sends nothing, so "on" measures capture's part in the ingress program (the
//! timestamp, the handoff or the XDP bulk-queue note), not `latency_egress` or the flush.

use edgeplane_common::udp_forward::{TC_PROGRAM, XDP_PROGRAM};
use edgeplane_tests::udp_program::{DEFAULTS, Fixture, Prog};

use crate::{
    report::{Report, Row},
    table::markdown,
};

/// Runs per measurement; the kernel reports their mean. The kernel reruns the program on the
/// same buffer, so a forwarded frame comes back rewritten with its TTL one lower: 250 runs
/// from TTL 255 all take the forwarding path.
const REPEAT: u32 = 250;

#[derive(clap::Args)]
pub struct Options {
    /// Measurements of REPEAT runs per case; the median is reported.
    #[arg(long, default_value_t = 2000)]
    rounds: usize,
    /// Write the results as JSON rows here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

/// One measured case: program, frame, verdict, median ns per run.
pub struct Case {
    pub program: &'static str,
    pub frame: &'static str,
    /// Latency capture on; `None` for the limit program, which has none.
    pub capture: Option<bool>,
    pub verdict: u32,
    pub ns: f64,
}

/// The limit program's name in the table and the JSON rows.
const LIMIT: &str = "limit (udp_forward_limit)";
const MATCHED: &str = "matched (forwarded)";
const UNMATCHED: &str = "unmatched (no rule)";

/// Capture (`None`: the limit, both halves of a round), program, its name, frame, frame's name.
type CaseSpec<'a> = (Option<bool>, Prog, &'static str, &'a [u8], &'static str);

pub fn measure(opts: &Options) -> Vec<Case> {
    let mut f = Fixture::new(
        r#"[[udp.forward]]
           name = "bench"
           ingress = "in0"
           match = { src_port = 4000 }
           to = { iface = "eg0", dst_ip = "198.18.2.2", dst_port = 6000 }"#,
        DEFAULTS,
    );
    // The limit does the rule's rewrite, without looking anything up.
    f.load_limit([198, 18, 2, 2], 6000);
    let payload = [0x5au8; 64];
    // The rule matches the source port, which the rewrite keeps: every rerun is forwarded.
    let matched = f.udp4([198, 18, 1, 2], [198, 18, 1, 1], 4000, 5000, 255, &payload);
    let unmatched = f.udp4([198, 18, 1, 2], [198, 18, 1, 1], 4001, 5000, 255, &payload);
    // Every case runs in every round, capture off and on alternating, so drift in the
    // machine's load hits all of them alike. The limit runs in both halves of a round.
    let mut cases: Vec<CaseSpec> = vec![(None, Prog::Limit, LIMIT, &matched, MATCHED)];
    for capture in [false, true] {
        for (prog, program) in [(Prog::Xdp, XDP_PROGRAM), (Prog::Tc, TC_PROGRAM)] {
            cases.push((Some(capture), prog, program, &matched, MATCHED));
            cases.push((Some(capture), prog, program, &unmatched, UNMATCHED));
        }
    }
    let mut samples = vec![Vec::with_capacity(2 * opts.rounds); cases.len()];
    let mut verdicts = vec![0; cases.len()];
    for _ in 0..opts.rounds {
        for capture in [false, true] {
            f.set_latency_capture(capture);
            for (i, (c, prog, _, frame, _)) in cases.iter().enumerate() {
                if c.is_some_and(|c| c != capture) {
                    continue;
                }
                let (ret, _, took) = f.run_repeated(*prog, frame, REPEAT);
                verdicts[i] = ret;
                samples[i].push(took.as_nanos() as f64);
            }
        }
    }
    let mut out = Vec::new();
    for (i, (capture, _, program, _, name)) in cases.iter().enumerate() {
        let s = &mut samples[i];
        s.sort_by(f64::total_cmp);
        out.push(Case {
            program,
            frame: if *capture == Some(true) {
                format!("{name}, latency capture on").leak()
            } else {
                name
            },
            capture: *capture,
            verdict: verdicts[i],
            ns: s[s.len() / 2],
        });
    }
    out
}

/// A case's ratio to the limit program (matched frames only: the limit forwards them all).
fn vs_limit(cases: &[Case], c: &Case) -> Option<f64> {
    let limit = cases.iter().find(|c| c.capture.is_none())?;
    (c.capture.is_some() && c.frame.starts_with(MATCHED)).then(|| c.ns / limit.ns)
}

/// A capture-on case's ratio to the same case with capture off.
fn capture_cost(cases: &[Case], c: &Case) -> Option<f64> {
    if c.capture != Some(true) {
        return None;
    }
    let off = cases.iter().find(|o| {
        o.capture == Some(false) && o.program == c.program && c.frame.starts_with(o.frame)
    })?;
    Some(c.ns / off.ns)
}

fn ratio(r: Option<f64>) -> String {
    r.map_or_else(String::new, |r| format!("{r:.2}x"))
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    let cases = measure(opts);
    let rows: Vec<Vec<String>> = cases
        .iter()
        .map(|c| {
            vec![
                c.program.into(),
                c.frame.into(),
                verdict_name(c.verdict).into(),
                format!("{:.0}", c.ns),
                ratio(vs_limit(&cases, c)),
                ratio(capture_cost(&cases, c)),
            ]
        })
        .collect();
    println!(
        "BPF_PROG_TEST_RUN, {} rounds of {REPEAT} runs (median of the rounds' means), 106-byte IPv4/UDP frame; \
         the limit parses, rewrites and redirects with no lookups (udp_forward_limit.rs)\n\n{}",
        opts.rounds,
        markdown(
            &[
                "program",
                "frame",
                "verdict",
                "ns/packet",
                "vs limit",
                "capture on / off"
            ],
            &rows
        )
    );
    if let Some(path) = &opts.json {
        let rows = cases
            .iter()
            .map(|c| {
                let mut note = format!(
                    "BPF_PROG_TEST_RUN, 106-byte IPv4/UDP frame, {}, median of {} rounds of {REPEAT} runs",
                    verdict_name(c.verdict),
                    opts.rounds
                );
                if let Some(r) = vs_limit(&cases, c) {
                    note.push_str(&format!(", {r:.2}x the limit"));
                }
                if let Some(r) = capture_cost(&cases, c) {
                    note.push_str(&format!(", {r:.2}x capture off"));
                }
                Row::micro(format!("{}, {}", c.program, c.frame), c.ns, note)
            })
            .collect();
        Report { rows }.save(path)?;
    }
    Ok(())
}

fn verdict_name(v: u32) -> &'static str {
    match v {
        2 => "XDP_PASS",
        4 => "XDP_REDIRECT",
        7 => "TC_ACT_REDIRECT",
        u32::MAX => "TC_ACT_UNSPEC",
        _ => "other",
    }
}
