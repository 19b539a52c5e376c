//! Frames a byte stream into whole LDAPMessages, keeping the original bytes,
//! and accounts for the bytes of a PDU still arriving: since when (for the
//! read deadline) and against a budget all sessions share.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

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
    #[error("partly received requests of all sessions are over their budget of {0} bytes")]
    OverBudget(usize),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Bytes of partly received PDUs all sessions may hold together, so that
/// many slow clients cannot exhaust memory between them.
#[derive(Debug)]
pub struct Budget {
    limit: usize,
    used: AtomicUsize,
}

impl Budget {
    pub fn new(limit: usize) -> Budget {
        Budget {
            limit,
            used: AtomicUsize::new(0),
        }
    }

    fn charge(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.limit)
            })
            .is_ok()
    }

    fn release(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// Splits a stream into LDAPMessage frames of at most `max_len` bytes.
///
/// The limit is checked as soon as the length is known, so an oversized
/// PDU is refused before its body is buffered.
#[derive(Debug)]
pub struct PduCodec {
    max_len: usize,
    /// Charged with the bytes of a PDU that has not arrived whole.
    budget: Option<Arc<Budget>>,
    charged: usize,
    /// When the first bytes of a PDU not yet whole arrived.
    partial_since: Option<Instant>,
}

impl PduCodec {
    pub fn new(max_len: usize) -> Self {
        Self {
            max_len,
            budget: None,
            charged: 0,
            partial_since: None,
        }
    }

    /// A codec whose partly received PDUs count against `budget`.
    pub fn with_budget(max_len: usize, budget: Arc<Budget>) -> Self {
        Self {
            budget: Some(budget),
            ..Self::new(max_len)
        }
    }

    /// Since when a PDU has been arriving without being whole yet.
    pub fn partial_since(&self) -> Option<Instant> {
        self.partial_since
    }

    /// Charges (or gives back) the budget so that it holds `buffered` bytes.
    fn account(&mut self, buffered: usize) -> Result<(), FrameError> {
        // Most calls change nothing (a whole PDU, nothing charged): they
        // must not write the budget's counter, a cache line every session
        // thread shares.
        let Some(budget) = self.budget.as_ref().filter(|_| buffered != self.charged) else {
            return Ok(());
        };
        if buffered > self.charged {
            if !budget.charge(buffered - self.charged) {
                return Err(FrameError::OverBudget(budget.limit));
            }
        } else {
            budget.release(self.charged - buffered);
        }
        self.charged = buffered;
        Ok(())
    }

    /// The length of the PDU at the start of `src`, once known: the PDU
    /// itself may not be whole yet.
    pub fn pdu_len(&self, src: &[u8]) -> Result<Option<usize>, FrameError> {
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
        Ok(Some(total))
    }

    /// The length of the first PDU in `src` once it is whole, leaving it
    /// there: a caller that frames in place needs no buffer per PDU.
    pub fn whole(&mut self, src: &mut BytesMut) -> Result<Option<usize>, FrameError> {
        let whole = self.whole_len(src)?;
        if whole.is_some() || src.is_empty() {
            self.partial_since = None;
            self.account(0)?;
        } else {
            self.partial_since.get_or_insert_with(Instant::now);
            // What the buffer holds in memory, reserved room included.
            self.account(src.capacity())?;
        }
        Ok(whole)
    }

    fn whole_len(&self, src: &mut BytesMut) -> Result<Option<usize>, FrameError> {
        let Some(total) = self.pdu_len(src)? else {
            return Ok(None);
        };
        if src.len() < total {
            Self::reserve_ahead(src, total);
            return Ok(None);
        }
        Ok(Some(total))
    }

    /// Frames no more (the bytes became opaque): a partial PDU's share of
    /// the budget is given back, and its read deadline dropped.
    pub fn forget_partial(&mut self) {
        self.partial_since = None;
        let _ = self.account(0);
    }

    /// Room in `src` for more of the `total`-byte PDU arriving at its start.
    /// What a header announces is only a promise: grow towards it by what
    /// can arrive next, never by the whole announced length (a 7-byte
    /// header once asked for 64 GiB up front).
    fn reserve_ahead(src: &mut BytesMut, total: usize) {
        src.reserve(total.saturating_sub(src.len()).min(RESERVE_AHEAD));
    }

    /// Makes room in `src` for the next read: at least `chunk` bytes, more
    /// (within the same bound) for a PDU at its start that is not whole.
    pub fn reserve_read(&self, src: &mut BytesMut, chunk: usize) {
        if let Ok(Some(total)) = self.pdu_len(src) {
            Self::reserve_ahead(src, total);
        }
        src.reserve(chunk);
    }
}

/// Moves an emptied buffer's start back to the start of its allocation.
/// A buffer advanced past what was relayed would otherwise walk its whole
/// allocation before `reserve` wraps it: every read and copy on lines not
/// touched since the last lap, each session's working set its buffers'
/// full size rather than their first lines (docs/performance.md measures
/// what that costs at 256 sessions).
pub(super) fn rewind(buffer: &mut BytesMut) {
    if buffer.is_empty() {
        // Reclaims only the space before the start; never allocates.
        let _ = buffer.try_reclaim(buffer.capacity() + 1);
    }
}

impl Drop for PduCodec {
    fn drop(&mut self) {
        let _ = self.account(0);
    }
}

impl Decoder for PduCodec {
    type Item = Bytes;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        Ok(self.whole(src)?.map(|len| src.split_to(len).freeze()))
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
    use bytes::Buf;

    use super::*;

    #[test]
    fn an_emptied_buffer_is_rewound_to_the_start_of_its_allocation() {
        let mut buffer = BytesMut::with_capacity(64);
        let start = buffer.as_ptr();
        buffer.extend_from_slice(&[0x30; 40]);
        buffer.advance(30);
        rewind(&mut buffer);
        assert_eq!(buffer.capacity(), 34, "bytes still to relay keep their place");
        buffer.advance(10);
        rewind(&mut buffer);
        assert_eq!((buffer.as_ptr(), buffer.capacity()), (start, 64));
        // At the start already: nothing to reclaim, and nothing allocated.
        rewind(&mut buffer);
        assert_eq!((buffer.as_ptr(), buffer.capacity()), (start, 64));
    }

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
    fn frames_in_place_leaving_the_bytes_where_they_are() {
        let mut codec = PduCodec::new(1024);
        let mut buf = BytesMut::from(&[0x30, 0x03, 0x02, 0x01, 0x07, 0x30, 0x03][..]);
        assert_eq!(codec.whole(&mut buf).unwrap(), Some(5));
        assert_eq!(buf.len(), 7, "the caller relays the PDU from the buffer, then advances");
        buf.advance(5);
        assert_eq!(codec.whole(&mut buf).unwrap(), None);
        assert!(codec.partial_since().is_some(), "the next PDU has begun to arrive");
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
    fn partly_received_pdus_share_one_budget_and_give_it_back() {
        // Each partial PDU below holds its 200 announced bytes' room.
        let budget = Arc::new(Budget::new(300));
        let mut a = PduCodec::with_budget(1024, Arc::clone(&budget));
        let mut b = PduCodec::with_budget(1024, Arc::clone(&budget));
        // 60 of 200 announced bytes each: the second is over the budget.
        let partial = |n: usize| {
            let mut pdu = vec![0x30, 0x81, 197];
            pdu.resize(n, 0x04);
            BytesMut::from(&pdu[..])
        };
        let mut first = partial(60);
        assert!(a.decode(&mut first).unwrap().is_none());
        assert!(a.partial_since().is_some());
        assert!(matches!(b.decode(&mut partial(60)), Err(FrameError::OverBudget(300))));
        drop(a);
        assert!(
            b.decode(&mut partial(60)).unwrap().is_none(),
            "a closed session gives its share back"
        );
        let mut whole = BytesMut::from(&[0x30, 0x03, 0x02, 0x01, 0x01][..]);
        let mut c = PduCodec::with_budget(1024, Arc::clone(&budget));
        assert!(c.decode(&mut whole).unwrap().is_some(), "whole PDUs need no budget");
        assert_eq!(c.partial_since(), None);
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
