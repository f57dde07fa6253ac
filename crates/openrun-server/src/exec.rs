//! `POST /v1/sandboxes/{id}/exec`: runs a command through the sandbox's agent and streams what
//! happens as NDJSON (`application/x-ndjson`), one JSON object per line:
//!
//! ```text
//! {"type":"started","pid":7}
//! {"type":"stdout","offset":0,"data_b64":"aGkK"}          (also "stderr")
//! {"type":"exit","code":0,"signal":null,"timed_out":false,"oom_killed":false}
//! ```
//!
//! Output is always base64 (`data_b64`): commands write bytes, not text, and a chunk can end in
//! the middle of a UTF-8 character. `offset` is the stream position of the chunk's first byte.
//!
//! A valid request for a command that cannot start (not found, not executable, bad cwd) is
//! still a 200: the stream then holds one `{"type":"error","code":"command_not_found",
//! "message":...}` line (codes are the agent's, snake_case). A stream that ends without an
//! `exit` line ends with an `error` line (`agent_lost` when the sandbox went away).
//!
//! With `"background": true` the command starts unattached and the answer is 201 `{"pid":N}`
//! at once; `"stdin": true` keeps a stdin pipe for `POST .../processes/{pid}/stdin`. The
//! process endpoints ([`crate::processes`]) then follow it, `.../output` with these same lines.
//!
//! One driver ([`start`]) runs every attached command: it produces [`Line`]s, and each surface
//! encodes them (NDJSON here, WebSocket messages in [`crate::ws`] and [`crate::terminal`]);
//! what an interactive client sends comes back to it as [`Input`].
//!
//! The timeline gets `process.exec` (argv, cwd, names of env variables) before the command
//! starts (what the caller did: committed first, on the disk before the client is told the
//! command started, the sync overlapping the start) and `process.exit` (or `process.error`)
//! before the client sees the outcome (an exit is committed unsynced, see
//! [`crate::maintenance::record_exit`]). A client that disconnects does not stop the command,
//! and its exit is still recorded.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use base64::Engine;
use openrun_protocol::{
    AgentMessage, ExecRequest, ExitStatus, Frame, Pid, PtySize, Request, Response as AgentResponse,
    Stream,
};
use openrun_runtime::{
    AgentClient, AgentReceiver, AgentSender, ClientError, RuntimeError, Sandbox,
};
use tokio::sync::mpsc;

use crate::api::{blocking, check_env, find, Caller, JsonBody, Shared};
use crate::db::{self, Durable, NewEvent, SandboxRow};
use crate::error::ApiError;
use crate::files::record;
use crate::openapi::ErrorAnswers;

/// Lines buffered between the agent and a slow client; beyond it the agent keeps the output
/// (with offsets) and we stop reading.
const STREAM_BUFFER: usize = 64;

/// Body of an exec request.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecBody {
    /// Program and arguments (looked up in PATH when the program has no slash).
    cmd: Vec<String>,
    /// Extra environment.
    #[serde(default)]
    env: BTreeMap<String, String>,
    /// Working directory inside the sandbox.
    #[serde(default)]
    cwd: Option<String>,
    /// Kill the command after this long, e.g. `30s`.
    #[serde(default)]
    timeout: Option<String>,
    /// Start without streaming: answer 201 `{"pid":N}` at once; the process endpoints follow it.
    #[serde(default)]
    background: bool,
    /// Keep a stdin pipe open for `POST .../processes/{pid}/stdin` (else stdin is /dev/null).
    #[serde(default)]
    stdin: bool,
}

impl ExecBody {
    /// Whether it asks for an unattached start.
    pub(crate) fn background(&self) -> bool {
        self.background
    }

    /// Checks everything that can be checked before the command starts and builds the agent's
    /// request (attached unless `background`).
    pub(crate) fn into_request(self) -> Result<ExecRequest, ApiError> {
        let timeout = self
            .timeout
            .as_deref()
            .map(openrun_runtime::limits::parse_duration)
            .transpose()
            .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        let request = ExecRequest {
            argv: self.cmd,
            env: self.env,
            cwd: self.cwd,
            timeout_ms: timeout.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            attach: !self.background,
            stdin: self.stdin,
            ..Default::default()
        };
        check_request(&request)?;
        Ok(request)
    }
}

