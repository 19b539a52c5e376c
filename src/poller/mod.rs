//! The poller: what changed in a connector's scope since its last poll,
//! read with the best mechanism the directory offers, and the watermark
//! that says how far it has read.
//!
//! It only reads. The worker turns what it finds into `ChangeEvent`s for
//! the engine and stores the new watermark once they are applied, so a
//! crash replays a little and never skips anything.

pub mod changelog;
pub mod dirsync;
pub mod syncrepl;

use std::time::{Duration, Instant, SystemTime};

use crate::config::ScopeConfig;
use crate::directory::{Directory, DirectoryError, EntryStream};

use crate::model::{Departures, Mechanism};

/// Active Directory's capability OID (LDAP_CAP_ACTIVE_DIRECTORY_OID).
const AD_CAPABILITY: &str = "1.2.840.113556.1.4.800";

/// 389 Directory Server's vendorName in the root DSE.
const DS389_VENDOR: &str = "389 Project";

/// How far back a timestamp watermark reaches past the last change seen:
/// covers clock skew between ldapsync and the directory, and changes
/// committed while a paged search was between pages. Re-reading an
/// unchanged entry is harmless.
const TIMESTAMP_OVERLAP: Duration = Duration::from_secs(2);

/// The mechanism to use with this directory, and the identity of the
/// server its watermarks are valid for.
pub async fn detect(
    directory: &mut Directory,
    configured: Option<Mechanism>,
) -> Result<(Mechanism, String), DirectoryError> {
    let root = directory
        .root_dse(&[
            "supportedControl",
            "supportedCapabilities",
            "dsServiceName",
            "changelog",
            "vendorName",
        ])
        .await?;
    let has = |attr: &str, value: &str| root.get(attr).is_some_and(|v| v.iter().any(|x| x == value));
    // 389 DS's Content Synchronization names entries by their nsUniqueId,
    // whatever the connector's id attribute: with another, its changelog serves.
    let syncrepl_names_ids =
        !has("vendorname", DS389_VENDOR) || directory.id_attribute().eq_ignore_ascii_case("nsUniqueId");
    if configured == Some(Mechanism::Syncrepl) && !syncrepl_names_ids {
        return Err(DirectoryError::Operation {
            operation: "poll",
            dn: String::new(),
            message: format!(
                "389 DS's Content Synchronization names entries by nsUniqueId, not {}: \
                 use poll_mechanism = \"changelog\" or id_attribute = \"nsUniqueId\"",
                directory.id_attribute()
            ),
        });
    }
    let mechanism = configured.unwrap_or(
        if has("supportedcontrol", syncrepl::SYNC_REQUEST_OID) && syncrepl_names_ids {
            Mechanism::Syncrepl
        } else if has("supportedcapabilities", AD_CAPABILITY) && has("supportedcontrol", dirsync::DIRSYNC_OID) {
            // Its cookie holds on any domain controller; USNs only on one.
            Mechanism::Dirsync
        } else if has("supportedcapabilities", AD_CAPABILITY) {
            Mechanism::Usn
        } else if root.contains_key("changelog") {
            Mechanism::Changelog
        } else {
            Mechanism::Timestamp
        },
    );
    // USNs are per domain controller; other watermarks hold for any replica.
    let server = match mechanism {
        Mechanism::Usn => root
            .get("dsservicename")
            .and_then(|v| v.first())
            .cloned()
            .unwrap_or_default(),
        _ => String::new(),
    };
    Ok((mechanism, server))
}

/// The watermark for a full reconciliation, read before it starts so that
/// changes made while it runs are read again by the next poll.
pub async fn watermark_now(
    directory: &mut Directory,
    mechanism: Mechanism,
    scope: &ScopeConfig,
) -> Result<Option<Vec<u8>>, DirectoryError> {
    Ok(match mechanism {
        Mechanism::Syncrepl => syncrepl::refresh(directory, scope, None, &["1.1"]).await?.cookie,
        Mechanism::Timestamp => Some(generalized_time(SystemTime::now() - TIMESTAMP_OVERLAP).into_bytes()),
        Mechanism::Usn => Some(highest_usn(directory).await?.to_string().into_bytes()),
        Mechanism::Dirsync => Some(dirsync::changes(directory, scope, &[]).await?.cookie),
        Mechanism::Changelog => Some(changelog_bounds(directory).await?.last.to_string().into_bytes()),
        Mechanism::Full => None,
    })
}

