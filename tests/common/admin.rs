//! ldapsync with the admin server on, over the fixture directory, and an
//! HTTP client that keeps headers: for the API, change feed and console
//! tests.

use std::io::{Read, Write};

use ldapsync_fixtures::{ROOT_DN, ROOT_PW, Slapd, person};
use serde_json::{Value, json};

use super::{Served, TestStore, serve};

/// ldapsync with a connector over the fixture directory and the admin
/// server on: `cn=admins` (alice) administers, `cn=staff` (alice, bob,
/// carol) audits; dave is in neither.
pub struct Api {
    pub slapd: Slapd,
    pub dir: tempfile::TempDir,
    _store: TestStore,
    pub served: Served,
    pub addr: String,
    pub config: std::path::PathBuf,
}

/// An HTTP answer: status, headers (names lowercased), body.
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// One request on a connection of its own; `headers` as given.
pub fn request(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&str>) -> Reply {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = body {
        if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("content-type")) {
            head.push_str("Content-Type: application/json\r\n");
        }
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    if let Some(body) = body {
        let _ = stream.write_all(body.as_bytes());
    }
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_lowercase(), v.trim().to_owned()))
        .collect();
    Reply {
        status,
        headers,
        body: body.to_owned(),
    }
}

impl Api {
    pub fn start() -> Api {
        Api::start_with("", "")
    }

    /// With `admin` lines added to the `[admin]` table and `extra` tables
    /// (webhooks) after the connector.
    pub fn start_with(admin: &str, extra: &str) -> Api {
        let slapd = Slapd::start();
        let dir = tempfile::tempdir().unwrap();
        let store = TestStore::start();
        let secret = dir.path().join("service.secret");
        std::fs::write(&secret, format!("{ROOT_PW}\n")).unwrap();
        let toml = format!(
            r#"
[proxy]
listen = ["ldap://127.0.0.1:0"]
upstream = ["{url}"]
{store}
[admin]
listen = "127.0.0.1:0"
admin_group = "cn=admins,ou=groups,dc=example,dc=com"
auditor_group = "cn=staff,ou=groups,dc=example,dc=com"
max_failed_logins = 5
{admin}
[[connector]]
name = "example"
bind_dn = "{ROOT_DN}"
password_file = "{secret}"
direction = "both"
poll_interval = "1h"
[connector.accounts]
base = "ou=people,dc=example,dc=com"
filter = "(objectClass=inetOrgPerson)"
naming = "uid"
map = {{ mail = "mail", cn = "display_name" }}
object_classes = ["inetOrgPerson"]
defaults = {{ sn = "{{name}}" }}
{extra}
"#,
            url = slapd.url(),
            store = store.toml(dir.path()),
            secret = secret.display(),
        );
        let config = dir.path().join("ldapsync.toml");
        std::fs::write(&config, toml).unwrap();
        let (served, addr) = Api::serve(&config);
        Api {
            slapd,
            dir,
            _store: store,
            served,
            addr,
            config,
        }
    }

    fn serve(config: &std::path::Path) -> (Served, String) {
        let served = serve(&["--config", config.to_str().unwrap()]);
        let addr = served
            .startup
            .iter()
            .find(|l| l.contains("admin API and console listening"))
            .and_then(|l| l.split("addr=").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .expect("the admin server is announced")
            .to_owned();
        (served, addr)
    }

    /// Stops ldapsync and starts it again on the same store.
    pub fn restart(&mut self) {
        let (served, addr) = Api::serve(&self.config);
        let old = std::mem::replace(&mut self.served, served);
        let (exit, _) = old.terminate();
        assert!(exit.success());
        self.addr = addr;
    }

    /// A JSON call with a bearer token: (status, body); a problem document
    /// for every error.
    pub fn call(&self, method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> (u16, Value) {
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
        let reply = request(&self.addr, method, path, &headers, body);
        if reply.status >= 400 {
            assert_eq!(
                reply.header("content-type"),
                Some("application/problem+json"),
                "{method} {path}: {}",
                reply.body
            );
        }
        let value = match reply.body.is_empty() {
            true => Value::Null,
            false => {
                serde_json::from_str(&reply.body).unwrap_or_else(|e| panic!("{method} {path}: {e}: {}", reply.body))
            }
        };
        if reply.status >= 400 {
            assert_eq!(value["status"], reply.status, "{value}");
            assert!(value["code"].is_string() && value["detail"].is_string(), "{value}");
        }
        (reply.status, value)
    }

    pub fn login(&self, uid: &str, password: &str) -> (u16, Value) {
        let body = json!({ "username": uid, "password": password }).to_string();
        self.call("POST", "/api/v1/login", None, Some(&body))
    }

    /// A token of `uid`, logged in with the fixture password.
    pub fn token(&self, uid: &str) -> String {
        let (status, body) = self.login(uid, &person(uid).1);
        assert_eq!(status, 200, "{body}");
        body["token"].as_str().unwrap().to_owned()
    }

    /// `ldapsync ARGS --config …`: its standard output, having succeeded.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = super::ldapsync()
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "ldapsync {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// A change made in the directory directly, as its administrator.
    pub fn ldapmodify(&self, dn: &str, ldif: &str) {
        ldapsync_fixtures::ldapmodify(&self.slapd.url(), ROOT_DN, ROOT_PW, &format!("dn: {dn}\n{ldif}"));
    }

    /// A full pass now, through the API: its outcome.
    pub fn sync(&self, token: &str, dry_run: bool) -> Value {
        let body = json!({ "dry_run": dry_run }).to_string();
        let (status, outcome) = self.call("POST", "/api/v1/connectors/example/sync", Some(token), Some(&body));
        assert_eq!(status, 200, "{outcome}");
        outcome
    }
}
