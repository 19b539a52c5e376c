//! Conformance mode: crafted RFC 4511 violations from each side appear in
//! the report with their rule and clause, a clean exchange with a real
//! directory reports nothing, and what is relayed does not change.

use std::path::Path;
use std::time::Duration;

use ldap3::{LdapConnAsync, Scope};
use protocol_tests::hostile::{self, Expect};
use protocol_tests::{BASE_DN, ProxyHandle, RawConn, Slapd, answers_root_dse, persistent_search, response_to};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn proxy_reporting(upstream: &str, report: &Path) -> ProxyHandle {
    let report = report.to_owned();
    ProxyHandle::start_with(&[upstream.to_owned()], move |c| {
        c.conformance_report = Some(report);
        c.shutdown_grace = Duration::from_millis(200);
    })
}

/// (rule, from, message id) of every line of the report.
fn violations(report: &Path) -> Vec<(String, String, Option<i64>)> {
    std::fs::read_to_string(report)
        .unwrap_or_default()
        .lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line).unwrap();
            assert!(v["clause"].as_str().unwrap().starts_with("RFC 4511"), "{line}");
            assert!(v["session"].as_u64().is_some() && v["at"].is_string(), "{line}");
            (
                v["rule"].as_str().unwrap().to_owned(),
                v["from"].as_str().unwrap().to_owned(),
                v["message_id"].as_i64(),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_clean_exchange_with_a_real_directory_reports_nothing() {
    let slapd = Slapd::start();
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.jsonl");
    let proxy = proxy_reporting(&slapd.url(), &report);
    let (conn, mut ldap) = LdapConnAsync::new(&proxy.url()).await.unwrap();
    ldap3::drive!(conn);
    ldap.simple_bind("cn=admin,dc=example,dc=com", "secret")
        .await
        .unwrap()
        .success()
        .unwrap();
    ldap.search(BASE_DN, Scope::Subtree, "(objectClass=*)", vec!["*"])
        .await
        .unwrap()
        .success()
        .unwrap();
    let _ = ldap
        .compare("uid=alice,ou=people,dc=example,dc=com", "uid", "alice")
        .await
        .unwrap();
    ldap.delete("uid=frank,ou=people,dc=example,dc=com")
        .await
        .unwrap()
        .success()
        .unwrap();
    let missing = ldap.delete("uid=nobody,ou=people,dc=example,dc=com").await.unwrap();
    assert_eq!(missing.rc, 32);
    ldap.unbind().await.unwrap();
    // A persistent search with its intermediate messages, abandoned.
    let mut raw = RawConn::connect(proxy.addr()).await;
    raw.send(&persistent_search(1, BASE_DN)).await;
    let _ = raw.transcript(Duration::from_millis(300)).await;
    assert_eq!(violations(&report), vec![], "no false alarm");
}

#[tokio::test]
async fn client_violations_are_reported_and_still_relayed() {
    let slapd = Slapd::start();
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.jsonl");
    let proxy = proxy_reporting(&slapd.url(), &report);
    let cases = hostile::conformance_violations();
    for case in &cases {
        let mut conn = RawConn::connect(proxy.addr()).await;
        conn.send(&case.bytes).await;
        let _ = response_to(&mut conn, case.answered_by).await;
    }
    let found = violations(&report);
    for case in &cases {
        let reported = |(r, from, i): &(String, String, Option<i64>)| {
            r == case.rule && from == "client" && *i == Some(case.message_id)
        };
        assert!(
            found.iter().any(reported),
            "{} for message {} missing from {found:#?}",
            case.rule,
            case.message_id
        );
    }
    // The whole hostile corpus (filters nested 10,000 deep included): what
    // is relayed is still relayed, and conformance mode survives it.
    for case in hostile::corpus() {
        let mut conn = RawConn::connect(proxy.addr()).await;
        conn.send(&case.bytes).await;
        let (pdus, _) = conn.transcript(Duration::from_millis(300)).await;
        if case.expect == Expect::SameAsDirectory {
            assert!(!pdus.is_empty(), "{} is answered", case.name);
        }
        assert!(answers_root_dse(proxy.addr()).await, "alive after {}", case.name);
    }
}

/// A directory that breaks the rules on purpose: it reads a request and
/// answers with `answer`, whatever was asked.
async fn misbehaving_directory(answer: Vec<u8>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ldap://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                if socket.read(&mut buf).await.unwrap_or(0) > 0 {
                    let _ = socket.write_all(&answer).await;
                }
                let _ = socket.read(&mut buf).await;
            });
        }
    });
    url
}

#[tokio::test]
async fn directory_violations_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    // (rule, what the directory sends in answer to a bind with message id 1)
    let cases = hostile::directory_violations();
    for (rule, answer, id) in cases {
        let report = dir.path().join(format!("{rule}.jsonl"));
        let upstream = misbehaving_directory(answer).await;
        let proxy = proxy_reporting(&upstream, &report);
        let mut conn = RawConn::connect(proxy.addr()).await;
        conn.send(&hostile::simple_bind(1)).await;
        let _ = conn.transcript(Duration::from_millis(500)).await;
        let found = violations(&report);
        assert!(
            found
                .iter()
                .any(|(r, from, i)| r == rule && from == "directory" && *i == id),
            "{rule}: {found:#?}"
        );
    }
}
