//! The Connect protocol (<https://connectrpc.com/docs/protocol>) as envd speaks it to the
//! official SDKs: **JSON codec only, no compression** (fact sheet §5.1). Every envd RPC
//! module ([`super::process`], [`super::filesystem`], [`super::watch`]) is built on the small
//! API below; nothing else in this crate knows about envelopes.
//!
//! # Unary methods
//!
//! ```ignore
//! async fn stat(
//!     State(s): State<Shared>,
//!     Extension(ctx): Extension<SandboxCtx>,
//!     Unary(request): Unary<StatRequest>,
//! ) -> Result<Reply<StatResponse>, ConnectError> {
//!     let stat = crate::files::stat_path(&s, &ctx.caller, &ctx.sandbox_id, request.path).await?;
//!     Ok(Reply(StatResponse { entry: ... }))
//! }
//! ```
//!
//! * [`Unary<T>`] reads a `Content-Type: application/json` body (at most [`MAX_MESSAGE`]
//!   bytes; empty = `{}`) into `T`; any failure is a [`ConnectError`].
//! * [`Reply<T>`] answers 200 `application/json`.
//! * [`ConnectError`] ([`Code`] + message) answers a non-200 status (the canonical one of the
//!   code) with `{"code":"not_found","message":"…"}`. `?` turns an [`ApiError`] into one
//!   ([`ConnectError::from`] is the one mapping of our errors to Connect codes).
//! * [`Meta`] (an extractor too) holds `Connect-Timeout-Ms` and `Keepalive-Ping-Interval`.
//!
//! # Server-streaming methods
//!
//! ```ignore
//! async fn watch(
//!     State(s): State<Shared>,
//!     Extension(ctx): Extension<SandboxCtx>,
//!     request: Streaming<WatchDirRequest>,
//! ) -> Result<Response, StreamError> {
//!     let (tx, rx) = tokio::sync::mpsc::channel(16);
//!     tokio::spawn(async move { let _ = tx.send(Ok(first)).await; /* Err(e) ends with e */ });
//!     Ok(server_stream(rx, StreamOptions {
//!         keepalive: request.meta.keepalive.map(|every| (every, keepalive_message)),
//!         deadline: request.meta.timeout,
//!     }))
//! }
//! ```
//!
//! * [`Streaming<T>`]: a `Content-Type: application/connect+json` body holding exactly one
//!   enveloped message (`flags:u8 | length:u32 BE | JSON`), decoded into `message`, with the
//!   request's [`Meta`]. Its rejection, like [`StreamError`], answers 200
//!   `application/connect+json` holding only the end-of-stream envelope with the error: the
//!   Connect protocol reports a streaming call's errors there.
//! * [`server_stream`] answers 200 `application/connect+json`: one envelope per `Ok` item of
//!   the channel, then the end-of-stream envelope (flag `0x02`): `{}` when the channel
//!   closes, `{"error":{"code","message"}}` after an `Err` item (which ends the stream).
//!   [`StreamOptions::keepalive`] sends a given message after that long without one;
//!   [`StreamOptions::deadline`] ends the stream with `deadline_exceeded` after that long.
//!   A client that goes away drops the receiver: senders see their `send` fail.
//!
//! # Client-streaming methods
//!
//! * [`ClientStream<T>`]: the enveloped request messages as they arrive
//!   ([`ClientStream::next`]), with the request's [`Meta`].
//! * [`stream_reply`] answers with one message then the end-of-stream envelope.
//!
//! # Malformed input
//!
//! Never a panic nor a 5xx: a wrong content type is `invalid_argument` (HTTP 415), compression
//! (`Content-Encoding`, `Connect-Content-Encoding` or the envelope flag `0x01`) is
//! `invalid_argument` ("compression is not supported"), unknown flags, a length beyond the
//! body, trailing bytes or text that is not the message's JSON are `invalid_argument`, a
//! message or body above [`MAX_MESSAGE`] is `resource_exhausted`, a bad `Connect-Timeout-Ms`
//! is `invalid_argument`, and so is a `Connect-Protocol-Version` other than 1.
//!
//! # proto3 JSON
//!
//! Field names are lowerCamelCase (declare `#[serde(rename_all = "camelCase")]` and an `alias`
//! for the snake_case name where it differs), unknown fields are ignored, and the helpers in
//! [`pj`] cover `int64` (a decimal string; numbers accepted), `uint32` (numbers; strings
//! accepted), `bytes` (standard base64) and enums (by name; numbers accepted).

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use openrun_protocol::ErrorCode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::error::ApiError;

/// Largest message (and unary body) accepted, in bytes: 4 MiB, connect-go's and gRPC's
/// default receive limit.
pub(crate) const MAX_MESSAGE: usize = 4 << 20;

/// `Content-Type` of unary JSON messages.
const UNARY_JSON: &str = "application/json";
/// `Content-Type` of enveloped JSON streams.
const STREAM_JSON: &str = "application/connect+json";
/// Envelope flag: the payload is compressed.
const FLAG_COMPRESSED: u8 = 0x01;
/// Envelope flag: the end-of-stream message.
const FLAG_END_STREAM: u8 = 0x02;
/// Length of an envelope's prefix (flags and length).
const PREFIX: usize = 5;
/// Most digits `Connect-Timeout-Ms` may have (the protocol's limit).
const MAX_TIMEOUT_DIGITS: usize = 10;

