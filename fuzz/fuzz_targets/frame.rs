//! The PDU framer on arbitrary bytes arriving in arbitrary pieces: it must
//! never panic, and the frames it yields must be the input's own bytes, in
//! order, each a complete SEQUENCE no larger than the limit.

#![no_main]

use bytes::BytesMut;
use ldapsync::proxy::codec::PduCodec;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

const MAX: usize = 4096;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the chunk size, so splits vary with the input.
    let Some((&chunk, input)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut codec = PduCodec::new(MAX);
    let mut buffer = BytesMut::new();
    let mut framed = Vec::new();
    for piece in input.chunks(chunk) {
        buffer.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buffer) {
                Ok(Some(frame)) => {
                    assert_eq!(frame[0], 0x30, "a frame is a SEQUENCE");
                    assert!(frame.len() <= MAX, "a frame respects the limit");
                    framed.extend_from_slice(&frame);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    let _ = codec.decode_eof(&mut buffer);
    assert_eq!(&input[..framed.len()], &framed[..], "frames are the input, unchanged");
});
