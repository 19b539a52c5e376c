//! A sync pass for one connector: reads the directory's entries in scope,
//! matches and associates them with local objects, decides each pair with
//! the connector's policy, applies deletes under the mass-delete guard, and
//! creates on the other side what exists on one side only.
//!
//! Idempotent: a pair whose sides both equal its baseline writes nothing,
//! which is what makes the engine's own directory writes, seen again by the
//! next pass, harmless.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};

use serde::Serialize;
use thiserror::Error;
use tokio::sync::mpsc;

use super::guard::{Guard, Window};
pub use super::mapping::is_secret_field;
use super::mapping::{Mapping, MemberIndex};
use super::policy::{self, Outcome, Side};
use super::progress::Progress;
pub use super::report::{Dispute, Report};
use crate::config::{AccountSwitch, ConnectorConfig, DeletePolicy, ScopeConfig};
use crate::directory::{AttrMod, DirectoryError, DirectoryOps, Entry, EntryStream};
use crate::model::{
    Action, Category, Change, ChangeEvent, ChangeSource, ConflictPolicy, Departures, Direction, ENABLED_FIELD,
    Fallback, NAME_FIELD, Values,
};
use crate::store::{Association, Commit, JournalEntry, JournalQuery, LocalObject, Store, StoreError, now};

#[derive(Debug, Error)]
pub enum SyncError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Directory(#[from] DirectoryError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An administrative action that cannot be done, and why.
    #[error("{0}")]
    Refused(String),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PassOptions {
    /// Decide and report, change nothing.
    pub dry_run: bool,
    /// Apply deletes even past the mass-delete guard.
    pub confirm_deletes: bool,
}

/// Runs one full sync pass of `connector` against its directory: every
/// entry in scope is compared with its baseline.
pub async fn run_pass<S: Store, D: DirectoryOps>(
    store: &mut S,
    connector: &ConnectorConfig,
    directory: &mut D,
    options: PassOptions,
    progress: &mut dyn Progress,
) -> Result<Report, SyncError> {
    let mut pass = Pass::new(store, connector, directory, ChangeSource::Poll, options);
    // Accounts first: group membership is translated through their associations.
    for category in [Category::Account, Category::Group] {
        if let Some(scope) = connector.scope(category) {
            pass.members = MemberIndex::build(&*pass.store, connector)?;
            pass.category(category, scope, progress).await?;
        }
    }
    Ok(pass.report)
}

/// Applies one change event: the one object it concerns is matched,
/// decided and written exactly as a full pass would. Idempotent, so a
/// change seen twice (captured, then polled) is applied once.
pub async fn apply_event<S: Store, D: DirectoryOps>(
    store: &mut S,
    connector: &ConnectorConfig,
    directory: &mut D,
    event: &ChangeEvent,
) -> Result<Report, SyncError> {
    let mut pass = Pass::new(store, connector, directory, event.source, PassOptions::default());
    let category = event.change.category();
    let Some(scope) = connector.scope(category) else {
        return Ok(pass.report);
    };
    let mapping = Mapping { scope, category };
    match &event.change {
        Change::Entry { dn, .. } => {
            // Outside the scope now (moved out, filtered out): the next full
            // pass sees it vanish and applies the delete policy.
            if let Some(entry) = pass.directory.entry_at(scope, dn).await? {
                let object = match pass.store.association_by_entry(&connector.name, &entry.id)? {
                    Some(a) => pass.store.object_by_id(a.object_id)?,
                    None => None,
                };
                pass.members = MemberIndex::for_pair(&*pass.store, connector, &mapping, Some(&entry), object.as_ref())?;
                pass.entry(&mapping, &entry).await?;
            }
        }
        Change::EntryRemoved { dn, .. } => {
            // Accounts and groups may share a base: a DN the accounts' read
            // names may be a group's, which is the groups' to judge.
            let Some(object) = pass
                .store
                .object_associated_at(&connector.name, dn)?
                .filter(|o| o.category == category)
            else {
                return Ok(pass.report);
            };
            let Some(association) = pass
                .store
                .association_by_object(&connector.name, object.id)?
                .filter(|a| !a.entry_gone)
            else {
                return Ok(pass.report);
            };
            // The association follows the entry, not the DN: if the entry
            // is still in scope (elsewhere), this delete was of another one.
            match pass.directory.entry_by_id(scope, &association.entry_id).await? {
                Some(entry) => {
                    pass.members =
                        MemberIndex::for_pair(&*pass.store, connector, &mapping, Some(&entry), Some(&object))?;
                    pass.reconcile(&mapping, association, &entry).await?;
                }
                None => pass.gone(&mapping, vec![(association, object)], Window::Recent).await?,
            }
        }
        Change::Local { name, .. } => {
            let Some(object) = pass.store.object(category, name)? else {
                return Ok(pass.report);
            };
            match pass.store.association_by_object(&connector.name, object.id)? {
                Some(association) => match pass.directory.entry_by_id(scope, &association.entry_id).await? {
                    Some(entry) => {
                        pass.members =
                            MemberIndex::for_pair(&*pass.store, connector, &mapping, Some(&entry), Some(&object))?;
                        pass.reconcile(&mapping, association, &entry).await?
                    }
                    None => pass.report.say(format!(
                        "{category} {name}: its entry is not in scope; left to the next pass"
                    )),
                },
                // Held by no connector: matched by name, or created in the
                // directory when local changes go there.
                None if pass.store.association_of_object(object.id)?.is_none() => {
                    let same_name = pass.directory.entries_named(scope, name).await?;
                    if same_name.is_empty() && connector.direction != Direction::LdapToLocal {
                        pass.members = MemberIndex::for_pair(&*pass.store, connector, &mapping, None, Some(&object))?;
                        pass.create_entry(&mapping, &object).await?;
                    }
                    for entry in &same_name {
                        pass.members =
                            MemberIndex::for_pair(&*pass.store, connector, &mapping, Some(entry), Some(&object))?;
                        pass.entry(&mapping, entry).await?;
                    }
                }
                None => {}
            }
        }
    }
    Ok(pass.report)
}

/// Applies what a poll reported about entries that left one category's
/// scope, under the delete policy and the mass-delete guard.
pub async fn apply_departures<S: Store, D: DirectoryOps>(
    store: &mut S,
    connector: &ConnectorConfig,
    directory: &mut D,
    category: Category,
    departures: &Departures,
) -> Result<Report, SyncError> {
    let mut pass = Pass::new(store, connector, directory, ChangeSource::Poll, PassOptions::default());
    let Some(scope) = connector.scope(category) else {
        return Ok(pass.report);
    };
    let mapping = Mapping { scope, category };
    match departures {
        Departures::Listed(ids) => {
            let mut gone = Vec::new();
            for id in ids {
                // A server may list every deleted id it knows, whatever the
                // search (syncprov's session log does): keep this category's.
                if let Some(a) = pass.store.association_by_entry(&connector.name, id)?
                    && !a.entry_gone
                    && let Some(object) = pass.store.object_by_id(a.object_id)?
                    && object.category == category
                {
                    gone.push((a, object));
                }
            }
            pass.gone(&mapping, gone, Window::Recent).await?;
        }
        Departures::AllBut(present) => pass.vanished(&mapping, present).await?,
        Departures::NotReported => {}
    }
    Ok(pass.report)
}

/// The connector's scope for `object` and the object's association with
/// it; what is missing is refused with `refused`'s words.
fn associated<'c, S: Store>(
    store: &S,
    connector: &'c ConnectorConfig,
    object: &LocalObject,
    refused: impl Fn(String) -> SyncError,
) -> Result<(&'c ScopeConfig, Association), SyncError> {
    let category = object.category;
    let scope = connector
        .scope(category)
        .ok_or_else(|| refused(format!("connector {} syncs no {category}s", connector.name)))?;
    let association = store
        .association_by_object(&connector.name, object.id)?
        .ok_or_else(|| refused(format!("it is not associated with connector {}", connector.name)))?;
    Ok((scope, association))
}

