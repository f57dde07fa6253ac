//! Creating, finding and destroying sandboxes: the host side of the namespace backend.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{chown, DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fd::{AsFd, AsRawFd, OwnedFd};
use rustix::mount::{open_tree, OpenTreeFlags};

use crate::cgroup::{Cgroup, CgroupManager, CgroupVersion, SelfJoin};
use crate::client::AgentClient;
use crate::disk_pool::{self, DiskPool};
use crate::error::{IoContext, Result, RuntimeError};
use crate::ids::{IdPool, IdRange};
use crate::image::{self, PreparedImage};
use crate::init::{self, InitPlan, MemoryLayer, OverlayPlan};
use crate::setup_channel::{self, SetupMessage};
use crate::spec::{SandboxSpec, Storage};
use crate::state::{self, MountRecord, SandboxPaths, SandboxRecord};
use crate::sys::{self, Forked};

/// The namespace backend rooted at one data dir.
#[derive(Debug)]
pub struct Runtime {
    data_dir: PathBuf,
    run_dir: PathBuf,
    dev_template: PathBuf,
    cgroups: CgroupManager,
    pool: IdPool,
    disk_pool: DiskPool,
    /// Size of the disk pool when a create first needs it (`None`: half the free space).
    disk_pool_size: Option<u64>,
    /// The persistent create helper of [`Runtime::create_with_helper`].
    zygote: crate::zygote::Helper,
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
        let dd_err = |source| RuntimeError::DataDir {
            path: data_dir.clone(),
            source,
        };
        for sub in ["", "sandboxes", "images"] {
            ensure_dir(&data_dir.join(sub), 0o711).map_err(dd_err)?;
        }
        make_traversable(&data_dir)?;
        // A directory can exist yet be unwritable (a read-only mount, for one).
        rustix::fs::access(&data_dir, rustix::fs::Access::WRITE_OK)
            .map_err(|e| dd_err(e.into()))?;
        let cgroups = CgroupManager::detect()?;
        ensure_run_root()?;
        let run_dir = state::run_dir_for(&data_dir);
        ensure_dir(&run_dir, 0o711).context(|| format!("cannot create {}", run_dir.display()))?;
        let dev_template = crate::devices::ensure_template(Path::new(state::RUN_ROOT))
            .context(|| format!("cannot build the /dev template in {}", state::RUN_ROOT))?;
        let pool_dir = Path::new(state::RUN_ROOT).join("idmap");
        let pool = IdPool::open(&pool_dir)
            .context(|| format!("cannot create the id pool at {}", pool_dir.display()))?;
        let disk_pool_size = match std::env::var(disk_pool::POOL_SIZE_ENV) {
            Ok(size) => Some(crate::limits::parse_disk(&size).map_err(|e| {
                RuntimeError::io(
                    format!("{} is not a size", disk_pool::POOL_SIZE_ENV),
                    io::Error::new(io::ErrorKind::InvalidInput, e),
                )
            })?),
            Err(_) => None,
        };
        Ok(Self {
            disk_pool: DiskPool::new(&data_dir),
            disk_pool_size,
            data_dir,
            run_dir,
            dev_template,
            cgroups,
            pool,
            zygote: Default::default(),
        })
    }

    /// The data dir.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    fn sandboxes_dir(&self) -> PathBuf {
        self.data_dir.join("sandboxes")
    }

    fn paths(&self, id: &str, storage: Storage) -> SandboxPaths {
        SandboxPaths::new(&self.run_dir, &self.sandboxes_dir(), id, storage)
    }

    /// Paths of a sandbox with these limits: a disk layer with a disk quota is in the pool.
    fn paths_with(&self, id: &str, storage: Storage, limits: &crate::Limits) -> SandboxPaths {
        let mut paths = self.paths(id, storage);
        if storage == Storage::Disk && limits.disk_bytes.is_some() {
            paths.layer = self.disk_pool.layer(id);
        }
        paths
    }

    /// Sets the size of the disk pool made by the first create with a disk quota (the
    /// default is `OPENRUN_DISK_POOL_SIZE`, else half the free space of the data dir's
    /// filesystem). An existing pool keeps its size.
    pub fn set_disk_pool_size(&mut self, bytes: Option<u64>) {
        self.disk_pool_size = bytes.or(self.disk_pool_size);
    }

    /// Mounts the disk pool that enforces disk quotas, making it first if needed (creates
    /// with a disk quota do this themselves; a server calls it at start to fail early).
    pub fn ensure_disk_pool(&self) -> Result<()> {
        self.disk_pool.ensure(self.disk_pool_size)
    }

    /// Where the disk pool is mounted (`<data-dir>/disk-pool`).
    pub fn disk_pool_dir(&self) -> &Path {
        self.disk_pool.dir()
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
        self.create_with_first_request(spec, &[])
    }

    /// Like [`Runtime::create`], and writes `first` (encoded request frames, e.g. the one
    /// exec of `openrun run`) to the control stream while the init is still setting up, so
    /// the agent finds it queued when it starts serving instead of waiting for the creator
    /// to hear `Ready` and send it. Nothing else changes: the bytes are what the creator
    /// would write on the same stream a moment later, and they die with the stream when the
    /// setup fails.
    pub fn create_with_first_request(&self, spec: &SandboxSpec, first: &[u8]) -> Result<Sandbox> {
        self.create_inner(spec, first, None)
            .map(|(sandbox, _)| sandbox)
    }

    /// Like [`Runtime::create_with_first_request`], and starts the process that tears the
    /// sandbox down once this process has exited (it kills the agent then: the sandbox ends
    /// with its creator) or 1 s after the agent has exited on its own, so that the caller's
    /// exit waits for neither the agent's end nor the teardown: `openrun run`. It starts while the init sets the sandbox
    /// up, when this process would only wait, rather than while the agent starts the first
    /// command, whose start it would slow down on a small machine.
    ///
    /// That process shares this one's memory (see `cleaner.rs`) and starts its teardown
    /// once this process has exited: end it with [`crate::exit_process`], single-threaded, and
    /// the teardown runs in that memory; end it any other way (killed, for one) and it runs
    /// `remover` (the `openrun` binary) as `REMOVER --data-dir DIR __teardown ID` instead.
    ///
    /// The second value is whether that process exists: `false` when nothing was started (no
    /// agent pidfd, a failed clone); then [`Runtime::destroy_in_background`] is the way. The
    /// process keeps no descriptor but the agent's and this process's pidfds and its commit
    /// pipe (never the control stream, whose close ends such a sandbox), leaves the caller's
    /// session and stdio, and tears down only a sandbox whose create succeeded: a failed
    /// create is cleaned up here, as always.
    pub fn create_with_cleaner(
        &self,
        spec: &SandboxSpec,
        first: &[u8],
        remover: &Path,
    ) -> Result<(Sandbox, bool)> {
        self.create_inner(spec, first, Some(remover))
    }

    fn create_inner(
        &self,
        spec: &SandboxSpec,
        first: &[u8],
        remover: Option<&Path>,
    ) -> Result<(Sandbox, bool)> {
        let started = Instant::now();
        let phase = |name: &str| {
            tracing::debug!(
                phase = name,
                us = started.elapsed().as_micros() as u64,
                "create"
            )
        };
        ensure_single_threaded()?;
        spec.limits
            .validate()
            .map_err(RuntimeError::InvalidLimits)?;
        // An open-files limit above the creator's own hard limit cannot be set (raising a hard
        // limit needs CAP_SYS_RESOURCE of the host): the caller's value, refused before
        // anything is made.
        if let Some(asked) = spec.limits.open_files {
            let creator_max = rustix::process::getrlimit(rustix::process::Resource::Nofile)
                .maximum
                .unwrap_or(u64::MAX);
            if asked > creator_max {
                return Err(RuntimeError::InvalidLimits(
                    crate::limits::LimitParseError::OpenFiles {
                        value: format!("{asked} (this host allows at most {creator_max})"),
                        reason: "above the hard open-files limit of the process creating                                  sandboxes, which it cannot raise",
                    },
                ));
            }
        }
        let image = image::prepare(&spec.image, &self.data_dir.join("images"))?;
        let id = match &spec.id {
            Some(id) if !state::valid_id(id) => return Err(RuntimeError::InvalidId(id.clone())),
            // Checked before anything is made: the cleanup of a failed create removes every
            // file and claim of its id, which must never be another sandbox's.
            Some(id) if self.id_in_use(id) => {
                return Err(RuntimeError::io(
                    format!("cannot create sandbox {id}"),
                    io::Error::from(io::ErrorKind::AlreadyExists),
                ))
            }
            Some(id) => id.clone(),
            None => state::new_id(),
        };
        let ids = self
            .pool
            .claim(&id)
            .context(|| "cannot claim a host id range".to_string())?;
        let pooled = spec.storage == Storage::Disk && spec.limits.disk_bytes.is_some();
        if pooled {
            self.disk_pool.ensure(self.disk_pool_size)?;
        }
        let paths = self.paths_with(&id, spec.storage, &spec.limits);
        let mut pending = PendingSandbox {
            runtime: self,
            id: id.clone(),
            ids,
            paths: paths.clone(),
            cgroup: None,
            child: None,
            pooled,
        };
        phase("image");
        if let (true, Some(bytes)) = (pooled, spec.limits.disk_bytes) {
            self.disk_pool.create_layer(&id, bytes, ids.host_base())?;
        }
        let plan = prepare_host_side(&id, ids, &paths, &image, spec, pooled)?;
        phase("host dirs");
        let plan_protects_agent = plan.agent.process_oom_score_adj == 0;
        // On v2 the init is made inside its cgroup, which must exist first. On v1 the cgroup
        // is made after the clone, while the init makes its namespaces, and the init joins it
        // as soon as `Go` hands it the tasks files.
        let into_v2_cgroup = if self.cgroups.version() == CgroupVersion::V2 {
            let cgroup = pending
                .cgroup
                .insert(self.cgroups.create(&id, &spec.limits)?);
            match cgroup.self_join()? {
                SelfJoin::V2 { dir } => Some(dir),
                SelfJoin::V1 { .. } => None,
            }
        } else {
            None
        };
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

        phase("before clone3");
        let forked = sys::clone3_process(
            sys::CLONE_NAMESPACES,
            into_v2_cgroup.as_ref().map(|dir| dir.as_fd()),
        )
        .map_err(classify_clone_error)?;
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
        drop(into_v2_cgroup);
        phase("clone");
        pending.child = Some((pid, pidfd));
        let Some((_, pidfd)) = pending.child.as_ref() else {
            unreachable!("set just above")
        };
        let pidfd = pidfd.as_fd();
        // v1: the cgroup, and the tasks files through which the init joins it.
        let tasks = if pending.cgroup.is_some() {
            Vec::new()
        } else {
            let cgroup = pending
                .cgroup
                .insert(self.cgroups.create(&id, &spec.limits)?);
            match cgroup.self_join()? {
                SelfJoin::V1 { tasks } => tasks,
                SelfJoin::V2 { .. } => Vec::new(),
            }
        };
        phase("cgroup");

        // The child waits on the setup channel while we give it ids, a cgroup and its layers.
        let map = ids.map_line();
        fs::write(format!("/proc/{pid}/uid_map"), &map)
            .context(|| "cannot write the sandbox uid map".to_string())?;
        fs::write(format!("/proc/{pid}/gid_map"), &map)
            .context(|| "cannot write the sandbox gid map".to_string())?;
        // The agent must survive the OOM killer so it can report what it killed. Lowering a
        // score needs CAP_SYS_RESOURCE, which container hosts often withhold; then the agent's
        // processes get a higher score instead (see `process_oom_score_adj`).
        if plan_protects_agent {
            fs::write(format!("/proc/{pid}/oom_score_adj"), "-1000")
                .context(|| "cannot protect the agent from the OOM killer".to_string())?;
        }
        // Open files (soft = hard), set from here: raising a hard limit above the creator's
        // needs CAP_SYS_RESOURCE of the host, which the init never has. The agent and
        // everything it starts inherit it. The default never exceeds the creator's own hard
        // limit (hosts that withhold CAP_SYS_RESOURCE from root could not raise it).
        let creator_max = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .maximum
            .unwrap_or(u64::MAX);
        let open_files = spec
            .limits
            .open_files
            .unwrap_or(crate::limits::DEFAULT_OPEN_FILES.min(creator_max));
        rustix::process::prlimit(
            rustix::process::Pid::from_raw(pid),
            rustix::process::Resource::Nofile,
            rustix::process::Rlimit {
                current: Some(open_files),
                maximum: Some(open_files),
            },
        )
        .map_err(|e| {
            RuntimeError::io(
                format!(
                    "cannot set the open files limit to {open_files} (this process may allow at \
                     most {creator_max}; more needs CAP_SYS_RESOURCE)"
                ),
                e,
            )
        })?;
        phase("id maps");
        let userns = rustix::fs::open(
            format!("/proc/{pid}/ns/user"),
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .context(|| "cannot open the sandbox user namespace".to_string())?;
        let mut lowers = Vec::new();
        for lower in image.layers.iter().flat_map(|l| &l.lowers) {
            let tree = open_tree(
                lower.dir.as_fd(),
                "",
                OpenTreeFlags::OPEN_TREE_CLONE
                    | OpenTreeFlags::OPEN_TREE_CLOEXEC
                    | OpenTreeFlags::AT_RECURSIVE
                    | OpenTreeFlags::AT_EMPTY_PATH,
            )
            .context(|| format!("cannot open image layer {}", lower.path.display()))?;
            sys::idmap_detached_mount(tree.as_fd(), userns.as_fd(), sys::DetachedMount::Layer)
                .map_err(|source| RuntimeError::NoIdmappedMounts {
                    path: lower.path.clone(),
                    source,
                })?;
            lowers.push(tree);
        }
        // Last: the /dev template, idmapped so its nodes belong to the sandbox's root.
        let dev = open_tree(
            rustix::fs::CWD,
            &self.dev_template,
            OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC,
        )
        .context(|| format!("cannot open {}", self.dev_template.display()))?;
        sys::idmap_detached_mount(dev.as_fd(), userns.as_fd(), sys::DetachedMount::Devices)
            .context(|| "cannot prepare the sandbox /dev".to_string())?;
        lowers.push(dev);
        let borrowed: Vec<_> = tasks
            .iter()
            .map(|f| f.as_fd())
            .chain(lowers.iter().map(|f| f.as_fd()))
            .collect();
        let go = SetupMessage::Go {
            tasks_files: tasks.len(),
        };
        setup_channel::send(setup_host.as_fd(), &go, &borrowed)
            .context(|| "cannot start the sandbox init".to_string())?;
        drop(borrowed);
        drop(lowers);
        drop(tasks);
        drop(userns);
        phase("layers sent");
        if !first.is_empty() {
            // A socket buffer holds far more than a request: this does not block.
            (&control_host)
                .write_all(first)
                .context(|| "cannot send the first request to the sandbox agent".to_string())?;
        }
        // Dropped (closed) without a byte when the create fails from here on: the cleaner
        // then leaves everything to `pending`.
        let commit = remover.and_then(|remover| {
            crate::cleaner::start(self, &id, &paths, pending.cgroup.as_ref(), pidfd, remover)
        });
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
        phase("ready");
        let pid_start_ticks = state::process_start_ticks(pid)
            .context(|| "the sandbox agent died while starting".to_string())?;
        let now = state::now_ms();
        let record = SandboxRecord {
            id: id.clone(),
            pid,
            pid_start_ticks,
            ids,
            image: spec.image.describe(),
            lowers: image
                .layers
                .iter()
                .flat_map(|l| &l.lowers)
                .map(|l| l.path.clone())
                .collect(),
            source: Some(spec.image.clone()),
            mounts: image
                .layers
                .iter()
                .map(|l| MountRecord {
                    target: PathBuf::from(l.target),
                    lowers: l.lowers.iter().map(|l| l.path.clone()).collect(),
                })
                .collect(),
            user: spec.user.clone(),
            limits: spec.limits.clone(),
            storage: spec.storage,
            created_at_ms: now,
            expires_at_ms: spec.lifetime.map(|d| now + d.as_millis() as u64),
        };
        record
            .save(&paths)
            .context(|| format!("cannot write {}", paths.state().display()))?;
        let _ = pidfd;
        // The sandbox is made: from now on the cleaner tears it down.
        let cleaner = match commit {
            Some(commit) => rustix::io::write(&commit, &[1]).is_ok_and(|n| n == 1),
            None => false,
        };
        let (cgroup, child) = pending.disarm();
        let sandbox = Sandbox {
            record,
            paths,
            cgroup,
            pidfd: child.map(|(_, fd)| fd),
            child: true,
            control: Some(control_host),
        };
        Ok((sandbox, cleaner))
    }

    /// A copy of this runtime for [`crate::cleaner`], made without touching the host (the
    /// copy never starts a create helper).
    pub(crate) fn copy_for_cleaner(&self) -> Runtime {
        Runtime {
            data_dir: self.data_dir.clone(),
            run_dir: self.run_dir.clone(),
            dev_template: self.dev_template.clone(),
            cgroups: self.cgroups.clone(),
            pool: self.pool.clone(),
            disk_pool: self.disk_pool.clone(),
            disk_pool_size: self.disk_pool_size,
            zygote: Default::default(),
        }
    }

    /// The cleaner's teardown of sandbox `id` (see [`Runtime::create_with_cleaner`]), whose
    /// creator committed it and has exited, and whose agent is behind `agent` (not our
    /// child). Returns the cleaner's exit code.
    pub(crate) fn destroy_created(
        &self,
        id: &str,
        paths: &SandboxPaths,
        cgroup: Option<&Cgroup>,
        agent: OwnedFd,
    ) -> i32 {
        let record = match SandboxRecord::load(paths) {
            Ok(record) => record,
            Err(e) => {
                tracing::warn!(error = %e, id, "background teardown: no record");
                return 1;
            }
        };
        let sandbox = Sandbox {
            record,
            paths: paths.clone(),
            cgroup: cgroup.cloned(),
            pidfd: Some(agent),
            // The agent was our creator's child, not ours.
            child: false,
            control: None,
        };
        match self.destroy(sandbox) {
            Ok(()) => 0,
            Err(e) => {
                tracing::warn!(error = %e, id, "background teardown failed");
                1
            }
        }
    }

    /// Creates a sandbox from a multi-threaded process (a server) through `helper` (the
    /// `openrun` binary): a persistent single-threaded `openrun --data-dir DIR __create --serve`
    /// (see [`crate::zygote`]) forks a worker per create that creates the sandbox and exits,
    /// leaving it running (else a one-shot `openrun --data-dir DIR __create`). The spec goes in
    /// as JSON; the record or a typed error comes back. Returns once the worker has exited, so
    /// the agent is then a child of the caller if it is a subreaper.
    pub fn create_with_helper(&self, spec: &SandboxSpec, helper: &Path) -> Result<Sandbox> {
        let input =
            serde_json::to_vec(&spec).context(|| "cannot encode the sandbox spec".to_string())?;
        let output = self
            .zygote
            .run(helper, &self.data_dir, self.disk_pool_size, &input)?;
        let reply: HelperReply = serde_json::from_slice(&output.bytes).map_err(|e| {
            RuntimeError::io(
                format!("the sandbox helper answered nonsense ({})", output.status),
                io::Error::new(io::ErrorKind::InvalidData, e),
            )
        })?;
        match reply {
            HelperReply::Created(record) => self.open_sandbox_record(*record),
            HelperReply::Failed {
                message,
                user_error,
            } => Err(RuntimeError::Helper {
                message,
                user_error,
            }),
        }
    }

    /// The helper side of [`Runtime::create_with_helper`]: reads a spec from `input`, creates
    /// the sandbox, and writes the reply to `output`. Returns whether it succeeded.
    pub fn serve_helper_request(
        data_dir: &Path,
        input: &mut impl io::Read,
        output: &mut impl io::Write,
    ) -> bool {
        let result = (|| {
            let mut bytes = Vec::new();
            input
                .read_to_end(&mut bytes)
                .context(|| "cannot read the sandbox spec".to_string())?;
            let spec: SandboxSpec = serde_json::from_slice(&bytes).map_err(|e| {
                RuntimeError::io(
                    "invalid sandbox spec",
                    io::Error::new(io::ErrorKind::InvalidData, e),
                )
            })?;
            let runtime = Runtime::open(data_dir)?;
            let sandbox = runtime.create(&spec)?;
            Ok::<_, RuntimeError>(sandbox.record().clone())
        })();
        let (reply, ok) = match result {
            Ok(record) => (HelperReply::Created(Box::new(record)), true),
            Err(e) => (
                HelperReply::Failed {
                    message: e.to_string(),
                    user_error: e.is_user_error(),
                },
                false,
            ),
        };
        let written = serde_json::to_writer(&mut *output, &reply).is_ok() && output.flush().is_ok();
        ok && written
    }

    /// Lists live sandboxes, cleaning up after any whose agent has died.
    pub fn list(&self) -> Result<Vec<SandboxRecord>> {
        let mut live = Vec::new();
        for id in list_ids(&self.run_dir)? {
            let paths = self.paths(&id, Storage::Disk);
            match SandboxRecord::load(&paths) {
                // The agent enforces the lifetime itself; this is the backstop for an agent
                // that cannot (stopped, stuck): past its deadline plus a grace period, it dies.
                Ok(record) if record.is_alive() && record.is_overdue(state::now_ms()) => {
                    tracing::warn!(id = record.id, "sandbox outlived its lifetime: killing it");
                    if let Ok(sandbox) = self.open_sandbox_record(record) {
                        let _ = self.destroy(sandbox);
                    }
                }
                Ok(record) if record.is_alive() => live.push(record),
                Ok(record) => self.cleanup(&id, Some(record.ids)),
                // No record: a creator died mid-way, or is creating right now. Only clean it
                // once it is old enough that no create can still be running.
                Err(_) if is_stale(&paths.run) => self.cleanup(&id, None),
                Err(_) => {}
            }
        }
        // Writable layers without a runtime dir belong to sandboxes that died with the host
        // (the runtime dir is on a tmpfs): reclaim them.
        for id in list_ids(&self.sandboxes_dir())? {
            let paths = self.paths(&id, Storage::Disk);
            if !paths.run.exists() && is_stale(&paths.layer) {
                self.cleanup(&id, None);
            }
        }
        for id in self.disk_pool.layer_ids() {
            let paths = self.paths(&id, Storage::Disk);
            if !paths.run.exists() && is_stale(&self.disk_pool.layer(&id)) {
                self.cleanup(&id, None);
            }
        }
        live.sort_by_key(|r| r.created_at_ms);
        Ok(live)
    }

    /// Finds a live sandbox by id (or unique id prefix) to talk to or destroy.
    pub fn open_sandbox(&self, id: &str) -> Result<Sandbox> {
        let record = self.find(id)?;
        self.open_sandbox_record(record)
    }

    fn open_sandbox_record(&self, record: SandboxRecord) -> Result<Sandbox> {
        let id = record.id.clone();
        let paths = self.paths_with(&record.id, record.storage, &record.limits);
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

    /// Opens a live sandbox by its exact id, reading only its own record: no prefix matching
    /// and no scan of (or cleanup after) the other sandboxes. For API callers that keep ids.
    pub fn open_sandbox_exact(&self, id: &str) -> Result<Sandbox> {
        if !state::valid_id(id) {
            return Err(RuntimeError::InvalidId(id.to_string()));
        }
        match SandboxRecord::load(&self.paths(id, Storage::Disk)) {
            Ok(record) if record.is_alive() => self.open_sandbox_record(record),
            _ => Err(RuntimeError::NoSuchSandbox(id.to_string())),
        }
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

    /// Kills every process of the sandbox now and leaves the rest of [`Runtime::destroy`]
    /// (waiting for the kernel to tear the namespaces down, removing the cgroup, files and id
    /// claim) to a background process, so a caller that only needs the sandbox gone can
    /// return at once (`openrun run`). When this process is multi-threaded (it cannot fork
    /// safely) the teardown runs here instead.
    pub fn destroy_in_background(&self, mut sandbox: Sandbox) -> Result<()> {
        sandbox.control = None;
        if let Some(pidfd) = &sandbox.pidfd {
            match rustix::process::pidfd_send_signal(pidfd, rustix::process::Signal::KILL) {
                Ok(()) | Err(rustix::io::Errno::SRCH) => {}
                Err(e) => return Err(RuntimeError::io("cannot kill the sandbox agent", e)),
            }
        }
        if ensure_single_threaded().is_err() {
            return self.destroy(sandbox);
        }
        match sys::clone3_process(0, None) {
            Ok(Forked::Child) => {
                // The cleaner: out of the caller's session and off its stdio, so neither a
                // terminal's Ctrl-C nor a reader waiting for EOF on our output depends on it.
                let _ = rustix::process::setsid();
                if let Ok(null) = fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/null")
                {
                    for fd in 0..=2 {
                        let _ = sys::dup2_raw(null.as_raw_fd(), fd);
                    }
                }
                // The agent is our parent's child, not ours: wait on its pidfd instead.
                sandbox.child = false;
                let code = match self.destroy(sandbox) {
                    Ok(()) => 0,
                    Err(e) => {
                        tracing::warn!(error = %e, "background teardown failed");
                        1
                    }
                };
                sys::exit_now(code);
            }
            Ok(Forked::Parent { .. }) => {
                // The cleaner owns the teardown; this process only closes its own handles
                // (a `Sandbox` has no teardown of its own on drop).
                drop(sandbox);
                Ok(())
            }
            Err(_) => self.destroy(sandbox),
        }
    }

    /// Destroys a sandbox: kills every process, removes its cgroup, writable layer and
    /// runtime files, and frees its id range.
    pub fn destroy(&self, mut sandbox: Sandbox) -> Result<()> {
        let started = Instant::now();
        let phase = |name: &str| {
            tracing::debug!(
                phase = name,
                us = started.elapsed().as_micros() as u64,
                "destroy"
            )
        };
        sandbox.control = None;
        if let Some(pidfd) = sandbox.pidfd.take() {
            // Killing pid 1 of a pid namespace kills every process in it.
            match rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL) {
                Ok(()) | Err(rustix::io::Errno::SRCH) => {}
                Err(e) => return Err(RuntimeError::io("cannot kill the sandbox agent", e)),
            }
            // A paused (frozen) sandbox's processes act on SIGKILL only once thawed: asked
            // only when the agent is not gone within a moment (a running one dies at once).
            if !exits_within(&pidfd, FROZEN_CHECK_AFTER) {
                if let Some(cg) = &sandbox.cgroup {
                    if cg.is_frozen()? {
                        cg.thaw()?;
                    }
                }
            }
            wait_for_exit(&pidfd, sandbox.child)?;
        }
        phase("killed");
        // pasta runs in the sandbox's cgroup: stopped (killed and reaped) before the cgroup's
        // kill, which would leave it a zombie of this process.
        crate::network::stop(&sandbox.paths.run, sandbox.record.ids.host_base()).map_err(
            |reason| RuntimeError::Network {
                id: sandbox.record.id.clone(),
                reason,
            },
        )?;
        if let Some(cg) = sandbox.cgroup.take() {
            // The agent was pid 1 of the sandbox's pid namespace: its exit took every process
            // of the namespace with it, so the cgroup is normally empty and goes in one rmdir
            // per directory (which the kernel refuses while a task is left: then the kill).
            if !cg.remove_if_empty() {
                cg.kill_all()?;
                cg.remove()?;
            }
        }
        phase("cgroup removed");
        if sandbox.paths.layer == self.disk_pool.layer(&sandbox.record.id) {
            self.disk_pool.remove_layer(&sandbox.record.id)?;
        } else if !sandbox.paths.layer.starts_with(&sandbox.paths.run) {
            remove_tree(&sandbox.paths.layer)?;
        }
        remove_run_dir(&sandbox.paths)?;
        phase("files removed");
        self.pool
            .release(sandbox.record.ids, &sandbox.record.id)
            .context(|| "cannot release the sandbox id range".to_string())?;
        Ok(())
    }

    /// Whether anything of sandbox `id` exists: its runtime dir, writable layer or cgroup.
    fn id_in_use(&self, id: &str) -> bool {
        let paths = self.paths(id, Storage::Disk);
        paths.run.exists()
            || paths.disk_layer.exists()
            || self.disk_pool.layer(id).exists()
            || self.cgroups.open(id).is_some()
    }

    /// Removes whatever exists of sandbox `id`, for a caller that started creating it and
    /// does not want it (a server that stopped mid-create). A create still in progress (its
    /// runtime dir exists, its record not yet) is given up to `settle` to finish, then the
    /// sandbox is destroyed, or its remains cleaned up. Returns whether anything existed.
    pub fn discard(&self, id: &str, settle: Duration) -> Result<bool> {
        if !state::valid_id(id) {
            return Err(RuntimeError::InvalidId(id.to_string()));
        }
        let paths = self.paths(id, Storage::Disk);
        let deadline = Instant::now() + settle;
        while paths.run.exists() && !paths.state().exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let existed = self.id_in_use(id);
        match self.open_sandbox_exact(id) {
            Ok(sandbox) => self.destroy(sandbox)?,
            Err(RuntimeError::NoSuchSandbox(_)) => {
                let ids = SandboxRecord::load(&paths).ok().map(|r| r.ids);
                self.cleanup(id, ids);
            }
            Err(e) => return Err(e),
        }
        Ok(existed)
    }

    /// Destroys sandbox `id` by its exact id: a live one is killed and removed as
    /// [`Runtime::destroy`] does; one whose agent died on its own (its lifetime ran out, it
    /// crashed) has what it left on the host removed: cgroup, runtime files, writable layer
    /// and id claim. `Ok(false)` when it has no record (never made, already removed, or
    /// still being made: a create in progress is not touched).
    pub fn destroy_exact(&self, id: &str) -> Result<bool> {
        if !state::valid_id(id) {
            return Err(RuntimeError::InvalidId(id.to_string()));
        }
        let Ok(record) = SandboxRecord::load(&self.paths(id, Storage::Disk)) else {
            return Ok(false);
        };
        let ids = record.ids;
        match self.open_sandbox_record(record) {
            Ok(sandbox) => self.destroy(sandbox)?,
            Err(RuntimeError::NoSuchSandbox(_)) => self.cleanup(id, Some(ids)),
            Err(e) => return Err(e),
        }
        Ok(true)
    }

    /// Removes what sandbox `id` left on the host once its agent is gone (see
    /// [`Runtime::destroy_exact`]), as [`Runtime::list`] does for every such sandbox; a live
    /// one, or one without a record, is not touched. Returns whether anything was removed.
    pub fn remove_if_dead(&self, id: &str) -> Result<bool> {
        if !state::valid_id(id) {
            return Err(RuntimeError::InvalidId(id.to_string()));
        }
        match SandboxRecord::load(&self.paths(id, Storage::Disk)) {
            Ok(record) if !record.is_alive() => {
                self.cleanup(id, Some(record.ids));
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Changes the deadline kept in the sandbox's record (milliseconds since the Unix epoch,
    /// `None` for none), which [`Runtime::list`] enforces as a backstop. The agent's own timer
    /// is the caller's to change (`Request::SetLifetime`).
    pub fn set_expiry(&self, sandbox: &mut Sandbox, expires_at_ms: Option<u64>) -> Result<()> {
        let mut record = sandbox.record.clone();
        record.expires_at_ms = expires_at_ms;
        record
            .save(&sandbox.paths)
            .context(|| format!("cannot write {}", sandbox.paths.state().display()))?;
        sandbox.record = record;
        Ok(())
    }

    /// Best-effort cleanup of a sandbox whose agent is gone.
    fn cleanup(&self, id: &str, ids: Option<IdRange>) {
        let paths = self.paths(id, Storage::Disk);
        // pasta runs in the sandbox's cgroup: stopped (and reaped) before the cgroup's kill.
        if let Some(ids) = ids {
            let _ = crate::network::stop(&paths.run, ids.host_base());
        }
        if let Some(cg) = self.cgroups.open(id) {
            let _ = cg.kill_all();
            let _ = cg.remove();
        }
        let _ = remove_tree(&paths.disk_layer);
        if self.disk_pool.is_mounted() {
            let _ = self.disk_pool.remove_layer(id);
        }
        let _ = remove_tree(&paths.run);
        match ids {
            Some(ids) => {
                let _ = self.pool.release(ids, id);
            }
            // No record to say which range it held: find its claim by owner.
            None => {
                let _ = self.pool.release_owner(id);
            }
        }
    }
}

impl Sandbox {
    /// Sends SIGKILL to the agent (pid 1 of the sandbox's pid namespace: every process goes
    /// with it) and returns; the teardown is the cleaner's ([`Runtime::create_with_cleaner`]).
    pub fn kill(&self) -> Result<()> {
        if let Some(pidfd) = &self.pidfd {
            match rustix::process::pidfd_send_signal(pidfd, rustix::process::Signal::KILL) {
                Ok(()) | Err(rustix::io::Errno::SRCH) => {}
                Err(e) => return Err(RuntimeError::io("cannot kill the sandbox agent", e)),
            }
        }
        Ok(())
    }

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

    /// Host directory of the writable layer of the root (`None` for a memory layer, which
    /// exists only inside the sandbox's mount namespace).
    pub fn upper_dir(&self) -> Option<PathBuf> {
        (self.record.storage == Storage::Disk).then(|| self.paths.upper(0))
    }

    /// The sandbox's overlays as the host sees them, root first: each one's target, image
    /// lowers and writable upper directory (`None` for a memory layer, which exists only
    /// inside the sandbox's mount namespace).
    pub fn overlays(&self) -> Option<Vec<SandboxOverlay>> {
        (self.record.storage == Storage::Disk).then(|| {
            self.record
                .mounts()
                .into_iter()
                .enumerate()
                .map(|(n, m)| SandboxOverlay {
                    target: m.target,
                    lowers: m.lowers,
                    upper: self.paths.upper(n),
                })
                .collect()
        })
    }

    /// Connects the sandbox to the host's network (`open`: user-mode networking by pasta, see
    /// the `network` module) or back to loopback only. Idempotent; blocking (starts or kills
    /// a process). Connections made while open die when it is closed.
    pub fn set_open_network(&self, open: bool) -> Result<()> {
        let base = self.record.ids.host_base();
        let result = if open {
            if !self.record.is_alive() {
                return Err(RuntimeError::NoSuchSandbox(self.record.id.clone()));
            }
            let pidfd = self.pidfd.as_ref().map(|fd| fd.as_fd());
            let cgroup = match &self.cgroup {
                Some(cg) => cg.procs_files()?,
                None => Vec::new(),
            };
            crate::network::start(&self.paths.run, self.record.pid, pidfd, base, &cgroup)
        } else {
            crate::network::stop(&self.paths.run, base)
        };
        result.map_err(|reason| RuntimeError::Network {
            id: self.record.id.clone(),
            reason,
        })
    }

    /// Whether the sandbox's network is `open` (its pasta runs).
    pub fn is_network_open(&self) -> bool {
        crate::network::is_open(&self.paths.run, self.record.ids.host_base())
    }

    /// Runtime dir (socket, record) on the host.
    pub fn run_dir(&self) -> &Path {
        &self.paths.run
    }

    /// Takes the creator's already-connected control stream (only once, only for the creator).
    pub fn take_control(&mut self) -> Option<UnixStream> {
        self.control.take()
    }

    /// Connects a new client to the agent.
    pub async fn connect(&self) -> Result<AgentClient> {
        Ok(AgentClient::connect(&self.paths.socket()).await?)
    }

    /// Pauses the sandbox: freezes every process in its cgroup, the agent included, and
    /// returns once the kernel reports them frozen. Pausing a paused sandbox is a no-op. While
    /// paused the agent cannot answer: do not connect to it until [`Sandbox::resume`].
    pub fn pause(&self) -> Result<()> {
        Ok(self.frozen_cgroup()?.freeze()?)
    }

    /// Resumes a paused sandbox (thaws its cgroup); resuming a running one is a no-op.
    pub fn resume(&self) -> Result<()> {
        Ok(self.frozen_cgroup()?.thaw()?)
    }

    /// Whether the sandbox is paused (its cgroup is frozen).
    pub fn is_paused(&self) -> Result<bool> {
        match &self.cgroup {
            Some(cg) => Ok(cg.is_frozen()?),
            None => Ok(false),
        }
    }

    fn frozen_cgroup(&self) -> Result<&Cgroup> {
        self.cgroup.as_ref().ok_or_else(|| {
            RuntimeError::io(
                format!("sandbox {} has no cgroup to freeze", self.record.id),
                io::Error::from(io::ErrorKind::NotFound),
            )
        })
    }

    /// Number of processes the memory limit has killed so far.
    pub fn oom_kills(&self) -> u64 {
        self.cgroup
            .as_ref()
            .and_then(|c| c.oom_kills().ok())
            .unwrap_or(0)
    }
}

/// One overlay of a live sandbox (see [`Sandbox::overlays`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxOverlay {
    /// Where it is mounted inside the sandbox (`/`, `/usr`).
    pub target: PathBuf,
    /// Its image lowers on the host, bottom to top.
    pub lowers: Vec<PathBuf>,
    /// Its writable layer on the host (written by the sandbox: never follow a link in it).
    pub upper: PathBuf,
}

/// What the sandbox helper answers.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
enum HelperReply {
    Created(Box<SandboxRecord>),
    Failed { message: String, user_error: bool },
}

/// What exists of a sandbox that is being created, removed again if creation fails.
struct PendingSandbox<'a> {
    runtime: &'a Runtime,
    id: String,
    ids: IdRange,
    paths: SandboxPaths,
    cgroup: Option<Cgroup>,
    child: Option<(i32, OwnedFd)>,
    /// The writable layer is a subvolume of the disk pool.
    pooled: bool,
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
        if self.pooled {
            let _ = self.runtime.disk_pool.remove_layer(&self.id);
        } else {
            let _ = remove_tree(&self.paths.layer);
        }
        let _ = crate::network::stop(&self.paths.run, self.ids.host_base());
        let _ = remove_tree(&self.paths.run);
        let _ = self.runtime.pool.release(self.ids, &self.id);
    }
}

/// Creates the sandbox's directories and its `/etc/hostname` and `/etc/hosts`, and computes
/// the plan the init follows.
///
/// The init runs as the sandbox's ids, not host root, and opens these by path: the runtime dir
/// is 0711 (searchable), the layer dir belongs to the sandbox's root with mode 0700, which also
/// keeps other host users out of the writable layer.
fn prepare_host_side(
    id: &str,
    ids: IdRange,
    paths: &SandboxPaths,
    image: &PreparedImage,
    spec: &SandboxSpec,
    pooled: bool,
) -> Result<InitPlan> {
    let base = ids.host_base();
    let mkdir = |path: &Path, mode: u32, owner: Option<u32>| -> Result<()> {
        fs::DirBuilder::new()
            .mode(mode)
            .create(path)
            .context(|| format!("cannot create {}", path.display()))?;
        if let Some(owner) = owner {
            chown(path, Some(owner), Some(owner))
                .context(|| format!("cannot chown {}", path.display()))?;
        }
        Ok(())
    };
    mkdir(&paths.run, 0o711, None)?;
    mkdir(&paths.run.join("mnt"), 0o755, None)?;
    mkdir(&paths.root_mount(), 0o755, None)?;
    // A disk layer is made here, owned by the sandbox's root; a memory layer is a tmpfs the
    // init mounts in its own mount namespace (sized and charged per sandbox, invisible to the
    // host and to every other sandbox), so only its mount point exists here.
    // A disk layer with a quota is a subvolume of the disk pool, made (owned and limited)
    // by the caller.
    let memory_layer = match spec.storage {
        Storage::Disk if pooled => None,
        Storage::Disk => {
            mkdir(&paths.layer, 0o700, Some(base))?;
            None
        }
        Storage::Memory => {
            mkdir(&paths.layer, 0o700, None)?;
            Some(MemoryLayer {
                size_bytes: memory_or_disk_cap(spec),
            })
        }
    };
    let total: usize = image.layers.iter().map(|l| l.lowers.len()).sum();
    if total > crate::image::MAX_LOWERS {
        return Err(RuntimeError::TooManyLayers {
            name: spec.image.describe(),
            count: total,
            max: crate::image::MAX_LOWERS,
        });
    }
    let mut overlays = Vec::with_capacity(image.layers.len());
    // Lower mount points are numbered across every overlay, in the order the lowers are sent.
    let mut next_lower = 0;
    for (n, layer) in image.layers.iter().enumerate() {
        let mut lower_mounts = Vec::with_capacity(layer.lowers.len());
        for _ in &layer.lowers {
            mkdir(&paths.lower_mount(next_lower), 0o755, None)?;
            lower_mounts.push(paths.lower_mount(next_lower));
            next_lower += 1;
        }
        if memory_layer.is_none() {
            mkdir(&paths.upper(n), 0o755, Some(base))?;
            mkdir(&paths.work(n), 0o755, Some(base))?;
        }
        overlays.push(OverlayPlan {
            target: layer.target,
            lower_mounts,
            upper: paths.upper(n),
            work: paths.work(n),
        });
    }
    Ok(InitPlan {
        id: id.to_string(),
        root: paths.root_mount(),
        overlays,
        layer: paths.layer.clone(),
        memory_layer,
        tmp_size_bytes: memory_or_disk_cap(spec),
        agent: openrun_agent::AgentConfig {
            sandbox_id: id.to_string(),
            root: PathBuf::from("/"),
            env: spec.env.clone(),
            cwd: spec.cwd.clone(),
            user: spec.user.clone(),
            lifetime: spec.lifetime,
            output_retention: openrun_agent::AgentConfig::DEFAULT_OUTPUT_RETENTION,
            exit_with_control: spec.exit_with_creator,
            process_oom_score_adj: if can_lower_oom_scores() { 0 } else { 500 },
            own_oom_score_adj: None,
        },
    })
}

/// Size cap of a sandbox's tmpfs (a memory layer, `/tmp`): a disk quota caps it (else the
/// tmpfs would be a way around it), and so does the memory limit (its pages are charged to it
/// anyway). `None` when neither is set: tmpfs's own default, half the host's RAM.
fn memory_or_disk_cap(spec: &SandboxSpec) -> Option<u64> {
    match (spec.limits.memory_bytes, spec.limits.disk_bytes) {
        (Some(m), Some(d)) => Some(m.min(d)),
        (m, d) => m.or(d),
    }
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
            match sys::clone3_process(libc::CLONE_NEWUSER as u64, None) {
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

/// How long [`Runtime::destroy`] waits for a killed agent before it checks whether the sandbox
/// is frozen (and so cannot act on the kill until thawed).
const FROZEN_CHECK_AFTER: Duration = Duration::from_millis(20);

/// Whether the process behind `pidfd` exits within `timeout` (it is not reaped).
fn exits_within(pidfd: &OwnedFd, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let mut fds = [rustix::event::PollFd::new(
            pidfd,
            rustix::event::PollFlags::IN,
        )];
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(left) = rustix::event::Timespec::try_from(left) else {
            return false;
        };
        match rustix::event::poll(&mut fds, Some(&left)) {
            Ok(n) if n > 0 => return true,
            Err(rustix::io::Errno::INTR) => continue,
            Ok(_) | Err(_) => return false,
        }
    }
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

/// Ids of the sandbox entries in `dir` (a runtime or layers dir).
fn list_ids(dir: &Path) -> Result<Vec<String>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(RuntimeError::io(
                format!("cannot list {}", dir.display()),
                e,
            ))
        }
    };
    Ok(entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|id| state::valid_id(id))
        .collect())
}

