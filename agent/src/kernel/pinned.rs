//! The pinned data plane seen from outside the agent: what runs (for `status` and `prog`),
//! attaching and detaching pinned programs by hand, and removing it all (`down`).

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use aya::programs::{Program, ProgramInfo, SchedClassifier, Xdp};
use serde::Serialize;

use crate::{
    can::gateway::{Gateway, GatewayError, UID_PREFIX, UID_PREFIX_MASK},
    host::netdev,
    kernel::attach::{self, Hook},
    kernel::pins::{DirLock, PinDir, PinError},
    kernel::state::{AgentRecord, AgentState, AttachmentRecord, StateStore},
};

#[derive(Debug, thiserror::Error)]
pub enum PinnedError {
    #[error(transparent)]
    Pins(#[from] PinError),
    #[error(transparent)]
    State(#[from] crate::kernel::state::StateError),
    #[error(transparent)]
    Load(#[from] crate::kernel::loader::LoadError),
    #[error(
        "the running agent (pid {pid}) manages the data plane in {dir}: change its config and \
         reload it (SIGHUP, `systemctl reload edgeplane`), or stop it first"
    )]
    AgentRunning { pid: u32, dir: PathBuf },
    #[error("no program `{name}` is pinned in {dir} (`edgeplane prog list` shows those that are)")]
    NoSuchProgram { name: String, dir: PathBuf },
    #[error("reading program {what}: {source}")]
    Program {
        what: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error(
        "`{name}` is a {kind} program: it attaches to a kernel event, not to an interface, and \
         the agent does that"
    )]
    NotAttachable { name: String, kind: &'static str },
    #[error("interface {0} does not exist")]
    NoSuchInterface(String),
    #[error("`{program}` is not attached to {iface}")]
    NotAttached { program: String, iface: String },
    #[error(transparent)]
    Attach(#[from] attach::AttachError),
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    #[error(
        "the agent (pid {pid}) did not exit within {secs} s of SIGTERM: stop it with \
         `systemctl stop edgeplane` or `kill -9 {pid}`, then run `edgeplane down` again"
    )]
    StillRunning { pid: u32, secs: u64 },
    #[error(
        "cannot signal the agent (pid {pid}): {source}; stop it, then run `edgeplane down` again"
    )]
    Signal {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
}

