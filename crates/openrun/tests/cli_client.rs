//! The `openrun` verbs as a client of `openrun serve`: the real binary against a real server
//! on loopback, chosen by flags, by variables and by a config file. Root only (CI runs as root).

mod common;
use common::server::*;
use common::*;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The binary pointed at one server with one key, isolated from any config of the machine.
struct Client<'a> {
    env: &'a Env,
    url: String,
    key: String,
    config_home: tempfile::TempDir,
}

impl<'a> Client<'a> {
    fn new(env: &'a Env, server: &Server, key: &str) -> Self {
        Self {
            env,
            url: server.url.clone(),
            key: key.to_string(),
            config_home: tempfile::tempdir().unwrap(),
        }
    }

    /// `openrun` with no server chosen: no flags, variables or config file.
    fn bare(&self) -> Command {
        let mut c = self.env.cmd(std::iter::empty::<&str>());
        c.env_remove("OPENRUN_SERVER")
            .env_remove("OPENRUN_API_KEY")
            .env_remove("OPENRUN_CONFIG")
            .env("XDG_CONFIG_HOME", self.config_home.path())
            .env("HOME", self.config_home.path());
        c
    }

    /// `openrun --server URL --api-key KEY ARGS…`.
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = self.bare();
        c.args(["--server", &self.url, "--api-key", &self.key])
            .args(args);
        c
    }

    fn out(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Runs, asserts success, returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.out(args);
        assert_ok(&out);
        stdout(&out)
    }

    fn json(&self, args: &[&str]) -> Value {
        let text = self.ok(args);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
    }

    fn create(&self, extra: &[&str]) -> String {
        let mut args = vec!["create"];
        args.extend_from_slice(extra);
        let id = self.ok(&args).trim().to_string();
        assert_eq!(id.len(), 12, "{id:?}");
        id
    }
}

/// A data dir, a key and a server on it (the server is stopped first when dropped).
struct Setup {
    server: Server,
    key: String,
    env: Env,
}

impl Setup {
    fn new() -> Self {
        let env = Env::new();
        let key = key(&env, "cli");
        let server = Server::start_cold(&env);
        Self { server, key, env }
    }

    fn client(&self) -> Client<'_> {
        Client::new(&self.env, &self.server, &self.key)
    }

    fn api(&self) -> Api {
        Api::new(&self.server, &self.key)
    }
}

/// Asserts the exit code and that stderr has `text`.
fn assert_fails(out: &Output, code: i32, text: &str) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout: {}\nstderr: {}",
        stdout(out),
        stderr(out)
    );
    assert!(stderr(out).contains(text), "stderr: {}", stderr(out));
}

