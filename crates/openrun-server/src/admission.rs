//! Back-pressure on sandbox creation: at most `max_creating` creates run at once, up to
//! `queue` more wait for a slot (in arrival order), and any create beyond that is refused at
//! once with 429 `too_many_requests` and a `Retry-After` estimate, before its body is read.
//!
//! The core is [`admitted`], which every surface that creates one sandbox goes through: a
//! layer on the `POST /v1/sandboxes` route ([`limit`], inside authentication: an unknown key
//! never takes a slot; the handler knows nothing of it) and MCP's `create_sandbox`. It also
//! times each admitted create for [`crate::metrics`]. A fork's creates wait for slots
//! ([`Admission::slot`]) without the queue bound: the fork itself is one request.
//!
//! The warm pool's refill takes a slot too ([`Admission::pool_slot`]), but it yields it: a
//! user create that finds every slot taken and the queue full, while the pool holds one,
//! waits for that slot instead of being refused (a refill is one short fork, and the pool
//! takes no slot while a user create is in progress). One such create per pool-held slot.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;
use tokio::sync::Semaphore;
use utoipa::openapi::{self, RefOr};
use utoipa_axum::router::UtoipaMethodRouter;

use crate::api::Shared;
use crate::error::ApiError;

/// Waiting creates allowed by default beyond the running ones.
pub const DEFAULT_QUEUE: usize = 64;

/// Longest `Retry-After` suggested, in seconds.
const MAX_RETRY_AFTER_SECS: u64 = 60;

/// The create slots and the queue in front of them.
pub struct Admission {
    slots: Arc<Semaphore>,
    max_creating: usize,
    queue: usize,
    waiting: Arc<AtomicUsize>,
    /// Slots the warm pool holds that no user create has claimed yet (see [`PoolSlot`]).
    lendable: Arc<AtomicUsize>,
}

/// A create slot held by the warm pool's refill: while it is held, one user create that
/// would be refused waits for it instead ([`Admission::borrow_pool_slot`]).
pub(crate) struct PoolSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    lendable: Arc<AtomicUsize>,
}

impl Drop for PoolSlot {
    fn drop(&mut self) {
        // Not claimed: take it off the lendable ones. Claimed: the borrower is waiting on the
        // semaphore, and the permit this drop gives back goes to the longest waiter (tokio's
        // semaphore is fair).
        let _ = self
            .lendable
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }
}

impl Admission {
    /// `max_creating` concurrent creates (at least 1), `queue` more waiting.
    pub fn new(max_creating: usize, queue: usize) -> Self {
        let max_creating = max_creating.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            slots: Arc::new(Semaphore::new(max_creating)),
            max_creating,
            queue,
            waiting: Arc::new(AtomicUsize::new(0)),
            lendable: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// A create slot for the warm pool's refill, waited for; a user create may borrow it
    /// while it is held (see the module documentation).
    pub(crate) async fn pool_slot(&self) -> Result<PoolSlot, ApiError> {
        let permit = self.slot().await?;
        self.lendable.fetch_add(1, Ordering::AcqRel);
        Ok(PoolSlot {
            _permit: permit,
            lendable: self.lendable.clone(),
        })
    }

    /// Claims one slot the warm pool holds, if one is not claimed yet: the caller may then
    /// wait for a slot although the queue is full.
    fn borrow_pool_slot(&self) -> bool {
        self.lendable
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
    }

    /// A create slot for one sandbox of a fork, waited for: a fork's creates share the slots
    /// with every other create (and a fork asks for at most 100).
    pub(crate) async fn slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        self.slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| ApiError::internal("the create slots are closed", e))
    }

    /// A place in the queue, if there is room; given back when dropped (also when the client
    /// leaves while waiting).
    fn join_queue(&self) -> Option<QueuePlace> {
        self.waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                (w < self.queue).then_some(w + 1)
            })
            .ok()
            .map(|_| QueuePlace(self.waiting.clone()))
    }

    /// Seconds until the creates ahead of a newcomer should have drained: the mean create time
    /// (1 s before any) times the queued rounds, between 1 and [`MAX_RETRY_AFTER_SECS`].
    fn retry_after(&self, mean_create: Option<Duration>) -> u64 {
        let mean = mean_create.unwrap_or(Duration::from_secs(1)).as_secs_f64();
        let rounds = (self.queue + self.max_creating).div_ceil(self.max_creating) as f64;
        ((mean * rounds).ceil() as u64).clamp(1, MAX_RETRY_AFTER_SECS)
    }
}

/// A taken queue place.
struct QueuePlace(Arc<AtomicUsize>);

