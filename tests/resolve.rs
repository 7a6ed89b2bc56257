//! Resolving tunnel peers (`to.udp = "host:port"`) with the system's resolver, against DNS
//! servers in a network namespace of the test's own: one that refuses (nothing listens on
//! port 53) and one that never answers. Each case runs in a child process started with
//! `ip netns exec`, which gives it the namespace's own /etc/resolv.conf, hosts and
//! nsswitch.conf (see `Netns::set_etc`). The resolution must end within its time limit, and
//! the runtime must keep running other tasks meanwhile: the child's runtime has one thread,
//! so a blocking lookup would stop its ticker.

use std::{
    net::UdpSocket,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use edgeplane::host::resolve::{RESOLVE_TIMEOUT, ResolveError, resolve};
use edgeplane_testbed::{netns::Netns, require_root};

const CHILD: &str = "EDGEPLANE_RESOLVE_CHILD";

/// In the child: resolves `peer.test:20000` on a current-thread runtime while a task ticks
/// every 100 ms; prints the outcome, the time taken and the ticks.
fn child(case: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ticks = Arc::new(AtomicU32::new(0));
    let counted = Arc::clone(&ticks);
    let (result, took) = rt.block_on(async move {
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(100));
            loop {
                every.tick().await;
                counted.fetch_add(1, Ordering::Relaxed);
            }
        });
        let start = Instant::now();
        let r = resolve("peer.test:20000", RESOLVE_TIMEOUT).await;
        (r, start.elapsed())
    });
    // The lookup thread may still wait for the server: not for it.
    rt.shutdown_background();
    let outcome = match result {
        Ok(a) => format!("resolved {a}"),
        Err(ResolveError::TimedOut { .. }) => "timed out".to_owned(),
        Err(e) => format!("failed: {e}"),
    };
    println!(
        "result|{case}|{outcome}|{}|{}",
        took.as_millis(),
        ticks.load(Ordering::Relaxed)
    );
}

struct Outcome {
    text: String,
    ms: u128,
    ticks: u32,
}

/// A namespace whose resolver is `nameserver 127.0.0.1` (one attempt of 30 s) and whose
/// hosts file has `hosts` lines.
fn namespace(tag: &str, hosts: &str) -> Netns {
    require_root();
    let ns = Netns::new(tag).unwrap();
    ns.set_etc(
        "resolv.conf",
        "nameserver 127.0.0.1\noptions timeout:30 attempts:1\n",
    )
    .unwrap();
    ns.set_etc("hosts", &format!("127.0.0.1 localhost\n{hosts}"))
        .unwrap();
    ns.set_etc("nsswitch.conf", "hosts: files dns\n").unwrap();
    ns
}

fn run_child(ns: &Netns, case: &str) -> Outcome {
    let exe = std::env::current_exe().unwrap();
    let out = ns
        .command(exe.to_str().unwrap())
        .args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
        .env(CHILD, case)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // libtest prints the test's name ahead of the child's line.
    let tag = format!("result|{case}|");
    let line = stdout
        .lines()
        .find_map(|l| l.find(&tag).map(|i| &l[i..]))
        .unwrap_or_else(|| panic!("no result line in {stdout}"));
    let fields: Vec<&str> = line.split('|').collect();
    Outcome {
        text: fields[2].to_owned(),
        ms: fields[3].parse().unwrap(),
        ticks: fields[4].parse().unwrap(),
    }
}

/// Not a test of its own: the child's entry point (does nothing when run directly).
#[test]
fn child_entry() {
    if let Ok(case) = std::env::var(CHILD) {
        child(&case);
    }
}

#[test]
fn a_name_the_hosts_file_has_resolves_without_dns() {
    let ns = namespace("rsh", "127.0.0.9 peer.test\n");
    let o = run_child(&ns, "hosts");
    assert_eq!(o.text, "resolved 127.0.0.9:20000");
    assert!(o.ms < 1000, "{} ms", o.ms);
}

#[test]
fn a_name_no_server_answers_for_fails_at_once() {
    // Nothing listens on 127.0.0.1:53 in the namespace: the query is refused.
    let ns = namespace("rsr", "");
    let o = run_child(&ns, "refused");
    assert!(
        o.text
            .starts_with("failed: `peer.test:20000` does not resolve"),
        "{}",
        o.text
    );
    assert!(o.ms < 2000, "{} ms", o.ms);
}

#[test]
fn a_server_that_never_answers_costs_the_time_limit_and_blocks_nothing() {
    let ns = namespace("rss", "");
    // The DNS server: reads the queries and never answers.
    let server = {
        let _in = ns.enter().unwrap();
        UdpSocket::bind("127.0.0.1:53").unwrap()
    };
    server
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let done = std::sync::atomic::AtomicBool::new(false);
    let queries = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut n = 0;
            let mut buf = [0u8; 512];
            while !done.load(Ordering::Relaxed) {
                if server.recv_from(&mut buf).is_ok() {
                    n += 1;
                }
            }
            n
        });
        let o = run_child(&ns, "silent");
        done.store(true, Ordering::Relaxed);
        assert_eq!(o.text, "timed out");
        let limit = RESOLVE_TIMEOUT.as_millis();
        assert!((limit..limit + 1500).contains(&o.ms), "{} ms", o.ms);
        // About 10 ticks a second all along: the lookup ran off the runtime's thread.
        assert!(
            u128::from(o.ticks) * 100 >= o.ms - 300,
            "{} ticks in {} ms",
            o.ticks,
            o.ms
        );
        reader.join().unwrap()
    });
    assert!(queries >= 1, "the resolver never asked the server");
}
