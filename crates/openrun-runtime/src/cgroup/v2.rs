//! cgroup v2: one directory in the unified hierarchy.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use super::{
    create_leaves, keyed, make_dir, read, wait_until, write, CgroupError, Result, CPU_PERIOD_US,
    PARENT, WAIT,
};
use crate::limits::Limits;

/// The v2 controllers a sandbox needs; the hierarchy is used only if it offers all of them.
pub(super) const CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

/// The unified hierarchy's root (its mount point).
#[derive(Debug, Clone)]
pub(super) struct Hierarchy {
    root: PathBuf,
}

impl Hierarchy {
    pub(super) fn new(root: PathBuf) -> Self {
        Self { root }
    }

    #[cfg(test)]
    pub(super) fn root(&self) -> &Path {
        &self.root
    }

    /// The `openrun` directory.
    pub(super) fn parent(&self) -> PathBuf {
        self.root.join(PARENT)
    }

    pub(super) fn dir(&self, name: &str) -> PathBuf {
        self.parent().join(name)
    }

    /// Enables the controllers from the root down to `openrun` (a child only gets the
    /// controllers its parent enables in `cgroup.subtree_control`), then creates the leaf.
    /// `openrun` itself never holds processes, as v2's no-internal-processes rule requires.
    pub(super) fn create(&self, name: &str, limits: &Limits) -> Result<PathBuf> {
        enable_controllers(&self.root)?;
        let parent = self.parent();
        make_dir(&parent)?;
        enable_controllers(&parent)?;
        let dir = self.dir(name);
        create_leaves(&[&dir], |_| Ok(()), || apply(&dir, limits))?;
        Ok(dir)
    }
}

