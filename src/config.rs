//! Configuration: the TOML file, its defaults, and validation.
//!
//! Every key is documented in docs/configuration.md. Unknown keys are errors, so a typo
//! never silently falls back to a default.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::model::NAME_FIELD;
use crate::model::{Category, ChangeSource, ConflictPolicy, Direction, Fallback, Mechanism};

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("store.{key}: {message}")]
    Store { key: String, message: String },
    #[error("no upstream directory: set proxy.upstream in the config file or pass --upstream")]
    NoUpstream,
    #[error("no listener: set proxy.listen in the config file or pass --listen")]
    NoListener,
    #[error("{key} names {url:?}, which is not one of proxy.upstream")]
    UnknownUpstream { key: String, url: String },
    #[error("{key} = {value} is out of range: {range}")]
    OutOfRange { key: String, value: String, range: String },
    #[error("admin.{key}: {message}")]
    Admin { key: &'static str, message: String },
    #[error("proxy.multiplex.{key}: {message}")]
    Multiplex { key: String, message: String },
    #[error("webhook {webhook:?}: {key}: {message}")]
    Webhook {
        webhook: String,
        key: String,
        message: String,
    },
    #[error("connector {connector:?}: {key}: {message}")]
    Connector {
        connector: String,
        key: String,
        message: String,
    },
    #[error(
        "connectors {first:?} and {second:?} overlap: {first_base:?} and {second_base:?} are in one subtree, \
         so both would sync the same objects"
    )]
    Overlap {
        first: String,
        second: String,
        first_base: String,
        second_base: String,
    },
    #[error("listener {listener} needs TLS: set proxy.tls.cert and proxy.tls.key")]
    NoCertificate { listener: String },
    #[error(
        "proxy.listen: {listener} passes TLS through to the directory, which needs an {scheme}:// URL in proxy.upstream"
    )]
    NoPassthroughUpstream { listener: String, scheme: &'static str },
    #[error("proxy.upstream_tls: set client_cert and client_key together")]
    ClientCertificate,
    #[error("two connectors are named {0:?}")]
    DuplicateConnector(String),
    #[error("no connector named {name:?}{suggestion}; the config file has {known}")]
    UnknownConnector {
        name: String,
        /// ` (did you mean "…"?)`, when one is close.
        suggestion: String,
        known: String,
    },
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum UrlError {
    #[error("{url:?} is not a URL: {reason}")]
    Syntax { url: String, reason: String },
    #[error("{url:?}: scheme {scheme:?} is not supported (use ldap:// or ldaps://)")]
    Scheme { url: String, scheme: String },
    #[error("{url:?} names no host")]
    NoHost { url: String },
    #[error("{url:?}: an LDAP URL here is only scheme://host:port; remove {extra:?}")]
    Extra { url: String, extra: String },
}

/// An `ldap://host:port` or `ldaps://host:port` address of a listener or a
/// directory.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct LdapUrl {
    tls: bool,
    host: String,
    port: u16,
}

impl LdapUrl {
    /// `ldaps://`: TLS from the first byte.
    pub fn is_ldaps(&self) -> bool {
        self.tls
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    /// `host:port`, as `TcpStream::connect` and `TcpListener::bind` take it.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for LdapUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "ldaps" } else { "ldap" };
        write!(f, "{scheme}://{}", self.authority())
    }
}

impl FromStr for LdapUrl {
    type Err = UrlError;

    fn from_str(s: &str) -> Result<Self, UrlError> {
        let parsed = url::Url::parse(s).map_err(|e| UrlError::Syntax {
            url: s.to_owned(),
            reason: e.to_string(),
        })?;
        let tls = match parsed.scheme() {
            "ldap" => false,
            "ldaps" => true,
            scheme => {
                return Err(UrlError::Scheme {
                    url: s.to_owned(),
                    scheme: scheme.to_owned(),
                });
            }
        };
        let host = match parsed.host() {
            Some(url::Host::Ipv6(addr)) => addr.to_string(),
            Some(host) => host.to_string(),
            None => return Err(UrlError::NoHost { url: s.to_owned() }),
        };
        if host.is_empty() {
            return Err(UrlError::NoHost { url: s.to_owned() });
        }
        let extra = format!(
            "{}{}{}",
            parsed.path().trim_start_matches('/'),
            parsed.query().map(|q| format!("?{q}")).unwrap_or_default(),
            parsed.fragment().map(|f| format!("#{f}")).unwrap_or_default()
        );
        if !extra.is_empty() || !parsed.username().is_empty() {
            return Err(UrlError::Extra {
                url: s.to_owned(),
                extra,
            });
        }
        Ok(LdapUrl {
            tls,
            host,
            port: parsed.port().unwrap_or(if tls { 636 } else { 389 }),
        })
    }
}

impl TryFrom<String> for LdapUrl {
    type Error = UrlError;
    fn try_from(s: String) -> Result<Self, UrlError> {
        s.parse()
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub proxy: ProxyConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default, rename = "connector")]
    pub connectors: Vec<ConnectorConfig>,
    #[serde(default)]
    pub conformance: ConformanceConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default, rename = "webhook")]
    pub webhooks: Vec<WebhookConfig>,
}

/// `[[webhook]]`: changes to the local store POSTed to an application,
/// signed with HMAC-SHA256, at least once, in order, retried with
/// back-off; those still refused after `max_attempts` become dead letters.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    pub name: String,
    /// `https://…`; `http://` only to a loopback address.
    pub url: String,
    /// The signing secret, from a file (first line) or a variable.
    pub secret_file: Option<PathBuf>,
    pub secret_env: Option<String>,
    /// The categories sent; all when empty.
    #[serde(default)]
    pub categories: Vec<Category>,
    /// The sources sent (`proxy`, `poll`, `local`); all when empty.
    #[serde(default)]
    pub sources: Vec<ChangeSource>,
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// The wait before the first retry; each further one waits twice as
    /// long, up to ten minutes.
    #[serde(default = "default_retry_backoff", with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// How long one delivery may take.
    #[serde(default = "default_webhook_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_max_attempts() -> u32 {
    8
}

fn default_retry_backoff() -> Duration {
    Duration::from_secs(2)
}

fn default_webhook_timeout() -> Duration {
    Duration::from_secs(10)
}

impl WebhookConfig {
    /// The signing secret.
    pub fn secret(&self) -> Result<Secret, ConfigError> {
        let error = |key: &str, message: String| ConfigError::Webhook {
            webhook: self.name.clone(),
            key: key.replace("password", "secret"),
            message: message.replace("password", "secret"),
        };
        read_secret(&self.secret_file, &self.secret_env, error)?
            .ok_or_else(|| error("secret_file", "set secret_file or secret_env".into()))
    }

    fn problems(&self) -> Vec<ConfigError> {
        let error = |key: &str, message: String| ConfigError::Webhook {
            webhook: self.name.clone(),
            key: key.into(),
            message,
        };
        let mut problems = Vec::new();
        if self.name.is_empty() || self.name.chars().any(|c| c.is_control() || c == '/') {
            problems.push(error("name", "must be a non-empty name without '/'".into()));
        }
        match url::Url::parse(&self.url) {
            Ok(url) if url.scheme() == "https" => {}
            Ok(url) if url.scheme() == "http" => {
                let loopback = match url.host() {
                    Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                    Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                    Some(url::Host::Domain(name)) => name == "localhost",
                    None => false,
                };
                if !loopback {
                    problems.push(error(
                        "url",
                        format!(
                            "{} would send changes unencrypted: use https:// (http:// only to loopback)",
                            self.url
                        ),
                    ));
                }
            }
            Ok(_) => problems.push(error("url", format!("{:?} is not an http(s) URL", self.url))),
            Err(e) => problems.push(error("url", format!("{:?}: {e}", self.url))),
        }
        if self.secret_file.is_none() && self.secret_env.is_none() {
            problems.push(error(
                "secret_file",
                "set secret_file or secret_env: deliveries are signed".into(),
            ));
        }
        let key = |k: &str| format!("webhook {:?}: {k}", self.name);
        problems.extend(count_in(&key("max_attempts"), self.max_attempts as usize, 1, 100));
        problems.extend(duration_in(
            &key("retry_backoff"),
            self.retry_backoff,
            Duration::from_millis(100),
            Duration::from_secs(600),
        ));
        problems.extend(duration_in(
            &key("timeout"),
            self.timeout,
            Duration::from_secs(1),
            Duration::from_secs(300),
        ));
        problems
    }
}

