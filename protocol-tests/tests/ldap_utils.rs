//! OpenLDAP's own clients (ldap-utils) through ldapsync and directly: the
//! same command line must print the same output and exit with the same
//! status on both paths. Each case also states the exit status a user
//! would expect (the LDAP result code), so two equally broken paths fail.

use std::io::Write;
use std::process::{Command, Stdio};

use protocol_tests::{Pair, ROOT_DN, ROOT_PW, person};

/// One ldap-utils invocation; `-H URL` is added by the runner.
struct Case {
    name: &'static str,
    tool: &'static str,
    args: Vec<String>,
    stdin: Option<String>,
    /// The exit status a user expects: ldap-utils exit with the result code.
    expect_status: i32,
    /// Lines of output to compare; `None` compares all of stdout.
    keep: Option<fn(&str) -> bool>,
}

fn case(name: &'static str, tool: &'static str, args: &[&str], expect_status: i32) -> Case {
    Case {
        name,
        tool,
        args: args.iter().map(|a| a.to_string()).collect(),
        stdin: None,
        expect_status,
        keep: None,
    }
}

impl Case {
    fn stdin(mut self, text: &str) -> Case {
        self.stdin = Some(text.to_owned());
        self
    }

    fn keep(mut self, filter: fn(&str) -> bool) -> Case {
        self.keep = Some(filter);
        self
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    status: i32,
    stdout: String,
    stderr: String,
}

fn run(case: &Case, url: &str) -> Outcome {
    let mut child = Command::new(case.tool)
        .arg("-H")
        .arg(url)
        .args(&case.args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {} (is ldap-utils installed? `make deps`): {e}", case.tool));
    let mut stdin = child.stdin.take().unwrap();
    if let Some(text) = &case.stdin {
        stdin.write_all(text.as_bytes()).unwrap();
    }
    drop(stdin);
    let output = child.wait_with_output().unwrap();
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).replace(url, "URL");
    let stdout = text(&output.stdout);
    Outcome {
        status: output.status.code().unwrap_or(-1),
        stdout: match case.keep {
            Some(keep) => stdout.lines().filter(|l| keep(l)).collect::<Vec<_>>().join("\n"),
            None => stdout,
        },
        stderr: text(&output.stderr),
    }
}

/// Runs every case in order on both paths and compares them one by one.
fn differential(pair: &Pair, cases: &[Case]) {
    let (direct_url, proxy_url) = pair.urls();
    for case in cases {
        let direct = run(case, &direct_url);
        let proxied = run(case, &proxy_url);
        assert_eq!(
            proxied, direct,
            "{}: ldapsync answered differently from slapd",
            case.name
        );
        assert_eq!(
            proxied.status, case.expect_status,
            "{}: exit status (result code); output: {proxied:#?}",
            case.name
        );
    }
}

fn dn_lines(line: &str) -> bool {
    line.starts_with("dn: ")
}

#[test]
fn ldap_utils_read_operations() {
    let pair = Pair::start();
    let (alice, alice_pw) = person("alice");
    let cases = vec![
        case(
            "subtree search",
            "ldapsearch",
            &["-x", "-LLL", "-b", "dc=example,dc=com"],
            0,
        ),
        case(
            "one-level search",
            "ldapsearch",
            &[
                "-x",
                "-LLL",
                "-s",
                "one",
                "-b",
                "ou=people,dc=example,dc=com",
                "uid",
                "mail",
            ],
            0,
        ),
        case(
            "root DSE",
            "ldapsearch",
            &["-x", "-LLL", "-s", "base", "-b", "", "+"],
            0,
        ),
        case(
            "filter",
            "ldapsearch",
            &[
                "-x",
                "-LLL",
                "-b",
                "dc=example,dc=com",
                "(&(objectClass=groupOfNames)(member=uid=bob,ou=people,dc=example,dc=com))",
                "cn",
            ],
            0,
        ),
        case(
            "non-UTF-8 filter value",
            "ldapsearch",
            &[
                "-x",
                "-LLL",
                "-b",
                "dc=example,dc=com",
                "(description=\\ff\\fe\\c3\\28)",
            ],
            0,
        ),
        case(
            "client size limit",
            "ldapsearch",
            &[
                "-x",
                "-LLL",
                "-z",
                "2",
                "-b",
                "dc=example,dc=com",
                "(objectClass=inetOrgPerson)",
                "uid",
            ],
            4,
        ),
        case(
            "referral",
            "ldapsearch",
            &["-x", "-LLL", "-s", "base", "-b", "ou=remote,dc=example,dc=com"],
            10,
        ),
        case(
            "manageDSAit",
            "ldapsearch",
            &["-x", "-LLL", "-M", "-s", "base", "-b", "ou=remote,dc=example,dc=com"],
            0,
        ),
        case(
            "unknown critical control",
            "ldapsearch",
            &[
                "-x",
                "-LLL",
                "-e",
                "!1.3.6.1.4.1.55555.9",
                "-s",
                "base",
                "-b",
                "dc=example,dc=com",
            ],
            12,
        ),
        case(
            "unknown non-critical control",
            "ldapsearch",
            &[
                "-x",
                "-LLL",
                "-e",
                "1.3.6.1.4.1.55555.9",
                "-s",
                "base",
                "-b",
                "dc=example,dc=com",
                "dc",
            ],
            0,
        ),
        case(
            "paged results",
            "ldapsearch",
            &[
                "-x",
                "-LLL",
                "-E",
                "pr=2/noprompt",
                "-b",
                "ou=people,dc=example,dc=com",
                "uid",
            ],
            0,
        ),
        case(
            "content sync refreshOnly",
            "ldapsearch",
            &["-x", "-LLL", "-E", "sync=ro", "-b", "dc=example,dc=com", "dn"],
            0,
        )
        .keep(dn_lines),
        case(
            "no such object",
            "ldapsearch",
            &["-x", "-LLL", "-b", "ou=nowhere,dc=example,dc=com"],
            32,
        ),
        case(
            "compare true",
            "ldapcompare",
            &["-x", &alice, "mail:alice@example.com"],
            6,
        ),
        case(
            "compare false",
            "ldapcompare",
            &["-x", &alice, "mail:bob@example.com"],
            5,
        ),
        case("whoami anonymous", "ldapwhoami", &["-x"], 0),
        case("whoami alice", "ldapwhoami", &["-x", "-D", &alice, "-w", &alice_pw], 0),
        case("wrong password", "ldapwhoami", &["-x", "-D", &alice, "-w", "wrong"], 49),
        case(
            "whoami exop",
            "ldapexop",
            &["-x", "-D", &alice, "-w", &alice_pw, "whoami"],
            0,
        ),
        // ldapexop exits 1 and prints the result code: protocolError (2).
        case("unknown exop", "ldapexop", &["-x", "1.3.6.1.4.1.55555.1"], 1),
    ];
    // Multiplexed, an extended operation the directory cannot run under the
    // client's identity is refused (the proxied authorization control is
    // critical): never run as the shared connections' identity instead.
    let (compared, expected) = match protocol_tests::multiplexed() {
        false => (&cases[..], "Protocol error (2)"),
        true => (&cases[..cases.len() - 1], "Critical extension is unavailable (12)"),
    };
    differential(&pair, compared);
    let unknown = run(cases.last().unwrap(), &pair.proxy.url());
    assert!(unknown.stderr.contains(expected), "{unknown:?}");
}

#[test]
fn ldap_utils_write_operations() {
    let pair = Pair::start();
    let (alice, alice_pw) = person("alice");
    let (bob, _) = person("bob");
    let admin = ["-x", "-D", ROOT_DN, "-w", ROOT_PW];
    fn with_admin<'a>(admin: &[&'a str], args: &[&'a str]) -> Vec<&'a str> {
        [admin, args].concat()
    }
    let add = "dn: uid=yan,ou=people,dc=example,dc=com\nchangetype: add\nobjectClass: inetOrgPerson\nuid: yan\ncn: Yan Yang\nsn: Yang\n\n\
               dn: uid=yan,ou=people,dc=example,dc=com\nchangetype: modify\nreplace: mail\nmail: yan@example.com\n-\nadd: description\ndescription: added\n";
    let modify_mail =
        "dn: uid=yan,ou=people,dc=example,dc=com\nchangetype: modify\nreplace: mail\nmail: yan.yang@example.com\n";
    let bob_edit = format!("dn: {bob}\nchangetype: modify\nreplace: description\ndescription: not yours\n");
    let cases = vec![
        case("add and modify", "ldapmodify", &with_admin(&admin, &[]), 0).stdin(add),
        case("add existing", "ldapmodify", &with_admin(&admin, &["-a"]), 68)
            .stdin("dn: uid=yan,ou=people,dc=example,dc=com\nobjectClass: inetOrgPerson\nuid: yan\ncn: Y\nsn: Y\n"),
        case(
            "assertion holds",
            "ldapmodify",
            &with_admin(&admin, &["-e", "assert=(sn=Yang)"]),
            0,
        )
        .stdin(modify_mail),
        case(
            "assertion fails",
            "ldapmodify",
            &with_admin(&admin, &["-e", "assert=(sn=Wrong)"]),
            122,
        )
        .stdin(modify_mail),
        case(
            "pre- and post-read",
            "ldapmodify",
            &with_admin(&admin, &["-e", "preread=mail", "-e", "postread=mail"]),
            0,
        )
        .stdin("dn: uid=yan,ou=people,dc=example,dc=com\nchangetype: modify\nreplace: mail\nmail: yan@example.org\n"),
        case(
            "modrdn",
            "ldapmodrdn",
            &with_admin(&admin, &["-r", "uid=yan,ou=people,dc=example,dc=com", "uid=yann"]),
            0,
        ),
        case(
            "search after modrdn",
            "ldapsearch",
            &[
                "-x",
                "-LLL",
                "-b",
                "ou=people,dc=example,dc=com",
                "(uid=yan*)",
                "uid",
                "mail",
                "description",
            ],
            0,
        ),
        case(
            "delete",
            "ldapdelete",
            &with_admin(&admin, &["uid=yann,ou=people,dc=example,dc=com"]),
            0,
        ),
        case(
            "delete missing",
            "ldapdelete",
            &with_admin(&admin, &["uid=yann,ou=people,dc=example,dc=com"]),
            32,
        ),
        case(
            "ACL refuses alice on bob",
            "ldapmodify",
            &["-x", "-D", &alice, "-w", &alice_pw],
            50,
        )
        .stdin(&bob_edit),
        case("anonymous write", "ldapmodify", &["-x"], 8).stdin(&bob_edit),
        case(
            "password change",
            "ldappasswd",
            &["-x", "-D", &alice, "-w", &alice_pw, "-s", "alice-changed"],
            0,
        ),
        case(
            "old password refused",
            "ldapwhoami",
            &["-x", "-D", &alice, "-w", &alice_pw],
            49,
        ),
        case(
            "new password",
            "ldapwhoami",
            &["-x", "-D", &alice, "-w", "alice-changed"],
            0,
        ),
    ];
    differential(&pair, &cases);
}

#[test]
fn ldap_utils_paged_search_over_2500_entries() {
    let pair = Pair::start_with_bulk(2500);
    let cases = vec![
        case(
            "paged",
            "ldapsearch",
            &[
                "-x",
                "-LLL",
                "-E",
                "pr=300/noprompt",
                "-b",
                "ou=bulk,dc=example,dc=com",
                "dn",
            ],
            0,
        ),
        case(
            "unpaged hits the server limit",
            "ldapsearch",
            &["-x", "-LLL", "-b", "ou=bulk,dc=example,dc=com", "dn"],
            4,
        )
        .keep(dn_lines),
    ];
    differential(&pair, &cases);
    let paged = run(&cases[0], &pair.proxy.url());
    assert_eq!(
        paged.stdout.lines().filter(|l| dn_lines(l)).count(),
        2501,
        "ou=bulk and its 2500 people"
    );
}

#[test]
fn ldap_utils_sasl_binds_multi_step_and_with_security_layer() {
    let pair = Pair::start();
    let sasl = ["-Y", "DIGEST-MD5", "-U", "alice", "-w", "alice-secret"];
    let with_sasl = |args: &[&'static str]| -> Vec<&'static str> { [&sasl[..], args].concat() };
    let cases = vec![
        // DIGEST-MD5 takes two round trips (challenge, response).
        case("DIGEST-MD5 without a security layer", "ldapwhoami", &with_sasl(&["-O", "maxssf=0"]), 0),
        case("DIGEST-MD5 wrong password", "ldapwhoami", &["-Y", "DIGEST-MD5", "-U", "alice", "-w", "wrong", "-O", "maxssf=0"], 49),
        // With a security layer every later PDU is wrapped by SASL.
        case("DIGEST-MD5 with a security layer", "ldapwhoami", &with_sasl(&[]), 0),
        case("search inside the security layer", "ldapsearch", &with_sasl(&["-LLL", "-b", "dc=example,dc=com", "(uid=bob)", "mail"]), 0),
        case("write inside the security layer", "ldapmodify", &with_sasl(&[]), 0)
            .stdin("dn: uid=alice,ou=people,dc=example,dc=com\nchangetype: modify\nreplace: description\ndescription: sealed\n"),
    ];
    differential(&pair, &cases);
    let whoami = run(&cases[2], &pair.proxy.url());
    assert!(
        whoami.stdout.contains("dn:uid=alice,ou=people,dc=example,dc=com"),
        "{whoami:?}"
    );
    assert!(
        whoami.stderr.contains("SASL SSF: 128"),
        "a security layer was negotiated: {whoami:?}"
    );
    assert!(
        pair.proxy.sink.losses().contains(&ldapsync::proxy::CaptureLoss::Opaque(
            ldapsync::proxy::Opacity::SecurityLayer
        )),
        "a write the relay cannot see is reported, not silently dropped"
    );
}
