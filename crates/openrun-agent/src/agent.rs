//! The agent's shared state: configuration, the sandbox root, and the process table, with the
//! operations connections perform on them.
//!
//! Everything runs on one thread (a current-thread runtime with a `LocalSet`), so the table
//! lives in a `RefCell`; no borrow is ever held across an `.await`.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use openrun_protocol::{
    AgentError, AgentInfo, AttachRequest, ErrorCode, ExecRequest, ExitStatus, Pid, ProcessInfo,
    PtySize, Stream, PROTOCOL_VERSION,
};
use rustix::fd::OwnedFd;
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

use crate::command;
use crate::connection::{Reply, Step};
use crate::errors::{errno_text, internal, no_such_process};
use crate::files::Files;
use crate::output::OutputBuffer;
use crate::process::{Phase, Process};
use crate::spawn::{self, above_stdio, ChildStdio};
use crate::users::{self, ResolvedUser};
use crate::{pty, reader, stdin, AgentConfig};

/// How long after reaping a process its exit waits for the output pipes to reach EOF (a
/// grandchild that inherited them may hold them open indefinitely).
pub(crate) const EXIT_GRACE: Duration = Duration::from_millis(100);
/// Largest `/etc/passwd` or `/etc/group` the agent reads.
const MAX_USER_DB: usize = 4 << 20;
/// Highest signal number on Linux.
const MAX_SIGNAL: i32 = 64;

/// State shared by every connection and task.
#[derive(Debug)]
pub(crate) struct Agent {
    pub(crate) config: AgentConfig,
    pub(crate) files: Arc<Files>,
    started: Instant,
    /// Whether the agent is pid 1 of its pid namespace (then `kill(-1)` is safe and right).
    is_init: bool,
    processes: RefCell<BTreeMap<Pid, Process>>,
    /// `/etc/passwd` and `/etc/group` as last read, while unchanged.
    user_db: RefCell<Option<users::UserDb>>,
    shutdown: watch::Sender<bool>,
    /// When the sandbox's lifetime ends (`None`: never); the server loop follows changes.
    deadline: watch::Sender<Option<tokio::time::Instant>>,
    /// The egress relay's listener and unclaimed connections.
    pub(crate) relay: crate::relay::Relay,
    /// Directory watches of every connection.
    pub(crate) watches: Rc<crate::watch::Watches>,
}

/// The parent's ends of a new process's standard streams.
enum ParentIo {
    Pipes {
        stdout: AsyncFd<OwnedFd>,
        stderr: AsyncFd<OwnedFd>,
        stdin: Option<AsyncFd<OwnedFd>>,
    },
    Pty(Rc<AsyncFd<OwnedFd>>),
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn setup_error(what: &str, errno: Errno) -> AgentError {
    internal(what, errno_text(errno))
}

/// Registers a parent-side descriptor with the runtime (non-blocking).
fn async_fd(fd: OwnedFd) -> Result<AsyncFd<OwnedFd>, AgentError> {
    rustix::io::ioctl_fionbio(&fd, true)
        .map_err(|e| setup_error("cannot make a pipe non-blocking", e))?;
    // SAFETY: an `OwnedFd` is an open descriptor that stays open, and always returns the same
    // number from `as_raw_fd`, for as long as the `AsyncFd` owns it.
    unsafe { AsyncFd::register(fd) }.map_err(|e| internal("cannot watch a pipe", e))
}

fn pipe() -> Result<(OwnedFd, OwnedFd), AgentError> {
    rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| setup_error("cannot create a pipe", e))
}

/// Sends `sig` to `target` (a pid, or minus a process group id).
fn kill_raw(target: i32, sig: i32) -> Result<(), Errno> {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    let rc = unsafe { libc::kill(target, sig) };
    if rc == 0 {
        Ok(())
    } else {
        Err(Errno::from_raw_os_error(
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
        ))
    }
}

/// Direct children of the agent, read from `/proc/self/task/*/children` (this includes
/// orphans reparented to it as subreaper). Their pids cannot be reused before the agent reaps
/// them, so signalling them is safe.
fn own_children() -> Vec<i32> {
    let mut pids = Vec::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return pids;
    };
    for task in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            pids.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
        }
    }
    pids
}

