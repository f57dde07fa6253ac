//! The proxy itself: one hyper HTTP/1.1 server connection per client connection.
//!
//! - `CONNECT host:port` → decided, then connected (10 s at most), then answered `200` and
//!   tunnelled byte for byte; for a host bound to a secret the tunnel is instead terminated
//!   with a certificate of the proxy's CA ([`super::tls`]) and each request inside is sent on
//!   to the real host over verified TLS with the secret's header set.
//! - `GET http://host/path` (absolute URI) → decided, then forwarded with hyper's client on a
//!   fresh connection. A host bound to a secret is refused there (403): secrets are only sent
//!   inside verified TLS, never in clear text to whatever answers on port 80. `TRACE` and
//!   `TRACK` (which echo the request's headers back) are refused on secret-bound requests.
//!
//! Every request is decided against the sandbox's policy of that moment (a `PUT .../network`
//! applies to the next request; an open tunnel stays open). Refusals are `403` with the reason
//! in the body and in `X-Openrun-Denied`; failures to reach an allowed host are `502`; nothing
//! waits without a bound: connects and TLS handshakes time out after 10 s, and a client that
//! sends no request head within 30 s is disconnected.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::policy::{Policy, Target};
use super::DENIED_HEADER;
use crate::api::Shared;

/// Bound on connecting to a host (each address) and on a TLS handshake.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on resolving a name.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);
/// A client connection that sends no request head for this long is closed.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// A connection that is one too many gets this long to send its request head (and have it
/// answered 429) before it is closed, so refused connections do not pile up.
const REFUSE_TIMEOUT: Duration = Duration::from_secs(2);
/// A `CONNECT` tunnel or interception in which no byte moved either way for this long is
/// closed (its connection slot with it).
pub(crate) const TUNNEL_IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// Response body of the proxy: a fixed text or a streamed upstream body.
type Body = BoxBody<Bytes, hyper::Error>;

/// One client connection of one sandbox.
pub(crate) struct Client {
    pub state: Shared,
    pub sandbox: String,
    pub tenant: String,
    /// Its connection slot (`None` for one being refused), freed when the last holder of the
    /// client (the connection, its tunnel or interception) is gone.
    pub _slot: Option<super::ConnectionSlot>,
}

impl Client {
    /// Records an egress event of `kind` for this client's sandbox.
    async fn record(&self, kind: &'static str, payload: serde_json::Value) {
        super::events::record(&self.state, &self.sandbox, &self.tenant, kind, payload).await;
    }
}

/// Serves HTTP/1.1 on `stream` until the client or the tunnel ends.
pub(crate) async fn serve<S>(client: Arc<Client>, stream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let client = client.clone();
        async move { Ok::<_, Infallible>(handle(client, req).await) }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await
    {
        tracing::debug!(error = %e, "egress client connection ended");
    }
}

/// Answers the first request of a connection that is one too many with 429 (recorded as
/// denied) and closes it; one that sends no request head within [`REFUSE_TIMEOUT`] is closed
/// without an answer.
pub(crate) async fn refuse<S>(client: Arc<Client>, stream: S, reason: String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (client, reason) = (client.clone(), reason.clone());
        async move {
            let (host, port) = target_of(&req).unwrap_or_default();
            let ask = Ask {
                method: req.method().clone(),
                host,
                port,
            };
            client.record("network.deny", ask.payload(&reason)).await;
            let mut response = answer(StatusCode::TOO_MANY_REQUESTS, &reason);
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            Ok::<_, Infallible>(response)
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(REFUSE_TIMEOUT)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    // The whole exchange is bounded too (a body trickled after the head, a client that
    // does not read the answer).
    let _ = tokio::time::timeout(REFUSE_TIMEOUT * 2, connection).await;
}

/// A stream that notes when bytes last moved through it (read or written), for
/// [`idle_bounded`].
struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
}

