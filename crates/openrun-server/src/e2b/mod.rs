//! The E2B-compatible surface: the official `e2b` and `e2b-code-interpreter` Python SDKs work
//! unmodified against `openrun serve` (`E2B_API_URL` and `E2B_SANDBOX_URL` set to the server's
//! URL, `E2B_API_KEY` to an openrun key). Fact sheet: `shared/protocols/e2b.md`.
//!
//! Every handler here is a thin adapter over the same core calls as `/v1` (sandboxes in
//! [`crate::api`], files in [`crate::files`], processes in [`crate::processes`] and
//! [`crate::exec`]): only the wire format is E2B's.
//!
//! | module | what |
//! |---|---|
//! | [`rest`] | the control plane: `/v2/sandboxes`, `/sandboxes/{id}...` (`X-API-KEY`) |
//! | [`envd_http`] | envd's plain HTTP: `/health`, `/files` |
//! | [`connect`] | the Connect protocol (JSON codec): unary calls, enveloped streams, errors |
//! | [`process`] | `process.Process/*` |
//! | [`filesystem`] | `filesystem.Filesystem/*` but watchers |
//! | [`watch`] | `filesystem.Filesystem/{CreateWatcher,GetWatcherEvents,RemoveWatcher,WatchDir}` |
//! | [`interpreter`] | the code interpreter (port 49999): `/execute`, `/contexts` |
//!
//! **Sandbox traffic.** A request is sandbox traffic when it carries `E2b-Sandbox-Id` (the
//! SDK's `E2B_SANDBOX_URL` sends every sandbox and port to one URL), or, on a server with a
//! preview domain, when its Host is `49983-<id>.<domain>` or `49999-<id>.<domain>`.
//! [`sandbox_traffic`] checks its access token (per-sandbox HMAC tokens handed out by create
//! and connect: `X-Access-Token` for envd, also `E2B-Traffic-Access-Token` for the
//! interpreter), finds the sandbox whoever its tenant (a token names exactly one sandbox),
//! and runs the sandbox routes on behalf of its owner ([`SandboxCtx`]). A sandbox that does
//! not run (killed, expired, unknown, another tenant's, or paused) answers 502 with a message
//! containing "was not found": the SDK turns that into `SandboxNotRunningException` and
//! `is_running() == False`.
//!
//! **Errors.** E2B's clients want `{"code": <HTTP status>, "message": "..."}`;
//! [`e2b_errors`] rewrites this server's `{"code": "<name>", ...}` error answers into that
//! shape (keeping the name as `error_code`). The Connect routes keep Connect's own error
//! shape and do not use it.

mod connect;
mod envd_http;
mod filesystem;
mod interpreter;
mod process;
mod rest;
mod watch;

use std::sync::OnceLock;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use base64::Engine;
use tower::ServiceExt;

use crate::api::{AppState, Caller, Shared};
use crate::error::ApiError;

/// The envd version this server reports (`envdVersion`): the SDK gates features on it
/// (fact sheet §5.5).
pub(crate) const ENVD_VERSION: &str = "0.5.7";

/// Port of envd in E2B's sandboxes (`E2b-Sandbox-Port`).
pub(crate) const ENVD_PORT: u16 = 49983;

/// Port of the code interpreter in E2B's sandboxes.
pub(crate) const INTERPRETER_PORT: u16 = 49999;

/// Label of the envd access token (`envdAccessToken`, sent back as `X-Access-Token`).
const ENVD_TOKEN: &str = "e2b-envd";
/// Label of the traffic access token (`trafficAccessToken`, `E2B-Traffic-Access-Token`).
const TRAFFIC_TOKEN: &str = "e2b-traffic";
/// Header naming the sandbox of a request.
const SANDBOX_ID_HEADER: &str = "e2b-sandbox-id";
/// Header naming the port of a request.
const SANDBOX_PORT_HEADER: &str = "e2b-sandbox-port";
/// Header of the envd access token.
const ACCESS_TOKEN_HEADER: &str = "x-access-token";
/// Header of the traffic access token.
const TRAFFIC_TOKEN_HEADER: &str = "e2b-traffic-access-token";

