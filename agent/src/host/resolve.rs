//! Name resolution of CAN tunnel peers (`to.udp = "host:port"`), off the runtime and with a
//! time limit: a resolver that never answers costs a route [`RESOLVE_TIMEOUT`], never the
//! agent. A peer that does not resolve leaves its route waiting (the others run), and the
//! agent tries again with [`Backoff`].

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

/// How long one resolution may take; glibc's own default (5 s per nameserver attempt, two
/// attempts) can be longer, and the lookup thread finishes on its own after.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// First and longest pause before resolving again the peers that failed.
pub const RETRY_FIRST: Duration = Duration::from_secs(1);
pub const RETRY_MAX: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error(
        "`{peer}` did not resolve within {} s (is a DNS server in /etc/resolv.conf reachable?)",
        RESOLVE_TIMEOUT.as_secs()
    )]
    TimedOut { peer: String },
    #[error("`{peer}` does not resolve: {reason} (check the name, /etc/hosts and DNS)")]
    Failed { peer: String, reason: String },
    #[error("`{peer}` resolves to no address")]
    NoAddress { peer: String },
}

/// Resolved peers by their configured `host:port`; absent: not resolved (yet).
pub type Peers = BTreeMap<String, SocketAddr>;

/// `peer` as an address literal, without a name service.
pub fn literal(peer: &str) -> Result<SocketAddr, ResolveError> {
    peer.parse().map_err(|_| ResolveError::Failed {
        peer: peer.to_owned(),
        reason: "not an address literal, and no name service here".to_owned(),
    })
}

/// Resolves `peer` (`host:port`, or an address literal, which needs no lookup) through the
/// system's resolver (getaddrinfo, on tokio's blocking pool) within `timeout`; the first
/// address wins.
pub async fn resolve(peer: &str, timeout: Duration) -> Result<SocketAddr, ResolveError> {
    if let Ok(a) = peer.parse() {
        return Ok(a);
    }
    let lookup = tokio::time::timeout(timeout, tokio::net::lookup_host(peer.to_owned()));
    match lookup.await {
        Err(_elapsed) => Err(ResolveError::TimedOut {
            peer: peer.to_owned(),
        }),
        Ok(Err(e)) => Err(ResolveError::Failed {
            peer: peer.to_owned(),
            // getaddrinfo's text ("failed to lookup address information: ...").
            reason: e.to_string(),
        }),
        Ok(Ok(mut addrs)) => addrs.next().ok_or_else(|| ResolveError::NoAddress {
            peer: peer.to_owned(),
        }),
    }
}

/// Resolves every peer in `peers` at once, each within `timeout`.
pub async fn resolve_all<'a>(
    peers: impl IntoIterator<Item = &'a str>,
    timeout: Duration,
) -> BTreeMap<String, Result<SocketAddr, ResolveError>> {
    let tasks: Vec<_> = peers
        .into_iter()
        .map(|p| {
            let p = p.to_owned();
            (
                p.clone(),
                tokio::spawn(async move { resolve(&p, timeout).await }),
            )
        })
        .collect();
    let mut out = BTreeMap::new();
    for (peer, task) in tasks {
        let result = task.await.unwrap_or_else(|e| {
            Err(ResolveError::Failed {
                peer: peer.clone(),
                reason: e.to_string(),
            })
        });
        out.insert(peer, result);
    }
    out
}

/// Doubling pauses between retries, from [`RETRY_FIRST`] to [`RETRY_MAX`].
#[derive(Debug, Clone)]
pub struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Self(RETRY_FIRST)
    }
}

impl Backoff {
    /// The next pause.
    pub fn next_pause(&mut self) -> Duration {
        let p = self.0;
        self.0 = (self.0 * 2).min(RETRY_MAX);
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn literals_need_no_lookup_and_hosts_entries_no_dns() {
        assert_eq!(
            resolve("192.0.2.1:2000", RESOLVE_TIMEOUT).await,
            Ok("192.0.2.1:2000".parse().unwrap())
        );
        assert_eq!(
            resolve("[2001:db8::1]:2000", RESOLVE_TIMEOUT).await,
            Ok("[2001:db8::1]:2000".parse().unwrap())
        );
        // localhost comes from /etc/hosts, no DNS needed.
        let local = resolve("localhost:2000", RESOLVE_TIMEOUT).await.unwrap();
        assert!(local.ip().is_loopback() && local.port() == 2000);
    }

    #[test]
    fn backoff_doubles_up_to_its_limit() {
        let mut b = Backoff::default();
        let pauses: Vec<u64> = (0..8).map(|_| b.next_pause().as_secs()).collect();
        assert_eq!(pauses, [1, 2, 4, 8, 16, 32, 60, 60]);
    }
}
