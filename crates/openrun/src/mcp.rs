//! `openrun mcp`: MCP over stdio for local agents (Claude Desktop / Claude Code:
//! `{"command": "openrun", "args": ["mcp"]}`), bridged to a server's `/mcp` (Streamable HTTP),
//! so the tools have one implementation, the server's.
//!
//! Which server ([`local_server::choose`], shared with `openrun up`):
//! 1. the configured one (`--server`/`OPENRUN_SERVER`, else the config file's), with its key;
//!    if it does not answer, `openrun mcp` fails (it never starts a server in its place);
//! 2. else the local server of `<data-dir>/local.json` (written by `openrun serve` on loopback),
//!    if it answers and gets the key: [`Target::resolve`] sends that key only to a listener
//!    owned by the file's owner (a stale port taken by another user's program gets none);
//! 3. else it starts one: a child `openrun serve --listen 127.0.0.1:0` on the data dir, using
//!    the key that server writes to `local.json`. Steps 2 and 3 hold a lock on the data dir,
//!    so concurrent `openrun mcp` start one server; each holds a shared "users" lock while it
//!    uses it, and the last one to end stops the started server (SIGTERM, then SIGKILL).
//!    Sandboxes it made outlive it like any server's; the next start finds them again.
//!    `--no-start` fails instead, with a message saying how to name a server.
//!
//! The bridge: each JSON-RPC message read from stdin (one per line) is POSTed to `/mcp` with
//! the bearer key, `Mcp-Session-Id` and `MCP-Protocol-Version`; the answer, JSON or an SSE
//! stream, goes to stdout one message per line. Requests run concurrently (a long
//! `run_command` does not hold up a `ping`); `initialize` is awaited before anything else is
//! read, and `notifications/initialized` is sent before the requests after it; when stdin
//! closes, answers to requests in flight are awaited (up to [`DRAIN_TIMEOUT`]). SSE answers
//! are relayed event by event. When the server forgot the session (it restarted), the bridge initializes a new one
//! with the client's original `initialize` and sends the message again. A request the server
//! cannot be asked (down, 401, 5xx) is answered with a JSON-RPC error naming the problem.
//! stdout carries only JSON-RPC; logs and the child server's output go to stderr.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use reqwest::{StatusCode, Url};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::cli::McpArgs;
use crate::local_server::{self, Starting};
use crate::remote::Target;

/// How long answers to requests already sent are waited for after stdin closed.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest line read from stdin (a `write_file` carries its file).
const MAX_LINE: usize = 32 << 20;
/// JSON-RPC error code of a server that cannot be asked (in the implementation-defined range).
const SERVER_UNAVAILABLE: i64 = -32000;

/// Runs the bridge until stdin closes; returns the exit code.
pub fn run(
    data_dir: &Path,
    server: Option<String>,
    api_key: Option<String>,
    args: McpArgs,
) -> Result<i32> {
    let rt = crate::session::tokio_runtime()?;
    let starting = if args.no_start {
        Starting::Never
    } else {
        Starting::Child
    };
    let (target, local) =
        match rt.block_on(local_server::choose(data_dir, server, api_key, starting)) {
            Ok(chosen) => chosen,
            Err(e) => {
                rt.shutdown_background();
                return Err(e);
            }
        };
    let result = rt.block_on(bridge(target));
    local.finish(data_dir);
    // A stdin read may still be parked on its blocking thread: do not wait for it.
    rt.shutdown_background();
    result.map(|()| 0)
}

/// What every request to `/mcp` carries once `initialize` answered.
#[derive(Debug, Default)]
struct Session {
    /// `Mcp-Session-Id` the server gave.
    id: Option<String>,
    /// The protocol version it chose.
    protocol_version: Option<String>,
    /// The client's `initialize` params, to open a new session if the server forgets this one.
    initialize: Option<Value>,
}

/// The HTTP side of the bridge.
struct Upstream {
    http: reqwest::Client,
    endpoint: Url,
    /// `Bearer <key>`, checked once at the start, marked sensitive.
    auth: HeaderValue,
    session: Mutex<Session>,
    /// Taken while a forgotten session is reopened.
    reopening: tokio::sync::Mutex<()>,
    out: mpsc::UnboundedSender<Value>,
}