/// A Connect error code (<https://connectrpc.com/docs/protocol#error-codes>). The whole
/// table, though this server produces only some of the codes.
#[allow(dead_code)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Code {
    /// The client cancelled.
    Canceled,
    /// Unknown failure.
    Unknown,
    /// The request is invalid whatever the state.
    InvalidArgument,
    /// The deadline passed.
    DeadlineExceeded,
    /// No such thing.
    NotFound,
    /// It exists already.
    AlreadyExists,
    /// The caller may not do this.
    PermissionDenied,
    /// A limit was reached (also: a message too large).
    ResourceExhausted,
    /// The system is not in the state the operation needs.
    FailedPrecondition,
    /// A concurrency conflict.
    Aborted,
    /// Past the valid range.
    OutOfRange,
    /// Not implemented here.
    Unimplemented,
    /// A bug or a failure of the server.
    Internal,
    /// Not reachable now.
    Unavailable,
    /// Data was lost.
    DataLoss,
    /// No valid credentials.
    Unauthenticated,
}

impl Code {
    /// The code's name on the wire, e.g. `not_found`.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Canceled => "canceled",
            Self::Unknown => "unknown",
            Self::InvalidArgument => "invalid_argument",
            Self::DeadlineExceeded => "deadline_exceeded",
            Self::NotFound => "not_found",
            Self::AlreadyExists => "already_exists",
            Self::PermissionDenied => "permission_denied",
            Self::ResourceExhausted => "resource_exhausted",
            Self::FailedPrecondition => "failed_precondition",
            Self::Aborted => "aborted",
            Self::OutOfRange => "out_of_range",
            Self::Unimplemented => "unimplemented",
            Self::Internal => "internal",
            Self::Unavailable => "unavailable",
            Self::DataLoss => "data_loss",
            Self::Unauthenticated => "unauthenticated",
        }
    }

    /// The HTTP status of a unary error with this code (the protocol's table).
    pub(crate) fn http_status(self) -> StatusCode {
        match self {
            Self::Canceled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            Self::InvalidArgument | Self::FailedPrecondition | Self::OutOfRange => {
                StatusCode::BAD_REQUEST
            }
            Self::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::AlreadyExists | Self::Aborted => StatusCode::CONFLICT,
            Self::PermissionDenied => StatusCode::FORBIDDEN,
            Self::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Self::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Unauthenticated => StatusCode::UNAUTHORIZED,
            Self::Unknown | Self::Internal | Self::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// A failed Connect call: a [`Code`] and a message for the client.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: {message}", code.name())]
pub(crate) struct ConnectError {
    /// What kind of failure.
    pub code: Code,
    /// What happened, for the client.
    pub message: String,
    /// The HTTP status of a unary answer when it is not the code's own (415 for a wrong
    /// content type).
    status: Option<StatusCode>,
}

impl ConnectError {
    /// An error with `code` and `message`.
    pub(crate) fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            status: None,
        }
    }

    /// `invalid_argument`.
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message)
    }

    /// `not_found`.
    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(Code::NotFound, message)
    }

    /// `resource_exhausted` for a message above [`MAX_MESSAGE`].
    fn too_large(what: &str) -> Self {
        Self::new(
            Code::ResourceExhausted,
            format!("{what} is larger than the limit of {MAX_MESSAGE} bytes"),
        )
    }

    /// The JSON object of the error: `{"code","message"}`.
    fn json(&self) -> serde_json::Value {
        serde_json::json!({ "code": self.code.name(), "message": self.message })
    }
}

impl From<ApiError> for ConnectError {
    /// The one mapping of our errors to Connect codes. A sandbox that is gone says "was not
    /// found" as the E2B proxy does (the SDK then raises `SandboxNotRunningException`).
    fn from(e: ApiError) -> Self {
        let code = match &e {
            ApiError::Unauthorized(_) => Code::Unauthenticated,
            ApiError::NotFound(_) => Code::NotFound,
            ApiError::InvalidArgument(_) | ApiError::InvalidNetworkPolicy(_) => {
                Code::InvalidArgument
            }
            ApiError::OpenNetworkDisabled => Code::PermissionDenied,
            ApiError::TooLarge { .. } | ApiError::TooManyRequests { .. } => Code::ResourceExhausted,
            ApiError::NotRunning(id) => {
                return Self::new(
                    Code::Unavailable,
                    format!("sandbox {id} was not found: it is not running"),
                )
            }
            ApiError::Paused(_) => Code::FailedPrecondition,
            ApiError::BadGateway(_) => Code::Unavailable,
            ApiError::Agent(agent) => agent_code(agent.code),
            ApiError::Internal { context, source } if connection_lost(source.as_ref()) => {
                // The agent died or the sandbox was killed mid-call. `unavailable` (not
                // saying "not found") makes the SDK probe the sandbox's health and raise
                // `SandboxNotRunningException` when it is gone.
                tracing::debug!(error = %source, "{context}");
                return Self::new(
                    Code::Unavailable,
                    format!("{context}: the connection to the sandbox's agent was lost"),
                );
            }
            // Not `resource_exhausted`: the SDK reads that as a rate limit to retry. The
            // message says the disk is full.
            ApiError::NoSpace { context, source } => {
                tracing::error!(error = %source, "{context}");
                Code::Internal
            }
            ApiError::Internal { context, source } => {
                tracing::error!(error = %source, "{context}");
                Code::Internal
            }
        };
        let message = match &e {
            // The agent's own failure text may name host details: keep it in the log.
            ApiError::Agent(agent) if code == Code::Internal => {
                tracing::error!(error = %agent.message, "the sandbox agent failed");
                "the sandbox agent failed".to_string()
            }
            _ => e.to_string(),
        };
        if code != Code::Internal {
            tracing::debug!(code = code.name(), "{message}");
        }
        Self::new(code, message)
    }
}

