//! The queue's segment files: a magic header, then records one after another, each
//!
//! ```text
//! u32 LE  payload length
//! u32 LE  CRC-32 of everything after this field (samples, timestamp, payload)
//! u32 LE  samples in the payload
//! i64 LE  collection timestamp, ms since the epoch
//! ..      payload: a snappy-compressed (raw block) remote-write WriteRequest
//! ```
//!
//! A crash can leave the last record short (a torn tail); bit rot or a foreign write leaves a
//! record whose CRC does not match. [`scan`] tells the two apart and says where the valid
//! records end; the file is outside input and every byte of it is checked.

use super::super::proto::WriteRequest;

pub const MAGIC: &[u8; 8] = b"EPRWQ\x00\x00\x01";
pub const HEADER: usize = 20;
/// No collection comes near this; a larger length is corruption, not a record to allocate.
pub const MAX_PAYLOAD: usize = 16 << 20;

/// A valid record in a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordMeta {
    /// Of its header in the file.
    pub offset: u64,
    pub payload_len: u32,
    pub samples: u32,
    pub timestamp_ms: i64,
}

impl RecordMeta {
    /// Bytes it takes in the file.
    pub fn size(&self) -> u64 {
        HEADER as u64 + u64::from(self.payload_len)
    }
}

/// How the valid records of a segment end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tail {
    /// At the end of the file.
    Clean,
    /// A record cut short: what a crash mid-write leaves.
    Torn,
    /// A record whose length is impossible or whose CRC does not match.
    Corrupt,
    /// The file does not start with [`MAGIC`] (or is shorter).
    NotASegment,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    pub records: Vec<RecordMeta>,
    /// Bytes of the file that hold the magic and the valid records.
    pub valid_len: u64,
    pub tail: Tail,
}

/// The valid records of a segment file's contents, in order, up to the first that is not.
pub fn scan(file: &[u8]) -> Scan {
    let mut out = Scan {
        records: Vec::new(),
        valid_len: 0,
        tail: Tail::Clean,
    };
    if file.len() < MAGIC.len() || &file[..MAGIC.len()] != MAGIC {
        // A file cut before its magic was complete is a torn segment, not a foreign one.
        out.tail = if MAGIC.starts_with(file) {
            Tail::Torn
        } else {
            Tail::NotASegment
        };
        return out;
    }
    let mut at = MAGIC.len();
    loop {
        out.valid_len = at as u64;
        let rest = &file[at..];
        if rest.is_empty() {
            return out;
        }
        match record_at(rest) {
            Ok((meta, size)) => {
                out.records.push(RecordMeta {
                    offset: at as u64,
                    ..meta
                });
                at += size;
            }
            Err(tail) => {
                out.tail = tail;
                return out;
            }
        }
    }
}

/// The record at the start of `buf` and its size, or why there is none.
fn record_at(buf: &[u8]) -> Result<(RecordMeta, usize), Tail> {
    if buf.len() < HEADER {
        return Err(Tail::Torn);
    }
    let u32_at = |i: usize| u32::from_le_bytes(buf[i..i + 4].try_into().expect("4 bytes"));
    let len = u32_at(0) as usize;
    if len > MAX_PAYLOAD {
        return Err(Tail::Corrupt);
    }
    let Some(body) = buf.get(8..HEADER + len) else {
        return Err(Tail::Torn);
    };
    if crc32fast::hash(body) != u32_at(4) {
        return Err(Tail::Corrupt);
    }
    let meta = RecordMeta {
        offset: 0,
        payload_len: len as u32,
        samples: u32_at(8),
        timestamp_ms: i64::from_le_bytes(buf[12..20].try_into().expect("8 bytes")),
    };
    Ok((meta, HEADER + len))
}

/// A record's bytes in the file for a payload.
pub fn encode(samples: u32, timestamp_ms: i64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&samples.to_le_bytes());
    out.extend_from_slice(&timestamp_ms.to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out[8..]);
    out[4..8].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Checks a record read back (its header and payload, `meta.size()` bytes) and returns the
