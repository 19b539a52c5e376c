//! The store the configuration names: SQLite (`store.path`, the embedded
//! default) or PostgreSQL (`store.url`, shared by several instances).
//! Everything above the store holds an [`AnyStore`] and sees one behaviour.

use std::str::FromStr;

use super::copy::Tables;
use super::postgres::{Fence, PostgresStore, Target};
use super::{
    AdminStore, ApiToken, Association, Capture, ChangeRecord, Commit, ConnectorState, ConsumerState, Cursor,
    DeadLetter, HeldDelete, JournalEntry, JournalLine, JournalQuery, LocalObject, SqliteStore, Store, StoreError,
    Watermark,
};
use crate::config::StoreConfig;
use crate::model::{Action, Category};

pub enum AnyStore {
    Sqlite(SqliteStore),
    Postgres(PostgresStore),
}

/// Opens the configured store (creating or upgrading its schema).
pub fn open(config: &StoreConfig) -> Result<AnyStore, StoreError> {
    match &config.url {
        None => SqliteStore::open(&config.path).map(AnyStore::Sqlite),
        Some(url) => PostgresStore::open(target(config, url)?).map(AnyStore::Postgres),
    }
}

/// Reaches the configured PostgreSQL store without creating or changing
/// anything; SQLite is checked by its file (`cli::check`).
pub fn reach(config: &StoreConfig) -> Result<(), StoreError> {
    match &config.url {
        Some(url) => PostgresStore::reach(target(config, url)?),
        None => Ok(()),
    }
}

/// The connection settings of `store.url`, with the password from its
/// file or variable and TLS when `[store.tls]` asks for it.
fn target(config: &StoreConfig, url: &str) -> Result<Target, StoreError> {
    let bad = |message: String| StoreError::Config(format!("store.url: {message}"));
    let mut pg = postgres::Config::from_str(url).map_err(|e| bad(e.to_string()))?;
    if let Some(password) = config.password().map_err(|e| StoreError::Config(e.to_string()))? {
        pg.password(password.expose());
    }
    pg.application_name("ldapsync");
    pg.connect_timeout(config.connect_timeout);
    let tls = match &config.tls {
        Some(tls) => {
            pg.ssl_mode(postgres::config::SslMode::Require);
            let client = crate::tls::client_config(tls).map_err(|e| StoreError::Config(format!("store.tls: {e}")))?;
            Some((*client).clone())
        }
        None => None,
    };
    Ok(Target {
        config: pg,
        tls,
        shown: shown(url),
    })
}

/// The URL as messages may show it: any password replaced.
fn shown(url: &str) -> String {
    match url.split_once("://").and_then(|(scheme, rest)| {
        let (userinfo, host) = rest.split_once('@')?;
        let user = userinfo.split(':').next().unwrap_or_default();
        Some(format!("{scheme}://{user}@{host}"))
    }) {
        Some(without) => without,
        None => url.to_owned(),
    }
}

macro_rules! each {
    ($store:expr, $s:ident => $call:expr) => {
        match $store {
            AnyStore::Sqlite($s) => $call,
            AnyStore::Postgres($s) => $call,
        }
    };
}

impl AnyStore {
    /// The PostgreSQL store, which alone is shared by several instances.
    pub fn shared(&self) -> Option<&PostgresStore> {
        match self {
            AnyStore::Postgres(s) => Some(s),
            AnyStore::Sqlite(_) => None,
        }
    }

    /// Every table's rows, for `store copy`.
    pub fn export(&self) -> Result<Tables, StoreError> {
        each!(self, s => s.export())
    }

    /// Writes every table's rows into this (empty) store.
    pub fn import(&mut self, tables: &Tables) -> Result<(), StoreError> {
        each!(self, s => s.import(tables))
    }

    /// The PostgreSQL store itself, for the cluster's leases and registry.
    pub fn into_shared(self) -> Option<PostgresStore> {
        match self {
            AnyStore::Postgres(s) => Some(s),
            AnyStore::Sqlite(_) => None,
        }
    }

    /// From now on this store's writes commit only under `fence`'s lease
    /// (PostgreSQL; SQLite has one instance, and no leases).
    pub fn set_fence(&mut self, fence: Option<Fence>) -> Result<(), StoreError> {
        match self {
            AnyStore::Postgres(s) => s.set_fence(fence),
            AnyStore::Sqlite(_) => Ok(()),
        }
    }
}

