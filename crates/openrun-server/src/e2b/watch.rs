//! envd's directory watching, over [`crate::watch::watch_dir`]:
//!
//! | method | kind | what |
//! |---|---|---|
//! | `filesystem.Filesystem/WatchDir` | server stream | `{"start":{}}`, then `{"filesystem":{"name","type"}}` per change (`{"keepalive":{}}` when idle) until the client closes, the deadline passes or the directory goes away (async SDK `files.watch_dir`) |
//! | `filesystem.Filesystem/CreateWatcher` | unary | `{"watcherId"}`: a watcher kept on the server, its events buffered (sync SDK `files.watch_dir`) |
//! | `filesystem.Filesystem/GetWatcherEvents` | unary | `{"events":[…]}`: what the watcher buffered since the last call |
//! | `filesystem.Filesystem/RemoveWatcher` | unary | `{}`: stops it |
//!
//! Event types are envd's (fsnotify's): `EVENT_TYPE_CREATE`, `_WRITE`, `_REMOVE`, `_RENAME`,
//! `_CHMOD`; `name` is relative to the watched directory. Lost events (the agent's overflow
//! marker, or a full buffer here) have no envd type: the protocol cannot say so, and they are
//! left out (logged). With `includeEntry`, events whose entry still exists carry its
//! `EntryInfo`.
//!
//! A watcher of the polling trio keeps at most [`MAX_BUFFERED`] events and
//! [`MAX_BUFFERED_BYTES`] bytes of them (as JSON), and all watchers of the server together
//! [`MAX_BUFFERED_BYTES_TOTAL`]; later events are dropped until the next poll. A watcher
//! belongs to its sandbox and tenant (anyone else's id is `not_found`), and is removed by
//! `RemoveWatcher`, when its sandbox stops, [`IDLE_TIMEOUT`] after its last poll, or
//! [`ENDED_GRACE`] after its directory was removed. A sandbox holds at most
//! [`MAX_WATCHERS_PER_SANDBOX`] of them, a tenant [`MAX_WATCHERS_PER_TENANT`], the server
//! [`MAX_WATCHERS`] (`resource_exhausted`: remove some first).
//!
//! A tree too big to watch (too many directories, deeper than `PATH_MAX`, the sandbox's
//! inotify watches used up) is `invalid_argument` (the SDK's `InvalidArgumentException`):
//! waiting does not help, unlike `resource_exhausted`, which the SDK words as a rate limit.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::Response;
use axum::routing::post;
use axum::{Extension, Router};
use openrun_protocol::FileEventKind;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::connect::{
    server_stream, Code, ConnectError, Reply, StreamError, StreamOptions, Streaming, Unary,
};
use super::filesystem::{entry_info, resolve_path, EntryInfo};
use super::SandboxCtx;
use crate::api::Shared;
use crate::error::ApiError;
use crate::watch::{watch_dir as core_watch, WatchEvent, SANDBOX_STOPPED};

/// Events a polled watcher keeps between two polls.
pub(crate) const MAX_BUFFERED: usize = 10_000;
/// A watcher nobody polled for this long is removed.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// A watcher that ended by itself is kept this long for a last poll.
pub(crate) const ENDED_GRACE: Duration = Duration::from_secs(60);
/// Bytes (of the events as JSON) a polled watcher keeps between two polls.
pub(crate) const MAX_BUFFERED_BYTES: usize = 1024 * 1024;
/// Bytes all polled watchers of the server keep together.
pub(crate) const MAX_BUFFERED_BYTES_TOTAL: usize = 64 * 1024 * 1024;
/// Polled watchers one sandbox may have at once.
pub(crate) const MAX_WATCHERS_PER_SANDBOX: usize = 64;
/// Polled watchers one tenant may have at once.
pub(crate) const MAX_WATCHERS_PER_TENANT: usize = 256;
/// Polled watchers the server keeps at once.
pub(crate) const MAX_WATCHERS: usize = 2048;
/// How often expired watchers are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(30);
/// Messages buffered between a watch and a `WatchDir` stream.
const STREAM_BUFFER: usize = 64;

