//! The administrator's and the application's side, through real HTTP
//! against the binary and a real slapd (and, in `make test`'s second run,
//! a real PostgreSQL store): API tokens, browser sessions and CSRF,
//! disputes and their settlement, the three views of an object, dry runs
//! and passes, the journal's filters, the change feed (order, long polls,
//! server-sent events, consumers resuming after a restart) and webhooks
//! that fail and recover.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::admin::{Api, request};
use common::{TestStore, eventually};
use ldapsync_fixtures::{ROOT_DN, ROOT_PW};
use serde_json::{Value, json};

fn create(api: &Api, token: &str, name: &str) {
    let body = json!({ "name": name, "set": { "mail": [format!("{name}@example.com")] } }).to_string();
    let (status, created) = api.call("POST", "/api/v1/accounts", Some(token), Some(&body));
    assert_eq!(status, 201, "{created}");
}

/// Waits for the first full pass, which imports the fixture's people.
fn synced(api: &Api, token: &str) {
    assert!(
        eventually(|| api.call("GET", "/api/v1/accounts/alice", Some(token), None).0 == 200),
        "the first pass imports alice"
    );
}

#[test]
fn api_tokens_made_by_the_cli_work_for_scripts_until_revoked_and_are_kept_as_digests() {
    let api = Api::start();
    let admin = api
        .cli(&["token", "create", "deploy", "--role", "admin"])
        .trim()
        .to_owned();
    let auditor = api.cli(&["token", "create", "report"]).trim().to_owned();
    assert!(admin.starts_with("lsk_") && admin.len() > 60, "{admin}");

    let (status, who) = api.call("GET", "/api/v1/whoami", Some(&admin), None);
    assert_eq!(
        (status, &who["operator"], &who["role"]),
        (200, &json!("deploy"), &json!("admin"))
    );
    create(&api, &admin, "scripted");
    let (_, journal) = api.call("GET", "/api/v1/journal?object=scripted", Some(&admin), None);
    assert!(
        journal.to_string().contains("token:deploy"),
        "journaled with the token's name: {journal}"
    );
    let body = json!({ "name": "nope" }).to_string();
    let (status, refused) = api.call("POST", "/api/v1/accounts", Some(&auditor), Some(&body));
    assert_eq!((status, refused["code"].as_str().unwrap()), (403, "read-only"));
    let (status, tokens) = api.call("GET", "/api/v1/tokens", Some(&admin), None);
    assert_eq!(status, 200);
    let names: Vec<&str> = tokens
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["deploy", "report"]);
    assert!(
        !tokens.to_string().contains("lsk_"),
        "no token is ever shown again: {tokens}"
    );
    let listed = api.cli(&["token", "list"]);
    assert!(
        listed.contains("deploy\tadmin") && listed.contains("report\tauditor"),
        "{listed}"
    );

    // The store holds digests only: a copy of it gives nobody access.
    if !TestStore::is_postgres() {
        for file in ["ldapsync.db", "ldapsync.db-wal"] {
            let bytes = std::fs::read(api.dir.path().join(file)).unwrap_or_default();
            let text = String::from_utf8_lossy(&bytes);
            assert!(!text.contains(&admin[4..]), "{file} holds the token itself");
        }
    }

    api.cli(&["token", "revoke", "deploy"]);
    let (status, gone) = api.call("GET", "/api/v1/whoami", Some(&admin), None);
    assert_eq!((status, gone["code"].as_str().unwrap()), (401, "unauthenticated"));
    let (status, forged) = api.call("GET", "/api/v1/whoami", Some("lsk_0000"), None);
    assert_eq!((status, forged["code"].as_str().unwrap()), (401, "unauthenticated"));
}

