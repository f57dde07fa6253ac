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
//! The timeline gets `process.exec` (argv, cwd, names of env variables) before the command
//! starts and `process.exit` (or `process.error`) before the client sees the outcome. A client
//! that disconnects does not stop the command, and its exit is still recorded.

use std::collections::BTreeMap;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use base64::Engine;
use openrun_protocol::{
    AgentMessage, ExecRequest, ExitStatus, Frame, Request, Response as AgentResponse, Stream,
};
use openrun_runtime::{AgentClient, ClientError, RuntimeError, Sandbox};
use tokio::sync::mpsc;

use crate::api::{blocking, check_env, find, Caller, JsonBody, Shared};
use crate::db::{self, NewEvent, SandboxRow};
use crate::error::ApiError;
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

/// One NDJSON line (also used by `GET .../processes/{pid}/output`).
#[derive(Debug, serde::Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum Line {
    Started {
        pid: i32,
    },
    Stdout {
        offset: u64,
        data_b64: String,
    },
    Stderr {
        offset: u64,
        data_b64: String,
    },
    Exit {
        code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
        oom_killed: bool,
    },
    Error {
        code: String,
        message: String,
    },
}

impl Line {
    /// The line of an output chunk.
    pub(crate) fn output(stream: Stream, offset: u64, data: &[u8]) -> Self {
        let data_b64 = base64::engine::general_purpose::STANDARD.encode(data);
        match stream {
            Stream::Stdout => Line::Stdout { offset, data_b64 },
            Stream::Stderr => Line::Stderr { offset, data_b64 },
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

    /// The line as NDJSON bytes (with its newline).
    pub(crate) fn encode(&self) -> Option<Bytes> {
        match serde_json::to_vec(self) {
            Ok(mut text) => {
                text.push(b'\n');
                Some(Bytes::from(text))
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot encode an NDJSON line");
                None
            }
        }
    }
}

/// An NDJSON response fed by a channel of encoded lines.
pub(crate) fn ndjson_response(rx: mpsc::Receiver<Bytes>) -> Response {
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|line| (Ok::<_, std::convert::Infallible>(line), rx))
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response()
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
    let row = find(&s, &caller, &id).await?;
    if body.cmd.is_empty() || body.cmd[0].is_empty() {
        return Err(ApiError::InvalidArgument("cmd must name a program".into()));
    }
    if body.cmd.iter().any(|a| a.contains('\0')) {
        return Err(ApiError::InvalidArgument(
            "cmd must not contain NUL bytes".into(),
        ));
    }
    if body.cwd.as_deref().is_some_and(|c| c.contains('\0')) {
        return Err(ApiError::InvalidArgument(
            "cwd must not contain NUL bytes".into(),
        ));
    }
    check_env(&body.env)?;
    let timeout = body
        .timeout
        .as_deref()
        .map(openrun_runtime::limits::parse_duration)
        .transpose()
        .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
    let (sandbox, mut client) = open_running(&s, &row).await?;
    let event = NewEvent {
        sandbox_id: row.id.clone(),
        tenant: caller.tenant.clone(),
        actor: caller.actor.clone(),
        kind: "process.exec",
        payload: serde_json::json!({
            "argv": body.cmd,
            "cwd": body.cwd,
            "env": body.env.keys().collect::<Vec<_>>(),
            "background": body.background,
        }),
    };
    s.db.call(move |c| db::append_event(c, &event)).await?;
    let request = ExecRequest {
        argv: body.cmd,
        env: body.env,
        cwd: body.cwd,
        timeout_ms: timeout.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        attach: !body.background,
        stdin: body.stdin,
        ..Default::default()
    };
    if body.background {
        let started = client
            .call(Request::Exec(request))
            .await
            .map_err(|e| ApiError::from_client("cannot start the process", e))?;
        return match started.header {
            AgentResponse::Started { pid } => Ok((
                StatusCode::CREATED,
                axum::Json(serde_json::json!({ "pid": pid })),
            )
                .into_response()),
            other => Err(ApiError::internal(
                "cannot start the process",
                format!("unexpected answer to exec: {other:?}"),
            )),
        };
    }
    let (tx, rx) = mpsc::channel::<Bytes>(STREAM_BUFFER);
    let ctx = Context {
        state: s.clone(),
        sandbox_id: row.id,
        caller,
        tx,
    };
    tokio::spawn(ctx.drive(sandbox, client, request));
    Ok(ndjson_response(rx))
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
        Err(RuntimeError::Agent(ClientError::Connect { .. })) => {
            Err(ApiError::NotRunning(id.to_string()))
        }
        Err(e) => Err(ApiError::internal("cannot reach the sandbox agent", e)),
    }
}

