//! Commands in a sandbox through the server: `exec` (the NDJSON exec, or its WebSocket with
//! `-i` for stdin), `exec -t` and `shell` (the terminal WebSocket), and `logs` (a process's
//! output stream). Output is written as the raw bytes the command wrote; signals we receive
//! are forwarded to the command.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use openrun_protocol::{ErrorCode, ExitStatus};
use reqwest::Method;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use tokio_tungstenite::tungstenite::Message;

use super::http::{encode, sandbox_path, ApiError, Client, Lines, WebSocket};
use crate::cli::{ExecArgs, LogsArgs, ProcessArgs, ShellArgs};
use crate::session::{self, write_out, Attachment, Outcome, Signals};
use crate::terminal;

/// One line of an exec or output stream (and the terminal's closing message).
#[derive(Debug, serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Line {
    Started {
        pid: i32,
    },
    Stdout {
        data_b64: String,
    },
    Stderr {
        data_b64: String,
    },
    Exit(ExitStatus),
    Error {
        code: String,
        message: String,
    },
    #[serde(other)]
    Other,
}

impl Line {
    fn parse(text: &str) -> Result<Self> {
        serde_json::from_str(text)
            .with_context(|| format!("the server sent an unexpected line: {text:?}"))
    }
}

/// Writes what a stream carries: the output bytes to our stdout and stderr, or with `json`
/// the lines themselves.
struct Printer {
    json: bool,
}

impl Printer {
    fn show(&self, text: &str, line: &Line) -> Result<()> {
        if self.json {
            write_out(&mut std::io::stdout(), format!("{text}\n").as_bytes());
            return Ok(());
        }
        let (data, to_stdout) = match line {
            Line::Stdout { data_b64 } => (data_b64, true),
            Line::Stderr { data_b64 } => (data_b64, false),
            _ => return Ok(()),
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data)
            .context("the server sent output that is not base64")?;
        if to_stdout {
            write_out(&mut std::io::stdout(), &bytes);
        } else {
            write_out(&mut std::io::stderr(), &bytes);
        }
        Ok(())
    }
}

/// The outcome of an `error` line: a command that could not start gets a shell's exit code
/// (127, 126); anything else is openrun's failure, shown with the server's code.
fn error_outcome(code: String, message: String) -> Result<Outcome> {
    let agent_code = serde_json::from_value::<ErrorCode>(Value::String(code.clone())).ok();
    match agent_code.and_then(session::not_started_code) {
        Some(exit) => Ok(Outcome::NotStarted {
            code: exit,
            message,
        }),
        None => Err(ApiError {
            status: 200,
            code,
            message,
        }
        .into()),
    }
}

/// Where an exec's lines come from and its stdin and signals go.
trait ExecStream {
    /// The next line's text; `None` when the stream ended.
    async fn next(&mut self) -> Result<Option<String>>;
    /// Bytes for the command's stdin.
    async fn stdin(&mut self, data: &[u8]) -> Result<()>;
    /// Closes the command's stdin.
    async fn stdin_eof(&mut self) -> Result<()>;
    /// Sends `signal` to the command (`pid` once started).
    async fn signal(&mut self, pid: Option<i32>, signal: i32) -> Result<()>;
}

/// `POST .../exec`: lines from the NDJSON answer, signals through `.../processes/{pid}/signal`.
struct Posted<'a> {
    client: &'a Client,
    id: &'a str,
    lines: Lines,
}

impl ExecStream for Posted<'_> {
    async fn next(&mut self) -> Result<Option<String>> {
        self.lines.next_text().await
    }

    async fn stdin(&mut self, _data: &[u8]) -> Result<()> {
        anyhow::bail!("this exec has no stdin")
    }

    async fn stdin_eof(&mut self) -> Result<()> {
        Ok(())
    }

    async fn signal(&mut self, pid: Option<i32>, signal: i32) -> Result<()> {
        let Some(pid) = pid else {
            anyhow::bail!("interrupted before the command started");
        };
        let path = sandbox_path(self.id, &format!("/processes/{pid}/signal"));
        let body = json!({ "signal": signal, "group": true });
        let req = self.client.request(Method::POST, &path)?.json(&body);
        if let Err(e) = self.client.send(req).await {
            // It may have just exited: its exit line follows.
            tracing::debug!(error = %e, "cannot forward signal {signal}");
        }
        Ok(())
    }
}

/// `GET .../exec/ws`: lines as text messages, stdin and signals as messages back.
struct Socket {
    socket: WebSocket,
}

impl Socket {
    async fn send(&mut self, message: Value) -> Result<()> {
        self.socket
            .send(Message::text(message.to_string()))
            .await
            .context("lost the connection to the server")
    }
}

