//! The kernel's CAN gateway (can-gw), programmed over rtnetlink: it executes routes from one
//! CAN netdev to another with can-gw's filters, modifications, checksums and hop limits.
//!
//! eBPF can't do this part: `bpf_redirect` and `bpf_clone_redirect` refuse skbs without a
//! link-layer header (`__bpf_redirect_common` returns -ERANGE, and `dev_is_mac_header_xmit`
//! does not exempt ARPHRD_CAN), which CAN skbs never have. can-gw clones the skb (no copy
//! unless a modification needs one) and sends it from softirq context.
//!
//! Jobs are identified by their whole description. can-gw keeps a user id (CGW_MOD_UID) only
//! for jobs with modifications; ours carry [`UID_PREFIX`] in its top byte and the route's slot
//! below, so a restarted agent knows whose they are (jobs without modifications are recorded
//! in the agent state instead). Identical jobs are adopted rather than added twice: a restarted
//! agent keeps routing, counters and all.

use std::io;

use edgeplane_common::can::{CAN_MTU, CANFD_MTU, CanFrame};
use libc::{RTM_DELROUTE, RTM_GETROUTE, RTM_NEWROUTE};

use crate::sys::netlink::{
    self, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_ERROR, NetlinkError, RecvError, Request,
};

/// Top byte of the user ids of edgeplane's jobs.
pub const UID_PREFIX: u32 = 0xED00_0000;
pub const UID_PREFIX_MASK: u32 = 0xFF00_0000;

/// struct rtcanmsg (linux/can/gw.h): can_family, gwtype, flags.
const AF_CAN: u8 = libc::AF_CAN as u8;
const CGW_TYPE_CAN_CAN: u8 = 1;
const RTCANMSG_LEN: usize = 4;

// enum in linux/can/gw.h (libc has none of can-gw's)
const CGW_MOD_AND: u16 = 1;
const CGW_CS_XOR: u16 = 5;
const CGW_CS_CRC8: u16 = 6;
const CGW_HANDLED: u16 = 7;
const CGW_DROPPED: u16 = 8;
const CGW_SRC_IF: u16 = 9;
const CGW_DST_IF: u16 = 10;
const CGW_FILTER: u16 = 11;
const CGW_DELETED: u16 = 12;
const CGW_LIM_HOPS: u16 = 13;
const CGW_MOD_UID: u16 = 14;
const CGW_FDMOD_AND: u16 = 15;

pub const CGW_FLAGS_CAN_ECHO: u16 = 0x01;
pub const CGW_FLAGS_CAN_FD: u16 = 0x08;
/// `can_filter.can_id` bit for an inverted filter.
pub const CAN_INV_FILTER: u32 = 0x2000_0000;

/// Which fields of the frame an operation touches (CGW_MOD_*).
pub mod field {
    pub const ID: u8 = 0x01;
    /// DLC (classic) or length (CAN FD).
    pub const LEN: u8 = 0x02;
    pub const DATA: u8 = 0x04;
    /// CAN FD flags.
    pub const FLAGS: u8 = 0x08;
}

/// can-gw's operations, in the order it applies them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    And = 0,
    Or = 1,
    Xor = 2,
    Set = 3,
}

/// One modification: an operation, the fields it touches, and their values in a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Modification {
    pub op: Op,
    pub fields: u8,
    pub values: CanFrame,
}

/// `struct cgw_csum_crc8`: the checksum with its whole table, as the kernel takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crc8 {
    pub from: i8,
    pub to: i8,
    pub result: i8,
    pub init: u8,
    pub final_xor: u8,
    pub table: [u8; 256],
    pub profile: u8,
    pub profile_data: [u8; 20],
}

/// One can-gw job: frames of one kind (classic or FD) from `src` matching the filter go to
/// `dst`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub uid: u32,
    pub src_ifindex: u32,
    pub dst_ifindex: u32,
    /// With [`CAN_INV_FILTER`] for inverted filters.
    pub filter_id: u32,
    pub filter_mask: u32,
    /// CGW_FLAGS_* bits; CGW_FLAGS_CAN_FD makes it a job for CAN FD frames.
    pub flags: u16,
    pub hops: u8,
    pub mods: Vec<Modification>,
    /// `struct cgw_csum_xor`: from, to, result, init.
    pub xor: Option<[u8; 4]>,
    pub crc8: Option<Crc8>,
}

