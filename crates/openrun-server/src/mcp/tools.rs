//! The MCP tools: each checks what only it can check (a combination of arguments, a text
//! encoding), calls the core call `/v1` uses, and shows the answer as readable text plus
//! structured content. A failed core call is a tool error ([`tool_error`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use openrun_protocol::{
    AttachRequest, ExecRequest, FileKind, Pid, ProcessInfo, ProcessState, Stream, MAX_DATA_LEN,
};
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ContentBlock};
use rmcp::schemars::JsonSchema;
use rmcp::service::RequestContext;
use rmcp::{tool, tool_router, RoleServer};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::text::{self, Capture};
use super::{refuse, tool_error, OpenrunMcp, Who};
use crate::error::ApiError;
use crate::exec::{Input, Line, NotEnded};

/// A tool's answer: `Err` is a result with `isError` set (rmcp marks it so).
type Answer = Result<CallToolResult, CallToolResult>;

/// Turns a core call's failure into a tool error.
trait OrTool<T> {
    fn or_tool(self) -> Result<T, CallToolResult>;
}

impl<T> OrTool<T> for Result<T, ApiError> {
    fn or_tool(self) -> Result<T, CallToolResult> {
        self.map_err(tool_error)
    }
}

/// A successful answer: `text` for the model, `structured` (a JSON object) for programs.
fn answer(text: String, structured: Value) -> Answer {
    let mut result = CallToolResult::success(vec![ContentBlock::text(text)]);
    result.structured_content = Some(structured);
    Ok(result)
}

/// `run_command`'s timeout when none is given.
const DEFAULT_TIMEOUT_SECS: u64 = 120;
/// Longest timeout of `run_command` (longer work: `start_process`).
pub(super) const MAX_TIMEOUT_SECS: u64 = 3600;
/// How long past its timeout `run_command` waits for the exit the agent reports.
const EXIT_GRACE: Duration = Duration::from_secs(15);
/// Output bytes per stream one `read_process_output` returns.
const READ_OUTPUT_BYTES: usize = 32 * 1024;
/// Longest wait of `read_process_output`.
const MAX_WAIT_SECS: u64 = 60;
/// How long `read_process_output` without a wait reads the output there is, at most.
const SNAPSHOT_BOUND: Duration = Duration::from_secs(10);
/// Once new output arrived, how long `read_process_output` waits for more before answering.
const SETTLE: Duration = Duration::from_millis(500);
/// Bytes of a file `read_file` reads to find the lines asked for.
const READ_FILE_BYTES: u64 = 4 * 1024 * 1024;
/// Text bytes one `read_file` returns.
const READ_TEXT_BYTES: usize = 64 * 1024;
/// Lines `read_file` returns when no limit is given.
const DEFAULT_LINES: usize = 2000;
/// Binary bytes `read_file` returns (as base64).
const READ_BINARY_BYTES: usize = 48 * 1024;
/// Entries `list_files` shows.
const MAX_ENTRIES: usize = 1000;
/// Patch bytes `diff` shows.
const DIFF_TEXT_BYTES: usize = 64 * 1024;
/// Events `timeline` returns when no limit is given, and at most.
const DEFAULT_EVENTS: usize = 100;
const MAX_EVENTS: usize = 1000;
/// Characters of an event's payload shown in the text.
const EVENT_PAYLOAD_CHARS: usize = 300;
/// Stdin bytes sent to the agent per message.
const STDIN_CHUNK: usize = 1024 * 1024;

/// A CPU limit as a number or a string.
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(untagged)]
pub(crate) enum Cpus {
    /// CPUs, e.g. 1.5.
    Number(f64),
    /// CPUs as text, e.g. "1.5".
    Text(String),
}

/// Network access of a new sandbox.
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub(crate) struct NetworkParam {
    /// "none" (no network but the sandbox's own loopback; the default), "allowlist" (only the
    /// domains and CIDRs of `allow`, through an egress proxy: HTTP(S)_PROXY is set inside) or
    /// "open" (everything; only if the server allows it).
    mode: String,
    /// For "allowlist": domains (`pypi.org`, `*.github.com`) and CIDRs that may be reached.
    #[serde(default)]
    allow: Vec<String>,
}

/// Parameters of `create_sandbox`.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateParams {
    /// Image: "host" (the default: the host's userland, read-only: sh, bash, python3,
    /// coreutils) or the name of an image on the server (a snapshot, or `openrun image ls`).
    image: Option<String>,
    /// Memory limit, e.g. "512M", "2G" (default: the server's).
    memory: Option<String>,
    /// CPU limit in CPUs, e.g. 1.5 (default: the server's).
    cpus: Option<Cpus>,
    /// Lifetime, e.g. "30m", "2h" (default "15m"): the sandbox is destroyed after it.
    ttl: Option<String>,
    /// Environment variables of every command.
    env: Option<BTreeMap<String, String>>,
    /// Labels to find it by later.
    labels: Option<BTreeMap<String, String>>,
    /// Network access (default: none).
    network: Option<NetworkParam>,
}

/// Parameters naming a sandbox.
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub(crate) struct SandboxParam {
    /// Sandbox id (from create_sandbox or list_sandboxes).
    sandbox_id: String,
}

/// Parameters of `list_sandboxes`.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub(crate) struct ListParams {
    /// Only sandboxes in this state: "running", "paused", "creating", "stopped" or "error"
    /// (default: the live ones: running, paused and creating).
    state: Option<String>,
    /// Sandboxes to return, 1 to 1000 (default 100).
    limit: Option<u32>,
    /// Where to go on: the `next_cursor` of the previous call.
    cursor: Option<String>,
}

/// Parameters of `run_command`.
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub(crate) struct RunParams {
    /// Sandbox id.
    sandbox_id: String,
    /// A shell command line, run with `sh -c` (pipes, redirections, `&&` work). Give this or
    /// `argv`.
    command: Option<String>,
    /// Program and arguments, run without a shell. Give this or `command`.
    argv: Option<Vec<String>>,
    /// Working directory (default: the user's home, else /).
    cwd: Option<String>,
    /// Extra environment variables.
    env: Option<BTreeMap<String, String>>,
    /// Seconds before the command is killed (default 120, at most 3600).
    timeout_seconds: Option<u64>,
    /// Text for the command's standard input (default: none, stdin is /dev/null).
    stdin: Option<String>,
}

/// Parameters of `start_process`.
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub(crate) struct StartParams {
    /// Sandbox id.
    sandbox_id: String,
    /// A shell command line, run with `sh -c`. Give this or `argv`.
    command: Option<String>,
    /// Program and arguments, run without a shell. Give this or `command`.
    argv: Option<Vec<String>>,
    /// Working directory (default: the user's home, else /).
    cwd: Option<String>,
    /// Extra environment variables.
    env: Option<BTreeMap<String, String>>,
    /// Seconds before the process is killed (default: it runs until it ends or the sandbox
    /// does).
    timeout_seconds: Option<u64>,
    /// Keep its standard input open for write_process_stdin (default false: stdin is
    /// /dev/null).
    stdin: Option<bool>,
}

/// Parameters of `write_process_stdin`.
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub(crate) struct StdinParams {
    /// Sandbox id.
    sandbox_id: String,
    /// Process id (started with start_process and stdin true).
    pid: Pid,
    /// Text to write (include the newline a line-reading program waits for).
    input: String,
    /// Close its standard input after writing (end of input), default false.
    eof: Option<bool>,
}

/// Parameters of `read_process_output`.
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub(crate) struct OutputParams {
    /// Sandbox id.
    sandbox_id: String,
    /// Process id (from start_process).
    pid: Pid,
    /// First stdout byte wanted (default 0; pass the `stdout_next` of the previous call to get
    /// only new output).
    stdout_since: Option<u64>,
    /// First stderr byte wanted (default 0; pass the previous `stderr_next`).
    stderr_since: Option<u64>,
    /// Wait up to this many seconds (at most 60) for new output or the exit (default 0: answer
    /// at once with what there is).
    wait_seconds: Option<u64>,
}

/// Parameters of `kill_process`.
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub(crate) struct KillParams {
    /// Sandbox id.
    sandbox_id: String,
    /// Process id.
    pid: Pid,
    /// Signal: "KILL" (the default), "TERM", "INT", "HUP", "QUIT", "USR1", "USR2", "STOP",
    /// "CONT" or a number. Sent to the process's whole group (its children too).
    signal: Option<String>,
}

/// Parameters of `read_file`.
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub(crate) struct ReadParams {
    /// Sandbox id.
    sandbox_id: String,
    /// Absolute path inside the sandbox.
    path: String,
    /// First line to return, 1-based (default 1).
    offset: Option<usize>,
    /// Lines to return (default 2000).
    limit: Option<usize>,
    /// Read from this byte instead of by lines (for a line longer than one answer, or the rest
    /// of a binary file): up to 64 KiB of text or 48 KiB of binary (base64) from there; the
    /// answer's next_byte_offset continues. offset and limit are then ignored.
    byte_offset: Option<u64>,
}

/// How `write_file`'s content is encoded.
#[derive(Debug, Default, Clone, Copy, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(rename_all = "lowercase")]
pub(crate) enum Encoding {
    /// Text, written as UTF-8.
    #[default]
    Text,
    /// Base64 of the bytes (binary files).
    Base64,
}

