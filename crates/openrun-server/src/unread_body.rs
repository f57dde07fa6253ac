//! One rule for every route: an answer given before its request's body was read to the end
//! (a refusal by auth or by a size, token or session check, an error in the middle of an
//! upload) carries `Connection: close`. hyper cannot reuse such a connection and drops it after
//! the answer; a pooling client (the E2B SDK pools one connection set for the API and every
//! sandbox) that was not told would send its next request on it and see a broken pipe.
//!
//! Except a small body: its rest (at most [`LINGER_BYTES`], arriving within [`LINGER_TIME`])
//! is read and dropped before the answer goes out, and the connection stays usable. Closing a
//! socket with unread bytes makes the kernel reset the connection, and a client still writing
//! the body (an SDK's 1-byte upload to a sandbox that was just killed) would then see a broken
//! pipe instead of the answer.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;

use crate::watched_body::{BodyWatch, Polled, Watched};

/// Most bytes of an unread body read and dropped to keep its connection.
pub(crate) const LINGER_BYTES: u64 = 64 * 1024;
/// Longest wait for the rest of an unread body before the connection is closed instead.
pub(crate) const LINGER_TIME: Duration = Duration::from_secs(1);

/// Middleware: when its request announced a body that was not read to its end by the time the
/// answer was made, reads the rest of a small one (see the module), else marks the answer
/// `Connection: close`.
pub(crate) async fn close_if_unread(req: Request, next: Next) -> Response {
    if !announces_body(req.headers()) {
        return next.run(req).await;
    }
    let small = announced_length(req.headers()).is_some_and(|n| n <= LINGER_BYTES);
    let watch = ReadToEnd::default();
    let (finished, rest) = (watch.finished.clone(), watch.rest.clone());
    let (parts, body) = req.into_parts();
    let body = Watched::body(body, watch);
    let mut response = next.run(Request::from_parts(parts, body)).await;
    if finished.load(Ordering::Acquire) {
        return response;
    }
    // The body is back here if the route dropped it (a route still holding it, a task it
    // started, is left alone).
    let rest = rest.lock().map(|mut r| r.take()).unwrap_or(None);
    let drained = match rest {
        Some(rest) if small => drain(rest).await,
        _ => false,
    };
    if !drained {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Reads `body` to its end if it ends within [`LINGER_TIME`] and [`LINGER_BYTES`].
async fn drain(mut body: Body) -> bool {
    use http_body_util::BodyExt;
    let to_end = async {
        let mut read = 0u64;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { return false };
            read += frame.data_ref().map_or(0, |d| d.len() as u64);
            if read > LINGER_BYTES {
                return false;
            }
        }
        true
    };
    tokio::time::timeout(LINGER_TIME, to_end)
        .await
        .unwrap_or(false)
}

/// The `Content-Length` of a request, if it has one.
fn announced_length(headers: &HeaderMap) -> Option<u64> {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        return None;
    }
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether a request announces a body: a length above zero, or a chunked one.
fn announces_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0")
}

/// Marks `finished` once the request body it watches was read to its end, and keeps the rest
/// of a body dropped before its end in `rest`.
#[derive(Default)]
struct ReadToEnd {
    finished: Arc<AtomicBool>,
    rest: Arc<Mutex<Option<Body>>>,
}

impl BodyWatch for ReadToEnd {
    fn polled(&mut self, poll: &Polled) {
        if matches!(poll, Poll::Ready(None)) {
            self.finished.store(true, Ordering::Release);
        }
    }

    fn dropped(&mut self, rest: Body) {
        if !self.finished.load(Ordering::Acquire) {
            if let Ok(mut slot) = self.rest.lock() {
                *slot = Some(rest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;
    use axum::routing::post;
    use axum::Router;
    use tower::ServiceExt;

    use super::*;

    /// What a route that refuses without reading its body answers through the middleware,
    /// for `body` sent with or without its length.
    async fn refused(body: Vec<u8>, with_length: bool) -> Response {
        let app = Router::new()
            .route("/", post(|| async { StatusCode::UNAUTHORIZED }))
            .layer(axum::middleware::from_fn(close_if_unread));
        let mut req = Request::post("/");
        req = if with_length {
            req.header(header::CONTENT_LENGTH, body.len())
        } else {
            req.header(header::TRANSFER_ENCODING, "chunked")
        };
        let req = req.body(Body::from(body)).expect("a request");
        app.oneshot(req).await.expect("infallible")
    }

    fn closes(response: &Response) -> bool {
        response
            .headers()
            .get(header::CONNECTION)
            .is_some_and(|v| v == "close")
    }

    #[tokio::test]
    async fn a_small_refused_body_is_read_and_its_connection_kept() {
        let response = refused(b"{\"image\":\"host\"}".to_vec(), true).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert!(!closes(&response));
        let response = refused(vec![b'x'; LINGER_BYTES as usize], true).await;
        assert!(!closes(&response), "exactly the limit is still read");
    }

    #[tokio::test]
    async fn a_large_or_unannounced_refused_body_closes_its_connection() {
        let response = refused(vec![b'x'; LINGER_BYTES as usize + 1], true).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert!(closes(&response));
        let response = refused(b"small".to_vec(), false).await;
        assert!(closes(&response), "a chunked body has no length to trust");
    }

    #[tokio::test]
    async fn a_body_that_never_ends_closes_its_connection_after_the_linger_time() {
        let app = Router::new()
            .route("/", post(|| async { StatusCode::UNAUTHORIZED }))
            .layer(axum::middleware::from_fn(close_if_unread));
        // Announces 10 bytes, sends 3, then nothing.
        let (sender, rx) =
            tokio::sync::mpsc::channel::<Result<axum::body::Bytes, std::io::Error>>(1);
        let body = Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        }));
        sender
            .send(Ok(axum::body::Bytes::from_static(b"abc")))
            .await
            .expect("room for one");
        let req = Request::post("/")
            .header(header::CONTENT_LENGTH, 10)
            .body(body)
            .expect("a request");
        let started = std::time::Instant::now();
        let response = app.oneshot(req).await.expect("infallible");
        assert!(closes(&response));
        assert!(started.elapsed() >= LINGER_TIME);
        drop(sender);
    }

    #[test]
    fn bodies_are_announced_by_length_or_chunking() {
        let mut headers = HeaderMap::new();
        assert!(!announces_body(&headers));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        assert!(!announces_body(&headers));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("12"));
        assert!(announces_body(&headers));
        let mut chunked = HeaderMap::new();
        chunked.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        assert!(announces_body(&chunked));
    }
}
