//! Fleet registration in etcd: `[registry]` (where the agent registers) and the identity in
//! `[agent]` (service_name, vin, spiffe_id). Both are read at start; a reload or a pushed rule
//! set does not change them.

use std::path::PathBuf;

use serde::Deserialize;

use super::{Config, ConfigError, Problem};
use crate::host::Host;

/// Default lease TTL in seconds: the record disappears this long after the agent stops
/// renewing it.
pub const DEFAULT_LEASE_TTL: u64 = 10;
/// etcd grants no lease shorter than about 1.5 election timeouts (2 s with its defaults).
const MIN_LEASE_TTL: u64 = 2;
const MAX_LEASE_TTL: u64 = 3600;
/// A pushed rule set larger than this is refused: a config with hundreds of rules is far
/// smaller, and etcd itself takes values up to 1.5 MiB.
pub const DEFAULT_RULES_MAX_BYTES: u64 = 256 * 1024;
const MAX_RULES_MAX_BYTES: u64 = 1536 * 1024;
pub const DEFAULT_RULES_PER_MINUTE: u32 = 6;
pub const DEFAULT_RULES_BURST: u32 = 3;
/// Seconds for TCP connect plus TLS handshake with an etcd endpoint.
pub const DEFAULT_HANDSHAKE_TIMEOUT: u64 = 5;
const MAX_HANDSHAKE_TIMEOUT: u64 = 60;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// etcd client URLs, `https://host:port` (or `http://` without TLS), tried in order.
    pub endpoints: Vec<String>,
    /// Seconds.
    #[serde(default = "RegistryConfig::default_lease_ttl")]
    pub lease_ttl: u64,
    #[serde(default = "RegistryConfig::default_prefix")]
    pub prefix: String,
    /// CA certificate (PEM) that signed etcd's server certificate.
    pub ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Apply the rule sets pushed to `<prefix>/vehicles/<vin>/rules`.
    #[serde(default)]
    pub watch_rules: bool,
    /// Take pushed rule sets over plain-text `http://` endpoints, where anyone on the path can
    /// change them.
    #[serde(default)]
    pub allow_insecure_rules: bool,
    /// Pushed rule sets larger than this (bytes) are refused.
    #[serde(default = "RegistryConfig::default_rules_max_bytes")]
    pub rules_max_bytes: u64,
    /// Pushes taken per minute, sustained, after a burst of `rules_burst`; more are refused.
    #[serde(default = "RegistryConfig::default_rules_per_minute")]
    pub rules_per_minute: u32,
    #[serde(default = "RegistryConfig::default_rules_burst")]
    pub rules_burst: u32,
    /// The DNS name etcd's certificate must carry (default: each endpoint's host).
    pub server_name: Option<String>,
    /// The SPIFFE ID (URI SAN) etcd's certificate must carry, instead of a name.
    pub server_spiffe_id: Option<String>,
    /// Seconds allowed for TCP connect plus TLS handshake with an endpoint.
    #[serde(default = "RegistryConfig::default_handshake_timeout")]
    pub handshake_timeout: u64,
}

impl RegistryConfig {
    fn default_lease_ttl() -> u64 {
        DEFAULT_LEASE_TTL
    }

    pub fn default_prefix() -> String {
        "/edgeplane/v1".into()
    }

    fn default_rules_max_bytes() -> u64 {
        DEFAULT_RULES_MAX_BYTES
    }

    fn default_rules_per_minute() -> u32 {
        DEFAULT_RULES_PER_MINUTE
    }

    fn default_rules_burst() -> u32 {
        DEFAULT_RULES_BURST
    }

    fn default_handshake_timeout() -> u64 {
        DEFAULT_HANDSHAKE_TIMEOUT
    }

    fn with_endpoints(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            lease_ttl: DEFAULT_LEASE_TTL,
            prefix: Self::default_prefix(),
            ca: None,
            cert: None,
            key: None,
            watch_rules: false,
            allow_insecure_rules: false,
            rules_max_bytes: DEFAULT_RULES_MAX_BYTES,
            rules_per_minute: DEFAULT_RULES_PER_MINUTE,
            rules_burst: DEFAULT_RULES_BURST,
            server_name: None,
            server_spiffe_id: None,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }

