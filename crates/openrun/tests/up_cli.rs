//! `openrun up` from the command line: what is decided here without a server (the plan of a
//! directory, bad input), and a real open through a server the CLI starts itself.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::{assert_ok, stderr, stdout, Env};
use serde_json::Value;

/// `openrun --data-dir DIR up ARGS…` with no configured server (no config file, no
/// environment).
fn up(env: &Env, config_home: &Path, args: &[&str]) -> Output {
    cli(env, config_home, &[&["up"], args].concat())
}

/// `openrun --data-dir DIR ARGS…` with no configured server.
fn cli(env: &Env, config_home: &Path, args: &[&str]) -> Output {
    let mut cmd: Command = env.cmd(args);
    cmd.env_remove("OPENRUN_CONFIG")
        .env_remove("OPENRUN_SERVER")
        .env_remove("OPENRUN_API_KEY")
        .env("XDG_CONFIG_HOME", config_home);
    cmd.output().expect("spawn openrun")
}

/// A server no one listens on: using it would fail, so a success proves it was not asked.
const NO_SERVER: &str = "http://127.0.0.1:1";

#[test]
fn the_plan_of_a_directory_is_made_without_a_server() {
    let env = Env::new();
    let home = tempfile::tempdir().unwrap();
    let repo = tempfile::tempdir().unwrap();
    std::fs::write(
        repo.path().join("Cargo.toml"),
        "[package]\nname = \"hello\"\nversion = \"0.1.0\"\nedition = \"2021\"\n",
    )
    .unwrap();
    std::fs::create_dir(repo.path().join("src")).unwrap();
    std::fs::write(repo.path().join("src/main.rs"), "fn main() {}\n").unwrap();
    let dir = repo.path().to_str().unwrap();
    let out = up(&env, home.path(), &["--server", NO_SERVER, "--plan", dir]);
    assert_ok(&out);
    let text = stdout(&out);
    assert!(text.contains("languages: rust"), "{text}");
    assert!(text.contains("base:"), "{text}");
    assert!(text.contains("cargo"), "{text}");
    // The workspace is named after the directory, or --name.
    let out = up(
        &env,
        home.path(),
        &[
            "--server", NO_SERVER, "--plan", "--name", "web", "--json", dir,
        ],
    );
    assert_ok(&out);
    let plan: Value = serde_json::from_slice(&out.stdout).expect("--plan --json prints JSON");
    assert_eq!(plan["workspace"], "/workspaces/web", "{plan}");
    assert_eq!(plan["languages"][0], "rust", "{plan}");

    let node = tempfile::tempdir().unwrap();
    std::fs::write(
        node.path().join("package.json"),
        r#"{"name": "app", "version": "1.0.0", "scripts": {"test": "node test.js"}}"#,
    )
    .unwrap();
    let out = up(
        &env,
        home.path(),
        &["--plan", "--json", node.path().to_str().unwrap()],
    );
    assert_ok(&out);
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["source"], "detected", "{plan}");
    assert!(
        plan["languages"]
            .as_array()
            .unwrap()
            .contains(&"node".into()),
        "{plan}"
    );
    // No server was started for it.
    assert!(!env.data_dir().join("serve.log").exists());
}

