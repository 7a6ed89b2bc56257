//! Loading the embedded eBPF object into the kernel, with errors that say what to do.

use std::io;

use aya::{
    Ebpf, EbpfError, EbpfLoader, GlobalData,
    maps::{MapError, MapInfo},
    programs::{Program, ProgramError},
};
use tracing::{debug, level_filters::LevelFilter, warn};

use crate::kernel::pins::{PinDir, PinNames};

/// The compiled eBPF programs, built by `build.rs` and embedded in the agent.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/edgeplane"));

/// Lines of verifier log shown with a rejection: the verdict is at the end.
const VERIFIER_EXCERPT_LINES: usize = 40;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "the kernel refused to create BPF maps ({0}): the agent needs CAP_BPF and CAP_NET_ADMIN \
         (CAP_SYS_ADMIN before Linux 5.8), or root"
    )]
    Permission(#[source] io::Error),
    #[error("cannot load the eBPF object: {0}")]
    Object(#[source] Box<EbpfError>),
    #[error("program `{0}` is missing from the eBPF object: rebuild the agent")]
    MissingProgram(&'static str),
    #[error(
        "the kernel's verifier rejected program `{program}` ({io_error}); the last lines of its log:\n{excerpt}"
    )]
    Verifier {
        program: &'static str,
        io_error: io::Error,
        excerpt: String,
    },
    #[error("loading program `{program}` failed: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("map `{0}` is missing from the eBPF object: rebuild the agent")]
    MissingMap(&'static str),
    #[error("pinning program `{program}` at {path}: {source}")]
    Pin {
        program: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("map `{map}` does not have the expected type: {source}")]
    MapType {
        map: &'static str,
        #[source]
        source: Box<MapError>,
    },
}

/// Loads the object and every listed program. Kernel log lines at or below the agent's current
/// tracing level are enabled in the programs themselves, so disabled ones cost nothing.
pub fn load(programs: &[&'static str]) -> Result<Ebpf, LoadError> {
    load_with(programs, None, None)
}

/// [`load`], with a global of the object set first: read-only data the programs see as
/// constants (the benchmark's limit program takes its rewrite so).
pub fn load_with_global<T: aya::Pod>(
    programs: &[&'static str],
    name: &'static str,
    value: &T,
) -> Result<Ebpf, LoadError> {
    load_with(programs, None, Some((name, GlobalData::from(value))))
}

/// [`load`], with the programs' maps pinned in `pins` (those pinned already are reused, so
/// counters and rules carry over from the previous agent) and the programs pinned too.
pub fn load_pinned(programs: &[&'static str], pins: &PinDir) -> Result<Ebpf, LoadError> {
    let mut ebpf = load_with(programs, Some(pins), None)?;
    for &name in programs {
        let path = pins.program(name);
        // The previous agent's program stays loaded while its links run it.
        let _ = std::fs::remove_file(&path);
        let program = ebpf
            .program_mut(name)
            .ok_or(LoadError::MissingProgram(name))?;
        program.pin(&path).map_err(|source| LoadError::Pin {
            program: name,
            path: path.clone(),
            source,
        })?;
    }
    Ok(ebpf)
}

fn load_with<'a>(
    programs: &[&'static str],
    pins: Option<&PinDir>,
    global: Option<(&'a str, GlobalData<'a>)>,
) -> Result<Ebpf, LoadError> {
    raise_memlock_limit();
    let level = kernel_log_level(LevelFilter::current());
    let mut loader = EbpfLoader::new();
    loader.override_global("AYA_LOG_LEVEL", &level, true);
    if let Some((name, value)) = global {
        loader.override_global(name, value, true);
    }
    let pinned = match pins {
        Some(pins) => pinned_maps(pins)?,
        None => Vec::new(),
    };
    for (name, path) in &pinned {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader.load(EBPF_OBJECT).map_err(object_error)?;
    for &name in programs {
        load_program(&mut ebpf, name)?;
    }
    Ok(ebpf)
}

/// The names under which the agent pins: the object's own maps and its programs.
pub fn pin_names() -> Result<PinNames, LoadError> {
    let obj = aya_obj::Object::parse(EBPF_OBJECT)
        .map_err(|e| LoadError::Object(Box::new(EbpfError::ParseError(e))))?;
    Ok(PinNames {
        maps: obj.maps.keys().filter(|n| is_own_map(n)).cloned().collect(),
        programs: obj.programs.keys().cloned().collect(),
    })
}

/// Not a data section nor aya-log's.
fn is_own_map(name: &str) -> bool {
    !(name.starts_with('.') || name.starts_with("AYA_"))
}

/// The object's own maps (not its data sections nor aya-log's), with their pin paths. A pinned
/// map whose layout differs from this build's (an upgrade changed it) is unpinned, so a new
/// one replaces it: the old programs keep theirs until their links are taken over.
fn pinned_maps(pins: &PinDir) -> Result<Vec<(String, std::path::PathBuf)>, LoadError> {
    let obj = aya_obj::Object::parse(EBPF_OBJECT)
        .map_err(|e| LoadError::Object(Box::new(EbpfError::ParseError(e))))?;
    let mut out = Vec::new();
    for (name, def) in &obj.maps {
        if !is_own_map(name) {
            continue;
        }
        let path = pins.map(name);
        if let Ok(pinned) = MapInfo::from_pin(&path) {
            // Flags are left out: aya adds some at creation (BPF_F_RDONLY_PROG for devmaps).
            let layout = |t: Option<u32>, k, v, n| format!("type {t:?} key {k} value {v} max {n}");
            let (have, want) = (
                layout(
                    pinned.map_type().ok().map(|t| t as u32),
                    pinned.key_size(),
                    pinned.value_size(),
                    pinned.max_entries(),
                ),
                layout(
                    Some(def.map_type()),
                    def.key_size(),
                    def.value_size(),
                    def.max_entries(),
                ),
            );
            if have != want {
                warn!(
                    map = name,
                    "the pinned map has another layout ({have}) than this version's ({want}): replacing it (its contents start afresh)"
                );
                let _ = std::fs::remove_file(&path);
            }
        }
        out.push((name.clone(), path));
    }
    Ok(out)
}

pub fn load_program(ebpf: &mut Ebpf, name: &'static str) -> Result<(), LoadError> {
    let program = ebpf
        .program_mut(name)
        .ok_or(LoadError::MissingProgram(name))?;
    let result = match program {
        Program::Xdp(p) => p.load(),
        Program::SchedClassifier(p) => p.load(),
        Program::RawTracePoint(p) => p.load(),
        Program::KProbe(p) => p.load(),
        Program::CgroupSkb(p) => p.load(),
        other => unreachable!("program {name} has unexpected type {:?}", other.prog_type()),
    };
    result.map_err(|e| match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => LoadError::Verifier {
            program: name,
            io_error,
            excerpt: excerpt(&verifier_log.to_string(), VERIFIER_EXCERPT_LINES),
        },
        other => LoadError::Program {
            program: name,
            source: Box::new(other),
        },
    })
}

fn object_error(e: EbpfError) -> LoadError {
    if let EbpfError::MapError(MapError::CreateError { io_error, .. }) = &e
        && io_error.raw_os_error() == Some(libc::EPERM)
    {
        return LoadError::Permission(io::Error::from_raw_os_error(libc::EPERM));
    }
    LoadError::Object(Box::new(e))
}

/// The last `n` non-empty lines of a log.
pub fn excerpt(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// aya-log's levels: Error = 1 ... Trace = 5; 0 disables every kernel log line.
fn kernel_log_level(filter: LevelFilter) -> u8 {
    match filter.into_level() {
        None => 0,
        Some(tracing::Level::ERROR) => 1,
        Some(tracing::Level::WARN) => 2,
        Some(tracing::Level::INFO) => 3,
        Some(tracing::Level::DEBUG) => 4,
        Some(tracing::Level::TRACE) => 5,
    }
}

/// Before Linux 5.11 BPF maps are charged to RLIMIT_MEMLOCK, whose default is tiny.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        debug!(
            "could not raise RLIMIT_MEMLOCK: {}",
            io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpt_keeps_the_verdict_at_the_end() {
        let log = "0: r1 = 0\n\n1: exit\nR0 !read_ok\nprocessed 2 insns\n";
        assert_eq!(excerpt(log, 2), "R0 !read_ok\nprocessed 2 insns");
        assert_eq!(excerpt(log, 10).lines().count(), 4);
    }

    /// The agent finds maps and programs by these names: a rename on one side only would
    /// first show as a failed load on a vehicle.
    #[test]
    fn every_map_and_program_name_is_in_the_embedded_object() {
        use edgeplane_common::{XDP_PASS_PROGRAM, can, latency, udp_forward};
        let obj = aya_obj::Object::parse(EBPF_OBJECT).unwrap();
        let maps = [
            udp_forward::RULES_MAP,
            udp_forward::RULES_V4_MAP,
            udp_forward::INGRESS_MAP,
            udp_forward::STATS_MAP,
            udp_forward::EGRESS_MAP,
            can::RULES_MAP,
            can::INGRESS_MAP,
            can::RULE_STATS_MAP,
            can::INGRESS_STATS_MAP,
            can::WATCH_MAP,
            can::TUNNEL_RING,
            can::TUNNEL_SOCKETS_MAP,
            latency::CONFIG_MAP,
            latency::UDP_FORWARD_MAP,
            latency::CAN_FORWARD_MAP,
            latency::DELIVERY_MAP,
            latency::DELIVERY_PORTS_MAP,
            latency::DELIVERY_IFACES_MAP,
            latency::EVENTS_RING,
            latency::EVENTS_DROPPED_MAP,
        ];
        let programs = [
            XDP_PASS_PROGRAM,
            udp_forward::XDP_PROGRAM,
            udp_forward::TC_PROGRAM,
            udp_forward::LIMIT_PROGRAM,
            can::PROGRAM,
            latency::EGRESS_PROGRAM,
            latency::XDP_FLUSH_PROGRAM,
            latency::UDP_QUEUED_PROGRAM,
            latency::CAN_QUEUED_PROGRAM,
            latency::UDP_READ_PROGRAM,
            latency::CAN_READ_PROGRAM,
        ];
        for m in maps {
            assert!(obj.maps.contains_key(m), "map {m} is not in the object");
        }
        for p in programs {
            assert!(
                obj.programs.contains_key(p),
                "program {p} is not in the object"
            );
        }
    }

    #[test]
    fn kernel_log_follows_the_agent_level() {
        assert_eq!(kernel_log_level(LevelFilter::OFF), 0);
        assert_eq!(kernel_log_level(LevelFilter::INFO), 3);
        assert_eq!(kernel_log_level(LevelFilter::TRACE), 5);
    }
}
