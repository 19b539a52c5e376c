//! The administrator's operations on the local store — accounts and
//! groups, their associations, the journal — in one place that the CLI and
//! the HTTP API (`api`) both call, so that no operation's rules (which
//! fields may be set, what a delete does, what the journal records) are
//! written twice. Errors are typed, each with a stable code the API shows.

pub mod api;
mod auth;
mod console;
pub mod feed;
pub mod http;
mod state;
pub mod webhooks;

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::{Config, ConfigError, ConnectorConfig};
use crate::directory::{Directory, DirectoryError};
use crate::model::{Action, Category, ChangeSource, MEMBERS_FIELD, Role, Values};
use crate::store::postgres::{Instance, Lease};
use crate::store::{
    AdminStore, AnyStore, ApiToken, Association, HeldDelete, JournalEntry, JournalLine, JournalQuery, LocalObject,
    Store, StoreError, now,
};
use crate::sync::engine::{self, Comparison, Dispute, LinkTarget, PassOptions, Report, SyncError, is_secret_field};
use crate::sync::progress::Progress;
use crate::worker::{self, Poll, PollOutcome};

/// Why an administrative operation was not done.
#[derive(Debug, Error)]
pub enum AdminError {
    #[error("no {category} named {name:?}")]
    NotFound { category: Category, name: String },
    #[error("{category} {name:?} already exists")]
    Exists { category: Category, name: String },
    #[error("{category} {name} has no association with connector {connector:?}")]
    NoAssociation {
        category: Category,
        name: String,
        connector: String,
    },
    /// What the operator asked for is not valid, and why.
    #[error("{0}")]
    Invalid(String),
    #[error("{what} {name:?} already exists")]
    Taken { what: &'static str, name: String },
    #[error("no API token named {0:?}")]
    NoToken(String),
    #[error("there is no dead letter {0}")]
    NoDeadLetter(i64),
    #[error(
        "cursor {cursor} is older than the oldest change the feed still holds ({oldest}): \
         changes after it were pruned; read the objects afresh and follow the feed from {oldest}"
    )]
    CursorExpired { cursor: String, oldest: String },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(StoreError),
    #[error(transparent)]
    Sync(SyncError),
}

impl From<StoreError> for AdminError {
    fn from(e: StoreError) -> AdminError {
        match e {
            StoreError::NotFound { category, name } => AdminError::NotFound { category, name },
            StoreError::Exists { category, name } => AdminError::Exists { category, name },
            StoreError::Taken { what, name } => AdminError::Taken { what, name },
            other => AdminError::Store(other),
        }
    }
}

impl From<SyncError> for AdminError {
    fn from(e: SyncError) -> AdminError {
        match e {
            SyncError::Store(e) => e.into(),
            SyncError::Refused(why) => AdminError::Invalid(why),
            other => AdminError::Sync(other),
        }
    }
}

impl From<DirectoryError> for AdminError {
    fn from(e: DirectoryError) -> AdminError {
        AdminError::Sync(SyncError::Directory(e))
    }
}

impl AdminError {
    /// A stable code for programs (the API's problem documents).
    pub fn code(&self) -> &'static str {
        match self {
            AdminError::NotFound { .. } | AdminError::NoToken(_) | AdminError::NoDeadLetter(_) => "not-found",
            AdminError::Exists { .. } | AdminError::Taken { .. } => "exists",
            AdminError::CursorExpired { .. } => "cursor-expired",
            AdminError::NoAssociation { .. } => "no-association",
            AdminError::Invalid(_) => "invalid",
            AdminError::Config(_) => "unknown-connector",
            AdminError::Store(_) => "store-unavailable",
            AdminError::Sync(_) => "directory-unavailable",
        }
    }
}

/// A change to a local object's fields, as an operator asks for it.
#[derive(Debug, Clone, Default, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ObjectEdit {
    /// Fields replaced by these values.
    pub set: BTreeMap<String, Vec<String>>,
    /// Values added to a field.
    pub add: BTreeMap<String, Vec<String>>,
    /// Values removed from a field.
    pub remove: BTreeMap<String, Vec<String>>,
    /// Fields whose every value goes.
    pub unset: Vec<String>,
    pub rename: Option<String>,
    pub enabled: Option<bool>,
    /// Accept fields no connector maps (kept locally, synced nowhere).
    pub unmapped: bool,
}

