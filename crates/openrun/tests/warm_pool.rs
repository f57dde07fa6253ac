//! The server's warm pool (`openrun serve --warm-pool N`) over real HTTP on loopback: default
//! creates take a pooled sandbox (counted by `openrun_warm_pool_hits_total`) that works, has
//! the server's default limits and the caller's TTL and labels, and the same timeline as a
//! cold one; other creates are cold; pooled sandboxes are nobody's until claimed; concurrent
//! creates never share one; `--warm-pool 0` turns it off; a restart after SIGKILL removes
//! what the dead server left in its pool, and a clean stop destroys the pool. Root only.

mod common;
use common::server::*;
use common::*;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The server's metrics as `name{labels}` → value.
fn metrics(api: &Api) -> BTreeMap<String, f64> {
    let res = api.get("/metrics");
    assert_eq!(res.status(), 200);
    res.text()
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

fn metric(api: &Api, name: &str) -> f64 {
    metrics(api)
        .get(name)
        .copied()
        .unwrap_or_else(|| panic!("no metric {name}"))
}

/// Waits until the pool holds `n` ready sandboxes.
fn wait_ready(api: &Api, n: f64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = metric(api, "openrun_warm_pool_ready");
        if ready == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the pool holds {ready} sandboxes, not {n}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn set(ids: Vec<String>) -> BTreeSet<String> {
    ids.into_iter().collect()
}

fn id_of(sandbox: &Value) -> String {
    sandbox["id"].as_str().expect("id").to_string()
}

/// The single `sandbox.create` event of `id`.
fn create_event(api: &Api, id: &str) -> Value {
    let events: Vec<Value> = api
        .get(&format!("/v1/sandboxes/{id}/events"))
        .json()
        .expect("events");
    let creates: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "sandbox.create")
        .collect();
    assert_eq!(creates.len(), 1, "{events:?}");
    assert_eq!(events[0]["kind"], "sandbox.create", "{events:?}");
    creates[0].clone()
}

fn stdout_of(api: &Api, id: &str, script: &str) -> String {
    let lines = api.exec(id, script);
    assert_eq!(exit_line(&lines)["code"], 0, "{lines:?}");
    stream(&lines, "stdout")
}

#[test]
fn a_default_create_takes_a_pooled_sandbox_that_works_and_the_pool_refills() {
    let env = Env::new();
    let key = key(&env, "ci");
    let server = Server::start_with(
        &env,
        &["--listen", "127.0.0.1:0", "--default-memory", "768M"],
    );
    let api = Api::new(&server, &key);
    wait_ready(&api, 4.0);
    assert_eq!(metric(&api, "openrun_warm_pool_size"), 4.0);
    let pooled = set(env.live_ids());
    assert_eq!(pooled.len(), 4, "{pooled:?}");
    // Nobody's until claimed: no list, get or count shows them.
    assert!(api.ids().is_empty());
    for id in &pooled {
        error(api.get(&format!("/v1/sandboxes/{id}")), 404, "not_found");
        error(
            api.get(&format!("/v1/sandboxes/{id}/events")),
            404,
            "not_found",
        );
    }
    assert_eq!(metric(&api, "openrun_sandboxes{state=\"running\"}"), 0.0);
    let e2b: Vec<Value> = api
        .http
        .get(format!("{}/v2/sandboxes", api.url))
        .header("X-API-KEY", &api.key)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert!(e2b.is_empty(), "{e2b:?}");

    let before = Instant::now();
    let created = api.create(json!({"labels": {"team": "ml"}, "ttl": "10m"}));
    let id = id_of(&created);
    assert!(pooled.contains(&id), "{id} was not a pooled sandbox");
    assert_eq!(metric(&api, "openrun_warm_pool_hits_total"), 1.0);
    assert_eq!(metric(&api, "openrun_warm_pool_misses_total"), 0.0);
    // The answer of a create: the caller's labels, TTL and owner, the default limits.
    assert_eq!(created["state"], "running");
    assert_eq!(created["image"], "host");
    assert_eq!(created["owner"], "ci");
    assert_eq!(created["labels"], json!({"team": "ml"}));
    assert_eq!(created["env"], json!({}));
    assert_eq!(created["limits"]["memory_bytes"], 768u64 << 20);
    assert_eq!(created["limits"]["disk_bytes"], 10u64 << 30);
    assert_eq!(created["limits"]["pids"], 4096);
    assert_eq!(
        api.get(&format!("/v1/sandboxes/{id}"))
            .json::<Value>()
            .unwrap(),
        created
    );
    assert_eq!(api.ids(), vec![id.clone()]);
    assert_eq!(metric(&api, "openrun_sandboxes{state=\"running\"}"), 1.0);

    // Its lifetime is the caller's: in the runtime record (the agent's backstop) too.
    let record = env.inspect(&id);
    let expires = record["expires_at_ms"].as_u64().expect("a deadline");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let left = expires.saturating_sub(now);
    assert!(
        (9 * 60_000..=10 * 60_000).contains(&left),
        "{left} ms left, not about 10m"
    );
    assert!(before.elapsed() < Duration::from_secs(60));
    let memory = cgroup_dir("memory", &id).join("memory.limit_in_bytes");
    if memory.exists() {
        assert_eq!(
            std::fs::read_to_string(&memory).unwrap().trim(),
            (768u64 << 20).to_string()
        );
    }

    // The pool ran `true` once in it (a warm-up) and forgot it: its process table is empty,
    // and only the pids show it (1 is the agent, 2 its watchdog thread, 3 the warm-up).
    let processes: Value = api
        .get(&format!("/v1/sandboxes/{id}/processes"))
        .json()
        .unwrap();
    assert_eq!(processes, json!([]), "{processes}");
    let first_pid: u32 = stdout_of(&api, &id, "echo $$").trim().parse().unwrap();
    assert!(
        first_pid >= 4,
        "first command's pid {first_pid}: no warm-up ran"
    );
    let processes: Value = api
        .get(&format!("/v1/sandboxes/{id}/processes"))
        .json()
        .unwrap();
    assert_eq!(processes.as_array().map(Vec::len), Some(1), "{processes}");

    // It works: commands, files.
    assert_eq!(
        stdout_of(&api, &id, "echo hi > /tmp/f && cat /tmp/f && id -u"),
        "hi\n0\n"
    );
    let res = api.put(
        &format!("/v1/sandboxes/{id}/files?path=/root/note.txt"),
        b"pooled".to_vec(),
    );
    assert!(res.status().is_success(), "{}", res.status());
    assert_eq!(stdout_of(&api, &id, "cat /root/note.txt"), "pooled");

    // Its timeline starts with the create, as a cold one's does.
    let event = create_event(&api, &id);
    assert_eq!(event["actor"], "agent");
    assert_eq!(event["payload"]["ttl_ms"], 600_000);
    assert_eq!(event["payload"]["labels"], json!({"team": "ml"}));
    assert_eq!(event["payload"]["image"], "host");
    assert_eq!(event["payload"]["network"]["mode"], "none");
    assert_eq!(event["payload"]["limits"], created["limits"]);

    // The pool refills to 4 with a new sandbox.
    wait_ready(&api, 4.0);
    let live = set(env.live_ids());
    assert_eq!(live.len(), 5, "{live:?}");
    assert!(live.contains(&id));

    // A create naming exactly the defaults is a default create.
    let same = api.create(json!({"memory": "768M", "network": {"mode": "none"}}));
    assert!(live.contains(&id_of(&same)));
    assert_eq!(metric(&api, "openrun_warm_pool_hits_total"), 2.0);

    // E2B's create is the same core: its default template takes a pooled sandbox too.
    wait_ready(&api, 4.0);
    let pooled_now = set(env.live_ids());
    let res = api
        .http
        .post(format!("{}/v2/sandboxes", api.url))
        .header("X-API-KEY", &api.key)
        .header("content-type", "application/json")
        .body(json!({"templateID": "base", "timeout": 60}).to_string())
        .send()
        .unwrap();
    assert_eq!(res.status(), 201);
    let e2b: Value = res.json().unwrap();
    let e2b_id = e2b["sandboxID"].as_str().expect("sandboxID").to_string();
    assert!(pooled_now.contains(&e2b_id), "{e2b}");
    assert_eq!(metric(&api, "openrun_warm_pool_hits_total"), 3.0);
    assert_eq!(stdout_of(&api, &e2b_id, "echo e2b"), "e2b\n");
    assert_eq!(create_event(&api, &e2b_id)["payload"]["ttl_ms"], 60_000);

    // A cold create's answer has the same shape.
    let cold = api.create(json!({"env": {"A": "1"}}));
    let keys = |v: &Value| -> BTreeSet<String> { v.as_object().unwrap().keys().cloned().collect() };
    assert_eq!(keys(&cold), keys(&created));
    assert_eq!(
        keys(&create_event(&api, &id_of(&cold))["payload"]),
        keys(&event["payload"])
    );

    // Deleting a claimed sandbox is as for any other.
    assert_eq!(api.delete(&format!("/v1/sandboxes/{id}")).status(), 204);
    assert!(!env.live_ids().contains(&id));

    // A clean stop destroys the pool; the tenants' sandboxes stay.
    server.stop();
    let left = set(env.live_ids());
    assert_eq!(left, set(vec![id_of(&same), id_of(&cold), e2b_id]));
}

#[test]
fn creates_asking_for_more_than_the_defaults_are_cold_and_get_what_they_asked() {
    let env = Env::new();
    let key = key(&env, "ci");
    let server = Server::start(&env);
    let api = Api::new(&server, &key);
    wait_ready(&api, 4.0);
    let pooled = set(env.live_ids());
    let cases = [
        json!({"env": {"GREETING": "hello"}}),
        json!({"memory": "256M"}),
        json!({"pids": 100}),
        json!({"workdir": "/work/app"}),
        json!({"user": "1000:1000"}),
        json!({"network": {"mode": "allowlist", "allow": ["example.com"]}}),
    ];
    let mut ids = Vec::new();
    for body in &cases {
        let created = api.create(body.clone());
        let id = id_of(&created);
        assert!(!pooled.contains(&id), "{body}: took pooled sandbox {id}");
        assert_eq!(created["state"], "running", "{body}");
        create_event(&api, &id);
        ids.push(id);
    }
    assert_eq!(metric(&api, "openrun_warm_pool_hits_total"), 0.0);
    assert_eq!(metric(&api, "openrun_warm_pool_misses_total"), 0.0);
    // Each got what it asked for.
    let by_body = |i: usize| ids[i].clone();
    assert_eq!(stdout_of(&api, &by_body(0), "echo $GREETING"), "hello\n");
    let limits: Value = api
        .get(&format!("/v1/sandboxes/{}", by_body(1)))
        .json()
        .unwrap();
    assert_eq!(limits["limits"]["memory_bytes"], 256u64 << 20);
    let limits: Value = api
        .get(&format!("/v1/sandboxes/{}", by_body(2)))
        .json()
        .unwrap();
    assert_eq!(limits["limits"]["pids"], 100);
    assert_eq!(stdout_of(&api, &by_body(3), "pwd"), "/work/app\n");
    assert_eq!(stdout_of(&api, &by_body(4), "id -u"), "1000\n");
    assert!(stdout_of(&api, &by_body(5), "echo $HTTPS_PROXY").starts_with("http://"));
    // An image other than the default is cold too (an unknown one is refused as before).
    error(
        api.post("/v1/sandboxes", r#"{"image":"nope:1"}"#),
        400,
        "invalid_argument",
    );
    // The pool was left alone.
    assert_eq!(metric(&api, "openrun_warm_pool_ready"), 4.0);
    assert!(pooled.is_subset(&set(env.live_ids())));
}

#[test]
fn concurrent_creates_never_get_the_same_sandbox() {
    let env = Env::new();
    let key = key(&env, "ci");
    let server = Server::start(&env);
    let api = Api::new(&server, &key);
    wait_ready(&api, 4.0);
    let ids: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..10)
            .map(|_| scope.spawn(|| id_of(&api.create(json!({})))))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let distinct = set(ids.clone());
    assert_eq!(distinct.len(), ids.len(), "{ids:?}");
    let hits = metric(&api, "openrun_warm_pool_hits_total");
    let misses = metric(&api, "openrun_warm_pool_misses_total");
    assert!((1.0..=10.0).contains(&hits), "{hits} hits");
    assert_eq!(hits + misses, 10.0);
    for id in &ids {
        create_event(&api, id);
        assert_eq!(stdout_of(&api, id, "echo ok"), "ok\n");
    }
    assert_eq!(set(api.ids()), distinct);
    wait_ready(&api, 4.0);
}

#[test]
fn a_refill_never_makes_a_user_create_429() {
    // One create slot and no queue: a refill holds the only slot for a few ms after each
    // claim, and a user create arriving then waits for it instead of being refused.
    let env = Env::new();
    let key = key(&env, "ci");
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--warm-pool",
        "1",
        "--max-creating",
        "1",
        "--create-queue",
        "0",
    ];
    let server = Server::start_with(&env, &args);
    let api = Api::new(&server, &key);
    wait_ready(&api, 1.0);
    let mut ids = Vec::new();
    for round in 0..40u64 {
        let res = api.post("/v1/sandboxes", "{}");
        let status = res.status();
        let body = res.text().unwrap_or_default();
        assert_eq!(status, 201, "create {round}: {body}");
        let created: Value = serde_json::from_str(&body).expect("a sandbox");
        ids.push(id_of(&created));
        // Land the next create at varying points of the refill the claim started.
        std::thread::sleep(Duration::from_millis(15 + round % 8 * 3));
    }
    assert!(metric(&api, "openrun_warm_pool_hits_total") >= 1.0);
    assert_eq!(metric(&api, "openrun_creates_rejected_total"), 0.0);
    for id in &ids {
        assert_eq!(api.delete(&format!("/v1/sandboxes/{id}")).status(), 204);
    }
}

