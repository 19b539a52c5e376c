//! What clients get when things go wrong: an unreachable or dying directory,
//! malformed and oversized PDUs, limits, StartTLS without TLS, shutdown.

use std::process::Command;
use std::time::Duration;

use ldap3::exop::WhoAmI;
use ldap3::{LdapConnAsync, Scope};
use ldapsync::config::DirectoryLoss;
use ldapsync::proxy::message::STARTTLS_OID;
use protocol_tests::{
    BASE_DN, ProxyHandle, RawConn, Received, Slapd, answers_root_dse, decode, expect_notice_of_disconnection,
    extended_request, root_dse_search,
};
use rasn_ldap::{ProtocolOp, ResultCode};

/// A loopback URL where nothing listens.
fn dead_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("ldap://{}", listener.local_addr().unwrap())
}

async fn connect(url: &str) -> ldap3::Ldap {
    let (conn, ldap) = LdapConnAsync::new(url).await.expect("connecting to ldapsync");
    ldap3::drive!(conn);
    ldap
}

/// By default a session that cannot reach the directory ends as a session
/// with the directory itself would: closed, no answer, no hang.
#[tokio::test]
async fn an_unreachable_directory_closes_the_session_as_the_directory_would() {
    let proxy = ProxyHandle::start(&[dead_url(), dead_url()]);
    let mut conn = RawConn::connect(proxy.addr()).await;
    conn.send(&root_dse_search(1)).await;
    assert_eq!(conn.receive(Duration::from_secs(10)).await, Received::Closed);
}

/// ldap-utils report an unreachable directory through ldapsync as
/// directly: "Can't contact LDAP server (-1)", SERVER_DOWN, the error
/// failover scripts and libraries act on. One difference remains: directly
/// the TCP connect is refused, so libldap fails at the bind (exit 255);
/// through ldapsync the connect succeeds and the connection closes after
/// the bind is sent, so it fails waiting for the result (exit 254).
#[test]
fn ldap_utils_see_an_unreachable_directory_through_ldapsync_as_directly() {
    let dead = dead_url();
    let proxy = ProxyHandle::start(std::slice::from_ref(&dead));
    let whoami = |url: &str| {
        let out = Command::new("ldapwhoami")
            .args(["-x", "-H", url, "-o", "nettimeout=10"])
            .output()
            .expect("running ldapwhoami");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        // "ldap_sasl_bind(SIMPLE): Can't contact …" → "Can't contact …"
        let error = stderr
            .split_once(": ")
            .map(|(_, e)| e.trim().to_owned())
            .unwrap_or(stderr);
        (out.status.success(), error)
    };
    let direct = whoami(&dead);
    assert_eq!(direct, (false, "Can't contact LDAP server (-1)".to_owned()));
    assert_eq!(whoami(&proxy.url()), direct);
}

/// `on_directory_loss = "notice"`: the client is told instead, and the
/// session stays open for the next try.
#[tokio::test]
async fn with_notice_an_unreachable_directory_answers_unavailable() {
    let proxy = ProxyHandle::start_with(&[dead_url(), dead_url()], |c| {
        c.on_directory_loss = DirectoryLoss::Notice;
    });
    let mut ldap = connect(&proxy.url()).await;
    ldap.with_timeout(Duration::from_secs(10));
    let bind = ldap.simple_bind("cn=admin,dc=example,dc=com", "secret").await.unwrap();
    assert_eq!(bind.rc, 52, "unavailable: {bind:?}");
    assert!(
        bind.text.contains("no directory server reachable"),
        "diagnostic: {}",
        bind.text
    );
    assert!(!bind.text.contains("secret"), "no credential in a diagnostic");
    let search = ldap
        .search(BASE_DN, Scope::Base, "(objectClass=*)", vec!["dc"])
        .await
        .unwrap();
    assert_eq!(search.1.rc, 52);
    let exop = ldap.extended(WhoAmI).await.unwrap();
    assert_eq!(exop.1.rc, 52);
}

#[tokio::test]
async fn next_directory_url_is_tried_when_the_first_is_down() {
    let slapd = Slapd::start();
    let proxy = ProxyHandle::start(&[dead_url(), slapd.url()]);
    let mut ldap = connect(&proxy.url()).await;
    let r = ldap
        .search(BASE_DN, Scope::Base, "(objectClass=*)", vec!["dc"])
        .await
        .unwrap();
    assert_eq!((r.0.len(), r.1.rc), (1, 0));
}