#[test]
fn a_directory_that_is_no_project_fails_here() {
    let env = Env::new();
    let home = tempfile::tempdir().unwrap();
    let empty = tempfile::tempdir().unwrap();
    let dir = empty.path().to_str().unwrap();
    let out = up(&env, home.path(), &[dir]);
    assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.starts_with("openrun up: no recognizable project"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(out.stdout.is_empty());
    // Decided before any server was looked for or started.
    assert!(!env.data_dir().join("serve.log").exists());
    assert!(!env.data_dir().join("local.json").exists());

    let out = up(&env, home.path(), &["--json", dir]);
    assert_eq!(out.status.code(), Some(125));
    let error: Value = serde_json::from_slice(&out.stdout).expect("the error as JSON");
    assert_eq!(error["type"], "error");
    assert_eq!(error["code"], "no_project");

    // An invalid manifest names its file and position, still without a server.
    std::fs::write(empty.path().join("package.json"), "{\"name\": ").unwrap();
    let out = up(&env, home.path(), &["--server", NO_SERVER, dir]);
    assert_eq!(out.status.code(), Some(125));
    let err = stderr(&out);
    assert!(err.starts_with("openrun up: package.json:1:"), "{err}");
    assert!(
        err.contains("(invalid_config)\n  file: package.json\n"),
        "{err}"
    );
}

#[test]
fn the_plan_is_made_of_what_is_sent() {
    let env = Env::new();
    let home = tempfile::tempdir().unwrap();
    let repo = tempfile::tempdir().unwrap();
    let root = repo.path();
    // A personal devcontainer, ignored: the server never sees it, so neither does the plan.
    std::fs::write(
        root.join(".gitignore"),
        ".devcontainer/\nrequirements.txt\n",
    )
    .unwrap();
    std::fs::create_dir(root.join(".devcontainer")).unwrap();
    std::fs::write(
        root.join(".devcontainer/devcontainer.json"),
        r#"{"image": "debian:bookworm"}"#,
    )
    .unwrap();
    std::fs::write(
        root.join("package.json"),
        r#"{"name": "app", "version": "1.0.0"}"#,
    )
    .unwrap();
    let dir = root.to_str().unwrap();
    let out = up(
        &env,
        home.path(),
        &["--server", NO_SERVER, "--plan", "--json", dir],
    );
    assert_ok(&out);
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["source"], "detected", "{plan}");
    // An ignored, generated requirements.txt as the only manifest: no project, here.
    std::fs::remove_file(root.join("package.json")).unwrap();
    std::fs::remove_dir_all(root.join(".devcontainer")).unwrap();
    std::fs::write(root.join("requirements.txt"), "requests\n").unwrap();
    let out = up(&env, home.path(), &["--server", NO_SERVER, "--json", dir]);
    assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
    let error: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(error["code"], "no_project", "{error}");
}

#[test]
fn bad_sources_are_refused_with_a_reason() {
    let env = Env::new();
    let home = tempfile::tempdir().unwrap();
    let cases: [(&[&str], &str); 5] = [
        (
            &["git@github.com:a/b.git"],
            "only http(s) git URLs are supported",
        ),
        (
            &["ssh://git@github.com/a/b"],
            "only http(s) git URLs are supported",
        ),
        (&["/no/such/dir"], "/no/such/dir"),
        (&["/etc/hostname"], "is not a directory"),
        (&["--ref", "main", "/tmp"], "--ref is for git URLs"),
    ];
    for (args, want) in cases {
        let out = up(&env, home.path(), args);
        assert_eq!(out.status.code(), Some(125), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(want), "{args:?}: {}", stderr(&out));
    }
    // Usage errors are clap's (2).
    let out = up(
        &env,
        home.path(),
        &["--check", "true", "--no-check", "/tmp"],
    );
    assert_eq!(out.status.code(), Some(2));
}

