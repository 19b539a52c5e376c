//! Several ldapsync instances on one PostgreSQL store and one slapd, as an
//! operator runs them behind a load balancer: every instance relays and
//! captures, one at a time syncs each connector (its lease), and when the
//! holder dies or is paused another takes over with nothing lost.
//! Real parts: slapd, PostgreSQL, the ldapsync binary, ldapmodify.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Served, eventually_within, serve};
use ldapsync_fixtures::{Postgres, ROOT_DN, ROOT_PW, Slapd};

/// The lease time the tests run with: short, so that a takeover fits a test.
const TTL: Duration = Duration::from_secs(3);

struct Cluster {
    slapd: Slapd,
    postgres: Postgres,
    dir: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Cluster {
        let cluster = Cluster {
            slapd: Slapd::start(),
            postgres: Postgres::start(),
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::write(cluster.dir.path().join("service.secret"), format!("{ROOT_PW}\n")).unwrap();
        cluster
    }

    /// The config file of instance `n`: its own listener and admin socket,
    /// the shared store and directory.
    fn config(&self, n: usize) -> std::path::PathBuf {
        let path = self.dir.path().join(format!("instance-{n}.toml"));
        let text = format!(
            r#"
[proxy]
listen = ["ldap://127.0.0.1:0"]
upstream = ["{url}"]

[store]
url = "{store}"
admin_socket = "{socket}"
lease_ttl = "{ttl}s"

[[connector]]
name = "example"
bind_dn = "{ROOT_DN}"
password_file = "{secret}"
direction = "ldap-to-local"
poll_interval = "1s"

[connector.accounts]
base = "ou=people,dc=example,dc=com"
filter = "(objectClass=inetOrgPerson)"
naming = "uid"
object_classes = ["inetOrgPerson"]
map = {{ description = "description", mail = "mail" }}
"#,
            url = self.slapd.url(),
            store = self.postgres.url(),
            socket = self.dir.path().join(format!("instance-{n}.sock")).display(),
            ttl = TTL.as_secs(),
            secret = self.dir.path().join("service.secret").display(),
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    fn serve(&self, n: usize) -> Served {
        serve(&["--config", self.config(n).to_str().unwrap()])
    }

    /// The pid in the lease holder's id (`host/pid/started`), and its token.
    fn holder(&self) -> Option<(u32, i64)> {
        // Before the first instance created the schema there is no table.
        let row = self
            .postgres
            .try_sql("SELECT holder || ' ' || token FROM leases WHERE connector = 'example' AND expires_at > now()")
            .ok()?;
        let (holder, token) = row.split_once(' ')?;
        Some((holder.split('/').nth(1)?.parse().ok()?, token.parse().ok()?))
    }

    /// uid → description, as the local store holds them.
    fn local(&self) -> BTreeMap<String, String> {
        self.postgres
            .sql(r#"SELECT name || '|' || coalesce("values"::json->'description'->>0, '') FROM objects WHERE category = 'account'"#)
            .lines()
            .filter_map(|l| l.split_once('|').map(|(a, b)| (a.to_owned(), b.to_owned())))
            .collect()
    }

    /// uid → description, as the directory holds them.
    fn directory(&self) -> BTreeMap<String, String> {
        let out = Command::new("ldapsearch")
            .args([
                "-x",
                "-LLL",
                "-o",
                "ldif-wrap=no",
                "-H",
                &self.slapd.url(),
                "-D",
                ROOT_DN,
                "-w",
                ROOT_PW,
            ])
            .args([
                "-b",
                "ou=people,dc=example,dc=com",
                "(objectClass=inetOrgPerson)",
                "uid",
                "description",
            ])
            .output()
            .unwrap();
        let mut entries = BTreeMap::new();
        for block in String::from_utf8_lossy(&out.stdout).split("\n\n") {
            let field = |name: &str| {
                block
                    .lines()
                    .find_map(|l| l.strip_prefix(&format!("{name}: ")).map(str::to_owned))
            };
            if let Some(uid) = field("uid") {
                entries.insert(uid, field("description").unwrap_or_default());
            }
        }
        entries
    }

    /// How many times each local name exists (an object must exist once).
    fn duplicates(&self) -> String {
        self.postgres
            .sql("SELECT count(*) - count(DISTINCT (category, name)) FROM objects")
    }
}

/// Runs ldapmodify against `url` with -c (continue past errors); returns
/// how many changes it reported done.
fn ldapmodify(url: &str, ldif: String) -> std::thread::JoinHandle<usize> {
    let url = url.to_owned();
    std::thread::spawn(move || {
        let mut child = Command::new("ldapmodify")
            .args(["-x", "-c", "-H", &url, "-D", ROOT_DN, "-w", ROOT_PW])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        use std::io::Write;
        // A write error is a killed instance: what was sent is what counts.
        let _ = child.stdin.take().unwrap().write_all(ldif.as_bytes());
        let out = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("modifying entry") || l.starts_with("adding new entry"))
            .count()
    })
}

/// `count` writes through one instance: new people, and changes of the
/// description of the people the directory has (the last one wins).
fn writes(instance: usize, count: usize) -> String {
    let mut ldif = String::new();
    for i in 0..count {
        if i % 4 == 0 {
            ldif.push_str(&format!(
                "dn: uid=load-{instance}-{i},ou=people,dc=example,dc=com\nchangetype: add\nobjectClass: inetOrgPerson\n\
                 uid: load-{instance}-{i}\ncn: load {i}\nsn: load\ndescription: born {i}\n\n"
            ));
        } else {
            let uid = ["alice", "bob", "carol", "dave", "erin", "frank"][i % 6];
            ldif.push_str(&format!(
                "dn: uid={uid},ou=people,dc=example,dc=com\nchangetype: modify\nreplace: description\n\
                 description: instance {instance} write {i}\n\n"
            ));
        }
    }
    ldif
}

fn wait_for_holder(cluster: &Cluster, instances: &[&Served], within: Duration) -> (u32, i64) {
    let mut held = None;
    let found = eventually_within(within, || {
        held = cluster
            .holder()
            .filter(|(pid, _)| instances.iter().any(|s| s.pid() == *pid));
        held.is_some()
    });
    assert!(found, "no instance took the lease within {within:?}");
    held.unwrap()
}

#[test]
fn a_killed_lease_holder_is_replaced_within_the_ttl_and_no_write_is_lost() {
    let cluster = Cluster::start();
    let instances: Vec<Served> = (0..3).map(|n| cluster.serve(n)).collect();
    let all: Vec<&Served> = instances.iter().collect();
    let (holder, first_token) = wait_for_holder(&cluster, &all, Duration::from_secs(20));
    assert!(
        eventually_within(Duration::from_secs(20), || cluster.local() == cluster.directory()),
        "the first sync imports the directory"
    );
    let registered = cluster.postgres.sql("SELECT count(*) FROM instances");
    assert_eq!(registered, "3", "each instance registers itself");

    // 3,000 writes spread over the three instances; the holder is killed
    // in the middle of them.
    let clients: Vec<_> = instances
        .iter()
        .enumerate()
        .map(|(n, s)| ldapmodify(&s.url, writes(n, 1000)))
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    let mut instances = instances;
    let killed = instances.iter().position(|s| s.pid() == holder).unwrap();
    let killed_at = Instant::now();
    instances.remove(killed).kill();
    let rest: Vec<&Served> = instances.iter().collect();
    let (new_holder, token) = wait_for_holder(&cluster, &rest, Duration::from_secs(20));
    let takeover = killed_at.elapsed();
    let done: Vec<usize> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    assert!(
        done.iter().sum::<usize>() >= 2000,
        "the survivors' clients were served: {done:?}"
    );
    assert_ne!(new_holder, holder);
    assert!(token > first_token, "a takeover gets a new token");
    // The lease lapses at most TTL after the last renewal; the waiting
    // instances ask every third of it.
    assert!(
        takeover <= TTL + TTL / 3 + Duration::from_secs(1),
        "taken over in {takeover:?}, TTL {TTL:?}"
    );

    // Everything a client saw succeed is in the directory; the store
    // follows the directory, entry for entry, each object once.
    if !eventually_within(Duration::from_secs(60), || cluster.local() == cluster.directory()) {
        let (local, directory) = (cluster.local(), cluster.directory());
        let missing: Vec<_> = directory
            .iter()
            .filter(|(k, v)| local.get(*k) != Some(v))
            .take(5)
            .collect();
        let logs: Vec<String> = instances.into_iter().map(|s| s.terminate().1).collect();
        panic!(
            "the local store differs from the directory: {} local, {} in the directory, e.g. {missing:?}\n{}",
            local.len(),
            directory.len(),
            logs.join("\n-----\n")
        );
    }
    assert_eq!(cluster.duplicates(), "0");

    // `status` from any instance's host tells who syncs, and who is gone.
    let out = common::ldapsync()
        .arg("--config")
        .arg(cluster.config(0))
        .args(["status", "--json"])
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let lease = &json["connectors"][0]["lease"];
    assert_eq!(lease["token"], token, "{json}");
    let instances = json["instances"].as_array().unwrap();
    let by_pid = |pid: u32| {
        instances
            .iter()
            .find(|i| i["pid"] == pid)
            .unwrap_or_else(|| panic!("{json}"))
    };
    assert_eq!(by_pid(new_holder)["holds"][0], "example");
    assert_eq!(by_pid(new_holder)["alive"], true);
    assert_eq!(by_pid(holder)["alive"], false, "the killed instance is stale: {json}");
}

#[test]
fn a_paused_holder_writes_nothing_after_losing_its_lease() {
    let cluster = Cluster::start();
    let first = cluster.serve(0);
    let (holder, _) = wait_for_holder(&cluster, &[&first], Duration::from_secs(20));
    assert_eq!(holder, first.pid());
    assert!(eventually_within(Duration::from_secs(20), || cluster.local() == cluster.directory()));
    let second = cluster.serve(1);

    first.signal("STOP");
    let (taker, _) = wait_for_holder(&cluster, &[&second], TTL * 3);
    assert_eq!(taker, second.pid());
    // The new holder syncs a change; then the old one wakes up.
    let ldif = "dn: uid=alice,ou=people,dc=example,dc=com\nchangetype: modify\nreplace: description\ndescription: after the pause\n\n";
    assert_eq!(ldapmodify(&second.url, ldif.to_owned()).join().unwrap(), 1);
    assert!(eventually_within(Duration::from_secs(20), || {
        cluster.local().get("alice").map(String::as_str) == Some("after the pause")
    }));
    let journal_before = cluster.postgres.sql("SELECT count(*) FROM journal");
    first.signal("CONT");
    std::thread::sleep(TTL);
    assert_eq!(
        cluster.holder().map(|h| h.0),
        Some(second.pid()),
        "the woken instance does not take the lease back"
    );
    assert_eq!(
        cluster.local().get("alice").map(String::as_str),
        Some("after the pause")
    );
    let journal_after = cluster.postgres.sql("SELECT count(*) FROM journal");
    assert_eq!(journal_before, journal_after, "the woken holder journaled nothing");
    let (_, log) = first.terminate();
    assert!(
        log.contains("stops syncing it"),
        "the woken holder knows it lost the lease: {log}"
    );
}

/// Fencing itself, on the store: once another instance holds the lease,
/// a write under the old token fails and leaves nothing, even from an
/// instance that never noticed it lost the lease.
/// A sync decision that creates the local account `name`, journaled.
fn created_locally(name: &str) -> ldapsync::store::Commit {
    use ldapsync::model::{Action, Category, ChangeSource};
    use ldapsync::store::{Commit, JournalEntry, LocalObject};
    Commit {
        object: Some(LocalObject {
            id: 0,
            category: Category::Account,
            name: name.into(),
            enabled: true,
            values: Default::default(),
        }),
        journal: vec![JournalEntry {
            at: 0,
            connector: "example".into(),
            category: Category::Account,
            object: name.into(),
            source: ChangeSource::Poll,
            action: Action::CreatedLocal,
            policy: "ldap-to-local".into(),
            detail: "{}".into(),
        }],
        ..Commit::default()
    }
}

/// What a full pass commits for an entry it imports: the object, its
/// association with `entry-NAME`, the journal line.
fn created(name: &str) -> ldapsync::store::Commit {
    ldapsync::store::Commit {
        association: Some(ldapsync::store::Association {
            connector: "example".into(),
            object_id: 0,
            entry_id: format!("entry-{name}"),
            dn: format!("uid={name},ou=people,dc=example,dc=com"),
            baseline: Default::default(),
            synced_at: 0,
            entry_gone: false,
        }),
        ..created_locally(name)
    }
}

/// `[store]` on `postgres`.
fn on(postgres: &Postgres) -> ldapsync::config::StoreConfig {
    ldapsync::config::StoreConfig {
        url: Some(postgres.url()),
        ..Default::default()
    }
}

#[test]
fn a_write_under_a_lost_lease_is_refused_by_the_store() {
    use ldapsync::model::Category;
    use ldapsync::store::{self, Store, StoreError};

    let postgres = Postgres::start();
    let config = on(&postgres);
    let commit = created_locally;
    let mut old = store::open(&config).unwrap();
    let mut new = store::open(&config).unwrap();
    let lease = |s: &store::AnyStore, holder: &str, ttl: Duration| {
        s.shared().unwrap().acquire_lease("example", holder, ttl).unwrap()
    };
    let fence = lease(&old, "old", Duration::from_secs(1)).expect("a free lease is taken");
    assert!(lease(&new, "new", TTL).is_none(), "a held lease is not");
    old.set_fence(Some(fence)).unwrap();
    old.commit(commit("before")).unwrap();

    std::thread::sleep(Duration::from_millis(1200));
    let taken = lease(&new, "new", TTL).expect("an expired lease is taken over");
    new.set_fence(Some(taken)).unwrap();
    assert!(matches!(old.commit(commit("after")), Err(StoreError::LeaseLost { .. })));
    new.commit(commit("by-new")).unwrap();
    let names: Vec<String> = new
        .objects(Category::Account)
        .unwrap()
        .into_iter()
        .map(|o| o.name)
        .collect();
    assert_eq!(names, ["before", "by-new"]);
    assert_eq!(postgres.sql("SELECT count(*) FROM journal WHERE object = 'after'"), "0");
}

/// An instance that lost a capture records it while the holder runs a full
/// comparison: the comparison clears only the reason it read when it
/// started, so the newer one stands for the next comparison. On both stores.
#[test]
fn a_full_comparison_clears_only_the_out_of_sync_reason_it_started_with() {
    use ldapsync::config::StoreConfig;
    use ldapsync::store::{self, ConnectorState, Store};

    let postgres = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let configs = [
        StoreConfig {
            path: dir.path().join("ldapsync.db"),
            ..StoreConfig::default()
        },
        on(&postgres),
    ];
    for config in &configs {
        let mut holder = store::open(config).unwrap();
        let mut other = store::open(config).unwrap();
        holder
            .mark_out_of_sync("example", "a capture was lost at 10:00")
            .unwrap();
        let mut state = holder.connector_state("example").unwrap().expect("a state");
        let read = state.out_of_sync.take();
        assert_eq!(read.as_deref(), Some("a capture was lost at 10:00"));
        // Meanwhile, from another instance:
        other
            .mark_out_of_sync("example", "a capture was lost at 10:01")
            .unwrap();
        holder.finish_poll(&state, &[], read.as_deref()).unwrap();
        let stands = other.connector_state("example").unwrap().and_then(|s| s.out_of_sync);
        assert_eq!(stands.as_deref(), Some("a capture was lost at 10:01"), "{config:?}");

        let mut state: ConnectorState = holder.connector_state("example").unwrap().expect("a state");
        let read = state.out_of_sync.take();
        holder.finish_poll(&state, &[], read.as_deref()).unwrap();
        let left = other.connector_state("example").unwrap().and_then(|s| s.out_of_sync);
        assert_eq!(left, None, "the reason it read is cleared: {config:?}");
    }
}

/// A full pass on PostgreSQL looks its entries up ahead and sends the
/// objects it creates together (`Store::look_ahead`): what it created is
/// read back inside the batch, and when one of them can no longer be
/// written (another session took the name meanwhile), the decisions before
/// it stand, with their associations and journal lines, and its own error
/// is the one told.
#[test]
fn a_pass_creations_sent_together_are_read_back_and_one_that_fails_spoils_no_other() {
    use ldapsync::model::Category;
    use ldapsync::store::{self, Store, StoreError};

    let postgres = Postgres::start();
    let config = on(&postgres);
    let mut pass = store::open(&config).unwrap();
    let mut other = store::open(&config).unwrap();
    let names = ["alice", "bob", "carol"];
    let keys: Vec<(String, Option<String>)> = names
        .iter()
        .map(|n| (format!("entry-{n}"), Some(n.to_string())))
        .collect();

    pass.begin_batch();
    pass.look_ahead("example", Category::Account, &keys).unwrap();
    let alice = pass
        .commit(created("alice"))
        .unwrap()
        .expect("an id for the new object");
    assert_eq!(
        pass.object(Category::Account, "alice").unwrap().map(|o| o.id),
        Some(alice)
    );
    let association = pass.association_by_entry("example", "entry-alice").unwrap();
    assert_eq!(association.map(|a| a.object_id), Some(alice));
    // Not sent yet: another session does not see it, and takes a name the
    // look-ahead found free.
    assert!(other.object(Category::Account, "alice").unwrap().is_none());
    other.commit(created_locally("carol")).unwrap();
    pass.commit(created("bob")).unwrap();
    pass.commit(created("carol")).unwrap();
    let ended = pass.end_batch();
    assert!(
        matches!(&ended, Err(StoreError::Exists { name, .. }) if name == "carol"),
        "the creation that cannot be written is the error told: {ended:?}"
    );

    for name in ["alice", "bob"] {
        let object = other
            .object(Category::Account, name)
            .unwrap()
            .expect("a decision before it stands");
        let association = other.association_by_entry("example", &format!("entry-{name}")).unwrap();
        assert_eq!(
            association.map(|a| a.object_id),
            Some(object.id),
            "{name}'s association"
        );
    }
    assert_eq!(postgres.sql("SELECT count(*) FROM objects WHERE name = 'carol'"), "1");
    assert!(other.association_by_entry("example", "entry-carol").unwrap().is_none());
    assert_eq!(
        postgres.sql("SELECT string_agg(object, ',' ORDER BY id) FROM journal"),
        "carol,alice,bob",
        "one journal line per decision that stands, in order"
    );
}

/// A first import defers most creations without a round trip to the
/// store's connection thread; they still count towards the batch, so the
/// pass commits every 500 decisions (another session sees them before the
/// pass ends), and ids stay unique across the sequence blocks it takes.
#[test]
fn a_first_import_commits_its_creations_a_batch_at_a_time() {
    use ldapsync::model::Category;
    use ldapsync::store::{self, Store};

    let postgres = Postgres::start();
    let config = on(&postgres);
    let mut pass = store::open(&config).unwrap();
    let other = store::open(&config).unwrap();
    let names: Vec<String> = (0..1200).map(|i| format!("user{i:04}")).collect();
    let keys: Vec<(String, Option<String>)> = names.iter().map(|n| (format!("entry-{n}"), Some(n.clone()))).collect();

    pass.begin_batch();
    pass.look_ahead("example", Category::Account, &keys).unwrap();
    let mut ids = Vec::new();
    for name in &names[..600] {
        ids.push(pass.commit(created(name)).unwrap().expect("an id"));
    }
    let seen = other.associations(Some("example")).unwrap().len();
    assert!(
        (500..600).contains(&seen),
        "a batch is committed every 500 decisions: another session sees {seen} of 600"
    );
    for name in &names[600..] {
        ids.push(pass.commit(created(name)).unwrap().expect("an id"));
    }
    pass.end_batch().unwrap();

    let unique: std::collections::BTreeSet<i64> = ids.iter().copied().collect();
    assert_eq!(unique.len(), names.len(), "every creation has an id of its own");
    for (name, id) in names.iter().zip(&ids) {
        let association = other.association_by_entry("example", &format!("entry-{name}")).unwrap();
        assert_eq!(association.map(|a| a.object_id), Some(*id), "{name}'s association");
    }
    assert_eq!(postgres.sql("SELECT count(*) FROM objects"), "1200");
    assert_eq!(
        postgres.sql("SELECT count(*) FROM journal j JOIN objects o ON o.name = j.object"),
        "1200",
        "one journal line per creation"
    );
    assert_eq!(
        postgres.sql("SELECT count(*) FROM changes c JOIN journal j ON j.id = c.journal_id AND j.object = c.new_name"),
        "1200",
        "each creation's change named by its own object's journal line, 500 lines a statement"
    );
    assert_eq!(
        postgres.sql(
            "SELECT bool_and(reltuples > 500) FROM pg_class WHERE relname IN ('objects', 'associations', 'changes')"
        ),
        "t",
        "the tables a batch fills are analysed once its writes have doubled"
    );
}

/// The relay never waits for the store: with PostgreSQL restarted in the
/// middle of a client's writes, every write succeeds, and afterwards the
/// store catches up (captures applied, or a reconciliation).
#[test]
fn postgresql_restarted_under_load_costs_clients_nothing_and_loses_nothing() {
    let mut cluster = Cluster::start();
    let a = cluster.serve(0);
    let b = cluster.serve(1);
    wait_for_holder(&cluster, &[&a, &b], Duration::from_secs(20));
    assert!(eventually_within(Duration::from_secs(20), || cluster.local() == cluster.directory()));

    let clients = [ldapmodify(&a.url, writes(0, 600)), ldapmodify(&b.url, writes(1, 600))];
    std::thread::sleep(Duration::from_millis(300));
    cluster.postgres.restart();
    let done: Vec<usize> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    assert_eq!(
        done,
        [600, 600],
        "every client write succeeded while the store restarted"
    );
    assert!(
        eventually_within(Duration::from_secs(60), || cluster.local() == cluster.directory()),
        "the store catches up: {} local, {} in the directory",
        cluster.local().len(),
        cluster.directory().len()
    );
    assert_eq!(cluster.duplicates(), "0");
}

/// An installation moves from the embedded store to PostgreSQL and back:
/// 10,000 people with their associations and journal, identical at the
/// end as the CLI shows them, and a copy into a store that is not empty
/// is refused.
#[test]
fn store_copy_round_trips_sqlite_postgresql_sqlite() {
    let slapd = Slapd::start_with_bulk(10_000);
    let postgres = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("service.secret");
    std::fs::write(&secret, format!("{ROOT_PW}\n")).unwrap();
    let config_with = |store: &str, name: &str| {
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!(
                "[proxy]\nupstream = [\"{}\"]\n{store}\n[[connector]]\nname = \"example\"\nbind_dn = \"{ROOT_DN}\"\n\
                 password_file = \"{}\"\ndirection = \"ldap-to-local\"\n[connector.accounts]\nbase = \"dc=example,dc=com\"\n\
                 naming = \"uid\"\nfilter = \"(objectClass=inetOrgPerson)\"\nmap = {{ mail = \"mail\" }}\n",
                slapd.url(),
                secret.display()
            ),
        )
        .unwrap();
        path
    };
    let sqlite = |n: &str| dir.path().join(format!("{n}.db"));
    let first = config_with(&format!("[store]\npath = \"{}\"", sqlite("first").display()), "first");
    let back = config_with(&format!("[store]\npath = \"{}\"", sqlite("back").display()), "back");
    let run = |config: &std::path::Path, args: &[&str]| {
        let out = common::ldapsync()
            .arg("--config")
            .arg(config)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run(&first, &["sync", "run", "--connector", "example", "--full"]);
    let seen = |config: &std::path::Path| {
        [
            run(config, &["account", "list", "--json"]),
            run(config, &["association", "list", "--json"]),
            run(config, &["journal", "--limit", "0", "--json"]),
        ]
    };
    let original = seen(&first);
    assert!(
        original[0].matches("\"name\"").count() >= 10_000,
        "10,000 people imported"
    );

    let from_sqlite = format!("sqlite:{}", sqlite("first").display());
    run(
        &first,
        &["store", "copy", "--from", &from_sqlite, "--to", &postgres.url()],
    );
    let on_postgres = config_with(&format!("[store]\nurl = \"{}\"", postgres.url()), "pg");
    assert_eq!(seen(&on_postgres), original, "PostgreSQL holds what SQLite held");
    let to_back = format!("sqlite:{}", sqlite("back").display());
    let report = run(&first, &["store", "copy", "--from", &postgres.url(), "--to", &to_back]);
    assert!(report.contains("copied and verified"), "{report}");
    assert_eq!(seen(&back), original, "and back");

    let again = common::ldapsync()
        .arg("--config")
        .arg(&first)
        .args(["store", "copy", "--from", &from_sqlite, "--to", &postgres.url()])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("not empty"));
    // The copy goes on where the original would: new objects get new ids.
    run(&on_postgres, &["account", "add", "newcomer"]);
    assert!(run(&on_postgres, &["account", "list"]).lines().any(|l| l == "newcomer"));
    // The change feed starts empty in the copy, and records what follows.
    assert_eq!(
        postgres.sql(
            "SELECT string_agg(c.new_name || ' ' || j.action, ',') FROM changes c JOIN journal j ON j.id = c.journal_id"
        ),
        "newcomer local-add"
    );
    assert_eq!(postgres.sql("SELECT count(*) FROM changes"), "1");
}

/// `[store.tls]`: the store is reached over TLS, verified against the
/// configured CA; a server that takes TLS only refuses a plain
/// connection, and a certificate from another CA is refused.
#[test]
fn the_store_is_reached_over_tls_verified_against_its_ca() {
    use ldapsync::config::{ClientTlsConfig, StoreConfig};
    use ldapsync::model::Category;
    use ldapsync::store::{self, Store};

    let pki = ldapsync_fixtures::Pki::new("postgres");
    let postgres = Postgres::start_with_tls(&pki);
    let with_ca = |ca: Option<std::path::PathBuf>| StoreConfig {
        url: Some(postgres.url()),
        tls: ca.map(|ca| ClientTlsConfig {
            ca: Some(ca),
            ..ClientTlsConfig::default()
        }),
        ..StoreConfig::default()
    };
    let plain = store::open(&with_ca(None))
        .err()
        .expect("a plain connection is refused");
    assert!(plain.to_string().contains("cannot connect to the store"), "{plain}");
    let store = store::open(&with_ca(Some(pki.ca.clone()))).expect("TLS with the right CA");
    assert!(store.objects(Category::Account).unwrap().is_empty());
    let other = ldapsync_fixtures::Pki::new("elsewhere");
    let refused = store::open(&with_ca(Some(other.ca.clone())))
        .err()
        .expect("another CA is refused");
    assert!(refused.to_string().contains("cannot connect to the store"), "{refused}");
    let encrypted = postgres.sql(
        "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
         WHERE s.ssl AND a.application_name = 'ldapsync'",
    );
    assert_eq!(encrypted, "1", "ldapsync's open connection is encrypted");
    drop(store);
}

/// An instance whose store is down starts anyway and relays; its
/// connector is synced once PostgreSQL is back.
#[test]
fn an_instance_starts_and_relays_while_postgresql_is_down() {
    let mut cluster = Cluster::start();
    cluster.postgres.kill();
    let instance = cluster.serve(0);
    let whoami = Command::new("ldapwhoami")
        .args(["-x", "-H", &instance.url, "-D", ROOT_DN, "-w", ROOT_PW])
        .output()
        .unwrap();
    assert!(whoami.status.success(), "{}", String::from_utf8_lossy(&whoami.stderr));
    cluster.postgres.restart();
    wait_for_holder(&cluster, &[&instance], Duration::from_secs(30));
    assert!(eventually_within(Duration::from_secs(30), || cluster.local() == cluster.directory()));
}

#[test]
fn the_change_feed_never_skips_a_change_whose_transaction_commits_late() {
    use ldapsync::store::{self, AdminStore, Cursor, Store};

    let postgres = Postgres::start();
    let config = on(&postgres);
    let mut early = store::open(&config).unwrap();
    let mut late = store::open(&config).unwrap();
    let reader = store::open(&config).unwrap();
    let names = |after: Cursor| -> Vec<String> {
        let changes = reader.changes(after, 100).unwrap();
        changes.into_iter().map(|c| c.new.unwrap().name).collect()
    };
    // A batch holds its transaction open: its change has the older
    // transaction id, and commits after the other.
    early.begin_batch();
    early.commit(created_locally("early")).unwrap();
    late.commit(created_locally("late")).unwrap();
    // "late" is committed, but a reader that took it now could be overtaken
    // by "early": it is held back while the older transaction runs.
    assert_eq!(names(Cursor::default()), Vec::<String>::new());
    early.end_batch().unwrap();
    assert_eq!(
        names(Cursor::default()),
        ["early", "late"],
        "both, in transaction order"
    );
    let first = reader.changes(Cursor::default(), 1).unwrap()[0].cursor;
    assert_eq!(names(first), ["late"], "resumed after the first");
    let journaled = reader.changes(Cursor::default(), 1).unwrap().remove(0);
    assert_eq!(
        (journaled.connector.as_str(), journaled.action.map(|a| a.to_string())),
        ("example", Some("created-local".to_string())),
        "named by the journal line of its transaction"
    );
}