/// Checks everything about a command that can be checked before it starts: a program name,
/// no NUL bytes in argv, cwd, user or tag, valid environment names, a non-empty terminal.
pub(crate) fn check_request(request: &ExecRequest) -> Result<(), ApiError> {
    check_argv(&request.argv)?;
    for (name, value) in [
        ("cwd", &request.cwd),
        ("user", &request.user),
        ("tag", &request.tag),
    ] {
        if value.as_deref().is_some_and(|v| v.contains('\0')) {
            return Err(ApiError::InvalidArgument(format!(
                "{name} must not contain NUL bytes"
            )));
        }
    }
    if request.user.as_deref() == Some("") {
        return Err(ApiError::InvalidArgument(
            "user must name a user or uid[:gid]".into(),
        ));
    }
    if let Some(size) = request.pty {
        if size.rows == 0 || size.cols == 0 {
            return Err(ApiError::InvalidArgument(format!(
                "a terminal needs at least one row and one column, not {}x{}",
                size.cols, size.rows
            )));
        }
    }
    check_env(&request.env)
}

/// Checks a command line from a client: a program name, no NUL bytes.
pub(crate) fn check_argv(cmd: &[String]) -> Result<(), ApiError> {
    if cmd.first().is_none_or(|program| program.is_empty()) {
        return Err(ApiError::InvalidArgument("cmd must name a program".into()));
    }
    if cmd.iter().any(|a| a.contains('\0')) {
        return Err(ApiError::InvalidArgument(
            "cmd must not contain NUL bytes".into(),
        ));
    }
    Ok(())
}

/// One line of an exec stream: an NDJSON line, a WebSocket text message, or (a terminal's
/// output) raw bytes. Also the lines of `GET .../processes/{pid}/output`.
#[derive(Debug, serde::Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum Line {
    /// The command runs, as `pid` inside the sandbox.
    Started { pid: i32 },
    /// Output bytes (base64 on the wire), `offset` the stream position of the first.
    Stdout {
        offset: u64,
        #[serde(rename = "data_b64", serialize_with = "base64_bytes")]
        data: Vec<u8>,
    },
    /// As [`Line::Stdout`], for stderr.
    Stderr {
        offset: u64,
        #[serde(rename = "data_b64", serialize_with = "base64_bytes")]
        data: Vec<u8>,
    },
    /// How it ended; the last line.
    Exit {
        code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
        oom_killed: bool,
    },
    /// It could not start, or the stream broke off (`code`, e.g. `command_not_found`,
    /// `agent_lost`); the last line.
    Error { code: String, message: String },
}

/// Output bytes go on the wire as base64 text (`data_b64`).
fn base64_bytes<S: serde::Serializer>(data: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&base64::engine::general_purpose::STANDARD.encode(data))
}

impl Line {
    /// The line of an output chunk.
    pub(crate) fn output(stream: Stream, offset: u64, data: Vec<u8>) -> Self {
        match stream {
            Stream::Stdout => Line::Stdout { offset, data },
            Stream::Stderr => Line::Stderr { offset, data },
        }
    }

    /// The line of an exit.
    pub(crate) fn exit(status: &ExitStatus) -> Self {
        Line::Exit {
            code: status.code,
            signal: status.signal,
            timed_out: status.timed_out,
            oom_killed: status.oom_killed,
        }
    }

    /// The line of an [`ApiError`] (its stable code and message).
    pub(crate) fn error(e: &ApiError) -> Self {
        Line::Error {
            code: e.status_and_code().1.to_string(),
            message: e.reported(),
        }
    }

    /// Whether it is the last line of its stream (`exit` or `error`).
    pub(crate) fn is_last(&self) -> bool {
        matches!(self, Line::Exit { .. } | Line::Error { .. })
    }