/// The routes of this module.
pub(super) fn routes() -> Router<Shared> {
    Router::new()
        .route("/filesystem.Filesystem/WatchDir", post(watch_dir))
        .route("/filesystem.Filesystem/CreateWatcher", post(create_watcher))
        .route(
            "/filesystem.Filesystem/GetWatcherEvents",
            post(get_watcher_events),
        )
        .route("/filesystem.Filesystem/RemoveWatcher", post(remove_watcher))
}

/// `WatchDirRequest` and `CreateWatcherRequest` (the same fields).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct WatchRequest {
    path: String,
    recursive: bool,
    #[serde(alias = "include_entry")]
    include_entry: bool,
    /// Accepted; openrun watches any file system the sandbox sees (inotify reports what
    /// happens inside the sandbox on network mounts too).
    #[serde(alias = "allow_network_mounts")]
    #[allow(dead_code)]
    allow_network_mounts: bool,
}

/// `filesystem.FilesystemEvent`.
#[derive(Debug, Clone, Serialize)]
struct FilesystemEvent {
    name: String,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    entry: Option<EntryInfo>,
}

/// `filesystem.WatchDirResponse`: a oneof.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
enum WatchDirResponse {
    Start {},
    Filesystem(Box<FilesystemEvent>),
    Keepalive {},
}

/// `{"watcherId": …}` (requests of `GetWatcherEvents` and `RemoveWatcher`, and the answer
/// of `CreateWatcher`).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct WatcherId {
    #[serde(alias = "watcher_id")]
    watcher_id: String,
}

/// `GetWatcherEventsResponse`.
#[derive(Debug, Serialize)]
struct WatcherEvents {
    events: Vec<FilesystemEvent>,
}

/// An empty message.
#[derive(Debug, Serialize)]
struct Empty {}

/// envd's name of a change; `None` for the overflow marker, which envd has no type for.
fn event_type(kind: FileEventKind) -> Option<&'static str> {
    Some(match kind {
        FileEventKind::Create => "EVENT_TYPE_CREATE",
        FileEventKind::Write => "EVENT_TYPE_WRITE",
        FileEventKind::Remove => "EVENT_TYPE_REMOVE",
        FileEventKind::Rename => "EVENT_TYPE_RENAME",
        FileEventKind::Chmod => "EVENT_TYPE_CHMOD",
        FileEventKind::Overflow => return None,
    })
}