#[test]
fn a_claimed_sandbox_reaches_the_egress_proxy_at_once_for_its_tenant() {
    let env = Env::new();
    let key = key(&env, "ci");
    let server = Server::start(&env);
    let api = Api::new(&server, &key);
    wait_ready(&api, 4.0);
    let id = id_of(&api.create(json!({})));
    assert_eq!(metric(&api, "openrun_warm_pool_hits_total"), 1.0);
    // The first command goes through the relay at once: the proxy answers (policy none).
    let lines = api.exec(
        &id,
        "curl -sS -m 20 -o /dev/null -w '%{http_code}' http://example.com/",
    );
    assert_eq!(stream(&lines, "stdout"), "403", "{lines:?}");
    // The refusal is recorded on the claimer's sandbox timeline.
    let events: Vec<Value> = api
        .get(&format!("/v1/sandboxes/{id}/events"))
        .json()
        .expect("events");
    let denied: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "network.deny")
        .collect();
    assert_eq!(denied.len(), 1, "{events:?}");
    assert_eq!(denied[0]["payload"]["host"], "example.com");
    // Another tenant sees none of it.
    let other = Api::new(&server, &common::server::key(&env, "other"));
    assert_eq!(
        other.get(&format!("/v1/sandboxes/{id}/events")).status(),
        404
    );
}

