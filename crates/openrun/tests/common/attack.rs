//! Helpers of the attack suite (`tests/attacks.rs`): attacker code runs as real Python inside
//! real sandboxes (ctypes gives it every raw system call), prints one `name=result` line per
//! attempt, and the tests read those lines back as a [`Report`].

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use super::{assert_ok, stdout, Env};

/// Python run before every attack: `sc(nr, *args)` makes a raw system call and answers `ok` or
/// the errno's name (`EPERM`); `attempt(name, fn)` runs `fn`, reporting `ok` (or what it
/// returned) or the errno's name of the `OSError` it raised; `report(name, value)` prints one
/// result line; `write(path, text)` writes unbuffered (so the error comes from the write).
pub const PRELUDE: &str = r#"
import ctypes, errno, os, socket, struct, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def err(e):
    return errno.errorcode.get(e, str(e))
def sc(nr, *args):
    conv = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    ctypes.set_errno(0)
    v = libc.syscall(ctypes.c_long(nr), *conv)
    return err(ctypes.get_errno()) if v == -1 else "ok"
def report(name, value):
    print(f"{name}={value}", flush=True)
def write(path, data):
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)
def attempt(name, fn):
    try:
        v = fn()
        report(name, "ok" if v is None else v)
    except OSError as e:
        report(name, err(e.errno) if e.errno else type(e).__name__)
"#;

/// What an attack printed: `name=result` lines.
pub struct Report {
    /// The whole stdout, for failure messages.
    pub text: String,
    results: BTreeMap<String, String>,
}

impl Report {
    /// Parses `name=result` lines (others are kept in `text` only).
    pub fn parse(text: String) -> Self {
        let results = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self { text, results }
    }

    /// The result of attempt `name` (panics, showing everything, if it is missing).
    pub fn get(&self, name: &str) -> &str {
        self.results
            .get(name)
            .unwrap_or_else(|| panic!("no {name}= line in:\n{}", self.text))
    }

    /// Asserts attempt `name` failed with `errno` (its name, e.g. `EPERM`).
    pub fn refused(&self, name: &str, errno: &str) {
        assert_eq!(
            self.get(name),
            errno,
            "attack {name} was not refused with {errno}:\n{}",
            self.text
        );
    }

    /// Asserts attempt `name` failed with one of `errnos`.
    pub fn refused_with_any(&self, name: &str, errnos: &[&str]) {
        let got = self.get(name);
        assert!(
            errnos.contains(&got),
            "attack {name} got {got}, expected one of {errnos:?}:\n{}",
            self.text
        );
    }

    /// Every attempt whose name starts with `prefix`.
    pub fn all(&self, prefix: &str) -> Vec<(&str, &str)> {
        self.results
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }
}

fn report_of(out: Output) -> Report {
    assert_ok(&out);
    Report::parse(stdout(&out))
}

/// Runs `code` (after [`PRELUDE`]) as root in a fresh sandbox (`openrun run`).
pub fn attack(env: &Env, code: &str) -> Report {
    attack_with(env, &[], code)
}

/// As [`attack`], with `openrun run` flags (`--memory 64M`, `-u nobody`...).
pub fn attack_with(env: &Env, flags: &[&str], code: &str) -> Report {
    let script = format!("{PRELUDE}\n{code}");
    let mut args = vec!["run"];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["--", "python3", "-c", &script]);
    report_of(env.output(args))
}

/// Runs `code` (after [`PRELUDE`]) as root in sandbox `id` (`openrun exec`).
pub fn attack_in(env: &Env, id: &str, code: &str) -> Report {
    let script = format!("{PRELUDE}\n{code}");
    report_of(env.output(["exec", id, "--", "python3", "-c", &script]))
}

/// A file on the host that an attack must neither read nor change; removed when dropped.
pub struct Canary {
    /// Its path on the host.
    pub path: std::path::PathBuf,
    /// Its content (unique per test run).
    pub content: String,
    /// A directory made for it, removed with it.
    made_dir: Option<std::path::PathBuf>,
}