/// Makes sure `/run/openrun` is a tmpfs: runtime files are written on every create and must
/// vanish on reboot, with the sandboxes they describe. Hosts whose `/run` is not a tmpfs (some
/// containers) get a small one mounted there, once.
fn ensure_run_root() -> Result<()> {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    let root = Path::new(state::RUN_ROOT);
    let is_tmpfs = |p: &Path| rustix::fs::statfs(p).is_ok_and(|s| s.f_type == TMPFS_MAGIC);
    if is_tmpfs(root) {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(root)
        .context(|| format!("cannot create {}", root.display()))?;
    // Two first-time callers must not stack two mounts: serialise on a lock beside it.
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/run/.openrun.lock")
        .context(|| "cannot create /run/.openrun.lock".to_string())?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
        .context(|| "cannot lock /run/.openrun.lock".to_string())?;
    if is_tmpfs(root) {
        return Ok(());
    }
    // Claims made before the mount would be hidden by it: there can be none, since claims are
    // only made under the tmpfs.
    rustix::mount::mount(
        "openrun",
        root,
        "tmpfs",
        rustix::mount::MountFlags::NOSUID
            | rustix::mount::MountFlags::NODEV
            | rustix::mount::MountFlags::NOEXEC,
        Some(c"mode=0711"),
    )
    .context(|| format!("cannot mount a tmpfs on {}", root.display()))?;
    Ok(())
}

fn remove_tree(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        // A sandbox can build a tree deeper than a recursive walk has descriptors for
        // (EMFILE) or paths for (ENAMETOOLONG): coreutils' rm walks any depth.
        Err(e) => {
            let removed = std::process::Command::new("rm")
                .args(["-rf", "--one-file-system", "--"])
                .arg(dir)
                .status()
                .is_ok_and(|s| s.success());
            if removed && !dir.exists() {
                Ok(())
            } else {
                Err(RuntimeError::io(
                    format!("cannot remove {}", dir.display()),
                    e,
                ))
            }
        }
    }
}

