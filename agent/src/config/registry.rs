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
}

impl RegistryConfig {
    fn default_lease_ttl() -> u64 {
        DEFAULT_LEASE_TTL
    }

    pub fn default_prefix() -> String {
        "/edgeplane/v1".into()
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
