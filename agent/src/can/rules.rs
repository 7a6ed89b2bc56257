//! Compiling `[[can.route]]` and `[[can.watch]]` into the kernel's map values.

use std::net::SocketAddr;

use edgeplane_common::can::{
    CanCrc8, CanModify, CanRule, CanWatch, CanWatchKey, CanXor, Ops, action, crc8_profile,
    rule_flag,
};

use crate::config::{CanAction, CanRoute, CanWatchConfig, Crc8Profile, ModOp};

/// A route as the kernel sees it, before it has a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledRoute {
    pub name: String,
    pub ingress: String,
    pub ingress_ifindex: u32,
    /// Egress interface name for routes to a CAN netdev.
    pub egress: Option<String>,
    /// Tunnel peer for routes to UDP; `rule.tunnel` is set when tunnels are numbered.
    pub peer: Option<SocketAddr>,
    pub rule: CanRule,
    /// The CRC8 lookup table, for rules with a CRC8 checksum.
    pub crc8_table: Option<[u8; 256]>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CompileError {
    #[error("route `{route}`: interface `{iface}` does not exist on this host (see `ip link`)")]
    UnknownInterface { route: String, iface: String },
    #[error("route `{route}`: tunnel peer {why}")]
    Peer { route: String, why: String },
}

/// Facts about interfaces the compiler needs from the host.
pub trait Host {
    fn ifindex(&self, iface: &str) -> Option<u32>;
    /// Whether the interface carries CAN FD (MTU 72).
    fn is_fd(&self, iface: &str) -> bool;
}

pub fn compile(r: &CanRoute, host: &dyn Host) -> Result<CompiledRoute, CompileError> {
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
        egress_ifindex: 0,
        tunnel: 0,
        xor: CanXor::default(),
        crc8: CanCrc8::default(),
        modify: modify(r),
    };
    let (mut egress, mut peer) = (None, None);
    match (&r.to, r.action) {
        (_, Some(CanAction::Drop)) => rule.action = action::DROP,
        (_, Some(CanAction::Count)) | (None, None) => rule.action = action::COUNT,
        (Some(t), None) => {
            if let Some(iface) = &t.iface {
                rule.action = action::ROUTE;
                rule.egress_ifindex = ifindex(iface)?;
                if host.is_fd(iface) {
                    rule.flags |= rule_flag::EGRESS_FD;
                }
                egress = Some(iface.clone());
            } else if let Some(res) = r.udp_peer() {
                rule.action = action::TUNNEL;
                peer = Some(res.map_err(|why| CompileError::Peer {
                    route: r.name.clone(),
                    why,
                })?);
            }
        }
    }
    if !r.modify.is_empty() {
        rule.flags |= rule_flag::MODIFY;
    }
    let mut crc8_table = None;
    if let Some(c) = &r.checksum {
        if let Some(x) = &c.xor {
            rule.flags |= rule_flag::XOR;
            rule.xor = CanXor {
                from: x.from,
                to: x.to,
                result: x.result,
                init: x.init,
            };
        }
        if let Some(c8) = &c.crc8 {
            rule.flags |= rule_flag::CRC8;
            let mut profile_data = [0u8; 16];
            if let Some(d) = &c8.profile_data {
                for (p, b) in profile_data.iter_mut().zip(&d.0) {
                    *p = *b;
                }
            }
            rule.crc8 = CanCrc8 {
                from: c8.from,
                to: c8.to,
                result: c8.result,
                init: c8.init,
                final_xor: c8.final_xor,
                profile: match c8.profile {
                    Crc8Profile::None => crc8_profile::NONE,
                    Crc8Profile::OneU8 => crc8_profile::ONE_U8,
                    Crc8Profile::SixteenU8 => crc8_profile::SIXTEEN_U8,
                    Crc8Profile::SffIdXor => crc8_profile::SFF_ID_XOR,
                },
                _pad: [0; 2],
                profile_data,
            };
            crc8_table = Some(crc8_table_for(c8.poly));
        }
    }
    Ok(CompiledRoute {
        name: r.name.clone(),
        ingress: r.ingress.clone(),
        ingress_ifindex,
        egress,
        peer,
        rule,
        crc8_table,
    })
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

/// Folds the listed operations into AND/OR/XOR/SET values for every field, identity where an
/// operation does not name a field, so the kernel applies all four unconditionally.
fn modify(r: &CanRoute) -> CanModify {
    let mut m = CanModify {
        id: Ops {
            and: !0,
            or: 0,
            xor: 0,
            set_mask: 0,
            set: 0,
        },
        len: Ops {
            and: !0,
            or: 0,
            xor: 0,
            set_mask: 0,
            set: 0,
        },
        flags: Ops {
            and: !0,
            or: 0,
            xor: 0,
            set_mask: 0,
            set: 0,
        },
        _pad: [0; 2],
        data: Ops {
            and: [!0; 16],
            or: [0; 16],
            xor: [0; 16],
            set_mask: [0; 16],
            set: [0; 16],
        },
    };
    for op in &r.modify {
        if let Some(v) = op.id {
            apply(&mut m.id, op.op, v, !0);
        }
        if let Some(v) = op.len {
            apply(&mut m.len, op.op, v, !0);
        }
        if let Some(v) = op.flags {
            apply(&mut m.flags, op.op, v, !0);
        }
        if let Some(d) = &op.data {
            // Byte-wise on 64 bytes: bytes not given are left alone (AND 0xff, SET mask 0).
            let mut value = [0u8; 64];
            let mut given = [0u8; 64];
            for (i, b) in d.0.iter().enumerate().take(64) {
                value[i] = *b;
                given[i] = 0xff;
            }
            let words = |bytes: &[u8; 64]| -> [u32; 16] {
                std::array::from_fn(|i| {
                    u32::from_ne_bytes(bytes[4 * i..4 * i + 4].try_into().expect("4 bytes"))
                })
            };
            let (value, given) = (words(&value), words(&given));
            let t = &mut m.data;
            for i in 0..16 {
                match op.op {
                    ModOp::And => t.and[i] = value[i] | !given[i],
                    ModOp::Or => t.or[i] = value[i],
                    ModOp::Xor => t.xor[i] = value[i],
                    ModOp::Set => {
                        t.set_mask[i] = given[i];
                        t.set[i] = value[i];
                    }
                }
            }
        }
    }
    m
}

