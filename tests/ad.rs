//! Active Directory, for real: a Samba AD domain controller provisioned on
//! loopback (`fixtures/samba-ad.sh`), relayed by ldapsync and synced. Root
//! only (Samba serves AD's fixed ports): skipped, loudly, otherwise.

mod common;

use std::process::{Command, Output};
use std::sync::OnceLock;

use common::{CliConnector, PresetConnector, ldapsearch, serve, without_cookies};
use ldapsync_fixtures::{AD_ADMIN, AD_ADMIN_DN, AD_BASE, AD_LDAPS_URL, AD_PASSWORD, AD_URL, SambaDc};

const OU: &str = "OU=ldapsync,DC=example,DC=com";
const BULK: usize = 5000;

/// The domain with this file's test data: OU=ldapsync holding OU=Bulk
/// (5,000 users bulk0000…; a sync test adds one more), two groups of all of
/// them, and a deleted user.
fn domain() -> Option<&'static SambaDc> {
    static READY: OnceLock<()> = OnceLock::new();
    let dc = SambaDc::shared()?;
    READY.get_or_init(|| {
        let mut ldif = format!(
            "dn: {OU}\nchangetype: add\nobjectClass: organizationalUnit\n\n\
             dn: OU=Bulk,{OU}\nchangetype: add\nobjectClass: organizationalUnit\n\n\
             dn: CN=gone,{OU}\nchangetype: add\nobjectClass: user\nsAMAccountName: gone\n\n\
             dn: CN=gone,{OU}\nchangetype: delete\n\n"
        );
        for i in 0..BULK {
            ldif.push_str(&format!(
                "dn: CN=bulk{i:04},OU=Bulk,{OU}\nchangetype: add\nobjectClass: user\n\
                 sAMAccountName: bulk{i:04}\nmail: bulk{i:04}@example.com\n\n"
            ));
        }
        // Two groups of everyone: one the relay test reads, one the sync
        // test changes.
        for (group, ou) in [("everyone", "Groups"), ("staff5000", "Teams")] {
            ldif.push_str(&format!(
                "dn: OU={ou},{OU}\nchangetype: add\nobjectClass: organizationalUnit\n\n\
                 dn: CN={group},OU={ou},{OU}\nchangetype: add\nobjectClass: group\nsAMAccountName: {group}\n\n\
                 dn: CN={group},OU={ou},{OU}\nchangetype: modify\nadd: member\n"
            ));
            for i in 0..BULK {
                ldif.push_str(&format!("member: CN=bulk{i:04},OU=Bulk,{OU}\n"));
            }
            ldif.push('\n');
        }
        dc.ldapmodify(&ldif);
    });
    Some(dc)
}

/// The successful answer of a search sent to the DC as the administrator.
fn search_as_admin(args: &[&str]) -> String {
    answer(&ldapsearch(
        AD_URL,
        &[&["-D", AD_ADMIN, "-w", AD_PASSWORD][..], args].concat(),
    ))
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
    without_cookies(&out.stdout)
}