impl Job {
    /// The job as can-gw reports it in a dump: modifications in AND, OR, XOR, SET order with
    /// only the frame fields it keeps (classic: id, len, 8 data bytes; FD: id, len, flags, 64
    /// data bytes), and no user id without modifications.
    pub fn as_kernel_keeps_it(&self) -> Self {
        let mut j = self.clone();
        let fd = j.flags & CGW_FLAGS_CAN_FD != 0;
        j.mods.sort_by_key(|m| m.op as u8);
        for m in &mut j.mods {
            let v = &m.values;
            let mut kept = CanFrame {
                can_id: v.can_id,
                len: v.len,
                ..CanFrame::default()
            };
            let n = if fd { 64 } else { 8 };
            kept.data[..n].copy_from_slice(&v.data[..n]);
            if fd {
                kept.flags = v.flags;
            }
            m.values = kept;
        }
        if j.mods.is_empty() {
            j.uid = 0;
        }
        j
    }
}

/// A job's counters as the kernel reports them (they are u32 and wrap).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JobCounters {
    pub uid: u32,
    pub handled: u32,
    pub dropped: u32,
    pub deleted: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot open a netlink socket for can-gw: {0}")]
    Socket(#[source] io::Error),
    #[error(
        "the kernel's CAN gateway is not available ({0}); CAN routes need it: load it with \
         `modprobe can-gw` (add max_hops=N for routes with hops above 1)"
    )]
    NotLoaded(#[source] io::Error),
    #[error("can-gw refused job {uid:#x} ({op}): {source}")]
    Refused {
        uid: u32,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("can-gw netlink: {0}")]
    Io(#[source] io::Error),
    #[error(
        "malformed message in can-gw's job dump ({0}); please report it with the kernel \
         version (`uname -r`)"
    )]
    Malformed(#[from] NetlinkError),
}

/// Whether can-gw's answer means the module is not loaded.
fn not_loaded(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT | libc::EOPNOTSUPP | libc::EPROTONOSUPPORT)
    )
}

/// A netlink socket to can-gw.
pub struct Gateway {
    socket: netlink::Socket,
    seq: u32,
}

impl Gateway {
    pub fn open() -> Result<Self, GatewayError> {
        let socket = netlink::Socket::route().map_err(GatewayError::Socket)?;
        Ok(Self { socket, seq: 0 })
    }

    pub fn add(&mut self, job: &Job) -> Result<(), GatewayError> {
        let msg = self.message(RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_ACK, job);
        self.send(&msg)?;
        self.ack().map_err(|source| {
            if not_loaded(&source) {
                GatewayError::NotLoaded(source)
            } else {
                GatewayError::Refused {
                    uid: job.uid,
                    op: "add",
                    source,
                }
            }
        })
    }

    pub fn remove(&mut self, job: &Job) -> Result<(), GatewayError> {
        let msg = self.message(RTM_DELROUTE, NLM_F_REQUEST | NLM_F_ACK, job);
        self.send(&msg)?;
        self.ack().map_err(|source| GatewayError::Refused {
            uid: job.uid,
            op: "remove",
            source,
        })
    }

    /// Every can-gw job's counters and full description (ours and others').
    pub fn dump(&mut self) -> Result<Vec<(JobCounters, Job)>, GatewayError> {
        self.seq = self.seq.wrapping_add(1);
        let msg = Request::new(RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP, self.seq)
            .fixed(&[AF_CAN, CGW_TYPE_CAN_CAN, 0, 0])
            .finish();
        self.send(&msg)?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            let batch = self.recv(&mut buf)?;
            if parse_dump(batch, &mut out)? {
                return Ok(out);
            }
        }
    }

    fn message(&mut self, ty: u16, flags: u16, job: &Job) -> Vec<u8> {
        self.seq = self.seq.wrapping_add(1);
        job_message(ty, flags, self.seq, job)
    }

    fn send(&self, msg: &[u8]) -> Result<(), GatewayError> {
        self.socket.send(msg).map_err(GatewayError::Io)
    }

    fn recv<'b>(&self, buf: &'b mut [u8]) -> Result<&'b [u8], GatewayError> {
        self.socket.recv(buf).map_err(|e| match e {
            RecvError::Io(e) => GatewayError::Io(e),
            t @ RecvError::Truncated { .. } => {
                GatewayError::Io(io::Error::new(io::ErrorKind::InvalidData, t))
            }
        })
    }

    /// Waits for the kernel's answer to the last request: Ok, or its errno.
    fn ack(&self) -> Result<(), io::Error> {
        let mut buf = vec![0u8; 8192];
        let answer = self.recv(&mut buf).map_err(|e| match e {
            GatewayError::Io(e) => e,
            other => io::Error::other(other.to_string()),
        })?;
        parse_ack(answer)
    }
}

