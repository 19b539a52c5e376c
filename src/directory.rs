//! The connector's service connection to the directory: reads the entries
//! in scope and writes what the engine decided. It serves the sync engine
//! only; client operations never run under this identity.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use ldap3::adapters::{Adapter, EntriesOnly, PagedResults};
use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, Mod, Scope, SearchEntry, SearchStream};
use thiserror::Error;

use crate::config::{ConnectorConfig, ScopeConfig};

#[derive(Debug, Error)]
pub enum DirectoryError {
    #[error("no directory server reachable for connector {connector:?}: {reasons}")]
    Unreachable { connector: String, reasons: String },
    #[error("connector {connector:?}: TLS: {message}")]
    Tls { connector: String, message: String },
    #[error("service bind as {dn:?} failed: {message}")]
    Bind { dn: String, message: String },
    /// The connection or the protocol failed (I/O, a timeout, a reply
    /// that does not decode).
    #[error("{operation} {dn:?}: {message}")]
    Operation {
        operation: &'static str,
        dn: String,
        message: String,
    },
    /// The directory answered with an LDAP result code.
    #[error("{operation} {dn:?}: {message}")]
    Result {
        operation: &'static str,
        dn: String,
        code: u32,
        message: String,
    },
}

impl DirectoryError {
    /// The LDAP result code the directory answered with, if it answered.
    pub fn result_code(&self) -> Option<u32> {
        match self {
            DirectoryError::Result { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Worth trying again later: the directory is down, busy, unavailable
    /// or the connection failed — not a refusal of what was asked
    /// (`constraintViolation`, `insufficientAccessRights`, …), which
    /// trying again would only repeat.
    pub fn is_transient(&self) -> bool {
        const TIME_LIMIT: u32 = 3;
        const BUSY: u32 = 51;
        const UNAVAILABLE: u32 = 52;
        const OTHER: u32 = 80;
        match self {
            DirectoryError::Unreachable { .. } | DirectoryError::Operation { .. } => true,
            DirectoryError::Result { code, .. } => matches!(*code, TIME_LIMIT | BUSY | UNAVAILABLE | OTHER),
            DirectoryError::Tls { .. } | DirectoryError::Bind { .. } => false,
        }
    }

    /// An `ldap3` error, keeping the result code when there is one.
    pub(crate) fn from_ldap(operation: &'static str, dn: &str, e: ldap3::LdapError) -> DirectoryError {
        match e {
            ldap3::LdapError::LdapResult { result } => DirectoryError::Result {
                operation,
                dn: dn.to_owned(),
                code: result.rc,
                message: ldap3::LdapError::LdapResult { result }.to_string(),
            },
            other => DirectoryError::Operation {
                operation,
                dn: dn.to_owned(),
                message: other.to_string(),
            },
        }
    }
}

/// A directory entry as the engine sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The stable id (entryUUID, or objectGUID as a GUID string).
    pub id: String,
    pub dn: String,
    /// Attribute name, lowercased → values.
    pub attrs: BTreeMap<String, Vec<String>>,
}

impl Entry {
    pub fn get(&self, attr: &str) -> &[String] {
        self.attrs.get(&attr.to_lowercase()).map(Vec::as_slice).unwrap_or(&[])
    }
}

/// How a directory takes a new password.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordKind {
    UnicodePwd,
    PasswordModify,
}

/// One attribute's change in a modify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttrMod {
    /// These values and no others (none: the attribute goes).
    Replace(String, Vec<String>),
    Add(String, Vec<String>),
    Delete(String, Vec<String>),
}

pub struct Directory {
    ldap: Ldap,
    id_attribute: String,
}

const PAGE_SIZE: i32 = 500;

impl Directory {
    /// Connects to the first reachable URL and binds as the service identity.
    pub async fn connect(
        connector: &ConnectorConfig,
        password: &str,
        timeout: Duration,
    ) -> Result<Directory, DirectoryError> {
        let mut reasons = Vec::new();
        let tls = connector.tls.clone().unwrap_or_default();
        let needs_tls = tls.starttls || connector.upstream.iter().any(|u| u.is_ldaps());
        let tls_config = match needs_tls {
            true => Some(crate::tls::client_config(&tls).map_err(|e| DirectoryError::Tls {
                connector: connector.name.clone(),
                message: e.to_string(),
            })?),
            false => None,
        };
        for url in &connector.upstream {
            let mut settings = LdapConnSettings::new().set_conn_timeout(timeout);
            if let Some(config) = &tls_config {
                settings = settings
                    .set_config(Arc::clone(config))
                    .set_starttls(tls.starttls && !url.is_ldaps());
            }
            match LdapConnAsync::with_settings(settings, &url.to_string()).await {
                Ok((conn, mut ldap)) => {
                    ldap3::drive!(conn);
                    ldap.with_timeout(timeout);
                    let bind = ldap
                        .simple_bind(&connector.bind_dn, password)
                        .await
                        .and_then(|r| r.success())
                        .map_err(|e| DirectoryError::Bind {
                            dn: connector.bind_dn.clone(),
                            message: e.to_string(),
                        });
                    bind?;
                    return Ok(Directory {
                        ldap,
                        id_attribute: connector.id_attribute.clone(),
                    });
                }
                Err(e) => reasons.push(format!("{url}: {e}")),
            }
        }
        Err(DirectoryError::Unreachable {
            connector: connector.name.clone(),
            reasons: reasons.join("; "),
        })
    }

