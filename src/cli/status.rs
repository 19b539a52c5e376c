//! `ldapsync status [--json]`: the running instance (from its admin
//! socket: listeners, directory health, sessions) and each connector (from
//! the database: mechanism, watermarks, last poll and reconciliation,
//! counts, last error).

use serde::Serialize;

use super::Exit;
use super::admin::{open_store, timestamp};
use super::output::outln;
use crate::admin::{self, InstanceView};
use crate::config::Config;
use crate::monitor::{self, RunningConnector, RunningState};
use crate::store::postgres::Lease;
use crate::store::{HeldDelete, Store};
use crate::sync::engine;

#[derive(Serialize)]
struct Status {
    /// `None` when no instance answers on the admin socket.
    running: Option<RunningState>,
    /// The instances sharing a PostgreSQL store; `None` on SQLite.
    instances: Option<Vec<InstanceView>>,
    connectors: Vec<ConnectorStatus>,
}

#[derive(Serialize)]
struct ConnectorStatus {
    name: String,
    /// As the running instance applies them (the file's when none runs).
    direction: String,
    conflict: String,
    /// What the file says, when it differs from what the instance runs:
    /// the file changed and was not reloaded yet.
    file_differs: Option<RunningConnector>,
    /// Who syncs it, on a PostgreSQL store.
    lease: Option<Lease>,
    poll_interval: String,
    poll_mechanism: Option<String>,
    reconcile_interval: String,
    watermarks: Vec<WatermarkStatus>,
    last_poll: Option<String>,
    last_reconciliation: Option<String>,
    out_of_sync: Option<String>,
    last_error: Option<String>,
    associated: usize,
    disputed: u64,
    /// Each dispute of the last reconciliation, with its candidates and
    /// the command that resolves it.
    disputes: Vec<String>,
    entry_gone: usize,
    pending_local_changes: usize,
    captures_not_applied: usize,
    /// Deletes the mass-delete guard holds until confirmed.
    deletes_held: Vec<HeldDelete>,
    /// `ok`, or `degraded` with the reasons in `degraded`.
    health: &'static str,
    degraded: Vec<String>,
}

#[derive(Serialize)]
struct WatermarkStatus {
    category: String,
    mechanism: String,
    value: String,
    server: String,
    stored: String,
}

