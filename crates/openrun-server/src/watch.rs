//! Directory watching: the core call [`watch_dir`] (used by `/v1` and the E2B surface) and
//! `GET /v1/sandboxes/{id}/files/watch?path=&recursive=`, which streams the changes as NDJSON.
//!
//! A watch is one agent connection with a `Watch` request on it: the agent resolves the path
//! inside the sandbox, watches it with inotify, and pushes `FileEvent`s until the connection
//! closes (dropping the receiver closes it) or the directory goes away. Everything is bounded:
//! the channel here, the socket, and the agent's queue per watch, which reports an `overflow`
//! event when a slow reader made it drop events.
//!
//! | line | meaning |
//! |---|---|
//! | `{"type":"change","name":"sub/a.txt","kind":"create"}` | `kind`: `create`, `write`, `remove`, `rename`, `chmod`; `name` relative to the watched directory |
//! | `{"type":"change","name":"","kind":"overflow"}` | events were lost; list the directory again |
//! | `{"type":"ended","reason":"..."}` | the last line: the directory was removed, the sandbox stopped, or `timeout_ms` passed |

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use openrun_protocol::{
    AgentError, AgentMessage, ErrorCode, FileEventKind, Request, Response as AgentResponse,
};
use openrun_runtime::ClientError;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::api::{find, Caller, Shared};
use crate::error::ApiError;
use crate::exec::open_running;
use crate::openapi::ErrorAnswers;
use crate::query::Query;

/// Events buffered between the agent connection and a slow consumer; beyond it the agent's
/// own queue fills, and then it reports an overflow.
const EVENT_BUFFER: usize = 256;

/// The reason of [`WatchEvent::Ended`] when the sandbox's agent went away.
pub(crate) const SANDBOX_STOPPED: &str = "the sandbox stopped (its agent connection closed)";

/// One thing a watch reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum WatchEvent {
    /// Something changed in the watched directory (or lost events: `kind` `overflow`).
    Change {
        /// Path relative to the watched directory (empty for `overflow`).
        name: String,
        /// `create`, `write`, `remove`, `rename`, `chmod` or `overflow`.
        #[schema(value_type = String)]
        kind: FileEventKind,
    },
    /// The watch ended by itself; nothing follows.
    Ended {
        /// Why, e.g. "the watched directory was removed".
        reason: String,
    },
}

