//! The `open` network mode: a sandbox's network namespace connected to the host's network by
//! pasta (Debian's `passt` package), user-mode networking.
//!
//! Without it a sandbox has only `lo`. [`start`] runs pasta for a sandbox: it creates a tap
//! interface in the sandbox's network namespace, configures it (the host's address and
//! routes; `--config-net`) and turns every TCP/UDP flow the sandbox opens into an ordinary
//! socket of the host, like any unprivileged program's. No bridge, veth, route or iptables
//! rule of the host changes. [`stop`] kills it: the tap vanishes with it and the namespace
//! is back to `lo` only.
//!
//! How pasta runs, and why:
//! - as the sandbox's own root id on the host (unprivileged), inside the sandbox's user
//!   namespace (joined before `exec`: that namespace belongs to host root, so pasta could not
//!   join it after dropping to that id itself), with capabilities only there: enough to
//!   create the tap in the sandbox's network namespace, nothing over the host. pasta then
//!   confines itself further (an empty mount namespace, seccomp);
//! - `--no-map-gw`: the gateway address is the real gateway, never an alias of the host's
//!   loopback; `-t none -u none -T none -U none`: no port forwarded in either direction, so
//!   nothing listens on the host for the sandbox and the sandbox cannot reach the host's
//!   loopback services through pasta;
//! - `--dns-forward 169.254.1.1`: DNS queries to that address go to the host's resolver; the
//!   sandbox's `/etc/resolv.conf` names it (see `init.rs`), and outside `open` mode that
//!   address has no route, so a lookup fails at once;
//! - in the sandbox's cgroup (joined between fork and exec, the copy it forks into the
//!   background inherits it): its CPU and memory are charged to the sandbox, a pause freezes
//!   it, and destroy stops it (killed and reaped) before the cgroup is killed and removed;
//! - its pid is in `<run dir>/pasta.pid` (written by pasta into a file made for it): pasta
//!   does not notice that a namespace given by descriptor has died, so the runtime kills it
//!   when the sandbox is destroyed or cleaned up, after checking the pid is still that pasta.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Where DNS queries go in `open` mode (pasta forwards them to the host's resolver).
pub const DNS_FORWARD_ADDR: &str = "169.254.1.1";
/// Name of the pid file in the sandbox's runtime dir.
const PID_FILE: &str = "pasta.pid";

/// Why changing the network failed.
pub(crate) type Error = String;

/// The pid file of sandbox runtime dir `run`.
pub(crate) fn pid_file(run: &Path) -> PathBuf {
    run.join(PID_FILE)
}

/// Whether pasta runs for the sandbox of runtime dir `run`.
pub(crate) fn is_open(run: &Path, host_base: u32) -> bool {
    running_pid(run, host_base).is_some()
}

