//! envd's `process.Process/*` Connect service (fact sheet §5.2, §5.3): `commands.*` and
//! `pty.*` of the SDK. Each method is a thin adapter over the core calls of [`crate::exec`]
//! and [`crate::processes`], on behalf of the sandbox's owner ([`SandboxCtx`]).
//!
//! | method | kind | core call |
//! |---|---|---|
//! | `Start` | server stream | [`exec::run_attached`] |
//! | `Connect` | server stream | [`processes::process_status`] + [`processes::follow_output`] |
//! | `List` | unary | [`processes::list_processes`] (running ones; `envs` as `Start` got them) |
//! | `SendSignal` | unary | [`processes::signal_process`] (to the process group) |
//! | `SendInput`, `CloseStdin`, `StreamInput` | unary, client stream | [`processes::write_stdin`] |
//! | `Update` | unary | [`processes::resize_terminal`] |
//!
//! A `Start` or `Connect` stream is `{"event":{"start":{"pid":N}}}`, then `data` events
//! (`stdout`/`stderr`, or `pty` for a terminal; base64) as output arrives, `keepalive` events
//! after `Keepalive-Ping-Interval` seconds of silence, then
//! `{"event":{"end":{"exitCode":N,"exited":true,"status":"exit status N"}}}` (`-1`,
//! `"signal: killed"` for a signal, like Go's `ProcessState`), then the end of the stream.
//! `Connect-Timeout-Ms` on `Start` is the process's lifetime (the agent kills its group when it
//! passes); on `Connect` it only bounds the stream. A client that goes away leaves the
//! process running. Once a process started by `Start` has exited, the agent forgets it (and
//! its output), as envd does: `Connect`, `SendSignal`… then answer `not_found`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, OnceLock};

use axum::extract::State;
use axum::response::Response;
use axum::routing::post;
use axum::{Extension, Router};
use openrun_protocol::{
    AttachRequest, ErrorCode, ExecRequest, Pid, ProcessInfo, ProcessState, PtySize,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::connect::{
    pj, server_stream, stream_reply, ClientStream, Code, ConnectError, Reply, StreamError,
    StreamOptions, Streaming, Unary,
};
use super::filesystem::{check_user, resolve_path};
use super::SandboxCtx;
use crate::api::Shared;
use crate::exec::{self, Line};
use crate::processes;

/// Tags starting with this belong to the code interpreter's kernels
/// (`super::interpreter`'s `TAG_PREFIX`): a process of `Start` with such a tag would pass for
/// a context, so `Start` refuses them.
const RESERVED_TAG_PREFIX: &str = "e2b-context:";

/// Messages buffered between a process's output and a slow client.
const STREAM_BUFFER: usize = 64;

/// The routes of this module.
pub(super) fn routes() -> Router<Shared> {
    Router::new()
        .route("/process.Process/Start", post(start))
        .route("/process.Process/Connect", post(connect))
        .route("/process.Process/List", post(list))
        .route("/process.Process/SendSignal", post(send_signal))
        .route("/process.Process/SendInput", post(send_input))
        .route("/process.Process/CloseStdin", post(close_stdin))
        .route("/process.Process/Update", post(update))
        .route("/process.Process/StreamInput", post(stream_input))
        .route_layer(axum::middleware::from_fn(super::connect::unary_deadline))
}

/// `process.ProcessConfig`.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(default, rename_all = "camelCase")]
struct ProcessConfig {
    cmd: String,
    args: Vec<String>,
    envs: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cwd: Option<String>,
}

/// `process.PTY.Size`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Size {
    #[serde(with = "pj::uint32")]
    cols: u32,
    #[serde(with = "pj::uint32")]
    rows: u32,
}

/// `process.PTY`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Pty {
    size: Option<Size>,
}