/// Deletes an associated local object the way its connector's direction
/// and delete policy say (docs/sync.md, "Directions and conflict policies"): under `ldap-to-local`
/// the directory owns it and the delete is refused; otherwise the entry is
/// deleted (`delete`), disabled with the object kept disabled (`disable`),
/// or left in the directory (`ignore`), under the mass-delete guard.
pub async fn delete_object<S: Store, D: DirectoryOps>(
    store: &mut S,
    connector: &ConnectorConfig,
    directory: &mut D,
    object: LocalObject,
    options: PassOptions,
    operator: &str,
) -> Result<Report, SyncError> {
    let (category, name) = (object.category, object.name.clone());
    let refused = |why: String| SyncError::Refused(format!("{category} {name} is not deleted: {why}"));
    let (scope, association) = associated(store, connector, &object, refused)?;
    if connector.direction == Direction::LdapToLocal {
        return Err(refused(format!(
            "connector {} is ldap-to-local, so the directory owns it and the next full pass would bring \
             it back; delete {} in the directory, or pass --force to delete it here only",
            connector.name, association.dn
        )));
    }
    let mut pass = Pass::new(store, connector, directory, ChangeSource::Local, options);
    let entry = pass.directory.entry_by_id(scope, &association.entry_id).await?;
    let Guard {
        earlier,
        trips: guard_trips,
        ..
    } = Guard::check(&*pass.store, pass.connector, category, 1, Window::Recent)?;
    if entry.is_some() && connector.delete != DeletePolicy::Ignore && guard_trips && !options.confirm_deletes {
        return Err(refused(format!(
            "with the {earlier} deletes of the last hour that is over the mass-delete guard \
             ({} objects or {}%); confirm with --confirm-deletes",
            connector.max_deletes, connector.max_delete_percent
        )));
    }
    let detail = |dn: &str| serde_json::json!({ "dn": dn, "operator": operator, "policy": connector.delete.as_str() });
    let delete_locally = |pass: &mut Pass<'_, S, D>, action: Action, dn: &str| {
        let journal = pass.journal(category, &name, ChangeSource::Local, action, detail(dn));
        pass.commit(Commit {
            delete_object: Some(object.id),
            journal: vec![journal],
            ..Commit::default()
        })
        .map(|_| ())
    };
    let Some(entry) = entry else {
        pass.report.deleted += 1;
        pass.report.say(format!(
            "deleted {category} {name}: its entry {} is gone already",
            association.dn
        ));
        delete_locally(&mut pass, Action::Deleted, &association.dn)?;
        return Ok(pass.report);
    };
    match connector.delete {
        DeletePolicy::Ignore => {
            pass.report.say(format!(
                "deleted {category} {name} locally; its entry {} stays in the directory (delete = ignore){}",
                entry.dn,
                if connector.direction == Direction::Both {
                    ", and the next full pass imports it again"
                } else {
                    ""
                }
            ));
            delete_locally(&mut pass, Action::LocalDelete, &entry.dn)?;
        }
        DeletePolicy::Delete => {
            pass.directory.delete(&entry.dn).await?;
            pass.report.deleted += 1;
            pass.report
                .say(format!("deleted {category} {name} and its entry {}", entry.dn));
            delete_locally(&mut pass, Action::Deleted, &entry.dn)?;
        }
        DeletePolicy::Disable => {
            if scope.account_switch().is_none() {
                return Err(refused(format!(
                    "delete = disable needs {category}s.account_control or account_lock to disable its entry in the directory"
                )));
            }
            let mapping = Mapping { scope, category };
            pass.members = MemberIndex::for_pair(&*pass.store, connector, &mapping, Some(&entry), Some(&object))?;
            let mut disabled = object;
            disabled.enabled = false;
            let pair = Pair::new(&mapping, disabled, &entry, &pass.members);
            let mut result = pair.ldap.clone();
            result.insert(ENABLED_FIELD.into(), vec!["false".into()]);
            pass.report.disabled += 1;
            pass.report
                .say(format!("disabled {category} {name} and its entry {}", entry.dn));
            let journal_detail = detail(&entry.dn);
            pass.apply(&mapping, pair, result, Action::Disabled, journal_detail)
                .await?;
        }
    }
    Ok(pass.report)
}

/// Which directory entry an administrator links an object with.
#[derive(Debug, Clone)]
pub enum LinkTarget {
    Dn(String),
    EntryId(String),
}

