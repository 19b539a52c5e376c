//! How one category's entries and local objects correspond: the mapped
//! fields both ways, member DNs ↔ account names, the enabled flag (AD's
//! bit, 389 DS's lock), and
//! which fields are secrets the journal names but never shows.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::config::{AccountSwitch, ConnectorConfig, ScopeConfig};
use crate::directory::Entry;
use crate::model::{Category, ENABLED_FIELD, MEMBERS_FIELD, NAME_FIELD, Values};
use crate::store::{LocalObject, Store, StoreError};

/// ACCOUNTDISABLE, bit 2 of AD's userAccountControl.
const ACCOUNT_DISABLED: i64 = 0x2;

/// `flags` with the ACCOUNTDISABLE bit set for a disabled account, the
/// other bits (the directory's business) as they were.
fn account_flags_with(flags: i64, enabled: bool) -> i64 {
    if enabled {
        flags & !ACCOUNT_DISABLED
    } else {
        flags | ACCOUNT_DISABLED
    }
}

/// One category's attribute mapping.
pub(super) struct Mapping<'a> {
    pub(super) scope: &'a ScopeConfig,
    pub(super) category: Category,
}

/// Directory attributes whose values are secrets: a field fed by one is
/// journaled by name only.
const SECRET_ATTRIBUTES: [&str; 6] = [
    "userPassword",
    "unicodePwd",
    "authPassword",
    "sambaNTPassword",
    "sambaLMPassword",
    "krbPrincipalKey",
];

/// A local field whose values must never reach the journal.
pub fn is_secret_field(field: &str) -> bool {
    let field = field.to_lowercase();
    field.contains("password") || field.contains("secret")
}

impl Mapping<'_> {
    /// The entry's name, lowercased for comparison (LDAP names compare without case).
    pub(super) fn name_of(&self, entry: &Entry) -> Option<String> {
        entry.get(&self.scope.naming).first().map(|n| n.to_lowercase())
    }

    fn is_secret(&self, field: &str) -> bool {
        is_secret_field(field)
            || self
                .scope
                .map
                .iter()
                .any(|(attr, f)| f == field && SECRET_ATTRIBUTES.iter().any(|s| s.eq_ignore_ascii_case(attr)))
    }

    /// Each field where the baseline, the two sides and the result do not
    /// all agree, with those values, for the journal: what a policy threw
    /// away is recorded, not only that something changed.
    pub(super) fn value_changes(
        &self,
        baseline: &Values,
        local: &Values,
        ldap: &Values,
        result: &Values,
    ) -> serde_json::Value {
        let mut changes = serde_json::Map::new();
        for field in self.fields() {
            let get = |values: &Values| values.get(&field).cloned().unwrap_or_default();
            let (b, l, d, r) = (get(baseline), get(local), get(ldap), get(result));
            if b == l && l == d && d == r {
                continue;
            }
            let entry = if self.is_secret(&field) {
                serde_json::json!("(secret: values not journaled)")
            } else {
                serde_json::json!({ "baseline": b, "local": l, "directory": d, "result": r })
            };
            changes.insert(field, entry);
        }
        serde_json::Value::Object(changes)
    }

    /// The local fields compared and synced.
    pub(super) fn fields(&self) -> BTreeSet<String> {
        let mut fields: BTreeSet<String> = self.scope.map.values().cloned().collect();
        fields.insert(NAME_FIELD.into());
        if self.scope.membership.is_some() {
            fields.insert(MEMBERS_FIELD.into());
        }
        if self.scope.account_switch().is_some() {
            fields.insert(ENABLED_FIELD.into());
        }
        fields
    }

    pub(super) fn local_values(&self, object: &LocalObject) -> Values {
        let mut values: Values = self
            .fields()
            .into_iter()
            .filter_map(|f| object.values.get(&f).map(|v| (f, normalized(v.clone()))))
            .filter(|(_, v)| !v.is_empty())
            .collect();
        values.insert(NAME_FIELD.into(), vec![object.name.clone()]);
        if self.scope.account_switch().is_some() {
            values.insert(ENABLED_FIELD.into(), vec![object.enabled.to_string()]);
        }
        values
    }

    pub(super) fn ldap_values(&self, entry: &Entry, members: &MemberIndex) -> Values {
        let mut values = Values::new();
        let mut put = |field: &str, v: Vec<String>| {
            let v = normalized(v);
            if !v.is_empty() {
                values.insert(field.to_owned(), v);
            }
        };
        put(
            NAME_FIELD,
            entry.get(&self.scope.naming).iter().take(1).cloned().collect(),
        );
        for (attr, field) in &self.scope.map {
            put(field, entry.get(attr).to_vec());
        }
        if let Some(attr) = &self.scope.membership {
            let names = entry.get(attr).iter().map(|m| member_name(attr, m, members)).collect();
            put(MEMBERS_FIELD, names);
        }
        let enabled = match self.scope.account_switch() {
            Some(AccountSwitch::ControlBit(_)) => self.account_flags(entry).map(|f| f & ACCOUNT_DISABLED == 0),
            Some(AccountSwitch::Lock(attr)) => Some(!is_locked(entry, attr)),
            None => None,
        };
        if let Some(enabled) = enabled {
            put(ENABLED_FIELD, vec![enabled.to_string()]);
        }
        values
    }

    /// The entry's account control flags, when the scope maps them.
    fn account_flags(&self, entry: &Entry) -> Option<i64> {
        let attr = self.scope.account_control.as_ref()?;
        entry.get(attr).first()?.parse().ok()
    }

    /// The modification that sets the entry's enabled flag, when the scope
    /// maps one (an AD entry without its flags gets none).
    pub(super) fn enabled_modification(&self, entry: &Entry, enabled: bool) -> Option<(String, Vec<String>)> {
        match self.scope.account_switch()? {
            AccountSwitch::ControlBit(attr) => {
                let flags = account_flags_with(self.account_flags(entry)?, enabled);
                Some((attr.to_owned(), vec![flags.to_string()]))
            }
            // Replacing with no value removes the attribute, and is a no-op
            // where it is absent (RFC 4511 §4.6).
            AccountSwitch::Lock(attr) => Some((attr.to_owned(), if enabled { vec![] } else { vec!["TRUE".into()] })),
        }
    }

    pub(super) fn to_attributes(&self, values: &Values, members: &MemberIndex) -> BTreeMap<String, Vec<String>> {
        let mut attrs = BTreeMap::new();
        if let Some(name) = values.get(NAME_FIELD) {
            attrs.insert(self.scope.naming.clone(), name.clone());
        }
        for (attr, field) in &self.scope.map {
            attrs.insert(attr.clone(), values.get(field).cloned().unwrap_or_default());
        }
        if let Some(attr) = &self.scope.membership {
            let names = values.get(MEMBERS_FIELD).cloned().unwrap_or_default();
            let dns = names.iter().map(|n| member_value(attr, n, members)).collect();
            attrs.insert(attr.clone(), normalized(dns));
        }
        attrs
    }

    /// The object with its synced fields set to `result` (others untouched).
    pub(super) fn apply_to_object(&self, mut object: LocalObject, result: &Values) -> LocalObject {
        for field in self.fields() {
            match result.get(&field) {
                Some(v) if field == NAME_FIELD => object.name = v[0].clone(),
                Some(v) if field == ENABLED_FIELD => object.enabled = v[0] == "true",
                None if field == ENABLED_FIELD => {}
                Some(v) => {
                    object.values.insert(field, v.clone());
                }
                None => {
                    object.values.remove(&field);
                }
            }
        }
        object
    }
}