impl Pty {
    /// The terminal size asked for: 1 to 65535 rows and columns.
    fn size(&self) -> Result<PtySize, ConnectError> {
        let size = self
            .size
            .as_ref()
            .ok_or_else(|| ConnectError::invalid("pty.size is required"))?;
        let dimension = |name: &str, v: u32| {
            u16::try_from(v).ok().filter(|v| *v > 0).ok_or_else(|| {
                ConnectError::invalid(format!("pty.size.{name} must be from 1 to 65535, not {v}"))
            })
        };
        Ok(PtySize {
            rows: dimension("rows", size.rows)?,
            cols: dimension("cols", size.cols)?,
        })
    }
}

/// `process.StartRequest`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct StartRequest {
    process: Option<ProcessConfig>,
    pty: Option<Pty>,
    tag: Option<String>,
    stdin: Option<bool>,
}

/// `process.ProcessSelector`: a pid or a tag.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Selector {
    #[serde(with = "pj::opt_uint32")]
    pid: Option<u32>,
    tag: Option<String>,
}

/// A request naming one process (`CloseStdin`, `StreamInput`'s start).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ProcessRequest {
    process: Option<Selector>,
}

/// `process.ConnectRequest`: `replay` (newer envd) also sends the output kept so far.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ConnectRequest {
    process: Option<Selector>,
    replay: bool,
}

/// `process.SendSignalRequest`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct SendSignalRequest {
    process: Option<Selector>,
    #[serde(deserialize_with = "signal")]
    signal: i32,
}

/// `process.Signal`: by name or number.
fn signal<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
    pj::enum_value(
        d,
        &[
            ("SIGNAL_UNSPECIFIED", 0),
            ("SIGNAL_SIGTERM", 15),
            ("SIGNAL_SIGKILL", 9),
        ],
    )
}

/// `process.ProcessInput`: bytes for stdin or for the terminal.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ProcessInput {
    #[serde(with = "pj::opt_bytes")]
    stdin: Option<Vec<u8>>,
    #[serde(with = "pj::opt_bytes")]
    pty: Option<Vec<u8>>,
}

impl ProcessInput {
    /// The bytes, whichever way they came.
    fn into_data(self) -> Result<Vec<u8>, ConnectError> {
        self.stdin
            .or(self.pty)
            .ok_or_else(|| ConnectError::invalid("input must hold stdin or pty bytes"))
    }
}

/// `process.SendInputRequest`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct SendInputRequest {
    process: Option<Selector>,
    input: Option<ProcessInput>,
}

/// `process.UpdateRequest`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct UpdateRequest {
    process: Option<Selector>,
    pty: Option<Pty>,
}

/// `process.StreamInputRequest`: one of its events.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct StreamInputRequest {
    start: Option<ProcessRequest>,
    data: Option<StreamInputData>,
    keepalive: Option<serde_json::Value>,
}

/// `process.StreamInputRequest.DataEvent`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct StreamInputData {
    input: Option<ProcessInput>,
}

/// An empty answer (`{}`).
#[derive(Debug, Serialize)]
struct Empty {}

/// `process.ProcessInfo` of `List`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ListedProcess {
    pid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    tag: Option<String>,
    config: ProcessConfig,
}

/// `process.ListResponse`.
#[derive(Debug, Serialize)]
struct ListResponse {
    processes: Vec<ListedProcess>,
}

/// One message of a `Start` or `Connect` stream: `{"event":{...}}`.
#[derive(Debug, Serialize)]
struct EventMessage {
    event: Event,
}

/// `process.ProcessEvent` (one of).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
enum Event {
    Start { pid: u32 },
    Data(Data),
    End(End),
    Keepalive {},
}

