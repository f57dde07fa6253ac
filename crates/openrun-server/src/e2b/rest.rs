//! E2B's control plane (`X-API-KEY`, or `Authorization: Bearer`), over the same core calls
//! as `/v1`. Every error answer is `{"code": <status>, "message"}` ([`super::e2b_errors`]).
//!
//! | method and path | core call | answer |
//! |---|---|---|
//! | `POST /v2/sandboxes` (and the legacy `POST /sandboxes`) | `api::create_sandbox` in `admission::admitted` | 201 `Sandbox`; 429 beyond the create slots and queue |
//! | `GET /v2/sandboxes?metadata=&state=&template=&startedAfter=&order=&limit=&nextToken=` (legacy `GET /sandboxes`) | `api::list_sandboxes` | 200 `[ListedSandbox]`, `x-next-token` |
//! | `GET /sandboxes/{id}` | `api::find` | 200 `SandboxDetail` |
//! | `DELETE /sandboxes/{id}` | `api::remove` | 204 |
//! | `POST /sandboxes/{id}/timeout` `{"timeout"}` | `lifecycle::set_ttl` | 204 |
//! | `POST /sandboxes/{id}/pause` `{"memory"?, "requireHealthyGuest"?}` | `lifecycle::pause_sandbox` | 204; 409 already paused; 400 `memory: false` |
//! | `POST /v2/sandboxes/{id}/connect` (and `/sandboxes/{id}/connect`) `{"timeout"?}` | `lifecycle::resume_sandbox`, `set_ttl` | 200 running, 201 resumed |
//! | `POST /sandboxes/{id}/resume` (legacy) `{"timeout"?}` | the same | 201; 409 not paused |
//! | `POST /sandboxes/{id}/fork` `{"timeout"?,"count"?}` | `images::fork_sandbox` | 201 `[{"sandbox"}]` |
//! | `POST /sandboxes/{id}/snapshots` `{"name"?}` | `images::take_snapshot` | 201 `{"snapshotID","names"}` |
//! | `PUT /sandboxes/{id}/network` `{allowOut, denyOut, allow_internet_access}` | `egress::routes::put` | 204 |
//! | metrics, logs, refreshes, `GET /snapshots` | none | 501 naming what to use instead |
//!
//! Templates: `base` and `code-interpreter-v1` run the image `host`; any other template is
//! the openrun image of that name (404 when there is none). The template is kept in the
//! label `e2b.template`; `metadata` is the other labels.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use base64::Engine;
use openrun_runtime::Limits;
use serde_json::Value;

use crate::api::{authenticate, find, Caller, CreateBody, JsonBody, Shared};
use crate::db::{self, SandboxRow};
use crate::error::ApiError;
use crate::query::Query;

/// Label keeping the E2B template a sandbox was created from.
const TEMPLATE_LABEL: &str = "e2b.template";
/// The templates that run the image `host`.
const HOST_TEMPLATES: [&str; 2] = ["base", "code-interpreter-v1"];
/// `timeout` when a create does not give one (the SDK's default too), in seconds.
const DEFAULT_TIMEOUT_SECS: u64 = 300;
/// Largest `timeout`, in seconds: the longest lifetime the runtime takes (876000 h).
const MAX_TIMEOUT_SECS: u64 = 876_000 * 3600;
/// `clientID` of every sandbox (E2B's names the machine; there is one here).
const CLIENT_ID: &str = "openrun";
/// Page size of a list that names none.
const DEFAULT_LIMIT: u64 = 100;
/// Largest page of a list.
const MAX_LIMIT: u64 = 1000;

/// The control-plane routes, behind the API key.
pub(super) fn routes(state: Shared) -> Router<Shared> {
    Router::new()
        .route("/v2/sandboxes", post(create).get(list))
        .route("/sandboxes", post(create).get(list))
        .route("/sandboxes/{id}", get(detail).delete(kill))
        .route("/sandboxes/{id}/timeout", post(set_timeout))
        .route("/sandboxes/{id}/pause", post(pause))
        .route("/sandboxes/{id}/resume", post(resume))
        .route("/sandboxes/{id}/connect", post(connect))
        .route("/v2/sandboxes/{id}/connect", post(connect))
        .route("/sandboxes/{id}/fork", post(fork))
        .route("/sandboxes/{id}/snapshots", post(snapshot))
        .route("/sandboxes/metrics", get(not_implemented))
        .route("/sandboxes/{id}/metrics", get(not_implemented))
        .route("/sandboxes/{id}/logs", get(not_implemented))
        .route("/v2/sandboxes/{id}/logs", get(not_implemented))
        .route("/sandboxes/{id}/network", put(update_network))
        .route("/sandboxes/{id}/refreshes", post(not_implemented))
        .route("/snapshots", get(not_implemented))
        .route_layer(middleware::from_fn_with_state(state, auth))
        .route_layer(middleware::from_fn(super::e2b_errors))
}