/// Parameters of `write_file`.
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub(crate) struct WriteParams {
    /// Sandbox id.
    sandbox_id: String,
    /// Absolute path inside the sandbox; missing parent directories are created.
    path: String,
    /// The whole new content.
    content: String,
    /// "text" (the default) or "base64" (content is base64 of the bytes).
    encoding: Option<Encoding>,
    /// Octal permissions of a new file, e.g. "755" for a script (default "644"; an existing
    /// file keeps its own).
    mode: Option<String>,
    /// Add content at the end of the file instead of replacing it (default false): how to
    /// write a file larger than one call takes (16 MiB), in parts.
    append: Option<bool>,
}

/// Parameters of `list_files`.
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub(crate) struct ListFilesParams {
    /// Sandbox id.
    sandbox_id: String,
    /// Absolute path of a directory (default "/").
    path: Option<String>,
}

/// Parameters of `edit_file`.
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub(crate) struct EditParams {
    /// Sandbox id.
    sandbox_id: String,
    /// Absolute path of a text file.
    path: String,
    /// The exact text to replace (whitespace and indentation included). It must occur exactly
    /// once unless replace_all is set.
    old_string: String,
    /// The text to put in its place.
    new_string: String,
    /// Replace every occurrence (default false).
    replace_all: Option<bool>,
}

/// Parameters of `environment`.
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub(crate) struct EnvironmentParams {
    /// Sandbox id.
    sandbox_id: String,
    /// Probe again instead of answering from the cache (after installing something).
    refresh: Option<bool>,
}

/// Parameters of `snapshot`.
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub(crate) struct SnapshotParams {
    /// Sandbox id.
    sandbox_id: String,
    /// Name of the new image, `name[:tag]` (default `snap-<id>-<n>`).
    name: Option<String>,
}

/// Parameters of `fork`.
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub(crate) struct ForkParams {
    /// Sandbox id.
    sandbox_id: String,
    /// Number of copies, 1 to 100 (default 1).
    count: Option<u64>,
    /// Name of the snapshot image (default `snap-<id>-<n>`).
    name: Option<String>,
    /// Lifetime of each copy, e.g. "30m" (default "15m").
    ttl: Option<String>,
}

/// Parameters of `diff`.
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub(crate) struct DiffParams {
    /// Sandbox id.
    sandbox_id: String,
    /// Only this absolute path (a file, or a directory and what is below it).
    path: Option<String>,
    /// Compare with this image (e.g. a snapshot) instead of the sandbox's own.
    against: Option<String>,
}

/// Parameters of `preview_url`.
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub(crate) struct PreviewParams {
    /// Sandbox id.
    sandbox_id: String,
    /// Port a server listens on inside the sandbox, 1 to 65535.
    port: u32,
    /// How long the URL works, e.g. "30m" (default "1h", at most "7d").
    ttl: Option<String>,
}

/// Parameters of `timeline`.
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub(crate) struct TimelineParams {
    /// Sandbox id (also of a destroyed sandbox: its timeline is kept).
    sandbox_id: String,
    /// Only events after this sequence number (the `next_since` of the previous call).
    since: Option<i64>,
    /// Events to return, 1 to 1000 (default 100).
    limit: Option<usize>,
}

/// The states `list_sandboxes` shows by default.
const LIVE_STATES: [&str; 3] = ["running", "paused", "creating"];
/// Sandboxes `list_sandboxes` returns when no limit is given.
const DEFAULT_SANDBOXES: u32 = 100;
/// Rows `list_sandboxes` reads at most per state (a tenant with more ended sandboxes should
/// ask the REST list, which pages).
const MAX_SCANNED: usize = 20_000;

/// Step lines `up` shows.
const UP_STEP_LINES: usize = 40;

/// What `up` saw of an open's progress: its step lines and the end of the output.
#[derive(Debug, Default)]
struct UpLog {
    steps: std::collections::VecDeque<String>,
    /// The end of the commands' output.
    output: crate::up::run::Tail,
}

impl UpLog {
    /// Takes `event` in; returns the line shown for a step event.
    fn push(&mut self, event: crate::up::UpEvent) -> Option<String> {
        use crate::up::UpEvent;
        match event {
            UpEvent::Step {
                step,
                command,
                status,
                duration_ms,
                exit_code,
            } => {
                let status = serde_json::to_value(status)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                let mut line = format!("{step}: {status}");
                if let Some(code) = exit_code.filter(|c| *c != 0) {
                    line.push_str(&format!(" (exit {code})"));
                }
                if let Some(ms) = duration_ms {
                    line.push_str(&format!(" {ms} ms"));
                }
                if let (Some(command), "running") = (command, status.as_str()) {
                    line.push_str(&format!(": {command}"));
                }
                if self.steps.len() == UP_STEP_LINES {
                    self.steps.pop_front();
                }
                self.steps.push_back(line.clone());
                Some(line)
            }
            UpEvent::Output { data_b64, .. } => {
                let data = base64::engine::general_purpose::STANDARD
                    .decode(data_b64)
                    .unwrap_or_default();
                self.output.push(&data);
                None
            }
            UpEvent::Plan { .. } => None,
        }
    }

    fn output_text(&self) -> String {
        self.output.text()
    }
}

/// A `list_sandboxes` cursor: `created_at:id` of the last sandbox shown.
fn parse_cursor(cursor: &str) -> Option<(i64, String)> {
    let (created_at, id) = cursor.split_once(':')?;
    Some((created_at.parse().ok()?, id.to_string())).filter(|(_, id)| !id.is_empty())
}

/// The argv of `command` (through `sh -c`) or `argv`: exactly one must be given.
fn argv_of(
    command: Option<String>,
    argv: Option<Vec<String>>,
) -> Result<Vec<String>, CallToolResult> {
    match (command, argv) {
        (Some(command), None) if !command.trim().is_empty() => {
            Ok(vec!["/bin/sh".into(), "-c".into(), command])
        }
        (None, Some(argv)) if !argv.is_empty() => Ok(argv),
        (Some(_), Some(_)) => Err(refuse(
            "invalid_argument",
            "give either command (a shell command line) or argv (program and arguments), not both",
        )),
        _ => Err(refuse(
            "invalid_argument",
            "nothing to run: give command (a shell command line, e.g. \"ls -la /\") or argv \
             (e.g. [\"ls\", \"-la\", \"/\"])",
        )),
    }
}

/// Milliseconds of `run_command`'s `timeout_seconds`, checked to be 1 to [`MAX_TIMEOUT_SECS`].
fn timeout_ms(seconds: u64) -> Result<u64, CallToolResult> {
    if !(1..=MAX_TIMEOUT_SECS).contains(&seconds) {
        return Err(refuse(
            "invalid_argument",
            format!(
                "timeout_seconds must be 1 to {MAX_TIMEOUT_SECS}, not {seconds}; for longer work \
                 use start_process and read_process_output"
            ),
        ));
    }
    Ok(seconds * 1000)
}

/// Milliseconds of `start_process`'s `timeout_seconds` (at least 1; no upper bound but the
/// sandbox's life).
fn process_timeout_ms(seconds: u64) -> Result<u64, CallToolResult> {
    match seconds.checked_mul(1000) {
        Some(ms) if seconds >= 1 => Ok(ms),
        _ => Err(refuse(
            "invalid_argument",
            format!(
                "timeout_seconds must be at least 1, not {seconds}; leave it out to let the \
                 process run until it ends or the sandbox does"
            ),
        )),
    }
}

/// A signal given by name (with or without `SIG`) or number.
fn signal_number(name: &str) -> Option<i32> {
    let name = name.trim();
    if let Ok(n) = name.parse::<i32>() {
        return Some(n);
    }
    let upper = name.to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    Some(match bare {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "KILL" => 9,
        "USR1" => 10,
        "USR2" => 12,
        "TERM" => 15,
        "CONT" => 18,
        "STOP" => 19,
        _ => return None,
    })
}

/// How a process ended, in words.
fn describe_exit(code: Option<i32>, signal: Option<i32>, timed_out: bool, oom: bool) -> String {
    let mut text = match (code, signal) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => "ended".to_string(),
    };
    if timed_out {
        text.push_str(" (timed out: killed at its timeout)");
    }
    if oom {
        text.push_str(" (out of memory: killed by the sandbox's memory limit)");
    }
    text
}

/// The text of a sandbox resource, one line.
fn sandbox_line(resource: &Value) -> String {
    let field = |name: &str| resource.get(name).and_then(Value::as_str).unwrap_or("-");
    format!(
        "{}  {}  image={}  expires={}",
        field("id"),
        field("state"),
        field("image"),
        field("expires_at")
    )
}

fn to_value<T: serde::Serialize>(value: &T) -> Result<Value, CallToolResult> {
    serde_json::to_value(value)
        .map_err(|e| tool_error(ApiError::internal("cannot encode the answer", e)))
}

