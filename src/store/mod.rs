//! The local store and the sync state: accounts and groups, associations
//! with their baselines, and the journal of every decision.
//!
//! Behind the [`Store`] trait: [`SqliteStore`] is the embedded default,
//! [`PostgresStore`] the state several instances share. A sync decision's
//! local change, its association and its journal lines are committed
//! together by [`Store::commit`]. [`open`] picks the backend the
//! configuration names.

pub mod admin;
mod any;
pub mod copy;
pub mod postgres;
mod sqlite;

use serde::Serialize;
use thiserror::Error;

pub use admin::{AdminStore, ApiToken, ChangeRecord, ConsumerState, Cursor, DeadLetter, ObjectState};
pub use any::{AnyStore, open, reach};
pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

use crate::model::{Action, Category, ChangeSource};
use crate::model::{Mechanism, Values};

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Open { path: String, source: rusqlite::Error },
    #[error("database {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database holds unreadable {what}: {detail}")]
    Corrupt { what: &'static str, detail: String },
    #[error("database schema version {found} is newer than this ldapsync understands ({known})")]
    TooNew { found: i64, known: i64 },
    #[error("cannot connect to the store {url}: {source}")]
    Connect { url: String, source: ::postgres::Error },
    #[error("store: {0}")]
    Postgres(::postgres::Error),
    #[error("the connection thread of the store {url} is gone")]
    Closed { url: String },
    #[error("connector {connector:?}: this instance no longer holds its lease; another one syncs it")]
    LeaseLost { connector: String },
    #[error("store: {0}")]
    Config(String),
    #[error("{category} {name:?} already exists")]
    Exists { category: Category, name: String },
    #[error("no {category} named {name:?}")]
    NotFound { category: Category, name: String },
    /// A name other than an object's (a token's) is taken.
    #[error("{what} {name:?} already exists")]
    Taken { what: &'static str, name: String },
}

impl StoreError {
    /// The store cannot take writes (disk full, read-only, I/O failing),
    /// as opposed to a problem with what was written.
    pub fn is_unwritable(&self) -> bool {
        use rusqlite::ErrorCode::{CannotOpen, DiskFull, ReadOnly, SystemIoFailure};
        match self {
            StoreError::Io { .. } | StoreError::Connect { .. } | StoreError::Closed { .. } => true,
            // PostgreSQL's class 53: insufficient resources (disk full, …).
            StoreError::Postgres(e) => e.is_closed() || e.code().is_some_and(|c| c.code().starts_with("53")),
            StoreError::Open { source, .. } | StoreError::Sqlite(source) => matches!(
                source.sqlite_error_code(),
                Some(DiskFull | ReadOnly | SystemIoFailure | CannotOpen)
            ),
            _ => false,
        }
    }
}

/// An account or group of the application, keyed by category and name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct LocalObject {
    pub id: i64,
    pub category: Category,
    pub name: String,
    pub enabled: bool,
    /// Fields (display_name, mail, aliases, members, …) → values.
    pub values: Values,
}

/// A local object tied to one directory entry by its stable id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Association {
    pub connector: String,
    pub object_id: i64,
    /// entryUUID, or objectGUID as a GUID string.
    pub entry_id: String,
    /// Where the entry was last seen; informational, never used to match.
    pub dn: String,
    /// The mapped values as of the last successful sync of the pair.
    pub baseline: Values,
    pub synced_at: i64,
    /// The entry is no longer in the connector's scope (deleted or moved
    /// out); the delete policy has been applied once.
    pub entry_gone: bool,
}

/// A delete the mass-delete guard refused: held, and reported by every
/// pass, until an operator confirms it or the entry comes back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct HeldDelete {
    pub category: Category,
    pub name: String,
    pub object_id: i64,
    pub entry_id: String,
    /// Where the entry was last seen.
    pub dn: String,
    pub held_at: i64,
}

/// One line of the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct JournalEntry {
    /// Seconds since the Unix epoch.
    pub at: i64,
    pub connector: String,
    pub category: Category,
    pub object: String,
    pub source: ChangeSource,
    /// What was decided: `associated`, `created-local`, `updated`, `disputed`, …
    pub action: Action,
    /// The policy in force, e.g. `both/local-wins`.
    pub policy: String,
    /// Details as JSON: the outcome, the fields that changed or were lost.
    pub detail: String,
}

/// Everything one sync decision changes, committed atomically.
#[derive(Debug, Default)]
pub struct Commit {
    /// A local object to create (`id` 0) or update.
    pub object: Option<LocalObject>,
    /// A local object to delete, by id.
    pub delete_object: Option<i64>,
    /// The pair's new association or baseline. An `object_id` of 0 refers to
    /// the object created by this commit.
    pub association: Option<Association>,
    pub journal: Vec<JournalEntry>,
}

