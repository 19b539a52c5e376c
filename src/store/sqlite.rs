//! The embedded SQLite store: one file, WAL mode, migrations by
//! `PRAGMA user_version`.

use std::path::Path;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};

mod admin;

use super::copy::Tables;
use super::{
    Association, Capture, CaptureKind, Commit, ConnectorState, HeldDelete, JournalEntry, JournalLine, JournalQuery,
    LocalObject, Store, StoreError, Watermark, from_json, parse, to_json,
};
use crate::model::{Action, Category, ChangeSource};

/// Schema versions, applied in order; never edit one that has shipped.
const MIGRATIONS: &[&str] = &[
    r#"
    CREATE TABLE objects (
        id       INTEGER PRIMARY KEY,
        category TEXT NOT NULL,
        name     TEXT NOT NULL,
        enabled  INTEGER NOT NULL DEFAULT 1,
        "values" TEXT NOT NULL,
        UNIQUE (category, name)
    );
    CREATE TABLE associations (
        connector TEXT NOT NULL,
        object_id INTEGER NOT NULL REFERENCES objects(id) ON DELETE CASCADE,
        entry_id  TEXT NOT NULL,
        dn        TEXT NOT NULL,
        baseline  TEXT NOT NULL,
        synced_at INTEGER NOT NULL,
        entry_gone INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (connector, object_id),
        UNIQUE (connector, entry_id)
    );
    CREATE TABLE journal (
        id        INTEGER PRIMARY KEY,
        at        INTEGER NOT NULL,
        connector TEXT NOT NULL,
        category  TEXT NOT NULL,
        object    TEXT NOT NULL,
        source    TEXT NOT NULL,
        action    TEXT NOT NULL,
        policy    TEXT NOT NULL,
        detail    TEXT NOT NULL
    );
    CREATE INDEX journal_by_object ON journal (connector, object);
    CREATE TABLE connector_state (
        connector    TEXT PRIMARY KEY,
        last_sync_at INTEGER,
        last_result  TEXT NOT NULL
    );
"#,
    r#"
    CREATE TABLE captures (
        id          INTEGER PRIMARY KEY,
        connector   TEXT NOT NULL,
        category    TEXT NOT NULL,
        kind        TEXT NOT NULL,
        dn          TEXT NOT NULL,
        captured_at INTEGER NOT NULL
    );
    CREATE INDEX captures_by_connector ON captures (connector, id);
    CREATE TABLE watermarks (
        connector  TEXT NOT NULL,
        category   TEXT NOT NULL,
        mechanism  TEXT NOT NULL,
        server     TEXT NOT NULL,
        value      BLOB NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (connector, category)
    );
    ALTER TABLE connector_state ADD COLUMN last_poll_at INTEGER;
    ALTER TABLE connector_state ADD COLUMN out_of_sync TEXT;
    ALTER TABLE connector_state ADD COLUMN last_error TEXT;
    CREATE INDEX associations_by_dn ON associations (connector, dn COLLATE NOCASE);
    CREATE INDEX journal_by_time ON journal (connector, at);
"#,
    // Local edits are numbered, so that a poll reads the objects edited
    // since the last one instead of comparing every object with its
    // baseline. Objects from before are numbered 1: the first poll after
    // the upgrade looks at all of them once.
    r#"
    ALTER TABLE objects ADD COLUMN edit INTEGER NOT NULL DEFAULT 0;
    UPDATE objects SET edit = 1;
    CREATE INDEX objects_by_edit ON objects (edit);
    ALTER TABLE connector_state ADD COLUMN local_seen INTEGER NOT NULL DEFAULT 0;
"#,
    // The last local edit number, kept apart: max(objects.edit) would go
    // back when the most recently edited object is deleted, and a later
    // edit would reuse a number a poll has already seen.
    r#"
    CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
    INSERT INTO counters VALUES ('local_edit', (SELECT coalesce(max(edit), 0) FROM objects));
"#,
    // Deletes the mass-delete guard refused, kept until confirmed or the
    // entry is back: an incremental poll sees a delete once.
    r#"
    CREATE TABLE held_deletes (
        connector TEXT NOT NULL,
        object_id INTEGER NOT NULL REFERENCES objects(id) ON DELETE CASCADE,
        held_at   INTEGER NOT NULL,
        PRIMARY KEY (connector, object_id)
    );
"#,
    // The admin side (`store::admin`): the change feed, written by
    // triggers so that no write path can miss a change, each named by the
    // journal line of its transaction; consumers' and webhooks' cursors;
    // dead letters; API tokens by digest.
    r#"
    CREATE TABLE changes (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        at          INTEGER NOT NULL DEFAULT (CAST(strftime('%s', 'now') AS INTEGER)),
        object_id   INTEGER NOT NULL,
        category    TEXT NOT NULL,
        old_name    TEXT,
        new_name    TEXT,
        old_enabled INTEGER,
        new_enabled INTEGER,
        old_values  TEXT,
        new_values  TEXT,
        journal_id  INTEGER
    );
    CREATE INDEX changes_unnamed ON changes (category) WHERE journal_id IS NULL;
    CREATE INDEX changes_by_time ON changes (at);
    CREATE TRIGGER objects_inserted AFTER INSERT ON objects BEGIN
        INSERT INTO changes (object_id, category, new_name, new_enabled, new_values)
        VALUES (NEW.id, NEW.category, NEW.name, NEW.enabled, NEW."values");
    END;
    CREATE TRIGGER objects_updated AFTER UPDATE OF name, enabled, "values" ON objects
    WHEN OLD.name IS NOT NEW.name OR OLD.enabled IS NOT NEW.enabled OR OLD."values" IS NOT NEW."values"
    BEGIN
        INSERT INTO changes (object_id, category, old_name, new_name, old_enabled, new_enabled, old_values, new_values)
        VALUES (NEW.id, NEW.category, OLD.name, NEW.name, OLD.enabled, NEW.enabled, OLD."values", NEW."values");
    END;
    CREATE TRIGGER objects_deleted AFTER DELETE ON objects BEGIN
        INSERT INTO changes (object_id, category, old_name, old_enabled, old_values)
        VALUES (OLD.id, OLD.category, OLD.name, OLD.enabled, OLD."values");
    END;
    CREATE TRIGGER journal_names_changes AFTER INSERT ON journal BEGIN
        UPDATE changes SET journal_id = NEW.id, at = NEW.at
        WHERE journal_id IS NULL AND category = NEW.category
          AND (old_name = NEW.object OR new_name = NEW.object);
    END;
    CREATE TABLE cursors (
        kind       TEXT NOT NULL,
        name       TEXT NOT NULL,
        cursor     TEXT NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (kind, name)
    );
    CREATE TABLE dead_letters (
        id         INTEGER PRIMARY KEY,
        webhook    TEXT NOT NULL,
        cursor     TEXT NOT NULL,
        body       TEXT NOT NULL,
        attempts   INTEGER NOT NULL,
        last_error TEXT NOT NULL,
        failed_at  INTEGER NOT NULL
    );
    CREATE TABLE api_tokens (
        name         TEXT PRIMARY KEY,
        digest       TEXT NOT NULL UNIQUE,
        role         TEXT NOT NULL,
        created_at   INTEGER NOT NULL,
        created_by   TEXT NOT NULL,
        last_used_at INTEGER
    );
    INSERT INTO counters VALUES ('changes_pruned', 0);
"#,
    // A journal line finds the changes it names by their name, one
    // update per column (with OR, SQLite keys the search by category
    // alone): each line walked every unnamed change of its category, a
    // batch's worth in a pass and, left unnamed by a write that journals
    // nothing, any number.
    r#"
    DROP TRIGGER journal_names_changes;
    DROP INDEX changes_unnamed;
    CREATE INDEX changes_unnamed_old ON changes (category, old_name) WHERE journal_id IS NULL;
    CREATE INDEX changes_unnamed_new ON changes (category, new_name) WHERE journal_id IS NULL;
    CREATE TRIGGER journal_names_changes AFTER INSERT ON journal BEGIN
        UPDATE changes SET journal_id = NEW.id, at = NEW.at
        WHERE journal_id IS NULL AND category = NEW.category AND old_name = NEW.object;
        UPDATE changes SET journal_id = NEW.id, at = NEW.at
        WHERE journal_id IS NULL AND category = NEW.category AND new_name = NEW.object;
    END;
"#,
];

