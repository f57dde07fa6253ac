//! `openrun serve` over real HTTP on loopback: auth, the sandbox endpoints, exec streaming,
//! the timeline, tenancy, bad input, TTL expiry and restarts. Root only (CI runs as root).

mod common;
use common::server::*;
use common::*;

use std::time::{Duration, Instant};

use base64::Engine;
use reqwest::blocking::Client;
use serde_json::{json, Value};

#[test]
fn health_needs_no_key_and_everything_else_does() {
    let env = Env::new();
    let good = key(&env, "ci");
    let server = Server::start(&env);
    let http = Client::new();
    let res = http
        .get(format!("{}/v1/health", server.url))
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().unwrap(), json!({ "status": "ok" }));

    // The OpenAPI document needs no key either, and describes the routes that do.
    let res = http
        .get(format!("{}/v1/openapi.json", server.url))
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "application/json");
    let doc: Value = res.json().unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["paths"]["/v1/sandboxes/{id}/exec"]["post"].is_object());
    assert_eq!(
        doc["components"]["securitySchemes"]["api_key"]["scheme"],
        "bearer"
    );

    let list = format!("{}/v1/sandboxes", server.url);
    let msg = error(http.get(&list).send().unwrap(), 401, "unauthorized");
    assert!(msg.contains("Bearer"), "{msg}");
    error(
        http.get(&list).bearer_auth("or_wrong").send().unwrap(),
        401,
        "unauthorized",
    );
    error(
        http.get(&list).basic_auth("x", Some(&good)).send().unwrap(),
        401,
        "unauthorized",
    );
    error(
        http.post(&list).body("{}").send().unwrap(),
        401,
        "unauthorized",
    );
    let ok = http.get(&list).bearer_auth(&good).send().unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.json::<Value>().unwrap(), json!([]));
}

#[test]
fn a_sandbox_lives_runs_commands_and_is_deleted_over_http() {
    let env = Env::new();
    let api_key = key(&env, "agent");
    let server = Server::start(&env);
    let api = Api::new(&server, &api_key);

    let created = api.create(json!({ "memory": "256M", "pids": 128, "env": { "GREETING": "hi" } }));
    let id = created["id"].as_str().expect("id").to_string();
    assert_eq!(created["state"], "running");
    assert_eq!(created["image"], "host");
    assert_eq!(created["limits"]["memory_bytes"], 256u64 << 20);
    assert_eq!(created["limits"]["pids"], 128);
    assert!(
        created["expires_at"].as_str().expect("expires_at")
            > created["created_at"].as_str().expect("created_at")
    );
    assert!(env.live_ids().contains(&id), "no such live sandbox");

    let got: Value = api.get(&format!("/v1/sandboxes/{id}")).json().unwrap();
    assert_eq!(got, created);
    assert_eq!(api.ids(), std::slice::from_ref(&id));

    let lines = api.exec(
        &id,
        "echo $GREETING from $(hostname); echo oops >&2; exit 3",
    );
    assert_eq!(lines[0]["type"], "started");
    assert!(lines[0]["pid"].as_i64().expect("pid") > 1);
    assert_eq!(stream(&lines, "stdout"), format!("hi from {id}\n"));
    assert_eq!(stream(&lines, "stderr"), "oops\n");
    let exit = exit_line(&lines);
    assert_eq!(exit["code"], 3);
    assert_eq!(exit["timed_out"], false);

    // Binary-safe output, and a timeout reported as such.
    let lines = api.exec(&id, "printf '\\377\\000x'");
    let raw: Vec<u8> = lines
        .iter()
        .filter(|l| l["type"] == "stdout")
        .flat_map(|l| {
            base64::engine::general_purpose::STANDARD
                .decode(l["data_b64"].as_str().unwrap())
                .unwrap()
        })
        .collect();
    assert_eq!(raw, [0xff, 0, b'x']);
    let res = api.post(
        &format!("/v1/sandboxes/{id}/exec"),
        r#"{"cmd":["sleep","30"],"timeout":"200ms"}"#,
    );
    let lines = ndjson(&res.text().unwrap());
    assert_eq!(exit_line(&lines)["timed_out"], true);

    // A command that does not exist: a valid request, reported in the stream.
    let res = api.post(
        &format!("/v1/sandboxes/{id}/exec"),
        r#"{"cmd":["no-such-cmd"]}"#,
    );
    assert_eq!(res.status(), 200);
    let lines = ndjson(&res.text().unwrap());
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["type"], "error");
    assert_eq!(lines[0]["code"], "command_not_found");

    let kinds = api.event_kinds(&id);
    assert_eq!(
        kinds,
        [
            "sandbox.create",
            "process.exec",
            "process.exit",
            "process.exec",
            "process.exit",
            "process.exec",
            "process.exit",
            "process.exec",
            "process.error"
        ]
    );
    let events: Vec<Value> = api
        .get(&format!("/v1/sandboxes/{id}/events"))
        .json()
        .unwrap();
    assert_eq!(events[1]["payload"]["argv"][0], "sh");
    assert_eq!(events[1]["actor"], "agent");
    assert_eq!(events[2]["payload"]["code"], 3);
    assert!(events
        .windows(2)
        .all(|w| w[0]["seq"].as_i64() < w[1]["seq"].as_i64()));

    let res = api.delete(&format!("/v1/sandboxes/{id}"));
    assert_eq!(res.status(), 204);
    assert!(
        !env.live_ids().contains(&id),
        "delete left the sandbox running"
    );
    error(api.get(&format!("/v1/sandboxes/{id}")), 404, "not_found");
    error(api.delete(&format!("/v1/sandboxes/{id}")), 404, "not_found");
    error(
        api.post(&format!("/v1/sandboxes/{id}/exec"), r#"{"cmd":["true"]}"#),
        404,
        "not_found",
    );
    assert!(api.ids().is_empty());
    // The history stays readable after delete.
    assert_eq!(
        api.event_kinds(&id).last().map(String::as_str),
        Some("sandbox.delete")
    );

    // The server is the agents' subreaper and reaps them: no zombie stays behind.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !zombies_of(server.pid()).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(zombies_of(server.pid()), Vec::<String>::new());
}

