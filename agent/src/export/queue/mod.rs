//! The store-and-forward queue of one endpoint: collections are appended (and synced) to
//! segment files in its directory before they are sent, and removed only once the endpoint
//! acknowledged them. Bounded by `max_bytes` of queued records: when full, the oldest go and
//! are counted. A `head` file remembers how far the first segment was acknowledged.
//!
//! A crash leaves at most a torn last record, which [`Queue::open`] cuts; a record that fails
//! its CRC ends what is read of its segment, counted. Losing the `head` file (a crash between
//! acknowledgement and its rename) only sends a few collections again, which the server takes
//! as duplicates of identical samples.

pub mod format;

use std::{
    collections::VecDeque,
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::FileExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use self::format::{MAGIC, RecordMeta, Tail};

/// What the queue tells its metrics and `/readyz`, updated in one piece after each change, so
/// it is read without waiting for disk I/O and always adds up.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueStats {
    pub bytes: u64,
    pub samples: u64,
    /// Timestamp of the oldest queued collection (ms), 0 when empty.
    pub oldest_ms: i64,
    pub queued_total: u64,
    pub sent_total: u64,
    pub dropped_full_total: u64,
    pub dropped_rejected_total: u64,
    pub dropped_write_error_total: u64,
    pub cut_torn_bytes_total: u64,
    pub cut_corrupt_bytes_total: u64,
}

#[derive(Debug)]
struct Segment {
    id: u64,
    path: PathBuf,
    records: VecDeque<RecordMeta>,
}

/// Where a record is: segment id and offset. Records are ordered by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position(u64, u64);

/// The oldest queued collections, read for sending.
#[derive(Debug)]
pub struct Batch {
    /// Snappy-compressed WriteRequests, oldest first.
    pub payloads: Vec<Vec<u8>>,
    pub samples: u64,
    /// Of the last record in the batch.
    pub last: Position,
}

#[derive(Debug)]
pub struct Queue {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    segments: VecDeque<Segment>,
    /// The last segment, open for appending, and its length.
    writer: Option<(File, u64)>,
    stats: QueueStats,
    shared: Arc<Mutex<QueueStats>>,
    /// The last record of the batch being sent, and the samples of it dropped meanwhile
    /// (queue full): if the endpoint takes the batch, those were sent, not lost.
    in_flight: Option<(Position, u64)>,
}

