//! Which server a client verb that needs one uses when none is named (`openrun mcp`,
//! `openrun up`), and starting one on this machine.
//!
//! 1. The configured server (`--server`/`OPENRUN_SERVER`, else the config file's), with its
//!    key; if it does not answer, the verb fails (a server is never started in its place).
//! 2. Else the local server of `<data-dir>/local.json` (written by `openrun serve` on
//!    loopback), if it answers and gets the key: [`Target::local`] sends that key only to a
//!    listener owned by the file's owner (a stale port taken by another user's program gets
//!    none).
//! 3. Else one is started: `openrun serve --listen 127.0.0.1:0` on the data dir, using the key
//!    that server writes to `local.json`, either as a child whose output goes to our stderr
//!    ([`Starting::Child`], `openrun mcp`: the last `openrun mcp` using it stops it, see
//!    [`LocalUse::finish`]) or detached in its own session with its output in
//!    `<data-dir>/serve.log` ([`Starting::Detached`], `openrun up`: it keeps running after the
//!    verb, for `openrun --server URL shell ID`, whose key comes from `local.json`).
//!
//! Steps 2 and 3 hold a lock on the data dir, so concurrent verbs start one server; each
//! holds a shared "users" lock while it uses the local server.

use std::io::{BufRead, Read, Seek};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use reqwest::Url;
use serde_json::Value;

use crate::remote::Target;

/// How long a server has to answer `/v1/health` to count as up.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a started server has to print `listening on`.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a started server has to stop after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// Lock file taken while looking for or starting the data dir's server.
const START_LOCK: &str = "mcp-start.lock";
/// Lock file every verb using the data dir's local server holds shared.
const USERS_LOCK: &str = "mcp-users.lock";
/// The pid and start time of the server an `openrun mcp` started (one `openrun up` started
/// is not noted: no `openrun mcp` stops it).
const CHILD_FILE: &str = "mcp-server.pid";
/// The log of a server started detached.
pub const SERVE_LOG: &str = "serve.log";

/// What to do when no server is configured and none runs on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Starting {
    /// Fail, saying how to name a server (`openrun mcp --no-start`).
    Never,
    /// Start a child server, its output on our stderr; [`LocalUse::finish`] stops it when no
    /// other user of the local server is left (`openrun mcp`).
    Child,
    /// Start a server in its own session, its output in `<data-dir>/serve.log`, and leave it
    /// running (`openrun up`).
    Detached,
}

/// A server this process started.
#[derive(Debug, Clone)]
pub struct Started {
    /// Its address.
    pub url: Url,
    /// Its pid.
    pub pid: u32,
    /// Its log file (detached servers only).
    pub log: Option<PathBuf>,
}

/// This process's use of the data dir's local server.
#[derive(Default)]
pub struct LocalUse {
    /// The server this process started as its child ([`Starting::Child`]).
    child: Option<Child>,
    /// The shared lock on [`USERS_LOCK`] while the local server is used.
    users: Option<std::fs::File>,
    /// Whether [`LocalUse::finish`] stops a started server no one else uses.
    stop_when_last: bool,
    /// The server this process started, if it did.
    pub started: Option<Started>,
}

/// The server to use (see the module documentation), with a key; the use of the data dir's
/// local server (and a started one) is in the [`LocalUse`], to be [`LocalUse::finish`]ed.
pub async fn choose(
    data_dir: &Path,
    server: Option<String>,
    api_key: Option<String>,
    starting: Starting,
) -> Result<(Target, LocalUse)> {
    let mut local = LocalUse {
        stop_when_last: starting != Starting::Detached,
        ..LocalUse::default()
    };
    match choose_into(data_dir, server, api_key, starting, &mut local).await {
        Ok(target) => Ok((target, local)),
        Err(e) => {
            // A child started for nothing is stopped again.
            local.finish(data_dir);
            Err(e)
        }
    }
}

