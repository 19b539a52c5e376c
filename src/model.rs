//! The vocabulary every layer shares (DESIGN.md, "Vocabulary"): the
//! categories of objects, where a change was seen, how the poller finds
//! changes, directions and conflict policies, and the local field names.
//! It imports nothing of the crate: config, store, poller, sync and the
//! CLI all import from here.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An enum whose variants have one name each: `as_str`, `Display`,
/// `FromStr` and `ALL` come from this one list (serde's `rename_all` on
/// each enum gives the same names, which a test checks).
macro_rules! named {
    (
        $(#[$meta:meta])*
        pub enum $name:ident ($what:literal) {
            $($(#[$vmeta:meta])* $variant:ident = $text:literal,)*
        }
    ) => {
        $(#[$meta])*
        pub enum $name {
            $($(#[$vmeta])* $variant,)*
        }

        impl $name {
            pub const ALL: &[$name] = &[$($name::$variant),*];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)*
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                Self::ALL
                    .iter()
                    .copied()
                    .find(|v| v.as_str() == s)
                    .ok_or_else(|| format!("unknown {} {s:?}", $what))
            }
        }
    };
}

named! {
    /// Accounts or groups.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema)]
    #[serde(rename_all = "lowercase")]
    pub enum Category ("category") {
        Account = "account",
        Group = "group",
    }
}

named! {
    /// Where a change was seen.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
    #[serde(rename_all = "lowercase")]
    pub enum ChangeSource ("change source") {
        /// A write that went through the proxy.
        Proxy = "proxy",
        /// The directory, read by the poller or a sync pass.
        Poll = "poll",
        /// The local store (CLI or admin API).
        Local = "local",
    }
}

named! {
    /// What a journal line records: a decision of the engine, or an
    /// administrator's act.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema)]
    #[serde(rename_all = "kebab-case")]
    pub enum Action ("journal action") {
        /// First sync matched an object and an entry by name.
        Associated = "associated",
        /// An administrator associated them (`association link`).
        Linked = "linked",
        CreatedLocal = "created-local",
        CreatedLdap = "created-ldap",
        Updated = "updated",
        /// One side's edits were put back (a one-way direction).
        Overwritten = "overwritten",
        ConflictResolved = "conflict-resolved",
        /// Both sides had made the same change: only the baseline moved.
        Converged = "converged",
        /// Only the entry's DN changed.
        Moved = "moved",
        Disputed = "disputed",
        Failed = "failed",
        Deleted = "deleted",
        Disabled = "disabled",
        /// The entry left the scope under `delete = "ignore"`.
        EntryGoneIgnored = "entry-gone-ignored",
        /// The mass-delete guard held the deletes.
        DeleteRefused = "delete-refused",
        LocalAdd = "local-add",
        LocalEdit = "local-edit",
        LocalDelete = "local-delete",
        AssociationRemoved = "association-removed",
        PasswordSet = "password-set",
        /// An operator started a full pass from the API or the console.
        PassRequested = "pass-requested",
        /// An operator had a webhook's dead letter delivered again.
        DeadLetterRetried = "dead-letter-retried",
        /// An operator discarded a webhook's dead letter.
        DeadLetterDiscarded = "dead-letter-discarded",
    }
}

named! {
    /// What an operator of the admin API and console may do.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
    #[serde(rename_all = "kebab-case")]
    pub enum Role ("role") {
        /// Read and change.
        Admin = "admin",
        /// Read only.
        Auditor = "auditor",
    }
}

named! {
    /// How a connector finds the directory's changes.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    pub enum Mechanism ("poll mechanism") {
        /// RFC 4533 refreshOnly with a stored cookie (OpenLDAP syncprov):
        /// reports adds, modifies, renames and deletes.
        Syncrepl = "syncrepl",
        /// `modifyTimestamp` at or after the watermark (any server); deletes
        /// are found by the full reconciliation.
        Timestamp = "timestamp",
        /// Active Directory: `uSNChanged` above the domain controller's
        /// highestCommittedUSN watermark; deletes from the tombstones.
        Usn = "usn",
        /// Active Directory's DirSync control with a stored cookie: changes and
        /// deletes of the naming context, on any domain controller.
        Dirsync = "dirsync",
        /// 389 Directory Server's Retro Changelog (`cn=changelog`): changes
        /// after a stored change number, deletes and renames included; a
        /// changelog trimmed past the watermark means a full reconciliation.
        Changelog = "changelog",
        /// No incremental reads: every poll is a full reconciliation.
        Full = "full",
    }
}

named! {
    /// Which way changes may flow for a connector.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
    #[serde(rename_all = "kebab-case")]
    pub enum Direction ("direction") {
        Both = "both",
        LdapToLocal = "ldap-to-local",
        LocalToLdap = "local-to-ldap",
    }
}

named! {
    /// The resolution of a field changed on both sides under `merge`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
    #[serde(rename_all = "kebab-case")]
    pub enum Fallback ("merge fallback") {
        LocalWins = "local-wins",
        LdapWins = "ldap-wins",
        NoChange = "no-change",
    }
}

/// How a conflict is resolved under [`Direction::Both`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConflictPolicy {
    /// Local values are written to the directory; directory changes are lost.
    LocalWins,
    /// Directory values are written locally; local changes are lost.
    LdapWins,
    /// Both changes are discarded: both sides go back to the baseline.
    NoChange,
    /// Changes to different fields are all kept; a field changed on both
    /// sides is resolved by the fallback policy.
    Merge(Fallback),
}

impl fmt::Display for ConflictPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConflictPolicy::LocalWins => f.write_str("local-wins"),
            ConflictPolicy::LdapWins => f.write_str("ldap-wins"),
            ConflictPolicy::NoChange => f.write_str("no-change"),
            ConflictPolicy::Merge(fallback) => write!(f, "merge ({fallback:?} on overlap)"),
        }
    }
}

