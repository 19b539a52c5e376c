//! TLS on both sides of the relay: real clients (ldap-utils with GnuTLS,
//! the ldap3 crate with rustls) over `ldaps://` and StartTLS
//! (RFC 4511 §4.14), slapd serving TLS upstream, certificates refused and
//! reloaded, binds refused in clear text where TLS is required, and client
//! certificates with SASL EXTERNAL through passthrough listeners.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use ldap3::{LdapConnAsync, LdapConnSettings, Scope, SearchEntry};
use ldapsync::config::{ClientTlsConfig, DirectoryLoss, LdapUrl, Listener, ListenerTls, ServerTlsConfig};
use ldapsync::proxy::message::STARTTLS_OID;
use ldapsync::tls::client_config;
use ldapsync_fixtures::{BASE_DN, Pki, Slapd, person};
use protocol_tests::{ProxyHandle, RawConn, Received, extended_request, persistent_search, response_to, result_of};
use rasn_ldap::ResultCode;

/// ldapsync in front of `upstream`, with one listener and `pki`'s certificate.
fn proxy_with_tls(upstream: &str, pki: &Pki, listener: &str, require_tls: bool) -> ProxyHandle {
    ProxyHandle::start_with(&[upstream.to_owned()], |config| {
        config.listen = vec![Listener {
            require_tls,
            ..Listener::from(listener.parse::<LdapUrl>().unwrap())
        }];
        config.tls = Some(ServerTlsConfig {
            cert: pki.cert.clone(),
            key: pki.key.clone(),
        });
        config.handshake_timeout = Duration::from_millis(500);
        config.shutdown_grace = Duration::from_millis(200);
    })
}

/// An ldap-utils command trusting `ca`, with the hostname check on.
fn ldap_util(tool: &str, ca: &Path, args: &[&str]) -> Output {
    Command::new(tool)
        .env("LDAPTLS_CACERT", ca)
        .env("LDAPTLS_REQCERT", "demand")
        .env("LDAPCONF", "/dev/null")
        .args(args)
        .output()
        .unwrap()
}

fn alice_search(url: &str, extra: &[&str], ca: &Path) -> Output {
    let (dn, pw) = person("alice");
    let mut args = vec!["-x", "-LLL", "-H", url, "-D", &dn, "-w", &pw, "-b", BASE_DN];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["(uid=alice)", "cn", "mail"]);
    ldap_util("ldapsearch", ca, &args)
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn ldapsearch_over_ldaps_and_starttls_answers_as_the_directory_does() {
    let slapd = Slapd::start();
    let pki = Pki::new("ldapsync test");
    let direct = stdout(&alice_search(&slapd.url(), &[], &pki.ca));
    assert!(direct.contains("mail: alice@example.com"), "{direct}");

    let ldaps = proxy_with_tls(&slapd.url(), &pki, "ldaps://127.0.0.1:0", false);
    assert!(ldaps.url().starts_with("ldaps://"));
    assert_eq!(stdout(&alice_search(&ldaps.url(), &[], &pki.ca)), direct, "ldaps://");

    let starttls = proxy_with_tls(&slapd.url(), &pki, "ldap://127.0.0.1:0", false);
    assert_eq!(
        stdout(&alice_search(&starttls.url(), &["-ZZ"], &pki.ca)),
        direct,
        "StartTLS (-ZZ)"
    );

    // A client that does not trust the certificate refuses the connection.
    let stranger = Pki::new("unrelated");
    let refused = alice_search(&ldaps.url(), &[], &stranger.ca);
    assert!(!refused.status.success(), "a certificate from an unknown CA is refused");
}

