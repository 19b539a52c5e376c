//! RFC 4533 content synchronization, refreshOnly: the changes since a
//! stored cookie, as OpenLDAP's syncprov reports them. The control and
//! intermediate-message values are decoded with rasn, never trusted to be
//! well formed.

use std::collections::HashSet;

use ldap3::controls::RawControl;
use ldap3::{ResultEntry, Scope, SearchEntry};
use rasn::prelude::*;

use crate::config::ScopeConfig;
use crate::directory::{Directory, DirectoryError};

pub const SYNC_REQUEST_OID: &str = "1.3.6.1.4.1.4203.1.9.1.1";
const SYNC_STATE_OID: &str = "1.3.6.1.4.1.4203.1.9.1.2";
const SYNC_DONE_OID: &str = "1.3.6.1.4.1.4203.1.9.1.3";

/// RFC 4533 §2.2: syncRequestValue.
#[derive(AsnType, Encode, Debug)]
struct SyncRequestValue {
    mode: SyncMode,
    cookie: Option<OctetString>,
    #[rasn(default)]
    reload_hint: bool,
}

#[derive(AsnType, Encode, Decode, Debug, Clone, Copy, PartialEq, Eq)]
#[rasn(enumerated)]
enum SyncMode {
    RefreshOnly = 1,
    RefreshAndPersist = 3,
}

/// RFC 4533 §2.3: syncStateValue.
#[derive(AsnType, Decode, Debug)]
struct SyncStateValue {
    state: EntryState,
    entry_uuid: OctetString,
    cookie: Option<OctetString>,
}

#[derive(AsnType, Decode, Debug, Clone, Copy, PartialEq, Eq)]
#[rasn(enumerated)]
enum EntryState {
    Present = 0,
    Add = 1,
    Modify = 2,
    Delete = 3,
}

/// RFC 4533 §2.4: syncDoneValue.
#[derive(AsnType, Decode, Debug)]
struct SyncDoneValue {
    cookie: Option<OctetString>,
    #[rasn(default)]
    refresh_deletes: bool,
}

/// RFC 4533 §2.5: syncInfoValue.
#[derive(AsnType, Decode, Debug)]
#[rasn(choice)]
enum SyncInfoValue {
    #[rasn(tag(context, 0))]
    NewCookie(OctetString),
    #[rasn(tag(context, 1))]
    RefreshDelete(RefreshPhase),
    #[rasn(tag(context, 2))]
    RefreshPresent(RefreshPhase),
    #[rasn(tag(context, 3))]
    SyncIdSet(SyncIdSet),
}

#[derive(AsnType, Decode, Debug)]
struct RefreshPhase {
    cookie: Option<OctetString>,
    // In the encoding; a refreshOnly search ends with syncDone regardless.
    #[allow(dead_code)]
    #[rasn(default = "yes")]
    refresh_done: bool,
}

#[derive(AsnType, Decode, Debug)]
struct SyncIdSet {
    cookie: Option<OctetString>,
    #[rasn(default)]
    refresh_deletes: bool,
    sync_uuids: SetOf<OctetString>,
}

fn yes() -> bool {
    true
}

/// What one refresh reported.
#[derive(Debug, Default)]
pub struct Refresh {
    /// DNs of entries added, modified or renamed into the scope.
    pub written: Vec<String>,
    /// Stable ids of entries deleted or moved out of the scope.
    pub deleted: Vec<String>,
    /// With a present phase: the stable ids of every unchanged entry; any
    /// other entry has gone.
    pub present: Option<HashSet<String>>,
    pub cookie: Option<Vec<u8>>,
    /// How the ids above are written.
    ids: IdFormat,
    /// The server named unchanged entries (present states, or an id set
    /// of present ones): it ran a present phase.
    named_present: bool,
}

/// e-syncRefreshRequired (RFC 4533 §2.5): the cookie is of no use any
/// more (too old, or another server's); the client starts without one.
pub const REFRESH_REQUIRED: u32 = 4096;

