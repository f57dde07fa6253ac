//! `/v1/sandboxes/{id}/processes…`: the agent's process table, each handler a thin adapter over
//! one core call ([`list_processes`], [`process_status`], [`signal_process`], [`write_stdin`],
//! [`resize_terminal`], [`follow_output`]; the E2B and MCP surfaces call them too).
//! `POST .../exec` with `"background": true` starts processes for these to act on.
//!
//! | method and path | agent request | answer |
//! |---|---|---|
//! | `GET processes` | `ListProcesses` | 200 `[{pid,argv,state,status?,stdout_len,…}]` |
//! | `GET processes/{pid}` | `ProcessStatus` | 200 one entry |
//! | `POST processes/{pid}/signal` `{"signal":15,"group":true}` | `Signal` | 204 |
//! | `POST processes/{pid}/stdin?eof=true` (raw body) | `Stdin` | 204 |
//! | `GET processes/{pid}/output?stdout_since=&stderr_since=&follow=` | `Attach` | 200 NDJSON |
//!
//! The output stream has the exec stream's `stdout`/`stderr`/`exit` lines (no `started`).
//! Without `follow` it ends once the output present at the request has been sent (and the
//! `exit` line, if the process had ended); with `follow` it ends at the exit.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use openrun_protocol::{
    AgentMessage, AttachRequest, Pid, ProcessInfo, ProcessState, PtySize, Request,
    Response as AgentResponse, Stream, MAX_DATA_LEN,
};
use tokio::sync::mpsc;

use crate::api::{find, Caller, JsonBody, Shared};
use crate::error::ApiError;
use crate::exec::{agent_call, ndjson_response, open_running, Line};
use crate::files::record;
use crate::openapi::ErrorAnswers;
use crate::query::Query;

/// Lines buffered between the agent and a slow client.
const STREAM_BUFFER: usize = 64;

fn unexpected(other: AgentResponse) -> ApiError {
    ApiError::internal(
        "the sandbox agent failed",
        format!("unexpected answer: {other:?}"),
    )
}

/// A pid from the path: 404 (like a missing process) when it is not a positive number.
fn pid(text: &str) -> Result<Pid, ApiError> {
    text.parse::<Pid>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| ApiError::NotFound(format!("no such process: {text}")))
}

/// Checks a signal number from a client.
pub(crate) fn check_signal(signal: i32) -> Result<(), ApiError> {
    if !(1..=64).contains(&signal) {
        return Err(ApiError::InvalidArgument(format!(
            "signal must be a number from 1 to 64, not {signal}"
        )));
    }
    Ok(())
}

/// `GET /v1/sandboxes/{id}/processes`.
#[utoipa::path(get, operation_id = "list_processes",
    path = "/v1/sandboxes/{id}/processes",
    tag = "processes",
    params(("id" = String, Path, description = "Sandbox id")),
    responses((status = 200, description = "The agent's process table: pid, argv, state, status, output lengths", body = Vec<Object>), ErrorAnswers))]
pub async fn list(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(Json(list_processes(&s, &caller, &id).await?).into_response())
}

/// The process table of the caller's sandbox `id`: running processes and exited ones not yet
/// released.
pub(crate) async fn list_processes(
    s: &Shared,
    caller: &Caller,
    id: &str,
) -> Result<Vec<ProcessInfo>, ApiError> {
    match agent_call(s, caller, id, Request::ListProcesses, Vec::new())
        .await?
        .1
        .header
    {
        AgentResponse::Processes { processes } => Ok(processes),
        other => Err(unexpected(other)),
    }
}

/// `GET /v1/sandboxes/{id}/processes/{pid}`.
#[utoipa::path(get, operation_id = "get_process",
    path = "/v1/sandboxes/{id}/processes/{pid}",
    tag = "processes",
    params(("id" = String, Path, description = "Sandbox id"), ("pid" = i32, Path, description = "Process id inside the sandbox")),
    responses((status = 200, description = "One process", body = Object), ErrorAnswers))]
pub async fn status(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path((id, p)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    Ok(Json(process_status(&s, &caller, &id, pid(&p)?).await?).into_response())
}

/// One process of the caller's sandbox `id` (404 `no_such_process` when it is not in the table).
pub(crate) async fn process_status(
    s: &Shared,
    caller: &Caller,
    id: &str,
    pid: Pid,
) -> Result<ProcessInfo, ApiError> {
    match agent_call(s, caller, id, Request::ProcessStatus { pid }, Vec::new())
        .await?
        .1
        .header
    {
        AgentResponse::Process(info) => Ok(info),
        other => Err(unexpected(other)),
    }
}

/// Body of `processes/{pid}/signal`.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignalBody {
    signal: i32,
    #[serde(default)]
    group: bool,
}

