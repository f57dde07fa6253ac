//! `openrun-bench`: the measuring client of `bench/run`.
//!
//! Each subcommand times one thing from this one process and writes its samples as JSON (to
//! `--out`, else stdout) for `bench/report.py`; a one-line summary goes to stderr. Times are
//! milliseconds from [`Instant`] (CLOCK_MONOTONIC) around the whole client-visible operation.
//!
//! - `api`: create → exec `true` read to its exit line → delete, one sandbox after another over
//!   one keep-alive connection (create → first output = create + exec, client time included).
//! - `exec-rt`: exec `true` on one live sandbox, interleaved with a plain `fork`+`execve` of
//!   `/usr/bin/true` on the host and `std::process::Command` (posix_spawn) of the same.
//! - `api-throughput`: create + delete with N concurrent clients, each its own connection.
//! - `api-output`: exec `head -c BYTES /dev/zero`, the stream's base64 decoded and counted.
//! - `spawn`: a command run to completion by N concurrent workers (`{n}` in an argument is
//!   replaced by a unique number), for creates per second.
//! - `pipe`: commands' stdout read through a pipe and counted, for MB/s (runs interleaved).
//!
//! The HTTP client is [`http::Conn`], a blocking HTTP/1.1 keep-alive client on a `TcpStream`:
//! no async runtime or connection pool between the clock and the socket.

mod http;

use std::ffi::{CStr, CString};
use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine;
use clap::{Parser, Subcommand};
use serde_json::{json, Value};

use crate::http::{Conn, Lines};

/// Command line.
#[derive(Parser)]
#[command(about = "bench/run's measuring client (JSON samples for bench/report.py)")]
struct Cli {
    /// Write the JSON here instead of stdout.
    #[arg(long, global = true)]
    out: Option<String>,
    #[command(subcommand)]
    command: Cmd,
}

/// What to measure.
#[derive(Subcommand)]
enum Cmd {
    /// Create, exec `true` to its exit line, delete; one sandbox after another.
    Api {
        /// Server URL (`http://127.0.0.1:PORT`).
        url: String,
        /// API key.
        key: String,
        /// Timed sandboxes.
        #[arg(long, default_value_t = 200)]
        runs: usize,
        /// Untimed sandboxes first.
        #[arg(long, default_value_t = 5)]
        warmup: usize,
        /// Untimed pause after each sandbox (ms), so asynchronous teardown settles.
        #[arg(long, default_value_t = 20)]
        pause_ms: u64,
    },
    /// Exec `true` on one live sandbox vs fork+exec and posix_spawn of /usr/bin/true here.
    ExecRt {
        /// Server URL.
        url: String,
        /// API key.
        key: String,
        /// Timed rounds (each: one of every kind).
        #[arg(long, default_value_t = 300)]
        runs: usize,
        /// Untimed rounds first.
        #[arg(long, default_value_t = 10)]
        warmup: usize,
    },
    /// Create + delete with concurrent clients.
    ApiThroughput {
        /// Server URL.
        url: String,
        /// API key.
        key: String,
        /// Concurrent clients (one connection each).
        #[arg(long, default_value_t = 2)]
        clients: usize,
        /// Timed create+delete pairs in all.
        #[arg(long, default_value_t = 200)]
        total: u64,
    },
    /// Output throughput of exec: `head -c BYTES /dev/zero` read through the API.
    ApiOutput {
        /// Server URL.
        url: String,
        /// API key.
        key: String,
        /// Bytes the command writes.
        #[arg(long, default_value_t = 512 << 20)]
        bytes: u64,
        /// Timed runs (one untimed run of 1/8 the size first).
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// A command run to completion by concurrent workers, for runs per second.
    Spawn {
        /// Concurrent workers.
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Timed runs in all.
        #[arg(long, default_value_t = 200)]
        total: u64,
        /// Untimed runs first (by the same workers).
        #[arg(long, default_value_t = 10)]
        warmup: u64,
        /// The command; `{n}` in an argument becomes a number unique to the run.
        #[arg(trailing_var_arg = true, required = true)]
        cmd: Vec<String>,
    },
    /// Commands' stdout read through a pipe here and counted, for MB/s.
    Pipe {
        /// Timed rounds (one untimed round first); each round runs every command once.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// The commands, separated by `::`.
        #[arg(trailing_var_arg = true, required = true)]
        cmd: Vec<String>,
    },
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The middle value, for the stderr summary only (bench/report.py computes the tables).
fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// CPU time (user + system) this process has used so far.
fn cpu_time() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a `struct rusage` to a valid, writable pointer.
    let r = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    if r != 0 {
        return Duration::ZERO;
    }
    // SAFETY: getrusage succeeded, so the struct is initialised (and zeroed before anyway).
    let usage = unsafe { usage.assume_init() };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// What an exec stream said.
struct ExecEnd {
    /// When the exit line was read.
    exit_at: Instant,
    /// Decoded stdout + stderr bytes.
    bytes: u64,
    /// Bytes the stream skipped (offset jumps: the agent keeps a bounded buffer per stream
    /// and a client that falls behind loses the oldest output).
    skipped: u64,
}

/// One NDJSON line of an exec stream.
#[derive(serde::Deserialize)]
struct Line<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(default, borrow)]
    data_b64: Option<&'a str>,
    #[serde(default)]
    offset: Option<u64>,
    #[serde(default)]
    code: Option<Value>,
}

