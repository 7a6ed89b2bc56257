//! The agent's bookkeeping, kept beside the pinned data plane so that a restarted agent knows
//! what it finds there: which rule owns which counter slot, where our programs are attached,
//! which can-gw jobs are ours, and which agent runs the data plane now.
//!
//! It is JSON in a pinned array map rather than a file: it lives exactly as long as the pins
//! (a file in /run could outlive or predate them), and `edgeplane down` removes it with them.
//! Each save fills a new map, pins it beside the record and renames it over the record, so a
//! reader sees the old record or the new one, never a mix. A record that is unreadable anyway
//! (another version's, or damaged) is not trusted: the agent recovers what it needs from what
//! the kernel runs (see [`crate::runtime::dataplane::Dataplane::load`]).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use aya::maps::{Array, Map, MapData, MapError};
use serde::{Deserialize, Serialize};

use crate::{kernel::attach::Hook, kernel::pins::PinDir};

const CHUNK: usize = 4096;
const CHUNKS: u32 = 64;
const MAGIC: [u8; 4] = *b"EPS1";
/// Magic, length, FNV-1a of the JSON.
const HEADER: usize = 16;
type Chunk = [u8; CHUNK];

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("the agent state map {path}: {source}")]
    Map {
        path: PathBuf,
        #[source]
        source: Box<MapError>,
    },
    #[error("pinning the agent state map at {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("the agent state in {path} is unreadable ({reason})")]
    Corrupt { path: PathBuf, reason: String },
    #[error("replacing the agent state {path}: {source}")]
    Replace {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent state is {0} bytes, more than the {max} the state map holds", max = CHUNK * CHUNKS as usize - HEADER)]
    TooLarge(usize),
}

/// Everything a restarted agent needs to take the data plane over.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentState {
    /// The agent that runs (or last ran) the data plane.
    pub agent: Option<AgentRecord>,
    /// Where our programs are attached.
    pub attachments: Vec<AttachmentRecord>,
    pub udp: UdpState,
    pub can: CanState,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub pid: u32,
    pub version: String,
    /// Unix seconds.
    pub started_at: u64,
    pub config: PathBuf,
    pub http: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentRecord {
    pub program: String,
    pub iface: String,
    pub ifindex: u32,
    pub hook: Hook,
}

/// Counter slots by owner name: rules by rule name, ingress interfaces by interface name.
pub type SlotNames = BTreeMap<String, u32>;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UdpState {
    pub rules: SlotNames,
    pub ingress: SlotNames,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CanState {
    pub routes: SlotNames,
    pub ingress: SlotNames,
    /// can-gw jobs without modifications, per route: the kernel keeps no user id for those,
    /// so this is the only record that they are ours. (Jobs with modifications carry the
    /// route's slot in their user id.)
    pub plain_jobs: BTreeMap<String, Vec<PlainJob>>,
}

/// A can-gw job without modifications: these fields are all of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlainJob {
    pub src_ifindex: u32,
    pub dst_ifindex: u32,
    pub filter_id: u32,
    pub filter_mask: u32,
    pub flags: u16,
    pub hops: u8,
}

/// The pinned map holding [`AgentState`].
pub struct StateStore {
    map: Array<MapData, Chunk>,
    path: PathBuf,
}

impl StateStore {
    /// Opens the pinned state map, creating and pinning an empty one when there is none.
    pub fn open_or_create(pins: &PinDir) -> Result<Self, StateError> {
        let path = pins.state();
        if !path.exists() {
            let map = Array::<MapData, Chunk>::create(CHUNKS, 0).map_err(|e| map_err(&path, e))?;
            map.pin(&path).map_err(|source| StateError::Pin {
                path: path.clone(),
                source,
            })?;
        }
        Self::open(&path)
    }