impl Canary {
    /// Writes a canary at `path` (creating its directory if `make_dir`).
    pub fn new(path: impl AsRef<Path>, make_dir: bool) -> Self {
        let path = path.as_ref().to_path_buf();
        let made_dir = if make_dir {
            let dir = path.parent().expect("parent").to_path_buf();
            std::fs::create_dir_all(&dir).expect("canary dir");
            Some(dir)
        } else {
            None
        };
        let content = format!(
            "openrun-canary-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        );
        std::fs::write(&path, &content).expect("write the canary");
        Self {
            path,
            content,
            made_dir,
        }
    }

    /// Asserts the canary is still there, unchanged.
    pub fn assert_untouched(&self) {
        let now = std::fs::read_to_string(&self.path)
            .unwrap_or_else(|e| panic!("canary {} is gone: {e}", self.path.display()));
        assert_eq!(now, self.content, "canary {} changed", self.path.display());
    }
}

impl Drop for Canary {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        if let Some(dir) = &self.made_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// SHA-256 of a host file, hex.
pub fn sha256_of(path: impl AsRef<Path>) -> String {
    use sha2::Digest;
    let data = std::fs::read(path.as_ref()).expect("read for hashing");
    sha2::Sha256::digest(&data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Asserts another sandbox is served while an attack runs: a fresh sandbox (`openrun run`,
/// create + exec + remove) answers within `bound`. Returns how long it took.
pub fn assert_served_within(env: &Env, bound: Duration) -> Duration {
    let start = Instant::now();
    let out = env.output(["run", "--", "echo", "served"]);
    let took = start.elapsed();
    assert_ok(&out);
    assert_eq!(stdout(&out), "served\n");
    assert!(
        took < bound,
        "another sandbox took {took:?} (bound {bound:?}) while the attack ran"
    );
    took
}

/// Asserts the host is healthy: it can still fork, exec and open files quickly.
pub fn assert_host_healthy() {
    let start = Instant::now();
    let ok = std::process::Command::new("/bin/true")
        .status()
        .expect("spawn /bin/true on the host");
    assert!(ok.success());
    let files: Vec<_> = (0..64)
        .map(|_| std::fs::File::open("/dev/null").expect("the host can open files"))
        .collect();
    drop(files);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "the host is slow: {:?}",
        start.elapsed()
    );
}

/// The host's first global (non-loopback) IPv4 address, from `ip -4 -o addr`.
pub fn host_ip() -> std::net::Ipv4Addr {
    let out = std::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .expect("run ip");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no global IPv4 address on the host: {out:?}"))
}

/// A `sleep` on the host, killed when dropped.
pub struct HostProcess(pub std::process::Child);

impl HostProcess {
    /// Starts `sleep 600`.
    pub fn sleep() -> Self {
        Self(
            std::process::Command::new("sleep")
                .arg("600")
                .spawn()
                .expect("spawn sleep"),
        )
    }

    /// Its pid on the host.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Asserts it has not exited.
    pub fn assert_alive(&mut self) {
        assert!(
            self.0.try_wait().expect("wait").is_none(),
            "host process {} was killed",
            self.pid()
        );
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `code` (after [`PRELUDE`]) as root in sandbox `id` through the server's exec API,
/// asserting it exits 0.
pub fn attack_api(api: &super::server::Api, id: &str, code: &str) -> Report {
    use super::server::{exit_line, ndjson, stream};
    let script = format!("{PRELUDE}\n{code}");
    let res = api.post(
        &format!("/v1/sandboxes/{id}/exec"),
        &serde_json::json!({ "cmd": ["python3", "-c", script] }).to_string(),
    );
    assert_eq!(res.status(), 200);
    let lines = ndjson(&res.text().expect("body"));
    assert_eq!(
        exit_line(&lines)["code"],
        0,
        "the attack failed to run: {}",
        stream(&lines, "stderr")
    );
    Report::parse(stream(&lines, "stdout"))
}

/// Python defining `proxy(raw)`: sends the raw HTTP request `raw` to the egress proxy inside
/// the sandbox (`127.0.0.1:3128`) and answers the response's status code (`403`), `closed`
/// when it hung up without one, or the errno's name.
pub const PROXY_PY: &str = r#"
def proxy(raw):
    try:
        s = socket.create_connection(("127.0.0.1", 3128), timeout=20)
    except OSError as e:
        return err(e.errno) if e.errno else "timeout"
    s.sendall(raw.encode())
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError as e:
        return err(e.errno) if e.errno else "timeout"
    parts = data.split(b"\r\n")[0].split(b" ")
    return parts[1].decode() if len(parts) > 1 else "closed"
"#;
