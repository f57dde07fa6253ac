//! The warm pool (`openrun serve --warm-pool N`, default [`DEFAULT_SIZE`]): up to N sandboxes
//! made ahead of demand with exactly the spec a default create (`POST /v1/sandboxes {}`)
//! gets, so such a create only has to claim one instead of forking a new one.
//!
//! - **What is pooled.** The spec is built once at start by [`crate::api::default_spec`], the
//!   same steps a create takes (`spec_from`, the server's default limits, the `host` image,
//!   the proxy environment of network mode `none`). A create claims a pooled sandbox only
//!   when its own final spec matches it in everything fixed when a sandbox is forked: image,
//!   limits, storage, environment, working directory, user ([`matches`]). What lives only in
//!   the database or can change later is applied at claim time: owner, labels, the lifetime
//!   (the agent's timer and the runtime record's deadline are set to the caller's TTL, as
//!   `POST .../ttl` does), a network policy of mode `none` without secrets (nothing of it is
//!   in the sandbox). Every other create (env, limits, image, workdir, user, network) is made
//!   cold as before.
//! - **One core.** The pool is a detail of [`crate::api::create_sandbox`], the one create of
//!   REST, E2B, MCP and forks: a claimed sandbox gets the same row, `sandbox.create` event
//!   and answer as a cold one; its id is the pooled sandbox's (ids are server-chosen).
//! - **Claimed once.** Ready sandboxes sit in a queue behind a mutex: a pop hands each to one
//!   create only, and the database claim ([`db::claim_pooled`]) deletes its pool row in the
//!   transaction that records its owner.
//! - **Nobody's until claimed.** A pooled sandbox has no row in `sandboxes`: no list, get,
//!   E2B, MCP or metrics surface shows it and no quota counts it. Its row in `warm_pool` is
//!   written before it is made, so a server that stops without destroying the pool (SIGKILL,
//!   crash) finds and removes what is left at its next start ([`reconcile`]); a pooled
//!   sandbox also carries a lifetime of [`LIFETIME`] (its agent ends it even if no server
//!   ever starts again) and is replaced after [`RETIRE_AFTER`] in the pool. Shutdown destroys
//!   the pool ([`Pool::shutdown`]).
//! - **User creates first.** One refill runs at a time, in a create slot of the admission
//!   control (`--max-creating`), and only while no user create is in progress: under load the
//!   pool drains and creates are made cold, and it refills once the burst is over. A refill
//!   also waits until the API has served no request for [`QUIET`] (at most [`MAX_DEFER`]),
//!   so it runs while clients think rather than while they wait. A user
//!   create that would be refused (slots and queue full) while a refill waits for a slot or
//!   holds one waits for a slot instead ([`crate::admission::Admission::pool_slot`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use openrun_protocol::{AgentMessage, ExecRequest, Request, Response as AgentResponse};
use openrun_runtime::client::{ClientError, IdleAgent};
use openrun_runtime::{AgentClient, Sandbox, SandboxSpec};

use crate::api::{blocking, Shared};
use crate::db;
use crate::error::{ApiError, ServerError};

/// Sandboxes kept ready by default.
pub const DEFAULT_SIZE: usize = 4;

/// Lifetime of a pooled sandbox until it is claimed (the claim sets the caller's): a server
/// that dies for good does not leave its pool running forever.
pub const LIFETIME: Duration = Duration::from_secs(60 * 60);

/// A pooled sandbox older than this is destroyed and replaced, well before [`LIFETIME`].
const RETIRE_AFTER: Duration = Duration::from_secs(30 * 60);

/// How often an idle pool looks for sandboxes to retire.
const IDLE_CHECK: Duration = Duration::from_secs(60);

/// Longest wait after a failed refill before the next try.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// How long a claim waits for the pooled sandbox's agent.
const AGENT_WAIT: Duration = Duration::from_secs(5);

