//! Differential tests with the `ldap3` crate: every scenario runs against a
//! directory directly and an identical one through ldapsync, and the two
//! transcripts must be equal. Each test also checks what a user would
//! expect of the proxied side on its own, so that two equally broken paths
//! cannot pass.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Debug;

use ldap3::adapters::{Adapter, EntriesOnly, PagedResults};
use ldap3::exop::{Exop, PasswordModify, WhoAmI, WhoAmIResp};
use ldap3::{Ldap, LdapConnAsync, LdapResult, Mod, Scope, SearchEntry, SearchOptions};
use ldapsync::proxy::WriteKind;
use protocol_tests::{BASE_DN, Pair, ROOT_DN, ROOT_PW, person};

/// What a client saw, step by step, in a comparable form.
#[derive(Debug, Default, PartialEq, Eq)]
struct Transcript(Vec<String>);

impl Transcript {
    fn note(&mut self, step: &str, what: impl Debug) {
        self.0.push(format!("{step}: {what:?}"));
    }

    fn step(&self, name: &str) -> &str {
        self.0
            .iter()
            .find(|s| s.starts_with(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no step {name} in {self:#?}"))
    }
}

async fn connect(url: &str) -> Ldap {
    let (conn, ldap) = LdapConnAsync::new(url).await.expect("connecting");
    ldap3::drive!(conn);
    ldap
}

/// A result without what legitimately differs between two directories.
fn result(r: &LdapResult) -> (u32, &str, &str, &[String], usize) {
    (r.rc, &r.matched, &r.text, &r.refs, r.ctrls.len())
}

fn entries(raw: Vec<ldap3::ResultEntry>) -> Vec<(String, BTreeMap<String, Vec<String>>)> {
    raw.into_iter()
        .map(SearchEntry::construct)
        .map(|e| (e.dn, e.attrs.into_iter().collect()))
        .collect()
}

async fn whoami(ldap: &mut Ldap) -> String {
    let (exop, _) = ldap.extended(WhoAmI).await.unwrap().success().unwrap();
    exop.parse::<WhoAmIResp>().authzid
}

/// Runs `scenario` on both paths and returns (direct, proxied) transcripts
/// after asserting they are equal.
async fn differential<F, Fut>(pair: &Pair, scenario: F) -> Transcript
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Transcript>,
{
    let (direct_url, proxy_url) = pair.urls();
    let direct = scenario(direct_url).await;
    let proxied = scenario(proxy_url).await;
    assert_eq!(direct, proxied, "ldapsync answered differently from slapd");
    proxied
}

#[tokio::test]
async fn binds_and_identity_match_the_directory() {
    let pair = Pair::start();
    let t = differential(&pair, |url| async move {
        let mut t = Transcript::default();
        let mut ldap = connect(&url).await;
        t.note("anonymous", whoami(&mut ldap).await);
        let (alice, alice_pw) = person("alice");
        t.note(
            "bind alice",
            result(&ldap.simple_bind(&alice, &alice_pw).await.unwrap()),
        );
        t.note("as alice", whoami(&mut ldap).await);
        t.note("bind wrong", result(&ldap.simple_bind(&alice, "wrong").await.unwrap()));
        t.note("after failed bind", whoami(&mut ldap).await);
        t.note("bind admin", result(&ldap.simple_bind(ROOT_DN, ROOT_PW).await.unwrap()));
        t.note("as admin", whoami(&mut ldap).await);
        t.note(
            "bind no such dn",
            result(&ldap.simple_bind("uid=nobody,dc=example,dc=com", "x").await.unwrap()),
        );
        t
    })
    .await;
    assert_eq!(t.step("anonymous"), "anonymous: \"\"");
    assert!(t.step("as alice").contains("dn:uid=alice,ou=people,dc=example,dc=com"));
    assert!(t.step("bind wrong").starts_with("bind wrong: (49,"));
    assert_eq!(
        t.step("after failed bind"),
        "after failed bind: \"\"",
        "a failed bind leaves the session anonymous"
    );
    assert!(t.step("as admin").contains(ROOT_DN));
}

#[tokio::test]
async fn searches_in_every_scope_with_filters_and_referrals() {
    let pair = Pair::start();
    let cases: &[(&str, Scope, &str, &[&str])] = &[
        (BASE_DN, Scope::Base, "(objectClass=*)", &[]),
        (
            "ou=people,dc=example,dc=com",
            Scope::OneLevel,
            "(objectClass=inetOrgPerson)",
            &["uid", "mail"],
        ),
        (
            BASE_DN,
            Scope::Subtree,
            "(&(objectClass=inetOrgPerson)(mail=*@example.com))",
            &["cn"],
        ),
        (BASE_DN, Scope::Subtree, "(|(uid=alice)(uid=bob))", &["*", "+"]),
        (BASE_DN, Scope::Subtree, "(!(objectClass=inetOrgPerson))", &["1.1"]),
        (BASE_DN, Scope::Subtree, "(uid>=d)", &["uid"]),
        (BASE_DN, Scope::Subtree, "(cn=*nders*)", &["cn"]),
        (
            BASE_DN,
            Scope::Subtree,
            "(member=uid=alice,ou=people,dc=example,dc=com)",
            &["cn"],
        ),
        (BASE_DN, Scope::Subtree, "(memberUid=bob)", &["cn", "memberUid"]),
        ("ou=nowhere,dc=example,dc=com", Scope::Base, "(objectClass=*)", &[]),
        ("this is not a DN", Scope::Base, "(objectClass=*)", &[]),
        ("ou=remote,dc=example,dc=com", Scope::Base, "(objectClass=*)", &[]),
    ];
    let t = differential(&pair, |url| async move {
        let mut t = Transcript::default();
        let mut ldap = connect(&url).await;
        for (i, (base, scope, filter, attrs)) in cases.iter().enumerate() {
            let r = ldap.search(base, *scope, filter, attrs.to_vec()).await.unwrap();
            // Operational attributes that differ between two directories by nature.
            let found: Vec<_> = entries(r.0)
                .into_iter()
                .map(|(dn, attrs)| {
                    let kept: BTreeMap<_, _> = attrs
                        .into_iter()
                        .filter(|(k, _)| {
                            !["entryUUID", "entryCSN", "createTimestamp", "modifyTimestamp"].contains(&k.as_str())
                        })
                        .collect();
                    (dn, kept)
                })
                .collect();
            t.note(&format!("case {i}"), (found, result(&r.1)));
        }
        let mut typesonly = ldap
            .with_search_options(SearchOptions::new().typesonly(true))
            .search(BASE_DN, Scope::Subtree, "(uid=carol)", vec!["mail", "cn"])
            .await
            .unwrap();
        let raw = std::mem::take(&mut typesonly.0);
        t.note("typesonly", (entries(raw), result(&typesonly.1)));
        t
    })
    .await;
    assert!(t.step("case 0").contains("dc=example,dc=com"));
    assert!(t.step("case 1").contains("uid=frank,ou=people"));
    assert!(t.step("case 3").contains("alice") && t.step("case 3").contains("bob"));
    assert!(
        t.step("case 9").ends_with("(32, \"dc=example,dc=com\", \"\", [], 0))"),
        "noSuchObject with matchedDN: {}",
        t.step("case 9")
    );
    assert!(
        t.step("case 10").contains("(34,"),
        "invalidDNSyntax: {}",
        t.step("case 10")
    );
    assert!(
        t.step("case 11").contains("(10,") && t.step("case 11").contains("ldap://directory.example.org"),
        "referral: {}",
        t.step("case 11")
    );
    // The subtree search from the base crosses the referral object: a continuation reference.
    assert!(
        t.step("case 2").contains("ldap://directory.example.org"),
        "continuation reference: {}",
        t.step("case 2")
    );
}

#[tokio::test]
async fn paged_search_and_size_limits_over_2500_entries() {
    let pair = Pair::start_with_bulk(2500);
    let t = differential(&pair, |url| async move {
        let mut t = Transcript::default();
        let mut ldap = connect(&url).await;
        let adapters: Vec<Box<dyn Adapter<_, _>>> =
            vec![Box::new(EntriesOnly::new()), Box::new(PagedResults::new(200))];
        let mut stream = ldap
            .streaming_search_with(
                adapters,
                "ou=bulk,dc=example,dc=com",
                Scope::Subtree,
                "(uid=*)",
                vec!["uid"],
            )
            .await
            .unwrap();
        let mut uids = Vec::new();
        while let Some(entry) = stream.next().await.unwrap() {
            uids.push(SearchEntry::construct(entry).dn);
        }
        let done = stream.finish().await;
        t.note("paged count", uids.len());
        t.note("paged dns", uids);
        t.note("paged result", result(&done));

        let unpaged = ldap
            .search("ou=bulk,dc=example,dc=com", Scope::Subtree, "(uid=*)", vec!["uid"])
            .await
            .unwrap();
        t.note("unpaged", (unpaged.0.len(), result(&unpaged.1)));

        let limited = ldap
            .with_search_options(SearchOptions::new().sizelimit(3))
            .search(BASE_DN, Scope::Subtree, "(objectClass=inetOrgPerson)", vec!["uid"])
            .await
            .unwrap();
        t.note("sizelimit 3", (limited.0.len(), result(&limited.1)));
        t
    })
    .await;
    assert_eq!(t.step("paged count"), "paged count: 2500");
    assert!(t.step("paged result").starts_with("paged result: (0,"));
    assert!(
        t.step("unpaged").starts_with("unpaged: (500, (4,"),
        "server size limit: {}",
        t.step("unpaged")
    );
    assert!(
        t.step("sizelimit 3").starts_with("sizelimit 3: (3, (4,"),
        "client size limit: {}",
        t.step("sizelimit 3")
    );
}

#[tokio::test]
async fn compare_answers_true_false_and_errors() {
    let pair = Pair::start();
    let t = differential(&pair, |url| async move {
        let mut t = Transcript::default();
        let mut ldap = connect(&url).await;
        let (alice, _) = person("alice");
        t.note(
            "true",
            result(&ldap.compare(&alice, "mail", "alice@example.com").await.unwrap().0),
        );
        t.note(
            "false",
            result(&ldap.compare(&alice, "mail", "bob@example.com").await.unwrap().0),
        );
        t.note(
            "no attribute",
            result(&ldap.compare(&alice, "telephoneNumber", "1").await.unwrap().0),
        );
        t.note(
            "no entry",
            result(
                &ldap
                    .compare("uid=nobody,ou=people,dc=example,dc=com", "uid", "x")
                    .await
                    .unwrap()
                    .0,
            ),
        );
        t
    })
    .await;
    assert!(t.step("true").starts_with("true: (6,"));
    assert!(t.step("false").starts_with("false: (5,"));
    assert!(t.step("no entry").starts_with("no entry: (32,"));
}

#[tokio::test]
async fn writes_run_under_the_clients_identity_and_successes_are_captured() {
    let pair = Pair::start();
    let t = differential(&pair, |url| async move {
        let mut t = Transcript::default();
        let mut admin = connect(&url).await;
        admin.simple_bind(ROOT_DN, ROOT_PW).await.unwrap().success().unwrap();
        let zoe = "uid=zoe,ou=people,dc=example,dc=com";
        let attrs = vec![
            ("objectClass", HashSet::from(["inetOrgPerson"])),
            ("uid", HashSet::from(["zoe"])),
            ("cn", HashSet::from(["Zoe Zimmer"])),
            ("sn", HashSet::from(["Zimmer"])),
            ("userPassword", HashSet::from(["zoe-secret"])),
        ];
        t.note("add", result(&admin.add(zoe, attrs.clone()).await.unwrap()));
        t.note("add again", result(&admin.add(zoe, attrs).await.unwrap()));
        let mods = vec![
            Mod::Replace("mail", HashSet::from(["zoe@example.com"])),
            Mod::Add("description", HashSet::from(["new hire"])),
        ];
        t.note("modify", result(&admin.modify(zoe, mods).await.unwrap()));
        t.note(
            "bad modify",
            result(
                &admin
                    .modify(zoe, vec![Mod::Add("noSuchAttr", HashSet::from(["x"]))])
                    .await
                    .unwrap(),
            ),
        );
        t.note(
            "modrdn",
            result(&admin.modifydn(zoe, "uid=zed", true, None).await.unwrap()),
        );
        t.note(
            "delete",
            result(&admin.delete("uid=zed,ou=people,dc=example,dc=com").await.unwrap()),
        );
        t.note(
            "delete missing",
            result(&admin.delete("uid=zed,ou=people,dc=example,dc=com").await.unwrap()),
        );

        let mut alice = connect(&url).await;
        let (alice_dn, alice_pw) = person("alice");
        alice
            .simple_bind(&alice_dn, &alice_pw)
            .await
            .unwrap()
            .success()
            .unwrap();
        let own = vec![Mod::Replace("description", HashSet::from(["edited by alice"]))];
        t.note(
            "alice edits herself",
            result(&alice.modify(&alice_dn, own).await.unwrap()),
        );
        let (bob_dn, _) = person("bob");
        let other = vec![Mod::Replace("description", HashSet::from(["edited by alice"]))];
        t.note("alice edits bob", result(&alice.modify(&bob_dn, other).await.unwrap()));
        t.note("alice deletes bob", result(&alice.delete(&bob_dn).await.unwrap()));

        let check = admin
            .search(&alice_dn, Scope::Base, "(objectClass=*)", vec!["description"])
            .await
            .unwrap();
        t.note("alice afterwards", entries(check.0));
        t
    })
    .await;
    assert!(t.step("add").starts_with("add: (0,"));
    assert!(t.step("add again").starts_with("add again: (68,"));
    assert!(t.step("alice edits herself").starts_with("alice edits herself: (0,"));
    assert!(
        t.step("alice edits bob").starts_with("alice edits bob: (50,"),
        "the directory's ACL must apply to the client: {}",
        t.step("alice edits bob")
    );
    assert!(t.step("alice deletes bob").starts_with("alice deletes bob: (50,"));
    assert!(t.step("alice afterwards").contains("edited by alice"));

    let people = |uid: &str| format!("uid={uid},ou=people,dc=example,dc=com");
    assert_eq!(
        pair.proxy.sink.writes(),
        vec![
            (WriteKind::Add, people("zoe")),
            (WriteKind::Modify, people("zoe")),
            (WriteKind::ModifyDn, people("zoe")),
            (WriteKind::Delete, people("zed")),
            (WriteKind::Modify, people("alice")),
        ],
        "exactly the successful writes reach the capture sink"
    );
}

#[tokio::test]
async fn extended_operations_pass_through() {
    let pair = Pair::start();
    let t = differential(&pair, |url| async move {
        let mut t = Transcript::default();
        let mut ldap = connect(&url).await;
        let (alice, alice_pw) = person("alice");
        ldap.simple_bind(&alice, &alice_pw).await.unwrap().success().unwrap();
        let change = PasswordModify {
            user_id: None,
            old_pass: Some(&alice_pw),
            new_pass: Some("alice-new-secret"),
        };
        t.note("password modify", result(&ldap.extended(change).await.unwrap().1));
        t.note(
            "old password",
            result(&ldap.simple_bind(&alice, &alice_pw).await.unwrap()),
        );
        t.note(
            "new password",
            result(&ldap.simple_bind(&alice, "alice-new-secret").await.unwrap()),
        );
        // Multiplexed, see below: not the directory's answer.
        if !protocol_tests::multiplexed() {
            t.note("unknown exop", unknown_exop(&mut ldap).await);
        }
        t
    })
    .await;
    assert!(t.step("password modify").starts_with("password modify: (0,"));
    assert!(t.step("old password").starts_with("old password: (49,"));
    assert!(t.step("new password").starts_with("new password: (0,"));
    if protocol_tests::multiplexed() {
        // The directory cannot run it under the client's identity (the
        // proxied authorization control is critical): refused, never run
        // as the shared connections' identity.
        let mut ldap = connect(&pair.proxy.url()).await;
        let (code, _) = unknown_exop(&mut ldap).await;
        assert_eq!(code.0, 12, "unavailableCriticalExtension: {code:?}");
        return;
    }
    assert!(
        t.step("unknown exop").starts_with("unknown exop: ((2,"),
        "protocolError for an unknown OID: {}",
        t.step("unknown exop")
    );
}

async fn unknown_exop(ldap: &mut Ldap) -> ((u32, String, String, Vec<String>, usize), Option<String>) {
    let unknown = Exop {
        name: Some("1.3.6.1.4.1.55555.1.2".into()),
        val: Some(b"opaque".to_vec()),
    };
    let r = ldap.extended(unknown).await.unwrap();
    let (rc, matched, text, refs, ctrls) = result(&r.1);
    ((rc, matched.into(), text.into(), refs.to_vec(), ctrls), r.0.name)
}

#[tokio::test]
async fn pipelined_operations_on_one_connection() {
    let pair = Pair::start();
    let t = differential(&pair, |url| async move {
        let mut t = Transcript::default();
        let ldap = connect(&url).await;
        let uids = ["alice", "bob", "carol", "dave", "erin", "frank", "nobody"];
        let ops = (0..60).map(|i| {
            let mut ldap = ldap.clone();
            let uid = uids[i % uids.len()];
            async move {
                if i % 2 == 0 {
                    let r = ldap
                        .search(BASE_DN, Scope::Subtree, &format!("(uid={uid})"), vec!["mail"])
                        .await
                        .unwrap();
                    format!("{:?}", (entries(r.0), result(&r.1)))
                } else {
                    let (dn, _) = person(uid);
                    let r = ldap.compare(&dn, "uid", uid).await.unwrap().0;
                    format!("{:?}", result(&r))
                }
            }
        });
        for (i, outcome) in futures_util::future::join_all(ops).await.into_iter().enumerate() {
            t.note(&format!("op {i}"), outcome);
        }
        t
    })
    .await;
    assert_eq!(t.0.len(), 60);
    assert!(t.step("op 0").contains("alice@example.com"));
    assert!(t.step("op 1").contains("(6,"), "compareTrue: {}", t.step("op 1"));
}

#[tokio::test]
async fn abandoned_search_stops_and_the_connection_goes_on() {
    let pair = Pair::start_with_bulk(2500);
    let t = differential(&pair, |url| async move {
        let mut t = Transcript::default();
        let mut ldap = connect(&url).await;
        ldap.simple_bind(ROOT_DN, ROOT_PW).await.unwrap().success().unwrap();
        let mut stream = ldap
            .streaming_search(
                "ou=bulk,dc=example,dc=com",
                Scope::Subtree,
                "(uid=*)",
                vec!["uid", "cn", "mail"],
            )
            .await
            .unwrap();
        let first = stream.next().await.unwrap().map(|e| SearchEntry::construct(e).dn);
        t.note("first entry", first);
        let id = stream.ldap_handle().last_id();
        let mut handle = ldap.clone();
        t.note("abandon", handle.abandon(id).await.is_ok());
        drop(stream);
        t.note("whoami after abandon", whoami(&mut ldap).await);
        let r = ldap
            .search(BASE_DN, Scope::Subtree, "(uid=erin)", vec!["uid"])
            .await
            .unwrap();
        t.note("search after abandon", (entries(r.0), result(&r.1)));
        t
    })
    .await;
    assert!(t.step("whoami after abandon").contains(ROOT_DN));
    assert!(t.step("search after abandon").contains("uid=erin"));
}

#[tokio::test]
async fn unbind_closes_only_that_session() {
    let pair = Pair::start();
    let (_, proxy_url) = pair.urls();
    let mut other = connect(&proxy_url).await;
    let mut leaving = connect(&proxy_url).await;
    leaving.unbind().await.unwrap();
    assert!(
        leaving.extended(WhoAmI).await.is_err(),
        "an unbound connection takes no more operations"
    );
    assert_eq!(whoami(&mut other).await, "", "other sessions carry on");
}
