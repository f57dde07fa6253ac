//! Starting a process: `fork`, then a short, async-signal-safe setup in the child, then `execve`.
//!
//! Everything the child needs (argv, envp, candidate paths, the ids to switch to) is built
//! *before* `fork`, so the child never allocates or takes a lock: the agent may have other
//! threads (tokio's blocking pool) whose locks are frozen in the child. A close-on-exec pipe
//! reports the first failing step and its errno back to the parent; EOF on it means `execve`
//! succeeded.
//!
//! The wait for that report is bounded: the child runs as the sandbox's root until it switches
//! user, so a sandbox process can stop it (`SIGSTOP`, `ptrace`) before it execs. The agent, a
//! single thread, must never wait for it indefinitely; a child that is stopped, or that neither
//! execs nor fails within [`START_TIMEOUT`], is killed and the exec fails.
//!
//! Inside a sandbox every child also enters a Landlock domain of its own (nested in the
//! sandbox's) before `execve` — see [`set_exec_session_ruleset`]: the processes of one exec
//! session can trace their own descendants but not another session's processes, nor the agent.

use std::ffi::{c_char, CString};
use std::os::fd::AsRawFd;
use std::ptr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use openrun_protocol::{AgentError, ErrorCode, Pid};
use rustix::fd::{AsFd, OwnedFd};
use rustix::io::Errno;

use crate::errors::errno_text;

/// The child's standard descriptors.
#[derive(Debug)]
pub(crate) enum ChildStdio {
    /// Separate stdin (pipe or `/dev/null`), stdout and stderr.
    Pipes {
        stdin: OwnedFd,
        stdout: OwnedFd,
        stderr: OwnedFd,
    },
    /// All three on the slave side of a new terminal, which becomes the controlling terminal.
    Pty { slave: OwnedFd },
}

/// Everything decided about a process before it is forked.
#[derive(Debug)]
pub(crate) struct ExecPlan {
    /// `argv[0]` as requested, for messages.
    pub(crate) program: String,
    /// Paths `execve` tries in order (one unless `PATH` is searched).
    pub(crate) candidates: Vec<CString>,
    pub(crate) argv: Vec<CString>,
    pub(crate) envp: Vec<CString>,
    pub(crate) cwd: String,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) groups: Vec<u32>,
    /// Written to `/proc/self/oom_score_adj` before exec.
    pub(crate) oom_score_adj: i32,
}

/// Steps of the child's setup, reported with the errno of the first one that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
enum Stage {
    Setsid = 1,
    ControllingTerminal = 2,
    Stdio = 3,
    OomScore = 4,
    Groups = 5,
    Gid = 6,
    Uid = 7,
    Chdir = 8,
    Landlock = 9,
    Exec = 10,
}

impl Stage {
    fn from_raw(raw: i32) -> Option<Self> {
        Some(match raw {
            1 => Self::Setsid,
            2 => Self::ControllingTerminal,
            3 => Self::Stdio,
            4 => Self::OomScore,
            5 => Self::Groups,
            6 => Self::Gid,
            7 => Self::Uid,
            8 => Self::Chdir,
            9 => Self::Landlock,
            10 => Self::Exec,
            _ => return None,
        })
    }
}

/// Pointer arrays and C strings the child uses, all allocated before `fork`.
struct Prepared<'a> {
    plan: &'a ExecPlan,
    cwd: CString,
    argv: Vec<*const c_char>,
    envp: Vec<*const c_char>,
    /// For each candidate: `/bin/sh <candidate> argv[1..]`, the fallback for `ENOEXEC`
    /// (a script without `#!`), as `execvp` does it.
    sh_argv: Vec<Vec<*const c_char>>,
    groups: Vec<rustix::process::Gid>,
    /// `setgroups` may be refused in a user namespace; that only matters when the process is
    /// meant to run as someone other than the agent.
    tolerate_groups_failure: bool,
    empty_mask: libc::sigset_t,
    /// `oom_score_adj` as the decimal text the kernel expects, when the child must write it
    /// itself (an agent that is not a sandbox's pid 1, as in tests).
    oom_score_adj: Option<Vec<u8>>,
    err_pipe: OwnedFd,
    stdio: &'a ChildStdio,
    /// The exec-session Landlock ruleset to enter, if the agent has one.
    landlock_ruleset: Option<i32>,
}

