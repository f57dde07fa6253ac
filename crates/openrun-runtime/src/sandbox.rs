//! Creating, finding and destroying sandboxes: the host side of the namespace backend.

use std::fs;
use std::io;
use std::os::unix::fs::{chown, DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fd::{AsFd, OwnedFd};
use rustix::mount::{open_tree, OpenTreeFlags};

use crate::cgroup::{Cgroup, CgroupManager};
use crate::client::AgentClient;
use crate::error::{IoContext, Result, RuntimeError};
use crate::ids::{IdPool, IdRange, DEFAULT_POOL_DIR};
use crate::image::{self, PreparedImage};
use crate::init::{self, InitPlan, OverlayPlan};
use crate::setup_channel::{self, SetupMessage};
use crate::spec::SandboxSpec;
use crate::state::{self, SandboxPaths, SandboxRecord};
use crate::sys::{self, Forked};

/// Longest data dir path for which `<dir>/sandboxes/<id>/agent.sock` fits a Unix socket address.
const MAX_DATA_DIR_LEN: usize = 70;

/// The namespace backend rooted at one data dir.
#[derive(Debug)]
pub struct Runtime {
    data_dir: PathBuf,
    cgroups: CgroupManager,
    pool: IdPool,
}

/// A live sandbox known to this process.
#[derive(Debug)]
pub struct Sandbox {
    record: SandboxRecord,
    paths: SandboxPaths,
    cgroup: Option<Cgroup>,
    /// Pidfd of the agent; `child` when this process created it (and must reap it).
    pidfd: Option<OwnedFd>,
    child: bool,
    control: Option<UnixStream>,
}

impl Runtime {
    /// Opens the backend: checks privileges, creates the data dir, detects cgroups.
    pub fn open(data_dir: impl Into<PathBuf>) -> Result<Self> {
        let data_dir: PathBuf = data_dir.into();
        if !rustix::process::geteuid().is_root() {
            return Err(RuntimeError::NotRoot);
        }
        let data_dir = absolute(&data_dir);
        if data_dir.as_os_str().len() > MAX_DATA_DIR_LEN {
            return Err(RuntimeError::DataDirTooLong(data_dir));
        }
        let dd_err = |source| RuntimeError::DataDir {
            path: data_dir.clone(),
            source,
        };
        for sub in ["", "sandboxes", "images"] {
            let dir = data_dir.join(sub);
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o711)
                .create(&dir)
                .map_err(dd_err)?;
        }
        // A directory can exist yet be unwritable (read-only mount, wrong owner under userns).
        let probe = data_dir.join(format!(".probe-{}", std::process::id()));
        fs::write(&probe, b"").map_err(dd_err)?;
        let _ = fs::remove_file(&probe);
        let cgroups = CgroupManager::detect()?;
        let pool = IdPool::open(DEFAULT_POOL_DIR)
            .context(|| format!("cannot create the id pool at {DEFAULT_POOL_DIR}"))?;
        Ok(Self {
            data_dir,
            cgroups,
            pool,
        })
    }

    /// The data dir.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    fn sandboxes_dir(&self) -> PathBuf {
        self.data_dir.join("sandboxes")
    }

    fn paths(&self, id: &str) -> SandboxPaths {
        SandboxPaths::new(&self.sandboxes_dir(), id)
    }

    /// The cgroup layout in use.
    pub fn cgroups(&self) -> &CgroupManager {
        &self.cgroups
    }

    /// Creates a sandbox and returns once its agent is ready to serve.
    ///
    /// Must be called from a single-threaded process: the sandbox's init is forked from the
    /// caller (like `runc init`), and a fork of a multi-threaded process may inherit locks held
    /// by other threads. Multi-threaded callers run the `openrun` binary's helper instead.
    pub fn create(&self, spec: &SandboxSpec) -> Result<Sandbox> {
        ensure_single_threaded()?;
        let image = image::prepare(&spec.image, &self.data_dir.join("images"))?;
        let id = state::new_id();
        let ids = self
            .pool
            .claim(&id)
            .context(|| "cannot claim a host id range".to_string())?;
        let paths = self.paths(&id);
        let mut pending = PendingSandbox {
            runtime: self,
            id: id.clone(),
            ids,
            paths: paths.clone(),
            cgroup: None,
            child: None,
        };
        let plan = prepare_host_side(&id, ids, &paths, &image, spec)?;
        let plan_protects_agent = plan.agent.process_oom_score_adj == 0;
        let cgroup = self.cgroups.create(&id, &spec.limits)?;
        pending.cgroup = Some(cgroup);
        let listener = UnixListener::bind(paths.socket())
            .context(|| format!("cannot listen on {}", paths.socket().display()))?;
        let (setup_host, setup_child) = rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::SEQPACKET,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .context(|| "cannot create the setup channel".to_string())?;
        let (control_host, control_child) =
            UnixStream::pair().context(|| "cannot create the control stream".to_string())?;

        let forked = sys::clone3_process(sys::SANDBOX_NAMESPACES).map_err(classify_clone_error)?;
        let (pid, pidfd) = match forked {
            Forked::Child => {
                drop(setup_host);
                drop(control_host);
                // The child is a copy of this process: it must never unwind back into the
                // creator's frames (whose drop guards would tear the new sandbox down).
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                    init::run(plan, setup_child, listener, Some(control_child))
                }));
                sys::exit_now(70);
            }
            Forked::Parent { pid, pidfd } => (pid, pidfd),
        };
        drop(setup_child);
        drop(control_child);
        drop(listener);
        pending.child = Some((pid, pidfd));
        let Some((_, pidfd)) = pending.child.as_ref() else {
            unreachable!("set just above")
        };
        let pidfd = pidfd.as_fd();

        // The child waits on the setup channel while we give it ids, a cgroup and its layers.
        let map = ids.map_line();
        fs::write(format!("/proc/{pid}/uid_map"), &map)
            .context(|| "cannot write the sandbox uid map".to_string())?;
        fs::write(format!("/proc/{pid}/gid_map"), &map)
            .context(|| "cannot write the sandbox gid map".to_string())?;
        if let Some(cg) = &pending.cgroup {
            cg.add_process(pid)?;
        }
        // The agent must survive the OOM killer so it can report what it killed. Lowering a
        // score needs CAP_SYS_RESOURCE, which container hosts often withhold; then the agent's
        // processes get a higher score instead (see `process_oom_score_adj`).
        if plan_protects_agent {
            fs::write(format!("/proc/{pid}/oom_score_adj"), "-1000")
                .context(|| "cannot protect the agent from the OOM killer".to_string())?;
        }
        let userns = rustix::fs::open(
            format!("/proc/{pid}/ns/user"),
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .context(|| "cannot open the sandbox user namespace".to_string())?;
        let mut lowers = Vec::with_capacity(image.layers.len());
        for layer in &image.layers {
            let tree = open_tree(
                rustix::fs::CWD,
                &layer.lower,
                OpenTreeFlags::OPEN_TREE_CLONE
                    | OpenTreeFlags::OPEN_TREE_CLOEXEC
                    | OpenTreeFlags::AT_RECURSIVE,
            )
            .context(|| format!("cannot open image layer {}", layer.lower.display()))?;
            sys::idmap_detached_mount(tree.as_fd(), userns.as_fd()).map_err(|source| {
                RuntimeError::NoIdmappedMounts {
                    path: layer.lower.clone(),
                    source,
                }
            })?;
            lowers.push(tree);
        }
        let borrowed: Vec<_> = lowers.iter().map(|f| f.as_fd()).collect();
        setup_channel::send(setup_host.as_fd(), &SetupMessage::Go, &borrowed)
            .context(|| "cannot start the sandbox init".to_string())?;
        drop(borrowed);
        drop(lowers);
        drop(userns);
        match setup_channel::recv(&setup_host) {
            Ok((SetupMessage::Ready, _)) => {}
            Ok((
                SetupMessage::Failed {
                    stage,
                    errno,
                    message,
                },
                _,
            )) => {
                return Err(classify_setup_error(stage, errno, message));
            }
            Ok((other, _)) => {
                return Err(RuntimeError::Setup {
                    stage: "starting the agent".into(),
                    message: format!("unexpected message {other:?}"),
                })
            }
            Err(e) => {
                return Err(RuntimeError::Setup {
                    stage: "starting the agent".into(),
                    message: format!("the sandbox init exited without a word ({e})"),
                })
            }
        }
        let pid_start_ticks = state::process_start_ticks(pid)
            .context(|| "the sandbox agent died while starting".to_string())?;
        let now = state::now_ms();
        let record = SandboxRecord {
            id: id.clone(),
            pid,
            pid_start_ticks,
            ids,
            image: spec.image.describe(),
            lowers: image.layers.iter().map(|l| l.lower.clone()).collect(),
            limits: spec.limits.clone(),
            created_at_ms: now,
            expires_at_ms: spec.lifetime.map(|d| now + d.as_millis() as u64),
        };
        record
            .save(&paths)
            .context(|| format!("cannot write {}", paths.state().display()))?;
        let _ = pidfd;
        let (cgroup, child) = pending.disarm();
        Ok(Sandbox {
            record,
            paths,
            cgroup,
            pidfd: child.map(|(_, fd)| fd),
            child: true,
            control: Some(control_host),
        })
    }

    /// Lists live sandboxes, cleaning up after any whose agent has died.
    pub fn list(&self) -> Result<Vec<SandboxRecord>> {
        let mut live = Vec::new();
        let entries = match fs::read_dir(self.sandboxes_dir()) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(live),
            Err(e) => return Err(RuntimeError::io("cannot list sandboxes", e)),
        };
        for entry in entries.flatten() {
            let Some(id) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if !state::valid_id(&id) {
                continue;
            }
            let paths = self.paths(&id);
            match SandboxRecord::load(&paths) {
                Ok(record) if record.is_alive() => live.push(record),
                Ok(record) => self.cleanup(&id, Some(record.ids)),
                // No record: a creator died mid-way, or is creating right now. Only clean it
                // once it is old enough that no create can still be running.
                Err(_) if is_stale(&paths.dir) => self.cleanup(&id, None),
                Err(_) => {}
            }
        }
        live.sort_by_key(|r| r.created_at_ms);
        Ok(live)
    }

    /// Finds a live sandbox by id (or unique id prefix) to talk to or destroy.
    pub fn open_sandbox(&self, id: &str) -> Result<Sandbox> {
        let record = self.find(id)?;
        let paths = self.paths(&record.id);
        let pidfd = rustix::process::pidfd_open(
            rustix::process::Pid::from_raw(record.pid)
                .ok_or_else(|| RuntimeError::NoSuchSandbox(id.to_string()))?,
            rustix::process::PidfdFlags::empty(),
        )
        .map_err(|_| RuntimeError::NoSuchSandbox(id.to_string()))?;
        // The pid could have been reused between the liveness check and pidfd_open.
        if !record.is_alive() {
            return Err(RuntimeError::NoSuchSandbox(id.to_string()));
        }
        Ok(Sandbox {
            cgroup: self.cgroups.open(&record.id),
            record,
            paths,
            pidfd: Some(pidfd),
            child: false,
            control: None,
        })
    }

    fn find(&self, id: &str) -> Result<SandboxRecord> {
        if !state::valid_id(id) {
            return Err(RuntimeError::InvalidId(id.to_string()));
        }
        let live = self.list()?;
        if let Some(exact) = live.iter().find(|r| r.id == id) {
            return Ok(exact.clone());
        }
        let mut matches = live.into_iter().filter(|r| r.id.starts_with(id));
        match (matches.next(), matches.next()) {
            (Some(one), None) => Ok(one),
            _ => Err(RuntimeError::NoSuchSandbox(id.to_string())),
        }
    }

    /// Destroys a sandbox: kills every process, removes its cgroup, writable layer and
    /// runtime files, and frees its id range.
    pub fn destroy(&self, mut sandbox: Sandbox) -> Result<()> {
        sandbox.control = None;
        if let Some(pidfd) = sandbox.pidfd.take() {
            // Killing pid 1 of a pid namespace kills every process in it.
            match rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL) {
                Ok(()) | Err(rustix::io::Errno::SRCH) => {}
                Err(e) => return Err(RuntimeError::io("cannot kill the sandbox agent", e)),
            }
            wait_for_exit(&pidfd, sandbox.child)?;
        }
        if let Some(cg) = sandbox.cgroup.take() {
            cg.kill_all()?;
            cg.remove()?;
        }
        remove_tree(&sandbox.paths.dir)?;
        self.pool
            .release(sandbox.record.ids, &sandbox.record.id)
            .context(|| "cannot release the sandbox id range".to_string())?;
        Ok(())
    }

    /// Best-effort cleanup of a sandbox whose agent is gone.
    fn cleanup(&self, id: &str, ids: Option<IdRange>) {
        if let Some(cg) = self.cgroups.open(id) {
            let _ = cg.kill_all();
            let _ = cg.remove();
        }
        let _ = remove_tree(&self.paths(id).dir);
        if let Some(ids) = ids {
            let _ = self.pool.release(ids, id);
        }
    }
}

