//! The initramfs a VM boots: busybox, the kernel modules the tests need, the host tools they
//! call with their shared libraries, the agent and the test executables, and /init.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{BufWriter, Write as _},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use super::{cpio::Archive, kernels::Kernel, userland::Userland};
use crate::toolchain::output;

/// Kernel modules loaded at boot, with their dependencies. Where a kernel has one built in
/// (modules.builtin), it is skipped.
pub const MODULES: &[&str] = &[
    "veth",        // the test topologies' links
    "sch_ingress", // the clsact qdisc the tc programs attach to
    "cls_bpf",     // tc filters that run eBPF programs
    "can",         // AF_CAN
    "can-raw",     // raw CAN sockets (cansend, candump)
    "can-gw",      // the kernel's CAN gateway (cangw)
    "can-dev",     // CAN device infrastructure
    "vcan",        // virtual CAN interfaces
    "vxcan",       // virtual CAN tunnels between namespaces
    "kvaser_pci",  // the emulated CAN controllers (SJA1000) the VM has, see qemu.rs
    "wireguard",   // the authenticated link the CAN tunnel test runs over
];

/// Host programs the tests run, found on the host's PATH (and the sbin directories).
const HOST_TOOLS: &[&str] = &[
    "ip",       // iproute2: namespaces, links, addresses, routes
    "tc",       // iproute2: qdiscs and filters
    "ethtool",  // veth offloads
    "ping",     // iputils: neighbour resolution, with -6
    "promtool", // prometheus: checks the metrics format
    "cansend",  // can-utils
    "candump",  // can-utils
    "cangw",    // can-utils
    "wg",       // wireguard-tools: keys and peers of the WireGuard links
    "setpriv",  // util-linux: the agent as a user with only its capabilities
    "prlimit",  // util-linux: RLIMIT_MEMLOCK as the unit sets it
];

/// Where the project's binaries go in the guest; /init knows these paths.
const AGENT_PATH: &str = "opt/edgeplane/bin/edgeplane";
const TESTS_DIR: &str = "opt/edgeplane/tests";
const CONFIG_PATH: &str = "etc/edgeplane-vm.conf";
const INIT: &str = include_str!("init.sh");

/// What a VM runs.
pub struct Payload<'a> {
    /// Where the guest's programs and their libraries come from (the kernel's architecture).
    pub userland: &'a Userland,
    pub agent: &'a Path,
    /// Test executables by the name /init runs them as.
    pub tests: &'a [(String, PathBuf)],
    /// The runs to do, in order: a test's name and the run's number.
    pub jobs: &'a [(String, u32)],
    pub filter: Option<&'a str>,
    pub test_timeout_secs: u64,
    /// How long the tests wait for a starting agent (the testbed's default is 20 s).
    pub agent_ready_secs: u64,
    /// Whether qemu translates another architecture's instructions: timing bounds set for a
    /// native CPU do not hold there (the tests read `EDGEPLANE_TEST_FOREIGN_CPU`).
    pub foreign_cpu: bool,
    /// Whether qemu emulates the CPU (TCG) rather than virtualising it: kernel text patched
    /// while another vCPU runs it may go unseen there (the tests read `EDGEPLANE_TEST_TCG`,
    /// see `edgeplane_testbed::tcg`).
    pub tcg: bool,
}

