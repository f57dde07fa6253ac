//! Snapshots, forks and diffs of real sandboxes, through the server and the embedded CLI:
//! forks see what was there at the snapshot (deletions included) and diverge afterwards;
//! diffs list and patch what a sandbox changed, and report (never read through) the links it
//! plants; a paused sandbox stays paused; bad requests and other tenants are refused.

mod common;

use std::fs;
use std::path::Path;

use common::server::*;
use common::*;
use serde_json::{json, Value};

const APPLETS: &[&str] = &[
    "sh", "cat", "echo", "test", "rm", "ln", "stat", "dd", "mkdir", "printf", "ls",
];

/// A store image `bb` made of one layer: a static busybox and its applets, an /etc with a
/// greeting and a file to delete, and /work.
fn busybox_image(env: &Env) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("rootfs");
    for d in ["bin", "etc", "work", "root", "opt/old"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static is needed");
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    fs::write(root.join("etc/greeting"), "hello\nworld\n").unwrap();
    fs::write(root.join("etc/gone"), "delete me\n").unwrap();
    fs::write(root.join("opt/old/file"), "replaced\n").unwrap();
    let store = openrun_image::Store::open(env.data_dir()).unwrap();
    let staged = store.stage_dir(&root, None, "test:busybox").unwrap();
    let record = openrun_image::ImageRecord {
        layers: vec![staged.digest.clone()],
        config: openrun_image::ImageConfig {
            env: vec!["PATH=/bin".into()],
            ..Default::default()
        },
        created_at: openrun_image::now(),
        source: "test".into(),
        parent: None,
        base: None,
    };
    let r = openrun_image::ImageRef::parse("bb").unwrap();
    store.commit(vec![staged], Some((&r, &record))).unwrap();
}

/// Runs `script` in sandbox `id`; returns stdout, asserting exit code `code`.
fn run(api: &Api, id: &str, script: &str, code: i64) -> String {
    let lines = api.exec(id, script);
    let exit = exit_line(&lines);
    assert_eq!(exit["code"], code, "{script}: {lines:?}");
    stream(&lines, "stdout")
}

/// Runs `change` in the first of `forks`, then `check` (which must succeed) in the other
/// forks and in `parent`: the change must be invisible there. Returns their outputs.
fn diverge(api: &Api, forks: &[String], parent: &str, change: &str, check: &str) -> Vec<String> {
    run(api, &forks[0], change, 0);
    forks[1..]
        .iter()
        .map(String::as_str)
        .chain([parent])
        .map(|id| run(api, id, check, 0))
        .collect()
}

/// Forks sandbox `id` into `count` running sandboxes through the API; returns the image they
/// share and their resources.
fn fork(api: &Api, id: &str, count: usize) -> (String, Vec<Value>) {
    let res = post_json(
        api,
        &format!("/v1/sandboxes/{id}/fork"),
        json!({ "count": count }),
    );
    assert_eq!(res.status(), 201);
    let forks: Vec<Value> = res.json().unwrap();
    assert_eq!(forks.len(), count);
    let image = forks[0]["image"].as_str().unwrap().to_string();
    for f in &forks {
        assert_eq!(f["image"], image.as_str());
        assert_eq!(f["state"], "running");
    }
    (image, forks)
}

/// The store name of a tenant's image `name` (`name[:tag]` as the API shows it): the store
/// keeps the images a tenant makes under its prefix `tenants/<hash>/`; returns `name:tag`.
fn stored(env: &Env, name: &str) -> String {
    let name = openrun_image::ImageRef::parse(name).unwrap().to_string();
    let store = openrun_image::Store::open(env.data_dir()).unwrap();
    let found: Vec<String> = store
        .list()
        .unwrap()
        .into_iter()
        .map(|(r, _)| r.to_string())
        .filter(|r| r.starts_with("tenants/") && r.ends_with(&format!("/{name}")))
        .collect();
    assert_eq!(found.len(), 1, "{name}: {found:?}");
    found[0].clone()
}