/// A boolean lock attribute says TRUE (LDAP booleans are upper case, but
/// directories accept either).
fn is_locked(entry: &Entry, attr: &str) -> bool {
    entry.get(attr).first().is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

fn normalized(mut values: Vec<String>) -> Vec<String> {
    values.sort();
    values.dedup();
    values
}

/// A directory member value as a local member name.
fn member_name(attr: &str, value: &str, members: &MemberIndex) -> String {
    if attr.eq_ignore_ascii_case("memberUid") {
        return value.to_owned();
    }
    members
        .by_dn
        .get(&crate::dn::key(value))
        .cloned()
        // Members nobody is associated with stay as DNs, so they round-trip.
        .unwrap_or_else(|| value.to_owned())
}

/// A local member name as a directory member value.
fn member_value(attr: &str, name: &str, members: &MemberIndex) -> String {
    if attr.eq_ignore_ascii_case("memberUid") {
        return name.to_owned();
    }
    if let Some(dn) = members.by_name.get(name) {
        return dn.clone();
    }
    match &members.accounts {
        Some((naming, base)) if !name.contains('=') => format!("{naming}={},{base}", ldap3::dn_escape(name)),
        _ => name.to_owned(),
    }
}

/// Account DN ↔ name, for translating group membership.
#[derive(Default)]
pub(super) struct MemberIndex {
    by_dn: HashMap<String, String>,
    by_name: HashMap<String, String>,
    /// Naming attribute and base of accounts, for members not associated yet.
    accounts: Option<(String, String)>,
}

impl MemberIndex {
    pub(super) fn empty(connector: &ConnectorConfig) -> MemberIndex {
        MemberIndex {
            accounts: connector
                .accounts
                .as_ref()
                .map(|s| (s.rdn().to_owned(), s.base.clone())),
            ..MemberIndex::default()
        }
    }

    /// Only the members one entry and one object name: what a single
    /// change needs, without reading every association.
    pub(super) fn for_pair<S: Store>(
        store: &S,
        connector: &ConnectorConfig,
        mapping: &Mapping<'_>,
        entry: Option<&Entry>,
        object: Option<&LocalObject>,
    ) -> Result<MemberIndex, StoreError> {
        let mut index = MemberIndex::empty(connector);
        let Some(attr) = &mapping.scope.membership else {
            return Ok(index);
        };
        for dn in entry.map(|e| e.get(attr)).unwrap_or_default() {
            if let Some(account) = store.object_associated_at(&connector.name, dn)?
                && account.category == Category::Account
            {
                index.by_dn.insert(crate::dn::key(dn), account.name.clone());
                index.by_name.insert(account.name, dn.clone());
            }
        }
        let names = object
            .and_then(|o| o.values.get(MEMBERS_FIELD))
            .cloned()
            .unwrap_or_default();
        for name in names {
            if let Some(account) = store.object(Category::Account, &name)?
                && let Some(a) = store.association_by_object(&connector.name, account.id)?
            {
                index.by_dn.insert(crate::dn::key(&a.dn), name.clone());
                index.by_name.insert(name, a.dn);
            }
        }
        Ok(index)
    }

    pub(super) fn build<S: Store>(store: &S, connector: &ConnectorConfig) -> Result<MemberIndex, StoreError> {
        let mut index = MemberIndex::empty(connector);
        // Two reads, not one per association: a store may be a round trip away.
        let mut accounts: HashMap<i64, String> = store
            .objects(Category::Account)?
            .into_iter()
            .map(|o| (o.id, o.name))
            .collect();
        for a in store.associations(Some(&connector.name))? {
            if let Some(name) = accounts.remove(&a.object_id) {
                index.by_dn.insert(crate::dn::key(&a.dn), name.clone());
                index.by_name.insert(name, a.dn);
            }
        }
        Ok(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(control: Option<&str>, lock: Option<&str>) -> ScopeConfig {
        let text = format!(
            "base = \"ou=people,dc=example,dc=com\"\nnaming = \"uid\"\n{}{}",
            control.map_or(String::new(), |a| format!("account_control = \"{a}\"\n")),
            lock.map_or(String::new(), |a| format!("account_lock = \"{a}\"\n")),
        );
        toml::from_str(&text).unwrap()
    }

    fn entry(attrs: &[(&str, &str)]) -> Entry {
        Entry {
            id: "id".into(),
            dn: "uid=a,ou=people,dc=example,dc=com".into(),
            attrs: attrs
                .iter()
                .map(|(a, v)| (a.to_lowercase(), vec![v.to_string()]))
                .chain([("uid".into(), vec!["a".into()])])
                .collect(),
        }
    }

    type Modification = Option<(String, Vec<String>)>;

    /// One row of the table: what is read, and what each way writes.
    struct Case<'a> {
        case: &'a str,
        scope: &'a ScopeConfig,
        entry: Entry,
        enabled: Option<&'a str>,
        disable: Modification,
        enable: Modification,
    }

    #[test]
    fn the_enabled_flag_reads_and_writes_where_the_directory_keeps_it() {
        let ad = scope(Some("userAccountControl"), None);
        let ds = scope(None, Some("nsAccountLock"));
        let uac = |v: &str| entry(&[("userAccountControl", v)]);
        let set = |attr: &str, v: &[&str]| -> Modification {
            Some((attr.into(), v.iter().map(ToString::to_string).collect()))
        };
        let (ad_off, ad_on) = (set("userAccountControl", &["514"]), set("userAccountControl", &["512"]));
        let (lock, unlock) = (set("nsAccountLock", &["TRUE"]), set("nsAccountLock", &[]));
        let cases = [
            Case {
                case: "AD, enabled",
                scope: &ad,
                entry: uac("512"),
                enabled: Some("true"),
                disable: ad_off.clone(),
                enable: ad_on.clone(),
            },
            Case {
                case: "AD, disabled",
                scope: &ad,
                entry: uac("514"),
                enabled: Some("false"),
                disable: ad_off,
                enable: ad_on,
            },
            Case {
                case: "AD, no flags read",
                scope: &ad,
                entry: entry(&[]),
                enabled: None,
                disable: None,
                enable: None,
            },
            Case {
                case: "389 DS, unlocked",
                scope: &ds,
                entry: entry(&[]),
                enabled: Some("true"),
                disable: lock.clone(),
                enable: unlock.clone(),
            },
            Case {
                case: "389 DS, locked",
                scope: &ds,
                entry: entry(&[("nsAccountLock", "true")]),
                enabled: Some("false"),
                disable: lock.clone(),
                enable: unlock.clone(),
            },
            Case {
                case: "389 DS, lock false",
                scope: &ds,
                entry: entry(&[("nsAccountLock", "FALSE")]),
                enabled: Some("true"),
                disable: lock,
                enable: unlock,
            },
        ];
        for Case {
            case,
            scope,
            entry,
            enabled,
            disable,
            enable,
        } in cases
        {
            let mapping = Mapping {
                scope,
                category: Category::Account,
            };
            let values = mapping.ldap_values(&entry, &MemberIndex::default());
            assert_eq!(
                values.get(ENABLED_FIELD).map(|v| v[0].as_str()),
                enabled,
                "{case}: read"
            );
            assert_eq!(mapping.enabled_modification(&entry, false), disable, "{case}: disable");
            assert_eq!(mapping.enabled_modification(&entry, true), enable, "{case}: enable");
        }
    }
}
