//! The PostgreSQL store: one shared state for several ldapsync instances.
//! The same records and the same transactional guarantees as the SQLite
//! store (a decision's object, association and journal lines commit
//! together; full passes batch their writes), plus what a cluster needs:
//! the instances' registry and one lease per connector, which every
//! write of a worker checks in its own transaction (fencing).
//!
//! The `postgres` crate is synchronous and runs a small tokio runtime of
//! its own, which cannot run on a thread that drives ldapsync's tasks: so
//! each store owns one thread with one connection, and its methods hand
//! that thread a job and wait for the answer, as the SQLite store waits
//! for its file. A lost connection is opened again by the next job.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError, mpsc};
use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use std::collections::HashMap;

use postgres::types::ToSql;
use postgres::{Client, NoTls, Row, Statement};
use serde::Serialize;

use self::ahead::{Ahead, insert_created};
use super::copy::Tables;
use super::{
    Association, Capture, CaptureKind, Commit, ConnectorState, HeldDelete, JournalEntry, JournalLine, JournalQuery,
    LocalObject, Store, StoreError, Watermark, from_json, parse, to_json,
};
use crate::model::{Action, Category, ChangeSource};

mod admin;
mod ahead;
mod rows;

/// Schema versions, applied in order; never edit one that has shipped.
const MIGRATIONS: &[&str] = &[
    r#"
    CREATE TABLE objects (
        id       BIGSERIAL PRIMARY KEY,
        category TEXT NOT NULL,
        name     TEXT NOT NULL,
        enabled  BOOLEAN NOT NULL DEFAULT true,
        "values" TEXT NOT NULL,
        edit     BIGINT NOT NULL DEFAULT 0,
        UNIQUE (category, name)
    );
    CREATE INDEX objects_by_edit ON objects (edit);
    CREATE TABLE associations (
        connector  TEXT NOT NULL,
        object_id  BIGINT NOT NULL REFERENCES objects(id) ON DELETE CASCADE,
        entry_id   TEXT NOT NULL,
        dn         TEXT NOT NULL,
        baseline   TEXT NOT NULL,
        synced_at  BIGINT NOT NULL,
        entry_gone BOOLEAN NOT NULL DEFAULT false,
        PRIMARY KEY (connector, object_id),
        UNIQUE (connector, entry_id)
    );
    CREATE INDEX associations_by_dn ON associations (connector, lower(dn));
    CREATE INDEX associations_by_object ON associations (object_id);
    CREATE TABLE journal (
        id        BIGSERIAL PRIMARY KEY,
        at        BIGINT NOT NULL,
        connector TEXT NOT NULL,
        category  TEXT NOT NULL,
        object    TEXT NOT NULL,
        source    TEXT NOT NULL,
        action    TEXT NOT NULL,
        policy    TEXT NOT NULL,
        detail    TEXT NOT NULL
    );
    CREATE INDEX journal_by_object ON journal (connector, object);
    CREATE INDEX journal_by_time ON journal (connector, at);
    CREATE TABLE connector_state (
        connector    TEXT PRIMARY KEY,
        last_sync_at BIGINT,
        last_result  TEXT NOT NULL,
        last_poll_at BIGINT,
        out_of_sync  TEXT,
        last_error   TEXT,
        local_seen   BIGINT NOT NULL DEFAULT 0
    );
    CREATE TABLE captures (
        id          BIGSERIAL PRIMARY KEY,
        connector   TEXT NOT NULL,
        category    TEXT NOT NULL,
        kind        TEXT NOT NULL,
        dn          TEXT NOT NULL,
        captured_at BIGINT NOT NULL
    );
    CREATE INDEX captures_by_connector ON captures (connector, id);
    CREATE TABLE watermarks (
        connector  TEXT NOT NULL,
        category   TEXT NOT NULL,
        mechanism  TEXT NOT NULL,
        server     TEXT NOT NULL,
        value      BYTEA NOT NULL,
        updated_at BIGINT NOT NULL,
        PRIMARY KEY (connector, category)
    );
    CREATE TABLE counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
    INSERT INTO counters VALUES ('local_edit', 0);
    CREATE TABLE held_deletes (
        connector TEXT NOT NULL,
        object_id BIGINT NOT NULL REFERENCES objects(id) ON DELETE CASCADE,
        held_at   BIGINT NOT NULL,
        PRIMARY KEY (connector, object_id)
    );
    CREATE TABLE instances (
        id          TEXT PRIMARY KEY,
        host        TEXT NOT NULL,
        pid         BIGINT NOT NULL,
        listeners   TEXT NOT NULL,
        version     TEXT NOT NULL,
        started_at  BIGINT NOT NULL,
        heartbeat   TIMESTAMPTZ NOT NULL
    );
    CREATE TABLE leases (
        connector   TEXT PRIMARY KEY,
        holder      TEXT NOT NULL,
        token       BIGINT NOT NULL,
        acquired_at TIMESTAMPTZ NOT NULL,
        expires_at  TIMESTAMPTZ NOT NULL
    );
"#,
    // The admin side (`store::admin`), as on SQLite; each change also
    // keeps its transaction id, by which the feed is ordered (see
    // `Cursor`).
    r#"
    CREATE TABLE changes (
        id          BIGSERIAL PRIMARY KEY,
        tx          XID8 NOT NULL DEFAULT pg_current_xact_id(),
        at          BIGINT NOT NULL DEFAULT extract(epoch FROM now())::bigint,
        object_id   BIGINT NOT NULL,
        category    TEXT NOT NULL,
        old_name    TEXT,
        new_name    TEXT,
        old_enabled BOOLEAN,
        new_enabled BOOLEAN,
        old_values  TEXT,
        new_values  TEXT,
        journal_id  BIGINT
    );
    CREATE INDEX changes_in_order ON changes (tx, id);
    CREATE INDEX changes_unnamed ON changes (category) WHERE journal_id IS NULL;
    CREATE INDEX changes_by_time ON changes (at);
    CREATE FUNCTION ldapsync_object_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'INSERT' THEN
            INSERT INTO changes (object_id, category, new_name, new_enabled, new_values)
            VALUES (NEW.id, NEW.category, NEW.name, NEW.enabled, NEW."values");
        ELSIF TG_OP = 'DELETE' THEN
            INSERT INTO changes (object_id, category, old_name, old_enabled, old_values)
            VALUES (OLD.id, OLD.category, OLD.name, OLD.enabled, OLD."values");
        ELSIF (OLD.name, OLD.enabled, OLD."values") IS DISTINCT FROM (NEW.name, NEW.enabled, NEW."values") THEN
            INSERT INTO changes (object_id, category, old_name, new_name, old_enabled, new_enabled, old_values, new_values)
            VALUES (NEW.id, NEW.category, OLD.name, NEW.name, OLD.enabled, NEW.enabled, OLD."values", NEW."values");
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER objects_changed AFTER INSERT OR UPDATE OF name, enabled, "values" OR DELETE ON objects
        FOR EACH ROW EXECUTE FUNCTION ldapsync_object_changed();
    CREATE FUNCTION ldapsync_journal_names_changes() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        UPDATE changes SET journal_id = NEW.id, at = NEW.at
        WHERE journal_id IS NULL AND category = NEW.category
          AND (old_name = NEW.object OR new_name = NEW.object);
        RETURN NULL;
    END $$;
    CREATE TRIGGER journal_names_changes AFTER INSERT ON journal
        FOR EACH ROW EXECUTE FUNCTION ldapsync_journal_names_changes();
    CREATE TABLE cursors (
        kind       TEXT NOT NULL,
        name       TEXT NOT NULL,
        cursor     TEXT NOT NULL,
        updated_at BIGINT NOT NULL,
        PRIMARY KEY (kind, name)
    );
    CREATE TABLE dead_letters (
        id         BIGSERIAL PRIMARY KEY,
        webhook    TEXT NOT NULL,
        cursor     TEXT NOT NULL,
        body       TEXT NOT NULL,
        attempts   BIGINT NOT NULL,
        last_error TEXT NOT NULL,
        failed_at  BIGINT NOT NULL
    );
    CREATE TABLE api_tokens (
        name         TEXT PRIMARY KEY,
        digest       TEXT NOT NULL UNIQUE,
        role         TEXT NOT NULL,
        created_at   BIGINT NOT NULL,
        created_by   TEXT NOT NULL,
        last_used_at BIGINT
    );
    INSERT INTO counters VALUES ('changes_pruned_tx', 0), ('changes_pruned_id', 0);
"#,
    // A journal line names its changes once per statement, not per line,
    // planned each time: a statement without parameters kept the plan it
    // got when `changes` was empty, which compared every line with every
    // unnamed change of its category (and, keyed by category alone, the
    // index kept an entry for each change named since the last vacuum) —
    // a first import of 100,000 objects went from 8 s to 18 s. As before,
    // the first line about an object's old or new name names its change.
    r#"
    DROP TRIGGER journal_names_changes ON journal;
    DROP INDEX changes_unnamed;
    CREATE INDEX changes_unnamed_old ON changes (category, old_name) WHERE journal_id IS NULL;
    CREATE INDEX changes_unnamed_new ON changes (category, new_name) WHERE journal_id IS NULL;
    CREATE OR REPLACE FUNCTION ldapsync_journal_names_changes() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        EXECUTE $update$
            UPDATE changes c SET journal_id = first.line, at = first.at
            FROM (
                SELECT DISTINCT ON (change) change, line, at FROM (
                    SELECT c.id AS change, w.id AS line, w.at FROM changes c
                    JOIN written w ON c.category = w.category AND c.old_name = w.object
                    WHERE c.journal_id IS NULL
                    UNION ALL
                    SELECT c.id, w.id, w.at FROM changes c
                    JOIN written w ON c.category = w.category AND c.new_name = w.object
                    WHERE c.journal_id IS NULL
                ) matches ORDER BY change, line
            ) first
            WHERE c.id = first.change
        $update$;
        RETURN NULL;
    END $$;
    CREATE TRIGGER journal_names_changes AFTER INSERT ON journal
        REFERENCING NEW TABLE AS written FOR EACH STATEMENT EXECUTE FUNCTION ldapsync_journal_names_changes();
"#,
];

