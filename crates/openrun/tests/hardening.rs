//! The syscall and kernel surface of a sandbox, proven on real sandboxes: the seccomp filter
//! (what it refuses and that ordinary programs still run), the Landlock domains (no device
//! nodes, exec sessions that cannot trace each other), the masked and read-only parts of
//! `/proc` and `/sys`, and the capability set.
//!
//! Probes are small C programs compiled inside the sandbox with the host image's `gcc`: they
//! call the system calls directly, so the test sees exactly what the kernel answered.

mod common;
use common::*;
use serde_json::json;

/// Compiles `source` inside the sandbox `id` to `/tmp/<name>` (the sandbox's own `/tmp`).
fn compile(env: &Env, id: &str, name: &str, source: &str) {
    let script = format!(
        "cat > /tmp/{name}.c <<'EOF'\n{source}\nEOF\ngcc -O0 -pthread -o /tmp/{name} /tmp/{name}.c"
    );
    let out = env.exec_sh(id, &script);
    assert_ok(&out);
}

/// Lines `name result` printed by a probe, as pairs.
fn results(out: &str) -> std::collections::BTreeMap<String, String> {
    out.lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

const SYSCALL_PROBE: &str = r#"
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

static const char *err(long rc) {
    static char buf[64];
    if (rc >= 0) return "ok";
    snprintf(buf, sizeof buf, "%s", strerrorname_np(errno));
    return buf;
}
#define PROBE(name, call) do { errno = 0; long rc = (call); printf("%s %s\n", name, err(rc)); } while (0)

static void *thread_main(void *arg) { return arg; }

int main(void) {
    PROBE("keyctl", syscall(SYS_keyctl, 0 /* KEYCTL_GET_KEYRING_ID */, -3, 0));
    PROBE("add_key", syscall(SYS_add_key, "user", "probe", "x", 1, -3));
    PROBE("request_key", syscall(SYS_request_key, "user", "probe", NULL, 0));
    PROBE("bpf", syscall(SYS_bpf, 0, NULL, 0));
    PROBE("perf_event_open", syscall(SYS_perf_event_open, NULL, 0, -1, -1, 0));
    PROBE("userfaultfd", syscall(SYS_userfaultfd, 0));
    PROBE("io_uring_setup", syscall(SYS_io_uring_setup, 1, NULL));
    PROBE("mount", mount("none", "/mnt", "tmpfs", 0, NULL));
    PROBE("umount2", umount2("/proc", MNT_DETACH));
    PROBE("pivot_root", syscall(SYS_pivot_root, "/tmp", "/tmp"));
    PROBE("fsopen", syscall(SYS_fsopen, "tmpfs", 0));
    PROBE("open_tree", syscall(SYS_open_tree, AT_FDCWD, "/tmp", 1 /* OPEN_TREE_CLONE */));
    PROBE("unshare_user", unshare(CLONE_NEWUSER));
    PROBE("unshare_net", unshare(CLONE_NEWNET));
    PROBE("clone_newuser", syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0));
    PROBE("setns", setns(0, 0));
    PROBE("clone3", syscall(SYS_clone3, NULL, 0));
    PROBE("open_by_handle_at", syscall(SYS_open_by_handle_at, AT_FDCWD, NULL, 0));
    PROBE("kexec_load", syscall(SYS_kexec_load, 0, 0, NULL, 0));
    PROBE("init_module", syscall(SYS_init_module, NULL, 0, ""));
    PROBE("settimeofday", syscall(SYS_settimeofday, NULL, NULL));
    PROBE("clock_settime", syscall(SYS_clock_settime, 0, NULL));
    PROBE("sethostname", sethostname("evil", 4));
    PROBE("syslog", syscall(SYS_syslog, 10 /* SYSLOG_ACTION_SIZE_BUFFER */, NULL, 0));
    PROBE("vsock", socket(40 /* AF_VSOCK */, SOCK_STREAM, 0));
    PROBE("raw_socket", socket(AF_INET, SOCK_RAW, 1 /* IPPROTO_ICMP */));
    PROBE("packet_socket", socket(17 /* AF_PACKET */, SOCK_RAW, 0));
    PROBE("ping_socket", socket(AF_INET, SOCK_DGRAM, 1 /* IPPROTO_ICMP */));
    PROBE("personality_query", syscall(SYS_personality, 0xffffffff));
    PROBE("personality_exec", syscall(SYS_personality, 0x0400000 /* READ_IMPLIES_EXEC */));
    PROBE("chroot", chroot("/"));
    PROBE("memfd_secret", syscall(447 /* SYS_memfd_secret */, 0));
    PROBE("unreviewed_470", syscall(470, 0, 0, 0));
    PROBE("unreviewed_1000", syscall(1000, 0, 0, 0));
    /* Terminal injection: TIOCSTI / TIOCLINUX refused on a real pty; other tty ioctls work. */
    int master = posix_openpt(O_RDWR | O_NOCTTY);
    if (master < 0 || grantpt(master) || unlockpt(master)) { printf("pty failed\n"); return 1; }
    int slave = open(ptsname(master), O_RDWR | O_NOCTTY);
    char c = 'x';
    PROBE("tiocsti", ioctl(slave, TIOCSTI, &c));
    PROBE("tiocsti_master", ioctl(master, TIOCSTI, &c));
    char sub = 11; /* TIOCL_GETSHIFTSTATE */
    PROBE("tioclinux", ioctl(slave, TIOCLINUX, &sub));
    struct winsize ws;
    PROBE("tiocgwinsz", ioctl(slave, TIOCGWINSZ, &ws));
    /* clone3 refused with ENOSYS: the C library falls back to clone for threads and forks. */
    pthread_t t;
    printf("pthread_create %s\n", pthread_create(&t, NULL, thread_main, NULL) == 0 ? "ok" : "failed");
    pthread_join(t, NULL);
    pid_t pid = fork();
    if (pid == 0) _exit(3);
    int status = 0;
    waitpid(pid, &status, 0);
    printf("fork %s\n", WIFEXITED(status) && WEXITSTATUS(status) == 3 ? "ok" : "failed");
    return 0;
}
"#;