/// Joins the watched directory and an event's relative name.
fn join(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

/// A started watch, turning its changes into envd events.
struct Source {
    s: Shared,
    ctx: SandboxCtx,
    /// The watched directory (absolute).
    dir: String,
    include_entry: bool,
    rx: mpsc::Receiver<WatchEvent>,
}

impl Source {
    /// Resolves and watches the request's path.
    async fn start(
        s: &Shared,
        ctx: &SandboxCtx,
        request: WatchRequest,
    ) -> Result<Self, ConnectError> {
        let dir = resolve_path(s, ctx, &request.path).await?;
        let rx = core_watch(
            s,
            &ctx.caller,
            &ctx.sandbox_id,
            dir.clone(),
            request.recursive,
        )
        .await?;
        Ok(Self {
            s: s.clone(),
            ctx: ctx.clone(),
            dir,
            include_entry: request.include_entry,
            rx,
        })
    }

    /// The next envd event; `Err(reason)` when the watch ended by itself.
    async fn next(&mut self) -> Result<FilesystemEvent, String> {
        loop {
            match self.rx.recv().await {
                Some(WatchEvent::Change { name, kind }) => {
                    let Some(kind_name) = event_type(kind) else {
                        tracing::debug!(
                            sandbox = self.ctx.sandbox_id,
                            dir = self.dir,
                            "watch events were lost"
                        );
                        continue;
                    };
                    let entry = if self.include_entry
                        && !matches!(kind, FileEventKind::Remove | FileEventKind::Rename)
                    {
                        entry_info(&self.s, &self.ctx, join(&self.dir, &name))
                            .await
                            .ok()
                    } else {
                        None
                    };
                    return Ok(FilesystemEvent {
                        name,
                        kind: kind_name,
                        entry,
                    });
                }
                Some(WatchEvent::Ended { reason }) => return Err(reason),
                None => return Err("the watch ended".into()),
            }
        }
    }
}

/// `WatchDir`: the start event, then the changes until the client goes away, the deadline
/// (`Connect-Timeout-Ms`, the SDK's `timeout`) passes, or the directory is removed (then the
/// stream ends normally).
async fn watch_dir(
    State(s): State<Shared>,
    Extension(ctx): Extension<SandboxCtx>,
    request: Streaming<WatchRequest>,
) -> Result<Response, StreamError> {
    let meta = request.meta;
    let mut source = Source::start(&s, &ctx, request.message).await?;
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    let _ = tx.send(Ok(WatchDirResponse::Start {})).await;
    tokio::spawn(async move {
        loop {
            let event = tokio::select! {
                event = source.next() => event,
                // The client went away: dropping the source ends the watch.
                () = tx.closed() => return,
            };
            match event {
                Ok(event) => {
                    if tx
                        .send(Ok(WatchDirResponse::Filesystem(Box::new(event))))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                // The sandbox went away: an error, as a broken envd connection would be (the
                // SDK's on_exit gets it); a removed directory ends the stream normally.
                Err(reason) if reason == SANDBOX_STOPPED => {
                    let gone = ApiError::NotRunning(ctx.sandbox_id.clone());
                    let _ = tx.send(Err(gone.into())).await;
                    return;
                }
                Err(reason) => {
                    tracing::debug!(sandbox = ctx.sandbox_id, reason, "a WatchDir stream ends");
                    return;
                }
            }
        }
    });
    Ok(server_stream(
        rx,
        StreamOptions {
            keepalive: meta
                .keepalive
                .map(|every| (every, WatchDirResponse::Keepalive {})),
            deadline: meta.timeout,
        },
    ))
}

/// What a polled watcher collected.
#[derive(Debug)]
struct Buffer {
    /// The events, with what each costs (its JSON's length).
    events: VecDeque<(FilesystemEvent, usize)>,
    /// What `events` cost in all (counted in [`BUFFERED`] too).
    bytes: usize,
    /// Events dropped because a buffer was full, since the last poll.
    dropped: u64,
    /// When and why the watch ended by itself.
    ended: Option<(Instant, String)>,
    last_poll: Instant,
}

/// Bytes buffered by every polled watcher of the server.
static BUFFERED: AtomicUsize = AtomicUsize::new(0);

impl Buffer {
    fn new() -> Self {
        Self {
            events: VecDeque::new(),
            bytes: 0,
            dropped: 0,
            ended: None,
            last_poll: Instant::now(),
        }
    }

    /// Keeps `event`, unless this buffer, or all of them, would hold too much.
    fn push(&mut self, event: FilesystemEvent) {
        let cost = serde_json::to_vec(&event).map_or(usize::MAX, |json| json.len());
        let reserved = BUFFERED.fetch_update(Ordering::AcqRel, Ordering::Acquire, |total| {
            total
                .checked_add(cost)
                .filter(|after| *after <= MAX_BUFFERED_BYTES_TOTAL)
        });
        if self.events.len() >= MAX_BUFFERED
            || self.bytes.saturating_add(cost) > MAX_BUFFERED_BYTES
            || reserved.is_err()
        {
            if reserved.is_ok() {
                BUFFERED.fetch_sub(cost, Ordering::AcqRel);
            }
            self.dropped += 1;
            return;
        }
        self.bytes += cost;
        self.events.push_back((event, cost));
    }

    /// Everything buffered, leaving it empty.
    fn take(&mut self) -> Vec<FilesystemEvent> {
        BUFFERED.fetch_sub(std::mem::take(&mut self.bytes), Ordering::AcqRel);
        self.events.drain(..).map(|(event, _)| event).collect()
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        BUFFERED.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// A watcher of the polling trio.
#[derive(Debug)]
struct Watcher {
    sandbox_id: String,
    tenant: String,
    buffer: Arc<Mutex<Buffer>>,
    /// Collects the events; aborted (ending the watch) when the watcher is dropped.
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Watcher {
    /// Whether it should be removed at `now`.
    fn expired(&self, now: Instant) -> bool {
        let buffer = lock(&self.buffer);
        match &buffer.ended {
            Some((at, _)) => now.duration_since(*at) >= ENDED_GRACE,
            None => now.duration_since(buffer.last_poll) >= IDLE_TIMEOUT,
        }
    }
}

/// Locks a mutex, recovering from a panic of another holder (the data stays consistent:
/// every critical section here is a few field updates).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Every polled watcher of the server.
#[derive(Debug, Default)]
struct Watchers {
    /// By id.
    by_id: HashMap<String, Watcher>,
    /// Watchers being created (their watch is starting), by sandbox and by tenant: they
    /// count against the caps like the others.
    starting: Vec<(String, String)>,
}

impl Watchers {
    /// Why one more watcher of `tenant` in `sandbox` is refused, if it is.
    fn refusal(&self, sandbox: &str, tenant: &str) -> Option<String> {
        let all = self
            .by_id
            .values()
            .map(|w| (w.sandbox_id.as_str(), w.tenant.as_str()))
            .chain(self.starting.iter().map(|(s, t)| (s.as_str(), t.as_str())));
        let (mut in_sandbox, mut of_tenant, mut total) = (0, 0, 0);
        for (s, t) in all {
            total += 1;
            in_sandbox += usize::from(s == sandbox);
            of_tenant += usize::from(t == tenant);
        }
        if in_sandbox >= MAX_WATCHERS_PER_SANDBOX {
            Some(format!(
                "the sandbox already has {MAX_WATCHERS_PER_SANDBOX} watchers: remove some (RemoveWatcher) first"
            ))
        } else if of_tenant >= MAX_WATCHERS_PER_TENANT {
            Some(format!(
                "your sandboxes already have {MAX_WATCHERS_PER_TENANT} watchers: remove some (RemoveWatcher) first"
            ))
        } else if total >= MAX_WATCHERS {
            Some(format!(
                "the server already has {MAX_WATCHERS} watchers: remove some (RemoveWatcher) first"
            ))
        } else {
            None
        }
    }
}

/// A watcher's place, taken under the registry's lock before its watch starts (so
/// concurrent `CreateWatcher`s cannot exceed the caps); given back when dropped.
struct Slot {
    sandbox: String,
    tenant: String,
}

impl Slot {
    /// Takes a place for a watcher of `tenant` in `sandbox`, or says why not.
    fn take(sandbox: &str, tenant: &str) -> Result<Self, String> {
        let mut reg = lock(registry());
        if let Some(why) = reg.refusal(sandbox, tenant) {
            return Err(why);
        }
        reg.starting.push((sandbox.to_string(), tenant.to_string()));
        Ok(Self {
            sandbox: sandbox.to_string(),
            tenant: tenant.to_string(),
        })
    }

    fn give_back(reg: &mut Watchers, sandbox: &str, tenant: &str) {
        if let Some(at) = reg
            .starting
            .iter()
            .position(|(s, t)| s == sandbox && t == tenant)
        {
            reg.starting.swap_remove(at);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        Self::give_back(&mut lock(registry()), &self.sandbox, &self.tenant);
    }
}

/// The registry's type.
type Registry = Mutex<Watchers>;

/// The registry, with its sweeper started on first use.
fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        tokio::spawn(async {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            loop {
                tick.tick().await;
                sweep(Instant::now());
            }
        });
        Mutex::new(Watchers::default())
    })
}

/// Removes the expired watchers (dropping them outside the lock).
fn sweep(now: Instant) {
    let expired: Vec<Watcher> = {
        let mut map = lock(registry());
        let ids: Vec<String> = map
            .by_id
            .iter()
            .filter(|(_, w)| w.expired(now))
            .map(|(id, _)| id.clone())
            .collect();
        ids.iter().filter_map(|id| map.by_id.remove(id)).collect()
    };
    drop(expired);
}

/// A new unguessable watcher id.
fn new_id() -> Result<String, ConnectError> {
    crate::keys::random_hex(16).map_err(|e| {
        tracing::error!(error = %e, "getrandom failed");
        ConnectError::new(Code::Internal, "cannot make a watcher id")
    })
}

/// Collects `source`'s events into `buffer` until the watch ends.
async fn collect(id: String, mut source: Source, buffer: Arc<Mutex<Buffer>>) {
    loop {
        match source.next().await {
            Ok(event) => lock(&buffer).push(event),
            // The sandbox is gone: so is its watcher.
            Err(reason) if reason == SANDBOX_STOPPED => {
                let removed = lock(registry()).by_id.remove(&id);
                drop(removed);
                return;
            }
            Err(reason) => {
                lock(&buffer).ended = Some((Instant::now(), reason));
                return;
            }
        }
    }
}

/// `CreateWatcher`: starts a watcher whose events `GetWatcherEvents` collects.
async fn create_watcher(
    State(s): State<Shared>,
    Extension(ctx): Extension<SandboxCtx>,
    Unary(request): Unary<WatchRequest>,
) -> Result<Reply<WatcherId>, ConnectError> {
    sweep(Instant::now());
    let slot = Slot::take(&ctx.sandbox_id, &ctx.caller.tenant)
        .map_err(|why| ConnectError::new(Code::ResourceExhausted, why))?;
    let source = Source::start(&s, &ctx, request).await?;
    let id = new_id()?;
    let buffer = Arc::new(Mutex::new(Buffer::new()));
    // Registered before its task runs: a task that ends at once finds it to remove.
    let mut reg = lock(registry());
    let task = tokio::spawn(collect(id.clone(), source, buffer.clone()));
    let watcher = Watcher {
        sandbox_id: ctx.sandbox_id.clone(),
        tenant: ctx.caller.tenant.clone(),
        buffer,
        task,
    };
    reg.by_id.insert(id.clone(), watcher);
    drop(reg);
    drop(slot);
    Ok(Reply(WatcherId { watcher_id: id }))
}

/// The buffer of the caller's watcher `id`, or `not_found`.
fn find(ctx: &SandboxCtx, id: &str) -> Result<Arc<Mutex<Buffer>>, ConnectError> {
    let map = lock(registry());
    match map.by_id.get(id) {
        Some(w) if w.sandbox_id == ctx.sandbox_id && w.tenant == ctx.caller.tenant => {
            Ok(w.buffer.clone())
        }
        _ => Err(ConnectError::not_found(format!("watcher {id:?} not found"))),
    }
}

/// `GetWatcherEvents`: the events since the last call. Once the watch ended by itself and
/// everything was collected, the watcher is gone: `not_found` with the reason.
async fn get_watcher_events(
    Extension(ctx): Extension<SandboxCtx>,
    Unary(request): Unary<WatcherId>,
) -> Result<Reply<WatcherEvents>, ConnectError> {
    let buffer = find(&ctx, &request.watcher_id)?;
    let (events, ended) = {
        let mut b = lock(&buffer);
        b.last_poll = Instant::now();
        if b.dropped > 0 {
            tracing::debug!(
                watcher = request.watcher_id,
                dropped = b.dropped,
                "a watcher's buffer was full; events were dropped"
            );
            b.dropped = 0;
        }
        let events = b.take();
        (events, b.ended.as_ref().map(|(_, reason)| reason.clone()))
    };
    if events.is_empty() {
        if let Some(reason) = ended {
            let removed = lock(registry()).by_id.remove(&request.watcher_id);
            drop(removed);
            return Err(ConnectError::not_found(format!(
                "watcher {:?} ended: {reason}",
                request.watcher_id
            )));
        }
    }
    Ok(Reply(WatcherEvents { events }))
}

/// `RemoveWatcher`: stops the watcher (`not_found` for an unknown one).
async fn remove_watcher(
    Extension(ctx): Extension<SandboxCtx>,
    Unary(request): Unary<WatcherId>,
) -> Result<Reply<Empty>, ConnectError> {
    find(&ctx, &request.watcher_id)?;
    let removed = lock(registry()).by_id.remove(&request.watcher_id);
    drop(removed);
    Ok(Reply(Empty {}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_have_envd_shapes() {
        let event = FilesystemEvent {
            name: "sub/a.txt".into(),
            kind: "EVENT_TYPE_WRITE",
            entry: None,
        };
        assert_eq!(
            serde_json::to_value(WatchDirResponse::Filesystem(Box::new(event))).unwrap(),
            serde_json::json!({"filesystem": {"name": "sub/a.txt", "type": "EVENT_TYPE_WRITE"}})
        );
        assert_eq!(
            serde_json::to_value(WatchDirResponse::Start {}).unwrap(),
            serde_json::json!({"start": {}})
        );
        assert_eq!(
            serde_json::to_value(WatchDirResponse::Keepalive {}).unwrap(),
            serde_json::json!({"keepalive": {}})
        );
        assert_eq!(event_type(FileEventKind::Chmod), Some("EVENT_TYPE_CHMOD"));
        assert_eq!(event_type(FileEventKind::Overflow), None);
    }

    #[test]
    fn requests_accept_both_spellings() {
        let r: WatchRequest =
            serde_json::from_str(r#"{"path":"/a","recursive":true,"include_entry":true}"#).unwrap();
        assert!(r.recursive && r.include_entry);
        let r: WatchRequest = serde_json::from_str(r#"{"path":"/a","includeEntry":true}"#).unwrap();
        assert!(!r.recursive && r.include_entry);
        let id: WatcherId = serde_json::from_str(r#"{"watcher_id":"x"}"#).unwrap();
        assert_eq!(id.watcher_id, "x");
        assert_eq!(
            serde_json::to_value(WatcherId {
                watcher_id: "y".into()
            })
            .unwrap(),
            serde_json::json!({"watcherId": "y"})
        );
    }

    fn event(name: String) -> FilesystemEvent {
        FilesystemEvent {
            name,
            kind: "EVENT_TYPE_CREATE",
            entry: None,
        }
    }

    /// The byte tests share [`BUFFERED`]: one at a time.
    static BYTES: Mutex<()> = Mutex::new(());

    #[test]
    fn buffers_are_capped_by_bytes() {
        let _one = lock(&BYTES);
        let mut b = Buffer::new();
        let long = "x".repeat(4000);
        for i in 0..1000 {
            b.push(event(format!("{long}{i}")));
        }
        assert!(b.bytes <= MAX_BUFFERED_BYTES, "{}", b.bytes);
        assert!(b.events.len() < 1000 && b.events.len() > 200);
        assert!(b.dropped > 0);
        // Short names: the count caps.
        let mut c = Buffer::new();
        for i in 0..MAX_BUFFERED + 5 {
            c.push(event(format!("f{i}")));
        }
        assert_eq!(c.events.len(), MAX_BUFFERED);
        assert_eq!(c.dropped, 5);
        let kept = b.take().len();
        assert!(kept > 200 && b.bytes == 0);
        drop(c);
    }

    #[test]
    fn all_buffers_together_are_capped() {
        let _one = lock(&BYTES);
        let long = "y".repeat(4000);
        let buffers: Vec<Buffer> = (0..100)
            .map(|_| {
                let mut b = Buffer::new();
                for i in 0..300 {
                    b.push(event(format!("{long}{i}")));
                }
                b
            })
            .collect();
        let held: usize = buffers.iter().map(|b| b.bytes).sum();
        assert!(held <= MAX_BUFFERED_BYTES_TOTAL, "{held}");
        assert!(buffers.last().is_some_and(|b| b.dropped > 0));
        assert!(BUFFERED.load(Ordering::Acquire) >= held);
    }

    #[tokio::test]
    async fn watcher_places_are_taken_under_the_lock() {
        // Places taken (as concurrent CreateWatchers would, before their watch starts).
        let mut slots = Vec::new();
        for _ in 0..MAX_WATCHERS_PER_SANDBOX {
            slots.push(Slot::take("sbx-slots", "tenant-slots").unwrap());
        }
        let why = Slot::take("sbx-slots", "tenant-slots").err().unwrap();
        assert!(why.contains("64 watchers"), "{why}");
        // Another sandbox of the tenant still may, until the tenant's cap.
        let mut more = Vec::new();
        while more.len() + slots.len() < MAX_WATCHERS_PER_TENANT {
            more.push(Slot::take(&format!("sbx-{}", more.len()), "tenant-slots").unwrap());
        }
        let why = Slot::take("sbx-other", "tenant-slots").err().unwrap();
        assert!(why.contains("your sandboxes"), "{why}");
        slots.pop();
        Slot::take("sbx-slots", "tenant-slots").unwrap();
        drop(slots);
        drop(more);
        assert!(Slot::take("sbx-slots", "tenant-slots").is_ok());
    }

    #[test]
    fn names_join_the_watched_directory() {
        assert_eq!(join("/", "a"), "/a");
        assert_eq!(join("/tmp", "x/a"), "/tmp/x/a");
    }
}
