//! What the sandbox's first process does between `clone3` and becoming the agent.
//!
//! It runs in the child of `clone3` (fresh user and pid namespaces; pid 1 of its pid
//! namespace), still seeing the host's mounts. Step by step, each for a reason:
//!
//! 0. Make its own mount, network, uts and ipc namespaces (its user namespace owns them) while
//!    the host writes its id maps and makes its cgroup: the network namespace is the costliest
//!    part of a start, and made here it overlaps the host's work instead of preceding it.
//! 1. Wait for the host's `Go`: until then it has no id map (so no usable uid), no cgroup and
//!    no lower mounts. Then join the sandbox cgroup itself, through the `tasks` files the host
//!    opened and sent (v1; on v2 it was created inside it), before anything is built: cheaper
//!    than a host-side migration.
//! 2. `setresgid/setgroups/setresuid(0)`: become root *of the new user namespace*, which is the
//!    unprivileged host id `base`. Without this the process would keep host root's kuid and
//!    every file it created in the writable layer would belong to host root. Then leave the
//!    creator's session (its controlling terminal) and session keyring (the host user's keys).
//! 3. Make every mount private: nothing we mount may propagate back to the host.
//! 4. `unshare(CLONE_NEWCGROUP)`: now that the host placed us in the sandbox cgroup, make it
//!    the root of our cgroup view, so the sandbox cannot see the host's cgroup tree paths.
//! 5. Mount the memory layer's tmpfs (if any) and write the sandbox's own `hostname`, `hosts`
//!    and `resolv.conf` into its layer; attach the idmapped lowers and mount one overlay per
//!    layer (the writable layer is the upper), then `/proc`, a minimal read-only `/dev` (the
//!    host's idmapped template with six
//!    device nodes, see `devices.rs`) with a private devpts instance and `/dev/shm` on top,
//!    `/sys` read-only (its firmware, powercap, btrfs and virtual block device directories
//!    masked) and a tmpfs `/tmp` sized like a memory layer. Then `/proc` as runc leaves it: host-revealing
//!    files (`kcore`, `keys`, `kallsyms`, `timer_list`, `sysrq-trigger`, ...) covered by
//!    `/dev/null`, hardware directories by an empty read-only directory (the `/dev` template's
//!    `pts` before devpts covers it: no superblock of its own), and `/proc/sys`, `bus`,
//!    `fs`, `irq` read-only — after `net.ipv4.ping_group_range` is opened to every group of the
//!    sandbox (ping without `CAP_NET_RAW`).
//! 6. `pivot_root(".", ".")` then detach the old root: the host's tree is gone from this mount
//!    namespace, not merely hidden. Make the default working directory if the image lacks it.
//! 7. Hostname = sandbox id, `lo` up (the only interface).
//! 8. Open our own `oom_score_adj` (the agent sets children's scores through it), drop
//!    capabilities to the default set (bounding set included, see [`KEPT_CAPS`]), set
//!    `no_new_privs`, make the agent non-dumpable (so `/proc/1/exe`, `/proc/1/mem` stay out of
//!    the sandbox's reach).
//! 9. Enter the sandbox's Landlock domain (no device nodes; no signals or abstract sockets
//!    toward anything outside) and make the ruleset each exec session will nest (see
//!    `landlock.rs`), then install the seccomp filter (`seccomp.rs`) last, once nothing is
//!    left to mount: it holds for the agent and every process of the sandbox.
//! 10. Close every inherited host descriptor, point stdio at `/dev/null`, wipe the creator's
//!     argv and environment from memory, tell the host `Ready` and become the agent — nothing
//!     from the image is executed.

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use rustix::fd::{AsFd, OwnedFd};
use rustix::mount::{
    mount, mount_bind, mount_change, move_mount, unmount, MountFlags, MountPropagationFlags,
    MoveMountFlags, UnmountFlags,
};
use rustix::thread::{CapabilitySet, CapabilitySets};

use crate::setup_channel::{self, SetupMessage};
use crate::{landlock, seccomp, sys};

/// One overlay to mount.
#[derive(Debug, Clone)]
pub struct OverlayPlan {
    /// Path inside the sandbox (`/`, `/usr`).
    pub target: &'static str,
    /// Where its idmapped lowers are attached first, bottom to top (all in one directory,
    /// so the overlay's options name them relative to it and stay short with many lowers).
    pub lower_mounts: Vec<PathBuf>,
    /// Writable layer.
    pub upper: PathBuf,
    /// overlayfs work dir.
    pub work: PathBuf,
}

/// A writable layer in memory: a tmpfs of the sandbox's own mount namespace.
#[derive(Debug, Clone)]
pub struct MemoryLayer {
    /// Size cap (the memory limit, if any: its pages are charged to it anyway).
    pub size_bytes: Option<u64>,
}