/// Whether an agent call failed because its connection could not be made or broke (the
/// agent or its sandbox went away), not because the agent answered.
fn connection_lost(source: &(dyn std::error::Error + Send + Sync + 'static)) -> bool {
    use openrun_protocol::frame::FrameError;
    use openrun_runtime::ClientError;
    match source.downcast_ref::<ClientError>() {
        Some(ClientError::Connect { .. }) => true,
        Some(ClientError::Frame(FrameError::Io(_) | FrameError::Closed)) => true,
        Some(_) => false,
        None => source
            .downcast_ref::<FrameError>()
            .is_some_and(|e| matches!(e, FrameError::Io(_) | FrameError::Closed)),
    }
}

/// The Connect code of an agent refusal.
fn agent_code(code: ErrorCode) -> Code {
    use ErrorCode as E;
    match code {
        E::NotFound | E::CommandNotFound | E::NoSuchProcess => Code::NotFound,
        E::PermissionDenied | E::OutsideSandbox => Code::PermissionDenied,
        E::AlreadyExists => Code::AlreadyExists,
        E::DirectoryNotEmpty | E::StillRunning | E::NotSupported => Code::FailedPrecondition,
        E::NotADirectory | E::IsADirectory | E::InvalidArgument => Code::InvalidArgument,
        E::TooLarge => Code::ResourceExhausted,
        E::ConnectionRefused => Code::Unavailable,
        E::VersionMismatch | E::Internal => Code::Internal,
    }
}

impl IntoResponse for ConnectError {
    /// The unary error answer.
    fn into_response(self) -> Response {
        let status = self.status.unwrap_or_else(|| self.code.http_status());
        (
            status,
            [(header::CONTENT_TYPE, UNARY_JSON)],
            self.json().to_string(),
        )
            .into_response()
    }
}

/// The error of a streaming call: answered as a stream holding only the end-of-stream
/// envelope with the error (HTTP 200, as the protocol wants for streams).
#[derive(Debug)]
pub(crate) struct StreamError(pub ConnectError);

impl From<ConnectError> for StreamError {
    fn from(e: ConnectError) -> Self {
        Self(e)
    }
}

impl From<ApiError> for StreamError {
    fn from(e: ApiError) -> Self {
        Self(e.into())
    }
}

impl IntoResponse for StreamError {
    fn into_response(self) -> Response {
        stream_response(Body::from(end_stream(Some(&self.0))))
    }
}

/// What the request's headers ask of the call.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Meta {
    /// `Connect-Timeout-Ms`; `None` when absent or 0 (no limit).
    pub timeout: Option<Duration>,
    /// `Keepalive-Ping-Interval` (seconds): envd sends a keepalive message after this long
    /// without one. `None` when absent, 0 or not a number.
    pub keepalive: Option<Duration>,
}

impl Meta {
    /// Reads the headers; a malformed `Connect-Timeout-Ms` is `invalid_argument`.
    pub(crate) fn from_headers(headers: &HeaderMap) -> Result<Self, ConnectError> {
        let timeout = match headers.get("connect-timeout-ms") {
            None => None,
            Some(value) => {
                let text = value.to_str().unwrap_or("");
                if text.is_empty()
                    || text.len() > MAX_TIMEOUT_DIGITS
                    || !text.bytes().all(|b| b.is_ascii_digit())
                {
                    return Err(ConnectError::invalid(format!(
                        "invalid Connect-Timeout-Ms {:?}: expected 1 to {MAX_TIMEOUT_DIGITS} digits",
                        String::from_utf8_lossy(value.as_bytes())
                    )));
                }
                text.parse::<u64>()
                    .ok()
                    .filter(|ms| *ms > 0)
                    .map(Duration::from_millis)
            }
        };
        let keepalive = headers
            .get("keepalive-ping-interval")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|s| *s > 0)
            .map(Duration::from_secs);
        Ok(Self { timeout, keepalive })
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Meta {
    type Rejection = ConnectError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ConnectError> {
        Self::from_headers(&parts.headers)
    }
}

/// The media type of a request (`Content-Type` without parameters, lower case).
fn media_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// Refuses a request whose `Content-Type` is not `expected`, whose `Connect-Protocol-Version`
/// (optional) is not 1, or that declares compression in `encoding_header`.
fn check_headers(
    headers: &HeaderMap,
    expected: &str,
    encoding_header: &str,
) -> Result<(), ConnectError> {
    let media = media_type(headers);
    if media != expected {
        let mut e = ConnectError::invalid(format!(
            "unsupported content type {media:?}: this server speaks the Connect protocol with the JSON codec ({expected})"
        ));
        e.status = Some(StatusCode::UNSUPPORTED_MEDIA_TYPE);
        return Err(e);
    }
    if let Some(version) = headers.get("connect-protocol-version") {
        if version.as_bytes() != b"1" {
            return Err(ConnectError::invalid(format!(
                "Connect-Protocol-Version must be 1, not {:?}",
                String::from_utf8_lossy(version.as_bytes())
            )));
        }
    }
    if let Some(encoding) = headers.get(encoding_header) {
        let encoding = encoding.to_str().unwrap_or("?").trim();
        if !encoding.is_empty() && !encoding.eq_ignore_ascii_case("identity") {
            return Err(ConnectError::invalid(format!(
                "compression is not supported: {encoding_header} {encoding:?}"
            )));
        }
    }
    Ok(())
}

/// Decodes one JSON message; an empty (or blank) payload is `{}`.
fn decode<T: DeserializeOwned>(data: &[u8]) -> Result<T, ConnectError> {
    let data: &[u8] = if data.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        data
    };
    serde_json::from_slice(data).map_err(|e| {
        ConnectError::invalid(format!("the request message is not valid JSON for it: {e}"))
    })
}

