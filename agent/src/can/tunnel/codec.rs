//! cannelloni's UDP format, version 2: a 5-byte header (version, op code, sequence number,
//! frame count, big-endian) and then each frame as can_id (4, big-endian, flags included),
//! len (1, | 0x80 for CAN FD), flags (1, CAN FD only) and the data (none for remote frames).

use edgeplane_common::can::{
    CAN_EFF_FLAG, CAN_ERR_FLAG, CAN_MAX_DLEN, CAN_RTR_FLAG, CAN_SFF_MASK, CANFD_MAX_DLEN, CanFrame,
};

pub const VERSION: u8 = 2;
pub const OP_DATA: u8 = 0;
pub const HEADER_LEN: usize = 5;
/// Set in `len` for CAN FD frames; a `flags` byte follows.
pub const FD_LEN_FLAG: u8 = 0x80;

/// A frame and whether it is CAN FD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunnelFrame {
    pub frame: CanFrame,
    pub fd: bool,
}

impl TunnelFrame {
    fn data_len(&self) -> usize {
        if self.frame.can_id & CAN_RTR_FLAG != 0 {
            0
        } else {
            usize::from(self.frame.len)
        }
    }

    /// Bytes this frame takes in a datagram.
    pub fn encoded_len(&self) -> usize {
        4 + 1 + usize::from(self.fd) + self.data_len()
    }
}

/// Builds one datagram at a time, never larger than `max` bytes.
pub struct Encoder {
    buf: Vec<u8>,
    count: u16,
    max: usize,
}

impl Encoder {
    pub fn new(max: usize) -> Self {
        let mut buf = Vec::with_capacity(max);
        buf.resize(HEADER_LEN, 0);
        Self { buf, count: 0, max }
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn count(&self) -> u16 {
        self.count
    }

    /// Appends a frame; false (and nothing appended) when it would not fit.
    pub fn push(&mut self, f: &TunnelFrame) -> bool {
        if self.buf.len() + f.encoded_len() > self.max || self.count == u16::MAX {
            return false;
        }
        self.buf.extend_from_slice(&f.frame.can_id.to_be_bytes());
        let len = f
            .frame
            .len
            .min(if f.fd { CANFD_MAX_DLEN } else { CAN_MAX_DLEN });
        if f.fd {
            self.buf.push(len | FD_LEN_FLAG);
            self.buf.push(f.frame.flags);
        } else {
            self.buf.push(len);
        }
        let data = if f.frame.can_id & CAN_RTR_FLAG != 0 {
            0
        } else {
            usize::from(len)
        };
        self.buf.extend_from_slice(&f.frame.data[..data]);
        self.count += 1;
        true
    }

    /// Completes the datagram with its header; the encoder is then empty again.
    pub fn finish(&mut self, seq: u8) -> Vec<u8> {
        let mut out = std::mem::replace(&mut self.buf, Vec::with_capacity(self.max));
        self.buf.resize(HEADER_LEN, 0);
        out[0] = VERSION;
        out[1] = OP_DATA;
        out[2] = seq;
        out[3..5].copy_from_slice(&self.count.to_be_bytes());
        self.count = 0;
        out
    }
}

/// Why a datagram was rejected; nothing of it reaches the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("shorter than its header or than the frames it announces")]
    Truncated,
    #[error("protocol version {0}, not 2")]
    BadVersion(u8),
    #[error("op code {0}, not DATA")]
    BadOpCode(u8),
    #[error(
        "frame length {0} is no frame's length (0 to 8 classic; 0 to 8, 12, 16, 20, 24, 32, 48 or 64 CAN FD)"
    )]
    BadLength(u8),
    #[error("{0} bytes after the announced frames")]
    TrailingBytes(usize),
    #[error("announces {0} frames, over the receiver's max_frames_per_datagram")]
    TooManyFrames(u16),
    #[error("CAN FD flags {0:#04x}: only BRS (0x01), ESI (0x02) and FDF (0x04) exist")]
    BadFlags(u8),
    #[error("standard (11-bit) ID {0:#x} over 0x7FF")]
    BadId(u32),
    #[error("a CAN FD frame with the remote (RTR) flag: CAN FD has no remote frames")]
    FdRemote,
}

impl DecodeError {
    pub const LABELS: [&'static str; 9] = [
        "truncated",
        "bad_version",
        "bad_op_code",
        "bad_length",
        "trailing_bytes",
        "too_many_frames",
        "bad_flags",
        "bad_id",
        "fd_remote",
    ];

    /// Index of the metric label in [`Self::LABELS`].
    pub fn index(&self) -> usize {
        match self {
            Self::Truncated => 0,
            Self::BadVersion(_) => 1,
            Self::BadOpCode(_) => 2,
            Self::BadLength(_) => 3,
            Self::TrailingBytes(_) => 4,
            Self::TooManyFrames(_) => 5,
            Self::BadFlags(_) => 6,
            Self::BadId(_) => 7,
            Self::FdRemote => 8,
        }
    }
}

