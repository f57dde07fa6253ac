//! The cleaner of [`Runtime::create_with_cleaner`]: a background process that tears a sandbox
//! down once its agent has exited, so that its creator (`openrun run`) can exit without
//! waiting for the teardown.
//!
//! # It shares its creator's memory
//!
//! A forked cleaner cost the creator a copy of its page tables, a write fault on every page
//! either process touched afterwards, and a second teardown of a whole address space when it
//! exited: about 0.4 ms of a cold `openrun run -- true` (BENCHMARKS.md). The cleaner is a
//! `CLONE_VM` child instead, with a stack of its own, and in two phases:
//!
//! - While the creator lives, the cleaner runs alongside it with the creator's thread pointer:
//!   it makes only raw or rustix system calls on the [`Job`] prepared before the clone (no
//!   allocation, no lock, no `errno`, no thread-local; see [`openrun_agent::raw`]), with every
//!   signal blocked (a handler would run on the creator's state). It leaves the creator's
//!   session and stdio, closes every descriptor but its three, and waits for the commit (a
//!   create that fails closes the pipe without one: the cleaner then exits and the failed
//!   create cleans up after itself), then for the creator's end, when it kills the agent
//!   (the sandbox ends with its creator), and the agent's.
//! - Once the creator has exited, the memory is the cleaner's alone. If the creator ended
//!   through [`exit_process`] as a single-threaded process, nothing was halfway through the
//!   allocator or a lock: the cleaner runs the teardown ([`Runtime::destroy`]) in that memory.
//!   Otherwise (the creator was killed, or had threads that its exit stopped anywhere, or
//!   outlives its agent by more than [`CREATOR_GRACE`]) it trusts nothing in it and executes
//!   `REMOVER --data-dir DIR __teardown ID` (the `openrun` binary), which removes what the
//!   dead sandbox left, by its exact id. Only one cleaner of a creator takes the memory over;
//!   any other executes the remover too.
//!
//! What the kernel changes in that memory at the creator's exit: the thread id the C library
//! keeps for the creator's thread (its `set_tid_address` word) becomes 0. The teardown takes
//! no lock that records its owner's thread id (the standard library's locks are futexes of
//! their own), so the cleaner does not care.
//!
//! A `CLONE_VM` child also ties the cleaner's fate to the creator's in two rare cases: the
//! OOM killer kills every process sharing the victim's memory, and kernels before 5.16 kill
//! them all when one dumps core. The next `list` reclaims what such a sandbox left. And the
//! kernel treats the creator's memory as shared (see `openrun_agent`'s vfork module): writes
//! of the *creator's* `oom_score_adj` get slower and reach the cleaner too. The creator never
//! writes its own; the agent, forked before, has a memory of its own.

