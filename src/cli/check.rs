//! `ldapsync check-config FILE`: every problem of a configuration, each
//! with its key and a hint, and the connectors' mappings checked against
//! the directory's schema when it can be reached.

use std::collections::BTreeSet;
use std::path::Path;

use super::output::outln;
use crate::config::{ClientTlsConfig, Config, ConfigError, ConnectorConfig, LdapUrl};
use crate::directory::Directory;
use crate::store::{self, SqliteStore};
use crate::tls::{self, ServerTls};

/// A hint for the operator, by what the problem concerns.
fn hint(problem: &ConfigError) -> &'static str {
    match problem {
        ConfigError::Read { .. } => "check the path and that the ldapsync user may read it",
        ConfigError::Parse { .. } => "TOML syntax, or a key this version does not know (see docs/configuration.md)",
        ConfigError::NoUpstream => "proxy.upstream = [\"ldap://dir.example.com\"]",
        ConfigError::NoListener => "proxy.listen = [\"ldap://127.0.0.1:3389\"]",
        ConfigError::UnknownUpstream { .. } => {
            "write the URL exactly as in proxy.upstream, e.g. [proxy.weight] \"ldap://dir1.example.com\" = 2"
        }
        ConfigError::OutOfRange { .. } => "limits and timeouts must lie within the range the message gives",
        ConfigError::Overlap { .. } => "give each connector its own subtree, or narrow one of the bases",
        ConfigError::UnknownConnector { .. } => "connector names are the `name` keys of the [[connector]] tables",
        ConfigError::DuplicateConnector(_) => {
            "connector names identify associations and journal lines: make them unique"
        }
        ConfigError::NoCertificate { .. } => "[proxy.tls] cert = \"cert.pem\", key = \"key.pem\"",
        ConfigError::NoPassthroughUpstream { .. } => {
            "add a directory URL of the listener's scheme, or let ldapsync end TLS (tls = \"terminate\")"
        }
        ConfigError::Admin { .. } => "see docs/admin-api.md: [admin] listen, connector, admin_group, auditor_group",
        ConfigError::Multiplex { .. } => {
            "see docs/relay.md, \"Multiplexed listeners\": [proxy.multiplex] bind_dn, password_file, connections"
        }
        ConfigError::Webhook { .. } => {
            "see docs/change-feed.md: [[webhook]] name, url (https://), secret_file or secret_env"
        }
        ConfigError::ClientCertificate => "a client certificate needs its key, and the other way round",
        ConfigError::Store { key, .. } => match key.as_str() {
            "url" => "store.url = \"postgresql://ldapsync@db.example.com:5432/ldapsync\", the password apart",
            "password_file" | "password_env" => "PostgreSQL's password: one readable file, or one set variable",
            _ => "see docs/configuration.md, [store]",
        },
        ConfigError::Connector { key, .. } => match key.rsplit('.').next().unwrap_or_default() {
            "password_file" | "password_env" => "the service password: one readable file, or one set variable",
            "bind_dn" | "base" => "a DN, e.g. ou=people,dc=example,dc=com",
            "filter" => "an RFC 4515 filter in parentheses, e.g. (objectClass=inetOrgPerson)",
            "membership" => "member or uniqueMember (DNs), memberUid (names); groups only",
            "map" => "the naming attribute already feeds the local name; map other attributes",
            _ => "see docs/configuration.md",
        },
    }
}

/// What `serve` would refuse at start beyond the file's own checks: TLS
/// material that does not load, a log filter or metrics address that does
/// not parse, a store that cannot be used. check-config and serve run the
/// same checks; `create_store` is serve's: it opens (creating) the store.
pub fn startup_problems(config: &Config, create_store: bool) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(paths) = &config.proxy.tls
        && let Err(e) = ServerTls::load(paths)
    {
        problems.push(format!("proxy.tls: {e}"));
    }
    let needs_tls = |tls: &ClientTlsConfig, urls: &[LdapUrl]| tls.starttls || urls.iter().any(|u| u.is_ldaps());
    if needs_tls(&config.proxy.upstream_tls, &config.proxy.upstream)
        && let Err(e) = tls::client_config(&config.proxy.upstream_tls)
    {
        problems.push(format!("proxy.upstream_tls: {e}"));
    }
    for name in config.connectors.iter().map(|c| &c.name) {
        if let Some(c) = config.connector(name)
            && let Some(tls) = &c.tls
            && needs_tls(tls, &c.upstream)
            && let Err(e) = tls::client_config(tls)
        {
            problems.push(format!("connector {name:?}: tls: {e}"));
        }
    }
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&config.log.level) {
        problems.push(format!("log.level {:?} is not a log filter: {e}", config.log.level));
    }
    if let Some(addr) = &config.metrics.listen
        && let Err(e) = std::net::ToSocketAddrs::to_socket_addrs(addr.as_str())
    {
        problems.push(format!("metrics.listen {addr:?} is not host:port: {e}"));
    }
    if !config.connectors.is_empty() {
        match &config.store.url {
            None => {
                if let Err(e) = store_usable(&config.store.path, create_store) {
                    problems.push(format!(
                        "store.path {}: {e} (the connectors need it; without connectors ldapsync relays without a store)",
                        config.store.path.display()
                    ));
                }
            }
            // check-config only reaches it. serve does not wait for it:
            // the relay never depends on the store, and the workers open
            // (and migrate) it when it is there.
            Some(_) if !create_store => {
                if let Err(e) = store::reach(&config.store) {
                    problems.push(format!("{e} (the connectors need the store)"));
                }
            }
            Some(_) => {}
        }
    }
    problems
}

