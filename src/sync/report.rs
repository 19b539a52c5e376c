//! What a pass did (or, in a dry run, would do): counts of objects by
//! outcome, a line per decision for the operator, the disputes (each
//! object once) and the deletes the guard holds.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::{Action, Category};
use crate::store::HeldDelete;

/// What a pass did (or, in a dry run, would do).
#[derive(Debug, Default, Serialize, utoipa::ToSchema)]
pub struct Report {
    pub associated: usize,
    pub created_local: usize,
    pub created_ldap: usize,
    pub updated: usize,
    /// Pairs whose sides had made the same change: only the baseline moved.
    pub converged: usize,
    pub conflicts: usize,
    pub disputed: usize,
    pub deleted: usize,
    pub disabled: usize,
    pub deletes_refused: usize,
    /// Deletes the guard holds for this connector after the pass, from this
    /// pass and earlier ones (a standing count, not summed).
    pub deletes_held: usize,
    pub failed: usize,
    /// One line per decision that changed something, for the operator.
    #[serde(skip)]
    pub lines: Vec<String>,
    /// Each disputed object (or nameless entry), by category and name:
    /// an object counts once however many entries it has and however many
    /// events of one poll concern it. Stored with the last reconciliation's
    /// result, for `status`, the API and the console.
    #[serde(serialize_with = "dispute_list")]
    #[schema(value_type = Vec<Dispute>)]
    pub(super) disputes: BTreeMap<(Category, String), Dispute>,
}

/// An object or entry the engine left alone rather than guess, and what
/// an operator needs to settle it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Dispute {
    pub category: Category,
    /// The object's name, or the entry's DN when it has no name.
    pub key: String,
    /// Why it is disputed.
    pub reason: String,
    /// The DNs of the entries it could be linked with.
    #[serde(default)]
    pub candidates: Vec<String>,
    /// The line the report says.
    pub line: String,
}

fn dispute_list<S: serde::Serializer>(
    disputes: &BTreeMap<(Category, String), Dispute>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(disputes.values())
}

impl Report {
    pub fn say(&mut self, line: String) {
        self.lines.push(line);
    }

    /// The counts by the journal action they count, for the metrics.
    pub fn outcomes(&self) -> [(Action, usize); 10] {
        [
            (Action::Associated, self.associated),
            (Action::CreatedLocal, self.created_local),
            (Action::CreatedLdap, self.created_ldap),
            (Action::Updated, self.updated),
            (Action::Converged, self.converged),
            (Action::Disputed, self.disputed),
            (Action::Deleted, self.deleted),
            (Action::Disabled, self.disabled),
            (Action::DeleteRefused, self.deletes_refused),
            (Action::Failed, self.failed),
        ]
    }

    /// Adds another report's counts and lines to this one.
    pub fn absorb(&mut self, other: Report) {
        self.associated += other.associated;
        self.created_local += other.created_local;
        self.created_ldap += other.created_ldap;
        self.updated += other.updated;
        self.converged += other.converged;
        self.conflicts += other.conflicts;
        self.deleted += other.deleted;
        self.disabled += other.disabled;
        self.deletes_refused += other.deletes_refused;
        self.failed += other.failed;
        self.lines.extend(other.lines);
        for (_, dispute) in other.disputes {
            self.dispute(dispute);
        }
    }

    pub(super) fn dispute(&mut self, dispute: Dispute) {
        let key = (dispute.category, dispute.key.clone());
        if let std::collections::btree_map::Entry::Vacant(vacant) = self.disputes.entry(key) {
            vacant.insert(dispute);
            self.disputed += 1;
        }
    }

    /// Records the deletes the guard holds after a pass, and says so: every
    /// pass reports them until they are confirmed or the entries are back.
    pub fn held(&mut self, connector: &str, held: &[HeldDelete]) {
        self.deletes_held = held.len();
        if held.is_empty() {
            return;
        }
        let names: Vec<String> = held
            .iter()
            .take(10)
            .map(|h| format!("{} {}", h.category, h.name))
            .collect();
        let more = if held.len() > names.len() { ", …" } else { "" };
        self.say(format!(
            "held: {} deletes refused by the mass-delete guard ({}{more}); apply them with \
             `ldapsync sync run --connector {connector} --confirm-deletes`",
            held.len(),
            names.join(", ")
        ));
    }

    /// Every line for the operator: decisions, then disputes.
    pub fn all_lines(&self) -> impl Iterator<Item = &String> {
        self.lines.iter().chain(self.disputes.values().map(|d| &d.line))
    }
}
