//! Snapshots, forks and diffs of sandboxes, over the image store of the server's data dir
//! ([`openrun_image::snapshot`]).
//!
//! | method and path | answer |
//! |---|---|
//! | `POST /v1/sandboxes/{id}/snapshot` `{"name"?}` | 201 `{image, layers, bytes, duration_ms, paused_ms}`, event `sandbox.snapshot` |
//! | `POST /v1/sandboxes/{id}/fork` `{"count", "name"?, create options}` | 201 `[sandbox]`: a snapshot, then `count` sandboxes created from it |
//! | `GET /v1/sandboxes/{id}/diff[?path=P][&against=IMAGE]` | `{changes, patch, truncated}` |
//!
//! Images made through the API belong to the tenant that made them. A tenant names its
//! snapshots as it likes (`dev-env`); the store holds them under a prefix of the tenant
//! ([`scope`]: `tenants/<16 hex of sha256(tenant)>/dev-env`), the database records the owner
//! (`image_owners`), and every name a tenant gives is resolved by [`resolve`]: its own image
//! of that name first, else a server-wide image (`host`, those built or imported with the
//! CLI). Another tenant's image answers exactly as a missing one, and its names never
//! collide with the caller's. Snapshots made before owners were recorded (unprefixed, with
//! the source `snapshot:<sandbox id>`) belong to the tenant of that sandbox.
//!
//! A snapshot holds the sandbox's change lock (as pause, resume and TTL changes do), so a
//! pause or resume never interleaves with the freeze of the copy. A fork's creates run
//! concurrently, each in a create slot of [`crate::admission`]; if one fails, the ones made are
//! deleted and the fork fails (the snapshot image stays: it is a valid image).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use openrun_image::diff::{DiffOptions, DiffReport};
use openrun_image::name::MAX_NAME;
use openrun_image::snapshot::{self, Snapshot, SnapshotError};
use openrun_image::{ImageError, ImageRef, SandboxImage, Store};
use openrun_protocol::{AgentError, ErrorCode};
use openrun_runtime::Limits;
use serde_json::{json, Value};

use crate::api::{blocking, find, Caller, JsonBody, SandboxResource, Shared};
use crate::db::{self, SandboxRow};
use crate::error::ApiError;
use crate::files::record;
use crate::openapi::ErrorAnswers;

/// Most sandboxes one fork creates.
pub const MAX_FORKS: u64 = 100;

/// Body of `POST /v1/sandboxes/{id}/snapshot`.
#[derive(Debug, Default, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotBody {
    /// `name[:tag]` of the new image (default `snap-<id>-<n>`); an existing name is a 409.
    name: Option<String>,
}

/// Answer of a snapshot (documentation of [`Snapshot`]).
#[derive(Debug, utoipa::ToSchema)]
#[schema(as = Snapshot)]
#[allow(dead_code)]
pub struct SnapshotSchema {
    /// The new image, `name:tag`.
    image: String,
    /// Its layer ids (hex sha256), bottom to top; the last one holds the sandbox's changes.
    layers: Vec<String>,
    /// Bytes of the new layer.
    bytes: u64,
    /// Time the snapshot took, in milliseconds.
    duration_ms: u64,
    /// Time the sandbox was frozen for the copy, in milliseconds (0 if it was paused).
    paused_ms: u64,
}

/// Body of `POST /v1/sandboxes/{id}/fork` (documentation: the create options are those of
/// `POST /v1/sandboxes` but `image` and `rootfs`).
#[derive(Debug, utoipa::ToSchema)]
#[allow(dead_code)]
pub struct ForkBody {
    /// Sandboxes to create, 1 to 100.
    count: u64,
    /// Name of the snapshot image (default `snap-<id>-<n>`).
    name: Option<String>,
    /// Memory limit, e.g. `512M` (default: the sandbox's).
    memory: Option<String>,
    /// CPU limit, e.g. `1.5` (default: the sandbox's).
    cpus: Option<String>,
    /// Process limit (default: the sandbox's).
    pids: Option<u64>,
    /// Lifetime of each fork, e.g. `15m` (the default).
    ttl: Option<String>,
    /// Environment of every process (default: the sandbox's).
    env: Option<std::collections::BTreeMap<String, String>>,
    /// Labels of each fork.
    labels: Option<std::collections::BTreeMap<String, String>>,
}