/// The Landlock ruleset every started process enters before `execve` (see
/// [`set_exec_session_ruleset`]).
static EXEC_SESSION_RULESET: OnceLock<OwnedFd> = OnceLock::new();

/// Makes every process the agent starts from now on enter a new Landlock domain made from
/// `ruleset` (a Landlock ruleset descriptor) right before `execve`, nested in the agent's own.
/// Landlock lets a process `ptrace` (or read the `/proc` files guarded like ptrace) only
/// processes in its own domain or in domains nested in it, so each exec session can debug its
/// own descendants (`strace -f`, `gdb`) but neither another session's processes nor the agent.
/// Entering costs the child one system call (a few microseconds).
///
/// Set once, by a sandbox's init before it becomes the agent; the child then needs
/// `no_new_privs`, which the init set. A process that cannot enter the domain is not started
/// (the exec fails naming the step). Returns the descriptor back if one was already set.
pub fn set_exec_session_ruleset(ruleset: OwnedFd) -> Result<(), OwnedFd> {
    EXEC_SESSION_RULESET.set(ruleset)
}

const SH: &std::ffi::CStr = c"/bin/sh";

/// Longest time a forked child may take to exec (or to report why it could not). A child
/// stopped by a signal is killed at once; this bound is for one that is merely stuck (a busy,
/// memory-starved sandbox can be slow, so it is generous).
pub(crate) const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the wait for the child's report checks whether the child was stopped.
const STOP_CHECK_INTERVAL: Duration = Duration::from_millis(20);
/// How long to wait for a killed child to be reaped before leaving it to the reaper.
const REAP_TIMEOUT: Duration = Duration::from_secs(1);

/// Moves `fd` above 2 (if it is not already), so that setting up the child's stdio never
/// clobbers it; agent descriptors can be that low only if the agent's own stdio was closed.
pub(crate) fn above_stdio(fd: OwnedFd) -> Result<OwnedFd, AgentError> {
    if rustix::fd::AsRawFd::as_raw_fd(&fd) > 2 {
        return Ok(fd);
    }
    rustix::io::fcntl_dupfd_cloexec(&fd, 3)
        .map_err(|e| crate::errors::internal("cannot duplicate a descriptor", errno_text(e)))
}

fn null_terminated(strings: &[CString]) -> Vec<*const c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(ptr::null()))
        .collect()
}

