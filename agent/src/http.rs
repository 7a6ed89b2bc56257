//! The HTTP endpoints: /metrics, /healthz, /readyz.

use std::{future::Future, sync::Arc};

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::{dataplane::Views, metrics, registry::Health};

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone)]
pub struct HttpState {
    pub registry: Arc<Registry>,
    pub views: Views,
    /// Fleet registration's state, when configured.
    pub fleet: Option<tokio::sync::watch::Receiver<Health>>,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

pub async fn serve(
    listener: TcpListener,
    state: HttpState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// OpenMetrics for clients that ask for it (Prometheus does), the classic text format otherwise.
async fn metrics_handler(State(s): State<HttpState>, headers: HeaderMap) -> impl IntoResponse {
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

async fn readyz(State(s): State<HttpState>) -> impl IntoResponse {
    let mut readiness = s.views.readiness();
    // Shown, but readiness is the data plane's: etcd trouble does not stop traffic.
    if let Some(r) = &s.fleet {
        readiness.components.push(r.borrow().component());
    }
    let code = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(readiness))
}