/// Writes a batch holds at most before it commits them.
const BATCH_WRITES: usize = 500;

/// Rows a `store copy` writes per statement: few round trips, and a
/// statement's arrays of a bounded size.
const COPY_CHUNK: usize = 5_000;

/// How long a session may sit in an open transaction: a worker paused
/// (SIGSTOP) inside one would otherwise hold its lease row's lock, and no
/// other instance could take the connector over. Shorter than any lease.
const IDLE_IN_TRANSACTION: Duration = Duration::from_secs(3);

/// The lease a worker holds; its writes commit only while it does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub connector: String,
    pub holder: String,
    pub token: i64,
}

/// One running ldapsync, as it registered itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Instance {
    pub id: String,
    pub host: String,
    pub pid: i64,
    pub listeners: String,
    pub version: String,
    pub started_at: i64,
    /// Seconds since its last heartbeat.
    pub heartbeat_age: i64,
}

/// Who holds a connector's lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Lease {
    pub connector: String,
    pub holder: String,
    pub token: i64,
    /// Seconds since it was acquired.
    pub age: i64,
    /// Seconds until it expires unless renewed (negative: expired).
    pub expires_in: i64,
}

/// Where and how to connect.
#[derive(Clone)]
pub struct Target {
    pub config: postgres::Config,
    pub tls: Option<rustls::ClientConfig>,
    /// The URL without any password, for messages.
    pub shown: String,
}

type Job = Box<dyn FnOnce(&mut Session) + Send>;

pub struct PostgresStore {
    jobs: mpsc::Sender<Job>,
    target: Arc<Target>,
    /// Shared with the connection thread: what the look-ahead knows is
    /// answered here, without a round trip to that thread.
    ahead: SharedAhead,
}

/// A full pass's look-ahead, inside its batch; only the connection thread
/// changes it, and only while the store's caller waits for that thread.
type SharedAhead = Arc<Mutex<Option<Ahead>>>;

fn lock(ahead: &SharedAhead) -> MutexGuard<'_, Option<Ahead>> {
    // A cache: what a panicking holder left is still what was read.
    ahead.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The channel captures are announced on, so that the instance holding a
/// connector's lease applies what another instance captured at once.
const CAPTURES_CHANNEL: &str = "ldapsync_captures";

/// The connection thread's state.
struct Session {
    target: Target,
    client: Option<Client>,
    /// Statements prepared on `client`, by their SQL: preparing is a round
    /// trip, and a pass runs the same few statements for every entry.
    statements: HashMap<String, Statement>,
    batch: Option<Batch>,
    ahead: SharedAhead,
    fence: Option<Fence>,
}

#[derive(Default)]
struct Batch {
    held: usize,
    open: bool,
    /// Writes committed in this batch, and how many there were when its
    /// tables were last analysed.
    committed: usize,
    analysed_at: usize,
}

fn error(e: postgres::Error) -> StoreError {
    StoreError::Postgres(e)
}

/// A connection with its prepared statements: the methods of `Client`
/// the store uses, each preparing its SQL once per connection.
struct Db<'a> {
    client: &'a mut Client,
    statements: &'a mut HashMap<String, Statement>,
}

type Params<'p> = [&'p (dyn ToSql + Sync)];

impl Db<'_> {
    fn statement(&mut self, sql: &str) -> Result<Statement, postgres::Error> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql)?;
        self.statements.insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }

    fn execute(&mut self, sql: &str, params: &Params<'_>) -> Result<u64, postgres::Error> {
        let statement = self.statement(sql)?;
        self.client.execute(&statement, params)
    }

    fn query(&mut self, sql: &str, params: &Params<'_>) -> Result<Vec<Row>, postgres::Error> {
        let statement = self.statement(sql)?;
        self.client.query(&statement, params)
    }

    /// Planned for these parameters, every time: a plan kept from when a
    /// table was small would scan it whole once it has grown.
    fn query_planned(&mut self, sql: &str, params: &Params<'_>) -> Result<Vec<Row>, postgres::Error> {
        self.client.query(sql, params)
    }

    /// Every row converted as it arrives: a whole table is never held
    /// twice, as rows and as records.
    fn query_each<T>(
        &mut self,
        sql: &str,
        params: &Params<'_>,
        mut convert: impl FnMut(&Row) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        let statement = self.statement(sql).map_err(error)?;
        let mut rows = self
            .client
            .query_raw(&statement, params.iter().copied())
            .map_err(error)?;
        let mut records = Vec::new();
        while let Some(row) = rows.next().map_err(error)? {
            records.push(convert(&row)?);
        }
        Ok(records)
    }

    fn query_opt(&mut self, sql: &str, params: &Params<'_>) -> Result<Option<Row>, postgres::Error> {
        let statement = self.statement(sql)?;
        self.client.query_opt(&statement, params)
    }

    fn query_one(&mut self, sql: &str, params: &Params<'_>) -> Result<Row, postgres::Error> {
        let statement = self.statement(sql)?;
        self.client.query_one(&statement, params)
    }

    fn batch_execute(&mut self, sql: &str) -> Result<(), postgres::Error> {
        self.client.batch_execute(sql)
    }

    fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// The connection itself, for transactions and notifications.
    fn raw(&mut self) -> &mut Client {
        self.client
    }
}

