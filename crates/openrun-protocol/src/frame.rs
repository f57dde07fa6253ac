//! Frame layout: `u32 LE header_len | u32 LE data_len | header (JSON) | data (raw bytes)`.
//!
//! Both lengths are checked against fixed maxima before anything is allocated, so a peer cannot
//! make the other side allocate an arbitrary amount of memory.

use serde::{de::DeserializeOwned, Serialize};

/// Largest accepted JSON header.
pub const MAX_HEADER_LEN: usize = 1 << 20;
/// Largest accepted raw payload in one frame. Bigger transfers are split by the caller.
pub const MAX_DATA_LEN: usize = 16 << 20;
/// Size of the fixed prefix holding the two lengths.
pub const PREFIX_LEN: usize = 8;

/// Errors while encoding or decoding frames.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer announced a header or payload above the limits.
    #[error("frame too large: header {header} bytes, data {data} bytes")]
    TooLarge {
        /// Announced header length.
        header: usize,
        /// Announced data length.
        data: usize,
    },
    /// The JSON header does not match the expected message type.
    #[error("malformed frame header")]
    Json(#[source] serde_json::Error),
    /// The underlying stream failed.
    #[error("agent connection failed")]
    Io(#[from] std::io::Error),
    /// The peer closed the connection at a frame boundary.
    #[error("connection closed")]
    Closed,
}

/// One decoded frame: a typed header and its raw payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame<T> {
    /// The message.
    pub header: T,
    /// Raw bytes that belong to the message (output, stdin, file contents); often empty.
    pub data: Vec<u8>,
}

impl<T> Frame<T> {
    /// A frame with no payload.
    pub fn new(header: T) -> Self {
        Self {
            header,
            data: Vec::new(),
        }
    }

    /// A frame carrying `data`.
    pub fn with_data(header: T, data: Vec<u8>) -> Self {
        Self { header, data }
    }
}

impl<T: Serialize> Frame<T> {
    /// Encodes the frame into its wire bytes.
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        let header = serde_json::to_vec(&self.header).map_err(FrameError::Json)?;
        check_lengths(header.len(), self.data.len())?;
        let mut out = Vec::with_capacity(PREFIX_LEN + header.len() + self.data.len());
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.data.len() as u32).to_le_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(&self.data);
        Ok(out)
    }
}

fn check_lengths(header: usize, data: usize) -> Result<(), FrameError> {
    if header > MAX_HEADER_LEN || data > MAX_DATA_LEN {
        return Err(FrameError::TooLarge { header, data });
    }
    Ok(())
}

/// Splits the 8-byte prefix into (header length, data length), checking the limits.
pub fn parse_prefix(prefix: [u8; PREFIX_LEN]) -> Result<(usize, usize), FrameError> {
    let header = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
    let data = u32::from_le_bytes([prefix[4], prefix[5], prefix[6], prefix[7]]) as usize;
    check_lengths(header, data)?;
    Ok((header, data))
}

fn decode_body<T: DeserializeOwned>(
    body: Vec<u8>,
    header_len: usize,
) -> Result<Frame<T>, FrameError> {
    let header = serde_json::from_slice(&body[..header_len]).map_err(FrameError::Json)?;
    let data = body[header_len..].to_vec();
    Ok(Frame { header, data })
}

/// What a stream that ended after `got` bytes of a prefix means: [`FrameError::Closed`] at a
/// frame boundary (none), a torn frame ([`std::io::ErrorKind::UnexpectedEof`]) inside one.
fn ended_in_prefix(got: usize) -> FrameError {
    if got == 0 {
        FrameError::Closed
    } else {
        std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()
    }
}