impl Drop for QueuePlace {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The create route behind [`admit`], with its 429 answer added to its documentation.
pub fn limit(route: UtoipaMethodRouter<Shared>, state: &Shared) -> UtoipaMethodRouter<Shared> {
    let (schemas, paths, method_router) = document(route);
    let layer = middleware::from_fn_with_state(state.clone(), admit);
    (schemas, paths, method_router.layer(layer))
}

/// Adds the 429 answer [`admit`] gives to the documentation of `route`'s operations (for the
/// document built without a server, see [`crate::api::openapi_document`]).
pub fn document(
    (schemas, mut paths, method_router): UtoipaMethodRouter<Shared>,
) -> UtoipaMethodRouter<Shared> {
    for item in paths.paths.values_mut() {
        if let Some(op) = item.post.as_mut() {
            op.responses
                .responses
                .insert("429".into(), RefOr::T(too_many_requests_answer()));
        }
    }
    (schemas, paths, method_router)
}

fn too_many_requests_answer() -> openapi::Response {
    let seconds = openapi::ObjectBuilder::new()
        .schema_type(openapi::schema::Type::Integer)
        .build();
    openapi::ResponseBuilder::new()
        .description(
            "Too many creates in progress and waiting (`too_many_requests`); retry after \
             `Retry-After` seconds",
        )
        .content(
            "application/json",
            openapi::Content::new(Some(openapi::Ref::from_schema_name("ErrorBody"))),
        )
        .header(
            "Retry-After",
            openapi::HeaderBuilder::new()
                .schema(Some(seconds))
                .description(Some("Seconds to wait before retrying"))
                .build(),
        )
        .build()
}

/// Middleware of the create route: [`admitted`] around the handler; the creates that answer
/// 201 are timed.
async fn admit(State(s): State<Shared>, req: Request, next: Next) -> Result<Response, ApiError> {
    admitted(&s, next.run(req), |response: &Response| {
        response.status() == StatusCode::CREATED
    })
    .await
}

/// Runs one sandbox create under admission control — the one path of every surface that
/// creates a sandbox (the `/v1` route through [`admit`], MCP's `create_sandbox`): in a slot,
/// waiting in the queue if there is room, else refused at once with 429. The create runs in
/// its own task, to its end even when its caller leaves (dropped halfway, it would leave a
/// `creating` row over a live sandbox whose agent nobody reaps), and keeps its slot until it
/// is done. Creates for which `succeeded` holds are timed for [`crate::metrics`].
pub(crate) async fn admitted<T, F>(
    s: &Shared,
    create: F,
    succeeded: fn(&T) -> bool,
) -> Result<T, ApiError>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let admission = &s.admission;
    let permit = match admission.slots.clone().try_acquire_owned() {
        Ok(permit) => permit,
        Err(_) => {
            let place = admission.join_queue();
            if place.is_none() && !admission.borrow_pool_slot() {
                s.metrics.reject_create();
                let retry_after_secs = admission.retry_after(s.metrics.mean_create());
                return Err(ApiError::TooManyRequests {
                    message: format!(
                        "too many sandbox creates at once ({} in progress, {} waiting): retry \
                         after {retry_after_secs} s",
                        admission.max_creating, admission.queue
                    ),
                    retry_after_secs,
                });
            }
            let permit = admission
                .slots
                .clone()
                .acquire_owned()
                .await
                .map_err(|e| ApiError::internal("the create slots are closed", e))?;
            drop(place);
            permit
        }
    };
    let started = Instant::now();
    let metrics = s.metrics.clone();
    let create = tokio::spawn(async move {
        let outcome = create.await;
        drop(permit);
        if succeeded(&outcome) {
            metrics.observe_create(started.elapsed());
        }
        outcome
    });
    create
        .await
        .map_err(|e| ApiError::internal("a sandbox create failed", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_is_bounded_and_places_come_back() {
        let a = Admission::new(1, 2);
        let first = a.join_queue().expect("room");
        let second = a.join_queue().expect("room");
        assert!(a.join_queue().is_none(), "a queue of 2 took a third");
        drop(first);
        let third = a.join_queue().expect("a place was given back");
        drop((second, third));
        assert_eq!(a.waiting.load(Ordering::Acquire), 0);
        assert!(Admission::new(1, 0).join_queue().is_none());
    }

    #[tokio::test]
    async fn a_slot_the_pool_holds_is_lent_to_one_create() {
        let a = Admission::new(1, 0);
        assert!(
            !a.borrow_pool_slot(),
            "nothing to borrow without a pool slot"
        );
        let held = a.pool_slot().await.expect("a free slot");
        assert!(a.slots.clone().try_acquire_owned().is_err());
        assert!(a.borrow_pool_slot(), "the pool's slot is lent");
        assert!(!a.borrow_pool_slot(), "and lent once only");
        let waiter = {
            let slots = a.slots.clone();
            tokio::spawn(async move { slots.acquire_owned().await })
        };
        drop(held);
        let permit = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the borrower gets the slot")
            .expect("task")
            .expect("open");
        drop(permit);
        assert_eq!(a.lendable.load(Ordering::Acquire), 0);
        // A pool slot nobody borrowed leaves nothing lendable behind.
        drop(a.pool_slot().await.expect("a free slot"));
        assert_eq!(a.lendable.load(Ordering::Acquire), 0);
        assert!(!a.borrow_pool_slot());
    }

    #[test]
    fn retry_after_follows_the_mean_create_time() {
        let a = Admission::new(2, 4);
        assert_eq!(a.retry_after(None), 3);
        assert_eq!(a.retry_after(Some(Duration::from_millis(100))), 1);
        assert_eq!(a.retry_after(Some(Duration::from_secs(2))), 6);
        assert_eq!(
            a.retry_after(Some(Duration::from_secs(3600))),
            MAX_RETRY_AFTER_SECS
        );
        assert_eq!(Admission::new(0, 0).max_creating, 1);
    }
}
