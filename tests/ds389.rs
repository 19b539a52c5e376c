//! 389 Directory Server, for real: a throw-away instance on loopback
//! (`fixtures/389ds-instance.sh`, with the Retro Changelog, Content
//! Synchronization and entryUUID plugins), relayed by ldapsync and synced
//! with the `389ds` preset. Root only (ns-slapd runs as root here):
//! skipped, loudly, otherwise. One instance serves the whole file; each
//! test works in a subtree of its own.

mod common;

use std::process::{Command, Output};

use common::{CliConnector, PresetConnector, eventually, ldapsearch, serve, serve_config, without_cookies};
use ldapsync_fixtures::{DS_ADMIN_DN, DS_ADMIN_PASSWORD, Ds389, person};

const BASE: &str = "dc=example,dc=com";

/// Held by the tests that read the changelog: one of them trims it, which
/// would take another's watermark away.
static CHANGELOG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// What a user compares of a client's run: its exit code and output, less
/// the lines that differ between any two runs (cookies in controls).
fn outcome(out: &Output) -> (Option<i32>, String, String) {
    (
        out.status.code(),
        without_cookies(&out.stdout),
        without_cookies(&out.stderr),
    )
}

/// An ldap-utils command with LDIF on its standard input.
fn with_stdin(tool: &str, args: &[&str], stdin: &str) -> Output {
    use std::io::Write;
    let mut child = Command::new(tool)
        .env("LDAPCONF", "/dev/null")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn the_relay_answers_as_389_ds_does() {
    let Some(ds) = Ds389::shared() else { return };
    let served = serve(&["--listen", "ldap://127.0.0.1:0", "--upstream", &ds.url()]);
    let base = format!("ou=relay,{BASE}");
    let mut ldif = format!("dn: {base}\nchangetype: add\nobjectClass: organizationalUnit\n\n");
    for i in 0..30 {
        ldif.push_str(&format!(
            "dn: uid=r{i:02},{base}\nchangetype: add\nobjectClass: inetOrgPerson\nuid: r{i:02}\ncn: R {i}\nsn: R\n\n"
        ));
    }
    ldif.push_str(&format!(
        "dn: uid=locked,{base}\nchangetype: add\nobjectClass: inetOrgPerson\nuid: locked\ncn: L\nsn: L\n\
         userPassword: locked-secret\nnsAccountLock: TRUE\n"
    ));
    ds.ldapmodify(&ldif);
    let (alice, alice_pw) = person("alice");
    let admin = ["-D", DS_ADMIN_DN, "-w", DS_ADMIN_PASSWORD];
    let locked = format!("uid=locked,{base}");
    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("anonymous search", vec!["-b", BASE, "(uid=alice)", "cn", "mail"]),
        (
            "bound search",
            vec!["-D", &alice, "-w", &alice_pw, "-b", BASE, "(uid=bob)", "mail"],
        ),
        (
            "wrong password",
            vec!["-D", &alice, "-w", "wrong", "-b", BASE, "(uid=bob)"],
        ),
        (
            "a locked account binds with 53",
            vec!["-D", &locked, "-w", "locked-secret", "-b", BASE, "(uid=bob)"],
        ),
        (
            "operational attributes",
            vec!["-b", BASE, "(uid=carol)", "nsUniqueId", "entryUUID", "createTimestamp"],
        ),
        (
            "paged results",
            vec!["-E", "pr=7/noprompt", "-b", &base, "(uid=r*)", "1.1"],
        ),
        (
            "server-side sort",
            vec!["-E", "sss=-uid", "-b", &base, "(uid=r*)", "uid"],
        ),
        (
            "virtual list view",
            vec!["-E", "sss=uid", "-E", "vlv=1/2/5", "-b", &base, "(uid=r*)", "uid"],
        ),
        ("size limit", vec!["-z", "3", "-b", &base, "(uid=r*)", "1.1"]),
        (
            "the changelog",
            vec![
                &admin[0],
                &admin[1],
                &admin[2],
                &admin[3],
                "-b",
                "cn=changelog",
                "-s",
                "base",
                "(objectClass=*)",
            ],
        ),
        (
            "content synchronization (RFC 4533)",
            vec!["-E", "sync=ro", "-b", &base, "(uid=r0*)", "uid"],
        ),
        (
            "root DSE",
            vec![
                "-s",
                "base",
                "-b",
                "",
                "(objectClass=*)",
                "namingContexts",
                "supportedControl",
                "vendorName",
            ],
        ),
        (
            "no such object",
            vec!["-b", "ou=nowhere,dc=example,dc=com", "(objectClass=*)"],
        ),
    ];
    for (name, args) in &cases {
        let direct = outcome(&ldapsearch(&ds.url(), args));
        let proxied = outcome(&ldapsearch(&served.url, args));
        assert_eq!(proxied, direct, "{name}");
    }
    let locked_bind = outcome(&ldapsearch(&served.url, &cases[3].1));
    assert_eq!(locked_bind.0, Some(53), "{locked_bind:?}");
    let paged = outcome(&ldapsearch(&served.url, &cases[5].1)).1;
    assert_eq!(paged.lines().filter(|l| l.starts_with("dn: ")).count(), 30);

    // Writes and extended operations, each side on its own entry.
    let mut passwords = Vec::new();
    for (side, url) in [("direct", ds.url()), ("proxied", served.url.clone())] {
        let dn = format!("uid=w-{side},{base}");
        let add = with_stdin(
            "ldapadd",
            &["-x", "-H", &url, "-D", DS_ADMIN_DN, "-w", DS_ADMIN_PASSWORD],
            &format!("dn: {dn}\nobjectClass: inetOrgPerson\nuid: w-{side}\ncn: W\nsn: W\nuserPassword: old-secret\n"),
        );
        assert!(add.status.success(), "{side}: {add:?}");
        let modify = with_stdin(
            "ldapmodify",
            &["-x", "-H", &url, "-D", DS_ADMIN_DN, "-w", DS_ADMIN_PASSWORD],
            &format!("dn: {dn}\nchangetype: modify\nreplace: description\ndescription: {side}\n"),
        );
        assert!(modify.status.success(), "{side}: {modify:?}");
        // 389 DS wants a secure connection for it; the answer is compared below.
        let passwd = Command::new("ldappasswd")
            .args(["-x", "-H", &url, "-D", &dn, "-w", "old-secret", "-s", "new-secret"])
            .output()
            .unwrap();
        passwords.push(outcome(&passwd));
        let whoami = Command::new("ldapwhoami")
            .args(["-x", "-H", &url, "-D", &dn, "-w", "old-secret"])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&whoami.stdout).trim(),
            // 389 DS writes the authzId with a space after "dn:".
            format!("dn: {dn}"),
            "{side}"
        );
        let rename = with_stdin(
            "ldapmodify",
            &["-x", "-H", &url, "-D", DS_ADMIN_DN, "-w", DS_ADMIN_PASSWORD],
            &format!("dn: {dn}\nchangetype: modrdn\nnewrdn: uid=renamed-{side}\ndeleteoldrdn: 0\n"),
        );
        assert!(rename.status.success(), "{side}: {rename:?}");
        let delete = Command::new("ldapdelete")
            .args(["-x", "-H", &url, "-D", DS_ADMIN_DN, "-w", DS_ADMIN_PASSWORD])
            .arg(format!("uid=renamed-{side},{base}"))
            .output()
            .unwrap();
        assert!(delete.status.success(), "{side}: {delete:?}");
    }
    assert_eq!(passwords[0], passwords[1], "password modify");
    assert_eq!(passwords[0].0, Some(1), "{:?}", passwords[0]);
    let (exit, _) = served.terminate();
    assert!(exit.success());
}