#[test]
fn seccomp_refuses_the_kernel_interfaces_agents_do_not_need() {
    let env = Env::new();
    let id = env.create(&[]);
    compile(&env, &id, "probe", SYSCALL_PROBE);
    let out = env.exec_sh(&id, "/tmp/probe");
    assert_ok(&out);
    let got = results(&stdout(&out));
    let expect = |name: &str, want: &str| {
        assert_eq!(
            got.get(name).map(String::as_str),
            Some(want),
            "{name}: {got:?}"
        )
    };
    for name in [
        "keyctl",
        "add_key",
        "request_key",
        "bpf",
        "perf_event_open",
        "userfaultfd",
        "io_uring_setup",
        "mount",
        "umount2",
        "pivot_root",
        "fsopen",
        "open_tree",
        "unshare_user",
        "unshare_net",
        "clone_newuser",
        "setns",
        "open_by_handle_at",
        "kexec_load",
        "init_module",
        "settimeofday",
        "clock_settime",
        "sethostname",
        "syslog",
        "vsock",
        "personality_exec",
        "memfd_secret",
        "tiocsti",
        "tiocsti_master",
        "tioclinux",
    ] {
        expect(name, "EPERM");
    }
    expect("clone3", "ENOSYS");
    // Numbers above the last reviewed system call (469): refused as if the kernel lacked them.
    expect("unreviewed_470", "ENOSYS");
    expect("unreviewed_1000", "ENOSYS");
    expect("tiocgwinsz", "ok");
    // Raw and packet sockets need CAP_NET_RAW, which the sandbox does not have; ICMP datagram
    // sockets (unprivileged ping) stay available.
    expect("raw_socket", "EPERM");
    expect("packet_socket", "EPERM");
    expect("ping_socket", "ok");
    // What stays allowed.
    expect("personality_query", "ok");
    expect("chroot", "ok");
    expect("pthread_create", "ok");
    expect("fork", "ok");

    // The filter and no_new_privs hold for every process (the agent's included, whose status
    // the sandbox cannot read: it is not dumpable).
    let status = stdout(&env.exec_sh(
        &id,
        "grep -E '^(Seccomp|Seccomp_filters|NoNewPrivs):' /proc/self/status",
    ));
    assert!(status.contains("Seccomp:\t2\n"), "{status}");
    assert!(status.contains("Seccomp_filters:\t1\n"), "{status}");
    assert!(status.contains("NoNewPrivs:\t1\n"), "{status}");
    // The agent itself (pid 1 inside), read from the host: same filter, same limits.
    let pid = env.inspect(&id)["pid"]
        .as_u64()
        .expect("the agent's host pid");
    let agent = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(agent.contains("Seccomp:\t2\n"), "{agent}");
    assert!(agent.contains("Seccomp_filters:\t1\n"), "{agent}");
    assert!(agent.contains("NoNewPrivs:\t1\n"), "{agent}");
    assert!(agent.contains("CapEff:\t00000000800405fb\n"), "{agent}");
}