#[tokio::test]
async fn starttls_is_refused_under_tls_and_with_operations_outstanding() {
    let slapd = Slapd::start();
    let pki = Pki::new("ldapsync test");
    let proxy = proxy_with_tls(&slapd.url(), &pki, "ldap://127.0.0.1:0", false);

    // Under TLS already (RFC 4511 §4.14.1: operationsError).
    let trust = ClientTlsConfig {
        ca: Some(pki.ca.clone()),
        ..ClientTlsConfig::default()
    };
    let settings = LdapConnSettings::new()
        .set_config(client_config(&trust).unwrap())
        .set_starttls(true);
    let (conn, mut ldap) = LdapConnAsync::with_settings(settings, &proxy.url()).await.unwrap();
    ldap3::drive!(conn);
    let again = ldap
        .extended(ldap3::exop::Exop {
            name: Some(STARTTLS_OID.into()),
            val: None,
        })
        .await
        .unwrap();
    assert_eq!(again.1.rc, 1, "StartTLS twice: {:?}", again.1);
    // The session is still fine, and under TLS.
    let (entries, _) = ldap
        .search(BASE_DN, Scope::Subtree, "(uid=bob)", vec!["mail"])
        .await
        .unwrap()
        .success()
        .unwrap();
    assert_eq!(
        SearchEntry::construct(entries[0].clone()).attrs["mail"],
        ["bob@example.com"]
    );
    ldap.unbind().await.unwrap();

    // With a persistent search outstanding.
    let mut raw = RawConn::connect(proxy.addr()).await;
    raw.send(&persistent_search(1, BASE_DN)).await;
    raw.send(&extended_request(2, STARTTLS_OID)).await;
    let (code, why) = result_of(&response_to(&mut raw, 2).await);
    assert_eq!(code, ResultCode::OperationsError, "{why}");
    assert!(why.contains("outstanding"), "{why}");
}

#[test]
fn binds_in_clear_text_are_refused_where_tls_is_required() {
    let pki = Pki::new("ldapsync test");
    // The directory is unreachable: a refusal that never reached it says so
    // by its code (13, not 52).
    let nowhere = ProxyHandle::start_with(&["ldap://127.0.0.1:1".into()], |config| {
        config.listen = vec![Listener {
            require_tls: true,
            ..Listener::from("ldap://127.0.0.1:0".parse::<LdapUrl>().unwrap())
        }];
        config.tls = Some(ServerTlsConfig {
            cert: pki.cert.clone(),
            key: pki.key.clone(),
        });
    });
    let (dn, pw) = person("alice");
    let plain = ldap_util(
        "ldapwhoami",
        &pki.ca,
        &["-x", "-H", &nowhere.url(), "-D", &dn, "-w", &pw],
    );
    assert!(!plain.status.success());
    let err = String::from_utf8_lossy(&plain.stderr);
    assert!(err.contains("Confidentiality required (13)"), "{err}");
    assert!(err.contains("requires TLS"), "{err}");

    let slapd = Slapd::start();
    let proxy = proxy_with_tls(&slapd.url(), &pki, "ldap://127.0.0.1:0", true);
    let plain = ldap_util("ldapwhoami", &pki.ca, &["-x", "-H", &proxy.url(), "-D", &dn, "-w", &pw]);
    assert!(String::from_utf8_lossy(&plain.stderr).contains("Confidentiality required (13)"));
    let anonymous = ldap_util("ldapwhoami", &pki.ca, &["-x", "-H", &proxy.url()]);
    assert_eq!(
        stdout(&anonymous).trim(),
        "anonymous",
        "an anonymous bind carries no secret"
    );
    let secured = ldap_util(
        "ldapwhoami",
        &pki.ca,
        &["-x", "-ZZ", "-H", &proxy.url(), "-D", &dn, "-w", &pw],
    );
    assert_eq!(stdout(&secured).trim(), format!("dn:{dn}"));
}

#[test]
fn the_directory_certificate_is_verified_upstream() {
    let pki = Pki::new("directory");
    let slapd = Slapd::start_with_tls(&pki);
    let ldaps = slapd.ldaps_url().unwrap();
    let client_pki = Pki::new("ldapsync test");
    // With notices on, a refused directory certificate reaches the client
    // as the reason (by default the client sees its connection closed, as
    // failures.rs checks, and the reason is in ldapsync's log).
    let through = |upstream: &str, tls: ClientTlsConfig| {
        let proxy = ProxyHandle::start_with(&[upstream.to_owned()], |config| {
            config.upstream_tls = tls;
            config.on_directory_loss = DirectoryLoss::Notice;
        });
        alice_search(&proxy.url(), &[], &client_pki.ca)
    };
    let trusting = |ca: &Path| ClientTlsConfig {
        ca: Some(ca.to_owned()),
        ..ClientTlsConfig::default()
    };

    let direct = stdout(&alice_search(&slapd.url(), &[], &pki.ca));
    assert_eq!(stdout(&through(&ldaps, trusting(&pki.ca))), direct, "ldaps:// upstream");
    let starttls = ClientTlsConfig {
        starttls: true,
        ..trusting(&pki.ca)
    };
    assert_eq!(stdout(&through(&slapd.url(), starttls)), direct, "StartTLS upstream");

    // The wrong CA: the client gets `unavailable` and the reason.
    let wrong = Pki::new("wrong");
    let refused = through(&ldaps, trusting(&wrong.ca));
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("Server is unavailable (52)"), "{err}");
    assert!(err.contains("invalid peer certificate: UnknownIssuer"), "{err}");

    // The laboratory opt-out.
    let unverified = ClientTlsConfig {
        verify: false,
        ..trusting(&wrong.ca)
    };
    assert_eq!(stdout(&through(&ldaps, unverified)), direct, "verify = false");
}

