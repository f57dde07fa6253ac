//! 1,000 create/destroy cycles leave the host as it was: mounts, cgroups, processes, fds,
//! id claims and files. (Alone in its test binary so nothing else runs meanwhile.)

mod common;
use common::*;

fn mount_count() -> usize {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .count()
}

/// Live host processes running as a sandbox id (host uid ≥ 2^30). Zombies are not counted:
/// an agent whose creator exited is reaped by the host's init, whenever that gets to it.
fn sandbox_processes() -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter(|e| {
            std::fs::read_to_string(e.path().join("status"))
                .ok()
                .filter(|s| {
                    !s.lines()
                        .any(|l| l.starts_with("State:") && l.contains('Z'))
                })
                .and_then(|s| {
                    s.lines().find(|l| l.starts_with("Uid:")).and_then(|l| {
                        l.split_whitespace()
                            .nth(1)
                            .and_then(|u| u.parse::<u64>().ok())
                    })
                })
                .is_some_and(|uid| uid >= 1 << 30)
        })
        .count()
}

fn open_files() -> i64 {
    std::fs::read_to_string("/proc/sys/fs/file-nr")
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn id_claims() -> usize {
    std::fs::read_dir("/run/openrun/idmap")
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn a_thousand_create_destroy_cycles_leak_nothing() {
    let env = Env::new();
    // Warm up (builds the host image) before measuring.
    env.sh("true");
    // `run` finishes its teardown in the background: let earlier tests' cleaners finish.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let before = (
        mount_count(),
        openrun_cgroups(),
        sandbox_processes(),
        id_claims(),
    );
    let files_before = open_files();
    for i in 0..1000 {
        let out = env.output(["run", "--memory", "64M", "--pids", "64", "--", "true"]);
        assert!(out.status.success(), "cycle {i}: {}", stderr(&out));
    }
    // Network namespaces and sockets are torn down asynchronously by the kernel.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let after = (
        mount_count(),
        openrun_cgroups(),
        sandbox_processes(),
        id_claims(),
    );
    assert_eq!(
        after, before,
        "(mounts, cgroups, sandbox processes, id claims)"
    );
    let files_after = open_files();
    assert!(
        (files_after - files_before).abs() < 200,
        "host open files went from {files_before} to {files_after}"
    );
    assert_eq!(
        env.leftovers(),
        Vec::<std::path::PathBuf>::new(),
        "sandbox files left behind"
    );
}
