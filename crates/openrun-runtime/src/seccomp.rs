//! The seccomp filter of every sandbox: the agent and every process it starts.
//!
//! The policy is reviewed data: the tables below, one group per reason. It is a denylist in the
//! spirit of Docker's default profile (which allows ~350 system calls and refuses the rest): the
//! sandbox's own user namespace already withholds most privileged operations (no capability
//! counts outside it), so the filter's job is to take away the kernel interfaces that stay
//! reachable *without* privilege and have been the way out of containers (keyrings, bpf,
//! userfaultfd, io_uring, perf, new user namespaces), plus, as a second wall, everything the
//! dropped capabilities already forbid (modules, mounts, time, reboot). Tighter than Docker where
//! an agent's programs have no use for the call (`name_to_handle_at`, `kcmp`, `AF_VSOCK`).
//!
//! Refused calls fail with `EPERM` (never a kill: a program that probes a feature must see an
//! error it can handle), except `clone3`, the x32 ABI and every number above
//! [`LAST_REVIEWED_SYSCALL`], which fail with `ENOSYS`, as if the kernel lacked them (a system
//! call added by a newer kernel is refused until someone reviews it and moves the constant): `clone3` passes its flags in memory a filter cannot read, so it is refused
//! whole and the C library falls back to `clone`, whose flags the filter checks (Docker does the
//! same). A system call of another architecture (the i386 `int 0x80` entry) kills the process:
//! those use other numbers, which this table does not cover.
//!
//! Kept on purpose: `ptrace` and `process_vm_readv/writev` (debuggers and `strace` must work;
//! the kernel checks them like ptrace, and each exec session is its own Landlock domain so only
//! a session's own processes are in reach, see `openrun_agent`'s spawn), `chroot` (the sandbox
//! root is the namespace's root: a chroot can only narrow the view, and build tools use it), and
//! `personality` for everything but the flags that weaken memory protections.

use std::collections::BTreeMap;

use seccompiler::{sock_filter, BpfProgram};

/// A group of system calls refused for one reason.
struct Group {
    /// Why they are refused (for reviewers; the tests check every group has one).
    #[cfg_attr(not(test), allow(dead_code))]
    why: &'static str,
    syscalls: &'static [i64],
}

/// System calls refused with `EPERM` whatever their arguments.
const DENIED: &[Group] = &[
    Group {
        why: "kernel keyrings are not namespaced: keys of the host and other sandboxes share one \
              kernel structure, a classic source of leaks and exploits",
        syscalls: &[libc::SYS_add_key, libc::SYS_keyctl, libc::SYS_request_key],
    },
    Group {
        why: "bpf programs, perf events and userfaultfd are large kernel attack surfaces (and \
              userfaultfd a favourite primitive to win kernel races); nothing in a sandbox needs \
              them",
        syscalls: &[
            libc::SYS_bpf,
            libc::SYS_perf_event_open,
            libc::SYS_userfaultfd,
        ],
    },
    Group {
        why: "io_uring performs its operations without passing through seccomp, and has been \
              the source of many kernel exploits (Docker refuses it too)",
        syscalls: &[
            libc::SYS_io_uring_setup,
            libc::SYS_io_uring_enter,
            libc::SYS_io_uring_register,
        ],
    },
    Group {
        why: "loading, replacing or removing kernel code (CAP_SYS_MODULE / CAP_SYS_BOOT are \
              dropped; refused here too)",
        syscalls: &[
            libc::SYS_kexec_load,
            libc::SYS_kexec_file_load,
            libc::SYS_init_module,
            libc::SYS_finit_module,
            libc::SYS_delete_module,
            174, // create_module (removed in Linux 2.6)
            177, // get_kernel_syms (removed in Linux 2.6)
            178, // query_module (removed in Linux 2.6)
            libc::SYS_uselib,
        ],
    },
    Group {
        why: "the mount table was assembled before the filter was installed: no mount, unmount, \
              move or new root afterwards (the new mount API included)",
        syscalls: &[
            libc::SYS_mount,
            libc::SYS_umount2,
            libc::SYS_pivot_root,
            libc::SYS_move_mount,
            libc::SYS_open_tree,
            467, // open_tree_attr (Linux 6.15)
            libc::SYS_fsopen,
            libc::SYS_fsmount,
            libc::SYS_fsconfig,
            libc::SYS_fspick,
            libc::SYS_mount_setattr,
        ],
    },
    Group {
        why: "file handles open files by inode number, around path checks (the 'shocker' escape \
              used open_by_handle_at); name_to_handle_at only feeds it",
        syscalls: &[libc::SYS_open_by_handle_at, libc::SYS_name_to_handle_at],
    },
    Group {
        why: "joining other namespaces (the sandbox's own are all it may see)",
        syscalls: &[libc::SYS_setns],
    },
    Group {
        why: "the clock is the host's: setting or slewing it is the host's business",
        syscalls: &[
            libc::SYS_settimeofday,
            libc::SYS_clock_settime,
            libc::SYS_clock_adjtime,
            libc::SYS_adjtimex,
        ],
    },
    Group {
        why: "the hostname is set once, to the sandbox id, by its init",
        syscalls: &[libc::SYS_sethostname, libc::SYS_setdomainname],
    },
    Group {
        why: "whole-machine controls: reboot, swap, process accounting, the kernel log, I/O \
              ports, quotas, the NFS server and the removed sysctl and dcookie calls",
        syscalls: &[
            libc::SYS_reboot,
            libc::SYS_swapon,
            libc::SYS_swapoff,
            libc::SYS_acct,
            libc::SYS_syslog,
            libc::SYS_iopl,
            libc::SYS_ioperm,
            libc::SYS_quotactl,
            libc::SYS_quotactl_fd,
            libc::SYS_nfsservctl,
            libc::SYS__sysctl,
            libc::SYS_lookup_dcookie,
            libc::SYS_vhangup,
            libc::SYS_ustat,
            libc::SYS_sysfs,
        ],
    },
    Group {
        why: "watching whole filesystems, comparing other processes' kernel objects, moving \
              other processes' memory between NUMA nodes: no use in a sandbox, more surface",
        syscalls: &[
            libc::SYS_fanotify_init,
            libc::SYS_kcmp,
            libc::SYS_move_pages,
            libc::SYS_migrate_pages,
        ],
    },
    Group {
        why: "secret memory is unmapped from the kernel's direct map: pages the host cannot \
              inspect, and a history of kernel bugs for a feature no agent needs",
        syscalls: &[libc::SYS_memfd_secret],
    },
];