/// Forks and executes `plan` with `stdio`. Returns the child's pid once `execve` succeeded;
/// otherwise reaps the failed child and returns an error for the step that failed.
pub(crate) fn spawn(
    plan: &ExecPlan,
    stdio: ChildStdio,
    own_oom_score_adj: Option<&std::fs::File>,
) -> Result<Pid, AgentError> {
    let cwd = CString::new(plan.cwd.as_str())
        .map_err(|_| AgentError::new(ErrorCode::InvalidArgument, "cwd contains a nul byte"))?;
    let (err_read, err_write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| crate::errors::internal("cannot create a pipe", errno_text(e)))?;
    let err_write = above_stdio(err_write)?;

    // SAFETY: `sigset_t` is a plain C struct for which all-zero bytes are a valid value; it
    // is filled by `sigemptyset` below before use.
    let mut empty_mask: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer refers to a live, writable `sigset_t` owned by this frame.
    unsafe {
        libc::sigemptyset(&mut empty_mask);
    }

    let prepared = Prepared {
        plan,
        argv: null_terminated(&plan.argv),
        envp: null_terminated(&plan.envp),
        sh_argv: plan
            .candidates
            .iter()
            .map(|c| {
                std::iter::once(SH.as_ptr())
                    .chain(std::iter::once(c.as_ptr()))
                    .chain(plan.argv.iter().skip(1).map(|a| a.as_ptr()))
                    .chain(std::iter::once(ptr::null()))
                    .collect()
            })
            .collect(),
        cwd,
        groups: plan
            .groups
            .iter()
            .map(|g| rustix::process::Gid::from_raw(*g))
            .collect(),
        tolerate_groups_failure: rustix::process::geteuid().as_raw() == plan.uid,
        empty_mask,
        oom_score_adj: match own_oom_score_adj {
            // Set from the outside around the fork (see below): nothing for the child to do.
            Some(_) => None,
            None => Some(plan.oom_score_adj.to_string().into_bytes()),
        },
        err_pipe: err_write,
        stdio: &stdio,
        landlock_ruleset: EXEC_SESSION_RULESET.get().map(|fd| fd.as_raw_fd()),
    };

    // Block every signal across fork so no handler of the agent (tokio's) runs in the child
    // before its dispositions are reset; the parent restores its mask right after.
    // SAFETY: zeroed `sigset_t` values are valid storage for `sigfillset`/`pthread_sigmask`.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: the pointers refer to live `sigset_t` values owned by this frame.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }

    // The child inherits the agent's OOM score at fork: set the child's value on the agent for
    // the instant of the fork, then put the agent's own back.
    let restore = own_oom_score_adj.and_then(|file| set_oom_score_adj(file, plan.oom_score_adj));
    // SAFETY: the child only runs `child_main`, which makes async-signal-safe system calls on
    // memory prepared above and ends in `execve` or `_exit`; it never returns into Rust code
    // that could touch locks or allocator state held by other threads at the time of fork.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        child_main(&prepared);
    }
    if let (Some(file), Some(previous)) = (own_oom_score_adj, restore) {
        if let Err(e) = rustix::io::pwrite(file, &previous, 0) {
            tracing::warn!(error = %e, "cannot restore the agent's oom_score_adj");
        }
    }
    // SAFETY: restores the mask saved above, from a live `sigset_t`.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, ptr::null_mut());
    }
    let fork_errno = std::io::Error::last_os_error();
    // The parent's copies of the child's ends must close, or EOF never arrives.
    let Prepared { err_pipe, .. } = prepared;
    drop(err_pipe);
    drop(stdio);
    if pid < 0 {
        return Err(crate::errors::internal("fork failed", fork_errno));
    }

    await_start(plan, pid, &err_read, START_TIMEOUT)
}

/// What the error pipe said about a forked child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StartReport {
    /// End-of-file without a report: `execve` succeeded (the pipe is close-on-exec).
    Execed,
    /// The child's report: the failed stage and its errno.
    Failed { stage: i32, errno: i32 },
    /// The child was stopped by a signal before it exec'd.
    Stopped,
    /// Neither a report nor end-of-file within the time limit.
    TimedOut,
}

/// Waits for the child's report on `err_read`, for at most `limit`. With `child`, also checks
/// every [`STOP_CHECK_INTERVAL`] whether that child was stopped, so a stopped child costs the
/// agent little time rather than the whole limit. Never blocks for longer than `limit`.
fn wait_for_report(
    err_read: &OwnedFd,
    child: Option<rustix::process::Pid>,
    limit: Duration,
) -> StartReport {
    // The read end is the agent's own file description: non-blocking, so a read after
    // `poll` can never wait.
    let _ = rustix::io::ioctl_fionbio(err_read, true);
    let deadline = Instant::now() + limit;
    let mut report = [0u8; 8];
    let mut filled = 0;
    loop {
        match rustix::io::read(err_read, &mut report[filled..]) {
            Ok(0) if filled == 0 => return StartReport::Execed,
            // A short report (the child writes all 8 bytes at once, so this does not happen):
            // what is missing reads as zero.
            Ok(0) => break,
            Ok(n) => {
                filled += n;
                if filled == report.len() {
                    break;
                }
                continue;
            }
            Err(Errno::INTR) => continue,
            Err(Errno::AGAIN) => {}
            // The pipe cannot be read: nothing more will come from it, as after EOF.
            Err(_) if filled == 0 => return StartReport::Execed,
            Err(_) => break,
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return StartReport::TimedOut;
        }
        if let Some(pid) = child {
            let flags = rustix::process::WaitIdOptions::STOPPED
                | rustix::process::WaitIdOptions::NOHANG
                | rustix::process::WaitIdOptions::NOWAIT;
            if let Ok(Some(status)) =
                rustix::process::waitid(rustix::process::WaitId::Pid(pid), flags)
            {
                if status.stopped() {
                    return StartReport::Stopped;
                }
            }
        }
        let slice = if child.is_some() {
            left.min(STOP_CHECK_INTERVAL)
        } else {
            left
        };
        let timeout = rustix::event::Timespec::try_from(slice).unwrap_or(rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 10_000_000,
        });
        let mut fds = [rustix::event::PollFd::new(
            err_read,
            rustix::event::PollFlags::IN,
        )];
        // Readiness (data, EOF, an error) or not, the loop reads again and checks the clock.
        let _ = rustix::event::poll(&mut fds, Some(&timeout));
    }
    StartReport::Failed {
        stage: i32::from_le_bytes([report[0], report[1], report[2], report[3]]),
        errno: i32::from_le_bytes([report[4], report[5], report[6], report[7]]),
    }
}

