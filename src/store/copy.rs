//! `ldapsync store copy`: moves an installation between the embedded store
//! and PostgreSQL (either way), every table with its ids, into an empty
//! target, then reads the target back and compares each table's row count
//! and checksum with the source's.

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::{AnyStore, Association, Capture, ConnectorState, JournalEntry, LocalObject, StoreError, Watermark};

/// Every row of every table, in id (or key) order, backend-neutral.
#[derive(Debug, Default, Clone)]
pub struct Tables {
    /// Objects with their local edit numbers.
    pub objects: Vec<(LocalObject, i64)>,
    pub associations: Vec<Association>,
    /// Journal lines with their ids.
    pub journal: Vec<(i64, JournalEntry)>,
    pub states: Vec<ConnectorState>,
    pub captures: Vec<Capture>,
    pub watermarks: Vec<Watermark>,
    /// (connector, object id, held at).
    pub held_deletes: Vec<(String, i64, i64)>,
    /// The last local edit number.
    pub local_edit: i64,
}

/// One table's row count and checksum, as compared after a copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TableSummary {
    pub table: &'static str,
    pub rows: usize,
    pub sha256: String,
}

fn summary<T: std::fmt::Debug>(table: &'static str, rows: &[T]) -> TableSummary {
    let mut hash = Sha256::new();
    for row in rows {
        // Debug of the neutral records: the same text whichever backend
        // they were read from.
        hash.update(format!("{row:?}\n").as_bytes());
    }
    TableSummary {
        table,
        rows: rows.len(),
        sha256: format!("{:x}", hash.finalize()),
    }
}

impl Tables {
    pub fn summaries(&self) -> Vec<TableSummary> {
        vec![
            summary("objects", &self.objects),
            summary("associations", &self.associations),
            summary("journal", &self.journal),
            summary("connector_state", &self.states),
            summary("captures", &self.captures),
            summary("watermarks", &self.watermarks),
            summary("held_deletes", &self.held_deletes),
            summary("counters", &[self.local_edit]),
        ]
    }

    /// In key order, whatever order (and text collation) the backend read
    /// them in.
    pub fn sorted(mut self) -> Tables {
        self.objects.sort_by_key(|(o, _)| o.id);
        self.associations
            .sort_by(|a, b| (&a.connector, a.object_id).cmp(&(&b.connector, b.object_id)));
        self.journal.sort_by_key(|(id, _)| *id);
        self.states.sort_by(|a, b| a.connector.cmp(&b.connector));
        self.captures.sort_by_key(|c| c.id);
        self.watermarks
            .sort_by(|a, b| (&a.connector, a.category.as_str()).cmp(&(&b.connector, b.category.as_str())));
        self.held_deletes.sort();
        self
    }

    /// Nothing an installation would miss: no object, association, journal
    /// line or connector state.
    pub fn is_empty(&self) -> bool {
        self.objects.is_empty() && self.associations.is_empty() && self.journal.is_empty() && self.states.is_empty()
    }
}

/// Copies `from` into the empty `to`, and verifies it.
pub fn copy(from: &AnyStore, to: &mut AnyStore) -> Result<Vec<TableSummary>, StoreError> {
    if !to.export()?.is_empty() {
        return Err(StoreError::Config(
            "the target store is not empty; copy into a new database only".into(),
        ));
    }
    let tables = from.export()?;
    to.import(&tables)?;
    let expected = tables.summaries();
    let copied = to.export()?.summaries();
    for (want, got) in expected.iter().zip(&copied) {
        if want != got {
            return Err(StoreError::Config(format!(
                "the copy of table {} differs: {} rows ({}) read back, {} rows ({}) written",
                want.table, got.rows, got.sha256, want.rows, want.sha256
            )));
        }
    }
    Ok(copied)
}
