//! The messages exchanged between a client (runtime, server, CLI) and the in-sandbox agent.
//!
//! A client sends [`RequestEnvelope`]s; the agent answers each with exactly one
//! [`AgentMessage::Response`] carrying the same id. Output and exit events of processes the
//! connection is attached to arrive as [`AgentMessage::Output`] and [`AgentMessage::Exit`],
//! interleaved with responses. Raw bytes (stdin, output, file contents) travel in the frame's
//! data part, never inside the JSON header.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Process id inside the sandbox's pid namespace.
pub type Pid = i32;

/// A request with the id its response will carry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestEnvelope {
    /// Chosen by the client; echoed in the response.
    pub id: u64,
    /// What to do.
    pub request: Request,
}

/// Everything a client can ask the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// First message on a connection; the agent answers [`Response::Hello`].
    Hello {
        /// The client's [`crate::PROTOCOL_VERSION`].
        version: u32,
    },
    /// Starts a process. Answered with [`Response::Started`] once it runs. With
    /// `attach`, this connection then receives its output and exit events.
    /// The frame's data part, if any, is written to the process's stdin first.
    Exec(ExecRequest),
    /// Streams a process's output from the given offsets, then its exit (if `follow`, waits for
    /// new output until the process ends; otherwise sends what is buffered and stops).
    /// Answered with [`Response::Attached`] before the first event.
    Attach(AttachRequest),
    /// Stops streaming a process's events on this connection.
    Detach {
        /// Process to stop following.
        pid: Pid,
    },
    /// Sends a signal to a process (to its whole process group when `group`).
    Signal {
        /// Target process.
        pid: Pid,
        /// Signal number, e.g. 15.
        signal: i32,
        /// Deliver to the process group the agent created for it.
        #[serde(default)]
        group: bool,
    },
    /// Writes the frame's data to a process's stdin; closes stdin when `eof`.
    Stdin {
        /// Target process.
        pid: Pid,
        /// Close stdin after writing.
        #[serde(default)]
        eof: bool,
    },
    /// Resizes a process's terminal.
    Resize {
        /// Target process (must have a PTY).
        pid: Pid,
        /// New size.
        size: PtySize,
    },
    /// Lists the process table (running and exited-but-unreleased processes).
    ListProcesses,
    /// Status of one process.
    ProcessStatus {
        /// Target process.
        pid: Pid,
    },
    /// Forgets an exited process and its output. Fails while it still runs.
    Release {
        /// Target process.
        pid: Pid,
    },
    /// Reads a file; the content comes back in the response's data part.
    ReadFile {
        /// Path inside the sandbox.
        path: String,
        /// Byte offset to start at.
        #[serde(default)]
        offset: u64,
        /// Maximum number of bytes (capped at [`crate::MAX_DATA_LEN`]).
        #[serde(default)]
        limit: Option<u64>,
    },
    /// Writes the frame's data to a file atomically (temporary file + rename), creating parent
    /// directories when `parents`.
    WriteFile {
        /// Path inside the sandbox.
        path: String,
        /// Permission bits for a new file (default 0o644).
        #[serde(default)]
        mode: Option<u32>,
        /// Create missing parent directories.
        #[serde(default)]
        parents: bool,
        /// Append instead of replacing (not atomic; for chunked uploads).
        #[serde(default)]
        append: bool,
    },
    /// Lists a directory.
    ListDir {
        /// Path inside the sandbox.
        path: String,
    },
    /// Stats a path without following a final symlink.
    Stat {
        /// Path inside the sandbox.
        path: String,
    },
    /// Creates a directory (and its parents when `parents`, like `mkdir -p`).
    Mkdir {
        /// Path inside the sandbox.
        path: String,
        /// Create parents, and succeed if it exists.
        #[serde(default)]
        parents: bool,
        /// Permission bits (default 0o755).
        #[serde(default)]
        mode: Option<u32>,
    },
    /// Removes a file, a symlink, or (with `recursive`) a directory tree.
    Remove {
        /// Path inside the sandbox.
        path: String,
        /// Remove directories and their contents.
        #[serde(default)]
        recursive: bool,
    },
    /// Renames (moves) a path.
    Rename {
        /// Source path inside the sandbox.
        from: String,
        /// Destination path inside the sandbox.
        to: String,
    },
    /// Creates a symbolic link at `path` whose content is `target`. Only the directory holding
    /// `path` is resolved (inside the sandbox, like every path); `target` is text stored in the
    /// link and never resolved by the agent (whatever later follows the link resolves it, and
    /// the agent's own file operations stay inside the sandbox root). Fails with
    /// [`ErrorCode::AlreadyExists`] when the name exists (even as a dangling link). Answered
    /// with [`Response::Done`]. Additive like [`Request::SetLifetime`]: an older agent refuses
    /// it as an unknown request.
    Symlink {
        /// What the link points to (non-empty, at most 4096 bytes; absolute or relative).
        target: String,
        /// Path of the new link inside the sandbox.
        path: String,
        /// Create missing parent directories.
        #[serde(default)]
        parents: bool,
    },
    /// Facts about the agent and sandbox.
    Info,
    /// Replaces the sandbox's lifetime: the agent ends the sandbox `remaining_ms` from now
    /// (never, when `None`). Answered with [`Response::Done`].
    SetLifetime {
        /// Milliseconds from now, or `None` for no deadline.
        remaining_ms: Option<u64>,
    },
    /// Kills every process in the sandbox and makes the agent exit.
    Shutdown,
    /// Connects TCP to `127.0.0.1:port` inside the sandbox (then `[::1]:port` if that is
    /// refused) and answers [`Response::Done`]. After that frame the connection is no longer
    /// framed: it is a raw byte pipe to the TCP connection, both ways, with half-closes
    /// passed on. Nothing listening is [`ErrorCode::ConnectionRefused`], and the connection
    /// stays framed.
    ConnectPort {
        /// Port inside the sandbox (1 to 65535).
        port: u16,
    },
    /// Listens on `127.0.0.1:port` (and `[::1]:port` where IPv6 is up) inside the sandbox and
    /// answers [`Response::Done`]; then every accepted TCP connection is announced on this
    /// connection as [`AgentMessage::Incoming`], to be claimed with
    /// [`Request::TakeConnection`] on a new connection. Closing this connection closes the
    /// listener; a new `RelayEgress` (on any connection) replaces the previous one.
    RelayEgress {
        /// Port inside the sandbox to listen on (1 to 65535; see [`EGRESS_PROXY_PORT`]).
        port: u16,
    },
    /// Claims a connection announced by [`AgentMessage::Incoming`]: answered
    /// [`Response::Done`], after which this connection is a raw byte pipe to it (like
    /// [`Request::ConnectPort`]). A connection not claimed within
    /// [`UNCLAIMED_CONNECTION_TIMEOUT_MS`] is closed by the agent; claiming it later (or an
    /// unknown one) is [`ErrorCode::NotFound`].
    TakeConnection {
        /// The id of the announcement.
        conn: u64,
    },
    /// Watches a directory for changes (inotify): answered [`Response::Watching`] naming the
    /// watch, after which its changes arrive on this connection as [`AgentMessage::FileEvent`]
    /// until [`Request::Unwatch`], the end of the directory ([`AgentMessage::WatchEnded`]), or
    /// the close of this connection. A missing path is [`ErrorCode::NotFound`], a file
    /// [`ErrorCode::NotADirectory`], a path leaving the sandbox [`ErrorCode::OutsideSandbox`];
    /// too many watches (per connection, per sandbox, or the kernel's inotify limits) are
    /// [`ErrorCode::TooLarge`]. An agent older than this request answers
    /// [`ErrorCode::InvalidArgument`] with a message starting `malformed request: unknown
    /// variant` (see [`AgentError::is_unknown_request`]).
    Watch {
        /// Directory inside the sandbox.
        path: String,
        /// Also watch every subdirectory, including those created later.
        #[serde(default)]
        recursive: bool,
    },
    /// Stops a watch of this connection; answered [`Response::Done`] (no event of it follows).
    /// An unknown watch is [`ErrorCode::NotFound`].
    Unwatch {
        /// The id from [`Response::Watching`].
        watch: u64,
    },
}