/// Reads a whole body of at most `limit` bytes (`resource_exhausted` above).
async fn read_body(body: Body, limit: usize, what: &str) -> Result<Bytes, ConnectError> {
    match axum::body::to_bytes(body, limit).await {
        Ok(bytes) => Ok(bytes),
        Err(e) => {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
                || e.to_string().contains("length limit");
            if too_large {
                Err(ConnectError::too_large(what))
            } else {
                Err(ConnectError::invalid(format!(
                    "cannot read the request body: {e}"
                )))
            }
        }
    }
}

/// A unary request message (`application/json`), decoded.
#[derive(Debug)]
pub(crate) struct Unary<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Unary<T> {
    type Rejection = ConnectError;

    async fn from_request(req: Request, _: &S) -> Result<Self, ConnectError> {
        check_headers(req.headers(), UNARY_JSON, "content-encoding")?;
        Meta::from_headers(req.headers())?;
        let body = read_body(req.into_body(), MAX_MESSAGE, "the request message").await?;
        decode(&body).map(Unary)
    }
}

/// Middleware for a module's routes: a unary call (`application/json`) with
/// `Connect-Timeout-Ms` gets `deadline_exceeded` once that passes (the work in progress is
/// dropped, as envd cancels its context). Streaming calls bound themselves (their answer is
/// already under way when a deadline passes). A malformed header is left to the extractors.
pub(crate) async fn unary_deadline(req: Request, next: axum::middleware::Next) -> Response {
    let unary = media_type(req.headers()) == UNARY_JSON;
    let timeout = Meta::from_headers(req.headers())
        .ok()
        .and_then(|meta| meta.timeout);
    match timeout {
        Some(limit) if unary => match tokio::time::timeout(limit, next.run(req)).await {
            Ok(response) => response,
            Err(_) => ConnectError::new(
                Code::DeadlineExceeded,
                "the call's deadline (Connect-Timeout-Ms) passed",
            )
            .into_response(),
        },
        _ => next.run(req).await,
    }
}

/// A unary answer: 200 `application/json` of the message.
#[derive(Debug)]
pub(crate) struct Reply<T>(pub T);

impl<T: Serialize> IntoResponse for Reply<T> {
    fn into_response(self) -> Response {
        match serde_json::to_vec(&self.0) {
            Ok(body) => ([(header::CONTENT_TYPE, UNARY_JSON)], body).into_response(),
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a Connect answer");
                ConnectError::new(Code::Internal, "cannot encode the answer").into_response()
            }
        }
    }
}

/// One envelope of a buffer: its flags and payload, and how many bytes it took.
#[derive(Debug, PartialEq, Eq)]
struct Envelope<'a> {
    flags: u8,
    payload: &'a [u8],
    used: usize,
}

/// Parses the envelope at the start of `buf`: `Ok(None)` when more bytes are needed. A
/// length above [`MAX_MESSAGE`] is refused as soon as the prefix is there.
fn parse_envelope(buf: &[u8]) -> Result<Option<Envelope<'_>>, ConnectError> {
    let Some(prefix) = buf.get(..PREFIX) else {
        return Ok(None);
    };
    let flags = prefix[0];
    let length = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    if length > MAX_MESSAGE {
        return Err(ConnectError::too_large(&format!(
            "an enveloped message of {length} bytes"
        )));
    }
    if flags & FLAG_COMPRESSED != 0 {
        return Err(ConnectError::invalid(
            "protocol error: a compressed message, but compression is not supported (no Connect-Content-Encoding was agreed)",
        ));
    }
    if flags & FLAG_END_STREAM != 0 {
        return Err(ConnectError::invalid(
            "protocol error: an end-of-stream envelope in a request",
        ));
    }
    if flags != 0 {
        return Err(ConnectError::invalid(format!(
            "protocol error: unknown envelope flags {flags:#04x}"
        )));
    }
    let Some(payload) = buf.get(PREFIX..PREFIX + length) else {
        return Ok(None);
    };
    Ok(Some(Envelope {
        flags,
        payload,
        used: PREFIX + length,
    }))
}

/// Decodes a server-streaming request body: exactly one enveloped message.
fn decode_single<T: DeserializeOwned>(body: &[u8]) -> Result<T, ConnectError> {
    let envelope = match parse_envelope(body)? {
        Some(envelope) => envelope,
        None if body.is_empty() => {
            return Err(ConnectError::invalid(
                "protocol error: the request holds no message (expected one enveloped message)",
            ))
        }
        None if body.len() < PREFIX => {
            return Err(ConnectError::invalid(format!(
                "protocol error: the request ends inside an envelope prefix ({} of {PREFIX} bytes)",
                body.len()
            )))
        }
        None => {
            return Err(ConnectError::invalid(format!(
                "protocol error: the envelope declares {} bytes but the request has only {}",
                u32::from_be_bytes([body[1], body[2], body[3], body[4]]),
                body.len() - PREFIX
            )))
        }
    };
    if envelope.used != body.len() {
        return Err(ConnectError::invalid(
            "protocol error: more than one message for a server-streaming method",
        ));
    }
    decode(envelope.payload)
}

