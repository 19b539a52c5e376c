//! The engine's decisions against an in-memory directory and a real
//! (temporary) SQLite store. The integration tests in `tests/sync.rs`,
//! against a real slapd, remain the evidence that sync works; these pin
//! the engine's own rules, each in isolation.

use std::collections::{BTreeMap, VecDeque};

use super::*;
use crate::config::Config;
use crate::directory::{AttrMod, DirectoryError, DirectoryOps, Entry, EntryStream};
use crate::dn;
use crate::model::MEMBERS_FIELD;
use crate::store::SqliteStore;
use crate::sync::progress::Quiet;

/// A directory held in a map, keyed by normalised DN. It implements what
/// the engine relies on of a real one: scope by base, entries found by
/// DN, id or naming value, and writes that fail where slapd's would (an
/// add over an entry, a modify or delete of none).
#[derive(Default)]
struct MemoryDirectory {
    entries: BTreeMap<String, Entry>,
    next_id: u32,
    /// Every write, in order: what the tests count to show idempotence.
    writes: Vec<String>,
}

struct MemoryEntries(VecDeque<Entry>);

impl EntryStream for MemoryEntries {
    async fn next(&mut self) -> Result<Option<Entry>, DirectoryError> {
        Ok(self.0.pop_front())
    }
}

fn no_such_object(operation: &'static str, dn: &str) -> DirectoryError {
    DirectoryError::Result {
        operation,
        dn: dn.to_owned(),
        code: 32,
        message: "noSuchObject".into(),
    }
}

impl MemoryDirectory {
    /// Adds an entry as another client would; returns its stable id.
    fn put(&mut self, dn: &str, attrs: &[(&str, &[&str])]) -> String {
        self.next_id += 1;
        let id = format!("00000000-0000-0000-0000-{:012}", self.next_id);
        let attrs = attrs
            .iter()
            .map(|(k, v)| (k.to_lowercase(), v.iter().map(|s| s.to_string()).collect()))
            .collect();
        self.entries.insert(
            dn::key(dn),
            Entry {
                id: id.clone(),
                dn: dn.to_owned(),
                attrs,
            },
        );
        id
    }

    fn get(&self, dn: &str) -> Option<&Entry> {
        self.entries.get(&dn::key(dn))
    }

    fn remove(&mut self, dn: &str) {
        self.entries.remove(&dn::key(dn));
    }

    fn in_scope<'a>(&'a self, scope: &'a ScopeConfig) -> impl Iterator<Item = &'a Entry> {
        self.entries.values().filter(|e| dn::is_within(&e.dn, &scope.base))
    }
}

impl DirectoryOps for MemoryDirectory {
    type Entries = MemoryEntries;

    async fn names(&mut self, scope: &ScopeConfig) -> Result<MemoryEntries, DirectoryError> {
        self.entries(scope).await
    }

    async fn entries(&mut self, scope: &ScopeConfig) -> Result<MemoryEntries, DirectoryError> {
        Ok(MemoryEntries(self.in_scope(scope).cloned().collect()))
    }

    async fn entry_by_id(&mut self, scope: &ScopeConfig, id: &str) -> Result<Option<Entry>, DirectoryError> {
        Ok(self.in_scope(scope).find(|e| e.id == id).cloned())
    }

    async fn entries_named(&mut self, scope: &ScopeConfig, value: &str) -> Result<Vec<Entry>, DirectoryError> {
        Ok(self
            .in_scope(scope)
            .filter(|e| e.get(&scope.naming).iter().any(|v| v.eq_ignore_ascii_case(value)))
            .cloned()
            .collect())
    }

    async fn entry_at(&mut self, scope: &ScopeConfig, dn: &str) -> Result<Option<Entry>, DirectoryError> {
        Ok(self.get(dn).filter(|e| dn::is_within(&e.dn, &scope.base)).cloned())
    }

    async fn add(&mut self, dn: &str, attrs: &BTreeMap<String, Vec<String>>) -> Result<(), DirectoryError> {
        if self.get(dn).is_some() {
            return Err(DirectoryError::Result {
                operation: "add",
                dn: dn.to_owned(),
                code: 68,
                message: "entryAlreadyExists".into(),
            });
        }
        self.writes.push(format!("add {dn}"));
        let attrs: Vec<(&str, Vec<&str>)> = attrs
            .iter()
            .map(|(k, v)| (k.as_str(), v.iter().map(String::as_str).collect()))
            .collect();
        let attrs: Vec<(&str, &[&str])> = attrs.iter().map(|(k, v)| (*k, v.as_slice())).collect();
        self.put(dn, &attrs);
        Ok(())
    }