/// Port of the egress proxy inside every sandbox: programs reach it at `127.0.0.1:3128` (their
/// `HTTP(S)_PROXY`), and the agent relays each connection to the server
/// ([`Request::RelayEgress`]).
pub const EGRESS_PROXY_PORT: u16 = 3128;

/// How long the agent keeps an announced connection ([`AgentMessage::Incoming`]) that nobody
/// claims before closing it.
pub const UNCLAIMED_CONNECTION_TIMEOUT_MS: u64 = 10_000;

/// How to start a process.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Program and arguments; `argv[0]` is looked up in `PATH` when it has no slash.
    pub argv: Vec<String>,
    /// Environment added on top of the sandbox defaults (PATH, HOME, HOSTNAME, TERM…).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (default: the user's home, else `/`).
    #[serde(default)]
    pub cwd: Option<String>,
    /// User to run as: a name from the sandbox's `/etc/passwd`, or `uid[:gid]`. Default root.
    #[serde(default)]
    pub user: Option<String>,
    /// Keep a stdin pipe open for [`Request::Stdin`]; otherwise stdin is `/dev/null`.
    #[serde(default)]
    pub stdin: bool,
    /// Run on a new pseudo-terminal of this size (stdout and stderr merge into `pty` output).
    #[serde(default)]
    pub pty: Option<PtySize>,
    /// Kill the process group after this many milliseconds.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Stream this process's events to the requesting connection.
    #[serde(default)]
    pub attach: bool,
    /// Free-form label for listings (e.g. "build", "dev-server").
    #[serde(default)]
    pub tag: Option<String>,
}