/// Copies stdin to the server and the answers to stdout until stdin closes (or SIGTERM/SIGINT).
async fn bridge(target: Target) -> Result<()> {
    let auth = authorization(target.api_key.as_deref())?;
    let endpoint = target.url.join("mcp")?;
    // The CLI's client settings: no proxy of the environment, no redirects (the key).
    let http = Target::client_builder()
        .build()
        .context("cannot make an HTTP client")?;
    let (out, mut out_rx) = mpsc::unbounded_channel::<Value>();
    let writer = tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
        while let Some(message) = out_rx.recv().await {
            let mut line = message.to_string();
            line.push('\n');
            if stdout.write_all(line.as_bytes()).await.is_err() || stdout.flush().await.is_err() {
                break;
            }
        }
    });
    let upstream = Arc::new(Upstream {
        http,
        endpoint,
        auth,
        session: Mutex::new(Session::default()),
        reopening: tokio::sync::Mutex::new(()),
        out,
    });
    tracing::info!(endpoint = %upstream.endpoint, "bridging stdio to MCP over HTTP");
    let mut signals = Signals::install()?;
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin());
    let mut line = Vec::new();
    let mut in_flight = tokio::task::JoinSet::new();
    let mut stopped = false;
    loop {
        // Forget the requests that finished.
        while in_flight.try_join_next().is_some() {}
        line.clear();
        let read = tokio::select! {
            read = read_line(&mut stdin, &mut line) => read,
            () = signals.recv() => {
                stopped = true;
                break;
            }
        };
        match read {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                // Too long: skip the rest of that line and go on with the next.
                if let Err(e) = skip_line(&mut stdin).await {
                    tracing::warn!(error = %e, "cannot read stdin");
                    break;
                }
                upstream.send_out(json!({
                    "jsonrpc": "2.0", "id": null,
                    "error": { "code": -32600, "message": format!(
                        "invalid request: a message longer than {MAX_LINE} bytes (a write_file \
                         of a large file: write it in parts with append)") }
                }));
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read stdin");
                break;
            }
        }
        let text = String::from_utf8_lossy(&line);
        if text.trim().is_empty() {
            continue;
        }
        let message: Value = match serde_json::from_str(text.trim()) {
            Ok(message) => message,
            Err(e) => {
                upstream.send_out(json!({
                    "jsonrpc": "2.0", "id": null,
                    "error": { "code": -32700, "message": format!("parse error: {e}") }
                }));
                continue;
            }
        };
        if !message.is_object() {
            // JSON-RPC batches were removed from MCP in 2025-06-18.
            upstream.send_out(json!({
                "jsonrpc": "2.0", "id": null,
                "error": { "code": -32600, "message": "invalid request: one JSON-RPC object per line (MCP has no batches)" }
            }));
            continue;
        }
        let method = message.get("method").and_then(Value::as_str);
        if method == Some("initialize") {
            // Nothing else may be sent before the session exists.
            upstream.initialize(message).await;
        } else if method == Some("notifications/initialized") {
            // In order too: rmcp ends a session whose first message after initialize is not
            // this one, and concurrent forwarding could let a request overtake it.
            upstream.forward(message).await;
        } else {
            let upstream = upstream.clone();
            in_flight.spawn(async move { upstream.forward(message).await });
        }
    }
    if !stopped {
        // stdin closed: the answers to requests already sent still go out (for a while)
        // before the session ends.
        let drained = async { while in_flight.join_next().await.is_some() {} };
        if tokio::time::timeout(DRAIN_TIMEOUT, drained).await.is_err() {
            tracing::warn!("requests still running when stdin closed: ending the session");
        }
    }
    in_flight.abort_all();
    upstream.close().await;
    drop(upstream);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    Ok(())
}

