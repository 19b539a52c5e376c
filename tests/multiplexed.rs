//! Multiplexed listeners against a real slapd: client sessions share two
//! directory connections bound as a service identity allowed to assert
//! others (`authzTo`), each operation carrying the client's identity in a
//! Proxied Authorization control. The directory sees the client's identity
//! (whoami, ACLs give the answers they give directly), failed binds leave
//! the session anonymous, a client's own proxied authorization is refused,
//! abandon reaches the right operation, SASL takes a dedicated connection,
//! and fifty sessions cost the directory a handful of connections.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::serve_config;
use ldapsync_fixtures::{ROOT_DN, ROOT_PW, Slapd, ldapmodify, person};

const SERVICE: &str = "cn=ldapsync,dc=example,dc=com";

struct Mux {
    slapd: Slapd,
    dir: tempfile::TempDir,
    served: common::Served,
}

impl Mux {
    fn start() -> Mux {
        Mux::start_with("")
    }

    /// With `extra` at the end of the configuration (a connector).
    fn start_with(extra: &str) -> Mux {
        let slapd = Slapd::start();
        // The service may assert the people's identities (and anonymity).
        ldapmodify(
            &slapd.url(),
            ROOT_DN,
            ROOT_PW,
            &format!(
                "dn: {SERVICE}\nchangetype: add\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\n\
                 cn: ldapsync\nuserPassword: mux-secret\nauthzTo: {{0}}dn.regex:^uid=[^,]*,ou=people,dc=example,dc=com$\n"
            ),
        );
        let secret = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(secret.path(), "mux-secret\n").unwrap();
        let (dir, served) = serve_config(&format!(
            r#"
[proxy]
listen = [{{ url = "ldap://127.0.0.1:0", mode = "multiplexed" }}]
upstream = ["{}"]
[proxy.multiplex]
bind_dn = "{SERVICE}"
password_file = "{}"
connections = 2
{extra}
"#,
            slapd.url(),
            secret.path().display()
        ));
        std::fs::copy(secret.path(), dir.path().join("kept.secret")).unwrap();
        Mux { slapd, dir, served }
    }
}

fn run(tool: &str, args: &[&str]) -> Output {
    Command::new(tool).args(args).output().unwrap()
}

/// (exit code, stdout) of an ldap-utils tool.
fn tool(tool: &str, url: &str, args: &[&str]) -> (i32, String) {
    let out = run(tool, &[&["-x", "-H", url][..], args].concat());
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn whoami(url: &str, uid: Option<&str>) -> (i32, String) {
    match uid {
        Some(uid) => {
            let (dn, password) = person(uid);
            tool("ldapwhoami", url, &["-D", &dn, "-w", &password])
        }
        None => tool("ldapwhoami", url, &[]),
    }
}

#[test]
fn the_directory_sees_each_clients_identity_and_its_acls_answer_as_they_do_directly() {
    let mux = Mux::start();
    let (proxied, direct) = (mux.served.url.as_str(), mux.slapd.url());
    for uid in [Some("alice"), Some("bob"), None] {
        let through = whoami(proxied, uid);
        assert_eq!(through, whoami(&direct, uid), "{uid:?}");
        assert_eq!(through.0, 0, "{through:?}");
    }
    assert!(
        whoami(proxied, Some("alice"))
            .1
            .contains("dn:uid=alice,ou=people,dc=example,dc=com")
    );
    assert!(whoami(proxied, None).1.contains("anonymous"));

    // Self write, others' entries refused, passwords readable by their
    // owner only: through the shared connections as directly.
    let (alice, alice_pw) = person("alice");
    let (bob, _) = person("bob");
    let modify = |url: &str, target: &str| {
        let ldif = format!("dn: {target}\nchangetype: modify\nreplace: description\ndescription: by alice\n");
        let mut child = Command::new("ldapmodify")
            .args(["-x", "-H", url, "-D", &alice, "-w", &alice_pw])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(ldif.as_bytes()).unwrap();
        child.wait().unwrap().code()
    };
    // (target, exit code): 0 success, 50 insufficientAccessRights.
    for (target, code) in [(&alice, Some(0)), (&bob, Some(50))] {
        assert_eq!(modify(proxied, target), code, "through ldapsync, {target}");
        assert_eq!(modify(&direct, target), code, "directly, {target}");
    }
    let password_of = |url: &str, reader: Option<&str>, owner: &str| {
        let owner_dn = person(owner).0;
        let mut args = vec!["-LLL", "-b", owner_dn.as_str(), "-s", "base", "userPassword"];
        let creds;
        if let Some(reader) = reader {
            creds = person(reader);
            args.extend(["-D", creds.0.as_str(), "-w", creds.1.as_str()]);
        }
        tool("ldapsearch", url, &args).1.contains("userPassword")
    };
    for (reader, sees) in [(Some("alice"), true), (Some("bob"), false), (None, false)] {
        assert_eq!(
            password_of(proxied, reader, "alice"),
            sees,
            "{reader:?} through ldapsync"
        );
        assert_eq!(password_of(&direct, reader, "alice"), sees, "{reader:?} directly");
    }
}

#[test]
fn failed_binds_leave_the_session_anonymous_and_a_clients_own_proxied_authorization_is_refused() {
    let mux = Mux::start();
    let url = mux.served.url.clone();
    let (code, said) = tool("ldapwhoami", &url, &["-D", &person("alice").0, "-w", "wrong"]);
    assert_eq!(code, 49, "invalidCredentials, as the directory says: {said}");
    // Asserting bob's identity with alice's session would run with the
    // shared connections' right to be anyone: refused.
    let (alice, password) = person("alice");
    let authzid = format!("!authzid=dn:{}", person("bob").0);
    let (code, said) = tool("ldapwhoami", &url, &["-D", &alice, "-w", &password, "-e", &authzid]);
    assert_ne!(code, 0);
    assert!(
        said.contains("(53)") && said.contains("multiplexed"),
        "unwillingToPerform: {said}"
    );

    // One session: a wrong password, then the right one (ldap3, one
    // connection throughout).
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let (conn, mut ldap) = ldap3::LdapConnAsync::new(&url).await.unwrap();
        ldap3::drive!(conn);
        let refused = ldap.simple_bind(&alice, "wrong").await.unwrap();
        assert_eq!(refused.rc, 49);
        let who = async |ldap: &mut ldap3::Ldap| {
            let (exop, _) = ldap.extended(ldap3::exop::WhoAmI).await.unwrap().success().unwrap();
            String::from_utf8_lossy(&exop.val.unwrap_or_default()).into_owned()
        };
        assert_eq!(who(&mut ldap).await, "", "anonymous after a failed bind");
        assert_eq!(ldap.simple_bind(&alice, &password).await.unwrap().rc, 0);
        assert_eq!(who(&mut ldap).await, format!("dn:{alice}"));
        ldap.unbind().await.unwrap();
    });
}