    /// `<prefix>/vehicles/<vin>/agents/<service_name>`: this agent's record.
    pub fn agent_key(&self, vin: &str, service_name: &str) -> String {
        format!("{}/agents/{service_name}", self.vehicle_prefix(vin))
    }

    /// `<prefix>/vehicles/<vin>/rules`: the rule set pushed to this vehicle.
    pub fn rules_key(&self, vin: &str) -> String {
        format!("{}/rules", self.vehicle_prefix(vin))
    }

    fn vehicle_prefix(&self, vin: &str) -> String {
        format!("{}/vehicles/{vin}", self.prefix)
    }
}

/// `edgeplane run` flags that override `[agent]` and `[registry]`.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub service_name: Option<String>,
    pub vin: Option<String>,
    pub spiffe_id: Option<String>,
    /// Replaces `registry.endpoints`; enables registration when the file has no `[registry]`.
    pub etcd_endpoints: Option<Vec<String>>,
}

impl Config {
    /// Applies command-line overrides and validates the result again, so a bad flag value is
    /// reported under the key it replaces.
    pub fn apply_overrides(
        &mut self,
        o: &Overrides,
        origin: &std::path::Path,
    ) -> Result<(), ConfigError> {
        self.override_with(o);
        let problems = self.problems();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid {
                path: origin.to_owned(),
                problems,
            })
        }
    }

    /// Replaces what the overrides give, without validating.
    pub(super) fn override_with(&mut self, o: &Overrides) {
        let agent = &mut self.agent;
        for (field, value) in [
            (&mut agent.service_name, &o.service_name),
            (&mut agent.vin, &o.vin),
            (&mut agent.spiffe_id, &o.spiffe_id),
        ] {
            if value.is_some() {
                field.clone_from(value);
            }
        }
        if let Some(endpoints) = &o.etcd_endpoints {
            match &mut self.registry {
                Some(r) => r.endpoints.clone_from(endpoints),
                None => self.registry = Some(RegistryConfig::with_endpoints(endpoints.clone())),
            }
        }
    }

    pub(super) fn identity_problems(&self, out: &mut Vec<Problem>) {
        let problem = |key: &str, message: String| Problem {
            key: key.into(),
            message,
        };
        let a = &self.agent;
        if let Some(name) = &a.service_name
            && let Err(e) = check_service_name(name)
        {
            out.push(problem("agent.service_name", e));
        }
        if let Some(vin) = &a.vin
            && let Err(e) = check_vin(vin)
        {
            out.push(problem("agent.vin", e));
        }
        if let Some(id) = &a.spiffe_id
            && let Err(e) = check_spiffe_id(id)
        {
            out.push(problem("agent.spiffe_id", e));
        }
        let Some(r) = &self.registry else { return };
        if a.service_name.is_none() {
            out.push(problem(
                "agent.service_name",
                "required with [registry]: it names this agent's key".into(),
            ));
        }
        if a.vin.is_none() {
            out.push(problem(
                "agent.vin",
                "required with [registry]: it names this vehicle's keys".into(),
            ));
        }
        if r.endpoints.is_empty() {
            out.push(problem(
                "registry.endpoints",
                "give at least one etcd client URL, e.g. \"https://127.0.0.1:2379\"".into(),
            ));
        }
        let tls = r.ca.is_some() || r.cert.is_some();
        for (i, e) in r.endpoints.iter().enumerate() {
            if let Err(msg) = check_endpoint(e, tls) {
                out.push(problem(&format!("registry.endpoints[{i}]"), msg));
            }
        }
        if !(MIN_LEASE_TTL..=MAX_LEASE_TTL).contains(&r.lease_ttl) {
            out.push(problem(
                "registry.lease_ttl",
                format!(
                    "{} s is out of range: give {MIN_LEASE_TTL} to {MAX_LEASE_TTL} seconds",
                    r.lease_ttl
                ),
            ));
        }
        if !r.prefix.starts_with('/') || r.prefix.ends_with('/') || r.prefix.contains("//") {
            out.push(problem(
                "registry.prefix",
                format!(
                    "`{}` must start with `/` and have no empty or trailing element, e.g. \"/edgeplane/v1\"",
                    r.prefix
                ),
            ));
        }
        match (&r.cert, &r.key) {
            (Some(_), None) => out.push(problem(
                "registry.key",
                "required with registry.cert (the client certificate's private key)".into(),
            )),
            (None, Some(_)) => out.push(problem(
                "registry.cert",
                "required with registry.key (the client certificate)".into(),
            )),
            _ => {}
        }
        r.push_problems(tls, out);
        if r.cert.is_some() && a.spiffe_id.is_none() {
            out.push(problem(
                "agent.spiffe_id",
                "required with registry.cert: the certificate's URI SAN must be this ID".into(),
            ));
        }
    }

    pub(super) fn identity_host_problems(&self, host: &dyn Host, out: &mut Vec<Problem>) {
        let Some(r) = &self.registry else { return };
        for (key, path) in [
            ("registry.ca", &r.ca),
            ("registry.cert", &r.cert),
            ("registry.key", &r.key),
        ] {
            if let Some(path) = path
                && let Err(e) = host.file_exists(path)
            {
                out.push(Problem {
                    key: key.into(),
                    message: format!("cannot read {}: {e}", path.display()),
                });
            }
        }
    }
}

