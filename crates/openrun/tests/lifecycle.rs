//! Sandboxes outlive their creator, can be found and reattached by id, and die completely.

mod common;
use common::*;

#[test]
fn a_sandbox_survives_its_creator_and_a_new_process_runs_in_it() {
    let env = Env::new();
    // `create` is a process that exits right after printing the id.
    let id = env.create(&[]);
    assert!(env.live_ids().contains(&id));
    let out = env.exec_sh(&id, "echo $HOSTNAME; echo state > /tmp/s");
    assert_ok(&out);
    assert_eq!(stdout(&out), format!("{id}\n"));
    // A third process sees the state the second left, by id prefix.
    let out = env.output(["exec", &id[..6], "--", "cat", "/tmp/s"]);
    assert_ok(&out);
    assert_eq!(stdout(&out), "state\n");
    let run_dir = std::path::PathBuf::from(env.inspect(&id)["run_dir"].as_str().unwrap());
    assert!(run_dir.join("agent.sock").exists());
    let out = env.output(["rm", &id]);
    assert_ok(&out);
    assert!(!env.live_ids().contains(&id));
    assert!(!env.layer_dir(&id).exists(), "writable layer left behind");
    assert!(!run_dir.exists(), "runtime dir left behind");
    assert!(!cgroup_dir("memory", &id).exists() && !cgroup_dir("pids", &id).exists());
    let out = env.output(["exec", &id, "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(stderr(&out).contains("no such sandbox"), "{}", stderr(&out));
}

#[test]
fn a_sandbox_dies_at_its_ttl_and_is_cleaned_up() {
    let env = Env::new();
    let id = env.create(&["--ttl", "1s"]);
    let info = env.inspect(&id);
    let agent_pid = info["pid"].as_i64().unwrap();
    let run_dir = std::path::PathBuf::from(info["run_dir"].as_str().unwrap());
    std::thread::sleep(std::time::Duration::from_millis(2500));
    assert!(
        !std::path::Path::new(&format!("/proc/{agent_pid}")).exists() || {
            // A zombie waiting for init to reap it is dead too.
            std::fs::read_to_string(format!("/proc/{agent_pid}/stat"))
                .map(|s| s.contains(") Z"))
                .unwrap_or(true)
        }
    );
    assert!(!env.live_ids().contains(&id));
    assert!(!env.layer_dir(&id).exists());
    assert!(!run_dir.exists());
}

#[test]
fn killing_the_creator_of_a_run_kills_the_sandbox() {
    let env = Env::new();
    let mut child = env.cmd(["run", "--", "sleep", "60"]).spawn().unwrap();
    // Wait for the sandbox to appear.
    let start = std::time::Instant::now();
    while env.live_ids().is_empty() {
        assert!(start.elapsed().as_secs() < 10, "sandbox never started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // The run's cleaner removes what the sandbox left on the host, then exits (checked
    // before any `ps`, which would clean up after a dead sandbox itself).
    wait_until_nothing_is_left(&env);
    assert_eq!(env.live_ids(), Vec::<String>::new());
}

#[test]
fn a_runs_cleaner_keeps_nothing_of_its_creator_while_it_lives() {
    // The cleaner shares the CLI's memory (openrun-runtime's cleaner.rs): while the CLI
    // lives it must hold none of the CLI's descriptors (the control stream, whose close ends
    // the sandbox; the CLI's stdout, whose reader waits for EOF), sit in a session of its
    // own, and block the signals a terminal or a `kill` would send it.
    let env = Env::new();
    let child = env
        .cmd(["run", "--", "sleep", "3"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let cli = child.id();
    let stat = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name: state, ppid, pgrp, session, ...
    let fields = |pid: u32| -> Vec<String> {
        let s = stat(pid);
        s.rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default()
    };
    let fds = |pid: u32| -> Vec<(String, String)> {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| {
                d.flatten()
                    .map(|e| {
                        let target = std::fs::read_link(e.path()).unwrap_or_default();
                        (
                            e.file_name().to_string_lossy().into_owned(),
                            target.to_string_lossy().into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    // The cleaner: the CLI's child that is not the agent (which renames itself), once it has
    // dropped the CLI's descriptors (three of its own above stdio).
    let start = std::time::Instant::now();
    let mut seen = None;
    let cleaner = loop {
        assert!(
            start.elapsed().as_secs() < 10,
            "no cleaner down to stdio and three descriptors; last seen: {:?}",
            seen.map(fds)
        );
        let found = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| {
                fields(pid)
                    .get(1)
                    .is_some_and(|ppid| *ppid == cli.to_string())
            })
            .find(|&pid| !stat(pid).contains("(openrun-agent)"));
        seen = found.or(seen);
        if let Some(pid) = found.filter(|&pid| fds(pid).len() == 6) {
            break pid;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut held = fds(cleaner);
    held.sort_by_key(|(fd, _)| fd.parse::<u32>().unwrap_or(u32::MAX));
    for (fd, target) in &held[..3] {
        assert!(["0", "1", "2"].contains(&fd.as_str()), "{held:?}");
        assert_eq!(target, "/dev/null", "{held:?}");
    }
    let mut own: Vec<&str> = held[3..].iter().map(|(_, t)| t.as_str()).collect();
    own.sort();
    assert_eq!(own.len(), 3, "{held:?}");
    assert_eq!(
        own[..2],
        ["anon_inode:[pidfd]", "anon_inode:[pidfd]"],
        "{held:?}"
    );
    assert!(own[2].starts_with("pipe:"), "{held:?}");
    assert!(
        !held.iter().any(|(_, t)| t.starts_with("socket:")),
        "the cleaner holds a socket: {held:?}"
    );
    assert_ne!(
        fields(cleaner)[3],
        fields(cli)[3],
        "same session as the CLI"
    );
    let status = std::fs::read_to_string(format!("/proc/{cleaner}/status")).unwrap();
    let blocked = status
        .lines()
        .find_map(|l| l.strip_prefix("SigBlk:"))
        .map(|m| u64::from_str_radix(m.trim(), 16).unwrap())
        .unwrap();
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
        assert_ne!(
            blocked & (1 << (signal - 1)),
            0,
            "signal {signal} not blocked"
        );
    }
    // The CLI's stdout reaches EOF when the CLI exits, whatever the cleaner does.
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    wait_until_nothing_is_left(&env);
}

#[test]
fn command_not_found_exits_127_like_a_shell() {
    let env = Env::new();
    let out = env.output(["run", "--", "no-such-command-xyz"]);
    assert_eq!(out.status.code(), Some(127));
    assert!(
        stderr(&out).contains("no-such-command-xyz: command not found"),
        "{}",
        stderr(&out)
    );
    let out = env.output(["run", "--", "/etc/passwd"]);
    assert_eq!(out.status.code(), Some(126), "{}", stderr(&out));
}

/// Waits (up to 10 s) until no file of a sandbox and no process naming the data dir is left.
fn wait_until_nothing_is_left(env: &Env) {
    let start = std::time::Instant::now();
    while !env.leftovers().is_empty() || !env.processes_naming_data_dir().is_empty() {
        assert!(
            start.elapsed().as_secs() < 10,
            "left behind: files {:?}, processes {:?}",
            env.leftovers(),
            env.processes_naming_data_dir()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
