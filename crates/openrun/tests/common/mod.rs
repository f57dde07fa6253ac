//! Helpers shared by the end-to-end tests: a private data dir per test and the real `openrun`
//! binary. These tests need root (CI runs as root) and fail, never skip, without it.
#![allow(dead_code)]

pub mod attack;
pub mod server;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A private data dir, removed (with any sandbox left in it) at the end of the test.
pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Self {
        assert!(
            rustix::process::geteuid().is_root(),
            "the end-to-end tests need root; run them with sudo"
        );
        // Short path: the agent socket lives inside and Unix socket paths are limited.
        let dir = tempfile::Builder::new()
            .prefix("ort")
            .tempdir_in("/tmp")
            .expect("temp dir");
        Self { dir }
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// `openrun --data-dir <dir> ARGS…`
    pub fn cmd<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut c = Command::new(env!("CARGO_BIN_EXE_openrun"));
        c.arg("--data-dir").arg(self.data_dir()).args(args);
        c.stdin(Stdio::null());
        c
    }

    /// Runs and captures.
    pub fn output<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.cmd(args).output().expect("spawn openrun")
    }

    /// `openrun run -- sh -c SCRIPT`, asserting success; returns stdout.
    pub fn sh(&self, script: &str) -> String {
        let out = self.output(["run", "--", "sh", "-c", script]);
        assert_ok(&out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `openrun exec ID -- sh -c SCRIPT`, captured.
    pub fn exec_sh(&self, id: &str, script: &str) -> Output {
        self.output(["exec", id, "--", "sh", "-c", script])
    }

    /// `openrun create`, returning the id.
    pub fn create(&self, extra: &[&str]) -> String {
        let mut args = vec!["create"];
        args.extend_from_slice(extra);
        let out = self.output(args);
        assert_ok(&out);
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert_eq!(id.len(), 12, "unexpected id {id:?}");
        id
    }

    /// `openrun inspect ID` as JSON.
    pub fn inspect(&self, id: &str) -> serde_json::Value {
        let out = self.output(["inspect", id]);
        assert_ok(&out);
        serde_json::from_slice(&out.stdout).expect("inspect prints JSON")
    }

    /// This data dir's runtime dir (sockets, records, memory-stored layers).
    pub fn run_dir(&self) -> PathBuf {
        openrun_runtime::state::run_dir_for(self.data_dir())
    }

    /// Entries in the runtime dir and the disk layers dir: what sandboxes left on the host.
    pub fn leftovers(&self) -> Vec<PathBuf> {
        let mut left = Vec::new();
        for dir in [
            self.run_dir(),
            self.data_dir().join("sandboxes"),
            self.data_dir().join("disk-pool"),
        ] {
            if let Ok(entries) = std::fs::read_dir(dir) {
                left.extend(entries.flatten().map(|e| e.path()));
            }
        }
        left
    }

    /// Where a disk-stored sandbox's writable layers live.
    pub fn layer_dir(&self, id: &str) -> PathBuf {
        self.data_dir().join("sandboxes").join(id)
    }

    pub fn socket(&self, id: &str) -> PathBuf {
        PathBuf::from(self.inspect(id)["socket"].as_str().expect("socket path"))
    }

    pub fn upper_dir(&self, id: &str) -> PathBuf {
        PathBuf::from(self.inspect(id)["upper_dir"].as_str().expect("upper dir"))
    }

    /// Live (not zombie) processes other than this one whose command line names the data
    /// dir: `openrun` commands on it and the processes they started (a sandbox's cleaner).
    pub fn processes_naming_data_dir(&self) -> Vec<u32> {
        let dir = self.data_dir().as_os_str().as_encoded_bytes().to_vec();
        let me = std::process::id();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| pid != me)
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                    stat.rsplit(')')
                        .next()
                        .is_some_and(|s| !s.starts_with(" Z"))
                })
            })
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|cmd| cmd.split(|&b| b == 0).any(|arg| arg == dir.as_slice()))
            })
            .collect()
    }

    /// Live sandbox ids according to `openrun ps`.
    pub fn live_ids(&self) -> Vec<String> {
        let out = self.output(["ps"]);
        assert_ok(&out);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // A server killed while its create zygote was still making a sandbox (its warm pool
        // fills right after start) leaves that create to finish on its own: wait for the
        // zygote and its workers of this data dir to end, or the sandbox would appear after
        // the cleanup below and outlive the test.
        self.wait_for_create_helpers(std::time::Duration::from_secs(5));
        for id in self.live_ids_quiet() {
            let _ = self.output(["rm", &id]);
        }
        // Creates with a disk quota loop-mount the data dir's disk pool: let it go with it.
        let pool = self.data_dir().join("disk-pool");
        if pool.exists() {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&pool)
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Env {
    /// Waits (at most `limit`) until no `openrun __create` process of this data dir runs.
    fn wait_for_create_helpers(&self, limit: std::time::Duration) {
        let dir = self.data_dir().to_string_lossy().into_owned();
        let deadline = std::time::Instant::now() + limit;
        let running = || {
            std::fs::read_dir("/proc")
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
                .any(|cmdline| {
                    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
                    args.contains(&dir.as_bytes()) && args.contains(&b"__create".as_slice())
                })
        };
        while running() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    fn live_ids_quiet(&self) -> Vec<String> {
        let Ok(out) = self.cmd(["ps"]).output() else {
            return Vec::new();
        };
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect()
    }
}

pub fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "openrun failed ({:?})\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Path of a sandbox's cgroup in `controller`'s hierarchy (v1) or the unified one (v2).
pub fn cgroup_dir(controller: &str, id: &str) -> PathBuf {
    let v1 = PathBuf::from(format!("/sys/fs/cgroup/{controller}/openrun/{id}"));
    if v1.exists() {
        return v1;
    }
    PathBuf::from(format!("/sys/fs/cgroup/openrun/{id}"))
}

/// Pids of the processes in sandbox `id`'s cgroup (its agent and what it runs).
pub fn cgroup_procs(id: &str) -> Vec<u32> {
    let procs = cgroup_dir("pids", id).join("cgroup.procs");
    std::fs::read_to_string(&procs)
        .unwrap_or_else(|e| panic!("read {}: {e}", procs.display()))
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Names of sandbox cgroups on the host (v1 memory hierarchy or v2).
pub fn openrun_cgroups() -> Vec<String> {
    let mut names = Vec::new();
    for dir in [
        "/sys/fs/cgroup/memory/openrun",
        "/sys/fs/cgroup/pids/openrun",
        "/sys/fs/cgroup/openrun",
    ] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    names.push(format!("{dir}/{}", e.file_name().to_string_lossy()));
                }
            }
        }
    }
    names.sort();
    names
}
