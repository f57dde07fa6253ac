//! The persistent create helper ("zygote") behind [`Runtime::create_with_helper`].
//!
//! A multi-threaded process (the server) must not fork a sandbox itself, so a single-threaded
//! helper does it. Exec'ing `openrun __create` for every create costs the exec and the
//! relocation of the static-pie binary (~1.3 ms), and every agent, a fork of that fresh helper,
//! then keeps its own relocated copy of the binary's RELRO (~488 KiB) and start-up heap.
//!
//! Instead, the first create starts ONE `openrun --data-dir DIR __create --serve` (the zygote,
//! [`serve`]), its stdin a `SOCK_SEQPACKET` socketpair to the caller. Each create makes a fresh
//! `SOCK_STREAM` socketpair and sends the zygote one end (`SCM_RIGHTS`); the zygote forks a
//! worker (fork, no exec) that runs exactly what `openrun __create` runs
//! ([`Runtime::serve_helper_request`], the socket as its stdin and stdout) and exits; its
//! sandbox's init is forked from the worker and becomes the agent, as before. Every agent thus
//! shares the zygote's relocated RELRO and start-up heap copy-on-write.
//!
//! Per create, on its socket: the zygote answers `STARTED` with a pidfd of the worker (or
//! `FORK_FAILED` and an errno); the caller then sends the spec and shuts down its write side;
//! the worker writes its reply (JSON, never a NUL byte) and exits; the zygote reaps the worker
//! and only then writes `DONE` (a NUL byte). The caller returns after `DONE`: by then the worker
//! has exited, so its agent has been reparented to the caller's subreaper (the server) and the
//! server's reaper can wait for it. (EOF on the socket can come before the worker's exit is
//! complete.) If the zygote dies meanwhile, the caller waits on the worker's pidfd instead
//! (readable once the exit, reparenting included, is done) and reaps it if it became its child.
//!
//! Safety of the design:
//! - The zygote is single-threaded (checked at start; it starts no thread and no async
//!   runtime), so its forks are as safe as a fresh process; it is not a subreaper (cleared at
//!   start), so agents land in the server, not in the zygote.
//! - The worker keeps only its request socket (as stdin and stdout) and stderr: every other
//!   descriptor (the zygote's control socket, other creates' sockets and pidfds) is closed
//!   before anything runs, and the sandbox's init closes stdio too (`isolate_descriptors`).
//! - The zygote keeps no state beyond the creates in flight (a pidfd and the socket of each),
//!   and exits when its control socket reaches EOF (the caller dropped the [`Runtime`] or died;
//!   no PDEATHSIG, which is tied to the spawning thread), after reaping its workers.
//! - All agents forked from one zygote share its address-space layout (ASLR): a sandbox that
//!   learns its layout learns its siblings'. The caller replaces the zygote every
//!   [`MAX_CREATES`] creates or [`MAX_AGE`], whichever comes first, to bound that (the Android
//!   zygote trade-off); one-shot helpers (the fallback) each get a fresh layout.
//! - A create that finds the zygote dead before it took the request retries once with a fresh
//!   one; if no zygote can be started, creates fall back to the one-shot `openrun __create`
//!   (retrying the zygote after [`RETRY_AFTER`]). [`DISABLE_ENV`] turns the zygote off.
//!
//! [`Runtime::create_with_helper`]: crate::Runtime::create_with_helper
//! [`Runtime::serve_helper_request`]: crate::Runtime::serve_helper_request
//! [`Runtime`]: crate::Runtime

use std::io::{self, Read, Write};
use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags};
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::net::{socketpair, AddressFamily, SendFlags, SocketFlags, SocketType};
use rustix::process::{pidfd_open, waitid, Pid, PidfdFlags, WaitId, WaitIdOptions};

use crate::error::{Result, RuntimeError};

/// Creates one zygote serves before it is replaced (bounds the shared ASLR layout).
pub const MAX_CREATES: u32 = 256;
/// Age after which a zygote is replaced at the next create (bounds the shared ASLR layout).
pub const MAX_AGE: Duration = Duration::from_secs(10 * 60);
/// After a zygote could not be started or died before serving anything, creates use the
/// one-shot helper for this long before trying a zygote again.
pub const RETRY_AFTER: Duration = Duration::from_secs(60);

/// `OPENRUN_CREATE_ZYGOTE=0` in the caller's environment: one helper process per create (an
/// escape hatch, and the A/B baseline of the zygote's measurements).
pub const DISABLE_ENV: &str = "OPENRUN_CREATE_ZYGOTE";

