//! One client connection: frames of [`RequestEnvelope`] in, [`AgentMessage`] out.
//!
//! Requests are read and handled in order by the connection task. Everything sent back
//! (responses, output and exit events of attached processes, late stdin acknowledgements) goes
//! through one bounded queue to a writer task, so frames never interleave on the socket and a
//! client that stops reading only slows down its own connection.
//!
//! A `ConnectPort` or `TakeConnection` that succeeds ends the framing: its `Done` goes to the
//! writer task together with a request to hand the socket back, and the connection task then
//! pipes raw bytes between the socket and the TCP connection ([`crate::relay`]).

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::Arc;

use openrun_protocol::frame::nonblocking::read_frame;
use openrun_protocol::{
    AgentError, AgentMessage, ErrorCode, Frame, FrameError, Pid, Request, RequestEnvelope,
    Response, Stream, MAX_DATA_LEN, MAX_HEADER_LEN, PROTOCOL_VERSION,
};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::agent::Agent;
use crate::errors::{internal, no_such_process};
use crate::files::Files;
use crate::output::{FollowerCursor, MAX_CHUNK};

/// Frames that may wait for the socket before senders have to wait.
const OUTBOUND_QUEUE: usize = 64;
/// How long a `Shutdown` waits for its response to reach the socket.
const FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Something for the writer task.
#[derive(Debug)]
pub(crate) enum Outbound {
    /// A frame to write.
    Frame(Frame<AgentMessage>),
    /// Acknowledged once every earlier frame has been written.
    Flush(oneshot::Sender<()>),
    /// The last frame of a framed connection: written after every earlier one, then the
    /// writer stops and hands the socket's write half back (nothing queued later is written).
    Handover {
        /// The `Done` answer that ends the framing.
        last: Frame<AgentMessage>,
        /// Where the write half goes once `last` is on the socket.
        back: oneshot::Sender<OwnedWriteHalf>,
    },
}

/// The sending side of a connection's outbound queue.
pub(crate) type OutTx = mpsc::Sender<Outbound>;

/// Where and how to answer a request later (used by the stdin writer).
#[derive(Debug)]
pub(crate) struct Reply {
    id: u64,
    out: OutTx,
}

impl Reply {
    /// Sends the response; a connection that is gone is ignored.
    pub(crate) async fn send(self, result: Result<Response, AgentError>) {
        let _ = self.out.send(response(self.id, result, Vec::new())).await;
    }
}

fn response(id: u64, result: Result<Response, AgentError>, data: Vec<u8>) -> Outbound {
    Outbound::Frame(Frame::with_data(
        AgentMessage::Response { id, result },
        data,
    ))
}

enum Flow {
    Continue,
    Stop,
    /// Answer `Done` to this request id, then pipe raw bytes to this TCP connection.
    Pipe(u64, TcpStream),
}

struct Connection {
    agent: Rc<Agent>,
    out: OutTx,
    /// Streaming tasks of attached processes.
    pumps: HashMap<Pid, JoinHandle<()>>,
    /// The egress listener this connection started (`RelayEgress`), stopped when it ends.
    egress: Option<u64>,
    /// Directory watches this connection started (`Watch`), stopped when it ends. Shared
    /// with the writer task, which drops a watch once its `WatchEnded` is written (a watch
    /// that ended by itself no longer counts toward the connection's cap).
    watches: Rc<RefCell<HashSet<u64>>>,
}

