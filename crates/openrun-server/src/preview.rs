//! Port previews: HTTP and WebSocket into a port on a sandbox's loopback, through the server.
//! Nothing listens on the host for them: each request opens a pipe through the sandbox's agent
//! ([`crate::relay::open_port`]) and speaks HTTP/1.1 over it (hyper's client connection).
//!
//! Two ways to address a preview:
//! - by path: `/v1/sandboxes/{id}/ports/{port}/{path}` (also `.../{port}` and `.../{port}/`);
//!   the sandbox sees `/{path}` and `X-Forwarded-Prefix: /v1/sandboxes/{id}/ports/{port}`;
//! - by host: `<port>-<id>.<domain>` with the server's preview domain (`openrun serve
//!   --preview-domain`); the whole path goes to the sandbox. Checked before any route.
//!
//! Access: the owner's API key (`Authorization: Bearer`, 404 for anyone else's sandbox, like
//! every route), or a preview token from `POST /v1/sandboxes/{id}/ports/{port}/preview`: an
//! HMAC-SHA256 over the sandbox id, the port and the expiry, keyed by a secret the server keeps
//! in `<data-dir>/preview.key` (0600, made once). The token is accepted as `?openrun_token=`
//! (a GET then gets it as an `HttpOnly`, `SameSite=Lax` cookie scoped to the preview and a
//! redirect to the URL without it), as that cookie, or as `X-Openrun-Token`.
//!
//! What reaches the sandbox: the request without hop-by-hop headers, without our token (query,
//! cookie, header) and without an `Authorization` that carried an openrun API key (a sandbox
//! never sees its caller's key), plus `X-Forwarded-For/Host/Proto(/Prefix)`. Bodies stream both
//! ways; an `Upgrade` (WebSocket) is completed on both sides and the two connections are then
//! copied into each other.
//!
//! Path previews share the server's origin, so their answers carry
//! `Content-Security-Policy: sandbox ...` ([`PATH_PREVIEW_CSP`]): the page gets an opaque
//! origin, and cannot script requests to other previews with their cookies, use the origin's
//! storage or register a service worker. `Service-Worker-Allowed` is dropped from every answer.
//! Host previews (one origin per sandbox port) need none of this; prefer them for anything a
//! browser runs.

use std::net::SocketAddr;
use std::path::{Path as FsPath, PathBuf};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, on, MethodFilter};
use axum::{Extension, Json};
use base64::Engine;
use hmac::{Hmac, Mac};
use hyper_util::rt::TokioIo;
use sha2::Sha256;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use crate::api::{find, Caller, JsonBody, Shared};
use crate::db::{self, NewEvent, SandboxRow};
use crate::error::{ApiError, ServerError};
use crate::openapi::ErrorAnswers;

/// Query parameter carrying a preview token.
pub const TOKEN_PARAM: &str = "openrun_token";
/// Header carrying a preview token.
pub const TOKEN_HEADER: &str = "x-openrun-token";
/// Cookie carrying a preview token (set after a `?openrun_token=` GET).
pub const COOKIE_NAME: &str = "openrun_token";
/// File of the token secret in the data dir.
pub const KEY_FILE: &str = "preview.key";
/// Lifetime of a token when the request gives none.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(60 * 60);
/// Longest lifetime of a token.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 60 * 60);
/// What the MAC covers besides the target, so it can never be confused with another MAC.
const MAC_CONTEXT: &str = "openrun-preview-v1";

/// Policy added to every answer of a path preview. Path previews share the server's origin, so
/// the page is put in an opaque origin of its own (no `allow-same-origin`): its scripts run,
/// forms post, popups and downloads work, but it cannot read or write the origin's cookies or
/// storage, register a service worker, or read another path preview's answers (its requests are
/// cross-origin and cross-site, so they carry no `SameSite=Lax` cookie, ours included).
pub const PATH_PREVIEW_CSP: &str =
    "sandbox allow-scripts allow-forms allow-popups allow-modals allow-downloads";

/// Headers that describe one hop, never forwarded (RFC 9110 7.6.1), plus `Expect`: the proxy
/// answers `100 Continue` itself.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

type HmacSha256 = Hmac<Sha256>;

/// The token secret and the preview domain.
pub struct Previews {
    secret: [u8; 32],
    domain: Option<String>,
}

impl std::fmt::Debug for Previews {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Previews")
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

/// Why a preview token was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum TokenProblem {
    /// Not a token this server made.
    Invalid,
    /// Made for another sandbox or port.
    OtherTarget,
    /// Past its expiry.
    Expired,
}

/// Checks a preview domain (`openrun serve --preview-domain`): a DNS name of at least two
/// labels (letters, digits, hyphens), returned in lower case.
pub fn check_preview_domain(domain: &str) -> Result<String, String> {
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if domain.len() > 200 || !domain.contains('.') || !domain.split('.').all(label_ok) {
        return Err(format!(
            "invalid preview domain {domain:?}: expected a DNS name such as preview.example.com \
             (previews are then at <port>-<id>.{domain})"
        ));
    }
    Ok(domain)
}

impl Previews {
    /// Loads the token secret from `<data_dir>/preview.key`, making it (0600) on first use.
    pub fn open(data_dir: &FsPath, domain: Option<String>) -> Result<Self, ServerError> {
        let path = data_dir.join(KEY_FILE);
        let secret = load_or_create_secret(&path)
            .map_err(|source| ServerError::PreviewKey { path, source })?;
        Ok(Self { secret, domain })
    }

    /// The preview domain, if host previews are on.
    pub fn domain(&self) -> Option<&str> {
        self.domain.as_deref()
    }

