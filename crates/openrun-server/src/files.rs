//! `/v1/sandboxes/{id}/files…`: each handler is a thin adapter over one core call
//! ([`read_file`], [`write_file`], [`list_dir`], [`stat_path`], [`make_dir`], [`remove_path`],
//! [`move_path`]; the E2B and MCP surfaces call them too), each one agent request. The
//! agent resolves every path inside the sandbox root (a path that tries to leave it fails
//! there), so no path logic lives here. Agent refusals become HTTP in `error.rs`.
//!
//! | method and path | agent request | answer |
//! |---|---|---|
//! | `GET files?path=&offset=&limit=` | `ReadFile` | 200 raw bytes |
//! | `PUT files?path=&mode=644&parents=true` (raw body, ≤ 16 MiB) | `WriteFile` | 204 |
//! | `GET files/list?path=` | `ListDir` | 200 `[{name,file_type,size,…}]` |
//! | `GET files/stat?path=` | `Stat` | 200 `{name,file_type,size,…}` |
//! | `POST files/mkdir` `{"path","parents"}` | `Mkdir` | 204 |
//! | `POST files/remove` `{"path","recursive"}` | `Remove` | 204 |
//! | `POST files/move` `{"from","to"}` | `Rename` | 204 |

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use openrun_protocol::{FileStat, Request, Response as AgentResponse, MAX_DATA_LEN};

use crate::api::{Caller, JsonBody, Shared};
use crate::db::{self, NewEvent, SandboxRow};
use crate::error::ApiError;
use crate::exec::agent_call;
use crate::openapi::ErrorAnswers;
use crate::query::Query;

/// An answer the agent should not have given to this request.
fn unexpected(other: AgentResponse) -> ApiError {
    ApiError::internal(
        "the sandbox agent failed",
        format!("unexpected answer: {other:?}"),
    )
}

/// Checks a path from a JSON body (a query path is checked by [`Query::path`]).
fn check_path(name: &str, path: &str) -> Result<(), ApiError> {
    if path.is_empty() || path.contains('\0') {
        return Err(ApiError::InvalidArgument(format!(
            "{name} must be a non-empty path without NUL"
        )));
    }
    Ok(())
}

/// `path` made absolute with `//`, `.` and `..` folded lexically (`..` stops at the root),
/// without looking at the file system: a key for a path, never a way to resolve one (the
/// agent resolves paths inside the sandbox).
pub(crate) fn normalize_path(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            part => parts.push(part),
        }
    }
    format!("/{}", parts.join("/"))
}

/// Appends an event of the caller's on `row`'s sandbox.
pub(crate) async fn record(
    s: &Shared,
    caller: &Caller,
    row: &SandboxRow,
    kind: &'static str,
    payload: serde_json::Value,
) -> Result<(), ApiError> {
    let event = NewEvent {
        sandbox_id: row.id.clone(),
        tenant: caller.tenant.clone(),
        actor: caller.actor.clone(),
        kind,
        payload,
    };
    s.db.call(move |c| db::append_event(c, &event)).await?;
    Ok(())
}

/// `GET /v1/sandboxes/{id}/files?path=/x[&offset=N][&limit=N]`: the bytes.
#[utoipa::path(get, operation_id = "read_file",
    path = "/v1/sandboxes/{id}/files",
    tag = "files",
    params(("id" = String, Path, description = "Sandbox id"), ("path" = String, Query, description = "Absolute path inside the sandbox"), ("offset" = Option<u64>, Query, description = "First byte to read"), ("limit" = Option<u64>, Query, description = "Most bytes to read")),
    responses((status = 200, description = "The file's bytes; X-File-Size has its whole size", content_type = "application/octet-stream", body = Vec<u8>), ErrorAnswers))]
pub async fn read(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    query: Query,
) -> Result<Response, ApiError> {
    query.only(&["path", "offset", "limit"])?;
    let file = read_file(
        &s,
        &caller,
        &id,
        query.path("path")?,
        query.u64("offset")?.unwrap_or(0),
        query.u64("limit")?,
    )
    .await?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (
                header::HeaderName::from_static("x-file-size"),
                file.size.to_string(),
            ),
        ],
        file.data,
    )
        .into_response())
}

/// Bytes read from a file, and its whole size.
#[derive(Debug)]
pub(crate) struct FileData {
    /// The bytes from the offset asked for (at most [`MAX_DATA_LEN`]).
    pub data: Vec<u8>,
    /// Size of the whole file.
    pub size: u64,
}

