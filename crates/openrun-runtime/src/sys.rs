//! The few raw syscalls that rustix does not wrap: `clone3` with a pidfd, `mount_setattr` for
//! idmapped mounts, and the interface-flags ioctl that brings `lo` up.
//!
//! Every `unsafe` block of the runtime lives here, each with the invariant it relies on.

use rustix::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::io;

/// Namespaces the sandbox process is cloned into: its user namespace (the one the creator
/// writes id maps for) and its pid namespace (whose pid 1 it is), which only a new process
/// can enter. It makes the others itself ([`unshare_sandbox_namespaces`]).
pub const CLONE_NAMESPACES: u64 = (libc::CLONE_NEWUSER | libc::CLONE_NEWPID) as u64;

/// Gives the calling process (the sandbox's init, root of its new user namespace, which then
/// owns them) new mount, network, uts and ipc namespaces: the same namespaces `clone3` would
/// have made, made in the child so that the costliest of them, the network namespace, is
/// built while the creator writes the id maps and makes the cgroup rather than before the
/// clone. The cgroup namespace comes later, from inside the sandbox cgroup.
pub fn unshare_sandbox_namespaces() -> io::Result<()> {
    use rustix::thread::UnshareFlags;
    let flags =
        UnshareFlags::NEWNS | UnshareFlags::NEWNET | UnshareFlags::NEWUTS | UnshareFlags::NEWIPC;
    // SAFETY: what makes `unshare` unsafe in general is taking a thread's descriptor table or
    // filesystem info (root, working directory, umask) away from threads that share it. None
    // of these flags unshares the descriptor table; CLONE_NEWNS implies unsharing the
    // filesystem info, which the init (single-threaded, forked without CLONE_FS) shares with
    // nobody.
    unsafe { rustix::thread::unshare_unsafe(flags) }?;
    Ok(())
}

const CLONE_PIDFD: u64 = 0x1000;
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// `struct clone_args` from `linux/sched.h` (the version-0 layout plus set_tid and cgroup).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// Result of [`clone3_process`] in the calling process.
pub enum Forked {
    /// We are the parent: the child's host pid and a pidfd for it.
    Parent {
        /// Host pid of the child.
        pid: i32,
        /// Pidfd referring to the child.
        pidfd: OwnedFd,
    },
    /// We are the child.
    Child,
}

/// Forks the calling process into new namespaces with `clone3`, like `fork` (no shared memory,
/// no new stack), returning a pidfd for the child. `SIGCHLD` is sent to the parent on exit.
///
/// With `cgroup` (a v2 cgroup directory), the child starts inside that cgroup.
///
/// The caller must be single-threaded: the child is a copy of the calling thread only, and a
/// multi-threaded parent could leave locks (malloc's included) held forever in the child.
pub fn clone3_process(namespaces: u64, cgroup: Option<BorrowedFd<'_>>) -> io::Result<Forked> {
    let mut pidfd: libc::c_int = -1;
    let mut args = CloneArgs {
        flags: namespaces | CLONE_PIDFD,
        pidfd: &mut pidfd as *mut libc::c_int as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..Default::default()
    };
    if let Some(dir) = cgroup {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = dir.as_raw_fd() as u64;
    }
    // SAFETY: `args` is a valid, fully initialised clone_args of the size we pass; without
    // CLONE_VM the child gets a copy-on-write copy of our memory (fork semantics), so no stack
    // is needed and the child simply returns 0 from this call. The kernel writes the pidfd into
    // `pidfd`, which outlives the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    match ret {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        pid => {
            // SAFETY: on success the kernel stored a new, open file descriptor in `pidfd` that
            // nothing else owns.
            let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
            Ok(Forked::Parent {
                pid: pid as i32,
                pidfd,
            })
        }
    }
}

const MOUNT_ATTR_RDONLY: u64 = 0x0000_0001;
const MOUNT_ATTR_NOSUID: u64 = 0x0000_0002;
const MOUNT_ATTR_NODEV: u64 = 0x0000_0004;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