    async fn modify(&mut self, dn: &str, changes: Vec<AttrMod>) -> Result<(), DirectoryError> {
        let entry = self
            .entries
            .get_mut(&dn::key(dn))
            .ok_or_else(|| no_such_object("modify", dn))?;
        self.writes.push(format!("modify {dn}"));
        for change in changes {
            match change {
                AttrMod::Replace(attr, values) => {
                    entry.attrs.insert(attr.to_lowercase(), values);
                }
                AttrMod::Add(attr, values) => entry.attrs.entry(attr.to_lowercase()).or_default().extend(values),
                AttrMod::Delete(attr, values) => {
                    let held = entry.attrs.entry(attr.to_lowercase()).or_default();
                    held.retain(|v| !values.iter().any(|gone| dn::same(gone, v)));
                }
            }
        }
        entry.attrs.retain(|_, v| !v.is_empty());
        Ok(())
    }

    async fn rename(&mut self, dn: &str, new_rdn: &str) -> Result<(), DirectoryError> {
        let mut entry = self
            .entries
            .remove(&dn::key(dn))
            .ok_or_else(|| no_such_object("modrdn", dn))?;
        self.writes.push(format!("modrdn {dn} {new_rdn}"));
        let (attr, value) = new_rdn.split_once('=').expect("the engine writes attr=value RDNs");
        let value = value.replace("\\,", ",");
        entry.attrs.insert(attr.to_lowercase(), vec![value]);
        entry.dn = dn::with_rdn(new_rdn, dn::parent(dn));
        self.entries.insert(dn::key(&entry.dn), entry);
        Ok(())
    }

    async fn delete(&mut self, dn: &str) -> Result<(), DirectoryError> {
        self.entries
            .remove(&dn::key(dn))
            .ok_or_else(|| no_such_object("delete", dn))?;
        self.writes.push(format!("delete {dn}"));
        Ok(())
    }
}

const PEOPLE: &str = "ou=people,dc=example,dc=com";

/// A connector over people and groups, with a direction, policy and guard.
fn connector(direction: &str, conflict: &str, max_deletes: usize) -> ConnectorConfig {
    connector_deleting(direction, conflict, max_deletes, "ignore")
}

fn connector_deleting(direction: &str, conflict: &str, max_deletes: usize, delete: &str) -> ConnectorConfig {
    let text = format!(
        r#"
[proxy]
upstream = ["ldap://127.0.0.1:1"]
[store]
path = "unused.db"
[[connector]]
name = "example"
bind_dn = "cn=admin,dc=example,dc=com"
password_env = "UNUSED"
direction = "{direction}"
conflict = "{conflict}"
max_deletes = {max_deletes}
delete = "{delete}"
max_delete_percent = 100
[connector.accounts]
base = "{PEOPLE}"
naming = "uid"
object_classes = ["inetOrgPerson"]
defaults = {{ sn = "{{name}}", cn = "{{name}}" }}
map = {{ mail = "mail" }}
[connector.groups]
base = "ou=groups,dc=example,dc=com"
naming = "cn"
membership = "member"
object_classes = ["groupOfNames"]
"#
    );
    let mut config = Config::parse(&text, std::path::Path::new("test.toml")).unwrap();
    config.connectors.remove(0)
}

struct World {
    _dir: tempfile::TempDir,
    store: SqliteStore,
    directory: MemoryDirectory,
    connector: ConnectorConfig,
}

impl World {
    fn new(connector: ConnectorConfig) -> World {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("store.db")).unwrap();
        World {
            _dir: dir,
            store,
            directory: MemoryDirectory::default(),
            connector,
        }
    }

    async fn pass(&mut self, options: PassOptions) -> Report {
        run_pass(
            &mut self.store,
            &self.connector,
            &mut self.directory,
            options,
            &mut Quiet,
        )
        .await
        .unwrap()
    }

    fn local(&self, category: Category, name: &str) -> Option<LocalObject> {
        self.store.object(category, name).unwrap()
    }

    /// Changes a local object as the CLI does.
    fn edit(&mut self, category: Category, name: &str, edit: impl FnOnce(&mut LocalObject)) {
        let mut object = self.local(category, name).unwrap();
        edit(&mut object);
        self.store
            .commit(Commit {
                object: Some(object),
                ..Commit::default()
            })
            .unwrap();
    }
}

fn person(uid: &str) -> String {
    format!("uid={},{PEOPLE}", ldap3::dn_escape(uid))
}

#[tokio::test]
async fn an_event_seen_twice_is_applied_once() {
    let mut world = World::new(connector("both", "local-wins", 500));
    world.directory.put(
        &person("alice"),
        &[("uid", &["alice"]), ("mail", &["alice@example.com"])],
    );
    let event = ChangeEvent {
        source: ChangeSource::Proxy,
        change: Change::Entry {
            category: Category::Account,
            dn: person("alice"),
        },
    };
    let first = apply_event(&mut world.store, &world.connector, &mut world.directory, &event)
        .await
        .unwrap();
    assert_eq!(first.created_local, 1);
    let journal = world.store.journal(&JournalQuery::default()).unwrap().len();

    let again = apply_event(&mut world.store, &world.connector, &mut world.directory, &event)
        .await
        .unwrap();
    assert_eq!((again.created_local, again.updated, again.associated), (0, 0, 0));
    assert!(again.lines.is_empty(), "{:?}", again.lines);
    assert!(world.directory.writes.is_empty(), "{:?}", world.directory.writes);
    assert_eq!(world.store.journal(&JournalQuery::default()).unwrap().len(), journal);
    let alice = world.local(Category::Account, "alice").unwrap();
    assert_eq!(alice.values["mail"], ["alice@example.com"]);
}