#[test]
fn a_browser_session_is_a_strict_cookie_and_every_change_needs_its_csrf_token() {
    let api = Api::start_with("session_timeout = \"5s\"", "");
    let login = json!({ "username": "alice", "password": "alice-secret" }).to_string();
    let reply = request(&api.addr, "POST", "/api/v1/login", &[], Some(&login));
    assert_eq!(reply.status, 200, "{}", reply.body);
    let set_cookie = reply.header("set-cookie").expect("a session cookie").to_owned();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set_cookie.contains(attribute), "{set_cookie}");
    }
    let cookie = set_cookie.split(';').next().unwrap().to_owned();
    let csrf = reply.json()["csrf"].as_str().unwrap().to_owned();

    let read = request(&api.addr, "GET", "/api/v1/whoami", &[("Cookie", &cookie)], None);
    assert_eq!(read.status, 200, "a read needs the cookie only: {}", read.body);
    let body = json!({ "name": "cookie" }).to_string();
    // (CSRF header, status, code): a forged page has the cookie, not the token.
    let cases = [
        (None, 403, Some("csrf")),
        (Some("0123"), 403, Some("csrf")),
        (Some(csrf.as_str()), 201, None),
    ];
    for (token, status, code) in cases {
        let mut headers = vec![("Cookie", cookie.as_str())];
        headers.extend(token.map(|t| ("X-CSRF-Token", t)));
        let reply = request(&api.addr, "POST", "/api/v1/accounts", &headers, Some(&body));
        assert_eq!(reply.status, status, "CSRF {token:?}: {}", reply.body);
        if let Some(code) = code {
            assert_eq!(reply.json()["code"], code);
        }
    }
    // Unused for longer than session_timeout, the session is over.
    std::thread::sleep(Duration::from_secs(6));
    let expired = request(&api.addr, "GET", "/api/v1/whoami", &[("Cookie", &cookie)], None);
    assert_eq!(expired.status, 401, "{}", expired.body);
    assert!(expired.body.contains("expired"), "{}", expired.body);
}

