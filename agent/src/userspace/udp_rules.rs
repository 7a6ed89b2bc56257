//! The userspace engine's view of the UDP rules: which sockets to bind, and which rule takes a
//! datagram that arrived on one of them.
//!
//! The kernel path matches every datagram on an interface; userspace receives only what is
//! addressed to a socket. So rules are grouped into listeners, one per ingress interface, bound
//! address and port; within a listener the source fields pick the rule, with the kernel's
//! precedence (a rule matching more fields wins, addresses before ports).

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use crate::config::UdpForwardRule;

/// Ethernet header: counted in `bytes` as the kernel path counts frames as received.
const ETH_HLEN: u64 = 14;
const UDP_HLEN: u64 = 8;

/// Everything a listener needs: its socket's binding and the rules it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerSpec {
    pub ingress: String,
    /// `match.dst_ip` (or the family's unspecified address) and `match.dst_port`.
    pub bind: SocketAddr,
    pub routes: Vec<RouteSpec>,
}

/// One rule as a listener runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    pub rule: String,
    pub src_ip: Option<IpAddr>,
    pub src_port: Option<u16>,
    pub egress: String,
    /// The egress socket's local address (`to.src_ip` / `to.src_port`, else any).
    pub egress_bind: SocketAddr,
    /// Where datagrams go: `to.dst_ip`, and `to.dst_port` or the port they arrived on.
    pub dst: SocketAddr,
}

impl RouteSpec {
    /// Bytes of the IP and UDP headers plus the Ethernet header, as the kernel path counts a
    /// forwarded frame (IP options aside, which userspace does not see).
    pub fn header_bytes(&self) -> u64 {
        let ip = if self.dst.is_ipv4() { 20 } else { 40 };
        ETH_HLEN + ip + UDP_HLEN
    }
}

/// Groups validated userspace rules (every one has `match.dst_port` and `to.dst_ip`: see
/// `UdpConfig::userspace_problems`) into listeners, keyed by ingress interface and binding.
pub fn listeners(rules: &[UdpForwardRule]) -> BTreeMap<(String, SocketAddr), ListenerSpec> {
    let mut out: BTreeMap<(String, SocketAddr), ListenerSpec> = BTreeMap::new();
    for r in rules {
        let (Some(port), Some(dst_ip)) = (r.matches.dst_port, r.to.dst_ip) else {
            continue;
        };
        let any = unspecified(&dst_ip);
        let bind = SocketAddr::new(r.matches.dst_ip.unwrap_or(any), port);
        let key = (r.ingress.clone(), bind);
        out.entry(key)
            .or_insert_with(|| ListenerSpec {
                ingress: r.ingress.clone(),
                bind,
                routes: Vec::new(),
            })
            .routes
            .push(RouteSpec {
                rule: r.name.clone(),
                src_ip: r.matches.src_ip,
                src_port: r.matches.src_port,
                egress: r.to.iface.clone(),
                egress_bind: SocketAddr::new(
                    r.to.src_ip.unwrap_or(any),
                    r.to.src_port.unwrap_or(0),
                ),
                dst: SocketAddr::new(dst_ip, r.to.dst_port.unwrap_or(port)),
            });
    }
    out
}

fn unspecified(like: &IpAddr) -> IpAddr {
    match like {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    }
}

/// Which fields of the source a rule matches: the kernel's "shape" of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Shape {
    ip: bool,
    port: bool,
}

/// Source-based rule lookup for one listener: one hash probe per shape in use, the most
/// specific shape first, as the kernel program probes its rule map.
#[derive(Debug, Default)]
pub struct RuleTable {
    rules: HashMap<(Option<IpAddr>, Option<u16>), usize>,
    /// Shapes in use, most specific first.
    shapes: Vec<Shape>,
}