/// What a request of sandbox traffic is about, put in its extensions by [`sandbox_traffic`]
/// once its access token was checked.
#[derive(Debug, Clone)]
pub(crate) struct SandboxCtx {
    /// The owner of the sandbox: the calls below are made on its behalf.
    pub caller: Caller,
    /// The sandbox.
    pub sandbox_id: String,
    /// `E2b-Sandbox-Port`: [`ENVD_PORT`] or [`INTERPRETER_PORT`].
    pub port: u16,
    /// Run-as user from `Authorization: Basic base64("<user>:")`; `None`: the image's.
    pub user: Option<String>,
}

/// The envd access token of sandbox `id` (create and connect return it as
/// `envdAccessToken`).
pub(crate) fn envd_access_token(s: &AppState, id: &str) -> String {
    s.previews.sandbox_token(ENVD_TOKEN, id)
}

/// The traffic access token of sandbox `id` (`trafficAccessToken`).
pub(crate) fn traffic_access_token(s: &AppState, id: &str) -> String {
    s.previews.sandbox_token(TRAFFIC_TOKEN, id)
}

/// The control-plane routes (`X-API-KEY`).
pub(crate) fn api_routes(state: Shared) -> Router<Shared> {
    rest::routes(state)
}

/// Largest request body of the sandbox routes but `POST /files` (which streams its body and
/// counts it against its own limit): a Connect message and its envelope prefix.
const MAX_TRAFFIC_BODY: usize = connect::MAX_MESSAGE + 64;

/// The routes of sandbox traffic (envd and the interpreter), behind [`sandbox_traffic`];
/// made once (they hold no state). Each request is counted and logged by
/// [`crate::metrics::observe`] under its route, like the API's, and has an explicit body
/// limit ([`MAX_TRAFFIC_BODY`]).
fn sandbox_routes() -> Router<Shared> {
    static ROUTES: OnceLock<Router<Shared>> = OnceLock::new();
    ROUTES
        .get_or_init(|| {
            envd_http::routes()
                .merge(process::routes())
                .merge(filesystem::routes())
                .merge(watch::routes())
                .merge(interpreter::routes())
                .fallback(no_endpoint)
                .layer(DefaultBodyLimit::max(MAX_TRAFFIC_BODY))
                .layer(axum::middleware::from_fn(tag_owner))
                .layer(axum::middleware::from_fn(observe))
        })
        .clone()
}

/// The metrics of the server a request of sandbox traffic came to (put in its extensions by
/// [`dispatch`]: the sandbox routes are made once, without a server's state).
#[derive(Clone)]
struct TrafficMetrics(std::sync::Arc<crate::metrics::Metrics>);

/// Middleware of the sandbox routes: [`crate::metrics::observe`] with the request's server's
/// metrics.
async fn observe(req: Request, next: Next) -> Response {
    match req.extensions().get::<TrafficMetrics>().cloned() {
        Some(TrafficMetrics(metrics)) => crate::metrics::observe(State(metrics), req, next).await,
        None => next.run(req).await,
    }
}

/// Middleware of the sandbox routes, inside [`observe`]: names the sandbox's owner in the
/// response, for the request log (as [`crate::metrics::tag_caller`] does for the API).
async fn tag_owner(req: Request, next: Next) -> Response {
    let caller = req
        .extensions()
        .get::<SandboxCtx>()
        .map(|c| c.caller.clone());
    let mut response = next.run(req).await;
    if let Some(caller) = caller {
        response.extensions_mut().insert(caller);
    }
    response
}

/// Answer of a path no sandbox route serves.
async fn no_endpoint(req: Request) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("no such endpoint: {} {}", req.method(), req.uri().path()),
    )
}

