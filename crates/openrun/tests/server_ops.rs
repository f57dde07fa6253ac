//! Operating `openrun serve`: create back-pressure (429 + Retry-After), `/metrics` in the
//! Prometheus text format, the local key file of a loopback server, and a graceful shutdown
//! during a streaming exec. Real server processes over HTTP on loopback; root only.

mod common;
use common::server::*;
use common::*;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use reqwest::blocking::Client;
use serde_json::{json, Value};

/// Fires `n` creates at the same instant, one thread (and connection) each; returns each
/// answer's status, `Retry-After` and body.
fn create_burst(api: &Api, n: usize) -> Vec<(u16, Option<String>, Value)> {
    let barrier = Arc::new(Barrier::new(n));
    let threads: Vec<_> = (0..n)
        .map(|_| {
            let barrier = barrier.clone();
            let (url, key) = (api.url.clone(), api.key.clone());
            std::thread::spawn(move || {
                let http = Client::builder()
                    .timeout(Duration::from_secs(60))
                    .build()
                    .unwrap();
                barrier.wait();
                let res = http
                    .post(format!("{url}/v1/sandboxes"))
                    .bearer_auth(key)
                    .body("{}")
                    .send()
                    .unwrap();
                let status = res.status().as_u16();
                let retry = res
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().to_string());
                (status, retry, res.json::<Value>().unwrap())
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// A server with one create slot and a queue of `queue`, and a client.
fn one_create_slot(env: &Env, queue: &str) -> (Server, Api) {
    let api_key = key(env, "burst");
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--max-creating",
        "1",
        "--create-queue",
        queue,
        // Pooled creates would not wait for the one slot.
        "--warm-pool",
        "0",
    ];
    let server = Server::start_with(env, &args);
    let api = Api::new(&server, &api_key);
    (server, api)
}

#[test]
fn creates_beyond_the_slots_and_the_queue_get_429_with_retry_after() {
    let env = Env::new();
    let (_server, api) = one_create_slot(&env, "0");

    let answers = create_burst(&api, 8);
    let created: Vec<String> = answers
        .iter()
        .filter(|(status, _, _)| *status == 201)
        .map(|(_, _, body)| body["id"].as_str().unwrap().to_string())
        .collect();
    let rejected: Vec<_> = answers.iter().filter(|(s, _, _)| *s == 429).collect();
    assert!(!created.is_empty(), "no create got through: {answers:?}");
    assert!(
        !rejected.is_empty(),
        "one slot and no queue admitted 8 at once: {answers:?}"
    );
    assert_eq!(created.len() + rejected.len(), answers.len(), "{answers:?}");
    for (_, retry, body) in &rejected {
        assert_eq!(body["code"], "too_many_requests", "{body}");
        assert!(
            body["message"].as_str().unwrap().contains("retry"),
            "{body}"
        );
        let secs: u64 = retry.as_deref().expect("Retry-After").parse().unwrap();
        assert!((1..=60).contains(&secs), "Retry-After {secs}");
    }

    // The refused creates left nothing: no row, no sandbox.
    let mut listed = api.ids();
    listed.sort();
    let mut expected = created.clone();
    expected.sort();
    assert_eq!(listed, expected);
    let mut live = env.live_ids();
    live.sort();
    assert_eq!(live, expected);

    // After the burst there is room again.
    let id = api.create(json!({}))["id"].as_str().unwrap().to_string();
    let metrics = scrape(&api);
    assert_eq!(
        metrics["openrun_creates_rejected_total"],
        rejected.len() as f64
    );
    assert_eq!(
        metrics["openrun_sandbox_create_seconds_count"],
        (created.len() + 1) as f64
    );
    assert_eq!(
        metrics[r#"openrun_http_errors_total{code="too_many_requests"}"#],
        rejected.len() as f64
    );
    assert_eq!(api.delete(&format!("/v1/sandboxes/{id}")).status(), 204);
}

#[test]
fn creates_wait_in_the_queue_for_a_slot() {
    let env = Env::new();
    let (_server, api) = one_create_slot(&env, "8");
    let answers = create_burst(&api, 4);
    assert!(
        answers.iter().all(|(status, _, _)| *status == 201),
        "a create that had room in the queue was refused: {answers:?}"
    );
    assert_eq!(api.ids().len(), 4);
    assert_eq!(scrape(&api)["openrun_creates_rejected_total"], 0.0);

    // Flags are checked before the server starts.
    for bad in [["--max-creating", "0"], ["--create-queue", "lots"]] {
        let out = env.output(["serve", "--listen", "127.0.0.1:0", bad[0], bad[1]]);
        assert!(!out.status.success());
        assert!(stderr(&out).contains(bad[0]), "{}", stderr(&out));
    }
}

/// `GET /metrics`, checked against the text format 0.0.4; returns series → value.
fn scrape(api: &Api) -> BTreeMap<String, f64> {
    let res = api.get("/metrics");
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers()["content-type"].to_str().unwrap(),
        "text/plain; version=0.0.4; charset=utf-8"
    );
    parse_metrics(&res.text().unwrap())
}

/// Parses the Prometheus text format, asserting every sample belongs to a family declared
/// by a `# TYPE` line before it, names and labels are well formed, and no series repeats.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut series = BTreeMap::new();
    assert!(text.ends_with('\n'), "no final newline");
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            assert!(
                types.insert(name.to_string(), kind.to_string()).is_none(),
                "family {name} declared twice"
            );
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        assert!(!line.starts_with('#') && !line.is_empty(), "{line:?}");
        let (key, value) = line.rsplit_once(' ').expect("series value");
        let value: f64 = value.parse().unwrap_or_else(|e| panic!("{line}: {e}"));
        let name_end = key.find('{').unwrap_or(key.len());
        let name = &key[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{line}"
        );
        if name_end < key.len() {
            check_labels(&key[name_end..]);
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix)
                    .filter(|f| types.get(*f).is_some_and(|k| k == "histogram"))
            })
            .unwrap_or(name);
        assert!(types.contains_key(family), "{line}: no # TYPE before it");
        assert!(
            series.insert(key.to_string(), value).is_none(),
            "{key} repeated"
        );
    }
    series
}

