//! The `[can]` section: CAN routes (filter, action, modifications, checksums), watched IDs with
//! their expected period, and the UDP tunnel (cannelloni format) in both directions.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::SocketAddr,
    str::FromStr,
};

use edgeplane_common::can::{
    CAN_EFF_FLAG, CAN_EFF_MASK, CAN_ERR_FLAG, CAN_SFF_MASK, MAX_RULES_PER_IFACE,
};
use serde::{Deserialize, Deserializer};

use super::{CanReceive, Problem, check_rule_name};
use crate::{host::Host, host::netdev};

pub const MAX_CAN_ROUTES: usize = edgeplane_common::can::MAX_RULES as usize;
pub const MAX_CAN_WATCHES: usize = edgeplane_common::can::MAX_WATCHES as usize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanConfig {
    /// Where routes run: the kernel (can_route and can-gw), userspace, or `auto` (the kernel,
    /// userspace when eBPF can't run).
    #[serde(default)]
    pub mode: CanMode,
    /// A tunnelled frame waits at most this long for others to share its datagram.
    #[serde(default = "CanConfig::default_flush_timeout_us")]
    pub flush_timeout_us: u32,
    /// Largest UDP payload the tunnel sends.
    #[serde(default = "CanConfig::default_max_datagram")]
    pub max_datagram: u16,
    /// Local address tunnel datagrams are sent from (port 0: any).
    #[serde(default = "CanConfig::default_tunnel_bind")]
    pub tunnel_bind: SocketAddr,
    #[serde(default)]
    pub route: Vec<CanRoute>,
    #[serde(default)]
    pub watch: Vec<CanWatchConfig>,
    #[serde(default)]
    pub receive: Vec<CanReceive>,
}

impl CanConfig {
    fn default_flush_timeout_us() -> u32 {
        500
    }
    fn default_max_datagram() -> u16 {
        1400
    }
    fn default_tunnel_bind() -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], 0))
    }
}

/// Where CAN routes run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CanMode {
    #[default]
    Auto,
    Kernel,
    /// CAN_RAW sockets in the agent: routes to a CAN interface and `count` only.
    Userspace,
}

