//! 389 Directory Server's Retro Changelog: one entry per change under
//! `cn=changelog`, numbered by `changeNumber`; the root DSE names the
//! changelog and its first and last numbers. A watermark is the last
//! number read. The changelog is trimmed (by age or count): a watermark
//! older than its first entry no longer holds, and a full reconciliation
//! takes over.

use ldap3::{Scope, SearchEntry};

use crate::config::ScopeConfig;
use crate::directory::{Directory, DirectoryError};
use crate::dn;

/// The changelog as the root DSE describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bounds {
    /// Where its entries are (`cn=changelog`).
    pub base: String,
    /// The first and last change numbers it holds (0 and 0 while empty).
    pub first: u64,
    pub last: u64,
}

impl Bounds {
    /// Whether every change after `since` is still in the changelog.
    pub fn holds(&self, since: u64) -> bool {
        // Emptied (trimmed to nothing) or recreated: numbers may restart.
        self.last >= since && (self.first <= since + 1 || self.first == 0)
    }
}

/// The changelog's bounds; `None` when the directory has none (the Retro
/// Changelog plugin is off).
pub async fn bounds(directory: &mut Directory) -> Result<Option<Bounds>, DirectoryError> {
    let root = directory
        .root_dse(&["changelog", "firstChangeNumber", "lastChangeNumber"])
        .await?;
    let number = |attr: &str| {
        root.get(attr)
            .and_then(|v| v.first())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(root.get("changelog").and_then(|v| v.first()).map(|base| Bounds {
        base: base.clone(),
        first: number("firstchangenumber"),
        last: number("lastchangenumber"),
    }))
}

/// Whether every change after `since` is still in the changelog: the
/// bounds say so, and the next change is there (the root DSE's first number
/// may lag behind entries removed since it was computed).
pub async fn reaches_back(directory: &mut Directory, bounds: &Bounds, since: u64) -> Result<bool, DirectoryError> {
    if !bounds.holds(since) {
        return Ok(false);
    }
    if bounds.last == since {
        return Ok(true);
    }
    let filter = format!("(changeNumber={})", since + 1);
    let (entries, _) = directory
        .ldap()
        .search(&bounds.base, Scope::OneLevel, &filter, vec!["1.1"])
        .await
        .and_then(|r| r.success())
        .map_err(|e| read_error(bounds, e))?;
    Ok(!entries.is_empty())
}

fn read_error(bounds: &Bounds, e: ldap3::LdapError) -> DirectoryError {
    DirectoryError::Operation {
        operation: "changelog read",
        dn: bounds.base.clone(),
        message: e.to_string(),
    }
}

/// What the changelog says changed in one scope after a change number.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Read {
    /// DNs of entries added, modified or renamed into the scope, as they
    /// are now.
    pub written: Vec<String>,
    /// DNs entries were deleted at, or renamed away from.
    pub removed: Vec<String>,
    /// The last change number read.
    pub last: u64,
    /// DNs entries were renamed to (checked for entries below them).
    renamed: Vec<String>,
    /// A renamed entry with entries below it: they moved unseen.
    pub subtree_moved: Option<String>,
}

/// One changelog entry, as far as the poller needs it.
#[derive(Debug)]
struct Change {
    number: u64,
    kind: String,
    target: String,
    new_rdn: Option<String>,
    new_superior: Option<String>,
}

/// Change numbers read per search: a backlog (a bulk import, ldapsync
/// down for a while) is read in windows, within the server's size limit
/// and a bounded memory.
const WINDOW: u64 = 500;

/// 389 DS numbers a change before its changelog entry is written, and
/// concurrent writes commit in any order: a number the root DSE already
/// counts may be missing for a moment. A window is read again from its gap
/// this many times, this long apart, before the number counts as lost.
const GAP_READS: u32 = 20;
const GAP_WAIT: std::time::Duration = std::time::Duration::from_millis(50);

/// The changes after `since` up to the changelog's last (read at the
/// start, so that later ones are the next poll's), in `scope`'s subtree.
/// Every number must be there: a missing one was trimmed meanwhile or is
/// hidden from the service account, and skipping it would lose a change.
pub async fn changes(
    directory: &mut Directory,
    bounds: &Bounds,
    scope: &ScopeConfig,
    since: u64,
) -> Result<Read, DirectoryError> {
    let mut read = Read {
        last: since,
        ..Read::default()
    };
    let mut next = since + 1;
    while next <= bounds.last {
        let upto = (next + WINDOW - 1).min(bounds.last);
        // Read again from a gap only: what comes before it is in order.
        let mut changes = Vec::new();
        let mut from = next;
        let mut reads = 0;
        while from <= upto {
            if reads > GAP_READS {
                return Err(DirectoryError::Operation {
                    operation: "changelog read",
                    dn: bounds.base.clone(),
                    message: format!(
                        "change {from} is not in the changelog: trimmed meanwhile, or not readable by the service account"
                    ),
                });
            }
            if reads > 0 {
                tokio::time::sleep(GAP_WAIT).await;
            }
            reads += 1;
            let got = window(directory, bounds, from, upto).await?;
            let in_order = (from..).zip(&got).take_while(|(want, c)| *want == c.number).count();
            changes.extend(got.into_iter().take(in_order));
            from += in_order as u64;
        }
        for change in changes {
            read.apply(change, &scope.base);
        }
        read.last = upto;
        next = upto + 1;
    }
    read.written.dedup();
    read.removed.sort();
    read.removed.dedup();
    // A renamed entry with entries below it moved them all, and the
    // changelog names only it.
    for dn in std::mem::take(&mut read.renamed) {
        // sizeLimitExceeded says there are; a DN gone since says nothing.
        let ldap3::SearchResult(children, _) = directory
            .ldap()
            .with_search_options(ldap3::SearchOptions::new().sizelimit(1))
            .search(&dn, Scope::OneLevel, "(objectClass=*)", vec!["1.1"])
            .await
            .map_err(|e| read_error(bounds, e))?;
        if !children.is_empty() {
            read.subtree_moved = Some(dn);
            break;
        }
    }
    Ok(read)
}

