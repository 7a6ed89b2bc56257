//! Damaging the agent's state record (the pinned `state` array map of 4 KiB chunks) the way a
//! crash, a bug or another version would, for the recovery tests.

use std::path::Path;

use anyhow::Context as _;
use aya::maps::{Array, Map, MapData};

const CHUNK: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Damage {
    /// The record's header stays, the second half of its JSON is zeroed: a write cut short.
    Truncated,
    /// The first chunk overwritten with bytes that are no record at all.
    Garbage,
    /// Another format version's magic ahead of an otherwise intact record.
    WrongVersion,
}

impl Damage {
    pub const ALL: [Self; 3] = [Self::Truncated, Self::Garbage, Self::WrongVersion];
}

/// Damages the record in the pin directory `dir` in place.
pub fn damage(dir: &Path, how: Damage) -> anyhow::Result<()> {
    let path = dir.join("state");
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let mut map: Array<MapData, [u8; CHUNK]> = Array::try_from(Map::Array(data))?;
    let mut first = map.get(&0, 0)?;
    anyhow::ensure!(&first[..4] == b"EPS1", "no record in {}", path.display());
    match how {
        Damage::Truncated => {
            let len = u32::from_le_bytes(first[4..8].try_into()?) as usize;
            let keep = 16 + len.min(CHUNK - 16) / 2;
            first[keep..].fill(0);
        }
        Damage::Garbage => {
            // A fixed xorshift sequence: the same bytes every run.
            let mut x: u32 = 0x9e37_79b9;
            for b in first.iter_mut() {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                *b = x as u8;
            }
        }
        Damage::WrongVersion => first[..4].copy_from_slice(b"EPS9"),
    }
    map.set(0, first, 0)?;
    Ok(())
}