    /// The MAC of `label` and sandbox `id` under this server's secret, domain-separated from
    /// preview tokens by `label` (E2B's per-sandbox envd and traffic access tokens).
    fn sandbox_mac(&self, label: &str, id: &str) -> HmacSha256 {
        // HMAC takes keys of any length: this cannot fail.
        let mut mac = match HmacSha256::new_from_slice(&self.secret) {
            Ok(mac) => mac,
            Err(e) => unreachable!("HMAC refused a 32-byte key: {e}"),
        };
        mac.update(format!("openrun-sandbox-token-v1\n{label}\n{id}").as_bytes());
        mac
    }

    /// A token of `label` for sandbox `id` (base64url): valid as long as this server's secret,
    /// for that sandbox only. Checked by [`Previews::check_sandbox_token`].
    pub(crate) fn sandbox_token(&self, label: &str, id: &str) -> String {
        let tag = self.sandbox_mac(label, id).finalize().into_bytes();
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tag)
    }

    /// Whether `token` is [`Previews::sandbox_token`] of `label` and `id` (constant-time).
    pub(crate) fn check_sandbox_token(&self, label: &str, id: &str, token: &str) -> bool {
        let Ok(tag) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token.trim()) else {
            return false;
        };
        self.sandbox_mac(label, id).verify_slice(&tag).is_ok()
    }

    fn mac(&self, id: &str, port: u16, expires_ms: i64) -> HmacSha256 {
        // HMAC takes keys of any length: this cannot fail.
        let mut mac = match HmacSha256::new_from_slice(&self.secret) {
            Ok(mac) => mac,
            Err(e) => unreachable!("HMAC refused a 32-byte key: {e}"),
        };
        mac.update(format!("{MAC_CONTEXT}\n{id}\n{port}\n{expires_ms}").as_bytes());
        mac
    }

    /// A token for `port` of sandbox `id`, valid until `expires_ms` (ms since the epoch):
    /// `<id>.<port>.<expires_ms>.<base64url MAC>`.
    fn mint(&self, id: &str, port: u16, expires_ms: i64) -> String {
        let tag = self.mac(id, port, expires_ms).finalize().into_bytes();
        let tag = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tag);
        format!("{id}.{port}.{expires_ms}.{tag}")
    }

    /// Whether `token` opens `port` of sandbox `id` at `now_ms`.
    fn check(&self, token: &str, id: &str, port: u16, now_ms: i64) -> Result<(), TokenProblem> {
        let mut parts = token.split('.');
        let (Some(tid), Some(tport), Some(texp), Some(tag), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(TokenProblem::Invalid);
        };
        let (Ok(tport), Ok(texp)) = (tport.parse::<u16>(), texp.parse::<i64>()) else {
            return Err(TokenProblem::Invalid);
        };
        let Ok(tag) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(tag) else {
            return Err(TokenProblem::Invalid);
        };
        // Constant-time comparison.
        if self.mac(tid, tport, texp).verify_slice(&tag).is_err() {
            return Err(TokenProblem::Invalid);
        }
        if tid != id || tport != port {
            return Err(TokenProblem::OtherTarget);
        }
        if texp <= now_ms {
            return Err(TokenProblem::Expired);
        }
        Ok(())
    }
}

/// Reads the 32-byte secret, or makes it: written to a private temporary file first and linked
/// into place, so a concurrent start never reads half a key and only one key ever wins.
fn load_or_create_secret(path: &FsPath) -> std::io::Result<[u8; 32]> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let read = |path: &FsPath| -> std::io::Result<[u8; 32]> {
        let bytes = std::fs::read(path)?;
        <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{} holds {} bytes, not 32: delete it to make a new key (previews' tokens \
                     then stop working)",
                    path.display(),
                    bytes.len()
                ),
            )
        })
    };
    match read(path) {
        Ok(secret) => return Ok(secret),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut secret = [0u8; 32];
    let mut filled = 0;
    while filled < secret.len() {
        match rustix::rand::getrandom(&mut secret[filled..], rustix::rand::GetRandomFlags::empty())
        {
            Ok(n) => filled += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let tmp = PathBuf::from(format!("{}.{}.tmp", path.display(), std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(&secret)?;
        file.sync_all()?;
        std::fs::hard_link(&tmp, path)
    })();
    let _ = std::fs::remove_file(&tmp);
    match written {
        Ok(()) => Ok(secret),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read(path),
        Err(e) => Err(e),
    }
}

/// `port` as given in a path or host: 1 to 65535, else a 400 naming it.
fn parse_port(text: &str) -> Result<u16, ApiError> {
    match text.parse::<u16>() {
        Ok(port) if port > 0 && text.bytes().all(|b| b.is_ascii_digit()) => Ok(port),
        _ => Err(ApiError::InvalidArgument(format!(
            "invalid port {text:?}: expected a number from 1 to 65535"
        ))),
    }
}

/// Body of `POST /v1/sandboxes/{id}/ports/{port}/preview`.
#[derive(Debug, Default, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PreviewBody {
    /// How long the token opens the preview, e.g. `30m` (default `1h`, at most `7d`).
    ttl: Option<String>,
}

/// A preview token and where to use it.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct PreviewToken {
    /// The token: `?openrun_token=`, the `openrun_token` cookie, or `X-Openrun-Token`.
    token: String,
    /// The preview by path, with the token.
    path_url: String,
    /// The preview by host (`<port>-<id>.<domain>`), with the token; only when the server has
    /// a preview domain.
    host_url: Option<String>,
    /// When the token stops working (RFC 3339).
    expires_at: String,
}

/// The scheme the client used: `X-Forwarded-Proto` from a proxy in front, else `http`.
fn scheme(headers: &HeaderMap) -> &str {
    match headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
    {
        Some("https") => "https",
        _ => "http",
    }
}

