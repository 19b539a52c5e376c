//! The LDAP relay: listeners, sessions, and the hand-off of successful
//! writes to the capture sink.
//!
//! PDUs are framed by their BER tag and length and relayed as the original
//! bytes in both directions; only the envelope (message id, operation) is
//! read, plus the few things the relay must understand itself. See
//! `session` for how a connection is served.

mod ber;
pub mod capture;
pub mod codec;
pub mod message;
mod session;
mod upstream;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rasn_ldap::ResultCode;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::ProxyConfig;
pub use capture::{CaptureLoss, CaptureSink, CapturedWrite, LogSink, WriteKind};

/// What every session of one proxy shares.
struct Shared {
    config: ProxyConfig,
    sink: Arc<dyn CaptureSink>,
}

/// A configured relay, ready to serve on listeners bound by the caller.
pub struct Proxy {
    shared: Arc<Shared>,
    connections: Arc<Semaphore>,
    next_session: AtomicU64,
}

impl Proxy {
    pub fn new(config: ProxyConfig, sink: Arc<dyn CaptureSink>) -> Self {
        let connections = Arc::new(Semaphore::new(config.max_connections));
        Proxy {
            shared: Arc::new(Shared { config, sink }),
            connections,
            next_session: AtomicU64::new(1),
        }
    }

    /// Binds every configured listen URL.
    pub async fn bind(&self) -> std::io::Result<Vec<TcpListener>> {
        let mut listeners = Vec::new();
        for url in &self.shared.config.listen {
            let listener = TcpListener::bind(url.authority())
                .await
                .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {url}: {e}")))?;
            match listener.local_addr() {
                Ok(addr) => info!(%url, %addr, "listening"),
                Err(_) => info!(%url, "listening"),
            }
            listeners.push(listener);
        }
        Ok(listeners)
    }

    /// Serves until `shutdown` is cancelled, then stops accepting and lets
    /// sessions finish their operations within the shutdown grace period.
    pub async fn serve(self, listeners: Vec<TcpListener>, shutdown: CancellationToken) {
        let this = Arc::new(self);
        let sessions = TaskTracker::new();
        for listener in listeners {
            let this = Arc::clone(&this);
            let sessions_for_loop = sessions.clone();
            let shutdown = shutdown.clone();
            sessions.spawn(async move {
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = this.accept_loop(&listener, &sessions_for_loop, &shutdown) => {}
                }
            });
        }
        shutdown.cancelled().await;
        info!("shutting down: no new connections; finishing operations in flight");
        sessions.close();
        sessions.wait().await;
        info!("all sessions closed");
    }

    async fn accept_loop(
        self: &Arc<Self>,
        listener: &TcpListener,
        sessions: &TaskTracker,
        shutdown: &CancellationToken,
    ) {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Typically out of file descriptors: back off rather than spin.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&self.connections).try_acquire_owned() else {
                warn!(%peer, limit = self.shared.config.max_connections, "connection refused: too many connections");
                sessions.spawn(refuse(stream));
                continue;
            };
            let id = self.next_session.fetch_add(1, Ordering::Relaxed);
            let shared = Arc::clone(&self.shared);
            let shutdown = shutdown.clone();
            sessions.spawn(async move {
                session::run(id, stream, shared, shutdown).await;
                drop(permit);
            });
        }
    }
}

/// Tells a connection over the limit why it is closed.
async fn refuse(mut stream: TcpStream) {
    let notice = message::notice_of_disconnection(ResultCode::Unavailable, "ldapsync: too many connections");
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&notice)).await;
    let _ = stream.shutdown().await;
}