/// Everything the init needs, computed by the host before `clone3`.
#[derive(Debug, Clone)]
pub struct InitPlan {
    /// Sandbox id (hostname).
    pub id: String,
    /// Where the new root is assembled.
    pub root: PathBuf,
    /// Overlays, root first.
    pub overlays: Vec<OverlayPlan>,
    /// Directory of the writable layer (holds the upper and work dirs, and the sandbox's own
    /// `hostname` and `hosts` files that are bound over the image's).
    pub layer: PathBuf,
    /// Set when the layer is a tmpfs the init mounts itself.
    pub memory_layer: Option<MemoryLayer>,
    /// Size cap of the sandbox's `/tmp` tmpfs (the smaller of the memory limit and the disk
    /// quota, like a memory layer's; `None`: tmpfs's default, half the host's RAM).
    pub tmp_size_bytes: Option<u64>,
    /// Agent configuration.
    pub agent: openrun_agent::AgentConfig,
}

/// A failed step: what was being done and the OS error.
struct StepError {
    stage: String,
    errno: Option<i32>,
    message: String,
}

fn step<T, E: std::fmt::Display + ErrnoOf>(stage: &str, r: Result<T, E>) -> Result<T, StepError> {
    r.map_err(|e| StepError {
        stage: stage.to_string(),
        errno: e.errno(),
        message: e.to_string(),
    })
}

trait ErrnoOf {
    fn errno(&self) -> Option<i32>;
}
impl ErrnoOf for rustix::io::Errno {
    fn errno(&self) -> Option<i32> {
        Some(self.raw_os_error())
    }
}
impl ErrnoOf for std::io::Error {
    fn errno(&self) -> Option<i32> {
        self.raw_os_error()
    }
}
impl ErrnoOf for seccomp::SeccompError {
    fn errno(&self) -> Option<i32> {
        match self {
            seccomp::SeccompError::Install(seccompiler::Error::Seccomp(e)) => e.raw_os_error(),
            _ => None,
        }
    }
}
impl ErrnoOf for ::landlock::RulesetError {
    fn errno(&self) -> Option<i32> {
        None
    }
}

/// Capabilities the sandbox's root keeps (bounding, permitted and effective sets; the agent
/// too). All of them count only inside the sandbox's own user namespace, over its own files,
/// processes and network namespace. Docker's default set, less three:
/// - `NET_RAW` (Podman drops it too): raw and packet sockets could only see the sandbox's own
///   loopback, but they are kernel surface no agent needs; `ping` works without it through
///   ICMP datagram sockets, which the init allows for every group of the sandbox
///   (`net.ipv4.ping_group_range` of its network namespace);
/// - `MKNOD`: device nodes cannot be made from a user namespace anyway (the kernel checks the
///   capability against the host's), and the sandbox's Landlock domain refuses them besides;
/// - `AUDIT_WRITE`: the kernel accepts audit messages from the host's user namespace only.
///
/// Kept, each for programs that run as root in images: `CHOWN`, `DAC_OVERRIDE`, `FOWNER`,
/// `FSETID` (package managers and `tar` restoring owners and modes), `SETUID`, `SETGID` (`su`,
/// `apt`'s sandbox user, daemons dropping privileges), `SETPCAP` (dropping capabilities from
/// the bounding set), `KILL` (signalling other users' processes of the sandbox),
/// `NET_BIND_SERVICE` (ports below 1024 on the sandbox's loopback), `SYS_CHROOT` (build tools;
/// the sandbox root is its namespace's root, so a chroot only narrows the view) and `SETFCAP`
/// (packages that set file capabilities; `no_new_privs` keeps them from granting anything
/// at exec inside the sandbox).
const KEPT_CAPS: CapabilitySet = CapabilitySet::CHOWN
    .union(CapabilitySet::DAC_OVERRIDE)
    .union(CapabilitySet::FOWNER)
    .union(CapabilitySet::FSETID)
    .union(CapabilitySet::KILL)
    .union(CapabilitySet::SETGID)
    .union(CapabilitySet::SETUID)
    .union(CapabilitySet::SETPCAP)
    .union(CapabilitySet::NET_BIND_SERVICE)
    .union(CapabilitySet::SYS_CHROOT)
    .union(CapabilitySet::SETFCAP);