    /// Opens an existing pinned state map.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        let data = MapData::from_pin(path).map_err(|e| map_err(path, e))?;
        let map = Array::try_from(Map::Array(data)).map_err(|e| map_err(path, e))?;
        Ok(Self {
            map,
            path: path.to_owned(),
        })
    }

    /// The stored state; the default when nothing was stored yet.
    pub fn load(&self) -> Result<AgentState, StateError> {
        let corrupt = |reason: String| StateError::Corrupt {
            path: self.path.clone(),
            reason,
        };
        let first = self.map.get(&0, 0).map_err(|e| map_err(&self.path, e))?;
        if first[..4] == [0; 4] {
            return Ok(AgentState::default());
        }
        if first[..4] != MAGIC {
            return Err(corrupt("unknown format".into()));
        }
        let len = u32::from_le_bytes(first[4..8].try_into().expect("4 bytes")) as usize;
        let hash = u64::from_le_bytes(first[8..16].try_into().expect("8 bytes"));
        if len > CHUNK * CHUNKS as usize - HEADER {
            return Err(corrupt(format!("length {len}")));
        }
        let mut bytes = first[HEADER..].to_vec();
        let mut i = 1;
        while bytes.len() < len {
            bytes.extend_from_slice(&self.map.get(&i, 0).map_err(|e| map_err(&self.path, e))?);
            i += 1;
        }
        bytes.truncate(len);
        if fnv1a(&bytes) != hash {
            return Err(corrupt("checksum mismatch (torn write?)".into()));
        }
        serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))
    }

    /// Stores `state`: fills a new map, pins it beside the record and renames it over the
    /// record (atomic on bpffs as on any file system).
    pub fn save(&mut self, state: &AgentState) -> Result<(), StateError> {
        let map = Array::<MapData, Chunk>::create(CHUNKS, 0).map_err(|e| map_err(&self.path, e))?;
        let mut fresh = Self {
            map,
            path: self.path.clone(),
        };
        fresh.write(state)?;
        let pending = pending(&self.path);
        // Left by a save cut short (the record is then the previous one): replaced.
        let _ = std::fs::remove_file(&pending);
        fresh.map.pin(&pending).map_err(|source| StateError::Pin {
            path: pending.clone(),
            source,
        })?;
        std::fs::rename(&pending, &self.path).map_err(|source| {
            let _ = std::fs::remove_file(&pending);
            StateError::Replace {
                path: self.path.clone(),
                source,
            }
        })?;
        *self = Self::open(&self.path)?;
        Ok(())
    }

    /// Writes `state` into this map, the header last.
    fn write(&mut self, state: &AgentState) -> Result<(), StateError> {
        let json = serde_json::to_vec(state).expect("the state serializes");
        if json.len() > CHUNK * CHUNKS as usize - HEADER {
            return Err(StateError::TooLarge(json.len()));
        }
        let mut first = [0u8; CHUNK];
        first[..4].copy_from_slice(&MAGIC);
        first[4..8].copy_from_slice(&(json.len() as u32).to_le_bytes());
        first[8..16].copy_from_slice(&fnv1a(&json).to_le_bytes());
        let head = json.len().min(CHUNK - HEADER);
        first[HEADER..HEADER + head].copy_from_slice(&json[..head]);
        for (i, part) in json[head..].chunks(CHUNK).enumerate() {
            let mut c = [0u8; CHUNK];
            c[..part.len()].copy_from_slice(part);
            self.map
                .set(i as u32 + 1, c, 0)
                .map_err(|e| map_err(&self.path, e))?;
        }
        self.map
            .set(0, first, 0)
            .map_err(|e| map_err(&self.path, e))
    }
}

/// Where a save pins its new map before the rename.
fn pending(path: &Path) -> PathBuf {
    // No dot: bpffs refuses names with one (reserved for its own files).
    path.with_file_name("state-new")
}

fn map_err(path: &Path, source: MapError) -> StateError {
    StateError::Map {
        path: path.to_owned(),
        source: Box::new(source),
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
