//! The admin HTTP API through real HTTP against the real binary, with a
//! real slapd checking the operators' logins: who may log in and do what,
//! accounts and groups listed, shown, created, edited and deleted, the
//! journal naming the operator, and bad input answered with a problem
//! document and a 4xx.

mod common;

use common::admin::Api;
use common::http;
use serde_json::{Value, json};

#[test]
fn operators_log_in_with_their_directory_credentials_and_their_groups_decide_what_they_may_do() {
    let api = Api::start();
    let (status, alice) = api.login("alice", "alice-secret");
    assert_eq!((status, &alice["role"]), (200, &json!("admin")), "{alice}");
    let (status, bob) = api.login("bob", "bob-secret");
    assert_eq!((status, &bob["role"]), (200, &json!("auditor")), "{bob}");

    // (who, password, status, code)
    let refusals = [
        ("alice", "wrong", 401, "bad-credentials"),
        ("alice", "", 401, "bad-credentials"),
        ("nobody", "x", 401, "bad-credentials"),
        ("dave", "dave-secret", 403, "not-an-operator"),
        ("*", "x", 401, "bad-credentials"),
    ];
    for (uid, password, status, code) in refusals {
        let (got, body) = api.login(uid, password);
        assert_eq!(
            (got, body["code"].as_str().unwrap()),
            (status, code),
            "{uid}/{password:?}: {body}"
        );
    }
    // Five refusals from this address, the limit: even the right password
    // waits now.
    let (status, body) = api.login("alice", "alice-secret");
    assert_eq!(
        (status, body["code"].as_str().unwrap()),
        (429, "too-many-failed-logins"),
        "{body}"
    );

    let admin = alice["token"].as_str().unwrap();
    let auditor = bob["token"].as_str().unwrap();
    let (status, me) = api.call("GET", "/api/v1/whoami", Some(admin), None);
    assert_eq!((status, me), (200, json!({ "operator": "alice", "role": "admin" })));
    assert_eq!(api.call("GET", "/api/v1/accounts", None, None).0, 401, "no token");
    assert_eq!(
        api.call("GET", "/api/v1/accounts", Some("forged"), None).0,
        401,
        "a forged token"
    );
    assert_eq!(
        api.call("GET", "/api/v1/accounts", Some(auditor), None).0,
        200,
        "auditors read"
    );
    let create = json!({ "name": "eve", "set": { "mail": ["eve@example.com"] } }).to_string();
    let (status, body) = api.call("POST", "/api/v1/accounts", Some(auditor), Some(&create));
    assert_eq!((status, body["code"].as_str().unwrap()), (403, "read-only"), "{body}");
    assert_eq!(api.call("POST", "/api/v1/accounts", Some(admin), Some(&create)).0, 201);

    assert_eq!(api.call("POST", "/api/v1/logout", Some(admin), None).0, 204);
    assert_eq!(
        api.call("GET", "/api/v1/whoami", Some(admin), None).0,
        401,
        "logged out"
    );
    let (exit, log) = api.served.terminate();
    assert!(exit.success());
    assert!(
        !log.contains("alice-secret") && !log.contains("bob-secret"),
        "no password in the log"
    );
    assert!(!log.contains(admin), "no token in the log");
}

