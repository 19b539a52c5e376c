//! Runs the configured connectors while `ldapsync serve` relays.
//!
//! Captured writes are appended to the durable capture journal (SQLite) by
//! one writer thread, fed from a bounded queue so that the proxy never
//! waits; each connector's worker applies them in order and removes them.
//! Every poll interval the worker polls the directory for what changed
//! directly since its watermark, and every reconciliation interval (or
//! when a capture could not be journaled) it compares every entry in scope
//! with its baseline. The full comparison is the safety net that makes any
//! lost change harmless.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, warn};

use crate::cluster;
use crate::config::{Config, ConnectorConfig, StoreConfig};
use crate::directory::Directory;
use crate::dn;
use crate::metrics::{ChangeLabels, ConflictLabels, ConnectorLabel, METRICS, OutcomeLabel, PollLabels};
use crate::model::{Category, Change, ChangeEvent, ChangeSource, Mechanism};
use crate::poller;
use crate::proxy::capture::{Affected, CaptureLoss, CaptureSink, CapturedWrite, Opacity, WriteKind};
use crate::store::postgres::{Fence, Instance};
use crate::store::{self, AnyStore, Capture, CaptureKind, ConnectorState, PostgresStore, Store, Watermark, now};
use crate::sync::engine::{self, PassOptions, Report, SyncError};
use crate::sync::progress::{Lines, Progress};
use crate::throttle::Throttle;

/// Captured writes waiting for the journal writer; past this, the
/// connectors concerned resynchronize with a full comparison instead.
const QUEUE: usize = 4096;
/// Captures appended to the journal in one transaction, at most.
const BATCH: usize = 512;

/// The capture sink of a proxy whose directory has connectors: routes each
/// captured write to the connectors whose scope holds the entry.
pub struct CaptureRouter {
    routing: Arc<Routing>,
    /// To the journal writer, which decodes and routes each write: nothing
    /// of that happens on the client's response path.
    journal: mpsc::Sender<CapturedWrite>,
}

/// The connectors as the capture side sees them, shared by the sink and
/// the journal writer.
struct Routing {
    routes: Arc<Vec<Route>>,
    /// For warnings about writes that could not be captured.
    warnings: Throttle,
}

/// One connector as the capture side sees it.
struct Route {
    connector: String,
    /// The bases captures are routed by; a reload may change them.
    scopes: std::sync::RwLock<Vec<(Category, String)>>,
    /// Wakes the worker: captures were journaled.
    captured: Notify,
    /// Asks the worker for an incremental poll soon: a write may have
    /// succeeded that the capture path could not read.
    poll: Notify,
    /// Wakes the worker for a full comparison, with the reason in `lost`.
    resync: Notify,
    lost: Mutex<Option<String>>,
    /// For "out of sync" warnings, which a full queue can repeat per write.
    warnings: Throttle,
}

impl Route {
    fn new(connector: String, scopes: Vec<(Category, String)>) -> Route {
        Route {
            connector,
            scopes: std::sync::RwLock::new(scopes),
            captured: Notify::new(),
            poll: Notify::new(),
            resync: Notify::new(),
            lost: Mutex::new(None),
            warnings: Throttle::new(WARNING_INTERVAL),
        }
    }

    fn category_of(&self, dn: &str) -> Option<Category> {
        self.scopes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(_, base)| dn::is_within(dn, base))
            .map(|(category, _)| *category)
    }

    /// A change could not be journaled: the connector compares everything.
    fn out_of_sync(&self, reason: String) {
        if let Some(held_back) = self.warnings.allow() {
            warn!(
                connector = self.connector,
                reason, held_back, "connector out of sync; a full comparison follows"
            );
        }
        *self.lost.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
        set_out_of_sync(&self.connector, true);
        self.resync.notify_one();
    }
}

/// The least time between two warnings of one kind (see `Throttle`).
const WARNING_INTERVAL: Duration = Duration::from_secs(60);

impl Routing {
    /// A write of `kind` may have reached the directory unseen. Every
    /// connector polls soon (a poll is cheap; the worker spaces them out),
    /// but for a delete or rename, which an incremental poll may miss
    /// (timestamps do not see deletes), it compares everything.
    fn unseen(&self, what: &'static str, kind: WriteKind, detail: &dyn std::fmt::Display) {
        METRICS.captures.get_or_create(&OutcomeLabel { outcome: what }).inc();
        if matches!(kind, WriteKind::Delete | WriteKind::ModifyDn) {
            let reason = format!("{what} delete or rename ({detail})");
            return self.routes.iter().for_each(|r| r.out_of_sync(reason.clone()));
        }
        if let Some(held_back) = self.warnings.allow() {
            warn!(%detail, held_back, "{what} write: the next poll brings it in, and comes soon");
        }
        self.routes.iter().for_each(|r| r.poll.notify_one());
    }

