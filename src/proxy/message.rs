//! The LDAPMessage envelope: what the relay reads of each PDU, and the few
//! messages ldapsync writes itself (error responses, Notice of Disconnection).

use bytes::Bytes;
use rasn_ldap::{
    AddResponse, BindResponse, CompareResponse, DelResponse, ExtendedRequest, ExtendedResponse, LdapMessage,
    LdapResult, ModifyDnResponse, ModifyResponse, ProtocolOp, ResultCode, SearchResultDone,
};
use thiserror::Error;

use super::ber::{self, BerError};

/// RFC 4511 §4.4.1.
pub const NOTICE_OF_DISCONNECTION_OID: &str = "1.3.6.1.4.1.1466.20036";
/// RFC 4511 §4.14.1.
pub const STARTTLS_OID: &str = "1.3.6.1.4.1.1466.20037";

const INTEGER: u8 = 0x02;
const ENUMERATED: u8 = 0x0a;
const APPLICATION_CLASS: u8 = 0x40;
const CLASS_MASK: u8 = 0xc0;
/// `requestName [0] LDAPOID` of an ExtendedRequest.
const EXTENDED_REQUEST_NAME: u8 = 0x80;

/// The protocolOp of an LDAPMessage, by its APPLICATION tag number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Bind,
    BindResponse,
    Unbind,
    Search,
    SearchEntry,
    SearchDone,
    Modify,
    ModifyResponse,
    Add,
    AddResponse,
    Delete,
    DeleteResponse,
    ModifyDn,
    ModifyDnResponse,
    Compare,
    CompareResponse,
    Abandon,
    SearchReference,
    Extended,
    ExtendedResponse,
    Intermediate,
    /// An APPLICATION tag RFC 4511 does not define; relayed all the same.
    Unknown(u8),
}

impl Op {
    fn from_tag_number(n: u8) -> Op {
        match n {
            0 => Op::Bind,
            1 => Op::BindResponse,
            2 => Op::Unbind,
            3 => Op::Search,
            4 => Op::SearchEntry,
            5 => Op::SearchDone,
            6 => Op::Modify,
            7 => Op::ModifyResponse,
            8 => Op::Add,
            9 => Op::AddResponse,
            10 => Op::Delete,
            11 => Op::DeleteResponse,
            12 => Op::ModifyDn,
            13 => Op::ModifyDnResponse,
            14 => Op::Compare,
            15 => Op::CompareResponse,
            16 => Op::Abandon,
            19 => Op::SearchReference,
            23 => Op::Extended,
            24 => Op::ExtendedResponse,
            25 => Op::Intermediate,
            other => Op::Unknown(other),
        }
    }

    /// A short name for logs.
    pub fn name(self) -> &'static str {
        match self {
            Op::Bind => "bind",
            Op::BindResponse => "bindResponse",
            Op::Unbind => "unbind",
            Op::Search => "search",
            Op::SearchEntry => "searchResEntry",
            Op::SearchDone => "searchResDone",
            Op::Modify => "modify",
            Op::ModifyResponse => "modifyResponse",
            Op::Add => "add",
            Op::AddResponse => "addResponse",
            Op::Delete => "delete",
            Op::DeleteResponse => "delResponse",
            Op::ModifyDn => "modrdn",
            Op::ModifyDnResponse => "modDNResponse",
            Op::Compare => "compare",
            Op::CompareResponse => "compareResponse",
            Op::Abandon => "abandon",
            Op::SearchReference => "searchResRef",
            Op::Extended => "extended",
            Op::ExtendedResponse => "extendedResponse",
            Op::Intermediate => "intermediateResponse",
            Op::Unknown(_) => "unknown",
        }
    }

    /// Requests that the directory answers (every request but abandon and
    /// unbind); the session tracks these until their final response.
    pub fn expects_response(self) -> bool {
        matches!(
            self,
            Op::Bind | Op::Search | Op::Modify | Op::Add | Op::Delete | Op::ModifyDn | Op::Compare | Op::Extended
        )
    }

    /// Responses that end an operation (search entries, references and
    /// intermediate responses do not).
    pub fn is_final_response(self) -> bool {
        matches!(
            self,
            Op::BindResponse
                | Op::SearchDone
                | Op::ModifyResponse
                | Op::AddResponse
                | Op::DeleteResponse
                | Op::ModifyDnResponse
                | Op::CompareResponse
                | Op::ExtendedResponse
        )
    }
}

