//! POSTs remote-write requests to one endpoint over HTTP/1.1 (hyper), with TLS or mutual TLS
//! (rustls) and a bearer token or basic auth; the connection is kept between requests.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use axum::http::{HeaderValue, Request, StatusCode, Uri, header};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, rustls::pki_types::ServerName};

use super::ExportError;
use crate::config::{BasicAuth, RemoteWriteEndpoint};

/// Why a request failed: worth retrying (the endpoint is away or busy), or refused for good.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("{0}")]
    Retry(String),
    #[error("the endpoint rejected the samples: {0}")]
    Rejected(String),
}

/// What an endpoint's answer means for the samples sent. Remote write 1.0 says a 4xx other
/// than 429 is not retried: the server refused the data. But 401, 403, 404 and 407 refuse the
/// request before any data is read (credentials, a wrong URL or proxy): the samples stay
/// queued and wait for the configuration to be fixed, rather than every sample taken meanwhile
/// being dropped.
fn answer(status: StatusCode, text: &str) -> Result<(), SendError> {
    if status.is_success() {
        Ok(())
    } else if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
        Err(SendError::Retry(format!("HTTP {status}: {text}")))
    } else if refuses_credentials(status) {
        Err(SendError::Retry(format!(
            "HTTP {status}: {text}; check the endpoint's basic_auth or bearer_token_file"
        )))
    } else if status == StatusCode::NOT_FOUND {
        Err(SendError::Retry(format!(
            "HTTP {status}: {text}; check the endpoint's url (Prometheus takes remote write at \
             /api/v1/write with --web.enable-remote-write-receiver)"
        )))
    } else {
        Err(SendError::Rejected(format!("HTTP {status}: {text}")))
    }
}

/// 401, 403 and 407: the server (or a proxy) refused the credentials, not the samples.
fn refuses_credentials(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::UNAUTHORIZED
            | StatusCode::FORBIDDEN
            | StatusCode::PROXY_AUTHENTICATION_REQUIRED
    )
}

/// Where the Authorization header comes from.
enum Credentials {
    Bearer(PathBuf),
    Basic(BasicAuth),
}

impl Credentials {
    fn header(&self) -> Result<HeaderValue, ExportError> {
        let value = match self {
            Self::Bearer(token_file) => {
                format!("Bearer {}", secret("bearer_token_file", token_file)?)
            }
            Self::Basic(b) => {
                let password = secret("basic_auth.password_file", &b.password_file)?;
                let pair = format!("{}:{password}", b.username);
                format!("Basic {}", base64(pair.as_bytes()))
            }
        };
        let mut v = HeaderValue::try_from(value).map_err(|_| ExportError::BadSecret)?;
        v.set_sensitive(true);
        Ok(v)
    }
}

/// A secret file's contents without the line end.
fn secret(key: &'static str, path: &Path) -> Result<String, ExportError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim_end_matches(['\n', '\r']).to_owned())
        .map_err(|source| ExportError::Secret {
            key,
            path: path.to_owned(),
            source,
        })
}

pub struct Sender {
    uri: Uri,
    host: String,
    port: u16,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    credentials: Option<Credentials>,
    authorization: Option<HeaderValue>,
    timeout: Duration,
    connection: Option<SendRequest<Full<Bytes>>>,
}

impl Sender {
    /// Reads the endpoint's certificates and secrets now, so a wrong path stops the agent at
    /// start rather than failing every push.
    pub fn new(e: &RemoteWriteEndpoint) -> Result<Self, ExportError> {
        // Validation checked the URL.
        let uri: Uri = e.url.parse().map_err(|_| ExportError::Url(e.url.clone()))?;
        let https = uri.scheme_str() == Some("https");
        let host = uri.host().ok_or_else(|| ExportError::Url(e.url.clone()))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tls = if https {
            let identity = e.cert.as_deref().zip(e.key.as_deref());
            // Validation requires a CA with https.
            let ca =
                e.ca.as_deref()
                    .ok_or_else(|| ExportError::Url(e.url.clone()))?;
            let config = crate::registry::tls::rustls_client_config(
                "export.remote_write.endpoints",
                ca,
                identity,
            )?;
            let name =
                ServerName::try_from(host.clone()).map_err(|_| ExportError::Url(e.url.clone()))?;
            Some((TlsConnector::from(Arc::new(config)), name))
        } else {
            None
        };
        let credentials = match (&e.bearer_token_file, &e.basic_auth) {
            (Some(token_file), _) => Some(Credentials::Bearer(token_file.clone())),
            (None, Some(b)) => Some(Credentials::Basic(b.clone())),
            (None, None) => None,
        };
        let authorization = credentials.as_ref().map(Credentials::header).transpose()?;
        Ok(Self {
            uri,
            host,
            port,
            tls,
            credentials,
            authorization,
            timeout: Duration::from_millis(e.timeout_ms),
            connection: None,
        })
    }

