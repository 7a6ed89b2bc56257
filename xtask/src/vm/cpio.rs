//! A minimal writer of "newc" cpio archives, the format the kernel unpacks an initramfs from.
//!
//! Entries are collected first and written sorted by path, so every directory precedes what it
//! contains (the kernel creates entries in archive order), and the archive is reproducible:
//! owner root, mtime 0, inode numbers by position.

use std::{
    collections::{BTreeMap, btree_map},
    io::Write,
    path::PathBuf,
};

use anyhow::{Context as _, bail};

#[derive(Debug, PartialEq)]
enum Entry {
    Dir,
    /// Contents read from a host file when the archive is written.
    HostFile {
        source: PathBuf,
        mode: u32,
    },
    Bytes {
        data: Vec<u8>,
        mode: u32,
    },
    Symlink {
        target: String,
    },
}

const S_IFMT: u32 = 0o170_000;
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;

#[derive(Default)]
pub struct Archive {
    /// Keyed by path without a leading slash.
    entries: BTreeMap<String, Entry>,
}

impl Archive {
    /// Adds the host file `source` as `path`, with permission bits `mode`.
    pub fn host_file(
        &mut self,
        path: &str,
        source: impl Into<PathBuf>,
        mode: u32,
    ) -> anyhow::Result<()> {
        let source = source.into();
        self.insert(path, Entry::HostFile { source, mode })
    }

    pub fn bytes(&mut self, path: &str, data: impl Into<Vec<u8>>, mode: u32) -> anyhow::Result<()> {
        let data = data.into();
        self.insert(path, Entry::Bytes { data, mode })
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> anyhow::Result<()> {
        let target = target.to_owned();
        self.insert(path, Entry::Symlink { target })
    }

    pub fn dir(&mut self, path: &str) -> anyhow::Result<()> {
        self.insert(path, Entry::Dir)
    }

    /// Adds `entry` and the directories above it. Adding the same entry twice is fine (many
    /// binaries share libc); two different entries at one path are a bug.
    fn insert(&mut self, path: &str, entry: Entry) -> anyhow::Result<()> {
        let path = path.trim_matches('/');
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent)?;
        }
        match self.entries.entry(path.to_owned()) {
            btree_map::Entry::Vacant(v) => {
                v.insert(entry);
            }
            btree_map::Entry::Occupied(o) if *o.get() == entry => {}
            btree_map::Entry::Occupied(o) => {
                bail!(
                    "initramfs: {path} added twice, as {:?} and {entry:?}",
                    o.get()
                )
            }
        }
        Ok(())
    }

    /// Writes the archive, returning the number of bytes of file contents in it.
    pub fn write(&self, out: &mut impl Write) -> anyhow::Result<u64> {
        let mut content = 0u64;
        for (ino, (path, entry)) in self.entries.iter().enumerate() {
            let (mode, data) = match entry {
                Entry::Dir => (S_IFDIR | 0o755, Vec::new()),
                Entry::HostFile { source, mode } => (
                    S_IFREG | mode,
                    std::fs::read(source)
                        .with_context(|| format!("reading {}", source.display()))?,
                ),
                Entry::Bytes { data, mode } => (S_IFREG | mode, data.clone()),
                Entry::Symlink { target } => (S_IFLNK | 0o777, target.clone().into_bytes()),
            };
            content += data.len() as u64;
            // ino starts at 1: the kernel treats inode 0 specially for hard links.
            write_entry(out, ino as u32 + 1, mode, path, &data)?;
        }
        write_entry(out, 0, 0, "TRAILER!!!", &[])?;
        Ok(content)
    }
}

fn write_entry(
    out: &mut impl Write,
    ino: u32,
    mode: u32,
    name: &str,
    data: &[u8],
) -> anyhow::Result<()> {
    let name_len = name.len() + 1; // with its NUL
    let size = u32::try_from(data.len()).with_context(|| format!("{name} is over 4 GiB"))?;
    let nlink = if mode & S_IFMT == S_IFDIR { 2 } else { 1 };
    // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor,
    // rdevminor, namesize, check
    write!(
        out,
        "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}{:08x}{:08x}{:08x}{:08x}{name_len:08x}{:08x}",
        0, 0, 0, 0, 0, 0, 0, 0
    )?;
    out.write_all(name.as_bytes())?;
    out.write_all(&[0])?;
    // The header (110 bytes) plus the name, then the data, are each padded to 4 bytes.
    pad(out, 110 + name_len)?;
    out.write_all(data)?;
    pad(out, data.len())?;
    Ok(())
}

fn pad(out: &mut impl Write, len: usize) -> std::io::Result<()> {
    out.write_all(&[0; 3][..(4 - len % 4) % 4])
}
