//! The admin side's tables on SQLite (`store::admin`).

use rusqlite::{OptionalExtension, Row, params};

use super::{SqliteStore, cached_execute, cached_row};
use crate::store::admin::{AdminStore, ApiToken, ChangeRecord, ConsumerState, Cursor, DeadLetter, ObjectState};
use crate::store::{StoreError, from_json, now, parse};

const TOKEN_COLUMNS: &str = "name, role, created_at, created_by, last_used_at";

fn token_from(row: &Row) -> rusqlite::Result<(String, String, i64, String, Option<i64>)> {
    Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?))
}

fn token(
    (name, role, created_at, created_by, last_used_at): (String, String, i64, String, Option<i64>),
) -> Result<ApiToken, StoreError> {
    Ok(ApiToken {
        name,
        role: parse("token role", &role)?,
        created_at,
        created_by,
        last_used_at,
    })
}

type ChangeRow = (
    i64,
    i64,
    i64,
    String,
    [Option<String>; 2],
    [Option<bool>; 2],
    [Option<String>; 2],
    Option<(String, String, String, String)>,
);

fn change_from(row: &Row) -> rusqlite::Result<ChangeRow> {
    let journal = match row.get::<_, Option<String>>(10)? {
        Some(connector) => Some((connector, row.get(11)?, row.get(12)?, row.get(13)?)),
        None => None,
    };
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        [row.get(4)?, row.get(5)?],
        [row.get(6)?, row.get(7)?],
        [row.get(8)?, row.get(9)?],
        journal,
    ))
}

fn state(
    name: Option<String>,
    enabled: Option<bool>,
    values: Option<String>,
) -> Result<Option<ObjectState>, StoreError> {
    match (name, values) {
        (Some(name), Some(values)) => Ok(Some(ObjectState {
            name,
            enabled: enabled.unwrap_or(true),
            values: from_json("a change's values", &values)?,
        })),
        _ => Ok(None),
    }
}

fn change(
    (id, at, object_id, category, [old_name, new_name], [old_enabled, new_enabled], [old_values, new_values], journal): ChangeRow,
) -> Result<ChangeRecord, StoreError> {
    let (connector, source, action, detail) = match journal {
        Some((connector, source, action, detail)) => (
            connector,
            Some(parse("journal source", &source)?),
            Some(parse("journal action", &action)?),
            Some(detail),
        ),
        None => (String::new(), None, None, None),
    };
    Ok(ChangeRecord {
        cursor: Cursor { tx: 0, id },
        at,
        object_id,
        category: parse("category", &category)?,
        old: state(old_name, old_enabled, old_values)?,
        new: state(new_name, new_enabled, new_values)?,
        connector,
        source,
        action,
        detail,
    })
}

fn consumer_from(row: &Row) -> rusqlite::Result<(String, String, i64)> {
    Ok((row.get(0)?, row.get(1)?, row.get(2)?))
}

fn consumer((name, cursor, updated_at): (String, String, i64)) -> Result<ConsumerState, StoreError> {
    Ok(ConsumerState {
        name,
        cursor: parse("cursor", &cursor)?,
        updated_at,
    })
}

const DEAD_LETTER_COLUMNS: &str = "id, webhook, cursor, body, attempts, last_error, failed_at";

