//! openrun's control plane: the HTTP API of `openrun serve`.
//!
//! A multi-threaded tokio server (axum) in front of the namespace backend. State lives in one
//! SQLite file in the data dir (`openrun.db`, WAL): API keys (hashed), sandboxes and the
//! append-only `events` timeline, each written before the request that caused it is answered.
//! Sandboxes are created through the `openrun` binary's single-threaded helper
//! ([`openrun_runtime::Runtime::create_with_helper`]), since a multi-threaded process must not
//! fork namespaces itself. See `README.md` (section Server) for the API.

#![forbid(unsafe_code)]

mod activity;
mod admission;
mod agent_conns;
mod api;
mod archive;
mod db;
mod e2b;
mod egress;
mod environment;
mod error;
mod exec;
mod files;
mod images;
mod keys;
mod lifecycle;
mod local_key;
mod maintenance;
mod mcp;
mod metrics;
mod openapi;
mod pool;
mod preview;
mod processes;
mod query;
mod relay;
mod terminal;
mod time;
mod unread_body;
mod up;
mod watch;
mod watched_body;
mod ws;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use admission::DEFAULT_QUEUE as DEFAULT_CREATE_QUEUE;
pub use api::openapi_document;
pub use egress::{parse_resolve as parse_egress_resolve, EgressOptions, EgressSetupError};
pub use error::ServerError;
pub use keys::{create_key, ActorKind, NewKey};
pub use pool::DEFAULT_SIZE as DEFAULT_WARM_POOL;
pub use preview::check_preview_domain;

/// How long a graceful shutdown waits for open requests (streaming execs included) to end.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What `openrun serve` was asked to do, checked before any thread starts.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to listen on (port 0 picks a free port; the chosen one goes to `on_listening`).
    pub listen: SocketAddr,
    /// Data dir of the runtime and of `openrun.db`.
    pub data_dir: PathBuf,
    /// The `openrun` binary, run as the single-threaded helper that creates sandboxes.
    pub helper: PathBuf,
    /// Sandbox creates run at once (at least 1; see [`default_max_creating`]).
    pub max_creating: usize,
    /// Creates that may wait for a slot; beyond them a create gets 429 (see
    /// [`DEFAULT_CREATE_QUEUE`]).
    pub create_queue: usize,
    /// Limits of creates that name none (see [`default_limits`]).
    pub default_limits: openrun_runtime::Limits,
    /// Size of the disk pool, when this server makes it (`None`: half the free space).
    pub disk_pool_size: Option<u64>,
    /// Options of the egress proxy (`--egress-resolve`, `--egress-ca-file`).
    pub egress: EgressOptions,
    /// Domain of host previews (`<port>-<id>.<domain>`), checked by
    /// [`check_preview_domain`]; `None`: previews by path only.
    pub preview_domain: Option<String>,
    /// Sandboxes kept ready for creates that ask for nothing beyond the defaults (0: none;
    /// see [`DEFAULT_WARM_POOL`]).
    pub warm_pool: usize,
}

/// Default disk quota of sandboxes created through the API: room for a repository, its
/// dependencies and build outputs, while no single sandbox can fill the pool's disk.
pub const DEFAULT_DISK_BYTES: u64 = 10 << 30;

/// Default memory limit of sandboxes created through the API: 2 GiB (enough for compilers
/// and test suites), at most half the host's memory so one sandbox cannot exhaust it.
pub fn default_memory_bytes() -> u64 {
    const TWO_GIB: u64 = 2 << 30;
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kib| kib.saturating_mul(1024));
    match total {
        Some(total) => TWO_GIB
            .min(total / 2)
            .max(openrun_runtime::limits::MIN_MEMORY_BYTES),
        None => TWO_GIB,
    }
}

/// The server's default limits: [`default_memory_bytes`] of memory, [`DEFAULT_DISK_BYTES`] of
/// disk, no CPU limit (CPU time is shared fairly anyway), the runtime's pids and open-files
/// defaults.
pub fn default_limits() -> openrun_runtime::Limits {
    openrun_runtime::Limits {
        memory_bytes: Some(default_memory_bytes()),
        disk_bytes: Some(DEFAULT_DISK_BYTES),
        ..openrun_runtime::Limits::default()
    }
}

/// Default of [`Config::max_creating`]: twice the number of CPUs this process may use.
pub fn default_max_creating() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().saturating_mul(2))
}

/// Path of the state database in a data dir.
pub fn database_path(data_dir: &Path) -> PathBuf {
    data_dir.join("openrun.db")
}

