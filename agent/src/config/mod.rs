//! The agent's TOML configuration: schema, static validation, and host checks.
//!
//! Parsing rejects unknown keys; validation reports every problem with the key that holds it
//! (`udp.forward[1].match.dst_port`), so nothing is attached from a config that is wrong.

mod can;
mod can_receive;
mod export;
mod latency;
mod registry;
mod udp;

use std::{
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

pub use self::{can::*, can_receive::*, export::*, latency::*, registry::*, udp::*};
use crate::host::{Host, ThisHost};

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub udp: UdpConfig,
    #[serde(default)]
    pub can: CanConfig,
    #[serde(default)]
    pub agent: AgentConfig,
    #[serde(default)]
    pub latency: LatencyCapture,
    /// Fleet registration in etcd; absent: the agent does not register.
    pub registry: Option<RegistryConfig>,
    /// Pushing telemetry (remote write); read at start.
    #[serde(default)]
    pub export: ExportConfig,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// bpffs directory where the data plane is pinned, so it outlives the agent.
    #[serde(default = "AgentConfig::default_bpffs")]
    pub bpffs: PathBuf,
    /// Fleet registration: the last element of this agent's key, unique per vehicle.
    pub service_name: Option<String>,
    /// Fleet registration: ISO 3779 vehicle identification number.
    pub vin: Option<String>,
    /// Workload identity, `spiffe://trust-domain/path`; with mTLS, the certificate's URI SAN.
    pub spiffe_id: Option<String>,
}

impl AgentConfig {
    fn default_bpffs() -> PathBuf {
        PathBuf::from(crate::kernel::pins::DEFAULT_DIR)
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            bpffs: Self::default_bpffs(),
            service_name: None,
            vin: None,
            spiffe_id: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of the metrics and health endpoints.
    #[serde(default = "HttpConfig::default_listen")]
    pub listen: SocketAddr,
    /// A request header must be complete this long (ms) after the connection opened, or after
    /// its first byte on a kept-alive connection.
    #[serde(default = "HttpConfig::default_header_timeout_ms")]
    pub header_timeout_ms: u64,
    /// A kept-alive connection with no request for this long (ms) is closed.
    #[serde(default = "HttpConfig::default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// A connection whose client takes none of the response for this long (ms) is closed.
    #[serde(default = "HttpConfig::default_write_timeout_ms")]
    pub write_timeout_ms: u64,
    /// Open connections at most; at the cap, the one waiting longest for a request goes.
    #[serde(default = "HttpConfig::default_max_connections")]
    pub max_connections: usize,
    /// `GET /events` streams at most; more are answered 503.
    #[serde(default = "HttpConfig::default_max_event_streams")]
    pub max_event_streams: usize,
}

/// Timeouts shorter than this cut off real clients on a slow link; longer ones than the
/// maximum let a dead client hold its connection for hours.
const MIN_HTTP_TIMEOUT_MS: u64 = 100;
const MAX_HTTP_TIMEOUT_MS: u64 = 3_600_000;
/// Each connection costs a file descriptor and a few KiB; far beyond any real use of an
/// agent's endpoints.
pub const MAX_HTTP_CONNECTIONS: usize = 65_536;

impl HttpConfig {
    fn default_listen() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 9464))
    }
    fn default_header_timeout_ms() -> u64 {
        10_000
    }
    fn default_idle_timeout_ms() -> u64 {
        60_000
    }
    fn default_write_timeout_ms() -> u64 {
        30_000
    }
    fn default_max_connections() -> usize {
        256
    }
    fn default_max_event_streams() -> usize {
        16
    }

    pub fn header_timeout(&self) -> Duration {
        Duration::from_millis(self.header_timeout_ms)
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }
    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }

    fn problems(&self, out: &mut Vec<Problem>) {
        for (key, value) in [
            ("http.header_timeout_ms", self.header_timeout_ms),
            ("http.idle_timeout_ms", self.idle_timeout_ms),
            ("http.write_timeout_ms", self.write_timeout_ms),
        ] {
            if !(MIN_HTTP_TIMEOUT_MS..=MAX_HTTP_TIMEOUT_MS).contains(&value) {
                out.push(Problem {
                    key: key.into(),
                    message: format!(
                        "{value} ms is out of range: {MIN_HTTP_TIMEOUT_MS} to {MAX_HTTP_TIMEOUT_MS} ms"
                    ),
                });
            }
        }
        if !(2..=MAX_HTTP_CONNECTIONS).contains(&self.max_connections) {
            out.push(Problem {
                key: "http.max_connections".into(),
                message: format!(
                    "{} is out of range: 2 to {MAX_HTTP_CONNECTIONS}",
                    self.max_connections
                ),
            });
        } else if self.max_event_streams >= self.max_connections {
            // Streams last and are never evicted: they must leave a connection for a scraper.
            out.push(Problem {
                key: "http.max_event_streams".into(),
                message: format!(
                    "{} must be below http.max_connections ({}), so that streams leave room for /metrics",
                    self.max_event_streams, self.max_connections
                ),
            });
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: Self::default_listen(),
            header_timeout_ms: Self::default_header_timeout_ms(),
            idle_timeout_ms: Self::default_idle_timeout_ms(),
            write_timeout_ms: Self::default_write_timeout_ms(),
            max_connections: Self::default_max_connections(),
            max_event_streams: Self::default_max_event_streams(),
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
        Self::parse_with(text, path, &Overrides::default())
    }

    /// [`Self::parse`] with the command line's overrides applied before validation, so that
    /// a value required by the file may come from the command line (at start and on every
    /// reload alike).
    pub fn parse_with(text: &str, path: &Path, overrides: &Overrides) -> Result<Self, ConfigError> {
        let mut config: Self = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_owned(),
            source: Box::new(e),
        })?;
        config.override_with(overrides);
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

    /// Checks what only this host can tell: that interfaces exist and are of the right kind.
    pub fn check_host(&self, path: &Path) -> Result<(), ConfigError> {
        self.check_host_on(path, &ThisHost)
    }

    /// [`Self::check_host`] with what `host` tells.
    pub fn check_host_on(&self, path: &Path, host: &dyn Host) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        self.udp.host_problems(host, &mut problems);
        self.can.host_problems(host, &mut problems);
        self.latency.host_problems(host, &mut problems);
        self.identity_host_problems(host, &mut problems);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid {
                path: path.to_owned(),
                problems,
            })
        }
    }

    /// Every interface the config names (UDP ingress and egress, CAN route, watch and receive
    /// interfaces), sorted, each once: the interfaces the host metrics cover.
    pub fn interfaces(&self) -> Vec<String> {
        let udp = self
            .udp
            .forward
            .iter()
            .flat_map(|r| [&r.ingress, &r.to.iface]);
        let can_routes = self.can.route.iter().flat_map(|r| {
            std::iter::once(&r.ingress).chain(r.to.as_ref().and_then(|t| t.iface.as_ref()))
        });
        let watches = self.can.watch.iter().map(|w| &w.iface);
        let receivers =
            (self.can.receive.iter()).flat_map(|r| std::iter::once(&r.iface).chain(&r.bind_iface));
        let names: std::collections::BTreeSet<&String> = udp
            .chain(can_routes)
            .chain(watches)
            .chain(receivers)
            .collect();
        names.into_iter().cloned().collect()
    }

    fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        self.http.problems(&mut out);
        self.udp.problems(&mut out);
        self.can.problems(&mut out);
        self.latency.problems(&mut out);
        if !self.agent.bpffs.is_absolute() {
            out.push(Problem {
                key: "agent.bpffs".into(),
                message: format!("`{}` must be an absolute path", self.agent.bpffs.display()),
            });
        }
        self.identity_problems(&mut out);
        if let Some(rw) = &self.export.remote_write {
            rw.problems(&mut out);
        }
        out
    }
}

