//! A minimal blocking HTTP/1.1 client for one keep-alive connection to `openrun serve`.
//!
//! Only what the benchmark needs: one request written with a single `write`, a response with
//! `Content-Length`, `Transfer-Encoding: chunked` or no body (204), and the body handed to the
//! caller piece by piece as it arrives, so an exec stream can be timed to its exit line and its
//! output counted without buffering it.

use std::io::{self, BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

/// How a response's body is framed.
enum Framing {
    /// `Content-Length: n`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// No body (204, 304, or a HEAD answer).
    Empty,
}

/// One keep-alive connection with the API key in every request.
pub struct Conn {
    reader: BufReader<TcpStream>,
    host: String,
    auth: String,
    request: Vec<u8>,
}

/// A whole response: status and body.
pub struct Response {
    /// The HTTP status code.
    pub status: u16,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

fn bad(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

impl Conn {
    /// Connects to `url` (`http://host:port`, no path) with `key` as the bearer token.
    pub fn connect(url: &str, key: &str) -> io::Result<Conn> {
        let host = url
            .strip_prefix("http://")
            .ok_or_else(|| bad(format!("{url}: only http:// URLs")))?
            .trim_end_matches('/')
            .to_string();
        let stream = TcpStream::connect(&host)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(600)))?;
        Ok(Conn {
            reader: BufReader::with_capacity(1 << 20, stream),
            host,
            auth: format!("Bearer {key}"),
            request: Vec::with_capacity(1024),
        })
    }

    /// Sends one request: head and body in a single write.
    fn send(&mut self, method: &str, path: &str, body: &[u8]) -> io::Result<()> {
        self.request.clear();
        write!(
            self.request,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: {}\r\n",
            self.host, self.auth
        )?;
        if !body.is_empty() || method == "POST" {
            write!(
                self.request,
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            )?;
        }
        self.request.extend_from_slice(b"\r\n");
        self.request.extend_from_slice(body);
        self.reader.get_mut().write_all(&self.request)
    }

    /// Reads the status line and headers.
    fn read_head(&mut self, method: &str) -> io::Result<(u16, Framing)> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(bad("connection closed before the answer"));
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(format!("bad status line {line:?}")))?;
        let mut framing = Framing::Empty;
        loop {
            line.clear();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(bad("connection closed in the headers"));
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            let Some((name, value)) = header.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                let n = value
                    .parse()
                    .map_err(|_| bad(format!("bad Content-Length {value:?}")))?;
                framing = Framing::Length(n);
            } else if name.eq_ignore_ascii_case("transfer-encoding")
                && value.eq_ignore_ascii_case("chunked")
            {
                framing = Framing::Chunked;
            }
        }
        if method == "HEAD" || status == 204 || status == 304 {
            framing = Framing::Empty;
        }
        Ok((status, framing))
    }

    /// Hands up to `n` body bytes to `sink` as they arrive.
    fn read_exact_to(&mut self, mut n: u64, sink: &mut dyn FnMut(&[u8])) -> io::Result<()> {
        while n > 0 {
            let buf = self.reader.fill_buf()?;
            if buf.is_empty() {
                return Err(bad("connection closed in the body"));
            }
            let take = buf.len().min(usize::try_from(n).unwrap_or(usize::MAX));
            sink(&buf[..take]);
            self.reader.consume(take);
            n -= take as u64;
        }
        Ok(())
    }

    /// Reads the body, handing each piece to `sink`.
    fn read_body(&mut self, framing: Framing, sink: &mut dyn FnMut(&[u8])) -> io::Result<()> {
        match framing {
            Framing::Empty => Ok(()),
            Framing::Length(n) => self.read_exact_to(n, sink),
            Framing::Chunked => {
                let mut line = String::new();
                loop {
                    line.clear();
                    self.reader.read_line(&mut line)?;
                    let size = line.trim_end().split(';').next().unwrap_or("");
                    let size = u64::from_str_radix(size.trim(), 16)
                        .map_err(|_| bad(format!("bad chunk size {line:?}")))?;
                    if size == 0 {
                        // Trailers, then the empty line.
                        loop {
                            line.clear();
                            if self.reader.read_line(&mut line)? == 0 || line.trim_end().is_empty()
                            {
                                return Ok(());
                            }
                        }
                    }
                    self.read_exact_to(size, sink)?;
                    line.clear();
                    self.reader.read_line(&mut line)?;
                }
            }
        }
    }

    /// One request; the body is handed to `sink` as it arrives. Returns the status.
    pub fn stream(
        &mut self,
        method: &str,
        path: &str,
        body: &[u8],
        sink: &mut dyn FnMut(&[u8]),
    ) -> io::Result<u16> {
        self.send(method, path, body)?;
        let (status, framing) = self.read_head(method)?;
        self.read_body(framing, sink)?;
        Ok(status)
    }

    /// One request, the whole body read.
    pub fn call(&mut self, method: &str, path: &str, body: &[u8]) -> io::Result<Response> {
        let mut out = Vec::new();
        let status = self.stream(method, path, body, &mut |piece| {
            out.extend_from_slice(piece)
        })?;
        Ok(Response { status, body: out })
    }
}

/// Splits a byte stream into `\n`-terminated lines across pieces.
#[derive(Default)]
pub struct Lines {
    pending: Vec<u8>,
}

impl Lines {
    /// Feeds one piece; calls `line` for every complete line (without the `\n`).
    pub fn feed(&mut self, mut piece: &[u8], line: &mut dyn FnMut(&[u8])) {
        while let Some(end) = piece.iter().position(|&b| b == b'\n') {
            if self.pending.is_empty() {
                line(&piece[..end]);
            } else {
                self.pending.extend_from_slice(&piece[..end]);
                line(&self.pending);
                self.pending.clear();
            }
            piece = &piece[end + 1..];
        }
        self.pending.extend_from_slice(piece);
    }

    /// What is left after the last `\n`.
    pub fn rest(&self) -> &[u8] {
        &self.pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_across_pieces() {
        let mut lines = Lines::default();
        let mut seen = Vec::new();
        for piece in [&b"ab"[..], b"c\nd", b"\n\nef\ng"] {
            lines.feed(piece, &mut |l| {
                seen.push(String::from_utf8_lossy(l).into_owned())
            });
        }
        assert_eq!(seen, ["abc", "d", "", "ef"]);
        assert_eq!(lines.rest(), b"g");
    }

    #[test]
    fn chunked_and_length_bodies() {
        use std::io::Read;
        use std::net::TcpListener;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).unwrap();
            s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab\n\r\n2;x=y\r\nc\n\r\n0\r\n\r\n")
                .unwrap();
            let _ = s.read(&mut buf).unwrap();
            s.write_all(b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n{}")
                .unwrap();
            let _ = s.read(&mut buf).unwrap();
            s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").unwrap();
        });
        let mut conn = Conn::connect(&format!("http://{addr}"), "k").unwrap();
        let r = conn.call("POST", "/x", b"{}").unwrap();
        assert_eq!((r.status, &r.body[..]), (200, &b"ab\nc\n"[..]));
        let r = conn.call("POST", "/y", b"{}").unwrap();
        assert_eq!((r.status, &r.body[..]), (201, &b"{}"[..]));
        let r = conn.call("DELETE", "/z", b"").unwrap();
        assert_eq!((r.status, r.body.len()), (204, 0));
        server.join().unwrap();
    }
}