/// [`choose`], noting the use of the local server in `local` as it goes.
async fn choose_into(
    data_dir: &Path,
    server: Option<String>,
    api_key: Option<String>,
    starting: Starting,
    local: &mut LocalUse,
) -> Result<Target> {
    let http = Target::client_builder()
        .timeout(HEALTH_TIMEOUT)
        .build()
        .context("cannot make an HTTP client")?;
    if let Some(target) = Target::resolve(server, api_key.clone(), data_dir)? {
        if let Err(e) = health(&http, &target.url).await {
            bail!(
                "the openrun server {} does not answer ({e:#}); start it (openrun serve) or \
                 name another with --server / OPENRUN_SERVER",
                target.url
            );
        }
        return with_key(target);
    }
    // One verb at a time looks for (and maybe starts) the data dir's server: two servers on
    // one data dir would fight over it.
    let start_lock = lock(data_dir, START_LOCK, LockKind::Exclusive).await?;
    if let Some(url) = local_server(data_dir) {
        if health(&http, &url).await.is_ok() {
            // No key (not even one given with --api-key) goes to a program that is not the
            // server that wrote local.json.
            match Target::local(&url, data_dir) {
                Some(mut target) => {
                    tracing::info!(%url, "using the local server of local.json");
                    if let Some(key) = api_key.clone().filter(|k| !k.trim().is_empty()) {
                        target.api_key = Some(key);
                    }
                    local.users = Some(lock(data_dir, USERS_LOCK, LockKind::Shared).await?);
                    return Ok(target);
                }
                None => tracing::warn!(
                    %url,
                    "the address in local.json answers but is not this data dir's server (or \
                     no key goes to it): starting one"
                ),
            }
        }
    }
    let (pid, addr, log) = match starting {
        Starting::Never => bail!(
            "no openrun server is configured and none answers on this machine: start one \
             (openrun serve), or name one with --server / OPENRUN_SERVER and its key with \
             OPENRUN_API_KEY (or drop --no-start to let openrun mcp start one)"
        ),
        Starting::Child => {
            let (child, addr) = start_child(data_dir).await?;
            let pid = child.id();
            if let Err(e) = write_child_file(data_dir, pid) {
                tracing::warn!(error = %e, "cannot note the started server's pid");
            }
            local.child = Some(child);
            (pid, addr, None)
        }
        Starting::Detached => {
            let (pid, addr, log) = start_detached(data_dir).await?;
            (pid, addr, Some(log))
        }
    };
    local.users = Some(lock(data_dir, USERS_LOCK, LockKind::Shared).await?);
    drop(start_lock);
    let url = format!("http://{addr}");
    let target = match Target::resolve(Some(url.clone()), api_key, data_dir)? {
        Some(target) => with_key(target)?,
        None => bail!("cannot use the started server at {url}"),
    };
    local.started = Some(Started {
        url: target.url.clone(),
        pid,
        log,
    });
    Ok(target)
}

impl LocalUse {
    /// Whether the server is the data dir's local one (found through `local.json`, or
    /// started), not a configured one: other verbs reach it with `--server URL` (the key
    /// comes from `local.json`).
    pub fn is_local(&self) -> bool {
        self.users.is_some()
    }

