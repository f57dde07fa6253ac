//! The egress proxy: every connection a sandbox opens to `127.0.0.1:3128` (its
//! `HTTP(S)_PROXY`) arrives here through the agent's egress relay ([`crate::relay`]) and is
//! decided against the sandbox's network policy.

use std::convert::Infallible;

use axum::body::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};

/// Header naming why the proxy refused a request.
pub(crate) const DENIED_HEADER: &str = "x-openrun-denied";

/// Serves one proxied client connection of sandbox `sandbox_id` (HTTP `CONNECT` and plain
/// absolute-URI HTTP) according to the sandbox's current policy.
// Called by the egress relay supervisor (`crate::relay`), which lands beside this module.
#[allow(dead_code)]
pub(crate) async fn serve_connection<S>(
    state: crate::api::Shared,
    sandbox_id: String,
    tenant: String,
    stream: S,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let _ = (&state, &tenant);
    let io = hyper_util::rt::TokioIo::new(stream);
    let service = hyper::service::service_fn(|_req: Request<hyper::body::Incoming>| async {
        Ok::<_, Infallible>(denied("network policy is none"))
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .serve_connection(io, service)
        .with_upgrades()
        .await
    {
        tracing::debug!(sandbox = sandbox_id, error = %e, "egress connection ended");
    }
}

/// A 403 naming `reason` in its body and in [`DENIED_HEADER`].
fn denied(reason: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(format!("denied: {reason}\n"))));
    *response.status_mut() = StatusCode::FORBIDDEN;
    if let Ok(value) = hyper::header::HeaderValue::from_str(reason) {
        response.headers_mut().insert(DENIED_HEADER, value);
    }
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