/// The sandbox API over one connection.
struct Api {
    conn: Conn,
    decoded: Vec<u8>,
}

impl Api {
    fn connect(url: &str, key: &str) -> Result<Api> {
        let conn = Conn::connect(url, key).with_context(|| format!("connecting to {url}"))?;
        Ok(Api {
            conn,
            decoded: Vec::new(),
        })
    }

    /// `POST /v1/sandboxes {}`: the id.
    fn create(&mut self) -> Result<String> {
        let r = self.conn.call("POST", "/v1/sandboxes", b"{}")?;
        if r.status != 201 {
            bail!(
                "create: {} {}",
                r.status,
                String::from_utf8_lossy(&r.body[..r.body.len().min(300)])
            );
        }
        let v: Value = serde_json::from_slice(&r.body).context("create answer")?;
        v["id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("create answer without an id"))
    }

    /// `DELETE /v1/sandboxes/{id}`.
    fn delete(&mut self, id: &str) -> Result<()> {
        let r = self
            .conn
            .call("DELETE", &format!("/v1/sandboxes/{id}"), b"")?;
        if r.status != 204 {
            bail!("delete: {} {}", r.status, String::from_utf8_lossy(&r.body));
        }
        Ok(())
    }

    /// `POST /v1/sandboxes/{id}/exec` read to its end; fails unless it exits 0.
    fn exec(&mut self, id: &str, cmd: &[&str]) -> Result<ExecEnd> {
        let body = serde_json::to_vec(&json!({ "cmd": cmd }))?;
        let mut lines = Lines::default();
        let mut bytes = 0u64;
        let mut next = [0u64; 2];
        let mut skipped = 0u64;
        let mut exit: Option<(Instant, Option<Value>)> = None;
        let mut failure: Option<String> = None;
        let decoded = &mut self.decoded;
        let status = self.conn.stream(
            "POST",
            &format!("/v1/sandboxes/{id}/exec"),
            &body,
            &mut |piece| {
                lines.feed(piece, &mut |line| {
                    let parsed: Line = match serde_json::from_slice(line) {
                        Ok(l) => l,
                        Err(e) => {
                            failure.get_or_insert_with(|| format!("bad line: {e}"));
                            return;
                        }
                    };
                    match parsed.kind {
                        "exit" => exit = Some((Instant::now(), parsed.code)),
                        "stdout" | "stderr" => {
                            decoded.clear();
                            let data = parsed.data_b64.unwrap_or("");
                            let next = &mut next[usize::from(parsed.kind == "stderr")];
                            match base64::engine::general_purpose::STANDARD
                                .decode_vec(data, decoded)
                            {
                                Ok(()) => {
                                    let offset = parsed.offset.unwrap_or(*next);
                                    skipped += offset.saturating_sub(*next);
                                    *next = offset + decoded.len() as u64;
                                    bytes += decoded.len() as u64;
                                }
                                Err(e) => {
                                    failure.get_or_insert_with(|| format!("bad base64: {e}"));
                                }
                            }
                        }
                        "error" => {
                            failure.get_or_insert_with(|| String::from_utf8_lossy(line).into());
                        }
                        _ => {}
                    }
                })
            },
        )?;
        if status != 200 {
            bail!("exec: status {status}");
        }
        if !lines.rest().is_empty() {
            failure.get_or_insert_with(|| "the stream ended in the middle of a line".into());
        }
        if let Some(f) = failure {
            bail!("exec {cmd:?}: {f}");
        }
        match exit {
            Some((exit_at, Some(code))) if code == json!(0) => Ok(ExecEnd {
                exit_at,
                bytes,
                skipped,
            }),
            Some((_, code)) => bail!("exec {cmd:?} exited with {code:?}"),
            None => bail!("exec {cmd:?}: the stream ended without an exit line"),
        }
    }
}

/// `fork` + `execve` of a program with no arguments beyond its name, and wait for it.
fn fork_exec(path: &CStr) -> Result<()> {
    let argv = [path.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null()];
    // SAFETY: between fork and execve the child calls only execve and _exit, both
    // async-signal-safe, on pointers made before the fork; this process has one thread when it
    // runs exec-rt.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: see above; argv and envp are NULL-terminated arrays of valid C strings.
        unsafe {
            libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
            libc::_exit(127);
        }
    }
    if pid < 0 {
        return Err(std::io::Error::last_os_error()).context("fork");
    }
    let mut status = 0;
    loop {
        // SAFETY: waits for our own child; `status` is a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err).context("waitpid");
        }
    }
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        bail!("{path:?} ended with status {status:#x}");
    }
    Ok(())
}