fn post_json(api: &Api, path: &str, body: Value) -> reqwest::blocking::Response {
    api.post(path, &body.to_string())
}

#[test]
fn forks_see_the_snapshot_and_diverge() {
    let env = Env::new();
    busybox_image(&env);
    let server = Server::start(&env);
    let api = Api::new(&server, &key(&env, "forker"));
    let parent = api.create(json!({"image": "bb", "memory": "256M", "env": {"WHO": "parent"}}));
    let pid = parent["id"].as_str().unwrap();
    run(
        &api,
        pid,
        "echo before > /work/before && echo again >> /etc/greeting && rm /etc/gone \
         && echo linked > /work/a && ln /work/a /work/b \
         && rm -rf /opt && mkdir /opt && echo fresh > /opt/new",
        0,
    );
    let (image, forks) = fork(&api, pid, 3);
    assert!(image.starts_with(&format!("snap-{pid}-")), "{image}");
    let ids: Vec<String> = forks
        .iter()
        .map(|f| {
            assert_eq!(f["image"], image.as_str());
            assert_eq!(f["state"], "running");
            // Limits and environment come from the parent.
            assert_eq!(f["limits"]["memory_bytes"], 256 << 20);
            assert_eq!(f["env"]["WHO"], "parent");
            f["id"].as_str().unwrap().to_string()
        })
        .collect();
    // Every fork has what was there at the snapshot, the deletion (a whiteout) and the
    // replaced directory (opaque) included, hard links kept.
    for id in &ids {
        let out = run(
            &api,
            id,
            "cat /work/before /etc/greeting; test -e /etc/gone && echo still-there; \
             stat -c %h /work/a; echo $WHO; ls /opt",
            0,
        );
        assert_eq!(out, "before\nhello\nworld\nagain\n2\nparent\nnew\n", "{id}");
    }
    // Changes in one fork are invisible to the other forks and to the parent.
    diverge(
        &api,
        &ids,
        pid,
        "echo mine > /work/only0 && rm /work/before",
        "test ! -e /work/only0 && cat /work/before",
    );
    // And the parent's later changes are invisible to the forks.
    run(&api, pid, "echo later > /work/later", 0);
    for id in &ids {
        run(&api, id, "test ! -e /work/later", 0);
    }
    // The snapshot image makes sandboxes like any other image.
    let more = api.create(json!({"image": image}));
    let out = run(&api, more["id"].as_str().unwrap(), "cat /work/before", 0);
    assert_eq!(out, "before\n");
    let kinds = api.event_kinds(pid);
    assert!(
        kinds.contains(&"sandbox.snapshot".to_string())
            && kinds.contains(&"sandbox.fork".to_string()),
        "{kinds:?}"
    );
    // A snapshot of its own, named; the store has it with the parent's layer below.
    let res = post_json(
        &api,
        &format!("/v1/sandboxes/{pid}/snapshot"),
        json!({"name": "parent-snap:v1"}),
    );
    assert_eq!(res.status(), 201);
    let snap: Value = res.json().unwrap();
    assert_eq!(snap["image"], "parent-snap:v1");
    assert_eq!(snap["layers"].as_array().unwrap().len(), 2);
    assert!(snap["bytes"].as_u64().unwrap() > 0);
    assert!(snap["duration_ms"].is_u64() && snap["paused_ms"].is_u64());
    let store = openrun_image::Store::open(env.data_dir()).unwrap();
    let record = store
        .get(&openrun_image::ImageRef::parse(&stored(&env, "parent-snap:v1")).unwrap())
        .unwrap();
    assert_eq!(record.config.env, ["PATH=/bin"]);
    assert_eq!(record.parent.as_deref(), Some("bb"));
}