impl Session {
    /// The connection, opened (again) if need be, with its statement cache.
    fn client(&mut self) -> Result<Db<'_>, StoreError> {
        // What a read may look for is sent first.
        if lock(&self.ahead).as_ref().is_some_and(|a| !a.created.is_empty()) {
            self.flush()?;
        }
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.statements.clear();
            // A transaction open on a lost connection is lost with it.
            if let Some(batch) = &mut self.batch {
                batch.open = false;
                batch.held = 0;
            }
            let mut client = match &self.target.tls {
                Some(tls) => self
                    .target
                    .config
                    .connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls.clone())),
                None => self.target.config.connect(NoTls),
            }
            .map_err(|source| StoreError::Connect {
                url: self.target.shown.clone(),
                source,
            })?;
            client
                .batch_execute(&format!(
                    "SET idle_in_transaction_session_timeout = {}",
                    IDLE_IN_TRANSACTION.as_millis()
                ))
                .map_err(error)?;
            self.client = Some(client);
        }
        Ok(Db {
            client: self.client.as_mut().expect("connected above"),
            statements: &mut self.statements,
        })
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let mut db = self.client()?;
        let mut tx = db.raw().transaction().map_err(error)?;
        // One instance migrates; the others wait for its lock.
        tx.batch_execute(
            "SELECT pg_advisory_xact_lock(4242001);
             CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)",
        )
        .map_err(error)?;
        let version: i64 = match tx.query_opt("SELECT version FROM schema_version", &[]).map_err(error)? {
            Some(row) => row.get(0),
            None => {
                tx.execute("INSERT INTO schema_version VALUES (0)", &[])
                    .map_err(error)?;
                0
            }
        };
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(StoreError::TooNew { found: version, known });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            tx.batch_execute(sql).map_err(error)?;
            tx.execute("UPDATE schema_version SET version = $1", &[&(i as i64 + 1)])
                .map_err(error)?;
        }
        tx.commit().map_err(error)
    }

    /// Runs one atomic write, as the SQLite store does: a transaction of
    /// its own, or a savepoint of the batch's. Under a fence, the lease is
    /// checked (and its row locked against a takeover) in the same
    /// transaction, so a worker that lost its lease writes nothing.
    fn write<T>(&mut self, f: impl FnOnce(&mut Db<'_>) -> Result<T, StoreError>) -> Result<T, StoreError> {
        self.flush()?;
        let fence = self.fence.clone();
        let in_batch = self.batch.is_some();
        let opened = self.batch.as_ref().is_some_and(|b| b.open);
        if !opened {
            self.client()?.batch_execute("BEGIN").map_err(error)?;
        }
        if let Some(batch) = &mut self.batch {
            batch.open = true;
        }
        let mut db = self.client()?;
        let client = &mut db;
        let written = (|| {
            client.batch_execute("SAVEPOINT w").map_err(error)?;
            if let Some(fence) = &fence {
                let held = client
                    .query_opt(
                        "SELECT 1 FROM leases WHERE connector = $1 AND holder = $2 AND token = $3
                           AND expires_at > clock_timestamp() FOR SHARE",
                        &[&fence.connector, &fence.holder, &fence.token],
                    )
                    .map_err(error)?;
                if held.is_none() {
                    return Err(StoreError::LeaseLost {
                        connector: fence.connector.clone(),
                    });
                }
            }
            let value = f(&mut *client)?;
            client.batch_execute("RELEASE SAVEPOINT w").map_err(error)?;
            Ok(value)
        })();
        if written.is_err() && !client.is_closed() {
            let _ = client.batch_execute("ROLLBACK TO SAVEPOINT w; RELEASE SAVEPOINT w");
        }
        if in_batch {
            if matches!(written, Err(StoreError::LeaseLost { .. })) {
                // Under a lost lease nothing of the batch may stand.
                self.rollback();
            } else {
                self.held_one()?;
            }
        } else if written.is_ok() {
            self.finish()?;
        } else {
            self.rollback();
        }
        written
    }

    /// Counts one more write in the batch (and the creations deferred
    /// without a round trip), which commits when it is full.
    fn held_one(&mut self) -> Result<(), StoreError> {
        let deferred = lock(&self.ahead)
            .as_mut()
            .map_or(0, |a| std::mem::take(&mut a.uncounted));
        let batch = self.batch.as_mut().expect("in a batch");
        batch.held += 1 + deferred;
        if batch.held >= BATCH_WRITES {
            self.commit_open()?;
        }
        Ok(())
    }

    /// Sends the creations the look-ahead deferred.
    fn flush(&mut self) -> Result<(), StoreError> {
        let created = match &mut *lock(&self.ahead) {
            Some(ahead) if !ahead.created.is_empty() => std::mem::take(&mut ahead.created),
            _ => return Ok(()),
        };
        match self.write(|c| insert_created(c, &created)) {
            Ok(()) => Ok(()),
            Err(e @ StoreError::LeaseLost { .. }) => Err(e),
            Err(e) if self.client.as_ref().is_none_or(Client::is_closed) => Err(e),
            // One of them cannot be written: each on its own, so that the
            // decisions before it stand and its own error is the one told.
            Err(_) => {
                if let Some(ahead) = &mut *lock(&self.ahead) {
                    ahead.forget_all();
                }
                for k in created {
                    self.write(move |c| write_commit(c, &k.commit, Some(k.id)))?;
                }
                Ok(())
            }
        }
    }

    fn finish(&mut self) -> Result<(), StoreError> {
        let client = self.client.as_mut().expect("a transaction is open");
        if let Err(e) = client.batch_execute("COMMIT") {
            let _ = client.batch_execute("ROLLBACK");
            return Err(error(e));
        }
        Ok(())
    }

    fn rollback(&mut self) {
        if let Some(client) = self.client.as_mut().filter(|c| !c.is_closed()) {
            let _ = client.batch_execute("ROLLBACK");
        }
        if let Some(ahead) = &mut *lock(&self.ahead) {
            ahead.created.clear();
            ahead.uncounted = 0;
            ahead.forget_all();
        }
        if let Some(batch) = &mut self.batch {
            batch.open = false;
            batch.held = 0;
        }
    }

    fn commit_open(&mut self) -> Result<(), StoreError> {
        // What was decided before a creation that fails stands all the same.
        let flushed = self.flush();
        if let Some(ahead) = &mut *lock(&self.ahead) {
            ahead.uncounted = 0;
        }
        let committed = match &mut self.batch {
            Some(batch) if batch.open => {
                batch.open = false;
                batch.committed += std::mem::take(&mut batch.held);
                self.finish().and_then(|()| self.analyse_grown())
            }
            _ => Ok(()),
        };
        flushed.and(committed)
    }

    /// Analyses the tables a batch fills each time its writes have
    /// doubled. Autovacuum analyses them a minute later at best; until
    /// then the planner takes a table an import is filling for the handful
    /// of rows it had, and looks the next chunk's entries up by walking
    /// everything written so far (a first import of 100,000 objects: 18 s,
    /// 12 s of them such walks).
    fn analyse_grown(&mut self) -> Result<(), StoreError> {
        let Some(batch) = self.batch.as_mut() else {
            return Ok(());
        };
        if batch.committed < 2 * batch.analysed_at.max(BATCH_WRITES) {
            return Ok(());
        }
        batch.analysed_at = batch.committed;
        self.client()?
            .client
            .batch_execute("ANALYZE objects, associations, changes")
            .map_err(error)
    }
}

impl PostgresStore {
    /// Connects, creating or upgrading the schema.
    pub fn open(target: Target) -> Result<PostgresStore, StoreError> {
        let store = PostgresStore::start(target)?;
        store.call(Session::migrate)?;
        Ok(store)
    }

    /// Connects and changes nothing (check-config).
    pub fn reach(target: Target) -> Result<(), StoreError> {
        PostgresStore::start(target)?.call(|s| s.client().map(drop))
    }

