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
