//! Disk quotas, open-files limits, the server's default limits and the `open` network mode.

mod common;
use common::server::*;
use common::*;

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

const MIB: u64 = 1 << 20;
const EDQUOT: &str = "Disk quota exceeded";

/// The open-files limit a sandbox gets by default: 65536, or less where this process's own
/// hard limit is lower (raising it needs CAP_SYS_RESOURCE, which root lacks on some hosts).
fn default_open_files() -> u64 {
    rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .maximum
        .map_or(65_536, |m| m.min(65_536))
}

/// Bytes the host's disk holds for the data dir's disk pool (the sparse file's blocks).
fn pool_allocated(env: &Env) -> u64 {
    std::fs::metadata(env.data_dir().join("disk-pool.img"))
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// Writes `mib` MiB of random data to `path` inside; returns (bytes written, dd's stderr).
fn fill(env: &Env, id: &str, path: &str, mib: u64) -> (u64, String) {
    let out = env.exec_sh(
        id,
        &format!(
            "head -c {}M /dev/urandom > {path}; echo \"rc=$?\" >&2; stat -c %s {path}",
            mib
        ),
    );
    let written = stdout(&out).trim().parse().unwrap_or(0);
    (written, stderr(&out))
}

#[test]
fn a_disk_fill_stops_at_the_quota_and_nothing_else_notices() {
    let env = Env::new();
    let id = env.create(&["--disk", "64M"]);
    let before = pool_allocated(&env);
    let started = Instant::now();
    let (written, err) = fill(&env, &id, "/fill", 300);
    assert!(err.contains(EDQUOT), "not stopped by the quota: {err}");
    assert!(!err.contains("rc=0"), "{err}");
    assert!(
        (32 * MIB..=64 * MIB).contains(&written),
        "{written} bytes written under a 64 MiB quota"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    // The host gave the pool at most the quota (plus btrfs metadata), not the 300 MiB asked.
    let grown = pool_allocated(&env).saturating_sub(before);
    assert!(grown <= 96 * MIB, "the pool file grew by {grown} bytes");

    // While it is full: a sandbox without a quota, and one with its own, work as usual.
    assert_eq!(env.sh("echo fine").trim(), "fine");
    let other = env.create(&["--disk", "64M"]);
    let (written, err) = fill(&env, &other, "/ten", 10);
    assert_eq!(written, 10 * MIB, "{err}");
    // The full one still runs commands and can free its space again.
    let out = env.exec_sh(&id, "rm /fill && head -c 1M /dev/zero > /again && echo ok");
    assert_ok(&out);
    assert_eq!(stdout(&out).trim(), "ok");

    // rm deletes the layer (a subvolume of the pool) and with it the quota.
    let layer = env.data_dir().join("disk-pool").join(&id);
    assert!(layer.is_dir(), "layer not in the pool: {}", layer.display());
    assert_ok(&env.output(["rm", &id, &other]));
    assert!(!layer.exists(), "layer left behind");
    assert!(env.leftovers().is_empty(), "{:?}", env.leftovers());
}

#[test]
fn creating_files_without_end_stops_at_the_quota() {
    let env = Env::new();
    let id = env.create(&["--disk", "8M"]);
    let out = env.exec_sh(
        &id,
        r#"python3 -c '
import os
os.mkdir("/many")
n = 0
try:
    while n < 3000000:
        open("/many/%d" % n, "w").close()
        n += 1
    print(n, 0)
except OSError as e:
    print(n, e.errno)
'"#,
    );
    assert_ok(&out);
    let text = stdout(&out);
    let mut parts = text.split_whitespace();
    let made: u64 = parts.next().and_then(|n| n.parse().ok()).expect("count");
    let errno: i32 = parts.next().and_then(|n| n.parse().ok()).expect("errno");
    assert!(
        errno == libc::EDQUOT || errno == libc::ENOSPC,
        "stopped by errno {errno} after {made} files"
    );
    assert!(
        (100..3_000_000).contains(&made),
        "{made} empty files under an 8 MiB quota"
    );
    // Deleting them gives the room back.
    let out = env.exec_sh(&id, "rm -rf /many && mkdir /again && echo ok");
    assert_ok(&out);
}

#[test]
fn a_memory_layer_is_capped_by_the_disk_quota() {
    let env = Env::new();
    let out = env.output([
        "run",
        "--disk",
        "16M",
        "--",
        "sh",
        "-c",
        "head -c 64M /dev/zero > /fill; stat -c %s /fill",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let written: u64 = stdout(&out).trim().parse().expect("size");
    assert!(written <= 16 * MIB, "{written}");
    assert!(stderr(&out).contains("No space left"), "{}", stderr(&out));
    // No pool for a memory layer.
    assert!(!env.data_dir().join("disk-pool.img").exists());
}

#[test]
fn tmp_is_capped_like_the_memory_layer() {
    let env = Env::new();
    // A disk quota caps /tmp (a tmpfs) on a disk layer too: it cannot be a way around it.
    let out = env.output([
        "run",
        "--disk",
        "16M",
        "--storage",
        "disk",
        "--",
        "sh",
        "-c",
        "head -c 64M /dev/zero > /tmp/fill; stat -c %s /tmp/fill; df -B1 --output=size /tmp | tail -1",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    let mut lines = text.lines();
    let written: u64 = lines
        .next()
        .and_then(|n| n.trim().parse().ok())
        .expect("size");
    let size: u64 = lines
        .next()
        .and_then(|n| n.trim().parse().ok())
        .expect("df");
    assert!(written <= 16 * MIB, "{written}");
    assert_eq!(size, 16 * MIB, "{text}");
    assert!(stderr(&out).contains("No space left"), "{}", stderr(&out));
    // The smaller of the memory limit and the quota.
    let out = env.output([
        "run",
        "--disk",
        "64M",
        "--memory",
        "32M",
        "--",
        "sh",
        "-c",
        "df -B1 --output=size /tmp | tail -1",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), (32 * MIB).to_string());
}

#[test]
fn open_files_are_limited_and_visible() {
    let env = Env::new();
    let id = env.create(&["--open-files", "256"]);
    let out = env.exec_sh(&id, "ulimit -n; ulimit -Hn");
    assert_ok(&out);
    assert_eq!(stdout(&out), "256\n256\n");
    let out = env.exec_sh(
        &id,
        r#"python3 -c '
import os
fds = []
try:
    while len(fds) < 10000:
        fds.append(os.open("/dev/null", os.O_RDONLY))
except OSError as e:
    print(len(fds), e.errno)
'"#,
    );
    assert_ok(&out);
    let text = stdout(&out);
    let mut parts = text.split_whitespace();
    let opened: usize = parts.next().and_then(|n| n.parse().ok()).expect("count");
    assert_eq!(parts.next(), Some("24"), "not EMFILE: {text}");
    assert!((240..256).contains(&opened), "{opened} descriptors opened");
    // Root inside cannot raise it: the hard limit is the host's to set.
    let out = env.exec_sh(&id, "ulimit -n 4096 2>&1; ulimit -n");
    assert!(stdout(&out).trim_end().ends_with("256"), "{}", stdout(&out));

    // The default: 65536 (at most the creator's hard limit), soft = hard.
    let plain = env.create(&[]);
    let out = env.exec_sh(&plain, "ulimit -n; ulimit -Hn");
    let want = default_open_files();
    assert_eq!(stdout(&out), format!("{want}\n{want}\n"));
}

#[test]
fn bad_limits_are_refused_naming_the_value() {
    let env = Env::new();
    for (flag, value, says) in [
        ("--disk", "12Q", "invalid disk size \"12Q\""),
        ("--disk", "100k", "must be at least 1 MiB"),
        ("--open-files", "10", "must be at least 64"),
        ("--open-files", "2000000", "must be at most 1048576"),
        ("--open-files", "lots", "invalid open files limit \"lots\""),
    ] {
        let out = env.output(["create", flag, value]);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}");
        assert!(
            stderr(&out).contains(says),
            "{flag} {value}: {}",
            stderr(&out)
        );
    }
    assert!(env.live_ids().is_empty());

    let server = Server::start(&env);
    let api = Api::new(&server, &key(&env, "t"));
    for (body, says) in [
        (json!({"disk": "12Q"}), "invalid disk size \"12Q\""),
        (json!({"disk": "0"}), "must be at least 1 MiB"),
        (json!({"open_files": 5}), "invalid open files limit \"5\""),
        (json!({"open_files": 9_999_999}), "must be at most 1048576"),
    ] {
        let res = api.post("/v1/sandboxes", &body.to_string());
        let message = error(res, 400, "invalid_argument");
        assert!(message.contains(says), "{body}: {message}");
    }
    let res = api.post("/v1/sandboxes", r#"{"disk": 10}"#);
    assert_eq!(res.status(), 400);
    // Above the server's own hard open-files limit (which it cannot raise): a 400 naming it,
    // not a failed create (schemathesis found the 500).
    let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .maximum
        .unwrap_or(u64::MAX);
    let (asked, says) = if hard < 1_048_576 {
        (hard + 1, "above the hard open-files limit")
    } else {
        (1_048_577, "must be at most 1048576")
    };
    let res = api.post("/v1/sandboxes", &json!({"open_files": asked}).to_string());
    let message = error(res, 400, "invalid_argument");
    assert!(message.contains(says), "{asked}: {message}");
    assert!(api.ids().is_empty());
}

#[test]
fn the_server_contains_a_disk_fill_by_default() {
    let env = Env::new();
    // The built-in defaults.
    {
        let server = Server::start(&env);
        let api = Api::new(&server, &key(&env, "d"));
        let created = api.create(json!({}));
        assert_eq!(created["limits"]["disk_bytes"], 10u64 << 30);
        let memory = created["limits"]["memory_bytes"]
            .as_u64()
            .expect("memory default");
        assert!((64 * MIB..=2 << 30).contains(&memory), "{memory}");
        let id = created["id"].as_str().unwrap().to_string();
        let lines = api.exec(&id, "ulimit -n");
        assert_eq!(
            stream(&lines, "stdout"),
            format!("{}\n", default_open_files())
        );
        // What a create names wins.
        let named = api.create(json!({"disk": "20M", "memory": "128M", "open_files": 1024}));
        assert_eq!(named["limits"]["disk_bytes"], 20 * MIB);
        assert_eq!(named["limits"]["memory_bytes"], 128 * MIB);
        assert_eq!(named["limits"]["open_files"], 1024);
        for id in api.ids() {
            assert_eq!(api.delete(&format!("/v1/sandboxes/{id}")).status(), 204);
        }
        server.stop();
    }
    // An operator's defaults.
    let server = Server::start_with(
        &env,
        &[
            "--listen",
            "127.0.0.1:0",
            "--default-disk",
            "32M",
            "--default-memory",
            "256M",
        ],
    );
    let api = Api::new(&server, &key(&env, "o"));
    let created = api.create(json!({}));
    assert_eq!(created["limits"]["disk_bytes"], 32 * MIB);
    assert_eq!(created["limits"]["memory_bytes"], 256 * MIB);
    let id = created["id"].as_str().unwrap().to_string();
    let lines = api.exec(&id, "head -c 100M /dev/urandom > /fill; stat -c %s /fill");
    let size: u64 = stream(&lines, "stdout").trim().parse().expect("size");
    assert!(size <= 32 * MIB, "{size}");
    assert!(stream(&lines, "stderr").contains(EDQUOT), "{lines:?}");
    // Others are still served meanwhile.
    let other = api.create(json!({}));
    let other = other["id"].as_str().unwrap();
    assert_eq!(stream(&api.exec(other, "echo up"), "stdout"), "up\n");
    server.stop();
}

#[test]
fn a_server_can_run_without_default_limits() {
    let env = Env::new();
    let server = Server::start_with(
        &env,
        &[
            "--listen",
            "127.0.0.1:0",
            "--default-disk",
            "none",
            "--default-memory",
            "none",
        ],
    );
    let api = Api::new(&server, &key(&env, "n"));
    let created = api.create(json!({}));
    assert!(created["limits"]["disk_bytes"].is_null(), "{created}");
    assert!(created["limits"]["memory_bytes"].is_null(), "{created}");
    // Without a default disk quota the server never made a pool.
    assert!(!env.data_dir().join("disk-pool.img").exists());
    server.stop();
}

/// Whether host process `pid` has exited (gone, or a zombie its new parent has yet to reap),
/// waiting up to 5 s.
fn exited(pid: i32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return true,
            Ok(stat)
                if stat
                    .rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z')) =>
            {
                return true
            }
            Ok(_) if Instant::now() > deadline => return false,
            Ok(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// A network namespace with a veth pair to the host: a stand-in for the internet, with a
/// TCP server answering `internet` on `addr:port`. Removed when dropped.
struct TestHost {
    name: String,
    veth: String,
    addr: String,
    port: u16,
    server: std::process::Child,
}

impl TestHost {
    fn start() -> Self {
        let n = std::process::id() % 200 + 20;
        let name = format!("ort-inet-{}", std::process::id());
        let veth = format!("orth{}", std::process::id());
        let peer = format!("ortn{}", std::process::id());
        let host_ip = format!("10.213.{n}.1");
        let addr = format!("10.213.{n}.2");
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("ip");
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ip(&["netns", "add", &name]);
        ip(&["link", "add", &veth, "type", "veth", "peer", "name", &peer]);
        ip(&["link", "set", &peer, "netns", &name]);
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &veth]);
        ip(&["link", "set", &veth, "up"]);
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("{addr}/30"),
            "dev",
            &peer,
        ]);
        ip(&["-n", &name, "link", "set", &peer, "up"]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        let port = 18_080;
        let server = Command::new("ip")
            .args(["netns", "exec", &name, "python3", "-c"])
            .arg(format!(
                "import socket\n\
                 s = socket.socket()\n\
                 s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
                 s.bind(('{addr}', {port}))\n\
                 s.listen(16)\n\
                 while True:\n\
                 \x20   c, _ = s.accept()\n\
                 \x20   c.sendall(b'internet')\n\
                 \x20   c.close()\n"
            ))
            .stdout(Stdio::null())
            .spawn()
            .expect("test server");
        let host = Self {
            name,
            veth,
            addr,
            port,
            server,
        };
        // Reachable from the host before the test relies on it.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let target = format!("{}:{}", host.addr, host.port);
            if let Ok(mut c) = std::net::TcpStream::connect(&target) {
                let mut got = String::new();
                let _ = c.read_to_string(&mut got);
                if got == "internet" {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "the test host never answered");
            std::thread::sleep(Duration::from_millis(50));
        }
        host
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Inside sandbox `id`: connects to `addr:port` with a 3 s timeout; what it read, or the error.
fn connect_from(env: &Env, id: &str, addr: &str, port: u16) -> String {
    let out = env.exec_sh(
        id,
        &format!(
            r#"python3 -c '
import socket
try:
    c = socket.create_connection(("{addr}", {port}), timeout=3)
    print(c.recv(100).decode())
except OSError as e:
    print("error", e)
'"#
        ),
    );
    assert_ok(&out);
    stdout(&out).trim().to_string()
}

#[test]
fn the_open_network_reaches_out_only_while_open_and_never_the_host_loopback() {
    let env = Env::new();
    let inet = TestHost::start();
    // A server on the host's loopback, which no sandbox may reach.
    let local = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let local_port = local.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut c in local.incoming().flatten() {
            let _ = c.write_all(b"host-loopback");
        }
    });

    let id = env.create(&[]);
    let runtime = openrun_runtime::Runtime::open(env.data_dir()).unwrap();
    let sandbox = runtime.open_sandbox(&id).unwrap();
    assert!(!sandbox.is_network_open());
    let closed = connect_from(&env, &id, &inet.addr, inet.port);
    assert!(
        closed.starts_with("error"),
        "reached out while closed: {closed}"
    );

    sandbox.set_open_network(true).unwrap();
    sandbox.set_open_network(true).unwrap(); // idempotent
    assert!(sandbox.is_network_open());
    let pid: i32 = std::fs::read_to_string(sandbox.run_dir().join("pasta.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let open = connect_from(&env, &id, &inet.addr, inet.port);
    assert_eq!(open, "internet");
    // pasta runs as the sandbox's own unprivileged root id, not as host root.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    assert_eq!(
        uid,
        env.inspect(&id)["ids"]["slot"]
            .as_u64()
            .map(|slot| ((1u64 << 30) + slot * 65_536).to_string())
            .unwrap_or_default()
    );
    // The host's loopback stays out of reach: through the sandbox's own loopback, the
    // gateway, the host's address, or any port pasta could have forwarded.
    let route = env.exec_sh(&id, "ip route 2>/dev/null || cat /proc/net/route");
    let gateway = stdout(&route)
        .lines()
        .find_map(|l| l.strip_prefix("default via "))
        .and_then(|l| l.split_whitespace().next())
        .map(str::to_owned);
    let mut targets = vec!["127.0.0.1".to_string(), inet.addr.replace(".2", ".1")];
    targets.extend(gateway);
    for target in targets {
        let got = connect_from(&env, &id, &target, local_port);
        assert_ne!(
            got, "host-loopback",
            "reached the host's loopback via {target}"
        );
    }
    // DNS goes to pasta's forwarder, the only resolver the sandbox has.
    let out = env.exec_sh(&id, "cat /etc/resolv.conf");
    assert_eq!(stdout(&out), "nameserver 169.254.1.1\n");
    // ... and it answers, relaying to the host's resolver: a query for example.com gets its
    // reply (whatever the answer), as getaddrinfo's would.
    let out = env.exec_sh(
        &id,
        r#"python3 -c '
import socket
q = bytes.fromhex("4f5201000001000000000000076578616d706c6503636f6d0000010001")
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.connect(("169.254.1.1", 53))
s.send(q)
r = s.recv(512)
print("dns-ok" if r[:2] == q[:2] else "dns-bad %r" % r)
'"#,
    );
    assert_eq!(stdout(&out).trim(), "dns-ok", "{}", stderr(&out));

    sandbox.set_open_network(false).unwrap();
    assert!(!sandbox.is_network_open());
    assert!(exited(pid), "pasta still runs");
    let again = connect_from(&env, &id, &inet.addr, inet.port);
    assert!(
        again.starts_with("error"),
        "reached out after closing: {again}"
    );

    // Open again, then rm: pasta goes with the sandbox.
    sandbox.set_open_network(true).unwrap();
    assert_eq!(connect_from(&env, &id, &inet.addr, inet.port), "internet");
    let pid: i32 = std::fs::read_to_string(sandbox.run_dir().join("pasta.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    drop(sandbox);
    assert_ok(&env.output(["rm", &id]));
    assert!(exited(pid), "pasta outlived rm");
}

#[test]
fn a_closed_network_fails_dns_at_once() {
    let env = Env::new();
    let id = env.create(&[]);
    let started = Instant::now();
    let out = env.exec_sh(
        &id,
        r#"python3 -c '
import socket
try:
    socket.getaddrinfo("example.com", 80)
    print("resolved")
except OSError as e:
    print("error", e)
'"#,
    );
    assert_ok(&out);
    assert!(stdout(&out).starts_with("error"), "{}", stdout(&out));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a lookup took {:?}",
        started.elapsed()
    );
}
