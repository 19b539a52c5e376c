//! The operator's window into a running ldapsync: the opt-in HTTP listener
//! with `/metrics` (Prometheus), `/healthz` (the process is up) and
//! `/readyz` (listeners bound and at least one directory URL answering a
//! root DSE read within the connect timeout: a frozen directory accepts
//! TCP connections but answers nothing),
//! and the owner-only admin socket `ldapsync status` reads the running
//! instance's state from.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use ldap3::{LdapConnAsync, LdapConnSettings, Scope};

use crate::config::{ConnectorConfig, LdapUrl, ProxyConfig};
use crate::metrics::{ConnectorLabel, METRICS, UrlLabel};
use crate::proxy::ListenerState;
use crate::tls::{self, TlsError};

/// The running instance, as `/readyz` and the admin socket report it.
pub struct Running {
    started_at: String,
    listeners: Mutex<Vec<ListenerState>>,
    /// The connectors' settings the workers run with (not the file's).
    connectors: Mutex<Vec<RunningConnector>>,
    /// What readiness probes: the relay's directory, as last (re)loaded.
    probe: Mutex<Arc<Probe>>,
}

/// The directory URLs readiness probes, and how.
struct Probe {
    upstream: Vec<LdapUrl>,
    timeout: Duration,
    /// TLS towards the directory, as the relay uses it.
    tls: Option<Arc<rustls::ClientConfig>>,
    starttls: bool,
}

impl Probe {
    /// An anonymous read of the root DSE, as a client's first search would
    /// be, within the probe timeout.
    async fn probe_one(&self, url: &LdapUrl) -> Result<(), String> {
        let mut settings = LdapConnSettings::new().set_conn_timeout(self.timeout);
        if let Some(tls) = &self.tls {
            settings = settings
                .set_config(Arc::clone(tls))
                .set_starttls(self.starttls && !url.is_ldaps());
        }
        let read = async {
            let (conn, mut ldap) = LdapConnAsync::with_settings(settings, &url.to_string())
                .await
                .map_err(|e| e.to_string())?;
            ldap3::drive!(conn);
            let result = ldap.search("", Scope::Base, "(objectClass=*)", vec!["1.1"]).await;
            let _ = ldap.unbind().await;
            result.and_then(|r| r.success()).map(|_| ()).map_err(|e| e.to_string())
        };
        match tokio::time::timeout(self.timeout, read).await {
            Ok(result) => result,
            Err(_) => Err(format!(
                "no answer to a root DSE read within {}",
                humantime::format_duration(self.timeout)
            )),
        }
    }

    fn new(proxy: &ProxyConfig) -> Result<Probe, TlsError> {
        let tls = proxy.upstream_tls.starttls || proxy.upstream.iter().any(|u| u.is_ldaps());
        Ok(Probe {
            upstream: proxy.upstream.clone(),
            timeout: proxy.connect_timeout,
            tls: tls.then(|| tls::client_config(&proxy.upstream_tls)).transpose()?,
            starttls: proxy.upstream_tls.starttls,
        })
    }
}

/// A connector's policy as its running worker applies it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningConnector {
    pub name: String,
    pub direction: String,
    pub conflict: String,
    pub delete: String,
    pub poll_interval: String,
}