/// One changed path of a diff.
#[derive(Debug, utoipa::ToSchema)]
#[schema(as = Change)]
#[allow(dead_code)]
pub struct ChangeSchema {
    /// Absolute path inside the sandbox.
    path: String,
    /// `added`, `modified` or `deleted`.
    kind: String,
    /// `file`, `dir`, `symlink`, `fifo`, `socket`, `char_device` or `block_device`.
    #[schema(rename = "type")]
    file_type: String,
    /// Size in bytes (before the change for a deletion).
    size: u64,
    /// Target of a symbolic link, as written (never followed).
    link_target: Option<String>,
}

/// Answer of a diff.
#[derive(Debug, utoipa::ToSchema)]
#[schema(as = Diff)]
#[allow(dead_code)]
pub struct DiffSchema {
    /// Changed paths, sorted.
    changes: Vec<ChangeSchema>,
    /// Unified diff (git style) of changed text files of at most 1 MiB; binary ones as
    /// `Binary files ... differ`.
    patch: String,
    /// Whether the listing (50 000 changes) or the patch (8 MiB) stopped at its limit.
    truncated: bool,
}

/// A snapshot's failure as an answer: the request's fault is a 4xx naming it.
fn snapshot_error(e: SnapshotError) -> ApiError {
    match e {
        SnapshotError::Exists(_) => ApiError::Agent(AgentError {
            code: ErrorCode::AlreadyExists,
            message: e.to_string(),
        }),
        e if e.is_user_error() => ApiError::InvalidArgument(e.to_string()),
        e => ApiError::internal("cannot snapshot the sandbox", e),
    }
}

/// First component of the store names of tenants' images.
const TENANTS: &str = "tenants";

