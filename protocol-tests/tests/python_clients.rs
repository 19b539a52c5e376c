//! Python's LDAP clients through ldapsync and directly: python-ldap (a
//! binding to OpenLDAP's libldap) and ldap3 (pure Python, with its own BER
//! encoder and socket handling), driven by `protocol-tests/python/clients.py`
//! from the project's virtual environment (`make deps` creates `.venv`).
//!
//! Each scenario prints a canonical JSON document of what the client saw,
//! step by step. The document from a directory behind ldapsync must equal
//! the one from an identical directory reached directly; scenarios that
//! write get a directory of their own on each side, so both runs start
//! from the same data. Each test then checks the proxied document for what
//! a user would expect, so that two equally broken paths cannot pass.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ldapsync::config::{DirectoryLoss, LdapUrl, Listener, ServerTlsConfig};
use ldapsync::proxy::WriteKind;
use ldapsync_fixtures::{Ds389, Pki, Slapd};
use protocol_tests::{Pair, ProxyHandle, person};
use serde_json::{Value, json};

/// How long one scenario may run; each network wait inside it is bounded
/// at 10 s by the script itself, so this only catches a hung interpreter.
const SCENARIO_DEADLINE: Duration = Duration::from_secs(120);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

/// Runs `clients.py SCENARIO URL ARGS…` and returns the document it printed.
fn run(scenario: &str, url: &str, args: &[&str]) -> Value {
    let python = workspace().join(".venv/bin/python");
    // CI runs `make test`, which runs `make deps` first: a missing venv is
    // a broken setup, never a reason to skip.
    assert!(
        python.exists(),
        "{} is missing: run `make deps` (it creates .venv with python-ldap and ldap3)",
        python.display()
    );
    let mut child = Command::new(&python)
        .arg(workspace().join("protocol-tests/python/clients.py"))
        .arg(scenario)
        .arg(url)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {}: {e}", python.display()));
    // The pipes are drained while the script runs: a document larger than
    // a pipe's buffer would otherwise block it.
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            pipe.read_to_string(&mut text).map(|_| text)
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + SCENARIO_DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{scenario} against {url} ran longer than {SCENARIO_DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = stdout.join().unwrap().expect("reading the script's output");
    let stderr = stderr.join().unwrap().unwrap_or_default();
    assert!(
        status.success(),
        "{scenario} against {url} failed ({status}):\n{stderr}\n{stdout}"
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{scenario}: output is not JSON ({e}):\n{stdout}"))
}

/// Runs `scenario` against the directory directly and through ldapsync,
/// asserts both documents are equal and returns the proxied one.
fn differential(scenario: &str, direct_url: &str, proxy_url: &str, args: &[&str]) -> Value {
    let direct = run(scenario, direct_url, args);
    let proxied = run(scenario, proxy_url, args);
    if direct != proxied {
        panic!(
            "{scenario}: ldapsync answered differently from slapd\n{}",
            differences(&direct, &proxied)
        );
    }
    proxied
}

/// The first lines where two documents differ, with their JSON paths'
/// surroundings, since whole documents run to thousands of lines.
fn differences(direct: &Value, proxied: &Value) -> String {
    let direct = serde_json::to_string_pretty(direct).unwrap();
    let proxied = serde_json::to_string_pretty(proxied).unwrap();
    let (d, p): (Vec<_>, Vec<_>) = (direct.lines().collect(), proxied.lines().collect());
    let first = d
        .iter()
        .zip(&p)
        .position(|(a, b)| a != b)
        .unwrap_or(d.len().min(p.len()));
    let from = first.saturating_sub(8);
    let window = |lines: &[&str]| lines.iter().skip(from).take(24).copied().collect::<Vec<_>>().join("\n");
    format!(
        "first difference at line {}\n--- directly:\n{}\n--- through ldapsync:\n{}",
        first + 1,
        window(&d),
        window(&p)
    )
}

fn people(uid: &str) -> String {
    person(uid).0
}

/// The DNs of a document's entry list (`[[dn, attributes], …]`).
fn dns(entries: &Value) -> Vec<String> {
    entries
        .as_array()
        .unwrap_or_else(|| panic!("not an entry list: {entries}"))
        .iter()
        .map(|e| e[0].as_str().unwrap().to_owned())
        .collect()
}

/// The captured writes a client's successful add, modify, modrdn and delete
/// must produce, in order; its failed ones produce none.
fn assert_captured(pair: &Pair, expected: &[(WriteKind, &str)]) {
    let expected: Vec<_> = expected.iter().map(|(kind, uid)| (*kind, people(uid))).collect();
    assert_eq!(
        pair.proxy.sink.writes(),
        expected,
        "exactly the successful writes reach the capture sink"
    );
}

/// Runs the `reconnect` scenario against `url` while `slapd` is down,
/// bringing it back after a second and a half.
fn reconnect_while_down(slapd: &mut Slapd, url: &str) -> Value {
    slapd.kill();
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(1500));
            slapd.restart();
        });
        run("reconnect", url, &[])
    })
}