/// `{k="v",...}` with escaped values.
fn check_labels(labels: &str) {
    let inner = labels
        .strip_prefix('{')
        .and_then(|l| l.strip_suffix('}'))
        .unwrap_or_else(|| panic!("labels {labels}"));
    let mut rest = inner;
    while !rest.is_empty() {
        let (name, after) = rest.split_once("=\"").unwrap_or_else(|| panic!("{labels}"));
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "{labels}"
        );
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => {
                    let escaped = chars.next().map(|(_, c)| c);
                    assert!(matches!(escaped, Some('\\' | '"' | 'n')), "{labels}");
                }
                Some((i, '"')) => break i,
                Some(_) => {}
                None => panic!("unterminated label value in {labels}"),
            }
        };
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

fn value(metrics: &BTreeMap<String, f64>, series: &str) -> f64 {
    metrics.get(series).copied().unwrap_or(0.0)
}

#[test]
fn metrics_count_requests_errors_execs_and_creates() {
    let env = Env::new();
    let api_key = key(&env, "ops");
    let server = Server::start(&env);
    let api = Api::new(&server, &api_key);

    let anonymous = Client::new()
        .get(format!("{}/metrics", server.url))
        .send()
        .unwrap();
    error(anonymous, 401, "unauthorized");

    let before = scrape(&api);
    assert_eq!(value(&before, "openrun_sandbox_create_seconds_count"), 0.0);
    assert_eq!(value(&before, r#"openrun_sandboxes{state="running"}"#), 0.0);
    assert_eq!(
        value(&before, r#"openrun_http_errors_total{code="unauthorized"}"#),
        1.0
    );
    assert_eq!(
        value(
            &before,
            r#"openrun_http_requests_total{method="GET",route="/metrics",status="401"}"#
        ),
        1.0
    );

    let id = api.create(json!({}))["id"].as_str().unwrap().to_string();
    assert_eq!(exit_line(&api.exec(&id, "true"))["code"], 0);
    error(api.get("/v1/sandboxes/nosuchsandbx"), 404, "not_found");
    error(api.get("/v1/no/such/route"), 404, "not_found");

    let after = scrape(&api);
    let delta = |series: &str| value(&after, series) - value(&before, series);
    assert_eq!(delta("openrun_exec_total"), 1.0);
    assert_eq!(delta(r#"openrun_http_errors_total{code="not_found"}"#), 2.0);
    assert_eq!(
        delta(
            r#"openrun_http_requests_total{method="GET",route="/v1/sandboxes/{id}",status="404"}"#
        ),
        1.0
    );
    assert_eq!(
        delta(r#"openrun_http_requests_total{method="GET",route="unmatched",status="404"}"#),
        1.0
    );
    assert_eq!(
        delta(
            r#"openrun_http_requests_total{method="POST",route="/v1/sandboxes/{id}/exec",status="200"}"#
        ),
        1.0
    );
    assert_eq!(
        delta(r#"openrun_http_requests_total{method="POST",route="/v1/sandboxes",status="201"}"#),
        1.0
    );
    assert_eq!(value(&after, r#"openrun_sandboxes{state="running"}"#), 1.0);

    // The histogram: one observation, cumulative buckets ending at +Inf = _count.
    assert_eq!(value(&after, "openrun_sandbox_create_seconds_count"), 1.0);
    let buckets: Vec<(f64, f64)> = after
        .iter()
        .filter_map(|(k, v)| {
            let le = k
                .strip_prefix(r#"openrun_sandbox_create_seconds_bucket{le=""#)?
                .strip_suffix(r#""}"#)?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap()
            };
            Some((le, *v))
        })
        .collect();
    assert_eq!(buckets.len(), 12, "{buckets:?}");
    let mut sorted = buckets.clone();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(sorted.windows(2).all(|w| w[0].1 <= w[1].1), "{sorted:?}");
    assert_eq!(sorted.last().unwrap(), &(f64::INFINITY, 1.0));
    let sum = value(&after, "openrun_sandbox_create_seconds_sum");
    assert!(sum > 0.0 && sum < 60.0, "{sum}");

    // Sandbox gauges are read from the database at scrape time.
    assert_eq!(api.delete(&format!("/v1/sandboxes/{id}")).status(), 204);
    let last = scrape(&api);
    assert_eq!(value(&last, r#"openrun_sandboxes{state="running"}"#), 0.0);
    let states: BTreeSet<_> = last
        .keys()
        .filter(|k| k.starts_with("openrun_sandboxes{"))
        .cloned()
        .collect();
    assert!(states.len() >= 5, "{states:?}");
}

fn local_file(env: &Env) -> Value {
    let path = env.data_dir().join("local.json");
    let mode = std::fs::metadata(&path)
        .expect("local.json")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "local.json mode {mode:o}");
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

#[test]
fn a_loopback_server_writes_a_local_key_file_once() {
    let env = Env::new();
    let server = Server::start(&env);
    let first = local_file(&env);
    assert_eq!(first["server"], server.url.as_str());
    let api_key = first["api_key"].as_str().expect("api_key").to_string();
    let api = Api::new(&server, &api_key);
    let id = api.create(json!({}))["id"].as_str().unwrap().to_string();
    let events: Vec<Value> = api
        .get(&format!("/v1/sandboxes/{id}/events"))
        .json()
        .unwrap();
    assert_eq!(events[0]["actor"], "human", "{events:?}");
    server.stop();

    // Another loopback address: the same key, the new address.
    let server = Server::start_with(&env, &["--listen", "127.0.0.2:0"]);
    assert!(
        server.url.starts_with("http://127.0.0.2:"),
        "{}",
        server.url
    );
    let second = local_file(&env);
    assert_eq!(second["api_key"], api_key.as_str());
    assert_eq!(second["server"], server.url.as_str());
    let api = Api::new(&server, &api_key);
    assert_eq!(api.ids(), std::slice::from_ref(&id));
    assert_eq!(api.delete(&format!("/v1/sandboxes/{id}")).status(), 204);
    server.stop();
    let leftovers: Vec<_> = std::fs::read_dir(env.data_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("local.json") && n != "local.json")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn a_server_on_another_address_writes_no_local_key() {
    let env = Env::new();
    let server = Server::start_with(&env, &["--listen", "0.0.0.0:0"]);
    assert!(!env.data_dir().join("local.json").exists());
    server.stop();
}

/// Starts `sh -c script` as a streaming exec and, once its `started` line arrived, reads the
/// rest of the stream in a thread (until the server ends it).
fn stream_in_background(api: &Api, id: &str, script: &str) -> std::thread::JoinHandle<String> {
    let res = api
        .req(reqwest::Method::POST, &format!("/v1/sandboxes/{id}/exec"))
        .body(json!({ "cmd": ["sh", "-c", script] }).to_string())
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
    let mut reader = BufReader::new(res);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let started: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(started["type"], "started", "{line}");
    std::thread::spawn(move || {
        let mut rest = Vec::new();
        // A connection closed under the stream is an error or an early end: return what came.
        let _ = std::io::Read::read_to_end(&mut reader, &mut rest);
        String::from_utf8_lossy(&rest).into_owned()
    })
}

/// A server, a client with a fresh key and one sandbox.
fn server_with_sandbox(env: &Env) -> (Server, String, String) {
    let api_key = key(env, "ops");
    let server = Server::start(env);
    let id = Api::new(&server, &api_key).create(json!({}))["id"]
        .as_str()
        .unwrap()
        .to_string();
    (server, api_key, id)
}

/// Sends SIGTERM; returns how long the server took to exit (asserting a clean exit).
fn terminate(server: &mut Server) -> Duration {
    let pid = rustix::process::Pid::from_raw(server.pid()).unwrap();
    let sent = Instant::now();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            assert!(status.success(), "serve exited with {status:?}");
            return sent.elapsed();
        }
        assert!(
            sent.elapsed() < Duration::from_secs(20),
            "serve ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The server's grace period for open requests at shutdown.
const GRACE: Duration = Duration::from_secs(5);

#[test]
fn sigterm_lets_a_streaming_exec_finish_and_keeps_its_exit() {
    let env = Env::new();
    let (mut server, api_key, id) = server_with_sandbox(&env);
    let reading = stream_in_background(&Api::new(&server, &api_key), &id, "sleep 1; echo finished");
    let took = terminate(&mut server);
    let lines = ndjson(&reading.join().unwrap());
    assert_eq!(stream(&lines, "stdout"), "finished\n");
    assert_eq!(exit_line(&lines)["code"], 0);
    assert!(took < GRACE, "shutdown took {took:?}");
    assert!(
        took > Duration::from_millis(500),
        "the server did not wait for the stream: {took:?}"
    );

    // The exit is in the timeline, and the sandbox outlived the server.
    let server = Server::start(&env);
    let api = Api::new(&server, &api_key);
    assert_eq!(
        api.event_kinds(&id),
        ["sandbox.create", "process.exec", "process.exit"]
    );
    let exit = &api
        .get(&format!("/v1/sandboxes/{id}/events"))
        .json::<Vec<Value>>()
        .unwrap()[2];
    assert_eq!(exit["payload"]["code"], 0, "{exit}");
    assert_eq!(exit_line(&api.exec(&id, "true"))["code"], 0);
    server.stop();
}

#[test]
fn sigterm_ends_the_server_within_the_grace_period_despite_a_longer_stream() {
    let env = Env::new();
    let (mut server, api_key, id) = server_with_sandbox(&env);
    let reading = stream_in_background(&Api::new(&server, &api_key), &id, "sleep 60");
    let took = terminate(&mut server);
    assert!(
        took >= GRACE,
        "the stream was cut before the grace period: {took:?}"
    );
    assert!(
        took < GRACE + Duration::from_secs(2),
        "shutdown took {took:?}"
    );
    let rest = reading.join().unwrap();
    assert!(!rest.contains("\"exit\""), "{rest}");

    // The sandbox and its command are still there for the next server.
    let server = Server::start(&env);
    let api = Api::new(&server, &api_key);
    let res = api.get(&format!("/v1/sandboxes/{id}/processes"));
    assert_eq!(res.status(), 200);
    let procs: Value = res.json().unwrap();
    assert!(procs.to_string().contains("sleep"), "{procs}");
    server.stop();
}
