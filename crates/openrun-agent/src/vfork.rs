//! Starting a process with `clone(CLONE_VM | CLONE_VFORK)` instead of `fork`.
//!
//! `fork` copies the agent's page tables and marks every private page copy-on-write; the child
//! then tears that copy down again in `execve`, and the agent takes a write fault on each page
//! it touches afterwards. A child that shares the agent's memory (`CLONE_VM`) skips all of it,
//! which is how the C library's `posix_spawn` starts processes.
//!
//! # Why `CLONE_VFORK` too
//!
//! A `CLONE_VM` child that runs *alongside* the agent would make the kernel treat the two as
//! one memory-sharing group (`MMF_MULTIPROCESS`, set for good on the agent's memory): every
//! later write of the agent's `oom_score_adj` would also go to the child — undoing the score
//! the child is meant to keep — and would scan every process of the host under a global mutex
//! (measured: 67 µs instead of 4 µs per write with 1,100 processes). With `CLONE_VFORK` the
//! kernel does neither, never picks the child for the OOM killer while it shares memory
//! (`in_vfork`), and the agent's thread is suspended until the child has exec'd or exited, so
//! nothing the child reads can change under it.
//!
//! # The wait stays bounded
//!
//! The suspended thread cannot time out by itself, and the child runs as the sandbox's root
//! until it switches user: a sandbox process could stop it (`SIGSTOP`) before it execs. A
//! watchdog thread therefore watches every such start: a timer (a `timerfd`, armed before the
//! `clone` and disarmed after it, so a quick start costs two system calls and no wake-up)
//! wakes it every [`STOP_CHECK_INTERVAL`] while a start is in progress; it kills a child that
//! is stopped, or that has not exec'd within the start limit, and the agent reports why. The
//! child's pid reaches it through `CLONE_PARENT_SETTID`, which the kernel writes before the
//! child runs; it is only signalled while the start is marked active, and only the agent's own
//! thread reaps (after clearing that mark), so the pid cannot have been reused.
//!
//! One start goes unwatched: the first of an agent that is pid 1 of its pid namespace (see
//! [`begin_start`]). No other process exists in the namespace then — the agent has started
//! none, and every process of the sandbox descends from it — so nothing of the sandbox can
//! stop the child. (The sandbox's network helper, when it has one, runs as the sandbox's root
//! outside the namespace, but has carried no traffic yet: no process existed to send any, and
//! it forwards no inbound ports.)
//! That start is `openrun run`'s command, which then does not wait for the watchdog thread to
//! be made; an agent that keeps serving makes the thread a little later ([`prepare`]), and a
//! later start that finds none makes it first.
//!
//! # What the child may do
//!
//! The child runs on its own stack (mapped once, with a guard page) but in the agent's memory
//! and with the agent's thread pointer: it must not allocate, take locks, unwind, or call
//! anything that sets `errno` (the agent's thread-local). It uses [`crate::raw`] system calls and
//! rustix's (which return errors and never touch `errno`) on data prepared before the `clone`.
//! Signals are blocked across the `clone`; the child has its own copy of the handler table
//! (no `CLONE_SIGHAND`) and resets every disposition before unblocking, so no handler of the
//! agent ever runs on its stack. Descriptors (no `CLONE_FILES`), working directory
//! (no `CLONE_FS`), credentials, Landlock domain, seccomp filter and session are per process,
//! so the child's setup changes nothing of the agent's. Two per-memory flags remain:
//! - dumpability: switching uid or gid resets it to `fs.suid_dumpable` (`commit_creds`), and
//!   the memory is the agent's. 0 and 2 both keep the agent's `/proc` files and `ptrace`
//!   closed to the sandbox; 1 would open them, so [`usable`] refuses this path then (the agent
//!   forks as before), and the agent's own setting is put back after such a start;
//! - the OOM score: see above.

use std::ffi::{c_int, c_void};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use rustix::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use rustix::io::Errno;

use crate::raw;

/// How often the watchdog checks a start in progress.
pub(crate) const STOP_CHECK_INTERVAL: Duration = Duration::from_millis(20);

/// Usable stack of the child: its setup is a few small frames (even unoptimised); pages are
/// only backed once touched.
const STACK_SIZE: usize = 256 << 10;
/// An unmapped-access guard below the stack, so an overflow faults instead of writing into
/// whatever lies below.
const GUARD_SIZE: usize = 64 << 10;

/// Why the watchdog killed a child before it exec'd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// It was stopped by a signal.
    Stopped,
    /// It did not exec within the limit.
    TimedOut,
}

/// The state of the start in progress, shared with the watchdog.
#[derive(Debug)]
struct Watch {
    active: bool,
    started: Instant,
    limit: Duration,
    verdict: Option<Verdict>,
}