/// Prints the status; exits 3 when a connector is degraded and 4 when no
/// instance runs, so that `status --quiet` is a health check.
pub fn status(config: &Config, json: bool, quiet: bool) -> anyhow::Result<()> {
    let store = open_store(config)?;
    let running = tokio::runtime::Runtime::new()?.block_on(monitor::query_socket(&config.store.admin_socket()));
    let (instances, leases) = match admin::cluster(config, &store)? {
        Some(cluster) => (Some(cluster.instances), Some(cluster.leases)),
        None => (None, None),
    };
    let mut connectors = Vec::new();
    for connector in &config.connectors {
        let lease = leases
            .as_ref()
            .and_then(|all| all.iter().find(|l| l.connector == connector.name))
            .cloned();
        let associations = store.associations(Some(&connector.name))?;
        let state = store.connector_state(&connector.name)?.unwrap_or_default();
        let last: serde_json::Value = serde_json::from_str(&state.last_result).unwrap_or_default();
        let mut watermarks = Vec::new();
        for (category, _) in connector.scopes() {
            if let Some(w) = store.watermark(&connector.name, category)? {
                watermarks.push(WatermarkStatus {
                    category: category.to_string(),
                    mechanism: w.mechanism.to_string(),
                    value: printable(&w.value),
                    server: w.server,
                    stored: timestamp(w.updated_at),
                });
            }
        }
        let pending_local_changes = engine::local_changes(&store, connector, state.local_seen)?.len();
        let deletes_held = store.held_deletes(&connector.name)?;
        let mut degraded = Vec::new();
        if !deletes_held.is_empty() {
            degraded.push(format!("{} deletes held by the mass-delete guard", deletes_held.len()));
        }
        if let Some(reason) = &state.out_of_sync {
            degraded.push(format!("out of sync: {reason}"));
        }
        if let Some(error) = &state.last_error {
            degraded.push(format!("last poll failed: {error}"));
        }
        // With no instance running, `status` says that already.
        let cluster_runs = instances.iter().flatten().any(|i: &InstanceView| i.alive);
        if cluster_runs && lease.as_ref().is_none_or(|l| l.expires_in < 0) {
            degraded.push("no running instance holds its lease: nobody syncs it".into());
        }
        let in_file = RunningConnector::from(connector);
        let runs = running
            .as_ref()
            .and_then(|r| r.connectors.iter().find(|c| c.name == connector.name))
            .cloned();
        let (direction, conflict) = match &runs {
            Some(r) => (r.direction.clone(), r.conflict.clone()),
            None => (in_file.direction.clone(), in_file.conflict.clone()),
        };
        connectors.push(ConnectorStatus {
            name: connector.name.clone(),
            direction,
            conflict,
            file_differs: runs.filter(|r| *r != in_file).map(|_| in_file),
            lease,
            poll_interval: humantime::format_duration(connector.poll_interval).to_string(),
            poll_mechanism: connector.poll_mechanism.map(|m| m.to_string()),
            reconcile_interval: humantime::format_duration(connector.reconcile_interval).to_string(),
            watermarks,
            last_poll: state.last_poll_at.map(timestamp),
            last_reconciliation: state.last_sync_at.map(timestamp),
            out_of_sync: state.out_of_sync,
            last_error: state.last_error,
            associated: associations.len(),
            disputed: last.get("disputed").and_then(|v| v.as_u64()).unwrap_or(0),
            disputes: last
                .get("disputes")
                .and_then(|v| v.as_array())
                // A line each; stored as one before disputes had candidates.
                .map(|disputes| {
                    disputes
                        .iter()
                        .filter_map(|d| d.get("line").unwrap_or(d).as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
            entry_gone: associations.iter().filter(|a| a.entry_gone).count(),
            pending_local_changes,
            captures_not_applied: store.pending_captures(&connector.name)?,
            deletes_held,
            health: if degraded.is_empty() { "ok" } else { "degraded" },
            degraded,
        });
    }
    let status = Status {
        running,
        instances,
        connectors,
    };
    if json {
        outln!("{}", serde_json::to_string_pretty(&status)?);
    } else if !quiet {
        print_human(&status);
    }
    if status.running.is_none() {
        return Err(Exit::NotRunning.into());
    }
    let mut degraded: Vec<String> = status
        .connectors
        .iter()
        .filter(|c| !c.degraded.is_empty())
        .map(|c| format!("connector {}: {}", c.name, c.degraded.join("; ")))
        .collect();
    if let Some(since) = status.running.as_ref().and_then(|r| r.store_unwritable_since.as_ref()) {
        degraded.push(format!("store unwritable since {since}"));
    }
    if !degraded.is_empty() {
        return Err(Exit::NeedsAttention(degraded.join("; ")).into());
    }
    Ok(())
}

fn print_human(status: &Status) {
    match &status.running {
        Some(r) => {
            outln!("ldapsync running (pid {}, since {})", r.pid, r.started_at);
            for l in &r.listeners {
                let tls = if l.require_tls {
                    ", TLS required before bind"
                } else {
                    ""
                };
                outln!("  listener {} on {}{tls}", l.url, l.addr);
            }
            for u in &r.upstream {
                let pool = if u.up { "up" } else { "DOWN for new sessions" };
                match &u.error {
                    None => outln!("  directory {}: reachable, {pool}, {} sessions", u.url, u.sessions),
                    Some(e) => outln!(
                        "  directory {}: UNREACHABLE ({e}), {pool}, {} sessions",
                        u.url,
                        u.sessions
                    ),
                }
            }
            outln!("  sessions open: {}", r.sessions_open);
            if let Some(since) = &r.store_unwritable_since {
                outln!(
                    "  STORE UNWRITABLE since {since}: relaying goes on; the connectors catch up when it takes writes"
                );
            }
        }
        None => outln!("ldapsync is not running (no answer on its admin socket)"),
    }
    for i in status.instances.iter().flatten() {
        let holds = if i.holds.is_empty() {
            "holds no lease".to_owned()
        } else {
            format!("syncs {}", i.holds.join(", "))
        };
        outln!(
            "instance {} ({}, v{}, heartbeat {} s ago{}): {holds}; listeners {}",
            i.instance.id,
            i.instance.host,
            i.instance.version,
            i.instance.heartbeat_age,
            if i.alive { "" } else { ", STALE" },
            i.instance.listeners
        );
    }
    for c in &status.connectors {
        outln!("connector {}", c.name);
        outln!("  direction: {}, conflict: {}", c.direction, c.conflict);
        if let Some(l) = &c.lease {
            outln!(
                "  lease: held by {} for {} s (token {}), {}",
                l.holder,
                l.age,
                l.token,
                if l.expires_in >= 0 {
                    format!("expires in {} s unless renewed", l.expires_in)
                } else {
                    "EXPIRED: the next instance to ask takes it".to_owned()
                }
            );
        }
        if let Some(file) = &c.file_differs {
            outln!(
                "  WARNING: the config file says direction {}, conflict {}, delete {}, poll every {}; \
                 the running instance keeps what it runs until a reload (SIGHUP, `systemctl reload ldapsync`)",
                file.direction,
                file.conflict,
                file.delete,
                file.poll_interval
            );
        }
        outln!(
            "  polling: every {} ({}), full reconciliation every {}; captured writes at once",
            c.poll_interval,
            c.poll_mechanism
                .as_ref()
                .map_or("mechanism detected from the root DSE".to_owned(), |m| format!(
                    "{m}, configured"
                )),
            c.reconcile_interval
        );
        if c.watermarks.is_empty() {
            outln!("  no watermark yet (the next poll is a full reconciliation)");
        }
        for w in &c.watermarks {
            let server = if w.server.is_empty() {
                String::new()
            } else {
                format!(" on {}", w.server)
            };
            outln!(
                "  {}s: mechanism {}, watermark {}{server} (stored {})",
                w.category,
                w.mechanism,
                w.value,
                w.stored
            );
        }
        outln!("  last poll: {}", c.last_poll.as_deref().unwrap_or("never"));
        outln!(
            "  last full reconciliation: {}",
            c.last_reconciliation.as_deref().unwrap_or("never")
        );
        outln!("  health: {}", c.health);
        if let Some(reason) = &c.out_of_sync {
            outln!("  OUT OF SYNC: {reason}; a full reconciliation is due");
        }
        if !c.deletes_held.is_empty() {
            outln!(
                "  DELETES HELD: {} refused by the mass-delete guard; apply with \
                 `ldapsync sync run --connector {} --confirm-deletes`:",
                c.deletes_held.len(),
                c.name
            );
            for h in &c.deletes_held {
                outln!(
                    "    {} {} (entry {} last at {}, held since {})",
                    h.category,
                    h.name,
                    h.entry_id,
                    h.dn,
                    timestamp(h.held_at)
                );
            }
        }
        if let Some(error) = &c.last_error {
            outln!("  last error: {error}");
        }
        outln!("  captured changes not applied yet: {}", c.captures_not_applied);
        outln!("  associated: {}", c.associated);
        outln!("  disputed (last reconciliation): {}", c.disputed);
        for dispute in &c.disputes {
            outln!("    {dispute}");
        }
        outln!("  out of sync (entry gone): {}", c.entry_gone);
        outln!("  pending local changes: {}", c.pending_local_changes);
    }
}

/// A watermark as text: cookies and timestamps are text, DirSync's cookie
/// is binary and shown by its size.
fn printable(value: &[u8]) -> String {
    match std::str::from_utf8(value) {
        Ok(text) if text.chars().all(|c| c.is_ascii_graphic() || c == ' ') => text.to_owned(),
        _ => format!("<{} bytes>", value.len()),
    }
}