/// Reads one frame from a blocking stream.
pub fn read_frame<T: DeserializeOwned>(r: &mut impl std::io::Read) -> Result<Frame<T>, FrameError> {
    let mut prefix = [0u8; PREFIX_LEN];
    // Not `read_exact`: a stream cut inside the prefix is a torn frame, not a clean close.
    let mut got = 0;
    while got < PREFIX_LEN {
        match r.read(&mut prefix[got..]) {
            Ok(0) => return Err(ended_in_prefix(got)),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let (header_len, data_len) = parse_prefix(prefix)?;
    let mut body = vec![0u8; header_len + data_len];
    r.read_exact(&mut body)?;
    decode_body(body, header_len)
}

/// Writes one frame to a blocking stream.
pub fn write_frame<T: Serialize>(
    w: &mut impl std::io::Write,
    frame: &Frame<T>,
) -> Result<(), FrameError> {
    w.write_all(&frame.encode()?)?;
    w.flush()?;
    Ok(())
}

/// Async counterparts of [`read_frame`] and [`write_frame`].
#[cfg(feature = "tokio")]
pub mod nonblocking {
    use super::*;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    /// Reads one frame from an async stream.
    pub async fn read_frame<T: DeserializeOwned>(
        r: &mut (impl AsyncRead + Unpin),
    ) -> Result<Frame<T>, FrameError> {
        let mut prefix = [0u8; PREFIX_LEN];
        // Not `read_exact`: a stream cut inside the prefix is a torn frame, not a clean close.
        let mut got = 0;
        while got < PREFIX_LEN {
            match r.read(&mut prefix[got..]).await {
                Ok(0) => return Err(ended_in_prefix(got)),
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        let (header_len, data_len) = parse_prefix(prefix)?;
        let mut body = vec![0u8; header_len + data_len];
        r.read_exact(&mut body).await?;
        decode_body(body, header_len)
    }

    /// Reads frames from an async stream, buffering what it has read: unlike [`read_frame`],
    /// [`FrameReader::next`] is cancel-safe, so it can be one branch of a `select!` whose other
    /// branch wins halfway through a frame without losing or tearing that frame.
    pub struct FrameReader<R> {
        inner: R,
        /// Bytes read; `buf[start..]` are not yet returned as frames. Reads land in its spare
        /// capacity.
        buf: Vec<u8>,
        /// Where the first unreturned byte is: frames are taken by moving it, and the bytes
        /// before it are dropped only before a read, once per read rather than once per frame
        /// (a read full of small frames would otherwise cost quadratic copying).
        start: usize,
    }

    /// Bytes asked of the stream per read (at least half of it).
    const READ_CHUNK: usize = 64 * 1024;

    impl<R: AsyncRead + Unpin> FrameReader<R> {
        /// Wraps a stream.
        pub fn new(inner: R) -> Self {
            Self {
                inner,
                buf: Vec::new(),
                start: 0,
            }
        }

        /// The next frame; [`FrameError::Closed`] at a clean end of stream (none begun).
        pub async fn next<T: DeserializeOwned>(&mut self) -> Result<Frame<T>, FrameError> {
            loop {
                if let Some(frame) = self.take_buffered()? {
                    return Ok(frame);
                }
                // Reads go straight into `buf`'s spare capacity: nothing is zeroed or copied
                // first (a zeroed 64 KiB scratch buffer cost every new reader 16 page faults).
                self.buf.drain(..self.start);
                self.start = 0;
                if self.buf.capacity() - self.buf.len() < READ_CHUNK / 2 {
                    self.buf.reserve(READ_CHUNK);
                }
                // `read_buf` is cancel-safe: cancelled, it has read nothing, and what earlier
                // reads got is already in `buf`. With spare capacity, 0 means end of stream.
                if self.inner.read_buf(&mut self.buf).await? == 0 {
                    if self.buf.is_empty() {
                        return Err(FrameError::Closed);
                    }
                    return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
                }
            }
        }

        /// The stream back, with the bytes read from it that no frame has used yet: for a
        /// connection that stops being framed (after a `ConnectPort` answer, say), those bytes
        /// come before anything still to be read.
        pub fn into_parts(mut self) -> (R, Vec<u8>) {
            self.buf.drain(..self.start);
            (self.inner, self.buf)
        }

        /// A whole frame from the buffer, if one is there.
        fn take_buffered<T: DeserializeOwned>(&mut self) -> Result<Option<Frame<T>>, FrameError> {
            let pending = &self.buf[self.start..];
            let Some(prefix) = pending.first_chunk::<PREFIX_LEN>() else {
                return Ok(None);
            };
            let (header_len, data_len) = parse_prefix(*prefix)?;
            let end = PREFIX_LEN + header_len + data_len;
            if pending.len() < end {
                return Ok(None);
            }
            let body = pending[PREFIX_LEN..end].to_vec();
            self.start += end;
            decode_body(body, header_len).map(Some)
        }
    }

    /// Writes one frame to an async stream.
    pub async fn write_frame<T: Serialize>(
        w: &mut (impl AsyncWrite + Unpin),
        frame: &Frame<T>,
    ) -> Result<(), FrameError> {
        w.write_all(&frame.encode()?).await?;
        w.flush().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{AgentMessage, Request, RequestEnvelope};

    #[test]
    fn round_trip_with_payload() {
        let frame = Frame::with_data(
            RequestEnvelope {
                id: 7,
                request: Request::Stdin { pid: 3, eof: false },
            },
            b"hello\0world".to_vec(),
        );
        let bytes = frame.encode().unwrap();
        let back: Frame<RequestEnvelope> = read_frame(&mut bytes.as_slice()).unwrap();
        assert_eq!(back, frame);
    }

    #[test]
    fn oversized_prefix_is_rejected_before_allocating() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&(u32::MAX).to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        let err = read_frame::<AgentMessage>(&mut bytes.as_slice()).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn clean_eof_is_closed_and_truncated_body_is_io() {
        let empty: &[u8] = &[];
        assert!(matches!(
            read_frame::<AgentMessage>(&mut &*empty),
            Err(FrameError::Closed)
        ));
        let frame = Frame::new(RequestEnvelope {
            id: 1,
            request: Request::ListProcesses,
        })
        .encode()
        .unwrap();
        let cut = &frame[..frame.len() - 2];
        assert!(matches!(
            read_frame::<RequestEnvelope>(&mut &*cut),
            Err(FrameError::Io(_))
        ));
    }

    /// Found by the frame_decode fuzz target: a stream cut inside the 8-byte prefix used to
    /// read as a clean close (`Closed`), hiding a torn frame that `FrameReader` reported.
    #[tokio::test]
    async fn a_stream_cut_inside_a_prefix_is_torn_not_closed() {
        let frame = Frame::new(RequestEnvelope {
            id: 1,
            request: Request::Info,
        })
        .encode()
        .unwrap();
        for cut in 1..PREFIX_LEN {
            let torn = &frame[..cut];
            let blocking = read_frame::<RequestEnvelope>(&mut &*torn).unwrap_err();
            assert!(
                matches!(&blocking, FrameError::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof),
                "{cut} bytes: {blocking:?}"
            );
            let nonblocking = nonblocking::read_frame::<RequestEnvelope>(&mut &*torn)
                .await
                .unwrap_err();
            assert!(
                matches!(&nonblocking, FrameError::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof),
                "{cut} bytes: {nonblocking:?}"
            );
        }
    }

    #[test]
    fn garbage_header_is_a_json_error() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&3u32.to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(b"{x}");
        assert!(matches!(
            read_frame::<RequestEnvelope>(&mut bytes.as_slice()),
            Err(FrameError::Json(_))
        ));
    }

    #[tokio::test]
    async fn a_frame_reader_cancelled_mid_frame_loses_nothing() {
        use tokio::io::AsyncWriteExt;
        let (mut tx, rx) = tokio::io::duplex(1 << 16);
        let mut reader = nonblocking::FrameReader::new(rx);
        let mut bytes = Vec::new();
        for id in 0..3 {
            let frame = Frame::with_data(
                RequestEnvelope {
                    id,
                    request: Request::Stdin { pid: 3, eof: false },
                },
                vec![id as u8; 1000],
            );
            bytes.extend(frame.encode().unwrap());
        }
        // Half of the first frame, then a read that loses a race, then the rest.
        tx.write_all(&bytes[..500]).await.unwrap();
        tokio::select! {
            biased;
            _ = reader.next::<RequestEnvelope>() => panic!("half a frame was returned"),
            _ = tokio::time::sleep(std::time::Duration::from_millis(20)) => {}
        }
        tx.write_all(&bytes[500..]).await.unwrap();
        drop(tx);
        for id in 0..3 {
            let frame = reader.next::<RequestEnvelope>().await.unwrap();
            assert_eq!(frame.header.id, id);
            assert_eq!(frame.data, vec![id as u8; 1000]);
        }
        assert!(matches!(
            reader.next::<RequestEnvelope>().await,
            Err(FrameError::Closed)
        ));
    }

    /// Frames larger than one read, small ones between them, written in odd-sized pieces,
    /// come out whole and in order; a stream cut inside the last one is torn, not closed.
    #[tokio::test]
    async fn a_frame_reader_reassembles_frames_larger_than_a_read() {
        use tokio::io::AsyncWriteExt;
        let (mut tx, rx) = tokio::io::duplex(4096);
        let mut reader = nonblocking::FrameReader::new(rx);
        let sizes = [200_000usize, 3, 70_000, 0, 131_072];
        let mut bytes = Vec::new();
        for (id, size) in sizes.iter().enumerate() {
            let data: Vec<u8> = (0..*size).map(|i| (i * 7 + id) as u8).collect();
            let frame = Frame::with_data(
                RequestEnvelope {
                    id: id as u64,
                    request: Request::Stdin { pid: 3, eof: false },
                },
                data,
            );
            bytes.extend(frame.encode().unwrap());
        }
        let cut = bytes.len() - 10;
        let writer = tokio::spawn(async move {
            for piece in bytes[..cut].chunks(4099) {
                tx.write_all(piece).await.unwrap();
            }
        });
        // Every frame but the last, which the writer cut short.
        for (id, size) in sizes.iter().enumerate().take(sizes.len() - 1) {
            let frame = reader.next::<RequestEnvelope>().await.unwrap();
            assert_eq!(frame.header.id, id as u64);
            let want: Vec<u8> = (0..*size).map(|i| (i * 7 + id) as u8).collect();
            assert_eq!(frame.data, want, "frame {id}");
        }
        assert!(matches!(
            reader.next::<RequestEnvelope>().await,
            Err(FrameError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof
        ));
        writer.await.unwrap();
    }
}
