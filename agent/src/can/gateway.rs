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

use std::{io, os::fd::AsRawFd as _};

use edgeplane_common::can::{CAN_MTU, CANFD_MTU, CanFrame};

/// Top byte of the user ids of edgeplane's jobs.
pub const UID_PREFIX: u32 = 0xED00_0000;
pub const UID_PREFIX_MASK: u32 = 0xFF00_0000;

const AF_CAN: u8 = 29;
const CGW_TYPE_CAN_CAN: u8 = 1;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_GETROUTE: u16 = 26;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;

// enum in linux/can/gw.h
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
}

/// A netlink socket to can-gw.
pub struct Gateway {
    fd: std::os::fd::OwnedFd,
    seq: u32,
}

impl Gateway {
    pub fn open() -> Result<Self, GatewayError> {
        // SAFETY: plain socket call; the fd is owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(GatewayError::Socket(io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh, valid descriptor nothing else owns.
        let fd = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
        Ok(Self { fd, seq: 0 })
    }

    pub fn add(&mut self, job: &Job) -> Result<(), GatewayError> {
        let msg = self.message(RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_ACK, job);
        self.send(&msg)?;
        self.ack().map_err(|source| match source.raw_os_error() {
            Some(libc::EAFNOSUPPORT | libc::EOPNOTSUPP | libc::EPROTONOSUPPORT) => {
                GatewayError::NotLoaded(source)
            }
            _ => GatewayError::Refused {
                uid: job.uid,
                op: "add",
                source,
            },
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
        let mut msg = header(RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP, self.seq);
        msg.extend_from_slice(&[AF_CAN, CGW_TYPE_CAN_CAN, 0, 0]);
        finish(&mut msg);
        self.send(&msg)?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            let n = self.recv(&mut buf)?;
            let mut at = 0;
            while at + 16 <= n {
                let len = u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4")) as usize;
                let ty = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().expect("2"));
                if len < 16 || at + len > n {
                    return Err(GatewayError::Io(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "short netlink message",
                    )));
                }
                match ty {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let code = i32::from_ne_bytes(buf[at + 16..at + 20].try_into().expect("4"));
                        let e = io::Error::from_raw_os_error(-code);
                        return Err(match -code {
                            libc::EAFNOSUPPORT | libc::EOPNOTSUPP | libc::EPROTONOSUPPORT => {
                                GatewayError::NotLoaded(e)
                            }
                            _ => GatewayError::Io(e),
                        });
                    }
                    RTM_NEWROUTE => out.push(parse_job(&buf[at + 16..at + len])),
                    _ => {}
                }
                at += align(len);
            }
        }
    }

    fn message(&mut self, ty: u16, flags: u16, job: &Job) -> Vec<u8> {
        self.seq = self.seq.wrapping_add(1);
        let mut m = header(ty, flags, self.seq);
        m.extend_from_slice(&[AF_CAN, CGW_TYPE_CAN_CAN]);
        m.extend_from_slice(&job.flags.to_ne_bytes());
        let fd = job.flags & CGW_FLAGS_CAN_FD != 0;
        for md in &job.mods {
            // One attribute per operation: the frame of values, then the fields byte (packed).
            let base = if fd { CGW_FDMOD_AND } else { CGW_MOD_AND };
            let mut payload = frame_bytes(&md.values, if fd { CANFD_MTU } else { CAN_MTU });
            payload.push(md.fields);
            attr(&mut m, base + md.op as u16, &payload);
        }
        if let Some(x) = &job.xor {
            attr(&mut m, CGW_CS_XOR, x);
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
            attr(&mut m, CGW_CS_CRC8, &p);
        }
        attr(&mut m, CGW_MOD_UID, &job.uid.to_ne_bytes());
        attr(&mut m, CGW_SRC_IF, &job.src_ifindex.to_ne_bytes());
        attr(&mut m, CGW_DST_IF, &job.dst_ifindex.to_ne_bytes());
        let mut filter = job.filter_id.to_ne_bytes().to_vec();
        filter.extend_from_slice(&job.filter_mask.to_ne_bytes());
        attr(&mut m, CGW_FILTER, &filter);
        attr(&mut m, CGW_LIM_HOPS, &[job.hops]);
        finish(&mut m);
        m
    }

    fn send(&self, msg: &[u8]) -> Result<(), GatewayError> {
        // SAFETY: all-zero sockaddr_nl addresses the kernel.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: valid buffer and address for the duration of the call.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&raw const kernel).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(GatewayError::Io(io::Error::last_os_error()));
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> Result<usize, GatewayError> {
        // SAFETY: writes at most buf.len() bytes into buf.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(GatewayError::Io(io::Error::last_os_error()));
        }
        Ok(n as usize)
    }

    /// Waits for the kernel's answer to the last request: Ok, or its errno.
    fn ack(&self) -> Result<(), io::Error> {
        let mut buf = vec![0u8; 8192];
        let n = self.recv(&mut buf).map_err(|e| match e {
            GatewayError::Io(e) => e,
            other => io::Error::other(other.to_string()),
        })?;
        if n >= 20 && u16::from_ne_bytes([buf[4], buf[5]]) == NLMSG_ERROR {
            let code = i32::from_ne_bytes(buf[16..20].try_into().expect("4"));
            return if code == 0 {
                Ok(())
            } else {
                Err(io::Error::from_raw_os_error(-code))
            };
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "no netlink acknowledgement",
        ))
    }
}

