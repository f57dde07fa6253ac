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
    assert_eq!(env.live_ids(), Vec::<String>::new());
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