/// `[admin]`: the HTTP admin API, off unless `listen` is set. Operators log
/// in with their directory credentials, checked against one connector's
/// directory; membership of `admin_group` lets them change things,
/// `auditor_group` read them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// `host:port`, e.g. `127.0.0.1:8389`.
    pub listen: Option<String>,
    /// HTTPS with this certificate and key (PEM; may be the listeners'
    /// `proxy.tls` files); plain HTTP when unset.
    pub tls: Option<ServerTlsConfig>,
    /// The connector whose directory and accounts scope authenticate
    /// operators; the first connector when unset.
    pub connector: Option<String>,
    /// A group entry's DN: its members (`member`, `uniqueMember`) may read
    /// and change.
    pub admin_group: Option<String>,
    /// A group entry's DN: its members may read.
    pub auditor_group: Option<String>,
    /// How long a login holds without being used.
    #[serde(with = "humantime_serde")]
    pub session_timeout: Duration,
    /// The largest request body accepted.
    pub max_body: usize,
    /// Failed logins per client address within `failed_login_window`
    /// before further logins from it are refused for that window.
    pub max_failed_logins: usize,
    #[serde(with = "humantime_serde")]
    pub failed_login_window: Duration,
    /// How long the change feed keeps a change; a reader further behind
    /// must read the objects afresh.
    #[serde(with = "humantime_serde")]
    pub feed_retention: Duration,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: None,
            tls: None,
            connector: None,
            admin_group: None,
            auditor_group: None,
            session_timeout: Duration::from_secs(30 * 60),
            max_body: 64 * 1024,
            max_failed_logins: 5,
            failed_login_window: Duration::from_secs(60),
            feed_retention: Duration::from_secs(30 * 86_400),
        }
    }
}

/// `[metrics]`: the opt-in HTTP listener for `/metrics`, `/healthz`, `/readyz`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `host:port`, e.g. `127.0.0.1:9389`; off when unset.
    pub listen: Option<String>,
}

/// `[store]`: where the local store and sync state live: a SQLite file
/// (`path`, one instance) or a PostgreSQL database (`url`, shared by
/// several instances).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// The SQLite database, when `url` is unset.
    pub path: PathBuf,
    /// `postgresql://user@host:port/database`; when set, `path` is unused.
    pub url: Option<String>,
    /// PostgreSQL's password, from a file (first line) or a variable; never in `url`.
    pub password_file: Option<PathBuf>,
    pub password_env: Option<String>,
    /// TLS to PostgreSQL (`ca`, `verify`, `client_cert`/`client_key`); plain TCP when unset.
    pub tls: Option<ClientTlsConfig>,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long a connector's lease outlives its holder's last renewal:
    /// another instance takes the connector over within it.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// The running instance's admin socket; next to the SQLite database when unset.
    pub admin_socket: Option<PathBuf>,
}

impl StoreConfig {
    pub fn admin_socket(&self) -> PathBuf {
        self.admin_socket
            .clone()
            .unwrap_or_else(|| self.path.with_extension("sock"))
    }

    /// PostgreSQL's password, if one is configured.
    pub fn password(&self) -> Result<Option<Secret>, ConfigError> {
        read_secret(&self.password_file, &self.password_env, |key, message| {
            ConfigError::Store {
                key: key.into(),
                message,
            }
        })
    }

    /// Every problem of the store's settings.
    pub fn problems(&self) -> Vec<ConfigError> {
        let error = |key: &str, message: String| ConfigError::Store {
            key: key.into(),
            message,
        };
        let mut problems = Vec::new();
        match &self.url {
            Some(url) if !(url.starts_with("postgresql://") || url.starts_with("postgres://")) => {
                problems.push(error("url", format!("{url:?} is not a postgresql:// URL")));
            }
            Some(url) if url_has_password(url) => {
                problems.push(error(
                    "url",
                    "holds a password: use password_file or password_env".into(),
                ));
            }
            None if self.password_file.is_some() || self.password_env.is_some() || self.tls.is_some() => {
                problems.push(error(
                    "url",
                    "password and TLS settings are for PostgreSQL: set url".into(),
                ));
            }
            _ => {}
        }
        if let Err(e) = self.password() {
            problems.push(e);
        }
        for (key, value, min, max) in [
            (
                "store.connect_timeout",
                self.connect_timeout,
                Duration::from_millis(1),
                Duration::from_secs(3600),
            ),
            (
                "store.lease_ttl",
                self.lease_ttl,
                Duration::from_secs(1),
                Duration::from_secs(3600),
            ),
        ] {
            problems.extend(duration_in(key, value, min, max));
        }
        problems
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("ldapsync.db"),
            url: None,
            password_file: None,
            password_env: None,
            tls: None,
            connect_timeout: Duration::from_secs(5),
            lease_ttl: Duration::from_secs(10),
            admin_socket: None,
        }
    }
}

/// `[[connector]]`: one directory subtree linked to the local store.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectorConfig {
    pub name: String,
    /// The directory's URLs for the service connection; `proxy.upstream` if empty.
    #[serde(default)]
    pub upstream: Vec<LdapUrl>,
    pub bind_dn: String,
    /// A file whose first line is the service password.
    pub password_file: Option<PathBuf>,
    /// An environment variable holding the service password.
    pub password_env: Option<String>,
    /// TLS on the service connection; `proxy.upstream_tls` when unset.
    pub tls: Option<ClientTlsConfig>,
    /// The stable id attribute: `entryUUID`, or `objectGUID` on Active Directory.
    /// Defaults for a kind of directory; explicit keys win.
    pub preset: Option<Preset>,
    /// `entryUUID` by default, `objectGUID` with the Active Directory preset.
    #[serde(default)]
    pub id_attribute: String,
    #[serde(default = "default_direction")]
    pub direction: Direction,
    #[serde(default = "default_conflict")]
    pub conflict: ConflictSetting,
    /// With `conflict = "merge"`: how a field changed on both sides is resolved.
    #[serde(default = "default_fallback")]
    pub merge_fallback: Fallback,
    /// How often the poller reads what changed in the directory directly.
    #[serde(default = "default_poll_interval", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// How the poller finds changes; detected from the root DSE when unset.
    pub poll_mechanism: Option<Mechanism>,
    /// How often every entry in scope is compared with its baseline, which
    /// finds what incremental polling cannot see (deletes, with timestamps).
    #[serde(default = "default_reconcile_interval", with = "humantime_serde")]
    pub reconcile_interval: Duration,
    #[serde(default)]
    pub delete: DeletePolicy,
    /// A sync pass that would delete or disable more objects than this is refused.
    #[serde(default = "default_max_deletes")]
    pub max_deletes: usize,
    /// … or more than this percentage of the connector's associated objects.
    #[serde(default = "default_max_delete_percent")]
    pub max_delete_percent: u8,
    pub accounts: Option<ScopeConfig>,
    pub groups: Option<ScopeConfig>,
}

/// The `conflict` key: a policy, with `merge` taking its fallback from `merge_fallback`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConflictSetting {
    LocalWins,
    LdapWins,
    NoChange,
    Merge,
}

/// What a directory delete does to the associated local object.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeletePolicy {
    /// Keep the local object (it stays associated with the vanished entry).
    #[default]
    Ignore,
    /// Mark the local object disabled.
    Disable,
    /// Delete the local object.
    Delete,
}

/// `[connector.accounts]` / `[connector.groups]`: the entries of one category.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopeConfig {
    pub base: String,
    #[serde(default = "default_filter")]
    pub filter: String,
    /// The directory attribute that holds the local object's name; used to
    /// match on first sync and to name entries created in the directory.
    #[serde(default)]
    pub naming: String,
    /// The RDN attribute of entries created in the directory; `naming` when
    /// unset (`cn` with the Active Directory preset, where the name is
    /// sAMAccountName but the RDN is CN).
    pub rdn: Option<String>,
    /// Directory attribute → local field.
    #[serde(default)]
    pub map: BTreeMap<String, String>,
    /// Groups only: `member`, `uniqueMember` (DNs) or `memberUid` (names).
    pub membership: Option<String>,
    /// Object classes of entries created in the directory.
    #[serde(default)]
    pub object_classes: Vec<String>,
    /// Attribute values for entries created in the directory; `{name}` is
    /// replaced by the object's name (e.g. `sn = "{name}"`).
    #[serde(default)]
    pub defaults: BTreeMap<String, String>,
    /// Accounts only: an integer attribute whose bit 2 (ACCOUNTDISABLE) is
    /// the local `enabled` flag, both ways (AD: `userAccountControl`; the
    /// other bits are kept as they are).
    pub account_control: Option<String>,
    /// Accounts only: a boolean attribute, TRUE while the account is locked
    /// and absent otherwise, that is the local `enabled` flag reversed
    /// (389 DS: `nsAccountLock`).
    pub account_lock: Option<String>,
}

/// Where an account's enabled flag lives in the directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountSwitch<'a> {
    /// Bit 2 (ACCOUNTDISABLE) of an integer attribute (AD's userAccountControl).
    ControlBit(&'a str),
    /// A boolean attribute, TRUE when the account is locked (389 DS's nsAccountLock).
    Lock(&'a str),
}

impl ScopeConfig {
    /// Where the enabled flag lives, when the scope maps it.
    pub fn account_switch(&self) -> Option<AccountSwitch<'_>> {
        match (&self.account_control, &self.account_lock) {
            (Some(attr), _) => Some(AccountSwitch::ControlBit(attr)),
            (None, Some(attr)) => Some(AccountSwitch::Lock(attr)),
            (None, None) => None,
        }
    }
}

/// `preset`: defaults for a kind of directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// Active Directory (and Samba AD): objectGUID, sAMAccountName, CN as
    /// RDN, user/group filters and object classes, the usual mapping,
    /// userAccountControl's disabled bit.
    ActiveDirectory,
    /// 389 Directory Server (Red Hat Directory Server, FreeIPA's
    /// directory): nsUniqueId, uid and cn, inetOrgPerson accounts,
    /// groupOfNames groups, nsAccountLock for disabled accounts.
    #[serde(rename = "389ds")]
    Ds389,
}

