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
mod conformance;
mod event_loop;
mod limits;
pub mod message;
mod multiplex;
mod pool;
mod session;
mod threads;
mod upstream;
mod wake;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use rasn_ldap::ResultCode;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::config::{ClientTlsConfig, LdapUrl, Listener, ListenerMode, ProxyConfig};
use crate::metrics::METRICS;
use crate::throttle::Throttle;
use crate::tls::{self, ServerTls, TlsError};
pub use capture::{CaptureLoss, CaptureSink, CapturedWrite, LogSink, Opacity, WriteKind};
use codec::Budget;
use limits::AddressCounts;
pub use limits::FailedBinds;
use threads::SessionThreads;

/// A byte stream a session runs over: TCP, or TLS over TCP.
trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// The settings a session starts with. A reload (SIGHUP) swaps in new
/// ones for the sessions that start after it; open sessions keep theirs.
struct Settings {
    config: ProxyConfig,
    /// TLS towards the directory, when its URLs or `starttls` ask for it.
    upstream_tls: Option<TlsConnector>,
    /// Each upstream URL's (weight, tier).
    url_options: Vec<(usize, usize)>,
    /// The URLs a session whose TLS the directory ends may use: `ldap://`
    /// ones (StartTLS) first, then `ldaps://` ones.
    passthrough: [UrlSubset; 2],
}

/// Some of the upstream URLs, with their (weight, tier).
struct UrlSubset {
    urls: Vec<LdapUrl>,
    options: Vec<(usize, usize)>,
}

impl Settings {
    /// How this session's directory connection is chosen and opened.
    fn route(&self) -> upstream::Route<'_> {
        upstream::Route {
            urls: &self.config.upstream,
            connect_timeout: self.config.connect_timeout,
            tls: self.upstream_tls.as_ref(),
            starttls: self.config.upstream_tls.starttls,
            options: &self.url_options,
            balance: self.config.balance,
        }
    }

    /// How a session whose TLS the directory ends reaches it: over the
    /// `ldaps://` URLs (`ldaps`) or the `ldap://` ones, in plain TCP.
    fn passthrough_route(&self, ldaps: bool) -> upstream::Route<'_> {
        let subset = &self.passthrough[usize::from(ldaps)];
        upstream::Route {
            urls: &subset.urls,
            tls: None,
            starttls: false,
            options: &subset.options,
            ..self.route()
        }
    }

    fn new(config: ProxyConfig) -> Result<Settings, TlsError> {
        // A relayed session is the client's, never ldapsync's: it does not
        // present the connectors' certificate, or a SASL EXTERNAL bind (or
        // Active Directory's implicit certificate binding) would run the
        // client's operations as ldapsync's identity.
        let relay_tls = ClientTlsConfig {
            client_cert: None,
            client_key: None,
            ..config.upstream_tls.clone()
        };
        let upstream_tls = if relay_tls.starttls || config.upstream.iter().any(|u| u.is_ldaps()) {
            Some(tls::connector(tls::client_config(&relay_tls)?))
        } else {
            None
        };
        let url_options = config.url_options();
        let subset = |ldaps: bool| {
            let (urls, options) = config
                .upstream
                .iter()
                .zip(&url_options)
                .filter(|(url, _)| url.is_ldaps() == ldaps)
                .map(|(url, options)| (url.clone(), *options))
                .unzip();
            UrlSubset { urls, options }
        };
        let passthrough = [subset(false), subset(true)];
        Ok(Settings {
            config,
            upstream_tls,
            url_options,
            passthrough,
        })
    }
}