/// Names must be printable, one line, and of a reasonable length: they
/// become RDN values and journal keys.
const MAX_NAME: usize = 256;
const MAX_VALUE: usize = 64 * 1024;

pub(crate) fn check_name(name: &str) -> Result<(), AdminError> {
    if name.is_empty() || name.len() > MAX_NAME || name.chars().any(char::is_control) || name.trim() != name {
        return Err(AdminError::Invalid(format!(
            "{name:?} is not a name: 1 to {MAX_NAME} bytes, no control characters, no leading or trailing space"
        )));
    }
    Ok(())
}

impl ObjectEdit {
    fn fields(&self) -> impl Iterator<Item = &String> {
        self.set
            .keys()
            .chain(self.add.keys())
            .chain(self.remove.keys())
            .chain(&self.unset)
    }

    /// Refuses fields no connector of the category maps (a typo would
    /// otherwise be stored and synced nowhere), unless `unmapped`; and
    /// names and values that cannot be.
    fn check(&self, config: &Config, category: Category) -> Result<(), AdminError> {
        if let Some(name) = &self.rename {
            check_name(name)?;
        }
        let values = self.set.values().chain(self.add.values()).flatten();
        if let Some(value) = values.into_iter().find(|v| v.len() > MAX_VALUE) {
            return Err(AdminError::Invalid(format!(
                "a value of {} bytes is over the limit of {MAX_VALUE}",
                value.len()
            )));
        }
        if self.unmapped || config.connectors.is_empty() {
            return Ok(());
        }
        let mapped: BTreeSet<&str> = config
            .connectors
            .iter()
            .flat_map(|c| c.scopes().filter(|(c, _)| *c == category).map(|(_, s)| s))
            .flat_map(|scope| {
                let members = scope.membership.as_ref().map(|_| MEMBERS_FIELD);
                scope.map.values().map(String::as_str).chain(members)
            })
            .collect();
        if let Some(field) = self.fields().find(|f| !mapped.contains(f.as_str())) {
            let known: Vec<&str> = mapped.iter().copied().collect();
            return Err(AdminError::Invalid(format!(
                "no connector maps the {category} field {field:?}; the mapped ones are {} \
                 (unmapped keeps a field that is synced nowhere)",
                if known.is_empty() {
                    "none".into()
                } else {
                    known.join(", ")
                }
            )));
        }
        Ok(())
    }

    fn apply(&self, object: &mut LocalObject) {
        for (field, values) in &self.set {
            object.values.insert(field.clone(), values.clone());
        }
        for (field, added) in &self.add {
            let values = object.values.entry(field.clone()).or_default();
            for value in added {
                if !values.contains(value) {
                    values.push(value.clone());
                }
            }
            values.sort();
        }
        for (field, removed) in &self.remove {
            if let Some(values) = object.values.get_mut(field) {
                values.retain(|v| !removed.contains(v));
            }
        }
        for field in &self.unset {
            object.values.remove(field);
        }
        object.values.retain(|_, v| !v.is_empty());
        if let Some(name) = &self.rename {
            object.name = name.clone();
        }
        if let Some(enabled) = self.enabled {
            object.enabled = enabled;
        }
    }
}

/// Each field a local edit changed, with its old and new values (a secret
/// field by name only), for the journal.
fn edited_fields(before: &Values, after: &Values) -> serde_json::Value {
    let fields: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    let mut changes = serde_json::Map::new();
    for field in fields.into_iter().filter(|f| before.get(*f) != after.get(*f)) {
        let entry = if is_secret_field(field) {
            serde_json::json!("(secret: values not journaled)")
        } else {
            serde_json::json!({ "old": before.get(field), "new": after.get(field) })
        };
        changes.insert(field.clone(), entry);
    }
    serde_json::Value::Object(changes)
}

fn local_journal(category: Category, name: &str, action: Action, detail: serde_json::Value) -> JournalEntry {
    JournalEntry {
        at: now(),
        connector: String::new(),
        category,
        object: name.to_owned(),
        source: ChangeSource::Local,
        action,
        policy: String::new(),
        detail: detail.to_string(),
    }
}

/// One object with its associations.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ObjectView {
    pub object: LocalObject,
    pub associations: Vec<Association>,
}