    fn attributes(&self, scope: &ScopeConfig) -> Vec<String> {
        let mut attrs: Vec<String> = vec![self.id_attribute.clone(), scope.naming.clone()];
        attrs.extend(scope.map.keys().cloned());
        attrs.extend(scope.membership.clone());
        attrs.extend(scope.account_control.clone());
        attrs.extend(scope.account_lock.clone());
        attrs
    }

    /// The in-scope entries matching `filter` too, read page by page as the
    /// caller consumes them, with `extra` attributes besides the mapped ones.
    pub async fn stream(
        &mut self,
        scope: &ScopeConfig,
        filter: &str,
        extra: &[&str],
    ) -> Result<Entries, DirectoryError> {
        let mut attrs = self.attributes(scope);
        attrs.extend(extra.iter().map(|a| a.to_string()));
        self.paged(scope, filter, attrs).await
    }

    async fn paged(
        &mut self,
        scope: &ScopeConfig,
        filter: &str,
        attrs: Vec<String>,
    ) -> Result<Entries, DirectoryError> {
        let adapters: Vec<Box<dyn Adapter<_, _>>> =
            vec![Box::new(EntriesOnly::new()), Box::new(PagedResults::new(PAGE_SIZE))];
        let filter = format!("(&{}{filter})", scope.filter);
        let stream = self
            .ldap
            .streaming_search_with(adapters, &scope.base, Scope::Subtree, &filter, attrs)
            .await
            .map_err(|e| search_error(&scope.base, e))?;
        Ok(Entries {
            stream,
            base: scope.base.clone(),
            id_attribute: self.id_attribute.clone(),
        })
    }

    /// The root DSE's `attrs`, names lowercased.
    pub async fn root_dse(&mut self, attrs: &[&str]) -> Result<BTreeMap<String, Vec<String>>, DirectoryError> {
        self.read("", attrs).await
    }

    /// The names (lowercased) of the attribute types and object classes in
    /// the directory's subschema (RFC 4512 §4.2).
    pub async fn schema_names(&mut self) -> Result<(BTreeSet<String>, BTreeSet<String>), DirectoryError> {
        let root = self.root_dse(&["subschemaSubentry"]).await?;
        let subschema = root
            .get("subschemasubentry")
            .and_then(|v| v.first())
            .cloned()
            .unwrap_or_else(|| "cn=Subschema".into());
        let (entries, _) = self
            .ldap
            .search(
                &subschema,
                Scope::Base,
                "(objectClass=subschema)",
                vec!["attributeTypes", "objectClasses"],
            )
            .await
            .and_then(|r| r.success())
            .map_err(|e| search_error(&subschema, e))?;
        let entry = entries.into_iter().next().map(SearchEntry::construct);
        let names = |attr: &str| -> BTreeSet<String> {
            entry
                .as_ref()
                .and_then(|e| e.attrs.iter().find(|(k, _)| k.eq_ignore_ascii_case(attr)))
                .map(|(_, values)| values.iter().flat_map(|d| definition_names(d)).collect())
                .unwrap_or_default()
        };
        Ok((names("attributeTypes"), names("objectClasses")))
    }

    /// The stable ids of objects deleted since `usn` (Active Directory:
    /// tombstones under CN=Deleted Objects, read with the show-deleted
    /// control; their objectGUID survives the delete).
    pub async fn tombstones_since(&mut self, usn: u64) -> Result<Vec<String>, DirectoryError> {
        const SHOW_DELETED: &str = "1.2.840.113556.1.4.417";
        let root = self.root_dse(&["defaultNamingContext"]).await?;
        let Some(context) = root.get("defaultnamingcontext").and_then(|v| v.first()).cloned() else {
            return Ok(Vec::new());
        };
        let base = format!("CN=Deleted Objects,{context}");
        let control = ldap3::controls::RawControl {
            ctype: SHOW_DELETED.into(),
            crit: true,
            val: None,
        };
        let filter = format!("(&(isDeleted=TRUE)(uSNChanged>={usn}))");
        let (entries, _) = self
            .ldap
            .with_controls(vec![control])
            .search(&base, Scope::OneLevel, &filter, vec![self.id_attribute.as_str()])
            .await
            .and_then(|r| r.success())
            .map_err(|e| search_error(&base, e))?;
        Ok(entries
            .into_iter()
            .filter_map(|raw| self.entry(SearchEntry::construct(raw)))
            .map(|entry| entry.id)
            .collect())
    }

