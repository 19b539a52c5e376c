//! Hundreds of well-behaved clients at once, with mixed reads and writes,
//! while the hostile corpus is replayed on other connections: every
//! well-behaved client still gets exactly the right answers.

use std::collections::HashSet;
use std::time::Duration;

use ldap3::{LdapConnAsync, Mod, Scope, SearchEntry};
use protocol_tests::hostile::corpus;
use protocol_tests::{BASE_DN, ProxyHandle, RawConn, Slapd, answers_root_dse};

const CLIENTS: usize = 200;
const ROUNDS: usize = 5;

/// One client's life: its own entry added, read, compared, modified and
/// deleted, ROUNDS times, plus a search of shared data each round.
async fn client(url: String, n: usize) -> Result<(), String> {
    let (conn, mut ldap) = LdapConnAsync::new(&url).await.map_err(|e| format!("connect: {e}"))?;
    ldap3::drive!(conn);
    ldap.with_timeout(Duration::from_secs(30));
    let fail = |what: &str, e: ldap3::LdapError| format!("client {n}: {what}: {e}");
    ldap.simple_bind("cn=admin,dc=example,dc=com", "secret")
        .await
        .and_then(|r| r.success())
        .map_err(|e| fail("bind", e))?;
    let dn = format!("uid=load{n},ou=people,{BASE_DN}");
    for round in 0..ROUNDS {
        let mail = format!("load{n}.{round}@example.com");
        let attrs = vec![
            ("objectClass", HashSet::from(["inetOrgPerson"])),
            ("cn", HashSet::from(["Load"])),
            ("sn", HashSet::from(["Load"])),
            ("mail", HashSet::from([mail.as_str()])),
        ];
        ldap.add(&dn, attrs)
            .await
            .and_then(|r| r.success())
            .map_err(|e| fail("add", e))?;
        let changed = format!("changed.{mail}");
        ldap.modify(&dn, vec![Mod::Replace("mail", HashSet::from([changed.as_str()]))])
            .await
            .and_then(|r| r.success())
            .map_err(|e| fail("modify", e))?;
        let (entries, _) = ldap
            .search(&dn, Scope::Base, "(objectClass=*)", vec!["mail"])
            .await
            .and_then(|r| r.success())
            .map_err(|e| fail("read back", e))?;
        let got = SearchEntry::construct(entries[0].clone()).attrs["mail"].clone();
        if got != [changed.clone()] {
            return Err(format!("client {n}: read back {got:?}, wrote {changed}"));
        }
        let same = ldap
            .compare(&dn, "mail", &changed)
            .await
            .map_err(|e| fail("compare", e))?;
        if !same.equal().map_err(|e| fail("compare result", e))? {
            return Err(format!("client {n}: compare said unequal"));
        }
        let (people, _) = ldap
            .search(
                &format!("ou=people,{BASE_DN}"),
                Scope::OneLevel,
                "(uid=alice)",
                vec!["mail"],
            )
            .await
            .and_then(|r| r.success())
            .map_err(|e| fail("search", e))?;
        if people.len() != 1 {
            return Err(format!("client {n}: {} entries for uid=alice", people.len()));
        }
        ldap.delete(&dn)
            .await
            .and_then(|r| r.success())
            .map_err(|e| fail("delete", e))?;
    }
    ldap.unbind().await.map_err(|e| fail("unbind", e))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_clients_get_right_answers_while_hostile_input_flies() {
    let slapd = Slapd::start();
    let proxy = ProxyHandle::start(&[slapd.url()]);
    let addr = proxy.addr();
    let hostile = tokio::spawn(async move {
        let mut sent = 0;
        for _ in 0..3 {
            for case in corpus() {
                let mut conn = RawConn::connect(addr).await;
                conn.send(&case.bytes).await;
                conn.finish().await;
                let _ = conn.transcript(Duration::from_millis(50)).await;
                sent += 1;
            }
        }
        sent
    });
    let clients: Vec<_> = (0..CLIENTS).map(|n| tokio::spawn(client(proxy.url(), n))).collect();
    let mut errors = Vec::new();
    for result in futures_util::future::join_all(clients).await {
        if let Err(e) = result.unwrap() {
            errors.push(e);
        }
    }
    assert!(hostile.await.unwrap() > 60, "the hostile cases ran alongside");
    assert!(
        errors.is_empty(),
        "{} of {CLIENTS} clients failed: {errors:#?}",
        errors.len()
    );
    assert!(answers_root_dse(addr).await);
}
