//! The streaming surfaces of `openrun serve` over real HTTP on loopback: exec over a
//! WebSocket, terminals, tar archives of directories, and the environment manifest.

mod common;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use base64::Engine;
use common::server::*;
use common::*;
use serde_json::{json, Value};
use tungstenite::client::IntoClientRequest;
use tungstenite::{Message, WebSocket};

type Socket = WebSocket<TcpStream>;

/// Opens a WebSocket on the server at `path` with `key`; the server's HTTP answer when it
/// refuses the handshake.
fn ws(server: &Server, key: &str, path: &str) -> Result<Socket, (u16, Value)> {
    let addr = server.url.trim_start_matches("http://");
    let mut request = format!("ws://{addr}{path}").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    let stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    match tungstenite::client(request, stream) {
        Ok((socket, _)) => Ok(socket),
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(res))) => {
            let body = res.body().clone().unwrap_or_default();
            Err((
                res.status().as_u16(),
                serde_json::from_slice(&body).unwrap_or(Value::Null),
            ))
        }
        Err(e) => panic!("WebSocket handshake failed: {e}"),
    }
}

/// Every message until the server closes.
fn until_close(socket: &mut Socket) -> Vec<Message> {
    let mut got = Vec::new();
    loop {
        match socket.read() {
            Ok(Message::Close(_)) => return got,
            Ok(m) => got.push(m),
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                return got
            }
            Err(e) => panic!("WebSocket read failed after {got:?}: {e}"),
        }
    }
}

/// The JSON of text messages (binary ones are refused).
fn lines_of(messages: &[Message]) -> Vec<Value> {
    messages
        .iter()
        .map(|m| match m {
            Message::Text(t) => serde_json::from_str(t.as_str()).unwrap(),
            other => panic!("unexpected message {other:?}"),
        })
        .collect()
}

fn send_json(socket: &mut Socket, value: Value) {
    socket
        .send(Message::Text(value.to_string().into()))
        .unwrap();
}

