//! `openrun serve` under stress: `kill -9` in the middle of a streaming exec and of creates
//! (nothing lost, nothing leaked), and 200 concurrent exec streams (every byte of every stream,
//! none hung, bounded server memory). Root only (CI runs as root).

mod common;
use common::server::*;
use common::*;

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// SIGKILLs the server and waits for it to be gone.
fn kill_9(mut server: Server) {
    server.child.kill().expect("SIGKILL the server");
    server.child.wait().expect("reap the server");
}

/// Events of a sandbox with `kind`.
fn events_of(api: &Api, id: &str, kind: &str) -> Vec<Value> {
    let res = api.get(&format!("/v1/sandboxes/{id}/events"));
    assert_eq!(res.status(), 200);
    let events: Vec<Value> = res.json().expect("events");
    events.into_iter().filter(|e| e["kind"] == kind).collect()
}

/// Asserts that a data dir holds no sandbox, layer, cgroup or mount any more.
fn assert_no_leaks(env: &Env, ids: &[String]) {
    assert_eq!(env.live_ids(), Vec::<String>::new(), "sandboxes still live");
    assert_eq!(env.leftovers(), Vec::<std::path::PathBuf>::new());
    let cgroups = openrun_cgroups();
    for id in ids {
        assert!(
            !cgroups.iter().any(|c| c.ends_with(id.as_str())),
            "cgroup of {id} left: {cgroups:?}"
        );
    }
    // The data dir's disk pool (the server's default disk quota) stays mounted for the next
    // sandbox until the data dir goes; nothing of a sandbox may.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let data = env.data_dir().to_string_lossy().into_owned();
    let pool = env
        .data_dir()
        .join("disk-pool")
        .to_string_lossy()
        .into_owned();
    let left: Vec<&str> = mounts
        .lines()
        .filter(|l| l.contains(&data))
        .filter(|l| l.split(' ').nth(4) != Some(pool.as_str()))
        .collect();
    assert!(
        left.is_empty(),
        "mounts under the data dir are left: {left:?}"
    );
}

/// The command of the restart test: 4000 numbered lines, paced so the server can be killed
/// halfway, then a line on stderr and exit status 7.
const PACED: &str = "i=1; while [ $i -le 4000 ]; do echo \"line $i\"; \
    if [ $((i % 400)) = 0 ]; then sleep 0.15; fi; i=$((i+1)); done; echo done >&2; exit 7";

fn paced_stdout() -> Vec<u8> {
    (1..=4000)
        .map(|i| format!("line {i}\n"))
        .collect::<String>()
        .into_bytes()
}