/// Checks `X-API-KEY: <key>` (or `Authorization: Bearer <key>`).
async fn auth(State(s): State<Shared>, mut req: Request, next: Next) -> Result<Response, ApiError> {
    let headers = req.headers();
    let key = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .or_else(|| {
            headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
        })
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .ok_or_else(|| {
            ApiError::Unauthorized(
                "an API key is required: send X-API-KEY: <key> (E2B_API_KEY; make one with \
                 openrun key create)"
                    .into(),
            )
        })?;
    let caller = authenticate(&s, key).await?;
    req.extensions_mut().insert(caller);
    Ok(next.run(req).await)
}

/// Body of `POST /v2/sandboxes` (E2B's `NewSandboxV2`).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NewSandbox {
    #[serde(rename = "templateID")]
    template_id: Option<String>,
    timeout: Option<Value>,
    metadata: Option<BTreeMap<String, String>>,
    #[serde(rename = "envVars")]
    env_vars: Option<BTreeMap<String, String>>,
    #[serde(rename = "autoPause")]
    auto_pause: Option<bool>,
    #[serde(rename = "autoPauseMemory")]
    auto_pause_memory: Option<bool>,
    #[serde(rename = "autoResume")]
    auto_resume: Option<Value>,
    /// Legacy `POST /sandboxes`: every sandbox is secured here (`true`); `false` is refused.
    secure: Option<bool>,
    allow_internet_access: Option<bool>,
    network: Option<Value>,
    mcp: Option<Value>,
    iam: Option<Value>,
    #[serde(rename = "volumeMounts")]
    volume_mounts: Option<Value>,
}

/// A sandbox as create and connect answer (E2B's `Sandbox`).
#[derive(Debug, serde::Serialize)]
struct CreatedSandbox {
    #[serde(rename = "templateID")]
    template_id: String,
    #[serde(rename = "sandboxID")]
    sandbox_id: String,
    #[serde(rename = "clientID")]
    client_id: &'static str,
    #[serde(rename = "envdVersion")]
    envd_version: &'static str,
    #[serde(rename = "envdAccessToken")]
    envd_access_token: String,
    #[serde(rename = "trafficAccessToken")]
    traffic_access_token: String,
    /// The preview domain, if any: the SDK then reaches ports at `<port>-<id>.<domain>`.
    domain: Option<String>,
}

impl CreatedSandbox {
    fn new(s: &Shared, row: &SandboxRow) -> Self {
        Self {
            template_id: template_of(row),
            sandbox_id: row.id.clone(),
            client_id: CLIENT_ID,
            envd_version: super::ENVD_VERSION,
            envd_access_token: super::envd_access_token(s, &row.id),
            traffic_access_token: super::traffic_access_token(s, &row.id),
            domain: s.previews.domain().map(str::to_string),
        }
    }
}

/// The E2B template of a sandbox: the one it was created from, else its image.
fn template_of(row: &SandboxRow) -> String {
    row.labels
        .get(TEMPLATE_LABEL)
        .cloned()
        .unwrap_or_else(|| row.image.clone())
}

/// The E2B state of a sandbox, if E2B would show it (`running` or `paused`). One still
/// being created is not shown: it does not run yet, and its create answers its id.
fn e2b_state(row: &SandboxRow) -> Option<&'static str> {
    match row.state.as_str() {
        "running" => Some("running"),
        "paused" => Some("paused"),
        _ => None,
    }
}

/// The caller's sandbox `id` if E2B would call it alive (running or paused): a stopped one
/// is gone, like an unknown one (404).
async fn find_alive(s: &Shared, caller: &Caller, id: &str) -> Result<SandboxRow, ApiError> {
    let row = find(s, caller, id).await?;
    if e2b_state(&row).is_none() {
        return Err(ApiError::NotFound(format!(
            "sandbox {id} not found: it is {}",
            row.state
        )));
    }
    Ok(row)
}

/// A `timeout` in seconds (`name` is the field, for the message): a whole number from 1 to
/// [`MAX_TIMEOUT_SECS`].
fn timeout_secs(name: &str, value: &Value) -> Result<u64, ApiError> {
    match value.as_u64() {
        Some(n) if (1..=MAX_TIMEOUT_SECS).contains(&n) => Ok(n),
        _ => Err(ApiError::InvalidArgument(format!(
            "invalid {name} {value}: expected a whole number of seconds from 1 to \
             {MAX_TIMEOUT_SECS}"
        ))),
    }
}

/// The openrun image of an E2B template.
fn image_of(template: &str) -> &str {
    if HOST_TEMPLATES.contains(&template) {
        "host"
    } else {
        template
    }
}

/// A create field openrun does not implement, refused by name (never silently ignored).
fn unsupported(field: &str, why: &str) -> ApiError {
    ApiError::InvalidArgument(format!("{field} is not supported by openrun: {why}"))
}

