//! Errors: [`ServerError`] for starting and running the server, [`ApiError`] for one request,
//! turned into HTTP in exactly one place ([`ApiError::into_response`]). Messages are lower
//! case without a trailing period, like the runtime's.

use std::net::SocketAddr;
use std::path::PathBuf;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use openrun_protocol::{AgentError, ErrorCode};

/// Why the server (or `openrun key create`) could not start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The namespace backend could not be opened or reconciled.
    #[error(transparent)]
    Runtime(#[from] openrun_runtime::RuntimeError),
    /// The state database failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// The egress proxy could not be set up (its CA, `--egress-*` options).
    #[error(transparent)]
    Egress(#[from] crate::egress::EgressSetupError),
    /// The listening socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The tokio runtime could not start.
    #[error("cannot start the async runtime: {0}")]
    AsyncRuntime(#[source] std::io::Error),
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    /// Serving connections failed.
    #[error("the server failed: {0}")]
    Serve(#[source] std::io::Error),
    /// A key name that cannot be stored.
    #[error("invalid key name {0:?}: expected 1 to 64 printable characters")]
    InvalidKeyName(String),
    /// The system's random source failed.
    #[error("cannot read random bytes for a key: {0}")]
    Random(#[source] std::io::Error),
    /// A background task panicked or was cancelled.
    #[error("a background task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
    /// The secret of preview tokens could not be read or made.
    #[error("cannot use the preview token key {path}: {source}")]
    PreviewKey {
        /// The key file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The state database failed.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The database file could not be created or opened.
    #[error("cannot open the database {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// SQLite refused a statement.
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored value does not decode (a bug or a hand-edited database).
    #[error("corrupt database value: {0}")]
    Corrupt(String),
    /// The blocking task running the statement failed.
    #[error("database task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
    /// A commit could not be synced to the disk.
    #[error("cannot sync the database's log to the disk: {0}")]
    Sync(#[source] std::io::Error),
}

/// Why one request failed. Each variant has one HTTP status and one stable `code`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No key, or a key the server does not know (401 `unauthorized`).
    #[error("{0}")]
    Unauthorized(String),
    /// No such resource for this tenant (404 `not_found`); another tenant's ids included.
    #[error("{0}")]
    NotFound(String),
    /// The request is malformed or asks for something impossible (400 `invalid_argument`).
    #[error("{0}")]
    InvalidArgument(String),
    /// A network policy that cannot be applied (400 `invalid_network_policy`).
    #[error("{0}")]
    InvalidNetworkPolicy(String),
    /// Network mode `open` was asked for on a server not started with
    /// `--allow-open-network` (403 `open_network_disabled`).
    #[error("network mode \"open\" is disabled on this server: it connects the sandbox to everything the host reaches (cloud metadata services, private networks, the host's own services); an operator may enable it with `openrun serve --allow-open-network`. Use mode \"allowlist\" instead")]
    OpenNetworkDisabled,
    /// The body is larger than the server accepts (413 `body_too_large`).
    #[error("request body larger than {limit} bytes")]
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The sandbox exists but is stopped (409 `sandbox_not_running`).
    #[error("sandbox {0} is not running")]
    NotRunning(String),
    /// The server is at capacity (429 `too_many_requests`, with `Retry-After`).
    #[error("{message}")]
    TooManyRequests {
        /// What is full, for the client.
        message: String,
        /// Seconds after which a retry may succeed.
        retry_after_secs: u64,
    },
    /// The sandbox is paused: its processes are frozen (409 `sandbox_paused`).
    #[error("sandbox {0} is paused: resume it first (POST /v1/sandboxes/{0}/resume)")]
    Paused(String),
    /// What answers inside the sandbox (a preview's server) did not speak HTTP, or broke off
    /// (502 `bad_gateway`).
    #[error("{0}")]
    BadGateway(String),
    /// The sandbox agent refused the request; its [`ErrorCode`] picks the status.
    #[error("{}", .0.message)]
    Agent(AgentError),
    /// The host's disk (or the data directory's quota) is full (507 `insufficient_storage`):
    /// the client learns that much, the detail is logged.
    #[error("{context}: the server's disk is full")]
    NoSpace {
        /// What was being done, safe to show.
        context: String,
        /// The cause, logged only.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A failure of the server or the host (500 `internal`). The detail is logged; the client
    /// gets only `context`.
    #[error("{context}")]
    Internal {
        /// What was being done, safe to show.
        context: String,
        /// The cause, logged only.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl ApiError {
    /// A server-side failure: `context` is shown, `source` only logged. A disk that is full
    /// anywhere in `source`'s chain makes it a [`ApiError::NoSpace`].
    pub fn internal(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        let (context, source) = (context.into(), source.into());
        if is_disk_full(source.as_ref()) {
            Self::NoSpace { context, source }
        } else {
            Self::Internal { context, source }
        }
    }

    /// HTTP status and stable code.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Self::InvalidArgument(_) => (StatusCode::BAD_REQUEST, "invalid_argument"),
            Self::InvalidNetworkPolicy(_) => (StatusCode::BAD_REQUEST, "invalid_network_policy"),
            Self::OpenNetworkDisabled => (StatusCode::FORBIDDEN, "open_network_disabled"),
            Self::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
            Self::NotRunning(_) => (StatusCode::CONFLICT, "sandbox_not_running"),
            Self::TooManyRequests { .. } => (StatusCode::TOO_MANY_REQUESTS, "too_many_requests"),
            Self::Paused(_) => (StatusCode::CONFLICT, "sandbox_paused"),
            Self::BadGateway(_) => (StatusCode::BAD_GATEWAY, "bad_gateway"),
            Self::Agent(e) => agent_status(e.code),
            Self::NoSpace { .. } => (StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage"),
            Self::Internal { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }

    /// The message a client may see, once the failure is in the log: a server-side cause
    /// (which the client never sees) at `error`, anything else at `debug`. Every surface that
    /// answers with an `ApiError` (a response, a stream's `error` line, an `up` result) says
    /// it through this.
    pub fn reported(&self) -> String {
        let (status, code) = self.status_and_code();
        match self {
            Self::Internal { context, source } | Self::NoSpace { context, source } => {
                tracing::error!(error = %source, "{context}");
                self.to_string()
            }
            // The agent's own failure text may name host details: keep it in the log.
            Self::Agent(e) if status == StatusCode::INTERNAL_SERVER_ERROR => {
                tracing::error!(error = %e.message, "the sandbox agent failed");
                "the sandbox agent failed".to_string()
            }
            _ => {
                tracing::debug!(code, status = status.as_u16(), "{self}");
                self.to_string()
            }
        }
    }

    /// Maps a failed agent call: a refusal keeps the agent's code, a lost or confused agent
    /// is the server's problem (only `context` is shown).
    pub fn from_client(context: &str, e: openrun_runtime::ClientError) -> Self {
        match e {
            openrun_runtime::ClientError::Agent(e) => Self::Agent(e),
            other => Self::internal(context, other),
        }
    }

    /// Maps a runtime error: the caller's input (bad rootfs, image) is a 400, a sandbox that is
    /// gone is reported by the caller, anything else is the host's fault.
    pub fn from_runtime(context: &str, e: openrun_runtime::RuntimeError) -> Self {
        if e.is_user_error() {
            Self::InvalidArgument(e.to_string())
        } else {
            Self::internal(context, e)
        }
    }
}

/// Whether `error` or one of its causes is a full disk or quota: an I/O error `ENOSPC` or
/// `EDQUOT`, or SQLite's `SQLITE_FULL`. The kernel also says `ENOSPC` for limits that are no
/// disk (user namespaces, cgroups): a runtime error that is not about files ends the search.
fn is_disk_full(error: &(dyn std::error::Error + 'static)) -> bool {
    use openrun_runtime::RuntimeError;
    use std::io::ErrorKind;
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(runtime) = e.downcast_ref::<RuntimeError>() {
            if !matches!(
                runtime,
                RuntimeError::Io { .. }
                    | RuntimeError::DataDir { .. }
                    | RuntimeError::HostImage { .. }
            ) {
                return false;
            }
        }
        let io_full = e.downcast_ref::<std::io::Error>().is_some_and(|io| {
            matches!(io.kind(), ErrorKind::StorageFull | ErrorKind::QuotaExceeded)
        });
        let sqlite_full = matches!(
            e.downcast_ref::<rusqlite::Error>(),
            Some(rusqlite::Error::SqliteFailure(f, _)) if f.code == rusqlite::ErrorCode::DiskFull
        );
        if io_full || sqlite_full {
            return true;
        }
        next = e.source();
    }
    false
}

/// The one place an agent [`ErrorCode`] becomes an HTTP status and stable code.
fn agent_status(code: ErrorCode) -> (StatusCode, &'static str) {
    use ErrorCode as E;
    match code {
        E::NotFound => (StatusCode::NOT_FOUND, "not_found"),
        E::CommandNotFound => (StatusCode::NOT_FOUND, "command_not_found"),
        E::NoSuchProcess => (StatusCode::NOT_FOUND, "no_such_process"),
        E::PermissionDenied | E::OutsideSandbox => (StatusCode::FORBIDDEN, "forbidden"),
        E::AlreadyExists => (StatusCode::CONFLICT, "already_exists"),
        E::DirectoryNotEmpty => (StatusCode::CONFLICT, "directory_not_empty"),
        E::StillRunning => (StatusCode::CONFLICT, "still_running"),
        E::NotADirectory => (StatusCode::BAD_REQUEST, "not_a_directory"),
        E::IsADirectory => (StatusCode::BAD_REQUEST, "is_a_directory"),
        E::InvalidArgument => (StatusCode::BAD_REQUEST, "invalid_argument"),
        E::NotSupported => (StatusCode::BAD_REQUEST, "not_supported"),
        E::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
        E::ConnectionRefused => (StatusCode::BAD_GATEWAY, "port_closed"),
        E::VersionMismatch | E::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        Self::internal("the state database failed", e)
    }
}

/// The stable `code` of an error answer, kept in its response's extensions.
#[derive(Debug, Clone, Copy)]
pub struct ErrorCodeTag(pub &'static str);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let message = self.reported();
        let body = serde_json::json!({ "code": code, "message": message });
        let mut response = (status, axum::Json(body)).into_response();
        // For the metrics and request log, which see only the response.
        response.extensions_mut().insert(ErrorCodeTag(code));
        if let Self::TooManyRequests {
            retry_after_secs, ..
        } = self
        {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, retry_after_secs.into());
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_space() -> std::io::Error {
        std::io::Error::from_raw_os_error(rustix::io::Errno::NOSPC.raw_os_error())
    }

    #[test]
    fn a_full_disk_anywhere_in_the_cause_is_a_507_naming_it() {
        let nested = openrun_image::ImageError::Io {
            context: "cannot write layer".into(),
            source: no_space(),
        };
        let e = ApiError::internal("cannot snapshot the sandbox", nested);
        assert_eq!(
            e.status_and_code(),
            (StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage")
        );
        assert_eq!(
            e.to_string(),
            "cannot snapshot the sandbox: the server's disk is full"
        );
        let quota = std::io::Error::from_raw_os_error(rustix::io::Errno::DQUOT.raw_os_error());
        let e = ApiError::internal("cannot copy", quota);
        assert_eq!(e.status_and_code().1, "insufficient_storage");
        let sqlite = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
            None,
        );
        let e = ApiError::from(DbError::Sqlite(sqlite));
        assert_eq!(e.status_and_code().1, "insufficient_storage");
    }

    #[test]
    fn other_host_failures_stay_a_500_showing_only_the_context() {
        // ENOSPC from a kernel limit that is no disk (here: user namespaces).
        let limit = openrun_runtime::RuntimeError::NoUserNamespaces(no_space());
        let e = ApiError::internal("cannot create the sandbox", limit);
        assert_eq!(e.status_and_code().1, "internal");
        let denied = std::io::Error::from_raw_os_error(rustix::io::Errno::ACCESS.raw_os_error());
        let e = ApiError::internal("cannot snapshot the sandbox", denied);
        assert_eq!(
            e.status_and_code(),
            (StatusCode::INTERNAL_SERVER_ERROR, "internal")
        );
        assert_eq!(e.to_string(), "cannot snapshot the sandbox");
    }
}