fn api(url: &str, key: &str, runs: usize, warmup: usize, pause: Duration) -> Result<Value> {
    let mut api = Api::connect(url, key)?;
    let (mut create, mut exec, mut first, mut delete) = (vec![], vec![], vec![], vec![]);
    for i in 0..warmup + runs {
        let t0 = Instant::now();
        let id = api.create()?;
        let t1 = Instant::now();
        let end = api.exec(&id, &["true"])?;
        let t2 = Instant::now();
        api.delete(&id)?;
        let t3 = Instant::now();
        if i >= warmup {
            create.push(ms(t1 - t0));
            exec.push(ms(end.exit_at - t1));
            first.push(ms(end.exit_at - t0));
            delete.push(ms(t3 - t2));
        }
        std::thread::sleep(pause);
    }
    eprintln!(
        "api: create {:.2} ms, create -> first output {:.2} ms, delete {:.2} ms (medians of {runs})",
        median(&create),
        median(&first),
        median(&delete)
    );
    Ok(json!({
        "runs": runs, "warmup": warmup, "pause_ms": ms(pause),
        "create_ms": create, "exec_true_ms": exec, "create_first_output_ms": first,
        "delete_ms": delete,
    }))
}

fn exec_rt(url: &str, key: &str, runs: usize, warmup: usize) -> Result<Value> {
    let mut api = Api::connect(url, key)?;
    let id = api.create()?;
    let path = CString::new("/usr/bin/true")?;
    let (mut sandbox, mut fork, mut spawn) = (vec![], vec![], vec![]);
    let result = (|| -> Result<()> {
        for i in 0..warmup + runs {
            let t0 = Instant::now();
            let end = api.exec(&id, &["true"])?;
            let t1 = Instant::now();
            fork_exec(&path)?;
            let t2 = Instant::now();
            let status = Command::new("/usr/bin/true").status()?;
            let t3 = Instant::now();
            if !status.success() {
                bail!("/usr/bin/true: {status}");
            }
            if i >= warmup {
                sandbox.push(ms(end.exit_at - t0));
                fork.push(ms(t2 - t1));
                spawn.push(ms(t3 - t2));
            }
        }
        Ok(())
    })();
    api.delete(&id)?;
    result?;
    eprintln!(
        "exec-rt: sandbox exec true {:.3} ms, host fork+exec {:.3} ms, host posix_spawn {:.3} ms",
        median(&sandbox),
        median(&fork),
        median(&spawn)
    );
    Ok(json!({
        "runs": runs, "warmup": warmup,
        "api_exec_true_ms": sandbox, "host_fork_exec_ms": fork, "host_posix_spawn_ms": spawn,
    }))
}