impl Sandbox {
    /// Sandbox id.
    pub fn id(&self) -> &str {
        &self.record.id
    }

    /// What the sandbox recorded about itself.
    pub fn record(&self) -> &SandboxRecord {
        &self.record
    }

    /// The agent socket.
    pub fn socket_path(&self) -> PathBuf {
        self.paths.socket()
    }

    /// Host directory of the writable layer of the root.
    pub fn upper_dir(&self) -> PathBuf {
        self.paths.upper(0)
    }

    /// Takes the creator's already-connected control stream (only once, only for the creator).
    pub fn take_control(&mut self) -> Option<UnixStream> {
        self.control.take()
    }

    /// Connects a new client to the agent.
    pub async fn connect(&self) -> Result<AgentClient> {
        Ok(AgentClient::connect(&self.paths.socket()).await?)
    }

    /// Number of processes the memory limit has killed so far.
    pub fn oom_kills(&self) -> u64 {
        self.cgroup
            .as_ref()
            .and_then(|c| c.oom_kills().ok())
            .unwrap_or(0)
    }
}

/// What exists of a sandbox that is being created, removed again if creation fails.
struct PendingSandbox<'a> {
    runtime: &'a Runtime,
    id: String,
    ids: IdRange,
    paths: SandboxPaths,
    cgroup: Option<Cgroup>,
    child: Option<(i32, OwnedFd)>,
}