/// Runs in the `clone3` child; never returns.
pub fn run(
    plan: InitPlan,
    setup: OwnedFd,
    listener: UnixListener,
    control: Option<UnixStream>,
) -> ! {
    let mut plan = plan;
    let exec_ruleset = match prepare(&mut plan, &setup) {
        Ok(ruleset) => ruleset,
        Err(e) => {
            let _ = setup_channel::send(
                setup.as_fd(),
                &SetupMessage::Failed {
                    stage: e.stage,
                    errno: e.errno,
                    message: e.message,
                },
                &[],
            );
            sys::exit_now(1);
        }
    };
    // Keep exactly the listener, the control stream, the setup socket and the exec sessions'
    // Landlock ruleset; close the rest of what the host process had open (its stdio included,
    // replaced by /dev/null).
    tracing::trace!("init: prepared");
    let mut keep = vec![setup.as_raw_fd(), listener.as_raw_fd()];
    keep.extend(exec_ruleset.as_ref().map(|f| f.as_raw_fd()));
    keep.extend(plan.agent.own_oom_score_adj.as_ref().map(|f| f.as_raw_fd()));
    keep.extend(control.as_ref().map(|c| c.as_raw_fd()));
    match isolate_descriptors(&keep) {
        Ok(()) => {}
        Err(e) => {
            let _ = setup_channel::send(
                setup.as_fd(),
                &SetupMessage::Failed {
                    stage: "closing host descriptors".into(),
                    errno: e.raw_os_error(),
                    message: e.to_string(),
                },
                &[],
            );
            sys::exit_now(1);
        }
    };
    tracing::trace!("init: descriptors isolated");
    // pid 1 is a fork of the creator: wipe the creator's command line and environment from
    // its memory before anything in the sandbox runs.
    if let Err(e) = sys::scrub_process_strings() {
        let _ = setup_channel::send(
            setup.as_fd(),
            &SetupMessage::Failed {
                stage: "scrubbing the creator's environment".into(),
                errno: e.raw_os_error(),
                message: e.to_string(),
            },
            &[],
        );
        sys::exit_now(1);
    }
    if setup_channel::send(setup.as_fd(), &SetupMessage::Ready, &[]).is_err() {
        sys::exit_now(1);
    }
    drop(setup);
    if let Some(ruleset) = exec_ruleset {
        // Only the init sets it, once: a second value cannot happen.
        let _ = openrun_agent::set_exec_session_ruleset(ruleset);
    }
    // A long-lived sandbox idles most of its life: return the heap that setup (and the
    // creator before the fork, its command-line parser included) freed, so it is not kept per
    // sandbox. A sandbox tied to its creator (`openrun run`) serves one command right away and
    // skips it.
    if !plan.agent.exit_with_control {
        sys::release_free_heap();
    }
    let code = openrun_agent::run(plan.agent, listener, control).unwrap_or(2);
    sys::exit_now(code)
}