impl RuleTable {
    /// Indexes `routes`; validation guarantees no two of them have the same source match.
    pub fn new(routes: &[RouteSpec]) -> Self {
        let mut t = Self::default();
        for (i, r) in routes.iter().enumerate() {
            t.rules.insert((r.src_ip, r.src_port), i);
            let shape = Shape {
                ip: r.src_ip.is_some(),
                port: r.src_port.is_some(),
            };
            if !t.shapes.contains(&shape) {
                t.shapes.push(shape);
            }
        }
        // Addresses before ports, more fields before fewer.
        t.shapes.sort_by_key(|s| std::cmp::Reverse((s.ip, s.port)));
        t
    }

    /// The index of the route taking a datagram from `src`.
    pub fn lookup(&self, src: &SocketAddr) -> Option<usize> {
        self.shapes.iter().find_map(|s| {
            let key = (s.ip.then(|| src.ip()), s.port.then(|| src.port()));
            self.rules.get(&key).copied()
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    fn specs(text: &str) -> Vec<ListenerSpec> {
        let c = Config::parse(
            &format!("[udp]\nmode = \"userspace\"\n{text}"),
            Path::new("t"),
        )
        .unwrap();
        listeners(&c.udp.forward).into_values().collect()
    }

    #[test]
    fn rules_share_a_listener_per_interface_address_and_port() {
        let l = specs(
            r#"[[udp.forward]]
               name = "a"
               ingress = "eth0"
               match = { dst_port = 5000 }
               to = { iface = "eth1", dst_ip = "192.0.2.10" }
               [[udp.forward]]
               name = "b"
               ingress = "eth0"
               match = { dst_port = 5000, src_ip = "198.51.100.1" }
               to = { iface = "eth1", dst_ip = "192.0.2.11", dst_port = 7000, src_port = 4000 }
               [[udp.forward]]
               name = "c"
               ingress = "eth0"
               match = { dst_port = 5000, dst_ip = "198.51.100.9" }
               to = { iface = "eth1", dst_ip = "192.0.2.12" }"#,
        );
        assert_eq!(l.len(), 2);
        let any = &l.iter().find(|l| l.bind.ip().is_unspecified()).unwrap();
        assert_eq!(any.bind, "0.0.0.0:5000".parse().unwrap());
        assert_eq!(any.routes.len(), 2);
        // Without to.dst_port the datagram keeps the port it arrived on.
        assert_eq!(any.routes[0].dst, "192.0.2.10:5000".parse().unwrap());
        assert_eq!(any.routes[1].dst, "192.0.2.11:7000".parse().unwrap());
        assert_eq!(any.routes[1].egress_bind, "0.0.0.0:4000".parse().unwrap());
        assert_eq!(any.routes[0].header_bytes(), 14 + 20 + 8);
        let c = l.iter().find(|l| !l.bind.ip().is_unspecified()).unwrap();
        assert_eq!(c.bind, "198.51.100.9:5000".parse().unwrap());
    }

    #[test]
    fn lookup_prefers_the_most_specific_source_match() {
        let route = |ip: Option<&str>, port: Option<u16>| RouteSpec {
            rule: String::new(),
            src_ip: ip.map(|i| i.parse().unwrap()),
            src_port: port,
            egress: "eth1".into(),
            egress_bind: "0.0.0.0:0".parse().unwrap(),
            dst: "192.0.2.1:1".parse().unwrap(),
        };
        let routes = [
            route(None, None),
            route(None, Some(4000)),
            route(Some("198.51.100.1"), None),
            route(Some("198.51.100.1"), Some(4000)),
        ];
        let t = RuleTable::new(&routes);
        let from = |s: &str| t.lookup(&s.parse().unwrap());
        assert_eq!(from("198.51.100.1:4000"), Some(3));
        assert_eq!(from("198.51.100.1:4001"), Some(2));
        assert_eq!(from("198.51.100.2:4000"), Some(1));
        assert_eq!(from("198.51.100.2:4001"), Some(0));
        let only_port = RuleTable::new(&routes[1..2]);
        assert_eq!(
            only_port.lookup(&"198.51.100.2:4001".parse().unwrap()),
            None
        );
    }
}