    /// The connection thread; it connects at the first job.
    fn start(target: Target) -> Result<PostgresStore, StoreError> {
        let shown = target.shown.clone();
        let for_thread = target.clone();
        let (jobs, queue) = mpsc::channel::<Job>();
        let ahead = SharedAhead::default();
        let for_thread_ahead = ahead.clone();
        std::thread::Builder::new()
            .name("postgres-store".into())
            .spawn(move || {
                let mut session = Session {
                    target: for_thread,
                    client: None,
                    statements: HashMap::new(),
                    batch: None,
                    ahead: for_thread_ahead,
                    fence: None,
                };
                // Ends when the store is dropped.
                while let Ok(job) = queue.recv() {
                    job(&mut session);
                }
                // A batch never committed is a pass cut short: the next one
                // makes its decisions again.
                if session.batch.as_ref().is_some_and(|b| b.open) {
                    session.rollback();
                }
            })
            .map_err(|source| StoreError::Io {
                path: shown.clone(),
                source,
            })?;
        Ok(PostgresStore {
            jobs,
            target: Arc::new(target),
            ahead,
        })
    }

    /// The URL without its password.
    pub fn shown(&self) -> &str {
        &self.target.shown
    }

    /// Calls `on(Some(connector))` for every batch of captures any instance
    /// journals for a connector, and `on(None)` whenever the listening
    /// connection is (re)opened, when some may have been missed; on its
    /// own thread and connection, for the life of the process.
    pub fn listen_captures(&self, on: impl Fn(Option<&str>) + Send + 'static) -> Result<(), StoreError> {
        let target = Target::clone(&self.target);
        std::thread::Builder::new()
            .name("postgres-listen".into())
            .spawn(move || {
                let mut session = Session {
                    target,
                    client: None,
                    statements: HashMap::new(),
                    batch: None,
                    ahead: SharedAhead::default(),
                    fence: None,
                };
                loop {
                    let listening = session
                        .client()
                        .and_then(|mut c| c.batch_execute(&format!("LISTEN {CAPTURES_CHANNEL}")).map_err(error));
                    if listening.is_err() {
                        session.client = None;
                        std::thread::sleep(Duration::from_secs(1));
                        continue;
                    }
                    on(None);
                    let client = session.client.as_mut().expect("listening above");
                    loop {
                        // A fresh iterator each time: one that timed out
                        // answers at once ever after.
                        let next = client.notifications().timeout_iter(Duration::from_secs(5)).next();
                        match next {
                            Ok(Some(n)) => on(Some(n.payload())),
                            Ok(None) if !client.is_closed() => {}
                            _ => break,
                        }
                    }
                    session.client = None;
                }
            })
            .map(drop)
            .map_err(|source| StoreError::Io {
                path: self.target.shown.clone(),
                source,
            })
    }

    fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Session) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, answer) = mpsc::sync_channel(1);
        let gone = || StoreError::Closed {
            url: self.target.shown.clone(),
        };
        self.jobs
            .send(Box::new(move |session| {
                let _ = reply.send(f(session));
            }))
            .map_err(|_| gone())?;
        answer.recv().map_err(|_| gone())?
    }

    /// A read on the connection (outside any write, or inside the open batch).
    fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Db<'_>) -> Result<T, postgres::Error> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.call(move |s| f(&mut s.client()?).map_err(error))
    }

    fn write<T: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut Db<'_>) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        // Not a commit: the look-ahead cannot tell what it changed.
        self.call(move |s| {
            if let Some(ahead) = &mut *lock(&s.ahead) {
                ahead.forget_all();
            }
            s.write(f)
        })
    }

    /// From now on every write commits only while `fence` holds its lease.
    pub fn set_fence(&mut self, fence: Option<Fence>) -> Result<(), StoreError> {
        self.call(move |s| {
            s.fence = fence;
            Ok(())
        })
    }

    /// Takes the connector's lease if it is free or expired: a new token,
    /// which fences out every earlier holder.
    pub fn acquire_lease(&self, connector: &str, holder: &str, ttl: Duration) -> Result<Option<Fence>, StoreError> {
        let (connector, holder) = (connector.to_owned(), holder.to_owned());
        let ttl = ttl.as_secs_f64();
        self.read(move |c| {
            let row = c.query_opt(
                "INSERT INTO leases (connector, holder, token, acquired_at, expires_at)
                 VALUES ($1, $2, 1, clock_timestamp(), clock_timestamp() + make_interval(secs => $3))
                 ON CONFLICT (connector) DO UPDATE SET holder = excluded.holder, token = leases.token + 1,
                   acquired_at = excluded.acquired_at, expires_at = excluded.expires_at
                 WHERE leases.expires_at <= clock_timestamp()
                 RETURNING token",
                &[&connector, &holder, &ttl],
            )?;
            Ok(row.map(|r| Fence {
                connector,
                holder,
                token: r.get(0),
            }))
        })
    }

    /// Extends a held lease; false if it was lost (expired, or taken over).
    pub fn renew_lease(&self, fence: &Fence, ttl: Duration) -> Result<bool, StoreError> {
        let fence = fence.clone();
        let ttl = ttl.as_secs_f64();
        self.read(move |c| {
            let renewed = c.execute(
                "UPDATE leases SET expires_at = clock_timestamp() + make_interval(secs => $4)
                 WHERE connector = $1 AND holder = $2 AND token = $3 AND expires_at > clock_timestamp()",
                &[&fence.connector, &fence.holder, &fence.token, &ttl],
            )?;
            Ok(renewed == 1)
        })
    }

    /// Gives a lease up at once (a clean shutdown), for another instance
    /// to take without waiting for it to expire.
    pub fn release_lease(&self, fence: &Fence) -> Result<(), StoreError> {
        let fence = fence.clone();
        self.read(move |c| {
            c.execute(
                "UPDATE leases SET expires_at = clock_timestamp()
                 WHERE connector = $1 AND holder = $2 AND token = $3",
                &[&fence.connector, &fence.holder, &fence.token],
            )
            .map(drop)
        })
    }

    /// Records that the connector needs a full comparison. Not fenced:
    /// any instance that lost a capture may say so, for the holder.
    pub fn record_out_of_sync(&self, connector: &str, reason: &str) -> Result<(), StoreError> {
        let (connector, reason) = (connector.to_owned(), reason.to_owned());
        self.read(move |c| {
            c.execute(
                "INSERT INTO connector_state (connector, last_result, out_of_sync) VALUES ($1, '{}', $2)
                 ON CONFLICT (connector) DO UPDATE SET out_of_sync = excluded.out_of_sync",
                &[&connector, &reason],
            )
            .map(drop)
        })
    }

    /// Registers (or refreshes) an instance; its heartbeat is now.
    pub fn heartbeat(&self, instance: &Instance) -> Result<(), StoreError> {
        let i = instance.clone();
        self.read(move |c| {
            c.execute(
                "INSERT INTO instances (id, host, pid, listeners, version, started_at, heartbeat)
                 VALUES ($1, $2, $3, $4, $5, $6, clock_timestamp())
                 ON CONFLICT (id) DO UPDATE SET heartbeat = excluded.heartbeat, listeners = excluded.listeners",
                &[&i.id, &i.host, &i.pid, &i.listeners, &i.version, &i.started_at],
            )
            .map(drop)
        })
    }

    /// Removes an instance's registration (a clean shutdown).
    pub fn deregister(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.read(move |c| c.execute("DELETE FROM instances WHERE id = $1", &[&id]).map(drop))
    }

    pub fn instances(&self) -> Result<Vec<Instance>, StoreError> {
        self.read(|c| {
            let rows = c.query(
                "SELECT id, host, pid, listeners, version, started_at,
                        extract(epoch FROM clock_timestamp() - heartbeat)::bigint
                   FROM instances ORDER BY started_at, id",
                &[],
            )?;
            Ok(rows
                .iter()
                .map(|r| Instance {
                    id: r.get(0),
                    host: r.get(1),
                    pid: r.get(2),
                    listeners: r.get(3),
                    version: r.get(4),
                    started_at: r.get(5),
                    heartbeat_age: r.get(6),
                })
                .collect())
        })
    }

    pub fn leases(&self) -> Result<Vec<Lease>, StoreError> {
        self.read(|c| {
            let rows = c.query(
                "SELECT connector, holder, token,
                        extract(epoch FROM clock_timestamp() - acquired_at)::bigint,
                        extract(epoch FROM expires_at - clock_timestamp())::bigint
                   FROM leases ORDER BY connector",
                &[],
            )?;
            Ok(rows
                .iter()
                .map(|r| Lease {
                    connector: r.get(0),
                    holder: r.get(1),
                    token: r.get(2),
                    age: r.get(3),
                    expires_in: r.get(4),
                })
                .collect())
        })
    }
}