/// Builds the sandbox around this process; returns the Landlock ruleset of exec sessions (for
/// the agent) when the kernel has Landlock.
fn prepare(plan: &mut InitPlan, setup: &OwnedFd) -> Result<Option<OwnedFd>, StepError> {
    // 0. Our own mount, network, uts and ipc namespaces, while the host writes our id maps
    //    and makes our cgroup.
    step(
        "making the sandbox namespaces",
        sys::unshare_sandbox_namespaces(),
    )?;
    // Work that needs nothing from the host, done while it makes our cgroup and mounts:
    // compile the seccomp filter, make the Landlock rulesets (step 9 applies them).
    let filter = step("compiling the seccomp filter", seccomp::program())?;
    let sandbox_ruleset = step("preparing the Landlock domain", landlock::sandbox_ruleset())?;
    let exec_ruleset = step(
        "preparing the exec sessions' Landlock ruleset",
        landlock::exec_session_ruleset(),
    )?;
    // 1. Wait for the host.
    let (msg, mut fds) = step("waiting for the host", setup_channel::recv(setup))?;
    let layers = plan
        .overlays
        .iter()
        .map(|o| o.lower_mounts.len())
        .sum::<usize>();
    // The cgroup's tasks files, the layers, then the /dev template.
    let count = fds.len();
    let (tasks_files, dev) = match (msg, fds.pop()) {
        (SetupMessage::Go { tasks_files }, Some(dev)) if count == tasks_files + layers + 1 => {
            (tasks_files, dev)
        }
        (msg, _) => {
            return Err(StepError {
                stage: "waiting for the host".into(),
                errno: None,
                message: format!("unexpected setup message {msg:?} with {count} descriptors"),
            })
        }
    };
    let lowers = fds.split_off(tasks_files);
    // Enter the sandbox cgroup ourselves, before anything is built (see SelfJoin: a host-side
    // migration would cost an RCU grace period). On v2 we were made inside it.
    step(
        "joining the sandbox cgroup",
        crate::cgroup::join_through_tasks(&fds),
    )?;
    drop(fds);
    let started = std::time::Instant::now();
    let phase = |name: &str| {
        tracing::trace!(
            phase = name,
            us = started.elapsed().as_micros() as u64,
            "init"
        )
    };
    // 2. Become root of the new user namespace; leave the creator's session (its terminal)
    //    and its session keyring (keys the host user holds).
    step(
        "switching to the sandbox's root id",
        become_namespace_root(),
    )?;
    step("leaving the host session", rustix::process::setsid())?;
    step("leaving the host keyring", sys::join_new_session_keyring())?;
    // 3. No propagation to the host.
    step(
        "making mounts private",
        mount_change(
            "/",
            MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
        ),
    )?;
    // 4. Private cgroup view, rooted at the sandbox cgroup joined in step 0.
    step(
        "entering a cgroup namespace",
        sys::unshare_cgroup_namespace(),
    )?;
    phase("ids, private, cgroupns");
    // 5. Assemble the root.
    if let Some(memory) = &plan.memory_layer {
        mount_memory_layer(plan, memory)?;
    }
    write_etc_files(plan)?;
    let mut lowers = lowers.into_iter();
    for overlay in &plan.overlays {
        let mut names = Vec::with_capacity(overlay.lower_mounts.len());
        for mount_point in &overlay.lower_mounts {
            let Some(lower) = lowers.next() else {
                return Err(StepError {
                    stage: "attaching an image layer".into(),
                    errno: None,
                    message: "fewer layers than mount points".into(),
                });
            };
            step(
                "attaching an image layer",
                move_mount(
                    lower.as_fd(),
                    "",
                    rustix::fs::CWD,
                    mount_point,
                    MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
                ),
            )?;
            names.push(
                mount_point
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            );
        }
        // overlayfs lists lowers top first; the names are relative to their directory,
        // which becomes the working directory for the mount.
        names.reverse();
        if let Some(dir) = overlay.lower_mounts.first().and_then(|m| m.parent()) {
            step("entering the mount directory", rustix::process::chdir(dir))?;
        }
        let target = join_inside(&plan.root, overlay.target);
        let options = mount_options(format!(
            "lowerdir={},upperdir={},workdir={},userxattr,volatile",
            names.join(":"),
            overlay.upper.display(),
            overlay.work.display()
        ))?;
        step(
            "mounting the root overlay",
            mount(
                "overlay",
                &target,
                "overlay",
                MountFlags::NOSUID | MountFlags::NODEV,
                Some(options.as_c_str()),
            ),
        )?;
    }
    phase("overlays");
    mount_special_filesystems(&plan.root, dev, plan.tmp_size_bytes)?;
    phase("special filesystems");
    bind_etc_files(plan)?;
    // 6. Switch to the new root and drop the old one.
    step("entering the new root", rustix::process::chdir(&plan.root))?;
    step("pivoting root", rustix::process::pivot_root(".", "."))?;
    step(
        "detaching the host root",
        unmount(".", UnmountFlags::DETACH),
    )?;
    step("entering the new root", rustix::process::chdir("/"))?;
    // The default working directory (an image's WorkingDir) is made when the image lacks it,
    // as Docker does: inside the new root, so nothing the image holds can point it elsewhere.
    if let Some(cwd) = plan.agent.cwd.as_deref().filter(|c| c.starts_with('/')) {
        if let Err(e) = fs::create_dir_all(cwd) {
            tracing::debug!(cwd, error = %e, "cannot create the working directory");
        }
    }
    phase("pivot");
    // 7. Identity and network.
    step(
        "setting the hostname",
        rustix::system::sethostname(plan.id.as_bytes()),
    )?;
    step("bringing lo up", sys::loopback_up())?;
    phase("hostname, lo");
    // 8. Privileges. Our own OOM score file first: once non-dumpable, our /proc files belong to
    //    host root and could not be opened any more (see AgentConfig::own_oom_score_adj).
    // (Changing uid above reset dumpability; nothing of the sandbox runs yet, so being
    // dumpable for this open exposes nothing.)
    step(
        "opening the agent's oom_score_adj",
        rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::Dumpable),
    )?;
    let own_oom = step(
        "opening the agent's oom_score_adj",
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/proc/self/oom_score_adj"),
    )?;
    plan.agent.own_oom_score_adj = Some(std::sync::Arc::new(own_oom));
    drop_privileges()?;
    phase("privileges");
    // 9. Landlock, then seccomp, last: from here on no mount, no new namespace, no device
    //    node, for the agent and everything it starts.
    let exec_ruleset = enter_landlock_domain(sandbox_ruleset, exec_ruleset)?;
    phase("landlock");
    step("installing the seccomp filter", seccomp::install(&filter))?;
    phase("seccomp");
    Ok(exec_ruleset)
}