#[test]
fn create_exec_ls_inspect_rm_through_the_server() {
    let setup = Setup::new();
    let cli = setup.client();
    let api = setup.api();

    let created = cli.json(&[
        "create",
        "--json",
        "--memory",
        "128M",
        "--cpus",
        "0.5",
        "--pids",
        "64",
        "--ttl",
        "10m",
        "-e",
        "GREETING=hi",
        "--label",
        "team=ml",
        "--label",
        "tier=dev",
    ]);
    let id = created["id"].as_str().expect("id").to_string();
    assert_eq!(created["state"], "running");
    assert_eq!(created["limits"]["memory_bytes"], 128 << 20);
    assert_eq!(created["limits"]["cpu_millis"], 500);
    assert_eq!(created["limits"]["pids"], 64);
    // The server made it: its API sees it.
    assert!(api.ids().contains(&id));

    // exec: the bytes as written, on the right streams, and the exit code.
    let out = cli.out(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        r"printf 'a\001\377\000z'; printf err >&2; echo $GREETING >&2; exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    assert_eq!(out.stdout, b"a\x01\xff\x00z");
    assert_eq!(stderr(&out), "errhi\n");
    let out = cli.out(&[
        "exec",
        "-e",
        "X=1",
        "-w",
        "/tmp",
        &id,
        "--",
        "sh",
        "-c",
        "echo $X $(pwd)",
    ]);
    assert_ok(&out);
    assert_eq!(stdout(&out), "1 /tmp\n");
    // --json: the server's NDJSON lines.
    let lines = ndjson(&cli.ok(&["exec", "--json", &id, "--", "echo", "hi"]));
    assert_eq!(lines.first().unwrap()["type"], "started");
    assert_eq!(stream(&lines, "stdout"), "hi\n");
    assert_eq!(exit_line(&lines)["code"], 0);
    // Exit codes as `openrun run` has them.
    assert_fails(
        &cli.out(&["exec", &id, "--", "no-such-program"]),
        127,
        "no-such-program",
    );
    assert_fails(&cli.out(&["exec", &id, "--", "/etc/hostname"]), 126, "");
    assert_fails(
        &cli.out(&["exec", "--timeout", "300ms", &id, "--", "sleep", "5"]),
        124,
        "timed out",
    );
    assert_fails(
        &cli.out(&["exec", &id, "--", "sh", "-c", "kill -9 $$"]),
        137,
        "",
    );

    // inspect: the resource.
    let inspected = cli.json(&["inspect", &id]);
    assert_eq!(inspected["id"], id.as_str());
    assert_eq!(inspected["limits"], created["limits"]);

    // ls: a table, JSON, and label filters (all must match).
    let other = cli.create(&["--label", "team=web"]);
    let table = cli.ok(&["ls"]);
    let mut lines = table.lines();
    let header: Vec<_> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["ID", "IMAGE", "STATE", "CREATED", "EXPIRES", "LABELS"]
    );
    let row = table.lines().find(|l| l.starts_with(&id)).expect("row");
    assert!(row.contains("host") && row.contains("running"), "{row}");
    assert!(row.contains("ago") && row.contains(" in "), "{row}");
    assert!(row.contains("team=ml") && row.contains("tier=dev"), "{row}");
    let ids = |v: Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        ids(cli.json(&["ls", "--json"])),
        [id.clone(), other.clone()]
    );
    assert_eq!(
        ids(cli.json(&["ls", "--json", "--label", "team=ml"])),
        [id.as_str()]
    );
    assert_eq!(
        ids(cli.json(&["ls", "--json", "--label", "team=web"])),
        [other.as_str()]
    );
    assert!(ids(cli.json(&["ls", "--json", "--label", "team=ml", "--label", "tier=x"])).is_empty());

    // rm: several ids; a missing one is an error (125, the server's words) unless -f.
    let missing = "000000000000";
    let out = cli.out(&["rm", &id, missing]);
    assert_fails(
        &out,
        125,
        &format!("no such sandbox: {missing} (not_found)"),
    );
    assert_eq!(stdout(&out), format!("{id}\n"));
    assert_eq!(cli.ok(&["rm", "-f", missing, &other]), format!("{other}\n"));
    assert!(api.ids().is_empty());
    assert!(setup.env.live_ids().is_empty(), "the sandboxes are gone");

    // Any verb on a missing sandbox: 125 and the server's message and code.
    for args in [
        vec!["exec", missing, "--", "true"],
        vec!["inspect", missing],
        vec!["events", missing],
        vec!["logs", missing, "1"],
        vec!["env", missing],
        vec!["exec", "-i", missing, "--", "true"],
        vec!["shell", missing, "--", "true"],
    ] {
        assert_fails(
            &cli.out(&args),
            125,
            &format!("openrun: no such sandbox: {missing} (not_found)\n"),
        );
    }
    // A bad key: the server's 401, as an openrun error.
    let out = cli
        .bare()
        .args(["--server", &cli.url, "--api-key", "or_bad", "ls"])
        .output()
        .unwrap();
    assert_fails(&out, 125, "unknown API key (unauthorized)");
    // Local-only options are refused before anything is sent.
    assert_fails(
        &cli.out(&["create", "--rootfs", "/srv/x"]),
        125,
        "--rootfs /srv/x",
    );
}