#[test]
fn a_dispute_lists_its_candidates_and_an_explicit_link_settles_it() {
    let api = Api::start();
    let token = api.token("alice");
    synced(&api, &token);
    // The mail server has an account twin; the directory has two entries
    // whose uid is twin. Neither is guessed.
    create(&api, &token, "twin");
    for cn in ["Twin One", "Twin Two"] {
        api.ldapmodify(
            &format!("cn={cn},ou=people,dc=example,dc=com"),
            &format!("changetype: add\nobjectClass: inetOrgPerson\ncn: {cn}\nsn: Twin\nuid: twin\n"),
        );
    }
    let outcome = api.sync(&token, false);
    assert_eq!(outcome["disputed"], 1, "{outcome}");
    let (status, disputes) = api.call("GET", "/api/v1/disputes", Some(&token), None);
    assert_eq!(status, 200);
    let dispute = &disputes[0];
    assert_eq!(
        (&dispute["connector"], &dispute["key"]),
        (&json!("example"), &json!("twin")),
        "{disputes}"
    );
    let mut candidates: Vec<&str> = dispute["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    candidates.sort();
    assert_eq!(
        candidates,
        [
            "cn=Twin One,ou=people,dc=example,dc=com",
            "cn=Twin Two,ou=people,dc=example,dc=com"
        ]
    );
    let (status, _) = api.call("GET", "/api/v1/associations/example/accounts/twin", Some(&token), None);
    assert_eq!(status, 404, "no association was guessed");

    let link = json!({ "confirm": true, "dn": candidates[1] }).to_string();
    let (status, report) = api.call(
        "PUT",
        "/api/v1/associations/example/accounts/twin",
        Some(&token),
        Some(&link),
    );
    assert_eq!(status, 200, "{report}");
    let (_, association) = api.call("GET", "/api/v1/associations/example/accounts/twin", Some(&token), None);
    assert_eq!(association["dn"], candidates[1]);
    // The other entry still says twin, a name now taken: it is what is in
    // dispute now, until the directory's administrator deals with it.
    let outcome = api.sync(&token, false);
    assert_eq!(outcome["disputed"], 1, "{outcome}");
    let (_, disputes) = api.call("GET", "/api/v1/disputes", Some(&token), None);
    assert_eq!(disputes[0]["key"], candidates[0], "{disputes}");
    assert!(
        disputes[0]["reason"].as_str().unwrap().contains(candidates[1]),
        "{disputes}"
    );
    api.ldapmodify(candidates[0], "changetype: delete\n");
    let outcome = api.sync(&token, false);
    assert_eq!(outcome["disputed"], 0, "settled: {outcome}");
    let (_, disputes) = api.call("GET", "/api/v1/disputes", Some(&token), None);
    assert_eq!(disputes, json!([]));
}

#[test]
fn an_objects_three_views_show_both_sides_edits_and_what_the_next_pass_would_lose() {
    let api = Api::start();
    let token = api.token("alice");
    synced(&api, &token);
    let (_, before) = api.call("GET", "/api/v1/accounts/alice/compare", Some(&token), None);
    assert_eq!(before["next"], "unchanged", "{before}");
    assert_eq!(
        (&before["writes_local"], &before["writes_directory"]),
        (&json!(false), &json!(false))
    );

    api.ldapmodify(
        "uid=alice,ou=people,dc=example,dc=com",
        "changetype: modify\nreplace: mail\nmail: alice@new.example\n",
    );
    let edit = json!({ "set": { "display_name": ["Alice Local"] } }).to_string();
    assert_eq!(
        api.call("PATCH", "/api/v1/accounts/alice", Some(&token), Some(&edit)).0,
        200
    );

    let (status, c) = api.call(
        "GET",
        "/api/v1/accounts/alice/compare?connector=example",
        Some(&token),
        None,
    );
    assert_eq!(status, 200, "{c}");
    assert_eq!(c["local"]["display_name"], json!(["Alice Local"]), "{c}");
    assert_eq!(c["directory"]["mail"], json!(["alice@new.example"]), "{c}");
    assert_ne!(
        c["baseline"]["mail"],
        json!(["alice@new.example"]),
        "the baseline is the last sync's: {c}"
    );
    // Both sides changed since the last sync: the connector's policy
    // (ldap-wins) keeps the directory's values, and says which local edit
    // the pass would lose, before it does.
    assert_eq!(c["result"]["mail"], json!(["alice@new.example"]));
    assert_eq!(c["outcome"]["outcome"], "conflict-resolved", "{c}");
    assert_eq!(c["outcome"]["local_lost"], json!(["display_name"]), "{c}");
    assert!(
        c["next"]
            .as_str()
            .unwrap()
            .contains("local changes lost: [display_name]"),
        "{c}"
    );
    assert_eq!(
        (&c["writes_local"], &c["writes_directory"]),
        (&json!(true), &json!(false)),
        "{c}"
    );
    // Looking changed nothing.
    let (_, again) = api.call("GET", "/api/v1/accounts/alice", Some(&token), None);
    assert_ne!(again["object"]["values"]["mail"], json!(["alice@new.example"]));
    let (status, missing) = api.call("GET", "/api/v1/accounts/nobody/compare", Some(&token), None);
    assert_eq!((status, missing["code"].as_str().unwrap()), (404, "not-found"));
}

#[test]
fn a_dry_run_plans_without_changing_anything_and_only_an_admin_runs_the_pass() {
    let api = Api::start();
    let (alice, bob) = (api.token("alice"), api.token("bob"));
    synced(&api, &alice);
    api.ldapmodify(
        "uid=quinn,ou=people,dc=example,dc=com",
        "changetype: add\nobjectClass: inetOrgPerson\ncn: Quinn\nsn: Q\nuid: quinn\nmail: quinn@example.com\n",
    );
    // An auditor may see the plan.
    let plan = api.sync(&bob, true);
    assert_eq!(plan["created_local"], 1, "{plan}");
    assert!(
        plan["lines"].to_string().contains("create local account quinn"),
        "{plan}"
    );
    assert_eq!(
        api.call("GET", "/api/v1/accounts/quinn", Some(&alice), None).0,
        404,
        "a dry run changes nothing"
    );
    let body = json!({ "dry_run": false }).to_string();
    let (status, refused) = api.call("POST", "/api/v1/connectors/example/sync", Some(&bob), Some(&body));
    assert_eq!((status, refused["code"].as_str().unwrap()), (403, "read-only"));
    let done = api.sync(&alice, false);
    assert_eq!(done["created_local"], 1, "{done}");
    let (_, requested) = api.call("GET", "/api/v1/journal?action=pass-requested", Some(&alice), None);
    let lines = requested["lines"].as_array().unwrap();
    assert_eq!(lines.len(), 1, "the pass, not the dry runs: {requested}");
    assert!(
        lines[0]["detail"].as_str().unwrap().contains("api:alice"),
        "{requested}"
    );
    assert_eq!(api.call("GET", "/api/v1/accounts/quinn", Some(&alice), None).0, 200);
    let (status, unknown) = api.call("POST", "/api/v1/connectors/nope/sync", Some(&alice), Some("{}"));
    assert_eq!((status, unknown["code"].as_str().unwrap()), (422, "unknown-connector"));

    // The connector's state after the pass, and who syncs it.
    let (_, connectors) = api.call("GET", "/api/v1/connectors", Some(&bob), None);
    assert!(connectors[0]["last_sync_at"].is_i64(), "{connectors}");
    let (status, cluster) = api.call("GET", "/api/v1/instances", Some(&bob), None);
    assert_eq!(status, 200);
    if TestStore::is_postgres() {
        let instances = cluster["instances"].as_array().unwrap();
        assert!(
            instances
                .iter()
                .any(|i| i["alive"] == true && i["holds"] == json!(["example"])),
            "{cluster}"
        );
    } else {
        assert_eq!(cluster, Value::Null, "one instance, no registry");
    }
}

#[test]
fn the_journal_filters_by_action_source_and_time_and_pages_back() {
    let api = Api::start();
    let token = api.token("alice");
    synced(&api, &token);
    for name in ["j1", "j2", "j3"] {
        create(&api, &token, name);
    }
    let (_, local) = api.call(
        "GET",
        "/api/v1/journal?source=local&action=local-add",
        Some(&token),
        None,
    );
    let objects: Vec<&str> = local["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["object"].as_str().unwrap())
        .collect();
    assert_eq!(objects, ["j1", "j2", "j3"], "{local}");
    let (_, polled) = api.call(
        "GET",
        "/api/v1/journal?source=poll&action=created-local",
        Some(&token),
        None,
    );
    assert!(
        polled["lines"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["object"] == "alice"),
        "{polled}"
    );

    // Two lines a page, newest page first, each oldest first.
    let (_, newest) = api.call("GET", "/api/v1/journal?action=local-add&limit=2", Some(&token), None);
    let page: Vec<&str> = newest["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["object"].as_str().unwrap())
        .collect();
    assert_eq!(page, ["j2", "j3"]);
    let before = newest["next_before"].as_i64().expect("an older page");
    let (_, older) = api.call(
        "GET",
        &format!("/api/v1/journal?action=local-add&limit=2&before={before}"),
        Some(&token),
        None,
    );
    let page: Vec<&str> = older["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["object"].as_str().unwrap())
        .collect();
    assert_eq!(page, ["j1"]);
    assert_eq!(older["next_before"], Value::Null);

    let future = ldapsync::store::now() + 3600;
    let (_, none) = api.call("GET", &format!("/api/v1/journal?since={future}"), Some(&token), None);
    assert_eq!(none["lines"], json!([]));
    let (status, bad) = api.call("GET", "/api/v1/journal?action=exploded", Some(&token), None);
    assert_eq!((status, bad["code"].as_str().unwrap()), (400, "bad-query"));
}

fn feed(api: &Api, token: &str, query: &str) -> Value {
    let (status, page) = api.call("GET", &format!("/api/v1/changes?{query}"), Some(token), None);
    assert_eq!(status, 200, "{page}");
    page
}

#[test]
fn the_change_feed_has_every_local_change_in_order_and_a_consumer_resumes_after_a_restart() {
    let mut api = Api::start();
    let token = api.token("alice");
    synced(&api, &token);
    let imported = feed(&api, &token, "limit=1000");
    // The pass writes its creations and their journal lines a batch at a
    // time: each change is named by its own object's line.
    let mut named: Vec<(String, String, String, String)> = imported["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let text = |key: &str| c[key].as_str().unwrap_or("unnamed").to_owned();
            (text("object"), text("kind"), text("source"), text("connector"))
        })
        .collect();
    named.sort();
    let people = ["alice", "bob", "carol"];
    for person in people {
        assert!(
            named.contains(&(person.into(), "created".into(), "poll".into(), "example".into())),
            "{person} imported and named by its journal line: {named:?}"
        );
    }
    assert!(
        named.windows(2).all(|w| w[0].0 != w[1].0),
        "one change per imported object: {named:?}"
    );
    let alice = imported["changes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["object"] == "alice")
        .expect("the first pass's import is in the feed")
        .clone();
    assert_eq!(
        (&alice["kind"], &alice["source"], &alice["connector"]),
        (&json!("created"), &json!("poll"), &json!("example"))
    );
    assert_eq!(alice["fields"]["mail"]["new"], json!(["alice@example.com"]), "{alice}");
    let start = imported["next"].as_str().unwrap().to_owned();

    // A local edit, a change seen by a pass, a write through the proxy.
    create(&api, &token, "feedy");
    api.ldapmodify(
        "uid=bob,ou=people,dc=example,dc=com",
        "changetype: modify\nreplace: mail\nmail: bob@poll.example\n",
    );
    api.sync(&token, false);
    ldapsync_fixtures::ldapmodify(
        &api.served.url,
        ROOT_DN,
        ROOT_PW,
        "dn: uid=carol,ou=people,dc=example,dc=com\nchangetype: modify\nreplace: mail\nmail: carol@proxy.example\n",
    );
    let mut seen = Vec::new();
    assert!(
        eventually(|| {
            seen = feed(&api, &token, &format!("after={start}"))["changes"]
                .as_array()
                .unwrap()
                .clone();
            seen.iter().any(|c| c["object"] == "carol")
        }),
        "the captured write reaches the feed: {seen:?}"
    );
    let summary: Vec<(String, String, String)> = seen
        .iter()
        .map(|c| {
            (
                c["object"].as_str().unwrap().into(),
                c["source"].as_str().unwrap_or("?").into(),
                c["kind"].as_str().unwrap().into(),
            )
        })
        .collect();
    let expected = [
        ("feedy", "local", "created"),
        ("bob", "poll", "updated"),
        ("carol", "proxy", "updated"),
    ];
    let positions: Vec<usize> = expected
        .iter()
        .map(|(o, s, k)| {
            summary
                .iter()
                .position(|(so, ss, sk)| so == o && ss == s && sk == k)
                .unwrap_or_else(|| panic!("{o} {s} {k} in {summary:?}"))
        })
        .collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "in commit order: {summary:?}"
    );
    let feedy = &seen[positions[0]];
    assert_eq!(
        (&feedy["action"], &feedy["operator"]),
        (&json!("local-add"), &json!("api:alice")),
        "{feedy}"
    );
    let bob = &seen[positions[1]];
    assert_eq!(bob["fields"]["mail"]["new"], json!(["bob@poll.example"]), "{bob}");
    assert_eq!(bob["fields"]["mail"]["old"], json!(["bob@example.com"]), "{bob}");

    // A consumer takes two, acknowledges them, and after a restart goes on
    // from the third.
    let first = feed(&api, &token, &format!("after={start}&limit=2"));
    let ack = json!({ "cursor": first["next"] }).to_string();
    let (status, _) = api.call("PUT", "/api/v1/changes/consumers/mailer", Some(&token), Some(&ack));
    assert_eq!(status, 204);
    api.restart();
    let token = api.token("alice");
    let resumed = feed(&api, &token, "consumer=mailer&limit=1");
    assert_eq!(resumed["changes"][0]["cursor"], seen[2]["cursor"], "{resumed}");
    let (_, consumers) = api.call("GET", "/api/v1/changes/consumers", Some(&token), None);
    assert_eq!(consumers[0]["name"], "mailer");

    let (status, bad) = api.call("GET", "/api/v1/changes?after=yesterday", Some(&token), None);
    assert_eq!((status, bad["code"].as_str().unwrap()), (400, "bad-cursor"));
}

#[test]
fn a_long_poll_and_an_event_stream_bring_a_change_as_it_happens() {
    let api = Api::start();
    let token = api.token("alice");
    synced(&api, &token);
    let end = feed(&api, &token, "limit=1000")["next"].as_str().unwrap().to_owned();

    let waiting = {
        let (addr, token, end) = (api.addr.clone(), token.clone(), end.clone());
        std::thread::spawn(move || {
            let auth = format!("Bearer {token}");
            request(
                &addr,
                "GET",
                &format!("/api/v1/changes?after={end}&wait=30"),
                &[("Authorization", &auth)],
                None,
            )
        })
    };
    std::thread::sleep(Duration::from_millis(700));
    create(&api, &token, "polled");
    let answer = waiting.join().unwrap();
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.json()["changes"][0]["object"], "polled", "{}", answer.body);

    // The stream starts after `end`: the change above comes as an event.
    let mut stream = std::net::TcpStream::connect(&api.addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        stream,
        "GET /api/v1/changes/stream?after={end} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"
    )
    .unwrap();
    let mut lines = BufReader::new(stream).lines().map_while(Result::ok);
    let status = lines.next().unwrap();
    assert!(status.contains(" 200 "), "{status}");
    let event: Vec<String> = lines
        .by_ref()
        .skip_while(|l| !l.starts_with("id:"))
        .take_while(|l| !l.is_empty())
        .collect();
    assert!(event.iter().any(|l| l == "event: change"), "{event:?}");
    let data = event.iter().find_map(|l| l.strip_prefix("data: ")).expect("data");
    let change: Value = serde_json::from_str(data).unwrap();
    assert_eq!(change["object"], "polled");
    let id = event.iter().find_map(|l| l.strip_prefix("id: ")).expect("an id");
    assert_eq!(json!(id), change["cursor"], "resumable with Last-Event-ID");
}

/// An HTTP server that records each request and refuses the first
/// `failures` of them with 500 (`usize::MAX`: all).
struct Receiver {
    addr: String,
    got: Arc<Mutex<Vec<Delivery>>>,
    failures: Arc<AtomicUsize>,
}

#[derive(Debug, Clone)]
struct Delivery {
    key: String,
    timestamp: String,
    signature: String,
    body: String,
    answered: u16,
}

impl Delivery {
    fn object(&self) -> String {
        serde_json::from_str::<Value>(&self.body).unwrap()["object"]
            .as_str()
            .unwrap()
            .to_owned()
    }
}

impl Receiver {
    fn start(failures: usize) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let got = Arc::new(Mutex::new(Vec::new()));
        let failures = Arc::new(AtomicUsize::new(failures));
        let (log, left) = (Arc::clone(&got), Arc::clone(&failures));
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let mut reader = BufReader::new(stream);
                let mut headers = Vec::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some((n, v)) = line.split_once(':') {
                        headers.push((n.trim().to_lowercase(), v.trim().to_owned()));
                    }
                }
                let header = |name: &str| {
                    headers
                        .iter()
                        .find(|(n, _)| n == name)
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default()
                };
                let mut body = vec![0; header("content-length").parse().unwrap_or(0)];
                reader.read_exact(&mut body).unwrap();
                let fail = left
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
                let answered = if fail { 500 } else { 200 };
                log.lock().unwrap().push(Delivery {
                    key: header("idempotency-key"),
                    timestamp: header("x-ldapsync-timestamp"),
                    signature: header("x-ldapsync-signature"),
                    body: String::from_utf8(body).unwrap(),
                    answered,
                });
                let mut stream = reader.into_inner();
                let _ = write!(
                    stream,
                    "HTTP/1.1 {answered} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
            }
        });
        Receiver { addr, got, failures }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn delivered(&self, objects: &[&str]) -> Vec<Delivery> {
        let got = self.got.lock().unwrap();
        got.iter()
            .filter(|d| d.answered == 200 && objects.contains(&d.object().as_str()))
            .cloned()
            .collect()
    }
}

