//! Bounded output buffers that address bytes by absolute stream offset, and the flow control
//! between a stream's reader and the clients that follow it.
//!
//! Every byte a process writes to a stream gets an offset (0 for the first byte ever written).
//! The buffer keeps at most `retention` of the most recent bytes; older ones are dropped and
//! `start` moves forward, so a client that reattaches with `since=<offset>` either gets exactly
//! the bytes it is missing or learns how many it lost.
//!
//! Dropping is only for output nobody is streaming (a detached background process). While a
//! client is attached, its streaming task registers a [`FollowerCursor`] per stream: the offset
//! up to which it has handed output to its connection. The stream's reader takes no more from
//! the pipe while the slowest follower is more than [`OutputBuffer::limit`] behind (see
//! [`OutputBuffer::room`]), so the pipe fills and the process blocks in `write` until the
//! client catches up: a slow attached reader slows the process down, as with `docker run`, and
//! never loses bytes. The limit is at most the retention, so the bytes a follower still has to
//! send are never among the dropped ones.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;

use tokio::sync::Notify;

/// Largest payload of one `Output` event.
pub(crate) const MAX_CHUNK: usize = 64 * 1024;

/// How far (bytes) a stream's reader may run ahead of its slowest attached follower; capped by
/// the retention. Bounds the memory a followed stream holds (on top of the connection's
/// outbound queue) while leaving enough in flight that the pipe never runs dry while the
/// follower is fast.
pub(crate) const HIGH_WATER: usize = 4 << 20;

/// The live followers of one stream: each streaming task's cursor, shared between the buffer
/// (which the reader consults) and the tasks' [`FollowerCursor`]s (which move them).
#[derive(Debug, Default)]
pub(crate) struct Followers {
    /// `(id, cursor)` of every registered follower.
    cursors: RefCell<Vec<(u64, u64)>>,
    next_id: Cell<u64>,
    /// Woken when a follower moves or goes: a reader waiting for room checks again.
    moved: Notify,
}

impl Followers {
    /// The lowest cursor of any follower.
    fn slowest(&self) -> Option<u64> {
        self.cursors.borrow().iter().map(|&(_, c)| c).min()
    }

    /// Resolves at the next move or departure of a follower. Created before checking for room
    /// (`Notify` counts a wake-up for every `Notified` created before it, polled or not), so
    /// no move between the check and the wait is missed.
    pub(crate) fn moved(&self) -> tokio::sync::futures::Notified<'_> {
        self.moved.notified()
    }

    fn set(&self, id: u64, cursor: u64) {
        if let Some(entry) = self.cursors.borrow_mut().iter_mut().find(|(i, _)| *i == id) {
            entry.1 = cursor;
        }
        self.moved.notify_waiters();
    }
}

/// One streaming task's position in one stream. Registered for as long as it lives: dropping
/// it (the stream ended, was detached, its task aborted because the connection closed)
/// unregisters it, so a follower that is gone never holds the reader back.
#[derive(Debug)]
pub(crate) struct FollowerCursor {
    followers: Rc<Followers>,
    id: u64,
}

impl FollowerCursor {
    /// Everything before `offset` has been handed to the connection.
    pub(crate) fn advance(&self, offset: u64) {
        self.followers.set(self.id, offset);
    }
}

impl Drop for FollowerCursor {
    fn drop(&mut self) {
        self.followers
            .cursors
            .borrow_mut()
            .retain(|&(id, _)| id != self.id);
        self.followers.moved.notify_waiters();
    }
}

/// The retained tail of one output stream.
#[derive(Debug)]
pub(crate) struct OutputBuffer {
    bytes: VecDeque<u8>,
    /// Offset of `bytes[0]`.
    start: u64,
    retention: usize,
    followers: Rc<Followers>,
}

impl OutputBuffer {
    /// An empty buffer keeping at most `retention` bytes.
    pub(crate) fn new(retention: usize) -> Self {
        Self {
            bytes: VecDeque::new(),
            start: 0,
            retention,
            followers: Rc::default(),
        }
    }

    /// Registers a follower that has sent everything before `since`.
    pub(crate) fn follow(&self, since: u64) -> FollowerCursor {
        let id = self.followers.next_id.get();
        self.followers.next_id.set(id.wrapping_add(1));
        self.followers.cursors.borrow_mut().push((id, since));
        FollowerCursor {
            followers: self.followers.clone(),
            id,
        }
    }

    /// The followers of this stream (for a reader to wait on).
    pub(crate) fn followers(&self) -> Rc<Followers> {
        self.followers.clone()
    }

    /// How far the reader may run ahead of the slowest follower: [`HIGH_WATER`], or the
    /// retention if that is smaller (a follower's unsent bytes must stay retained). 0 when
    /// nothing is retained: then no follower can be served anyway and none holds the reader.
    pub(crate) fn limit(&self) -> usize {
        HIGH_WATER.min(self.retention)
    }

    /// Retained bytes the slowest follower has not sent yet (0 without followers). A cursor
    /// below `start` counts from `start` (the rest is gone), one beyond `end` as caught up.
    pub(crate) fn backlog(&self) -> u64 {
        match self.followers.slowest() {
            Some(cursor) => self.end().saturating_sub(cursor.max(self.start)),
            None => 0,
        }
    }

