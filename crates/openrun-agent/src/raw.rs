//! Raw system calls for code that runs in another process's memory: a `CLONE_VM` child
//! (the agent's command starts, `openrun run`'s cleaner) shares its creator's thread pointer,
//! so it must not touch `errno` (a thread-local of the creator's thread) or anything else of
//! the C library's. These return the kernel's answer and never do; rustix's calls (whose
//! Linux backend makes system calls directly) are usable too.

use std::ffi::c_void;
use std::ptr;

use rustix::io::Errno;

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn syscall4(nr: libc::c_long, a: usize, b: usize, c: usize, d: usize) -> isize {
    let ret: isize;
    // SAFETY: the x86-64 Linux system call convention: number in rax,
    // arguments in rdi, rsi, rdx, r10; the kernel clobbers rcx and r11 and nothing else,
    // and does not use the user stack. What the call does with memory is the caller's
    // responsibility (each wrapper below documents it).
    unsafe {
        core::arch::asm!(
            "syscall",
            inlateout("rax") nr as isize => ret,
            in("rdi") a,
            in("rsi") b,
            in("rdx") c,
            in("r10") d,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

#[cfg(target_arch = "aarch64")]
#[inline(always)]
unsafe fn syscall4(nr: libc::c_long, a: usize, b: usize, c: usize, d: usize) -> isize {
    let ret: isize;
    // SAFETY: the AArch64 Linux system call convention: number in x8,
    // arguments in x0-x3, result in x0; nothing else is clobbered and the stack is not
    // used.
    unsafe {
        core::arch::asm!(
            "svc 0",
            in("x8") nr,
            inlateout("x0") a as isize => ret,
            in("x1") b,
            in("x2") c,
            in("x3") d,
            options(nostack),
        );
    }
    ret
}

fn result(ret: isize) -> Result<usize, Errno> {
    if (-4095..0).contains(&ret) {
        Err(Errno::from_raw_os_error(-ret as i32))
    } else {
        Ok(ret as usize)
    }
}

/// Sets `sig`'s disposition to the default (`SIG_DFL`, no flags, empty mask), also for the
/// two real-time signals the C library reserves (its wrapper refuses those).
pub fn default_disposition(sig: i32) -> Result<(), Errno> {
    // An all-zero kernel `struct sigaction` is SIG_DFL; 32 bytes cover it on every
    // architecture (handler, flags, restorer, 8-byte mask).
    let action = [0u64; 4];
    // SAFETY: the kernel reads the action from a live 32-byte buffer and writes nothing
    // (no old-action pointer); the mask size is the kernel's 8 bytes.
    result(unsafe {
        syscall4(
            libc::SYS_rt_sigaction,
            sig as usize,
            action.as_ptr() as usize,
            0,
            8,
        )
    })
    .map(|_| ())
}

/// Unblocks every signal of the calling thread.
pub fn unblock_all_signals() -> Result<(), Errno> {
    set_signal_mask(0).map(|_| ())
}

/// Sets the calling thread's blocked signals to `mask` (bit `n - 1` for signal `n`, the
/// kernel's 64-bit set: unlike the C library's wrapper, also the two real-time signals it
/// reserves) and returns the previous mask.
pub fn set_signal_mask(mask: u64) -> Result<u64, Errno> {
    let mut old = 0u64;
    // SAFETY: the kernel reads an 8-byte mask from a live value and writes the old one into
    // another live 8-byte value.
    result(unsafe {
        syscall4(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK as usize,
            ptr::addr_of!(mask) as usize,
            ptr::addr_of_mut!(old) as usize,
            8,
        )
    })
    .map(|_| old)
}

/// `landlock_restrict_self(ruleset, 0)`.
pub fn landlock_restrict_self(ruleset: i32) -> Result<(), Errno> {
    // SAFETY: takes a descriptor number and flags; no memory.
    result(unsafe { syscall4(libc::SYS_landlock_restrict_self, ruleset as usize, 0, 0, 0) })
        .map(|_| ())
}

/// `close_range(first, last, 0)`.
pub fn close_range(first: u32, last: u32) -> Result<(), Errno> {
    // SAFETY: closes descriptors of the calling process only; no memory.
    result(unsafe { syscall4(libc::SYS_close_range, first as usize, last as usize, 0, 0) })
        .map(|_| ())
}

/// Closes every descriptor above stderr except those in `keep` (sorted in place), with
/// `close_range`, or one by one below `fd_limit` on kernels before 5.9. Allocates nothing.
pub fn close_all_except(keep: &mut [i32], fd_limit: u32) {
    keep.sort_unstable();
    let mut next = 3u32;
    for &fd in keep.iter() {
        let Ok(fd) = u32::try_from(fd) else { continue };
        if fd > next {
            close_span(next, fd - 1, fd_limit);
        }
        next = next.max(fd.saturating_add(1));
    }
    close_span(next, u32::MAX, fd_limit);
}

fn close_span(first: u32, last: u32, fd_limit: u32) {
    if first > last || close_range(first, last).is_ok() {
        return;
    }
    for fd in first..=last.min(fd_limit.saturating_sub(1)) {
        close(fd as i32);
    }
}

/// `close(fd)`, result ignored.
pub fn close(fd: i32) {
    // SAFETY: closes one descriptor of the calling process; no memory.
    let _ = unsafe { syscall4(libc::SYS_close, fd as usize, 0, 0, 0) };
}

/// `execve`; returns only on failure.
///
/// # Safety
/// `path` must be a NUL-terminated string and `argv`, `envp` NULL-terminated arrays of
/// NUL-terminated strings, all alive for the call.
pub unsafe fn execve(
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
) -> Errno {
    // SAFETY: the kernel only reads the strings and arrays, valid per the contract.
    match result(unsafe {
        syscall4(
            libc::SYS_execve,
            path as usize,
            argv as usize,
            envp as usize,
            0,
        )
    }) {
        Err(e) => e,
        // execve does not return on success.
        Ok(_) => Errno::NOEXEC,
    }
}

/// Ends the calling process with `code`.
pub fn exit(code: i32) -> ! {
    loop {
        // SAFETY: exit_group takes an integer and does not return.
        unsafe {
            syscall4(libc::SYS_exit_group, code as usize, 0, 0, 0);
        }
    }
}

/// Stops the calling process (`kill(getpid(), SIGSTOP)`), for tests of the watchdog.
#[cfg(test)]
pub fn stop_self() {
    // SAFETY: getpid and kill take and return integers only.
    unsafe {
        let pid = syscall4(libc::SYS_getpid, 0, 0, 0, 0);
        syscall4(libc::SYS_kill, pid as usize, libc::SIGSTOP as usize, 0, 0);
    }
}

/// A stack for a `CLONE_VM` child: a private mapping with an inaccessible guard below it, so
/// an overflow faults instead of writing into whatever lies below. Pages are only backed once
/// touched. Never unmapped: a child may run on it until it exits.
#[derive(Debug)]
pub struct Stack {
    base: *mut c_void,
    len: usize,
}

// SAFETY: the mapping belongs to no thread; its users (one child at a time) are the owner's
// to serialise.
unsafe impl Send for Stack {}

impl Stack {
    /// Maps `size` usable bytes above a `guard` of inaccessible ones (both page multiples).
    pub fn new(size: usize, guard: usize) -> Result<Self, Errno> {
        let len = size + guard;
        // SAFETY: a new private anonymous mapping; no existing memory is affected.
        let base = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(Errno::NOMEM);
        }
        // The lowest pages become the guard (stacks grow down).
        // SAFETY: changes the protection of the start of the mapping made just above.
        if unsafe { libc::mprotect(base, guard, libc::PROT_NONE) } != 0 {
            // SAFETY: unmaps the mapping made above, which nothing refers to.
            unsafe {
                libc::munmap(base, len);
            }
            return Err(Errno::NOMEM);
        }
        Ok(Self { base, len })
    }

    /// One past the end of the mapping: a child's initial stack pointer.
    pub fn top(&self) -> *mut c_void {
        // SAFETY: one past the end of the mapping, which is allowed for a pointer.
        unsafe { self.base.cast::<u8>().add(self.len).cast() }
    }
}