/// Records that a sandbox the database thought running is gone.
pub(crate) async fn mark_vanished(s: &Shared, id: &str, tenant: &str) -> Result<(), ApiError> {
    let event = NewEvent {
        sandbox_id: id.to_string(),
        tenant: tenant.to_string(),
        actor: "system".into(),
        kind: "sandbox.vanish",
        payload: serde_json::json!({ "reason": "its agent is no longer running" }),
    };
    let key = id.to_string();
    s.db.call(move |c| db::stop_sandbox(c, &key, false, &event))
        .await?;
    Ok(())
}

/// What the streaming task needs.
struct Context {
    state: Shared,
    sandbox_id: String,
    caller: Caller,
    tx: mpsc::Sender<Bytes>,
}

impl Context {
    /// Sends one line; a client that went away is ignored (the command keeps running and its
    /// exit is still recorded).
    async fn send(&self, line: &Line) {
        if let Some(text) = line.encode() {
            let _ = self.tx.send(text).await;
        }
    }

    async fn record(&self, kind: &'static str, payload: serde_json::Value) {
        let event = NewEvent {
            sandbox_id: self.sandbox_id.clone(),
            tenant: self.caller.tenant.clone(),
            actor: self.caller.actor.clone(),
            kind,
            payload,
        };
        if let Err(e) = self
            .state
            .db
            .call(move |c| db::append_event(c, &event))
            .await
        {
            tracing::error!(error = %e, sandbox = self.sandbox_id, kind, "cannot record an event");
        }
    }

    async fn fail(&self, code: &str, message: String) {
        self.record(
            "process.error",
            serde_json::json!({ "code": code, "message": message }),
        )
        .await;
        self.send(&Line::Error {
            code: code.to_string(),
            message,
        })
        .await;
    }

    /// Starts the command and relays its events until it exits.
    async fn drive(self, sandbox: Sandbox, client: AgentClient, request: ExecRequest) {
        let oom_before = sandbox.oom_kills();
        let (mut sender, mut receiver) = client.split();
        let started = match sender.send(Request::Exec(request)).await {
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
        self.send(&Line::Started { pid }).await;
        loop {
            let frame = match receiver.next().await {
                Ok(frame) => frame,
                Err(e) => {
                    return self
                        .fail("agent_lost", format!("lost the sandbox agent: {e}"))
                        .await
                }
            };
            match frame.header {
                AgentMessage::Output { stream, offset, .. } => {
                    self.send(&Line::output(stream, offset, &frame.data)).await;
                }
                AgentMessage::Exit {
                    pid: exited,
                    mut status,
                } if exited == pid => {
                    // A SIGKILL (or a shell's 137) while the memory cgroup counted new OOM
                    // kills is an OOM kill.
                    let killed = status.signal == Some(9) || status.code == Some(137);
                    if killed && sandbox.oom_kills() > oom_before {
                        status.oom_killed = true;
                    }
                    self.record(
                        "process.exit",
                        serde_json::json!({
                            "pid": pid,
                            "code": status.code,
                            "signal": status.signal,
                            "timed_out": status.timed_out,
                            "oom_killed": status.oom_killed,
                        }),
                    )
                    .await;
                    self.send(&Line::exit(&status)).await;
                    return;
                }
                AgentMessage::Exit { .. } | AgentMessage::Response { .. } => {}
            }
        }
    }
}
