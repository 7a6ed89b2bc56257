//! Compiling `[[can.route]]` and `[[can.watch]]`: kernel map values for the program, and can-gw
//! jobs for routes between CAN netdevs.

use std::net::SocketAddr;

use edgeplane_common::can::{CanFrame, CanRule, CanWatch, CanWatchKey, action, rule_flag};

use super::gateway::{
    self, CAN_INV_FILTER, CGW_FLAGS_CAN_ECHO, CGW_FLAGS_CAN_FD, Crc8, Job, Modification, Op,
};
use crate::{
    config::{CanAction, CanModifyOp, CanRoute, CanWatchConfig, Crc8Profile, ModOp},
    host::Host,
    host::resolve::Peers,
};

/// A route as the kernel sees it, before it has a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledRoute {
    pub name: String,
    pub ingress: String,
    pub ingress_ifindex: u32,
    /// Tunnel peer for routes to UDP; `rule.tunnel` is set when tunnels are numbered.
    pub peer: Option<SocketAddr>,
    pub rule: CanRule,
    /// can-gw jobs for a route to a CAN netdev (classic frames, and CAN FD frames when the
    /// egress carries them); their `uid` is set from the slot when installed.
    pub jobs: Vec<Job>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CompileError {
    #[error("route `{route}`: interface `{iface}` does not exist on this host (see `ip link`)")]
    UnknownInterface { route: String, iface: String },
    #[error("route `{route}`: tunnel peer `{peer}` is not resolved")]
    Peer { route: String, peer: String },
}

/// Compiles `r` for the interfaces `host` has, with its tunnel peer's address from `peers`.
pub fn compile(
    r: &CanRoute,
    host: &dyn Host,
    peers: &Peers,
) -> Result<CompiledRoute, CompileError> {
    let ifindex = |iface: &str| {
        host.ifindex(iface)
            .ok_or_else(|| CompileError::UnknownInterface {
                route: r.name.clone(),
                iface: iface.to_owned(),
            })
    };
    let ingress_ifindex = ifindex(&r.ingress)?;
    let mut rule = CanRule {
        filter_id: r.filter.id,
        filter_mask: r.filter.mask,
        action: action::COUNT,
        flags: if r.filter.invert {
            rule_flag::INVERT
        } else {
            0
        },
        hops: r.hops,
        _pad: 0,
        tunnel: 0,
        egress: 0,
        _pad2: 0,
    };
    let (mut peer, mut jobs) = (None, Vec::new());
    match (&r.to, r.action) {
        (_, Some(CanAction::Drop)) => rule.action = action::DROP,
        (_, Some(CanAction::Count)) | (None, None) => {}
        (Some(t), None) => {
            if let Some(iface) = &t.iface {
                rule.action = action::ROUTE;
                let egress = ifindex(iface)?;
                rule.egress = egress;
                let fd = host.is_can_fd(iface);
                if fd {
                    rule.flags |= rule_flag::EGRESS_FD;
                }
                // can-gw jobs take either classic or CAN FD frames: one of each where the egress
                // carries both.
                let kinds: &[bool] = if fd { &[false, true] } else { &[false] };
                for &fd_job in kinds {
                    let mut flags = if t.echo { CGW_FLAGS_CAN_ECHO } else { 0 };
                    if fd_job {
                        flags |= CGW_FLAGS_CAN_FD;
                    }
                    jobs.push(Job {
                        uid: 0,
                        src_ifindex: ingress_ifindex,
                        dst_ifindex: egress,
                        filter_id: r.filter.id | if r.filter.invert { CAN_INV_FILTER } else { 0 },
                        filter_mask: r.filter.mask,
                        flags,
                        hops: r.hops,
                        mods: r.modify.iter().map(|m| modification(m, fd_job)).collect(),
                        xor: r
                            .checksum
                            .as_ref()
                            .and_then(|c| c.xor.as_ref())
                            .map(|x| [x.from as u8, x.to as u8, x.result as u8, x.init]),
                        crc8: r.checksum.as_ref().and_then(|c| c.crc8.as_ref()).map(|c| {
                            let mut profile_data = [0u8; 20];
                            if let Some(d) = &c.profile_data {
                                for (p, b) in profile_data.iter_mut().zip(&d.0) {
                                    *p = *b;
                                }
                            }
                            Crc8 {
                                from: c.from,
                                to: c.to,
                                result: c.result,
                                init: c.init,
                                final_xor: c.final_xor,
                                table: crc8_table_for(c.poly),
                                profile: match c.profile {
                                    Crc8Profile::None => 0,
                                    Crc8Profile::OneU8 => 1,
                                    Crc8Profile::SixteenU8 => 2,
                                    Crc8Profile::SffIdXor => 3,
                                },
                                profile_data,
                            }
                        }),
                    });
                }
            } else if let Some(target) = &t.udp {
                rule.action = action::TUNNEL;
                peer = Some(
                    peers
                        .get(target)
                        .copied()
                        .ok_or_else(|| CompileError::Peer {
                            route: r.name.clone(),
                            peer: target.clone(),
                        })?,
                );
            }
        }
    }
    Ok(CompiledRoute {
        name: r.name.clone(),
        ingress: r.ingress.clone(),
        ingress_ifindex,
        peer,
        rule,
        jobs,
    })
}