#[tokio::test]
async fn a_reloaded_certificate_serves_new_sessions_while_open_ones_continue() {
    let slapd = Slapd::start();
    let first = Pki::new("first");
    let proxy = proxy_with_tls(&slapd.url(), &first, "ldaps://127.0.0.1:0", false);
    let connect = |ca: &Path| {
        let trust = ClientTlsConfig {
            ca: Some(ca.to_owned()),
            ..ClientTlsConfig::default()
        };
        let settings = LdapConnSettings::new().set_config(client_config(&trust).unwrap());
        let url = proxy.url();
        async move { LdapConnAsync::with_settings(settings, &url).await }
    };
    let (conn, mut open) = connect(&first.ca).await.unwrap();
    ldap3::drive!(conn);

    let second = Pki::new("second");
    std::fs::copy(&second.cert, &first.cert).unwrap();
    std::fs::copy(&second.key, &first.key).unwrap();
    proxy.reload_tls();

    assert!(
        connect(&first.ca).await.is_err(),
        "new sessions get the new certificate"
    );
    let (conn, mut fresh) = connect(&second.ca).await.unwrap();
    ldap3::drive!(conn);
    for ldap in [&mut open, &mut fresh] {
        let (entries, _) = ldap
            .search(BASE_DN, Scope::Subtree, "(uid=carol)", vec!["cn"])
            .await
            .unwrap()
            .success()
            .unwrap();
        assert_eq!(entries.len(), 1, "both the open and the new session work");
    }
}

#[tokio::test]
async fn a_silent_tls_client_is_dropped_after_the_handshake_timeout() {
    let slapd = Slapd::start();
    let pki = Pki::new("ldapsync test");
    let proxy = proxy_with_tls(&slapd.url(), &pki, "ldaps://127.0.0.1:0", false);
    let mut silent = RawConn::connect(proxy.addr()).await;
    // The handshake timeout is 500 ms; no answer comes, the socket closes.
    assert_eq!(silent.receive(Duration::from_secs(5)).await, Received::Closed);
}

/// ldapwhoami with SASL EXTERNAL, trusting `pki` and presenting `cert`'s
/// certificate; `extra` chooses StartTLS (`-ZZ`) or not.
fn whoami_external(url: &str, pki: &Pki, cert: &(std::path::PathBuf, std::path::PathBuf), extra: &[&str]) -> Output {
    let mut args = vec!["-Q", "-Y", "EXTERNAL", "-H", url];
    args.extend_from_slice(extra);
    Command::new("ldapwhoami")
        .env("LDAPTLS_CACERT", &pki.ca)
        .env("LDAPTLS_REQCERT", "demand")
        .env("LDAPTLS_CERT", &cert.0)
        .env("LDAPTLS_KEY", &cert.1)
        .env("LDAPCONF", "/dev/null")
        .args(&args)
        .output()
        .unwrap()
}

/// ldapsync in front of `upstreams` with one passthrough listener.
fn passthrough_proxy(upstreams: &[String], listener: &str) -> ProxyHandle {
    ProxyHandle::start_with(upstreams, |config| {
        config.listen = vec![Listener {
            tls: ListenerTls::Passthrough,
            ..Listener::from(listener.parse::<LdapUrl>().unwrap())
        }];
        config.shutdown_grace = Duration::from_millis(200);
    })
}