    /// Sends one snappy-compressed WriteRequest; done when the endpoint answered 2xx.
    pub async fn send(&mut self, body: Vec<u8>) -> Result<(), SendError> {
        match tokio::time::timeout(self.timeout, self.exchange(body)).await {
            Ok(r) => r,
            Err(_) => {
                self.connection = None;
                Err(SendError::Retry(format!(
                    "no answer within {} ms",
                    self.timeout.as_millis()
                )))
            }
        }
    }

    async fn exchange(&mut self, body: Vec<u8>) -> Result<(), SendError> {
        let mut conn = match self.connection.take() {
            Some(mut c) => match c.ready().await {
                Ok(()) => c,
                Err(_) => self.connect().await?,
            },
            None => self.connect().await?,
        };
        let mut req = Request::post(self.uri.clone())
            .header(header::HOST, self.authority())
            .header(header::CONTENT_TYPE, "application/x-protobuf")
            .header(header::CONTENT_ENCODING, "snappy")
            .header(
                header::USER_AGENT,
                concat!("edgeplane/", env!("CARGO_PKG_VERSION")),
            )
            .header("X-Prometheus-Remote-Write-Version", "0.1.0")
            .body(Full::new(Bytes::from(body)))
            .expect("a valid request");
        if let Some(a) = &self.authorization {
            req.headers_mut().insert(header::AUTHORIZATION, a.clone());
        }
        let resp = conn
            .send_request(req)
            .await
            .map_err(|e| SendError::Retry(format!("request failed: {e}")))?;
        let status = resp.status();
        // The body is read whole (bounded by the timeout), so the connection can be reused.
        let text: String = resp
            .into_body()
            .collect()
            .await
            .map(|b| {
                String::from_utf8_lossy(&b.to_bytes())
                    .trim()
                    .chars()
                    .take(300)
                    .collect()
            })
            .unwrap_or_default();
        self.connection = Some(conn);
        if refuses_credentials(status) {
            self.reread_credentials()?;
        }
        answer(status, &text)
    }

    /// After a refusal the secret is read again: a rotated token or password is picked up by
    /// the next retry, without a restart (as Prometheus reads its credential files).
    fn reread_credentials(&mut self) -> Result<(), SendError> {
        if let Some(c) = &self.credentials {
            let header = c.header().map_err(|e| SendError::Retry(e.to_string()))?;
            self.authorization = Some(header);
        }
        Ok(())
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, SendError> {
        let retry = |what: &str, e: &dyn std::fmt::Display| {
            SendError::Retry(format!("{what} {}:{}: {e}", self.host, self.port))
        };
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| retry("cannot connect to", &e))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => self.handshake(TokioIo::new(tcp)).await,
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| retry("TLS handshake with", &e))?;
                self.handshake(TokioIo::new(tls)).await
            }
        }
    }

    async fn handshake<T>(&self, io: TokioIo<T>) -> Result<SendRequest<Full<Bytes>>, SendError>
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| SendError::Retry(format!("HTTP handshake failed: {e}")))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(send)
    }

    fn authority(&self) -> String {
        self.uri
            .authority()
            .map_or_else(|| self.host.clone(), |a| a.to_string())
    }
}

/// Standard base64 with padding (basic auth's credentials).
fn base64(input: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_is_the_standard_alphabet_with_padding() {
        assert_eq!(super::base64(b"user:pass"), "dXNlcjpwYXNz");
        assert_eq!(super::base64(b"ab"), "YWI=");
        assert_eq!(super::base64(b"a"), "YQ==");
        assert_eq!(super::base64(b""), "");
    }

    /// Refusals of the request keep the samples; refusals of the data drop them.
    #[test]
    fn answers_that_keep_and_that_drop_the_samples() {
        use super::{SendError, StatusCode, answer};
        let kept = |code: u16| {
            matches!(
                answer(StatusCode::from_u16(code).unwrap(), ""),
                Err(SendError::Retry(_))
            )
        };
        let dropped = |code: u16| {
            matches!(
                answer(StatusCode::from_u16(code).unwrap(), ""),
                Err(SendError::Rejected(_))
            )
        };
        assert!(answer(StatusCode::NO_CONTENT, "").is_ok());
        for code in [401, 403, 404, 407, 429, 500, 502, 503] {
            assert!(kept(code), "HTTP {code} must keep the samples");
        }
        for code in [400, 409, 413, 422] {
            assert!(dropped(code), "HTTP {code} must drop the samples");
        }
        let Err(SendError::Retry(why)) = answer(StatusCode::UNAUTHORIZED, "bad password") else {
            panic!("401 is retried");
        };
        assert!(
            why.contains("basic_auth") && why.contains("bad password"),
            "{why}"
        );
    }
}
