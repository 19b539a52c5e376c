//! A corpus of hostile and malformed client input, generated here so that
//! every case is readable as code: what the bytes are, which RFC 4511 rule
//! they break, and what a client must see from ldapsync.

/// What the client must observe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The PDU frames, so it is relayed: the client gets exactly what the
    /// directory answers when sent the same bytes directly.
    SameAsDirectory,
    /// A Notice of Disconnection with protocolError, then the connection
    /// closes (RFC 4511 §4.1.1 and §4.4.1).
    ProtocolErrorNotice,
    /// The connection closes with no reply.
    ClosedSilently,
    /// Nothing is relayed or answered: the PDU is not complete yet.
    NothingYet,
}

pub struct Case {
    pub name: String,
    /// The rule the input breaks, for the reader.
    pub rule: &'static str,
    pub bytes: Vec<u8>,
    /// Close the sending side after the bytes (an end of stream).
    pub then_eof: bool,
    pub expect: Expect,
}

/// A definite length in the shortest form.
fn length(len: usize) -> Vec<u8> {
    if len < 0x80 {
        return vec![len as u8];
    }
    let bytes: Vec<u8> = len.to_be_bytes().into_iter().skip_while(|&b| b == 0).collect();
    let mut out = vec![0x80 | bytes.len() as u8];
    out.extend(bytes);
    out
}

fn tlv(tag: u8, contents: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend(length(contents.len()));
    out.extend_from_slice(contents);
    out
}

/// An INTEGER's contents in two's complement, minimal.
fn integer(value: i128) -> Vec<u8> {
    let bytes = value.to_be_bytes();
    let mut start = 0;
    while start < 15
        && ((bytes[start] == 0 && bytes[start + 1] & 0x80 == 0)
            || (bytes[start] == 0xff && bytes[start + 1] & 0x80 != 0))
    {
        start += 1;
    }
    bytes[start..].to_vec()
}

/// An LDAPMessage from a message id and an already encoded protocolOp (and
/// optional encoded controls).
fn message(id: i128, op: &[u8], controls: Option<&[u8]>) -> Vec<u8> {
    let mut body = tlv(0x02, &integer(id));
    body.extend_from_slice(op);
    if let Some(controls) = controls {
        body.extend(tlv(0xa0, controls));
    }
    tlv(0x30, &body)
}

/// A simple BindRequest.
pub fn bind(version: i128, name: &[u8], password: &[u8]) -> Vec<u8> {
    let mut op = tlv(0x02, &integer(version));
    op.extend(tlv(0x04, name));
    op.extend(tlv(0x80, password));
    tlv(0x60, &op)
}

/// A SearchRequest (base, scope 2, no limits) with an encoded filter.
fn search(base: &[u8], filter: &[u8]) -> Vec<u8> {
    search_scoped(base, 2, filter)
}

/// A SearchRequest (scope 0 base, 2 subtree; no limits) asking for no attributes.
fn search_scoped(base: &[u8], scope: u8, filter: &[u8]) -> Vec<u8> {
    let mut op = tlv(0x04, base);
    op.extend([0x0a, 0x01, scope]);
    // derefAliases never, sizeLimit 0, timeLimit 0, typesOnly FALSE
    op.extend([0x0a, 0x01, 0x00, 0x02, 0x01, 0x00, 0x02, 0x01, 0x00, 0x01, 0x01, 0x00]);
    op.extend_from_slice(filter);
    op.extend(tlv(0x30, &tlv(0x04, b"1.1")));
    tlv(0x63, &op)
}

/// `(objectClass=*)`
fn present() -> Vec<u8> {
    tlv(0x87, b"objectClass")
}

/// `(attr=value)`
fn equality(attr: &[u8], value: &[u8]) -> Vec<u8> {
    let mut ava = tlv(0x04, attr);
    ava.extend(tlv(0x04, value));
    tlv(0xa3, &ava)
}

/// A filter nested `depth` times in `tag` (0xa0 and, 0xa1 or, 0xa2 not).
fn nested(depth: usize, tag: u8) -> Vec<u8> {
    let mut filter = present();
    for _ in 0..depth {
        filter = tlv(tag, &filter);
    }
    filter
}

