//! One rule for every route: an answer given before its request's body was read to the end
//! (a refusal by auth or by a size, token or session check, an error in the middle of an
//! upload) carries `Connection: close`. hyper cannot reuse such a connection and drops it after
//! the answer; a pooling client (the E2B SDK pools one connection set for the API and every
//! sandbox) that was not told would send its next request on it and see a broken pipe.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;

use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;

use crate::watched_body::{BodyWatch, Polled, Watched};

/// Middleware: marks the answer `Connection: close` when its request announced a body that was
/// not read to its end by the time the answer was made.
pub(crate) async fn close_if_unread(req: Request, next: Next) -> Response {
    if !announces_body(req.headers()) {
        return next.run(req).await;
    }
    let finished = Arc::new(AtomicBool::new(false));
    let (parts, body) = req.into_parts();
    let body = Watched::body(body, ReadToEnd(finished.clone()));
    let mut response = next.run(Request::from_parts(parts, body)).await;
    if !finished.load(Ordering::Acquire) {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Whether a request announces a body: a length above zero, or a chunked one.
fn announces_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0")
}

/// Marks its flag once the request body it watches was read to its end.
struct ReadToEnd(Arc<AtomicBool>);

impl BodyWatch for ReadToEnd {
    fn polled(&mut self, poll: &Polled) {
        if matches!(poll, Poll::Ready(None)) {
            self.0.store(true, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