impl Default for CanConfig {
    fn default() -> Self {
        Self {
            mode: CanMode::default(),
            flush_timeout_us: Self::default_flush_timeout_us(),
            max_datagram: Self::default_max_datagram(),
            tunnel_bind: Self::default_tunnel_bind(),
            route: Vec::new(),
            watch: Vec::new(),
            receive: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanRoute {
    /// Unique name; the `rule` label of the metrics.
    pub name: String,
    /// CAN netdev the frames arrive on.
    pub ingress: String,
    /// candump syntax: `<id>:<mask>` matches when `id & mask == can_id & mask`, `<id>~<mask>`
    /// matches the others. An 8-digit id is an extended (29-bit) one.
    pub filter: CanFilter,
    /// Where matching frames go: another CAN netdev or a UDP tunnel peer.
    pub to: Option<CanTarget>,
    /// What to do instead of sending them: `count` or `drop` (from local sockets).
    pub action: Option<CanAction>,
    /// Frames that already crossed this many gateways are not routed (can-gw's `-l`).
    #[serde(default = "CanRoute::default_hops")]
    pub hops: u8,
    #[serde(default)]
    pub modify: Vec<CanModifyOp>,
    pub checksum: Option<CanChecksum>,
}

impl CanRoute {
    fn default_hops() -> u8 {
        1
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CanFilter {
    pub id: u32,
    pub mask: u32,
    pub invert: bool,
}

impl FromStr for CanFilter {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (sep, invert) = if s.contains('~') {
            ('~', true)
        } else {
            (':', false)
        };
        let (id, mask) = s.split_once(sep).ok_or_else(|| {
            format!("filter `{s}` must be `<id>:<mask>` or `<id>~<mask>` in hex, e.g. `123:7FF`")
        })?;
        let hex = |v: &str| {
            u32::from_str_radix(v, 16).map_err(|e| format!("filter `{s}`: `{v}` is not hex: {e}"))
        };
        let (mut id_v, mask_v) = (hex(id)?, hex(mask)?);
        // candump: an 8-digit id names an extended frame.
        if id.len() == 8 {
            id_v |= CAN_EFF_FLAG;
        }
        Ok(Self {
            id: id_v,
            mask: mask_v & !CAN_ERR_FLAG,
            invert,
        })
    }
}

impl CanFilter {
    /// CAN_RAW's rule: `can_id & mask == id & mask` (flags included), or the opposite when
    /// inverted.
    pub fn matches(&self, can_id: u32) -> bool {
        (can_id & self.mask == self.id & self.mask) != self.invert
    }
}

impl<'de> Deserialize<'de> for CanFilter {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for CanFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:X}{}{:X}",
            self.id,
            if self.invert { '~' } else { ':' },
            self.mask
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanTarget {
    /// Route to this CAN netdev (executed by the kernel's can-gw).
    pub iface: Option<String>,
    /// Also deliver routed frames to local sockets on `iface` (can-gw's `-e`).
    #[serde(default)]
    pub echo: bool,
    /// Tunnel to this peer (`host:port`), in cannelloni's UDP format version 2.
    pub udp: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CanAction {
    /// Only count matching frames.
    Count,
    /// Keep matching frames from local sockets on the ingress interface.
    Drop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModOp {
    And,
    Or,
    Xor,
    Set,
}

/// One can-gw modification (`cangw -m`); whatever the listing order, AND runs first, then OR,
/// XOR and SET. `data` covers the frame's data from data[0]; bytes not given are left alone by
/// AND, OR and XOR, and set to 0 by SET (can-gw sets the whole field).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanModifyOp {
    pub op: ModOp,
    pub id: Option<u32>,
    /// Length (CAN FD) or DLC (classic CAN).
    pub len: Option<u8>,
    /// CAN FD flags.
    pub flags: Option<u8>,
    /// Up to 64 bytes, hex; the operation covers the bytes given, from data[0].
    pub data: Option<HexBytes>,
}

/// Bytes written as hex digits (`"0011aaff"`), optionally separated by `.`, `:` or spaces.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HexBytes(pub Vec<u8>);

impl<'de> Deserialize<'de> for HexBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        // Digits are read as chars, never by byte index: a pushed rule set may carry any UTF-8.
        let mut nibbles = Vec::with_capacity(s.len());
        for c in s.chars().filter(|c| !matches!(c, '.' | ':' | ' ')) {
            match c.to_digit(16) {
                Some(n) => nibbles.push(n as u8),
                None => {
                    return Err(serde::de::Error::custom(format!(
                        "`{s}` is not hex: `{c}` is not a hex digit"
                    )));
                }
            }
        }
        if !nibbles.len().is_multiple_of(2) {
            return Err(serde::de::Error::custom(format!(
                "`{s}`: an odd number of hex digits"
            )));
        }
        Ok(HexBytes(
            nibbles.chunks_exact(2).map(|p| p[0] << 4 | p[1]).collect(),
        ))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanChecksum {
    pub xor: Option<XorChecksum>,
    pub crc8: Option<Crc8Checksum>,
}

/// `cangw -x`: data[result] = init ^ data[from] ^ ... ^ data[to]. Negative indexes count from
/// the frame's length (-1 is its last byte).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XorChecksum {
    pub from: i8,
    pub to: i8,
    pub result: i8,
    #[serde(default)]
    pub init: u8,
}

/// `cangw -c`: CRC8 (MSB first, polynomial `poly`) over data[from..=to], then the profile's
/// extra byte, XORed with `final_xor` into data[result].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Crc8Checksum {
    pub from: i8,
    pub to: i8,
    pub result: i8,
    #[serde(default)]
    pub init: u8,
    #[serde(default)]
    pub final_xor: u8,
    /// Default 0x1D (SAE J1850, AUTOSAR CRC8).
    #[serde(default = "Crc8Checksum::default_poly")]
    pub poly: u8,
    #[serde(default)]
    pub profile: Crc8Profile,
    /// 1 byte for `one_u8`, 16 for `sixteen_u8`.
    pub profile_data: Option<HexBytes>,
}

impl Crc8Checksum {
    fn default_poly() -> u8 {
        0x1d
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Crc8Profile {
    #[default]
    None,
    /// One more byte: profile_data[0].
    OneU8,
    /// profile_data[data[1] & 0xf] (AUTOSAR E2E profile 1).
    SixteenU8,
    /// The standard ID's two bytes XORed.
    SffIdXor,
}

/// A periodic ID whose cycle time and jitter are measured.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanWatchConfig {
    pub iface: String,
    pub id: u32,
    /// Extended (29-bit) ID; default: when `id` is above 0x7FF.
    pub extended: Option<bool>,
    /// Expected period in milliseconds.
    pub period_ms: f64,
    /// A frame later than `period × tolerance` misses its deadline.
    #[serde(default = "CanWatchConfig::default_tolerance")]
    pub tolerance: f64,
}

impl CanWatchConfig {
    fn default_tolerance() -> f64 {
        1.5
    }

    pub fn is_extended(&self) -> bool {
        self.extended.unwrap_or(self.id > CAN_SFF_MASK)
    }

    /// The `can_id` as the kernel sees it (with CAN_EFF_FLAG for extended IDs).
    pub fn can_id(&self) -> u32 {
        if self.is_extended() {
            self.id | CAN_EFF_FLAG
        } else {
            self.id
        }
    }
}

impl CanConfig {
    /// Whether anything here needs the kernel path (eBPF) in this mode.
    pub fn wants_kernel(&self) -> bool {
        self.mode != CanMode::Userspace
            && !(self.route.is_empty() && self.watch.is_empty() && self.receive.is_empty())
    }

    /// What userspace routes can't do: they read and write CAN_RAW sockets, so they can't keep
    /// a frame from other sockets (`drop`), don't see can-gw's hop count (a hop limit other
    /// than 1), and echo, watched IDs and the tunnel need the kernel program. Checked
    /// statically for `mode = "userspace"`, and before `auto` falls back to it.
    pub fn userspace_problems(&self, out: &mut Vec<Problem>) {
        let mut push = |key: String, message: &str| {
            out.push(Problem {
                key,
                message: message.into(),
            })
        };
        for (i, r) in self.route.iter().enumerate() {
            let key = |f: &str| format!("can.route[{i}].{f}");
            if r.action == Some(CanAction::Drop) {
                push(
                    key("action"),
                    "userspace routes can't keep frames from other sockets: `drop` needs the kernel path",
                );
            }
            if let Some(t) = &r.to {
                if t.udp.is_some() {
                    push(
                        key("to.udp"),
                        "the tunnel reads frames from the kernel program: it needs the kernel path",
                    );
                }
                if t.echo {
                    push(
                        key("to.echo"),
                        "userspace routes write with local loopback off (so routed frames are not routed again): echo needs the kernel path",
                    );
                }
            }
            if r.hops != 1 {
                push(
                    key("hops"),
                    "userspace routes never route a frame twice: only hops = 1 (the default)",
                );
            }
        }
        for i in 0..self.watch.len() {
            push(
                format!("can.watch[{i}]"),
                "watched IDs are measured by the kernel program: they need the kernel path",
            );
        }
        for i in 0..self.receive.len() {
            push(
                format!("can.receive[{i}]"),
                "the tunnel runs beside the kernel program: it needs the kernel path",
            );
        }
    }

    /// Static checks of the `[can]` section.
    pub(super) fn problems(&self, out: &mut Vec<Problem>) {
        if self.mode == CanMode::Userspace {
            self.userspace_problems(out);
        }
        let mut push = |key: String, message: String| out.push(Problem { key, message });
        if !(1..=1_000_000).contains(&self.flush_timeout_us) {
            push(
                "can.flush_timeout_us".into(),
                "must be 1 to 1000000 (µs)".into(),
            );
        }
        // The header (5) and one full CAN FD frame (4 + 1 + 1 + 64) must fit.
        if !(75..=65507).contains(&self.max_datagram) {
            push(
                "can.max_datagram".into(),
                "must be 75 (one CAN FD frame) to 65507 bytes".into(),
            );
        }
        if self.route.len() > MAX_CAN_ROUTES {
            push(
                "can.route".into(),
                format!("{} routes; at most {MAX_CAN_ROUTES}", self.route.len()),
            );
        }
        let mut names: HashMap<&str, usize> = HashMap::new();
        let mut per_ingress: HashMap<&str, usize> = HashMap::new();
        for (i, r) in self.route.iter().enumerate() {
            let key = |f: &str| format!("can.route[{i}].{f}");
            if let Err(why) = check_rule_name(&r.name) {
                push(key("name"), why);
            } else if let Some(first) = names.insert(&r.name, i) {
                push(
                    key("name"),
                    format!(
                        "duplicate route name `{}` (also can.route[{first}])",
                        r.name
                    ),
                );
            }
            if let Err(why) = netdev::check_name(&r.ingress) {
                push(key("ingress"), why);
            }
            let n = per_ingress.entry(&r.ingress).or_default();
            *n += 1;
            if *n == MAX_RULES_PER_IFACE + 1 {
                push(
                    key("ingress"),
                    format!("more than {MAX_RULES_PER_IFACE} routes on `{}`", r.ingress),
                );
            }
            match (&r.to, r.action) {
                (None, None) => push(key("to"), "give `to = { iface = ... }`, `to = { udp = \"host:port\" }` or `action = \"count\"|\"drop\"`".into()),
                (Some(_), Some(_)) => push(key("action"), "a route has either `to` or `action`, not both".into()),
                (Some(t), None) => match (&t.iface, &t.udp) {
                    (Some(iface), None) => {
                        if let Err(why) = netdev::check_name(iface) {
                            push(key("to.iface"), why);
                        } else if *iface == r.ingress {
                            push(key("to.iface"), "routing a frame back to its own bus would loop it".into());
                        }
                    }
                    (None, Some(udp)) => {
                        if !udp.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0)) {
                            push(key("to.udp"), format!("`{udp}` must be `host:port` with a port above 0"));
                        }
                        if !r.modify.is_empty() || r.checksum.is_some() {
                            push(key("modify"), "modifications and checksums apply to routes to a CAN interface; the tunnel carries frames as they are".into());
                        }
                        if t.echo {
                            push(key("to.echo"), "echo applies to routes to a CAN interface".into());
                        }
                    }
                    _ => push(key("to"), "give exactly one of `iface` and `udp`".into()),
                },
                (None, Some(_)) => {
                    if !r.modify.is_empty() || r.checksum.is_some() {
                        push(key("modify"), "modifications and checksums apply to routed frames only".into());
                    }
                }
            }
            if r.hops == 0 {
                push(
                    key("hops"),
                    "must be at least 1 (a frame from a bus has made 0 hops)".into(),
                );
            }
            let mut ops = HashSet::new();
            for (j, m) in r.modify.iter().enumerate() {
                let mkey = |f: &str| format!("can.route[{i}].modify[{j}]{f}");
                if !ops.insert(m.op) {
                    push(
                        mkey(".op"),
                        format!(
                            "`{:?}` appears twice; combine its fields into one entry",
                            m.op
                        )
                        .to_lowercase(),
                    );
                }
                if m.id.is_none() && m.len.is_none() && m.flags.is_none() && m.data.is_none() {
                    push(
                        mkey(""),
                        "names no field: give at least one of id, len, flags, data".into(),
                    );
                }
                if m.len.is_some_and(|l| l > 64) && m.op == ModOp::Set {
                    push(mkey(".len"), "a CAN frame's length is at most 64".into());
                }
                if m.data
                    .as_ref()
                    .is_some_and(|d| d.0.is_empty() || d.0.len() > 64)
                {
                    push(mkey(".data"), "must be 1 to 64 bytes".into());
                }
            }
            if let Some(c) = &r.checksum {
                let idx_ok = |v: i8| (-64..64).contains(&v);
                if let Some(x) = &c.xor {
                    for (f, v) in [("from", x.from), ("to", x.to), ("result", x.result)] {
                        if !idx_ok(v) {
                            push(
                                key(&format!("checksum.xor.{f}")),
                                "index must be -64 to 63".into(),
                            );
                        }
                    }
                }
                if let Some(c8) = &c.crc8 {
                    for (f, v) in [("from", c8.from), ("to", c8.to), ("result", c8.result)] {
                        if !idx_ok(v) {
                            push(
                                key(&format!("checksum.crc8.{f}")),
                                "index must be -64 to 63".into(),
                            );
                        }
                    }
                    let want = match c8.profile {
                        Crc8Profile::OneU8 => 1,
                        Crc8Profile::SixteenU8 => 16,
                        Crc8Profile::None | Crc8Profile::SffIdXor => 0,
                    };
                    let have = c8.profile_data.as_ref().map_or(0, |d| d.0.len());
                    if have != want {
                        push(
                            key("checksum.crc8.profile_data"),
                            format!("profile {:?} takes {want} byte(s), got {have}", c8.profile),
                        );
                    }
                }
            }
        }

        if self.watch.len() > MAX_CAN_WATCHES {
            push(
                "can.watch".into(),
                format!("{} watches; at most {MAX_CAN_WATCHES}", self.watch.len()),
            );
        }
        let mut watched: HashMap<(&str, u32), usize> = HashMap::new();
        for (i, w) in self.watch.iter().enumerate() {
            let key = |f: &str| format!("can.watch[{i}].{f}");
            if let Err(why) = netdev::check_name(&w.iface) {
                push(key("iface"), why);
            }
            let max = if w.is_extended() {
                CAN_EFF_MASK
            } else {
                CAN_SFF_MASK
            };
            if w.id > max {
                push(
                    key("id"),
                    format!(
                        "{:#X} does not fit a {} ID (max {max:#X})",
                        w.id,
                        if w.is_extended() { "29-bit" } else { "11-bit" }
                    ),
                );
            }
            if !(w.period_ms > 0.0 && w.period_ms <= 3_600_000.0) {
                push(
                    key("period_ms"),
                    "must be above 0 and at most one hour".into(),
                );
            }
            if !(w.tolerance >= 1.0 && w.tolerance <= 1000.0) {
                push(key("tolerance"), "must be 1.0 (no slack) to 1000".into());
            }
            if let Some(first) = watched.insert((&w.iface, w.can_id()), i) {
                push(
                    key("id"),
                    format!(
                        "{:#X} on `{}` is already watched (can.watch[{first}])",
                        w.id, w.iface
                    ),
                );
            }
        }

        super::can_receive::problems(&self.receive, out);
    }

    /// Host checks: interfaces exist and are CAN netdevs. (Tunnel peers are resolved when the
    /// config is prepared, see [`crate::host::resolve`].)
    pub(super) fn host_problems(&self, host: &dyn Host, out: &mut Vec<Problem>) {
        let mut check_can = |key: String, iface: &str| {
            if host.ifindex(iface).is_none() {
                out.push(Problem {
                    key,
                    message: format!(
                        "interface `{iface}` does not exist on this host (see `ip link`)"
                    ),
                });
            } else if !host.is_can(iface) {
                out.push(Problem {
                    key,
                    message: format!("`{iface}` is not a CAN interface"),
                });
            }
        };
        for (i, r) in self.route.iter().enumerate() {
            check_can(format!("can.route[{i}].ingress"), &r.ingress);
            if let Some(iface) = r.to.as_ref().and_then(|t| t.iface.as_ref()) {
                check_can(format!("can.route[{i}].to.iface"), iface);
            }
        }
        for (i, w) in self.watch.iter().enumerate() {
            check_can(format!("can.watch[{i}].iface"), &w.iface);
        }
        for (i, r) in self.receive.iter().enumerate() {
            check_can(format!("can.receive[{i}].iface"), &r.iface);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{Config, ConfigError};

    fn can(text: &str) -> Result<CanConfig, ConfigError> {
        Config::parse(text, Path::new("t.toml")).map(|c| c.can)
    }

    fn keys(text: &str) -> Vec<String> {
        match can(text) {
            Err(e) => e.problems().iter().map(|p| p.key.clone()).collect(),
            Ok(_) => vec![],
        }
    }

    #[test]
    fn filters_follow_candump() {
        assert_eq!(
            "123:7FF".parse::<CanFilter>().unwrap(),
            CanFilter {
                id: 0x123,
                mask: 0x7ff,
                invert: false
            }
        );
        assert_eq!(
            "123~7FF".parse::<CanFilter>().unwrap(),
            CanFilter {
                id: 0x123,
                mask: 0x7ff,
                invert: true
            }
        );
        let eff = "12345678:1FFFFFFF".parse::<CanFilter>().unwrap();
        assert_eq!(eff.id, 0x1234_5678 | CAN_EFF_FLAG);
        assert_eq!("0:0".parse::<CanFilter>().unwrap().mask, 0);
        assert!("123".parse::<CanFilter>().is_err());
        assert!("12g:7FF".parse::<CanFilter>().is_err());
    }

    #[test]
    fn hex_bytes_reject_non_ascii_without_panicking() {
        // Fuzz regression (rules_push): a multi-byte char where a hex digit pair was sliced.
        for data in [
            "0011223344556677889900aaƼ",
            "Ƽ0",
            "1Ƽ",
            "ä",
            "0x11",
            "0Ƽ0",
            "00aƼ0",
        ] {
            let text = format!(
                "[[can.route]]\nname = \"a\"\ningress = \"can0\"\nfilter = \"100:700\"\nto = {{ iface = \"can1\" }}\nmodify = [ {{ op = \"set\", data = \"{data}\" }} ]"
            );
            let err = format!("{:?}", can(&text).expect_err(data));
            assert!(err.contains("hex"), "{data}: {err}");
        }
        let ok = "[[can.route]]\nname = \"a\"\ningress = \"can0\"\nfilter = \"100:700\"\nto = { iface = \"can1\" }\nmodify = [ { op = \"set\", data = \"aB:0f 10\" } ]";
        assert_eq!(
            can(ok).unwrap().route[0].modify[0].data,
            Some(HexBytes(vec![0xab, 0x0f, 0x10]))
        );
    }

    #[test]
    fn a_full_route_parses() {
        let c = can(
            r#"[[can.route]]
               name = "pt-to-body"
               ingress = "can0"
               filter = "100:700"
               to = { iface = "can1" }
               hops = 2
               modify = [ { op = "set", data = "11.22" }, { op = "and", id = 0x7FF, len = 8 } ]
               checksum = { xor = { from = 0, to = -2, result = -1 }, crc8 = { from = 0, to = 5, result = 6, init = 0xFF, profile = "one_u8", profile_data = "AB" } }
               [[can.watch]]
               iface = "can0"
               id = 0x123
               period_ms = 10
               [[can.receive]]
               name = "from-edge"
               listen = "0.0.0.0:20000"
               iface = "can1"
               peer = "192.0.2.5""#,
        )
        .unwrap();
        let r = &c.route[0];
        assert_eq!(r.hops, 2);
        assert_eq!(r.modify[0].data, Some(HexBytes(vec![0x11, 0x22])));
        assert_eq!(
            r.checksum.as_ref().unwrap().crc8.as_ref().unwrap().poly,
            0x1d
        );
        assert_eq!(c.watch[0].can_id(), 0x123);
        assert_eq!(c.watch[0].tolerance, 1.5);
        assert_eq!(c.flush_timeout_us, 500);
    }

    #[test]
    fn impossible_routes_name_their_keys() {
        let k = keys(
            r#"[[can.route]]
               name = "a"
               ingress = "can0"
               filter = "1:1"
               [[can.route]]
               name = "a"
               ingress = "can0"
               filter = "1:1"
               to = { iface = "can0" }
               action = "drop"
               hops = 0
               modify = [ { op = "or" }, { op = "or", data = "" } ]
               [[can.route]]
               name = "c"
               ingress = "can0"
               filter = "1:1"
               to = { udp = "nohost" }
               checksum = { crc8 = { from = 0, to = 99, result = 7, profile = "one_u8" } }"#,
        );
        assert_eq!(
            k,
            [
                "can.route[0].to",
                "can.route[1].name",
                "can.route[1].action",
                "can.route[1].hops",
                "can.route[1].modify[0]",
                "can.route[1].modify[1].op",
                "can.route[1].modify[1].data",
                "can.route[2].to.udp",
                "can.route[2].modify",
                "can.route[2].checksum.crc8.to",
                "can.route[2].checksum.crc8.profile_data",
            ]
        );
    }

    #[test]
    fn watches_and_receivers_are_checked() {
        let k = keys(
            r#"[[can.watch]]
               iface = "can0"
               id = 0x800
               extended = false
               period_ms = 0
               [[can.watch]]
               iface = "can0"
               id = 0x800
               extended = false
               period_ms = 5
               tolerance = 0.5
               [[can.receive]]
               name = "r"
               listen = "0.0.0.0:0"
               iface = "can1"
               peer = "any""#,
        );
        assert_eq!(
            k,
            [
                "can.watch[0].id",
                "can.watch[0].period_ms",
                "can.watch[1].id",
                "can.watch[1].tolerance",
                "can.watch[1].id",
                "can.receive[0].listen",
            ]
        );
        let c = can("[[can.watch]]\niface = \"can0\"\nid = 0x18FEF100\nperiod_ms = 100\n").unwrap();
        assert_eq!(c.watch[0].can_id(), 0x18FE_F100 | CAN_EFF_FLAG);
    }

    #[test]
    fn bad_hex_and_unknown_keys_fail_parsing() {
        let e = can("[[can.route]]\nname = \"a\"\ningress = \"can0\"\nfilter = \"1:1\"\nto = { iface = \"can1\" }\nmodify = [ { op = \"set\", data = \"0g\" } ]\n").unwrap_err();
        assert!(e.to_string().contains("is not hex"), "{e}");
        let e = can("[can]\nflush_timeout = 5\n").unwrap_err();
        assert!(
            e.to_string().contains("unknown field `flush_timeout`"),
            "{e}"
        );
    }
}

#[cfg(test)]
mod userspace_tests {
    use std::path::Path;

    use crate::config::{Config, ConfigError};

    #[test]
    fn userspace_routes_reject_what_needs_the_kernel() {
        let text = r#"
            [can]
            mode = "userspace"
            [[can.route]]
            name = "d"
            ingress = "can0"
            filter = "0:0"
            action = "drop"
            [[can.route]]
            name = "t"
            ingress = "can0"
            filter = "1:7FF"
            to = { udp = "127.0.0.1:2000" }
            [[can.route]]
            name = "e"
            ingress = "can0"
            filter = "2:7FF"
            to = { iface = "can1", echo = true }
            hops = 2
            [[can.route]]
            name = "ok"
            ingress = "can0"
            filter = "3:7FF"
            to = { iface = "can1" }
            [[can.watch]]
            iface = "can0"
            id = 0x100
            period_ms = 10
        "#;
        let keys: Vec<String> = match Config::parse(text, Path::new("t")) {
            Err(ConfigError::Invalid { problems, .. }) => {
                problems.into_iter().map(|p| p.key).collect()
            }
            other => panic!("expected problems, got {other:?}"),
        };
        assert_eq!(
            keys,
            [
                "can.route[0].action",
                "can.route[1].to.udp",
                "can.route[2].to.echo",
                "can.route[2].hops",
                "can.watch[0]",
            ]
        );
        let auto = text.replace("mode = \"userspace\"", "mode = \"auto\"");
        assert!(Config::parse(&auto, Path::new("t")).is_ok());
    }
}