/// When bytes last moved, in milliseconds since `start`.
struct Activity {
    start: tokio::time::Instant,
    last_ms: std::sync::atomic::AtomicU64,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            start: tokio::time::Instant::now(),
            last_ms: std::sync::atomic::AtomicU64::new(0),
        })
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    fn idle_until(&self, idle: Duration) -> tokio::time::Instant {
        let last = self.last_ms.load(std::sync::atomic::Ordering::Relaxed);
        self.start + Duration::from_millis(last) + idle
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Watched<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(result, std::task::Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        result
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let result = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(result, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        result
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Runs `work` until it ends or no byte moved through the streams `activity` watches for
/// `idle`; `None` when it was cut for idleness.
async fn idle_bounded<F: std::future::Future>(
    work: F,
    activity: &Activity,
    idle: Duration,
) -> Option<F::Output> {
    tokio::pin!(work);
    loop {
        let deadline = activity.idle_until(idle);
        tokio::select! {
            output = &mut work => return Some(output),
            () = tokio::time::sleep_until(deadline) => {
                if activity.idle_until(idle) <= tokio::time::Instant::now() {
                    return None;
                }
            }
        }
    }
}

/// A text answer; a refusal (403, 429) also names its reason in [`DENIED_HEADER`].
fn answer(status: StatusCode, reason: &str) -> Response<Body> {
    let body = Full::new(Bytes::from(format!("{reason}\n")))
        .map_err(|never| match never {})
        .boxed();
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if status == StatusCode::FORBIDDEN || status == StatusCode::TOO_MANY_REQUESTS {
        let printable: String = reason
            .chars()
            .map(|c| {
                if c.is_ascii() && !c.is_ascii_control() {
                    c
                } else {
                    '?'
                }
            })
            .collect();
        if let Ok(value) = HeaderValue::from_str(&printable) {
            headers.insert(DENIED_HEADER, value);
        }
    }
    response
}

/// What one request asks the proxy for.
struct Ask {
    method: Method,
    host: String,
    port: u16,
}

/// Longest host stored in an event (a domain name's longest, RFC 1035).
const MAX_EVENT_HOST: usize = 253;
/// Longest method stored in an event.
const MAX_EVENT_METHOD: usize = 32;
/// Longest reason stored in an event (a reason may quote the host the sandbox sent).
const MAX_EVENT_REASON: usize = 512;

/// `text` cut to at most `max` bytes (on a character boundary), `…` marking a cut.
fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

impl Ask {
    /// The event payload: what the sandbox sent is clipped, so an event stays small whatever
    /// it sends (a host or method of kilobytes, a reason quoting them).
    fn payload(&self, reason: &str) -> serde_json::Value {
        serde_json::json!({
            "host": clip(&self.host, MAX_EVENT_HOST),
            "port": self.port,
            "method": clip(self.method.as_str(), MAX_EVENT_METHOD),
            "reason": clip(reason, MAX_EVENT_REASON),
        })
    }
}

async fn handle(client: Arc<Client>, req: Request<Incoming>) -> Response<Body> {
    if req.method() == Method::CONNECT {
        connect(client, req).await
    } else {
        forward(client, req).await
    }
}

/// The target of a request: `CONNECT host:port`, or an absolute `http://` URI.
fn target_of(req: &Request<Incoming>) -> Result<(String, u16), String> {
    let uri = req.uri();
    if req.method() == Method::CONNECT {
        let authority = uri
            .authority()
            .ok_or("CONNECT needs host:port as its target")?;
        let port = authority
            .port_u16()
            .ok_or("CONNECT needs host:port as its target")?;
        return Ok((authority.host().to_string(), port));
    }
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(
                "https:// URIs go through CONNECT (set HTTPS_PROXY, not a plain proxy request)"
                    .into(),
            )
        }
        Some(other) => {
            return Err(format!(
                "scheme {other} is not proxied: use http or CONNECT"
            ))
        }
        None => return Err(
            "this is the sandbox's egress proxy: send absolute URIs (http://host/...) or CONNECT"
                .into(),
        ),
    }
    let authority = uri.authority().ok_or("the URI has no host")?;
    Ok((
        authority.host().to_string(),
        authority.port_u16().unwrap_or(80),
    ))
}

/// A request [`decide`] let through, with its event already recorded.
struct Allowed {
    /// The name (`None` for an IP literal).
    name: Option<String>,
    /// The addresses to try, in order.
    addrs: Vec<SocketAddr>,
    /// The policy the request was judged by.
    policy: Arc<Policy>,
}

/// What [`decide`] answers: go ahead, or send this refusal instead.
type Decision = Result<Allowed, Response<Body>>;

/// Why a plain-HTTP request to a host bound to a secret is refused.
pub(crate) const SECRETS_NEED_HTTPS: &str = "secrets are only sent over HTTPS; use https://";

/// Whether `method` echoes the request (its headers, a secret's included) back to the client.
fn echoes_request(method: &Method) -> bool {
    method == Method::TRACE || method.as_str().eq_ignore_ascii_case("TRACK")
}

/// Decides `ask` against the sandbox's current policy and records the outcome. `plain`: a
/// plain-HTTP request, refused when the host is bound to a secret (the secret is only ever
/// added inside verified TLS).
async fn decide(client: &Client, ask: &Ask, plain: bool) -> Decision {
    let deny = |reason: String| async move {
        client.record("network.deny", ask.payload(&reason)).await;
        Err(answer(StatusCode::FORBIDDEN, &reason))
    };
    let policy = match client
        .state
        .egress
        .policy(&client.state, &client.sandbox)
        .await
    {
        Ok(policy) => policy,
        Err(e) => {
            tracing::error!(sandbox = client.sandbox, error = %e, "cannot read a network policy");
            return Err(answer(
                StatusCode::BAD_GATEWAY,
                "the proxy cannot read the network policy",
            ));
        }
    };
    if ask.port == 0 {
        return deny("port 0 is not a destination".into()).await;
    }
    let target = match Target::parse(&ask.host) {
        Ok(target) => target,
        Err(reason) => return deny(reason).await,
    };
    // On the name alone: nothing outside the policy reaches a resolver.
    if let Err(reason) = policy.check_target(&target) {
        return deny(reason).await;
    }
    let (name, resolved, pinned) = match &target {
        Target::Ip(ip) => (None, vec![SocketAddr::new(*ip, ask.port)], false),
        Target::Name(name) => match client.state.egress.pinned(name) {
            Some(ips) => (
                Some(name.clone()),
                ips.iter()
                    .map(|ip| SocketAddr::new(*ip, ask.port))
                    .collect(),
                true,
            ),
            None => match resolve(name, ask.port).await {
                Ok(addrs) => (Some(name.clone()), addrs, false),
                // Allowed, but the name does not resolve: a failure upstream, not a refusal.
                Err(reason) => {
                    client.record("network.deny", ask.payload(&reason)).await;
                    return Err(answer(StatusCode::BAD_GATEWAY, &reason));
                }
            },
        },
    };
    let server = client.state.egress.server_addr();
    let host = client.state.egress.host_addrs();
    let mut first_refusal = None;
    let mut addrs = Vec::new();
    for addr in resolved {
        match policy.check_addr(addr, pinned, server, host) {
            Ok(()) => addrs.push(addr),
            Err(reason) => {
                first_refusal.get_or_insert(reason);
            }
        }
    }
    if addrs.is_empty() {
        let reason = first_refusal.unwrap_or_else(|| format!("{} has no address", ask.host));
        return deny(reason).await;
    }
    let secrets = name
        .as_deref()
        .map(|n| policy.secret_names_for(n))
        .unwrap_or_default();
    if plain && !secrets.is_empty() {
        return deny(format!(
            "{} is bound to a secret: {SECRETS_NEED_HTTPS}",
            ask.host
        ))
        .await;
    }
    let mut payload = ask.payload(&format!("allowed by mode {}", policy.mode().as_str()));
    if !secrets.is_empty() {
        payload["secrets"] = secrets.into();
    }
    client.record("network.allow", payload).await;
    Ok(Allowed {
        name,
        addrs,
        policy,
    })
}

/// Resolves an allowed name on the host.
async fn resolve(name: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    let deadline = tokio::time::Instant::now() + RESOLVE_TIMEOUT;
    let mut last = String::new();
    // A resolver under load (many sandboxes installing packages at once) fails some lookups
    // for a moment ("temporary failure in name resolution"): a few quick retries, all within
    // the one timeout.
    for pause_ms in [0u64, 100, 300, 900] {
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        match tokio::time::timeout_at(deadline, tokio::net::lookup_host((name, port))).await {
            Ok(Ok(addrs)) => {
                let addrs: Vec<SocketAddr> = addrs.collect();
                if !addrs.is_empty() {
                    return Ok(addrs);
                }
                last = format!("cannot resolve {name}: no address");
            }
            Ok(Err(e)) => last = format!("cannot resolve {name}: {e}"),
            Err(_) => {
                return Err(format!(
                    "cannot resolve {name}: no answer within {}s",
                    RESOLVE_TIMEOUT.as_secs()
                ))
            }
        }
    }
    Err(last)
}

/// Connects to the first address that answers, each within [`CONNECT_TIMEOUT`].
async fn dial(addrs: &[SocketAddr]) -> Result<TcpStream, String> {
    let mut last = String::from("no address");
    for addr in addrs {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(e)) => last = format!("cannot connect to {addr}: {e}"),
            Err(_) => {
                last = format!(
                    "cannot connect to {addr}: no answer within {}s",
                    CONNECT_TIMEOUT.as_secs()
                )
            }
        }
    }
    Err(last)
}