/// `process.ProcessEvent.DataEvent` (one of; base64).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
enum Data {
    Stdout(#[serde(with = "pj::bytes")] Vec<u8>),
    Stderr(#[serde(with = "pj::bytes")] Vec<u8>),
    Pty(#[serde(with = "pj::bytes")] Vec<u8>),
}

/// `process.ProcessEvent.EndEvent`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct End {
    exit_code: i32,
    exited: bool,
    status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl End {
    /// The end of a process that exited with `code` or was killed by `signal`, worded like
    /// Go's `ProcessState` (which is what envd reports): `exit status 3`, `signal: killed`.
    fn new(code: Option<i32>, signal: Option<i32>) -> Self {
        let (exit_code, exited, status) = match (code, signal) {
            (Some(code), _) => (code, true, format!("exit status {code}")),
            (None, Some(signal)) => (-1, false, format!("signal: {}", signal_name(signal))),
            (None, None) => (-1, false, "unknown".to_string()),
        };
        let error = (exit_code != 0).then(|| status.clone());
        Self {
            exit_code,
            exited,
            status,
            error,
        }
    }
}

/// A signal's name as Go prints it (`syscall.Signal.String`).
fn signal_name(signal: i32) -> String {
    let name = match signal {
        1 => "hangup",
        2 => "interrupt",
        3 => "quit",
        4 => "illegal instruction",
        5 => "trace/breakpoint trap",
        6 => "aborted",
        7 => "bus error",
        8 => "floating point exception",
        9 => "killed",
        10 => "user defined signal 1",
        11 => "segmentation fault",
        12 => "user defined signal 2",
        13 => "broken pipe",
        14 => "alarm clock",
        15 => "terminated",
        _ => return format!("signal {signal}"),
    };
    name.to_string()
}

/// Most processes of one sandbox whose `envs` are kept for `List` (those started beyond
/// list without them).
const MAX_REMEMBERED: usize = 1024;

/// The `envs` the caller gave `Start`, for `List` (the agent keeps only their names): by
/// sandbox, then pid. An entry lives exactly as long as the `Start` relay that follows its
/// process ([`Remembered`]): it goes when the process exits, when the sandbox's agent goes
/// away (a killed or stopped sandbox), whatever ends the relay. So values (often secrets) are
/// not kept beyond the process, and a pid reused later never shows another process's envs.
type EnvStore = Mutex<HashMap<String, HashMap<Pid, BTreeMap<String, String>>>>;

fn env_store() -> &'static EnvStore {
    static STORE: OnceLock<EnvStore> = OnceLock::new();
    STORE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The `envs` of one running process of `Start`, in the store while this lives.
struct Remembered {
    sandbox: String,
    pid: Option<Pid>,
}

impl Remembered {
    /// Nothing remembered yet.
    fn new(sandbox: &str) -> Self {
        Self {
            sandbox: sandbox.to_string(),
            pid: None,
        }
    }

    /// Keeps the `envs` process `pid` was started with (unless its sandbox has
    /// [`MAX_REMEMBERED`] already).
    fn remember(&mut self, pid: Pid, envs: BTreeMap<String, String>) {
        let Ok(mut store) = env_store().lock() else {
            return;
        };
        let of_sandbox = store.entry(self.sandbox.clone()).or_default();
        if of_sandbox.len() < MAX_REMEMBERED || of_sandbox.contains_key(&pid) {
            of_sandbox.insert(pid, envs);
            self.pid = Some(pid);
        }
    }
}

impl Drop for Remembered {
    fn drop(&mut self) {
        let Some(pid) = self.pid else {
            return;
        };
        if let Ok(mut store) = env_store().lock() {
            if let Some(of_sandbox) = store.get_mut(&self.sandbox) {
                of_sandbox.remove(&pid);
                if of_sandbox.is_empty() {
                    store.remove(&self.sandbox);
                }
            }
        }
    }
}

/// The `envs` a running process of `sandbox` was started with (empty when unknown).
fn remembered_envs(sandbox: &str, pid: Pid) -> BTreeMap<String, String> {
    env_store()
        .lock()
        .ok()
        .and_then(|store| store.get(sandbox)?.get(&pid).cloned())
        .unwrap_or_default()
}

/// The message of an event.
fn message(event: Event) -> EventMessage {
    EventMessage { event }
}

/// The Connect error of an exec stream's `error` line (its `code` is the agent's, or
/// `agent_lost` when the sandbox went away). A refusal to spawn (`spawn`: the line came before
/// the start) is `invalid_argument` as envd answers (a missing cwd, say), unless it is a
/// limit (`resource_exhausted`) or a failure of ours.
fn line_error(code: &str, message: String, spawn: bool) -> ConnectError {
    let parsed = serde_json::from_value::<ErrorCode>(serde_json::Value::String(code.into()));
    let mut e = match parsed {
        Ok(agent) => ConnectError::from(crate::error::ApiError::Agent(
            openrun_protocol::AgentError::new(agent, message),
        )),
        Err(_) if code == "agent_lost" => ConnectError::new(Code::Unavailable, message),
        Err(_) => ConnectError::new(Code::Internal, message),
    };
    let refusal = !matches!(
        e.code,
        Code::ResourceExhausted | Code::Internal | Code::Unavailable
    );
    if spawn && refusal {
        e.code = Code::InvalidArgument;
    }
    e
}

/// Relays the lines of a process (`rx`) to a stream (`tx`): output as data events (`pty`
/// for a terminal), the exit as the end event; `on_start` gets the pid when it starts.
/// Returns once the process ended, with its pid when it exited (a `Started` line then the
/// `Exit` line were seen). `start`: the lines of `Start` (they begin with the start; an error
/// before it is a refused spawn), which are read to the end even after the client went away
/// (so that the exit is seen); other relays return `None` at once then.
async fn relay(
    mut rx: mpsc::Receiver<Line>,
    tx: mpsc::Sender<Result<EventMessage, ConnectError>>,
    pty: bool,
    start: bool,
    on_start: impl FnOnce(Pid),
) -> Option<Pid> {
    let mut started = None;
    let mut client = Some(tx);
    let mut on_start = Some(on_start);
    while let Some(line) = rx.recv().await {
        let item = match line {
            Line::Started { pid } => {
                started = Some(pid);
                if let Some(f) = on_start.take() {
                    f(pid);
                }
                Ok(message(Event::Start {
                    pid: u32::try_from(pid).unwrap_or_default(),
                }))
            }
            Line::Stdout { data, .. } if pty => Ok(message(Event::Data(Data::Pty(data)))),
            Line::Stdout { data, .. } => Ok(message(Event::Data(Data::Stdout(data)))),
            Line::Stderr { data, .. } => Ok(message(Event::Data(Data::Stderr(data)))),
            Line::Exit { code, signal, .. } => {
                if let Some(tx) = client.take() {
                    let _ = tx
                        .send(Ok(message(Event::End(End::new(code, signal)))))
                        .await;
                }
                return started;
            }
            Line::Error { code, message } => {
                // Only Start's lines have a start; an error before it is a refused spawn.
                let spawn = start && started.is_none();
                if let Some(tx) = client.take() {
                    let _ = tx.send(Err(line_error(&code, message, spawn))).await;
                }
                return None;
            }
        };
        if let Some(tx) = &client {
            if tx.send(item).await.is_err() {
                if !start {
                    return None;
                }
                client = None;
            }
        }
    }
    None
}

/// The options of a process stream: keepalive events as the client asked, and `deadline`.
fn options(
    keepalive: Option<std::time::Duration>,
    deadline: Option<std::time::Duration>,
) -> StreamOptions<EventMessage> {
    StreamOptions {
        keepalive: keepalive.map(|every| (every, message(Event::Keepalive {}))),
        deadline,
    }
}

/// The pid a selector names: its pid, or the running process with its tag.
async fn select(
    s: &Shared,
    ctx: &SandboxCtx,
    selector: Option<Selector>,
) -> Result<Pid, ConnectError> {
    let selector = selector.ok_or_else(|| ConnectError::invalid("process is required"))?;
    if let Some(pid) = selector.pid {
        return Pid::try_from(pid)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| ConnectError::not_found(format!("process with pid {pid} not found")));
    }
    let Some(tag) = selector.tag else {
        return Err(ConnectError::invalid("process must give a pid or a tag"));
    };
    processes::list_processes(s, &ctx.caller, &ctx.sandbox_id)
        .await?
        .into_iter()
        .find(|p| p.state == ProcessState::Running && p.tag.as_deref() == Some(tag.as_str()))
        .map(|p| p.pid)
        .ok_or_else(|| ConnectError::not_found(format!("process with tag {tag:?} not found")))
}

/// `Start`: runs a command and streams its events.
async fn start(
    State(s): State<Shared>,
    Extension(ctx): Extension<SandboxCtx>,
    request: Streaming<StartRequest>,
) -> Result<Response, StreamError> {
    let meta = request.meta;
    let request = request.message;
    let config = request
        .process
        .ok_or_else(|| ConnectError::invalid("process is required"))?;
    if config.cmd.is_empty() {
        return Err(ConnectError::invalid("process.cmd must name a program").into());
    }
    check_tag(request.tag.as_deref())?;
    let pty = request.pty.as_ref().map(Pty::size).transpose()?;
    check_user(&s, &ctx).await?;
    // A relative cwd is taken from the user's home, as envd does.
    let cwd = match config.cwd.filter(|c| !c.is_empty()) {
        Some(cwd) if !cwd.starts_with('/') => Some(resolve_path(&s, &ctx, &cwd).await?),
        cwd => cwd,
    };
    let mut argv = vec![config.cmd];
    argv.extend(config.args);
    let envs = config.envs.clone();
    let exec_request = ExecRequest {
        argv,
        env: config.envs,
        cwd,
        user: ctx.user.clone(),
        // Absent: true, as envd (for SDKs older than the field); the SDK sends false.
        stdin: request.stdin.unwrap_or(true),
        pty,
        timeout_ms: meta
            .timeout
            .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
        tag: request.tag,
        ..Default::default()
    };
    let lines = exec::run_attached(&s, &ctx.caller, &ctx.sandbox_id, exec_request, None).await?;
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    let is_pty = pty.is_some();
    tokio::spawn(async move {
        let mut remembered = Remembered::new(&ctx.sandbox_id);
        let exited = relay(lines, tx, is_pty, true, |pid| {
            remembered.remember(pid, envs);
        })
        .await;
        drop(remembered);
        // envd forgets a process once it has exited: so does the agent here, which would
        // otherwise keep its output until the sandbox ends. A `Connect` stream still behind
        // on the output gets the rest and the end first: the agent removes the process once
        // its last follower has sent the exit.
        if let Some(pid) = exited {
            let released = processes::release_process(&s, &ctx.caller, &ctx.sandbox_id, pid).await;
            if let Err(e) = released {
                tracing::debug!(pid, error = %e, "cannot release an exited process");
            }
        }
    });
    // The process's own timeout ends it (and so the stream).
    Ok(server_stream(rx, options(meta.keepalive, None)))
}

/// Refuses a tag reserved for the code interpreter's contexts.
fn check_tag(tag: Option<&str>) -> Result<(), ConnectError> {
    match tag {
        Some(tag) if tag.starts_with(RESERVED_TAG_PREFIX) => Err(ConnectError::invalid(format!(
            "tag {tag:?}: tags starting with {RESERVED_TAG_PREFIX:?} are reserved for the code interpreter's contexts"
        ))),
        _ => Ok(()),
    }
}

/// `Connect`: the start event of a running process, then its output from now on and its end.
async fn connect(
    State(s): State<Shared>,
    Extension(ctx): Extension<SandboxCtx>,
    request: Streaming<ConnectRequest>,
) -> Result<Response, StreamError> {
    let meta = request.meta;
    let replay = request.message.replay;
    let pid = select(&s, &ctx, request.message.process).await?;
    let info = running(&s, &ctx, pid).await?;
    let attach = AttachRequest {
        pid,
        stdout_since: if replay { 0 } else { info.stdout_len },
        stderr_since: if replay { 0 } else { info.stderr_len },
        follow: true,
    };
    let lines = processes::follow_output(&s, &ctx.caller, &ctx.sandbox_id, attach).await?;
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    let start = message(Event::Start {
        pid: u32::try_from(pid).unwrap_or_default(),
    });
    let _ = tx.send(Ok(start)).await;
    tokio::spawn(relay(lines, tx, info.pty, false, |_| {}));
    Ok(server_stream(rx, options(meta.keepalive, meta.timeout)))
}

/// The entry of a running process: `not_found` once it has exited (as envd forgets it).
async fn running(s: &Shared, ctx: &SandboxCtx, pid: Pid) -> Result<ProcessInfo, ConnectError> {
    let info = processes::process_status(s, &ctx.caller, &ctx.sandbox_id, pid).await?;
    if info.state != ProcessState::Running {
        return Err(ConnectError::not_found(format!(
            "process with pid {pid} not found: it has exited"
        )));
    }
    Ok(info)
}

/// `List`: the running processes.
async fn list(
    State(s): State<Shared>,
    Extension(ctx): Extension<SandboxCtx>,
    Unary(_): Unary<serde_json::Value>,
) -> Result<Reply<ListResponse>, ConnectError> {
    let processes = processes::list_processes(&s, &ctx.caller, &ctx.sandbox_id)
        .await?
        .into_iter()
        .filter(|p| p.state == ProcessState::Running)
        .map(|p| {
            let mut argv = p.argv.into_iter();
            ListedProcess {
                pid: u32::try_from(p.pid).unwrap_or_default(),
                tag: p.tag,
                config: ProcessConfig {
                    cmd: argv.next().unwrap_or_default(),
                    args: argv.collect(),
                    envs: remembered_envs(&ctx.sandbox_id, p.pid),
                    cwd: Some(p.cwd),
                },
            }
        })
        .collect();
    Ok(Reply(ListResponse { processes }))
}

/// `SendSignal`: SIGKILL or SIGTERM to the process's group (`not_found` once it is gone, so
/// the SDK's `kill()` answers `False`).
async fn send_signal(
    State(s): State<Shared>,
    Extension(ctx): Extension<SandboxCtx>,
    Unary(request): Unary<SendSignalRequest>,
) -> Result<Reply<Empty>, ConnectError> {
    if request.signal == 0 {
        return Err(ConnectError::invalid(
            "signal is required (SIGNAL_SIGKILL or SIGNAL_SIGTERM)",
        ));
    }
    let pid = select(&s, &ctx, request.process).await?;
    // An exited process is gone for envd, even while leftovers of its group linger.
    running(&s, &ctx, pid).await?;
    processes::signal_process(&s, &ctx.caller, &ctx.sandbox_id, pid, request.signal, true).await?;
    Ok(Reply(Empty {}))
}

/// `SendInput`: bytes for the process's stdin or terminal.
async fn send_input(
    State(s): State<Shared>,
    Extension(ctx): Extension<SandboxCtx>,
    Unary(request): Unary<SendInputRequest>,
) -> Result<Reply<Empty>, ConnectError> {
    let data = request
        .input
        .ok_or_else(|| ConnectError::invalid("input is required"))?
        .into_data()?;
    let pid = select(&s, &ctx, request.process).await?;
    processes::write_stdin(&s, &ctx.caller, &ctx.sandbox_id, pid, data, false).await?;
    Ok(Reply(Empty {}))
}

/// `CloseStdin`: EOF on the process's stdin.
async fn close_stdin(
    State(s): State<Shared>,
    Extension(ctx): Extension<SandboxCtx>,
    Unary(request): Unary<ProcessRequest>,
) -> Result<Reply<Empty>, ConnectError> {
    let pid = select(&s, &ctx, request.process).await?;
    processes::write_stdin(&s, &ctx.caller, &ctx.sandbox_id, pid, Vec::new(), true).await?;
    Ok(Reply(Empty {}))
}

/// `Update`: a new terminal size.
async fn update(
    State(s): State<Shared>,
    Extension(ctx): Extension<SandboxCtx>,
    Unary(request): Unary<UpdateRequest>,
) -> Result<Reply<Empty>, ConnectError> {
    let size = request
        .pty
        .ok_or_else(|| ConnectError::invalid("pty is required"))?
        .size()?;
    let pid = select(&s, &ctx, request.process).await?;
    processes::resize_terminal(&s, &ctx.caller, &ctx.sandbox_id, pid, size).await?;
    Ok(Reply(Empty {}))
}

/// `StreamInput` (client stream): a `start` event naming the process, then `data` events
/// written in order (`keepalive` events ignored); answers `{}` at the end. `Connect-Timeout-Ms`
/// bounds the whole stream.
async fn stream_input(
    State(s): State<Shared>,
    Extension(ctx): Extension<SandboxCtx>,
    requests: ClientStream<StreamInputRequest>,
) -> Result<Response, StreamError> {
    let timeout = requests.meta.timeout;
    let work = write_stream(&s, &ctx, requests);
    match timeout {
        None => work.await?,
        Some(limit) => tokio::time::timeout(limit, work).await.map_err(|_| {
            ConnectError::new(
                Code::DeadlineExceeded,
                "the call's deadline (Connect-Timeout-Ms) passed",
            )
        })??,
    }
    Ok(stream_reply(&Empty {}))
}

/// Most bytes of `StreamInput` data events written to the agent in one request.
const MAX_INPUT_BATCH: usize = 1 << 20;

/// The bytes of a `StreamInput` data event.
fn input_bytes(data: StreamInputData) -> Result<Vec<u8>, ConnectError> {
    data.input
        .ok_or_else(|| ConnectError::invalid("data.input is required"))?
        .into_data()
}

/// Writes the data events of a `StreamInput` call to the process its start event names. Data
/// events that arrived together (already received, up to [`MAX_INPUT_BATCH`] bytes) are
/// written with one agent call, not one each.
async fn write_stream(
    s: &Shared,
    ctx: &SandboxCtx,
    mut requests: ClientStream<StreamInputRequest>,
) -> Result<(), ConnectError> {
    let mut pid = None;
    let mut pending = None;
    loop {
        let request = match pending.take() {
            Some(request) => request,
            None => match requests.next().await {
                Some(request) => request?,
                None => break,
            },
        };
        if let Some(start) = request.start {
            pid = Some(select(s, ctx, start.process).await?);
        } else if let Some(data) = request.data {
            let pid = pid.ok_or_else(|| {
                ConnectError::invalid("the first message of StreamInput must be a start event")
            })?;
            let mut bytes = input_bytes(data)?;
            while bytes.len() < MAX_INPUT_BATCH {
                match requests.next_ready() {
                    Some(Ok(StreamInputRequest {
                        start: None,
                        data: Some(more),
                        ..
                    })) => bytes.extend(input_bytes(more)?),
                    Some(Ok(other)) => {
                        pending = Some(other);
                        break;
                    }
                    Some(Err(e)) => return Err(e),
                    None => break,
                }
            }
            processes::write_stdin(s, &ctx.caller, &ctx.sandbox_id, pid, bytes, false).await?;
        } else if request.keepalive.is_none() {
            return Err(ConnectError::invalid(
                "a StreamInput message must be a start, data or keepalive event",
            ));
        }
    }
    if pid.is_none() {
        return Err(ConnectError::invalid("StreamInput needs a start event"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_events_read_like_go() {
        let ok = serde_json::to_value(message(Event::End(End::new(Some(0), None)))).unwrap();
        assert_eq!(
            ok,
            serde_json::json!({"event":{"end":{"exitCode":0,"exited":true,"status":"exit status 0"}}})
        );
        let failed = End::new(Some(3), None);
        assert_eq!(failed.error.as_deref(), Some("exit status 3"));
        let killed = End::new(None, Some(9));
        assert_eq!(
            (killed.exit_code, killed.status.as_str()),
            (-1, "signal: killed")
        );
    }

    #[test]
    fn interpreter_tags_are_reserved() {
        assert_eq!(
            check_tag(Some("e2b-context:0123:python")).unwrap_err().code,
            Code::InvalidArgument
        );
        assert!(check_tag(Some("my-server")).is_ok());
        assert!(check_tag(Some("e2b-contexts")).is_ok());
        assert!(check_tag(None).is_ok());
    }

    #[test]
    fn env_values_live_as_long_as_their_relay() {
        let sandbox = "sbx-env-test";
        let envs = BTreeMap::from([("SECRET".to_string(), "v".to_string())]);
        let mut first = Remembered::new(sandbox);
        first.remember(41, envs.clone());
        let mut other = Remembered::new("sbx-env-other");
        other.remember(41, BTreeMap::new());
        assert_eq!(remembered_envs(sandbox, 41), envs);
        drop(first);
        assert!(
            remembered_envs(sandbox, 41).is_empty(),
            "gone with the process"
        );
        assert!(env_store().lock().unwrap().get(sandbox).is_none());
        // Bounded per sandbox: the others keep theirs.
        let mut many: Vec<Remembered> = (0..MAX_REMEMBERED + 5)
            .map(|i| {
                let mut r = Remembered::new(sandbox);
                r.remember(1000 + i as Pid, envs.clone());
                r
            })
            .collect();
        assert_eq!(env_store().lock().unwrap()[sandbox].len(), MAX_REMEMBERED);
        assert!(remembered_envs(sandbox, (1000 + MAX_REMEMBERED) as Pid).is_empty());
        assert!(env_store().lock().unwrap().contains_key("sbx-env-other"));
        many.clear();
        assert!(env_store().lock().unwrap().get(sandbox).is_none());
        drop(other);
    }

    #[test]
    fn events_are_proto_json() {
        let start = serde_json::to_value(message(Event::Start { pid: 7 })).unwrap();
        assert_eq!(start, serde_json::json!({"event":{"start":{"pid":7}}}));
        let data = serde_json::to_value(message(Event::Data(Data::Stdout(b"hi\n".to_vec()))));
        assert_eq!(
            data.unwrap(),
            serde_json::json!({"event":{"data":{"stdout":"aGkK"}}})
        );
        let keepalive = serde_json::to_value(message(Event::Keepalive {})).unwrap();
        assert_eq!(keepalive, serde_json::json!({"event":{"keepalive":{}}}));
    }

    #[test]
    fn requests_accept_names_and_numbers() {
        let r: SendSignalRequest =
            serde_json::from_str(r#"{"process":{"pid":12},"signal":"SIGNAL_SIGKILL"}"#).unwrap();
        assert_eq!((r.process.unwrap().pid, r.signal), (Some(12), 9));
        let r: SendSignalRequest =
            serde_json::from_str(r#"{"process":{"pid":"12"},"signal":15}"#).unwrap();
        assert_eq!((r.process.unwrap().pid, r.signal), (Some(12), 15));
        let r: SendInputRequest =
            serde_json::from_str(r#"{"process":{"pid":1},"input":{"pty":"aGk="}}"#).unwrap();
        assert_eq!(r.input.unwrap().into_data().unwrap(), b"hi");
        let r: StartRequest = serde_json::from_str(
            r#"{"process":{"cmd":"/bin/bash","args":["-l","-c","echo"],"envs":{"A":"1"}},"pty":{"size":{"cols":80,"rows":24}}}"#,
        )
        .unwrap();
        let size = r.pty.unwrap().size().unwrap();
        assert_eq!((size.cols, size.rows), (80, 24));
        assert!(serde_json::from_str::<SendSignalRequest>(r#"{"signal":"SIGHUP"}"#).is_err());
    }
}
