//! Images made through the API belong to their tenant: another tenant cannot create a
//! sandbox from them (not over /v1, not as an E2B template), cannot diff against them, does
//! not learn their names (the answer is a missing image's, word for word) and is not kept from
//! using the same names; server-wide images (built or imported by the operator) stay usable by
//! every tenant; snapshots made before owners were recorded belong to their sandbox's tenant.

mod common;

use std::fs;

use common::server::*;
use common::*;
use serde_json::{json, Value};

/// A store image `name` on the host image, one layer holding `/opt/<name>`, made as `source`
/// says (`snapshot:<sandbox id>` for a snapshot made before owners were recorded).
fn host_based_image(env: &Env, name: &str, source: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("rootfs");
    fs::create_dir_all(root.join("opt")).unwrap();
    fs::write(root.join("opt").join(name), format!("{name}\n")).unwrap();
    let store = openrun_image::Store::open(env.data_dir()).unwrap();
    let staged = store.stage_dir(&root, None, "test:tenancy").unwrap();
    let record = openrun_image::ImageRecord {
        layers: vec![staged.digest.clone()],
        config: Default::default(),
        created_at: openrun_image::now(),
        source: source.into(),
        parent: None,
        base: Some(openrun_image::ImageBase::Host),
    };
    let r = openrun_image::ImageRef::parse(name).unwrap();
    store.commit(vec![staged], Some((&r, &record))).unwrap();
}

fn post_json(api: &Api, path: &str, body: Value) -> reqwest::blocking::Response {
    api.post(path, &body.to_string())
}

/// Status and body of a create from `image`; the body with `image` written as `IMAGE`.
fn create_answer(api: &Api, image: &str) -> (u16, String) {
    let res = post_json(api, "/v1/sandboxes", json!({ "image": image }));
    let status = res.status().as_u16();
    (status, res.text().unwrap().replace(image, "IMAGE"))
}

/// Status and body of an E2B create (`POST /v2/sandboxes`, `X-API-KEY`) from `template`,
/// the body with `template` written as `T`.
fn e2b_create_answer(api: &Api, template: &str) -> (u16, String) {
    let res = api
        .http
        .post(format!("{}/v2/sandboxes", api.url))
        .header("X-API-KEY", &api.key)
        .header("content-type", "application/json")
        .body(json!({ "templateID": template, "timeout": 60 }).to_string())
        .send()
        .expect("POST /v2/sandboxes");
    let status = res.status().as_u16();
    (status, res.text().unwrap().replace(template, "T"))
}

/// Runs `sh -c script` in `id`; returns stdout, asserting success.
fn run(api: &Api, id: &str, script: &str) -> String {
    let lines = api.exec(id, script);
    assert_eq!(exit_line(&lines)["code"], 0, "{script}: {lines:?}");
    stream(&lines, "stdout")
}

/// Creates a sandbox from `image` and returns what `/root/who` holds in it.
fn who_in(api: &Api, image: &str) -> String {
    let sb = api.create(json!({ "image": image }));
    let id = sb["id"].as_str().unwrap();
    assert_eq!(sb["image"], image, "{sb}");
    let who = run(api, id, "cat /root/who");
    assert_eq!(api.delete(&format!("/v1/sandboxes/{id}")).status(), 204);
    who
}

/// The store names holding `name` (`name:tag`).
fn stored_names(env: &Env, name: &str) -> Vec<String> {
    let store = openrun_image::Store::open(env.data_dir()).unwrap();
    store
        .list()
        .unwrap()
        .into_iter()
        .map(|(r, _)| r.to_string())
        .filter(|r| r.ends_with(&format!("/{name}")) || r == name)
        .collect()
}

