//! `GET /v1/sandboxes/{id}/exec/ws`: the exec stream over a WebSocket, with stdin and signals.
//!
//! The client's first message is the exec body as JSON text (the body of `POST .../exec`,
//! without `background`). The server then sends the exec stream's lines as text messages
//! (`{"type":"started"|"stdout"|"stderr"|"exit"|"error",...}`, output base64 in `data_b64`)
//! and closes after the `exit` or `error` line. While the command runs the client may send:
//!
//! ```text
//! {"type":"stdin","data_b64":"aGkK"}     (needs "stdin": true in the exec body)
//! {"type":"stdin_eof"}
//! {"type":"signal","signal":15}           ("group": true for its whole process group)
//! ```
//!
//! A message the server cannot accept ends the socket with an `error` line (code
//! `invalid_argument`). Like a client of the NDJSON stream that disconnects, such a client
//! leaves the command running (its stdin, if it had one, is closed) and its exit is recorded.
//!
//! [`relay`] is the loop shared with the terminal ([`crate::terminal`]): lines from the exec
//! driver out, [`Input`] in; a [`Surface`] says how each is encoded.

use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use base64::Engine;
use openrun_runtime::{AgentClient, Sandbox};
use tokio::sync::mpsc;

use crate::api::{find, Caller, Shared};
use crate::db::SandboxRow;
use crate::error::ApiError;
use crate::exec::{open_running, start, ExecBody, Input, Line};
use crate::openapi::ErrorAnswers;
use crate::processes::check_signal;

/// Largest message a client may send (a stdin chunk of up to 3 MiB, base64 in JSON).
const MAX_MESSAGE: usize = 4 << 20;
/// How long the server waits for the exec body.
const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Client messages queued for the agent before the server stops reading the socket.
const INPUT_BUFFER: usize = 16;
/// The normal closure code.
const CLOSE_NORMAL: u16 = 1000;

/// The upgrade of a request that must be a WebSocket handshake: 400 naming the problem when it
/// is not one.
pub(crate) fn websocket(
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<WebSocketUpgrade, ApiError> {
    let upgrade = upgrade.map_err(|e| {
        ApiError::InvalidArgument(format!(
            "this endpoint speaks WebSocket only: {}",
            e.body_text()
        ))
    })?;
    Ok(upgrade
        .max_message_size(MAX_MESSAGE)
        .max_frame_size(MAX_MESSAGE))
}

/// `GET /v1/sandboxes/{id}/exec/ws`.
#[utoipa::path(get, operation_id = "exec_ws",
    path = "/v1/sandboxes/{id}/exec/ws",
    tag = "processes",
    params(("id" = String, Path, description = "Sandbox id")),
    responses((status = 101, description = "WebSocket: the client sends the exec body as JSON text, then optional {\"type\":\"stdin\",\"data_b64\"}, {\"type\":\"stdin_eof\"}, {\"type\":\"signal\",\"signal\":N}; the server sends the exec stream's lines as text messages and closes after exit or error"), ErrorAnswers))]
pub async fn exec_ws(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let row = find(&s, &caller, &id).await?;
    let upgrade = websocket(upgrade)?;
    let agent = open_running(&s, &row).await?;
    Ok(upgrade
        .on_upgrade(move |socket| session(s, caller, row, agent, socket))
        .into_response())
}

/// One WebSocket exec: the body, then the relay.
async fn session(
    s: Shared,
    caller: Caller,
    row: SandboxRow,
    agent: (Sandbox, AgentClient),
    mut socket: WebSocket,
) {
    let body = match first_message(&mut socket).await {
        Ok(body) => body,
        Err(e) => return refuse(socket, &e).await,
    };
    if body.background() {
        let e = ApiError::InvalidArgument(
            "background is not available over WebSocket: use POST .../exec".into(),
        );
        return refuse(socket, &e).await;
    }
    let request = match body.into_request() {
        Ok(request) => request,
        Err(e) => return refuse(socket, &e).await,
    };
    let surface = ExecSurface {
        stdin_open: request.stdin,
    };
    let (input_tx, input_rx) = mpsc::channel(INPUT_BUFFER);
    match start(&s, &caller, &row, agent, request, Some(input_rx)).await {
        Ok(lines) => relay(socket, lines, input_tx, surface).await,
        Err(e) => refuse(socket, &e).await,
    }
}

/// Waits for the exec body.
async fn first_message(socket: &mut WebSocket) -> Result<ExecBody, ApiError> {
    let message = tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, async {
        loop {
            match socket.recv().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => return other,
            }
        }
    })
    .await
    .map_err(|_| {
        ApiError::InvalidArgument(format!(
            "no exec body within {}s",
            FIRST_MESSAGE_TIMEOUT.as_secs()
        ))
    })?;
    match message {
        Some(Ok(Message::Text(text))) => serde_json::from_str(text.as_str())
            .map_err(|e| ApiError::InvalidArgument(format!("invalid exec body: {e}"))),
        Some(Ok(_)) => Err(ApiError::InvalidArgument(
            "the first message must be the exec body as JSON text".into(),
        )),
        None | Some(Err(_)) => Err(ApiError::InvalidArgument(
            "the client closed the socket before sending the exec body".into(),
        )),
    }
}