fn apply<T: Copy + std::ops::BitAnd<Output = T>>(o: &mut Ops<T>, op: ModOp, v: T, all: T) {
    match op {
        ModOp::And => o.and = v,
        ModOp::Or => o.or = v,
        ModOp::Xor => o.xor = v,
        ModOp::Set => {
            o.set_mask = all;
            o.set = v & all;
        }
    }
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

/// The userspace mirror of the kernel's transform, for tests and the userspace router.
pub fn apply_modify(
    m: &CanModify,
    can_id: u32,
    len: u8,
    flags: u8,
    data: &mut [u8; 64],
) -> (u32, u8, u8) {
    let id = ((((can_id & m.id.and) | m.id.or) ^ m.id.xor) & !m.id.set_mask) | m.id.set;
    let l = ((((len & m.len.and) | m.len.or) ^ m.len.xor) & !m.len.set_mask) | m.len.set;
    let f =
        ((((flags & m.flags.and) | m.flags.or) ^ m.flags.xor) & !m.flags.set_mask) | m.flags.set;
    for i in 0..16 {
        let d = u32::from_ne_bytes(data[4 * i..4 * i + 4].try_into().expect("4 bytes"));
        let t = &m.data;
        let d = ((((d & t.and[i]) | t.or[i]) ^ t.xor[i]) & !t.set_mask[i]) | t.set[i];
        data[4 * i..4 * i + 4].copy_from_slice(&d.to_ne_bytes());
    }
    (id, l, f)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    struct FakeHost;
    impl Host for FakeHost {
        fn ifindex(&self, iface: &str) -> Option<u32> {
            match iface {
                "can0" => Some(5),
                "can1" => Some(6),
                "vcan9" => Some(7),
                _ => None,
            }
        }
        fn is_fd(&self, iface: &str) -> bool {
            iface == "can1"
        }
    }

    fn route(text: &str) -> CompiledRoute {
        let c = Config::parse(text, Path::new("t.toml")).unwrap();
        compile(&c.can.route[0], &FakeHost).unwrap()
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
    fn routes_compile_to_flags_and_egress() {
        let c = route(
            r#"[[can.route]]
               name = "r"
               ingress = "can0"
               filter = "123~7FF"
               to = { iface = "can1" }"#,
        );
        assert_eq!(c.ingress_ifindex, 5);
        assert_eq!(
            (c.rule.action, c.rule.egress_ifindex, c.rule.hops),
            (action::ROUTE, 6, 1)
        );
        assert_eq!(c.rule.flags, rule_flag::INVERT | rule_flag::EGRESS_FD);
        assert_eq!((c.rule.filter_id, c.rule.filter_mask), (0x123, 0x7ff));
        let t = route(
            "[[can.route]]\nname = \"t\"\ningress = \"can0\"\nfilter = \"0:0\"\nto = { udp = \"127.0.0.1:20000\" }\n",
        );
        assert_eq!(t.rule.action, action::TUNNEL);
        assert_eq!(t.peer, Some("127.0.0.1:20000".parse().unwrap()));
        let d = route(
            "[[can.route]]\nname = \"d\"\ningress = \"can0\"\nfilter = \"0:0\"\naction = \"drop\"\n",
        );
        assert_eq!(d.rule.action, action::DROP);
    }

    #[test]
    fn modifications_run_and_or_xor_set_whatever_the_order() {
        let c = route(
            r#"[[can.route]]
               name = "m"
               ingress = "can0"
               filter = "0:0"
               to = { iface = "vcan9" }
               modify = [
                 { op = "set", flags = 0x05 },
                 { op = "xor", id = 0x001, data = "0F" },
                 { op = "or", len = 0x08, data = "F0" },
                 { op = "and", id = 0x7F0, len = 0x0F, data = "3C" },
               ]"#,
        );
        assert_eq!(c.rule.flags & rule_flag::MODIFY, rule_flag::MODIFY);
        let mut data = [0u8; 64];
        data[0] = 0x81;
        data[1] = 0x11;
        data[2] = 0x22;
        let (id, len, flags) = apply_modify(&c.rule.modify, 0x123, 3, 0, &mut data);
        // id: (0x123 & 0x7F0) | 0 ^ 0x001 = 0x121
        assert_eq!(id, 0x121);
        // len: (3 & 0xF) | 8 = 11
        assert_eq!(len, 11);
        assert_eq!(flags, 0x05);
        // data[0]: ((0x81 & 0x3C) | 0xF0) ^ 0x0F = 0xFF; the other bytes are left alone.
        assert_eq!(&data[..3], &[0xff, 0x11, 0x22]);
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
