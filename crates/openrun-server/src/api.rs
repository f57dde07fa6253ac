//! Routes, authentication, request bodies and the sandbox endpoints. Exec lives in
//! [`crate::exec`].
//!
//! | method and path | answer |
//! |---|---|
//! | `GET /v1/health` | `{"status":"ok"}`, no key needed |
//! | `POST /v1/sandboxes` | 201 + sandbox resource |
//! | `GET /v1/sandboxes` | the caller's sandboxes (not deleted ones) |
//! | `GET /v1/sandboxes/{id}` | one sandbox |
//! | `DELETE /v1/sandboxes/{id}` | 204; the sandbox is destroyed, then 404 like a missing one |
//! | `POST /v1/sandboxes/{id}/exec` | 200 + NDJSON stream; 201 `{"pid"}` with `"background":true` |
//! | `…/{id}/files…` | file read, write, list, stat, mkdir, remove, move ([`crate::files`]) |
//! | `…/{id}/processes…` | list, status, signal, stdin, output ([`crate::processes`]) |
//! | `GET /v1/sandboxes/{id}/events` | the sandbox's timeline (kept after delete) |

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use openrun_runtime::{limits, ImageSource, Limits, Runtime, SandboxSpec, Storage};
use serde::de::DeserializeOwned;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::db::{self, Db, NewEvent, SandboxRow};
use crate::error::ApiError;
use crate::maintenance::AgentReaper;
use crate::openapi::ErrorAnswers;
use crate::{files, processes};
use openrun_protocol::MAX_DATA_LEN;

/// Largest request body accepted.
pub const MAX_BODY: usize = 1 << 20;
/// Sandbox lifetime when a create does not give one.
pub const DEFAULT_TTL: Duration = Duration::from_secs(15 * 60);

/// Everything handlers share.
pub struct AppState {
    /// State database.
    pub db: Db,
    /// Namespace backend (its calls block: run them on the blocking pool).
    pub runtime: Arc<Runtime>,
    /// The `openrun` binary, the single-threaded create helper.
    pub helper: PathBuf,
    /// Agents this process must reap.
    pub agents: Arc<AgentReaper>,
    /// Counters of `/metrics`.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Create slots and their queue.
    pub admission: crate::admission::Admission,
    /// Answers of `GET .../environment`, per sandbox.
    pub environments: crate::environment::Cache,
    /// Limits a create gets for what it does not name (`openrun serve --default-*`).
    pub default_limits: Limits,
    /// The egress proxy: policies, its CA, event limits.
    pub(crate) egress: crate::egress::Egress,
    /// Preview tokens' secret and the preview domain.
    pub previews: crate::preview::Previews,
    /// Sandboxes made ahead of default creates (`openrun serve --warm-pool`).
    pub pool: crate::pool::Pool,
    /// Idle agent connections left by execs, per sandbox.
    pub conns: crate::agent_conns::AgentConns,
    /// Requests in progress (background work waits for a quiet moment).
    pub activity: Arc<crate::activity::Activity>,
}

/// Shared state handle.
pub type Shared = Arc<AppState>;

/// The authenticated caller, put in request extensions by [`auth`].
#[derive(Debug, Clone)]
pub struct Caller {
    /// Tenant owning what the caller creates and sees.
    pub tenant: String,
    /// `agent` or `human`, the actor of its events.
    pub actor: String,
    /// The key's name, the owner of what it creates.
    pub name: String,
}

/// The whole API, with its OpenAPI document served at `/v1/openapi.json`.
pub fn router(state: Shared) -> Router {
    let (router, doc) = routes(state.clone()).split_for_parts();
    let doc = Bytes::from(serde_json::to_vec(&doc).unwrap_or_else(|e| {
        tracing::error!(error = %e, "cannot encode the OpenAPI document");
        b"{}".to_vec()
    }));
    router
        .route(
            "/v1/openapi.json",
            get(move || {
                let doc = doc.clone();
                async move { ([(header::CONTENT_TYPE, "application/json")], doc) }
            }),
        )
        // The E2B-compatible control plane (`/v2/sandboxes`, `/sandboxes/...`, X-API-KEY) and
        // MCP over Streamable HTTP (`/mcp`, bearer key): adapters over the same core calls.
        .merge(crate::e2b::api_routes(state.clone()))
        .merge(crate::mcp::router(state.clone()))
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(
            state.metrics.clone(),
            crate::metrics::observe,
        ))
        // Outermost: a preview host (`<port>-<id>.<domain>`) is not the API.
        .layer(middleware::from_fn_with_state(
            state.clone(),
            crate::preview::by_host,
        ))
        // Outermost: E2B sandbox traffic (envd and the code interpreter, named by the
        // `E2b-Sandbox-Id` header or a `49983-<id>.<domain>` host) is not the API either.
        .layer(middleware::from_fn_with_state(
            state.clone(),
            crate::e2b::sandbox_traffic,
        ))
        // Around everything: an answer made before its request's body was read closes the
        // connection.
        .layer(middleware::from_fn(crate::unread_body::close_if_unread))
        // Around everything (previews and E2B sandbox traffic too): every request counts as
        // activity until its answer is sent.
        .layer(middleware::from_fn_with_state(
            state.activity.clone(),
            crate::activity::track,
        ))
        .with_state(state)
}

/// The OpenAPI document of [`router`] (also served at `GET /v1/openapi.json`).
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    routes_without_state().into_openapi()
}