    /// The line as one JSON object (without a newline).
    pub(crate) fn json(&self) -> Option<String> {
        match serde_json::to_string(self) {
            Ok(text) => Some(text),
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a stream line");
                None
            }
        }
    }
}

/// An NDJSON response of the lines from a channel.
pub(crate) fn ndjson_response(rx: mpsc::Receiver<Line>) -> Response {
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        loop {
            let line = rx.recv().await?;
            if let Some(mut text) = line.json() {
                text.push('\n');
                return Some((Ok::<_, std::convert::Infallible>(Bytes::from(text)), rx));
            }
        }
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response()
}

/// What an interactive client sends to its running command (WebSocket exec and terminal).
#[derive(Debug)]
pub(crate) enum Input {
    /// Bytes for its stdin (or its terminal).
    Stdin(Vec<u8>),
    /// Close its stdin.
    StdinEof,
    /// A signal (recorded as `process.signal`).
    Signal {
        /// Signal number.
        signal: i32,
        /// To its whole process group.
        group: bool,
    },
    /// A new terminal size.
    Resize(PtySize),
}

/// Handler: checks everything that can be checked, records `process.exec`, then streams.
#[utoipa::path(post, operation_id = "exec",
    path = "/v1/sandboxes/{id}/exec",
    tag = "processes",
    params(("id" = String, Path, description = "Sandbox id")),
    request_body = ExecBody,
    responses((status = 200, description = "NDJSON lines: started, stdout/stderr (base64, with offsets), then exit or error", content_type = "application/x-ndjson", body = String), (status = 201, description = "Started in the background", body = Object, example = json!({"pid": 7})), ErrorAnswers))]
pub async fn exec(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<ExecBody>,
) -> Result<Response, ApiError> {
    let background = body.background();
    let request = body.into_request()?;
    if !background {
        let lines = run_attached(&s, &caller, &id, request, None).await?;
        return Ok(ndjson_response(lines));
    }
    let pid = start_background(&s, &caller, &id, request).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(serde_json::json!({ "pid": pid })),
    )
        .into_response())
}

/// How a command run by [`run_to_end`] ended (its `exit` line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ended {
    /// Its pid inside the sandbox, if it was reported as started.
    pub pid: Option<Pid>,
    /// Its exit code, if it exited.
    pub code: Option<i32>,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
    /// Whether it was killed at its timeout.
    pub timed_out: bool,
    /// Whether the sandbox's memory limit killed it.
    pub oom_killed: bool,
}

/// Why [`run_to_end`] has no [`Ended`].
#[derive(Debug)]
pub(crate) enum NotEnded {
    /// It could not be started (refused before any line).
    Refused(ApiError),
    /// The sandbox's `error` line (`code`, e.g. `command_not_found`, and `message`).
    Error {
        /// Its code.
        code: String,
        /// Its message.
        message: String,
    },
    /// `cancel` resolved: the command was killed with its process group.
    Cancelled,
    /// The output ended without an exit status (the sandbox may have stopped).
    Lost,
    /// No end was reported `grace` after the timeout.
    NoEnd,
}