/// The network policy (`/v1` shape) of E2B's `allow_internet_access` and `network`.
///
/// openrun's policies are allowlists and its default is no network, so: nothing given means
/// mode `none`; `allow_internet_access: true` means mode `open` (refused unless the server
/// runs with `--allow-open-network`); `network.allowOut` lists what an `allowlist` reaches;
/// `network.denyOut` may only deny everything (`0.0.0.0/0`), which `allowOut` then opens.
fn network_policy(
    internet: Option<bool>,
    network: Option<&Value>,
) -> Result<Option<Value>, ApiError> {
    let mut allow: Vec<String> = Vec::new();
    let mut deny_all = false;
    if let Some(network) = network.filter(|n| !n.is_null()) {
        let Some(fields) = network.as_object() else {
            return Err(ApiError::InvalidArgument(
                "network must be an object".into(),
            ));
        };
        for (key, value) in fields {
            let strings = || -> Result<Vec<String>, ApiError> {
                serde_json::from_value::<Option<Vec<String>>>(value.clone())
                    .map(Option::unwrap_or_default)
                    .map_err(|_| {
                        ApiError::InvalidArgument(format!(
                            "network.{key} must be a list of strings"
                        ))
                    })
            };
            match key.as_str() {
                "allowOut" => allow = strings()?,
                "denyOut" => {
                    for entry in strings()? {
                        if entry == "0.0.0.0/0" || entry == "::/0" {
                            deny_all = true;
                        } else {
                            return Err(unsupported(
                                "network.denyOut",
                                &format!(
                                    "it cannot deny single destinations ({entry:?}): openrun's \
                                     network policies are allowlists. Deny everything \
                                     (\"0.0.0.0/0\") and list what may be reached in allowOut"
                                ),
                            ));
                        }
                    }
                }
                "allowPublicTraffic" => {
                    if value.as_bool() == Some(true) {
                        return Err(unsupported(
                            "network.allowPublicTraffic=true",
                            "a sandbox's ports are reached only with a preview token \
                             (POST /v1/sandboxes/{id}/ports/{port}/preview)",
                        ));
                    }
                }
                other => {
                    return Err(unsupported(
                        &format!("network.{other}"),
                        "only allowOut and denyOut (\"0.0.0.0/0\") map to its network policies",
                    ))
                }
            }
        }
    }
    if internet == Some(true) && !deny_all {
        return Ok(Some(serde_json::json!({ "mode": "open" })));
    }
    if allow.is_empty() {
        return Ok(None);
    }
    Ok(Some(
        serde_json::json!({ "mode": "allowlist", "allow": allow }),
    ))
}

/// Refuses what a create asks for that openrun does not do.
fn check_unsupported(body: &NewSandbox) -> Result<(), ApiError> {
    if body.auto_pause == Some(true) {
        return Err(unsupported(
            "autoPause (lifecycle on_timeout \"pause\")",
            "a sandbox is destroyed when its timeout expires; pause it yourself with \
             Sandbox.pause() and resume it with Sandbox.connect()",
        ));
    }
    if body.auto_pause_memory == Some(true) {
        return Err(unsupported("autoPauseMemory", "there is no auto-pause"));
    }
    if let Some(resume) = body.auto_resume.as_ref().filter(|v| !v.is_null()) {
        let enabled = resume.get("enabled").and_then(Value::as_bool);
        if enabled != Some(false) {
            return Err(unsupported(
                "autoResume",
                "traffic to a paused sandbox does not resume it; resume with Sandbox.connect()",
            ));
        }
    }
    if body.mcp.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(unsupported(
            "mcp (the MCP gateway)",
            "openrun serves MCP itself (openrun mcp, /mcp)",
        ));
    }
    if body
        .iam
        .as_ref()
        .is_some_and(|v| !v.is_null() && v.as_object().is_none_or(|o| !o.is_empty()))
    {
        return Err(unsupported(
            "iam (workload identity)",
            "use network secrets instead (PUT /v1/sandboxes/{id}/network)",
        ));
    }
    if body
        .volume_mounts
        .as_ref()
        .is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
    {
        return Err(unsupported("volumeMounts", "there are no volumes"));
    }
    if body.secure == Some(false) {
        return Err(unsupported(
            "secure=false (envd without an access token)",
            "every sandbox's envd wants its access token (envdAccessToken, X-Access-Token)",
        ));
    }
    Ok(())
}