    /// How many bytes the reader may take from the pipe now: a whole chunk without followers,
    /// else a whole chunk (at most [`OutputBuffer::limit`]) once the backlog leaves room for
    /// it below the limit, and 0 until then. So a followed stream's backlog never exceeds the
    /// limit, and reads stay chunk-sized rather than trickling in as the follower moves.
    pub(crate) fn room(&self) -> usize {
        let limit = self.limit();
        if limit == 0 {
            return MAX_CHUNK;
        }
        let chunk = MAX_CHUNK.min(limit);
        let backlog = self.backlog();
        if backlog.saturating_add(chunk as u64) <= limit as u64 {
            chunk
        } else {
            0
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

    #[test]
    fn without_followers_the_reader_always_has_room() {
        let mut buf = OutputBuffer::new(1 << 20);
        assert_eq!(buf.room(), MAX_CHUNK);
        buf.push(&vec![0; 3 << 20]);
        assert_eq!(buf.backlog(), 0);
        assert_eq!(buf.room(), MAX_CHUNK);
    }

    #[test]
    fn a_follower_behind_holds_the_reader_until_it_moves_or_goes() {
        let mut buf = OutputBuffer::new(64 << 20);
        assert_eq!(buf.limit(), HIGH_WATER);
        let fast = buf.follow(0);
        let slow = buf.follow(0);
        buf.push(&vec![0; HIGH_WATER - MAX_CHUNK]);
        // Exactly one more chunk fits under the limit.
        assert_eq!(buf.room(), MAX_CHUNK);
        buf.push(&[0]);
        assert_eq!(buf.backlog(), (HIGH_WATER - MAX_CHUNK + 1) as u64);
        assert_eq!(buf.room(), 0);
        // The slowest follower counts.
        fast.advance(buf.end());
        assert_eq!(buf.room(), 0);
        slow.advance(MAX_CHUNK as u64);
        assert_eq!(buf.backlog(), (HIGH_WATER - 2 * MAX_CHUNK + 1) as u64);
        assert_eq!(buf.room(), MAX_CHUNK);
        slow.advance(0);
        assert_eq!(buf.room(), 0);
        // A follower that goes (its connection closed) no longer counts.
        drop(slow);
        assert_eq!(buf.backlog(), 0);
        assert_eq!(buf.room(), MAX_CHUNK);
        drop(fast);
        assert!(buf.followers.cursors.borrow().is_empty());
    }

    #[test]
    fn cursors_outside_the_retained_range_are_clamped() {
        let mut buf = OutputBuffer::new(100);
        buf.push(&[1; 250]);
        assert_eq!(buf.start(), 150);
        // Behind what is retained: only what is still there is owed.
        let behind = buf.follow(0);
        assert_eq!(buf.backlog(), 100);
        assert_eq!(buf.room(), 0);
        drop(behind);
        // Ahead of the output (an offset not reached yet, or "only the exit"): caught up.
        let _ahead = buf.follow(u64::MAX);
        assert_eq!(buf.backlog(), 0);
        assert_eq!(buf.room(), 100);
    }

    /// A reader that only takes what `room` allows never drops a byte a follower still has
    /// to send, whatever the retention, however slow the follower; without followers the
    /// oldest bytes go as before.
    #[test]
    fn a_followed_stream_never_drops_unsent_bytes() {
        for retention in [1, 7, 1000, MAX_CHUNK - 1, MAX_CHUNK, 3 * MAX_CHUNK + 5] {
            let mut buf = OutputBuffer::new(retention);
            let cursor = buf.follow(0);
            let mut sent = 0u64;
            let mut produced = 0u64;
            let mut received = Vec::new();
            for round in 0..200u64 {
                // The reader fills while there is room.
                loop {
                    let room = buf.room();
                    if room == 0 {
                        break;
                    }
                    let data: Vec<u8> = (0..room as u64).map(|i| (produced + i) as u8).collect();
                    produced += room as u64;
                    buf.push(&data);
                    assert!(buf.backlog() <= retention as u64, "retention {retention}");
                }
                // The follower sends a little (sometimes nothing).
                let max = (round % 5) as usize * 13;
                if let Some((offset, bytes)) = buf.read_from(sent, max) {
                    assert_eq!(offset, sent, "retention {retention}: bytes were dropped");
                    sent += bytes.len() as u64;
                    received.extend(bytes);
                    cursor.advance(sent);
                }
            }
            assert_eq!(buf.dropped_before(sent), 0);
            assert!(received.iter().enumerate().all(|(i, b)| *b == i as u8));
            drop(cursor);
            buf.push(&vec![0; retention + 1]);
            assert!(buf.dropped_before(sent) > 0, "unfollowed output is bounded");
        }
    }

    #[test]
    fn zero_retention_never_holds_the_reader() {
        let mut buf = OutputBuffer::new(0);
        let _cursor = buf.follow(0);
        buf.push(b"abc");
        assert_eq!(buf.limit(), 0);
        assert_eq!(buf.room(), MAX_CHUNK);
    }

    #[test]
    fn moves_and_departures_wake_a_waiting_reader() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let buf = OutputBuffer::new(100);
            let followers = buf.followers();
            let cursor = buf.follow(0);
            // A wake-up between creating the future and awaiting it is kept.
            let moved = followers.moved();
            cursor.advance(5);
            tokio::time::timeout(std::time::Duration::from_secs(5), moved)
                .await
                .expect("woken by a move");
            let moved = followers.moved();
            drop(cursor);
            tokio::time::timeout(std::time::Duration::from_secs(5), moved)
                .await
                .expect("woken by a departure");
            let idle = followers.moved();
            assert!(
                tokio::time::timeout(std::time::Duration::from_millis(20), idle)
                    .await
                    .is_err(),
                "nothing happened"
            );
        });
    }
}
