//! A body that passes its frames through unchanged and shows each poll to a watch: how the
//! middlewares learn that a request body was read to its end ([`crate::unread_body`]) or keep
//! a request counted until its answer is sent ([`crate::activity`], whose watch acts when
//! the body is dropped).

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes, HttpBody};
use http_body::{Frame, SizeHint};

/// One poll's result, as a watch sees it.
pub(crate) type Polled = Poll<Option<Result<Frame<Bytes>, axum::Error>>>;

/// What a [`Watched`] body tells its watch.
pub(crate) trait BodyWatch: Send + Unpin + 'static {
    /// Called with the result of each poll of the body.
    fn polled(&mut self, _poll: &Polled) {}

    /// Called when the watched body is dropped, with what is left of the body it watched.
    fn dropped(&mut self, _rest: Body) {}
}

/// `inner`, watched by `watch`.
pub(crate) struct Watched<W: BodyWatch> {
    inner: Body,
    watch: W,
}

impl<W: BodyWatch> Watched<W> {
    /// `inner` as a [`Body`] watched by `watch`.
    pub(crate) fn body(inner: Body, watch: W) -> Body {
        Body::new(Self { inner, watch })
    }
}

impl<W: BodyWatch> Drop for Watched<W> {
    fn drop(&mut self) {
        let rest = std::mem::take(&mut self.inner);
        self.watch.dropped(rest);
    }
}

impl<W: BodyWatch> HttpBody for Watched<W> {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Polled {
        let this = &mut *self;
        let poll = Pin::new(&mut this.inner).poll_frame(cx);
        this.watch.polled(&poll);
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use http_body_util::BodyExt;

    use super::*;

    /// Counts the frames and the ends it saw, and whether it was dropped.
    #[derive(Default)]
    struct Seen {
        frames: usize,
        ends: usize,
        dropped: bool,
    }

    struct Recorder(Arc<Mutex<Seen>>);

    impl BodyWatch for Recorder {
        fn polled(&mut self, poll: &Polled) {
            let mut seen = self.0.lock().expect("not poisoned");
            match poll {
                Poll::Ready(Some(Ok(_))) => seen.frames += 1,
                Poll::Ready(None) => seen.ends += 1,
                _ => {}
            }
        }
    }

    impl Drop for Recorder {
        fn drop(&mut self) {
            self.0.lock().expect("not poisoned").dropped = true;
        }
    }

    #[tokio::test]
    async fn the_bytes_pass_unchanged_and_the_watch_sees_every_poll_and_the_drop() {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let body = Watched::body(Body::from("some bytes"), Recorder(seen.clone()));
        assert_eq!(body.size_hint().exact(), Some(10));
        let bytes = body.collect().await.expect("a body in memory").to_bytes();
        assert_eq!(&bytes[..], b"some bytes");
        let seen = seen.lock().expect("not poisoned");
        assert_eq!((seen.frames, seen.ends, seen.dropped), (1, 1, true));
    }
}
