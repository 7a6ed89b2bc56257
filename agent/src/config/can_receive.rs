//! `[[can.receive]]`: the receiving end of a tunnel, and what it lets onto its bus: which peer,
//! which interface the datagrams must come in on, which frames, and how many.

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, SocketAddr},
    str::FromStr,
};

use serde::{Deserialize, Deserializer};

use super::{CanFilter, Problem, check_rule_name};
use crate::host::netdev;

/// The most frames a datagram of the largest UDP payload (65507 bytes) can carry: a 5-byte
/// header, then 5 bytes per classic frame without data.
pub const MAX_FRAMES_PER_DATAGRAM: u16 = (65507 - 5) / 5;
/// Filters per receiver; CAN_RAW allows more, but a longer list is a config mistake.
pub const MAX_ACCEPT_FILTERS: usize = 64;

/// The receiving end of a tunnel: datagrams arriving on `listen` are checked and the frames
/// the rules allow are written to `iface`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanReceive {
    pub name: String,
    pub listen: SocketAddr,
    pub iface: String,
    /// Who may send: an address, optionally with its port, or `any` (logged as a warning).
    pub peer: TunnelPeer,
    /// Receive only datagrams that came in on this interface (SO_BINDTODEVICE), e.g. a
    /// WireGuard or MACsec link: spoofed sources on other links never reach the receiver.
    pub bind_iface: Option<String>,
    /// candump syntax, `<id>:<mask>` or `<id>~<mask>`; a frame is written when it matches
    /// one of them. None given: every ID.
    #[serde(default)]
    pub accept: Vec<CanFilter>,
    /// Error frames (CAN_ERR_FLAG) are never written unless this is true.
    #[serde(default)]
    pub accept_error_frames: bool,
    #[serde(default = "yes")]
    pub accept_remote_frames: bool,
    #[serde(default = "yes")]
    pub accept_fd_frames: bool,
    /// Frames per second written to the bus, on average; more are dropped.
    #[serde(default = "CanReceive::default_max_frame_rate")]
    pub max_frame_rate: u32,
    /// Frames that may be written at once above the rate (a token bucket's size).
    #[serde(default = "CanReceive::default_max_burst")]
    pub max_burst: u32,
    /// A datagram announcing more frames is rejected whole.
    #[serde(default = "CanReceive::default_max_frames_per_datagram")]
    pub max_frames_per_datagram: u16,
}

fn yes() -> bool {
    true
}

impl CanReceive {
    /// About a busy 1 Mbit/s classic bus's worth of short frames, twice over.
    fn default_max_frame_rate() -> u32 {
        20_000
    }
    fn default_max_burst() -> u32 {
        2_000
    }
    /// Over the 279 frames a default (1400-byte) datagram holds at most.
    fn default_max_frames_per_datagram() -> u16 {
        1024
    }

    /// Whether `can_id` (flags included) passes the `accept` filters.
    pub fn accepts_id(&self, can_id: u32) -> bool {
        self.accept.is_empty() || self.accept.iter().any(|f| f.matches(can_id))
    }
}

/// Who may send to a receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelPeer {
    Any,
    /// This address; from this port only when one is given.
    Addr {
        ip: IpAddr,
        port: Option<u16>,
    },
}

impl TunnelPeer {
    /// Whether a datagram from `from` is this peer's; IPv4-mapped IPv6 addresses (a receiver
    /// listening on `[::]`) count as their IPv4 address.
    pub fn admits(&self, from: SocketAddr) -> bool {
        match *self {
            Self::Any => true,
            Self::Addr { ip, port } => {
                ip.to_canonical() == from.ip().to_canonical()
                    && port.is_none_or(|p| p == from.port())
            }
        }
    }
}

impl FromStr for TunnelPeer {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "any" {
            return Ok(Self::Any);
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Self::Addr { ip, port: None });
        }
        match s.parse::<SocketAddr>() {
            Ok(a) if a.port() != 0 => Ok(Self::Addr {
                ip: a.ip(),
                port: Some(a.port()),
            }),
            Ok(_) => Err(format!(
                "peer `{s}`: port 0 is no sender's port; leave the port out to accept any"
            )),
            Err(_) => Err(format!(
                "peer `{s}` must be an address (`192.0.2.5`, `2001:db8::5`), an address and port (`192.0.2.5:20000`, `[2001:db8::5]:20000`) or `any`"
            )),
        }
    }
}

