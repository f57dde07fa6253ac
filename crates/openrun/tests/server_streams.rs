//! The streaming surfaces of `openrun serve` over real HTTP on loopback: exec over a
//! WebSocket, terminals, tar archives of directories, and the environment manifest.

mod common;

use std::io::{Read, Write};
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

/// The sandbox's events of one kind, oldest first.
fn events_of(api: &Api, id: &str, kind: &str) -> Vec<Value> {
    let events: Vec<Value> = api
        .get(&format!("/v1/sandboxes/{id}/events"))
        .json()
        .unwrap();
    events.into_iter().filter(|e| e["kind"] == kind).collect()
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
    // The server records the signal once the agent has taken it: the process may die and
    // its exit reach the client first.
    let mut signals = events_of(&api, &id, "process.signal");
    while signals.is_empty() && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
        signals = events_of(&api, &id, "process.signal");
    }
    let signal = signals.first().expect("process.signal event");
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

/// Entries of a tar archive: name → (type byte, mode, content or link target).
fn tar_entries(data: &[u8]) -> Vec<(Vec<u8>, u8, u32, Vec<u8>)> {
    let mut archive = tar::Archive::new(data);
    let mut out = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path_bytes().into_owned();
        let kind = entry.header().entry_type().as_byte();
        let mode = entry.header().mode().unwrap();
        let body = match entry.link_name_bytes() {
            Some(target) => target.into_owned(),
            None => {
                let mut body = Vec::new();
                entry.read_to_end(&mut body).unwrap();
                body
            }
        };
        out.push((name, kind, mode, body));
    }
    out
}

