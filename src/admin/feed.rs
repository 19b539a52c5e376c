//! The change feed as applications read it: every change applied to the
//! local store, in commit order, with its source, connector and action
//! and each field's old and new values (a secret field by name only);
//! consumers keep durable cursors in the store.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::AdminError;
use crate::model::{Action, Category, ChangeSource, ENABLED_FIELD, Values};
use crate::store::{AdminStore, ChangeRecord, Cursor};
use crate::sync::engine::is_secret_field;

/// Whether the object came, changed or went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    Created,
    Updated,
    Deleted,
}

/// One field's values before and after; a secret's are not shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct FieldChange {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new: Option<Vec<String>>,
    /// The field holds a secret: it changed, its values are not shown.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub secret: bool,
}

/// A change to one local object, as the feed and webhooks send it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct FeedChange {
    /// Where a reader resumes after this change (`after=`); the webhooks'
    /// idempotency key.
    #[schema(value_type = String)]
    pub cursor: Cursor,
    /// Seconds since the epoch.
    pub at: i64,
    pub kind: ChangeKind,
    pub category: Category,
    /// The object's name (its last name, when deleted).
    pub object: String,
    pub object_id: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub renamed_from: Option<String>,
    /// `proxy` (a write captured by the relay), `poll` (read from the
    /// directory) or `local` (an operator or the application).
    pub source: Option<ChangeSource>,
    /// The connector that applied it; none for a local edit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connector: Option<String>,
    /// The journal's action: `updated`, `conflict-resolved`, `local-edit`, …
    pub action: Option<Action>,
    /// Who made a local edit (`api:alice`, `token:deploy`, a CLI user).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
    /// The fields that changed (`enabled` among them).
    pub fields: BTreeMap<String, FieldChange>,
}

fn with_enabled(values: &Values, enabled: bool) -> Values {
    let mut values = values.clone();
    values.insert(ENABLED_FIELD.into(), vec![enabled.to_string()]);
    values
}

impl FeedChange {
    fn from_record(record: ChangeRecord) -> FeedChange {
        let kind = match (&record.old, &record.new) {
            (None, _) => ChangeKind::Created,
            (_, None) => ChangeKind::Deleted,
            _ => ChangeKind::Updated,
        };
        let empty = Values::new();
        let old = record
            .old
            .as_ref()
            .map_or(empty.clone(), |o| with_enabled(&o.values, o.enabled));
        let new = record
            .new
            .as_ref()
            .map_or(empty, |n| with_enabled(&n.values, n.enabled));
        let names: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
        let fields = names
            .into_iter()
            .filter(|f| old.get(*f) != new.get(*f))
            .map(|field| {
                let change = if is_secret_field(field) {
                    FieldChange {
                        old: None,
                        new: None,
                        secret: true,
                    }
                } else {
                    FieldChange {
                        old: old.get(field).cloned(),
                        new: new.get(field).cloned(),
                        secret: false,
                    }
                };
                (field.clone(), change)
            })
            .collect();
        let operator = record
            .detail
            .as_deref()
            .and_then(|d| serde_json::from_str::<serde_json::Value>(d).ok())
            .and_then(|d| d.get("operator").and_then(|o| o.as_str()).map(str::to_owned));
        let (old_name, new_name) = (record.old.map(|o| o.name), record.new.map(|n| n.name));
        let renamed_from = match (&old_name, &new_name) {
            (Some(old), Some(new)) if old != new => Some(old.clone()),
            _ => None,
        };
        FeedChange {
            cursor: record.cursor,
            at: record.at,
            kind,
            category: record.category,
            object: new_name.or(old_name).unwrap_or_default(),
            object_id: record.object_id,
            renamed_from,
            source: record.source,
            connector: Some(record.connector).filter(|c| !c.is_empty()),
            action: record.action,
            operator,
            fields,
        }
    }
}

/// A page of the feed, and where the next one starts.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FeedPage {
    pub changes: Vec<FeedChange>,
    /// The cursor to send next (`after=`): the last change's, or the one
    /// sent when there was none.
    #[schema(value_type = String)]
    pub next: Cursor,
}

/// The most changes a page holds.
pub const MAX_CHANGES: usize = 1000;

