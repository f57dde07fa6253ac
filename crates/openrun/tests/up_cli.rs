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
#[ignore = "until devcontainer.json support and the server's open_repo land (issue 7)"]
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
    assert!(
        text.contains(&format!("attach:    openrun shell {id}")),
        "{text}"
    );
    assert!(text.contains("check:") && text.contains("passed"), "{text}");
    // The server outlived the CLI, and the server-only verbs find it through local.json.
    let pid = started_pid(&err).expect("the server's pid");
    assert!(
        rustix::process::test_kill_process(rustix::process::Pid::from_raw(pid).unwrap()).is_ok()
    );
    let out = cli(&env, home.path(), &["env", &id, "--json"]);
    assert_ok(&out);

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