#[test]
fn warm_pool_0_turns_it_off() {
    let env = Env::new();
    let key = key(&env, "ci");
    let server = Server::start_with(&env, &["--listen", "127.0.0.1:0", "--warm-pool", "0"]);
    let api = Api::new(&server, &key);
    std::thread::sleep(Duration::from_millis(500));
    assert!(env.live_ids().is_empty());
    let id = id_of(&api.create(json!({})));
    assert_eq!(stdout_of(&api, &id, "echo ok"), "ok\n");
    assert_eq!(env.live_ids(), vec![id]);
    assert_eq!(metric(&api, "openrun_warm_pool_size"), 0.0);
    assert_eq!(metric(&api, "openrun_warm_pool_ready"), 0.0);
    assert_eq!(metric(&api, "openrun_warm_pool_hits_total"), 0.0);
    assert_eq!(metric(&api, "openrun_warm_pool_misses_total"), 0.0);
}

#[test]
fn a_restart_after_sigkill_removes_the_dead_servers_pool() {
    let env = Env::new();
    let key = key(&env, "ci");
    let mut server = Server::start_with(&env, &["--listen", "127.0.0.1:0", "--warm-pool", "2"]);
    let api = Api::new(&server, &key);
    wait_ready(&api, 2.0);
    let claimed = id_of(&api.create(json!({})));
    wait_ready(&api, 2.0);
    let orphans: BTreeSet<String> = set(env.live_ids())
        .into_iter()
        .filter(|id| *id != claimed)
        .collect();
    assert_eq!(orphans.len(), 2, "{orphans:?}");
    server.child.kill().expect("SIGKILL the server");
    server.child.wait().expect("reap the server");
    // The pool outlives a killed server (nothing could destroy it)...
    assert!(orphans.is_subset(&set(env.live_ids())));

    // ...and the next one removes it before anything else, and makes its own.
    let server = Server::start_with(&env, &["--listen", "127.0.0.1:0", "--warm-pool", "2"]);
    let api = Api::new(&server, &key);
    let live = set(env.live_ids());
    assert!(
        live.is_disjoint(&orphans),
        "{live:?} still holds {orphans:?}"
    );
    wait_ready(&api, 2.0);
    let live = set(env.live_ids());
    assert_eq!(live.len(), 3, "{live:?}");
    assert!(live.contains(&claimed));
    // The claimed sandbox is the tenant's and lives on.
    assert_eq!(api.ids(), vec![claimed.clone()]);
    assert_eq!(stdout_of(&api, &claimed, "echo still"), "still\n");
    for id in &orphans {
        assert!(
            !cgroup_dir("memory", id).exists() && !cgroup_dir("pids", id).exists(),
            "cgroup of {id} left"
        );
    }

    // A clean stop destroys the new pool: only the claimed sandbox is left.
    server.stop();
    assert_eq!(env.live_ids(), vec![claimed.clone()]);
    assert_ok(&env.output(["rm", &claimed]));
    assert!(env.leftovers().is_empty(), "{:?}", env.leftovers());
}