/// Every route with its documentation; `auth` guards all but health.
fn routes(state: Shared) -> OpenApiRouter<Shared> {
    let create = crate::admission::limit(routes!(create), &state);
    let authed = authed_routes()
        .routes(create)
        .route_layer(middleware::from_fn(crate::metrics::tag_caller))
        .route_layer(middleware::from_fn_with_state(state, auth));
    public_routes().merge(authed)
}

fn routes_without_state() -> OpenApiRouter<Shared> {
    let create = crate::admission::document(routes!(create));
    public_routes().merge(authed_routes().routes(create))
}

/// Routes that need no key. (`/v1/openapi.json` is added by [`router`], which holds the
/// finished document.)
fn public_routes() -> OpenApiRouter<Shared> {
    let mut doc = crate::openapi::ApiDoc::openapi();
    doc.paths
        .paths
        .insert("/v1/openapi.json".into(), openapi_path_item());
    OpenApiRouter::with_openapi(doc)
        .routes(routes!(health))
        // A preview token opens them too: they check the key themselves.
        .merge(crate::preview::proxy_routes())
}

/// Routes behind the API key.
fn authed_routes() -> OpenApiRouter<Shared> {
    let file_data = OpenApiRouter::new()
        .routes(routes!(files::read, files::write))
        .layer(DefaultBodyLimit::max(MAX_DATA_LEN));
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(crate::metrics::scrape))
        .routes(routes!(get_one, delete))
        .routes(routes!(crate::lifecycle::ttl))
        .routes(routes!(crate::lifecycle::pause))
        .routes(routes!(crate::lifecycle::resume))
        .routes(routes!(crate::exec::exec))
        .routes(routes!(crate::ws::exec_ws))
        .routes(routes!(crate::terminal::terminal))
        .routes(routes!(crate::environment::environment))
        .routes(routes!(
            crate::egress::routes::get,
            crate::egress::routes::put
        ))
        .routes(routes!(events))
        .merge(file_data)
        .routes(routes!(crate::archive::download, crate::archive::upload))
        .routes(routes!(files::list))
        .routes(routes!(files::stat))
        .routes(routes!(files::mkdir))
        .routes(routes!(files::remove))
        .routes(routes!(files::rename))
        .routes(routes!(crate::watch::watch))
        .routes(routes!(processes::list))
        .routes(routes!(processes::status))
        .routes(routes!(processes::signal))
        .routes(routes!(processes::stdin))
        .routes(routes!(processes::output))
        .routes(routes!(crate::images::snapshot))
        .routes(routes!(crate::images::fork))
        .routes(routes!(crate::images::diff))
        .routes(routes!(crate::preview::mint))
        .merge(crate::up::routes::routes())
}

/// The document's own entry (its handler holds the finished document, so it is written here).
fn openapi_path_item() -> utoipa::openapi::PathItem {
    use utoipa::openapi::path::{OperationBuilder, PathItemBuilder};
    use utoipa::openapi::{HttpMethod, ResponseBuilder, SecurityRequirement};
    PathItemBuilder::new()
        .operation(
            HttpMethod::Get,
            OperationBuilder::new()
                .operation_id(Some("openapi"))
                .tag("meta")
                .summary(Some("This OpenAPI document"))
                .security(SecurityRequirement::default())
                .response(
                    "200",
                    ResponseBuilder::new()
                        .description("The OpenAPI 3.1 document, as JSON")
                        .content(
                            "application/json",
                            utoipa::openapi::ContentBuilder::new().build(),
                        ),
                ),
        )
        .build()
}

/// `GET /v1/health`: the server is up (no key needed).
#[utoipa::path(get, operation_id = "health", path = "/v1/health", tag = "meta", security(()),
    responses((status = 200, description = "The server answers", body = Object, example = json!({"status": "ok"}))))]
async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

/// Checks `Authorization: Bearer <key>` against the stored hashes (the middleware of `/v1` and
/// `/mcp`).
pub(crate) async fn auth(
    State(s): State<Shared>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    // Owned before the await: a request's body is not `Sync`, so no borrow of it may be held.
    let token = bearer_token(req.headers());
    let caller = caller_of(&s, token).await?;
    req.extensions_mut().insert(caller);
    Ok(next.run(req).await)
}

/// The key of `Authorization: Bearer <key>`, if any.
fn bearer_token(headers: &axum::http::HeaderMap) -> Option<String> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
}

/// The caller a request's bearer key stands for.
async fn caller_of(s: &AppState, token: Option<String>) -> Result<Caller, ApiError> {
    let token = token.ok_or_else(|| {
        ApiError::Unauthorized(
            "an API key is required: send Authorization: Bearer <key> (openrun key create)".into(),
        )
    })?;
    authenticate(s, &token).await
}

/// The caller an API key stands for (401 for a key this server does not know). Every surface
/// (`/v1`, E2B's `X-API-KEY`, MCP) authenticates through it.
pub(crate) async fn authenticate(s: &AppState, token: &str) -> Result<Caller, ApiError> {
    let hash = crate::keys::hash(token);
    let key =
        s.db.read(move |c| db::key_by_hash(c, &hash))
            .await?
            .ok_or_else(|| ApiError::Unauthorized("unknown API key".into()))?;
    tracing::debug!(key = key.id, name = key.name, "authenticated");
    Ok(Caller {
        tenant: key.tenant,
        actor: key.actor_kind,
        name: key.name,
    })
}

/// A JSON body whose every failure is an [`ApiError`]: 413 above [`MAX_BODY`], 400 naming
/// the problem otherwise. An empty body is `{}`.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::TooLarge { limit: MAX_BODY }
            } else {
                ApiError::InvalidArgument(format!(
                    "cannot read the request body: {}",
                    e.body_text()
                ))
            }
        })?;
        let text: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &bytes
        };
        serde_json::from_slice(text)
            .map(JsonBody)
            .map_err(|e| ApiError::InvalidArgument(format!("invalid request body: {e}")))
    }
}