/// Runs `request` attached in the caller's sandbox `id` to its end: the one exec-to-completion
/// driver (MCP's `run_command`, every command of an `up`). Output chunks go to `on_output` as
/// they come. The wait ends `grace` after the request's timeout at the latest (the agent
/// kills at the timeout and reports the exit). Once the command runs, `cancel` resolving
/// kills it with its process group (signal 9) and ends the run with
/// [`NotEnded::Cancelled`].
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run_to_end(
    s: &Shared,
    caller: &Caller,
    id: &str,
    request: ExecRequest,
    input: Option<mpsc::Receiver<Input>>,
    grace: std::time::Duration,
    cancel: impl std::future::Future<Output = ()>,
    mut on_output: impl FnMut(Stream, &[u8]),
) -> Result<Ended, NotEnded> {
    let timeout = std::time::Duration::from_millis(request.timeout_ms.unwrap_or(0));
    let mut lines = run_attached(s, caller, id, request, input)
        .await
        .map_err(NotEnded::Refused)?;
    let deadline = tokio::time::Instant::now() + timeout + grace;
    tokio::pin!(cancel);
    let mut pid = None;
    loop {
        let next = tokio::select! {
            next = tokio::time::timeout_at(deadline, lines.recv()) => next,
            () = &mut cancel, if pid.is_some() => {
                if let Some(pid) = pid {
                    if let Err(e) =
                        crate::processes::signal_process(s, caller, id, pid, 9, true).await
                    {
                        tracing::debug!(error = %e, pid, "cannot kill a cancelled command");
                    }
                }
                return Err(NotEnded::Cancelled);
            }
        };
        match next {
            Err(_) => return Err(NotEnded::NoEnd),
            Ok(None) => return Err(NotEnded::Lost),
            Ok(Some(Line::Started { pid: started })) => pid = Some(started),
            Ok(Some(Line::Stdout { data, .. })) => on_output(Stream::Stdout, &data),
            Ok(Some(Line::Stderr { data, .. })) => on_output(Stream::Stderr, &data),
            Ok(Some(Line::Exit {
                code,
                signal,
                timed_out,
                oom_killed,
            })) => {
                return Ok(Ended {
                    pid,
                    code,
                    signal,
                    timed_out,
                    oom_killed,
                })
            }
            Ok(Some(Line::Error { code, message })) => {
                return Err(NotEnded::Error { code, message })
            }
        }
    }
}

/// Starts `request` attached in the caller's running sandbox `id` (see [`start`]): its lines
/// arrive on the returned channel, the last an `exit` or `error` line; `input` carries what
/// the client sends while it runs.
pub(crate) async fn run_attached(
    s: &Shared,
    caller: &Caller,
    id: &str,
    mut request: ExecRequest,
    input: Option<mpsc::Receiver<Input>>,
) -> Result<mpsc::Receiver<Line>, ApiError> {
    check_request(&request)?;
    request.attach = true;
    let row = find(s, caller, id).await?;
    let agent = open_for_exec(s, &row).await?;
    start_on(s, caller, &row, agent, request, input).await
}

/// An opened sandbox and a connection to its agent, for one attached exec.
pub(crate) struct ExecAgent {
    sandbox: Arc<Sandbox>,
    client: AgentClient,
    /// Taken from [`crate::agent_conns`] (else connected for this exec).
    reused: bool,
}

/// Like [`open_running`], but takes the idle connection an earlier exec in the sandbox left
/// ([`crate::agent_conns`]) when there is one.
async fn open_for_exec(s: &Shared, row: &SandboxRow) -> Result<ExecAgent, ApiError> {
    if row.state == "running" {
        if let Some(taken) = s.conns.take(&row.id) {
            if let Some(client) = taken.client {
                return Ok(ExecAgent {
                    sandbox: taken.sandbox,
                    client,
                    reused: true,
                });
            }
        }
    }
    let (sandbox, client) = open_running(s, row).await?;
    Ok(ExecAgent {
        sandbox: Arc::new(sandbox),
        client,
        reused: false,
    })
}

/// Starts `request` unattached in the caller's running sandbox `id` and returns its pid: the
/// process endpoints follow it, and its exit is recorded on the timeline when it comes.
pub(crate) async fn start_background(
    s: &Shared,
    caller: &Caller,
    id: &str,
    mut request: ExecRequest,
) -> Result<Pid, ApiError> {
    check_request(&request)?;
    request.attach = false;
    let row = find(s, caller, id).await?;
    let (_sandbox, mut client) = open_running(s, &row).await?;
    let durable = record_exec(s, caller, &row, &request).await?;
    let started = client
        .call(Request::Exec(request))
        .await
        .map_err(|e| ApiError::from_client("cannot start the process", e))?;
    match started.header {
        AgentResponse::Started { pid } => {
            let ((), synced) = tokio::join!(
                crate::maintenance::watch_background(s, &row, caller, pid),
                durable.wait()
            );
            if let Err(e) = synced {
                let _ = client.call(kill_unrecorded(pid)).await;
                return Err(ApiError::internal(NOT_RECORDED, e));
            }
            Ok(pid)
        }
        other => Err(ApiError::internal(
            "cannot start the process",
            format!("unexpected answer to exec: {other:?}"),
        )),
    }
}

