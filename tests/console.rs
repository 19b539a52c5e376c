//! The web console: its pages refuse strangers and forged forms, escape
//! what they show and forbid framing and foreign content; and, in a real
//! browser (Debian's chromium through chromedriver, driven by Python's
//! selenium from the project's `.venv`), an administrator logs in, finds
//! an account and what a conflict lost, settles a dispute, dry-runs and
//! runs a pass, filters the journal and logs out
//! (`tests/browser/console.py`; screenshots in `target/console-screenshots`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::admin::{Api, request};
use serde_json::json;

const FORM: (&str, &str) = ("Content-Type", "application/x-www-form-urlencoded");

/// A console session's cookie, logged in through the login form.
fn log_in(api: &Api, user: &str, password: &str) -> String {
    let body = format!("username={user}&password={password}");
    let reply = request(&api.addr, "POST", "/console/login", &[FORM], Some(&body));
    assert_eq!(reply.status, 303, "{}", reply.body);
    assert_eq!(reply.header("location"), Some("/console"));
    let cookie = reply.header("set-cookie").expect("a session cookie");
    cookie.split(';').next().unwrap().to_owned()
}

#[test]
fn console_pages_refuse_strangers_and_forged_forms_and_escape_what_they_show() {
    let api = Api::start();
    let stranger = request(&api.addr, "GET", "/console/journal", &[], None);
    assert_eq!(
        (stranger.status, stranger.header("location")),
        (303, Some("/console/login"))
    );
    let login = request(&api.addr, "GET", "/console/login", &[], None);
    assert_eq!(login.status, 200);
    let csp = login.header("content-security-policy").unwrap_or_default();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert_eq!(login.header("x-frame-options"), Some("DENY"));
    assert!(
        login.body.contains("<label for=\"password\">"),
        "labelled: {}",
        login.body
    );

    let wrong = request(
        &api.addr,
        "POST",
        "/console/login",
        &[FORM],
        Some("username=alice&password=nope"),
    );
    assert_eq!(wrong.status, 401);
    assert!(wrong.body.contains("wrong name or password"), "{}", wrong.body);

    let cookie = log_in(&api, "alice", "alice-secret");
    let dashboard = request(&api.addr, "GET", "/console", &[("Cookie", &cookie)], None);
    assert_eq!(dashboard.status, 200);
    assert!(dashboard.body.contains("Connector") && dashboard.body.contains("example"));

    // A page elsewhere posting with the victim's cookie has no CSRF token.
    let forged = request(
        &api.addr,
        "POST",
        "/console/connectors/example/sync",
        &[FORM, ("Cookie", &cookie)],
        Some("confirm=true"),
    );
    assert_eq!(forged.status, 403, "{}", forged.body);
    assert!(forged.body.contains("CSRF"), "{}", forged.body);

    // What the store holds is shown as text, never as markup.
    let token = api.token("alice");
    let body = json!({ "name": "<b>x</b>", "set": { "display_name": ["<script>alert(1)</script>"] } }).to_string();
    assert_eq!(api.call("POST", "/api/v1/accounts", Some(&token), Some(&body)).0, 201);
    let page = request(
        &api.addr,
        "GET",
        "/console/objects/account/%3Cb%3Ex%3C%2Fb%3E",
        &[("Cookie", &cookie)],
        None,
    );
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(!page.body.contains("<script>alert"), "{}", page.body);
    assert!(
        page.body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{}",
        page.body
    );

    // An auditor sees no action and may not post one.
    let bob = log_in(&api, "bob", "bob-secret");
    let page = request(
        &api.addr,
        "GET",
        "/console/objects/account/alice",
        &[("Cookie", &bob)],
        None,
    );
    assert!(!page.body.contains("Remove the association"), "{}", page.body);
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_owned()
}

#[test]
fn an_administrator_settles_a_dispute_and_runs_a_pass_in_a_real_browser() {
    let api = Api::start();
    let token = api.token("alice");
    assert!(common::eventually(|| api
        .call("GET", "/api/v1/accounts/alice", Some(&token), None)
        .0
        == 200));
    // A conflict that costs alice's local edit, and a dispute: two entries
    // whose uid is twin, and the local account twin.
    let edit = json!({ "set": { "display_name": ["Alice Local"] } }).to_string();
    assert_eq!(
        api.call("PATCH", "/api/v1/accounts/alice", Some(&token), Some(&edit)).0,
        200
    );
    api.ldapmodify(
        "uid=alice,ou=people,dc=example,dc=com",
        "changetype: modify\nreplace: cn\ncn: Alice Directory\n",
    );
    let twin = json!({ "name": "twin" }).to_string();
    assert_eq!(api.call("POST", "/api/v1/accounts", Some(&token), Some(&twin)).0, 201);
    for cn in ["Twin One", "Twin Two"] {
        api.ldapmodify(
            &format!("cn={cn},ou=people,dc=example,dc=com"),
            &format!("changetype: add\nobjectClass: inetOrgPerson\ncn: {cn}\nsn: Twin\nuid: twin\n"),
        );
    }
    let outcome = api.sync(&token, false);
    assert_eq!(
        (&outcome["conflicts"], &outcome["disputed"]),
        (&json!(1), &json!(1)),
        "{outcome}"
    );

    let python = workspace().join(".venv/bin/python");
    assert!(python.exists(), "{} is missing: run `make deps`", python.display());
    let shots = workspace().join("target/console-screenshots");
    let _ = std::fs::remove_dir_all(&shots);
    let candidate = "cn=Twin Two,ou=people,dc=example,dc=com";
    let output = Command::new(&python)
        .arg(workspace().join("tests/browser/console.py"))
        .args([&format!("http://{}", api.addr), shots.to_str().unwrap()])
        .args(["alice", "alice-secret", "twin", candidate])
        .output()
        .expect("running the browser script");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.trim_end().ends_with("ok"), "{stdout}");

    // What the browser did happened, and is journaled with its operator.
    let (_, association) = api.call("GET", "/api/v1/associations/example/accounts/twin", Some(&token), None);
    assert_eq!(association["dn"], candidate);
    let (_, journal) = api.call("GET", "/api/v1/journal?action=linked", Some(&token), None);
    assert!(journal.to_string().contains("console:alice"), "{journal}");
    let screenshots = std::fs::read_dir(&shots).unwrap().count();
    assert!(screenshots >= 10, "{screenshots} screenshots in {}", shots.display());
}
