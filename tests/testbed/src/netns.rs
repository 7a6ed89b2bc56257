//! Network namespaces as throwaway test hosts, joined by veth links.

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, bail};

/// A network namespace named `ep-<tag>-<pid>-<n>`, deleted (with its interfaces) on drop.
pub struct Netns {
    pub name: String,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl Netns {
    /// The namespace's UDP counters (/proc/net/snmp and snmp6), one line each: where a full
    /// socket receive buffer (RcvbufErrors) shows, for a test that lost datagrams.
    pub fn udp_counters(&self) -> String {
        let mut out = String::new();
        for file in ["/proc/net/snmp", "/proc/net/snmp6"] {
            let text = self.exec(&["cat", file]).unwrap_or_default();
            let udp: Vec<&str> = text.lines().filter(|l| l.starts_with("Udp")).collect();
            out.push_str(&format!("{file}: {}\n", udp.join(" | ")));
        }
        out
    }

    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let name = format!(
            "ep-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs `ip -n <ns> ARGS`.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, cmd: &[&str]) -> anyhow::Result<String> {
        run(Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(cmd))
    }

    /// A `Command` that runs inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        self.exec(&["sysctl", "-qw", &format!("{key}={value}")])
            .map(drop)
    }

    /// Enables IPv4 and IPv6 forwarding, as a gateway needs.
    pub fn enable_forwarding(&self) -> anyhow::Result<()> {
        self.sysctl("net.ipv4.ip_forward", "1")?;
        self.sysctl("net.ipv6.conf.all.forwarding", "1")
    }

    pub fn ifindex(&self, iface: &str) -> anyhow::Result<u32> {
        let out = self.ip(&["-o", "link", "show", "dev", iface])?;
        out.split(':')
            .next()
            .and_then(|i| i.trim().parse().ok())
            .with_context(|| format!("parsing `{out}`"))
    }

    pub fn mac(&self, iface: &str) -> anyhow::Result<[u8; 6]> {
        let out = self.exec(&["cat", &format!("/sys/class/net/{iface}/address")])?;
        let mut mac = [0u8; 6];
        for (b, part) in mac.iter_mut().zip(out.trim().split(':')) {
            *b = u8::from_str_radix(part, 16)?;
        }
        Ok(mac)
    }

    /// Moves the calling thread into the namespace until the guard drops.
    pub fn enter(&self) -> anyhow::Result<Entered> {
        enter(&self.name)
    }
}

/// Moves the calling thread into the namespace `name` until the guard drops.
pub fn enter(name: &str) -> anyhow::Result<Entered> {
    let original = File::open("/proc/thread-self/ns/net").context("opening own netns")?;
    let target = File::open(format!("/run/netns/{name}")).context("opening netns")?;
    setns(&target)?;
    Ok(Entered { original })
}

impl Netns {
    /// Gives processes started in the namespace (through `ip netns exec`, as [`Self::command`]
    /// does) their own `/etc/<file>`: iproute2 bind-mounts `/etc/netns/<ns>/<file>` over it in
    /// their mount namespace. The host's file is not changed (one is created, empty, where
    /// there is none: in the test VM). Rewriting it later shows in processes that run.
    pub fn set_etc(&self, file: &str, contents: &str) -> anyhow::Result<()> {
        let target = std::path::Path::new("/etc").join(file);
        if !target.exists() {
            std::fs::write(&target, "")?;
        }
        let dir = self.etc_dir();
        std::fs::create_dir_all(&dir)?;
        // In place, so that a bind mount of it sees the new contents.
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(dir.join(file))?;
        std::io::Write::write_all(&mut f, contents.as_bytes())?;
        Ok(())
    }