impl AdminStore for AnyStore {
    fn create_token(&mut self, token: &ApiToken, digest: &str) -> Result<(), StoreError> {
        each!(self, s => s.create_token(token, digest))
    }

    fn use_token(&mut self, digest: &str) -> Result<Option<ApiToken>, StoreError> {
        each!(self, s => s.use_token(digest))
    }

    fn tokens(&self) -> Result<Vec<ApiToken>, StoreError> {
        each!(self, s => s.tokens())
    }

    fn revoke_token(&mut self, name: &str) -> Result<bool, StoreError> {
        each!(self, s => s.revoke_token(name))
    }

    fn changes(&self, after: Cursor, limit: usize) -> Result<Vec<ChangeRecord>, StoreError> {
        each!(self, s => s.changes(after, limit))
    }

    fn feed_end(&self) -> Result<Cursor, StoreError> {
        each!(self, s => s.feed_end())
    }

    fn prune_changes(&mut self, before: i64) -> Result<usize, StoreError> {
        each!(self, s => s.prune_changes(before))
    }

    fn pruned_through(&self) -> Result<Cursor, StoreError> {
        each!(self, s => s.pruned_through())
    }

    fn cursor(&self, kind: &str, name: &str) -> Result<Option<ConsumerState>, StoreError> {
        each!(self, s => s.cursor(kind, name))
    }

    fn cursors(&self, kind: &str) -> Result<Vec<ConsumerState>, StoreError> {
        each!(self, s => s.cursors(kind))
    }

    fn set_cursor(&mut self, kind: &str, name: &str, cursor: Cursor) -> Result<(), StoreError> {
        each!(self, s => s.set_cursor(kind, name, cursor))
    }

    fn add_dead_letter(&mut self, letter: &DeadLetter) -> Result<(), StoreError> {
        each!(self, s => s.add_dead_letter(letter))
    }

    fn dead_letters(&self, webhook: Option<&str>) -> Result<Vec<DeadLetter>, StoreError> {
        each!(self, s => s.dead_letters(webhook))
    }

    fn dead_letter(&self, id: i64) -> Result<Option<DeadLetter>, StoreError> {
        each!(self, s => s.dead_letter(id))
    }

    fn remove_dead_letter(&mut self, id: i64) -> Result<bool, StoreError> {
        each!(self, s => s.remove_dead_letter(id))
    }
}

impl Store for AnyStore {
    fn object(&self, category: Category, name: &str) -> Result<Option<LocalObject>, StoreError> {
        each!(self, s => s.object(category, name))
    }

    fn object_by_id(&self, id: i64) -> Result<Option<LocalObject>, StoreError> {
        each!(self, s => s.object_by_id(id))
    }

    fn objects(&self, category: Category) -> Result<Vec<LocalObject>, StoreError> {
        each!(self, s => s.objects(category))
    }

    fn insert_object(&mut self, object: &LocalObject, journal: &JournalEntry) -> Result<i64, StoreError> {
        each!(self, s => s.insert_object(object, journal))
    }

    fn update_object(&mut self, object: &LocalObject, journal: &JournalEntry) -> Result<(), StoreError> {
        each!(self, s => s.update_object(object, journal))
    }

    fn delete_object(&mut self, id: i64, journal: &JournalEntry) -> Result<(), StoreError> {
        each!(self, s => s.delete_object(id, journal))
    }

    fn association_by_entry(&self, connector: &str, entry_id: &str) -> Result<Option<Association>, StoreError> {
        each!(self, s => s.association_by_entry(connector, entry_id))
    }

    fn association_by_object(&self, connector: &str, object_id: i64) -> Result<Option<Association>, StoreError> {
        each!(self, s => s.association_by_object(connector, object_id))
    }

    fn associations(&self, connector: Option<&str>) -> Result<Vec<Association>, StoreError> {
        each!(self, s => s.associations(connector))
    }

    fn association_of_object(&self, object_id: i64) -> Result<Option<Association>, StoreError> {
        each!(self, s => s.association_of_object(object_id))
    }