/// CAN FD's lengths: 0 to 8, then the eight DLCs 9 to 15 stand for these. The kernel pads any
/// other length up to the next, so the bus would carry other bytes than the datagram.
fn is_fd_length(len: u8) -> bool {
    len <= 8 || matches!(len, 12 | 16 | 20 | 24 | 32 | 48 | 64)
}

/// The CAN FD flags that exist: BRS, ESI and FDF (the kernel's mark of an FD frame).
const FD_FLAGS: u8 = 0x07;

/// Decodes a whole datagram of at most `max_frames` frames, or rejects it whole. Each frame
/// is one the bus can carry exactly as decoded.
pub fn decode(d: &[u8], max_frames: u16) -> Result<Vec<TunnelFrame>, DecodeError> {
    if d.len() < HEADER_LEN {
        return Err(DecodeError::Truncated);
    }
    if d[0] != VERSION {
        return Err(DecodeError::BadVersion(d[0]));
    }
    if d[1] != OP_DATA {
        return Err(DecodeError::BadOpCode(d[1]));
    }
    let count = u16::from_be_bytes([d[3], d[4]]);
    if count > max_frames {
        return Err(DecodeError::TooManyFrames(count));
    }
    let mut frames = Vec::with_capacity(usize::from(count).min(d.len() / 5));
    let mut at = HEADER_LEN;
    let take = |at: &mut usize, n: usize| -> Result<&[u8], DecodeError> {
        let s = d.get(*at..*at + n).ok_or(DecodeError::Truncated)?;
        *at += n;
        Ok(s)
    };
    for _ in 0..count {
        let can_id = u32::from_be_bytes(take(&mut at, 4)?.try_into().expect("4 bytes"));
        let raw_len = take(&mut at, 1)?[0];
        let fd = raw_len & FD_LEN_FLAG != 0;
        let len = raw_len & !FD_LEN_FLAG;
        let rtr = can_id & CAN_RTR_FLAG != 0;
        if fd && !is_fd_length(len) || !fd && len > CAN_MAX_DLEN {
            return Err(DecodeError::BadLength(len));
        }
        if fd && rtr {
            return Err(DecodeError::FdRemote);
        }
        if can_id & (CAN_EFF_FLAG | CAN_ERR_FLAG) == 0 && can_id & !CAN_RTR_FLAG > CAN_SFF_MASK {
            return Err(DecodeError::BadId(can_id & !CAN_RTR_FLAG));
        }
        let flags = if fd { take(&mut at, 1)?[0] } else { 0 };
        if flags & !FD_FLAGS != 0 {
            return Err(DecodeError::BadFlags(flags));
        }
        let mut frame = CanFrame {
            can_id,
            len,
            flags,
            ..CanFrame::default()
        };
        if !rtr {
            frame.data[..usize::from(len)].copy_from_slice(take(&mut at, usize::from(len))?);
        }
        frames.push(TunnelFrame { frame, fd });
    }
    if at != d.len() {
        return Err(DecodeError::TrailingBytes(d.len() - at));
    }
    Ok(frames)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANY: u16 = u16::MAX;

    fn frame(can_id: u32, data: &[u8], fd: bool) -> TunnelFrame {
        let mut f = CanFrame {
            can_id,
            len: data.len() as u8,
            ..CanFrame::default()
        };
        f.data[..data.len()].copy_from_slice(data);
        if fd {
            f.flags = 0x01; // BRS
        }
        TunnelFrame { frame: f, fd }
    }

    #[test]
    fn the_wire_format_is_cannelloni_v2() {
        let mut e = Encoder::new(1400);
        assert!(e.push(&frame(0x123, &[0xde, 0xad], false)));
        assert!(e.push(&frame(0x1234_5678 | CAN_EFF_FLAG, &[1, 2, 3], true)));
        let mut rtr = frame(0x7ff | CAN_RTR_FLAG, &[], false);
        rtr.frame.len = 4; // a DLC, but remote frames carry no data
        assert!(e.push(&rtr));
        let d = e.finish(7);
        assert_eq!(
            d,
            [
                2, 0, 7, 0, 3, // header
                0x00, 0x00, 0x01, 0x23, 2, 0xde, 0xad, // classic
                0x92, 0x34, 0x56, 0x78, 0x83, 0x01, 1, 2, 3, // FD: len | 0x80, flags
                0x40, 0x00, 0x07, 0xff, 4, // remote frame: no data
            ]
        );
        assert!(e.is_empty());
        assert_eq!(
            decode(&d, ANY).unwrap(),
            vec![
                frame(0x123, &[0xde, 0xad], false),
                frame(0x1234_5678 | CAN_EFF_FLAG, &[1, 2, 3], true),
                rtr
            ]
        );
    }

    #[test]
    fn datagrams_never_exceed_the_maximum() {
        let mut e = Encoder::new(HEADER_LEN + 2 * 70);
        let big = frame(0x100, &[0xaa; 64], true);
        assert!(e.push(&big));
        assert!(e.push(&big));
        assert!(!e.push(&big));
        assert_eq!(e.finish(0).len(), HEADER_LEN + 140);
    }

    #[test]
    fn malformed_datagrams_are_rejected_whole() {
        let mut e = Encoder::new(1400);
        e.push(&frame(0x123, &[1, 2, 3, 4], false));
        let good = e.finish(1);
        assert_eq!(decode(&good, ANY).unwrap().len(), 1);

        assert_eq!(decode(&good[..3], ANY), Err(DecodeError::Truncated));
        let mut v = good.clone();
        v[0] = 1;
        assert_eq!(decode(&v, ANY), Err(DecodeError::BadVersion(1)));
        let mut v = good.clone();
        v[1] = 1;
        assert_eq!(decode(&v, ANY), Err(DecodeError::BadOpCode(1)));
        let mut v = good.clone();
        v[4] = 2; // announces two frames, carries one
        assert_eq!(decode(&v, ANY), Err(DecodeError::Truncated));
        let mut v = good.clone();
        v[9] = 9; // classic frame longer than 8
        assert_eq!(decode(&v, ANY), Err(DecodeError::BadLength(9)));
        let mut v = good.clone();
        v[9] = 0x80 | 65;
        assert_eq!(decode(&v, ANY), Err(DecodeError::BadLength(65)));
        let mut v = good.clone();
        v.push(0);
        assert_eq!(decode(&v, ANY), Err(DecodeError::TrailingBytes(1)));
        let mut v = good;
        v.truncate(v.len() - 1); // data cut short
        assert_eq!(decode(&v, ANY), Err(DecodeError::Truncated));
        assert_eq!(decode(&[2, 0, 0, 0, 0], ANY).unwrap(), vec![]);
    }

    #[test]
    fn frames_the_bus_would_change_are_rejected() {
        let one = |id: u32, len: u8, rest: &[u8]| {
            let mut d = vec![2, 0, 9, 0, 1];
            d.extend_from_slice(&id.to_be_bytes());
            d.push(len);
            d.extend_from_slice(rest);
            d
        };
        // A CAN FD length the kernel would pad (13 -> 16), and each valid one.
        assert_eq!(
            decode(&one(0x100, 0x80 | 13, &[0; 14]), ANY),
            Err(DecodeError::BadLength(13))
        );
        for len in [0u8, 1, 8, 12, 16, 20, 24, 32, 48, 64] {
            let mut rest = vec![0x01];
            rest.resize(1 + usize::from(len), 0xaa);
            assert_eq!(
                decode(&one(0x100, 0x80 | len, &rest), ANY).unwrap()[0]
                    .frame
                    .len,
                len
            );
        }
        assert_eq!(
            decode(&one(0x100 | CAN_RTR_FLAG, 0x80, &[0]), ANY),
            Err(DecodeError::FdRemote)
        );
        assert_eq!(
            decode(&one(0x800, 0, &[]), ANY),
            Err(DecodeError::BadId(0x800))
        );
        assert_eq!(
            decode(&one(0x800 | CAN_RTR_FLAG, 0, &[]), ANY),
            Err(DecodeError::BadId(0x800))
        );
        // Extended and error-frame IDs use the 29 bits.
        assert!(decode(&one(0x800 | CAN_EFF_FLAG, 0, &[]), ANY).is_ok());
        assert!(decode(&one(0x800 | CAN_ERR_FLAG, 8, &[0; 8]), ANY).is_ok());
        assert_eq!(
            decode(&one(0x100, 0x80, &[0x08]), ANY),
            Err(DecodeError::BadFlags(0x08))
        );
        let f = decode(&one(0x100, 0x80, &[0x07]), ANY).unwrap()[0];
        assert_eq!(
            (f.fd, f.frame.flags),
            (true, 0x07),
            "flags kept exactly, FDF too"
        );
        // Too many frames: rejected before anything is decoded.
        let d = [2, 0, 0, 0x10, 0x00];
        assert_eq!(decode(&d, 0x0fff), Err(DecodeError::TooManyFrames(0x1000)));
        assert_eq!(decode(&d, 0x1000), Err(DecodeError::Truncated));
        for (i, e) in [DecodeError::Truncated, DecodeError::FdRemote]
            .iter()
            .enumerate()
        {
            assert_eq!(
                DecodeError::LABELS[e.index()],
                ["truncated", "fd_remote"][i]
            );
        }
    }
}