/// The pid in the CLI's `stop it with: kill PID`.
fn started_pid(err: &str) -> Option<i32> {
    let rest = err.split("kill ").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

/// Stops the server `openrun up` left running, when the test ends.
struct Stop(Option<i32>);

impl Drop for Stop {
    fn drop(&mut self) {
        if let Some(pid) = self.0.and_then(rustix::process::Pid::from_raw) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            for _ in 0..100 {
                if rustix::process::test_kill_process(pid).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

#[test]
fn up_starts_a_server_that_keeps_running_and_opens_the_directory() {
    let env = Env::new();
    let home = tempfile::tempdir().unwrap();
    let repo = tempfile::tempdir().unwrap();
    // The built-in host image: no image to build, no package to install.
    std::fs::write(
        repo.path().join(".devcontainer.json"),
        r#"{"image": "host", "postCreateCommand": "cat data/a.txt > made.txt",
            "forwardPorts": [8000]}"#,
    )
    .unwrap();
    std::fs::create_dir(repo.path().join("data")).unwrap();
    std::fs::write(repo.path().join("data/a.txt"), "from the client\n").unwrap();
    std::fs::write(repo.path().join(".gitignore"), "secret.txt\n").unwrap();
    std::fs::write(repo.path().join("secret.txt"), "not sent\n").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", repo.path().join("outside")).unwrap();
    let dir = repo.path().to_str().unwrap();
    let out = up(
        &env,
        home.path(),
        &["--check", "test -f made.txt && test ! -e secret.txt", dir],
    );
    let err = stderr(&out);
    let _stop = Stop(started_pid(&err));
    assert_ok(&out);
    assert!(err.contains("started a local openrun server at"), "{err}");
    assert!(err.contains("serve.log"), "{err}");
    assert!(
        err.contains("skipped the symlink outside -> /etc/passwd"),
        "{err}"
    );
    let text = stdout(&out);
    let id = text.lines().next().unwrap_or("").to_string();
    assert_eq!(id.len(), 12, "{text}");
    // The server is reached with --server URL (its key comes from local.json).
    let url = err
        .split("started a local openrun server at ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the server's address")
        .trim_end_matches('/')
        .to_string();
    assert!(
        text.contains(&format!("attach:    openrun --server {url} shell {id}\n")),
        "{text}"
    );
    assert!(text.contains("check:") && text.contains("passed"), "{text}");
    // The server outlived the CLI; the attach line's --server reaches it with local.json's
    // key, and the workspace holds what the client sent and the setup made.
    let pid = started_pid(&err).expect("the server's pid");
    assert!(
        rustix::process::test_kill_process(rustix::process::Pid::from_raw(pid).unwrap()).is_ok()
    );
    let out = cli(
        &env,
        home.path(),
        &[
            "--server",
            &url,
            "exec",
            &id,
            "-w",
            "/workspaces",
            "--",
            "sh",
            "-c",
            "cat */made.txt",
        ],
    );
    assert_ok(&out);
    assert_eq!(stdout(&out), "from the client\n");

    // A second open reuses the server and the recipe, and --json prints one document.
    let out = up(&env, home.path(), &["--json", "--no-check", dir]);
    assert_ok(&out);
    assert!(!stderr(&out).contains("started a local openrun server"));
    let result: Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!(result["cached"], true, "{result}");
    assert!(result["check"].is_null(), "{result}");

    // A failing check is exit code 1, the sandbox still made.
    let out = up(&env, home.path(), &["--check", "exit 3", dir]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stdout(&out).contains("FAILED (exit 3"), "{}", stdout(&out));
}

/// A stand-in for `openrun serve`'s `/v1/health` and `/v1/up`: it records each up request
/// (head and body) and answers with the NDJSON lines given, then either closes or waits for
/// the client to close (reported as `closed`).
struct FakeServer {
    url: String,
    requests: std::sync::mpsc::Receiver<(String, Vec<u8>)>,
    closed: std::sync::mpsc::Receiver<()>,
}

impl FakeServer {
    fn start(lines: Vec<String>, hang: bool) -> Self {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (req_tx, requests) = std::sync::mpsc::channel();
        let (closed_tx, closed) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    head.push_str(&line);
                }
                let mut out = conn;
                if head.starts_with("GET /v1/health") {
                    let _ = out.write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
                    );
                    continue;
                }
                let lower = head.to_ascii_lowercase();
                let mut body = Vec::new();
                if lower.contains("transfer-encoding: chunked") {
                    loop {
                        let mut size = String::new();
                        reader.read_line(&mut size).unwrap();
                        let n = usize::from_str_radix(size.trim(), 16).unwrap();
                        let mut chunk = vec![0u8; n + 2];
                        reader.read_exact(&mut chunk).unwrap();
                        body.extend_from_slice(&chunk[..n]);
                        if n == 0 {
                            break;
                        }
                    }
                } else if let Some(len) = lower
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                {
                    let mut data = vec![0u8; len.trim().parse().unwrap()];
                    reader.read_exact(&mut data).unwrap();
                    body = data;
                }
                req_tx.send((head, body)).unwrap();
                // A whole answer of its own (a refusal), or NDJSON lines.
                if let Some(raw) = lines.first().filter(|l| l.starts_with("HTTP/")) {
                    let _ = out.write_all(raw.as_bytes());
                    continue;
                }
                let _ = out.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\n\
                      connection: close\r\n\r\n",
                );
                for line in &lines {
                    let _ = out.write_all(format!("{line}\n").as_bytes());
                    let _ = out.flush();
                }
                if hang {
                    let mut rest = Vec::new();
                    let _ = reader.read_to_end(&mut rest);
                    let _ = closed_tx.send(());
                }
            }
        });
        FakeServer {
            url,
            requests,
            closed,
        }
    }
}