#[test]
fn landlock_refuses_device_nodes_even_to_root() {
    let env = Env::new();
    let out = env.sh("mknod /tmp/null c 1 3 2>&1 && echo char-made; \
         mknod /tmp/disk b 8 0 2>&1 && echo block-made; \
         mkfifo /tmp/fifo && echo fifo-made; \
         id -u; \
         rm /etc/hostname.probe 2>/dev/null; \
         echo x > /etc/probe && rm /etc/probe && echo upper-ok; \
         rm /usr/bin/yes && test ! -e /usr/bin/yes && echo whiteout-ok");
    assert!(!out.contains("char-made"), "{out}");
    assert!(!out.contains("block-made"), "{out}");
    assert!(out.contains("Permission denied"), "{out}");
    assert!(out.contains("fifo-made"), "{out}");
    assert!(out.contains("\n0\n"), "not root in the sandbox: {out}");
    // Removing a file of the image still works (overlayfs makes its whiteout itself).
    assert!(out.contains("upper-ok"), "{out}");
    assert!(out.contains("whiteout-ok"), "{out}");
}

#[test]
fn exec_sessions_cannot_trace_each_other_but_trace_their_own_children() {
    let env = Env::new();
    let id = env.create(&[]);
    // Session 1 leaves a process running.
    let out = env.exec_sh(&id, "sleep 300 >/dev/null 2>&1 & echo $!");
    assert_ok(&out);
    let pid: u32 = stdout(&out).trim().parse().expect("a pid");
    // Session 2, same user (root), cannot attach to it, read its memory map or environment,
    // nor attach to the agent.
    let out = env.exec_sh(
        &id,
        &format!(
            "strace -p {pid} -o /dev/null & s=$!; sleep 0.3; kill $s 2>/dev/null; wait $s; \
             echo strace-other=$?; \
             cat /proc/{pid}/environ >/dev/null 2>&1 && echo environ-readable; \
             readlink /proc/{pid}/fd/0 >/dev/null 2>&1 && echo fds-readable; \
             readlink /proc/{pid}/exe >/dev/null 2>&1 && echo exe-readable; \
             timeout 2 strace -p 1 -o /dev/null; echo strace-agent=$?; \
             strace -f -o /tmp/trace sh -c 'true; sleep 0' && grep -c execve /tmp/trace; \
             echo own-children=$?"
        ),
    );
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(text.contains("Operation not permitted"), "{text}");
    assert!(!text.contains("strace-other=0"), "{text}");
    assert!(!text.contains("environ-readable"), "{text}");
    assert!(!text.contains("fds-readable"), "{text}");
    assert!(!text.contains("exe-readable"), "{text}");
    assert!(!text.contains("strace-agent=0"), "{text}");
    // strace -f of its own child tree works: the shell and its sleep were traced.
    assert!(text.contains("own-children=0"), "{text}");
    // PTRACE_TRACEME (how gdb starts a program) works within a session.
    compile(
        &env,
        &id,
        "traceme",
        r#"
#include <signal.h>
#include <stdio.h>
#include <sys/ptrace.h>
#include <sys/wait.h>
#include <unistd.h>
int main(void) {
    pid_t pid = fork();
    if (pid == 0) {
        if (ptrace(PTRACE_TRACEME, 0, 0, 0) != 0) _exit(2);
        raise(SIGSTOP);
        _exit(0);
    }
    int status;
    waitpid(pid, &status, 0);
    if (!WIFSTOPPED(status)) { puts("not-stopped"); return 1; }
    long word = ptrace(PTRACE_PEEKUSER, pid, 0, 0);
    (void)word;
    ptrace(PTRACE_CONT, pid, 0, 0);
    waitpid(pid, &status, 0);
    puts(WIFEXITED(status) && WEXITSTATUS(status) == 0 ? "traced" : "failed");
    return 0;
}
"#,
    );
    let out = env.exec_sh(&id, "/tmp/traceme");
    assert_eq!(stdout(&out).trim(), "traced", "{}", stderr(&out));
    // Signals are not confined to a session: a later command may stop an earlier one's server.
    let out = env.exec_sh(&id, &format!("kill {pid} && echo killed"));
    assert_eq!(stdout(&out).trim(), "killed", "{}", stderr(&out));
}