pub struct SqliteStore {
    conn: Connection,
    batch: Option<Batch>,
}

/// The writes of a batch not committed yet.
#[derive(Default)]
struct Batch {
    held: usize,
    /// Its transaction is open (and holds the write lock).
    open: bool,
}

/// Writes a batch holds at most before it commits them: enough to save
/// most of the per-transaction cost (WAL frames, locks).
const BATCH_WRITES: usize = 500;

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`, owner-only.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let open_error = |source| StoreError::Open {
            path: path.display().to_string(),
            source,
        };
        owner_only(path).map_err(|source| StoreError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let conn = Connection::open(path).map_err(open_error)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_error)?;
        enable_wal(&conn).map_err(open_error)?;
        // In WAL mode, NORMAL syncs at checkpoints rather than at every
        // commit: a crash of ldapsync loses nothing, a power cut may lose
        // the last commits but never corrupts, and what they held (captures,
        // decisions, the watermark after them) is read again by the next
        // poll. FULL would cost an fsync per synced object.
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(open_error)?;
        conn.pragma_update(None, "foreign_keys", true).map_err(open_error)?;
        // The sync loop runs the same few statements for every entry.
        conn.set_prepared_statement_cache_capacity(64);
        let mut store = SqliteStore { conn, batch: None };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        // IMMEDIATE takes the write lock before reading the version, so two
        // processes opening a new database (the server and a CLI command)
        // cannot both run the same migration.
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(StoreError::TooNew { found: version, known });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", i as i64 + 1)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Runs one atomic write: a transaction of its own, or a savepoint of
    /// the batch's transaction (opened by its first write).
    fn write<T>(&mut self, f: impl FnOnce(&Connection) -> Result<T, StoreError>) -> Result<T, StoreError> {
        if self.conn.is_autocommit() {
            // IMMEDIATE: a write that reads first (a name clash check) could
            // not take the write lock later if another connection wrote
            // meanwhile, and SQLite would answer BUSY without waiting.
            self.conn.execute_batch("BEGIN IMMEDIATE")?;
            if let Some(batch) = &mut self.batch {
                batch.open = true;
            }
        }
        let written = (|| {
            let savepoint = self.conn.savepoint()?;
            let value = f(&savepoint)?;
            savepoint.commit()?;
            Ok(value)
        })();
        match &mut self.batch {
            Some(batch) => {
                batch.held += 1;
                if batch.held >= BATCH_WRITES {
                    self.commit_batch()?;
                }
            }
            None => self.finish(written.is_ok())?,
        }
        written
    }

    /// Ends the open transaction: commits it, or rolls it back. A failed
    /// commit is rolled back too: whole writes or none.
    fn finish(&mut self, commit: bool) -> Result<(), StoreError> {
        if commit && let Err(e) = self.conn.execute_batch("COMMIT") {
            let _ = self.conn.execute_batch("ROLLBACK");
            return Err(e.into());
        }
        if !commit {
            self.conn.execute_batch("ROLLBACK")?;
        }
        Ok(())
    }
}

/// `query_row` through the statement cache: parsing the SQL again for every
/// entry of a 100,000-entry pass showed in profiles.
fn cached_row<T>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    f: impl FnOnce(&Row) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    conn.prepare_cached(sql)?.query_row(params, f)
}

fn cached_execute(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute(params)
}

/// How long a statement waits for another connection's lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Switches to write-ahead logging. SQLite answers BUSY at once, without
/// its busy handler, when another connection opening the same new database
/// holds the lock the switch needs (the server and a CLI command starting
/// together): wait for it like any other lock.
fn enable_wal(conn: &Connection) -> rusqlite::Result<()> {
    let deadline = Instant::now() + BUSY_TIMEOUT;
    loop {
        match conn.pragma_update(None, "journal_mode", "WAL") {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            result => return result,
        }
    }
}

/// Creates the database file owner-only before SQLite opens it (an empty
/// file is a new database; SQLite gives its -wal and -shm files the same
/// mode), so that it is never readable by others, not even for an instant.
/// An existing file that others may read is made owner-only, and said so.
#[cfg(unix)]
fn owner_only(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    for file in ["", "-wal", "-shm"].map(|suffix| format!("{}{suffix}", path.display())) {
        let Ok(meta) = std::fs::metadata(&file) else { continue };
        let mode = meta.permissions().mode() & 0o777;
        if meta.is_file() && mode & 0o077 != 0 {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode & 0o700))?;
            tracing::warn!(
                path = file,
                was = format!("{mode:o}"),
                "the database was readable by other users; it is owner-only now"
            );
        }
    }
    Ok(())
}

#[cfg(not(unix))]
fn owner_only(_: &Path) -> std::io::Result<()> {
    Ok(())
}

const OBJECT_COLUMNS: &str = r#"id, category, name, enabled, "values""#;

fn object_row(row: &Row) -> rusqlite::Result<(i64, String, String, bool, String)> {
    Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?))
}

fn object_from(raw: (i64, String, String, bool, String)) -> Result<LocalObject, StoreError> {
    let (id, category, name, enabled, values) = raw;
    Ok(LocalObject {
        id,
        category: parse::<Category>("category", &category)?,
        name,
        enabled,
        values: from_json("object values", &values)?,
    })
}

const ASSOCIATION_COLUMNS: &str = "connector, object_id, entry_id, dn, baseline, synced_at, entry_gone";

type AssociationRow = (String, i64, String, String, String, i64, bool);

fn association_row(row: &Row) -> rusqlite::Result<AssociationRow> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
        row.get(5)?,
        row.get(6)?,
    ))
}

fn association_from(raw: AssociationRow) -> Result<Association, StoreError> {
    let (connector, object_id, entry_id, dn, baseline, synced_at, entry_gone) = raw;
    Ok(Association {
        connector,
        object_id,
        entry_id,
        dn,
        baseline: from_json("baseline", &baseline)?,
        synced_at,
        entry_gone,
    })
}

fn write_journal(conn: &Connection, entry: &JournalEntry) -> Result<(), StoreError> {
    insert_journal(conn, None, entry)
}

/// A journal line; `id` keeps a copied line's (`store copy`), `None` takes the next.
fn insert_journal(conn: &Connection, id: Option<i64>, entry: &JournalEntry) -> Result<(), StoreError> {
    cached_execute(
        conn,
        "INSERT INTO journal (id, at, connector, category, object, source, action, policy, detail)
         VALUES (?9, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            entry.at,
            entry.connector,
            entry.category.as_str(),
            entry.object,
            entry.source.as_str(),
            entry.action.as_str(),
            entry.policy,
            entry.detail,
            id
        ],
    )?;
    Ok(())
}

fn insert_object(conn: &Connection, object: &LocalObject) -> Result<i64, StoreError> {
    let inserted = cached_execute(
        conn,
        r#"INSERT INTO objects (category, name, enabled, "values") VALUES (?1, ?2, ?3, ?4)
           ON CONFLICT (category, name) DO NOTHING"#,
        params![
            object.category.as_str(),
            object.name,
            object.enabled,
            to_json(&object.values)
        ],
    )?;
    if inserted == 0 {
        return Err(StoreError::Exists {
            category: object.category,
            name: object.name.clone(),
        });
    }
    Ok(conn.last_insert_rowid())
}

/// Gives the object the next local edit number (see the third and fourth
/// migrations).
fn mark_edited(conn: &Connection, id: i64) -> Result<(), StoreError> {
    let edit: i64 = cached_row(
        conn,
        "UPDATE counters SET value = value + 1 WHERE name = 'local_edit' RETURNING value",
        [],
        |r| r.get(0),
    )?;
    cached_execute(conn, "UPDATE objects SET edit = ?2 WHERE id = ?1", [id, edit])?;
    Ok(())
}

fn update_object(conn: &Connection, object: &LocalObject) -> Result<(), StoreError> {
    let clash: Option<i64> = conn
        .query_row(
            "SELECT id FROM objects WHERE category = ?1 AND name = ?2 AND id != ?3",
            params![object.category.as_str(), object.name, object.id],
            |r| r.get(0),
        )
        .optional()?;
    if clash.is_some() {
        return Err(StoreError::Exists {
            category: object.category,
            name: object.name.clone(),
        });
    }
    cached_execute(
        conn,
        r#"UPDATE objects SET name = ?2, enabled = ?3, "values" = ?4 WHERE id = ?1"#,
        params![object.id, object.name, object.enabled, to_json(&object.values)],
    )?;
    Ok(())
}

impl Store for SqliteStore {
    fn object(&self, category: Category, name: &str) -> Result<Option<LocalObject>, StoreError> {
        cached_row(
            &self.conn,
            &format!("SELECT {OBJECT_COLUMNS} FROM objects WHERE category = ?1 AND name = ?2"),
            params![category.as_str(), name],
            object_row,
        )
        .optional()?
        .map(object_from)
        .transpose()
    }

    fn object_by_id(&self, id: i64) -> Result<Option<LocalObject>, StoreError> {
        cached_row(
            &self.conn,
            &format!("SELECT {OBJECT_COLUMNS} FROM objects WHERE id = ?1"),
            [id],
            object_row,
        )
        .optional()?
        .map(object_from)
        .transpose()
    }

    fn objects(&self, category: Category) -> Result<Vec<LocalObject>, StoreError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {OBJECT_COLUMNS} FROM objects WHERE category = ?1 ORDER BY name"
        ))?;
        let rows = stmt.query_map([category.as_str()], object_row)?;
        rows.map(|r| object_from(r?)).collect()
    }

    fn insert_object(&mut self, object: &LocalObject, journal: &JournalEntry) -> Result<i64, StoreError> {
        self.write(|tx| {
            let id = insert_object(tx, object)?;
            mark_edited(tx, id)?;
            write_journal(tx, journal)?;
            Ok(id)
        })
    }

    fn update_object(&mut self, object: &LocalObject, journal: &JournalEntry) -> Result<(), StoreError> {
        self.write(|tx| {
            update_object(tx, object)?;
            mark_edited(tx, object.id)?;
            write_journal(tx, journal)
        })
    }

    fn delete_object(&mut self, id: i64, journal: &JournalEntry) -> Result<(), StoreError> {
        self.write(|tx| {
            cached_execute(tx, "DELETE FROM objects WHERE id = ?1", [id])?;
            write_journal(tx, journal)?;
            Ok(())
        })
    }

    fn association_by_entry(&self, connector: &str, entry_id: &str) -> Result<Option<Association>, StoreError> {
        cached_row(
            &self.conn,
            &format!("SELECT {ASSOCIATION_COLUMNS} FROM associations WHERE connector = ?1 AND entry_id = ?2"),
            params![connector, entry_id],
            association_row,
        )
        .optional()?
        .map(association_from)
        .transpose()
    }

    fn association_by_object(&self, connector: &str, object_id: i64) -> Result<Option<Association>, StoreError> {
        cached_row(
            &self.conn,
            &format!("SELECT {ASSOCIATION_COLUMNS} FROM associations WHERE connector = ?1 AND object_id = ?2"),
            params![connector, object_id],
            association_row,
        )
        .optional()?
        .map(association_from)
        .transpose()
    }

    fn association_of_object(&self, object_id: i64) -> Result<Option<Association>, StoreError> {
        cached_row(
            &self.conn,
            &format!("SELECT {ASSOCIATION_COLUMNS} FROM associations WHERE object_id = ?1 ORDER BY connector LIMIT 1"),
            [object_id],
            association_row,
        )
        .optional()?
        .map(association_from)
        .transpose()
    }

    fn associations(&self, connector: Option<&str>) -> Result<Vec<Association>, StoreError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {ASSOCIATION_COLUMNS} FROM associations
             WHERE ?1 IS NULL OR connector = ?1 ORDER BY connector, object_id"
        ))?;
        let rows = stmt.query_map([connector], association_row)?;
        rows.map(|r| association_from(r?)).collect()
    }

    fn remove_association(
        &mut self,
        connector: &str,
        object_id: i64,
        journal: &JournalEntry,
    ) -> Result<bool, StoreError> {
        self.write(|tx| {
            let removed = cached_execute(
                tx,
                "DELETE FROM associations WHERE connector = ?1 AND object_id = ?2",
                params![connector, object_id],
            )?;
            if removed > 0 {
                // A delete held for the old entry is not this object's any more.
                cached_execute(
                    tx,
                    "DELETE FROM held_deletes WHERE connector = ?1 AND object_id = ?2",
                    params![connector, object_id],
                )?;
                // Free again: the next poll matches it or creates its entry.
                mark_edited(tx, object_id)?;
                write_journal(tx, journal)?;
            }
            Ok(removed > 0)
        })
    }

    fn commit(&mut self, commit: Commit) -> Result<Option<i64>, StoreError> {
        self.write(|tx| {
            let mut object_id = None;
            if let Some(object) = &commit.object {
                object_id = Some(if object.id == 0 {
                    insert_object(tx, object)?
                } else {
                    update_object(tx, object)?;
                    object.id
                });
            }
            if let Some(id) = commit.delete_object {
                cached_execute(tx, "DELETE FROM objects WHERE id = ?1", [id])?;
            }
            if let Some(a) = &commit.association {
                let id = if a.object_id == 0 {
                    object_id.unwrap_or(0)
                } else {
                    a.object_id
                };
                cached_execute(
                    tx,
                    "INSERT INTO associations (connector, object_id, entry_id, dn, baseline, synced_at, entry_gone)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (connector, object_id) DO UPDATE SET
                   entry_id = excluded.entry_id, dn = excluded.dn, baseline = excluded.baseline,
                   synced_at = excluded.synced_at, entry_gone = excluded.entry_gone",
                    params![
                        a.connector,
                        id,
                        a.entry_id,
                        a.dn,
                        to_json(&a.baseline),
                        a.synced_at,
                        a.entry_gone
                    ],
                )?;
            }
            for entry in &commit.journal {
                write_journal(tx, entry)?;
            }
            Ok(object_id)
        })
    }

    fn journal(&self, query: &JournalQuery) -> Result<Vec<JournalLine>, StoreError> {
        let limit = if query.limit == 0 { i64::MAX } else { query.limit as i64 };
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, at, connector, category, object, source, action, policy, detail FROM (
               SELECT * FROM journal
               WHERE (?1 IS NULL OR connector = ?1) AND (?2 IS NULL OR object = ?2)
                 AND (?3 IS NULL OR action = ?3) AND (?4 IS NULL OR source = ?4)
                 AND (?5 IS NULL OR at >= ?5) AND (?6 IS NULL OR at < ?6) AND (?7 IS NULL OR id < ?7)
               ORDER BY id DESC LIMIT ?8
             ) ORDER BY id",
        )?;
        let rows = stmt.query_map(
            params![
                query.connector,
                query.object,
                query.action.map(Action::as_str),
                query.source.map(ChangeSource::as_str),
                query.since,
                query.until,
                query.before,
                limit
            ],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, String>(6)?,
                    r.get::<_, String>(7)?,
                    r.get::<_, String>(8)?,
                ))
            },
        )?;
        rows.map(|row| {
            let (id, at, connector, category, object, source, action, policy, detail) = row?;
            Ok(JournalLine {
                id,
                entry: JournalEntry {
                    at,
                    connector,
                    category: parse("category", &category)?,
                    object,
                    source: parse("journal source", &source)?,
                    action: parse("journal action", &action)?,
                    policy,
                    detail,
                },
            })
        })
        .collect()
    }

    fn association_count(&self, connector: &str, category: Category) -> Result<usize, StoreError> {
        let count: i64 = cached_row(
            &self.conn,
            "SELECT count(*) FROM associations a JOIN objects o ON o.id = a.object_id
             WHERE a.connector = ?1 AND o.category = ?2",
            params![connector, category.as_str()],
            |r| r.get(0),
        )?;
        Ok(count as usize)
    }

    fn count_journal(&self, connector: &str, actions: &[Action], since: i64) -> Result<usize, StoreError> {
        let actions = serde_json::to_string(actions).expect("names serialize");
        let count: i64 = cached_row(
            &self.conn,
            "SELECT count(*) FROM journal WHERE connector = ?1 AND at >= ?2
               AND action IN (SELECT value FROM json_each(?3))",
            params![connector, since, actions],
            |r| r.get(0),
        )?;
        Ok(count as usize)
    }

    fn object_associated_at(&self, connector: &str, dn: &str) -> Result<Option<LocalObject>, StoreError> {
        cached_row(
            &self.conn,
            &format!(
                "SELECT {} FROM objects o JOIN associations a ON a.object_id = o.id
                     WHERE a.connector = ?1 AND a.dn = ?2 COLLATE NOCASE LIMIT 1",
                OBJECT_COLUMNS
                    .split(", ")
                    .map(|c| format!("o.{c}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            params![connector, dn],
            object_row,
        )
        .optional()?
        .map(object_from)
        .transpose()
    }

    fn connector_state(&self, connector: &str) -> Result<Option<ConnectorState>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT connector, last_sync_at, last_result, last_poll_at, out_of_sync, last_error, local_seen
                 FROM connector_state WHERE connector = ?1",
                [connector],
                |r| {
                    Ok(ConnectorState {
                        connector: r.get(0)?,
                        last_sync_at: r.get(1)?,
                        last_result: r.get(2)?,
                        last_poll_at: r.get(3)?,
                        out_of_sync: r.get(4)?,
                        last_error: r.get(5)?,
                        local_seen: r.get(6)?,
                    })
                },
            )
            .optional()?)
    }

    fn set_connector_state(&mut self, state: &ConnectorState) -> Result<(), StoreError> {
        write_state(&self.conn, state)
    }

    fn mark_out_of_sync(&mut self, connector: &str, reason: &str) -> Result<(), StoreError> {
        cached_execute(
            &self.conn,
            "INSERT INTO connector_state (connector, last_result, out_of_sync) VALUES (?1, '{}', ?2)
             ON CONFLICT (connector) DO UPDATE SET out_of_sync = excluded.out_of_sync",
            params![connector, reason],
        )?;
        Ok(())
    }

    fn append_captures(&mut self, captures: &[Capture]) -> Result<(), StoreError> {
        self.write(|tx| {
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO captures (connector, category, kind, dn, captured_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                )?;
                for c in captures {
                    insert.execute(params![
                        c.connector,
                        c.category.as_str(),
                        c.kind.as_str(),
                        c.dn,
                        c.captured_at
                    ])?;
                }
            }
            Ok(())
        })
    }

    fn captures(&self, connector: &str, limit: usize) -> Result<Vec<Capture>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, connector, category, kind, dn, captured_at FROM captures
             WHERE connector = ?1 ORDER BY id LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![connector, limit as i64], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, i64>(5)?,
            ))
        })?;
        rows.map(|row| {
            let (id, connector, category, kind, dn, captured_at) = row?;
            Ok(Capture {
                id,
                connector,
                category: parse::<Category>("category", &category)?,
                kind: CaptureKind::parse(&kind).ok_or(StoreError::Corrupt {
                    what: "capture kind",
                    detail: kind,
                })?,
                dn,
                captured_at,
            })
        })
        .collect()
    }

    fn pending_captures(&self, connector: &str) -> Result<usize, StoreError> {
        let count: i64 = cached_row(
            &self.conn,
            "SELECT count(*) FROM captures WHERE connector = ?1",
            [connector],
            |r| r.get(0),
        )?;
        Ok(count as usize)
    }

    fn hold_deletes(&mut self, associations: &[Association]) -> Result<(), StoreError> {
        let at = super::now();
        self.write(|tx| {
            for a in associations {
                cached_execute(
                    tx,
                    "INSERT INTO held_deletes (connector, object_id, held_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT DO NOTHING",
                    params![a.connector, a.object_id, at],
                )?;
            }
            Ok(())
        })
    }

    fn held_deletes(&self, connector: &str) -> Result<Vec<HeldDelete>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT o.category, o.name, o.id, a.entry_id, a.dn, h.held_at
               FROM held_deletes h
               JOIN objects o ON o.id = h.object_id
               JOIN associations a ON a.connector = h.connector AND a.object_id = h.object_id
              WHERE h.connector = ?1 AND NOT a.entry_gone
              ORDER BY o.category, o.name",
        )?;
        let rows = stmt.query_map([connector], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })?;
        let mut held = Vec::new();
        for row in rows {
            let (category, name, object_id, entry_id, dn, held_at) = row?;
            held.push(HeldDelete {
                category: parse::<Category>("category", &category)?,
                name,
                object_id,
                entry_id,
                dn,
                held_at,
            });
        }
        Ok(held)
    }

    fn release_held_delete(&mut self, connector: &str, object_id: i64) -> Result<(), StoreError> {
        self.write(|tx| {
            cached_execute(
                tx,
                "DELETE FROM held_deletes WHERE connector = ?1 AND object_id = ?2",
                params![connector, object_id],
            )?;
            Ok(())
        })
    }

    fn remove_capture(&mut self, id: i64) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("DELETE FROM captures WHERE id = ?1")?
            .execute([id])?;
        Ok(())
    }

    fn watermark(&self, connector: &str, category: Category) -> Result<Option<Watermark>, StoreError> {
        let row = self
            .conn
            .query_row(
                "SELECT mechanism, server, value, updated_at FROM watermarks WHERE connector = ?1 AND category = ?2",
                params![connector, category.as_str()],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, Vec<u8>>(2)?,
                        r.get::<_, i64>(3)?,
                    ))
                },
            )
            .optional()?;
        row.map(|(mechanism, server, value, updated_at)| {
            Ok(Watermark {
                connector: connector.to_owned(),
                category,
                mechanism: mechanism.parse().map_err(|detail| StoreError::Corrupt {
                    what: "watermark mechanism",
                    detail,
                })?,
                server,
                value,
                updated_at,
            })
        })
        .transpose()
    }

    fn finish_poll(
        &mut self,
        state: &ConnectorState,
        watermarks: &[Watermark],
        cleared: Option<&str>,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            for w in watermarks {
                cached_execute(
                    tx,
                    "INSERT INTO watermarks (connector, category, mechanism, server, value, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (connector, category) DO UPDATE SET mechanism = excluded.mechanism,
                   server = excluded.server, value = excluded.value, updated_at = excluded.updated_at",
                    params![
                        w.connector,
                        w.category.as_str(),
                        w.mechanism.as_str(),
                        w.server,
                        w.value,
                        w.updated_at
                    ],
                )?;
            }
            write_state(tx, state)?;
            cached_execute(
                tx,
                "UPDATE connector_state SET out_of_sync = NULL WHERE connector = ?1 AND out_of_sync = ?2",
                params![state.connector, cleared],
            )?;
            Ok(())
        })
    }

    fn edited_since(&self, category: Category, edit: i64) -> Result<Vec<LocalObject>, StoreError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {OBJECT_COLUMNS} FROM objects WHERE category = ?1 AND edit > ?2 ORDER BY edit"
        ))?;
        let rows = stmt.query_map(params![category.as_str(), edit], object_row)?;
        rows.map(|r| object_from(r?)).collect()
    }

    fn last_edit(&self) -> Result<i64, StoreError> {
        Ok(cached_row(
            &self.conn,
            "SELECT value FROM counters WHERE name = 'local_edit'",
            [],
            |r| r.get(0),
        )?)
    }

    fn begin_batch(&mut self) {
        self.batch.get_or_insert_default();
    }

    fn commit_batch(&mut self) -> Result<(), StoreError> {
        match &mut self.batch {
            Some(batch) if batch.open => {
                batch.open = false;
                batch.held = 0;
                // If the commit fails, the batch is lost whole: the next
                // pass makes its decisions again.
                self.finish(true)
            }
            _ => Ok(()),
        }
    }

    fn end_batch(&mut self) -> Result<(), StoreError> {
        let committed = self.commit_batch();
        self.batch = None;
        committed
    }
}

fn write_state(conn: &Connection, state: &ConnectorState) -> Result<(), StoreError> {
    cached_execute(
        conn,
        "INSERT INTO connector_state
           (connector, last_sync_at, last_result, last_poll_at, out_of_sync, last_error, local_seen)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (connector) DO UPDATE SET
           last_sync_at = excluded.last_sync_at, last_result = excluded.last_result,
           last_poll_at = excluded.last_poll_at,
           last_error = excluded.last_error, local_seen = excluded.local_seen",
        params![
            state.connector,
            state.last_sync_at,
            state.last_result,
            state.last_poll_at,
            state.out_of_sync,
            state.last_error,
            state.local_seen
        ],
    )?;
    Ok(())
}

impl SqliteStore {
    /// Every table's rows, for `store copy`.
    pub(super) fn export(&self) -> Result<Tables, StoreError> {
        let mut tables = Tables {
            local_edit: self.last_edit()?,
            ..Tables::default()
        };
        let c = &self.conn;
        let mut stmt = c.prepare(&format!("SELECT {OBJECT_COLUMNS}, edit FROM objects"))?;
        let rows = stmt.query_map([], |r| Ok((object_row(r)?, r.get::<_, i64>(5)?)))?;
        for row in rows {
            let (raw, edit) = row?;
            tables.objects.push((object_from(raw)?, edit));
        }
        tables.associations = self.associations(None)?;
        let lines = self.journal(&JournalQuery::default())?;
        tables.journal = lines.into_iter().map(|l| (l.id, l.entry)).collect();
        let mut stmt = c.prepare("SELECT connector FROM connector_state")?;
        let names: Vec<String> = stmt.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
        for name in names {
            tables.states.extend(self.connector_state(&name)?);
        }
        let mut stmt = c.prepare("SELECT DISTINCT connector FROM captures")?;
        let names: Vec<String> = stmt.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
        for name in names {
            tables.captures.extend(self.captures(&name, usize::MAX >> 1)?);
        }
        let mut stmt = c.prepare("SELECT connector, category FROM watermarks")?;
        let keys: Vec<(String, String)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        for (connector, category) in keys {
            tables
                .watermarks
                .extend(self.watermark(&connector, parse::<Category>("category", &category)?)?);
        }
        let mut stmt = c.prepare("SELECT connector, object_id, held_at FROM held_deletes")?;
        tables.held_deletes = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?;
        Ok(tables.sorted())
    }

    /// Writes every table's rows, ids kept, in one transaction.
    pub(super) fn import(&mut self, tables: &Tables) -> Result<(), StoreError> {
        self.write(|tx| {
            for (o, edit) in &tables.objects {
                tx.execute(
                    r#"INSERT INTO objects (id, category, name, enabled, "values", edit) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"#,
                    params![o.id, o.category.as_str(), o.name, o.enabled, to_json(&o.values), edit],
                )?;
            }
            for a in &tables.associations {
                tx.execute(
                    "INSERT INTO associations (connector, object_id, entry_id, dn, baseline, synced_at, entry_gone)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![a.connector, a.object_id, a.entry_id, a.dn, to_json(&a.baseline), a.synced_at, a.entry_gone],
                )?;
            }
            for (id, e) in &tables.journal {
                insert_journal(tx, Some(*id), e)?;
            }
            for state in &tables.states {
                write_state(tx, state)?;
            }
            for c in &tables.captures {
                tx.execute(
                    "INSERT INTO captures (id, connector, category, kind, dn, captured_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![c.id, c.connector, c.category.as_str(), c.kind.as_str(), c.dn, c.captured_at],
                )?;
            }
            for w in &tables.watermarks {
                tx.execute(
                    "INSERT INTO watermarks (connector, category, mechanism, server, value, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![w.connector, w.category.as_str(), w.mechanism.as_str(), w.server, w.value, w.updated_at],
                )?;
            }
            for (connector, object_id, held_at) in &tables.held_deletes {
                tx.execute(
                    "INSERT INTO held_deletes (connector, object_id, held_at) VALUES (?1, ?2, ?3)",
                    params![connector, object_id, held_at],
                )?;
            }
            tx.execute(
                "UPDATE counters SET value = ?1 WHERE name = 'local_edit'",
                [tables.local_edit],
            )?;
            // The copy is not a change: the target's feed starts empty.
            tx.execute("DELETE FROM changes", [])?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::now;

    fn journal(object: &str, action: Action) -> JournalEntry {
        JournalEntry {
            at: now(),
            connector: "c".into(),
            category: Category::Account,
            object: object.into(),
            source: ChangeSource::Local,
            action,
            policy: "both/local-wins".into(),
            detail: "{}".into(),
        }
    }

    fn account(name: &str) -> LocalObject {
        LocalObject {
            id: 0,
            category: Category::Account,
            name: name.into(),
            enabled: true,
            values: [("mail".to_owned(), vec![format!("{name}@example.com")])].into(),
        }
    }

    fn names(store: &SqliteStore) -> Vec<String> {
        store
            .objects(Category::Account)
            .unwrap()
            .into_iter()
            .map(|o| o.name)
            .collect()
    }

    #[test]
    fn a_batch_keeps_each_write_whole_and_is_seen_by_others_once_committed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let mut store = SqliteStore::open(&path).unwrap();
        let other = SqliteStore::open(&path).unwrap();
        store.begin_batch();
        store
            .insert_object(&account("alice"), &journal("alice", Action::LocalAdd))
            .unwrap();
        // A failed write undoes itself only, not the batch before it.
        assert!(matches!(
            store.insert_object(&account("alice"), &journal("alice", Action::LocalAdd)),
            Err(StoreError::Exists { .. })
        ));
        store
            .insert_object(&account("bob"), &journal("bob", Action::LocalAdd))
            .unwrap();
        assert_eq!(names(&store), ["alice", "bob"], "the batch reads its own writes");
        assert!(names(&other).is_empty(), "nothing is visible before the batch commits");

        store.commit_batch().unwrap();
        assert_eq!(names(&other), ["alice", "bob"]);
        store
            .insert_object(&account("carol"), &journal("carol", Action::LocalAdd))
            .unwrap();
        assert_eq!(names(&other), ["alice", "bob"]);
        store.end_batch().unwrap();
        assert_eq!(names(&other), ["alice", "bob", "carol"]);
        let actions: Vec<_> = other
            .journal(&JournalQuery::default())
            .unwrap()
            .into_iter()
            .map(|j| j.entry.action)
            .collect();
        assert_eq!(
            actions,
            [Action::LocalAdd, Action::LocalAdd, Action::LocalAdd],
            "the failed write left no journal line"
        );

        // Outside a batch every write is its own transaction again.
        store
            .insert_object(&account("dave"), &journal("dave", Action::LocalAdd))
            .unwrap();
        assert_eq!(names(&other).len(), 4);
    }

    #[test]
    fn a_long_batch_commits_every_few_hundred_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let mut store = SqliteStore::open(&path).unwrap();
        let other = SqliteStore::open(&path).unwrap();
        store.begin_batch();
        for i in 0..BATCH_WRITES + 10 {
            let name = format!("user{i:04}");
            store
                .insert_object(&account(&name), &journal(&name, Action::LocalAdd))
                .unwrap();
        }
        assert_eq!(names(&other).len(), BATCH_WRITES);
        drop(store);
        assert_eq!(
            names(&other).len(),
            BATCH_WRITES,
            "a batch not ended is lost as a whole, never in part"
        );
    }

    #[test]
    fn local_edits_are_numbered_and_sync_decisions_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(&dir.path().join("db.sqlite")).unwrap();
        let edited = |store: &SqliteStore, after| -> Vec<String> {
            let objects = store.edited_since(Category::Account, after).unwrap();
            objects.into_iter().map(|o| o.name).collect()
        };
        assert_eq!(store.last_edit().unwrap(), 0);
        let alice = store
            .insert_object(&account("alice"), &journal("alice", Action::LocalAdd))
            .unwrap();
        store
            .insert_object(&account("bob"), &journal("bob", Action::LocalAdd))
            .unwrap();
        let seen = store.last_edit().unwrap();
        assert_eq!(edited(&store, 0), ["alice", "bob"]);
        assert!(edited(&store, seen).is_empty());

        // A sync decision (imported from the directory) is not a local edit.
        store
            .commit(Commit {
                object: Some(account("carol")),
                journal: vec![journal("carol", Action::CreatedLocal)],
                ..Commit::default()
            })
            .unwrap();
        assert!(edited(&store, seen).is_empty());

        let mut changed = store.object_by_id(alice).unwrap().unwrap();
        changed.values.insert("mail".into(), vec!["alice@example.org".into()]);
        store
            .update_object(&changed, &journal("alice", Action::LocalEdit))
            .unwrap();
        assert_eq!(edited(&store, seen), ["alice"]);
        assert!(store.last_edit().unwrap() > seen);

        // Numbers never go back, even when the latest edited object goes.
        let bob = store.object(Category::Account, "bob").unwrap().unwrap();
        let mut dave = store.object(Category::Account, "carol").unwrap().unwrap();
        store.update_object(&bob, &journal("bob", Action::LocalEdit)).unwrap();
        let seen = store.last_edit().unwrap();
        store.delete_object(bob.id, &journal("bob", Action::Deleted)).unwrap();
        dave.name = "dave".into();
        store.update_object(&dave, &journal("dave", Action::LocalEdit)).unwrap();
        assert_eq!(edited(&store, seen), ["dave"]);
    }

    #[test]
    fn objects_associations_and_journal_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let mut store = SqliteStore::open(&path).unwrap();
        let id = store
            .insert_object(&account("alice"), &journal("alice", Action::LocalAdd))
            .unwrap();
        assert!(matches!(
            store.insert_object(&account("alice"), &journal("alice", Action::LocalAdd)),
            Err(StoreError::Exists { .. })
        ));
        let created = store
            .commit(Commit {
                object: Some(account("bob")),
                association: Some(Association {
                    connector: "c".into(),
                    object_id: 0,
                    entry_id: "uuid-bob".into(),
                    dn: "uid=bob,dc=x".into(),
                    baseline: account("bob").values,
                    synced_at: 1,
                    entry_gone: false,
                }),
                journal: vec![journal("bob", Action::CreatedLocal)],
                ..Commit::default()
            })
            .unwrap()
            .unwrap();
        let a = store.association_by_entry("c", "uuid-bob").unwrap().unwrap();
        assert_eq!(a.object_id, created);
        assert_eq!(
            store.association_by_object("c", created).unwrap().unwrap().entry_id,
            "uuid-bob"
        );
        assert!(store.association_by_object("c", id).unwrap().is_none());
        drop(store);

        // Reopening keeps everything and does not re-run migrations.
        let mut store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.objects(Category::Account).unwrap().len(), 2);
        assert!(
            store
                .remove_association("c", created, &journal("bob", Action::AssociationRemoved))
                .unwrap()
        );
        assert!(
            !store
                .remove_association("c", created, &journal("bob", Action::AssociationRemoved))
                .unwrap()
        );
        let actions: Vec<_> = store
            .journal(&JournalQuery::default())
            .unwrap()
            .into_iter()
            .map(|e| e.entry.action)
            .collect();
        assert_eq!(
            actions,
            [Action::LocalAdd, Action::CreatedLocal, Action::AssociationRemoved]
        );
        let last = store
            .journal(&JournalQuery {
                limit: 1,
                ..JournalQuery::default()
            })
            .unwrap();
        assert_eq!(last[0].entry.action, Action::AssociationRemoved);
    }

    #[test]
    fn a_failed_commit_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(&dir.path().join("db")).unwrap();
        store
            .insert_object(&account("alice"), &journal("alice", Action::LocalAdd))
            .unwrap();
        let clash = store.commit(Commit {
            object: Some(account("alice")),
            journal: vec![journal("alice", Action::CreatedLocal)],
            ..Commit::default()
        });
        assert!(clash.is_err());
        assert_eq!(store.journal(&JournalQuery::default()).unwrap().len(), 1);
    }

    #[test]
    fn a_store_of_the_previous_schema_is_upgraded_and_its_journal_still_names_each_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let previous = MIGRATIONS.len() - 1;
        {
            let old = Connection::open(&path).unwrap();
            for sql in &MIGRATIONS[..previous] {
                old.execute_batch(sql).unwrap();
            }
            old.pragma_update(None, "user_version", previous as i64).unwrap();
            old.execute_batch(
                r#"INSERT INTO objects (category, name, "values") VALUES ('account', 'alice', '{}');
                   INSERT INTO journal (at, connector, category, object, source, action, policy, detail)
                   VALUES (1, 'c', 'account', 'alice', 'local', 'local-add', '', '{}');"#,
            )
            .unwrap();
        }
        let mut store = SqliteStore::open(&path).unwrap();
        let version: i64 = store
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        store
            .insert_object(&account("bob"), &journal("bob", Action::LocalAdd))
            .unwrap();
        let mut named = store
            .conn
            .prepare(
                "SELECT c.new_name, j.object FROM changes c LEFT JOIN journal j ON j.id = c.journal_id ORDER BY c.id",
            )
            .unwrap();
        let named: Vec<(String, Option<String>)> = named
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            named,
            [
                ("alice".into(), Some("alice".into())),
                ("bob".into(), Some("bob".into()))
            ],
            "each change named by its own object's line, before the upgrade and after"
        );
    }

    #[test]
    fn concurrent_first_opens_migrate_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let openers: Vec<_> = (0..8)
            .map(|_| {
                let path = path.clone();
                std::thread::spawn(move || SqliteStore::open(&path).map(|_| ()))
            })
            .collect();
        for opener in openers {
            opener.join().unwrap().expect("every concurrent open succeeds");
        }
    }

    #[cfg(unix)]
    #[test]
    fn database_file_is_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let mut store = SqliteStore::open(&path).unwrap();
        store
            .mark_out_of_sync("example", "a write, so that the WAL exists")
            .unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let wal = dir.path().join("db-wal");
        assert_eq!(
            std::fs::metadata(&wal).unwrap().permissions().mode() & 0o777,
            0o600,
            "its WAL too"
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_database_others_can_read_is_made_owner_only_when_opened() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        drop(SqliteStore::open(&path).unwrap());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        SqliteStore::open(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
