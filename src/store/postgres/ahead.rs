//! A full pass's look-ahead on PostgreSQL, where every read and write is a
//! round trip: the associations and objects of the entries about to be
//! decided, read with a few statements per chunk instead of three per
//! entry, and the objects the pass creates, sent as one statement per
//! table when something reads or the batch commits.
//!
//! Valid only inside a batch. The pass's own writes keep it exact (a
//! creation is entered, any other write forgets what it touched); another
//! session's changes are seen as late as a read issued at the look-up
//! would have seen them.

use std::collections::HashMap;

use super::{ASSOCIATION_COLUMNS, BATCH_WRITES, Db, OBJECT_COLUMNS, association_from, error, object_from, rows};
use crate::model::Category;
use crate::store::{Association, Commit, LocalObject, StoreError};

/// Object ids taken from the sequence at once for the creations of a pass.
const ID_BLOCK: i64 = 500;

/// A creation decided and not yet sent: its object has the id `id`.
pub(super) struct Created {
    pub id: i64,
    pub commit: Commit,
}

pub(super) struct Ahead {
    connector: String,
    category: Category,
    by_entry: HashMap<String, Option<Association>>,
    by_name: HashMap<String, Option<LocalObject>>,
    by_id: HashMap<i64, Option<LocalObject>>,
    /// `association_of_object`: any connector's association of the object.
    of_object: HashMap<i64, Option<Association>>,
    pub created: Vec<Created>,
    /// Creations deferred by the caller's thread that the batch has not
    /// counted yet: at most a batch's worth, then the connection thread
    /// counts them (and commits).
    pub uncounted: usize,
    /// Object ids taken from the sequence and not used yet, last first.
    ids: Vec<i64>,
}

impl Ahead {
    /// Reads what `entries` (stable id, name) need; keeps the ids left
    /// from `before`.
    pub fn read(
        c: &mut Db<'_>,
        connector: &str,
        category: Category,
        entries: &[(String, Option<String>)],
        before: Option<Ahead>,
    ) -> Result<Ahead, StoreError> {
        let entry_ids: Vec<&str> = entries.iter().map(|(id, _)| id.as_str()).collect();
        let mut by_entry: HashMap<String, Option<Association>> =
            entry_ids.iter().map(|id| (id.to_string(), None)).collect();
        let rows = c
            .query_planned(
                &format!("SELECT {ASSOCIATION_COLUMNS} FROM associations WHERE connector = $1 AND entry_id = ANY($2)"),
                &[&connector, &entry_ids],
            )
            .map_err(error)?;
        for row in &rows {
            let a = association_from(row)?;
            by_entry.insert(a.entry_id.clone(), Some(a));
        }
        let associated: Vec<i64> = by_entry.values().flatten().map(|a| a.object_id).collect();
        // A name matters only to an entry not associated yet (a first sync).
        let names: Vec<&str> = entries
            .iter()
            .filter(|(id, _)| matches!(by_entry.get(id), Some(None)))
            .filter_map(|(_, name)| name.as_deref())
            .collect();
        let mut by_id: HashMap<i64, Option<LocalObject>> = associated.iter().map(|id| (*id, None)).collect();
        let mut by_name: HashMap<String, Option<LocalObject>> =
            names.iter().map(|name| (name.to_string(), None)).collect();
        // Two statements, not one with OR: each keeps to its index.
        let mut rows = if names.is_empty() {
            Vec::new()
        } else {
            c.query_planned(
                &format!("SELECT {OBJECT_COLUMNS} FROM objects o WHERE category = $1 AND name = ANY($2)"),
                &[&category.as_str(), &names],
            )
            .map_err(error)?
        };
        if !associated.is_empty() {
            rows.extend(
                c.query_planned(
                    &format!("SELECT {OBJECT_COLUMNS} FROM objects o WHERE id = ANY($1)"),
                    &[&associated],
                )
                .map_err(error)?,
            );
        }
        for row in &rows {
            let o = object_from(row)?;
            if o.category == category && by_name.contains_key(&o.name) {
                by_name.insert(o.name.clone(), Some(o.clone()));
            }
            by_id.insert(o.id, Some(o));
        }
        let named: Vec<i64> = by_name.values().flatten().map(|o| o.id).collect();
        let mut of_object: HashMap<i64, Option<Association>> = named.iter().map(|id| (*id, None)).collect();
        let rows = if named.is_empty() {
            Vec::new()
        } else {
            c.query_planned(
                &format!(
                    "SELECT DISTINCT ON (object_id) {ASSOCIATION_COLUMNS} FROM associations
                     WHERE object_id = ANY($1) ORDER BY object_id, connector"
                ),
                &[&named],
            )
            .map_err(error)?
        };
        for row in &rows {
            let a = association_from(row)?;
            of_object.insert(a.object_id, Some(a));
        }
        Ok(Ahead {
            connector: connector.to_owned(),
            category,
            by_entry,
            by_name,
            by_id,
            of_object,
            created: Vec::new(),
            uncounted: 0,
            ids: before.map(|b| b.ids).unwrap_or_default(),
        })
    }