#[derive(Debug, Error)]
pub enum EnvelopeError {
    #[error(transparent)]
    Ber(#[from] BerError),
    #[error("messageID is not an INTEGER of 1 to 8 octets")]
    BadMessageId,
    #[error("protocolOp tag {0:#04x} is not of the APPLICATION class")]
    NotApplicationClass(u8),
}

/// What the relay knows of a PDU without decoding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope {
    pub message_id: i64,
    pub op: Op,
    /// Where the protocolOp's contents lie in the PDU.
    op_contents: (usize, usize),
}

impl Envelope {
    /// Reads the messageID and protocolOp header of a framed LDAPMessage.
    pub fn peek(pdu: &[u8]) -> Result<Envelope, EnvelopeError> {
        let (outer, body) = ber::read_element(pdu)?;
        let (id_header, id) = ber::read_element(body)?;
        if id_header.tag != INTEGER {
            return Err(EnvelopeError::BadMessageId);
        }
        let message_id = ber::integer(id).ok_or(EnvelopeError::BadMessageId)?;
        let rest = &body[id_header.total_len()..];
        let (op_header, _) = ber::read_element(rest)?;
        if op_header.tag & CLASS_MASK != APPLICATION_CLASS {
            return Err(EnvelopeError::NotApplicationClass(op_header.tag));
        }
        let start = outer.header_len + id_header.total_len() + op_header.header_len;
        Ok(Envelope {
            message_id,
            op: Op::from_tag_number(op_header.tag & 0x1f),
            op_contents: (start, start + op_header.len),
        })
    }

    /// The protocolOp's contents, within the PDU it was peeked from.
    pub(super) fn contents<'a>(&self, pdu: &'a [u8]) -> &'a [u8] {
        &pdu[self.op_contents.0..self.op_contents.1]
    }

    /// The resultCode of a response built on LDAPResult.
    pub fn result_code(&self, pdu: &[u8]) -> Option<i64> {
        let (header, code) = ber::read_element(self.contents(pdu)).ok()?;
        (header.tag == ENUMERATED).then(|| ber::integer(code))?
    }

    /// The message id an AbandonRequest names.
    pub fn abandoned_id(&self, pdu: &[u8]) -> Option<i64> {
        (self.op == Op::Abandon).then(|| ber::integer(self.contents(pdu)))?
    }

    /// A BindRequest's name and the tag and contents of its `authentication`.
    fn bind_parts<'a>(&self, pdu: &'a [u8]) -> Option<(&'a [u8], u8, &'a [u8])> {
        if self.op != Op::Bind {
            return None;
        }
        let contents = self.contents(pdu);
        let (version, _) = ber::read_element(contents).ok()?;
        let rest = &contents[version.total_len()..];
        let (name_header, name) = ber::read_element(rest).ok()?;
        let (auth, credentials) = ber::read_element(&rest[name_header.total_len()..]).ok()?;
        Some((name, auth.tag, credentials))
    }

    /// A BindRequest's name (a DN for a simple bind).
    pub fn bind_name<'a>(&self, pdu: &'a [u8]) -> Option<&'a [u8]> {
        self.bind_parts(pdu).map(|(name, _, _)| name)
    }

    /// Whether a BindRequest uses SASL (`authentication` is `[3] SaslCredentials`).
    pub fn is_sasl_bind(&self, pdu: &[u8]) -> bool {
        const SASL_CREDENTIALS: u8 = 0xa3;
        self.bind_parts(pdu).is_some_and(|(_, tag, _)| tag == SASL_CREDENTIALS)
    }

    /// A BindRequest's `version`.
    pub fn bind_version(&self, pdu: &[u8]) -> Option<i64> {
        if self.op != Op::Bind {
            return None;
        }
        let (header, version) = ber::read_element(self.contents(pdu)).ok()?;
        (header.tag == INTEGER).then(|| ber::integer(version))?
    }

    /// Whether a BindRequest is anonymous: a simple bind with no name and no
    /// password (RFC 4513 §5.1.1), the one bind that carries no secret.
    pub fn is_anonymous_bind(&self, pdu: &[u8]) -> bool {
        const SIMPLE: u8 = 0x80;
        self.bind_parts(pdu)
            .is_some_and(|(name, tag, password)| tag == SIMPLE && name.is_empty() && password.is_empty())
    }

    /// The requestName of an ExtendedRequest.
    pub fn extended_name<'a>(&self, pdu: &'a [u8]) -> Option<&'a [u8]> {
        if self.op != Op::Extended {
            return None;
        }
        let (header, name) = ber::read_element(self.contents(pdu)).ok()?;
        (header.tag == EXTENDED_REQUEST_NAME).then_some(name)
    }
}