/// The object named so, or `NotFound`.
pub fn find(store: &AnyStore, category: Category, name: &str) -> Result<LocalObject, AdminError> {
    store.object(category, name)?.ok_or_else(|| AdminError::NotFound {
        category,
        name: name.to_owned(),
    })
}

pub fn show(store: &AnyStore, category: Category, name: &str) -> Result<ObjectView, AdminError> {
    let object = find(store, category, name)?;
    let associations = store
        .associations(None)?
        .into_iter()
        .filter(|a| a.object_id == object.id)
        .collect();
    Ok(ObjectView { object, associations })
}

/// A page of a category's objects, by name: those after `after`, at most
/// `limit`, those whose name contains `contains` (without case) only.
#[derive(Debug, Default, Clone, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields, default)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    pub contains: Option<String>,
    pub after: Option<String>,
    pub limit: Option<usize>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Where the next page starts (`after`), when there is one.
    pub next: Option<String>,
}

pub const MAX_PAGE: usize = 1000;

pub fn list(store: &AnyStore, category: Category, query: &ListQuery) -> Result<Page<LocalObject>, AdminError> {
    let limit = query.limit.unwrap_or(MAX_PAGE).clamp(1, MAX_PAGE);
    let needle = query.contains.as_deref().map(str::to_lowercase);
    let mut matching = store
        .objects(category)?
        .into_iter()
        .filter(|o| query.after.as_deref().is_none_or(|after| o.name.as_str() > after))
        .filter(|o| needle.as_deref().is_none_or(|n| o.name.to_lowercase().contains(n)));
    let items: Vec<LocalObject> = matching.by_ref().take(limit).collect();
    let next = match matching.next() {
        Some(_) => items.last().map(|o| o.name.clone()),
        None => None,
    };
    Ok(Page { items, next })
}

/// Creates a local object; `operator` is journaled.
pub fn create(
    config: &Config,
    store: &mut AnyStore,
    category: Category,
    name: &str,
    edit: &ObjectEdit,
    operator: &str,
) -> Result<LocalObject, AdminError> {
    check_name(name)?;
    edit.check(config, category)?;
    let mut object = LocalObject {
        id: 0,
        category,
        name: name.to_owned(),
        enabled: true,
        values: Default::default(),
    };
    edit.apply(&mut object);
    let detail = serde_json::json!({
        "operator": operator,
        "fields": edited_fields(&Default::default(), &object.values),
    });
    object.id = store.insert_object(
        &object,
        &local_journal(category, &object.name, Action::LocalAdd, detail),
    )?;
    Ok(object)
}

/// Changes a local object's fields; `operator` is journaled.
pub fn edit(
    config: &Config,
    store: &mut AnyStore,
    category: Category,
    name: &str,
    edit: &ObjectEdit,
    operator: &str,
) -> Result<LocalObject, AdminError> {
    edit.check(config, category)?;
    let mut object = find(store, category, name)?;
    let before = object.clone();
    edit.apply(&mut object);
    let detail = serde_json::json!({
        "operator": operator,
        "fields": edited_fields(&before.values, &object.values),
        "renamed": (before.name != object.name).then_some([&before.name, &object.name]),
        "enabled": object.enabled,
    });
    store.update_object(&object, &local_journal(category, name, Action::LocalEdit, detail))?;
    Ok(object)
}

/// Runs `work` over a fresh service connection of `connector`, and
/// closes the connection however the work ends.
async fn with_directory<T>(
    config: &Config,
    connector: &ConnectorConfig,
    work: impl AsyncFnOnce(&mut Directory) -> Result<T, AdminError>,
) -> Result<T, AdminError> {
    let password = connector.password()?;
    let mut directory = Directory::connect(connector, password.expose(), config.proxy.connect_timeout).await?;
    let result = work(&mut directory).await;
    directory.close().await;
    result
}

/// How a delete goes.
#[derive(Debug, Clone, Copy, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields, default)]
pub struct DeleteOptions {
    /// Locally only, whatever the object's connector says.
    pub force: bool,
    /// Past the mass-delete guard.
    pub confirm_deletes: bool,
}

/// What a connector's pass did, with the lines that say so.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Outcome {
    pub connector: String,
    #[serde(flatten)]
    pub report: Report,
    pub lines: Vec<String>,
}

impl Outcome {
    pub fn new(connector: &str, report: Report) -> Outcome {
        Outcome {
            connector: connector.to_owned(),
            lines: report.all_lines().cloned().collect(),
            report,
        }
    }
}