#[test]
fn a_refill_waits_while_a_request_is_in_progress_and_runs_once_it_ends() {
    let env = Env::new();
    let key = key(&env, "ci");
    let server = Server::start_with(&env, &["--listen", "127.0.0.1:0", "--warm-pool", "1"]);
    let api = Api::new(&server, &key);
    wait_ready(&api, 1.0);
    let long = id_of(&api.create(json!({})));
    wait_ready(&api, 1.0);
    std::thread::scope(|scope| {
        // A command streaming its output for 0.6 s: a request in progress throughout.
        let streaming = scope.spawn(|| {
            let api = Api::new(&server, &key);
            stdout_of(&api, &long, "sleep 0.6; echo done")
        });
        std::thread::sleep(Duration::from_millis(100));
        let claimed = Instant::now();
        let id = id_of(&api.create(json!({})));
        assert_eq!(metric(&api, "openrun_warm_pool_hits_total"), 2.0);
        // Before, a refill started 20 ms after each claim; now it waits for a quiet server
        // (at most 250 ms, checked well within that).
        while claimed.elapsed() < Duration::from_millis(150) {
            let ready = metric(&api, "openrun_warm_pool_ready");
            assert_eq!(
                ready,
                0.0,
                "refilled {:?} after the claim, while a command streamed",
                claimed.elapsed()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(streaming.join().expect("the streaming client"), "done\n");
        assert_eq!(stdout_of(&api, &id, "echo ok"), "ok\n");
    });
    // Refilled after all.
    wait_ready(&api, 1.0);
}
