//! Conformance mode: every PDU, in both directions, checked against the
//! RFC 4511 rules that are cheap to verify, with each violation written as
//! a JSON line (session, side, message id, rule, clause, detail). It reads
//! copies of what is relayed and never changes it: this is for people
//! testing LDAP clients and servers through ldapsync.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use rasn_ldap::{LdapMessage, ProtocolOp};
use serde::Serialize;

use super::ber;
use super::message::{Envelope, NOTICE_OF_DISCONNECTION_OID, Op};
use crate::dn;

/// Deeper PDUs are checked at the envelope only: full decoding recurses.
const MAX_DECODE_DEPTH: usize = 64;
const MAX_INT: i64 = i32::MAX as i64;

/// Where violations go, shared by every session.
pub struct Report {
    out: Mutex<BufWriter<File>>,
}

impl Report {
    pub fn create(path: &Path) -> std::io::Result<Report> {
        let file = File::options().create(true).append(true).open(path)?;
        Ok(Report {
            out: Mutex::new(BufWriter::new(file)),
        })
    }

    fn write(&self, violation: &Violation) {
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let line = serde_json::to_string(violation).expect("a violation serializes");
        // Flushed per line: the report is read while ldapsync runs.
        if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
            tracing::warn!(error = %e, "cannot write the conformance report");
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum From {
    Client,
    Directory,
}

#[derive(Serialize)]
struct Violation<'a> {
    at: String,
    session: u64,
    from: From,
    message_id: Option<i64>,
    rule: &'static str,
    clause: &'static str,
    detail: &'a str,
}

/// One session's view of the exchange.
pub struct Checker {
    out: SessionReport,
    outstanding: HashMap<i64, Op>,
    noticed: bool,
}

/// The report, as one session writes to it.
struct SessionReport {
    report: Arc<Report>,
    session: u64,
}

impl SessionReport {
    fn violation(&self, from: From, message_id: Option<i64>, rule: &'static str, clause: &'static str, detail: &str) {
        self.report.write(&Violation {
            at: humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
            session: self.session,
            from,
            message_id,
            rule,
            clause,
            detail,
        });
    }
}

impl Checker {
    pub fn new(report: Arc<Report>, session: u64) -> Self {
        Checker {
            out: SessionReport { report, session },
            outstanding: HashMap::new(),
            noticed: false,
        }
    }

    /// A PDU the client sent.
    pub fn client(&mut self, pdu: &[u8]) {
        let out = &self.out;
        let v = |rule, clause, id, detail: &str| out.violation(From::Client, id, rule, clause, detail);
        let env = match Envelope::peek(pdu) {
            Ok(env) => env,
            Err(e) => return v("undecodable", "RFC 4511 §4.1.1", None, &e.to_string()),
        };
        let id = Some(env.message_id);
        if !(1..=MAX_INT).contains(&env.message_id) {
            v(
                "message-id",
                "RFC 4511 §4.1.1.1",
                id,
                "a request's message id is 1..2147483647 (0 is for unsolicited notifications)",
            );
        }
        match env.op {
            op if op.expects_response() => {
                if self.outstanding.insert(env.message_id, op).is_some() {
                    v(
                        "message-id-reused",
                        "RFC 4511 §4.1.1.1",
                        id,
                        "the message id of a request still in progress",
                    );
                }
            }
            Op::Abandon | Op::Unbind => {}
            other => v(
                "not-a-request",
                "RFC 4511 §4.1.1",
                id,
                &format!("{} is not a request", other.name()),
            ),
        }
        if let Some(message) = decode(pdu) {
            match message {
                Ok(message) => self.client_fields(&message),
                Err(e) => v("undecodable", "RFC 4511 §4.1.1, §5.1", id, &e),
            }
        }
    }

    fn client_fields(&self, message: &LdapMessage) {
        let id = Some(i64::from(message.message_id));
        let dn = |what: &str, dn: &str| {
            if !dn.is_empty() && !dn::is_valid(dn) {
                self.out.violation(
                    From::Client,
                    id,
                    "invalid-dn",
                    "RFC 4511 §4.1.3, RFC 4514",
                    &format!("{what} {dn:?} is not an LDAPDN"),
                );
            }
        };
        match &message.protocol_op {
            ProtocolOp::BindRequest(bind) => {
                if bind.version != 3 {
                    self.out.violation(
                        From::Client,
                        id,
                        "bind-version",
                        "RFC 4511 §4.2",
                        &format!("version {} (LDAPv3 is 3)", bind.version),
                    );
                }
                dn("bind name", &bind.name);
            }
            ProtocolOp::SearchRequest(search) => dn("search base", &search.base_object),
            ProtocolOp::AddRequest(add) => dn("entry", &add.entry),
            ProtocolOp::DelRequest(del) => dn("entry", &del.0),
            ProtocolOp::ModifyRequest(modify) => dn("object", &modify.object),
            ProtocolOp::CompareRequest(compare) => dn("entry", &compare.entry),
            ProtocolOp::ModDnRequest(moddn) => {
                dn("entry", &moddn.entry);
                dn("new RDN", &moddn.new_rdn);
                if let Some(superior) = &moddn.new_superior {
                    dn("new superior", superior);
                }
            }
            _ => {}
        }
        for control in message.controls.iter().flatten() {
            let oid = String::from_utf8_lossy(&control.control_type);
            if !numeric_oid(&oid) {
                self.out.violation(
                    From::Client,
                    id,
                    "control-type",
                    "RFC 4511 §4.1.11, §4.1.2",
                    &format!("control type {oid:?} is not a numeric OID"),
                );
            }
        }
    }