/// The changes numbered `from` to `upto`, in order.
async fn window(
    directory: &mut Directory,
    bounds: &Bounds,
    from: u64,
    upto: u64,
) -> Result<Vec<Change>, DirectoryError> {
    let filter = format!("(&(changeNumber>={from})(changeNumber<={upto}))");
    let attrs = vec!["changeNumber", "changeType", "targetDn", "newRDN", "newSuperior"];
    let (entries, _) = directory
        .ldap()
        .search(&bounds.base, Scope::OneLevel, &filter, attrs)
        .await
        .and_then(|r| r.success())
        .map_err(|e| read_error(bounds, e))?;
    let mut changes: Vec<Change> = entries
        .into_iter()
        .filter_map(|raw| change(SearchEntry::construct(raw)))
        .collect();
    // The server returns them in no promised order.
    changes.sort_by_key(|c| c.number);
    Ok(changes)
}

impl Read {
    fn apply(&mut self, change: Change, base: &str) {
        match change.kind.to_ascii_lowercase().as_str() {
            "add" | "modify" if dn::is_within(&change.target, base) => self.written.push(change.target),
            "delete" if dn::is_within(&change.target, base) => self.removed.push(change.target),
            "modrdn" => {
                let Some(rdn) = change.new_rdn else { return };
                let parent = change.new_superior.as_deref().unwrap_or(dn::parent(&change.target));
                let now = dn::with_rdn(&rdn, parent);
                let (was_in, is_in) = (dn::is_within(&change.target, base), dn::is_within(&now, base));
                if was_in || is_in {
                    self.renamed.push(now.clone());
                }
                if was_in {
                    self.removed.push(change.target);
                }
                if is_in {
                    self.written.push(now);
                }
            }
            _ => {}
        }
    }
}

fn change(entry: SearchEntry) -> Option<Change> {
    let one = |attr: &str| {
        entry
            .attrs
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(attr))
            .and_then(|(_, v)| v.first())
            .cloned()
    };
    Some(Change {
        number: one("changeNumber")?.parse().ok()?,
        kind: one("changeType")?,
        target: one("targetDn")?,
        new_rdn: one("newRDN"),
        new_superior: one("newSuperior"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watermark_holds_while_the_changelog_reaches_back_to_it() {
        let bounds = |first, last| Bounds {
            base: "cn=changelog".into(),
            first,
            last,
        };
        // (bounds, watermark, holds)
        let cases = [
            (bounds(1, 10), 0, true),
            (bounds(1, 10), 10, true),
            (bounds(5, 10), 4, true),
            (bounds(6, 10), 4, false),
            (bounds(0, 0), 0, true),
            (bounds(0, 0), 7, false),
            (bounds(1, 3), 7, false),
        ];
        for (bounds, since, holds) in cases {
            assert_eq!(bounds.holds(since), holds, "{bounds:?} since {since}");
        }
    }

    #[test]
    fn changes_name_the_dns_in_scope_before_and_after_a_rename() {
        let base = "ou=people,dc=example,dc=com";
        let change = |number, kind: &str, target: &str, rdn: Option<&str>, superior: Option<&str>| Change {
            number,
            kind: kind.into(),
            target: target.into(),
            new_rdn: rdn.map(Into::into),
            new_superior: superior.map(Into::into),
        };
        let mut read = Read::default();
        for c in [
            change(1, "add", "uid=a,ou=people,dc=example,dc=com", None, None),
            change(2, "modify", "cn=x,ou=groups,dc=example,dc=com", None, None),
            change(3, "modrdn", "uid=a,ou=people,dc=example,dc=com", Some("uid=b"), None),
            change(
                4,
                "modrdn",
                "uid=c,ou=people,dc=example,dc=com",
                Some("uid=c"),
                Some("ou=gone,dc=example,dc=com"),
            ),
            change(5, "delete", "uid=d,ou=people,dc=example,dc=com", None, None),
            change(
                6,
                "modrdn",
                "uid=e,ou=gone,dc=example,dc=com",
                Some("uid=e"),
                Some("ou=people,dc=example,dc=com"),
            ),
        ] {
            read.apply(c, base);
        }
        assert_eq!(
            read.written,
            [
                "uid=a,ou=people,dc=example,dc=com",
                "uid=b,ou=people,dc=example,dc=com",
                "uid=e,ou=people,dc=example,dc=com"
            ]
        );
        assert_eq!(
            read.removed,
            [
                "uid=a,ou=people,dc=example,dc=com",
                "uid=c,ou=people,dc=example,dc=com",
                "uid=d,ou=people,dc=example,dc=com"
            ]
        );
    }
}
