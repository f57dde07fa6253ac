//! `POST /v1/up` and the recipes' endpoints: adapters over [`super::open_repo`] and
//! [`super::recipes`].
//!
//! | method and path | answer |
//! |---|---|
//! | `POST /v1/up` (JSON `{"git", ...}`, or a tar with options in the query) | 200 NDJSON: `plan`, `step`, `output` lines, then one `result` or `error` line |
//! | `GET /v1/recipes` | the caller's recipes |
//! | `DELETE /v1/recipes/{key}` | 204: the row, its files and its image removed |
//!
//! A request that cannot start (a bad option, a URL that is refused, a tar too large) is a
//! 4xx JSON error before any line is streamed. Once streaming, the open runs in a task of its
//! own that owns the cleanup: a client that leaves stops it (the running command is killed),
//! and the sandbox is removed (kept with `keep`).

use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use openrun_recipe::error::TreeError;
use openrun_recipe::tree::TarTree;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::recipes::{self, RecipeInfo};
use super::source::{self, TempFile};
use super::{open_repo, Progress, Source, UpError, UpEvent, UpRequest, UpResult};
use crate::api::{Caller, Shared, MAX_BODY};
use crate::error::ApiError;
use crate::openapi::ErrorAnswers;
use crate::query::Query;

/// Largest repository tar accepted.
pub(crate) const MAX_TAR: u64 = 256 << 20;
/// Longest repository identity accepted.
const MAX_REPO: usize = 1024;
/// Longest check command accepted.
const MAX_CHECK: usize = 64 << 10;
/// Longest repository name accepted.
const MAX_NAME: usize = 100;
/// Progress lines held for a slow client before the open waits for it.
const BACKLOG: usize = 64;

/// The up routes (their own body limit: a tar is up to [`MAX_TAR`]).
pub(crate) fn routes() -> OpenApiRouter<Shared> {
    OpenApiRouter::new()
        .routes(routes!(up))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .routes(routes!(list))
        .routes(routes!(delete))
}

/// Body of `POST /v1/up` with `Content-Type: application/json`; also the parameters of
/// MCP's `up` (one set of fields and descriptions for both adapters).
#[derive(Debug, Default, serde::Deserialize, utoipa::ToSchema, rmcp::schemars::JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub(crate) struct UpBody {
    /// The repository: an `https://` or `http://` git URL (cloned through the egress proxy).
    pub(crate) git: String,
    /// Branch or tag to clone (default: the remote's default branch).
    #[serde(rename = "ref")]
    pub(crate) reference: Option<String>,
    /// The readiness check, a shell command run in the workspace (default: the project's test
    /// suite, when one was found).
    pub(crate) check: Option<String>,
    /// Run no readiness check.
    #[serde(default)]
    pub(crate) no_check: bool,
    /// Only show the plan (what would be installed and run); no sandbox is made.
    #[serde(default)]
    pub(crate) plan_only: bool,
    /// On a failure keep the sandbox (rolled back to before the failed step) to look into
    /// it; its id is in the error.
    #[serde(default)]
    pub(crate) keep: bool,
    /// The sandbox's lifetime, e.g. `2h` (default `1h`).
    pub(crate) ttl: Option<String>,
    /// The repository's name (default: the URL's last part): the workspace is
    /// `/workspaces/<name>`.
    pub(crate) name: Option<String>,
}

/// Checks a repository name: 1 to 100 characters from `A-Za-z0-9._-`, not starting with `.`
/// (it is a directory name: `/workspaces/<name>`).
pub(crate) fn check_name(name: &str) -> Result<(), ApiError> {
    let ok = (1..=MAX_NAME).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::InvalidArgument(format!(
            "invalid repository name {name:?}: expected 1 to {MAX_NAME} characters from \
             A-Za-z0-9._- not starting with '.'"
        )))
    }
}

/// Checks the options every form shares and makes the request.
pub(crate) fn request_of(
    name: String,
    repo: String,
    check: Option<String>,
    no_check: bool,
    plan_only: bool,
    keep: bool,
    ttl: Option<String>,
) -> Result<UpRequest, ApiError> {
    check_name(&name)?;
    if repo.is_empty() || repo.len() > MAX_REPO || repo.chars().any(char::is_control) {
        return Err(ApiError::InvalidArgument(format!(
            "invalid repository identity: expected 1 to {MAX_REPO} bytes without control \
             characters"
        )));
    }
    if let Some(check) = &check {
        if no_check {
            return Err(ApiError::InvalidArgument(
                "give either check or no_check, not both".into(),
            ));
        }
        if check.trim().is_empty() || check.len() > MAX_CHECK || check.contains('\0') {
            return Err(ApiError::InvalidArgument(format!(
                "invalid check: expected a shell command of 1 to {MAX_CHECK} bytes without NUL"
            )));
        }
    }
    if let Some(ttl) = &ttl {
        let valid = openrun_runtime::limits::parse_duration(ttl)
            .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        if valid.is_zero() {
            return Err(ApiError::InvalidArgument(format!(
                "invalid ttl {ttl:?}: must be more than 0"
            )));
        }
    }
    Ok(UpRequest {
        name,
        repo,
        check,
        no_check,
        plan_only,
        keep,
        ttl,
    })
}