#[test]
fn the_server_comes_from_variables_or_a_config_file() {
    let setup = Setup::new();
    let cli = setup.client();

    // OPENRUN_SERVER and OPENRUN_API_KEY.
    let out = cli
        .bare()
        .args(["create"])
        .env("OPENRUN_SERVER", &setup.server.url)
        .env("OPENRUN_API_KEY", &setup.key)
        .output()
        .unwrap();
    assert_ok(&out);
    let id = stdout(&out).trim().to_string();
    assert_eq!(setup.api().ids(), [id.as_str()]);

    // $OPENRUN_CONFIG.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.json");
    std::fs::write(
        &config,
        json!({ "server": setup.server.url, "api_key": setup.key }).to_string(),
    )
    .unwrap();
    let out = cli
        .bare()
        .args(["inspect", &id])
        .env("OPENRUN_CONFIG", &config)
        .output()
        .unwrap();
    assert_ok(&out);
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["id"],
        id.as_str()
    );

    // $XDG_CONFIG_HOME/openrun/config.json, with the address as host:port.
    let xdg = cli.config_home.path().join("openrun");
    std::fs::create_dir_all(&xdg).unwrap();
    let bare_addr = setup.server.url.trim_start_matches("http://");
    std::fs::write(
        xdg.join("config.json"),
        json!({ "server": bare_addr, "api_key": setup.key }).to_string(),
    )
    .unwrap();
    let out = cli.bare().args(["ls", "--json"]).output().unwrap();
    assert_ok(&out);
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout).unwrap()[0]["id"],
        id.as_str()
    );

    // A loopback server named without a key: the key `openrun serve` wrote to
    // <data-dir>/local.json (a human key of its own tenant, so it sees none of `cli`'s).
    let local: Value =
        serde_json::from_slice(&std::fs::read(setup.env.data_dir().join("local.json")).unwrap())
            .unwrap();
    assert_eq!(local["server"], setup.server.url.as_str());
    let mode = std::fs::metadata(setup.env.data_dir().join("local.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    std::fs::remove_file(xdg.join("config.json")).unwrap();
    let out = cli
        .bare()
        .args(["--server", &setup.server.url, "create"])
        .output()
        .unwrap();
    assert_ok(&out);
    let local_id = stdout(&out).trim().to_string();
    let local_api = Api::new(&setup.server, local["api_key"].as_str().unwrap());
    assert_eq!(local_api.ids(), [local_id]);

    // A config file's key goes only to the config file's server: with another server named,
    // that server's local key is used instead (a wrong key would be refused).
    let other = Env::new();
    let other_key = key(&other, "other");
    let other_server = Server::start(&other);
    std::fs::write(
        xdg.join("config.json"),
        json!({ "server": other_server.url, "api_key": other_key }).to_string(),
    )
    .unwrap();
    let out = cli
        .bare()
        .args(["--server", &setup.server.url, "ls", "--json"])
        .output()
        .unwrap();
    assert_ok(&out);
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // And to its own server it is sent.
    let out = cli.bare().args(["ls", "--json"]).output().unwrap();
    assert_ok(&out);
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout).unwrap(),
        json!([])
    );
    std::fs::remove_file(xdg.join("config.json")).unwrap();

    // No key anywhere (a data dir without local.json): the server's 401, and how to give one.
    let lone = Env::new();
    let out = lone
        .cmd(["--server", &setup.server.url, "ls"])
        .env_remove("OPENRUN_API_KEY")
        .env_remove("OPENRUN_CONFIG")
        .env("XDG_CONFIG_HOME", dir.path())
        .output()
        .unwrap();
    assert_fails(&out, 125, "(unauthorized)");
    assert!(stderr(&out).contains("--api-key"), "{}", stderr(&out));

    // A broken or missing named config file is a clear error.
    std::fs::write(&config, "{not json").unwrap();
    let out = cli
        .bare()
        .args(["ls"])
        .env("OPENRUN_CONFIG", &config)
        .output()
        .unwrap();
    assert_fails(
        &out,
        125,
        &format!("invalid config file {}", config.display()),
    );
    let out = cli
        .bare()
        .args(["ls"])
        .env("OPENRUN_CONFIG", dir.path().join("missing.json"))
        .output()
        .unwrap();
    assert_fails(&out, 125, "missing.json");
    let out = cli
        .bare()
        .args(["--server", "ftp://x", "ls"])
        .output()
        .unwrap();
    assert_fails(&out, 125, "invalid server address \"ftp://x\"");

    // No server at all: the local verbs, and a clear error for the server-only ones.
    let out = cli.bare().args(["ls"]).output().unwrap();
    assert_ok(&out);
    assert!(stdout(&out).starts_with("ID"), "{}", stdout(&out));
    let out = cli.bare().args(["events", &id]).output().unwrap();
    assert_fails(&out, 125, "`openrun events` needs a server");
    let out = cli.bare().args(["ls", "--label", "a=b"]).output().unwrap();
    assert_fails(&out, 125, "needs a server");
}