fn header(ty: u16, flags: u16, seq: u32) -> Vec<u8> {
    let mut m = Vec::with_capacity(512);
    m.extend_from_slice(&0u32.to_ne_bytes()); // length, set by finish()
    m.extend_from_slice(&ty.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m
}

fn finish(m: &mut [u8]) {
    let len = m.len() as u32;
    m[..4].copy_from_slice(&len.to_ne_bytes());
}

const fn align(n: usize) -> usize {
    (n + 3) & !3
}

fn attr(m: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    m.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
    m.extend_from_slice(&ty.to_ne_bytes());
    m.extend_from_slice(payload);
    m.resize(align(m.len()), 0);
}

fn frame_bytes(f: &CanFrame, size: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(size);
    v.extend_from_slice(&f.can_id.to_ne_bytes());
    v.extend_from_slice(&[f.len, f.flags, f.res0, f.res1]);
    v.extend_from_slice(&f.data[..size - 8]);
    v
}

fn frame_from(b: &[u8]) -> CanFrame {
    let mut f = CanFrame {
        can_id: u32::from_ne_bytes(b[..4].try_into().expect("4")),
        len: b[4],
        flags: b[5],
        res0: b[6],
        res1: b[7],
        ..CanFrame::default()
    };
    f.data[..b.len() - 8].copy_from_slice(&b[8..]);
    f
}

/// Parses one RTM_NEWROUTE message body (after the netlink header) of a dump.
fn parse_job(body: &[u8]) -> (JobCounters, Job) {
    let flags = u16::from_ne_bytes([body[2], body[3]]);
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
    let fd = flags & CGW_FLAGS_CAN_FD != 0;
    let mut at = 4;
    while at + 4 <= body.len() {
        let len = usize::from(u16::from_ne_bytes([body[at], body[at + 1]]));
        let ty = u16::from_ne_bytes([body[at + 2], body[at + 3]]);
        if len < 4 || at + len > body.len() {
            break;
        }
        let p = &body[at + 4..at + len];
        let u32_of = |p: &[u8]| {
            p.get(..4)
                .map_or(0, |b| u32::from_ne_bytes(b.try_into().expect("4")))
        };
        match ty {
            CGW_HANDLED => c.handled = u32_of(p),
            CGW_DROPPED => c.dropped = u32_of(p),
            CGW_DELETED => c.deleted = u32_of(p),
            CGW_MOD_UID => job.uid = u32_of(p),
            CGW_SRC_IF => job.src_ifindex = u32_of(p),
            CGW_DST_IF => job.dst_ifindex = u32_of(p),
            CGW_FILTER if p.len() >= 8 => {
                job.filter_id = u32_of(p);
                job.filter_mask = u32_of(&p[4..]);
            }
            CGW_LIM_HOPS => job.hops = p.first().copied().unwrap_or(0),
            CGW_CS_XOR if p.len() >= 4 => job.xor = Some([p[0], p[1], p[2], p[3]]),
            CGW_CS_CRC8 if p.len() >= 282 => {
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
            t => {
                let (base, size) = if fd {
                    (CGW_FDMOD_AND, CANFD_MTU)
                } else {
                    (CGW_MOD_AND, CAN_MTU)
                };
                if (base..base + 4).contains(&t) && p.len() > size {
                    let op = [Op::And, Op::Or, Op::Xor, Op::Set][usize::from(t - base)];
                    job.mods.push(Modification {
                        op,
                        fields: p[size],
                        values: frame_from(&p[..size]),
                    });
                }
            }
        }
        at += align(len);
    }
    c.uid = job.uid;
    (c, job)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let mut gw = Gateway::open().unwrap();
        let msg = gw.message(RTM_NEWROUTE, NLM_F_REQUEST, &job);
        assert_eq!(
            u32::from_ne_bytes(msg[..4].try_into().unwrap()) as usize,
            msg.len()
        );
        // struct cgw_frame_mod is packed: 16 bytes of can_frame and the modtype byte.
        let (c, back) = parse_job(&msg[16..]);
        assert_eq!(back, job);
        assert_eq!(
            c,
            JobCounters {
                uid: job.uid,
                ..JobCounters::default()
            }
        );
    }
}