/// `CONNECT`: a tunnel, or for a host bound to a secret, an interception.
async fn connect(client: Arc<Client>, req: Request<Incoming>) -> Response<Body> {
    let (host, port) = match target_of(&req) {
        Ok(target) => target,
        Err(reason) => return answer(StatusCode::BAD_REQUEST, &reason),
    };
    let ask = Ask {
        method: Method::CONNECT,
        host,
        port,
    };
    let Allowed {
        name,
        addrs,
        policy,
    } = match decide(&client, &ask, false).await {
        Ok(allowed) => allowed,
        Err(refusal) => return refusal,
    };
    let upstream = match dial(&addrs).await {
        Ok(stream) => stream,
        Err(reason) => return answer(StatusCode::BAD_GATEWAY, &reason),
    };
    let bound = name.filter(|n| !policy.secrets_for(n).is_empty());
    let Some(name) = bound else {
        let upgrade = hyper::upgrade::on(req);
        tokio::spawn(async move {
            // Held for the tunnel's life: it counts against the sandbox's connections.
            let _client = client;
            match upgrade.await {
                Ok(upgraded) => {
                    let activity = Activity::new();
                    let mut inside = Watched {
                        inner: TokioIo::new(upgraded),
                        activity: activity.clone(),
                    };
                    let mut upstream = upstream;
                    let copy = tokio::io::copy_bidirectional(&mut inside, &mut upstream);
                    if idle_bounded(copy, &activity, TUNNEL_IDLE_TIMEOUT)
                        .await
                        .is_none()
                    {
                        tracing::debug!("an idle CONNECT tunnel was closed");
                    }
                }
                Err(e) => tracing::debug!(error = %e, "a CONNECT was not upgraded"),
            }
        });
        return Response::new(empty());
    };
    // TLS to the real host first, so an unverifiable host is a clean 502 on the CONNECT.
    let tls = client.state.egress.tls.clone();
    let upstream = match upstream_tls(&tls, &name, upstream).await {
        Ok(stream) => stream,
        Err(reason) => return answer(StatusCode::BAD_GATEWAY, &reason),
    };
    let config = match tls.for_host(&name) {
        Ok(config) => config,
        Err(e) => {
            tracing::error!(error = %e, "cannot intercept");
            return answer(StatusCode::BAD_GATEWAY, &e.to_string());
        }
    };
    let upgrade = hyper::upgrade::on(req);
    let session = Arc::new(Intercepted {
        client,
        host: name,
        port,
        addrs,
        upstream: tokio::sync::Mutex::new(Upstream::Fresh(Box::new(upstream))),
    });
    tokio::spawn(async move {
        let upgraded = match upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => return tracing::debug!(error = %e, "a CONNECT was not upgraded"),
        };
        let activity = Activity::new();
        let watched = Watched {
            inner: TokioIo::new(upgraded),
            activity: activity.clone(),
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let inside = match tokio::time::timeout(CONNECT_TIMEOUT, acceptor.accept(watched)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return tracing::debug!(error = %e, "TLS from the sandbox failed"),
            Err(_) => return tracing::debug!("TLS from the sandbox timed out"),
        };
        let service = hyper::service::service_fn(move |req| {
            let session = session.clone();
            async move { Ok::<_, Infallible>(session.send(req).await) }
        });
        // The session (in the service) holds the client, so the interception counts against
        // the sandbox's connections until it ends.
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .serve_connection(TokioIo::new(inside), service);
        match idle_bounded(connection, &activity, TUNNEL_IDLE_TIMEOUT).await {
            Some(Err(e)) => tracing::debug!(error = %e, "intercepted connection ended"),
            Some(Ok(())) => {}
            None => tracing::debug!("an idle intercepted connection was closed"),
        }
    });
    Response::new(empty())
}