impl Queue {
    /// Opens (creating) the queue in `dir`: every segment is scanned, a torn or corrupt tail
    /// of the last one cut off, and what the `head` file says was acknowledged skipped.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let mut ids: Vec<u64> = fs::read_dir(dir)?
            .filter_map(|e| {
                let name = e.ok()?.file_name();
                name.to_str()?.strip_suffix(".seg")?.parse().ok()
            })
            .collect();
        ids.sort_unstable();
        let head = read_head(dir);
        let mut q = Self {
            dir: dir.to_owned(),
            max_bytes,
            segment_bytes: (max_bytes / 8).clamp(4096, 4 << 20),
            segments: VecDeque::new(),
            writer: None,
            stats: QueueStats::default(),
            shared: Arc::default(),
            in_flight: None,
        };
        let last = ids.last().copied();
        for id in ids {
            let path = segment_path(dir, id);
            let bytes = fs::read(&path)?;
            let scan = format::scan(&bytes);
            let cut = bytes.len() as u64 - scan.valid_len;
            match scan.tail {
                Tail::Clean => {}
                Tail::Torn => q.stats.cut_torn_bytes_total += cut,
                Tail::Corrupt | Tail::NotASegment => q.stats.cut_corrupt_bytes_total += cut,
            }
            if scan.tail != Tail::Clean {
                tracing::warn!(
                    segment = %path.display(),
                    bytes = cut,
                    "remote-write queue: {} cut off",
                    if scan.tail == Tail::Torn { "a torn record (from a crash)" } else { "corrupt data" }
                );
            }
            if Some(id) == last && scan.tail != Tail::NotASegment {
                // Appends go on after the last valid record.
                let f = OpenOptions::new().write(true).open(&path)?;
                f.set_len(scan.valid_len)?;
                q.writer = Some((f, scan.valid_len));
            }
            let records: VecDeque<RecordMeta> = scan
                .records
                .into_iter()
                .filter(|r| head.is_none_or(|h| Position(id, r.offset) >= h))
                .collect();
            q.segments.push_back(Segment { id, path, records });
        }
        for s in &q.segments {
            for r in &s.records {
                q.stats.bytes += r.size();
                q.stats.samples += u64::from(r.samples);
            }
        }
        q.collect_empty()?;
        q.publish();
        Ok(q)
    }

    /// The stats, shared with readers that must not wait for the queue's disk I/O.
    pub fn stats(&self) -> Arc<Mutex<QueueStats>> {
        self.shared.clone()
    }

    /// Appends one collection, synced to disk, dropping the oldest records to stay within
    /// `max_bytes`. A failed write is counted (its samples dropped) and returned.
    pub fn append(&mut self, samples: u32, timestamp_ms: i64, payload: &[u8]) -> io::Result<()> {
        let record = format::encode(samples, timestamp_ms, payload);
        let size = record.len() as u64;
        while self.stats.bytes + size > self.max_bytes && self.stats.samples > 0 {
            self.drop_oldest();
        }
        let r = self.write(&record, samples, timestamp_ms);
        if r.is_err() {
            self.stats.dropped_write_error_total += u64::from(samples);
        }
        self.collect_empty()?;
        self.publish();
        r
    }

    fn write(&mut self, record: &[u8], samples: u32, timestamp_ms: i64) -> io::Result<()> {
        if self
            .writer
            .as_ref()
            .is_none_or(|(_, len)| *len >= self.segment_bytes)
        {
            self.rotate()?;
        }
        let (file, len) = self.writer.as_mut().expect("a segment open for writing");
        // On failure, whatever part was written is overwritten by the next append.
        file.write_all_at(record, *len)?;
        file.sync_data()?;
        let meta = RecordMeta {
            offset: *len,
            payload_len: (record.len() - format::HEADER) as u32,
            samples,
            timestamp_ms,
        };
        *len += record.len() as u64;
        self.segments
            .back_mut()
            .expect("the writer's segment")
            .records
            .push_back(meta);
        self.stats.bytes += meta.size();
        self.stats.samples += u64::from(samples);
        self.stats.queued_total += u64::from(samples);
        Ok(())
    }

    /// Starts a new segment after the last.
    fn rotate(&mut self) -> io::Result<()> {
        let id = self.segments.back().map_or(0, |s| s.id + 1);
        let path = segment_path(&self.dir, id);
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        f.write_all(MAGIC)?;
        f.sync_all()?;
        File::open(&self.dir)?.sync_all()?;
        self.writer = Some((f, MAGIC.len() as u64));
        self.segments.push_back(Segment {
            id,
            path,
            records: VecDeque::new(),
        });
        Ok(())
    }

    fn drop_oldest(&mut self) {
        if let Some((id, r)) = self
            .segments
            .iter_mut()
            .find_map(|s| Some((s.id, s.records.pop_front()?)))
        {
            if let Some((last, dropped)) = &mut self.in_flight
                && Position(id, r.offset) <= *last
            {
                *dropped += u64::from(r.samples);
            }
            self.stats.bytes -= r.size();
            self.stats.samples -= u64::from(r.samples);
            self.stats.dropped_full_total += u64::from(r.samples);
        }
    }

    /// The oldest records, at least one and up to `max_samples` samples; `None` when empty.
    /// Records that no longer pass their CRC are dropped (counted as corrupt) on the way.
    pub fn peek(&mut self, max_samples: u64) -> io::Result<Option<Batch>> {
        let mut batch: Option<Batch> = None;
        let mut corrupt = Vec::new();
        'segments: for s in &self.segments {
            let file = File::open(&s.path)?;
            for r in &s.records {
                let n = u64::from(r.samples);
                if batch.as_ref().is_some_and(|b| b.samples + n > max_samples) {
                    break 'segments;
                }
                let mut buf = vec![0; r.size() as usize];
                let ok = file.read_exact_at(&mut buf, r.offset).is_ok();
                let Some(payload) = ok.then(|| format::verified_payload(&buf, r)).flatten() else {
                    corrupt.push(Position(s.id, r.offset));
                    continue;
                };
                let b = batch.get_or_insert_with(|| Batch {
                    payloads: Vec::new(),
                    samples: 0,
                    last: Position(s.id, r.offset),
                });
                b.payloads.push(payload.to_vec());
                b.samples += n;
                b.last = Position(s.id, r.offset);
            }
        }
        self.in_flight = batch.as_ref().map(|b| (b.last, 0));
        if !corrupt.is_empty() {
            for s in &mut self.segments {
                s.records.retain(|r| {
                    let bad = corrupt.contains(&Position(s.id, r.offset));
                    if bad {
                        self.stats.bytes -= r.size();
                        self.stats.samples -= u64::from(r.samples);
                        self.stats.cut_corrupt_bytes_total += r.size();
                    }
                    !bad
                });
            }
            tracing::warn!(
                records = corrupt.len(),
                "remote-write queue: corrupt records dropped"
            );
            self.publish();
        }
        Ok(batch)
    }

    /// Removes the records up to `last` (those the queue still holds: the oldest may have
    /// been dropped meanwhile), counting them sent, or dropped as rejected by the endpoint.
    pub fn ack(&mut self, last: Position, delivered: bool) -> io::Result<()> {
        if let Some((l, dropped)) = self.in_flight.take()
            && l == last
            && delivered
        {
            self.stats.dropped_full_total -= dropped;
            self.stats.sent_total += dropped;
        }
        for s in &mut self.segments {
            while let Some(r) = s.records.front() {
                if Position(s.id, r.offset) > last {
                    break;
                }
                let (size, n) = (r.size(), u64::from(r.samples));
                s.records.pop_front();
                self.stats.bytes -= size;
                self.stats.samples -= n;
                if delivered {
                    self.stats.sent_total += n;
                } else {
                    self.stats.dropped_rejected_total += n;
                }
            }
        }
        self.collect_empty()?;
        if let Some(first) = self.segments.front() {
            // With nothing left in it, the first segment is the last: the head is where the
            // next record will go.
            let next = match &self.writer {
                Some((_, len)) if self.segments.len() == 1 => *len,
                _ => u64::MAX,
            };
            let at = first.records.front().map_or(next, |r| r.offset);
            write_head(&self.dir, Position(first.id, at))?;
        }
        self.publish();
        Ok(())
    }

    /// Deletes the segments before the last that hold nothing unsent.
    fn collect_empty(&mut self) -> io::Result<()> {
        while self.segments.len() > 1 && self.segments[0].records.is_empty() {
            let s = self.segments.pop_front().expect("a segment");
            match fs::remove_file(&s.path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    fn publish(&mut self) {
        self.stats.oldest_ms = self
            .segments
            .iter()
            .find_map(|s| s.records.front())
            .map_or(0, |r| r.timestamp_ms);
        *self.shared.lock().expect("stats lock") = self.stats.clone();
    }
}

/// The records in a queue directory as a reader sees them now (the agent may be appending):
/// `(timestamp_ms, samples)` of each valid record not yet acknowledged, oldest first.
pub fn inspect(dir: &Path) -> io::Result<Vec<(i64, u32)>> {
    let mut ids: Vec<u64> = fs::read_dir(dir)?
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()?
                .strip_suffix(".seg")?
                .parse()
                .ok()
        })
        .collect();
    ids.sort_unstable();
    let head = read_head(dir);
    let mut out = Vec::new();
    for id in ids {
        let Ok(bytes) = fs::read(segment_path(dir, id)) else {
            continue; // deleted since it was listed
        };
        for r in format::scan(&bytes).records {
            if head.is_none_or(|h| Position(id, r.offset) >= h) {
                out.push((r.timestamp_ms, r.samples));
            }
        }
    }
    Ok(out)
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.seg"))
}

/// The first unacknowledged position, if the head file is there and intact.
fn read_head(dir: &Path) -> Option<Position> {
    let b = fs::read(dir.join("head")).ok()?;
    let b: [u8; 20] = b.try_into().ok()?;
    let (data, crc) = b.split_at(16);
    (crc32fast::hash(data).to_le_bytes() == crc).then(|| {
        Position(
            u64::from_le_bytes(data[..8].try_into().expect("8")),
            u64::from_le_bytes(data[8..].try_into().expect("8")),
        )
    })
}

/// Written aside and renamed over, so a crash leaves the old head or the new one.
fn write_head(dir: &Path, p: Position) -> io::Result<()> {
    let mut b = Vec::with_capacity(20);
    b.extend_from_slice(&p.0.to_le_bytes());
    b.extend_from_slice(&p.1.to_le_bytes());
    b.extend_from_slice(&crc32fast::hash(&b).to_le_bytes());
    let tmp = dir.join("head.tmp");
    fs::write(&tmp, &b)?;
    fs::rename(&tmp, dir.join("head"))
}

#[cfg(test)]
mod tests;