/// `POST /v2/sandboxes`: creates a sandbox from a template; answers (201) once its agent
/// answers.
async fn create(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    JsonBody(body): JsonBody<NewSandbox>,
) -> Result<Response, ApiError> {
    let template = body
        .template_id
        .clone()
        .filter(|t| !t.trim().is_empty())
        .ok_or_else(|| ApiError::InvalidArgument("templateID is required".into()))?;
    check_unsupported(&body)?;
    let timeout = match &body.timeout {
        None | Some(Value::Null) => DEFAULT_TIMEOUT_SECS,
        Some(value) => timeout_secs("timeout", value)?,
    };
    let mut labels = body.metadata.clone().unwrap_or_default();
    if labels.contains_key(TEMPLATE_LABEL) {
        return Err(ApiError::InvalidArgument(format!(
            "invalid metadata: the key {TEMPLATE_LABEL:?} is reserved (it keeps the template)"
        )));
    }
    crate::api::check_labels(&labels)
        .map_err(|e| ApiError::InvalidArgument(format!("invalid metadata: {e}")))?;
    labels.insert(TEMPLATE_LABEL.into(), template.clone());
    let network = network_policy(body.allow_internet_access, body.network.as_ref())?;
    let image = image_of(&template).to_string();
    check_template(&s, &caller, &template, &image).await?;
    let create = CreateBody {
        image: Some(image),
        ttl: Some(format!("{timeout}s")),
        env: body.env_vars.clone().unwrap_or_default(),
        labels,
        network,
        ..CreateBody::default()
    };
    // Under admission control like every create (the create slots and their queue, 429
    // beyond, timed for the metrics), in its own task: a client that leaves mid-create
    // leaves a running sandbox (ended by its timeout), never one stuck `creating`.
    let (shared, owner) = (s.clone(), caller.clone());
    let made = async move { crate::api::create_sandbox(&shared, &owner, create).await };
    let resource = crate::admission::admitted(&s, made, Result::is_ok).await??;
    let row = find(&s, &caller, resource.id()).await?;
    Ok((StatusCode::CREATED, Json(CreatedSandbox::new(&s, &row))).into_response())
}

/// 404 for a template that names no image the caller may use (what E2B answers for an
/// unknown template): its own snapshots and the server-wide images; another tenant's image
/// is as missing as one nobody has ([`crate::images::resolve`]).
async fn check_template(
    s: &Shared,
    caller: &Caller,
    template: &str,
    image: &str,
) -> Result<(), ApiError> {
    match crate::images::resolve(s, caller, image).await? {
        Ok(_) => Ok(()),
        Err(openrun_image::ImageError::NotFound(_)) => Err(ApiError::NotFound(format!(
            "template {template:?} not found: there is no openrun image of that name (see \
             `openrun image ls`); the templates base and code-interpreter-v1 run the image host"
        ))),
        // Anything else (a malformed name...) is reported by the create itself.
        Err(_) => Ok(()),
    }
}

/// A listed sandbox (E2B's `ListedSandbox`; `SandboxDetail` adds to it).
fn listed(s: &Shared, row: &SandboxRow) -> Result<serde_json::Map<String, Value>, ApiError> {
    let limits: Limits = serde_json::from_str(&row.limits_json)
        .map_err(|e| ApiError::internal("a stored sandbox record is corrupt", e))?;
    let mib = |bytes: u64| bytes / (1 << 20);
    let cpus = limits
        .cpu_millis
        .map(|m| m.div_ceil(1000).max(1))
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u64));
    let memory = limits.memory_bytes.unwrap_or_else(host_memory_bytes);
    let disk = limits.disk_bytes.unwrap_or_else(|| host_disk_bytes(s));
    let metadata: BTreeMap<&String, &String> = row
        .labels
        .iter()
        .filter(|(k, _)| k.as_str() != TEMPLATE_LABEL)
        .collect();
    let end = row.expires_at.unwrap_or(i64::MAX / 4);
    let value = serde_json::json!({
        "templateID": template_of(row),
        "alias": template_of(row),
        "sandboxID": row.id,
        "clientID": CLIENT_ID,
        "startedAt": crate::time::rfc3339(row.created_at),
        "endAt": crate::time::rfc3339(end),
        "envdVersion": super::ENVD_VERSION,
        "cpuCount": cpus,
        "memoryMB": mib(memory),
        "diskSizeMB": mib(disk),
        "state": e2b_state(row).unwrap_or("running"),
        "metadata": metadata,
    });
    match value {
        Value::Object(map) => Ok(map),
        _ => Err(ApiError::internal(
            "cannot encode a sandbox",
            "not an object",
        )),
    }
}

/// The host's memory (the limit of a sandbox that has none).
fn host_memory_bytes() -> u64 {
    let info = rustix::system::sysinfo();
    u64::from(info.mem_unit).saturating_mul(info.totalram as u64)
}

/// The size of the file system of the data dir (the disk of a sandbox without a quota).
fn host_disk_bytes(s: &Shared) -> u64 {
    rustix::fs::statvfs(s.runtime.data_dir())
        .map(|v| v.f_blocks.saturating_mul(v.f_frsize))
        .unwrap_or(0)
}