/// A connector with the 389 DS preset, bound as the fixture's admin entry.
fn connector(accounts: &str, groups: &str, direction: &str, ds: &Ds389) -> CliConnector {
    let connector = PresetConnector {
        name: "ds",
        preset: "389ds",
        url: &ds.url(),
        bind_dn: DS_ADMIN_DN,
        password: DS_ADMIN_PASSWORD,
        accounts,
        groups,
        direction,
    };
    connector.create()
}

fn unique_id(ds: &Ds389, base: &str, filter: &str) -> String {
    ds.search(&["-b", base, filter, "nsUniqueId"])
        .lines()
        .find_map(|l| l.strip_prefix("nsUniqueId: ").map(str::to_owned))
        .expect("an nsUniqueId")
}

#[test]
fn associations_follow_the_unique_id_through_renames_and_moves_and_each_389_poll_sees_changes() {
    let Some(ds) = Ds389::shared() else { return };
    // (mechanism, configured or detected: Content Synchronization is on,
    // so detection prefers it)
    for (mechanism, configured) in [("changelog", true), ("syncrepl", false)] {
        let _changelog = CHANGELOG.lock().unwrap_or_else(|e| e.into_inner());
        moves_and_polls(ds, mechanism, configured);
    }
}

fn moves_and_polls(ds: &Ds389, mechanism: &str, configured: bool) {
    let base = format!("ou=sync-{mechanism},{BASE}");
    ds.ldapmodify(&format!(
        "dn: {base}\nchangetype: add\nobjectClass: organizationalUnit\n\n\
         dn: ou=staff,{base}\nchangetype: add\nobjectClass: organizationalUnit\n\n\
         dn: ou=elsewhere,{base}\nchangetype: add\nobjectClass: organizationalUnit\n\n\
         dn: uid=ann,ou=staff,{base}\nchangetype: add\nobjectClass: inetOrgPerson\nuid: ann\ncn: Ann\nsn: A\n\
         displayName: Ann\nmail: ann@example.com\n\n\
         dn: uid=ben,ou=staff,{base}\nchangetype: add\nobjectClass: inetOrgPerson\nuid: ben\ncn: Ben\nsn: B\n\
         mail: ben@example.com\n\n\
         dn: cn=team,{base}\nchangetype: add\nobjectClass: groupOfNames\ncn: team\n\
         member: uid=ann,ou=staff,{base}\n"
    ));
    let mut connector = connector(&base, &base, "ldap-to-local", ds);
    if configured {
        connector = connector.with("conflict = \"ldap-wins\"", &format!("poll_mechanism = \"{mechanism}\""));
    }
    let first = connector.sync();
    assert!(
        first.starts_with(&format!("full reconciliation ({mechanism})")),
        "{first}"
    );
    assert_eq!(
        connector.ok(&["account", "list"]).lines().collect::<Vec<_>>(),
        ["ann", "ben"]
    );
    let shown = connector.ok(&["account", "show", "ann"]);
    assert!(
        shown.contains("display_name: Ann")
            && shown.contains("mail: ann@example.com")
            && shown.contains("enabled: true"),
        "{shown}"
    );
    assert!(connector.ok(&["group", "show", "team"]).contains("members: ann"));
    let id = unique_id(ds, &base, "(uid=ann)");
    assert!(
        connector
            .ok(&["association", "show", "ann", "--connector", "ds"])
            .contains(&id),
        "entry id is the nsUniqueId {id}"
    );

    // Renamed and moved, modified and locked, directly in 389 DS.
    ds.ldapmodify(&format!(
        "dn: uid=ann,ou=staff,{base}\nchangetype: modrdn\nnewrdn: uid=ann\ndeleteoldrdn: 1\n\
         newsuperior: ou=elsewhere,{base}\n\n\
         dn: uid=ann,ou=elsewhere,{base}\nchangetype: modify\nreplace: displayName\ndisplayName: Ann Smith\n\n\
         dn: uid=ben,ou=staff,{base}\nchangetype: modify\nreplace: mail\nmail: ben@changed.example\n\n\
         dn: uid=ben,ou=staff,{base}\nchangetype: modify\nreplace: nsAccountLock\nnsAccountLock: TRUE\n\n\
         dn: cn=team,{base}\nchangetype: modrdn\nnewrdn: cn=crew\ndeleteoldrdn: 1\n"
    ));
    let polled = connector.sync();
    assert!(
        polled.starts_with(&format!("incremental poll ({mechanism})")),
        "{polled}"
    );
    let association = connector.ok(&["association", "show", "ann", "--connector", "ds"]);
    assert!(
        association.contains(&id) && association.contains(&format!("uid=ann,ou=elsewhere,{base}")),
        "{association}"
    );
    assert!(
        connector
            .ok(&["account", "show", "ann"])
            .contains("display_name: Ann Smith")
    );
    let ben = connector.ok(&["account", "show", "ben"]);
    assert!(
        ben.contains("mail: ben@changed.example") && ben.contains("enabled: false"),
        "nsAccountLock: TRUE disables: {ben}"
    );

    // A group renamed under the base it shares with the accounts is the
    // same group, renamed; the accounts' read must not judge it.
    assert!(
        !polled.contains("deleted group")
            && !polled.contains("disabled group")
            && !polled.contains("created locally group"),
        "{polled}"
    );
    assert_eq!(
        connector.ok(&["group", "list"]).trim(),
        "crew",
        "renamed, not deleted and created"
    );

    // Deleted in 389 DS: the next poll sees it (delete = disable).
    ds.ldapmodify(&format!("dn: uid=ann,ou=elsewhere,{base}\nchangetype: delete\n"));
    let polled = connector.sync();
    assert!(
        polled.starts_with(&format!("incremental poll ({mechanism})")),
        "{polled}"
    );
    assert!(polled.contains("disabled account ann"), "{polled}");
    assert!(connector.ok(&["account", "show", "ann"]).contains("enabled: false"));
    let status = connector.status();
    assert!(
        status.contains(&format!("accounts: mechanism {mechanism}, watermark ")),
        "{status}"
    );
}