#[test]
fn a_tenant_cannot_see_or_touch_another_tenants_sandboxes() {
    let env = Env::new();
    let (key_a, key_b) = (key(&env, "a"), key(&env, "b"));
    let server = Server::start(&env);
    let (a, b) = (Api::new(&server, &key_a), Api::new(&server, &key_b));
    let id = a.create(json!({}))["id"].as_str().unwrap().to_string();

    // B gets exactly what a missing id gets.
    let missing = "0123456789ab";
    let not_a = error(b.get(&format!("/v1/sandboxes/{missing}")), 404, "not_found");
    let not_b = error(b.get(&format!("/v1/sandboxes/{id}")), 404, "not_found");
    assert_eq!(not_b, not_a.replace(missing, &id));
    error(
        b.post(&format!("/v1/sandboxes/{id}/exec"), r#"{"cmd":["true"]}"#),
        404,
        "not_found",
    );
    error(b.delete(&format!("/v1/sandboxes/{id}")), 404, "not_found");
    error(
        b.get(&format!("/v1/sandboxes/{id}/events")),
        404,
        "not_found",
    );
    assert!(b.ids().is_empty());

    // A's sandbox is untouched and A's timeline has nothing of B.
    assert_eq!(a.ids(), std::slice::from_ref(&id));
    assert_eq!(
        stream(&a.exec(&id, "echo still here"), "stdout"),
        "still here\n"
    );
    assert_eq!(
        a.event_kinds(&id),
        ["sandbox.create", "process.exec", "process.exit"]
    );
}

#[test]
fn bad_input_is_a_4xx_naming_the_problem() {
    let env = Env::new();
    let api_key = key(&env, "fuzzer");
    let server = Server::start_cold(&env);
    let api = Api::new(&server, &api_key);

    let msg = error(
        api.post("/v1/sandboxes", r#"{"memory": "#),
        400,
        "invalid_argument",
    );
    assert!(msg.contains("invalid request body"), "{msg}");
    let msg = error(
        api.post("/v1/sandboxes", r#"{"memroy":"1G"}"#),
        400,
        "invalid_argument",
    );
    assert!(msg.contains("memroy"), "{msg}");
    let msg = error(
        api.post("/v1/sandboxes", r#"{"memory":"12Q"}"#),
        400,
        "invalid_argument",
    );
    assert!(msg.contains("12Q"), "{msg}");
    let msg = error(
        api.post("/v1/sandboxes", r#"{"cpus":"-1"}"#),
        400,
        "invalid_argument",
    );
    assert!(msg.contains("-1"), "{msg}");
    let msg = error(
        api.post("/v1/sandboxes", r#"{"rootfs":"/no/such/rootfs"}"#),
        400,
        "invalid_argument",
    );
    assert!(msg.contains("/no/such/rootfs"), "{msg}");
    // A tenant must never mount a host directory: "/" would be the whole host.
    let msg = error(
        api.post("/v1/sandboxes", r#"{"rootfs":"/"}"#),
        400,
        "invalid_argument",
    );
    assert!(msg.contains("not accepted over the API"), "{msg}");
    let msg = error(
        api.post("/v1/sandboxes", r#"{"image":"ubuntu"}"#),
        400,
        "invalid_argument",
    );
    assert!(msg.contains("ubuntu"), "{msg}");
    let huge = format!(r#"{{"env":{{"X":"{}"}}}}"#, "x".repeat(2 << 20));
    error(api.post("/v1/sandboxes", &huge), 413, "body_too_large");
    error(api.get("/v1/sandboxes/0123456789ab"), 404, "not_found");
    error(api.get("/v1/sandboxes/..%2F..%2Fetc"), 404, "not_found");
    error(api.get("/v1/nothing-here"), 404, "not_found");
    // Nothing was created by any of these: no record, no sandbox.
    assert!(api.ids().is_empty());
    assert!(env.live_ids().is_empty());

    let id = api.create(json!({}))["id"].as_str().unwrap().to_string();
    let exec = format!("/v1/sandboxes/{id}/exec");
    let msg = error(api.post(&exec, r#"{"cmd":[]}"#), 400, "invalid_argument");
    assert!(msg.contains("cmd"), "{msg}");
    let msg = error(
        api.post(&exec, r#"{"cmd":["true"],"tty":true}"#),
        400,
        "invalid_argument",
    );
    assert!(msg.contains("tty"), "{msg}");
    let msg = error(
        api.post(&exec, r#"{"cmd":["true"],"timeout":"soon"}"#),
        400,
        "invalid_argument",
    );
    assert!(msg.contains("soon"), "{msg}");
    error(api.post(&exec, "[1,2"), 400, "invalid_argument");
    // None of the refused execs reached the timeline.
    assert_eq!(api.event_kinds(&id), ["sandbox.create"]);
}

#[test]
fn sandboxes_expire_at_their_ttl() {
    let env = Env::new();
    let api_key = key(&env, "ttl");
    let server = Server::start(&env);
    let api = Api::new(&server, &api_key);
    let id = api.create(json!({ "ttl": "2s" }))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let run_dir = std::path::PathBuf::from(env.inspect(&id)["run_dir"].as_str().unwrap());
    assert!(run_dir.exists() && cgroup_dir("pids", &id).exists());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let got: Value = api.get(&format!("/v1/sandboxes/{id}")).json().unwrap();
        if got["state"] == "stopped" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "sandbox still {got} after its TTL"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The agent's own timer usually ends it before the server's reaper looks: the reaper
    // still removes what it left on the host (checked before anything lists the sandboxes,
    // which would remove them too).
    assert!(!run_dir.exists(), "runtime dir left behind");
    for controller in ["memory", "pids"] {
        assert!(
            !cgroup_dir(controller, &id).exists(),
            "{controller} cgroup left behind"
        );
    }
    assert!(!env.live_ids().contains(&id));
    assert_eq!(api.event_kinds(&id), ["sandbox.create", "sandbox.expire"]);
    error(
        api.post(&format!("/v1/sandboxes/{id}/exec"), r#"{"cmd":["true"]}"#),
        409,
        "sandbox_not_running",
    );
}

/// Execs reuse their agent connection (crate::agent_conns in the server): it serves execs one
/// after another, is not used while the sandbox is paused, and one whose agent went away is
/// replaced by the usual check (409, the sandbox marked vanished), never used.
#[test]
fn execs_reuse_agent_connections_only_while_they_are_good() {
    let env = Env::new();
    let server = Server::start(&env);
    let api = Api::new(&server, &key(&env, "reuse"));
    let id = api.create(json!({}))["id"].as_str().unwrap().to_string();
    for i in 0..5 {
        let lines = api.exec(&id, &format!("echo {i}"));
        assert_eq!(stream(&lines, "stdout"), format!("{i}\n"));
        assert_eq!(exit_line(&lines)["code"], 0);
    }
    // A command that fails to start leaves a usable connection too.
    let res = api.post(
        &format!("/v1/sandboxes/{id}/exec"),
        r#"{"cmd":["/no/such/program"]}"#,
    );
    let lines = ndjson(&res.text().unwrap());
    assert_eq!(lines.last().unwrap()["type"], "error", "{lines:?}");
    assert_eq!(stream(&api.exec(&id, "echo after"), "stdout"), "after\n");

    assert_eq!(
        api.post(&format!("/v1/sandboxes/{id}/pause"), "").status(),
        200
    );
    error(
        api.post(&format!("/v1/sandboxes/{id}/exec"), r#"{"cmd":["true"]}"#),
        409,
        "sandbox_paused",
    );
    assert_eq!(
        api.post(&format!("/v1/sandboxes/{id}/resume"), "").status(),
        200
    );
    assert_eq!(
        stream(&api.exec(&id, "echo resumed"), "stdout"),
        "resumed\n"
    );

    // The agent goes away under the server (the CLI removes the sandbox): the idle
    // connection is closed, and the exec gets what it got before connections were kept.
    assert_ok(&env.output(["rm", &id]));
    error(
        api.post(&format!("/v1/sandboxes/{id}/exec"), r#"{"cmd":["true"]}"#),
        409,
        "sandbox_not_running",
    );
    let kinds = api.event_kinds(&id);
    assert_eq!(
        kinds.last().map(String::as_str),
        Some("sandbox.vanish"),
        "{kinds:?}"
    );
    let execs = kinds.iter().filter(|k| *k == "process.exec").count();
    assert_eq!(execs, 8, "{kinds:?}");
}

/// A sandbox whose agent dies under the server (killed from the host) is marked vanished at
/// the next request, and what it left on the host goes with it.
#[test]
fn a_vanished_sandbox_leaves_nothing_on_the_host() {
    let env = Env::new();
    let server = Server::start(&env);
    let api = Api::new(&server, &key(&env, "vanish"));
    let id = api.create(json!({}))["id"].as_str().unwrap().to_string();
    let info = env.inspect(&id);
    let run_dir = std::path::PathBuf::from(info["run_dir"].as_str().unwrap());
    let pid = info["pid"].as_i64().unwrap();
    assert!(run_dir.exists() && cgroup_dir("memory", &id).exists());
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| !stat.contains(") Z"))
    {
        assert!(Instant::now() < deadline, "the killed agent lives on");
        std::thread::sleep(Duration::from_millis(20));
    }
    error(
        api.post(&format!("/v1/sandboxes/{id}/exec"), r#"{"cmd":["true"]}"#),
        409,
        "sandbox_not_running",
    );
    assert_eq!(api.event_kinds(&id), ["sandbox.create", "sandbox.vanish"]);
    assert!(!run_dir.exists(), "runtime dir left behind");
    for controller in ["memory", "pids"] {
        assert!(
            !cgroup_dir(controller, &id).exists(),
            "{controller} cgroup left behind"
        );
    }
}

/// The other side of the above: an agent that lives but cannot be reached (here its socket
/// was removed) is not taken for vanished. The request fails, and the sandbox stays running
/// with everything it has on the host.
#[test]
fn a_live_agent_that_cannot_be_reached_is_not_marked_vanished() {
    let env = Env::new();
    let server = Server::start_cold(&env);
    let api = Api::new(&server, &key(&env, "unreachable"));
    let id = api.create(json!({}))["id"].as_str().unwrap().to_string();
    let info = env.inspect(&id);
    let run_dir = std::path::PathBuf::from(info["run_dir"].as_str().unwrap());
    std::fs::remove_file(env.socket(&id)).unwrap();
    error(
        api.post(&format!("/v1/sandboxes/{id}/exec"), r#"{"cmd":["true"]}"#),
        500,
        "internal",
    );
    let got: Value = api.get(&format!("/v1/sandboxes/{id}")).json().unwrap();
    assert_eq!(got["state"], "running", "{got}");
    assert_eq!(api.event_kinds(&id), ["sandbox.create"]);
    assert!(run_dir.exists() && cgroup_dir("memory", &id).exists());
    let pid = info["pid"].as_i64().unwrap();
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    // It can still be deleted: the agent is killed through its pidfd, not its socket.
    assert_eq!(api.delete(&format!("/v1/sandboxes/{id}")).status(), 204);
    assert!(!run_dir.exists(), "runtime dir left behind");
}

#[test]
fn sandboxes_survive_a_server_restart() {
    let env = Env::new();
    let api_key = key(&env, "restart");
    let server = Server::start(&env);
    let api = Api::new(&server, &api_key);
    let id = api.create(json!({}))["id"].as_str().unwrap().to_string();
    let gone = api.create(json!({}))["id"].as_str().unwrap().to_string();
    assert_eq!(
        stream(&api.exec(&id, "echo before > /tmp/mark"), "stdout"),
        ""
    );
    server.stop();

    // While the server is down, one sandbox disappears.
    assert_ok(&env.output(["rm", &gone]));

    let server = Server::start(&env);
    let api = Api::new(&server, &api_key);
    assert_eq!(api.ids(), [id.clone(), gone.clone()]);
    let got: Value = api.get(&format!("/v1/sandboxes/{id}")).json().unwrap();
    assert_eq!(got["state"], "running");
    let got: Value = api.get(&format!("/v1/sandboxes/{gone}")).json().unwrap();
    assert_eq!(got["state"], "stopped");
    assert_eq!(api.event_kinds(&gone), ["sandbox.create", "sandbox.vanish"]);
    let lines = api.exec(&id, "cat /tmp/mark");
    assert_eq!(stream(&lines, "stdout"), "before\n");
    assert_eq!(exit_line(&lines)["code"], 0);
    assert_eq!(
        api.event_kinds(&id),
        [
            "sandbox.create",
            "process.exec",
            "process.exit",
            "process.exec",
            "process.exit"
        ]
    );
    assert_eq!(api.delete(&format!("/v1/sandboxes/{id}")).status(), 204);
    assert!(!env.live_ids().contains(&id));
}

#[test]
fn files_are_written_read_listed_and_moved_over_http() {
    let env = Env::new();
    let api_key = key(&env, "files");
    let server = Server::start(&env);
    let api = Api::new(&server, &api_key);
    let id = api.create(json!({}))["id"].as_str().unwrap().to_string();
    let files = format!("/v1/sandboxes/{id}/files");

    // Non-UTF-8 bytes, into a directory that does not exist yet.
    let content: Vec<u8> = (0..=255u8).rev().chain([0, 0xff, b'\n']).collect();
    let res = api.put(
        &format!(
            "{files}?path={}&parents=true&mode=600",
            enc("/work/a b/x.bin")
        ),
        content.clone(),
    );
    assert_eq!(res.status(), 204);
    let res = api.get(&format!("{files}?path={}", enc("/work/a b/x.bin")));
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers()["content-type"].to_str().unwrap(),
        "application/octet-stream"
    );
    assert_eq!(res.bytes().unwrap().to_vec(), content);
    let res = api.get(&format!(
        "{files}?path={}&offset=1&limit=2",
        enc("/work/a b/x.bin")
    ));
    assert_eq!(res.bytes().unwrap().to_vec(), [254, 253]);
    // The command side sees the same bytes.
    let lines = api.exec(&id, "od -An -tx1 -N3 '/work/a b/x.bin'");
    assert_eq!(stream(&lines, "stdout").trim(), "ff fe fd");

    let stat: Value = api
        .get(&format!("{files}/stat?path={}", enc("/work/a b/x.bin")))
        .json()
        .unwrap();
    assert_eq!(stat["file_type"], "file");
    assert_eq!(stat["size"], content.len());
    assert_eq!(stat["mode"], 0o600);

    // Above the 1 MiB JSON limit, within the 16 MiB file limit.
    let big = vec![7u8; 3 << 20];
    assert_eq!(
        api.put(&format!("{files}?path=/work/big"), big).status(),
        204
    );
    let stat: Value = api
        .get(&format!("{files}/stat?path=/work/big"))
        .json()
        .unwrap();
    assert_eq!(stat["size"], 3u64 << 20);
    let huge = vec![0u8; (16 << 20) + 1];
    error(
        api.put(&format!("{files}?path=/work/huge"), huge),
        413,
        "body_too_large",
    );
    error(
        api.get(&format!("{files}/stat?path=/work/huge")),
        404,
        "not_found",
    );

    let res = api.post(
        &format!("{files}/mkdir"),
        r#"{"path":"/work/d/e","parents":true}"#,
    );
    assert_eq!(res.status(), 204);
    let res = api.post(&format!("{files}/mkdir"), r#"{"path":"/work/d"}"#);
    assert_eq!(res.status(), 409);
    let entries: Vec<Value> = api.get(&format!("{files}/list?path=/work")).json().unwrap();
    let names: Vec<_> = entries
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a b", "big", "d"]);
    assert_eq!(entries[2]["file_type"], "dir");

    let res = api.post(
        &format!("{files}/move"),
        r#"{"from":"/work/a b/x.bin","to":"/work/d/e/y.bin"}"#,
    );
    assert_eq!(res.status(), 204);
    error(
        api.get(&format!("{files}?path={}", enc("/work/a b/x.bin"))),
        404,
        "not_found",
    );
    let res = api.get(&format!("{files}?path=/work/d/e/y.bin"));
    assert_eq!(res.bytes().unwrap().to_vec(), content);

    assert_eq!(
        api.post(&format!("{files}/remove"), r#"{"path":"/work/d"}"#)
            .status(),
        409
    );
    let res = api.post(
        &format!("{files}/remove"),
        r#"{"path":"/work/d","recursive":true}"#,
    );
    assert_eq!(res.status(), 204);
    error(
        api.get(&format!("{files}/stat?path=/work/d")),
        404,
        "not_found",
    );
    error(
        api.get(&format!("{files}/list?path=/work/big")),
        400,
        "not_a_directory",
    );
    error(
        api.get(&format!("{files}?path=/work")),
        400,
        "is_a_directory",
    );
    error(api.get(&files), 400, "invalid_argument");
    error(
        api.get(&format!("{files}?path=/x&bogus=1")),
        400,
        "invalid_argument",
    );
    error(
        api.post(&format!("{files}/mkdir"), r#"{"path":"/x","mode":1}"#),
        400,
        "invalid_argument",
    );

    let kinds = api.event_kinds(&id);
    for kind in ["file.write", "file.mkdir", "file.move", "file.remove"] {
        assert!(kinds.iter().any(|k| k == kind), "{kind} missing: {kinds:?}");
    }
    let events: Vec<Value> = api
        .get(&format!("/v1/sandboxes/{id}/events"))
        .json()
        .unwrap();
    let write = events.iter().find(|e| e["kind"] == "file.write").unwrap();
    assert_eq!(write["payload"]["path"], "/work/a b/x.bin");
    assert_eq!(write["payload"]["bytes"], content.len());
}

#[test]
fn file_paths_cannot_leave_the_sandbox() {
    let env = Env::new();
    let api_key = key(&env, "escape");
    let server = Server::start(&env);
    let api = Api::new(&server, &api_key);
    let id = api.create(json!({}))["id"].as_str().unwrap().to_string();
    let files = format!("/v1/sandboxes/{id}/files");
    let shadow = std::fs::read("/etc/shadow").unwrap_or_default();
    let environ = std::fs::read(format!("/proc/{}/environ", server.pid())).unwrap_or_default();
    for path in [
        "../../../etc/shadow",
        "/../../../../etc/shadow",
        "/proc/self/environ",
        "/proc/1/root/etc/shadow",
    ] {
        let res = api.get(&format!("{files}?path={}", enc(path)));
        let status = res.status().as_u16();
        let body = res.bytes().unwrap().to_vec();
        assert!(status == 404 || status == 403, "{path}: {status}");
        if !shadow.is_empty() {
            assert_ne!(body, shadow, "{path} gave the host's /etc/shadow");
        }
        if !environ.is_empty() {
            assert_ne!(body, environ, "{path} gave the server's environment");
        }
    }
    let res = api.put(
        &format!("{files}?path={}", enc("../../../tmp/escaped")),
        b"x".to_vec(),
    );
    assert!(res.status().is_client_error() || res.status() == 204);
    assert!(!std::path::Path::new("/tmp/escaped").exists());
}

#[test]
fn background_processes_are_listed_fed_signalled_and_read_since_an_offset() {
    let env = Env::new();
    let api_key = key(&env, "procs");
    let server = Server::start(&env);
    let api = Api::new(&server, &api_key);
    let id = api.create(json!({}))["id"].as_str().unwrap().to_string();
    let procs = format!("/v1/sandboxes/{id}/processes");

    // Output since an offset: exactly the remaining bytes.
    let pid = api.background(
        &id,
        json!({ "cmd": ["sh", "-c", "printf 0123456789; printf 'ab\\377' >&2; exit 4"], "background": true }),
    );
    let info = api.wait_exited(&id, pid);
    assert_eq!(info["status"]["code"], 4);
    assert_eq!(info["stdout_len"], 10);
    let res = api.get(&format!(
        "{procs}/{pid}/output?stdout_since=4&stderr_since=1"
    ));
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers()["content-type"].to_str().unwrap(),
        "application/x-ndjson"
    );
    let lines = ndjson(&res.text().unwrap());
    assert_eq!(bytes_from(&lines, "stdout", 4), b"456789");
    assert_eq!(bytes_from(&lines, "stderr", 1), b"b\xff");
    assert_eq!(exit_line(&lines)["code"], 4);
    let lines = ndjson(&api.get(&format!("{procs}/{pid}/output")).text().unwrap());
    assert_eq!(bytes_from(&lines, "stdout", 0), b"0123456789");

    // Stdin to cat, then its output, followed until the exit.
    let cat = api.background(
        &id,
        json!({ "cmd": ["cat"], "background": true, "stdin": true }),
    );
    let res = api
        .req(reqwest::Method::POST, &format!("{procs}/{cat}/stdin"))
        .body(b"hello \xff\n".to_vec())
        .send()
        .unwrap();
    assert_eq!(res.status(), 204);
    let res = api
        .req(
            reqwest::Method::POST,
            &format!("{procs}/{cat}/stdin?eof=true"),
        )
        .send()
        .unwrap();
    assert_eq!(res.status(), 204);
    let lines = ndjson(
        &api.get(&format!("{procs}/{cat}/output?follow=true"))
            .text()
            .unwrap(),
    );
    assert_eq!(bytes_from(&lines, "stdout", 0), b"hello \xff\n");
    assert_eq!(exit_line(&lines)["code"], 0);

    // A signal ends a sleep.
    let sleep = api.background(&id, json!({ "cmd": ["sleep", "60"], "background": true }));
    let list: Vec<Value> = api.get(&procs).json().unwrap();
    let entry = list
        .iter()
        .find(|p| p["pid"] == sleep)
        .expect("sleep listed");
    assert_eq!(entry["state"], "running");
    assert_eq!(entry["argv"], json!(["sleep", "60"]));
    // Without follow, a running process's stream ends at the output it has.
    let lines = ndjson(&api.get(&format!("{procs}/{sleep}/output")).text().unwrap());
    assert!(lines.is_empty(), "{lines:?}");
    let res = api.post(
        &format!("{procs}/{sleep}/signal"),
        r#"{"signal":15,"group":true}"#,
    );
    assert_eq!(res.status(), 204);
    let info = api.wait_exited(&id, sleep);
    assert_eq!(info["status"]["signal"], 15);

    // Unknown pids and bad input.
    error(api.get(&format!("{procs}/99999")), 404, "no_such_process");
    error(api.get(&format!("{procs}/abc")), 404, "not_found");
    error(
        api.post(&format!("{procs}/99999/signal"), r#"{"signal":15}"#),
        404,
        "no_such_process",
    );
    error(
        api.get(&format!("{procs}/99999/output")),
        404,
        "no_such_process",
    );
    error(
        api.post(&format!("{procs}/{sleep}/signal"), r#"{"signal":0}"#),
        400,
        "invalid_argument",
    );
    error(
        api.post(
            &format!("/v1/sandboxes/{id}/exec"),
            r#"{"cmd":["no-such-cmd"],"background":true}"#,
        ),
        404,
        "command_not_found",
    );

    let kinds = api.event_kinds(&id);
    assert!(kinds.iter().any(|k| k == "process.signal"), "{kinds:?}");
    assert_eq!(kinds.iter().filter(|k| *k == "process.exec").count(), 4);
}

#[test]
fn another_tenant_gets_404_on_files_and_processes() {
    let env = Env::new();
    let (key_a, key_b) = (key(&env, "a"), key(&env, "b"));
    let server = Server::start(&env);
    let (a, b) = (Api::new(&server, &key_a), Api::new(&server, &key_b));
    let id = a.create(json!({}))["id"].as_str().unwrap().to_string();
    let base = format!("/v1/sandboxes/{id}");
    assert_eq!(
        a.put(&format!("{base}/files?path=/secret"), b"a's".to_vec())
            .status(),
        204
    );
    let pid = a.background(&id, json!({ "cmd": ["sleep", "60"], "background": true }));

    for res in [
        b.get(&format!("{base}/files?path=/secret")),
        b.put(&format!("{base}/files?path=/secret"), b"b's".to_vec()),
        b.get(&format!("{base}/files/list?path=/")),
        b.get(&format!("{base}/files/stat?path=/secret")),
        b.post(&format!("{base}/files/mkdir"), r#"{"path":"/b"}"#),
        b.post(&format!("{base}/files/remove"), r#"{"path":"/secret"}"#),
        b.post(
            &format!("{base}/files/move"),
            r#"{"from":"/secret","to":"/b"}"#,
        ),
        b.get(&format!("{base}/processes")),
        b.get(&format!("{base}/processes/{pid}")),
        b.post(&format!("{base}/processes/{pid}/signal"), r#"{"signal":9}"#),
        b.req(
            reqwest::Method::POST,
            &format!("{base}/processes/{pid}/stdin"),
        )
        .send()
        .unwrap(),
        b.get(&format!("{base}/processes/{pid}/output")),
        b.post(
            &format!("{base}/exec"),
            r#"{"cmd":["true"],"background":true}"#,
        ),
    ] {
        let msg = error(res, 404, "not_found");
        assert_eq!(msg, format!("no such sandbox: {id}"));
    }
    // A's file and process are untouched, and A's timeline has nothing of B.
    let res = a.get(&format!("{base}/files?path=/secret"));
    assert_eq!(res.bytes().unwrap().to_vec(), b"a's");
    let info: Value = a.get(&format!("{base}/processes/{pid}")).json().unwrap();
    assert_eq!(info["state"], "running");
    assert_eq!(
        a.event_kinds(&id),
        ["sandbox.create", "file.write", "process.exec"]
    );
}

#[test]
fn keys_made_while_the_server_runs_all_work_and_survive_its_restart() {
    // `openrun key create` is another process writing the same database: the server must keep
    // its locks (and so its WAL) while it runs, see every key made, and lose none of them at
    // its next checkpoint.
    let env = Env::new();
    let first = key(&env, "before");
    let server = Server::start(&env);
    let mut keys = vec![first];
    for i in 0..4 {
        keys.push(key(&env, &format!("during-{i}")));
        // The server writes between the keys (a sandbox and its events).
        let api = Api::new(&server, &keys[0]);
        let id = api.create(json!({}))["id"].as_str().unwrap().to_string();
        assert_eq!(api.delete(&format!("/v1/sandboxes/{id}")).status(), 204);
        for key in &keys {
            let res = Api::new(&server, key).get("/v1/sandboxes");
            assert_eq!(res.status(), 200, "key {key} made while the server runs");
        }
    }
    server.stop();
    let server = Server::start(&env);
    for key in &keys {
        let res = Api::new(&server, key).get("/v1/sandboxes");
        assert_eq!(res.status(), 200, "key {key} after a restart");
    }
}

#[test]
fn a_request_refused_before_its_body_was_read_closes_its_connection_unless_the_body_is_small() {
    // A pooling client must not reuse a connection whose request body the server never read.
    let env = Env::new();
    let server = Server::start(&env);
    let http = Client::new();
    let res = http
        .post(format!("{}/v1/sandboxes", server.url))
        .header("Authorization", "Bearer or_not-a-key")
        .body(vec![b' '; 256 * 1024])
        .send()
        .unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(res.headers()["connection"], "close");
    // A small body is read to its end instead: the answer keeps the connection, and a client
    // still writing its body gets the answer rather than a reset connection.
    let res = http
        .post(format!("{}/v1/sandboxes", server.url))
        .header("Authorization", "Bearer or_not-a-key")
        .body("{\"image\":\"host\"}")
        .send()
        .unwrap();
    assert_eq!(res.status(), 401);
    assert!(res.headers().get("connection").is_none_or(|v| v != "close"));
    // Without a body the connection stays usable.
    let res = http
        .get(format!("{}/v1/sandboxes", server.url))
        .send()
        .unwrap();
    assert_eq!(res.status(), 401);
    assert!(res.headers().get("connection").is_none_or(|v| v != "close"));
}

#[test]
fn an_oom_kill_is_reported_on_exec_and_background_exits_and_a_plain_kill_is_not() {
    let env = Env::new();
    let api_key = key(&env, "oom");
    let server = Server::start(&env);
    let api = Api::new(&server, &api_key);
    let id = api.create(json!({ "memory": "32M" }))["id"]
        .as_str()
        .unwrap()
        .to_string();
    // `tail` keeps everything it reads from a newline-free stream in memory.
    let hog = "head -c 300M /dev/zero | tail";
    let exit = exit_line(&api.exec(&id, hog)).clone();
    assert_eq!(exit["oom_killed"], true, "{exit}");
    // A SIGKILL that is no OOM kill is not reported as one.
    let exit = exit_line(&api.exec(&id, "kill -9 $$")).clone();
    assert_eq!(exit["signal"], 9, "{exit}");
    assert_eq!(exit["oom_killed"], false, "{exit}");
    // A background process's exit is recorded by the server's exit watcher.
    let pid = api.background(&id, json!({ "cmd": ["sh", "-c", hog], "background": true }));
    api.wait_exited(&id, pid);
    let deadline = Instant::now() + Duration::from_secs(10);
    let exit = loop {
        let events: Vec<Value> = api
            .get(&format!("/v1/sandboxes/{id}/events"))
            .json()
            .expect("events");
        let found = events
            .iter()
            .find(|e| e["kind"] == "process.exit" && e["payload"]["pid"] == pid)
            .cloned();
        if let Some(event) = found {
            break event;
        }
        assert!(Instant::now() < deadline, "no exit event: {events:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(exit["payload"]["oom_killed"], true, "{exit}");
}