impl From<&ConnectorConfig> for RunningConnector {
    fn from(c: &ConnectorConfig) -> Self {
        RunningConnector {
            name: c.name.clone(),
            direction: c.direction.to_string(),
            conflict: c.conflict_policy().to_string(),
            delete: c.delete.as_str().to_owned(),
            poll_interval: humantime::format_duration(c.poll_interval).to_string(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpstreamState {
    pub url: String,
    /// What a probe made for this answer saw.
    pub reachable: bool,
    pub error: Option<String>,
    /// What new sessions see: false while the URL is known down (they try
    /// it after all the others).
    #[serde(default)]
    pub up: bool,
    /// Sessions connected to it.
    #[serde(default)]
    pub sessions: i64,
}

/// What the admin socket answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunningState {
    pub pid: u32,
    pub started_at: String,
    pub listeners: Vec<ListenerState>,
    pub upstream: Vec<UpstreamState>,
    pub sessions_open: i64,
    /// Since when writes to the store fail (RFC 3339), if they do. The
    /// relay goes on; captures wait for a full comparison.
    #[serde(default)]
    pub store_unwritable_since: Option<String>,
    #[serde(default)]
    pub connectors: Vec<RunningConnector>,
}

impl Running {
    pub fn new(proxy: &ProxyConfig) -> Result<Arc<Running>, TlsError> {
        Ok(Arc::new(Running {
            started_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            listeners: Mutex::default(),
            connectors: Mutex::default(),
            probe: Mutex::new(Arc::new(Probe::new(proxy)?)),
        }))
    }

    /// Readiness probes the directory URLs of a reloaded configuration.
    pub fn set_upstream(&self, proxy: &ProxyConfig) -> Result<(), TlsError> {
        *self.probe.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(Probe::new(proxy)?);
        Ok(())
    }

    /// The workers run with these settings (at start, after a reload).
    pub fn set_connectors(&self, connectors: Vec<RunningConnector>) {
        *self.connectors.lock().unwrap_or_else(|e| e.into_inner()) = connectors;
    }

    /// The proxy's listeners are bound.
    pub fn set_listening(&self, listeners: Vec<ListenerState>) {
        *self.listeners.lock().unwrap_or_else(|e| e.into_inner()) = listeners;
    }

    async fn probe(&self) -> Vec<UpstreamState> {
        let probe = Arc::clone(&self.probe.lock().unwrap_or_else(|e| e.into_inner()));
        let mut states = Vec::new();
        for url in &probe.upstream {
            let error = probe.probe_one(url).await.err();
            let label = UrlLabel { url: url.to_string() };
            states.push(UpstreamState {
                url: url.to_string(),
                reachable: error.is_none(),
                error,
                up: METRICS.upstream_up.get_or_create(&label).get() == 1,
                sessions: METRICS.upstream_sessions.get_or_create(&label).get(),
            });
        }
        states
    }

    /// `Ok` with the reachable URL, or why ldapsync is not ready.
    async fn check(&self) -> Result<String, String> {
        if self.listeners.lock().unwrap_or_else(|e| e.into_inner()).is_empty() {
            return Err("listeners not bound yet".into());
        }
        let states = self.probe().await;
        match states.iter().find(|s| s.reachable) {
            Some(up) => Ok(up.url.clone()),
            None => {
                let failures: Vec<String> = states
                    .iter()
                    .map(|s| format!("{}: {}", s.url, s.error.as_deref().unwrap_or_default()))
                    .collect();
                Err(format!("no directory reachable: {}", failures.join("; ")))
            }
        }
    }

    pub async fn state(&self) -> RunningState {
        let listeners = self.listeners.lock().unwrap_or_else(|e| e.into_inner()).clone();
        RunningState {
            pid: std::process::id(),
            started_at: self.started_at.clone(),
            listeners,
            upstream: self.probe().await,
            sessions_open: METRICS.sessions_open.get(),
            store_unwritable_since: store_unwritable_since(),
            connectors: self.connectors.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        }
    }
}

/// The admin socket, bound owner-only before the proxy says it listens, so
/// that `status` run right after the start finds it. Dropping it removes
/// the socket file, whether it was served or the start failed after it.
pub struct AdminSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl Drop for AdminSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds the admin socket; `None` (said in the log) when it cannot be
/// bound: `status` then reads the database only.
pub fn bind_socket(path: PathBuf) -> Option<AdminSocket> {
    // A socket left by a killed instance would make bind fail.
    let _ = std::fs::remove_file(&path);
    let listener = match UnixListener::bind(&path) {
        Ok(listener) => listener,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "no admin socket; status reads the database only");
            return None;
        }
    };
    if let Err(e) = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)) {
        tracing::warn!(path = %path.display(), error = %e, "cannot make the admin socket owner-only");
    }
    Some(AdminSocket { listener, path })
}

/// Serves the running state as one JSON document per connection on the
/// admin socket until shutdown.
pub async fn serve_socket(socket: AdminSocket, running: Arc<Running>, shutdown: CancellationToken) {
    loop {
        let (mut stream, _) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = socket.listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => continue,
            },
        };
        let running = Arc::clone(&running);
        tokio::spawn(async move {
            let state = serde_json::to_vec(&running.state().await).expect("state serializes");
            let _ = stream.write_all(&state).await;
        });
    }
}

/// The running instance's state, if one answers on `path`.
pub async fn query_socket(path: &Path) -> Option<RunningState> {
    let mut stream = UnixStream::connect(path).await.ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    serde_json::from_slice(&buf).ok()
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

fn store_unwritable_since() -> Option<String> {
    METRICS.store_unwritable_at().map(|at| {
        let at = std::time::UNIX_EPOCH + Duration::from_secs(at.unsigned_abs());
        humantime::format_rfc3339_seconds(at).to_string()
    })
}

/// Serves `/metrics`, `/healthz` and `/readyz` until shutdown.
pub async fn serve(listener: TcpListener, readiness: Arc<Running>, shutdown: CancellationToken) {
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

async fn ready(State(readiness): State<Arc<Running>>) -> impl IntoResponse {
    match readiness.check().await {
        // The relay needs neither the store nor the connectors: ready, and
        // saying what is degraded.
        Ok(url) => {
            let mut said = format!("ready: {url} reachable");
            if let Some(since) = store_unwritable_since() {
                said.push_str(&format!("; store unwritable since {since}"));
            }
            for connector in readiness.connectors.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                let label = ConnectorLabel {
                    connector: connector.name.clone(),
                };
                let held = METRICS.deletes_held.get(&label).map_or(0, |g| g.get());
                if held > 0 {
                    said.push_str(&format!("; connector {} degraded: {held} deletes held", connector.name));
                }
                if METRICS.out_of_sync.get(&label).is_some_and(|g| g.get() > 0) {
                    let restarts = METRICS.worker_restarts.get(&label).map_or(0, |c| c.get());
                    said.push_str(&format!(
                        "; connector {} degraded: out of sync, a full comparison follows ({restarts} worker restarts)",
                        connector.name
                    ));
                }
            }
            (StatusCode::OK, format!("{said}\n"))
        }
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
    }
}