/// Whether the store can be opened: by opening it (creating it if need be)
/// for serve, and without creating or changing anything for check-config.
fn store_usable(path: &Path, create: bool) -> Result<(), String> {
    store_looks_usable(path)?;
    if create {
        SqliteStore::open(path).map(drop).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The store's file (or, for a new one, its folder) as check-config can
/// tell without touching it.
fn store_looks_usable(path: &Path) -> Result<(), String> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => Err("is a directory".into()),
        Ok(_) => {
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(|e| format!("cannot be opened for writing: {e}"))?;
            let mut header = Vec::new();
            std::io::Read::read_to_end(&mut std::io::Read::take(&mut file, 16), &mut header)
                .map_err(|e| e.to_string())?;
            if !header.is_empty() && header.as_slice() != b"SQLite format 3\0" {
                return Err("is not an SQLite database".into());
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let parent = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            match std::fs::metadata(parent) {
                Ok(meta) if meta.is_dir() => Ok(()),
                Ok(_) => Err(format!("{} is not a folder", parent.display())),
                Err(e) => Err(format!("its folder {}: {e}", parent.display())),
            }
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Prints every problem; true when there were none.
pub fn check(path: &Path) -> bool {
    let config = match Config::load_reporting_all(path) {
        Ok(config) => config,
        Err(problems) => {
            problems.iter().for_each(print_problem);
            outln!("{}: {} problem(s)", path.display(), problems.len());
            return false;
        }
    };
    let mut problems = config.proxy_problems();
    problems.extend(config.connector_problems());
    for problem in &problems {
        print_problem(problem);
    }
    let startup = startup_problems(&config, false);
    for problem in &startup {
        outln!("error: {problem}");
        outln!("  hint: serve would refuse to start with it");
    }
    let problems_found = problems.len() + startup.len();
    let mut schema_errors = 0;
    if problems_found == 0 {
        let runtime = tokio::runtime::Runtime::new().expect("a runtime");
        for name in config.connectors.iter().map(|c| &c.name) {
            let connector = config.connector(name).expect("configured");
            schema_errors += runtime.block_on(check_schema(&connector, &config));
        }
    }
    let total = problems_found + schema_errors;
    if total == 0 {
        outln!("{}: OK", path.display());
    } else {
        outln!("{}: {total} problem(s)", path.display());
    }
    total == 0
}

fn print_problem(problem: &ConfigError) {
    outln!("error: {problem}");
    outln!("  hint: {}", hint(problem));
}

/// Checks the attributes and object classes a connector names against the
/// directory's schema; returns how many are unknown. An unreachable
/// directory is a warning, not an error: the file may be checked anywhere.
async fn check_schema(connector: &ConnectorConfig, config: &Config) -> usize {
    let password = match connector.password() {
        Ok(password) => password,
        Err(_) => return 0,
    };
    let directory = Directory::connect(connector, password.expose(), config.proxy.connect_timeout).await;
    let mut directory = match directory {
        Ok(directory) => directory,
        Err(e) => {
            outln!(
                "warning: connector {:?}: mapping not checked against the directory: {e}",
                connector.name
            );
            return 0;
        }
    };
    let schema = directory.schema_names().await;
    directory.close().await;
    let (attributes, classes) = match schema {
        Ok(names) => names,
        Err(e) => {
            outln!(
                "warning: connector {:?}: cannot read the directory's schema: {e}",
                connector.name
            );
            return 0;
        }
    };
    let mut unknown = 0;
    let mut report = |key: String, what: &str, name: &str, known: &BTreeSet<String>| {
        if !known.contains(&name.to_lowercase()) {
            unknown += 1;
            outln!(
                "error: connector {:?}: {key}: the directory's schema has no {what} {name:?}",
                connector.name
            );
            outln!("  hint: check the spelling, or the schema the directory loads");
        }
    };
    report("id_attribute".into(), "attribute", &connector.id_attribute, &attributes);
    for (category, scope) in connector.scopes() {
        let key = |k: &str| format!("{}s.{k}", category.as_str());
        report(key("naming"), "attribute", &scope.naming, &attributes);
        for attr in scope
            .map
            .keys()
            .chain(scope.defaults.keys())
            .chain(scope.membership.iter())
        {
            report(key("map"), "attribute", attr, &attributes);
        }
        for class in &scope.object_classes {
            report(key("object_classes"), "object class", class, &classes);
        }
    }
    unknown
}