/// Body of `POST /v1/sandboxes`; every field optional.
#[derive(Debug, Default, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateBody {
    /// `name[:tag]` of an image in the server's store (`openrun image ls`), or `host` (the
    /// default). The image's environment (under `env`), working directory and user apply.
    pub(crate) image: Option<String>,
    /// An unpacked root filesystem on the server's host, instead of `image` (refused over
    /// the API: only images are accepted).
    #[schema(value_type = Option<String>)]
    pub(crate) rootfs: Option<PathBuf>,
    /// Memory limit, e.g. `512M`.
    pub(crate) memory: Option<String>,
    /// CPU limit, e.g. `1.5`.
    pub(crate) cpus: Option<String>,
    /// Process limit.
    pub(crate) pids: Option<u64>,
    /// Quota of the writable layer, e.g. `10G` (default: the server's `--default-disk`).
    pub(crate) disk: Option<String>,
    /// Open files per process (`RLIMIT_NOFILE`), 64 to 1048576 (default 65536).
    pub(crate) open_files: Option<u64>,
    /// Lifetime, e.g. `15m` (the default).
    pub(crate) ttl: Option<String>,
    /// Environment of every process (over the image's).
    #[serde(default)]
    pub(crate) env: BTreeMap<String, String>,
    /// Labels to find it by (`GET /v1/sandboxes?label=k=v`): at most 64; keys of 1 to 63
    /// characters from `A-Za-z0-9._/-`, values of at most 256 characters.
    #[serde(default)]
    pub(crate) labels: BTreeMap<String, String>,
    /// Network policy (default: mode `none`); see `PUT /v1/sandboxes/{id}/network`.
    #[schema(value_type = Option<crate::egress::policy::PolicyBody>)]
    pub(crate) network: Option<serde_json::Value>,
    /// Default working directory of every process, an absolute path (default: the image's;
    /// made at start when the image lacks it).
    pub(crate) workdir: Option<String>,
    /// Default user of every process: a name of the image's `/etc/passwd` or `uid[:gid]`
    /// (default: the image's).
    pub(crate) user: Option<String>,
}

/// The sandbox resource of the API.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
#[schema(as = Sandbox)]
pub struct SandboxResource {
    /// Sandbox id.
    id: String,
    /// Image it runs.
    image: String,
    /// `creating`, `running`, `paused`, `stopped` or `error`.
    state: String,
    /// Creation time (RFC 3339).
    created_at: String,
    /// When the TTL reaper destroys it (RFC 3339).
    expires_at: Option<String>,
    /// Resource limits.
    #[schema(value_type = crate::openapi::LimitsSchema)]
    limits: Limits,
    /// Labels given at creation.
    labels: BTreeMap<String, String>,
    /// Environment of every process, given at creation.
    env: BTreeMap<String, String>,
    /// Name of the API key that created it.
    owner: String,
}

impl SandboxResource {
    /// Its id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The resource of a stored sandbox.
    pub fn from_row(row: SandboxRow) -> Result<Self, ApiError> {
        let limits = serde_json::from_str(&row.limits_json)
            .map_err(|e| ApiError::internal("a stored sandbox record is corrupt", e))?;
        Ok(Self {
            id: row.id,
            image: row.image,
            state: row.state,
            created_at: crate::time::rfc3339(row.created_at),
            expires_at: row.expires_at.map(crate::time::rfc3339),
            limits,
            labels: row.labels,
            env: row.env,
            owner: row.owner,
        })
    }
}

/// Checks environment variables a client sent.
pub fn check_env(env: &BTreeMap<String, String>) -> Result<(), ApiError> {
    for (k, v) in env {
        if k.is_empty() || k.contains(['=', '\0']) || v.contains('\0') {
            return Err(ApiError::InvalidArgument(format!(
                "invalid environment variable {k:?}: names must be non-empty without '=' or NUL, values without NUL"
            )));
        }
    }
    Ok(())
}

/// Most labels a sandbox may have.
pub const MAX_LABELS: usize = 64;
/// Longest label key, in characters.
pub const MAX_LABEL_KEY: usize = 63;
/// Longest label value, in characters.
pub const MAX_LABEL_VALUE: usize = 256;

/// Checks one label: the key 1 to [`MAX_LABEL_KEY`] characters from `A-Za-z0-9._/-`, the
/// value at most [`MAX_LABEL_VALUE`] characters without NUL.
pub fn check_label(key: &str, value: &str) -> Result<(), ApiError> {
    let key_ok = (1..=MAX_LABEL_KEY).contains(&key.len())
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/' | b'-'));
    if !key_ok {
        return Err(ApiError::InvalidArgument(format!(
            "invalid label key {key:?}: expected 1 to {MAX_LABEL_KEY} characters from A-Za-z0-9._/-"
        )));
    }
    if value.chars().count() > MAX_LABEL_VALUE || value.contains('\0') {
        return Err(ApiError::InvalidArgument(format!(
            "invalid value of label {key:?}: expected at most {MAX_LABEL_VALUE} characters without NUL"
        )));
    }
    Ok(())
}

/// Checks a sandbox's labels (see [`check_label`]), at most [`MAX_LABELS`] of them.
pub fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if labels.len() > MAX_LABELS {
        return Err(ApiError::InvalidArgument(format!(
            "too many labels: {} given, at most {MAX_LABELS} allowed",
            labels.len()
        )));
    }
    labels.iter().try_for_each(|(k, v)| check_label(k, v))
}