/// Where to resume streaming a process's output.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AttachRequest {
    /// Target process.
    pub pid: Pid,
    /// First stdout (or pty) byte offset wanted.
    #[serde(default)]
    pub stdout_since: u64,
    /// First stderr byte offset wanted.
    #[serde(default)]
    pub stderr_since: u64,
    /// Keep streaming until the process exits.
    #[serde(default)]
    pub follow: bool,
}

/// Terminal size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtySize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// Which output stream bytes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    /// Standard output, or the terminal for PTY processes.
    Stdout,
    /// Standard error (empty for PTY processes).
    Stderr,
}

/// How a process ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code when it exited normally.
    pub code: Option<i32>,
    /// Signal number when it was killed by a signal.
    pub signal: Option<i32>,
    /// It dumped core.
    #[serde(default)]
    pub core_dumped: bool,
    /// The agent killed it because its `timeout_ms` passed.
    #[serde(default)]
    pub timed_out: bool,
    /// The sandbox's memory limit killed it (filled in by the host side, which sees the cgroup).
    #[serde(default)]
    pub oom_killed: bool,
}

impl ExitStatus {
    /// The code a shell would report: the exit code, or 128 + signal.
    pub fn shell_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(code), _) => code,
            (None, Some(sig)) => 128 + sig,
            (None, None) => 255,
        }
    }

    /// Whether the process exited with code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// Running state of a process in the table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ProcessState {
    /// Still running.
    Running,
    /// Ended, not yet released.
    Exited {
        /// How it ended.
        status: ExitStatus,
    },
}

