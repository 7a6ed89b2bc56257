//! The `[udp]` section: the UDP forwarder's mode and rules.

use std::{collections::HashMap, fmt, net::IpAddr};

use serde::Deserialize;

use super::{Problem, check_rule_name};
use crate::{host::Host, host::netdev};

/// Largest number of UDP forwarding rules one agent holds.
pub const MAX_UDP_RULES: usize = edgeplane_common::udp_forward::MAX_RULES as usize;

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UdpConfig {
    #[serde(default)]
    pub mode: UdpMode,
    /// The userspace engine, for `mode = "userspace"` and for `auto` when eBPF can't run.
    #[serde(default)]
    pub engine: UserspaceEngine,
    #[serde(default)]
    pub forward: Vec<UdpForwardRule>,
}

/// Where the rules run: one of the kernel hooks, or the userspace engine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UdpMode {
    Xdp,
    Tc,
    /// XDP where the driver supports it, tc on veth; the userspace engine when eBPF can't run.
    #[default]
    Auto,
    /// Sockets in the agent (see `engine`): no eBPF needed, at a fraction of the kernel's rate.
    Userspace,
}

impl UdpMode {
    /// The kernel hook selection this mode asks for, if it asks for the kernel at all.
    pub fn attach(self) -> Option<AttachMode> {
        match self {
            Self::Xdp => Some(AttachMode::Xdp),
            Self::Tc => Some(AttachMode::Tc),
            Self::Auto => Some(AttachMode::Auto),
            Self::Userspace => None,
        }
    }
}

impl fmt::Display for UdpMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.attach() {
            Some(a) => a.fmt(f),
            None => f.write_str("userspace"),
        }
    }
}

/// How the userspace forwarder moves datagrams.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
pub enum UserspaceEngine {
    /// tokio tasks on the agent's runtime, batching with recvmmsg/sendmmsg.
    #[default]
    #[serde(rename = "tokio")]
    Tokio,
    /// io_uring on a dedicated thread (tokio-uring): one datagram per operation.
    #[serde(rename = "tokio-uring")]
    TokioUring,
}

impl UserspaceEngine {
    /// The `engine` label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Tokio => "tokio",
            Self::TokioUring => "tokio-uring",
        }
    }
}

/// Where the UDP forwarder attaches on each ingress interface.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
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
        if self.mode == UdpMode::Userspace {
            self.userspace_problems(out);
        }
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

    /// Whether these rules need the kernel path (eBPF) in this mode.
    pub fn wants_kernel(&self) -> bool {
        self.mode != UdpMode::Userspace && !self.forward.is_empty()
    }

    /// What the userspace engine can't do that the kernel path can. It receives on a socket
    /// bound to the rule's port (and address, if matched) on the ingress interface, so it sees
    /// only datagrams addressed to this host, and it sends them on from a socket of its own.
    /// Checked statically for `mode = "userspace"`, and before `auto` falls back to it.
    pub fn userspace_problems(&self, out: &mut Vec<Problem>) {
        for (i, rule) in self.forward.iter().enumerate() {
            let mut problem = |field: &str, message: &str| {
                out.push(Problem {
                    key: format!("udp.forward[{i}].{field}"),
                    message: message.into(),
                })
            };
            if rule.matches.dst_port.is_none() {
                problem(
                    "match.dst_port",
                    "the userspace engine receives on a socket bound to a port: give the port \
                     the datagrams are sent to",
                );
            }
            if rule.matches.dst_ip.is_some_and(|ip| ip.is_multicast()) {
                problem(
                    "match.dst_ip",
                    "the userspace engine receives only unicast datagrams addressed to this host",
                );
            }
            if rule.to.dst_ip.is_none() {
                problem(
                    "to.dst_ip",
                    "the userspace engine receives datagrams addressed to this host, so it must \
                     be told where to send them: give the new destination",
                );
            }
        }
    }

    /// Host checks of the userspace engine: the addresses it binds to are this host's.
    pub fn userspace_host_problems(&self, host: &dyn Host, out: &mut Vec<Problem>) {
        for (i, rule) in self.forward.iter().enumerate() {
            for (field, ip) in [
                ("match.dst_ip", rule.matches.dst_ip),
                ("to.src_ip", rule.to.src_ip),
            ] {
                let Some(ip) = ip else { continue };
                if let Err(e) = host.bind_udp(ip) {
                    out.push(Problem {
                        key: format!("udp.forward[{i}].{field}"),
                        message: format!(
                            "the userspace engine binds to {ip}, which is not an address of this \
                             host ({e}): add it to an interface, or leave it out"
                        ),
                    });
                }
            }
        }
    }

    /// Host checks: every interface exists.
    pub(super) fn host_problems(&self, host: &dyn Host, out: &mut Vec<Problem>) {
        if self.mode == UdpMode::Userspace {
            self.userspace_host_problems(host, out);
        }
        for (i, rule) in self.forward.iter().enumerate() {
            for (field, iface) in [("ingress", &rule.ingress), ("to.iface", &rule.to.iface)] {
                if host.ifindex(iface).is_none() {
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::{Config, ConfigError, UdpMode, UserspaceEngine};

    fn keys(text: &str) -> Vec<String> {
        match Config::parse(text, Path::new("t")) {
            Err(ConfigError::Invalid { problems, .. }) => {
                problems.into_iter().map(|p| p.key).collect()
            }
            other => panic!("expected problems, got {other:?}"),
        }
    }

    const RULES: &str = r#"
        [[udp.forward]]
        name = "no-port"
        ingress = "eth0"
        to = { iface = "eth1", dst_ip = "192.0.2.10" }

        [[udp.forward]]
        name = "no-destination"
        ingress = "eth0"
        match = { dst_port = 5000, dst_ip = "239.1.1.1" }
        to = { iface = "eth1", dst_port = 6000 }
    "#;

    #[test]
    fn userspace_mode_names_what_it_cannot_mirror() {
        let text = format!("[udp]\nmode = \"userspace\"\nengine = \"tokio-uring\"\n{RULES}");
        assert_eq!(
            keys(&text),
            [
                "udp.forward[0].match.dst_port",
                "udp.forward[1].match.dst_ip",
                "udp.forward[1].to.dst_ip",
            ]
        );
        // The kernel path forwards the same rules.
        let c = Config::parse(&format!("[udp]\nmode = \"tc\"\n{RULES}"), Path::new("t")).unwrap();
        assert!(c.udp.wants_kernel());
    }

    #[test]
    fn engines_parse_by_their_label() {
        for engine in [UserspaceEngine::Tokio, UserspaceEngine::TokioUring] {
            let text = format!(
                "[udp]\nmode = \"userspace\"\nengine = \"{}\"\n",
                engine.label()
            );
            let c = Config::parse(&text, Path::new("t")).unwrap();
            assert_eq!((c.udp.mode, c.udp.engine), (UdpMode::Userspace, engine));
            assert!(!c.udp.wants_kernel());
        }
    }
}