/// A tool error of `run_command` with the output captured before it (not lost with it).
fn with_output(mut result: CallToolResult, stdout: &Capture, stderr: &Capture) -> CallToolResult {
    if stdout.total() == 0 && stderr.total() == 0 {
        return result;
    }
    let (out, err) = (stdout.text(), stderr.text());
    result.content.push(ContentBlock::text(format!(
        "Output before the error:\nstdout:\n{out}\nstderr:\n{err}"
    )));
    if let Some(Value::Object(fields)) = result.structured_content.as_mut() {
        fields.insert("stdout".into(), json!(out));
        fields.insert("stderr".into(), json!(err));
    }
    result
}

/// The tool error of a file too large for `edit_file`.
fn too_big_to_edit(path: &str, size: u64) -> CallToolResult {
    refuse(
        "body_too_large",
        format!(
            "{path} has {size} bytes; edit_file works on files up to {MAX_DATA_LEN} bytes: use \
             run_command (sed, python) for this one"
        ),
    )
}

/// Where a symlink at `link` with `target` points, as an absolute path when the target is
/// relative (resolved lexically against the link's directory).
fn link_target(link: &str, target: &str) -> String {
    if target.starts_with('/') {
        return crate::files::normalize_path(target);
    }
    let dir = link.rsplit_once('/').map_or("", |(dir, _)| dir);
    crate::files::normalize_path(&format!("{dir}/{target}"))
}

/// The turn of each (sandbox, file) being edited.
type TurnMap = HashMap<(String, String), Arc<tokio::sync::Mutex<()>>>;

/// One turn per (sandbox, file) for `edit_file` and `write_file`, across every session.
#[derive(Debug, Default)]
pub(crate) struct EditLocks(std::sync::Mutex<TurnMap>);

/// A file's turn; the entry goes when nobody waits for it any more.
pub(crate) struct EditTurn<'a> {
    locks: &'a EditLocks,
    key: (String, String),
    turn: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl EditLocks {
    fn map(&self) -> std::sync::MutexGuard<'_, TurnMap> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for the turn of `path` in `sandbox`.
    pub(crate) async fn lock(&self, sandbox: &str, path: &str) -> EditTurn<'_> {
        let key = (sandbox.to_string(), crate::files::normalize_path(path));
        let mutex = self.map().entry(key.clone()).or_default().clone();
        let turn = mutex.lock_owned().await;
        EditTurn {
            locks: self,
            key,
            turn: Some(turn),
        }
    }
}

impl Drop for EditTurn<'_> {
    fn drop(&mut self) {
        drop(self.turn.take());
        let mut map = self.locks.map();
        if map
            .get(&self.key)
            .is_some_and(|m| Arc::strong_count(m) == 1)
        {
            map.remove(&self.key);
        }
    }
}

/// A process's state, in words.
fn process_line(p: &ProcessInfo) -> String {
    let state = match &p.state {
        ProcessState::Running => "running".to_string(),
        ProcessState::Exited { status } => describe_exit(
            status.code,
            status.signal,
            status.timed_out,
            status.oom_killed,
        ),
    };
    // A command line may be a whole script: its first line, shortened, says enough.
    let argv = p.argv.join(" ");
    let first = argv.lines().next().unwrap_or_default();
    let (shown, cut) = text::bounded(first, 120);
    let more = if cut || first.len() < argv.len() {
        " …"
    } else {
        ""
    };
    format!(
        "pid {}  {}  stdout {} B  stderr {} B  {shown}{more}",
        p.pid, state, p.stdout_len, p.stderr_len
    )
}