impl PendingSandbox<'_> {
    fn disarm(mut self) -> (Option<Cgroup>, Option<(i32, OwnedFd)>) {
        let parts = (self.cgroup.take(), self.child.take());
        self.id.clear();
        parts
    }
}

impl Drop for PendingSandbox<'_> {
    fn drop(&mut self) {
        if self.id.is_empty() {
            return;
        }
        if let Some((_, pidfd)) = self.child.take() {
            let _ = rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL);
            let _ = wait_for_exit(&pidfd, true);
        }
        if let Some(cg) = self.cgroup.take() {
            let _ = cg.kill_all();
            let _ = cg.remove();
        }
        let _ = remove_tree(&self.paths.dir);
        let _ = self.runtime.pool.release(self.ids, &self.id);
    }
}

/// Creates the sandbox's directories (owned by its ids where the sandbox writes) and the
/// per-sandbox `/etc/hostname` and `/etc/hosts` in the writable layer, and computes the plan
/// the init follows.
fn prepare_host_side(
    id: &str,
    ids: IdRange,
    paths: &SandboxPaths,
    image: &PreparedImage,
    spec: &SandboxSpec,
) -> Result<InitPlan> {
    let base = ids.host_base();
    let mkdir = |path: &Path, owner: Option<u32>| -> Result<()> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(path)
            .context(|| format!("cannot create {}", path.display()))?;
        if let Some(owner) = owner {
            chown(path, Some(owner), Some(owner))
                .context(|| format!("cannot chown {}", path.display()))?;
        }
        Ok(())
    };
    // The init runs as the sandbox's ids, not host root: it must be able to traverse the
    // sandbox dir (0711) and own the parents of its upper and work dirs (0700), which keeps
    // other host users out of the writable layer.
    fs::DirBuilder::new()
        .mode(0o711)
        .create(&paths.dir)
        .context(|| format!("cannot create {}", paths.dir.display()))?;
    for private in [paths.dir.join("upper"), paths.dir.join("work")] {
        mkdir(&private, Some(base))?;
        fs::set_permissions(&private, fs::Permissions::from_mode(0o700))
            .context(|| format!("cannot chmod {}", private.display()))?;
    }
    mkdir(&paths.root_mount(), None)?;
    let mut overlays = Vec::with_capacity(image.layers.len());
    for (n, layer) in image.layers.iter().enumerate() {
        mkdir(&paths.lower_mount(n), None)?;
        mkdir(&paths.upper(n), Some(base))?;
        mkdir(&paths.work(n), Some(base))?;
        overlays.push(OverlayPlan {
            target: layer.target,
            lower_mount: paths.lower_mount(n),
            upper: paths.upper(n),
            work: paths.work(n),
        });
    }
    if image.has_etc {
        let etc = paths.upper(0).join("etc");
        mkdir(&etc, Some(base))?;
        for (name, content) in [
            ("hostname", format!("{id}\n")),
            (
                "hosts",
                format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{id}\n"),
            ),
        ] {
            let path = etc.join(name);
            fs::write(&path, content).context(|| format!("cannot write {}", path.display()))?;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o644))
                .context(|| format!("cannot chmod {}", path.display()))?;
            chown(&path, Some(base), Some(base))
                .context(|| format!("cannot chown {}", path.display()))?;
        }
    }
    Ok(InitPlan {
        id: id.to_string(),
        root: paths.root_mount(),
        overlays,
        agent: openrun_agent::AgentConfig {
            sandbox_id: id.to_string(),
            root: PathBuf::from("/"),
            env: spec.env.clone(),
            cwd: spec.cwd.clone(),
            lifetime: spec.lifetime,
            output_retention: openrun_agent::AgentConfig::DEFAULT_OUTPUT_RETENTION,
            exit_with_control: spec.exit_with_creator,
            process_oom_score_adj: if can_lower_oom_scores() { 0 } else { 500 },
        },
    })
}