/// The prefix of the store names of `tenant`'s images: `tenants/<16 hex>/`, the hex the start
/// of the tenant's sha256 (a tenant id may hold characters an image name may not).
pub(crate) fn scope(tenant: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(tenant.as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("{TENANTS}/{hex}/")
}

/// The store name of `tenant`'s image `r`.
fn scoped(tenant: &str, r: &ImageRef) -> Result<ImageRef, ApiError> {
    let scope = scope(tenant);
    ImageRef::parse(&format!("{scope}{r}")).map_err(|_| {
        ApiError::InvalidArgument(format!(
            "invalid image name {:?}: longer than {} characters, the most a snapshot's name may have",
            r.name,
            MAX_NAME - scope.len()
        ))
    })
}

/// The name `tenant` knows its image by, from its store name (`name:tag`).
fn shown(tenant: &str, stored: &str) -> String {
    stored
        .strip_prefix(&scope(tenant))
        .unwrap_or(stored)
        .to_string()
}

/// Resolves `name`, an image a tenant asks for, to its name in the store: the caller's own
/// image of that name, else a server-wide one (the `host` image, or a store image no tenant
/// owns). Another tenant's image is missing (`ImageError::NotFound(name)`, as for a name
/// nobody has); a malformed name is `ImageError::InvalidName`.
pub(crate) async fn resolve(
    s: &Shared,
    caller: &Caller,
    name: &str,
) -> Result<Result<String, ImageError>, ApiError> {
    let r = match ImageRef::parse(name) {
        Ok(r) => r,
        Err(e) => return Ok(Err(e)),
    };
    if r.is_host() {
        return Ok(Ok(name.to_string()));
    }
    let missing = || Ok(Err(ImageError::NotFound(name.to_string())));
    let own = scoped(&caller.tenant, &r).ok().map(|r| r.to_string());
    let plain = r.to_string();
    let (tenant, keys) = (caller.tenant.clone(), (own.clone(), plain.clone()));
    let (own_owner, plain_owner) =
        s.db.call(move |c| {
            let own = match &keys.0 {
                Some(own) => db::image_owner(c, own)?,
                None => None,
            };
            Ok((own, db::image_owner(c, &keys.1)?))
        })
        .await?;
    let others = |owner: &Option<String>| owner.as_ref().is_some_and(|t| *t != tenant);
    // The owner recorded for the caller's prefix is the caller (unless two tenants' hashes
    // met, when it is refused too).
    let own = own.filter(|_| !others(&own_owner));
    let plain_visible = !r.name.starts_with(&format!("{TENANTS}/")) && !others(&plain_owner);
    let data_dir = s.runtime.data_dir().to_path_buf();
    let (own_ref, plain_ref) = (own.as_deref().map(ImageRef::parse).transpose(), r.clone());
    // A server-wide image keeps the name as given (the sandbox's record shows it).
    let given = name.to_string();
    let found = blocking(
        move || -> Result<Option<(String, Option<String>)>, ImageError> {
            let store = Store::open(&data_dir)?;
            if let Ok(Some(own)) = own_ref {
                match store.get(&own) {
                    Ok(_) => return Ok(Some((own.to_string(), None))),
                    Err(ImageError::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            if !plain_visible {
                return Ok(None);
            }
            match store.get(&plain_ref) {
                // A snapshot made before owners were recorded: its sandbox's tenant owns it.
                Ok(record) => Ok(Some((
                    given,
                    record.source.strip_prefix("snapshot:").map(str::to_string),
                ))),
                Err(ImageError::NotFound(_)) => Ok(None),
                Err(e) => Err(e),
            }
        },
    )
    .await?;
    let (stored, made_from) = match found {
        Ok(Some(found)) => found,
        Ok(None) => return missing(),
        Err(e) => return Ok(Err(e)),
    };
    if let (Some(sandbox), None) = (made_from, &plain_owner) {
        let owner = s.db.call(move |c| db::sandbox_tenant(c, &sandbox)).await?;
        if others(&owner) {
            return missing();
        }
    }
    Ok(Ok(stored))
}

/// The image `name` resolved for a new sandbox of `caller` ([`resolve`], then
/// [`openrun_image::sandbox_image`]): its source names the image by its store name; errors
/// name it as given.
pub(crate) async fn sandbox_image(
    s: &Shared,
    caller: &Caller,
    name: &str,
) -> Result<Result<SandboxImage, ImageError>, ApiError> {
    let stored = match resolve(s, caller, name).await? {
        Ok(stored) => stored,
        Err(e) => return Ok(Err(e)),
    };
    let data_dir = s.runtime.data_dir().to_path_buf();
    let given = name.to_string();
    let lookup = move || {
        openrun_image::sandbox_image(&data_dir, &stored).map_err(|e| match e {
            ImageError::NotFound(_) => ImageError::NotFound(given),
            e => e,
        })
    };
    // The built-in image resolves without opening the store: no hop to the blocking pool.
    if ImageRef::parse(name).is_ok_and(|r| r.is_host()) {
        return Ok(lookup());
    }
    blocking(lookup).await
}

/// The caller's sandbox `id`, which must be running or paused.
async fn live(s: &Shared, caller: &Caller, id: &str) -> Result<SandboxRow, ApiError> {
    let row = find(s, caller, id).await?;
    if !matches!(row.state.as_str(), "running" | "paused") {
        return Err(ApiError::NotRunning(row.id));
    }
    Ok(row)
}

/// Snapshots the caller's sandbox `id` and records `sandbox.snapshot` (`POST .../snapshot`,
/// the first step of a fork, and MCP's `snapshot`).
pub(crate) async fn take_snapshot(
    s: &Shared,
    caller: &Caller,
    id: &str,
    name: Option<String>,
) -> Result<(SandboxRow, Snapshot), ApiError> {
    let _lock = crate::lifecycle::lock(id).await;
    let row = live(s, caller, id).await?;
    // The image goes under the caller's prefix; a name the caller can already use (its own,
    // or a server-wide image's) is taken.
    let given = match name {
        Some(name) => {
            let r = ImageRef::parse(&name).map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
            if r.is_host() {
                return Err(ApiError::InvalidArgument(
                    ImageError::InvalidName {
                        name: r.to_string(),
                        reason: "\"host\" is the built-in image".into(),
                    }
                    .to_string(),
                ));
            }
            let stored = scoped(&caller.tenant, &r)?;
            if resolve(s, caller, &name).await?.is_ok() {
                return Err(snapshot_error(SnapshotError::Exists(r.to_string())));
            }
            Some(stored)
        }
        None => None,
    };
    let sandbox = crate::lifecycle::open_paused(s, &row).await?;
    let data_dir = s.runtime.data_dir().to_path_buf();
    let scope = scope(&caller.tenant);
    let sandbox_id = row.id.clone();
    let mut snap = blocking(move || {
        let store = Store::open(&data_dir)?;
        let r = match given {
            Some(r) => r,
            None => default_name(&store, &scope, &sandbox_id)?,
        };
        snapshot::snapshot(&store, &sandbox, Some(&r.to_string()))
    })
    .await?
    .map_err(|e| match e {
        SnapshotError::Exists(stored) => {
            snapshot_error(SnapshotError::Exists(shown(&caller.tenant, &stored)))
        }
        e => snapshot_error(e),
    })?;
    let (stored, tenant) = (snap.image.clone(), caller.tenant.clone());
    s.db.call(move |c| db::set_image_owner(c, &stored, &tenant))
        .await?;
    snap.image = shown(&caller.tenant, &snap.image);
    let payload = serde_json::to_value(&snap)
        .map_err(|e| ApiError::internal("cannot encode the snapshot", e))?;
    record(s, caller, &row, "sandbox.snapshot", payload).await?;
    tracing::info!(
        id,
        image = snap.image,
        bytes = snap.bytes,
        paused_ms = snap.paused_ms,
        "sandbox snapshotted"
    );
    Ok((row, snap))
}

/// The first `snap-<id>-<n>` (n from 1) free under `scope` (and unprefixed, where snapshots
/// were made before owners were recorded).
fn default_name(store: &Store, scope: &str, id: &str) -> Result<ImageRef, SnapshotError> {
    let free = |r: &ImageRef| match store.get(r) {
        Err(ImageError::NotFound(_)) => Ok(true),
        Ok(_) => Ok(false),
        Err(e) => Err(e),
    };
    let mut n = 1u64;
    loop {
        let name = format!("snap-{id}-{n}");
        let r = ImageRef::parse(&format!("{scope}{name}"))?;
        if free(&r)? && free(&ImageRef::parse(&name)?)? {
            return Ok(r);
        }
        n += 1;
    }
}

/// `POST /v1/sandboxes/{id}/snapshot`: freezes the sandbox's writable layer into a new image
/// (the sandbox is paused for the copy and resumed; a paused one stays paused).
#[utoipa::path(post, operation_id = "snapshot_sandbox", path = "/v1/sandboxes/{id}/snapshot", tag = "images",
    params(("id" = String, Path, description = "Sandbox id")), request_body = SnapshotBody,
    responses((status = 201, description = "The new image", body = SnapshotSchema), ErrorAnswers))]
pub async fn snapshot(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<SnapshotBody>,
) -> Result<(StatusCode, Json<Snapshot>), ApiError> {
    let (_, snap) = take_snapshot(&s, &caller, &id, body.name).await?;
    Ok((StatusCode::CREATED, Json(snap)))
}

/// The create body of each fork: the caller's options over the parent's limits and
/// environment, on the snapshot image.
fn fork_create_body(
    parent: &SandboxRow,
    mut options: serde_json::Map<String, Value>,
    image: &str,
) -> Result<Value, ApiError> {
    for refused in ["image", "rootfs"] {
        if options.contains_key(refused) {
            return Err(ApiError::InvalidArgument(format!(
                "a fork runs the snapshot of its sandbox: \"{refused}\" cannot be given"
            )));
        }
    }
    let limits: Limits = serde_json::from_str(&parent.limits_json)
        .map_err(|e| ApiError::internal("a stored sandbox record is corrupt", e))?;
    let mut body = serde_json::Map::new();
    if let Some(bytes) = limits.memory_bytes {
        body.insert("memory".into(), json!(bytes.to_string()));
    }
    if let Some(m) = limits.cpu_millis {
        body.insert(
            "cpus".into(),
            json!(format!("{}.{:03}", m / 1000, m % 1000)),
        );
    }
    if let Some(pids) = limits.pids {
        body.insert("pids".into(), json!(pids));
    }
    if let Some(bytes) = limits.disk_bytes {
        body.insert("disk".into(), json!(bytes.to_string()));
    }
    if let Some(n) = limits.open_files {
        body.insert("open_files".into(), json!(n));
    }
    if !parent.env.is_empty() {
        body.insert("env".into(), json!(parent.env));
    }
    body.append(&mut options);
    body.insert("image".into(), json!(image));
    Ok(Value::Object(body))
}

/// `POST /v1/sandboxes/{id}/fork`: a snapshot of the sandbox, then `count` sandboxes
/// created from it at once (within the server's create slots). Limits and environment not
/// given are the sandbox's.
#[utoipa::path(post, operation_id = "fork_sandbox", path = "/v1/sandboxes/{id}/fork", tag = "images",
    params(("id" = String, Path, description = "Sandbox id")), request_body = ForkBody,
    responses((status = 201, description = "The forks", body = Vec<SandboxResource>), ErrorAnswers))]
