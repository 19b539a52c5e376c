//! The sync core end to end, as an operator drives it: `ldapsync` commands
//! against a real slapd, with the directory checked by OpenLDAP's own
//! clients and the local store by the CLI.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use common::{eventually, serve};
use ldapsync_fixtures::{ROOT_DN, ROOT_PW, Slapd};

struct Env {
    slapd: Slapd,
    dir: tempfile::TempDir,
    store: common::TestStore,
}

/// Connector settings a test varies.
struct Policy<'a> {
    direction: &'a str,
    conflict: &'a str,
    delete: &'a str,
}

const BOTH_LDAP_WINS: Policy = Policy {
    direction: "both",
    conflict: "ldap-wins",
    delete: "ignore",
};

const LDAP_TO_LOCAL: Policy = Policy {
    direction: "ldap-to-local",
    conflict: "ldap-wins",
    delete: "ignore",
};

impl Env {
    fn start(policy: Policy) -> Env {
        let env = Env {
            slapd: Slapd::start(),
            dir: tempfile::tempdir().unwrap(),
            store: common::TestStore::start(),
        };
        env.configure(policy);
        env
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("ldapsync.toml")
    }

    fn configure(&self, policy: Policy) {
        let secret = self.dir.path().join("service.secret");
        std::fs::write(&secret, format!("{ROOT_PW}\n")).unwrap();
        let config = format!(
            r#"
[proxy]
upstream = ["{url}"]

{store}
[[connector]]
name = "example"
bind_dn = "{ROOT_DN}"
password_file = "{secret}"
direction = "{direction}"
conflict = "{conflict}"
merge_fallback = "ldap-wins"
delete = "{delete}"

[connector.accounts]
base = "ou=people,dc=example,dc=com"
filter = "(objectClass=inetOrgPerson)"
naming = "uid"
object_classes = ["inetOrgPerson"]
defaults = {{ sn = "{{name}}", cn = "{{name}}" }}
map = {{ cn = "display_name", mail = "mail", description = "description" }}

[connector.groups]
base = "ou=groups,dc=example,dc=com"
filter = "(objectClass=groupOfNames)"
naming = "cn"
membership = "member"
object_classes = ["groupOfNames"]
map = {{ description = "description" }}
"#,
            url = self.slapd.url(),
            store = self.store.toml(self.dir.path()),
            secret = secret.display(),
            direction = policy.direction,
            conflict = policy.conflict,
            delete = policy.delete,
        );
        std::fs::write(self.config_path(), config).unwrap();
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_ldapsync"))
            .arg("--config")
            .arg(self.config_path())
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs a command that must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "ldapsync {args:?} failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    }

    /// Runs a command that must end with exit code `code`; returns its stdout.
    fn exits(&self, code: i32, args: &[&str]) -> String {
        let out = self.run(args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(
            out.status.code(),
            Some(code),
            "ldapsync {args:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    }

    /// A command that ran but left something for an operator (exit 3).
    fn attention(&self, args: &[&str]) -> String {
        self.exits(3, args)
    }

    /// `status` while no instance runs (exit 4, or 3 would mean degraded
    /// too; tests that check health say which).
    fn status(&self) -> String {
        let out = self.run(&["status"]);
        assert!(matches!(out.status.code(), Some(0 | 3 | 4)), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn sync(&self) -> String {
        self.ok(&["sync", "run", "--connector", "example"])
    }

    /// Runs `ldapsync serve` with this config and waits for its first pass.
    fn serve(&self) -> common::Served {
        let config = self.config_path();
        let served = serve(&["--config", config.to_str().unwrap(), "--listen", "ldap://127.0.0.1:0"]);
        assert!(
            eventually(|| self.local_accounts().len() >= 6),
            "the pass at start imports the directory"
        );
        served
    }

    /// Sets the connector's poll interval, e.g. "1s".
    fn poll_every(&self, interval: &str) {
        self.connector_option(&format!("poll_interval = \"{interval}\""));
    }

    /// Adds a `key = value` line to the connector's section.
    fn connector_option(&self, line: &str) {
        let config = std::fs::read_to_string(self.config_path()).unwrap();
        let config = config.replace("\ndelete = ", &format!("\n{line}\ndelete = "));
        std::fs::write(self.config_path(), config).unwrap();
    }

    /// The local store's journal length, for "nothing more happened".
    fn journal_lines(&self) -> usize {
        self.journal().lines().count()
    }

    /// Applies LDIF to the directory directly, as the rootdn.
    fn ldapmodify(&self, ldif: &str) {
        ldapmodify_at(&self.slapd.url(), ldif);
    }

    /// Values of `attr` on the entry at `dn`, read directly from slapd, sorted
    /// (attribute values are a set).
    fn ldap_values(&self, dn: &str, attr: &str) -> Vec<String> {
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
            .args(["-s", "base", "-b", dn, attr])
            .output()
            .unwrap();
        let prefix = format!("{attr}: ");
        let mut values: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix(&prefix).map(str::to_owned))
            .collect();
        values.sort();
        values
    }

    /// The uids of every account entry in scope, read directly from slapd.
    fn directory_uids(&self) -> Vec<String> {
        let out = Command::new("ldapsearch")
            .args(["-x", "-LLL", "-H", &self.slapd.url(), "-D", ROOT_DN, "-w", ROOT_PW])
            .args([
                "-b",
                "ou=people,dc=example,dc=com",
                "(objectClass=inetOrgPerson)",
                "uid",
            ])
            .output()
            .unwrap();
        let mut uids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("uid: ").map(str::to_owned))
            .collect();
        uids.sort();
        uids
    }

    fn local_accounts(&self) -> Vec<String> {
        let mut names: Vec<String> = self.ok(&["account", "list"]).lines().map(str::to_owned).collect();
        names.sort();
        names
    }

    /// A field's values as `account show` prints them (a line per value),
    /// joined with ", ".
    fn local_field(&self, category: &str, name: &str, field: &str) -> Option<String> {
        let prefix = format!("  {field}: ");
        let values: Vec<String> = self
            .ok(&[category, "show", name])
            .lines()
            .filter_map(|l| l.strip_prefix(&prefix).map(str::to_owned))
            .collect();
        (!values.is_empty()).then(|| values.join(", "))
    }

    fn journal(&self) -> String {
        self.ok(&["journal", "--limit", "0"])
    }
}

/// Applies LDIF as the rootdn at `url` (slapd, or ldapsync in front of it).
fn ldapmodify_at(url: &str, ldif: &str) {
    let mut child = Command::new("ldapmodify")
        .args(["-x", "-H", url, "-D", ROOT_DN, "-w", ROOT_PW])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(ldif.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success(), "ldapmodify failed for:\n{ldif}");
}

const ALICE: &str = "uid=alice,ou=people,dc=example,dc=com";

fn set_mail(dn: &str, mail: &str) -> String {
    format!("dn: {dn}\nchangetype: modify\nreplace: mail\nmail: {mail}\n")
}

#[test]
fn first_sync_imports_and_associates_by_entry_uuid() {
    let env = Env::start(LDAP_TO_LOCAL);
    let report = env.sync();
    assert!(
        report.contains("8 created locally"),
        "6 accounts and 2 groups: {report}"
    );
    assert_eq!(env.ok(&["account", "list"]).lines().count(), 6);
    assert_eq!(
        env.local_field("account", "alice", "mail").as_deref(),
        Some("alice@example.com")
    );
    assert_eq!(
        env.local_field("account", "alice", "display_name").as_deref(),
        Some("Alice Anderson")
    );
    // Groups: members are local account names, not DNs.
    assert_eq!(
        env.local_field("group", "staff", "members").as_deref(),
        Some("alice, bob, carol")
    );
    assert_eq!(
        env.ok(&["group", "list"]).trim(),
        "admins\nstaff",
        "the posixGroup is outside the filter"
    );

    let uuid = env.ldap_values(ALICE, "entryUUID").remove(0);
    let associations = env.ok(&["association", "list"]);
    assert!(
        associations.contains(&format!("account alice\t{uuid}\t{ALICE}")),
        "{associations}"
    );

    // A second pass finds nothing to do and writes nothing.
    let journal_before = env.journal();
    let again = env.sync();
    assert!(
        again.contains("0 associated, 0 created locally, 0 created in the directory, 0 updated"),
        "{again}"
    );
    assert_eq!(env.journal(), journal_before, "an idle pass journals nothing");
}

#[test]
fn moved_entry_keeps_its_association_and_a_new_entry_at_the_old_dn_does_not_steal_it() {
    let env = Env::start(LDAP_TO_LOCAL);
    env.sync();
    let uuid = env.ldap_values(ALICE, "entryUUID").remove(0);
    env.ldapmodify(
        "dn: ou=moved,ou=people,dc=example,dc=com\nchangetype: add\nobjectClass: organizationalUnit\nou: moved\n\n\
         dn: uid=alice,ou=people,dc=example,dc=com\nchangetype: modrdn\nnewrdn: uid=alice\ndeleteoldrdn: 1\n\
         newsuperior: ou=moved,ou=people,dc=example,dc=com\n\n\
         dn: uid=alice,ou=people,dc=example,dc=com\nchangetype: add\nobjectClass: inetOrgPerson\nuid: alice\n\
         cn: Impostor\nsn: Impostor\nmail: impostor@example.com\n",
    );
    let report = env.attention(&["sync", "run", "--connector", "example"]);
    assert!(
        report.contains(
            "disputed account entry uid=alice,ou=people,dc=example,dc=com: its uid=alice names account alice, \
             which is associated with uid=alice,ou=moved,ou=people,dc=example,dc=com"
        ),
        "{report}"
    );
    let moved = "uid=alice,ou=moved,ou=people,dc=example,dc=com";
    let associations = env.ok(&["association", "list"]);
    assert!(
        associations.contains(&format!("account alice\t{uuid}\t{moved}")),
        "{associations}"
    );
    assert_eq!(
        env.local_field("account", "alice", "mail").as_deref(),
        Some("alice@example.com"),
        "the impostor's values are not taken"
    );
    assert!(env.journal().contains("disputed"));

    // A rename in the directory renames the associated local account.
    env.ldapmodify(
        "dn: uid=bob,ou=people,dc=example,dc=com\nchangetype: modrdn\nnewrdn: uid=robert\ndeleteoldrdn: 1\n",
    );
    // A full comparison: the group itself did not change, only what its
    // member DNs now name. The impostor is still disputed.
    env.attention(&["sync", "run", "--connector", "example", "--full"]);
    assert!(env.ok(&["account", "list"]).lines().any(|l| l == "robert"));
    assert!(!env.ok(&["account", "list"]).lines().any(|l| l == "bob"));
    // Without the refint overlay the group still names the old DNs: one is
    // now the impostor's, one is gone. Neither is an associated account, so
    // they stay DNs rather than being guessed into names.
    assert_eq!(
        env.local_field("group", "staff", "members").as_deref(),
        Some("carol, uid=alice,ou=people,dc=example,dc=com, uid=bob,ou=people,dc=example,dc=com")
    );
}

#[test]
fn ldap_to_local_puts_local_edits_back_and_brings_directory_edits_in() {
    let env = Env::start(LDAP_TO_LOCAL);
    env.sync();
    env.ok(&["account", "set", "alice", "--set", "mail=alice@local.example"]);
    env.ldapmodify(&set_mail(
        "uid=bob,ou=people,dc=example,dc=com",
        "bob@directory.example",
    ));
    let report = env.sync();
    assert!(report.contains("overwritten account alice"), "{report}");
    assert_eq!(
        env.local_field("account", "alice", "mail").as_deref(),
        Some("alice@example.com")
    );
    assert_eq!(
        env.ldap_values(ALICE, "mail"),
        ["alice@example.com"],
        "the directory is not written"
    );
    assert_eq!(
        env.local_field("account", "bob", "mail").as_deref(),
        Some("bob@directory.example")
    );
    assert!(env.journal().contains("overwritten"));
}

#[test]
fn local_to_ldap_writes_local_changes_and_creates_entries() {
    let env = Env::start(Policy {
        direction: "local-to-ldap",
        conflict: "local-wins",
        delete: "ignore",
    });
    env.ok(&[
        "account",
        "add",
        "alice",
        "--set",
        "mail=alice@local.example",
        "--set",
        "display_name=Alice A.",
    ]);
    env.ok(&[
        "account",
        "add",
        "zoe",
        "--set",
        "mail=zoe@example.com",
        "--set",
        "display_name=Zoe Z.",
    ]);
    let report = env.sync();
    assert!(report.contains("associate account alice"), "{report}");
    assert!(report.contains("1 created in the directory"), "{report}");
    assert_eq!(
        env.ldap_values(ALICE, "mail"),
        ["alice@local.example"],
        "local values win on first sync"
    );
    assert_eq!(
        env.ldap_values("uid=zoe,ou=people,dc=example,dc=com", "mail"),
        ["zoe@example.com"]
    );
    assert!(
        env.ok(&["account", "list"]).lines().all(|l| l == "alice" || l == "zoe"),
        "nothing is imported"
    );

    env.ldapmodify(&set_mail(ALICE, "alice@directory.example"));
    env.sync();
    assert_eq!(
        env.ldap_values(ALICE, "mail"),
        ["alice@local.example"],
        "directory edits are overwritten"
    );
    assert!(env.journal().contains("overwritten"));
}

#[test]
fn both_directions_resolve_a_conflict_by_policy() {
    // (policy, local mail afterwards, directory mail afterwards, directory description afterwards)
    let cases = [
        ("local-wins", "alice@local.example", "alice@local.example", None),
        (
            "ldap-wins",
            "alice@directory.example",
            "alice@directory.example",
            Some("from the directory"),
        ),
        ("no-change", "alice@example.com", "alice@example.com", None),
        // merge: different fields both kept; mail changed on both sides falls back to ldap-wins.
        (
            "merge",
            "alice@directory.example",
            "alice@directory.example",
            Some("from the directory"),
        ),
    ];
    for (conflict, local_mail, ldap_mail, description) in cases {
        let env = Env::start(Policy {
            direction: "both",
            conflict,
            delete: "ignore",
        });
        env.sync();
        env.ok(&["account", "set", "alice", "--set", "mail=alice@local.example"]);
        env.ldapmodify(&format!(
            "{}-\nreplace: description\ndescription: from the directory\n",
            set_mail(ALICE, "alice@directory.example")
        ));
        let report = env.sync();
        assert!(report.contains("1 conflicts"), "{conflict}: {report}");
        assert_eq!(
            env.local_field("account", "alice", "mail").as_deref(),
            Some(local_mail),
            "{conflict}: local"
        );
        assert_eq!(env.ldap_values(ALICE, "mail"), [ldap_mail], "{conflict}: directory");
        let expected: Vec<String> = description.iter().map(|d| d.to_string()).collect();
        assert_eq!(
            env.ldap_values(ALICE, "description"),
            expected,
            "{conflict}: directory description"
        );
        assert_eq!(
            env.local_field("account", "alice", "description"),
            description.map(str::to_owned),
            "{conflict}: local description"
        );
        assert!(env.journal().contains("conflict-resolved"), "{conflict}");
        // Settled: the next pass changes nothing on either side.
        let again = env.sync();
        assert!(
            again.contains("0 updated, 0 converged, 0 conflicts"),
            "{conflict}: {again}"
        );
    }
}

#[test]
fn one_sided_changes_flow_both_ways() {
    let env = Env::start(Policy {
        direction: "both",
        conflict: "no-change",
        delete: "ignore",
    });
    env.sync();
    env.ok(&["account", "set", "alice", "--set", "description=local note"]);
    env.ok(&["group", "set", "admins", "--add", "members=bob"]);
    env.ldapmodify(&set_mail(
        "uid=bob,ou=people,dc=example,dc=com",
        "bob@directory.example",
    ));
    let report = env.sync();
    assert!(report.contains("0 conflicts"), "{report}");
    assert_eq!(env.ldap_values(ALICE, "description"), ["local note"]);
    assert_eq!(
        env.ldap_values("cn=admins,ou=groups,dc=example,dc=com", "member"),
        [
            "uid=alice,ou=people,dc=example,dc=com",
            "uid=bob,ou=people,dc=example,dc=com"
        ],
        "local member names become DNs"
    );
    assert_eq!(
        env.local_field("account", "bob", "mail").as_deref(),
        Some("bob@directory.example")
    );
}

#[test]
fn mass_delete_guard_refuses_until_confirmed() {
    let env = Env::start(Policy {
        direction: "ldap-to-local",
        conflict: "ldap-wins",
        delete: "delete",
    });
    env.sync();
    env.ldapmodify(
        "dn: uid=erin,ou=people,dc=example,dc=com\nchangetype: delete\n\n\
         dn: uid=frank,ou=people,dc=example,dc=com\nchangetype: delete\n",
    );
    let pass = ["sync", "run", "--connector", "example"];
    let report = env.attention(&pass);
    assert!(report.contains("2 deletes refused, 2 deletes held"), "{report}");
    assert!(
        report.contains("this pass would delete 2 of 6 associated accounts"),
        "{report}"
    );
    assert!(report.contains("--confirm-deletes"), "{report}");
    assert_eq!(
        env.ok(&["account", "list"]).lines().count(),
        6,
        "nothing deleted past the guard"
    );
    assert!(env.journal().contains("delete-refused"));

    // The next incremental pass has no delete to see (its watermark moved
    // on), yet the refusal stands and is reported until confirmed.
    let again = env.attention(&pass);
    assert!(again.starts_with("incremental poll"), "{again}");
    assert!(again.contains("0 deletes refused, 2 deletes held"), "{again}");
    assert!(
        again.contains("held: 2 deletes refused by the mass-delete guard (account erin, account frank)"),
        "{again}"
    );
    let status = env.exits(4, &["status"]).replace('\n', " ");
    assert!(status.contains("health: degraded"), "{status}");
    assert!(
        status.contains("DELETES HELD: 2") && status.contains("account erin") && status.contains("account frank"),
        "{status}"
    );

    let confirmed = env.ok(&["sync", "run", "--connector", "example", "--confirm-deletes"]);
    assert!(confirmed.contains("2 deleted"), "{confirmed}");
    assert!(confirmed.contains("0 deletes held"), "{confirmed}");
    let accounts = env.ok(&["account", "list"]);
    assert!(!accounts.contains("erin") && !accounts.contains("frank"), "{accounts}");
    assert!(env.ok(&pass).contains("0 deletes held"));
}

#[test]
fn a_held_delete_is_dropped_when_its_entry_comes_back() {
    let env = Env::start(Policy {
        direction: "ldap-to-local",
        conflict: "ldap-wins",
        delete: "disable",
    });
    env.sync();
    // Two entries moved out of scope by mistake (an OU moved, say)…
    let moves = |from: &str, to: &str| {
        ["erin", "frank"]
            .iter()
            .map(|uid| {
                format!(
                    "dn: uid={uid},{from}\nchangetype: modrdn\nnewrdn: uid={uid}\ndeleteoldrdn: 1\nnewsuperior: {to}\n"
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let people = "ou=people,dc=example,dc=com";
    let attic = "ou=attic,dc=example,dc=com";
    env.ldapmodify(&format!(
        "dn: {attic}\nchangetype: add\nobjectClass: organizationalUnit\nou: attic\n\n{}",
        moves(people, attic)
    ));
    let pass = ["sync", "run", "--connector", "example"];
    assert!(env.attention(&pass).contains("2 deletes held"));
    // …and moved back: the same entries, so nothing is left to delete.
    env.ldapmodify(&moves(attic, people));
    let report = env.ok(&["sync", "run", "--connector", "example", "--full"]);
    assert!(report.contains("0 deletes refused, 0 deletes held"), "{report}");
    assert!(env.ok(&pass).contains("0 deletes held"));
    assert_eq!(env.local_field("account", "erin", "enabled").as_deref(), Some("true"));
    assert!(env.exits(4, &["status"]).contains("health: ok"));
}

#[test]
fn disable_policy_marks_vanished_accounts_disabled() {
    let env = Env::start(Policy {
        direction: "ldap-to-local",
        conflict: "ldap-wins",
        delete: "disable",
    });
    env.sync();
    env.ldapmodify("dn: uid=frank,ou=people,dc=example,dc=com\nchangetype: delete\n");
    // One of six is over the default 10% guard.
    let report = env.ok(&["sync", "run", "--connector", "example", "--confirm-deletes"]);
    assert!(report.contains("1 disabled"), "{report}");
    assert_eq!(env.local_field("account", "frank", "enabled").as_deref(), Some("false"));
    let status = env.status();
    assert!(status.contains("out of sync (entry gone): 1"), "{status}");
}

#[test]
fn dry_run_changes_nothing() {
    let env = Env::start(LDAP_TO_LOCAL);
    let plan = env.ok(&["sync", "run", "--connector", "example", "--dry-run"]);
    assert!(plan.contains("dry run"), "{plan}");
    assert!(plan.contains("create local account alice from uid=alice"), "{plan}");
    assert!(plan.contains("8 created locally"), "{plan}");
    assert_eq!(env.ok(&["account", "list"]), "");
    assert_eq!(env.ok(&["association", "list"]), "");
    assert_eq!(env.journal(), "");
}

#[test]
fn association_remove_then_sync_matches_afresh() {
    let env = Env::start(LDAP_TO_LOCAL);
    env.sync();
    let uuid = env.ldap_values(ALICE, "entryUUID").remove(0);
    env.ok(&["association", "remove", "alice", "--connector", "example"]);
    assert!(!env.ok(&["association", "list"]).contains(&uuid));
    let shown = env.run(&["association", "show", "alice", "--connector", "example"]);
    assert!(!shown.status.success(), "no association left to show");
    let report = env.sync();
    assert!(report.contains("associate account alice"), "{report}");
    assert!(
        env.ok(&["association", "show", "alice", "--connector", "example"])
            .contains(&uuid)
    );
    let journal = env.journal();
    let removed = journal.find("association-removed").expect("removal journaled");
    assert!(journal[removed..].contains("associated"), "{journal}");
}

#[test]
fn status_reports_each_connector() {
    let env = Env::start(LDAP_TO_LOCAL);
    assert!(env.status().contains("last full reconciliation: never"));
    env.sync();
    env.ok(&["account", "set", "carol", "--set", "description=edited"]);
    let status = env.status();
    assert!(status.contains("associated: 8"), "6 accounts and 2 groups: {status}");
    assert!(status.contains("pending local changes: 1"), "{status}");
    assert!(status.contains("direction: ldap-to-local"), "{status}");
}

#[test]
fn unreadable_password_file_is_refused_before_anything_starts() {
    let env = Env::start(LDAP_TO_LOCAL);
    std::fs::remove_file(env.dir.path().join("service.secret")).unwrap();
    let out = env.run(&["sync", "run", "--connector", "example"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("password_file") && stderr.contains("service.secret"),
        "{stderr}"
    );
    assert!(
        !env.dir.path().join("ldapsync.db").exists(),
        "nothing was started or created"
    );
}

/// The per-object path the capture and the poller feed: one event, one
/// object decided exactly as a full pass would, and applied once.
#[tokio::test]
async fn change_events_sync_one_object_and_are_idempotent() {
    use ldapsync::config::Config;
    use ldapsync::directory::Directory;
    use ldapsync::model::{Category, Change, ChangeEvent, ChangeSource};
    use ldapsync::store;
    use ldapsync::sync::engine::apply_event;

    let env = Env::start(Policy {
        direction: "both",
        conflict: "ldap-wins",
        delete: "ignore",
    });
    env.sync();
    let config = Config::load(&env.config_path()).unwrap();
    let connector = config.connector("example").unwrap();
    let mut store = store::open(&config.store).unwrap();
    let password = connector.password().unwrap();
    let mut directory = Directory::connect(&connector, password.expose(), std::time::Duration::from_secs(5))
        .await
        .unwrap();
    let mut apply = async |source, change| {
        let event = ChangeEvent { source, change };
        apply_event(&mut store, &connector, &mut directory, &event)
            .await
            .unwrap()
    };

    // A directory write, as the proxy captures it.
    env.ldapmodify(&set_mail(ALICE, "alice@captured.example"));
    let alice = || Change::Entry {
        category: Category::Account,
        dn: ALICE.to_owned(),
    };
    let report = apply(ChangeSource::Proxy, alice()).await;
    assert_eq!(report.updated, 1, "{:?}", report.lines);
    assert_eq!(
        env.local_field("account", "alice", "mail").as_deref(),
        Some("alice@captured.example")
    );
    let journal = env.journal();
    assert!(
        journal.lines().last().unwrap().contains("\tproxy\tupdated"),
        "{journal}"
    );
    // Seen again (captured, then polled): nothing more happens.
    let again = apply(ChangeSource::Poll, alice()).await;
    assert_eq!((again.updated, again.lines.len()), (0, 0));
    assert_eq!(env.journal(), journal, "a duplicate event journals nothing");

    // A local edit and a new local account.
    env.ok(&["account", "set", "bob", "--set", "description=edited in the app"]);
    env.ok(&["account", "add", "zoe", "--set", "mail=zoe@example.com"]);
    for name in ["bob", "zoe"] {
        let change = Change::Local {
            category: Category::Account,
            name: name.to_owned(),
        };
        apply(ChangeSource::Local, change).await;
    }
    assert_eq!(
        env.ldap_values("uid=bob,ou=people,dc=example,dc=com", "description"),
        ["edited in the app"]
    );
    assert_eq!(
        env.ldap_values("uid=zoe,ou=people,dc=example,dc=com", "mail"),
        ["zoe@example.com"]
    );

    // A new directory entry is imported and associated.
    env.ldapmodify(
        "dn: uid=yan,ou=people,dc=example,dc=com\nchangetype: add\nobjectClass: inetOrgPerson\nuid: yan\ncn: Yan\nsn: Yan\n",
    );
    let report = apply(
        ChangeSource::Proxy,
        Change::Entry {
            category: Category::Account,
            dn: "uid=yan,ou=people,dc=example,dc=com".into(),
        },
    )
    .await;
    assert_eq!(report.created_local, 1);
    assert!(env.ok(&["association", "list"]).contains("account yan"));
}

#[test]
fn writes_through_the_proxy_reach_the_local_store_without_waiting_for_a_poll() {
    let env = Env::start(BOTH_LDAP_WINS);
    env.poll_every("1h");
    let served = env.serve();

    ldapmodify_at(&served.url, &set_mail(ALICE, "alice@via-proxy.example"));
    assert!(
        eventually(|| env.local_field("account", "alice", "mail").as_deref() == Some("alice@via-proxy.example")),
        "a captured modify reaches the local store"
    );
    ldapmodify_at(
        &served.url,
        "dn: uid=bob,ou=people,dc=example,dc=com\nchangetype: modrdn\nnewrdn: uid=robert\ndeleteoldrdn: 1\n",
    );
    assert!(
        eventually(|| env.ok(&["account", "list"]).lines().any(|l| l == "robert")),
        "a captured rename is followed to the new DN"
    );
    ldapmodify_at(
        &served.url,
        "dn: uid=yan,ou=people,dc=example,dc=com\nchangetype: add\nobjectClass: inetOrgPerson\nuid: yan\ncn: Yan\nsn: Yan\n",
    );
    assert!(
        eventually(|| env.ok(&["account", "list"]).lines().any(|l| l == "yan")),
        "a captured add is imported"
    );
    let journal = env.journal();
    assert!(journal.contains("account alice\tproxy\tupdated"), "{journal}");
    let (exit, _) = served.terminate();
    assert!(exit.success());
}

#[test]
fn direct_directory_changes_arrive_within_a_poll_interval() {
    let env = Env::start(BOTH_LDAP_WINS);
    env.poll_every("1s");
    let served = env.serve();
    env.ldapmodify(&set_mail(ALICE, "alice@direct.example"));
    assert!(
        eventually(|| env.local_field("account", "alice", "mail").as_deref() == Some("alice@direct.example")),
        "the poller brings in a change made directly in the directory"
    );
    assert!(env.journal().contains("account alice\tpoll\tupdated"));
    let (exit, _) = served.terminate();
    assert!(exit.success());
}

#[test]
fn crash_in_the_middle_of_1000_captured_writes_loses_and_duplicates_nothing() {
    let env = Env::start(BOTH_LDAP_WINS);
    env.poll_every("1h");
    let served = env.serve();

    let add = |i: usize| {
        format!(
            "dn: uid=crash{i:04},ou=people,dc=example,dc=com\nchangetype: add\nobjectClass: inetOrgPerson\n\
             uid: crash{i:04}\ncn: Crash {i}\nsn: Crash\n\n"
        )
    };
    let mut writer = Command::new("ldapmodify")
        .args(["-c", "-x", "-H", &served.url, "-D", ROOT_DN, "-w", ROOT_PW])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = writer.stdin.take().unwrap();
    // 300 writes, then the crash, then the other 700 (refused: ldapsync is gone).
    let (crashed, after_crash) = std::sync::mpsc::channel::<()>();
    let feeder = std::thread::spawn(move || {
        use std::io::Write;
        let _ = stdin.write_all((0..300).map(add).collect::<String>().as_bytes());
        let _ = after_crash.recv();
        let _ = stdin.write_all((300..1000).map(add).collect::<String>().as_bytes());
    });
    assert!(
        eventually(|| env.directory_uids().len() >= 6 + 200),
        "writes are flowing"
    );
    served.kill();
    crashed.send(()).unwrap();
    let _ = feeder.join();
    let _ = writer.wait();
    let written = env.directory_uids();
    assert!(
        (6 + 200..=6 + 300).contains(&written.len()),
        "the crash came in the middle: {} of 1000 writes reached the directory",
        written.len() - 6
    );

    let restarted = env.serve();
    assert!(
        eventually(|| env.local_accounts() == written),
        "after the restart the local store holds exactly the directory's accounts"
    );
    let journal = env.journal();
    for uid in written.iter().filter(|u| u.starts_with("crash")) {
        let created = journal
            .lines()
            .filter(|l| l.contains(&format!("account {uid}\t")) && l.contains("created-local"))
            .count();
        assert_eq!(created, 1, "{uid} created exactly once");
    }
    let (exit, _) = restarted.terminate();
    assert!(exit.success());
}

#[test]
fn poller_recovers_after_a_directory_outage() {
    let mut env = Env::start(BOTH_LDAP_WINS);
    env.poll_every("1s");
    let served = env.serve();
    env.slapd.kill();
    // Polls fail while the directory is down; nothing is deleted or lost.
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(env.local_accounts().len(), 6, "a failed poll is not an empty directory");
    env.slapd.restart();
    env.ldapmodify(&set_mail(ALICE, "alice@after-outage.example"));
    assert!(
        eventually(|| env.local_field("account", "alice", "mail").as_deref() == Some("alice@after-outage.example")),
        "polling resumes once the directory is back"
    );
    let (exit, _) = served.terminate();
    assert!(exit.success());
}

#[test]
fn direct_changes_arrive_by_incremental_poll_with_each_mechanism() {
    struct Case {
        mechanism: &'static str,
        /// Whether the mechanism itself reports deletes.
        sees_deletes: bool,
    }
    for case in [
        Case {
            mechanism: "syncrepl",
            sees_deletes: true,
        },
        Case {
            mechanism: "timestamp",
            sees_deletes: false,
        },
    ] {
        let env = Env::start(Policy {
            direction: "ldap-to-local",
            conflict: "ldap-wins",
            delete: "delete",
        });
        env.connector_option(&format!("poll_mechanism = \"{}\"", case.mechanism));
        env.connector_option("max_delete_percent = 100");
        let first = env.sync();
        assert!(
            first.starts_with(&format!("full reconciliation ({})", case.mechanism)),
            "{first}"
        );
        let status = env.status();
        assert!(
            status.contains(&format!("accounts: mechanism {}, watermark ", case.mechanism)),
            "{status}"
        );

        env.ldapmodify(&format!(
            "{}\n\
             dn: uid=yan,ou=people,dc=example,dc=com\nchangetype: add\nobjectClass: inetOrgPerson\nuid: yan\ncn: Yan\nsn: Yan\n\n\
             dn: uid=bob,ou=people,dc=example,dc=com\nchangetype: modrdn\nnewrdn: uid=robert\ndeleteoldrdn: 1\n\n\
             dn: uid=frank,ou=people,dc=example,dc=com\nchangetype: delete\n",
            set_mail(ALICE, "alice@polled.example")
        ));
        let polled = env.sync();
        assert!(
            polled.starts_with(&format!("incremental poll ({})", case.mechanism)),
            "{polled}"
        );
        assert_eq!(
            env.local_field("account", "alice", "mail").as_deref(),
            Some("alice@polled.example"),
            "{}: a modify",
            case.mechanism
        );
        let accounts = env.local_accounts();
        assert!(
            accounts.contains(&"yan".into()),
            "{}: an add: {accounts:?}",
            case.mechanism
        );
        assert!(
            accounts.contains(&"robert".into()) && !accounts.contains(&"bob".into()),
            "{}: a rename: {accounts:?}",
            case.mechanism
        );
        assert_eq!(
            !accounts.contains(&"frank".into()),
            case.sees_deletes,
            "{}: a delete, by the poll itself or not: {accounts:?}",
            case.mechanism
        );
        let journal = env.journal();
        assert!(journal.contains("account alice\tpoll\tupdated"), "{journal}");

        // The full reconciliation finds what the poll cannot see.
        env.ok(&["sync", "run", "--connector", "example", "--full"]);
        assert!(!env.local_accounts().contains(&"frank".into()), "{}", case.mechanism);
        assert_eq!(env.local_accounts(), env.directory_uids(), "{}", case.mechanism);
    }
}

#[test]
fn a_change_settles_in_one_round_and_writes_nothing_more() {
    let env = Env::start(BOTH_LDAP_WINS);
    env.sync();
    let csn = |env: &Env, dn: &str| env.ldap_values(dn, "entryCSN");

    // A local edit goes to the directory once…
    env.ok(&["account", "set", "carol", "--set", "description=from the app"]);
    env.sync();
    let carol = "uid=carol,ou=people,dc=example,dc=com";
    assert_eq!(env.ldap_values(carol, "description"), ["from the app"]);
    // …and a directory edit comes in once.
    env.ldapmodify(&set_mail(ALICE, "alice@settled.example"));
    env.sync();
    assert_eq!(
        env.local_field("account", "alice", "mail").as_deref(),
        Some("alice@settled.example")
    );

    let (carol_csn, alice_csn, journal) = (csn(&env, carol), csn(&env, ALICE), env.journal_lines());
    // The poller sees the engine's own write come back: it changes nothing.
    for args in [
        &["sync", "run", "--connector", "example"][..],
        &["sync", "run", "--connector", "example", "--full"],
    ] {
        let report = env.ok(args);
        assert!(report.contains(" 0 updated, 0 converged, 0 conflicts"), "{report}");
    }
    assert_eq!(csn(&env, carol), carol_csn, "no further write to carol's entry");
    assert_eq!(csn(&env, ALICE), alice_csn, "no write back to alice's entry");
    assert_eq!(env.journal_lines(), journal, "nothing more journaled");
}

#[test]
fn a_captured_delete_applies_without_waiting_for_a_poll() {
    let env = Env::start(Policy {
        direction: "ldap-to-local",
        conflict: "ldap-wins",
        delete: "delete",
    });
    env.poll_every("1h");
    env.connector_option("max_delete_percent = 100");
    let served = env.serve();
    ldapmodify_at(
        &served.url,
        "dn: uid=erin,ou=people,dc=example,dc=com\nchangetype: delete\n",
    );
    assert!(
        eventually(|| !env.local_accounts().contains(&"erin".into())),
        "the captured delete reaches the local store"
    );
    assert!(env.journal().contains("account erin\tproxy\tdeleted"));
    let (exit, _) = served.terminate();
    assert!(exit.success());
}

#[test]
fn captured_writes_wait_in_the_journal_while_the_directory_cannot_be_synced() {
    let env = Env::start(BOTH_LDAP_WINS);
    env.sync();
    // The proxy relays to slapd, but the connector's service connection
    // points at a closed port: captures cannot be applied yet.
    let dead = "upstream = [\"ldap://127.0.0.1:1\"]";
    env.connector_option(dead);
    let served = serve(&[
        "--config",
        env.config_path().to_str().unwrap(),
        "--listen",
        "ldap://127.0.0.1:0",
    ]);
    ldapmodify_at(&served.url, &set_mail(ALICE, "alice@journaled.example"));
    assert!(
        eventually(|| env.status().contains("captured changes not applied yet: 1")),
        "the capture is journaled: {}",
        env.status()
    );
    assert!(env.status().contains("last error: no directory server reachable"));
    // Stopped and restarted later, the capture is still there and applied.
    let (exit, _) = served.terminate();
    assert!(exit.success());
    let config = std::fs::read_to_string(env.config_path()).unwrap();
    std::fs::write(env.config_path(), config.replace(&format!("{dead}\n"), "")).unwrap();
    env.sync();
    assert_eq!(
        env.local_field("account", "alice", "mail").as_deref(),
        Some("alice@journaled.example")
    );
    assert!(env.journal().contains("account alice\tproxy\tupdated"));
    assert!(env.status().contains("captured changes not applied yet: 0"));
}

#[test]
fn a_full_reconciliation_reports_progress_in_plain_lines_when_not_on_a_terminal() {
    let env = Env::start(LDAP_TO_LOCAL);
    let out = env.run(&["sync", "run", "--connector", "example", "--full"]);
    assert!(out.status.success());
    let progress = String::from_utf8_lossy(&out.stderr);
    for line in [
        "accounts: comparing 6 entries in scope",
        "accounts: 6 compared in",
        "groups: comparing 2 entries in scope",
        "groups: 2 compared in",
    ] {
        assert!(progress.contains(line), "{line:?} missing from:\n{progress}");
    }
    assert!(
        progress.contains("8 changes") || progress.contains("6 changes"),
        "{progress}"
    );
    assert!(
        !progress.contains('\u{1b}'),
        "no terminal escapes when not on a terminal"
    );
}

/// A raw session through ldapsync at `url`, bound as alice (message id 1).
fn raw_session_as_alice(url: &str) -> common::raw::Raw {
    let mut alice = common::raw::Raw::connect(url);
    alice.send(&[common::raw::simple_bind(1, ALICE, "alice-secret")]);
    assert_eq!(alice.response().unwrap().result, 0);
    alice
}

/// Waits for the local store's mail of alice to be what the directory holds.
fn assert_alice_agrees_with_the_directory(env: &Env) {
    std::thread::sleep(std::time::Duration::from_millis(300));
    let directory = env.ldap_values(ALICE, "mail");
    assert!(
        eventually(|| env.local_field("account", "alice", "mail").map(|m| vec![m]) == Some(directory.clone())),
        "local store agrees with the directory ({directory:?})"
    );
}

#[test]
fn a_write_whose_dn_has_an_unusual_tag_is_captured_like_any_other_not_a_reason_to_reconcile() {
    use common::raw::modify;
    let env = Env::start(BOTH_LDAP_WINS);
    env.poll_every("1h");
    let served = env.serve();
    // An ordinary user modifies her own entry, the DN tagged [APPLICATION 4]
    // (0x44) instead of OCTET STRING: slapd applies it.
    let mut alice = raw_session_as_alice(&served.url);
    for (id, mail) in [(2, "alice@odd-tag.example"), (3, "alice@odd-tag-2.example")] {
        alice.send(&[modify(id, 0x44, ALICE, "mail", mail)]);
        assert_eq!(alice.response().unwrap().result, 0, "slapd accepts it");
        assert!(
            eventually(|| env.local_field("account", "alice", "mail").as_deref() == Some(mail)),
            "the capture reaches the local store"
        );
    }
    let journal = env.journal();
    assert!(
        journal.contains("account alice\tproxy\tupdated"),
        "captured, not polled: {journal}"
    );
    let status = env.status();
    assert!(!status.contains("OUT OF SYNC"), "{status}");
    let (exit, log) = served.terminate();
    assert!(exit.success());
    assert!(!log.contains("out of sync"), "no full comparison was asked for: {log}");
}

#[test]
fn a_write_abandoned_in_flight_or_followed_by_a_reused_message_id_still_reaches_the_store() {
    use common::raw::{abandon, modify, search_base};
    let env = Env::start(BOTH_LDAP_WINS);
    env.poll_every("1h");
    let served = env.serve();

    // Abandoned in the same write: slapd may apply it or not; the store
    // must end up as the directory is, without waiting an hour for a poll.
    let mut alice = raw_session_as_alice(&served.url);
    alice.send(&[modify(2, 0x04, ALICE, "mail", "alice@abandoned.example"), abandon(3, 2)]);
    assert_alice_agrees_with_the_directory(&env);

    // A search reusing the id of a modify in flight: a protocol error that
    // ends the session, and the modify, relayed already, is not lost.
    let mut reuse = raw_session_as_alice(&served.url);
    reuse.send(&[
        modify(2, 0x04, ALICE, "mail", "alice@reused-id.example"),
        search_base(2, ALICE),
    ]);
    let notice = std::iter::from_fn(|| reuse.response())
        .find(|r| r.message_id == 0)
        .expect("a Notice of Disconnection");
    assert_eq!(notice.result, 2, "protocolError: {notice:?}");
    assert!(
        notice.diagnostic.contains("message id 2 is already in use"),
        "{notice:?}"
    );
    assert_alice_agrees_with_the_directory(&env);
    let (exit, log) = served.terminate();
    assert!(exit.success());
    assert!(
        log.contains("outcome-unknown write"),
        "the lost outcome asked for a poll: {log}"
    );
}

#[cfg(unix)]
#[test]
fn a_sqlite_store_others_can_read_is_made_owner_only_at_start_and_said_so() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::start(LDAP_TO_LOCAL);
    env.sync();
    let db = env.dir.path().join("ldapsync.db");
    let mode = |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    let served = env.serve();
    assert_eq!(mode(&db), 0o600);
    assert_eq!(mode(&env.dir.path().join("ldapsync.sock")), 0o600, "the admin socket");
    let startup = served.startup.join("\n");
    let (exit, log) = served.terminate();
    let log = format!("{startup}\n{log}");
    assert!(exit.success());
    assert!(
        log.contains("the database was readable by other users; it is owner-only now"),
        "{log}"
    );
}

#[test]
fn a_closed_stdout_ends_a_command_quietly_as_with_any_unix_tool() {
    let env = Env::start(LDAP_TO_LOCAL);
    env.sync();
    let commands: &[(&[&str], i32)] = &[
        (&["account", "list"], 0),
        (&["account", "show", "bob"], 0),
        (&["association", "list"], 0),
        (&["journal"], 0),
        (&["status"], 4),
    ];
    for (args, code) in commands {
        // A pipe whose reader is gone before the first line: every write fails.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(env!("CARGO_BIN_EXE_ldapsync"))
            .arg("--config")
            .arg(env.config_path())
            .args(*args)
            .stdout(writer)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(*code), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: no panic: {stderr}");
    }
}

/// Adds `uid=NAME` person entries under the given OUs of ou=people.
fn add_people_in(env: &Env, name: &str, ous: &[&str]) {
    for ou in ous {
        env.ldapmodify(&format!(
            "dn: ou={ou},ou=people,dc=example,dc=com\nchangetype: add\nobjectClass: organizationalUnit\nou: {ou}\n\n\
             dn: uid={name},ou={ou},ou=people,dc=example,dc=com\nchangetype: add\nobjectClass: inetOrgPerson\n\
             uid: {name}\ncn: {name} in {ou}\nsn: {name}\n"
        ));
    }
}

#[test]
fn a_disputed_object_is_left_alone_by_every_pass_never_guessed_into_a_new_entry() {
    let env = Env::start(BOTH_LDAP_WINS);
    env.sync();
    env.ok(&["account", "add", "lee", "--set", "mail=lee@app.example"]);
    add_people_in(&env, "lee", &["sub", "sub2"]);
    let lee_at_base = "uid=lee,ou=people,dc=example,dc=com";
    for pass in [
        &["sync", "run", "--connector", "example"][..],
        &["sync", "run", "--connector", "example", "--full"],
    ] {
        let report = env.attention(pass);
        let dispute = "disputed account lee: 2 directory entries have uid=lee \
                       (uid=lee,ou=sub,ou=people,dc=example,dc=com; uid=lee,ou=sub2,ou=people,dc=example,dc=com); \
                       resolve with `ldapsync association link lee --connector example --dn DN`";
        assert!(
            report.contains(dispute),
            "its candidates and the command that resolves it: {report}"
        );
        assert!(
            report.contains(" 1 disputed,"),
            "one object, however many entries: {report}"
        );
        assert!(!report.contains("create in directory account lee"), "{report}");
        assert!(
            env.ldap_values(lee_at_base, "uid").is_empty(),
            "no third entry for lee: {report}"
        );
    }
    let status = env.status();
    assert!(
        status.contains("disputed (last reconciliation): 1\n    disputed account lee: 2 directory entries"),
        "{status}"
    );
    // A third candidate at the DN a create would have used: still disputed,
    // and the pass does not fail on an add that was never its business.
    env.ldapmodify(&format!(
        "dn: {lee_at_base}\nchangetype: add\nobjectClass: inetOrgPerson\nuid: lee\ncn: lee\nsn: lee\n"
    ));
    let report = env.attention(&["sync", "run", "--connector", "example", "--full"]);
    assert!(
        report.contains(" 1 disputed,") && report.contains(" 0 failed"),
        "{report}"
    );
    assert!(
        !env.ok(&["association", "list"]).contains("account lee\t"),
        "lee stays unassociated"
    );
    assert_eq!(
        env.local_field("account", "lee", "mail").as_deref(),
        Some("lee@app.example")
    );

    // The administrator says which entry lee is: linked, and synced as at
    // a first sync (ldap-wins keeps the directory's values).
    let sub = "uid=lee,ou=sub,ou=people,dc=example,dc=com";
    let linked = env.ok(&["association", "link", "lee", "--connector", "example", "--dn", sub]);
    assert!(
        linked.contains(&format!("associate account lee with {sub}")),
        "{linked}"
    );
    let uuid = env.ldap_values(sub, "entryUUID").remove(0);
    assert!(
        env.ok(&["association", "list"])
            .contains(&format!("account lee\t{uuid}\t{sub}"))
    );
    let journal = env.journal();
    assert!(journal.contains("account lee\tlocal\tlinked"), "{journal}");
    assert!(journal.contains("\"operator\":"), "{journal}");
    // The other two entries named lee are what is in dispute now.
    let report = env.attention(&["sync", "run", "--connector", "example", "--full"]);
    assert!(report.contains(" 2 disputed,"), "{report}");
    assert!(
        report.contains("disputed account entry uid=lee,ou=sub2,ou=people,dc=example,dc=com"),
        "{report}"
    );
    // Linking twice, or an entry another object holds, is refused.
    let again = env.run(&[
        "association",
        "link",
        "lee",
        "--connector",
        "example",
        "--dn",
        lee_at_base,
    ]);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        !again.status.success() && stderr.contains("cannot link account lee: it is associated with entry"),
        "{stderr}"
    );
    env.ok(&["association", "remove", "bob", "--connector", "example"]);
    let taken = env.run(&[
        "association",
        "link",
        "bob",
        "--connector",
        "example",
        "--entry-id",
        &uuid,
    ]);
    let stderr = String::from_utf8_lossy(&taken.stderr);
    assert!(!taken.status.success(), "{stderr}");
    assert!(
        stderr.contains("is associated with account lee"),
        "lee holds that entry: {stderr}"
    );
}

#[test]
fn the_same_change_on_both_sides_is_a_convergence_not_an_update() {
    let env = Env::start(BOTH_LDAP_WINS);
    env.sync();
    env.ok(&["account", "set", "alice", "--set", "mail=alice@both.example"]);
    env.ldapmodify(&set_mail(ALICE, "alice@both.example"));
    let report = env.sync();
    assert!(report.contains(" 0 updated, 1 converged, 0 conflicts"), "{report}");
    assert!(report.contains("converged account alice"), "{report}");
    let journal = env.journal();
    assert!(journal.contains("account alice\tpoll\tconverged"), "{journal}");
    assert!(
        !journal.lines().any(|l| l.contains("account alice\tpoll\tupdated")),
        "{journal}"
    );
}

/// A tmpfs of its own for a store that can be filled up; root only.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(at: PathBuf) -> Option<SmallDisk> {
        let root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout == b"0\n");
        std::fs::create_dir_all(&at).unwrap();
        let mounted = root
            && Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
                .arg(&at)
                .status()
                .is_ok_and(|s| s.success());
        mounted.then_some(SmallDisk(at))
    }

    /// Writes until the disk is full; returns the file that fills it.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.0.join("fill");
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while file.write_all(&chunk).is_ok() {}
        let _ = file.sync_all();
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_sqlite_disk_is_reported_without_a_log_flood_and_nothing_is_lost_once_it_has_room() {
    let env = Env::start(BOTH_LDAP_WINS);
    env.poll_every("1h");
    let Some(disk) = SmallDisk::mount(env.dir.path().join("disk")) else {
        ldapsync_fixtures::skip(
            "full store disk test",
            "it needs root to mount a tmpfs",
            ldapsync_fixtures::InCi::Optional,
        );
        return;
    };
    let config = std::fs::read_to_string(env.config_path()).unwrap();
    let db = disk.0.join("ldapsync.db");
    let config = config.replace(
        &env.dir.path().join("ldapsync.db").display().to_string(),
        &db.display().to_string(),
    );
    std::fs::write(env.config_path(), config).unwrap();
    let served = env.serve();
    let fill = disk.fill();

    // The relay goes on; the writes cannot be journaled.
    let last = 30;
    let ldif: String = (1..=last)
        .map(|i| set_mail(ALICE, &format!("alice-{i}@full.example")))
        .collect::<Vec<_>>()
        .join("\n");
    ldapmodify_at(&served.url, &ldif);
    assert!(
        eventually(|| env.status().contains("STORE UNWRITABLE since")),
        "{}",
        env.status()
    );
    // Room again: the next write is journaled and the connector catches up
    // on what it could not journal.
    std::fs::remove_file(fill).unwrap();
    ldapmodify_at(
        &served.url,
        &set_mail("uid=bob,ou=people,dc=example,dc=com", "bob@room.example"),
    );
    // The full comparison that makes them good comes no sooner than a
    // minute after the last one (the one at start).
    let alice = format!("alice-{last}@full.example");
    assert!(
        common::eventually_within(std::time::Duration::from_secs(90), || {
            env.local_field("account", "alice", "mail").as_deref() == Some(alice.as_str())
        }),
        "the lost captures are made good: {:?}",
        env.local_field("account", "alice", "mail")
    );
    assert!(
        eventually(|| !env.status().contains("STORE UNWRITABLE")),
        "{}",
        env.status()
    );
    let (exit, log) = served.terminate();
    assert!(exit.success());
    let warnings = log.lines().filter(|l| l.contains("WARN")).count();
    assert!(warnings <= 10, "{last} failed captures, {warnings} warnings:\n{log}");
}

#[test]
fn a_misspelt_connector_or_field_is_refused_with_the_names_that_exist() {
    let env = Env::start(BOTH_LDAP_WINS);
    for args in [
        &["journal", "--connector", "exmaple"][..],
        &["association", "list", "--connector", "exmaple"],
        &["sync", "run", "--connector", "exmaple"],
    ] {
        let out = env.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains(r#"no connector named "exmaple" (did you mean "example"?); the config file has "example""#),
            "{args:?}: {stderr}"
        );
    }
    env.sync();
    let out = env.run(&["account", "set", "alice", "--set", "mial=alice@typo.example"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(
            r#"no connector maps the account field "mial"; the mapped ones are description, display_name, mail"#
        ),
        "{stderr}"
    );
    assert_eq!(env.local_field("account", "alice", "mial"), None, "nothing was stored");
    env.ok(&["account", "set", "alice", "--set", "shoe_size=42", "--unmapped"]);
    assert_eq!(env.local_field("account", "alice", "shoe_size").as_deref(), Some("42"));
}

#[test]
fn the_journal_keeps_the_values_each_side_had_and_what_a_policy_threw_away() {
    let env = Env::start(BOTH_LDAP_WINS);
    env.sync();
    env.ok(&["account", "set", "alice", "--set", "mail=alice@app.example"]);
    env.ldapmodify(&set_mail(ALICE, "alice@directory.example"));
    env.sync();
    let journal = env.ok(&["journal", "--object", "alice", "--limit", "2"]);
    let lines: Vec<&str> = journal.lines().collect();
    let edit: serde_json::Value = serde_json::from_str(lines[0].rsplit('\t').next().unwrap()).unwrap();
    assert_eq!(
        edit["fields"]["mail"],
        serde_json::json!({ "old": ["alice@example.com"], "new": ["alice@app.example"] }),
        "a local edit: {journal}"
    );
    assert!(lines[1].contains("\tconflict-resolved\t"), "{journal}");
    let conflict: serde_json::Value = serde_json::from_str(lines[1].rsplit('\t').next().unwrap()).unwrap();
    assert_eq!(
        conflict["changes"]["mail"],
        serde_json::json!({
            "baseline": ["alice@example.com"],
            "local": ["alice@app.example"],
            "directory": ["alice@directory.example"],
            "result": ["alice@directory.example"],
        }),
        "ldap-wins threw alice@app.example away, and the journal says so: {journal}"
    );
    env.ok(&["account", "set", "alice", "--set", "app_password=hunter2", "--unmapped"]);
    let journal = env.journal();
    assert!(
        journal.contains("app_password") && !journal.contains("hunter2"),
        "{journal}"
    );
}

#[test]
fn scripts_get_json_from_every_command_that_prints_and_values_are_never_ambiguous() {
    let env = Env::start(BOTH_LDAP_WINS);
    let report: serde_json::Value =
        serde_json::from_str(&env.ok(&["--json", "sync", "run", "--connector", "example"])).unwrap();
    assert_eq!(
        (report["created_local"].as_u64(), report["kind"].as_str()),
        (Some(8), Some("reconciliation")),
        "{report}"
    );
    assert!(
        report["lines"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l.as_str().unwrap().contains("create local account alice"))
    );

    env.ok(&[
        "account",
        "set",
        "alice",
        "--set",
        "description=Smith, Jr.",
        "--set",
        "description=second",
    ]);
    let show = env.ok(&["account", "show", "alice"]);
    assert!(
        show.contains("  description: Smith, Jr.\n  description: second\n"),
        "a line per value: {show}"
    );
    let alice: serde_json::Value = serde_json::from_str(&env.ok(&["account", "show", "alice", "--json"])).unwrap();
    assert_eq!(
        alice["object"]["values"]["description"],
        serde_json::json!(["Smith, Jr.", "second"])
    );
    assert_eq!(alice["associations"][0]["connector"], "example");

    let list: serde_json::Value = serde_json::from_str(&env.ok(&["group", "list", "--json"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2);
    let associations: serde_json::Value = serde_json::from_str(&env.ok(&["association", "list", "--json"])).unwrap();
    assert_eq!(associations.as_array().unwrap().len(), 8);
    let journal: serde_json::Value =
        serde_json::from_str(&env.ok(&["journal", "--json", "--object", "alice", "--limit", "1"])).unwrap();
    assert_eq!(journal[0]["action"], "local-edit");
    assert_eq!(
        journal[0]["detail"]["fields"]["description"]["new"],
        serde_json::json!(["Smith, Jr.", "second"])
    );
}

#[test]
fn sighup_applies_connector_changes_to_the_running_worker_and_status_shows_what_runs() {
    let env = Env::start(BOTH_LDAP_WINS);
    env.poll_every("1s");
    let served = env.serve();
    // The file changes; the running worker does not, and status says so.
    let config = std::fs::read_to_string(env.config_path()).unwrap();
    std::fs::write(
        env.config_path(),
        config.replace("direction = \"both\"", "direction = \"ldap-to-local\""),
    )
    .unwrap();
    let status = env.exits(0, &["status"]);
    assert!(status.contains("  direction: both, conflict: ldap-wins"), "{status}");
    assert!(
        status.contains("WARNING: the config file says direction ldap-to-local"),
        "{status}"
    );
    env.ok(&["account", "set", "alice", "--set", "mail=alice@before-reload.example"]);
    assert!(
        eventually(|| env.ldap_values(ALICE, "mail") == ["alice@before-reload.example"]),
        "under the running policy (both), the local edit goes to the directory"
    );

    served.signal("HUP");
    assert!(
        eventually(|| env.status().contains("  direction: ldap-to-local, conflict: ldap-wins")),
        "{}",
        env.status()
    );
    assert!(!env.status().contains("WARNING: the config file says"));
    env.ok(&["account", "set", "alice", "--set", "mail=alice@after-reload.example"]);
    assert!(
        eventually(|| env.local_field("account", "alice", "mail").as_deref() == Some("alice@before-reload.example")),
        "under ldap-to-local the local edit is put back"
    );
    assert_eq!(
        env.ldap_values(ALICE, "mail"),
        ["alice@before-reload.example"],
        "and never reaches the directory"
    );

    // A new scope: the worker compares everything again.
    let config = std::fs::read_to_string(env.config_path()).unwrap();
    std::fs::write(
        env.config_path(),
        config.replace(
            "(objectClass=inetOrgPerson)",
            "(&(objectClass=inetOrgPerson)(!(uid=frank)))",
        ),
    )
    .unwrap();
    served.signal("HUP");
    let (exit, log) = {
        assert!(
            eventually(|| env.journal().contains("account frank\tpoll\tentry-gone-ignored")),
            "{}",
            env.journal()
        );
        served.terminate()
    };
    assert!(exit.success());
    assert!(
        log.contains("its directory, scope or mapping changed; a full reconciliation follows"),
        "{log}"
    );
}

#[test]
fn a_local_delete_follows_the_connectors_direction_and_delete_policy() {
    // ldap-to-local: the directory owns the object.
    let env = Env::start(LDAP_TO_LOCAL);
    env.sync();
    let out = env.run(&["account", "rm", "alice"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("connector example is ldap-to-local, so the directory owns it"),
        "{stderr}"
    );
    assert!(env.local_accounts().contains(&"alice".to_owned()));
    env.ok(&["account", "rm", "alice", "--force"]);
    assert!(!env.local_accounts().contains(&"alice".to_owned()));
    assert!(
        env.ok(&["sync", "run", "--connector", "example", "--full"])
            .contains("create local account alice"),
        "it comes back"
    );

    // both with delete = "delete": the entry goes, under the guard.
    let env = Env::start(Policy {
        direction: "both",
        conflict: "ldap-wins",
        delete: "delete",
    });
    env.connector_option("max_deletes = 1\nmax_delete_percent = 100");
    env.sync();
    let bob = "uid=bob,ou=people,dc=example,dc=com";
    let said = env.ok(&["account", "rm", "bob"]);
    assert!(
        said.contains(&format!("deleted account bob and its entry {bob}")),
        "{said}"
    );
    assert!(env.ldap_values(bob, "uid").is_empty(), "the entry is deleted");
    assert!(
        env.journal().contains("account bob\tlocal\tdeleted"),
        "{}",
        env.journal()
    );
    let again = env.sync();
    assert!(!again.contains("account bob"), "nothing comes back: {again}");
    let out = env.run(&["account", "rm", "carol"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("over the mass-delete guard"),
        "{stderr}"
    );
    assert!(
        !env.ldap_values("uid=carol,ou=people,dc=example,dc=com", "uid")
            .is_empty()
    );
    env.ok(&["account", "rm", "carol", "--confirm-deletes"]);
    assert!(
        env.ldap_values("uid=carol,ou=people,dc=example,dc=com", "uid")
            .is_empty()
    );

    // both with delete = "ignore": the entry stays, and says what follows.
    let env = Env::start(BOTH_LDAP_WINS);
    env.sync();
    let said = env.ok(&["account", "rm", "dave"]);
    assert!(
        said.contains("stays in the directory (delete = ignore), and the next full pass imports it again"),
        "{said}"
    );
    assert!(
        !env.ldap_values("uid=dave,ou=people,dc=example,dc=com", "uid")
            .is_empty()
    );
}

#[test]
fn held_deletes_make_the_connector_degraded_in_readyz_and_the_metrics() {
    use std::io::{Read, Write};
    let env = Env::start(Policy {
        direction: "ldap-to-local",
        conflict: "ldap-wins",
        delete: "delete",
    });
    env.poll_every("1s");
    let served = serve(&[
        "--config",
        env.config_path().to_str().unwrap(),
        "--listen",
        "ldap://127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let metrics = served
        .startup
        .iter()
        .find_map(|l| {
            l.split("metrics=")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .map(str::to_owned)
        })
        .expect("the metrics address is logged");
    let get = |path: &str| {
        let mut stream = std::net::TcpStream::connect(&metrics).unwrap();
        write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    };
    assert!(eventually(|| env.local_accounts().len() == 6), "imported");
    env.ldapmodify(
        "dn: uid=erin,ou=people,dc=example,dc=com\nchangetype: delete\n\n\
         dn: uid=frank,ou=people,dc=example,dc=com\nchangetype: delete\n",
    );
    assert!(
        eventually(|| get("/readyz").contains("connector example degraded: 2 deletes held")),
        "{}",
        get("/readyz")
    );
    assert!(get("/readyz").starts_with("HTTP/1.1 200"), "the relay is still ready");
    assert!(get("/metrics").contains("ldapsync_deletes_held{connector=\"example\"} 2"));
    let (exit, _) = served.terminate();
    assert!(exit.success());
}

#[test]
fn a_rename_of_an_entry_whose_name_holds_a_comma_writes_to_the_renamed_entry() {
    let env = Env::start(BOTH_LDAP_WINS);
    env.ldapmodify(
        "dn: uid=smith\\,j,ou=people,dc=example,dc=com\nchangetype: add\nobjectClass: inetOrgPerson\n\
         uid: smith,j\ncn: J Smith\nsn: Smith\nmail: j@example.com\n",
    );
    env.sync();
    env.ok(&[
        "account",
        "set",
        "smith,j",
        "--rename",
        "smith,k",
        "--set",
        "mail=k@example.com",
    ]);
    let report = env.sync();
    assert!(report.contains(" 0 failed"), "{report}");
    let renamed = "uid=smith\\,k,ou=people,dc=example,dc=com";
    assert_eq!(env.ldap_values(renamed, "mail"), ["k@example.com"], "{report}");
    assert_eq!(env.ldap_values(renamed, "uid"), ["smith,k"]);
}