/// Runs a refreshOnly search of `scope` from `cookie` (from the beginning
/// when `None`), asking for `attrs` only.
pub async fn refresh(
    directory: &mut Directory,
    scope: &ScopeConfig,
    cookie: Option<&[u8]>,
    attrs: &[&str],
) -> Result<Refresh, DirectoryError> {
    let error = |message: String| DirectoryError::Operation {
        operation: "sync refresh",
        dn: scope.base.clone(),
        message,
    };
    let request = SyncRequestValue {
        mode: SyncMode::RefreshOnly,
        cookie: cookie.map(|c| OctetString::from(c.to_vec())),
        reload_hint: false,
    };
    let control = RawControl {
        ctype: SYNC_REQUEST_OID.into(),
        crit: true,
        val: Some(rasn::ber::encode(&request).map_err(|e| error(e.to_string()))?),
    };
    let mut refresh = Refresh {
        ids: IdFormat::of(directory.id_attribute()),
        ..Refresh::default()
    };
    let ldap = directory.ldap();
    let mut stream = ldap
        .with_controls(vec![control])
        .streaming_search(&scope.base, Scope::Subtree, &scope.filter, attrs.to_vec())
        .await
        .map_err(|e| error(e.to_string()))?;
    let mut present = HashSet::new();
    while let Some(item) = stream.next().await.map_err(|e| error(e.to_string()))? {
        if item.is_intermediate() {
            let info = intermediate_value(&item)
                .and_then(|v| rasn::ber::decode::<SyncInfoValue>(&v).ok())
                .ok_or_else(|| error("undecodable sync info message".into()))?;
            refresh.info(info, &mut present);
        } else if !item.is_ref() {
            let state = item
                .1
                .iter()
                .find(|c| c.1.ctype == SYNC_STATE_OID)
                .and_then(|c| c.1.val.as_deref())
                .and_then(|v| rasn::ber::decode::<SyncStateValue>(v).ok())
                .ok_or_else(|| error("entry without a readable sync state control".into()))?;
            refresh.state(state, SearchEntry::construct(item).dn, &mut present);
        }
    }
    let done = stream.finish().await;
    let done_value = done
        .ctrls
        .iter()
        .find(|c| c.1.ctype == SYNC_DONE_OID)
        .and_then(|c| c.1.val.as_deref())
        .map(rasn::ber::decode::<SyncDoneValue>);
    // The result code matters: e-syncRefreshRequired asks for a fresh start.
    done.success()
        .map_err(|e| DirectoryError::from_ldap("sync refresh", &scope.base, e))?;
    let done_value = done_value
        .ok_or_else(|| error("no sync done control".into()))?
        .map_err(|e| error(format!("undecodable sync done control: {e}")))?;
    if let Some(cookie) = done_value.cookie {
        refresh.cookie = Some(cookie.to_vec());
    }
    // 389 DS (its ids are nsUniqueIds) answers a refresh from a cookie
    // with the changed entries (as adds), an id set of the deleted ones and
    // a syncDone without refreshDeletes: taken as a present phase, every
    // unchanged entry would look deleted. From it, a present phase is one
    // only when it named unchanged entries.
    let present_phase = match refresh.ids {
        IdFormat::UniqueId => cookie.is_none() || refresh.named_present,
        // slapd's changed entries count as present: a present phase in
        // which every entry changed names none as unchanged.
        IdFormat::Uuid => true,
    };
    if !done_value.refresh_deletes && present_phase {
        refresh.present = Some(present);
    }
    Ok(refresh)
}

impl Refresh {
    fn state(&mut self, state: SyncStateValue, dn: String, present: &mut HashSet<String>) {
        let id = self.ids.text(&state.entry_uuid);
        match state.state {
            EntryState::Add | EntryState::Modify => {
                present.insert(id);
                self.written.push(dn);
            }
            EntryState::Present => {
                self.named_present = true;
                present.insert(id);
            }
            EntryState::Delete => self.deleted.push(id),
        }
        if let Some(cookie) = state.cookie {
            self.cookie = Some(cookie.to_vec());
        }
    }

    fn info(&mut self, info: SyncInfoValue, present: &mut HashSet<String>) {
        let cookie = match info {
            SyncInfoValue::NewCookie(cookie) => Some(cookie),
            SyncInfoValue::RefreshDelete(phase) | SyncInfoValue::RefreshPresent(phase) => phase.cookie,
            SyncInfoValue::SyncIdSet(set) => {
                let ids = set.sync_uuids.to_vec().into_iter().map(|u| self.ids.text(u));
                if set.refresh_deletes {
                    self.deleted.extend(ids);
                } else {
                    self.named_present = true;
                    present.extend(ids);
                }
                set.cookie
            }
        };
        if let Some(cookie) = cookie {
            self.cookie = Some(cookie.to_vec());
        }
    }
}