/// `POST /v1/sandboxes/{id}/ports/{port}/preview`: a token that opens port `port` of the
/// sandbox (by path, and by host when the server has a preview domain) to whoever holds it.
#[utoipa::path(post, operation_id = "create_preview_token", path = "/v1/sandboxes/{id}/ports/{port}/preview", tag = "previews",
    params(("id" = String, Path, description = "Sandbox id"), ("port" = String, Path, description = "Port inside the sandbox, 1 to 65535")),
    request_body(content = PreviewBody, description = "Optional: the token's lifetime"),
    responses((status = 200, description = "A token and the preview's URLs", body = PreviewToken), ErrorAnswers))]
pub async fn mint(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path((id, port)): Path<(String, String)>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<PreviewBody>,
) -> Result<Json<PreviewToken>, ApiError> {
    let token = mint_token(&s, &caller, &id, &port, body.ttl.as_deref(), &headers).await?;
    Ok(Json(token))
}

/// A preview token for port `port` (as given: 1 to 65535) of the caller's sandbox `id`, living
/// `ttl` (default 1 h, at most 7 d), with its URLs on the host the client reached the server by
/// (`headers`) — `POST .../ports/{port}/preview` and MCP's `preview_url`. Records
/// `preview.token`.
pub(crate) async fn mint_token(
    s: &Shared,
    caller: &Caller,
    id: &str,
    port: &str,
    ttl: Option<&str>,
    headers: &HeaderMap,
) -> Result<PreviewToken, ApiError> {
    let port = parse_port(port)?;
    let ttl = match ttl {
        None => DEFAULT_TOKEN_TTL,
        Some(text) => {
            let ttl = openrun_runtime::limits::parse_duration(text)
                .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
            if ttl > MAX_TOKEN_TTL {
                return Err(ApiError::InvalidArgument(format!(
                    "invalid ttl {text:?}: a preview token lives at most 7d"
                )));
            }
            ttl
        }
    };
    let row = find(s, caller, id).await?;
    if !matches!(row.state.as_str(), "running" | "paused") {
        return Err(ApiError::NotRunning(row.id));
    }
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    let expires_ms = crate::time::now_ms().saturating_add(ttl_ms);
    let token = s.previews.mint(&row.id, port, expires_ms);
    let expires_at = crate::time::rfc3339(expires_ms);
    let event = NewEvent {
        sandbox_id: row.id.clone(),
        tenant: caller.tenant.clone(),
        actor: caller.actor.clone(),
        kind: "preview.token",
        payload: serde_json::json!({ "port": port, "expires_at": expires_at }),
    };
    s.db.call(move |c| db::append_event(c, &event)).await?;
    let scheme = scheme(headers);
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let path = format!(
        "/v1/sandboxes/{}/ports/{port}/?{TOKEN_PARAM}={token}",
        row.id
    );
    let path_url = match host {
        Some(host) => format!("{scheme}://{host}{path}"),
        None => path,
    };
    let host_url = s.previews.domain().map(|domain| {
        // The port the client reached the server on, if it named one.
        let listen_port = host
            .and_then(|h| h.rsplit_once(':'))
            .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
            .map_or(String::new(), |(_, p)| format!(":{p}"));
        format!(
            "{scheme}://{port}-{}.{domain}{listen_port}/?{TOKEN_PARAM}={token}",
            row.id
        )
    });
    Ok(PreviewToken {
        token,
        path_url,
        host_url,
        expires_at,
    })
}

/// The documentation of the path previews (routed by [`proxy_routes`]).
#[derive(OpenApi)]
#[openapi(paths(port_root, port_path))]
struct PreviewPaths;

/// The path-preview routes, every method, outside the API-key middleware (a token works
/// too). `POST .../preview` is the token route (see [`mint`]); other methods on that path are
/// the preview's own `/preview`.
pub(crate) fn proxy_routes() -> OpenApiRouter<Shared> {
    let not_post = MethodFilter::GET
        .or(MethodFilter::HEAD)
        .or(MethodFilter::PUT)
        .or(MethodFilter::DELETE)
        .or(MethodFilter::PATCH)
        .or(MethodFilter::OPTIONS)
        .or(MethodFilter::TRACE);
    OpenApiRouter::with_openapi(PreviewPaths::openapi())
        .route("/v1/sandboxes/{id}/ports/{port}", any(port_root))
        .route("/v1/sandboxes/{id}/ports/{port}/", any(port_path))
        .route("/v1/sandboxes/{id}/ports/{port}/{*path}", any(port_path))
        .route(
            "/v1/sandboxes/{id}/ports/{port}/preview",
            on(not_post, port_path),
        )
}

/// `GET /v1/sandboxes/{id}/ports/{port}`: the preview's `/` (every method is passed on).
#[utoipa::path(get, operation_id = "preview_port_root", path = "/v1/sandboxes/{id}/ports/{port}", tag = "previews",
    params(("id" = String, Path, description = "Sandbox id"), ("port" = String, Path, description = "Port inside the sandbox, 1 to 65535"),
        ("openrun_token" = Option<String>, Query, description = "A preview token instead of the API key")),
    responses((status = 200, description = "Whatever the server on the port answers (any status, headers and body)"),
        (status = 502, description = "Nothing listens on the port (`port_closed`), or it did not answer with HTTP (`bad_gateway`)", body = crate::openapi::ErrorBody),
        ErrorAnswers))]
async fn port_root(State(s): State<Shared>, req: Request) -> Response {
    by_path(s, req).await
}