/// python-ldap's ReconnectLDAPObject, started while the directory is down,
/// binds and searches once it is back, through ldapsync as directly: by
/// default ldapsync closes a session it cannot connect to the directory,
/// which libldap reports as SERVER_DOWN, the error failover logic retries.
/// With `on_directory_loss = "notice"` the same client gives up at once
/// (UNAVAILABLE is not retried): why it is not the default.
#[test]
fn python_ldap_reconnect_rides_out_a_directory_restart_as_it_does_directly() {
    let mut pair = Pair::start();
    let (direct_url, proxy_url) = pair.urls();
    let direct = reconnect_while_down(&mut pair.direct, &direct_url);
    let proxied = reconnect_while_down(&mut pair.behind_proxy, &proxy_url);
    assert_eq!(direct, proxied, "{}", differences(&direct, &proxied));
    assert_eq!(proxied["bind"]["result"], 0, "{proxied}");
    assert_eq!(proxied["whoami"]["value"], "dn:cn=admin,dc=example,dc=com");
    assert_eq!(dns(&proxied["search"]["entries"]), ["dc=example,dc=com"]);

    let noticing = ProxyHandle::start_with(&[pair.behind_proxy.url()], |c| {
        c.on_directory_loss = DirectoryLoss::Notice;
    });
    let told = reconnect_while_down(&mut pair.behind_proxy, &noticing.url());
    assert_eq!(told["bind"]["error"], "UNAVAILABLE", "{told}");
}

#[test]
fn python_ldap_operations_answer_as_the_directory_does() {
    let pair = Pair::start_with_bulk(2500);
    let (direct, proxied) = pair.urls();
    let doc = differential("python-ldap", &direct, &proxied, &[]);

    assert_eq!(doc["whoami anonymous"]["value"], "");
    assert_eq!(doc["bind alice"]["result"], 0);
    assert_eq!(doc["whoami alice"]["value"], format!("dn:{}", people("alice")));
    assert_eq!(
        dns(&doc["search with a filter"]["entries"]),
        ["carol", "frank"].map(people),
        "cn contains \"ar\" in any case, or uid starts with f"
    );
    assert_eq!(
        dns(&doc["search by member"]["entries"]),
        ["cn=staff,ou=groups,dc=example,dc=com"]
    );
    assert_eq!(doc["search no such object"]["result"], 32);
    assert_eq!(doc["compare true"]["value"], true);
    assert_eq!(doc["compare false"]["value"], false);
    assert_eq!(doc["compare undefined attribute"]["error"], "UNDEFINED_TYPE");
    assert_eq!(
        doc["read own entry back"]["entries"][0][1]["description"],
        json!(["set by python-ldap"])
    );
    assert_eq!(doc["modify someone else"]["result"], 50, "the directory's ACL applies");
    let pipelined = &doc["pipelined"];
    assert_eq!(dns(&pipelined["search carol"]["entries"]), [people("carol")]);
    assert_eq!(pipelined["compare dave"]["compare"], true);
    assert_eq!(dns(&pipelined["search nobody"]["entries"]), Vec::<String>::new());
    assert_eq!(doc["bind wrong password"]["result"], 49);
    assert_eq!(
        doc["whoami after failed bind"]["value"], "",
        "a failed bind leaves the session anonymous"
    );
    assert_eq!(doc["add"]["result"], 0);
    assert_eq!(doc["add existing"]["result"], 68);
    assert_eq!(doc["modrdn"]["result"], 0);
    assert_eq!(doc["delete"]["result"], 0);
    assert_eq!(doc["delete missing"]["result"], 32);
    assert_eq!(doc["delete missing"]["matched"], "ou=people,dc=example,dc=com");
    let after = dns(&doc["people after the writes"]["entries"]);
    assert!(
        !after.contains(&people("nina")) && !after.contains(&people("nora")),
        "{after:?}"
    );
    assert_paged_and_limited(&doc);
    assert_eq!(doc["client size limit"]["result"], 4);
    assert_captured(
        &pair,
        &[
            (WriteKind::Modify, "alice"),
            (WriteKind::Add, "nina"),
            (WriteKind::ModifyDn, "nina"),
            (WriteKind::Delete, "nora"),
        ],
    );
}