/// By default the client sees what it would see directly when the
/// directory dies: its connection closes, with no notice of ldapsync's.
#[tokio::test]
async fn directory_killed_mid_session_closes_the_client_connection_and_proxy_recovers() {
    let mut slapd = Slapd::start();
    let proxy = ProxyHandle::start(&[slapd.url()]);
    let mut conn = RawConn::connect(proxy.addr()).await;
    conn.send(&root_dse_search(1)).await;
    assert!(matches!(conn.receive(Duration::from_secs(5)).await, Received::Pdu(_)));
    slapd.kill();
    loop {
        // The search's remaining PDUs may still be in flight.
        match conn.receive(Duration::from_secs(10)).await {
            Received::Pdu(pdu) => assert_ne!(decode(&pdu).message_id, 0, "no Notice of Disconnection"),
            Received::Closed => break,
            Received::Silent => panic!("the client connection stays open after the directory died"),
        }
    }
    slapd.restart();
    assert!(
        answers_root_dse(proxy.addr()).await,
        "new sessions are served once the directory is back"
    );
}

#[tokio::test]
async fn with_notice_a_directory_killed_mid_session_is_announced_to_the_client() {
    let mut slapd = Slapd::start();
    let proxy = ProxyHandle::start_with(&[slapd.url()], |c| c.on_directory_loss = DirectoryLoss::Notice);
    let mut conn = RawConn::connect(proxy.addr()).await;
    conn.send(&root_dse_search(1)).await;
    assert!(matches!(conn.receive(Duration::from_secs(5)).await, Received::Pdu(_)));
    slapd.kill();
    let diagnostic = loop {
        // The search's remaining PDUs may still be in flight.
        match conn.receive(Duration::from_secs(10)).await {
            Received::Pdu(pdu) if decode(&pdu).message_id == 0 => {
                let ProtocolOp::ExtendedResp(notice) = decode(&pdu).protocol_op else {
                    panic!("unsolicited PDU is not a notice");
                };
                assert_eq!(notice.result_code, ResultCode::Unavailable);
                break notice.diagnostic_message.0;
            }
            Received::Pdu(_) => continue,
            other => panic!("expected a Notice of Disconnection, got {other:?}"),
        }
    };
    assert!(diagnostic.contains("closed the connection"), "{diagnostic}");
    assert_eq!(conn.receive(Duration::from_secs(5)).await, Received::Closed);

    slapd.restart();
    assert!(
        answers_root_dse(proxy.addr()).await,
        "new sessions are served once the directory is back"
    );
}

#[tokio::test]
async fn malformed_pdus_get_a_notice_of_disconnection_and_others_carry_on() {
    let slapd = Slapd::start();
    let proxy = ProxyHandle::start(&[slapd.url()]);
    let mut bystander = RawConn::connect(proxy.addr()).await;
    let cases: &[(&str, &[u8])] = &[
        ("outer tag is not a SEQUENCE", &[0x04, 0x00]),
        (
            "indefinite length",
            &[0x30, 0x80, 0x02, 0x01, 0x01, 0x42, 0x00, 0x00, 0x00],
        ),
        ("9-octet length", &[0x30, 0x89, 0, 0, 0, 0, 0, 0, 0, 0, 5]),
        (
            "messageID is an OCTET STRING",
            &[0x30, 0x05, 0x04, 0x01, 0x01, 0x42, 0x00],
        ),
        ("protocolOp is universal", &[0x30, 0x05, 0x02, 0x01, 0x01, 0x30, 0x00]),
        (
            "protocolOp longer than the PDU",
            &[0x30, 0x05, 0x02, 0x01, 0x01, 0x63, 0x09],
        ),
    ];
    for (name, bytes) in cases {
        let mut conn = RawConn::connect(proxy.addr()).await;
        conn.send(bytes).await;
        let diagnostic = expect_notice_of_disconnection(&mut conn, ResultCode::ProtocolError).await;
        assert!(!diagnostic.is_empty(), "{name}: the notice says why");
        bystander.send(&root_dse_search(7)).await;
        assert!(
            matches!(bystander.receive(Duration::from_secs(5)).await, Received::Pdu(_)),
            "{name}: other sessions carry on"
        );
        while let Received::Pdu(_) = bystander.receive(Duration::from_millis(50)).await {}
    }
}