/// Reads one line of at most [`MAX_LINE`] bytes; 0 at the end of input.
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut Vec<u8>,
) -> std::io::Result<usize> {
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(line.len());
        }
        let (take, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (available.len(), false),
        };
        if line.len() + take > MAX_LINE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("a message longer than {MAX_LINE} bytes"),
            ));
        }
        line.extend_from_slice(&available[..take]);
        reader.consume(take);
        if done {
            return Ok(line.len());
        }
    }
}

/// Reads and drops input up to the end of the current line.
async fn skip_line<R: tokio::io::AsyncBufRead + Unpin>(reader: &mut R) -> std::io::Result<()> {
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(());
        }
        match available.iter().position(|&b| b == b'\n') {
            Some(i) => {
                reader.consume(i + 1);
                return Ok(());
            }
            None => {
                let n = available.len();
                reader.consume(n);
            }
        }
    }
}

impl Upstream {
    fn send_out(&self, message: Value) {
        let _ = self.out.send(message);
    }

    fn session(&self) -> std::sync::MutexGuard<'_, Session> {
        self.session.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends the client's `initialize` and keeps the session it opens.
    async fn initialize(&self, message: Value) {
        self.session().initialize = message.get("params").cloned();
        match self.post(&message, Relay::Collect).await {
            Ok(answers) => {
                for answer in answers {
                    self.learn(&answer);
                    self.send_out(answer);
                }
            }
            Err(e) => self.fail(&message, &e),
        }
    }

    /// Sends one message; answers go to stdout. A forgotten session is opened again once.
    async fn forward(&self, message: Value) {
        let answers = match self.post(&message, Relay::Out).await {
            Err(PostError::SessionGone(gone)) => match self.reopen(gone).await {
                Ok(()) => self.post(&message, Relay::Out).await,
                Err(e) => Err(e),
            },
            other => other,
        };
        match answers {
            Ok(answers) => answers.into_iter().for_each(|a| self.send_out(a)),
            Err(e) => self.fail(&message, &e),
        }
    }

    /// Keeps the protocol version of an `initialize` answer.
    fn learn(&self, answer: &Value) {
        if let Some(version) = answer
            .pointer("/result/protocolVersion")
            .and_then(Value::as_str)
        {
            self.session().protocol_version = Some(version.to_string());
        }
    }

    /// Opens a new session with the client's original `initialize` (the server restarted or
    /// forgot the old one).
    async fn reopen(&self, gone: String) -> Result<(), PostError> {
        // Messages that failed together reopen once: the first does, the others find the
        // new session.
        let _turn = self.reopening.lock().await;
        if self.session().id.as_deref() != Some(gone.as_str()) {
            return Ok(());
        }
        let params = {
            let mut session = self.session();
            session.id = None;
            session.protocol_version = None;
            session.initialize.clone()
        };
        let Some(params) = params else {
            return Err(PostError::Other(
                "the server forgot the session and there is no initialize to repeat".into(),
            ));
        };
        tracing::warn!("the server forgot the MCP session: opening a new one");
        let init = json!({"jsonrpc": "2.0", "id": "openrun-mcp-reinitialize", "method": "initialize", "params": params});
        for answer in self.post(&init, Relay::Collect).await? {
            if answer.get("error").is_some() {
                return Err(PostError::Other(format!(
                    "the server refused a new session: {}",
                    answer["error"]
                )));
            }
            self.learn(&answer);
        }
        let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
        self.post(&initialized, Relay::Collect).await.map(|_| ())
    }

    /// Answers a request that could not be forwarded with a JSON-RPC error (notifications and
    /// responses get none: they are only logged).
    fn fail(&self, message: &Value, e: &PostError) {
        let text = e.to_string();
        match message.get("id") {
            Some(id) if message.get("method").is_some() => self.send_out(json!({
                "jsonrpc": "2.0", "id": id,
                "error": { "code": SERVER_UNAVAILABLE, "message": text }
            })),
            _ => tracing::warn!(error = %text, "cannot forward a message to the server"),
        }
    }

