//! The openrun agent: the program that runs as pid 1 inside every sandbox.
//!
//! It is not exec'd from the image: the runtime forks, builds the sandbox around the child, and
//! the child calls [`run`]. From then on it serves the agent protocol ([`openrun_protocol`]) on
//! the Unix socket the host created for it: it starts processes (pipes or a PTY), keeps their
//! output with byte offsets, reaps every orphan, and performs file operations resolved inside the
//! sandbox root only.
//!
//! The agent must not load code lazily from the sandbox root (no NSS lookups, no `dlopen`):
//! it parses `/etc/passwd` and `/etc/group` itself.
//!
//! Layout: `server` (main loop: accept, control stream, lifetime, shutdown), `connection`
//! (one client: requests in, responses and events out, attach streaming), `agent` (shared
//! state and the operations on the process table), `process` (a table entry), `command`
//! (environment, cwd, `PATH` candidates for an exec), `spawn` (child setup, exec), `vfork`
//! (starting a child that shares the agent's memory, and its watchdog),
//! `pty`, `reader` (output pipes into buffers), `stdin` (ordered stdin writes), `output`
//! (bounded buffers with absolute offsets), `reaper` (SIGCHLD and `waitpid(-1)`), `files`
//! (file operations confined to the root with `openat2`), `users` (passwd/group parsing),
//! `errors` (errno to protocol errors), `relay` (raw byte pipes to TCP on the sandbox's
//! loopback: the port relay of previews and the egress relay), `watch` (directory watches
//! with inotify).
//!
//! Everything runs on one thread (a current-thread tokio runtime with a `LocalSet`); only file
//! operations go to a small blocking pool, and the code between `fork` and `exec` is
//! async-signal-safe, so extra threads cannot deadlock a child.

#![deny(missing_docs)]

mod agent;
mod command;
mod connection;
mod errors;
mod files;
mod output;
mod process;
mod pty;
pub mod raw;
mod reader;
mod reaper;
mod relay;
mod server;
mod spawn;
mod stdin;
mod users;
mod vfork;
mod watch;

pub use spawn::set_exec_session_ruleset;

use std::collections::BTreeMap;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

/// What the agent needs to know about its sandbox.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Sandbox id, reported by `Hello`/`Info` and set as `HOSTNAME`.
    pub sandbox_id: String,
    /// Root that file operations and user lookups resolve under: `/` inside a sandbox, a
    /// temporary directory in tests. Paths can never leave it (`..`, absolute symlinks and
    /// `/proc` magic links included).
    pub root: PathBuf,
    /// Environment every process starts with, before the request's own variables
    /// (the image's `ENV`; `PATH` defaults to the usual Debian path when absent).
    pub env: BTreeMap<String, String>,
    /// Default working directory when a request names none (the image's `WorkingDir`);
    /// without it, the user's home if it exists, else `/`.
    pub cwd: Option<String>,
    /// Default user when a request names none (the image's `User`); `None` is root.
    pub user: Option<String>,
    /// Kill everything and exit when this much time has passed (the sandbox's lifetime).
    pub lifetime: Option<Duration>,
    /// Bytes of output kept per process and stream before the oldest are dropped.
    pub output_retention: usize,
    /// Exit (after killing every process) when `control` closes: the creator's lifeline for
    /// sandboxes that must not outlive it (`openrun run`).
    pub exit_with_control: bool,
    /// `oom_score_adj` every started process gets before exec (the agent itself may be at
    /// -1000 and children must not inherit that; 500 when the agent could not be protected, so
    /// the OOM killer picks the processes first).
    pub process_oom_score_adj: i32,
    /// This process's own `/proc/self/oom_score_adj`, opened while it was still dumpable. A
    /// non-dumpable process's `/proc` files belong to the host's root, so neither the agent
    /// nor its forks could open them later; with this the agent sets each child's score from
    /// the outside (raise, fork, restore) and no child ever has to become dumpable.
    pub own_oom_score_adj: Option<std::sync::Arc<std::fs::File>>,
}

impl AgentConfig {
    /// Default output retention: 64 MiB per stream of each process.
    pub const DEFAULT_OUTPUT_RETENTION: usize = 64 << 20;
}

/// Errors that stop the agent before it can serve.
#[derive(Debug, thiserror::Error)]
pub enum AgentStartError {
    /// The async runtime, the signal handlers or the sockets could not be set up.
    #[error("agent start failed")]
    Setup(#[source] std::io::Error),
    /// The sandbox root could not be opened.
    #[error("cannot open the sandbox root {}", path.display())]
    Root {
        /// The configured root.
        path: PathBuf,
        /// Why opening it failed.
        #[source]
        source: std::io::Error,
    },
}

/// Serves the agent protocol until `Shutdown`, the lifetime deadline, or (with
/// `exit_with_control`) the close of `control`. Connections arrive on `listener`; `control`,
/// when given, is an already-connected client (the creator) served like any other connection.
///
/// Returns the process exit code the agent should exit with (0 after an orderly stop; every
/// process it started has been killed by then). Must be called in a single-threaded process
/// (it builds a current-thread tokio runtime; only file operations use a small blocking pool).
///
/// The agent makes itself a child subreaper, so orphaned descendants are reparented to it and
/// reaped even when it is not pid 1 (as in tests).
pub fn run(
    config: AgentConfig,
    listener: UnixListener,
    control: Option<UnixStream>,
) -> Result<i32, AgentStartError> {
    rustix::process::set_child_subreaper(Some(rustix::process::getpid()))
        .map_err(|e| AgentStartError::Setup(e.into()))?;
    // Writing to a socket or pipe whose reader is gone must be an error, not a fatal signal.
    // SAFETY: installing SIG_IGN involves no handler code; children reset it before exec.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(4)
        .thread_keep_alive(Duration::from_secs(5))
        .build()
        .map_err(AgentStartError::Setup)?;
    let local = tokio::task::LocalSet::new();
    let result = local.block_on(&runtime, server::serve(config, listener, control));
    drop(local);
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}