/// How long the API must have served no request before a refill starts: a fork keeps the
/// CPUs busy for a few ms, which a client's requests (the first command in the sandbox it just
/// claimed, its next create) should not share ([`crate::activity`]).
const QUIET: Duration = Duration::from_millis(5);

/// The longest a refill waits for [`QUIET`]: with requests that stay open (an attached
/// command, an event stream) or never pause, the pool still refills.
const MAX_DEFER: Duration = Duration::from_millis(250);

/// How long shutdown waits for a refill in progress.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);

/// A ready sandbox.
pub(crate) struct Ready {
    sandbox: Sandbox,
    /// A connection to its agent made (and `Hello`'d) while nobody waited: the claim sets the
    /// caller's lifetime through it, then the first exec uses it ([`crate::agent_conns`]).
    client: Option<IdleAgent>,
    made: Instant,
}

impl Ready {
    /// Its id.
    pub(crate) fn id(&self) -> &str {
        self.sandbox.id()
    }
}

/// The pool: its ready sandboxes, the spec they were made with, and its counters.
pub struct Pool {
    target: usize,
    spec: OnceLock<SandboxSpec>,
    ready: Mutex<VecDeque<Ready>>,
    /// Wakes the refiller (a claim, a user create that ended).
    wake: tokio::sync::Notify,
    closed: tokio::sync::watch::Sender<bool>,
    /// User creates in progress: the refiller waits while there are any.
    user_creates: AtomicUsize,
    hits: AtomicU64,
    misses: AtomicU64,
    refiller: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// What `/metrics` shows of the pool.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    /// Configured size (`--warm-pool`).
    pub target: usize,
    /// Sandboxes ready now.
    pub ready: usize,
    /// Creates served from the pool.
    pub hits: u64,
    /// Creates the pool could have served but found it empty.
    pub misses: u64,
}

/// Counts a user create in progress while it lives (see [`Pool::user_create`]).
pub(crate) struct UserCreate<'a>(&'a Pool);

impl Drop for UserCreate<'_> {
    fn drop(&mut self) {
        if self.0.user_creates.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.wake.notify_one();
        }
    }
}

impl Pool {
    /// A pool of `target` sandboxes (0: none), empty until [`start`].
    pub fn new(target: usize) -> Self {
        Self {
            target,
            spec: OnceLock::new(),
            ready: Mutex::new(VecDeque::new()),
            wake: tokio::sync::Notify::new(),
            closed: tokio::sync::watch::channel(false).0,
            user_creates: AtomicUsize::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            refiller: Mutex::new(None),
        }
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<Ready>> {
        self.ready.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Marks a user create in progress until the guard drops: refills wait for it.
    pub(crate) fn user_create(&self) -> UserCreate<'_> {
        self.user_creates.fetch_add(1, Ordering::AcqRel);
        UserCreate(self)
    }

    /// A ready sandbox for a create whose final spec is `spec`, if it matches the pool's and
    /// one is ready; it is the caller's alone (a pop under the lock). Counts a hit or, for a
    /// matching spec that finds the pool empty, a miss.
    pub(crate) fn take(&self, spec: &SandboxSpec) -> Option<Ready> {
        if self.target == 0 || self.is_closed() {
            return None;
        }
        let pooled = self.spec.get()?;
        if !matches(pooled, spec) {
            return None;
        }
        let taken = self.lock().pop_front();
        match &taken {
            Some(_) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                self.wake.notify_one();
            }
            None => {
                self.misses.fetch_add(1, Ordering::Relaxed);
            }
        }
        taken
    }

    /// Its counters now.
    pub fn stats(&self) -> Stats {
        Stats {
            target: self.target,
            ready: self.lock().len(),
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
        }
    }