#[test]
fn an_anonymous_bind_is_answered_here_once_the_directory_has_accepted_one_and_leaves_the_session_anonymous() {
    let mux = Mux::start();
    let url = mux.served.url.clone();
    let (alice, password) = person("alice");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let (conn, mut ldap) = ldap3::LdapConnAsync::new(&url).await.unwrap();
        ldap3::drive!(conn);
        let who = async |ldap: &mut ldap3::Ldap| {
            let (exop, _) = ldap.extended(ldap3::exop::WhoAmI).await.unwrap().success().unwrap();
            String::from_utf8_lossy(&exop.val.unwrap_or_default()).into_owned()
        };
        // The first is the directory's to answer: it accepts anonymous binds.
        assert_eq!(ldap.simple_bind("", "").await.unwrap().rc, 0);
        assert_eq!(ldap.simple_bind(&alice, &password).await.unwrap().rc, 0);
        assert_eq!(who(&mut ldap).await, format!("dn:{alice}"));
        // The next is answered without the directory (stopped here)…
        mux.slapd.freeze();
        let anonymous = tokio::time::timeout(Duration::from_secs(5), ldap.simple_bind("", "")).await;
        mux.slapd.thaw();
        let anonymous = anonymous.expect("an anonymous bind answered without the directory");
        assert_eq!(anonymous.unwrap().rc, 0);
        // …and the session no longer runs as alice.
        assert_eq!(who(&mut ldap).await, "", "anonymous after an anonymous bind");
        // A bind with a name still goes to the directory.
        assert_eq!(ldap.simple_bind(&alice, "wrong").await.unwrap().rc, 49);
        ldap.unbind().await.unwrap();
    });
}

#[test]
fn many_sessions_share_a_few_directory_connections_and_sasl_takes_one_of_its_own() {
    let mux = Mux::start();
    let url = mux.served.url.clone();
    let port = mux
        .slapd
        .url()
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .to_owned();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let directory_connections = runtime.block_on(async {
        let mut sessions = Vec::new();
        for i in 0..50 {
            let (conn, mut ldap) = ldap3::LdapConnAsync::new(&url).await.unwrap();
            ldap3::drive!(conn);
            let (dn, password) = person(["alice", "bob", "carol"][i % 3]);
            assert_eq!(ldap.simple_bind(&dn, &password).await.unwrap().rc, 0);
            let (entries, result) = ldap
                .search(&dn, ldap3::Scope::Base, "(objectClass=*)", vec!["uid"])
                .await
                .unwrap()
                .success()
                .unwrap();
            assert_eq!((entries.len(), result.rc), (1, 0));
            sessions.push(ldap);
        }
        let out = Command::new("ss")
            .args(["-Htn", "state", "established", &format!("( dport = :{port} )")])
            .output()
            .unwrap();
        let open = String::from_utf8_lossy(&out.stdout).lines().count();
        for mut ldap in sessions {
            ldap.unbind().await.unwrap();
        }
        open
    });
    // Two shared connections and at most two that check binds.
    assert!(
        directory_connections <= 4,
        "{directory_connections} directory connections for 50 sessions"
    );

    // A SASL bind goes over a connection of its own, and works.
    let out = run(
        "ldapwhoami",
        &[
            "-H",
            &url,
            "-Y",
            "DIGEST-MD5",
            "-U",
            "alice",
            "-w",
            "alice-secret",
            "-O",
            "maxssf=0",
        ],
    );
    let said = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("dn:uid=alice,ou=people,dc=example,dc=com"), "{said}");
}