/// Reads up to `limit` bytes (capped at [`MAX_DATA_LEN`]) of the file `path` in the caller's
/// sandbox `id`, from `offset`.
pub(crate) async fn read_file(
    s: &Shared,
    caller: &Caller,
    id: &str,
    path: String,
    offset: u64,
    limit: Option<u64>,
) -> Result<FileData, ApiError> {
    check_path("path", &path)?;
    let request = Request::ReadFile {
        path,
        offset,
        limit,
    };
    let (_, answer) = agent_call(s, caller, id, request, Vec::new()).await?;
    match answer.header {
        AgentResponse::FileData { size, .. } => Ok(FileData {
            data: answer.data,
            size,
        }),
        other => Err(unexpected(other)),
    }
}

/// `PUT /v1/sandboxes/{id}/files?path=/x[&mode=644][&parents=true]`: writes the body.
#[utoipa::path(put, operation_id = "write_file",
    path = "/v1/sandboxes/{id}/files",
    tag = "files",
    params(("id" = String, Path, description = "Sandbox id"), ("path" = String, Query, description = "Absolute path inside the sandbox"), ("mode" = Option<String>, Query, description = "Octal permissions of a new file, e.g. 644"), ("parents" = Option<bool>, Query, description = "Create missing parent directories")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The whole new content (up to 16 MiB)"),
    responses((status = 204, description = "Written"), ErrorAnswers))]
pub async fn write(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    query: Query,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiError> {
    query.only(&["path", "mode", "parents"])?;
    let path = query.path("path")?;
    let mode = query.mode("mode")?;
    let parents = query.flag("parents")?;
    let data = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge {
                limit: MAX_DATA_LEN,
            }
        } else {
            ApiError::InvalidArgument(format!("cannot read the request body: {}", e.body_text()))
        }
    })?;
    write_file(
        &s,
        &caller,
        &id,
        path,
        Vec::from(data),
        mode,
        parents,
        false,
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Writes `data` (at most [`MAX_DATA_LEN`] bytes) to the file `path` in the caller's sandbox
/// `id`: atomically replaced, or appended to with `append` (not atomic: for chunked uploads to
/// a temporary name, moved into place after). Records `file.write`.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn write_file(
    s: &Shared,
    caller: &Caller,
    id: &str,
    path: String,
    data: Vec<u8>,
    mode: Option<u32>,
    parents: bool,
    append: bool,
) -> Result<(), ApiError> {
    check_path("path", &path)?;
    if data.len() > MAX_DATA_LEN {
        return Err(ApiError::TooLarge {
            limit: MAX_DATA_LEN,
        });
    }
    let mut payload = serde_json::json!({ "path": path, "bytes": data.len() });
    if append {
        payload["append"] = serde_json::json!(true);
    }
    let request = Request::WriteFile {
        path,
        mode,
        parents,
        append,
    };
    change(s, caller, id, request, data, "file.write", payload).await
}

/// Asks the agent about `path` (checked first) and returns its answer: the shared half of
/// `list` and `stat`.
async fn ask_about_path(
    s: &Shared,
    caller: &Caller,
    id: &str,
    path: String,
    request: fn(String) -> Request,
) -> Result<AgentResponse, ApiError> {
    check_path("path", &path)?;
    Ok(agent_call(s, caller, id, request(path), Vec::new())
        .await?
        .1
        .header)
}

/// The entries of the directory `path` in the caller's sandbox `id`, sorted by name.
pub(crate) async fn list_dir(
    s: &Shared,
    caller: &Caller,
    id: &str,
    path: String,
) -> Result<Vec<FileStat>, ApiError> {
    match ask_about_path(s, caller, id, path, |path| Request::ListDir { path }).await? {
        AgentResponse::Entries { entries } => Ok(entries),
        other => Err(unexpected(other)),
    }
}

/// Metadata of `path` in the caller's sandbox `id` (a final symlink is not followed).
pub(crate) async fn stat_path(
    s: &Shared,
    caller: &Caller,
    id: &str,
    path: String,
) -> Result<FileStat, ApiError> {
    match ask_about_path(s, caller, id, path, |path| Request::Stat { path }).await? {
        AgentResponse::Stat(stat) => Ok(stat),
        other => Err(unexpected(other)),
    }
}

/// `GET /v1/sandboxes/{id}/files/list?path=/d`: the entries, sorted by name.
#[utoipa::path(get, operation_id = "list_dir",
    path = "/v1/sandboxes/{id}/files/list",
    tag = "files",
    params(("id" = String, Path, description = "Sandbox id"), ("path" = String, Query, description = "Absolute path inside the sandbox")),
    responses((status = 200, description = "Entries sorted by name: name, file_type, size, mode, ...", body = Vec<Object>), ErrorAnswers))]
pub async fn list(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    query: Query,
) -> Result<Response, ApiError> {
    query.only(&["path"])?;
    let entries = list_dir(&s, &caller, &id, query.path("path")?).await?;
    Ok(Json(entries).into_response())
}

