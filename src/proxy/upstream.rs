//! Connections to the directory behind the proxy.

use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::config::LdapUrl;

/// Every configured directory URL failed; the message lists why, per URL.
#[derive(Debug, Error)]
#[error("no directory server reachable: {}", .attempts.join("; "))]
pub struct UnreachableError {
    attempts: Vec<String>,
}

/// Connects to the first of `urls` that answers, in order, each within
/// `connect_timeout`.
pub async fn connect(urls: &[LdapUrl], connect_timeout: Duration) -> Result<TcpStream, UnreachableError> {
    let mut attempts = Vec::with_capacity(urls.len());
    for url in urls {
        let reason = match timeout(connect_timeout, TcpStream::connect(url.authority())).await {
            Ok(Ok(stream)) => {
                // Requests and responses are small and latency-bound.
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(%url, error = %e, "could not set TCP_NODELAY");
                }
                return Ok(stream);
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {}", humantime::format_duration(connect_timeout)),
        };
        tracing::warn!(%url, %reason, "directory unreachable");
        attempts.push(format!("{url}: {reason}"));
    }
    Err(UnreachableError { attempts })
}