/// The request and source of a JSON body (REST's, or MCP `up`'s parameters).
pub(crate) fn from_json(body: UpBody) -> Result<(UpRequest, Source), ApiError> {
    let git = source::parse_git_url(&body.git, body.reference.as_deref())?;
    let name = body.name.unwrap_or_else(|| git.name.clone());
    let repo = match &git.reference {
        Some(r) => format!("git:{}#{r}", git.url),
        None => format!("git:{}", git.url),
    };
    let request = request_of(
        name,
        repo,
        body.check,
        body.no_check,
        body.plan_only,
        body.keep,
        body.ttl,
    )?;
    Ok((request, Source::Git(git)))
}

/// The request of a tar upload's query string.
fn from_query(query: &Query) -> Result<UpRequest, ApiError> {
    query.only(&[
        "name",
        "repo",
        "check",
        "no_check",
        "plan_only",
        "keep",
        "ttl",
    ])?;
    let name = query.string("name").ok_or_else(|| {
        ApiError::InvalidArgument(
            "query parameter \"name\" is required with a tar body (the repository's name)".into(),
        )
    })?;
    let repo = query
        .string("repo")
        .unwrap_or_else(|| format!("upload:{name}"));
    request_of(
        name,
        repo,
        query.string("check"),
        query.flag("no_check")?,
        query.flag("plan_only")?,
        query.flag("keep")?,
        query.string("ttl"),
    )
}

/// The media type of a request, lowercase, without parameters.
fn media_type(req: &Request) -> Option<String> {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
}

/// The last line of the stream.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum Last {
    /// The open succeeded (a failed check included).
    Result {
        /// What it made.
        result: Box<UpResult>,
    },
    /// It failed.
    Error(UpError),
}

impl From<Result<UpResult, UpError>> for Last {
    fn from(r: Result<UpResult, UpError>) -> Self {
        match r {
            Ok(result) => Last::Result {
                result: Box::new(result),
            },
            Err(e) => Last::Error(e),
        }
    }
}

/// One NDJSON line.
pub(crate) fn ndjson<T: Serialize>(value: &T) -> Bytes {
    let mut line = serde_json::to_vec(value).unwrap_or_else(|e| {
        tracing::error!(error = %e, "cannot encode an up line");
        br#"{"type":"error","code":"internal","message":"cannot encode a progress line"}"#.to_vec()
    });
    line.push(b'\n');
    Bytes::from(line)
}

/// An open running in a task of its own: its progress and its end.
pub(crate) struct Running {
    /// Progress (ends when the open does).
    pub events: mpsc::Receiver<UpEvent>,
    /// The open's end.
    pub done: oneshot::Receiver<Result<UpResult, UpError>>,
}

impl Running {
    /// The end, after the progress was read to its end.
    pub(crate) async fn finish(self) -> Result<UpResult, UpError> {
        drop(self.events);
        Self::end(self.done).await
    }

    async fn end(done: oneshot::Receiver<Result<UpResult, UpError>>) -> Result<UpResult, UpError> {
        match done.await {
            Ok(result) => result,
            Err(_) => Err(UpError::new(
                "internal",
                "the up ended without a result (see the server's log)",
            )),
        }
    }
}

/// Starts [`open_repo`] in a task that owns it and its cleanup: dropping the events'
/// receiver is the client leaving (the open stops; a running command is killed).
pub(crate) fn spawn_open(
    s: &Shared,
    caller: &Caller,
    request: UpRequest,
    source: Source,
) -> Running {
    let (tx, events) = mpsc::channel(BACKLOG);
    let (done_tx, done) = oneshot::channel();
    let (s, caller) = (s.clone(), caller.clone());
    tokio::spawn(async move {
        let result = open_repo(&s, &caller, request, source, Progress::new(tx)).await;
        match &result {
            Ok(r) => tracing::info!(sandbox = ?r.sandbox_id, cached = r.cached, "up finished"),
            Err(e) => tracing::info!(code = e.code, step = ?e.step, "up failed"),
        }
        let _ = done_tx.send(result);
    });
    Running { events, done }
}