pub(crate) fn spec_from(body: CreateBody) -> Result<SandboxSpec, ApiError> {
    let bad = |e: limits::LimitParseError| ApiError::InvalidArgument(e.to_string());
    let image = match (body.image, body.rootfs) {
        (Some(_), Some(_)) => {
            return Err(ApiError::InvalidArgument(
                "give either image or rootfs, not both".into(),
            ))
        }
        // A tenant naming a host directory would mount it (idmapped, so readable by the
        // sandbox's root) into its sandbox: `"rootfs": "/"` is the whole host. Over the API
        // only images are accepted.
        (None, Some(dir)) => {
            return Err(ApiError::InvalidArgument(format!(
            "rootfs {} is not accepted over the API: a sandbox may only use an image (\"host\" \
                 or one of `openrun image ls`); unpacked root filesystems are for the local CLI \
                 (openrun run --rootfs)",
            dir.display()
        )))
        }
        // A named image is resolved through the image store by `create`.
        (Some(_), None) | (None, None) => ImageSource::Host,
    };
    let mut spec = SandboxSpec::new(image);
    spec.storage = Storage::Disk;
    spec.exit_with_creator = false;
    spec.limits = Limits {
        memory_bytes: body
            .memory
            .as_deref()
            .map(limits::parse_memory)
            .transpose()
            .map_err(bad)?,
        cpu_millis: body
            .cpus
            .as_deref()
            .map(limits::parse_cpus)
            .transpose()
            .map_err(bad)?,
        pids: match body.pids {
            Some(n) => Some(limits::parse_pids(&n.to_string()).map_err(bad)?),
            None => spec.limits.pids,
        },
        disk_bytes: body
            .disk
            .as_deref()
            .map(limits::parse_disk)
            .transpose()
            .map_err(bad)?,
        open_files: body
            .open_files
            .map(|n| limits::parse_open_files(&n.to_string()))
            .transpose()
            .map_err(bad)?,
    };
    spec.lifetime = Some(match body.ttl.as_deref() {
        Some(ttl) => limits::parse_duration(ttl).map_err(bad)?,
        None => DEFAULT_TTL,
    });
    check_env(&body.env)?;
    check_labels(&body.labels)?;
    spec.env = body.env;
    if let Some(dir) = body.workdir {
        if !dir.starts_with('/') || dir.contains('\0') || dir.len() > 4096 {
            return Err(ApiError::InvalidArgument(format!(
                "workdir must be an absolute path without NUL bytes, at most 4096 bytes: {dir:?}"
            )));
        }
        spec.cwd = Some(dir);
    }
    if let Some(user) = body.user {
        if user.is_empty() || user.contains('\0') || user.len() > 256 {
            return Err(ApiError::InvalidArgument(
                "user must name a user or uid[:gid] (no NUL bytes, at most 256 bytes)".into(),
            ));
        }
        spec.user = Some(user);
    }
    Ok(spec)
}

/// Fills the limits a create left out with the server's defaults, so that a memory bomb or a
/// disk fill through the API is contained unless an operator chose otherwise.
pub(crate) fn apply_default_limits(limits: &mut Limits, defaults: &Limits) {
    limits.memory_bytes = limits.memory_bytes.or(defaults.memory_bytes);
    limits.cpu_millis = limits.cpu_millis.or(defaults.cpu_millis);
    limits.disk_bytes = limits.disk_bytes.or(defaults.disk_bytes);
    limits.open_files = limits.open_files.or(defaults.open_files);
}

/// Runs blocking work (runtime calls) on the blocking pool.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal("a background task failed", e))
}

/// `POST /v1/sandboxes`: creates a sandbox; answers once its agent answers.
#[utoipa::path(post, operation_id = "create_sandbox", path = "/v1/sandboxes", tag = "sandboxes", request_body = CreateBody,
    responses((status = 201, description = "Created", body = SandboxResource), ErrorAnswers))]
async fn create(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    JsonBody(body): JsonBody<CreateBody>,
) -> Result<(StatusCode, Json<SandboxResource>), ApiError> {
    let resource = create_sandbox(&s, &caller, body).await?;
    Ok((StatusCode::CREATED, Json(resource)))
}

/// The final spec of a create: `body` over the server's default limits, the image's
/// environment, working directory and user, and the proxy environment of `network`. Returns
/// the spec and the image (its lease keeps the layers until the sandbox's record lists them).
async fn final_spec(
    s: &Shared,
    caller: &Caller,
    body: CreateBody,
    image_name: &str,
    network: &crate::egress::policy::Policy,
) -> Result<(SandboxSpec, openrun_image::SandboxImage), ApiError> {
    let mut spec = spec_from(body)?;
    apply_default_limits(&mut spec.limits, &s.default_limits);
    // The image's layers stay on disk (its lease holds off prune) until the sandbox's record
    // lists them. The caller's own images and server-wide ones only: another tenant's is
    // missing (crate::images::resolve).
    let image = crate::images::sandbox_image(s, caller, image_name)
        .await?
        .map_err(|e| {
            if e.is_user_error() {
                ApiError::InvalidArgument(e.to_string())
            } else {
                ApiError::internal("cannot resolve the image", e)
            }
        })?;
    image.apply(&mut spec);
    crate::egress::sandbox_files::add_env(
        &mut spec.env,
        crate::egress::sandbox_files::wants_ca(network),
    );
    Ok((spec, image))
}