/// Watches the directory `path` (with every subdirectory when `recursive`) in the caller's
/// running sandbox `id`. The changes arrive on the receiver, an [`WatchEvent::Ended`] last
/// when the watch ends by itself; dropping the receiver ends the watch. A missing path is
/// 404, a file 400 `not_a_directory`, too many watches in the sandbox 429 (they end when
/// their clients go), a tree too big to watch (too many directories, deeper than
/// `PATH_MAX`, the sandbox's inotify watches used up) 400 `invalid_argument` naming the
/// limit, a sandbox whose agent predates watching 400 `not_supported`.
pub(crate) async fn watch_dir(
    s: &Shared,
    caller: &Caller,
    id: &str,
    path: String,
    recursive: bool,
) -> Result<mpsc::Receiver<WatchEvent>, ApiError> {
    if path.is_empty() || path.contains('\0') {
        return Err(ApiError::InvalidArgument(
            "path must be a non-empty path without NUL".into(),
        ));
    }
    let row = find(s, caller, id).await?;
    let (_sandbox, mut client) = open_running(s, &row).await?;
    let answer = client
        .call(Request::Watch { path, recursive })
        .await
        .map_err(refusal)?;
    let watch = match answer.header {
        AgentResponse::Watching { watch } => watch,
        other => {
            return Err(ApiError::internal(
                "the sandbox agent failed",
                format!("unexpected answer to watch: {other:?}"),
            ))
        }
    };
    let (tx, rx) = mpsc::channel(EVENT_BUFFER);
    tokio::spawn(async move {
        loop {
            let frame = tokio::select! {
                frame = client.next_event() => frame,
                // Nobody listens any more: closing the connection ends the agent's watch.
                () = tx.closed() => return,
            };
            let event = match frame {
                Ok(frame) => match frame.header {
                    AgentMessage::FileEvent {
                        watch: w,
                        name,
                        kind,
                    } if w == watch => WatchEvent::Change { name, kind },
                    AgentMessage::WatchEnded { watch: w, reason } if w == watch => {
                        let _ = tx.send(WatchEvent::Ended { reason }).await;
                        return;
                    }
                    _ => continue,
                },
                Err(e) => {
                    tracing::debug!(error = %e, watch, "a watch's agent connection ended");
                    let reason = SANDBOX_STOPPED.to_string();
                    let _ = tx.send(WatchEvent::Ended { reason }).await;
                    return;
                }
            };
            if tx.send(event).await.is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

/// An agent's refusal of `Watch` as an API error: the agent's categories, but its
/// `too_large` (too many watches at once, or the agent out of descriptors: both pass) is 429,
/// and an agent that does not know the request says so. Limits that waiting does not lift
/// (the tree's size or depth, the kernel's watches) come as `invalid_argument`: 400.
fn refusal(e: ClientError) -> ApiError {
    match e {
        ClientError::Agent(err) if err.is_unknown_request() => ApiError::Agent(AgentError::new(
            ErrorCode::NotSupported,
            "this sandbox's agent predates directory watching; watch in a sandbox created \
                 by this server version",
        )),
        ClientError::Agent(err) if err.code == ErrorCode::TooLarge => ApiError::TooManyRequests {
            message: err.message,
            retry_after_secs: 5,
        },
        other => ApiError::from_client("the sandbox agent failed", other),
    }
}

/// `GET /v1/sandboxes/{id}/files/watch?path=/x[&recursive=true][&timeout_ms=N]`: NDJSON, one
/// [`WatchEvent`] per line, for as long as the client reads (or `timeout_ms`: then an `ended`
/// line closes the stream).
#[utoipa::path(get, operation_id = "watch_dir",
    path = "/v1/sandboxes/{id}/files/watch",
    tag = "files",
    params(("id" = String, Path, description = "Sandbox id"), ("path" = String, Query, description = "Absolute path of a directory inside the sandbox"), ("recursive" = Option<bool>, Query, description = "Also watch every subdirectory, including new ones"), ("timeout_ms" = Option<u64>, Query, description = "End the stream (with an ended line) after this many milliseconds; default: never")),
    responses((status = 200, description = "NDJSON lines, each a WatchEvent: {\"type\":\"change\",\"name\",\"kind\"} (kind create, write, remove, rename, chmod, or overflow when events were lost), and {\"type\":\"ended\",\"reason\"} last when the directory is removed, the sandbox stops or timeout_ms passes. Closing the response ends the watch.", content_type = "application/x-ndjson", body = WatchEvent), ErrorAnswers))]
pub async fn watch(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    query: Query,
) -> Result<Response, ApiError> {
    query.only(&["path", "recursive", "timeout_ms"])?;
    let path = query.path("path")?;
    let recursive = query.flag("recursive")?;
    let deadline = query
        .u64("timeout_ms")?
        .map(|ms| tokio::time::Instant::now() + std::time::Duration::from_millis(ms));
    let rx = watch_dir(&s, &caller, &id, path, recursive).await?;
    let stream = futures_util::stream::unfold(Some(rx), move |rx| async move {
        let mut rx = rx?;
        let next = match deadline {
            Some(at) => tokio::time::timeout_at(at, rx.recv()).await.ok(),
            None => Some(rx.recv().await),
        };
        let (event, rest) = match next {
            Some(Some(event @ WatchEvent::Change { .. })) => (event, Some(rx)),
            Some(Some(event @ WatchEvent::Ended { .. })) => (event, None),
            Some(None) => return None,
            None => (
                WatchEvent::Ended {
                    reason: "timeout_ms passed".into(),
                },
                None,
            ),
        };
        // Cannot fail for these plain strings; an empty line would be skipped by readers.
        let mut text = serde_json::to_string(&event).unwrap_or_default();
        text.push('\n');
        Some((Ok::<_, std::convert::Infallible>(Bytes::from(text)), rest))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_have_a_stable_json_shape() {
        let change = WatchEvent::Change {
            name: "sub/a.txt".into(),
            kind: FileEventKind::Create,
        };
        assert_eq!(
            serde_json::to_value(&change).unwrap(),
            serde_json::json!({"type": "change", "name": "sub/a.txt", "kind": "create"})
        );
        let ended = WatchEvent::Ended {
            reason: "gone".into(),
        };
        assert_eq!(
            serde_json::to_value(&ended).unwrap(),
            serde_json::json!({"type": "ended", "reason": "gone"})
        );
    }

    #[test]
    fn an_old_agent_is_not_supported_caps_are_429_and_trees_400() {
        let e = serde_json::from_str::<openrun_protocol::RequestEnvelope>(
            r#"{"id":1,"request":{"op":"not_a_request"}}"#,
        )
        .unwrap_err();
        let old = AgentError::new(
            ErrorCode::InvalidArgument,
            format!("malformed request: {e}"),
        );
        let (status, code) = refusal(ClientError::Agent(old)).status_and_code();
        assert_eq!((status.as_u16(), code), (400, "not_supported"));
        let full = AgentError::new(ErrorCode::TooLarge, "too many watches");
        let (status, _) = refusal(ClientError::Agent(full)).status_and_code();
        assert_eq!(status.as_u16(), 429);
        let tree = AgentError::new(
            ErrorCode::InvalidArgument,
            "cannot watch / recursively: more than 16384 directories to watch",
        );
        let (status, code) = refusal(ClientError::Agent(tree)).status_and_code();
        assert_eq!((status.as_u16(), code), (400, "invalid_argument"));
        let missing = AgentError::new(ErrorCode::NotFound, "no such file or directory: /x");
        let (status, _) = refusal(ClientError::Agent(missing)).status_and_code();
        assert_eq!(status.as_u16(), 404);
    }
}
