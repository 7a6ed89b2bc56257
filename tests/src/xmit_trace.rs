//! The kernel's own account of the skbs an interface transmits (tracepoint
//! `net:net_dev_start_xmit` in a private tracefs instance): their length, how much of it is
//! outside the linear data, and their GSO segments. It shows a test what shape of skb it made.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::Context as _;

const TRACEFS: &str = "/sys/kernel/tracing";

/// One transmitted skb.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XmitSkb {
    pub dev: String,
    pub len: u32,
    /// Bytes in page fragments: the skb is nonlinear when this is not 0.
    pub data_len: u32,
    pub gso_size: u32,
    pub gso_segs: u32,
}

/// Records `net_dev_start_xmit` for skbs of at least `min_len` bytes until dropped.
pub struct XmitTrace {
    instance: PathBuf,
}

impl XmitTrace {
    /// `name` makes the instance's directory unique among concurrent tests.
    pub fn start(name: &str, min_len: u32) -> anyhow::Result<Self> {
        mount_tracefs()?;
        let instance =
            Path::new(TRACEFS).join(format!("instances/edgeplane-{name}-{}", std::process::id()));
        fs::create_dir(&instance)
            .with_context(|| format!("creating tracefs instance {}", instance.display()))?;
        let trace = Self { instance };
        let event = trace.instance.join("events/net/net_dev_start_xmit");
        trace.write(&trace.instance.join("buffer_size_kb"), "8192")?;
        // Filtered in the kernel: other tests' small datagrams don't fill the buffer.
        trace.write(&event.join("filter"), &format!("len >= {min_len}"))?;
        trace.write(&event.join("enable"), "1")?;
        Ok(trace)
    }

    fn write(&self, path: &Path, value: &str) -> anyhow::Result<()> {
        fs::write(path, value).with_context(|| format!("writing {value:?} to {}", path.display()))
    }

    /// The skbs recorded so far on `dev` (the name, in any namespace).
    pub fn skbs(&self, dev: &str) -> anyhow::Result<Vec<XmitSkb>> {
        let path = self.instance.join("trace");
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(text
            .lines()
            .filter_map(parse)
            .filter(|s| s.dev == dev)
            .collect())
    }
}

impl Drop for XmitTrace {
    fn drop(&mut self) {
        let _ = fs::write(
            self.instance.join("events/net/net_dev_start_xmit/enable"),
            "0",
        );
        let _ = fs::remove_dir(&self.instance);
    }
}

/// Mounts tracefs where it is absent (the VM's /init mounts it; a host may not).
fn mount_tracefs() -> anyhow::Result<()> {
    if Path::new(TRACEFS).join("instances").is_dir() {
        return Ok(());
    }
    let out = std::process::Command::new("mount")
        .args(["-t", "tracefs", "tracefs", TRACEFS])
        .output()
        .context("running mount")?;
    anyhow::ensure!(
        out.status.success(),
        "mounting tracefs at {TRACEFS}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// `... net_dev_start_xmit: dev=s0 queue_mapping=0 ... len=1242 data_len=1200 ... gso_size=0
/// gso_segs=0 gso_type=0`
fn parse(line: &str) -> Option<XmitSkb> {
    let fields = line.split_once("net_dev_start_xmit: ")?.1;
    let field = |key: &str| {
        fields
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
    };
    let num = |key: &str| field(key)?.parse().ok();
    Some(XmitSkb {
        dev: field("dev")?.to_owned(),
        len: num("len")?,
        data_len: num("data_len")?,
        gso_size: num("gso_size")?,
        gso_segs: num("gso_segs")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_event_line() {
        let line = "  restart-1234 [001] ..s1.  99.123456: net_dev_start_xmit: dev=s0 \
             queue_mapping=0 skbaddr=00000000deadbeef vlan_tagged=0 vlan_proto=0x0000 \
             vlan_tci=0x0000 protocol=0x0800 ip_summed=3 len=4842 data_len=4800 \
             network_offset=14 transport_offset_valid=1 transport_offset=34 tx_flags=0 \
             gso_size=1200 gso_segs=4 gso_type=0x10000";
        assert_eq!(
            parse(line),
            Some(XmitSkb {
                dev: "s0".into(),
                len: 4842,
                data_len: 4800,
                gso_size: 1200,
                gso_segs: 4
            })
        );
        assert_eq!(parse("# tracer: nop"), None);
    }
}