/// Enters the sandbox's Landlock domain (see `landlock.rs`); returns the ruleset of exec
/// sessions for the agent. A kernel without Landlock is logged and tolerated: the sandbox keeps
/// its namespaces, capabilities and seccomp filter.
fn enter_landlock_domain(
    sandbox: ::landlock::RulesetCreated,
    exec_sessions: ::landlock::RulesetCreated,
) -> Result<Option<OwnedFd>, StepError> {
    // Rules name paths, so they are added here, inside the new root: links and renames across
    // directories stay allowed beneath it (see landlock::allow_reparenting).
    let root = step(
        "opening the root for the Landlock rules",
        rustix::fs::open(
            "/",
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        ),
    )?;
    let sandbox = step(
        "preparing the Landlock domain",
        landlock::allow_reparenting(sandbox, &root),
    )?;
    let exec_sessions = step(
        "preparing the exec sessions' Landlock ruleset",
        landlock::allow_reparenting(exec_sessions, &root),
    )?;
    drop(root);
    let exec_sessions = landlock::into_descriptor(exec_sessions);
    match step("entering the Landlock domain", landlock::enter(sandbox))? {
        landlock::Enforcement::Full => {}
        landlock::Enforcement::Partial => {
            tracing::warn!("this kernel enforces the sandbox's Landlock domain only in part")
        }
        landlock::Enforcement::None => {
            tracing::warn!(
                "this kernel has no Landlock: sandboxes run without their Landlock domains \
                 (device nodes and cross-session ptrace are then only kept out by the \
                 namespaces and the capability set)"
            );
            return Ok(None);
        }
    }
    Ok(exec_sessions)
}

fn become_namespace_root() -> rustix::io::Result<()> {
    let root_gid = rustix::process::Gid::ROOT;
    let root_uid = rustix::process::Uid::ROOT;
    rustix::thread::set_thread_res_gid(root_gid, root_gid, root_gid)?;
    rustix::thread::set_thread_groups(&[])?;
    rustix::thread::set_thread_res_uid(root_uid, root_uid, root_uid)
}

/// `root` joined with an absolute in-sandbox path.
fn join_inside(root: &Path, inside: &str) -> PathBuf {
    root.join(inside.trim_start_matches('/'))
}

fn mount_special_filesystems(
    root: &Path,
    dev_template: OwnedFd,
    tmp_size: Option<u64>,
) -> Result<(), StepError> {
    let fs_flags = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    let proc_dir = root.join("proc");
    ensure_dir(&proc_dir, "creating /proc")?;
    step(
        "mounting /proc",
        mount("proc", &proc_dir, "proc", fs_flags, None),
    )?;

    let dev = root.join("dev");
    ensure_dir(&dev, "creating /dev")?;
    // The host's read-only template: device nodes, links and mount points in one step.
    step(
        "mounting /dev",
        move_mount(
            dev_template.as_fd(),
            "",
            rustix::fs::CWD,
            &dev,
            MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
        ),
    )?;
    let pts = dev.join("pts");
    // The template's `pts` is an empty directory on a read-only mount: a clone of it, taken
    // before devpts covers it, masks directories below (no superblock of its own, where a
    // tmpfs would add one per sandbox, and every superblock costs each memory cgroup).
    let empty = step(
        "preparing the masks",
        rustix::mount::open_tree(
            rustix::fs::CWD,
            &pts,
            rustix::mount::OpenTreeFlags::OPEN_TREE_CLONE
                | rustix::mount::OpenTreeFlags::OPEN_TREE_CLOEXEC,
        ),
    )?;
    step(
        "mounting /dev/pts",
        mount(
            "devpts",
            &pts,
            "devpts",
            MountFlags::NOSUID | MountFlags::NOEXEC,
            Some(c"newinstance,ptmxmode=0666,mode=0620,gid=5"),
        ),
    )?;
    let shm = dev.join("shm");
    step(
        "mounting /dev/shm",
        mount(
            "shm",
            &shm,
            "tmpfs",
            fs_flags,
            Some(c"mode=1777,size=65536k"),
        ),
    )?;
    let sys_dir = root.join("sys");
    ensure_dir(&sys_dir, "creating /sys")?;
    step(
        "mounting /sys",
        mount(
            "sysfs",
            &sys_dir,
            "sysfs",
            fs_flags | MountFlags::RDONLY,
            None,
        ),
    )?;

    let tmp = root.join("tmp");
    ensure_dir(&tmp, "creating /tmp")?;
    // Sized like a memory layer: without a size, /tmp would hold half the host's RAM whatever
    // the sandbox's disk quota.
    let tmp_options = match tmp_size {
        Some(size) => format!("mode=1777,size={size}"),
        None => "mode=1777".to_string(),
    };
    step(
        "mounting /tmp",
        mount(
            "tmpfs",
            &tmp,
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV,
            Some(mount_options(tmp_options)?.as_c_str()),
        ),
    )?;
    allow_unprivileged_ping(&proc_dir);
    cap_user_namespace(&proc_dir)?;
    let mut empty = Mask::Detached(empty);
    mask_proc(&proc_dir, &dev.join("null"), &mut empty)?;
    mask_sys(&sys_dir, &mut empty)?;
    Ok(())
}

