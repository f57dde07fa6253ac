//! Output streams while the process runs; readers come back with an offset; terminals work.

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use openrun_protocol::{
    AgentMessage, AttachRequest, ExecRequest, PtySize, Request, Response, Stream,
};
use openrun_runtime::AgentClient;

#[test]
fn lines_arrive_before_the_process_ends() {
    let env = Env::new();
    let start = Instant::now();
    let mut child = env
        .cmd(["run", "--", "sh", "-c", "echo first; sleep 3; echo second"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "first");
    let first_at = start.elapsed();
    assert!(child.try_wait().unwrap().is_none(), "process already ended");
    assert!(
        first_at < Duration::from_secs(2),
        "first line took {first_at:?}"
    );
    assert_eq!(lines.next().unwrap().unwrap(), "second");
    assert!(child.wait().unwrap().success());
    assert!(start.elapsed() >= Duration::from_secs(3));
}

#[test]
fn stdout_and_stderr_stay_separate_and_exit_codes_pass_through() {
    let env = Env::new();
    let out = env.output(["run", "--", "sh", "-c", "echo out; echo err >&2; exit 7"]);
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(stdout(&out), "out\n");
    assert_eq!(stderr(&out), "err\n");
}

#[test]
fn stdin_is_forwarded_with_dash_i() {
    let env = Env::new();
    let mut child = env
        .cmd(["run", "-i", "--", "tr", "a-z", "A-Z"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hello sandbox\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(stdout(&out), "HELLO SANDBOX\n");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Collects a stream's bytes until the exit event.
async fn collect(
    client: &mut AgentClient,
    pid: i32,
) -> (Vec<u8>, Vec<u8>, openrun_protocol::ExitStatus) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    loop {
        let frame = client.next_event().await.unwrap();
        match frame.header {
            AgentMessage::Output { pid: p, stream, .. } if p == pid => match stream {
                Stream::Stdout => out.extend(frame.data),
                Stream::Stderr => err.extend(frame.data),
            },
            AgentMessage::Exit { pid: p, status } if p == pid => return (out, err, status),
            _ => {}
        }
    }
}

#[test]
fn reattaching_from_an_offset_returns_exactly_the_remaining_bytes() {
    let env = Env::new();
    let id = env.create(&[]);
    runtime().block_on(async {
        let mut client = AgentClient::connect(&env.socket(&id)).await.unwrap();
        let started = client
            .call(Request::Exec(ExecRequest {
                argv: vec![
                    "sh".into(),
                    "-c".into(),
                    "printf 0123456789; sleep 0.3; printf abcdef; printf E >&2".into(),
                ],
                ..Default::default()
            }))
            .await
            .unwrap();
        let Response::Started { pid } = started.header else {
            panic!("{started:?}")
        };
        drop(client);
        // A new connection, as a reader that lost its first one, reattaches at offset 4.
        let mut client = AgentClient::connect(&env.socket(&id)).await.unwrap();
        let attached = client
            .call(Request::Attach(AttachRequest {
                pid,
                stdout_since: 4,
                stderr_since: 0,
                follow: true,
            }))
            .await
            .unwrap();
        assert!(
            matches!(attached.header, Response::Attached { dropped: 0, .. }),
            "{attached:?}"
        );
        let (out, err, status) = collect(&mut client, pid).await;
        assert_eq!(String::from_utf8(out).unwrap(), "456789abcdef");
        assert_eq!(String::from_utf8(err).unwrap(), "E");
        assert_eq!(status.code, Some(0));
        // After the end, any offset still reads back exactly.
        let again = client
            .call(Request::Attach(AttachRequest {
                pid,
                stdout_since: 13,
                stderr_since: 1,
                follow: false,
            }))
            .await
            .unwrap();
        assert!(matches!(again.header, Response::Attached { .. }));
        let (out, err, _) = collect(&mut client, pid).await;
        assert_eq!(out, b"def");
        assert!(err.is_empty());
    });
}

#[test]
fn a_pty_is_a_terminal_and_resizes() {
    let env = Env::new();
    let id = env.create(&[]);
    runtime().block_on(async {
        let mut client = AgentClient::connect(&env.socket(&id)).await.unwrap();
        let started = client
            .call(Request::Exec(ExecRequest {
                argv: vec![
                    "sh".into(),
                    "-c".into(),
                    "test -t 0 && test -t 1 && echo isatty; stty size; read x; stty size".into(),
                ],
                pty: Some(PtySize { rows: 24, cols: 80 }),
                attach: true,
                ..Default::default()
            }))
            .await
            .unwrap();
        let Response::Started { pid } = started.header else {
            panic!("{started:?}")
        };
        // Wait for the first size line before resizing.
        let mut seen = Vec::new();
        while !String::from_utf8_lossy(&seen).contains("24 80") {
            let frame = client.next_event().await.unwrap();
            if let AgentMessage::Output { .. } = frame.header {
                seen.extend(frame.data);
            }
        }
        client
            .call(Request::Resize {
                pid,
                size: PtySize {
                    rows: 50,
                    cols: 132,
                },
            })
            .await
            .unwrap();
        client
            .call_with_data(Request::Stdin { pid, eof: false }, b"\n".to_vec())
            .await
            .unwrap();
        let (rest, _, status) = collect(&mut client, pid).await;
        seen.extend(rest);
        let text = String::from_utf8_lossy(&seen);
        assert!(text.contains("isatty"), "{text:?}");
        assert!(text.contains("50 132"), "resize not seen: {text:?}");
        assert_eq!(status.code, Some(0));
    });
}

#[test]
fn run_dash_t_gives_a_terminal() {
    let env = Env::new();
    let out = env.output([
        "run",
        "-t",
        "--",
        "sh",
        "-c",
        "test -t 1 && echo tty-yes; stty size",
    ]);
    assert_ok(&out);
    let text = stdout(&out);
    assert!(text.contains("tty-yes"), "{text:?}");
    assert!(text.contains("24 80"), "{text:?}");
}

/// An attached reader slower than the process gets every byte: the process waits on its pipe
/// (as with docker or runc), the agent never drops output a client is streaming.
#[test]
fn run_gives_a_slow_reader_every_byte() {
    use std::io::Read;
    const TOTAL: u64 = 200_000_000;
    let env = Env::new();
    let mut child = env
        .cmd(["run", "--", "head", "-c", &TOTAL.to_string(), "/dev/zero"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    // Nothing read for a while (more than the agent's retention could be written meanwhile),
    // then a trickle, then as fast as we can.
    std::thread::sleep(Duration::from_secs(2));
    let slow_until = Instant::now() + Duration::from_secs(1);
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = out.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        total += n as u64;
        if Instant::now() < slow_until {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    assert!(child.wait().unwrap().success());
    assert_eq!(total, TOTAL);
}

/// The same through the API: an exec whose HTTP client pauses gets all of the output, while a
/// background process nobody streams is not held back (its output stays bounded).
#[test]
fn api_exec_gives_a_paused_client_every_byte() {
    use base64::Engine;
    use common::server::{key, Api, Server};
    const TOTAL: u64 = 100_000_000;
    let env = Env::new();
    let key = key(&env, "backpressure");
    let server = Server::start(&env);
    let api = Api::new(&server, &key);
    let id = api.create(serde_json::json!({}))["id"]
        .as_str()
        .unwrap()
        .to_string();

    let res = api.post(
        &format!("/v1/sandboxes/{id}/exec"),
        &serde_json::json!({ "cmd": ["head", "-c", TOTAL.to_string(), "/dev/zero"] }).to_string(),
    );
    assert_eq!(res.status(), 200);
    std::thread::sleep(Duration::from_secs(2));
    let mut received = 0u64;
    let mut last = serde_json::Value::Null;
    for line in BufReader::new(res).lines() {
        let line: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        if line["type"] == "stdout" {
            assert_eq!(line["offset"].as_u64(), Some(received), "contiguous");
            let data = base64::engine::general_purpose::STANDARD
                .decode(line["data_b64"].as_str().unwrap())
                .unwrap();
            received += data.len() as u64;
        }
        last = line;
    }
    assert_eq!(received, TOTAL);
    assert_eq!(last["type"], "exit", "{last}");
    assert_eq!(last["code"], 0, "{last}");

    // More than the retention (64 MiB), in the background: it runs to its end at once.
    let pid = api.background(
        &id,
        serde_json::json!({ "cmd": ["head", "-c", TOTAL.to_string(), "/dev/zero"], "background": true }),
    );
    let info = api.wait_exited(&id, pid);
    assert_eq!(info["stdout_len"], TOTAL, "{info}");
    server.stop();
}
