//! The `ldapsync` binary as an operator runs it: from flags and a config
//! file, stopped by SIGTERM, refusing bad configuration with a precise
//! message, and never printing a credential even at trace level.

mod common;

use std::process::{Command, Stdio};

use common::{ldapsync, serve};
use ldapsync_fixtures::{Pki, ROOT_DN, ROOT_PW, Slapd, person};

fn ldap_tool(tool: &str, url: &str, args: &[&str]) -> std::process::Output {
    Command::new(tool)
        .arg("-H")
        .arg(url)
        .args(args)
        .output()
        .expect("running ldap-utils")
}

#[test]
fn serves_from_config_file_with_flags_overriding_and_stops_on_sigterm() {
    let slapd = Slapd::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ldapsync.toml");
    // The file names a directory that is not there; the flag must win.
    std::fs::write(
        &config,
        "[proxy]\nlisten = [\"ldap://127.0.0.1:0\"]\nupstream = [\"ldap://127.0.0.1:9\"]\n[log]\nlevel = \"info\"\n",
    )
    .unwrap();
    let served = serve(&[
        "--config",
        config.to_str().unwrap(),
        "--upstream",
        &slapd.url(),
        "--log-level",
        "trace",
    ]);

    let (alice, alice_pw) = person("alice");
    let whoami = ldap_tool("ldapwhoami", &served.url, &["-x", "-D", &alice, "-w", &alice_pw]);
    assert!(whoami.status.success(), "{whoami:?}");
    assert_eq!(String::from_utf8_lossy(&whoami.stdout).trim(), format!("dn:{alice}"));
    let modify = Command::new("ldapmodify")
        .args(["-H", &served.url, "-x", "-D", ROOT_DN, "-w", ROOT_PW])
        .stdin(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(b"dn: uid=bob,ou=people,dc=example,dc=com\nchangetype: modify\nreplace: userPassword\nuserPassword: bob-new-secret\n")?;
            child.wait()
        })
        .unwrap();
    assert!(modify.success());

    let (exit, log) = served.terminate();
    assert!(exit.success(), "graceful exit on SIGTERM: {exit:?}\n{log}");
    assert!(log.contains("SIGTERM received"), "{log}");
    assert!(log.contains("operation done"), "trace logging was on: {log}");
    for secret in [alice_pw.as_str(), ROOT_PW, "bob-new-secret"] {
        assert!(
            !log.contains(secret),
            "a password appeared in the log at trace level: {secret}"
        );
    }
}

#[test]
fn serves_from_flags_alone() {
    let slapd = Slapd::start();
    let served = serve(&["--listen", "ldap://127.0.0.1:0", "--upstream", &slapd.url()]);
    let search = ldap_tool(
        "ldapsearch",
        &served.url,
        &["-x", "-LLL", "-s", "base", "-b", "dc=example,dc=com", "dc"],
    );
    assert!(search.status.success(), "{search:?}");
    assert!(String::from_utf8_lossy(&search.stdout).contains("dc: example"));
    let (exit, _) = served.terminate();
    assert!(exit.success());
}