/// Records `process.exec` for `request`: committed when this returns (before the command
/// may start), on the disk once the returned [`Durable`] resolves (before anyone is told it
/// started), so the sync overlaps the start.
async fn record_exec(
    s: &Shared,
    caller: &Caller,
    row: &SandboxRow,
    request: &ExecRequest,
) -> Result<Durable, ApiError> {
    let mut payload = serde_json::json!({
        "argv": request.argv,
        "cwd": request.cwd,
        "env": request.env.keys().collect::<Vec<_>>(),
        "background": !request.attach,
    });
    if let Some(size) = request.pty {
        payload["pty"] = serde_json::json!({ "rows": size.rows, "cols": size.cols });
    }
    let event = NewEvent {
        sandbox_id: row.id.clone(),
        tenant: caller.tenant.clone(),
        actor: caller.actor.clone(),
        kind: "process.exec",
        payload,
    };
    let ((), durable) =
        s.db.commit_then_sync(move |c| db::append_event(c, &event))
            .await?;
    Ok(durable)
}

/// What a command whose `process.exec` could not be synced gets: it is killed (nobody may be
/// told it started), and the caller an error saying why.
const NOT_RECORDED: &str = "the command was stopped: the server could not record it on its disk";

/// The kill of a started command whose record could not be synced ([`NOT_RECORDED`]).
fn kill_unrecorded(pid: Pid) -> Request {
    Request::Signal {
        pid,
        signal: 9,
        group: true,
    }
}

/// Records `process.exec` and starts the attached command `request` on `agent` (from
/// [`open_running`]). Its lines arrive on the returned channel, the last one an `exit` or
/// `error` line; `input`, when given, carries what the client sends while it runs. The command
/// outlives a client that stops reading, and its exit is still recorded.
pub(crate) async fn start(
    s: &Shared,
    caller: &Caller,
    row: &SandboxRow,
    agent: (Sandbox, AgentClient),
    request: ExecRequest,
    input: Option<mpsc::Receiver<Input>>,
) -> Result<mpsc::Receiver<Line>, ApiError> {
    let (sandbox, client) = agent;
    let agent = ExecAgent {
        sandbox: Arc::new(sandbox),
        client,
        reused: false,
    };
    start_on(s, caller, row, agent, request, input).await
}

/// [`start`] on an [`ExecAgent`].
async fn start_on(
    s: &Shared,
    caller: &Caller,
    row: &SandboxRow,
    agent: ExecAgent,
    request: ExecRequest,
    input: Option<mpsc::Receiver<Input>>,
) -> Result<mpsc::Receiver<Line>, ApiError> {
    let durable = record_exec(s, caller, row, &request).await?;
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    let ctx = Context {
        state: s.clone(),
        row: row.clone(),
        caller: caller.clone(),
        tx,
    };
    // The answer's head goes out once the driver has written the command to the agent, so
    // the agent starts it while the head is written. The driver is a task of its own from the
    // start: a handler dropped meanwhile (its client left) leaves it driving the command.
    let (written, sent) = tokio::sync::oneshot::channel();
    tokio::spawn(ctx.drive(agent, request, durable, input, written));
    let _ = sent.await;
    Ok(rx)
}

/// An `Exec` request written to the agent (or the failure to write it), for the driver.
struct Sending {
    sandbox: Arc<Sandbox>,
    sender: AgentSender,
    receiver: AgentReceiver,
    /// The request's id, or why it could not be written.
    sent: Result<u64, ClientError>,
    /// The cgroup's OOM-kill count before the command started.
    oom_before: u64,
}

