//! The agent binary as a child process inside a namespace.

use std::{
    fs::File,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Child,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{http, netns::Netns};

/// The release agent built by `cargo build --release` (which `cargo xtask test` runs first).
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("EDGEPLANE_BIN") {
        return p.into();
    }
    // target/<profile>/deps/<test> -> target/<profile>/edgeplane, else target/release/edgeplane.
    let exe = std::env::current_exe().expect("test binary path");
    let beside = exe
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("edgeplane"));
    match beside {
        Some(p) if p.is_file() => p,
        _ => crate::workspace().join("target/release/edgeplane"),
    }
}

/// A running agent; sends SIGTERM and waits on drop.
pub struct Agent {
    child: Option<Child>,
    pub metrics: SocketAddr,
    pub ns: String,
    /// Its stderr goes to a file: a pipe nobody reads would block a chatty agent.
    log: PathBuf,
    pub config: PathBuf,
    /// Where it pins the data plane.
    pub bpffs: PathBuf,
    leave_running: bool,
}

/// How to start an agent.
#[derive(Debug, Clone, Default)]
pub struct Start {
    /// Leave the data plane running on exit (the product's default) instead of passing
    /// `--detach-on-exit`; whoever sets this removes it (see [`down`]).
    pub leave_running: bool,
    /// Pin directory; by default one of its own under [`crate::bpffs::ROOT`].
    pub bpffs: Option<PathBuf>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Extra `edgeplane run` arguments (`--vin`, ...).
    pub args: Vec<String>,
    /// Return once /readyz answers at all, 503 included (a rule is meant to wait).
    pub not_ready_ok: bool,
}

static STARTED: AtomicU32 = AtomicU32::new(0);

impl Agent {
    /// Starts `edgeplane run --detach-on-exit` in `ns` with `config` written to a temp file,
    /// its data plane pinned in a directory of its own; waits for /readyz.
    pub fn start(ns: &Netns, config: &str, log_level: &str) -> anyhow::Result<Self> {
        Self::start_with(ns, config, log_level, &Start::default())
    }

    /// [`Agent::start`] with options.
    pub fn start_with(
        ns: &Netns,
        config: &str,
        log_level: &str,
        opts: &Start,
    ) -> anyhow::Result<Self> {
        Self::start_wrapped(ns, config, log_level, opts, &[])
    }

