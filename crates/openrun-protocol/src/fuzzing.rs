//! The frame decoder's fuzz target (`fuzz/fuzz_targets/frame_decode.rs`), kept in the library
//! so the corpus replay test (`tests/fuzz_corpus.rs`) runs the very same checks on stable Rust.
//!
//! [`frame_decode`] decodes arbitrary bytes as a stream of frames with every reader the crate
//! has and panics when an invariant breaks:
//!
//! - the blocking [`read_frame`], the async [`nonblocking::read_frame`] and the buffering
//!   [`nonblocking::FrameReader`] (fed in small chunks, its reads cancelled half-way at
//!   times) return the same frames and end the same way;
//! - every frame decoded is within [`MAX_HEADER_LEN`] and [`MAX_DATA_LEN`], carries exactly the
//!   data bytes the stream held, re-encodes to the same data and length prefix, and decodes
//!   back to itself from its encoding, which is canonical (encoding it again gives the same
//!   bytes);
//! - the stream ends with [`FrameError::Closed`] only at a frame boundary, with
//!   [`FrameError::TooLarge`] only where a prefix announces more than the limits, and with
//!   [`FrameError::Json`] only where the header is not a valid message.

use serde::{de::DeserializeOwned, Serialize};

use crate::frame::{read_frame, Frame, FrameError, MAX_DATA_LEN, MAX_HEADER_LEN, PREFIX_LEN};
use crate::message::{AgentMessage, RequestEnvelope};

/// Runs `check` (a fuzz target's checks) on every file of the workspace's committed corpus
/// `fuzz/corpus/<target>/`, in name order, and panics naming the files that fail; the corpus
/// replay tests of this crate and of `openrun-image` share it. The corpus is found from this
/// crate's source directory, so this works only in the workspace's checkout.
pub fn replay_corpus(target: &str, check: fn(&[u8])) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| match e {
            Ok(entry) => entry.path(),
            Err(e) => panic!("cannot list {}: {e}", dir.display()),
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "the {target} corpus is missing");
    let failed: Vec<String> = files
        .iter()
        .filter(|path| {
            let data = std::fs::read(path)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            std::panic::catch_unwind(|| check(&data)).is_err()
        })
        .map(|path| path.display().to_string())
        .collect();
    assert!(failed.is_empty(), "{target} fails on {failed:#?}");
}

/// How a decode of the whole stream ended (the error after the last frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Closed,
    TooLarge,
    Json,
    UnexpectedEof,
}

fn end_of(e: &FrameError) -> End {
    match e {
        FrameError::Closed => End::Closed,
        FrameError::TooLarge { .. } => End::TooLarge,
        FrameError::Json(_) => End::Json,
        FrameError::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => End::UnexpectedEof,
        FrameError::Io(io) => panic!("reading from memory failed with {io}"),
    }
}

/// Most frames one input is decoded into (each is re-encoded and compared several times).
const MAX_FRAMES: usize = 4096;

/// Decodes `data` as frames of requests and as frames of agent messages (its first byte
/// chooses how the chunked reader splits and interrupts the stream); panics when an
/// invariant of the decoder breaks. See the module documentation.
pub fn frame_decode(data: &[u8]) {
    let Some((&shape, stream)) = data.split_first() else {
        return;
    };
    check::<RequestEnvelope>(stream, shape);
    check::<AgentMessage>(stream, shape);
}

fn check<T>(stream: &[u8], shape: u8)
where
    T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug,
{
    let (frames, end) = decode_blocking::<T>(stream);
    #[cfg(feature = "tokio")]
    {
        let (async_frames, async_end) = nonblocking_checks::decode_async::<T>(stream);
        assert_eq!(async_end, end, "the async reader ends differently");
        assert_eq!(
            async_frames, frames,
            "the async reader decodes other frames"
        );
        let (buffered, buffered_end) = nonblocking_checks::decode_buffered::<T>(stream, shape);
        assert_eq!(buffered_end, end, "the buffering reader ends differently");
        assert_eq!(
            buffered, frames,
            "the buffering reader decodes other frames"
        );
    }
    let mut at = 0;
    for frame in &frames {
        let prefix: [u8; PREFIX_LEN] = stream[at..at + PREFIX_LEN]
            .try_into()
            .expect("a decoded frame has a whole prefix");
        let header_len = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        let data_len = u32::from_le_bytes([prefix[4], prefix[5], prefix[6], prefix[7]]) as usize;
        assert!(
            header_len <= MAX_HEADER_LEN,
            "a header above the limit was accepted"
        );
        assert!(
            data_len <= MAX_DATA_LEN,
            "data above the limit was accepted"
        );
        let body = at + PREFIX_LEN + header_len;
        assert_eq!(
            frame.data,
            stream[body..body + data_len],
            "the data part changed"
        );
        let encoded = frame.encode().expect("a decoded frame encodes");
        assert_eq!(encoded[4..8], prefix[4..8], "the data length changed");
        assert_eq!(encoded[encoded.len() - data_len..], frame.data[..]);
        let back: Frame<T> = read_frame(&mut encoded.as_slice()).expect("an encoding decodes");
        assert_eq!(&back, frame, "a frame does not survive its own encoding");
        assert_eq!(
            back.encode().expect("encodes"),
            encoded,
            "the encoding is not canonical"
        );
        at = body + data_len;
    }
    let rest = &stream[at..];
    match end {
        End::Closed => assert!(rest.is_empty(), "a stream ending mid-frame read as closed"),
        End::UnexpectedEof => {
            assert!(!rest.is_empty(), "a clean end read as a torn frame");
            if let Some(prefix) = rest.first_chunk::<PREFIX_LEN>() {
                let (h, d) = crate::frame::parse_prefix(*prefix).expect("the prefix was fine");
                assert!(
                    rest.len() < PREFIX_LEN + h + d,
                    "a whole frame read as torn"
                );
            }
        }
        End::TooLarge => {
            let prefix = rest.first_chunk::<PREFIX_LEN>().expect("a whole prefix");
            assert!(crate::frame::parse_prefix(*prefix).is_err());
        }
        End::Json => {
            let prefix = rest.first_chunk::<PREFIX_LEN>().expect("a whole prefix");
            let (h, _) = crate::frame::parse_prefix(*prefix).expect("the prefix was fine");
            assert!(serde_json::from_slice::<T>(&rest[PREFIX_LEN..PREFIX_LEN + h]).is_err());
        }
    }
}

