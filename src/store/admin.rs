//! What the admin side keeps in the store: API tokens (as digests), the
//! change feed — every change to a local object, in commit order, with
//! the journal line that says why — with its consumers' cursors, and the
//! webhooks' delivery state and dead letters.
//!
//! The feed is written by the database itself (triggers on `objects`), so
//! no write path can forget it; the journal line committed with a change
//! names its connector, source and action (a trigger on `journal`).

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use super::StoreError;
use crate::model::{Action, Category, ChangeSource, Role, Values};

/// A position in the change feed. SQLite commits one writer at a time,
/// so its row ids are in commit order (`tx` is 0). PostgreSQL takes ids
/// from a sequence before commit, so a later id may commit first: there
/// rows are ordered by their transaction id and read only below the
/// oldest transaction still running (see `changes`), which no new row
/// can come before.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cursor {
    pub tx: i64,
    pub id: i64,
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.tx, self.id)
    }
}

impl FromStr for Cursor {
    type Err = String;
    fn from_str(s: &str) -> Result<Cursor, String> {
        let bad = || format!("{s:?} is not a change feed cursor (one looks like \"0-42\")");
        let (tx, id) = s.split_once('-').ok_or_else(bad)?;
        let (tx, id) = (tx.parse().map_err(|_| bad())?, id.parse().map_err(|_| bad())?);
        match (tx, id) {
            (0.., 0..) => Ok(Cursor { tx, id }),
            _ => Err(bad()),
        }
    }
}

impl Serialize for Cursor {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// A local object's state on one side of a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectState {
    pub name: String,
    pub enabled: bool,
    pub values: Values,
}

/// One change to a local object: its state before (none when created)
/// and after (none when deleted), and the journal line committed with it.
#[derive(Debug, Clone)]
pub struct ChangeRecord {
    pub cursor: Cursor,
    pub at: i64,
    pub object_id: i64,
    pub category: Category,
    pub old: Option<ObjectState>,
    pub new: Option<ObjectState>,
    /// The journal line's: empty for a local edit.
    pub connector: String,
    pub source: Option<ChangeSource>,
    pub action: Option<Action>,
    /// The journal line's detail (JSON), which names an operator.
    pub detail: Option<String>,
}

/// An API token for scripts, created by the CLI; only its digest is kept.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ApiToken {
    pub name: String,
    pub role: Role,
    pub created_at: i64,
    /// Who created it (the CLI's user).
    pub created_by: String,
    /// To the minute.
    pub last_used_at: Option<i64>,
}

/// A feed consumer's cursor, or a webhook's, as last acknowledged.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ConsumerState {
    pub name: String,
    #[schema(value_type = String)]
    pub cursor: Cursor,
    pub updated_at: i64,
}

/// A change a webhook gave up on after its retries, kept until an
/// operator retries or discards it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DeadLetter {
    pub id: i64,
    pub webhook: String,
    #[schema(value_type = String)]
    pub cursor: Cursor,
    /// The body as it was sent (JSON).
    pub body: String,
    pub attempts: u32,
    pub last_error: String,
    pub failed_at: i64,
}

/// The admin side's tables.
pub trait AdminStore {
    /// Refused with `NameTaken` if the name is.
    fn create_token(&mut self, token: &ApiToken, digest: &str) -> Result<(), StoreError>;
    /// The token with this digest; its last use is noted (to the minute).
    fn use_token(&mut self, digest: &str) -> Result<Option<ApiToken>, StoreError>;
    fn tokens(&self) -> Result<Vec<ApiToken>, StoreError>;
    fn revoke_token(&mut self, name: &str) -> Result<bool, StoreError>;

    /// Up to `limit` changes after `after`, in commit order; only changes
    /// no earlier commit can still come before.
    fn changes(&self, after: Cursor, limit: usize) -> Result<Vec<ChangeRecord>, StoreError>;
    /// Where a reader starting now begins: after every change readable now.
    fn feed_end(&self) -> Result<Cursor, StoreError>;
    /// Removes changes older than `before` (seconds); returns how many.
    fn prune_changes(&mut self, before: i64) -> Result<usize, StoreError>;
    /// The last change pruned: a cursor before it has missed some.
    fn pruned_through(&self) -> Result<Cursor, StoreError>;

    /// Consumers' cursors (`kind` "consumer" or "webhook").
    fn cursor(&self, kind: &str, name: &str) -> Result<Option<ConsumerState>, StoreError>;
    fn cursors(&self, kind: &str) -> Result<Vec<ConsumerState>, StoreError>;
    fn set_cursor(&mut self, kind: &str, name: &str, cursor: Cursor) -> Result<(), StoreError>;

    fn add_dead_letter(&mut self, letter: &DeadLetter) -> Result<(), StoreError>;
    fn dead_letters(&self, webhook: Option<&str>) -> Result<Vec<DeadLetter>, StoreError>;
    fn dead_letter(&self, id: i64) -> Result<Option<DeadLetter>, StoreError>;
    fn remove_dead_letter(&mut self, id: i64) -> Result<bool, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_what_is_not_one() {
        let c = Cursor { tx: 981, id: 42 };
        assert_eq!(c.to_string().parse::<Cursor>(), Ok(c));
        assert_eq!("0-0".parse::<Cursor>(), Ok(Cursor::default()));
        for bad in ["", "42", "a-1", "1-", "-1-2", "1-2-3", "99999999999999999999-1"] {
            assert!(bad.parse::<Cursor>().is_err(), "{bad:?} parsed");
        }
        assert!(Cursor { tx: 1, id: 1 } > Cursor { tx: 0, id: 9 });
    }
}