/// The request of a server-streaming call: its one message and its [`Meta`].
#[derive(Debug)]
pub(crate) struct Streaming<T> {
    /// The decoded request message.
    pub message: T,
    /// Timeout and keepalive interval.
    pub meta: Meta,
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Streaming<T> {
    type Rejection = StreamError;

    async fn from_request(req: Request, _: &S) -> Result<Self, StreamError> {
        check_headers(req.headers(), STREAM_JSON, "connect-content-encoding")?;
        let meta = Meta::from_headers(req.headers())?;
        // One envelope: its prefix and at most MAX_MESSAGE bytes; one byte more tells a
        // trailing message from the end.
        let body = read_body(req.into_body(), MAX_MESSAGE + PREFIX + 1, "the request").await?;
        Ok(Self {
            message: decode_single(&body)?,
            meta,
        })
    }
}

/// The requests of a client-streaming call, decoded as they arrive.
pub(crate) struct ClientStream<T> {
    body: Body,
    /// Bytes received; those before `pos` are decoded already.
    buf: Vec<u8>,
    /// Where the next envelope starts in `buf` (a cursor: many small messages in one
    /// chunk are not each moved to the front).
    pos: usize,
    done: bool,
    /// Timeout and keepalive interval.
    pub meta: Meta,
    _message: std::marker::PhantomData<fn() -> T>,
}

impl<T: DeserializeOwned> ClientStream<T> {
    /// The next message if a whole one has arrived already (never waits for the body).
    pub(crate) fn next_ready(&mut self) -> Option<Result<T, ConnectError>> {
        if self.done {
            return None;
        }
        match parse_envelope(&self.buf[self.pos..]) {
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
            Ok(Some(envelope)) => {
                let message = decode(envelope.payload);
                self.pos += envelope.used;
                if message.is_err() {
                    self.done = true;
                }
                Some(message)
            }
            Ok(None) => None,
        }
    }

    /// The next message; `None` at the end of the body. After an error, `None`.
    pub(crate) async fn next(&mut self) -> Option<Result<T, ConnectError>> {
        loop {
            if self.done {
                return None;
            }
            if let Some(message) = self.next_ready() {
                return Some(message);
            }
            if self.done {
                return None;
            }
            // Only an incomplete envelope is left: move it to the front before reading more.
            if self.pos > 0 {
                self.buf.drain(..self.pos);
                self.pos = 0;
            }
            match self.body.frame().await {
                None => {
                    self.done = true;
                    if self.buf.is_empty() {
                        return None;
                    }
                    return Some(Err(ConnectError::invalid(
                        "protocol error: the request ends inside an envelope",
                    )));
                }
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(ConnectError::invalid(format!(
                        "cannot read the request body: {e}"
                    ))));
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

impl<T, S: Send + Sync> FromRequest<S> for ClientStream<T> {
    type Rejection = StreamError;

    async fn from_request(req: Request, _: &S) -> Result<Self, StreamError> {
        check_headers(req.headers(), STREAM_JSON, "connect-content-encoding")?;
        let meta = Meta::from_headers(req.headers())?;
        Ok(Self {
            body: req.into_body(),
            buf: Vec::new(),
            pos: 0,
            done: false,
            meta,
            _message: std::marker::PhantomData,
        })
    }
}

/// One envelope of `flags` around `payload`.
fn envelope(flags: u8, payload: &[u8]) -> Bytes {
    let length = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(PREFIX + payload.len());
    out.push(flags);
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(payload);
    Bytes::from(out)
}

/// The envelope of one message; `None` (logged) if it cannot be encoded.
fn message_envelope<T: Serialize>(message: &T) -> Option<Bytes> {
    match serde_json::to_vec(message) {
        Ok(json) => Some(envelope(0, &json)),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode a Connect stream message");
            None
        }
    }
}

/// The end-of-stream envelope: `{}`, or `{"error":{…}}`.
fn end_stream(error: Option<&ConnectError>) -> Bytes {
    let body = match error {
        None => serde_json::json!({}),
        Some(e) => serde_json::json!({ "error": e.json() }),
    };
    envelope(FLAG_END_STREAM, body.to_string().as_bytes())
}

/// A 200 `application/connect+json` answer with `body`.
fn stream_response(body: Body) -> Response {
    ([(header::CONTENT_TYPE, STREAM_JSON)], body).into_response()
}

/// How a server stream behaves besides relaying its messages.
#[derive(Debug, Clone)]
pub(crate) struct StreamOptions<T> {
    /// Send this message after this long without any message.
    pub keepalive: Option<(Duration, T)>,
    /// End the stream with `deadline_exceeded` after this long (from now).
    pub deadline: Option<Duration>,
}

impl<T> Default for StreamOptions<T> {
    fn default() -> Self {
        Self {
            keepalive: None,
            deadline: None,
        }
    }
}

/// What the stream does next.
enum Step<T> {
    Message(T),
    Fail(ConnectError),
    End,
    Keepalive,
}

/// State of a server stream's body.
struct StreamState<T> {
    rx: mpsc::Receiver<Result<T, ConnectError>>,
    options: StreamOptions<T>,
    deadline: Option<tokio::time::Instant>,
    finished: bool,
}

impl<T: Serialize> StreamState<T> {
    /// Waits for the next thing to send.
    async fn step(&mut self) -> Step<T> {
        let keepalive = self.options.keepalive.as_ref().map(|(every, _)| *every);
        let idle = async {
            match keepalive {
                Some(every) => tokio::time::sleep(every).await,
                None => std::future::pending().await,
            }
        };
        let deadline = async {
            match self.deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            item = self.rx.recv() => match item {
                Some(Ok(message)) => Step::Message(message),
                Some(Err(e)) => Step::Fail(e),
                None => Step::End,
            },
            () = idle => Step::Keepalive,
            () = deadline => Step::Fail(ConnectError::new(
                Code::DeadlineExceeded,
                "the call's deadline (Connect-Timeout-Ms) passed",
            )),
        }
    }

    /// The next chunk of the body; `None` after the end-of-stream envelope.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        loop {
            if self.finished {
                return None;
            }
            match self.step().await {
                Step::Message(message) => {
                    if let Some(bytes) = message_envelope(&message) {
                        return Some(bytes);
                    }
                }
                Step::Keepalive => {
                    if let Some((_, message)) = &self.options.keepalive {
                        if let Some(bytes) = message_envelope(message) {
                            return Some(bytes);
                        }
                    }
                }
                Step::Fail(e) => {
                    self.finished = true;
                    return Some(end_stream(Some(&e)));
                }
                Step::End => {
                    self.finished = true;
                    return Some(end_stream(None));
                }
            }
        }
    }
}

/// A server-streaming answer of the messages from `rx` (see the module doc).
pub(crate) fn server_stream<T: Serialize + Send + 'static>(
    rx: mpsc::Receiver<Result<T, ConnectError>>,
    options: StreamOptions<T>,
) -> Response {
    let deadline = options
        .deadline
        .map(|after| tokio::time::Instant::now() + after);
    let state = StreamState {
        rx,
        options,
        deadline,
        finished: false,
    };
    let body = futures_util::stream::unfold(state, |mut state| async move {
        let chunk = state.next_chunk().await?;
        Some((Ok::<_, std::convert::Infallible>(chunk), state))
    });
    stream_response(Body::from_stream(body))
}

