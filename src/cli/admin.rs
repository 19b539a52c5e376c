//! The administrative commands: local accounts and groups, associations,
//! sync passes, status and the journal. They work on the database named in
//! the config file; only `sync run` talks to the directory.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

use super::output::outln;
use crate::admin::{self, AssociationView, DeleteOptions, Deleted, ObjectEdit, ObjectView};
use crate::config::{Config, ConnectorConfig, Preset, Secret};
use crate::directory::{Directory, DirectoryOps, PasswordKind};
use crate::model::{Action, Category, ChangeSource, Role};
use crate::store::{self, AnyStore, JournalEntry, JournalQuery, Store, now};
use crate::sync::engine::{LinkTarget, PassOptions, Report};
use crate::sync::progress::{Bar, Lines, Progress};
use crate::worker::{self, Poll};

#[derive(Debug, Subcommand)]
pub enum ObjectCommand {
    /// Create a local object.
    Add {
        name: String,
        #[command(flatten)]
        edit: Edit,
    },
    /// Change a local object's fields.
    Set {
        name: String,
        #[command(flatten)]
        edit: Edit,
    },
    /// Delete a local object. An associated one is deleted as its
    /// connector says: the entry deleted, disabled or kept (the delete
    /// policy, under the mass-delete guard); refused under ldap-to-local.
    Rm {
        name: String,
        /// Delete it locally only, whatever its connector says (under
        /// ldap-to-local the next full pass brings it back).
        #[arg(long)]
        force: bool,
        /// Apply the delete past the mass-delete guard.
        #[arg(long)]
        confirm_deletes: bool,
    },
    /// Show one object with its associations.
    Show { name: String },
    /// List all objects of this kind.
    List,
}

#[derive(Debug, Args)]
pub struct Edit {
    /// FIELD=VALUE: replaces the field; repeat the field for several values.
    #[arg(long = "set", value_name = "FIELD=VALUE")]
    set: Vec<String>,
    /// FIELD=VALUE: adds a value (e.g. --add members=alice).
    #[arg(long = "add", value_name = "FIELD=VALUE")]
    add: Vec<String>,
    /// FIELD=VALUE: removes a value.
    #[arg(long = "remove", value_name = "FIELD=VALUE")]
    remove: Vec<String>,
    /// FIELD: removes every value of the field.
    #[arg(long = "unset", value_name = "FIELD")]
    unset: Vec<String>,
    /// New name.
    #[arg(long)]
    rename: Option<String>,
    #[arg(long, conflicts_with = "enable")]
    disable: bool,
    #[arg(long)]
    enable: bool,
    /// Accept fields no connector maps (kept locally, synced nowhere).
    #[arg(long)]
    unmapped: bool,
}

