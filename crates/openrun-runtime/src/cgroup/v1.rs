//! cgroup v1: one directory per controller hierarchy.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use super::{
    create_leaves, make_parent, read, wait_until, write, CgroupError, Result, CPU_PERIOD_US, PARENT,
};
use crate::limits::Limits;

/// The v1 controllers a sandbox needs, in the order of [`Hierarchies`]' fields.
pub(super) const CONTROLLERS: [&str; 4] = ["memory", "pids", "cpu", "freezer"];

/// Mount points of the hierarchies holding each needed controller (two fields are equal when
/// the controllers are co-mounted).
#[derive(Debug, Clone)]
pub(super) struct Hierarchies {
    pub(super) memory: PathBuf,
    pub(super) pids: PathBuf,
    pub(super) cpu: PathBuf,
    pub(super) freezer: PathBuf,
}

/// One sandbox's directory in each hierarchy.
#[derive(Debug, Clone)]
pub(super) struct Dirs {
    pub(super) memory: PathBuf,
    pub(super) pids: PathBuf,
    pub(super) cpu: PathBuf,
    pub(super) freezer: PathBuf,
}

impl Hierarchies {
    pub(super) fn dirs(&self, name: &str) -> Dirs {
        let dir = |root: &Path| root.join(PARENT).join(name);
        Dirs {
            memory: dir(&self.memory),
            pids: dir(&self.pids),
            cpu: dir(&self.cpu),
            freezer: dir(&self.freezer),
        }
    }

    /// The `openrun` directory of each distinct hierarchy.
    pub(super) fn parents(&self) -> Vec<PathBuf> {
        let mut parents: Vec<PathBuf> = Vec::with_capacity(4);
        for root in [&self.memory, &self.pids, &self.cpu, &self.freezer] {
            let parent = root.join(PARENT);
            if !parents.contains(&parent) {
                parents.push(parent);
            }
        }
        parents
    }

    pub(super) fn create(&self, name: &str, limits: &Limits) -> Result<Dirs> {
        let dirs = self.dirs(name);
        // The `openrun` parents exist after the first create: they are made only when a leaf
        // cannot be (a `mkdir` each saved on every other create).
        create_leaves(&dirs.unique(), make_parent, || dirs.apply(limits))?;
        Ok(dirs)
    }
}

impl Dirs {
    /// The distinct directories, in memory, pids, cpu, freezer order.
    pub(super) fn unique(&self) -> Vec<&Path> {
        let mut dirs: Vec<&Path> = Vec::with_capacity(4);
        for dir in [&self.memory, &self.pids, &self.cpu, &self.freezer] {
            if !dirs.contains(&dir.as_path()) {
                dirs.push(dir);
            }
        }
        dirs
    }

    fn apply(&self, limits: &Limits) -> Result<()> {
        if let Some(bytes) = limits.memory_bytes {
            write(
                &self.memory.join("memory.limit_in_bytes"),
                &bytes.to_string(),
            )?;
            // memory+swap gets the same limit, so swapping cannot stretch the memory limit.
            // The file exists only when the kernel accounts swap.
            let memsw = self.memory.join("memory.memsw.limit_in_bytes");
            if memsw.exists() {
                write(&memsw, &bytes.to_string())?;
            }
        }
        if let Some(pids) = limits.pids {
            write(&self.pids.join("pids.max"), &pids.to_string())?;
        }
        if let Some(millis) = limits.cpu_millis {
            write(
                &self.cpu.join("cpu.cfs_period_us"),
                &CPU_PERIOD_US.to_string(),
            )?;
            // millis / 1000 CPUs of each period: millis * period / 1000 = millis * 100 µs.
            let quota = millis * (CPU_PERIOD_US / 1000);
            write(&self.cpu.join("cpu.cfs_quota_us"), &quota.to_string())?;
        }
        Ok(())
    }

    /// Writes `FROZEN` and polls `freezer.state` until it reads `FROZEN` (it reads `FREEZING`
    /// meanwhile). The write is repeated now and then, which nudges tasks that were missed
    /// while forking. On timeout the cgroup is thawed.
    pub(super) fn freeze(&self, timeout: Duration) -> Result<()> {
        let state = self.freezer.join("freezer.state");
        write(&state, "FROZEN")?;
        let mut polls = 0u32;
        let frozen = wait_until(timeout, || {
            polls += 1;
            if polls == 16 {
                polls = 0;
                write(&state, "FROZEN")?;
            }
            Ok(read(&state)?.trim() == "FROZEN")
        })?;
        if frozen {
            return Ok(());
        }
        write(&state, "THAWED")?;
        Err(CgroupError::Timeout {
            path: self.freezer.clone(),
            what: "freeze",
            timeout,
        })
    }

    pub(super) fn thaw(&self) -> Result<()> {
        let state = self.freezer.join("freezer.state");
        write(&state, "THAWED")?;
        if wait_until(super::WAIT, || Ok(read(&state)?.trim() == "THAWED"))? {
            Ok(())
        } else {
            Err(CgroupError::Timeout {
                path: self.freezer.clone(),
                what: "thaw",
                timeout: super::WAIT,
            })
        }
    }
}