/// Runs `op` from `workers` threads until `total` timed calls are done (after `warmup`
/// untimed ones); returns the wall time of the timed part and each call's time.
fn concurrently<S>(
    workers: usize,
    total: u64,
    warmup: u64,
    setup: impl Fn() -> Result<S> + Sync,
    op: impl Fn(&mut S, u64) -> Result<()> + Sync,
) -> Result<(f64, Vec<f64>)> {
    let next = AtomicU64::new(0);
    let start = Barrier::new(workers);
    let started = std::sync::OnceLock::new();
    let results: Vec<Result<Vec<f64>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let (next, start, started, setup, op) = (&next, &start, &started, &setup, &op);
                scope.spawn(move || -> Result<Vec<f64>> {
                    let mut state = setup()?;
                    // Warm-up: `warmup` calls split over the workers.
                    let mut n = w as u64;
                    while n < warmup {
                        op(&mut state, u64::MAX - n)?;
                        n += workers as u64;
                    }
                    start.wait();
                    started.get_or_init(Instant::now);
                    let mut times = vec![];
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= total {
                            return Ok(times);
                        }
                        let t = Instant::now();
                        op(&mut state, i)?;
                        times.push(ms(t.elapsed()));
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("a worker panicked")))
            })
            .collect()
    });
    let wall = started.get().map(|t| t.elapsed()).unwrap_or_default();
    let mut times = vec![];
    for r in results {
        times.extend(r?);
    }
    Ok((wall.as_secs_f64(), times))
}

fn api_throughput(url: &str, key: &str, clients: usize, total: u64) -> Result<Value> {
    let (wall, times) = concurrently(
        clients,
        total,
        0,
        || Api::connect(url, key),
        |api, _| {
            let id = api.create()?;
            api.delete(&id)
        },
    )?;
    let per_s = total as f64 / wall;
    eprintln!(
        "api-throughput: {clients} clients, {total} create+delete in {wall:.2} s = {per_s:.0}/s"
    );
    Ok(json!({
        "clients": clients, "total": total, "seconds": wall, "per_s": per_s, "op_ms": times,
    }))
}

fn api_output(url: &str, key: &str, bytes: u64, runs: usize) -> Result<Value> {
    let mut api = Api::connect(url, key)?;
    let id = api.create()?;
    let (mut seconds, mut delivered, mut skipped, mut cpu) = (vec![], vec![], vec![], vec![]);
    let result = (|| -> Result<()> {
        for i in 0..=runs {
            let n = if i == 0 { (bytes / 8).max(1) } else { bytes };
            let count = n.to_string();
            let c0 = cpu_time();
            let t0 = Instant::now();
            let end = api.exec(&id, &["head", "-c", &count, "/dev/zero"])?;
            let c1 = cpu_time();
            if end.bytes + end.skipped != n {
                bail!(
                    "head -c {n} /dev/zero: {} bytes came through and {} were skipped",
                    end.bytes,
                    end.skipped
                );
            }
            if i > 0 {
                seconds.push((end.exit_at - t0).as_secs_f64());
                delivered.push(end.bytes);
                skipped.push(end.skipped);
                cpu.push((c1 - c0).as_secs_f64());
            }
        }
        Ok(())
    })();
    api.delete(&id)?;
    result?;
    // What reached the client per second; skipped bytes are not counted.
    let mb_s: Vec<f64> = seconds
        .iter()
        .zip(&delivered)
        .map(|(s, &b)| b as f64 / 1e6 / s)
        .collect();
    eprintln!(
        "api-output: {:.0} MB/s delivered (median of {runs}), skipped {skipped:?} of {bytes}",
        median(&mb_s)
    );
    Ok(json!({
        "bytes": bytes, "runs": runs, "seconds": seconds, "mb_s": mb_s,
        "delivered": delivered, "skipped": skipped, "client_cpu_seconds": cpu,
    }))
}