/// A tar with entries given as raw header name bytes (so `..` and absolute names can be
/// written, which the tar crate's own setters refuse).
fn raw_tar(entries: &[(&[u8], tar::EntryType, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, kind, data) in entries {
        let mut header = tar::Header::new_gnu();
        header.as_old_mut().name[..name.len()].copy_from_slice(name);
        header.set_entry_type(*kind);
        header.set_mode(0o644);
        header.set_size(if kind.is_symlink() {
            0
        } else {
            data.len() as u64
        });
        if kind.is_symlink() {
            header.set_link_name("target").unwrap();
        }
        header.set_cksum();
        builder.append(&header, *data).unwrap();
    }
    builder.into_inner().unwrap()
}

#[test]
fn directories_round_trip_as_tar_archives() {
    let (_env, _server, _key, api, id) = setup("tar");
    let files = format!("/v1/sandboxes/{id}/files");
    let lines = api.exec(
        &id,
        "set -e; mkdir -p /work/t/a/b /work/t/empty; printf nested > /work/t/a/b/f; \
         head -c 3000000 /dev/urandom > /work/t/big; : > /work/t/zero; \
         printf '#!/bin/sh\\necho run\\n' > /work/t/run.sh; chmod 755 /work/t/run.sh; \
         chmod 600 /work/t/a/b/f; chmod 700 /work/t/a; ln -s a/b/f /work/t/link; \
         mkfifo /work/t/fifo; printf utf > '/work/t/caf\u{e9} \u{2603}'",
    );
    assert_eq!(exit_line(&lines)["code"], 0, "{lines:?}");
    let big = api
        .get(&format!("{files}?path=/work/t/big"))
        .bytes()
        .unwrap();
    assert_eq!(big.len(), 3_000_000);

    let res = api.get(&format!("{files}/tar?path=/work/t"));
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "application/x-tar");
    let archive = res.bytes().unwrap().to_vec();
    let entries = tar_entries(&archive);
    let names: Vec<String> = entries
        .iter()
        .map(|e| String::from_utf8(e.0.clone()).unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "a/",
            "a/b/",
            "a/b/f",
            "big",
            "caf\u{e9} \u{2603}",
            "empty/",
            "link",
            "run.sh",
            "zero"
        ],
        "the fifo is left out, the rest sorted depth first"
    );
    let get = |name: &str| {
        entries
            .iter()
            .find(|e| e.0 == name.as_bytes())
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    assert_eq!((get("a/").1, get("a/").2), (b'5', 0o700));
    assert_eq!(get("a/b/f").2, 0o600);
    assert_eq!(get("a/b/f").3, b"nested");
    assert_eq!(get("big").3, big.to_vec());
    assert_eq!(
        (get("run.sh").2, get("run.sh").3.as_slice()),
        (0o755, &b"#!/bin/sh\necho run\n"[..])
    );
    assert_eq!(
        (get("link").1, get("link").3.as_slice()),
        (b'2', &b"a/b/f"[..])
    );
    assert_eq!(get("zero").3, b"");

    // Upload it again elsewhere, symlink included.
    let res = api.put(
        &format!("{files}/tar?path=/work/copy/deep"),
        archive.clone(),
    );
    assert_eq!(res.status(), 200);
    let done: Value = res.json().unwrap();
    assert_eq!(done, json!({ "files": 5, "bytes": 3_000_000 + 6 + 3 + 19 }));
    let copied = tar_entries(
        &api.get(&format!("{files}/tar?path=/work/copy/deep"))
            .bytes()
            .unwrap(),
    );
    assert_eq!(
        copied, entries,
        "names, types, modes, contents and links survive"
    );
    let lines = api.exec(&id, "/work/copy/deep/run.sh");
    assert_eq!(stream(&lines, "stdout"), "run\n");
    let writes = events_of(&api, &id, "file.write");
    let write = writes.last().expect("a file.write event");
    assert_eq!(write["payload"]["path"], "/work/copy/deep");
    assert_eq!(write["payload"]["files"], 5);

    // An existing file is replaced, with the archive's mode.
    let small = raw_tar(&[(b"a/b/f", tar::EntryType::Regular, b"new")]);
    assert_eq!(
        api.put(&format!("{files}/tar?path=/work/copy/deep"), small)
            .status(),
        200
    );
    let lines = api.exec(
        &id,
        "stat -c %a /work/copy/deep/a/b/f; cat /work/copy/deep/a/b/f",
    );
    assert_eq!(stream(&lines, "stdout"), "644\nnew");

    // Refused entries name themselves.
    for (entry, kind, needle) in [
        (
            &b"../escape"[..],
            tar::EntryType::Regular,
            "\"../escape\" has a .. component",
        ),
        (b"ok/../../x", tar::EntryType::Regular, "has a .. component"),
        (
            b"/etc/evil",
            tar::EntryType::Regular,
            "\"/etc/evil\" has an absolute path",
        ),
        (
            b"caf\xe9",
            tar::EntryType::Regular,
            "\"caf\\xe9\" has a name that is not UTF-8",
        ),
        (b"hard", tar::EntryType::Link, "\"hard\" is a hard link"),
        (b"dev", tar::EntryType::Char, "\"dev\" is a device"),
    ] {
        let body = raw_tar(&[(entry, kind, b"x")]);
        let message = error(
            api.put(&format!("{files}/tar?path=/work/bad"), body),
            400,
            "invalid_argument",
        );
        assert!(message.contains(needle), "{message}");
    }
    let lines = api.exec(
        &id,
        "ls -A /work/bad; test ! -e /escape && test ! -e /etc/evil",
    );
    assert_eq!(exit_line(&lines)["code"], 0, "{lines:?}");
    assert_eq!(stream(&lines, "stdout"), "");
    let message = error(
        api.put(
            &format!("{files}/tar?path=/work/bad"),
            b"not a tar archive at all".repeat(40),
        ),
        400,
        "invalid_argument",
    );
    assert!(message.contains("tar"), "{message}");

    // Downloads: a missing directory is 404, a file 400, a name the API cannot carry 400.
    error(
        api.get(&format!("{files}/tar?path=/work/nope")),
        404,
        "not_found",
    );
    error(
        api.get(&format!("{files}/tar?path=/work/t/big")),
        400,
        "not_a_directory",
    );
    let lines = api.exec(
        &id,
        "mkdir /work/raw && : > \"/work/raw/$(printf 'x\\377y')\"",
    );
    assert_eq!(exit_line(&lines)["code"], 0, "{lines:?}");
    let message = error(
        api.get(&format!("{files}/tar?path=/work/raw")),
        400,
        "invalid_argument",
    );
    assert!(message.contains("not UTF-8"), "{message}");
}