/// A base search of the root DSE.
pub fn root_dse(id: i128) -> Vec<u8> {
    message(id, &search_scoped(b"", 0, &present()), None)
}

fn case(name: impl Into<String>, rule: &'static str, bytes: Vec<u8>, expect: Expect) -> Case {
    Case {
        name: name.into(),
        rule,
        bytes,
        then_eof: false,
        expect,
    }
}

/// Every hostile case, in a fixed order.
pub fn corpus() -> Vec<Case> {
    use Expect::*;
    let valid = root_dse(1);
    let mut cases = Vec::new();

    // Framing: the outer SEQUENCE and its length (RFC 4511 §5.1: BER with
    // definite lengths only; §4.1.1: what cannot be parsed ends the session).
    // The client can still read after ending its side: it is told why.
    cases.push(Case {
        then_eof: true,
        ..case(
            "truncated PDU then end of stream",
            "§4.1.1",
            valid[..valid.len() - 3].to_vec(),
            ProtocolErrorNotice,
        )
    });
    let mut longer = valid.clone();
    longer[1] += 10;
    cases.push(case("length longer than the data sent", "§5.1", longer, NothingYet));
    let mut indefinite = vec![0x30, 0x80];
    indefinite.extend_from_slice(&valid[2..]);
    indefinite.extend([0x00, 0x00]);
    cases.push(case("indefinite length", "§5.1", indefinite, ProtocolErrorNotice));
    let mut leading_zeros = vec![0x30, 0x84, 0x00, 0x00, 0x00, valid[1]];
    leading_zeros.extend_from_slice(&valid[2..]);
    cases.push(case(
        "long-form length with leading zeros",
        "§5.1 (BER allows it)",
        leading_zeros,
        SameAsDirectory,
    ));
    let mut nine = vec![0x30, 0x89, 0, 0, 0, 0, 0, 0, 0, 0, valid[1]];
    nine.extend_from_slice(&valid[2..]);
    cases.push(case("9-byte length", "§5.1", nine, ProtocolErrorNotice));
    for tag in [0x31u8, 0x04, 0x60, 0xff] {
        let mut wrong = valid.clone();
        wrong[0] = tag;
        cases.push(case(
            format!("outer tag {tag:#04x} instead of SEQUENCE"),
            "§4.1.1",
            wrong,
            ProtocolErrorNotice,
        ));
    }

    // Message ids (§4.1.1.1: MessageID ::= INTEGER (0 .. maxInt); 0 is
    // reserved for notices, but directories answer it, so it is relayed).
    cases.push(case("message id 0", "§4.1.1.1", root_dse(0), SameAsDirectory));
    for (name, id) in [
        ("message id -1", -1),
        ("message id maxInt + 1", 1 << 31),
        ("message id 2^62", 1 << 62),
    ] {
        cases.push(case(name, "§4.1.1.1", root_dse(id), ProtocolErrorNotice));
    }

    // Bind versions other than 3 (§4.2).
    for version in [0, 4, 128] {
        cases.push(case(
            format!("bind with version {version}"),
            "§4.2",
            message(1, &bind(version, b"", b""), None),
            SameAsDirectory,
        ));
    }

    // Strings that are not UTF-8 (§4.1.2: LDAPString is UTF-8).
    cases.push(case(
        "non-UTF-8 DN in a search base",
        "§4.1.2",
        message(1, &search(b"ou=\xff\xfe,dc=example,dc=com", &present()), None),
        SameAsDirectory,
    ));
    cases.push(case(
        "non-UTF-8 bind name",
        "§4.1.2",
        message(1, &bind(3, b"uid=\xc3\x28,dc=example,dc=com", b"x"), None),
        SameAsDirectory,
    ));
    cases.push(case(
        "non-UTF-8 filter value",
        "§4.1.2",
        message(1, &search(b"dc=example,dc=com", &equality(b"uid", b"\xff\xfe")), None),
        SameAsDirectory,
    ));

    // Deep filters: ldapsync frames and relays them without decoding.
    for (tag, name) in [(0xa0, "AND"), (0xa1, "OR"), (0xa2, "NOT")] {
        cases.push(case(
            format!("{name} nested 10,000 deep"),
            "§4.5.1.7",
            message(1, &search(b"dc=example,dc=com", &nested(10_000, tag)), None),
            SameAsDirectory,
        ));
    }

    // An unknown critical control (§4.1.11: unavailableCriticalExtension).
    let mut control = tlv(0x04, b"1.2.3.4.5.6.7.8.9");
    control.extend([0x01, 0x01, 0xff]);
    cases.push(case(
        "unknown critical control",
        "§4.1.11",
        message(1, &search(b"", &present()), Some(&tlv(0x30, &control))),
        SameAsDirectory,
    ));

    // A protocolOp that is a response, and an APPLICATION tag RFC 4511 does
    // not define: relayed, the directory decides.
    cases.push(case(
        "a response sent as a request",
        "§4.1.1",
        message(1, &tlv(0x61, &[0x0a, 0x01, 0x00, 0x04, 0x00, 0x04, 0x00]), None),
        SameAsDirectory,
    ));

    // Unbind, then more bytes (§4.3: the session ends at the unbind).
    let mut after_unbind = message(1, &[0x42, 0x00], None);
    after_unbind.extend(root_dse(2));
    cases.push(case("bytes after an unbind", "§4.3", after_unbind, ClosedSilently));
    cases
}