/// The spec of a create that asks for nothing (`POST /v1/sandboxes {}`): what the warm pool
/// makes ([`crate::pool`]).
pub(crate) async fn default_spec(s: &Shared) -> Result<SandboxSpec, ApiError> {
    let nobody = Caller {
        tenant: String::new(),
        actor: "system".into(),
        name: String::new(),
    };
    let network = crate::egress::routes::create_policy(s, None)?;
    let (spec, _image) = final_spec(s, &nobody, CreateBody::default(), "host", &network).await?;
    Ok(spec)
}

/// The `sandbox.create` event of `row`, made with `limits` for `ttl_ms` under `network`.
fn create_event(
    caller: &Caller,
    row: &SandboxRow,
    limits: &Limits,
    ttl_ms: Option<i64>,
    network: &crate::egress::policy::Policy,
) -> NewEvent {
    NewEvent {
        sandbox_id: row.id.clone(),
        tenant: caller.tenant.clone(),
        actor: caller.actor.clone(),
        kind: "sandbox.create",
        payload: serde_json::json!({
            "image": row.image,
            "limits": limits,
            "ttl_ms": ttl_ms,
            "labels": row.labels,
            "env": row.env.keys().collect::<Vec<_>>(),
            "network": network.view(),
        }),
    }
}

/// Creates the sandbox `body` describes (`POST /v1/sandboxes`, and each sandbox of a fork);
/// returns once its agent answers. A create whose spec is the warm pool's takes a pooled
/// sandbox when one is ready ([`crate::pool`]); the answer and the timeline are the same.
pub(crate) async fn create_sandbox(
    s: &Shared,
    caller: &Caller,
    mut body: CreateBody,
) -> Result<SandboxResource, ApiError> {
    // The pool refills only while no create of a user is in progress.
    let _user_create = s.pool.user_create();
    let network = crate::egress::routes::create_policy(s, body.network.take())?;
    let labels = body.labels.clone();
    let image_name = body.image.clone().unwrap_or_else(|| "host".to_string());
    // The resource shows the variables the caller gave; the image's come with the image.
    let body_env = body.env.clone();
    let (mut spec, image) = final_spec(s, caller, body, &image_name, &network).await?;
    let ttl_ms = spec
        .lifetime
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let row_image = match spec.image {
        // As the caller named it (the store's name of its own images has a tenant prefix).
        ImageSource::Host => spec.image.describe(),
        _ => image_name,
    };
    let limits_json = serde_json::to_string(&spec.limits)
        .map_err(|e| ApiError::internal("cannot encode the limits", e))?;
    // A spec that matches the pool's has network mode `none` without secrets (the proxy
    // environment tells): nothing of its policy is stored or in the sandbox.
    let poolable = !crate::egress::sandbox_files::wants_ca(&network);
    if let Some(ready) = poolable.then(|| s.pool.take(&spec)).flatten() {
        let created_at = crate::time::now_ms();
        let row = SandboxRow {
            id: ready.id().to_string(),
            tenant: caller.tenant.clone(),
            owner: caller.name.clone(),
            image: row_image.clone(),
            limits_json: limits_json.clone(),
            labels: labels.clone(),
            env: body_env.clone(),
            state: "running".into(),
            created_at,
            expires_at: ttl_ms.map(|ms| created_at.saturating_add(ms)),
        };
        let event = create_event(caller, &row, &spec.limits, ttl_ms, &network);
        match crate::pool::claim(s, ready, spec.lifetime, row, event).await {
            Ok((sandbox, client, row)) => {
                crate::egress::routes::prepare(s, &sandbox, &network).await?;
                // The connection that set the lifetime serves the first exec: no connect and
                // Hello then (crate::agent_conns).
                let socket = sandbox.socket_path();
                s.conns.put(&row.id, Arc::new(sandbox), client);
                tracing::info!(
                    id = row.id,
                    tenant = row.tenant,
                    "sandbox created (warm pool)"
                );
                crate::relay::ensure_egress(s, &row.id, &row.tenant, Some(socket));
                return SandboxResource::from_row(row);
            }
            Err(Some(error)) => return Err(error),
            // The pooled sandbox was unusable: made cold below.
            Err(None) => {}
        }
    }
    // The row comes first, as `creating`, under the id the sandbox will get: a server that
    // stops mid-create finds it at start and removes what was made (maintenance::reconcile).
    let id = openrun_runtime::state::new_id();
    spec.id = Some(id.clone());
    let created_at = crate::time::now_ms();
    let mut row = SandboxRow {
        id: id.clone(),
        tenant: caller.tenant.clone(),
        owner: caller.name.clone(),
        image: row_image,
        limits_json,
        labels,
        env: body_env,
        state: "creating".into(),
        created_at,
        expires_at: ttl_ms.map(|ms| created_at.saturating_add(ms)),
    };
    let (stored, policy) = (row.clone(), network.clone());
    s.db.call(move |c| {
        db::insert_sandbox(c, &stored)?;
        crate::egress::routes::store_new(c, &stored.id, &policy)
    })
    .await?;
    let runtime = s.runtime.clone();
    let helper = s.helper.clone();
    let helper_spec = spec.clone();
    let created = blocking(move || runtime.create_with_helper(&helper_spec, &helper)).await;
    drop(image);
    let sandbox = match created {
        Ok(Ok(sandbox)) => sandbox,
        Ok(Err(e)) => {
            let error = ApiError::from_runtime("cannot create the sandbox", e);
            fail_create(s, &row, caller, &error).await;
            return Err(error);
        }
        Err(error) => {
            fail_create(s, &row, caller, &error).await;
            return Err(error);
        }
    };
    let record = sandbox.record().clone();
    // The helper has exited: the agent is now this process's child (we are a subreaper).
    s.agents.track(record.pid);
    if let Err(error) = crate::egress::routes::prepare(s, &sandbox, &network).await {
        let runtime = s.runtime.clone();
        let _ = blocking(move || runtime.destroy(sandbox)).await;
        s.agents.reap();
        fail_create(s, &row, caller, &error).await;
        return Err(error);
    }
    row.state = "running".into();
    row.expires_at = record
        .expires_at_ms
        .map(|t| i64::try_from(t).unwrap_or(i64::MAX));
    let event = create_event(caller, &row, &record.limits, ttl_ms, &network);
    let expires_at = row.expires_at;
    let finished =
        s.db.call(move |c| db::finish_create(c, &id, expires_at, &event))
            .await;
    if !matches!(finished, Ok(true)) {
        // Deleted while it was being made, or not recorded: nobody may keep it running.
        let runtime = s.runtime.clone();
        let _ = blocking(move || runtime.destroy(sandbox)).await;
        s.agents.reap();
        return Err(match finished {
            Ok(_) => ApiError::NotFound(format!(
                "sandbox {} was deleted while it was being created",
                row.id
            )),
            Err(e) => {
                let error = e.into();
                fail_create(s, &row, caller, &error).await;
                error
            }
        });
    }
    tracing::info!(id = row.id, tenant = row.tenant, "sandbox created");
    crate::relay::ensure_egress(s, &row.id, &row.tenant, Some(sandbox.socket_path()));
    SandboxResource::from_row(row)
}

