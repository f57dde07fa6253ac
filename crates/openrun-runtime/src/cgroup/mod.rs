//! Sandbox cgroups on cgroup v1 and v2 hosts.
//!
//! Every sandbox gets a cgroup named `openrun/<name>`: on v2 one directory in the unified
//! hierarchy, on v1 one directory in each of the memory, pids, cpu and freezer hierarchies. v2 is
//! used when the unified hierarchy offers memory, pids and cpu; otherwise v1. Hybrid hosts like
//! the project's machines bind every controller to v1 and leave v2 with only hugetlb, so v1 is
//! not a legacy path here.
//!
//! All of it is plain file I/O on cgroupfs: nothing forks, so it is safe to call from the
//! multi-threaded server. Cgroups are never removed on drop, because sandboxes outlive the
//! server; [`CgroupManager::list`] finds them again.

mod detect;
mod v1;
mod v2;

use std::{
    fs, io,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use rustix::fd::AsFd;
use rustix::process::{kill_process, Pid, Signal};

use crate::limits::{LimitParseError, Limits};

/// Directory under each hierarchy's root that holds every sandbox cgroup.
pub const PARENT: &str = "openrun";
/// Longest accepted sandbox cgroup name.
pub const MAX_NAME_LEN: usize = 64;
/// CFS period used for CPU limits, in microseconds (the kernel's default, 100 ms).
const CPU_PERIOD_US: u64 = 100_000;
/// How long freeze, thaw, kill_all and remove wait for the kernel before giving up.
const WAIT: Duration = Duration::from_secs(2);

/// Which cgroup interface a host offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// One hierarchy per controller (hybrid or legacy hosts).
    V1,
    /// The unified hierarchy.
    V2,
}

