//! The admin side's tables on PostgreSQL (`store::admin`). The feed is
//! read in (transaction id, row id) order and only below the oldest
//! transaction still running: every change a later commit brings comes
//! after what was read, so a cursor never skips one.

use postgres::Row;

use super::{PostgresStore, error};
use crate::store::admin::{AdminStore, ApiToken, ChangeRecord, ConsumerState, Cursor, DeadLetter, ObjectState};
use crate::store::{StoreError, from_json, now, parse};

const TOKEN_COLUMNS: &str = "name, role, created_at, created_by, last_used_at";

fn token(row: &Row) -> Result<ApiToken, StoreError> {
    Ok(ApiToken {
        name: row.get(0),
        role: parse("token role", row.get(1))?,
        created_at: row.get(2),
        created_by: row.get(3),
        last_used_at: row.get(4),
    })
}

/// The changes readable in order: below the oldest running transaction.
const VISIBLE: &str = "c.tx < pg_snapshot_xmin(pg_current_snapshot())";

fn state(row: &Row, name: usize, enabled: usize, values: usize) -> Result<Option<ObjectState>, StoreError> {
    match (row.get::<_, Option<String>>(name), row.get::<_, Option<String>>(values)) {
        (Some(name), Some(values)) => Ok(Some(ObjectState {
            name,
            enabled: row.get::<_, Option<bool>>(enabled).unwrap_or(true),
            values: from_json("a change's values", &values)?,
        })),
        _ => Ok(None),
    }
}

fn change(row: &Row) -> Result<ChangeRecord, StoreError> {
    let source: Option<String> = row.get(12);
    let action: Option<String> = row.get(13);
    Ok(ChangeRecord {
        cursor: Cursor {
            tx: row.get(0),
            id: row.get(1),
        },
        at: row.get(2),
        object_id: row.get(3),
        category: parse("category", row.get(4))?,
        old: state(row, 5, 7, 9)?,
        new: state(row, 6, 8, 10)?,
        connector: row.get::<_, Option<String>>(11).unwrap_or_default(),
        source: source.map(|s| parse("journal source", &s)).transpose()?,
        action: action.map(|a| parse("journal action", &a)).transpose()?,
        detail: row.get(14),
    })
}

fn consumer(row: &Row) -> Result<ConsumerState, StoreError> {
    Ok(ConsumerState {
        name: row.get(0),
        cursor: parse("cursor", row.get(1))?,
        updated_at: row.get(2),
    })
}

const DEAD_LETTER_COLUMNS: &str = "id, webhook, cursor, body, attempts, last_error, failed_at";

fn dead_letter(row: &Row) -> Result<DeadLetter, StoreError> {
    Ok(DeadLetter {
        id: row.get(0),
        webhook: row.get(1),
        cursor: parse("cursor", row.get(2))?,
        body: row.get(3),
        attempts: u32::try_from(row.get::<_, i64>(4)).unwrap_or(u32::MAX),
        last_error: row.get(5),
        failed_at: row.get(6),
    })
}

impl AdminStore for PostgresStore {
    fn create_token(&mut self, token: &ApiToken, digest: &str) -> Result<(), StoreError> {
        let (token, digest) = (token.clone(), digest.to_owned());
        self.write(move |c| {
            let inserted = c
                .execute(
                    "INSERT INTO api_tokens (name, digest, role, created_at, created_by) VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (name) DO NOTHING",
                    &[
                        &token.name,
                        &digest,
                        &token.role.as_str(),
                        &token.created_at,
                        &token.created_by,
                    ],
                )
                .map_err(error)?;
            match inserted {
                0 => Err(StoreError::Taken {
                    what: "API token",
                    name: token.name,
                }),
                _ => Ok(()),
            }
        })
    }

    fn use_token(&mut self, digest: &str) -> Result<Option<ApiToken>, StoreError> {
        let digest = digest.to_owned();
        let found = {
            let digest = digest.clone();
            self.read(move |c| {
                c.query_opt(
                    &format!("SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE digest = $1"),
                    &[&digest],
                )
            })?
        };
        let Some(found) = found.as_ref().map(token).transpose()? else {
            return Ok(None);
        };
        if found.last_used_at.is_none_or(|at| at < now() - 60) {
            self.write(move |c| {
                c.execute(
                    "UPDATE api_tokens SET last_used_at = $2 WHERE digest = $1",
                    &[&digest, &now()],
                )
                .map_err(error)
                .map(drop)
            })?;
        }
        Ok(Some(found))
    }

    fn tokens(&self) -> Result<Vec<ApiToken>, StoreError> {
        let rows = self.read(|c| c.query(&format!("SELECT {TOKEN_COLUMNS} FROM api_tokens ORDER BY name"), &[]))?;
        rows.iter().map(token).collect()
    }

    fn revoke_token(&mut self, name: &str) -> Result<bool, StoreError> {
        let name = name.to_owned();
        self.write(move |c| {
            c.execute("DELETE FROM api_tokens WHERE name = $1", &[&name])
                .map(|n| n > 0)
                .map_err(error)
        })
    }

