//! A real etcd (Debian's etcd-server) for the registry tests, inside a test network namespace
//! on its loopback, and TLS material made with rcgen.

use std::{
    path::{Path, PathBuf},
    process::{Child, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use edgeplane_testbed::netns::Netns;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};

/// The client URL inside the namespace (each test has its own, so the port is free).
pub const PLAIN_URL: &str = "http://127.0.0.1:2379";
pub const TLS_URL: &str = "https://127.0.0.1:2379";

/// The DNS name and SPIFFE ID etcd's certificate carries besides 127.0.0.1.
pub const SERVER_DNS_NAME: &str = "etcd.fleet.example";
pub const SERVER_SPIFFE_ID: &str = "spiffe://fleet.example/etcd";

/// How etcd serves clients.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Security {
    Plain,
    /// Server certificate only.
    Tls,
    /// Clients must present a certificate signed by the test CA.
    MutualTls,
}

/// A CA, a server certificate for 127.0.0.1 ([`SERVER_DNS_NAME`], [`SERVER_SPIFFE_ID`]), and client certificates, as PEM files in `dir`.
pub struct Pki {
    pub dir: PathBuf,
    pub ca: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    pub fn new(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "edgeplane test CA");
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, cert.pem())?;
        let pki = Self {
            dir: dir.to_owned(),
            ca,
            issuer: Issuer::new(params, key),
        };
        let mut server =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), SERVER_DNS_NAME.to_owned()])?;
        server
            .subject_alt_names
            .push(SanType::URI(SERVER_SPIFFE_ID.try_into()?));
        // ClientAuth too: etcdctl uses it as its identity when etcd requires client certificates.
        server.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        pki.issue("server", server)?;
        Ok(pki)
    }

    /// A client certificate whose only SAN is the URI `spiffe_id`; returns (cert, key).
    pub fn client(&self, name: &str, spiffe_id: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into()?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(name, params)
    }

    fn issue(&self, name: &str, params: CertificateParams) -> anyhow::Result<(PathBuf, PathBuf)> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let (cert_path, key_path) = (
            self.dir.join(format!("{name}.pem")),
            self.dir.join(format!("{name}-key.pem")),
        );
        std::fs::write(&cert_path, cert.pem())?;
        std::fs::write(&key_path, key.serialize_pem())?;
        Ok((cert_path, key_path))
    }

    pub fn server(&self) -> (PathBuf, PathBuf) {
        (self.dir.join("server.pem"), self.dir.join("server-key.pem"))
    }
}

/// An etcd member in `ns`, killed on drop. Restarting keeps its data directory.
pub struct Etcd {
    data: PathBuf,
    security: Security,
    pki: Option<(PathBuf, PathBuf, PathBuf)>,
    child: Option<Child>,
    log: PathBuf,
}

impl Etcd {
    /// Starts etcd in `ns` with its data in `dir`; waits until it serves.
    pub fn start(
        ns: &Netns,
        dir: &Path,
        security: Security,
        pki: Option<&Pki>,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let pki = pki.map(|p| {
            let (cert, key) = p.server();
            (p.ca.clone(), cert, key)
        });
        let mut etcd = Self {
            data: dir.join("etcd-data"),
            security,
            pki,
            child: None,
            log: dir.join("etcd.log"),
        };
        etcd.launch(ns)?;
        Ok(etcd)
    }

    pub fn url(&self) -> &'static str {
        match self.security {
            Security::Plain => PLAIN_URL,
            Security::Tls | Security::MutualTls => TLS_URL,
        }
    }

    fn launch(&mut self, ns: &Netns) -> anyhow::Result<()> {
        let url = self.url();
        let mut cmd = ns.command("etcd");
        cmd.args(["--name", "test", "--data-dir"])
            .arg(&self.data)
            .args(["--listen-client-urls", url, "--advertise-client-urls", url])
            .args(["--listen-peer-urls", "http://127.0.0.1:2380"])
            .args(["--initial-advertise-peer-urls", "http://127.0.0.1:2380"])
            .args(["--initial-cluster", "test=http://127.0.0.1:2380"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&self.log)?);
        if let Some((ca, cert, key)) = &self.pki {
            cmd.arg("--cert-file").arg(cert).arg("--key-file").arg(key);
            if self.security == Security::MutualTls {
                cmd.arg("--client-cert-auth")
                    .arg("--trusted-ca-file")
                    .arg(ca);
            }
        }
        self.child = Some(
            cmd.spawn()
                .context("starting etcd (apt-get install etcd-server)")?,
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if self.ctl(ns, &["endpoint", "health"])?.status.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("etcd not healthy after 15 s:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills it the hard way, as a crash or a power cut would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same data directory.
    pub fn restart(&mut self, ns: &Netns) -> anyhow::Result<()> {
        self.kill();
        self.launch(ns)
    }

    /// Runs etcdctl against it (with the test CA and a client certificate under mTLS).
    pub fn ctl(&self, ns: &Netns, args: &[&str]) -> anyhow::Result<Output> {
        let mut cmd = ns.command("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .args(["--endpoints", self.url(), "--command-timeout", "3s"]);
        if let Some((ca, _, _)) = &self.pki {
            cmd.arg("--cacert").arg(ca);
            if self.security == Security::MutualTls {
                let (_, cert, key) = self.pki.as_ref().expect("checked above");
                cmd.arg("--cert").arg(cert).arg("--key").arg(key);
            }
        }
        cmd.args(args)
            .output()
            .context("running etcdctl (apt-get install etcd-client)")
    }

    /// The raw value of `key`, if it exists.
    pub fn get(&self, ns: &Netns, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let out = self.ctl(ns, &["get", key, "-w", "json"])?;
        if !out.status.success() {
            bail!(
                "etcdctl get failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let Some(kv) = json["kvs"].get(0) else {
            return Ok(None);
        };
        let value = kv["value"].as_str().context("value")?;
        Ok(Some(base64_decode(value)?))
    }

    /// The lease `key` is attached to (0 for none), as etcdctl names it in hex.
    pub fn lease_of(&self, ns: &Netns, key: &str) -> anyhow::Result<Option<String>> {
        let out = self.ctl(ns, &["get", key, "-w", "json"])?;
        let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(json["kvs"]
            .get(0)
            .and_then(|kv| kv["lease"].as_i64())
            .map(|l| format!("{l:x}")))
    }

    pub fn put(&self, ns: &Netns, key: &str, value: &str) -> anyhow::Result<i64> {
        let out = self.ctl(ns, &["put", key, value, "-w", "json"])?;
        if !out.status.success() {
            bail!(
                "etcdctl put failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        json["header"]["revision"].as_i64().context("revision")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Standard base64 (etcdctl's JSON carries keys and values so).
fn base64_decode(text: &str) -> anyhow::Result<Vec<u8>> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes().filter(|&c| c != b'=') {
        let v = ALPHABET
            .iter()
            .position(|&a| a == c)
            .with_context(|| format!("bad base64 character {c}"))?;
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_decodes() {
        assert_eq!(super::base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(super::base64_decode("AP8=").unwrap(), [0, 255]);
    }
}