/// What every session of one proxy shares.
struct Shared {
    settings: RwLock<Arc<Settings>>,
    sink: Arc<dyn CaptureSink>,
    /// The listeners' certificate, for `ldaps://` and StartTLS.
    tls: Option<Arc<ServerTls>>,
    failed_binds: FailedBinds,
    /// Bytes of partly received requests, shared by every session.
    request_buffer: Arc<Budget>,
    /// Conformance mode's report, when it is on.
    conformance: Option<Arc<conformance::Report>>,
    /// For sessions ended by a directory that cannot be reached: a dead
    /// directory ends every session, and clients reconnect at will.
    directory_lost: Throttle,
    /// Which directory URLs are known down, and the sessions on each.
    pool: Arc<pool::Pool>,
    /// The shared connections of multiplexed listeners, when there are any.
    multiplexer: Option<Arc<multiplex::Multiplexer>>,
}

impl Shared {
    fn settings(&self) -> Arc<Settings> {
        Arc::clone(&self.settings.read().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Reloads a running proxy's settings (on SIGHUP). It does not keep the
/// proxy alive: the capture sink must go when the proxy stops, so that the
/// capture journal writer can finish.
pub struct Reloader(Weak<Shared>);

impl Reloader {
    /// New sessions use `config` from now on. Returns the keys that differ
    /// but only apply at restart (listeners, the connection limit, …).
    pub fn reload(&self, config: ProxyConfig) -> Result<Vec<&'static str>, TlsError> {
        let Some(shared) = self.0.upgrade() else {
            return Ok(Vec::new());
        };
        let old = shared.settings();
        let old = &old.config;
        let pending = [
            ("proxy.listen", old.listen != config.listen),
            ("proxy.max_connections", old.max_connections != config.max_connections),
            ("proxy.session_threads", old.session_threads != config.session_threads),
            (
                "proxy.max_request_buffer",
                old.max_request_buffer != config.max_request_buffer,
            ),
            (
                "proxy.max_failed_binds / failed_bind_window",
                (old.max_failed_binds, old.failed_bind_window) != (config.max_failed_binds, config.failed_bind_window),
            ),
            ("proxy.tls (paths)", old.tls != config.tls),
            (
                "conformance.report",
                old.conformance_report != config.conformance_report,
            ),
        ]
        .into_iter()
        .filter_map(|(key, changed)| changed.then_some(key))
        .collect();
        let settings = Settings::new(config)?;
        shared.pool.admit(&settings.config.upstream);
        *shared.settings.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(settings);
        Ok(pending)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot start the session threads: {0}")]
    Threads(std::io::Error),
    #[error("conformance report {path}: {source}")]
    Report { path: String, source: std::io::Error },
    #[error(transparent)]
    Multiplex(crate::config::ConfigError),
}

/// A listener as `ldapsync status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListenerState {
    pub url: String,
    pub addr: String,
    pub require_tls: bool,
}

/// A listening socket with its configuration.
pub struct BoundListener {
    socket: TcpListener,
    config: Arc<Listener>,
}

impl BoundListener {
    /// What `ldapsync status` shows of it.
    pub fn state(&self) -> ListenerState {
        ListenerState {
            url: self.config.url.to_string(),
            addr: self.socket.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            require_tls: self.config.require_tls,
        }
    }

    pub fn new(socket: TcpListener, config: Listener) -> BoundListener {
        BoundListener {
            socket,
            config: Arc::new(config),
        }
    }
}

/// A configured relay, ready to serve on listeners bound by the caller.
pub struct Proxy {
    shared: Arc<Shared>,
    connections: Arc<Semaphore>,
    /// The size of `connections` (set at start; a reload does not change it).
    max_connections: usize,
    /// For "connection refused" warnings, which a storm repeats per connection.
    refusals: Throttle,
    /// Failed accepts (out of descriptors), said once per interval.
    accept_failures: Throttle,
    addresses: Arc<AddressCounts>,
    next_session: AtomicU64,
    /// Where sessions run when `session_threads` is set.
    threads: Option<SessionThreads>,
}

impl Proxy {
    /// Loads the TLS material the configuration names.
    pub fn new(config: ProxyConfig, sink: Arc<dyn CaptureSink>) -> Result<Self, ProxyError> {
        let tls = config.tls.as_ref().map(ServerTls::load).transpose()?.map(Arc::new);
        let connections = Arc::new(Semaphore::new(config.max_connections));
        let config_max_connections = config.max_connections;
        let request_buffer = Arc::new(Budget::new(config.max_request_buffer));
        let failed_binds = FailedBinds::new(config.max_failed_binds, config.failed_bind_window);
        let conformance = match &config.conformance_report {
            Some(path) => Some(Arc::new(conformance::Report::create(path).map_err(|source| {
                ProxyError::Report {
                    path: path.display().to_string(),
                    source,
                }
            })?)),
            None => None,
        };
        if config.upstream_tls.client_cert.is_some() {
            info!(
                "proxy.upstream_tls.client_cert is the connectors' identity: relayed client sessions do not present it \
                 (a directory that demands client certificates needs tls = \"passthrough\" listeners)"
            );
        }
        let threads = config
            .session_threads
            .map(SessionThreads::start)
            .transpose()
            .map_err(ProxyError::Threads)?;
        let pool = Arc::new(pool::Pool::default());
        pool.admit(&config.upstream);
        let multiplexer = match &config.multiplex {
            Some(multiplex) if config.listen.iter().any(|l| l.mode == ListenerMode::Multiplexed) => {
                let password = multiplex.password().map_err(ProxyError::Multiplex)?;
                Some(Arc::new(multiplex::Multiplexer::new(
                    multiplex,
                    password,
                    config.max_upstream_pdu,
                )))
            }
            _ => None,
        };
        Ok(Proxy {
            shared: Arc::new(Shared {
                settings: RwLock::new(Arc::new(Settings::new(config)?)),
                sink,
                tls,
                failed_binds,
                request_buffer,
                conformance,
                directory_lost: Throttle::new(Duration::from_secs(10)),
                pool,
                multiplexer,
            }),
            connections,
            max_connections: config_max_connections,
            refusals: Throttle::new(Duration::from_secs(10)),
            accept_failures: Throttle::new(Duration::from_secs(10)),
            addresses: Arc::default(),
            next_session: AtomicU64::new(1),
            threads,
        })
    }

    /// Reloads settings while the proxy serves.
    pub fn reloader(&self) -> Reloader {
        Reloader(Arc::downgrade(&self.shared))
    }

    /// The listeners' certificate, to reload on SIGHUP.
    pub fn server_tls(&self) -> Option<Arc<ServerTls>> {
        self.shared.tls.clone()
    }

    /// Binds every configured listen URL.
    pub async fn bind(&self) -> std::io::Result<Vec<BoundListener>> {
        let mut listeners = Vec::new();
        for listener in &self.shared.settings().config.listen {
            let url = &listener.url;
            let socket = listen(&url.authority())
                .await
                .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {url}: {e}")))?;
            match socket.local_addr() {
                Ok(addr) => info!(
                    %url,
                    %addr,
                    require_tls = listener.require_tls,
                    tls = ?listener.tls,
                    "listening"
                ),
                Err(_) => info!(%url, "listening"),
            }
            listeners.push(BoundListener::new(socket, listener.clone()));
        }
        Ok(listeners)
    }

    /// Serves until `shutdown` is cancelled, then stops accepting and lets
    /// sessions finish their operations within the shutdown grace period.
    pub async fn serve(self, listeners: Vec<BoundListener>, shutdown: CancellationToken) {
        if let Some(threads) = &self.threads {
            threads.enter(&tokio::runtime::Handle::current());
        }
        let this = Arc::new(self);
        let sessions = TaskTracker::new();
        let shared = Arc::clone(&this.shared);
        sessions.spawn(upstream::probe_urls(
            Arc::clone(&this.shared.pool),
            move || shared.settings(),
            shutdown.clone(),
        ));
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
        listener: &BoundListener,
        sessions: &TaskTracker,
        shutdown: &CancellationToken,
    ) {
        loop {
            let (stream, peer) = match listener.socket.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Typically out of file descriptors: back off rather than
                    // spin, and say so once per interval while it lasts.
                    METRICS.accept_failures.inc();
                    if let Some(held_back) = self.accept_failures.allow() {
                        warn!(error = %e, held_back, "accept failed");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let settings = self.shared.settings();
            let limit_per_address = settings.config.max_connections_per_address;
            // The last tenth of the slots is kept for addresses with few
            // connections open: a handful of busy (or hostile) addresses
            // cannot take every slot and lock everyone else out.
            let reserved = self.connections.available_permits() <= self.max_connections / RESERVED_SHARE
                && self.addresses.count(peer.ip()) >= FEW_CONNECTIONS;
            let permit = match Arc::clone(&self.connections).try_acquire_owned() {
                Ok(permit) if !reserved => permit,
                _ => {
                    if let Some(held_back) = self.refusals.allow() {
                        warn!(%peer, limit = self.max_connections, held_back, "connection refused: too many connections");
                    }
                    sessions.spawn(refuse(stream, &listener.config, "ldapsync: too many connections"));
                    continue;
                }
            };
            let Some(slot) = self.addresses.admit(peer.ip(), limit_per_address) else {
                if let Some(held_back) = self.refusals.allow() {
                    warn!(%peer, limit = limit_per_address, held_back, "connection refused: too many connections from this address");
                }
                sessions.spawn(refuse(
                    stream,
                    &listener.config,
                    "ldapsync: too many connections from your address",
                ));
                continue;
            };
            if let Err(e) = stream.set_nodelay(true) {
                debug!(error = %e, "could not set TCP_NODELAY");
            }
            let accepted = session::Accepted {
                id: self.next_session.fetch_add(1, Ordering::Relaxed),
                peer,
                permit,
                slot,
            };
            let shared = Arc::clone(&self.shared);
            let shutdown = shutdown.clone();
            let config = Arc::clone(&listener.config);
            let session = move |stream| session::run(accepted, stream, config, shared, settings, shutdown);
            match &self.threads {
                Some(threads) => threads.spawn(sessions, stream, session),
                // Built in the task, not here: the accept loop takes the
                // next connection sooner (a storm of them waits on it).
                None => drop(sessions.spawn(async move { session(Box::new(stream)).await })),
            }
        }
    }
}

/// Tells a connection over a limit why it is closed (on `ldaps://`, where a
/// plain-text notice would be garbage, it is just closed).
fn refuse(mut stream: TcpStream, listener: &Listener, why: &'static str) -> impl Future<Output = ()> + use<> {
    let tls = listener.url.is_ldaps();
    async move {
        if !tls {
            let notice = message::notice_of_disconnection(ResultCode::Unavailable, why);
            let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&notice)).await;
        }
        let _ = stream.shutdown().await;
    }
}

/// One slot in this many is kept for addresses with fewer than
/// `FEW_CONNECTIONS` open (see `accept_loop`).
const RESERVED_SHARE: usize = 10;
const FEW_CONNECTIONS: usize = 4;

/// Connections the kernel queues before ldapsync accepts them (capped by
/// net.core.somaxconn). The usual default of 128 made a storm of 1,000
/// clients wait a second each for SYN retransmissions; slapd uses 2,048.
const LISTEN_BACKLOG: u32 = 2048;

/// Binds `authority` (host:port) and listens, on the first address that works.
async fn listen(authority: &str) -> std::io::Result<TcpListener> {
    let mut last = None;
    for addr in tokio::net::lookup_host(authority).await? {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }?;
        // A restarted ldapsync rebinds at once despite connections in TIME_WAIT.
        socket.set_reuseaddr(true)?;
        match socket.bind(addr).and_then(|()| socket.listen(LISTEN_BACKLOG)) {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "the name has no address")))
}
