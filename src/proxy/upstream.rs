//! Connections to the directory behind the proxy: TCP, `ldaps://`, or
//! StartTLS, tried URL by URL.

use std::time::Duration;

use futures_util::StreamExt;
use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use tokio_util::codec::FramedRead;

use super::Io;
use super::codec::PduCodec;
use super::message::{self, Envelope, Op, STARTTLS_OID};
use crate::config::LdapUrl;
use crate::metrics::{METRICS, UrlLabel};

/// Every configured directory URL failed; the message lists why, per URL.
#[derive(Debug, Error)]
#[error("no directory server reachable: {}", .attempts.iter().map(|(url, e)| format!("{url}: {e}")).collect::<Vec<_>>().join("; "))]
pub struct UnreachableError {
    attempts: Vec<(String, ConnectError)>,
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
}

/// How to reach the directory.
pub struct Route<'a> {
    pub urls: &'a [LdapUrl],
    pub connect_timeout: Duration,
    /// Set when any URL is `ldaps://` or `starttls` is on.
    pub tls: Option<&'a TlsConnector>,
    pub starttls: bool,
}

/// Connects to the first of the URLs that answers, in order, each within
/// the connect timeout (TLS handshake included).
pub async fn connect(route: &Route<'_>) -> Result<Box<dyn Io>, UnreachableError> {
    let mut attempts = Vec::with_capacity(route.urls.len());
    for (index, url) in route.urls.iter().enumerate() {
        let reason = match timeout(route.connect_timeout, connect_one(url, route)).await {
            Ok(Ok(stream)) => {
                if index > 0 {
                    METRICS.upstream_failovers.inc();
                }
                return Ok(stream);
            }
            Ok(Err(reason)) => reason,
            Err(_) => ConnectError::Timeout(route.connect_timeout),
        };
        tracing::warn!(%url, %reason, "directory unreachable");
        METRICS
            .upstream_connect_failures
            .get_or_create(&UrlLabel { url: url.to_string() })
            .inc();
        attempts.push((url.to_string(), reason));
    }
    Err(UnreachableError { attempts })
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
        _ => return Ok(Box::new(stream)),
    };
    let name = crate::tls::server_name(url.host())?;
    let stream = tls.connect(name, stream).await.map_err(ConnectError::Handshake)?;
    Ok(Box::new(stream))
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
