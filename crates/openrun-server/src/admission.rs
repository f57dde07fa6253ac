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
//! The warm pool's refill takes a slot too ([`Admission::pool_slot`]), but it lends it: a
//! user create that finds every slot taken and the queue full while a refill waits for a
//! slot or holds one waits for a slot like one more queued create, instead of being refused
//! (a refill is one short fork, and the pool starts none while a user create is in
//! progress). One such create per refill at a time; one that leaves gives the loan back.

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
    /// Refills waiting for or holding a slot ([`PoolSlot`]).
    pool_slots: Arc<AtomicUsize>,
    /// User creates waiting on a slot lent by a refill ([`Admission::borrow_pool_slot`]).
    borrowers: Arc<AtomicUsize>,
}

/// A create slot held by the warm pool's refill. From the moment the refill starts waiting
/// for it until the slot is given back, one user create that would be refused waits for a
/// slot instead ([`Admission::borrow_pool_slot`]).
pub(crate) struct PoolSlot {
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    _counted: Held,
}

impl Drop for PoolSlot {
    fn drop(&mut self) {
        // The slot goes back before the refill stops counting (`_counted` is dropped after
        // this): a create never finds neither a free slot nor one to borrow in between. The
        // semaphore hands it to the longest waiter, a borrower included (it is fair).
        drop(self.permit.take());
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
            pool_slots: Arc::new(AtomicUsize::new(0)),
            borrowers: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// A create slot for the warm pool's refill, waited for; a user create may borrow it
    /// while the refill waits for it or holds it (see the module documentation).
    pub(crate) async fn pool_slot(&self) -> Result<PoolSlot, ApiError> {
        // Counted while waiting too, and given back if the wait is dropped.
        let counted = Held::take(&self.pool_slots);
        let permit = self.slot().await?;
        Ok(PoolSlot {
            permit: Some(permit),
            _counted: counted,
        })
    }

    /// Borrows a slot a refill waits for or holds, if fewer creates borrow than refills count:
    /// the caller may then wait for a slot although the queue is full. Given back when
    /// dropped (once the caller has its slot, or when it leaves while waiting).
    fn borrow_pool_slot(&self) -> Option<Held> {
        self.borrowers
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                (b < self.pool_slots.load(Ordering::Acquire)).then_some(b + 1)
            })
            .ok()
            .map(|_| Held(self.borrowers.clone()))
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
    fn join_queue(&self) -> Option<Held> {
        self.waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                (w < self.queue).then_some(w + 1)
            })
            .ok()
            .map(|_| Held(self.waiting.clone()))
    }

    /// Seconds until the creates ahead of a newcomer should have drained: the mean create time
    /// (1 s before any) times the queued rounds, between 1 and [`MAX_RETRY_AFTER_SECS`].
    fn retry_after(&self, mean_create: Option<Duration>) -> u64 {
        let mean = mean_create.unwrap_or(Duration::from_secs(1)).as_secs_f64();
        let rounds = (self.queue + self.max_creating).div_ceil(self.max_creating) as f64;
        ((mean * rounds).ceil() as u64).clamp(1, MAX_RETRY_AFTER_SECS)
    }
}

/// One unit of a counter (a queue place, a refill's slot, a borrower), given back when
/// dropped.
struct Held(Arc<AtomicUsize>);

impl Held {
    /// Takes one unit of `counter`, unbounded.
    fn take(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::AcqRel);
        Self(counter.clone())
    }
}

impl Drop for Held {
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
            let place = admission
                .join_queue()
                .or_else(|| admission.borrow_pool_slot());
            if place.is_none() {
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
    async fn a_slot_the_pool_holds_is_lent_to_one_create_at_a_time() {
        let a = Admission::new(1, 0);
        assert!(
            a.borrow_pool_slot().is_none(),
            "nothing to borrow without a pool slot"
        );
        let held = a.pool_slot().await.expect("a free slot");
        assert!(a.slots.clone().try_acquire_owned().is_err());
        let borrowed = a.borrow_pool_slot().expect("the pool's slot is lent");
        assert!(a.borrow_pool_slot().is_none(), "and lent once only");
        // A borrower that leaves while waiting gives the loan back.
        drop(borrowed);
        let borrowed = a.borrow_pool_slot().expect("lent again");
        let waiter = {
            let slots = a.slots.clone();
            tokio::spawn(async move { slots.acquire_owned().await })
        };
        tokio::task::yield_now().await;
        drop(held);
        let permit = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the borrower gets the slot")
            .expect("task")
            .expect("open");
        drop(borrowed);
        drop(permit);
        assert_eq!(a.pool_slots.load(Ordering::Acquire), 0);
        assert_eq!(a.borrowers.load(Ordering::Acquire), 0);
        assert!(a.borrow_pool_slot().is_none());
    }

    #[tokio::test]
    async fn a_refill_waiting_for_a_slot_already_lends_it() {
        let a = Arc::new(Admission::new(1, 0));
        let user = a.slots.clone().try_acquire_owned().expect("a free slot");
        let refill = {
            let a = a.clone();
            tokio::spawn(async move { a.pool_slot().await.map(drop) })
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while a.pool_slots.load(Ordering::Acquire) == 0 {
            assert!(Instant::now() < deadline, "the refill never waited");
            tokio::task::yield_now().await;
        }
        let borrowed = a.borrow_pool_slot().expect("lent while the refill waits");
        drop(user);
        tokio::time::timeout(Duration::from_secs(5), refill)
            .await
            .expect("the refill gets the slot")
            .expect("task")
            .expect("open");
        drop(borrowed);
        assert_eq!(a.pool_slots.load(Ordering::Acquire), 0);
        // A refill whose wait is dropped stops counting.
        let user = a.slots.clone().try_acquire_owned().expect("a free slot");
        let mut waiting = Box::pin(a.pool_slot());
        assert!(
            tokio::time::timeout(Duration::from_millis(20), &mut waiting)
                .await
                .is_err()
        );
        assert_eq!(a.pool_slots.load(Ordering::Acquire), 1);
        drop(waiting);
        assert_eq!(a.pool_slots.load(Ordering::Acquire), 0);
        drop(user);
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