/// Errors of the cgroup layer. File errors name the path and the OS error, which is also the
/// `source`.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// Neither a cgroup v2 hierarchy with memory, pids and cpu nor v1 hierarchies for memory,
    /// pids, cpu and freezer are mounted; the message says what is missing.
    #[error("no usable cgroup hierarchy: {0}")]
    NoHierarchy(String),
    /// The sandbox name could be used to escape the `openrun` directory or is too long.
    #[error("invalid sandbox cgroup name {0:?}: expected 1 to 64 characters from a-z, 0-9 and -")]
    InvalidName(String),
    /// The limits are out of range.
    #[error(transparent)]
    Limits(#[from] LimitParseError),
    /// A cgroup with this name already exists (a leak or a name reused too early).
    #[error("cgroup {} already exists", .0.display())]
    AlreadyExists(PathBuf),
    /// Reading a file or directory failed.
    #[error("cannot read {}: {}", .path.display(), describe(.source))]
    Read {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Writing a control file failed (the kernel rejected the value or access was denied).
    #[error("cannot write {}: {}", .path.display(), describe(.source))]
    Write {
        /// The control file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Creating a cgroup directory failed.
    #[error("cannot create {}: {}", .path.display(), describe(.source))]
    Create {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Removing a cgroup directory failed (`EBUSY` after the retries: processes are left).
    #[error("cannot remove {}: {}", .path.display(), describe(.source))]
    Remove {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A control file did not hold what the kernel documents.
    #[error("unexpected contents in {}: {detail}", .path.display())]
    Malformed {
        /// The control file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// Sending SIGKILL to a process of the cgroup failed.
    #[error("cannot kill process {pid}: {}", describe(.source))]
    Kill {
        /// The process.
        pid: i32,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The kernel did not reach a state in time (a task stuck in uninterruptible sleep).
    #[error("timed out after {timeout:?} waiting for {} to {what}", .path.display())]
    Timeout {
        /// The cgroup directory (or control file) being waited on.
        path: PathBuf,
        /// The awaited state, as a verb phrase (`freeze`, `become empty`).
        what: &'static str,
        /// How long we waited.
        timeout: Duration,
    },
}

type Result<T, E = CgroupError> = std::result::Result<T, E>;

/// Detected cgroup layout of this host.
#[derive(Debug, Clone)]
pub struct CgroupManager {
    layout: Layout,
}

#[derive(Debug, Clone)]
enum Layout {
    V1(v1::Hierarchies),
    V2(v2::Hierarchy),
}

impl CgroupManager {
    /// Reads the mount table (`/proc/self/mountinfo`) and picks v2 if its hierarchy offers
    /// memory, pids and cpu, else v1 if memory, pids, cpu and freezer hierarchies are mounted.
    pub fn detect() -> Result<Self> {
        let path = Path::new("/proc/self/mountinfo");
        let mountinfo = crate::sys::read_kernel_file(path).map_err(read_error(path))?;
        let layout = detect::layout(&mountinfo, |p| crate::sys::read_kernel_file(p))?;
        tracing::debug!(?layout, "detected cgroup layout");
        Ok(Self { layout })
    }

    /// The cgroup interface in use.
    pub fn version(&self) -> CgroupVersion {
        match self.layout {
            Layout::V1(_) => CgroupVersion::V1,
            Layout::V2(_) => CgroupVersion::V2,
        }
    }

    /// Creates `openrun/<name>` in every needed hierarchy (creating the `openrun` parent with
    /// controllers enabled on v2) and applies the limits. On any failure removes the sandbox
    /// directories it created (the shared `openrun` parent stays); an existing cgroup of that
    /// name is [`CgroupError::AlreadyExists`] and is left alone.
    pub fn create(&self, name: &str, limits: &Limits) -> Result<Cgroup> {
        validate_name(name)?;
        limits.validate()?;
        let dirs = match &self.layout {
            Layout::V1(h) => Dirs::V1(h.create(name, limits)?),
            Layout::V2(h) => Dirs::V2(h.create(name, limits)?),
        };
        tracing::debug!(name, ?limits, "created cgroup");
        Ok(Cgroup {
            name: name.to_owned(),
            dirs,
        })
    }

    /// Opens an existing sandbox cgroup (`None` when it is absent in all hierarchies or the
    /// name is invalid). A cgroup present in only some v1 hierarchies is opened, so that it can
    /// be removed.
    pub fn open(&self, name: &str) -> Option<Cgroup> {
        validate_name(name).ok()?;
        let cgroup = Cgroup {
            name: name.to_owned(),
            dirs: self.dirs(name),
        };
        cgroup.paths().iter().any(|p| p.is_dir()).then_some(cgroup)
    }

    /// Names of all sandbox cgroups under `openrun` in any hierarchy, sorted (for leak checks
    /// and reconciliation). Directories with names we would never create are skipped.
    pub fn list(&self) -> Result<Vec<String>> {
        let parents = match &self.layout {
            Layout::V1(h) => h.parents(),
            Layout::V2(h) => vec![h.parent()],
        };
        let mut names = Vec::new();
        for parent in parents {
            let entries = match fs::read_dir(&parent) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(read_error(&parent)(e)),
            };
            for entry in entries {
                let entry = entry.map_err(read_error(&parent))?;
                let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
                let name = entry.file_name();
                match name.to_str() {
                    Some(name) if is_dir && validate_name(name).is_ok() => {
                        names.push(name.to_owned())
                    }
                    _ => {}
                }
            }
        }
        names.sort();
        names.dedup();
        Ok(names)
    }

    fn dirs(&self, name: &str) -> Dirs {
        match &self.layout {
            Layout::V1(h) => Dirs::V1(h.dirs(name)),
            Layout::V2(h) => Dirs::V2(h.dir(name)),
        }
    }
}

/// How a new process enters its cgroup without the host migrating it.
///
/// Writing a pid to `cgroup.procs` takes the kernel's global threadgroup lock for writing,
/// which waits for an RCU grace period: about 15 ms per sandbox on a v1 host. Two paths avoid
/// it: on v1 a single-threaded process moves *itself* by writing `0` to each hierarchy's
/// `tasks` file (the kernel skips the global lock for that case; the files are opened by the
/// privileged creator, whose credentials the kernel checks, and handed to the process: see
/// [`join_through_tasks`]); on v2 the process is created directly inside the cgroup with
/// `clone3(CLONE_INTO_CGROUP)`.
#[derive(Debug)]
pub enum SelfJoin {
    /// v1: the `tasks` file of every hierarchy, opened for writing.
    V1 {
        /// One per hierarchy.
        tasks: Vec<fs::File>,
    },
    /// v2: the cgroup directory, for `CLONE_INTO_CGROUP`.
    V2 {
        /// The directory.
        dir: fs::File,
    },
}

/// Most `tasks` files a [`SelfJoin::V1`] holds: one per v1 hierarchy.
pub const MAX_TASKS_FILES: usize = v1::CONTROLLERS.len();

/// Called by the new process itself (single-threaded) with the `tasks` files of
/// [`SelfJoin::V1`]: moves the calling thread into every hierarchy.
pub fn join_through_tasks(tasks: &[impl AsFd]) -> io::Result<()> {
    for file in tasks {
        if rustix::io::write(file, b"0")? != 1 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short write to a cgroup tasks file",
            ));
        }
    }
    Ok(())
}

/// One sandbox's cgroup (a directory per v1 hierarchy, or one v2 directory).
#[derive(Debug, Clone)]
pub struct Cgroup {
    name: String,
    dirs: Dirs,
}

#[derive(Debug, Clone)]
enum Dirs {
    V1(v1::Dirs),
    V2(PathBuf),
}

impl Cgroup {
    /// The sandbox name (the last path component).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The cgroup's directories: one per distinct v1 hierarchy (memory, pids, cpu, freezer
    /// order), or the single v2 directory (e.g. for `CLONE_INTO_CGROUP`).
    pub fn paths(&self) -> Vec<&Path> {
        match &self.dirs {
            Dirs::V1(d) => d.unique(),
            Dirs::V2(d) => vec![d.as_path()],
        }
    }

    /// Opens what a new, still single-threaded process needs to join this cgroup by itself,
    /// before it runs any user code (see [`SelfJoin`]). Open it in the creator before forking.
    pub fn self_join(&self) -> Result<SelfJoin> {
        match &self.dirs {
            Dirs::V1(_) => {
                let mut tasks = Vec::new();
                for dir in self.paths() {
                    let path = dir.join("tasks");
                    let file =
                        fs::OpenOptions::new()
                            .write(true)
                            .open(&path)
                            .map_err(|source| CgroupError::Write {
                                path: path.clone(),
                                source,
                            })?;
                    tasks.push(file);
                }
                Ok(SelfJoin::V1 { tasks })
            }
            Dirs::V2(dir) => {
                let file = fs::File::open(dir).map_err(read_error(dir))?;
                Ok(SelfJoin::V2 { dir: file })
            }
        }
    }

    /// Opens the `cgroup.procs` file of each of the cgroup's directories for writing: a
    /// process writing `0` to each joins the cgroup (on v1 every hierarchy), e.g. a child
    /// between fork and exec, with the files opened in the parent before the fork.
    pub fn procs_files(&self) -> Result<Vec<fs::File>> {
        self.paths()
            .into_iter()
            .map(|dir| {
                let path = dir.join("cgroup.procs");
                fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|source| CgroupError::Write { path, source })
            })
            .collect()
    }

    /// Moves a process (all its threads) into the cgroup; on v1 into every hierarchy.
    pub fn add_process(&self, pid: i32) -> Result<()> {
        for dir in self.paths() {
            write(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Live processes in the cgroup (on v1 in any of its hierarchies), sorted. A removed
    /// cgroup (or a hierarchy missing from a half-made v1 cgroup) has none. Zombies are not
    /// listed, though `pids.current` counts them until they are reaped.
    pub fn procs(&self) -> Result<Vec<i32>> {
        let mut pids = Vec::new();
        for dir in self.paths() {
            let path = dir.join("cgroup.procs");
            let text = match fs::read_to_string(&path) {
                Ok(text) => text,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(read_error(&path)(e)),
            };
            for line in text.lines() {
                pids.push(line.trim().parse().map_err(|_| CgroupError::Malformed {
                    path: path.clone(),
                    detail: format!("{line:?} is not a pid"),
                })?);
            }
        }
        pids.sort_unstable();
        pids.dedup();
        Ok(pids)
    }

    /// How many processes the kernel OOM-killed in this cgroup (`oom_kill` in v1
    /// `memory.oom_control`, v2 `memory.events`).
    pub fn oom_kills(&self) -> Result<u64> {
        match &self.dirs {
            Dirs::V1(d) => keyed(&d.memory.join("memory.oom_control"), "oom_kill"),
            Dirs::V2(d) => keyed(&d.join("memory.events"), "oom_kill"),
        }
    }

    /// Peak memory use in bytes (v1 `memory.max_usage_in_bytes`, v2 `memory.peak`), or the
    /// current use on v2 kernels without `memory.peak`.
    pub fn memory_peak_or_usage(&self) -> Result<u64> {
        match &self.dirs {
            Dirs::V1(d) => read_u64(&d.memory.join("memory.max_usage_in_bytes")),
            Dirs::V2(d) => {
                let peak = d.join("memory.peak");
                if peak.exists() {
                    read_u64(&peak)
                } else {
                    read_u64(&d.join("memory.current"))
                }
            }
        }
    }

    /// Number of processes and threads in the cgroup (`pids.current`).
    pub fn pids_current(&self) -> Result<u64> {
        match &self.dirs {
            Dirs::V1(d) => read_u64(&d.pids.join("pids.current")),
            Dirs::V2(d) => read_u64(&d.join("pids.current")),
        }
    }

    /// Freezes every process and waits until the kernel reports the cgroup frozen (at most
    /// 2 s; on timeout the cgroup is thawed again and [`CgroupError::Timeout`] returned).
    pub fn freeze(&self) -> Result<()> {
        self.freeze_within(WAIT)
    }

    /// Thaws the cgroup and waits until the kernel reports it thawed.
    pub fn thaw(&self) -> Result<()> {
        match &self.dirs {
            Dirs::V1(d) => d.thaw(),
            Dirs::V2(d) => v2::thaw(d),
        }
    }

    /// Whether the cgroup is asked to be frozen: v1 `freezer.state` reads `FROZEN` or
    /// `FREEZING`, v2 `cgroup.freeze` holds `1`. A removed cgroup is not frozen.
    pub fn is_frozen(&self) -> Result<bool> {
        let (path, frozen): (PathBuf, fn(&str) -> bool) = match &self.dirs {
            Dirs::V1(d) => (d.freezer.join("freezer.state"), |s| s != "THAWED"),
            Dirs::V2(d) => (d.join("cgroup.freeze"), |s| s == "1"),
        };
        match fs::read_to_string(&path) {
            Ok(text) => Ok(frozen(text.trim())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(read_error(&path)(e)),
        }
    }

    /// Kills every process in the cgroup and waits until it is empty (at most about 2 s). A
    /// removed cgroup is already empty: Ok.
    ///
    /// v2 uses `cgroup.kill`. v1 (and v2 kernels before 5.14) repeat: freeze, SIGKILL every
    /// process, thaw; freezing first means no process can fork or exit while the pids are read
    /// and signalled, so a fork bomb cannot outrun it and no recycled pid is hit.
    pub fn kill_all(&self) -> Result<()> {
        match &self.dirs {
            Dirs::V2(d) if d.join("cgroup.kill").exists() => v2::kill(d),
            _ => self.kill_by_freezing(),
        }
    }

    /// Removes the cgroup's directories (and any sub-cgroups), retrying for up to about 2 s
    /// while the kernel finishes tearing down exiting tasks. Removing an already removed
    /// cgroup is Ok. It does not kill anything: call [`Cgroup::kill_all`] first.
    pub fn remove(&self) -> Result<()> {
        let deadline = Instant::now() + WAIT;
        for dir in self.paths() {
            remove_dir(dir, deadline)?;
        }
        tracing::debug!(name = self.name, "removed cgroup");
        Ok(())
    }

    /// Removes the cgroup's directories if the kernel finds them empty, in one `rmdir` each
    /// (no listing, no waiting): `true` when none is left. The kernel refuses (`EBUSY`) to
    /// remove a cgroup that holds a task or a sub-cgroup, so `true` proves there was nothing
    /// to kill; on `false` (or any error) the caller goes on with [`Cgroup::kill_all`] and
    /// [`Cgroup::remove`], which see what is left.
    pub fn remove_if_empty(&self) -> bool {
        let removed = self
            .paths()
            .into_iter()
            .all(|dir| match fs::remove_dir(dir) {
                Ok(()) => true,
                Err(e) => e.kind() == io::ErrorKind::NotFound,
            });
        if removed {
            tracing::debug!(name = self.name, "removed empty cgroup");
        }
        removed
    }

    fn freeze_within(&self, timeout: Duration) -> Result<()> {
        match &self.dirs {
            Dirs::V1(d) => d.freeze(timeout),
            Dirs::V2(d) => v2::freeze(d, timeout),
        }
    }

    fn kill_by_freezing(&self) -> Result<()> {
        let start = Instant::now();
        let deadline = start + WAIT;
        loop {
            if self.procs()?.is_empty() {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(CgroupError::Timeout {
                    path: self.paths()[0].to_owned(),
                    what: "become empty",
                    timeout: WAIT,
                });
            }
            match self.freeze_within(left.min(Duration::from_millis(500))) {
                Ok(()) => {}
                // A task in uninterruptible sleep keeps the cgroup from freezing: kill what we
                // can anyway; a pending SIGKILL ends it when it wakes.
                Err(e @ CgroupError::Timeout { .. }) => {
                    tracing::warn!(name = self.name, error = %e, "killing unfrozen cgroup")
                }
                Err(e) => return Err(e),
            }
            let killed = self
                .procs()
                .and_then(|pids| pids.into_iter().try_for_each(sigkill));
            // Frozen tasks only act on SIGKILL once thawed.
            self.thaw()?;
            killed?;
            wait_until(Duration::from_millis(100).min(left), || {
                Ok(self.procs()?.is_empty())
            })?;
        }
    }
}

/// Checks that `name` is 1 to 64 characters from `a-z`, `0-9` and `-`, so it is a single,
/// ordinary path component.
fn validate_name(name: &str) -> Result<()> {
    let ok = (1..=MAX_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(CgroupError::InvalidName(name.to_owned()))
    }
}

/// Sends SIGKILL; a process that is already gone is fine.
fn sigkill(pid: i32) -> Result<()> {
    let Some(target) = Pid::from_raw(pid) else {
        return Ok(());
    };
    match kill_process(target, Signal::KILL) {
        Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
        Err(e) => Err(CgroupError::Kill {
            pid,
            source: e.into(),
        }),
    }
}

/// `Permission denied (os error 13)` → `permission denied`, in the crate's message style.
fn describe(error: &io::Error) -> String {
    let text = error.to_string();
    let text = match text.rfind(" (os error ") {
        Some(i) if text.ends_with(')') => &text[..i],
        _ => &text,
    };
    let mut chars = text.chars();
    chars
        .next()
        .map(|first| first.to_lowercase().chain(chars).collect())
        .unwrap_or_default()
}

fn read_error(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Read {
        path: path.to_owned(),
        source,
    }
}

fn read(path: &Path) -> Result<String> {
    crate::sys::read_kernel_file(path).map_err(read_error(path))
}

/// Writes a control file in one `write` (cgroupfs takes each write as one value).
fn write(path: &Path, value: &str) -> Result<()> {
    fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_owned(),
        source,
    })
}

fn read_u64(path: &Path) -> Result<u64> {
    let text = read(path)?;
    text.trim().parse().map_err(|_| CgroupError::Malformed {
        path: path.to_owned(),
        detail: format!("{:?} is not a number", text.trim()),
    })
}

/// The value of `key` in a flat keyed file (`key value` lines, e.g. `memory.events`).
fn keyed(path: &Path, key: &str) -> Result<u64> {
    let text = read(path)?;
    text.lines()
        .find_map(|line| {
            line.strip_prefix(key)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .ok_or_else(|| CgroupError::Malformed {
            path: path.to_owned(),
            detail: format!("no numeric {key:?} entry"),
        })
}

/// Creates a directory; `Ok(false)` when it already exists.
fn make_dir(path: &Path) -> Result<bool> {
    match fs::create_dir(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(source) => Err(CgroupError::Create {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Makes the parent of a cgroup `leaf` when it is missing (`ENOENT` from the leaf's `mkdir`).
fn make_parent(leaf: &Path) -> Result<()> {
    match leaf.parent() {
        Some(parent) => make_dir(parent).map(|_| ()),
        None => Ok(()),
    }
}

/// Creates the leaf directories `dirs`, then runs `apply`. A leaf whose parent is missing
/// gets it from `parent` first. If any step fails, removes the leaves it created. A leaf that
/// already exists is an error.
fn create_leaves(
    dirs: &[&Path],
    parent: impl Fn(&Path) -> Result<()>,
    apply: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let mut created: Vec<&Path> = Vec::new();
    let mut result = Ok(());
    for &dir in dirs {
        let made = match make_dir(dir) {
            Err(CgroupError::Create { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                parent(dir).and_then(|()| make_dir(dir))
            }
            made => made,
        };
        result = match made {
            Ok(true) => {
                created.push(dir);
                Ok(())
            }
            Ok(false) => Err(CgroupError::AlreadyExists(dir.to_owned())),
            Err(e) => Err(e),
        };
        if result.is_err() {
            break;
        }
    }
    if result.is_ok() {
        result = apply();
    }
    if result.is_err() {
        for dir in created.into_iter().rev() {
            if let Err(e) = fs::remove_dir(dir) {
                tracing::warn!(path = %dir.display(), error = %e, "cannot undo cgroup creation");
            }
        }
    }
    result
}

/// Removes a cgroup directory and its sub-cgroups (which a sandbox with a delegated hierarchy
/// may have made). `EBUSY` is retried until `deadline`: tasks that were just killed leave the
/// cgroup a moment after they die.
fn remove_dir(path: &Path, deadline: Instant) -> Result<()> {
    // Usually a leaf: one `rmdir`, and the listing below only when it has sub-cgroups (or
    // tasks that are still leaving).
    match fs::remove_dir(path) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(_) => {}
    }
    let entries = match fs::read_dir(path) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(read_error(path)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(read_error(path))?;
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_dir(&entry.path(), deadline)?;
        }
    }
    loop {
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::ResourceBusy && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(5));
            }
            Err(source) => {
                return Err(CgroupError::Remove {
                    path: path.to_owned(),
                    source,
                })
            }
        }
    }
}

/// Polls `done` (1 ms, doubling up to 16 ms) until it returns true or `timeout` passes;
/// returns whether it became true.
fn wait_until(timeout: Duration, mut done: impl FnMut() -> Result<bool>) -> Result<bool> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if done()? {
            return Ok(true);
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(false);
        }
        thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(16));
    }
}

#[cfg(test)]
mod tests;
