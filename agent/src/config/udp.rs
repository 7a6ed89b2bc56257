//! The `[udp]` section: the UDP forwarder's mode and rules.

use std::{collections::HashMap, fmt, net::IpAddr};

use serde::Deserialize;

use super::{Problem, check_rule_name};
use crate::netdev;

/// Largest number of UDP forwarding rules one agent holds.
pub const MAX_UDP_RULES: usize = edgeplane_common::udp_forward::MAX_RULES as usize;

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UdpConfig {
    #[serde(default)]
    pub mode: AttachMode,
    #[serde(default)]
    pub forward: Vec<UdpForwardRule>,
}

/// Where the UDP forwarder attaches on each ingress interface.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// XDP in driver mode: fastest; needs a driver with XDP and complete checksums.
    Xdp,
    /// tc clsact ingress: works on every interface, including veth.
    Tc,
    /// XDP where the driver supports it, tc on virtual interfaces (veth) or when XDP fails.
    #[default]
    Auto,
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Xdp => "xdp",
            Self::Tc => "tc",
            Self::Auto => "auto",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UdpForwardRule {
    /// Unique name; the `rule` label of the metrics.
    pub name: String,
    /// Interface the datagrams arrive on.
    pub ingress: String,
    /// Fields to match; absent fields match anything. An empty match takes all UDP on `ingress`.
    #[serde(rename = "match", default)]
    pub matches: UdpMatch,
    /// Where the datagrams go and how they are rewritten.
    pub to: UdpTarget,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UdpMatch {
    pub dst_port: Option<u16>,
    pub src_port: Option<u16>,
    pub dst_ip: Option<IpAddr>,
    pub src_ip: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UdpTarget {
    /// Interface the datagrams leave by; next-hop MACs come from its routes and neighbours.
    pub iface: String,
    pub dst_ip: Option<IpAddr>,
    pub dst_port: Option<u16>,
    pub src_ip: Option<IpAddr>,
    pub src_port: Option<u16>,
}

/// IP version a rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn of(ip: &IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Self::V4,
            IpAddr::V6(_) => Self::V6,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        })
    }
}

impl UdpForwardRule {
    /// The families this rule's addresses allow: one if any address is given, else both.
    pub fn families(&self) -> Vec<Family> {
        let m = &self.matches;
        let t = &self.to;
        let addrs = [m.dst_ip, m.src_ip, t.dst_ip, t.src_ip];
        match addrs.iter().flatten().next() {
            Some(ip) => vec![Family::of(ip)],
            None => vec![Family::V4, Family::V6],
        }
    }
}

impl UdpConfig {
    /// Static checks of the `[udp]` section.
    pub(super) fn problems(&self, out: &mut Vec<Problem>) {
        let rules = &self.forward;
        if rules.len() > MAX_UDP_RULES {
            out.push(Problem {
                key: "udp.forward".into(),
                message: format!(
                    "{} rules; at most {MAX_UDP_RULES} are supported",
                    rules.len()
                ),
            });
        }
        let mut names: HashMap<&str, usize> = HashMap::new();
        // (ingress, family, match) -> first rule index, to find rules that match the same packets.
        let mut matches: HashMap<(&str, Family, UdpMatch), usize> = HashMap::new();
        for (i, rule) in rules.iter().enumerate() {
            let key = |field: &str| format!("udp.forward[{i}].{field}");
            let mut problem = |field: &str, message: String| {
                out.push(Problem {
                    key: key(field),
                    message,
                })
            };

            if let Err(why) = check_rule_name(&rule.name) {
                problem("name", why);
            } else if let Some(first) = names.insert(&rule.name, i) {
                problem(
                    "name",
                    format!(
                        "duplicate rule name `{}` (also udp.forward[{first}])",
                        rule.name
                    ),
                );
            }
            for (field, iface) in [("ingress", &rule.ingress), ("to.iface", &rule.to.iface)] {
                if let Err(why) = netdev::check_name(iface) {
                    problem(field, why);
                }
            }
            let ports = [
                ("match.dst_port", rule.matches.dst_port),
                ("match.src_port", rule.matches.src_port),
                ("to.dst_port", rule.to.dst_port),
                ("to.src_port", rule.to.src_port),
            ];
            for (field, port) in ports {
                if port == Some(0) {
                    problem(field, "port 0 is not a valid UDP port".into());
                }
            }
            let addrs = [
                ("match.dst_ip", rule.matches.dst_ip),
                ("match.src_ip", rule.matches.src_ip),
                ("to.dst_ip", rule.to.dst_ip),
                ("to.src_ip", rule.to.src_ip),
            ];
            let mut family: Option<(&str, Family)> = None;
            for (field, ip) in addrs {
                let Some(ip) = ip else { continue };
                if let Some(why) = unusable_address(&ip, field.starts_with("to.")) {
                    problem(field, format!("{ip} {why}"));
                }
                match family {
                    None => family = Some((field, Family::of(&ip))),
                    Some((first, f)) if f != Family::of(&ip) => problem(
                        field,
                        format!(
                            "{ip} is {} but {first} is {f}: a rule cannot translate between IPv4 and IPv6",
                            Family::of(&ip)
                        ),
                    ),
                    Some(_) => {}
                }
            }
            for f in rule.families() {
                if let Some(first) = matches.insert((&rule.ingress, f, rule.matches.clone()), i) {
                    problem(
                        "match",
                        format!(
                            "matches the same {f} datagrams on `{}` as `{}` (udp.forward[{first}]); make one match more specific",
                            rule.ingress, rules[first].name
                        ),
                    );
                    break;
                }
            }
        }
    }

    /// Host checks: every interface exists.
    pub(super) fn host_problems(&self, out: &mut Vec<Problem>) {
        for (i, rule) in self.forward.iter().enumerate() {
            for (field, iface) in [("ingress", &rule.ingress), ("to.iface", &rule.to.iface)] {
                if netdev::index(iface).is_none() {
                    out.push(Problem {
                        key: format!("udp.forward[{i}].{field}"),
                        message: format!(
                            "interface `{iface}` does not exist on this host (see `ip link`)"
                        ),
                    });
                }
            }
        }
    }
}

/// Why an address can't appear in a rule, if it can't.
fn unusable_address(ip: &IpAddr, rewrite: bool) -> Option<&'static str> {
    if ip.is_unspecified() {
        return Some("is the unspecified address");
    }
    if ip.is_multicast() && rewrite {
        return Some("is multicast: the forwarder sends to one next hop");
    }
    if let IpAddr::V4(v4) = ip
        && v4.is_broadcast()
    {
        return Some("is the broadcast address");
    }
    None
}