/// Links a local object with the entry an administrator names: the
/// explicit way out of a dispute (an association changes only by an
/// administrator's command). Refused when the object already has an
/// association with this connector or the entry is associated with
/// another object; the pair is then decided as at a first sync.
pub async fn link<S: Store, D: DirectoryOps>(
    store: &mut S,
    connector: &ConnectorConfig,
    directory: &mut D,
    category: Category,
    name: &str,
    target: &LinkTarget,
    operator: &str,
) -> Result<Report, SyncError> {
    let refused = |why: String| SyncError::Refused(format!("cannot link {category} {name}: {why}"));
    let scope = connector
        .scope(category)
        .ok_or_else(|| refused(format!("connector {} syncs no {category}s", connector.name)))?;
    let object = store
        .object(category, name)?
        .ok_or_else(|| refused("there is no such local object".into()))?;
    if let Some(a) = store.association_of_object(object.id)? {
        return Err(refused(format!(
            "it is associated with entry {} ({}) of connector {}; `ldapsync association remove` it first",
            a.entry_id, a.dn, a.connector
        )));
    }
    let entry = match target {
        LinkTarget::Dn(dn) => directory.entry_at(scope, dn).await?,
        LinkTarget::EntryId(id) => directory.entry_by_id(scope, id).await?,
    }
    .ok_or_else(|| refused(format!("{target:?} names no entry in the connector's {category} scope")))?;
    if let Some(other) = store.association_by_entry(&connector.name, &entry.id)? {
        let holder = store.object_by_id(other.object_id)?.map(|o| o.name).unwrap_or_default();
        return Err(refused(format!(
            "entry {} is associated with {category} {holder}",
            entry.dn
        )));
    }
    let mut pass = Pass::new(store, connector, directory, ChangeSource::Local, PassOptions::default());
    let mapping = Mapping { scope, category };
    pass.members = MemberIndex::for_pair(&*pass.store, connector, &mapping, Some(&entry), Some(&object))?;
    let detail = serde_json::json!({ "operator": operator });
    pass.associate(&mapping, object, &entry, Action::Linked, detail).await?;
    Ok(pass.report)
}

/// One associated object seen three ways — its local values, its entry's,
/// the baseline of the last sync — and what the next pass would do.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Comparison {
    pub connector: String,
    pub category: Category,
    pub name: String,
    pub entry_id: String,
    /// The entry's DN now; the last one known when it is gone.
    pub dn: String,
    pub local: Values,
    /// None when the entry is gone from the connector's scope.
    pub directory: Option<Values>,
    pub baseline: Values,
    /// What the next pass would do, in words.
    pub next: String,
    /// The values both sides would hold afterwards.
    pub result: Option<Values>,
    /// Would the pass write the local object, the entry?
    pub writes_local: bool,
    pub writes_directory: bool,
    /// The decision, as the journal would record it.
    #[schema(value_type = Object)]
    pub outcome: Option<Outcome>,
}

/// Compares an associated object with its entry, as the next pass
/// would, changing nothing.
pub async fn compare<S: Store, D: DirectoryOps>(
    store: &mut S,
    connector: &ConnectorConfig,
    directory: &mut D,
    object: LocalObject,
) -> Result<Comparison, SyncError> {
    let category = object.category;
    let refused = |why: String| SyncError::Refused(format!("cannot compare {category} {}: {why}", object.name));
    let (scope, association) = associated(store, connector, &object, refused)?;
    let mapping = Mapping { scope, category };
    let local = mapping.local_values(&object);
    let entry = directory.entry_by_id(scope, &association.entry_id).await?;
    let mut comparison = Comparison {
        connector: connector.name.clone(),
        category,
        name: object.name.clone(),
        entry_id: association.entry_id.clone(),
        dn: association.dn.clone(),
        local,
        directory: None,
        baseline: association.baseline.clone(),
        next: String::new(),
        result: None,
        writes_local: false,
        writes_directory: false,
        outcome: None,
    };
    let Some(entry) = entry else {
        comparison.next = format!(
            "its entry is gone from the scope: the next full pass applies delete = {}",
            connector.delete.as_str()
        );
        return Ok(comparison);
    };
    let members = MemberIndex::for_pair(&*store, connector, &mapping, Some(&entry), Some(&object))?;
    let pair = Pair::new(&mapping, object, &entry, &members);
    let decision = policy::decide(
        connector.direction,
        connector.conflict_policy(),
        &mapping.fields(),
        &association.baseline,
        &pair.local,
        &pair.ldap,
    );
    comparison.dn = entry.dn.clone();
    comparison.next = describe(&decision.outcome);
    comparison.writes_local = decision.result != pair.local;
    comparison.writes_directory = decision.result != pair.ldap;
    comparison.directory = Some(pair.ldap);
    comparison.result = Some(decision.result);
    comparison.outcome = Some(decision.outcome);
    Ok(comparison)
}

/// A local object and a directory entry decided together, with each
/// side's mapped values.
struct Pair<'e> {
    object: LocalObject,
    entry: &'e Entry,
    local: Values,
    ldap: Values,
}

impl<'e> Pair<'e> {
    fn new(mapping: &Mapping<'_>, object: LocalObject, entry: &'e Entry, members: &MemberIndex) -> Pair<'e> {
        Pair {
            local: mapping.local_values(&object),
            ldap: mapping.ldap_values(entry, members),
            object,
            entry,
        }
    }
}

struct Pass<'a, S: Store, D: DirectoryOps> {
    store: &'a mut S,
    connector: &'a ConnectorConfig,
    directory: &'a mut D,
    options: PassOptions,
    /// Where the changes this pass handles were seen, for the journal.
    source: ChangeSource,
    report: Report,
    members: MemberIndex,
    /// The objects whose delete the guard holds; read when first needed.
    held: Option<HashSet<i64>>,
}

impl<'a, S: Store, D: DirectoryOps> Pass<'a, S, D> {
    fn new(
        store: &'a mut S,
        connector: &'a ConnectorConfig,
        directory: &'a mut D,
        source: ChangeSource,
        options: PassOptions,
    ) -> Self {
        Pass {
            store,
            connector,
            directory,
            options,
            source,
            report: Report::default(),
            members: MemberIndex::default(),
            held: None,
        }
    }