/// Caller → zygote, on the control socket, with the request socket attached.
const REQUEST: u8 = b'C';
/// Zygote → caller: the worker runs (its pidfd attached).
const STARTED: u8 = b'+';
/// Zygote → caller: no worker (4 bytes of errno follow).
const FORK_FAILED: u8 = b'!';
/// Zygote → caller, after the worker was reaped: the create is over.
const DONE: u8 = 0;

/// What a helper answered: its reply, and how it ended (for error messages).
pub(crate) struct HelperOutput {
    pub bytes: Vec<u8>,
    pub status: String,
}

/// The caller's side: the current zygote, started on first use (a field of `Runtime`).
#[derive(Default)]
pub(crate) struct Helper {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    current: Option<Arc<Zygote>>,
    /// No zygote until then: one could not be started, or died before serving.
    disabled_until: Option<Instant>,
}

impl std::fmt::Debug for Helper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `try_lock`: never blocks (or deadlocks) a debug print on a create in progress.
        let pid = match self.state.try_lock() {
            Ok(state) => state.current.as_ref().map(|z| z.child.id()),
            Err(_) => None,
        };
        f.debug_struct("Helper").field("zygote", &pid).finish()
    }
}

/// How a create through a zygote failed.
enum Failure {
    /// The zygote never took the request (it is gone): nothing was created.
    NotDelivered(RuntimeError),
    /// The request was taken: the create failed, and is not retried.
    Failed(RuntimeError),
}

impl Helper {
    /// Runs one create request (`input`, the spec as JSON) through the zygote, starting or
    /// replacing it as needed, else through a one-shot `helper __create`.
    pub(crate) fn run(
        &self,
        helper: &Path,
        data_dir: &Path,
        pool_size: Option<u64>,
        input: &[u8],
    ) -> Result<HelperOutput> {
        if std::env::var_os(DISABLE_ENV).is_some_and(|v| v == "0") {
            return one_shot(helper, data_dir, pool_size, input);
        }
        for attempt in 0..2 {
            let Some(zygote) = self.zygote(helper, data_dir, pool_size) else {
                break;
            };
            match zygote.create(input) {
                Ok(output) => return Ok(output),
                Err(Failure::Failed(e)) => {
                    if zygote.dead.load(Ordering::Relaxed) {
                        self.retire(&zygote);
                    }
                    return Err(e);
                }
                Err(Failure::NotDelivered(e)) => {
                    tracing::debug!(error = %e, attempt, "the create zygote is gone");
                    self.retire(&zygote);
                }
            }
        }
        one_shot(helper, data_dir, pool_size, input)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The zygote to use, counted as used once; `None`: use the one-shot helper.
    fn zygote(
        &self,
        helper: &Path,
        data_dir: &Path,
        pool_size: Option<u64>,
    ) -> Option<Arc<Zygote>> {
        let mut state = self.lock();
        if let Some(zygote) = &state.current {
            if zygote.fits(helper, pool_size) {
                zygote.handed.fetch_add(1, Ordering::Relaxed);
                return Some(zygote.clone());
            }
        }
        // Replaced: the old one exits once its creates in flight are done (its last user
        // drops it, outside the lock).
        let old = state.current.take();
        let fresh = if state.disabled_until.is_some_and(|t| Instant::now() < t) {
            None
        } else {
            match Zygote::start(helper, data_dir, pool_size) {
                Ok(zygote) => {
                    let zygote = Arc::new(zygote);
                    zygote.handed.fetch_add(1, Ordering::Relaxed);
                    state.current = Some(zygote.clone());
                    state.disabled_until = None;
                    Some(zygote)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start the create zygote: one helper per create");
                    state.disabled_until = Some(Instant::now() + RETRY_AFTER);
                    None
                }
            }
        };
        drop(state);
        drop(old);
        fresh
    }

    /// Forgets a zygote found dead; one that never served anything disables zygotes for a
    /// while (it cannot start: an older helper binary, say).
    fn retire(&self, zygote: &Arc<Zygote>) {
        let mut state = self.lock();
        let old = match &state.current {
            Some(current) if Arc::ptr_eq(current, zygote) => state.current.take(),
            _ => None,
        };
        if !zygote.served.load(Ordering::Relaxed) {
            state.disabled_until = Some(Instant::now() + RETRY_AFTER);
        }
        drop(state);
        drop(old);
    }
}

/// A running zygote, as its caller sees it.
struct Zygote {
    /// Our end of its control socket (its stdin).
    control: OwnedFd,
    child: Child,
    helper: PathBuf,
    pool_size: Option<u64>,
    started: Instant,
    /// Requests handed to it so far.
    handed: AtomicU32,
    /// It took at least one request.
    served: AtomicBool,
    /// It died (a request found its sockets closed).
    dead: AtomicBool,
}

impl Zygote {
    fn start(helper: &Path, data_dir: &Path, pool_size: Option<u64>) -> io::Result<Zygote> {
        let (control, theirs) = socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )?;
        let mut command = Command::new(helper);
        command
            .arg("--data-dir")
            .arg(data_dir)
            .arg("__create")
            .arg("--serve")
            .stdin(Stdio::from(theirs))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .env_clear();
        if let Some(size) = pool_size {
            command.env(crate::disk_pool::POOL_SIZE_ENV, size.to_string());
        }
        let child = command.spawn()?;
        Ok(Zygote {
            control,
            child,
            helper: helper.to_path_buf(),
            pool_size,
            started: Instant::now(),
            handed: AtomicU32::new(0),
            served: AtomicBool::new(false),
            dead: AtomicBool::new(false),
        })
    }