/// `GET /v1/sandboxes/{id}/files/stat?path=/x`: metadata (a final symlink is not followed).
#[utoipa::path(get, operation_id = "stat_file",
    path = "/v1/sandboxes/{id}/files/stat",
    tag = "files",
    params(("id" = String, Path, description = "Sandbox id"), ("path" = String, Query, description = "Absolute path inside the sandbox")),
    responses((status = 200, description = "Metadata: name, file_type, size, mode, ...", body = Object), ErrorAnswers))]
pub async fn stat(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    query: Query,
) -> Result<Response, ApiError> {
    query.only(&["path"])?;
    let stat = stat_path(&s, &caller, &id, query.path("path")?).await?;
    Ok(Json(stat).into_response())
}

/// Body of `files/mkdir`.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MkdirBody {
    path: String,
    #[serde(default)]
    parents: bool,
}

/// Body of `files/remove`.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RemoveBody {
    path: String,
    #[serde(default)]
    recursive: bool,
}

/// Body of `files/move`.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MoveBody {
    from: String,
    to: String,
}

/// Runs a request (with `data`) answered by `Done`, then records `kind`.
async fn change(
    s: &Shared,
    caller: &Caller,
    id: &str,
    request: Request,
    data: Vec<u8>,
    kind: &'static str,
    payload: serde_json::Value,
) -> Result<(), ApiError> {
    let (row, answer) = agent_call(s, caller, id, request, data).await?;
    match answer.header {
        AgentResponse::Done => record(s, caller, &row, kind, payload).await,
        other => Err(unexpected(other)),
    }
}

/// `POST /v1/sandboxes/{id}/files/mkdir` `{"path","parents"}`.
#[utoipa::path(post, operation_id = "make_dir",
    path = "/v1/sandboxes/{id}/files/mkdir",
    tag = "files",
    params(("id" = String, Path, description = "Sandbox id")),
    request_body = MkdirBody,
    responses((status = 204, description = "Created"), ErrorAnswers))]
pub async fn mkdir(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<MkdirBody>,
) -> Result<StatusCode, ApiError> {
    make_dir(&s, &caller, &id, body.path, body.parents).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Creates the directory `path` (and its parents with `parents`, like `mkdir -p`, then an
/// existing directory is no error) in the caller's sandbox `id`; records `file.mkdir`.
pub(crate) async fn make_dir(
    s: &Shared,
    caller: &Caller,
    id: &str,
    path: String,
    parents: bool,
) -> Result<(), ApiError> {
    check_path("path", &path)?;
    let payload = serde_json::json!({ "path": path, "parents": parents });
    let request = Request::Mkdir {
        path,
        parents,
        mode: None,
    };
    change(s, caller, id, request, Vec::new(), "file.mkdir", payload).await
}

/// `POST /v1/sandboxes/{id}/files/remove` `{"path","recursive"}`.
#[utoipa::path(post, operation_id = "remove_file",
    path = "/v1/sandboxes/{id}/files/remove",
    tag = "files",
    params(("id" = String, Path, description = "Sandbox id")),
    request_body = RemoveBody,
    responses((status = 204, description = "Removed"), ErrorAnswers))]
pub async fn remove(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<RemoveBody>,
) -> Result<StatusCode, ApiError> {
    remove_path(&s, &caller, &id, body.path, body.recursive).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Removes a file, a symlink or (with `recursive`) a directory tree at `path` in the caller's
/// sandbox `id`; records `file.remove`.
pub(crate) async fn remove_path(
    s: &Shared,
    caller: &Caller,
    id: &str,
    path: String,
    recursive: bool,
) -> Result<(), ApiError> {
    check_path("path", &path)?;
    let payload = serde_json::json!({ "path": path, "recursive": recursive });
    let request = Request::Remove { path, recursive };
    change(s, caller, id, request, Vec::new(), "file.remove", payload).await
}

/// `POST /v1/sandboxes/{id}/files/move` `{"from","to"}`.
#[utoipa::path(post, operation_id = "move_file",
    path = "/v1/sandboxes/{id}/files/move",
    tag = "files",
    params(("id" = String, Path, description = "Sandbox id")),
    request_body = MoveBody,
    responses((status = 204, description = "Moved"), ErrorAnswers))]
pub async fn rename(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<MoveBody>,
) -> Result<StatusCode, ApiError> {
    move_path(&s, &caller, &id, body.from, body.to).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Renames (moves) `from` to `to` in the caller's sandbox `id`; records `file.move`.
pub(crate) async fn move_path(
    s: &Shared,
    caller: &Caller,
    id: &str,
    from: String,
    to: String,
) -> Result<(), ApiError> {
    check_path("from", &from)?;
    check_path("to", &to)?;
    let payload = serde_json::json!({ "from": from, "to": to });
    let request = Request::Rename { from, to };
    change(s, caller, id, request, Vec::new(), "file.move", payload).await
}