/// Next text message as JSON.
fn next_line(socket: &mut Socket) -> Value {
    loop {
        match socket.read().unwrap() {
            Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected message {other:?}"),
        }
    }
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

fn setup(name: &str) -> (Env, Server, String, Api, String) {
    let env = Env::new();
    let key = key(&env, name);
    let server = Server::start(&env);
    let api = Api::new(&server, &key);
    let id = api.create(json!({}))["id"].as_str().unwrap().to_string();
    (env, server, key, api, id)
}

#[test]
fn exec_over_websocket_streams_bytes_takes_stdin_and_signals() {
    let (env, server, key, api, id) = setup("ws");
    let path = format!("/v1/sandboxes/{id}/exec/ws");

    // Exact bytes on both streams, then the exit code; the server closes after it.
    let mut socket = ws(&server, &key, &path).unwrap();
    send_json(
        &mut socket,
        json!({ "cmd": ["sh", "-c", "printf 'out\\377'; printf 'err' >&2; exit 3"] }),
    );
    let lines = lines_of(&until_close(&mut socket));
    assert_eq!(lines[0]["type"], "started", "{lines:?}");
    assert_eq!(bytes_from(&lines, "stdout", 0), b"out\xff");
    assert_eq!(bytes_from(&lines, "stderr", 0), b"err");
    assert_eq!(exit_line(&lines)["code"], 3);

    // Stdin: fed in two messages, then closed.
    let mut socket = ws(&server, &key, &path).unwrap();
    send_json(
        &mut socket,
        json!({ "cmd": ["sh", "-c", "cat; echo eof >&2"], "stdin": true }),
    );
    assert_eq!(next_line(&mut socket)["type"], "started");
    send_json(
        &mut socket,
        json!({ "type": "stdin", "data_b64": b64(b"hello ") }),
    );
    send_json(
        &mut socket,
        json!({ "type": "stdin", "data_b64": b64(b"world\0\n") }),
    );
    send_json(&mut socket, json!({ "type": "stdin_eof" }));
    let lines = lines_of(&until_close(&mut socket));
    assert_eq!(bytes_from(&lines, "stdout", 0), b"hello world\0\n");
    assert_eq!(stream(&lines, "stderr"), "eof\n");
    assert_eq!(exit_line(&lines)["code"], 0);

    // A signal ends it; the timeline records it.
    let mut socket = ws(&server, &key, &path).unwrap();
    send_json(&mut socket, json!({ "cmd": ["sleep", "60"] }));
    let started = next_line(&mut socket);
    let pid = started["pid"].as_i64().unwrap();
    let t0 = Instant::now();
    send_json(&mut socket, json!({ "type": "signal", "signal": 15 }));
    let lines = lines_of(&until_close(&mut socket));
    let exit = exit_line(&lines);
    assert_eq!(exit["signal"], 15, "{exit}");
    assert!(exit["code"].is_null());
    assert!(t0.elapsed() < Duration::from_secs(10));
    let events: Vec<Value> = api
        .get(&format!("/v1/sandboxes/{id}/events"))
        .json()
        .unwrap();
    let signal = events
        .iter()
        .find(|e| e["kind"] == "process.signal")
        .expect("process.signal event");
    assert_eq!(signal["payload"]["pid"], pid);
    assert_eq!(signal["payload"]["signal"], 15);
    let kinds = api.event_kinds(&id);
    assert_eq!(
        kinds.iter().filter(|k| *k == "process.exit").count(),
        3,
        "{kinds:?}"
    );

    // A command that does not exist: one error line, then close.
    let mut socket = ws(&server, &key, &path).unwrap();
    send_json(&mut socket, json!({ "cmd": ["no-such-command-xyz"] }));
    let lines = lines_of(&until_close(&mut socket));
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["type"], "error");
    assert_eq!(lines[0]["code"], "command_not_found");
    assert!(lines[0]["message"]
        .as_str()
        .unwrap()
        .contains("no-such-command-xyz"));

    // Bad messages are error lines naming the problem.
    for (first, then, needle) in [
        (json!({ "cmd": [] }), None, "cmd must name a program"),
        (json!({ "cmd": ["true"], "bogus": 1 }), None, "bogus"),
        (
            json!({ "cmd": ["true"], "background": true }),
            None,
            "background",
        ),
        (
            json!({ "cmd": ["sleep", "60"] }),
            Some(json!({ "type": "stdin", "data_b64": "aGk=" })),
            "stdin",
        ),
        (
            json!({ "cmd": ["sleep", "60"] }),
            Some(json!({ "type": "signal", "signal": 99 })),
            "99",
        ),
    ] {
        let mut socket = ws(&server, &key, &path).unwrap();
        send_json(&mut socket, first.clone());
        if let Some(then) = then {
            assert_eq!(next_line(&mut socket)["type"], "started");
            send_json(&mut socket, then);
        }
        let lines = lines_of(&until_close(&mut socket));
        let last = lines.last().expect("an error line");
        assert_eq!(last["type"], "error", "{first}: {lines:?}");
        assert_eq!(last["code"], "invalid_argument", "{first}: {last}");
        assert!(
            last["message"].as_str().unwrap().contains(needle),
            "{first}: {last}"
        );
    }

    // Not a WebSocket handshake: 400.
    error(api.get(&path), 400, "invalid_argument");

    // Another tenant's sandbox and a deleted one are 404; one removed behind the server's
    // back is 409.
    let other = common::server::key(&env, "other");
    let (status, body) = ws(&server, &other, &path).unwrap_err();
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")));
    let gone = api.create(json!({}))["id"].as_str().unwrap().to_string();
    assert_ok(&env.output(["rm", &gone]));
    let (status, body) = ws(&server, &key, &format!("/v1/sandboxes/{gone}/exec/ws")).unwrap_err();
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("sandbox_not_running"))
    );
    assert_eq!(api.delete(&format!("/v1/sandboxes/{id}")).status(), 204);
    let (status, body) = ws(&server, &key, &path).unwrap_err();
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")));
}

#[test]
fn a_websocket_exec_ends_with_an_error_line_when_its_sandbox_is_deleted() {
    let (_env, server, key, api, id) = setup("wsdel");
    let mut socket = ws(&server, &key, &format!("/v1/sandboxes/{id}/exec/ws")).unwrap();
    send_json(&mut socket, json!({ "cmd": ["sleep", "60"] }));
    assert_eq!(next_line(&mut socket)["type"], "started");
    assert_eq!(api.delete(&format!("/v1/sandboxes/{id}")).status(), 204);
    let lines = lines_of(&until_close(&mut socket));
    let last = lines.last().expect("a last line");
    assert!(
        last["type"] == "error" && last["code"] == "agent_lost" || last["type"] == "exit",
        "{lines:?}"
    );
}

