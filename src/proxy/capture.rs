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