/// `/sys` directories that tell about the host or other sandboxes: firmware tables (ACPI,
/// DMI serial numbers, EFI), power capping (RAPL energy counters, a known side channel), btrfs
/// (the disk pool's qgroups: every other sandbox's disk usage) and virtual block devices (the
/// loop devices' `backing_file` paths, device-mapper names). Each is covered by the empty
/// read-only tmpfs of `/proc`'s masked directories; the sandbox has no block device to look
/// at anyway (its `/dev` holds none).
const MASKED_SYS_DIRS: [&str; 4] = [
    "firmware",
    "devices/virtual/powercap",
    "fs/btrfs",
    "devices/virtual/block",
];

/// Covers [`MASKED_SYS_DIRS`] (those that exist) with the empty read-only directory `empty`.
fn mask_sys(sys_dir: &Path, empty: &mut Mask) -> Result<(), StepError> {
    for name in MASKED_SYS_DIRS {
        mask_dir(empty, &sys_dir.join(name), "masking /sys directories")?;
    }
    Ok(())
}

/// Whether a mount failed only because its target is absent (`ENOENT`) or is not a directory
/// (`ENOTDIR`: a directory mounted over a file): what a look before the mount would have
/// found, for one syscall less per target. The targets are in the sandbox's own fresh `/proc`
/// and `/sys` instances, whose entries the kernel makes, not the image.
fn absent(e: rustix::io::Errno) -> bool {
    e == rustix::io::Errno::NOENT || e == rustix::io::Errno::NOTDIR
}

/// The empty read-only directory that masks directories: a detached clone of the `/dev`
/// template's empty `pts` directory (read-only, nosuid, noexec, like the whole template) until
/// its first use, then that first masked directory, bound again for each next one.
enum Mask {
    Detached(OwnedFd),
    Attached(PathBuf),
}

/// Covers `target` with the empty read-only directory of `empty`. A target that does not
/// exist (or is not a directory) is left alone.
fn mask_dir(empty: &mut Mask, target: &Path, stage: &str) -> Result<(), StepError> {
    let done = match &*empty {
        Mask::Attached(first) => mount_bind(first, target),
        Mask::Detached(tree) => move_mount(
            tree.as_fd(),
            "",
            rustix::fs::CWD,
            target,
            MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
        ),
    };
    match done {
        Ok(()) => {
            if matches!(empty, Mask::Detached(_)) {
                *empty = Mask::Attached(target.to_path_buf());
            }
        }
        Err(e) if absent(e) => {}
        Err(e) => step(stage, Err(e))?,
    }
    Ok(())
}

/// Lets every group of the sandbox open ICMP datagram sockets (`ping` without `CAP_NET_RAW`,
/// which the sandbox does not have): `net.ipv4.ping_group_range` of the sandbox's own network
/// namespace, written while `/proc/sys` is still writable. Only ping breaks if it fails.
fn allow_unprivileged_ping(proc_dir: &Path) {
    let range = format!("0 {}", crate::ids::RANGE_SIZE - 1);
    if let Err(e) = fs::write(proc_dir.join("sys/net/ipv4/ping_group_range"), range) {
        tracing::debug!(error = %e, "cannot allow unprivileged ping");
    }
}

/// Limits of the sandbox's own user namespace (`/proc/sys/user`), written while `/proc/sys` is
/// still writable (the init has `CAP_SYS_RESOURCE` over its namespace until it drops it):
/// - inotify: the kernel charges a sandbox's instances and watches to its own namespace's
///   counters and to host root's (the namespace's owner), which every sandbox and the host
///   share (`fs.inotify.max_user_*`, raised by `host_limits`). Capped here per sandbox user so
///   that one sandbox cannot take everyone's: 1,024 instances (the host's default is 128 for
///   a whole user) and 131,072 watches (large repositories under a file watcher);
/// - namespaces, a second wall beside the seccomp filter's refusal of the namespace flags (it
///   also holds for calls the filter cannot read, such as `clone3`'s): no user, network,
///   cgroup or time namespace may be made in the sandbox. Mount, ipc, uts and pid namespaces
///   keep a small allowance: the sandbox's pasta (`open` network, `network.rs`) runs in the
///   sandbox's user namespace and confines itself in one of each, charged here.
const USER_NAMESPACE_LIMITS: [(&str, &str); 10] = [
    ("max_inotify_instances", "1024"),
    ("max_inotify_watches", "131072"),
    ("max_user_namespaces", "0"),
    ("max_net_namespaces", "0"),
    ("max_cgroup_namespaces", "0"),
    ("max_time_namespaces", "0"),
    ("max_mnt_namespaces", "8"),
    ("max_ipc_namespaces", "8"),
    ("max_uts_namespaces", "8"),
    ("max_pid_namespaces", "8"),
];

