//! Active Directory's DirSync control (LDAP_SERVER_DIRSYNC_OID): the
//! objects of a naming context changed since a cookie, deleted ones
//! (tombstones) included. Values decoded with rasn.

use ldap3::controls::RawControl;
use ldap3::{Scope, SearchEntry};
use rasn::prelude::*;

use crate::config::ScopeConfig;
use crate::directory::{Directory, DirectoryError};
use crate::dn;

pub const DIRSYNC_OID: &str = "1.2.840.113556.1.4.841";
/// LDAP_DIRSYNC_OBJECT_SECURITY: what the service account may read,
/// without the "Replicating Directory Changes" right.
const OBJECT_SECURITY: i64 = 1;

/// The request value: flags, maximum bytes, cookie.
#[derive(AsnType, Encode, Debug)]
struct DirSyncRequest {
    flags: i64,
    max_bytes: i64,
    cookie: OctetString,
}

/// The response value: more results to come, unused, the new cookie.
#[derive(AsnType, Decode, Debug)]
struct DirSyncResponse {
    more_results: i64,
    // Reserved in the encoding ("unused" in MS-ADTS).
    #[allow(dead_code)]
    unused: i64,
    cookie: OctetString,
}

/// What DirSync reported for one scope.
#[derive(Debug, Default)]
pub struct Synced {
    /// DNs of changed entries in the scope.
    pub written: Vec<String>,
    /// Stable ids of entries deleted, or moved out of the scope.
    pub gone: Vec<String>,
    pub cookie: Vec<u8>,
}

/// Everything changed since `cookie` (from the beginning when empty).
pub async fn changes(directory: &mut Directory, scope: &ScopeConfig, cookie: &[u8]) -> Result<Synced, DirectoryError> {
    let error = |message: String| DirectoryError::Operation {
        operation: "dirsync",
        dn: scope.base.clone(),
        message,
    };
    let root = directory.root_dse(&["defaultNamingContext"]).await?;
    let context = root
        .get("defaultnamingcontext")
        .and_then(|v| v.first())
        .cloned()
        .ok_or_else(|| error("the root DSE names no defaultNamingContext".into()))?;
    // Every changed object: the scope's filter is applied when each entry
    // is read back (Samba's DirSync does not expand objectCategory=person,
    // and tombstones have lost most attributes anyway).
    let filter = "(objectClass=*)";
    let mut synced = Synced {
        cookie: cookie.to_vec(),
        ..Synced::default()
    };
    loop {
        let request = DirSyncRequest {
            flags: OBJECT_SECURITY,
            max_bytes: 0,
            cookie: OctetString::from(synced.cookie.clone()),
        };
        let control = RawControl {
            ctype: DIRSYNC_OID.into(),
            crit: true,
            val: Some(rasn::ber::encode(&request).map_err(|e| error(e.to_string()))?),
        };
        // No attribute list: DirSync returns an object only when one of the
        // requested attributes changed, and every attribute may matter.
        let attrs: Vec<String> = Vec::new();
        let (entries, result) = directory
            .ldap()
            .with_controls(vec![control])
            .search(&context, Scope::Subtree, filter, attrs)
            .await
            .and_then(|r| r.success())
            .map_err(|e| error(e.to_string()))?;
        for raw in entries {
            let entry = SearchEntry::construct(raw);
            let deleted = entry
                .attrs
                .iter()
                .any(|(k, v)| k.eq_ignore_ascii_case("isDeleted") && v.iter().any(|x| x == "TRUE"));
            let dn = entry.dn.clone();
            let Some(id) = directory.entry_id(entry) else { continue };
            if !deleted && dn::is_within(&dn, &scope.base) {
                synced.written.push(dn);
            } else {
                synced.gone.push(id);
            }
        }
        let response = result
            .ctrls
            .iter()
            .find(|c| c.1.ctype == DIRSYNC_OID)
            .and_then(|c| c.1.val.as_deref())
            .ok_or_else(|| error("no DirSync response control".into()))
            .and_then(|v| rasn::ber::decode::<DirSyncResponse>(v).map_err(|e| error(e.to_string())))?;
        synced.cookie = response.cookie.to_vec();
        if response.more_results == 0 {
            return Ok(synced);
        }
    }
}
