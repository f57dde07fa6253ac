//! Background work: reconciling the database with the sandboxes that exist at start, the TTL
//! reaper, and reaping this process's exited sandbox agents.

use std::os::fd::OwnedFd;
use std::sync::Mutex;
use std::time::Duration;

use rustix::process::{pidfd_open, waitid, Pid, PidfdFlags, WaitId, WaitIdOptions};

use std::collections::BTreeSet;

use openrun_protocol::{AgentMessage, AttachRequest, ErrorCode, ExitStatus, Request};
use openrun_runtime::{ClientError, RuntimeError};

use crate::api::{blocking, destroy, AppState, Caller, Shared};
use crate::db::{self, NewEvent, SandboxRow};
use crate::error::{ApiError, DbError, ServerError};

/// How often expired sandboxes and exited agents are looked for.
const TICK: Duration = Duration::from_secs(1);

/// Sandbox agents this process created. Their helper exits right after the fork, so they
/// become children of this process (a subreaper) and must be reaped here. Only these are
/// waited for, each through a pidfd: a pidfd names one process and can never match a reused
/// pid, and a `waitid(-1)` would steal the exit status that `std::process::Child` waits for.
#[derive(Default)]
pub struct AgentReaper {
    pidfds: Mutex<Vec<OwnedFd>>,
}

impl AgentReaper {
    /// Starts tracking the agent `pid`. Called while it cannot have been reaped yet (only this
    /// reaper reaps it), so the pid still names it.
    pub fn track(&self, pid: i32) {
        let Some(pid) = Pid::from_raw(pid) else {
            return;
        };
        match pidfd_open(pid, PidfdFlags::empty()) {
            Ok(fd) => self.lock().push(fd),
            Err(e) => {
                tracing::warn!(pid = pid.as_raw_nonzero().get(), error = %e, "cannot track a sandbox agent")
            }
        }
    }

    /// Reaps every tracked agent that has exited, without blocking.
    pub fn reap(&self) {
        self.lock().retain(|fd| {
            match waitid(
                WaitId::PidFd(std::os::fd::AsFd::as_fd(fd)),
                WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
            ) {
                Ok(None) | Err(rustix::io::Errno::INTR) => true,
                // Reaped, or not our child (it never was reparented to us): done either way.
                Ok(Some(_)) | Err(_) => false,
            }
        });
    }

