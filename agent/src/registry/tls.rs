//! TLS to etcd (rustls): the CA that signed etcd's certificate, the identity that certificate
//! must carry (each endpoint's host, a configured DNS name, or a SPIFFE ID), a bounded
//! handshake, and for mutual TLS a client certificate that must carry the agent's SPIFFE ID.
//!
//! tonic's own TLS can do neither the SPIFFE check nor the bound, so the agent connects and
//! shakes hands itself and gives tonic the finished stream (see [`Tls::connect`]). The same
//! certificate files load into a plain rustls config for the remote-write push (`export`).

use std::{path::Path, sync::Arc, time::Duration};

use hyper_util::rt::TokioIo;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::ring,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject as _};
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, client::TlsStream};
use x509_parser::{extensions::GeneralName, pem::parse_x509_pem, prelude::FromDer as _};

use super::RegistryError;
use crate::config::{DEFAULT_HANDSHAKE_TIMEOUT, RegistryConfig};

/// What etcd's certificate must prove.
#[derive(Debug, Clone, Default)]
pub enum ServerIdentity {
    /// The host of the endpoint URL (a DNS name or an IP address SAN).
    #[default]
    EndpointHost,
    /// This DNS name, whatever the endpoint's address.
    Name(String),
    /// This SPIFFE ID as a URI SAN.
    Spiffe(String),
}

/// TLS settings for every etcd endpoint.
#[derive(Clone)]
pub struct Tls {
    config: Arc<ClientConfig>,
    identity: ServerIdentity,
    handshake_timeout: Duration,
}

/// The TLS settings for `r`, or `None` for plain-text endpoints. Refuses a client certificate
/// whose URI SAN is not `spiffe_id`.
pub fn client_config(
    r: &RegistryConfig,
    spiffe_id: Option<&str>,
) -> Result<Option<Tls>, RegistryError> {
    let identity = r.cert.as_deref().zip(r.key.as_deref());
    if let Some((cert, _)) = identity {
        let uris = uri_sans(&read("registry.cert", cert)?, cert)?;
        // Config validation requires spiffe_id with a certificate.
        let wanted = spiffe_id.unwrap_or_default();
        if !uris.iter().any(|u| u == wanted) {
            return Err(RegistryError::SpiffeMismatch {
                cert: cert.to_owned(),
                found: describe_uris(&uris),
                configured: wanted.to_owned(),
            });
        }
    }
    let server = match (&r.server_name, &r.server_spiffe_id) {
        (_, Some(id)) => ServerIdentity::Spiffe(id.clone()),
        (Some(name), None) => ServerIdentity::Name(name.clone()),
        (None, None) => ServerIdentity::EndpointHost,
    };
    client_config_from_files(
        r.ca.as_deref(),
        identity,
        server,
        Duration::from_secs(r.handshake_timeout),
    )
}

/// TLS trusting `ca`, with a client certificate and key for mutual TLS; `None` without a CA
/// (plain-text endpoints).
pub fn client_config_from_files(
    ca: Option<&Path>,
    identity: Option<(&Path, &Path)>,
    server: ServerIdentity,
    handshake_timeout: Duration,
) -> Result<Option<Tls>, RegistryError> {
    let Some(ca) = ca else {
        return match identity {
            Some(_) => Err(RegistryError::NoCa),
            None => Ok(None),
        };
    };
    let roots = roots("registry", ca)?;
    let provider = Arc::new(ring::default_provider());
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| bad(ca, e.to_string()))?;
    let verifier = Arc::new(Verifier {
        webpki,
        spiffe_id: match &server {
            ServerIdentity::Spiffe(id) => Some(id.clone()),
            _ => None,
        },
    });
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(ca, e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = with_identity(builder, "registry", identity)?;
    // gRPC over TLS is HTTP/2, negotiated by ALPN (etcd insists).
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Some(Tls {
        config: Arc::new(config),
        identity: server,
        handshake_timeout,
    }))
}

/// A rustls client config trusting the certificates in `ca` (checked against the server's
/// name by webpki), with a client certificate chain and key for mutual TLS; `section` names
/// the keys in errors (`export.remote_write.endpoints`).
pub fn rustls_client_config(
    section: &str,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<ClientConfig, RegistryError> {
    let roots = roots(section, ca)?;
    let builder = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(ca, e.to_string()))?
        .with_root_certificates(roots);
    with_identity(builder, section, identity)
}

fn bad(path: &Path, reason: String) -> RegistryError {
    RegistryError::Certificate {
        path: path.to_owned(),
        reason,
    }
}

/// The CA certificates in `ca` (`<section>.ca`).
fn roots(section: &str, ca: &Path) -> Result<RootCertStore, RegistryError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&read(format!("{section}.ca"), ca)?) {
        let cert = cert.map_err(|e| bad(ca, format!("unreadable PEM ({e})")))?;
        roots
            .add(cert)
            .map_err(|e| bad(ca, format!("not a CA certificate ({e})")))?;
    }
    if roots.is_empty() {
        return Err(bad(ca, "no certificate in it".into()));
    }
    Ok(roots)
}