/// `POST /v1/sandboxes/{id}/processes/{pid}/signal` `{"signal":15,"group":true}`.
#[utoipa::path(post, operation_id = "signal_process",
    path = "/v1/sandboxes/{id}/processes/{pid}/signal",
    tag = "processes",
    params(("id" = String, Path, description = "Sandbox id"), ("pid" = i32, Path, description = "Process id inside the sandbox")),
    request_body = SignalBody,
    responses((status = 204, description = "Sent"), ErrorAnswers))]
pub async fn signal(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path((id, p)): Path<(String, String)>,
    JsonBody(body): JsonBody<SignalBody>,
) -> Result<StatusCode, ApiError> {
    signal_process(&s, &caller, &id, pid(&p)?, body.signal, body.group).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Sends `signal` to `pid` (to its whole process group with `group`) in the caller's sandbox
/// `id`; records `process.signal`.
pub(crate) async fn signal_process(
    s: &Shared,
    caller: &Caller,
    id: &str,
    pid: Pid,
    signal: i32,
    group: bool,
) -> Result<(), ApiError> {
    check_signal(signal)?;
    let request = Request::Signal { pid, signal, group };
    let (row, answer) = agent_call(s, caller, id, request, Vec::new()).await?;
    match answer.header {
        AgentResponse::Done => {
            let payload = serde_json::json!({ "pid": pid, "signal": signal, "group": group });
            record(s, caller, &row, "process.signal", payload).await
        }
        other => Err(unexpected(other)),
    }
}

/// `POST /v1/sandboxes/{id}/processes/{pid}/stdin[?eof=true]`: writes the raw body.
#[utoipa::path(post, operation_id = "write_stdin",
    path = "/v1/sandboxes/{id}/processes/{pid}/stdin",
    tag = "processes",
    params(("id" = String, Path, description = "Sandbox id"), ("pid" = i32, Path, description = "Process id inside the sandbox"), ("eof" = Option<bool>, Query, description = "Close stdin after writing")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "Bytes for the process's stdin"),
    responses((status = 204, description = "Written"), ErrorAnswers))]
pub async fn stdin(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path((id, p)): Path<(String, String)>,
    query: Query,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiError> {
    let pid = pid(&p)?;
    query.only(&["eof"])?;
    let eof = query.flag("eof")?;
    let data = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge {
                limit: crate::api::MAX_BODY,
            }
        } else {
            ApiError::InvalidArgument(format!("cannot read the request body: {}", e.body_text()))
        }
    })?;
    write_stdin(&s, &caller, &id, pid, data.to_vec(), eof).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Writes `data` to the stdin (or terminal) of `pid` in the caller's sandbox `id`, then closes
/// its stdin with `eof`.
pub(crate) async fn write_stdin(
    s: &Shared,
    caller: &Caller,
    id: &str,
    pid: Pid,
    data: Vec<u8>,
    eof: bool,
) -> Result<(), ApiError> {
    if data.len() > MAX_DATA_LEN {
        return Err(ApiError::TooLarge {
            limit: MAX_DATA_LEN,
        });
    }
    match agent_call(s, caller, id, Request::Stdin { pid, eof }, data)
        .await?
        .1
        .header
    {
        AgentResponse::Done => Ok(()),
        other => Err(unexpected(other)),
    }
}

/// Forgets the exited process `pid` of the caller's sandbox `id` and its output (409
/// `still_running` while it runs).
pub(crate) async fn release_process(
    s: &Shared,
    caller: &Caller,
    id: &str,
    pid: Pid,
) -> Result<(), ApiError> {
    match agent_call(s, caller, id, Request::Release { pid }, Vec::new())
        .await?
        .1
        .header
    {
        AgentResponse::Done => Ok(()),
        other => Err(unexpected(other)),
    }
}

/// Resizes the terminal of `pid` (started with a PTY) in the caller's sandbox `id`.
pub(crate) async fn resize_terminal(
    s: &Shared,
    caller: &Caller,
    id: &str,
    pid: Pid,
    size: PtySize,
) -> Result<(), ApiError> {
    if size.rows == 0 || size.cols == 0 {
        return Err(ApiError::InvalidArgument(format!(
            "a terminal needs at least one row and one column, not {}x{}",
            size.cols, size.rows
        )));
    }
    match agent_call(s, caller, id, Request::Resize { pid, size }, Vec::new())
        .await?
        .1
        .header
    {
        AgentResponse::Done => Ok(()),
        other => Err(unexpected(other)),
    }
}

