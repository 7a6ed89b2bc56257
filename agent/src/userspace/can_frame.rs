//! can-gw's frame processing, in userspace: the filter, the modifications (AND, OR, XOR, SET on
//! id, length, flags and data) and the XOR and CRC8 checksums of a compiled [`Job`], with the
//! kernel's rules (net/can/gw.c, Linux 5.11+): classic frames' data is 8 bytes and their
//! length is a DLC (9 to 15 kept in len8_dlc), checksums run only on modified frames, CRC8
//! before XOR, and a frame whose length no longer fits is deleted.
//!
//! Running the same job description the kernel path hands to can-gw keeps both paths' routes
//! one definition.

use edgeplane_common::can::{CAN_MAX_DLEN, CANFD_MAX_DLEN, CanFrame};

use crate::can::gateway::{CAN_INV_FILTER, CGW_FLAGS_CAN_FD, Job, Op, field};

/// What a job does with one frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Not this job's frame (filter, or the other frame kind).
    Skip,
    /// Route this (possibly modified) frame.
    Send(CanFrame),
    /// A modification left an invalid length: can-gw deletes such frames.
    Deleted,
}

/// Largest raw DLC of a classic frame (9 to 15 mean 8 data bytes).
const CAN_MAX_RAW_DLC: u8 = 15;

impl Job {
    /// The filter as can-gw registers it: `can_id & mask == id & mask`, or its negation.
    pub fn matches(&self, can_id: u32) -> bool {
        let id = self.filter_id & !CAN_INV_FILTER;
        let hit = can_id & self.filter_mask == id & self.filter_mask;
        hit != (self.filter_id & CAN_INV_FILTER != 0)
    }

    /// Runs the job on `frame` (of kind `fd`) as can-gw would.
    pub fn process(&self, frame: &CanFrame, fd: bool) -> Outcome {
        if (self.flags & CGW_FLAGS_CAN_FD != 0) != fd || !self.matches(frame.can_id) {
            return Outcome::Skip;
        }
        let mut f = *frame;
        if self.mods.is_empty() {
            return Outcome::Send(f);
        }
        if !fd {
            retrieve_ccdlc(&mut f);
        }
        let data_len = if fd { 64 } else { 8 };
        // The kernel applies them AND, OR, XOR, SET whatever the configured order.
        let mut mods: Vec<_> = self.mods.iter().collect();
        mods.sort_by_key(|m| m.op as u8);
        for m in mods {
            let op = |a: u8, b: u8| apply(m.op, a, b);
            if m.fields & field::ID != 0 {
                f.can_id = apply32(m.op, f.can_id, m.values.can_id);
            }
            if m.fields & field::LEN != 0 {
                f.len = op(f.len, m.values.len);
            }
            if m.fields & field::FLAGS != 0 && fd {
                f.flags = op(f.flags, m.values.flags);
            }
            if m.fields & field::DATA != 0 {
                for (d, v) in f.data[..data_len].iter_mut().zip(&m.values.data) {
                    *d = op(*d, *v);
                }
            }
        }
        if !fd {
            store_ccdlc(&mut f);
        }
        let max = if fd { CANFD_MAX_DLEN } else { CAN_MAX_DLEN };
        if f.len > max {
            return Outcome::Deleted;
        }
        if let Some(c) = &self.crc8 {
            crc8(&mut f, c);
        }
        if let Some(x) = self.xor {
            xor(&mut f, x);
        }
        Outcome::Send(f)
    }
}

fn apply(op: Op, a: u8, b: u8) -> u8 {
    match op {
        Op::And => a & b,
        Op::Or => a | b,
        Op::Xor => a ^ b,
        Op::Set => b,
    }
}

fn apply32(op: Op, a: u32, b: u32) -> u32 {
    match op {
        Op::And => a & b,
        Op::Or => a | b,
        Op::Xor => a ^ b,
        Op::Set => b,
    }
}

/// A classic frame's raw DLC 9..15 lives in len8_dlc (`res1` of the shared layout).
fn retrieve_ccdlc(f: &mut CanFrame) {
    if f.len == CAN_MAX_DLEN && f.res1 > CAN_MAX_DLEN && f.res1 <= CAN_MAX_RAW_DLC {
        f.len = f.res1;
    }
}

fn store_ccdlc(f: &mut CanFrame) {
    f.res1 = 0;
    if f.len > CAN_MAX_DLEN && f.len <= CAN_MAX_RAW_DLC {
        f.res1 = f.len;
        f.len = CAN_MAX_DLEN;
    }
}

/// A checksum index; negative ones count from the end of the frame's data.
fn index(i: i8, len: u8) -> Option<usize> {
    let i = if i < 0 {
        i32::from(len) + i32::from(i)
    } else {
        i32::from(i)
    };
    usize::try_from(i).ok().filter(|&i| i < 64)
}

/// Indexes of `from..=to` (either direction) and the result, or None when one is outside
/// the frame (can-gw then leaves it alone).
fn span(from: i8, to: i8, result: i8, len: u8) -> Option<(Vec<usize>, usize)> {
    let (from, to, result) = (index(from, len)?, index(to, len)?, index(result, len)?);
    let range: Vec<usize> = if from <= to {
        (from..=to).collect()
    } else {
        (to..=from).rev().collect()
    };
    Some((range, result))
}

