//! Fleet registration against a real etcd (Debian's etcd-server), run inside the agent's network
//! namespace: the record and its content, the lease, etcd outages, TLS and mutual TLS with the
//! SPIFFE ID check, and rule sets pushed through etcd.

use std::{
    path::PathBuf,
    process::{Command, Output},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use edgeplane::registry::record::AgentRecord;
use edgeplane_testbed::{
    agent::{self, Agent},
    http,
    netns::Netns,
};
use edgeplane_tests::etcd::{
    Etcd, PLAIN_URL, Pki, SERVER_DNS_NAME, SERVER_SPIFFE_ID, Security, TLS_URL,
};
use prost::Message as _;

const VIN: &str = "WVWZZZ1JZXW000001";
const SPIFFE_ID: &str = "spiffe://fleet.example/vehicle/gw";
const KEY: &str = "/edgeplane/v1/vehicles/WVWZZZ1JZXW000001/agents/gw";
const RULES_KEY: &str = "/edgeplane/v1/vehicles/WVWZZZ1JZXW000001/rules";
const LEASE_TTL: u64 = 3;

/// A namespace with a veth pair a0/b0 for a rule, and a scratch directory.
struct Host {
    ns: Netns,
    dir: PathBuf,
}

impl Host {
    fn new(tag: &str) -> Self {
        edgeplane_testbed::require_root();
        let ns = Netns::new(tag).unwrap();
        ns.ip(&["link", "add", "a0", "type", "veth", "peer", "name", "b0"])
            .unwrap();
        ns.ip(&["link", "set", "a0", "up"]).unwrap();
        ns.ip(&["link", "set", "b0", "up"]).unwrap();
        let dir = std::env::temp_dir().join(&ns.name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self { ns, dir }
    }

    fn scrape(&self, agent: &Agent, path: &str) -> (u16, String) {
        let _in = self.ns.enter().unwrap();
        http::get(agent.metrics, path).unwrap()
    }

    fn metric(&self, agent: &Agent, series: &str) -> f64 {
        http::metric(&self.scrape(agent, "/metrics").1, series).unwrap()
    }

    fn edgeplane(&self, args: &[&str]) -> Output {
        self.ns
            .command(edgeplane_testbed::agent::binary().to_str().unwrap())
            .args(args)
            .output()
            .unwrap()
    }
}

/// (id, tag) of every BPF program the process holds, as the kernel reports them in the fdinfo
/// of its program file descriptors (tc can't list tcx attachments, and bpftool is not needed).
fn kernel_programs(pid: u32) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap() {
        let Ok(text) = std::fs::read_to_string(entry.unwrap().path()) else {
            continue;
        };
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
        };
        if let (Some(id), Some(tag)) = (field("prog_id:"), field("prog_tag:")) {
            out.push((id.parse().unwrap(), tag));
        }
    }
    out
}

/// A rule set: one UDP rule from `ingress` to b0. Pushed alone, or the start of a config.
fn rules(rule: &str, ingress: &str) -> String {
    format!(
        r#"[http]
listen = "127.0.0.1:9464"

[udp]
mode = "tc"

[[udp.forward]]
name = "{rule}"
ingress = "{ingress}"
match = {{ dst_port = 5000 }}
to = {{ iface = "b0", dst_port = 6000 }}
"#
    )
}

/// The agent's config: [`rules`] and registration settings `registry` (TOML lines).
fn config(rule: &str, ingress: &str, registry: &str) -> String {
    format!(
        r#"{}
[agent]
service_name = "gw"
vin = "{VIN}"
spiffe_id = "{SPIFFE_ID}"

[registry]
lease_ttl = {LEASE_TTL}
{registry}
"#,
        rules(rule, ingress)
    )
}

fn plain() -> String {
    format!("endpoints = [\"{PLAIN_URL}\"]")
}

