//! The code interpreter of E2B's `code-interpreter-v1` template (port 49999, fact sheet §5.4):
//! `POST /execute` streams NDJSON; `/contexts` creates, lists, restarts and removes contexts.
//!
//! A context is one long-running Python process inside the sandbox, the kernel
//! ([`kernel.py`](KERNEL), embedded here): it keeps the context's variables and runs code like
//! a Jupyter kernel (the last expression is the result, rich `_repr_*_` formats, `display()`,
//! matplotlib figures, output of subprocesses captured at the file-descriptor level); in a
//! `bash` context it runs a persistent bash that `source`s each execution. It is
//! started with [`start_background`] (stdin kept open) and tagged
//! `e2b-context:<id>:<language>[:default]`, so the process table *is* the list of contexts: a
//! restarted server finds them again, nothing here is state that a restart loses (but the
//! locks below, which only order requests in flight).
//!
//! An execution writes one JSON request line to the kernel's stdin ([`write_stdin`]) and
//! follows its stdout from the offset it had ([`follow_output`]): the kernel answers with E2B's
//! own lines tagged with the request's id, then `end_of_execution`. Executions of one context
//! run one at a time. When the client goes away mid-execution (the SDK's `timeout` is
//! client-side), the kernel is interrupted (SIGINT: `KeyboardInterrupt`), so the context stays
//! usable; a kernel that does not stop is killed and starts afresh on the next use, as does a
//! kernel that died (`os._exit`, out of memory). While nothing is produced the stream carries
//! `{"type":"keepalive"}` lines (the SDK skips them): only a write shows that the client left.
//! The last line is `{"type":"end_of_execution"}`.
//!
//! Contexts are namespaces within one sandbox, not a security boundary: every kernel runs as
//! the sandbox's user, and code in a context can forge its own kernel's output (end its own
//! stream early). The oldest running process with a context's tag is its kernel; later ones
//! with the same tag are ignored.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex as SyncMutex, OnceLock};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use axum::{Extension, Json, Router};
use openrun_protocol::{AttachRequest, ExecRequest, Pid, ProcessInfo, ProcessState, MAX_DATA_LEN};
use tokio::sync::{mpsc, Mutex, OwnedMutexGuard};
use tokio::time::{sleep, timeout, Instant};

use super::SandboxCtx;
use crate::api::{check_env, Shared};
use crate::error::ApiError;
use crate::exec::{start_background, Line};
use crate::processes::{
    follow_output, list_processes, process_status, release_process, signal_process, write_stdin,
};

/// The kernel's source, sent to the bootstrap on its stdin.
const KERNEL: &str = include_str!("kernel.py");

/// `python3 -c` program that reads `<length>\n<source>` from stdin and runs the source; it keeps
/// the kernel out of the process table's command line.
const BOOTSTRAP: &str = "import os
def r(n):
    b=b''
    while len(b)<n:
        c=os.read(0,n-len(b))
        if not c: raise SystemExit(3)
        b+=c
    return b
h=b''
while not h.endswith(b'\\n'):
    c=os.read(0,1)
    if not c: raise SystemExit(3)
    h+=c
exec(compile(r(int(h)),'<openrun-kernel>','exec'))
";

/// The interpreter every context runs.
const PYTHON: &str = "python3";

/// Tag prefix of kernel processes.
const TAG_PREFIX: &str = "e2b-context:";

/// How long a new kernel may take to say it is ready.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Silence after which the stream carries a keepalive line.
const KEEPALIVE: Duration = Duration::from_secs(1);

/// After the client left: a first SIGINT to the kernel, a second to its process group after
/// [`INTERRUPT_AGAIN`], SIGKILL to the group after [`INTERRUPT_KILL`].
const INTERRUPT_AGAIN: Duration = Duration::from_secs(3);
/// See [`INTERRUPT_AGAIN`].
const INTERRUPT_KILL: Duration = Duration::from_secs(10);

/// How long a killed kernel may take to be reported exited.
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);

/// Code longer than this is recorded in the timeline cut to this many bytes.
const RECORDED_CODE: usize = 64 << 10;

const SIGINT: i32 = 2;
const SIGKILL: i32 = 9;

/// The routes of this module.
pub(super) fn routes() -> Router<Shared> {
    Router::new()
        .route(
            "/execute",
            post(|State(s), Extension(ctx), body: Body| async move {
                answer(&ctx, execute(s, &ctx, body).await)
            }),
        )
        .route(
            "/contexts",
            post(|State(s), Extension(ctx), body| async move {
                answer(&ctx, create_context(s, &ctx, body).await)
            })
            .get(|State(s), Extension(ctx)| async move {
                answer(&ctx, list_contexts(s, &ctx).await)
            }),
        )
        .route(
            "/contexts/{id}",
            delete(|State(s), Extension(ctx), Path(id)| async move {
                answer(&ctx, remove_context(s, &ctx, id).await)
            }),
        )
        .route(
            "/contexts/{id}/restart",
            post(|State(s), Extension(ctx), Path(id)| async move {
                answer(&ctx, restart_context(s, &ctx, id).await)
            }),
        )
}

/// Prefix of the message of an unknown context (a 404 of its own, unlike a sandbox that went
/// away, which is E2B's 502).
const NO_CONTEXT: &str = "Context ";

/// The HTTP answer of a handler: errors of the core calls through [`super::sandbox_error`]
/// (a sandbox that went away is E2B's 502), an unknown context a 404. Only port 49999
/// serves the interpreter.
fn answer(ctx: &SandboxCtx, result: Result<Response, ApiError>) -> Response {
    if ctx.port != super::INTERPRETER_PORT {
        return super::error(
            StatusCode::NOT_FOUND,
            format!(
                "the code interpreter answers on port {}, not {}",
                super::INTERPRETER_PORT,
                ctx.port
            ),
        );
    }
    match result {
        Ok(response) => response,
        Err(ApiError::NotFound(message)) if message.starts_with(NO_CONTEXT) => {
            super::error(StatusCode::NOT_FOUND, message)
        }
        Err(e) => super::sandbox_error(ctx, e),
    }
}

// ---------------------------------------------------------------------------------------------
// Contexts in the process table.

/// What a kernel's tag says.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ContextTag {
    /// Context id: 32 lowercase hex digits.
    id: String,
    /// Language: `python` or `bash`.
    language: String,
    /// The default context of its language (the one `/execute` without `context_id` uses).
    default: bool,
}

impl ContextTag {
    fn render(&self) -> String {
        let suffix = if self.default { ":default" } else { "" };
        format!("{TAG_PREFIX}{}:{}{suffix}", self.id, self.language)
    }

    fn parse(tag: &str) -> Option<Self> {
        let rest = tag.strip_prefix(TAG_PREFIX)?;
        let mut parts = rest.split(':');
        let id = parts.next()?;
        let language = parts.next()?;
        let default = match parts.next() {
            None => false,
            Some("default") => true,
            Some(_) => return None,
        };
        if parts.next().is_some() || !valid_id(id) || language.is_empty() {
            return None;
        }
        Some(Self {
            id: id.to_string(),
            language: language.to_string(),
            default,
        })
    }
}

/// Whether `id` has the form of a context id (32 lowercase hex digits).
fn valid_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A new context id: 128 random bits.
fn new_id() -> Result<String, ApiError> {
    crate::keys::random_hex(16).map_err(|e| ApiError::internal("cannot make a context id", e))
}

/// One context: its tag and its kernel process.
#[derive(Debug, Clone)]
struct Context {
    tag: ContextTag,
    /// The running kernel (the oldest, if several run with its tag), or else the newest one
    /// that ended.
    kernel: ProcessInfo,
    /// Every process of the context that has ended (to release when it restarts or goes).
    ended: Vec<Pid>,
}

impl Context {
    fn running(&self) -> bool {
        matches!(self.kernel.state, ProcessState::Running)
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.tag.id,
            "language": self.tag.language,
            "cwd": self.kernel.cwd,
        })
    }
}