/// `struct mount_attr` from `linux/mount.h`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// What a detached idmapped mount is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DetachedMount {
    /// An image layer: read-only, nosuid, nodev.
    Layer,
    /// The `/dev` template: read-only, nosuid, noexec, and device nodes usable.
    Devices,
}

const MOUNT_ATTR_NOEXEC: u64 = 0x0000_0008;

/// Turns a detached mount (from `open_tree(OPEN_TREE_CLONE)`) into a read-only mount whose file
/// owners are shifted through the id map of `userns`, with the flags `kind` needs.
pub fn idmap_detached_mount(
    mount: BorrowedFd<'_>,
    userns: BorrowedFd<'_>,
    kind: DetachedMount,
) -> io::Result<()> {
    let (set, clear) = match kind {
        DetachedMount::Layer => (MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, 0),
        DetachedMount::Devices => (MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC, MOUNT_ATTR_NODEV),
    };
    let mut attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP | MOUNT_ATTR_RDONLY | set,
        attr_clr: clear,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    let empty = c"";
    // SAFETY: `mount` and `userns` are open descriptors borrowed for the duration of the call,
    // `empty` is a valid NUL-terminated path (AT_EMPTY_PATH makes the call act on `mount`
    // itself), and `attr` is a valid mount_attr whose size we pass.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            mount.as_raw_fd(),
            empty.as_ptr(),
            (libc::AT_EMPTY_PATH | libc::AT_RECURSIVE) as libc::c_uint,
            &mut attr as *mut MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if ret == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Brings the loopback interface of the current network namespace up.
pub fn loopback_up() -> io::Result<()> {
    let sock = rustix::net::socket(
        rustix::net::AddressFamily::INET,
        rustix::net::SocketType::DGRAM,
        None,
    )?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `sock` is an open socket and `req` a valid ifreq naming "lo"; SIOCGIFFLAGS fills
    // the flags union member.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the previous ioctl initialised the flags member of the union.
    unsafe {
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    // SAFETY: as above; SIOCSIFFLAGS reads the flags we just set.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Ends the current process immediately, without running exit handlers or flushing stdio
/// buffers inherited from the parent at fork time.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns and has no preconditions.
    unsafe { libc::_exit(code) }
}

/// `dup2(from, to)` on raw descriptor numbers (used to replace stdio).
pub fn dup2_raw(from: i32, to: i32) -> io::Result<()> {
    // SAFETY: dup2 only manipulates the descriptor table; `to` is a standard stream number that
    // no Rust value owns exclusively.
    if unsafe { libc::dup2(from, to) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Closes a descriptor inherited from the creator that no Rust value in this process owns.
pub fn close_inherited(fd: i32) {
    // SAFETY: the caller lists descriptors from /proc/self/fd and excludes every descriptor it
    // still uses; closing one that is already closed just returns EBADF.
    unsafe {
        libc::close(fd);
    }
}

/// Closes every descriptor from 3 up except `keep`, with one `close_range` per gap between
/// them. `Ok(false)` when the kernel has no `close_range` (before 5.9): nothing was closed.
///
/// The caller must own no descriptor outside `keep` through a Rust value that would close it
/// again (the sandbox's init, whose other descriptors are copies of the creator's).
pub fn close_all_except(keep: &[i32]) -> io::Result<bool> {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter(|&&fd| fd > 2)
        .map(|&fd| fd as u32)
        .collect();
    keep.sort_unstable();
    keep.dedup();
    let mut next = 3u32;
    let mut gaps = Vec::with_capacity(keep.len() + 1);
    for fd in keep {
        if fd > next {
            gaps.push((next, fd - 1));
        }
        next = fd + 1;
    }
    gaps.push((next, u32::MAX));
    for (first, last) in gaps {
        // SAFETY: close_range only closes descriptors of this process's table; the caller
        // guarantees that no live value owns one of those in [first, last].
        let ret = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) };
        if ret == -1 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENOSYS) {
                return Ok(false);
            }
            return Err(err);
        }
    }
    Ok(true)
}