#[test]
fn a_changelog_trimmed_past_the_watermark_brings_a_full_reconciliation() {
    let Some(ds) = Ds389::shared() else { return };
    let _changelog = CHANGELOG.lock().unwrap_or_else(|e| e.into_inner());
    let base = format!("ou=sync-trimmed,{BASE}");
    ds.ldapmodify(&format!(
        "dn: {base}\nchangetype: add\nobjectClass: organizationalUnit\n\n\
         dn: uid=tess,{base}\nchangetype: add\nobjectClass: inetOrgPerson\nuid: tess\ncn: Tess\nsn: T\n\
         displayName: Tess\n"
    ));
    let connector =
        connector(&base, &base, "ldap-to-local", ds).with("conflict = \"ldap-wins\"", "poll_mechanism = \"changelog\"");
    assert!(connector.sync().starts_with("full reconciliation (changelog)"));
    ds.ldapmodify(&format!(
        "dn: uid=tess,{base}\nchangetype: modify\nreplace: displayName\ndisplayName: Tess Two\n"
    ));
    // Trimmed as the plugin's maximum age would: every change up to the
    // newest goes (the newest stays, as 389 DS keeps the last one).
    let last = ds.last_change_number();
    ds.ldapmodify(&format!(
        "dn: uid=tess,{base}\nchangetype: modify\nreplace: displayName\ndisplayName: Tess Three\n"
    ));
    ds.trim_changelog(last + 1);
    let report = connector.sync();
    assert!(report.starts_with("full reconciliation (changelog)"), "{report}");
    assert!(
        connector
            .ok(&["account", "show", "tess"])
            .contains("display_name: Tess Three")
    );
    let again = connector.sync();
    assert!(again.starts_with("incremental poll (changelog)"), "{again}");
}