/// The highest system call number reviewed for this table: `file_setattr` (469, Linux 6.17;
/// Linux 6.18 added none). Any higher number fails with `ENOSYS`, so a system call a newer
/// kernel adds stays refused until it is reviewed here and this constant moves.
const LAST_REVIEWED_SYSCALL: u32 = 469;

/// `ioctl` requests refused with `EPERM`: `TIOCSTI` pushes characters into a terminal's input
/// (into whatever shell reads it next; `dev.tty.legacy_tiocsti` may leave it on) and
/// `TIOCLINUX` drives the virtual console (its selection can be pasted the same way). The
/// kernel reads the request as an `unsigned int`, so the filter compares 32 bits.
const DENIED_IOCTLS: [u64; 2] = [0x5412, 0x541C];

/// Namespace flags of `clone` and `unshare`: a new user namespace is the door to most
/// unprivileged kernel exploits (it hands out capabilities over fresh namespaces), and the
/// others need it inside a sandbox anyway. Sandboxes cannot nest namespaces.
const NAMESPACE_FLAGS: [u64; 7] = [
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWCGROUP as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
];
/// `CLONE_NEWTIME`: only `unshare` takes it (in `clone`'s flags this bit is the exit signal).
const CLONE_NEWTIME: u64 = 0x80;

/// `personality` flags that switch off memory protections for the caller's next program:
/// readable means executable, and a mapping at address zero (kernel NULL-dereference exploits).
const UNSAFE_PERSONALITY: [u64; 2] = [0x0040_0000, 0x0010_0000];
/// `personality(0xffffffff)` only queries the current value.
const PERSONALITY_QUERY: u64 = 0xffff_ffff;

/// Address family of virtio sockets: not namespaced, they reach the hypervisor and the host
/// of a VM whatever the sandbox's network namespace (Docker refuses them too).
const AF_VSOCK: u64 = 40;

/// Bit set in system call numbers of the x32 ABI.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// The filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The policy does not fit classic BPF's 8-bit jump offsets (a bug in the tables above).
    #[error("the seccomp program is too large for its jumps ({0} instructions to skip)")]
    TooLarge(usize),
    /// The kernel refused the filter.
    #[error("cannot install the seccomp filter: {0}")]
    Install(#[source] seccompiler::Error),
}

/// `flags` as one mask of the low 32 bits of an argument; every flag must be one bit and lie
/// there (checked when the constants are evaluated: the program refuses a call when any bit
/// of the mask is set, which is "any of the flags" only for one-bit flags).
const fn low_mask(flags: &[u64]) -> u32 {
    let mut mask = 0u64;
    let mut i = 0;
    while i < flags.len() {
        assert!(flags[i].is_power_of_two(), "a flag of several bits");
        mask |= flags[i];
        i += 1;
    }
    assert!(mask <= u32::MAX as u64, "a flag above the low 32 bits");
    mask as u32
}

/// `value` as the low 32 bits it must be (checked when the constants are evaluated).
const fn low_word(value: u64) -> u32 {
    assert!(value <= u32::MAX as u64, "a value above the low 32 bits");
    value as u32
}

