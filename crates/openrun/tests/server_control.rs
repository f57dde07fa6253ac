//! The sandbox control plane over real HTTP: labels, owner and environment, filtered and paged
//! lists, TTL changes, pause and resume, the `creating` state and start-up reconciliation, the
//! live event stream, and exit events of background processes.

mod common;
use common::server::*;
use common::*;

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn enc_query(s: &str) -> String {
    enc(s)
}

/// `GET path`, asserting 200; returns the JSON array and the `X-Next-Cursor` header.
fn page(api: &Api, path: &str) -> (Vec<Value>, Option<String>) {
    let res = api.get(path);
    assert_eq!(res.status(), 200, "{path}");
    let next = res
        .headers()
        .get("x-next-cursor")
        .map(|v| v.to_str().unwrap().to_string());
    (res.json().unwrap(), next)
}

/// Creates a sandbox; returns its id.
fn sandbox(api: &Api, body: Value) -> String {
    api.create(body)["id"].as_str().unwrap().to_string()
}

fn ids_of(list: &[Value]) -> Vec<String> {
    list.iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn labels_owner_and_env_are_kept_and_lists_filter_and_page() {
    let env = Env::new();
    let server = Server::start(&env);
    let api = Api::new(&server, &key(&env, "ci-bot"));
    let other = Api::new(&server, &key(&env, "someone-else"));

    let a = api.create(json!({
        "labels": {"team": "a", "app.kind/x-y_z": "web"},
        "env": {"GREETING": "hi there"},
    }));
    assert_eq!(a["owner"], "ci-bot");
    assert_eq!(a["labels"], json!({"team": "a", "app.kind/x-y_z": "web"}));
    assert_eq!(a["env"], json!({"GREETING": "hi there"}));
    assert_eq!(a["state"], "running");
    let a_id = a["id"].as_str().unwrap().to_string();
    // The environment reaches every process.
    let out = api.exec(&a_id, "echo \"$GREETING\"");
    assert_eq!(stream(&out, "stdout"), "hi there\n");
    // GET answers the same resource.
    let got: Value = api.get(&format!("/v1/sandboxes/{a_id}")).json().unwrap();
    assert_eq!(got["labels"], a["labels"]);
    assert_eq!(got["owner"], "ci-bot");

    let b = api.create(json!({"labels": {"team": "b"}}));
    let c = api.create(json!({"labels": {"team": "a", "tier": "2"}}));
    let (b_id, c_id) = (b["id"].as_str().unwrap(), c["id"].as_str().unwrap());
    other.create(json!({"labels": {"team": "a"}}));

    let (all, next) = page(&api, "/v1/sandboxes");
    assert_eq!(ids_of(&all), [a_id.as_str(), b_id, c_id], "oldest first");
    assert_eq!(next, None);
    let (team_a, _) = page(&api, "/v1/sandboxes?label=team=a");
    assert_eq!(ids_of(&team_a), [a_id.as_str(), c_id]);
    let (both, _) = page(
        &api,
        &format!("/v1/sandboxes?label={}&label=tier%3D2", enc_query("team=a")),
    );
    assert_eq!(ids_of(&both), [c_id]);
    let (none, _) = page(&api, "/v1/sandboxes?label=team=z");
    assert!(none.is_empty());
    let (running, _) = page(&api, "/v1/sandboxes?state=running&label=team=a");
    assert_eq!(running.len(), 2);
    let (stopped, _) = page(&api, "/v1/sandboxes?state=stopped");
    assert!(stopped.is_empty());

    // Pages of 2 with a cursor, then the rest.
    let (first, next) = page(&api, "/v1/sandboxes?limit=2");
    assert_eq!(ids_of(&first), [a_id.as_str(), b_id]);
    let cursor = next.expect("a cursor when more remain");
    let (second, next) = page(&api, &format!("/v1/sandboxes?limit=2&cursor={cursor}"));
    assert_eq!(ids_of(&second), [c_id]);
    assert_eq!(next, None, "no cursor on the last page");
    let (exact, next) = page(&api, "/v1/sandboxes?limit=3");
    assert_eq!(exact.len(), 3);
    assert_eq!(next, None, "a full last page has no cursor");

    // Bad input: labels at create, filters, limits, cursors.
    let bad_create = |body: Value, needle: &str| {
        let res = api.post("/v1/sandboxes", &body.to_string());
        let message = error(res, 400, "invalid_argument");
        assert!(message.contains(needle), "{message:?} lacks {needle:?}");
    };
    bad_create(json!({"labels": {"": "x"}}), "label key");
    bad_create(json!({"labels": {"a b": "x"}}), "label key");
    bad_create(json!({"labels": {"k".repeat(64): "x"}}), "label key");
    bad_create(json!({"labels": {"k": "v".repeat(257)}}), "at most 256");
    bad_create(json!({"labels": {"k": "a\u{0}b"}}), "NUL");
    let many: serde_json::Map<String, Value> =
        (0..65).map(|i| (format!("k{i}"), json!("v"))).collect();
    bad_create(json!({ "labels": many }), "too many labels");
    bad_create(json!({"labels": ["team"]}), "invalid request body");
    let bad_list = |query: &str, needle: &str| {
        let message = error(
            api.get(&format!("/v1/sandboxes?{query}")),
            400,
            "invalid_argument",
        );
        assert!(message.contains(needle), "{message:?} lacks {needle:?}");
    };
    bad_list("label=team", "KEY=VALUE");
    bad_list("label=a%20b=c", "label key");
    bad_list("state=sleeping", "state");
    bad_list("limit=0", "limit");
    bad_list("limit=1001", "limit");
    bad_list("limit=x", "limit");
    bad_list("cursor=not-a-cursor!", "cursor");
    bad_list("cursor=Zm9v", "cursor"); // "foo" in base64: well-formed, but no position
    bad_list("colour=red", "unknown query parameter");
    // Every sandbox created above is still running (none was made by a refused create).
    assert_eq!(page(&api, "/v1/sandboxes").0.len(), 3);
    assert_eq!(page(&other, "/v1/sandboxes").0.len(), 1);
}

/// Polls until `done` holds (at most `secs` seconds).
fn wait_for(secs: u64, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn state_of(api: &Api, id: &str) -> Value {
    let res = api.get(&format!("/v1/sandboxes/{id}"));
    assert_eq!(res.status(), 200);
    res.json::<Value>().unwrap()["state"].clone()
}

#[test]
fn a_ttl_is_extended_past_the_first_deadline_and_shortened_again() {
    let env = Env::new();
    let server = Server::start(&env);
    let api = Api::new(&server, &key(&env, "ttl"));
    let other = Api::new(&server, &key(&env, "other"));
    let sb = api.create(json!({"ttl": "2s"}));
    let id = sb["id"].as_str().unwrap().to_string();
    let ttl_path = format!("/v1/sandboxes/{id}/ttl");

    // Bad bodies name the problem; nothing changes.
    for (body, needle) in [
        (json!({"ttl": "0s"}), "greater than zero"),
        (json!({"ttl": "soon"}), "soon"),
        (json!({"ttl": "-5m"}), "-5m"),
        (json!({}), "ttl"),
        (json!({"ttl": 30}), "invalid request body"),
        (json!({"ttl": "1m", "extra": 1}), "extra"),
    ] {
        let message = error(
            api.post(&ttl_path, &body.to_string()),
            400,
            "invalid_argument",
        );
        assert!(message.contains(needle), "{message:?} lacks {needle:?}");
    }
    // Another tenant cannot see it: 404, the same as a missing sandbox.
    for action in ["ttl", "pause", "resume"] {
        let path = format!("/v1/sandboxes/{id}/{action}");
        error(other.post(&path, r#"{"ttl":"1h"}"#), 404, "not_found");
    }
    error(
        api.post("/v1/sandboxes/000000000000/ttl", r#"{"ttl":"1h"}"#),
        404,
        "not_found",
    );

    let before = Instant::now();
    let res = api.post(&ttl_path, r#"{"ttl":"1m"}"#);
    assert_eq!(res.status(), 200);
    let extended: Value = res.json().unwrap();
    assert!(
        extended["expires_at"].as_str() > sb["expires_at"].as_str(),
        "{extended}"
    );
    // The runtime record carries the new deadline (so no `openrun` listing kills it).
    let record = env.inspect(&id);
    let expires_ms = record["expires_at_ms"].as_u64().unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let elapsed = before.elapsed().as_millis() as u64;
    assert!(
        expires_ms + elapsed + 1_000 >= now_ms + 60_000 && expires_ms <= now_ms + 60_000,
        "record deadline {expires_ms}, now {now_ms}"
    );
    // Past the first deadline it still runs: neither the agent's timer nor the reaper ended it.
    std::thread::sleep(Duration::from_millis(3_000));
    assert_eq!(state_of(&api, &id), "running");
    let out = api.exec(&id, "echo alive");
    assert_eq!(stream(&out, "stdout"), "alive\n");
    assert!(env.live_ids().contains(&id));

    // Shortened: it ends at the new deadline.
    let res = api.post(&ttl_path, r#"{"ttl":"1s"}"#);
    assert_eq!(res.status(), 200);
    wait_for(10, "the shortened TTL", || state_of(&api, &id) == "stopped");
    assert!(!env.live_ids().contains(&id));
    let kinds = api.event_kinds(&id);
    assert_eq!(
        kinds.iter().filter(|k| *k == "sandbox.ttl").count(),
        2,
        "{kinds:?}"
    );
    assert_eq!(
        kinds.last().map(String::as_str),
        Some("sandbox.expire"),
        "{kinds:?}"
    );
    let events: Vec<Value> = api
        .get(&format!("/v1/sandboxes/{id}/events"))
        .json()
        .unwrap();
    let ttl_event = events.iter().find(|e| e["kind"] == "sandbox.ttl").unwrap();
    assert_eq!(ttl_event["payload"]["ttl_ms"], 60_000);
    assert_eq!(ttl_event["actor"], "agent");
    // A stopped sandbox's TTL cannot change.
    error(
        api.post(&ttl_path, r#"{"ttl":"1m"}"#),
        409,
        "sandbox_not_running",
    );
    // A deleted one is gone.
    assert_eq!(api.delete(&format!("/v1/sandboxes/{id}")).status(), 204);
    error(api.post(&ttl_path, r#"{"ttl":"1m"}"#), 404, "not_found");
}

/// Size of the file the counter loop appends to, read on the host (it works while paused).
fn counter(env: &Env, id: &str) -> u64 {
    let upper = env.inspect(id)["upper_dir"].as_str().unwrap().to_string();
    std::fs::metadata(std::path::Path::new(&upper).join("counter"))
        .map(|m| m.len())
        .unwrap_or(0)
}

#[test]
fn a_paused_sandbox_is_frozen_refuses_work_and_resumes() {
    let env = Env::new();
    let server = Server::start(&env);
    let api = Api::new(&server, &key(&env, "pauser"));
    let id = sandbox(&api, json!({}));
    let pid = api.background(
        &id,
        json!({"cmd": ["sh", "-c", "while :; do echo x >> /counter; done"], "background": true}),
    );
    wait_for(5, "the counter", || counter(&env, &id) > 0);

    let res = api.post(&format!("/v1/sandboxes/{id}/pause"), "");
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().unwrap()["state"], "paused");
    // Pausing again is fine and changes nothing.
    let res = api.post(&format!("/v1/sandboxes/{id}/pause"), "");
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().unwrap()["state"], "paused");
    assert_eq!(state_of(&api, &id), "paused");
    let frozen = counter(&env, &id);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(counter(&env, &id), frozen, "a paused sandbox kept running");
    let (paused, _) = page(&api, "/v1/sandboxes?state=paused");
    assert_eq!(ids_of(&paused), [id.as_str()]);

    // Work inside a paused sandbox is refused at once, not left hanging.
    let started = Instant::now();
    let res = api.post(&format!("/v1/sandboxes/{id}/exec"), r#"{"cmd":["true"]}"#);
    let message = error(res, 409, "sandbox_paused");
    assert!(message.contains("resume"), "{message}");
    for path in [
        "files?path=/counter",
        "processes",
        &format!("processes/{pid}/output"),
    ] {
        let res = api.get(&format!("/v1/sandboxes/{id}/{path}"));
        error(res, 409, "sandbox_paused");
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    // Its TTL can still change.
    let res = api.post(&format!("/v1/sandboxes/{id}/ttl"), r#"{"ttl":"1h"}"#);
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().unwrap()["state"], "paused");

    let res = api.post(&format!("/v1/sandboxes/{id}/resume"), "");
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().unwrap()["state"], "running");
    let res = api.post(&format!("/v1/sandboxes/{id}/resume"), "");
    assert_eq!(res.status(), 200, "resuming a running sandbox is fine");
    wait_for(5, "the counter to move again", || {
        counter(&env, &id) > frozen
    });
    let out = api.exec(&id, "echo back");
    assert_eq!(stream(&out, "stdout"), "back\n");
    let kinds = api.event_kinds(&id);
    let lifecycle: Vec<&str> = kinds
        .iter()
        .map(String::as_str)
        .filter(|k| k.starts_with("sandbox."))
        .collect();
    assert_eq!(
        lifecycle,
        [
            "sandbox.create",
            "sandbox.pause",
            "sandbox.ttl",
            "sandbox.resume"
        ],
        "one event per change, none for the repeated calls"
    );

    // A paused sandbox is deleted like any other, and then is a 404.
    api.post(&format!("/v1/sandboxes/{id}/pause"), "");
    assert_eq!(api.delete(&format!("/v1/sandboxes/{id}")).status(), 204);
    assert!(!env.live_ids().contains(&id));
    error(
        api.post(&format!("/v1/sandboxes/{id}/pause"), ""),
        404,
        "not_found",
    );
    error(
        api.post(&format!("/v1/sandboxes/{id}/resume"), ""),
        404,
        "not_found",
    );
}

#[test]
fn the_ttl_reaper_destroys_paused_sandboxes_too() {
    let env = Env::new();
    let server = Server::start(&env);
    let api = Api::new(&server, &key(&env, "reaped"));
    let id = sandbox(&api, json!({"ttl": "2s"}));
    let res = api.post(&format!("/v1/sandboxes/{id}/pause"), "");
    assert_eq!(res.status(), 200);
    wait_for(10, "the reaper", || state_of(&api, &id) == "stopped");
    assert!(!env.live_ids().contains(&id));
    let kinds = api.event_kinds(&id);
    assert_eq!(
        kinds.last().map(String::as_str),
        Some("sandbox.expire"),
        "{kinds:?}"
    );
    error(
        api.post(&format!("/v1/sandboxes/{id}/pause"), ""),
        409,
        "sandbox_not_running",
    );
}

#[test]
fn a_server_stopped_mid_create_leaves_nothing_half_made() {
    use openrun_runtime::{ImageSource, Runtime, SandboxSpec};
    let env = Env::new();
    let server = Server::start(&env);
    let key = key(&env, "mid");
    let api = Api::new(&server, &key);
    let kept = sandbox(&api, json!({}));
    // A sandbox of the CLI in the same data dir: the server never touches it.
    let cli = env.create(&[]);
    server.stop();

    // What a server stopped mid-create leaves: `creating` rows under the ids it chose, one
    // whose sandbox was made (by the helper, with that id) and one whose sandbox never was.
    let (half, never) = ("0123456789ab", "ba9876543210");
    let runtime = Runtime::open(env.data_dir()).unwrap();
    let helper = std::path::Path::new(env!("CARGO_BIN_EXE_openrun"));
    let mut spec = SandboxSpec::new(ImageSource::Host);
    spec.id = Some(half.into());
    let made = runtime.create_with_helper(&spec, helper).unwrap();
    assert_eq!(made.id(), half);
    // An id in use is refused, and the sandbox holding it is left alone.
    assert!(runtime.create_with_helper(&spec, helper).is_err());
    assert!(env.live_ids().contains(&half.to_string()));
    let db = rusqlite::Connection::open(env.data_dir().join("openrun.db")).unwrap();
    let tenant: String = db
        .query_row("SELECT tenant FROM api_keys WHERE name = 'mid'", [], |r| {
            r.get(0)
        })
        .unwrap();
    for id in [half, never] {
        db.execute(
            "INSERT INTO sandboxes (id, tenant, owner, image, limits_json, state, created_at)
             VALUES (?1, ?2, 'mid', 'host', '{}', 'creating', 1)",
            [id, &tenant],
        )
        .unwrap();
    }
    drop(db);

    let server = Server::start(&env);
    let api = Api::new(&server, &key);
    let live = env.live_ids();
    assert!(
        !live.contains(&half.to_string()),
        "the half-made sandbox is left"
    );
    assert!(live.contains(&kept) && live.contains(&cli), "{live:?}");
    for (id, removed) in [(half, true), (never, false)] {
        assert_eq!(state_of(&api, id), "error");
        let events: Vec<Value> = api
            .get(&format!("/v1/sandboxes/{id}/events"))
            .json()
            .unwrap();
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0]["kind"], "sandbox.error");
        assert_eq!(events[0]["actor"], "system");
        assert_eq!(events[0]["payload"]["removed"], removed);
    }
    let (errors, _) = page(&api, "/v1/sandboxes?state=error");
    assert_eq!(ids_of(&errors), [half, never]);
    assert_eq!(state_of(&api, &kept), "running");
    assert_eq!(stream(&api.exec(&kept, "echo ok"), "stdout"), "ok\n");
    // An error sandbox cannot be used, and is deleted like any other.
    error(
        api.post(&format!("/v1/sandboxes/{half}/exec"), r#"{"cmd":["true"]}"#),
        409,
        "sandbox_not_running",
    );
    assert_eq!(api.delete(&format!("/v1/sandboxes/{half}")).status(), 204);
    error(api.get(&format!("/v1/sandboxes/{half}")), 404, "not_found");
    // A restart changes nothing more.
    drop(server);
    let server = Server::start(&env);
    let api = Api::new(&server, &key);
    assert_eq!(api.event_kinds(never), ["sandbox.error"]);
    assert!(env.live_ids().contains(&cli));
}

/// Reads the next NDJSON line of a followed timeline (`None` at the end of the stream).
fn next_event(reader: &mut impl BufRead) -> Option<Value> {
    let mut line = String::new();
    match reader.read_line(&mut line).expect("read the event stream") {
        0 => None,
        _ => Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))),
    }
}

#[test]
fn events_are_followed_live_until_the_sandbox_ends() {
    let env = Env::new();
    let server = Server::start(&env);
    let api = Api::new(&server, &key(&env, "watcher"));
    let other = Api::new(&server, &key(&env, "stranger"));
    let id = sandbox(&api, json!({}));
    api.exec(&id, "true");
    let events: Vec<Value> = api
        .get(&format!("/v1/sandboxes/{id}/events"))
        .json()
        .unwrap();
    assert_eq!(events.len(), 3, "{events:?}");
    let seqs: Vec<i64> = events.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert!(events
        .iter()
        .all(|e| e["time"].as_str().is_some_and(|t| t.ends_with('Z'))));
    // `since` without follow: the rest of the array.
    let rest: Vec<Value> = api
        .get(&format!("/v1/sandboxes/{id}/events?since={}", seqs[0]))
        .json()
        .unwrap();
    assert_eq!(rest, events[1..]);

    let res = api.get(&format!(
        "/v1/sandboxes/{id}/events?follow=true&since={}",
        seqs[0]
    ));
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers()["content-type"].to_str().unwrap(),
        "application/x-ndjson"
    );
    let mut stream = BufReader::new(res);
    let kinds_until = |stream: &mut BufReader<_>, last: &str| -> Vec<String> {
        let mut kinds = Vec::new();
        loop {
            let event = next_event(stream).expect("the stream ended early");
            let kind = event["kind"].as_str().unwrap().to_string();
            kinds.push(kind.clone());
            if kind == last {
                return kinds;
            }
        }
    };
    assert_eq!(
        kinds_until(&mut stream, "process.exit"),
        ["process.exec", "process.exit"]
    );
    // New events arrive as they happen.
    let started = Instant::now();
    assert_eq!(
        api.post(&format!("/v1/sandboxes/{id}/pause"), "").status(),
        200
    );
    assert_eq!(kinds_until(&mut stream, "sandbox.pause"), ["sandbox.pause"]);
    assert_eq!(
        api.post(&format!("/v1/sandboxes/{id}/resume"), "").status(),
        200
    );
    assert_eq!(
        kinds_until(&mut stream, "sandbox.resume"),
        ["sandbox.resume"]
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // A client that leaves does not disturb anyone.
    let dropped = api.get(&format!("/v1/sandboxes/{id}/events?follow=true"));
    drop(dropped);
    // Deleting ends the stream after its last event.
    assert_eq!(api.delete(&format!("/v1/sandboxes/{id}")).status(), 204);
    assert_eq!(
        kinds_until(&mut stream, "sandbox.delete"),
        ["sandbox.delete"]
    );
    assert!(
        next_event(&mut stream).is_none(),
        "the stream goes on after the delete"
    );
    // Following an ended sandbox sends its whole timeline and ends.
    let res = api.get(&format!("/v1/sandboxes/{id}/events?follow=true"));
    let all = ndjson(&res.text().unwrap());
    let kinds: Vec<&str> = all.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "sandbox.create",
            "process.exec",
            "process.exit",
            "sandbox.pause",
            "sandbox.resume",
            "sandbox.delete"
        ]
    );

    let bad = |query: &str| {
        error(
            api.get(&format!("/v1/sandboxes/{id}/events?{query}")),
            400,
            "invalid_argument",
        )
    };
    assert!(bad("since=-1").contains("since"));
    assert!(bad("follow=maybe").contains("follow"));
    assert!(bad("tail=3").contains("unknown query parameter"));
    error(
        other.get(&format!("/v1/sandboxes/{id}/events?follow=true")),
        404,
        "not_found",
    );
}

/// The `process.exit` events of `pid`.
fn exits_of(api: &Api, id: &str, pid: i64) -> Vec<Value> {
    let events: Vec<Value> = api
        .get(&format!("/v1/sandboxes/{id}/events"))
        .json()
        .unwrap();
    events
        .into_iter()
        .filter(|e| e["kind"] == "process.exit" && e["payload"]["pid"] == pid)
        .collect()
}

fn background_sh(api: &Api, id: &str, script: &str) -> i64 {
    api.background(id, json!({"cmd": ["sh", "-c", script], "background": true}))
}

#[test]
fn background_processes_get_their_exit_event_once_across_restarts() {
    let env = Env::new();
    let server = Server::start(&env);
    let key = key(&env, "bg");
    let api = Api::new(&server, &key);
    let id = sandbox(&api, json!({}));

    // Recorded by the server that started it.
    let quick = background_sh(&api, &id, "exit 3");
    wait_for(10, "the exit event", || {
        !exits_of(&api, &id, quick).is_empty()
    });
    let exit = &exits_of(&api, &id, quick)[0];
    assert_eq!(exit["payload"]["code"], 3);
    assert_eq!(exit["actor"], "agent");
    let killed = background_sh(&api, &id, "sleep 100");
    let res = api.post(
        &format!("/v1/sandboxes/{id}/processes/{killed}/signal"),
        r#"{"signal":9}"#,
    );
    assert!(res.status().is_success(), "{}", res.status());
    wait_for(10, "the kill's exit event", || {
        !exits_of(&api, &id, killed).is_empty()
    });
    assert_eq!(exits_of(&api, &id, killed)[0]["payload"]["signal"], 9);

    // Still running when the server stops: the next server watches them. One ends while no
    // server runs, one after the restart.
    let during = background_sh(&api, &id, "sleep 0.3; exit 6");
    let after = background_sh(&api, &id, "sleep 3; exit 4");
    server.stop();
    std::thread::sleep(Duration::from_millis(800));
    let server = Server::start(&env);
    let api = Api::new(&server, &key);
    wait_for(10, "the exit that happened while down", || {
        !exits_of(&api, &id, during).is_empty()
    });
    assert_eq!(exits_of(&api, &id, during)[0]["payload"]["code"], 6);
    wait_for(10, "the exit after the restart", || {
        !exits_of(&api, &id, after).is_empty()
    });
    assert_eq!(exits_of(&api, &id, after)[0]["payload"]["code"], 4);

    // A paused sandbox's process ends only after the resume, and is recorded then.
    let paused = background_sh(&api, &id, "sleep 0.5; exit 8");
    assert_eq!(
        api.post(&format!("/v1/sandboxes/{id}/pause"), "").status(),
        200
    );
    drop(server);
    let server = Server::start(&env);
    let api = Api::new(&server, &key);
    std::thread::sleep(Duration::from_millis(1_000));
    assert!(
        exits_of(&api, &id, paused).is_empty(),
        "exited while frozen"
    );
    assert_eq!(
        api.post(&format!("/v1/sandboxes/{id}/resume"), "").status(),
        200
    );
    wait_for(10, "the exit after the resume", || {
        !exits_of(&api, &id, paused).is_empty()
    });

    // Once each, however many servers watched.
    drop(server);
    let server = Server::start(&env);
    let api = Api::new(&server, &key);
    std::thread::sleep(Duration::from_millis(500));
    for pid in [quick, killed, during, after, paused] {
        assert_eq!(exits_of(&api, &id, pid).len(), 1, "pid {pid}");
    }
    // An attached exec's exit is recorded once too (by its stream, not a watcher).
    api.exec(&id, "exit 0");
    let events: Vec<Value> = api
        .get(&format!("/v1/sandboxes/{id}/events"))
        .json()
        .unwrap();
    let exits = events
        .iter()
        .filter(|e| e["kind"] == "process.exit")
        .count();
    assert_eq!(exits, 6);
}

#[test]
fn a_restart_records_the_freezer_state_it_finds() {
    let env = Env::new();
    let server = Server::start(&env);
    let key = key(&env, "freezer");
    let api = Api::new(&server, &key);
    let (frozen, thawed) = (sandbox(&api, json!({})), sandbox(&api, json!({})));
    assert_eq!(
        api.post(&format!("/v1/sandboxes/{thawed}/pause"), "")
            .status(),
        200
    );
    server.stop();
    // What a server that stopped between the freezer and the database leaves behind.
    let runtime = openrun_runtime::Runtime::open(env.data_dir()).unwrap();
    runtime
        .open_sandbox_exact(&frozen)
        .unwrap()
        .pause()
        .unwrap();
    runtime
        .open_sandbox_exact(&thawed)
        .unwrap()
        .resume()
        .unwrap();

    let server = Server::start(&env);
    let api = Api::new(&server, &key);
    for (id, state, kind) in [
        (&frozen, "paused", "sandbox.pause"),
        (&thawed, "running", "sandbox.resume"),
    ] {
        assert_eq!(state_of(&api, id), state);
        let events: Vec<Value> = api
            .get(&format!("/v1/sandboxes/{id}/events"))
            .json()
            .unwrap();
        let last = events.last().unwrap();
        assert_eq!(
            (last["kind"].as_str(), last["actor"].as_str()),
            (Some(kind), Some("system"))
        );
    }
    assert_eq!(
        stream(&api.exec(&thawed, "echo thawed"), "stdout"),
        "thawed\n"
    );
    let res = api.post(
        &format!("/v1/sandboxes/{frozen}/exec"),
        r#"{"cmd":["true"]}"#,
    );
    error(res, 409, "sandbox_paused");
    assert_eq!(
        api.post(&format!("/v1/sandboxes/{frozen}/resume"), "")
            .status(),
        200
    );
    assert_eq!(stream(&api.exec(&frozen, "echo back"), "stdout"), "back\n");
}

#[test]
fn a_create_whose_client_leaves_is_still_finished_and_recorded() {
    use std::io::Write;
    let env = Env::new();
    let server = Server::start(&env);
    let key = key(&env, "leaver");
    let api = Api::new(&server, &key);
    // A server that is still filling its warm pool (forks on 2 CPUs) may read the request only
    // after the client has left, and then never sees it: wait until it is idle, so the
    // request is taken while its client is still there and only the create outlives it.
    wait_for(30, "the warm pool to fill", || {
        let metrics = api.get("/metrics").text().unwrap();
        metrics.lines().any(|l| l == "openrun_warm_pool_ready 4")
    });
    // The whole request is sent, then the connection closed while the sandbox is being made.
    let addr = server.url.trim_start_matches("http://");
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    let body = r#"{"ttl":"1h"}"#;
    write!(
        conn,
        "POST /v1/sandboxes HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    conn.flush().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    drop(conn);
    // The create goes on without its client: the sandbox ends up running (not `creating`
    // forever, out of the reaper's sight), with its creation event.
    let mut id = String::new();
    wait_for(30, "the abandoned create to finish", || {
        let (list, _) = page(&api, "/v1/sandboxes");
        match list.first() {
            Some(sb) if sb["state"] == "running" => {
                id = sb["id"].as_str().unwrap().to_string();
                true
            }
            _ => false,
        }
    });
    assert_eq!(api.event_kinds(&id), ["sandbox.create"]);
    assert!(env.live_ids().contains(&id));
    assert_eq!(api.delete(&format!("/v1/sandboxes/{id}")).status(), 204);
    assert!(!env.live_ids().contains(&id));
}