    fn policy_name(&self) -> String {
        match self.connector.direction {
            Direction::Both => format!("both/{}", self.connector.conflict_policy()),
            other => other.to_string(),
        }
    }

    fn journal(
        &self,
        category: Category,
        object: &str,
        source: ChangeSource,
        action: Action,
        detail: serde_json::Value,
    ) -> JournalEntry {
        JournalEntry {
            at: now(),
            connector: self.connector.name.clone(),
            category,
            object: object.to_owned(),
            source,
            action,
            policy: self.policy_name(),
            detail: detail.to_string(),
        }
    }

    /// Commits unless this is a dry run.
    fn commit(&mut self, commit: Commit) -> Result<Option<i64>, StoreError> {
        if self.options.dry_run {
            return Ok(None);
        }
        self.store.commit(commit)
    }

    /// Journals a standing problem once, not at every pass.
    fn journal_once(&mut self, entry: JournalEntry) -> Result<(), StoreError> {
        let last = self.store.journal(&JournalQuery {
            connector: Some(entry.connector.clone()),
            object: Some(entry.object.clone()),
            limit: 1,
            ..JournalQuery::default()
        })?;
        if last
            .first()
            .is_some_and(|l| l.entry.action == entry.action && l.entry.detail == entry.detail)
        {
            return Ok(());
        }
        self.commit(Commit {
            journal: vec![entry],
            ..Commit::default()
        })
        .map(|_| ())
    }

    /// Leaves an object or entry alone, never guessing: said in the report
    /// (once per object) and journaled (once while it stands).
    fn dispute(&mut self, dispute: Dispute) -> Result<(), StoreError> {
        let mut detail = serde_json::json!({ "reason": dispute.reason });
        if !dispute.candidates.is_empty() {
            detail["candidates"] = dispute.candidates.clone().into();
        }
        let journal = self.journal(dispute.category, &dispute.key, self.source, Action::Disputed, detail);
        self.report.dispute(dispute);
        self.journal_once(journal)
    }

    /// Compares every entry of the scope with its baseline, a page at a time.
    async fn category(
        &mut self,
        category: Category,
        scope: &ScopeConfig,
        progress: &mut dyn Progress,
    ) -> Result<(), SyncError> {
        let mapping = Mapping { scope, category };
        // Names first: a name several entries share is disputed, not matched.
        let mut naming_counts: HashMap<String, usize> = HashMap::new();
        let mut total = 0;
        let mut names = self.directory.names(scope).await?;
        while let Some(entry) = names.next().await? {
            total += 1;
            if let Some(name) = mapping.name_of(&entry) {
                *naming_counts.entry(name).or_default() += 1;
            }
        }
        progress.category(category, total);
        let mut seen = HashSet::new();
        let mut matched_objects = HashSet::new();
        let mut ahead = ReadAhead::start(self.directory.entries(scope).await?);
        // The decisions about entries already received are committed
        // together; see `next_entry` and `apply` for when a batch ends.
        self.store.begin_batch();
        let compared = async {
            while let Some(entry) = self.next_entry(&mapping, &mut ahead).await? {
                seen.insert(entry.id.clone());
                if let Some(association) = self.store.association_by_entry(&self.connector.name, &entry.id)? {
                    matched_objects.insert(association.object_id);
                    self.reconcile(&mapping, association, &entry).await?;
                } else {
                    let name_taken = mapping
                        .name_of(&entry)
                        .is_some_and(|n| naming_counts.get(&n).copied().unwrap_or(0) > 1);
                    if let Some(id) = self.first_sync(&mapping, &entry, name_taken).await? {
                        matched_objects.insert(id);
                    }
                }
                progress.scanned(&self.report);
            }
            Ok::<_, SyncError>(())
        }
        .await;
        // What was decided before an error stands: each decision is whole.
        let ended = self.store.end_batch();
        compared?;
        ended?;
        self.vanished(&mapping, &seen).await?;
        self.create_in_directory(&mapping, &matched_objects).await?;
        progress.finished(&self.report);
        Ok(())
    }

    /// The next entry of a full pass. If the directory has not sent it yet,
    /// the batch is committed before waiting: the store's write lock is
    /// never held across the network (other connections to the store —
    /// the capture journal, the CLI — wait for it at most a few seconds).
    /// The entries already received are handed to the store at once
    /// (`Store::look_ahead`), so that it can look them all up together.
    async fn next_entry(&mut self, mapping: &Mapping<'_>, ahead: &mut ReadAhead) -> Result<Option<Entry>, SyncError> {
        if ahead.ready.is_empty() {
            if let Some(e) = ahead.failed.take() {
                return Err(e.into());
            }
            let first = match ahead.received.try_recv() {
                Ok(received) => Some(received),
                Err(mpsc::error::TryRecvError::Empty) => {
                    self.store.commit_batch()?;
                    ahead.received.recv().await
                }
                Err(mpsc::error::TryRecvError::Disconnected) => None,
            };
            let Some(first) = first else { return Ok(None) };
            ahead.ready.push_back(first?);
            while ahead.ready.len() < READ_AHEAD {
                match ahead.received.try_recv() {
                    Ok(Ok(entry)) => ahead.ready.push_back(entry),
                    // The entries before it are decided first, as they came.
                    Ok(Err(e)) => {
                        ahead.failed = Some(e);
                        break;
                    }
                    Err(_) => break,
                }
            }
            let keys: Vec<(String, Option<String>)> = ahead
                .ready
                .iter()
                .map(|e| (e.id.clone(), e.get(&mapping.scope.naming).first().cloned()))
                .collect();
            self.store.look_ahead(&self.connector.name, mapping.category, &keys)?;
        }
        Ok(ahead.ready.pop_front())
    }

    /// One directory entry seen outside a full pass.
    async fn entry(&mut self, mapping: &Mapping<'_>, entry: &Entry) -> Result<(), SyncError> {
        if let Some(association) = self.store.association_by_entry(&self.connector.name, &entry.id)? {
            return self.reconcile(mapping, association, entry).await;
        }
        let name_taken = match mapping.name_of(entry) {
            Some(name) => self.directory.entries_named(mapping.scope, &name).await?.len() > 1,
            None => false,
        };
        self.first_sync(mapping, entry, name_taken).await.map(|_| ())
    }

