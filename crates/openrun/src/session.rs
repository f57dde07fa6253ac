//! An attached exec: start a process through the agent, stream its output to our stdout and
//! stderr while it runs, forward stdin, terminal resizes and signals, and return how it ended.

use std::io::Write;

use anyhow::{Context, Result};
use openrun_protocol::{
    AgentMessage, ErrorCode, ExecRequest, ExitStatus, Pid, Request, Response, Stream,
};
use openrun_runtime::{AgentClient, AgentReceiver, AgentSender, ClientError};
use tokio::io::AsyncReadExt;
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::terminal;

/// How an attached exec ended.
pub enum Outcome {
    /// The process ran and ended.
    Exited(ExitStatus),
    /// The process could not be started (e.g. command not found).
    NotStarted {
        /// Exit code a shell would use (127 not found, 126 not executable).
        code: i32,
        /// Message for stderr.
        message: String,
    },
}

/// Request id of an exec written before the client exists ([`presend_exec`]): the client
/// numbers its own requests from 1, so the answer to this one cannot be mistaken for theirs.
const PRESENT_EXEC_ID: u64 = 0;

/// Runs `request` attached: output goes to our stdout/stderr as it arrives.
pub async fn attached_exec(
    client: AgentClient,
    request: ExecRequest,
    forward_stdin: bool,
) -> Result<Outcome> {
    let tty = request.pty.is_some();
    let (mut sender, receiver) = client.split();
    tracing::debug!("exec sent");
    let exec_id = sender
        .send(Request::Exec(for_attach(request, forward_stdin)))
        .await?;
    attached(sender, receiver, exec_id, tty, forward_stdin).await
}

/// The encoded frame of `request` run attached, for a caller that writes it on the agent's
/// stream before it has a client ([`openrun_runtime::Runtime::create_with_first_request`]);
/// [`attached_presend_exec`] then follows the process.
pub fn presend_exec(request: ExecRequest, forward_stdin: bool) -> Result<Vec<u8>> {
    let frame = openrun_protocol::Frame::new(openrun_protocol::RequestEnvelope {
        id: PRESENT_EXEC_ID,
        request: Request::Exec(for_attach(request, forward_stdin)),
    });
    Ok(frame.encode()?)
}

/// [`attached_exec`] of the exec [`presend_exec`] encoded (`tty` when it asked for a pty).
pub async fn attached_presend_exec(
    client: AgentClient,
    tty: bool,
    forward_stdin: bool,
) -> Result<Outcome> {
    let (sender, receiver) = client.split();
    attached(sender, receiver, PRESENT_EXEC_ID, tty, forward_stdin).await
}

fn for_attach(mut request: ExecRequest, forward_stdin: bool) -> ExecRequest {
    request.attach = true;
    request.stdin = forward_stdin;
    request
}

/// Follows the attached exec `exec_id`, already sent.
async fn attached(
    mut sender: AgentSender,
    mut receiver: AgentReceiver,
    exec_id: u64,
    tty: bool,
    forward_stdin: bool,
) -> Result<Outcome> {
    let pid: Pid = match receiver.response(exec_id).await {
        Ok(frame) => match frame.header {
            Response::Started { pid } => pid,
            other => anyhow::bail!("unexpected answer to exec: {other:?}"),
        },
        Err(ClientError::Agent(err)) => {
            let Some(code) = not_started_code(err.code) else {
                return Err(err).context("cannot start the command");
            };
            return Ok(Outcome::NotStarted {
                code,
                message: err.message,
            });
        }
        Err(e) => return Err(e.into()),
    };

    tracing::debug!(pid, "exec started");
    let mut local = Attachment::new(tty, forward_stdin)?;

    loop {
        tokio::select! {
            msg = receiver.next() => {
                let frame = msg?;
                match frame.header {
                    AgentMessage::Output { stream, .. } => match stream {
                        Stream::Stdout => write_out(&mut std::io::stdout(), &frame.data),
                        Stream::Stderr => write_out(&mut std::io::stderr(), &frame.data),
                    },
                    AgentMessage::Exit { pid: exited, status } if exited == pid => {
                        return Ok(Outcome::Exited(status));
                    }
                    AgentMessage::Exit { .. }
                    | AgentMessage::Incoming { .. }
                    | AgentMessage::FileEvent { .. }
                    | AgentMessage::WatchEnded { .. } => {}
                    AgentMessage::Response { result: Err(err), .. } => {
                        // Stdin to a process that already closed it is expected; others are not.
                        tracing::debug!("agent refused a request: {err}");
                    }
                    AgentMessage::Response { .. } => {}
                }
            }
            n = local.stdin.read(&mut local.buf), if local.stdin_open => {
                let n = n.unwrap_or(0);
                if n == 0 {
                    local.stdin_open = false;
                    sender.send(Request::Stdin { pid, eof: true }).await?;
                } else {
                    sender
                        .send_with_data(Request::Stdin { pid, eof: false }, local.buf[..n].to_vec())
                        .await?;
                }
            }
            _ = local.winch.recv(), if tty => {
                sender.send(Request::Resize { pid, size: terminal::size() }).await?;
            }
            signal = local.signals.recv() => {
                sender.send(Request::Signal { pid, signal, group: true }).await?;
            }
        }
    }
}