/// A tar of `(name, kind, content or link target)` entries, mode 644.
fn tar_of(entries: &[(&str, tar::EntryType, &str)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, kind, data) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(*kind);
        header.set_mode(0o644);
        if kind.is_symlink() {
            header.set_size(0);
            builder.append_link(&mut header, name, data).unwrap();
        } else {
            header.set_size(data.len() as u64);
            builder
                .append_data(&mut header, name, data.as_bytes())
                .unwrap();
        }
    }
    builder.into_inner().unwrap()
}

#[test]
fn tar_uploads_make_symlinks_without_writing_through_them() {
    let (_env, _server, _key, api, id) = setup("tarlinks");
    let files = format!("/v1/sandboxes/{id}/files");
    let put = |dir: &str, body: Vec<u8>| api.put(&format!("{files}/tar?path={dir}"), body);
    let sh = |script: &str| {
        let lines = api.exec(&id, script);
        assert_eq!(exit_line(&lines)["code"], 0, "{script}: {lines:?}");
        stream(&lines, "stdout")
    };

    // Links are made with their targets as text, whatever they point at.
    let body = tar_of(&[
        ("up", tar::EntryType::Symlink, "../../../etc/passwd"),
        ("shadow", tar::EntryType::Symlink, "/etc/shadow"),
        ("d/rel", tar::EntryType::Symlink, "../f"),
        ("f", tar::EntryType::Regular, "file"),
        ("dangling", tar::EntryType::Symlink, "nowhere/at/all"),
    ]);
    let res = put("/work/l", body);
    assert_eq!(res.status(), 200);
    let done: Value = res.json().unwrap();
    assert_eq!(done, json!({ "files": 1, "bytes": 4 }));
    assert_eq!(
        sh("cd /work/l && readlink up shadow d/rel dangling && cat d/rel"),
        "../../../etc/passwd\n/etc/shadow\n../f\nnowhere/at/all\nfile"
    );
    // Reading through a link that climbs out stays inside the sandbox: its own passwd.
    let ours = api
        .get(&format!("{files}?path=/etc/passwd"))
        .bytes()
        .unwrap();
    let res = api.get(&format!("{files}?path=/work/l/up"));
    assert_eq!(res.status(), 200);
    assert_eq!(res.bytes().unwrap(), ours);
    // The sandbox has no /etc/shadow (the host image filters /etc), so neither has the link.
    error(
        api.get(&format!("{files}?path=/work/l/shadow")),
        404,
        "not_found",
    );
    let writes = events_of(&api, &id, "file.write");
    assert_eq!(writes.last().unwrap()["payload"]["files"], 1);

    // A file "through" a link of the same archive is refused, and nothing is written there.
    let body = tar_of(&[
        ("link", tar::EntryType::Symlink, "/etc"),
        ("link/planted", tar::EntryType::Regular, "pwned"),
    ]);
    let message = error(put("/work/slip", body), 400, "invalid_argument");
    assert!(
        message.contains("\"link/planted\" is inside \"link\""),
        "{message}"
    );
    let body = tar_of(&[
        ("a/link", tar::EntryType::Symlink, "../../.."),
        ("a/link/etc/planted", tar::EntryType::Regular, "pwned"),
    ]);
    let message = error(put("/work/slip", body), 400, "invalid_argument");
    assert!(message.contains("\"a/link\""), "{message}");
    assert_eq!(
        sh("readlink /work/slip/link /work/slip/a/link; \
            test ! -e /etc/planted && test ! -e /work/slip/a/link/etc/planted && echo clean"),
        "/etc\n../../..\nclean\n"
    );
    assert!(!std::path::Path::new("/etc/planted").exists());

    // A symlink, file or directory in the archive replaces what is at its name (a link is
    // removed, never followed), as GNU tar does.
    sh(
        "mkdir -p /work/r/real && echo keep > /work/r/real/kept && ln -s real /work/r/dirlink \
        && ln -s real/kept /work/r/filelink && echo old > /work/r/plain",
    );
    let body = tar_of(&[
        ("plain", tar::EntryType::Symlink, "real/kept"),
        ("filelink", tar::EntryType::Regular, "now a file"),
        ("dirlink/", tar::EntryType::Directory, ""),
        ("dirlink/inside", tar::EntryType::Regular, "in the new dir"),
    ]);
    assert_eq!(put("/work/r", body).status(), 200);
    assert_eq!(
        sh(
            "cd /work/r && readlink plain && cat plain filelink && test ! -L filelink \
            && test -d dirlink && test ! -L dirlink && cat dirlink/inside && ls real"
        ),
        "real/kept\nkeep\nnow a filein the new dirkept\n"
    );
    // A link made and later replaced by a directory in the same archive: then written into.
    let body = tar_of(&[
        ("x", tar::EntryType::Symlink, "/etc"),
        ("x/", tar::EntryType::Directory, ""),
        ("x/y", tar::EntryType::Regular, "y"),
    ]);
    assert_eq!(put("/work/r2", body).status(), 200);
    assert_eq!(
        sh("test -d /work/r2/x && test ! -L /work/r2/x && test ! -e /etc/y && cat /work/r2/x/y"),
        "y"
    );
}