    /// An entry with no association: match it by name, or import it.
    /// `name_taken`: other entries in scope have the same name.
    async fn first_sync(
        &mut self,
        mapping: &Mapping<'_>,
        entry: &Entry,
        name_taken: bool,
    ) -> Result<Option<i64>, SyncError> {
        let category = mapping.category;
        let Some(name) = entry.get(&mapping.scope.naming).first().cloned() else {
            self.dispute(Dispute {
                category,
                key: entry.dn.clone(),
                reason: format!("entry has no {}", mapping.scope.naming),
                candidates: Vec::new(),
                line: format!("disputed {category} at {}: no {} value", entry.dn, mapping.scope.naming),
            })?;
            return Ok(None);
        };
        let associated_elsewhere = match self.store.object(category, &name)? {
            Some(object) => self.store.association_of_object(object.id)?.map(|a| (object.id, a)),
            None => None,
        };
        if let Some((object_id, other)) = associated_elsewhere {
            // The name is taken by an object associated with another entry:
            // this entry is what is in dispute, not the object.
            self.dispute(Dispute {
                category,
                key: entry.dn.clone(),
                reason: format!(
                    "{name} is associated with entry {} ({}) of connector {}",
                    other.entry_id, other.dn, other.connector
                ),
                candidates: Vec::new(),
                line: format!(
                    "disputed {category} entry {}: its {}={name} names {category} {name}, which is associated with {}",
                    entry.dn, mapping.scope.naming, other.dn
                ),
            })?;
            return Ok(Some(object_id));
        }
        if name_taken {
            // Several candidates: left alone, never guessed. The local
            // object of that name counts as matched, so that no pass
            // creates yet another entry for it.
            if self.report.disputes.contains_key(&(category, name.clone())) {
                return Ok(self.store.object(category, &name)?.map(|o| o.id));
            }
            // Not across the network with the store's write lock held.
            self.store.commit_batch()?;
            let candidates: Vec<String> = self
                .directory
                .entries_named(mapping.scope, &name)
                .await?
                .into_iter()
                .map(|e| e.dn)
                .collect();
            let line = format!(
                "disputed {category} {name}: {} directory entries have {}={name} ({}); \
                 resolve with `ldapsync association link {name} --connector {} --dn DN`",
                candidates.len(),
                mapping.scope.naming,
                candidates.join("; "),
                self.connector.name
            );
            self.dispute(Dispute {
                category,
                key: name.clone(),
                reason: format!("several entries have {}={name}", mapping.scope.naming),
                candidates,
                line,
            })?;
            return Ok(self.store.object(category, &name)?.map(|o| o.id));
        }
        let ldap_values = mapping.ldap_values(entry, &self.members);
        match self.store.object(category, &name)? {
            Some(object) => {
                let object_id = object.id;
                self.associate(mapping, object, entry, Action::Associated, serde_json::json!({}))
                    .await?;
                Ok(Some(object_id))
            }
            None if self.connector.direction == Direction::LocalToLdap => Ok(None),
            None => {
                let object = LocalObject {
                    id: 0,
                    category,
                    name: name.clone(),
                    enabled: true,
                    values: Values::new(),
                };
                let result = ldap_values.clone();
                let object = mapping.apply_to_object(object, &result);
                self.report.created_local += 1;
                self.report
                    .say(format!("create local {category} {name} from {}", entry.dn));
                let journal = self.journal(
                    category,
                    &name,
                    self.source,
                    Action::CreatedLocal,
                    serde_json::json!({ "dn": entry.dn, "entry_id": entry.id }),
                );
                let id = self.commit(Commit {
                    object: Some(object),
                    association: Some(self.association(0, entry, result)),
                    journal: vec![journal],
                    ..Commit::default()
                })?;
                Ok(id)
            }
        }
    }

    /// Associates an object with an entry and decides the pair as a first
    /// sync does: the side the direction and policy prefer is kept.
    async fn associate(
        &mut self,
        mapping: &Mapping<'_>,
        object: LocalObject,
        entry: &Entry,
        action: Action,
        mut detail: serde_json::Value,
    ) -> Result<(), SyncError> {
        let pair = Pair::new(mapping, object, entry, &self.members);
        let side = initial_side(self.connector.direction, self.connector.conflict_policy());
        let result = match side {
            Side::Local => pair.local.clone(),
            Side::Ldap => pair.ldap.clone(),
        };
        self.report.associated += 1;
        self.report.say(format!(
            "associate {} {} with {} ({} values kept)",
            mapping.category,
            pair.object.name,
            entry.dn,
            side_name(side)
        ));
        detail["dn"] = entry.dn.clone().into();
        detail["entry_id"] = entry.id.clone().into();
        detail["kept"] = side_name(side).into();
        detail["changes"] = mapping.value_changes(&Values::new(), &pair.local, &pair.ldap, &result);
        self.apply(mapping, pair, result, action, detail).await
    }

    fn association(&self, object_id: i64, entry: &Entry, baseline: Values) -> Association {
        Association {
            connector: self.connector.name.clone(),
            object_id,
            entry_id: entry.id.clone(),
            dn: entry.dn.clone(),
            baseline,
            synced_at: now(),
            entry_gone: false,
        }
    }

