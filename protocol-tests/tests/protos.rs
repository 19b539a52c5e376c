//! PROTOS c06-ldapv3: 100 hostile SearchRequests replayed through ldapsync
//! and directly to slapd. For each case the proxy must answer exactly what
//! slapd answers (the same bytes: they are slapd's), or refuse a PDU over
//! its own size limit with a Notice of Disconnection; and it must keep
//! serving new connections afterwards.
//!
//! The cases are read from `../shared/conformance/protos/` (or
//! `$LDAPSYNC_PROTOS_DIR`); they are not part of this repository.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use ldapsync::config::ProxyConfig;
use protocol_tests::{
    ProxyHandle, RawConn, Received, Slapd, answers_root_dse, decode, expect_notice_of_disconnection, root_dse_search,
};
use rasn_ldap::{ProtocolOp, ResultCode};

fn protos_dir() -> PathBuf {
    std::env::var_os("LDAPSYNC_PROTOS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/conformance/protos"))
}

/// Everything a server says to one case: PDUs up to the end of the search,
/// and whether it then closed the connection.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    pdus: Vec<Bytes>,
    closed: bool,
}

async fn replay(addr: std::net::SocketAddr, case: &[u8]) -> Answer {
    let mut conn = RawConn::connect(addr).await;
    conn.send(case).await;
    let mut pdus = Vec::new();
    loop {
        match conn.receive(Duration::from_secs(10)).await {
            Received::Pdu(pdu) => {
                let done = matches!(decode(&pdu).protocol_op, ProtocolOp::SearchResDone(_));
                pdus.push(pdu);
                if done {
                    // Whether the connection is still open: ask it something.
                    conn.send(&root_dse_search(2)).await;
                    let closed = !matches!(conn.receive(Duration::from_secs(10)).await, Received::Pdu(_));
                    return Answer { pdus, closed };
                }
            }
            Received::Closed => return Answer { pdus, closed: true },
            Received::Silent => panic!("no answer within 10 s (hang) after {} PDUs", pdus.len()),
        }
    }
}

#[tokio::test]
async fn protos_c06_ldapv3_answers_match_slapd() {
    let dir = protos_dir();
    let Ok(listing) = std::fs::read_dir(&dir) else {
        let why = format!("no cases in {} (set LDAPSYNC_PROTOS_DIR)", dir.display());
        ldapsync_fixtures::skip("PROTOS c06-ldapv3 replay", &why, ldapsync_fixtures::InCi::Optional);
        return;
    };
    let mut cases: Vec<PathBuf> = listing
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().chars().all(|c| c.is_ascii_digit()))
        })
        .collect();
    cases.sort();
    assert_eq!(cases.len(), 100, "expected 100 PROTOS cases in {}", dir.display());

    let slapd = Slapd::start();
    let proxy = ProxyHandle::start(&[slapd.url()]);
    let limit = ProxyConfig::default().max_client_pdu;
    let (mut answered, mut refused) = (0, 0);
    for path in &cases {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let case = std::fs::read(path).unwrap();
        if case.len() > limit {
            let mut conn = RawConn::connect(proxy.addr()).await;
            conn.send(&case).await;
            expect_notice_of_disconnection(&mut conn, ResultCode::ProtocolError).await;
            refused += 1;
        } else {
            let direct = replay(slapd.addr(), &case).await;
            let proxied = replay(proxy.addr(), &case).await;
            assert_eq!(proxied, direct, "case {name}: ldapsync must answer what slapd answers");
            answered += 1;
        }
        assert!(
            answers_root_dse(proxy.addr()).await,
            "case {name}: ldapsync stopped serving"
        );
    }
    assert!(answers_root_dse(slapd.addr()).await, "slapd survived the run");
    eprintln!("PROTOS: {answered} answered as slapd does, {refused} refused as over the {limit}-byte limit");
    assert_eq!(refused, 2, "only 00000084 and 00000085 are over the default limit");
}
