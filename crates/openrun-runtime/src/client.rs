//! Host-side client of the agent protocol, over the agent's Unix socket or the creator's
//! control stream.
//!
//! [`AgentClient::call`] sends a request and waits for its response, queueing any output or exit
//! events that arrive meanwhile; [`AgentClient::next_event`] returns them in order. For
//! interactive use, [`AgentClient::split`] gives a sender (stdin, resize, signals) and a receiver
//! that can be driven from different tasks. After a request that turns the connection into a
//! raw byte pipe (`ConnectPort`, `TakeConnection`), [`AgentClient::into_stream`] (or
//! [`AgentClient::open_pipe`]) gives the [`AgentStream`].

use std::collections::VecDeque;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};

use openrun_protocol::frame::nonblocking::{write_frame, FrameReader};
use openrun_protocol::{
    AgentError, AgentInfo, AgentMessage, Frame, FrameError, Request, RequestEnvelope, Response,
    PROTOCOL_VERSION,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// Errors talking to an agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("cannot connect to the sandbox agent at {path}: {source}")]
    Connect {
        /// Socket path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Framing or transport failure.
    #[error("agent connection failed: {0}")]
    Frame(#[from] FrameError),
    /// The agent refused the request.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The agent answered with something that does not fit the request.
    #[error("unexpected answer from the agent: {0}")]
    Unexpected(String),
}

/// A connection to one sandbox's agent.
pub struct AgentClient {
    sender: AgentSender,
    receiver: AgentReceiver,
}

/// A connection with nothing in flight, kept for a later request ([`AgentClient::into_idle`],
/// [`IdleAgent::reuse`]): `Hello` was exchanged, no answer or event is owed on it, and the
/// agent had not closed it when it was checked.
pub struct IdleAgent {
    read: OwnedReadHalf,
    write: OwnedWriteHalf,
    next_id: u64,
}

impl std::fmt::Debug for IdleAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdleAgent").finish_non_exhaustive()
    }
}

impl IdleAgent {
    /// Whether the connection is open and silent: a non-blocking peek finds nothing to read
    /// (end of stream, an error or any unexpected byte all mean it cannot be reused). One
    /// system call, no waiting.
    fn is_quiet(&self) -> bool {
        let stream: &UnixStream = self.read.as_ref();
        let mut byte = [std::mem::MaybeUninit::<u8>::uninit()];
        matches!(
            rustix::net::recv(
                stream,
                &mut byte[..],
                rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT,
            ),
            Err(rustix::io::Errno::AGAIN)
        )
    }

    /// The connection again, if it is still open and silent (see [`IdleAgent::is_quiet`]).
    /// A connection whose agent went away since it was parked is dropped here.
    pub fn reuse(self) -> Option<AgentClient> {
        if !self.is_quiet() {
            return None;
        }
        Some(AgentClient {
            sender: AgentSender {
                write: self.write,
                next_id: self.next_id,
            },
            receiver: AgentReceiver {
                read: FrameReader::new(self.read),
                queued: VecDeque::new(),
            },
        })
    }
}

/// Sending half: requests without waiting for their answers.
pub struct AgentSender {
    write: OwnedWriteHalf,
    next_id: u64,
}

/// Receiving half: every message the agent sends.
pub struct AgentReceiver {
    read: FrameReader<OwnedReadHalf>,
    queued: VecDeque<Frame<AgentMessage>>,
}

