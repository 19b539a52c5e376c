//! The hostile-input corpus of `protocol_tests::hostile`, replayed through
//! ldapsync and directly against slapd; each case asserts its expected
//! behaviour, and ldapsync must answer a well-behaved client after each.

use std::time::Duration;

use std::net::SocketAddr;

use protocol_tests::hostile::{self, Expect, corpus};
use protocol_tests::{ProxyHandle, RawConn, Received, Slapd, answers_root_dse, decode, persistent_search};
use rasn_ldap::{ProtocolOp, ResultCode};

async fn replay(addr: SocketAddr, bytes: &[u8], then_eof: bool) -> (Vec<bytes::Bytes>, Received) {
    let mut conn = RawConn::connect(addr).await;
    conn.send(bytes).await;
    if then_eof {
        conn.finish().await;
    }
    conn.transcript(Duration::from_millis(700)).await
}

/// Checks one case; `Err` says what went wrong.
async fn check(case: &protocol_tests::hostile::Case, proxy: SocketAddr, direct: SocketAddr) -> Result<(), String> {
    let ((proxied, proxied_end), (directly, direct_end)) = tokio::join!(
        replay(proxy, &case.bytes, case.then_eof),
        replay(direct, &case.bytes, case.then_eof)
    );
    match case.expect {
        Expect::SameAsDirectory => (proxied == directly && proxied_end == direct_end)
            .then_some(())
            .ok_or_else(|| {
                format!("directly {directly:02x?} {direct_end:?}, through ldapsync {proxied:02x?} {proxied_end:?}")
            }),
        Expect::ProtocolErrorNotice => match (proxied.as_slice(), &proxied_end) {
            ([notice], Received::Closed) => match decode(notice).protocol_op {
                ProtocolOp::ExtendedResp(r) if r.result_code == ResultCode::ProtocolError => Ok(()),
                other => Err(format!("expected a protocolError notice, got {other:?}")),
            },
            other => Err(format!("expected one notice then close, got {other:02x?}")),
        },
        Expect::ClosedSilently => (proxied.is_empty() && proxied_end == Received::Closed)
            .then_some(())
            .ok_or_else(|| format!("expected a silent close, got {proxied:02x?} {proxied_end:?}")),
        Expect::NothingYet => (proxied.is_empty() && proxied_end == Received::Silent)
            .then_some(())
            .ok_or_else(|| format!("expected silence, got {proxied:02x?} {proxied_end:?}")),
    }
}