fn xor(f: &mut CanFrame, [from, to, result, init]: [u8; 4]) {
    let Some((range, result)) = span(from as i8, to as i8, result as i8, f.len) else {
        return;
    };
    f.data[result] = range.into_iter().fold(init, |v, i| v ^ f.data[i]);
}

fn crc8(f: &mut CanFrame, c: &crate::can::gateway::Crc8) {
    let Some((range, result)) = span(c.from, c.to, c.result, f.len) else {
        return;
    };
    let t = &c.table;
    let mut crc = range
        .into_iter()
        .fold(c.init, |crc, i| t[usize::from(crc ^ f.data[i])]);
    crc = match c.profile {
        1 => t[usize::from(crc ^ c.profile_data[0])],
        2 => t[usize::from(crc ^ c.profile_data[usize::from(f.data[1] & 0xf)])],
        3 => t[usize::from(crc ^ (f.can_id & 0xff) as u8 ^ (f.can_id >> 8 & 0xff) as u8)],
        _ => crc,
    };
    f.data[result] = crc ^ c.final_xor;
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{
        can::rules,
        config::Config,
        host::{FakeHost, FakeKind},
    };

    fn jobs(route: &str) -> Vec<Job> {
        let text = format!(
            "[[can.route]]\nname = \"r\"\ningress = \"can0\"\nto = {{ iface = \"can1\" }}\n{route}"
        );
        let c = Config::parse(&text, Path::new("t")).unwrap();
        let host = FakeHost {
            interfaces: vec![("can0", 5, FakeKind::CanFd), ("can1", 6, FakeKind::CanFd)],
            addresses: Vec::new(),
        };
        rules::compile(&c.can.route[0], &host, &Default::default())
            .unwrap()
            .jobs
    }

    fn frame(can_id: u32, data: &[u8]) -> CanFrame {
        let mut f = CanFrame {
            can_id,
            len: data.len() as u8,
            ..CanFrame::default()
        };
        f.data[..data.len()].copy_from_slice(data);
        f
    }

    #[test]
    fn filters_and_frame_kinds_select_the_job() {
        let j = jobs("filter = \"123~7FF\"");
        let (classic, fd) = (&j[0], &j[1]);
        assert_eq!(classic.process(&frame(0x123, &[1]), false), Outcome::Skip);
        assert_eq!(
            classic.process(&frame(0x124, &[1]), false),
            Outcome::Send(frame(0x124, &[1]))
        );
        // The classic job leaves CAN FD frames to the FD job.
        assert_eq!(classic.process(&frame(0x124, &[1]), true), Outcome::Skip);
        assert!(matches!(
            fd.process(&frame(0x124, &[1]), true),
            Outcome::Send(_)
        ));
    }

    #[test]
    fn modifications_run_in_can_gw_order_then_crc8_then_xor() {
        let j = jobs(
            r#"filter = "0:0"
               modify = [ { op = "set", data = "AA" }, { op = "and", id = 0x0F0, data = "0F" }, { op = "xor", len = 1 } ]
               checksum = { xor = { from = 0, to = -3, result = -1, init = 0x5A }, crc8 = { from = 0, to = 1, result = 2, init = 0xFF } }"#,
        );
        let Outcome::Send(out) = j[0].process(&frame(0x1FF, &[0x12, 0x34, 0, 0, 0, 0, 0]), false)
        else {
            panic!("not routed")
        };
        // AND first (id & 0x0F0, data[0] & 0x0F), XOR on the length (7 ^ 1 = 6), SET last:
        // it replaces the whole data field with AA 00 00 ...
        assert_eq!(out.can_id, 0x0F0);
        assert_eq!(out.len, 6);
        assert_eq!(&out.data[..2], &[0xAA, 0x00]);
        let t = rules::crc8_table_for(0x1d);
        let crc = [0xAAu8, 0x00]
            .iter()
            .fold(0xFFu8, |c, b| t[usize::from(c ^ b)]);
        assert_eq!(out.data[2], crc);
        // XOR over data[0..=3] (len 6, -3 is index 3) into data[5].
        assert_eq!(out.data[5], 0x5A ^ 0xAA ^ crc);
    }

    #[test]
    fn invalid_lengths_are_deleted_and_checksums_need_a_modification() {
        let j = jobs(
            r#"filter = "0:0"
               modify = [ { op = "set", len = 16 } ]"#,
        );
        assert_eq!(j[0].process(&frame(1, &[1]), false), Outcome::Deleted);
        // A raw DLC of 9..15 is kept in len8_dlc with 8 data bytes.
        let j = jobs(
            r#"filter = "0:0"
               modify = [ { op = "set", len = 12 } ]"#,
        );
        let Outcome::Send(out) = j[0].process(&frame(1, &[1]), false) else {
            panic!()
        };
        assert_eq!((out.len, out.res1), (8, 12));
        let j = jobs(
            r#"filter = "0:0"
               checksum = { xor = { from = 0, to = 1, result = 2 } }"#,
        );
        assert_eq!(
            j[0].process(&frame(1, &[1, 2, 3]), false),
            Outcome::Send(frame(1, &[1, 2, 3]))
        );
    }
}
