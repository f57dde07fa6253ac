//! The agent's control socket (which can exec as any user, change the sandbox's lifetime with
//! `SetLifetime`, and read any file) must be out of reach of the code it runs: nothing inside a
//! sandbox can find it, open it through the agent's descriptors, or trace the agent.

mod common;
use common::*;

/// Looks, from inside the sandbox, for any Unix socket on its filesystems (host `/usr` aside:
/// it is the host's read-only userland), for the agent's descriptors, and tries to trace it.
const PROBE: &str = r#"
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

#[test]
fn code_in_a_sandbox_cannot_reach_its_agents_socket() {
    let env = Env::new();
    let id = env.create(&[]);
    let socket = env.socket(&id);
    assert!(socket.exists(), "the host side has the socket: {socket:?}");
    let out = env.output(["exec", &id, "--", "python3", "-c", PROBE]);
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