/// What an attached session forwards from our side: stdin (read into `buf` while
/// `stdin_open`), window-size changes and the caught signals; the terminal stays in raw mode
/// while it lives when `raw` and stdin is forwarded.
pub struct Attachment {
    _raw: Option<terminal::RawMode>,
    pub winch: Signal,
    pub signals: Signals,
    pub stdin: tokio::io::Stdin,
    pub stdin_open: bool,
    pub buf: Vec<u8>,
}

impl Attachment {
    /// Enters raw mode (when `raw && forward_stdin` and stdin is a terminal), then starts
    /// catching SIGWINCH and the forwarded signals.
    pub fn new(raw: bool, forward_stdin: bool) -> Result<Self> {
        let _raw = if raw && forward_stdin {
            terminal::RawMode::enter()
        } else {
            None
        };
        Ok(Self {
            _raw,
            winch: signal(SignalKind::window_change())?,
            signals: Signals::new()?,
            stdin: tokio::io::stdin(),
            stdin_open: forward_stdin,
            // Only read into when stdin is forwarded (zeroing it costs page faults).
            buf: if forward_stdin {
                vec![0u8; 32 * 1024]
            } else {
                Vec::new()
            },
        })
    }
}

/// Writes and flushes; a closed output (`| head`) is not the sandbox's error.
pub fn write_out(out: &mut impl Write, bytes: &[u8]) {
    if out.write_all(bytes).and_then(|()| out.flush()).is_err() {
        tracing::debug!("local output closed");
    }
}

/// SIGINT, SIGTERM and SIGHUP, caught to be forwarded to the command instead of ending us.
pub struct Signals {
    interrupt: Signal,
    terminate: Signal,
    hangup: Signal,
}

impl Signals {
    /// Starts catching the three.
    pub fn new() -> Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
            hangup: signal(SignalKind::hangup())?,
        })
    }

    /// The next signal's number.
    pub async fn recv(&mut self) -> i32 {
        tokio::select! {
            _ = self.interrupt.recv() => 2,
            _ = self.terminate.recv() => 15,
            _ = self.hangup.recv() => 1,
        }
    }
}

/// The exit code a shell uses for a command that could not start for this reason (127 not
/// found, 126 not executable); `None` when it is openrun's own failure.
pub fn not_started_code(code: ErrorCode) -> Option<i32> {
    match code {
        ErrorCode::CommandNotFound => Some(127),
        ErrorCode::PermissionDenied => Some(126),
        _ => None,
    }
}

/// Turns how the process ended into our exit code, saying why on stderr when it was not a
/// normal exit: 124 after `--timeout`, the signal's 128+N (137) with a message for an OOM kill.
/// `command` names the program in messages, `timeout` is the one asked for, and
/// `memory_limit` (bytes) is named in the OOM message when known.
pub fn exit_code(
    command: &[String],
    timeout: Option<std::time::Duration>,
    outcome: Outcome,
    memory_limit: Option<u64>,
) -> i32 {
    let name = command.first().map(String::as_str).unwrap_or("");
    match outcome {
        Outcome::NotStarted { code, message } => {
            eprintln!("openrun: {message}");
            code
        }
        Outcome::Exited(status) => {
            if status.timed_out {
                let limit = timeout.map(|d| format!(" after {d:?}")).unwrap_or_default();
                eprintln!("openrun: {name}: timed out{limit} and was killed");
                return 124;
            }
            if status.oom_killed {
                let limit = memory_limit
                    .map(|b| format!(" (limit {} MiB)", b >> 20))
                    .unwrap_or_default();
                eprintln!("openrun: {name}: killed: out of memory{limit}");
            }
            status.shell_code()
        }
    }
}

/// Builds a current-thread tokio runtime (created only after any sandbox was forked).
pub fn tokio_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}