/// An error answer in E2B's shape: `{"code": <status>, "message": ...}`.
pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = serde_json::json!({ "code": status.as_u16(), "message": message.into() });
    (status, axum::Json(body)).into_response()
}

/// The answer of E2B's proxy for a sandbox that does not run: 502 with "was not found" in
/// the message (the SDK's `SandboxNotRunningException`, `is_running() == False`), and
/// `Should-Retry: false` (the SDK would otherwise retry a 502).
pub(crate) fn not_running(id: &str, why: &str) -> Response {
    let mut response = error(
        StatusCode::BAD_GATEWAY,
        format!("The sandbox {id} was not found{why}"),
    );
    response
        .headers_mut()
        .insert("should-retry", HeaderValue::from_static("false"));
    response
}

/// Maps an error of a core call made for sandbox traffic: the sandbox having gone away
/// meanwhile (404 from the sandbox lookup, 409 not running or paused) is E2B's 502
/// [`not_running`]; anything else keeps its status.
pub(crate) fn sandbox_error(ctx: &SandboxCtx, e: ApiError) -> Response {
    match e {
        ApiError::NotFound(_) | ApiError::NotRunning(_) => not_running(&ctx.sandbox_id, ""),
        ApiError::Paused(_) => not_running(&ctx.sandbox_id, PAUSED),
        e => e.into_response(),
    }
}

/// Why a paused sandbox's traffic is refused.
const PAUSED: &str = ": it is paused (resume it with Sandbox.connect)";

/// Largest error body [`e2b_errors`] rewrites.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Middleware: an error answer of this server (`{"code": "<name>", "message"}`) becomes
/// E2B's `{"code": <status>, "message", "error_code": "<name>"}`; anything else passes.
pub(crate) async fn e2b_errors(req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || !is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_ERROR_BODY).await else {
        return error(status, "the error answer could not be read");
    };
    let rewritten = match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(serde_json::Value::Object(mut map))
            if map.get("code").is_some_and(|c| c.is_string()) =>
        {
            let name = map.remove("code");
            map.insert("code".into(), status.as_u16().into());
            if let Some(name) = name {
                map.insert("error_code".into(), name);
            }
            if !map.get("message").is_some_and(|m| m.is_string()) {
                map.insert("message".into(), status.to_string().into());
            }
            serde_json::to_vec(&map).ok()
        }
        _ => None,
    };
    let body = rewritten.unwrap_or_else(|| bytes.to_vec());
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(body))
}

/// Where a request of sandbox traffic goes.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    /// The sandbox as named.
    id: String,
    /// Its port as named (not yet checked).
    port: Result<u16, String>,
}

/// The sandbox and port a request is for, if it is sandbox traffic: named by
/// `E2b-Sandbox-Id` (and `E2b-Sandbox-Port`, envd's by default), or by a Host
/// `49983-<id>.<domain>` / `49999-<id>.<domain>` when there is a preview domain.
fn target(headers: &HeaderMap, uri_host: Option<&str>, domain: Option<&str>) -> Option<Target> {
    if let Some(id) = headers.get(SANDBOX_ID_HEADER) {
        let id = String::from_utf8_lossy(id.as_bytes()).trim().to_string();
        let port = match headers.get(SANDBOX_PORT_HEADER) {
            None => Ok(ENVD_PORT),
            Some(v) => {
                let text = String::from_utf8_lossy(v.as_bytes()).trim().to_string();
                text.parse::<u16>().map_err(|_| text)
            }
        };
        return Some(Target { id, port });
    }
    let domain = domain?;
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or(uri_host)?
        .to_ascii_lowercase();
    match crate::preview::match_host(&host, domain) {
        crate::preview::HostMatch::Preview { port, id } => {
            let port = port.parse::<u16>().ok()?;
            (port == ENVD_PORT || port == INTERPRETER_PORT).then(|| Target {
                id: id.to_string(),
                port: Ok(port),
            })
        }
        crate::preview::HostMatch::Api => None,
    }
}

