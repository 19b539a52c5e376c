//! The seam between the relay and the sync core: the writes that succeeded.
//!
//! The relay hands each add, modify, delete and modrdn the directory
//! accepted to a [`CaptureSink`], after the client's answer is on its way.
//! The sink must not block: the sync core's journal sits behind it.

use bytes::Bytes;
use rasn_ldap::{LdapMessage, ProtocolOp};
use thiserror::Error;

/// Which write succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteKind {
    Add,
    Modify,
    Delete,
    ModifyDn,
}

#[derive(Debug, Error)]
pub enum CaptureError {
    #[error("captured request does not decode: {0}")]
    Decode(String),
    #[error("captured request is not a write")]
    NotAWrite,
}

/// A write the directory answered with success, as the client sent it.
#[derive(Debug, Clone)]
pub struct CapturedWrite {
    /// The session that carried it.
    pub session: u64,
    pub message_id: i64,
    pub kind: WriteKind,
    /// The client's original request PDU, kept undecoded so that the relay
    /// never pays for decoding writes that fail.
    pub request: Bytes,
}

impl CapturedWrite {
    /// Decodes the request. It may contain credentials (an added
    /// userPassword): never log what this returns wholesale.
    pub fn decode(&self) -> Result<LdapMessage, CaptureError> {
        rasn::ber::decode(&self.request).map_err(|e| CaptureError::Decode(e.to_string()))
    }

    /// The DN the write was addressed to.
    pub fn target_dn(&self) -> Result<String, CaptureError> {
        Ok(match self.decode()?.protocol_op {
            ProtocolOp::AddRequest(r) => r.entry.0,
            ProtocolOp::ModifyRequest(r) => r.object.0,
            ProtocolOp::DelRequest(r) => r.0.0,
            ProtocolOp::ModDnRequest(r) => r.entry.0,
            _ => return Err(CaptureError::NotAWrite),
        })
    }
}

/// Where a successful write left its entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Affected {
    /// The entry exists at this DN (added, modified, or renamed to here).
    Entry(String),
    /// The entry at this DN was deleted.
    Deleted(String),
}

impl CapturedWrite {
    /// The entry the write affected, as it is after the write.
    pub fn affected(&self) -> Result<Affected, CaptureError> {
        Ok(match self.decode()?.protocol_op {
            ProtocolOp::AddRequest(r) => Affected::Entry(r.entry.0),
            ProtocolOp::ModifyRequest(r) => Affected::Entry(r.object.0),
            ProtocolOp::DelRequest(r) => Affected::Deleted(r.0.0),
            ProtocolOp::ModDnRequest(r) => {
                let parent = match r.new_superior {
                    Some(superior) => superior.0,
                    None => parent_dn(&r.entry.0).to_owned(),
                };
                Affected::Entry(if parent.is_empty() {
                    r.new_rdn.0
                } else {
                    format!("{},{parent}", r.new_rdn.0)
                })
            }
            _ => return Err(CaptureError::NotAWrite),
        })
    }
}

/// The DN without its first RDN (escaped commas stay in the RDN).
fn parent_dn(dn: &str) -> &str {
    let mut escaped = false;
    for (i, c) in dn.char_indices() {
        match c {
            '\\' if !escaped => escaped = true,
            ',' if !escaped => return &dn[i + 1..],
            _ => escaped = false,
        }
    }
    ""
}

/// Why a session's writes can no longer be seen by the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureLoss {
    /// A SASL security layer (integrity or confidentiality) wraps the
    /// session's traffic: it is relayed opaquely.
    SecurityLayer,
}

/// Receives successful writes. Called on the session's relay path, so it
/// must return at once.
pub trait CaptureSink: Send + Sync + 'static {
    fn write_succeeded(&self, write: CapturedWrite);

    /// From now on writes on `session` succeed unseen; only the poller can
    /// bring them in.
    fn capture_lost(&self, session: u64, why: CaptureLoss);
}

/// The sink until the sync core is configured: it records what it saw.
#[derive(Debug, Default)]
pub struct LogSink;

impl CaptureSink for LogSink {
    fn write_succeeded(&self, write: CapturedWrite) {
        match write.target_dn() {
            Ok(dn) => tracing::info!(
                session = write.session,
                message_id = write.message_id,
                kind = ?write.kind,
                dn,
                "captured write"
            ),
            Err(error) => tracing::warn!(
                session = write.session,
                message_id = write.message_id,
                kind = ?write.kind,
                %error,
                "captured write could not be read; a poll must catch it"
            ),
        }
    }

    fn capture_lost(&self, session: u64, why: CaptureLoss) {
        tracing::warn!(
            session,
            ?why,
            "writes on this session cannot be captured; a poll must catch them"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rasn_ldap::{DelRequest, LdapMessage, ModifyDnRequest};

    fn captured(op: ProtocolOp) -> CapturedWrite {
        let request = rasn::ber::encode(&LdapMessage::new(1, op)).unwrap();
        CapturedWrite {
            session: 1,
            message_id: 1,
            kind: WriteKind::ModifyDn,
            request: request.into(),
        }
    }

    #[test]
    fn renamed_and_moved_entries_are_followed_to_their_new_dn() {
        let rename = ModifyDnRequest {
            entry: "uid=a\\,b,ou=people,dc=x".into(),
            new_rdn: "uid=c".into(),
            delete_old_rdn: true,
            new_superior: None,
        };
        assert_eq!(
            captured(ProtocolOp::ModDnRequest(rename)).affected().unwrap(),
            Affected::Entry("uid=c,ou=people,dc=x".into())
        );
        let mv = ModifyDnRequest {
            entry: "uid=a,ou=people,dc=x".into(),
            new_rdn: "uid=a".into(),
            delete_old_rdn: true,
            new_superior: Some("ou=former,dc=x".into()),
        };
        assert_eq!(
            captured(ProtocolOp::ModDnRequest(mv)).affected().unwrap(),
            Affected::Entry("uid=a,ou=former,dc=x".into())
        );
        let delete = ProtocolOp::DelRequest(DelRequest("uid=a,dc=x".into()));
        assert_eq!(
            captured(delete).affected().unwrap(),
            Affected::Deleted("uid=a,dc=x".into())
        );
    }
}
