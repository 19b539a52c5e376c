//! Active Directory, for real: a Samba AD domain controller provisioned on
//! loopback (`fixtures/samba-ad.sh`), relayed by ldapsync and synced. Root
//! only (Samba serves AD's fixed ports): skipped, loudly, otherwise.

mod common;

use std::process::{Command, Output};
use std::sync::OnceLock;

use common::serve;
use ldapsync_fixtures::{AD_ADMIN, AD_ADMIN_DN, AD_BASE, AD_PASSWORD, AD_URL, SambaDc};

const OU: &str = "OU=ldapsync,DC=example,DC=com";
const BULK: usize = 5000;

/// The domain with this file's test data: OU=ldapsync holding OU=Bulk
/// (5,000 users), a group of all of them, and a deleted user.
fn domain() -> Option<&'static SambaDc> {
    static READY: OnceLock<()> = OnceLock::new();
    let dc = SambaDc::shared()?;
    READY.get_or_init(|| {
        let mut ldif = format!(
            "dn: {OU}\nchangetype: add\nobjectClass: organizationalUnit\n\n\
             dn: OU=Bulk,{OU}\nchangetype: add\nobjectClass: organizationalUnit\n\n\
             dn: OU=Groups,{OU}\nchangetype: add\nobjectClass: organizationalUnit\n\n\
             dn: CN=gone,{OU}\nchangetype: add\nobjectClass: user\nsAMAccountName: gone\n\n\
             dn: CN=gone,{OU}\nchangetype: delete\n\n"
        );
        for i in 0..BULK {
            ldif.push_str(&format!(
                "dn: CN=bulk{i:04},OU=Bulk,{OU}\nchangetype: add\nobjectClass: user\n\
                 sAMAccountName: bulk{i:04}\nmail: bulk{i:04}@example.com\n\n"
            ));
        }
        ldif.push_str(&format!(
            "dn: CN=everyone,OU=Groups,{OU}\nchangetype: add\nobjectClass: group\nsAMAccountName: everyone\n\n\
             dn: CN=everyone,OU=Groups,{OU}\nchangetype: modify\nadd: member\n"
        ));
        for i in 0..BULK {
            ldif.push_str(&format!("member: CN=bulk{i:04},OU=Bulk,{OU}\n"));
        }
        dc.ldapmodify(&ldif);
    });
    Some(dc)
}

fn ldapsearch(url: &str, args: &[&str]) -> Output {
    Command::new("ldapsearch")
        .env("LDAPCONF", "/dev/null")
        .args(["-x", "-LLL", "-o", "ldif-wrap=no", "-H", url])
        .args(args)
        .output()
        .unwrap()
}

/// stdout of a successful search, without what differs between two runs of
/// the same search (control values carrying cookies).
fn answer(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with("control:") && !l.starts_with("# "))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_relay_answers_as_active_directory_does() {
    let Some(_dc) = domain() else { return };
    let served = serve(&["--listen", "ldap://127.0.0.1:0", "--upstream", AD_URL]);
    let admin = ["-D", AD_ADMIN, "-w", AD_PASSWORD];
    let guid = {
        let out = answer(&ldapsearch(
            AD_URL,
            &[&admin[..], &["-b", OU, "(sAMAccountName=bulk0042)", "objectGUID"]].concat(),
        ));
        let b64 = out
            .lines()
            .find_map(|l| l.strip_prefix("objectGUID:: "))
            .unwrap()
            .to_owned();
        let bytes = base64_decode(&b64);
        bytes.iter().map(|b| format!("\\{b:02x}")).collect::<String>()
    };
    let guid_filter = format!("(objectGUID={guid})");
    let bulk = format!("OU=Bulk,{OU}");
    let group = format!("CN=everyone,OU=Groups,{OU}");
    let cases: Vec<(&str, Vec<&str>)> = vec![
        (
            "bind by UPN",
            vec![
                "-D",
                AD_ADMIN,
                "-w",
                AD_PASSWORD,
                "-b",
                OU,
                "(sAMAccountName=bulk0001)",
                "mail",
            ],
        ),
        (
            "bind by DN",
            vec![
                "-D",
                AD_ADMIN_DN,
                "-w",
                AD_PASSWORD,
                "-b",
                OU,
                "(sAMAccountName=bulk0001)",
                "mail",
            ],
        ),
        (
            "binary filter value (objectGUID)",
            vec![
                "-D",
                AD_ADMIN,
                "-w",
                AD_PASSWORD,
                "-b",
                OU,
                &guid_filter,
                "sAMAccountName",
            ],
        ),
        (
            "paged past AD's 1000",
            vec![
                "-D",
                AD_ADMIN,
                "-w",
                AD_PASSWORD,
                "-E",
                "pr=500/noprompt",
                "-b",
                &bulk,
                "(objectClass=user)",
                "1.1",
            ],
        ),
        (
            "ranged retrieval of a 5000-member group",
            vec![
                "-D",
                AD_ADMIN,
                "-w",
                AD_PASSWORD,
                "-b",
                &group,
                "-s",
                "base",
                "(objectClass=*)",
                "member;range=0-1499",
            ],
        ),
        (
            "DirSync control",
            vec![
                "-D",
                AD_ADMIN,
                "-w",
                AD_PASSWORD,
                "-E",
                "!dirSync=0/0",
                "-b",
                AD_BASE,
                "(sAMAccountName=bulk0002)",
                "mail",
            ],
        ),
        (
            "show-deleted control",
            vec![
                "-D",
                AD_ADMIN,
                "-w",
                AD_PASSWORD,
                "-E",
                "!1.2.840.113556.1.4.417",
                "-b",
                "CN=Deleted Objects,DC=example,DC=com",
                "(sAMAccountName=gone)",
                "isDeleted",
            ],
        ),
        (
            "extended DN control",
            vec![
                "-D",
                AD_ADMIN,
                "-w",
                AD_PASSWORD,
                "-E",
                "!1.2.840.113556.1.4.529",
                "-b",
                OU,
                "(sAMAccountName=bulk0003)",
                "1.1",
            ],
        ),
        (
            "referrals as AD sends them",
            vec![
                "-D",
                AD_ADMIN,
                "-w",
                AD_PASSWORD,
                "-b",
                AD_BASE,
                "(sAMAccountName=bulk0004)",
                "1.1",
            ],
        ),
    ];
    for (name, args) in cases {
        let direct = answer(&ldapsearch(AD_URL, &args));
        let proxied = answer(&ldapsearch(&served.url, &args));
        assert_eq!(proxied, direct, "{name}");
        assert!(!direct.is_empty(), "{name}: AD answered something");
    }
    let paged = answer(&ldapsearch(
        &served.url,
        &[
            &admin[..],
            &["-E", "pr=500/noprompt", "-b", &bulk, "(objectClass=user)", "1.1"],
        ]
        .concat(),
    ));
    assert_eq!(paged.lines().filter(|l| l.starts_with("dn: ")).count(), BULK);
    let ranged = answer(&ldapsearch(
        &served.url,
        &[
            &admin[..],
            &["-b", &group, "-s", "base", "(objectClass=*)", "member;range=0-1499"],
        ]
        .concat(),
    ));
    assert_eq!(
        ranged
            .lines()
            .filter(|l| l.starts_with("member;range=0-1499: "))
            .count(),
        1500
    );
    let (exit, _) = served.terminate();
    assert!(exit.success());
}

fn base64_decode(text: &str) -> Vec<u8> {
    let out = Command::new("base64")
        .arg("-d")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(text.as_bytes())?;
            child.wait_with_output()
        })
        .unwrap();
    out.stdout
}