/// What refuses a system call for some arguments only. Each check reads the low 32 bits of one
/// argument, which hold all of it that matters: the kernel reads `ioctl`'s request,
/// `socket`'s family and `personality`'s value as 32-bit integers, and every namespace flag
/// of `clone` and `unshare` is below bit 32.
#[derive(Debug, Clone, Copy)]
enum ArgCheck {
    /// Refused when any bit of `mask` is set in argument `arg`.
    AnyBit { arg: u32, mask: u32 },
    /// Refused when argument `arg` is one of `values`.
    OneOf { arg: u32, values: &'static [u32] },
    /// Refused when argument `arg` is not `unless` and has any bit of `mask` set.
    AnyBitUnless { arg: u32, mask: u32, unless: u32 },
}

/// The system calls refused for some arguments only, from the tables above.
const CONDITIONAL: [(i64, ArgCheck); 5] = [
    (
        libc::SYS_clone,
        ArgCheck::AnyBit {
            arg: 0,
            mask: low_mask(&NAMESPACE_FLAGS),
        },
    ),
    (
        libc::SYS_unshare,
        ArgCheck::AnyBit {
            arg: 0,
            mask: low_mask(&NAMESPACE_FLAGS) | low_mask(&[CLONE_NEWTIME]),
        },
    ),
    (
        libc::SYS_personality,
        ArgCheck::AnyBitUnless {
            arg: 0,
            mask: low_mask(&UNSAFE_PERSONALITY),
            unless: low_word(PERSONALITY_QUERY),
        },
    ),
    (
        libc::SYS_ioctl,
        ArgCheck::OneOf {
            arg: 1,
            values: &[low_word(DENIED_IOCTLS[0]), low_word(DENIED_IOCTLS[1])],
        },
    ),
    (
        libc::SYS_socket,
        ArgCheck::OneOf {
            arg: 0,
            values: &[low_word(AF_VSOCK)],
        },
    ),
];

// Classic BPF, as in <linux/filter.h> and <linux/seccomp.h>.
/// `BPF_LD | BPF_W | BPF_ABS` (the first two are zero).
const BPF_LD_W_ABS: u16 = 0x20;
/// `BPF_JMP | BPF_JA`.
const BPF_JMP_JA: u16 = 0x05;
/// `BPF_JMP | BPF_JEQ | BPF_K`.
const BPF_JMP_JEQ_K: u16 = 0x05 | 0x10;
/// `BPF_JMP | BPF_JGE | BPF_K`.
const BPF_JMP_JGE_K: u16 = 0x05 | 0x30;
/// `BPF_JMP | BPF_JGT | BPF_K`.
const BPF_JMP_JGT_K: u16 = 0x05 | 0x20;
/// `BPF_JMP | BPF_JSET | BPF_K`.
const BPF_JMP_JSET_K: u16 = 0x05 | 0x40;
const BPF_RET_K: u16 = 0x06;
/// Offset of the system call number in `struct seccomp_data`.
const SECCOMP_DATA_NR: u32 = 0;
/// Offset of the architecture in `struct seccomp_data`.
const SECCOMP_DATA_ARCH: u32 = 4;
/// Offset of the low 32 bits of the first argument in `struct seccomp_data` (x86-64 is
/// little-endian; each argument takes 8 bytes).
const SECCOMP_DATA_ARGS: u32 = 16;
/// `AUDIT_ARCH_X86_64`: the only architecture the tables are written for.
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
/// `SECCOMP_RET_ALLOW`.
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const RET_EPERM: u32 = SECCOMP_RET_ERRNO | libc::EPERM as u32;

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// Instructions answering `ENOSYS` for unreviewed system call numbers (above
/// [`LAST_REVIEWED_SYSCALL`], which covers the x32 ones) and `clone3`, right after the
/// architecture check. They leave the system call number in the accumulator.
fn enosys_prelude() -> [sock_filter; 5] {
    const { assert!(X32_SYSCALL_BIT > LAST_REVIEWED_SYSCALL) };
    let enosys = SECCOMP_RET_ERRNO | libc::ENOSYS as u32;
    [
        stmt(BPF_LD_W_ABS, SECCOMP_DATA_NR),
        jump(BPF_JMP_JGT_K, LAST_REVIEWED_SYSCALL, 2, 0),
        jump(BPF_JMP_JEQ_K, libc::SYS_clone3 as u32, 1, 0),
        stmt(BPF_JMP_JA, 1),
        stmt(BPF_RET_K, enosys),
    ]
}

/// What the program answers for a run of system call numbers.
#[derive(Debug, Clone, Copy)]
enum Verdict {
    Allow,
    Deny,
    Check(ArgCheck),
}

/// System call numbers `0..=LAST_REVIEWED_SYSCALL` cut into runs with one verdict each: the
/// first number of each run, ascending. Neighbouring numbers allowed (or refused) alike share
/// a run; a conditional call is a run of its own.
fn runs() -> Vec<(u32, Verdict)> {
    let ruled: BTreeMap<u32, Verdict> = DENIED
        .iter()
        .flat_map(|group| group.syscalls.iter().map(|&nr| (nr as u32, Verdict::Deny)))
        .chain(
            CONDITIONAL
                .iter()
                .map(|&(nr, check)| (nr as u32, Verdict::Check(check))),
        )
        .collect();
    let mut runs: Vec<(u32, Verdict)> = Vec::new();
    let mut push = |first: u32, verdict: Verdict| match (runs.last(), verdict) {
        (Some((_, Verdict::Allow)), Verdict::Allow) | (Some((_, Verdict::Deny)), Verdict::Deny) => {
        }
        _ => runs.push((first, verdict)),
    };
    let mut next = 0;
    for (&nr, &verdict) in &ruled {
        if nr > next {
            push(next, Verdict::Allow);
        }
        push(nr, verdict);
        next = nr + 1;
    }
    if next <= LAST_REVIEWED_SYSCALL {
        push(next, Verdict::Allow);
    }
    runs
}

/// Appends the instructions of one verdict (the system call number in the accumulator).
fn emit_verdict(verdict: Verdict, out: &mut Vec<sock_filter>) -> Result<(), SeccompError> {
    let load = |arg: u32| stmt(BPF_LD_W_ABS, SECCOMP_DATA_ARGS + 8 * arg);
    match verdict {
        Verdict::Allow => out.push(stmt(BPF_RET_K, SECCOMP_RET_ALLOW)),
        Verdict::Deny => out.push(stmt(BPF_RET_K, RET_EPERM)),
        Verdict::Check(ArgCheck::AnyBit { arg, mask }) => out.extend([
            load(arg),
            jump(BPF_JMP_JSET_K, mask, 0, 1),
            stmt(BPF_RET_K, RET_EPERM),
            stmt(BPF_RET_K, SECCOMP_RET_ALLOW),
        ]),
        Verdict::Check(ArgCheck::OneOf { arg, values }) => {
            out.push(load(arg));
            // Each match jumps over the rest of the comparisons and the allow.
            for (i, &value) in values.iter().enumerate() {
                out.push(jump(BPF_JMP_JEQ_K, value, offset(values.len() - i)?, 0));
            }
            out.push(stmt(BPF_RET_K, SECCOMP_RET_ALLOW));
            out.push(stmt(BPF_RET_K, RET_EPERM));
        }
        Verdict::Check(ArgCheck::AnyBitUnless { arg, mask, unless }) => out.extend([
            load(arg),
            jump(BPF_JMP_JEQ_K, unless, 1, 0),
            jump(BPF_JMP_JSET_K, mask, 1, 0),
            stmt(BPF_RET_K, SECCOMP_RET_ALLOW),
            stmt(BPF_RET_K, RET_EPERM),
        ]),
    }
    Ok(())
}

/// A forward jump over `n` instructions: classic BPF has 8 bits for it.
fn offset(n: usize) -> Result<u8, SeccompError> {
    u8::try_from(n).map_err(|_| SeccompError::TooLarge(n))
}

/// Appends a binary search over `runs` (the system call number in the accumulator): each
/// inner node sends numbers from the first of its upper half on to that half, so every number
/// meets at most ceil(log2(runs)) comparisons before its verdict.
fn decide(runs: &[(u32, Verdict)], out: &mut Vec<sock_filter>) -> Result<(), SeccompError> {
    if let [(_, verdict)] = runs {
        return emit_verdict(*verdict, out);
    }
    let (lower, upper) = runs.split_at(runs.len() / 2);
    let Some(&(first_upper, _)) = upper.first() else {
        // Only an empty list gets here, and `runs` never makes one: refuse everything.
        out.push(stmt(BPF_RET_K, RET_EPERM));
        return Ok(());
    };
    let node = out.len();
    out.push(jump(BPF_JMP_JGE_K, first_upper, 0, 0));
    decide(lower, out)?;
    out[node].jt = offset(out.len() - node - 1)?;
    decide(upper, out)
}

/// The sandbox filter: what [`compile`] makes of the tables above, precompiled into
/// `seccomp/precompiled.rs` so that no create spends time on it. Debug builds compare the two
/// on every call, and a unit test in every build (`precompiled_program_is_the_compiled_policy`)
/// fails until the file is regenerated after a change of the tables, so it cannot drift from
/// them.
pub fn program() -> Result<BpfProgram, SeccompError> {
    let program: BpfProgram = precompiled::PROGRAM
        .iter()
        .map(|&(code, jt, jf, k)| sock_filter { code, jt, jf, k })
        .collect();
    if cfg!(debug_assertions) {
        assert!(
            compile()? == program,
            "seccomp/precompiled.rs is not the compiled policy: regenerate it (see \
             precompiled_program_is_the_compiled_policy)"
        );
    }
    Ok(program)
}

mod precompiled;

/// Compiles the sandbox filter from the tables above: the architecture check, the `ENOSYS`
/// prelude, then a binary search over runs of system call numbers.
///
/// Compact on purpose: the kernel verifies, translates and JIT-compiles the program at every
/// install, then runs each system call number through it to cache the ones it always allows,
/// all in time proportional to its length. seccompiler's linear program for the same tables
/// (538 instructions with the range fast path this replaced) took ~160 us to install, a few
/// instructions ~20 us. The tests check this program against seccompiler's on every system
/// call number and many arguments.
fn compile() -> Result<BpfProgram, SeccompError> {
    let mut program = vec![
        stmt(BPF_LD_W_ABS, SECCOMP_DATA_ARCH),
        jump(BPF_JMP_JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
        stmt(BPF_RET_K, libc::SECCOMP_RET_KILL_PROCESS),
    ];
    program.extend(enosys_prelude());
    decide(&runs(), &mut program)?;
    Ok(program)
}

/// Installs `program` on the calling thread (and every thread and process it creates later).
/// Needs `no_new_privs` (or CAP_SYS_ADMIN).
pub fn install(program: &BpfProgram) -> Result<(), SeccompError> {
    seccompiler::apply_filter(program).map_err(SeccompError::Install)
}

#[cfg(test)]
mod tests {
    use super::*;
    use seccompiler::{
        SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
        SeccompRule, TargetArch,
    };

    /// One rule per flag: the call matches when any of `flags` is set in argument `arg`.
    fn any_flag_rules(flags: impl IntoIterator<Item = u64>, arg: u8) -> Vec<SeccompRule> {
        flags
            .into_iter()
            .map(|flag| {
                SeccompRule::new(vec![SeccompCondition::new(
                    arg,
                    SeccompCmpArgLen::Qword,
                    SeccompCmpOp::MaskedEq(flag),
                    flag,
                )
                .unwrap()])
                .unwrap()
            })
            .collect()
    }

    /// The tables as seccompiler rules, written from the constants directly (not from
    /// [`CONDITIONAL`]): by system call number, each with the argument conditions of which
    /// any one must hold (none: always refused).
    fn rules() -> BTreeMap<i64, Vec<SeccompRule>> {
        let dword = |arg, op, value| {
            SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).unwrap()
        };
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> = DENIED
            .iter()
            .flat_map(|group| group.syscalls.iter().map(|&nr| (nr, Vec::new())))
            .collect();
        rules.insert(libc::SYS_clone, any_flag_rules(NAMESPACE_FLAGS, 0));
        rules.insert(
            libc::SYS_unshare,
            any_flag_rules(NAMESPACE_FLAGS.into_iter().chain([CLONE_NEWTIME]), 0),
        );
        let personality = UNSAFE_PERSONALITY
            .iter()
            .map(|&flag| {
                SeccompRule::new(vec![
                    dword(0, SeccompCmpOp::Ne, PERSONALITY_QUERY),
                    dword(0, SeccompCmpOp::MaskedEq(flag), flag),
                ])
                .unwrap()
            })
            .collect();
        rules.insert(libc::SYS_personality, personality);
        let ioctls = DENIED_IOCTLS
            .iter()
            .map(|&request| SeccompRule::new(vec![dword(1, SeccompCmpOp::Eq, request)]).unwrap())
            .collect();
        rules.insert(libc::SYS_ioctl, ioctls);
        rules.insert(
            libc::SYS_socket,
            vec![SeccompRule::new(vec![dword(0, SeccompCmpOp::Eq, AF_VSOCK)]).unwrap()],
        );
        rules
    }

    /// Length of seccompiler's architecture check at the head of every program it compiles
    /// (load the arch, compare, kill on mismatch).
    const ARCH_CHECK_LEN: usize = 3;

    /// The policy as seccompiler compiles it (one linear chain), with the ENOSYS prelude
    /// after its architecture check: the reference [`compile`] must agree with. The prelude
    /// goes after the architecture check, whose jumps stay inside it, and before the rest,
    /// whose jumps are relative to their own instructions: no offset changes.
    fn reference() -> BpfProgram {
        let filter = SeccompFilter::new(
            rules(),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EPERM as u32),
            TargetArch::x86_64,
        )
        .unwrap();
        let mut program: BpfProgram = filter.try_into().unwrap();
        let tail = program.split_off(ARCH_CHECK_LEN);
        program.extend(enosys_prelude());
        program.extend(tail);
        program
    }