    /// Ends the use of the local server. For `openrun mcp` ([`Starting::Never`] and
    /// [`Starting::Child`]): stops the server an `openrun mcp` started when no other user is
    /// left (whichever of them started it); else leaves it to the last one. A verb that
    /// starts servers detached stops none.
    pub fn finish(self, data_dir: &Path) {
        let Some(users) = self.users else {
            return;
        };
        drop(users);
        if !self.stop_when_last {
            return;
        }
        // No one looks for the server while it may be stopping.
        let Ok(Some(_start)) = lock_now(&data_dir.join(START_LOCK), LockKind::Exclusive) else {
            return;
        };
        match lock_now(&data_dir.join(USERS_LOCK), LockKind::TryExclusive) {
            Ok(Some(_alone)) => {
                if let Some(child) = self.child {
                    stop(child);
                } else if let Some(pid) = started_server(data_dir) {
                    tracing::info!(pid, "stopping the server another openrun mcp started");
                    stop_pid(pid);
                }
                let _ = std::fs::remove_file(data_dir.join(CHILD_FILE));
            }
            Ok(None) => {
                if self.child.is_some() {
                    tracing::info!(
                        "leaving the started openrun server running: another openrun mcp uses \
                         it (the last one stops it)"
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot lock {USERS_LOCK}"),
        }
    }
}

/// How a lock file is taken.
#[derive(Debug, Clone, Copy)]
enum LockKind {
    Shared,
    Exclusive,
    /// Exclusive, or `None` at once when someone holds it.
    TryExclusive,
}

/// Opens `<data_dir>/<name>` and takes its `flock` (waiting, off the async threads).
async fn lock(data_dir: &Path, name: &str, kind: LockKind) -> Result<std::fs::File> {
    let path = data_dir.join(name);
    let shown = path.display().to_string();
    tokio::task::spawn_blocking(move || lock_now(&path, kind))
        .await
        .context("the lock task failed")?
        .and_then(|f| f.with_context(|| format!("{shown} is locked")))
        .with_context(|| format!("cannot lock {shown}"))
}

/// The blocking [`lock`]: `Ok(None)` when `TryExclusive` finds it held.
fn lock_now(path: &Path, kind: LockKind) -> Result<Option<std::fs::File>> {
    use rustix::fs::{flock, FlockOperation};
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    let operation = match kind {
        LockKind::Shared => FlockOperation::LockShared,
        LockKind::Exclusive => FlockOperation::LockExclusive,
        LockKind::TryExclusive => FlockOperation::NonBlockingLockExclusive,
    };
    match flock(&file, operation) {
        Ok(()) => Ok(Some(file)),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The start time of process `pid` (field 22 of `/proc/PID/stat`), telling a reused pid apart.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: count fields after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Notes the started server's pid and start time in [`CHILD_FILE`].
fn write_child_file(data_dir: &Path, pid: u32) -> std::io::Result<()> {
    let started = start_time(pid).unwrap_or(0);
    std::fs::write(data_dir.join(CHILD_FILE), format!("{pid} {started}\n"))
}

/// The pid of the server [`CHILD_FILE`] names, if that very process still runs.
fn started_server(data_dir: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(data_dir.join(CHILD_FILE)).ok()?;
    let mut fields = text.split_whitespace();
    let pid: u32 = fields.next()?.parse().ok()?;
    let started: u64 = fields.next()?.parse().ok()?;
    (pid != std::process::id() && start_time(pid) == Some(started)).then_some(pid)
}

/// SIGTERM to a server that is not our child, then SIGKILL after [`STOP_TIMEOUT`].
fn stop_pid(pid: u32) {
    let Some(target) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return;
    };
    let started = start_time(pid);
    let alive = || start_time(pid).is_some() && start_time(pid) == started;
    let _ = rustix::process::kill_process(target, rustix::process::Signal::TERM);
    let deadline = std::time::Instant::now() + STOP_TIMEOUT;
    while std::time::Instant::now() < deadline {
        if !alive() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if alive() {
        let _ = rustix::process::kill_process(target, rustix::process::Signal::KILL);
    }
}

/// `target`, which must have a key.
fn with_key(target: Target) -> Result<Target> {
    if target.api_key.is_none() {
        bail!(
            "no API key for the openrun server {}: set OPENRUN_API_KEY (openrun key create \
             makes one) or \"api_key\" in the config file",
            target.url
        );
    }
    Ok(target)
}

/// The server `<data_dir>/local.json` names, if any.
fn local_server(data_dir: &Path) -> Option<Url> {
    let bytes = std::fs::read(data_dir.join(crate::remote::LOCAL_FILE)).ok()?;
    let local: Value = serde_json::from_slice(&bytes).ok()?;
    Url::parse(local.get("server")?.as_str()?).ok()
}

/// `GET /v1/health`.
async fn health(http: &reqwest::Client, url: &Url) -> Result<()> {
    let answer = http
        .get(url.join("v1/health")?)
        .send()
        .await
        .context("no answer")?;
    if !answer.status().is_success() {
        bail!("/v1/health answered {}", answer.status());
    }
    Ok(())
}

/// `openrun --data-dir DIR serve --listen 127.0.0.1:0`, not yet spawned.
fn serve_command(data_dir: &Path) -> Result<Command> {
    let exe = std::env::current_exe().context("cannot find the openrun binary")?;
    let mut command = Command::new(exe);
    command
        .arg("--data-dir")
        .arg(data_dir)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .env_remove("OPENRUN_SERVER");
    Ok(command)
}

/// The address in the `listening on ADDR` line `openrun serve` prints first.
fn listening_address(line: &str) -> Option<String> {
    line.trim()
        .strip_prefix("listening on ")
        .map(|addr| addr.trim().to_string())
}

/// Starts `openrun serve --listen 127.0.0.1:0` on `data_dir` as a child (its log on our
/// stderr) and waits for its address.
async fn start_child(data_dir: &Path) -> Result<(Child, String)> {
    tracing::warn!(
        data_dir = %data_dir.display(),
        "no openrun server is configured or running: starting one"
    );
    let mut child = serve_command(data_dir)?
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start openrun serve")?;
    let stdout = child.stdout.take().context("no stdout of openrun serve")?;
    let first_line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        let mut reader = std::io::BufReader::new(stdout);
        let read = reader.read_line(&mut line).map(|_| line);
        // Anything it prints later goes to our stderr: stdout is the client's, and a closed
        // pipe would fail the server's writes.
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut reader, &mut std::io::stderr());
        });
        read
    });
    let line = match tokio::time::timeout(START_TIMEOUT, first_line).await {
        Ok(Ok(Ok(line))) => line,
        Ok(Ok(Err(e))) => {
            stop(child);
            return Err(e).context("cannot read what openrun serve printed");
        }
        Ok(Err(e)) => {
            stop(child);
            return Err(e).context("cannot read what openrun serve printed");
        }
        Err(_) => {
            stop(child);
            bail!("openrun serve did not start listening within {START_TIMEOUT:?}");
        }
    };
    match listening_address(&line) {
        Some(addr) => Ok((child, addr)),
        None => {
            // It printed something else: it may still run (or hang); stop it, do not wait
            // for it.
            stop_and_reap(&mut child);
            let status = child.try_wait().ok().flatten();
            bail!(
                "no openrun server is configured and starting one failed (openrun serve: {}; \
                 its messages are above). Start one yourself (openrun serve, as root), or name \
                 one with --server / OPENRUN_SERVER and OPENRUN_API_KEY",
                status.map_or_else(|| "no status".to_string(), |s| s.to_string())
            )
        }
    }
}