    fn etc_dir(&self) -> std::path::PathBuf {
        std::path::Path::new("/etc/netns").join(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = std::fs::remove_dir_all(self.etc_dir());
    }
}

/// Deletes namespaces a killed earlier run left behind (`ep-<tag>...`).
pub fn remove_stale(tag: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    let prefix = format!("ep-{tag}");
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(name) = line
            .split_whitespace()
            .next()
            .filter(|n| n.starts_with(&prefix))
        {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}

/// Returns the thread to its original namespace on drop.
pub struct Entered {
    original: File,
}

impl Drop for Entered {
    fn drop(&mut self) {
        let _ = setns(&self.original);
    }
}

fn setns(f: &File) -> anyhow::Result<()> {
    // SAFETY: a valid namespace fd; CLONE_NEWNET switches only this thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Creates a veth pair: `a_if` in `a`, `b_if` in `b`, both up.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> anyhow::Result<()> {
    run(Command::new("ip").args([
        "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns",
        &b.name,
    ]))?;
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["link", "set", b_if, "up"])?;
    Ok(())
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!(
            "{cmd:?} failed ({status}): {}",
            String::from_utf8_lossy(&stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&stdout).into_owned())
}

/// Three hosts in a line: sender -- gateway -- receiver, with IPv4 and IPv6 on each link.
///
/// ```text
///  sender s0 ------ g0 gateway g1 ------ r0 receiver
///  198.18.1.2    198.18.1.1   198.18.2.1    198.18.2.2
///  fd18:1::2      fd18:1::1   fd18:2::1      fd18:2::2
/// ```
/// The addresses are from the benchmarking range (RFC 2544) and live only in these namespaces.
pub struct Line {
    pub sender: Netns,
    pub gateway: Netns,
    pub receiver: Netns,
}

impl Line {
    pub const SENDER_V4: &str = "198.18.1.2";
    pub const GATEWAY_IN_V4: &str = "198.18.1.1";
    pub const GATEWAY_OUT_V4: &str = "198.18.2.1";
    pub const RECEIVER_V4: &str = "198.18.2.2";
    pub const SENDER_V6: &str = "fd18:1::2";
    pub const GATEWAY_IN_V6: &str = "fd18:1::1";
    pub const RECEIVER_V6: &str = "fd18:2::2";

    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let line = Self {
            sender: Netns::new(&format!("{tag}s"))?,
            gateway: Netns::new(&format!("{tag}g"))?,
            receiver: Netns::new(&format!("{tag}r"))?,
        };
        veth(&line.sender, "s0", &line.gateway, "g0")?;
        veth(&line.gateway, "g1", &line.receiver, "r0")?;
        for (ns, iface, v4, v6) in [
            (&line.sender, "s0", "198.18.1.2/24", "fd18:1::2/64"),
            (&line.gateway, "g0", "198.18.1.1/24", "fd18:1::1/64"),
            (&line.gateway, "g1", "198.18.2.1/24", "fd18:2::1/64"),
            (&line.receiver, "r0", "198.18.2.2/24", "fd18:2::2/64"),
        ] {
            ns.ip(&["addr", "add", v4, "dev", iface])?;
            // nodad: usable at once, no duplicate address detection delay.
            ns.ip(&["-6", "addr", "add", v6, "dev", iface, "nodad"])?;
        }
        line.sender
            .ip(&["route", "add", "default", "via", Self::GATEWAY_IN_V4])?;
        line.sender
            .ip(&["-6", "route", "add", "default", "via", Self::GATEWAY_IN_V6])?;
        line.receiver
            .ip(&["route", "add", "default", "via", Self::GATEWAY_OUT_V4])?;
        line.receiver
            .ip(&["-6", "route", "add", "default", "via", "fd18:2::1"])?;
        line.gateway.enable_forwarding()?;
        Ok(line)
    }

    /// Makes the gateway learn the receiver's MAC (ARP and ND), as traffic would.
    pub fn resolve_neighbours(&self) -> anyhow::Result<()> {
        self.gateway
            .exec(&["ping", "-c1", "-W2", Self::RECEIVER_V4])?;
        self.gateway
            .exec(&["ping", "-6", "-c1", "-W2", Self::RECEIVER_V6])?;
        Ok(())
    }

    /// Where datagrams may have been dropped on their way, for a test that lost some: the
    /// gateway's veth statistics (an XDP redirect into a full peer ring counts there), the
    /// receiver's interface drops and its UDP socket errors (a full receive buffer).
    pub fn drop_counters(&self) -> String {
        let mut out = String::new();
        for (ns, iface) in [
            (&self.gateway, "g0"),
            (&self.gateway, "g1"),
            (&self.receiver, "r0"),
        ] {
            let stats = ns
                .exec(&["ethtool", "-S", iface])
                .unwrap_or_else(|e| e.to_string());
            let nonzero: Vec<&str> = stats
                .lines()
                .map(str::trim)
                .filter(|l| l.split_once(": ").is_some_and(|(_, v)| v != "0"))
                .collect();
            out.push_str(&format!(
                "{iface} (ethtool -S, non-zero): {}\n",
                nonzero.join(", ")
            ));
        }
        let link = self
            .receiver
            .ip(&["-s", "link", "show", "r0"])
            .unwrap_or_default();
        out.push_str(&format!("r0 (ip -s link):\n{link}"));
        out.push_str(&format!("receiver {}", self.receiver.udp_counters()));
        out
    }

    /// XDP on veth: full checksums from the sender, and NAPI (GRO) on the receiving peer so
    /// redirected frames are taken.
    pub fn prepare_for_xdp(&self) -> anyhow::Result<()> {
        self.sender.exec(&["ethtool", "-K", "s0", "tx", "off"])?;
        self.receiver.exec(&["ethtool", "-K", "r0", "gro", "on"])?;
        Ok(())
    }
}
