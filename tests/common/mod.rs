//! Helpers shared by the binary's integration tests.

// Each test crate includes this module and uses a part of it.
#![allow(dead_code)]

pub mod admin;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The store an integration test's ldapsync runs on: SQLite in the test
/// directory, or with `LDAPSYNC_TEST_STORE=postgresql` (the second run of
/// `make test`) a throw-away PostgreSQL cluster, so that both backends
/// pass the same sync, capture and CLI tests.
pub enum TestStore {
    Sqlite,
    Postgres(ldapsync_fixtures::Postgres),
}

impl TestStore {
    /// This run's store is PostgreSQL (`make test`'s second run).
    pub fn is_postgres() -> bool {
        std::env::var("LDAPSYNC_TEST_STORE").as_deref() == Ok("postgresql")
    }

    pub fn start() -> TestStore {
        match std::env::var("LDAPSYNC_TEST_STORE").as_deref() {
            Ok("postgresql") => TestStore::Postgres(ldapsync_fixtures::Postgres::start()),
            Ok(other) if !other.is_empty() && other != "sqlite" => {
                panic!("LDAPSYNC_TEST_STORE={other}: say sqlite or postgresql")
            }
            _ => TestStore::Sqlite,
        }
    }

    /// The `[store]` table for a config in `dir`.
    pub fn toml(&self, dir: &std::path::Path) -> String {
        match self {
            TestStore::Sqlite => format!("[store]\npath = \"{}\"\n", dir.join("ldapsync.db").display()),
            TestStore::Postgres(pg) => format!(
                "[store]\nurl = \"{}\"\nadmin_socket = \"{}\"\n",
                pg.url(),
                dir.join("ldapsync.sock").display()
            ),
        }
    }
}

pub fn ldapsync() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ldapsync"))
}

/// A running `ldapsync serve`, with its stderr collected.
pub struct Served {
    child: Option<Child>,
    pub url: String,
    /// What ldapsync logged before its LDAP listener was up.
    pub startup: Vec<String>,
    log: mpsc::Receiver<String>,
}

impl Drop for Served {
    /// A failing test must not leave ldapsync running.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn serve(args: &[&str]) -> Served {
    let mut child = ldapsync()
        .arg("serve")
        .args(args)
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting ldapsync");
    let (tx, log) = mpsc::channel();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut served = Served {
        child: Some(child),
        url: String::new(),
        startup: Vec::new(),
        log,
    };
    loop {
        let line = served
            .log
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("ldapsync did not report listening; output: {:#?}", served.startup));
        if let Some((url, addr)) = listening(&line) {
            let scheme = if url.starts_with("ldaps://") { "ldaps" } else { "ldap" };
            served.url = format!("{scheme}://{addr}");
            return served;
        }
        served.startup.push(line);
    }
}

/// (configured URL, bound address) from a "listening" log line, in text
/// or JSON format.
pub fn listening(line: &str) -> Option<(String, String)> {
    if let Ok(json) = serde_json::from_str::<serde_json::Value>(line) {
        let fields = &json["fields"];
        return (fields["message"] == "listening").then(|| {
            (
                fields["url"].as_str().unwrap_or_default().to_owned(),
                fields["addr"].as_str().unwrap_or_default().to_owned(),
            )
        });
    }
    let field = |name: &str| {
        line.split(&format!("{name}="))
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_owned)
    };
    line.contains("listening")
        .then(|| Some((field("url")?, field("addr")?)))?
}