/// Serves one connection until the client closes it, sends something unreadable, or asks the
/// agent to shut down. Processes started on it keep running afterwards.
pub(crate) async fn serve_connection(agent: Rc<Agent>, stream: UnixStream) {
    let (mut reader, writer) = stream.into_split();
    let (out, rx) = mpsc::channel(OUTBOUND_QUEUE);
    let watches = Rc::new(RefCell::new(HashSet::new()));
    tokio::task::spawn_local(write_loop(writer, rx, watches.clone()));
    let mut conn = Connection {
        agent,
        out,
        pumps: HashMap::new(),
        egress: None,
        watches,
    };
    let mut piped = None;
    loop {
        let frame = match read_frame::<serde_json::Value>(&mut reader).await {
            Ok(frame) => frame,
            Err(FrameError::Closed) => break,
            Err(e) => {
                tracing::debug!(error = %e, "closing connection after an unreadable frame");
                break;
            }
        };
        let id = frame.header.get("id").and_then(serde_json::Value::as_u64);
        let envelope = match serde_json::from_value::<RequestEnvelope>(frame.header) {
            Ok(envelope) => envelope,
            Err(e) => match id {
                Some(id) => {
                    let err = AgentError::new(
                        ErrorCode::InvalidArgument,
                        format!("malformed request: {e}"),
                    );
                    conn.send(response(id, Err(err), Vec::new())).await;
                    continue;
                }
                None => {
                    tracing::debug!(error = %e, "closing connection after a request without an id");
                    break;
                }
            },
        };
        match conn.handle(envelope.id, envelope.request, frame.data).await {
            Flow::Continue => {}
            Flow::Stop => break,
            Flow::Pipe(id, tcp) => {
                piped = Some((id, tcp));
                break;
            }
        }
    }
    for (_, pump) in conn.pumps.drain() {
        pump.abort();
    }
    if let Some(generation) = conn.egress.take() {
        conn.agent.relay.stop(generation);
    }
    let watches: Vec<u64> = conn.watches.borrow_mut().drain().collect();
    for watch in watches {
        conn.agent.watches.stop(watch);
    }
    let Some((id, tcp)) = piped else {
        return;
    };
    let (back, writer) = oneshot::channel();
    let last = Frame::new(AgentMessage::Response {
        id,
        result: Ok(Response::Done),
    });
    conn.send(Outbound::Handover { last, back }).await;
    drop(conn);
    // Requests are read one frame at a time (never beyond), so whatever the client sent after
    // this request is still in the socket: the pipe's first bytes.
    match writer.await {
        Ok(writer) => crate::relay::pipe(SplitUnix(reader, writer), tcp).await,
        Err(_) => tracing::debug!("connection closed before the relay could start"),
    }
}

/// The two halves of a connection's socket as one stream, for the relay pipe.
struct SplitUnix(tokio::net::unix::OwnedReadHalf, OwnedWriteHalf);

impl tokio::io::AsyncRead for SplitUnix {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for SplitUnix {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.1).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.1).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.1).poll_shutdown(cx)
    }
}

async fn write_loop(
    mut writer: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Outbound>,
    watches: Rc<RefCell<HashSet<u64>>>,
) {
    while let Some(item) = rx.recv().await {
        match item {
            Outbound::Frame(frame) => {
                if let AgentMessage::WatchEnded { watch, .. } = &frame.header {
                    watches.borrow_mut().remove(watch);
                }
                let Some(bytes) = encode_for_wire(&frame) else {
                    continue;
                };
                if let Err(e) = writer.write_all(&bytes).await {
                    tracing::debug!(error = %e, "connection write failed");
                    break;
                }
            }
            Outbound::Flush(ack) => {
                let _ = ack.send(());
            }
            Outbound::Handover { last, back } => {
                if let Some(bytes) = encode_for_wire(&last) {
                    if let Err(e) = writer.write_all(&bytes).await {
                        tracing::debug!(error = %e, "connection write failed");
                        return;
                    }
                }
                let _ = back.send(writer);
                return;
            }
        }
    }
}

/// The wire bytes of `frame`. A response that cannot be encoded (above the frame limits) is
/// replaced by an error response to the same request, so no request is ever left unanswered;
/// an event that cannot be encoded (which the agent never builds) is logged and dropped.
fn encode_for_wire(frame: &Frame<AgentMessage>) -> Option<Vec<u8>> {
    let err = match frame.encode() {
        Ok(bytes) => return Some(bytes),
        Err(e) => e,
    };
    let AgentMessage::Response { id, result } = &frame.header else {
        tracing::warn!(error = %err, "could not encode an event");
        return None;
    };
    tracing::warn!(id, error = %err, "could not encode a response; answering with an error");
    let replacement = Frame::new(AgentMessage::Response {
        id: *id,
        result: Err(unsendable(result, &err)),
    });
    match replacement.encode() {
        Ok(bytes) => Some(bytes),
        Err(e) => {
            tracing::warn!(id, error = %e, "could not encode an error response");
            None
        }
    }
}