/// The streamed answer of a client-streaming call: `message`, then the end of the stream.
pub(crate) fn stream_reply<T: Serialize>(message: &T) -> Response {
    let mut body = Vec::new();
    if let Some(bytes) = message_envelope(message) {
        body.extend_from_slice(&bytes);
    }
    body.extend_from_slice(&end_stream(None));
    stream_response(Body::from(body))
}

/// proto3 JSON helpers for serde (`#[serde(with = "pj::int64")]` and so on): both
/// directions of each type, though a message may need only one.
#[allow(dead_code)]
pub(crate) mod pj {
    use std::fmt;

    use base64::Engine;
    use serde::de::{self, Deserializer, Visitor};
    use serde::Serializer;

    /// A whole number given as a JSON number or a decimal string.
    fn number<'de, D: Deserializer<'de>>(d: D) -> Result<i128, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = i128;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a whole number (or its decimal string)")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<i128, E> {
                Ok(v.into())
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<i128, E> {
                Ok(v.into())
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<i128, E> {
                if v.fract() == 0.0 && v.abs() < 1e30 {
                    Ok(v as i128)
                } else {
                    Err(E::custom(format!("{v} is not a whole number")))
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<i128, E> {
                v.trim()
                    .parse::<i128>()
                    .map_err(|_| E::custom(format!("{v:?} is not a whole number")))
            }
            fn visit_unit<E: de::Error>(self) -> Result<i128, E> {
                Ok(0)
            }
        }
        d.deserialize_any(V)
    }

    /// `int64`: written as a decimal string, read from a string or a number.
    pub(crate) mod int64 {
        use super::*;

        /// Writes the decimal string.
        pub(crate) fn serialize<S: Serializer>(v: &i64, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(&v.to_string())
        }

        /// Reads a string or a number.
        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
            let n = number(d)?;
            i64::try_from(n).map_err(|_| de::Error::custom(format!("{n} is out of int64 range")))
        }
    }

    /// `uint32`: written as a number, read from a number or a decimal string.
    pub(crate) mod uint32 {
        use super::*;

        /// Writes the number.
        pub(crate) fn serialize<S: Serializer>(v: &u32, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_u32(*v)
        }