/// The NDJSON body of a running open: its events, then the `result` or `error` line.
fn stream(running: Running) -> Body {
    type Done = oneshot::Receiver<Result<UpResult, UpError>>;
    let state: (Option<mpsc::Receiver<UpEvent>>, Option<Done>) =
        (Some(running.events), Some(running.done));
    let lines = futures_util::stream::unfold(state, |(mut events, mut done)| async move {
        if let Some(rx) = events.as_mut() {
            if let Some(event) = rx.recv().await {
                return Some((
                    Ok::<_, std::convert::Infallible>(ndjson(&event)),
                    (events, done),
                ));
            }
            events = None;
        }
        let last = Last::from(Running::end(done.take()?).await);
        Some((Ok(ndjson(&last)), (events, done)))
    });
    Body::from_stream(lines)
}

/// `POST /v1/up`: a repository (a git URL, or a tar of it) to a ready sandbox.
#[utoipa::path(post, operation_id = "up", path = "/v1/up", tag = "up",
    params(
        ("name" = Option<String>, Query, description = "Tar form: the repository's name (required), naming /workspaces/<name>"),
        ("repo" = Option<String>, Query, description = "Tar form: the repository's identity, part of the recipe key (the CLI sends local:<host>:<path>)"),
        ("check" = Option<String>, Query, description = "Tar form: the readiness check, a shell command"),
        ("no_check" = Option<bool>, Query, description = "Tar form: no readiness check"),
        ("plan_only" = Option<bool>, Query, description = "Tar form: only the plan"),
        ("keep" = Option<bool>, Query, description = "Tar form: keep the sandbox on a failure"),
        ("ttl" = Option<String>, Query, description = "Tar form: the sandbox's lifetime (default 1h)"),
    ),
    request_body(content(
        (UpBody = "application/json"),
        (Vec<u8> = "application/x-tar"),
    ), description = "A git URL with options (JSON), or the repository as a tar (up to 256 MiB) with the options in the query"),
    responses((status = 200, description = "NDJSON lines: {\"type\":\"plan\"}, {\"type\":\"step\"}, {\"type\":\"output\"} (base64), then {\"type\":\"result\",\"result\":{...}} or {\"type\":\"error\",\"code\",\"message\",\"step\"?,\"file\"?,\"command\"?,\"sandbox_id\"?}",
        content_type = "application/x-ndjson", body = String),
        (status = 415, description = "Neither application/json nor application/x-tar", body = crate::openapi::ErrorBody),
        ErrorAnswers))]
async fn up(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    req: Request,
) -> Result<Response, ApiError> {
    let (request, source) = match media_type(&req).as_deref() {
        Some("application/json") => {
            let bytes = axum::body::to_bytes(req.into_body(), MAX_BODY)
                .await
                .map_err(|e| {
                    if e.to_string().contains("length limit") {
                        ApiError::TooLarge { limit: MAX_BODY }
                    } else {
                        ApiError::InvalidArgument(format!("cannot read the request body: {e}"))
                    }
                })?;
            let body: UpBody = serde_json::from_slice(&bytes)
                .map_err(|e| ApiError::InvalidArgument(format!("invalid request body: {e}")))?;
            from_json(body)?
        }
        Some("application/x-tar") => {
            let query = Query::parse(req.uri().query().unwrap_or(""))?;
            let request = from_query(&query)?;
            let file = TempFile::new(&s, ".tar")?;
            source::receive_upload(req.into_body(), file.path(), MAX_TAR).await?;
            let tree = index(&file).await?;
            (request, Source::Upload(file, tree))
        }
        other => {
            let given = other.map_or("none".to_string(), |t| format!("{t:?}"));
            return Ok(unsupported(&given));
        }
    };
    let running = spawn_open(&s, &caller, request, source);
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        stream(running),
    )
        .into_response())
}

/// The uploaded tar indexed: one that is not a valid tar is a 400 before anything streams.
async fn index(file: &TempFile) -> Result<TarTree, ApiError> {
    let path = file.path().to_path_buf();
    crate::api::blocking(move || TarTree::open(&path))
        .await?
        .map_err(|e| match e {
            TreeError::BadArchive(_) => ApiError::InvalidArgument(e.to_string()),
            e => ApiError::internal("cannot read the uploaded tar", e),
        })
}

/// 415 for a body that is neither form.
fn unsupported(given: &str) -> Response {
    let body = serde_json::json!({
        "code": "unsupported_media_type",
        "message": format!(
            "POST /v1/up takes Content-Type application/json ({{\"git\": URL, ...}}) or \
             application/x-tar (the repository, options in the query string); got {given}"
        ),
    });
    let mut response = (StatusCode::UNSUPPORTED_MEDIA_TYPE, Json(body)).into_response();
    // The body was not read.
    response.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    response
}

/// `GET /v1/recipes`: the caller's recipes, most recently used first.
#[utoipa::path(get, operation_id = "list_recipes", path = "/v1/recipes", tag = "up",
    responses((status = 200, description = "The caller's recipes", body = Vec<RecipeInfo>), ErrorAnswers))]