impl Served {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL: a crash, with no chance to finish anything.
    pub fn kill(mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// Sends a signal by name, e.g. "HUP".
    pub fn signal(&self, name: &str) {
        let child = self.child.as_ref().expect("running");
        let status = Command::new("kill")
            .args([&format!("-{name}"), &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name}");
    }

    /// The first line logged from now on that contains `needle`, within
    /// `limit`.
    pub fn wait_for(&self, needle: &str, limit: Duration) -> Option<String> {
        let deadline = Instant::now() + limit;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.log.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Some(line),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    }

    /// SIGTERM, then the exit status and everything logged.
    pub fn terminate(mut self) -> (std::process::ExitStatus, String) {
        let mut child = self.child.take().unwrap();
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        let exit = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("ldapsync did not stop within 20 s of SIGTERM")
            .unwrap();
        // Everything up to the end of its stderr: the lines logged last
        // (the shutdown's) may still be in the pipe when it has exited.
        let mut log = Vec::new();
        while let Ok(line) = self.log.recv_timeout(Duration::from_secs(5)) {
            log.push(line);
        }
        (exit, log.join("\n"))
    }
}

/// `ldapsync serve` with `toml` as its config file (in the returned
/// folder, which must outlive it).
pub fn serve_config(toml: &str) -> (tempfile::TempDir, Served) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ldapsync.toml");
    std::fs::write(&config, toml).unwrap();
    let served = serve(&["--config", config.to_str().unwrap()]);
    (dir, served)
}

/// `ldapsearch -x -LLL`, lines unwrapped, without the user's ldap.conf.
pub fn ldapsearch(url: &str, args: &[&str]) -> std::process::Output {
    Command::new("ldapsearch")
        .env("LDAPCONF", "/dev/null")
        .args(["-x", "-LLL", "-o", "ldif-wrap=no", "-H", url])
        .args(args)
        .output()
        .unwrap()
}

/// A client's output without what differs between two runs of the same
/// search (control values carrying cookies, comments).
pub fn without_cookies(text: &[u8]) -> String {
    String::from_utf8_lossy(text)
        .lines()
        .filter(|l| !l.starts_with("control:") && !l.starts_with("# "))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A plain HTTP/1.1 request with an optional bearer token and JSON body:
/// (status code, content type, body).
pub fn http(addr: &str, method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .write_all(http_head(addr, method, path, token, body).as_bytes())
        .unwrap();
    if let Some(body) = body {
        // A server may answer (413) and close before reading it all.
        let _ = stream.write_all(body.as_bytes());
    }
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    http_response(&response)
}

/// A request's head, for a connection that closes after the response.
pub fn http_head(host: &str, method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> String {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    if let Some(token) = token {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    if let Some(body) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    head
}

/// (status code, content type, body) of a whole response; status 0 when
/// there was none.
pub fn http_response(raw: &[u8]) -> (u16, String, String) {
    let response = String::from_utf8_lossy(raw);
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let content_type = head
        .lines()
        .find_map(|l| l.to_lowercase().strip_prefix("content-type: ").map(str::to_owned))
        .unwrap_or_default();
    (status, content_type, body.to_owned())
}

/// One connector's configuration in a folder of its own, driven through
/// the CLI as an operator would.
pub struct CliConnector {
    pub dir: tempfile::TempDir,
    pub name: String,
}

/// A connector of a directory preset (`active-directory`, `389ds`) as the
/// directory tests run it: bound as `bind_dn`, the directory's values
/// winning conflicts, deletes disabling, no percentage guard.
pub struct PresetConnector<'a> {
    pub name: &'a str,
    pub preset: &'a str,
    pub url: &'a str,
    pub bind_dn: &'a str,
    pub password: &'a str,
    pub accounts: &'a str,
    pub groups: &'a str,
    pub direction: &'a str,
}

impl PresetConnector<'_> {
    /// Its configuration, secret and store in a folder of their own.
    pub fn create(&self) -> CliConnector {
        CliConnector::new(self.name, |dir| {
            let secret = dir.join("service.secret");
            std::fs::write(&secret, format!("{}\n", self.password)).unwrap();
            format!(
                r#"
[proxy]
listen = ["ldap://127.0.0.1:0"]
upstream = ["{url}"]
[store]
path = "{db}"
[[connector]]
name = "{name}"
preset = "{preset}"
bind_dn = "{bind_dn}"
password_file = "{secret}"
direction = "{direction}"
conflict = "ldap-wins"
delete = "disable"
max_delete_percent = 100
[connector.accounts]
base = "{accounts}"
[connector.groups]
base = "{groups}"
"#,
                url = self.url,
                db = dir.join("ldapsync.db").display(),
                name = self.name,
                preset = self.preset,
                bind_dn = self.bind_dn,
                secret = secret.display(),
                direction = self.direction,
                accounts = self.accounts,
                groups = self.groups,
            )
        })
    }
}

impl CliConnector {
    /// `ldapsync.toml` as `toml` writes it for the folder (where its store
    /// and secrets go), its connector called `name`.
    pub fn new(name: &str, toml: impl FnOnce(&std::path::Path) -> String) -> CliConnector {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ldapsync.toml"), toml(dir.path())).unwrap();
        CliConnector { dir, name: name.into() }
    }

    pub fn config(&self) -> std::path::PathBuf {
        self.dir.path().join("ldapsync.toml")
    }

    /// A command with this configuration.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = ldapsync();
        command.arg("--config").arg(self.config()).args(args);
        command
    }

    /// stdout of a command that must succeed.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.command(args).output().unwrap();
        assert!(
            out.status.success(),
            "ldapsync {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `status`, whatever its exit code says of the instance's health.
    pub fn status(&self) -> String {
        String::from_utf8_lossy(&self.command(&["status"]).output().unwrap().stdout).into_owned()
    }

    /// One sync pass of this connector: its report.
    pub fn sync(&self) -> String {
        self.ok(&["sync", "run", "--connector", &self.name])
    }

    /// Puts `line` into the file right after `after` (a line of it).
    pub fn with(self, after: &str, line: &str) -> CliConnector {
        let config = std::fs::read_to_string(self.config()).unwrap();
        assert!(config.contains(after), "{after:?} is not in the configuration");
        std::fs::write(self.config(), config.replacen(after, &format!("{after}\n{line}"), 1)).unwrap();
        self
    }
}

/// Waits for `condition` to hold, for at most 20 s; false if it never did.
/// A correctness check with a generous deadline, not a speed assertion.
pub fn eventually(condition: impl FnMut() -> bool) -> bool {
    eventually_within(Duration::from_secs(20), condition)
}

/// [`eventually`] with its own deadline, for what the program promises
/// within a longer time (e.g. the minute between two reconciliations).
pub fn eventually_within(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A client that writes LDAP PDUs byte by byte, for requests that no
/// well-behaved client library sends (odd tags, reused message ids,
/// pipelined abandons).
pub mod raw {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    pub struct Raw(TcpStream);

    /// What a response says.
    #[derive(Debug)]
    pub struct Response {
        pub message_id: u8,
        /// The protocolOp's tag, e.g. 0x67 for a ModifyResponse.
        pub op: u8,
        pub result: u8,
        pub diagnostic: String,
        /// An extended response's value ([11]).
        pub value: Option<Vec<u8>>,
    }

    impl Raw {
        pub fn connect(url: &str) -> Raw {
            let addr = url.trim_start_matches("ldap://");
            let stream = TcpStream::connect(addr).expect("connecting to ldapsync");
            stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            Raw(stream)
        }

        /// A client whose kernel takes in little of what it is sent
        /// before it reads: a slow client, without waiting for autotuning.
        pub fn connect_with_small_window(url: &str) -> Raw {
            let addr: std::net::SocketAddr = url.trim_start_matches("ldap://").parse().unwrap();
            let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None).unwrap();
            socket.set_recv_buffer_size(4096).unwrap();
            socket.connect(&addr.into()).expect("connecting to ldapsync");
            let stream = TcpStream::from(socket);
            stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            Raw(stream)
        }

        /// Writes the PDUs in one write, as a pipelining client does.
        pub fn send(&mut self, pdus: &[Vec<u8>]) {
            self.0.write_all(&pdus.concat()).unwrap();
        }

        /// The next PDU's protocolOp tag, whatever it is (0x64 for a
        /// search entry); `None` when the connection closes.
        pub fn op(&mut self) -> Option<u8> {
            let body = self.pdu()?;
            Some(element(&body).1[0])
        }

        /// The next LDAPMessage's contents.
        fn pdu(&mut self) -> Option<Vec<u8>> {
            let mut head = [0u8; 2];
            self.0.read_exact(&mut head).ok()?;
            assert_eq!(head[0], 0x30, "an LDAPMessage");
            let len = if head[1] < 0x80 {
                usize::from(head[1])
            } else {
                let mut octets = vec![0u8; usize::from(head[1] & 0x7f)];
                self.0.read_exact(&mut octets).ok()?;
                octets.iter().fold(0, |acc, &b| (acc << 8) | usize::from(b))
            };
            let mut body = vec![0u8; len];
            self.0.read_exact(&mut body).ok()?;
            Some(body)
        }

        /// The next PDU, a response with a result; `None` when the
        /// connection closes.
        pub fn response(&mut self) -> Option<Response> {
            let body = self.pdu()?;
            let (id, rest) = element(&body);
            let (op_tag, op) = (rest[0], element(rest).0);
            let (code, rest) = element(op);
            let (_matched, rest) = element(rest);
            let (diagnostic, mut rest) = element(rest);
            let mut value = None;
            while !rest.is_empty() {
                let tag = rest[0];
                let (contents, next) = element(rest);
                if tag == 0x8b {
                    value = Some(contents.to_vec());
                }
                rest = next;
            }
            Some(Response {
                message_id: id.last().copied().unwrap_or(0),
                op: op_tag,
                result: code.last().copied().unwrap_or(0),
                diagnostic: String::from_utf8_lossy(diagnostic).into_owned(),
                value,
            })
        }
    }

    /// (contents, what follows) of the BER element at the start of `buf`.
    fn element(buf: &[u8]) -> (&[u8], &[u8]) {
        let (len, header) = if buf[1] < 0x80 {
            (usize::from(buf[1]), 2)
        } else {
            let n = usize::from(buf[1] & 0x7f);
            (
                buf[2..2 + n].iter().fold(0, |acc, &b| (acc << 8) | usize::from(b)),
                2 + n,
            )
        };
        (&buf[header..header + len], &buf[header + len..])
    }

    pub fn tlv(tag: u8, contents: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        if contents.len() < 0x80 {
            out.push(contents.len() as u8);
        } else {
            out.push(0x84);
            out.extend((contents.len() as u32).to_be_bytes());
        }
        out.extend_from_slice(contents);
        out
    }

    fn message(id: u8, op: Vec<u8>) -> Vec<u8> {
        tlv(0x30, &[tlv(0x02, &[id]), op].concat())
    }

    pub fn simple_bind(id: u8, dn: &str, password: &str) -> Vec<u8> {
        let bind = [
            tlv(0x02, &[3]),
            tlv(0x04, dn.as_bytes()),
            tlv(0x80, password.as_bytes()),
        ]
        .concat();
        message(id, tlv(0x60, &bind))
    }

    /// The "Who am I?" extended operation (RFC 4532).
    pub fn whoami(id: u8) -> Vec<u8> {
        message(id, tlv(0x77, &tlv(0x80, b"1.3.6.1.4.1.4203.1.11.3")))
    }

    /// A modify replacing `attr` with `value`, its DN under `dn_tag`
    /// (0x04, OCTET STRING, is what RFC 4511 says).
    pub fn modify(id: u8, dn_tag: u8, dn: &str, attr: &str, value: &str) -> Vec<u8> {
        let replace = [
            tlv(0x0a, &[2]),
            tlv(
                0x30,
                &[tlv(0x04, attr.as_bytes()), tlv(0x31, &tlv(0x04, value.as_bytes()))].concat(),
            ),
        ]
        .concat();
        let op = [tlv(dn_tag, dn.as_bytes()), tlv(0x30, &tlv(0x30, &replace))].concat();
        message(id, tlv(0x66, &op))
    }

    /// A base search of `dn` for its object classes.
    pub fn search_base(id: u8, dn: &str) -> Vec<u8> {
        search(id, dn, 0)
    }

    /// A search for every entry under `dn` (scope 0, base; 2, subtree).
    pub fn search(id: u8, dn: &str, scope: u8) -> Vec<u8> {
        let op = [
            tlv(0x04, dn.as_bytes()),
            tlv(0x0a, &[scope]),
            tlv(0x0a, &[0]),
            tlv(0x02, &[0]),
            tlv(0x02, &[0]),
            tlv(0x01, &[0]),
            tlv(0x87, b"objectClass"),
            tlv(0x30, &[]),
        ]
        .concat();
        message(id, tlv(0x63, &op))
    }

    pub fn abandon(id: u8, target: u8) -> Vec<u8> {
        message(id, tlv(0x50, &[target]))
    }
}
