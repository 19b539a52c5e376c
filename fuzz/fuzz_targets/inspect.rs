//! Everything ldapsync reads from a framed PDU, on arbitrary bytes: the
//! envelope, the fields the relay acts on, and the decoding of a captured
//! write. None of it may panic.

#![no_main]

use bytes::Bytes;
use ldapsync::proxy::capture::{CapturedWrite, WriteKind};
use ldapsync::proxy::message::Envelope;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = Envelope::peek(data) {
        let _ = env.result_code(data);
        let _ = env.abandoned_id(data);
        let _ = env.extended_name(data);
        let _ = env.is_sasl_bind(data);
        let _ = env.is_anonymous_bind(data);
        let _ = ldapsync::proxy::message::error_response(&env, rasn_ldap::ResultCode::Busy, "fuzz");
    }
    let write = CapturedWrite {
        session: 1,
        message_id: 1,
        kind: WriteKind::Modify,
        request: Bytes::copy_from_slice(data),
    };
    let _ = write.affected();
});