#[test]
fn another_tenants_snapshot_is_a_missing_image() {
    let env = Env::new();
    let server = Server::start(&env);
    let alice = Api::new(&server, &key(&env, "alice"));
    let bob = Api::new(&server, &key(&env, "bob"));

    let a = alice.create(json!({}));
    let aid = a["id"].as_str().unwrap();
    run(&alice, aid, "echo alice-secret > /root/who");
    let res = post_json(
        &alice,
        &format!("/v1/sandboxes/{aid}/snapshot"),
        json!({"name": "dev-env"}),
    );
    assert_eq!(res.status(), 201);
    let snap: Value = res.json().unwrap();
    // The owner sees the name it gave.
    assert_eq!(snap["image"], "dev-env:latest", "{snap}");
    // The store keeps it under Alice's prefix, never under the bare name.
    let stored = stored_names(&env, "dev-env:latest");
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert!(stored[0].starts_with("tenants/"), "{stored:?}");

    // Bob: A's name, with or without its tag, and its store name answer as a name nobody has.
    let missing = create_answer(&bob, "no-such-image");
    assert_eq!(missing.0, 400, "{missing:?}");
    assert!(missing.1.contains("not found"), "{missing:?}");
    for name in ["dev-env", "dev-env:latest", stored[0].as_str()] {
        assert_eq!(create_answer(&bob, name), missing, "{name}");
    }
    // The same through E2B's create: 404 as for an unknown template.
    let e2b_missing = e2b_create_answer(&bob, "no-such-template");
    assert_eq!(e2b_missing.0, 404, "{e2b_missing:?}");
    assert_eq!(e2b_create_answer(&bob, "dev-env"), e2b_missing);
    // Alice's own snapshot is a template for her.
    let (status, body) = e2b_create_answer(&alice, "dev-env");
    assert_eq!(status, 201, "{body}");
    let created: Value = serde_json::from_str(&body).unwrap();
    let eid = created["sandboxID"].as_str().unwrap();
    assert_eq!(run(&alice, eid, "cat /root/who"), "alice-secret\n");
    assert_eq!(alice.delete(&format!("/v1/sandboxes/{eid}")).status(), 204);
    // Nor can Bob compare his sandbox with it.
    let b = bob.create(json!({}));
    let bid = b["id"].as_str().unwrap();
    let diff_answer = |against: &str| {
        let res = bob.get(&format!("/v1/sandboxes/{bid}/diff?against={against}"));
        let status = res.status().as_u16();
        (status, res.text().unwrap().replace(against, "IMAGE"))
    };
    let diff_missing = diff_answer("no-such-image");
    assert_eq!(diff_missing.0, 400, "{diff_missing:?}");
    assert_eq!(diff_answer("dev-env"), diff_missing);

    // Bob may use the name Alice used: his own image, no conflict, no trace of hers.
    run(&bob, bid, "echo bob > /root/who");
    let res = post_json(
        &bob,
        &format!("/v1/sandboxes/{bid}/snapshot"),
        json!({"name": "dev-env"}),
    );
    assert_eq!(res.status(), 201);
    assert_eq!(res.json::<Value>().unwrap()["image"], "dev-env:latest");
    assert_eq!(stored_names(&env, "dev-env:latest").len(), 2);
    assert_eq!(who_in(&bob, "dev-env"), "bob\n");
    // Alice still has hers; taking the name again is a conflict on her own name.
    assert_eq!(who_in(&alice, "dev-env"), "alice-secret\n");
    let res = post_json(
        &alice,
        &format!("/v1/sandboxes/{aid}/snapshot"),
        json!({"name": "dev-env"}),
    );
    let message = error(res, 409, "already_exists");
    assert!(message.contains("dev-env:latest"), "{message}");
    assert!(!message.contains("tenants/"), "{message}");
    // A diff against her own snapshot: nothing changed since.
    let diff: Value = alice
        .get(&format!("/v1/sandboxes/{aid}/diff?against=dev-env"))
        .json()
        .unwrap();
    assert_eq!(diff["changes"], json!([]), "{diff}");

    // A fork: its snapshot (default name) is Alice's too.
    let res = post_json(
        &alice,
        &format!("/v1/sandboxes/{aid}/fork"),
        json!({"count": 1}),
    );
    assert_eq!(res.status(), 201);
    let forks: Vec<Value> = res.json().unwrap();
    let fork_image = forks[0]["image"].as_str().unwrap().to_string();
    assert!(
        fork_image.starts_with(&format!("snap-{aid}-")),
        "{fork_image}"
    );
    let fid = forks[0]["id"].as_str().unwrap();
    assert_eq!(run(&alice, fid, "cat /root/who"), "alice-secret\n");
    assert_eq!(who_in(&alice, &fork_image), "alice-secret\n");
    assert_eq!(create_answer(&bob, &fork_image), missing);
    assert_eq!(e2b_create_answer(&bob, &fork_image), e2b_missing);
    // A snapshot without a name: Alice's as well.
    let res = post_json(&alice, &format!("/v1/sandboxes/{aid}/snapshot"), json!({}));
    assert_eq!(res.status(), 201);
    let unnamed = res.json::<Value>().unwrap()["image"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(unnamed.starts_with(&format!("snap-{aid}-")), "{unnamed}");
    assert_ne!(unnamed, fork_image);
    assert_eq!(create_answer(&bob, &unnamed), missing);
    assert_eq!(who_in(&alice, &unnamed), "alice-secret\n");
}

#[test]
fn server_wide_images_stay_shared_and_old_snapshots_keep_their_tenant() {
    let env = Env::new();
    let server = Server::start(&env);
    let alice = Api::new(&server, &key(&env, "alice"));
    let bob = Api::new(&server, &key(&env, "bob"));
    let a = alice.create(json!({}));
    let aid = a["id"].as_str().unwrap();

    // An operator's image (openrun image build/import): every tenant uses it, and its name
    // is taken for everyone's snapshots (it is a name they all see).
    host_based_image(&env, "shared", "test");
    for api in [&alice, &bob] {
        let sb = api.create(json!({"image": "shared"}));
        let id = sb["id"].as_str().unwrap();
        assert_eq!(run(api, id, "cat /opt/shared"), "shared\n");
        assert_eq!(api.delete(&format!("/v1/sandboxes/{id}")).status(), 204);
    }
    let res = post_json(
        &alice,
        &format!("/v1/sandboxes/{aid}/snapshot"),
        json!({"name": "shared"}),
    );
    error(res, 409, "already_exists");
    // `host` stays the built-in image for all.
    let res = post_json(
        &alice,
        &format!("/v1/sandboxes/{aid}/snapshot"),
        json!({"name": "host"}),
    );
    error(res, 400, "invalid_argument");

    // A snapshot of Alice's sandbox made before owners were recorded (unprefixed): hers.
    host_based_image(&env, "old-snap", &format!("snapshot:{aid}"));
    let missing = create_answer(&bob, "no-such-image");
    assert_eq!(create_answer(&bob, "old-snap"), missing);
    let sb = alice.create(json!({"image": "old-snap"}));
    let id = sb["id"].as_str().unwrap();
    assert_eq!(run(&alice, id, "cat /opt/old-snap"), "old-snap\n");
    // Bob can still take the name for himself.
    let b = bob.create(json!({}));
    let bid = b["id"].as_str().unwrap();
    let res = post_json(
        &bob,
        &format!("/v1/sandboxes/{bid}/snapshot"),
        json!({"name": "old-snap"}),
    );
    assert_eq!(res.status(), 201);
    let sb = bob.create(json!({"image": "old-snap"}));
    let id = sb["id"].as_str().unwrap();
    run(&bob, id, "test ! -e /opt/old-snap");
}