/// What a preset fills in one category's scope.
struct ScopeDefaults {
    filter: &'static str,
    naming: &'static str,
    rdn: Option<&'static str>,
    object_classes: &'static [&'static str],
    map: &'static [(&'static str, &'static str)],
    /// Values of entries created in the directory (`{name}`: the name).
    defaults: &'static [(&'static str, &'static str)],
    membership: Option<&'static str>,
    account_control: Option<&'static str>,
    account_lock: Option<&'static str>,
}

impl Preset {
    /// The stable id attribute of this kind of directory.
    fn id_attribute(self) -> &'static str {
        match self {
            Preset::ActiveDirectory => "objectGUID",
            Preset::Ds389 => "nsUniqueId",
        }
    }

    fn scope(self, category: Category) -> ScopeDefaults {
        let none = ScopeDefaults {
            filter: "",
            naming: "",
            rdn: None,
            object_classes: &[],
            map: &[],
            defaults: &[],
            membership: None,
            account_control: None,
            account_lock: None,
        };
        match (self, category) {
            (Preset::ActiveDirectory, Category::Account) => ScopeDefaults {
                filter: "(&(objectCategory=person)(objectClass=user))",
                naming: "sAMAccountName",
                rdn: Some("cn"),
                object_classes: &["top", "person", "organizationalPerson", "user"],
                map: &[
                    ("mail", "mail"),
                    ("displayName", "display_name"),
                    ("userPrincipalName", "upn"),
                    ("proxyAddresses", "aliases"),
                ],
                account_control: Some("userAccountControl"),
                ..none
            },
            (Preset::ActiveDirectory, Category::Group) => ScopeDefaults {
                filter: "(objectClass=group)",
                naming: "sAMAccountName",
                rdn: Some("cn"),
                object_classes: &["top", "group"],
                map: &[("description", "description")],
                membership: Some("member"),
                ..none
            },
            (Preset::Ds389, Category::Account) => ScopeDefaults {
                filter: "(objectClass=inetOrgPerson)",
                naming: "uid",
                object_classes: &["top", "person", "organizationalPerson", "inetOrgPerson"],
                // Not cn: person requires it, and an empty display name
                // would remove it.
                map: &[("mail", "mail"), ("displayName", "display_name")],
                defaults: &[("cn", "{name}"), ("sn", "{name}")],
                account_lock: Some("nsAccountLock"),
                ..none
            },
            (Preset::Ds389, Category::Group) => ScopeDefaults {
                // groupOfUniqueNames holds uniqueMember: a scope of its own.
                filter: "(objectClass=groupOfNames)",
                naming: "cn",
                object_classes: &["top", "groupOfNames"],
                map: &[("description", "description")],
                membership: Some("member"),
                ..none
            },
        }
    }
}

impl ConnectorConfig {
    /// Fills what the file left unset: the preset's values, then the
    /// general defaults.
    fn apply_defaults(&mut self) {
        if self.id_attribute.is_empty() {
            self.id_attribute = self.preset.map_or("entryUUID", Preset::id_attribute).into();
        }
        let Some(preset) = self.preset else { return };
        for (category, scope) in [
            (Category::Account, &mut self.accounts),
            (Category::Group, &mut self.groups),
        ] {
            let Some(scope) = scope else { continue };
            let defaults = preset.scope(category);
            if scope.filter == default_filter() {
                scope.filter = defaults.filter.into();
            }
            if scope.naming.is_empty() {
                scope.naming = defaults.naming.into();
            }
            if scope.rdn.is_none() {
                scope.rdn = defaults.rdn.map(Into::into);
            }
            if scope.object_classes.is_empty() {
                scope.object_classes = defaults.object_classes.iter().map(|c| c.to_string()).collect();
            }
            if scope.map.is_empty() {
                scope.map = defaults
                    .map
                    .iter()
                    .map(|(a, f)| (a.to_string(), f.to_string()))
                    .collect();
            }
            // Per key: the file's values win, the preset's fill in the rest
            // (a person's required cn and sn among them).
            for (attr, value) in defaults.defaults {
                scope
                    .defaults
                    .entry(attr.to_string())
                    .or_insert_with(|| value.to_string());
            }
            if scope.membership.is_none() {
                scope.membership = defaults.membership.map(Into::into);
            }
            // One place for the enabled flag: the file's, or else the preset's.
            if scope.account_control.is_none() && scope.account_lock.is_none() {
                scope.account_control = defaults.account_control.map(Into::into);
                scope.account_lock = defaults.account_lock.map(Into::into);
            }
        }
    }
}

impl DeletePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            DeletePolicy::Ignore => "ignore",
            DeletePolicy::Disable => "disable",
            DeletePolicy::Delete => "delete",
        }
    }
}

impl ScopeConfig {
    /// The RDN attribute of entries this scope creates.
    pub fn rdn(&self) -> &str {
        self.rdn.as_deref().unwrap_or(&self.naming)
    }
}
fn default_direction() -> Direction {
    Direction::Both
}
fn default_conflict() -> ConflictSetting {
    ConflictSetting::LdapWins
}
fn default_fallback() -> Fallback {
    Fallback::LdapWins
}
fn default_poll_interval() -> Duration {
    Duration::from_secs(60)
}
fn default_reconcile_interval() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_max_deletes() -> usize {
    500
}
fn default_max_delete_percent() -> u8 {
    10
}
fn default_filter() -> String {
    "(objectClass=*)".into()
}

impl ConnectorConfig {
    /// What a running worker cannot take without starting over: where it
    /// reads (directory, identity, scopes, mapping, id attribute). The
    /// rest (direction, policies, guard, intervals) applies to the next
    /// decision.
    pub fn same_scope(a: &ConnectorConfig, b: &ConnectorConfig) -> bool {
        let policy_free = |c: &ConnectorConfig| ConnectorConfig {
            direction: Direction::Both,
            conflict: ConflictSetting::LdapWins,
            merge_fallback: Fallback::LdapWins,
            delete: DeletePolicy::Ignore,
            max_deletes: 0,
            max_delete_percent: 0,
            poll_interval: Duration::ZERO,
            reconcile_interval: Duration::ZERO,
            ..c.clone()
        };
        policy_free(a) == policy_free(b)
    }

    pub fn conflict_policy(&self) -> ConflictPolicy {
        match self.conflict {
            ConflictSetting::LocalWins => ConflictPolicy::LocalWins,
            ConflictSetting::LdapWins => ConflictPolicy::LdapWins,
            ConflictSetting::NoChange => ConflictPolicy::NoChange,
            ConflictSetting::Merge => ConflictPolicy::Merge(self.merge_fallback),
        }
    }

    /// The scope of one category, if the connector syncs it.
    pub fn scope(&self, category: Category) -> Option<&ScopeConfig> {
        match category {
            Category::Account => self.accounts.as_ref(),
            Category::Group => self.groups.as_ref(),
        }
    }

    /// The configured categories with their scopes.
    pub fn scopes(&self) -> impl Iterator<Item = (Category, &ScopeConfig)> {
        [(Category::Account, &self.accounts), (Category::Group, &self.groups)]
            .into_iter()
            .filter_map(|(c, s)| s.as_ref().map(|s| (c, s)))
    }

    /// Reads the service password from its file or environment variable.
    pub fn password(&self) -> Result<Secret, ConfigError> {
        let error = |key: &str, message: String| ConfigError::Connector {
            connector: self.name.clone(),
            key: key.into(),
            message,
        };
        read_secret(&self.password_file, &self.password_env, error)?
            .ok_or_else(|| error("password_file", "set password_file or password_env".into()))
    }