pub async fn fork(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<serde_json::Map<String, Value>>,
) -> Result<(StatusCode, Json<Vec<SandboxResource>>), ApiError> {
    let made = fork_sandbox(&s, &caller, &id, body).await?;
    Ok((StatusCode::CREATED, Json(made)))
}

/// Forks the caller's sandbox `id` (`POST .../fork` and MCP's `fork`): `options` is the body
/// of a fork, `count` (1 to [`MAX_FORKS`]), `name` of the snapshot and create options but
/// `image` and `rootfs`. Everything is checked before the snapshot; then the snapshot, then
/// `count` sandboxes at once (within the create slots). If one create fails, the forks made
/// are removed and the fork fails.
pub(crate) async fn fork_sandbox(
    s: &Shared,
    caller: &Caller,
    id: &str,
    mut options: serde_json::Map<String, Value>,
) -> Result<Vec<SandboxResource>, ApiError> {
    let count = match options.remove("count") {
        Some(Value::Number(n)) => n.as_u64().filter(|n| (1..=MAX_FORKS).contains(n)),
        Some(_) => None,
        None => {
            return Err(ApiError::InvalidArgument(format!(
                "\"count\" is required: the number of forks, 1 to {MAX_FORKS}"
            )))
        }
    }
    .ok_or_else(|| {
        ApiError::InvalidArgument(format!("\"count\" must be a number from 1 to {MAX_FORKS}"))
    })?;
    let name = match options.remove("name") {
        None | Some(Value::Null) => None,
        Some(Value::String(n)) => Some(n),
        Some(_) => {
            return Err(ApiError::InvalidArgument(
                "\"name\" must be a string (name[:tag])".into(),
            ))
        }
    };
    // Everything is checked before the snapshot: a bad option makes nothing.
    let parent = live(s, caller, id).await?;
    let probe = fork_create_body(&parent, options.clone(), "host")?;
    crate::api::spec_from(
        serde_json::from_value(probe)
            .map_err(|e| ApiError::InvalidArgument(format!("invalid request body: {e}")))?,
    )?;
    crate::egress::routes::create_policy(s, options.get("network").cloned())?;
    let (s, caller, id) = (s.clone(), caller.clone(), id.to_string());
    // Its own task: a fork goes on when its client leaves (as a create does), so no sandbox
    // is left `creating`.
    let task = tokio::spawn(async move {
        let (parent, snap) = take_snapshot(&s, &caller, &id, name).await?;
        let body = fork_create_body(&parent, options, &snap.image)?;
        let creates = (0..count).map(|_| {
            let (s, caller, body) = (s.clone(), caller.clone(), body.clone());
            async move {
                let _slot = s.admission.slot().await?;
                let started = std::time::Instant::now();
                let body = serde_json::from_value(body)
                    .map_err(|e| ApiError::InvalidArgument(format!("invalid request body: {e}")))?;
                let made = crate::api::create_sandbox(&s, &caller, body).await;
                if made.is_ok() {
                    s.metrics.observe_create(started.elapsed());
                }
                made
            }
        });
        let results = futures_util::future::join_all(creates).await;
        let mut made = Vec::new();
        let mut failure = None;
        for result in results {
            match result {
                Ok(resource) => made.push(resource),
                Err(e) => failure = failure.or(Some(e)),
            }
        }
        if let Some(e) = failure {
            for resource in made {
                if let Ok(row) = find(&s, &caller, resource.id()).await {
                    if let Err(e) = crate::api::remove(&s, &caller, row).await {
                        tracing::warn!(error = %e, "cannot remove a fork of a failed fork");
                    }
                }
            }
            return Err(e);
        }
        let ids: Vec<&str> = made.iter().map(SandboxResource::id).collect();
        record(
            &s,
            &caller,
            &parent,
            "sandbox.fork",
            json!({ "image": snap.image, "count": count, "sandboxes": ids }),
        )
        .await?;
        Ok(made)
    });
    task.await
        .map_err(|e| ApiError::internal("a fork failed", e))?
}

