//! Changing a live sandbox: `POST /v1/sandboxes/{id}/ttl` (a new deadline), `.../pause` and
//! `.../resume` (the cgroup freezer). Each answers the sandbox resource after its event
//! (`sandbox.ttl`, `sandbox.pause`, `sandbox.resume`) is stored. The work is in the core
//! calls [`set_ttl`], [`pause_sandbox`] and [`resume_sandbox`], which the E2B surface calls
//! too; the handlers only translate.
//!
//! The deadline lives in three places, kept together here: the database (the TTL reaper's),
//! the runtime record (the backstop of `Runtime::list`, for a server that is down) and the
//! agent's own timer. A paused sandbox's agent is frozen and cannot keep time, so pausing first
//! clears the agent's timer and resuming sets it again from the database; meanwhile the reaper
//! destroys a paused sandbox at its deadline like any other.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::{Extension, Json};
use openrun_protocol::{Request, Response as AgentResponse};
use openrun_runtime::{AgentClient, RuntimeError, Sandbox};

use crate::api::{blocking, find, Caller, JsonBody, SandboxResource, Shared};
use crate::db::{self, NewEvent, SandboxRow};
use crate::error::ApiError;
use crate::exec::{mark_vanished, open_running};
use crate::openapi::ErrorAnswers;

/// How long an agent may take to answer a lifetime change.
const AGENT_WAIT: Duration = Duration::from_secs(5);

/// Body of `POST /v1/sandboxes/{id}/ttl`.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TtlBody {
    /// New lifetime from now, e.g. `30m`: the sandbox is destroyed this long after the call.
    ttl: String,
}

/// Changes of one sandbox run one at a time: a pause must not freeze the agent while a TTL
/// change waits for its answer.
static LOCKS: OnceLock<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>> = OnceLock::new();

/// Holds a sandbox's change lock; its map entry goes when nobody else wants it.
pub(crate) struct ChangeGuard {
    id: String,
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

impl Drop for ChangeGuard {
    fn drop(&mut self) {
        let mut locks = locks().lock().unwrap_or_else(|p| p.into_inner());
        // Two references: the map's and this guard's. More means someone is waiting.
        if locks
            .get(&self.id)
            .is_some_and(|l| Arc::strong_count(l) <= 2)
        {
            locks.remove(&self.id);
        }
    }
}

fn locks() -> &'static Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>> {
    LOCKS.get_or_init(Mutex::default)
}

/// Takes sandbox `id`'s change lock (held until the guard drops): changes of one sandbox run
/// one at a time.
pub(crate) async fn lock(id: &str) -> ChangeGuard {
    let lock = locks()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(id.to_string())
        .or_default()
        .clone();
    ChangeGuard {
        id: id.to_string(),
        _guard: lock.lock_owned().await,
    }
}

/// Takes the change lock of the caller's sandbox `id` once it is known to be the caller's
/// (404 otherwise, without touching the lock: another tenant's calls never wait on it nor
/// make its owner's wait). The caller reads the row again under the lock.
async fn lock_found(s: &Shared, caller: &Caller, id: &str) -> Result<ChangeGuard, ApiError> {
    let row = find(s, caller, id).await?;
    Ok(lock(&row.id).await)
}

/// Replaces the agent's lifetime (`None`: no deadline).
async fn set_lifetime(
    client: &mut AgentClient,
    remaining: Option<Duration>,
) -> Result<(), ApiError> {
    let request = Request::SetLifetime {
        remaining_ms: remaining.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
    };
    match tokio::time::timeout(AGENT_WAIT, client.call(request)).await {
        Ok(Ok(frame)) if frame.header == AgentResponse::Done => Ok(()),
        Ok(Ok(frame)) => Err(ApiError::internal(
            "cannot change the sandbox lifetime",
            format!("unexpected answer: {:?}", frame.header),
        )),
        Ok(Err(e)) => Err(ApiError::from_client(
            "cannot change the sandbox lifetime",
            e,
        )),
        Err(_) => Err(ApiError::internal(
            "cannot change the sandbox lifetime",
            format!("the agent did not answer within {AGENT_WAIT:?}"),
        )),
    }
}

/// The sandbox of a paused row (no agent connection: it is frozen; also used for a running
/// one the caller does not talk to); a vanished one is marked so and is a 409.
pub(crate) async fn open_paused(s: &Shared, row: &SandboxRow) -> Result<Sandbox, ApiError> {
    let runtime = s.runtime.clone();
    let key = row.id.clone();
    match blocking(move || runtime.open_sandbox_exact(&key)).await? {
        Ok(sandbox) => Ok(sandbox),
        Err(RuntimeError::NoSuchSandbox(_)) => {
            mark_vanished(s, &row.id, &row.tenant).await?;
            Err(ApiError::NotRunning(row.id.clone()))
        }
        Err(e) => Err(ApiError::internal("cannot open the sandbox", e)),
    }
}