#[test]
fn bad_configuration_is_refused_with_a_precise_message() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, Option<&str>, &[&str], &str)] = &[
        (
            "unknown key",
            Some(
                "[proxy]\nupstream = [\"ldap://127.0.0.1:3890\"]\nlisten = [\"ldap://127.0.0.1:0\"]\nmax_conections = 5\n",
            ),
            &[],
            "max_conections",
        ),
        (
            "bad URL",
            Some("[proxy]\nupstream = [\"http://127.0.0.1:636\"]\n"),
            &[],
            "http",
        ),
        (
            "bad duration",
            Some("[proxy]\nio_timeout = \"forever\"\n"),
            &[],
            "io_timeout",
        ),
        (
            "zero limit",
            Some("[proxy]\nupstream = [\"ldap://h\"]\nlisten = [\"ldap://127.0.0.1:0\"]\nmax_connections = 0\n"),
            &[],
            "max_connections",
        ),
        (
            "connection limit past what the runtime can count",
            Some(
                "[proxy]\nupstream = [\"ldap://h\"]\nlisten = [\"ldap://127.0.0.1:0\"]\nmax_connections = 4611686018427387904\n",
            ),
            &[],
            "proxy.max_connections = 4611686018427387904 is out of range: 1 to 1000000",
        ),
        (
            "PDU limit of a terabyte",
            Some(
                "[proxy]\nupstream = [\"ldap://h\"]\nlisten = [\"ldap://127.0.0.1:0\"]\nmax_client_pdu = 1099511627776\n",
            ),
            &[],
            "proxy.max_client_pdu = 1099511627776 is out of range",
        ),
        (
            "idle timeout past the clock",
            Some(
                "[proxy]\nupstream = [\"ldap://h\"]\nlisten = [\"ldap://127.0.0.1:0\"]\nidle_timeout = \"18446744073709551615s\"\n",
            ),
            &[],
            "proxy.idle_timeout = ",
        ),
        (
            "listen URL that does not parse",
            Some("[proxy]\nupstream = [\"ldap://h\"]\nlisten = [{ url = \"ldap://127.0.0.1:0/dc=x\" }]\n"),
            &[],
            "remove \"dc=x\"",
        ),
        (
            "no upstream",
            None,
            &["--listen", "ldap://127.0.0.1:0"],
            "no upstream directory",
        ),
        (
            "missing file",
            None,
            &["--config", "/nonexistent/ldapsync.toml"],
            "/nonexistent/ldapsync.toml",
        ),
        ("bad flag URL", None, &["--upstream", "127.0.0.1:389"], "127.0.0.1:389"),
        (
            "ldaps listener without a certificate",
            Some("[proxy]\nupstream = [\"ldap://h\"]\nlisten = [\"ldaps://127.0.0.1:0\"]\n"),
            &[],
            "listener ldaps://127.0.0.1:0 needs TLS: set proxy.tls.cert",
        ),
        (
            "unreadable certificate",
            Some(
                "[proxy]\nupstream = [\"ldap://h\"]\nlisten = [\"ldaps://127.0.0.1:0\"]\n\
                 [proxy.tls]\ncert = \"/nonexistent/cert.pem\"\nkey = \"/nonexistent/key.pem\"\n",
            ),
            &[],
            "proxy.tls.cert /nonexistent/cert.pem",
        ),
    ];
    for (name, file, extra, needle) in cases {
        let mut command = ldapsync();
        command.arg("serve").args(*extra);
        if let Some(text) = file {
            let path = dir.path().join(format!("{}.toml", name.replace(' ', "-")));
            std::fs::write(&path, text).unwrap();
            command.arg("--config").arg(&path);
        }
        let output = command.output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{name}: must not start");
        assert!(stderr.contains(needle), "{name}: {stderr:?} should mention {needle:?}");
    }
}