#[test]
fn tar_uploads_stop_at_256_mib() {
    let (_env, server, key, api, id) = setup("tarbig");
    // Declared too large: refused before anything is read.
    let addr = server.url.trim_start_matches("http://");
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let head = format!(
        "PUT /v1/sandboxes/{id}/files/tar?path=/work/huge HTTP/1.1\r\nHost: {addr}\r\n\
         Authorization: Bearer {key}\r\nContent-Length: {}\r\n\r\n",
        300u64 << 20
    );
    conn.write_all(head.as_bytes()).unwrap();
    let mut answer = String::new();
    let _ = conn.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("body_too_large"), "{answer}");

    // Streamed (chunked, no length): refused once 256 MiB have arrived.
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let mut writer = conn.try_clone().unwrap();
    let head = format!(
        "PUT /v1/sandboxes/{id}/files/tar?path=/work/huge HTTP/1.1\r\nHost: {addr}\r\n\
         Authorization: Bearer {key}\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    let sender = std::thread::spawn(move || {
        let mut header = tar::Header::new_gnu();
        header.set_path("huge").unwrap();
        header.set_size(300 << 20);
        header.set_mode(0o644);
        header.set_cksum();
        writer.write_all(head.as_bytes())?;
        let mut chunk = |data: &[u8]| -> std::io::Result<()> {
            writer.write_all(format!("{:x}\r\n", data.len()).as_bytes())?;
            writer.write_all(data)?;
            writer.write_all(b"\r\n")
        };
        chunk(header.as_bytes())?;
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..300 {
            chunk(&zeros)?;
        }
        chunk(&[])
    });
    let mut answer = Vec::new();
    let _ = conn.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("body_too_large"), "{answer}");
    assert!(
        sender.join().unwrap().is_err(),
        "the server read the whole body"
    );
    // What arrived before the limit was extracted and recorded.
    let writes = events_of(&api, &id, "file.write");
    let write = writes.first().expect("a file.write event");
    assert_eq!(write["payload"]["path"], "/work/huge");
}