/// Waits (bounded by `limit`) until the child `pid` has exec'd. On anything else the child is
/// killed and reaped (bounded too) and the error says why.
fn await_start(
    plan: &ExecPlan,
    pid: Pid,
    err_read: &OwnedFd,
    limit: Duration,
) -> Result<Pid, AgentError> {
    let child = rustix::process::Pid::from_raw(pid);
    let report = wait_for_report(err_read, child, limit);
    if report == StartReport::Execed {
        return Ok(pid);
    }
    // The child failed, or is stuck before exec: it must not live on. Killing it is harmless
    // in every case (a child that reported a failure is about to `_exit` anyway, but a sandbox
    // process could stop it before it does) and safe: an unreaped child's pid cannot be
    // reused. Reap it here, so the reaper does not see an unknown pid.
    if let Some(child) = child {
        kill_and_reap(child, REAP_TIMEOUT);
    }
    let program = &plan.program;
    Err(match report {
        StartReport::Failed { stage, errno } => stage_error(
            plan,
            Stage::from_raw(stage),
            Errno::from_raw_os_error(errno),
        ),
        StartReport::Stopped => AgentError::new(
            ErrorCode::Internal,
            format!("{program}: the process was stopped before it could start"),
        ),
        StartReport::Execed | StartReport::TimedOut => AgentError::new(
            ErrorCode::Internal,
            format!(
                "{program}: the process did not start within {} s (something held it up \
                 before it could exec) and was killed",
                limit.as_secs_f32()
            ),
        ),
    })
}

/// `SIGKILL`s a child of the agent and reaps it, waiting at most `limit`. A child that has not
/// died by then (stuck in the kernel) is left to the reaper, which collects it as an orphan.
fn kill_and_reap(child: rustix::process::Pid, limit: Duration) -> bool {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe {
        libc::kill(child.as_raw_nonzero().get(), libc::SIGKILL);
    }
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_micros(50);
    loop {
        match rustix::process::waitpid(Some(child), rustix::process::WaitOptions::NOHANG) {
            Ok(Some(_)) | Err(Errno::CHILD) => return true,
            Ok(None) | Err(Errno::INTR) => {}
            Err(_) => return false,
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            tracing::warn!(
                pid = child.as_raw_nonzero().get(),
                "a killed child has not exited yet; leaving it to the reaper"
            );
            return false;
        }
        std::thread::sleep(pause.min(left));
        pause = (pause * 2).min(Duration::from_millis(10));
    }
}