#[tool_router(vis = "pub(super)")]
impl OpenrunMcp {
    /// Creates a sandbox.
    #[tool(
        description = "Create a new isolated Linux sandbox and return its id. Use this first: \
        every other tool takes the sandbox_id it returns. Defaults: image \"host\" (sh, bash, \
        python3, coreutils), the server's memory/CPU limits, a 15 minute ttl, no network. Call \
        destroy_sandbox when done.",
        annotations(
            title = "Create sandbox",
            read_only_hint = false,
            destructive_hint = false,
            open_world_hint = false
        )
    )]
    async fn create_sandbox(&self, who: Who, Parameters(p): Parameters<CreateParams>) -> Answer {
        let mut body = serde_json::Map::new();
        if let Some(image) = p.image {
            body.insert("image".into(), json!(image));
        }
        if let Some(memory) = p.memory {
            body.insert("memory".into(), json!(memory));
        }
        match p.cpus {
            Some(Cpus::Number(n)) => body.insert("cpus".into(), json!(n.to_string())),
            Some(Cpus::Text(t)) => body.insert("cpus".into(), json!(t)),
            None => None,
        };
        if let Some(ttl) = p.ttl {
            body.insert("ttl".into(), json!(ttl));
        }
        if let Some(env) = p.env {
            body.insert("env".into(), json!(env));
        }
        if let Some(labels) = p.labels {
            body.insert("labels".into(), json!(labels));
        }
        if let Some(network) = p.network {
            body.insert(
                "network".into(),
                json!({ "mode": network.mode, "allow": network.allow }),
            );
        }
        let body = serde_json::from_value(Value::Object(body))
            .map_err(|e| ApiError::InvalidArgument(format!("invalid sandbox options: {e}")))
            .or_tool()?;
        let s = self.state.clone();
        let caller = who.caller.clone();
        let create = async move { crate::api::create_sandbox(&s, &caller, body).await };
        let resource = crate::admission::admitted(&self.state, create, Result::is_ok)
            .await
            .and_then(|created| created)
            .or_tool()?;
        let value = to_value(&resource)?;
        answer(
            format!(
                "Created sandbox {} (image {}, expires {}). Pass sandbox_id \"{}\" to run_command, \
                 write_file, read_file and the other tools.",
                resource.id(),
                value["image"].as_str().unwrap_or("host"),
                value["expires_at"].as_str().unwrap_or("never"),
                resource.id()
            ),
            value,
        )
    }

    /// Lists the caller's sandboxes.
    #[tool(
        description = "List your live sandboxes (running, paused, creating; id, state, image, \
        expiry), newest first; state=\"stopped\" lists ended ones. Use it to find a sandbox_id \
        again or to see what is still running. When more is true, pass next_cursor as cursor.",
        annotations(
            title = "List sandboxes",
            read_only_hint = true,
            open_world_hint = false
        )
    )]
    async fn list_sandboxes(&self, who: Who, Parameters(p): Parameters<ListParams>) -> Answer {
        let states: Vec<String> = match &p.state {
            Some(state) if crate::api::STATES.contains(&state.as_str()) => vec![state.clone()],
            Some(state) => {
                return Err(refuse(
                    "invalid_argument",
                    format!(
                        "state must be one of {:?}, not {state:?}",
                        crate::api::STATES
                    ),
                ))
            }
            None => LIVE_STATES.iter().map(|s| s.to_string()).collect(),
        };
        let limit = p.limit.unwrap_or(DEFAULT_SANDBOXES) as usize;
        if !(1..=crate::api::MAX_PAGE as usize).contains(&limit) {
            return Err(refuse(
                "invalid_argument",
                format!("limit must be 1 to {}, not {limit}", crate::api::MAX_PAGE),
            ));
        }
        let before = match p.cursor.as_deref() {
            None => None,
            Some(cursor) => Some(parse_cursor(cursor).ok_or_else(|| {
                refuse(
                    "invalid_argument",
                    format!(
                        "cursor {cursor:?} is not one this tool gave: pass next_cursor of the \
                         previous call, or leave it out to start from the newest"
                    ),
                )
            })?),
        };
        // Every row of the states asked for (the core list pages oldest first), newest first.
        let mut rows = Vec::new();
        for state in states {
            let mut after = None;
            loop {
                let filter = crate::db::ListFilter {
                    state: Some(state.clone()),
                    after: after.clone(),
                    limit: crate::api::MAX_PAGE,
                    ..Default::default()
                };
                let page = crate::api::list_sandboxes(&self.state, &who.caller, filter)
                    .await
                    .or_tool()?;
                let full = page.len() >= crate::api::MAX_PAGE as usize;
                after = page.last().map(|r| (r.created_at, r.id.clone()));
                rows.extend(page);
                if !full || rows.len() >= MAX_SCANNED {
                    break;
                }
            }
        }
        rows.sort_by(|a, b| (b.created_at, &b.id).cmp(&(a.created_at, &a.id)));
        if let Some((created_at, id)) = &before {
            rows.retain(|r| (r.created_at, &r.id) < (*created_at, id));
        }
        let more = rows.len() > limit;
        rows.truncate(limit);
        let next_cursor = if more {
            rows.last().map(|r| format!("{}:{}", r.created_at, r.id))
        } else {
            None
        };
        let mut sandboxes = Vec::with_capacity(rows.len());
        for row in rows {
            let resource = crate::api::SandboxResource::from_row(row).or_tool()?;
            sandboxes.push(to_value(&resource)?);
        }
        let mut text = if sandboxes.is_empty() {
            match &p.state {
                Some(state) => format!("No {state} sandboxes."),
                None => "No live sandboxes (state \"stopped\" lists ended ones). create_sandbox \
                         makes one."
                    .to_string(),
            }
        } else {
            sandboxes
                .iter()
                .map(sandbox_line)
                .collect::<Vec<_>>()
                .join("\n")
        };
        if let Some(cursor) = &next_cursor {
            text.push_str(&format!("\nMore: call again with cursor={cursor:?}"));
        }
        answer(
            text,
            json!({ "sandboxes": sandboxes, "more": more, "next_cursor": next_cursor }),
        )
    }

    /// Destroys a sandbox.
    #[tool(
        description = "Destroy a sandbox: kills everything in it and deletes its files (its \
        timeline stays readable). Use it when the work is done; snapshot first to keep the \
        files.",
        annotations(
            title = "Destroy sandbox",
            destructive_hint = true,
            idempotent_hint = false,
            open_world_hint = false
        )
    )]
    async fn destroy_sandbox(&self, who: Who, Parameters(p): Parameters<SandboxParam>) -> Answer {
        let s = &self.state;
        let row = crate::api::find(s, &who.caller, &p.sandbox_id)
            .await
            .or_tool()?;
        crate::api::remove(s, &who.caller, row).await.or_tool()?;
        answer(
            format!("Destroyed sandbox {}.", p.sandbox_id),
            json!({ "sandbox_id": p.sandbox_id, "destroyed": true }),
        )
    }

    /// Runs a command and waits for it.
    #[tool(
        description = "Run a command in a sandbox and wait for it to finish; returns stdout, \
        stderr and the exit code. `command` is a shell line run with `sh -c` (pipes, `&&`, \
        redirections work); `argv` runs a program without a shell. Killed after timeout_seconds \
        (default 120). Long output keeps its start and end. For servers or jobs longer than a \
        few minutes use start_process instead.",
        annotations(
            title = "Run command",
            destructive_hint = true,
            open_world_hint = false
        )
    )]
    async fn run_command(
        &self,
        who: Who,
        context: RequestContext<RoleServer>,
        Parameters(p): Parameters<RunParams>,
    ) -> Answer {
        let argv = argv_of(p.command, p.argv)?;
        let seconds = p.timeout_seconds.unwrap_or(DEFAULT_TIMEOUT_SECS);
        let timeout = timeout_ms(seconds)?;
        let request = ExecRequest {
            argv,
            env: p.env.unwrap_or_default(),
            cwd: p.cwd,
            stdin: p.stdin.is_some(),
            timeout_ms: Some(timeout),
            tag: Some("mcp".into()),
            ..Default::default()
        };
        let input = p.stdin.map(|text| {
            let bytes = text.into_bytes();
            let chunks: Vec<Vec<u8>> = bytes.chunks(STDIN_CHUNK).map(<[u8]>::to_vec).collect();
            let (tx, rx) = mpsc::channel(chunks.len() + 1);
            for chunk in chunks {
                // The channel has room for every message.
                let _ = tx.try_send(Input::Stdin(chunk));
            }
            let _ = tx.try_send(Input::StdinEof);
            rx
        });
        let (mut stdout, mut stderr) = (Capture::default(), Capture::default());
        let ended = crate::exec::run_to_end(
            &self.state,
            &who.caller,
            &p.sandbox_id,
            request,
            input,
            EXIT_GRACE,
            // The client cancelled the call (notifications/cancelled): the command goes too,
            // with its children.
            context.ct.cancelled(),
            |stream, data| match stream {
                Stream::Stdout => stdout.push(data),
                Stream::Stderr => stderr.push(data),
            },
        )
        .await;
        let crate::exec::Ended {
            pid,
            code,
            signal,
            timed_out,
            oom_killed,
        } = match ended {
            Ok(ended) => ended,
            Err(NotEnded::Refused(e)) => return Err(tool_error(e)),
            Err(NotEnded::Cancelled) => {
                return Err(refuse(
                    "cancelled",
                    "the call was cancelled: the command was killed",
                ))
            }
            Err(NotEnded::NoEnd) => {
                return Err(with_output(
                    refuse(
                        "internal",
                        format!(
                            "the sandbox did not report the command's end {}s after its \
                             timeout",
                            EXIT_GRACE.as_secs()
                        ),
                    ),
                    &stdout,
                    &stderr,
                ))
            }
            Err(NotEnded::Error { code, message }) => {
                return Err(with_output(refuse(&code, message), &stdout, &stderr))
            }
            Err(NotEnded::Lost) => {
                return Err(with_output(
                    refuse(
                        "agent_lost",
                        "the command's output ended without an exit status (the sandbox may \
                         have stopped)",
                    ),
                    &stdout,
                    &stderr,
                ))
            }
        };
        let mut status = describe_exit(code, signal, timed_out, oom_killed);
        if timed_out {
            status = format!("{status} after {seconds} s");
        }
        let (out, err) = (stdout.text(), stderr.text());
        let show = |name: &str, text: &str| {
            if text.is_empty() {
                format!("{name}: (empty)\n")
            } else {
                format!(
                    "{name}:\n{text}{}",
                    if text.ends_with('\n') { "" } else { "\n" }
                )
            }
        };
        let text = format!("{status}\n{}{}", show("stdout", &out), show("stderr", &err));
        answer(
            text,
            json!({
                "exit_code": code,
                "signal": signal,
                "timed_out": timed_out,
                "oom_killed": oom_killed,
                "stdout": out,
                "stderr": err,
                "stdout_bytes": stdout.total(),
                "stderr_bytes": stderr.total(),
                "truncated": stdout.omitted() > 0 || stderr.omitted() > 0,
                "pid": pid,
            }),
        )
    }

    /// Starts a background process.
    #[tool(
        description = "Start a command in the background and return its pid at once: for \
        servers, watchers and long jobs. Then read_process_output (with wait_seconds to wait) \
        shows its output and whether it exited; kill_process stops it. `command` runs with \
        `sh -c`, `argv` without a shell.",
        annotations(
            title = "Start background process",
            destructive_hint = true,
            open_world_hint = false
        )
    )]
    async fn start_process(&self, who: Who, Parameters(p): Parameters<StartParams>) -> Answer {
        let shown = match (&p.command, &p.argv) {
            (Some(command), _) => command.clone(),
            (None, Some(argv)) => argv.join(" "),
            (None, None) => String::new(),
        };
        let argv = argv_of(p.command, p.argv)?;
        let timeout = p.timeout_seconds.map(process_timeout_ms).transpose()?;
        let stdin = p.stdin.unwrap_or(false);
        let request = ExecRequest {
            argv,
            env: p.env.unwrap_or_default(),
            cwd: p.cwd,
            timeout_ms: timeout,
            stdin,
            tag: Some("mcp".into()),
            ..Default::default()
        };
        let pid = crate::exec::start_background(&self.state, &who.caller, &p.sandbox_id, request)
            .await
            .or_tool()?;
        answer(
            format!(
                "Started pid {pid}: {}. read_process_output with pid {pid} (wait_seconds to \
                 wait) shows its output and exit;{} kill_process stops it.",
                text::bounded(&shown, 200).0,
                if stdin {
                    " write_process_stdin sends it input;"
                } else {
                    ""
                }
            ),
            json!({ "pid": pid, "stdin": stdin }),
        )
    }

    /// Reads a process's output.
    #[tool(
        description = "Read the output of a process started with start_process (or any pid of \
        list_processes): new stdout/stderr from the given offsets, and whether it has exited \
        with which code. Pass stdout_next/stderr_next of the previous call as \
        stdout_since/stderr_since to get only what is new; wait_seconds waits for output or \
        the exit.",
        annotations(
            title = "Read process output",
            read_only_hint = true,
            open_world_hint = false
        )
    )]
    async fn read_process_output(
        &self,
        who: Who,
        Parameters(p): Parameters<OutputParams>,
    ) -> Answer {
        let wait = p.wait_seconds.unwrap_or(0);
        if wait > MAX_WAIT_SECS {
            return Err(refuse(
                "invalid_argument",
                format!("wait_seconds must be 0 to {MAX_WAIT_SECS}, not {wait}"),
            ));
        }
        let (stdout_since, stderr_since) =
            (p.stdout_since.unwrap_or(0), p.stderr_since.unwrap_or(0));
        let request = AttachRequest {
            pid: p.pid,
            stdout_since,
            stderr_since,
            follow: wait > 0,
        };
        let mut lines =
            crate::processes::follow_output(&self.state, &who.caller, &p.sandbox_id, request)
                .await
                .or_tool()?;
        // Without a wait the stream (follow off) ends by itself after the output there is
        // (and the exit, if it ended): read it to its end, within a bound, instead of
        // answering before its first line arrived.
        let mut deadline = Instant::now()
            + if wait > 0 {
                Duration::from_secs(wait)
            } else {
                SNAPSHOT_BOUND
            };
        let mut out = Chunked::new(stdout_since);
        let mut err = Chunked::new(stderr_since);
        let mut exit = None;
        loop {
            let line = match tokio::time::timeout_at(deadline, lines.recv()).await {
                Ok(Some(line)) => line,
                Ok(None) | Err(_) => break,
            };
            let got_output = match line {
                Line::Started { .. } => false,
                Line::Stdout { offset, data } => out.push(offset, &data),
                Line::Stderr { offset, data } => err.push(offset, &data),
                Line::Exit {
                    code,
                    signal,
                    timed_out,
                    oom_killed,
                } => {
                    exit = Some((code, signal, timed_out, oom_killed));
                    break;
                }
                Line::Error { code, message } => return Err(refuse(&code, message)),
            };
            if got_output && wait > 0 {
                // Something new: answer soon, with what follows right after it.
                deadline = deadline.min(Instant::now() + SETTLE);
            }
            if out.full && err.full {
                break;
            }
        }
        let status = match exit {
            Some((code, signal, timed_out, oom)) => {
                format!(
                    "pid {}: {}",
                    p.pid,
                    describe_exit(code, signal, timed_out, oom)
                )
            }
            None => format!("pid {}: running", p.pid),
        };
        let mut text = format!(
            "{status}\nstdout (from byte {stdout_since}):\n{}\nstderr (from byte {stderr_since}):\n{}\n",
            out.text(),
            err.text()
        );
        if out.full || err.full {
            text.push_str("More output is waiting: call again with the next offsets.\n");
        }
        for (name, chunked) in [("stdout", &out), ("stderr", &err)] {
            if chunked.dropped > 0 {
                text.push_str(&format!(
                    "{} bytes of {name} were lost before this (the sandbox keeps only the latest \
                     output of a process: read more often, or redirect to a file).\n",
                    chunked.dropped
                ));
            }
        }
        text.push_str(&format!(
            "next: stdout_since={}, stderr_since={}",
            out.next, err.next
        ));
        let (code, signal, timed_out, oom_killed) = exit.unwrap_or((None, None, false, false));
        answer(
            text,
            json!({
                "pid": p.pid,
                "stdout": out.text(),
                "stderr": err.text(),
                "stdout_next": out.next,
                "stderr_next": err.next,
                "more": out.full || err.full,
                "stdout_dropped": out.dropped,
                "stderr_dropped": err.dropped,
                "exited": exit.is_some(),
                "exit_code": code,
                "signal": signal,
                "timed_out": timed_out,
                "oom_killed": oom_killed,
            }),
        )
    }

    /// Writes to a process's stdin.
    #[tool(
        description = "Write text to the standard input of a process started with start_process \
        and stdin true (a REPL, a program asking questions); eof closes its input. Then \
        read_process_output shows what it answered.",
        annotations(
            title = "Write process stdin",
            destructive_hint = true,
            open_world_hint = false
        )
    )]
    async fn write_process_stdin(
        &self,
        who: Who,
        Parameters(p): Parameters<StdinParams>,
    ) -> Answer {
        let eof = p.eof.unwrap_or(false);
        let bytes = p.input.len();
        crate::processes::write_stdin(
            &self.state,
            &who.caller,
            &p.sandbox_id,
            p.pid,
            p.input.into_bytes(),
            eof,
        )
        .await
        .or_tool()?;
        answer(
            format!(
                "Wrote {bytes} bytes to the stdin of pid {}{}.",
                p.pid,
                if eof { " and closed it" } else { "" }
            ),
            json!({ "pid": p.pid, "bytes": bytes, "closed": eof }),
        )
    }

    /// Lists processes.
    #[tool(
        description = "List the processes of a sandbox that were started through openrun \
        (running ones and ended ones not yet released), with their state and output sizes.",
        annotations(
            title = "List processes",
            read_only_hint = true,
            open_world_hint = false
        )
    )]
    async fn list_processes(&self, who: Who, Parameters(p): Parameters<SandboxParam>) -> Answer {
        let processes = crate::processes::list_processes(&self.state, &who.caller, &p.sandbox_id)
            .await
            .or_tool()?;
        let text = if processes.is_empty() {
            "No processes.".to_string()
        } else {
            processes
                .iter()
                .map(process_line)
                .collect::<Vec<_>>()
                .join("\n")
        };
        answer(text, json!({ "processes": to_value(&processes)? }))
    }

    /// Signals a process.
    #[tool(
        description = "Stop a process (default SIGKILL) or send it another signal (TERM, INT, \
        HUP, ...). The signal goes to its whole process group, so children started by a shell \
        stop too.",
        annotations(
            title = "Kill process",
            destructive_hint = true,
            open_world_hint = false
        )
    )]
    async fn kill_process(&self, who: Who, Parameters(p): Parameters<KillParams>) -> Answer {
        let name = p.signal.as_deref().unwrap_or("KILL");
        let Some(signal) = signal_number(name) else {
            return Err(refuse(
                "invalid_argument",
                format!("unknown signal {name:?}: use KILL, TERM, INT, HUP, QUIT, USR1, USR2, STOP, CONT or a number"),
            ));
        };
        crate::processes::signal_process(
            &self.state,
            &who.caller,
            &p.sandbox_id,
            p.pid,
            signal,
            true,
        )
        .await
        .or_tool()?;
        answer(
            format!(
                "Sent signal {signal} to pid {} and its process group.",
                p.pid
            ),
            json!({ "pid": p.pid, "signal": signal }),
        )
    }

    /// Reads a file.
    #[tool(
        description = "Read a file in a sandbox. Text comes back as lines (offset = first line, \
        1-based; limit = number of lines, default 2000); binary files as base64 (up to 48 KiB). \
        Read a file before edit_file to copy old_string exactly.",
        annotations(title = "Read file", read_only_hint = true, open_world_hint = false)
    )]
    async fn read_file(&self, who: Who, Parameters(p): Parameters<ReadParams>) -> Answer {
        if let Some(at) = p.byte_offset {
            return self.read_bytes(who, p, at).await;
        }
        let offset = p.offset.unwrap_or(1).max(1);
        let limit = p.limit.unwrap_or(DEFAULT_LINES);
        if limit == 0 {
            return Err(refuse("invalid_argument", "limit must be at least 1 line"));
        }
        let file = crate::files::read_file(
            &self.state,
            &who.caller,
            &p.sandbox_id,
            p.path.clone(),
            0,
            Some(READ_FILE_BYTES),
        )
        .await
        .or_tool()?;
        let partial = file.size > file.data.len() as u64;
        if !text::is_text(&file.data, partial) {
            let shown = &file.data[..file.data.len().min(READ_BINARY_BYTES)];
            let b64 = base64::engine::general_purpose::STANDARD.encode(shown);
            let more = file.size > shown.len() as u64;
            let mut note = format!(
                "{} is a binary file of {} bytes; base64 of {} below.",
                p.path,
                file.size,
                if more {
                    format!("its first {} bytes", shown.len())
                } else {
                    "all of it".to_string()
                }
            );
            if more {
                note.push_str(&format!(
                    " For the rest: byte_offset={} (or run_command with xxd, file, base64).",
                    shown.len()
                ));
            }
            return answer(
                format!("{note}\n{b64}"),
                json!({
                    "path": p.path, "encoding": "base64", "content": b64, "size": file.size,
                    "truncated": more,
                }),
            );
        }
        let valid = match std::str::from_utf8(&file.data) {
            Ok(text) => text,
            // A read cut inside a character: the complete part.
            Err(e) => std::str::from_utf8(&file.data[..e.valid_up_to()]).unwrap_or(""),
        };
        let w = text::window(valid, offset, limit, READ_TEXT_BYTES);
        let mut header = if w.content.is_empty() && w.total_lines > 0 {
            format!(
                "{}: no lines from line {offset}: the file has {} lines",
                p.path, w.total_lines
            )
        } else if w.total_lines == 0 {
            format!("{}: empty file", p.path)
        } else {
            format!(
                "{}: lines {}-{} of {}{}",
                p.path,
                w.first_line,
                w.last_line,
                if partial { "at least " } else { "" },
                w.total_lines
            )
        };
        let more = w.cut || w.last_line < w.total_lines || partial;
        let mut next_byte_offset = Value::Null;
        if w.cut && !w.content.ends_with('\n') && !w.content.is_empty() {
            // One line longer than an answer: go on inside it by bytes.
            let start: usize = valid
                .split_inclusive('\n')
                .take(offset - 1)
                .map(str::len)
                .sum();
            let next = start + w.content.len();
            next_byte_offset = json!(next);
            header.push_str(&format!(
                " (line {} is longer than {READ_TEXT_BYTES} bytes: call again with \
                 byte_offset={next} for the rest of it)",
                w.last_line
            ));
        } else if w.cut {
            header.push_str(&format!(
                " (cut at {READ_TEXT_BYTES} bytes: call again with offset={})",
                w.last_line + 1
            ));
        } else if w.last_line < w.total_lines {
            header.push_str(&format!(" (more: offset={})", w.last_line + 1));
        } else if partial {
            header.push_str(&format!(
                " (only the first {READ_FILE_BYTES} bytes of its {} were read: use run_command \
                 with sed -n or tail for the rest)",
                file.size
            ));
        }
        answer(
            format!("{header}\n{}", w.content),
            json!({
                "path": p.path, "encoding": "text", "content": w.content, "size": file.size,
                "first_line": w.first_line, "last_line": w.last_line,
                "total_lines": if partial { Value::Null } else { json!(w.total_lines) },
                "truncated": more, "next_byte_offset": next_byte_offset,
            }),
        )
    }

    /// Writes a file.
    #[tool(
        description = "Write a whole file in a sandbox (created, or replaced atomically), with \
        missing parent directories; append adds to its end instead. content is text unless \
        encoding is \"base64\". A symlink at path is replaced by the file (its target is \
        left as it was): to write through a link, give its target's path. To change part of an \
        existing file prefer edit_file.",
        annotations(
            title = "Write file",
            destructive_hint = true,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn write_file(&self, who: Who, Parameters(p): Parameters<WriteParams>) -> Answer {
        let data = match p.encoding.unwrap_or_default() {
            Encoding::Text => p.content.into_bytes(),
            Encoding::Base64 => base64::engine::general_purpose::STANDARD
                .decode(p.content.trim())
                .map_err(|e| {
                    refuse(
                        "invalid_argument",
                        format!("content is not valid base64: {e}"),
                    )
                })?,
        };
        let mode = match p.mode.as_deref() {
            None => None,
            Some(text) => match crate::query::parse_mode(text) {
                Some(mode) => Some(mode),
                None => {
                    return Err(refuse(
                        "invalid_argument",
                        format!(
                            "mode must be octal permissions like \"644\" or \"755\", not {text:?}"
                        ),
                    ))
                }
            },
        };
        if data.len() > MAX_DATA_LEN {
            return Err(refuse(
                "body_too_large",
                format!(
                    "the content is {} bytes; one write takes at most {MAX_DATA_LEN}: write the \
                     first part, then the rest with append set to true",
                    data.len()
                ),
            ));
        }
        let bytes = data.len();
        let append = p.append.unwrap_or(false);
        let _turn = self.edits.lock(&p.sandbox_id, &p.path).await;
        crate::files::write_file(
            &self.state,
            &who.caller,
            &p.sandbox_id,
            p.path.clone(),
            data,
            mode,
            true,
            append,
        )
        .await
        .or_tool()?;
        answer(
            format!(
                "{} {bytes} bytes to {}.",
                if append { "Appended" } else { "Wrote" },
                p.path
            ),
            json!({ "path": p.path, "bytes": bytes, "appended": append }),
        )
    }

    /// Lists a directory.
    #[tool(
        description = "List a directory in a sandbox: each entry's type, size, permissions and \
        name (directories end in /, links show their target).",
        annotations(title = "List files", read_only_hint = true, open_world_hint = false)
    )]
    async fn list_files(&self, who: Who, Parameters(p): Parameters<ListFilesParams>) -> Answer {
        let path = p.path.unwrap_or_else(|| "/".to_string());
        let entries = crate::files::list_dir(&self.state, &who.caller, &p.sandbox_id, path.clone())
            .await
            .or_tool()?;
        let mut text = format!("{path}: {} entries\n", entries.len());
        for entry in entries.iter().take(MAX_ENTRIES) {
            let kind = serde_json::to_value(entry.kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            let suffix = match (&entry.symlink_target, kind.as_str()) {
                (Some(target), _) => format!(" -> {target}"),
                (None, "dir") => "/".to_string(),
                _ => String::new(),
            };
            text.push_str(&format!(
                "{kind:<8} {:>10} {:04o} {}{suffix}\n",
                entry.size, entry.mode, entry.name
            ));
        }
        if entries.len() > MAX_ENTRIES {
            text.push_str(&format!(
                "... and {} more (use run_command with ls or find to filter)\n",
                entries.len() - MAX_ENTRIES
            ));
        }
        let shown = &entries[..entries.len().min(MAX_ENTRIES)];
        answer(
            text,
            json!({ "path": path, "entries": to_value(&shown)?, "total": entries.len() }),
        )
    }

    /// Edits a file by exact replacement.
    #[tool(
        description = "Edit a text file by exact string replacement: old_string must occur \
        exactly once (include enough surrounding lines to make it unique) unless replace_all \
        is true. Errors say when it is not found or found several times. Whitespace and \
        indentation must match read_file's content exactly.",
        annotations(title = "Edit file", destructive_hint = true, open_world_hint = false)
    )]
    async fn edit_file(&self, who: Who, Parameters(p): Parameters<EditParams>) -> Answer {
        let s = &self.state;
        // Edits of one file take turns (a read-modify-write each), and the write happens only
        // if the file is still what was read: a program that changed it meanwhile is not
        // overwritten.
        let _turn = self.edits.lock(&p.sandbox_id, &p.path).await;
        let before = crate::files::stat_path(s, &who.caller, &p.sandbox_id, p.path.clone())
            .await
            .or_tool()?;
        match before.kind {
            FileKind::File => {}
            FileKind::Symlink => {
                let target = before.symlink_target.as_deref().unwrap_or("?");
                return Err(refuse(
                    "invalid_argument",
                    format!(
                        "{} is a symlink to {target}: edit {} (edit_file does not replace a link \
                         with a file)",
                        p.path,
                        link_target(&p.path, target)
                    ),
                ));
            }
            FileKind::Dir => {
                return Err(refuse(
                    "invalid_argument",
                    format!("{} is a directory: edit_file edits text files", p.path),
                ))
            }
            FileKind::Other => {
                return Err(refuse(
                    "invalid_argument",
                    format!(
                        "{} is not a regular file (a device, fifo or socket): edit_file edits \
                         text files",
                        p.path
                    ),
                ))
            }
        }
        if before.size > MAX_DATA_LEN as u64 {
            return Err(too_big_to_edit(&p.path, before.size));
        }
        let file = crate::files::read_file(
            s,
            &who.caller,
            &p.sandbox_id,
            p.path.clone(),
            0,
            Some(MAX_DATA_LEN as u64),
        )
        .await
        .or_tool()?;
        if file.size > file.data.len() as u64 {
            return Err(too_big_to_edit(&p.path, file.size));
        }
        let Ok(text) = std::str::from_utf8(&file.data) else {
            return Err(refuse(
                "invalid_argument",
                format!(
                    "{} is not a UTF-8 text file: edit_file only edits text",
                    p.path
                ),
            ));
        };
        let all = p.replace_all.unwrap_or(false);
        let (new_text, count, at) = text::replace(&p.path, text, &p.old_string, &p.new_string, all)
            .map_err(|e| refuse("invalid_argument", e.to_string()))?;
        let snippet = text::snippet(&new_text, at, p.new_string.len(), 3);
        let now = crate::files::stat_path(s, &who.caller, &p.sandbox_id, p.path.clone())
            .await
            .or_tool()?;
        let unchanged = now.kind == FileKind::File
            && now.size == before.size
            && now.modified_ms == before.modified_ms
            && file.data.len() as u64 == before.size;
        if !unchanged {
            return Err(refuse(
                "conflict",
                format!(
                    "{} changed while it was being edited (another program wrote it): nothing was \
                     written; read_file it again and retry the edit",
                    p.path
                ),
            ));
        }
        crate::files::write_file(
            s,
            &who.caller,
            &p.sandbox_id,
            p.path.clone(),
            new_text.into_bytes(),
            None,
            false,
            false,
        )
        .await
        .or_tool()?;
        answer(
            format!(
                "Replaced {count} occurrence{} in {}. Around the {}edit:\n{snippet}",
                if count == 1 { "" } else { "s" },
                p.path,
                if count == 1 { "" } else { "first " }
            ),
            json!({ "path": p.path, "replacements": count }),
        )
    }

    /// The environment manifest.
    #[tool(
        description = "Describe what a sandbox offers before planning work in it: OS, \
        architecture, user, resource limits, network policy, PATH and the tools installed \
        (python3, node, gcc, git, ... with versions). Set refresh after installing something.",
        annotations(
            title = "Sandbox environment",
            read_only_hint = true,
            open_world_hint = false
        )
    )]
    async fn environment(&self, who: Who, Parameters(p): Parameters<EnvironmentParams>) -> Answer {
        let environment = crate::environment::describe(
            &self.state,
            &who.caller,
            &p.sandbox_id,
            p.refresh.unwrap_or(false),
        )
        .await
        .or_tool()?;
        let v = to_value(&environment)?;
        let s = |v: &Value| v.as_str().map(str::to_owned).unwrap_or_else(|| "-".into());
        let os = v["os"]["pretty_name"]
            .as_str()
            .or(v["os"]["name"].as_str())
            .unwrap_or("unknown");
        let limit = |name: &str| match v["limits"][name].as_u64() {
            Some(n) => n.to_string(),
            None => "none".to_string(),
        };
        let tools: Vec<String> = v["tools"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|t| match t["version"].as_str() {
                Some(version) => format!("{} {version}", s(&t["name"])),
                None => s(&t["name"]),
            })
            .collect();
        let text = format!(
            "OS: {os}\narch: {}  kernel: {}  user: {}\nlimits: memory_bytes={} cpu_millis={} pids={}\n\
             network: {}\nPATH: {}\ntools: {}",
            s(&v["arch"]),
            s(&v["kernel"]),
            s(&v["user"]),
            limit("memory_bytes"),
            limit("cpu_millis"),
            limit("pids"),
            s(&v["network"]["policy"]),
            v["path"]
                .as_array()
                .map(|p| p.iter().map(s).collect::<Vec<_>>().join(":"))
                .unwrap_or_default(),
            if tools.is_empty() {
                "none found".to_string()
            } else {
                tools.join(", ")
            }
        );
        answer(text, v)
    }

    /// Snapshots a sandbox.
    #[tool(
        description = "Save a sandbox's files as a new image (the sandbox keeps running): a \
        checkpoint to come back to. create_sandbox with that image, or fork, starts sandboxes \
        from it.",
        annotations(
            title = "Snapshot sandbox",
            destructive_hint = false,
            open_world_hint = false
        )
    )]
    async fn snapshot(&self, who: Who, Parameters(p): Parameters<SnapshotParams>) -> Answer {
        let (_, snap) =
            crate::images::take_snapshot(&self.state, &who.caller, &p.sandbox_id, p.name)
                .await
                .or_tool()?;
        answer(
            format!(
                "Snapshot image {} ({} bytes of changes, took {} ms). Use it as create_sandbox's \
                 image, or fork to do both.",
                snap.image, snap.bytes, snap.duration_ms
            ),
            to_value(&snap)?,
        )
    }

    /// Forks a sandbox.
    #[tool(
        description = "Copy a sandbox: snapshot its files, then start `count` new sandboxes \
        from the snapshot (same limits and environment). Use it to try several approaches \
        from the same state in parallel.",
        annotations(
            title = "Fork sandbox",
            destructive_hint = false,
            open_world_hint = false
        )
    )]
    async fn fork(&self, who: Who, Parameters(p): Parameters<ForkParams>) -> Answer {
        let mut options = serde_json::Map::new();
        options.insert("count".into(), json!(p.count.unwrap_or(1)));
        if let Some(name) = p.name {
            options.insert("name".into(), json!(name));
        }
        if let Some(ttl) = p.ttl {
            options.insert("ttl".into(), json!(ttl));
        }
        let made = crate::images::fork_sandbox(&self.state, &who.caller, &p.sandbox_id, options)
            .await
            .or_tool()?;
        let ids: Vec<&str> = made.iter().map(crate::api::SandboxResource::id).collect();
        answer(
            format!("Forked {} into: {}", p.sandbox_id, ids.join(", ")),
            json!({ "sandboxes": to_value(&made)? }),
        )
    }

    /// Diffs a sandbox against its image.
    #[tool(
        description = "Show what changed in a sandbox's files against its image (or another \
        image): added, modified and deleted paths, and a unified diff of the text files. Use \
        it to review the work done in a sandbox.",
        annotations(title = "Diff sandbox", read_only_hint = true, open_world_hint = false)
    )]
    async fn diff(&self, who: Who, Parameters(p): Parameters<DiffParams>) -> Answer {
        let report =
            crate::images::diff_sandbox(&self.state, &who.caller, &p.sandbox_id, p.path, p.against)
                .await
                .or_tool()?;
        let mut v = to_value(&report)?;
        let mut text = String::new();
        if report.changes.is_empty() {
            text.push_str("No changes.\n");
        }
        for change in v["changes"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let kind = change["kind"].as_str().unwrap_or("?");
            let mark = match kind {
                "added" => "A",
                "deleted" => "D",
                _ => "M",
            };
            text.push_str(&format!(
                "{mark} {} ({}, {} bytes)\n",
                change["path"].as_str().unwrap_or("?"),
                change["type"].as_str().unwrap_or("?"),
                change["size"]
            ));
        }
        let (patch, cut) = text::bounded(&report.patch, DIFF_TEXT_BYTES);
        if !patch.is_empty() {
            text.push('\n');
            text.push_str(patch);
        }
        if cut {
            text.push_str(&format!(
                "\n[patch cut at {DIFF_TEXT_BYTES} bytes: pass path to see one file or directory]\n"
            ));
            v["patch"] = json!(patch);
        }
        if report.truncated {
            text.push_str("\n[the server stopped the listing or patch at its limit]\n");
        }
        v["truncated"] = json!(report.truncated || cut);
        answer(text, v)
    }

    /// A preview URL of a port.
    #[tool(
        description = "Get a URL that opens a port of a sandbox (a web server started with \
        start_process, listening inside the sandbox) from outside, e.g. to show a user the app. \
        Whoever has the URL can reach that port until it expires.",
        annotations(
            title = "Preview URL",
            destructive_hint = false,
            open_world_hint = false
        )
    )]
    async fn preview_url(&self, who: Who, Parameters(p): Parameters<PreviewParams>) -> Answer {
        let token = crate::preview::mint_token(
            &self.state,
            &who.caller,
            &p.sandbox_id,
            &p.port.to_string(),
            p.ttl.as_deref(),
            &who.headers,
        )
        .await
        .or_tool()?;
        let v = to_value(&token)?;
        let url = v["host_url"]
            .as_str()
            .or(v["path_url"].as_str())
            .unwrap_or_default()
            .to_string();
        answer(
            format!(
                "{url}\nOpens port {} of sandbox {} until {}. The server must listen inside the \
                 sandbox (127.0.0.1 or 0.0.0.0) on that port.",
                p.port,
                p.sandbox_id,
                v["expires_at"].as_str().unwrap_or("?")
            ),
            json!({ "url": url, "path_url": v["path_url"], "host_url": v["host_url"],
                    "expires_at": v["expires_at"] }),
        )
    }

    /// A sandbox's timeline.
    #[tool(
        description = "Show a sandbox's timeline: what happened to it, in order (created, \
        commands run and their exits, files written, signals, snapshots, network events, \
        deletion), by whom (agent, human, system). Kept after the sandbox is destroyed.",
        annotations(title = "Timeline", read_only_hint = true, open_world_hint = false)
    )]
    async fn timeline(&self, who: Who, Parameters(p): Parameters<TimelineParams>) -> Answer {
        let limit = p.limit.unwrap_or(DEFAULT_EVENTS);
        if !(1..=MAX_EVENTS).contains(&limit) {
            return Err(refuse(
                "invalid_argument",
                format!("limit must be 1 to {MAX_EVENTS}, not {limit}"),
            ));
        }
        let since = p.since.unwrap_or(0).max(0);
        let events = crate::api::read_events(&self.state, &who.caller, &p.sandbox_id, since)
            .await
            .or_tool()?;
        let more = events.len() > limit;
        let events = &events[..events.len().min(limit)];
        let mut text = String::new();
        for event in events {
            let payload = event.payload.to_string();
            let (payload, cut) = text::bounded(&payload, EVENT_PAYLOAD_CHARS);
            text.push_str(&format!(
                "#{} {} {} {} {payload}{}\n",
                event.seq,
                event.time,
                event.actor,
                event.kind,
                if cut { "…" } else { "" }
            ));
        }
        let next = events.last().map_or(since, |e| e.seq);
        if events.is_empty() {
            text.push_str("No events");
            if since > 0 {
                text.push_str(&format!(" after #{since}"));
            }
            text.push('\n');
        }
        if more {
            text.push_str(&format!("More events: call again with since={next}\n"));
        }
        answer(
            text,
            json!({ "events": to_value(&events)?, "next_since": next, "more": more }),
        )
    }

    /// A repository to a ready sandbox.
    #[tool(
        description = "Open a git repository (https URL) in a new sandbox, ready to work in:         the project is detected (devcontainer.json, a Dockerfile, or its language's manifests),         its toolchain and dependencies installed, and its test suite run as a readiness check.         Returns the sandbox_id (use it with run_command and the file tools), the workspace         directory and the check's result. A repository opened before starts from its stored         setup in seconds. plan_only shows what would be done without doing it.",
        annotations(
            title = "Open repository",
            read_only_hint = false,
            destructive_hint = false,
            open_world_hint = true
        )
    )]
    async fn up(
        &self,
        who: Who,
        context: RequestContext<RoleServer>,
        Parameters(p): Parameters<crate::up::routes::UpBody>,
    ) -> Answer {
        let keep = p.keep;
        let (request, source) = crate::up::routes::from_json(p).or_tool()?;
        let mut running = crate::up::routes::spawn_open(&self.state, &who.caller, request, source);
        let mut log = UpLog::default();
        // A client that asked for progress (`_meta.progressToken`) gets a notification per
        // step line, so one that restarts its timeout on progress keeps waiting.
        let token = context.meta.get_progress_token();
        let mut steps_seen = 0u32;
        loop {
            let event = tokio::select! {
                event = running.events.recv() => event,
                () = context.ct.cancelled() => {
                    // The client cancelled the call (notifications/cancelled; rmcp does not
                    // drop this future). Dropping `running` closes the open's stream: the
                    // open sees its reader gone, kills a running command and removes what it
                    // made, as for a REST client that left (with keep, the sandbox stays).
                    drop(running);
                    let what = if keep {
                        "the call was cancelled: the open stopped (keep: its sandbox stays; \
                         list_sandboxes shows it)"
                    } else {
                        "the call was cancelled: the open stopped and removed what it made"
                    };
                    return Err(refuse("cancelled", what));
                }
            };
            let Some(event) = event else { break };
            if let (Some(line), Some(token)) = (log.push(event), &token) {
                steps_seen += 1;
                let note = rmcp::model::ProgressNotificationParam::new(
                    token.clone(),
                    f64::from(steps_seen),
                )
                .with_message(line);
                if let Err(e) = context.peer.notify_progress(note).await {
                    tracing::debug!(error = %e, "cannot send an up progress notification");
                }
            }
        }
        let steps: Vec<String> = log.steps.iter().cloned().collect();
        match running.finish().await {
            Ok(result) => {
                let mut value = to_value(&result)?;
                value["steps"] = json!(steps);
                answer(up_text(&result, &steps), value)
            }
            Err(e) => {
                let mut text = format!("Error ({}): {}", e.code, e.message);
                if let Some(id) = &e.sandbox_id {
                    text.push_str(&format!(
                        "\nThe sandbox {id} was kept (as it was before the failed step): \
                         look into it with run_command, destroy_sandbox when done."
                    ));
                }
                if !steps.is_empty() {
                    text.push_str(&format!("\nSteps:\n{}", steps.join("\n")));
                }
                let output = log.output_text();
                if !output.trim().is_empty() && e.code == "step_failed" {
                    text.push_str(&format!("\nEnd of the output:\n{output}"));
                }
                let mut result = CallToolResult::error(vec![ContentBlock::text(text)]);
                result.structured_content = Some(json!({ "error": to_value(&e)?, "steps": steps }));
                Err(result)
            }
        }
    }
}

