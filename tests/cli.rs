//! The `ldapsync` binary as an operator runs it: from flags and a config
//! file, stopped by SIGTERM, refusing bad configuration with a precise
//! message, and never printing a credential even at trace level.

mod common;

use std::process::{Command, Stdio};

use common::{ldapsync, serve};
use ldapsync_fixtures::{ROOT_DN, ROOT_PW, Slapd, person};

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
            Some("[proxy]\nupstream = [\"ldaps://127.0.0.1:636\"]\n"),
            &[],
            "ldaps",
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