#[test]
fn the_relay_answers_as_active_directory_does() {
    let Some(dc) = domain() else { return };
    let served = serve(&["--listen", "ldap://127.0.0.1:0", "--upstream", AD_URL]);
    let admin = ["-D", AD_ADMIN, "-w", AD_PASSWORD];
    // A binary attribute of bulk0042, escaped for a filter (RFC 4515).
    let escaped = |attr: &str| {
        let out = search_as_admin(&["-b", OU, "(sAMAccountName=bulk0042)", attr]);
        let prefix = format!("{attr}:: ");
        let b64 = out
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .unwrap()
            .to_owned();
        base64_decode(&b64)
            .iter()
            .map(|b| format!("\\{b:02x}"))
            .collect::<String>()
    };
    let guid = escaped("objectGUID");
    let sid_filter = format!("(objectSid={})", escaped("objectSid"));
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
            "binary filter value (objectSid)",
            vec![
                "-D",
                AD_ADMIN,
                "-w",
                AD_PASSWORD,
                "-b",
                OU,
                &sid_filter,
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
                "(sAMAccountName=bulk*)",
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
        (
            // SD flags: the DACL only (4), of a security descriptor.
            "SD flags control",
            vec![
                "-D",
                AD_ADMIN,
                "-w",
                AD_PASSWORD,
                "-E",
                "!1.2.840.113556.1.4.801=::MAMCAQQ=",
                "-b",
                OU,
                "(sAMAccountName=bulk0005)",
                "nTSecurityDescriptor",
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
            &["-E", "pr=500/noprompt", "-b", &bulk, "(sAMAccountName=bulk*)", "1.1"],
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
    // LDAP_SERVER_NOTIFICATION: a search that stays open and reports
    // changes as they happen, through ldapsync as directly.
    for url in [AD_URL, served.url.as_str()] {
        let watcher = Command::new("timeout")
            .args([
                "8",
                "ldapsearch",
                "-x",
                "-LLL",
                "-H",
                url,
                "-D",
                AD_ADMIN,
                "-w",
                AD_PASSWORD,
            ])
            .args([
                "-E",
                "!1.2.840.113556.1.4.528",
                "-b",
                &bulk,
                "-s",
                "one",
                "(objectClass=*)",
                "description",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_secs(2));
        let note = format!("noticed via {url}");
        dc.ldapmodify(&format!(
            "dn: CN=bulk0006,OU=Bulk,{OU}\nchangetype: modify\nreplace: description\ndescription: {note}\n"
        ));
        let out = watcher.wait_with_output().unwrap();
        let seen = String::from_utf8_lossy(&out.stdout);
        assert!(seen.contains(&format!("description: {note}")), "{url}: {seen}");
    }
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

/// A connector with the Active Directory preset, run through the CLI.
struct Connector(CliConnector);

impl std::ops::Deref for Connector {
    type Target = CliConnector;
    fn deref(&self) -> &CliConnector {
        &self.0
    }
}

impl Connector {
    fn new(accounts: &str, groups: &str, direction: &str) -> Connector {
        Connector::reaching(AD_URL, accounts, groups, direction)
    }

    /// Over `ldaps://` with verification off: Samba's self-made certificate
    /// names no host (a laboratory, which is what `verify = false` is for).
    fn over_ldaps(accounts: &str, groups: &str, direction: &str) -> Connector {
        let connector = Connector::reaching(AD_LDAPS_URL, accounts, groups, direction);
        let upstream = format!("upstream = [\"{AD_LDAPS_URL}\"]");
        Connector(connector.0.with(&upstream, "[proxy.upstream_tls]\nverify = false"))
    }

    fn reaching(url: &str, accounts: &str, groups: &str, direction: &str) -> Connector {
        let connector = PresetConnector {
            name: "ad",
            preset: "active-directory",
            url,
            bind_dn: AD_ADMIN_DN,
            password: AD_PASSWORD,
            accounts,
            groups,
            direction,
        };
        Connector(connector.create())
    }

    /// Adds a `key = value` line to the connector's section.
    fn with(self, line: &str) -> Connector {
        Connector(self.0.with("conflict = \"ldap-wins\"", line))
    }

    /// `ldapsync password NAME` with the password on standard input.
    fn set_password(&self, name: &str, password: &str) -> Output {
        use std::io::Write;
        let mut child = self
            .command(&["password", name, "--connector", "ad"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // A refusal may come before the password is read: the pipe may be closed.
        let _ = writeln!(child.stdin.take().unwrap(), "{password}");
        child.wait_with_output().unwrap()
    }
}

/// An entry's objectGUID as the GUID string AD tools print.
fn guid_of(filter: &str) -> String {
    let out = search_as_admin(&["-b", OU, filter, "objectGUID"]);
    let b64 = out
        .lines()
        .find_map(|l| l.strip_prefix("objectGUID:: "))
        .expect("an objectGUID");
    let b = base64_decode(b64);
    let hex = |range: &[u8]| range.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let le = |range: &[u8]| hex(&range.iter().rev().copied().collect::<Vec<_>>());
    format!(
        "{}-{}-{}-{}-{}",
        le(&b[0..4]),
        le(&b[4..6]),
        le(&b[6..8]),
        hex(&b[8..10]),
        hex(&b[10..16])
    )
}

#[test]
fn associations_follow_the_object_guid_through_renames_and_moves_and_each_ad_poll_sees_changes() {
    let Some(dc) = domain() else { return };
    // (mechanism, configured or detected)
    for (mechanism, configured) in [("usn", true), ("dirsync", false)] {
        moves_and_polls(dc, mechanism, configured);
    }
}

fn moves_and_polls(dc: &SambaDc, mechanism: &str, configured: bool) {
    let base = format!("OU=sync-{mechanism},{OU}");
    // sAMAccountName is unique in the whole domain.
    let (ann, ben, team) = (
        format!("ann-{mechanism}"),
        format!("ben-{mechanism}"),
        format!("team-{mechanism}"),
    );
    dc.ldapmodify(&format!(
        "dn: {base}\nchangetype: add\nobjectClass: organizationalUnit\n\n\
         dn: OU=Staff,{base}\nchangetype: add\nobjectClass: organizationalUnit\n\n\
         dn: OU=Elsewhere,{base}\nchangetype: add\nobjectClass: organizationalUnit\n\n\
         dn: CN=ann,OU=Staff,{base}\nchangetype: add\nobjectClass: user\nsAMAccountName: {ann}\n\
         mail: ann@example.com\ndisplayName: Ann\n\n\
         dn: CN=ben,OU=Staff,{base}\nchangetype: add\nobjectClass: user\nsAMAccountName: {ben}\n\
         mail: ben@example.com\n\n\
         dn: CN=team,{base}\nchangetype: add\nobjectClass: group\nsAMAccountName: {team}\n\
         member: CN=ann,OU=Staff,{base}\n"
    ));
    let mut connector = Connector::new(&base, &base, "ldap-to-local");
    if configured {
        connector = connector.with(&format!("poll_mechanism = \"{mechanism}\""));
    }
    let first = connector.sync();
    assert!(
        first.starts_with(&format!("full reconciliation ({mechanism})")),
        "{first}"
    );
    assert_eq!(
        connector.ok(&["account", "list"]).lines().collect::<Vec<_>>(),
        [format!("{ann} (disabled)"), format!("{ben} (disabled)")]
    );
    let shown = connector.ok(&["account", "show", &ann]);
    assert!(
        shown.contains("display_name: Ann") && shown.contains("mail: ann@example.com"),
        "{shown}"
    );
    assert!(
        connector
            .ok(&["group", "show", &team])
            .contains(&format!("members: {ann}"))
    );
    assert!(
        shown.contains("enabled: false"),
        "a new AD user is disabled (546): {shown}"
    );
    let guid = guid_of(&format!("(sAMAccountName={ann})"));
    assert!(
        connector
            .ok(&["association", "show", &ann, "--connector", "ad"])
            .contains(&guid),
        "entry id is the objectGUID {guid}"
    );

    // Renamed and moved in AD, directly: the association follows the GUID.
    dc.ldapmodify(&format!(
        "dn: CN=ann,OU=Staff,{base}\nchangetype: modrdn\nnewrdn: CN=Ann Smith\ndeleteoldrdn: 1\n\
         newsuperior: OU=Elsewhere,{base}\n\n\
         dn: CN=ben,OU=Staff,{base}\nchangetype: modify\nreplace: mail\nmail: ben@changed.example\n\n\
         dn: CN=Ann Smith,OU=Elsewhere,{base}\nchangetype: modify\nreplace: userAccountControl\n\
         userAccountControl: 512\n"
    ));
    let polled = connector.sync();
    assert!(
        polled.starts_with(&format!("incremental poll ({mechanism})")),
        "{polled}"
    );
    let association = connector.ok(&["association", "show", &ann, "--connector", "ad"]);
    assert!(association.contains(&guid), "{association}");
    assert!(
        association.contains(&format!("CN=Ann Smith,OU=Elsewhere,{base}")),
        "{association}"
    );
    assert!(
        connector
            .ok(&["account", "show", &ben])
            .contains("mail: ben@changed.example")
    );

    // Deleted in AD: the tombstone (show-deleted) tells the next poll.
    dc.ldapmodify(&format!("dn: CN=ben,OU=Staff,{base}\nchangetype: delete\n"));
    let polled = connector.sync();
    assert!(
        polled.starts_with(&format!("incremental poll ({mechanism})")),
        "{polled}"
    );
    assert!(polled.contains(&format!("disabled account {ben}")), "{polled}");
    assert!(connector.ok(&["account", "show", &ben]).contains("enabled: false"));
    assert!(
        connector.ok(&["account", "show", &ann]).contains("enabled: true"),
        "userAccountControl 512: enabled"
    );
    let status = connector.status();
    assert!(
        status.contains(&format!("accounts: mechanism {mechanism}, watermark ")),
        "{status}"
    );
    // USNs are one DC's; a DirSync cookie holds on any.
    assert_eq!(
        status.contains("on CN=NTDS Settings,CN=DC1"),
        mechanism == "usn",
        "the watermark is tied to the DC for usn only: {status}"
    );
}

#[test]
fn local_changes_reach_ad_and_a_5000_member_group_changes_by_values() {
    let Some(_dc) = domain() else { return };
    let connector = Connector::new(&format!("OU=Bulk,{OU}"), &format!("OU=Teams,{OU}"), "both");
    connector.sync();
    let group = format!("CN=staff5000,OU=Teams,{OU}");
    let members = connector.ok(&["group", "show", "staff5000"]);
    assert_eq!(
        members.matches("bulk").count(),
        BULK,
        "all 5000 members imported as names"
    );

    connector.ok(&["account", "add", "newbie", "--set", "mail=newbie@example.com"]);
    connector.ok(&["account", "set", "bulk0010", "--enable"]);
    connector.ok(&[
        "group",
        "set",
        "staff5000",
        "--remove",
        "members=bulk0007",
        "--add",
        "members=newbie",
    ]);
    let report = connector.sync();
    assert!(report.contains("create in directory account newbie"), "{report}");

    let created = search_as_admin(&["-b", OU, "(sAMAccountName=newbie)", "mail", "objectClass"]);
    assert!(created.contains(&format!("dn: CN=newbie,OU=Bulk,{OU}")), "{created}");
    assert!(
        created.contains("mail: newbie@example.com") && created.contains("objectClass: user"),
        "{created}"
    );
    let member_of = |name: &str| {
        let filter = format!("(&(sAMAccountName={name})(memberOf={group}))");
        search_as_admin(&["-b", OU, &filter, "1.1"]).contains("dn: ")
    };
    assert!(member_of("newbie"), "added to the group");
    assert!(!member_of("bulk0007"), "removed from the group");
    assert!(member_of("bulk0008"), "the others stay");
    let flags = search_as_admin(&["-b", OU, "(sAMAccountName=bulk0010)", "userAccountControl"]);
    assert!(
        flags.contains("userAccountControl: 544"),
        "bit 2 cleared, the other flags (546 = 512 + 32 + 2) kept: {flags}"
    );
    let again = connector.sync();
    assert!(again.contains(" 0 updated"), "settled: {again}");
}

#[test]
fn passwords_reach_ad_as_unicode_pwd_over_ldaps_only() {
    let Some(dc) = domain() else { return };
    let base = format!("OU=sync-passwords,{OU}");
    dc.ldapmodify(&format!(
        "dn: {base}\nchangetype: add\nobjectClass: organizationalUnit\n\n\
         dn: CN=pat,{base}\nchangetype: add\nobjectClass: user\nsAMAccountName: pat\n"
    ));
    let new_password = "N3w-Passw0rd-for-pat";
    let clear = Connector::new(&base, &base, "both");
    clear.sync();
    let refused = clear.set_password("pat", new_password);
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("must not cross the network in clear text"), "{why}");

    let tls = Connector::over_ldaps(&base, &base, "both");
    tls.sync();
    let set = tls.set_password("pat", new_password);
    assert!(set.status.success(), "{}", String::from_utf8_lossy(&set.stderr));
    tls.ok(&["account", "set", "pat", "--enable"]);
    tls.sync();
    let bind = ldapsearch(
        AD_URL,
        &[
            "-D",
            "pat@EXAMPLE.COM",
            "-w",
            new_password,
            "-b",
            &base,
            "-s",
            "base",
            "1.1",
        ],
    );
    assert!(
        bind.status.success(),
        "pat binds with the new password: {}",
        String::from_utf8_lossy(&bind.stderr)
    );
    let journal = tls.ok(&["journal"]);
    assert!(journal.contains("password-set"), "{journal}");
    assert!(!journal.contains(new_password), "never in the journal");
}

#[test]
fn local_to_ldap_creates_in_ad_and_puts_ad_edits_back() {
    let Some(dc) = domain() else { return };
    let base = format!("OU=sync-outbound,{OU}");
    dc.ldapmodify(&format!(
        "dn: {base}\nchangetype: add\nobjectClass: organizationalUnit\n"
    ));
    let connector = Connector::new(&base, &base, "local-to-ldap");
    connector.ok(&[
        "account",
        "add",
        "olga",
        "--set",
        "mail=olga@example.com",
        "--set",
        "display_name=Olga",
    ]);
    connector.ok(&["group", "add", "outbound", "--set", "members=olga"]);
    let report = connector.sync();
    assert!(report.contains("create in directory account olga"), "{report}");
    let olga = search_as_admin(&["-b", &base, "(sAMAccountName=olga)", "mail", "displayName"]);
    assert!(
        olga.contains(&format!("dn: CN=olga,{base}")) && olga.contains("displayName: Olga"),
        "{olga}"
    );
    let group = search_as_admin(&["-b", &base, "(sAMAccountName=outbound)", "member"]);
    assert!(group.contains(&format!("member: CN=olga,{base}")), "{group}");

    // An edit made in AD is put back: local changes win in this direction.
    dc.ldapmodify(&format!(
        "dn: CN=olga,{base}\nchangetype: modify\nreplace: mail\nmail: edited@in-ad.example\n"
    ));
    let report = connector.sync();
    assert!(report.contains("overwritten account olga"), "{report}");
    let olga = search_as_admin(&["-b", &base, "(sAMAccountName=olga)", "mail"]);
    assert!(olga.contains("mail: olga@example.com"), "{olga}");
}