#[tokio::test]
async fn truncated_pdu_at_end_of_stream_is_not_relayed() {
    let slapd = Slapd::start();
    let proxy = ProxyHandle::start(&[slapd.url()]);
    let mut conn = RawConn::connect(proxy.addr()).await;
    let whole = root_dse_search(1);
    conn.send(&whole[..whole.len() - 3]).await;
    assert_eq!(
        conn.receive(Duration::from_millis(300)).await,
        Received::Silent,
        "half a PDU is not answered"
    );
    conn.send(&whole[whole.len() - 3..]).await;
    assert!(
        matches!(conn.receive(Duration::from_secs(5)).await, Received::Pdu(_)),
        "the completed PDU is relayed"
    );
}

#[tokio::test]
async fn oversized_pdu_is_refused_before_it_is_read() {
    let slapd = Slapd::start();
    let proxy = ProxyHandle::start_with(&[slapd.url()], |c| c.max_client_pdu = 4096);
    let mut conn = RawConn::connect(proxy.addr()).await;
    // Announce 1 MiB and send only the header: the proxy must not wait for it.
    conn.send(&[0x30, 0x83, 0x10, 0x00, 0x00]).await;
    let diagnostic = expect_notice_of_disconnection(&mut conn, ResultCode::ProtocolError).await;
    assert!(diagnostic.contains("over the limit of 4096"), "{diagnostic}");
    assert!(answers_root_dse(proxy.addr()).await);
}

#[tokio::test]
async fn starttls_is_refused_while_no_tls_is_configured() {
    let slapd = Slapd::start();
    let proxy = ProxyHandle::start(&[slapd.url()]);
    let mut conn = RawConn::connect(proxy.addr()).await;
    conn.send(&extended_request(3, STARTTLS_OID)).await;
    let Received::Pdu(pdu) = conn.receive(Duration::from_secs(5)).await else {
        panic!("no answer to StartTLS");
    };
    let message = decode(&pdu);
    let ProtocolOp::ExtendedResp(response) = message.protocol_op else {
        panic!("not an extended response: {message:?}");
    };
    assert_eq!((message.message_id, response.result_code), (3, ResultCode::Unavailable));
    assert_eq!(response.response_name.as_deref(), Some(STARTTLS_OID.as_bytes()));
    conn.send(&root_dse_search(4)).await;
    assert!(
        matches!(conn.receive(Duration::from_secs(5)).await, Received::Pdu(_)),
        "the session stays usable in plain text"
    );
}

