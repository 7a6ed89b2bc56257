//! The few etcd v3 calls the agent and `edgeplane registry get` need, over etcd's gRPC API
//! (proto/etcd/rpc.proto): Range, Put, LeaseGrant, LeaseRevoke, LeaseKeepAlive and Watch.
//!
//! Why not the etcd-client crate: its build script runs the system `protoc`, which this
//! project's builds do without (protox parses the .proto files in Rust).

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::{StreamExt as _, wrappers::ReceiverStream};
use tonic::{
    Streaming,
    transport::{Channel, Endpoint, Uri},
};

use super::{RegistryError, tls::Tls};

#[allow(clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("etcdserverpb");
}

use pb::{
    KeyValue, LeaseGrantRequest, LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseRevokeRequest,
    PutRequest, RangeRequest, WatchCreateRequest, WatchRequest, WatchResponse, kv_client::KvClient,
    lease_client::LeaseClient, watch_client::WatchClient, watch_request::RequestUnion,
};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Bounds every call, so a server that accepted the connection and went silent is noticed.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection to one etcd member.
#[derive(Clone)]
pub struct Etcd {
    channel: Channel,
    /// The URL it is connected to.
    pub endpoint: String,
}

impl Etcd {
    /// Connects to the first endpoint that answers, in order.
    pub async fn connect(endpoints: &[String], tls: Option<&Tls>) -> Result<Self, RegistryError> {
        let mut errors = Vec::new();
        for url in endpoints {
            match connect_one(url, tls).await {
                Ok(channel) => {
                    return Ok(Self {
                        channel,
                        endpoint: url.clone(),
                    });
                }
                Err(e) => errors.push(format!("{url}: {}", chain(&e))),
            }
        }
        Err(RegistryError::Unreachable(errors.join("; ")))
    }

    pub async fn grant(&self, ttl: i64) -> Result<i64, RegistryError> {
        let req = LeaseGrantRequest { ttl, id: 0 };
        let r = call(
            "LeaseGrant",
            LeaseClient::new(self.channel.clone()).lease_grant(req),
        )
        .await?;
        if !r.error.is_empty() {
            return Err(RegistryError::Refused {
                call: "LeaseGrant",
                message: r.error,
            });
        }
        Ok(r.id)
    }

    pub async fn revoke(&self, id: i64) -> Result<(), RegistryError> {
        let req = LeaseRevokeRequest { id };
        call(
            "LeaseRevoke",
            LeaseClient::new(self.channel.clone()).lease_revoke(req),
        )
        .await
        .map(drop)
    }

    /// Opens a keep-alive stream for lease `id` and renews it once: returns the stream and the
    /// lease's remaining TTL (0 when the lease no longer exists).
    pub async fn keep_alive(&self, id: i64) -> Result<(KeepAlive, i64), RegistryError> {
        let (tx, rx) = mpsc::channel(1);
        // etcd answers the call's headers with its first response: the request goes first.
        tx.send(LeaseKeepAliveRequest { id })
            .await
            .expect("the receiver is held below");
        let responses = call(
            "LeaseKeepAlive",
            LeaseClient::new(self.channel.clone()).lease_keep_alive(ReceiverStream::new(rx)),
        )
        .await?;
        let mut ka = KeepAlive { id, tx, responses };
        let ttl = ka.response().await?;
        Ok((ka, ttl))
    }

    pub async fn put(&self, key: &str, value: Vec<u8>, lease: i64) -> Result<(), RegistryError> {
        let req = PutRequest {
            key: key.into(),
            value,
            lease,
        };
        call("Put", KvClient::new(self.channel.clone()).put(req))
            .await
            .map(drop)
    }

    /// The value of `key`, if any, and the store's revision.
    pub async fn get(&self, key: &str) -> Result<(Option<KeyValue>, i64), RegistryError> {
        let req = RangeRequest {
            key: key.into(),
            range_end: Vec::new(),
        };
        let r = call("Range", KvClient::new(self.channel.clone()).range(req)).await?;
        let revision = r.header.map_or(0, |h| h.revision);
        Ok((r.kvs.into_iter().next(), revision))
    }

    /// Every key under `prefix`, in key order.
    pub async fn list(&self, prefix: &str) -> Result<Vec<KeyValue>, RegistryError> {
        let req = RangeRequest {
            key: prefix.into(),
            range_end: prefix_end(prefix.as_bytes()),
        };
        Ok(
            call("Range", KvClient::new(self.channel.clone()).range(req))
                .await?
                .kvs,
        )
    }

    /// Watches `key` from `start_revision` on; the stream's first message confirms the watch.
    pub async fn watch(
        &self,
        key: &str,
        start_revision: i64,
    ) -> Result<Streaming<WatchResponse>, RegistryError> {
        let create = WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: key.into(),
                range_end: Vec::new(),
                start_revision,
            })),
        };
        // The request stream stays open: etcd ends the watch when the client half-closes.
        let requests = tokio_stream::iter([create]).chain(tokio_stream::pending());
        call(
            "Watch",
            WatchClient::new(self.channel.clone()).watch(requests),
        )
        .await
    }
}