#[test]
fn a_webhook_that_fails_then_recovers_gets_every_change_once_in_order_signed_and_dead_letters_can_be_retried() {
    let flaky = Receiver::start(0);
    let down = Receiver::start(usize::MAX);
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret.path(), "hook-secret\n").unwrap();
    let hooks = format!(
        r#"
[[webhook]]
name = "app"
url = "{}"
secret_file = "{secret}"
retry_backoff = "100ms"
[[webhook]]
name = "down"
url = "{}"
secret_file = "{secret}"
retry_backoff = "100ms"
max_attempts = 2
sources = ["local"]
"#,
        flaky.url(),
        down.url(),
        secret = secret.path().display()
    );
    let mut api = Api::start_with("", &hooks);
    let token = api.token("alice");
    synced(&api, &token);
    // Each webhook starts where the feed ends when it first runs, and has
    // caught up with the first pass's imports before the test begins.
    let end = feed(&api, &token, "limit=1000")["next"].clone();
    assert!(eventually(|| {
        let (_, hooks) = api.call("GET", "/api/v1/webhooks", Some(&token), None);
        hooks
            .as_array()
            .is_some_and(|h| h.len() == 2 && h.iter().all(|h| h["cursor"] == end))
    }));
    flaky.failures.store(3, Ordering::SeqCst);
    let names = ["w1", "w2", "w3"];
    for name in names {
        create(&api, &token, name);
    }
    assert!(
        eventually(|| flaky.delivered(&names).len() == 3),
        "every change delivered"
    );
    let delivered = flaky.delivered(&names);
    let objects: Vec<String> = delivered.iter().map(Delivery::object).collect();
    assert_eq!(objects, names, "in order, each once");
    let got = flaky.got.lock().unwrap().clone();
    let refused: Vec<&Delivery> = got.iter().filter(|d| d.answered == 500).collect();
    assert_eq!(refused.len(), 3);
    for d in &refused {
        assert_eq!(d.key, delivered[0].key, "a retry carries its change's idempotency key");
    }
    let keys: std::collections::HashSet<&str> = delivered.iter().map(|d| d.key.as_str()).collect();
    assert_eq!(keys.len(), 3, "one key per change");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"hook-secret");
    for d in &got {
        let signature: Vec<u8> = (0..64)
            .step_by(2)
            .map(|i| u8::from_str_radix(&d.signature["sha256=".len()..][i..i + 2], 16).unwrap())
            .collect();
        let signed = format!("{}.{}", d.timestamp, d.body);
        ring::hmac::verify(&key, signed.as_bytes(), &signature).expect("signed with the secret");
    }
    drop(got);

    // The webhook that never answers 2xx gives up on each change after
    // two attempts: dead letters, which an operator retries or discards.
    let letters = || {
        let (_, letters) = api.call("GET", "/api/v1/webhooks/dead-letters?webhook=down", Some(&token), None);
        letters.as_array().unwrap().clone()
    };
    assert!(eventually(|| letters().len() == 3), "{:?}", letters());
    down.failures.store(0, Ordering::SeqCst);
    let first = letters()[0]["id"].as_i64().unwrap();
    let bob = api.token("bob");
    let (status, _) = api.call(
        "POST",
        &format!("/api/v1/webhooks/dead-letters/{first}/retry"),
        Some(&bob),
        None,
    );
    assert_eq!(status, 403, "an auditor retries nothing");
    let (status, body) = api.call(
        "POST",
        &format!("/api/v1/webhooks/dead-letters/{first}/retry"),
        Some(&token),
        None,
    );
    assert_eq!(status, 204, "{body}");
    assert_eq!(down.delivered(&["w1"]).len(), 1);
    let second = letters()[0]["id"].as_i64().unwrap();
    assert_eq!(
        api.call(
            "DELETE",
            &format!("/api/v1/webhooks/dead-letters/{second}"),
            Some(&token),
            None
        )
        .0,
        204
    );
    assert_eq!(letters().len(), 1);
    let (status, missing) = api.call("DELETE", "/api/v1/webhooks/dead-letters/999999", Some(&token), None);
    assert_eq!((status, missing["code"].as_str().unwrap()), (404, "not-found"));
    let (_, journal) = api.call("GET", "/api/v1/journal?action=dead-letter-retried", Some(&token), None);
    assert!(journal.to_string().contains("api:alice"), "{journal}");

    // Delivery state survives a restart: only what is new is sent.
    api.restart();
    let token = api.token("alice");
    create(&api, &token, "w4");
    assert!(eventually(|| flaky.delivered(&["w4"]).len() == 1));
    assert_eq!(flaky.delivered(&names).len(), 3, "nothing delivered again");
}