struct Watchdog {
    /// Armed while a start is in progress; the watchdog thread blocks reading it.
    timer: OwnedFd,
    /// The child's pid, stored by the kernel (`CLONE_PARENT_SETTID`) before the child runs.
    child: AtomicI32,
    watch: Mutex<Watch>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks; a poisoned one is still consistent.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Watchdog {
    fn arm(&self, after: Duration) -> Result<(), Errno> {
        self.set_timer(libc::timespec {
            tv_sec: after.as_secs() as libc::time_t,
            tv_nsec: after.subsec_nanos().into(),
        })
    }

    fn disarm(&self) {
        let _ = self.set_timer(libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        });
    }

    fn set_timer(&self, value: libc::timespec) -> Result<(), Errno> {
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: value,
        };
        // SAFETY: the timer descriptor is open for the process's life; the kernel reads the
        // new setting from a live value and writes no old one (NULL).
        let rc =
            unsafe { libc::timerfd_settime(self.timer.as_raw_fd(), 0, &spec, ptr::null_mut()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(last_errno())
        }
    }

    /// The watchdog thread: wakes when the timer expires, checks the start in progress.
    fn run(&self) {
        loop {
            let mut expirations = [0u8; 8];
            match rustix::io::read(&self.timer, &mut expirations) {
                Ok(_) | Err(Errno::INTR) | Err(Errno::AGAIN) => {}
                Err(e) => {
                    // Cannot happen with a valid timerfd; do not spin if it does.
                    tracing::warn!(error = %e, "exec watchdog: reading its timer failed");
                    std::thread::sleep(STOP_CHECK_INTERVAL);
                }
            }
            let mut watch = lock(&self.watch);
            if !watch.active || watch.verdict.is_some() {
                continue;
            }
            let pid = self.child.load(Ordering::Acquire);
            if let Some(child) = rustix::process::Pid::from_raw(pid).filter(|_| pid > 0) {
                let verdict = if is_stopped(child) {
                    Some(Verdict::Stopped)
                } else if watch.started.elapsed() >= watch.limit {
                    Some(Verdict::TimedOut)
                } else {
                    None
                };
                if let Some(verdict) = verdict {
                    // The start is still marked active under this lock, so the agent's thread
                    // is still inside `clone` (or about to clear the mark): the child is not
                    // reaped and its pid not reused.
                    let _ = rustix::process::kill_process(child, rustix::process::Signal::KILL);
                    watch.verdict = Some(verdict);
                    continue;
                }
            }
            if let Err(e) = self.arm(STOP_CHECK_INTERVAL) {
                tracing::warn!(error = %e, "exec watchdog: cannot re-arm its timer");
            }
        }
    }
}

fn last_errno() -> Errno {
    Errno::from_raw_os_error(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
}

/// Whether `child` (a child of this process) is stopped by a signal.
pub(crate) fn is_stopped(child: rustix::process::Pid) -> bool {
    let flags = rustix::process::WaitIdOptions::STOPPED
        | rustix::process::WaitIdOptions::NOHANG
        | rustix::process::WaitIdOptions::NOWAIT;
    matches!(
        rustix::process::waitid(rustix::process::WaitId::Pid(child), flags),
        Ok(Some(status)) if status.stopped()
    )
}

struct Spawner {
    stack: Mutex<raw::Stack>,
    /// Made by the first start that needs it (or by [`prepare`]).
    watchdog: OnceLock<&'static Watchdog>,
}

static SPAWNER: OnceLock<Option<Spawner>> = OnceLock::new();

fn spawner() -> Option<&'static Spawner> {
    SPAWNER
        .get_or_init(|| match Spawner::new() {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot set up clone-based process starts; forking");
                None
            }
        })
        .as_ref()
}

/// Sets up clone-based starts ahead of the first one (see [`spawner`]), the watchdog thread
/// included; later calls do nothing.
pub(crate) fn prepare() {
    if cfg!(any(target_arch = "x86_64", target_arch = "aarch64")) {
        let _ = spawner().map(Spawner::watchdog);
    }
}

/// Set once this agent has started a process, either way.
static STARTED_ONE: AtomicBool = AtomicBool::new(false);

/// Records that a process is being started (call it before every start, whichever way); returns
/// whether this is the first start of an agent that is pid 1: then no other process exists in
/// its pid namespace, and [`clone_vfork`] may go without the watchdog.
pub(crate) fn begin_start() -> bool {
    !STARTED_ONE.swap(true, Ordering::AcqRel) && rustix::process::getpid().is_init()
}

impl Spawner {
    fn new() -> std::io::Result<Self> {
        Ok(Self {
            stack: Mutex::new(raw::Stack::new(STACK_SIZE, GUARD_SIZE)?),
            watchdog: OnceLock::new(),
        })
    }