    /// A PDU the directory sent.
    pub fn directory(&mut self, pdu: &[u8]) {
        let out = &self.out;
        let v = |rule, clause, id, detail: &str| out.violation(From::Directory, id, rule, clause, detail);
        if self.noticed {
            v(
                "data-after-notice",
                "RFC 4511 §4.4.1",
                None,
                "the directory sent more after a Notice of Disconnection",
            );
        }
        let env = match Envelope::peek(pdu) {
            Ok(env) => env,
            Err(e) => return v("undecodable", "RFC 4511 §4.1.1", None, &e.to_string()),
        };
        let id = Some(env.message_id);
        if env.message_id == 0 {
            if env.op != Op::ExtendedResponse {
                v(
                    "unsolicited-notification",
                    "RFC 4511 §4.4",
                    id,
                    &format!("message id 0 carries {}, not an ExtendedResponse", env.op.name()),
                );
            } else if let Some(Ok(message)) = decode(pdu)
                && let ProtocolOp::ExtendedResp(response) = &message.protocol_op
                && response.response_name.as_deref() == Some(NOTICE_OF_DISCONNECTION_OID.as_bytes())
            {
                self.noticed = true;
            }
        } else {
            match self.outstanding.get(&env.message_id).copied() {
                None => v(
                    "unexpected-response",
                    "RFC 4511 §4.1.1.1",
                    id,
                    &format!("{} for no request in progress", env.op.name()),
                ),
                Some(request) if !answers(request, env.op) => v(
                    "response-type",
                    "RFC 4511 §4.1.1",
                    id,
                    &format!("{} in answer to {}", env.op.name(), request.name()),
                ),
                Some(_) if env.op.is_final_response() => {
                    self.outstanding.remove(&env.message_id);
                }
                Some(_) => {}
            }
        }
        if env.op.is_final_response()
            && let Some(code) = env.result_code(pdu)
            && !valid_result_code(code)
        {
            v(
                "result-code",
                "RFC 4511 §4.1.9, Appendix A",
                id,
                &format!("result code {code} is not defined"),
            );
        }
        if let Some(Err(e)) = decode(pdu) {
            v("undecodable", "RFC 4511 §4.1.1, §5.1", id, &e);
        }
    }
}

/// The full decoding, unless the PDU nests deeper than decoding should go.
fn decode(pdu: &[u8]) -> Option<Result<LdapMessage, String>> {
    ber::depth_within(pdu, MAX_DECODE_DEPTH).then(|| rasn::ber::decode::<LdapMessage>(pdu).map_err(|e| e.to_string()))
}

/// Whether `response` may answer `request` (RFC 4511 §4.2 – §4.12).
fn answers(request: Op, response: Op) -> bool {
    match request {
        Op::Bind => response == Op::BindResponse,
        Op::Search => matches!(
            response,
            Op::SearchEntry | Op::SearchReference | Op::SearchDone | Op::Intermediate
        ),
        Op::Modify => response == Op::ModifyResponse,
        Op::Add => response == Op::AddResponse,
        Op::Delete => response == Op::DeleteResponse,
        Op::ModifyDn => response == Op::ModifyDnResponse,
        Op::Compare => response == Op::CompareResponse,
        Op::Extended => matches!(response, Op::ExtendedResponse | Op::Intermediate),
        _ => false,
    }
}

/// RFC 4511 Appendix A, plus the codes registered by RFC 3909 (cancel,
/// 118–121), RFC 4528 (assertionFailed, 122), RFC 4370 (authorizationDenied,
/// 123) and RFC 4533 (e-syncRefreshRequired, 4096).
fn valid_result_code(code: i64) -> bool {
    matches!(code, 0..=8 | 10..=21 | 32..=36 | 48..=54 | 64..=69 | 71 | 80 | 118..=123 | 4096)
}

/// `numericoid` of RFC 4512 §1.4: numbers separated by dots, no leading zeros.
fn numeric_oid(oid: &str) -> bool {
    let mut parts = 0;
    let valid = oid.split('.').all(|part| {
        parts += 1;
        !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) && (part == "0" || !part.starts_with('0'))
    });
    valid && parts >= 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oids_and_result_codes() {
        assert!(numeric_oid("1.3.6.1.4.1.4203.1.9.1.1") && numeric_oid("2.5"));
        assert!(!numeric_oid("1.02.3") && !numeric_oid("1..2") && !numeric_oid("cn") && !numeric_oid("1"));
        assert!(valid_result_code(0) && valid_result_code(53) && valid_result_code(4096));
        assert!(!valid_result_code(9) && !valid_result_code(-1) && !valid_result_code(99));
    }
}
