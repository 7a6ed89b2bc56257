//! `[export.remote_write]`: pushing the agent's series to Prometheus remote-write endpoints
//! through a store-and-forward queue on disk. Read at start; a reload does not change it.

use std::{collections::BTreeMap, path::PathBuf};

use serde::Deserialize;

use super::{AgentConfig, Problem, check_rule_name};

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    /// Absent: nothing is pushed.
    pub remote_write: Option<RemoteWriteConfig>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteWriteConfig {
    /// How often the series are collected (and the newest sent), in ms.
    #[serde(default = "RemoteWriteConfig::default_interval_ms")]
    pub interval_ms: u64,
    /// Bytes of queued samples at most, per endpoint; when full the oldest are dropped.
    #[serde(default = "RemoteWriteConfig::default_max_bytes")]
    pub max_bytes: u64,
    /// Samples per second at most while a backlog is sent after an outage.
    #[serde(default = "RemoteWriteConfig::default_max_backfill_rate")]
    pub max_backfill_rate: u64,
    /// Where the queues live (one subdirectory per endpoint).
    #[serde(default = "RemoteWriteConfig::default_dir")]
    pub dir: PathBuf,
    /// Labels added to every series; `vin` and `service_name` come from `[agent]` unless set.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub endpoints: Vec<RemoteWriteEndpoint>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteWriteEndpoint {
    /// Names the endpoint's queue, metrics and `/readyz` component.
    pub name: String,
    /// `http://` or `https://host:port/path`, e.g. Prometheus's `/api/v1/write`.
    pub url: String,
    /// A request with no answer for this long (ms) is sent again.
    #[serde(default = "RemoteWriteEndpoint::default_timeout_ms")]
    pub timeout_ms: u64,
    /// CA certificate (PEM) that signed the endpoint's; required with https.
    pub ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// A file holding the bearer token.
    pub bearer_token_file: Option<PathBuf>,
    pub basic_auth: Option<BasicAuth>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasicAuth {
    pub username: String,
    pub password_file: PathBuf,
}

const MIN_INTERVAL_MS: u64 = 100;
const MAX_INTERVAL_MS: u64 = 3_600_000;
/// A few collections of a large agent must fit.
const MIN_MAX_BYTES: u64 = 16 << 10;
const MAX_ENDPOINTS: usize = 8;
const MAX_LABELS: usize = 16;

impl RemoteWriteConfig {
    fn default_interval_ms() -> u64 {
        500
    }
    fn default_max_bytes() -> u64 {
        64 << 20
    }
    fn default_max_backfill_rate() -> u64 {
        20_000
    }
    fn default_dir() -> PathBuf {
        // systemd's StateDirectory=edgeplane.
        PathBuf::from("/var/lib/edgeplane/remote_write")
    }

    /// The labels every series gets: `[agent]`'s identity, then the configured ones.
    pub fn extra_labels(&self, agent: &AgentConfig) -> Vec<(String, String)> {
        let mut labels: BTreeMap<String, String> = BTreeMap::new();
        for (name, value) in [("vin", &agent.vin), ("service_name", &agent.service_name)] {
            if let Some(v) = value {
                labels.insert(name.into(), v.clone());
            }
        }
        labels.extend(self.labels.clone());
        labels.into_iter().collect()
    }

    pub(super) fn problems(&self, out: &mut Vec<Problem>) {
        let mut problem = |key: String, message: String| out.push(Problem { key, message });
        let key = |k: &str| format!("export.remote_write.{k}");
        if !(MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(&self.interval_ms) {
            problem(
                key("interval_ms"),
                format!(
                    "{} ms is out of range: {MIN_INTERVAL_MS} to {MAX_INTERVAL_MS} ms",
                    self.interval_ms
                ),
            );
        }
        if self.max_bytes < MIN_MAX_BYTES {
            problem(
                key("max_bytes"),
                format!(
                    "{} is too small: at least {MIN_MAX_BYTES} bytes",
                    self.max_bytes
                ),
            );
        }
        if self.max_backfill_rate == 0 {
            problem(
                key("max_backfill_rate"),
                "must be at least 1 sample per second".into(),
            );
        }
        if !self.dir.is_absolute() {
            problem(
                key("dir"),
                format!("`{}` must be an absolute path", self.dir.display()),
            );
        }
        if self.labels.len() > MAX_LABELS {
            problem(key("labels"), format!("at most {MAX_LABELS} labels"));
        }
        for (name, value) in &self.labels {
            if let Err(e) = check_label(name, value) {
                problem(key(&format!("labels.{name}")), e);
            }
        }
        if self.endpoints.is_empty() || self.endpoints.len() > MAX_ENDPOINTS {
            problem(
                key("endpoints"),
                format!(
                    "give 1 to {MAX_ENDPOINTS} endpoints ([[export.remote_write.endpoints]] with name and url)"
                ),
            );
        }
        for (i, e) in self.endpoints.iter().enumerate() {
            let key = |k: &str| format!("export.remote_write.endpoints[{i}].{k}");
            if let Err(m) = check_rule_name(&e.name) {
                problem(key("name"), m.replace("rule name", "endpoint name"));
            } else if self.endpoints[..i].iter().any(|o| o.name == e.name) {
                problem(key("name"), format!("duplicate endpoint name `{}`", e.name));
            }
            // Whether TLS settings fit the URL says nothing until the URL is right.
            let https = check_url(&e.url)
                .inspect_err(|m| problem(key("url"), m.clone()))
                .ok();
            if https == Some(true) && e.ca.is_none() {
                problem(
                    key("ca"),
                    "required with https: the CA certificate (PEM) that signed the endpoint's"
                        .into(),
                );
            }
            if https == Some(false) && (e.ca.is_some() || e.cert.is_some()) {
                problem(key("url"), "ca and cert need an https:// URL".into());
            }
            match (&e.cert, &e.key) {
                (Some(_), None) => problem(key("key"), "required with cert".into()),
                (None, Some(_)) => problem(key("cert"), "required with key".into()),
                _ => {}
            }
            if e.bearer_token_file.is_some() && e.basic_auth.is_some() {
                problem(
                    key("basic_auth"),
                    "give bearer_token_file or basic_auth, not both".into(),
                );
            }
            if !(100..=600_000).contains(&e.timeout_ms) {
                problem(
                    key("timeout_ms"),
                    format!("{} ms is out of range: 100 to 600000 ms", e.timeout_ms),
                );
            }
        }
    }
}

impl RemoteWriteEndpoint {
    fn default_timeout_ms() -> u64 {
        10_000
    }
}

/// Prometheus label names; `__` names are Prometheus's own.
fn check_label(name: &str, value: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let valid = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid || name.starts_with("__") || name.len() > 64 {
        return Err(format!(
            "`{name}` is not a label name: letters, digits and `_`, not starting with a digit or `__`, at most 64"
        ));
    }
    if value.is_empty() || value.len() > 256 {
        return Err("the value must be 1 to 256 bytes".into());
    }
    Ok(())
}

/// Whether `url` is https; or what is wrong with it.
fn check_url(url: &str) -> Result<bool, String> {
    let uri: axum::http::Uri = url
        .parse()
        .map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => {
            return Err(format!(
                "`{url}` must start with http:// or https://, e.g. \"http://127.0.0.1:9090/api/v1/write\""
            ));
        }
    };
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("`{url}` has no host"));
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err("credentials go in basic_auth, not the URL".into());
    }
    Ok(https)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::{Config, ConfigError};

    fn problems(text: &str) -> Vec<(String, String)> {
        match Config::parse(text, Path::new("t.toml")) {
            Err(ConfigError::Invalid { problems, .. }) => {
                problems.into_iter().map(|p| (p.key, p.message)).collect()
            }
            other => panic!("expected problems, got {other:?}"),
        }
    }

    #[test]
    fn defaults_and_identity_labels() {
        let c = Config::parse(
            "[agent]\nvin = \"WVWZZZ1JZXW000001\"\n[export.remote_write]\nlabels = { site = \"a\" }\n\
             [[export.remote_write.endpoints]]\nname = \"fleet\"\nurl = \"http://127.0.0.1:9090/api/v1/write\"\n",
            Path::new("t.toml"),
        )
        .unwrap();
        let rw = c.export.remote_write.as_ref().unwrap();
        assert_eq!((rw.interval_ms, rw.max_bytes), (500, 64 << 20));
        assert_eq!(rw.endpoints[0].timeout_ms, 10_000);
        assert_eq!(
            rw.extra_labels(&c.agent),
            [
                ("site".into(), "a".into()),
                ("vin".into(), "WVWZZZ1JZXW000001".into())
            ]
        );
    }

    #[test]
    fn bad_settings_name_their_key() {
        let p = problems(
            "[export.remote_write]\ninterval_ms = 10\nmax_bytes = 10\ndir = \"rel\"\nlabels = { __x = \"1\" }\n\
             [[export.remote_write.endpoints]]\nname = \"a\"\nurl = \"ftp://x\"\n\
             [[export.remote_write.endpoints]]\nname = \"a\"\nurl = \"https://u:p@x/w\"\ncert = \"/c\"\n",
        );
        let keys: Vec<&str> = p.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "export.remote_write.interval_ms",
                "export.remote_write.max_bytes",
                "export.remote_write.dir",
                "export.remote_write.labels.__x",
                "export.remote_write.endpoints[0].url",
                "export.remote_write.endpoints[1].name",
                "export.remote_write.endpoints[1].url",
                "export.remote_write.endpoints[1].key",
            ],
            "{p:?}"
        );
        assert!(p[4].1.contains("http:// or https://"), "{}", p[4].1);
        let p = problems(
            "[export.remote_write]\n[[export.remote_write.endpoints]]\nname = \"a\"\nurl = \"https://x/w\"\n\
             [[export.remote_write.endpoints]]\nname = \"b\"\nurl = \"http://x/w\"\nca = \"/ca\"\n",
        );
        let keys: Vec<&str> = p.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "export.remote_write.endpoints[0].ca",
                "export.remote_write.endpoints[1].url"
            ]
        );
        let p = problems("[export.remote_write]\nendpoints = []\n");
        assert_eq!(p[0].0, "export.remote_write.endpoints");
    }
}