/// What a delete did.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case", tag = "outcome")]
pub enum Deleted {
    /// The object was removed locally only.
    Locally,
    /// Its connector applied its delete policy.
    ByConnector(Outcome),
}

/// Deletes a local object. An associated one is deleted as its connector
/// says (the entry deleted, disabled or kept, under the mass-delete
/// guard), over a service connection to its directory.
pub async fn delete(
    config: &Config,
    store: &mut AnyStore,
    category: Category,
    name: &str,
    options: DeleteOptions,
    operator: &str,
) -> Result<Deleted, AdminError> {
    let object = find(store, category, name)?;
    let association = store.association_of_object(object.id)?;
    let Some(connector) = association
        .filter(|_| !options.force)
        .and_then(|a| config.connector(&a.connector))
    else {
        let detail = serde_json::json!({ "operator": operator, "forced": options.force });
        store.delete_object(object.id, &local_journal(category, name, Action::LocalDelete, detail))?;
        return Ok(Deleted::Locally);
    };
    let pass = PassOptions {
        dry_run: false,
        confirm_deletes: options.confirm_deletes,
    };
    let report = with_directory(config, &connector, async |directory| {
        Ok(engine::delete_object(store, &connector, directory, object, pass, operator).await?)
    })
    .await?;
    Ok(Deleted::ByConnector(Outcome::new(&connector.name, report)))
}

/// Associations, of one connector or all, with their objects' names.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AssociationView {
    pub category: Option<Category>,
    pub name: Option<String>,
    pub association: Association,
}

pub fn associations(
    config: &Config,
    store: &AnyStore,
    connector: Option<&str>,
) -> Result<Vec<AssociationView>, AdminError> {
    if let Some(connector) = connector {
        config.require_connector(connector)?;
    }
    store
        .associations(connector)?
        .into_iter()
        .map(|association| {
            let object = store.object_by_id(association.object_id)?;
            Ok(AssociationView {
                category: object.as_ref().map(|o| o.category),
                name: object.map(|o| o.name),
                association,
            })
        })
        .collect()
}

/// The journal's most recent lines that match, newest last.
pub fn journal(config: &Config, store: &AnyStore, query: &JournalQuery) -> Result<Vec<JournalLine>, AdminError> {
    if let Some(connector) = &query.connector {
        config.require_connector(connector)?;
    }
    Ok(store.journal(query)?)
}

/// The association of one object with one connector's entry.
pub fn association(
    config: &Config,
    store: &AnyStore,
    connector: &str,
    category: Category,
    name: &str,
) -> Result<Association, AdminError> {
    config.require_connector(connector)?;
    let object = find(store, category, name)?;
    let none = || AdminError::NoAssociation {
        category,
        name: name.to_owned(),
        connector: connector.to_owned(),
    };
    store.association_by_object(connector, object.id)?.ok_or_else(none)
}

/// Removes an association, an explicit act journaled with its operator:
/// the next sync matches the object afresh.
pub fn remove_association(
    config: &Config,
    store: &mut AnyStore,
    connector: &str,
    category: Category,
    name: &str,
    operator: &str,
) -> Result<(), AdminError> {
    config.require_connector(connector)?;
    let object = find(store, category, name)?;
    let journal = JournalEntry {
        connector: connector.to_owned(),
        ..local_journal(
            category,
            name,
            Action::AssociationRemoved,
            serde_json::json!({ "operator": operator }),
        )
    };
    match store.remove_association(connector, object.id, &journal)? {
        true => Ok(()),
        false => Err(AdminError::NoAssociation {
            category,
            name: name.to_owned(),
            connector: connector.to_owned(),
        }),
    }
}

/// Says which directory entry an object belongs to (the way out of a
/// dispute), an explicit act journaled with its operator; refused if
/// either is associated already. The pair is then synced as at a first
/// sync, over a service connection: the pass's report.
pub async fn link(
    config: &Config,
    store: &mut AnyStore,
    connector: &str,
    category: Category,
    name: &str,
    target: &LinkTarget,
    operator: &str,
) -> Result<Outcome, AdminError> {
    let connector = config.require_connector(connector)?;
    let report = with_directory(config, &connector, async |directory| {
        Ok(engine::link(store, &connector, directory, category, name, target, operator).await?)
    })
    .await?;
    Ok(Outcome::new(&connector.name, report))
}