    /// An associated pair: decide with the policy and apply.
    async fn reconcile(
        &mut self,
        mapping: &Mapping<'_>,
        association: Association,
        entry: &Entry,
    ) -> Result<(), SyncError> {
        let Some(object) = self.store.object_by_id(association.object_id)? else {
            return Ok(());
        };
        // The entry is in scope: a delete held for it is moot.
        self.release_hold(object.id)?;
        let pair = Pair::new(mapping, object, entry, &self.members);
        let (local, ldap) = (&pair.local, &pair.ldap);
        let decision = policy::decide(
            self.connector.direction,
            self.connector.conflict_policy(),
            &mapping.fields(),
            &association.baseline,
            local,
            ldap,
        );
        let moved = association.dn != entry.dn || association.entry_gone;
        let unchanged =
            decision.result == *local && decision.result == *ldap && decision.result == association.baseline;
        if unchanged && !moved {
            return Ok(());
        }
        // Nothing to write on either side: both made the same change (or
        // only the DN moved), and only the baseline follows.
        let writes_nothing = decision.result == *local && decision.result == *ldap;
        let action = match &decision.outcome {
            Outcome::ConflictResolved { .. } | Outcome::Merged => {
                self.report.conflicts += 1;
                Action::ConflictResolved
            }
            Outcome::Overwritten { .. } => Action::Overwritten,
            _ if writes_nothing && decision.result != association.baseline => Action::Converged,
            _ if writes_nothing => Action::Moved,
            _ => Action::Updated,
        };
        match action {
            Action::Moved => {}
            Action::Converged => self.report.converged += 1,
            _ => self.report.updated += 1,
        }
        self.report.say(format!(
            "{action} {} {}: {}",
            mapping.category,
            pair.object.name,
            describe(&decision.outcome)
        ));
        let changes = mapping.value_changes(&association.baseline, local, ldap, &decision.result);
        let detail = serde_json::json!({ "dn": entry.dn, "outcome": decision.outcome, "changes": changes });
        self.apply(mapping, pair, decision.result, action, detail).await
    }

    /// Writes `result` to whichever side differs, then commits the local
    /// object, the baseline and the journal line together.
    async fn apply(
        &mut self,
        mapping: &Mapping<'_>,
        pair: Pair<'_>,
        result: Values,
        action: Action,
        detail: serde_json::Value,
    ) -> Result<(), SyncError> {
        let Pair {
            object,
            entry,
            local,
            ldap,
        } = pair;
        let (local, ldap) = (&local, &ldap);
        let category = mapping.category;
        let name = object.name.clone();
        let mut dn = entry.dn.clone();
        let writes_directory = &result != ldap;
        if !self.options.dry_run && writes_directory {
            // Not across the network with the write lock held.
            self.store.commit_batch()?;
            match self.write_directory(mapping, entry, ldap, &result).await {
                Ok(new_dn) => dn = new_dn,
                // The directory is down or busy: the pass stops here and the
                // worker tries again after its back-off, rather than marking
                // every object that follows as failed.
                Err(e) if e.is_transient() => return Err(e.into()),
                Err(e) => {
                    self.report.failed += 1;
                    self.report.say(format!("failed {category} {name}: {e}"));
                    let detail = serde_json::json!({ "dn": entry.dn, "error": e.to_string() });
                    self.commit(Commit {
                        journal: vec![self.journal(category, &name, self.source, Action::Failed, detail)],
                        ..Commit::default()
                    })?;
                    return Ok(());
                }
            }
        }
        let object_id = object.id;
        let updated = (&result != local).then(|| mapping.apply_to_object(object, &result));
        let mut association = self.association(object_id, entry, result);
        association.dn = dn;
        let journal = self.journal(category, &name, self.source, action, detail);
        self.commit(Commit {
            object: updated,
            association: Some(association),
            journal: vec![journal],
            ..Commit::default()
        })?;
        if writes_directory {
            // Durable at once, not with its batch: were it lost, the next
            // pass would not know the directory's values were ours.
            self.store.commit_batch()?;
        }
        Ok(())
    }

    /// Makes the entry hold `result`; returns its DN afterwards.
    async fn write_directory(
        &mut self,
        mapping: &Mapping<'_>,
        entry: &Entry,
        ldap: &Values,
        result: &Values,
    ) -> Result<String, DirectoryError> {
        let dn = &entry.dn;
        let wanted = mapping.to_attributes(result, &self.members);
        let current = mapping.to_attributes(ldap, &self.members);
        let scope = mapping.scope;
        // When the name is the RDN it changes by a rename; otherwise (AD:
        // sAMAccountName under a CN) it is an attribute like the others.
        let renames = scope.rdn().eq_ignore_ascii_case(&scope.naming);
        let mut mods = Vec::new();
        for attr in wanted.keys().chain(current.keys()).collect::<BTreeSet<_>>() {
            let target = wanted.get(attr).cloned().unwrap_or_default();
            let now = current.get(attr).cloned().unwrap_or_default();
            if target == now || (renames && attr.eq_ignore_ascii_case(&scope.naming)) {
                continue;
            }
            if scope
                .membership
                .as_deref()
                .is_some_and(|m| m.eq_ignore_ascii_case(attr))
            {
                // Values added and removed, never the whole list: groups of
                // thousands stay cheap, and within AD's limits.
                let added: Vec<String> = target.iter().filter(|v| !now.contains(v)).cloned().collect();
                let removed: Vec<String> = now.iter().filter(|v| !target.contains(v)).cloned().collect();
                if !removed.is_empty() {
                    mods.push(AttrMod::Delete(attr.clone(), removed));
                }
                if !added.is_empty() {
                    mods.push(AttrMod::Add(attr.clone(), added));
                }
            } else {
                mods.push(AttrMod::Replace(attr.clone(), target));
            }
        }
        // The enabled flag may be one bit of an integer the other bits of
        // which are the directory's business.
        if result.get(ENABLED_FIELD) != ldap.get(ENABLED_FIELD)
            && let Some(enabled) = result.get(ENABLED_FIELD).and_then(|v| v.first())
            && let Some((attr, values)) = mapping.enabled_modification(entry, enabled == "true")
        {
            mods.push(AttrMod::Replace(attr, values));
        }
        let mut dn = dn.to_owned();
        if renames
            && result.get(NAME_FIELD) != ldap.get(NAME_FIELD)
            && let Some(new_name) = result.get(NAME_FIELD).and_then(|v| v.first())
        {
            let rdn = format!("{}={}", scope.rdn(), ldap3::dn_escape(new_name));
            self.directory.rename(&dn, &rdn).await?;
            // The parent as RFC 4514 splits it: an escaped comma in the
            // old RDN (uid=smith\,j) is not where the parent starts.
            dn = crate::dn::with_rdn(&rdn, crate::dn::parent(&dn));
        }
        if !mods.is_empty() {
            self.directory.modify(&dn, mods).await?;
        }
        Ok(dn)
    }