    /// Usable for one more create of this helper binary and pool size.
    fn fits(&self, helper: &Path, pool_size: Option<u64>) -> bool {
        !self.dead.load(Ordering::Relaxed)
            && self.helper == helper
            && self.pool_size == pool_size
            && self.handed.load(Ordering::Relaxed) < MAX_CREATES
            && self.started.elapsed() < MAX_AGE
    }

    fn create(&self, input: &[u8]) -> std::result::Result<HelperOutput, Failure> {
        let io_error = |what: &str, e: io::Error| RuntimeError::io(what.to_string(), e);
        let (mine, theirs) = socketpair(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::CLOEXEC,
            None,
        )
        .map_err(|e| {
            Failure::Failed(io_error(
                "cannot make the sandbox helper's socket",
                e.into(),
            ))
        })?;
        if let Err(e) = send_with_fd(self.control.as_fd(), &[REQUEST], theirs.as_fd()) {
            self.dead.store(true, Ordering::Relaxed);
            return Err(Failure::NotDelivered(io_error(
                "cannot reach the create zygote",
                e,
            )));
        }
        drop(theirs);
        let mut stream = UnixStream::from(mine);
        let (first, pidfd) = match recv_with_fd(stream.as_fd()) {
            Ok(Some(got)) => got,
            // Closed unanswered: the zygote died before forking a worker for it.
            Ok(None) => {
                self.dead.store(true, Ordering::Relaxed);
                return Err(Failure::NotDelivered(io_error(
                    "the create zygote exited",
                    io::ErrorKind::UnexpectedEof.into(),
                )));
            }
            Err(e) => {
                self.dead.store(true, Ordering::Relaxed);
                return Err(Failure::NotDelivered(io_error(
                    "the create zygote failed",
                    e,
                )));
            }
        };
        self.served.store(true, Ordering::Relaxed);
        let pidfd = match (first, pidfd) {
            (STARTED, Some(pidfd)) => pidfd,
            (FORK_FAILED, _) => {
                let mut errno = [0u8; 4];
                let e = match stream.read_exact(&mut errno) {
                    Ok(()) => io::Error::from_raw_os_error(i32::from_le_bytes(errno)),
                    Err(e) => e,
                };
                return Err(Failure::Failed(io_error(
                    "cannot start the sandbox helper",
                    e,
                )));
            }
            _ => {
                return Err(Failure::Failed(io_error(
                    "the create zygote answered nonsense",
                    io::ErrorKind::InvalidData.into(),
                )))
            }
        };
        let sent = stream
            .write_all(input)
            .and_then(|()| stream.shutdown(std::net::Shutdown::Write));
        let mut bytes = Vec::new();
        let read = read_until_done(&mut stream, &mut bytes);
        if !matches!(read, Ok(true)) {
            // No `DONE`: the zygote died. The worker's exit (the reparenting of its agent
            // included) is over once its pidfd is readable; reap it if it became our child.
            self.dead.store(true, Ordering::Relaxed);
            wait_exited(pidfd.as_fd());
            let _ = waitid(
                WaitId::PidFd(pidfd.as_fd()),
                WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
            );
        }
        sent.map_err(|e| {
            Failure::Failed(io_error("cannot send the spec to the sandbox helper", e))
        })?;
        let done = read.map_err(|e| Failure::Failed(io_error("the sandbox helper failed", e)))?;
        Ok(HelperOutput {
            bytes,
            status: if done {
                "the create zygote's worker exited".into()
            } else {
                "the create zygote died".into()
            },
        })
    }
}