/// The error that replaces a response that could not be encoded.
fn unsendable(result: &Result<Response, AgentError>, err: &FrameError) -> AgentError {
    let FrameError::TooLarge { header, data } = *err else {
        return internal("could not encode the response", err);
    };
    let message = match result {
        Ok(Response::Entries { entries }) => format!(
            "directory has too many entries to list at once ({}); list its subdirectories or \
             run a command such as ls instead",
            entries.len()
        ),
        Ok(Response::Processes { processes }) => format!(
            "the process table is too large to send at once ({} processes); release exited \
             processes or ask for one with ProcessStatus",
            processes.len()
        ),
        _ => format!(
            "the response is too large to send ({header} bytes of header and {data} bytes of \
             data; the limits are {MAX_HEADER_LEN} and {MAX_DATA_LEN})"
        ),
    };
    AgentError::new(ErrorCode::TooLarge, message)
}

impl Connection {
    async fn send(&self, item: Outbound) {
        let _ = self.out.send(item).await;
    }

    async fn respond(&self, id: u64, result: Result<(Response, Vec<u8>), AgentError>) {
        let item = match result {
            Ok((resp, data)) => response(id, Ok(resp), data),
            Err(e) => response(id, Err(e), Vec::new()),
        };
        self.send(item).await;
    }

    /// Runs a file operation on the blocking pool so a slow disk does not stall other
    /// connections.
    async fn blocking<F>(&self, op: F) -> Result<(Response, Vec<u8>), AgentError>
    where
        F: FnOnce(&Files) -> Result<(Response, Vec<u8>), AgentError> + Send + 'static,
    {
        let files: Arc<Files> = self.agent.files.clone();
        match tokio::task::spawn_blocking(move || op(&files)).await {
            Ok(result) => result,
            Err(e) => Err(internal("file operation failed", e)),
        }
    }

    /// Registers a follower of `pid`'s output that has everything before `since` (stdout,
    /// stderr), before the answer that precedes its stream is queued: from then on the
    /// readers keep what it has not sent yet.
    fn cursors(&self, pid: Pid, since: [u64; 2]) -> Option<[FollowerCursor; 2]> {
        self.agent.with_process(pid, |p| {
            [p.stdout.follow(since[0]), p.stderr.follow(since[1])]
        })
    }

    /// Streams `pid`'s output to this connection (for request `request`, whose id a final
    /// error answer names if the process vanishes), from `since` (where `cursors` are).
    fn start_pump(
        &mut self,
        request: u64,
        pid: Pid,
        since: [u64; 2],
        follow: bool,
        cursors: Option<[FollowerCursor; 2]>,
    ) {
        if let Some(old) = self.pumps.remove(&pid) {
            old.abort();
        }
        // A pump ends with its process's exit: forget the ended ones, so a connection that
        // serves exec after exec (the server keeps its connections) does not keep one entry
        // per process it ever followed.
        self.pumps.retain(|_, pump| !pump.is_finished());
        let Some(changed) = self.agent.subscribe(pid) else {
            return;
        };
        let follower = Follower {
            agent: self.agent.clone(),
            pid,
            changed: Some(changed),
            cursors,
        };
        let task =
            tokio::task::spawn_local(pump(follower, request, since, follow, self.out.clone()));
        self.pumps.insert(pid, task);
    }