impl RegistryConfig {
    /// Pushed rule sets and the server's identity.
    fn push_problems(&self, tls: bool, out: &mut Vec<Problem>) {
        let mut problem = |key: &str, message: String| {
            out.push(Problem {
                key: format!("registry.{key}"),
                message,
            })
        };
        if self.watch_rules && !tls && !self.allow_insecure_rules {
            problem(
                "watch_rules",
                "pushed rule sets over plain http:// can be changed by anyone on the path: use \
                 https:// endpoints (set registry.ca), or set registry.allow_insecure_rules = true \
                 on a network you trust"
                    .into(),
            );
        }
        if !(1..=MAX_RULES_MAX_BYTES).contains(&self.rules_max_bytes) {
            problem(
                "rules_max_bytes",
                format!(
                    "{} is out of range: give 1 to {MAX_RULES_MAX_BYTES} bytes (etcd's own limit)",
                    self.rules_max_bytes
                ),
            );
        }
        if self.rules_per_minute == 0 || self.rules_burst == 0 {
            problem(
                "rules_per_minute",
                "rules_per_minute and rules_burst must be at least 1 (to take no pushes, set \
                 watch_rules = false)"
                    .into(),
            );
        }
        if !(1..=MAX_HANDSHAKE_TIMEOUT).contains(&self.handshake_timeout) {
            problem(
                "handshake_timeout",
                format!(
                    "{} s is out of range: give 1 to {MAX_HANDSHAKE_TIMEOUT} seconds",
                    self.handshake_timeout
                ),
            );
        }
        if !tls {
            for key in ["server_name", "server_spiffe_id"] {
                let set = match key {
                    "server_name" => self.server_name.is_some(),
                    _ => self.server_spiffe_id.is_some(),
                };
                if set {
                    problem(
                        key,
                        "checks etcd's certificate: needs https:// endpoints and registry.ca"
                            .into(),
                    );
                }
            }
        }
        if self.server_name.is_some() && self.server_spiffe_id.is_some() {
            problem(
                "server_spiffe_id",
                "give either server_name (a DNS name) or server_spiffe_id, not both".into(),
            );
        }
        if let Some(name) = &self.server_name
            && rustls_pki_types::ServerName::try_from(name.as_str()).is_err()
        {
            problem(
                "server_name",
                format!("`{name}` is not a DNS name or IP address"),
            );
        }
        if let Some(id) = &self.server_spiffe_id
            && let Err(e) = check_spiffe_id(id)
        {
            problem("server_spiffe_id", e);
        }
    }
}

/// Service names are a key element and appear in JSON: keep them plain.
pub(crate) fn check_service_name(name: &str) -> Result<(), String> {
    super::check_rule_name(name).map_err(|e| e.replacen("rule name", "service name", 1))
}