const OBJECT_COLUMNS: &str = r#"o.id, o.category, o.name, o.enabled, o."values""#;

fn object_from(row: &Row) -> Result<LocalObject, StoreError> {
    Ok(LocalObject {
        id: row.get(0),
        category: parse("category", row.get(1))?,
        name: row.get(2),
        enabled: row.get(3),
        values: from_json("object values", row.get(4))?,
    })
}

const ASSOCIATION_COLUMNS: &str = "connector, object_id, entry_id, dn, baseline, synced_at, entry_gone";

fn association_from(row: &Row) -> Result<Association, StoreError> {
    Ok(Association {
        connector: row.get(0),
        object_id: row.get(1),
        entry_id: row.get(2),
        dn: row.get(3),
        baseline: from_json("baseline", row.get(4))?,
        synced_at: row.get(5),
        entry_gone: row.get(6),
    })
}

fn objects(rows: Vec<Row>) -> Result<Vec<LocalObject>, StoreError> {
    rows.iter().map(object_from).collect()
}

fn write_journal(c: &mut Db<'_>, e: &JournalEntry) -> Result<(), StoreError> {
    rows::journal(c, &[None], &[e])
}

/// A new object; `id` is one taken from the sequence already, `None` the next.
fn insert_object(c: &mut Db<'_>, o: &LocalObject, id: Option<i64>) -> Result<i64, StoreError> {
    let row = c
        .query_opt(
            r#"INSERT INTO objects (id, category, name, enabled, "values")
               VALUES (coalesce($5, nextval('objects_id_seq')), $1, $2, $3, $4)
               ON CONFLICT (category, name) DO NOTHING RETURNING id"#,
            &[&o.category.as_str(), &o.name, &o.enabled, &to_json(&o.values), &id],
        )
        .map_err(error)?;
    row.map(|r| r.get(0)).ok_or_else(|| StoreError::Exists {
        category: o.category,
        name: o.name.clone(),
    })
}

/// Gives the object the next local edit number, as the SQLite store does.
fn mark_edited(c: &mut Db<'_>, id: i64) -> Result<(), StoreError> {
    c.execute(
        "WITH n AS (UPDATE counters SET value = value + 1 WHERE name = 'local_edit' RETURNING value)
         UPDATE objects SET edit = (SELECT value FROM n) WHERE id = $1",
        &[&id],
    )
    .map_err(error)?;
    Ok(())
}

fn update_object(c: &mut Db<'_>, o: &LocalObject) -> Result<(), StoreError> {
    let clash = c
        .query_opt(
            "SELECT id FROM objects WHERE category = $1 AND name = $2 AND id != $3",
            &[&o.category.as_str(), &o.name, &o.id],
        )
        .map_err(error)?;
    if clash.is_some() {
        return Err(StoreError::Exists {
            category: o.category,
            name: o.name.clone(),
        });
    }
    c.execute(
        r#"UPDATE objects SET name = $2, enabled = $3, "values" = $4 WHERE id = $1"#,
        &[&o.id, &o.name, &o.enabled, &to_json(&o.values)],
    )
    .map_err(error)?;
    Ok(())
}

fn write_state(c: &mut Db<'_>, s: &ConnectorState) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO connector_state
           (connector, last_sync_at, last_result, last_poll_at, out_of_sync, last_error, local_seen)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (connector) DO UPDATE SET
           last_sync_at = excluded.last_sync_at, last_result = excluded.last_result,
           last_poll_at = excluded.last_poll_at,
           last_error = excluded.last_error, local_seen = excluded.local_seen",
        &[
            &s.connector,
            &s.last_sync_at,
            &s.last_result,
            &s.last_poll_at,
            &s.out_of_sync,
            &s.last_error,
            &s.local_seen,
        ],
    )
    .map_err(error)?;
    Ok(())
}

/// One decision's writes; `id`: the new object's id, taken already.
fn write_commit(c: &mut Db<'_>, commit: &Commit, id: Option<i64>) -> Result<Option<i64>, StoreError> {
    let mut object_id = None;
    if let Some(object) = &commit.object {
        object_id = Some(if object.id == 0 {
            insert_object(c, object, id)?
        } else {
            update_object(c, object)?;
            object.id
        });
    }
    if let Some(id) = commit.delete_object {
        c.execute("DELETE FROM objects WHERE id = $1", &[&id]).map_err(error)?;
    }
    if let Some(a) = &commit.association {
        let id = if a.object_id == 0 {
            object_id.unwrap_or(0)
        } else {
            a.object_id
        };
        c.execute(
            "INSERT INTO associations (connector, object_id, entry_id, dn, baseline, synced_at, entry_gone)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (connector, object_id) DO UPDATE SET
               entry_id = excluded.entry_id, dn = excluded.dn, baseline = excluded.baseline,
               synced_at = excluded.synced_at, entry_gone = excluded.entry_gone",
            &[
                &a.connector,
                &id,
                &a.entry_id,
                &a.dn,
                &to_json(&a.baseline),
                &a.synced_at,
                &a.entry_gone,
            ],
        )
        .map_err(error)?;
    }
    for entry in &commit.journal {
        write_journal(c, entry)?;
    }
    Ok(object_id)
}

impl Store for PostgresStore {
    fn object(&self, category: Category, name: &str) -> Result<Option<LocalObject>, StoreError> {
        if let Some(known) = lock(&self.ahead).as_ref().and_then(|a| a.object(category, name)) {
            return Ok(known);
        }
        let name = name.to_owned();
        self.call(move |s| {
            let row = s
                .client()?
                .query_opt(
                    &format!("SELECT {OBJECT_COLUMNS} FROM objects o WHERE category = $1 AND name = $2"),
                    &[&category.as_str(), &name],
                )
                .map_err(error)?;
            row.as_ref().map(object_from).transpose()
        })
    }

    fn object_by_id(&self, id: i64) -> Result<Option<LocalObject>, StoreError> {
        if let Some(known) = lock(&self.ahead).as_ref().and_then(|a| a.object_by_id(id)) {
            return Ok(known);
        }
        self.call(move |s| {
            let row = s
                .client()?
                .query_opt(&format!("SELECT {OBJECT_COLUMNS} FROM objects o WHERE id = $1"), &[&id])
                .map_err(error)?;
            row.as_ref().map(object_from).transpose()
        })
    }

    fn objects(&self, category: Category) -> Result<Vec<LocalObject>, StoreError> {
        self.call(move |s| {
            s.client()?.query_each(
                &format!("SELECT {OBJECT_COLUMNS} FROM objects o WHERE category = $1 ORDER BY name"),
                &[&category.as_str()],
                object_from,
            )
        })
    }