    /// The watchdog, made (its thread started) on first use. `None` when its thread cannot
    /// be started now (e.g. the sandbox is at its pids limit); the next call tries again.
    fn watchdog(&self) -> Option<&'static Watchdog> {
        if let Some(watchdog) = self.watchdog.get() {
            return Some(watchdog);
        }
        match Watchdog::start() {
            // Only the agent's own thread starts processes: nothing else can have set it.
            Ok(watchdog) => Some(*self.watchdog.get_or_init(|| watchdog)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the exec watchdog; forking");
                None
            }
        }
    }
}

impl Watchdog {
    /// Makes the watchdog and starts its thread.
    fn start() -> std::io::Result<&'static Self> {
        // SAFETY: timerfd_create takes flags only; a non-negative result is a new descriptor
        // that nothing else owns.
        let timer = unsafe {
            let fd = libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            OwnedFd::from_raw_fd(fd)
        };
        let watchdog = Box::new(Watchdog {
            timer,
            child: AtomicI32::new(0),
            watch: Mutex::new(Watch {
                active: false,
                started: Instant::now(),
                limit: Duration::ZERO,
                verdict: None,
            }),
        });
        // Leaked (kept for the process's life) only once its thread runs: a failed start
        // (retried by the next process start) drops it, its timer included.
        let (hand_over, handed) = std::sync::mpsc::sync_channel::<&'static Watchdog>(1);
        std::thread::Builder::new()
            .name("exec-watchdog".into())
            .stack_size(64 << 10)
            .spawn(move || {
                // Signals stay with the agent's own thread.
                // SAFETY: zeroed `sigset_t` is valid storage for `sigfillset`.
                let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
                // SAFETY: pointers to a live `sigset_t`.
                unsafe {
                    libc::sigfillset(&mut all);
                    libc::pthread_sigmask(libc::SIG_BLOCK, &all, ptr::null_mut());
                }
                if let Ok(watchdog) = handed.recv() {
                    watchdog.run();
                }
            })?;
        let watchdog: &'static Watchdog = Box::leak(watchdog);
        // The thread waits for it; a full or closed channel cannot happen (one send, and the
        // thread only ends after receiving).
        let _ = hand_over.send(watchdog);
        Ok(watchdog)
    }
}

/// Whether a start may share the agent's memory: always when it keeps the agent's uid and
/// gid, else only when switching ids cannot make the agent's memory dumpable
/// (`fs.suid_dumpable` is 0 or 2; unreadable counts as no).
pub(crate) fn usable(changes_ids: bool) -> bool {
    if !cfg!(any(target_arch = "x86_64", target_arch = "aarch64")) {
        return false;
    }
    !changes_ids || matches!(suid_dumpable(), Some(0 | 2))
}

static SUID_DUMPABLE: OnceLock<Option<OwnedFd>> = OnceLock::new();