/// `KEY` of the host's os-release.
fn host_os_release(key: &str) -> String {
    let text = std::fs::read_to_string("/etc/os-release")
        .or_else(|_| std::fs::read_to_string("/usr/lib/os-release"))
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap()
}

fn host_output(cmd: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(cmd).args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn the_environment_manifest_describes_the_sandbox() {
    let env = Env::new();
    let key = key(&env, "envm");
    let server = Server::start(&env);
    let api = Api::new(&server, &key);
    let created = api.create(json!({ "memory": "256M", "cpus": "0.5", "pids": 128 }));
    let id = created["id"].as_str().unwrap();
    let path = format!("/v1/sandboxes/{id}/environment");

    let res = api.get(&path);
    assert_eq!(res.status(), 200);
    let manifest: Value = res.json().unwrap();
    assert_eq!(manifest["os"]["id"], host_os_release("ID"), "{manifest}");
    assert_eq!(manifest["os"]["version_id"], host_os_release("VERSION_ID"));
    assert_eq!(manifest["arch"], host_output("uname", &["-m"]));
    assert_eq!(manifest["kernel"], host_output("uname", &["-r"]));
    assert_eq!(manifest["hostname"], id);
    assert_eq!(manifest["user"], "root");
    assert_eq!(manifest["limits"], created["limits"]);
    assert_eq!(manifest["limits"]["memory_bytes"], 256u64 << 20);
    assert_eq!(manifest["limits"]["cpu_millis"], 500);
    assert_eq!(manifest["limits"]["pids"], 128);
    assert_eq!(
        manifest["network"],
        json!({ "policy": "none", "loopback": true })
    );
    let dirs: Vec<&str> = manifest["path"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    assert!(
        dirs.contains(&"/usr/bin") || dirs.contains(&"/bin"),
        "{dirs:?}"
    );
    let tools = manifest["tools"].as_array().unwrap();
    let tool = |name: &str| {
        tools
            .iter()
            .find(|t| t["name"] == name)
            .unwrap_or_else(|| panic!("{name} not found in {tools:?}"))
    };
    assert!(tool("sh")["path"].as_str().unwrap().ends_with("/sh"));
    let python = tool("python3");
    // The sandbox's root is the host's (image "host"): the same file answers the same.
    let host_python = host_output(python["path"].as_str().unwrap(), &["--version"]);
    assert_eq!(
        Some(format!("Python {}", python["version"].as_str().unwrap())),
        Some(host_python),
        "{python}"
    );
    assert!(!tools.iter().any(|t| t["name"] == "no-such-tool"));

    // Answered from the cache until refreshed; the probe shows in the timeline.
    let probes = |api: &Api| {
        api.event_kinds(id)
            .iter()
            .filter(|k| *k == "process.exec")
            .count()
    };
    assert_eq!(probes(&api), 1);
    let again: Value = api.get(&path).json().unwrap();
    assert_eq!(again, manifest);
    assert_eq!(probes(&api), 1);
    let lines = api.exec(id, "mkdir -p /usr/local/bin && printf '#!/bin/sh\\necho uv 9.8.7\\n' > /usr/local/bin/uv && chmod +x /usr/local/bin/uv");
    assert_eq!(exit_line(&lines)["code"], 0, "{lines:?}");
    let fresh: Value = api.get(&format!("{path}?refresh=true")).json().unwrap();
    let uv = fresh["tools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "uv")
        .expect("uv after refresh");
    assert_eq!(uv["version"], "9.8.7");
    assert_eq!(uv["path"], "/usr/local/bin/uv");

    error(
        api.get(&format!("{path}?refresh=maybe")),
        400,
        "invalid_argument",
    );
    let other = Api::new(&server, &common::server::key(&env, "other"));
    error(other.get(&path), 404, "not_found");
}

#[test]
fn stalled_tar_transfers_are_bounded_per_key_and_give_their_place_back() {
    let (env, server, key, api, id) = setup("tarstall");
    let addr = server.url.trim_start_matches("http://").to_string();
    let path = format!("/v1/sandboxes/{id}/files/tar?path=/work/up");
    let small = raw_tar(&[(b"f", tar::EntryType::Regular, b"x")]);
    let upload = |api: &Api, path: &str| {
        api.req(reqwest::Method::PUT, path)
            .body(small.clone())
            .send()
            .unwrap()
    };
    // Uploads whose body never comes: each holds a thread of the pool the database shares.
    // One more than a key may run: that one is refused at once, once the others hold theirs.
    let mut stalled: Vec<TcpStream> = (0..9)
        .map(|_| {
            let mut conn = TcpStream::connect(&addr).unwrap();
            let head = format!(
                "PUT {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n\
                 Content-Length: 1048576\r\n\r\n"
            );
            conn.write_all(head.as_bytes()).unwrap();
            conn.set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            conn
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    let (index, answer) = 'answered: loop {
        for (i, conn) in stalled.iter_mut().enumerate() {
            let mut head = [0u8; 12];
            if let Ok(n @ 1..) = conn.read(&mut head) {
                break 'answered (i, String::from_utf8_lossy(&head[..n]).into_owned());
            }
        }
        assert!(
            Instant::now() < deadline,
            "a key's transfers are not bounded"
        );
    };
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    stalled.remove(index);
    // So does any other transfer of this key, with Retry-After.
    let refused = upload(&api, &path);
    assert!(refused.headers().contains_key("retry-after"));
    error(refused, 429, "too_many_requests");
    // Another key still transfers, and the rest of the API answers.
    let other = Api::new(&server, &common::server::key(&env, "other"));
    let theirs = other.create(json!({}))["id"].as_str().unwrap().to_string();
    let res = upload(
        &other,
        &format!("/v1/sandboxes/{theirs}/files/tar?path=/work/up"),
    );
    assert_eq!(res.status(), 200);
    assert_eq!(api.get("/v1/sandboxes").status(), 200);
    // Clients that leave give their places back.
    drop(stalled);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let res = upload(&api, &path);
        if res.status() == 200 {
            break;
        }
        assert_eq!(res.status(), 429);
        assert!(
            Instant::now() < deadline,
            "the stalled uploads kept their places"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_download_refuses_more_names_than_it_may_hold() {
    let (_env, _server, _key, api, id) = setup("tarnames");
    // Short names deep down: every entry's relative name repeats its ~3.8 kB of parents, so
    // 10 000 empty files would make the server hold ~38 MB of names.
    let lines = api.exec(
        &id,
        "set -e; mkdir -p /work/deep; cd /work/deep; n=$(printf 'a%.0s' $(seq 250)); \
         for i in $(seq 15); do mkdir $n; cd $n; done; \
         for d in b1 b2; do mkdir $d; i=0; \
           while [ $i -lt 5000 ]; do : > $d/f$i; i=$((i+1)); done; done",
    );
    assert_eq!(exit_line(&lines)["code"], 0, "{lines:?}");
    let res = api.get(&format!("/v1/sandboxes/{id}/files/tar?path=/work/deep"));
    let message = error(res, 413, "too_large");
    assert!(message.contains("names"), "{message}");
    // A tree within the limits still comes.
    let res = api.get(&format!("/v1/sandboxes/{id}/files/tar?path=/work"));
    assert_eq!(res.status(), 413);
    let lines = api.exec(&id, "mkdir -p /work/small && echo hi > /work/small/f");
    assert_eq!(exit_line(&lines)["code"], 0);
    let res = api.get(&format!("/v1/sandboxes/{id}/files/tar?path=/work/small"));
    assert_eq!(res.status(), 200);
    let entries = tar_entries(&res.bytes().unwrap());
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].3, b"hi\n");
}