fn empty() -> Body {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

type UpstreamTls = tokio_rustls::client::TlsStream<TcpStream>;

/// TLS to the real `host`, verified against the proxy's trust roots.
async fn upstream_tls(
    tls: &super::tls::Tls,
    host: &str,
    tcp: TcpStream,
) -> Result<UpstreamTls, String> {
    let server_name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| format!("invalid TLS name {host}: {e}"))?;
    let connector = tokio_rustls::TlsConnector::from(tls.upstream());
    match tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(server_name, tcp)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(format!("TLS with {host} failed: {e}")),
        Err(_) => Err(format!(
            "TLS with {host}: no handshake within {}s",
            CONNECT_TIMEOUT.as_secs()
        )),
    }
}

/// The upstream side of an interception.
enum Upstream {
    /// Connected, TLS done, no HTTP yet.
    Fresh(Box<UpstreamTls>),
    /// In use.
    Ready(hyper::client::conn::http1::SendRequest<Incoming>),
    /// Closed or failed: the next request connects again.
    Gone,
}

/// One intercepted `CONNECT`: requests from the sandbox, sent on to the real host.
struct Intercepted {
    client: Arc<Client>,
    host: String,
    port: u16,
    addrs: Vec<SocketAddr>,
    upstream: tokio::sync::Mutex<Upstream>,
}