/// An anonymous simple bind.
pub fn simple_bind(id: i128) -> Vec<u8> {
    message(id, &bind(3, b"", b""), None)
}

/// An LDAPResult-based response: `tag` (e.g. 0x61 BindResponse), code.
fn response(id: i128, tag: u8, code: u8) -> Vec<u8> {
    message(id, &tlv(tag, &[0x0a, 0x01, code, 0x04, 0x00, 0x04, 0x00]), None)
}

/// A client request that breaks a rule conformance mode checks.
pub struct Violation {
    pub rule: &'static str,
    pub bytes: Vec<u8>,
    /// The message id the report names.
    pub message_id: i64,
    /// The message id of the answer to wait for before the next case.
    pub answered_by: u32,
}

/// Client violations, each on a connection of its own (two of them end it).
pub fn conformance_violations() -> Vec<Violation> {
    let mut control = tlv(0x04, b"not.an.oid");
    control.extend([0x01, 0x01, 0x00]);
    let mut reused = crate::persistent_search(4, "ou=groups,dc=example,dc=com");
    reused.extend(message(4, &search(b"dc=example,dc=com", &present()), None));
    let violation = |rule, bytes, message_id, answered_by| Violation {
        rule,
        bytes,
        message_id,
        answered_by,
    };
    vec![
        violation("message-id", root_dse(0), 0, 0),
        violation("bind-version", message(2, &bind(2, b"", b""), None), 2, 2),
        violation("invalid-dn", message(3, &search(b"not a dn", &present()), None), 3, 3),
        violation(
            "control-type",
            message(6, &search_scoped(b"", 0, &present()), Some(&tlv(0x30, &control))),
            6,
            6,
        ),
        // ldapsync refuses it with a Notice of Disconnection: its answer
        // would be ambiguous, and so would the first request's capture.
        violation("message-id-reused", reused, 4, 0),
        // slapd answers with a Notice of Disconnection.
        violation("not-a-request", response(5, 0x61, 0), 5, 0),
    ]
}

/// What a misbehaving directory answers to a bind with message id 1, and
/// the rule (and message id) conformance mode reports for it.
pub fn directory_violations() -> Vec<(&'static str, Vec<u8>, Option<i64>)> {
    let mut notice_then_more = message(
        0,
        &tlv(
            0x78,
            &[
                &[0x0a, 0x01, 0x34, 0x04, 0x00, 0x04, 0x00][..],
                &tlv(0x8a, b"1.3.6.1.4.1.1466.20036"),
            ]
            .concat(),
        ),
        None,
    );
    notice_then_more.extend(response(1, 0x61, 0));
    vec![
        ("response-type", response(1, 0x65, 0), Some(1)),
        ("unexpected-response", response(7, 0x61, 0), Some(7)),
        ("result-code", response(1, 0x61, 99), Some(1)),
        ("unsolicited-notification", response(0, 0x61, 0), Some(0)),
        ("data-after-notice", notice_then_more, None),
    ]
}
