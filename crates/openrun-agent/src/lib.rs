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
    /// Default working directory when a request names none and the user has no home.
    pub cwd: Option<String>,
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
}

impl AgentConfig {
    /// Default output retention: 64 MiB per stream of each process.
    pub const DEFAULT_OUTPUT_RETENTION: usize = 64 << 20;
}

/// Errors that stop the agent before it can serve.
#[derive(Debug, thiserror::Error)]
pub enum AgentStartError {
    /// The async runtime or the signal handlers could not be set up.
    #[error("agent start failed: {0}")]
    Setup(#[source] std::io::Error),
}

/// Serves the agent protocol until `Shutdown`, the lifetime deadline, or (with
/// `exit_with_control`) the close of `control`. Connections arrive on `listener`; `control`,
/// when given, is an already-connected client (the creator) served like any other connection.
///
/// Returns the process exit code the agent should exit with. Must be called in a
/// single-threaded process (it builds a current-thread tokio runtime).
pub fn run(
    config: AgentConfig,
    listener: UnixListener,
    control: Option<UnixStream>,
) -> Result<i32, AgentStartError> {
    let _ = (config, listener, control);
    unimplemented!("agent under construction")
}