    fn insert_object(&mut self, object: &LocalObject, journal: &JournalEntry) -> Result<i64, StoreError> {
        let (object, journal) = (object.clone(), journal.clone());
        self.write(move |c| {
            let id = insert_object(c, &object, None)?;
            mark_edited(c, id)?;
            write_journal(c, &journal)?;
            Ok(id)
        })
    }

    fn update_object(&mut self, object: &LocalObject, journal: &JournalEntry) -> Result<(), StoreError> {
        let (object, journal) = (object.clone(), journal.clone());
        self.write(move |c| {
            update_object(c, &object)?;
            mark_edited(c, object.id)?;
            write_journal(c, &journal)
        })
    }

    fn delete_object(&mut self, id: i64, journal: &JournalEntry) -> Result<(), StoreError> {
        let journal = journal.clone();
        self.write(move |c| {
            c.execute("DELETE FROM objects WHERE id = $1", &[&id]).map_err(error)?;
            write_journal(c, &journal)
        })
    }

    fn association_by_entry(&self, connector: &str, entry_id: &str) -> Result<Option<Association>, StoreError> {
        if let Some(known) = lock(&self.ahead)
            .as_ref()
            .and_then(|a| a.association_by_entry(connector, entry_id))
        {
            return Ok(known);
        }
        let (connector, entry_id) = (connector.to_owned(), entry_id.to_owned());
        self.call(move |s| {
            let row = s
                .client()?
                .query_opt(
                    &format!("SELECT {ASSOCIATION_COLUMNS} FROM associations WHERE connector = $1 AND entry_id = $2"),
                    &[&connector, &entry_id],
                )
                .map_err(error)?;
            row.as_ref().map(association_from).transpose()
        })
    }

    fn association_by_object(&self, connector: &str, object_id: i64) -> Result<Option<Association>, StoreError> {
        let connector = connector.to_owned();
        self.call(move |s| {
            let row = s
                .client()?
                .query_opt(
                    &format!("SELECT {ASSOCIATION_COLUMNS} FROM associations WHERE connector = $1 AND object_id = $2"),
                    &[&connector, &object_id],
                )
                .map_err(error)?;
            row.as_ref().map(association_from).transpose()
        })
    }

    fn associations(&self, connector: Option<&str>) -> Result<Vec<Association>, StoreError> {
        let connector = connector.map(str::to_owned);
        self.call(move |s| {
            s.client()?.query_each(
                &format!(
                    "SELECT {ASSOCIATION_COLUMNS} FROM associations
                     WHERE $1::text IS NULL OR connector = $1 ORDER BY connector, object_id"
                ),
                &[&connector],
                association_from,
            )
        })
    }

    fn association_of_object(&self, object_id: i64) -> Result<Option<Association>, StoreError> {
        if let Some(known) = lock(&self.ahead)
            .as_ref()
            .and_then(|a| a.association_of_object(object_id))
        {
            return Ok(known);
        }
        self.call(move |s| {
            let row = s
                .client()?
                .query_opt(
                    &format!(
                        "SELECT {ASSOCIATION_COLUMNS} FROM associations WHERE object_id = $1 ORDER BY connector LIMIT 1"
                    ),
                    &[&object_id],
                )
                .map_err(error)?;
            row.as_ref().map(association_from).transpose()
        })
    }

    fn remove_association(
        &mut self,
        connector: &str,
        object_id: i64,
        journal: &JournalEntry,
    ) -> Result<bool, StoreError> {
        let (connector, journal) = (connector.to_owned(), journal.clone());
        self.write(move |c| {
            let removed = c
                .execute(
                    "DELETE FROM associations WHERE connector = $1 AND object_id = $2",
                    &[&connector, &object_id],
                )
                .map_err(error)?;
            if removed > 0 {
                c.execute(
                    "DELETE FROM held_deletes WHERE connector = $1 AND object_id = $2",
                    &[&connector, &object_id],
                )
                .map_err(error)?;
                mark_edited(c, object_id)?;
                write_journal(c, &journal)?;
            }
            Ok(removed > 0)
        })
    }

    fn commit(&mut self, commit: Commit) -> Result<Option<i64>, StoreError> {
        if let Some(ahead) = lock(&self.ahead).as_mut().filter(|a| a.defers_here(&commit)) {
            return Ok(Some(ahead.defer_here(commit)));
        }
        self.call(move |s| {
            // Out of the lock while the connection is used: flushing takes it.
            let taken = lock(&s.ahead).take();
            let commit = match taken {
                Some(mut ahead) if s.batch.is_some() => {
                    let deferred = s.client().and_then(|mut c| ahead.defer(&mut c, commit));
                    *lock(&s.ahead) = Some(ahead);
                    match deferred? {
                        Ok(id) => {
                            s.held_one()?;
                            return Ok(Some(id));
                        }
                        Err(commit) => commit,
                    }
                }
                ahead => {
                    *lock(&s.ahead) = ahead;
                    commit
                }
            };
            if let Some(ahead) = &mut *lock(&s.ahead) {
                let ids: Vec<i64> = [
                    commit.object.as_ref().map(|o| o.id),
                    commit.delete_object,
                    commit.association.as_ref().map(|a| a.object_id),
                ]
                .into_iter()
                .flatten()
                .filter(|id| *id != 0)
                .collect();
                let names: Vec<&str> = commit.object.iter().map(|o| o.name.as_str()).collect();
                let entry_ids: Vec<&str> = commit.association.iter().map(|a| a.entry_id.as_str()).collect();
                ahead.forget(&ids, &names, &entry_ids);
            }
            s.write(|c| write_commit(c, &commit, None))
        })
    }