    /// Every problem of this connector's settings.
    fn problems(&self) -> Vec<ConfigError> {
        let error = |key: String, message: String| ConfigError::Connector {
            connector: self.name.clone(),
            key,
            message,
        };
        let mut problems = Vec::new();
        if self.name.is_empty() {
            problems.push(error("name".into(), "must not be empty".into()));
        }
        if !crate::dn::is_valid(&self.bind_dn) {
            problems.push(error("bind_dn".into(), format!("{:?} is not a DN", self.bind_dn)));
        }
        match self.password() {
            Ok(_) => {
                if let Some(path) = &self.password_file {
                    warn_if_readable_by_others(path);
                }
            }
            Err(e) => problems.push(e),
        }
        if self.max_delete_percent > 100 {
            problems.push(error("max_delete_percent".into(), "must be between 0 and 100".into()));
        }
        if self.accounts.is_none() && self.groups.is_none() {
            problems.push(error("accounts".into(), "configure accounts, groups or both".into()));
        }
        let day = Duration::from_secs(86_400);
        for (key, value, min, max) in [
            ("poll_interval", self.poll_interval, Duration::from_nanos(1), 30 * day),
            (
                "reconcile_interval",
                self.reconcile_interval,
                Duration::ZERO,
                3650 * day,
            ),
        ] {
            if let Some(ConfigError::OutOfRange { value, range, .. }) = duration_in(key, value, min, max) {
                problems.push(error(key.into(), format!("{value} is out of range: {range}")));
            }
        }
        for (category, scope) in self.scopes() {
            let key = |k: &str| format!("{}s.{k}", category.as_str());
            if scope.naming.is_empty() {
                problems.push(error(
                    key("naming"),
                    "required (the attribute that holds the local name), unless a preset sets it".into(),
                ));
            }
            if !crate::dn::is_valid(&scope.base) {
                problems.push(error(key("base"), format!("{:?} is not a DN", scope.base)));
            }
            if ldap3::parse_filter(&scope.filter).is_err() {
                problems.push(error(
                    key("filter"),
                    format!("{:?} is not an LDAP filter", scope.filter),
                ));
            }
            if let Some((attr, _)) = scope.map.iter().find(|(_, field)| field.as_str() == NAME_FIELD) {
                problems.push(error(
                    key("map"),
                    format!(
                        "{attr} maps to \"name\", which the naming attribute ({}) already feeds",
                        scope.naming
                    ),
                ));
            }
            for (name, attr) in [
                ("account_control", &scope.account_control),
                ("account_lock", &scope.account_lock),
            ] {
                if category == Category::Group && attr.is_some() {
                    problems.push(error(key(name), "only accounts are enabled or disabled".into()));
                }
            }
            if scope.account_control.is_some() && scope.account_lock.is_some() {
                problems.push(error(
                    key("account_lock"),
                    "set account_control or account_lock, not both: the enabled flag lives in one place".into(),
                ));
            }
            match (category, &scope.membership) {
                (Category::Account, Some(_)) => {
                    problems.push(error(key("membership"), "only groups have members".into()));
                }
                (Category::Group, Some(m)) if !MEMBERSHIP_ATTRIBUTES.contains(&m.as_str()) => {
                    problems.push(error(
                        key("membership"),
                        format!("{m:?} is not one of {MEMBERSHIP_ATTRIBUTES:?}"),
                    ));
                }
                _ => {}
            }
        }
        problems
    }
}

/// A secret file others can read is a leak waiting to happen; say so at
/// start (ssh refuses such keys; a proxy in production should not refuse
/// to start over it).
#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "the password file is readable by other users; make it owner-only (chmod 600)"
        );
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_: &Path) {}

const MEMBERSHIP_ATTRIBUTES: [&str; 3] = ["member", "uniqueMember", "memberUid"];

/// Whether `scheme://user:password@host/…` carries a password.
fn url_has_password(url: &str) -> bool {
    url.split_once("://")
        .and_then(|(_, rest)| rest.split('/').next())
        .and_then(|authority| authority.rsplit_once('@'))
        .is_some_and(|(userinfo, _)| userinfo.contains(':'))
}

/// A password from its file (the first line) or environment variable;
/// `None` when neither is set. `error(key, message)` names the key.
fn read_secret(
    file: &Option<PathBuf>,
    env: &Option<String>,
    error: impl Fn(&str, String) -> ConfigError,
) -> Result<Option<Secret>, ConfigError> {
    match (file, env) {
        (Some(path), None) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| error("password_file", format!("cannot read {}: {e}", path.display())))?;
            Ok(Some(Secret(text.lines().next().unwrap_or_default().to_owned())))
        }
        (None, Some(var)) => std::env::var(var)
            .map(|v| Some(Secret(v)))
            .map_err(|_| error("password_env", format!("environment variable {var} is not set"))),
        (Some(_), Some(_)) => Err(error(
            "password_file",
            "set password_file or password_env, not both".into(),
        )),
        (None, None) => Ok(None),
    }
}

/// A password: never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// `[proxy]`: the listeners, the directory behind them, and the relay's limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    pub listen: Vec<Listener>,
    pub upstream: Vec<LdapUrl>,
    /// The certificate clients see on `ldaps://` listeners and after StartTLS.
    pub tls: Option<ServerTlsConfig>,
    /// TLS to the directory: `ldaps://` upstream URLs, or StartTLS.
    pub upstream_tls: ClientTlsConfig,
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub io_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    pub max_connections: usize,
    /// Connections from one client address at once.
    pub max_connections_per_address: usize,
    /// Operations one connection may have in flight; more are answered `busy`.
    pub max_outstanding: usize,
    /// Failed binds from one address within `failed_bind_window` after which
    /// its binds are refused until the window has passed.
    pub max_failed_binds: usize,
    #[serde(with = "humantime_serde")]
    pub failed_bind_window: Duration,
    pub max_client_pdu: usize,
    pub max_upstream_pdu: usize,
    /// How long a client may take to send one request in full once its
    /// first bytes arrived (slow-loris clients hold memory otherwise).
    #[serde(with = "humantime_serde")]
    pub request_read_timeout: Duration,
    /// Bytes of partly received requests all sessions may hold together;
    /// a session that would go over it is closed.
    pub max_request_buffer: usize,
    /// What a client sees when its directory connection cannot be opened
    /// or is lost.
    pub on_directory_loss: DirectoryLoss,
    /// How new sessions choose among the directory URLs that are up.
    pub balance: Balance,
    /// The shared connections of multiplexed listeners.
    pub multiplex: Option<MultiplexConfig>,
    /// How often a directory URL that is up is probed (a root DSE read).
    #[serde(with = "humantime_serde")]
    pub health_interval: Duration,
    /// Per directory URL (as in `upstream`): its share of sessions under
    /// `round-robin` and `least-connections`; 1 when not given.
    pub weight: BTreeMap<String, usize>,
    /// Per directory URL: its tier, 1 when not given. A tier's URLs are
    /// used only while every URL of the tiers below it is down.
    pub tier: BTreeMap<String, usize>,
    /// Threads of their own for client sessions, each with a single-threaded
    /// runtime; unset, sessions run on the main runtime's workers.
    pub session_threads: Option<usize>,
    /// Conformance mode's report file (from `[conformance]` or the flag).
    #[serde(skip)]
    pub conformance_report: Option<PathBuf>,
}

/// What a session does when its directory connection cannot be opened or
/// is lost (`proxy.on_directory_loss`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DirectoryLoss {
    /// The client's connection closes without an answer, as the
    /// directory's own would: libldap reports "can't contact LDAP server"
    /// (SERVER_DOWN), which is what client libraries' failover and
    /// reconnect logic acts on.
    #[default]
    Close,
    /// The client is told first: an operation that finds no directory is
    /// answered `unavailable` (52) and the session stays open; a lost
    /// directory connection ends with a Notice of Disconnection.
    Notice,
}

/// How new sessions choose among the directory URLs that are up
/// (`proxy.balance`); URLs known down come last whatever the choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    /// The first URL that answers, in the configured order: failover.
    #[default]
    Ordered,
    /// Each new session starts at the next URL, in proportion to weights.
    RoundRobin,
    /// The URL with the fewest open sessions for its weight.
    LeastConnections,
}

impl ProxyConfig {
    /// Each upstream URL's (weight, tier), in the order of `upstream`.
    pub fn url_options(&self) -> Vec<(usize, usize)> {
        let lookup = |map: &BTreeMap<String, usize>, url: &LdapUrl| {
            map.iter()
                .find(|(key, _)| key.parse::<LdapUrl>().is_ok_and(|k| &k == url))
                .map_or(1, |(_, value)| *value)
        };
        self.upstream
            .iter()
            .map(|url| (lookup(&self.weight, url), lookup(&self.tier, url)))
            .collect()
    }
}

/// `[conformance]`: check every PDU against RFC 4511 and report violations.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConformanceConfig {
    /// JSON lines, one per violation; conformance mode is off without it.
    pub report: Option<PathBuf>,
}

/// A listener: `"ldap://host:port"`, or a table with options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub url: LdapUrl,
    /// Refuse binds until the session is under TLS (`confidentialityRequired`).
    pub require_tls: bool,
    /// Who ends the client's TLS: ldapsync, or the directory.
    pub tls: ListenerTls,
    /// A directory connection per session, or a few shared by all.
    pub mode: ListenerMode,
}

/// How a listener's sessions reach the directory (`mode` in a listener's
/// table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ListenerMode {
    /// Each session has a directory connection of its own, which carries
    /// its bytes untouched.
    #[default]
    Transparent,
    /// Sessions share a few directory connections bound as
    /// `proxy.multiplex.bind_dn`: each operation carries the client's
    /// identity in a Proxied Authorization control (RFC 4370), and binds
    /// are checked on connections of their own. A SASL bind takes the
    /// session to a dedicated connection.
    Multiplexed,
}

/// `[proxy.multiplex]`: the identity and size of the shared directory
/// connections of `mode = "multiplexed"` listeners.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MultiplexConfig {
    /// An identity the directory lets assert other identities (slapd:
    /// `authzTo` on its entry, `olcAuthzPolicy: to`).
    pub bind_dn: String,
    pub password_file: Option<PathBuf>,
    pub password_env: Option<String>,
    /// Shared connections; two per core when unset.
    pub connections: Option<usize>,
    /// Answers held for one session whose client reads them slower than
    /// the directory sends them, in bytes; past it the session is closed,
    /// so that it cannot hold up the others on its shared connection.
    pub max_unread: Option<usize>,
}

