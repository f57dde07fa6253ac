//! `openrun mcp`: MCP over stdio for local agents (Claude Desktop / Claude Code:
//! `{"command": "openrun", "args": ["mcp"]}`), bridged to a server's `/mcp` (Streamable HTTP),
//! so the tools have one implementation, the server's.
//!
//! Which server:
//! 1. the configured one (`--server`/`OPENRUN_SERVER`, else the config file's), with its key;
//!    if it does not answer, `openrun mcp` fails (it never starts a server in its place);
//! 2. else the local server of `<data-dir>/local.json` (written by `openrun serve` on loopback),
//!    if it answers;
//! 3. else it starts one: a child `openrun serve --listen 127.0.0.1:0` on the data dir, using
//!    the key that server writes to `local.json`, stopped (SIGTERM) when stdin closes or this
//!    process is told to stop. Sandboxes it made outlive it like any server's; the next start
//!    finds them again. `--no-start` fails instead, with a message saying how to name a server.
//!
//! The bridge: each JSON-RPC message read from stdin (one per line) is POSTed to `/mcp` with
//! the bearer key, `Mcp-Session-Id` and `MCP-Protocol-Version`; the answer, JSON or an SSE
//! stream, goes to stdout one message per line. Requests run concurrently (a long
//! `run_command` does not hold up a `ping`); `initialize` is awaited before anything else is
//! read. When the server forgot the session (it restarted), the bridge initializes a new one
//! with the client's original `initialize` and sends the message again. A request the server
//! cannot be asked (down, 401, 5xx) is answered with a JSON-RPC error naming the problem.
//! stdout carries only JSON-RPC; logs and the child server's output go to stderr.

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use reqwest::header::{HeaderMap, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use reqwest::{StatusCode, Url};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::cli::McpArgs;
use crate::remote::Target;

/// How long a server has to answer `/v1/health` to count as up.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a started server has to print `listening on`.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a started server has to stop after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
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
    let mut child = None;
    let target = rt.block_on(choose_server(
        data_dir,
        server,
        api_key,
        args.no_start,
        &mut child,
    ));
    let result = match target {
        Ok(target) => rt.block_on(bridge(target)),
        Err(e) => Err(e),
    };
    if let Some(child) = child {
        stop(child);
    }
    // A stdin read may still be parked on its blocking thread: do not wait for it.
    rt.shutdown_background();
    result.map(|()| 0)
}

/// The server to bridge to (see the module documentation); a started one goes to `child`.
async fn choose_server(
    data_dir: &Path,
    server: Option<String>,
    api_key: Option<String>,
    no_start: bool,
    child: &mut Option<Child>,
) -> Result<Target> {
    let http = reqwest::Client::builder()
        .timeout(HEALTH_TIMEOUT)
        .build()
        .context("cannot make an HTTP client")?;
    if let Some(target) = Target::resolve(server, api_key.clone(), data_dir)? {
        if let Err(e) = health(&http, &target.url).await {
            bail!(
                "the openrun server {} does not answer ({e:#}); start it (openrun serve) or \
                 name another with --server / OPENRUN_SERVER",
                target.url
            );
        }
        return with_key(target);
    }
    if let Some(url) = local_server(data_dir) {
        if health(&http, &url).await.is_ok() {
            tracing::info!(%url, "using the local server of local.json");
            if let Some(target) = Target::resolve(Some(url.to_string()), api_key.clone(), data_dir)?
            {
                return with_key(target);
            }
        }
    }
    if no_start {
        bail!(
            "no openrun server is configured and none answers on this machine: start one \
             (openrun serve), or name one with --server / OPENRUN_SERVER and its key with \
             OPENRUN_API_KEY (or drop --no-start to let openrun mcp start one)"
        );
    }
    let (started, addr) = start_server(data_dir).await?;
    *child = Some(started);
    let url = format!("http://{addr}");
    match Target::resolve(Some(url.clone()), api_key, data_dir)? {
        Some(target) => with_key(target),
        None => bail!("cannot use the started server at {url}"),
    }
}

/// `target`, which must have a key.
fn with_key(target: Target) -> Result<Target> {
    if target.api_key.is_none() {
        bail!(
            "no API key for the openrun server {}: set OPENRUN_API_KEY (openrun key create \
             makes one) or \"api_key\" in the config file",
            target.url
        );
    }
    Ok(target)
}

/// The server `<data_dir>/local.json` names, if any.
fn local_server(data_dir: &Path) -> Option<Url> {
    let bytes = std::fs::read(data_dir.join(crate::remote::LOCAL_FILE)).ok()?;
    let local: Value = serde_json::from_slice(&bytes).ok()?;
    Url::parse(local.get("server")?.as_str()?).ok()
}

/// `GET /v1/health`.
async fn health(http: &reqwest::Client, url: &Url) -> Result<()> {
    let answer = http
        .get(url.join("v1/health")?)
        .send()
        .await
        .context("no answer")?;
    if !answer.status().is_success() {
        bail!("/v1/health answered {}", answer.status());
    }
    Ok(())
}