/// The agent's remaining lifetime for a deadline (at least 1 ms: an expired sandbox ends now).
fn remaining(expires_at: Option<i64>) -> Option<Duration> {
    expires_at.map(|t| {
        let left = t.saturating_sub(crate::time::now_ms()).max(1);
        Duration::from_millis(u64::try_from(left).unwrap_or(1))
    })
}

/// Gives the agent of `row`'s running sandbox its lifetime from the recorded deadline (after
/// a resume: a paused sandbox's agent has none).
pub(crate) async fn restore_lifetime(s: &Shared, row: &SandboxRow) -> Result<(), ApiError> {
    let (_sandbox, mut client) = open_running(s, row).await?;
    set_lifetime(&mut client, remaining(row.expires_at)).await
}

/// An event of `caller` about `row`.
fn event(
    row: &SandboxRow,
    caller: &Caller,
    kind: &'static str,
    payload: serde_json::Value,
) -> NewEvent {
    NewEvent {
        sandbox_id: row.id.clone(),
        tenant: caller.tenant.clone(),
        actor: caller.actor.clone(),
        kind,
        payload,
    }
}

/// Where a state change stands once its sandbox is locked.
enum Change {
    /// Already in the wanted state: nothing to do (changes are idempotent).
    Done(SandboxRow),
    /// In the state the change starts from.
    Go(SandboxRow),
}

/// What a pause or resume did.
#[derive(Debug)]
pub(crate) struct Changed {
    /// The sandbox as stored after the call.
    pub row: SandboxRow,
    /// `false`: it was already in the wanted state, nothing was done.
    pub changed: bool,
}

/// Locks the caller's sandbox `id` for a change from state `from` to `to`; any other state
/// is a 409.
async fn begin(
    s: &Shared,
    caller: &Caller,
    id: &str,
    from: &str,
    to: &str,
) -> Result<(ChangeGuard, Change), ApiError> {
    let guard = lock_found(s, caller, id).await?;
    let row = find(s, caller, id).await?;
    let change = if row.state == to {
        Change::Done(row)
    } else if row.state == from {
        Change::Go(row)
    } else {
        return Err(ApiError::NotRunning(row.id));
    };
    Ok((guard, change))
}

/// Stores a state change made to `row`'s sandbox, with its event.
async fn finish(
    s: &Shared,
    caller: &Caller,
    row: &SandboxRow,
    from: &'static str,
    to: &'static str,
    kind: &'static str,
) -> Result<(), ApiError> {
    let event = event(row, caller, kind, serde_json::json!({}));
    let key = row.id.clone();
    s.db.call(move |c| db::set_state(c, &key, &[from], to, &event))
        .await?;
    Ok(())
}

/// The core of `POST /v1/sandboxes/{id}/ttl`: the caller's sandbox `id` is destroyed `ttl`
/// from now (sooner or later than before), running or paused. Records `sandbox.ttl`; returns
/// the sandbox as stored after.
pub(crate) async fn set_ttl(
    s: &Shared,
    caller: &Caller,
    id: &str,
    ttl: Duration,
) -> Result<SandboxRow, ApiError> {
    let _lock = lock_found(s, caller, id).await?;
    let row = find(s, caller, id).await?;
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    let expires_at = crate::time::now_ms().saturating_add(ttl_ms);
    let mut sandbox = match row.state.as_str() {
        "running" => {
            let (sandbox, mut client) = open_running(s, &row).await?;
            set_lifetime(&mut client, Some(ttl)).await?;
            sandbox
        }
        "paused" => open_paused(s, &row).await?,
        _ => return Err(ApiError::NotRunning(row.id)),
    };
    let runtime = s.runtime.clone();
    let deadline = u64::try_from(expires_at).ok();
    blocking(move || runtime.set_expiry(&mut sandbox, deadline))
        .await?
        .map_err(|e| ApiError::internal("cannot record the sandbox deadline", e))?;
    let event = event(
        &row,
        caller,
        "sandbox.ttl",
        serde_json::json!({
            "ttl_ms": ttl_ms,
            "expires_at": crate::time::rfc3339(expires_at),
        }),
    );
    let key = row.id.clone();
    s.db.call(move |c| db::set_expiry(c, &key, expires_at, &event))
        .await?;
    find(s, caller, id).await
}