impl OpenrunMcp {
    /// `read_file` with `byte_offset`: bytes from `at`, as text when they are text.
    async fn read_bytes(&self, who: Who, p: ReadParams, at: u64) -> Answer {
        let file = crate::files::read_file(
            &self.state,
            &who.caller,
            &p.sandbox_id,
            p.path.clone(),
            at,
            Some(READ_TEXT_BYTES as u64),
        )
        .await
        .or_tool()?;
        // A start inside a character: from the next whole one.
        let skip = file
            .data
            .iter()
            .take(3)
            .take_while(|&&b| b & 0xC0 == 0x80)
            .count();
        let data = &file.data[skip..];
        let end = at + file.data.len() as u64;
        let cut = end < file.size;
        if text::is_text(data, cut) {
            let whole = text::complete_prefix(data);
            let content = String::from_utf8_lossy(&data[..whole]).into_owned();
            let next = at + (skip + whole) as u64;
            let more = next < file.size;
            return answer(
                format!(
                    "{}: bytes {}-{} of {}{}\n{content}",
                    p.path,
                    at + skip as u64,
                    next,
                    file.size,
                    if more {
                        format!(" (more: byte_offset={next})")
                    } else {
                        String::new()
                    }
                ),
                json!({
                    "path": p.path, "encoding": "text", "content": content, "size": file.size,
                    "byte_offset": at + skip as u64, "next_byte_offset": if more { json!(next) } else { Value::Null },
                    "truncated": more,
                }),
            );
        }
        let shown = &file.data[..file.data.len().min(READ_BINARY_BYTES)];
        let next = at + shown.len() as u64;
        let more = next < file.size;
        let b64 = base64::engine::general_purpose::STANDARD.encode(shown);
        answer(
            format!(
                "{}: binary, bytes {at}-{next} of {} as base64{}\n{b64}",
                p.path,
                file.size,
                if more {
                    format!(" (more: byte_offset={next})")
                } else {
                    String::new()
                }
            ),
            json!({
                "path": p.path, "encoding": "base64", "content": b64, "size": file.size,
                "byte_offset": at, "next_byte_offset": if more { json!(next) } else { Value::Null },
                "truncated": more,
            }),
        )
    }
}