    fn remove_association(
        &mut self,
        connector: &str,
        object_id: i64,
        journal: &JournalEntry,
    ) -> Result<bool, StoreError> {
        each!(self, s => s.remove_association(connector, object_id, journal))
    }

    fn commit(&mut self, commit: Commit) -> Result<Option<i64>, StoreError> {
        each!(self, s => s.commit(commit))
    }

    fn journal(&self, query: &JournalQuery) -> Result<Vec<JournalLine>, StoreError> {
        each!(self, s => s.journal(query))
    }

    fn association_count(&self, connector: &str, category: Category) -> Result<usize, StoreError> {
        each!(self, s => s.association_count(connector, category))
    }

    fn count_journal(&self, connector: &str, actions: &[Action], since: i64) -> Result<usize, StoreError> {
        each!(self, s => s.count_journal(connector, actions, since))
    }

    fn object_associated_at(&self, connector: &str, dn: &str) -> Result<Option<LocalObject>, StoreError> {
        each!(self, s => s.object_associated_at(connector, dn))
    }

    fn connector_state(&self, connector: &str) -> Result<Option<ConnectorState>, StoreError> {
        each!(self, s => s.connector_state(connector))
    }

    fn set_connector_state(&mut self, state: &ConnectorState) -> Result<(), StoreError> {
        each!(self, s => s.set_connector_state(state))
    }

    fn mark_out_of_sync(&mut self, connector: &str, reason: &str) -> Result<(), StoreError> {
        each!(self, s => s.mark_out_of_sync(connector, reason))
    }

    fn hold_deletes(&mut self, associations: &[Association]) -> Result<(), StoreError> {
        each!(self, s => s.hold_deletes(associations))
    }

    fn held_deletes(&self, connector: &str) -> Result<Vec<HeldDelete>, StoreError> {
        each!(self, s => s.held_deletes(connector))
    }

    fn release_held_delete(&mut self, connector: &str, object_id: i64) -> Result<(), StoreError> {
        each!(self, s => s.release_held_delete(connector, object_id))
    }

    fn append_captures(&mut self, captures: &[Capture]) -> Result<(), StoreError> {
        each!(self, s => s.append_captures(captures))
    }

    fn captures(&self, connector: &str, limit: usize) -> Result<Vec<Capture>, StoreError> {
        each!(self, s => s.captures(connector, limit))
    }

    fn pending_captures(&self, connector: &str) -> Result<usize, StoreError> {
        each!(self, s => s.pending_captures(connector))
    }

    fn remove_capture(&mut self, id: i64) -> Result<(), StoreError> {
        each!(self, s => s.remove_capture(id))
    }

    fn watermark(&self, connector: &str, category: Category) -> Result<Option<Watermark>, StoreError> {
        each!(self, s => s.watermark(connector, category))
    }

    fn finish_poll(
        &mut self,
        state: &ConnectorState,
        watermarks: &[Watermark],
        cleared: Option<&str>,
    ) -> Result<(), StoreError> {
        each!(self, s => s.finish_poll(state, watermarks, cleared))
    }

    fn edited_since(&self, category: Category, edit: i64) -> Result<Vec<LocalObject>, StoreError> {
        each!(self, s => s.edited_since(category, edit))
    }

    fn last_edit(&self) -> Result<i64, StoreError> {
        each!(self, s => s.last_edit())
    }

    fn begin_batch(&mut self) {
        each!(self, s => s.begin_batch())
    }

    fn look_ahead(
        &mut self,
        connector: &str,
        category: Category,
        entries: &[(String, Option<String>)],
    ) -> Result<(), StoreError> {
        each!(self, s => s.look_ahead(connector, category, entries))
    }

    fn commit_batch(&mut self) -> Result<(), StoreError> {
        each!(self, s => s.commit_batch())
    }

    fn end_batch(&mut self) -> Result<(), StoreError> {
        each!(self, s => s.end_batch())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_password_in_the_url_is_never_shown() {
        assert_eq!(
            super::shown("postgresql://sync:hunter2@db.example.com:5432/ldapsync"),
            "postgresql://sync@db.example.com:5432/ldapsync"
        );
        assert_eq!(
            super::shown("postgresql://sync@db/ldapsync"),
            "postgresql://sync@db/ldapsync"
        );
        assert_eq!(super::shown("host=db user=sync"), "host=db user=sync");
    }
}