/// Lowering an OOM score (the agent's, to -1000) needs CAP_SYS_RESOURCE, which container hosts
/// often withhold. Without it the agent's processes get a higher score instead, so the OOM
/// killer still picks them before the agent.
fn can_lower_oom_scores() -> bool {
    rustix::thread::capabilities(None).is_ok_and(|c| {
        c.effective
            .contains(rustix::thread::CapabilitySet::SYS_RESOURCE)
    })
}

fn classify_clone_error(e: io::Error) -> RuntimeError {
    // Find out whether the user namespace is the part the kernel refuses.
    match e.raw_os_error() {
        Some(libc::EINVAL | libc::EPERM | libc::ENOSPC | libc::EUSERS) => {
            match sys::clone3_process(libc::CLONE_NEWUSER as u64) {
                Ok(Forked::Child) => sys::exit_now(0),
                Ok(Forked::Parent { pidfd, .. }) => {
                    let _ = wait_for_exit(&pidfd, true);
                    RuntimeError::io("cannot create the sandbox namespaces", e)
                }
                Err(_) => RuntimeError::NoUserNamespaces(e),
            }
        }
        _ => RuntimeError::io("cannot create the sandbox namespaces", e),
    }
}

fn classify_setup_error(stage: String, errno: Option<i32>, message: String) -> RuntimeError {
    if stage.contains("overlay") && errno == Some(libc::ENODEV) {
        return RuntimeError::NoOverlayfs(io::Error::from_raw_os_error(libc::ENODEV));
    }
    RuntimeError::Setup { stage, message }
}