/// A request about `job` (RTM_NEWROUTE to add it, RTM_DELROUTE to remove it), laid out as
/// can-gw also dumps it.
pub(crate) fn job_message(ty: u16, flags: u16, seq: u32, job: &Job) -> Vec<u8> {
    let mut fixed = vec![AF_CAN, CGW_TYPE_CAN_CAN];
    fixed.extend_from_slice(&job.flags.to_ne_bytes());
    let mut m = Request::new(ty, flags, seq).fixed(&fixed);
    let fd = job.flags & CGW_FLAGS_CAN_FD != 0;
    for md in &job.mods {
        // One attribute per operation: the frame of values, then the fields byte (packed).
        let base = if fd { CGW_FDMOD_AND } else { CGW_MOD_AND };
        let mut payload = frame_bytes(&md.values, if fd { CANFD_MTU } else { CAN_MTU });
        payload.push(md.fields);
        m = m.attr(base + md.op as u16, &payload);
    }
    if let Some(x) = &job.xor {
        m = m.attr(CGW_CS_XOR, x);
    }
    if let Some(c) = &job.crc8 {
        let mut p = vec![
            c.from as u8,
            c.to as u8,
            c.result as u8,
            c.init,
            c.final_xor,
        ];
        p.extend_from_slice(&c.table);
        p.push(c.profile);
        p.extend_from_slice(&c.profile_data);
        m = m.attr(CGW_CS_CRC8, &p);
    }
    let mut filter = job.filter_id.to_ne_bytes().to_vec();
    filter.extend_from_slice(&job.filter_mask.to_ne_bytes());
    m.attr(CGW_MOD_UID, &job.uid.to_ne_bytes())
        .attr(CGW_SRC_IF, &job.src_ifindex.to_ne_bytes())
        .attr(CGW_DST_IF, &job.dst_ifindex.to_ne_bytes())
        .attr(CGW_FILTER, &filter)
        .attr(CGW_LIM_HOPS, &[job.hops])
        .finish()
}

/// The outcome an acknowledgement (NLMSG_ERROR) reports.
pub(crate) fn parse_ack(answer: &[u8]) -> Result<(), io::Error> {
    let invalid = |e: NetlinkError| io::Error::new(io::ErrorKind::InvalidData, e);
    match netlink::messages(answer).next() {
        Some(Ok(m)) if m.ty == NLMSG_ERROR => match m.errno().map_err(invalid)? {
            0 => Ok(()),
            errno => Err(io::Error::from_raw_os_error(errno)),
        },
        Some(Err(e)) => Err(invalid(e)),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "no netlink acknowledgement",
        )),
    }
}

/// Parses one read of a job dump into `out`; true once the dump is complete.
pub(crate) fn parse_dump(
    batch: &[u8],
    out: &mut Vec<(JobCounters, Job)>,
) -> Result<bool, GatewayError> {
    let refused = |e| {
        if not_loaded(&e) {
            GatewayError::NotLoaded(e)
        } else {
            GatewayError::Io(e)
        }
    };
    netlink::read_dump(batch, refused, |msg| {
        // Without can-gw the kernel answers the AF_CAN dump with every other family's routes
        // (rtnetlink falls back to dumping all): those are not jobs.
        if msg.ty == RTM_NEWROUTE && msg.body.first() == Some(&AF_CAN) {
            out.push(parse_job(msg)?);
        }
        Ok(())
    })
}

fn frame_bytes(f: &CanFrame, size: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(size);
    v.extend_from_slice(&f.can_id.to_ne_bytes());
    v.extend_from_slice(&[f.len, f.flags, f.res0, f.res1]);
    v.extend_from_slice(&f.data[..size - 8]);
    v
}