#[derive(Debug, Subcommand)]
pub enum AssociationCommand {
    /// List associations.
    List {
        #[arg(long)]
        connector: Option<String>,
    },
    /// Show the association of one object.
    Show {
        name: String,
        #[arg(long)]
        connector: String,
        #[arg(long, default_value = "account")]
        category: Category,
    },
    /// Remove an association: the next sync matches the object afresh.
    Remove {
        name: String,
        #[arg(long)]
        connector: String,
        #[arg(long, default_value = "account")]
        category: Category,
    },
    /// Say which directory entry an object belongs to (the way out of a
    /// dispute); refused if either is associated already. The pair is then
    /// synced as at a first sync.
    Link {
        name: String,
        #[arg(long)]
        connector: String,
        #[arg(long, default_value = "account")]
        category: Category,
        /// The entry, by DN.
        #[arg(long, required_unless_present = "entry_id", conflicts_with = "entry_id")]
        dn: Option<String>,
        /// The entry, by its stable id (entryUUID, objectGUID).
        #[arg(long)]
        entry_id: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum SyncCommand {
    /// Poll a connector now: the changes since its watermark, or a full
    /// reconciliation when one is due or asked for.
    Run {
        #[arg(long)]
        connector: String,
        /// Compare every entry in scope with its baseline.
        #[arg(long)]
        full: bool,
        /// Print the plan of a full reconciliation; change nothing on either side.
        #[arg(long)]
        dry_run: bool,
        /// Apply deletes even when they exceed the mass-delete guard (a full reconciliation).
        #[arg(long)]
        confirm_deletes: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Copy every table, ids kept, into an empty store, and verify it (row
    /// counts and a checksum per table). Each side is `sqlite:PATH` or a
    /// `postgresql://` URL (its password from `[store]` password_file or
    /// password_env, TLS from `[store.tls]`).
    Copy {
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
    },
}

/// API tokens for scripts calling the admin API (`Authorization: Bearer`).
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token; it is printed once, and only its SHA-256 is kept.
    Create {
        name: String,
        /// `admin` (read and change) or `auditor` (read only).
        #[arg(long, default_value = "auditor")]
        role: Role,
    },
    /// The tokens: names, roles, who created them, when last used.
    List,
    /// Revoke a token: requests carrying it are refused from now on.
    Revoke { name: String },
}

#[derive(Debug, Args)]
pub struct JournalArgs {
    #[arg(long)]
    connector: Option<String>,
    #[arg(long)]
    object: Option<String>,
    /// The most recent N lines (0: all).
    #[arg(long, default_value_t = 50)]
    limit: usize,
}

pub(super) fn open_store(config: &Config) -> anyhow::Result<AnyStore> {
    Ok(store::open(&config.store)?)
}

fn parse_pair(text: &str) -> anyhow::Result<(String, String)> {
    match text.split_once('=') {
        Some((field, value)) if !field.is_empty() => Ok((field.to_owned(), value.to_owned())),
        _ => bail!("{text:?} is not FIELD=VALUE"),
    }
}

impl Edit {
    /// The edit as the admin core takes it.
    fn to_edit(&self) -> anyhow::Result<ObjectEdit> {
        let grouped = |pairs: &[String]| -> anyhow::Result<BTreeMap<String, Vec<String>>> {
            let mut fields: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for pair in pairs {
                let (field, value) = parse_pair(pair)?;
                fields.entry(field).or_default().push(value);
            }
            Ok(fields)
        };
        Ok(ObjectEdit {
            set: grouped(&self.set)?,
            add: grouped(&self.add)?,
            remove: grouped(&self.remove)?,
            unset: self.unset.clone(),
            rename: self.rename.clone(),
            enabled: match (self.enable, self.disable) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            },
            unmapped: self.unmapped,
        })
    }
}

/// Prints `value` as pretty JSON (for `--json`).
fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    outln!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

pub fn object(config: &Config, category: Category, command: ObjectCommand, json: bool) -> anyhow::Result<()> {
    let mut store = open_store(config)?;
    match command {
        ObjectCommand::Add { name, edit } => {
            let object = admin::create(config, &mut store, category, &name, &edit.to_edit()?, &operator())?;
            outln!("{category} {} added", object.name);
        }
        ObjectCommand::Set { name, edit } => {
            let object = admin::edit(config, &mut store, category, &name, &edit.to_edit()?, &operator())?;
            outln!("{category} {} updated", object.name);
        }
        ObjectCommand::Rm {
            name,
            force,
            confirm_deletes,
        } => {
            let options = DeleteOptions { force, confirm_deletes };
            let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
            let deleted = runtime.block_on(admin::delete(config, &mut store, category, &name, options, &operator()))?;
            let outcome = match deleted {
                Deleted::Locally => {
                    outln!("{category} {name} removed");
                    return Ok(());
                }
                Deleted::ByConnector(outcome) => outcome,
            };
            if json {
                return print_json(&outcome);
            }
            for line in &outcome.lines {
                outln!("{line}");
            }
            if outcome.report.failed > 0 {
                bail!("{category} {name} could not be deleted; see `ldapsync journal --object {name}`");
            }
        }
        ObjectCommand::Show { name } => {
            let ObjectView { object, associations } = admin::show(&store, category, &name)?;
            if json {
                return print_json(&serde_json::json!({ "object": object, "associations": associations }));
            }
            outln!("{category} {}", object.name);
            outln!("  enabled: {}", object.enabled);
            // One line per value, as LDIF does: a value may hold ", ".
            for (field, values) in &object.values {
                for value in values {
                    outln!("  {field}: {value}");
                }
            }
            for a in &associations {
                let gone = if a.entry_gone { " (entry gone)" } else { "" };
                outln!("  associated via {}: {} at {}{gone}", a.connector, a.entry_id, a.dn);
            }
        }
        ObjectCommand::List => {
            let objects = store.objects(category)?;
            if json {
                return print_json(&objects);
            }
            for object in objects {
                let flag = if object.enabled { "" } else { " (disabled)" };
                outln!("{}{flag}", object.name);
            }
        }
    }
    Ok(())
}

pub fn association(config: &Config, command: AssociationCommand, json: bool) -> anyhow::Result<()> {
    if let AssociationCommand::List {
        connector: Some(connector),
    }
    | AssociationCommand::Show { connector, .. }
    | AssociationCommand::Remove { connector, .. }
    | AssociationCommand::Link { connector, .. } = &command
    {
        config.require_connector(connector)?;
    }
    let mut store = open_store(config)?;
    match command {
        AssociationCommand::List { connector } => {
            let listed = admin::associations(config, &store, connector.as_deref())?;
            if json {
                return print_json(&listed);
            }
            for AssociationView {
                category,
                name,
                association: a,
            } in listed
            {
                let name = match (category, name) {
                    (Some(category), Some(name)) => format!("{category} {name}"),
                    _ => String::new(),
                };
                let gone = if a.entry_gone { " (entry gone)" } else { "" };
                outln!("{}\t{name}\t{}\t{}{gone}", a.connector, a.entry_id, a.dn);
            }
        }
        AssociationCommand::Show {
            name,
            connector,
            category,
        } => {
            let a = admin::association(config, &store, &connector, category, &name)?;
            if json {
                return print_json(&serde_json::json!({ "category": category, "name": name, "association": a }));
            }
            outln!("{category} {name} ↔ {}", a.entry_id);
            outln!("  connector: {}", a.connector);
            outln!(
                "  last seen at: {}{}",
                a.dn,
                if a.entry_gone { " (entry gone)" } else { "" }
            );
            outln!("  last synced: {}", timestamp(a.synced_at));
            for (field, values) in &a.baseline {
                for value in values {
                    outln!("  baseline {field}: {value}");
                }
            }
        }
        AssociationCommand::Remove {
            name,
            connector,
            category,
        } => {
            admin::remove_association(config, &mut store, &connector, category, &name, &operator())?;
            outln!("association of {category} {name} with connector {connector} removed");
        }
        AssociationCommand::Link {
            name,
            connector,
            category,
            dn,
            entry_id,
        } => {
            let target = match (dn, entry_id) {
                (Some(dn), _) => LinkTarget::Dn(dn),
                (None, Some(id)) => LinkTarget::EntryId(id),
                (None, None) => bail!("name the entry with --dn or --entry-id"),
            };
            let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
            let operator = operator();
            let linked = admin::link(config, &mut store, &connector, category, &name, &target, &operator);
            let outcome = runtime.block_on(linked)?;
            if json {
                print_json(&outcome)?;
            } else {
                for line in &outcome.lines {
                    outln!("{line}");
                }
            }
            if outcome.report.failed > 0 {
                bail!("the pair was linked but could not be synced; see `ldapsync journal --object {name}`");
            }
        }
    }
    Ok(())
}

/// Runs `work` over a fresh service connection of `connector`, and closes
/// the connection however the work ends.
fn with_directory<T>(
    config: &Config,
    connector: &ConnectorConfig,
    password: &Secret,
    work: impl AsyncFnOnce(&mut Directory) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
    runtime.block_on(async {
        let mut directory = Directory::connect(connector, password.expose(), config.proxy.connect_timeout).await?;
        let result = work(&mut directory).await;
        directory.close().await;
        result
    })
}

/// Who runs an administrative command, for the journal.
fn operator() -> String {
    std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| format!("uid {}", rustix::process::getuid().as_raw()))
}

/// Sets an account's password in the directory its connector syncs with:
/// read from standard input, sent over TLS only, never stored or logged.
pub fn password(config: &Config, name: &str, connector: &str) -> anyhow::Result<()> {
    let connector = config.require_connector(connector)?;
    let starttls = connector.tls.as_ref().is_some_and(|t| t.starttls);
    if let Some(url) = connector.upstream.iter().find(|u| !u.is_ldaps() && !starttls) {
        bail!(
            "a password must not cross the network in clear text: connector {} reaches {url} without TLS; \
             use an ldaps:// URL or upstream_tls.starttls = true",
            connector.name
        );
    }
    let scope = connector
        .accounts
        .as_ref()
        .with_context(|| format!("connector {} syncs no accounts", connector.name))?;
    let mut store = open_store(config)?;
    let object = admin::find(&store, Category::Account, name)?;
    let association = store
        .association_by_object(&connector.name, object.id)?
        .with_context(|| {
            format!(
                "account {name} is not associated with an entry of connector {}",
                connector.name
            )
        })?;
    let mut password = String::new();
    std::io::stdin()
        .read_line(&mut password)
        .context("reading the password from standard input")?;
    let password = password.trim_end_matches(['\n', '\r']);
    if password.is_empty() {
        bail!("no password on standard input");
    }
    let kind = match connector.preset {
        Some(Preset::ActiveDirectory) => PasswordKind::UnicodePwd,
        // 389 DS implements the Password Modify extended operation too.
        Some(Preset::Ds389) | None => PasswordKind::PasswordModify,
    };
    let secret = connector.password()?;
    let dn = with_directory(config, &connector, &secret, async |directory| {
        let entry = directory
            .entry_by_id(scope, &association.entry_id)
            .await?
            .with_context(|| format!("the entry of account {name} is no longer in scope"))?;
        directory.set_password(&entry.dn, password, kind).await?;
        Ok(entry.dn)
    })?;
    let entry = JournalEntry {
        at: now(),
        connector: connector.name.clone(),
        category: Category::Account,
        object: name.to_owned(),
        source: ChangeSource::Local,
        action: Action::PasswordSet,
        policy: String::new(),
        detail: serde_json::json!({ "dn": dn }).to_string(),
    };
    store.commit(crate::store::Commit {
        journal: vec![entry],
        ..Default::default()
    })?;
    outln!("password of account {name} set at {dn}");
    Ok(())
}

/// A report as `--json` prints it: its counts and every line.
fn report_json(connector: &str, report: &Report) -> serde_json::Value {
    let mut value = serde_json::to_value(report).expect("a report serializes");
    value["connector"] = connector.into();
    value["lines"] = report.all_lines().cloned().collect::<Vec<_>>().into();
    value
}

pub fn sync(config: &Config, command: SyncCommand, json: bool) -> anyhow::Result<()> {
    let SyncCommand::Run {
        connector,
        full,
        dry_run,
        confirm_deletes,
    } = command;
    let connector = config.require_connector(&connector)?;
    let mut store = open_store(config)?;
    let poll = if full || dry_run || confirm_deletes {
        Poll::Full(PassOptions {
            dry_run,
            confirm_deletes,
        })
    } else {
        Poll::Due
    };
    let mut progress: Box<dyn Progress> = if std::io::stderr().is_terminal() {
        Box::new(Bar::default())
    } else {
        Box::new(Lines::new(|line| eprintln!("{line}"), Duration::from_secs(10)))
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
    let outcome = runtime.block_on(admin::sync(
        config,
        &mut store,
        &connector.name,
        poll,
        progress.as_mut(),
    ))?;
    let report = &outcome.report;
    if json {
        let mut value = report_json(&connector.name, report);
        value["kind"] = serde_json::to_value(outcome.kind)?;
        value["mechanism"] = outcome.mechanism.to_string().into();
        value["dry_run"] = dry_run.into();
        print_json(&value)?;
    } else {
        print_report(&connector.name, &outcome, dry_run);
    }
    if report.failed > 0 {
        bail!("{} objects could not be synced; see `ldapsync journal`", report.failed);
    }
    if report.disputed > 0 || report.deletes_held > 0 {
        return Err(super::Exit::NeedsAttention(format!(
            "{} disputed, {} deletes held (see above)",
            report.disputed, report.deletes_held
        ))
        .into());
    }
    Ok(())
}

fn print_report(connector: &str, outcome: &worker::PollOutcome, dry_run: bool) {
    let report = &outcome.report;
    if dry_run {
        outln!("dry run: nothing was changed; the plan:");
    } else {
        outln!("{} ({})", outcome.kind.as_str(), outcome.mechanism);
    }
    for line in report.all_lines() {
        outln!("  {line}");
    }
    outln!(
        "{}: {} associated, {} created locally, {} created in the directory, {} updated, {} converged, \
         {} conflicts, {} disputed, {} deleted, {} disabled, {} deletes refused, {} deletes held, {} failed",
        connector,
        report.associated,
        report.created_local,
        report.created_ldap,
        report.updated,
        report.converged,
        report.conflicts,
        report.disputed,
        report.deleted,
        report.disabled,
        report.deletes_refused,
        report.deletes_held,
        report.failed
    );
}

pub fn journal(config: &Config, args: JournalArgs, json: bool) -> anyhow::Result<()> {
    let store = open_store(config)?;
    let query = JournalQuery {
        connector: args.connector,
        object: args.object,
        limit: args.limit,
        ..JournalQuery::default()
    };
    let lines = admin::journal(config, &store, &query)?;
    let entries = lines.into_iter().map(|l| l.entry);
    if json {
        let entries: Vec<serde_json::Value> = entries
            .map(|e| {
                let mut value = serde_json::to_value(&e).expect("a journal line serializes");
                value["at"] = timestamp(e.at).into();
                value["detail"] = serde_json::from_str(&e.detail).unwrap_or_else(|_| e.detail.clone().into());
                value
            })
            .collect();
        return print_json(&entries);
    }
    for e in entries {
        let connector = if e.connector.is_empty() { "-" } else { &e.connector };
        let policy = if e.policy.is_empty() { "-" } else { &e.policy };
        outln!(
            "{}\t{connector}\t{} {}\t{}\t{}\t{policy}\t{}",
            timestamp(e.at),
            e.category,
            e.object,
            e.source.as_str(),
            e.action,
            e.detail
        );
    }
    Ok(())
}

/// Seconds since the epoch as RFC 3339 UTC, for people.
pub(super) use crate::admin::timestamp;

/// The store one side of `store copy` names, with `[store]`'s password and
/// TLS settings for PostgreSQL.
fn store_named(config: &Config, name: &str) -> anyhow::Result<AnyStore> {
    let mut settings = config.store.clone();
    match name.strip_prefix("sqlite:") {
        Some(path) => {
            settings.path = path.into();
            settings.url = None;
        }
        None if name.starts_with("postgresql://") || name.starts_with("postgres://") => {
            settings.url = Some(name.to_owned());
        }
        None => anyhow::bail!("{name:?}: say sqlite:PATH or postgresql://user@host/database"),
    }
    Ok(store::open(&settings)?)
}

pub fn token(config: &Config, command: TokenCommand, json: bool) -> anyhow::Result<()> {
    let mut store = open_store(config)?;
    match command {
        TokenCommand::Create { name, role } => {
            let token = admin::create_token(&mut store, &name, role, &operator())?;
            if json {
                print_json(&serde_json::json!({ "name": name, "role": role, "token": token }))?;
            } else {
                outln!("{token}");
                eprintln!("API token {name:?} ({role}) created: it is shown this once, keep it secret");
            }
        }
        TokenCommand::List => {
            let tokens = admin::tokens(&store)?;
            if json {
                return print_json(&tokens);
            }
            for t in tokens {
                let used = t
                    .last_used_at
                    .map_or_else(|| "never used".into(), |at| format!("last used {}", timestamp(at)));
                outln!(
                    "{}\t{}\tcreated {} by {}\t{used}",
                    t.name,
                    t.role,
                    timestamp(t.created_at),
                    t.created_by
                );
            }
        }
        TokenCommand::Revoke { name } => {
            admin::revoke_token(&mut store, &name)?;
            outln!("API token {name:?} revoked");
        }
    }
    Ok(())
}

pub fn store_command(config: &Config, command: StoreCommand, json: bool) -> anyhow::Result<()> {
    let StoreCommand::Copy { from, to } = command;
    let source = store_named(config, &from)?;
    let mut target = store_named(config, &to)?;
    let tables = store::copy::copy(&source, &mut target)?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&tables)?);
    } else {
        for t in &tables {
            outln!("{:<16} {:>8} rows  sha256 {}", t.table, t.rows, t.sha256);
        }
        outln!("copied and verified: every table of the target equals the source's");
    }
    Ok(())
}