fn cap_user_namespace(proc_dir: &Path) -> Result<(), StepError> {
    let stage = "capping the sandbox's user namespace";
    // Opened once: each limit is then a one-component lookup instead of the whole path
    // through the new root.
    let dir = step(
        stage,
        rustix::fs::open(
            proc_dir.join("sys/user"),
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        ),
    )?;
    for (name, value) in USER_NAMESPACE_LIMITS {
        let file = match rustix::fs::openat(
            &dir,
            name,
            rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        ) {
            Ok(file) => file,
            // A kernel without this limit (max_time_namespaces is 5.6+): nothing to cap.
            Err(rustix::io::Errno::NOENT) => continue,
            Err(e) => return step(stage, Err(e)),
        };
        let written = step(stage, rustix::io::write(&file, value.as_bytes()))?;
        if written != value.len() {
            return Err(StepError {
                stage: stage.into(),
                errno: None,
                message: format!("short write to {name}"),
            });
        }
    }
    Ok(())
}

/// `/proc` files that tell about the host (kernel memory, symbols, every process's timers,
/// every user's keys) or act on it (sysrq): each is covered by `/dev/null`, as runc does.
/// Most are already out of reach (their owner is the host's root, unmapped here), but not all
/// (`keys`, `key-users`, `kallsyms` are world-readable) and not on every kernel. Only those
/// that exist are covered (each mount costs).
const MASKED_PROC_FILES: [&str; 9] = [
    "kcore",
    "keys",
    "key-users",
    "kallsyms",
    "timer_list",
    "timer_stats",
    "sched_debug",
    "latency_stats",
    "sysrq-trigger",
];
/// `/proc` directories of host hardware, covered by one empty read-only tmpfs.
const MASKED_PROC_DIRS: [&str; 3] = ["acpi", "asound", "scsi"];
/// `/proc` trees made read-only: kernel settings (the sandbox's root could otherwise change
/// its network namespace's), buses, filesystems, interrupts.
const READ_ONLY_PROC_DIRS: [&str; 4] = ["sys", "bus", "fs", "irq"];

/// Masks `/proc`: files with `/dev/null`, directories with the empty directory of `empty`.
fn mask_proc(proc_dir: &Path, null: &Path, empty: &mut Mask) -> Result<(), StepError> {
    // No look before each mount: a missing entry fails the mount with ENOENT, which is as
    // cheap as the look and saves it for every entry that exists.
    for name in MASKED_PROC_FILES {
        match mount_bind(null, proc_dir.join(name)) {
            Err(e) if e == rustix::io::Errno::NOENT => {}
            done => step("masking /proc files", done)?,
        }
    }
    for name in MASKED_PROC_DIRS {
        mask_dir(empty, &proc_dir.join(name), "masking /proc directories")?;
    }
    for name in READ_ONLY_PROC_DIRS {
        let target = proc_dir.join(name);
        match mount_bind(&target, &target) {
            Err(e) if e == rustix::io::Errno::NOENT => continue,
            done => step("making /proc read-only", done)?,
        }
        step(
            "making /proc read-only",
            rustix::mount::mount_remount(
                &target,
                MountFlags::BIND
                    | MountFlags::RDONLY
                    | MountFlags::NOSUID
                    | MountFlags::NODEV
                    | MountFlags::NOEXEC,
                c"",
            ),
        )?;
    }
    Ok(())
}

/// Mount data as a C string (paths with NUL bytes cannot be mount options).
fn mount_options(s: String) -> Result<std::ffi::CString, StepError> {
    std::ffi::CString::new(s).map_err(|_| StepError {
        stage: "building mount options".into(),
        errno: None,
        message: "a path contains a NUL byte".into(),
    })
}

/// Mounts the sandbox's own tmpfs as its writable layer and creates the upper and work dirs.
fn mount_memory_layer(plan: &InitPlan, memory: &MemoryLayer) -> Result<(), StepError> {
    let options = match memory.size_bytes {
        Some(size) => format!("mode=0700,size={size}"),
        None => "mode=0700".to_string(),
    };
    step(
        "mounting the memory layer",
        mount(
            "layer",
            &plan.layer,
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV,
            Some(mount_options(options)?.as_c_str()),
        ),
    )?;
    for overlay in &plan.overlays {
        step("creating the memory layer", fs::create_dir(&overlay.upper))?;
        step("creating the memory layer", fs::create_dir(&overlay.work))?;
    }
    Ok(())
}