/// Waits until the process behind `pidfd` has exited (reaping it if it is our child).
fn wait_for_exit(pidfd: &OwnedFd, is_child: bool) -> Result<()> {
    if is_child {
        loop {
            match rustix::process::waitid(
                rustix::process::WaitId::PidFd(pidfd.as_fd()),
                rustix::process::WaitIdOptions::EXITED,
            ) {
                Ok(_) | Err(rustix::io::Errno::CHILD) => return Ok(()),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(RuntimeError::io("cannot wait for the sandbox agent", e)),
            }
        }
    }
    // Not our child: a pidfd becomes readable when the process exits.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut fds = [rustix::event::PollFd::new(
            pidfd,
            rustix::event::PollFlags::IN,
        )];
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(RuntimeError::io(
                "the sandbox agent did not exit within 10 s of SIGKILL",
                io::Error::from(io::ErrorKind::TimedOut),
            ));
        }
        let timeout = rustix::event::Timespec::try_from(left).ok();
        match rustix::event::poll(&mut fds, timeout.as_ref()) {
            Ok(n) if n > 0 => return Ok(()),
            Ok(_) | Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(RuntimeError::io("cannot wait for the sandbox agent", e)),
        }
    }
}

fn remove_tree(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(RuntimeError::io(
            format!("cannot remove {}", dir.display()),
            e,
        )),
    }
}

/// A directory without a record older than any create can take.
fn is_stale(dir: &Path) -> bool {
    fs::metadata(dir)
        .and_then(|m| m.modified())
        .map(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(60))
        .unwrap_or(true)
}

fn ensure_single_threaded() -> Result<()> {
    let threads = fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .context(|| "cannot count this process's threads".to_string())?;
    if threads > 1 {
        return Err(RuntimeError::io(
            "sandboxes must be created from a single-threaded process",
            io::Error::other(format!("{threads} threads running")),
        ));
    }
    Ok(())
}

fn absolute(path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|cwd| cwd.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    }
}