/// Removes a sandbox's runtime dir (with a memory layer's mount point in it). What `create`
/// made there goes by name, a call each, with no listing; anything else (pasta's files, a
/// half-made create) makes the last `rmdir` fail and [`remove_tree`] walk what is left.
fn remove_run_dir(paths: &SandboxPaths) -> Result<()> {
    let run = &paths.run;
    let ignore_missing = |r: io::Result<()>| match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    };
    let known = (|| -> io::Result<()> {
        ignore_missing(fs::remove_file(paths.state()))?;
        ignore_missing(fs::remove_file(paths.socket()))?;
        let mnt = run.join("mnt");
        // Lower mount points are numbered from 0 without gaps.
        for n in 0.. {
            match fs::remove_dir(paths.lower_mount(n)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                Err(e) => return Err(e),
            }
        }
        ignore_missing(fs::remove_dir(paths.root_mount()))?;
        ignore_missing(fs::remove_dir(mnt.join("layer")))?;
        ignore_missing(fs::remove_dir(&mnt))?;
        ignore_missing(fs::remove_dir(run))
    })();
    match known {
        Ok(()) => Ok(()),
        Err(_) => remove_tree(run),
    }
}

/// Makes `dir` (and missing parents, with `mode`) unless it is a directory already: one look
/// when it exists, which is every call but the first (a `mkdir` that fails with `EEXIST` is
/// followed by a look anyway).
fn ensure_dir(dir: &Path, mode: u32) -> io::Result<()> {
    if fs::metadata(dir).is_ok_and(|m| m.is_dir()) {
        return Ok(());
    }
    fs::DirBuilder::new().recursive(true).mode(mode).create(dir)
}