/// An open LeaseKeepAlive stream.
pub struct KeepAlive {
    id: i64,
    tx: mpsc::Sender<LeaseKeepAliveRequest>,
    responses: Streaming<LeaseKeepAliveResponse>,
}

impl KeepAlive {
    /// Renews the lease; returns its remaining TTL (0 when it no longer exists).
    pub async fn renew(&mut self) -> Result<i64, RegistryError> {
        self.tx
            .send(LeaseKeepAliveRequest { id: self.id })
            .await
            .map_err(|_| RegistryError::Closed("LeaseKeepAlive"))?;
        self.response().await
    }

    async fn response(&mut self) -> Result<i64, RegistryError> {
        match tokio::time::timeout(CALL_TIMEOUT, self.responses.message()).await {
            Err(_) => Err(RegistryError::Timeout("LeaseKeepAlive")),
            Ok(Err(status)) => Err(RegistryError::Rpc {
                call: "LeaseKeepAlive",
                status: Box::new(status),
            }),
            Ok(Ok(None)) => Err(RegistryError::Closed("LeaseKeepAlive")),
            Ok(Ok(Some(r))) => Ok(r.ttl),
        }
    }
}

async fn connect_one(url: &str, tls: Option<&Tls>) -> Result<Channel, tonic::transport::Error> {
    let Some(tls) = tls else {
        return Endpoint::from_shared(url.to_owned())?
            .connect_timeout(CONNECT_TIMEOUT)
            .connect()
            .await;
    };
    // The handshake is ours (see tls.rs): tonic gets a TLS stream and speaks HTTP/2 on it, so
    // its endpoint is plain http:// (gRPC servers do not look at the :scheme).
    let uri: Uri = Endpoint::from_shared(url.to_owned())?.uri().clone();
    let host = uri
        .host()
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(2379);
    let tls = tls.clone();
    let connector = tower_service_fn(move |_: Uri| {
        let (tls, host) = (tls.clone(), host.clone());
        async move { tls.connect(&host, port).await }
    });
    let authority = uri
        .authority()
        .map_or_else(String::new, ToString::to_string);
    Endpoint::from_shared(format!("http://{authority}"))?
        .connect_with_connector(connector)
        .await
}

/// A `tower::Service<Uri>` from a closure (tower's `service_fn`, without the dependency).
fn tower_service_fn<F, Fut, T>(f: F) -> ServiceFn<F>
where
    F: FnMut(Uri) -> Fut,
    Fut: Future<Output = std::io::Result<T>>,
{
    ServiceFn(f)
}

#[derive(Clone)]
struct ServiceFn<F>(F);

impl<F, Fut, T> tower_service::Service<Uri> for ServiceFn<F>
where
    F: FnMut(Uri) -> Fut,
    Fut: Future<Output = std::io::Result<T>>,
{
    type Response = T;
    type Error = std::io::Error;
    type Future = Fut;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        (self.0)(uri)
    }
}

/// Runs one call with [`CALL_TIMEOUT`].
async fn call<T>(
    name: &'static str,
    f: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, RegistryError> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Err(_) => Err(RegistryError::Timeout(name)),
        Ok(Err(status)) => Err(RegistryError::Rpc {
            call: name,
            status: Box::new(status),
        }),
        Ok(Ok(r)) => Ok(r.into_inner()),
    }
}

/// The end of etcd's range for a prefix: the prefix with its last byte incremented.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Only 0xff bytes: everything from the prefix on ("\0" means no end to etcd).
    vec![0]
}

/// An error with its sources: tonic's transport error alone says only "transport error".
/// Sources that repeat what is already said (hyper's errors embed theirs) are left out.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        let last = parts.last_mut().expect("starts with one");
        if text.starts_with(last.as_str()) {
            *last = text;
        } else if !last.contains(&text) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends_past_every_key_under_it() {
        assert_eq!(prefix_end(b"/a/"), b"/a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), b"\0");
    }

    #[test]
    fn chains_sources_without_repeating_them() {
        #[derive(Debug)]
        struct E(&'static str, Option<Box<E>>);
        impl std::fmt::Display for E {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl std::error::Error for E {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                self.1.as_deref().map(|e| e as _)
            }
        }
        let refused = E("connection refused", None);
        let connect = E(
            "tcp connect error: connection refused",
            Some(Box::new(refused)),
        );
        let e = E(
            "transport error",
            Some(Box::new(E("tcp connect error", Some(Box::new(connect))))),
        );
        assert_eq!(
            chain(&e),
            "transport error: tcp connect error: connection refused"
        );
    }
}