    /// Stops refilling and destroys every pooled sandbox (a refill in progress is waited for
    /// and destroyed too). Called when the server stops.
    pub async fn shutdown(state: &Shared) {
        let pool = &state.pool;
        pool.closed.send_replace(true);
        pool.wake.notify_one();
        let refiller = pool
            .refiller
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(mut refiller) = refiller {
            if tokio::time::timeout(SHUTDOWN_WAIT, &mut refiller)
                .await
                .is_err()
            {
                tracing::warn!("the warm pool's refill did not end in time");
                refiller.abort();
            }
        }
        let drained: Vec<Ready> = pool.lock().drain(..).collect();
        for ready in drained {
            destroy(state, ready.sandbox).await;
        }
        // What is left in the table is a previous server's, still waiting for a late look
        // (see [`reconcile`]): one more now; the rows stay for the next start.
        let left = state.db.call(|c| db::pooled(c)).await.unwrap_or_default();
        for id in left {
            if discard(state, &id, Duration::ZERO).await == Some(true) {
                tracing::info!(id, "removed a late warm-pool sandbox of a previous server");
                forget(state, &id).await;
            }
        }
    }
}

/// Whether a create whose final spec is `spec` may take a sandbox made with `pooled`: equal
/// in everything fixed when a sandbox is forked. The lifetime (set at claim) and the id
/// (the pooled sandbox's) are not compared.
pub(crate) fn matches(pooled: &SandboxSpec, spec: &SandboxSpec) -> bool {
    pooled.image == spec.image
        && pooled.limits == spec.limits
        && pooled.storage == spec.storage
        && pooled.env == spec.env
        && pooled.cwd == spec.cwd
        && pooled.user == spec.user
        && pooled.exit_with_creator == spec.exit_with_creator
}

/// Later looks at a leftover pool row whose sandbox did not exist yet: a previous server
/// killed while its helper was starting may see that helper finish the sandbox after the
/// first look. Its row stays until the last look.
const LATE_SWEEPS: [Duration; 2] = [Duration::from_secs(2), Duration::from_secs(20)];

/// At start, before anything else runs: destroys what a previous server left of its pool
/// (every sandbox recorded in `warm_pool`, made or half-made) and forgets it. A row whose
/// sandbox does not exist yet (its create may still be under way in a helper the dead server
/// started) is looked at again later ([`LATE_SWEEPS`], and at shutdown) before it goes.
pub async fn reconcile(state: &Shared) -> Result<(), ServerError> {
    let left = state.db.call(|c| db::pooled(c)).await?;
    for id in left {
        match discard(state, &id, crate::maintenance::SETTLE).await {
            Some(true) => {
                tracing::info!(id, "removed a warm-pool sandbox of a previous server");
                forget(state, &id).await;
            }
            Some(false) => {
                let (state, id) = (state.clone(), id.clone());
                tokio::spawn(async move {
                    for wait in LATE_SWEEPS {
                        tokio::time::sleep(wait).await;
                        if discard(&state, &id, Duration::ZERO).await == Some(true) {
                            tracing::info!(
                                id,
                                "removed a late warm-pool sandbox of a previous server"
                            );
                        }
                    }
                    forget(&state, &id).await;
                });
            }
            // Retried at the next start: the row stays.
            None => {}
        }
    }
    Ok(())
}

/// Removes whatever exists of pooled sandbox `id` (see `Runtime::discard`); whether anything
/// did, `None` (logged) when it could not be removed.
async fn discard(state: &Shared, id: &str, settle: Duration) -> Option<bool> {
    let runtime = state.runtime.clone();
    let key = id.to_string();
    match blocking(move || runtime.discard(&key, settle)).await {
        Ok(Ok(existed)) => Some(existed),
        Ok(Err(e)) => {
            tracing::error!(id, error = %e, "cannot remove a warm-pool sandbox");
            None
        }
        Err(e) => {
            tracing::error!(id, error = %e, "cannot remove a warm-pool sandbox");
            None
        }
    }
}

/// Forgets pool row `id` (a failure is logged: the next start looks again).
async fn forget(state: &Shared, id: &str) {
    let key = id.to_string();
    if let Err(e) = state
        .db
        .call_unsynced(move |c| db::remove_pooled(c, &key))
        .await
    {
        tracing::warn!(id, error = %e, "cannot forget a warm-pool sandbox");
    }
}