/// ISO 3779: 17 characters, digits and capital letters except I, O and Q (they read like 1 and 0).
pub fn check_vin(vin: &str) -> Result<(), String> {
    if vin.len() != 17 {
        return Err(format!(
            "VIN `{vin}` has {} characters: an ISO 3779 VIN has 17",
            vin.chars().count()
        ));
    }
    if let Some(c) = vin
        .chars()
        .find(|c| !(c.is_ascii_digit() || c.is_ascii_uppercase()) || matches!(c, 'I' | 'O' | 'Q'))
    {
        return Err(format!(
            "VIN `{vin}` contains `{c}`: a VIN has only digits and capital letters other than I, O and Q"
        ));
    }
    Ok(())
}

pub(crate) fn check_spiffe_id(id: &str) -> Result<(), String> {
    let Some(rest) = id.strip_prefix("spiffe://") else {
        return Err(format!(
            "`{id}` is not a SPIFFE ID: it must start with spiffe://"
        ));
    };
    let domain = rest.split('/').next().unwrap_or("");
    if domain.is_empty()
        || !domain
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'))
    {
        return Err(format!(
            "`{id}` has no valid trust domain: lowercase letters, digits, `.`, `-` and `_` after spiffe://"
        ));
    }
    Ok(())
}

/// `scheme://host:port` with nothing after it; https exactly when TLS is configured, so a
/// certificate is never ignored and a TLS endpoint never lacks its CA.
fn check_endpoint(url: &str, tls: bool) -> Result<(), String> {
    let uri: tonic::transport::Uri = url.parse().map_err(|e| {
        format!("`{url}` is not a URL ({e}); write it like \"https://127.0.0.1:2379\"")
    })?;
    match (uri.scheme_str(), tls) {
        (Some("https"), true) | (Some("http"), false) => {}
        (Some("https"), false) => {
            return Err(format!(
                "`{url}` uses TLS: set registry.ca to the CA that signed etcd's certificate"
            ));
        }
        (Some("http"), true) => {
            return Err(format!(
                "`{url}` is plain HTTP but registry.ca/cert are set: use https://"
            ));
        }
        _ => return Err(format!("`{url}` must start with https:// or http://")),
    }
    if uri.port_u16().is_none() || uri.host().is_none_or(str::is_empty) {
        return Err(format!(
            "`{url}` needs a host and a port, e.g. https://127.0.0.1:2379"
        ));
    }
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(format!("`{url}` must not have a path"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const VIN: &str = "WVWZZZ1JZXW000001";

    fn problems(text: &str) -> Vec<(String, String)> {
        match Config::parse(text, Path::new("t.toml")) {
            Ok(_) => vec![],
            Err(e) => e
                .problems()
                .iter()
                .map(|p| (p.key.clone(), p.message.clone()))
                .collect(),
        }
    }

    #[test]
    fn registration_parses_with_defaults() {
        let c = Config::parse(
            &format!(
                "[agent]\nservice_name = \"gw\"\nvin = \"{VIN}\"\n[registry]\nendpoints = [\"http://127.0.0.1:2379\"]\n"
            ),
            Path::new("t.toml"),
        )
        .unwrap();
        let r = c.registry.unwrap();
        assert_eq!(r.lease_ttl, 10);
        assert_eq!(
            r.agent_key(VIN, "gw"),
            format!("/edgeplane/v1/vehicles/{VIN}/agents/gw")
        );
        assert_eq!(
            r.rules_key(VIN),
            format!("/edgeplane/v1/vehicles/{VIN}/rules")
        );
        assert!(!r.watch_rules);
    }

    #[test]
    fn no_registry_means_no_identity_required() {
        assert!(problems("").is_empty());
    }

    #[test]
    fn every_problem_names_its_key() {
        let text = r#"
            [agent]
            vin = "WVWZZZ1JZXW00000I"
            spiffe_id = "http://example.org/agent"
            [registry]
            endpoints = ["https://127.0.0.1:2379", "ftp://x", "https://127.0.0.1"]
            lease_ttl = 1
            prefix = "edgeplane/"
            cert = "/c.pem"
        "#;
        let keys: Vec<String> = problems(text).into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "agent.vin",
                "agent.spiffe_id",
                "agent.service_name",
                "registry.endpoints[1]",
                "registry.endpoints[2]",
                "registry.lease_ttl",
                "registry.prefix",
                "registry.key",
            ]
        );
    }

    #[test]
    fn tls_and_scheme_must_agree() {
        let base = format!("[agent]\nservice_name = \"gw\"\nvin = \"{VIN}\"\n[registry]\n");
        let p = problems(&format!("{base}endpoints = [\"https://127.0.0.1:2379\"]\n"));
        assert_eq!(p[0].0, "registry.endpoints[0]");
        assert!(p[0].1.contains("set registry.ca"), "{p:?}");
        let p = problems(&format!(
            "{base}endpoints = [\"http://127.0.0.1:2379\"]\nca = \"/ca.pem\"\n"
        ));
        assert!(p[0].1.contains("use https://"), "{p:?}");
        let p = problems(&format!(
            "{base}endpoints = [\"https://127.0.0.1:2379\"]\nca = \"/ca.pem\"\ncert = \"/c.pem\"\nkey = \"/k.pem\"\n"
        ));
        assert_eq!(
            p,
            [(
                "agent.spiffe_id".to_owned(),
                "required with registry.cert: the certificate's URI SAN must be this ID".to_owned()
            )]
        );
    }

    #[test]
    fn pushed_rules_and_server_identity_are_checked() {
        let base = format!("[agent]\nservice_name = \"gw\"\nvin = \"{VIN}\"\n[registry]\n");
        let plain = format!("{base}endpoints = [\"http://127.0.0.1:2379\"]\n");
        let p = problems(&format!("{plain}watch_rules = true\n"));
        assert_eq!(p[0].0, "registry.watch_rules");
        assert!(p[0].1.contains("allow_insecure_rules = true"), "{p:?}");
        assert!(
            problems(&format!(
                "{plain}watch_rules = true\nallow_insecure_rules = true\n"
            ))
            .is_empty()
        );
        let keys = |extra: &str| -> Vec<String> {
            problems(&format!("{plain}{extra}"))
                .into_iter()
                .map(|(k, _)| k)
                .collect()
        };
        assert_eq!(keys("rules_max_bytes = 0\n"), ["registry.rules_max_bytes"]);
        assert_eq!(keys("rules_burst = 0\n"), ["registry.rules_per_minute"]);
        assert_eq!(
            keys("handshake_timeout = 0\n"),
            ["registry.handshake_timeout"]
        );
        assert_eq!(keys("server_name = \"etcd\"\n"), ["registry.server_name"]);
        let tls = format!("{base}endpoints = [\"https://127.0.0.1:2379\"]\nca = \"/ca.pem\"\n");
        assert!(problems(&format!("{tls}server_name = \"etcd.fleet.example\"\n")).is_empty());
        let p = problems(&format!("{tls}server_spiffe_id = \"etcd\"\n"));
        assert_eq!(p[0].0, "registry.server_spiffe_id");
        let p = problems(&format!(
            "{tls}server_name = \"a.example\"\nserver_spiffe_id = \"spiffe://x/etcd\"\n"
        ));
        assert_eq!(p[0].0, "registry.server_spiffe_id");
    }

    #[test]
    fn vins_follow_iso_3779() {
        assert!(check_vin(VIN).is_ok());
        assert!(check_vin("1M8GDM9AXKP042788").is_ok());
        for bad in [
            "WVWZZZ1JZXW00000",
            "WVWZZZ1JZXW0000010",
            "WVWZZZ1JZXW00000O",
            "wvwzzz1jzxw000001",
            "WVWZZZ1JZXW00000Q",
        ] {
            assert!(check_vin(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn overrides_replace_and_enable() {
        let mut c = Config::parse("", Path::new("t.toml")).unwrap();
        let o = Overrides {
            service_name: Some("gw".into()),
            vin: Some(VIN.into()),
            spiffe_id: None,
            etcd_endpoints: Some(vec!["http://127.0.0.1:2379".into()]),
        };
        c.apply_overrides(&o, Path::new("t.toml")).unwrap();
        assert_eq!(c.registry.unwrap().endpoints, ["http://127.0.0.1:2379"]);
        let mut c = Config::parse("", Path::new("t.toml")).unwrap();
        let err = c
            .apply_overrides(
                &Overrides {
                    vin: Some("short".into()),
                    ..o
                },
                Path::new("t.toml"),
            )
            .unwrap_err();
        assert_eq!(err.problems()[0].key, "agent.vin");
    }
}