/// The contexts in a process table, in the order their kernels started.
///
/// This server never runs two kernels of one context at once (a new one starts only after the
/// old one is reported exited). A second running process with the same tag was started by
/// someone else (a process of the sandbox with a copied tag): the oldest running process keeps
/// the context, the later ones are ignored, neither used nor released.
fn contexts_of(processes: Vec<ProcessInfo>) -> Vec<Context> {
    let mut by_id: BTreeMap<String, Context> = BTreeMap::new();
    let running = |p: &ProcessInfo| matches!(p.state, ProcessState::Running);
    for process in processes {
        let Some(tag) = process.tag.as_deref().and_then(ContextTag::parse) else {
            continue;
        };
        let entry = by_id.entry(tag.id.clone()).or_insert_with(|| Context {
            tag: tag.clone(),
            kernel: process.clone(),
            ended: Vec::new(),
        });
        if !running(&process) {
            entry.ended.push(process.pid);
        }
        let age = |p: &ProcessInfo| (p.started_at_ms, p.pid);
        let better = match (running(&process), running(&entry.kernel)) {
            (true, false) => true,
            (false, true) => false,
            // Two running: the oldest is the context's, the other an impostor.
            (true, true) => {
                if process.pid != entry.kernel.pid {
                    tracing::warn!(
                        context = %tag.id,
                        pids = ?(entry.kernel.pid, process.pid),
                        "two running processes carry one context's tag: the oldest keeps it"
                    );
                }
                age(&process) < age(&entry.kernel)
            }
            (false, false) => age(&process) > age(&entry.kernel),
        };
        if better {
            // Its tag (language, default) is the one of the process that keeps the context.
            entry.tag = tag;
            entry.kernel = process;
        }
    }
    let mut all: Vec<Context> = by_id.into_values().collect();
    all.sort_by_key(|c| (c.kernel.started_at_ms, c.kernel.pid));
    all
}

async fn contexts(s: &Shared, ctx: &SandboxCtx) -> Result<Vec<Context>, ApiError> {
    Ok(contexts_of(
        list_processes(s, &ctx.caller, &ctx.sandbox_id).await?,
    ))
}

/// The context `id` of the sandbox: 404 when there is none.
async fn find_context(s: &Shared, ctx: &SandboxCtx, id: &str) -> Result<Context, ApiError> {
    if !valid_id(id) {
        return Err(not_found(id));
    }
    contexts(s, ctx)
        .await?
        .into_iter()
        .find(|c| c.tag.id == id)
        .ok_or_else(|| not_found(id))
}

/// The language of a request: `python` when none is given.
fn language(requested: Option<&str>) -> Result<String, ApiError> {
    let language = requested.map(|l| l.trim().to_ascii_lowercase());
    match language.as_deref() {
        None | Some("") | Some("python") | Some("python3") => Ok("python".to_string()),
        Some("bash") => Ok("bash".to_string()),
        Some(other) => Err(ApiError::InvalidArgument(format!(
            "language {other:?} is not supported: openrun's code interpreter runs python and \
             bash (omit the language for python)"
        ))),
    }
}

// ---------------------------------------------------------------------------------------------
// Locks: one execution (or restart, removal) per context at a time; one creation of a default
// context per sandbox and language. Context ids are validated before they key anything, and the
// two kinds of keys have their own prefixes.

/// What this server is doing to a context on purpose, set before it kills the kernel: the
/// execution in flight then says why its kernel ended, the ones queued behind it do not start
/// the kernel again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// `DELETE /contexts/{id}`: executions queued behind it are 404s.
    Removed,
    /// `POST /contexts/{id}/restart`: executions queued behind it wait for the fresh kernel.
    Restarting,
}

/// The lock of one context and what is being done to it.
#[derive(Default)]
struct Slot {
    lock: Arc<Mutex<()>>,
    ending: SyncMutex<Option<Ending>>,
}

impl Slot {
    fn ending(&self) -> Option<Ending> {
        *self.ending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_ending(&self, ending: Option<Ending>) {
        *self.ending.lock().unwrap_or_else(|p| p.into_inner()) = ending;
    }
}

fn slot_for(key: String) -> Arc<Slot> {
    static SLOTS: OnceLock<SyncMutex<HashMap<String, Arc<Slot>>>> = OnceLock::new();
    let slots = SLOTS.get_or_init(Default::default);
    let mut map = slots.lock().unwrap_or_else(|p| p.into_inner());
    // Forget the slots nobody holds or waits for, so the map stays small.
    if map.len() > 256 {
        map.retain(|_, slot| Arc::strong_count(slot) > 1 || Arc::strong_count(&slot.lock) > 1);
    }
    map.entry(key).or_default().clone()
}

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!("{NO_CONTEXT}{id} not found"))
}

/// The slot of context `id` (a valid id: see [`lock_context`]).
fn context_slot(ctx: &SandboxCtx, id: &str) -> Arc<Slot> {
    slot_for(format!("context/{}/{id}", ctx.sandbox_id))
}