#[tokio::test]
async fn connections_over_the_limit_are_told_why() {
    let slapd = Slapd::start();
    let proxy = ProxyHandle::start_with(&[slapd.url()], |c| c.max_connections = 2);
    let mut first = RawConn::connect(proxy.addr()).await;
    let mut second = RawConn::connect(proxy.addr()).await;
    first.send(&root_dse_search(1)).await;
    second.send(&root_dse_search(1)).await;
    assert!(matches!(first.receive(Duration::from_secs(5)).await, Received::Pdu(_)));
    assert!(matches!(second.receive(Duration::from_secs(5)).await, Received::Pdu(_)));
    let mut third = RawConn::connect(proxy.addr()).await;
    let diagnostic = expect_notice_of_disconnection(&mut third, ResultCode::Unavailable).await;
    assert!(diagnostic.contains("too many connections"), "{diagnostic}");
    drop(first);
    // The freed slot is usable once the proxy has seen the close.
    let mut served = false;
    for _ in 0..50 {
        if answers_root_dse(proxy.addr()).await {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served, "a closed connection frees its slot");
}

#[tokio::test]
async fn a_few_addresses_cannot_take_every_slot_a_new_client_is_still_served() {
    let slapd = Slapd::start();
    let proxy = ProxyHandle::start_with(&[slapd.url()], |c| c.max_connections = 20);
    let hog = "127.0.0.2".parse().unwrap();
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..20 {
        let mut conn = RawConn::connect_from(hog, proxy.addr()).await;
        conn.send(&root_dse_search(1)).await;
        let Received::Pdu(first) = conn.receive(Duration::from_secs(10)).await else {
            panic!("no answer");
        };
        // The root DSE's entry, or a Notice of Disconnection (id 0).
        match decode(&first).message_id {
            0 => refused += 1,
            _ => held.push(conn),
        }
    }
    assert_eq!((held.len(), refused), (18, 2), "the last tenth is kept for others");
    for source in ["127.0.0.3", "127.0.0.4"] {
        let mut control = RawConn::connect_from(source.parse().unwrap(), proxy.addr()).await;
        control.send(&root_dse_search(1)).await;
        let Received::Pdu(first) = control.receive(Duration::from_secs(10)).await else {
            panic!("no answer");
        };
        assert_eq!(decode(&first).message_id, 1, "a client from {source} is served");
    }
}

#[tokio::test]
async fn idle_sessions_are_closed_with_a_notice() {
    let slapd = Slapd::start();
    let proxy = ProxyHandle::start_with(&[slapd.url()], |c| c.idle_timeout = Duration::from_millis(300));
    let mut conn = RawConn::connect(proxy.addr()).await;
    conn.send(&root_dse_search(1)).await;
    while let Received::Pdu(pdu) = conn.receive(Duration::from_secs(5)).await {
        if matches!(decode(&pdu).protocol_op, ProtocolOp::SearchResDone(_)) {
            break;
        }
    }
    let diagnostic = expect_notice_of_disconnection(&mut conn, ResultCode::Unavailable).await;
    assert!(diagnostic.contains("idle"), "{diagnostic}");
}

#[tokio::test]
async fn a_session_in_use_outlives_the_idle_timeout() {
    let slapd = Slapd::start();
    let proxy = ProxyHandle::start_with(&[slapd.url()], |c| c.idle_timeout = Duration::from_secs(1));
    let mut conn = RawConn::connect(proxy.addr()).await;
    let started = std::time::Instant::now();
    let mut id = 0;
    // A request every 200 ms for well over twice the idle timeout.
    while started.elapsed() < Duration::from_millis(2500) {
        id += 1;
        conn.send(&root_dse_search(id)).await;
        loop {
            match conn.receive(Duration::from_secs(5)).await {
                Received::Pdu(pdu) => match decode(&pdu).protocol_op {
                    ProtocolOp::SearchResDone(_) => break,
                    ProtocolOp::ExtendedResp(_) => panic!("closed after {:?} in use", started.elapsed()),
                    _ => {}
                },
                other => panic!("no answer to request {id}: {other:?}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let diagnostic = expect_notice_of_disconnection(&mut conn, ResultCode::Unavailable).await;
    assert!(diagnostic.contains("idle"), "{diagnostic}");
}

#[tokio::test]
async fn shutdown_tells_clients_and_stops_listening() {
    let slapd = Slapd::start();
    let mut proxy = ProxyHandle::start(&[slapd.url()]);
    let addr = proxy.addr();
    let mut conn = RawConn::connect(addr).await;
    conn.send(&root_dse_search(1)).await;
    assert!(matches!(conn.receive(Duration::from_secs(5)).await, Received::Pdu(_)));
    while let Received::Pdu(_) = conn.receive(Duration::from_millis(100)).await {}
    let stopped = tokio::task::spawn_blocking(move || {
        proxy.shutdown();
        proxy
    });
    let diagnostic = expect_notice_of_disconnection(&mut conn, ResultCode::Unavailable).await;
    assert!(diagnostic.contains("shutting down"), "{diagnostic}");
    let _proxy = stopped.await.unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer listening"
    );
}

/// A listening socket whose accept queue is full: further connections get
/// no answer to their SYN, as from a host that is down or filtered. Keep it
/// (and the connections that fill it) alive while it is used.
fn black_hole() -> (String, tokio::net::TcpListener, Vec<std::net::TcpStream>) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    while let Ok(stream) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
        fillers.push(stream);
        assert!(fillers.len() < 64, "the accept queue does not fill");
    }
    (format!("ldap://{addr}"), listener, fillers)
}

fn upstream_metric(family: &str, url: &str) -> i64 {
    use ldapsync::metrics::{METRICS, UrlLabel};
    let label = UrlLabel {
        url: url.parse::<ldapsync::config::LdapUrl>().unwrap().to_string(),
    };
    match family {
        "up" => METRICS.upstream_up.get_or_create(&label).get(),
        "connect_failures" => METRICS.upstream_connect_failures.get_or_create(&label).get() as i64,
        "sessions" => METRICS.upstream_sessions.get_or_create(&label).get(),
        _ => unreachable!(),
    }
}

/// A black-holed first URL costs the first session its connect timeout;
/// the sessions after it know it is down and go to the next URL without
/// trying it (measured by the connect attempts it got, not by a clock).
#[tokio::test(flavor = "multi_thread")]
async fn a_black_holed_url_is_tried_once_not_by_every_session() {
    let (hole, _listener, _fillers) = black_hole();
    let slapd = Slapd::start();
    let proxy = ProxyHandle::start_with(&[hole.clone(), slapd.url()], |c| {
        c.connect_timeout = Duration::from_secs(1);
    });
    for session in 0..5 {
        assert!(answers_root_dse(proxy.addr()).await, "session {session} is served");
    }
    assert_eq!(
        upstream_metric("connect_failures", &hole),
        1,
        "only the first session tried it"
    );
    assert_eq!(upstream_metric("up", &hole), 0);
}

/// A URL found down is probed and re-admitted once it answers: new
/// sessions then prefer it again, as the configured order says. Shown by
/// freezing the second directory (it accepts and never answers): a session
/// still sent there first would hang.
#[tokio::test(flavor = "multi_thread")]
async fn a_down_url_is_readmitted_when_a_probe_finds_it_answering() {
    let mut first = Slapd::start();
    let second = Slapd::start();
    let proxy = ProxyHandle::start(&[first.url(), second.url()]);
    first.kill();
    assert!(answers_root_dse(proxy.addr()).await, "served by the second meanwhile");
    assert_eq!(upstream_metric("up", &first.url()), 0);

    first.restart();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while upstream_metric("up", &first.url()) != 1 {
        assert!(tokio::time::Instant::now() < deadline, "the probe never re-admitted it");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    second.freeze();
    assert!(
        answers_root_dse(proxy.addr()).await,
        "new sessions go to the first URL again"
    );
    second.thaw();
}

/// `balance = "round-robin"` over three real directories: 30 sessions
/// open at once are spread evenly, closing them gives their slots back, and
/// a weight of 2 doubles a URL's share (least-connections and tiers are
/// unit-tested in `proxy::pool`).
#[tokio::test(flavor = "multi_thread")]
async fn balanced_sessions_spread_over_the_directories_by_weight() {
    use ldapsync::config::Balance;
    let slapds = [Slapd::start(), Slapd::start(), Slapd::start()];
    let urls: Vec<String> = slapds.iter().map(Slapd::url).collect();
    let open = |proxy: &ProxyHandle, n: usize| {
        let addr = proxy.addr();
        async move {
            let mut sessions = Vec::new();
            for _ in 0..n {
                let mut conn = RawConn::connect(addr).await;
                conn.send(&root_dse_search(1)).await;
                assert!(matches!(conn.receive(Duration::from_secs(5)).await, Received::Pdu(_)));
                sessions.push(conn);
            }
            sessions
        }
    };
    let spread = |urls: &[String]| urls.iter().map(|u| upstream_metric("sessions", u)).collect::<Vec<_>>();

    let even = ProxyHandle::start_with(&urls, |c| c.balance = Balance::RoundRobin);
    let sessions = open(&even, 30).await;
    assert_eq!(spread(&urls), [10, 10, 10]);
    drop(sessions);
    // Closed sessions give their slots back.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while spread(&urls) != [0, 0, 0] {
        assert!(
            tokio::time::Instant::now() < deadline,
            "sessions still counted: {:?}",
            spread(&urls)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(even);

    let weighted = ProxyHandle::start_with(&urls, |c| {
        c.balance = Balance::RoundRobin;
        c.weight.insert(urls[0].clone(), 2);
    });
    let _sessions = open(&weighted, 40).await;
    assert_eq!(spread(&urls), [20, 10, 10]);
}

/// A directory that accepts connections but no longer answers (frozen) is
/// found by the health probe of URLs that are up, before sessions hang on
/// it: new sessions go to the next URL.
#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_directory_is_found_by_its_health_probe_and_skipped() {
    let first = Slapd::start();
    let second = Slapd::start();
    let proxy = ProxyHandle::start_with(&[first.url(), second.url()], |c| {
        c.connect_timeout = Duration::from_secs(1);
        c.health_interval = Duration::from_millis(200);
    });
    assert!(answers_root_dse(proxy.addr()).await);
    first.freeze();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while upstream_metric("up", &first.url()) != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the probe never found it frozen"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(answers_root_dse(proxy.addr()).await, "served by the second URL");
    first.thaw();
}