/// A connector as an operator watches it: what it syncs and how, and how
/// its polls are going.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ConnectorView {
    pub name: String,
    /// `both`, `ldap-to-local` or `local-to-ldap`.
    pub direction: String,
    /// The conflict policy (`ldap-wins`, `merge/local-wins`, …).
    pub conflict: String,
    /// The configured poll mechanism; detected at the next poll when unset.
    pub poll_mechanism: Option<String>,
    /// Per category: the mechanism its watermark is of, and when it moved.
    pub watermarks: Vec<WatermarkView>,
    /// Seconds since the epoch.
    pub last_sync_at: Option<i64>,
    pub last_poll_at: Option<i64>,
    /// Why a full reconciliation is due, when one is.
    pub out_of_sync: Option<String>,
    pub last_error: Option<String>,
    pub held_deletes: Vec<HeldDelete>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WatermarkView {
    pub category: Category,
    pub mechanism: String,
    pub updated_at: i64,
}

/// Every configured connector with its state in the store.
pub fn connectors(config: &Config, store: &AnyStore) -> Result<Vec<ConnectorView>, AdminError> {
    config
        .connectors
        .iter()
        .map(|connector| {
            let state = store.connector_state(&connector.name)?.unwrap_or_default();
            let mut watermarks = Vec::new();
            for (category, _) in connector.scopes() {
                if let Some(w) = store.watermark(&connector.name, category)? {
                    watermarks.push(WatermarkView {
                        category,
                        mechanism: w.mechanism.to_string(),
                        updated_at: w.updated_at,
                    });
                }
            }
            Ok(ConnectorView {
                name: connector.name.clone(),
                direction: connector.direction.to_string(),
                conflict: connector.conflict_policy().to_string(),
                poll_mechanism: connector.poll_mechanism.map(|m| m.to_string()),
                watermarks,
                last_sync_at: state.last_sync_at,
                last_poll_at: state.last_poll_at,
                out_of_sync: state.out_of_sync,
                last_error: state.last_error,
                held_deletes: store.held_deletes(&connector.name)?,
            })
        })
        .collect()
}

/// A new random secret (256 bits, hex): API and session tokens.
pub fn new_secret() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes)?;
    Ok(hex(&bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A secret as it is kept: its SHA-256, so that the store (or a memory
/// dump) holds nothing usable.
pub fn digest(secret: &str) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(secret.as_bytes()))
}

/// API tokens start so, to be told apart from session tokens in logs and
/// by secret scanners.
pub const TOKEN_PREFIX: &str = "lsk_";

/// Creates an API token for scripts: returns the token, shown once.
pub fn create_token(store: &mut AnyStore, name: &str, role: Role, created_by: &str) -> Result<String, AdminError> {
    check_name(name)?;
    let secret = new_secret().map_err(|e| AdminError::Invalid(format!("no randomness for a token: {e}")))?;
    let token = format!("{TOKEN_PREFIX}{secret}");
    let record = ApiToken {
        name: name.to_owned(),
        role,
        created_at: now(),
        created_by: created_by.to_owned(),
        last_used_at: None,
    };
    store.create_token(&record, &digest(&token))?;
    Ok(token)
}

pub fn tokens(store: &AnyStore) -> Result<Vec<ApiToken>, AdminError> {
    Ok(store.tokens()?)
}

pub fn revoke_token(store: &mut AnyStore, name: &str) -> Result<(), AdminError> {
    match store.revoke_token(name)? {
        true => Ok(()),
        false => Err(AdminError::NoToken(name.to_owned())),
    }
}

/// A dispute of a connector's last full pass, with what settles it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DisputeView {
    pub connector: String,
    /// When the pass that found it ran (seconds since the epoch).
    pub found_at: Option<i64>,
    #[serde(flatten)]
    pub dispute: Dispute,
}

/// The disputes the last full pass of each connector left.
pub fn disputes(config: &Config, store: &AnyStore) -> Result<Vec<DisputeView>, AdminError> {
    let mut views = Vec::new();
    for connector in &config.connectors {
        let Some(state) = store.connector_state(&connector.name)? else {
            continue;
        };
        let last: serde_json::Value = serde_json::from_str(&state.last_result).unwrap_or_default();
        let disputes = last
            .get("disputes")
            .and_then(|d| d.as_array())
            .cloned()
            .unwrap_or_default();
        views.extend(
            disputes
                .into_iter()
                .filter_map(|d| serde_json::from_value::<Dispute>(d).ok())
                .map(|dispute| DisputeView {
                    connector: connector.name.clone(),
                    found_at: state.last_sync_at,
                    dispute,
                }),
        );
    }
    Ok(views)
}