impl Intercepted {
    async fn send(&self, req: Request<Incoming>) -> Response<Body> {
        // The policy of this moment: a PUT may have removed the host or its secret.
        let policy = match self
            .client
            .state
            .egress
            .policy(&self.client.state, &self.client.sandbox)
            .await
        {
            Ok(policy) => policy,
            Err(e) => {
                tracing::error!(error = %e, "cannot read a network policy");
                return answer(
                    StatusCode::BAD_GATEWAY,
                    "the proxy cannot read the network policy",
                );
            }
        };
        let secrets = policy.secrets_for(&self.host);
        let refusal = match policy.check_target(&Target::Name(self.host.clone())) {
            Err(reason) => Some(reason),
            Ok(()) if !secrets.is_empty() && echoes_request(req.method()) => Some(format!(
                "method {} echoes the request back and is not sent with a secret",
                req.method()
            )),
            Ok(()) => None,
        };
        if let Some(reason) = refusal {
            let ask = Ask {
                method: req.method().clone(),
                host: self.host.clone(),
                port: self.port,
            };
            self.client
                .record("network.deny", ask.payload(&reason))
                .await;
            return answer(StatusCode::FORBIDDEN, &reason);
        }
        let host_header = if self.port == 443 {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let out = match outgoing(req, &host_header, &secrets) {
            Ok(out) => out,
            Err(reason) => return answer(StatusCode::BAD_REQUEST, &reason),
        };
        let mut upstream = self.upstream.lock().await;
        let mut sender = match std::mem::replace(&mut *upstream, Upstream::Gone) {
            Upstream::Ready(sender) if !sender.is_closed() => sender,
            Upstream::Fresh(stream) => match handshake(*stream).await {
                Ok(sender) => sender,
                Err(reason) => return answer(StatusCode::BAD_GATEWAY, &reason),
            },
            Upstream::Ready(_) | Upstream::Gone => match self.reconnect().await {
                Ok(sender) => sender,
                Err(reason) => return answer(StatusCode::BAD_GATEWAY, &reason),
            },
        };
        if sender.ready().await.is_err() {
            sender = match self.reconnect().await {
                Ok(sender) => sender,
                Err(reason) => return answer(StatusCode::BAD_GATEWAY, &reason),
            };
        }
        let result = sender.send_request(out).await;
        *upstream = Upstream::Ready(sender);
        match result {
            Ok(response) => incoming_response(response),
            Err(e) => answer(
                StatusCode::BAD_GATEWAY,
                &format!("{} failed the request: {e}", self.host),
            ),
        }
    }

    async fn reconnect(&self) -> Result<hyper::client::conn::http1::SendRequest<Incoming>, String> {
        let tcp = dial(&self.addrs).await?;
        let tls = upstream_tls(&self.client.state.egress.tls, &self.host, tcp).await?;
        handshake(tls).await
    }
}

/// HTTP/1.1 client handshake on `io`; the connection is driven by its own task.
async fn handshake<T>(io: T) -> Result<hyper::client::conn::http1::SendRequest<Incoming>, String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP with the host failed: {e}"))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "upstream connection ended");
        }
    });
    Ok(sender)
}