/// payload, or `None` when it no longer matches its CRC.
pub fn verified_payload<'a>(record: &'a [u8], meta: &RecordMeta) -> Option<&'a [u8]> {
    match record_at(record) {
        Ok((m, size)) if size == record.len() && m.samples == meta.samples => {
            Some(&record[HEADER..])
        }
        _ => None,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("not snappy-compressed: {0}")]
    Snappy(#[from] snap::Error),
    #[error("not a remote-write WriteRequest: {0}")]
    Protobuf(#[from] prost::DecodeError),
}

/// Compresses an encoded WriteRequest for a record.
pub fn compress(write_request: &[u8]) -> Vec<u8> {
    snap::raw::Encoder::new()
        .compress_vec(write_request)
        .expect("snappy compresses any input below 4 GiB")
}

/// The encoded WriteRequest a record's payload holds (for sending, which concatenates them).
pub fn decompress(payload: &[u8]) -> Result<Vec<u8>, PayloadError> {
    // The length the header claims is checked against the bound before anything is allocated.
    if snap::raw::decompress_len(payload)? > MAX_PAYLOAD * 8 {
        return Err(PayloadError::Snappy(snap::Error::TooBig {
            given: snap::raw::decompress_len(payload)? as u64,
            max: (MAX_PAYLOAD * 8) as u64,
        }));
    }
    Ok(snap::raw::Decoder::new().decompress_vec(payload)?)
}

/// A record's payload decoded, for inspection.
pub fn decode(payload: &[u8]) -> Result<WriteRequest, PayloadError> {
    Ok(prost::Message::decode(decompress(payload)?.as_slice())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(records: &[(u32, i64, &[u8])]) -> Vec<u8> {
        let mut f = MAGIC.to_vec();
        for (s, t, p) in records {
            f.extend(encode(*s, *t, p));
        }
        f
    }

    #[test]
    fn records_read_back_in_order() {
        let f = segment(&[(1, 10, b"a"), (2, 20, b""), (3, 30, b"ccc")]);
        let s = scan(&f);
        assert_eq!(s.tail, Tail::Clean);
        assert_eq!(s.valid_len, f.len() as u64);
        let got: Vec<(u32, i64, u64)> = s
            .records
            .iter()
            .map(|r| (r.samples, r.timestamp_ms, r.offset))
            .collect();
        assert_eq!(got, [(1, 10, 8), (2, 20, 29), (3, 30, 49)]);
        let r = s.records[2];
        let bytes = &f[r.offset as usize..(r.offset + r.size()) as usize];
        assert_eq!(verified_payload(bytes, &r), Some(&b"ccc"[..]));
    }

    #[test]
    fn a_torn_tail_is_cut_and_nothing_before_it_is_lost() {
        let f = segment(&[(1, 10, b"first"), (2, 20, b"second")]);
        let whole = scan(&f).valid_len;
        let first_end = scan(&f).records[1].offset;
        // Every cut inside the second record keeps the first, whole.
        for cut in first_end as usize..f.len() {
            let s = scan(&f[..cut]);
            assert_eq!(s.records.len(), 1, "cut at {cut}");
            assert_eq!(s.valid_len, first_end);
            assert_eq!(
                s.tail,
                if cut == first_end as usize {
                    Tail::Clean
                } else {
                    Tail::Torn
                },
                "cut at {cut}"
            );
        }
        assert_eq!(scan(&f).records.len(), 2);
        assert_eq!(whole, f.len() as u64);
        assert_eq!(scan(&f[..3]).tail, Tail::Torn);
        assert_eq!(scan(b"").tail, Tail::Torn);
    }

    #[test]
    fn a_corrupted_record_is_detected() {
        let f = segment(&[(1, 10, b"first"), (2, 20, b"second"), (3, 30, b"third")]);
        let second = scan(&f).records[1];
        // A flipped bit anywhere in the second record but its length: CRC mismatch.
        for byte in second.offset as usize + 4..(second.offset + second.size()) as usize {
            let mut bad = f.clone();
            bad[byte] ^= 0x10;
            let s = scan(&bad);
            assert_eq!(s.tail, Tail::Corrupt, "byte {byte}");
            assert_eq!(s.records.len(), 1);
            assert_eq!(s.valid_len, second.offset);
            let bytes = &bad[second.offset as usize..(second.offset + second.size()) as usize];
            assert_eq!(verified_payload(bytes, &second), None);
        }
        // An impossible length is corruption, not a reason to allocate.
        let mut bad = f.clone();
        bad[second.offset as usize + 3] = 0xff;
        assert_eq!(scan(&bad).tail, Tail::Corrupt);
        assert_eq!(scan(b"not a segment").tail, Tail::NotASegment);
    }

    #[test]
    fn payloads_round_trip_through_snappy_and_protobuf() {
        let wr = WriteRequest {
            timeseries: vec![super::super::super::proto::TimeSeries {
                labels: vec![],
                samples: vec![super::super::super::proto::Sample {
                    value: 1.5,
                    timestamp: 7,
                }],
            }],
        };
        let payload = compress(&prost::Message::encode_to_vec(&wr));
        assert_eq!(decode(&payload).unwrap(), wr);
        assert!(decode(b"\xff\xff\xff\xff\x0f").is_err());
    }
}