/// A client's message id as a response can carry it: MessageID is 0..maxInt.
fn response_id(message_id: i64) -> Option<u32> {
    u32::try_from(message_id).ok().filter(|&id| id <= i32::MAX as u32)
}

fn encode(message_id: u32, op: ProtocolOp) -> Bytes {
    let message = LdapMessage::new(message_id, op);
    // Encoding a message built from plain strings and enums cannot fail.
    Bytes::from(rasn::ber::encode(&message).expect("LDAPMessage encodes"))
}

fn extended_response(code: ResultCode, diagnostic: &str, name: Option<&str>) -> ExtendedResponse {
    ExtendedResponse {
        result_code: code,
        matched_dn: "".into(),
        diagnostic_message: diagnostic.into(),
        referral: None,
        response_name: name.map(|n| n.as_bytes().to_vec().into()),
        response_value: None,
    }
}

/// A success response to `request`, which ldapsync answers itself.
pub fn success_response(request: &Envelope) -> Option<Bytes> {
    error_response(request, ResultCode::Success, "")
}

/// The response ldapsync sends itself when it cannot relay `request`
/// (e.g. the directory is unreachable). `None` for requests that get no
/// response, or whose message id is not a valid MessageID.
pub fn error_response(request: &Envelope, code: ResultCode, diagnostic: &str) -> Option<Bytes> {
    let message_id = response_id(request.message_id)?;
    let result = || LdapResult::new(code, "".into(), diagnostic.into());
    let op = match request.op {
        Op::Bind => ProtocolOp::BindResponse(BindResponse::new(code, "".into(), diagnostic.into(), None, None)),
        Op::Search => ProtocolOp::SearchResDone(SearchResultDone(result())),
        Op::Modify => ProtocolOp::ModifyResponse(ModifyResponse(result())),
        Op::Add => ProtocolOp::AddResponse(AddResponse(result())),
        Op::Delete => ProtocolOp::DelResponse(DelResponse(result())),
        Op::ModifyDn => ProtocolOp::ModDnResponse(ModifyDnResponse(result())),
        Op::Compare => ProtocolOp::CompareResponse(CompareResponse(result())),
        Op::Extended => ProtocolOp::ExtendedResp(extended_response(code, diagnostic, None)),
        _ => return None,
    };
    Some(encode(message_id, op))
}

/// An extended response naming its operation, e.g. the refusal of StartTLS.
pub fn named_extended_response(message_id: i64, name: &str, code: ResultCode, diagnostic: &str) -> Option<Bytes> {
    let message_id = response_id(message_id)?;
    Some(encode(
        message_id,
        ProtocolOp::ExtendedResp(extended_response(code, diagnostic, Some(name))),
    ))
}

/// An ExtendedRequest with no value, as ldapsync sends StartTLS upstream.
pub fn extended_request(message_id: u32, oid: &str) -> Bytes {
    encode(
        message_id,
        ProtocolOp::ExtendedReq(ExtendedRequest {
            request_name: oid.as_bytes().to_vec().into(),
            request_value: None,
        }),
    )
}

/// A base search of the root DSE, the cheapest "are you there?" (the
/// health probe's).
pub fn root_dse_search(message_id: u32) -> Bytes {
    use rasn_ldap::{Filter, SearchRequest, SearchRequestDerefAliases, SearchRequestScope};
    encode(
        message_id,
        ProtocolOp::SearchRequest(SearchRequest::new(
            "".into(),
            SearchRequestScope::BaseObject,
            SearchRequestDerefAliases::NeverDerefAliases,
            0,
            0,
            false,
            Filter::Present("objectClass".into()),
            vec!["supportedLDAPVersion".into()],
        )),
    )
}

/// A simple BindRequest, as the multiplexed connections bind.
pub fn simple_bind_request(message_id: u32, dn: &str, password: &str) -> Bytes {
    use rasn_ldap::{AuthenticationChoice, BindRequest};
    encode(
        message_id,
        ProtocolOp::BindRequest(BindRequest::new(
            3,
            dn.into(),
            AuthenticationChoice::Simple(password.as_bytes().to_vec().into()),
        )),
    )
}

