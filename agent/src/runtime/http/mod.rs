//! The HTTP endpoints: /metrics, /healthz, /readyz, /events, served by [`server`] with the
//! limits of `[http]`.

pub mod server;

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use prometheus_client::registry::Registry;
use tokio::{
    net::TcpListener,
    sync::{broadcast, watch},
};
use tokio_stream::{
    Stream,
    wrappers::{BroadcastStream, errors::BroadcastStreamRecvError},
};

use crate::{
    config::HttpConfig,
    latency::events::Event,
    metrics::{self, HttpMetrics},
    registry::Health,
    runtime::views::Views,
};

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone)]
pub struct HttpState {
    pub registry: Arc<Registry>,
    pub views: Views,
    /// Fleet registration's state, when configured.
    pub fleet: Option<tokio::sync::watch::Receiver<Health>>,
    /// The remote-write endpoints, when configured.
    pub export: Option<crate::export::Health>,
    /// Slow-frame events, when the kernel path runs.
    pub events: Option<broadcast::Sender<Arc<Event>>>,
}

/// What the handlers share: the agent's state and the server's own.
#[derive(Clone)]
struct Routes {
    agent: HttpState,
    event_streams: EventStreams,
    /// Turns true when the server stops: /events streams end then.
    stop: watch::Receiver<bool>,
}

fn router(routes: Routes) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/events", get(events))
        .with_state(routes)
}

/// Serves the endpoints on `listener` with the limits in `config` (a reload sends new ones)
/// until `shutdown` completes; then stops accepting, ends /events streams, lets responses in
/// progress finish (at most [`server::SHUTDOWN_GRACE`]) and returns.
pub async fn serve(
    listener: TcpListener,
    state: HttpState,
    config: watch::Receiver<HttpConfig>,
    metrics: HttpMetrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let (stop_tx, stop) = watch::channel(false);
    let routes = Routes {
        agent: state,
        event_streams: EventStreams {
            open: Arc::new(AtomicUsize::new(0)),
            config: config.clone(),
            metrics: metrics.clone(),
        },
        stop: stop.clone(),
    };
    let server = server::run(listener, router(routes), config, metrics, stop);
    let signal = async move {
        shutdown.await;
        stop_tx.send_replace(true);
    };
    tokio::join!(server, signal);
}

const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// OpenMetrics for clients that ask for it (Prometheus does), the classic text format otherwise.
async fn metrics_handler(State(r): State<Routes>, headers: HeaderMap) -> impl IntoResponse {
    let s = r.agent;
    let openmetrics = headers.get_all(header::ACCEPT).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.contains("application/openmetrics-text"))
    });
    // Reading maps is a few syscalls per rule: keep it off the async workers.
    let body = tokio::task::spawn_blocking(move || {
        let text = metrics::render(&s.registry);
        if openmetrics {
            text
        } else {
            metrics::to_prometheus_text(&text)
        }
    })
    .await
    .unwrap_or_else(|e| format!("# rendering metrics failed: {e}\n"));
    (
        [(
            header::CONTENT_TYPE,
            if openmetrics {
                OPENMETRICS
            } else {
                PROMETHEUS_TEXT
            },
        )],
        body,
    )
}

async fn readyz(State(Routes { agent: s, .. }): State<Routes>) -> impl IntoResponse {
    let mut readiness = s.views.readiness();
    // Shown, but readiness is the data plane's: etcd trouble does not stop traffic.
    if let Some(r) = &s.fleet {
        readiness.components.push(r.borrow().component());
    }
    // Likewise: an endpoint away is degraded, its samples wait on disk.
    if let Some(e) = &s.export {
        readiness.components.extend(e.components());
    }
    let code = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(readiness))
}

/// Slow frames as they happen, one JSON object per line, until the client goes away or the
/// agent stops. A client too slow to keep up gets `{"missed": N}` in their place. At most
/// `http.max_event_streams` at a time: streams last, and each holds a connection.
async fn events(State(r): State<Routes>) -> impl IntoResponse {
    let Some(tx) = r.agent.events else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "latency capture runs with the kernel path only\n",
        )
            .into_response();
    };
    // Subscribed before the stream is counted open: a client that sees the count (a test) misses
    // nothing sent after.
    let events = BroadcastStream::new(tx.subscribe());
    let permit = match r.event_streams.open() {
        Ok(p) => p,
        Err(max) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "too many /events streams: at most {max} at a time (http.max_event_streams)\n"
                ),
            )
                .into_response();
        }
    };
    let mut stop = r.stop;
    let lines = EventLines {
        events,
        stopped: Box::pin(async move {
            let _ = stop.wait_for(|s| *s).await;
        }),
        _permit: permit,
    };
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(lines),
    )
        .into_response()
}

/// Counts open /events streams against `http.max_event_streams` (read at each request, so a
/// reload applies to the next one).
#[derive(Clone)]
struct EventStreams {
    open: Arc<AtomicUsize>,
    config: watch::Receiver<HttpConfig>,
    metrics: HttpMetrics,
}

impl EventStreams {
    /// A place for one more stream, or the cap.
    fn open(&self) -> Result<StreamPermit, usize> {
        let max = self.config.borrow().max_event_streams;
        match self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            }) {
            Ok(_) => {
                self.metrics.event_streams.inc();
                Ok(StreamPermit(self.clone()))
            }
            Err(_) => {
                self.metrics.event_streams_refused.inc();
                Err(max)
            }
        }
    }
}

/// Frees its stream's place when the stream (the response body) is dropped.
struct StreamPermit(EventStreams);

impl Drop for StreamPermit {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.event_streams.dec();
    }
}

/// The JSON lines of one /events stream, ending when the server stops.
struct EventLines {
    events: BroadcastStream<Arc<Event>>,
    stopped: Pin<Box<dyn Future<Output = ()> + Send>>,
    _permit: StreamPermit,
}

impl Stream for EventLines {
    type Item = Result<String, std::convert::Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.stopped.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        Pin::new(&mut this.events).poll_next(cx).map(|item| {
            item.map(|item| {
                let mut line = match item {
                    Ok(e) => serde_json::to_string(&*e).unwrap_or_default(),
                    Err(BroadcastStreamRecvError::Lagged(n)) => format!("{{\"missed\":{n}}}"),
                };
                line.push('\n');
                Ok(line)
            })
        })
    }
}
