//! The `edgeplane` command line: exit codes and messages a user sees.

use std::process::{Command, Output};

use edgeplane_testbed::{agent::binary, netns::Netns};

fn edgeplane(args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .output()
        .expect("run the agent binary (cargo build --release first)")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn write(name: &str, body: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("edgeplane-cli-{}-{name}.toml", std::process::id()));
    std::fs::write(&p, body).unwrap();
    p
}

#[test]
fn version_names_the_release() {
    let o = edgeplane(&["--version"]);
    assert!(o.status.success());
    assert_eq!(
        text(&o).trim(),
        format!("edgeplane {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn check_config_accepts_the_example_offline() {
    let example = edgeplane_testbed::workspace().join("configs/edgeplane.toml");
    let o = edgeplane(&["check-config", "--offline", example.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains(": OK ("), "{}", text(&o));
}

#[test]
fn check_config_names_the_offending_key() {
    let unknown = write(
        "unknown",
        "[[udp.forward]]\nname = \"a\"\ningress = \"lo\"\nto = { iface = \"lo\", dst_prot = 1 }\n",
    );
    let o = edgeplane(&["check-config", unknown.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let t = text(&o);
    assert!(
        t.contains("unknown field `dst_prot`") && t.contains("line 4"),
        "{t}"
    );

    let invalid = write(
        "invalid",
        "[[udp.forward]]\nname = \"a\"\ningress = \"lo\"\nmatch = { dst_port = 0 }\nto = { iface = \"lo\" }\n",
    );
    let o = edgeplane(&["check-config", invalid.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains("udp.forward[0].match.dst_port: port 0"),
        "{}",
        text(&o)
    );
}

#[test]
fn check_config_checks_interfaces_unless_offline() {
    let cfg = write(
        "iface",
        "[[udp.forward]]\nname = \"a\"\ningress = \"nosuch0\"\nto = { iface = \"lo\" }\n",
    );
    let o = edgeplane(&["check-config", cfg.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains("udp.forward[0].ingress: interface `nosuch0` does not exist"),
        "{}",
        text(&o)
    );
    assert!(
        edgeplane(&["check-config", "--offline", cfg.to_str().unwrap()])
            .status
            .success()
    );
}

#[test]
fn run_with_a_bad_config_attaches_nothing() {
    edgeplane_testbed::require_root();
    let ns = Netns::new("cli").unwrap();
    ns.ip(&["link", "add", "a0", "type", "veth", "peer", "name", "b0"])
        .unwrap();
    let cfg = write(
        "run",
        "[[udp.forward]]\nname = \"ok\"\ningress = \"a0\"\nto = { iface = \"b0\" }\n\
         [[udp.forward]]\nname = \"bad\"\ningress = \"a0\"\nmatch = { dst_port = 1 }\nto = { iface = \"gone0\" }\n",
    );
    let o = ns
        .command(binary().to_str().unwrap())
        .args(["run", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("udp.forward[1].to.iface: interface `gone0` does not exist"),
        "{}",
        text(&o)
    );
    let link = ns.ip(&["-d", "link", "show", "a0"]).unwrap();
    assert!(!link.contains("xdp"), "{link}");
    let filters = ns
        .exec(&["tc", "filter", "show", "dev", "a0", "ingress"])
        .unwrap();
    assert!(filters.trim().is_empty(), "{filters}");
}