    /// `Some(answer)` when the look-ahead knows it.
    pub fn object(&self, category: Category, name: &str) -> Option<Option<LocalObject>> {
        (category == self.category).then(|| self.by_name.get(name).cloned())?
    }

    pub fn object_by_id(&self, id: i64) -> Option<Option<LocalObject>> {
        self.by_id.get(&id).cloned()
    }

    pub fn association_by_entry(&self, connector: &str, entry_id: &str) -> Option<Option<Association>> {
        (connector == self.connector).then(|| self.by_entry.get(entry_id).cloned())?
    }

    pub fn association_of_object(&self, object_id: i64) -> Option<Option<Association>> {
        self.of_object.get(&object_id).cloned()
    }

    /// Takes `commit` to send later if it creates an object, with its
    /// association, that the look-ahead knows does not exist yet; returns
    /// the new object's id. Anything else is written at once.
    pub fn defer(&mut self, c: &mut Db<'_>, commit: Commit) -> Result<Result<i64, Commit>, StoreError> {
        if !self.deferrable(&commit) {
            return Ok(Err(commit));
        }
        if self.ids.is_empty() {
            let rows = c
                .query(
                    "SELECT nextval('objects_id_seq') FROM generate_series(1, $1::bigint)",
                    &[&ID_BLOCK],
                )
                .map_err(error)?;
            self.ids = rows.iter().rev().map(|r| r.get(0)).collect();
        }
        Ok(Ok(self.enter(commit)))
    }

    /// Whether `defer_here` takes `commit`: a creation `defer` would take,
    /// while ids are left and the batch need not be counted (both take the
    /// connection thread).
    pub fn defers_here(&self, commit: &Commit) -> bool {
        !self.ids.is_empty() && self.uncounted < BATCH_WRITES && self.deferrable(commit)
    }

    /// `defer` on the caller's thread, of a commit `defers_here` took.
    pub fn defer_here(&mut self, commit: Commit) -> i64 {
        self.uncounted += 1;
        self.enter(commit)
    }

    /// A creation, with its association, of what the look-ahead knows
    /// does not exist yet.
    fn deferrable(&self, commit: &Commit) -> bool {
        commit.delete_object.is_none()
            && commit.object.as_ref().is_some_and(|o| {
                o.id == 0 && o.category == self.category && matches!(self.by_name.get(&o.name), Some(None))
            })
            && commit.association.as_ref().is_some_and(|a| {
                a.object_id == 0
                    && a.connector == self.connector
                    && matches!(self.by_entry.get(&a.entry_id), Some(None))
            })
    }

    /// Enters a deferrable creation under the next id; returns the id.
    fn enter(&mut self, commit: Commit) -> i64 {
        let id = self.ids.pop().expect("ids are left");
        let mut object = commit.object.clone().expect("checked above");
        object.id = id;
        let mut association = commit.association.clone().expect("checked above");
        association.object_id = id;
        self.by_name.insert(object.name.clone(), Some(object.clone()));
        self.by_id.insert(id, Some(object));
        self.by_entry
            .insert(association.entry_id.clone(), Some(association.clone()));
        self.of_object.insert(id, Some(association));
        self.created.push(Created { id, commit });
        id
    }

    /// Forgets what a write changed: objects by id and name, associations
    /// by entry.
    pub fn forget(&mut self, ids: &[i64], names: &[&str], entry_ids: &[&str]) {
        for id in ids {
            self.by_id.remove(id);
            self.of_object.remove(id);
        }
        self.by_name
            .retain(|name, o| !names.contains(&name.as_str()) && !o.as_ref().is_some_and(|o| ids.contains(&o.id)));
        self.by_entry.retain(|entry_id, a| {
            !entry_ids.contains(&entry_id.as_str()) && !a.as_ref().is_some_and(|a| ids.contains(&a.object_id))
        });
    }

    /// Forgets everything looked up (a write the look-ahead cannot follow).
    pub fn forget_all(&mut self) {
        self.by_entry.clear();
        self.by_name.clear();
        self.by_id.clear();
        self.of_object.clear();
    }
}

/// Sends creations: one statement per table.
pub(super) fn insert_created(c: &mut Db<'_>, created: &[Created]) -> Result<(), StoreError> {
    let objects: Vec<&LocalObject> = created.iter().filter_map(|k| k.commit.object.as_ref()).collect();
    let ids: Vec<i64> = created.iter().map(|k| k.id).collect();
    rows::objects(c, &ids, &objects, &vec![0; ids.len()])?;
    let associations: Vec<&Association> = created.iter().filter_map(|k| k.commit.association.as_ref()).collect();
    rows::associations(c, &ids, &associations)?;
    let journal: Vec<_> = created.iter().flat_map(|k| &k.commit.journal).collect();
    if journal.is_empty() {
        return Ok(());
    }
    // In the order decided: the lines take the sequence's ids in it.
    rows::journal(c, &vec![None; journal.len()], &journal)
}