impl MultiplexConfig {
    pub fn password(&self) -> Result<Secret, ConfigError> {
        let error = |key: &str, message: String| ConfigError::Multiplex {
            key: key.into(),
            message,
        };
        read_secret(&self.password_file, &self.password_env, error)?
            .ok_or_else(|| error("password_file", "set password_file or password_env".into()))
    }

    /// Shared connections to open.
    pub fn connections(&self) -> usize {
        self.connections
            .unwrap_or_else(|| 2 * std::thread::available_parallelism().map_or(1, std::num::NonZero::get))
    }

    pub fn max_unread(&self) -> usize {
        self.max_unread.unwrap_or(4 * 1024 * 1024)
    }
}

/// Who ends a client's TLS on a listener (`tls` in a listener's table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ListenerTls {
    /// ldapsync, with `proxy.tls`'s certificate: the session's operations
    /// stay visible, and its writes are captured.
    #[default]
    Terminate,
    /// The directory: an `ldaps://` listener relays the connection to an
    /// `ldaps://` directory URL untouched from the first byte; on an
    /// `ldap://` listener, StartTLS goes to the directory (over an
    /// `ldap://` URL) and the session is relayed untouched from its
    /// response on. The client's certificate then reaches the directory
    /// (SASL EXTERNAL works), but the session's operations are opaque to
    /// ldapsync: its writes reach the store by polls only.
    Passthrough,
}

/// By hand rather than as an untagged enum, so that a bad value is reported
/// for what is wrong with it, not as "matches no variant".
impl<'de> Deserialize<'de> for Listener {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Listener;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    r#"a listen URL such as "ldap://127.0.0.1:389", or { url = "…", require_tls = true, tls = "passthrough", mode = "multiplexed" }"#,
                )
            }

            fn visit_str<E: serde::de::Error>(self, url: &str) -> Result<Listener, E> {
                url.parse::<LdapUrl>().map(Listener::from).map_err(E::custom)
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Listener, A::Error> {
                #[derive(Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Table {
                    url: LdapUrl,
                    #[serde(default)]
                    require_tls: bool,
                    #[serde(default)]
                    tls: ListenerTls,
                    #[serde(default)]
                    mode: ListenerMode,
                }
                let table = Table::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(Listener {
                    url: table.url,
                    require_tls: table.require_tls,
                    tls: table.tls,
                    mode: table.mode,
                })
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl From<LdapUrl> for Listener {
    fn from(url: LdapUrl) -> Listener {
        Listener {
            url,
            require_tls: false,
            tls: ListenerTls::Terminate,
            mode: ListenerMode::Transparent,
        }
    }
}

/// `[proxy.tls]`: PEM files, re-read on SIGHUP.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsConfig {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// TLS as a client of the directory.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientTlsConfig {
    /// CA certificates (PEM) to trust; the system's roots when unset.
    pub ca: Option<PathBuf>,
    /// Upgrade `ldap://` directory connections with StartTLS.
    pub starttls: bool,
    /// Verify the directory's certificate and name. Turning it off is for
    /// laboratories only, and is logged as such.
    pub verify: bool,
    /// A client certificate and key (PEM), when the directory asks for one.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

impl Default for ClientTlsConfig {
    fn default() -> Self {
        ClientTlsConfig {
            ca: None,
            starttls: false,
            verify: true,
            client_cert: None,
            client_key: None,
        }
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            listen: Vec::new(),
            upstream: Vec::new(),
            tls: None,
            upstream_tls: ClientTlsConfig::default(),
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(15 * 60),
            shutdown_grace: Duration::from_secs(10),
            max_connections: 4096,
            max_connections_per_address: 512,
            max_outstanding: 1024,
            max_failed_binds: 10,
            failed_bind_window: Duration::from_secs(60),
            max_client_pdu: 256 * 1024,
            max_upstream_pdu: 16 * 1024 * 1024,
            request_read_timeout: Duration::from_secs(30),
            max_request_buffer: 64 * 1024 * 1024,
            on_directory_loss: DirectoryLoss::default(),
            balance: Balance::default(),
            multiplex: None,
            health_interval: Duration::from_secs(10),
            weight: BTreeMap::new(),
            tier: BTreeMap::new(),
            session_threads: None,
            conformance_report: None,
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter directive: `info`, `ldapsync=debug`, …
    pub level: String,
    pub format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// For people.
    #[default]
    Text,
    /// One JSON object per line, for collectors.
    Json,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".to_owned(),
            format: LogFormat::Text,
        }
    }
}