    /// The journal lines of one write: one per connector whose scope holds
    /// its entry. An unreadable write asks every connector for a poll.
    fn route(&self, write: &CapturedWrite) -> Vec<Capture> {
        let affected = match write.affected() {
            Ok(affected) => affected,
            Err(error) => {
                self.unseen("unreadable", write.kind, &error);
                return Vec::new();
            }
        };
        let (kind, dn) = match affected {
            Affected::At(dn) => (CaptureKind::Present, dn),
            Affected::Removed(dn) => (CaptureKind::Absent, dn),
        };
        self.routes
            .iter()
            .filter_map(|route| {
                Some(Capture {
                    id: 0,
                    connector: route.connector.clone(),
                    category: route.category_of(&dn)?,
                    kind,
                    dn: dn.clone(),
                    captured_at: now(),
                })
            })
            .collect()
    }
}

impl CaptureSink for CaptureRouter {
    fn write_succeeded(&self, write: CapturedWrite) {
        match self.journal.try_send(write) {
            Ok(()) => {
                METRICS
                    .captures
                    .get_or_create(&OutcomeLabel { outcome: "queued" })
                    .inc();
            }
            // Only then is the write read here: the connectors it concerns
            // compare everything instead.
            Err(mpsc::error::TrySendError::Full(write) | mpsc::error::TrySendError::Closed(write)) => {
                METRICS
                    .captures
                    .get_or_create(&OutcomeLabel { outcome: "dropped" })
                    .inc();
                for capture in self.routing.route(&write) {
                    if let Some(route) = self.routing.routes.iter().find(|r| r.connector == capture.connector) {
                        route.out_of_sync(format!("capture queue full at {}", capture.dn));
                    }
                }
            }
        }
    }

    fn capture_lost(&self, session: u64, why: CaptureLoss) {
        match why {
            CaptureLoss::OutcomeUnknown(kind) => {
                self.routing
                    .unseen("outcome-unknown", kind, &format!("session {session}"))
            }
            CaptureLoss::Opaque(opacity) => {
                METRICS
                    .captures
                    .get_or_create(&OutcomeLabel {
                        outcome: opacity.as_str(),
                    })
                    .inc();
                // A passthrough listener is the operator's choice, not news.
                if opacity == Opacity::EndToEndTls {
                    debug!(
                        session,
                        "writes on this session are not captured (end-to-end TLS); polls bring them in"
                    );
                } else if let Some(held_back) = self.routing.warnings.allow() {
                    warn!(
                        session,
                        held_back, "writes on this session are not captured (SASL security layer); polls bring them in"
                    );
                }
            }
        }
    }
}

