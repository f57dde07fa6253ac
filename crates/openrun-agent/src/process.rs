//! One entry of the agent's process table: what was started, its output, and how it ended.

use std::rc::Rc;

use openrun_protocol::{ExitStatus, Pid, ProcessInfo, ProcessState, Stream};
use rustix::fd::OwnedFd;
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::output::OutputBuffer;
use crate::stdin::StdinHandle;

/// Where a process is in its life, as seen by its I/O tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Running, or reaped while its output pipes are still open (within the grace period).
    Running,
    /// Reaped, and the grace period for its pipes is over: readers take what is there and stop.
    Draining,
    /// Exit reported; nothing more happens.
    Finished,
}

/// A process the agent started.
#[derive(Debug)]
pub(crate) struct Process {
    pub(crate) pid: Pid,
    pub(crate) argv: Vec<String>,
    pub(crate) cwd: String,
    pub(crate) uid: u32,
    pub(crate) pty: bool,
    pub(crate) tag: Option<String>,
    pub(crate) started_at_ms: u64,
    pub(crate) stdout: OutputBuffer,
    pub(crate) stderr: OutputBuffer,
    /// Set by the reaper when the process itself ended.
    pub(crate) reaped: Option<ExitStatus>,
    /// Set when the exit is reported (after the output is drained): the process is "exited".
    pub(crate) status: Option<ExitStatus>,
    /// The agent killed it because its timeout passed.
    pub(crate) timed_out: bool,
    /// Output readers still running.
    pub(crate) open_readers: usize,
    /// Where stdin requests go; `None` without a stdin pipe or terminal.
    pub(crate) stdin: Option<StdinHandle>,
    /// The terminal master, for resizing (shared with the reader and stdin writer).
    pub(crate) pty_master: Option<Rc<AsyncFd<OwnedFd>>>,
    /// Bumped on every change that attached streams care about (new output, exit).
    pub(crate) changed: watch::Sender<u64>,
    /// Drives the I/O tasks.
    pub(crate) phase: watch::Sender<Phase>,
    /// The timeout timer, cancelled when the process ends.
    pub(crate) timeout: Option<JoinHandle<()>>,
    /// A client released the exited process while other connections still followed it: the
    /// entry goes once the last of them has sent its exit ([`Process::release`]).
    pub(crate) released: bool,
}

impl Process {
    /// The buffer of one stream.
    pub(crate) fn buffer(&self, stream: Stream) -> &OutputBuffer {
        match stream {
            Stream::Stdout => &self.stdout,
            Stream::Stderr => &self.stderr,
        }
    }

    /// The buffer of one stream, mutably.
    pub(crate) fn buffer_mut(&mut self, stream: Stream) -> &mut OutputBuffer {
        match stream {
            Stream::Stdout => &mut self.stdout,
            Stream::Stderr => &mut self.stderr,
        }
    }

    /// Whether the exit has not been reported yet.
    pub(crate) fn is_running(&self) -> bool {
        self.status.is_none()
    }

    /// Connections streaming this process's output (each holds a receiver of `changed`).
    pub(crate) fn followers(&self) -> usize {
        self.changed.receiver_count()
    }

    /// Marks the (exited) process released; whether its entry can go now. With followers
    /// left it stays, so that a connection behind on the output still gets all of it and the
    /// exit, and goes when the last follower stops ([`Process::removable`]).
    pub(crate) fn release(&mut self) -> bool {
        self.released = true;
        self.followers() == 0
    }

    /// Whether a released entry has no followers left.
    pub(crate) fn removable(&self) -> bool {
        self.released && self.followers() == 0
    }

    /// Wakes everything that follows this process.
    pub(crate) fn notify(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// The protocol view of this entry.
    pub(crate) fn info(&self) -> ProcessInfo {
        ProcessInfo {
            pid: self.pid,
            argv: self.argv.clone(),
            cwd: self.cwd.clone(),
            uid: self.uid,
            pty: self.pty,
            tag: self.tag.clone(),
            started_at_ms: self.started_at_ms,
            state: match &self.status {
                None => ProcessState::Running,
                Some(status) => ProcessState::Exited {
                    status: status.clone(),
                },
            },
            stdout_len: self.stdout.end(),
            stderr_len: self.stderr.end(),
        }
    }
}

/// Converts a raw `waitpid` status into the protocol's [`ExitStatus`].
pub(crate) fn exit_status_from_wait(raw: i32) -> ExitStatus {
    let signaled = libc::WIFSIGNALED(raw);
    ExitStatus {
        code: libc::WIFEXITED(raw).then(|| libc::WEXITSTATUS(raw)),
        signal: signaled.then(|| libc::WTERMSIG(raw)),
        core_dumped: signaled && libc::WCOREDUMP(raw),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_statuses_decode() {
        // exit(3): code in bits 8..16.
        let st = exit_status_from_wait(3 << 8);
        assert_eq!((st.code, st.signal, st.core_dumped), (Some(3), None, false));
        // Killed by SIGKILL.
        let st = exit_status_from_wait(9);
        assert_eq!((st.code, st.signal, st.core_dumped), (None, Some(9), false));
        // SIGSEGV with core dump.
        let st = exit_status_from_wait(11 | 0x80);
        assert_eq!((st.code, st.signal, st.core_dumped), (None, Some(11), true));
    }
}