#[test]
fn an_abandon_is_relayed_for_its_operation_and_the_session_goes_on() {
    use common::raw;
    let mux = Mux::start();
    let mut client = raw::Raw::connect(&mux.served.url);
    // A search, abandoned at once, then a whoami: the session goes on, and
    // what comes back carries the client's message ids.
    client.send(&[
        raw::search_base(2, "ou=nowhere,dc=example,dc=com"),
        raw::abandon(3, 2),
        raw::whoami(4),
    ]);
    let mut seen = Vec::new();
    while let Some(response) = client.response() {
        seen.push(response.message_id);
        if response.message_id == 4 {
            break;
        }
    }
    assert_eq!(
        seen.last(),
        Some(&4),
        "the whoami after the abandon is answered: {seen:?}"
    );
    assert!(seen.iter().all(|id| [2, 4].contains(id)), "{seen:?}");
}

#[test]
fn a_write_through_a_multiplexed_listener_is_captured_like_any_other() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("service.secret");
    std::fs::write(&secret, format!("{ROOT_PW}\n")).unwrap();
    // Polls once an hour: only capture can bring the change in.
    let mux = Mux::start_with(&format!(
        r#"
[store]
path = "{}"
[[connector]]
name = "example"
bind_dn = "{ROOT_DN}"
password_file = "{}"
direction = "ldap-to-local"
poll_interval = "1h"
[connector.accounts]
base = "ou=people,dc=example,dc=com"
filter = "(objectClass=inetOrgPerson)"
naming = "uid"
map = {{ mail = "mail" }}
"#,
        dir.path().join("ldapsync.db").display(),
        secret.display()
    ));
    let config = mux.dir.path().join("ldapsync.toml");
    let show = || {
        let out = common::ldapsync()
            .args([
                "--json",
                "account",
                "show",
                "alice",
                "--config",
                config.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(
        common::eventually(|| show().contains("alice@example.com")),
        "imported: {}",
        show()
    );
    let (alice, password) = person("alice");
    ldapmodify(
        &mux.served.url,
        &alice,
        &password,
        &format!("dn: {alice}\nchangetype: modify\nreplace: mail\nmail: alice@multiplexed.example\n"),
    );
    assert!(
        common::eventually(|| show().contains("alice@multiplexed.example")),
        "captured: {}",
        show()
    );
}

#[test]
fn a_client_that_stops_reading_is_closed_and_holds_up_no_one_on_its_shared_connection() {
    use common::raw;
    let mux = Mux::start_with("max_unread = 65536");
    // 100 KB in each of the six people: 100 searches of them all are
    // 60 MB and 700 answers, more than the buffers between a client and
    // ldapsync (and, before, the session's queue) hold.
    let people = ["alice", "bob", "carol", "dave", "erin", "frank"];
    for uid in people {
        let ldif = format!(
            "dn: {}\nchangetype: modify\nreplace: description\ndescription: {}\n",
            person(uid).0,
            "x".repeat(100_000)
        );
        ldapmodify(&mux.slapd.url(), ROOT_DN, ROOT_PW, &ldif);
    }
    let mut stuck = raw::Raw::connect_with_small_window(&mux.served.url);
    let searches: Vec<_> = (1..=100)
        .map(|id| raw::search(id, "ou=people,dc=example,dc=com", 2))
        .collect();
    stuck.send(&searches);
    // More sessions: with two shared connections, every other one shares
    // the stuck client's. Each is answered while it is stuck (before,
    // they waited for `io_timeout` to drop it: a minute).
    let (alice, _) = person("alice");
    for _ in 0..6 {
        let out = Command::new("timeout")
            .args([
                "10",
                "ldapsearch",
                "-x",
                "-H",
                &mux.served.url,
                "-b",
                &alice,
                "-s",
                "base",
                "uid",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "a search beside a stuck client: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("uid: alice"));
    }
    let closed = mux
        .served
        .wait_for("reads its answers too slowly", Duration::from_secs(20));
    assert!(
        closed.is_some(),
        "the stuck client's session is closed, and the log says why"
    );
    // What it reads now is what was on its way, then the end: not all
    // hundred answers.
    let mut done = 0;
    while let Some(op) = stuck.op() {
        done += usize::from(op == 0x65);
    }
    assert!(
        done < 100,
        "the stuck client's session ended early ({done} searches done)"
    );
}