/// The running sandbox of `row` and a connection to its agent: 409 `sandbox_paused` when it
/// is paused (its agent is frozen and could not answer), 409 `sandbox_not_running` when it is
/// anything else but running; a sandbox whose agent is gone is marked so first.
pub(crate) async fn open_running(
    s: &Shared,
    row: &SandboxRow,
) -> Result<(Sandbox, AgentClient), ApiError> {
    match row.state.as_str() {
        "running" => {}
        "paused" => return Err(ApiError::Paused(row.id.clone())),
        _ => return Err(ApiError::NotRunning(row.id.clone())),
    }
    match connect(s, &row.id).await {
        Ok(pair) => Ok(pair),
        Err(ApiError::NotRunning(_)) => {
            mark_vanished(s, &row.id, &row.tenant).await?;
            Err(ApiError::NotRunning(row.id.clone()))
        }
        Err(e) => Err(e),
    }
}

/// One request to the agent of the caller's running sandbox `id` (404 for anyone else's),
/// with its answer; agent refusals map through [`ApiError::from_client`].
pub(crate) async fn agent_call(
    s: &Shared,
    caller: &Caller,
    id: &str,
    request: Request,
    data: Vec<u8>,
) -> Result<(SandboxRow, Frame<AgentResponse>), ApiError> {
    let row = find(s, caller, id).await?;
    let (_sandbox, mut client) = open_running(s, &row).await?;
    let answer = client
        .call_with_data(request, data)
        .await
        .map_err(|e| ApiError::from_client("the sandbox agent failed", e))?;
    Ok((row, answer))
}

/// Opens the sandbox and connects to its agent; [`ApiError::NotRunning`] when it is gone.
async fn connect(s: &Shared, id: &str) -> Result<(Sandbox, AgentClient), ApiError> {
    let runtime = s.runtime.clone();
    let key = id.to_string();
    let sandbox = match blocking(move || runtime.open_sandbox_exact(&key)).await? {
        Ok(sandbox) => sandbox,
        Err(RuntimeError::NoSuchSandbox(_)) => return Err(ApiError::NotRunning(id.to_string())),
        Err(e) => return Err(ApiError::internal("cannot open the sandbox", e)),
    };
    match sandbox.connect().await {
        Ok(client) => Ok((sandbox, client)),
        // Gone only when its agent is: a live one that refuses a connection (a full backlog,
        // its socket removed) is not marked stopped.
        Err(RuntimeError::Agent(ClientError::Connect { .. })) if !sandbox.record().is_alive() => {
            Err(ApiError::NotRunning(id.to_string()))
        }
        Err(e) => Err(ApiError::internal("cannot reach the sandbox agent", e)),
    }
}

/// Records that a sandbox the database thought running is gone, and removes what its agent
/// left on the host (cgroup, runtime files, writable layer, id claim); a failure to remove
/// them is logged (the next server start retries: its reconciliation lists the sandboxes).
pub(crate) async fn mark_vanished(s: &Shared, id: &str, tenant: &str) -> Result<(), ApiError> {
    let event = NewEvent {
        sandbox_id: id.to_string(),
        tenant: tenant.to_string(),
        actor: "system".into(),
        kind: "sandbox.vanish",
        payload: serde_json::json!({ "reason": "its agent is no longer running" }),
    };
    s.conns.forget(id);
    let key = id.to_string();
    s.db.call(move |c| db::stop_sandbox(c, &key, false, &event))
        .await?;
    s.egress.forget(id);
    let runtime = s.runtime.clone();
    let key = id.to_string();
    match blocking(move || runtime.remove_if_dead(&key)).await? {
        Ok(_) => {}
        Err(e) => tracing::warn!(id, error = %e, "cannot remove a vanished sandbox's remains"),
    }
    Ok(())
}

/// What the driver of one attached command needs.
#[derive(Clone)]
struct Context {
    state: Shared,
    row: SandboxRow,
    caller: Caller,
    tx: mpsc::Sender<Line>,
}

