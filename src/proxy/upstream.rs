//! Connections to the directory behind the proxy: TCP, `ldaps://`, or
//! StartTLS, tried URL by URL in the pool's order, and the health probes
//! of every URL (down ones with back-off, up ones every `health_interval`).

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use super::codec::PduCodec;
use super::event_loop::socket;
use super::message::{self, Envelope, Op, STARTTLS_OID};
use super::pool::{Pool, Slot};
use super::{Io, Settings};
use crate::config::{Balance, LdapUrl};
use crate::metrics::{METRICS, UrlLabel};

/// Every configured directory URL failed; the message lists why, per URL.
#[derive(Debug, Error)]
#[error("no directory server reachable: {}", .attempts.iter().map(|(url, e)| format!("{url}: {e}")).collect::<Vec<_>>().join("; "))]
pub struct UnreachableError {
    attempts: Vec<(String, ConnectError)>,
}

impl UnreachableError {
    /// A URL that answered but refused what it was asked.
    pub fn refused(url: &str, why: String) -> UnreachableError {
        UnreachableError {
            attempts: vec![(url.to_owned(), ConnectError::Probe(why))],
        }
    }
}

/// Why one directory URL could not be used.
#[derive(Debug, Error)]
pub enum ConnectError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("no answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("TLS handshake failed: {0}")]
    Handshake(std::io::Error),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("StartTLS: {0}")]
    StartTls(String),
    #[error("{0}")]
    Probe(String),
}

/// How to reach the directory.
pub struct Route<'a> {
    pub urls: &'a [LdapUrl],
    pub connect_timeout: Duration,
    /// Set when any URL is `ldaps://` or `starttls` is on; unset, every
    /// URL is connected in plain TCP (so an `ldaps://` one carries the
    /// client's own TLS, passed through).
    pub tls: Option<&'a TlsConnector>,
    pub starttls: bool,
    /// Each URL's (weight, tier), as `urls`.
    pub options: &'a [(usize, usize)],
    pub balance: Balance,
}

/// Connects to the first of the URLs that answers, each within the
/// connect timeout (TLS handshake included), in the order `pool` gives
/// (those known down last, so that a dead URL costs a session its timeout
/// only when nothing else answers); the session holds the slot it took.
pub async fn connect(route: &Route<'_>, pool: &Arc<Pool>) -> Result<(Box<dyn Io>, Slot), UnreachableError> {
    let mut attempts = Vec::with_capacity(route.urls.len());
    for url in pool.order(route.urls, route.options, route.balance) {
        let reason = match timeout(route.connect_timeout, connect_one(url, route)).await {
            Ok(Ok(stream)) => {
                if route.urls.first() != Some(url) {
                    METRICS.upstream_failovers.inc();
                }
                // A TCP connect to an ldaps:// URL for a passthrough says
                // nothing of its TLS, which the probe checks.
                if !(url.is_ldaps() && route.tls.is_none()) {
                    pool.answered(url);
                }
                return Ok((stream, pool.take(url)));
            }
            Ok(Err(reason)) => reason,
            Err(_) => ConnectError::Timeout(route.connect_timeout),
        };
        METRICS
            .upstream_connect_failures
            .get_or_create(&UrlLabel { url: url.to_string() })
            .inc();
        pool.failed(url, &reason);
        attempts.push((url.to_string(), reason));
    }
    Err(UnreachableError { attempts })
}

/// Whether `url` serves LDAP: connected as sessions connect, an anonymous
/// read of the root DSE answered with success, all within the connect
/// timeout.
pub async fn probe(url: &LdapUrl, route: &Route<'_>) -> Result<(), ConnectError> {
    let read = async {
        let mut stream = connect_one(url, route).await?;
        stream.write_all(&message::root_dse_search(1)).await?;
        let mut frames = FramedRead::new(stream, PduCodec::new(1024 * 1024));
        while let Some(frame) = frames.next().await {
            let pdu = frame.map_err(|e| ConnectError::Probe(format!("its answer: {e}")))?;
            let env = Envelope::peek(&pdu).map_err(|e| ConnectError::Probe(format!("its answer: {e}")))?;
            if env.op == Op::SearchDone {
                return match env.result_code(&pdu) {
                    Some(0) => Ok(()),
                    code => Err(ConnectError::Probe(format!("root DSE read: result code {code:?}"))),
                };
            }
        }
        Err(ConnectError::Probe("closed before answering the root DSE read".into()))
    };
    timeout(route.connect_timeout, read)
        .await
        .unwrap_or(Err(ConnectError::Timeout(route.connect_timeout)))
}

async fn connect_one(url: &LdapUrl, route: &Route<'_>) -> Result<Box<dyn Io>, ConnectError> {
    let mut stream = TcpStream::connect(url.authority()).await?;
    // Requests and responses are small and latency-bound.
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(%url, error = %e, "could not set TCP_NODELAY");
    }
    let tls = match route.tls {
        Some(tls) if url.is_ldaps() => tls,
        Some(tls) if route.starttls => {
            start_tls(&mut stream).await?;
            tls
        }
        _ => return Ok(socket::adopt(stream)?),
    };
    let stream = socket::adopt(stream)?;
    let name = crate::tls::server_name(url.host())?;
    let stream = tls.connect(name, stream).await.map_err(ConnectError::Handshake)?;
    Ok(Box::new(stream))
}

/// How often the prober looks for URLs whose probe is due.
const PROBE_TICK: Duration = Duration::from_millis(250);

/// Probes the URLs of the current settings as the pool says they are due
/// (down ones with back-off, up ones every `health_interval`), together,
/// until `shutdown`: those that answer are up, the others down.
pub async fn probe_urls(pool: Arc<Pool>, settings: impl Fn() -> Arc<Settings>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(PROBE_TICK) => {}
        }
        let settings = settings();
        let route = settings.route();
        pool.retain(route.urls);
        let due = pool.due(route.urls, settings.config.health_interval);
        let probes = due.into_iter().map(|url| {
            let route = &route;
            async move {
                let started = tokio::time::Instant::now();
                (url, probe(url, route).await, started.elapsed())
            }
        });
        for (url, answer, took) in futures_util::future::join_all(probes).await {
            METRICS
                .upstream_probe_seconds
                .get_or_create(&UrlLabel { url: url.to_string() })
                .set(took.as_secs_f64());
            match answer {
                Ok(()) => pool.answered(url),
                Err(reason) => pool.failed(url, &reason),
            }
        }
    }
}

/// Asks the directory for StartTLS before anything of the client's is sent
/// (so the message id cannot clash with one of the client's).
async fn start_tls(stream: &mut TcpStream) -> Result<(), ConnectError> {
    stream.write_all(&message::extended_request(1, STARTTLS_OID)).await?;
    // Read exactly the response: the TLS handshake follows on this socket.
    let mut frames = FramedRead::new(&mut *stream, PduCodec::new(64 * 1024));
    let response = frames
        .next()
        .await
        .ok_or_else(|| ConnectError::StartTls("the directory closed the connection after StartTLS".into()))?
        .map_err(|e| ConnectError::StartTls(format!("its response: {e}")))?;
    if !frames.read_buffer().is_empty() {
        return Err(ConnectError::StartTls(
            "the directory sent data after its StartTLS response".into(),
        ));
    }
    let env = Envelope::peek(&response).map_err(|e| ConnectError::StartTls(format!("its response: {e}")))?;
    match (env.op, env.result_code(&response)) {
        (Op::ExtendedResponse, Some(0)) => Ok(()),
        (_, code) => Err(ConnectError::StartTls(format!(
            "the directory refused it (result code {code:?})"
        ))),
    }
}