/// One configured operation as a can-gw modification. Data bytes not given are the
/// operation's identity (0xff for AND, 0 otherwise); SET replaces them with 0 as can-gw does.
fn modification(m: &CanModifyOp, fd: bool) -> Modification {
    let op = match m.op {
        ModOp::And => Op::And,
        ModOp::Or => Op::Or,
        ModOp::Xor => Op::Xor,
        ModOp::Set => Op::Set,
    };
    let identity = if op == Op::And { 0xff } else { 0 };
    let mut values = CanFrame {
        data: [identity; 64],
        ..CanFrame::default()
    };
    let mut fields = 0;
    if let Some(id) = m.id {
        fields |= gateway::field::ID;
        values.can_id = id;
    }
    if let Some(len) = m.len {
        fields |= gateway::field::LEN;
        values.len = len;
    }
    if let Some(flags) = m.flags
        && fd
    {
        fields |= gateway::field::FLAGS;
        values.flags = flags;
    }
    if let Some(d) = &m.data {
        fields |= gateway::field::DATA;
        for (v, b) in values.data.iter_mut().zip(&d.0) {
            *v = *b;
        }
    }
    Modification { op, fields, values }
}

/// The table of an MSB-first CRC8 with polynomial `poly`, as can-gw's `-c` takes it.
pub fn crc8_table_for(poly: u8) -> [u8; 256] {
    let mut t = [0u8; 256];
    for (i, e) in t.iter_mut().enumerate() {
        let mut crc = i as u8;
        for _ in 0..8 {
            crc = if crc & 0x80 != 0 {
                (crc << 1) ^ poly
            } else {
                crc << 1
            };
        }
        *e = crc;
    }
    t
}