/// One entry of the agent's process table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessInfo {
    /// Pid inside the sandbox.
    pub pid: Pid,
    /// Command line.
    pub argv: Vec<String>,
    /// Working directory it was started in.
    pub cwd: String,
    /// Uid it runs as.
    pub uid: u32,
    /// Whether it has a PTY.
    pub pty: bool,
    /// Label given at exec time.
    pub tag: Option<String>,
    /// Start time, milliseconds since the Unix epoch.
    pub started_at_ms: u64,
    /// Current state.
    #[serde(flatten)]
    pub state: ProcessState,
    /// Total stdout (or pty) bytes produced so far; the next byte will have this offset.
    pub stdout_len: u64,
    /// Total stderr bytes produced so far.
    pub stderr_len: u64,
}

/// Kind of a directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink,
    /// Anything else (device, fifo, socket).
    Other,
}

/// Metadata of a path inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStat {
    /// Path as given (for stat) or the entry's name (for listings).
    pub name: String,
    /// Kind. Named `file_type` on the wire: [`Response::Stat`] flattens this struct next to
    /// the response's own `kind` tag, so a field called `kind` would collide with it.
    #[serde(rename = "file_type")]
    pub kind: FileKind,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits (lower 12 bits of st_mode).
    pub mode: u32,
    /// Owner uid as seen inside the sandbox.
    pub uid: u32,
    /// Owner gid as seen inside the sandbox.
    pub gid: u32,
    /// Modification time, milliseconds since the Unix epoch.
    pub modified_ms: i64,
    /// Target of a symlink.
    pub symlink_target: Option<String>,
}

/// Facts the agent reports about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// The agent's [`crate::PROTOCOL_VERSION`].
    pub version: u32,
    /// Sandbox id (also its hostname).
    pub sandbox_id: String,
    /// Milliseconds since the agent started.
    pub uptime_ms: u64,
    /// Processes currently running.
    pub running: usize,
}

/// Successful answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Response {
    /// Answer to [`Request::Hello`].
    Hello(AgentInfo),
    /// A process was started.
    Started {
        /// Its pid inside the sandbox.
        pid: Pid,
    },
    /// Streaming begins; events follow.
    Attached {
        /// Current state when attaching.
        process: ProcessInfo,
        /// Bytes below the requested offsets that are no longer retained (0 when none lost).
        dropped: u64,
    },
    /// The process table.
    Processes {
        /// Entries ordered by pid.
        processes: Vec<ProcessInfo>,
    },
    /// One process.
    Process(ProcessInfo),
    /// File content is in the data part.
    FileData {
        /// Total size of the file.
        size: u64,
        /// Offset of the first returned byte.
        offset: u64,
    },
    /// Directory listing.
    Entries {
        /// Entries sorted by name.
        entries: Vec<FileStat>,
    },
    /// Metadata.
    Stat(FileStat),
    /// The request succeeded with nothing to return.
    Done,
    /// Answer to [`Request::Info`].
    Info(AgentInfo),
    /// Answer to [`Request::Watch`]: events of the watch carry this id.
    Watching {
        /// Unique for the agent's lifetime.
        watch: u64,
    },
}

/// What happened to a name in a watched directory ([`AgentMessage::FileEvent`]). The agent's
/// own atomic writes (a temporary file renamed over the name) show as `create` then `write`
/// of the name, never as their temporary file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileEventKind {
    /// The name appeared (created, or moved here).
    Create,
    /// The file's content changed.
    Write,
    /// The name was removed.
    Remove,
    /// The name was moved away (its new name, if watched, gets a `create`).
    Rename,
    /// Its permissions, owner or timestamps changed.
    Chmod,
    /// Events were lost (the queue of this watch or the kernel's was full); `name` is empty.
    /// Whoever needs the exact state should list the directory again.
    Overflow,
}