/// A plan line for a fake answer.
fn plan_line() -> String {
    serde_json::json!({"type": "plan", "plan": {
        "source": "detected", "languages": ["node"],
        "base": {"kind": "debian", "suite": "bookworm"},
        "system_packages": ["nodejs", "npm"], "workspace": "/workspaces/app",
        "steps": [{"name": "install", "phase": "setup", "commands": ["npm ci"],
                   "file": "package-lock.json"}],
        "test": "npm test"
    }})
    .to_string()
}

/// A directory with a package.json (and what should and should not be sent).
fn node_repo() -> tempfile::TempDir {
    let repo = tempfile::tempdir().unwrap();
    std::fs::write(
        repo.path().join("package.json"),
        r#"{"name": "app", "version": "1.0.0", "scripts": {"test": "node t.js"}}"#,
    )
    .unwrap();
    std::fs::write(repo.path().join(".gitignore"), "node_modules/\n").unwrap();
    std::fs::create_dir(repo.path().join("node_modules")).unwrap();
    std::fs::write(repo.path().join("node_modules/big.js"), "x").unwrap();
    std::fs::create_dir(repo.path().join(".git")).unwrap();
    std::fs::write(repo.path().join(".git/HEAD"), "ref: refs/heads/main\n").unwrap();
    std::os::unix::fs::symlink("/etc", repo.path().join("etc")).unwrap();
    repo
}

