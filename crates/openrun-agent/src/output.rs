//! Bounded output buffers that address bytes by absolute stream offset.
//!
//! Every byte a process writes to a stream gets an offset (0 for the first byte ever written).
//! The buffer keeps at most `retention` of the most recent bytes; older ones are dropped and
//! `start` moves forward, so a client that reattaches with `since=<offset>` either gets exactly
//! the bytes it is missing or learns how many it lost.

use std::collections::VecDeque;

/// Largest payload of one `Output` event.
pub(crate) const MAX_CHUNK: usize = 64 * 1024;

/// The retained tail of one output stream.
#[derive(Debug)]
pub(crate) struct OutputBuffer {
    bytes: VecDeque<u8>,
    /// Offset of `bytes[0]`.
    start: u64,
    retention: usize,
}

impl OutputBuffer {
    /// An empty buffer keeping at most `retention` bytes.
    pub(crate) fn new(retention: usize) -> Self {
        Self {
            bytes: VecDeque::new(),
            start: 0,
            retention,
        }
    }

    /// Offset of the oldest retained byte.
    #[cfg(test)]
    pub(crate) fn start(&self) -> u64 {
        self.start
    }

    /// Total bytes ever written; the offset the next byte will get.
    pub(crate) fn end(&self) -> u64 {
        self.start + self.bytes.len() as u64
    }

    /// Appends new output, dropping the oldest bytes beyond the retention limit.
    pub(crate) fn push(&mut self, data: &[u8]) {
        if data.len() >= self.retention {
            // Only the tail of `data` survives; everything retained before goes.
            let keep = &data[data.len() - self.retention..];
            self.start = self.end() + (data.len() - keep.len()) as u64;
            self.bytes.clear();
            self.bytes.extend(keep);
            return;
        }
        self.bytes.extend(data);
        let excess = self.bytes.len().saturating_sub(self.retention);
        if excess > 0 {
            self.bytes.drain(..excess);
            self.start += excess as u64;
        }
    }

    /// Bytes below `since` that are no longer retained.
    pub(crate) fn dropped_before(&self, since: u64) -> u64 {
        self.start.saturating_sub(since)
    }

    /// Up to `max` bytes starting at `since` (or at the oldest retained byte if `since` was
    /// dropped), with the offset of the first returned byte. `None` when nothing is available
    /// at or after `since`.
    pub(crate) fn read_from(&self, since: u64, max: usize) -> Option<(u64, Vec<u8>)> {
        let from = since.max(self.start);
        if from >= self.end() || max == 0 {
            return None;
        }
        let skip = usize::try_from(from - self.start).ok()?;
        let len = (self.bytes.len() - skip).min(max);
        let (a, b) = self.bytes.as_slices();
        let mut out = Vec::with_capacity(len);
        if skip < a.len() {
            let take = (a.len() - skip).min(len);
            out.extend_from_slice(&a[skip..skip + take]);
            let rest = len - take;
            out.extend_from_slice(&b[..rest]);
        } else {
            let skip_b = skip - a.len();
            out.extend_from_slice(&b[skip_b..skip_b + len]);
        }
        Some((from, out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(buf: &OutputBuffer, since: u64, chunk: usize) -> (u64, Vec<u8>) {
        let mut first = None;
        let mut out = Vec::new();
        let mut cursor = since;
        while let Some((off, bytes)) = buf.read_from(cursor, chunk) {
            first.get_or_insert(off);
            assert!(bytes.len() <= chunk);
            cursor = off + bytes.len() as u64;
            out.extend(bytes);
        }
        (first.unwrap_or(cursor), out)
    }

    #[test]
    fn offsets_count_every_byte() {
        let mut buf = OutputBuffer::new(100);
        buf.push(b"hello ");
        buf.push(b"world");
        assert_eq!(buf.start(), 0);
        assert_eq!(buf.end(), 11);
        assert_eq!(buf.read_from(6, 100), Some((6, b"world".to_vec())));
        assert_eq!(buf.read_from(0, 3), Some((0, b"hel".to_vec())));
        assert_eq!(buf.read_from(11, 100), None);
        assert_eq!(buf.read_from(50, 100), None);
        assert_eq!(buf.dropped_before(0), 0);
    }

    #[test]
    fn retention_drops_the_oldest_bytes() {
        let mut buf = OutputBuffer::new(8);
        buf.push(b"0123456789");
        assert_eq!(buf.start(), 2);
        assert_eq!(buf.end(), 10);
        buf.push(b"ab");
        assert_eq!(buf.start(), 4);
        assert_eq!(buf.end(), 12);
        assert_eq!(collect(&buf, 0, 100), (4, b"456789ab".to_vec()));
        assert_eq!(buf.dropped_before(0), 4);
        assert_eq!(buf.dropped_before(3), 1);
        assert_eq!(buf.dropped_before(4), 0);
        assert_eq!(buf.dropped_before(9), 0);
        assert_eq!(collect(&buf, 9, 100), (9, b"9ab".to_vec()));
    }

    #[test]
    fn small_pushes_wrap_the_ring_and_read_back_in_order() {
        let mut buf = OutputBuffer::new(10);
        let mut all = Vec::new();
        for i in 0..100u8 {
            let piece = [i, i.wrapping_mul(7), i.wrapping_add(3)];
            buf.push(&piece);
            all.extend_from_slice(&piece);
        }
        assert_eq!(buf.end(), 300);
        assert_eq!(buf.start(), 290);
        let (off, bytes) = collect(&buf, 0, 3);
        assert_eq!(off, 290);
        assert_eq!(bytes, all[290..]);
        let (off, bytes) = collect(&buf, 295, 2);
        assert_eq!(off, 295);
        assert_eq!(bytes, all[295..]);
    }

    #[test]
    fn zero_retention_keeps_nothing_but_counts() {
        let mut buf = OutputBuffer::new(0);
        buf.push(b"abc");
        assert_eq!(buf.end(), 3);
        assert_eq!(buf.start(), 3);
        assert_eq!(buf.read_from(0, 10), None);
        assert_eq!(buf.dropped_before(0), 3);
    }

    #[test]
    fn chunks_are_capped() {
        let mut buf = OutputBuffer::new(1 << 20);
        buf.push(&vec![b'x'; MAX_CHUNK * 2 + 5]);
        let (off, first) = buf.read_from(0, MAX_CHUNK).unwrap();
        assert_eq!((off, first.len()), (0, MAX_CHUNK));
        let (_, bytes) = collect(&buf, 0, MAX_CHUNK);
        assert_eq!(bytes.len(), MAX_CHUNK * 2 + 5);
    }
}