/// `GET /sandboxes/{id}`: E2B's `SandboxDetail`.
async fn detail(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let row = find_alive(&s, &caller, &id).await?;
    let mut detail = listed(&s, &row)?;
    detail.insert(
        "envdAccessToken".into(),
        super::envd_access_token(&s, &row.id).into(),
    );
    detail.insert(
        "domain".into(),
        s.previews.domain().map_or(Value::Null, |d| d.into()),
    );
    // The network policy in E2B's terms (the inverse of `network_policy`).
    let view = s.egress.policy(&s, &row.id).await?.view();
    let (internet, network) = match view.mode {
        crate::egress::policy::Mode::Open => (true, serde_json::json!({})),
        crate::egress::policy::Mode::Allowlist => (
            false,
            serde_json::json!({ "denyOut": ["0.0.0.0/0"], "allowOut": view.allow }),
        ),
        crate::egress::policy::Mode::None => {
            (false, serde_json::json!({ "denyOut": ["0.0.0.0/0"] }))
        }
    };
    detail.insert("allowInternetAccess".into(), internet.into());
    detail.insert("network".into(), network);
    Ok(Json(Value::Object(detail)))
}

/// `DELETE /sandboxes/{id}`: 204; 404 when it is not alive (the SDK's `kill()` is then
/// `False`). A stopped one (its timeout expired) is deleted all the same, so that it leaves
/// `GET /v1/sandboxes` too, but answers 404 like E2B.
async fn kill(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let row = find(&s, &caller, &id).await?;
    // One being created is killed too (its create then fails).
    let alive = e2b_state(&row).is_some() || row.state == "creating";
    let state = row.state.clone();
    crate::api::remove(&s, &caller, row).await?;
    if !alive {
        return Err(ApiError::NotFound(format!(
            "sandbox {id} not found: it was {state}"
        )));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Body of `POST /sandboxes/{id}/timeout`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TimeoutBody {
    timeout: Option<Value>,
}

/// `POST /sandboxes/{id}/timeout` `{"timeout": seconds}`: the sandbox ends that long from now.
async fn set_timeout(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<TimeoutBody>,
) -> Result<StatusCode, ApiError> {
    let value = body
        .timeout
        .ok_or_else(|| ApiError::InvalidArgument("timeout is required".into()))?;
    let secs = timeout_secs("timeout", &value)?;
    find_alive(&s, &caller, &id).await?;
    crate::lifecycle::set_ttl(&s, &caller, &id, Duration::from_secs(secs)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Body of `POST /sandboxes/{id}/pause` (E2B's `SandboxPauseRequest`; may be empty).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PauseBody {
    /// Keep the memory (absent or `true`: a paused sandbox's processes are frozen, as they
    /// are here); `false`, a filesystem-only pause that resumes by rebooting, is refused.
    memory: Option<bool>,
    /// Whether the pause is refused while the sandbox's agent does not answer: it always is
    /// here (the pause needs the agent, and the sandbox keeps running), so both values are
    /// accepted.
    #[serde(rename = "requireHealthyGuest")]
    require_healthy_guest: Option<bool>,
}

/// `POST /sandboxes/{id}/pause` `{"memory"?, "requireHealthyGuest"?}`: 204; 409 when it is
/// paused already.
async fn pause(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<PauseBody>,
) -> Result<Response, ApiError> {
    if body.memory == Some(false) {
        return Err(unsupported(
            "a filesystem-only pause (memory: false, mode \"filesystem\")",
            "a paused sandbox keeps its memory (its processes are frozen) and resumes as it was; \
             pause without it",
        ));
    }
    let _ = body.require_healthy_guest;
    find_alive(&s, &caller, &id).await?;
    let done = crate::lifecycle::pause_sandbox(&s, &caller, &id).await?;
    if !done.changed {
        return Ok(super::error(
            StatusCode::CONFLICT,
            format!("sandbox {id} is already paused"),
        ));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Body of connect and resume.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ConnectBody {
    timeout: Option<Value>,
    /// Restore memory (absent or `true`) or reboot from disk (`false`): a paused sandbox
    /// here keeps its memory (its processes are frozen), so rebooting one is refused.
    memory: Option<bool>,
    /// Legacy resume: auto-pause is not supported.
    #[serde(rename = "autoPause")]
    auto_pause: Option<bool>,
}

/// Resumes the caller's sandbox `id` if paused and applies a connect's `timeout` (for a
/// sandbox that was running, only when it ends later than before, like E2B). Returns it and
/// whether it was resumed.
async fn connect_core(
    s: &Shared,
    caller: &Caller,
    id: &str,
    body: ConnectBody,
) -> Result<(SandboxRow, bool), ApiError> {
    let timeout = match &body.timeout {
        None | Some(Value::Null) => None,
        Some(value) => Some(timeout_secs("timeout", value)?),
    };
    if body.auto_pause == Some(true) {
        return Err(unsupported("autoPause", "there is no auto-pause"));
    }
    let row = find_alive(s, caller, id).await?;
    if body.memory == Some(false) && row.state == "paused" {
        return Err(unsupported(
            "on_resume=\"reboot\" (memory: false)",
            "a paused sandbox keeps its memory and resumes as it was; connect without it",
        ));
    }
    let done = crate::lifecycle::resume_sandbox(s, caller, id).await?;
    let mut row = done.row;
    if let Some(secs) = timeout {
        let wanted =
            crate::time::now_ms().saturating_add(i64::try_from(secs * 1000).unwrap_or(i64::MAX));
        if done.changed || row.expires_at.is_none_or(|t| t < wanted) {
            row = crate::lifecycle::set_ttl(s, caller, id, Duration::from_secs(secs)).await?;
        }
    }
    Ok((row, done.changed))
}

/// `POST /v2/sandboxes/{id}/connect` `{"timeout"?}`: 200 for a running sandbox, 201 after
/// resuming a paused one; the body is create's.
async fn connect(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<ConnectBody>,
) -> Result<Response, ApiError> {
    let (row, resumed) = connect_core(&s, &caller, &id, body).await?;
    let status = if resumed {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(CreatedSandbox::new(&s, &row))).into_response())
}

/// Legacy `POST /sandboxes/{id}/resume`: 201 after resuming; 409 when it was not paused.
async fn resume(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<ConnectBody>,
) -> Result<Response, ApiError> {
    let row = find_alive(&s, &caller, &id).await?;
    if row.state != "paused" {
        return Ok(super::error(
            StatusCode::CONFLICT,
            format!("sandbox {id} is not paused"),
        ));
    }
    let (row, _) = connect_core(&s, &caller, &id, body).await?;
    Ok((StatusCode::CREATED, Json(CreatedSandbox::new(&s, &row))).into_response())
}

/// E2B endpoints the SDK has that openrun does not implement: 501 naming what to use.
async fn not_implemented(uri: axum::http::Uri) -> Response {
    let path = uri.path();
    let instead = if path.ends_with("/metrics") {
        "read the sandbox's limits with Sandbox.get_info() or GET /v1/sandboxes/{id}/environment"
    } else if path.ends_with("/logs") {
        "read the sandbox's timeline with GET /v1/sandboxes/{id}/events"
    } else if path.starts_with("/snapshots") {
        "snapshots are openrun images: openrun image ls"
    } else {
        "give a timeout with Sandbox.set_timeout() instead"
    };
    super::error(
        StatusCode::NOT_IMPLEMENTED,
        format!("{path} is not implemented by openrun: {instead}"),
    )
}

/// `PUT /sandboxes/{id}/network` (`update_network`): replaces the sandbox's network policy
/// with the one E2B's `allowOut`, `denyOut` and `allow_internet_access` map to (as on create:
/// [`network_policy`]); 204.
async fn update_network(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<Value>,
) -> Result<StatusCode, ApiError> {
    let Value::Object(mut fields) = body else {
        return Err(ApiError::InvalidArgument(
            "the body must be an object".into(),
        ));
    };
    let internet = match fields.remove("allow_internet_access") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(b)) => Some(b),
        Some(_) => {
            return Err(ApiError::InvalidArgument(
                "allow_internet_access must be true or false".into(),
            ))
        }
    };
    let policy = network_policy(internet, Some(&Value::Object(fields)))?
        .unwrap_or_else(|| serde_json::json!({ "mode": "none" }));
    find_alive(&s, &caller, &id).await?;
    // The /v1 handler is the core of a policy change; its answer (the new policy) is not E2B's.
    let _view =
        crate::egress::routes::put(State(s), Extension(caller), Path(id), JsonBody(policy)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Body of `POST /sandboxes/{id}/fork`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ForkBody {
    timeout: Option<Value>,
    count: Option<Value>,
}

/// `POST /sandboxes/{id}/fork` `{"timeout"?, "count"?}`: `count` (default 1) new sandboxes
/// from a snapshot of this one's files (its processes are not carried over), with its
/// metadata, environment and limits; 201 `[{"sandbox": ...}]`. All or none are made.
async fn fork(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<ForkBody>,
) -> Result<Response, ApiError> {
    let timeout = match &body.timeout {
        None | Some(Value::Null) => DEFAULT_TIMEOUT_SECS,
        Some(value) => timeout_secs("timeout", value)?,
    };
    let count = match body.count {
        None | Some(Value::Null) => Value::from(1),
        Some(count) => count,
    };
    let parent = find_alive(&s, &caller, &id).await?;
    let mut options = serde_json::Map::new();
    options.insert("count".into(), count);
    options.insert("ttl".into(), format!("{timeout}s").into());
    options.insert("labels".into(), serde_json::json!(parent.labels));
    let made = crate::images::fork_sandbox(&s, &caller, &id, options).await?;
    let mut answer = Vec::with_capacity(made.len());
    for resource in made {
        let row = find(&s, &caller, resource.id()).await?;
        answer.push(serde_json::json!({ "sandbox": CreatedSandbox::new(&s, &row) }));
    }
    Ok((StatusCode::CREATED, Json(answer)).into_response())
}

/// Body of `POST /sandboxes/{id}/snapshots`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotBody {
    name: Option<String>,
    /// E2B's memory snapshots (`true`): refused, openrun snapshots files only.
    memory: Option<bool>,
}

/// `POST /sandboxes/{id}/snapshots` `{"name"?}`: snapshots the sandbox's files into an openrun
/// image; its name is the `snapshotID`, a template `Sandbox.create` takes.
async fn snapshot(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<SnapshotBody>,
) -> Result<Response, ApiError> {
    if body.memory == Some(true) {
        return Err(unsupported(
            "a memory snapshot (mode \"full\")",
            "openrun snapshots a sandbox's files (mode \"filesystem\"); its processes are \
             not kept",
        ));
    }
    find_alive(&s, &caller, &id).await?;
    let (_, snap) = crate::images::take_snapshot(&s, &caller, &id, body.name).await?;
    let answer = serde_json::json!({ "snapshotID": snap.image, "names": [snap.image] });
    Ok((StatusCode::CREATED, Json(answer)).into_response())
}

/// What `GET /v2/sandboxes` asks for.
#[derive(Debug, Default, PartialEq)]
struct ListQuery {
    metadata: Vec<(String, String)>,
    states: Vec<&'static str>,
    template: Option<String>,
    started_after: Option<i64>,
    descending: bool,
    limit: usize,
    after: Option<(i64, String)>,
}

/// Percent-decodes one component of the `metadata` filter (`+` is a space).
fn decode_component(text: &str) -> Result<String, ApiError> {
    percent_encoding::percent_decode_str(&text.replace('+', " "))
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| {
            ApiError::InvalidArgument(format!("metadata {text:?} is not UTF-8 once decoded"))
        })
}

/// Parses the query of a list (the metadata filter is itself URL-encoded `k=v&k2=v2`, and the
/// SDK percent-encodes keys and values once more before that).
fn list_query(query: &str) -> Result<ListQuery, ApiError> {
    let query = Query::parse(query)?;
    query.only(&[
        "metadata",
        "state",
        "template",
        "startedAfter",
        "order",
        "limit",
        "nextToken",
    ])?;
    let mut out = ListQuery {
        limit: DEFAULT_LIMIT as usize,
        ..ListQuery::default()
    };
    if let Some(metadata) = query.string("metadata") {
        for pair in metadata.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').ok_or_else(|| {
                ApiError::InvalidArgument(format!("metadata filter {pair:?} must be KEY=VALUE"))
            })?;
            let key = decode_component(&decode_component(k)?)?;
            let value = decode_component(&decode_component(v)?)?;
            out.metadata.push((key, value));
        }
    }
    match query.string("state") {
        None => out.states = vec!["running", "paused"],
        Some(states) => {
            for state in states.split(',').map(str::trim) {
                match state {
                    "running" => out.states.push("running"),
                    "paused" => out.states.push("paused"),
                    other => {
                        return Err(ApiError::InvalidArgument(format!(
                            "invalid state {other:?}: expected running or paused"
                        )))
                    }
                }
            }
        }
    }
    out.template = query.string("template");
    if let Some(text) = query.string("startedAfter") {
        let at = time::OffsetDateTime::parse(&text, &time::format_description::well_known::Rfc3339)
            .map_err(|e| {
                ApiError::InvalidArgument(format!(
                    "invalid startedAfter {text:?}: expected an RFC 3339 time ({e})"
                ))
            })?;
        out.started_after =
            Some(i64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX));
    }
    out.descending = match query.string("order").as_deref() {
        None | Some("asc") => false,
        Some("desc") => true,
        Some(other) => {
            return Err(ApiError::InvalidArgument(format!(
                "invalid order {other:?}: expected asc or desc"
            )))
        }
    };
    if let Some(limit) = query.u64("limit")? {
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(ApiError::InvalidArgument(format!(
                "invalid limit {limit}: expected 1 to {MAX_LIMIT}"
            )));
        }
        out.limit = limit as usize;
    }
    if let Some(token) = query.string("nextToken") {
        out.after = Some(parse_token(&token)?);
    }
    Ok(out)
}