fn masked(values: &mut Values) {
    for (field, values) in values.iter_mut() {
        if is_secret_field(field) {
            *values = vec!["(secret)".into()];
        }
    }
}

/// An object's local, directory and baseline values side by side, and
/// what the next pass would do (secret fields masked), over a service
/// connection to the connector's directory.
pub async fn compare(
    config: &Config,
    store: &mut AnyStore,
    connector: &str,
    category: Category,
    name: &str,
) -> Result<Comparison, AdminError> {
    let connector = config.require_connector(connector)?;
    let object = find(store, category, name)?;
    let mut comparison = with_directory(config, &connector, async |directory| {
        Ok(engine::compare(store, &connector, directory, object).await?)
    })
    .await?;
    for values in [&mut comparison.local, &mut comparison.baseline]
        .into_iter()
        .chain(comparison.directory.as_mut())
        .chain(comparison.result.as_mut())
    {
        masked(values);
    }
    Ok(comparison)
}

/// Journals that `operator` started a full pass of `connector`: a line
/// per category it syncs, before the pass's own lines.
pub fn journal_pass_request(
    config: &Config,
    store: &mut AnyStore,
    connector: &str,
    confirm_deletes: bool,
    operator: &str,
) -> Result<(), AdminError> {
    let connector = config.require_connector(connector)?;
    let journal = connector
        .scopes()
        .map(|(category, _)| JournalEntry {
            connector: connector.name.clone(),
            ..local_journal(
                category,
                "*",
                Action::PassRequested,
                serde_json::json!({ "operator": operator, "confirm_deletes": confirm_deletes }),
            )
        })
        .collect();
    store.commit(crate::store::Commit {
        journal,
        ..Default::default()
    })?;
    Ok(())
}

/// Runs a connector's pass now: the captures not applied yet, then a full
/// pass (or, with `Poll::Due`, whatever poll is due), over a service
/// connection. A dry run decides and reports, changing nothing.
pub async fn sync(
    config: &Config,
    store: &mut AnyStore,
    connector: &str,
    poll: Poll,
    progress: &mut dyn Progress,
) -> Result<PollOutcome, AdminError> {
    let connector = config.require_connector(connector)?;
    let dry_run = matches!(poll, Poll::Full(PassOptions { dry_run: true, .. }));
    with_directory(config, &connector, async |directory| {
        if !dry_run {
            worker::apply_captures(store, &connector, directory).await?;
        }
        Ok(worker::poll(store, &connector, directory, poll, progress).await?)
    })
    .await
}

/// One instance sharing the store, as the registry shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct InstanceView {
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub instance: Instance,
    /// Its heartbeat is younger than the lease time.
    pub alive: bool,
    /// The connectors whose lease it holds.
    pub holds: Vec<String>,
}

/// The instances sharing a PostgreSQL store and the connectors' leases.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Cluster {
    pub instances: Vec<InstanceView>,
    #[schema(value_type = Vec<Object>)]
    pub leases: Vec<Lease>,
}

/// The cluster on a PostgreSQL store; none on SQLite (one instance).
pub fn cluster(config: &Config, store: &AnyStore) -> Result<Option<Cluster>, AdminError> {
    let Some(shared) = store.shared() else {
        return Ok(None);
    };
    let leases = shared.leases()?;
    let ttl = config.store.lease_ttl.as_secs() as i64;
    let instances = shared
        .instances()?
        .into_iter()
        .map(|instance| InstanceView {
            alive: instance.heartbeat_age <= ttl,
            holds: leases
                .iter()
                .filter(|l| l.holder == instance.id && l.expires_in >= 0)
                .map(|l| l.connector.clone())
                .collect(),
            instance,
        })
        .collect();
    Ok(Some(Cluster { instances, leases }))
}

/// Seconds since the epoch as RFC 3339 UTC, for people.
pub fn timestamp(secs: i64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0) as u64);
    humantime::format_rfc3339_seconds(at).to_string()
}
