//! The admin server: its socket (HTTP, or HTTPS with `admin.tls`), the
//! API's and the console's routes together, and the background work that
//! goes with them (the feed's pruning, webhook deliveries).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::state::AdminState;
use super::{api, console};
use crate::config::{AdminConfig, Config};
use crate::store;
use crate::tls::ServerTls;

/// The admin server's listening socket, with the TLS it serves when configured.
pub struct Bound {
    tcp: TcpListener,
    tls: Option<TlsAcceptor>,
}

/// Binds `admin.listen` now, so that a taken port or a broken certificate
/// fails the start.
pub async fn bind(admin: &AdminConfig) -> Result<Option<Bound>, ApiError> {
    let Some(listen) = &admin.listen else {
        return Ok(None);
    };
    let tls = match &admin.tls {
        Some(paths) => Some(ServerTls::load(paths)?.acceptor()),
        None => None,
    };
    let tcp = TcpListener::bind(listen).await.map_err(|source| ApiError::Bind {
        listen: listen.clone(),
        source,
    })?;
    if let Ok(addr) = tcp.local_addr() {
        info!(%addr, https = tls.is_some(), "admin API and console listening");
    }
    Ok(Some(Bound { tcp, tls }))
}

/// Why the API cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("admin.listen {listen}: {source}")]
    Bind { listen: String, source: std::io::Error },
    #[error("admin.tls: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// TLS connections, handshaken apart from one another (a slow client
/// holds up no one), at most `HANDSHAKES` at once, each within the
/// proxy's handshake timeout.
struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    addr: SocketAddr,
}

const HANDSHAKES: usize = 256;

impl TlsListener {
    fn start(tcp: TcpListener, acceptor: TlsAcceptor, handshake_timeout: Duration) -> std::io::Result<TlsListener> {
        let addr = tcp.local_addr()?;
        let (done, ready) = mpsc::channel(HANDSHAKES);
        let slots = Arc::new(Semaphore::new(HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                    return;
                };
                let (stream, peer) = match tcp.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        debug!(error = %e, "admin server: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (acceptor, handed) = (acceptor.clone(), done.clone());
                tokio::spawn(async move {
                    let _slot = slot;
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = handed.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => debug!(%peer, error = %e, "admin server: TLS handshake failed"),
                        Err(_) => debug!(%peer, "admin server: no TLS handshake within the timeout"),
                    }
                });
                if done.is_closed() {
                    return;
                }
            }
        });
        Ok(TlsListener { ready, addr })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // The acceptor is gone only when the runtime stops.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

/// The client's address, for the failed-login limiter, over TCP or TLS.
#[derive(Clone, Copy)]
pub struct Peer(pub SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TcpListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TcpListener>) -> Peer {
        Peer(*stream.remote_addr())
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Peer {
        Peer(*stream.remote_addr())
    }
}

/// Serves the API and the console on `bound` until `shutdown`.
pub async fn serve(bound: Bound, config: Config, shutdown: CancellationToken) {
    let store = match tokio::task::spawn_blocking({
        let settings = config.store.clone();
        move || store::open(&settings)
    })
    .await
    {
        Ok(Ok(store)) => store,
        Ok(Err(e)) => return warn!(error = %e, "admin server: the store cannot be opened; the server is off"),
        Err(e) => return warn!(error = %e, "admin server: opening the store failed"),
    };
    let max_body = config.admin.max_body;
    let handshake_timeout = config.proxy.handshake_timeout;
    let state = Arc::new(AdminState::new(config, store));
    let app = api::router()
        .merge(console::router())
        .with_state(state)
        .layer(DefaultBodyLimit::max(max_body))
        .into_make_service_with_connect_info::<Peer>();
    let stop = async move { shutdown.cancelled().await };
    let served = match bound.tls {
        None => axum::serve(bound.tcp, app).with_graceful_shutdown(stop).await,
        Some(acceptor) => match TlsListener::start(bound.tcp, acceptor, handshake_timeout) {
            Ok(listener) => axum::serve(listener, app).with_graceful_shutdown(stop).await,
            Err(e) => Err(e),
        },
    };
    if let Err(e) = served {
        warn!(error = %e, "admin server stopped");
    }
}