/// An UnbindRequest, as ldapsync sends it when it drops a directory
/// connection it no longer needs. Message id 1: nothing else is in flight.
pub fn unbind_request() -> Bytes {
    encode(1, ProtocolOp::UnbindRequest(rasn_ldap::UnbindRequest))
}

/// The unsolicited Notice of Disconnection (RFC 4511 §4.4.1).
pub fn notice_of_disconnection(code: ResultCode, diagnostic: &str) -> Bytes {
    encode(
        0,
        ProtocolOp::ExtendedResp(extended_response(code, diagnostic, Some(NOTICE_OF_DISCONNECTION_OID))),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    // A SearchRequest as ldapsearch sends it: base "dc=example,dc=com", scope sub,
    // filter (objectClass=*), id 7, followed by a paged-results control.
    fn search_pdu() -> Vec<u8> {
        let mut op = vec![0x04, 0x11];
        op.extend_from_slice(b"dc=example,dc=com");
        op.extend_from_slice(&[0x0a, 0x01, 0x02, 0x0a, 0x01, 0x00, 0x02, 0x01, 0x00, 0x02, 0x01, 0x00]);
        op.extend_from_slice(&[0x01, 0x01, 0x00, 0x87, 0x0b]);
        op.extend_from_slice(b"objectClass");
        op.extend_from_slice(&[0x30, 0x00]);
        let mut body = vec![0x02, 0x01, 0x07, 0x63, op.len() as u8];
        body.extend_from_slice(&op);
        let mut pdu = vec![0x30, body.len() as u8];
        pdu.extend_from_slice(&body);
        pdu
    }

    #[test]
    fn peeks_id_and_operation() {
        let env = Envelope::peek(&search_pdu()).unwrap();
        assert_eq!((env.message_id, env.op), (7, Op::Search));
    }

    #[test]
    fn reads_result_code_of_a_response() {
        let pdu = error_response(
            &Envelope {
                message_id: 3,
                op: Op::Modify,
                op_contents: (0, 0),
            },
            ResultCode::Unavailable,
            "down",
        )
        .unwrap();
        let env = Envelope::peek(&pdu).unwrap();
        assert_eq!(env.op, Op::ModifyResponse);
        assert_eq!(env.message_id, 3);
        assert_eq!(env.result_code(&pdu), Some(52));
    }

    #[test]
    fn notice_of_disconnection_is_unsolicited_extended_response() {
        let pdu = notice_of_disconnection(ResultCode::ProtocolError, "bad PDU");
        let decoded: LdapMessage = rasn::ber::decode(&pdu).unwrap();
        assert_eq!(decoded.message_id, 0);
        let ProtocolOp::ExtendedResp(resp) = decoded.protocol_op else {
            panic!("not an extended response: {decoded:?}");
        };
        assert_eq!(resp.result_code, ResultCode::ProtocolError);
        assert_eq!(
            resp.response_name.as_deref(),
            Some(NOTICE_OF_DISCONNECTION_OID.as_bytes())
        );
    }

    #[test]
    fn finds_starttls_and_abandon_targets() {
        let starttls = [
            &[0x30, 0x1d, 0x02, 0x01, 0x01, 0x77, 0x18, 0x80, 0x16][..],
            STARTTLS_OID.as_bytes(),
        ]
        .concat();
        let env = Envelope::peek(&starttls).unwrap();
        assert_eq!(env.extended_name(&starttls), Some(STARTTLS_OID.as_bytes()));

        let abandon = [0x30, 0x06, 0x02, 0x01, 0x09, 0x50, 0x01, 0x05];
        let env = Envelope::peek(&abandon).unwrap();
        assert_eq!((env.op, env.abandoned_id(&abandon)), (Op::Abandon, Some(5)));
    }

    #[test]
    fn envelope_errors_are_reported() {
        assert!(matches!(
            Envelope::peek(&[0x30, 0x03, 0x04, 0x01, 0x01]),
            Err(EnvelopeError::BadMessageId)
        ));
        assert!(matches!(
            Envelope::peek(&[0x30, 0x05, 0x02, 0x01, 0x01, 0x30, 0x00]),
            Err(EnvelopeError::NotApplicationClass(0x30))
        ));
        assert!(Envelope::peek(&[0x30, 0x03, 0x02, 0x01, 0x01]).is_err());
    }
}