/// Marks a sandbox whose create failed `error` (and deleted: its creator got no id to use)
/// with a `sandbox.error` event.
async fn fail_create(s: &AppState, row: &SandboxRow, caller: &Caller, error: &ApiError) {
    let event = NewEvent {
        sandbox_id: row.id.clone(),
        tenant: caller.tenant.clone(),
        actor: caller.actor.clone(),
        kind: "sandbox.error",
        payload: serde_json::json!({ "message": error.to_string() }),
    };
    let key = row.id.clone();
    if let Err(e) =
        s.db.call(move |c| db::fail_create(c, &key, true, &event))
            .await
    {
        tracing::error!(id = row.id, error = %e, "cannot record a failed create");
    }
    s.egress.forget(&row.id);
}

/// The caller's live (not deleted) sandbox `id`, or 404 — the same for another tenant's id,
/// an id that never existed and one that cannot be valid.
pub async fn find(s: &AppState, caller: &Caller, id: &str) -> Result<SandboxRow, ApiError> {
    let missing = || ApiError::NotFound(format!("no such sandbox: {id}"));
    if !openrun_runtime::state::valid_id(id) {
        return Err(missing());
    }
    let (tenant, key) = (caller.tenant.clone(), id.to_string());
    s.db.read(move |c| db::get_sandbox(c, &tenant, &key))
        .await?
        .ok_or_else(missing)
}

/// `GET /v1/sandboxes/{id}`.
#[utoipa::path(get, operation_id = "get_sandbox", path = "/v1/sandboxes/{id}", tag = "sandboxes", params(("id" = String, Path, description = "Sandbox id")),
    responses((status = 200, description = "The sandbox", body = SandboxResource), ErrorAnswers))]
async fn get_one(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<SandboxResource>, ApiError> {
    let row = find(&s, &caller, &id).await?;
    Ok(Json(SandboxResource::from_row(row)?))
}

/// Largest page of `GET /v1/sandboxes`.
pub const MAX_PAGE: u32 = 1000;
/// Page size of `GET /v1/sandboxes` when `limit` is not given.
pub const DEFAULT_PAGE: u32 = 100;
/// Every state a sandbox can be in.
pub const STATES: [&str; 5] = ["creating", "running", "paused", "stopped", "error"];

/// The opaque cursor naming the position after `row` in the list order.
fn cursor_after(row: &SandboxRow) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(format!("{}:{}", row.created_at, row.id))
}

/// Decodes a cursor made by [`cursor_after`]; anything else is a 400.
fn parse_cursor(cursor: &str) -> Result<(i64, String), ApiError> {
    use base64::Engine;
    let bad = || {
        ApiError::InvalidArgument(format!(
            "invalid cursor {cursor:?}: pass the X-Next-Cursor header of the previous page"
        ))
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let (created_at, id) = text.split_once(':').ok_or_else(bad)?;
    let created_at = created_at.parse().map_err(|_| bad())?;
    if !openrun_runtime::state::valid_id(id) {
        return Err(bad());
    }
    Ok((created_at, id.to_string()))
}

/// The filter of a list request: `label=k=v` (repeatable), `state`, `limit`, `cursor`.
fn list_filter(query: &str) -> Result<db::ListFilter, ApiError> {
    let (query, labels) = crate::query::Query::parse_repeated(query, "label")?;
    query.only(&["state", "limit", "cursor"])?;
    let labels = labels
        .into_iter()
        .map(|pair| {
            let (k, v) = pair.split_once('=').ok_or_else(|| {
                ApiError::InvalidArgument(format!(
                    "query parameter \"label\" must be KEY=VALUE, not {pair:?}"
                ))
            })?;
            check_label(k, v)?;
            Ok((k.to_string(), v.to_string()))
        })
        .collect::<Result<_, ApiError>>()?;
    let state = query.string("state");
    if let Some(state) = &state {
        if !STATES.contains(&state.as_str()) {
            return Err(ApiError::InvalidArgument(format!(
                "query parameter \"state\" must be one of {STATES:?}, not {state:?}"
            )));
        }
    }
    let limit = match query.u64("limit")? {
        None => DEFAULT_PAGE,
        Some(n) if (1..=u64::from(MAX_PAGE)).contains(&n) => n as u32,
        Some(n) => {
            return Err(ApiError::InvalidArgument(format!(
                "query parameter \"limit\" must be 1 to {MAX_PAGE}, not {n}"
            )))
        }
    };
    let after = query
        .string("cursor")
        .as_deref()
        .map(parse_cursor)
        .transpose()?;
    Ok(db::ListFilter {
        labels,
        state,
        after,
        limit,
    })
}

/// `GET /v1/sandboxes`: the caller's sandboxes, filtered and paged.
#[utoipa::path(get, operation_id = "list_sandboxes", path = "/v1/sandboxes", tag = "sandboxes",
    params(
        ("label" = Option<Vec<String>>, Query, description = "KEY=VALUE; repeatable, all must match"),
        ("state" = Option<String>, Query, description = "creating, running, paused, stopped or error"),
        ("limit" = Option<u32>, Query, description = "Page size, 1 to 1000 (default 100)"),
        ("cursor" = Option<String>, Query, description = "X-Next-Cursor of the previous page"),
    ),
    responses((status = 200, description = "The caller's sandboxes, oldest first; X-Next-Cursor when there are more",
        body = Vec<SandboxResource>,
        headers(("X-Next-Cursor" = String, description = "Cursor of the next page"))), ErrorAnswers))]