    /// The values of `attrs` of the entry at `dn` (none when it does not
    /// exist), attribute names lowercased.
    pub async fn read(&mut self, dn: &str, attrs: &[&str]) -> Result<BTreeMap<String, Vec<String>>, DirectoryError> {
        const NO_SUCH_OBJECT: u32 = 32;
        let result = self
            .ldap
            .search(dn, Scope::Base, "(objectClass=*)", attrs.to_vec())
            .await
            .and_then(|r| r.success())
            .map_err(|e| DirectoryError::from_ldap("read", dn, e));
        let entries = match result {
            Ok((entries, _)) => entries,
            Err(e) if e.result_code() == Some(NO_SUCH_OBJECT) => return Ok(BTreeMap::new()),
            Err(e) => return Err(e),
        };
        Ok(entries
            .into_iter()
            .next()
            .map(|raw| {
                SearchEntry::construct(raw)
                    .attrs
                    .into_iter()
                    .map(|(name, values)| (name.to_lowercase(), values))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// The attribute that holds the stable id (`entryUUID`, …).
    pub fn id_attribute(&self) -> &str {
        &self.id_attribute
    }

    /// The stable id of a search result, if it has one.
    pub fn entry_id(&self, raw: SearchEntry) -> Option<String> {
        self.entry(raw).map(|entry| entry.id)
    }

    /// The connection itself, for searches with controls of their own.
    pub(crate) fn ldap(&mut self) -> &mut Ldap {
        &mut self.ldap
    }

    async fn search(&mut self, scope: &ScopeConfig, filter: &str) -> Result<Vec<Entry>, DirectoryError> {
        let result = self
            .ldap
            .search(&scope.base, Scope::Subtree, filter, self.attributes(scope))
            .await
            .and_then(|r| r.success())
            .map_err(|e| DirectoryError::from_ldap("search", &scope.base, e))?;
        Ok(result
            .0
            .into_iter()
            .filter_map(|raw| self.entry(SearchEntry::construct(raw)))
            .collect())
    }

    /// The id as a filter assertion value: a GUID string becomes the
    /// escaped bytes AD stores (little-endian fields).
    fn id_assertion(&self, id: &str) -> String {
        match uuid::Uuid::parse_str(id) {
            Ok(guid) if self.id_attribute.eq_ignore_ascii_case("objectGUID") => {
                guid.to_bytes_le().iter().map(|b| format!("\\{b:02x}")).collect()
            }
            _ => ldap3::ldap_escape(id).into_owned(),
        }
    }

    fn entry(&self, raw: SearchEntry) -> Option<Entry> {
        to_entry(&self.id_attribute, raw)
    }

    /// Sets an entry's password as the service identity: Active Directory's
    /// `unicodePwd` (the quoted password in UTF-16LE), or elsewhere the
    /// Password Modify extended operation (RFC 3062). The caller ensures
    /// the connection is under TLS.
    pub async fn set_password(&mut self, dn: &str, password: &str, kind: PasswordKind) -> Result<(), DirectoryError> {
        match kind {
            PasswordKind::UnicodePwd => {
                let value: Vec<u8> = format!("\"{password}\"")
                    .encode_utf16()
                    .flat_map(u16::to_le_bytes)
                    .collect();
                let mods = vec![Mod::Replace(b"unicodePwd".to_vec(), HashSet::from([value]))];
                check("modify", dn, self.ldap.modify(dn, mods).await)
            }
            PasswordKind::PasswordModify => {
                let exop = ldap3::exop::PasswordModify {
                    user_id: Some(dn),
                    old_pass: None,
                    new_pass: Some(password),
                };
                let result = self.ldap.extended(exop).await.map(|r| r.1);
                check("password modify", dn, result)
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.ldap.unbind().await;
    }
}

fn check(
    operation: &'static str,
    dn: &str,
    result: ldap3::result::Result<ldap3::LdapResult>,
) -> Result<(), DirectoryError> {
    result
        .and_then(|r| r.success())
        .map(|_| ())
        .map_err(|e| DirectoryError::from_ldap(operation, dn, e))
}

/// A search result as an [`Entry`]; `None` without a stable id.
fn to_entry(id_attribute: &str, raw: SearchEntry) -> Option<Entry> {
    let mut attrs: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, values) in raw.attrs {
        attrs.entry(name.to_lowercase()).or_default().extend(values);
    }
    let id_key = id_attribute.to_lowercase();
    let id = match attrs.get(&id_key).and_then(|v| v.first()) {
        Some(text) => text.clone(),
        // objectGUID is binary: shown as the GUID string AD tools print.
        None => raw
            .bin_attrs
            .iter()
            .find(|(name, _)| name.to_lowercase() == id_key)
            .and_then(|(_, values)| values.first())
            .and_then(|bytes| uuid::Uuid::from_slice_le(bytes).ok())
            .map(|guid| guid.to_string())?,
    };
    attrs.remove(&id_key);
    Some(Entry { id, dn: raw.dn, attrs })
}

/// The NAMEs of a schema definition, e.g. `( 2.5.4.3 NAME ( 'cn'
/// 'commonName' ) … )`, lowercased.
fn definition_names(definition: &str) -> Vec<String> {
    let Some(after) = definition.split_once(" NAME ").map(|(_, rest)| rest.trim_start()) else {
        return Vec::new();
    };
    let names = match after.strip_prefix('(') {
        Some(list) => list.split(')').next().unwrap_or_default(),
        None => after.split_whitespace().next().unwrap_or_default(),
    };
    names
        .split_whitespace()
        .map(|n| n.trim_matches('\'').to_lowercase())
        .filter(|n| !n.is_empty())
        .collect()
}

/// What the sync engine needs of a directory: the entries of a scope, one
/// entry found by DN, stable id or name, and the four writes. The LDAP
/// client implements it; the engine's unit tests use an in-memory one.
pub trait DirectoryOps: Send {
    type Entries: EntryStream + 'static;

    /// The stable id and name of every entry in scope.
    fn names(&mut self, scope: &ScopeConfig) -> impl Future<Output = Result<Self::Entries, DirectoryError>> + Send;

    /// Every entry in scope with the mapped attributes, read as the caller
    /// consumes them.
    fn entries(&mut self, scope: &ScopeConfig) -> impl Future<Output = Result<Self::Entries, DirectoryError>> + Send;

    /// The in-scope entry with the given stable id, wherever it now is.
    fn entry_by_id(
        &mut self,
        scope: &ScopeConfig,
        id: &str,
    ) -> impl Future<Output = Result<Option<Entry>, DirectoryError>> + Send;

    /// The in-scope entries whose naming attribute has `value`.
    fn entries_named(
        &mut self,
        scope: &ScopeConfig,
        value: &str,
    ) -> impl Future<Output = Result<Vec<Entry>, DirectoryError>> + Send;

    /// The in-scope entry with the given DN, if there is one.
    fn entry_at(
        &mut self,
        scope: &ScopeConfig,
        dn: &str,
    ) -> impl Future<Output = Result<Option<Entry>, DirectoryError>> + Send;

    fn add(
        &mut self,
        dn: &str,
        attrs: &BTreeMap<String, Vec<String>>,
    ) -> impl Future<Output = Result<(), DirectoryError>> + Send;

    /// Applies the changes in one modify operation.
    fn modify(&mut self, dn: &str, changes: Vec<AttrMod>) -> impl Future<Output = Result<(), DirectoryError>> + Send;

    /// Gives the entry a new RDN under the same parent (the old RDN value goes).
    fn rename(&mut self, dn: &str, new_rdn: &str) -> impl Future<Output = Result<(), DirectoryError>> + Send;

    fn delete(&mut self, dn: &str) -> impl Future<Output = Result<(), DirectoryError>> + Send;
}

/// Entries of a read, as the caller consumes them.
pub trait EntryStream: Send {
    fn next(&mut self) -> impl Future<Output = Result<Option<Entry>, DirectoryError>> + Send;
}

impl DirectoryOps for Directory {
    type Entries = Entries;

    async fn names(&mut self, scope: &ScopeConfig) -> Result<Entries, DirectoryError> {
        let attrs = vec![self.id_attribute.clone(), scope.naming.clone()];
        self.paged(scope, "", attrs).await
    }

    async fn entry_by_id(&mut self, scope: &ScopeConfig, id: &str) -> Result<Option<Entry>, DirectoryError> {
        let filter = format!("(&{}({}={}))", scope.filter, self.id_attribute, self.id_assertion(id));
        Ok(self.search(scope, &filter).await?.into_iter().next())
    }

    async fn entries_named(&mut self, scope: &ScopeConfig, value: &str) -> Result<Vec<Entry>, DirectoryError> {
        let filter = format!("(&{}({}={}))", scope.filter, scope.naming, ldap3::ldap_escape(value));
        self.search(scope, &filter).await
    }

    async fn entry_at(&mut self, scope: &ScopeConfig, dn: &str) -> Result<Option<Entry>, DirectoryError> {
        let result = self
            .ldap
            .search(dn, Scope::Base, &scope.filter, self.attributes(scope))
            .await
            .map_err(|e| DirectoryError::from_ldap("read", dn, e))?;
        Ok(result
            .0
            .into_iter()
            .find_map(|raw| self.entry(SearchEntry::construct(raw))))
    }

    async fn add(&mut self, dn: &str, attrs: &BTreeMap<String, Vec<String>>) -> Result<(), DirectoryError> {
        let attrs: Vec<(String, HashSet<String>)> = attrs
            .iter()
            .map(|(k, v)| (k.clone(), v.iter().cloned().collect()))
            .collect();
        check("add", dn, self.ldap.add(dn, attrs).await)
    }

    async fn modify(&mut self, dn: &str, changes: Vec<AttrMod>) -> Result<(), DirectoryError> {
        let mods: Vec<Mod<String>> = changes
            .into_iter()
            .map(|change| match change {
                AttrMod::Replace(attr, values) => Mod::Replace(attr, values.into_iter().collect()),
                AttrMod::Add(attr, values) => Mod::Add(attr, values.into_iter().collect()),
                AttrMod::Delete(attr, values) => Mod::Delete(attr, values.into_iter().collect()),
            })
            .collect();
        check("modify", dn, self.ldap.modify(dn, mods).await)
    }

    async fn rename(&mut self, dn: &str, new_rdn: &str) -> Result<(), DirectoryError> {
        check("modrdn", dn, self.ldap.modifydn(dn, new_rdn, true, None).await)
    }

    async fn delete(&mut self, dn: &str) -> Result<(), DirectoryError> {
        check("delete", dn, self.ldap.delete(dn).await)
    }

    async fn entries(&mut self, scope: &ScopeConfig) -> Result<Entries, DirectoryError> {
        self.stream(scope, "", &[]).await
    }
}

/// Entries of a paged search, fetched a page at a time.
pub struct Entries {
    stream: SearchStream<'static, String, Vec<String>>,
    base: String,
    id_attribute: String,
}

impl EntryStream for Entries {
    async fn next(&mut self) -> Result<Option<Entry>, DirectoryError> {
        loop {
            match self.stream.next().await.map_err(|e| search_error(&self.base, e))? {
                Some(raw) => {
                    if let Some(entry) = to_entry(&self.id_attribute, SearchEntry::construct(raw)) {
                        return Ok(Some(entry));
                    }
                }
                None => {
                    self.stream
                        .finish()
                        .await
                        .success()
                        .map_err(|e| search_error(&self.base, e))?;
                    return Ok(None);
                }
            }
        }
    }
}

fn search_error(base: &str, e: ldap3::LdapError) -> DirectoryError {
    DirectoryError::from_ldap("search", base, e)
}

#[cfg(test)]
mod tests {
    use super::{DirectoryError, definition_names};

    #[test]
    fn busy_and_unavailable_are_tried_again_refusals_are_not() {
        let answered = |code| DirectoryError::Result {
            operation: "modify",
            dn: "uid=a,dc=x".into(),
            code,
            message: String::new(),
        };
        let cases = [
            (51, true),
            (52, true),
            (3, true),
            (19, false),
            (50, false),
            (32, false),
            (68, false),
        ];
        for (code, transient) in cases {
            assert_eq!(answered(code).is_transient(), transient, "result code {code}");
            assert_eq!(answered(code).result_code(), Some(code));
        }
        let lost = DirectoryError::Operation {
            operation: "modify",
            dn: "uid=a,dc=x".into(),
            message: "connection closed".into(),
        };
        assert!(lost.is_transient() && lost.result_code().is_none());
    }

    #[test]
    fn schema_definition_names() {
        assert_eq!(
            definition_names("( 2.5.4.3 NAME ( 'cn' 'commonName' ) DESC 'RFC4519' SUP name )"),
            ["cn", "commonname"]
        );
        assert_eq!(
            definition_names("( 0.9.2342.19200300.100.1.1 NAME 'uid' EQUALITY x )"),
            ["uid"]
        );
        assert!(definition_names("( 1.2.3 DESC 'no name' )").is_empty());
    }
}
