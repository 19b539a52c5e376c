//! Runs the configured connectors while `ldapsync serve` relays: each
//! connector's worker applies the writes the proxy captured as they come,
//! and a full pass at start, every poll interval, and whenever a capture
//! could not be handled precisely (a delete, a full queue, an unreadable
//! request). The full pass is the safety net that makes a lost capture
//! harmless: it compares every entry in scope with its baseline.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, warn};

use super::directory::Directory;
use super::engine::{self, Change, ChangeEvent, PassOptions, Report, SyncError};
use crate::config::{Config, ConnectorConfig, dn_within};
use crate::proxy::capture::{Affected, CaptureLoss, CaptureSink, CapturedWrite};
use crate::store::{ChangeSource, SqliteStore};

/// Captured changes waiting for a connector's worker; past this, the
/// connector resynchronizes with a full pass instead.
const QUEUE: usize = 4096;

/// The capture sink of a proxy whose directory has connectors: routes each
/// captured write to the connectors whose scope holds the entry.
pub struct CaptureRouter {
    routes: Vec<Route>,
}

struct Route {
    connector: String,
    scopes: Vec<(crate::store::Category, String)>,
    events: mpsc::Sender<ChangeEvent>,
    resync: Arc<Notify>,
}

impl Route {
    fn category_of(&self, dn: &str) -> Option<crate::store::Category> {
        self.scopes
            .iter()
            .find(|(_, base)| dn_within(dn, base))
            .map(|(category, _)| *category)
    }
}

impl CaptureSink for CaptureRouter {
    fn write_succeeded(&self, write: CapturedWrite) {
        let affected = match write.affected() {
            Ok(affected) => affected,
            Err(error) => {
                warn!(session = write.session, %error, "captured write unreadable; every connector resynchronizes");
                self.routes.iter().for_each(|r| r.resync.notify_one());
                return;
            }
        };
        for route in &self.routes {
            match &affected {
                Affected::Entry(dn) => {
                    let Some(category) = route.category_of(dn) else {
                        continue;
                    };
                    let event = ChangeEvent {
                        source: ChangeSource::Proxy,
                        change: Change::Entry {
                            category,
                            dn: dn.clone(),
                        },
                    };
                    if route.events.try_send(event).is_err() {
                        warn!(connector = route.connector, %dn, "capture queue full; connector resynchronizes");
                        route.resync.notify_one();
                    }
                }
                // Deletes go through a full pass, where the delete policy
                // and the mass-delete guard apply.
                Affected::Deleted(dn) if route.category_of(dn).is_some() => route.resync.notify_one(),
                Affected::Deleted(_) => {}
            }
        }
    }

    fn capture_lost(&self, session: u64, why: CaptureLoss) {
        warn!(
            session,
            ?why,
            "writes on this session are not captured; the next poll brings them in"
        );
    }
}

/// Starts one worker per connector; returns the sink the proxy hands
/// captured writes to.
pub fn start(config: &Config, shutdown: CancellationToken, tasks: &TaskTracker) -> CaptureRouter {
    let mut routes = Vec::new();
    for name in config.connectors.iter().map(|c| c.name.clone()) {
        let connector = config.connector(&name).expect("connector from the config");
        let (events, queue) = mpsc::channel(QUEUE);
        let resync = Arc::new(Notify::new());
        routes.push(Route {
            connector: name.clone(),
            scopes: connector.scopes().map(|(c, s)| (c, s.base.clone())).collect(),
            events,
            resync: Arc::clone(&resync),
        });
        let worker = Worker {
            connector,
            store_path: config.store.path.clone(),
            connect_timeout: config.proxy.connect_timeout,
            directory: None,
        };
        let span = tracing::info_span!("connector", name);
        tasks.spawn(worker.run(queue, resync, shutdown.clone()).instrument(span));
    }
    CaptureRouter { routes }
}

struct Worker {
    connector: ConnectorConfig,
    store_path: PathBuf,
    connect_timeout: Duration,
    directory: Option<Directory>,
}

impl Worker {
    async fn run(mut self, mut queue: mpsc::Receiver<ChangeEvent>, resync: Arc<Notify>, shutdown: CancellationToken) {
        let Some(mut store) = self.open_store(&shutdown).await else {
            return;
        };
        let interval = self.connector.poll_interval;
        let mut backoff = Duration::from_secs(1);
        let mut next_pass = Instant::now();
        loop {
            let outcome = tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(event) = queue.recv() => self.event(&mut store, &event).await,
                _ = resync.notified() => self.pass(&mut store).await,
                _ = sleep_until(next_pass) => {
                    next_pass = Instant::now() + interval;
                    self.pass(&mut store).await
                }
            };
            match outcome {
                Ok(()) => backoff = Duration::from_secs(1),
                Err(e) => {
                    // Reconnect next time, and retry the pass after a back-off
                    // rather than a whole poll interval.
                    warn!(error = %e, retry_in = ?backoff, "sync failed");
                    if let Some(directory) = self.directory.take() {
                        directory.close().await;
                    }
                    next_pass = next_pass.min(Instant::now() + backoff);
                    backoff = (backoff * 2).min(interval);
                }
            }
        }
        if let Some(directory) = self.directory.take() {
            directory.close().await;
        }
    }

    /// Opens the store, retrying while it is busy (e.g. another process is
    /// creating it) until it opens or ldapsync shuts down.
    async fn open_store(&self, shutdown: &CancellationToken) -> Option<SqliteStore> {
        let mut delay = Duration::from_millis(100);
        loop {
            match SqliteStore::open(&self.store_path) {
                Ok(store) => return Some(store),
                Err(e) => warn!(error = %e, retry_in = ?delay, "cannot open the store"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(delay) => delay = (delay * 2).min(Duration::from_secs(10)),
            }
        }
    }

    async fn event(&mut self, store: &mut SqliteStore, event: &ChangeEvent) -> Result<(), SyncError> {
        let directory = connected(&mut self.directory, &self.connector, self.connect_timeout).await?;
        let report = engine::apply_event(store, &self.connector, directory, event).await?;
        log_report("captured change", &report);
        Ok(())
    }

    async fn pass(&mut self, store: &mut SqliteStore) -> Result<(), SyncError> {
        let directory = connected(&mut self.directory, &self.connector, self.connect_timeout).await?;
        let report = engine::run_pass(store, &self.connector, directory, PassOptions::default()).await?;
        log_report("sync pass", &report);
        Ok(())
    }
}

/// The connector's service connection, (re)connecting when there is none.
async fn connected<'a>(
    slot: &'a mut Option<Directory>,
    connector: &ConnectorConfig,
    timeout: Duration,
) -> Result<&'a mut Directory, SyncError> {
    if slot.is_none() {
        let password = connector.password()?;
        *slot = Some(Directory::connect(connector, password.expose(), timeout).await?);
    }
    Ok(slot.as_mut().expect("connected above"))
}

fn log_report(what: &str, report: &Report) {
    for line in &report.lines {
        info!("{line}");
    }
    debug!(?report, "{what} done");
}