fn dead_letter_from(row: &Row) -> rusqlite::Result<(i64, String, String, String, u32, String, i64)> {
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

fn dead_letter(
    (id, webhook, cursor, body, attempts, last_error, failed_at): (i64, String, String, String, u32, String, i64),
) -> Result<DeadLetter, StoreError> {
    Ok(DeadLetter {
        id,
        webhook,
        cursor: parse("cursor", &cursor)?,
        body,
        attempts,
        last_error,
        failed_at,
    })
}

impl AdminStore for SqliteStore {
    fn create_token(&mut self, token: &ApiToken, digest: &str) -> Result<(), StoreError> {
        self.write(|tx| {
            let inserted = tx.execute(
                "INSERT INTO api_tokens (name, digest, role, created_at, created_by) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (name) DO NOTHING",
                params![
                    token.name,
                    digest,
                    token.role.as_str(),
                    token.created_at,
                    token.created_by
                ],
            )?;
            match inserted {
                0 => Err(StoreError::Taken {
                    what: "API token",
                    name: token.name.clone(),
                }),
                _ => Ok(()),
            }
        })
    }

    fn use_token(&mut self, digest: &str) -> Result<Option<ApiToken>, StoreError> {
        let found = cached_row(
            &self.conn,
            &format!("SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE digest = ?1"),
            [digest],
            token_from,
        )
        .optional()?
        .map(token)
        .transpose()?;
        if let Some(found) = &found {
            let minute_ago = now() - 60;
            if found.last_used_at.is_none_or(|at| at < minute_ago) {
                self.write(|tx| {
                    cached_execute(
                        tx,
                        "UPDATE api_tokens SET last_used_at = ?2 WHERE digest = ?1",
                        params![digest, now()],
                    )?;
                    Ok(())
                })?;
            }
        }
        Ok(found)
    }

    fn tokens(&self) -> Result<Vec<ApiToken>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(&format!("SELECT {TOKEN_COLUMNS} FROM api_tokens ORDER BY name"))?;
        let rows = stmt.query_map([], token_from)?;
        rows.map(|r| token(r?)).collect()
    }

    fn revoke_token(&mut self, name: &str) -> Result<bool, StoreError> {
        self.write(|tx| Ok(tx.execute("DELETE FROM api_tokens WHERE name = ?1", [name])? > 0))
    }

    fn changes(&self, after: Cursor, limit: usize) -> Result<Vec<ChangeRecord>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            r#"SELECT c.id, c.at, c.object_id, c.category, c.old_name, c.new_name, c.old_enabled, c.new_enabled,
                      c.old_values, c.new_values, j.connector, j.source, j.action, j.detail
               FROM changes c LEFT JOIN journal j ON j.id = c.journal_id
               WHERE c.id > ?1 ORDER BY c.id LIMIT ?2"#,
        )?;
        let rows = stmt.query_map(params![after.id, limit as i64], change_from)?;
        rows.map(|r| change(r?)).collect()
    }

    fn feed_end(&self) -> Result<Cursor, StoreError> {
        let id: i64 = self.conn.query_row(
            "SELECT max(coalesce((SELECT max(id) FROM changes), 0), (SELECT value FROM counters WHERE name = 'changes_pruned'))",
            [],
            |r| r.get(0),
        )?;
        Ok(Cursor { tx: 0, id })
    }

    fn prune_changes(&mut self, before: i64) -> Result<usize, StoreError> {
        self.write(|tx| {
            tx.execute(
                "UPDATE counters SET value = max(value, coalesce((SELECT max(id) FROM changes WHERE at < ?1), 0))
                 WHERE name = 'changes_pruned'",
                [before],
            )?;
            Ok(tx.execute("DELETE FROM changes WHERE at < ?1", [before])?)
        })
    }

    fn pruned_through(&self) -> Result<Cursor, StoreError> {
        let id = self
            .conn
            .query_row("SELECT value FROM counters WHERE name = 'changes_pruned'", [], |r| {
                r.get(0)
            })?;
        Ok(Cursor { tx: 0, id })
    }

    fn cursor(&self, kind: &str, name: &str) -> Result<Option<ConsumerState>, StoreError> {
        cached_row(
            &self.conn,
            "SELECT name, cursor, updated_at FROM cursors WHERE kind = ?1 AND name = ?2",
            [kind, name],
            consumer_from,
        )
        .optional()?
        .map(consumer)
        .transpose()
    }

    fn cursors(&self, kind: &str) -> Result<Vec<ConsumerState>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT name, cursor, updated_at FROM cursors WHERE kind = ?1 ORDER BY name")?;
        let rows = stmt.query_map([kind], consumer_from)?;
        rows.map(|r| consumer(r?)).collect()
    }

    fn set_cursor(&mut self, kind: &str, name: &str, cursor: Cursor) -> Result<(), StoreError> {
        self.write(|tx| {
            cached_execute(
                tx,
                "INSERT INTO cursors (kind, name, cursor, updated_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (kind, name) DO UPDATE SET cursor = excluded.cursor, updated_at = excluded.updated_at",
                params![kind, name, cursor.to_string(), now()],
            )?;
            Ok(())
        })
    }

    fn add_dead_letter(&mut self, letter: &DeadLetter) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO dead_letters (webhook, cursor, body, attempts, last_error, failed_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    letter.webhook,
                    letter.cursor.to_string(),
                    letter.body,
                    letter.attempts,
                    letter.last_error,
                    letter.failed_at
                ],
            )?;
            Ok(())
        })
    }

    fn dead_letters(&self, webhook: Option<&str>) -> Result<Vec<DeadLetter>, StoreError> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters WHERE ?1 IS NULL OR webhook = ?1 ORDER BY id"
        ))?;
        let rows = stmt.query_map([webhook], dead_letter_from)?;
        rows.map(|r| dead_letter(r?)).collect()
    }

    fn dead_letter(&self, id: i64) -> Result<Option<DeadLetter>, StoreError> {
        self.conn
            .query_row(
                &format!("SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters WHERE id = ?1"),
                [id],
                dead_letter_from,
            )
            .optional()?
            .map(dead_letter)
            .transpose()
    }

    fn remove_dead_letter(&mut self, id: i64) -> Result<bool, StoreError> {
        self.write(|tx| Ok(tx.execute("DELETE FROM dead_letters WHERE id = ?1", [id])? > 0))
    }
}