/// A program pinned by the agent, as the kernel describes it.
#[derive(Debug, Clone, Serialize)]
pub struct PinnedProgram {
    pub name: String,
    pub id: u32,
    /// The program's tag (a hash of its instructions), in hex as bpftool prints it.
    pub tag: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Unix seconds.
    pub loaded_at: Option<u64>,
    pub translated_bytes: Option<u32>,
    pub jited_bytes: u32,
    pub verified_insns: Option<u32>,
    pub map_ids: Vec<u32>,
    /// Cumulative run time and count; zero unless `kernel.bpf_stats_enabled` is 1.
    pub run_time_ns: u64,
    pub run_count: u64,
    /// Where it is attached.
    pub attached: Vec<AttachPoint>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AttachPoint {
    pub iface: String,
    pub hook: Hook,
    /// False when the interface is gone (or was replaced by another with the same name).
    pub present: bool,
}

/// What is pinned in a bpffs directory.
#[derive(Debug, Clone, Serialize)]
pub struct Inventory {
    pub dir: PathBuf,
    /// Whether an agent holds the directory now.
    pub agent_running: bool,
    /// The agent that runs it, or last ran it.
    pub agent: Option<AgentRecord>,
    pub programs: Vec<PinnedProgram>,
    /// Attachments of programs that are not pinned (left by an older agent).
    pub other_attachments: Vec<AttachmentRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_error: Option<String>,
}

/// What is pinned in `dir`; `None` when nothing is.
pub fn inventory(dir: &Path) -> Result<Option<Inventory>, PinnedError> {
    let pins = match PinDir::existing(dir) {
        Ok(p) if dir.exists() => p,
        Ok(_) | Err(PinError::NotBpffs { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let (state, state_error) = read_state(&pins);
    let mut programs = Vec::new();
    for name in pins.programs()? {
        let info =
            ProgramInfo::from_pin(pins.program(&name)).map_err(|e| PinnedError::Program {
                what: name.clone(),
                source: Box::new(e),
            })?;
        programs.push(describe(&name, &info, &state.attachments));
    }
    let other_attachments = state
        .attachments
        .iter()
        .filter(|a| !programs.iter().any(|p| p.name == a.program))
        .cloned()
        .collect();
    Ok(Some(Inventory {
        dir: dir.to_owned(),
        agent_running: pins.is_locked(),
        agent: state.agent,
        programs,
        other_attachments,
        state_error,
    }))
}

fn read_state(pins: &PinDir) -> (AgentState, Option<String>) {
    if !pins.state().exists() {
        return (AgentState::default(), None);
    }
    match StateStore::open(&pins.state()).and_then(|s| s.load()) {
        Ok(s) => (s, None),
        Err(e) => (AgentState::default(), Some(e.to_string())),
    }
}

fn describe(name: &str, info: &ProgramInfo, attachments: &[AttachmentRecord]) -> PinnedProgram {
    PinnedProgram {
        name: name.to_owned(),
        id: info.id(),
        tag: format!("{:016x}", info.tag()),
        kind: kind_name(info),
        loaded_at: info
            .loaded_at()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs()),
        translated_bytes: info.size_translated(),
        jited_bytes: info.size_jitted(),
        verified_insns: info.verified_instruction_count(),
        map_ids: info.map_ids().ok().flatten().unwrap_or_default(),
        run_time_ns: info.run_time().as_nanos() as u64,
        run_count: info.run_count(),
        attached: attachments
            .iter()
            .filter(|a| a.program == name)
            .map(|a| AttachPoint {
                iface: a.iface.clone(),
                hook: a.hook,
                present: netdev::index(&a.iface) == Some(a.ifindex),
            })
            .collect(),
    }
}

fn kind_name(info: &ProgramInfo) -> &'static str {
    use aya_obj::generated::bpf_prog_type;
    match info.program_type() {
        bpf_prog_type::BPF_PROG_TYPE_XDP => "xdp",
        bpf_prog_type::BPF_PROG_TYPE_SCHED_CLS => "sched_cls",
        bpf_prog_type::BPF_PROG_TYPE_KPROBE => "kprobe",
        bpf_prog_type::BPF_PROG_TYPE_TRACEPOINT => "tracepoint",
        _ => "other",
    }
}

/// The pin directory locked for a change by hand, refused while an agent runs it.
fn locked(dir: &Path) -> Result<(PinDir, DirLock, StateStore), PinnedError> {
    let pins = PinDir::existing(dir)?;
    let store = StateStore::open_or_create(&pins)?;
    let lock = pins.lock(|| None).map_err(|e| match e {
        PinError::Locked { .. } => PinnedError::AgentRunning {
            pid: store.load().ok().and_then(|s| s.agent).map_or(0, |a| a.pid),
            dir: dir.to_owned(),
        },
        other => other.into(),
    })?;
    Ok((pins, lock, store))
}

/// Attaches pinned program `name` to `iface` (XDP programs at XDP, tc ones at tc ingress), the
/// way the agent does, and records it so that the next agent takes it over.
pub fn attach_pinned(dir: &Path, name: &str, iface: &str) -> Result<AttachmentRecord, PinnedError> {
    let (pins, _lock, mut store) = locked(dir)?;
    let ifindex =
        netdev::index(iface).ok_or_else(|| PinnedError::NoSuchInterface(iface.to_owned()))?;
    let path = pins.program(name);
    if !path.exists() {
        return Err(PinnedError::NoSuchProgram {
            name: name.to_owned(),
            dir: dir.to_owned(),
        });
    }
    let info = ProgramInfo::from_pin(&path).map_err(|e| PinnedError::Program {
        what: name.to_owned(),
        source: Box::new(e),
    })?;
    let program_err = |e| PinnedError::Program {
        what: name.to_owned(),
        source: Box::new(e),
    };
    let (mut program, hook) = match kind_name(&info) {
        "xdp" => (
            Program::Xdp(
                Xdp::from_pin(&path, aya_obj::programs::XdpAttachType::Interface)
                    .map_err(program_err)?,
            ),
            Hook::Xdp,
        ),
        "sched_cls" => (
            Program::SchedClassifier(SchedClassifier::from_pin(&path).map_err(program_err)?),
            if name == edgeplane_common::latency::EGRESS_PROGRAM {
                Hook::TcEgress
            } else {
                Hook::Tc
            },
        ),
        kind => {
            return Err(PinnedError::NotAttachable {
                name: name.to_owned(),
                kind,
            });
        }
    };
    let a = attach::attach_program(&mut program, &pins, name, hook, iface, ifindex)?;
    let record = a.record();
    drop(a); // stays attached
    let mut state = store.load().unwrap_or_default();
    state
        .attachments
        .retain(|r| !(r.iface == record.iface && r.hook == record.hook));
    state.attachments.push(record.clone());
    store.save(&state)?;
    Ok(record)
}

/// Detaches program `name` from `iface` and forgets the attachment.
pub fn detach_pinned(dir: &Path, name: &str, iface: &str) -> Result<AttachmentRecord, PinnedError> {
    let (pins, _lock, mut store) = locked(dir)?;
    let mut state = store.load()?;
    let pos = state
        .attachments
        .iter()
        .position(|r| r.program == name && r.iface == iface)
        .ok_or_else(|| PinnedError::NotAttached {
            program: name.to_owned(),
            iface: iface.to_owned(),
        })?;
    let record = state.attachments.remove(pos);
    if let Some(a) = attach::recorded(&pins, &record) {
        attach::detach(a)?;
    }
    store.save(&state)?;
    Ok(record)
}

/// What `down` removed.
#[derive(Debug, Default, Serialize)]
pub struct Removed {
    /// The agent stopped first, if one ran.
    pub stopped_agent: Option<u32>,
    pub detached: Vec<AttachmentRecord>,
    pub can_gw_jobs: usize,
    pub unpinned: Option<PathBuf>,
    /// What others pinned in the same directory: left alone (and so is the directory).
    pub foreign: Vec<PathBuf>,
}

/// Removes the data plane pinned in `dir`: stops a running agent first (SIGTERM, then waits up
/// to `wait` for it to exit), detaches every program, removes our can-gw jobs and unpins it all.
/// `progress` hears about each step.
pub fn down(
    dir: &Path,
    wait: Duration,
    mut progress: impl FnMut(&str),
) -> Result<Removed, PinnedError> {
    let mut removed = Removed::default();
    let pins = match PinDir::existing(dir) {
        Ok(p) if dir.exists() => p,
        Ok(_) | Err(PinError::NotBpffs { .. }) => return Ok(removed),
        Err(e) => return Err(e.into()),
    };
    let (state, state_error) = read_state(&pins);
    if let Some(e) = state_error {
        progress(&format!(
            "warning: {e}; removing what can be found without it"
        ));
    }
    let lock = match pins.lock(|| None) {
        Ok(l) => l,
        Err(PinError::Locked { .. }) => {
            let pid = state.agent.as_ref().map_or(0, |a| a.pid);
            progress(&format!("stopping the running agent (pid {pid})"));
            stop_agent(pid)?;
            removed.stopped_agent = Some(pid);
            wait_for_lock(&pins, pid, wait)?
        }
        Err(e) => return Err(e.into()),
    };
    // The agent may have changed things on its way out.
    let (mut state, unreadable) = read_state(&pins);
    if unreadable.is_some() {
        // What the kernel shows is ours, then (plain can-gw jobs can't be told from others').
        state.attachments = attach::find_ours(&pins);
    }
    for r in &state.attachments {
        if let Some(a) = attach::recorded(&pins, r) {
            attach::detach(a)?;
            progress(&format!(
                "detached {} from {} ({})",
                r.program, r.iface, r.hook
            ));
            removed.detached.push(r.clone());
        }
    }
    removed.can_gw_jobs = remove_jobs(&state)?;
    if removed.can_gw_jobs > 0 {
        progress(&format!("removed {} can-gw job(s)", removed.can_gw_jobs));
    }
    removed.foreign = pins.remove(&crate::kernel::loader::pin_names()?)?;
    drop(lock);
    if !removed.foreign.is_empty() {
        progress(&format!(
            "left {} entries edgeplane did not pin: {}",
            removed.foreign.len(),
            removed
                .foreign
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    progress(&format!("unpinned {}", dir.display()));
    removed.unpinned = Some(dir.to_owned());
    Ok(removed)
}

fn stop_agent(pid: u32) -> Result<(), PinnedError> {
    // SAFETY: kill has no memory-safety preconditions.
    if pid == 0 || unsafe { libc::kill(pid as i32, libc::SIGTERM) } != 0 {
        return Err(PinnedError::Signal {
            pid,
            source: if pid == 0 {
                std::io::Error::other("its pid is not recorded")
            } else {
                std::io::Error::last_os_error()
            },
        });
    }
    Ok(())
}

fn wait_for_lock(pins: &PinDir, pid: u32, wait: Duration) -> Result<DirLock, PinnedError> {
    let deadline = Instant::now() + wait;
    loop {
        match pins.lock(|| None) {
            Ok(l) => return Ok(l),
            Err(PinError::Locked { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(PinError::Locked { .. }) => {
                return Err(PinnedError::StillRunning {
                    pid,
                    secs: wait.as_secs(),
                });
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Removes every can-gw job with our user id, and the recorded jobs without one.
fn remove_jobs(state: &AgentState) -> Result<usize, PinnedError> {
    let mut gw = match Gateway::open() {
        Ok(gw) => gw,
        Err(_) => return Ok(0),
    };
    let jobs = match gw.dump() {
        Ok(j) => j,
        Err(GatewayError::NotLoaded(_)) => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    let plain: Vec<_> = state.can.plain_jobs.values().flatten().collect();
    let mut n = 0;
    for (_, job) in jobs {
        let ours = job.uid & UID_PREFIX_MASK == UID_PREFIX
            || plain.iter().any(|p| {
                (
                    p.src_ifindex,
                    p.dst_ifindex,
                    p.filter_id,
                    p.filter_mask,
                    p.flags,
                    p.hops,
                ) == (
                    job.src_ifindex,
                    job.dst_ifindex,
                    job.filter_id,
                    job.filter_mask,
                    job.flags,
                    job.hops,
                ) && job.mods.is_empty()
            });
        if ours {
            gw.remove(&job)?;
            n += 1;
        }
    }
    Ok(n)
}

/// Seconds since the Unix epoch, for ages in tables.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
