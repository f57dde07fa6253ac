//! Landlock domains of a sandbox.
//!
//! - **The sandbox domain**, entered by the init right before it becomes the agent, so the agent
//!   and every process of the sandbox are in it: no character or block device node can be
//!   made anywhere (even by the sandbox's root, and whatever the capability set), and with
//!   Landlock ABI 6 the sandbox's processes can neither signal nor connect to the abstract Unix
//!   sockets of processes outside it. Both are defence in depth: the pid and network namespaces
//!   already hide everything outside. Nothing else is restricted: every path stays readable,
//!   writable and executable as the usual permissions say, and links and renames across
//!   directories stay allowed (Landlock refuses them in every domain that does not grant
//!   `Refer` explicitly, so both rulesets grant it beneath the sandbox's root, see
//!   [`allow_reparenting`]).
//! - **One domain per exec session**: the agent hands [`exec_session_ruleset`] to its spawn
//!   code, and every process it starts enters a fresh domain nested in the sandbox's right
//!   before `execve`. Landlock allows `ptrace` (and `/proc/<pid>/mem`, `environ`, `fd`, ...)
//!   only toward processes in the same domain or one nested in it: a session's processes can
//!   trace their own descendants (`strace -f`, `gdb`) but not another session's processes,
//!   nor the agent. Signals are *not* scoped per session (`kill` of a server started by an
//!   earlier command must keep working).
//!
//! Landlock is best effort: on a kernel without it the sandbox keeps its namespaces, dropped
//! capabilities and seccomp filter, and the init logs a warning.

use std::os::fd::{AsFd, OwnedFd};

use landlock::{
    AccessFs, BitFlags, CompatLevel, Compatible, PathBeneath, Ruleset, RulesetAttr, RulesetCreated,
    RulesetCreatedAttr, RulesetError, RulesetStatus, Scope,
};

/// File system rights both rulesets handle: device nodes are refused everywhere; `Refer`
/// (reparenting) is handled only to be granted beneath the root again (see
/// [`allow_reparenting`]).
fn handled() -> BitFlags<AccessFs> {
    AccessFs::MakeChar | AccessFs::MakeBlock | AccessFs::Refer
}

/// How much of the sandbox domain the kernel enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enforcement {
    /// Everything asked for.
    Full,
    /// Part of it (an older Landlock ABI: no scopes before ABI 6).
    Partial,
    /// Nothing: the kernel has no Landlock (or it is disabled at boot).
    None,
}

impl From<RulesetStatus> for Enforcement {
    fn from(status: RulesetStatus) -> Self {
        match status {
            RulesetStatus::FullyEnforced => Self::Full,
            RulesetStatus::PartiallyEnforced => Self::Partial,
            RulesetStatus::NotEnforced => Self::None,
        }
    }
}

/// The sandbox domain's ruleset, created but not yet entered.
pub fn sandbox_ruleset() -> Result<RulesetCreated, RulesetError> {
    // Listed one by one (never `from_all`), so a newer crate cannot widen the policy unreviewed.
    Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(handled())?
        .scope(Scope::AbstractUnixSocket | Scope::Signal)?
        .create()
}

/// Grants links and renames across directories beneath `root` (the sandbox's `/`, opened
/// after `pivot_root`): Landlock refuses every reparenting with `EXDEV` in a domain that does
/// not grant `Refer`, even one that does not handle it, which would break `mv`, `os.replace`
/// into another directory, package managers and `git`.
pub fn allow_reparenting(
    ruleset: RulesetCreated,
    root: impl AsFd,
) -> Result<RulesetCreated, RulesetError> {
    ruleset.add_rule(PathBeneath::new(root, AccessFs::Refer))
}

/// The exec sessions' ruleset as the descriptor the agent keeps (`None` without Landlock).
pub fn into_descriptor(ruleset: RulesetCreated) -> Option<OwnedFd> {
    ruleset.into()
}

/// Puts the calling thread (and everything it later creates) in `ruleset`'s domain. Needs
/// `no_new_privs`. Makes no allocation.
pub fn enter(ruleset: RulesetCreated) -> Result<Enforcement, RulesetError> {
    Ok(ruleset.restrict_self()?.ruleset.into())
}