#[tokio::test]
async fn group_members_are_names_locally_and_dns_in_the_directory() {
    let mut world = World::new(connector("both", "local-wins", 500));
    world.directory.put(&person("alice"), &[("uid", &["alice"])]);
    world.directory.put(&person("bob"), &[("uid", &["bob"])]);
    let staff = "cn=staff,ou=groups,dc=example,dc=com";
    // Member DNs as a directory may spell them: case and spaces differ.
    world.directory.put(
        staff,
        &[
            ("cn", &["staff"]),
            ("member", &["UID=Alice, OU=People,DC=example,DC=com", &person("bob")]),
        ],
    );
    world.pass(PassOptions::default()).await;
    let group = world.local(Category::Group, "staff").unwrap();
    assert_eq!(group.values[MEMBERS_FIELD], ["alice", "bob"]);

    world.edit(Category::Group, "staff", |g| {
        g.values.insert(MEMBERS_FIELD.into(), vec!["bob".into()]);
    });
    let report = world.pass(PassOptions::default()).await;
    assert_eq!(report.updated, 1, "{:?}", report.lines);
    assert_eq!(world.directory.get(staff).unwrap().get("member"), [person("bob")]);
}

#[tokio::test]
async fn a_rename_of_an_rdn_with_an_escaped_comma_stays_under_its_parent() {
    let mut world = World::new(connector("both", "local-wins", 500));
    // Escaped as most clients write it (ldap3 would write `\2c`).
    let smith = format!(r"uid=smith\,j,{PEOPLE}");
    world
        .directory
        .put(&smith, &[("uid", &["smith,j"]), ("mail", &["old@example.com"])]);
    world.pass(PassOptions::default()).await;
    assert!(world.local(Category::Account, "smith,j").is_some());

    world.edit(Category::Account, "smith,j", |o| {
        o.name = "jsmith".into();
        o.values.insert("mail".into(), vec!["new@example.com".into()]);
    });
    let report = world.pass(PassOptions::default()).await;
    assert_eq!((report.updated, report.failed), (1, 0), "{:?}", report.lines);
    assert!(world.directory.get(&smith).is_none());
    let renamed = world.directory.get(&person("jsmith")).expect("renamed in place");
    assert_eq!(renamed.get("mail"), ["new@example.com"]);
    assert_eq!(
        world.directory.writes,
        [
            format!("modrdn {smith} uid=jsmith"),
            format!("modify {}", person("jsmith")),
        ]
    );
}

#[tokio::test]
async fn several_entries_with_one_name_are_disputed_not_guessed() {
    let mut world = World::new(connector("both", "local-wins", 500));
    world.directory.put(&person("alice"), &[("uid", &["alice"])]);
    world
        .directory
        .put(&format!("uid=alice,ou=contractors,{PEOPLE}"), &[("uid", &["alice"])]);
    let report = world.pass(PassOptions::default()).await;
    assert_eq!((report.disputed, report.created_local, report.associated), (1, 0, 0));
    assert!(world.local(Category::Account, "alice").is_none());
    assert!(world.store.associations(None).unwrap().is_empty());
    assert!(world.directory.writes.is_empty());
}

#[tokio::test]
async fn the_guard_holds_deletes_past_the_limit_until_confirmed() {
    let mut world = World::new(connector_deleting("ldap-to-local", "ldap-wins", 2, "delete"));
    let names = ["a", "b", "c", "d", "e"];
    for name in names {
        world.directory.put(&person(name), &[("uid", &[name])]);
    }
    assert_eq!(world.pass(PassOptions::default()).await.created_local, 5);
    for name in &names[..3] {
        world.directory.remove(&person(name));
    }

    let held = world.pass(PassOptions::default()).await;
    assert_eq!(held.deleted, 0, "{:?}", held.lines);
    assert_eq!(world.store.held_deletes("example").unwrap().len(), 3);
    assert!(names.iter().all(|n| world.local(Category::Account, n).is_some()));

    let confirmed = world
        .pass(PassOptions {
            confirm_deletes: true,
            ..PassOptions::default()
        })
        .await;
    assert_eq!(confirmed.deleted, 3, "{:?}", confirmed.lines);
    let left: Vec<bool> = names
        .iter()
        .map(|n| world.local(Category::Account, n).is_some())
        .collect();
    assert_eq!(left, [false, false, false, true, true]);
}