impl Config {
    /// Parses a TOML document; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.to_string(),
        })?;
        config.connectors.iter_mut().for_each(ConnectorConfig::apply_defaults);
        Ok(config)
    }

    /// Reads a file as `load` does, reporting every unknown key rather than
    /// the first: each one found is set aside and the file read again (for
    /// check-config). Other errors end the search.
    pub fn load_reporting_all(path: &Path) -> Result<Config, Vec<ConfigError>> {
        let text = std::fs::read_to_string(path).map_err(|source| {
            vec![ConfigError::Read {
                path: path.to_owned(),
                source,
            }]
        })?;
        let first = match Config::parse(&text, path) {
            Ok(config) => return Ok(config),
            Err(e) => e,
        };
        let mut problems = vec![first];
        let Ok(mut table) = toml::from_str::<toml::Table>(&text) else {
            return Err(problems);
        };
        // At most one round per key of the file.
        for _ in 0..256 {
            let ConfigError::Parse { message, .. } = problems.last().expect("one at least") else {
                break;
            };
            let Some(key) = unknown_key(message) else { break };
            if !remove_key(&mut table, &key) {
                break;
            }
            match toml::Value::Table(table.clone()).try_into::<Config>() {
                Ok(_) => break,
                Err(e) => problems.push(ConfigError::Parse {
                    path: path.to_owned(),
                    message: e.to_string(),
                }),
            }
        }
        Err(problems)
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Checks the connectors: each on its own, then that no two share a subtree.
    pub fn validate_connectors(&self) -> Result<(), ConfigError> {
        self.connector_problems().into_iter().next().map_or(Ok(()), Err)
    }

    /// Every problem of the connectors, each alone and together.
    pub fn connector_problems(&self) -> Vec<ConfigError> {
        let mut problems = Vec::new();
        for (i, c) in self.connectors.iter().enumerate() {
            problems.extend(c.problems());
            if c.upstream.is_empty() && self.proxy.upstream.is_empty() {
                problems.push(ConfigError::Connector {
                    connector: c.name.clone(),
                    key: "upstream".into(),
                    message: "no directory URL here nor in proxy.upstream".into(),
                });
            }
            for other in &self.connectors[..i] {
                if other.name == c.name {
                    problems.push(ConfigError::DuplicateConnector(c.name.clone()));
                }
                for (category, scope) in c.scopes() {
                    for (_, theirs) in other.scopes().filter(|(oc, _)| *oc == category) {
                        if crate::dn::is_within(&scope.base, &theirs.base)
                            || crate::dn::is_within(&theirs.base, &scope.base)
                        {
                            problems.push(ConfigError::Overlap {
                                first: other.name.clone(),
                                second: c.name.clone(),
                                first_base: theirs.base.clone(),
                                second_base: scope.base.clone(),
                            });
                        }
                    }
                }
            }
        }
        problems.extend(self.admin_problems());
        let mut names = std::collections::HashSet::new();
        for webhook in &self.webhooks {
            problems.extend(webhook.problems());
            if !names.insert(&webhook.name) {
                problems.push(ConfigError::Webhook {
                    webhook: webhook.name.clone(),
                    key: "name".into(),
                    message: "two webhooks have this name".into(),
                });
            }
        }
        problems
    }

    /// The admin API's problems: it authenticates through a connector.
    fn admin_problems(&self) -> Vec<ConfigError> {
        let a = &self.admin;
        let day = Duration::from_secs(86_400);
        let mut problems: Vec<ConfigError> = duration_in(
            "admin.feed_retention",
            a.feed_retention,
            Duration::from_secs(3600),
            3650 * day,
        )
        .into_iter()
        .collect();
        if a.listen.is_none() {
            return problems;
        }
        let error = |key, message: &str| ConfigError::Admin {
            key,
            message: message.to_owned(),
        };
        match &a.connector {
            Some(name) if self.connectors.iter().all(|c| &c.name != name) => {
                problems.push(error("connector", &format!("no connector is called {name:?}")));
            }
            None if self.connectors.is_empty() => {
                problems.push(error(
                    "listen",
                    "the admin API logs operators in through a connector's directory: configure one",
                ));
            }
            _ => {}
        }
        let connector = a.connector.as_ref().map_or(self.connectors.first(), |name| {
            self.connectors.iter().find(|c| &c.name == name)
        });
        if connector.is_some_and(|c| c.accounts.is_none()) {
            problems.push(error(
                "connector",
                "its connector syncs no accounts, among which operators are found",
            ));
        }
        if a.admin_group.is_none() && a.auditor_group.is_none() {
            problems.push(error(
                "admin_group",
                "set admin_group or auditor_group (a group entry's DN): nobody could log in",
            ));
        }
        for (key, group) in [("admin_group", &a.admin_group), ("auditor_group", &a.auditor_group)] {
            if let Some(dn) = group.as_ref().filter(|dn| !crate::dn::is_valid(dn)) {
                problems.push(error(key, &format!("{dn:?} is not a DN")));
            }
        }
        problems.extend(count_in("admin.max_body", a.max_body, 1024, 16 * 1024 * 1024));
        problems.extend(count_in("admin.max_failed_logins", a.max_failed_logins, 1, 1_000_000));
        problems.extend(duration_in(
            "admin.session_timeout",
            a.session_timeout,
            Duration::from_secs(5),
            30 * day,
        ));
        problems.extend(duration_in(
            "admin.failed_login_window",
            a.failed_login_window,
            Duration::from_secs(1),
            day,
        ));
        problems
    }

    /// The named connector, or an error that names the ones there are and
    /// the closest to a misspelt name.
    pub fn require_connector(&self, name: &str) -> Result<ConnectorConfig, ConfigError> {
        self.connector(name).ok_or_else(|| {
            let names = self.connectors.iter().map(|c| c.name.as_str());
            let closest = names
                .clone()
                .map(|known| (strsim::levenshtein(name, known), known))
                .filter(|(distance, known)| *distance <= 2.max(known.len() / 3))
                .min();
            let known: Vec<String> = names.map(|n| format!("{n:?}")).collect();
            ConfigError::UnknownConnector {
                name: name.to_owned(),
                suggestion: closest
                    .map(|(_, c)| format!(" (did you mean {c:?}?)"))
                    .unwrap_or_default(),
                known: if known.is_empty() {
                    "none".into()
                } else {
                    known.join(", ")
                },
            }
        })
    }

    /// The named connector, with `proxy.upstream` filled in where it has none.
    pub fn connector(&self, name: &str) -> Option<ConnectorConfig> {
        let mut c = self.connectors.iter().find(|c| c.name == name)?.clone();
        if c.upstream.is_empty() {
            c.upstream = self.proxy.upstream.clone();
        }
        if c.tls.is_none() {
            c.tls = Some(self.proxy.upstream_tls.clone());
        }
        Some(c)
    }

    /// Checks what serde cannot: the settings the relay cannot run without.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.proxy_problems().into_iter().next().map_or(Ok(()), Err)
    }

    /// Every problem of the relay's settings and the store's.
    pub fn proxy_problems(&self) -> Vec<ConfigError> {
        let p = &self.proxy;
        let mut problems = Vec::new();
        if p.upstream.is_empty() {
            problems.push(ConfigError::NoUpstream);
        }
        if p.listen.is_empty() {
            problems.push(ConfigError::NoListener);
        }
        if p.tls.is_none()
            && let Some(listener) = p
                .listen
                .iter()
                .find(|l| l.tls == ListenerTls::Terminate && (l.url.is_ldaps() || l.require_tls))
        {
            problems.push(ConfigError::NoCertificate {
                listener: listener.url.to_string(),
            });
        }
        for listener in p.listen.iter().filter(|l| l.tls == ListenerTls::Passthrough) {
            let scheme = if listener.url.is_ldaps() { "ldaps" } else { "ldap" };
            if !p.upstream.iter().any(|u| u.is_ldaps() == listener.url.is_ldaps()) {
                problems.push(ConfigError::NoPassthroughUpstream {
                    listener: listener.url.to_string(),
                    scheme,
                });
            }
        }
        if (p.upstream_tls.client_cert.is_some()) != (p.upstream_tls.client_key.is_some()) {
            problems.push(ConfigError::ClientCertificate);
        }
        let multiplexed = p.listen.iter().filter(|l| l.mode == ListenerMode::Multiplexed);
        for listener in multiplexed {
            let url = listener.url.to_string();
            if listener.tls == ListenerTls::Passthrough {
                problems.push(ConfigError::Multiplex {
                    key: "mode".into(),
                    message: format!("listener {url} passes TLS through: its sessions cannot share connections"),
                });
            }
            if p.multiplex.is_none() {
                problems.push(ConfigError::Multiplex {
                    key: "bind_dn".into(),
                    message: format!(
                        "listener {url} is multiplexed: set [proxy.multiplex] bind_dn and password_file, \
                         the identity of the shared connections"
                    ),
                });
            }
        }
        if let Some(m) = &p.multiplex {
            if !crate::dn::is_valid(&m.bind_dn) || m.bind_dn.is_empty() {
                problems.push(ConfigError::Multiplex {
                    key: "bind_dn".into(),
                    message: format!("{:?} is not a DN", m.bind_dn),
                });
            }
            if m.password_file.is_none() && m.password_env.is_none() {
                problems.push(ConfigError::Multiplex {
                    key: "password_file".into(),
                    message: "set password_file or password_env".into(),
                });
            }
            if let Some(n) = m.connections {
                problems.extend(count_in("proxy.multiplex.connections", n, 1, 1024));
            }
            if let Some(n) = m.max_unread {
                problems.extend(count_in("proxy.multiplex.max_unread", n, 64 * 1024, 1024 * 1024 * 1024));
            }
        }
        if let Some(n) = p.session_threads {
            problems.extend(count_in("proxy.session_threads", n, 1, 1024));
        }
        const MIB: usize = 1024 * 1024;
        let counts = [
            ("proxy.max_connections", p.max_connections, 1, MAX_CONNECTIONS),
            (
                "proxy.max_connections_per_address",
                p.max_connections_per_address,
                1,
                MAX_CONNECTIONS,
            ),
            ("proxy.max_outstanding", p.max_outstanding, 1, 65_536),
            ("proxy.max_failed_binds", p.max_failed_binds, 0, 1_000_000),
            ("proxy.max_client_pdu", p.max_client_pdu, 64, 256 * MIB),
            ("proxy.max_upstream_pdu", p.max_upstream_pdu, 64, 1024 * MIB),
            (
                "proxy.max_request_buffer",
                p.max_request_buffer,
                64 * 1024,
                16 * 1024 * MIB,
            ),
        ];
        problems.extend(
            counts
                .into_iter()
                .filter_map(|(key, value, min, max)| count_in(key, value, min, max)),
        );
        for (name, map, max) in [("proxy.weight", &p.weight, 1000), ("proxy.tier", &p.tier, 10)] {
            for (url, value) in map {
                let key = format!("{name}.{url:?}");
                if !url.parse::<LdapUrl>().is_ok_and(|u| p.upstream.contains(&u)) {
                    problems.push(ConfigError::UnknownUpstream { key, url: url.clone() });
                } else if let Some(problem) = count_in(&key, *value, 1, max) {
                    problems.push(problem);
                }
            }
        }
        // Greater than zero, however small: "500us" is a timeout too.
        let (tick, hour, day) = (
            Duration::from_nanos(1),
            Duration::from_secs(3600),
            Duration::from_secs(86_400),
        );
        let durations = [
            ("proxy.handshake_timeout", p.handshake_timeout, tick, hour),
            ("proxy.connect_timeout", p.connect_timeout, tick, hour),
            (
                "proxy.health_interval",
                p.health_interval,
                Duration::from_millis(100),
                hour,
            ),
            ("proxy.io_timeout", p.io_timeout, tick, hour),
            ("proxy.request_read_timeout", p.request_read_timeout, tick, hour),
            ("proxy.idle_timeout", p.idle_timeout, tick, 30 * day),
            ("proxy.shutdown_grace", p.shutdown_grace, Duration::ZERO, hour),
            ("proxy.failed_bind_window", p.failed_bind_window, Duration::ZERO, day),
        ];
        problems.extend(
            durations
                .into_iter()
                .filter_map(|(key, value, min, max)| duration_in(key, value, min, max)),
        );
        problems.extend(self.store.problems());
        problems
    }
}

/// The key an "unknown field" error names.
fn unknown_key(message: &str) -> Option<String> {
    let rest = message.split("unknown field `").nth(1)?;
    rest.split('`').next().map(str::to_owned)
}

/// Removes the first `key` found in `table` or the tables below it.
fn remove_key(table: &mut toml::Table, key: &str) -> bool {
    if table.remove(key).is_some() {
        return true;
    }
    table.iter_mut().any(|(_, value)| match value {
        toml::Value::Table(inner) => remove_key(inner, key),
        toml::Value::Array(items) => items.iter_mut().any(|item| match item {
            toml::Value::Table(inner) => remove_key(inner, key),
            _ => false,
        }),
        _ => false,
    })
}

/// The most client connections a proxy may be configured to serve at once
/// (far above what one host's descriptors allow; the runtime's own limit
/// is higher still).
const MAX_CONNECTIONS: usize = 1_000_000;

/// `Some` problem when a count is outside `min..=max`.
fn count_in(key: &str, value: usize, min: usize, max: usize) -> Option<ConfigError> {
    (!(min..=max).contains(&value)).then(|| ConfigError::OutOfRange {
        key: key.to_owned(),
        value: value.to_string(),
        range: format!("{min} to {max}"),
    })
}