/// A ruleset for the per-session domains: it handles device-node creation again (a ruleset
/// must handle something) and reparenting (granted beneath the root by
/// [`allow_reparenting`]) and adds nothing else; what matters is that entering it nests a new
/// domain.
pub fn exec_session_ruleset() -> Result<RulesetCreated, RulesetError> {
    Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(handled())?
        .create()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Forks and runs `child` in the child, which exits with the code it returns (13 for
    /// `None`); returns that exit code. `child` must only make system calls on memory
    /// prepared before the fork.
    fn in_forked_child(child: impl FnOnce() -> Option<i32>) -> i32 {
        // SAFETY: the child makes system calls on memory prepared before the fork, then exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let code = child().unwrap_or(13);
            // SAFETY: ends the forked child without the parent's cleanup.
            unsafe { libc::_exit(code) }
        }
        let mut status = 0;
        // SAFETY: waits for our own child into a live integer.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status), "{status:#x}");
        libc::WEXITSTATUS(status)
    }

    /// Forks; the child enters the sandbox domain and tries `mknod` of a character device in a
    /// fresh directory; returns the child's exit code (0: refused with EACCES).
    #[test]
    fn device_nodes_cannot_be_made_in_the_sandbox_domain() {
        let dir = tempfile::tempdir().unwrap();
        let node = std::ffi::CString::new(
            dir.path()
                .join("null")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .unwrap();
        let fifo = std::ffi::CString::new(
            dir.path()
                .join("fifo")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .unwrap();
        // Built before the fork: the child only makes system calls.
        let ruleset = sandbox_ruleset().unwrap();
        let code = in_forked_child(move || {
            rustix::thread::set_no_new_privs(true).ok()?;
            if enter(ruleset).ok()? != Enforcement::Full {
                return Some(10);
            }
            // SAFETY: NUL-terminated paths prepared before the fork.
            let rc =
                unsafe { libc::mknod(node.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) };
            let errno = std::io::Error::last_os_error().raw_os_error();
            if rc == 0 || errno != Some(libc::EACCES) {
                return Some(11);
            }
            // Other nodes stay allowed.
            // SAFETY: as above.
            let rc = unsafe { libc::mknod(fifo.as_ptr(), libc::S_IFIFO | 0o600, 0) };
            Some(if rc == 0 { 0 } else { 12 })
        });
        assert_eq!(code, 0);
    }

    /// Forks; the child enters both domains (granted `Refer` beneath `/`, as the init does)
    /// and renames and links a file across directories: both must work (without the grant
    /// Landlock answers EXDEV).
    #[test]
    fn renames_and_links_across_directories_stay_allowed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("a")).unwrap();
        std::fs::create_dir(dir.path().join("b")).unwrap();
        std::fs::write(dir.path().join("a/f"), b"x").unwrap();
        let path = |p: &str| {
            std::ffi::CString::new(dir.path().join(p).into_os_string().into_encoded_bytes())
                .unwrap()
        };
        let (from, to, link) = (path("a/f"), path("b/f"), path("a/g"));
        let root = std::fs::File::open("/").unwrap();
        let sandbox = allow_reparenting(sandbox_ruleset().unwrap(), &root).unwrap();
        let session = allow_reparenting(exec_session_ruleset().unwrap(), &root).unwrap();
        let code = in_forked_child(move || {
            rustix::thread::set_no_new_privs(true).ok()?;
            enter(sandbox).ok()?;
            enter(session).ok()?;
            // SAFETY: NUL-terminated paths prepared before the fork.
            if unsafe { libc::rename(from.as_ptr(), to.as_ptr()) } != 0 {
                return Some(11);
            }
            // SAFETY: as above.
            if unsafe { libc::link(to.as_ptr(), link.as_ptr()) } != 0 {
                return Some(12);
            }
            Some(0)
        });
        assert_eq!(code, 0);
    }

    #[test]
    fn the_exec_session_ruleset_is_a_descriptor() {
        assert!(into_descriptor(exec_session_ruleset().unwrap()).is_some());
    }
}