use std::ffi::{c_char, c_int, c_void, CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use openrun_agent::raw;
use rustix::fd::{AsRawFd, BorrowedFd, OwnedFd};

use crate::cgroup::Cgroup;
use crate::sandbox::Runtime;
use crate::state::SandboxPaths;
use crate::sys;

/// Usable stack of the cleaner: the teardown runs ordinary code (record parsing, cgroup and
/// file removal). Pages are only backed once touched.
const STACK_SIZE: usize = 2 << 20;
/// Inaccessible pages below the stack, so an overflow faults.
const GUARD_SIZE: usize = 64 << 10;
/// How long the creator may outlive its sandbox's agent before the cleaner stops waiting for
/// its memory and runs the remover (`openrun run` exits a moment after the agent).
pub(crate) const CREATOR_GRACE: Duration = Duration::from_secs(1);

/// Whether this process started a cleaner (only then does [`exit_process`] count threads).
static STARTED: AtomicBool = AtomicBool::new(false);
/// Set by [`exit_process`] in a single-threaded creator: its memory is consistent.
static HANDED_OVER: AtomicBool = AtomicBool::new(false);
/// Taken by the one cleaner that tears down in the creator's memory.
static MEMORY_TAKEN: AtomicBool = AtomicBool::new(false);

/// Ends this process with `code`. When [`Runtime::create_with_cleaner`] started a cleaner,
/// it flushes stdout and ends at once (no C library exit handlers, no thread-local
/// destructors); if this process is then single-threaded, the cleaner tears the sandbox down
/// in this process's memory, without starting a program. Call it holding no lock and no
/// borrow (a cleaner would wait forever for a lock of a process that is gone). Without a
/// cleaner it is [`std::process::exit`].
pub fn exit_process(code: i32) -> ! {
    if !STARTED.load(Ordering::Relaxed) {
        std::process::exit(code);
    }
    let _ = std::io::Write::flush(&mut std::io::stdout());
    if crate::sandbox::ensure_single_threaded().is_ok() {
        HANDED_OVER.store(true, Ordering::Release);
    }
    sys::exit_now(code)
}

/// What the cleaner needs, made before the clone and never freed: the creator leaks it, the
/// cleaner reads it until it exits.
struct Job {
    /// The teardown's runtime (a copy: the creator's may be gone).
    runtime: Runtime,
    id: String,
    paths: SandboxPaths,
    cgroup: Option<Cgroup>,
    agent: OwnedFd,
    creator: OwnedFd,
    /// Read end of the commit pipe: one byte once the sandbox is made.
    commit: OwnedFd,
    /// `/dev/null`, for the cleaner's stdio.
    null: OwnedFd,
    /// The open-files limit: where closing one by one stops (kernels before 5.9).
    fd_limit: u32,
    /// The remover's path, arguments (`argv` points into them) and environment.
    remover: CString,
    _args: Vec<CString>,
    argv: Vec<*const c_char>,
    envp: [*const c_char; 1],
}

/// Starts the cleaner of sandbox `id`, whose agent is behind `agent`. Returns the write end of
/// its commit pipe (see [`Runtime::create_with_cleaner`]), or `None` when nothing started.
/// The caller must be single-threaded (see [`Runtime::create_with_cleaner`]).
pub(crate) fn start(
    runtime: &Runtime,
    id: &str,
    paths: &SandboxPaths,
    cgroup: Option<&Cgroup>,
    agent: BorrowedFd<'_>,
    remover: &Path,
) -> Option<OwnedFd> {
    let (commit_read, commit_write) =
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).ok()?;
    let creator = rustix::process::pidfd_open(
        rustix::process::getpid(),
        rustix::process::PidfdFlags::empty(),
    )
    .ok()?;
    let null = rustix::fs::open(
        "/dev/null",
        rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .ok()?;
    let args = remover_args(remover, runtime.data_dir(), id)?;
    let mut argv: Vec<*const c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(ptr::null());
    let stack = raw::Stack::new(STACK_SIZE, GUARD_SIZE).ok()?;
    let job = Box::new(Job {
        runtime: runtime.copy_for_cleaner(),
        id: id.to_string(),
        paths: paths.clone(),
        cgroup: cgroup.cloned(),
        agent: above_stdio(agent.try_clone_to_owned().ok()?)?,
        creator: above_stdio(creator)?,
        commit: above_stdio(commit_read)?,
        null,
        fd_limit: rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .map_or(1 << 20, |limit| limit.min(1 << 20) as u32),
        remover: CString::new(remover.as_os_str().as_bytes()).ok()?,
        _args: args,
        argv,
        envp: [ptr::null()],
    });
    let keep = [
        job.agent.as_raw_fd(),
        job.creator.as_raw_fd(),
        job.commit.as_raw_fd(),
        job.null.as_raw_fd(),
    ];
    // The child starts with every signal blocked (the kernel's whole set: the C library's
    // wrapper would leave two of them out).
    let old_mask = raw::set_signal_mask(u64::MAX).ok()?;
    let job = Box::into_raw(job);
    // SAFETY: `entry` follows the rules of the module docs while this process lives; `job`
    // is leaked (alive and unchanged until the child exits) and the stack is the child's
    // alone (never unmapped). No CLONE_SETTLS: the child keeps this thread's pointer, which is
    // why it touches no thread-local before this process has exited.
    let pid = unsafe {
        libc::clone(
            entry,
            stack.top(),
            libc::CLONE_VM | libc::SIGCHLD,
            job.cast(),
        )
    };
    let _ = raw::set_signal_mask(old_mask);
    // From here the stack is the child's (a `Stack` is never unmapped).
    if pid < 0 {
        // SAFETY: no child exists to use the job: this is its only owner.
        drop(unsafe { Box::from_raw(job) });
        return None;
    }
    STARTED.store(true, Ordering::Relaxed);
    // The job's descriptors are the child's copies; ours would stay open until we exit.
    for fd in keep {
        // SAFETY: these numbers belong to the leaked job, which this process never uses (nor
        // drops) again.
        unsafe {
            libc::close(fd);
        }
    }
    Some(commit_write)
}

/// `descriptor` moved above stdin, stdout and stderr (a creator started with one of those
/// closed could have been given its number), which the cleaner replaces.
fn above_stdio(descriptor: OwnedFd) -> Option<OwnedFd> {
    if descriptor.as_raw_fd() > 2 {
        return Some(descriptor);
    }
    rustix::io::fcntl_dupfd_cloexec(&descriptor, 3).ok()
}

/// `REMOVER --data-dir DIR __teardown ID`, or `None` if a part holds a NUL byte.
fn remover_args(remover: &Path, data_dir: &Path, id: &str) -> Option<Vec<CString>> {
    [
        remover.as_os_str(),
        OsStr::new("--data-dir"),
        data_dir.as_os_str(),
        OsStr::new("__teardown"),
        OsStr::new(id),
    ]
    .iter()
    .map(|part| CString::new(part.as_bytes()).ok())
    .collect()
}

/// The cleaner (see the module docs).
extern "C" fn entry(arg: *mut c_void) -> c_int {
    // SAFETY: `start` leaked the job for this process, which only reads it.
    let job = unsafe { &*(arg as *const Job) };
    // Out of the creator's session and off its stdio, so neither a terminal's Ctrl-C nor a
    // reader waiting for EOF on the creator's output depends on this process.
    let _ = rustix::process::setsid();
    let _ = rustix::stdio::dup2_stdin(&job.null);
    let _ = rustix::stdio::dup2_stdout(&job.null);
    let _ = rustix::stdio::dup2_stderr(&job.null);
    // Every other descriptor closed: the control stream (whose close ends the sandbox) and
    // the commit pipe's write end among them.
    raw::close_all_except(
        &mut [
            job.agent.as_raw_fd(),
            job.creator.as_raw_fd(),
            job.commit.as_raw_fd(),
        ],
        job.fd_limit,
    );
    if !committed(&job.commit) {
        raw::exit(0);
    }
    let creator_gone = match wait_for_ends(&job.agent, &job.creator) {
        Some(gone) => gone,
        // Cannot wait: what is left goes to the next `list` rather than a teardown of a
        // sandbox that may still be in use.
        None => raw::exit(1),
    };
    // From here no handler of the creator's runs (this memory may not be trusted) and the
    // remover does not start with every signal blocked. (SIGPIPE keeps its disposition:
    // ignored, by the standard library.)
    for sig in (1..=64).filter(|&sig| sig != libc::SIGPIPE) {
        let _ = raw::default_disposition(sig);
    }
    let _ = raw::unblock_all_signals();
    // The creator is gone: only other cleaners of it can share this memory, and only the
    // first here takes it over.
    if creator_gone
        && HANDED_OVER.load(Ordering::Acquire)
        && !MEMORY_TAKEN.swap(true, Ordering::AcqRel)
    {
        let code = std::panic::catch_unwind(|| {
            let Ok(agent) = job.agent.try_clone() else {
                return 1;
            };
            job.runtime
                .destroy_created(&job.id, &job.paths, job.cgroup.as_ref(), agent)
        });
        raw::exit(code.unwrap_or(70));
    }
    // SAFETY: the path and NULL-terminated arrays of the job, alive until the exec.
    unsafe {
        raw::execve(job.remover.as_ptr(), job.argv.as_ptr(), job.envp.as_ptr());
    }
    raw::exit(127)
}

/// Whether the commit byte arrived (`false` on EOF: the create failed or its process died).
fn committed(pipe: &OwnedFd) -> bool {
    let mut byte = [0u8; 1];
    loop {
        match rustix::io::read(pipe, &mut byte) {
            Ok(n) => return n == 1,
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => return false,
        }
    }
}

/// Waits until the agent has exited, and the creator too or for [`CREATOR_GRACE`] more.
/// Returns whether the creator is gone, `None` when it cannot wait.
fn wait_for_ends(agent: &OwnedFd, creator: &OwnedFd) -> Option<bool> {
    let mut agent_gone = false;
    loop {
        let mut fds = [
            rustix::event::PollFd::new(creator, rustix::event::PollFlags::IN),
            rustix::event::PollFd::new(agent, rustix::event::PollFlags::IN),
        ];
        let waiting = if agent_gone {
            &mut fds[..1]
        } else {
            &mut fds[..]
        };
        let grace = rustix::event::Timespec {
            tv_sec: CREATOR_GRACE.as_secs() as _,
            tv_nsec: CREATOR_GRACE.subsec_nanos() as _,
        };
        match rustix::event::poll(waiting, agent_gone.then_some(&grace)) {
            // The grace is over and the creator lives.
            Ok(0) if agent_gone => return Some(false),
            Ok(_) => {
                let creator_gone = !fds[0].revents().is_empty();
                agent_gone |= !fds[1].revents().is_empty();
                if creator_gone && agent_gone {
                    return Some(true);
                }
                if creator_gone {
                    // The sandbox ends with its creator, which leaves killing its agent (pid
                    // 1: every process of the sandbox dies with it) to us, so that the
                    // agent's exit does not hold the CPU before the creator's. Then no limit:
                    // unable to wait, the teardown kills and waits (bounded) itself.
                    let _ =
                        rustix::process::pidfd_send_signal(agent, rustix::process::Signal::KILL);
                    wait_for_end(agent);
                    return Some(true);
                }
            }
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => return None,
        }
    }
}

/// Waits, without a deadline, until the process behind `pidfd` has exited (not reaping it).
/// `false` when it cannot wait.
fn wait_for_end(pidfd: &OwnedFd) -> bool {
    loop {
        let mut fds = [rustix::event::PollFd::new(
            pidfd,
            rustix::event::PollFlags::IN,
        )];
        match rustix::event::poll(&mut fds, None) {
            Ok(n) if n > 0 => return true,
            Ok(_) | Err(rustix::io::Errno::INTR) => continue,
            Err(_) => return false,
        }
    }
}