/// Starts `openrun serve --listen 127.0.0.1:0` on `data_dir` (its log on our stderr) and waits
/// for its address.
async fn start_server(data_dir: &Path) -> Result<(Child, String)> {
    let exe = std::env::current_exe().context("cannot find the openrun binary")?;
    tracing::warn!(data_dir = %data_dir.display(), "no openrun server is configured or running: starting one");
    let mut child = Command::new(exe)
        .arg("--data-dir")
        .arg(data_dir)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .env_remove("OPENRUN_SERVER")
        .spawn()
        .context("cannot start openrun serve")?;
    let stdout = child.stdout.take().context("no stdout of openrun serve")?;
    let first_line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        let mut reader = std::io::BufReader::new(stdout);
        let read = reader.read_line(&mut line).map(|_| line);
        // Anything it prints later goes to our stderr: stdout is the client's, and a closed
        // pipe would fail the server's writes.
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut reader, &mut std::io::stderr());
        });
        read
    });
    let line = match tokio::time::timeout(START_TIMEOUT, first_line).await {
        Ok(Ok(Ok(line))) => line,
        Ok(Ok(Err(e))) => {
            stop(child);
            return Err(e).context("cannot read what openrun serve printed");
        }
        Ok(Err(e)) => {
            stop(child);
            return Err(e).context("cannot read what openrun serve printed");
        }
        Err(_) => {
            stop(child);
            bail!("openrun serve did not start listening within {START_TIMEOUT:?}");
        }
    };
    match line.trim().strip_prefix("listening on ") {
        Some(addr) => Ok((child, addr.to_string())),
        None => {
            let status = child.wait().ok();
            bail!(
                "no openrun server is configured and starting one failed (openrun serve: {}; \
                 its messages are above). Start one yourself (openrun serve, as root), or name \
                 one with --server / OPENRUN_SERVER and OPENRUN_API_KEY",
                status.map_or_else(|| "no status".to_string(), |s| s.to_string())
            )
        }
    }
}

/// Stops a started server: SIGTERM, then SIGKILL after [`STOP_TIMEOUT`].
fn stop(mut child: Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let pid = i32::try_from(child.id())
        .ok()
        .and_then(rustix::process::Pid::from_raw);
    if let Some(pid) = pid {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    let deadline = std::time::Instant::now() + STOP_TIMEOUT;
    while std::time::Instant::now() < deadline {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return,
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    tracing::warn!("the started openrun server did not stop: killing it");
    let _ = child.kill();
    let _ = child.wait();
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
    key: String,
    session: Mutex<Session>,
    out: mpsc::UnboundedSender<Value>,
}

/// Copies stdin to the server and the answers to stdout until stdin closes (or SIGTERM/SIGINT).
async fn bridge(target: Target) -> Result<()> {
    let key = target.api_key.clone().context("no API key")?;
    let endpoint = target.url.join("mcp")?;
    let http = reqwest::Client::builder()
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
        key,
        session: Mutex::new(Session::default()),
        out,
    });
    tracing::info!(endpoint = %upstream.endpoint, "bridging stdio to MCP over HTTP");
    let mut signals = Signals::install()?;
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin());
    let mut line = Vec::new();
    loop {
        line.clear();
        let read = tokio::select! {
            read = read_line(&mut stdin, &mut line) => read,
            () = signals.recv() => break,
        };
        match read {
            Ok(0) => break,
            Ok(_) => {}
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
        if message.get("method").and_then(Value::as_str) == Some("initialize") {
            // Nothing else may be sent before the session exists.
            upstream.initialize(message).await;
        } else {
            let upstream = upstream.clone();
            tokio::spawn(async move { upstream.forward(message).await });
        }
    }
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
        match self.post(&message).await {
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
        let answers = match self.post(&message).await {
            Err(PostError::SessionGone) => match self.reopen().await {
                Ok(()) => self.post(&message).await,
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
    async fn reopen(&self) -> Result<(), PostError> {
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
        for answer in self.post(&init).await? {
            if answer.get("error").is_some() {
                return Err(PostError::Other(format!(
                    "the server refused a new session: {}",
                    answer["error"]
                )));
            }
            self.learn(&answer);
        }
        let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
        self.post(&initialized).await.map(|_| ())
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

    /// POSTs one message; returns the JSON-RPC messages of the answer (none for 202).
    async fn post(&self, message: &Value) -> Result<Vec<Value>, PostError> {
        let mut headers = HeaderMap::new();
        let auth = format!("Bearer {}", self.key);
        headers.insert(AUTHORIZATION, header_value(&auth)?);
        headers.insert(CONTENT_TYPE, header_value("application/json")?);
        headers.insert(ACCEPT, header_value("application/json, text/event-stream")?);
        let had_session = {
            let session = self.session();
            if let Some(id) = &session.id {
                headers.insert("mcp-session-id", header_value(id)?);
            }
            if let Some(version) = &session.protocol_version {
                headers.insert("mcp-protocol-version", header_value(version)?);
            }
            session.id.is_some()
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
        if status == StatusCode::NOT_FOUND && had_session {
            return Err(PostError::SessionGone);
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
        let (id, key) = (self.session().id.clone(), self.key.clone());
        if let Some(id) = id {
            let request = self
                .http
                .delete(self.endpoint.clone())
                .bearer_auth(key)
                .header("mcp-session-id", id)
                .timeout(Duration::from_secs(2));
            if let Err(e) = request.send().await {
                tracing::debug!(error = %e, "cannot end the MCP session");
            }
        }
    }
}

fn header_value(text: &str) -> Result<reqwest::header::HeaderValue, PostError> {
    reqwest::header::HeaderValue::from_str(text)
        .map_err(|_| PostError::Other(format!("a header value that HTTP cannot carry: {text:?}")))
}

/// Why a message could not be forwarded.
#[derive(Debug, thiserror::Error)]
enum PostError {
    /// The server does not know the session any more (404 with a session id).
    #[error("the server forgot the MCP session")]
    SessionGone,
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
}