/// `GET /v1/sandboxes/{id}/diff[?path=P][&against=IMAGE]`: files added, modified and deleted
/// in the sandbox against its image (its writable layer), or against the image `against`
/// (e.g. a snapshot), with a unified diff of the text files.
#[utoipa::path(get, operation_id = "diff_sandbox", path = "/v1/sandboxes/{id}/diff", tag = "images",
    params(
        ("id" = String, Path, description = "Sandbox id"),
        ("path" = Option<String>, Query, description = "Only this absolute path (a file, or a directory and what is below it)"),
        ("against" = Option<String>, Query, description = "Compare with this image (name[:tag]) instead of the sandbox's own"),
    ),
    responses((status = 200, description = "The changes and the patch", body = DiffSchema), ErrorAnswers))]
pub async fn diff(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    query: crate::query::Query,
) -> Result<Json<DiffReport>, ApiError> {
    query.only(&["path", "against"])?;
    let report = diff_sandbox(
        &s,
        &caller,
        &id,
        query.string("path"),
        query.string("against"),
    )
    .await?;
    Ok(Json(report))
}

/// What changed in the caller's sandbox `id` (`GET .../diff` and MCP's `diff`): against its
/// image (its writable layer), or against the image `against`; only below `path` if given.
pub(crate) async fn diff_sandbox(
    s: &Shared,
    caller: &Caller,
    id: &str,
    path: Option<String>,
    against: Option<String>,
) -> Result<DiffReport, ApiError> {
    let row = live(s, caller, id).await?;
    // Another tenant's image is as missing as a name nobody has.
    let against = match against {
        Some(name) => Some(
            resolve(s, caller, &name)
                .await?
                .map_err(|e| ApiError::InvalidArgument(e.to_string()))?,
        ),
        None => None,
    };
    let sandbox = crate::lifecycle::open_paused(s, &row).await?;
    let data_dir = s.runtime.data_dir().to_path_buf();
    let scope = scope(&caller.tenant);
    blocking(move || {
        let store = match &against {
            Some(_) => Some(Store::open(&data_dir)?),
            None => None,
        };
        let options = DiffOptions {
            path,
            ..DiffOptions::default()
        };
        snapshot::diff_sandbox(store.as_ref(), &sandbox, against.as_deref(), &options)
    })
    .await?
    .map_err(|e| match e {
        // The caller's images by the names it knows them by.
        e if e.is_user_error() => ApiError::InvalidArgument(e.to_string().replace(&scope, "")),
        e => ApiError::internal("cannot compare the sandbox with its image", e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parent() -> SandboxRow {
        SandboxRow {
            id: "abc".into(),
            tenant: "t".into(),
            owner: "o".into(),
            image: "img".into(),
            limits_json: r#"{"memory_bytes":1048576,"cpu_millis":1500,"pids":64}"#.into(),
            labels: Default::default(),
            env: [("A".to_string(), "1".to_string())].into(),
            state: "running".into(),
            created_at: 0,
            expires_at: None,
        }
    }

    #[test]
    fn tenants_images_are_stored_under_their_own_prefix() {
        let r = ImageRef::parse("dev-env").unwrap();
        let a = scoped("tenant-a", &r).unwrap().to_string();
        let b = scoped("tenant-b", &r).unwrap().to_string();
        assert_ne!(a, b);
        assert!(
            a.starts_with("tenants/") && a.ends_with("/dev-env:latest"),
            "{a}"
        );
        assert_eq!(scope("tenant-a").len(), "tenants/".len() + 17);
        assert_eq!(shown("tenant-a", &a), "dev-env:latest");
        // Another tenant's store name is not shortened for this one.
        assert_eq!(shown("tenant-b", &a), a);
        // A name too long once prefixed is refused, naming the most a tenant may use.
        let long = ImageRef::parse(&"a".repeat(MAX_NAME)).unwrap();
        let Err(ApiError::InvalidArgument(message)) = scoped("t", &long) else {
            panic!("a long name was accepted")
        };
        assert!(message.contains("103 characters"), "{message}");
    }

    #[test]
    fn forks_take_the_parents_limits_and_env_unless_given() {
        let options = json!({"memory": "2M", "labels": {"k": "v"}});
        let Value::Object(options) = options else {
            unreachable!()
        };
        let body = fork_create_body(&parent(), options, "snap-abc-1").unwrap();
        assert_eq!(
            body,
            json!({"memory": "2M", "cpus": "1.500", "pids": 64, "env": {"A": "1"},
                   "labels": {"k": "v"}, "image": "snap-abc-1"})
        );
        let Value::Object(bad) = json!({"image": "other"}) else {
            unreachable!()
        };
        assert!(matches!(
            fork_create_body(&parent(), bad, "x"),
            Err(ApiError::InvalidArgument(_))
        ));
    }
}