#[test]
fn a_change_lost_from_the_middle_of_a_poll_fails_it_rather_than_be_skipped() {
    let Some(ds) = Ds389::shared() else { return };
    let _changelog = CHANGELOG.lock().unwrap_or_else(|e| e.into_inner());
    let base = format!("ou=sync-lost,{BASE}");
    ds.ldapmodify(&format!(
        "dn: {base}\nchangetype: add\nobjectClass: organizationalUnit\n\n\
         dn: uid=lou,{base}\nchangetype: add\nobjectClass: inetOrgPerson\nuid: lou\ncn: Lou\nsn: L\n"
    ));
    let connector =
        connector(&base, &base, "ldap-to-local", ds).with("conflict = \"ldap-wins\"", "poll_mechanism = \"changelog\"");
    assert!(connector.sync().starts_with("full reconciliation (changelog)"));
    for name in ["Lou Two", "Lou Three", "Lou Four"] {
        ds.ldapmodify(&format!(
            "dn: uid=lou,{base}\nchangetype: modify\nreplace: displayName\ndisplayName: {name}\n"
        ));
    }
    let last = ds.last_change_number();
    // Neither the first change after the watermark nor the last: a gap
    // inside the read, which no waiting fills.
    ds.lose_change(last - 1);
    let out = connector
        .command(&["sync", "run", "--connector", "ds"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the poll failed: {stderr}");
    assert!(
        stderr.contains(&format!("change {} is not in the changelog", last - 1)),
        "{stderr}"
    );
    assert!(
        !connector.ok(&["account", "show", "lou"]).contains("Lou Four"),
        "nothing after the gap was applied as if the poll were whole"
    );
}

#[test]
fn local_objects_reach_389_ds_and_the_lock_goes_both_ways() {
    let Some(ds) = Ds389::shared() else { return };
    let base = format!("ou=sync-outbound,{BASE}");
    ds.ldapmodify(&format!(
        "dn: {base}\nchangetype: add\nobjectClass: organizationalUnit\n"
    ));
    let connector = connector(&base, &base, "both", ds);
    connector.ok(&["account", "add", "olga", "--set", "mail=olga@example.com"]);
    connector.ok(&["account", "add", "pete", "--set", "display_name=Pete P"]);
    connector.ok(&[
        "group",
        "add",
        "outbound",
        "--set",
        "members=olga",
        "--set",
        "members=pete",
    ]);
    let report = connector.sync();
    assert!(report.contains("create in directory account olga"), "{report}");
    let olga = ds.search(&[
        "-b",
        &base,
        "(uid=olga)",
        "mail",
        "cn",
        "sn",
        "objectClass",
        "nsAccountLock",
    ]);
    assert!(
        olga.contains(&format!("dn: uid=olga,{base}"))
            && olga.contains("cn: olga")
            && olga.contains("objectClass: inetOrgPerson")
            && !olga.contains("nsAccountLock"),
        "{olga}"
    );
    assert!(
        ds.search(&["-b", &base, "(uid=pete)", "displayName"])
            .contains("displayName: Pete P")
    );
    let group = ds.search(&["-b", &base, "(cn=outbound)", "member"]);
    assert!(
        group.contains(&format!("member: uid=olga,{base}")) && group.contains(&format!("member: uid=pete,{base}")),
        "{group}"
    );

    // Disabled here: locked there; unlocked there: enabled here.
    connector.ok(&["account", "set", "olga", "--disable"]);
    connector.sync();
    assert!(
        ds.search(&["-b", &base, "(uid=olga)", "nsAccountLock"])
            .contains("nsAccountLock: TRUE")
    );
    ds.ldapmodify(&format!(
        "dn: uid=olga,{base}\nchangetype: modify\ndelete: nsAccountLock\n"
    ));
    connector.sync();
    assert!(connector.ok(&["account", "show", "olga"]).contains("enabled: true"));
    let again = connector.sync();
    assert!(again.contains(" 0 updated"), "settled: {again}");
}

#[test]
fn mass_deletes_in_389_ds_are_held_by_the_guard() {
    let Some(ds) = Ds389::shared() else { return };
    let base = format!("ou=sync-guard,{BASE}");
    let mut ldif = format!("dn: {base}\nchangetype: add\nobjectClass: organizationalUnit\n\n");
    for i in 0..6 {
        ldif.push_str(&format!(
            "dn: uid=g{i},{base}\nchangetype: add\nobjectClass: inetOrgPerson\nuid: g{i}\ncn: G\nsn: G\n\n"
        ));
    }
    ds.ldapmodify(&ldif);
    let connector = connector(&base, &base, "ldap-to-local", ds).with("max_delete_percent = 100", "max_deletes = 2");
    connector.sync();
    let deletes: String = (0..4)
        .map(|i| format!("dn: uid=g{i},{base}\nchangetype: delete\n\n"))
        .collect();
    ds.ldapmodify(&deletes);
    let out = connector
        .command(&["sync", "run", "--connector", "ds", "--full"])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "a pass with deletes held says so by its exit code"
    );
    assert!(report.contains("4 deletes held"), "{report}");
    let listed = connector.ok(&["account", "list"]);
    assert!(!listed.contains("(disabled)"), "nothing disabled while held: {listed}");
}

#[test]
fn writes_through_the_relay_reach_the_store_by_capture() {
    let Some(ds) = Ds389::shared() else { return };
    let base = format!("ou=sync-capture,{BASE}");
    ds.ldapmodify(&format!(
        "dn: {base}\nchangetype: add\nobjectClass: organizationalUnit\n\n\
         dn: uid=cara,{base}\nchangetype: add\nobjectClass: inetOrgPerson\nuid: cara\ncn: Cara\nsn: C\n"
    ));
    let connector = connector(&base, &base, "ldap-to-local", ds).with(
        "conflict = \"ldap-wins\"",
        "poll_interval = \"1h\"\nreconcile_interval = \"24h\"",
    );
    connector.sync();
    let config = std::fs::read_to_string(connector.config()).unwrap();
    let (_dir, served) = serve_config(&config);
    let write = with_stdin(
        "ldapmodify",
        &["-x", "-H", &served.url, "-D", DS_ADMIN_DN, "-w", DS_ADMIN_PASSWORD],
        &format!("dn: uid=cara,{base}\nchangetype: modify\nreplace: mail\nmail: cara@captured.example\n"),
    );
    assert!(write.status.success(), "{write:?}");
    assert!(
        eventually(|| connector
            .ok(&["account", "show", "cara"])
            .contains("mail: cara@captured.example")),
        "the captured write reached the store without a poll"
    );
    let journal = connector.ok(&["journal"]);
    assert!(journal.contains("capture"), "{journal}");
    let (exit, _) = served.terminate();
    assert!(exit.success());
}

#[test]
fn with_entry_uuid_as_the_id_detection_takes_the_changelog_not_content_sync() {
    let Some(ds) = Ds389::shared() else { return };
    let _changelog = CHANGELOG.lock().unwrap_or_else(|e| e.into_inner());
    let base = format!("ou=sync-entryuuid,{BASE}");
    ds.ldapmodify(&format!(
        "dn: {base}\nchangetype: add\nobjectClass: organizationalUnit\n\n\
         dn: uid=una,{base}\nchangetype: add\nobjectClass: inetOrgPerson\nuid: una\ncn: Una\nsn: U\n"
    ));
    // Content Synchronization would name entries by nsUniqueId.
    let connector =
        connector(&base, &base, "ldap-to-local", ds).with("preset = \"389ds\"", "id_attribute = \"entryUUID\"");
    assert!(connector.sync().starts_with("full reconciliation (changelog)"));
    let uuid = ds
        .search(&["-b", &base, "(uid=una)", "entryUUID"])
        .lines()
        .find_map(|l| l.strip_prefix("entryUUID: ").map(str::to_owned))
        .expect("an entryUUID");
    assert!(
        connector
            .ok(&["association", "show", "una", "--connector", "ds"])
            .contains(&uuid)
    );
    ds.ldapmodify(&format!("dn: uid=una,{base}\nchangetype: delete\n"));
    let polled = connector.sync();
    assert!(polled.starts_with("incremental poll (changelog)"), "{polled}");
    assert!(polled.contains("disabled account una"), "{polled}");
}

#[test]
fn a_cookie_the_directory_no_longer_takes_means_a_refresh_from_the_start() {
    let Some(ds) = Ds389::shared() else { return };
    let base = format!("ou=sync-cookie,{BASE}");
    ds.ldapmodify(&format!(
        "dn: {base}\nchangetype: add\nobjectClass: organizationalUnit\n\n\
         dn: uid=cody,{base}\nchangetype: add\nobjectClass: inetOrgPerson\nuid: cody\ncn: Cody\nsn: C\n\n\
         dn: uid=cleo,{base}\nchangetype: add\nobjectClass: inetOrgPerson\nuid: cleo\ncn: Cleo\nsn: C\n"
    ));
    let connector = connector(&base, &base, "ldap-to-local", ds);
    assert!(connector.sync().starts_with("full reconciliation (syncrepl)"));
    // A cookie of the same server on another port, as after a move.
    let db = rusqlite::Connection::open(connector.dir.path().join("ldapsync.db")).unwrap();
    let cookie = format!("localhost:1#{DS_ADMIN_DN}:{base}:(objectClass=inetOrgPerson)#1");
    let changed = db
        .execute(
            "UPDATE watermarks SET value = ?1 WHERE connector = 'ds'",
            [cookie.as_bytes()],
        )
        .unwrap();
    assert_eq!(changed, 2, "both categories' watermarks");
    drop(db);
    ds.ldapmodify(&format!(
        "dn: uid=cleo,{base}\nchangetype: delete\n\n\
         dn: uid=cody,{base}\nchangetype: modify\nreplace: mail\nmail: cody@example.com\n"
    ));
    let polled = connector.sync();
    assert!(polled.starts_with("incremental poll (syncrepl)"), "{polled}");
    assert!(
        polled.contains("full reconciliation due: the directory refused the stored sync cookie"),
        "{polled}"
    );
    let reconciled = connector.sync();
    assert!(reconciled.starts_with("full reconciliation (syncrepl)"), "{reconciled}");
    assert!(reconciled.contains("disabled account cleo"), "{reconciled}");
    assert!(
        connector
            .ok(&["account", "show", "cody"])
            .contains("mail: cody@example.com")
    );
    let settled = connector.sync();
    assert!(
        settled.starts_with("incremental poll (syncrepl)") && settled.contains(" 0 updated"),
        "on a new cookie: {settled}"
    );
}

#[test]
fn local_to_ldap_creates_in_389_ds_and_puts_its_edits_back() {
    let Some(ds) = Ds389::shared() else { return };
    let base = format!("ou=sync-local-first,{BASE}");
    ds.ldapmodify(&format!(
        "dn: {base}\nchangetype: add\nobjectClass: organizationalUnit\n"
    ));
    let connector = connector(&base, &base, "local-to-ldap", ds);
    connector.ok(&["account", "add", "lena", "--set", "mail=lena@example.com"]);
    let report = connector.sync();
    assert!(report.contains("create in directory account lena"), "{report}");
    ds.ldapmodify(&format!(
        "dn: uid=lena,{base}\nchangetype: modify\nreplace: mail\nmail: edited@in-389.example\n\n\
         dn: uid=lena,{base}\nchangetype: modify\nreplace: nsAccountLock\nnsAccountLock: TRUE\n"
    ));
    let report = connector.sync();
    assert!(report.contains("overwritten account lena"), "{report}");
    let lena = ds.search(&["-b", &base, "(uid=lena)", "mail", "nsAccountLock"]);
    assert!(
        lena.contains("mail: lena@example.com") && !lena.contains("nsAccountLock"),
        "the local values, the lock lifted: {lena}"
    );
}

#[test]
fn a_subtree_renamed_in_389_ds_brings_a_full_reconciliation() {
    let Some(ds) = Ds389::shared() else { return };
    let _changelog = CHANGELOG.lock().unwrap_or_else(|e| e.into_inner());
    let base = format!("ou=sync-subtree,{BASE}");
    ds.ldapmodify(&format!(
        "dn: {base}\nchangetype: add\nobjectClass: organizationalUnit\n\n\
         dn: ou=old,{base}\nchangetype: add\nobjectClass: organizationalUnit\n\n\
         dn: uid=sam,ou=old,{base}\nchangetype: add\nobjectClass: inetOrgPerson\nuid: sam\ncn: Sam\nsn: S\n"
    ));
    let connector =
        connector(&base, &base, "ldap-to-local", ds).with("conflict = \"ldap-wins\"", "poll_mechanism = \"changelog\"");
    connector.sync();
    // The changelog names the OU alone; sam moved with it.
    ds.ldapmodify(&format!(
        "dn: ou=old,{base}\nchangetype: modrdn\nnewrdn: ou=new\ndeleteoldrdn: 1\n"
    ));
    let polled = connector.sync();
    assert!(
        polled.contains(&format!("full reconciliation due: ou=new,{base} was renamed")),
        "{polled}"
    );
    let reconciled = connector.sync();
    assert!(
        reconciled.starts_with("full reconciliation (changelog)"),
        "{reconciled}"
    );
    let association = connector.ok(&["association", "show", "sam", "--connector", "ds"]);
    assert!(association.contains(&format!("uid=sam,ou=new,{base}")), "{association}");
}