/// Whether `watermark` still says where to read from: false once a
/// changelog was trimmed past it (a full reconciliation is due).
pub async fn watermark_holds(
    directory: &mut Directory,
    mechanism: Mechanism,
    watermark: &[u8],
) -> Result<bool, DirectoryError> {
    Ok(match mechanism {
        Mechanism::Changelog => {
            let bounds = changelog_bounds(directory).await?;
            match change_number(watermark) {
                Some(since) => changelog::reaches_back(directory, &bounds, since).await?,
                None => false,
            }
        }
        // Syncrepl and DirSync cookies too old to use are answered with a
        // full listing; timestamps and USNs never expire.
        _ => true,
    })
}

async fn changelog_bounds(directory: &mut Directory) -> Result<changelog::Bounds, DirectoryError> {
    changelog::bounds(directory)
        .await?
        .ok_or_else(|| DirectoryError::Operation {
            operation: "read",
            dn: String::new(),
            message: "the directory has no Retro Changelog (no changelog in the root DSE)".into(),
        })
}

fn change_number(watermark: &[u8]) -> Option<u64> {
    std::str::from_utf8(watermark).ok()?.parse().ok()
}

/// What changed in one scope since a watermark.
#[derive(Debug)]
pub struct Changes {
    /// DNs of entries added, modified or renamed (now in scope).
    pub written: Vec<String>,
    /// DNs entries were deleted at or renamed away from, for mechanisms
    /// that name departures by DN; applied before `written`.
    pub removed: Vec<String>,
    pub departures: Departures,
    /// The watermark covering these changes.
    pub watermark: Vec<u8>,
    /// Why a full reconciliation is due beyond these changes (what the
    /// mechanism saw but cannot follow in detail).
    pub resync: Option<String>,
}

