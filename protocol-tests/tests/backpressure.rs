//! A client that sends requests and never reads the answers. ldapsync must
//! keep its memory bounded (a bounded queue per session, then TCP
//! back-pressure on the directory) and drop the client after the I/O
//! timeout. Its own test binary, so that the process's RSS is ldapsync's
//! and this client's alone.

use std::time::Duration;

use protocol_tests::{ProxyHandle, RawConn, Received, Slapd, answers_root_dse, encode};
use rasn_ldap::{Filter, LdapMessage, ProtocolOp, SearchRequest, SearchRequestDerefAliases, SearchRequestScope};

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Every bulk entry with all its attributes: about 0.5 MB of responses.
fn bulk_search(id: u32) -> Vec<u8> {
    let request = SearchRequest::new(
        "ou=bulk,dc=example,dc=com".into(),
        SearchRequestScope::WholeSubtree,
        SearchRequestDerefAliases::NeverDerefAliases,
        0,
        0,
        false,
        Filter::Present("objectClass".into()),
        vec![],
    );
    encode(&LdapMessage::new(id, ProtocolOp::SearchRequest(request)))
}

#[tokio::test]
async fn a_client_that_never_reads_costs_bounded_memory_and_is_dropped() {
    let slapd = Slapd::start_with_bulk(2500);
    let proxy = ProxyHandle::start_with(&[slapd.url()], |c| c.io_timeout = Duration::from_secs(4));
    assert!(answers_root_dse(proxy.addr()).await);
    let before = rss_kib();

    // 100 searches: ~50 MB of answers that this client will not read.
    let mut greedy = RawConn::connect(proxy.addr()).await;
    let requests: Vec<u8> = (1..=100).flat_map(bulk_search).collect();
    greedy.send(&requests).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = rss_kib();
    // What is in flight is one queue of 64 PDUs plus socket buffers.
    assert!(
        during < before + 4 * 1024,
        "RSS grew from {before} KiB to {during} KiB while the client read nothing"
    );
    assert!(
        answers_root_dse(proxy.addr()).await,
        "other clients are served meanwhile"
    );

    // Past the I/O timeout the client is dropped: reading now drains what
    // the socket buffers hold, then the connection ends, far short of all.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut received = 0usize;
    let end = loop {
        match greedy.receive(Duration::from_secs(5)).await {
            Received::Pdu(pdu) => received += pdu.len(),
            end => break end,
        }
    };
    println!("RSS {before} KiB -> {during} KiB; {received} bytes received before the drop");
    assert_eq!(end, Received::Closed, "dropped after the I/O timeout");
    assert!(
        received < 25 * 1024 * 1024,
        "{received} bytes arrived: the client was not dropped"
    );
    assert!(answers_root_dse(proxy.addr()).await);
}