    fn changes(&self, after: Cursor, limit: usize) -> Result<Vec<ChangeRecord>, StoreError> {
        let limit = limit as i64;
        let rows = self.read(move |c| {
            c.query(
                &format!(
                    r#"SELECT c.tx::text::bigint, c.id, c.at, c.object_id, c.category, c.old_name, c.new_name,
                              c.old_enabled, c.new_enabled, c.old_values, c.new_values,
                              j.connector, j.source, j.action, j.detail
                       FROM changes c LEFT JOIN journal j ON j.id = c.journal_id
                       WHERE (c.tx, c.id) > ($1::text::xid8, $2) AND {VISIBLE}
                       ORDER BY c.tx, c.id LIMIT $3"#
                ),
                &[&after.tx.to_string(), &after.id, &limit],
            )
        })?;
        rows.iter().map(change).collect()
    }

    fn feed_end(&self) -> Result<Cursor, StoreError> {
        let pruned = self.pruned_through()?;
        let row = self.read(|c| {
            c.query_opt(
                &format!("SELECT c.tx::text::bigint, c.id FROM changes c WHERE {VISIBLE} ORDER BY c.tx DESC, c.id DESC LIMIT 1"),
                &[],
            )
        })?;
        let last = row.map(|r| Cursor {
            tx: r.get(0),
            id: r.get(1),
        });
        Ok(last.map_or(pruned, |last| last.max(pruned)))
    }

    fn prune_changes(&mut self, before: i64) -> Result<usize, StoreError> {
        self.write(move |c| {
            let last = c
                .query_opt(
                    "SELECT tx::text::bigint, id FROM changes WHERE at < $1 ORDER BY tx DESC, id DESC LIMIT 1",
                    &[&before],
                )
                .map_err(error)?;
            let Some(last) = last else { return Ok(0) };
            c.execute(
                "UPDATE counters SET value = greatest(value, CASE name WHEN 'changes_pruned_tx' THEN $1 ELSE $2 END)
                 WHERE name IN ('changes_pruned_tx', 'changes_pruned_id')",
                &[&last.get::<_, i64>(0), &last.get::<_, i64>(1)],
            )
            .map_err(error)?;
            c.execute("DELETE FROM changes WHERE at < $1", &[&before])
                .map(|n| n as usize)
                .map_err(error)
        })
    }

    fn pruned_through(&self) -> Result<Cursor, StoreError> {
        let rows = self.read(|c| {
            c.query(
                "SELECT name, value FROM counters WHERE name IN ('changes_pruned_tx', 'changes_pruned_id')",
                &[],
            )
        })?;
        let mut cursor = Cursor::default();
        for row in rows {
            match row.get::<_, &str>(0) {
                "changes_pruned_tx" => cursor.tx = row.get(1),
                _ => cursor.id = row.get(1),
            }
        }
        Ok(cursor)
    }

    fn cursor(&self, kind: &str, name: &str) -> Result<Option<ConsumerState>, StoreError> {
        let (kind, name) = (kind.to_owned(), name.to_owned());
        let row = self.read(move |c| {
            c.query_opt(
                "SELECT name, cursor, updated_at FROM cursors WHERE kind = $1 AND name = $2",
                &[&kind, &name],
            )
        })?;
        row.as_ref().map(consumer).transpose()
    }

    fn cursors(&self, kind: &str) -> Result<Vec<ConsumerState>, StoreError> {
        let kind = kind.to_owned();
        let rows = self.read(move |c| {
            c.query(
                "SELECT name, cursor, updated_at FROM cursors WHERE kind = $1 ORDER BY name",
                &[&kind],
            )
        })?;
        rows.iter().map(consumer).collect()
    }

    fn set_cursor(&mut self, kind: &str, name: &str, cursor: Cursor) -> Result<(), StoreError> {
        let (kind, name) = (kind.to_owned(), name.to_owned());
        self.write(move |c| {
            c.execute(
                "INSERT INTO cursors (kind, name, cursor, updated_at) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (kind, name) DO UPDATE SET cursor = excluded.cursor, updated_at = excluded.updated_at",
                &[&kind, &name, &cursor.to_string(), &now()],
            )
            .map(drop)
            .map_err(error)
        })
    }

    fn add_dead_letter(&mut self, letter: &DeadLetter) -> Result<(), StoreError> {
        let letter = letter.clone();
        self.write(move |c| {
            c.execute(
                "INSERT INTO dead_letters (webhook, cursor, body, attempts, last_error, failed_at)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    &letter.webhook,
                    &letter.cursor.to_string(),
                    &letter.body,
                    &i64::from(letter.attempts),
                    &letter.last_error,
                    &letter.failed_at,
                ],
            )
            .map(drop)
            .map_err(error)
        })
    }

    fn dead_letters(&self, webhook: Option<&str>) -> Result<Vec<DeadLetter>, StoreError> {
        let webhook = webhook.map(str::to_owned);
        let rows = self.read(move |c| {
            c.query(
                &format!(
                    "SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters WHERE $1::text IS NULL OR webhook = $1 ORDER BY id"
                ),
                &[&webhook],
            )
        })?;
        rows.iter().map(dead_letter).collect()
    }

    fn dead_letter(&self, id: i64) -> Result<Option<DeadLetter>, StoreError> {
        let row = self.read(move |c| {
            c.query_opt(
                &format!("SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters WHERE id = $1"),
                &[&id],
            )
        })?;
        row.as_ref().map(dead_letter).transpose()
    }

    fn remove_dead_letter(&mut self, id: i64) -> Result<bool, StoreError> {
        self.write(move |c| {
            c.execute("DELETE FROM dead_letters WHERE id = $1", &[&id])
                .map(|n| n > 0)
                .map_err(error)
        })
    }
}
