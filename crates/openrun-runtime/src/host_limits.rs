//! Host-wide kernel limits that every sandbox shares, raised once by `openrun serve` at start.
//!
//! Some limits are not per sandbox but per host, and their defaults are small enough that one
//! sandbox can use them up for every other sandbox and for the host itself:
//! - `fs.file-max`: 40 processes at the default 65,536 open files reach this host's 2.4 M.
//!   systemd sets it to `LONG_MAX` (what [`FILE_MAX`] is): open files are kernel memory charged
//!   to the opener's memory cgroup, which is the limit that counts;
//! - `kernel.pid_max`: 32,768 is fewer than 8 sandboxes at their default 4,096 pids; systemd
//!   and most distributions use 4,194,304 (the kernel's maximum on 64-bit) on 64-bit hosts;
//! - `fs.inotify.max_user_instances` / `max_user_watches`: every sandbox's user namespace
//!   belongs to host root, so the kernel charges every sandbox's inotify instances and
//!   watches to host root's counters as well, beside each sandbox's own (see `init.rs`, which
//!   caps those per sandbox). Raised so that many sandboxes at their own cap fit: instances
//!   to 65,536 (64 sandboxes at 1,024), watches to 4,194,304 (32 at 131,072). Both are kernel
//!   memory charged to the sandbox's memory cgroup (~1 KiB a watch), so the host counters are
//!   a last resort, not the budget.
//!
//! Nothing is ever lowered: a host that set higher values keeps them. A `/proc/sys` that cannot
//! be written (a container host) is a warning, not an error: sandboxes still work, they share
//! the lower limits.

use std::path::Path;

/// `fs.file-max` target: `LONG_MAX`, as systemd sets it.
pub const FILE_MAX: u64 = i64::MAX as u64;
/// `kernel.pid_max` target: the kernel's maximum on 64-bit (`PID_MAX_LIMIT`).
pub const PID_MAX: u64 = 4_194_304;
/// `fs.inotify.max_user_instances` target.
pub const INOTIFY_INSTANCES: u64 = 65_536;
/// `fs.inotify.max_user_watches` target.
pub const INOTIFY_WATCHES: u64 = 4_194_304;

/// The sysctls raised, as paths under `/proc/sys`, with their targets.
const TARGETS: [(&str, u64); 4] = [
    ("fs/file-max", FILE_MAX),
    ("kernel/pid_max", PID_MAX),
    ("fs/inotify/max_user_instances", INOTIFY_INSTANCES),
    ("fs/inotify/max_user_watches", INOTIFY_WATCHES),
];

/// One sysctl raised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Its path under `/proc/sys` (`fs/file-max`).
    pub name: &'static str,
    /// The value before.
    pub from: u64,
    /// The value written.
    pub to: u64,
}

/// Raises the host's shared limits (see the module) that are below their targets; returns what
/// changed. Each change is logged at info, each failure at warn.
pub fn raise_shared_limits() -> Vec<Change> {
    raise_shared_limits_under(Path::new("/proc/sys"))
}

/// [`raise_shared_limits`] with `/proc/sys` at `root` (tests).
pub fn raise_shared_limits_under(root: &Path) -> Vec<Change> {
    let mut changes = Vec::new();
    for (name, to) in TARGETS {
        let path = root.join(name);
        let from = match std::fs::read_to_string(&path)
            .map_err(|e| e.to_string())
            .and_then(|s| s.trim().parse::<u64>().map_err(|e| e.to_string()))
        {
            Ok(from) => from,
            Err(error) => {
                tracing::warn!(sysctl = name, %error, "cannot read a shared kernel limit");
                continue;
            }
        };
        if from >= to {
            continue;
        }
        match std::fs::write(&path, to.to_string()) {
            Ok(()) => {
                tracing::info!(
                    sysctl = name,
                    from,
                    to,
                    "raised a kernel limit all sandboxes share"
                );
                changes.push(Change { name, from, to });
            }
            Err(error) => tracing::warn!(
                sysctl = name,
                from,
                to,
                %error,
                "cannot raise a kernel limit all sandboxes share: one sandbox may exhaust it \
                 for the others"
            ),
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raises_only_what_is_lower_and_skips_what_it_cannot_read() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("fs/inotify")).unwrap();
        std::fs::create_dir_all(root.join("kernel")).unwrap();
        std::fs::write(root.join("fs/file-max"), "2466246\n").unwrap();
        // Higher than the target: kept.
        std::fs::write(root.join("kernel/pid_max"), "8388608\n").unwrap();
        std::fs::write(root.join("fs/inotify/max_user_instances"), "128\n").unwrap();
        // max_user_watches missing: a warning, the rest goes on.
        let changes = raise_shared_limits_under(root);
        assert_eq!(
            changes,
            vec![
                Change {
                    name: "fs/file-max",
                    from: 2_466_246,
                    to: FILE_MAX
                },
                Change {
                    name: "fs/inotify/max_user_instances",
                    from: 128,
                    to: INOTIFY_INSTANCES
                },
            ]
        );
        let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
        assert_eq!(read("fs/file-max"), "9223372036854775807");
        assert_eq!(read("kernel/pid_max"), "8388608\n");
        assert_eq!(read("fs/inotify/max_user_instances"), "65536");
        assert!(!root.join("fs/inotify/max_user_watches").exists());
        // A second pass changes nothing.
        assert!(raise_shared_limits_under(root).is_empty());
    }

    #[test]
    fn an_unwritable_sysctl_is_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("kernel")).unwrap();
        // A directory where the file should be: reads fail.
        std::fs::create_dir_all(root.join("fs/file-max")).unwrap();
        std::fs::write(root.join("kernel/pid_max"), "32768").unwrap();
        let changes = raise_shared_limits_under(root);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].name, "kernel/pid_max");
    }
}