/// Starts the capture journal writer and one worker per connector; returns
/// the sink the proxy hands captured writes to, and what applies a
/// reloaded configuration to the running workers.
pub fn start(config: &Config, shutdown: CancellationToken, tasks: &TaskTracker) -> (CaptureRouter, ConnectorReloader) {
    let routes: Arc<Vec<Route>> = Arc::new(
        config
            .connectors
            .iter()
            .map(|c| Route::new(c.name.clone(), scope_bases(c)))
            .collect(),
    );
    let routing = Arc::new(Routing {
        routes: Arc::clone(&routes),
        warnings: Throttle::new(WARNING_INTERVAL),
    });
    let (journal, queue) = mpsc::channel(QUEUE);
    let writer_routing = Arc::clone(&routing);
    let store_config = config.store.clone();
    tasks.spawn_blocking(move || write_captures(store_config, queue, writer_routing));
    let cluster = config.store.url.is_some().then(|| {
        let (publish, store) = watch::channel(None);
        let shared = Shared {
            instance: cluster::this_instance(config),
            ttl: config.store.lease_ttl,
            store,
        };
        tasks.spawn(connect_cluster(
            config.store.clone(),
            shared.instance.clone(),
            Arc::clone(&routes),
            publish,
            shutdown.clone(),
        ));
        shared
    });
    let mut senders = Vec::new();
    for (index, route) in routes.iter().enumerate() {
        let connector = config.connector(&route.connector).expect("connector from the config");
        let (settings_tx, settings) = watch::channel(connector);
        senders.push(settings_tx);
        let (store_config, connect_timeout) = (config.store.clone(), config.proxy.connect_timeout);
        let (routes, shutdown, cluster) = (Arc::clone(&routes), shutdown.clone(), cluster.clone());
        let span = tracing::info_span!("connector", name = route.connector);
        tasks.spawn(
            async move {
                // Supervised: a worker that panics is said and started
                // again, never gone while the relay goes on.
                loop {
                    // On a shared store, only the lease's holder syncs.
                    let held = match &cluster {
                        None => None,
                        Some(cluster) => match cluster.hold(&routes[index], &shutdown).await {
                            Some(held) => Some(held),
                            None => break,
                        },
                    };
                    let stop = held.as_ref().map_or_else(|| shutdown.clone(), |h| h.lost.clone());
                    let worker = Worker {
                        fence: held.as_ref().map(|h| h.fence.clone()),
                        connector: settings.borrow().clone(),
                        store_config: store_config.clone(),
                        connect_timeout,
                        directory: None,
                        last_reconcile: None,
                        resync_reason: None,
                        resync_due: Instant::now(),
                        warnings: Throttle::new(WARNING_INTERVAL),
                    };
                    let run = tokio::spawn(
                        worker
                            .run(Arc::clone(&routes), index, settings.clone(), stop)
                            .in_current_span(),
                    );
                    let ended = run.await;
                    if let Some(held) = &held {
                        // Given up (and so taken at once by whoever is next)
                        // unless it was lost already.
                        held.lost.cancel();
                    }
                    match ended {
                        Ok(()) if shutdown.is_cancelled() => break,
                        // The lease was lost: wait for it again.
                        Ok(()) => continue,
                        Err(e) => {
                            tracing::error!(error = %e, "connector worker failed; restarting it in 5 s");
                            METRICS
                                .worker_restarts
                                .get_or_create(&ConnectorLabel {
                                    connector: routes[index].connector.clone(),
                                })
                                .inc();
                            // What it was doing is unknown: the next one compares everything.
                            routes[index].out_of_sync(format!("its worker failed ({e}) and was restarted"));
                            tokio::select! {
                                _ = shutdown.cancelled() => break,
                                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                            }
                        }
                    }
                }
            }
            .instrument(span),
        );
    }
    let router = CaptureRouter { routing, journal };
    (router, ConnectorReloader { routes, senders })
}

/// What the connectors' supervisors share on a PostgreSQL store.
#[derive(Clone)]
struct Shared {
    instance: Instance,
    ttl: Duration,
    /// The store for leases, once it could be opened.
    store: watch::Receiver<Option<Arc<PostgresStore>>>,
}

impl Shared {
    /// Waits for the connector's lease. Meanwhile a full comparison that
    /// this instance's captures ask for is recorded in the store, for the
    /// holder's next poll: it is not this instance's to run.
    async fn hold(&self, route: &Route, shutdown: &CancellationToken) -> Option<cluster::Held> {
        let mut published = self.store.clone();
        let store = tokio::select! {
            _ = shutdown.cancelled() => return None,
            store = published.wait_for(Option::is_some) => store.ok()?.clone()?,
        };
        let mut holding = std::pin::pin!(cluster::hold(
            &store,
            &route.connector,
            &self.instance.id,
            self.ttl,
            shutdown
        ));
        loop {
            tokio::select! {
                held = &mut holding => return held,
                _ = route.resync.notified() => {
                    let Some(reason) = route.lost.lock().unwrap_or_else(|e| e.into_inner()).take() else {
                        continue;
                    };
                    let (shared, connector, kept) = (Arc::clone(&store), route.connector.clone(), reason.clone());
                    let marked = tokio::task::spawn_blocking(move || shared.record_out_of_sync(&connector, &kept)).await;
                    if !matches!(marked, Ok(Ok(()))) {
                        // Kept until the store takes it: the holder must
                        // learn that a change was lost.
                        warn!("cannot record in the store that the connector is out of sync; trying again in 1 s");
                        route.lost.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(reason);
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        route.resync.notify_one();
                    }
                }
            }
        }
    }
}

