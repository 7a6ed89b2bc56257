//! TLS to etcd (rustls through tonic): the CA that signed etcd's certificate, and for mutual TLS
//! a client certificate that must carry the agent's SPIFFE ID as its URI SAN. The same files
//! load into a plain rustls config for the remote-write push (`export`).

use std::{path::Path, sync::Arc};

use tokio_rustls::rustls::{
    self, RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};
use x509_parser::{extensions::GeneralName, pem::parse_x509_pem};

use super::RegistryError;
use crate::config::RegistryConfig;

/// The TLS settings for `r`, or `None` for plain-text endpoints. Refuses a client certificate
/// whose URI SAN is not `spiffe_id`.
pub fn client_config(
    r: &RegistryConfig,
    spiffe_id: Option<&str>,
) -> Result<Option<ClientTlsConfig>, RegistryError> {
    let identity = r.cert.as_deref().zip(r.key.as_deref());
    if let Some((cert, _)) = identity {
        let uris = uri_sans(&read("registry.cert", cert)?, cert)?;
        // Config validation requires spiffe_id with a certificate.
        let wanted = spiffe_id.unwrap_or_default();
        if !uris.iter().any(|u| u == wanted) {
            return Err(RegistryError::SpiffeMismatch {
                cert: cert.to_owned(),
                found: if uris.is_empty() {
                    "no URI SAN".into()
                } else {
                    format!("URI SAN {}", uris.join(", "))
                },
                configured: wanted.to_owned(),
            });
        }
    }
    client_config_from_files(r.ca.as_deref(), identity)
}

/// TLS trusting `ca`, with a client certificate and key for mutual TLS; `None` without a CA
/// (plain-text endpoints).
pub fn client_config_from_files(
    ca: Option<&Path>,
    identity: Option<(&Path, &Path)>,
) -> Result<Option<ClientTlsConfig>, RegistryError> {
    let Some(ca) = ca else {
        return match identity {
            Some(_) => Err(RegistryError::NoCa),
            None => Ok(None),
        };
    };
    let mut tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("registry.ca", ca)?));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(
            read("registry.cert", cert)?,
            read("registry.key", key)?,
        ));
    }
    Ok(Some(tls))
}

/// A rustls client config trusting the certificates in `ca`, with a client certificate chain
/// and key for mutual TLS; `section` names the keys in errors (`export.remote_write...`).
pub fn rustls_client_config(
    section: &str,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<rustls::ClientConfig, RegistryError> {
    let bad = |path: &Path, reason: String| RegistryError::Certificate {
        path: path.to_owned(),
        reason,
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&read(format!("{section}.ca"), ca)?) {
        let cert = cert.map_err(|e| bad(ca, e.to_string()))?;
        roots.add(cert).map_err(|e| bad(ca, e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad(ca, "no certificate in it".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(ca, e.to_string()))?
        .with_root_certificates(roots);
    Ok(match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(&read(format!("{section}.cert"), cert)?)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(cert, e.to_string()))?;
            let key_der = PrivateKeyDer::from_pem_slice(&read(format!("{section}.key"), key)?)
                .map_err(|e| bad(key, e.to_string()))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| bad(cert, e.to_string()))?
        }
    })
}

fn read(key: impl Into<String>, path: &Path) -> Result<Vec<u8>, RegistryError> {
    std::fs::read(path).map_err(|source| RegistryError::File {
        key: key.into(),
        path: path.to_owned(),
        source,
    })
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
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some((*u).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}