/// Terminal bytes until `needle` shows up (or the terminal's final text line).
fn read_until(socket: &mut Socket, needle: &str) -> String {
    let mut screen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        match socket.read().unwrap() {
            Message::Binary(data) => {
                screen.extend_from_slice(&data);
                if String::from_utf8_lossy(&screen).contains(needle) {
                    return String::from_utf8_lossy(&screen).into_owned();
                }
            }
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!(
                "unexpected {other:?} while waiting for {needle:?} in {:?}",
                String::from_utf8_lossy(&screen)
            ),
        }
    }
    panic!(
        "{needle:?} not seen in {:?}",
        String::from_utf8_lossy(&screen)
    );
}

#[test]
fn terminals_echo_resize_and_end_with_an_exit_message() {
    let (_env, server, key, api, id) = setup("tty");
    let path = format!("/v1/sandboxes/{id}/terminal?cols=90&rows=33");
    let mut socket = ws(&server, &key, &path).unwrap();
    socket
        .send(Message::Binary(
            b"stty size; echo \"sum=$((6*7))\"\n".to_vec().into(),
        ))
        .unwrap();
    let screen = read_until(&mut socket, "sum=42");
    assert!(screen.contains("33 90"), "{screen:?}");
    send_json(
        &mut socket,
        json!({ "type": "resize", "cols": 120, "rows": 40 }),
    );
    socket
        .send(Message::Binary(
            b"echo \"shell=$0\"; stty size; tty\n".to_vec().into(),
        ))
        .unwrap();
    let screen = read_until(&mut socket, "/dev/pts/");
    assert!(screen.contains("40 120"), "{screen:?}");
    // The default command is the sandbox's login shell (the host image has bash).
    assert!(
        screen.contains("shell=-bash") || screen.contains("shell=/bin/bash"),
        "{screen:?}"
    );
    socket
        .send(Message::Binary(b"exit 7\n".to_vec().into()))
        .unwrap();
    let rest = until_close(&mut socket);
    let last = rest.last().expect("a final message");
    let Message::Text(text) = last else {
        panic!("the last message is not text: {last:?}");
    };
    let exit: Value = serde_json::from_str(text.as_str()).unwrap();
    assert_eq!(exit["type"], "exit", "{exit}");
    assert_eq!(exit["code"], 7, "{exit}");

    // An explicit command; a bad size and a bad cmd are 400 before any upgrade.
    let cmd = enc(r#"["sh","-c","stty size; exit 0"]"#);
    let mut socket = ws(
        &server,
        &key,
        &format!("/v1/sandboxes/{id}/terminal?rows=5&cols=17&cmd={cmd}"),
    )
    .unwrap();
    let messages = until_close(&mut socket);
    let screen: Vec<u8> = messages
        .iter()
        .filter_map(|m| match m {
            Message::Binary(d) => Some(d.to_vec()),
            _ => None,
        })
        .flatten()
        .collect();
    assert!(
        String::from_utf8_lossy(&screen).contains("5 17"),
        "{messages:?}"
    );
    for query in [
        "rows=0",
        "cols=70000",
        "cmd=%5B%5D",
        "cmd=notjson",
        "colour=1",
    ] {
        let (status, body) = ws(
            &server,
            &key,
            &format!("/v1/sandboxes/{id}/terminal?{query}"),
        )
        .unwrap_err();
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["code"], "invalid_argument", "{query}: {body}");
    }

    // A client that leaves hangs the terminal up: its command gets SIGHUP.
    let cmd = enc(r#"["sleep","60"]"#);
    let socket = ws(
        &server,
        &key,
        &format!("/v1/sandboxes/{id}/terminal?cmd={cmd}"),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let pid = loop {
        let list: Vec<Value> = api
            .get(&format!("/v1/sandboxes/{id}/processes"))
            .json()
            .unwrap();
        if let Some(p) = list
            .iter()
            .find(|p| p["argv"] == json!(["sleep", "60"]) && p["state"] == "running")
        {
            break p["pid"].as_i64().unwrap();
        }
        assert!(Instant::now() < deadline, "sleep never started: {list:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(socket);
    let info = api.wait_exited(&id, pid);
    assert_eq!(info["status"]["signal"], 1, "{info}");
}

