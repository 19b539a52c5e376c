//! `proxy.session_threads`: sessions run on threads of their own, spread
//! over them, answered as on the main runtime, and the threads end with the
//! proxy. (A file of its own: it counts the process's threads by name.)

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ldap3::{LdapConnAsync, Scope, SearchEntry};
use protocol_tests::{BASE_DN, ProxyHandle, Slapd};

const CLIENTS: usize = 8;
const SEARCHES: usize = 400;

/// CPU time so far, in nanoseconds, of each of this process's session
/// threads, by name. (schedstat's precise runtime: an idle thread's stays
/// exactly the same, a busy one's grows however short its work was.)
fn session_threads() -> BTreeMap<String, u64> {
    let mut threads = BTreeMap::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let (Ok(name), Ok(schedstat)) = (
            std::fs::read_to_string(task.path().join("comm")),
            std::fs::read_to_string(task.path().join("schedstat")),
        ) else {
            continue; // ended meanwhile
        };
        if name.starts_with("ldapsync-sess") {
            let ran = schedstat.split(' ').next().unwrap().parse().unwrap();
            threads.insert(name.trim_end().to_owned(), ran);
        }
    }
    threads
}

async fn searches(url: String, n: usize) -> Result<(), String> {
    let (conn, mut ldap) = LdapConnAsync::new(&url).await.map_err(|e| format!("connect: {e}"))?;
    ldap3::drive!(conn);
    for i in 0..SEARCHES {
        let uid = ["alice", "bob"][(n + i) % 2];
        let (entries, _) = ldap
            .search(
                &format!("ou=people,{BASE_DN}"),
                Scope::OneLevel,
                &format!("(uid={uid})"),
                vec!["uid"],
            )
            .await
            .and_then(|r| r.success())
            .map_err(|e| format!("client {n}, search {i}: {e}"))?;
        let found: Vec<_> = entries.into_iter().map(|e| SearchEntry::construct(e).dn).collect();
        if found != [format!("uid={uid},ou=people,{BASE_DN}")] {
            return Err(format!("client {n}, search {i}: {found:?} for uid={uid}"));
        }
    }
    ldap.unbind().await.map_err(|e| format!("client {n}: unbind: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_on_session_threads_are_spread_over_them_and_the_threads_end_with_the_proxy() {
    let slapd = Slapd::start();
    let mut proxy = ProxyHandle::start_with(&[slapd.url()], |config| config.session_threads = Some(2));
    // A thread names itself once it runs.
    let deadline = Instant::now() + Duration::from_secs(5);
    let before = loop {
        let threads = session_threads();
        if threads.len() == 2 || Instant::now() >= deadline {
            break threads;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        ["ldapsync-sess-0", "ldapsync-sess-1"],
        "two session threads"
    );
    let clients: Vec<_> = (0..CLIENTS).map(|n| tokio::spawn(searches(proxy.url(), n))).collect();
    for result in futures_util::future::join_all(clients).await {
        result.unwrap().unwrap();
    }
    let after = session_threads();
    for (name, ran) in &before {
        assert!(
            after[name] > *ran,
            "{name} served sessions: CPU {ran} ns before, {} after",
            after[name]
        );
    }
    tokio::task::spawn_blocking(move || proxy.shutdown()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !session_threads().is_empty() {
        assert!(
            Instant::now() < deadline,
            "session threads still running after shutdown: {:?}",
            session_threads()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