/// The config with the client certificate chain and key of mutual TLS
/// (`<section>.cert`, `<section>.key`), or none.
fn with_identity(
    builder: rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>,
    section: &str,
    identity: Option<(&Path, &Path)>,
) -> Result<ClientConfig, RegistryError> {
    let Some((cert, key)) = identity else {
        return Ok(builder.with_no_client_auth());
    };
    let chain = CertificateDer::pem_slice_iter(&read(format!("{section}.cert"), cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(cert, format!("unreadable PEM ({e})")))?;
    let key_der =
        PrivateKeyDer::from_pem_slice(&read(format!("{section}.key"), key)?).map_err(|e| {
            bad(
                key,
                format!("no private key ({e}); give {section}.key a PEM key"),
            )
        })?;
    builder
        .with_client_auth_cert(chain, key_der)
        .map_err(|e| bad(cert, e.to_string()))
}

/// For the CLI: endpoints' hosts checked, the default handshake bound.
pub fn cli_config(
    ca: Option<&Path>,
    identity: Option<(&Path, &Path)>,
) -> Result<Option<Tls>, RegistryError> {
    client_config_from_files(
        ca,
        identity,
        ServerIdentity::EndpointHost,
        Duration::from_secs(DEFAULT_HANDSHAKE_TIMEOUT),
    )
}

impl Tls {
    /// TCP connect and TLS handshake with `host:port`, within the handshake timeout.
    pub async fn connect(
        &self,
        host: &str,
        port: u16,
    ) -> std::io::Result<TokioIo<TlsStream<TcpStream>>> {
        let name = match &self.identity {
            ServerIdentity::Name(n) => n.as_str(),
            // A SPIFFE ID is checked in the verifier; the host only names the connection.
            ServerIdentity::EndpointHost | ServerIdentity::Spiffe(_) => host,
        };
        let name = ServerName::try_from(name.to_owned()).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("`{name}` is not a server name: {e}"),
            )
        })?;
        let connector = TlsConnector::from(self.config.clone());
        let handshake = async {
            let tcp = TcpStream::connect((host, port)).await?;
            tcp.set_nodelay(true)?;
            connector.connect(name, tcp).await.map_err(readable)
        };
        match tokio::time::timeout(self.handshake_timeout, handshake).await {
            Ok(stream) => Ok(TokioIo::new(stream?)),
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "TCP connect and TLS handshake did not finish within {} s \
                     (registry.handshake_timeout)",
                    self.handshake_timeout.as_secs()
                ),
            )),
        }
    }
}

/// rustls shows our own certificate errors with Debug: the message instead.
fn readable(e: std::io::Error) -> std::io::Error {
    if let Some(rustls::Error::InvalidCertificate(CertificateError::Other(other))) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        return std::io::Error::new(e.kind(), format!("invalid peer certificate: {}", other.0));
    }
    e
}

/// The CA's chain check, then the server's identity: its name (webpki), or its SPIFFE ID.
#[derive(Debug)]
struct Verifier {
    webpki: Arc<WebPkiServerVerifier>,
    spiffe_id: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "etcd's certificate has {found}, not registry.server_spiffe_id {wanted}: check the \
     endpoint, or set server_spiffe_id to etcd's ID"
)]
struct ServerSpiffeMismatch {
    found: String,
    wanted: String,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let checked = self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        let Some(wanted) = &self.spiffe_id else {
            return checked;
        };
        // webpki checks the chain before the name: a name mismatch means a good chain, and a
        // SPIFFE certificate need not name the host.
        match checked {
            Ok(_)
            | Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => {}
            Err(e) => return Err(e),
        }
        let uris = x509_parser::certificate::X509Certificate::from_der(end_entity)
            .ok()
            .and_then(|(_, c)| {
                c.subject_alternative_name()
                    .ok()
                    .flatten()
                    .map(|s| uris_of(&s.value.general_names))
            })
            .unwrap_or_default();
        if uris.iter().any(|u| u == wanted) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(ServerSpiffeMismatch {
                    found: describe_uris(&uris),
                    wanted: wanted.clone(),
                })),
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

fn describe_uris(uris: &[String]) -> String {
    if uris.is_empty() {
        "no URI SAN".into()
    } else {
        format!("URI SAN {}", uris.join(", "))
    }
}

fn read(key: impl Into<String>, path: &Path) -> Result<Vec<u8>, RegistryError> {
    std::fs::read(path).map_err(|source| RegistryError::File {
        key: key.into(),
        path: path.to_owned(),
        source,
    })
}

fn uris_of(names: &[GeneralName<'_>]) -> Vec<String> {
    names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some((*u).to_owned()),
            _ => None,
        })
        .collect()
}

/// The URI subject alternative names of the first certificate in a PEM file.
fn uri_sans(pem: &[u8], path: &Path) -> Result<Vec<String>, RegistryError> {
    let bad = |reason: String| RegistryError::Certificate {
        path: path.to_owned(),
        reason,
    };
    let (_, pem) = parse_x509_pem(pem).map_err(|e| bad(format!("no PEM block ({e})")))?;
    let cert = pem.parse_x509().map_err(|e| bad(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| bad(e.to_string()))?;
    Ok(san
        .map(|s| uris_of(&s.value.general_names))
        .unwrap_or_default())
}