/// The sandbox's own `/etc/hostname`, `/etc/hosts` and `/etc/resolv.conf`, in its writable layer (so they are
/// charged and limited like anything else it writes), bound over the image's later.
const ETC_FILES: [&str; 3] = ["hostname", "hosts", "resolv.conf"];

fn write_etc_files(plan: &InitPlan) -> Result<(), StepError> {
    let id = &plan.id;
    for (name, content) in ETC_FILES.iter().zip([
        format!("{id}\n"),
        format!(
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{id}\n"
        ),
        // The only resolver: pasta's DNS forwarder in `open` mode, unreachable otherwise.
        format!("nameserver {}\n", crate::network::DNS_FORWARD_ADDR),
    ]) {
        step(
            "writing /etc files",
            fs::write(plan.layer.join(name), content),
        )?;
    }
    Ok(())
}

/// Binds the sandbox's `/etc/hostname` and `/etc/hosts` over the image's (creating the target
/// in the writable layer when the image lacks it), as Docker does. An image whose `/etc` or
/// whose files there are symlinks keeps its own: a mount never follows an image's symlink.
fn bind_etc_files(plan: &InitPlan) -> Result<(), StepError> {
    let etc = plan.root.join("etc");
    if !fs::symlink_metadata(&etc).is_ok_and(|m| m.is_dir()) {
        return Ok(());
    }
    for name in ETC_FILES {
        let source = plan.layer.join(name);
        let target = etc.join(name);
        match fs::symlink_metadata(&target) {
            // Never follow an image's symlink with a mount: skip, the image keeps its own.
            Ok(m) if m.file_type().is_symlink() => continue,
            Ok(_) => {}
            Err(_) => step("creating /etc files", fs::write(&target, b""))?,
        }
        step("binding /etc files", mount_bind(&source, &target))?;
    }
    Ok(())
}

/// Makes sure a mount point exists as a real directory. An image whose `/proc`, `/dev`, `/sys`
/// or `/tmp` is a symlink is refused: mounting through it would follow a path the image chose.
fn ensure_dir(path: &Path, stage: &str) -> Result<(), StepError> {
    if let Ok(meta) = fs::symlink_metadata(path) {
        if !meta.is_dir() {
            return Err(StepError {
                stage: stage.to_string(),
                errno: None,
                message: format!(
                    "the image has {} as a non-directory; it must be a directory",
                    path.file_name()
                        .map(|n| n.to_string_lossy())
                        .unwrap_or_default()
                ),
            });
        }
        return Ok(());
    }
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => step(stage, Err(e)),
    }
}

fn drop_privileges() -> Result<(), StepError> {
    // Bounding set first: what no process in the sandbox can ever regain.
    for bit in 0..=63u32 {
        let Some(cap) = CapabilitySet::from_bits(1u64 << bit) else {
            continue;
        };
        if KEPT_CAPS.contains(cap) {
            continue;
        }
        match rustix::thread::remove_capability_from_bounding_set(cap) {
            Ok(()) => {}
            // Capabilities are numbered densely up to the kernel's last one: the first this
            // kernel does not know ends the list (the rest would fail the same way).
            Err(rustix::io::Errno::INVAL) => break,
            Err(e) => return step("dropping capabilities", Err(e)),
        }
    }
    step(
        "dropping capabilities",
        rustix::thread::set_capabilities(
            None,
            CapabilitySets {
                effective: KEPT_CAPS,
                permitted: KEPT_CAPS,
                inheritable: CapabilitySet::empty(),
            },
        ),
    )?;
    step(
        "clearing ambient capabilities",
        rustix::thread::clear_ambient_capability_set(),
    )?;
    step(
        "setting no_new_privs",
        rustix::thread::set_no_new_privs(true),
    )?;
    step(
        "making the agent non-dumpable",
        rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable),
    )?;
    Ok(())
}

/// Closes every descriptor inherited from the host process except `keep`, and points stdio at
/// `/dev/null`, so no host file, socket or terminal is reachable from the sandbox through pid 1.
pub(crate) fn isolate_descriptors(keep: &[i32]) -> std::io::Result<()> {
    let null = rustix::fs::open(
        "/dev/null",
        rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    for target in 0..=2 {
        sys::dup2_raw(null.as_raw_fd(), target)?;
    }
    drop(null);
    if sys::close_all_except(keep)? {
        return Ok(());
    }
    // A kernel without close_range: every descriptor /proc lists.
    let open: Vec<i32> = fs::read_dir("/proc/self/fd")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    for fd in open {
        if fd > 2 && !keep.contains(&fd) {
            sys::close_inherited(fd);
        }
    }
    Ok(())
}
