//! The seam between the relay and the sync core: the writes that succeeded.
//!
//! The relay hands each add, modify, delete and modrdn the directory
//! accepted to a [`CaptureSink`], after the client's answer is on its way.
//! The sink must not block: the sync core's journal sits behind it.

use bytes::Bytes;
use thiserror::Error;

use super::ber::{self, BerError};
use super::message::{Envelope, Op};
use crate::dn;

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

impl From<BerError> for CaptureError {
    fn from(e: BerError) -> Self {
        CaptureError::Decode(e.to_string())
    }
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

/// Where a successful write left its entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Affected {
    /// The entry exists at this DN (added, modified, or renamed to here).
    At(String),
    /// The entry at this DN was deleted.
    Removed(String),
}

/// `newSuperior [0] LDAPDN` of a ModifyDNRequest.
const NEW_SUPERIOR: u8 = 0x80;

impl CapturedWrite {
    /// The DN the write was addressed to.
    pub fn target_dn(&self) -> Result<String, CaptureError> {
        let (op, contents) = self.op_contents()?;
        match op {
            Op::Delete => text(contents),
            Op::Add | Op::Modify | Op::ModifyDn => text(ber::read_element(contents)?.1),
            _ => Err(CaptureError::NotAWrite),
        }
    }

    /// The entry the write affected, as it is after the write.
    ///
    /// Read from the request's bytes, as leniently as the directory reads
    /// them: slapd accepts a DN under any primitive tag (a modify whose DN
    /// is tagged `[APPLICATION 4]` succeeds), so a strict decoder would
    /// lose writes that an ordinary user can make at will.
    pub fn affected(&self) -> Result<Affected, CaptureError> {
        let (op, contents) = self.op_contents()?;
        Ok(match op {
            Op::Add | Op::Modify => Affected::At(self.target_dn()?),
            Op::Delete => Affected::Removed(text(contents)?),
            Op::ModifyDn => {
                let (entry_header, entry) = ber::read_element(contents)?;
                let rest = &contents[entry_header.total_len()..];
                let (rdn_header, new_rdn) = ber::read_element(rest)?;
                let rest = &rest[rdn_header.total_len()..];
                let (delete_old, _) = ber::read_element(rest)?;
                let rest = &rest[delete_old.total_len()..];
                let entry = text(entry)?;
                let parent = match ber::read_element(rest) {
                    Ok((header, superior)) if header.tag == NEW_SUPERIOR => text(superior)?,
                    _ => dn::parent(&entry).to_owned(),
                };
                Affected::At(dn::with_rdn(&text(new_rdn)?, &parent))
            }
            _ => return Err(CaptureError::NotAWrite),
        })
    }

    fn op_contents(&self) -> Result<(Op, &[u8]), CaptureError> {
        let envelope = Envelope::peek(&self.request).map_err(|e| CaptureError::Decode(e.to_string()))?;
        Ok((envelope.op, envelope.contents(&self.request)))
    }
}

fn text(bytes: &[u8]) -> Result<String, CaptureError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| CaptureError::Decode("the DN is not UTF-8".into()))
}

/// Why a session's writes can no longer be seen by the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureLoss {
    /// The session's traffic is relayed opaquely from now on.
    Opaque(Opacity),
    /// A write of this kind was relayed but its outcome was never seen
    /// (abandoned, or the session ended first): the directory may have
    /// applied it.
    OutcomeUnknown(WriteKind),
}

/// Why a session's bytes are no longer LDAP PDUs to ldapsync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opacity {
    /// A SASL security layer (integrity or confidentiality) wraps them.
    SecurityLayer,
    /// The client's TLS ends at the directory (a passthrough listener).
    EndToEndTls,
}

impl Opacity {
    /// Its name in metrics (`outcome`) and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Opacity::SecurityLayer => "security-layer",
            Opacity::EndToEndTls => "end-to-end-tls",
        }
    }
}

/// Receives successful writes. Called on the session's relay path, so it
/// must return at once.
pub trait CaptureSink: Send + Sync + 'static {
    fn write_succeeded(&self, write: CapturedWrite);

    /// Writes on `session` succeeded, or may have, unseen; only the poller
    /// can bring them in.
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
    use rasn_ldap::{DelRequest, LdapMessage, ModifyDnRequest, ProtocolOp};

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
            Affected::At("uid=c,ou=people,dc=x".into())
        );
        let mv = ModifyDnRequest {
            entry: "uid=a,ou=people,dc=x".into(),
            new_rdn: "uid=a".into(),
            delete_old_rdn: true,
            new_superior: Some("ou=former,dc=x".into()),
        };
        assert_eq!(
            captured(ProtocolOp::ModDnRequest(mv)).affected().unwrap(),
            Affected::At("uid=a,ou=former,dc=x".into())
        );
        let delete = ProtocolOp::DelRequest(DelRequest("uid=a,dc=x".into()));
        assert_eq!(
            captured(delete).affected().unwrap(),
            Affected::Removed("uid=a,dc=x".into())
        );
    }

    #[test]
    fn a_dn_under_another_primitive_tag_is_read_as_the_directory_reads_it() {
        // A modify of "uid=a,dc=x" (no changes) with the DN tagged
        // [APPLICATION 4] (0x44) instead of OCTET STRING: slapd applies it.
        let dn = b"uid=a,dc=x";
        let mut op = vec![0x44, dn.len() as u8];
        op.extend_from_slice(dn);
        op.extend_from_slice(&[0x30, 0x00]);
        let mut body = vec![0x02, 0x01, 0x05, 0x66, op.len() as u8];
        body.extend(op);
        let mut pdu = vec![0x30, body.len() as u8];
        pdu.extend(body);
        let write = CapturedWrite {
            session: 1,
            message_id: 5,
            kind: WriteKind::Modify,
            request: pdu.into(),
        };
        assert_eq!(write.affected().unwrap(), Affected::At("uid=a,dc=x".into()));
    }
}
