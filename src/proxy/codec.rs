//! Frames a byte stream into whole LDAPMessages, keeping the original bytes.

use bytes::{Bytes, BytesMut};
use thiserror::Error;
use tokio_util::codec::Decoder;

use super::ber::{self, BerError};

/// The universal SEQUENCE tag every LDAPMessage starts with.
const SEQUENCE: u8 = 0x30;
/// The most a partly received PDU grows its buffer by ahead of its bytes.
const RESERVE_AHEAD: usize = 64 * 1024;

#[derive(Debug, Error)]
pub enum FrameError {
    #[error("PDU does not start with a SEQUENCE (tag {0:#04x})")]
    NotASequence(u8),
    #[error("PDU of {len} bytes is over the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("malformed PDU header: {0}")]
    Ber(#[from] BerError),
    #[error("connection ended in the middle of a PDU")]
    Truncated,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Splits a stream into LDAPMessage frames of at most `max_len` bytes.
///
/// The limit is checked as soon as the length is known, so an oversized
/// PDU is refused before its body is buffered.
#[derive(Debug, Clone)]
pub struct PduCodec {
    max_len: usize,
}

impl PduCodec {
    pub fn new(max_len: usize) -> Self {
        Self { max_len }
    }
}

impl Decoder for PduCodec {
    type Item = Bytes;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        if let Some(&tag) = src.first()
            && tag != SEQUENCE
        {
            return Err(FrameError::NotASequence(tag));
        }
        let Some(header) = ber::read_header(src)? else {
            return Ok(None);
        };
        let total = header.total_len();
        if total > self.max_len {
            return Err(FrameError::TooLarge {
                len: total,
                max: self.max_len,
            });
        }
        if src.len() < total {
            // What a header announces is only a promise: grow towards it
            // by what can arrive next, never by the whole announced length
            // (a 7-byte header once asked for 64 GiB up front).
            src.reserve((total - src.len()).min(RESERVE_AHEAD));
            return Ok(None);
        }
        Ok(Some(src.split_to(total).freeze()))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => Err(FrameError::Truncated),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(input: &[u8], max: usize) -> (Vec<Bytes>, Option<FrameError>) {
        let mut codec = PduCodec::new(max);
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        loop {
            match codec.decode_eof(&mut buf) {
                Ok(Some(f)) => out.push(f),
                Ok(None) => return (out, None),
                Err(e) => return (out, Some(e)),
            }
        }
    }

    #[test]
    fn splits_back_to_back_pdus_unchanged() {
        let a = [0x30, 0x03, 0x02, 0x01, 0x01];
        let b = [0x30, 0x84, 0, 0, 0, 3, 0x02, 0x01, 0x02];
        let input = [&a[..], &b[..]].concat();
        let (out, err) = frames(&input, 1024);
        assert!(err.is_none());
        assert_eq!(out, vec![Bytes::copy_from_slice(&a), Bytes::copy_from_slice(&b)]);
    }

    #[test]
    fn refuses_oversized_before_the_body_arrives() {
        // Header announces 1 MiB; only the header is here.
        let (out, err) = frames(&[0x30, 0x83, 0x10, 0x00, 0x00], 256 * 1024);
        assert!(out.is_empty());
        assert!(matches!(err, Some(FrameError::TooLarge { len, .. }) if len == 0x100000 + 5));
    }

    #[test]
    fn an_announced_length_reserves_no_more_than_a_chunk_ahead() {
        // 64 GiB announced, within a limit that allows it.
        let mut codec = PduCodec::new(usize::MAX);
        let mut buf = BytesMut::from(&[0x30, 0x85, 0x10, 0x00, 0x00, 0x00, 0x00][..]);
        assert!(codec.decode(&mut buf).unwrap().is_none());
        assert!(buf.capacity() <= 7 + RESERVE_AHEAD, "reserved {} bytes", buf.capacity());
    }

    #[test]
    fn refuses_other_outer_tags_and_truncation() {
        assert!(matches!(
            frames(&[0x31, 0x00], 64).1,
            Some(FrameError::NotASequence(0x31))
        ));
        assert!(matches!(frames(&[0x30, 0x80, 0, 0], 64).1, Some(FrameError::Ber(_))));
        assert!(matches!(frames(&[0x30, 0x05, 0x02], 64).1, Some(FrameError::Truncated)));
    }
}