#[test]
fn proc_is_masked_and_proc_sys_and_sys_are_read_only() {
    let env = Env::new();
    let out = env.sh(
        "for f in keys key-users kallsyms timer_list kcore sysrq-trigger; do \
           test -e /proc/$f && echo $f=$(wc -c < /proc/$f); done; \
         ls -A /proc/acpi 2>/dev/null | wc -l | sed 's/^/acpi-entries=/'; \
         { echo 1 > /proc/sys/net/ipv4/ip_forward; } 2>&1 && echo sysctl-written; \
         echo 1 > /proc/sysrq-trigger 2>/dev/null; \
         cat /proc/sys/net/ipv4/ping_group_range; \
         grep -E ' /proc/sys | /sys ' /proc/self/mountinfo | grep -c ' ro,' | sed 's/^/ro-mounts=/'; \
         touch /sys/probe 2>/dev/null && echo sys-written; \
         for f in /sys/kernel/mm/transparent_hugepage/enabled /sys/class/net/lo/mtu; do \
           test -e $f && { echo x > $f && echo $f-written; }; done; \
         ls -A /sys/fs/cgroup | wc -l | sed 's/^/cgroup-entries=/'; \
         echo done",
    );
    let got = results(&out.replace('=', " "));
    // Covered by /dev/null: empty whatever the host has.
    for file in ["keys", "key-users", "kallsyms", "timer_list"] {
        if let Some(size) = got.get(file) {
            assert_eq!(size, "0", "/proc/{file} is not masked: {out}");
        }
    }
    assert_eq!(got.get("keys").map(String::as_str), Some("0"), "{out}");
    assert_eq!(got.get("kallsyms").map(String::as_str), Some("0"), "{out}");
    if std::path::Path::new("/proc/acpi").exists() {
        assert_eq!(
            got.get("acpi-entries").map(String::as_str),
            Some("0"),
            "{out}"
        );
    }
    assert!(!out.contains("sysctl-written"), "{out}");
    assert!(out.contains("Read-only file system"), "{out}");
    // Written by the init before /proc/sys became read-only: ping for every sandbox group.
    assert!(out.contains("0\t65535"), "{out}");
    assert_eq!(got.get("ro-mounts").map(String::as_str), Some("2"), "{out}");
    assert!(!out.contains("-written"), "{out}");
    // No cgroup filesystem in the sandbox's /sys: the host's hierarchy is not reachable.
    assert_eq!(
        got.get("cgroup-entries").map(String::as_str),
        Some("0"),
        "{out}"
    );
    assert!(out.ends_with("done\n"), "{out}");
}

#[test]
fn sys_hides_firmware_power_btrfs_and_loop_backing_files() {
    let env = Env::new();
    // A disk quota puts a btrfs pool on a loop device on the host: its qgroups (every
    // sandbox's usage) and the loop's backing file must not show.
    let id = env.create(&["--disk", "64M"]);
    let out = env.exec_sh(
        &id,
        "for d in firmware devices/virtual/powercap fs/btrfs devices/virtual/block; do \
           echo $d=$(ls -A /sys/$d 2>/dev/null | wc -l); done; \
         cat /sys/block/*/loop/backing_file /sys/devices/virtual/block/*/loop/backing_file \
           2>/dev/null | wc -l | sed 's/^/backing-files=/'; \
         find /sys -name backing_file 2>/dev/null | wc -l | sed 's/^/found=/'; echo done",
    );
    assert_ok(&out);
    let text = stdout(&out);
    let got = results(&text.replace('=', " "));
    for key in [
        "firmware",
        "devices/virtual/powercap",
        "fs/btrfs",
        "devices/virtual/block",
        "backing-files",
        "found",
    ] {
        assert_eq!(got.get(key).map(String::as_str), Some("0"), "{key}: {text}");
    }
    // The host has what is hidden (else the test proves nothing).
    assert!(std::path::Path::new("/sys/fs/btrfs").exists());
    assert!(std::fs::read_dir("/sys/devices/virtual/block")
        .unwrap()
        .any(|e| e.unwrap().path().join("loop/backing_file").exists()));
}

/// Opens inotify instances until the kernel refuses (at most 5,000), writes `count errno` to
/// `/tmp/held`, then keeps them.
const HOLD_INOTIFY: &str = r#"
import ctypes, time
libc = ctypes.CDLL(None, use_errno=True)
fds = []
while len(fds) < 5000:
    fd = libc.inotify_init1(0)
    if fd < 0:
        break
    fds.append(fd)
