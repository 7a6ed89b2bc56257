//! The agent's TOML configuration: schema, static validation, and host checks.
//!
//! Parsing rejects unknown keys; validation reports every problem with the key that holds it
//! (`udp.forward[1].match.dst_port`), so nothing is attached from a config that is wrong.

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::netdev;

/// Largest number of UDP forwarding rules one agent holds.
pub const MAX_UDP_RULES: usize = edgeplane_common::udp_forward::MAX_RULES as usize;

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub udp: UdpConfig,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of the metrics and health endpoints.
    #[serde(default = "HttpConfig::default_listen")]
    pub listen: SocketAddr,
}

impl HttpConfig {
    fn default_listen() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 9464))
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: Self::default_listen(),
        }
    }
}

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

/// One thing wrong in a config, with the key that holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Syntax {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{path}: {} problem(s):\n{}", .problems.len(), ProblemList(.problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

struct ProblemList<'a>(&'a [Problem]);

impl fmt::Display for ProblemList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "  - {p}")?;
        }
        Ok(())
    }
}

impl ConfigError {
    /// The problems found by validation (empty for read and syntax errors).
    pub fn problems(&self) -> &[Problem] {
        match self {
            Self::Invalid { problems, .. } => problems,
            _ => &[],
        }
    }
}

impl Config {
    /// Reads, parses and statically validates a config file (no host checks).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and statically validates config text; `path` only names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_owned(),
            source: Box::new(e),
        })?;
        let problems = config.problems();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                path: path.to_owned(),
                problems,
            })
        }
    }

    /// Checks what only this host can tell: that every interface exists.
    pub fn check_host(&self, path: &Path) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        for (i, rule) in self.udp.forward.iter().enumerate() {
            for (field, iface) in [("ingress", &rule.ingress), ("to.iface", &rule.to.iface)] {
                if netdev::index(iface).is_none() {
                    problems.push(Problem {
                        key: format!("udp.forward[{i}].{field}"),
                        message: format!(
                            "interface `{iface}` does not exist on this host (see `ip link`)"
                        ),
                    });
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid {
                path: path.to_owned(),
                problems,
            })
        }
    }

    fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let rules = &self.udp.forward;
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

            if let Err(why) = check_name(&rule.name) {
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
        out
    }
}

/// Rule names become metric label values: keep them short and plain.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err(format!("rule name `{name}` must be 1 to 64 characters"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(format!(
            "rule name `{name}` may contain only ASCII letters, digits, `-`, `_` and `.`"
        ));
    }
    Ok(())
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
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    fn problems(text: &str) -> Vec<Problem> {
        match parse(text) {
            Err(ConfigError::Invalid { problems, .. }) => problems,
            other => panic!("expected validation problems, got {other:?}"),
        }
    }

    const ONE_RULE: &str = r#"
        [http]
        listen = "127.0.0.1:9464"

        [[udp.forward]]
        name = "lidar-front"
        ingress = "eth0"
        match = { dst_port = 5000 }
        to = { iface = "eth1", dst_ip = "192.0.2.10", dst_port = 6000 }
    "#;

    #[test]
    fn parses_the_documented_shape() {
        let c = parse(ONE_RULE).unwrap();
        assert_eq!(c.http.listen, "127.0.0.1:9464".parse().unwrap());
        assert_eq!(c.udp.mode, AttachMode::Auto);
        let r = &c.udp.forward[0];
        assert_eq!(r.name, "lidar-front");
        assert_eq!(r.matches.dst_port, Some(5000));
        assert_eq!(r.to.dst_ip, Some("192.0.2.10".parse().unwrap()));
        assert_eq!(r.families(), vec![Family::V4]);
    }

    #[test]
    fn empty_config_is_valid_with_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.http.listen, "127.0.0.1:9464".parse().unwrap());
        assert!(c.udp.forward.is_empty());
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        let err = parse(&ONE_RULE.replace("dst_port = 5000", "dst_prot = 5000")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("unknown field `dst_prot`"), "{msg}");
        assert!(msg.contains("line 8"), "{msg}");
        let err = parse("[htp]\nlisten = \"127.0.0.1:1\"\n").unwrap_err();
        assert!(err.to_string().contains("unknown field `htp`"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let err = parse(&ONE_RULE.replace("192.0.2.10", "192.0.2.300")).unwrap_err();
        assert!(err.to_string().contains("invalid IP address"), "{err}");
        let err = parse(&ONE_RULE.replace("6000", "70000")).unwrap_err();
        assert!(err.to_string().contains("line 9"), "{err}");
        let err =
            parse(&ONE_RULE.replace("[http]", "[udp]\nmode = \"bogus\"\n[http]")).unwrap_err();
        assert!(err.to_string().contains("unknown variant `bogus`"), "{err}");
    }

    #[test]
    fn duplicate_names_are_rejected() {
        let twice = format!(
            "{ONE_RULE}{}",
            &ONE_RULE[ONE_RULE.find("[[udp").unwrap()..].replace("5000", "5001")
        );
        let p = problems(&twice);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].key, "udp.forward[1].name");
        assert!(p[0].message.contains("duplicate rule name `lidar-front`"));
    }

    #[test]
    fn rules_matching_the_same_packets_are_rejected() {
        let text = r#"
            [[udp.forward]]
            name = "a"
            ingress = "eth0"
            match = { dst_port = 5000 }
            to = { iface = "eth1", dst_port = 6000 }

            [[udp.forward]]
            name = "b"
            ingress = "eth0"
            match = { dst_port = 5000 }
            to = { iface = "eth1", dst_ip = "2001:db8::1" }
        "#;
        let p = problems(text);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].key, "udp.forward[1].match");
        assert!(
            p[0].message.contains("same IPv6 datagrams"),
            "{}",
            p[0].message
        );
        // The same match on another interface is a different rule.
        assert!(parse(&text.replacen("ingress = \"eth0\"", "ingress = \"eth2\"", 1)).is_ok());
    }

    #[test]
    fn impossible_rules_are_rejected() {
        let text = r#"
            [[udp.forward]]
            name = "mixed"
            ingress = "eth0"
            match = { dst_ip = "192.0.2.1", dst_port = 0 }
            to = { iface = "eth1", dst_ip = "2001:db8::1", src_ip = "255.255.255.255" }

            [[udp.forward]]
            name = "bad name!"
            ingress = ""
            to = { iface = "this-name-is-too-long", dst_ip = "0.0.0.0" }
        "#;
        let keys: Vec<String> = problems(text).into_iter().map(|p| p.key).collect();
        assert_eq!(
            keys,
            [
                "udp.forward[0].match.dst_port",
                "udp.forward[0].to.dst_ip",
                "udp.forward[0].to.src_ip",
                "udp.forward[1].name",
                "udp.forward[1].ingress",
                "udp.forward[1].to.iface",
                "udp.forward[1].to.dst_ip",
            ]
        );
    }

    #[test]
    fn families_follow_the_addresses() {
        let c = parse(&ONE_RULE.replace("dst_ip = \"192.0.2.10\", ", "")).unwrap();
        assert_eq!(c.udp.forward[0].families(), vec![Family::V4, Family::V6]);
    }

    #[test]
    fn too_many_rules_are_rejected() {
        let mut text = String::new();
        for i in 0..=MAX_UDP_RULES {
            text += &format!(
                "[[udp.forward]]\nname = \"r{i}\"\ningress = \"eth0\"\nmatch = {{ dst_port = {} }}\nto = {{ iface = \"eth1\" }}\n",
                1 + i
            );
        }
        let p = problems(&text);
        assert_eq!(p[0].key, "udp.forward");
    }
}