/// `GET /v1/sandboxes/{id}/ports/{port}/{path}`: the preview's `/{path}` (every method is
/// passed on; the query too, without `openrun_token`).
#[utoipa::path(get, operation_id = "preview_port", path = "/v1/sandboxes/{id}/ports/{port}/{path}", tag = "previews",
    params(("id" = String, Path, description = "Sandbox id"), ("port" = String, Path, description = "Port inside the sandbox, 1 to 65535"),
        ("path" = String, Path, description = "Path inside the preview"),
        ("openrun_token" = Option<String>, Query, description = "A preview token instead of the API key")),
    responses((status = 200, description = "Whatever the server on the port answers (any status, headers and body)"),
        (status = 502, description = "Nothing listens on the port (`port_closed`), or it did not answer with HTTP (`bad_gateway`)", body = crate::openapi::ErrorBody),
        ErrorAnswers))]
async fn port_path(State(s): State<Shared>, req: Request) -> Response {
    by_path(s, req).await
}

/// Splits `/v1/sandboxes/{id}/ports/{port}{rest}` (raw, still percent-encoded).
fn split_preview_path(path: &str) -> Option<(&str, &str, &str)> {
    let rest = path.strip_prefix("/v1/sandboxes/")?;
    let (id, rest) = rest.split_once('/')?;
    let rest = rest.strip_prefix("ports/")?;
    let (port, rest) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    Some((id, port, rest))
}

async fn by_path(s: Shared, req: Request) -> Response {
    let path = req.uri().path().to_string();
    let Some((id, port, rest)) = split_preview_path(&path) else {
        return ApiError::NotFound("no such endpoint".into()).into_response();
    };
    let target = Target {
        id: id.to_string(),
        prefix: Some(format!("/v1/sandboxes/{id}/ports/{port}")),
        path: if rest.is_empty() { "/" } else { rest }.to_string(),
    };
    match preview(&s, req, port, target).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

/// What the Host header says about a request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum HostMatch<'a> {
    /// Not a preview host: the API serves it.
    Api,
    /// `<port>-<id>.<domain>`.
    Preview {
        /// Port as written.
        port: &'a str,
        /// Sandbox id.
        id: &'a str,
    },
}

/// Reads `host` (`name[:port]`) against the preview domain.
pub(crate) fn match_host<'a>(host: &'a str, domain: &str) -> HostMatch<'a> {
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    let name = name.trim_end_matches('.');
    if name.len() <= domain.len() + 1 {
        return HostMatch::Api;
    }
    let (label, rest) = name.split_at(name.len() - domain.len() - 1);
    if !rest[1..].eq_ignore_ascii_case(domain) || !rest.starts_with('.') || label.contains('.') {
        return HostMatch::Api;
    }
    match label.split_once('-') {
        Some((port, id)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
            HostMatch::Preview { port, id }
        }
        _ => HostMatch::Api,
    }
}

/// Middleware before every route: a request for `<port>-<id>.<domain>` is a host preview
/// (its whole path goes to the sandbox); anything else goes on to the API.
pub(crate) async fn by_host(State(s): State<Shared>, req: Request, next: Next) -> Response {
    let Some(domain) = s.previews.domain() else {
        return next.run(req).await;
    };
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().host())
        .map(str::to_ascii_lowercase);
    let Some(host) = host else {
        return next.run(req).await;
    };
    let (port, id) = match match_host(&host, domain) {
        HostMatch::Api => return next.run(req).await,
        HostMatch::Preview { port, id } => (port.to_string(), id.to_string()),
    };
    let target = Target {
        id,
        prefix: None,
        path: req.uri().path().to_string(),
    };
    match preview(&s, req, &port, target).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

/// Where a preview request goes.
struct Target {
    /// Sandbox id as addressed.
    id: String,
    /// `/v1/sandboxes/{id}/ports/{port}` for a path preview (none for a host preview).
    prefix: Option<String>,
    /// Path inside the preview (raw, starting with `/`).
    path: String,
}

/// How a request was let in.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Access {
    /// The owner's API key.
    Key,
    /// A preview token; `from_query` when it came as `?openrun_token=`.
    Token { token: String, from_query: bool },
}

/// The request's query without `openrun_token`, and that token (percent-decoded).
fn split_query(query: Option<&str>) -> (Option<String>, Option<String>) {
    let Some(query) = query else {
        return (None, None);
    };
    let mut token = None;
    let mut kept = Vec::new();
    for pair in query.split('&') {
        let name = pair.split_once('=').map_or(pair, |(n, _)| n);
        if name == TOKEN_PARAM {
            let value = pair.split_once('=').map_or("", |(_, v)| v);
            token = Some(
                percent_encoding::percent_decode_str(value)
                    .decode_utf8_lossy()
                    .into_owned(),
            );
        } else {
            kept.push(pair);
        }
    }
    let kept = (!kept.is_empty()).then(|| kept.join("&"));
    (token, kept)
}

/// Values of our cookie in the request's `Cookie` headers.
fn token_cookies(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(name, _)| *name == COOKIE_NAME)
        .map(|(_, value)| value.trim_matches('"').to_string())
        .collect()
}

/// The bearer credential of `Authorization`, if any.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// The live sandbox `id` whoever its tenant (a token names the sandbox; it carries no tenant).
pub(crate) async fn sandbox_by_id(s: &Shared, id: &str) -> Result<SandboxRow, ApiError> {
    let missing = || ApiError::NotFound(format!("no such sandbox: {id}"));
    if !openrun_runtime::state::valid_id(id) {
        return Err(missing());
    }
    let key = id.to_string();
    let row =
        s.db.call(move |c| {
            use rusqlite::OptionalExtension;
            let tenant: Option<String> = c
                .query_row(
                    "SELECT tenant FROM sandboxes WHERE id = ?1 AND deleted_at IS NULL",
                    [&key],
                    |r| r.get(0),
                )
                .optional()?;
            match tenant {
                Some(tenant) => db::get_sandbox(c, &tenant, &key),
                None => Ok(None),
            }
        })
        .await?;
    row.ok_or_else(missing)
}