#[test]
fn listener_that_cannot_bind_is_an_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("ldap://{}", taken.local_addr().unwrap());
    let output = ldapsync()
        .args(["serve", "--listen", &url, "--upstream", "ldap://127.0.0.1:9"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot listen on") && stderr.contains(&url), "{stderr}");
}

/// Every password a test below uses, for grepping what ldapsync wrote.
struct Secrets(Vec<String>);

impl Secrets {
    fn assert_absent(&self, what: &str, text: &[u8]) {
        let text = String::from_utf8_lossy(text);
        // As a whole word: the fixture's root password is the word "secret",
        // which also occurs inside names like `extended_master_secret`.
        let word = |c: char| c.is_alphanumeric() || c == '_' || c == '-';
        for secret in &self.0 {
            let found = text
                .match_indices(secret.as_str())
                .find(|(at, s)| !text[..*at].ends_with(word) && !text[at + s.len()..].starts_with(word));
            let line = found.map(|(at, _)| text[at.saturating_sub(80)..].lines().next().unwrap_or_default());
            assert!(line.is_none(), "{what} contains the password {secret:?}: {line:?}");
        }
    }
}

#[test]
fn credentials_never_appear_in_logs_the_journal_or_the_database() {
    let slapd = Slapd::start();
    let pki = Pki::new("ldapsync test");
    let dir = tempfile::tempdir().unwrap();
    let service_secret = dir.path().join("service.secret");
    std::fs::write(&service_secret, format!("{ROOT_PW}\n")).unwrap();
    let db = dir.path().join("ldapsync.db");
    let config = dir.path().join("ldapsync.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[proxy]
listen = [{{ url = "ldap://127.0.0.1:0", require_tls = true }}]
upstream = ["{upstream}"]
[proxy.tls]
cert = "{cert}"
key = "{key}"
[log]
level = "trace"
[store]
path = "{db}"
[[connector]]
name = "example"
bind_dn = "{ROOT_DN}"
password_file = "{secret}"
[connector.accounts]
base = "ou=people,dc=example,dc=com"
filter = "(objectClass=inetOrgPerson)"
naming = "uid"
map = {{ mail = "mail" }}
"#,
            upstream = slapd.url(),
            cert = pki.cert.display(),
            key = pki.key.display(),
            db = db.display(),
            secret = service_secret.display(),
        ),
    )
    .unwrap();
    let served = serve(&["--config", config.to_str().unwrap()]);
    let url = served.url.clone();
    let tool = |tool: &str, args: &[&str]| {
        Command::new(tool)
            .env("LDAPTLS_CACERT", &pki.ca)
            .env("LDAPCONF", "/dev/null")
            .arg("-H")
            .arg(&url)
            .args(args)
            .output()
            .unwrap()
    };
    let (alice, alice_pw) = person("alice");
    let (carol, carol_pw) = person("carol");
    let secrets = Secrets(vec![
        ROOT_PW.to_owned(),
        alice_pw.clone(),
        carol_pw.clone(),
        "a-wrong-guess".into(),
        "carol-new-secret".into(),
        "zed-initial-secret".into(),
        "plain-text-attempt".into(),
    ]);
    // Refused in clear text, refused with a wrong password, accepted under TLS.
    assert!(
        !tool("ldapwhoami", &["-x", "-D", &alice, "-w", "plain-text-attempt"])
            .status
            .success()
    );
    assert!(
        !tool("ldapwhoami", &["-x", "-ZZ", "-D", &alice, "-w", "a-wrong-guess"])
            .status
            .success()
    );
    assert!(
        tool("ldapwhoami", &["-x", "-ZZ", "-D", &alice, "-w", &alice_pw])
            .status
            .success()
    );
    // A password change and an entry added with a password, both captured.
    let passwd = tool(
        "ldappasswd",
        &["-x", "-ZZ", "-D", &carol, "-w", &carol_pw, "-s", "carol-new-secret"],
    );
    assert!(passwd.status.success(), "{passwd:?}");
    let mut add = Command::new("ldapmodify")
        .env("LDAPTLS_CACERT", &pki.ca)
        .env("LDAPCONF", "/dev/null")
        .args(["-H", &url, "-x", "-ZZ", "-D", ROOT_DN, "-w", ROOT_PW])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    add.stdin
        .take()
        .unwrap()
        .write_all(
            b"dn: uid=zed,ou=people,dc=example,dc=com\nchangetype: add\nobjectClass: inetOrgPerson\n\
              uid: zed\ncn: Zed\nsn: Zed\nuserPassword: zed-initial-secret\n",
        )
        .unwrap();
    assert!(add.wait().unwrap().success());
    assert!(
        common::eventually(|| {
            let out = ldapsync()
                .args(["--config", config.to_str().unwrap(), "account", "list"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).lines().any(|l| l == "zed")
        }),
        "the captured add reached the local store"
    );
    let (exit, log) = served.terminate();
    assert!(exit.success());
    assert!(log.contains("operation done"), "trace logging was on");
    assert!(log.contains("bind refused: this listener requires TLS first"), "{log}");
    secrets.assert_absent("the trace-level log", log.as_bytes());

    let journal = ldapsync()
        .args(["--config", config.to_str().unwrap(), "journal"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&journal.stdout).contains("account zed"));
    secrets.assert_absent("the journal", &journal.stdout);
    // The capture journal holds DNs, never the requests' contents.
    for file in ["ldapsync.db", "ldapsync.db-wal"] {
        if let Ok(bytes) = std::fs::read(dir.path().join(file)) {
            secrets.assert_absent(file, &bytes);
        }
    }
}

#[test]
fn sighup_reloads_the_certificate_without_dropping_sessions() {
    let slapd = Slapd::start();
    let first = Pki::new("first");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::copy(&first.cert, &cert).unwrap();
    std::fs::copy(&first.key, &key).unwrap();
    let config = dir.path().join("ldapsync.toml");
    std::fs::write(
        &config,
        format!(
            "[proxy]\nlisten = [\"ldaps://127.0.0.1:0\"]\nupstream = [\"{}\"]\n[proxy.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            slapd.url(),
            cert.display(),
            key.display()
        ),
    )
    .unwrap();
    let served = serve(&["--config", config.to_str().unwrap()]);
    assert!(served.url.starts_with("ldaps://"), "{}", served.url);
    let search = |ca: &std::path::Path| {
        Command::new("ldapsearch")
            .env("LDAPTLS_CACERT", ca)
            .env("LDAPCONF", "/dev/null")
            .args([
                "-x",
                "-LLL",
                "-H",
                &served.url,
                "-s",
                "base",
                "-b",
                "dc=example,dc=com",
                "dc",
            ])
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(search(&first.ca));

    let second = Pki::new("second");
    std::fs::copy(&second.cert, &cert).unwrap();
    std::fs::copy(&second.key, &key).unwrap();
    assert!(search(&first.ca), "nothing changes before SIGHUP");
    served.signal("HUP");
    assert!(
        common::eventually(|| search(&second.ca)),
        "after SIGHUP new sessions get the new certificate"
    );
    assert!(!search(&first.ca));

    // A broken file on reload keeps the working certificate.
    std::fs::write(&cert, "not a certificate").unwrap();
    served.signal("HUP");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(search(&second.ca), "the previous certificate stays in use");
    let (exit, log) = served.terminate();
    assert!(exit.success());
    assert!(log.contains("SIGHUP: certificate reloaded"), "{log}");
    assert!(log.contains("SIGHUP: certificate not reloaded"), "{log}");
}

#[test]
fn check_config_lists_every_problem_with_its_key_and_a_hint() {
    let slapd = Slapd::start();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("service.secret");
    std::fs::write(&secret, format!("{ROOT_PW}\n")).unwrap();
    let connector = |name: &str, base: &str, extra: &str| {
        format!(
            "[[connector]]\nname = \"{name}\"\nbind_dn = \"{ROOT_DN}\"\npassword_file = \"{}\"\n{extra}\n\
             [connector.accounts]\nbase = \"{base}\"\nfilter = \"(objectClass=inetOrgPerson)\"\nnaming = \"uid\"\n\
             map = {{ mail = \"mail\", cn = \"display_name\" }}\nobject_classes = [\"inetOrgPerson\"]\n",
            secret.display()
        )
    };
    let proxy = format!(
        "[proxy]\nlisten = [\"ldap://127.0.0.1:0\"]\nupstream = [\"{}\"]\n",
        slapd.url()
    );
    let check = |name: &str, text: &str| {
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        let out = ldapsync().args(["check-config"]).arg(&path).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
    };

    let (ok, out) = check(
        "good",
        &format!("{proxy}{}", connector("example", "ou=people,dc=example,dc=com", "")),
    );
    assert!(ok, "{out}");
    assert!(out.contains("good.toml: OK"), "{out}");

    // Several problems at once: all are listed, each with its key and a hint.
    let broken = format!(
        "{proxy}{}{}",
        connector("one", "ou=people,dc=example,dc=com", "max_delete_percent = 150"),
        connector("two", "dc=example,dc=com", "password_env = \"LDAPSYNC_UNSET_VARIABLE\"")
            .replace("(objectClass=inetOrgPerson)", "(objectClass=inetOrgPerson")
    );
    let (ok, out) = check("broken", &broken);
    assert!(!ok);
    for expected in [
        "connector \"one\": max_delete_percent: must be between 0 and 100",
        "connector \"two\": password_file: set password_file or password_env, not both",
        "connector \"two\": accounts.filter: \"(objectClass=inetOrgPerson\" is not an LDAP filter",
        "hint: an RFC 4515 filter",
        "connectors \"one\" and \"two\" overlap",
        "hint: give each connector its own subtree",
        "4 problem(s)",
    ] {
        assert!(out.contains(expected), "{expected:?} missing from:\n{out}");
    }

    // Values out of range: what serve refuses, check-config reports, all of them.
    let (ok, out) = check(
        "ranges",
        &format!(
            "{}{}",
            proxy.replace(
                "[proxy]\n",
                "[proxy]\nmax_outstanding = 0\nidle_timeout = \"18446744073709551615s\"\n"
            ),
            connector(
                "example",
                "ou=people,dc=example,dc=com",
                "poll_interval = \"18446744073709551615s\""
            )
        ),
    );
    assert!(!ok, "{out}");
    for expected in [
        "proxy.max_outstanding = 0 is out of range: 1 to 65536",
        "proxy.idle_timeout = \"",
        "connector \"example\": poll_interval: \"",
        "3 problem(s)",
    ] {
        assert!(out.contains(expected), "{expected:?} missing from:\n{out}");
    }

    // Unknown keys and syntax: the key and line are named.
    let (ok, out) = check("typo", &format!("{proxy}max_conections = 3\n"));
    assert!(!ok);
    assert!(out.contains("max_conections") && out.contains("hint:"), "{out}");
    // Several unknown keys, in different tables: every one in one run.
    let typos = format!(
        "{proxy}max_conections = 3\n{}",
        connector("example", "ou=people,dc=example,dc=com", "polling = \"1m\"")
            .replace("naming = \"uid\"", "naming = \"uid\"\nnamin = \"uid\"")
    );
    let (ok, out) = check("typos", &typos);
    assert!(!ok);
    for key in ["max_conections", "polling", "namin"] {
        assert!(
            out.contains(&format!("unknown field `{key}`")),
            "{key} missing from:\n{out}"
        );
    }
    assert!(out.contains("3 problem(s)"), "{out}");

    // The mapping against the directory's schema.
    let misspelt =
        connector("example", "ou=people,dc=example,dc=com", "").replace("mail = \"mail\"", "mial = \"mail\"");
    let (ok, out) = check("schema", &format!("{proxy}{misspelt}"));
    assert!(!ok);
    assert!(
        out.contains("accounts.map: the directory's schema has no attribute \"mial\""),
        "{out}"
    );

    // An unreachable directory: warned about, not an error.
    let elsewhere = format!("{proxy}{}", connector("example", "ou=people,dc=example,dc=com", ""))
        .replace(&slapd.url(), "ldap://127.0.0.1:9");
    let (ok, out) = check("offline", &elsewhere);
    assert!(ok, "{out}");
    assert!(
        out.contains("warning: connector \"example\": mapping not checked"),
        "{out}"
    );
}

#[test]
fn sighup_reloads_the_log_level_from_the_config_file() {
    let slapd = Slapd::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ldapsync.toml");
    let write = |level: &str| {
        std::fs::write(
            &config,
            format!(
                "[proxy]\nlisten = [\"ldap://127.0.0.1:0\"]\nupstream = [\"{}\"]\n[log]\nlevel = \"{level}\"\n",
                slapd.url()
            ),
        )
        .unwrap()
    };
    write("info");
    let served = serve(&["--config", config.to_str().unwrap()]);
    let search = || {
        let out = ldap_tool(
            "ldapsearch",
            &served.url,
            &["-x", "-s", "base", "-b", "dc=example,dc=com"],
        );
        assert!(out.status.success());
    };
    search();
    write("debug");
    served.signal("HUP");
    std::thread::sleep(std::time::Duration::from_millis(300));
    search();
    let (exit, log) = served.terminate();
    assert!(exit.success());
    let reloaded = log.find("SIGHUP: log level reloaded").expect("reloaded");
    let first_debug = log.find("operation done").expect("debug lines after the reload");
    assert!(first_debug > reloaded, "no debug line before the reload:\n{log}");
}

#[test]
fn the_systemd_unit_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/debian/ldapsync.service")).unwrap();
    let unit = unit.replace("/usr/bin/ldapsync", env!("CARGO_BIN_EXE_ldapsync"));
    // The man pages it names are installed by the package only; tests/deb.sh
    // verifies the installed unit with them.
    let unit = unit.replace("man:ldapsync(1) man:ldapsync.toml(5) ", "");
    let path = dir.path().join("ldapsync.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let complaints = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && complaints.trim().is_empty(), "{complaints}");
}

#[test]
fn a_password_set_through_ldapsync_reaches_openldap_over_starttls() {
    let pki = Pki::new("directory");
    let slapd = Slapd::start_with_tls(&pki);
    let dir = tempfile::tempdir().unwrap();
    let store = common::TestStore::start();
    let secret = dir.path().join("service.secret");
    std::fs::write(&secret, format!("{ROOT_PW}\n")).unwrap();
    let config = dir.path().join("ldapsync.toml");
    let write = |starttls: bool| {
        std::fs::write(
            &config,
            format!(
                "[proxy]\nupstream = [\"{}\"]\n[proxy.upstream_tls]\nstarttls = {starttls}\nca = \"{}\"\n\
                 {}[[connector]]\nname = \"example\"\nbind_dn = \"{ROOT_DN}\"\n\
                 password_file = \"{}\"\ndirection = \"ldap-to-local\"\n[connector.accounts]\n\
                 base = \"ou=people,dc=example,dc=com\"\nnaming = \"uid\"\nfilter = \"(objectClass=inetOrgPerson)\"\n",
                slapd.url(),
                pki.ca.display(),
                store.toml(dir.path()),
                secret.display()
            ),
        )
        .unwrap()
    };
    let password = |new: &str| {
        use std::io::Write;
        let mut child = ldapsync()
            .arg("--config")
            .arg(&config)
            .args(["password", "alice", "--connector", "example"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // A refusal may come before the password is read: the pipe may be closed.
        let _ = writeln!(child.stdin.take().unwrap(), "{new}");
        child.wait_with_output().unwrap()
    };
    write(false);
    let sync = ldapsync()
        .arg("--config")
        .arg(&config)
        .args(["sync", "run", "--connector", "example"])
        .output()
        .unwrap();
    assert!(sync.status.success(), "{}", String::from_utf8_lossy(&sync.stderr));
    let refused = password("alice-new-secret");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("must not cross the network in clear text"));

    write(true);
    let set = password("alice-new-secret");
    assert!(set.status.success(), "{}", String::from_utf8_lossy(&set.stderr));
    let (alice, _) = person("alice");
    let whoami = ldap_tool(
        "ldapwhoami",
        &slapd.url(),
        &["-x", "-D", &alice, "-w", "alice-new-secret"],
    );
    assert!(whoami.status.success(), "alice binds with the new password");
}

#[test]
fn sighup_reloads_the_directory_urls_for_new_sessions_and_refuses_a_broken_file() {
    let slapd = Slapd::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ldapsync.toml");
    let write = |upstream: &str, extra: &str| {
        std::fs::write(
            &config,
            format!("[proxy]\nlisten = [\"ldap://127.0.0.1:0\"]\nupstream = [\"{upstream}\"]\n{extra}"),
        )
        .unwrap()
    };
    write("ldap://127.0.0.1:9", "");
    let served = serve(&["--config", config.to_str().unwrap()]);
    let search = || {
        ldap_tool(
            "ldapsearch",
            &served.url,
            &["-x", "-s", "base", "-b", "dc=example,dc=com"],
        )
    };
    let before = search();
    // No directory: the session is closed as an unreachable directory's would be.
    assert!(
        String::from_utf8_lossy(&before.stderr).contains("Can't contact LDAP server"),
        "{before:?}"
    );

    // A broken file changes nothing.
    write(&slapd.url(), "max_connections = 0\n");
    served.signal("HUP");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(!search().status.success(), "still the old directory URL");

    write(&slapd.url(), "");
    served.signal("HUP");
    assert!(
        common::eventually(|| search().status.success()),
        "new sessions reach the new URL"
    );
    let (exit, log) = served.terminate();
    assert!(exit.success());
    assert!(log.contains("SIGHUP: config not reloaded"), "{log}");
    assert!(
        log.contains("SIGHUP: directory URLs, TLS to the directory, timeouts and limits reloaded"),
        "{log}"
    );
}

/// A directory URL a reload removes is drained: a session open on it goes
/// on there, new sessions go to the URLs that remain. Shown by freezing the
/// removed directory: a new session sent there would hang.
#[test]
fn a_directory_url_removed_by_sighup_is_drained() {
    use common::raw::{Raw, whoami};
    let (old, new) = (Slapd::start(), Slapd::start());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ldapsync.toml");
    let write = |upstream: &str| {
        std::fs::write(
            &config,
            format!(
                "[proxy]\nlisten = [\"ldap://127.0.0.1:0\"]\nupstream = [\"{upstream}\"]\nconnect_timeout = \"1s\"\n"
            ),
        )
        .unwrap()
    };
    write(&old.url());
    let served = serve(&["--config", config.to_str().unwrap()]);
    let mut open = Raw::connect(&served.url);
    open.send(&[whoami(1)]);
    assert_eq!(open.response().unwrap().result, 0, "a session on the old URL");

    write(&new.url());
    served.signal("HUP");
    old.freeze();
    let search = || {
        ldap_tool(
            "ldapsearch",
            &served.url,
            &[
                "-x",
                "-s",
                "base",
                "-b",
                "dc=example,dc=com",
                "-o",
                "nettimeout=2",
                "-l",
                "2",
            ],
        )
    };
    assert!(
        common::eventually(|| search().status.success()),
        "new sessions go to the remaining URL"
    );
    old.thaw();
    open.send(&[whoami(2)]);
    assert_eq!(
        open.response().unwrap().result,
        0,
        "the open session goes on on the old URL"
    );
    let (exit, _) = served.terminate();
    assert!(exit.success());
}

#[test]
fn a_bind_refused_by_ldapsync_itself_leaves_the_session_anonymous_not_under_the_previous_identity() {
    use common::raw::{Raw, modify, simple_bind, whoami};
    let slapd = Slapd::start();
    let (_dir, served) = common::serve_config(&format!(
        "[proxy]\nlisten = [\"ldap://127.0.0.1:0\"]\nupstream = [\"{}\"]\nmax_failed_binds = 2\n",
        slapd.url()
    ));
    let (alice, alice_pw) = person("alice");
    let (bob, bob_pw) = person("bob");

    let mut session = Raw::connect(&served.url);
    session.send(&[simple_bind(1, &alice, &alice_pw)]);
    assert_eq!(session.response().unwrap().result, 0);
    session.send(&[whoami(2)]);
    assert_eq!(
        session.response().unwrap().value,
        Some(format!("dn:{alice}").into_bytes())
    );

    // Two failed binds from this address, on another connection, reach the limit.
    let mut guesser = Raw::connect(&served.url);
    for id in 1..=2 {
        guesser.send(&[simple_bind(id, &alice, "wrong")]);
        assert_eq!(guesser.response().unwrap().result, 49, "invalidCredentials");
    }

    // Alice's session binds again: ldapsync refuses it without asking slapd.
    session.send(&[simple_bind(3, &bob, &bob_pw)]);
    let refused = session.response().unwrap();
    assert_eq!(refused.result, 53, "unwillingToPerform: {refused:?}");
    session.send(&[whoami(4)]);
    let who = session.response().unwrap();
    assert_eq!(who.result, 0, "{who:?}");
    assert!(
        who.value.unwrap_or_default().is_empty(),
        "after a failed bind the session is anonymous, as slapd makes it"
    );
    session.send(&[modify(5, 0x04, &alice, "description", "written after a refused bind")]);
    let write = session.response().unwrap();
    assert_ne!(
        write.result, 0,
        "an anonymous session cannot write alice's entry: {write:?}"
    );
    let (exit, _) = served.terminate();
    assert!(exit.success());
}

#[test]
fn check_config_runs_the_checks_serve_runs_at_start_and_serve_refuses_an_unusable_store() {
    let dir = tempfile::tempdir().unwrap();
    let one = Pki::new("one");
    let other = Pki::new("other");
    let not_pem = dir.path().join("key.txt");
    std::fs::write(&not_pem, "this is not a key\n").unwrap();
    let corrupt = dir.path().join("corrupt.db");
    std::fs::write(&corrupt, vec![0x42u8; 4096]).unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "s3cret\n").unwrap();
    let proxy = "[proxy]\nlisten = [\"ldap://127.0.0.1:0\"]\nupstream = [\"ldap://127.0.0.1:9\"]\n";
    let tls = |cert: &std::path::Path, key: &std::path::Path| {
        format!(
            "[proxy.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            cert.display(),
            key.display()
        )
    };
    let connector = |store: &std::path::Path| {
        format!(
            "[store]\npath = \"{}\"\n[[connector]]\nname = \"c\"\nbind_dn = \"{ROOT_DN}\"\npassword_file = \"{}\"\n\
             [connector.accounts]\nbase = \"ou=people,dc=example,dc=com\"\nnaming = \"uid\"\n",
            store.display(),
            secret.display()
        )
    };
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "missing key file",
            tls(&one.cert, &dir.path().join("missing.pem")),
            "missing.pem",
        ),
        ("key of another certificate", tls(&one.cert, &other.key), "proxy.tls"),
        ("key that is not PEM", tls(&one.cert, &not_pem), "key.txt"),
        (
            "bad log level",
            "[log]\nlevel = \"ldapsync=loud\"\n".into(),
            "log.level \"ldapsync=loud\" is not a log filter",
        ),
        (
            "bad metrics address",
            "[metrics]\nlisten = \"localhost\"\n".into(),
            "metrics.listen \"localhost\" is not host:port",
        ),
        ("store is a directory", connector(dir.path()), "is a directory"),
        (
            "store folder missing",
            connector(&dir.path().join("nowhere/ldapsync.db")),
            "its folder",
        ),
        ("store not a database", connector(&corrupt), "is not an SQLite database"),
    ];
    for (name, extra, needle) in &cases {
        let path = dir.path().join(format!("{}.toml", name.replace(' ', "-")));
        std::fs::write(&path, format!("{proxy}{extra}")).unwrap();
        let check = ldapsync().arg("check-config").arg(&path).output().unwrap();
        let out = String::from_utf8_lossy(&check.stdout);
        assert!(!check.status.success(), "{name}: check-config must fail:\n{out}");
        assert!(out.contains(needle), "{name}: {out:?} should mention {needle:?}");
        let serve = ldapsync().args(["serve", "--config"]).arg(&path).output().unwrap();
        let err = String::from_utf8_lossy(&serve.stderr);
        assert!(!serve.status.success(), "{name}: serve must refuse to start: {err}");
        assert!(
            err.contains(needle),
            "{name}: serve says {err:?}, should mention {needle:?}"
        );
    }
}