/// `GET /v1/sandboxes/{id}/processes/{pid}/output?stdout_since=N&stderr_since=M&follow=false`.
#[utoipa::path(get, operation_id = "read_output",
    path = "/v1/sandboxes/{id}/processes/{pid}/output",
    tag = "processes",
    params(("id" = String, Path, description = "Sandbox id"), ("pid" = i32, Path, description = "Process id inside the sandbox"), ("stdout_since" = Option<u64>, Query, description = "Stdout offset to start from"), ("stderr_since" = Option<u64>, Query, description = "Stderr offset to start from"), ("follow" = Option<bool>, Query, description = "Keep streaming until the process exits")),
    responses((status = 200, description = "NDJSON lines: stdout/stderr chunks with offsets, then exit if it ended", content_type = "application/x-ndjson", body = String), ErrorAnswers))]
pub async fn output(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path((id, p)): Path<(String, String)>,
    query: Query,
) -> Result<Response, ApiError> {
    let pid = pid(&p)?;
    query.only(&["stdout_since", "stderr_since", "follow"])?;
    let request = AttachRequest {
        pid,
        stdout_since: query.u64("stdout_since")?.unwrap_or(0),
        stderr_since: query.u64("stderr_since")?.unwrap_or(0),
        follow: query.flag("follow")?,
    };
    let rx = follow_output(&s, &caller, &id, request).await?;
    Ok(ndjson_response(rx))
}

/// The output of a process of the caller's sandbox `id` from the offsets in `request`, as
/// [`Line`]s (`stdout`/`stderr`, then `exit` once it ended). Without `follow` the lines end at
/// the output present now (and the exit, if it had ended); with `follow`, at its exit. An
/// `error` line ends a stream whose agent went away.
pub(crate) async fn follow_output(
    s: &Shared,
    caller: &Caller,
    id: &str,
    request: AttachRequest,
) -> Result<mpsc::Receiver<Line>, ApiError> {
    let pid = request.pid;
    let row = find(s, caller, id).await?;
    let (_sandbox, client) = open_running(s, &row).await?;
    let (mut sender, mut receiver) = client.split();
    let sent = sender.send(Request::Attach(request.clone())).await;
    let attach_id = sent.as_ref().ok().copied();
    let attached = match sent {
        Ok(request_id) => receiver.response(request_id).await,
        Err(e) => Err(e),
    }
    .map_err(|e| ApiError::from_client("the sandbox agent failed", e))?;
    let process = match attached.header {
        AgentResponse::Attached { process, .. } => process,
        other => return Err(unexpected(other)),
    };
    // Without follow, the stream ends at the output present now (and the exit, if any).
    let exited = matches!(process.state, ProcessState::Exited { .. });
    let ends = [process.stdout_len, process.stderr_len];
    let mut cursor = [request.stdout_since, request.stderr_since];
    let (tx, rx) = mpsc::channel::<Line>(STREAM_BUFFER);
    tokio::spawn(async move {
        // The sender must live as long as the stream: dropping it closes the connection.
        let _sender = sender;
        loop {
            if !request.follow && !exited && cursor[0] >= ends[0] && cursor[1] >= ends[1] {
                return;
            }
            // A quiet process sends nothing for long: a reader that left must end the attach
            // (and its agent connection) now, not at the next output.
            let next = tokio::select! {
                next = receiver.next() => next,
                () = tx.closed() => return,
            };
            let frame = match next {
                Ok(frame) => frame,
                Err(e) => {
                    let line = Line::Error {
                        code: "agent_lost".into(),
                        message: format!("lost the sandbox agent: {e}"),
                    };
                    let _ = tx.send(line).await;
                    return;
                }
            };
            let line = match frame.header {
                AgentMessage::Output {
                    pid: from,
                    stream,
                    offset,
                } if from == pid => {
                    let index = usize::from(stream == Stream::Stderr);
                    cursor[index] = offset + frame.data.len() as u64;
                    Line::output(stream, offset, frame.data)
                }
                AgentMessage::Exit { pid: from, status } if from == pid => {
                    let _ = tx.send(Line::exit(&status)).await;
                    return;
                }
                // The agent's last word on an attach whose process vanished (released or
                // replaced while this stream followed it): no exit will come.
                AgentMessage::Response {
                    id,
                    result: Err(err),
                } if Some(id) == attach_id => {
                    let code = serde_json::to_value(err.code)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_else(|| "no_such_process".into());
                    let _ = tx
                        .send(Line::Error {
                            code,
                            message: err.message,
                        })
                        .await;
                    return;
                }
                _ => continue,
            };
            if tx.send(line).await.is_err() {
                return;
            }
        }
    });
    Ok(rx)
}
