//! Starting a process: `clone(CLONE_VM | CLONE_VFORK)` (or `fork`), then a short,
//! async-signal-safe setup in the child, then `execve`.
//!
//! Everything the child needs (argv, envp, candidate paths, the ids to switch to) is built
//! *before* the child starts, so the child never allocates or takes a lock: the agent may have
//! other threads (tokio's blocking pool) whose locks it must not touch. A close-on-exec pipe
//! reports the first failing step and its errno back to the parent; no report means `execve`
//! succeeded.
//!
//! The child normally shares the agent's memory until it execs, the way `posix_spawn` starts
//! processes, which spares copying and tearing down the agent's page tables on every exec (see
//! [`crate::vfork`] for what makes that sound). Where that is not safe (a host whose
//! `fs.suid_dumpable` is 1, an unsupported architecture) or not available, the agent forks.
//!
//! The wait for the child is bounded either way: the child runs as the sandbox's root until it
//! switches user, so a sandbox process can stop it (`SIGSTOP`) before it execs. The agent must
//! never wait for it indefinitely; a child that is stopped, or that neither execs nor fails
//! within [`START_TIMEOUT`], is killed and the exec fails (after a `fork`, the agent's own
//! wait on the pipe checks; during a vfork start, the watchdog thread of [`crate::vfork`]).
//!
//! Inside a sandbox every child also enters a Landlock domain of its own (nested in the
//! sandbox's) before `execve` — see [`set_exec_session_ruleset`]: the processes of one exec
//! session can trace their own descendants but not another session's processes, nor the agent.

use std::ffi::{c_char, CString};
use std::ptr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use openrun_protocol::{AgentError, ErrorCode, Pid};
use rustix::fd::{AsRawFd as _, BorrowedFd, OwnedFd};
use rustix::io::Errno;

use crate::errors::errno_text;
use crate::raw;

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

/// Pointer arrays and C strings the child uses, all allocated before the child starts.
struct Prepared {
    cwd: CString,
    argv: Vec<*const c_char>,
    envp: Vec<*const c_char>,
    /// For each candidate: `/bin/sh <candidate> argv[1..]`, the fallback for `ENOEXEC`
    /// (a script without `#!`), as `execvp` does it.
    sh_argv: Vec<Vec<*const c_char>>,
    groups: Vec<rustix::process::Gid>,
    /// `oom_score_adj` as the decimal text the kernel expects, when the child must write it
    /// itself (an agent that is not a sandbox's pid 1, as in tests).
    oom_score_adj: Option<Vec<u8>>,
}

/// The child's standard descriptors, as numbers (the parent closes its own copies while a
/// clone-based child may still read this).
#[derive(Debug, Clone, Copy)]
enum RawStdio {
    Pipes {
        stdin: i32,
        stdout: i32,
        stderr: i32,
    },
    Pty {
        slave: i32,
    },
}

/// Everything the child reads: plain values and borrows of memory that outlives it. Built
/// before the child starts and never changed while it runs.
struct ChildArgs<'a> {
    plan: &'a ExecPlan,
    cwd: &'a std::ffi::CStr,
    argv: *const *const c_char,
    envp: *const *const c_char,
    sh_argv: &'a [Vec<*const c_char>],
    groups: &'a [rustix::process::Gid],
    /// `setgroups` may be refused in a user namespace; that only matters when the process is
    /// meant to run as someone other than the agent.
    tolerate_groups_failure: bool,
    oom_score_adj: Option<&'a [u8]>,
    /// The write end of the error pipe (close-on-exec).
    err_pipe: i32,
    stdio: RawStdio,
    /// The exec-session Landlock ruleset to enter, if the agent has one.
    landlock_ruleset: Option<i32>,
    /// Highest descriptor to close one by one where `close_range` is missing.
    fd_limit: u32,
    /// Tests: the child stops itself before it execs.
    #[cfg(test)]
    stop_before_exec: bool,
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

/// Longest time a started child may take to exec (or to report why it could not). A child
/// stopped by a signal is killed at once; this bound is for one that is merely stuck (a busy,
/// memory-starved sandbox can be slow, so it is generous).
pub(crate) const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the wait for the child's report checks whether the child was stopped.
const STOP_CHECK_INTERVAL: Duration = crate::vfork::STOP_CHECK_INTERVAL;
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