/// Aborts the task it holds when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Context {
    /// Sends one line; a client that went away is ignored (the command keeps running and its
    /// exit is still recorded).
    async fn send(&self, line: Line) {
        let _ = self.tx.send(line).await;
    }

    /// Appends an event; a failure is logged (the stream goes on).
    async fn record(&self, kind: &'static str, payload: serde_json::Value) {
        if let Err(e) = record(&self.state, &self.caller, &self.row, kind, payload).await {
            tracing::error!(error = %e, sandbox = self.row.id, kind, "cannot record an event");
        }
    }

    async fn fail(&self, code: &str, message: String) {
        self.record(
            "process.error",
            serde_json::json!({ "code": code, "message": message }),
        )
        .await;
        self.send(Line::Error {
            code: code.to_string(),
            message,
        })
        .await;
    }

    /// Writes the `Exec` request on `agent`'s connection; `Err` when a reused connection broke
    /// and no new one could be opened (the sandbox stopped or paused meanwhile, say).
    async fn send_exec(&self, agent: ExecAgent, request: ExecRequest) -> Result<Sending, ApiError> {
        let ExecAgent {
            mut sandbox,
            client,
            reused,
        } = agent;
        let oom_before = sandbox.oom_kills();
        let (mut sender, mut receiver) = client.split();
        let mut sent = sender.send(Request::Exec(request.clone())).await;
        if sent.is_err() && reused {
            // The idle connection broke after its check (the agent closed it). A request
            // whose write failed never reached the agent whole, so it did not start: send it
            // once more on a new connection.
            let (fresh, client) = open_running(&self.state, &self.row).await?;
            sandbox = Arc::new(fresh);
            (sender, receiver) = client.split();
            sent = sender.send(Request::Exec(request)).await;
        }
        Ok(Sending {
            sandbox,
            sender,
            receiver,
            sent,
            oom_before,
        })
    }

    /// Waits for the command sent by [`Context::send_exec`] to start, relays its events
    /// until it exits, and forwards `input` to it. Without `input`, the connection is left
    /// for the next exec once the exit was read ([`crate::agent_conns`]).
    async fn drive(
        self,
        agent: ExecAgent,
        request: ExecRequest,
        durable: Durable,
        input: Option<mpsc::Receiver<Input>>,
        written: tokio::sync::oneshot::Sender<()>,
    ) {
        let sending = self.send_exec(agent, request).await;
        let _ = written.send(());
        let Sending {
            sandbox,
            mut sender,
            mut receiver,
            sent,
            oom_before,
        } = match sending {
            Ok(sending) => sending,
            // A reused connection broke and no new one could be had (the sandbox stopped,
            // say): that error, with its own code.
            Err(e) => return self.fail(e.status_and_code().1, e.reported()).await,
        };
        let started = match sent {
            Ok(id) => receiver.response(id).await,
            Err(e) => Err(e),
        };
        let pid = match started {
            Ok(frame) => match frame.header {
                AgentResponse::Started { pid } => pid,
                other => {
                    return self
                        .fail(
                            "agent_failed",
                            format!("unexpected answer to exec: {other:?}"),
                        )
                        .await
                }
            },
            Err(ClientError::Agent(err)) => {
                let code = serde_json::to_value(err.code)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_else(|| "internal".into());
                return self.fail(&code, err.message).await;
            }
            Err(e) => return self.fail("agent_lost", e.to_string()).await,
        };
        // Owed to the timeline from now on: if this server dies before the exit, the next
        // one records it. Recorded while the `process.exec` commit is synced; both are done
        // before the client is told the command started.
        let (tracked, synced) = tokio::join!(
            crate::maintenance::track(&self.state, &self.row, &self.caller, pid),
            durable.wait()
        );
        let tracked = tracked.map(|t| t.id);
        if let Err(e) = synced {
            tracing::error!(sandbox = self.row.id, pid, error = %e, "{NOT_RECORDED}");
            let _ = sender.send(kill_unrecorded(pid)).await;
            self.fail("internal", NOT_RECORDED.to_string()).await;
            // Its exit is still owed: recorded as it comes (the client's stream has ended).
            let _ = self
                .relay(&sandbox, &mut receiver, pid, oom_before, tracked)
                .await;
            return;
        }
        self.send(Line::Started { pid }).await;
        // The sending half must live until the exit: dropping it half-closes the connection.
        let (sender, _forwarder) = match input {
            Some(input) => {
                let task = tokio::spawn(self.clone().forward(sender, pid, input));
                (None, Some(AbortOnDrop(task)))
            }
            None => (Some(sender), None),
        };
        let Some(exit) = self
            .relay(&sandbox, &mut receiver, pid, oom_before, tracked)
            .await
        else {
            return;
        };
        // Parked before the exit line goes out, so a client's next exec finds it. Only a
        // connection that carried nothing but this command: with input forwarded, late
        // answers to it could still come.
        if let Some(sender) = sender {
            let client = AgentClient::reunite(sender, receiver);
            self.state.conns.put(&self.row.id, sandbox, client);
        }
        self.send(exit).await;
    }

    /// Relays output of `pid` as lines until it exits; records the exit and returns its line
    /// (for the caller to send). `None` when the stream ended otherwise (its error line sent).
    async fn relay(
        &self,
        sandbox: &Sandbox,
        receiver: &mut AgentReceiver,
        pid: Pid,
        oom_before: u64,
        tracked: Option<i64>,
    ) -> Option<Line> {
        loop {
            let frame = match receiver.next().await {
                Ok(frame) => frame,
                Err(e) => {
                    self.fail("agent_lost", format!("lost the sandbox agent: {e}"))
                        .await;
                    return None;
                }
            };
            match frame.header {
                // Only this exec's process: a reused connection must never show another
                // process's output as this one's.
                AgentMessage::Output {
                    pid: from,
                    stream,
                    offset,
                } if from == pid => {
                    self.send(Line::output(stream, offset, frame.data)).await;
                }
                AgentMessage::Exit {
                    pid: exited,
                    mut status,
                } if exited == pid => {
                    crate::maintenance::mark_oom(&mut status, || sandbox.oom_kills() > oom_before);
                    let event = NewEvent {
                        sandbox_id: self.row.id.clone(),
                        tenant: self.caller.tenant.clone(),
                        actor: self.caller.actor.clone(),
                        kind: "process.exit",
                        payload: crate::maintenance::exit_payload(pid, &status),
                    };
                    if let Err(e) =
                        crate::maintenance::record_exit(&self.state, tracked, event).await
                    {
                        tracing::error!(error = %e, sandbox = self.row.id, "cannot record an exit");
                    }
                    return Some(Line::exit(&status));
                }
                AgentMessage::Response {
                    result: Err(err), ..
                } => {
                    // Input to a process that closed its stdin, a signal after its exit: the
                    // client's stream goes on.
                    tracing::debug!(pid, error = %err, "the agent refused a client's input");
                }
                AgentMessage::Output { .. }
                | AgentMessage::Exit { .. }
                | AgentMessage::Response { .. }
                | AgentMessage::Incoming { .. }
                | AgentMessage::FileEvent { .. }
                | AgentMessage::WatchEnded { .. } => {}
            }
        }
    }

    /// Sends what the client sends to `pid`, until the client stops; then keeps the sending
    /// half (and so the connection) open until the driver ends and aborts this task.
    async fn forward(self, mut sender: AgentSender, pid: Pid, mut input: mpsc::Receiver<Input>) {
        while let Some(item) = input.recv().await {
            let sent = match item {
                Input::Stdin(data) => {
                    sender
                        .send_with_data(Request::Stdin { pid, eof: false }, data)
                        .await
                }
                Input::StdinEof => sender.send(Request::Stdin { pid, eof: true }).await,
                Input::Resize(size) => sender.send(Request::Resize { pid, size }).await,
                Input::Signal { signal, group } => {
                    let sent = sender.send(Request::Signal { pid, signal, group }).await;
                    if sent.is_ok() {
                        let payload =
                            serde_json::json!({ "pid": pid, "signal": signal, "group": group });
                        self.record("process.signal", payload).await;
                    }
                    sent
                }
            };
            if let Err(e) = sent {
                tracing::debug!(pid, error = %e, "cannot forward input to the agent");
                return;
            }
        }
        std::future::pending::<()>().await
    }
}
