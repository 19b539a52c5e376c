//! What ldapsync counts, in Prometheus form: one process-wide registry,
//! fed by the relay, the capture path and the connectors' workers, and
//! exposed on the opt-in HTTP listener (see `monitor`).

use std::sync::LazyLock;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

mod striped;

pub use striped::{LatencyHistogram, StripedCounter};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    pub op: &'static str,
    pub result: i64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UrlLabel {
    pub url: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PollLabels {
    pub connector: String,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChangeLabels {
    pub connector: String,
    pub source: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookLabels {
    pub webhook: String,
    /// `delivered`, `failed` (an attempt), `dead-letter`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectorLabel {
    pub connector: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConflictLabels {
    pub connector: String,
    pub policy: String,
}

pub struct Metrics {
    registry: Registry,
    pub operations: Family<OperationLabels, StripedCounter>,
    pub operation_seconds: Family<OpLabel, LatencyHistogram>,
    pub sessions_open: Gauge,
    pub sessions: Counter,
    /// Accepts that failed (typically out of descriptors).
    pub accept_failures: Counter,
    bytes: Family<DirectionLabel, StripedCounter>,
    /// The two series of `bytes`, looked up once: they are counted for
    /// every PDU.
    pub bytes_from_client: StripedCounter,
    pub bytes_to_client: StripedCounter,
    pub upstream_connect_failures: Family<UrlLabel, Counter>,
    pub upstream_failovers: Counter,
    pub upstream_up: Family<UrlLabel, Gauge>,
    pub upstream_sessions: Family<UrlLabel, Gauge>,
    pub upstream_sessions_started: Family<UrlLabel, Counter>,
    pub upstream_probe_seconds: Family<UrlLabel, Gauge<f64, AtomicU64>>,
    pub captures: Family<OutcomeLabel, Counter>,
    pub poll_seconds: Family<PollLabels, Histogram>,
    pub changes: Family<ChangeLabels, Counter>,
    pub conflicts: Family<ConflictLabels, Counter>,
    pub deletes_held: Family<ConnectorLabel, Gauge>,
    /// Unix time of the first failed write of a run of them; 0 while the
    /// store takes writes.
    pub store_unwritable_since: Gauge,
    pub worker_restarts: Family<ConnectorLabel, Counter>,
    /// 1 while a connector waits for the full comparison that a lost
    /// change or a failed worker asked for.
    pub out_of_sync: Family<ConnectorLabel, Gauge>,
    /// 1 while this instance holds the connector's lease (PostgreSQL store).
    pub lease_held: Family<ConnectorLabel, Gauge>,
    pub leases_acquired: Family<ConnectorLabel, Counter>,
    pub webhook_deliveries: Family<WebhookLabels, Counter>,
}

/// The operation series one session has counted, each looked up in its
/// family once per session rather than at every operation (a lookup hashes
/// its labels under the family's lock: it showed in the relay's profile).
#[derive(Default)]
pub struct SessionOperations {
    counts: Vec<(OperationLabels, StripedCounter)>,
    durations: Vec<(&'static str, LatencyHistogram)>,
}

impl SessionOperations {
    /// An operation of type `op` ended with `result` after `seconds`.
    pub fn done(&mut self, op: &'static str, result: i64, seconds: f64) {
        let labels = OperationLabels { op, result };
        match self.counts.iter().find(|(seen, _)| *seen == labels) {
            Some((_, count)) => {
                count.inc();
            }
            None => {
                let count = METRICS.operations.get_or_create(&labels).clone();
                count.inc();
                self.counts.push((labels, count));
            }
        }
        match self.durations.iter().find(|(seen, _)| *seen == op) {
            Some((_, duration)) => duration.observe(seconds),
            None => {
                let duration = METRICS.operation_seconds.get_or_create(&OpLabel { op }).clone();
                duration.observe(seconds);
                self.durations.push((op, duration));
            }
        }
    }
}

/// The process's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    fn new() -> Metrics {
        let polls = || Histogram::new(exponential_buckets(0.001, 2.0, 18));
        let metrics = Metrics {
            registry: Registry::with_prefix("ldapsync"),
            operations: Family::default(),
            operation_seconds: Family::default(),
            sessions_open: Gauge::default(),
            sessions: Counter::default(),
            accept_failures: Counter::default(),
            bytes: Family::default(),
            bytes_from_client: StripedCounter::default(),
            bytes_to_client: StripedCounter::default(),
            upstream_connect_failures: Family::default(),
            upstream_failovers: Counter::default(),
            upstream_up: Family::default(),
            upstream_sessions: Family::default(),
            upstream_sessions_started: Family::default(),
            upstream_probe_seconds: Family::default(),
            captures: Family::default(),
            poll_seconds: Family::new_with_constructor(polls),
            changes: Family::default(),
            conflicts: Family::default(),
            deletes_held: Family::default(),
            store_unwritable_since: Gauge::default(),
            worker_restarts: Family::default(),
            out_of_sync: Family::default(),
            lease_held: Family::default(),
            leases_acquired: Family::default(),
            webhook_deliveries: Family::default(),
        };
        let mut registry = Registry::with_prefix("ldapsync");
        registry.register(
            "operations",
            "LDAP operations relayed, by type and result code",
            metrics.operations.clone(),
        );
        registry.register(
            "operation_duration_seconds",
            "Time from a request to its final response, by operation type",
            metrics.operation_seconds.clone(),
        );
        registry.register(
            "sessions_open",
            "Client sessions open now",
            metrics.sessions_open.clone(),
        );
        registry.register("sessions", "Client sessions accepted", metrics.sessions.clone());
        registry.register(
            "accept_failures",
            "Connections the listeners could not accept (typically: out of file descriptors)",
            metrics.accept_failures.clone(),
        );
        registry.register(
            "bytes",
            "Bytes relayed, from clients and to clients",
            metrics.bytes.clone(),
        );
        registry.register(
            "upstream_connect_failures",
            "Failed connections to a directory URL",
            metrics.upstream_connect_failures.clone(),
        );
        registry.register(
            "upstream_failovers",
            "Sessions served by a directory URL other than the first",
            metrics.upstream_failovers.clone(),
        );
        registry.register(
            "upstream_up",
            "Whether a directory URL is up (1) or known down (0) from sessions' connections and probes",
            metrics.upstream_up.clone(),
        );
        registry.register(
            "upstream_sessions",
            "Sessions with an open connection to a directory URL",
            metrics.upstream_sessions.clone(),
        );
        registry.register(
            "upstream_sessions_started",
            "Sessions connected to a directory URL since the start",
            metrics.upstream_sessions_started.clone(),
        );
        registry.register(
            "upstream_probe_seconds",
            "How long the last health probe of a directory URL took (connect and root DSE read)",
            metrics.upstream_probe_seconds.clone(),
        );
        registry.register(
            "captures",
            "Captured writes: queued, journaled, or dropped (the connector then resynchronizes)",
            metrics.captures.clone(),
        );
        registry.register(
            "poll_duration_seconds",
            "Duration of connector polls, incremental or full reconciliation",
            metrics.poll_seconds.clone(),
        );
        registry.register(
            "changes",
            "Changes applied by the sync engine, by source and outcome",
            metrics.changes.clone(),
        );
        registry.register(
            "conflicts",
            "Conflicts resolved, by connector and policy",
            metrics.conflicts.clone(),
        );
        registry.register(
            "deletes_held",
            "Deletes the mass-delete guard holds until confirmed (the connector is degraded while any are)",
            metrics.deletes_held.clone(),
        );
        registry.register(
            "store_unwritable_since",
            "Unix time since which writes to the store fail (disk full, read-only); 0 while they succeed",
            metrics.store_unwritable_since.clone(),
        );
        registry.register(
            "worker_restarts",
            "Connector workers started again after a failure, by connector (a bug: please report it)",
            metrics.worker_restarts.clone(),
        );
        registry.register(
            "out_of_sync",
            "1 while a connector waits for a full comparison (a change was lost or its worker failed)",
            metrics.out_of_sync.clone(),
        );
        registry.register(
            "lease_held",
            "1 while this instance holds the connector's lease and syncs it (PostgreSQL store)",
            metrics.lease_held.clone(),
        );
        registry.register(
            "leases_acquired",
            "Times this instance took a connector's lease (at start, or over from another instance)",
            metrics.leases_acquired.clone(),
        );
        registry.register(
            "webhook_deliveries",
            "Webhook delivery attempts by outcome: delivered, failed (retried), dead-letter (given up)",
            metrics.webhook_deliveries.clone(),
        );
        let direction = |direction| metrics.bytes.get_or_create(&DirectionLabel { direction }).clone();
        Metrics {
            registry,
            bytes_from_client: direction("from_client"),
            bytes_to_client: direction("to_client"),
            ..metrics
        }
    }

    /// A write to the store failed for want of space or permission.
    pub fn store_unwritable(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs() as i64);
        let _ = self.store_unwritable_since.inner().compare_exchange(
            0,
            now,
            std::sync::atomic::Ordering::AcqRel,
            std::sync::atomic::Ordering::Acquire,
        );
    }

    /// A write to the store succeeded.
    pub fn store_writable(&self) {
        self.store_unwritable_since.set(0);
    }

    /// Since when (Unix time) the store refuses writes, if it does.
    pub fn store_unwritable_at(&self) -> Option<i64> {
        Some(self.store_unwritable_since.get()).filter(|&at| at > 0)
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sessions_operations_land_in_the_process_series() {
        let mut session = SessionOperations::default();
        let mut other = SessionOperations::default();
        session.done("test-op", 0, 0.001);
        session.done("test-op", 0, 0.002);
        session.done("test-op", 32, 0.003);
        other.done("test-op", 0, 0.004);
        let count = |result| {
            METRICS
                .operations
                .get_or_create(&OperationLabels { op: "test-op", result })
                .get()
        };
        assert_eq!((count(0), count(32)), (3, 1));
        let text = METRICS.encode();
        assert!(
            text.contains("ldapsync_operation_duration_seconds_count{op=\"test-op\"} 4"),
            "{text}"
        );
    }
}