/// Connects the network namespace of the sandbox whose agent is host pid `agent` (`pidfd`,
/// when known: a pidfd of that very agent; its root is host id `host_base`) to the host's
/// network. `cgroup`: the sandbox's `cgroup.procs` files (see
/// [`crate::cgroup::Cgroup::procs_files`]), which pasta joins before it execs, so its CPU and
/// memory are the sandbox's, a pause freezes it and a destroy's cgroup kill ends it. No-op
/// when pasta already runs for it.
pub(crate) fn start(
    run: &Path,
    agent: i32,
    pidfd: Option<BorrowedFd<'_>>,
    host_base: u32,
    cgroup: &[fs::File],
) -> Result<(), Error> {
    if is_open(run, host_base) {
        return Ok(());
    }
    let pasta = ["/usr/bin/pasta", "/usr/sbin/pasta", "/bin/pasta"]
        .iter()
        .map(Path::new)
        .find(|p| p.exists())
        .ok_or("pasta is not installed (Debian: apt-get install passt)")?;
    let (userns, netns) = agent_namespaces(agent, pidfd)?;
    // The pid file is made here (pasta runs as an id that cannot create files in the
    // runtime dir) and handed to the sandbox's root id to fill.
    let pid_path = pid_file(run);
    let _ = fs::remove_file(&pid_path);
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&pid_path)
        .map_err(|e| format!("cannot create {}: {e}", pid_path.display()))?;
    rustix::fs::fchown(
        &file,
        Some(rustix::fs::Uid::from_raw(host_base)),
        Some(rustix::fs::Gid::from_raw(host_base)),
    )
    .map_err(|e| format!("cannot hand {} to the sandbox: {e}", pid_path.display()))?;
    drop(file);

    const NETNS_FD: i32 = 3;
    let (user_raw, net_raw) = (userns.as_raw_fd(), netns.as_raw_fd());
    let cgroup_raw: Vec<i32> = cgroup.iter().map(AsRawFd::as_raw_fd).collect();
    let (root, dev_net, tun, tmpfs) = (c"/", c"/dev/net", c"/dev/net/tun", c"tmpfs");
    let mut cmd = Command::new(pasta);
    cmd.args(["--quiet", "--runas", "0:0", "--netns"])
        .arg(format!("/proc/self/fd/{NETNS_FD}"))
        .args([
            "--config-net",
            "--no-map-gw",
            "--dns-forward",
            DNS_FORWARD_ADDR,
        ])
        .args(["-t", "none", "-u", "none", "-T", "none", "-U", "none"])
        .arg("--pid")
        .arg(&pid_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .env_clear()
        .current_dir("/");
    // SAFETY: the closure runs in the forked child before exec and makes only raw system
    // calls (write, unshare, mount, mknod, chmod, setns, setresgid, setgroups, setresuid,
    // dup2), which are async-signal-safe, on C strings and descriptors made before the fork;
    // the descriptors it uses stay open in the parent until `output()` returns.
    unsafe {
        cmd.pre_exec(move || {
            // Into the sandbox's cgroup first, while still host root: pasta (and the copy it
            // forks into the background) is charged to the sandbox and frozen with it.
            for fd in &cgroup_raw {
                if libc::write(*fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            // The host's /dev/net/tun may be root's only (0600): in a mount namespace of its
            // own, pasta gets a tun node it can open, on a tmpfs over /dev/net. The host's
            // node and mounts are untouched.
            if libc::unshare(libc::CLONE_NEWNS) == -1
                || libc::mount(
                    std::ptr::null(),
                    root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) == -1
                || libc::mount(
                    tmpfs.as_ptr(),
                    dev_net.as_ptr(),
                    tmpfs.as_ptr(),
                    libc::MS_NOSUID | libc::MS_NOEXEC,
                    std::ptr::null(),
                ) == -1
                || libc::mknod(tun.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(10, 200)) == -1
                || libc::chmod(tun.as_ptr(), 0o666) == -1
            {
                return Err(io::Error::last_os_error());
            }
            // Join the sandbox's user namespace (host root may), then become its root, which
            // is the sandbox's unprivileged root id on the host; pasta keeps capabilities in
            // that namespace only.
            if libc::setns(user_raw, libc::CLONE_NEWUSER) == -1
                || libc::setresgid(0, 0, 0) == -1
                || libc::setgroups(0, std::ptr::null()) == -1
                || libc::setresuid(0, 0, 0) == -1
                || libc::dup2(net_raw, NETNS_FD) == -1
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd
        .output()
        .map_err(|e| format!("cannot start {}: {e}", pasta.display()))?;
    drop(userns);
    drop(netns);
    // pasta forks itself into the background once the tap is configured; its first process
    // exits then. Wait (briefly) for the pid file of the one that stays.
    let deadline = Instant::now() + Duration::from_secs(5);
    while out.status.success() && running_pid(run, host_base).is_none() {
        if Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    if out.status.success() && running_pid(run, host_base).is_some() {
        tracing::debug!(run = %run.display(), "open network: pasta started");
        return Ok(());
    }
    let detail = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.starts_with("Failed to send") && !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    let _ = stop(run, host_base);
    Err(format!("pasta failed ({}): {detail}", out.status))
}

/// `PIDFD_GET_USER_NAMESPACE` and `PIDFD_GET_NET_NAMESPACE` (`_IO(0xFF, 9)`, `_IO(0xFF, 4)`,
/// `<linux/pidfd.h>`, Linux 6.11).
const PIDFD_GET_USER_NAMESPACE: u32 = 0xFF09;
const PIDFD_GET_NET_NAMESPACE: u32 = 0xFF04;

/// The agent's user and network namespaces. Through its pidfd where the kernel can: a pid can
/// be reused as soon as the agent dies, and pasta must never get another process's (another
/// sandbox's) network. Older kernels: through `/proc/<pid>/ns`, then the pidfd's process must
/// still be alive, so the pid was still the agent's when the namespaces were opened.
fn agent_namespaces(
    agent: i32,
    pidfd: Option<BorrowedFd<'_>>,
) -> Result<(OwnedFd, OwnedFd), Error> {
    if let Some(pidfd) = pidfd {
        let get = |request: u32| {
            // SAFETY: these ioctls take no argument and return a new descriptor or -1.
            let fd = unsafe { libc::ioctl(pidfd.as_raw_fd(), request as _, 0) };
            // SAFETY: a descriptor the kernel just made for us (close-on-exec).
            (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
        };
        if let (Some(user), Some(net)) =
            (get(PIDFD_GET_USER_NAMESPACE), get(PIDFD_GET_NET_NAMESPACE))
        {
            return Ok((user, net));
        }
    }
    let ns = |kind: &str| -> Result<OwnedFd, Error> {
        let path = format!("/proc/{agent}/ns/{kind}");
        rustix::fs::open(
            &path,
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|e| format!("cannot open {path}: {e}"))
    };
    let namespaces = (ns("user")?, ns("net")?);
    if let Some(pidfd) = pidfd {
        // Signal 0: only whether the process behind the pidfd still exists.
        // SAFETY: a raw system call on a live descriptor, no memory passed.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                pidfd.as_raw_fd(),
                0,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc != 0 {
            return Err(format!(
                "the sandbox's agent (pid {agent}) is gone: {}",
                io::Error::last_os_error()
            ));
        }
    }
    Ok(namespaces)
}

/// Disconnects the sandbox: kills its pasta (the tap goes with it). No-op when none runs.
pub(crate) fn stop(run: &Path, host_base: u32) -> Result<(), Error> {
    if let Some(pid) = running_pid(run, host_base) {
        if let Some(pid) = rustix::process::Pid::from_raw(pid) {
            if let Ok(pidfd) =
                rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
            {
                // Checked again through the pidfd's process: the pid cannot be reused now.
                if running_pid(run, host_base) == Some(pid.as_raw_nonzero().get()) {
                    rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL)
                        .map_err(|e| format!("cannot stop pasta: {e}"))?;
                    wait_gone(&pidfd);
                }
            }
        }
    }
    match fs::remove_file(pid_file(run)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("cannot remove the pasta pid file: {e}")),
    }
}

/// Waits until the process behind `pidfd` is gone, reaping it if it is our child (a server is
/// a subreaper and inherits pasta when its first process exits).
fn wait_gone(pidfd: &OwnedFd) {
    let mut fds = [rustix::event::PollFd::new(
        pidfd,
        rustix::event::PollFlags::IN,
    )];
    let timeout = rustix::event::Timespec {
        tv_sec: 2,
        tv_nsec: 0,
    };
    let _ = rustix::event::poll(&mut fds, Some(&timeout));
    let _ = rustix::process::waitid(
        rustix::process::WaitId::PidFd(std::os::fd::AsFd::as_fd(pidfd)),
        rustix::process::WaitIdOptions::EXITED | rustix::process::WaitIdOptions::NOHANG,
    );
}

/// The pid in the pid file, if that process is a live pasta running as the sandbox's root id.
fn running_pid(run: &Path, host_base: u32) -> Option<i32> {
    let text = fs::read_to_string(pid_file(run)).ok()?;
    let pid: i32 = text.trim().parse().ok().filter(|p| *p > 0)?;
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .map(str::to_owned)
    };
    // `pasta` runs `pasta.avx2` where the CPU has AVX2.
    let is_pasta = field("Name:").is_some_and(|n| n.starts_with("pasta") || n.starts_with("passt"));
    let live = field("State:").is_some_and(|s| !s.starts_with('Z') && !s.starts_with('X'));
    let uid = field("Uid:")
        .and_then(|u| u.split_whitespace().next().map(str::to_owned))
        .and_then(|u| u.parse::<u32>().ok());
    (is_pasta && live && uid == Some(host_base)).then_some(pid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn inode(fd: &OwnedFd) -> u64 {
        rustix::fs::fstat(fd).unwrap().st_ino
    }

    #[test]
    fn namespaces_come_from_the_pidfd_s_process_never_from_a_reused_pid() {
        let mut child = Command::new("sleep").arg("60").spawn().unwrap();
        let pid = child.id() as i32;
        let pidfd = rustix::process::pidfd_open(
            rustix::process::Pid::from_raw(pid).unwrap(),
            rustix::process::PidfdFlags::empty(),
        )
        .unwrap();
        let own = |kind: &str| fs::metadata(format!("/proc/self/ns/{kind}")).unwrap();
        use std::os::unix::fs::MetadataExt;
        let (user, net) = agent_namespaces(pid, Some(pidfd.as_fd())).unwrap();
        assert_eq!(inode(&user), own("user").ino());
        assert_eq!(inode(&net), own("net").ino());
        child.kill().unwrap();
        child.wait().unwrap();
        // The agent is gone and its pid now names another live process (ours stands in for
        // a reused pid): refused, whichever way the kernel lets us open namespaces.
        let reused = std::process::id() as i32;
        assert!(agent_namespaces(reused, Some(pidfd.as_fd())).is_err());
        assert!(agent_namespaces(pid, Some(pidfd.as_fd())).is_err());
    }

    #[test]
    fn a_missing_or_foreign_pid_file_is_not_a_running_pasta() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_open(dir.path(), 1 << 30));
        // Our own pid: alive, but not pasta.
        fs::write(pid_file(dir.path()), std::process::id().to_string()).unwrap();
        assert!(!is_open(dir.path(), 0));
        fs::write(pid_file(dir.path()), "garbage").unwrap();
        assert!(!is_open(dir.path(), 0));
        assert!(stop(dir.path(), 0).is_ok());
        assert!(!pid_file(dir.path()).exists());
    }
}