#[tokio::test]
async fn every_hostile_case_gets_its_expected_answer_and_ldapsync_stays_up() {
    let direct = Slapd::start();
    let behind = Slapd::start();
    let proxy = ProxyHandle::start(&[behind.url()]);
    let (proxy_addr, direct_addr) = (proxy.addr(), direct.addr());
    // Cases are independent connections: run them at once.
    let runs = corpus().into_iter().map(|case| {
        tokio::spawn(async move {
            let outcome = check(&case, proxy_addr, direct_addr).await;
            let alive = answers_root_dse(proxy_addr).await;
            (case.name, case.rule, outcome, alive)
        })
    });
    let mut failures = Vec::new();
    for run in futures_util::future::join_all(runs).await {
        let (name, rule, outcome, alive) = run.unwrap();
        if let Err(why) = outcome {
            failures.push(format!("{name} ({rule}): {why}"));
        }
        if !alive {
            failures.push(format!("{name} ({rule}): ldapsync stopped answering"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// (message id, operation, result code) of each PDU: the shape of an
/// exchange, without entry contents that differ between two directories.
fn shape(pdus: &[bytes::Bytes]) -> Vec<(u32, &'static str, Option<ResultCode>)> {
    pdus.iter()
        .map(|pdu| {
            let m = decode(pdu);
            let (op, code) = match &m.protocol_op {
                ProtocolOp::SearchResEntry(_) => ("entry", None),
                ProtocolOp::SearchResDone(d) => ("done", Some(d.0.result_code)),
                ProtocolOp::IntermediateResponse(_) => ("intermediate", None),
                ProtocolOp::ExtendedResp(r) => ("extended", Some(r.result_code)),
                _ => ("other", None),
            };
            (m.message_id, op, code)
        })
        .collect()
}

#[tokio::test]
async fn a_message_id_reused_while_outstanding_is_a_protocol_error_that_ends_the_session() {
    // RFC 4511 §4.1.1.1 forbids it. Relayed, the second request's answers
    // would be indistinguishable from the first's (and a write's capture
    // ambiguous): ldapsync ends the session as for any other protocol error.
    let behind = Slapd::start();
    let proxy = ProxyHandle::start_with(&[behind.url()], |c| c.shutdown_grace = Duration::from_millis(200));
    let mut bytes = persistent_search(1, "ou=groups,dc=example,dc=com");
    bytes.extend(hostile::root_dse(1));
    bytes.extend(hostile::root_dse(2));
    let (proxied, _) = replay(proxy.addr(), &bytes, false).await;
    let shape = shape(&proxied);
    assert_eq!(
        shape.last(),
        Some(&(0, "extended", Some(ResultCode::ProtocolError))),
        "a Notice of Disconnection last: {shape:?}"
    );
    assert!(
        !shape.iter().any(|(id, ..)| *id == 2),
        "nothing after the reuse is relayed: {shape:?}"
    );
    assert!(answers_root_dse(proxy.addr()).await, "other sessions are served");
}

#[tokio::test]
async fn a_client_trickling_bytes_is_cut_at_the_idle_timeout_and_others_are_served() {
    let slapd = Slapd::start();
    let proxy = ProxyHandle::start_with(&[slapd.url()], |c| c.idle_timeout = Duration::from_secs(1));
    let request = hostile::root_dse(1);
    let trickle = |pause: Duration| {
        let request = request.clone();
        let addr = proxy.addr();
        async move {
            let mut conn = RawConn::connect(addr).await;
            for byte in request {
                conn.send(&[byte]).await;
                tokio::time::sleep(pause).await;
            }
            conn.transcript(Duration::from_secs(3)).await
        }
    };
    // ~40 bytes: 4 s at one byte per 100 ms (slowloris), 0.4 s at 10 ms.
    let slowloris = tokio::spawn(trickle(Duration::from_millis(100)));
    let patient = tokio::spawn(trickle(Duration::from_millis(10)));
    assert!(answers_root_dse(proxy.addr()).await, "others are served meanwhile");

    let (pdus, _) = patient.await.unwrap();
    assert!(
        shape(&pdus).contains(&(1, "done", Some(ResultCode::Success))),
        "slow but within the idle timeout: {:?}",
        shape(&pdus)
    );
    let (pdus, end) = slowloris.await.unwrap();
    match shape(&pdus).as_slice() {
        [(0, "extended", Some(ResultCode::Unavailable))] => {}
        other => panic!("expected a notice (idle timeout), got {other:?}"),
    }
    assert_eq!(end, Received::Closed);
}

/// A root DSE search made `size`-ish bytes long by one long attribute name.
fn large_search(message_id: u32, size: usize) -> Vec<u8> {
    protocol_tests::root_dse_search_for(message_id, &"x".repeat(size))
}

async fn notice(conn: &mut RawConn) -> Option<String> {
    match conn.receive(Duration::from_secs(5)).await {
        Received::Pdu(pdu) => match decode(&pdu) {
            m if m.message_id == 0 => match m.protocol_op {
                ProtocolOp::ExtendedResp(r) => Some(r.diagnostic_message.to_string()),
                other => panic!("{other:?}"),
            },
            other => panic!("not a notice: {other:?}"),
        },
        other => panic!("expected a Notice of Disconnection, got {other:?}"),
    }
}

#[tokio::test]
async fn a_request_trickled_past_the_read_timeout_is_cut_though_the_session_is_not_idle_yet() {
    let slapd = Slapd::start();
    let proxy = ProxyHandle::start_with(&[slapd.url()], |c| c.request_read_timeout = Duration::from_millis(500));
    let mut slow = RawConn::connect(proxy.addr()).await;
    let request = large_search(1, 1000);
    slow.send(&request[..600]).await;
    let why = notice(&mut slow).await.unwrap();
    assert!(why.contains("not received in full within 500ms"), "{why}");
    assert!(answers_root_dse(proxy.addr()).await);
}

#[tokio::test]
async fn partly_received_requests_of_all_sessions_share_a_bounded_buffer() {
    let slapd = Slapd::start();
    let proxy = ProxyHandle::start_with(&[slapd.url()], |c| c.max_request_buffer = 300 * 1024);
    let request = large_search(1, 200 * 1024);
    let sent = 160 * 1024;
    // 160 KiB of a 200 KiB request each: the second session would take the
    // buffered bytes past 300 KiB.
    let mut first = RawConn::connect(proxy.addr()).await;
    first.send(&request[..sent]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut second = RawConn::connect(proxy.addr()).await;
    second.send(&request[..sent]).await;
    let why = notice(&mut second).await.unwrap();
    assert!(why.contains("over their budget of 307200 bytes"), "{why}");
    // Small requests arrive whole and need none of it.
    assert!(answers_root_dse(proxy.addr()).await);
    // The first session is untouched and finishes its request.
    first.send(&request[sent..]).await;
    let Received::Pdu(answer) = first.receive(Duration::from_secs(5)).await else {
        panic!("the first session is answered");
    };
    assert_eq!(decode(&answer).message_id, 1);
    // Its share was given back once its request was whole: another large
    // request fits again.
    let mut third = RawConn::connect(proxy.addr()).await;
    third.send(&request).await;
    let Received::Pdu(answer) = third.receive(Duration::from_secs(5)).await else {
        panic!("the third session is answered");
    };
    assert_eq!(decode(&answer).message_id, 1);
}