/// Sends `e` as an `error` line and closes.
pub(crate) async fn refuse(mut socket: WebSocket, e: &ApiError) {
    if let Some(text) = Line::error(e).json() {
        let _ = socket.send(Message::Text(text.into())).await;
    }
    close(socket).await;
}

/// Closes normally (the client may already be gone).
async fn close(mut socket: WebSocket) {
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code: CLOSE_NORMAL,
            reason: "".into(),
        })))
        .await;
}

/// How a WebSocket surface encodes the exec driver's lines and decodes the client's messages.
pub(crate) trait Surface {
    /// The messages of one line (none to leave it out).
    fn encode(&self, line: Line) -> Option<Message>;
    /// The input a client message asks for (`None` for nothing), or why it is refused.
    fn decode(&mut self, message: Message) -> Result<Option<Input>, ApiError>;
    /// What to send the command when the client leaves before it ends.
    fn on_leave(&self) -> Option<Input>;
}

/// Relays `lines` to the client and its messages (through `surface`) to the command, until the
/// last line has been sent or the client leaves or breaks the protocol.
pub(crate) async fn relay(
    mut socket: WebSocket,
    mut lines: mpsc::Receiver<Line>,
    input: mpsc::Sender<Input>,
    mut surface: impl Surface,
) {
    loop {
        tokio::select! {
            line = lines.recv() => {
                let Some(line) = line else {
                    return close(socket).await;
                };
                let last = line.is_last();
                if let Some(message) = surface.encode(line) {
                    if socket.send(message).await.is_err() {
                        return leave(&surface, &input).await;
                    }
                }
                if last {
                    return close(socket).await;
                }
            }
            message = socket.recv() => match message {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => {
                    return leave(&surface, &input).await;
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(message)) => match surface.decode(message) {
                    // A send fails only once the command has ended; its last line follows.
                    Ok(Some(item)) => {
                        let _ = input.send(item).await;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        leave(&surface, &input).await;
                        return refuse(socket, &e).await;
                    }
                },
            },
        }
    }
}

/// The client is gone: tell the command what its surface says.
async fn leave(surface: &impl Surface, input: &mpsc::Sender<Input>) {
    if let Some(item) = surface.on_leave() {
        let _ = input.send(item).await;
    }
}

/// A message from the client of a WebSocket exec.
#[derive(Debug, serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum ClientMessage {
    Stdin {
        data_b64: String,
    },
    StdinEof,
    Signal {
        signal: i32,
        #[serde(default)]
        group: bool,
    },
}

/// The exec surface: every line as a JSON text message.
struct ExecSurface {
    /// The command has a stdin pipe the client has not closed.
    stdin_open: bool,
}

impl Surface for ExecSurface {
    fn encode(&self, line: Line) -> Option<Message> {
        line.json().map(|text| Message::Text(text.into()))
    }

    fn decode(&mut self, message: Message) -> Result<Option<Input>, ApiError> {
        let Message::Text(text) = message else {
            return Err(ApiError::InvalidArgument(
                "messages must be JSON text: {\"type\":\"stdin\",\"data_b64\":...}, \
                 {\"type\":\"stdin_eof\"} or {\"type\":\"signal\",\"signal\":N}"
                    .into(),
            ));
        };
        let message: ClientMessage = serde_json::from_str(text.as_str())
            .map_err(|e| ApiError::InvalidArgument(format!("invalid message: {e}")))?;
        match message {
            ClientMessage::Stdin { data_b64 } => {
                self.check_stdin()?;
                let data = base64::engine::general_purpose::STANDARD
                    .decode(data_b64.as_bytes())
                    .map_err(|e| ApiError::InvalidArgument(format!("invalid data_b64: {e}")))?;
                Ok(Some(Input::Stdin(data)))
            }
            ClientMessage::StdinEof => {
                self.check_stdin()?;
                self.stdin_open = false;
                Ok(Some(Input::StdinEof))
            }
            ClientMessage::Signal { signal, group } => {
                check_signal(signal)?;
                Ok(Some(Input::Signal { signal, group }))
            }
        }
    }

    fn on_leave(&self) -> Option<Input> {
        // Without a client nothing more can arrive: let a reader of stdin see its end.
        self.stdin_open.then_some(Input::StdinEof)
    }
}

impl ExecSurface {
    fn check_stdin(&self) -> Result<(), ApiError> {
        if self.stdin_open {
            Ok(())
        } else {
            Err(ApiError::InvalidArgument(
                "the command's stdin is not open: ask for \"stdin\": true in the exec body, \
                 and send nothing after stdin_eof"
                    .into(),
            ))
        }
    }
}