/// Polls `f` every 50 ms until it gives a value; panics after `limit` naming `what`.
fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn record(etcd: &Etcd, ns: &Netns) -> Option<AgentRecord> {
    etcd.get(ns, KEY)
        .unwrap()
        .map(|v| AgentRecord::decode(v.as_slice()).expect("the value is an AgentRecord"))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn registers_with_the_record() {
    let host = Host::new("regrec");
    let etcd = Etcd::start(&host.ns, &host.dir, Security::Plain, None).unwrap();
    let before = now_ms();
    let agent = Agent::start(&host.ns, &config("lidar", "a0", &plain()), "info").unwrap();

    let r = wait_for("the record", Duration::from_secs(10), || {
        record(&etcd, &host.ns)
    });
    assert_eq!(r.service_name, "gw");
    assert_eq!(r.vin, VIN);
    assert_eq!(r.spiffe_id, SPIFFE_ID);
    assert_eq!(r.version, env!("CARGO_PKG_VERSION"));
    let uname = Command::new("uname").arg("-r").output().unwrap();
    assert_eq!(
        r.kernel_release,
        String::from_utf8_lossy(&uname.stdout).trim()
    );
    assert!(
        (before.saturating_sub(1000)..=now_ms()).contains(&r.start_time_unix_ms),
        "start time {} not between {before} and now",
        r.start_time_unix_ms
    );
    assert_eq!(r.http_endpoints, ["http://127.0.0.1:9464"]);
    assert_eq!(r.programs.len(), 1, "{:?}", r.programs);
    let p = &r.programs[0];
    assert_eq!(
        (p.name.as_str(), p.kind.as_str(), p.attach_point.as_str()),
        ("udp_forward_tc", "tc", "a0")
    );
    let held = kernel_programs(agent.pid());
    assert!(
        held.contains(&(p.id, p.tag.clone())),
        "id {} tag {} is not a program the agent holds: {held:?}",
        p.id,
        p.tag
    );
    let id = p.id;
    assert!(r.last_rules_rejection.is_none());

    let (code, body) = host.scrape(&agent, "/readyz");
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains(r#"{"name":"registry","state":"up"}"#),
        "{body}"
    );
    assert_eq!(host.metric(&agent, "edgeplane_registry_up"), 1.0);

    // The CLI reads the same record back as JSON, with the proto's field names.
    let out = host.edgeplane(&["registry", "get", "--endpoints", PLAIN_URL, "--vin", VIN]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["vin"], VIN);
    assert_eq!(lines[0]["programs"][0]["attach_point"], "a0");
    assert_eq!(lines[0]["programs"][0]["id"], id);
}

#[test]
fn the_lease_keeps_the_record_and_an_expired_one_is_replaced() {
    let host = Host::new("reglease");
    let etcd = Etcd::start(&host.ns, &host.dir, Security::Plain, None).unwrap();
    let mut agent = Agent::start(&host.ns, &config("lidar", "a0", &plain()), "info").unwrap();
    let lease = wait_for("the record's lease", Duration::from_secs(10), || {
        etcd.lease_of(&host.ns, KEY).unwrap()
    });

    // Twice the TTL later the key is still there, under the same lease, renewed.
    std::thread::sleep(Duration::from_secs(2 * LEASE_TTL));
    assert_eq!(
        etcd.lease_of(&host.ns, KEY).unwrap().as_deref(),
        Some(lease.as_str())
    );
    let ttl = etcd
        .ctl(&host.ns, &["lease", "timetolive", &lease])
        .unwrap();
    let ttl = String::from_utf8_lossy(&ttl.stdout).into_owned();
    assert!(
        ttl.contains("remaining") && !ttl.contains("already expired"),
        "{ttl}"
    );

    // The lease gone (as after an outage longer than its TTL): a new lease, the record again.
    let revoked = Instant::now();
    let out = etcd.ctl(&host.ns, &["lease", "revoke", &lease]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let renewed = wait_for(
        "a record under a new lease",
        Duration::from_secs(LEASE_TTL + 3),
        || {
            etcd.lease_of(&host.ns, KEY)
                .unwrap()
                .filter(|l| *l != lease)
        },
    );
    println!(
        "lease {lease} revoked: record back under lease {renewed} after {:?}",
        revoked.elapsed()
    );
    assert!(record(&etcd, &host.ns).is_some());

    // A stopping agent revokes its lease: the record goes at once, not a TTL later.
    let log = agent.stop_and_log().unwrap();
    assert!(log.contains("lease revoked"), "{log}");
    assert!(
        record(&etcd, &host.ns).is_none(),
        "record left behind:\n{log}"
    );
}

#[test]
fn survives_etcd_outages_and_registers_again() {
    let host = Host::new("regout");
    // etcd is not running yet: the agent starts and forwards all the same.
    let agent = Agent::start(&host.ns, &config("lidar", "a0", &plain()), "info").unwrap();
    wait_for(
        "the first failure in /readyz",
        Duration::from_secs(5),
        || {
            let (code, body) = host.scrape(&agent, "/readyz");
            assert_eq!(code, 200, "{body}");
            body.contains(
                r#""name":"registry","state":"degraded","detail":"no etcd endpoint answered"#,
            )
            .then_some(())
        },
    );
    assert_eq!(host.metric(&agent, "edgeplane_registry_up"), 0.0);

    let mut etcd = Etcd::start(&host.ns, &host.dir, Security::Plain, None).unwrap();
    // The backoff is at most 10 s by now.
    wait_for(
        "registration once etcd runs",
        Duration::from_secs(12),
        || record(&etcd, &host.ns),
    );

    // etcd dies: readiness stays (the data plane is unaffected), the registry is degraded.
    etcd.kill();
    wait_for(
        "the registry to notice",
        Duration::from_secs(LEASE_TTL + 6),
        || {
            let (code, body) = host.scrape(&agent, "/readyz");
            assert_eq!(code, 200, "{body}");
            body.contains(r#""name":"registry","state":"degraded""#)
                .then_some(())
        },
    );
    assert_eq!(
        host.metric(
            &agent,
            r#"edgeplane_udp_forward_attached{iface="a0",hook="tc"}"#
        ),
        1.0
    );
    std::thread::sleep(Duration::from_secs(LEASE_TTL));
    assert!(host.metric(&agent, "edgeplane_registry_reconnects_total") >= 2.0);

    // Back on the same data: registered again within the TTL plus one backoff (10 s at most).
    // Timed from the relaunch: the agent may well be back before etcdctl says etcd is healthy.
    let relaunched = Instant::now();
    let relaunched_ms = now_ms();
    etcd.restart(&host.ns).unwrap();
    let serving = relaunched.elapsed();
    wait_for(
        "registration after the restart",
        Duration::from_secs(LEASE_TTL + 10),
        || {
            (host.metric(&agent, "edgeplane_registry_up") == 1.0
                && record(&etcd, &host.ns).is_some_and(|r| r.updated_unix_ms >= relaunched_ms))
            .then_some(())
        },
    );
    let took = relaunched.elapsed();
    println!("etcd relaunched: healthy after {serving:?}, agent registered again after {took:?}");
    assert!(
        took.saturating_sub(serving) < Duration::from_secs(LEASE_TTL + 10),
        "{took:?}"
    );
}

#[test]
fn tls_and_mutual_tls_with_the_spiffe_id_checked() {
    let host = Host::new("regtls");
    let pki = Pki::new(&host.dir.join("pki")).unwrap();
    let (cert, key) = pki.client("gw", SPIFFE_ID).unwrap();
    let (other_cert, other_key) = pki
        .client("other", "spiffe://fleet.example/vehicle/other")
        .unwrap();
    let ca = pki.ca.to_str().unwrap();

    // Server-authenticated TLS.
    {
        let etcd = Etcd::start(&host.ns, &host.dir.join("tls"), Security::Tls, Some(&pki)).unwrap();
        let tls = format!("endpoints = [\"{TLS_URL}\"]\nca = \"{ca}\"");
        let _agent = Agent::start(&host.ns, &config("lidar", "a0", &tls), "info").unwrap();
        wait_for("registration over TLS", Duration::from_secs(10), || {
            record(&etcd, &host.ns)
        });
        let out = host.edgeplane(&["registry", "get", "--endpoints", TLS_URL, "--ca", ca]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains(VIN));
    }

    // Mutual TLS: etcd takes only clients with a certificate from the CA.
    let etcd = Etcd::start(
        &host.ns,
        &host.dir.join("mtls"),
        Security::MutualTls,
        Some(&pki),
    )
    .unwrap();
    let mtls = |cert: &PathBuf, key: &PathBuf| {
        format!(
            "endpoints = [\"{TLS_URL}\"]\nca = \"{ca}\"\ncert = \"{}\"\nkey = \"{}\"",
            cert.display(),
            key.display()
        )
    };
    {
        let _agent =
            Agent::start(&host.ns, &config("lidar", "a0", &mtls(&cert, &key)), "info").unwrap();
        let r = wait_for("registration over mTLS", Duration::from_secs(10), || {
            record(&etcd, &host.ns)
        });
        assert_eq!(r.spiffe_id, SPIFFE_ID);
        let (c, k) = (cert.to_str().unwrap(), key.to_str().unwrap());
        let with_cert = host.edgeplane(&[
            "registry",
            "get",
            "--endpoints",
            TLS_URL,
            "--ca",
            ca,
            "--cert",
            c,
            "--key",
            k,
        ]);
        assert!(
            with_cert.status.success(),
            "{}",
            String::from_utf8_lossy(&with_cert.stderr)
        );
        assert!(String::from_utf8_lossy(&with_cert.stdout).contains(SPIFFE_ID));
        // Without a client certificate etcd refuses.
        let without = host.edgeplane(&["registry", "get", "--endpoints", TLS_URL, "--ca", ca]);
        assert!(!without.status.success());
    }

    // A certificate for another workload: refused at start, before anything is attached.
    let (code, stderr) = run_until_exit(
        &host,
        "other",
        &config("lidar", "a0", &mtls(&other_cert, &other_key)),
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("URI SAN spiffe://fleet.example/vehicle/other")
            && stderr.contains(&format!("agent.spiffe_id is {SPIFFE_ID}")),
        "{stderr}"
    );
    // Refused before the data plane was touched.
    assert!(!stderr.contains("edgeplane running"), "{stderr}");
}

#[test]
fn pushed_rule_sets_are_applied_or_rejected() {
    let host = Host::new("regpush");
    let etcd = Etcd::start(&host.ns, &host.dir, Security::Plain, None).unwrap();
    let watching = format!(
        "{}\nwatch_rules = true\nallow_insecure_rules = true",
        plain()
    );
    let agent = Agent::start(&host.ns, &config("lidar", "a0", &watching), "info").unwrap();
    let before = wait_for("the record", Duration::from_secs(10), || {
        record(&etcd, &host.ns)
    });
    let reloads = |result: &str| {
        host.metric(
            &agent,
            &format!("edgeplane_config_reloads_total{{result=\"{result}\"}}"),
        )
    };

    // A rule set whose interface does not exist here: rejected, the running rule stays.
    let bad = etcd
        .put(&host.ns, RULES_KEY, &rules("lidar", "nosuch0"))
        .unwrap();
    wait_for("the rejection", Duration::from_secs(10), || {
        (reloads("failure") == 1.0).then_some(())
    });
    let r = wait_for(
        "the rejection in the record",
        Duration::from_secs(5),
        || record(&etcd, &host.ns).filter(|r| r.last_rules_rejection.is_some()),
    );
    let rejection = r.last_rules_rejection.unwrap();
    assert_eq!(rejection.revision, bad);
    assert!(
        rejection
            .error
            .contains("udp.forward[0].ingress: interface `nosuch0` does not exist"),
        "{}",
        rejection.error
    );
    assert_eq!(r.rules_revision, 0);
    assert_eq!(host.metric(&agent, "edgeplane_udp_forward_rules"), 1.0);
    host.metric(
        &agent,
        "edgeplane_udp_forward_packets_total{rule=\"lidar\"}",
    );
    assert_eq!(r.programs, before.programs, "the running program changed");
    assert_eq!(
        host.metric(&agent, "edgeplane_config_last_reload_successful"),
        0.0
    );

    // A good one replaces the rule; the record shows its revision and no rejection.
    let good = etcd
        .put(&host.ns, RULES_KEY, &rules("camera", "a0"))
        .unwrap();
    wait_for("the push to apply", Duration::from_secs(10), || {
        (reloads("success") == 1.0).then_some(())
    });
    let r = wait_for(
        "the applied revision in the record",
        Duration::from_secs(5),
        || record(&etcd, &host.ns).filter(|r| r.rules_revision == good),
    );
    assert!(r.last_rules_rejection.is_none());
    let text = host.scrape(&agent, "/metrics").1;
    assert!(
        text.contains("rule=\"camera\"") && !text.contains("rule=\"lidar\""),
        "{text}"
    );
    assert_eq!(r.programs.len(), 1);
}

#[test]
fn command_line_identity_survives_sighup() {
    let host = Host::new("regover");
    let etcd = Etcd::start(&host.ns, &host.dir, Security::Plain, None).unwrap();
    // The file names no identity: [registry] requires one, so it must come from the flags, at
    // start and on every reload.
    let file = |rule: &str| {
        format!(
            "{}\n[registry]\nlease_ttl = {LEASE_TTL}\n{}\n",
            rules(rule, "a0"),
            plain()
        )
    };
    let opts = agent::Start {
        args: [
            "--service-name",
            "gw",
            "--vin",
            VIN,
            "--spiffe-id",
            SPIFFE_ID,
        ]
        .map(String::from)
        .to_vec(),
        ..agent::Start::default()
    };
    let mut agent = Agent::start_with(&host.ns, &file("lidar"), "info", &opts).unwrap();
    let first = wait_for("the record", Duration::from_secs(10), || {
        record(&etcd, &host.ns)
    });
    assert_eq!(
        (first.service_name.as_str(), first.vin.as_str()),
        ("gw", VIN)
    );

    std::fs::write(&agent.config, file("radar")).unwrap();
    agent.signal(libc::SIGHUP);
    wait_for("the reload", Duration::from_secs(10), || {
        let m = host.scrape(&agent, "/metrics").1;
        http::metric(&m, r#"edgeplane_udp_forward_packets_total{rule="radar"}"#)
            .is_ok()
            .then_some(())
    });
    assert_eq!(
        host.metric(&agent, "edgeplane_config_last_reload_successful"),
        1.0
    );
    // Still registered under the flags' identity, by the same agent.
    let r = record(&etcd, &host.ns).expect("the record");
    assert_eq!((r.service_name.as_str(), r.vin.as_str()), ("gw", VIN));
    assert_eq!(r.spiffe_id, SPIFFE_ID);
    assert_eq!(r.start_time_unix_ms, first.start_time_unix_ms);
    let log = agent.stop_and_log().unwrap();
    assert!(!log.contains("reload rejected"), "{log}");
    assert!(!log.contains("[agent] or [registry] changed"), "{log}");
}

/// Runs `edgeplane run` on `config` until it exits (10 s at most); its exit code and stderr.
fn run_until_exit(host: &Host, name: &str, config: &str) -> (Option<i32>, String) {
    let path = host.dir.join(format!("{name}.toml"));
    std::fs::write(&path, config).unwrap();
    let log = host.dir.join(format!("{name}.log"));
    let mut child = host
        .ns
        .command(edgeplane_testbed::agent::binary().to_str().unwrap())
        .args(["run", "--config", path.to_str().unwrap()])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the agent did not exit:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status.code(), std::fs::read_to_string(&log).unwrap())
}

/// Pushed rule sets over plain http:// are refused at start unless allowed explicitly, and
/// the error says how to fix it.
#[test]
fn pushed_rules_over_plain_http_need_allow_insecure_rules() {
    let host = Host::new("reginsec");
    let watching = format!("{}\nwatch_rules = true", plain());
    let (code, stderr) = run_until_exit(&host, "insecure", &config("lidar", "a0", &watching));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("registry.watch_rules")
            && stderr.contains("allow_insecure_rules = true")
            && stderr.contains("https://"),
        "{stderr}"
    );
    assert!(!stderr.contains("edgeplane running"), "{stderr}");
    let path = host.dir.join("insecure.toml");
    let out = host.edgeplane(&["check-config", "--offline", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("registry.watch_rules"));
}

/// A push larger than rules_max_bytes, and one past the rate, are refused before they are
/// applied: the running rules stay, the record says why, and each is counted.
#[test]
fn oversize_and_too_frequent_pushes_are_refused() {
    let host = Host::new("reglimit");
    let etcd = Etcd::start(&host.ns, &host.dir, Security::Plain, None).unwrap();
    let limited = format!(
        "{}\nwatch_rules = true\nallow_insecure_rules = true\nrules_max_bytes = 2048\n\
         rules_per_minute = 1\nrules_burst = 1",
        plain()
    );
    let agent = Agent::start(&host.ns, &config("lidar", "a0", &limited), "info").unwrap();
    let before = wait_for("the record", Duration::from_secs(10), || {
        record(&etcd, &host.ns)
    });
    let refused = |reason: &str| {
        host.metric(
            &agent,
            &format!("edgeplane_registry_pushes_refused_total{{reason=\"{reason}\"}}"),
        )
    };
    let rejection_of = |revision: i64| {
        wait_for("the refusal in the record", Duration::from_secs(10), || {
            record(&etcd, &host.ns).filter(|r| {
                r.last_rules_rejection
                    .as_ref()
                    .is_some_and(|j| j.revision == revision)
            })
        })
    };

    // 3000 bytes: a valid rule set padded with a comment, over the 2048-byte cap.
    let mut big = rules("camera", "a0");
    big.push_str(&format!("# {}\n", "x".repeat(3000 - big.len() - 3)));
    assert_eq!(big.len(), 3000);
    let revision = etcd.put(&host.ns, RULES_KEY, &big).unwrap();
    let r = rejection_of(revision);
    let error = r.last_rules_rejection.unwrap().error;
    assert!(
        error.contains("3000 bytes, more than registry.rules_max_bytes (2048)"),
        "{error}"
    );
    assert_eq!(refused("too_large"), 1.0);
    assert_eq!(r.rules_revision, 0);
    assert_eq!(r.programs, before.programs, "the running program changed");
    assert_eq!(host.metric(&agent, "edgeplane_udp_forward_rules"), 1.0);
    host.metric(
        &agent,
        "edgeplane_udp_forward_packets_total{rule=\"lidar\"}",
    );

    // The one push of the burst is taken; the next, right after, is refused.
    let good = etcd
        .put(&host.ns, RULES_KEY, &rules("camera", "a0"))
        .unwrap();
    wait_for("the push to apply", Duration::from_secs(10), || {
        record(&etcd, &host.ns).filter(|r| r.rules_revision == good)
    });
    let again = etcd
        .put(&host.ns, RULES_KEY, &rules("radar", "a0"))
        .unwrap();
    let r = rejection_of(again);
    let error = r.last_rules_rejection.unwrap().error;
    assert!(
        error.contains("rules_per_minute") && error.contains("again later"),
        "{error}"
    );
    assert_eq!(refused("too_frequent"), 1.0);
    assert_eq!(r.rules_revision, good);
    let text = host.scrape(&agent, "/metrics").1;
    assert!(
        text.contains("rule=\"camera\"") && !text.contains("rule=\"radar\""),
        "{text}"
    );
    assert_eq!(
        host.metric(&agent, "edgeplane_config_reloads_total{result=\"success\"}"),
        1.0
    );
}

/// etcd's certificate must carry the configured identity: the endpoint's address by default,
/// a DNS name (server_name) or a SPIFFE ID (server_spiffe_id). A wrong one is refused (the
/// agent forwards regardless, its registry degraded with the reason).
#[test]
fn the_servers_identity_is_checked() {
    let host = Host::new("regsrv");
    let pki = Pki::new(&host.dir.join("pki")).unwrap();
    let ca = pki.ca.to_str().unwrap();
    let etcd = Etcd::start(&host.ns, &host.dir.join("tls"), Security::Tls, Some(&pki)).unwrap();
    let tls = |extra: &str| format!("endpoints = [\"{TLS_URL}\"]\nca = \"{ca}\"\n{extra}");

    for good in [
        format!("server_name = \"{SERVER_DNS_NAME}\""),
        format!("server_spiffe_id = \"{SERVER_SPIFFE_ID}\""),
    ] {
        let agent = Agent::start(&host.ns, &config("lidar", "a0", &tls(&good)), "info").unwrap();
        wait_for(
            &format!("registration with {good}"),
            Duration::from_secs(10),
            || (host.metric(&agent, "edgeplane_registry_up") == 1.0).then_some(()),
        );
    }

    for (bad, reason) in [
        (
            "server_name = \"etcd.elsewhere.example\"".to_owned(),
            "not valid for name",
        ),
        (
            "server_spiffe_id = \"spiffe://fleet.example/impostor\"".to_owned(),
            "not registry.server_spiffe_id spiffe://fleet.example/impostor",
        ),
    ] {
        let agent = Agent::start(&host.ns, &config("lidar", "a0", &tls(&bad)), "info").unwrap();
        let body = wait_for(
            &format!("the refusal of {bad}"),
            Duration::from_secs(10),
            || {
                let (code, body) = host.scrape(&agent, "/readyz");
                assert_eq!(code, 200, "{body}");
                body.contains(reason).then_some(body)
            },
        );
        assert!(
            body.contains(r#""name":"registry","state":"degraded""#),
            "{body}"
        );
        assert_eq!(host.metric(&agent, "edgeplane_registry_up"), 0.0);
        assert!(record(&etcd, &host.ns).is_none(), "registered with {bad}");
    }
}

/// A server that accepts the connection and never answers the TLS handshake is given up on
/// after handshake_timeout, and tried again.
#[test]
fn a_stalled_tls_handshake_times_out() {
    let host = Host::new("regstall");
    let pki = Pki::new(&host.dir.join("pki")).unwrap();
    let ca = pki.ca.to_str().unwrap();
    let listener = {
        let _in = host.ns.enter().unwrap();
        std::net::TcpListener::bind("127.0.0.1:2379").unwrap()
    };
    // Accepts and holds every connection, silent.
    let held = std::thread::spawn(move || {
        listener.set_nonblocking(true).unwrap();
        let mut conns = Vec::new();
        let until = Instant::now() + Duration::from_secs(15);
        while Instant::now() < until {
            if let Ok((c, _)) = listener.accept() {
                conns.push(c);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        conns.len()
    });
    let stalled = format!("endpoints = [\"{TLS_URL}\"]\nca = \"{ca}\"\nhandshake_timeout = 1");
    let started = Instant::now();
    let agent = Agent::start(&host.ns, &config("lidar", "a0", &stalled), "info").unwrap();
    let body = wait_for("the handshake timeout", Duration::from_secs(5), || {
        let (_, body) = host.scrape(&agent, "/readyz");
        body.contains("TLS handshake did not finish within 1 s")
            .then_some(body)
    });
    let after = started.elapsed();
    assert!(
        body.contains(r#""name":"registry","state":"degraded""#),
        "{body}"
    );
    assert!(after < Duration::from_secs(5), "noticed after {after:?}");
    // Retried: the backoff brings a second attempt, and that one is bounded too.
    wait_for("a reconnect attempt", Duration::from_secs(8), || {
        (host.metric(&agent, "edgeplane_registry_reconnects_total") >= 2.0).then_some(())
    });
    drop(agent);
    let conns = held.join().unwrap();
    assert!(conns >= 2, "{conns} connections reached the silent server");
}
