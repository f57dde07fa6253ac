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
