//! The little BER the relay needs: tag-and-length headers (RFC 4511 §5.1).
//!
//! The relay frames PDUs and peeks at a few envelope fields without decoding
//! whole messages, so that forwarding never depends on a full decoder
//! accepting a PDU it only passes through.

use thiserror::Error;

/// A BER tag-length header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The identifier octet (LDAP uses only low tag numbers, so one octet).
    pub tag: u8,
    /// The length of the contents.
    pub len: usize,
    /// How many octets the tag and length take.
    pub header_len: usize,
}

impl Header {
    /// Total encoded size: header plus contents.
    pub fn total_len(&self) -> usize {
        self.header_len + self.len
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum BerError {
    #[error("high tag number form (tag octet {0:#04x}) is not used by LDAP")]
    HighTagNumber(u8),
    #[error("indefinite length is not allowed in LDAP (RFC 4511 section 5.1)")]
    IndefiniteLength,
    #[error("length field of {0} octets is longer than 8")]
    LengthTooLong(usize),
    #[error("length {0} does not fit this machine's address space")]
    LengthOverflow(u64),
    #[error("element is truncated")]
    Truncated,
}

/// Reads a header from the start of `buf`.
///
/// `Ok(None)` means more bytes are needed to know; errors are final.
pub fn read_header(buf: &[u8]) -> Result<Option<Header>, BerError> {
    let Some(&tag) = buf.first() else {
        return Ok(None);
    };
    if tag & 0x1f == 0x1f {
        return Err(BerError::HighTagNumber(tag));
    }
    let Some(&first) = buf.get(1) else {
        return Ok(None);
    };
    if first < 0x80 {
        return Ok(Some(Header {
            tag,
            len: usize::from(first),
            header_len: 2,
        }));
    }
    let octets = usize::from(first & 0x7f);
    if octets == 0 {
        return Err(BerError::IndefiniteLength);
    }
    // BER allows leading zero octets in the long form, so the count of
    // octets alone says nothing about the value; only more than 8 cannot fit.
    if octets > 8 {
        return Err(BerError::LengthTooLong(octets));
    }
    let Some(bytes) = buf.get(2..2 + octets) else {
        return Ok(None);
    };
    let len = bytes.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
    // The header must fit too: `total_len` is then exact (found by fuzzing:
    // an 8-octet length near 2^64 wrapped the total around).
    let header_len = 2 + octets;
    let len = usize::try_from(len)
        .ok()
        .filter(|len| len.checked_add(header_len).is_some())
        .ok_or(BerError::LengthOverflow(len))?;
    Ok(Some(Header { tag, len, header_len }))
}

/// Reads one complete element at the start of `buf`: its header and contents.
pub fn read_element(buf: &[u8]) -> Result<(Header, &[u8]), BerError> {
    let header = read_header(buf)?.ok_or(BerError::Truncated)?;
    let contents = buf
        .get(header.header_len..)
        .and_then(|rest| rest.get(..header.len))
        .ok_or(BerError::Truncated)?;
    Ok((header, contents))
}

/// Whether no element in `buf` is nested more than `limit` deep, walked
/// without recursion. Malformed input counts as within the limit: a
/// decoder then fails on it before it can recurse past what was walked.
pub fn depth_within(buf: &[u8], limit: usize) -> bool {
    const CONSTRUCTED: u8 = 0x20;
    let mut stack = vec![(buf, 0usize)];
    while let Some((mut rest, depth)) = stack.pop() {
        while !rest.is_empty() {
            let Ok((header, contents)) = read_element(rest) else {
                break;
            };
            if header.tag & CONSTRUCTED != 0 {
                if depth + 1 > limit {
                    return false;
                }
                stack.push((contents, depth + 1));
            }
            rest = &rest[header.total_len()..];
        }
    }
    true
}

/// Decodes the contents of a BER INTEGER (two's complement, big-endian).
pub fn integer(contents: &[u8]) -> Option<i64> {
    if contents.is_empty() || contents.len() > 8 {
        return None;
    }
    let sign = if contents[0] & 0x80 != 0 { -1i64 } else { 0 };
    Some(contents.iter().fold(sign, |acc, &b| (acc << 8) | i64::from(b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_depth_is_measured_without_recursion() {
        let mut nested = vec![0x04, 0x00];
        for _ in 0..1_000 {
            let mut outer = vec![0xa0, 0x84];
            outer.extend((nested.len() as u32).to_be_bytes());
            outer.extend(nested);
            nested = outer;
        }
        assert!(!depth_within(&nested, 64));
        assert!(depth_within(&[0x30, 0x03, 0x02, 0x01, 0x01], 1));
        assert!(!depth_within(&[0x30, 0x02, 0x30, 0x00], 1));
    }

    #[test]
    fn a_length_whose_total_overflows_is_an_error() {
        let huge = [0x30, 0x88, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfa];
        assert_eq!(read_header(&huge), Err(BerError::LengthOverflow(0xffff_ffff_ffff_fffa)));
    }

    #[test]
    fn short_and_long_form_lengths() {
        let cases: &[(&[u8], Option<Header>)] = &[
            (&[0x30], None),
            (
                &[0x30, 0x05],
                Some(Header {
                    tag: 0x30,
                    len: 5,
                    header_len: 2,
                }),
            ),
            (&[0x30, 0x81], None),
            (
                &[0x30, 0x81, 0xc8],
                Some(Header {
                    tag: 0x30,
                    len: 200,
                    header_len: 3,
                }),
            ),
            (
                &[0x30, 0x82, 0x01, 0x00],
                Some(Header {
                    tag: 0x30,
                    len: 256,
                    header_len: 4,
                }),
            ),
            // Leading zeros are legal BER.
            (
                &[0x30, 0x84, 0, 0, 0, 7],
                Some(Header {
                    tag: 0x30,
                    len: 7,
                    header_len: 6,
                }),
            ),
        ];
        for (bytes, expected) in cases {
            assert_eq!(read_header(bytes).unwrap(), *expected, "{bytes:02x?}");
        }
    }

    #[test]
    fn rejects_what_ldap_forbids() {
        assert_eq!(read_header(&[0x30, 0x80]), Err(BerError::IndefiniteLength));
        assert_eq!(
            read_header(&[0x30, 0x89, 0, 0, 0, 0, 0, 0, 0, 0, 1]),
            Err(BerError::LengthTooLong(9))
        );
        assert_eq!(read_header(&[0x3f, 0x01]), Err(BerError::HighTagNumber(0x3f)));
    }

    #[test]
    fn element_must_fit_its_buffer() {
        assert_eq!(read_element(&[0x02, 0x02, 0x01]), Err(BerError::Truncated));
        let (h, c) = read_element(&[0x02, 0x01, 0x07, 0xff]).unwrap();
        assert_eq!((h.tag, c), (0x02, &[0x07][..]));
    }

    #[test]
    fn integers_are_twos_complement() {
        assert_eq!(integer(&[0x01]), Some(1));
        assert_eq!(integer(&[0x00, 0x80]), Some(128));
        assert_eq!(integer(&[0xff]), Some(-1));
        assert_eq!(integer(&[0x7f, 0xff, 0xff, 0xff]), Some(i64::from(i32::MAX)));
        assert_eq!(integer(&[]), None);
        assert_eq!(integer(&[1; 9]), None);
    }
}