/// `POST /v1/sandboxes/{id}/ttl`: the sandbox is destroyed `ttl` from now (sooner or later
/// than before), running or paused.
#[utoipa::path(post, operation_id = "set_sandbox_ttl", path = "/v1/sandboxes/{id}/ttl", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id")), request_body = TtlBody,
    responses((status = 200, description = "The sandbox with its new expires_at", body = SandboxResource), ErrorAnswers))]
pub async fn ttl(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<TtlBody>,
) -> Result<Json<SandboxResource>, ApiError> {
    let ttl = openrun_runtime::limits::parse_duration(&body.ttl)
        .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
    let row = set_ttl(&s, &caller, &id, ttl).await?;
    Ok(Json(SandboxResource::from_row(row)?))
}

/// The core of `POST /v1/sandboxes/{id}/pause`: freezes every process of the caller's
/// sandbox `id` (idempotent: `changed` is false when it was paused already). Records
/// `sandbox.pause`.
pub(crate) async fn pause_sandbox(
    s: &Shared,
    caller: &Caller,
    id: &str,
) -> Result<Changed, ApiError> {
    let (_lock, row) = match begin(s, caller, id, "running", "paused").await? {
        (_, Change::Done(row)) => {
            return Ok(Changed {
                row,
                changed: false,
            })
        }
        (lock, Change::Go(row)) => (lock, row),
    };
    // A frozen agent answers nothing: no exec may take an idle connection to it.
    s.conns.forget(&row.id);
    let (sandbox, mut client) = open_running(s, &row).await?;
    // A frozen agent cannot keep time: the reaper keeps the deadline while it is paused.
    set_lifetime(&mut client, None).await?;
    let (sandbox, frozen) = blocking(move || {
        let frozen = sandbox.pause();
        (sandbox, frozen)
    })
    .await?;
    if let Err(e) = frozen {
        let _ = blocking(move || sandbox.resume()).await;
        if let Err(restore) = set_lifetime(&mut client, remaining(row.expires_at)).await {
            tracing::warn!(id, error = %restore, "cannot restore the agent's lifetime");
        }
        return Err(ApiError::internal("cannot pause the sandbox", e));
    }
    drop(client);
    finish(s, caller, &row, "running", "paused", "sandbox.pause").await?;
    Ok(Changed {
        row: find(s, caller, id).await?,
        changed: true,
    })
}

/// `POST /v1/sandboxes/{id}/pause`: freezes every process of the sandbox (idempotent).
#[utoipa::path(post, operation_id = "pause_sandbox", path = "/v1/sandboxes/{id}/pause", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id")),
    responses((status = 200, description = "The sandbox, paused", body = SandboxResource), ErrorAnswers))]
pub async fn pause(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<SandboxResource>, ApiError> {
    let done = pause_sandbox(&s, &caller, &id).await?;
    Ok(Json(SandboxResource::from_row(done.row)?))
}

/// The core of `POST /v1/sandboxes/{id}/resume`: thaws the caller's paused sandbox `id`
/// (idempotent: `changed` is false when it was running already). Records `sandbox.resume`.
pub(crate) async fn resume_sandbox(
    s: &Shared,
    caller: &Caller,
    id: &str,
) -> Result<Changed, ApiError> {
    let (_lock, row) = match begin(s, caller, id, "paused", "running").await? {
        (_, Change::Done(row)) => {
            return Ok(Changed {
                row,
                changed: false,
            })
        }
        (lock, Change::Go(row)) => (lock, row),
    };
    let sandbox = open_paused(s, &row).await?;
    blocking(move || sandbox.resume())
        .await?
        .map_err(|e| ApiError::internal("cannot resume the sandbox", e))?;
    finish(s, caller, &row, "paused", "running", "sandbox.resume").await?;
    let row = find(s, caller, id).await?;
    // The agent keeps time again; should this fail, the reaper still holds the deadline.
    if let Err(e) = restore_lifetime(s, &row).await {
        tracing::warn!(id, error = %e, "cannot restore the agent's lifetime");
    }
    // Watchers of its background processes (a server started while it was paused has none).
    if let Err(e) = crate::maintenance::rearm(s, Some(id)).await {
        tracing::warn!(id, error = %e, "cannot watch the sandbox's background processes");
    }
    Ok(Changed { row, changed: true })
}

/// `POST /v1/sandboxes/{id}/resume`: thaws a paused sandbox (idempotent).
#[utoipa::path(post, operation_id = "resume_sandbox", path = "/v1/sandboxes/{id}/resume", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id")),
    responses((status = 200, description = "The sandbox, running", body = SandboxResource), ErrorAnswers))]
pub async fn resume(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<SandboxResource>, ApiError> {
    let done = resume_sandbox(&s, &caller, &id).await?;
    Ok(Json(SandboxResource::from_row(done.row)?))
}