/// The current `fs.suid_dumpable` (a host setting, read each time: the host may change it).
fn suid_dumpable() -> Option<u8> {
    let fd = SUID_DUMPABLE
        .get_or_init(|| {
            rustix::fs::open(
                c"/proc/sys/fs/suid_dumpable",
                rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
            .ok()
        })
        .as_ref()?;
    let mut text = [0u8; 4];
    let n = rustix::io::pread(fd.as_fd(), &mut text, 0).ok()?;
    match text.get(..n)?.trim_ascii() {
        [digit @ b'0'..=b'9'] => Some(digit - b'0'),
        _ => None,
    }
}

/// The agent's own dumpability before any start switched ids (see the module docs).
static OWN_DUMPABLE: OnceLock<Option<i32>> = OnceLock::new();

fn own_dumpable() -> Option<i32> {
    *OWN_DUMPABLE.get_or_init(|| {
        // SAFETY: PR_GET_DUMPABLE takes no pointers.
        let value = unsafe { libc::prctl(libc::PR_GET_DUMPABLE) };
        (value == 0 || value == 1).then_some(value)
    })
}

/// What a clone-based start ended with.
#[derive(Debug)]
pub(crate) struct Started {
    pub(crate) pid: i32,
    /// Set when the watchdog killed the child before it exec'd.
    pub(crate) verdict: Option<Verdict>,
}

/// Runs `entry(arg)` in a new child process that shares this process's memory, with the exit
/// signal SIGCHLD; returns once the child has exec'd or exited (or was killed by the watchdog
/// for being stopped, or for taking longer than `limit`). `None` when this way of starting is
/// not available (the caller forks instead).
///
/// The caller must block all signals of the calling thread around this call.
///
/// # Safety
/// `entry` must follow the rules in the module docs (only raw or rustix system calls on data
/// prepared before the call, no allocation, no locks, no unwinding, ends in `execve` or
/// [`crate::raw::exit`]), and everything `arg` points to must stay alive and unchanged until this
/// returns.
pub(crate) unsafe fn clone_vfork(
    entry: extern "C" fn(*mut c_void) -> c_int,
    arg: *mut c_void,
    limit: Duration,
    changes_ids: bool,
    alone: bool,
) -> Option<Result<Started, Errno>> {
    let spawner = spawner()?;
    // Without the watchdog the wait would not be bounded: fork instead when there is none,
    // unless no other process exists that could stop the child (`alone`, see the module docs).
    // A watchdog made already (a sandbox made ahead of use) watches that start too, for the
    // start limit.
    let watchdog = match spawner.watchdog.get() {
        Some(watchdog) => Some(*watchdog),
        None if alone => None,
        None => Some(spawner.watchdog()?),
    };
    let dumpable = if changes_ids { own_dumpable() } else { None };
    let stack = lock(&spawner.stack);
    let unwatched_child = AtomicI32::new(0);
    if let Some(watchdog) = watchdog {
        watchdog.child.store(0, Ordering::Release);
        *lock(&watchdog.watch) = Watch {
            active: true,
            started: Instant::now(),
            limit,
            verdict: None,
        };
        if let Err(e) = watchdog.arm(STOP_CHECK_INTERVAL) {
            lock(&watchdog.watch).active = false;
            tracing::warn!(error = %e, "cannot arm the exec watchdog; forking");
            return None;
        }
    }
    let child_tid = watchdog.map_or(&unwatched_child, |w| &w.child);
    let flags = libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PARENT_SETTID | libc::SIGCHLD;
    // SAFETY: `entry` and `arg` follow this function's contract; the stack is a mapping of
    // its own that no other child uses (the lock is held until the child is done with it:
    // with CLONE_VFORK, `clone` returns only once the child has exec'd — its memory is then
    // a new one — or exited). The parent-tid pointer is a live atomic the kernel stores the
    // pid into. No CLONE_SETTLS: the child keeps this thread's pointer, which is why it must
    // not touch thread-locals (see the module docs).
    let pid = unsafe { libc::clone(entry, stack.top(), flags, arg, child_tid.as_ptr()) };
    let clone_error = (pid < 0).then(|| {
        Errno::from_raw_os_error(
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EAGAIN),
        )
    });
    let verdict = watchdog.and_then(|watchdog| {
        let verdict = {
            let mut watch = lock(&watchdog.watch);
            watch.active = false;
            watch.verdict.take()
        };
        watchdog.disarm();
        verdict
    });
    drop(stack);
    if let Some(value) = dumpable {
        // The child's uid/gid switch set the shared memory's dumpability to the host's
        // `fs.suid_dumpable` (0 or 2 here): put the agent's own back.
        // SAFETY: PR_SET_DUMPABLE takes an integer.
        unsafe {
            if libc::prctl(libc::PR_GET_DUMPABLE) != value {
                libc::prctl(libc::PR_SET_DUMPABLE, value as libc::c_ulong);
            }
        }
    }
    Some(match clone_error {
        Some(e) => Err(e),
        None => Ok(Started { pid, verdict }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Forks a child that runs `body` and exits with its result; returns that result.
    fn in_child(body: impl FnOnce() -> i32) -> i32 {
        // SAFETY: the child only makes system calls and touches atomics before `_exit`; it
        // never returns into the test harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            // A failed assertion in a nested child must end that child, not run on as a copy
            // of the test harness.
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).unwrap_or(99);
            // SAFETY: ends the child without running the parent's Rust code.
            unsafe { libc::_exit(code) }
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above; `status` is a live integer.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status), "child status {status:#x}");
        libc::WEXITSTATUS(status)
    }

    #[test]
    fn only_the_first_start_of_pid_1_goes_unwatched() {
        // Not pid 1 (the test process): every start is watched, the first one too.
        assert_eq!(in_child(|| i32::from(begin_start())), 0);
        // Pid 1 of a new pid namespace (in a new user namespace, so no privilege is needed):
        // its first start goes unwatched, the next ones not.
        let code = in_child(|| {
            // SAFETY: unshare takes flags only; this forked child is single-threaded.
            if unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWPID) } != 0 {
                return 100;
            }
            in_child(|| {
                if !rustix::process::getpid().is_init() {
                    return 101;
                }
                // A new agent (other tests of this process may have started processes).
                STARTED_ONE.store(false, Ordering::Release);
                let first = begin_start();
                let second = begin_start();
                i32::from(first) | (i32::from(second) << 1)
            })
        });
        assert_eq!(
            code, 1,
            "99: a check failed in a child, 100: no unshare, 101: not pid 1, \
             else first | second << 1"
        );
    }
}
