//! `GET /v1/sandboxes/{id}/terminal?cols=80&rows=24[&cmd=["bash"]]`: a command on a new
//! pseudo-terminal, over a WebSocket.
//!
//! Binary messages are raw terminal bytes both ways (what the client sends is typed into the
//! terminal). The client resizes it with a text message `{"type":"resize","cols":N,"rows":M}`.
//! The server's last message is a text `{"type":"exit",...}` line (or `{"type":"error",...}`
//! when the command cannot start), then it closes. A client that leaves before the command
//! ends hangs its terminal up: the command's process group gets `SIGHUP`, as when a terminal
//! window closes.
//!
//! Without `cmd` the command is the sandbox's login shell, chosen inside the sandbox:
//! `/bin/bash -l` when it exists there, else `/bin/sh`. It runs through the same exec driver
//! as every other command ([`crate::exec::start`]), so the timeline records it the same way
//! (`process.exec` with the terminal size, then `process.exit`).

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use openrun_protocol::{ExecRequest, PtySize};
use tokio::sync::mpsc;

use crate::api::{find, Caller, Shared};
use crate::error::ApiError;
use crate::exec::{check_argv, open_running, start, Input, Line};
use crate::openapi::ErrorAnswers;
use crate::query::Query;
use crate::ws::{refuse, relay, websocket, Surface};

/// Size of a terminal when the client gives none.
const DEFAULT_SIZE: PtySize = PtySize { rows: 24, cols: 80 };
/// The login shell, decided inside the sandbox.
const LOGIN_SHELL: &str = "if [ -x /bin/bash ]; then exec /bin/bash -l; fi; exec /bin/sh";
/// `SIGHUP`: the terminal hung up.
const SIGHUP: i32 = 1;
/// Client messages queued for the agent before the server stops reading the socket.
const INPUT_BUFFER: usize = 64;

/// `GET /v1/sandboxes/{id}/terminal?cols=&rows=&cmd=`.
#[utoipa::path(get, operation_id = "terminal",
    path = "/v1/sandboxes/{id}/terminal",
    tag = "processes",
    params(("id" = String, Path, description = "Sandbox id"), ("cols" = Option<u16>, Query, description = "Columns (default 80)"), ("rows" = Option<u16>, Query, description = "Rows (default 24)"), ("cmd" = Option<String>, Query, description = "The command as a JSON array of strings (default: the sandbox's login shell)")),
    responses((status = 101, description = "WebSocket: binary messages are raw terminal bytes both ways; the client resizes with text {\"type\":\"resize\",\"cols\":N,\"rows\":M}; the server's last message is a text {\"type\":\"exit\",...} (or error) line, then it closes"), ErrorAnswers))]
pub async fn terminal(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    query: Query,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    query.only(&["cols", "rows", "cmd"])?;
    let size = PtySize {
        rows: dimension(&query, "rows", DEFAULT_SIZE.rows)?,
        cols: dimension(&query, "cols", DEFAULT_SIZE.cols)?,
    };
    let argv = match query.text("cmd") {
        Some(json) => {
            let argv: Vec<String> = serde_json::from_str(json).map_err(|e| {
                ApiError::InvalidArgument(format!(
                    "query parameter \"cmd\" must be a JSON array of strings: {e}"
                ))
            })?;
            check_argv(&argv)?;
            argv
        }
        None => vec!["/bin/sh".into(), "-c".into(), LOGIN_SHELL.into()],
    };
    let row = find(&s, &caller, &id).await?;
    let upgrade = websocket(upgrade)?;
    let agent = open_running(&s, &row).await?;
    let request = ExecRequest {
        argv,
        pty: Some(size),
        attach: true,
        ..Default::default()
    };
    Ok(upgrade
        .on_upgrade(move |socket| async move {
            let (input_tx, input_rx) = mpsc::channel(INPUT_BUFFER);
            match start(&s, &caller, &row, agent, request, Some(input_rx)).await {
                Ok(lines) => relay(socket, lines, input_tx, TerminalSurface).await,
                Err(e) => refuse(socket, &e).await,
            }
        })
        .into_response())
}

/// A terminal dimension from the query: 1 to 65535, `default` when missing.
fn dimension(query: &Query, name: &str, default: u16) -> Result<u16, ApiError> {
    match query.u64(name)? {
        None => Ok(default),
        Some(n) => u16::try_from(n).ok().filter(|n| *n > 0).ok_or_else(|| {
            ApiError::InvalidArgument(format!(
                "query parameter {name:?} must be from 1 to 65535, not {n}"
            ))
        }),
    }
}

/// A text message from a terminal client.
#[derive(Debug, serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum ClientMessage {
    Resize { cols: u16, rows: u16 },
}

/// The terminal surface: output as binary messages, the final line as text.
struct TerminalSurface;

impl Surface for TerminalSurface {
    fn encode(&self, line: Line) -> Option<Message> {
        match line {
            // A PTY merges both streams into `stdout`.
            Line::Stdout { data, .. } | Line::Stderr { data, .. } => {
                Some(Message::Binary(data.into()))
            }
            // Only bytes for the screen and the final line: the pid is in the process list.
            Line::Started { .. } => None,
            last @ (Line::Exit { .. } | Line::Error { .. }) => {
                last.json().map(|text| Message::Text(text.into()))
            }
        }
    }

    fn decode(&mut self, message: Message) -> Result<Option<Input>, ApiError> {
        match message {
            Message::Binary(data) => Ok(Some(Input::Stdin(data.to_vec()))),
            Message::Text(text) => {
                let ClientMessage::Resize { cols, rows } = serde_json::from_str(text.as_str())
                    .map_err(|e| {
                        ApiError::InvalidArgument(format!(
                            "text messages must be {{\"type\":\"resize\",\"cols\":N,\"rows\":M}} \
                             (terminal input goes in binary messages): {e}"
                        ))
                    })?;
                if cols == 0 || rows == 0 {
                    return Err(ApiError::InvalidArgument(format!(
                        "invalid terminal size: {cols} columns, {rows} rows"
                    )));
                }
                Ok(Some(Input::Resize(PtySize { rows, cols })))
            }
            Message::Ping(_) | Message::Pong(_) | Message::Close(_) => Ok(None),
        }
    }

    fn on_leave(&self) -> Option<Input> {
        Some(Input::Signal {
            signal: SIGHUP,
            group: true,
        })
    }
}