impl AgentClient {
    /// Connects to the agent socket at `path` and checks the protocol version.
    pub async fn connect(path: &Path) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| ClientError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        let mut client = Self::from_stream(stream);
        client.hello().await?;
        Ok(client)
    }

    /// Wraps an already-connected stream (e.g. the creator's control stream).
    pub fn from_stream(stream: UnixStream) -> Self {
        let (read, write) = stream.into_split();
        Self {
            sender: AgentSender { write, next_id: 1 },
            receiver: AgentReceiver {
                read: FrameReader::new(read),
                queued: VecDeque::new(),
            },
        }
    }

    /// Exchanges `Hello`, failing on a version mismatch.
    pub async fn hello(&mut self) -> Result<AgentInfo, ClientError> {
        match self
            .call(Request::Hello {
                version: PROTOCOL_VERSION,
            })
            .await?
            .header
        {
            Response::Hello(info) => Ok(info),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Sends a request and waits for its response (with its data part).
    pub async fn call(&mut self, request: Request) -> Result<Frame<Response>, ClientError> {
        self.call_with_data(request, Vec::new()).await
    }

    /// Sends a request with a data part and waits for its response.
    pub async fn call_with_data(
        &mut self,
        request: Request,
        data: Vec<u8>,
    ) -> Result<Frame<Response>, ClientError> {
        let id = self.sender.send_with_data(request, data).await?;
        self.receiver.response(id).await
    }

    /// Next output or exit event (queued ones first).
    pub async fn next_event(&mut self) -> Result<Frame<AgentMessage>, ClientError> {
        self.receiver.next().await
    }

    /// Splits into independently usable halves.
    pub fn split(self) -> (AgentSender, AgentReceiver) {
        (self.sender, self.receiver)
    }

    /// The connection the halves from [`AgentClient::split`] came from.
    pub fn reunite(sender: AgentSender, receiver: AgentReceiver) -> Self {
        Self { sender, receiver }
    }

    /// The connection as one to keep for a later request, if nothing is in flight on it: no
    /// event queued or buffered, nothing unread on the socket, and the agent has not closed it.
    /// Only the caller knows that no answer or event is still owed (every request answered,
    /// no process attached): it must call this only then.
    pub fn into_idle(self) -> Option<IdleAgent> {
        if !self.receiver.queued.is_empty() {
            return None;
        }
        let (read, buffered) = self.receiver.read.into_parts();
        if !buffered.is_empty() {
            return None;
        }
        let idle = IdleAgent {
            read,
            write: self.sender.write,
            next_id: self.sender.next_id,
        };
        idle.is_quiet().then_some(idle)
    }

    /// The connection as a raw byte stream, for after the agent answered a request that ends
    /// the framing (`ConnectPort`, `TakeConnection`): bytes the frame reader already took from
    /// the socket come first. Events still queued are dropped.
    pub fn into_stream(self) -> AgentStream {
        let (read, buffered) = self.receiver.read.into_parts();
        AgentStream {
            buffered,
            pos: 0,
            read,
            write: self.sender.write,
        }
    }

    /// Sends `request` (`ConnectPort` or `TakeConnection`) and, once the agent answered
    /// `Done`, returns the raw byte pipe the connection has become. A refusal (nothing
    /// listening, an unknown connection) is [`ClientError::Agent`].
    pub async fn open_pipe(mut self, request: Request) -> Result<AgentStream, ClientError> {
        match self.call(request).await?.header {
            Response::Done => Ok(self.into_stream()),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }
}

/// A connection to the agent that is no longer framed: raw bytes to and from a TCP connection
/// inside the sandbox. Shutting down its write side passes a half-close on to that
/// connection; the agent does the same the other way (then reads return end of stream).
pub struct AgentStream {
    /// Read by the frame reader past the last frame.
    buffered: Vec<u8>,
    /// How much of `buffered` was returned.
    pos: usize,
    read: OwnedReadHalf,
    write: OwnedWriteHalf,
}

impl std::fmt::Debug for AgentStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentStream")
            .field("buffered", &(self.buffered.len() - self.pos))
            .finish_non_exhaustive()
    }
}

impl AsyncRead for AgentStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.buffered.len() {
            let n = buf.remaining().min(this.buffered.len() - this.pos);
            buf.put_slice(&this.buffered[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.buffered.len() {
                this.buffered = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.read).poll_read(cx, buf)
    }
}

impl AsyncWrite for AgentStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.write).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.write).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.write.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.write).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.write).poll_shutdown(cx)
    }
}

impl AgentSender {
    /// Sends a request; returns its id. The response arrives on the receiver.
    pub async fn send(&mut self, request: Request) -> Result<u64, ClientError> {
        self.send_with_data(request, Vec::new()).await
    }

    /// Sends a request with a data part; returns its id.
    pub async fn send_with_data(
        &mut self,
        request: Request,
        data: Vec<u8>,
    ) -> Result<u64, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let frame = Frame::with_data(RequestEnvelope { id, request }, data);
        write_frame(&mut self.write, &frame).await?;
        Ok(id)
    }
}

impl AgentReceiver {
    /// Next message from the agent: queued events first, then the socket.
    pub async fn next(&mut self) -> Result<Frame<AgentMessage>, ClientError> {
        if let Some(frame) = self.queued.pop_front() {
            return Ok(frame);
        }
        Ok(self.read.next().await?)
    }