impl<'de> Deserialize<'de> for TunnelPeer {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for TunnelPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("any"),
            Self::Addr { ip, port: None } => write!(f, "{ip}"),
            Self::Addr { ip, port: Some(p) } => write!(f, "{}", SocketAddr::new(*ip, *p)),
        }
    }
}

/// Static checks of the receivers.
pub(super) fn problems(receive: &[CanReceive], out: &mut Vec<Problem>) {
    let mut push = |key: String, message: String| out.push(Problem { key, message });
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut listens: HashMap<SocketAddr, usize> = HashMap::new();
    for (i, r) in receive.iter().enumerate() {
        let key = |f: &str| format!("can.receive[{i}].{f}");
        if let Err(why) = check_rule_name(&r.name) {
            push(key("name"), why);
        } else if let Some(first) = names.insert(&r.name, i) {
            push(
                key("name"),
                format!(
                    "duplicate receive name `{}` (also can.receive[{first}])",
                    r.name
                ),
            );
        }
        if r.listen.port() == 0 {
            push(key("listen"), "needs a port: the peer sends to it".into());
        }
        if let Some(first) = listens.insert(r.listen, i) {
            push(
                key("listen"),
                format!("{} is already used by can.receive[{first}]", r.listen),
            );
        }
        if let Err(why) = netdev::check_name(&r.iface) {
            push(key("iface"), why);
        }
        if let Some(Err(why)) = r.bind_iface.as_deref().map(netdev::check_name) {
            push(key("bind_iface"), why);
        }
        if r.accept.len() > MAX_ACCEPT_FILTERS {
            push(
                key("accept"),
                format!("{} filters; at most {MAX_ACCEPT_FILTERS}", r.accept.len()),
            );
        }
        if !(1..=1_000_000).contains(&r.max_frame_rate) {
            push(
                key("max_frame_rate"),
                "must be 1 to 1000000 frames per second".into(),
            );
        }
        if !(1..=1_000_000).contains(&r.max_burst) {
            push(key("max_burst"), "must be 1 to 1000000 frames".into());
        }
        if !(1..=MAX_FRAMES_PER_DATAGRAM).contains(&r.max_frames_per_datagram) {
            push(
                key("max_frames_per_datagram"),
                format!(
                    "must be 1 to {MAX_FRAMES_PER_DATAGRAM} (what a 65507-byte datagram can hold)"
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{CanConfig, Config, ConfigError};

    fn can(text: &str) -> Result<CanConfig, ConfigError> {
        Config::parse(text, Path::new("t.toml")).map(|c| c.can)
    }

    fn receiver(extra: &str) -> String {
        format!(
            "[[can.receive]]\nname = \"r\"\nlisten = \"0.0.0.0:20000\"\niface = \"can1\"\n{extra}\n"
        )
    }

    fn error(text: &str) -> String {
        can(text).unwrap_err().to_string()
    }

    #[test]
    fn a_full_receiver_parses_and_defaults_are_safe() {
        let c = can(&receiver(
            "peer = \"192.0.2.5:20001\"\nbind_iface = \"wg0\"\naccept = [\"100:700\", \"12345678:1FFFFFFF\"]\naccept_remote_frames = false\nmax_frame_rate = 100\nmax_burst = 10\nmax_frames_per_datagram = 50",
        ))
        .unwrap();
        let r = &c.receive[0];
        assert_eq!(
            r.peer,
            TunnelPeer::Addr {
                ip: "192.0.2.5".parse().unwrap(),
                port: Some(20001)
            }
        );
        assert_eq!(r.bind_iface.as_deref(), Some("wg0"));
        assert!(r.accepts_id(0x1ab));
        assert!(!r.accepts_id(0x2ab));
        assert!(r.accepts_id(0x1234_5678 | edgeplane_common::can::CAN_EFF_FLAG));
        assert!(!r.accepts_id(0x1234_5679 | edgeplane_common::can::CAN_EFF_FLAG));
        let inverted = &can(&receiver("peer = \"any\"\naccept = [\"123~7FF\"]"))
            .unwrap()
            .receive[0];
        assert!(!inverted.accepts_id(0x123) && inverted.accepts_id(0x124));
        assert!(!r.accept_remote_frames && r.accept_fd_frames && !r.accept_error_frames);
        assert_eq!(
            (r.max_frame_rate, r.max_burst, r.max_frames_per_datagram),
            (100, 10, 50)
        );

        let d = &can(&receiver("peer = \"any\"")).unwrap().receive[0];
        assert_eq!(d.peer, TunnelPeer::Any);
        assert!(d.accepts_id(0x7ff) && !d.accept_error_frames);
        assert_eq!(
            (d.max_frame_rate, d.max_burst, d.max_frames_per_datagram),
            (20_000, 2_000, 1024)
        );
    }

    #[test]
    fn peer_is_required_and_checked() {
        assert!(error(&receiver("")).contains("missing field `peer`"));
        for bad in [
            "192.0.2.500",
            "host.example",
            "192.0.2.5:0",
            "",
            "ANY",
            "[::1]",
        ] {
            let e = error(&receiver(&format!("peer = \"{bad}\"")));
            assert!(e.contains("peer `"), "{bad}: {e}");
        }
        let e = error(&receiver("peer = 5"));
        assert!(e.contains("invalid type"), "{e}");
    }

    #[test]
    fn peers_match_address_port_and_mapped_ipv6() {
        let from = |s: &str| s.parse::<SocketAddr>().unwrap();
        let p: TunnelPeer = "192.0.2.5".parse().unwrap();
        assert!(p.admits(from("192.0.2.5:1")));
        assert!(p.admits(from("[::ffff:192.0.2.5]:1")));
        assert!(!p.admits(from("192.0.2.6:1")));
        let p: TunnelPeer = "192.0.2.5:20001".parse().unwrap();
        assert!(p.admits(from("[::ffff:192.0.2.5]:20001")));
        assert!(!p.admits(from("192.0.2.5:20002")));
        let p: TunnelPeer = "[2001:db8::5]:7".parse().unwrap();
        assert!(p.admits(from("[2001:db8::5]:7")));
        assert!(!p.admits(from("[2001:db8::6]:7")));
        let p: TunnelPeer = "::ffff:192.0.2.5".parse().unwrap();
        assert!(p.admits(from("192.0.2.5:9")));
        assert!(TunnelPeer::Any.admits(from("203.0.113.1:9")));
        assert_eq!(p.to_string(), "::ffff:192.0.2.5");
    }

    #[test]
    fn malformed_accept_filters_fail_parsing() {
        for bad in [
            "123",
            "12g:7FF",
            "123:",
            ":7FF",
            "1:2:3",
            "123~",
            "123:7FF ",
            "-1:7FF",
            "123456789:0",
        ] {
            let e = error(&receiver(&format!("peer = \"any\"\naccept = [\"{bad}\"]")));
            assert!(e.contains("filter `"), "{bad}: {e}");
        }
        let e = error(&receiver("peer = \"any\"\naccept = \"123:7FF\""));
        assert!(e.contains("invalid type"), "{e}");
    }

    #[test]
    fn limits_and_interfaces_name_their_keys() {
        let filters: Vec<String> = (0..65).map(|i| format!("\"{i:X}:7FF\"")).collect();
        let text = receiver(&format!(
            "peer = \"any\"\nbind_iface = \"this-name-is-too-long\"\naccept = [{}]\nmax_frame_rate = 0\nmax_burst = 0\nmax_frames_per_datagram = 13101",
            filters.join(", ")
        ));
        let keys: Vec<String> = match can(&text) {
            Err(e) => e.problems().iter().map(|p| p.key.clone()).collect(),
            Ok(_) => vec![],
        };
        assert_eq!(
            keys,
            [
                "can.receive[0].bind_iface",
                "can.receive[0].accept",
                "can.receive[0].max_frame_rate",
                "can.receive[0].max_burst",
                "can.receive[0].max_frames_per_datagram",
            ]
        );
        let e = error(&receiver("peer = \"any\"\nmax_frames_per_datagram = 70000"));
        assert!(e.contains("max_frames_per_datagram"), "{e}");
    }
}
