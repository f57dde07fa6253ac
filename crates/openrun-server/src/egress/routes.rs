//! `GET` and `PUT /v1/sandboxes/{id}/network`, and the network part of a create.
//!
//! A policy is checked whole before anything changes; a refused one is a 400
//! `invalid_network_policy` naming the problem. A `PUT` replaces the policy: it applies to the
//! next request through the proxy (an open tunnel stays open) and is recorded as a
//! `network.policy` event holding the policy without secret values.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::{Extension, Json};
use openrun_runtime::RuntimeError;
use rusqlite::Connection;

use super::policy::{Mode, Policy, PolicyBody, PolicyView};
use super::{sandbox_files, store};
use crate::api::{blocking, find, Caller, JsonBody, Shared};
use crate::db::NewEvent;
use crate::error::{ApiError, DbError};
use crate::openapi::ErrorAnswers;

/// Checks a policy given as JSON (the `network` field of a create, a `PUT` body).
pub(crate) fn parse(value: serde_json::Value) -> Result<Policy, ApiError> {
    let body: PolicyBody = serde_json::from_value(value)
        .map_err(|e| ApiError::InvalidNetworkPolicy(format!("invalid network policy: {e}")))?;
    Policy::compile(body)
        .map_err(|e| ApiError::InvalidNetworkPolicy(format!("invalid network policy: {e}")))
}

/// Connects (`open`) or disconnects the network namespace of sandbox `id` to the host's
/// network through the runtime (pasta). A failure is 400 when the runtime cannot do it here
/// (pasta missing or failing: the detail, pasta's own messages included, goes to the
/// server's log only), 409 when the sandbox is gone.
async fn set_open(s: &Shared, id: &str, open: bool) -> Result<(), ApiError> {
    let runtime = s.runtime.clone();
    let key = id.to_string();
    let result = blocking(move || {
        runtime
            .open_sandbox_exact(&key)
            .and_then(|sandbox| sandbox.set_open_network(open))
    })
    .await?;
    match result {
        Ok(()) => Ok(()),
        Err(RuntimeError::NoSuchSandbox(_)) => Err(ApiError::NotRunning(id.to_string())),
        Err(e @ RuntimeError::Network { .. }) => {
            tracing::warn!(id, open, error = %e, "cannot change a sandbox's network");
            Err(ApiError::InvalidNetworkPolicy(
                "the sandbox's network cannot be changed on this server (the detail is in the server's log)"
                    .into(),
            ))
        }
        Err(e) => Err(ApiError::internal("cannot change the sandbox's network", e)),
    }
}

/// The policy of a new sandbox: `none` unless the create body gives one. Mode `open` is a 403
/// `open_network_disabled` unless the server was started with `--allow-open-network`.
pub(crate) fn create_policy(
    s: &Shared,
    network: Option<serde_json::Value>,
) -> Result<Arc<Policy>, ApiError> {
    let policy = match network {
        None | Some(serde_json::Value::Null) => Policy::default(),
        Some(value) => parse(value)?,
    };
    s.egress.check_mode_allowed(&policy)?;
    Ok(Arc::new(policy))
}

/// Stores the policy of a new sandbox (in the create's own database call). Mode `none`
/// without secrets is the default and is not stored.
pub(crate) fn store_new(
    conn: &mut Connection,
    sandbox: &str,
    policy: &Policy,
) -> Result<(), DbError> {
    if policy.mode() == Mode::None && !policy.has_secrets() {
        return Ok(());
    }
    store::save(conn, sandbox, policy, None)
}

/// Readies a sandbox that was just created for its policy: its network opened in mode
/// `open`, the CA files when the policy wants them (see [`sandbox_files`]), and the policy in
/// the proxy's cache.
pub(crate) async fn prepare(
    s: &Shared,
    sandbox: &openrun_runtime::Sandbox,
    policy: &Arc<Policy>,
) -> Result<(), ApiError> {
    if policy.mode() == Mode::Open {
        set_open(s, sandbox.id(), true).await?;
    }
    if sandbox_files::wants_ca(policy) {
        let mut client = sandbox
            .connect()
            .await
            .map_err(|e| ApiError::internal("cannot reach the new sandbox's agent", e))?;
        sandbox_files::install_ca(&mut client, &s.egress.tls).await?;
    }
    s.egress.remember(sandbox.id(), policy.clone());
    Ok(())
}

/// `GET /v1/sandboxes/{id}/network`: the policy, without secret values.
#[utoipa::path(get, operation_id = "get_network_policy", path = "/v1/sandboxes/{id}/network", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id")),
    responses((status = 200, description = "The sandbox's network policy (secret values are never returned)", body = PolicyView), ErrorAnswers))]
pub(crate) async fn get(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<PolicyView>, ApiError> {
    let row = find(&s, &caller, &id).await?;
    let policy = s.egress.policy(&s, &row.id).await?;
    Ok(Json(policy.view()))
}

/// `PUT /v1/sandboxes/{id}/network`: replaces the policy; new connections follow it at once.
/// Mode `open` is a 403 `open_network_disabled` unless the server allows it
/// (`openrun serve --allow-open-network`).
#[utoipa::path(put, operation_id = "set_network_policy", path = "/v1/sandboxes/{id}/network", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id")),
    request_body = PolicyBody,
    responses((status = 200, description = "The new policy, without secret values", body = PolicyView), ErrorAnswers))]
pub(crate) async fn put(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(value): JsonBody<serde_json::Value>,
) -> Result<Json<PolicyView>, ApiError> {
    let row = find(&s, &caller, &id).await?;
    let policy = Arc::new(parse(value)?);
    s.egress.check_mode_allowed(&policy)?;
    // One change at a time, so the cache and the runtime end as the database does.
    let _turn = s.egress.update_turn(&row.id).await;
    let was_open = s.egress.policy(&s, &row.id).await?.mode() == Mode::Open;
    let opens = policy.mode() == Mode::Open;
    match row.state.as_str() {
        "running" => {
            if policy.has_secrets() {
                let (_sandbox, mut client) = crate::exec::open_running(&s, &row).await?;
                sandbox_files::install_ca(&mut client, &s.egress.tls).await?;
            }
        }
        // Frozen: the CA files are written when a later PUT finds it running; its network is
        // changed only while it runs.
        "paused" if opens == was_open => {}
        "paused" => return Err(ApiError::Paused(row.id)),
        _ => return Err(ApiError::NotRunning(row.id)),
    }
    if opens != was_open {
        set_open(&s, &row.id, opens).await?;
    }
    let view = policy.view();
    let event = NewEvent {
        sandbox_id: row.id.clone(),
        tenant: caller.tenant.clone(),
        actor: caller.actor.clone(),
        kind: "network.policy",
        payload: serde_json::to_value(&view)
            .map_err(|e| ApiError::internal("cannot encode the policy", e))?,
    };
    let (key, stored) = (row.id.clone(), policy.clone());
    let saved =
        s.db.call(move |c| store::save(c, &key, &stored, Some(&event)))
            .await;
    if let Err(e) = saved {
        if opens != was_open {
            // Back to the stored policy's network.
            let _ = set_open(&s, &row.id, was_open).await;
        }
        return Err(e.into());
    }
    s.egress.remember(&row.id, policy);
    tracing::info!(
        id = row.id,
        mode = view.mode.as_str(),
        "network policy changed"
    );
    Ok(Json(view))
}