#[test]
fn diff_lists_changes_with_a_patch_and_never_follows_links() {
    let env = Env::new();
    busybox_image(&env);
    let server = Server::start(&env);
    let api = Api::new(&server, &key(&env, "reviewer"));
    let sb = api.create(json!({"image": "bb"}));
    let id = sb["id"].as_str().unwrap();
    run(
        &api,
        id,
        "printf 'new file\\n' > /work/new.txt && echo again >> /etc/greeting && rm /etc/gone \
         && ln -s /etc/shadow /work/shadow && printf 'a\\000b' > /work/blob && mkdir /work/d",
        0,
    );
    let res = api.get(&format!("/v1/sandboxes/{id}/diff"));
    assert_eq!(res.status(), 200);
    let diff: Value = res.json().unwrap();
    let changes = changed(&diff);
    let expect = change;
    assert_eq!(
        changes,
        [
            expect("/etc/gone", "deleted", "file"),
            expect("/etc/greeting", "modified", "file"),
            expect("/work/blob", "added", "file"),
            expect("/work/d", "added", "dir"),
            expect("/work/new.txt", "added", "file"),
            expect("/work/shadow", "added", "symlink"),
        ],
        "{diff}"
    );
    let link = &diff["changes"][5];
    assert_eq!(link["link_target"], "/etc/shadow");
    assert_eq!(link["size"], "/etc/shadow".len());
    let patch = diff["patch"].as_str().unwrap();
    assert!(
        patch.contains(
            "diff --git a/etc/greeting b/etc/greeting\n--- a/etc/greeting\n+++ b/etc/greeting\n\
             @@ -1,2 +1,3 @@\n hello\n world\n+again\n"
        ),
        "{patch}"
    );
    assert!(
        patch.contains(
            "deleted file mode 100644\n--- a/etc/gone\n+++ /dev/null\n@@ -1 +0,0 @@\n-delete me\n"
        ),
        "{patch}"
    );
    assert!(
        patch.contains(
            "new file mode 100644\n--- /dev/null\n+++ b/work/new.txt\n@@ -0,0 +1 @@\n+new file\n"
        ),
        "{patch}"
    );
    assert!(
        patch.contains("Binary files /dev/null and b/work/blob differ"),
        "{patch}"
    );
    assert!(patch.contains("+/etc/shadow\n"), "{patch}");
    // The host's /etc/shadow (root's entry) was never read through the link.
    assert!(!patch.contains("root:"), "{patch}");
    assert_eq!(diff["truncated"], false);
    // One path only.
    let res = api.get(&format!("/v1/sandboxes/{id}/diff?path=/etc/greeting"));
    let one: Value = res.json().unwrap();
    assert_eq!(one["changes"].as_array().unwrap().len(), 1, "{one}");
    assert!(!one["patch"].as_str().unwrap().contains("new.txt"));
    // Against a snapshot: only what changed since.
    let res = post_json(
        &api,
        &format!("/v1/sandboxes/{id}/snapshot"),
        json!({"name": "review"}),
    );
    assert_eq!(res.status(), 201);
    run(&api, id, "echo more >> /work/new.txt && rm /work/blob", 0);
    let res = api.get(&format!("/v1/sandboxes/{id}/diff?against=review"));
    assert_eq!(res.status(), 200);
    let since: Value = res.json().unwrap();
    let paths: Vec<(&str, &str)> = since["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["path"].as_str().unwrap(), c["kind"].as_str().unwrap()))
        .collect();
    assert_eq!(
        paths,
        [("/work/blob", "deleted"), ("/work/new.txt", "modified")],
        "{since}"
    );
    assert!(since["patch"]
        .as_str()
        .unwrap()
        .contains(" new file\n+more\n"));
    // Bad input: a relative path, `..`, an unknown parameter, an unknown image.
    for query in ["path=etc", "path=/etc/../x", "bogus=1", "against=nosuch"] {
        let res = api.get(&format!("/v1/sandboxes/{id}/diff?{query}"));
        error(res, 400, "invalid_argument");
    }
}

#[test]
fn a_paused_sandbox_is_snapshotted_and_stays_paused() {
    let env = Env::new();
    busybox_image(&env);
    let server = Server::start(&env);
    let api = Api::new(&server, &key(&env, "pauser"));
    let sb = api.create(json!({"image": "bb"}));
    let id = sb["id"].as_str().unwrap();
    run(&api, id, "echo frozen > /work/state", 0);
    assert_eq!(
        api.post(&format!("/v1/sandboxes/{id}/pause"), "").status(),
        200
    );
    let res = post_json(&api, &format!("/v1/sandboxes/{id}/snapshot"), json!({}));
    assert_eq!(res.status(), 201);
    let snap: Value = res.json().unwrap();
    assert_eq!(snap["paused_ms"], 0, "{snap}");
    let now: Value = api.get(&format!("/v1/sandboxes/{id}")).json().unwrap();
    assert_eq!(now["state"], "paused");
    let res = post_json(
        &api,
        &format!("/v1/sandboxes/{id}/exec"),
        json!({"cmd": ["true"]}),
    );
    error(res, 409, "sandbox_paused");
    let fork = api.create(json!({"image": snap["image"]}));
    let out = run(&api, fork["id"].as_str().unwrap(), "cat /work/state", 0);
    assert_eq!(out, "frozen\n");
    assert_eq!(
        api.post(&format!("/v1/sandboxes/{id}/resume"), "").status(),
        200
    );
    run(&api, id, "cat /work/state", 0);
}

#[test]
fn bad_requests_and_other_tenants_are_refused() {
    let env = Env::new();
    busybox_image(&env);
    let server = Server::start(&env);
    let api = Api::new(&server, &key(&env, "owner"));
    let other = Api::new(&server, &key(&env, "intruder"));
    let sb = api.create(json!({"image": "bb"}));
    let id = sb["id"].as_str().unwrap();
    for (path, body) in [("snapshot", json!({})), ("fork", json!({"count": 1}))] {
        let res = post_json(&other, &format!("/v1/sandboxes/{id}/{path}"), body);
        error(res, 404, "not_found");
    }
    error(
        other.get(&format!("/v1/sandboxes/{id}/diff")),
        404,
        "not_found",
    );
    for body in [
        json!({"count": 0}),
        json!({"count": 101}),
        json!({"count": "3"}),
        json!({}),
        json!({"count": 1, "image": "bb"}),
        json!({"count": 1, "memory": "lots"}),
        json!({"count": 1, "bogus": true}),
        json!({"count": 1, "name": "host"}),
    ] {
        let res = post_json(&api, &format!("/v1/sandboxes/{id}/fork"), body.clone());
        let message = error(res, 400, "invalid_argument");
        assert!(!message.is_empty(), "{body}");
    }
    // Nothing was made by the refused forks.
    assert_eq!(api.ids(), [id]);
    let res = post_json(
        &api,
        &format!("/v1/sandboxes/{id}/snapshot"),
        json!({"name": "../x"}),
    );
    error(res, 400, "invalid_argument");
    let res = post_json(
        &api,
        &format!("/v1/sandboxes/{id}/snapshot"),
        json!({"name": "taken"}),
    );
    assert_eq!(res.status(), 201);
    let res = post_json(
        &api,
        &format!("/v1/sandboxes/{id}/snapshot"),
        json!({"name": "taken"}),
    );
    error(res, 409, "already_exists");
    // A sandbox on the host image: its changes are reviewed, /usr included.
    let host = api.create(json!({}));
    let hid = host["id"].as_str().unwrap();
    run(&api, hid, "echo x > /root/note && touch /usr/local/tool", 0);
    let diff: Value = api
        .get(&format!("/v1/sandboxes/{hid}/diff"))
        .json()
        .unwrap();
    let paths: Vec<&str> = diff["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["/root/note", "/usr/local/tool"], "{diff}");
    // A deleted sandbox is gone for all three.
    assert_eq!(api.delete(&format!("/v1/sandboxes/{id}")).status(), 204);
    let res = post_json(&api, &format!("/v1/sandboxes/{id}/snapshot"), json!({}));
    error(res, 404, "not_found");
}

/// `(path, kind, type)` of a diff's changes.
fn changed(diff: &Value) -> Vec<(String, String, String)> {
    diff["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let field = |k: &str| c[k].as_str().unwrap();
            change(field("path"), field("kind"), field("type"))
        })
        .collect()
}

fn change(path: &str, kind: &str, file_type: &str) -> (String, String, String) {
    (path.to_string(), kind.to_string(), file_type.to_string())
}

#[test]
fn host_sandboxes_snapshot_and_fork_with_their_usr_changes() {
    let env = Env::new();
    let server = Server::start(&env);
    let api = Api::new(&server, &key(&env, "hoster"));
    let parent = api.create(json!({"env": {"WHO": "parent"}}));
    let pid = parent["id"].as_str().unwrap();
    assert_eq!(parent["image"], "host");
    // Outside /tmp (the sandbox's own tmpfs): the root's layer, the /usr mount's layer, and
    // a file of the host image's /etc skeleton deleted.
    run(
        &api,
        pid,
        "test -f /etc/motd && echo note > /root/x \
         && printf '#!/bin/sh\\necho tool ran \"$@\"\\n' > /usr/local/bin/tool \
         && chmod 755 /usr/local/bin/tool && rm /etc/motd",
        0,
    );
    let (image, forks) = fork(&api, pid, 3);
    let ids: Vec<String> = forks
        .iter()
        .map(|f| {
            assert_eq!(f["image"], image.as_str());
            assert_eq!(f["env"]["WHO"], "parent");
            f["id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(ids.len(), 3);
    // The store has one layer on the host image (its /usr is never copied).
    let store = openrun_image::Store::open(env.data_dir()).unwrap();
    let record = store
        .get(&openrun_image::ImageRef::parse(&stored(&env, &image)).unwrap())
        .unwrap();
    assert_eq!(record.base, Some(openrun_image::ImageBase::Host));
    assert_eq!(record.layers.len(), 1);
    assert_eq!(record.parent.as_deref(), Some("host"));
    let size = store.layer_info(&record.layers[0]).unwrap().size;
    assert!(
        size < 1 << 20,
        "the layer holds the changes only: {size} bytes"
    );
    let sees_parent = "cat /root/x; /usr/local/bin/tool a; test ! -e /etc/motd && echo gone; \
                       test -f /etc/passwd && ls /usr/bin/env";
    for id in &ids {
        let out = run(&api, id, sees_parent, 0);
        assert_eq!(out, "note\ntool ran a\ngone\n/usr/bin/env\n", "{id}");
    }
    // A change in one fork, under /usr and at the root, is invisible to the others and to
    // the parent.
    let outputs = diverge(
        &api,
        &ids,
        pid,
        "echo mine > /usr/local/bin/only0 && rm /root/x && echo '# v2' >> /usr/local/bin/tool",
        "test ! -e /usr/local/bin/only0 && cat /root/x && /usr/local/bin/tool b",
    );
    assert_eq!(outputs, ["note\ntool ran b\n"; 3]);
    // The fork's diff against the snapshot (and against its own image, the same) holds its
    // own changes only.
    let expected = [
        change("/root/x", "deleted", "file"),
        change("/usr/local/bin/only0", "added", "file"),
        change("/usr/local/bin/tool", "modified", "file"),
    ];
    for query in [format!("?against={image}"), String::new()] {
        let res = api.get(&format!("/v1/sandboxes/{}/diff{query}", ids[0]));
        assert_eq!(res.status(), 200);
        let diff: Value = res.json().unwrap();
        assert_eq!(changed(&diff), expected, "{query}: {diff}");
        assert!(
            diff["patch"].as_str().unwrap().contains("+# v2\n"),
            "{diff}"
        );
    }
    // Against the host image itself: the parent's changes and the fork's together.
    let res = api.get(&format!("/v1/sandboxes/{}/diff?against=host", ids[1]));
    let diff: Value = res.json().unwrap();
    assert_eq!(
        changed(&diff),
        [
            change("/etc/motd", "deleted", "file"),
            change("/root/x", "added", "file"),
            change("/usr/local/bin/tool", "added", "file"),
        ],
        "{diff}"
    );
    // A sandbox on the host image and an image that is not cannot be compared.
    busybox_image(&env);
    let message = error(
        api.get(&format!("/v1/sandboxes/{pid}/diff?against=bb")),
        400,
        "invalid_argument",
    );
    assert!(message.contains("host image"), "{message}");
    // A snapshot of a fork stacks a second layer on /usr too.
    let res = post_json(
        &api,
        &format!("/v1/sandboxes/{}/snapshot", ids[0]),
        json!({"name": "gen2"}),
    );
    assert_eq!(res.status(), 201);
    let snap: Value = res.json().unwrap();
    assert_eq!(snap["layers"].as_array().unwrap().len(), 2);
    let gen2 = api.create(json!({"image": "gen2"}));
    let out = run(
        &api,
        gen2["id"].as_str().unwrap(),
        "cat /usr/local/bin/only0; test ! -e /root/x && /usr/local/bin/tool c",
        0,
    );
    assert_eq!(out, "mine\ntool ran c\n");
    // The embedded CLI runs the snapshot like any image (by its store name), and lists its
    // base.
    let (image, gen2) = (stored(&env, &image), stored(&env, "gen2"));
    let gen2_name = gen2.rsplit_once(':').unwrap().0;
    let out = env.output([
        "run",
        "--image",
        &image,
        "--",
        "sh",
        "-c",
        "cat /root/x && /usr/local/bin/tool d",
    ]);
    assert_ok(&out);
    assert_eq!(stdout(&out), "note\ntool ran d\n");
    let out = env.output(["image", "ls"]);
    assert_ok(&out);
    let listing = stdout(&out);
    let row = listing
        .lines()
        .find(|l| l.starts_with(&format!("{gen2_name} ")))
        .unwrap_or_else(|| panic!("{listing}"));
    let columns: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        columns[..4],
        [gen2_name, "latest", "host", "2"],
        "{listing}"
    );
    let out = env.output(["image", "inspect", "--json", &gen2]);
    assert_ok(&out);
    let inspected: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(inspected["base"], "host");
    // A Dockerfile cannot build on it: it is a tenant's snapshot (and a host-based one, whose
    // steps would run without the host's /usr: builds.rs covers that refusal).
    let context = tempfile::tempdir().unwrap();
    fs::write(
        context.path().join("Dockerfile"),
        format!("FROM {gen2}\nRUN true\n"),
    )
    .unwrap();
    let out = env
        .cmd(["image", "build", "-t", "on-gen2"])
        .arg(context.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("a tenant's snapshot cannot be a build base"),
        "{}",
        stderr(&out)
    );
    // With their names gone, prune keeps the layers live sandboxes stack (on / and /usr).
    for name in [image.as_str(), gen2.as_str()] {
        assert_ok(&env.output(["image", "rm", name]));
    }
    assert_ok(&env.output(["image", "prune"]));
    assert!(store.has_layer(&record.layers[0]));
    let out = run(&api, &ids[1], "/usr/local/bin/tool e", 0);
    assert_eq!(out, "tool ran e\n");
}

#[test]
fn the_cli_snapshots_forks_and_diffs_local_sandboxes() {
    let env = Env::new();
    busybox_image(&env);
    let id = env.create(&["--image", "bb"]);
    let out = env.exec_sh(&id, "echo cli > /work/f && rm /etc/gone");
    assert_ok(&out);
    let out = env.output(["diff", &id]);
    assert_ok(&out);
    let patch = stdout(&out);
    assert!(
        patch.contains("+++ b/work/f\n@@ -0,0 +1 @@\n+cli\n"),
        "{patch}"
    );
    let out = env.output(["diff", "--name-status", &id]);
    assert_eq!(stdout(&out), "D\t/etc/gone\nA\t/work/f\n");
    let out = env.output(["diff", &id, "/work"]);
    assert!(!stdout(&out).contains("etc/gone"));
    let out = env.output(["snapshot", &id, "-t", "cli-snap"]);
    assert_ok(&out);
    assert_eq!(stdout(&out), "cli-snap:latest\n");
    let out = env.output(["fork", &id, "-n", "2"]);
    assert_ok(&out);
    let forks: Vec<String> = stdout(&out).lines().map(str::to_owned).collect();
    assert_eq!(forks.len(), 2, "{forks:?}");
    for fork in &forks {
        let out = env.output([
            "exec",
            fork,
            "--",
            "sh",
            "-c",
            "cat /work/f; test ! -e /etc/gone",
        ]);
        assert_ok(&out);
        assert_eq!(stdout(&out), "cli\n");
    }
    // Nothing changed since the snapshot; a memory sandbox cannot be compared.
    let out = env.output(["diff", &id, "--against", "cli-snap"]);
    assert_ok(&out);
    assert_eq!(stdout(&out), "");
    let out = env.output(["fork", &id, "-n", "0"]);
    assert!(!out.status.success());
    let out = env.output(["snapshot", &id, "-t", "cli-snap"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));
    let mem = env.create(&["--image", "bb", "--storage", "memory"]);
    let out = env.output(["snapshot", &mem]);
    assert_eq!(out.status.code(), Some(125));
    assert!(stderr(&out).contains("in memory"), "{}", stderr(&out));
    assert!(Path::new(env.data_dir()).join("images/store").is_dir());
}

/// A tmpfs of `size` mounted on a data dir, unmounted (lazily, sandboxes may hold it) when
/// dropped: declared after the [`Env`] whose dir it covers, so it goes first.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: &Path, size: &str) -> Self {
        let status = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(status.success(), "mount a tmpfs on {}", dir.display());
        Self(dir.to_path_buf())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// The server's disk fills up during a snapshot: the answer is 507 `insufficient_storage`
/// naming that (not a bare 500), nothing half-made is left (no image, the space given back),
/// and the sandbox goes on; once its big file is gone the same snapshot succeeds.
#[test]
fn a_snapshot_that_fills_the_disk_is_a_507_and_leaves_nothing_behind() {
    let env = Env::new();
    let _disk = SmallDisk::mount(env.data_dir(), "64m");
    // No warm pool: a refill recording its sandbox during the snapshot (refills wait for a
    // quiet server, at most 250 ms) would take blocks of the disk the check below counts.
    let server = Server::start_cold(&env);
    let api = Api::new(&server, &key(&env, "filler"));
    let sb = api.create(json!({}));
    let id = sb["id"].as_str().unwrap();
    // Random bytes (nothing to share or compress) filling most of what is left.
    run(
        &api,
        id,
        "dd if=/dev/urandom of=/root/big bs=1M count=40 2>/dev/null; echo kept > /root/note",
        0,
    );
    let free_before = rustix::fs::statvfs(env.data_dir()).unwrap().f_bavail;
    let res = post_json(
        &api,
        &format!("/v1/sandboxes/{id}/snapshot"),
        json!({"name": "full"}),
    );
    let message = error(res, 507, "insufficient_storage");
    assert_eq!(
        message,
        "cannot snapshot the sandbox: the server's disk is full"
    );
    let free_after = rustix::fs::statvfs(env.data_dir()).unwrap().f_bavail;
    assert!(
        free_after >= free_before,
        "the failed snapshot kept {} blocks",
        free_before - free_after
    );
    let images: Value = api.get("/v1/images").json().unwrap();
    assert!(
        !images.to_string().contains("full"),
        "a failed snapshot left an image: {images}"
    );
    assert_eq!(run(&api, id, "cat /root/note", 0), "kept\n");
    run(&api, id, "rm /root/big", 0);
    let res = post_json(
        &api,
        &format!("/v1/sandboxes/{id}/snapshot"),
        json!({"name": "full"}),
    );
    assert_eq!(res.status(), 201);
    let fork = api.create(json!({"image": "full"}));
    let out = run(
        &api,
        fork["id"].as_str().unwrap(),
        "cat /root/note; ls /root",
        0,
    );
    assert_eq!(out, "kept\nnote\n");
}