    /// Associated objects whose entry is not among the `seen` ids of a
    /// complete read of the scope.
    async fn vanished(&mut self, mapping: &Mapping<'_>, seen: &HashSet<String>) -> Result<(), SyncError> {
        let mut gone = Vec::new();
        for association in self.store.associations(Some(&self.connector.name))? {
            if seen.contains(&association.entry_id) || association.entry_gone {
                continue;
            }
            if let Some(object) = self.store.object_by_id(association.object_id)?
                && object.category == mapping.category
            {
                gone.push((association, object));
            }
        }
        // An empty answer is far likelier a wrong base, filter or ACL than
        // a directory emptied on purpose.
        if seen.is_empty() && !gone.is_empty() && !self.options.confirm_deletes {
            self.report.deletes_refused += gone.len();
            self.report.say(format!(
                "refused: the directory returned no {} entries at all, so none of the {} associated ones \
                 is treated as deleted; confirm with --confirm-deletes",
                mapping.category,
                gone.len()
            ));
            let detail = serde_json::json!({ "vanished": gone.len(), "reason": "no entries in scope" });
            return Ok(self.journal_once(self.journal(
                mapping.category,
                "*",
                self.source,
                Action::DeleteRefused,
                detail,
            ))?);
        }
        self.gone(mapping, gone, Window::Pass).await
    }

    /// Applies the delete policy to objects whose entry left the scope,
    /// unless the mass-delete guard trips.
    async fn gone(
        &mut self,
        mapping: &Mapping<'_>,
        gone: Vec<(Association, LocalObject)>,
        window: Window,
    ) -> Result<(), SyncError> {
        if gone.is_empty() {
            return Ok(());
        }
        let policy = self.connector.delete;
        let Guard {
            earlier,
            total,
            trips: guard_trips,
        } = Guard::check(&*self.store, self.connector, mapping.category, gone.len(), window)?;
        let count = earlier + gone.len();
        if policy != DeletePolicy::Ignore && guard_trips && !self.options.confirm_deletes {
            self.report.deletes_refused += gone.len();
            let category = mapping.category;
            let already = if earlier > 0 {
                format!(" (with the {earlier} already applied in the last hour, {count})")
            } else {
                String::new()
            };
            let verb = match policy {
                DeletePolicy::Disable => "disable",
                _ => "delete",
            };
            self.report.say(format!(
                "refused: this pass would {verb} {} of {total} associated {category}s{already}, over the \
                 mass-delete guard ({} objects or {}%); held until `ldapsync sync run --connector {} \
                 --confirm-deletes`, or until the entries are back",
                gone.len(),
                self.connector.max_deletes,
                self.connector.max_delete_percent,
                self.connector.name,
            ));
            let detail = serde_json::json!({
                "refused": gone.len(),
                "already_in_window": earlier,
                "associated": total,
                "objects": gone.iter().map(|(_, o)| &o.name).collect::<Vec<_>>(),
            });
            self.journal_once(self.journal(category, "*", self.source, Action::DeleteRefused, detail))?;
            if !self.options.dry_run {
                let held: Vec<Association> = gone.into_iter().map(|(a, _)| a).collect();
                self.store.hold_deletes(&held)?;
            }
            return Ok(());
        }
        for (mut association, mut object) in gone {
            let name = object.name.clone();
            association.entry_gone = true;
            let (action, commit) = match policy {
                DeletePolicy::Ignore => (
                    Action::EntryGoneIgnored,
                    Commit {
                        association: Some(association.clone()),
                        ..Commit::default()
                    },
                ),
                DeletePolicy::Disable => {
                    self.report.disabled += 1;
                    object.enabled = false;
                    (
                        Action::Disabled,
                        Commit {
                            object: Some(object),
                            association: Some(association.clone()),
                            ..Commit::default()
                        },
                    )
                }
                DeletePolicy::Delete => {
                    self.report.deleted += 1;
                    (
                        Action::Deleted,
                        Commit {
                            delete_object: Some(association.object_id),
                            ..Commit::default()
                        },
                    )
                }
            };
            self.report.say(format!(
                "{action} {} {name}: entry {} left the directory scope",
                mapping.category, association.dn
            ));
            let detail = serde_json::json!({ "dn": association.dn, "entry_id": association.entry_id });
            let mut commit = commit;
            commit
                .journal
                .push(self.journal(mapping.category, &name, self.source, action, detail));
            self.commit(commit)?;
            self.release_hold(association.object_id)?;
        }
        Ok(())
    }

    /// Forgets a held delete of this object, if there is one: its entry is
    /// back, or the delete was applied.
    fn release_hold(&mut self, object_id: i64) -> Result<(), StoreError> {
        if self.options.dry_run {
            return Ok(());
        }
        if self.held.is_none() {
            let held = self.store.held_deletes(&self.connector.name)?;
            self.held = Some(held.into_iter().map(|h| h.object_id).collect());
        }
        if self.held.as_mut().is_some_and(|held| held.remove(&object_id)) {
            self.store.release_held_delete(&self.connector.name, object_id)?;
        }
        Ok(())
    }

    /// Local objects associated with no connector: created in the directory
    /// when the direction sends local changes there.
    async fn create_in_directory(&mut self, mapping: &Mapping<'_>, matched: &HashSet<i64>) -> Result<(), SyncError> {
        if self.connector.direction == Direction::LdapToLocal {
            return Ok(());
        }
        let associated: HashSet<i64> = self
            .store
            .associations(None)?
            .into_iter()
            .map(|a| a.object_id)
            .collect();
        for object in self.store.objects(mapping.category)? {
            if !associated.contains(&object.id) && !matched.contains(&object.id) {
                self.create_entry(mapping, &object).await?;
            }
        }
        Ok(())
    }

