//! Resource bombs stay inside their sandbox.

mod common;
use common::*;
use std::time::{Duration, Instant};

#[test]
fn a_memory_hog_is_oom_killed_and_reported() {
    let env = Env::new();
    // `tail` keeps everything it reads from a newline-free stream in memory.
    let out = env.output([
        "run",
        "--memory",
        "32M",
        "--",
        "sh",
        "-c",
        "head -c 300M /dev/zero | tail",
    ]);
    assert_eq!(out.status.code(), Some(137), "stderr: {}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("out of memory"), "not reported as OOM: {err}");
    assert!(err.contains("32 MiB"), "{err}");
}

#[test]
fn memory_below_the_limit_is_fine() {
    let env = Env::new();
    let out = env.output([
        "run",
        "--memory",
        "64M",
        "--",
        "sh",
        "-c",
        "head -c 8M /dev/zero | tail | wc -c",
    ]);
    assert_ok(&out);
    assert_eq!(stdout(&out).trim(), "8388608");
}

#[test]
fn a_fork_bomb_is_capped_and_the_host_stays_responsive() {
    let env = Env::new();
    let id = env.create(&["--pids", "64"]);
    let mut bomb = env
        .cmd([
            "exec",
            "--timeout",
            "6s",
            &id,
            "--",
            "sh",
            "-c",
            "(f(){ f | f & }; f) & while :; do :; done",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pids_dir = cgroup_dir("pids", &id);
    let mut peak = 0u64;
    let mut worst_host = Duration::ZERO;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        let current: u64 = std::fs::read_to_string(pids_dir.join("pids.current"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        peak = peak.max(current);
        let t = Instant::now();
        let ok = std::process::Command::new("/bin/true").status().unwrap();
        assert!(ok.success());
        worst_host = worst_host.max(t.elapsed());
        std::thread::sleep(Duration::from_millis(50));
    }
    let events = std::fs::read_to_string(pids_dir.join("pids.events")).unwrap();
    let refused: u64 = events
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(peak <= 64, "pids went above the limit: {peak}");
    // Forks refused by the pids controller prove the bomb reached the limit.
    assert!(refused > 0, "no fork was refused: {events} (peak {peak})");
    assert!(
        worst_host < Duration::from_secs(1),
        "host spawn took {worst_host:?}"
    );
    // The main shell forks once, before the bomb starts (in that subshell), then runs a builtin
    // loop needing no fork until the exec timeout: a fork failing in the main shell would end
    // it with status 2 instead.
    let status = bomb.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(124),
        "the exec timeout must end the bomb"
    );
    // The sandbox still answers after the bomb is killed.
    let out = env.output(["exec", &id, "--", "echo", "alive"]);
    assert_ok(&out);
    assert_eq!(stdout(&out), "alive\n");
}

#[test]
fn cpu_quota_is_written_to_the_cgroup() {
    let env = Env::new();
    let id = env.create(&["--cpus", "0.5", "--memory", "256M"]);
    let cpu = cgroup_dir("cpu", &id);
    if cpu.join("cpu.cfs_quota_us").exists() {
        assert_eq!(
            std::fs::read_to_string(cpu.join("cpu.cfs_quota_us"))
                .unwrap()
                .trim(),
            "50000"
        );
        let mem = cgroup_dir("memory", &id);
        assert_eq!(
            std::fs::read_to_string(mem.join("memory.limit_in_bytes"))
                .unwrap()
                .trim(),
            (256u64 << 20).to_string()
        );
    } else {
        assert_eq!(
            std::fs::read_to_string(cpu.join("cpu.max")).unwrap().trim(),
            "50000 100000"
        );
    }
}

#[test]
fn a_command_timeout_kills_and_exits_124() {
    let env = Env::new();
    let start = Instant::now();
    let out = env.output(["run", "--timeout", "500ms", "--", "sleep", "30"]);
    assert_eq!(out.status.code(), Some(124));
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(stderr(&out).contains("timed out"), "{}", stderr(&out));
}