/// Error categories, so callers can map them to exit codes or HTTP statuses in one place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Malformed or contradictory request.
    InvalidArgument,
    /// The path or user does not exist.
    NotFound,
    /// The program to execute was not found (a shell reports 127).
    CommandNotFound,
    /// Permission denied (a shell reports 126 for exec).
    PermissionDenied,
    /// The target already exists.
    AlreadyExists,
    /// A directory was expected.
    NotADirectory,
    /// A file was expected.
    IsADirectory,
    /// The directory is not empty.
    DirectoryNotEmpty,
    /// The path resolves outside the sandbox root.
    OutsideSandbox,
    /// No such process in the table.
    NoSuchProcess,
    /// The process is still running (e.g. release).
    StillRunning,
    /// The request needs a PTY or a stdin pipe the process does not have.
    NotSupported,
    /// A size limit was exceeded.
    TooLarge,
    /// Protocol version mismatch.
    VersionMismatch,
    /// Nothing accepts connections on the port asked for ([`Request::ConnectPort`]).
    ConnectionRefused,
    /// Any other failure inside the agent.
    Internal,
}

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct AgentError {
    /// Category.
    pub code: ErrorCode,
    /// Human-readable message naming the problem (no trailing period).
    pub message: String,
}

impl AgentError {
    /// Builds an error.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// Whether this is how an agent answers a request it does not know (an agent older than
    /// the client): the request's `op` was an unknown variant.
    pub fn is_unknown_request(&self) -> bool {
        self.code == ErrorCode::InvalidArgument
            && self
                .message
                .starts_with("malformed request: unknown variant")
    }
}