/// Adds the missing ones of [`CONTROLLERS`] to `dir/cgroup.subtree_control`.
fn enable_controllers(dir: &Path) -> Result<()> {
    let path = dir.join("cgroup.subtree_control");
    let enabled = read(&path)?;
    let missing: Vec<String> = CONTROLLERS
        .into_iter()
        .filter(|c| !enabled.split_whitespace().any(|e| e == *c))
        .map(|c| format!("+{c}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    write(&path, &missing.join(" "))
}

fn apply(dir: &Path, limits: &Limits) -> Result<()> {
    if let Some(bytes) = limits.memory_bytes {
        write(&dir.join("memory.max"), &bytes.to_string())?;
        // No swap at all, so swapping cannot stretch the memory limit. The file exists only
        // when the kernel accounts swap.
        let swap = dir.join("memory.swap.max");
        if swap.exists() {
            write(&swap, "0")?;
        }
    }
    if let Some(pids) = limits.pids {
        write(&dir.join("pids.max"), &pids.to_string())?;
    }
    if let Some(millis) = limits.cpu_millis {
        // millis / 1000 CPUs of each period: millis * period / 1000 = millis * 100 µs.
        let quota = millis * (CPU_PERIOD_US / 1000);
        write(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
    }
    Ok(())
}

/// Writes `cgroup.freeze` and waits for `cgroup.events` to report the wanted `frozen` value.
fn set_frozen(dir: &Path, frozen: bool, timeout: Duration) -> Result<bool> {
    write(&dir.join("cgroup.freeze"), if frozen { "1" } else { "0" })?;
    let events = dir.join("cgroup.events");
    wait_until(timeout, || Ok((keyed(&events, "frozen")? == 1) == frozen))
}

/// Freezes the cgroup; on timeout thaws it again.
pub(super) fn freeze(dir: &Path, timeout: Duration) -> Result<()> {
    if set_frozen(dir, true, timeout)? {
        return Ok(());
    }
    set_frozen(dir, false, WAIT)?;
    Err(CgroupError::Timeout {
        path: dir.to_owned(),
        what: "freeze",
        timeout,
    })
}

pub(super) fn thaw(dir: &Path) -> Result<()> {
    if set_frozen(dir, false, WAIT)? {
        Ok(())
    } else {
        Err(CgroupError::Timeout {
            path: dir.to_owned(),
            what: "thaw",
            timeout: WAIT,
        })
    }
}

/// SIGKILLs everything through `cgroup.kill` (which also catches tasks forking meanwhile) and
/// waits until `cgroup.events` reports the cgroup unpopulated.
pub(super) fn kill(dir: &Path) -> Result<()> {
    write(&dir.join("cgroup.kill"), "1")?;
    let events = dir.join("cgroup.events");
    if wait_until(WAIT, || Ok(keyed(&events, "populated")? == 0))? {
        Ok(())
    } else {
        Err(CgroupError::Timeout {
            path: dir.to_owned(),
            what: "become empty",
            timeout: WAIT,
        })
    }
}

/// The v2 code on a plain directory that mimics cgroupfs files (this project's machines have
/// no v2 controllers, so the real-kernel tests exercise v1 there).
#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    /// A scratch directory removed on drop.
    struct FakeRoot(PathBuf);

    impl FakeRoot {
        fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("openrun-cgroup-v2-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir(&dir).unwrap();
            Self(dir)
        }

        fn file(&self, rel: &str, contents: &str) {
            let path = self.0.join(rel);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, contents).unwrap();
        }

        fn read(&self, rel: &str) -> String {
            fs::read_to_string(self.0.join(rel)).unwrap()
        }
    }

    impl Drop for FakeRoot {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn create_enables_missing_controllers_and_writes_limits() {
        let root = FakeRoot::new("create");
        root.file("cgroup.subtree_control", "cpu memory\n");
        root.file("openrun/cgroup.subtree_control", "");
        let limits = Limits {
            memory_bytes: Some(64 << 20),
            cpu_millis: Some(250),
            pids: Some(100),
            ..Limits::default()
        };
        let dir = Hierarchy::new(root.0.clone())
            .create("sb-1", &limits)
            .unwrap();

        assert_eq!(dir, root.0.join("openrun/sb-1"));
        assert_eq!(root.read("cgroup.subtree_control"), "+pids");
        assert_eq!(
            root.read("openrun/cgroup.subtree_control"),
            "+memory +pids +cpu"
        );
        assert_eq!(root.read("openrun/sb-1/memory.max"), "67108864");
        assert_eq!(root.read("openrun/sb-1/pids.max"), "100");
        assert_eq!(root.read("openrun/sb-1/cpu.max"), "25000 100000");
        // No swap accounting file: nothing is written for swap.
        assert!(!root.0.join("openrun/sb-1/memory.swap.max").exists());
    }

    #[test]
    fn swap_is_disabled_when_the_kernel_accounts_it() {
        let root = FakeRoot::new("swap");
        let dir = root.0.join("sb");
        root.file("sb/memory.swap.max", "max\n");
        let limits = Limits {
            memory_bytes: Some(8 << 20),
            ..Limits::default()
        };
        apply(&dir, &limits).unwrap();
        assert_eq!(root.read("sb/memory.swap.max"), "0");
        assert_eq!(root.read("sb/memory.max"), "8388608");
    }

    #[test]
    fn freeze_times_out_and_thaws_when_the_kernel_never_reports_frozen() {
        let root = FakeRoot::new("freeze");
        root.file("cgroup.events", "populated 1\nfrozen 0\n");
        let err = freeze(&root.0, Duration::from_millis(50)).unwrap_err();
        assert!(
            matches!(err, CgroupError::Timeout { what: "freeze", .. }),
            "{err:?}"
        );
        assert_eq!(
            root.read("cgroup.freeze"),
            "0",
            "left frozen after a timeout"
        );
        assert!(err
            .to_string()
            .starts_with("timed out after 50ms waiting for "));
    }

    #[test]
    fn freeze_waits_for_the_kernel_to_report_frozen_and_thaw_undoes_it() {
        let root = FakeRoot::new("frozen");
        // The kernel has already reported the cgroup frozen: freeze returns at once.
        root.file("cgroup.events", "populated 1\nfrozen 1\n");
        freeze(&root.0, Duration::from_millis(50)).unwrap();
        assert_eq!(root.read("cgroup.freeze"), "1");
        let cgroup = super::super::Cgroup {
            name: "fake".into(),
            dirs: super::super::Dirs::V2(root.0.clone()),
        };
        assert!(cgroup.is_frozen().unwrap());
        // Thawing waits for `frozen 0`: it times out while the file still says frozen.
        let err = thaw(&root.0).unwrap_err();
        assert!(
            matches!(err, CgroupError::Timeout { what: "thaw", .. }),
            "{err:?}"
        );
        assert_eq!(root.read("cgroup.freeze"), "0");
        assert!(!cgroup.is_frozen().unwrap());
        root.file("cgroup.events", "populated 1\nfrozen 0\n");
        thaw(&root.0).unwrap();
        // A garbled events file is an error naming it, not a hang.
        root.file("cgroup.events", "populated 1\n");
        let err = freeze(&root.0, Duration::from_millis(50)).unwrap_err();
        assert!(matches!(err, CgroupError::Malformed { .. }), "{err:?}");
    }

    #[test]
    fn kill_waits_for_the_cgroup_to_empty() {
        let root = FakeRoot::new("kill");
        root.file("cgroup.events", "populated 0\nfrozen 0\n");
        kill(&root.0).unwrap();
        assert_eq!(root.read("cgroup.kill"), "1");
    }
}