/// The responseValue of an IntermediateResponse (RFC 4511 §4.13).
fn intermediate_value(item: &ResultEntry) -> Option<Vec<u8>> {
    item.0
        .clone()
        .expect_constructed()?
        .into_iter()
        .find(|t| t.id == 1)?
        .expect_primitive()
}

/// How a syncUUID reads as the connector's id attribute.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum IdFormat {
    /// As entryUUID prints it (OpenLDAP's syncprov sends the entryUUID).
    #[default]
    Uuid,
    /// As nsUniqueId prints it (389 DS's Content Synchronization sends its
    /// 16 bytes): four groups of eight hex digits.
    UniqueId,
}

impl IdFormat {
    fn of(id_attribute: &str) -> IdFormat {
        match id_attribute.eq_ignore_ascii_case("nsUniqueId") {
            true => IdFormat::UniqueId,
            false => IdFormat::Uuid,
        }
    }

    /// Other lengths than 16 bytes are shown in hex.
    fn text(self, bytes: &[u8]) -> String {
        let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
        match (self, uuid::Uuid::from_slice(bytes)) {
            (IdFormat::Uuid, Ok(uuid)) => uuid.to_string(),
            (IdFormat::UniqueId, Ok(_)) => bytes.chunks(4).map(hex).collect::<Vec<_>>().join("-"),
            (_, Err(_)) => hex(bytes),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_what_slapd_sends() {
        // Captured from slapd 2.5 (`ldapsearch -E sync=ro`): a sync state
        // control of an added entry, and the sync done control.
        let state = [
            0x30, 0x15, 0x0a, 0x01, 0x01, 0x04, 0x10, 0x96, 0xa0, 0xaa, 0x8a, 0x7f, 0xa0, 0x10, 0x41, 0x8b, 0x0a, 0x73,
            0x09, 0x83, 0x9d, 0xa7, 0x05,
        ];
        let state: SyncStateValue = rasn::ber::decode(&state).unwrap();
        assert_eq!(state.state, EntryState::Add);
        assert_eq!(
            IdFormat::Uuid.text(&state.entry_uuid),
            "96a0aa8a-7fa0-1041-8b0a-7309839da705"
        );
        assert_eq!(
            IdFormat::UniqueId.text(&state.entry_uuid),
            "96a0aa8a-7fa01041-8b0a7309-839da705"
        );

        let mut done = vec![0x30, 0x39, 0x04, 0x34];
        done.extend(b"rid=000,csn=20261128180513.684073Z#000000#000#000000");
        done.extend([0x01, 0x01, 0xff]);
        let done: SyncDoneValue = rasn::ber::decode(&done).unwrap();
        assert_eq!(
            done.cookie.as_deref(),
            Some(&b"rid=000,csn=20261128180513.684073Z#000000#000#000000"[..])
        );
        assert!(done.refresh_deletes);
    }

    #[test]
    fn malformed_values_are_errors_not_panics() {
        for bad in [&b""[..], b"\x30", b"\x30\x03\x0a\x01\x09", b"\xa3\x80", b"\x04\xff"] {
            assert!(rasn::ber::decode::<SyncStateValue>(bad).is_err());
            assert!(rasn::ber::decode::<SyncInfoValue>(bad).is_err());
        }
    }

    #[test]
    fn an_id_set_of_deletes_lists_the_deleted_entries() {
        // [3] { cookie "c", refreshDeletes TRUE, { 16 bytes } }
        let uuid = [0x11u8; 16];
        let mut value = vec![0xa3, 0x1a, 0x04, 0x01, b'c', 0x01, 0x01, 0xff, 0x31, 0x12, 0x04, 0x10];
        value.extend(uuid);
        let info: SyncInfoValue = rasn::ber::decode(&value).unwrap();
        let mut refresh = Refresh::default();
        let mut present = HashSet::new();
        refresh.info(info, &mut present);
        assert_eq!(refresh.deleted, vec![uuid::Uuid::from_bytes(uuid).to_string()]);
        assert!(present.is_empty());
        assert_eq!(refresh.cookie.as_deref(), Some(&b"c"[..]));
    }
}