/// Paging (RFC 2696) reads all 2,500 bulk people in pages of 500; a plain
/// search stops at the directory's limit of 500 with sizeLimitExceeded.
fn assert_paged_and_limited(doc: &Value) {
    assert_eq!(doc["paged search"]["page sizes"], json!([500, 500, 500, 500, 500]));
    let paged: Vec<&str> = doc["paged search"]["dns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|dn| dn.as_str().unwrap())
        .collect();
    assert_eq!(paged.len(), 2500);
    assert_eq!(paged[0], "uid=user00001,ou=bulk,dc=example,dc=com");
    assert_eq!(paged[2499], "uid=user02500,ou=bulk,dc=example,dc=com");
    assert!(paged.windows(2).all(|w| w[0] < w[1]), "no entry twice");
    assert_eq!(doc["server size limit"]["result"], 4);
    assert_eq!(doc["server size limit"]["entries"], 500);
}

#[test]
fn ldap3_operations_answer_as_the_directory_does() {
    let pair = Pair::start_with_bulk(2500);
    let (direct, proxied) = pair.urls();
    let doc = differential("ldap3", &direct, &proxied, &[]);

    assert_eq!(doc["whoami anonymous"], Value::Null, "ldap3's word for no identity");
    assert_eq!(doc["bind alice"]["result"], 0);
    assert_eq!(doc["whoami alice"], format!("dn:{}", people("alice")));
    assert_eq!(
        dns(&doc["search with a filter"]["entries"]),
        ["carol", "frank"].map(people)
    );
    assert_eq!(doc["search no such object"]["result"], 32);
    assert_eq!(doc["compare true"]["result"], 6);
    assert_eq!(doc["compare false"]["result"], 5);
    assert_eq!(
        doc["read own entry back"]["entries"][0][1]["description"],
        json!(["set by ldap3"])
    );
    assert_eq!(doc["modify someone else"]["result"], 50);
    assert_eq!(doc["bind wrong password"]["result"], 49);
    assert_eq!(doc["whoami after failed bind"], Value::Null);
    assert_eq!(doc["bind admin"]["result"], 0);
    assert_eq!(doc["add"]["result"], 0);
    assert_eq!(doc["add existing"]["result"], 68);
    assert_eq!(doc["modrdn"]["result"], 0);
    assert_eq!(doc["delete"]["result"], 0);
    assert_eq!(doc["delete missing"]["result"], 32);
    assert_paged_and_limited(&doc);
    assert_captured(
        &pair,
        &[
            (WriteKind::Modify, "alice"),
            (WriteKind::Add, "nina"),
            (WriteKind::ModifyDn, "nina"),
            (WriteKind::Delete, "nora"),
        ],
    );
}

#[test]
fn ldap3_pipelined_requests_and_an_abandoned_persistent_search() {
    let pair = Pair::start();
    let (direct, proxied) = pair.urls();
    let doc = differential("ldap3-async", &direct, &proxied, &[]);

    // Five requests were on the wire before the first answer was read.
    let pipelined = &doc["pipelined"];
    assert_eq!(dns(&pipelined["search alice"]["entries"]), [people("alice")]);
    assert_eq!(dns(&pipelined["search bob"]["entries"]), [people("bob")]);
    assert_eq!(dns(&pipelined["search nobody"]["entries"]), Vec::<String>::new());
    assert_eq!(pipelined["compare carol"]["result"], 6);
    assert_eq!(pipelined["modify own entry"]["result"], 0);

    // The persistent search was running: it delivered an add, and another
    // search on its connection was answered meanwhile.
    assert_eq!(doc["refresh"], json!([[], ["sync info", "refreshDelete"]]));
    assert_eq!(
        doc["persistent search sees the add"],
        json!(["entry", ["add", people("nina")]])
    );
    assert_eq!(
        dns(&doc["search beside the persistent one"]["entries"]),
        [people("nina")]
    );
    // Abandoned, it receives nothing more (RFC 4511 §4.11), though the
    // witness search shows the directory had a change to send, and the
    // connection carries on.
    assert_eq!(doc["abandon"], true);
    assert_eq!(
        doc["witness sees the modify"],
        json!(["entry", ["modify", people("nina")]])
    );
    assert_eq!(doc["abandoned search received after the abandon"], json!([]));
    assert_eq!(doc["whoami after abandon"], format!("dn:{}", people("alice")));
    assert_eq!(doc["whoami after the modify"], format!("dn:{}", people("alice")));
    assert_captured(
        &pair,
        &[
            (WriteKind::Modify, "alice"),
            (WriteKind::Add, "nina"),
            (WriteKind::Modify, "nina"),
        ],
    );
}

#[test]
fn syncrepl_refresh_and_persist_delivers_the_same_changes() {
    let pair = Pair::start();
    let (direct, proxied) = pair.urls();
    let doc = differential("syncrepl", &direct, &proxied, &[]);

    // The refresh phase: everything in ou=people, as adds.
    let mut refresh = vec![json!(["add", "ou=people,dc=example,dc=com"])];
    refresh.extend(["alice", "bob", "carol", "dave", "erin", "frank"].map(|uid| json!(["add", people(uid)])));
    assert_eq!(doc["refresh"], Value::Array(refresh));
    assert_eq!(doc["cookie after the refresh"], true);

    // Then each change made on another connection, in order, while the
    // search persisted; the group change outside ou=people is not among
    // them. The rename keeps the entry's identity (its entryUUID).
    let nina = format!("entry first seen as {}", people("nina"));
    let alice = format!("entry first seen as {}", people("alice"));
    assert_eq!(
        doc["changes"],
        json!([
            ["add", people("nina"), {"uid": ["nina"]}, nina],
            ["modify", people("alice"), {"description": ["changed while persisting"], "uid": ["alice"]}, alice],
            ["modify", people("nora"), {"uid": ["nora"]}, nina],
            ["delete", people("nora"), {}, nina],
        ])
    );
    // What SyncreplConsumer told the application: the refresh ended with a
    // refreshDelete Sync Info message; then three entries, a new cookie for
    // the change outside the search's scope, and the delete.
    assert_eq!(
        doc["callbacks"],
        json!([
            ["intermediate", "Sync Info refreshDelete"],
            ["present", null, true],
            ["refresh done"],
            ["entry", people("nina")],
            ["entry", people("alice")],
            ["entry", people("nora")],
            ["intermediate", "Sync Info newcookie"],
            ["delete", [nina]],
        ])
    );
    // Other searches were answered while the persistent one was open.
    assert_eq!(dns(&doc["search on another connection"]["entries"]), [people("nina")]);
    assert_eq!(dns(&doc["search on the same connection"]["entries"]), [people("nina")]);
    assert_eq!(
        doc["whoami after abandoning"]["value"],
        format!("dn:{}", people("alice"))
    );
}

#[test]
fn starttls_with_python_ldap_and_ldap3() {
    let pki = Pki::new("ldapsync test");
    let untrusted = Pki::new("unrelated");
    // The scenario only reads, so ldapsync may front the very directory
    // the direct run uses (over plain LDAP: TLS ends at ldapsync).
    let slapd = Slapd::start_with_tls(&pki);
    let proxy = ProxyHandle::start_with(&[slapd.url()], |config| {
        config.listen = vec![Listener::from("ldap://127.0.0.1:0".parse::<LdapUrl>().unwrap())];
        config.tls = Some(ServerTlsConfig {
            cert: pki.cert.clone(),
            key: pki.key.clone(),
        });
    });
    let (ca, untrusted_ca) = (pki.ca.to_str().unwrap(), untrusted.ca.to_str().unwrap());
    let doc = differential("starttls", &slapd.url(), &proxy.url(), &[ca, untrusted_ca]);

    let alice = format!("dn:{}", people("alice"));
    assert_eq!(doc["python-ldap starttls"]["value"], Value::Null, "no error");
    assert_eq!(doc["python-ldap under TLS"], true);
    assert_eq!(doc["python-ldap bind"]["result"], 0);
    assert_eq!(doc["python-ldap whoami"]["value"], alice);
    assert_eq!(dns(&doc["python-ldap search"]["entries"]), [people("alice")]);
    assert_eq!(doc["ldap3 starttls"], true);
    assert_eq!(doc["ldap3 under TLS"], true);
    assert_eq!(doc["ldap3 bind"]["result"], 0);
    assert_eq!(doc["ldap3 whoami"], alice);
    assert_eq!(dns(&doc["ldap3 search"]["entries"]), [people("alice")]);
    // A client that does not trust the certificate refuses the session.
    assert_eq!(
        doc["python-ldap starttls, untrusted certificate"]["error"],
        "CONNECT_ERROR"
    );
    assert_eq!(doc["ldap3 starttls, untrusted certificate"], "LDAPStartTLSError");
}

/// The read-and-write scenarios against 389 Directory Server, directly and
/// through ldapsync. Both runs share one instance, so the direct one runs
/// twice first: the scenarios leave what they write as they found it or in
/// a state that a second run repeats, and the documents compared are the
/// second direct run's and the proxied one's. Not here: `syncrepl`, whose
/// writes a second run cannot repeat (tests/ds389.rs compares a Content
/// Synchronization refresh with ldapsearch), and `ldap3-async`, which waits
/// for a persistent search's notice that 389 DS does not send for its add,
/// even directly.
#[test]
fn python_clients_answer_through_ldapsync_as_389_ds_does() {
    let Some(ds) = Ds389::shared() else { return };
    let proxy = ProxyHandle::start_with(&[ds.url()], |_| {});
    for scenario in ["python-ldap", "ldap3"] {
        run(scenario, &ds.url(), &[]);
        let doc = differential(scenario, &ds.url(), &proxy.url(), &[]);
        if scenario == "python-ldap" {
            assert_eq!(doc["bind alice"]["result"], 0, "{doc}");
        }
    }
}