#[test]
fn sasl_external_with_a_client_certificate_works_through_a_passthrough_listener() {
    let pki = Pki::new("ldapsync test");
    let slapd = Slapd::start_with_tls(&pki);
    let ldaps = slapd.ldaps_url().unwrap();
    let alice = pki.client("alice");
    let (alice_dn, _) = person("alice");

    let direct = stdout(&whoami_external(&slapd.url(), &pki, &alice, &["-ZZ"]));
    assert_eq!(
        direct.trim(),
        format!("dn:{alice_dn}"),
        "the directory maps the certificate"
    );
    assert_eq!(stdout(&whoami_external(&ldaps, &pki, &alice, &[])), direct);

    // StartTLS goes to the directory; the handshake and the bind are the
    // client's own with it. Both kinds of URL upstream: StartTLS takes the
    // ldap:// one.
    let upstreams = [ldaps.clone(), slapd.url()];
    let starttls = passthrough_proxy(&upstreams, "ldap://127.0.0.1:0");
    assert_eq!(
        stdout(&whoami_external(&starttls.url(), &pki, &alice, &["-ZZ"])),
        direct,
        "StartTLS passed through"
    );
    // A search over it answers as the directory does, the certificate's
    // identity applied (alice may read her own entry's attributes).
    let search = |url: &str| {
        Command::new("ldapsearch")
            .env("LDAPTLS_CACERT", &pki.ca)
            .env("LDAPTLS_CERT", &alice.0)
            .env("LDAPTLS_KEY", &alice.1)
            .env("LDAPCONF", "/dev/null")
            .args([
                "-Q",
                "-LLL",
                "-ZZ",
                "-Y",
                "EXTERNAL",
                "-H",
                url,
                "-b",
                BASE_DN,
                "(uid=alice)",
                "cn",
                "mail",
                "description",
            ])
            .output()
            .unwrap()
    };
    let direct_search = stdout(&search(&slapd.url()));
    assert!(direct_search.contains("mail: alice@example.com"), "{direct_search}");
    assert_eq!(stdout(&search(&starttls.url())), direct_search);
    // Before StartTLS the session is relayed (and its writes captured) as
    // any other; after it, a write is the poller's to find, and the sink
    // hears that it cannot see it.
    let modify = |extra: &[&str], description: &str| {
        let mut child = Command::new("ldapmodify")
            .env("LDAPTLS_CACERT", &pki.ca)
            .env("LDAPTLS_CERT", &alice.0)
            .env("LDAPTLS_KEY", &alice.1)
            .env("LDAPCONF", "/dev/null")
            .args(["-H", &starttls.url()])
            .args(extra)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let ldif = format!("dn: {alice_dn}\nchangetype: modify\nreplace: description\ndescription: {description}\n");
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), ldif.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };
    let alice_pw = person("alice").1;
    stdout(&modify(&["-x", "-D", &alice_dn, "-w", &alice_pw], "in clear"));
    stdout(&modify(&["-Q", "-ZZ", "-Y", "EXTERNAL"], "end to end"));
    let captured: Vec<_> = starttls.sink.writes().into_iter().map(|(_, dn)| dn).collect();
    assert_eq!(
        captured,
        std::slice::from_ref(&alice_dn),
        "only the write in clear is captured"
    );
    assert!(
        starttls.sink.losses().contains(&ldapsync::proxy::CaptureLoss::Opaque(
            ldapsync::proxy::Opacity::EndToEndTls
        )),
        "{:?}",
        starttls.sink.losses()
    );
    let described = stdout(&search(&slapd.url()));
    assert!(described.contains("description: end to end"), "{described}");

    // ldaps:// to ldaps://, untouched from the first byte.
    let tunnel = passthrough_proxy(&upstreams, "ldaps://127.0.0.1:0");
    assert!(tunnel.url().starts_with("ldaps://"), "{}", tunnel.url());
    assert_eq!(
        stdout(&whoami_external(&tunnel.url(), &pki, &alice, &[])),
        direct,
        "ldaps passed through"
    );
    assert_eq!(
        stdout(&alice_search(&tunnel.url(), &[], &pki.ca)),
        stdout(&alice_search(&ldaps, &[], &pki.ca))
    );

    // Where ldapsync ends TLS itself, the certificate stops there: the
    // bind fails as it would on a connection without one.
    let terminated = proxy_with_tls(&slapd.url(), &pki, "ldap://127.0.0.1:0", false);
    let refused = whoami_external(&terminated.url(), &pki, &alice, &["-ZZ"]);
    assert!(!refused.status.success(), "{refused:?}");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("no mechanism available") || err.contains("Unknown authentication method"),
        "{err}"
    );
}

