//! Several instances on one PostgreSQL store: each registers itself and
//! keeps a heartbeat; every instance relays and captures, but each
//! connector is synced by one instance at a time, the holder of its lease.
//!
//! A lease is a row with a holder, a token and an expiry (`store.lease_ttl`,
//! 10 s by default), renewed every third of it. An instance that dies, or
//! is cut off or paused past the expiry, loses it: another takes it with a
//! new token, and every write of a worker checks its token in the write's
//! own transaction (see `store::postgres`), so the old holder can write
//! nothing after that, even if it wakes up mid-pass. No consensus of our
//! own: PostgreSQL's transactions decide.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::metrics::{ConnectorLabel, METRICS};
use crate::store::postgres::{Fence, Instance};
use crate::store::{PostgresStore, StoreError, now};

/// This process, as the registry shows it.
pub fn this_instance(config: &Config) -> Instance {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    let pid = std::process::id();
    let started_at = now();
    Instance {
        id: format!("{host}/{pid}/{started_at}"),
        host,
        pid: i64::from(pid),
        listeners: config
            .proxy
            .listen
            .iter()
            .map(|l| l.url.to_string())
            .collect::<Vec<_>>()
            .join(" "),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        started_at,
        heartbeat_age: 0,
    }
}

/// The store calls block (on the network): off the runtime's threads.
async fn blocking<T: Send + 'static>(
    store: &Arc<PostgresStore>,
    f: impl FnOnce(&PostgresStore) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let store = Arc::clone(store);
    tokio::task::spawn_blocking(move || f(&store))
        .await
        .unwrap_or_else(|e| Err(StoreError::Config(format!("store call failed: {e}"))))
}

/// Registers this instance and refreshes its heartbeat until shutdown,
/// then removes it.
pub async fn heartbeat(store: Arc<PostgresStore>, instance: Instance, ttl: Duration, shutdown: CancellationToken) {
    let mut failing = false;
    loop {
        let me = instance.clone();
        match blocking(&store, move |s| s.heartbeat(&me)).await {
            Ok(()) => failing = false,
            Err(e) if !failing => {
                warn!(error = %e, "cannot refresh this instance's heartbeat in the store");
                failing = true;
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(ttl / 3) => {}
        }
    }
    let id = instance.id.clone();
    let _ = blocking(&store, move |s| s.deregister(&id)).await;
}

/// A connector's lease, held: `lost` is cancelled when it can no longer be
/// renewed in time (or at shutdown), and the worker stops.
pub struct Held {
    pub fence: Fence,
    pub lost: CancellationToken,
}

/// Waits until this instance holds the connector's lease (or shuts down),
/// then keeps renewing it in the background.
pub async fn hold(
    store: &Arc<PostgresStore>,
    connector: &str,
    holder: &str,
    ttl: Duration,
    shutdown: &CancellationToken,
) -> Option<Held> {
    let label = ConnectorLabel {
        connector: connector.to_owned(),
    };
    let mut said = false;
    loop {
        let (c, h) = (connector.to_owned(), holder.to_owned());
        match blocking(store, move |s| s.acquire_lease(&c, &h, ttl)).await {
            Ok(Some(fence)) => {
                info!(
                    token = fence.token,
                    "this instance holds the connector's lease; it syncs it"
                );
                METRICS.lease_held.get_or_create(&label).set(1);
                METRICS.leases_acquired.get_or_create(&label).inc();
                let lost = shutdown.child_token();
                tokio::spawn(renew(Arc::clone(store), fence.clone(), ttl, lost.clone(), label));
                return Some(Held { fence, lost });
            }
            Ok(None) if !said => {
                info!("another instance holds the connector's lease; this one relays and captures");
                said = true;
            }
            Ok(None) => {}
            Err(e) => warn!(error = %e, "cannot read the connector's lease"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(ttl / 3) => {}
        }
    }
}

/// Renews every third of the lease's time. A renewal refused means another
/// instance took over; renewals failing for as long as the lease lasts
/// mean it may have: either way the worker stops. At shutdown the lease is
/// given up, for another instance to take at once.
async fn renew(store: Arc<PostgresStore>, fence: Fence, ttl: Duration, lost: CancellationToken, label: ConnectorLabel) {
    let mut renewed_at = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = lost.cancelled() => break,
            _ = tokio::time::sleep(ttl / 3) => {}
        }
        let f = fence.clone();
        match blocking(&store, move |s| s.renew_lease(&f, ttl)).await {
            Ok(true) => renewed_at = tokio::time::Instant::now(),
            Ok(false) => {
                warn!("the connector's lease was taken over by another instance; this one stops syncing it");
                lost.cancel();
                break;
            }
            // A margin of a third: the worker stops before the lease ends.
            Err(e) if renewed_at.elapsed() >= ttl * 2 / 3 => {
                warn!(error = %e, "the connector's lease could not be renewed in time; this instance stops syncing it");
                lost.cancel();
                break;
            }
            Err(e) => warn!(error = %e, "cannot renew the connector's lease; trying again"),
        }
    }
    METRICS.lease_held.get_or_create(&label).set(0);
    let f = fence.clone();
    let _ = blocking(&store, move |s| s.release_lease(&f)).await;
}