impl Drop for Zygote {
    fn drop(&mut self) {
        // EOF on its control socket: it exits once its workers are reaped (none are in flight:
        // each create holds the zygote until it is over). One stuck (stopped) is killed.
        let _ = rustix::net::shutdown(&self.control, rustix::net::Shutdown::Both);
        if let Some(pid) = Pid::from_raw(self.child.id() as i32) {
            if let Ok(pidfd) = pidfd_open(pid, PidfdFlags::empty()) {
                let mut fds = [PollFd::new(&pidfd, PollFlags::IN)];
                let timeout = rustix::event::Timespec {
                    tv_sec: 5,
                    tv_nsec: 0,
                };
                let _ = poll(&mut fds, Some(&timeout));
            }
        }
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Reads what the worker writes until the zygote's `DONE`: `Ok(false)` at EOF without it.
fn read_until_done(stream: &mut UnixStream, bytes: &mut Vec<u8>) -> io::Result<bool> {
    let mut chunk = [0u8; 8192];
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(0) => return Ok(false),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if let Some(end) = chunk[..n].iter().position(|&b| b == DONE) {
            bytes.extend_from_slice(&chunk[..end]);
            return Ok(true);
        }
        bytes.extend_from_slice(&chunk[..n]);
    }
}

/// Waits until the process of `pidfd` has exited (not reaped).
fn wait_exited(pidfd: BorrowedFd<'_>) {
    let mut fds = [PollFd::new(&pidfd, PollFlags::IN)];
    while let Err(rustix::io::Errno::INTR) = poll(&mut fds, None) {}
}

fn send_with_fd(sock: BorrowedFd<'_>, bytes: &[u8], fd: BorrowedFd<'_>) -> io::Result<()> {
    crate::setup_channel::send_bytes(sock, bytes, &[fd])
}

/// Receives one byte and at most one descriptor (any more are closed); `None` at EOF.
fn recv_with_fd(sock: BorrowedFd<'_>) -> io::Result<Option<(u8, Option<OwnedFd>)>> {
    let mut buf = [0u8; 1];
    let (len, fds) = crate::setup_channel::recv_bytes(sock, &mut buf)?;
    if len == 0 {
        return Ok(None);
    }
    Ok(Some((buf[0], fds.into_iter().next())))
}

/// Today's one-shot helper: `helper --data-dir DIR __create`, spec on stdin, reply on stdout.
fn one_shot(
    helper: &Path,
    data_dir: &Path,
    pool_size: Option<u64>,
    input: &[u8],
) -> Result<HelperOutput> {
    let mut command = Command::new(helper);
    command
        .arg("--data-dir")
        .arg(data_dir)
        .arg("__create")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .env_clear();
    if let Some(size) = pool_size {
        command.env(crate::disk_pool::POOL_SIZE_ENV, size.to_string());
    }
    let mut child = command.spawn().map_err(|e| {
        RuntimeError::io(
            format!("cannot start the sandbox helper {}", helper.display()),
            e,
        )
    })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input).map_err(|e| {
            RuntimeError::io("cannot send the spec to the sandbox helper".to_string(), e)
        })?;
    }
    let output = child
        .wait_with_output()
        .map_err(|e| RuntimeError::io("the sandbox helper failed".to_string(), e))?;
    Ok(HelperOutput {
        bytes: output.stdout,
        status: output.status.to_string(),
    })
}

/// A worker of the zygote: a create in flight.
struct Worker {
    pidfd: OwnedFd,
    socket: OwnedFd,
}