#[tokio::test]
async fn a_relayed_session_never_presents_ldapsyncs_own_client_certificate() {
    use ldap3::exop::{WhoAmI, WhoAmIResp};
    let pki = Pki::new("ldapsync test");
    let slapd = Slapd::start_with_tls(&pki);
    // ldapsync's certificate maps to carol: a client's SASL EXTERNAL bind
    // relayed over ldapsync's TLS must not make the client carol.
    let (cert, key) = pki.client("carol");
    for upstream in [slapd.url(), slapd.ldaps_url().unwrap()] {
        let proxy = ProxyHandle::start_with(std::slice::from_ref(&upstream), |config| {
            config.upstream_tls = ClientTlsConfig {
                ca: Some(pki.ca.clone()),
                starttls: !upstream.starts_with("ldaps"),
                client_cert: Some(cert.clone()),
                client_key: Some(key.clone()),
                ..ClientTlsConfig::default()
            };
        });
        let (conn, mut ldap) = LdapConnAsync::new(&proxy.url()).await.unwrap();
        ldap3::drive!(conn);
        let bind = ldap.sasl_external_bind().await.unwrap();
        let (whoami, _) = ldap.extended(WhoAmI).await.unwrap().success().unwrap();
        let identity = whoami.parse::<WhoAmIResp>().authzid;
        assert_ne!(bind.rc, 0, "{upstream}: the EXTERNAL bind succeeded as {identity:?}");
        assert!(!identity.contains("carol"), "{upstream}: {identity}");
        // The relay itself works over that TLS.
        let (entries, _) = ldap
            .search(BASE_DN, Scope::Subtree, "(uid=alice)", vec!["mail"])
            .await
            .unwrap()
            .success()
            .unwrap();
        assert_eq!(entries.len(), 1, "{upstream}");
        ldap.unbind().await.unwrap();
    }
}

#[tokio::test]
async fn a_silent_client_of_a_passthrough_listener_is_dropped_without_reaching_the_directory() {
    let pki = Pki::new("ldapsync test");
    let slapd = Slapd::start_with_tls(&pki);
    let proxy = ProxyHandle::start_with(&[slapd.ldaps_url().unwrap()], |config| {
        config.listen = vec![Listener {
            tls: ListenerTls::Passthrough,
            ..Listener::from("ldaps://127.0.0.1:0".parse::<LdapUrl>().unwrap())
        }];
        config.handshake_timeout = Duration::from_millis(500);
    });
    let mut silent = RawConn::connect(proxy.addr()).await;
    assert_eq!(silent.receive(Duration::from_secs(5)).await, Received::Closed);
    let url = slapd.ldaps_url().unwrap().parse::<LdapUrl>().unwrap().to_string();
    let sessions = ldapsync::metrics::METRICS
        .upstream_sessions_started
        .get_or_create(&ldapsync::metrics::UrlLabel { url })
        .get();
    assert_eq!(sessions, 0, "no directory connection for a client that said nothing");
}

#[test]
fn a_passthrough_starttls_the_directory_refuses_answers_as_the_directory_does() {
    // No TLS on this directory: its refusal reaches the client as is.
    let slapd = Slapd::start();
    let pki = Pki::new("ldapsync test");
    let proxy = passthrough_proxy(&[slapd.url()], "ldap://127.0.0.1:0");
    let refused = |url: &str| {
        let out = ldap_util("ldapwhoami", &pki.ca, &["-x", "-ZZ", "-H", url]);
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let direct = refused(&slapd.url());
    assert_ne!(direct.0, Some(0), "{direct:?}");
    assert_eq!(refused(&proxy.url()), direct);
    // -Z (try): the session goes on in clear text, relayed and answered.
    let tried = ldap_util("ldapwhoami", &pki.ca, &["-x", "-Z", "-H", &proxy.url()]);
    assert_eq!(stdout(&tried).trim(), "anonymous");
}

#[tokio::test]
async fn a_request_pipelined_behind_a_passthrough_starttls_ends_the_session() {
    let pki = Pki::new("ldapsync test");
    let slapd = Slapd::start_with_tls(&pki);
    let proxy = passthrough_proxy(&[slapd.url()], "ldap://127.0.0.1:0");
    let mut conn = RawConn::connect(proxy.addr()).await;
    // StartTLS and a search in one write: the search would reach the
    // directory's TLS as garbage.
    let mut both = extended_request(1, STARTTLS_OID);
    both.extend_from_slice(&protocol_tests::root_dse_search(2));
    conn.send(&both).await;
    let notice = protocol_tests::expect_notice_of_disconnection(&mut conn, ResultCode::ProtocolError).await;
    assert!(notice.contains("after StartTLS"), "{notice}");
    assert_eq!(conn.receive(Duration::from_secs(5)).await, Received::Closed);
}