/// Starts `plan` with `stdio`. Returns the child's pid once `execve` succeeded; otherwise
/// reaps the failed child and returns an error for the step that failed.
pub(crate) fn spawn(
    plan: &ExecPlan,
    stdio: ChildStdio,
    own_oom_score_adj: Option<&std::fs::File>,
) -> Result<Pid, AgentError> {
    spawn_with(plan, stdio, own_oom_score_adj, Options::default())
}

/// How [`spawn_with`] starts the child (tests choose).
#[derive(Debug, Clone, Copy, Default)]
struct Options {
    /// Never share the agent's memory (`fork`).
    force_fork: bool,
    #[cfg(test)]
    stop_before_exec: bool,
}

fn spawn_with(
    plan: &ExecPlan,
    stdio: ChildStdio,
    own_oom_score_adj: Option<&std::fs::File>,
    options: Options,
) -> Result<Pid, AgentError> {
    let cwd = CString::new(plan.cwd.as_str())
        .map_err(|_| AgentError::new(ErrorCode::InvalidArgument, "cwd contains a nul byte"))?;
    // Non-blocking: after a clone-based start the report is read once, without waiting (the
    // child wrote it before exiting, or exec'd); the child's single 8-byte write never blocks.
    let (err_read, err_write) = rustix::pipe::pipe_with(
        rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK,
    )
    .map_err(|e| crate::errors::internal("cannot create a pipe", errno_text(e)))?;
    let err_write = above_stdio(err_write)?;

    let prepared = Prepared {
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
        oom_score_adj: match own_oom_score_adj {
            // Set from the outside around the start (see below): nothing for the child to do.
            Some(_) => None,
            None => Some(plan.oom_score_adj.to_string().into_bytes()),
        },
    };
    let euid = rustix::process::geteuid().as_raw();
    let changes_ids = euid != plan.uid || rustix::process::getegid().as_raw() != plan.gid;
    let args = ChildArgs {
        plan,
        cwd: prepared.cwd.as_c_str(),
        argv: prepared.argv.as_ptr(),
        envp: prepared.envp.as_ptr(),
        sh_argv: &prepared.sh_argv,
        groups: &prepared.groups,
        tolerate_groups_failure: euid == plan.uid,
        oom_score_adj: prepared.oom_score_adj.as_deref(),
        err_pipe: err_write.as_raw_fd(),
        stdio: match &stdio {
            ChildStdio::Pipes {
                stdin,
                stdout,
                stderr,
            } => RawStdio::Pipes {
                stdin: stdin.as_raw_fd(),
                stdout: stdout.as_raw_fd(),
                stderr: stderr.as_raw_fd(),
            },
            ChildStdio::Pty { slave } => RawStdio::Pty {
                slave: slave.as_raw_fd(),
            },
        },
        landlock_ruleset: EXEC_SESSION_RULESET.get().map(|fd| fd.as_raw_fd()),
        fd_limit: rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(65536)
            .min(1 << 20) as u32,
        #[cfg(test)]
        stop_before_exec: options.stop_before_exec,
    };

    // Block every signal across the start so no handler of the agent (tokio's) runs in the
    // child before its dispositions are reset; the parent restores its mask right after.
    // SAFETY: zeroed `sigset_t` values are valid storage for `sigfillset`/`pthread_sigmask`.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: the pointers refer to live `sigset_t` values owned by this frame.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }

    // The child inherits the agent's OOM score when it starts: set the child's value on the
    // agent for the instant of the start, then put the agent's own back.
    let restore = own_oom_score_adj.and_then(|file| set_oom_score_adj(file, plan.oom_score_adj));
    let arg = ptr::addr_of!(args).cast_mut().cast::<std::ffi::c_void>();
    let alone = crate::vfork::begin_start();
    let cloned = if !options.force_fork && crate::vfork::usable(changes_ids) {
        // SAFETY: `child_entry` follows the rules of a memory-sharing child (raw and rustix
        // system calls only, on `args`, no allocation, locks or unwinding; it ends in
        // `execve` or `raw::exit`), and `args` with everything it borrows (`plan`,
        // `prepared`, the descriptors, which the parent closes only below) stays alive and
        // unchanged until `clone_vfork` returns, when the child has exec'd or exited.
        // Signals are blocked (above).
        unsafe { crate::vfork::clone_vfork(child_entry, arg, START_TIMEOUT, changes_ids, alone) }
    } else {
        None
    };
    let (pid, verdict, start_errno) = match cloned {
        Some(Ok(started)) => (started.pid, Some(started.verdict), None),
        Some(Err(e)) => (-1, None, Some(e)),
        None => {
            // SAFETY: the forked child only runs `child_main` (async-signal-safe system calls
            // on memory prepared above, ending in `execve` or `_exit`); it never returns into
            // Rust code that could touch locks or allocator state held by other threads at
            // the time of fork.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                child_main(&args);
            }
            let errno = (pid < 0).then(last_errno);
            (pid, None, errno)
        }
    };
    if let (Some(file), Some(previous)) = (own_oom_score_adj, restore) {
        if let Err(e) = rustix::io::pwrite(file, &previous, 0) {
            tracing::warn!(error = %e, "cannot restore the agent's oom_score_adj");
        }
    }
    // SAFETY: restores the mask saved above, from a live `sigset_t`.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, ptr::null_mut());
    }
    // The parent's copies of the child's ends must close, or EOF never arrives (the child
    // has its own copies; a clone-based child is done reading `args` by now).
    drop(err_write);
    drop(stdio);
    if let Some(errno) = start_errno {
        return Err(crate::errors::internal(
            "cannot start a process",
            errno_text(errno),
        ));
    }
    match verdict {
        // Started by `clone_vfork`: the child has exec'd, exited or been killed.
        Some(verdict) => {
            let report = match verdict {
                Some(crate::vfork::Verdict::Stopped) => StartReport::Stopped,
                Some(crate::vfork::Verdict::TimedOut) => StartReport::TimedOut,
                None => read_report(&err_read),
            };
            finish_start(plan, pid, report, START_TIMEOUT)
        }
        None => await_start(plan, pid, &err_read, START_TIMEOUT),
    }
}