/// Waits for the lock of context `id`: a 404 when the context was removed meanwhile; behind a
/// restart that began meanwhile (the execution then runs in the fresh kernel).
async fn lock_context(
    ctx: &SandboxCtx,
    id: &str,
) -> Result<(Arc<Slot>, OwnedMutexGuard<()>), ApiError> {
    if !valid_id(id) {
        return Err(not_found(id));
    }
    let slot = context_slot(ctx, id);
    let deadline = Instant::now() + START_TIMEOUT + EXIT_TIMEOUT;
    loop {
        let guard = slot.lock.clone().lock_owned().await;
        match slot.ending() {
            None => return Ok((slot, guard)),
            Some(Ending::Removed) => {
                return Err(ApiError::NotFound(format!(
                    "{NO_CONTEXT}{id} not found: it was removed (DELETE /contexts/{id})"
                )))
            }
            Some(Ending::Restarting) if Instant::now() < deadline => {
                drop(guard);
                sleep(Duration::from_millis(50)).await;
            }
            Some(Ending::Restarting) => return Ok((slot, guard)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Kernels.

/// How much of a kernel's stderr before it was ready is kept (its tail) for the error.
const STARTUP_STDERR: usize = 64 << 10;

/// Starts a kernel for `tag` in `cwd` and waits for it to be ready; answers its pid and cwd. A
/// kernel that exits or does not get ready in time is killed and released (no context row is
/// left behind).
async fn start_kernel(
    s: &Shared,
    ctx: &SandboxCtx,
    tag: &ContextTag,
    cwd: Option<String>,
) -> Result<(Pid, String), ApiError> {
    let request = ExecRequest {
        argv: vec![PYTHON.into(), "-c".into(), BOOTSTRAP.into()],
        cwd: cwd.clone(),
        user: ctx.user.clone(),
        stdin: true,
        tag: Some(tag.render()),
        // The kernel reads (and removes) it: a bash context runs a persistent bash.
        env: BTreeMap::from([("OPENRUN_KERNEL_LANGUAGE".to_string(), tag.language.clone())]),
        ..Default::default()
    };
    let pid = match start_background(s, &ctx.caller, &ctx.sandbox_id, request).await {
        Ok(pid) => pid,
        Err(e) if e.status_and_code().1 == "command_not_found" => {
            return Err(ApiError::InvalidArgument(format!(
                "the code interpreter needs {PYTHON} in the sandbox, and this sandbox's image \
                 has none ({e}); use a template whose image has Python, such as \
                 code-interpreter-v1"
            )))
        }
        // The agent's "no such directory": the cwd asked for (404 would read as a missing
        // context to the SDK).
        Err(e)
            if cwd.is_some()
                && matches!(e, ApiError::Agent(_))
                && e.status_and_code().0 == StatusCode::NOT_FOUND =>
        {
            return Err(ApiError::InvalidArgument(format!(
                "cannot start the context in {}: {e}",
                cwd.unwrap_or_default()
            )))
        }
        Err(e) => return Err(e),
    };
    match wait_ready(s, ctx, pid).await {
        Ok(cwd) => Ok((pid, cwd)),
        Err(e) => {
            discard(s, ctx, pid).await;
            Err(e)
        }
    }
}

/// Sends the kernel's source to the bootstrap `pid` and waits for its ready line.
async fn wait_ready(s: &Shared, ctx: &SandboxCtx, pid: Pid) -> Result<String, ApiError> {
    let mut input = format!("{}\n", KERNEL.len()).into_bytes();
    input.extend_from_slice(KERNEL.as_bytes());
    let attach = AttachRequest {
        pid,
        follow: true,
        ..Default::default()
    };
    let mut lines = follow_output(s, &ctx.caller, &ctx.sandbox_id, attach).await?;
    write_stdin(s, &ctx.caller, &ctx.sandbox_id, pid, input, false).await?;
    let mut stdout = LineBuffer::default();
    let mut stderr = Vec::new();
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let line = match timeout(
            deadline.saturating_duration_since(Instant::now()),
            lines.recv(),
        )
        .await
        {
            Ok(Some(line)) => line,
            Ok(None) => {
                return Err(ApiError::internal(
                    "the kernel did not start",
                    "stream ended",
                ))
            }
            Err(_) => {
                return Err(ApiError::internal(
                    "the Python kernel did not start in time",
                    format!("no ready line within {START_TIMEOUT:?}"),
                ));
            }
        };
        match line {
            Line::Stdout { offset, data } => {
                for event in stdout.push(offset, &data) {
                    let Event::Message(message) = event else {
                        continue;
                    };
                    if message.get("type").and_then(|t| t.as_str()) == Some("ready") {
                        let cwd = message
                            .get("cwd")
                            .and_then(|c| c.as_str())
                            .unwrap_or_default()
                            .to_string();
                        return Ok(cwd);
                    }
                }
            }
            Line::Stderr { data, .. } => {
                // Only the tail matters (the last lines of a traceback).
                stderr.extend_from_slice(&data);
                if stderr.len() > STARTUP_STDERR {
                    stderr.drain(..stderr.len() - STARTUP_STDERR);
                }
            }
            Line::Exit { code, signal, .. } => {
                let text = String::from_utf8_lossy(&stderr);
                let tail: String = text.trim().chars().rev().take(2000).collect();
                let tail: String = tail.chars().rev().collect();
                return Err(ApiError::InvalidArgument(format!(
                    "the Python kernel exited before it was ready ({}){}{}",
                    exit_text(code, signal),
                    if tail.is_empty() { "" } else { ": " },
                    tail
                )));
            }
            Line::Error { message, .. } => {
                return Err(ApiError::internal("the kernel did not start", message))
            }
            Line::Started { .. } => {}
        }
    }
}

/// Gets rid of a kernel that never became ready: killed if it runs, released once it ended
/// (errors are logged: the caller reports the reason it failed).
async fn discard(s: &Shared, ctx: &SandboxCtx, pid: Pid) {
    let result = async {
        kill_kernel(s, ctx, pid).await?;
        wait_exited(s, ctx, pid).await?;
        release(s, ctx, pid).await
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(pid, error = %e, "cannot discard a kernel that did not start");
    }
}

fn exit_text(code: Option<i32>, signal: Option<i32>) -> String {
    match (code, signal) {
        (_, Some(SIGKILL)) => "killed by signal 9 (SIGKILL)".to_string(),
        (_, Some(signal)) => format!("killed by signal {signal}"),
        (Some(code), None) => format!("exit code {code}"),
        (None, None) => "no exit status".to_string(),
    }
}

/// Whether `pid` is still a running process of the sandbox (one gone from the table is not).
async fn is_running(s: &Shared, ctx: &SandboxCtx, pid: Pid) -> Result<bool, ApiError> {
    match process_status(s, &ctx.caller, &ctx.sandbox_id, pid).await {
        Ok(info) => Ok(matches!(info.state, ProcessState::Running)),
        Err(e) if e.status_and_code().0 == StatusCode::NOT_FOUND => Ok(false),
        Err(e) => Err(e),
    }
}

/// Waits until `pid` is reported exited (or gone).
async fn wait_exited(s: &Shared, ctx: &SandboxCtx, pid: Pid) -> Result<(), ApiError> {
    let deadline = Instant::now() + EXIT_TIMEOUT;
    while is_running(s, ctx, pid).await? {
        if Instant::now() >= deadline {
            return Err(ApiError::internal(
                "the kernel did not stop",
                format!("pid {pid} still runs {EXIT_TIMEOUT:?} after SIGKILL"),
            ));
        }
        sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Kills the running kernel of `context` (its whole process group) and waits until it is
/// reported exited; answers every process of the context, to release once a new kernel runs
/// (or the context goes).
async fn kill_and_wait(
    s: &Shared,
    ctx: &SandboxCtx,
    context: &Context,
) -> Result<Vec<Pid>, ApiError> {
    let mut pids = context.ended.clone();
    if context.running() {
        let pid = context.kernel.pid;
        kill_kernel(s, ctx, pid).await?;
        wait_exited(s, ctx, pid).await?;
        pids.push(pid);
    }
    Ok(pids)
}

/// Sends SIGKILL to the process group of kernel `pid` while it still runs: once its exit is
/// known its pid (and group id) may be reused, so nothing is sent then.
async fn kill_kernel(s: &Shared, ctx: &SandboxCtx, pid: Pid) -> Result<(), ApiError> {
    if !is_running(s, ctx, pid).await? {
        return Ok(());
    }
    match signal_process(s, &ctx.caller, &ctx.sandbox_id, pid, SIGKILL, true).await {
        Ok(()) => Ok(()),
        // Gone meanwhile.
        Err(e) if e.status_and_code().0 == StatusCode::NOT_FOUND => Ok(()),
        Err(e) => Err(e),
    }
}

/// Forgets an ended process and its output (one already gone is fine).
async fn release(s: &Shared, ctx: &SandboxCtx, pid: Pid) -> Result<(), ApiError> {
    match release_process(s, &ctx.caller, &ctx.sandbox_id, pid).await {
        Ok(()) => Ok(()),
        Err(e) if e.status_and_code().0 == StatusCode::NOT_FOUND => Ok(()),
        Err(e) => Err(e),
    }
}

async fn release_all(s: &Shared, ctx: &SandboxCtx, pids: Vec<Pid>) -> Result<(), ApiError> {
    for pid in pids {
        release(s, ctx, pid).await?;
    }
    Ok(())
}

/// The running kernel of `context`: a kernel that ended is replaced by a fresh one first (the
/// old rows are released only once the new kernel runs), and the notice for the client says
/// so.
async fn ensure_running(
    s: &Shared,
    ctx: &SandboxCtx,
    context: &Context,
) -> Result<(Pid, Option<String>), ApiError> {
    if context.running() {
        return Ok((context.kernel.pid, None));
    }
    let old = kill_and_wait(s, ctx, context).await?;
    let cwd = Some(context.kernel.cwd.clone()).filter(|c| !c.is_empty());
    let (pid, _) = start_kernel(s, ctx, &context.tag, cwd).await?;
    release_all(s, ctx, old).await?;
    let why = match &context.kernel.state {
        ProcessState::Exited { status } if status.oom_killed => "it ran out of memory".to_string(),
        ProcessState::Exited { status } => exit_text(status.code, status.signal),
        ProcessState::Running => "no exit status".to_string(),
    };
    let notice = format!(
        "[openrun] the kernel of this context had ended ({why}) since its last execution (a \
         kernel that did not stop on interrupt after its client left is killed); this \
         execution runs in a fresh kernel: earlier variables are lost\n"
    );
    Ok((pid, Some(notice)))
}

// ---------------------------------------------------------------------------------------------
// Handlers.

fn parse<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::InvalidArgument(format!("invalid JSON request body: {e}")))
}

/// Body of `POST /contexts`.
#[derive(Debug, Default, serde::Deserialize)]
struct CreateBody {
    language: Option<String>,
    cwd: Option<String>,
}

/// `POST /contexts {"language"?, "cwd"?}` -> `{"id", "language", "cwd"}`.
async fn create_context(s: Shared, ctx: &SandboxCtx, body: Bytes) -> Result<Response, ApiError> {
    let body: CreateBody = parse(&body)?;
    let tag = ContextTag {
        id: new_id()?,
        language: language(body.language.as_deref())?,
        default: false,
    };
    let cwd = body.cwd.filter(|c| !c.is_empty());
    let (_, cwd) = start_kernel(&s, ctx, &tag, cwd).await?;
    let answer = serde_json::json!({ "id": tag.id, "language": tag.language, "cwd": cwd });
    Ok(Json(answer).into_response())
}

/// `GET /contexts` -> `[{"id", "language", "cwd"}]`.
async fn list_contexts(s: Shared, ctx: &SandboxCtx) -> Result<Response, ApiError> {
    let all: Vec<_> = contexts(&s, ctx).await?.iter().map(Context::json).collect();
    Ok(Json(all).into_response())
}

/// `DELETE /contexts/{id}`: kills its kernel; the context is gone, and executions queued
/// for it are 404s.
async fn remove_context(s: Shared, ctx: &SandboxCtx, id: String) -> Result<Response, ApiError> {
    let context = find_context(&s, ctx, &id).await?;
    let slot = context_slot(ctx, &id);
    slot.set_ending(Some(Ending::Removed));
    let result = async {
        // Kill first: an execution in flight ends and gives the lock up.
        kill_kernel(&s, ctx, context.kernel.pid).await?;
        let _guard = slot.lock.clone().lock_owned().await;
        if let Ok(context) = find_context(&s, ctx, &id).await {
            let pids = kill_and_wait(&s, ctx, &context).await?;
            release_all(&s, ctx, pids).await?;
        }
        Ok::<_, ApiError>(())
    }
    .await;
    if result.is_err() {
        slot.set_ending(None);
    }
    result?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /contexts/{id}/restart`: a fresh kernel (no variables) in the same working directory;
/// executions queued for it run in the fresh kernel.
async fn restart_context(s: Shared, ctx: &SandboxCtx, id: String) -> Result<Response, ApiError> {
    let context = find_context(&s, ctx, &id).await?;
    let slot = context_slot(ctx, &id);
    slot.set_ending(Some(Ending::Restarting));
    let result = async {
        if context.running() {
            kill_kernel(&s, ctx, context.kernel.pid).await?;
        }
        let _guard = slot.lock.clone().lock_owned().await;
        let context = find_context(&s, ctx, &id).await?;
        let old = kill_and_wait(&s, ctx, &context).await?;
        let cwd = Some(context.kernel.cwd.clone()).filter(|c| !c.is_empty());
        start_kernel(&s, ctx, &context.tag, cwd).await?;
        release_all(&s, ctx, old).await
    }
    .await;
    slot.set_ending(None);
    result?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Body of `POST /execute`.
#[derive(Debug, Default, serde::Deserialize)]
struct ExecuteBody {
    code: Option<String>,
    context_id: Option<String>,
    language: Option<String>,
    env_vars: Option<BTreeMap<String, String>>,
}

/// Largest body of `POST /execute` (the limit of every request of the sandbox's traffic): the
/// code is most of it. (The JSON request to the kernel may be longer, with escapes: it is sent
/// in pieces.)
const MAX_EXECUTE_BODY: usize = super::connect::MAX_MESSAGE + 64;

/// `POST /execute`: runs code in a context; the answer streams E2B's NDJSON lines.
async fn execute(s: Shared, ctx: &SandboxCtx, body: Body) -> Result<Response, ApiError> {
    let Ok(body) = axum::body::to_bytes(body, MAX_EXECUTE_BODY).await else {
        // Said here, naming the code (the body extractor's refusal would not); the rest of
        // the body is unread, so the connection closes.
        let response = super::error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the code to run is too large: the request body of /execute is limited to \
                 {MAX_EXECUTE_BODY} bytes (write bigger code to a file in the sandbox and run \
                 that)"
            ),
        );
        return Ok(response);
    };
    let body: ExecuteBody = parse(&body)?;
    let Some(code) = body.code else {
        return Err(ApiError::InvalidArgument(
            "the request has no code to run".into(),
        ));
    };
    let env_vars = body.env_vars.unwrap_or_default();
    check_env(&env_vars)?;
    let context_id = body.context_id.filter(|c| !c.is_empty());
    let language_asked = body.language.filter(|l| !l.trim().is_empty());
    if context_id.is_some() && language_asked.is_some() {
        return Err(ApiError::InvalidArgument(
            "Only one of context_id or language can be provided".into(),
        ));
    }
    let (slot, guard, tag, mut pid, notice) = match context_id {
        Some(id) => {
            let (slot, guard) = lock_context(ctx, &id).await?;
            let context = find_context(&s, ctx, &id).await?;
            let (pid, notice) = ensure_running(&s, ctx, &context).await?;
            (slot, guard, context.tag, pid, notice)
        }
        None => default_kernel(&s, ctx, &language(language_asked.as_deref())?).await?,
    };
    let mut notices: Vec<String> = notice.into_iter().collect();
    let request_id = new_id()?;
    let mut request = serde_json::to_vec(&serde_json::json!({
        "id": request_id,
        "code": code,
        "env_vars": env_vars,
    }))
    .map_err(|e| ApiError::internal("cannot encode the execution", e))?;
    request.push(b'\n');
    record_execution(&s, ctx, &tag, &code, &env_vars).await?;
    // A kernel that ended just now (between its last execution and this one) is restarted
    // once: its stdin is closed, which is no fault of the request.
    let mut retried = false;
    let (lines, offset) = loop {
        match send_request(&s, ctx, pid, &request).await {
            Ok(sent) => break sent,
            Err(e) if !retried && !is_running(&s, ctx, pid).await? => {
                tracing::info!(pid, error = %e, "the kernel ended before the execution was sent: restarting it");
                retried = true;
                let context = find_context(&s, ctx, &tag.id).await?;
                let (new_pid, notice) = ensure_running(&s, ctx, &context).await?;
                pid = new_pid;
                notices.extend(notice);
            }
            Err(e) => return Err(e),
        }
    };
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let run = Run {
        s,
        ctx: ctx.clone(),
        pid,
        request_id,
        slot,
        _guard: guard,
    };
    tokio::spawn(run.pump(lines, LineBuffer::starting_at(offset), notices, tx));
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let line = rx.recv().await?;
        Some((Ok::<_, std::convert::Infallible>(line), rx))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// Follows the output of kernel `pid` from its current end and writes the request to its
/// stdin (in pieces the agent takes); answers the output and the offset it starts at.
async fn send_request(
    s: &Shared,
    ctx: &SandboxCtx,
    pid: Pid,
    request: &[u8],
) -> Result<(mpsc::Receiver<Line>, u64), ApiError> {
    let info = process_status(s, &ctx.caller, &ctx.sandbox_id, pid).await?;
    let attach = AttachRequest {
        pid,
        stdout_since: info.stdout_len,
        stderr_since: info.stderr_len,
        follow: true,
    };
    let lines = follow_output(s, &ctx.caller, &ctx.sandbox_id, attach).await?;
    for piece in request.chunks(MAX_DATA_LEN) {
        write_stdin(s, &ctx.caller, &ctx.sandbox_id, pid, piece.to_vec(), false).await?;
    }
    Ok((lines, info.stdout_len))
}

/// Records `code.execute` (context, language, the code up to [`RECORDED_CODE`] bytes, names
/// of the env vars) before the code runs.
async fn record_execution(
    s: &Shared,
    ctx: &SandboxCtx,
    tag: &ContextTag,
    code: &str,
    env_vars: &BTreeMap<String, String>,
) -> Result<(), ApiError> {
    let mut end = code.len().min(RECORDED_CODE);
    while !code.is_char_boundary(end) {
        end -= 1;
    }
    let payload = serde_json::json!({
        "context_id": tag.id,
        "language": tag.language,
        "code": &code[..end],
        "code_bytes": code.len(),
        "env": env_vars.keys().collect::<Vec<_>>(),
    });
    let row = crate::api::find(s, &ctx.caller, &ctx.sandbox_id).await?;
    crate::files::record(s, &ctx.caller, &row, "code.execute", payload).await
}

/// What [`default_kernel`] answers: the context's slot and lock, its tag, the kernel's pid and
/// a notice for the client.
type Locked = (
    Arc<Slot>,
    OwnedMutexGuard<()>,
    ContextTag,
    Pid,
    Option<String>,
);

/// The default context of `language` (made on first use), locked for an execution.
async fn default_kernel(s: &Shared, ctx: &SandboxCtx, language: &str) -> Result<Locked, ApiError> {
    let _creating = slot_for(format!("default/{}/{language}", ctx.sandbox_id))
        .lock
        .clone()
        .lock_owned()
        .await;
    // Twice: the default context may be removed while this execution waits for it (then a
    // new one is made).
    for _ in 0..2 {
        let found = contexts(s, ctx)
            .await?
            .into_iter()
            .find(|c| c.tag.default && c.tag.language == language);
        let Some(context) = found else {
            let tag = ContextTag {
                id: new_id()?,
                language: language.to_string(),
                default: true,
            };
            let (slot, guard) = lock_context(ctx, &tag.id).await?;
            let pid = start_kernel(s, ctx, &tag, None).await?.0;
            return Ok((slot, guard, tag, pid, None));
        };
        let locked = match lock_context(ctx, &context.tag.id).await {
            // Found again under the lock: a restart may have replaced the kernel meanwhile.
            Ok(locked) => (locked, find_context(s, ctx, &context.tag.id).await),
            Err(ApiError::NotFound(_)) => continue,
            Err(e) => return Err(e),
        };
        match locked {
            ((slot, guard), Ok(context)) => {
                let (pid, notice) = ensure_running(s, ctx, &context).await?;
                return Ok((slot, guard, context.tag, pid, notice));
            }
            (_, Err(ApiError::NotFound(_))) => continue,
            (_, Err(e)) => return Err(e),
        }
    }
    Err(ApiError::internal(
        "cannot find or make the default context",
        "it was removed twice while this execution waited for it",
    ))
}

/// One execution in flight: holds its context's lock until the kernel is done with it.
struct Run {
    s: Shared,
    ctx: SandboxCtx,
    pid: Pid,
    request_id: String,
    slot: Arc<Slot>,
    _guard: OwnedMutexGuard<()>,
}

/// What to do with one line of the kernel.
#[derive(Debug, PartialEq)]
enum Step {
    /// Send it to the client.
    Forward(Bytes),
    /// Not for this execution.
    Skip,
    /// The execution ended: its last line for the client.
    End(Bytes),
}

/// Turns one kernel message into what the client gets: the message without its `id` if it
/// belongs to `request_id`.
fn step(mut message: serde_json::Value, request_id: &str) -> Step {
    let Some(object) = message.as_object_mut() else {
        return Step::Skip;
    };
    if object.get("id").and_then(|i| i.as_str()) != Some(request_id) {
        return Step::Skip;
    }
    object.remove("id");
    if object.get("type").and_then(|t| t.as_str()) == Some("end_of_execution") {
        return Step::End(end_line());
    }
    ndjson(&message).map_or(Step::Skip, Step::Forward)
}

/// The last line of every stream, as E2B's server sends it (the SDK ignores it).
fn end_line() -> Bytes {
    ndjson(&serde_json::json!({ "type": "end_of_execution" })).unwrap_or_default()
}

fn ndjson(value: &serde_json::Value) -> Option<Bytes> {
    let mut text = serde_json::to_vec(value).ok()?;
    text.push(b'\n');
    Some(Bytes::from(text))
}

fn error_line(name: &str, value: String) -> Bytes {
    let message =
        serde_json::json!({ "type": "error", "name": name, "value": value, "traceback": "" });
    ndjson(&message).unwrap_or_default()
}

fn stderr_line(text: String) -> Bytes {
    let message = serde_json::json!({ "type": "stderr", "text": text, "timestamp": now_rfc3339() });
    ndjson(&message).unwrap_or_default()
}

/// The client's line for something the line buffer noticed (`None` for a message).
fn notice_of(event: &Event) -> Option<Bytes> {
    match event {
        Event::Message(_) => None,
        Event::Lost(bytes) => Some(stderr_line(format!(
            "[openrun] {bytes} bytes of the kernel's output were lost (the sandbox's output \
             buffer overflowed before the server read them): output or results of this \
             execution may be missing\n"
        ))),
        Event::TooLong(bytes) => Some(stderr_line(format!(
            "[openrun] a kernel output line of {bytes} bytes was dropped: lines are limited to \
             {MAX_LINE} bytes (something wrote to the kernel's protocol pipe without newlines, \
             or a message was too large to carry)\n"
        ))),
    }
}

fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.microsecond()
    )
}

impl Run {
    /// Forwards the kernel's lines for this execution until it ends (the notices first);
    /// interrupts the kernel when the client goes away.
    async fn pump(
        self,
        mut lines: mpsc::Receiver<Line>,
        mut buffer: LineBuffer,
        notices: Vec<String>,
        tx: mpsc::Sender<Bytes>,
    ) {
        for notice in notices {
            if tx.send(stderr_line(notice)).await.is_err() {
                self.interrupted(lines, buffer).await;
                return;
            }
        }
        let keepalive = ndjson(&serde_json::json!({ "type": "keepalive" })).unwrap_or_default();
        loop {
            let line = tokio::select! {
                line = lines.recv() => line,
                () = tx.closed() => {
                    self.interrupted(lines, buffer).await;
                    return;
                }
                () = sleep(KEEPALIVE) => {
                    if tx.send(keepalive.clone()).await.is_err() {
                        self.interrupted(lines, buffer).await;
                        return;
                    }
                    continue;
                }
            };
            // What goes to the client, and whether the execution is over.
            let (outgoing, done) = match line {
                None => (
                    vec![
                        error_line(
                            "UnexpectedEndOfExecution",
                            "the output of the kernel ended before the execution did".into(),
                        ),
                        end_line(),
                    ],
                    true,
                ),
                Some(Line::Stdout { offset, data }) => {
                    let mut out = Vec::new();
                    let mut done = false;
                    for event in buffer.push(offset, &data) {
                        let Event::Message(message) = event else {
                            out.extend(notice_of(&event));
                            continue;
                        };
                        match step(message, &self.request_id) {
                            Step::Forward(bytes) => out.push(bytes),
                            Step::Skip => {}
                            Step::End(bytes) => {
                                out.push(bytes);
                                done = true;
                                break;
                            }
                        }
                    }
                    (out, done)
                }
                Some(Line::Stderr { data, .. }) => {
                    // The kernel's own stderr (user output arrives on stdout, as messages):
                    // a failure of Python itself.
                    let text = String::from_utf8_lossy(&data).into_owned();
                    let start: String = text.chars().take(200).collect();
                    tracing::warn!(pid = self.pid, bytes = data.len(), %start, "the code-interpreter kernel wrote to stderr");
                    (vec![stderr_line(text)], false)
                }
                Some(Line::Exit {
                    code,
                    signal,
                    oom_killed,
                    ..
                }) => {
                    let why = if oom_killed {
                        "it ran out of memory".to_string()
                    } else {
                        exit_text(code, signal)
                    };
                    let error = match self.slot.ending() {
                        Some(Ending::Removed) => error_line(
                            "ContextRemoved",
                            "the context was removed (DELETE /contexts/{id}) while this code \
                             ran: its kernel was killed"
                                .into(),
                        ),
                        Some(Ending::Restarting) => error_line(
                            "ContextRestarted",
                            "the context was restarted (POST /contexts/{id}/restart) while \
                             this code ran: its kernel was killed, its variables are lost"
                                .into(),
                        ),
                        None => error_line(
                            "KernelDied",
                            format!(
                                "the Python kernel of this context ended while running the \
                                 code ({why}): its variables are lost; the next execution \
                                 starts a fresh kernel"
                            ),
                        ),
                    };
                    (vec![error, end_line()], true)
                }
                Some(Line::Error { message, .. }) => (
                    vec![error_line("UnexpectedEndOfExecution", message), end_line()],
                    true,
                ),
                Some(Line::Started { .. }) => (Vec::new(), false),
            };
            for bytes in outgoing {
                if tx.send(bytes).await.is_err() {
                    if !done {
                        self.interrupted(lines, buffer).await;
                    }
                    return;
                }
            }
            if done {
                return;
            }
        }
    }

    /// The client went away: interrupt the execution and wait for the kernel to finish it, so
    /// the next execution finds the kernel idle (killing it if it does not stop; the next
    /// execution is told).
    async fn interrupted(&self, mut lines: mpsc::Receiver<Line>, mut buffer: LineBuffer) {
        let (s, ctx, pid) = (&self.s, &self.ctx, self.pid);
        tracing::info!(pid, sandbox = %ctx.sandbox_id, "client left mid-execution: interrupting the kernel");
        let start = Instant::now();
        let mut sent = 0;
        loop {
            let elapsed = start.elapsed();
            let (signal, group) = if sent == 0 {
                (Some(SIGINT), false)
            } else if sent == 1 && elapsed >= INTERRUPT_AGAIN {
                (Some(SIGINT), true)
            } else if sent == 2 && elapsed >= INTERRUPT_KILL {
                (Some(SIGKILL), true)
            } else {
                (None, false)
            };
            if let Some(signal) = signal {
                sent += 1;
                // Once its exit is known, the pid (and the group id) may be reused.
                match is_running(s, ctx, pid).await {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(e) => {
                        tracing::debug!(pid, error = %e, "cannot see the kernel");
                        return;
                    }
                }
                if let Err(e) =
                    signal_process(s, &ctx.caller, &ctx.sandbox_id, pid, signal, group).await
                {
                    tracing::debug!(pid, error = %e, "cannot signal the kernel");
                    return;
                }
            }
            match timeout(Duration::from_millis(250), lines.recv()).await {
                Err(_) => {}
                Ok(None) | Ok(Some(Line::Exit { .. } | Line::Error { .. })) => return,
                Ok(Some(Line::Stdout { offset, data })) => {
                    for event in buffer.push(offset, &data) {
                        if let Event::Message(message) = event {
                            if matches!(step(message, &self.request_id), Step::End(_)) {
                                return;
                            }
                        }
                    }
                }
                Ok(Some(_)) => {}
            }
        }
    }
}

/// Longest line of kernel output the server takes: the kernel keeps its own lines well under
/// it ([`KERNEL`] splits output and refuses results that would not fit); a longer one
/// (something wrote to the protocol pipe without newlines) is dropped and the client told.
const MAX_LINE: usize = MAX_DATA_LEN;

/// What the line buffer found in a chunk.
#[derive(Debug, PartialEq)]
enum Event {
    /// A complete line that is a JSON object.
    Message(serde_json::Value),
    /// This many bytes of output were gone (the agent no longer had them).
    Lost(u64),
    /// A line of this many bytes was over [`MAX_LINE`] and dropped.
    TooLong(u64),
}

/// Splits the kernel's stdout into JSON lines, in one pass over each chunk. A gap in the offsets
/// (output the agent no longer had) drops the line it cut (a first line after the gap that is
/// whole is kept); a line longer than [`MAX_LINE`] is dropped up to its newline.
#[derive(Debug, Default)]
struct LineBuffer {
    /// The start of a line whose newline has not come yet (never longer than [`MAX_LINE`]).
    pending: Vec<u8>,
    /// Offset of the next byte expected, once known.
    next: Option<u64>,
    /// Bytes dropped so far of a line over [`MAX_LINE`] (its newline has not come yet).
    dropping: Option<u64>,
}

impl LineBuffer {
    /// A buffer for output that starts at stream offset `offset`.
    fn starting_at(offset: u64) -> Self {
        Self {
            next: Some(offset),
            ..Self::default()
        }
    }

    /// Adds the chunk at stream offset `offset`; answers what it completes.
    fn push(&mut self, offset: u64, data: &[u8]) -> Vec<Event> {
        let mut events = Vec::new();
        let mut data = data;
        if let Some(next) = self.next {
            if offset > next {
                tracing::warn!(lost = offset - next, "a gap in the kernel's output");
                events.push(Event::Lost(offset - next));
                if let Some(dropped) = self.dropping.take() {
                    events.push(Event::TooLong(dropped));
                }
                // The line the gap cut: what comes after the gap is tried as a line of its
                // own (it does not parse unless it began at a line boundary).
                self.pending.clear();
            } else if offset < next {
                // Seen already.
                let seen = usize::try_from(next - offset).unwrap_or(usize::MAX);
                data = data.get(seen..).unwrap_or_default();
            }
        }
        self.next = Some(offset.max(self.next.unwrap_or(0)) + data.len() as u64);
        let mut rest = data;
        while let Some(at) = rest.iter().position(|b| *b == b'\n') {
            let segment = &rest[..at];
            rest = &rest[at + 1..];
            if let Some(dropped) = self.dropping.take() {
                events.push(Event::TooLong(dropped + segment.len() as u64));
                continue;
            }
            let length = self.pending.len() + segment.len();
            if length > MAX_LINE {
                self.pending.clear();
                events.push(Event::TooLong(length as u64));
                continue;
            }
            let parsed = if self.pending.is_empty() {
                serde_json::from_slice::<serde_json::Value>(segment)
            } else {
                self.pending.extend_from_slice(segment);
                let parsed = serde_json::from_slice::<serde_json::Value>(&self.pending);
                self.pending.clear();
                parsed
            };
            match parsed {
                Ok(value) if value.is_object() => events.push(Event::Message(value)),
                _ => tracing::debug!(bytes = length, "not a kernel message"),
            }
        }
        if let Some(dropped) = self.dropping.as_mut() {
            *dropped += rest.len() as u64;
        } else if self.pending.len() + rest.len() > MAX_LINE {
            self.dropping = Some((self.pending.len() + rest.len()) as u64);
            self.pending = Vec::new();
        } else {
            self.pending.extend_from_slice(rest);
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(pid: Pid, tag: &str, started: u64, running: bool) -> ProcessInfo {
        let state = if running {
            ProcessState::Running
        } else {
            serde_json::from_value(serde_json::json!({"state": "exited", "status": {"code": 1, "signal": null, "timed_out": false, "oom_killed": false}}))
                .expect("an exited state")
        };
        ProcessInfo {
            pid,
            argv: vec!["python3".into()],
            cwd: "/root".into(),
            uid: 0,
            pty: false,
            tag: Some(tag.into()),
            started_at_ms: started,
            state,
            stdout_len: 0,
            stderr_len: 0,
        }
    }

    const ID: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn tags_round_trip_and_reject_anything_else() {
        let tag = ContextTag {
            id: ID.into(),
            language: "python".into(),
            default: true,
        };
        assert_eq!(ContextTag::parse(&tag.render()), Some(tag.clone()));
        let plain = ContextTag {
            default: false,
            ..tag
        };
        assert_eq!(ContextTag::parse(&plain.render()), Some(plain));
        for bad in [
            "e2b-context:xyz:python",
            "e2b-context:0123456789ABCDEF0123456789ABCDEF:python",
            &format!("e2b-context:{ID}:python:other"),
            &format!("e2b-context:{ID}:python:default:x"),
            &format!("e2b-context:{ID}"),
            &format!("other:{ID}:python"),
        ] {
            assert_eq!(ContextTag::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn ids_are_random_and_valid() {
        let a = new_id().expect("an id");
        let b = new_id().expect("an id");
        assert!(valid_id(&a) && valid_id(&b));
        assert_ne!(a, b);
        assert!(!valid_id("../etc"));
        assert!(!valid_id(&format!("{ID}0")));
    }

    #[test]
    fn a_context_is_its_running_kernel_else_its_newest() {
        let tag = format!("e2b-context:{ID}:python");
        let all = contexts_of(vec![
            process(10, &tag, 1, false),
            process(30, &tag, 3, false),
            process(20, &tag, 2, true),
            process(40, "other", 4, true),
        ]);
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].kernel.pid, 20);
        assert!(all[0].running());
        let mut ended = all[0].ended.clone();
        ended.sort();
        assert_eq!(ended, vec![10, 30]);

        let dead = contexts_of(vec![
            process(10, &tag, 1, false),
            process(30, &tag, 3, false),
        ]);
        assert_eq!(dead[0].kernel.pid, 30);
        assert!(!dead[0].running());
    }

    #[test]
    fn only_this_executions_lines_pass_without_their_id() {
        let line =
            serde_json::json!({"id": "a", "type": "stdout", "text": "hi\n", "timestamp": "t"});
        match step(line, "a") {
            Step::Forward(bytes) => {
                let back: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
                assert_eq!(
                    back,
                    serde_json::json!({"type": "stdout", "text": "hi\n", "timestamp": "t"})
                );
                assert!(bytes.ends_with(b"\n"));
            }
            other => panic!("{other:?}"),
        }
        let other = serde_json::json!({"id": "b", "type": "stdout", "text": "x"});
        assert_eq!(step(other, "a"), Step::Skip);
        // The end is forwarded as the stream's last line, as E2B's server sends it.
        let end = serde_json::json!({"id": "a", "type": "end_of_execution"});
        assert_eq!(
            step(end, "a"),
            Step::End(Bytes::from_static(b"{\"type\":\"end_of_execution\"}\n"))
        );
    }

    fn messages(events: Vec<Event>) -> Vec<serde_json::Value> {
        events
            .into_iter()
            .map(|e| match e {
                Event::Message(m) => m,
                other => panic!("not a message: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn the_oldest_running_kernel_keeps_its_context() {
        let tag = format!("e2b-context:{ID}:python");
        // A later process with a copied tag (an impostor) neither takes the context over nor
        // is released with it.
        let all = contexts_of(vec![
            process(50, &tag, 5, true),
            process(20, &tag, 2, true),
            process(10, &tag, 1, false),
        ]);
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].kernel.pid, 20);
        assert_eq!(all[0].ended, vec![10]);
    }

    #[test]
    fn a_line_without_newline_is_capped_and_dropped_up_to_its_newline() {
        let mut buffer = LineBuffer::starting_at(0);
        let chunk = vec![b'x'; 1 << 20];
        let mut at = 0u64;
        for _ in 0..20 {
            assert!(buffer.push(at, &chunk).is_empty());
            at += chunk.len() as u64;
            assert!(buffer.pending.len() <= MAX_LINE);
        }
        let got = buffer.push(at, b"xx\n{\"after\":1}\n");
        assert_eq!(
            got,
            vec![
                Event::TooLong((20 << 20) + 2),
                Event::Message(serde_json::json!({"after": 1}))
            ]
        );
        assert!(buffer.pending.is_empty());
    }

    #[test]
    fn a_long_line_in_many_chunks_is_read_in_linear_time() {
        // 12 MiB in 4 KiB chunks, one line: each chunk is scanned once (a rescan from the
        // start of the line on each chunk would take minutes in a debug build).
        let mut buffer = LineBuffer::starting_at(0);
        let mut line = b"{\"text\":\"".to_vec();
        line.extend(std::iter::repeat_n(b'y', 12 << 20));
        line.extend_from_slice(b"\"}\n");
        let started = std::time::Instant::now();
        let mut got = Vec::new();
        let mut at = 0u64;
        for chunk in line.chunks(4096) {
            got.extend(buffer.push(at, chunk));
            at += chunk.len() as u64;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{:?}",
            started.elapsed()
        );
        let got = messages(got);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0]["text"].as_str().map(str::len), Some(12 << 20));
    }

    #[test]
    fn lines_split_across_chunks_are_joined() {
        let mut buffer = LineBuffer::default();
        let chunks: [&[u8]; 3] = [b"{\"a\":", b"1}\nnot json\n{\"b\":2}\n{\"c\"", b":3}\n"];
        assert!(buffer.push(0, chunks[0]).is_empty());
        let at = chunks[0].len() as u64;
        let got = messages(buffer.push(at, chunks[1]));
        assert_eq!(
            got,
            vec![serde_json::json!({"a": 1}), serde_json::json!({"b": 2})]
        );
        let at = at + chunks[1].len() as u64;
        assert_eq!(
            messages(buffer.push(at, chunks[2])),
            vec![serde_json::json!({"c": 3})]
        );
        // A chunk seen already (a resent tail) adds nothing twice.
        let again = messages(buffer.push(at, b":3}\n{\"d\":4}\n"));
        assert_eq!(again, vec![serde_json::json!({"d": 4})]);
    }

    #[test]
    fn a_gap_drops_only_the_line_it_cut() {
        let mut buffer = LineBuffer::default();
        assert!(buffer.push(0, b"{\"a\":1").is_empty());
        // Bytes 6..100 were lost: the rest of the cut line goes, the next line is whole, and
        // the loss is reported.
        let got = buffer.push(100, b"tail of something}\n{\"end\":true}\n");
        assert_eq!(
            got,
            vec![
                Event::Lost(94),
                Event::Message(serde_json::json!({"end": true}))
            ]
        );
        let mut skipping = LineBuffer::default();
        assert!(skipping.push(0, b"{").is_empty());
        assert_eq!(skipping.push(50, b"no newline yet"), vec![Event::Lost(49)]);
        assert_eq!(
            messages(skipping.push(64, b"}\n{\"x\":1}\n")),
            vec![serde_json::json!({"x": 1})]
        );
    }

    #[test]
    fn a_gap_at_a_line_boundary_keeps_the_next_line() {
        // The data after the gap starts a line: that line (perhaps the end of the execution)
        // is kept.
        let mut buffer = LineBuffer::starting_at(0);
        assert_eq!(
            messages(buffer.push(0, b"{\"a\":1}\n")),
            vec![serde_json::json!({"a": 1})]
        );
        let got = buffer.push(100, b"{\"type\":\"end_of_execution\"}\n");
        assert_eq!(
            got,
            vec![
                Event::Lost(92),
                Event::Message(serde_json::json!({"type": "end_of_execution"}))
            ]
        );
        // Output that starts later than the stream was followed from is a loss too.
        let mut late = LineBuffer::starting_at(10);
        assert_eq!(
            late.push(30, b"{\"b\":2}\n"),
            vec![Event::Lost(20), Event::Message(serde_json::json!({"b": 2}))]
        );
    }

    #[test]
    fn languages() {
        assert_eq!(language(None).expect("python"), "python");
        assert_eq!(language(Some(" Python ")).expect("python"), "python");
        assert_eq!(language(Some("bash")).expect("bash"), "bash");
        let e = language(Some("r")).expect_err("r is refused");
        assert!(e.to_string().contains("python and bash"), "{e}");
    }

    /// The kernel itself, run by the host's python3 as the sandbox runs it: bootstrap, source
    /// on stdin, requests, E2B's lines tagged with the request ids.
    #[test]
    fn the_kernel_runs_code_like_a_jupyter_kernel() {
        let lines = kernel_lines(
            "python",
            &[
                serde_json::json!({"id": "r1", "code": "import os\nos.system('echo sub; echo err >&2')\nx = 6 * 7\nx", "env_vars": {"K": "v"}}),
                serde_json::json!({"id": "r2", "code": "print(os.environ.get('K'))\nx / 0"}),
            ],
        );
        assert_eq!(lines[0]["type"], "ready");
        let of = |id: &str| -> Vec<serde_json::Value> {
            lines
                .iter()
                .filter(|l| l["id"] == id)
                .map(|l| {
                    let mut l = l.clone();
                    l.as_object_mut().map(|o| {
                        o.remove("id");
                        o.remove("timestamp")
                    });
                    l
                })
                .collect()
        };
        // stdout and stderr are read by two threads: their order between them is not fixed.
        let mut r1 = of("r1");
        r1[1..3].sort_by_key(|m| m["type"].to_string());
        assert_eq!(
            r1,
            vec![
                serde_json::json!({"type": "number_of_executions", "execution_count": 1}),
                serde_json::json!({"type": "stderr", "text": "err\n"}),
                serde_json::json!({"type": "stdout", "text": "sub\n"}),
                serde_json::json!({"type": "result", "is_main_result": true, "text": "42"}),
                serde_json::json!({"type": "end_of_execution"}),
            ]
        );
        let r2 = of("r2");
        assert_eq!(
            r2[1],
            serde_json::json!({"type": "stdout", "text": "None\n"})
        );
        assert_eq!(r2[2]["type"], "error");
        assert_eq!(r2[2]["name"], "ZeroDivisionError");
        let traceback = r2[2]["traceback"].as_str().expect("a traceback");
        assert!(
            traceback.contains("x / 0") && !traceback.contains("openrun-kernel"),
            "{traceback}"
        );
        assert_eq!(r2[3]["type"], "end_of_execution");
    }

    /// A bash context's kernel: state persists between executions, a failing command is an
    /// `ExitCode` error.
    #[test]
    fn the_bash_kernel_keeps_its_shell() {
        let lines = kernel_lines(
            "bash",
            &[
                serde_json::json!({"id": "b1", "code": "N=4; cd /; greet() { echo \"hi $1\"; }"}),
                serde_json::json!({"id": "b2", "code": "greet $N; pwd; echo $OPENRUN_KERNEL_LANGUAGE-$V", "env_vars": {"V": "v"}}),
                serde_json::json!({"id": "b3", "code": "echo $V; false"}),
            ],
        );
        let of = |id: &str, kind: &str| -> Vec<serde_json::Value> {
            lines
                .iter()
                .filter(|l| l["id"] == id && l["type"] == kind)
                .cloned()
                .collect()
        };
        let text = |id: &str| -> String {
            of(id, "stdout")
                .iter()
                .filter_map(|l| l["text"].as_str())
                .collect()
        };
        assert_eq!(text("b2"), "hi 4\n/\n-v\n");
        assert!(of("b2", "error").is_empty());
        assert_eq!(text("b3"), "\n");
        let error = of("b3", "error");
        assert_eq!(error.len(), 1);
        assert_eq!(error[0]["name"], "ExitCode");
        assert_eq!(error[0]["value"], "1");
        assert_eq!(of("b3", "end_of_execution").len(), 1);
    }

    /// Runs the kernel (python3 from the host) on `requests`; answers every line it wrote.
    fn kernel_lines(language: &str, requests: &[serde_json::Value]) -> Vec<serde_json::Value> {
        use std::io::{BufRead, BufReader, Write};
        use std::process::{Command, Stdio};
        let mut child = Command::new(PYTHON)
            .args(["-c", BOOTSTRAP])
            .env("OPENRUN_KERNEL_LANGUAGE", language)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let mut stdin = child.stdin.take().expect("stdin");
        write!(stdin, "{}\n{KERNEL}", KERNEL.len()).expect("source sent");
        for request in requests {
            writeln!(stdin, "{request}").expect("request sent");
        }
        drop(stdin);
        let lines = BufReader::new(child.stdout.take().expect("stdout"))
            .lines()
            .map(|l| serde_json::from_str(&l.expect("a line")).expect("JSON"))
            .collect();
        assert!(child.wait().expect("exit").success());
        lines
    }

    fn of<'a>(lines: &'a [serde_json::Value], id: &str, kind: &str) -> Vec<&'a serde_json::Value> {
        lines
            .iter()
            .filter(|l| l["id"] == id && l["type"] == kind)
            .collect()
    }

    /// What JSON cannot carry is made plain field by field (NaN is null), and output that
    /// looks like the start of a sync marker is not held back.
    #[test]
    fn the_kernel_sanitises_results_and_passes_marker_lookalikes() {
        let marker_like = format!("\\0openrun-sync-{}", "a".repeat(200));
        let requests = [
            serde_json::json!({"id": "n", "code": "display({'application/json': {'x': float('nan'), 'y': [1.5, float('inf')], 'z': 'ok'}}, raw=True)"}),
            serde_json::json!({"id": "m", "code": format!("import sys, time\nsys.stdout.write('{marker_like}'); sys.stdout.flush(); time.sleep(0.3)\nprint('end')")}),
        ];
        let started = std::time::Instant::now();
        let lines = kernel_lines("python", &requests);
        let results = of(&lines, "n", "result");
        assert_eq!(results.len(), 1);
        assert_eq!(
            results[0]["json"],
            serde_json::json!({"x": null, "y": [1.5, null], "z": "ok"})
        );
        let text: String = of(&lines, "m", "stdout")
            .iter()
            .filter_map(|l| l["text"].as_str())
            .collect();
        assert_eq!(text, format!("\0openrun-sync-{}end\n", "a".repeat(200)));
        // No 5 s wait for a sync marker the look-alike swallowed.
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
    }

    /// bash: an exit is seen while a background job holds the pipes; the cells' directory may
    /// be removed; a big result is refused with an error that says so.
    #[test]
    fn the_bash_kernel_sees_an_exit_and_survives_its_temp_dir_going() {
        let requests = [
            serde_json::json!({"id": "a", "code": "sleep 30 & exit 3"}),
            serde_json::json!({"id": "b", "code": "KEPT=1; rm -rf \"$(dirname \"$BASH_SOURCE\")\""}),
            serde_json::json!({"id": "c", "code": "echo kept=$KEPT"}),
        ];
        let started = std::time::Instant::now();
        let lines = kernel_lines("bash", &requests);
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{:?}",
            started.elapsed()
        );
        let exited = of(&lines, "a", "error");
        assert_eq!(exited.len(), 1, "{lines:?}");
        assert_eq!(exited[0]["name"], "ShellExited");
        assert!(of(&lines, "b", "error").is_empty(), "{lines:?}");
        let text: Vec<_> = of(&lines, "c", "stdout")
            .iter()
            .filter_map(|l| l["text"].as_str())
            .collect();
        assert_eq!(text, vec!["kept=1\n"], "{lines:?}");
        assert!(of(&lines, "c", "error").is_empty(), "{lines:?}");
    }

    #[test]
    fn the_kernel_refuses_a_result_too_large_for_a_message() {
        let lines = kernel_lines(
            "python",
            &[serde_json::json!({"id": "r", "code": "'x' * (9 << 20)"})],
        );
        let result = of(&lines, "r", "result");
        assert_eq!(result.len(), 1);
        let text = result[0]["text"].as_str().expect("text");
        assert!(
            text.starts_with("xxx") && text.contains("cut by openrun"),
            "{}",
            &text[..50]
        );
        let error = of(&lines, "r", "error");
        assert_eq!(error[0]["name"], "OutputTooLarge");
        assert_eq!(of(&lines, "r", "end_of_execution").len(), 1);
    }

    #[test]
    fn timestamps_are_rfc3339() {
        let t = now_rfc3339();
        assert_eq!(t.len(), "2026-12-06T02:02:04.058423Z".len(), "{t}");
        assert!(t.ends_with('Z'));
    }
}