impl ExecStream for Socket {
    async fn next(&mut self) -> Result<Option<String>> {
        loop {
            match self.socket.next().await {
                None | Some(Ok(Message::Close(_))) => return Ok(None),
                Some(Ok(Message::Text(text))) => return Ok(Some(text.to_string())),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e).context("lost the connection to the server"),
            }
        }
    }

    async fn stdin(&mut self, data: &[u8]) -> Result<()> {
        let data_b64 = base64::engine::general_purpose::STANDARD.encode(data);
        self.send(json!({ "type": "stdin", "data_b64": data_b64 }))
            .await
    }

    async fn stdin_eof(&mut self) -> Result<()> {
        self.send(json!({ "type": "stdin_eof" })).await
    }

    async fn signal(&mut self, _pid: Option<i32>, signal: i32) -> Result<()> {
        self.send(json!({ "type": "signal", "signal": signal, "group": true }))
            .await
    }
}

/// Relays one exec until its `exit` (or `error`) line.
async fn relay(
    stream: &mut impl ExecStream,
    printer: &Printer,
    forward_stdin: bool,
) -> Result<Outcome> {
    let mut signals = Signals::new()?;
    let mut stdin = tokio::io::stdin();
    let mut stdin_open = forward_stdin;
    let mut buf = vec![0u8; 32 * 1024];
    let mut pid = None;
    loop {
        tokio::select! {
            text = stream.next() => {
                let Some(text) = text? else {
                    anyhow::bail!("the server ended the exec before the command's exit");
                };
                let line = Line::parse(&text)?;
                printer.show(&text, &line)?;
                match line {
                    Line::Started { pid: p } => pid = Some(p),
                    Line::Exit(status) => return Ok(Outcome::Exited(status)),
                    Line::Error { code, message } => return error_outcome(code, message),
                    _ => {}
                }
            }
            n = stdin.read(&mut buf), if stdin_open => match n {
                Ok(0) | Err(_) => {
                    stdin_open = false;
                    stream.stdin_eof().await?;
                }
                Ok(n) => stream.stdin(&buf[..n]).await?,
            },
            sig = signals.recv() => stream.signal(pid, sig).await?,
        }
    }
}

/// The exec body of the API for these process options.
fn exec_body(p: &ProcessArgs) -> Value {
    json!({
        "cmd": p.command,
        "env": p.env.iter().cloned().collect::<BTreeMap<_, _>>(),
        "cwd": p.workdir,
        "timeout": p.timeout.map(super::duration),
    })
}

/// `openrun exec`: the NDJSON exec, its WebSocket with `-i`, the terminal with `-t`.
pub async fn exec(client: &Client, args: ExecArgs) -> Result<i32> {
    let p = &args.process;
    if p.user.is_some() {
        anyhow::bail!("-u/--user is not supported by the server's exec");
    }
    let printer = Printer { json: args.json };
    let outcome = if p.tty {
        if args.json || !p.env.is_empty() || p.workdir.is_some() || p.timeout.is_some() {
            anyhow::bail!(
                "-t against a server takes no -e, -w, --timeout or --json (the terminal runs \
                 the command as given)"
            );
        }
        terminal_session(client, &args.id, &p.command, p.interactive).await?
    } else if p.interactive {
        let path = sandbox_path(&args.id, "/exec/ws");
        let mut socket = Socket {
            socket: client.websocket(&path).await?,
        };
        let mut body = exec_body(p);
        body["stdin"] = Value::Bool(true);
        socket.send(body).await?;
        relay(&mut socket, &printer, true).await?
    } else {
        let req = client
            .request(Method::POST, &sandbox_path(&args.id, "/exec"))?
            .json(&exec_body(p));
        let mut posted = Posted {
            client,
            id: &args.id,
            lines: client.lines(req).await?,
        };
        relay(&mut posted, &printer, false).await?
    };
    let memory_limit = match &outcome {
        Outcome::Exited(status) if status.oom_killed => memory_limit(client, &args.id).await,
        _ => None,
    };
    Ok(session::exit_code(
        &p.command,
        p.timeout,
        outcome,
        memory_limit,
    ))
}

/// The sandbox's memory limit, for the OOM message (none if it cannot be had).
async fn memory_limit(client: &Client, id: &str) -> Option<u64> {
    let resource: Value = client.get(&sandbox_path(id, "")).await.ok()?;
    resource["limits"]["memory_bytes"].as_u64()
}