/// Lets the request in by the owner's API key or a token for this sandbox and port.
async fn authorize(
    s: &Shared,
    headers: &HeaderMap,
    query_token: Option<&str>,
    id: &str,
    port: u16,
) -> Result<(SandboxRow, Access), ApiError> {
    let key = bearer(headers);
    if let Some(key) = key {
        let hash = crate::keys::hash(key);
        if let Some(k) = s.db.call(move |c| db::key_by_hash(c, &hash)).await? {
            let caller = Caller {
                tenant: k.tenant,
                actor: k.actor_kind,
                name: k.name,
            };
            return Ok((find(s, &caller, id).await?, Access::Key));
        }
    }
    let mut candidates: Vec<(String, bool)> = Vec::new();
    if let Some(token) = query_token {
        candidates.push((token.to_string(), true));
    }
    if let Some(token) = headers.get(TOKEN_HEADER).and_then(|v| v.to_str().ok()) {
        candidates.push((token.trim().to_string(), false));
    }
    candidates.extend(token_cookies(headers).into_iter().map(|t| (t, false)));
    let now = crate::time::now_ms();
    let mut worst = None;
    for (token, from_query) in candidates {
        match s.previews.check(&token, id, port, now) {
            Ok(()) => {
                let row = sandbox_by_id(s, id).await?;
                return Ok((row, Access::Token { token, from_query }));
            }
            Err(problem) => worst = worst.max(Some(problem)),
        }
    }
    Err(ApiError::Unauthorized(match (worst, key) {
        (Some(TokenProblem::Expired), _) => "the preview token has expired: ask for a new one \
             (POST /v1/sandboxes/{id}/ports/{port}/preview)"
            .into(),
        (Some(TokenProblem::OtherTarget), _) => {
            format!("the preview token is not for port {port} of sandbox {id}")
        }
        (Some(TokenProblem::Invalid), _) => "invalid preview token".into(),
        (None, Some(_)) => "unknown API key".into(),
        (None, None) => format!(
            "an API key (Authorization: Bearer <key>) or a preview token (?{TOKEN_PARAM}=, \
             from POST /v1/sandboxes/{{id}}/ports/{{port}}/preview) is required"
        ),
    }))
}

/// Whether the request asks for a protocol upgrade (WebSocket).
fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Serves one preview request.
async fn preview(
    s: &Shared,
    mut req: Request,
    port: &str,
    target: Target,
) -> Result<Response, ApiError> {
    let port = parse_port(port)?;
    let (query_token, query) = split_query(req.uri().query());
    let (row, access) =
        authorize(s, req.headers(), query_token.as_deref(), &target.id, port).await?;
    let upgrade = wants_upgrade(req.headers());
    if let Access::Token {
        token,
        from_query: true,
    } = &access
    {
        if matches!(*req.method(), Method::GET | Method::HEAD) && !upgrade {
            // The token moves into a cookie; the address bar loses it.
            let location = same_host_location(req.uri().path(), query.as_deref());
            return Ok(token_redirect(
                req.headers(),
                token,
                &location,
                target.prefix.as_deref(),
            ));
        }
    }
    let stream = crate::relay::open_port(s, &row, port).await?;
    let client_upgrade = if upgrade {
        req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>()
    } else {
        None
    };
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let (parts, body) = req.into_parts();
    let mut path_and_query = target.path.clone();
    if let Some(q) = &query {
        path_and_query.push('?');
        path_and_query.push_str(q);
    }
    let uri: Uri = path_and_query
        .parse()
        .map_err(|e| ApiError::InvalidArgument(format!("invalid preview path: {e}")))?;
    let mut out = hyper::Request::new(body);
    *out.method_mut() = parts.method.clone();
    *out.uri_mut() = uri;
    *out.headers_mut() = request_headers(&parts.headers, &access, upgrade, peer, &target, port);

    let what = format!("port {port} of sandbox {}", row.id);
    let (mut sender, connection) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ApiError::BadGateway(format!("cannot speak HTTP to {what}: {e}")))?;
    let conn_what = what.clone();
    tokio::spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            tracing::debug!(target = conn_what, error = %e, "preview connection ended");
        }
    });
    let mut response = sender.send_request(out).await.map_err(|e| {
        ApiError::BadGateway(format!(
            "the server on {what} did not answer with HTTP: {e}"
        ))
    })?;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            return Err(ApiError::BadGateway(format!(
                "the server on {what} switched protocols unasked"
            )));
        };
        let upstream = hyper::upgrade::on(&mut response);
        tokio::spawn(async move {
            match tokio::try_join!(client_upgrade, upstream) {
                Ok((client, upstream)) => {
                    let mut client = TokioIo::new(client);
                    let mut upstream = TokioIo::new(upstream);
                    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await
                    {
                        tracing::debug!(target = what, error = %e, "preview upgrade ended");
                    }
                }
                Err(e) => tracing::debug!(target = what, error = %e, "preview upgrade failed"),
            }
        });
    }
    let (mut parts, body) = response.into_parts();
    let switching = parts.status == StatusCode::SWITCHING_PROTOCOLS;
    strip_response_headers(&mut parts.headers, switching, target.prefix.is_some());
    Ok(Response::from_parts(parts, Body::new(body)))
}

/// `path` (raw, as requested) and `query` as a `Location` that stays on this host: exactly one
/// leading `/` (a browser reads `//evil.com/` or `/\evil.com/` as another host: an open
/// redirect), every other `\` percent-encoded.
fn same_host_location(path: &str, query: Option<&str>) -> String {
    let rest = path.trim_start_matches(['/', '\\']);
    let mut location = String::with_capacity(path.len() + query.map_or(0, str::len) + 2);
    location.push('/');
    for c in rest.chars() {
        match c {
            '\\' => location.push_str("%5C"),
            c => location.push(c),
        }
    }
    if let Some(q) = query {
        location.push('?');
        location.push_str(q);
    }
    location
}

