//! Rows written many at a time: one statement per table for a whole slice
//! of rows (arrays `unnest`ed server-side), where a statement per row
//! would cost a round trip each. A pass's creations and `store copy` write
//! through them; a single journal line is a slice of one.

use super::{Db, error};
use crate::store::to_json;
use crate::store::{Association, JournalEntry, LocalObject, StoreError};

/// Objects with the ids and local edit numbers given, in step.
pub(super) fn objects(c: &mut Db<'_>, ids: &[i64], objects: &[&LocalObject], edits: &[i64]) -> Result<(), StoreError> {
    c.execute(
        r#"INSERT INTO objects (id, category, name, enabled, "values", edit)
           SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::boolean[], $5::text[], $6::bigint[])"#,
        &[
            &ids,
            &objects.iter().map(|o| o.category.as_str()).collect::<Vec<_>>(),
            &objects.iter().map(|o| o.name.as_str()).collect::<Vec<_>>(),
            &objects.iter().map(|o| o.enabled).collect::<Vec<_>>(),
            &objects.iter().map(|o| to_json(&o.values)).collect::<Vec<_>>(),
            &edits,
        ],
    )
    .map_err(error)?;
    Ok(())
}

/// Associations of the objects `object_ids`, in step (an association
/// decided before its object had an id carries none of its own).
pub(super) fn associations(
    c: &mut Db<'_>,
    object_ids: &[i64],
    associations: &[&Association],
) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO associations (connector, object_id, entry_id, dn, baseline, synced_at, entry_gone)
         SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::boolean[])",
        &[
            &associations.iter().map(|a| a.connector.as_str()).collect::<Vec<_>>(),
            &object_ids,
            &associations.iter().map(|a| a.entry_id.as_str()).collect::<Vec<_>>(),
            &associations.iter().map(|a| a.dn.as_str()).collect::<Vec<_>>(),
            &associations.iter().map(|a| to_json(&a.baseline)).collect::<Vec<_>>(),
            &associations.iter().map(|a| a.synced_at).collect::<Vec<_>>(),
            &associations.iter().map(|a| a.entry_gone).collect::<Vec<_>>(),
        ],
    )
    .map_err(error)?;
    Ok(())
}

/// Journal lines, each with its id or (`None`) the sequence's next, taken
/// in the order given.
pub(super) fn journal(c: &mut Db<'_>, ids: &[Option<i64>], lines: &[&JournalEntry]) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO journal (id, at, connector, category, object, source, action, policy, detail)
         SELECT coalesce(id, nextval('journal_id_seq')), at, connector, category, object, source, action, policy, detail
         FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[])
              AS line (id, at, connector, category, object, source, action, policy, detail)",
        &[
            &ids,
            &lines.iter().map(|e| e.at).collect::<Vec<_>>(),
            &lines.iter().map(|e| e.connector.as_str()).collect::<Vec<_>>(),
            &lines.iter().map(|e| e.category.as_str()).collect::<Vec<_>>(),
            &lines.iter().map(|e| e.object.as_str()).collect::<Vec<_>>(),
            &lines.iter().map(|e| e.source.as_str()).collect::<Vec<_>>(),
            &lines.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(),
            &lines.iter().map(|e| e.policy.as_str()).collect::<Vec<_>>(),
            &lines.iter().map(|e| e.detail.as_str()).collect::<Vec<_>>(),
        ],
    )
    .map_err(error)?;
    Ok(())
}