/// Hop-by-hop headers: they describe one connection and are not sent on (RFC 9110 7.6.1).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes the hop-by-hop headers and those the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
}

/// The request to send on: origin-form URI, `Host` set to the target the policy allowed
/// (so a secret never goes to another virtual host behind the same address), the secrets'
/// headers replacing any the sandbox sent.
fn outgoing(
    req: Request<Incoming>,
    host_header: &str,
    secrets: &[(HeaderName, HeaderValue)],
) -> Result<Request<Incoming>, String> {
    let (mut parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    parts.uri = path
        .parse::<Uri>()
        .map_err(|e| format!("invalid request target: {e}"))?;
    parts.version = hyper::Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.insert(
        header::HOST,
        HeaderValue::from_str(host_header).map_err(|e| format!("invalid host: {e}"))?,
    );
    for (name, value) in secrets {
        parts.headers.insert(name.clone(), value.clone());
    }
    Ok(Request::from_parts(parts, body))
}

/// An upstream answer, as the sandbox gets it.
fn incoming_response(response: Response<Incoming>) -> Response<Body> {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, body.boxed())
}

/// A plain-HTTP request with an absolute URI: forwarded on a fresh connection.
async fn forward(client: Arc<Client>, req: Request<Incoming>) -> Response<Body> {
    let (host, port) = match target_of(&req) {
        Ok(target) => target,
        Err(reason) => return answer(StatusCode::BAD_REQUEST, &reason),
    };
    let ask = Ask {
        method: req.method().clone(),
        host: host.clone(),
        port,
    };
    // A host bound to a secret is refused here (the secret is never sent in clear text), so
    // nothing is added to a plain-HTTP request.
    let addrs = match decide(&client, &ask, true).await {
        Ok(allowed) => allowed.addrs,
        Err(refusal) => return refusal,
    };
    let host_header = if port == 80 {
        host
    } else {
        format!("{host}:{port}")
    };
    let out = match outgoing(req, &host_header, &[]) {
        Ok(out) => out,
        Err(reason) => return answer(StatusCode::BAD_REQUEST, &reason),
    };
    let tcp = match dial(&addrs).await {
        Ok(tcp) => tcp,
        Err(reason) => return answer(StatusCode::BAD_GATEWAY, &reason),
    };
    let mut sender = match handshake(tcp).await {
        Ok(sender) => sender,
        Err(reason) => return answer(StatusCode::BAD_GATEWAY, &reason),
    };
    match sender.send_request(out).await {
        Ok(response) => incoming_response(response),
        Err(e) => answer(
            StatusCode::BAD_GATEWAY,
            &format!("{} failed the request: {e}", ask.host),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_dropped() {
        let mut headers = HeaderMap::new();
        headers.insert("connection", HeaderValue::from_static("close, x-private"));
        headers.insert("x-private", HeaderValue::from_static("1"));
        headers.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        headers.insert("accept", HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert!(headers.contains_key("accept"));
    }

    #[test]
    fn a_tunnel_is_cut_only_after_its_idle_time_without_a_byte() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (near, mut far) = tokio::io::duplex(64);
            let activity = Activity::new();
            let mut watched = Watched {
                inner: near,
                activity: activity.clone(),
            };
            let idle = Duration::from_millis(300);
            let started = tokio::time::Instant::now();
            // Bytes every 100 ms for 900 ms keep it open past three idle periods...
            let writer = tokio::spawn(async move {
                for _ in 0..9 {
                    far.write_all(b"x").await.unwrap();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                far
            });
            let mut sink = Vec::new();
            let work = async {
                let mut buf = [0u8; 16];
                loop {
                    match watched.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => sink.extend_from_slice(&buf[..n]),
                    }
                }
            };
            // ...then silence: cut one idle period after the last byte.
            assert!(idle_bounded(work, &activity, idle).await.is_none());
            let elapsed = started.elapsed();
            assert!(elapsed >= Duration::from_millis(1000), "{elapsed:?}");
            assert!(elapsed < Duration::from_millis(2500), "{elapsed:?}");
            assert_eq!(sink, b"xxxxxxxxx");
            drop(writer.await.unwrap());
            // Work that ends first is not cut.
            let quick = async { 7 };
            assert_eq!(idle_bounded(quick, &Activity::new(), idle).await, Some(7));
        });
    }

    #[test]
    fn event_payloads_stay_small_whatever_the_sandbox_sends() {
        let long = "é".repeat(5000);
        let ask = Ask {
            method: Method::from_bytes("X".repeat(4000).as_bytes()).unwrap(),
            host: format!("a{long}"),
            port: 80,
        };
        let payload = ask.payload(&format!("invalid host name {:?}: too long", ask.host));
        let host = payload["host"].as_str().unwrap();
        assert!(
            host.len() <= MAX_EVENT_HOST && host.ends_with('…'),
            "{host}"
        );
        assert!(payload["method"].as_str().unwrap().len() <= MAX_EVENT_METHOD);
        assert!(payload["reason"].as_str().unwrap().len() <= MAX_EVENT_REASON);
        assert!(payload.to_string().len() < 1024, "{payload}");
        assert_eq!(clip("short.test", MAX_EVENT_HOST), "short.test");
    }

    #[test]
    fn trace_and_track_are_the_echoing_methods() {
        assert!(echoes_request(&Method::TRACE));
        assert!(echoes_request(&Method::from_bytes(b"TRACK").unwrap()));
        assert!(!echoes_request(&Method::GET));
        assert!(!echoes_request(&Method::from_bytes(b"TRACKING").unwrap()));
    }

    #[test]
    fn refusals_carry_their_reason_in_a_header() {
        let response = answer(StatusCode::FORBIDDEN, "host x is not in the allowlist");
        assert_eq!(response.status(), 403);
        assert_eq!(
            response.headers()[DENIED_HEADER],
            "host x is not in the allowlist"
        );
        let response = answer(StatusCode::BAD_GATEWAY, "cannot connect");
        assert!(response.headers().get(DENIED_HEADER).is_none());
    }
}
