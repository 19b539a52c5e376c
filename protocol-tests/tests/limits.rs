//! Limits against abuse, each exercised by a real client: connections per
//! client address, operations outstanding per connection, and failed binds
//! per client address.

use std::time::Duration;

use ldap3::LdapConnAsync;
use ldapsync_fixtures::{BASE_DN, Slapd, person};
use protocol_tests::{
    ProxyHandle, RawConn, answers_root_dse, expect_notice_of_disconnection, persistent_search, response_to, result_of,
    root_dse_search,
};
use rasn_ldap::{LdapMessage, ProtocolOp, ResultCode};

#[tokio::test]
async fn connections_from_one_address_are_limited() {
    let slapd = Slapd::start();
    let proxy = ProxyHandle::start_with(&[slapd.url()], |c| c.max_connections_per_address = 2);
    let mut first = RawConn::connect(proxy.addr()).await;
    let mut second = RawConn::connect(proxy.addr()).await;
    for conn in [&mut first, &mut second] {
        conn.send(&root_dse_search(1)).await;
        assert_eq!(result_of(&response_to(conn, 1).await).0, ResultCode::Success);
    }
    let mut third = RawConn::connect(proxy.addr()).await;
    let why = expect_notice_of_disconnection(&mut third, ResultCode::Unavailable).await;
    assert!(why.contains("too many connections from your address"), "{why}");
    drop(first);
    // The slot frees once the proxy has seen the connection end.
    let mut freed = false;
    for _ in 0..50 {
        if answers_root_dse(proxy.addr()).await {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(freed, "a closed connection gives its slot back");
}

#[tokio::test]
async fn operations_past_the_outstanding_limit_are_answered_busy() {
    let slapd = Slapd::start();
    let proxy = ProxyHandle::start_with(&[slapd.url()], |c| {
        c.max_outstanding = 2;
        c.shutdown_grace = Duration::from_millis(200);
    });
    let mut conn = RawConn::connect(proxy.addr()).await;
    conn.send(&persistent_search(1, BASE_DN)).await;
    conn.send(&persistent_search(2, BASE_DN)).await;
    conn.send(&root_dse_search(3)).await;
    let (code, why) = result_of(&response_to(&mut conn, 3).await);
    assert_eq!(code, ResultCode::Busy, "{why}");
    assert!(why.contains("too many operations outstanding"), "{why}");
    // Abandoning one makes room (RFC 4511 §4.11: no response to either),
    // once the directory has had a moment to stop it: until then it still
    // counts, so that abandon-and-ask-again cannot escape the limit.
    let abandon = LdapMessage::new(4, ProtocolOp::AbandonRequest(rasn_ldap::AbandonRequest(1)));
    conn.send(&[protocol_tests::encode(&abandon), root_dse_search(5)].concat())
        .await;
    let (code, why) = result_of(&response_to(&mut conn, 5).await);
    assert_eq!(code, ResultCode::Busy, "the abandoned search still counts: {why}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    conn.send(&root_dse_search(6)).await;
    assert_eq!(result_of(&response_to(&mut conn, 6).await).0, ResultCode::Success);
}

#[tokio::test]
async fn repeated_failed_binds_from_an_address_are_refused_for_a_while() {
    let slapd = Slapd::start();
    let proxy = ProxyHandle::start_with(&[slapd.url()], |c| {
        c.max_failed_binds = 3;
        c.failed_bind_window = Duration::from_millis(1500);
    });
    let (conn, mut ldap) = LdapConnAsync::new(&proxy.url()).await.unwrap();
    ldap3::drive!(conn);
    let (dn, password) = person("alice");
    for attempt in 1..=3 {
        let bind = ldap.simple_bind(&dn, "guess").await.unwrap();
        assert_eq!(bind.rc, 49, "attempt {attempt}: invalidCredentials from the directory");
    }
    let blocked = ldap.simple_bind(&dn, &password).await.unwrap();
    assert_eq!(blocked.rc, 53, "even the right password waits: {blocked:?}");
    assert!(blocked.text.contains("too many failed binds"), "{}", blocked.text);
    assert!(!blocked.text.contains(&password), "no credential in a diagnostic");

    // Another connection from the same address is refused too.
    let (conn, mut other) = LdapConnAsync::new(&proxy.url()).await.unwrap();
    ldap3::drive!(conn);
    assert_eq!(other.simple_bind(&dn, &password).await.unwrap().rc, 53);

    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(
        ldap.simple_bind(&dn, &password).await.unwrap().rc,
        0,
        "after the window"
    );
}