#[test]
fn the_directory_goes_as_a_tar_and_the_progress_and_result_are_shown() {
    let env = Env::new();
    let home = tempfile::tempdir().unwrap();
    let repo = node_repo();
    let b64 = |s: &str| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, s);
    let lines = vec![
        plan_line(),
        r#"{"type":"step","step":"packages","status":"cached"}"#.to_string(),
        r#"{"type":"step","step":"install","command":"npm ci","status":"running"}"#.to_string(),
        serde_json::json!({"type": "output", "step": "install", "stream": "stdout",
            "data_b64": b64("added 3 packages")})
        .to_string(),
        r#"{"type":"step","step":"install","status":"ok","duration_ms":12345}"#.to_string(),
        serde_json::json!({"type": "result", "result": {
            "sandbox_id": "0123abcd4567", "attach": "openrun shell 0123abcd4567",
            "workspace": "/workspaces/app", "ports": [], "cached": false,
            "recipe": {"key": "k1", "path": "/d/recipes/t/k1/devcontainer.json"},
            "check": {"command": "npm test", "exit_code": 0, "passed": true, "duration_ms": 900},
            "timings": {"total_ms": 20000, "ready_ms": 19000, "setup_ms": 15000, "check_ms": 900}
        }})
        .to_string(),
    ];
    let server = FakeServer::start(lines, false);
    let dir = repo.path().to_str().unwrap();
    let out = up(
        &env,
        home.path(),
        &[
            "--server",
            &server.url,
            "--api-key",
            "or_test",
            "--ttl",
            "2h",
            "--keep",
            dir,
        ],
    );
    assert_ok(&out);
    let (head, body) = server.requests.recv().unwrap();
    let first = head.lines().next().unwrap();
    assert!(first.starts_with("POST /v1/up?name="), "{first}");
    // The directory's name as the server takes names (tempdirs start with a '.').
    let name = repo.path().file_name().unwrap().to_str().unwrap();
    let usable = name.trim_start_matches('.');
    assert!(first.contains(&format!("name={usable}&")), "{first}");
    // The identity is the canonical path, as is.
    let path = repo.path().canonicalize().unwrap();
    let encoded = path.to_str().unwrap().replace('/', "%2F");
    assert!(first.contains("repo=local%3A"), "{first}");
    assert!(first.contains(&format!("%3A{encoded}&")), "{first}");
    assert!(
        first.contains("keep=true") && first.contains("ttl=7200000ms"),
        "{first}"
    );
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("content-type: application/x-tar"), "{head}");
    assert!(lower.contains("authorization: bearer or_test"), "{head}");
    let mut archive = tar::Archive::new(&body[..]);
    let names: Vec<String> = archive
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    assert_eq!(
        names,
        [".git", ".git/HEAD", ".gitignore", "package.json"],
        "node_modules/ is ignored, the link to /etc skipped"
    );
    let err = stderr(&out);
    assert!(err.contains("skipped the symlink etc -> /etc"), "{err}");
    assert!(
        err.contains("base:      debian bookworm"),
        "the plan: {err}"
    );
    assert!(err.contains("==> packages cached\n"), "{err}");
    assert!(
        err.contains("==> install: npm ci\nadded 3 packages\n==> install ok (12.3 s)\n"),
        "{err}"
    );
    let text = stdout(&out);
    assert_eq!(
        text,
        "0123abcd4567\n\
         attach:    openrun shell 0123abcd4567\n\
         workspace: /workspaces/app\n\
         recipe:    /d/recipes/t/k1/devcontainer.json (new)\n\
         check:     npm test: passed (0.9 s)\n\
         time:      ready in 19.0 s (first open), setup 15.0 s, check 0.9 s, total 20.0 s\n"
    );
}

#[test]
fn a_failed_step_is_exit_1_and_json_prints_the_error_object() {
    let env = Env::new();
    let home = tempfile::tempdir().unwrap();
    let repo = node_repo();
    let error = serde_json::json!({"type": "error", "code": "step_failed",
        "message": "install failed: npm ci exited with 1", "step": "install",
        "file": "package-lock.json", "command": "npm ci"});
    let lines = vec![
        plan_line(),
        r#"{"type":"step","step":"install","status":"failed","exit_code":1,"duration_ms":800}"#
            .to_string(),
        error.to_string(),
    ];
    let server = FakeServer::start(lines.clone(), false);
    let dir = repo.path().to_str().unwrap();
    let out = up(
        &env,
        home.path(),
        &["--server", &server.url, "--api-key", "k", dir],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("==> install failed (exit 1, 0.8 s)\n"),
        "{err}"
    );
    assert!(
        err.contains(
            "openrun up: install failed: npm ci exited with 1 (step_failed)\n  step: install\n  \
             file: package-lock.json\n  command: npm ci\n"
        ),
        "{err}"
    );
    assert!(out.stdout.is_empty());

    let server = FakeServer::start(lines, false);
    let out = up(
        &env,
        home.path(),
        &["--json", "--server", &server.url, "--api-key", "k", dir],
    );
    assert_eq!(out.status.code(), Some(1));
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed, error);
    // --json: no plan on stderr, the progress still there.
    let err = stderr(&out);
    assert!(!err.contains("base:"), "{err}");
    assert!(err.contains("==> install failed"), "{err}");
}