/// `openrun shell`: a terminal running the sandbox's shell, or the given command.
pub async fn shell(client: &Client, args: ShellArgs) -> Result<i32> {
    let tty = rustix::termios::isatty(std::io::stdin());
    if !tty && args.command.is_empty() {
        anyhow::bail!(
            "openrun shell needs a terminal on stdin; without one give a command \
             (openrun shell ID -- CMD) or use openrun exec"
        );
    }
    let outcome = terminal_session(client, &args.id, &args.command, true).await?;
    Ok(session::exit_code(&args.command, None, outcome, None))
}

/// A PTY in the sandbox over the terminal WebSocket: its bytes to our stdout, our stdin to it
/// (in raw mode when stdin is a terminal), our window size on SIGWINCH.
async fn terminal_session(
    client: &Client,
    id: &str,
    command: &[String],
    forward_stdin: bool,
) -> Result<Outcome> {
    let size = terminal::size();
    let mut query = format!("/terminal?cols={}&rows={}", size.cols, size.rows);
    if !command.is_empty() {
        query.push_str("&cmd=");
        query.push_str(&encode(&serde_json::to_string(command)?));
    }
    let mut socket = client.websocket(&sandbox_path(id, &query)).await?;
    let mut local = Attachment::new(true, forward_stdin)?;
    let lost = "lost the connection to the server";
    loop {
        tokio::select! {
            message = socket.next() => match message {
                Some(Ok(Message::Binary(bytes))) => write_out(&mut std::io::stdout(), &bytes),
                Some(Ok(Message::Text(text))) => match Line::parse(&text)? {
                    Line::Exit(status) => return Ok(Outcome::Exited(status)),
                    Line::Error { code, message } => return error_outcome(code, message),
                    _ => {}
                },
                None | Some(Ok(Message::Close(_))) => {
                    anyhow::bail!("the server closed the terminal before the command's exit")
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e).context(lost),
            },
            n = local.stdin.read(&mut local.buf), if local.stdin_open => match n {
                Ok(0) | Err(_) => local.stdin_open = false,
                Ok(n) => socket.send(Message::binary(local.buf[..n].to_vec())).await.context(lost)?,
            },
            _ = local.winch.recv() => {
                let size = terminal::size();
                let resize = json!({ "type": "resize", "cols": size.cols, "rows": size.rows });
                socket.send(Message::text(resize.to_string())).await.context(lost)?;
            }
            sig = local.signals.recv() => {
                if sig == 2 {
                    // What the terminal's own ^C would send.
                    socket.send(Message::binary(vec![3u8])).await.context(lost)?;
                } else {
                    let _ = socket.close(None).await;
                    return Ok(Outcome::Exited(ExitStatus {
                        signal: Some(sig),
                        ..Default::default()
                    }));
                }
            }
        }
    }
}

/// `openrun logs ID PID [-f]`: the process's output from the start.
pub async fn logs(client: &Client, args: LogsArgs) -> Result<i32> {
    let path = sandbox_path(&args.id, &format!("/processes/{}/output", args.pid));
    let mut req = client.request(Method::GET, &path)?;
    if args.follow {
        req = req.query(&[("follow", "true")]);
    }
    let mut lines = client.lines(req).await?;
    let printer = Printer { json: args.json };
    while let Some(text) = lines.next_text().await? {
        let line = Line::parse(&text)?;
        printer.show(&text, &line)?;
        if let Line::Error { code, message } = line {
            return Err(ApiError {
                status: 200,
                code,
                message,
            }
            .into());
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_error_outcomes() {
        let exit = Line::parse(
            r#"{"type":"exit","code":3,"signal":null,"timed_out":false,"oom_killed":true}"#,
        )
        .unwrap();
        let Line::Exit(status) = exit else {
            panic!("not exit")
        };
        assert_eq!((status.code, status.oom_killed), (Some(3), true));
        assert!(matches!(
            Line::parse(r#"{"type":"stdout","offset":0,"data_b64":"aGk="}"#).unwrap(),
            Line::Stdout { .. }
        ));
        assert!(matches!(
            Line::parse(r#"{"type":"new_kind"}"#).unwrap(),
            Line::Other
        ));
        assert!(Line::parse("[1]").is_err());
        let Outcome::NotStarted { code, .. } =
            error_outcome("command_not_found".into(), "nope: not found".into()).unwrap()
        else {
            panic!("not a start failure")
        };
        assert_eq!(code, 127);
        let Outcome::NotStarted { code, .. } =
            error_outcome("permission_denied".into(), "denied".into()).unwrap()
        else {
            panic!("not a start failure")
        };
        assert_eq!(code, 126);
        let err = error_outcome("agent_lost".into(), "gone".into())
            .err()
            .unwrap();
        assert_eq!(err.to_string(), "gone (agent_lost)");
    }
}