/// Runs the server until SIGINT or SIGTERM: opens the runtime and the database, reconciles the
/// database with the sandboxes that still exist, binds, calls `on_listening` with the bound
/// address, and serves. Starts its own multi-threaded tokio runtime, so call it from a plain
/// thread (the caller should already be a child subreaper, see `Runtime::create_with_helper`).
pub fn run(config: Config, on_listening: impl FnOnce(SocketAddr)) -> Result<(), ServerError> {
    raise_open_files_limit();
    // Host-wide limits every sandbox shares (open files, pids, inotify): raised once here,
    // never lowered, so that one sandbox cannot use them up for the others.
    openrun_runtime::host_limits::raise_shared_limits();
    let mut runtime = openrun_runtime::Runtime::open(&config.data_dir)?;
    runtime.set_disk_pool_size(config.disk_pool_size);
    // Every create through the API gets the default disk quota: without its pool, say so
    // now rather than on each create.
    if config.default_limits.disk_bytes.is_some() {
        runtime.ensure_disk_pool()?;
    }
    let db = db::Db::open(&database_path(runtime.data_dir()))?;
    let egress = egress::Egress::open(runtime.data_dir(), &config.egress)?;
    let previews = preview::Previews::open(runtime.data_dir(), config.preview_domain.clone())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("openrun-server")
        .build()
        .map_err(ServerError::AsyncRuntime)?;
    let state = Arc::new(api::AppState {
        db,
        runtime: Arc::new(runtime),
        helper: config.helper.clone(),
        agents: Arc::new(maintenance::AgentReaper::default()),
        metrics: Arc::new(metrics::Metrics::default()),
        admission: admission::Admission::new(config.max_creating, config.create_queue),
        environments: Default::default(),
        default_limits: config.default_limits.clone(),
        egress,
        previews,
        pool: pool::Pool::new(config.warm_pool),
        conns: Default::default(),
        activity: Default::default(),
    });
    let result = rt.block_on(serve(state, config.listen, on_listening));
    rt.shutdown_timeout(SHUTDOWN_GRACE);
    result
}

async fn serve(
    state: Arc<api::AppState>,
    listen: SocketAddr,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<(), ServerError> {
    maintenance::reconcile(&state).await?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| ServerError::Bind {
            addr: listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServerError::Bind {
        addr: listen,
        source,
    })?;
    tracing::info!(%addr, "listening");
    state.egress.set_server_addr(addr);
    write_local_key(&state, addr).await;
    // Caught from before the address is announced: a client that stops the server at once
    // must still get a graceful shutdown, not the default action of SIGTERM.
    let mut signals = ShutdownSignals::install()?;
    on_listening(addr);

    let maintenance = tokio::spawn(maintenance::run(state.clone()));
    if let Err(e) = pool::start(&state).await {
        tracing::warn!(error = %e, "cannot start the warm pool: creates are made cold");
    }
    let stop = Arc::new(tokio::sync::Notify::new());
    let stopped = stop.clone();
    let app = api::router(state.clone());
    // Streams are many small writes (an NDJSON line, a WebSocket frame): without TCP_NODELAY,
    // Nagle holds each one back until the client's delayed ACK, ~40 ms.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    let mut server = tokio::spawn(async move {
        // The peer's address goes to previews as X-Forwarded-For.
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move { stopped.notified().await })
        .await
    });
    let result = tokio::select! {
        done = &mut server => done,
        () = signals.recv() => {
            tracing::info!("shutting down");
            stop.notify_one();
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
                Ok(done) => done,
                Err(_) => {
                    tracing::warn!("requests still open after {SHUTDOWN_GRACE:?}: closing them");
                    server.abort();
                    Ok(Ok(()))
                }
            }
        }
    };
    maintenance.abort();
    // Pooled sandboxes belong to nobody: they end with the server.
    pool::Pool::shutdown(&state).await;
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(source)) => Err(ServerError::Serve(source)),
        Err(join) => Err(ServerError::Serve(std::io::Error::other(join))),
    }
}

/// Writes or updates `<data-dir>/local.json` on a loopback address ([`local_key`]). A failure
/// is logged, not fatal: clients can still use keys of their own.
async fn write_local_key(state: &api::AppState, addr: SocketAddr) {
    let data_dir = state.runtime.data_dir().to_path_buf();
    // Blocking, and `create_key` drives its own small runtime: not on an async worker.
    let outcome =
        match tokio::task::spawn_blocking(move || local_key::ensure(&data_dir, addr)).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(e)) => return tracing::warn!(error = %e, "cannot write the local key file"),
            Err(e) => return tracing::warn!(error = %e, "cannot write the local key file"),
        };
    if let local_key::Outcome::Kept { api_key } = outcome {
        let hash = keys::hash(&api_key);
        match state.db.call(move |c| db::key_by_hash(c, &hash)).await {
            Ok(Some(_)) => {}
            Ok(None) => tracing::warn!(
                "the key in {} is unknown to this database: delete the file and restart to get a new one",
                local_key::FILE_NAME
            ),
            Err(e) => tracing::warn!(error = %e, "cannot check the local key"),
        }
    }
}

/// SIGINT and SIGTERM, handled from [`ShutdownSignals::install`] on.
struct ShutdownSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn install() -> Result<Self, ServerError> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate()).map_err(ServerError::Signals)?,
            int: signal(SignalKind::interrupt()).map_err(ServerError::Signals)?,
        })
    }

    /// Waits for either (also one that arrived since `install`).
    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// Raises this process's soft limit of open files to its hard limit: the server holds
/// descriptors for every sandbox's agent, relays and proxy connections (up to
/// [`egress::MAX_SERVER_CONNECTIONS`] client connections, each with its upstream), far beyond a
/// default soft limit of 1024. Failing is logged, not fatal.
fn raise_open_files_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let limit = getrlimit(Resource::Nofile);
    // An unlimited hard limit still stops at the kernel's `fs.nr_open`.
    let target = limit.maximum.or_else(|| {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|n| n.trim().parse::<u64>().ok())
    });
    let Some(target) = target else { return };
    if limit.current.is_some_and(|current| current < target) {
        let raised = rustix::process::Rlimit {
            current: Some(target),
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => tracing::debug!(limit = target, "raised the limit of open files"),
            Err(e) => tracing::warn!(error = %e, "cannot raise the limit of open files"),
        }
    }
}