/// A directory without a record older than any create can take.
fn is_stale(dir: &Path) -> bool {
    fs::metadata(dir)
        .and_then(|m| m.modified())
        .map(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(60))
        .unwrap_or(true)
}

pub(crate) fn ensure_single_threaded() -> Result<()> {
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

/// A sandbox's init runs as the sandbox's own (unprivileged) host ids and opens its writable
/// layer by path, so every directory above it must be traversable by others. The data dir and
/// its `sandboxes` dir get `o+x` (search only, not listing); an ancestor without it is an error
/// naming that directory.
fn make_traversable(data_dir: &Path) -> Result<()> {
    for dir in [data_dir.to_path_buf(), data_dir.join("sandboxes")] {
        let meta = fs::metadata(&dir).map_err(|source| RuntimeError::DataDir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let mode = meta.permissions().mode();
        if mode & 0o001 == 0 {
            fs::set_permissions(&dir, fs::Permissions::from_mode((mode | 0o011) & 0o7777))
                .map_err(|source| RuntimeError::DataDir {
                    path: data_dir.to_path_buf(),
                    source,
                })?;
        }
    }
    for ancestor in data_dir.ancestors().skip(1) {
        let Ok(meta) = fs::metadata(ancestor) else {
            continue;
        };
        if meta.permissions().mode() & 0o001 == 0 {
            return Err(RuntimeError::DataDir {
                path: data_dir.to_path_buf(),
                source: io::Error::other(format!(
                    "{} is not searchable by other users (mode {:o}) and sandboxes run as unprivileged host ids",
                    ancestor.display(),
                    meta.permissions().mode() & 0o7777
                )),
            });
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_overlayfs_is_named_with_what_to_do() {
        let err = classify_setup_error(
            "mounting the root overlay".into(),
            Some(libc::ENODEV),
            "no such device".into(),
        );
        assert!(matches!(err, RuntimeError::NoOverlayfs(_)));
        let text = err.to_string();
        assert!(
            text.contains("overlay") && text.contains("CONFIG_OVERLAY_FS"),
            "{text}"
        );
        let userns = RuntimeError::NoUserNamespaces(io::Error::from_raw_os_error(libc::ENOSPC));
        let text = userns.to_string();
        assert!(text.contains("user namespaces") && text.contains("max_user_namespaces"));
        let other = classify_setup_error("mounting /proc".into(), Some(libc::EPERM), "x".into());
        assert!(other.to_string().contains("mounting /proc"), "{other}");
    }
}