/// Gives the free memory of the heap back to the kernel (glibc's `malloc_trim(0)`: the top of
/// the heap and whole free pages inside it).
pub fn release_free_heap() {
    // SAFETY: malloc_trim only walks glibc's own arenas under their locks; it has no
    // preconditions and frees nothing that is in use.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Moves the calling process into a new cgroup namespace rooted at its current cgroup.
pub fn unshare_cgroup_namespace() -> io::Result<()> {
    // SAFETY: CLONE_NEWCGROUP only changes the cgroup namespace; it does not unshare the file
    // descriptor table or filesystem info, which is what makes `unshare` unsafe in general.
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWCGROUP) }?;
    Ok(())
}

/// Gives the calling process a new, empty session keyring, so no key of the host session
/// (where the creator ran) is reachable from the sandbox. Kernels without key support are
/// fine: there is nothing to inherit.
pub fn join_new_session_keyring() -> io::Result<()> {
    const KEYCTL_JOIN_SESSION_KEYRING: libc::c_long = 1;
    // SAFETY: KEYCTL_JOIN_SESSION_KEYRING with a NULL name takes no pointers the kernel reads;
    // it only replaces the calling thread's session keyring.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_keyctl,
            KEYCTL_JOIN_SESSION_KEYRING,
            std::ptr::null::<libc::c_char>(),
        )
    };
    if ret == -1 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENOSYS) {
            return Ok(());
        }
        return Err(err);
    }
    Ok(())
}

/// Reads a whole (small) kernel file: `/proc` and cgroupfs files report a size of 0, so
/// `fs::read_to_string` looks the size up, then reads 32 bytes and doubles from there (up to
/// ten reads for `/proc/self/mountinfo`). This reads into 4 KiB steps from the start: one
/// read and the one that sees the end for most files.
pub fn read_kernel_file(path: impl AsRef<std::path::Path>) -> io::Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut buf = Vec::with_capacity(4096);
    loop {
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(buf.capacity());
        }
        let len = buf.len();
        buf.resize(buf.capacity(), 0);
        match file.read(&mut buf[len..]) {
            Ok(0) => {
                buf.truncate(len);
                break;
            }
            Ok(n) => buf.truncate(len + n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => buf.truncate(len),
            Err(e) => return Err(e),
        }
    }
    String::from_utf8(buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Overwrites this process's argument and environment strings (what `/proc/<pid>/cmdline` and
/// `/proc/<pid>/environ` show) with zeros, and names it `openrun-agent`: the sandbox's pid 1
/// is a fork of the creator and must not carry the creator's environment or command line.
pub fn scrub_process_strings() -> io::Result<()> {
    let stat = read_kernel_file("/proc/self/stat")?;
    let fields: Vec<u64> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or("")
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // Fields 48..=51 of stat (arg_start, arg_end, env_start, env_end); `fields` starts at
    // field 3.
    let range = |i: usize| (fields.get(i - 3).copied(), fields.get(i - 2).copied());
    for (start, end) in [range(48), range(50)] {
        let (Some(start), Some(end)) = (start, end) else {
            return Err(io::Error::other("short /proc/self/stat"));
        };
        if start == 0 || end <= start || end - start > (1 << 24) {
            continue;
        }
        // SAFETY: [start, end) is this process's own argument or environment area, as the
        // kernel reports it: mapped, writable stack memory set up at exec. Nothing in this
        // process reads those strings after this point (the agent builds every child's
        // environment explicitly), so zeroing them breaks no Rust invariant.
        unsafe { std::ptr::write_bytes(start as usize as *mut u8, 0, (end - start) as usize) };
    }
    rustix::thread::set_name(c"openrun-agent")?;
    Ok(())
}