/// Answers a `?openrun_token=` GET: the token as a cookie for this preview, and a redirect to
/// the same address without it.
fn token_redirect(
    headers: &HeaderMap,
    token: &str,
    location: &str,
    prefix: Option<&str>,
) -> Response {
    let max_age = token
        .rsplit('.')
        .nth(1)
        .and_then(|t| t.parse::<i64>().ok())
        .map_or(0, |exp| {
            (exp.saturating_sub(crate::time::now_ms()) / 1000).max(0)
        });
    let secure = if scheme(headers) == "https" {
        "; Secure"
    } else {
        ""
    };
    let path = prefix.unwrap_or("/");
    let cookie = format!(
        "{COOKIE_NAME}={token}; Path={path}; Max-Age={max_age}; HttpOnly; SameSite=Lax{secure}"
    );
    let mut response = StatusCode::FOUND.into_response();
    let (Ok(cookie), Ok(location)) = (
        HeaderValue::from_str(&cookie),
        HeaderValue::from_str(location),
    ) else {
        return ApiError::InvalidArgument("invalid preview token or path".into()).into_response();
    };
    response.headers_mut().insert(header::SET_COOKIE, cookie);
    response.headers_mut().insert(header::LOCATION, location);
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Header names the `Connection` headers list (hop-by-hop by declaration).
fn connection_listed(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect()
}

/// The headers that go into the sandbox.
fn request_headers(
    incoming: &HeaderMap,
    access: &Access,
    upgrade: bool,
    peer: Option<std::net::IpAddr>,
    target: &Target,
    port: u16,
) -> HeaderMap {
    let listed = connection_listed(incoming);
    let mut out = HeaderMap::with_capacity(incoming.len() + 4);
    for (name, value) in incoming {
        let n = name.as_str();
        if HOP_BY_HOP.contains(&n)
            || n == "expect"
            || n == TOKEN_HEADER
            || n == "cookie"
            || listed.contains(name)
        {
            continue;
        }
        if name == header::AUTHORIZATION {
            // Never the caller's API key: the one that let it in, or anything shaped like one.
            let ours = value.to_str().ok().is_some_and(|v| {
                v.strip_prefix("Bearer ")
                    .is_some_and(|t| t.trim().starts_with(crate::keys::KEY_PREFIX))
            });
            if ours || *access == Access::Key {
                continue;
            }
        }
        out.append(name.clone(), value.clone());
    }
    // Cookies, without ours.
    let cookies: Vec<&str> = incoming
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|pair| {
            !pair.is_empty() && pair.split_once('=').map_or(*pair, |(n, _)| n) != COOKIE_NAME
        })
        .collect();
    if !cookies.is_empty() {
        if let Ok(value) = HeaderValue::from_str(&cookies.join("; ")) {
            out.insert(header::COOKIE, value);
        }
    }
    if upgrade {
        out.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Some(value) = incoming.get(header::UPGRADE) {
            out.insert(header::UPGRADE, value.clone());
        }
    }
    let host = incoming.get(header::HOST).cloned();
    if host.is_none() {
        if let Ok(value) = HeaderValue::from_str(&format!("localhost:{port}")) {
            out.insert(header::HOST, value);
        }
    }
    if let Some(host) = host {
        out.insert("x-forwarded-host", host);
    }
    if !incoming.contains_key("x-forwarded-proto") {
        out.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    }
    if let Some(ip) = peer {
        let forwarded = match incoming
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
        {
            Some(earlier) => format!("{earlier}, {ip}"),
            None => ip.to_string(),
        };
        if let Ok(value) = HeaderValue::from_str(&forwarded) {
            out.insert("x-forwarded-for", value);
        }
    }
    if let Some(prefix) = &target.prefix {
        if let Ok(value) = HeaderValue::from_str(prefix) {
            out.insert("x-forwarded-prefix", value);
        }
    }
    out
}