/// The changes in `scope` since `watermark`.
pub async fn changes_since(
    directory: &mut Directory,
    mechanism: Mechanism,
    scope: &ScopeConfig,
    watermark: &[u8],
) -> Result<Changes, DirectoryError> {
    match mechanism {
        Mechanism::Syncrepl => {
            let refresh = match syncrepl::refresh(directory, scope, Some(watermark), &["1.1"]).await {
                // The full reconciliation reads a fresh cookie before it starts.
                Err(e) if e.result_code() == Some(syncrepl::REFRESH_REQUIRED) => {
                    return Ok(Changes {
                        written: Vec::new(),
                        removed: Vec::new(),
                        departures: Departures::NotReported,
                        watermark: watermark.to_vec(),
                        resync: Some(format!("the directory refused the stored sync cookie ({e})")),
                    });
                }
                refreshed => refreshed?,
            };
            let mut written = refresh.written;
            written.dedup();
            Ok(Changes {
                written,
                removed: Vec::new(),
                departures: match refresh.present {
                    Some(present) => Departures::AllBut(present),
                    None => Departures::Listed(refresh.deleted),
                },
                watermark: refresh.cookie.unwrap_or_else(|| watermark.to_vec()),
                resync: None,
            })
        }
        Mechanism::Timestamp => {
            let since = String::from_utf8_lossy(watermark).into_owned();
            let started = Instant::now();
            let filter = format!("(modifyTimestamp>={since})");
            let mut newest = since.clone();
            let mut written = Vec::new();
            let mut entries = directory.stream(scope, &filter, &["modifyTimestamp"]).await?;
            while let Some(entry) = entries.next().await? {
                if let Some(stamp) = entry.get("modifyTimestamp").first()
                    && stamp.as_str() > newest.as_str()
                {
                    newest = stamp.clone();
                }
                written.push(entry.dn);
            }
            // Changes committed while the pages were read may carry earlier
            // stamps than the newest seen: reach back over the read's duration.
            let reach_back = started.elapsed() + TIMESTAMP_OVERLAP;
            let watermark = match parse_generalized_time(&newest) {
                Some(t) if newest != since => generalized_time(t - reach_back).max(since),
                _ => since,
            };
            Ok(Changes {
                written,
                removed: Vec::new(),
                departures: Departures::NotReported,
                watermark: watermark.into_bytes(),
                resync: None,
            })
        }
        Mechanism::Usn => {
            let since: u64 = String::from_utf8_lossy(watermark)
                .parse()
                .map_err(|_| DirectoryError::Operation {
                    operation: "poll",
                    dn: scope.base.clone(),
                    message: "stored USN watermark is not a number".into(),
                })?;
            let highest = highest_usn(directory).await?;
            let filter = format!("(uSNChanged>={})", since + 1);
            let mut written = Vec::new();
            let mut entries = directory.stream(scope, &filter, &[]).await?;
            while let Some(entry) = entries.next().await? {
                written.push(entry.dn);
            }
            // Deleted objects become tombstones, outside the scope, with
            // their objectGUID: those of other scopes match no association.
            let deleted = directory.tombstones_since(since + 1).await?;
            Ok(Changes {
                written,
                removed: Vec::new(),
                departures: Departures::Listed(deleted),
                watermark: highest.to_string().into_bytes(),
                resync: None,
            })
        }
        Mechanism::Dirsync => {
            let synced = dirsync::changes(directory, scope, watermark).await?;
            Ok(Changes {
                written: synced.written,
                removed: Vec::new(),
                departures: Departures::Listed(synced.gone),
                watermark: synced.cookie,
                resync: None,
            })
        }
        Mechanism::Changelog => {
            let bounds = changelog_bounds(directory).await?;
            let since = change_number(watermark)
                .filter(|since| bounds.holds(*since))
                .ok_or_else(|| DirectoryError::Operation {
                    operation: "poll",
                    dn: bounds.base.clone(),
                    message: format!(
                        "the changelog (changes {} to {}) no longer reaches back to the watermark {}",
                        bounds.first,
                        bounds.last,
                        String::from_utf8_lossy(watermark)
                    ),
                })?;
            let read = changelog::changes(directory, &bounds, scope, since).await?;
            Ok(Changes {
                written: read.written,
                removed: read.removed,
                departures: Departures::NotReported,
                watermark: read.last.to_string().into_bytes(),
                resync: read
                    .subtree_moved
                    .map(|dn| format!("{dn} was renamed or moved with the entries below it")),
            })
        }
        Mechanism::Full => Ok(Changes {
            written: Vec::new(),
            removed: Vec::new(),
            departures: Departures::NotReported,
            watermark: watermark.to_vec(),
            resync: None,
        }),
    }
}

async fn highest_usn(directory: &mut Directory) -> Result<u64, DirectoryError> {
    let root = directory.root_dse(&["highestCommittedUSN"]).await?;
    root.get("highestcommittedusn")
        .and_then(|v| v.first())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| DirectoryError::Operation {
            operation: "read",
            dn: String::new(),
            message: "the root DSE has no highestCommittedUSN".into(),
        })
}

/// A time as LDAP's GeneralizedTime, e.g. `20261128175200Z`.
fn generalized_time(t: SystemTime) -> String {
    // RFC 3339 `2026-11-28T17:52:00Z` without its separators.
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .chars()
        .filter(|c| c.is_ascii_digit() || *c == 'Z')
        .collect()
}

/// Parses `YYYYMMDDHHMMSS[.fraction]Z`, as OpenLDAP and AD write it.
fn parse_generalized_time(text: &str) -> Option<SystemTime> {
    let digits = text.get(..14).filter(|d| d.bytes().all(|b| b.is_ascii_digit()))?;
    let rfc3339 = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &digits[..4],
        &digits[4..6],
        &digits[6..8],
        &digits[8..10],
        &digits[10..12],
        &digits[12..14]
    );
    humantime::parse_rfc3339(&rfc3339).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generalized_time_round_trips() {
        let t = parse_generalized_time("20261128175200Z").unwrap();
        assert_eq!(generalized_time(t), "20261128175200Z");
        assert_eq!(
            parse_generalized_time("20261128175200.0Z"),
            Some(t),
            "AD's fractional form"
        );
        assert_eq!(parse_generalized_time("2026-11-28"), None);
        assert_eq!(parse_generalized_time(""), None);
    }
}