fn spawn(workers: usize, total: u64, warmup: u64, cmd: &[String]) -> Result<Value> {
    let (program, args) = cmd.split_first().ok_or_else(|| anyhow!("no command"))?;
    let (wall, times) = concurrently(
        workers,
        total,
        warmup,
        || Ok(()),
        |_, n| {
            let status = Command::new(program)
                .args(args.iter().map(|a| a.replace("{n}", &n.to_string())))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .status()
                .with_context(|| format!("running {program}"))?;
            if !status.success() {
                bail!("{cmd:?}: {status}");
            }
            Ok(())
        },
    )?;
    let per_s = total as f64 / wall;
    eprintln!("spawn: {workers} workers, {total} runs of {program} in {wall:.2} s = {per_s:.0}/s");
    Ok(json!({
        "command": cmd.join(" "), "workers": workers, "total": total, "warmup": warmup,
        "seconds": wall, "per_s": per_s, "op_ms": times,
    }))
}

/// One run of a command with its stdout read through a pipe: (bytes, seconds, reader CPU s).
fn pipe_once(program: &str, args: &[String], buf: &mut [u8]) -> Result<(u64, f64, f64)> {
    let c0 = cpu_time();
    let t0 = Instant::now();
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program}"))?;
    let mut out = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut n = 0u64;
    loop {
        match out.read(buf) {
            Ok(0) => break,
            Ok(k) => n += k as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let status = child.wait()?;
    let elapsed = t0.elapsed().as_secs_f64();
    let used = (cpu_time() - c0).as_secs_f64();
    if !status.success() {
        bail!("{program} {args:?}: {status}");
    }
    Ok((n, elapsed, used))
}

/// Commands separated by `::`, run in turn (one untimed round first, then `runs` rounds, each
/// round one run of every command), so they share the machine's noise.
fn pipe(runs: usize, cmd: &[String]) -> Result<Value> {
    let cmds: Vec<&[String]> = cmd.split(|a| a == "::").filter(|c| !c.is_empty()).collect();
    let mut buf = vec![0u8; 1 << 20];
    let mut samples = vec![(vec![], vec![], vec![]); cmds.len()];
    for round in 0..=runs {
        for (c, (bytes, seconds, cpu)) in cmds.iter().zip(samples.iter_mut()) {
            let (program, args) = c.split_first().ok_or_else(|| anyhow!("no command"))?;
            let (n, elapsed, used) = pipe_once(program, args, &mut buf)?;
            if round > 0 {
                bytes.push(n);
                seconds.push(elapsed);
                cpu.push(used);
            }
        }
    }
    let mut out = vec![];
    for (c, (bytes, seconds, cpu)) in cmds.iter().zip(samples) {
        let mb_s: Vec<f64> = seconds
            .iter()
            .zip(&bytes)
            .map(|(s, &b)| b as f64 / 1e6 / s)
            .collect();
        eprintln!(
            "pipe: {}: {:.0} MB/s (median of {runs})",
            c.join(" "),
            median(&mb_s)
        );
        out.push(json!({
            "command": c.join(" "), "runs": runs, "bytes": bytes, "seconds": seconds,
            "mb_s": mb_s, "client_cpu_seconds": cpu,
        }));
    }
    Ok(json!({ "commands": out }))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let value = match &cli.command {
        Cmd::Api {
            url,
            key,
            runs,
            warmup,
            pause_ms,
        } => api(url, key, *runs, *warmup, Duration::from_millis(*pause_ms))?,
        Cmd::ExecRt {
            url,
            key,
            runs,
            warmup,
        } => exec_rt(url, key, *runs, *warmup)?,
        Cmd::ApiThroughput {
            url,
            key,
            clients,
            total,
        } => api_throughput(url, key, *clients, *total)?,
        Cmd::ApiOutput {
            url,
            key,
            bytes,
            runs,
        } => api_output(url, key, *bytes, *runs)?,
        Cmd::Spawn {
            workers,
            total,
            warmup,
            cmd,
        } => spawn(*workers, *total, *warmup, cmd)?,
        Cmd::Pipe { runs, cmd } => pipe(*runs, cmd)?,
    };
    let text = serde_json::to_string(&value)?;
    match &cli.out {
        Some(path) => std::fs::write(path, text).with_context(|| format!("writing {path}"))?,
        None => println!("{text}"),
    }
    Ok(())
}