    /// POSTs one message; returns the JSON-RPC messages of the answer (none for 202; none for
    /// an SSE answer relayed to stdout as it arrives, [`Relay::Out`]).
    async fn post(&self, message: &Value, relay: Relay) -> Result<Vec<Value>, PostError> {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, self.auth.clone());
        headers.insert(CONTENT_TYPE, header_value("application/json")?);
        headers.insert(ACCEPT, header_value("application/json, text/event-stream")?);
        let sent_session = {
            let session = self.session();
            if let Some(id) = &session.id {
                headers.insert("mcp-session-id", header_value(id)?);
            }
            if let Some(version) = &session.protocol_version {
                headers.insert("mcp-protocol-version", header_value(version)?);
            }
            session.id.clone()
        };
        let answer = self
            .http
            .post(self.endpoint.clone())
            .headers(headers)
            .body(message.to_string())
            .send()
            .await
            .map_err(|e| {
                PostError::Other(format!(
                    "cannot reach the openrun server at {}: {e}",
                    self.endpoint
                ))
            })?;
        let status = answer.status();
        if let Some(id) = answer
            .headers()
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
        {
            self.session().id = Some(id.to_string());
        }
        if status == StatusCode::NOT_FOUND {
            if let Some(gone) = sent_session {
                return Err(PostError::SessionGone(gone));
            }
        }
        if status == StatusCode::ACCEPTED {
            return Ok(Vec::new());
        }
        let is_sse = answer
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.starts_with("text/event-stream"));
        if is_sse && status.is_success() {
            let mut events = SseParser::default();
            let mut messages = Vec::new();
            let mut body = answer.bytes_stream();
            while let Some(chunk) = body.next().await {
                let chunk = chunk
                    .map_err(|e| PostError::Other(format!("the server's answer broke off: {e}")))?;
                for data in events.feed(&chunk) {
                    match serde_json::from_str::<Value>(&data) {
                        // Each event goes out as it arrives (progress, logs, then the answer).
                        Ok(message) if relay == Relay::Out => self.send_out(message),
                        Ok(message) => messages.push(message),
                        Err(e) => tracing::warn!(error = %e, "an SSE event that is not JSON"),
                    }
                }
            }
            return Ok(messages);
        }
        let body = answer
            .bytes()
            .await
            .map_err(|e| PostError::Other(format!("cannot read the server's answer: {e}")))?;
        // A JSON-RPC message (or batch), whatever the status: rmcp answers some protocol
        // errors with a 4xx and a JSON-RPC error body.
        match serde_json::from_slice::<Value>(&body) {
            Ok(Value::Array(batch)) if status.is_success() => Ok(batch),
            Ok(value) if value.get("jsonrpc").is_some() => Ok(vec![value]),
            Ok(value) if value.get("code").is_some() => Err(PostError::Other(format!(
                "the openrun server answered {status}: {} ({})",
                value["message"].as_str().unwrap_or(""),
                value["code"].as_str().unwrap_or("")
            ))),
            _ => Err(PostError::Other(format!(
                "the openrun server answered {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(500)])
            ))),
        }
    }

    /// Ends the session on the server (best effort).
    async fn close(&self) {
        let id = self.session().id.clone();
        if let Some(id) = id {
            let request = self
                .http
                .delete(self.endpoint.clone())
                .header(AUTHORIZATION, self.auth.clone())
                .header("mcp-session-id", id)
                .timeout(Duration::from_secs(2));
            if let Err(e) = request.send().await {
                tracing::debug!(error = %e, "cannot end the MCP session");
            }
        }
    }
}

/// A header value; the error never shows the value (it may be a secret).
fn header_value(text: &str) -> Result<HeaderValue, PostError> {
    HeaderValue::from_str(text)
        .map_err(|_| PostError::Other("a header value that HTTP cannot carry".into()))
}