/// `Some` problem when a duration is outside `min..=max`: timers are set
/// by adding durations to the clock, which must not overflow.
fn duration_in(key: &str, value: Duration, min: Duration, max: Duration) -> Option<ConfigError> {
    (!(min..=max).contains(&value)).then(|| ConfigError::OutOfRange {
        key: key.to_owned(),
        value: format!("\"{}\"", humantime::format_duration(value)),
        range: format!(
            "{} to {}",
            humantime::format_duration(min),
            humantime::format_duration(max)
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldap_urls() {
        let ok = [
            ("ldap://127.0.0.1:3890", "127.0.0.1:3890"),
            ("ldap://localhost", "localhost:389"),
            ("ldap://[::1]:3389/", "[::1]:3389"),
        ];
        for (input, authority) in ok {
            assert_eq!(input.parse::<LdapUrl>().unwrap().authority(), authority, "{input}");
        }
        let bad = ["127.0.0.1:389", "http://x", "ldap://h/dc=example", "ldap://"];
        for input in bad {
            assert!(input.parse::<LdapUrl>().is_err(), "{input} should be refused");
        }
    }

    #[test]
    fn full_file_parses_with_durations() {
        let cfg = Config::parse(
            r#"
            [proxy]
            listen = ["ldap://127.0.0.1:3389"]
            upstream = ["ldap://127.0.0.1:3890", "ldap://127.0.0.1:3891"]
            connect_timeout = "2s"
            idle_timeout = "1h"
            max_client_pdu = 1048576
            [log]
            level = "debug"
            "#,
            Path::new("t.toml"),
        )
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.proxy.upstream.len(), 2);
        assert_eq!(cfg.proxy.connect_timeout, Duration::from_secs(2));
        assert_eq!(cfg.proxy.idle_timeout, Duration::from_secs(3600));
        assert_eq!(cfg.proxy.io_timeout, ProxyConfig::default().io_timeout);
    }

    fn connector_file(dir: &Path, extra: &str) -> String {
        let secret = dir.join("secret");
        std::fs::write(&secret, "s3cret\n").unwrap();
        format!(
            r#"
            [proxy]
            upstream = ["ldap://127.0.0.1:3890"]
            [[connector]]
            name = "people"
            bind_dn = "cn=admin,dc=example,dc=com"
            password_file = "{}"
            direction = "both"
            conflict = "merge"
            merge_fallback = "local-wins"
            [connector.accounts]
            base = "ou=people,dc=example,dc=com"
            filter = "(objectClass=inetOrgPerson)"
            naming = "uid"
            map = {{ cn = "display_name", mail = "mail" }}
            {extra}
            "#,
            secret.display()
        )
    }

    #[test]
    fn connector_parses_with_its_policy_and_password() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config::parse(&connector_file(dir.path(), ""), Path::new("c.toml")).unwrap();
        cfg.validate_connectors().unwrap();
        let c = cfg.connector("people").unwrap();
        assert_eq!(c.conflict_policy(), ConflictPolicy::Merge(Fallback::LocalWins));
        assert_eq!(c.password().unwrap().expose(), "s3cret");
        assert_eq!(format!("{:?}", c.password().unwrap()), "Secret(***)");
        assert_eq!(c.upstream, cfg.proxy.upstream, "proxy.upstream is the default");
        assert_eq!(c.id_attribute, "entryUUID");
    }

    #[test]
    fn connector_errors_name_connector_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let base = connector_file(dir.path(), "");
        let cases: Vec<(String, &str)> = vec![
            (base.replace("naming = \"uid\"", "naming = \"uid\"\nnamin = 1"), "namin"),
            (base.replace("ou=people,dc=example,dc=com", "people"), "accounts.base"),
            (
                base.replace("(objectClass=inetOrgPerson)", "(objectClass=inetOrgPerson"),
                "accounts.filter",
            ),
            (base.replace("cn=admin,dc=example,dc=com", "admin"), "bind_dn"),
            (
                base.replace(&dir.path().join("secret").display().to_string(), "/nonexistent/secret"),
                "/nonexistent/secret",
            ),
            (base.replace("conflict = \"merge\"", "conflict = \"mine\""), "conflict"),
            (
                base.replace(
                    "direction = \"both\"",
                    "direction = \"both\"\npoll_interval = \"18446744073709551615s\"",
                ),
                "poll_interval: \"",
            ),
            (
                base.replace("direction = \"both\"", "direction = \"sideways\""),
                "direction",
            ),
            (
                format!(
                    "{base}\n[[connector]]\nname = \"staff\"\nbind_dn = \"cn=admin,dc=example,dc=com\"\n\
                     password_env = \"HOME\"\n[connector.accounts]\nbase = \"ou=staff,ou=people,dc=example,dc=com\"\n\
                     naming = \"uid\"\n"
                ),
                "overlap",
            ),
        ];
        for (text, needle) in cases {
            let err = Config::parse(&text, Path::new("c.toml")).and_then(|c| c.validate_connectors());
            let err = err.expect_err(needle).to_string();
            assert!(err.contains(needle), "{err:?} should mention {needle:?}");
        }
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("[proxy]\nlisten_on = []", "listen_on"),
            ("[proxy]\nupstream = [\"http://x\"]", "http"),
            ("[proxy]\nconnect_timeout = \"soon\"", "connect_timeout"),
            ("[prxy]\n", "prxy"),
        ];
        for (text, needle) in cases {
            let err = Config::parse(text, Path::new("c.toml")).unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} should mention {needle:?}");
            assert!(err.contains("c.toml"), "{err:?} should name the file");
        }
        let missing = Config::parse("[proxy]\nlisten = [\"ldap://h\"]", Path::new("c.toml")).unwrap();
        assert!(matches!(missing.validate(), Err(ConfigError::NoUpstream)));
    }

    #[test]
    fn a_bad_listen_url_is_reported_for_what_is_wrong_with_it() {
        let cases = [
            (r#"listen = ["ldapx://h:1"]"#, "scheme \"ldapx\" is not supported"),
            (r#"listen = [{ url = "ldap://h/dc=x" }]"#, "remove \"dc=x\""),
            (
                r#"listen = [{ url = "ldap://h", require = true }]"#,
                "unknown field `require`",
            ),
            (r#"listen = [5]"#, "a listen URL such as"),
        ];
        for (line, needle) in cases {
            let err = Config::parse(&format!("[proxy]\n{line}"), Path::new("c.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{err:?} should say {needle:?}");
            assert!(!err.contains("variant"), "{err}");
        }
    }

    #[test]
    fn balance_weights_and_tiers_name_upstream_urls_within_range() {
        let base = "[proxy]\nlisten = [\"ldap://h\"]\nupstream = [\"ldap://d1\", \"ldap://d2:389\"]\nbalance = \"round-robin\"\n";
        let parse = |extra: &str| Config::parse(&format!("{base}{extra}"), Path::new("c.toml")).unwrap();
        let good = parse("[proxy.weight]\n\"ldap://d1:389\" = 3\n[proxy.tier]\n\"ldap://d2\" = 2\n");
        assert!(
            good.validate().is_ok(),
            "a URL may be written with or without its default port"
        );
        assert_eq!(good.proxy.balance, Balance::RoundRobin);
        assert_eq!(good.proxy.url_options(), [(3, 1), (1, 2)]);
        let cases = [
            (
                "[proxy.weight]\n\"ldap://elsewhere\" = 2\n",
                "names \"ldap://elsewhere\", which is not one of proxy.upstream",
            ),
            ("[proxy.weight]\n\"ldap://d1\" = 0\n", "is out of range: 1 to 1000"),
            ("[proxy.tier]\n\"ldap://d2\" = 11\n", "is out of range: 1 to 10"),
        ];
        for (extra, needle) in cases {
            let err = parse(extra).validate().expect_err(extra).to_string();
            assert!(err.contains(needle), "{err:?} should say {needle:?}");
        }
        let random = base.replace("round-robin", "random");
        let bad = Config::parse(&random, Path::new("c.toml"))
            .map(drop)
            .expect_err("an unknown balance");
        assert!(bad.to_string().contains("random"), "{bad}");
    }

    #[test]
    fn numbers_and_durations_out_of_range_are_refused_with_their_range() {
        let base = "[proxy]\nlisten = [\"ldap://h\"]\nupstream = [\"ldap://d\"]\n";
        let cases = [
            (
                "max_connections = 4611686018427387904",
                "proxy.max_connections = 4611686018427387904 is out of range: 1 to 1000000",
            ),
            (
                "max_client_pdu = 1099511627776",
                "proxy.max_client_pdu = 1099511627776 is out of range: 64 to 268435456",
            ),
            ("max_outstanding = 0", "proxy.max_outstanding = 0 is out of range"),
            (
                "session_threads = 0",
                "proxy.session_threads = 0 is out of range: 1 to 1024",
            ),
            ("idle_timeout = \"18446744073709551615s\"", "proxy.idle_timeout = "),
            (
                "connect_timeout = \"0s\"",
                "proxy.connect_timeout = \"0s\" is out of range: 1ns to 1h",
            ),
        ];
        for (line, needle) in cases {
            let config = Config::parse(&format!("{base}{line}\n"), Path::new("c.toml")).unwrap();
            let err = config.validate().expect_err(line).to_string();
            assert!(err.contains(needle), "{err:?} should say {needle:?}");
        }
        let both = Config::parse(
            &format!("{base}max_outstanding = 0\nio_timeout = \"1000d\"\n"),
            Path::new("c.toml"),
        );
        assert_eq!(
            both.unwrap().proxy_problems().len(),
            2,
            "every problem is reported, not the first"
        );
        let tiny = Config::parse(&format!("{base}handshake_timeout = \"500us\"\n"), Path::new("c.toml"));
        assert!(tiny.unwrap().validate().is_ok(), "a short timeout is not a zero one");
    }

    #[test]
    fn listeners_are_urls_or_tables_and_tls_ones_need_a_certificate() {
        let text = r#"
            [proxy]
            upstream = ["ldaps://dir.example.com"]
            listen = ["ldap://127.0.0.1:389", { url = "ldap://127.0.0.1:3389", require_tls = true }, "ldaps://[::1]"]
        "#;
        let config = Config::parse(text, Path::new("c.toml")).unwrap();
        let listen = &config.proxy.listen;
        assert_eq!(
            (listen[0].url.to_string(), listen[0].require_tls),
            ("ldap://127.0.0.1:389".into(), false)
        );
        assert_eq!(
            (listen[1].url.to_string(), listen[1].require_tls),
            ("ldap://127.0.0.1:3389".into(), true)
        );
        assert_eq!(listen[2].url.to_string(), "ldaps://[::1]:636");
        assert!(config.proxy.upstream[0].is_ldaps());
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("needs TLS: set proxy.tls.cert"), "{err}");

        let with_cert = format!("{text}\n[proxy.tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n");
        assert!(
            Config::parse(&with_cert, Path::new("c.toml"))
                .unwrap()
                .validate()
                .is_ok()
        );
    }

    #[test]
    fn a_passthrough_listener_needs_no_certificate_but_a_directory_url_of_its_scheme() {
        let text = |upstream: &str| {
            format!(
                r#"
                [proxy]
                upstream = ["{upstream}"]
                listen = [{{ url = "ldaps://127.0.0.1:636", tls = "passthrough" }}, {{ url = "ldap://127.0.0.1:389", tls = "passthrough", require_tls = true }}]
                "#
            )
        };
        let config = Config::parse(&text("ldaps://dir.example.com"), Path::new("c.toml")).unwrap();
        assert_eq!(config.proxy.listen[0].tls, ListenerTls::Passthrough);
        let problems: Vec<String> = config.proxy_problems().iter().map(ToString::to_string).collect();
        assert_eq!(
            problems,
            [
                "proxy.listen: ldap://127.0.0.1:389 passes TLS through to the directory, which needs an ldap:// URL in proxy.upstream"
            ]
        );
        let config = Config::parse(&text("ldap://dir.example.com"), Path::new("c.toml")).unwrap();
        let problems: Vec<String> = config.proxy_problems().iter().map(ToString::to_string).collect();
        assert_eq!(
            problems,
            [
                "proxy.listen: ldaps://127.0.0.1:636 passes TLS through to the directory, which needs an ldaps:// URL in proxy.upstream"
            ]
        );
        let unknown = text("ldap://d").replace("passthrough\", require_tls", "relay\", require_tls");
        let err = Config::parse(&unknown, Path::new("c.toml")).unwrap_err().to_string();
        assert!(err.contains("unknown variant `relay`"), "{err}");
    }

    #[test]
    fn a_multiplexed_listener_needs_an_identity_to_share_and_cannot_pass_tls_through() {
        let problems = |listen: &str, multiplex: &str| -> Vec<String> {
            let text = format!("[proxy]\nupstream = [\"ldap://dir.example.com\"]\nlisten = [{listen}]\n{multiplex}");
            let config = Config::parse(&text, Path::new("c.toml")).unwrap();
            config.proxy_problems().iter().map(ToString::to_string).collect()
        };
        let multiplexed = r#"{ url = "ldap://127.0.0.1:389", mode = "multiplexed" }"#;
        let identity = "[proxy.multiplex]\nbind_dn = \"cn=ldapsync,dc=example,dc=com\"\npassword_env = \"MUX\"\n";
        assert_eq!(problems(multiplexed, identity), Vec::<String>::new());
        assert_eq!(
            problems(multiplexed, ""),
            [
                "proxy.multiplex.bind_dn: listener ldap://127.0.0.1:389 is multiplexed: set [proxy.multiplex] bind_dn \
                 and password_file, the identity of the shared connections"
            ]
        );
        let both = r#"{ url = "ldap://127.0.0.1:389", mode = "multiplexed", tls = "passthrough" }"#;
        assert_eq!(
            problems(both, identity),
            [
                "proxy.multiplex.mode: listener ldap://127.0.0.1:389 passes TLS through: its sessions cannot share connections"
            ]
        );
        let bad_dn = "[proxy.multiplex]\nbind_dn = \"not a dn\"\nconnections = 0\nmax_unread = 1000\n";
        assert_eq!(
            problems(multiplexed, bad_dn),
            [
                "proxy.multiplex.bind_dn: \"not a dn\" is not a DN",
                "proxy.multiplex.password_file: set password_file or password_env",
                "proxy.multiplex.connections = 0 is out of range: 1 to 1024",
                "proxy.multiplex.max_unread = 1000 is out of range: 65536 to 1073741824",
            ]
        );
    }

    #[test]
    fn presets_fill_what_the_file_leaves_unset() {
        let text = |preset: &str, extra: &str| {
            format!(
                r#"
                [proxy]
                upstream = ["ldap://d"]
                listen = ["ldap://127.0.0.1:389"]
                [[connector]]
                name = "c"
                bind_dn = "cn=sync"
                password_env = "P"
                preset = "{preset}"
                [connector.accounts]
                base = "ou=people,dc=example,dc=com"
                {extra}
                [connector.groups]
                base = "ou=groups,dc=example,dc=com"
                "#
            )
        };
        let connector = |preset: &str, extra: &str| {
            Config::parse(&text(preset, extra), Path::new("c.toml"))
                .unwrap()
                .connectors
                .remove(0)
        };
        let ds = connector("389ds", "");
        let (accounts, groups) = (ds.accounts.as_ref().unwrap(), ds.groups.as_ref().unwrap());
        assert_eq!(ds.id_attribute, "nsUniqueId");
        assert_eq!((accounts.naming.as_str(), accounts.rdn()), ("uid", "uid"));
        assert_eq!(accounts.filter, "(objectClass=inetOrgPerson)");
        assert_eq!(accounts.account_switch(), Some(AccountSwitch::Lock("nsAccountLock")));
        assert_eq!(
            (groups.naming.as_str(), groups.membership.as_deref()),
            ("cn", Some("member"))
        );
        assert_eq!(groups.account_switch(), None);

        let ad = connector("active-directory", "");
        let accounts = ad.accounts.as_ref().unwrap();
        assert_eq!(ad.id_attribute, "objectGUID");
        assert_eq!((accounts.naming.as_str(), accounts.rdn()), ("sAMAccountName", "cn"));
        assert_eq!(
            accounts.account_switch(),
            Some(AccountSwitch::ControlBit("userAccountControl"))
        );

        // The file wins, the enabled flag included.
        let own = connector("389ds", "naming = \"mail\"\naccount_control = \"flags\"");
        let accounts = own.accounts.as_ref().unwrap();
        assert_eq!(accounts.naming, "mail");
        assert_eq!(accounts.account_switch(), Some(AccountSwitch::ControlBit("flags")));
        assert_eq!(accounts.account_lock, None);
    }

    #[test]
    fn the_admin_api_needs_a_connector_with_accounts_and_a_group() {
        let base = r#"
            [proxy]
            upstream = ["ldap://d"]
            listen = ["ldap://127.0.0.1:389"]
        "#;
        let connector = r#"
            [[connector]]
            name = "c"
            bind_dn = "cn=sync"
            password_env = "P"
            [connector.accounts]
            base = "ou=people,dc=example,dc=com"
            naming = "uid"
        "#;
        let problems = |text: &str| -> Vec<String> {
            let config = Config::parse(text, Path::new("c.toml")).unwrap();
            let all = config.connector_problems().into_iter().map(|p| p.to_string());
            all.filter(|p| p.starts_with("admin")).collect()
        };
        let admin = |extra: &str| format!("{base}\n[admin]\nlisten = \"127.0.0.1:0\"\n{extra}\n{connector}");
        assert_eq!(
            problems(&admin("admin_group = \"cn=admins,dc=example,dc=com\"")),
            Vec::<String>::new()
        );
        assert_eq!(
            problems(&admin("")),
            ["admin.admin_group: set admin_group or auditor_group (a group entry's DN): nobody could log in"]
        );
        assert_eq!(
            problems(&admin(
                "auditor_group = \"not a dn\"\nconnector = \"d\"\nsession_timeout = \"1s\""
            )),
            [
                "admin.connector: no connector is called \"d\"",
                "admin.auditor_group: \"not a dn\" is not a DN",
                "admin.session_timeout = \"1s\" is out of range: 5s to 30days",
            ]
        );
        let without_connectors = format!("{base}\n[admin]\nlisten = \"127.0.0.1:0\"\nadmin_group = \"cn=a,dc=b\"");
        assert_eq!(
            problems(&without_connectors),
            ["admin.listen: the admin API logs operators in through a connector's directory: configure one"]
        );
    }
}