async fn list(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    uri: axum::http::Uri,
) -> Result<Response, ApiError> {
    let mut filter = list_filter(uri.query().unwrap_or(""))?;
    let page = filter.limit as usize;
    // One more than asked for tells whether there is a next page.
    filter.limit += 1;
    let mut rows = list_sandboxes(&s, &caller, filter).await?;
    let next = (rows.len() > page).then(|| {
        rows.truncate(page);
        rows.last().map(cursor_after)
    });
    let body: Vec<SandboxResource> = rows
        .into_iter()
        .map(SandboxResource::from_row)
        .collect::<Result<_, _>>()?;
    let mut response = Json(body).into_response();
    if let Some(Some(cursor)) = next {
        if let Ok(value) = axum::http::HeaderValue::from_str(&cursor) {
            response.headers_mut().insert("x-next-cursor", value);
        }
    }
    Ok(response)
}

/// The caller's sandboxes (deleted ones left out) that `filter` selects, oldest first.
pub(crate) async fn list_sandboxes(
    s: &AppState,
    caller: &Caller,
    filter: db::ListFilter,
) -> Result<Vec<SandboxRow>, ApiError> {
    let tenant = caller.tenant.clone();
    Ok(s.db
        .call(move |c| db::list_sandboxes(c, &tenant, &filter))
        .await?)
}

/// Destroys a sandbox if it still exists; one already gone is not an error.
pub async fn destroy(s: &AppState, id: &str) -> Result<(), ApiError> {
    s.conns.forget(id);
    let runtime = s.runtime.clone();
    let key = id.to_string();
    // An agent that already died (its own lifetime timer, a crash) still leaves remains to
    // remove: `destroy_exact` removes them too.
    let result = blocking(move || runtime.destroy_exact(&key)).await?;
    s.agents.reap();
    match result {
        Ok(_) => Ok(()),
        Err(e) => Err(ApiError::internal(
            format!("cannot destroy sandbox {id}"),
            e,
        )),
    }
}

/// `DELETE /v1/sandboxes/{id}`: destroys it; its events stay readable.
#[utoipa::path(delete, operation_id = "delete_sandbox", path = "/v1/sandboxes/{id}", tag = "sandboxes", params(("id" = String, Path, description = "Sandbox id")),
    responses((status = 204, description = "Destroyed"), ErrorAnswers))]
async fn delete(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let row = find(&s, &caller, &id).await?;
    remove(&s, &caller, row).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Destroys `row`'s sandbox (if it lives) and marks it deleted with a `sandbox.delete` event.
pub(crate) async fn remove(s: &AppState, caller: &Caller, row: SandboxRow) -> Result<(), ApiError> {
    if matches!(row.state.as_str(), "creating" | "running" | "paused") {
        destroy(s, &row.id).await?;
    }
    let event = NewEvent {
        sandbox_id: row.id.clone(),
        tenant: caller.tenant.clone(),
        actor: caller.actor.clone(),
        kind: "sandbox.delete",
        payload: serde_json::json!({}),
    };
    let key = row.id.clone();
    s.db.call(move |c| db::stop_sandbox(c, &key, true, &event))
        .await?;
    s.egress.forget(&row.id);
    Ok(())
}

/// The timeline of the caller's sandbox `id` (kept after delete) after event `since`, oldest
/// first; 404 for anyone else's.
pub(crate) async fn read_events(
    s: &AppState,
    caller: &Caller,
    id: &str,
    since: i64,
) -> Result<Vec<db::EventRow>, ApiError> {
    let missing = || ApiError::NotFound(format!("no such sandbox: {id}"));
    if !openrun_runtime::state::valid_id(id) {
        return Err(missing());
    }
    let (tenant, key) = (caller.tenant.clone(), id.to_string());
    Ok(s.db
        .call(move |c| db::events(c, &tenant, &key, since))
        .await?
        .ok_or_else(missing)?
        .events)
}

/// How often a follower of the timeline looks again when no write woke it.
const FOLLOW_POLL: Duration = Duration::from_secs(1);

/// `GET /v1/sandboxes/{id}/events[?since=SEQ][&follow=true]`: the sandbox's timeline (kept
/// after delete), after event `since`; with `follow`, NDJSON that goes on live until the
/// sandbox has ended and its last events were sent, or the client leaves.
#[utoipa::path(get, operation_id = "list_events", path = "/v1/sandboxes/{id}/events", tag = "sandboxes",
    params(
        ("id" = String, Path, description = "Sandbox id"),
        ("since" = Option<i64>, Query, description = "Only events with a larger seq"),
        ("follow" = Option<bool>, Query, description = "Stream NDJSON events as they happen"),
    ),
    responses((status = 200, description = "Events, oldest first: a JSON array, or NDJSON with follow=true",
        content((Vec<db::EventRow> = "application/json"), (db::EventRow = "application/x-ndjson"))), ErrorAnswers))]