/// Everything the agent sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMessage {
    /// Answer to the request with the same id.
    Response {
        /// Request id.
        id: u64,
        /// Outcome.
        result: Result<Response, AgentError>,
    },
    /// Output bytes (in the data part) of an attached process.
    Output {
        /// Process.
        pid: Pid,
        /// Stream.
        stream: Stream,
        /// Offset of the first byte of this chunk in the stream.
        offset: u64,
    },
    /// An attached process ended; no more output follows for it.
    Exit {
        /// Process.
        pid: Pid,
        /// How it ended.
        status: ExitStatus,
    },
    /// A program inside connected to the port of this connection's [`Request::RelayEgress`];
    /// claim the connection with [`Request::TakeConnection`].
    Incoming {
        /// Id to claim it by (unique for the agent's lifetime).
        conn: u64,
    },
    /// A change in a directory this connection watches ([`Request::Watch`]).
    FileEvent {
        /// The watch.
        watch: u64,
        /// Path relative to the watched directory (`sub/file.txt` in a recursive watch;
        /// empty for [`FileEventKind::Overflow`]).
        name: String,
        /// What happened.
        kind: FileEventKind,
    },
    /// A watch ended by itself: its directory was removed or moved out of reach (or the
    /// agent had to drop it). No event of it follows.
    WatchEnded {
        /// The watch.
        watch: u64,
        /// Why, e.g. "the watched directory was removed".
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell() {
        let killed = ExitStatus {
            signal: Some(9),
            ..Default::default()
        };
        assert_eq!(killed.shell_code(), 137);
        let ok = ExitStatus {
            code: Some(0),
            ..Default::default()
        };
        assert!(ok.success());
        assert_eq!(ok.shell_code(), 0);
    }

    #[test]
    fn stat_responses_round_trip() {
        let stat = FileStat {
            name: "/x".into(),
            kind: FileKind::Symlink,
            size: 1,
            mode: 0o777,
            uid: 0,
            gid: 0,
            modified_ms: 5,
            symlink_target: Some("y".into()),
        };
        let msg = AgentMessage::Response {
            id: 3,
            result: Ok(Response::Stat(stat)),
        };
        let json = serde_json::to_string(&msg).unwrap();
        let back: AgentMessage = serde_json::from_str(&json).unwrap();
        assert_eq!(back, msg);
    }

    #[test]
    fn requests_have_a_stable_json_shape() {
        let req = RequestEnvelope {
            id: 1,
            request: Request::Signal {
                pid: 5,
                signal: 15,
                group: true,
            },
        };
        let json = serde_json::to_value(&req).unwrap();
        assert_eq!(json["request"]["op"], "signal");
        let back: RequestEnvelope = serde_json::from_value(json).unwrap();
        assert_eq!(back, req);
        let minimal: Request = serde_json::from_str(r#"{"op":"exec","argv":["true"]}"#).unwrap();
        assert!(
            matches!(minimal, Request::Exec(ExecRequest { ref argv, .. }) if argv == &["true"])
        );
    }

    #[test]
    fn relay_messages_have_a_stable_json_shape() {
        let req: Request = serde_json::from_str(r#"{"op":"connect_port","port":8080}"#).unwrap();
        assert_eq!(req, Request::ConnectPort { port: 8080 });
        let req: Request = serde_json::from_str(r#"{"op":"relay_egress","port":3128}"#).unwrap();
        assert_eq!(req, Request::RelayEgress { port: 3128 });
        let req: Request = serde_json::from_str(r#"{"op":"take_connection","conn":7}"#).unwrap();
        assert_eq!(req, Request::TakeConnection { conn: 7 });
        assert!(
            serde_json::from_str::<Request>(r#"{"op":"connect_port","port":70000}"#).is_err(),
            "a port above 65535 does not decode"
        );
        let msg = serde_json::to_value(AgentMessage::Incoming { conn: 9 }).unwrap();
        assert_eq!(msg, serde_json::json!({"type": "incoming", "conn": 9}));
        let code = serde_json::to_value(ErrorCode::ConnectionRefused).unwrap();
        assert_eq!(code, "connection_refused");
    }

    #[test]
    fn symlink_requests_have_a_stable_json_shape() {
        let req: Request =
            serde_json::from_str(r#"{"op":"symlink","target":"../a","path":"/w/l"}"#).unwrap();
        assert_eq!(
            req,
            Request::Symlink {
                target: "../a".into(),
                path: "/w/l".into(),
                parents: false
            }
        );
        let json = serde_json::to_value(Request::Symlink {
            target: "/etc".into(),
            path: "/w/l".into(),
            parents: true,
        })
        .unwrap();
        assert_eq!(
            json,
            serde_json::json!({"op": "symlink", "target": "/etc", "path": "/w/l", "parents": true})
        );
    }

    #[test]
    fn watch_messages_have_a_stable_json_shape() {
        let req: Request = serde_json::from_str(r#"{"op":"watch","path":"/tmp"}"#).unwrap();
        assert_eq!(
            req,
            Request::Watch {
                path: "/tmp".into(),
                recursive: false
            }
        );
        let req: Request = serde_json::from_str(r#"{"op":"unwatch","watch":3}"#).unwrap();
        assert_eq!(req, Request::Unwatch { watch: 3 });
        let resp = serde_json::to_value(Response::Watching { watch: 4 }).unwrap();
        assert_eq!(resp, serde_json::json!({"kind": "watching", "watch": 4}));
        let msg = AgentMessage::FileEvent {
            watch: 4,
            name: "sub/a.txt".into(),
            kind: FileEventKind::Create,
        };
        let json = serde_json::to_value(&msg).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"type": "file_event", "watch": 4, "name": "sub/a.txt", "kind": "create"})
        );
        assert_eq!(serde_json::from_value::<AgentMessage>(json).unwrap(), msg);
        let ended = serde_json::to_value(AgentMessage::WatchEnded {
            watch: 4,
            reason: "gone".into(),
        })
        .unwrap();
        assert_eq!(ended["type"], "watch_ended");
    }

    #[test]
    fn an_old_agents_answer_to_a_new_request_is_recognised() {
        // What an agent without `watch` answers (its decode error, prefixed by the connection).
        let e = serde_json::from_str::<RequestEnvelope>(r#"{"id":1,"request":{"op":"teleport"}}"#)
            .unwrap_err();
        let err = AgentError::new(
            ErrorCode::InvalidArgument,
            format!("malformed request: {e}"),
        );
        assert!(err.is_unknown_request(), "{}", err.message);
        let other = AgentError::new(
            ErrorCode::InvalidArgument,
            "malformed request: missing field `path`",
        );
        assert!(!other.is_unknown_request());
    }
}
