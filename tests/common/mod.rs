//! Helpers shared by the binary's integration tests.

// Each test crate includes this module and uses a part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

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
fn listening(line: &str) -> Option<(String, String)> {
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
        let log: Vec<String> = self.log.try_iter().collect();
        (exit, log.join("\n"))
    }
}

/// Waits for `condition` to hold, for at most 20 s; false if it never did.
/// A correctness check with a generous deadline, not a speed assertion.
pub fn eventually(mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}