/// A struct can_frame or canfd_frame as [`frame_bytes`] wrote it.
fn frame_from(b: &[u8]) -> CanFrame {
    let mut f = CanFrame::default();
    if let Some(&[i0, i1, i2, i3, len, flags, res0, res1]) = b.first_chunk::<8>() {
        (f.can_id, f.len, f.flags, f.res0, f.res1) =
            (u32::from_ne_bytes([i0, i1, i2, i3]), len, flags, res0, res1);
    }
    for (d, s) in f.data.iter_mut().zip(b.get(8..).unwrap_or_default()) {
        *d = *s;
    }
    f
}

/// can-gw's modification attributes in AND, OR, XOR, SET order (CGW_MOD_* for classic jobs,
/// CGW_FDMOD_* for CAN FD ones).
const OPS: [Op; 4] = [Op::And, Op::Or, Op::Xor, Op::Set];

/// Parses one RTM_NEWROUTE message of a dump.
fn parse_job(msg: &netlink::Message<'_>) -> Result<(JobCounters, Job), NetlinkError> {
    let (&[_family, _gwtype, f0, f1], attrs) =
        msg.split::<RTCANMSG_LEN>("RTM_NEWROUTE's struct rtcanmsg")?;
    let flags = u16::from_ne_bytes([f0, f1]);
    let mut job = Job {
        uid: 0,
        src_ifindex: 0,
        dst_ifindex: 0,
        filter_id: 0,
        filter_mask: 0,
        flags,
        hops: 0,
        mods: Vec::new(),
        xor: None,
        crc8: None,
    };
    let mut c = JobCounters::default();
    let (mod_base, frame_size) = if flags & CGW_FLAGS_CAN_FD != 0 {
        (CGW_FDMOD_AND, CANFD_MTU)
    } else {
        (CGW_MOD_AND, CAN_MTU)
    };
    for a in attrs {
        let a = a?;
        match a.ty {
            CGW_HANDLED => c.handled = a.u32()?,
            CGW_DROPPED => c.dropped = a.u32()?,
            CGW_DELETED => c.deleted = a.u32()?,
            CGW_MOD_UID => job.uid = a.u32()?,
            CGW_SRC_IF => job.src_ifindex = a.u32()?,
            CGW_DST_IF => job.dst_ifindex = a.u32()?,
            // struct can_filter: can_id, can_mask.
            CGW_FILTER => (job.filter_id, job.filter_mask) = (a.u32_at(0)?, a.u32_at(1)?),
            CGW_LIM_HOPS => job.hops = a.u8()?,
            CGW_CS_XOR => job.xor = Some(a.array()?),
            CGW_CS_CRC8 => {
                // struct cgw_csum_crc8 (packed): from, to, result, init, final_xor, table,
                // profile, profile_data.
                let p: [u8; 282] = a.array()?;
                let mut table = [0u8; 256];
                table.copy_from_slice(&p[5..261]);
                let mut profile_data = [0u8; 20];
                profile_data.copy_from_slice(&p[262..282]);
                job.crc8 = Some(Crc8 {
                    from: p[0] as i8,
                    to: p[1] as i8,
                    result: p[2] as i8,
                    init: p[3],
                    final_xor: p[4],
                    table,
                    profile: p[261],
                    profile_data,
                });
            }
            t if (mod_base..mod_base + 4).contains(&t) => {
                // struct cgw_frame_mod / cgw_fdframe_mod (packed): the frame, then modtype.
                job.mods.push(Modification {
                    op: OPS[usize::from(t - mod_base)],
                    fields: a.u8_at(frame_size)?,
                    values: frame_from(a.bytes(frame_size)?),
                });
            }
            _ => {}
        }
    }
    c.uid = job.uid;
    Ok((c, job))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::netlink::NLMSG_DONE;

    #[test]
    fn a_job_encodes_and_decodes_the_way_the_kernel_dumps_it() {
        let mut values = CanFrame {
            can_id: 0x7ff,
            len: 8,
            ..CanFrame::default()
        };
        values.data[0] = 0x0f;
        let job = Job {
            uid: UID_PREFIX | 3,
            src_ifindex: 4,
            dst_ifindex: 5,
            filter_id: 0x100 | CAN_INV_FILTER,
            filter_mask: 0x700,
            flags: CGW_FLAGS_CAN_ECHO,
            hops: 2,
            mods: vec![Modification {
                op: Op::Xor,
                fields: field::ID | field::DATA,
                values,
            }],
            xor: Some([0, 6, 7, 0x5a]),
            crc8: Some(Crc8 {
                from: 0,
                to: 5,
                result: 6,
                init: 0xff,
                final_xor: 0xff,
                table: [7; 256],
                profile: 1,
                profile_data: [9; 20],
            }),
        };
        let msg = job_message(RTM_NEWROUTE, NLM_F_REQUEST, 1, &job);
        assert_eq!(
            u32::from_ne_bytes(msg[..4].try_into().unwrap()) as usize,
            msg.len()
        );
        // struct cgw_frame_mod is packed: 16 bytes of can_frame and the modtype byte.
        let mut out = Vec::new();
        assert!(!parse_dump(&msg, &mut out).unwrap());
        let [(c, back)] = &out[..] else {
            panic!("{out:?}")
        };
        let (c, back) = (*c, back.clone());
        assert_eq!(back, job);
        assert_eq!(
            c,
            JobCounters {
                uid: job.uid,
                ..JobCounters::default()
            }
        );
    }

    /// A dump as can-gw writes it (cgw_put_job in net/can/gw.c): a classic job without
    /// modifications, with its counters, then NLMSG_DONE.
    fn kernel_dump() -> Vec<u8> {
        let mut filter = 0x123u32.to_ne_bytes().to_vec();
        filter.extend_from_slice(&0x7ffu32.to_ne_bytes());
        let mut d = Request::new(RTM_NEWROUTE, 0x2, 9) // NLM_F_MULTI
            .fixed(&[AF_CAN, CGW_TYPE_CAN_CAN, 0, 0])
            .attr(CGW_HANDLED, &1000u32.to_ne_bytes())
            .attr(CGW_DROPPED, &3u32.to_ne_bytes())
            .attr(CGW_LIM_HOPS, &[1])
            .attr(CGW_FILTER, &filter)
            .attr(CGW_SRC_IF, &4u32.to_ne_bytes())
            .attr(CGW_DST_IF, &5u32.to_ne_bytes())
            .finish();
        d.extend(
            Request::new(NLMSG_DONE, 0x2, 9)
                .fixed(&0i32.to_ne_bytes())
                .finish(),
        );
        d
    }

    #[test]
    fn a_kernel_dump_reads_jobs_and_counters() {
        let mut out = Vec::new();
        assert!(parse_dump(&kernel_dump(), &mut out).unwrap());
        let [(c, job)] = &out[..] else {
            panic!("{out:?}")
        };
        assert_eq!(
            *c,
            JobCounters {
                uid: 0,
                handled: 1000,
                dropped: 3,
                deleted: 0
            }
        );
        assert_eq!(
            (
                job.src_ifindex,
                job.dst_ifindex,
                job.filter_id,
                job.filter_mask,
                job.hops
            ),
            (4, 5, 0x123, 0x7ff, 1)
        );
        assert!(job.mods.is_empty() && job.xor.is_none() && job.crc8.is_none());
    }

    fn dump_error(batch: &[u8]) -> GatewayError {
        let mut out = Vec::new();
        parse_dump(batch, &mut out).unwrap_err()
    }

    #[test]
    fn every_cut_of_a_dump_is_an_error_or_incomplete() {
        let d = kernel_dump();
        for cut in 0..d.len() {
            let mut out = Vec::new();
            match parse_dump(&d[..cut], &mut out) {
                Ok(done) => assert!(!done, "cut {cut}"),
                Err(e) => assert!(matches!(e, GatewayError::Malformed(_)), "cut {cut}: {e}"),
            }
        }
    }

    /// Regression: a reply body shorter than struct rtcanmsg was indexed (`body[2]`) and
    /// panicked the agent.
    #[test]
    fn a_job_shorter_than_its_rtcanmsg_is_malformed() {
        let short = Request::new(RTM_NEWROUTE, 0, 0).fixed(&[AF_CAN]).finish();
        assert!(matches!(
            dump_error(&short),
            GatewayError::Malformed(NetlinkError::Short {
                len: 1,
                need: 4,
                ..
            })
        ));
    }

    /// Regression: an NLMSG_ERROR without its error code at the end of a read was sliced past
    /// the read (`buf[at + 16..at + 20]`) and panicked the agent.
    #[test]
    fn an_error_without_its_code_is_malformed() {
        let mut d = kernel_dump();
        d.truncate(d.len() - 20);
        d.extend(Request::new(NLMSG_ERROR, 0, 0).finish());
        assert!(matches!(
            dump_error(&d),
            GatewayError::Malformed(NetlinkError::Short { need: 4, .. })
        ));
        assert_eq!(
            parse_ack(&Request::new(NLMSG_ERROR, 0, 0).finish())
                .unwrap_err()
                .kind(),
            io::ErrorKind::InvalidData
        );
    }

    /// Regression (found by tests/interface_metrics.rs on a host without CAN): without can-gw,
    /// the kernel answers the dump with IPv4 and IPv6 routes (struct rtmsg), which read as
    /// malformed jobs and stopped the agent from starting.
    #[test]
    fn other_families_routes_in_the_dump_are_not_jobs() {
        // RTM_NEWROUTE of AF_INET: struct rtmsg (family, dst_len, src_len, tos, table,
        // protocol, scope, type, flags), RTA_TABLE, RTA_DST, RTA_OIF.
        let rtmsg = [libc::AF_INET as u8, 8, 0, 0, 254, 2, 253, 1, 0, 0, 0, 0];
        let mut d = Request::new(RTM_NEWROUTE, 0x2, 1)
            .fixed(&rtmsg)
            .attr(15, &254u32.to_ne_bytes())
            .attr(1, &[10, 0, 0, 0])
            .attr(4, &2u32.to_ne_bytes())
            .finish();
        d.extend(kernel_dump());
        let mut out = Vec::new();
        assert!(parse_dump(&d, &mut out).unwrap());
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn errors_and_acknowledgements_are_read() {
        let error = |errno: i32| {
            Request::new(NLMSG_ERROR, 0, 0)
                .fixed(&errno.wrapping_neg().to_ne_bytes())
                .finish()
        };
        assert!(matches!(
            dump_error(&error(libc::EOPNOTSUPP)),
            GatewayError::NotLoaded(_)
        ));
        assert!(matches!(
            dump_error(&error(libc::EPERM)),
            GatewayError::Io(_)
        ));
        assert!(parse_ack(&error(0)).is_ok());
        assert_eq!(
            parse_ack(&error(libc::EEXIST)).unwrap_err().raw_os_error(),
            Some(libc::EEXIST)
        );
        // i32::MIN, negated, does not overflow.
        assert!(parse_ack(&error(i32::MIN)).is_err());
        assert!(parse_ack(&kernel_dump()).is_err());
        assert!(parse_ack(&[]).is_err());
    }

    #[test]
    fn short_attributes_are_malformed() {
        let job = |ty: u16, payload: &[u8], flags: u16| {
            let mut fixed = vec![AF_CAN, CGW_TYPE_CAN_CAN];
            fixed.extend_from_slice(&flags.to_ne_bytes());
            Request::new(RTM_NEWROUTE, 0, 0)
                .fixed(&fixed)
                .attr(ty, payload)
                .finish()
        };
        for (ty, len, flags) in [
            (CGW_HANDLED, 3, 0),
            (CGW_SRC_IF, 0, 0),
            (CGW_FILTER, 7, 0),
            (CGW_LIM_HOPS, 0, 0),
            (CGW_CS_XOR, 3, 0),
            (CGW_CS_CRC8, 281, 0),
            (CGW_MOD_AND, CAN_MTU, 0),
            (CGW_FDMOD_AND + 3, CANFD_MTU, CGW_FLAGS_CAN_FD),
        ] {
            let e = dump_error(&job(ty, &vec![0; len], flags));
            assert!(
                matches!(e, GatewayError::Malformed(NetlinkError::ShortAttr { .. })),
                "attribute {ty} of {len} bytes: {e}"
            );
        }
        // A classic job's modification attribute is not read as a CAN FD one's, and back.
        let mut out = Vec::new();
        parse_dump(&job(CGW_FDMOD_AND, &[0; CANFD_MTU + 1], 0), &mut out).unwrap();
        assert!(out[0].1.mods.is_empty());
    }
}