    /// The precompiled program is the compiled policy. After a change of the tables, write
    /// the new one with `OPENRUN_WRITE_SECCOMP_PROGRAM=1 cargo test -p openrun-runtime --lib
    /// precompiled_program_is_the_compiled_policy` (and review the diff with the tables').
    #[test]
    fn precompiled_program_is_the_compiled_policy() {
        let compiled = compile().unwrap();
        let precompiled: Vec<_> = precompiled::PROGRAM
            .iter()
            .map(|&(code, jt, jf, k)| sock_filter { code, jt, jf, k })
            .collect();
        if compiled == precompiled {
            return;
        }
        if std::env::var_os("OPENRUN_WRITE_SECCOMP_PROGRAM").is_some() {
            let mut text = String::from(
                "//! The sandbox's seccomp program as `super::compile` makes it from the tables \
                 of\n//! `seccomp.rs`: (code, jt, jf, k) per classic BPF instruction. Generated \
                 by the test\n//! `precompiled_program_is_the_compiled_policy`; do not edit.\n\n\
                 #[rustfmt::skip]\npub(super) const PROGRAM: &[(u16, u8, u8, u32)] = &[\n",
            );
            for i in &compiled {
                text.push_str(&format!(
                    "    ({:#06x}, {}, {}, {:#010x}),\n",
                    i.code, i.jt, i.jf, i.k
                ));
            }
            text.push_str("];\n");
            let path = concat!(env!("CARGO_MANIFEST_DIR"), "/src/seccomp/precompiled.rs");
            std::fs::write(path, text).unwrap();
            return;
        }
        panic!(
            "seccomp/precompiled.rs is not the compiled policy ({} vs {} instructions): \
             regenerate it with OPENRUN_WRITE_SECCOMP_PROGRAM=1 (see this test's comment)",
            precompiled.len(),
            compiled.len()
        );
    }