/// Filters for reading the journal: the most recent `limit` lines that
/// match (all when 0), oldest first.
#[derive(Debug, Default, Clone)]
pub struct JournalQuery {
    pub connector: Option<String>,
    pub object: Option<String>,
    pub action: Option<Action>,
    pub source: Option<ChangeSource>,
    /// Lines at or after this time (seconds since the epoch).
    pub since: Option<i64>,
    /// Lines before this time.
    pub until: Option<i64>,
    /// Lines older than the line with this id: the next page back.
    pub before: Option<i64>,
    pub limit: usize,
}

/// A journal line with its id (the journal's order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct JournalLine {
    pub id: i64,
    #[serde(flatten)]
    pub entry: JournalEntry,
}

/// Per-connector bookkeeping for `ldapsync status` and the worker.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectorState {
    pub connector: String,
    /// The last full reconciliation.
    pub last_sync_at: Option<i64>,
    /// The last full reconciliation's report, as JSON.
    pub last_result: String,
    /// The last incremental poll.
    pub last_poll_at: Option<i64>,
    /// Why the connector needs a full reconciliation (a capture could not be
    /// journaled, …); cleared by the next successful one. Set only by
    /// [`Store::mark_out_of_sync`] and cleared only by [`Store::finish_poll`]:
    /// writing a state read earlier never overwrites a newer mark.
    pub out_of_sync: Option<String>,
    /// The last failure of a poll or pass, cleared by the next success.
    pub last_error: Option<String>,
    /// The last local edit (see [`Store::last_edit`]) the connector's polls
    /// have compared with the directory.
    pub local_seen: i64,
}

/// A write captured by the proxy, journaled until its connector's worker
/// has applied it, so a crash cannot lose it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capture {
    /// Journal order; 0 until appended.
    pub id: i64,
    pub connector: String,
    pub category: Category,
    pub kind: CaptureKind,
    /// The entry's DN after the write (its old DN for a delete).
    pub dn: String,
    pub captured_at: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureKind {
    /// The entry is at the DN after the write: added, modified or renamed.
    Present,
    /// No entry is at the DN after the write: deleted.
    Absent,
}

impl CaptureKind {
    /// The names stored in the capture journal (kept from the first
    /// schema, when the kinds were called after the operations).
    fn as_str(self) -> &'static str {
        match self {
            CaptureKind::Present => "written",
            CaptureKind::Absent => "deleted",
        }
    }

    fn parse(s: &str) -> Option<CaptureKind> {
        [CaptureKind::Present, CaptureKind::Absent]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

/// How far a connector's poller has read one category's changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watermark {
    pub connector: String,
    pub category: Category,
    pub mechanism: Mechanism,
    /// The server the value is valid for (AD USNs are per domain controller).
    pub server: String,
    /// A sync cookie, a generalized time, or a USN.
    pub value: Vec<u8>,
    pub updated_at: i64,
}

pub trait Store {
    fn object(&self, category: Category, name: &str) -> Result<Option<LocalObject>, StoreError>;
    fn object_by_id(&self, id: i64) -> Result<Option<LocalObject>, StoreError>;
    fn objects(&self, category: Category) -> Result<Vec<LocalObject>, StoreError>;
    /// Creates a local object (a local edit, not a sync decision).
    fn insert_object(&mut self, object: &LocalObject, journal: &JournalEntry) -> Result<i64, StoreError>;
    /// Updates a local object's name, enabled flag and values.
    fn update_object(&mut self, object: &LocalObject, journal: &JournalEntry) -> Result<(), StoreError>;
    fn delete_object(&mut self, id: i64, journal: &JournalEntry) -> Result<(), StoreError>;

    fn association_by_entry(&self, connector: &str, entry_id: &str) -> Result<Option<Association>, StoreError>;
    fn association_by_object(&self, connector: &str, object_id: i64) -> Result<Option<Association>, StoreError>;
    fn associations(&self, connector: Option<&str>) -> Result<Vec<Association>, StoreError>;
    /// The association any connector holds on an object (an object has at most one in practice).
    fn association_of_object(&self, object_id: i64) -> Result<Option<Association>, StoreError>;
    /// Removes an association (the administrative command); true if one existed.
    fn remove_association(
        &mut self,
        connector: &str,
        object_id: i64,
        journal: &JournalEntry,
    ) -> Result<bool, StoreError>;