/// Rule names become metric label values: keep them short and plain.
pub(crate) fn check_rule_name(name: &str) -> Result<(), String> {
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
        assert_eq!(c.udp.mode, UdpMode::Auto);
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
    fn interfaces_are_every_name_the_config_uses_once() {
        let text = format!(
            r#"{ONE_RULE}
            [[udp.forward]]
            name = "back"
            ingress = "eth1"
            to = {{ iface = "eth0" }}

            [[can.route]]
            name = "r"
            ingress = "can1"
            filter = "100:7FF"
            to = {{ iface = "can0" }}

            [[can.route]]
            name = "t"
            ingress = "can1"
            filter = "200:7FF"
            to = {{ udp = "192.0.2.1:20000" }}

            [[can.watch]]
            iface = "can2"
            id = 0x123
            period_ms = 10

            [[can.receive]]
            name = "rx"
            listen = "0.0.0.0:20000"
            iface = "can3"
            peer = "192.0.2.1"
            "#
        );
        assert_eq!(
            parse(&text).unwrap().interfaces(),
            ["can0", "can1", "can2", "can3", "eth0", "eth1"]
        );
        assert!(parse("").unwrap().interfaces().is_empty());
    }

    #[test]
    fn http_limits_default_and_are_checked_by_key() {
        let c = parse("").unwrap();
        assert_eq!(c.http.header_timeout(), Duration::from_secs(10));
        assert_eq!(c.http.idle_timeout(), Duration::from_secs(60));
        assert_eq!(c.http.write_timeout(), Duration::from_secs(30));
        assert_eq!(
            (c.http.max_connections, c.http.max_event_streams),
            (256, 16)
        );
        let c =
            parse("[http]\nheader_timeout_ms = 2500\nmax_connections = 4\nmax_event_streams = 0\n")
                .unwrap();
        assert_eq!(c.http.header_timeout(), Duration::from_millis(2500));
        assert_eq!(c.http.max_event_streams, 0);

        let p = problems(
            "[http]\nheader_timeout_ms = 0\nidle_timeout_ms = 3600001\nwrite_timeout_ms = 99\nmax_connections = 1\n",
        );
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "http.header_timeout_ms",
                "http.idle_timeout_ms",
                "http.write_timeout_ms",
                "http.max_connections"
            ],
            "{p:?}"
        );
        assert!(
            p[0].message.contains("100 to 3600000 ms"),
            "{}",
            p[0].message
        );
        let p = problems("[http]\nmax_connections = 8\nmax_event_streams = 8\n");
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].key, "http.max_event_streams");
        assert!(
            p[0].message.contains("below http.max_connections (8)"),
            "{}",
            p[0].message
        );
        let err = parse("[http]\nmax_connections = -1\n").unwrap_err();
        assert!(err.to_string().contains("max_connections"), "{err}");
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