    /// Creates the directory entry of a local object and associates the two.
    async fn create_entry(&mut self, mapping: &Mapping<'_>, object: &LocalObject) -> Result<(), SyncError> {
        let values = mapping.local_values(object);
        let mut attrs = mapping.to_attributes(&values, &self.members);
        attrs.retain(|_, v| !v.is_empty());
        let scope = mapping.scope;
        attrs.insert("objectClass".into(), scope.object_classes.clone());
        for (attr, template) in &scope.defaults {
            attrs
                .entry(attr.clone())
                .or_insert_with(|| vec![template.replace("{name}", &object.name)]);
        }
        // A lock attribute can say "disabled" from the start.
        if let Some(AccountSwitch::Lock(attr)) = scope.account_switch()
            && !object.enabled
        {
            attrs.insert(attr.to_owned(), vec!["TRUE".into()]);
        }
        // AD wants the RDN value (CN) among the attributes too.
        attrs
            .entry(scope.rdn().to_owned())
            .or_insert_with(|| vec![object.name.clone()]);
        let dn = format!("{}={},{}", scope.rdn(), ldap3::dn_escape(&object.name), scope.base);
        self.report.say(format!(
            "create in directory {} {} at {dn}",
            mapping.category, object.name
        ));
        if self.options.dry_run {
            self.report.created_ldap += 1;
            return Ok(());
        }
        let created = match self.directory.add(&dn, &attrs).await {
            Ok(()) => self.directory.entry_at(scope, &dn).await,
            Err(e) => Err(e),
        };
        // A directory may create accounts disabled (AD does, without a
        // password): give the entry the local flag now, not at the next sync.
        let created = match created {
            Ok(Some(entry)) => {
                let ldap = mapping.ldap_values(&entry, &self.members);
                if ldap.contains_key(ENABLED_FIELD) && ldap.get(ENABLED_FIELD) != values.get(ENABLED_FIELD) {
                    match self.write_directory(mapping, &entry, &ldap, &values).await {
                        Ok(_) => self.directory.entry_at(scope, &dn).await,
                        Err(e) => Err(e),
                    }
                } else {
                    Ok(Some(entry))
                }
            }
            other => other,
        };
        let (action, detail, association) = match created {
            Ok(Some(entry)) => {
                self.report.created_ldap += 1;
                let baseline = mapping.ldap_values(&entry, &self.members);
                let detail = serde_json::json!({ "dn": entry.dn, "entry_id": entry.id });
                (
                    Action::CreatedLdap,
                    detail,
                    Some(self.association(object.id, &entry, baseline)),
                )
            }
            Ok(None) => {
                self.report.failed += 1;
                let detail =
                    serde_json::json!({ "dn": dn, "error": "created entry is outside the connector's filter" });
                (Action::Failed, detail, None)
            }
            Err(e) => {
                self.report.failed += 1;
                self.report
                    .say(format!("failed {} {}: {e}", mapping.category, object.name));
                (
                    Action::Failed,
                    serde_json::json!({ "dn": dn, "error": e.to_string() }),
                    None,
                )
            }
        };
        let journal = self.journal(mapping.category, &object.name, ChangeSource::Local, action, detail);
        self.commit(Commit {
            association,
            journal: vec![journal],
            ..Commit::default()
        })?;
        Ok(())
    }
}

/// Local objects edited since their last sync, and local objects no
/// connector holds yet (to match by name, or create in the directory): the
/// local source's change events.
pub fn local_changes<S: Store>(
    store: &S,
    connector: &ConnectorConfig,
    after_edit: i64,
) -> Result<Vec<ChangeEvent>, StoreError> {
    let mut events = Vec::new();
    for (category, scope) in connector.scopes() {
        let mapping = Mapping { scope, category };
        for object in store.edited_since(category, after_edit)? {
            let changed = match store.association_by_object(&connector.name, object.id)? {
                Some(a) => !a.entry_gone && mapping.local_values(&object) != a.baseline,
                None => store.association_of_object(object.id)?.is_none(),
            };
            if changed {
                events.push(ChangeEvent {
                    source: ChangeSource::Local,
                    change: Change::Local {
                        category,
                        name: object.name,
                    },
                });
            }
        }
    }
    Ok(events)
}

/// On first association there is no baseline: the side whose values are kept.
/// How many entries of a full pass may be received before they are decided:
/// the directory goes on sending while the store works.
const READ_AHEAD: usize = 500;

/// A full pass's entries, received by a task of their own.
struct ReadAhead {
    received: mpsc::Receiver<Result<Entry, DirectoryError>>,
    ready: VecDeque<Entry>,
    /// Where the directory stopped with an error, once `ready` is decided.
    failed: Option<DirectoryError>,
}

impl ReadAhead {
    fn start<E: EntryStream + 'static>(mut entries: E) -> ReadAhead {
        let (send, received) = mpsc::channel(READ_AHEAD);
        // Ends with the stream, or when the pass stops listening.
        tokio::spawn(async move {
            loop {
                let next = entries.next().await.transpose();
                let stop = !matches!(next, Some(Ok(_)));
                let Some(next) = next else { break };
                if send.send(next).await.is_err() || stop {
                    break;
                }
            }
        });
        ReadAhead {
            received,
            ready: VecDeque::new(),
            failed: None,
        }
    }
}

fn initial_side(direction: Direction, policy: ConflictPolicy) -> Side {
    match (direction, policy) {
        (Direction::LocalToLdap, _) => Side::Local,
        (Direction::LdapToLocal, _) => Side::Ldap,
        (Direction::Both, ConflictPolicy::LocalWins | ConflictPolicy::Merge(Fallback::LocalWins)) => Side::Local,
        // ldap-wins, and no-change (which has no baseline to restore): the
        // directory is the record an initial import trusts.
        (Direction::Both, _) => Side::Ldap,
    }
}

fn side_name(side: Side) -> &'static str {
    match side {
        Side::Local => "local",
        Side::Ldap => "directory",
    }
}

fn describe(outcome: &Outcome) -> String {
    let list = |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>().join(", ");
    match outcome {
        Outcome::Unchanged => "unchanged".into(),
        Outcome::Converged => "both sides made the same change; nothing to write".into(),
        Outcome::Applied { from } => format!("{} changes applied", side_name(*from)),
        Outcome::Merged => "changes from both sides merged".into(),
        Outcome::Overwritten { side, fields } => {
            format!(
                "{} edits to {} disregarded and put back",
                side_name(*side),
                list(fields)
            )
        }
        Outcome::ConflictResolved {
            policy,
            local_lost,
            ldap_lost,
        } => format!(
            "conflict resolved by {policy}; local changes lost: [{}], directory changes lost: [{}]",
            list(local_lost),
            list(ldap_lost)
        ),
    }
}

#[cfg(test)]
mod tests;