    async fn handle(&mut self, id: u64, request: Request, data: Vec<u8>) -> Flow {
        let done = |r: Result<(), AgentError>| r.map(|()| (Response::Done, Vec::new()));
        let result = match request {
            Request::Hello { version } => {
                if version == PROTOCOL_VERSION {
                    Ok((Response::Hello(self.agent.info()), Vec::new()))
                } else {
                    Err(AgentError::new(
                        ErrorCode::VersionMismatch,
                        format!(
                            "protocol version mismatch: agent speaks {PROTOCOL_VERSION}, client speaks {version}"
                        ),
                    ))
                }
            }
            Request::Exec(req) => match self.agent.exec(&req, data) {
                Ok(pid) => {
                    let cursors = req.attach.then(|| self.cursors(pid, [0, 0]));
                    self.respond(id, Ok((Response::Started { pid }, Vec::new())))
                        .await;
                    if let Some(cursors) = cursors {
                        self.start_pump(id, pid, [0, 0], true, cursors);
                    }
                    return Flow::Continue;
                }
                Err(e) => Err(e),
            },
            Request::Attach(req) => match self.agent.attach_info(&req) {
                Ok((process, dropped)) => {
                    let since = [req.stdout_since, req.stderr_since];
                    let cursors = self.cursors(req.pid, since);
                    self.respond(
                        id,
                        Ok((Response::Attached { process, dropped }, Vec::new())),
                    )
                    .await;
                    self.start_pump(id, req.pid, since, req.follow, cursors);
                    return Flow::Continue;
                }
                Err(e) => Err(e),
            },
            Request::Detach { pid } => match self.pumps.remove(&pid) {
                Some(pump) => {
                    pump.abort();
                    Ok((Response::Done, Vec::new()))
                }
                None => done(self.agent.process_info(pid).map(|_| ())),
            },
            Request::Signal { pid, signal, group } => done(self.agent.signal(pid, signal, group)),
            Request::Stdin { pid, eof } => {
                let reply = Reply {
                    id,
                    out: self.out.clone(),
                };
                match self.agent.queue_stdin(pid, data, eof, reply) {
                    // The stdin writer answers once the bytes are written.
                    Ok(()) => return Flow::Continue,
                    Err(e) => Err(e),
                }
            }
            Request::Resize { pid, size } => done(self.agent.resize(pid, size)),
            Request::ListProcesses => Ok((
                Response::Processes {
                    processes: self.agent.list(),
                },
                Vec::new(),
            )),
            Request::ProcessStatus { pid } => self
                .agent
                .process_info(pid)
                .map(|info| (Response::Process(info), Vec::new())),
            Request::Release { pid } => done(self.agent.release(pid)),
            Request::ReadFile {
                path,
                offset,
                limit,
            } => {
                self.blocking(move |f| {
                    f.read_file(&path, offset, limit).map(|r| {
                        (
                            Response::FileData {
                                size: r.size,
                                offset,
                            },
                            r.data,
                        )
                    })
                })
                .await
            }
            Request::WriteFile {
                path,
                mode,
                parents,
                append,
            } => {
                self.blocking(move |f| {
                    f.write_file(&path, &data, mode, parents, append)
                        .map(|()| (Response::Done, Vec::new()))
                })
                .await
            }
            Request::ListDir { path } => {
                self.blocking(move |f| {
                    f.list_dir(&path)
                        .map(|entries| (Response::Entries { entries }, Vec::new()))
                })
                .await
            }
            Request::Stat { path } => {
                self.blocking(move |f| f.stat(&path).map(|st| (Response::Stat(st), Vec::new())))
                    .await
            }
            Request::Mkdir {
                path,
                parents,
                mode,
            } => {
                self.blocking(move |f| {
                    f.mkdir(&path, parents, mode)
                        .map(|()| (Response::Done, Vec::new()))
                })
                .await
            }
            Request::Remove { path, recursive } => {
                self.blocking(move |f| {
                    f.remove(&path, recursive)
                        .map(|()| (Response::Done, Vec::new()))
                })
                .await
            }
            Request::Rename { from, to } => {
                self.blocking(move |f| f.rename(&from, &to).map(|()| (Response::Done, Vec::new())))
                    .await
            }
            Request::Symlink {
                target,
                path,
                parents,
            } => {
                self.blocking(move |f| {
                    f.symlink(&target, &path, parents)
                        .map(|()| (Response::Done, Vec::new()))
                })
                .await
            }
            Request::Info => Ok((Response::Info(self.agent.info()), Vec::new())),
            Request::SetLifetime { remaining_ms } => {
                self.agent
                    .set_lifetime(remaining_ms.map(std::time::Duration::from_millis));
                Ok((Response::Done, Vec::new()))
            }
            Request::ConnectPort { port } => {
                match crate::relay::connect_port(&self.agent, port).await {
                    Ok(tcp) => return Flow::Pipe(id, tcp),
                    Err(e) => Err(e),
                }
            }
            Request::TakeConnection { conn } => match self.agent.relay.take(conn) {
                Ok(tcp) => return Flow::Pipe(id, tcp),
                Err(e) => Err(e),
            },
            Request::RelayEgress { port } => {
                match crate::relay::listen(&self.agent, port, self.out.clone()).await {
                    Ok(started) => {
                        if let Some(previous) = self.egress.replace(started.generation) {
                            self.agent.relay.stop(previous);
                        }
                        self.respond(id, Ok((Response::Done, Vec::new()))).await;
                        // Announcements only after the answer.
                        started.start();
                        return Flow::Continue;
                    }
                    Err(e) => Err(e),
                }
            }
            Request::Watch { path, recursive } => {
                if self.watches.borrow().len() >= crate::watch::MAX_WATCHES_PER_CONNECTION {
                    Err(AgentError::new(
                        ErrorCode::TooLarge,
                        format!(
                            "this connection already has {} directory watches; stop some first",
                            crate::watch::MAX_WATCHES_PER_CONNECTION
                        ),
                    ))
                } else {
                    match self.agent.watches.watch(path, recursive).await {
                        Ok(started) => {
                            let watch = started.id;
                            self.watches.borrow_mut().insert(watch);
                            self.respond(id, Ok((Response::Watching { watch }, Vec::new())))
                                .await;
                            // Events only after the answer.
                            started.start(self.out.clone());
                            return Flow::Continue;
                        }
                        Err(e) => Err(e),
                    }
                }
            }
            Request::Unwatch { watch } => {
                let ours = self.watches.borrow_mut().remove(&watch);
                if ours {
                    done(self.agent.watches.unwatch(watch))
                } else {
                    Err(AgentError::new(
                        ErrorCode::NotFound,
                        format!("no such watch on this connection: {watch}"),
                    ))
                }
            }
            Request::Shutdown => {
                tracing::info!("shutdown requested by a client");
                self.agent.kill_all();
                self.respond(id, Ok((Response::Done, Vec::new()))).await;
                let (ack, flushed) = oneshot::channel();
                self.send(Outbound::Flush(ack)).await;
                let _ = tokio::time::timeout(FLUSH_TIMEOUT, flushed).await;
                self.agent.request_shutdown();
                return Flow::Stop;
            }
        };
        self.respond(id, result).await;
        Flow::Continue
    }
}