/// A watch's key and its initial map value (the kernel fills in the measurements).
pub fn watch(w: &CanWatchConfig, ifindex: u32) -> (CanWatchKey, CanWatch) {
    let period_ns = (w.period_ms * 1e6).round() as u64;
    let late_ns = (w.period_ms * w.tolerance * 1e6).round() as u64;
    (
        CanWatchKey {
            ifindex,
            can_id: w.can_id(),
        },
        CanWatch {
            period_ns,
            late_ns,
            ..CanWatch::default()
        },
    )
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{
        config::Config,
        host::{FakeHost, FakeKind},
    };

    fn host() -> FakeHost {
        FakeHost {
            interfaces: vec![
                ("can0", 5, FakeKind::Can),
                ("can1", 6, FakeKind::CanFd),
                ("vcan9", 7, FakeKind::Can),
            ],
            addresses: Vec::new(),
        }
    }

    fn route(text: &str) -> CompiledRoute {
        let c = Config::parse(text, Path::new("t.toml")).unwrap();
        // Tests name peers by address: they resolve to themselves.
        let peers: Peers = (c.can.route.iter())
            .filter_map(|r| r.to.as_ref()?.udp.clone())
            .filter_map(|p| Some((p.clone(), p.parse().ok()?)))
            .collect();
        compile(&c.can.route[0], &host(), &peers).unwrap()
    }

    #[test]
    fn crc8_table_is_sae_j1850() {
        let t = crc8_table_for(0x1d);
        assert_eq!((t[0], t[1], t[0x80], t[0xff]), (0x00, 0x1d, 0x26, 0xc4));
        // CRC-8/SAE-J1850 of "123456789" (init 0xFF, xorout 0xFF) is 0x4B.
        let crc = b"123456789"
            .iter()
            .fold(0xffu8, |c, b| t[usize::from(c ^ b)])
            ^ 0xff;
        assert_eq!(crc, 0x4b);
    }

    #[test]
    fn routes_to_an_fd_bus_get_a_job_per_frame_kind() {
        let c = route(
            r#"[[can.route]]
               name = "r"
               ingress = "can0"
               filter = "123~7FF"
               to = { iface = "can1", echo = true }
               hops = 2"#,
        );
        assert_eq!(c.ingress_ifindex, 5);
        assert_eq!(c.rule.action, action::ROUTE);
        assert_eq!(c.rule.flags, rule_flag::INVERT | rule_flag::EGRESS_FD);
        assert_eq!(c.jobs.len(), 2);
        let (classic, fd) = (&c.jobs[0], &c.jobs[1]);
        assert_eq!(
            (classic.src_ifindex, classic.dst_ifindex, classic.hops),
            (5, 6, 2)
        );
        assert_eq!(
            (classic.filter_id, classic.filter_mask),
            (0x123 | CAN_INV_FILTER, 0x7ff)
        );
        assert_eq!(classic.flags, CGW_FLAGS_CAN_ECHO);
        assert_eq!(fd.flags, CGW_FLAGS_CAN_ECHO | CGW_FLAGS_CAN_FD);
        // A classic-only egress gets no FD job.
        let c = route(
            "[[can.route]]\nname = \"c\"\ningress = \"can1\"\nfilter = \"0:0\"\nto = { iface = \"can0\" }\n",
        );
        assert_eq!(c.jobs.len(), 1);
        assert_eq!(c.rule.flags & rule_flag::EGRESS_FD, 0);
    }

    #[test]
    fn tunnels_and_actions_have_no_jobs() {
        let t = route(
            "[[can.route]]\nname = \"t\"\ningress = \"can0\"\nfilter = \"0:0\"\nto = { udp = \"127.0.0.1:20000\" }\n",
        );
        assert_eq!((t.rule.action, t.jobs.len()), (action::TUNNEL, 0));
        assert_eq!(t.peer, Some("127.0.0.1:20000".parse().unwrap()));
        let d = route(
            "[[can.route]]\nname = \"d\"\ningress = \"can0\"\nfilter = \"0:0\"\naction = \"drop\"\n",
        );
        assert_eq!((d.rule.action, d.jobs.len()), (action::DROP, 0));
    }

    #[test]
    fn modifications_become_can_gw_operations_with_identities() {
        let c = route(
            r#"[[can.route]]
               name = "m"
               ingress = "can0"
               filter = "0:0"
               to = { iface = "vcan9" }
               modify = [ { op = "and", id = 0x7F0, data = "3C" }, { op = "set", len = 4, data = "AA" } ]
               checksum = { xor = { from = 0, to = -2, result = -1, init = 0x5A }, crc8 = { from = 0, to = 5, result = 6, init = 0xFF } }"#,
        );
        let job = &c.jobs[0];
        let and = &job.mods[0];
        assert_eq!(
            (and.op, and.fields),
            (Op::And, gateway::field::ID | gateway::field::DATA)
        );
        assert_eq!(and.values.can_id, 0x7f0);
        assert_eq!(&and.values.data[..3], &[0x3c, 0xff, 0xff]);
        let set = &job.mods[1];
        assert_eq!(
            (set.op, set.fields, set.values.len),
            (Op::Set, gateway::field::LEN | gateway::field::DATA, 4)
        );
        assert_eq!(&set.values.data[..3], &[0xaa, 0, 0]);
        assert_eq!(job.xor, Some([0, 0xfe, 0xff, 0x5a]));
        let crc = job.crc8.as_ref().unwrap();
        assert_eq!((crc.init, crc.table[1]), (0xff, 0x1d));
    }

    #[test]
    fn watches_carry_period_and_deadline() {
        let c = Config::parse(
            "[[can.watch]]\niface = \"can0\"\nid = 0x100\nperiod_ms = 10\ntolerance = 1.2\n",
            Path::new("t"),
        )
        .unwrap();
        let (k, w) = watch(&c.can.watch[0], 5);
        assert_eq!((k.ifindex, k.can_id), (5, 0x100));
        assert_eq!((w.period_ns, w.late_ns), (10_000_000, 12_000_000));
    }
}
