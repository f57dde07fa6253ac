//! Feeding a process's stdin (a pipe, or the terminal master for PTY processes).
//!
//! Each process with a stdin has one writer task and an ordered queue. `Stdin` requests are
//! queued without waiting, so a process that does not read cannot stall its client's
//! connection; the response is sent once the bytes are written (or it is clear they never
//! will be). The queued amount is bounded.

use std::cell::Cell;
use std::rc::Rc;

use openrun_protocol::{AgentError, ErrorCode, Pid, Response};
use rustix::fd::OwnedFd;
use rustix::io::Errno;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{mpsc, watch};

use crate::connection::Reply;
use crate::process::Phase;

/// Most bytes that may wait in one process's stdin queue.
pub(crate) const MAX_PENDING_STDIN: usize = 64 << 20;
/// End-of-file for a terminal in canonical mode (^D): a terminal master cannot be closed
/// without hanging up the session, so `eof` on a PTY sends this instead.
const TERMINAL_EOF: u8 = 0x04;

/// One queued write.
#[derive(Debug)]
pub(crate) struct StdinItem {
    data: Vec<u8>,
    eof: bool,
    reply: Option<Reply>,
}

/// The agent's side of a process's stdin queue.
#[derive(Debug)]
pub(crate) struct StdinHandle {
    tx: mpsc::UnboundedSender<StdinItem>,
    pending: Rc<Cell<usize>>,
    eof_queued: bool,
}

impl StdinHandle {
    /// Queues `data` (and end-of-file when `eof`); `reply` is answered once it is written.
    /// On refusal nothing is queued and the caller answers with the error.
    pub(crate) fn queue(
        &mut self,
        pid: Pid,
        data: Vec<u8>,
        eof: bool,
        reply: Option<Reply>,
    ) -> Result<(), AgentError> {
        if self.eof_queued {
            return Err(closed(pid));
        }
        let pending = self.pending.get();
        if pending + data.len() > MAX_PENDING_STDIN {
            return Err(AgentError::new(
                ErrorCode::TooLarge,
                format!(
                    "stdin of process {pid} already has {pending} bytes waiting; the process is not reading"
                ),
            ));
        }
        let len = data.len();
        match self.tx.send(StdinItem { data, eof, reply }) {
            Ok(()) => {
                self.pending.set(pending + len);
                self.eof_queued = eof;
                Ok(())
            }
            Err(mpsc::error::SendError(_)) => Err(closed(pid)),
        }
    }
}

fn closed(pid: Pid) -> AgentError {
    AgentError::new(
        ErrorCode::NotSupported,
        format!("stdin of process {pid} is closed"),
    )
}

fn exited(pid: Pid) -> AgentError {
    AgentError::new(
        ErrorCode::NotSupported,
        format!("process {pid} has exited; its stdin is closed"),
    )
}

/// Starts the writer task for `fd` and returns the handle that feeds it.
pub(crate) fn start(
    pid: Pid,
    fd: Rc<AsyncFd<OwnedFd>>,
    is_pty: bool,
    phase: watch::Receiver<Phase>,
) -> StdinHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    let pending = Rc::new(Cell::new(0));
    tokio::task::spawn_local(writer(pid, fd, is_pty, rx, pending.clone(), phase));
    StdinHandle {
        tx,
        pending,
        eof_queued: false,
    }
}

async fn write_all(fd: &AsyncFd<OwnedFd>, mut data: &[u8]) -> Result<(), Errno> {
    while !data.is_empty() {
        let n = fd
            .async_io(Interest::WRITABLE, |f| {
                rustix::io::write(f, data).map_err(std::io::Error::from)
            })
            .await
            .map_err(|e| Errno::from_io_error(&e).unwrap_or(Errno::IO))?;
        data = &data[n..];
    }
    Ok(())
}

async fn writer(
    pid: Pid,
    fd: Rc<AsyncFd<OwnedFd>>,
    is_pty: bool,
    mut rx: mpsc::UnboundedReceiver<StdinItem>,
    pending: Rc<Cell<usize>>,
    mut phase: watch::Receiver<Phase>,
) {
    let mut fd = Some(fd);
    let mut broken: Option<AgentError> = None;
    loop {
        let item = tokio::select! {
            biased;
            _ = phase.wait_for(|p| *p == Phase::Finished) => break,
            item = rx.recv() => match item {
                Some(item) => item,
                None => break,
            },
        };
        let StdinItem {
            mut data,
            eof,
            reply,
        } = item;
        pending.set(pending.get().saturating_sub(data.len()));
        let result = match (&broken, &fd) {
            (Some(err), _) => Err(err.clone()),
            (None, None) => Err(closed(pid)),
            (None, Some(target)) => {
                if eof && is_pty {
                    data.push(TERMINAL_EOF);
                }
                let outcome = tokio::select! {
                    biased;
                    _ = phase.wait_for(|p| *p == Phase::Finished) => Err(exited(pid)),
                    r = write_all(target, &data) => r.map_err(|errno| match errno {
                        Errno::PIPE | Errno::IO => closed(pid),
                        other => crate::errors::internal(
                            &format!("writing to stdin of process {pid} failed"),
                            crate::errors::errno_text(other),
                        ),
                    }),
                };
                if let Err(e) = &outcome {
                    broken = Some(e.clone());
                }
                outcome
            }
        };
        if result.is_ok() && eof && !is_pty {
            // Closing the pipe is the end-of-file the process sees.
            fd = None;
        }
        if let Some(reply) = reply {
            reply.send(result.map(|()| Response::Done)).await;
        }
    }
    drop(fd);
    // The process is gone: answer whatever is still queued.
    rx.close();
    while let Some(item) = rx.recv().await {
        if let Some(reply) = item.reply {
            reply.send(Err(exited(pid))).await;
        }
    }
}