/// The run-as user of `Authorization: Basic base64("<user>:")` (`None` without the header or
/// with an empty name; another scheme is not ours and is ignored).
fn basic_user(headers: &HeaderMap) -> Result<Option<String>, String> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let bad = || "invalid Authorization header: expected Basic base64(\"<user>:\")".to_string();
    let text = value.to_str().map_err(|_| bad())?.trim();
    let Some(encoded) = text
        .strip_prefix("Basic ")
        .or_else(|| text.strip_prefix("basic "))
    else {
        return Ok(None);
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| bad())?;
    let decoded = String::from_utf8(decoded).map_err(|_| bad())?;
    let user = decoded.split_once(':').map_or(decoded.as_str(), |(u, _)| u);
    Ok((!user.is_empty()).then(|| user.to_string()))
}

/// Whether the request's tokens let it in to `port` of sandbox `id`: envd wants its
/// `X-Access-Token`; the interpreter takes that or `E2B-Traffic-Access-Token` (its
/// `/contexts` calls carry only the latter). A token given but wrong is refused outright.
fn check_tokens(s: &AppState, headers: &HeaderMap, id: &str, port: u16) -> Result<(), String> {
    let value = |name: &str| {
        headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    let envd = value(ACCESS_TOKEN_HEADER);
    let traffic = value(TRAFFIC_TOKEN_HEADER);
    if let Some(token) = &envd {
        if !s.previews.check_sandbox_token(ENVD_TOKEN, id, token) {
            return Err(format!(
                "invalid access token for sandbox {id} (X-Access-Token)"
            ));
        }
    }
    if let Some(token) = &traffic {
        if !s.previews.check_sandbox_token(TRAFFIC_TOKEN, id, token) {
            return Err(format!(
                "invalid traffic access token for sandbox {id} (E2B-Traffic-Access-Token)"
            ));
        }
    }
    match (envd.is_some(), traffic.is_some(), port) {
        (true, _, _) => Ok(()),
        (false, true, INTERPRETER_PORT) => Ok(()),
        (false, true, _) => Err(format!(
            "the access token of sandbox {id} is required (X-Access-Token: the envdAccessToken \
             of create or connect); the traffic token opens the code interpreter only"
        )),
        (false, false, _) => Err(format!(
            "an access token is required for sandbox {id}: X-Access-Token (envdAccessToken of \
             create or connect)"
        )),
    }
}

/// Middleware (outermost): a request of sandbox traffic (see [`target`]) goes to the
/// sandbox routes once its token is checked and its sandbox is found running; anything else
/// goes on.
pub(crate) async fn sandbox_traffic(State(s): State<Shared>, req: Request, next: Next) -> Response {
    let Some(target) = target(req.headers(), req.uri().host(), s.previews.domain()) else {
        return next.run(req).await;
    };
    // A refusal is answered before the body was read: `crate::unread_body` closes the
    // connection after it.
    dispatch(s, target, req)
        .await
        .unwrap_or_else(|refusal| refusal)
}

/// Checks a request of sandbox traffic and runs it on the sandbox routes; a refusal (`Err`)
/// is answered before its body was read.
async fn dispatch(s: Shared, target: Target, req: Request) -> Result<Response, Response> {
    let id = target.id;
    let port = match target.port {
        Ok(port) => port,
        Err(text) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!(
                    "invalid E2b-Sandbox-Port {text:?}: expected {ENVD_PORT} or {INTERPRETER_PORT}"
                ),
            ))
        }
    };
    if let Err(message) = check_tokens(&s, req.headers(), &id, port) {
        return Err(error(StatusCode::UNAUTHORIZED, message));
    }
    let user = match basic_user(req.headers()) {
        Ok(user) => user,
        Err(message) => return Err(error(StatusCode::BAD_REQUEST, message)),
    };
    let row = match crate::preview::sandbox_by_id(&s, &id).await {
        Ok(row) => row,
        Err(ApiError::NotFound(_)) => return Err(not_running(&id, "")),
        Err(e) => return Err(e.into_response()),
    };
    match row.state.as_str() {
        "running" => {}
        "paused" => return Err(not_running(&id, PAUSED)),
        "creating" => {
            return Err(error(
                StatusCode::BAD_GATEWAY,
                format!("The sandbox {id} is still being created"),
            ))
        }
        _ => return Err(not_running(&id, "")),
    }
    if port != ENVD_PORT && port != INTERPRETER_PORT {
        // E2B's proxy words it so: the SDK then raises SandboxUnreachableException.
        return Err(error(
            StatusCode::BAD_GATEWAY,
            format!(
                "The sandbox {id} is running but port is not open: port {port} is not served \
                 by E2b-Sandbox-Port, only envd ({ENVD_PORT}) and the code interpreter \
                 ({INTERPRETER_PORT}); other ports are previews (<port>-<id>.<domain>)"
            ),
        ));
    }
    let ctx = SandboxCtx {
        caller: Caller {
            tenant: row.tenant,
            // E2B traffic is a program's: its events are an agent's.
            actor: "agent".into(),
            name: row.owner,
        },
        sandbox_id: id,
        port,
        user,
    };
    tracing::debug!(
        id = ctx.sandbox_id,
        port = ctx.port,
        path = req.uri().path(),
        "sandbox traffic"
    );
    let (mut parts, body) = req.into_parts();
    parts.extensions.insert(ctx);
    parts.extensions.insert(TrafficMetrics(s.metrics.clone()));
    let req = Request::from_parts(parts, body);
    match sandbox_routes().with_state(s).oneshot(req).await {
        Ok(response) => Ok(response),
        Err(never) => match never {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    #[test]
    fn traffic_is_named_by_header_or_by_host() {
        let h = headers(&[("E2b-Sandbox-Id", "abc"), ("E2b-Sandbox-Port", "49999")]);
        assert_eq!(
            target(&h, None, None),
            Some(Target {
                id: "abc".into(),
                port: Ok(49999)
            })
        );
        let h = headers(&[("E2b-Sandbox-Id", "abc")]);
        assert_eq!(target(&h, None, None).unwrap().port, Ok(ENVD_PORT));
        let h = headers(&[("E2b-Sandbox-Id", "abc"), ("E2b-Sandbox-Port", "x")]);
        assert_eq!(target(&h, None, None).unwrap().port, Err("x".into()));
        let h = headers(&[("Host", "49983-abc.sbx.example.com:8080")]);
        assert_eq!(
            target(&h, None, Some("sbx.example.com")),
            Some(Target {
                id: "abc".into(),
                port: Ok(49983)
            })
        );
        assert_eq!(
            target(&h, None, None),
            None,
            "no domain: hosts mean nothing"
        );
        let h = headers(&[("Host", "8080-abc.sbx.example.com")]);
        assert_eq!(
            target(&h, None, Some("sbx.example.com")),
            None,
            "other ports are previews"
        );
        let h = headers(&[("Host", "api.example.com")]);
        assert_eq!(target(&h, None, Some("sbx.example.com")), None);
    }

    #[test]
    fn the_user_comes_from_basic_auth() {
        assert_eq!(basic_user(&headers(&[])), Ok(None));
        let h = headers(&[("Authorization", "Basic cm9vdDo=")]);
        assert_eq!(basic_user(&h), Ok(Some("root".into())));
        let h = headers(&[("Authorization", "Basic Og==")]);
        assert_eq!(
            basic_user(&h),
            Ok(None),
            "an empty name is the default user"
        );
        let h = headers(&[("Authorization", "Bearer x")]);
        assert_eq!(basic_user(&h), Ok(None));
        let h = headers(&[("Authorization", "Basic !!!")]);
        assert!(basic_user(&h).is_err());
    }
}