/// The `Authorization` header of the key, checked once (trimmed; never shown in an error).
fn authorization(key: Option<&str>) -> Result<HeaderValue> {
    let key = key.map(str::trim).filter(|k| !k.is_empty());
    let Some(key) = key else {
        bail!("no API key: set OPENRUN_API_KEY (openrun key create makes one)");
    };
    let mut value = HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| {
        anyhow::anyhow!(
            "the API key (--api-key, OPENRUN_API_KEY or the config file) holds characters an \
             HTTP header cannot carry (a line break or another control character?): check it \
             [key not shown]"
        )
    })?;
    value.set_sensitive(true);
    Ok(value)
}

/// What [`Upstream::post`] does with the messages of an SSE answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Relay {
    /// Each to stdout as it arrives (nothing is returned).
    Out,
    /// Returned together once the stream ended.
    Collect,
}

/// Why a message could not be forwarded.
#[derive(Debug, thiserror::Error)]
enum PostError {
    /// The server does not know the session any more (404 with a session id).
    #[error("the server forgot the MCP session")]
    SessionGone(String),
    /// Anything else, said for the client.
    #[error("{0}")]
    Other(String),
}

/// Server-sent events, fed in chunks: yields each event's data (its `data:` lines joined).
#[derive(Debug, Default)]
struct SseParser {
    /// Bytes of an incomplete line.
    partial: Vec<u8>,
    /// Data lines of the event being read.
    data: Vec<String>,
}

impl SseParser {
    /// Adds a chunk; returns the data of the events it completed (empty data is skipped).
    fn feed(&mut self, chunk: &[u8]) -> Vec<String> {
        self.partial.extend_from_slice(chunk);
        let mut done = Vec::new();
        while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
            let raw: Vec<u8> = self.partial.drain(..=end).collect();
            let line = String::from_utf8_lossy(&raw);
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                let data = std::mem::take(&mut self.data).join("\n");
                if !data.trim().is_empty() {
                    done.push(data);
                }
            } else if let Some(value) = line.strip_prefix("data:") {
                self.data
                    .push(value.strip_prefix(' ').unwrap_or(value).to_string());
            }
            // `id:`, `event:`, `retry:` and comments need nothing here.
        }
        done
    }
}

/// SIGTERM and SIGINT: stop bridging (and stop a started server).
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_are_split_across_chunks() {
        let mut p = SseParser::default();
        assert!(p.feed(b"data: \nid: 0\nretry: 3000\n\n").is_empty());
        assert!(p.feed(b"data: {\"a\":").is_empty());
        assert!(p.feed(b"1}\r\n").is_empty());
        assert_eq!(p.feed(b"\r\ndata: x\n"), ["{\"a\":1}"]);
        assert_eq!(p.feed(b"data: y\n\n: comment\n\n"), ["x\ny"]);
    }

    #[tokio::test]
    async fn lines_are_read_whole_and_bounded() {
        let input: &[u8] = b"one\ntwo";
        let mut reader = tokio::io::BufReader::new(input);
        let mut line = Vec::new();
        assert_eq!(read_line(&mut reader, &mut line).await.unwrap(), 4);
        assert_eq!(line, b"one\n");
        line.clear();
        assert_eq!(read_line(&mut reader, &mut line).await.unwrap(), 3);
        line.clear();
        assert_eq!(read_line(&mut reader, &mut line).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn an_over_long_line_is_skipped_whole() {
        let mut input = vec![b'x'; MAX_LINE + 10];
        input.extend_from_slice(b"\nnext\n");
        let mut reader = tokio::io::BufReader::new(&input[..]);
        let mut line = Vec::new();
        let e = read_line(&mut reader, &mut line).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        skip_line(&mut reader).await.unwrap();
        line.clear();
        read_line(&mut reader, &mut line).await.unwrap();
        assert_eq!(line, b"next\n");
    }

    #[test]
    fn the_key_is_checked_once_and_never_shown() {
        assert!(authorization(Some(" or_key \n")).is_ok());
        let e = authorization(Some("or_se\ncret")).unwrap_err().to_string();
        assert!(!e.contains("or_se") && !e.contains("cret"), "{e}");
        assert!(authorization(Some("  ")).is_err());
        let e = header_value("sec\u{7f}ret").unwrap_err().to_string();
        assert!(!e.contains("sec"), "{e}");
    }
}
