//! Whether the server is serving anyone right now: background work (the warm pool's refills)
//! waits for a quiet moment instead of sharing the CPUs with a client's requests.
//!
//! Every HTTP request the server handles counts (the API, E2B's sandbox traffic, previews),
//! from the moment it reaches the router until its answer's body has been handed to the
//! connection (or dropped): a streamed command output counts as long as it streams. A
//! WebSocket counts until its `101` answer; what flows on the upgraded connection does not.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;

use crate::watched_body::{BodyWatch, Watched};

/// Requests in progress and when the last one ended.
#[derive(Debug)]
pub struct Activity {
    in_flight: AtomicUsize,
    /// When the last request ended, in nanoseconds since `epoch`.
    last_end_ns: AtomicU64,
    epoch: Instant,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            last_end_ns: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

impl Activity {
    /// How long no request has been in progress; `None` while one is.
    pub fn quiet_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let last_end = Duration::from_nanos(self.last_end_ns.load(Ordering::Acquire));
        Some(self.epoch.elapsed().saturating_sub(last_end))
    }

    /// Counts a request in progress until the guard drops.
    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }
}

/// One request in progress (see [`Activity::begin`]).
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let now = u64::try_from(self.0.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        // Stored before the count drops: a reader that sees zero in flight sees this end.
        self.0.last_end_ns.fetch_max(now, Ordering::AcqRel);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Middleware around the whole router: counts each request until its answer's body ends.
pub(crate) async fn track(
    State(activity): State<Arc<Activity>>,
    req: Request,
    next: Next,
) -> Response {
    let in_flight = activity.begin();
    let response = next.run(req).await;
    response.map(|inner| Watched::body(inner, in_flight))
}

/// An answer's body keeps its request counted until it is sent or dropped.
impl BodyWatch for InFlight {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_in_progress_is_not_quiet_and_its_end_starts_the_quiet_time() {
        let activity = Arc::new(Activity::default());
        assert!(activity.quiet_for().is_some());
        let first = activity.begin();
        let second = activity.begin();
        assert_eq!(activity.quiet_for(), None);
        drop(first);
        assert_eq!(activity.quiet_for(), None, "one is still in progress");
        std::thread::sleep(Duration::from_millis(300));
        drop(second);
        let quiet = activity.quiet_for().expect("nothing in progress");
        assert!(quiet < Duration::from_millis(300), "quiet for {quiet:?}");
        std::thread::sleep(Duration::from_millis(10));
        let later = activity.quiet_for().expect("nothing in progress");
        assert!(later >= Duration::from_millis(10), "quiet for {later:?}");
    }
}
