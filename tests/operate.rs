//! Operating ldapsync: the metrics endpoint after real traffic, health and
//! readiness as the directory dies and comes back, JSON logs.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{eventually, serve};
use ldapsync_fixtures::{ROOT_DN, ROOT_PW, Slapd, person};

/// A plain HTTP/1.1 GET: (status code, body).
fn http_get(addr: &str, path: &str) -> (u16, String) {
    let (status, _, body) = common::http(addr, "GET", path, None, None);
    (status, body)
}

/// The value of one sample line of the exposition, e.g.
/// `ldapsync_operations_total{op="search",result="0"}`.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
}

/// ldapsync relaying to `upstream`, with its metrics listener: (the
/// instance, the listener's address).
fn serve_with_metrics(upstream: &str) -> (common::Served, String) {
    let served = serve(&[
        "--listen",
        "ldap://127.0.0.1:0",
        "--upstream",
        upstream,
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let metrics = metrics_addr(&served.startup);
    (served, metrics)
}

fn metrics_addr(startup: &[String]) -> String {
    startup
        .iter()
        .find_map(|l| l.split("metrics=").nth(1))
        .map(|rest| rest.split_whitespace().next().unwrap().to_owned())
        .expect("the metrics listener is announced")
}

#[test]
fn metrics_count_real_traffic_and_readiness_follows_the_directory() {
    let mut slapd = Slapd::start();
    let (served, metrics) = serve_with_metrics(&slapd.url());
    assert_eq!(http_get(&metrics, "/healthz").0, 200);
    let ready = http_get(&metrics, "/readyz");
    assert_eq!(ready.0, 200, "{ready:?}");

    let ldap = |tool: &str, args: &[&str]| {
        Command::new(tool)
            .arg("-H")
            .arg(&served.url)
            .args(args)
            .output()
            .unwrap()
    };
    for _ in 0..3 {
        let out = ldap(
            "ldapsearch",
            &["-x", "-LLL", "-b", "dc=example,dc=com", "(uid=alice)", "mail"],
        );
        assert!(out.status.success());
    }
    let (alice, _) = person("alice");
    assert!(
        !ldap("ldapwhoami", &["-x", "-D", &alice, "-w", "wrong"])
            .status
            .success()
    );
    let mut modify = Command::new("ldapmodify")
        .args(["-x", "-H", &served.url, "-D", ROOT_DN, "-w", ROOT_PW])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    modify
        .stdin
        .take()
        .unwrap()
        .write_all(b"dn: uid=bob,ou=people,dc=example,dc=com\nchangetype: modify\nreplace: mail\nmail: b@example.com\n")
        .unwrap();
    assert!(modify.wait().unwrap().success());

    let (status, text) = http_get(&metrics, "/metrics");
    assert_eq!(status, 200);
    let count = |series: &str| sample(&text, series).unwrap_or_else(|| panic!("{series} missing:\n{text}"));
    assert_eq!(count(r#"ldapsync_operations_total{op="search",result="0"}"#), 3.0);
    assert_eq!(count(r#"ldapsync_operations_total{op="bind",result="49"}"#), 1.0);
    assert_eq!(count(r#"ldapsync_operations_total{op="modify",result="0"}"#), 1.0);
    assert_eq!(count(r#"ldapsync_operation_duration_seconds_count{op="search"}"#), 3.0);
    assert_eq!(count("ldapsync_sessions_total"), 5.0, "3 searches, a whoami, a modify");
    assert!(count(r#"ldapsync_bytes_total{direction="to_client"}"#) > 0.0);
    let url = slapd.url().parse::<ldapsync::config::LdapUrl>().unwrap().to_string();
    assert_eq!(count(&format!(r#"ldapsync_upstream_up{{url="{url}"}}"#)), 1.0);

    // Readiness follows the directory; health does not.
    slapd.kill();
    let (status, body) = http_get(&metrics, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no directory reachable"), "{body}");
    assert_eq!(http_get(&metrics, "/healthz").0, 200);
    slapd.restart();
    assert!(eventually(|| http_get(&metrics, "/readyz").0 == 200), "ready again");

    let (exit, _) = served.terminate();
    assert!(exit.success());
}

#[test]
fn json_logs_carry_the_session_on_every_line_about_it() {
    let slapd = Slapd::start();
    let served = serve(&[
        "--listen",
        "ldap://127.0.0.1:0",
        "--upstream",
        &slapd.url(),
        "--log-format",
        "json",
        "--log-level",
        "debug",
    ]);
    let out = Command::new("ldapsearch")
        .args(["-x", "-H", &served.url, "-b", "dc=example,dc=com", "-s", "base"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let (exit, log) = served.terminate();
    assert!(exit.success());
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let done: Vec<_> = lines
        .iter()
        .filter(|l| l["fields"]["message"] == "operation done")
        .collect();
    assert!(!done.is_empty(), "{log}");
    for line in done {
        assert!(line["span"]["id"].is_u64(), "the session id: {line}");
        assert!(line["span"]["peer"].is_string(), "{line}");
    }
}

#[test]
fn status_shows_the_running_instance_and_its_connectors_as_text_and_json() {
    let slapd = Slapd::start();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("service.secret");
    std::fs::write(&secret, format!("{ROOT_PW}\n")).unwrap();
    let config = dir.path().join("ldapsync.toml");
    std::fs::write(
        &config,
        format!(
            "[proxy]\nlisten = [\"ldap://127.0.0.1:0\"]\nupstream = [\"{}\"]\n[store]\npath = \"{}\"\n\
             [[connector]]\nname = \"example\"\nbind_dn = \"{ROOT_DN}\"\npassword_file = \"{}\"\n\
             [connector.accounts]\nbase = \"ou=people,dc=example,dc=com\"\nnaming = \"uid\"\n\
             filter = \"(objectClass=inetOrgPerson)\"\n",
            slapd.url(),
            dir.path().join("ldapsync.db").display(),
            secret.display()
        ),
    )
    .unwrap();
    let status_code = |args: &[&str]| {
        let out = common::ldapsync()
            .arg("--config")
            .arg(&config)
            .arg("status")
            .args(args)
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let status = |args: &[&str]| status_code(args).1;
    let (code, text) = status_code(&[]);
    assert!(text.contains("ldapsync is not running"), "{text}");
    assert_eq!(code, Some(4), "not running: exit 4");
    assert_eq!(
        status_code(&["--quiet"]),
        (Some(4), String::new()),
        "a health check prints nothing"
    );

    let served = serve(&["--config", config.to_str().unwrap()]);
    assert!(
        eventually(|| status(&[]).contains("last poll: 2")),
        "the first poll ran"
    );
    let text = status(&[]);
    assert!(text.contains("ldapsync running (pid "), "{text}");
    assert!(
        text.contains(&format!("directory {}: reachable, up, 0 sessions", slapd.url())),
        "{text}"
    );
    assert!(text.contains("accounts: mechanism syncrepl, watermark rid="), "{text}");
    let json: serde_json::Value = serde_json::from_str(&status(&["--json"])).unwrap();
    assert_eq!(json["running"]["listeners"][0]["url"], "ldap://127.0.0.1:0");
    assert_eq!(
        json["running"]["listeners"][0]["addr"],
        served.url.trim_start_matches("ldap://")
    );
    assert_eq!(json["running"]["upstream"][0]["up"], true, "new sessions use it");
    assert_eq!(json["running"]["upstream"][0]["sessions"], 0);
    assert_eq!(json["connectors"][0]["name"], "example");
    assert_eq!(json["connectors"][0]["associated"], 6);
    assert_eq!(json["connectors"][0]["watermarks"][0]["mechanism"], "syncrepl");
    assert_eq!(json["connectors"][0]["health"], "ok");
    assert_eq!(
        status_code(&["--quiet"]),
        (Some(0), String::new()),
        "running and healthy"
    );

    let socket = dir.path().join("ldapsync.sock");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777, 0o600);
    let (exit, _) = served.terminate();
    assert!(exit.success());
    assert!(!socket.exists(), "the socket goes with the process");
}

#[test]
fn sigterm_stops_ldapsync_after_its_stderr_reader_is_gone() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let slapd = Slapd::start();
    // As with `make run 2>&1 | tee log` and Ctrl-C: the reader of stderr dies.
    let mut child = common::ldapsync()
        .args([
            "serve",
            "--listen",
            "ldap://127.0.0.1:0",
            "--upstream",
            &slapd.url(),
            "--log-level",
            "debug",
        ])
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let addr = loop {
        let mut line = String::new();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "ldapsync ended before listening"
        );
        if let Some((_, addr)) = common::listening(&line) {
            break addr;
        }
    };
    drop(stderr);
    // Every operation now logs into a pipe nobody reads.
    let search = Command::new("ldapsearch")
        .args([
            "-x",
            "-H",
            &format!("ldap://{addr}"),
            "-s",
            "base",
            "-b",
            "",
            "objectClass",
        ])
        .output()
        .unwrap();
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let stopped = eventually(|| child.try_wait().unwrap().is_some());
    if !stopped {
        // It would hold the test's output open forever.
        let _ = child.kill();
    }
    assert!(search.status.success(), "the relay went on: {search:?}");
    assert!(stopped, "ldapsync stops within 20 s of SIGTERM");
    assert!(child.wait().unwrap().success());
}

#[test]
fn a_frozen_directory_makes_ldapsync_not_ready_within_the_connect_timeout() {
    let slapd = Slapd::start();
    let (_dir, served) = common::serve_config(&format!(
        "[proxy]\nlisten = [\"ldap://127.0.0.1:0\"]\nupstream = [\"{}\"]\nconnect_timeout = \"500ms\"\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n",
        slapd.url()
    ));
    let metrics = metrics_addr(&served.startup);
    assert_eq!(http_get(&metrics, "/readyz").0, 200);
    // Its port still accepts connections; nothing answers on them.
    slapd.freeze();
    let (status, body) = http_get(&metrics, "/readyz");
    slapd.thaw();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no answer to a root DSE read within 500ms"), "{body}");
    assert!(eventually(|| http_get(&metrics, "/readyz").0 == 200), "ready again");
    let (exit, _) = served.terminate();
    assert!(exit.success());
}

/// A directory that answers a paged search with a malformed paged-results
/// control: slapd behind a relay that turns the control value's SEQUENCE
/// into an OCTET STRING. Everything else passes unchanged.
struct MangledPaging {
    url: String,
}

impl MangledPaging {
    const PAGED_RESULTS: &[u8] = b"1.2.840.113556.1.4.319";

    fn start(directory: &str) -> MangledPaging {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("ldap://{}", listener.local_addr().unwrap());
        let directory = directory.trim_start_matches("ldap://").to_owned();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(&directory) else {
                    return;
                };
                let (mut up_from, mut up_to) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut up_from, &mut up_to);
                    let _ = up_to.shutdown(std::net::Shutdown::Write);
                });
                std::thread::spawn(move || Self::answers(server, client));
            }
        });
        MangledPaging { url }
    }

    /// Relays the directory's PDUs one by one, mangling paged-results
    /// controls.
    fn answers(mut from: TcpStream, mut to: TcpStream) {
        loop {
            let mut header = [0u8; 2];
            if from.read_exact(&mut header).is_err() {
                return;
            }
            let mut pdu = header.to_vec();
            let length = if header[1] & 0x80 == 0 {
                usize::from(header[1])
            } else {
                let mut bytes = vec![0u8; usize::from(header[1] & 0x7f)];
                from.read_exact(&mut bytes).unwrap();
                pdu.extend(&bytes);
                bytes.iter().fold(0, |n, b| n << 8 | usize::from(*b))
            };
            let start = pdu.len();
            pdu.resize(start + length, 0);
            if from.read_exact(&mut pdu[start..]).is_err() {
                return;
            }
            if let Some(at) = pdu
                .windows(Self::PAGED_RESULTS.len())
                .position(|w| w == Self::PAGED_RESULTS)
            {
                // controlValue: OCTET STRING { SEQUENCE { size, cookie } }.
                let rest = at + Self::PAGED_RESULTS.len();
                if let Some(value) = (rest..pdu.len() - 2).find(|&i| pdu[i] == 0x04 && pdu[i + 2] == 0x30) {
                    pdu[value + 2] = 0x04;
                }
            }
            if to.write_all(&pdu).is_err() {
                return;
            }
        }
    }
}

/// The ldap3 crate panics on a malformed paged-results control. A worker
/// that panics is restarted, counted, and its connector shown out of sync
/// in `status` and `/readyz`, while the relay serves on.
#[test]
fn a_worker_that_panics_is_restarted_and_its_connector_shown_out_of_sync() {
    let slapd = Slapd::start();
    let mangled = MangledPaging::start(&slapd.url());
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("service.secret");
    std::fs::write(&secret, format!("{ROOT_PW}\n")).unwrap();
    let (config_dir, served) = common::serve_config(&format!(
        "[proxy]\nlisten = [\"ldap://127.0.0.1:0\"]\nupstream = [\"{}\"]\n[metrics]\nlisten = \"127.0.0.1:0\"\n\
         [store]\npath = \"{}\"\n\
         [[connector]]\nname = \"example\"\nupstream = [\"{}\"]\nbind_dn = \"{ROOT_DN}\"\npassword_file = \"{}\"\n\
         poll_mechanism = \"full\"\n\
         [connector.accounts]\nbase = \"ou=people,dc=example,dc=com\"\nnaming = \"uid\"\n\
         filter = \"(objectClass=inetOrgPerson)\"\n",
        slapd.url(),
        dir.path().join("ldapsync.db").display(),
        mangled.url,
        secret.display()
    ));
    let metrics = metrics_addr(&served.startup);
    let restarts = || {
        sample(
            &http_get(&metrics, "/metrics").1,
            "ldapsync_worker_restarts_total{connector=\"example\"}",
        )
    };
    assert!(
        common::eventually_within(Duration::from_secs(30), || restarts() >= Some(2.0)),
        "the worker fails, is restarted after 5 s, and fails again: {:?}",
        restarts()
    );
    let (status, body) = http_get(&metrics, "/readyz");
    assert_eq!(status, 200, "the relay does not need the connector: {body}");
    assert!(body.contains("connector example degraded: out of sync"), "{body}");

    let config = config_dir.path().join("ldapsync.toml");
    let out = common::ldapsync()
        .arg("--config")
        .arg(&config)
        .args(["status", "--json"])
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let reason = json["connectors"][0]["out_of_sync"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        reason.contains("its worker failed") && reason.contains("panicked"),
        "{json}"
    );
    assert_ne!(out.status.code(), Some(0), "status says the connector needs attention");

    // Clients are still served, through the healthy path.
    let whoami = Command::new("ldapwhoami")
        .args(["-x", "-H", &served.url, "-D", ROOT_DN, "-w", ROOT_PW])
        .output()
        .unwrap();
    assert!(whoami.status.success(), "{}", String::from_utf8_lossy(&whoami.stderr));
    let (exit, _) = served.terminate();
    assert!(exit.success());
}

#[test]
fn a_dead_directory_is_logged_once_per_interval_not_once_per_session() {
    let served = serve(&["--listen", "ldap://127.0.0.1:0", "--upstream", "ldap://127.0.0.1:1"]);
    for _ in 0..40 {
        let out = std::process::Command::new("ldapwhoami")
            .args(["-x", "-H", &served.url])
            .output()
            .unwrap();
        assert!(!out.status.success(), "no directory, no answer");
    }
    let (exit, log) = served.terminate();
    assert!(exit.success());
    let warnings = log
        .lines()
        .filter(|l| l.contains("no directory connection") || l.contains("request refused: directory unavailable"))
        .count();
    // 40 sessions in well under the 10 s interval: one line, two if the
    // run straddles an interval on a slow machine.
    assert!((1..=2).contains(&warnings), "{warnings} warnings:\n{log}");
    assert!(!log.contains("session closed"), "no line per session at info:\n{log}");
}

#[test]
fn running_out_of_descriptors_is_logged_once_per_interval_and_passes() {
    let slapd = Slapd::start();
    let (served, metrics) = serve_with_metrics(&slapd.url());
    let pid = served.pid().to_string();
    // A few descriptors above what it holds now: its accepts fail with
    // EMFILE once a handful of clients are connected.
    let open = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    let limit = format!("--nofile={0}:{0}", open + 8);
    let status = Command::new("prlimit").args(["--pid", &pid, &limit]).status().unwrap();
    assert!(status.success(), "prlimit {limit}");
    let addr = served.url.trim_start_matches("ldap://").to_owned();
    let held: Vec<TcpStream> = (0..40).map(|_| TcpStream::connect(&addr).unwrap()).collect();
    assert!(
        served.wait_for("accept failed", Duration::from_secs(10)).is_some(),
        "out of descriptors, the accept fails and says so"
    );
    let first_said = Instant::now();
    // It retries every 100 ms: twenty failed accepts in these 2 s.
    std::thread::sleep(Duration::from_secs(2));
    drop(held);
    let answered = || {
        common::ldapsearch(&served.url, &["-b", "", "-s", "base", "objectClass=*"])
            .status
            .success()
    };
    assert!(eventually(answered), "with descriptors free again, clients are served");
    let failures = sample(&http_get(&metrics, "/metrics").1, "ldapsync_accept_failures_total").unwrap();
    assert!(failures >= 2.0, "each failed accept is counted: {failures}");
    let (exit, log) = served.terminate();
    assert!(exit.success());
    let repeated = log.lines().filter(|l| l.contains("accept failed")).count();
    // None in the ~2 s this takes; one per 10 s should a slow machine
    // stretch it.
    let allowed = ((first_said.elapsed().as_secs() + 1) / 10) as usize;
    assert!(repeated <= allowed, "said once per 10 s, not at every retry:\n{log}");
}