/// Reads the report of a child that has already exec'd or exited: its failure report if it
/// wrote one, else [`StartReport::Execed`]. Never waits.
fn read_report(err_read: &OwnedFd) -> StartReport {
    let mut report = [0u8; 8];
    loop {
        match rustix::io::read(err_read, &mut report) {
            // The child writes its 8 bytes with one write (atomic on a pipe).
            Ok(8) => return decode_report(&report),
            Err(Errno::INTR) => continue,
            // EOF, nothing written yet (the child exec'd: the pipe is close-on-exec, but the
            // parent may run again before the exec closes it), or an unreadable pipe.
            _ => return StartReport::Execed,
        }
    }
}

fn decode_report(report: &[u8; 8]) -> StartReport {
    StartReport::Failed {
        stage: i32::from_le_bytes([report[0], report[1], report[2], report[3]]),
        errno: i32::from_le_bytes([report[4], report[5], report[6], report[7]]),
    }
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
    decode_report(&report)
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
    finish_start(plan, pid, report, limit)
}

/// Turns the child's start report into the result: its pid once it exec'd; otherwise the
/// child is killed and reaped (bounded) and the error says why.
fn finish_start(
    plan: &ExecPlan,
    pid: Pid,
    report: StartReport,
    limit: Duration,
) -> Result<Pid, AgentError> {
    let child = rustix::process::Pid::from_raw(pid);
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
fn fail(p: &ChildArgs<'_>, stage: Stage, errno: Errno) -> ! {
    let mut msg = [0u8; 8];
    let (stage_bytes, errno_bytes) = msg.split_at_mut(4);
    stage_bytes.copy_from_slice(&(stage as i32).to_le_bytes());
    errno_bytes.copy_from_slice(&errno.raw_os_error().to_le_bytes());
    // SAFETY: the error pipe's write end stays open in the child until exec or exit.
    let pipe = unsafe { BorrowedFd::borrow_raw(p.err_pipe) };
    let _ = rustix::io::write(pipe, &msg);
    // Ends the child at once: no atexit handlers or destructors, which belong to the agent.
    raw::exit(127)
}

fn last_errno() -> Errno {
    Errno::from_raw_os_error(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
}

/// Closes every descriptor above stderr except the error pipe. Async-signal-safe.
fn close_inherited(p: &ChildArgs<'_>) {
    raw::close_all_except(&mut [p.err_pipe], p.fd_limit);
}

/// Writes the agent's own `oom_score_adj` (`value`) and returns the previous contents, or
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
/// dumpable and its `/proc/self` is writable); a child never becomes dumpable for this. (A
/// child that shares the agent's memory is a vfork child, whose score the kernel keeps apart
/// from the agent's.)
fn write_oom_score_adj(value: &[u8]) -> Result<(), Errno> {
    let fd = rustix::fs::open(
        c"/proc/self/oom_score_adj",
        rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    rustix::io::write(&fd, value).map(|_| ())
}

/// Entry point of a child started by [`crate::vfork::clone_vfork`].
extern "C" fn child_entry(arg: *mut std::ffi::c_void) -> std::ffi::c_int {
    // SAFETY: `arg` is the `ChildArgs` that `spawn_with` passed, alive and unchanged until
    // the child has exec'd or exited.
    let args = unsafe { &*arg.cast_const().cast::<ChildArgs<'_>>() };
    child_main(args)
}

/// The child between its start (`clone` or `fork`) and `execve`. It may share the agent's
/// memory (see [`crate::vfork`]): only system calls that never touch `errno` ([`raw`] and
/// rustix's), no allocation, no locks, nothing that can panic.
fn child_main(p: &ChildArgs<'_>) -> ! {
    // Every signal is still blocked (see `spawn_with`). Reset all dispositions to their
    // defaults: handlers must never run here (they would run on the agent's memory), and
    // ignored ones (SIGPIPE is ignored by the Rust runtime, others may be inherited from
    // whoever started the agent) would be inherited by the new program. Errors (SIGKILL,
    // SIGSTOP) are harmless and ignored.
    for sig in 1..=64 {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            let _ = raw::default_disposition(sig);
        }
    }

    // Its own session and process group, so signals and kills can target the whole job and
    // the process can have a controlling terminal of its own.
    if let Err(e) = rustix::process::setsid() {
        fail(p, Stage::Setsid, e);
    }

    match p.stdio {
        RawStdio::Pty { slave } => {
            // SAFETY: the slave descriptor stays open in the child until it is dup'ed below.
            let slave = unsafe { BorrowedFd::borrow_raw(slave) };
            if let Err(e) = rustix::process::ioctl_tiocsctty(slave) {
                fail(p, Stage::ControllingTerminal, e);
            }
            for dup in [
                rustix::stdio::dup2_stdin::<BorrowedFd<'_>>,
                rustix::stdio::dup2_stdout::<BorrowedFd<'_>>,
                rustix::stdio::dup2_stderr::<BorrowedFd<'_>>,
            ] {
                if let Err(e) = dup(slave) {
                    fail(p, Stage::Stdio, e);
                }
            }
        }
        RawStdio::Pipes {
            stdin,
            stdout,
            stderr,
        } => {
            // The sources are all above 2 (see [`above_stdio`]), so no dup2 overwrites
            // a source that is still needed, and dup2 clears close-on-exec on the targets.
            // SAFETY: the three descriptors stay open in the child until closed below.
            let (stdin, stdout, stderr) = unsafe {
                (
                    BorrowedFd::borrow_raw(stdin),
                    BorrowedFd::borrow_raw(stdout),
                    BorrowedFd::borrow_raw(stderr),
                )
            };
            let steps = [
                rustix::stdio::dup2_stdin(stdin),
                rustix::stdio::dup2_stdout(stdout),
                rustix::stdio::dup2_stderr(stderr),
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
        if let Err(e) = raw::landlock_restrict_self(ruleset) {
            fail(p, Stage::Landlock, e);
        }
    }

    // Close every other descriptor the child inherited from the agent (its sockets, other
    // processes' pipes and terminals) except the error pipe, which is close-on-exec.
    close_inherited(p);

    // The agent may run with oom_score_adj -1000 (set by the host) and children inherit it;
    // user processes must be killable by the OOM killer, so they get the configured value.
    // Done before dropping privileges: afterwards the file may no longer be writable.
    if let Some(value) = p.oom_score_adj {
        if let Err(e) = write_oom_score_adj(value) {
            fail(p, Stage::OomScore, e);
        }
    }

    // Supplementary groups, then gid, then uid (the order that keeps the right to change them).
    if let Err(e) = rustix::thread::set_thread_groups(p.groups) {
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
    if let Err(e) = rustix::process::chdir(p.cwd) {
        fail(p, Stage::Chdir, e);
    }

    #[cfg(test)]
    if p.stop_before_exec {
        raw::stop_self();
    }

    // Unblocks every signal (all dispositions are defaults now).
    let _ = raw::unblock_all_signals();

    let mut saw_eacces = false;
    let mut last = Errno::NOENT;
    for (candidate, sh_argv) in p.plan.candidates.iter().zip(p.sh_argv) {
        // SAFETY: `candidate`, `argv` and `envp` are NUL-terminated strings / NULL-terminated
        // pointer arrays that live in memory prepared before the start.
        let errno = unsafe { raw::execve(candidate.as_ptr(), p.argv, p.envp) };
        match errno {
            Errno::NOEXEC => {
                // A script without `#!`: run it with the shell, as execvp does.
                // SAFETY: as above; `sh_argv` is a NULL-terminated pointer array.
                let _ = unsafe { raw::execve(SH.as_ptr(), sh_argv.as_ptr(), p.envp) };
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

    /// A plan for `program` as the current user, with its output going nowhere.
    fn runnable(program: &str, candidates: &[&str]) -> (ExecPlan, ChildStdio) {
        let plan = ExecPlan {
            program: program.to_string(),
            candidates: candidates
                .iter()
                .map(|c| CString::new(*c).unwrap())
                .collect(),
            argv: vec![CString::new(program).unwrap()],
            envp: vec![],
            cwd: "/".to_string(),
            uid: rustix::process::geteuid().as_raw(),
            gid: rustix::process::getegid().as_raw(),
            groups: vec![],
            oom_score_adj: 0,
        };
        let null = || {
            let fd = rustix::fs::open(
                c"/dev/null",
                rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
            .unwrap();
            above_stdio(fd).unwrap()
        };
        let stdio = ChildStdio::Pipes {
            stdin: null(),
            stdout: null(),
            stderr: null(),
        };
        (plan, stdio)
    }

    fn exit_code(pid: Pid) -> i32 {
        let pid = rustix::process::Pid::from_raw(pid).unwrap();
        let (_, status) =
            rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty())
                .unwrap()
                .unwrap();
        status.exit_status().unwrap_or(-1)
    }

    #[test]
    fn clone_and_fork_starts_run_the_program_and_search_candidates() {
        for force_fork in [false, true] {
            let options = Options {
                force_fork,
                ..Options::default()
            };
            // The first candidates do not exist, as in a PATH search.
            let (plan, stdio) = runnable("true", &["/nonexistent/true", "/bin/true"]);
            let pid = spawn_with(&plan, stdio, None, options).unwrap();
            assert_eq!(exit_code(pid), 0, "force_fork {force_fork}");
            let (plan, stdio) = runnable("false", &["/bin/false"]);
            let pid = spawn_with(&plan, stdio, None, options).unwrap();
            assert_eq!(exit_code(pid), 1, "force_fork {force_fork}");
            // A failed setup step is reported, and the child reaped.
            let (plan, stdio) = runnable("nope", &["/nonexistent/nope"]);
            let err = spawn_with(&plan, stdio, None, options).unwrap_err();
            assert_eq!(err.code, ErrorCode::CommandNotFound, "{err:?}");
            let (mut plan, stdio) = runnable("true", &["/bin/true"]);
            plan.cwd = "/nonexistent-dir".to_string();
            let err = spawn_with(&plan, stdio, None, options).unwrap_err();
            assert_eq!(err.code, ErrorCode::NotFound, "{err:?}");
        }
    }

    #[test]
    fn a_clone_started_child_stopped_before_exec_is_killed_and_reaped() {
        for force_fork in [false, true] {
            let options = Options {
                force_fork,
                stop_before_exec: true,
            };
            let (plan, stdio) = runnable("stopped", &["/bin/true"]);
            let started = Instant::now();
            let err = spawn_with(&plan, stdio, None, options).unwrap_err();
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
        }
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