#[test]
fn accounts_are_listed_shown_created_edited_and_deleted_over_http_and_journaled_with_their_operator() {
    let api = Api::start();
    let token = api.token("alice");
    let token = Some(token.as_str());
    // The worker's first pass imports the directory's people.
    assert!(
        common::eventually(|| api.call("GET", "/api/v1/accounts/frank", token, None).0 == 200),
        "the first pass imported the accounts"
    );

    let (status, page) = api.call("GET", "/api/v1/accounts?limit=2", token, None);
    assert_eq!(status, 200, "{page}");
    let names = |page: &Value| -> Vec<String> {
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(names(&page), ["alice", "bob"]);
    let (_, next) = api.call(
        "GET",
        &format!("/api/v1/accounts?limit=2&after={}", page["next"].as_str().unwrap()),
        token,
        None,
    );
    assert_eq!(names(&next), ["carol", "dave"]);
    let (_, found) = api.call("GET", "/api/v1/accounts?contains=RI", token, None);
    assert_eq!(names(&found), ["erin"]);

    let (status, connectors) = api.call("GET", "/api/v1/connectors", token, None);
    assert_eq!(status, 200, "{connectors}");
    let example = &connectors[0];
    assert_eq!(
        (&example["name"], &example["direction"], &example["conflict"]),
        (&json!("example"), &json!("both"), &json!("ldap-wins"))
    );
    assert!(
        example["last_sync_at"].is_i64() && example["out_of_sync"].is_null(),
        "{example}"
    );
    assert_eq!(example["watermarks"][0]["mechanism"], "syncrepl", "{example}");

    let (status, alice) = api.call("GET", "/api/v1/accounts/alice", token, None);
    assert_eq!(status, 200);
    assert_eq!(alice["object"]["values"]["mail"], json!(["alice@example.com"]));
    assert_eq!(alice["associations"][0]["connector"], "example", "{alice}");

    let zed = json!({ "name": "zed", "set": { "mail": ["zed@example.com"], "display_name": ["Zed"] } }).to_string();
    let (status, created) = api.call("POST", "/api/v1/accounts", token, Some(&zed));
    assert_eq!((status, &created["name"]), (201, &json!("zed")), "{created}");
    let (status, again) = api.call("POST", "/api/v1/accounts", token, Some(&zed));
    assert_eq!((status, again["code"].as_str().unwrap()), (409, "exists"));
    let edit = json!({ "set": { "mail": ["zed@changed.example"] }, "enabled": false }).to_string();
    let (status, edited) = api.call("PATCH", "/api/v1/accounts/zed", token, Some(&edit));
    assert_eq!(status, 200, "{edited}");
    assert_eq!(
        (&edited["values"]["mail"], &edited["enabled"]),
        (&json!(["zed@changed.example"]), &json!(false))
    );
    let (status, deleted) = api.call("DELETE", "/api/v1/accounts/zed", token, None);
    assert_eq!(
        (status, deleted),
        (200, json!({ "outcome": "locally" })),
        "not associated: removed here only"
    );
    assert_eq!(api.call("GET", "/api/v1/accounts/zed", token, None).0, 404);

    // An associated account is deleted as its connector says (delete =
    // ignore by default: the entry stays; the next full pass re-imports).
    let (status, report) = api.call("DELETE", "/api/v1/accounts/frank", token, None);
    assert_eq!(status, 200, "{report}");
    assert_eq!(
        (&report["outcome"], &report["connector"]),
        (&json!("by-connector"), &json!("example")),
        "{report}"
    );
    assert!(report["lines"].is_array(), "the pass's lines: {report}");

    let (status, journal) = api.call("GET", "/api/v1/journal?object=zed", token, None);
    assert_eq!(status, 200);
    let actions: Vec<&str> = journal["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["local-add", "local-edit", "local-delete"], "{journal}");
    assert!(
        journal.to_string().contains("api:alice"),
        "the operator is journaled: {journal}"
    );

    // Associations change only by an explicit, confirmed act.
    let alice_association = "/api/v1/associations/example/accounts/alice";
    let (status, association) = api.call("GET", alice_association, token, None);
    assert_eq!(status, 200, "{association}");
    let alice_dn = association["dn"].as_str().unwrap().to_owned();
    let (status, refused) = api.call("DELETE", alice_association, token, Some("{\"confirm\": false}"));
    assert_eq!((status, refused["code"].as_str().unwrap()), (422, "not-confirmed"));
    assert_eq!(
        api.call("DELETE", alice_association, token, Some("{\"confirm\": true}"))
            .0,
        204
    );
    let (status, gone) = api.call("GET", alice_association, token, None);
    assert_eq!((status, gone["code"].as_str().unwrap()), (404, "no-association"));
    let link = json!({ "confirm": true, "dn": alice_dn }).to_string();
    let (status, report) = api.call("PUT", alice_association, token, Some(&link));
    assert_eq!(status, 200, "{report}");
    let (_, relinked) = api.call("GET", alice_association, token, None);
    assert_eq!(
        relinked["entry_id"], association["entry_id"],
        "linked to the same entry again"
    );
    let (_, journal) = api.call("GET", "/api/v1/journal?object=alice", token, None);
    let removed_by_alice = journal["lines"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["action"] == "association-removed" && e["detail"].to_string().contains("api:alice"));
    assert!(removed_by_alice, "{journal}");

    // Bad input: a 4xx and a problem document, never a 500.
    let big = format!(
        "{{\"name\": \"big\", \"set\": {{\"mail\": [\"{}\"]}}}}",
        "x".repeat(100 * 1024)
    );
    let cases: [(&str, &str, Option<&str>, u16, &str); 8] = [
        ("POST", "/api/v1/accounts", Some("{\"name\": "), 400, "bad-json"),
        (
            "POST",
            "/api/v1/accounts",
            Some("{\"name\": \"x\", \"colour\": \"red\"}"),
            422,
            "bad-json",
        ),
        ("POST", "/api/v1/accounts", Some(&big), 413, "too-large"),
        (
            "POST",
            "/api/v1/accounts",
            Some("{\"name\": \"a\\nb\"}"),
            422,
            "invalid",
        ),
        (
            "POST",
            "/api/v1/accounts",
            Some("{\"name\": \"y\", \"set\": {\"shoe_size\": [\"9\"]}}"),
            422,
            "invalid",
        ),
        ("GET", "/api/v1/accounts?limit=many", None, 400, "bad-query"),
        ("GET", "/api/v1/printers", None, 404, "no-such-resource"),
        ("GET", "/api/v1/journal?connector=nope", None, 422, "unknown-connector"),
    ];
    for (method, path, body, status, code) in cases {
        let (got, problem) = api.call(method, path, token, body);
        assert_eq!(
            (got, problem["code"].as_str().unwrap()),
            (status, code),
            "{method} {path}: {problem}"
        );
    }
    let (exit, _) = api.served.terminate();
    assert!(exit.success());
}

/// An HTTPS request trusting `ca`: (status, body).
fn https(addr: &str, ca: &std::path::Path, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let config = ldapsync::tls::client_config(&ldapsync::config::ClientTlsConfig {
        ca: Some(ca.to_owned()),
        ..Default::default()
    })
    .unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let connection = rustls::ClientConnection::new(config, name).unwrap();
    let mut tls = rustls::StreamOwned::new(connection, std::net::TcpStream::connect(addr).unwrap());
    let request = common::http_head("localhost", method, path, None, Some(body)) + body;
    tls.write_all(request.as_bytes()).unwrap();
    let mut response = Vec::new();
    let _ = tls.read_to_end(&mut response);
    let (status, _, body) = common::http_response(&response);
    (status, body)
}

#[test]
fn with_a_certificate_the_api_speaks_https_only() {
    let pki = ldapsync_fixtures::Pki::new("admin api");
    let api = Api::start_with(
        &format!(
            "tls = {{ cert = \"{}\", key = \"{}\" }}",
            pki.cert.display(),
            pki.key.display()
        ),
        "",
    );
    let login = json!({ "username": "alice", "password": "alice-secret" }).to_string();
    let (status, body) = https(&api.addr, &pki.ca, "POST", "/api/v1/login", &login);
    assert_eq!(status, 200, "{body}");
    let logged_in: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(logged_in["role"], "admin");
    // Plain HTTP gets no HTTP answer: a password never crosses in clear text.
    let (status, _, _) = http(&api.addr, "POST", "/api/v1/login", None, Some(&login));
    assert_eq!(status, 0, "no HTTP response over plain TCP");
    // A client that never handshakes holds up no one.
    let _silent = std::net::TcpStream::connect(&api.addr).unwrap();
    let (status, _) = https(&api.addr, &pki.ca, "POST", "/api/v1/login", &login);
    assert_eq!(status, 200);
}

#[test]
fn the_api_serves_its_openapi_document_naming_every_route() {
    let api = Api::start();
    let (status, doc) = api.call("GET", "/api/v1/openapi.json", None, None);
    assert_eq!(status, 200, "public, like the docs");
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    let mut routes: Vec<String> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, methods)| {
            methods
                .as_object()
                .unwrap()
                .keys()
                .map(move |method| format!("{} {path}", method.to_uppercase()))
        })
        .collect();
    routes.sort();
    assert_eq!(
        routes,
        [
            "DELETE /api/v1/associations/{connector}/{category}/{name}",
            "DELETE /api/v1/webhooks/dead-letters/{id}",
            "DELETE /api/v1/{category}/{name}",
            "GET /api/v1/associations",
            "GET /api/v1/associations/{connector}/{category}/{name}",
            "GET /api/v1/changes",
            "GET /api/v1/changes/consumers",
            "GET /api/v1/changes/stream",
            "GET /api/v1/connectors",
            "GET /api/v1/disputes",
            "GET /api/v1/instances",
            "GET /api/v1/journal",
            "GET /api/v1/tokens",
            "GET /api/v1/webhooks",
            "GET /api/v1/webhooks/dead-letters",
            "GET /api/v1/whoami",
            "GET /api/v1/{category}",
            "GET /api/v1/{category}/{name}",
            "GET /api/v1/{category}/{name}/compare",
            "PATCH /api/v1/{category}/{name}",
            "POST /api/v1/connectors/{connector}/sync",
            "POST /api/v1/login",
            "POST /api/v1/logout",
            "POST /api/v1/webhooks/dead-letters/{id}/retry",
            "POST /api/v1/{category}",
            "PUT /api/v1/associations/{connector}/{category}/{name}",
            "PUT /api/v1/changes/consumers/{name}",
        ]
    );
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for schema in [
        "LocalObject",
        "ObjectEdit",
        "ProblemDocument",
        "JournalLine",
        "JournalPage",
        "Outcome",
        "Deleted",
        "FeedPage",
        "FeedChange",
        "Comparison",
        "DisputeView",
        "DeadLetter",
    ] {
        assert!(
            schemas.contains_key(schema),
            "{schema} in {:?}",
            schemas.keys().collect::<Vec<_>>()
        );
    }
    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    // Every documented route answers (401 without a token, not 404).
    let (status, _) = api.call("GET", "/api/v1/journal", None, None);
    assert_eq!(status, 401);
}