/// Starts `openrun serve --listen 127.0.0.1:0` on `data_dir` in a session of its own (no
/// terminal's Ctrl-C or hangup reaches it), stdout and stderr appended to
/// `<data_dir>/serve.log`, and waits for the `listening on` line it appends there. Returns
/// its pid, address and log. It is not waited for: when we exit, init adopts it.
async fn start_detached(data_dir: &Path) -> Result<(u32, String, PathBuf)> {
    let log_path = data_dir.join(SERVE_LOG);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let from = log.metadata().map(|m| m.len()).unwrap_or(0);
    let err_log = log
        .try_clone()
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let mut child = serve_command(data_dir)?
        .arg("--new-session")
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(err_log))
        .spawn()
        .context("cannot start openrun serve")?;
    let pid = child.id();
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    loop {
        let written = read_from(&log_path, from).unwrap_or_default();
        if let Some(addr) = written.lines().find_map(listening_address) {
            // Reaped by init once we are gone; nothing to keep.
            drop(child);
            return Ok((pid, addr, log_path));
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!(
                "no openrun server is configured and starting one failed (openrun serve: \
                 {status}); its log, {}:\n{}\nStart one yourself (openrun serve, as root), or \
                 name one with --server / OPENRUN_SERVER and OPENRUN_API_KEY",
                log_path.display(),
                tail(&written, 20)
            );
        }
        if tokio::time::Instant::now() >= deadline {
            stop_and_reap(&mut child);
            bail!(
                "openrun serve did not start listening within {START_TIMEOUT:?} (its log: {})",
                log_path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The text of `path` from byte `from` on.
fn read_from(path: &Path, from: u64) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    file.seek(std::io::SeekFrom::Start(from))?;
    let mut bytes = Vec::new();
    file.take(1 << 20).read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Stops a started server: SIGTERM, then SIGKILL after [`STOP_TIMEOUT`].
fn stop(mut child: Child) {
    stop_and_reap(&mut child);
}

/// [`stop`] of a child still needed afterwards (for its exit status).
fn stop_and_reap(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let pid = i32::try_from(child.id())
        .ok()
        .and_then(rustix::process::Pid::from_raw);
    if let Some(pid) = pid {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    let deadline = std::time::Instant::now() + STOP_TIMEOUT;
    while std::time::Instant::now() < deadline {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return,
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    tracing::warn!("the started openrun server did not stop: killing it");
    let _ = child.kill();
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listening_line_gives_the_address() {
        assert_eq!(
            listening_address("listening on 127.0.0.1:4000\n").as_deref(),
            Some("127.0.0.1:4000")
        );
        assert_eq!(listening_address("error: no root"), None);
        assert_eq!(tail("a\nb\nc", 2), "b\nc");
    }
}