    /// Number of agents still tracked.
    #[cfg(test)]
    pub fn tracked(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<OwnedFd>> {
        self.pidfds.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How long reconciliation waits for a create that a previous server left in progress.
pub(crate) const SETTLE: Duration = Duration::from_secs(5);

/// At start: sandboxes recorded as `creating` (the previous server stopped mid-create) are
/// removed, whatever exists of them, and become `error` (event `sandbox.error`); sandboxes
/// recorded as running or paused whose agent is gone become `stopped` (event
/// `sandbox.vanish`). Sandboxes the database does not know (`openrun create` shares the data
/// dir) are never touched, except the previous server's warm pool ([`crate::pool::reconcile`]:
/// it belongs to no one and is destroyed). Background processes still running get watchers
/// again.
pub async fn reconcile(state: &Shared) -> Result<(), ServerError> {
    crate::pool::reconcile(state).await?;
    let creating = state.db.call(|c| db::creating_sandboxes(c)).await?;
    for row in creating {
        let runtime = state.runtime.clone();
        let id = row.id.clone();
        let discarded = tokio::task::spawn_blocking(move || runtime.discard(&id, SETTLE))
            .await
            .map_err(ServerError::Task)?;
        let existed = match discarded {
            Ok(existed) => existed,
            Err(e) => {
                // Retried at the next start: the row stays `creating`.
                tracing::error!(id = row.id, error = %e, "cannot remove a half-created sandbox");
                continue;
            }
        };
        tracing::info!(id = row.id, existed, "removed a sandbox left half-created");
        let event = NewEvent {
            sandbox_id: row.id.clone(),
            tenant: row.tenant,
            actor: "system".into(),
            kind: "sandbox.error",
            payload: serde_json::json!({
                "message": "the server stopped while creating it",
                "removed": existed,
            }),
        };
        let id = row.id;
        state
            .db
            .call(move |c| db::fail_create(c, &id, false, &event))
            .await?;
    }
    let runtime = state.runtime.clone();
    let live = tokio::task::spawn_blocking(move || runtime.list())
        .await
        .map_err(ServerError::Task)??;
    let recorded = state.db.call(|c| db::live_sandboxes(c, None)).await?;
    for row in recorded {
        if live.iter().any(|r| r.id == row.id) {
            match_freezer(state, &row).await?;
            crate::relay::ensure_egress(state, &row.id, &row.tenant, None);
            continue;
        }
        let db::SandboxRow { id, tenant, .. } = row;
        tracing::info!(id, "sandbox vanished while the server was down");
        let event = NewEvent {
            sandbox_id: id.clone(),
            tenant,
            actor: "system".into(),
            kind: "sandbox.vanish",
            payload: serde_json::json!({ "reason": "not running when the server started" }),
        };
        state
            .db
            .call(move |c| db::stop_sandbox(c, &id, false, &event))
            .await?;
    }
    // Background processes of live sandboxes get their watchers back.
    rearm(state, None).await?;
    Ok(())
}

/// Makes a live sandbox's recorded state (`running` or `paused`) the kernel's: a server that
/// stopped between freezing or thawing a cgroup and recording it left them apart. The change
/// gets its event (actor `system`); a thawed sandbox's agent gets its lifetime back.
async fn match_freezer(state: &Shared, row: &SandboxRow) -> Result<(), ServerError> {
    let runtime = state.runtime.clone();
    let key = row.id.clone();
    let paused = tokio::task::spawn_blocking(move || {
        runtime
            .open_sandbox_exact(&key)
            .and_then(|sandbox| sandbox.is_paused())
    })
    .await
    .map_err(ServerError::Task)?;
    let (from, to, kind) = match (row.state.as_str(), paused) {
        ("running", Ok(true)) => ("running", "paused", "sandbox.pause"),
        ("paused", Ok(false)) => ("paused", "running", "sandbox.resume"),
        (_, Ok(_)) => return Ok(()),
        (_, Err(e)) => {
            tracing::warn!(id = row.id, error = %e, "cannot tell whether a sandbox is paused");
            return Ok(());
        }
    };
    tracing::info!(
        id = row.id,
        from,
        to,
        "sandbox state recorded apart from its cgroup"
    );
    let event = NewEvent {
        sandbox_id: row.id.clone(),
        tenant: row.tenant.clone(),
        actor: "system".into(),
        kind,
        payload: serde_json::json!({ "reason": "its cgroup was found so when the server started" }),
    };
    let key = row.id.clone();
    state
        .db
        .call(move |c| db::set_state(c, &key, &[from], to, &event))
        .await?;
    if to == "running" {
        let mut row = row.clone();
        row.state = to.into();
        if let Err(e) = crate::lifecycle::restore_lifetime(state, &row).await {
            tracing::warn!(id = row.id, error = %e, "cannot restore the agent's lifetime");
        }
    }
    Ok(())
}

/// Background processes being watched now (their `background_processes` row ids), so a
/// process gets one watcher however often watchers are armed.
static WATCHED: Mutex<BTreeSet<i64>> = Mutex::new(BTreeSet::new());

/// Records a background process the caller just started in `row`'s sandbox and watches it, so
/// its `process.exit` is recorded when it ends, by this server or the next one. A failure to
/// record it is logged: the process runs anyway.
pub async fn watch_background(state: &Shared, row: &SandboxRow, caller: &Caller, pid: i32) {
    if let Some(tracked) = track(state, row, caller, pid).await {
        arm(state, tracked);
    }
}

/// Records a process the caller just started in `row`'s sandbox as one whose exit is owed to
/// the timeline, without watching it: the caller (an attached exec's driver) records the exit
/// through [`record_exit`]. If this server dies first, the next one's [`rearm`] watches it
/// and records the exit instead. `None` (logged) when it cannot be recorded.
pub async fn track(
    state: &Shared,
    row: &SandboxRow,
    caller: &Caller,
    pid: i32,
) -> Option<db::BackgroundRow> {
    let (sandbox, tenant, actor) = (row.id.clone(), caller.tenant.clone(), caller.actor.clone());
    // Unsynced (Db::call_unsynced): the row matters only while the host runs (the sandbox
    // and its process end with it), and it keeps no exit waiting on the disk.
    let inserted = state
        .db
        .call_unsynced(move |c| db::insert_background(c, &sandbox, &tenant, &actor, pid))
        .await;
    match inserted {
        Ok(id) => Some(db::BackgroundRow {
            id,
            sandbox_id: row.id.clone(),
            tenant: caller.tenant.clone(),
            actor: caller.actor.clone(),
            pid,
        }),
        Err(e) => {
            tracing::error!(id = row.id, pid, error = %e, "cannot record a started process");
            None
        }
    }
}

/// Records the exit of a process from [`track`] (once, however many saw it end), or appends
/// `event` plainly when it could not be tracked.
///
/// Unsynced ([`crate::db::Db::call_unsynced`]): an exit is not something a caller did but
/// something the sandbox reports, and it is committed before anyone is told of it (the exit
/// line goes out after this returns). The commit survives a crash of this process; only a
/// power loss, which ends the sandbox and its processes too, can lose it (and then the next
/// synced commit did not happen either, or it flushed this one with its own). A row whose
/// exit was lost that way stays open and is closed by the next server's reconcile (the
/// sandbox is gone).
pub async fn record_exit(
    state: &Shared,
    tracked: Option<i64>,
    event: NewEvent,
) -> Result<(), DbError> {
    match tracked {
        Some(id) => state
            .db
            .call_unsynced(move |c| db::record_background_exit(c, id, &event))
            .await
            .map(|_| ()),
        None => {
            state
                .db
                .call_unsynced(move |c| db::append_event(c, &event))
                .await
        }
    }
}

/// Watches every background process of a running sandbox (of `sandbox_id` only, when given)
/// whose exit is not recorded yet: at start, and when a paused sandbox resumes.
pub async fn rearm(state: &Shared, sandbox_id: Option<&str>) -> Result<(), DbError> {
    let key = sandbox_id.map(str::to_owned);
    let pending = state
        .db
        .call(move |c| db::pending_background(c, key.as_deref()))
        .await?;
    for row in pending {
        arm(state, row);
    }
    Ok(())
}

/// Starts a watcher for `row` unless one runs.
fn arm(state: &Shared, row: db::BackgroundRow) {
    if !watched().insert(row.id) {
        return;
    }
    let state = state.clone();
    tokio::spawn(async move {
        if let Err(e) = watch(&state, &row).await {
            tracing::debug!(id = row.sandbox_id, pid = row.pid, error = %e, "background watcher ended");
        }
        watched().remove(&row.id);
    });
}

fn watched() -> std::sync::MutexGuard<'static, BTreeSet<i64>> {
    WATCHED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Follows one background process until it exits, then records `process.exit` (once: the row
/// says whether it was). A sandbox that goes away ends the watch with nothing recorded (its
/// own end is on the timeline); a process the agent no longer knows closes the row.
async fn watch(state: &Shared, row: &db::BackgroundRow) -> Result<(), ApiError> {
    let runtime = state.runtime.clone();
    let key = row.sandbox_id.clone();
    let sandbox = match blocking(move || runtime.open_sandbox_exact(&key)).await? {
        Ok(sandbox) => sandbox,
        Err(RuntimeError::NoSuchSandbox(_)) => return Ok(()),
        Err(e) => return Err(ApiError::internal("cannot open the sandbox", e)),
    };
    let oom_before = sandbox.oom_kills();
    let client = sandbox
        .connect()
        .await
        .map_err(|e| ApiError::internal("cannot reach the sandbox agent", e))?;
    let (mut sender, mut receiver) = client.split();
    // Offsets past any output: only the exit comes.
    let attach = Request::Attach(AttachRequest {
        pid: row.pid,
        stdout_since: u64::MAX,
        stderr_since: u64::MAX,
        follow: true,
    });
    let sent = sender
        .send(attach)
        .await
        .map_err(|e| ApiError::from_client("cannot follow the process", e))?;
    match receiver.response(sent).await {
        Ok(_) => {}
        Err(ClientError::Agent(e)) if e.code == ErrorCode::NoSuchProcess => {
            let id = row.id;
            state.db.call(move |c| db::close_background(c, id)).await?;
            return Ok(());
        }
        Err(e) => return Err(ApiError::from_client("cannot follow the process", e)),
    }
    loop {
        let frame = receiver
            .next()
            .await
            .map_err(|e| ApiError::from_client("lost the sandbox agent", e))?;
        if let AgentMessage::Exit { pid, mut status } = frame.header {
            if pid != row.pid {
                continue;
            }
            mark_oom(&mut status, || sandbox.oom_kills() > oom_before);
            let event = NewEvent {
                sandbox_id: row.sandbox_id.clone(),
                tenant: row.tenant.clone(),
                actor: row.actor.clone(),
                kind: "process.exit",
                payload: exit_payload(pid, &status),
            };
            record_exit(state, Some(row.id), event).await?;
            return Ok(());
        }
    }
}

/// A SIGKILL (or a shell's 137) while the memory cgroup counted new OOM kills is an OOM kill.
/// `new_oom_kills` (a read of the cgroup) is asked only for such an exit.
pub(crate) fn mark_oom(status: &mut ExitStatus, new_oom_kills: impl FnOnce() -> bool) {
    let killed = status.signal == Some(9) || status.code == Some(137);
    if killed && new_oom_kills() {
        status.oom_killed = true;
    }
}

/// The payload of a `process.exit` event.
pub(crate) fn exit_payload(pid: i32, status: &ExitStatus) -> serde_json::Value {
    serde_json::json!({
        "pid": pid,
        "code": status.code,
        "signal": status.signal,
        "timed_out": status.timed_out,
        "oom_killed": status.oom_killed,
    })
}

/// Every [`TICK`]: destroys sandboxes past their deadline (event `sandbox.expire`) and reaps
/// exited agents. Runs until aborted.
pub async fn run(state: Shared) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        state.conns.sweep();
        if let Err(e) = expire(&state).await {
            tracing::warn!(error = %e, "TTL reaper");
        }
        let agents = state.agents.clone();
        if let Err(e) = blocking(move || agents.reap()).await {
            tracing::warn!(error = %e, "agent reaper");
        }
    }
}

async fn expire(state: &AppState) -> Result<(), ApiError> {
    let now = crate::time::now_ms();
    let expired = state
        .db
        .call(move |c| db::live_sandboxes(c, Some(now)))
        .await?;
    for db::SandboxRow { id, tenant, .. } in expired {
        // A failure is retried on the next tick; the row stays running until it succeeds.
        destroy(state, &id).await?;
        tracing::info!(id, "sandbox expired");
        let event = NewEvent {
            sandbox_id: id.clone(),
            tenant,
            actor: "system".into(),
            kind: "sandbox.expire",
            payload: serde_json::json!({}),
        };
        let key = id.clone();
        state
            .db
            .call(move |c| db::stop_sandbox(c, &key, false, &event))
            .await?;
        state.egress.forget(&id);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reaps_only_its_own_exited_children() {
        // A child of this process that exits: tracked, then reaped (no zombie left). The
        // reaper, not std, waits for it here: that is what is tested.
        #[allow(clippy::zombie_processes)]
        let child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        let reaper = AgentReaper::default();
        reaper.track(pid);
        assert_eq!(reaper.tracked(), 1);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while reaper.tracked() > 0 && std::time::Instant::now() < deadline {
            reaper.reap();
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(reaper.tracked(), 0, "the exited child was not reaped");
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
        // Not our child (pid 1): dropped, never waited for.
        reaper.track(1);
        reaper.reap();
        assert_eq!(reaper.tracked(), 0);
    }
}