/// What a packager and a bug report rely on: the version names the commit
/// it was built from.
#[test]
fn the_version_names_the_commit_it_was_built_from() {
    let out = ldapsync().arg("--version").output().unwrap();
    let version = String::from_utf8(out.stdout).unwrap();
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let head = String::from_utf8(head.stdout).unwrap();
    assert!(out.status.success());
    assert_eq!(
        version.trim(),
        format!("ldapsync {} ({})", env!("CARGO_PKG_VERSION"), head.trim())
    );
}

/// Every shell's completion script is generated from the CLI definition
/// and parses in bash; it knows the subcommands and their flags.
#[test]
fn completion_scripts_are_generated_for_each_shell() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = ldapsync().args(["completions", shell]).output().unwrap();
        assert!(
            out.status.success(),
            "{shell}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let script = String::from_utf8(out.stdout).unwrap();
        for word in ["check-config", "association", "connector"] {
            assert!(script.contains(word), "the {shell} script knows {word}");
        }
    }
    let bash = ldapsync().args(["completions", "bash"]).output().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("ldapsync.bash");
    std::fs::write(&script, bash.stdout).unwrap();
    // Sourced, it registers a completion for ldapsync.
    let registered = Command::new("bash")
        .arg("-c")
        .arg(format!("source {} && complete -p ldapsync", script.display()))
        .output()
        .unwrap();
    assert!(
        registered.status.success(),
        "{}",
        String::from_utf8_lossy(&registered.stderr)
    );
    let bad = ldapsync().args(["completions", "tcsh"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2), "an unknown shell is a usage error");
}

/// One man page per command and subcommand, each rendering with man(1)
/// and saying what `--help` says.
#[test]
fn man_pages_are_written_for_every_subcommand_and_render() {
    let dir = tempfile::tempdir().unwrap();
    let out = ldapsync().arg("man-pages").arg(dir.path()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut pages: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    pages.sort();
    for page in [
        "ldapsync.1",
        "ldapsync-serve.1",
        "ldapsync-account-add.1",
        "ldapsync-store-copy.1",
    ] {
        assert!(pages.contains(&page.to_string()), "{page} among {pages:?}");
    }
    assert!(
        !pages.iter().any(|p| p.contains("help")),
        "no pages for clap's help: {pages:?}"
    );
    let serve = Command::new("man")
        .arg("-l")
        .arg(dir.path().join("ldapsync-serve.1"))
        .env("MANWIDTH", "200")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&serve.stdout);
    assert!(serve.status.success());
    assert!(
        text.contains("--upstream") && text.contains("Relay LDAP clients"),
        "{text}"
    );
}