fn decode_blocking<T: DeserializeOwned>(stream: &[u8]) -> (Vec<Frame<T>>, End) {
    let mut r = stream;
    let mut frames = Vec::new();
    loop {
        match read_frame::<T>(&mut r) {
            Ok(f) if frames.len() < MAX_FRAMES => frames.push(f),
            Ok(_) => panic!("more than {MAX_FRAMES} frames in one input"),
            Err(e) => return (frames, end_of(&e)),
        }
    }
}

#[cfg(feature = "tokio")]
mod nonblocking_checks {
    use std::future::Future;
    use std::pin::{pin, Pin};
    use std::task::{Context, Poll, Waker};

    use serde::de::DeserializeOwned;
    use tokio::io::{AsyncRead, ReadBuf};

    use super::{end_of, End, MAX_FRAMES};
    use crate::frame::nonblocking::{read_frame, FrameReader};
    use crate::frame::Frame;

    /// Polls a future over in-memory readers that never wait: it must finish at once.
    fn ready<F: Future>(fut: F) -> F::Output {
        let mut cx = Context::from_waker(Waker::noop());
        match pin!(fut).poll(&mut cx) {
            Poll::Ready(v) => v,
            Poll::Pending => panic!("a read from memory is pending"),
        }
    }

    pub(super) fn decode_async<T: DeserializeOwned>(stream: &[u8]) -> (Vec<Frame<T>>, End) {
        let mut r = stream;
        let mut frames = Vec::new();
        loop {
            match ready(read_frame::<T>(&mut r)) {
                Ok(f) if frames.len() < MAX_FRAMES => frames.push(f),
                Ok(_) => panic!("more than {MAX_FRAMES} frames in one input"),
                Err(e) => return (frames, end_of(&e)),
            }
        }
    }

    /// A stream handing out a few bytes per read, and pending (after waking its reader)
    /// every few reads, as a socket does.
    struct Chunked<'a> {
        data: &'a [u8],
        shape: u8,
        reads: usize,
    }

    impl AsyncRead for Chunked<'_> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            self.reads += 1;
            let shape = usize::from(self.shape);
            if !shape.is_multiple_of(4) && self.reads.is_multiple_of(shape % 4 + 1) {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            // 1 to 64 bytes (or everything, for shapes above 251).
            let step = if self.shape > 251 {
                usize::MAX
            } else {
                1 + (shape.wrapping_mul(self.reads) % 64)
            };
            let n = step.min(buf.remaining()).min(self.data.len());
            buf.put_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Poll::Ready(Ok(()))
        }
    }

    /// Decodes with a [`FrameReader`] whose `next` is dropped (cancelled) whenever the
    /// stream is pending, then called again: cancellation must lose nothing.
    pub(super) fn decode_buffered<T: DeserializeOwned>(
        stream: &[u8],
        shape: u8,
    ) -> (Vec<Frame<T>>, End) {
        let mut reader = FrameReader::new(Chunked {
            data: stream,
            shape,
            reads: 0,
        });
        let mut frames = Vec::new();
        let mut cx = Context::from_waker(Waker::noop());
        // Each poll either reads a byte, pends once, or returns: bounded by the input.
        let mut polls = 0usize;
        loop {
            polls += 1;
            assert!(
                polls <= 4 * stream.len() + 16,
                "the buffering reader does not progress"
            );
            let result = match pin!(reader.next::<T>()).poll(&mut cx) {
                Poll::Ready(r) => r,
                // Cancelled: the next call must pick up where this one was.
                Poll::Pending => continue,
            };
            match result {
                Ok(f) if frames.len() < MAX_FRAMES => frames.push(f),
                Ok(_) => panic!("more than {MAX_FRAMES} frames in one input"),
                Err(e) => return (frames, end_of(&e)),
            }
        }
    }
}