/// What a streaming task does next.
#[derive(Debug)]
pub(crate) enum Step {
    /// Send these bytes of this stream, starting at this offset.
    Data(Stream, u64, Vec<u8>),
    /// Everything was sent and the process has exited.
    Exit(openrun_protocol::ExitStatus),
    /// Nothing new yet.
    Wait,
    /// The process was released.
    Gone,
}

/// A streaming task's hold on a process: its subscription to the process's changes, and its
/// cursors in the process's stdout and stderr, which hold the readers back while it is behind
/// (see [`crate::output`]). When it goes (the task ended or was aborted: the stream ended, was
/// detached or replaced, or the connection closed), its cursors stop counting and a process
/// released meanwhile is removed if this was its last follower.
struct Follower {
    agent: Rc<Agent>,
    pid: Pid,
    /// `Some` until dropped (it must be gone before the follower count is checked).
    changed: Option<watch::Receiver<u64>>,
    /// Stdout's and stderr's cursor (`None` if the entry was gone when the stream started).
    cursors: Option<[FollowerCursor; 2]>,
}

impl Follower {
    /// Everything of `stream` before `offset` is in the connection's outbound queue.
    fn sent(&self, stream: Stream, offset: u64) {
        if let Some(cursors) = &self.cursors {
            cursors[usize::from(stream == Stream::Stderr)].advance(offset);
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.changed = None;
        self.cursors = None;
        self.agent.forget_if_released(self.pid);
    }
}

/// Streams a process's output from `cursor` (stdout, stderr offsets) to a connection, then
/// its exit. A chunk counts as sent (and lets the reader take more from the pipe) once it is
/// in the connection's bounded outbound queue: a client that reads slowly fills the queue,
/// this task waits on it, and the process waits on its pipe. (Counting at the socket write
/// instead would only shave the queue, at most [`OUTBOUND_QUEUE`] chunks, off the memory a
/// slow stream holds.) Without `follow` it stops once the buffered output is sent. A process that
/// vanished (its entry replaced or removed) ends the stream with an error answer to
/// `request`, the `Exec` or `Attach` that started it, so that the client does not wait for
/// an exit that will never come.
async fn pump(
    mut follower: Follower,
    request: u64,
    mut cursor: [u64; 2],
    follow: bool,
    out: OutTx,
) {
    let pid = follower.pid;
    let agent = follower.agent.clone();
    let mut prefer_stderr = false;
    loop {
        let Some(changed) = follower.changed.as_mut() else {
            return;
        };
        changed.borrow_and_update();
        let step = agent.next_step(pid, cursor, prefer_stderr, MAX_CHUNK);
        match step {
            Step::Data(stream, offset, bytes) => {
                let index = usize::from(stream == Stream::Stderr);
                cursor[index] = offset + bytes.len() as u64;
                prefer_stderr = stream == Stream::Stdout;
                let frame = Frame::with_data(
                    AgentMessage::Output {
                        pid,
                        stream,
                        offset,
                    },
                    bytes,
                );
                if out.send(Outbound::Frame(frame)).await.is_err() {
                    return;
                }
                follower.sent(stream, cursor[index]);
            }
            Step::Exit(status) => {
                let _ = out
                    .send(Outbound::Frame(Frame::new(AgentMessage::Exit {
                        pid,
                        status,
                    })))
                    .await;
                return;
            }
            Step::Wait => {
                if !follow {
                    return;
                }
                if changed.changed().await.is_err() {
                    // The entry was dropped (its sender with it).
                    vanished(&out, request, pid).await;
                    return;
                }
            }
            Step::Gone => {
                vanished(&out, request, pid).await;
                return;
            }
        }
    }
}

/// The last word of a stream whose process vanished: `no_such_process` for its request.
async fn vanished(out: &OutTx, request: u64, pid: Pid) {
    let mut err = no_such_process(pid);
    err.message = format!("process {pid} is gone: its output and exit are no longer known");
    let _ = out.send(response(request, Err(err), Vec::new())).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use openrun_protocol::{FileKind, FileStat};

    fn decode(bytes: &[u8]) -> (u64, Result<Response, AgentError>) {
        let frame: Frame<AgentMessage> =
            openrun_protocol::frame::read_frame(&mut &bytes[..]).unwrap();
        match frame.header {
            AgentMessage::Response { id, result } => (id, result),
            other => panic!("not a response: {other:?}"),
        }
    }

    #[test]
    fn small_frames_encode_unchanged() {
        let frame = Frame::new(AgentMessage::Response {
            id: 3,
            result: Ok(Response::Done),
        });
        assert_eq!(encode_for_wire(&frame).unwrap(), frame.encode().unwrap());
    }

    #[test]
    fn an_oversized_listing_becomes_a_too_large_error() {
        let entry = |i: usize| FileStat {
            name: format!("{i:0200}"),
            kind: FileKind::File,
            size: 0,
            mode: 0o644,
            uid: 0,
            gid: 0,
            modified_ms: 0,
            symlink_target: None,
        };
        let entries: Vec<FileStat> = (0..6000).map(entry).collect();
        let frame = Frame::new(AgentMessage::Response {
            id: 42,
            result: Ok(Response::Entries { entries }),
        });
        assert!(frame.encode().is_err(), "the listing must exceed the limit");
        let (id, result) = decode(&encode_for_wire(&frame).expect("an answer"));
        assert_eq!(id, 42);
        let err = result.unwrap_err();
        assert_eq!(err.code, ErrorCode::TooLarge);
        assert!(
            err.message
                .starts_with("directory has too many entries to list at once (6000)"),
            "{}",
            err.message
        );
    }

    #[test]
    fn any_oversized_response_is_answered() {
        let frame = Frame::with_data(
            AgentMessage::Response {
                id: 7,
                result: Ok(Response::FileData { size: 0, offset: 0 }),
            },
            vec![0u8; MAX_DATA_LEN + 1],
        );
        let (id, result) = decode(&encode_for_wire(&frame).expect("an answer"));
        assert_eq!(id, 7);
        let err = result.unwrap_err();
        assert_eq!(err.code, ErrorCode::TooLarge);
        assert!(err.message.contains("too large to send"), "{}", err.message);
    }
}