#[test]
fn cp_copies_files_and_directories_both_ways() {
    let setup = Setup::new();
    let cli = setup.client();
    let id = cli.create(&[]);
    let local = tempfile::tempdir().unwrap();
    let l = |p: &str| local.path().join(p);

    // A file in: its bytes and mode.
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(l("blob"), &data).unwrap();
    std::fs::set_permissions(l("blob"), std::fs::Permissions::from_mode(0o750)).unwrap();
    let copied = cli.json(&[
        "cp",
        "--json",
        l("blob").to_str().unwrap(),
        &format!("{id}:/tmp/blob"),
    ]);
    assert_eq!(copied, json!({ "files": 1, "bytes": 100_000 }));
    let sums = cli.ok(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "stat -c %a /tmp/blob; cksum < /tmp/blob",
    ]);
    let local_sum = Command::new("sh")
        .arg("-c")
        .arg(format!("cksum < {}", l("blob").display()))
        .output()
        .unwrap();
    assert_eq!(sums, format!("750\n{}", stdout(&local_sum)));
    // Onto a directory: into it. Then back out, into a local directory.
    cli.ok(&["cp", l("blob").to_str().unwrap(), &format!("{id}:/root")]);
    std::fs::create_dir(l("back")).unwrap();
    cli.ok(&[
        "cp",
        &format!("{id}:/root/blob"),
        l("back").to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read(l("back/blob")).unwrap(), data);
    cli.ok(&[
        "cp",
        &format!("{id}:/tmp/blob"),
        l("renamed").to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read(l("renamed")).unwrap(), data);
    // A file over the 16 MiB write limit goes in (as a one-file archive) and out (paged).
    let big: Vec<u8> = (0..(17u32 << 20)).map(|i| (i / 4099) as u8).collect();
    std::fs::write(l("big"), &big).unwrap();
    cli.ok(&["cp", l("big").to_str().unwrap(), &format!("{id}:/tmp/big")]);
    assert_eq!(
        cli.ok(&["exec", &id, "--", "stat", "-c", "%s", "/tmp/big"]),
        format!("{}\n", big.len())
    );
    cli.ok(&[
        "cp",
        &format!("{id}:/tmp/big"),
        l("big.back").to_str().unwrap(),
    ]);
    assert!(
        std::fs::read(l("big.back")).unwrap() == big,
        "the big file came back changed"
    );

    // A missing file: 125 with the server's message, and no local file left.
    let out = cli.out(&["cp", &format!("{id}:/nope"), l("nope").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
    assert!(stderr(&out).contains("/nope"), "{}", stderr(&out));
    assert!(!l("nope").exists());

    // A directory tree in and out.
    std::fs::create_dir_all(l("tree/sub/deeper")).unwrap();
    std::fs::write(l("tree/a.txt"), b"alpha").unwrap();
    std::fs::write(l("tree/sub/deeper/b.bin"), [0u8, 1, 2, 255]).unwrap();
    // Symlinks go in as links (their targets as text, even ones that leave the tree).
    std::os::unix::fs::symlink("a.txt", l("tree/link")).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", l("tree/sub/out")).unwrap();
    let out = cli.out(&[
        "cp",
        "--json",
        l("tree").to_str().unwrap(),
        &format!("{id}:/srv"),
    ]);
    assert_ok(&out);
    assert!(!stderr(&out).contains("skipping"), "{}", stderr(&out));
    let copied: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(copied, json!({ "files": 2, "bytes": 9 }));
    let listing = cli.ok(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "cd /srv/tree && cat a.txt && echo && od -An -tu1 sub/deeper/b.bin && ls \
         && readlink link sub/out && cat link",
    ]);
    assert_eq!(
        listing,
        "alpha\n   0   1   2 255\na.txt\nlink\nsub\na.txt\n/etc/shadow\nalpha"
    );
    // A new directory name: the contents go there.
    cli.ok(&[
        "cp",
        l("tree").to_str().unwrap(),
        &format!("{id}:/opt/copy"),
    ]);
    assert_eq!(
        cli.ok(&["exec", &id, "--", "cat", "/opt/copy/a.txt"]),
        "alpha"
    );
    // Out: into an existing directory, or as a new one.
    cli.ok(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "mkdir -p /work/x/y && echo made > /work/x/y/f && chmod 600 /work/x/y/f",
    ]);
    let copied = cli.json(&[
        "cp",
        "--json",
        &format!("{id}:/work"),
        l("back").to_str().unwrap(),
    ]);
    assert_eq!(copied["files"], 1, "{copied}");
    assert_eq!(
        std::fs::read_to_string(l("back/work/x/y/f")).unwrap(),
        "made\n"
    );
    let mode = std::fs::metadata(l("back/work/x/y/f"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    cli.ok(&[
        "cp",
        &format!("{id}:/srv/tree"),
        l("fresh").to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read_to_string(l("fresh/a.txt")).unwrap(), "alpha");
    assert_eq!(
        std::fs::read_link(l("fresh/link")).unwrap(),
        Path::new("a.txt")
    );
    assert_eq!(
        std::fs::read(l("fresh/sub/deeper/b.bin")).unwrap(),
        [0u8, 1, 2, 255]
    );

    // A sandbox cannot make cp write outside the destination through a planted symlink.
    let outside = tempfile::tempdir().unwrap();
    let script = format!(
        "mkdir -p /evil && ln -s {} /evil/esc && mkdir -p /evil/esc2 && echo x > /evil/esc2/f",
        outside.path().display()
    );
    cli.ok(&["exec", &id, "--", "sh", "-c", &script]);
    cli.ok(&["cp", &format!("{id}:/evil"), l("evil").to_str().unwrap()]);
    assert!(std::fs::symlink_metadata(l("evil/esc"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);

    // A device is not read (/dev/zero has no end).
    assert_fails(
        &cli.out(&["cp", "/dev/zero", &format!("{id}:/tmp/zero")]),
        125,
        "only files and directories",
    );

    // Exactly one side is in a sandbox.
    assert_fails(
        &cli.out(&["cp", "a", "b"]),
        125,
        "one side of cp must be in a sandbox",
    );
    assert_fails(
        &cli.out(&["cp", &format!("{id}:/a"), &format!("{id}:/b")]),
        125,
        "two sandboxes",
    );
}

#[test]
fn cp_out_never_writes_through_a_link_at_the_destination() {
    let setup = Setup::new();
    let cli = setup.client();
    let id = cli.create(&[]);
    cli.ok(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "echo data > /tmp/f && mkdir /tmp/d && echo in > /tmp/d/g",
    ]);
    // Links such as an earlier copy out of a sandbox may have left in the destination.
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim");
    std::fs::write(&victim, "keep").unwrap();
    let dst = tempfile::tempdir().unwrap();
    let d = |p: &str| dst.path().join(p);
    std::os::unix::fs::symlink(&victim, d("f")).unwrap();
    std::os::unix::fs::symlink(&victim, d("named")).unwrap();
    std::os::unix::fs::symlink(outside.path(), d("d")).unwrap();

    // A file into the directory, and onto a name given: the link is replaced.
    cli.ok(&["cp", &format!("{id}:/tmp/f"), d("").to_str().unwrap()]);
    cli.ok(&["cp", &format!("{id}:/tmp/f"), d("named").to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
    for name in ["f", "named"] {
        assert!(std::fs::symlink_metadata(d(name)).unwrap().is_file());
        assert_eq!(std::fs::read_to_string(d(name)).unwrap(), "data\n");
    }
    // A directory whose name is a link in the destination: refused, nothing written where it
    // points. (A directory the user names is theirs: a link there is followed, as by docker cp.)
    assert_fails(
        &cli.out(&["cp", &format!("{id}:/tmp/d"), d("").to_str().unwrap()]),
        125,
        "not a directory",
    );
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 1);
    // A file onto a directory that does not exist.
    assert_fails(
        &cli.out(&[
            "cp",
            &format!("{id}:/tmp/f"),
            &format!("{}/", d("no").display()),
        ]),
        125,
        "no such directory",
    );
}

#[test]
fn the_key_goes_straight_to_its_server() {
    let setup = Setup::new();
    let cli = setup.client();
    // A proxy of the environment is not used (it would get the key; here it is not even up).
    for var in ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"] {
        let out = cli
            .cmd(&["ls"])
            .env(var, "http://127.0.0.1:1")
            .output()
            .unwrap();
        assert_ok(&out);
        assert!(!stderr(&out).contains("warning"), "{}", stderr(&out));
    }
    // A key for a server that is not a loopback address crosses the network unencrypted: said.
    let port = cli.url.rsplit(':').next().unwrap().to_string();
    let out = cli
        .bare()
        .args(["--server", &format!("http://0.0.0.0:{port}"), "--api-key"])
        .args([&cli.key, "ls"])
        .output()
        .unwrap();
    assert_ok(&out);
    assert!(
        stderr(&out).contains("warning: the API key is sent unencrypted to http://0.0.0.0:"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains(&cli.key), "{}", stderr(&out));
}

#[test]
fn logs_and_events_of_a_sandbox() {
    let setup = Setup::new();
    let cli = setup.client();
    let api = setup.api();
    let id = cli.create(&["--label", "k=v"]);

    cli.ok(&["exec", &id, "--", "true"]);
    let pid = api.background(
        &id,
        json!({ "cmd": ["sh", "-c", "echo one; echo two >&2; sleep 0.5; printf three"], "background": true }),
    );
    // -f follows until the exit.
    let started = Instant::now();
    let out = cli.out(&["logs", "-f", &id, &pid.to_string()]);
    assert_ok(&out);
    assert_eq!(stdout(&out), "one\nthree");
    assert_eq!(stderr(&out), "two\n");
    assert!(started.elapsed() < Duration::from_secs(5));
    // Without -f: what is there.
    let out = cli.out(&["logs", &id, &pid.to_string()]);
    assert_eq!(stdout(&out), "one\nthree");
    let lines = ndjson(&cli.ok(&["logs", "--json", &id, &pid.to_string()]));
    assert_eq!(stream(&lines, "stdout"), "one\nthree");
    assert_fails(&cli.out(&["logs", &id, "99999"]), 125, "(no_such_process)");

    // events: a table, and JSON.
    let table = cli.ok(&["events", &id]);
    assert!(table.starts_with("SEQ"), "{table}");
    assert!(
        table.contains("sandbox.create") && table.contains("process.exec"),
        "{table}"
    );
    let events = cli.json(&["events", "--json", &id]);
    let kinds: Vec<_> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.first(), Some(&"sandbox.create"));
    assert!(kinds.contains(&"process.exit"), "{kinds:?}");
}

#[test]
fn events_follow_until_the_sandbox_ends() {
    let setup = Setup::new();
    let cli = setup.client();
    let id = cli.create(&[]);
    let mut follow = cli
        .cmd(&["events", "-f", "--json", &id])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    cli.ok(&["exec", &id, "--", "true"]);
    cli.ok(&["rm", &id]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = follow.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "events -f did not end with the sandbox"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    let mut text = String::new();
    follow
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    let kinds: Vec<String> = ndjson(&text)
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kinds.first().map(String::as_str), Some("sandbox.create"));
    for kind in ["process.exec", "process.exit", "sandbox.delete"] {
        assert!(
            kinds.iter().any(|k| k == kind),
            "{kind} missing from {kinds:?}"
        );
    }
}

#[test]
fn env_prints_the_environment_manifest() {
    let setup = Setup::new();
    let cli = setup.client();
    let id = cli.create(&["--memory", "256M", "--pids", "99"]);
    let manifest = cli.json(&["env", "--json", &id]);
    assert_eq!(manifest["limits"]["memory_bytes"], 256 << 20);
    assert_eq!(manifest["limits"]["pids"], 99);
    let table = cli.ok(&["env", &id]);
    assert!(table.contains("MEMORY     256 MiB\n"), "{table}");
    assert!(table.contains("PIDS       99\n"), "{table}");
    let arch = manifest["arch"].as_str().unwrap();
    assert!(table.contains(&format!("ARCH       {arch}\n")), "{table}");
    let sh = manifest["tools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "sh")
        .map(|t| t["path"].as_str().unwrap().to_string());
    if let Some(path) = sh {
        assert!(table.contains(&path), "{table}");
    }
}

#[test]
fn exec_forwards_stdin_with_i() {
    let setup = Setup::new();
    let cli = setup.client();
    let id = cli.create(&[]);
    let input: Vec<u8> = (0..200_000u32).map(|i| (i % 256) as u8).collect();
    let mut child = cli
        .cmd(&[
            "exec",
            "-i",
            &id,
            "--",
            "sh",
            "-c",
            "cksum; echo done >&2; exit 3",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = input.clone();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    let path = setup.env.data_dir().join("in");
    std::fs::write(&path, &input).unwrap();
    let local = Command::new("sh")
        .arg("-c")
        .arg(format!("cksum < {}", path.display()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert_eq!(stdout(&out), stdout(&local));
    assert_eq!(stderr(&out), "done\n");
}

#[test]
fn exec_forwards_our_signals_to_the_command() {
    let setup = Setup::new();
    let cli = setup.client();
    let id = cli.create(&[]);
    let script = "trap 'echo got-int; exit 4' INT; trap 'echo got-term; exit 5' TERM; \
                  echo ready; sleep 30 & wait";
    // The NDJSON exec (signals through the process endpoint) and the WebSocket one (-i).
    for (extra, signal, code, said) in [
        (None, rustix::process::Signal::INT, 4, "got-int"),
        (Some("-i"), rustix::process::Signal::TERM, 5, "got-term"),
    ] {
        let mut args = vec!["exec"];
        args.extend(extra);
        args.extend([id.as_str(), "--", "sh", "-c", script]);
        let mut child = cli
            .cmd(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = child.stdout.take().unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        while !String::from_utf8_lossy(&seen).contains("ready") {
            let n = out.read(&mut buf).unwrap();
            assert!(n > 0, "no ready: {seen:?}");
            seen.extend_from_slice(&buf[..n]);
        }
        let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
        rustix::process::kill_process(pid, signal).unwrap();
        out.read_to_end(&mut seen).unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(code), "{extra:?}: {seen:?}");
        assert_eq!(String::from_utf8_lossy(&seen), format!("ready\n{said}\n"));
    }
}

/// A pseudo-terminal pair: the master for the test, the slave for `openrun shell`.
fn pty(rows: u16, cols: u16) -> (std::fs::File, std::fs::File) {
    use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC).unwrap();
    grantpt(&master).unwrap();
    unlockpt(&master).unwrap();
    let name = ptsname(&master, Vec::new()).unwrap();
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(PathBuf::from(name.to_str().unwrap()))
        .unwrap();
    set_size(&slave, rows, cols);
    (std::fs::File::from(master), slave)
}

fn set_size(tty: &std::fs::File, rows: u16, cols: u16) {
    rustix::termios::tcsetwinsize(
        tty,
        rustix::termios::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        },
    )
    .unwrap();
}

/// Reads from the master until `text` appeared (or panics after 10 s); returns all read.
fn read_until(master: &mut std::fs::File, seen: &mut String, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 4096];
    while !seen.contains(text) {
        assert!(
            Instant::now() < deadline,
            "{text:?} never came; got {seen:?}"
        );
        let mut fds = [rustix::event::PollFd::new(
            &*master,
            rustix::event::PollFlags::IN,
        )];
        let timeout = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 100_000_000,
        };
        if rustix::event::poll(&mut fds, Some(&timeout)).unwrap() == 0 {
            continue;
        }
        match master.read(&mut buf) {
            Ok(0) | Err(_) => panic!("the terminal closed before {text:?}; got {seen:?}"),
            Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
        }
    }
}

#[test]
fn shell_is_a_terminal_with_our_size() {
    let setup = Setup::new();
    let cli = setup.client();
    let id = cli.create(&[]);

    // With a command and no terminal: the PTY is still there, 24x80 by default.
    let out = cli.out(&["shell", &id, "--", "sh", "-c", "stty size; tty; exit 5"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("24 80\r\n/dev/pts/"), "{text:?}");
    // exec -t: the same terminal for one command.
    let out = cli.out(&["exec", "-t", &id, "--", "sh", "-c", "tty; exit 6"]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("/dev/pts/"), "{}", stdout(&out));
    // Without a command it needs a terminal.
    assert_fails(&cli.out(&["shell", &id]), 125, "needs a terminal");

    // Driven through a real terminal: raw mode, our size, resizes.
    let (mut master, slave) = pty(30, 100);
    let mut child = cli
        .cmd(&["shell", &id])
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave.try_clone().unwrap()))
        .spawn()
        .unwrap();
    let mut seen = String::new();
    master
        .write_all(b"stty size; echo mark-$((6*7))\n")
        .unwrap();
    read_until(&mut master, &mut seen, "mark-42");
    assert!(seen.contains("30 100"), "{seen:?}");
    set_size(&slave, 40, 120);
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
        rustix::process::Signal::WINCH,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    master
        .write_all(b"stty size; echo mark-$((6*8))\n")
        .unwrap();
    read_until(&mut master, &mut seen, "mark-48");
    assert!(seen.contains("40 120"), "{seen:?}");
    // ^C reaches the sandbox's foreground command, not openrun.
    master
        .write_all(b"sh -c 'echo started-$((3+3)); exec sleep 30'\n")
        .unwrap();
    read_until(&mut master, &mut seen, "started-6");
    std::thread::sleep(Duration::from_millis(100));
    master.write_all(&[3]).unwrap();
    master.write_all(b"echo after-$((2+2))\n").unwrap();
    read_until(&mut master, &mut seen, "after-4");
    master.write_all(b"exit 9\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "shell did not end: {seen:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(9), "{seen:?}");
    // The terminal is back in its own mode (not raw): echo and canonical input are on.
    let mode = rustix::termios::tcgetattr(&slave).unwrap();
    assert!(mode
        .local_modes
        .contains(rustix::termios::LocalModes::ICANON));
    assert!(mode.local_modes.contains(rustix::termios::LocalModes::ECHO));
}

#[test]
fn ls_follows_the_next_cursor_past_one_page() {
    let setup = Setup::new();
    let cli = setup.client();
    let api = setup.api();
    // One more than the server's default page (100).
    let mut created = Vec::new();
    for i in 0..101 {
        let labels = if i % 2 == 0 {
            json!({ "even": "yes" })
        } else {
            json!({})
        };
        let sandbox = api.create(json!({ "labels": labels, "pids": 16 }));
        created.push(sandbox["id"].as_str().unwrap().to_string());
    }
    let res = api.get("/v1/sandboxes");
    assert!(
        res.headers().contains_key("x-next-cursor"),
        "one page is not all"
    );
    let listed: Vec<String> = cli
        .json(&["ls", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, created, "every sandbox once, oldest first");
    let table = cli.ok(&["ls"]);
    assert_eq!(table.lines().count(), 102, "a header and a row each");
    let even = cli.json(&["ls", "--json", "--label", "even=yes"]);
    assert_eq!(even.as_array().unwrap().len(), 51);
}