/// The token of the position after `row` (`x-next-token`).
fn token_after(row: &SandboxRow) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(format!("{}:{}", row.created_at, row.id))
}

/// Decodes a token made by [`token_after`].
fn parse_token(token: &str) -> Result<(i64, String), ApiError> {
    let bad = || {
        ApiError::InvalidArgument(format!(
            "invalid nextToken {token:?}: pass the x-next-token header of the previous page"
        ))
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let (at, id) = text.split_once(':').ok_or_else(bad)?;
    Ok((at.parse().map_err(|_| bad())?, id.to_string()))
}

/// `GET /v2/sandboxes`: the caller's running and paused sandboxes, filtered, ordered by start
/// time and paged (`x-next-token`).
async fn list(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    uri: axum::http::Uri,
) -> Result<Response, ApiError> {
    let q = list_query(uri.query().unwrap_or(""))?;
    let filter = db::ListFilter {
        labels: q.metadata.clone(),
        state: None,
        after: None,
        limit: u32::MAX,
    };
    let mut rows = crate::api::list_sandboxes(&s, &caller, filter).await?;
    rows.retain(|row| {
        e2b_state(row).is_some_and(|state| q.states.contains(&state))
            && q.template.as_ref().is_none_or(|t| &template_of(row) == t)
            && q.started_after.is_none_or(|at| row.created_at >= at)
    });
    let key = |row: &SandboxRow| (row.created_at, row.id.clone());
    if q.descending {
        rows.sort_by_key(|row| std::cmp::Reverse(key(row)));
    } else {
        rows.sort_by_key(key);
    }
    if let Some(after) = &q.after {
        rows.retain(|row| {
            let k = key(row);
            if q.descending {
                &k < after
            } else {
                &k > after
            }
        });
    }
    let next = (rows.len() > q.limit).then(|| {
        rows.truncate(q.limit);
        rows.last().map(token_after)
    });
    let body = rows
        .iter()
        .map(|row| listed(&s, row).map(Value::Object))
        .collect::<Result<Vec<_>, _>>()?;
    let mut response = Json(body).into_response();
    if let Some(Some(token)) = next {
        if let Ok(value) = HeaderValue::from_str(&token) {
            response.headers_mut().insert("x-next-token", value);
        }
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_are_whole_seconds_in_range() {
        assert_eq!(
            timeout_secs("timeout", &serde_json::json!(300)).unwrap(),
            300
        );
        for bad in [
            serde_json::json!(0),
            serde_json::json!(-5),
            serde_json::json!(1.5),
            serde_json::json!("60"),
            serde_json::json!(MAX_TIMEOUT_SECS + 1),
        ] {
            let err = timeout_secs("timeout", &bad).unwrap_err();
            assert!(
                matches!(err, ApiError::InvalidArgument(ref m) if m.contains("timeout")),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn networks_map_to_policies_or_are_refused() {
        assert_eq!(network_policy(None, None).unwrap(), None);
        assert_eq!(network_policy(Some(false), None).unwrap(), None);
        assert_eq!(
            network_policy(Some(true), None).unwrap(),
            Some(serde_json::json!({"mode": "open"}))
        );
        let net = serde_json::json!({"denyOut": ["0.0.0.0/0"], "allowOut": ["example.com"]});
        assert_eq!(
            network_policy(Some(true), Some(&net)).unwrap(),
            Some(serde_json::json!({"mode": "allowlist", "allow": ["example.com"]}))
        );
        let net = serde_json::json!({"denyOut": ["8.8.8.8"]});
        let err = network_policy(None, Some(&net)).unwrap_err();
        assert!(err.to_string().contains("denyOut"), "{err}");
        let net = serde_json::json!({"dnsServers": ["1.1.1.1"]});
        let err = network_policy(None, Some(&net)).unwrap_err();
        assert!(err.to_string().contains("network.dnsServers"), "{err}");
    }

    #[test]
    fn list_queries_decode_the_sdk_metadata_filter() {
        // The SDK: urlencode({quote(k): quote(v)}), then the query string encodes it again.
        // (As httpx sends {"a": "b c", "d": "e%"}.)
        let q =
            list_query("metadata=a%3Db%252520c%26d%3De%252525&state=running&limit=5&order=desc")
                .unwrap();
        assert_eq!(
            q.metadata,
            vec![("a".into(), "b c".into()), ("d".into(), "e%".into())]
        );
        assert_eq!(q.states, vec!["running"]);
        assert_eq!(q.limit, 5);
        assert!(q.descending);
        assert!(list_query("state=stopped").is_err());
        assert!(list_query("limit=0").is_err());
        assert!(list_query("nextToken=%%%").is_err());
        assert!(list_query("bogus=1").is_err());
        let q = list_query("startedAfter=2026-01-02T03%3A04%3A05.5%2B00%3A00").unwrap();
        assert_eq!(q.started_after, Some(1_767_323_045_500));
    }

    #[test]
    fn templates_name_images() {
        assert_eq!(image_of("base"), "host");
        assert_eq!(image_of("code-interpreter-v1"), "host");
        assert_eq!(image_of("python:3.12"), "python:3.12");
    }
}