    fn journal(&self, query: &JournalQuery) -> Result<Vec<JournalLine>, StoreError> {
        let query = query.clone();
        let limit = if query.limit == 0 { i64::MAX } else { query.limit as i64 };
        self.call(move |s| {
            let rows = s
                .client()?
                .query(
                    "SELECT id, at, connector, category, object, source, action, policy, detail FROM (
                       SELECT * FROM journal
                       WHERE ($1::text IS NULL OR connector = $1) AND ($2::text IS NULL OR object = $2)
                         AND ($3::text IS NULL OR action = $3) AND ($4::text IS NULL OR source = $4)
                         AND ($5::bigint IS NULL OR at >= $5) AND ($6::bigint IS NULL OR at < $6)
                         AND ($7::bigint IS NULL OR id < $7)
                       ORDER BY id DESC LIMIT $8
                     ) j ORDER BY id",
                    &[
                        &query.connector,
                        &query.object,
                        &query.action.map(Action::as_str),
                        &query.source.map(ChangeSource::as_str),
                        &query.since,
                        &query.until,
                        &query.before,
                        &limit,
                    ],
                )
                .map_err(error)?;
            rows.iter()
                .map(|r| {
                    Ok(JournalLine {
                        id: r.get(0),
                        entry: JournalEntry {
                            at: r.get(1),
                            connector: r.get(2),
                            category: parse("category", r.get(3))?,
                            object: r.get(4),
                            source: parse::<ChangeSource>("journal source", r.get(5))?,
                            action: parse::<Action>("journal action", r.get(6))?,
                            policy: r.get(7),
                            detail: r.get(8),
                        },
                    })
                })
                .collect()
        })
    }

    fn association_count(&self, connector: &str, category: Category) -> Result<usize, StoreError> {
        let connector = connector.to_owned();
        self.read(move |c| {
            let row = c.query_one(
                "SELECT count(*) FROM associations a JOIN objects o ON o.id = a.object_id
                 WHERE a.connector = $1 AND o.category = $2",
                &[&connector, &category.as_str()],
            )?;
            Ok(row.get::<_, i64>(0) as usize)
        })
    }

    fn count_journal(&self, connector: &str, actions: &[Action], since: i64) -> Result<usize, StoreError> {
        let connector = connector.to_owned();
        let actions: Vec<&'static str> = actions.iter().map(|a| a.as_str()).collect();
        self.read(move |c| {
            let row = c.query_one(
                "SELECT count(*) FROM journal WHERE connector = $1 AND at >= $2 AND action = ANY($3)",
                &[&connector, &since, &actions],
            )?;
            Ok(row.get::<_, i64>(0) as usize)
        })
    }

    fn object_associated_at(&self, connector: &str, dn: &str) -> Result<Option<LocalObject>, StoreError> {
        let (connector, dn) = (connector.to_owned(), dn.to_owned());
        self.call(move |s| {
            let row = s
                .client()?
                .query_opt(
                    &format!(
                        "SELECT {OBJECT_COLUMNS} FROM objects o JOIN associations a ON a.object_id = o.id
                         WHERE a.connector = $1 AND lower(a.dn) = lower($2) LIMIT 1"
                    ),
                    &[&connector, &dn],
                )
                .map_err(error)?;
            row.as_ref().map(object_from).transpose()
        })
    }

    fn connector_state(&self, connector: &str) -> Result<Option<ConnectorState>, StoreError> {
        let connector = connector.to_owned();
        self.read(move |c| {
            let row = c.query_opt(
                "SELECT connector, last_sync_at, last_result, last_poll_at, out_of_sync, last_error, local_seen
                 FROM connector_state WHERE connector = $1",
                &[&connector],
            )?;
            Ok(row.map(|r| ConnectorState {
                connector: r.get(0),
                last_sync_at: r.get(1),
                last_result: r.get(2),
                last_poll_at: r.get(3),
                out_of_sync: r.get(4),
                last_error: r.get(5),
                local_seen: r.get(6),
            }))
        })
    }

    fn set_connector_state(&mut self, state: &ConnectorState) -> Result<(), StoreError> {
        let state = state.clone();
        self.write(move |c| write_state(c, &state))
    }

    fn mark_out_of_sync(&mut self, connector: &str, reason: &str) -> Result<(), StoreError> {
        self.record_out_of_sync(connector, reason)
    }

    fn hold_deletes(&mut self, associations: &[Association]) -> Result<(), StoreError> {
        let at = super::now();
        let held: Vec<(String, i64)> = associations
            .iter()
            .map(|a| (a.connector.clone(), a.object_id))
            .collect();
        self.write(move |c| {
            for (connector, object_id) in &held {
                c.execute(
                    "INSERT INTO held_deletes (connector, object_id, held_at) VALUES ($1, $2, $3)
                     ON CONFLICT DO NOTHING",
                    &[connector, object_id, &at],
                )
                .map_err(error)?;
            }
            Ok(())
        })
    }

    fn held_deletes(&self, connector: &str) -> Result<Vec<HeldDelete>, StoreError> {
        let connector = connector.to_owned();
        self.call(move |s| {
            let rows = s
                .client()?
                .query(
                    "SELECT o.category, o.name, o.id, a.entry_id, a.dn, h.held_at
                       FROM held_deletes h
                       JOIN objects o ON o.id = h.object_id
                       JOIN associations a ON a.connector = h.connector AND a.object_id = h.object_id
                      WHERE h.connector = $1 AND NOT a.entry_gone
                      ORDER BY o.category, o.name",
                    &[&connector],
                )
                .map_err(error)?;
            rows.iter()
                .map(|r| {
                    Ok(HeldDelete {
                        category: parse("category", r.get(0))?,
                        name: r.get(1),
                        object_id: r.get(2),
                        entry_id: r.get(3),
                        dn: r.get(4),
                        held_at: r.get(5),
                    })
                })
                .collect()
        })
    }

    fn release_held_delete(&mut self, connector: &str, object_id: i64) -> Result<(), StoreError> {
        let connector = connector.to_owned();
        self.write(move |c| {
            c.execute(
                "DELETE FROM held_deletes WHERE connector = $1 AND object_id = $2",
                &[&connector, &object_id],
            )
            .map_err(error)?;
            Ok(())
        })
    }

    fn append_captures(&mut self, captures: &[Capture]) -> Result<(), StoreError> {
        let captures = captures.to_vec();
        // Every instance captures: the journal is not fenced.
        self.call(move |s| {
            let mut db = s.client()?;
            let mut tx = db.raw().transaction().map_err(error)?;
            let insert = tx
                .prepare(
                    "INSERT INTO captures (connector, category, kind, dn, captured_at) VALUES ($1, $2, $3, $4, $5)",
                )
                .map_err(error)?;
            for c in &captures {
                tx.execute(
                    &insert,
                    &[
                        &c.connector,
                        &c.category.as_str(),
                        &c.kind.as_str(),
                        &c.dn,
                        &c.captured_at,
                    ],
                )
                .map_err(error)?;
            }
            let mut connectors: Vec<&str> = captures.iter().map(|c| c.connector.as_str()).collect();
            connectors.sort_unstable();
            connectors.dedup();
            for connector in connectors {
                // Delivered at commit, to every listening instance.
                tx.execute("SELECT pg_notify($1, $2)", &[&CAPTURES_CHANNEL, &connector])
                    .map_err(error)?;
            }
            tx.commit().map_err(error)
        })
    }

    fn captures(&self, connector: &str, limit: usize) -> Result<Vec<Capture>, StoreError> {
        let connector = connector.to_owned();
        let limit = limit as i64;
        self.call(move |s| {
            let rows = s
                .client()?
                .query(
                    "SELECT id, connector, category, kind, dn, captured_at FROM captures
                     WHERE connector = $1 ORDER BY id LIMIT $2",
                    &[&connector, &limit],
                )
                .map_err(error)?;
            rows.iter()
                .map(|r| {
                    let kind: String = r.get(3);
                    Ok(Capture {
                        id: r.get(0),
                        connector: r.get(1),
                        category: parse("category", r.get(2))?,
                        kind: CaptureKind::parse(&kind).ok_or(StoreError::Corrupt {
                            what: "capture kind",
                            detail: kind,
                        })?,
                        dn: r.get(4),
                        captured_at: r.get(5),
                    })
                })
                .collect()
        })
    }

    fn pending_captures(&self, connector: &str) -> Result<usize, StoreError> {
        let connector = connector.to_owned();
        self.read(move |c| {
            let row = c.query_one("SELECT count(*) FROM captures WHERE connector = $1", &[&connector])?;
            Ok(row.get::<_, i64>(0) as usize)
        })
    }

    fn remove_capture(&mut self, id: i64) -> Result<(), StoreError> {
        self.write(move |c| {
            c.execute("DELETE FROM captures WHERE id = $1", &[&id]).map_err(error)?;
            Ok(())
        })
    }

    fn watermark(&self, connector: &str, category: Category) -> Result<Option<Watermark>, StoreError> {
        let connector = connector.to_owned();
        self.call(move |s| {
            let row = s
                .client()?
                .query_opt(
                    "SELECT mechanism, server, value, updated_at FROM watermarks WHERE connector = $1 AND category = $2",
                    &[&connector, &category.as_str()],
                )
                .map_err(error)?;
            row.map(|r| {
                Ok(Watermark {
                    connector: connector.clone(),
                    category,
                    mechanism: parse("watermark mechanism", r.get(0))?,
                    server: r.get(1),
                    value: r.get(2),
                    updated_at: r.get(3),
                })
            })
            .transpose()
        })
    }

    fn finish_poll(
        &mut self,
        state: &ConnectorState,
        watermarks: &[Watermark],
        cleared: Option<&str>,
    ) -> Result<(), StoreError> {
        let (state, watermarks, cleared) = (state.clone(), watermarks.to_vec(), cleared.map(str::to_owned));
        self.write(move |c| {
            for w in &watermarks {
                c.execute(
                    "INSERT INTO watermarks (connector, category, mechanism, server, value, updated_at)
                     VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (connector, category) DO UPDATE SET mechanism = excluded.mechanism,
                       server = excluded.server, value = excluded.value, updated_at = excluded.updated_at",
                    &[
                        &w.connector,
                        &w.category.as_str(),
                        &w.mechanism.as_str(),
                        &w.server,
                        &w.value,
                        &w.updated_at,
                    ],
                )
                .map_err(error)?;
            }
            write_state(c, &state)?;
            c.execute(
                "UPDATE connector_state SET out_of_sync = NULL WHERE connector = $1 AND out_of_sync = $2",
                &[&state.connector, &cleared],
            )
            .map_err(error)?;
            Ok(())
        })
    }

    fn edited_since(&self, category: Category, edit: i64) -> Result<Vec<LocalObject>, StoreError> {
        self.call(move |s| {
            objects(
                s.client()?
                    .query(
                        &format!(
                            "SELECT {OBJECT_COLUMNS} FROM objects o WHERE category = $1 AND edit > $2 ORDER BY edit"
                        ),
                        &[&category.as_str(), &edit],
                    )
                    .map_err(error)?,
            )
        })
    }

    fn last_edit(&self) -> Result<i64, StoreError> {
        self.read(|c| {
            c.query_one("SELECT value FROM counters WHERE name = 'local_edit'", &[])
                .map(|r| r.get(0))
        })
    }

    fn begin_batch(&mut self) {
        // A closed thread shows at the first write of the batch.
        let _ = self.call(|s| {
            s.batch.get_or_insert_default();
            Ok(())
        });
    }

    fn look_ahead(
        &mut self,
        connector: &str,
        category: Category,
        entries: &[(String, Option<String>)],
    ) -> Result<(), StoreError> {
        let (connector, entries) = (connector.to_owned(), entries.to_vec());
        self.call(move |s| {
            if s.batch.is_none() {
                return Ok(());
            }
            s.flush()?;
            let before = lock(&s.ahead).take();
            let ahead = Ahead::read(&mut s.client()?, &connector, category, &entries, before)?;
            *lock(&s.ahead) = Some(ahead);
            Ok(())
        })
    }

    fn commit_batch(&mut self) -> Result<(), StoreError> {
        self.call(Session::commit_open)
    }

    fn end_batch(&mut self) -> Result<(), StoreError> {
        self.call(|s| {
            let committed = s.commit_open();
            s.batch = None;
            *lock(&s.ahead) = None;
            committed
        })
    }
}