async fn list(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<RecipeInfo>>, ApiError> {
    let tenant = caller.tenant.clone();
    let rows = s.db.call(move |c| recipes::list(c, &tenant)).await?;
    Ok(Json(rows.iter().map(RecipeInfo::from).collect()))
}

/// `DELETE /v1/recipes/{key}`: forgets a recipe (its row, files and snapshot image); the
/// next open of that repository sets up again.
#[utoipa::path(delete, operation_id = "delete_recipe", path = "/v1/recipes/{key}", tag = "up",
    params(("key" = String, Path, description = "The recipe's key")),
    responses((status = 204, description = "Deleted"), ErrorAnswers))]
async fn delete(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(key): Path<String>,
) -> Result<StatusCode, ApiError> {
    recipes::delete_recipe(&s, &caller, &key).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_line_is_a_result_or_an_error() {
        let mut e = UpError::new("step_failed", "step install failed").at_step("install");
        e.file = Some("package.json".into());
        let line = ndjson(&Last::from(Err::<UpResult, _>(e)));
        assert!(line.ends_with(b"\n"));
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type": "error", "code": "step_failed",
                "message": "step install failed", "step": "install", "file": "package.json"})
        );
        let event = UpEvent::Step {
            step: "check".into(),
            command: Some("make test".into()),
            status: super::super::StepStatus::RolledBack,
            duration_ms: None,
            exit_code: Some(2),
        };
        let v: serde_json::Value = serde_json::from_slice(&ndjson(&event)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type": "step", "step": "check", "command": "make test",
                "status": "rolled_back", "exit_code": 2})
        );
        let line = ndjson(&UpEvent::Output {
            step: "install".into(),
            stream: "stderr",
            data_b64: "aGk=".into(),
        });
        assert_eq!(
            std::str::from_utf8(&line).unwrap(),
            "{\"type\":\"output\",\"step\":\"install\",\"stream\":\"stderr\",\"data_b64\":\"aGk=\"}\n"
        );
    }

    #[test]
    fn options_are_checked_before_anything_runs() {
        let ok = |name: &str| request_of(name.into(), "r".into(), None, false, false, false, None);
        assert!(ok("my-app_1.2").is_ok());
        for bad in ["", ".", "..", ".hidden", "a/b", "a b", &"x".repeat(101)] {
            assert!(ok(bad).is_err(), "{bad:?} accepted");
        }
        let both = request_of(
            "a".into(),
            "r".into(),
            Some("true".into()),
            true,
            false,
            false,
            None,
        );
        assert!(both.is_err());
        let ttl = request_of(
            "a".into(),
            "r".into(),
            None,
            false,
            false,
            false,
            Some("0s".into()),
        );
        assert!(ttl.is_err());
        let ttl = request_of(
            "a".into(),
            "r".into(),
            None,
            false,
            false,
            false,
            Some("2h".into()),
        );
        assert_eq!(ttl.unwrap().ttl.as_deref(), Some("2h"));
        assert!(request_of("a".into(), "\n".into(), None, false, false, false, None).is_err());
    }

    #[test]
    fn the_tar_form_reads_its_options_from_the_query() {
        let q = Query::parse("name=app&repo=local%3Ah%3A%2Fsrc%2Fapp&check=make+test&keep=true")
            .unwrap();
        let r = from_query(&q).unwrap();
        assert_eq!(r.name, "app");
        assert_eq!(r.repo, "local:h:/src/app");
        assert_eq!(r.check.as_deref(), Some("make test"));
        assert!(r.keep && !r.no_check && !r.plan_only);
        let q = Query::parse("name=app").unwrap();
        assert_eq!(from_query(&q).unwrap().repo, "upload:app");
        assert!(from_query(&Query::parse("repo=x").unwrap()).is_err());
        assert!(from_query(&Query::parse("name=a&bogus=1").unwrap()).is_err());
    }

    #[test]
    fn the_json_form_names_the_repository_after_its_url() {
        let body: UpBody = serde_json::from_str(
            r#"{"git":"https://example.com/org/tool.git","ref":"v1","plan_only":true}"#,
        )
        .unwrap();
        let (r, source) = from_json(body).unwrap();
        assert_eq!(r.name, "tool");
        assert_eq!(r.repo, "git:https://example.com/org/tool.git#v1");
        assert!(r.plan_only);
        assert!(matches!(source, Source::Git(_)));
        let body: UpBody = serde_json::from_str(r#"{"git":"file:///etc"}"#).unwrap();
        assert!(from_json(body).is_err());
        assert!(serde_json::from_str::<UpBody>(r#"{"git":"x","bogus":1}"#).is_err());
    }
}