/// Turns the child's report into the error a client sees.
fn stage_error(plan: &ExecPlan, stage: Option<Stage>, errno: Errno) -> AgentError {
    let program = &plan.program;
    match stage {
        Some(Stage::Exec) => match errno {
            Errno::NOENT | Errno::NOTDIR if program.contains('/') => AgentError::new(
                ErrorCode::CommandNotFound,
                format!("{program}: no such file or directory"),
            ),
            Errno::NOENT | Errno::NOTDIR => AgentError::new(
                ErrorCode::CommandNotFound,
                format!("{program}: command not found"),
            ),
            Errno::ACCESS | Errno::PERM => AgentError::new(
                ErrorCode::PermissionDenied,
                format!("{program}: permission denied"),
            ),
            Errno::NOEXEC => AgentError::new(
                ErrorCode::PermissionDenied,
                format!("{program}: cannot execute: exec format error"),
            ),
            other => AgentError::new(
                ErrorCode::Internal,
                format!("{program}: {}", errno_text(other)),
            ),
        },
        Some(Stage::Chdir) => {
            let cwd = &plan.cwd;
            match errno {
                Errno::NOENT => {
                    AgentError::new(ErrorCode::NotFound, format!("no such directory: {cwd}"))
                }
                Errno::NOTDIR => {
                    AgentError::new(ErrorCode::NotADirectory, format!("not a directory: {cwd}"))
                }
                Errno::ACCESS | Errno::PERM => AgentError::new(
                    ErrorCode::PermissionDenied,
                    format!("permission denied: {cwd}"),
                ),
                other => AgentError::new(
                    ErrorCode::Internal,
                    format!("cannot enter {cwd}: {}", errno_text(other)),
                ),
            }
        }
        Some(stage @ (Stage::Groups | Stage::Gid | Stage::Uid)) => AgentError::new(
            ErrorCode::PermissionDenied,
            format!(
                "cannot switch to uid {} gid {} ({:?}): {}",
                plan.uid,
                plan.gid,
                stage,
                errno_text(errno)
            )
            .to_lowercase(),
        ),
        Some(stage) => AgentError::new(
            ErrorCode::Internal,
            format!("process setup failed ({stage:?}): {}", errno_text(errno)).to_lowercase(),
        ),
        None => AgentError::new(
            ErrorCode::Internal,
            format!("process setup failed: {}", errno_text(errno)),
        ),
    }
}

/// Writes the failing stage and errno to the parent and exits. Async-signal-safe.
fn fail(p: &Prepared<'_>, stage: Stage, errno: Errno) -> ! {
    let mut msg = [0u8; 8];
    msg[..4].copy_from_slice(&(stage as i32).to_le_bytes());
    msg[4..].copy_from_slice(&errno.raw_os_error().to_le_bytes());
    let _ = rustix::io::write(&p.err_pipe, &msg);
    // SAFETY: `_exit` ends the child immediately without running atexit handlers or
    // destructors, which is what a forked child that failed to exec must do.
    unsafe { libc::_exit(127) }
}

fn last_errno() -> Errno {
    Errno::from_raw_os_error(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
}

/// Closes every descriptor above stderr except the error pipe. Async-signal-safe.
fn close_inherited(p: &Prepared<'_>) {
    let keep = rustix::fd::AsRawFd::as_raw_fd(&p.err_pipe) as u32;
    let ranges = [(3u32, keep.wrapping_sub(1)), (keep + 1, u32::MAX)];
    for (first, last) in ranges {
        if first > last {
            continue;
        }
        // SAFETY: close_range only closes descriptors of this (forked, single-threaded) child;
        // no Rust object in the child uses them again before exec.
        let rc = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) };
        if rc != 0 {
            // Kernels before 5.9: close one by one up to the descriptor limit.
            let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
                .current
                .unwrap_or(65536)
                .min(1 << 20);
            let last = u64::from(last).min(limit.saturating_sub(1));
            for fd in u64::from(first)..=last {
                // SAFETY: closing a descriptor number that may not be open only fails with
                // EBADF; nothing in the child refers to these descriptors afterwards.
                unsafe {
                    libc::close(fd as i32);
                }
            }
        }
    }
}

/// Writes `value` to the agent's own `oom_score_adj` and returns the previous contents, or
/// `None` (logged) if either step fails: the child then simply keeps the agent's score.
fn set_oom_score_adj(file: &std::fs::File, value: i32) -> Option<Vec<u8>> {
    let mut previous = [0u8; 16];
    let read = rustix::io::pread(file, &mut previous, 0)
        .map_err(|e| tracing::warn!(error = %e, "cannot read the agent's oom_score_adj"))
        .ok()?;
    let previous = previous[..read].trim_ascii_end().to_vec();
    rustix::io::pwrite(file, value.to_string().as_bytes(), 0)
        .map_err(|e| tracing::warn!(error = %e, "cannot set a child's oom_score_adj"))
        .ok()?;
    Some(previous)
}