impl PostgresStore {
    /// Every table's rows, for `store copy`.
    pub(super) fn export(&self) -> Result<Tables, StoreError> {
        let mut tables = Tables {
            local_edit: self.last_edit()?,
            associations: self.associations(None)?,
            ..Tables::default()
        };
        let (objects, states, captures, watermarks, held) = self.read(|c| {
            let objects = c.query(&format!("SELECT {OBJECT_COLUMNS}, o.edit FROM objects o"), &[])?;
            let states: Vec<String> = c
                .query("SELECT connector FROM connector_state", &[])?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let captures: Vec<String> = c
                .query("SELECT DISTINCT connector FROM captures", &[])?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let watermarks: Vec<(String, String)> = c
                .query("SELECT connector, category FROM watermarks", &[])?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            let held: Vec<(String, i64, i64)> = c
                .query("SELECT connector, object_id, held_at FROM held_deletes", &[])?
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect();
            Ok((objects, states, captures, watermarks, held))
        })?;
        for row in &objects {
            tables.objects.push((object_from(row)?, row.get(5)));
        }
        let lines = self.journal(&JournalQuery::default())?;
        tables.journal = lines.into_iter().map(|l| (l.id, l.entry)).collect();
        for name in states {
            tables.states.extend(self.connector_state(&name)?);
        }
        for name in captures {
            tables.captures.extend(self.captures(&name, usize::MAX >> 1)?);
        }
        for (connector, category) in watermarks {
            tables
                .watermarks
                .extend(self.watermark(&connector, parse("category", &category)?)?);
        }
        tables.held_deletes = held;
        Ok(tables.sorted())
    }

    /// Writes every table's rows, ids kept, in one transaction; the id
    /// sequences then continue after the copied ids.
    pub(super) fn import(&mut self, tables: &Tables) -> Result<(), StoreError> {
        let t = tables.clone();
        self.write(move |c| {
            // The change feed starts empty in a copy: its triggers would
            // write a change per object and name each by its journal line,
            // only for the copy to delete them. Within the transaction, so
            // a failed copy leaves them as they were.
            c.batch_execute(
                "ALTER TABLE objects DISABLE TRIGGER objects_changed;
                 ALTER TABLE journal DISABLE TRIGGER journal_names_changes;",
            )
            .map_err(error)?;
            // A chunk at a time: a statement per table, not a round trip
            // per row.
            for chunk in t.objects.chunks(COPY_CHUNK) {
                let ids: Vec<i64> = chunk.iter().map(|(o, _)| o.id).collect();
                let objects: Vec<&LocalObject> = chunk.iter().map(|(o, _)| o).collect();
                let edits: Vec<i64> = chunk.iter().map(|(_, edit)| *edit).collect();
                rows::objects(c, &ids, &objects, &edits)?;
            }
            for chunk in t.associations.chunks(COPY_CHUNK) {
                let object_ids: Vec<i64> = chunk.iter().map(|a| a.object_id).collect();
                rows::associations(c, &object_ids, &chunk.iter().collect::<Vec<_>>())?;
            }
            for chunk in t.journal.chunks(COPY_CHUNK) {
                let ids: Vec<Option<i64>> = chunk.iter().map(|(id, _)| Some(*id)).collect();
                rows::journal(c, &ids, &chunk.iter().map(|(_, e)| e).collect::<Vec<_>>())?;
            }
            for state in &t.states {
                write_state(c, state)?;
            }
            for k in &t.captures {
                c.execute(
                    "INSERT INTO captures (id, connector, category, kind, dn, captured_at) VALUES ($1, $2, $3, $4, $5, $6)",
                    &[&k.id, &k.connector, &k.category.as_str(), &k.kind.as_str(), &k.dn, &k.captured_at],
                )
                .map_err(error)?;
            }
            for w in &t.watermarks {
                c.execute(
                    "INSERT INTO watermarks (connector, category, mechanism, server, value, updated_at)
                     VALUES ($1, $2, $3, $4, $5, $6)",
                    &[&w.connector, &w.category.as_str(), &w.mechanism.as_str(), &w.server, &w.value, &w.updated_at],
                )
                .map_err(error)?;
            }
            for (connector, object_id, held_at) in &t.held_deletes {
                c.execute(
                    "INSERT INTO held_deletes (connector, object_id, held_at) VALUES ($1, $2, $3)",
                    &[connector, object_id, held_at],
                )
                .map_err(error)?;
            }
            c.execute(
                "UPDATE counters SET value = $1 WHERE name = 'local_edit'",
                &[&t.local_edit],
            )
            .map_err(error)?;
            // The feed's triggers back on; the tables analysed, so that
            // the first pass after a copy is not planned for empty ones.
            c.batch_execute(
                "SELECT setval('objects_id_seq', coalesce((SELECT max(id) FROM objects), 0) + 1, false);
                 SELECT setval('journal_id_seq', coalesce((SELECT max(id) FROM journal), 0) + 1, false);
                 SELECT setval('captures_id_seq', coalesce((SELECT max(id) FROM captures), 0) + 1, false);
                 ALTER TABLE objects ENABLE TRIGGER objects_changed;
                 ALTER TABLE journal ENABLE TRIGGER journal_names_changes;
                 ANALYZE objects, associations, journal;",
            )
            .map_err(error)?;
            Ok(())
        })
    }
}