impl Agent {
    /// Builds the shared state.
    pub(crate) fn new(config: AgentConfig, files: Files) -> Rc<Self> {
        let (shutdown, _) = watch::channel(false);
        let deadline = config.lifetime.map(|d| tokio::time::Instant::now() + d);
        let (deadline, _) = watch::channel(deadline);
        let files = Arc::new(files);
        Rc::new(Self {
            config,
            watches: crate::watch::Watches::new(files.clone()),
            files,
            started: Instant::now(),
            is_init: rustix::process::getpid().is_init(),
            processes: RefCell::new(BTreeMap::new()),
            user_db: RefCell::new(None),
            shutdown,
            deadline,
            relay: crate::relay::Relay::default(),
        })
    }

    /// Replaces the lifetime: the sandbox ends `remaining` from now, or never.
    pub(crate) fn set_lifetime(&self, remaining: Option<std::time::Duration>) {
        self.deadline
            .send_replace(remaining.map(|d| tokio::time::Instant::now() + d));
    }

    /// The lifetime's end, updated by [`Agent::set_lifetime`].
    pub(crate) fn deadline(&self) -> watch::Receiver<Option<tokio::time::Instant>> {
        self.deadline.subscribe()
    }

    /// Facts for `Hello` and `Info`.
    pub(crate) fn info(&self) -> AgentInfo {
        AgentInfo {
            version: PROTOCOL_VERSION,
            sandbox_id: self.config.sandbox_id.clone(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            running: self
                .processes
                .borrow()
                .values()
                .filter(|p| p.is_running())
                .count(),
        }
    }

    /// Asks the server loop to stop.
    pub(crate) fn request_shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Becomes true when shutdown was requested.
    pub(crate) fn shutdown_requested(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    fn resolve_user(&self, spec: Option<&str>) -> Result<ResolvedUser, AgentError> {
        // The stamps are taken before reading: a change while reading shows as a different
        // stamp next time, which reads again.
        let stamps = [
            self.files.stamp("/etc/passwd"),
            self.files.stamp("/etc/group"),
        ];
        if let [Some(passwd), Some(group)] = stamps {
            if let Some(db) = self.user_db.borrow().as_ref() {
                if db.stamps == [passwd, group] {
                    return users::resolve_user(spec, &db.passwd, &db.groups);
                }
            }
        }
        let read = |path: &str| -> Result<String, AgentError> {
            Ok(self
                .files
                .read_small(path, MAX_USER_DB)?
                .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
                .unwrap_or_default())
        };
        let passwd = users::parse_passwd(&read("/etc/passwd")?);
        let groups = users::parse_group(&read("/etc/group")?);
        let resolved = users::resolve_user(spec, &passwd, &groups);
        // Cached only when both files exist and their last change is well in the past (a
        // change within the same clock tick would not change the stamp).
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        *self.user_db.borrow_mut() = match stamps {
            [Some(p), Some(g)]
                if p.settled(now, users::SETTLED) && g.settled(now, users::SETTLED) =>
            {
                Some(users::UserDb {
                    stamps: [p, g],
                    passwd,
                    groups,
                })
            }
            _ => None,
        };
        resolved
    }

    /// Starts a process; returns its pid once it runs.
    pub(crate) fn exec(
        self: &Rc<Self>,
        req: &ExecRequest,
        data: Vec<u8>,
    ) -> Result<Pid, AgentError> {
        if req.argv.is_empty() {
            return Err(AgentError::new(ErrorCode::InvalidArgument, "argv is empty"));
        }
        if let Some(size) = req.pty {
            if size.rows == 0 || size.cols == 0 {
                return Err(AgentError::new(
                    ErrorCode::InvalidArgument,
                    format!(
                        "invalid terminal size: {} rows, {} columns",
                        size.rows, size.cols
                    ),
                ));
            }
        }
        let user = self.resolve_user(req.user.as_deref().or(self.config.user.as_deref()))?;
        let env = command::build_env(
            &self.config.env,
            &user,
            &self.config.sandbox_id,
            req.pty.is_some(),
            &req.env,
        )?;
        let cwd = command::choose_cwd(
            req.cwd.as_deref(),
            &user.home,
            self.config.cwd.as_deref(),
            // Resolved inside the root like every file operation: the home comes from the
            // sandbox's /etc/passwd, and a lookup through a magic link could reach a file
            // system (e.g. FUSE in a sandbox process's own mount namespace) that never answers.
            |p| self.files.is_dir(p),
        )?;
        let plan = command::plan(req, &user, &env, cwd, self.config.process_oom_score_adj)?;

        // A stdin pipe when the client will write to it, or to deliver the Exec frame's data
        // (then closed after it, so the process sees EOF).
        let stdin_pipe = req.stdin || !data.is_empty();
        let (child_stdio, parent_io) = match req.pty {
            Some(size) => {
                let pair =
                    pty::open(size).map_err(|e| setup_error("cannot open a pseudo-terminal", e))?;
                let master = Rc::new(async_fd(pair.master)?);
                (
                    ChildStdio::Pty {
                        slave: above_stdio(pair.slave)?,
                    },
                    ParentIo::Pty(master),
                )
            }
            None => {
                let (out_r, out_w) = pipe()?;
                let (err_r, err_w) = pipe()?;
                let (child_in, parent_in) = if stdin_pipe {
                    let (r, w) = pipe()?;
                    (r, Some(async_fd(w)?))
                } else {
                    let null = rustix::fs::open(
                        c"/dev/null",
                        OFlags::RDONLY | OFlags::CLOEXEC,
                        Mode::empty(),
                    );
                    match null {
                        Ok(fd) => (fd, None),
                        // No /dev/null: an empty pipe whose writer is closed reads as EOF too.
                        Err(_) => (pipe()?.0, None),
                    }
                };
                (
                    ChildStdio::Pipes {
                        stdin: above_stdio(child_in)?,
                        stdout: above_stdio(out_w)?,
                        stderr: above_stdio(err_w)?,
                    },
                    ParentIo::Pipes {
                        stdout: async_fd(out_r)?,
                        stderr: async_fd(err_r)?,
                        stdin: parent_in,
                    },
                )
            }
        };

        let pid = spawn::spawn(&plan, child_stdio, self.config.own_oom_score_adj.as_deref())?;
        tracing::debug!(pid, argv = ?req.argv, "started process");

        let retention = self.config.output_retention;
        let (changed, _) = watch::channel(0u64);
        let (phase, _) = watch::channel(Phase::Running);
        let mut process = Process {
            pid,
            argv: req.argv.clone(),
            cwd: plan.cwd.clone(),
            uid: user.uid,
            pty: req.pty.is_some(),
            tag: req.tag.clone(),
            started_at_ms: now_ms(),
            stdout: OutputBuffer::new(retention),
            stderr: OutputBuffer::new(retention),
            reaped: None,
            status: None,
            timed_out: false,
            open_readers: 0,
            stdin: None,
            pty_master: None,
            changed,
            phase,
            timeout: None,
            released: false,
        };

        let mut readers: Vec<(Stream, Rc<AsyncFd<OwnedFd>>)> = Vec::new();
        match parent_io {
            ParentIo::Pty(master) => {
                readers.push((Stream::Stdout, master.clone()));
                process.stdin = Some(stdin::start(
                    pid,
                    master.clone(),
                    true,
                    process.phase.subscribe(),
                ));
                process.pty_master = Some(master);
            }
            ParentIo::Pipes {
                stdout,
                stderr,
                stdin: parent_in,
            } => {
                readers.push((Stream::Stdout, Rc::new(stdout)));
                readers.push((Stream::Stderr, Rc::new(stderr)));
                if let Some(w) = parent_in {
                    process.stdin = Some(stdin::start(
                        pid,
                        Rc::new(w),
                        false,
                        process.phase.subscribe(),
                    ));
                }
            }
        }
        process.open_readers = readers.len();
        for (stream, fd) in readers {
            tokio::task::spawn_local(reader::read_stream(
                self.clone(),
                pid,
                stream,
                fd,
                process.phase.subscribe(),
            ));
        }
        if let Some(ms) = req.timeout_ms {
            let agent = Rc::downgrade(self);
            process.timeout = Some(tokio::task::spawn_local(async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                if let Some(agent) = agent.upgrade() {
                    agent.on_timeout(pid);
                }
            }));
        }
        if let Some(handle) = process.stdin.as_mut() {
            let close_after = !req.stdin && req.pty.is_none();
            if !data.is_empty() || close_after {
                // Cannot fail: the queue is new and the data fits in one frame.
                if let Err(e) = handle.queue(pid, data, close_after, None) {
                    tracing::warn!(pid, error = %e, "could not queue initial stdin");
                }
            }
        }
        self.processes.borrow_mut().insert(pid, process);
        Ok(pid)
    }

    /// New output from a reader.
    pub(crate) fn append_output(&self, pid: Pid, stream: Stream, data: &[u8]) {
        if let Some(p) = self.processes.borrow_mut().get_mut(&pid) {
            p.buffer_mut(stream).push(data);
            p.notify();
        }
    }

    /// Runs `f` on one process's entry (`None` if there is none). `f` must not call back
    /// into the agent (the table is borrowed meanwhile).
    pub(crate) fn with_process<R>(&self, pid: Pid, f: impl FnOnce(&Process) -> R) -> Option<R> {
        self.processes.borrow().get(&pid).map(f)
    }

    /// A reader reached EOF or stopped.
    pub(crate) fn reader_closed(&self, pid: Pid) {
        let ready = match self.processes.borrow_mut().get_mut(&pid) {
            Some(p) => {
                p.open_readers = p.open_readers.saturating_sub(1);
                p.open_readers == 0 && p.reaped.is_some() && p.status.is_none()
            }
            None => false,
        };
        if ready {
            self.finish(pid);
        }
    }

    /// The reaper collected `pid`.
    pub(crate) fn on_reaped(self: &Rc<Self>, pid: Pid, mut status: ExitStatus) {
        let mut table = self.processes.borrow_mut();
        let Some(p) = table.get_mut(&pid) else {
            tracing::debug!(pid, "reaped an orphan");
            return;
        };
        if p.reaped.is_some() {
            return;
        }
        status.timed_out = p.timed_out;
        tracing::debug!(pid, ?status, "process exited");
        p.reaped = Some(status);
        if let Some(timer) = p.timeout.take() {
            timer.abort();
        }
        if p.open_readers == 0 {
            drop(table);
            self.finish(pid);
            return;
        }
        drop(table);
        let agent = Rc::downgrade(self);
        tokio::task::spawn_local(async move {
            tokio::time::sleep(EXIT_GRACE).await;
            if let Some(agent) = agent.upgrade() {
                if let Some(p) = agent.processes.borrow().get(&pid) {
                    if p.status.is_none() {
                        p.phase.send_replace(Phase::Draining);
                    }
                }
            }
        });
    }

    /// Reports the exit: output is complete, attached streams may send `Exit`.
    fn finish(&self, pid: Pid) {
        let mut table = self.processes.borrow_mut();
        let Some(p) = table.get_mut(&pid) else {
            return;
        };
        p.status = p.reaped.clone();
        p.phase.send_replace(Phase::Finished);
        p.stdin = None;
        p.pty_master = None;
        p.notify();
    }

    fn on_timeout(&self, pid: Pid) {
        let mut table = self.processes.borrow_mut();
        let Some(p) = table.get_mut(&pid) else {
            return;
        };
        if p.reaped.is_none() {
            p.timed_out = true;
            tracing::debug!(pid, "timeout passed; killing the process group");
            if let Err(e) = kill_raw(-pid, libc::SIGKILL) {
                tracing::warn!(pid, error = %e, "could not kill a timed-out process group");
            }
        }
    }

    /// Sends a signal to a process or its process group.
    pub(crate) fn signal(&self, pid: Pid, signal: i32, group: bool) -> Result<(), AgentError> {
        if !(0..=MAX_SIGNAL).contains(&signal) {
            return Err(AgentError::new(
                ErrorCode::InvalidArgument,
                format!("invalid signal number: {signal}"),
            ));
        }
        let table = self.processes.borrow();
        let p = table.get(&pid).ok_or_else(|| no_such_process(pid))?;
        if p.reaped.is_some() && !group {
            return Err(AgentError::new(
                ErrorCode::NoSuchProcess,
                format!("process {pid} has already exited"),
            ));
        }
        let target = if group { -pid } else { pid };
        kill_raw(target, signal).map_err(|e| match e {
            Errno::SRCH if group => AgentError::new(
                ErrorCode::NoSuchProcess,
                format!("process group {pid} has no processes left"),
            ),
            Errno::SRCH => no_such_process(pid),
            Errno::PERM => AgentError::new(
                ErrorCode::PermissionDenied,
                format!("not permitted to signal process {pid}"),
            ),
            other => internal(
                &format!("signalling process {pid} failed"),
                errno_text(other),
            ),
        })
    }

    /// Queues bytes for a process's stdin; `reply` is answered when they are written.
    pub(crate) fn queue_stdin(
        &self,
        pid: Pid,
        data: Vec<u8>,
        eof: bool,
        reply: Reply,
    ) -> Result<(), AgentError> {
        let mut table = self.processes.borrow_mut();
        let p = table.get_mut(&pid).ok_or_else(|| no_such_process(pid))?;
        if !p.is_running() {
            return Err(AgentError::new(
                ErrorCode::NotSupported,
                format!("process {pid} has exited; its stdin is closed"),
            ));
        }
        match p.stdin.as_mut() {
            Some(handle) => handle.queue(pid, data, eof, Some(reply)),
            None => Err(AgentError::new(
                ErrorCode::NotSupported,
                format!("process {pid} has no stdin pipe (start it with stdin: true)"),
            )),
        }
    }

    /// Resizes a PTY process's terminal.
    pub(crate) fn resize(&self, pid: Pid, size: PtySize) -> Result<(), AgentError> {
        let table = self.processes.borrow();
        let p = table.get(&pid).ok_or_else(|| no_such_process(pid))?;
        if !p.pty {
            return Err(AgentError::new(
                ErrorCode::NotSupported,
                format!("process {pid} has no terminal"),
            ));
        }
        let Some(master) = &p.pty_master else {
            return Err(AgentError::new(
                ErrorCode::NotSupported,
                format!("process {pid} has exited; its terminal is closed"),
            ));
        };
        pty::resize(master.get_ref(), size).map_err(|e| {
            internal(
                &format!("resizing the terminal of process {pid} failed"),
                errno_text(e),
            )
        })
    }

    /// Forgets an exited process: at once, or (while other connections still stream its
    /// output) once the last of them has sent the exit ([`Agent::forget_if_released`]).
    pub(crate) fn release(&self, pid: Pid) -> Result<(), AgentError> {
        let mut table = self.processes.borrow_mut();
        let p = table.get_mut(&pid).ok_or_else(|| no_such_process(pid))?;
        if p.is_running() {
            return Err(AgentError::new(
                ErrorCode::StillRunning,
                format!("process {pid} is still running"),
            ));
        }
        if p.release() {
            table.remove(&pid);
        }
        Ok(())
    }

    /// Removes a released process whose last follower just stopped.
    pub(crate) fn forget_if_released(&self, pid: Pid) {
        // Called when a streaming task ends (or is dropped): never while the table is borrowed
        // by the agent's own code, but a drop must not panic whatever happens.
        let Ok(mut table) = self.processes.try_borrow_mut() else {
            return;
        };
        if table.get(&pid).is_some_and(Process::removable) {
            table.remove(&pid);
        }
    }

    /// One process's entry.
    pub(crate) fn process_info(&self, pid: Pid) -> Result<ProcessInfo, AgentError> {
        self.processes
            .borrow()
            .get(&pid)
            .map(Process::info)
            .ok_or_else(|| no_such_process(pid))
    }

    /// The whole table, by pid.
    pub(crate) fn list(&self) -> Vec<ProcessInfo> {
        self.processes
            .borrow()
            .values()
            .map(Process::info)
            .collect()
    }

    /// Checks an attach request; returns the current entry and how many requested bytes are
    /// gone. Offsets beyond what was written so far are allowed: streaming starts once output
    /// reaches them (a client reconnecting may race with output it already knows of).
    pub(crate) fn attach_info(
        &self,
        req: &AttachRequest,
    ) -> Result<(ProcessInfo, u64), AgentError> {
        let table = self.processes.borrow();
        let p = table
            .get(&req.pid)
            .ok_or_else(|| no_such_process(req.pid))?;
        let dropped =
            p.stdout.dropped_before(req.stdout_since) + p.stderr.dropped_before(req.stderr_since);
        Ok((p.info(), dropped))
    }

    /// Subscribes to a process's changes (for streaming).
    pub(crate) fn subscribe(&self, pid: Pid) -> Option<watch::Receiver<u64>> {
        self.processes
            .borrow()
            .get(&pid)
            .map(|p| p.changed.subscribe())
    }

    /// What a stream positioned at `cursor` should send next.
    pub(crate) fn next_step(
        &self,
        pid: Pid,
        cursor: [u64; 2],
        prefer_stderr: bool,
        max: usize,
    ) -> Step {
        let table = self.processes.borrow();
        let Some(p) = table.get(&pid) else {
            return Step::Gone;
        };
        let order = if prefer_stderr {
            [(Stream::Stderr, cursor[1]), (Stream::Stdout, cursor[0])]
        } else {
            [(Stream::Stdout, cursor[0]), (Stream::Stderr, cursor[1])]
        };
        for (stream, since) in order {
            if let Some((offset, bytes)) = p.buffer(stream).read_from(since, max) {
                return Step::Data(stream, offset, bytes);
            }
        }
        match &p.status {
            Some(status) => Step::Exit(status.clone()),
            None => Step::Wait,
        }
    }

    fn has_unreaped(&self) -> bool {
        self.processes.borrow().values().any(|p| p.reaped.is_none())
    }

    /// Kills every process. As pid 1 of the sandbox's pid namespace that is `kill(-1, SIGKILL)`
    /// (everything but the agent itself). Otherwise (tests, or an agent run outside a pid
    /// namespace) `kill(-1)` would hit every process of the user on the host, so only the
    /// process groups the agent started and its own (reparented) children are killed.
    pub(crate) fn kill_all(&self) {
        if self.is_init {
            if let Err(e) = kill_raw(-1, libc::SIGKILL) {
                if e != Errno::SRCH {
                    tracing::warn!(error = %e, "kill(-1, SIGKILL) failed");
                }
            }
            return;
        }
        let pids: Vec<Pid> = self.processes.borrow().keys().copied().collect();
        for pid in pids {
            let _ = kill_raw(-pid, libc::SIGKILL);
        }
        for child in own_children() {
            let _ = kill_raw(child, libc::SIGKILL);
        }
    }

    /// After [`Agent::kill_all`]: waits (bounded) until the reaper has collected every process
    /// the agent started, killing newly reparented orphans on the way.
    pub(crate) async fn wait_for_exits(self: &Rc<Self>, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            crate::reaper::reap_all(self);
            let children = if self.is_init {
                Vec::new()
            } else {
                own_children()
            };
            if !self.has_unreaped() && children.is_empty() {
                return;
            }
            for child in children {
                let _ = kill_raw(child, libc::SIGKILL);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent_with_root(root: &std::path::Path) -> Rc<Agent> {
        let config = AgentConfig {
            sandbox_id: "test".into(),
            root: root.to_path_buf(),
            env: BTreeMap::new(),
            cwd: None,
            user: None,
            lifetime: None,
            output_retention: 1024,
            exit_with_control: false,
            process_oom_score_adj: 0,
            own_oom_score_adj: None,
        };
        Agent::new(config, Files::open(root).unwrap())
    }

    fn write_users(root: &std::path::Path, uid: u32) {
        // Same length whatever the uid (4 digits), so only the contents change.
        std::fs::write(
            root.join("etc/passwd"),
            format!("root:x:0:0:root:/root:/bin/sh\nalice:x:{uid}:{uid}::/home/alice:/bin/sh\n"),
        )
        .unwrap();
    }

    #[test]
    fn cached_users_follow_every_change_of_the_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(
            dir.path().join("etc/group"),
            "root:x:0:\nstaff:x:50:alice\n",
        )
        .unwrap();
        write_users(dir.path(), 1000);
        let agent = agent_with_root(dir.path());
        let uid = |agent: &Agent| agent.resolve_user(Some("alice")).unwrap().uid;
        assert_eq!(uid(&agent), 1000);
        // Just written: not settled, so not cached.
        assert!(agent.user_db.borrow().is_none());

        std::thread::sleep(users::SETTLED * 2);
        assert_eq!(uid(&agent), 1000);
        assert!(agent.user_db.borrow().is_some(), "settled files are cached");
        assert_eq!(
            agent.resolve_user(Some("alice")).unwrap().groups,
            vec![1000, 50]
        );

        // Rewritten in place with the same size: seen at once, and not cached (too recent
        // to tell from a change in the same clock tick)...
        write_users(dir.path(), 1001);
        assert_eq!(uid(&agent), 1001);
        assert!(agent.user_db.borrow().is_none());
        // ... so a second change right after it is seen too.
        write_users(dir.path(), 1002);
        assert_eq!(uid(&agent), 1002);

        // Replaced by a rename, as useradd does.
        std::thread::sleep(users::SETTLED * 2);
        assert_eq!(uid(&agent), 1002);
        let next = dir.path().join("etc/passwd+");
        std::fs::write(&next, "alice:x:2000:2000::/:/bin/sh\n").unwrap();
        std::fs::rename(&next, dir.path().join("etc/passwd")).unwrap();
        assert_eq!(uid(&agent), 2000);
        // The group file counts too.
        std::thread::sleep(users::SETTLED * 2);
        assert_eq!(uid(&agent), 2000);
        std::fs::write(
            dir.path().join("etc/group"),
            "root:x:0:\nstaff:x:51:alice\n",
        )
        .unwrap();
        assert_eq!(
            agent.resolve_user(Some("alice")).unwrap().groups,
            vec![2000, 51]
        );
    }
}