/// Writes the configured `oom_score_adj` from the child itself. Async-signal-safe. Only used
/// when the agent has no handle on its own score (it is not a sandbox's pid 1, so it is
/// dumpable and its `/proc/self` is writable); a child never becomes dumpable for this.
fn write_oom_score_adj(value: &[u8]) -> Result<(), Errno> {
    let fd = rustix::fs::open(
        c"/proc/self/oom_score_adj",
        rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    rustix::io::write(&fd, value).map(|_| ())
}

/// The child between `fork` and `execve`. Only async-signal-safe system calls; no allocation.
fn child_main(p: &Prepared<'_>) -> ! {
    // Every signal is still blocked (see `spawn`). Reset all dispositions to their defaults:
    // handled signals would be reset by exec anyway, but ignored ones (SIGPIPE is ignored by
    // the Rust runtime, others may be inherited from whoever started the agent) would be
    // inherited by the new program. The raw syscall is used because the C library refuses to
    // touch the two real-time signals it reserves for itself (32 and 33), which may be ignored
    // too. An all-zero kernel `sigaction` is SIG_DFL, no flags, empty mask.
    let default_action = [0u64; 4];
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: rt_sigaction reads `size_of::<kernel sigaction>()` (at most 32 bytes) from a
        // live zeroed buffer of 32 bytes and writes nothing (old action pointer is NULL); the
        // sigset size is the kernel's 8 bytes. Errors are harmless and ignored.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                default_action.as_ptr(),
                ptr::null_mut::<u64>(),
                8usize,
            );
        }
    }

    // Its own session and process group, so signals and kills can target the whole job and
    // the process can have a controlling terminal of its own.
    if let Err(e) = rustix::process::setsid() {
        fail(p, Stage::Setsid, e);
    }

    match p.stdio {
        ChildStdio::Pty { slave } => {
            if let Err(e) = rustix::process::ioctl_tiocsctty(slave) {
                fail(p, Stage::ControllingTerminal, e);
            }
            for dup in [
                rustix::stdio::dup2_stdin::<&OwnedFd>,
                rustix::stdio::dup2_stdout::<&OwnedFd>,
                rustix::stdio::dup2_stderr::<&OwnedFd>,
            ] {
                if let Err(e) = dup(slave) {
                    fail(p, Stage::Stdio, e);
                }
            }
        }
        ChildStdio::Pipes {
            stdin,
            stdout,
            stderr,
        } => {
            // The sources are all above 2 (see [`above_stdio`]), so no dup2 overwrites
            // a source that is still needed, and dup2 clears close-on-exec on the targets.
            let steps = [
                rustix::stdio::dup2_stdin(stdin.as_fd()),
                rustix::stdio::dup2_stdout(stdout.as_fd()),
                rustix::stdio::dup2_stderr(stderr.as_fd()),
            ];
            for step in steps {
                if let Err(e) = step {
                    fail(p, Stage::Stdio, e);
                }
            }
        }
    }

    // Its own Landlock domain, nested in the sandbox's (before the ruleset's descriptor is
    // closed with the others below).
    if let Some(ruleset) = p.landlock_ruleset {
        // SAFETY: landlock_restrict_self takes a descriptor number and flags only; the
        // descriptor is the agent's ruleset, open until the agent exits.
        let rc = unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset, 0u32) };
        if rc != 0 {
            fail(p, Stage::Landlock, last_errno());
        }
    }

    // Close every other descriptor the child inherited from the agent (its sockets, other
    // processes' pipes and terminals) except the error pipe, which is close-on-exec.
    close_inherited(p);

    // The agent may run with oom_score_adj -1000 (set by the host) and children inherit it;
    // user processes must be killable by the OOM killer, so they get the configured value.
    // Done before dropping privileges: afterwards the file may no longer be writable.
    if let Some(value) = &p.oom_score_adj {
        if let Err(e) = write_oom_score_adj(value) {
            fail(p, Stage::OomScore, e);
        }
    }

    // Supplementary groups, then gid, then uid (the order that keeps the right to change them).
    if let Err(e) = rustix::thread::set_thread_groups(&p.groups) {
        if !p.tolerate_groups_failure {
            fail(p, Stage::Groups, e);
        }
    }
    if let Err(e) = rustix::thread::set_thread_gid(rustix::process::Gid::from_raw(p.plan.gid)) {
        fail(p, Stage::Gid, e);
    }
    if let Err(e) = rustix::thread::set_thread_uid(rustix::process::Uid::from_raw(p.plan.uid)) {
        fail(p, Stage::Uid, e);
    }

    // After switching user, so the directory is entered with the user's permissions.
    if let Err(e) = rustix::process::chdir(p.cwd.as_c_str()) {
        fail(p, Stage::Chdir, e);
    }

    // SAFETY: `empty_mask` is an initialised, empty `sigset_t`; this unblocks every signal.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &p.empty_mask, ptr::null_mut());
    }

    let mut saw_eacces = false;
    let mut last = Errno::NOENT;
    for (i, candidate) in p.plan.candidates.iter().enumerate() {
        // SAFETY: `candidate`, `argv` and `envp` are NUL-terminated strings / NULL-terminated
        // pointer arrays that live in memory prepared before fork.
        unsafe {
            libc::execve(candidate.as_ptr(), p.argv.as_ptr(), p.envp.as_ptr());
        }
        let errno = last_errno();
        match errno {
            Errno::NOEXEC => {
                // A script without `#!`: run it with the shell, as execvp does.
                // SAFETY: as above; `sh_argv[i]` is a NULL-terminated pointer array.
                unsafe {
                    libc::execve(SH.as_ptr(), p.sh_argv[i].as_ptr(), p.envp.as_ptr());
                }
                fail(p, Stage::Exec, Errno::NOEXEC);
            }
            Errno::ACCESS => {
                saw_eacces = true;
                last = errno;
            }
            Errno::NOENT | Errno::NOTDIR | Errno::STALE | Errno::NODEV | Errno::TIMEDOUT => {
                last = errno;
            }
            other => fail(p, Stage::Exec, other),
        }
    }
    if p.plan.candidates.is_empty() {
        fail(p, Stage::Exec, Errno::NOENT);
    }
    fail(
        p,
        Stage::Exec,
        if saw_eacces { Errno::ACCESS } else { last },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(program: &str) -> ExecPlan {
        ExecPlan {
            program: program.to_string(),
            candidates: vec![],
            argv: vec![],
            envp: vec![],
            cwd: "/work/dir".to_string(),
            uid: 1000,
            gid: 1000,
            groups: vec![],
            oom_score_adj: 0,
        }
    }

    #[test]
    fn exec_errors_map_like_a_shell() {
        let e = stage_error(&plan("nope"), Some(Stage::Exec), Errno::NOENT);
        assert_eq!(e.code, ErrorCode::CommandNotFound);
        assert_eq!(e.message, "nope: command not found");
        let e = stage_error(&plan("./nope"), Some(Stage::Exec), Errno::NOENT);
        assert_eq!(e.code, ErrorCode::CommandNotFound);
        assert_eq!(e.message, "./nope: no such file or directory");
        let e = stage_error(&plan("/etc/passwd"), Some(Stage::Exec), Errno::ACCESS);
        assert_eq!(e.code, ErrorCode::PermissionDenied);
        assert_eq!(e.message, "/etc/passwd: permission denied");
    }

    fn pipe() -> (OwnedFd, OwnedFd) {
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap()
    }

    #[test]
    fn report_wait_is_bounded_when_nobody_writes() {
        let (read, _write) = pipe();
        let started = Instant::now();
        let report = wait_for_report(&read, None, Duration::from_millis(200));
        let waited = started.elapsed();
        assert_eq!(report, StartReport::TimedOut);
        assert!(waited >= Duration::from_millis(200), "{waited:?}");
        assert!(waited < Duration::from_secs(2), "{waited:?}");
    }

    #[test]
    fn report_wait_sees_eof_and_reports() {
        let (read, write) = pipe();
        drop(write);
        assert_eq!(
            wait_for_report(&read, None, Duration::from_secs(5)),
            StartReport::Execed
        );
        let (read, write) = pipe();
        let mut msg = [0u8; 8];
        msg[..4].copy_from_slice(&(Stage::Chdir as i32).to_le_bytes());
        msg[4..].copy_from_slice(&Errno::NOENT.raw_os_error().to_le_bytes());
        rustix::io::write(&write, &msg).unwrap();
        assert_eq!(
            wait_for_report(&read, None, Duration::from_secs(5)),
            StartReport::Failed {
                stage: Stage::Chdir as i32,
                errno: Errno::NOENT.raw_os_error()
            }
        );
    }

    /// Forks a child that keeps the write end of a fresh error pipe open and runs `then` with
    /// it (async-signal-safe calls only); returns the child and the read end.
    fn fork_holding_pipe(then: fn(i32)) -> (Pid, OwnedFd) {
        let (read, write) = pipe();
        // SAFETY: the child only makes async-signal-safe calls (`then`, then `_exit`).
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            then(rustix::fd::AsRawFd::as_raw_fd(&write));
            // SAFETY: ends the forked child without running any Rust code of the parent.
            unsafe { libc::_exit(0) }
        }
        drop(write);
        (pid, read)
    }

    fn reaped(pid: Pid) -> bool {
        let pid = rustix::process::Pid::from_raw(pid).unwrap();
        matches!(
            rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::NOHANG),
            Err(Errno::CHILD)
        )
    }

    #[test]
    fn a_child_stopped_before_exec_is_killed_and_reaped_quickly() {
        let (pid, read) = fork_holding_pipe(|_| {
            // SAFETY: raise(2) is async-signal-safe.
            unsafe {
                libc::raise(libc::SIGSTOP);
            }
        });
        let started = Instant::now();
        let err = await_start(&plan("stopped"), pid, &read, Duration::from_secs(10)).unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(err.code, ErrorCode::Internal);
        assert_eq!(
            err.message,
            "stopped: the process was stopped before it could start"
        );
        assert!(reaped(pid), "the stopped child was not reaped");
    }

    #[test]
    fn a_child_that_never_execs_is_killed_at_the_limit() {
        let (pid, read) = fork_holding_pipe(|_| {
            // SAFETY: pause(2) is async-signal-safe; the child waits for the SIGKILL.
            unsafe {
                libc::pause();
            }
        });
        let started = Instant::now();
        let err = await_start(&plan("stuck"), pid, &read, Duration::from_millis(300)).unwrap_err();
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(300), "{waited:?}");
        assert!(waited < Duration::from_secs(3), "{waited:?}");
        assert_eq!(err.code, ErrorCode::Internal);
        assert!(
            err.message
                .starts_with("stuck: the process did not start within 0.3 s"),
            "{}",
            err.message
        );
        assert!(reaped(pid), "the stuck child was not reaped");
    }

    #[test]
    fn a_child_stopped_after_its_failure_report_is_reaped() {
        // The report arrives, then the child is stopped before it can `_exit`: the agent must
        // not wait for it forever either.
        let (pid, read) = fork_holding_pipe(|write_fd| {
            let mut msg = [0u8; 8];
            msg[..4].copy_from_slice(&(Stage::Exec as i32).to_le_bytes());
            msg[4..].copy_from_slice(&Errno::NOENT.raw_os_error().to_le_bytes());
            // SAFETY: write(2) and raise(2) are async-signal-safe; `msg` is a live buffer.
            unsafe {
                libc::write(write_fd, msg.as_ptr().cast(), msg.len());
                libc::raise(libc::SIGSTOP);
            }
        });
        let started = Instant::now();
        let err = await_start(&plan("nope"), pid, &read, Duration::from_secs(10)).unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(err.code, ErrorCode::CommandNotFound);
        assert_eq!(err.message, "nope: command not found");
        assert!(reaped(pid), "the failed child was not reaped");
    }

    #[test]
    fn chdir_errors_name_the_directory() {
        let e = stage_error(&plan("ls"), Some(Stage::Chdir), Errno::NOENT);
        assert_eq!(e.code, ErrorCode::NotFound);
        assert_eq!(e.message, "no such directory: /work/dir");
        let e = stage_error(&plan("ls"), Some(Stage::Uid), Errno::PERM);
        assert_eq!(e.code, ErrorCode::PermissionDenied);
        assert!(
            e.message.starts_with("cannot switch to uid 1000"),
            "{}",
            e.message
        );
    }
}