/// The changes after `after`; refused when the feed has pruned changes
/// after it (the reader would miss them unknowingly).
pub fn changes(store: &impl AdminStore, after: Cursor, limit: usize) -> Result<FeedPage, AdminError> {
    let pruned = store.pruned_through()?;
    if after < pruned {
        return Err(AdminError::CursorExpired {
            cursor: after.to_string(),
            oldest: pruned.to_string(),
        });
    }
    let changes: Vec<FeedChange> = store
        .changes(after, limit.clamp(1, MAX_CHANGES))?
        .into_iter()
        .map(FeedChange::from_record)
        .collect();
    let next = changes.last().map_or(after, |c| c.cursor);
    Ok(FeedPage { changes, next })
}

pub const CONSUMER: &str = "consumer";

/// Where a named consumer reads next: its acknowledged cursor, or for a
/// new one the oldest change the feed still holds.
pub fn consumer_cursor(store: &impl AdminStore, name: &str) -> Result<Cursor, AdminError> {
    super::check_name(name)?;
    match store.cursor(CONSUMER, name)? {
        Some(state) => Ok(state.cursor),
        None => Ok(store.pruned_through()?),
    }
}

/// Records that a consumer has handled every change up to `cursor`.
pub fn acknowledge(store: &mut impl AdminStore, name: &str, cursor: Cursor) -> Result<(), AdminError> {
    super::check_name(name)?;
    Ok(store.set_cursor(CONSUMER, name, cursor)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ObjectState;

    fn state(name: &str, enabled: bool, values: &[(&str, &[&str])]) -> ObjectState {
        ObjectState {
            name: name.into(),
            enabled,
            values: values
                .iter()
                .map(|(f, v)| (f.to_string(), v.iter().map(|s| s.to_string()).collect()))
                .collect(),
        }
    }

    fn record(old: Option<ObjectState>, new: Option<ObjectState>, detail: Option<&str>) -> ChangeRecord {
        ChangeRecord {
            cursor: Cursor { tx: 0, id: 7 },
            at: 1,
            object_id: 3,
            category: Category::Account,
            old,
            new,
            connector: String::new(),
            source: Some(ChangeSource::Local),
            action: Some(Action::LocalEdit),
            detail: detail.map(str::to_owned),
        }
    }

    #[test]
    fn a_change_lists_only_the_fields_that_changed_with_old_and_new_values() {
        let old = state("ann", true, &[("mail", &["a@x"]), ("cn", &["Ann"])]);
        let new = state("ann", false, &[("mail", &["ann@x"]), ("cn", &["Ann"])]);
        let change = FeedChange::from_record(record(Some(old), Some(new), Some(r#"{"operator":"api:alice"}"#)));
        assert_eq!(change.kind, ChangeKind::Updated);
        assert_eq!(change.operator.as_deref(), Some("api:alice"));
        assert_eq!(change.connector, None);
        let fields: Vec<&str> = change.fields.keys().map(String::as_str).collect();
        assert_eq!(fields, ["enabled", "mail"]);
        assert_eq!(change.fields["mail"].old, Some(vec!["a@x".to_string()]));
        assert_eq!(change.fields["mail"].new, Some(vec!["ann@x".to_string()]));
    }

    #[test]
    fn a_secret_field_is_named_without_its_values() {
        let old = state("ann", true, &[("password", &["{SSHA}old"])]);
        let new = state("ann", true, &[("password", &["{SSHA}new"])]);
        let change = FeedChange::from_record(record(Some(old), Some(new), None));
        let json = serde_json::to_string(&change).unwrap();
        assert!(!json.contains("SSHA"), "{json}");
        assert!(change.fields["password"].secret);
    }

    #[test]
    fn creations_deletions_and_renames_say_so() {
        let created = FeedChange::from_record(record(None, Some(state("bo", true, &[])), None));
        assert_eq!((created.kind, created.object.as_str()), (ChangeKind::Created, "bo"));
        let deleted = FeedChange::from_record(record(Some(state("bo", true, &[])), None, None));
        assert_eq!((deleted.kind, deleted.object.as_str()), (ChangeKind::Deleted, "bo"));
        let renamed = FeedChange::from_record(record(
            Some(state("bo", true, &[])),
            Some(state("bob", true, &[])),
            None,
        ));
        assert_eq!(renamed.renamed_from.as_deref(), Some("bo"));
        assert_eq!(renamed.object, "bob");
    }
}