/// Field name → values (a set: sorted, no duplicates), in local field names.
pub type Values = BTreeMap<String, Vec<String>>;

/// The local field the naming attribute feeds.
pub const NAME_FIELD: &str = "name";
/// The local field group membership feeds.
pub const MEMBERS_FIELD: &str = "members";
/// The local field `account_control` feeds.
pub const ENABLED_FIELD: &str = "enabled";

/// A change seen by one of the three sources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeEvent {
    pub source: ChangeSource,
    pub change: Change,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A directory entry was added, modified or renamed; it is now at `dn`.
    Entry { category: Category, dn: String },
    /// The directory entry at `dn` was deleted.
    EntryRemoved { category: Category, dn: String },
    /// A local object was added or edited.
    Local { category: Category, name: String },
}

impl Change {
    pub fn category(&self) -> Category {
        match self {
            Change::Entry { category, .. } | Change::EntryRemoved { category, .. } | Change::Local { category, .. } => {
                *category
            }
        }
    }
}

/// What the mechanism says about entries that left the scope.
#[derive(Debug)]
pub enum Departures {
    /// These entries (by stable id) were deleted or moved out.
    Listed(Vec<String>),
    /// Every entry not in this set of stable ids has gone (RFC 4533's
    /// present phase).
    AllBut(HashSet<String>),
    /// The mechanism cannot see deletes; the full reconciliation finds them.
    NotReported,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each enum's names are serde's too: a config file, the journal and
    /// the CLI spell them alike.
    #[test]
    fn names_round_trip_and_match_serde() {
        fn check<T>(all: &[T])
        where
            T: Copy + fmt::Display + FromStr<Err = String> + PartialEq + fmt::Debug + Serialize,
        {
            for v in all {
                assert_eq!(v.to_string().parse::<T>(), Ok(*v));
                assert_eq!(serde_json::to_value(v).unwrap(), serde_json::json!(v.to_string()));
            }
        }
        check(Category::ALL);
        check(ChangeSource::ALL);
        check(Role::ALL);
        check(Direction::ALL);
        check(Fallback::ALL);
        for m in Mechanism::ALL {
            assert_eq!(m.as_str().parse::<Mechanism>(), Ok(*m));
        }
        assert!("persistent-search".parse::<Mechanism>().is_err());
    }
}
