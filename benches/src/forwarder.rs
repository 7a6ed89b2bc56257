//! The forwarders the UDP suite compares, each started on a fresh gateway: the agent (XDP, tc,
//! its userspace engines), socat, the kernel's own forwarding with nftables DNAT, and `limit`,
//! the reference XDP program that forwards with no lookups (ebpf-programs'
//! udp_forward_limit.rs): what XDP on this veth can do at most.

use std::{
    process::{Child, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};
use edgeplane_testbed::{
    agent::Agent,
    netns::{Line, Netns},
};

/// Every engine the suite knows, for the error of an unknown one.
pub const ENGINES: &str =
    "xdp, tc, xdp-nocapture, tc-nocapture, linux-nat, limit, tokio, tokio-uring, socat";

const RULE: &str = r#"
[[udp.forward]]
name = "bench"
ingress = "g0"
match = { dst_port = 5000 }
to = { iface = "g1", dst_ip = "198.18.2.2", dst_port = 6000 }
"#;

/// The agent's rule as nftables DNAT: the same rewrite (destination only), the kernel's
/// forwarding doing the rest (route, neighbour, TTL, checksums).
const NFT_DNAT: &str = "table ip edgeplane_bench {
  chain prerouting {
    type nat hook prerouting priority dstnat; policy accept;
    iifname \"g0\" udp dport 5000 dnat to 198.18.2.2:6000
  }
}
";

/// A forwarder running on the gateway.
pub enum Forwarder {
    /// The agent; with XDP, the receiving veth's `xdp_pass` link lives as long as this.
    Agent(
        Agent,
        #[expect(dead_code, reason = "held so the receiving veth keeps its XDP program")]
        Option<Box<aya::Ebpf>>,
    ),
    Socat(Child),
    /// The kernel's forwarding with nftables DNAT: no process (the rules go with the netns).
    Kernel,
    /// The limit program on g0 and `xdp_pass` on r0, attached as long as these live.
    Limit(
        #[expect(dead_code, reason = "held so g0 keeps the limit program")] Box<aya::Ebpf>,
        #[expect(dead_code, reason = "held so the receiving veth keeps its XDP program")]
        Box<aya::Ebpf>,
    ),
}

impl Forwarder {
    /// The forwarding process, if there is one.
    pub fn pid(&self) -> Option<u32> {
        match self {
            Self::Agent(a, _) => Some(a.pid()),
            Self::Socat(c) => Some(c.id()),
            Self::Kernel | Self::Limit(..) => None,
        }
    }

    /// The agent's /metrics, for its forwarded and dropped counters.
    pub fn agent_metrics(&self) -> Option<String> {
        match self {
            Self::Agent(a, _) => a.get("/metrics").ok().map(|(_, body)| body),
            _ => None,
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        if let Self::Socat(c) = self {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn start(engine: &str, line: &Line) -> anyhow::Result<Forwarder> {
    // `-nocapture`: the same kernel path with latency capture off, to measure its cost.
    let capture = !engine.ends_with("-nocapture");
    let agent = |mode: &str, engine: &str| {
        let config = format!(
            "[http]\nlisten = \"127.0.0.1:9464\"\n[latency]\nenabled = {capture}\n[udp]\nmode = \"{mode}\"\nengine = \"{engine}\"\n{RULE}"
        );
        Agent::start(&line.gateway, &config, "warn")
    };
    Ok(match engine {
        "xdp" | "xdp-nocapture" => {
            let pass = edgeplane_tests::xdp_pass::attach(&line.receiver, "r0")?;
            Forwarder::Agent(agent("xdp", "tokio")?, Some(Box::new(pass)))
        }
        "tc" | "tc-nocapture" => Forwarder::Agent(agent("tc", "tokio")?, None),
        "tokio" | "tokio-uring" => Forwarder::Agent(agent("userspace", engine)?, None),
        "linux-nat" => {
            nft(&line.gateway, NFT_DNAT)?;
            Forwarder::Kernel
        }
        "limit" => {
            let pass = edgeplane_tests::xdp_pass::attach(&line.receiver, "r0")?;
            Forwarder::Limit(Box::new(limit(line)?), Box::new(pass))
        }
        "socat" => socat(line)?,
        other => bail!("unknown engine {other}: choose {ENGINES}"),
    })
}

/// The limit program on g0 with the agent's rule as its one fixed rewrite, the next hop's and
/// g1's MACs as the FIB lookup would find them.
fn limit(line: &Line) -> anyhow::Result<aya::Ebpf> {
    use edgeplane_common::udp_forward::{LIMIT_PROGRAM, LIMIT_REWRITE_GLOBAL, LimitRewrite};
    let rewrite = LimitRewrite::new(
        [198, 18, 2, 2],
        6000,
        line.gateway.ifindex("g1")?,
        line.receiver.mac("r0")?,
        line.gateway.mac("g1")?,
    );
    let _in = line.gateway.enter()?;
    let mut ebpf = edgeplane::kernel::loader::load_with_global(
        &[LIMIT_PROGRAM],
        LIMIT_REWRITE_GLOBAL,
        &rewrite,
    )?;
    let p: &mut aya::programs::Xdp = ebpf
        .program_mut(LIMIT_PROGRAM)
        .context("udp_forward_limit missing from the eBPF object")?
        .try_into()?;
    p.attach("g0", aya::programs::XdpMode::Driver)
        .context("attaching udp_forward_limit to g0")?;
    Ok(ebpf)
}

/// Loads an nftables rule set into `ns` (`nft -f -`).
pub fn nft(ns: &Netns, rules: &str) -> anyhow::Result<()> {
    let mut child = ns
        .command("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting nft (Debian package nftables, installed by `cargo xtask setup`)")?;
    std::io::Write::write_all(
        &mut child.stdin.take().context("nft's stdin")?,
        rules.as_bytes(),
    )?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft -f - failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn socat(line: &Line) -> anyhow::Result<Forwarder> {
    let child = line
        .gateway
        .command("socat")
        .args([
            "-u",
            &format!("UDP4-RECV:5000,bind={},rcvbuf=8388608", Line::GATEWAY_IN_V4),
            &format!("UDP4-SENDTO:{}:6000", Line::RECEIVER_V4),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting socat (Debian package socat, installed by `cargo xtask setup`)")?;
    let mut f = Forwarder::Socat(child);
    // socat binds right after exec; give it that moment and check it stayed up.
    std::thread::sleep(Duration::from_millis(300));
    if let Forwarder::Socat(c) = &mut f
        && let Some(status) = c.try_wait()?
    {
        bail!("socat exited with {status}");
    }
    Ok(f)
}