/// Opens the shared store (retrying while PostgreSQL is away: the relay
/// does not wait for it), then registers this instance, keeps its
/// heartbeat, and wakes the local holders when any instance journals
/// captures.
async fn connect_cluster(
    config: StoreConfig,
    instance: Instance,
    routes: Arc<Vec<Route>>,
    publish: watch::Sender<Option<Arc<PostgresStore>>>,
    shutdown: CancellationToken,
) {
    let mut delay = Duration::from_millis(100);
    let store = loop {
        let opening = config.clone();
        match tokio::task::spawn_blocking(move || store::open(&opening)).await {
            Ok(Ok(opened)) => break Arc::new(opened.into_shared().expect("store.url names PostgreSQL")),
            Ok(Err(e)) => warn!(error = %e, retry_in = ?delay, "cannot open the shared store"),
            Err(e) => warn!(error = %e, "opening the shared store failed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => delay = (delay * 2).min(Duration::from_secs(10)),
        }
    };
    let woken = Arc::clone(&routes);
    let listening = store.listen_captures(move |connector| {
        woken
            .iter()
            .filter(|r| connector.is_none_or(|c| c == r.connector))
            .for_each(|r| r.captured.notify_one());
    });
    if let Err(e) = listening {
        warn!(error = %e, "cannot listen for other instances' captures; they are applied at each poll");
    }
    let _ = publish.send(Some(Arc::clone(&store)));
    cluster::heartbeat(store, instance, config.lease_ttl, shutdown).await;
}

fn scope_bases(connector: &ConnectorConfig) -> Vec<(Category, String)> {
    connector
        .scopes()
        .map(|(category, s)| (category, s.base.clone()))
        .collect()
}

/// Applies a reloaded configuration (SIGHUP) to the running workers.
pub struct ConnectorReloader {
    routes: Arc<Vec<Route>>,
    senders: Vec<watch::Sender<ConnectorConfig>>,
}

impl ConnectorReloader {
    /// Hands each running connector its new settings; returns what changed,
    /// for the log. Connectors added or removed apply at restart.
    pub fn reload(&self, config: &Config) -> Vec<String> {
        let mut said = Vec::new();
        for (route, sender) in self.routes.iter().zip(&self.senders) {
            let Some(new) = config.connector(&route.connector) else {
                said.push(format!(
                    "connector {} is no longer in the file; it runs until restart",
                    route.connector
                ));
                continue;
            };
            let old = sender.borrow().clone();
            if old == new {
                continue;
            }
            said.push(if ConnectorConfig::same_scope(&old, &new) {
                format!(
                    "connector {}: direction {}, conflict {}, delete {} apply to its next decision",
                    new.name,
                    new.direction,
                    new.conflict_policy(),
                    new.delete.as_str()
                )
            } else {
                format!(
                    "connector {}: its directory, scope or mapping changed; a full reconciliation follows",
                    new.name
                )
            });
            *route.scopes.write().unwrap_or_else(|e| e.into_inner()) = scope_bases(&new);
            sender.send_replace(new);
        }
        for c in &config.connectors {
            if !self.routes.iter().any(|r| r.connector == c.name) {
                said.push(format!("connector {} is new; it starts at restart", c.name));
            }
        }
        said
    }

    /// The settings each worker runs with now, for `status`.
    pub fn running(&self) -> Vec<ConnectorConfig> {
        self.senders.iter().map(|s| s.borrow().clone()).collect()
    }
}

/// The journal writer: appends captures in batches until the proxy is gone.
fn write_captures(store_config: StoreConfig, mut queue: mpsc::Receiver<CapturedWrite>, routing: Arc<Routing>) {
    let mut store: Option<AnyStore> = None;
    let routes = &routing.routes;
    while let Some(first) = queue.blocking_recv() {
        let mut batch = routing.route(&first);
        while batch.len() < BATCH
            && let Ok(next) = queue.try_recv()
        {
            batch.extend(routing.route(&next));
        }
        if batch.is_empty() {
            continue;
        }
        let result = match &mut store {
            Some(store) => store.append_captures(&batch),
            None => store::open(&store_config).and_then(|mut s| {
                let result = s.append_captures(&batch);
                store = Some(s);
                result
            }),
        };
        let concerned = routes
            .iter()
            .filter(|r| batch.iter().any(|c| c.connector == r.connector));
        match result {
            Ok(()) => {
                METRICS.store_writable();
                METRICS
                    .captures
                    .get_or_create(&OutcomeLabel { outcome: "journaled" })
                    .inc_by(batch.len() as u64);
                concerned.for_each(|r| r.captured.notify_one());
            }
            Err(e) => {
                if e.is_unwritable() {
                    METRICS.store_unwritable();
                }
                METRICS
                    .captures
                    .get_or_create(&OutcomeLabel { outcome: "dropped" })
                    .inc_by(batch.len() as u64);
                let reason = format!("capture journal write failed: {e}");
                for route in concerned {
                    if let Some(store) = &mut store {
                        // Best effort: the database may be what is failing.
                        let _ = store.mark_out_of_sync(&route.connector, &reason);
                    }
                    route.out_of_sync(reason.clone());
                }
            }
        }
    }
}

struct Worker {
    connector: ConnectorConfig,
    /// The lease this worker syncs under (PostgreSQL store).
    fence: Option<Fence>,
    store_config: StoreConfig,
    connect_timeout: Duration,
    directory: Option<Directory>,
    /// When this worker last compared every entry.
    last_reconcile: Option<Instant>,
    /// A full comparison was asked for, and not recorded in the store yet;
    /// it is, at the first poll from `resync_due` on.
    resync_reason: Option<String>,
    resync_due: Instant,
    /// For "sync failed" warnings, which a sick store or directory repeats.
    warnings: Throttle,
}

impl Worker {
    async fn run(
        mut self,
        routes: Arc<Vec<Route>>,
        index: usize,
        mut settings: watch::Receiver<ConnectorConfig>,
        shutdown: CancellationToken,
    ) {
        let route = &routes[index];
        let Some(mut store) = self.open_store(&shutdown).await else {
            return;
        };
        if let Err(e) = store.set_fence(self.fence.clone()) {
            warn!(error = %e, "cannot fence the worker's store; it does not start");
            return;
        }
        let mut backoff = Duration::from_secs(1);
        let mut next_poll = Instant::now();
        let mut last_poll = Instant::now();
        // The last attempt failed: retries wait for the back-off.
        let mut failing = false;
        loop {
            let outcome = tokio::select! {
                _ = shutdown.cancelled() => break,
                Ok(()) = settings.changed() => {
                    let new = settings.borrow_and_update().clone();
                    if !ConnectorConfig::same_scope(&self.connector, &new) {
                        // What it reads changed: compare everything again,
                        // over a fresh connection.
                        if let Some(directory) = self.directory.take() {
                            directory.close().await;
                        }
                        self.resync_reason = Some("the configuration changed (SIGHUP)".into());
                        next_poll = Instant::now();
                    }
                    next_poll = next_poll.min(Instant::now() + new.poll_interval);
                    self.connector = new;
                    continue;
                }
                _ = route.captured.notified() => self.captures(&mut store).await,
                _ = route.poll.notified() => {
                    // Soon, but however often it is asked for, no more than
                    // one poll per spacing; while failing, the back-off
                    // decides; and a poll that is always a full comparison
                    // keeps the reconciliations' spacing.
                    if !failing {
                        let spacing = if self.connector.poll_mechanism == Some(Mechanism::Full) {
                            RECONCILE_SPACING
                        } else {
                            POLL_SPACING
                        };
                        next_poll = next_poll.min(last_poll + spacing);
                    }
                    continue;
                }
                _ = route.resync.notified() => {
                    let reason = route.lost.lock().unwrap_or_else(|e| e.into_inner()).take();
                    self.resync_reason = Some(reason.unwrap_or_else(|| "capture lost".into()));
                    // Recorded (and so run) no sooner than the spacing after
                    // the last full comparison: however many captures are
                    // lost, one reconciliation is queued at most.
                    let earliest = self.last_reconcile.map_or_else(Instant::now, |at| at + RECONCILE_SPACING);
                    self.resync_due = earliest.max(Instant::now());
                    if !failing {
                        next_poll = next_poll.min(self.resync_due);
                    }
                    continue;
                }
                _ = sleep_until(next_poll) => {
                    last_poll = Instant::now();
                    next_poll = last_poll + self.connector.poll_interval;
                    match self.mark_out_of_sync(&mut store) {
                        Ok(()) => self.poll(&mut store).await,
                        Err(e) => Err(e),
                    }
                }
            };
            match outcome {
                Ok(()) => {
                    backoff = Duration::from_secs(1);
                    failing = false;
                }
                Err(e) => {
                    // Reconnect next time, and retry after a back-off rather
                    // than a whole poll interval.
                    failing = true;
                    if matches!(&e, SyncError::Store(e) if e.is_unwritable()) {
                        METRICS.store_unwritable();
                    }
                    let say = self.warnings.allow();
                    if let Some(held_back) = say {
                        warn!(error = %e, retry_in = ?backoff, held_back, "sync failed");
                    }
                    record_error(&mut store, &self.connector.name, &e, say.is_some());
                    if let Some(directory) = self.directory.take() {
                        directory.close().await;
                    }
                    next_poll = next_poll.min(Instant::now() + backoff);
                    backoff = (backoff * 2).min(self.connector.poll_interval);
                }
            }
        }
        if let Some(directory) = self.directory.take() {
            directory.close().await;
        }
    }

    /// Opens the store, retrying while it is busy (e.g. another process is
    /// creating it) until it opens or ldapsync shuts down.
    async fn open_store(&self, shutdown: &CancellationToken) -> Option<AnyStore> {
        let mut delay = Duration::from_millis(100);
        loop {
            match store::open(&self.store_config) {
                Ok(store) => return Some(store),
                Err(e) => warn!(error = %e, retry_in = ?delay, "cannot open the store"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(delay) => delay = (delay * 2).min(Duration::from_secs(10)),
            }
        }
    }

    /// Records a lost capture's reason in the store, once it takes writes:
    /// until then the worker keeps it, so that the reconciliation it asks
    /// for is not lost with the store's health.
    fn mark_out_of_sync(&mut self, store: &mut AnyStore) -> Result<(), SyncError> {
        if Instant::now() < self.resync_due {
            return Ok(());
        }
        if let Some(reason) = &self.resync_reason {
            store.mark_out_of_sync(&self.connector.name, reason)?;
            set_out_of_sync(&self.connector.name, true);
            METRICS.store_writable();
            self.resync_reason = None;
        }
        Ok(())
    }

    async fn captures(&mut self, store: &mut AnyStore) -> Result<(), SyncError> {
        let directory = connected(&mut self.directory, &self.connector, self.connect_timeout).await?;
        let report = apply_captures(store, &self.connector, directory).await?;
        record(&self.connector, ChangeSource::Proxy, &report);
        log_report("captured changes", &report);
        Ok(())
    }

    async fn poll(&mut self, store: &mut AnyStore) -> Result<(), SyncError> {
        let directory = connected(&mut self.directory, &self.connector, self.connect_timeout).await?;
        let captured = apply_captures(store, &self.connector, directory).await?;
        record(&self.connector, ChangeSource::Proxy, &captured);
        self.timed_poll(store, Poll::Due).await
    }

    async fn timed_poll(&mut self, store: &mut AnyStore, kind: Poll) -> Result<(), SyncError> {
        let directory = connected(&mut self.directory, &self.connector, self.connect_timeout).await?;
        let started = std::time::Instant::now();
        // A long reconciliation says how far it is, every minute.
        let mut progress = Lines::new(|line| info!("{line}"), Duration::from_secs(60));
        let outcome = poll(store, &self.connector, directory, kind, &mut progress).await?;
        METRICS
            .poll_seconds
            .get_or_create(&PollLabels {
                connector: self.connector.name.clone(),
                kind: outcome.kind.as_str(),
            })
            .observe(started.elapsed().as_secs_f64());
        record(&self.connector, ChangeSource::Poll, &outcome.report);
        METRICS.store_writable();
        METRICS
            .deletes_held
            .get_or_create(&ConnectorLabel {
                connector: self.connector.name.clone(),
            })
            .set(outcome.report.deletes_held as i64);
        log_report(outcome.kind.as_str(), &outcome.report);
        if outcome.kind == PollKind::Reconciliation {
            self.last_reconcile = Some(Instant::now());
        }
        Ok(())
    }
}

/// The least time between two polls that lost captures ask for.
const POLL_SPACING: Duration = Duration::from_secs(1);
/// The least time between two full comparisons that lost captures ask for.
const RECONCILE_SPACING: Duration = Duration::from_secs(60);

/// Records the failure for `status`; `say` whether a failure to record it
/// is worth a warning (not while warnings are held back).
fn record_error(store: &mut AnyStore, connector: &str, error: &SyncError, say: bool) {
    let mut state = store
        .connector_state(connector)
        .ok()
        .flatten()
        .unwrap_or_else(|| ConnectorState {
            connector: connector.to_owned(),
            last_result: "{}".into(),
            ..ConnectorState::default()
        });
    state.last_error = Some(error.to_string());
    if let Err(e) = store.set_connector_state(&state)
        && say
    {
        warn!(error = %e, "cannot record the failure in the store");
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

/// The `out_of_sync` gauge, which `/readyz` reads too.
fn set_out_of_sync(connector: &str, out: bool) {
    METRICS
        .out_of_sync
        .get_or_create(&ConnectorLabel {
            connector: connector.to_owned(),
        })
        .set(i64::from(out));
}

/// Counts what a report says was done, for the metrics.
fn record(connector: &ConnectorConfig, source: ChangeSource, report: &Report) {
    for (action, count) in report.outcomes().into_iter().filter(|(_, n)| *n > 0) {
        METRICS
            .changes
            .get_or_create(&ChangeLabels {
                connector: connector.name.clone(),
                source: source.as_str(),
                outcome: action.as_str(),
            })
            .inc_by(count as u64);
    }
    if report.conflicts > 0 {
        METRICS
            .conflicts
            .get_or_create(&ConflictLabels {
                connector: connector.name.clone(),
                policy: connector.conflict_policy().to_string(),
            })
            .inc_by(report.conflicts as u64);
    }
}

fn log_report(what: &str, report: &Report) {
    for line in report.all_lines() {
        info!("{line}");
    }
    debug!(?report, "{what} done");
}

/// Applies the connector's journaled captures in order, removing each once
/// applied: a crash in between applies it again, which changes nothing.
pub async fn apply_captures<S: Store>(
    store: &mut S,
    connector: &ConnectorConfig,
    directory: &mut Directory,
) -> Result<Report, SyncError> {
    let mut report = Report::default();
    loop {
        let batch = store.captures(&connector.name, BATCH)?;
        if batch.is_empty() {
            return Ok(report);
        }
        for capture in batch {
            let change = match capture.kind {
                CaptureKind::Present => Change::Entry {
                    category: capture.category,
                    dn: capture.dn,
                },
                CaptureKind::Absent => Change::EntryRemoved {
                    category: capture.category,
                    dn: capture.dn,
                },
            };
            let event = ChangeEvent {
                source: ChangeSource::Proxy,
                change,
            };
            report.absorb(engine::apply_event(store, connector, directory, &event).await?);
            store.remove_capture(capture.id)?;
        }
    }
}

/// What a poll should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Poll {
    /// Read the changes since the watermark, unless a full comparison is
    /// due (no watermark yet, out of sync, reconciliation interval passed).
    Due,
    /// Compare every entry in scope, with these options.
    Full(PassOptions),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PollKind {
    Incremental,
    Reconciliation,
}

impl PollKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PollKind::Incremental => "incremental poll",
            PollKind::Reconciliation => "full reconciliation",
        }
    }
}

pub struct PollOutcome {
    pub kind: PollKind,
    pub mechanism: Mechanism,
    pub report: Report,
}

/// One poll of a connector: incremental from the stored watermarks when
/// they allow it, otherwise a full reconciliation that stores new ones.
pub async fn poll<S: Store>(
    store: &mut S,
    connector: &ConnectorConfig,
    directory: &mut Directory,
    poll: Poll,
    progress: &mut dyn Progress,
) -> Result<PollOutcome, SyncError> {
    let (mechanism, server) = poller::detect(directory, connector.poll_mechanism).await?;
    let mut state = store
        .connector_state(&connector.name)?
        .unwrap_or_else(|| ConnectorState {
            connector: connector.name.clone(),
            last_result: "{}".into(),
            ..ConnectorState::default()
        });
    let mut watermarks = Vec::new();
    for (category, _) in connector.scopes() {
        match store.watermark(&connector.name, category)? {
            Some(w) if w.mechanism == mechanism && w.server == server => watermarks.push(w),
            _ => break,
        }
    }
    let reconcile_due = state
        .last_sync_at
        .is_none_or(|at| now() - at >= connector.reconcile_interval.as_secs() as i64);
    let mut incremental = poll == Poll::Due
        && mechanism != Mechanism::Full
        && state.out_of_sync.is_none()
        && !reconcile_due
        && watermarks.len() == connector.scopes().count();
    for watermark in &watermarks {
        if incremental && !poller::watermark_holds(directory, mechanism, &watermark.value).await? {
            info!(
                connector = %connector.name,
                category = %watermark.category,
                "the directory's changelog no longer reaches back to the watermark: full reconciliation"
            );
            incremental = false;
        }
    }
    let started = now();
    // What a full comparison may clear: a reason recorded while it runs
    // (another instance lost a capture) is for the next one.
    let mut cleared = None;
    // Read first: what is edited while the poll runs is for the next one.
    let local_edit = store.last_edit()?;
    let kind = if incremental {
        PollKind::Incremental
    } else {
        PollKind::Reconciliation
    };
    let mut report = Report::default();
    // Failures among the local changes (a full pass: among all its decisions).
    let local_failed;
    if incremental {
        for watermark in &mut watermarks {
            let scope = connector
                .scopes()
                .find(|(c, _)| *c == watermark.category)
                .map(|(_, s)| s)
                .expect("watermarks are of configured categories");
            let changes = poller::changes_since(directory, mechanism, scope, &watermark.value).await?;
            let category = watermark.category;
            // Departures first: an entry deleted and another added at its
            // DN are two entries, in that order.
            let removed = changes
                .removed
                .into_iter()
                .map(|dn| Change::EntryRemoved { category, dn });
            let written = changes.written.into_iter().map(|dn| Change::Entry { category, dn });
            for change in removed.chain(written) {
                let event = ChangeEvent {
                    source: ChangeSource::Poll,
                    change,
                };
                report.absorb(engine::apply_event(store, connector, directory, &event).await?);
            }
            report.absorb(
                engine::apply_departures(store, connector, directory, watermark.category, &changes.departures).await?,
            );
            if let Some(reason) = &changes.resync {
                info!(connector = %connector.name, %reason, "a full reconciliation is due");
                store.mark_out_of_sync(&connector.name, reason)?;
                set_out_of_sync(&connector.name, true);
                report.say(format!("full reconciliation due: {reason}"));
            }
            watermark.value = changes.watermark;
            watermark.updated_at = now();
        }
        let mut local = Report::default();
        for event in engine::local_changes(&*store, connector, state.local_seen)? {
            local.absorb(engine::apply_event(store, connector, directory, &event).await?);
        }
        local_failed = local.failed;
        report.absorb(local);
        report.held(&connector.name, &store.held_deletes(&connector.name)?);
    } else {
        let options = match poll {
            Poll::Full(options) => options,
            Poll::Due => PassOptions::default(),
        };
        // Read before the comparison starts, so that what changes while it
        // runs is read again by the next poll.
        watermarks.clear();
        for (category, scope) in connector.scopes() {
            if let Some(value) = poller::watermark_now(directory, mechanism, scope).await? {
                watermarks.push(Watermark {
                    connector: connector.name.clone(),
                    category,
                    mechanism,
                    server: server.clone(),
                    value,
                    updated_at: now(),
                });
            }
        }
        report = engine::run_pass(store, connector, directory, options, progress).await?;
        local_failed = report.failed;
        report.held(&connector.name, &store.held_deletes(&connector.name)?);
        if options.dry_run {
            return Ok(PollOutcome {
                kind,
                mechanism,
                report,
            });
        }
        state.last_sync_at = Some(started);
        state.last_result = serde_json::to_string(&report).expect("report serializes");
        cleared = state.out_of_sync.take();
        set_out_of_sync(&connector.name, false);
    }
    state.last_poll_at = Some(started);
    state.last_error = None;
    // A local change that could not be written is tried again next time.
    if local_failed == 0 {
        state.local_seen = local_edit;
    }
    store.finish_poll(&state, &watermarks, cleared.as_deref())?;
    Ok(PollOutcome {
        kind,
        mechanism,
        report,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rasn_ldap::{DelRequest, LdapMessage, ProtocolOp};

    fn deleted(dn: &str) -> CapturedWrite {
        let op = ProtocolOp::DelRequest(DelRequest(dn.to_owned().into()));
        CapturedWrite {
            session: 1,
            message_id: 1,
            kind: WriteKind::Delete,
            request: rasn::ber::encode(&LdapMessage::new(1, op)).unwrap().into(),
        }
    }

    fn routing() -> Arc<Routing> {
        Arc::new(Routing {
            routes: Arc::new(vec![Route::new(
                "example".into(),
                vec![(Category::Account, "ou=people,dc=example,dc=com".into())],
            )]),
            warnings: Throttle::new(WARNING_INTERVAL),
        })
    }

    #[test]
    fn a_write_is_routed_to_the_connectors_whose_scope_holds_its_entry() {
        let routing = routing();
        let routed = routing.route(&deleted("uid=a,ou=People,dc=example,dc=com"));
        assert_eq!(
            routed
                .iter()
                .map(|c| (c.connector.as_str(), c.category, c.kind, c.dn.as_str()))
                .collect::<Vec<_>>(),
            [(
                "example",
                Category::Account,
                CaptureKind::Absent,
                "uid=a,ou=People,dc=example,dc=com"
            )]
        );
        assert!(routing.route(&deleted("uid=outside,dc=example,dc=com")).is_empty());
    }

    #[tokio::test]
    async fn a_full_capture_queue_marks_the_connector_out_of_sync_instead_of_blocking() {
        let (journal, mut queue) = mpsc::channel(1);
        let router = CaptureRouter {
            routing: routing(),
            journal,
        };
        router.write_succeeded(deleted("uid=a,ou=people,dc=example,dc=com"));
        // The queue is full: a write outside every scope concerns no one,
        // one inside marks its connector.
        router.write_succeeded(deleted("uid=outside,dc=example,dc=com"));
        let route = &router.routing.routes[0];
        assert_eq!(*route.lost.lock().unwrap(), None);
        router.write_succeeded(deleted("uid=b,ou=people,dc=example,dc=com"));

        let queued = queue.try_recv().expect("the first write is queued, as it came");
        assert_eq!(queued.target_dn().unwrap(), "uid=a,ou=people,dc=example,dc=com");
        assert!(queue.try_recv().is_err(), "nothing else fits");
        let reason = route.lost.lock().unwrap().clone();
        assert_eq!(
            reason.as_deref(),
            Some("capture queue full at uid=b,ou=people,dc=example,dc=com")
        );
        tokio::time::timeout(Duration::from_secs(1), route.resync.notified())
            .await
            .expect("the worker is woken for a full comparison");
    }
}