    #[test]
    fn the_program_is_the_arch_check_the_enosys_prelude_then_a_short_search() {
        let program = program().unwrap();
        assert_eq!(program[0], stmt(BPF_LD_W_ABS, SECCOMP_DATA_ARCH));
        assert_eq!(program[1], jump(BPF_JMP_JEQ_K, AUDIT_ARCH_X86_64, 1, 0));
        assert_eq!(program[2], stmt(BPF_RET_K, libc::SECCOMP_RET_KILL_PROCESS));
        assert_eq!(&program[3..8], &enosys_prelude());
        // Its install cost grows with its length (see `compile`): a few runs per refused
        // group, nothing like seccompiler's 538 instructions.
        assert!(program.len() < 200, "{} instructions", program.len());
        assert!(reference().len() > 2 * program.len());
    }

    /// Runs a classic BPF seccomp program (the instructions seccompiler and this module emit)
    /// on `(nr, arch, args)`.
    fn run(program: &[sock_filter], nr: u32, arch: u32, args: [u64; 6]) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_ne_bytes());
        data[4..8].copy_from_slice(&arch.to_ne_bytes());
        for (i, a) in args.iter().enumerate() {
            data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_ne_bytes());
        }
        let (mut acc, mut pc) = (0u32, 0usize);
        loop {
            let i = &program[pc];
            pc += 1;
            let k = i.k;
            let (jt, jf) = (usize::from(i.jt), usize::from(i.jf));
            match i.code {
                BPF_LD_W_ABS => {
                    let at = k as usize;
                    acc = u32::from_ne_bytes(data[at..at + 4].try_into().unwrap());
                }
                0x54 => acc &= k,
                BPF_JMP_JA => pc += k as usize,
                BPF_JMP_JEQ_K => pc += if acc == k { jt } else { jf },
                BPF_JMP_JGE_K => pc += if acc >= k { jt } else { jf },
                BPF_JMP_JGT_K => pc += if acc > k { jt } else { jf },
                BPF_JMP_JSET_K => pc += if acc & k != 0 { jt } else { jf },
                BPF_RET_K => return k,
                other => panic!("unexpected instruction {other:#x}"),
            }
        }
    }

    /// Argument sets for comparing verdicts: every flag and value the tables name, alone, with
    /// neighbours and with high bits, the extremes, and a spread of pseudo-random ones.
    fn argument_sets() -> Vec<[u64; 6]> {
        let mut values: Vec<u64> = vec![0, 1, u64::MAX, 0xffff_ffff, 1 << 32, 0x11];
        values.extend(NAMESPACE_FLAGS);
        values.extend([CLONE_NEWTIME, PERSONALITY_QUERY, AF_VSOCK, AF_VSOCK + 1]);
        values.extend(UNSAFE_PERSONALITY);
        values.extend(DENIED_IOCTLS);
        values.extend(DENIED_IOCTLS.map(|r| r + 1));
        values.push(NAMESPACE_FLAGS.iter().fold(0, |a, f| a | f));
        values.push(UNSAFE_PERSONALITY[0] | UNSAFE_PERSONALITY[1]);
        values.push(PERSONALITY_QUERY | UNSAFE_PERSONALITY[0] << 32);
        let with_high: Vec<u64> = values.iter().map(|v| v | 0xdead_0000_0000_0000).collect();
        values.extend(with_high);
        let mut sets: Vec<[u64; 6]> = Vec::new();
        for &v in &values {
            sets.push([v, 0, 0, 0, 0, 0]);
            sets.push([0, v, 0, 0, 0, 0]);
            sets.push([v; 6]);
        }
        // xorshift64: fixed seed, so a failure repeats.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..64 {
            let mut set = [0u64; 6];
            for a in &mut set {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Keep some small ones: most flags live in the low bits.
                *a = if x.is_multiple_of(3) {
                    x & 0xffff_ffff
                } else {
                    x
                };
            }
            sets.push(set);
        }
        sets
    }

    #[test]
    fn the_program_agrees_with_seccompilers_on_every_call() {
        let with = program().unwrap();
        let reference = reference();
        let arch = AUDIT_ARCH_X86_64;
        let eperm = RET_EPERM;
        let sets = argument_sets();
        let mut denied = 0;
        for nr in (0..1024).chain([
            X32_SYSCALL_BIT,
            X32_SYSCALL_BIT + libc::SYS_clone as u32,
            u32::MAX,
        ]) {
            for &args in &sets {
                let verdict = run(&with, nr, arch, args);
                assert_eq!(
                    verdict,
                    run(&reference, nr, arch, args),
                    "syscall {nr}, args {args:x?}"
                );
                denied += usize::from(verdict == eperm);
            }
        }
        // Another architecture is killed by both.
        assert_eq!(
            run(&with, 0, 0x4000_0003, [0; 6]),
            run(&reference, 0, 0x4000_0003, [0; 6])
        );
        // Every unconditional denial, for each argument set, and a few more.
        let unconditional: usize = DENIED.iter().map(|g| g.syscalls.len()).sum();
        assert!(denied > sets.len() * unconditional, "{denied}");
        assert_eq!(
            run(&with, libc::SYS_read as u32, arch, [0; 6]),
            SECCOMP_RET_ALLOW
        );
        assert_eq!(run(&with, libc::SYS_keyctl as u32, arch, [0; 6]), eperm);
        // ioctl: refused for the two requests only, compared on 32 bits as the kernel does.
        let ioctl = libc::SYS_ioctl as u32;
        assert_eq!(run(&with, ioctl, arch, [0, 0x5412, 0, 0, 0, 0]), eperm);
        assert_eq!(
            run(&with, ioctl, arch, [0, 0x1_0000_541c, 0, 0, 0, 0]),
            eperm
        );
        assert_eq!(
            run(&with, ioctl, arch, [0, 0x5413, 0, 0, 0, 0]),
            SECCOMP_RET_ALLOW
        );
        // clone3, unreviewed numbers, and the x32 ABI: ENOSYS.
        let enosys = SECCOMP_RET_ERRNO | libc::ENOSYS as u32;
        assert_eq!(run(&with, libc::SYS_clone3 as u32, arch, [0; 6]), enosys);
        assert_ne!(run(&with, LAST_REVIEWED_SYSCALL, arch, [0; 6]), enosys);
        assert_eq!(run(&with, LAST_REVIEWED_SYSCALL + 1, arch, [0; 6]), enosys);
        assert_eq!(run(&with, X32_SYSCALL_BIT + 1, arch, [0; 6]), enosys);
        assert_eq!(run(&with, u32::MAX, arch, [0; 6]), enosys);
        // Another architecture is killed.
        assert_eq!(
            run(&with, 0, 0x4000_0003, [0; 6]),
            libc::SECCOMP_RET_KILL_PROCESS
        );
    }

    /// Whether the program decides system call `nr` without reading its arguments, by the
    /// rules of the kernel's seccomp action cache (`seccomp_is_const_allow`): it emulates loads
    /// of the number and architecture, constant jumps, `AND` and returns, and gives up on
    /// anything else. `Some(verdict)` when it reaches one that way.
    fn constant_verdict(program: &[sock_filter], nr: u32) -> Option<u32> {
        let mut acc = 0u32;
        let mut pc = 0usize;
        while let Some(i) = program.get(pc) {
            pc += 1;
            let (jt, jf) = (usize::from(i.jt), usize::from(i.jf));
            match i.code {
                BPF_LD_W_ABS if i.k == SECCOMP_DATA_NR => acc = nr,
                BPF_LD_W_ABS if i.k == SECCOMP_DATA_ARCH => acc = AUDIT_ARCH_X86_64,
                BPF_LD_W_ABS => return None,
                0x54 => acc &= i.k,
                BPF_JMP_JA => pc += i.k as usize,
                BPF_JMP_JEQ_K => pc += if acc == i.k { jt } else { jf },
                BPF_JMP_JGE_K => pc += if acc >= i.k { jt } else { jf },
                BPF_JMP_JGT_K => pc += if acc > i.k { jt } else { jf },
                BPF_JMP_JSET_K => pc += if acc & i.k != 0 { jt } else { jf },
                BPF_RET_K => return Some(i.k),
                _ => return None,
            }
        }
        None
    }

    /// The kernel caches every system call the program always allows and then skips the
    /// filter for it: only the five calls refused for some arguments may read them.
    #[test]
    fn only_the_conditional_calls_read_arguments() {
        let program = program().unwrap();
        let conditional: Vec<u32> = CONDITIONAL.iter().map(|&(nr, _)| nr as u32).collect();
        let mut allowed = 0;
        for nr in 0..=LAST_REVIEWED_SYSCALL {
            let verdict = constant_verdict(&program, nr);
            assert_eq!(verdict.is_none(), conditional.contains(&nr), "syscall {nr}");
            allowed += usize::from(verdict == Some(SECCOMP_RET_ALLOW));
        }
        assert!(allowed > 350, "{allowed}");
    }

    #[test]
    fn every_denied_syscall_is_listed_once() {
        let mut seen = std::collections::BTreeSet::new();
        for group in DENIED {
            assert!(!group.why.is_empty());
            for nr in group.syscalls {
                assert!(seen.insert(*nr), "syscall {nr} is listed twice");
            }
        }
        for conditional in [
            libc::SYS_clone,
            libc::SYS_unshare,
            libc::SYS_personality,
            libc::SYS_socket,
            libc::SYS_clone3,
            libc::SYS_ioctl,
        ] {
            assert!(!seen.contains(&conditional), "{conditional}");
        }
        // What must stay allowed.
        for allowed in [
            libc::SYS_ptrace,
            libc::SYS_chroot,
            libc::SYS_process_vm_readv,
            libc::SYS_execve,
            libc::SYS_landlock_restrict_self,
            libc::SYS_seccomp,
        ] {
            assert!(!seen.contains(&allowed), "{allowed}");
        }
    }

    /// Runs `check` in a forked child that installed the filter; returns its exit code.
    /// The child only makes raw system calls (the test harness has other threads).
    fn in_filtered_child(check: fn() -> i32) -> i32 {
        let program = program().unwrap();
        // SAFETY: the child makes raw system calls only, then `_exit`s; the filter program was
        // built before the fork.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let code = match rustix::thread::set_no_new_privs(true)
                .ok()
                .and_then(|()| install(&program).ok())
            {
                Some(()) => check(),
                None => 100,
            };
            // SAFETY: ends the forked child without running the parent's Rust code.
            unsafe { libc::_exit(code) }
        }
        let mut status = 0;
        // SAFETY: waits for our own child into a live integer.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status), "child status {status:#x}");
        libc::WEXITSTATUS(status)
    }

    fn errno() -> i32 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }

    /// 0 when `nr` with these arguments fails with `expected`, else 1 + the observed errno.
    fn expect_errno(nr: i64, args: [u64; 3], expected: i32) -> i32 {
        // SAFETY: the calls checked here fail before touching memory, or take only integers.
        let rc = unsafe { libc::syscall(nr, args[0], args[1], args[2]) };
        if rc == -1 && errno() == expected {
            0
        } else if rc == -1 {
            1 + errno()
        } else {
            1
        }
    }

    #[test]
    fn denied_calls_fail_with_eperm_and_clone3_with_enosys() {
        assert_eq!(
            in_filtered_child(|| expect_errno(libc::SYS_keyctl, [0, 0, 0], libc::EPERM)),
            0
        );
        assert_eq!(
            in_filtered_child(|| expect_errno(libc::SYS_bpf, [0, 0, 0], libc::EPERM)),
            0
        );
        assert_eq!(
            in_filtered_child(|| expect_errno(libc::SYS_userfaultfd, [0, 0, 0], libc::EPERM)),
            0
        );
        assert_eq!(
            in_filtered_child(|| expect_errno(
                libc::SYS_unshare,
                [libc::CLONE_NEWUSER as u64, 0, 0],
                libc::EPERM
            )),
            0
        );
        assert_eq!(
            in_filtered_child(|| expect_errno(libc::SYS_clone3, [0, 0, 0], libc::ENOSYS)),
            0
        );
        assert_eq!(
            in_filtered_child(|| expect_errno(
                libc::SYS_socket,
                [AF_VSOCK, libc::SOCK_STREAM as u64, 0],
                libc::EPERM
            )),
            0
        );
        assert_eq!(
            in_filtered_child(|| expect_errno(
                u64::from(X32_SYSCALL_BIT) as i64 + libc::SYS_getpid,
                [0, 0, 0],
                libc::ENOSYS
            )),
            0
        );
        assert_eq!(
            in_filtered_child(|| expect_errno(
                libc::SYS_personality,
                [0x0040_0000, 0, 0],
                libc::EPERM
            )),
            0
        );
        assert_eq!(
            in_filtered_child(|| expect_errno(libc::SYS_memfd_secret, [0, 0, 0], libc::EPERM)),
            0
        );
        assert_eq!(
            in_filtered_child(|| expect_errno(
                i64::from(LAST_REVIEWED_SYSCALL) + 1,
                [0, 0, 0],
                libc::ENOSYS
            )),
            0
        );
        // TIOCSTI on a descriptor that is no terminal: refused before the kernel looks at it.
        assert_eq!(
            in_filtered_child(|| expect_errno(libc::SYS_ioctl, [0, 0x5412, 0], libc::EPERM)),
            0
        );
    }

    #[test]
    fn ordinary_calls_still_work_under_the_filter() {
        // unshare without namespace flags, personality queries, fork, ordinary sockets.
        assert_eq!(
            in_filtered_child(|| {
                // SAFETY: integer-only system calls.
                unsafe {
                    if libc::syscall(libc::SYS_unshare, libc::CLONE_FILES) != 0 {
                        return 2;
                    }
                    if libc::syscall(libc::SYS_personality, PERSONALITY_QUERY) == -1 {
                        return 3;
                    }
                    let fd = libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0);
                    if fd < 0 {
                        return 4;
                    }
                    libc::close(fd as i32);
                    let pid = libc::syscall(libc::SYS_fork);
                    if pid == 0 {
                        libc::_exit(7);
                    }
                    if pid < 0 {
                        return 5;
                    }
                    let mut status = 0;
                    libc::waitpid(pid as i32, &mut status, 0);
                    if libc::WEXITSTATUS(status) != 7 {
                        return 6;
                    }
                    if libc::getpid() <= 0 {
                        return 8;
                    }
                }
                0
            }),
            0
        );
    }
}