/// The zygote: `openrun --data-dir DIR __create --serve`, its stdin the control socket.
/// Forks one worker per request socket received and writes `DONE` on it once the worker is
/// reaped; returns (the exit code) once the control socket reached EOF and every worker is
/// reaped.
pub fn serve(data_dir: &Path) -> i32 {
    // Agents must be reparented to the caller (a subreaper), never to us. (A fresh exec is no
    // subreaper anyway; this makes it explicit.)
    let _ = rustix::process::set_child_subreaper(None);
    // Forking is only safe from a single-threaded process.
    if !std::fs::read_dir("/proc/self/task").is_ok_and(|tasks| tasks.count() == 1) {
        return 1;
    }
    // Nothing but stdio is ours: drop whatever our spawner leaked to us without CLOEXEC.
    // SAFETY: close_range only closes descriptors, and nothing in this process owns one above
    // stderr at this point (the command line was parsed, the logger writes to stderr).
    if unsafe { libc::close_range(3, libc::c_uint::MAX, 0) } != 0 {
        return 1;
    }
    let stdin = io::stdin();
    let control = stdin.as_fd();
    let mut workers: Vec<Worker> = Vec::new();
    let mut open = true;
    while open || !workers.is_empty() {
        let (control_ready, exited) = {
            let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(workers.len() + 1);
            if open {
                fds.push(PollFd::new(&control, PollFlags::IN));
            }
            fds.extend(workers.iter().map(|w| PollFd::new(&w.pidfd, PollFlags::IN)));
            match poll(&mut fds, None) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(_) => return 1,
            }
            let skip = usize::from(open);
            let exited: Vec<usize> = fds[skip..]
                .iter()
                .enumerate()
                .filter(|(_, fd)| !fd.revents().is_empty())
                .map(|(i, _)| i)
                .collect();
            (open && !fds[0].revents().is_empty(), exited)
        };
        // Highest index first, so that `swap_remove` moves only entries already looked at.
        for i in exited.into_iter().rev() {
            finish(workers.swap_remove(i));
        }
        if control_ready {
            match recv_with_fd(control) {
                Ok(Some((REQUEST, Some(socket)))) => workers.extend(start_worker(data_dir, socket)),
                Ok(Some(_)) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Ok(None) | Err(_) => open = false,
            }
        }
    }
    0
}

/// Reaps an exited worker, then tells its caller the create is over.
fn finish(worker: Worker) {
    let pidfd = worker.pidfd.as_fd();
    while let Err(rustix::io::Errno::INTR) = waitid(WaitId::PidFd(pidfd), WaitIdOptions::EXITED) {}
    let _ = rustix::net::send(&worker.socket, &[DONE], SendFlags::NOSIGNAL);
}

/// Forks a worker for one request socket; `None` (the caller told why) when there is none.
fn start_worker(data_dir: &Path, socket: OwnedFd) -> Option<Worker> {
    // SAFETY: this process is single-threaded (checked in `serve`, and it starts no thread),
    // so the child is a complete copy that may run any code; it never returns into our loop
    // (`worker` exits).
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        worker(data_dir, socket);
    }
    let fail = |errno: i32| {
        let mut message = vec![FORK_FAILED];
        message.extend_from_slice(&errno.to_le_bytes());
        let _ = rustix::net::send(&socket, &message, SendFlags::NOSIGNAL);
    };
    let Some(pid) = Pid::from_raw(pid) else {
        fail(
            io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EAGAIN),
        );
        return None;
    };
    // Our un-reaped child: its pid cannot be reused before we wait for it.
    let pidfd = match pidfd_open(pid, PidfdFlags::empty()) {
        Ok(pidfd) => pidfd,
        Err(e) => {
            // Cannot watch it: stop it before it reads a spec (nothing is created).
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            let _ = rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty());
            fail(e.raw_os_error());
            return None;
        }
    };
    // A caller gone already is fine: the worker reads EOF, fails and exits.
    let _ = send_with_fd(socket.as_fd(), &[STARTED], pidfd.as_fd());
    Some(Worker { pidfd, socket })
}

/// The forked worker: today's `openrun __create` over the request socket; never returns.
fn worker(data_dir: &Path, socket: OwnedFd) -> ! {
    let raw = socket.into_raw_fd();
    // The socket becomes stdin and stdout (stderr stays /dev/null); everything else the zygote
    // holds (its control socket on stdin, other creates' sockets and pidfds) is closed before
    // anything runs, so no sandbox can inherit it.
    if crate::sys::dup2_raw(raw, 0).is_err() || crate::sys::dup2_raw(raw, 1).is_err() {
        crate::sys::exit_now(1);
    }
    // SAFETY: close_range only closes descriptors; none above stderr is owned by anything
    // this process still uses (the zygote's values are never dropped here: we exit below).
    if unsafe { libc::close_range(3, libc::c_uint::MAX, 0) } != 0 {
        crate::sys::exit_now(1);
    }
    let ok = crate::Runtime::serve_helper_request(
        data_dir,
        &mut io::stdin().lock(),
        &mut io::stdout().lock(),
    );
    std::process::exit(i32::from(!ok))
}
