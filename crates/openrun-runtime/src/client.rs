//! Host-side client of the agent protocol, over the agent's Unix socket or the creator's
//! control stream.
//!
//! [`AgentClient::call`] sends a request and waits for its response, queueing any output or exit
//! events that arrive meanwhile; [`AgentClient::next_event`] returns them in order. For
//! interactive use, [`AgentClient::split`] gives a sender (stdin, resize, signals) and a receiver
//! that can be driven from different tasks.

use std::collections::VecDeque;
use std::path::Path;

use openrun_protocol::frame::nonblocking::{write_frame, FrameReader};
use openrun_protocol::{
    AgentError, AgentInfo, AgentMessage, Frame, FrameError, Request, RequestEnvelope, Response,
    PROTOCOL_VERSION,
};
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