with open("/tmp/held.part", "w") as f:
    f.write("%d %d\n" % (len(fds), ctypes.get_errno()))
import os
os.rename("/tmp/held.part", "/tmp/held")
time.sleep(600)
"#;

#[test]
fn inotify_is_capped_per_sandbox_and_no_namespace_can_be_made() {
    use common::server::{exit_line, key, stream, Api, Server};
    let env = Env::new();
    let k = key(&env, "hardening");
    let server = Server::start(&env);
    let api = Api::new(&server, &k);
    // `serve` raised the limits all sandboxes share (never lowers them).
    let host = |name: &str| -> u64 {
        std::fs::read_to_string(format!("/proc/sys/{name}"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    assert!(host("fs/inotify/max_user_instances") >= 65_536);
    assert!(host("fs/inotify/max_user_watches") >= 4_194_304);
    assert!(host("kernel/pid_max") >= 4_194_304);
    assert!(host("fs/file-max") >= i64::MAX as u64);
    let sh = |id: &str, script: &str| {
        let lines = api.exec(id, script);
        let code = exit_line(&lines)["code"].as_i64().expect("exit code");
        assert_eq!(code, 0, "{}", stream(&lines, "stderr"));
        stream(&lines, "stdout")
    };
    let first = api.create(json!({}))["id"].as_str().unwrap().to_string();
    let second = api.create(json!({}))["id"].as_str().unwrap().to_string();
    // The sandbox's own user namespace limits, written by its init.
    let limits = sh(
        &first,
        "cd /proc/sys/user && for f in max_inotify_instances max_inotify_watches \
           max_user_namespaces max_net_namespaces; do echo $f $(cat $f); done; \
         { echo 5 > max_user_namespaces; } 2>/dev/null && echo raised; true",
    );
    let got = results(&limits);
    assert_eq!(got["max_inotify_instances"], "1024", "{limits}");
    assert_eq!(got["max_inotify_watches"], "131072", "{limits}");
    assert_eq!(got["max_user_namespaces"], "0", "{limits}");
    assert_eq!(got["max_net_namespaces"], "0", "{limits}");
    assert!(!limits.contains("raised"), "{limits}");
    // The first sandbox takes every inotify instance it may, and keeps them.
    sh(
        &first,
        &format!("cat > /tmp/hold.py <<'EOF'\n{HOLD_INOTIFY}\nEOF"),
    );
    api.background(
        &first,
        json!({"cmd": ["python3", "/tmp/hold.py"], "background": true}),
    );
    let held = sh(
        &first,
        "for i in $(seq 200); do test -e /tmp/held && break; sleep 0.05; done; cat /tmp/held",
    );
    // Stopped by its own cap (EMFILE), not by the host's shared counter.
    assert_eq!(held.trim(), "1024 24", "{held}");
    // The second still gets its own while the first holds its maximum.
    let second_out = sh(
        &second,
        "python3 -c 'import ctypes; l = ctypes.CDLL(None); \
           print(sum(l.inotify_init1(0) >= 0 for _ in range(100)))'",
    );
    assert_eq!(second_out.trim(), "100", "{second_out}");
}

#[test]
fn capabilities_are_the_documented_set() {
    let env = Env::new();
    let out = env.sh("grep -E '^Cap(Bnd|Eff|Prm|Inh|Amb):' /proc/self/status");
    // chown, dac_override, fowner, fsetid, kill, setgid, setuid, setpcap, net_bind_service,
    // sys_chroot, setfcap (init.rs, KEPT_CAPS): no net_raw, mknod, audit_write, sys_admin.
    assert!(out.contains("CapBnd:\t00000000800405fb"), "{out}");
    assert!(out.contains("CapEff:\t00000000800405fb"), "{out}");
    assert!(out.contains("CapPrm:\t00000000800405fb"), "{out}");
    assert!(out.contains("CapInh:\t0000000000000000"), "{out}");
    assert!(out.contains("CapAmb:\t0000000000000000"), "{out}");
    // Another user has none, and cannot regain any (no_new_privs, nothing setuid counts).
    let out = env.output([
        "run",
        "--user",
        "nobody",
        "--",
        "sh",
        "-c",
        "grep -E '^CapEff:' /proc/self/status",
    ]);
    assert_ok(&out);
    assert!(
        stdout(&out).contains("CapEff:\t0000000000000000"),
        "{}",
        stdout(&out)
    );
}