    /// [`Agent::start_with`] through `wrapper`, a command that execs the rest of its arguments
    /// (the agent's command line is appended), e.g. `setpriv` to drop capabilities.
    pub fn start_wrapped(
        ns: &Netns,
        config: &str,
        log_level: &str,
        opts: &Start,
        wrapper: &[&str],
    ) -> anyhow::Result<Self> {
        let bin = binary();
        if !bin.is_file() {
            bail!(
                "agent binary {} not found: run `cargo build --release -p edgeplane` (or `cargo xtask test`)",
                bin.display()
            );
        }
        let path = std::env::temp_dir().join(format!("{}.toml", ns.name));
        std::fs::write(&path, config)?;
        let listen: SocketAddr = config
            .lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix("listen = ")
                    .map(|v| v.trim_matches('"').to_owned())
            })
            .unwrap_or_else(|| "127.0.0.1:9464".into())
            .parse()?;
        let n = STARTED.fetch_add(1, Ordering::Relaxed);
        let log = std::env::temp_dir().join(format!("{}-{n}.log", ns.name));
        let bpffs = match &opts.bpffs {
            Some(p) => p.clone(),
            None => crate::bpffs::dir_for(&ns.name)?,
        };
        let bin = bin.to_str().expect("utf-8 path");
        let mut cmd = match wrapper.split_first() {
            None => ns.command(bin),
            Some((program, args)) => {
                let mut c = ns.command(program);
                c.args(args).arg(bin);
                c
            }
        };
        cmd.args(["run", "--log-level", log_level, "--config"])
            .arg(&path)
            .arg("--bpffs")
            .arg(&bpffs)
            .args(&opts.args)
            .envs(opts.env.iter().map(|(k, v)| (k, v)));
        if !opts.leave_running {
            cmd.arg("--detach-on-exit");
        }
        let child = cmd
            .stderr(File::create(&log)?)
            .spawn()
            .context("starting the agent")?;
        let mut agent = Self {
            child: Some(child),
            metrics: listen,
            ns: ns.name.clone(),
            log,
            config: path,
            bpffs,
            leave_running: opts.leave_running,
        };
        let _in_ns = ns.enter()?;
        let ready_within = ready_within();
        let deadline = Instant::now() + ready_within;
        loop {
            match http::get(listen, "/readyz") {
                Ok((200, _)) => return Ok(agent),
                Ok((503, _)) if opts.not_ready_ok => return Ok(agent),
                _ => {}
            }
            if let Some(status) = agent.child.as_mut().expect("running").try_wait()? {
                let log = agent.stop_and_log()?;
                bail!("agent exited with {status} before it was ready:\n{log}");
            }
            if Instant::now() > deadline {
                let log = agent.stop_and_log()?;
                bail!("agent not ready after {} s:\n{log}", ready_within.as_secs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts `edgeplane events --json --count N` beside the agent and returns it once the
    /// agent counts its stream open (`edgeplane_http_event_streams`; the agent subscribes before
    /// it counts), so no event after this returns is missed. A CLI that starts slowly (an
    /// emulated CPU) would otherwise miss the first events and wait for ever.
    pub fn stream_events(&self, count: u32) -> anyhow::Result<Child> {
        let open = |a: &Self| -> anyhow::Result<f64> {
            http::metric(&a.get("/metrics")?.1, "edgeplane_http_event_streams")
        };
        let before = open(self)?;
        let mut child = std::process::Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(binary())
            .args(["events", "--json", "--count", &count.to_string()])
            .arg("--agent")
            .arg(self.metrics.to_string())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("starting edgeplane events")?;
        let limit = ready_within();
        let deadline = Instant::now() + limit;
        loop {
            if open(self)? > before {
                return Ok(child);
            }
            match child.try_wait()? {
                // It had all its events already.
                Some(status) if status.success() => return Ok(child),
                Some(status) => {
                    let printed = output_within(&mut child, Duration::ZERO).unwrap_or_else(|e| e);
                    bail!("edgeplane events exited with {status} before it streamed: {printed}");
                }
                None => {}
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("edgeplane events not streaming after {} s", limit.as_secs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// GET `path` from the agent's HTTP endpoint, from inside its namespace.
    pub fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let _in = crate::netns::enter(&self.ns)?;
        http::get(self.metrics, path)
    }

    /// The agent's `/metrics`, which must answer 200.
    pub fn scrape(&self) -> String {
        let (code, body) = self.get("/metrics").unwrap();
        assert_eq!(code, 200, "/metrics answered {code}: {body}");
        body
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(self.pid() as i32, sig) };
    }

    /// SIGTERM, wait (at most 10 s, then SIGKILL), and return everything it logged.
    pub fn stop_and_log(&mut self) -> anyhow::Result<String> {
        let Some(mut child) = self.child.take() else {
            return Ok(String::new());
        };
        let status = crate::terminate(&mut child, Duration::from_secs(10))?;
        Ok(format!("{}[exit status: {status}]", self.log_so_far()))
    }

    /// What the agent has logged until now.
    pub fn log_so_far(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// How long a starting agent may take to answer /readyz: 20 s, or `EDGEPLANE_TEST_READY_SECS`
/// where loading is known to be slower (the VM harness sets it for an emulated foreign CPU,
/// where loading the programs into the kernel takes tens of seconds).
fn ready_within() -> Duration {
    let secs = std::env::var("EDGEPLANE_TEST_READY_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    Duration::from_secs(secs)
}

/// Whether the tests run on a CPU qemu translates from another architecture (the VM harness's
/// arm64 guests on x86_64): tens of times slower than native, so bounds on how long the data
/// path may take are set for that there.
pub fn foreign_cpu() -> bool {
    std::env::var("EDGEPLANE_TEST_FOREIGN_CPU").is_ok_and(|v| v == "1")
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.stop_and_log();
        // An agent killed before it could detach leaves its pins: remove them.
        if !self.leave_running && self.bpffs.exists() {
            let _ = down(&self.ns, &self.bpffs);
        }
    }
}

/// Runs `edgeplane down --bpffs DIR` in namespace `ns`; returns its output.
pub fn down(ns: &str, bpffs: &Path) -> anyhow::Result<String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(binary())
        .arg("down")
        .arg("--bpffs")
        .arg(bpffs)
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("edgeplane down failed ({}):\n{text}", out.status);
    }
    Ok(text)
}

/// A CLI child's stdout once it exits successfully; an error with what it printed when it
/// fails or runs past `limit` (it is killed then).
pub fn output_within(child: &mut std::process::Child, limit: Duration) -> Result<String, String> {
    use std::io::Read as _;
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    match status {
        Some(s) if s.success() => Ok(out),
        Some(_) => Err(format!("the command failed: {err}")),
        None => Err(format!(
            "the command still ran after {limit:?}; it printed:\n{out}{err}"
        )),
    }
}
