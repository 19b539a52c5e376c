//! The operator's window into a running ldapsync: the opt-in HTTP listener
//! with `/metrics` (Prometheus), `/healthz` (the process is up) and
//! `/readyz` (listeners bound and at least one directory URL reachable).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::config::LdapUrl;
use crate::metrics::METRICS;

/// What `/readyz` answers from.
pub struct Readiness {
    listening: AtomicBool,
    upstream: Vec<LdapUrl>,
    probe_timeout: Duration,
}

impl Readiness {
    pub fn new(upstream: Vec<LdapUrl>, probe_timeout: Duration) -> Arc<Readiness> {
        Arc::new(Readiness {
            listening: AtomicBool::new(false),
            upstream,
            probe_timeout,
        })
    }

    /// The proxy's listeners are bound.
    pub fn set_listening(&self) {
        self.listening.store(true, Ordering::Release);
    }

    /// `Ok` with the reachable URL, or why ldapsync is not ready.
    async fn check(&self) -> Result<String, String> {
        if !self.listening.load(Ordering::Acquire) {
            return Err("listeners not bound yet".into());
        }
        let mut failures = Vec::new();
        for url in &self.upstream {
            match tokio::time::timeout(self.probe_timeout, TcpStream::connect(url.authority())).await {
                Ok(Ok(_)) => return Ok(url.to_string()),
                Ok(Err(e)) => failures.push(format!("{url}: {e}")),
                Err(_) => failures.push(format!("{url}: no answer")),
            }
        }
        Err(format!("no directory reachable: {}", failures.join("; ")))
    }
}

/// Binds the HTTP listener; fails at start rather than later.
pub async fn bind(addr: &str) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr} for metrics: {e}")))?;
    if let Ok(local) = listener.local_addr() {
        tracing::info!(metrics = %local, "serving /metrics, /healthz and /readyz over HTTP");
    }
    Ok(listener)
}

/// Serves `/metrics`, `/healthz` and `/readyz` until shutdown.
pub async fn serve(listener: TcpListener, readiness: Arc<Readiness>, shutdown: CancellationToken) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(readiness);
    let served = axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await });
    if let Err(e) = served.await {
        tracing::error!(error = %e, "the metrics listener failed");
    }
}

async fn metrics() -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        METRICS.encode(),
    )
}

async fn ready(State(readiness): State<Arc<Readiness>>) -> impl IntoResponse {
    match readiness.check().await {
        Ok(url) => (StatusCode::OK, format!("ready: {url} reachable\n")),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
    }
}