/// Writes the initramfs for `kernel` to `out` (an uncompressed cpio: see [`super::qemu`]) and
/// returns the size of the files in it.
pub fn build(kernel: &Kernel, payload: &Payload, out: &Path) -> anyhow::Result<u64> {
    let mut archive = Archive::default();
    for dir in ["proc", "sys", "dev", "run", "tmp", "root"] {
        archive.dir(dir)?;
    }
    archive.symlink("var/run", "/run")?;
    archive.bytes("init", INIT, 0o755)?;

    let userland = payload.userland;
    let busybox = userland.program("busybox")?;
    add_binary(&mut archive, userland, "bin/busybox", &busybox)?;
    // The host's busybox lists the applets: a foreign one can't run here, and Debian builds
    // both from the same configuration.
    let host_busybox = Userland::Host.program("busybox")?;
    for applet in output(Command::new(&host_busybox).arg("--list-full"))?.lines() {
        // The real tools take precedence: busybox's ip, tc and ping lack options the tests use.
        let name = applet.rsplit('/').next().unwrap_or(applet);
        if applet != "bin/busybox" && !HOST_TOOLS.contains(&name) {
            archive.symlink(applet, "/bin/busybox")?;
        }
    }
    for tool in HOST_TOOLS {
        add_binary(
            &mut archive,
            userland,
            &format!("usr/local/bin/{tool}"),
            &userland.program(tool)?,
        )?;
    }
    add_binary(&mut archive, userland, AGENT_PATH, payload.agent)?;
    for (name, path) in payload.tests {
        add_binary(&mut archive, userland, &format!("{TESTS_DIR}/{name}"), path)?;
    }

    let mut modules = Vec::new();
    for rel in load_order(&kernel.modules, MODULES)? {
        let (guest, data) = module_contents(&kernel.modules, &rel)?;
        let guest = format!("lib/modules/{}/{guest}", kernel.release);
        archive.bytes(&guest, data, 0o644)?;
        modules.push(format!("/{guest}"));
    }

    let jobs: Vec<String> = payload
        .jobs
        .iter()
        .map(|(test, run)| format!("{test}:{run}"))
        .collect();
    let config = format!(
        "MODULES={}\nJOBS={}\nFILTER={}\nTEST_TIMEOUT={}\nEDGEPLANE_TEST_READY_SECS={}\nEDGEPLANE_TEST_FOREIGN_CPU={}\nEDGEPLANE_TEST_TCG={}\n",
        sh_quote(&modules.join(" ")),
        sh_quote(&jobs.join(" ")),
        sh_quote(payload.filter.unwrap_or_default()),
        payload.test_timeout_secs,
        payload.agent_ready_secs,
        u8::from(payload.foreign_cpu),
        u8::from(payload.tcg),
    );
    archive.bytes(CONFIG_PATH, config, 0o644)?;

    let file = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut w = BufWriter::new(file);
    let size = archive.write(&mut w)?;
    w.flush()
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(size)
}

/// `path` in the guest, plus the shared libraries and dynamic loader it needs.
fn add_binary(
    archive: &mut Archive,
    userland: &Userland,
    path: &str,
    file: &Path,
) -> anyhow::Result<()> {
    archive.host_file(path, file, 0o755)?;
    for (guest, lib) in userland.libraries(file)? {
        archive.host_file(guest.trim_start_matches('/'), &lib, 0o755)?;
    }
    Ok(())
}

/// The modules' files (relative to the modules directory) with their dependencies, each after
/// what it depends on, from depmod's modules.dep.
fn load_order(dir: &Path, wanted: &[&str]) -> anyhow::Result<Vec<String>> {
    let dep_path = dir.join("modules.dep");
    let dep_text =
        fs::read_to_string(&dep_path).with_context(|| format!("reading {}", dep_path.display()))?;
    // file -> its dependencies' files; module name -> file.
    let mut deps: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    let mut files: BTreeMap<String, &str> = BTreeMap::new();
    for line in dep_text.lines() {
        let (file, rest) = line
            .split_once(':')
            .with_context(|| format!("{}: bad line {line:?}", dep_path.display()))?;
        deps.insert(file, rest.split_whitespace().collect());
        files.insert(module_name(file), file);
    }
    let builtin_path = dir.join("modules.builtin");
    let builtin: BTreeSet<String> = fs::read_to_string(&builtin_path)
        .with_context(|| format!("reading {}", builtin_path.display()))?
        .lines()
        .map(module_name)
        .collect();

    let mut order = Vec::new();
    for name in wanted {
        let key = module_name(name);
        match files.get(&key) {
            Some(file) => visit(file, &deps, &mut order),
            None if builtin.contains(&key) => {}
            None => bail!("module {name} is neither in modules.dep nor built in"),
        }
    }
    Ok(order)
}

/// Depth-first, dependencies first; each file once.
fn visit(file: &str, deps: &BTreeMap<&str, Vec<&str>>, order: &mut Vec<String>) {
    if order.iter().any(|f| f == file) {
        return;
    }
    for dep in deps.get(file).into_iter().flatten() {
        visit(dep, deps, order);
    }
    order.push(file.to_owned());
}

/// `kernel/net/can/can-raw.ko.xz` -> `can_raw`: the kernel treats - and _ alike in names.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// The module's path in the guest and its contents, decompressed: busybox's insmod reads only
/// plain ELF, and newer Debian kernels ship modules as .ko.xz.
fn module_contents(dir: &Path, rel: &str) -> anyhow::Result<(String, Vec<u8>)> {
    let path = dir.join(rel);
    if let Some(plain) = rel.strip_suffix(".xz") {
        let out = Command::new("xz")
            .arg("-dc")
            .arg(&path)
            .output()
            .context("running xz (Debian package xz-utils)")?;
        if !out.status.success() {
            bail!(
                "xz -dc {}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        return Ok((plain.to_owned(), out.stdout));
    }
    if !rel.ends_with(".ko") {
        bail!("{}: unsupported module compression", path.display());
    }
    let data = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok((rel.to_owned(), data))
}

/// Single-quotes a value for the shell.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}