        /// Reads a number or a string.
        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
            let n = number(d)?;
            u32::try_from(n).map_err(|_| de::Error::custom(format!("{n} is out of uint32 range")))
        }
    }

    /// `bytes`: standard base64 (URL-safe and unpadded accepted when read).
    pub(crate) mod bytes {
        use super::*;

        /// Writes standard base64.
        pub(crate) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
        }

        /// Reads base64 (either alphabet, padded or not); `null` is empty.
        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
            let text: Option<String> = serde::Deserialize::deserialize(d)?;
            let text = text.unwrap_or_default();
            let trimmed = text.trim_end_matches('=');
            let engine = if trimmed.contains(['-', '_']) {
                &base64::engine::general_purpose::URL_SAFE_NO_PAD
            } else {
                &base64::engine::general_purpose::STANDARD_NO_PAD
            };
            engine
                .decode(trimmed)
                .map_err(|e| de::Error::custom(format!("invalid base64: {e}")))
        }
    }

    /// `optional uint32` (for `Option` fields with `#[serde(default)]`).
    pub(crate) mod opt_uint32 {
        use super::*;

        /// Writes the number.
        pub(crate) fn serialize<S: Serializer>(v: &Option<u32>, s: S) -> Result<S::Ok, S::Error> {
            match v {
                Some(v) => s.serialize_u32(*v),
                None => s.serialize_none(),
            }
        }

        /// Reads a number or a string.
        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<u32>, D::Error> {
            super::uint32::deserialize(d).map(Some)
        }
    }

    /// `bytes` of a oneof member (for `Option` fields with `#[serde(default)]`).
    pub(crate) mod opt_bytes {
        use super::*;

        /// Writes standard base64.
        pub(crate) fn serialize<S: Serializer>(
            v: &Option<Vec<u8>>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match v {
                Some(v) => super::bytes::serialize(v, s),
                None => s.serialize_none(),
            }
        }

        /// Reads base64.
        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<Vec<u8>>, D::Error> {
            super::bytes::deserialize(d).map(Some)
        }
    }

    /// Reads an enum given by name or number: `names` pairs each name with its number.
    pub(crate) fn enum_value<'de, D: Deserializer<'de>>(
        d: D,
        names: &'static [(&'static str, i32)],
    ) -> Result<i32, D::Error> {
        struct V(&'static [(&'static str, i32)]);
        impl Visitor<'_> for V {
            type Value = i32;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an enum name or number")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<i32, E> {
                i32::try_from(v).map_err(|_| E::custom(format!("enum number {v} out of range")))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<i32, E> {
                i32::try_from(v).map_err(|_| E::custom(format!("enum number {v} out of range")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<i32, E> {
                self.0
                    .iter()
                    .find(|(name, _)| *name == v)
                    .map(|(_, n)| *n)
                    .ok_or_else(|| E::custom(format!("unknown enum value {v:?}")))
            }
            fn visit_unit<E: de::Error>(self) -> Result<i32, E> {
                Ok(0)
            }
        }
        d.deserialize_any(V(names))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn env(flags: u8, payload: &[u8]) -> Vec<u8> {
        envelope(flags, payload).to_vec()
    }

    #[test]
    fn one_envelope_decodes() {
        let body = env(0, br#"{"a":1}"#);
        let v: serde_json::Value = decode_single(&body).unwrap();
        assert_eq!(v["a"], 1);
    }

    #[test]
    fn malformed_envelopes_are_invalid_or_exhausted() {
        let cases: Vec<(Vec<u8>, Code)> = vec![
            (Vec::new(), Code::InvalidArgument),
            (vec![0, 0], Code::InvalidArgument),
            (env(FLAG_COMPRESSED, b"{}"), Code::InvalidArgument),
            (env(FLAG_END_STREAM, b"{}"), Code::InvalidArgument),
            (env(0x80, b"{}"), Code::InvalidArgument),
            (env(0, b"not json"), Code::InvalidArgument),
            (
                [env(0, b"{}"), env(0, b"{}")].concat(),
                Code::InvalidArgument,
            ),
            (
                [&[0u8, 0, 0, 0, 9][..], b"{}"].concat(),
                Code::InvalidArgument,
            ),
            (vec![0, 0xff, 0xff, 0xff, 0xff], Code::ResourceExhausted),
        ];
        for (body, code) in cases {
            let err = decode_single::<serde_json::Value>(&body).unwrap_err();
            assert_eq!(err.code, code, "{body:?}: {err}");
        }
    }

    #[test]
    fn end_stream_holds_the_error() {
        let e = ConnectError::not_found("no such process: 7");
        let bytes = end_stream(Some(&e));
        assert_eq!(bytes[0], FLAG_END_STREAM);
        let v: serde_json::Value = serde_json::from_slice(&bytes[PREFIX..]).unwrap();
        assert_eq!(v["error"]["code"], "not_found");
        assert_eq!(&end_stream(None)[PREFIX..], b"{}");
    }

    #[test]
    fn timeout_header_is_checked() {
        let mut headers = HeaderMap::new();
        headers.insert("connect-timeout-ms", HeaderValue::from_static("1500"));
        headers.insert("keepalive-ping-interval", HeaderValue::from_static("50"));
        let meta = Meta::from_headers(&headers).unwrap();
        assert_eq!(meta.timeout, Some(Duration::from_millis(1500)));
        assert_eq!(meta.keepalive, Some(Duration::from_secs(50)));
        headers.insert("connect-timeout-ms", HeaderValue::from_static("0"));
        assert_eq!(Meta::from_headers(&headers).unwrap().timeout, None);
        for bad in ["-1", "abc", "12345678901", ""] {
            headers.insert("connect-timeout-ms", HeaderValue::from_static(bad));
            let err = Meta::from_headers(&headers).unwrap_err();
            assert_eq!(err.code, Code::InvalidArgument, "{bad}");
        }
    }

    #[derive(serde::Deserialize, serde::Serialize)]
    struct Sample {
        #[serde(with = "pj::int64", default)]
        size: i64,
        #[serde(with = "pj::uint32", default)]
        pid: u32,
        #[serde(with = "pj::bytes", default)]
        data: Vec<u8>,
    }

    #[test]
    fn proto_json_numbers_and_bytes() {
        let s: Sample = serde_json::from_str(r#"{"size":"12","pid":"7","data":"aGk="}"#).unwrap();
        assert_eq!((s.size, s.pid, s.data.as_slice()), (12, 7, &b"hi"[..]));
        let s: Sample = serde_json::from_str(r#"{"size":12,"pid":7,"data":"aGk"}"#).unwrap();
        assert_eq!((s.size, s.pid, s.data.as_slice()), (12, 7, &b"hi"[..]));
        let out = serde_json::to_value(&s).unwrap();
        assert_eq!(out, serde_json::json!({"size":"12","pid":7,"data":"aGk="}));
        assert!(serde_json::from_str::<Sample>(r#"{"pid":-1}"#).is_err());
    }

    #[tokio::test]
    async fn server_stream_sends_keepalives_and_the_end() {
        let (tx, rx) = mpsc::channel::<Result<serde_json::Value, ConnectError>>(4);
        let options = StreamOptions {
            keepalive: Some((
                Duration::from_millis(20),
                serde_json::json!({"keepalive":{}}),
            )),
            deadline: None,
        };
        let response = server_stream(rx, options);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(70)).await;
            let _ = tx.send(Ok(serde_json::json!({"n":1}))).await;
        });
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        let mut rest = &body[..];
        let mut messages = Vec::new();
        while !rest.is_empty() {
            let length = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
            let v: serde_json::Value = serde_json::from_slice(&rest[5..5 + length]).unwrap();
            messages.push((rest[0], v));
            rest = &rest[5 + length..];
        }
        assert!(messages.len() >= 3, "{messages:?}");
        // Timing decides how many keepalives come and where: one at least, before the end.
        assert!(
            messages.contains(&(0, serde_json::json!({"keepalive":{}}))),
            "{messages:?}"
        );
        let n = messages.len();
        assert_eq!(messages[n - 2].1, serde_json::json!({"n":1}));
        assert_eq!(messages[n - 1], (FLAG_END_STREAM, serde_json::json!({})));
    }

    #[test]
    fn a_lost_agent_connection_is_unavailable() {
        use openrun_protocol::frame::FrameError;
        use openrun_runtime::ClientError;
        let lost = [
            ClientError::Frame(FrameError::Closed),
            ClientError::Frame(FrameError::Io(std::io::ErrorKind::BrokenPipe.into())),
            ClientError::Connect {
                path: "/x/agent.sock".into(),
                source: std::io::ErrorKind::ConnectionRefused.into(),
            },
        ];
        for e in lost {
            let e = ConnectError::from(ApiError::from_client("the sandbox agent failed", e));
            assert_eq!(e.code, Code::Unavailable, "{e}");
            // Not the proxy's "not found" wording: the SDK checks the sandbox's health.
            assert!(!e.message.contains("not found"), "{e}");
            assert!(!e.message.contains("/x/agent.sock"), "{e}");
        }
        let confused = ClientError::Unexpected("what".into());
        let e = ConnectError::from(ApiError::from_client("the sandbox agent failed", confused));
        assert_eq!(e.code, Code::Internal);
    }

    #[tokio::test]
    async fn many_small_client_messages_decode_in_order() {
        let count = 60_000;
        let mut body = Vec::new();
        for i in 0..count {
            body.extend_from_slice(&env(0, format!("{{\"n\":{i}}}").as_bytes()));
        }
        // Split mid-envelope too.
        let (a, b) = body.split_at(body.len() / 2 + 3);
        let chunks: Vec<Result<Bytes, std::convert::Infallible>> =
            vec![Ok(Bytes::copy_from_slice(a)), Ok(Bytes::copy_from_slice(b))];
        let mut stream = ClientStream::<serde_json::Value> {
            body: Body::from_stream(futures_util::stream::iter(chunks)),
            buf: Vec::new(),
            pos: 0,
            done: false,
            meta: Meta::default(),
            _message: std::marker::PhantomData,
        };
        let started = std::time::Instant::now();
        let mut n = 0;
        while let Some(message) = stream.next().await {
            assert_eq!(message.unwrap()["n"], n);
            n += 1;
        }
        assert_eq!(n, count);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn unary_calls_end_at_their_deadline() {
        use tower::ServiceExt;
        async fn slow() -> &'static str {
            tokio::time::sleep(Duration::from_secs(30)).await;
            "late"
        }
        let app = axum::Router::new()
            .route("/x", axum::routing::post(slow))
            .route_layer(axum::middleware::from_fn(unary_deadline));
        let request = |content_type: &str| {
            axum::http::Request::post("/x")
                .header(header::CONTENT_TYPE, content_type)
                .header("connect-timeout-ms", "50")
                .body(Body::from("{}"))
                .unwrap()
        };
        let started = std::time::Instant::now();
        let response = app.clone().oneshot(request(UNARY_JSON)).await.unwrap();
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
        assert!(started.elapsed() < Duration::from_secs(5));
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["code"], "deadline_exceeded");
        // Streams bound themselves: the middleware leaves them alone.
        let stream = tokio::time::timeout(
            Duration::from_millis(300),
            app.oneshot(request(STREAM_JSON)),
        )
        .await;
        assert!(stream.is_err(), "a stream is not cut by the unary deadline");
    }

    #[tokio::test]
    async fn server_stream_deadline_ends_with_deadline_exceeded() {
        let (_tx, rx) = mpsc::channel::<Result<serde_json::Value, ConnectError>>(4);
        let options = StreamOptions {
            keepalive: None,
            deadline: Some(Duration::from_millis(20)),
        };
        let body = axum::body::to_bytes(server_stream(rx, options).into_body(), 1 << 20)
            .await
            .unwrap();
        assert_eq!(body[0], FLAG_END_STREAM);
        let v: serde_json::Value = serde_json::from_slice(&body[PREFIX..]).unwrap();
        assert_eq!(v["error"]["code"], "deadline_exceeded");
    }
}