#[test]
fn kill_9_during_a_streaming_exec_loses_no_byte_and_leaks_nothing() {
    let env = Env::new();
    let api_key = key(&env, "restart");
    let server = Server::start(&env);
    let api = Api::new(&server, &api_key);
    let id = api.create(json!({}))["id"].as_str().unwrap().to_string();

    // Stream until some output has arrived, then kill the server under the client's feet.
    let res = api.post(
        &format!("/v1/sandboxes/{id}/exec"),
        &json!({ "cmd": ["sh", "-c", PACED] }).to_string(),
    );
    assert_eq!(res.status(), 200);
    let mut reader = BufReader::new(res);
    let mut pid = None;
    let mut seen = 0;
    let mut line = String::new();
    while seen < 3 {
        line.clear();
        assert!(
            reader.read_line(&mut line).expect("read a line") > 0,
            "stream ended early"
        );
        let v: Value = serde_json::from_str(&line).expect("NDJSON");
        match v["type"].as_str() {
            Some("started") => pid = v["pid"].as_i64(),
            Some("stdout") => seen += 1,
            other => panic!("unexpected line {other:?}: {line}"),
        }
    }
    let pid = pid.expect("started line");
    kill_9(server);
    // The client sees the stream end without an exit line: it must not hang.
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut reader, &mut rest);
    assert!(
        !rest.contains("\"exit\""),
        "the killed server sent an exit: {rest}"
    );

    let server = Server::start(&env);
    let api = Api::new(&server, &api_key);
    let got: Value = api.get(&format!("/v1/sandboxes/{id}")).json().unwrap();
    assert_eq!(got["state"], "running", "{got}");
    // Re-reading from offset 0 gives every byte, then the exit.
    let res = api.get(&format!(
        "/v1/sandboxes/{id}/processes/{pid}/output?stdout_since=0&stderr_since=0&follow=true"
    ));
    assert_eq!(res.status(), 200);
    let lines = ndjson(&res.text().expect("output"));
    assert_eq!(bytes_from(&lines, "stdout", 0), paced_stdout());
    assert_eq!(bytes_from(&lines, "stderr", 0), b"done\n");
    assert_eq!(exit_line(&lines)["code"], 7);

    // The timeline has the exec and, once, its exit, though the server that started it died.
    assert_eq!(events_of(&api, &id, "process.exec").len(), 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    let exits = loop {
        let exits = events_of(&api, &id, "process.exit");
        if !exits.is_empty() || Instant::now() > deadline {
            break exits;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(exits.len(), 1, "{exits:?}");
    assert_eq!(exits[0]["payload"]["code"], 7);

    assert_eq!(api.delete(&format!("/v1/sandboxes/{id}")).status(), 204);
    let server_pid = server.pid();
    server.stop();
    assert!(zombies_of(server_pid).is_empty());
    assert_no_leaks(&env, &[id]);
}

#[test]
fn kill_9_during_creates_leaves_no_half_created_sandbox() {
    let env = Env::new();
    let api_key = key(&env, "creates");
    let server = Server::start_cold(&env);
    let url = server.url.clone();
    // Fire creates and kill the server while they are in flight.
    let clients: Vec<_> = (0..12)
        .map(|_| {
            let (url, key) = (url.clone(), api_key.clone());
            std::thread::spawn(move || {
                reqwest::blocking::Client::new()
                    .post(format!("{url}/v1/sandboxes"))
                    .bearer_auth(key)
                    .body("{}")
                    .send()
                    .ok()
                    .map(|r| r.status().as_u16())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(15));
    kill_9(server);
    let answers: Vec<Option<u16>> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    // The scenario must really have cut creates off, or it proves nothing.
    assert!(
        answers.iter().any(Option::is_none),
        "every create was answered before the kill: {answers:?}"
    );
    // Let helpers that were mid-fork finish what they were doing.
    std::thread::sleep(Duration::from_millis(500));

    let server = Server::start_cold(&env);
    let api = Api::new(&server, &api_key);
    let listed: Vec<Value> = api.get("/v1/sandboxes").json().expect("list");
    let states: Vec<(String, String)> = listed
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().into(),
                s["state"].as_str().unwrap().into(),
            )
        })
        .collect();
    // Every live sandbox of the data dir is a running one of the API, and no record says
    // `creating` any more.
    let live = env.live_ids();
    for id in &live {
        assert!(
            states.iter().any(|(i, s)| i == id && s == "running"),
            "live sandbox {id} is not a running API sandbox: {states:?}"
        );
    }
    for (id, state) in &states {
        assert_ne!(state, "creating", "{id} is still creating after a restart");
        if state == "running" {
            assert!(live.contains(id), "{id} is said running but does not exist");
        }
    }
    let ids: Vec<String> = states.iter().map(|(i, _)| i.clone()).collect();
    for (id, state) in &states {
        if state == "running" {
            assert_eq!(api.delete(&format!("/v1/sandboxes/{id}")).status(), 204);
        }
    }
    server.stop();
    assert_no_leaks(&env, &ids);
}

/// Each stream's expected stdout: 3000 lines naming the stream (about 60 KB).
fn load_output(n: usize) -> Vec<u8> {
    (1..=3000)
        .map(|i| format!("stream {n} line {i}\n"))
        .collect::<String>()
        .into_bytes()
}

/// Peak resident memory of a process, in KiB.
fn peak_rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

#[test]
fn two_hundred_concurrent_exec_streams_deliver_every_byte() {
    const STREAMS: usize = 200;
    let env = Env::new();
    let api_key = key(&env, "load");
    let server = Server::start(&env);
    let api = Api::new(&server, &api_key);
    let ids: Vec<String> = (0..4)
        .map(|_| api.create(json!({}))["id"].as_str().unwrap().to_string())
        .collect();
    let start = std::sync::Arc::new(std::sync::Barrier::new(STREAMS));
    let workers: Vec<_> = (0..STREAMS)
        .map(|n| {
            let (url, key, id) = (server.url.clone(), api_key.clone(), ids[n % ids.len()].clone());
            let start = start.clone();
            std::thread::spawn(move || {
                let script = format!(
                    "i=1; while [ $i -le 3000 ]; do echo \"stream {n} line $i\"; i=$((i+1)); done; echo e{n} >&2"
                );
                let http = reqwest::blocking::Client::builder()
                    .timeout(Duration::from_secs(240))
                    .build()
                    .expect("client");
                start.wait();
                let res = http
                    .post(format!("{url}/v1/sandboxes/{id}/exec"))
                    .bearer_auth(key)
                    .body(json!({ "cmd": ["sh", "-c", script] }).to_string())
                    .send()
                    .unwrap_or_else(|e| panic!("stream {n}: {e}"));
                assert_eq!(res.status(), 200, "stream {n}");
                let lines = ndjson(&res.text().unwrap_or_else(|e| panic!("stream {n}: {e}")));
                assert_eq!(
                    bytes_from(&lines, "stdout", 0),
                    load_output(n),
                    "stream {n} stdout"
                );
                assert_eq!(
                    bytes_from(&lines, "stderr", 0),
                    format!("e{n}\n").into_bytes(),
                    "stream {n} stderr"
                );
                assert_eq!(exit_line(&lines)["code"], 0, "stream {n}");
            })
        })
        .collect();
    let mut failed = 0;
    for w in workers {
        if w.join().is_err() {
            failed += 1;
        }
    }
    assert_eq!(failed, 0, "{failed} of {STREAMS} streams failed");

    // 200 streams of ~60 KB each went through; the server must not have held them all.
    let peak = peak_rss_kib(server.pid());
    eprintln!("server peak RSS after {STREAMS} streams: {peak} KiB");
    assert!(peak < 200 * 1024, "server peak RSS {peak} KiB");
    let exits: usize = ids
        .iter()
        .map(|id| events_of(&api, id, "process.exit").len())
        .sum();
    assert_eq!(exits, STREAMS, "every stream's exit is on the timeline");
    for id in &ids {
        assert_eq!(api.delete(&format!("/v1/sandboxes/{id}")).status(), 204);
    }
    server.stop();
    assert_no_leaks(&env, &ids);
}

/// A command's `process.exec` must be on the disk before anyone is told it started: when its
/// sync fails (here the database's WAL file is deleted under the server, so it cannot be
/// synced), the command is killed, an attached client gets an `error` line saying so and no
/// `started` line, a background start gets a 500, and nothing of either keeps running.
#[test]
fn a_command_whose_record_cannot_be_synced_is_stopped_and_reported() {
    let env = Env::new();
    let server = Server::start_cold(&env);
    let api = Api::new(&server, &key(&env, "sync"));
    let id = api.create(json!({}))["id"].as_str().unwrap().to_string();
    assert_eq!(exit_line(&api.exec(&id, "true"))["code"], 0);
    let idle = cgroup_procs(&id);
    std::fs::remove_file(env.data_dir().join("openrun.db-wal")).expect("the WAL exists");

    let lines = api.exec(&id, "sleep 30");
    let last = lines.last().expect("lines");
    assert_eq!(last["type"], "error", "{lines:?}");
    assert_eq!(last["code"], "internal");
    let stopped = "the command was stopped: the server could not record it on its disk";
    assert_eq!(last["message"], stopped);
    assert!(!lines.iter().any(|l| l["type"] == "started"), "{lines:?}");

    let res = api.post(
        &format!("/v1/sandboxes/{id}/exec"),
        &json!({"cmd": ["sleep", "30"], "background": true}).to_string(),
    );
    assert_eq!(error(res, 500, "internal"), stopped);

    let deadline = Instant::now() + Duration::from_secs(10);
    while cgroup_procs(&id) != idle {
        assert!(
            Instant::now() < deadline,
            "still running in the sandbox: {:?} (idle: {idle:?})",
            cgroup_procs(&id)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