    /// Applies one sync decision atomically; returns the id of the object it
    /// created or updated, if any.
    fn commit(&mut self, commit: Commit) -> Result<Option<i64>, StoreError>;

    fn journal(&self, query: &JournalQuery) -> Result<Vec<JournalLine>, StoreError>;

    /// How many objects of a category a connector holds associations for.
    fn association_count(&self, connector: &str, category: Category) -> Result<usize, StoreError>;

    /// Journal lines of a connector with one of `actions` since `since`.
    fn count_journal(&self, connector: &str, actions: &[Action], since: i64) -> Result<usize, StoreError>;

    /// The local object associated with the entry last seen at `dn` (compared without case).
    fn object_associated_at(&self, connector: &str, dn: &str) -> Result<Option<LocalObject>, StoreError>;

    fn connector_state(&self, connector: &str) -> Result<Option<ConnectorState>, StoreError>;
    fn set_connector_state(&mut self, state: &ConnectorState) -> Result<(), StoreError>;
    /// Records that the connector needs a full reconciliation.
    fn mark_out_of_sync(&mut self, connector: &str, reason: &str) -> Result<(), StoreError>;

    /// Holds the deletes the guard refused for these associated pairs
    /// (those already held keep their time).
    fn hold_deletes(&mut self, associations: &[Association]) -> Result<(), StoreError>;
    /// A connector's held deletes whose entries are still gone.
    fn held_deletes(&self, connector: &str) -> Result<Vec<HeldDelete>, StoreError>;
    /// Forgets a held delete: it was applied, or its entry is back.
    fn release_held_delete(&mut self, connector: &str, object_id: i64) -> Result<(), StoreError>;

    /// Appends captured writes to the journal, in order, atomically.
    fn append_captures(&mut self, captures: &[Capture]) -> Result<(), StoreError>;
    /// The oldest captures a connector has not applied yet.
    fn captures(&self, connector: &str, limit: usize) -> Result<Vec<Capture>, StoreError>;
    fn pending_captures(&self, connector: &str) -> Result<usize, StoreError>;
    /// Removes an applied capture.
    fn remove_capture(&mut self, id: i64) -> Result<(), StoreError>;

    fn watermark(&self, connector: &str, category: Category) -> Result<Option<Watermark>, StoreError>;
    /// Stores a poll's new watermarks and the connector's state together;
    /// `cleared`: the out-of-sync reason a full comparison read before it
    /// started, cleared unless another was recorded since (that one stands).
    fn finish_poll(
        &mut self,
        state: &ConnectorState,
        watermarks: &[Watermark],
        cleared: Option<&str>,
    ) -> Result<(), StoreError>;

    /// Objects of a category edited locally (added, edited, freed from an
    /// association) after local edit number `edit`, in edit order.
    fn edited_since(&self, category: Category, edit: i64) -> Result<Vec<LocalObject>, StoreError>;
    /// The number of the latest local edit; sync decisions do not count.
    fn last_edit(&self) -> Result<i64, StoreError>;

    /// Groups the writes that follow into shared transactions until
    /// [`Store::end_batch`]. Each write stays atomic on its own; what a batch
    /// holds are decisions a crash would make the next pass repeat, so they
    /// may become durable together, a few hundred at a time, instead of one
    /// transaction per object. A batch holds the store's write lock: commit
    /// it before waiting on anything slow.
    fn begin_batch(&mut self);
    /// A full pass is about to decide these entries (stable id, name): a
    /// store whose every read is a round trip may look them all up now.
    /// Reads stay exact: they see what the pass writes meanwhile.
    fn look_ahead(
        &mut self,
        _connector: &str,
        _category: Category,
        _entries: &[(String, Option<String>)],
    ) -> Result<(), StoreError> {
        Ok(())
    }
    /// Makes everything written so far durable now, and goes on batching.
    fn commit_batch(&mut self) -> Result<(), StoreError>;
    /// Commits what the batch holds and ends it.
    fn end_batch(&mut self) -> Result<(), StoreError>;
}

/// Seconds since the Unix epoch, for journal lines and baselines.
/// Values as the stores keep them: a JSON object of arrays.
fn to_json(values: &Values) -> String {
    serde_json::to_string(values).expect("a map of strings serializes")
}

fn from_json(what: &'static str, text: &str) -> Result<Values, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt {
        what,
        detail: e.to_string(),
    })
}

/// One of the vocabulary's names, read back from a column.
fn parse<T: std::str::FromStr<Err = String>>(what: &'static str, text: &str) -> Result<T, StoreError> {
    text.parse().map_err(|detail| StoreError::Corrupt { what, detail })
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}