/// Drops hop-by-hop headers from the sandbox's answer (keeping the upgrade's own on a `101`),
/// `Service-Worker-Allowed` (a worker's scope never reaches beyond its own path) and any
/// attempt to set our token cookie; the app's other cookies lose their `Domain` ([`app_cookie`]). A path preview's answer is also sandboxed
/// ([`PATH_PREVIEW_CSP`]): it shares the server's origin with every other path preview.
fn strip_response_headers(headers: &mut HeaderMap, switching: bool, path_preview: bool) {
    for name in connection_listed(headers) {
        if !(switching && name == header::UPGRADE) {
            headers.remove(name);
        }
    }
    for name in HOP_BY_HOP {
        if switching && (name == "upgrade" || name == "connection") {
            continue;
        }
        headers.remove(name);
    }
    if switching {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    headers.remove("service-worker-allowed");
    if path_preview && !switching {
        // Added to the app's own policies (a browser enforces every one it gets).
        headers.append(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(PATH_PREVIEW_CSP),
        );
    }
    let cookies: Vec<HeaderValue> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(app_cookie)
        .collect();
    headers.remove(header::SET_COOKIE);
    for value in cookies {
        headers.append(header::SET_COOKIE, value);
    }
}

/// The name a `Set-Cookie` value sets, as a browser reads it (RFC 6265bis 5.6): the name-value
/// pair ends at the first `;`, the name at its first `=` (none: an empty name), trimmed.
fn set_cookie_name(value: &[u8]) -> &[u8] {
    let pair = value.split(|&b| b == b';').next().unwrap_or_default();
    match pair.iter().position(|&b| b == b'=') {
        Some(end) => pair[..end].trim_ascii(),
        None => &[],
    }
}

/// A `Set-Cookie` of the app as it may reach the browser, judged on its bytes: none when it
/// names our cookie (in any case) or is not ASCII (a browser may read such bytes in ways we
/// cannot predict); otherwise without `Domain` attributes, so the cookie is host-only and never
/// reaches the parent domain's other hosts (other tenants' host previews).
fn app_cookie(value: &HeaderValue) -> Option<HeaderValue> {
    let bytes = value.as_bytes();
    if !bytes.is_ascii() || set_cookie_name(bytes).eq_ignore_ascii_case(COOKIE_NAME.as_bytes()) {
        return None;
    }
    let is_domain = |attr: &[u8]| {
        let name = attr.split(|&b| b == b'=').next().unwrap_or_default();
        name.trim_ascii().eq_ignore_ascii_case(b"domain")
    };
    let mut parts = bytes.split(|&b| b == b';');
    let pair = parts.next().unwrap_or_default();
    if !parts.clone().any(is_domain) {
        return Some(value.clone());
    }
    let mut out = pair.to_vec();
    for attr in parts.filter(|a| !is_domain(a)) {
        out.push(b';');
        out.extend_from_slice(attr);
    }
    HeaderValue::from_bytes(&out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn previews(domain: Option<&str>) -> Previews {
        Previews {
            secret: [7u8; 32],
            domain: domain.map(str::to_string),
        }
    }

    #[test]
    fn tokens_open_one_port_of_one_sandbox_until_they_expire() {
        let p = previews(None);
        let token = p.mint("abc123", 8080, 10_000);
        assert_eq!(p.check(&token, "abc123", 8080, 9_999), Ok(()));
        assert_eq!(
            p.check(&token, "abc123", 8080, 10_000),
            Err(TokenProblem::Expired)
        );
        assert_eq!(
            p.check(&token, "abc123", 8081, 0),
            Err(TokenProblem::OtherTarget)
        );
        assert_eq!(
            p.check(&token, "other", 8080, 0),
            Err(TokenProblem::OtherTarget)
        );
        // Any change to what the MAC covers, or another key, is refused.
        let forged = token.replacen("10000", "99999", 1);
        assert_eq!(
            p.check(&forged, "abc123", 8080, 0),
            Err(TokenProblem::Invalid)
        );
        let other_key = Previews {
            secret: [8u8; 32],
            domain: None,
        };
        assert_eq!(
            other_key.check(&token, "abc123", 8080, 0),
            Err(TokenProblem::Invalid)
        );
        for junk in [
            "",
            "a.b.c",
            "abc123.8080.1.!!!",
            "abc123.x.1.AAAA",
            "a.1.1.A.B",
        ] {
            assert_eq!(p.check(junk, "abc123", 8080, 0), Err(TokenProblem::Invalid));
        }
    }

    #[test]
    fn the_secret_is_made_once_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let a = Previews::open(dir.path(), None).unwrap();
        let b = Previews::open(dir.path(), None).unwrap();
        assert_eq!(a.secret, b.secret, "the key is kept");
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_ne!(a.secret, [0u8; 32]);
        std::fs::write(dir.path().join(KEY_FILE), b"short").unwrap();
        let err = Previews::open(dir.path(), None).unwrap_err();
        assert!(err.to_string().contains("not 32"), "{err}");
    }

    #[test]
    fn ports_are_checked() {
        assert_eq!(parse_port("8080").unwrap(), 8080);
        for bad in ["0", "65536", "70000", "-1", "+80", "http", ""] {
            let err = parse_port(bad).unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn hosts_are_matched_against_the_domain() {
        let d = "preview.example.com";
        assert_eq!(
            match_host("8080-abc123.preview.example.com", d),
            HostMatch::Preview {
                port: "8080",
                id: "abc123"
            }
        );
        assert_eq!(
            match_host("3000-ab-c.preview.example.com:7878", d),
            HostMatch::Preview {
                port: "3000",
                id: "ab-c"
            }
        );
        for api in [
            "preview.example.com",
            "localhost:7878",
            "www.preview.example.com",
            "a.8080-abc.preview.example.com",
            "8080-abc.preview.example.org",
            "8080-abcpreview.example.com",
        ] {
            assert_eq!(match_host(api, d), HostMatch::Api, "{api}");
        }
        assert!(check_preview_domain("Preview.Example.com.").unwrap() == "preview.example.com");
        assert!(check_preview_domain("localhost").is_err());
        assert!(check_preview_domain("a..b").is_err());
        assert!(check_preview_domain("-a.b").is_err());
    }

    #[test]
    fn queries_lose_only_the_token() {
        assert_eq!(split_query(None), (None, None));
        assert_eq!(
            split_query(Some("a=1&openrun_token=x%2Ey&b=2")),
            (Some("x.y".into()), Some("a=1&b=2".into()))
        );
        assert_eq!(
            split_query(Some("openrun_token=t")),
            (Some("t".into()), None)
        );
        assert_eq!(split_query(Some("q=%20x")), (None, Some("q=%20x".into())));
    }

    #[test]
    fn the_caller_key_and_our_token_never_go_inside() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer or_abcdef"),
        );
        h.insert(TOKEN_HEADER, HeaderValue::from_static("tok"));
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; openrun_token=tok; b=2"),
        );
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-hop"),
        );
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("x-app", HeaderValue::from_static("kept"));
        h.insert(header::HOST, HeaderValue::from_static("h:1"));
        let target = Target {
            id: "abc".into(),
            prefix: Some("/v1/sandboxes/abc/ports/80".into()),
            path: "/".into(),
        };
        let access = Access::Token {
            token: "tok".into(),
            from_query: false,
        };
        let out = request_headers(&h, &access, false, None, &target, 80);
        assert!(out.get(header::AUTHORIZATION).is_none());
        assert!(out.get(TOKEN_HEADER).is_none());
        assert!(out.get("x-hop").is_none());
        assert!(out.get(header::CONNECTION).is_none());
        assert_eq!(out.get(header::COOKIE).unwrap(), "a=1; b=2");
        assert_eq!(out.get("x-app").unwrap(), "kept");
        assert_eq!(out.get("x-forwarded-host").unwrap(), "h:1");
        assert_eq!(
            out.get("x-forwarded-prefix").unwrap(),
            "/v1/sandboxes/abc/ports/80"
        );
        // An app's own credentials pass when a token let the request in.
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic dXNlcg=="),
        );
        let out = request_headers(&h, &access, false, None, &target, 80);
        assert_eq!(out.get(header::AUTHORIZATION).unwrap(), "Basic dXNlcg==");
        let out = request_headers(&h, &Access::Key, false, None, &target, 80);
        assert!(out.get(header::AUTHORIZATION).is_none());
    }

    #[test]
    fn preview_routes_are_documented() {
        let doc = serde_json::to_value(crate::api::openapi_document()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for (path, method, id) in [
            (
                "/v1/sandboxes/{id}/ports/{port}/preview",
                "post",
                "create_preview_token",
            ),
            (
                "/v1/sandboxes/{id}/ports/{port}",
                "get",
                "preview_port_root",
            ),
            (
                "/v1/sandboxes/{id}/ports/{port}/{path}",
                "get",
                "preview_port",
            ),
        ] {
            let op = &paths[path][method];
            assert_eq!(op["operationId"], id, "{method} {path}");
            assert!(op["responses"]["401"].is_object(), "{method} {path}");
        }
        assert!(
            paths["/v1/sandboxes/{id}/ports/{port}/{path}"]["get"]["responses"]["502"].is_object()
        );
    }

    #[test]
    fn answers_lose_the_worker_scope_and_path_previews_are_sandboxed() {
        let answer = || {
            let mut h = HeaderMap::new();
            h.insert("service-worker-allowed", HeaderValue::from_static("/"));
            h.insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static("img-src 'self'"),
            );
            h
        };
        let policies = |h: &HeaderMap| -> Vec<String> {
            h.get_all(header::CONTENT_SECURITY_POLICY)
                .iter()
                .map(|v| v.to_str().unwrap().to_string())
                .collect()
        };
        let mut path = answer();
        strip_response_headers(&mut path, false, true);
        assert!(path.get("service-worker-allowed").is_none());
        assert_eq!(
            policies(&path),
            ["img-src 'self'", PATH_PREVIEW_CSP],
            "ours is added to the app's own"
        );
        assert!(PATH_PREVIEW_CSP.starts_with("sandbox "));
        assert!(!PATH_PREVIEW_CSP.contains("allow-same-origin"));
        let mut host = answer();
        strip_response_headers(&mut host, false, false);
        assert!(host.get("service-worker-allowed").is_none());
        assert_eq!(policies(&host), ["img-src 'self'"]);
        let mut upgrade = answer();
        strip_response_headers(&mut upgrade, true, true);
        assert_eq!(policies(&upgrade), ["img-src 'self'"]);
    }

    #[test]
    fn apps_cannot_set_our_cookie_or_cookies_for_other_hosts() {
        let mut h = HeaderMap::new();
        for value in [
            &b"openrun_token=x; Path=/"[..],
            b" OpenRun_Token =x",
            b"openrun_token=x; Path=/v1/sandboxes/other/ports/80; Max-Age=0",
            // Not valid UTF-8: to_str() fails on it.
            b"openrun_token=x; Path=/; X=\xff",
            b"app=\xe9t\xe9",
            b"a=1; Path=/",
            b"b=2; Domain=preview.example.com; Path=/; domain =.example.com; HttpOnly",
            b"openrun_token; Path=/",
        ] {
            h.append(header::SET_COOKIE, HeaderValue::from_bytes(value).unwrap());
        }
        strip_response_headers(&mut h, false, false);
        let kept: Vec<&[u8]> = h
            .get_all(header::SET_COOKIE)
            .iter()
            .map(HeaderValue::as_bytes)
            .collect();
        assert_eq!(
            kept,
            [
                &b"a=1; Path=/"[..],
                b"b=2; Path=/; HttpOnly",
                // A nameless cookie (its value is "openrun_token"), which is not ours.
                b"openrun_token; Path=/",
            ]
        );
        assert_eq!(set_cookie_name(b" n = v; Domain=x"), b"n");
        assert_eq!(set_cookie_name(b"v; a=b"), b"");
    }

    #[test]
    fn redirects_stay_on_this_host() {
        for (path, query, location) in [
            ("/x/y", Some("a=1"), "/x/y?a=1"),
            ("/", None, "/"),
            ("", None, "/"),
            ("//evil.com/", None, "/evil.com/"),
            ("///evil.com", Some("q=//x"), "/evil.com?q=//x"),
            ("/\\evil.com/a\\b", None, "/evil.com/a%5Cb"),
            ("\\/evil.com", None, "/evil.com"),
            (
                "/v1/sandboxes/abc/ports/80//x",
                None,
                "/v1/sandboxes/abc/ports/80//x",
            ),
        ] {
            assert_eq!(same_host_location(path, query), location, "{path}");
        }
    }

    #[test]
    fn paths_split_into_sandbox_port_and_rest() {
        assert_eq!(
            split_preview_path("/v1/sandboxes/abc/ports/8080/a/b%20c"),
            Some(("abc", "8080", "/a/b%20c"))
        );
        assert_eq!(
            split_preview_path("/v1/sandboxes/abc/ports/8080"),
            Some(("abc", "8080", ""))
        );
        assert_eq!(split_preview_path("/v1/sandboxes/abc/files"), None);
    }
}