/// New output of one stream from an offset, at most [`READ_OUTPUT_BYTES`].
struct Chunked {
    data: Vec<u8>,
    /// Offset after the last byte kept: the next call's `since`.
    next: u64,
    /// Stopped at the bound: more is waiting.
    full: bool,
    /// Bytes after `since` that are gone from the agent's buffer (never shown).
    dropped: u64,
}

impl Chunked {
    fn new(since: u64) -> Self {
        Self {
            data: Vec::new(),
            next: since,
            full: false,
            dropped: 0,
        }
    }

    /// Adds a chunk that starts at `offset`; whether it held anything new.
    fn push(&mut self, offset: u64, data: &[u8]) -> bool {
        if self.full {
            return false;
        }
        // Bytes before `next` were seen already (a chunk may start before the offset asked).
        let skip = usize::try_from(self.next.saturating_sub(offset)).unwrap_or(usize::MAX);
        let Some(new) = data.get(skip..).filter(|d| !d.is_empty()) else {
            return false;
        };
        if offset > self.next {
            // Output before `offset` is gone from the agent's buffer.
            self.dropped += offset - self.next;
            self.next = offset;
        }
        let room = READ_OUTPUT_BYTES - self.data.len();
        let mut take = new.len().min(room);
        if take < new.len() {
            // Stop before a character cut by the bound: the next call starts with it whole.
            let mut kept = self.data.clone();
            kept.extend_from_slice(&new[..take]);
            let whole = text::complete_prefix(&kept);
            take -= (kept.len() - whole).min(take);
        }
        self.data.extend_from_slice(&new[..take]);
        self.next += take as u64;
        if take < new.len() {
            self.full = true;
        }
        true
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

/// `up`'s text: the sandbox, the workspace, the check, how long it took, the steps.
fn up_text(result: &crate::up::UpResult, steps: &[String]) -> String {
    let Some(id) = &result.sandbox_id else {
        return format!(
            "Plan (nothing was run):\n{}Recipe key: {}",
            result.plan.render(),
            result.recipe.as_ref().map_or("", |r| r.key.as_str())
        );
    };
    let how = if result.cached {
        "from its stored setup"
    } else {
        "set up"
    };
    let mut text = format!(
        "Sandbox {id} is ready ({how} in {:.1} s). The repository is in {}: pass sandbox_id \
         \"{id}\" to run_command (cwd {}) and the file tools.\n",
        result.timings.ready_ms as f64 / 1000.0,
        result.workspace,
        result.workspace
    );
    match &result.check {
        Some(check) if check.passed => {
            text.push_str(&format!("Check `{}` passed.\n", check.command));
        }
        Some(check) => text.push_str(&format!(
            "Check `{}` FAILED with exit code {} (the sandbox is ready; run it to see why).\n",
            check.command, check.exit_code
        )),
        None => text.push_str("No readiness check ran.\n"),
    }
    for port in &result.ports {
        text.push_str(&format!(
            "Port {}: preview_url gives a URL for it.\n",
            port.port
        ));
    }
    if let Some(start) = &result.plan.start {
        text.push_str(&format!("Start the application with: {start}\n"));
    }
    for note in &result.notes {
        text.push_str(&format!("Note: {note}\n"));
    }
    if !steps.is_empty() {
        text.push_str(&format!("Steps:\n{}\n", steps.join("\n")));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_of_command_or_argv() {
        assert_eq!(
            argv_of(Some("echo hi | wc -c".into()), None).unwrap(),
            ["/bin/sh", "-c", "echo hi | wc -c"]
        );
        assert_eq!(argv_of(None, Some(vec!["ls".into()])).unwrap(), ["ls"]);
        for (command, argv) in [
            (None, None),
            (Some(" ".to_string()), None),
            (None, Some(vec![])),
            (Some("ls".to_string()), Some(vec!["ls".to_string()])),
        ] {
            let refused = argv_of(command, argv).unwrap_err();
            assert_eq!(refused.is_error, Some(true));
        }
    }

    #[test]
    fn timeouts_and_signals_are_checked() {
        assert_eq!(timeout_ms(2).unwrap(), 2000);
        assert!(timeout_ms(0).is_err());
        assert!(timeout_ms(MAX_TIMEOUT_SECS + 1).is_err());
        // start_process: no 1-hour cap, and no hint to use start_process.
        assert_eq!(process_timeout_ms(7200).unwrap(), 7_200_000);
        let refused = serde_json::to_string(&process_timeout_ms(0).unwrap_err().content).unwrap();
        assert!(!refused.contains("use start_process"), "{refused}");
        assert!(process_timeout_ms(u64::MAX).is_err());
        assert_eq!(signal_number("KILL"), Some(9));
        assert_eq!(signal_number("sigterm"), Some(15));
        assert_eq!(signal_number("2"), Some(2));
        assert_eq!(signal_number("BOGUS"), None);
    }

    #[test]
    fn output_chunks_resume_at_offsets_and_stop_at_the_bound() {
        let mut c = Chunked::new(3);
        // A chunk starting before the offset asked for: only the new part counts.
        assert!(c.push(0, b"abcdef"));
        assert_eq!((c.text().as_str(), c.next), ("def", 6));
        assert!(!c.push(2, b"cd"));
        assert_eq!(c.dropped, 0);
        // Output the agent no longer has: counted, skipped.
        let mut gap = Chunked::new(0);
        assert!(gap.push(10, b"xy"));
        assert_eq!((gap.dropped, gap.next), (10, 12));
        let big = vec![b'x'; READ_OUTPUT_BYTES];
        assert!(c.push(6, &big));
        assert!(c.full);
        assert_eq!(c.next, 6 + (READ_OUTPUT_BYTES - 3) as u64);
        assert!(!c.push(c.next, b"more"));
    }

    #[test]
    fn output_pages_end_at_character_boundaries() {
        let mut c = Chunked::new(0);
        let mut data = vec![b'x'; READ_OUTPUT_BYTES - 1];
        data.extend_from_slice("€€".as_bytes());
        assert!(c.push(0, &data));
        assert!(c.full);
        assert_eq!(c.next, (READ_OUTPUT_BYTES - 1) as u64);
        assert!(!c.text().contains('\u{FFFD}'));
        let mut rest = Chunked::new(c.next);
        assert!(rest.push(0, &data));
        assert_eq!(rest.text(), "€€");
    }
}