#[test]
fn a_git_url_goes_as_json_and_plan_asks_the_server() {
    let env = Env::new();
    let home = tempfile::tempdir().unwrap();
    let server = FakeServer::start(
        vec![
            plan_line(),
            r#"{"type":"result","result":{"sandbox_id":null}}"#.to_string(),
        ],
        false,
    );
    let out = up(
        &env,
        home.path(),
        &[
            "--server",
            &server.url,
            "--api-key",
            "k",
            "--plan",
            "--ref",
            "v1",
            "--check",
            "make t",
            "https://example.org/team/app.git",
        ],
    );
    assert_ok(&out);
    let (head, body) = server.requests.recv().unwrap();
    assert!(head.starts_with("POST /v1/up HTTP/1.1"), "{head}");
    assert!(head
        .to_ascii_lowercase()
        .contains("content-type: application/json"));
    let sent: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(sent["git"], "https://example.org/team/app.git");
    assert_eq!(sent["ref"], "v1");
    assert_eq!(sent["check"], "make t");
    assert_eq!(sent["plan_only"], true);
    assert_eq!(sent["name"], "app");
    assert_eq!(sent["no_check"], false);
    // The plan is the output.
    let text = stdout(&out);
    assert!(text.starts_with("plan:      detected\n"), "{text}");
    assert!(text.contains("step:      install: npm ci\n"), "{text}");
}

#[test]
fn ctrl_c_closes_the_request() {
    let env = Env::new();
    let home = tempfile::tempdir().unwrap();
    let repo = node_repo();
    let server = FakeServer::start(
        vec![
            plan_line(),
            r#"{"type":"step","step":"install","command":"npm ci","status":"running"}"#.to_string(),
        ],
        true,
    );
    let mut cmd = env.cmd([
        "up",
        "--server",
        &server.url,
        "--api-key",
        "k",
        repo.path().to_str().unwrap(),
    ]);
    cmd.env_remove("OPENRUN_CONFIG")
        .env("XDG_CONFIG_HOME", home.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().unwrap();
    // Once the request arrived and the progress was sent, interrupt.
    server.requests.recv().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert!(stderr(&out).contains("interrupted"), "{}", stderr(&out));
    server
        .closed
        .recv_timeout(Duration::from_secs(10))
        .expect("the request was closed");
}

#[test]
fn without_a_configured_server_local_json_names_it() {
    let env = Env::new();
    let home = tempfile::tempdir().unwrap();
    let repo = node_repo();
    let server = FakeServer::start(
        vec![r#"{"type":"result","result":{"sandbox_id":"0123abcd4567"}}"#.to_string()],
        false,
    );
    std::fs::write(
        env.data_dir().join("local.json"),
        format!(r#"{{"server": "{}", "api_key": "or_local"}}"#, server.url),
    )
    .unwrap();
    // up: the local server answers its health check, so none is started.
    let out = up(&env, home.path(), &[repo.path().to_str().unwrap()]);
    assert_ok(&out);
    assert!(!stderr(&out).contains("started"), "{}", stderr(&out));
    let (head, _) = server.requests.recv().unwrap();
    assert!(
        head.to_ascii_lowercase()
            .contains("authorization: bearer or_local"),
        "{head}"
    );
    let text = stdout(&out);
    assert_eq!(text.lines().next(), Some("0123abcd4567"));
    // How to reach it: with --server (it is not configured).
    assert!(
        text.contains(&format!(
            "attach:    openrun --server {} shell 0123abcd4567\n",
            server.url
        )),
        "{text}"
    );
}

#[test]
fn a_refusal_of_the_server_is_exit_125_with_its_message() {
    let env = Env::new();
    let home = tempfile::tempdir().unwrap();
    let repo = node_repo();
    let body = r#"{"code":"invalid_argument","message":"invalid repository name"}"#;
    let raw = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    );
    let dir = repo.path().to_str().unwrap();
    let server = FakeServer::start(vec![raw.clone()], false);
    let out = up(
        &env,
        home.path(),
        &["--server", &server.url, "--api-key", "k", dir],
    );
    assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("openrun up: invalid repository name (invalid_argument)\n"),
        "{}",
        stderr(&out)
    );
    assert!(out.stdout.is_empty());
    let server = FakeServer::start(vec![raw], false);
    let out = up(
        &env,
        home.path(),
        &["--json", "--server", &server.url, "--api-key", "k", dir],
    );
    assert_eq!(out.status.code(), Some(125));
    let error: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(error["type"], "error");
    assert_eq!(error["code"], "invalid_argument");
}