/// Builds the pool's spec and starts refilling it in the background (nothing with a size of 0).
pub async fn start(state: &Shared) -> Result<(), ApiError> {
    let pool = &state.pool;
    if pool.target == 0 {
        return Ok(());
    }
    let spec = crate::api::default_spec(state).await?;
    let _ = pool.spec.set(spec);
    let task = tokio::spawn(refill(state.clone()));
    *pool.refiller.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
    Ok(())
}

/// Keeps the pool full, one sandbox at a time, until it is closed.
async fn refill(state: Shared) {
    let pool = &state.pool;
    let mut closed = pool.closed.subscribe();
    let mut backoff = Duration::from_millis(100);
    // Since when the next refill has waited for the API to be quiet.
    let mut deferred: Option<Instant> = None;
    loop {
        if pool.is_closed() {
            return;
        }
        retire(&state).await;
        let wanted = pool.lock().len() < pool.target;
        let busy = pool.user_creates.load(Ordering::Acquire) > 0;
        if !wanted || busy {
            // The wait for a quiet API starts again after this one.
            deferred = None;
            tokio::select! {
                () = pool.wake.notified() => {}
                _ = closed.wait_for(|c| *c) => {}
                () = tokio::time::sleep(IDLE_CHECK) => {}
            }
            continue;
        }
        let waited = deferred.get_or_insert_with(Instant::now).elapsed();
        if let Some(wait) = quiet_wait(state.activity.quiet_for(), waited) {
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = closed.wait_for(|c| *c) => return,
            }
            continue;
        }
        deferred = None;
        // In a create slot like any create: `--max-creating` bounds the pool's work too.
        let slot = tokio::select! {
            slot = state.admission.pool_slot() => slot,
            _ = closed.wait_for(|c| *c) => return,
        };
        let Ok(slot) = slot else { return };
        let made = make(&state).await;
        drop(slot);
        match made {
            Ok(ready) if pool.is_closed() => destroy(&state, ready.sandbox).await,
            Ok(ready) => {
                tracing::debug!(id = ready.id(), "warm-pool sandbox ready");
                pool.lock().push_back(ready);
                backoff = Duration::from_millis(100);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot make a warm-pool sandbox");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    _ = closed.wait_for(|c| *c) => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// How much longer a refill waits for the API to be quiet ([`QUIET`]), given how long no
/// request has been in progress (`None`: one is) and how long it has waited already; `None`:
/// it starts now.
fn quiet_wait(quiet_for: Option<Duration>, waited: Duration) -> Option<Duration> {
    let left = MAX_DEFER.saturating_sub(waited);
    if left.is_zero() {
        return None;
    }
    let until_quiet = match quiet_for {
        Some(quiet) => QUIET.saturating_sub(quiet),
        // Looked at again then.
        None => QUIET,
    };
    (!until_quiet.is_zero()).then(|| until_quiet.min(left))
}

/// Makes one pooled sandbox: its `warm_pool` row first, then the sandbox.
async fn make(state: &Shared) -> Result<Ready, ApiError> {
    let Some(spec) = state.pool.spec.get() else {
        return Err(ApiError::internal(
            "the warm pool has no spec",
            "not started",
        ));
    };
    let mut spec = spec.clone();
    let id = openrun_runtime::state::new_id();
    spec.id = Some(id.clone());
    spec.lifetime = Some(LIFETIME);
    let key = id.clone();
    // Unsynced (Db::call_unsynced): a pooled sandbox ends with the host anyway.
    state
        .db
        .call_unsynced(move |c| db::insert_pooled(c, &key))
        .await?;
    let runtime = state.runtime.clone();
    let helper = state.helper.clone();
    let created = blocking(move || runtime.create_with_helper(&spec, &helper))
        .await
        .and_then(|made| made.map_err(|e| ApiError::from_runtime("cannot create the sandbox", e)));
    let sandbox = match created {
        Ok(sandbox) => sandbox,
        Err(e) => {
            // A failed create removes what it made; its row goes too.
            forget(state, &id).await;
            return Err(e);
        }
    };
    // The helper has exited: the agent is now this process's child (we are a subreaper).
    state.agents.track(sandbox.record().pid);
    // Connected now rather than by the claim (a failure here is the claim's to retry).
    let client = match tokio::time::timeout(AGENT_WAIT, sandbox.connect()).await {
        Ok(Ok(mut client)) => match tokio::time::timeout(AGENT_WAIT, warm_up(&mut client)).await {
            Ok(Ok(())) => client.into_idle(),
            Ok(Err(e)) => {
                tracing::debug!(id, error = %e, "warm-pool sandbox not warmed up");
                // An agent refusal (no `true` in the image) leaves the connection in order;
                // after anything else something may still be owed on it: the claim connects
                // afresh.
                matches!(e, ClientError::Agent(_))
                    .then(|| client.into_idle())
                    .flatten()
            }
            Err(_) => None,
        },
        Ok(Err(e)) => {
            tracing::debug!(id, error = %e, "cannot connect to a warm-pool sandbox yet");
            None
        }
        Err(_) => None,
    };
    Ok(Ready {
        sandbox,
        client,
        made: Instant::now(),
    })
}

/// Runs `true` once in a new pooled sandbox and forgets it (`Release`), so that the claimer's
/// first command does not pay for the agent's first start: its exec path's first page faults,
/// its first read of the user database, its heap grown back after the trim at start. Measured
/// with `openrun-bench`-style creates: the first exec in a sandbox took ~0.4 ms longer than the
/// second (1.66 vs 1.26 ms), its agent twice the CPU (0.46 vs 0.22 ms) and 13 page faults
/// instead of 1. Nothing of it stays: the process table is empty again, no event is recorded
/// (the sandbox belongs to nobody yet), and only the next pid shows a process came and went.
async fn warm_up(client: &mut AgentClient) -> Result<(), ClientError> {
    let request = Request::Exec(ExecRequest {
        argv: vec!["true".into()],
        attach: true,
        tag: Some("warm-up".into()),
        ..Default::default()
    });
    let pid = match client.call(request).await?.header {
        AgentResponse::Started { pid } => pid,
        other => return Err(ClientError::Unexpected(format!("{other:?}"))),
    };
    loop {
        if let AgentMessage::Exit { pid: ended, .. } = client.next_event().await?.header {
            if ended == pid {
                break;
            }
        }
    }
    client.call(Request::Release { pid }).await?;
    Ok(())
}

/// Destroys pooled sandboxes older than [`RETIRE_AFTER`] (the refill replaces them).
async fn retire(state: &Shared) {
    let old: Vec<Ready> = {
        let mut ready = state.pool.lock();
        let mut old = Vec::new();
        let mut keep = VecDeque::with_capacity(ready.len());
        for r in ready.drain(..) {
            if r.made.elapsed() >= RETIRE_AFTER {
                old.push(r);
            } else {
                keep.push_back(r);
            }
        }
        *ready = keep;
        old
    };
    for ready in old {
        tracing::debug!(id = ready.id(), "retiring a warm-pool sandbox");
        destroy(state, ready.sandbox).await;
    }
}

/// Sets the lifetime of `client`'s agent to `ttl` (none: no limit); the client back once the
/// agent answered.
async fn set_lifetime(
    mut client: AgentClient,
    ttl: Option<Duration>,
) -> Result<AgentClient, String> {
    let request = Request::SetLifetime {
        remaining_ms: ttl.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
    };
    match tokio::time::timeout(AGENT_WAIT, client.call(request)).await {
        Ok(Ok(frame)) if frame.header == AgentResponse::Done => Ok(client),
        Ok(Ok(frame)) => Err(format!("unexpected answer: {:?}", frame.header)),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("the agent did not answer within {AGENT_WAIT:?}")),
    }
}

/// Destroys a pooled sandbox and forgets it (a failure is logged: the next start retries).
pub(crate) async fn destroy(state: &Shared, sandbox: Sandbox) {
    let id = sandbox.id().to_string();
    let runtime = state.runtime.clone();
    let destroyed = blocking(move || runtime.destroy(sandbox)).await;
    state.agents.reap();
    match destroyed {
        Ok(Ok(())) => forget(state, &id).await,
        Ok(Err(e)) => tracing::warn!(id, error = %e, "cannot destroy a warm-pool sandbox"),
        Err(e) => tracing::warn!(id, error = %e, "cannot destroy a warm-pool sandbox"),
    }
}

/// Hands a pooled sandbox to its creator: its lifetime becomes `ttl` (the agent's timer and
/// the runtime record's deadline, like `POST .../ttl`), then `row` and `event` are recorded
/// in the transaction that takes it out of the pool. Returns the sandbox, the connection to
/// its agent that set the lifetime (idle: nothing is in flight on it) and the row recorded.
/// `Err(None)`: the pooled sandbox was unusable (destroyed here; make one cold instead);
/// `Err(Some(_))`: the create failed.
pub(crate) async fn claim(
    state: &Shared,
    ready: Ready,
    ttl: Option<Duration>,
    row: db::SandboxRow,
    event: db::NewEvent,
) -> Result<(Sandbox, AgentClient, db::SandboxRow), Option<ApiError>> {
    let mut sandbox = ready.sandbox;
    let parked = ready.client.and_then(IdleAgent::reuse);
    let deadline = row.expires_at.and_then(|t| u64::try_from(t).ok());
    let client = match parked {
        Some(client) => Ok(client),
        None => sandbox.connect().await.map_err(|e| e.to_string()),
    };
    let set = match client {
        // The agent's timer and the runtime record are independent: both are set at once.
        Ok(client) => {
            let runtime = state.runtime.clone();
            let (answer, saved) = tokio::join!(
                set_lifetime(client, ttl),
                blocking(move || {
                    let saved = runtime.set_expiry(&mut sandbox, deadline);
                    (sandbox, saved)
                })
            );
            saved.map(|(sandbox, saved)| (sandbox, saved.map_err(|e| e.to_string()).and(answer)))
        }
        Err(e) => Ok((sandbox, Err(e))),
    };
    let (sandbox, client) = match set {
        Ok((sandbox, Ok(client))) => (sandbox, client),
        Ok((sandbox, Err(e))) => {
            tracing::warn!(id = sandbox.id(), error = %e, "a warm-pool sandbox is unusable");
            destroy(state, sandbox).await;
            return Err(None);
        }
        // The blocking task failed: the sandbox went with it (its pool row is removed at
        // the next start).
        Err(e) => return Err(Some(e)),
    };
    let stored = row.clone();
    let claimed = state
        .db
        .call(move |c| db::claim_pooled(c, &stored, &event))
        .await;
    match claimed {
        Ok(true) => Ok((sandbox, client, row)),
        Ok(false) => {
            destroy(state, sandbox).await;
            Err(None)
        }
        Err(e) => {
            destroy(state, sandbox).await;
            Err(Some(e.into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refill_waits_for_a_quiet_api_but_not_beyond_the_longest_deferral() {
        let ms = Duration::from_millis;
        // A request in progress: look again after QUIET.
        assert_eq!(quiet_wait(None, Duration::ZERO), Some(QUIET));
        // Quiet for a while, not long enough: the rest of QUIET.
        assert_eq!(quiet_wait(Some(ms(2)), ms(1)), Some(QUIET - ms(2)));
        // Quiet long enough: now.
        assert_eq!(quiet_wait(Some(QUIET), ms(1)), None);
        assert_eq!(quiet_wait(Some(ms(60_000)), Duration::ZERO), None);
        // Never quiet: no later than MAX_DEFER.
        assert_eq!(quiet_wait(None, MAX_DEFER - ms(1)), Some(ms(1)));
        assert_eq!(quiet_wait(None, MAX_DEFER), None);
        assert_eq!(quiet_wait(None, MAX_DEFER + ms(1)), None);
    }
}