    /// Waits for the response to request `id`, queueing events that arrive first.
    pub async fn response(&mut self, id: u64) -> Result<Frame<Response>, ClientError> {
        loop {
            let frame: Frame<AgentMessage> = self.read.next().await?;
            match frame.header {
                AgentMessage::Response { id: got, result } if got == id => {
                    return Ok(Frame::with_data(result?, frame.data));
                }
                AgentMessage::Response { id: other, .. } => {
                    return Err(ClientError::Unexpected(format!(
                        "response to request {other} while waiting for {id}"
                    )));
                }
                _ => self.queued.push_back(frame),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The agent's `Done` and the first raw bytes arrive in one read: those bytes must come out
    /// of the stream first, not be lost in the frame reader's buffer.
    #[tokio::test]
    async fn a_pipe_yields_bytes_read_with_the_answer_first() {
        let (ours, mut agent) = UnixStream::pair().unwrap();
        let fake = tokio::spawn(async move {
            let mut reader = FrameReader::new(&mut agent);
            let request: Frame<RequestEnvelope> = reader.next().await.unwrap();
            assert_eq!(request.header.request, Request::ConnectPort { port: 80 });
            let mut bytes = Frame::new(AgentMessage::Response {
                id: request.header.id,
                result: Ok(Response::Done),
            })
            .encode()
            .unwrap();
            bytes.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
            agent.write_all(&bytes).await.unwrap();
            agent.write_all(b"rest").await.unwrap();
            let mut got = Vec::new();
            agent.read_to_end(&mut got).await.unwrap();
            got
        });
        let client = AgentClient::from_stream(ours);
        let mut pipe = client
            .open_pipe(Request::ConnectPort { port: 80 })
            .await
            .unwrap();
        let mut got = vec![0u8; 21];
        pipe.read_exact(&mut got).await.unwrap();
        assert_eq!(got, b"HTTP/1.1 200 OK\r\nrest");
        pipe.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        pipe.shutdown().await.unwrap();
        assert_eq!(fake.await.unwrap(), b"GET / HTTP/1.1\r\n\r\n");
    }

    /// A parked connection comes back only while the agent keeps it open and silent.
    #[tokio::test]
    async fn an_idle_connection_is_reused_only_while_open_and_silent() {
        let (ours, mut agent) = UnixStream::pair().unwrap();
        let client = AgentClient::from_stream(ours);
        let idle = client.into_idle().expect("a fresh connection is quiet");
        let mut client = idle.reuse().expect("still open and silent");
        // Request ids go on where they were.
        let id = client.sender.send(Request::ListProcesses).await.unwrap();
        assert_eq!(id, 1);
        let mut reader = FrameReader::new(&mut agent);
        let _: Frame<RequestEnvelope> = reader.next().await.unwrap();
        let idle = client.into_idle().unwrap();
        // A byte nobody asked for: not reusable.
        agent.write_all(b"x").await.unwrap();
        assert!(idle.reuse().is_none());

        let (ours, agent) = UnixStream::pair().unwrap();
        let idle = AgentClient::from_stream(ours).into_idle().unwrap();
        drop(agent);
        assert!(idle.reuse().is_none(), "the agent closed it");
        let (ours, agent) = UnixStream::pair().unwrap();
        drop(agent);
        assert!(AgentClient::from_stream(ours).into_idle().is_none());
    }

    #[tokio::test]
    async fn a_refused_pipe_is_the_agents_error() {
        let (ours, mut agent) = UnixStream::pair().unwrap();
        tokio::spawn(async move {
            let mut reader = FrameReader::new(&mut agent);
            let request: Frame<RequestEnvelope> = reader.next().await.unwrap();
            let bytes = Frame::new(AgentMessage::Response {
                id: request.header.id,
                result: Err(AgentError::new(
                    openrun_protocol::ErrorCode::ConnectionRefused,
                    "nothing listens on port 81",
                )),
            })
            .encode()
            .unwrap();
            agent.write_all(&bytes).await.unwrap();
        });
        let err = AgentClient::from_stream(ours)
            .open_pipe(Request::ConnectPort { port: 81 })
            .await
            .unwrap_err();
        assert!(
            matches!(err, ClientError::Agent(ref e) if e.code == openrun_protocol::ErrorCode::ConnectionRefused),
            "{err}"
        );
    }
}