async fn events(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    query: crate::query::Query,
) -> Result<Response, ApiError> {
    query.only(&["since", "follow"])?;
    let since = i64::try_from(query.u64("since")?.unwrap_or(0)).unwrap_or(i64::MAX);
    let follow = query.flag("follow")?;
    let missing = || ApiError::NotFound(format!("no such sandbox: {id}"));
    if !openrun_runtime::state::valid_id(&id) {
        return Err(missing());
    }
    // Subscribed before the first read, so no write after it goes unnoticed.
    let changes = s.db.subscribe();
    let (tenant, key) = (caller.tenant.clone(), id.clone());
    let timeline =
        s.db.call(move |c| db::events(c, &tenant, &key, since))
            .await?
            .ok_or_else(missing)?;
    if !follow {
        return Ok(Json(timeline.events).into_response());
    }
    let follower = Follower {
        db: s.db.clone(),
        tenant: caller.tenant,
        id,
        since,
        changes,
        pending: timeline.events.into(),
        ended: timeline.ended,
    };
    let stream = futures_util::stream::unfold(follower, |mut f| async move {
        let event = f.next().await?;
        let mut line = serde_json::to_vec(&event).ok()?;
        line.push(b'\n');
        Some((Ok::<_, std::convert::Infallible>(Bytes::from(line)), f))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}

/// One client following a sandbox's timeline. Dropped (ending its reads) when the client
/// leaves, since the response body owns it.
struct Follower {
    db: Db,
    tenant: String,
    id: String,
    /// Seq of the last event read.
    since: i64,
    /// Bumped by every database write: then the timeline may have grown.
    changes: tokio::sync::watch::Receiver<u64>,
    /// Read but not yet sent.
    pending: std::collections::VecDeque<db::EventRow>,
    /// The sandbox had ended when `pending` was read: once it is sent, the stream ends.
    ended: bool,
}

impl Follower {
    /// The next event; `None` once the sandbox has ended and everything was sent.
    async fn next(&mut self) -> Option<db::EventRow> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                self.since = event.seq;
                return Some(event);
            }
            if self.ended {
                return None;
            }
            self.changes.borrow_and_update();
            let (tenant, id, since) = (self.tenant.clone(), self.id.clone(), self.since);
            match self
                .db
                .call(move |c| db::events(c, &tenant, &id, since))
                .await
            {
                Ok(Some(timeline)) => {
                    self.pending = timeline.events.into();
                    self.ended = timeline.ended;
                }
                Ok(None) => return None,
                Err(e) => {
                    tracing::warn!(id = self.id, error = %e, "cannot read the timeline");
                    return None;
                }
            }
            if self.pending.is_empty() && !self.ended {
                let _ = tokio::time::timeout(FOLLOW_POLL, self.changes.changed()).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(json: &str) -> Result<CreateBody, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn create_bodies_are_checked_and_limits_parsed() {
        assert!(
            body(r#"{"imagez":"host"}"#).is_err(),
            "unknown fields are refused"
        );
        let spec = spec_from(body(r#"{"memory":"64M","cpus":"0.5","pids":64}"#).unwrap()).unwrap();
        assert_eq!(spec.limits.memory_bytes, Some(64 << 20));
        assert_eq!(spec.limits.cpu_millis, Some(500));
        assert_eq!(spec.limits.pids, Some(64));
        assert_eq!(spec.lifetime, Some(DEFAULT_TTL));
        assert_eq!(spec.storage, Storage::Disk);
        assert!(!spec.exit_with_creator);
        let err = spec_from(body(r#"{"memory":"12Q"}"#).unwrap()).unwrap_err();
        assert!(
            matches!(err, ApiError::InvalidArgument(ref m) if m.contains("12Q")),
            "{err}"
        );
        let err = spec_from(body(r#"{"image":"host","rootfs":"/x"}"#).unwrap()).unwrap_err();
        assert!(matches!(err, ApiError::InvalidArgument(_)));
        let err = spec_from(body(r#"{"rootfs":"relative"}"#).unwrap()).unwrap_err();
        assert!(matches!(err, ApiError::InvalidArgument(_)));
        let err = spec_from(body(r#"{"env":{"A=B":"x"}}"#).unwrap()).unwrap_err();
        assert!(matches!(err, ApiError::InvalidArgument(_)));
        let err = spec_from(body(r#"{"ttl":"0s"}"#).unwrap()).unwrap_err();
        assert!(matches!(err, ApiError::InvalidArgument(ref m) if m.contains("0s")));
        let spec = spec_from(body(r#"{"workdir":"/workspaces/app","user":"1000:1000"}"#).unwrap())
            .unwrap();
        assert_eq!(spec.cwd.as_deref(), Some("/workspaces/app"));
        assert_eq!(spec.user.as_deref(), Some("1000:1000"));
        for bad in [r#"{"workdir":"relative"}"#, r#"{"user":""}"#] {
            let err = spec_from(body(bad).unwrap()).unwrap_err();
            assert!(matches!(err, ApiError::InvalidArgument(_)), "{bad}: {err}");
        }
    }
}
