//! `openrun up`: a repository (a git URL cloned in a sandbox, or a tar the client sent) turned
//! into a ready sandbox by a plan (`openrun_recipe`), set up step by step with a snapshot
//! before each step and a rollback when one fails, and remembered as a recipe so that the next
//! open of an unchanged repository starts from the recipe's snapshot. One core call,
//! [`open_repo`]; `POST /v1/up` and MCP's `up` are its adapters.

mod base;
mod recipes;
pub(crate) mod routes;
pub(crate) mod run;
mod setup;
mod source;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openrun_recipe::tree::TarTree;
use openrun_recipe::{recipe, Phase, PlanError};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::api::{blocking, Caller, Shared};
use crate::error::ApiError;
use run::run_command;

/// One line of the progress stream (`POST /v1/up`'s NDJSON).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum UpEvent {
    /// The plan, first.
    Plan {
        /// It.
        plan: Box<openrun_recipe::Plan>,
    },
    /// A step changed state.
    Step {
        /// Its name (`fetch`, `base`, `packages`, `copy`, a plan step's, `check`).
        step: String,
        /// What it runs, when it runs a command.
        #[serde(skip_serializing_if = "Option::is_none")]
        command: Option<String>,
        /// `running`, `ok`, `failed`, `rolled_back` or `cached`.
        status: StepStatus,
        /// How long it took (not on `running`).
        #[serde(skip_serializing_if = "Option::is_none")]
        duration_ms: Option<u64>,
        /// The command's exit code, when it ran one and it ended.
        #[serde(skip_serializing_if = "Option::is_none")]
        exit_code: Option<i32>,
    },
    /// Output of the running step's command.
    Output {
        /// The step.
        step: String,
        /// `stdout` or `stderr`.
        stream: &'static str,
        /// The bytes, base64.
        data_b64: String,
    },
}

/// A step's state in [`UpEvent::Step`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum StepStatus {
    /// Started.
    Running,
    /// Succeeded.
    Ok,
    /// Failed (its command's output came before).
    Failed,
    /// The sandbox went back to the snapshot taken before it.
    RolledBack,
    /// Not run: the recipe's snapshot (or a cached layer) has its effects.
    Cached,
}

/// How long a step event may wait for room in a full stream before the reader counts as gone
/// (a client that stays connected but stopped reading must not hold the open forever).
const STEP_SEND_DEADLINE: Duration = Duration::from_secs(300);

/// Where [`open_repo`] reports progress. Sending never fails the setup: a client that left
/// only stops seeing it. Output chunks are dropped while the stream is full (the commands'
/// tails are kept anyway); a step event that waits more than [`STEP_SEND_DEADLINE`] marks
/// the reader gone, and the open then stops as for a client that left.
#[derive(Debug, Clone)]
pub(crate) struct Progress {
    tx: Option<mpsc::Sender<UpEvent>>,
    /// Set when the reader counts as gone without having closed the stream.
    gone: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Progress {
    /// Progress to `tx`.
    pub(crate) fn new(tx: mpsc::Sender<UpEvent>) -> Self {
        Progress {
            tx: Some(tx),
            gone: Arc::new(tokio::sync::watch::Sender::new(false)),
        }
    }

    /// Progress nobody reads (it never counts as gone).
    #[cfg(test)]
    pub(crate) fn unread() -> Self {
        Progress {
            tx: None,
            gone: Arc::new(tokio::sync::watch::Sender::new(false)),
        }
    }

    /// Whether the reader left (a client that disconnected, or stopped reading for
    /// [`STEP_SEND_DEADLINE`]): the open stops (a running command is killed) and cleans up.
    pub(crate) fn cancelled(&self) -> bool {
        *self.gone.borrow() || self.tx.as_ref().is_some_and(|tx| tx.is_closed())
    }

    /// Resolves once the reader left (never for progress nobody reads).
    pub(crate) async fn reader_left(&self) {
        let Some(tx) = &self.tx else {
            return std::future::pending().await;
        };
        let mut gone = self.gone.subscribe();
        tokio::select! {
            () = tx.closed() => {}
            _ = gone.wait_for(|g| *g) => {}
        }
    }

    /// Sends `event`: output is dropped when the stream is full; other events wait for room
    /// up to [`STEP_SEND_DEADLINE`], after which the reader counts as gone. Nothing is sent
    /// to a reader that left.
    pub(crate) async fn send(&self, event: UpEvent) {
        let Some(tx) = &self.tx else { return };
        if self.cancelled() {
            return;
        }
        if matches!(event, UpEvent::Output { .. }) {
            self.output(event);
            return;
        }
        if tokio::time::timeout(STEP_SEND_DEADLINE, tx.send(event))
            .await
            .is_err()
        {
            tracing::warn!(
                "up: the reader took no event for {} s: it counts as gone, the open stops",
                STEP_SEND_DEADLINE.as_secs()
            );
            self.gone.send_replace(true);
        }
    }

    /// Sends an output event if the stream has room (never waits: output is dropped while a
    /// slow reader's stream is full).
    pub(crate) fn output(&self, event: UpEvent) {
        let Some(tx) = &self.tx else { return };
        if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(event) {
            tracing::debug!("up: the reader is slow, an output chunk was dropped");
        }
    }

    /// A step's state change.
    pub(crate) async fn step(
        &self,
        step: &str,
        command: Option<String>,
        status: StepStatus,
        duration_ms: Option<u64>,
        exit_code: Option<i32>,
    ) {
        self.send(UpEvent::Step {
            step: step.to_string(),
            command,
            status,
            duration_ms,
            exit_code,
        })
        .await;
    }
}

/// Why an `up` failed: the API error code, a message naming the file and step, and what the
/// client needs to find what is left.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct UpError {
    /// `no_project`, `invalid_config`, `fetch_failed`, `base_failed`, `packages_failed`,
    /// `step_failed`, or an API error's code (`invalid_argument`, `too_many_requests`, ...).
    pub code: String,
    /// What went wrong, naming the file and the step.
    pub message: String,
    /// The step that failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// The file the failure is about (`.devcontainer/devcontainer.json`, `package-lock.json`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// The command that failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// The sandbox kept (`keep`), rolled back to before the failed step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sandbox_id: Option<String>,
}

impl UpError {
    /// An error of `code` with `message` and nothing else.
    pub(crate) fn new(code: &str, message: impl Into<String>) -> Self {
        UpError {
            code: code.to_string(),
            message: message.into(),
            step: None,
            file: None,
            command: None,
            sandbox_id: None,
        }
    }

    /// The same error, at `step`.
    pub(crate) fn at_step(mut self, step: &str) -> Self {
        self.step = Some(step.to_string());
        self
    }
}

impl From<crate::error::DbError> for UpError {
    fn from(e: crate::error::DbError) -> Self {
        ApiError::from(e).into()
    }
}

impl From<ApiError> for UpError {
    fn from(e: ApiError) -> Self {
        UpError::new(e.status_and_code().1, e.reported())
    }
}

/// The error of an open stopped because its client left.
pub(crate) fn cancelled(step: &str) -> UpError {
    UpError::new(
        "cancelled",
        format!("the client left: stopped before step {step}"),
    )
    .at_step(step)
}

/// Longest the readiness check may run.
pub(crate) const CHECK_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// What a client asks of an up (besides the repository itself).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct UpRequest {
    /// The repository's name: the workspace is `/workspaces/<name>` unless the plan says.
    pub name: String,
    /// The repository's identity (`local:<host>:<path>`, `git:<url>[#ref]`), part of the key.
    pub repo: String,
    /// The readiness check (a shell command) instead of the plan's test.
    pub check: Option<String>,
    /// No check at all.
    pub no_check: bool,
    /// Only the plan: no sandbox.
    pub plan_only: bool,
    /// On a failure, keep the sandbox (rolled back to before the failed step).
    pub keep: bool,
    /// The sandbox's lifetime (default [`setup::DEFAULT_TTL`]).
    pub ttl: Option<String>,
}

/// Where the repository comes from.
#[derive(Debug)]
pub(crate) enum Source {
    /// A tar the client sent, received into a temporary file and indexed (found valid
    /// before the answer started).
    Upload(source::TempFile, TarTree),
    /// A git URL, cloned in a sandbox.
    Git(source::GitSource),
}

/// A port of the application with its preview path.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct PortInfo {
    /// The port inside the sandbox.
    pub port: u16,
    /// Its preview, under the API's address (`/v1/sandboxes/ID/ports/N/`).
    pub preview: String,
}

/// The recipe of an up.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct RecipeRef {
    /// Its key.
    pub key: String,
    /// The stored devcontainer.json on the server (none for a plan only).
    pub path: Option<String>,
    /// The generated devcontainer.json.
    pub devcontainer: String,
}

/// How the readiness check went.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct CheckResult {
    /// What ran.
    pub command: String,
    /// Its exit code.
    pub exit_code: i32,
    /// Whether it exited with 0.
    pub passed: bool,
    /// How long it ran.
    pub duration_ms: u64,
}

/// Where the time went.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub(crate) struct Timings {
    /// The whole up.
    pub total_ms: u64,
    /// Until the sandbox was ready (before the check).
    pub ready_ms: u64,
    /// Base, packages, copy and setup steps (or the cached sandbox and its sync).
    pub setup_ms: u64,
    /// The check.
    pub check_ms: u64,
}

/// What an up made.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct UpResult {
    /// The ready sandbox (none for a plan only).
    pub sandbox_id: Option<String>,
    /// How to get a shell in it (`openrun shell ID`).
    pub attach: Option<String>,
    /// The repository's directory inside the sandbox.
    pub workspace: String,
    /// The application's ports and their previews.
    pub ports: Vec<PortInfo>,
    /// The recipe.
    pub recipe: Option<RecipeRef>,
    /// Whether the sandbox came from a stored recipe (no setup ran).
    pub cached: bool,
    /// The readiness check (none when there was none).
    pub check: Option<CheckResult>,
    /// Timings.
    pub timings: Timings,
    /// The plan.
    #[schema(value_type = Object)]
    pub plan: openrun_recipe::Plan,
    /// What went wrong without failing the open (e.g. the recipe could not be stored: the
    /// next open sets up again). Absent when empty.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// Milliseconds since `t`.
fn ms_since(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// A plan's failure as an up's: `no_project` or `invalid_config` naming the file (and where
/// in it), at step `plan`.
pub(crate) fn plan_error(e: PlanError) -> UpError {
    let mut error = UpError::new(e.code(), e.to_string()).at_step("plan");
    error.file = e.file().map(str::to_string);
    error
}

/// What the planner read from the repository's tar.
struct Planned {
    plan: openrun_recipe::Plan,
    key: String,
    files: Vec<String>,
    digest: String,
}

/// Opens the tar at `path` (unless `tree` is it, opened), plans it and keys it (blocking: it
/// reads the tar).
fn plan_tar(
    path: &Path,
    tree: Option<TarTree>,
    name: &str,
    repo: &str,
) -> Result<Planned, PlanError> {
    let tree = match tree {
        Some(tree) => tree,
        None => TarTree::open(path)?,
    };
    let plan = openrun_recipe::plan_for(&tree, name)?;
    let key = recipe::recipe_key(&plan, &tree, repo)?;
    Ok(Planned {
        plan,
        key,
        files: tree.files(),
        digest: tree.digest(),
    })
}

/// One open per tenant and recipe key at a time: a second open of the same repository waits
/// and then finds the first one's recipe instead of setting up twice (and racing for the
/// step snapshots' names).
async fn turn(tenant: &str, key: &str) -> tokio::sync::OwnedMutexGuard<()> {
    static TURNS: Mutex<BTreeMap<String, Arc<tokio::sync::Mutex<()>>>> =
        Mutex::new(BTreeMap::new());
    let lock = {
        let mut turns = TURNS.lock().unwrap_or_else(|p| p.into_inner());
        // Locks nobody holds or waits for are dropped as new ones are made.
        turns.retain(|_, l| Arc::strong_count(l) > 1);
        turns.entry(format!("{tenant}\n{key}")).or_default().clone()
    };
    lock.lock_owned().await
}

/// [`turn`], saying so (step `wait`) when another open of the key holds it, and giving up
/// when the reader leaves meanwhile.
async fn wait_turn(
    tenant: &str,
    key: &str,
    progress: &Progress,
) -> Result<tokio::sync::OwnedMutexGuard<()>, UpError> {
    let waiting = turn(tenant, key);
    tokio::pin!(waiting);
    // A free turn is taken at once, without a `wait` step.
    if let Some(guard) = futures_util::FutureExt::now_or_never(waiting.as_mut()) {
        return Ok(guard);
    }
    let started = Instant::now();
    let what = "another open of this repository is under way: waiting for it".to_string();
    progress
        .step("wait", Some(what), StepStatus::Running, None, None)
        .await;
    let guard = tokio::select! {
        guard = waiting => guard,
        () = progress.reader_left() => return Err(cancelled("wait")),
    };
    progress
        .step("wait", None, StepStatus::Ok, Some(ms_since(started)), None)
        .await;
    Ok(guard)
}

/// The core call of `openrun up` (`POST /v1/up`, MCP's `up`): the repository `source` becomes
/// a ready sandbox. The steps: the tar (uploaded, or cloned from git) is planned
/// (`openrun_recipe::plan_for`) and keyed; a stored recipe of the key whose image still
/// exists gives the sandbox at once (the workspace synced to the new tree); otherwise the
/// base image and packages are prepared, the workspace is copied in, the setup steps run
/// transactionally ([`setup::run_setup`]) and the result is stored as a recipe. Then the
/// start steps and the readiness check run. Progress goes to `progress`; a failure removes
/// the sandbox unless `request.keep`, when the error names it.
pub(crate) async fn open_repo(
    s: &Shared,
    caller: &Caller,
    request: UpRequest,
    source: Source,
    progress: Progress,
) -> Result<UpResult, UpError> {
    let started = Instant::now();
    let (tar, tree) = match source {
        Source::Upload(file, tree) => (file, Some(tree)),
        Source::Git(git) => {
            let file = source::TempFile::new(s, ".tar")?;
            source::clone_repo(s, caller, &git, file.path(), &progress).await?;
            (file, None)
        }
    };
    let path = tar.path().to_path_buf();
    let (name, repo) = (request.name.clone(), request.repo.clone());
    let planned = blocking(move || plan_tar(&path, tree, &name, &repo))
        .await?
        .map_err(plan_error)?;
    progress
        .send(UpEvent::Plan {
            plan: Box::new(planned.plan.clone()),
        })
        .await;
    let devcontainer = recipe::devcontainer_json(&planned.plan);
    if request.plan_only {
        return Ok(UpResult {
            sandbox_id: None,
            attach: None,
            workspace: planned.plan.workspace.clone(),
            ports: Vec::new(),
            recipe: Some(RecipeRef {
                key: planned.key.clone(),
                path: None,
                devcontainer,
            }),
            cached: false,
            check: None,
            timings: Timings {
                total_ms: ms_since(started),
                ..Default::default()
            },
            plan: planned.plan,
            notes: Vec::new(),
        });
    }
    let turn = wait_turn(&caller.tenant, &planned.key, &progress).await?;
    let mut guard = WorkspaceGuard {
        s: s.clone(),
        caller: caller.clone(),
        keep: request.keep,
        slot: None,
    };
    let open = Open {
        s,
        caller,
        request: &request,
        planned: &planned,
        tar: tar.path(),
        devcontainer,
        progress: &progress,
        started,
    };
    let result = open.run(&mut guard.slot, turn).await;
    if let Some(ws) = guard.slot.as_mut() {
        setup::remove_snapshots(s, caller, ws).await;
    }
    // From here the sandbox is the result's, kept, or removed below.
    let slot = guard.slot.take();
    // A client that left without `keep` gets nothing left behind; with `keep` the sandbox
    // stays (labelled `openrun.up=<name>`), as it would after a failure.
    match result {
        Ok(result) if !progress.cancelled() || request.keep => Ok(result),
        Ok(_) => {
            if let Some(ws) = slot {
                setup::discard(s, caller, &ws.id).await;
            }
            Err(cancelled("result"))
        }
        Err(mut e) => {
            if e.code == "step_failed" && !request.keep {
                e.message
                    .push_str(&keep_hint(&planned.plan, e.step.as_deref()));
            }
            if let Some(ws) = slot.filter(|ws| !ws.id.is_empty()) {
                if request.keep {
                    e.sandbox_id = Some(ws.id);
                } else {
                    setup::discard(s, caller, &ws.id).await;
                }
            }
            Err(e)
        }
    }
}

/// What a `step_failed` without `keep` adds: how to get the sandbox to look into (a setup
/// step's as it was before the step, a start step's as the step left it).
fn keep_hint(plan: &openrun_recipe::Plan, step: Option<&str>) -> String {
    let setup = plan
        .steps
        .iter()
        .any(|s| Some(s.name.as_str()) == step && s.phase == Phase::Setup);
    let how = if setup {
        "as it was before this step"
    } else {
        "as this step left it"
    };
    format!(
        "\nNo sandbox was kept: run again with --keep (MCP: keep=true) to keep the sandbox {how}."
    )
}

/// Most bytes of paths one batch of [`argv_batches`] carries (well under the kernel's limit
/// on a command line).
const ARGV_BATCH_BYTES: usize = 64 * 1024;

/// `head` followed by `paths`, split into command lines of at most [`ARGV_BATCH_BYTES`] of
/// paths each (at least one path per line); none when there are no paths.
fn argv_batches(head: &[&str], paths: impl Iterator<Item = String>) -> Vec<Vec<String>> {
    let start = || head.iter().map(|h| h.to_string()).collect::<Vec<_>>();
    let mut batches = Vec::new();
    let (mut argv, mut bytes) = (start(), 0);
    for path in paths {
        if bytes > 0 && bytes + path.len() > ARGV_BATCH_BYTES {
            batches.push(std::mem::replace(&mut argv, start()));
            bytes = 0;
        }
        bytes += path.len() + 1;
        argv.push(path);
    }
    if bytes > 0 {
        batches.push(argv);
    }
    batches
}

/// The workspace of an open under way. If the open ends without reaching its own cleanup
/// (its future dropped as the server stops, or a panic), the drop removes the step snapshots
/// and, unless `keep`, the sandbox, as the open would have.
struct WorkspaceGuard {
    s: Shared,
    caller: Caller,
    keep: bool,
    slot: Option<setup::Workspace>,
}

impl Drop for WorkspaceGuard {
    fn drop(&mut self) {
        let Some(mut ws) = self.slot.take() else {
            return;
        };
        let (s, caller, keep) = (self.s.clone(), self.caller.clone(), self.keep);
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move {
                    setup::remove_snapshots(&s, &caller, &mut ws).await;
                    if !keep && !ws.id.is_empty() {
                        setup::discard(&s, &caller, &ws.id).await;
                    }
                });
            }
            Err(_) => tracing::warn!(
                id = ws.id,
                "no runtime to remove an abandoned up's sandbox and snapshots"
            ),
        }
    }
}

/// One open under way.
struct Open<'a> {
    s: &'a Shared,
    caller: &'a Caller,
    request: &'a UpRequest,
    planned: &'a Planned,
    tar: &'a Path,
    devcontainer: String,
    progress: &'a Progress,
    started: Instant,
}

impl Open<'_> {
    /// Everything after the plan; the workspace sandbox, once made, is in `slot` (for the
    /// caller's cleanup). `turn` is held until the recipe is stored (or found): the start
    /// steps and the check of two opens of one repository run side by side.
    async fn run(
        self,
        slot: &mut Option<setup::Workspace>,
        turn: tokio::sync::OwnedMutexGuard<()>,
    ) -> Result<UpResult, UpError> {
        let (s, caller, plan) = (self.s, self.caller, &self.planned.plan);
        let key = &self.planned.key;
        let spec = setup::WorkspaceSpec::new(plan, &self.request.name, self.request.ttl.as_deref());
        let setup_started = Instant::now();
        let recipe_path;
        let mut notes = Vec::new();
        let cached = match self.cached().await? {
            Some(row) => {
                for step in plan.steps.iter().filter(|st| st.phase == Phase::Setup) {
                    let command = step.commands.first().map(ToString::to_string);
                    self.progress
                        .step(&step.name, command, StepStatus::Cached, None, None)
                        .await;
                }
                let id = setup::create(s, caller, &spec, &row.image)
                    .await
                    .map_err(|e| e.at_step("copy"))?;
                let ws = slot.insert(setup::Workspace {
                    id,
                    spec,
                    snapshots: Vec::new(),
                });
                self.sync(ws, &row).await?;
                let (tenant, k, now) = (caller.tenant.clone(), key.clone(), crate::time::now_ms());
                s.db.call(move |c| recipes::touch(c, &tenant, &k, now))
                    .await?;
                recipe_path = Some(
                    recipes::recipe_dir(s.runtime.data_dir(), &caller.tenant, key)
                        .join("devcontainer.json"),
                );
                true
            }
            None => {
                let image = base::prepare_base(s, caller, plan, self.tar, self.progress).await?;
                if self.progress.cancelled() {
                    return Err(cancelled("copy"));
                }
                let id = setup::create(s, caller, &spec, &image)
                    .await
                    .map_err(|e| e.at_step("copy"))?;
                let ws = slot.insert(setup::Workspace {
                    id,
                    spec,
                    snapshots: Vec::new(),
                });
                self.copy(ws, None).await?;
                setup::run_setup(s, caller, ws, plan, key, self.request.keep, self.progress)
                    .await?;
                // A recipe is a cache: a failure to store it leaves the ready sandbox.
                recipe_path = match self.store(ws).await {
                    Ok(path) => Some(path),
                    Err(e) => {
                        tracing::warn!(
                            key,
                            code = e.code,
                            error = e.message,
                            "cannot store a recipe"
                        );
                        notes.push(format!(
                            "the recipe could not be stored ({}): the next open sets up again",
                            e.message
                        ));
                        None
                    }
                };
                false
            }
        };
        drop(turn);
        let setup_ms = ms_since(setup_started);
        let ws = slot
            .as_ref()
            .ok_or_else(|| UpError::new("internal", "the workspace sandbox is missing"))?;
        if self.progress.cancelled() {
            return Err(cancelled("start"));
        }
        setup::run_start(s, caller, ws, plan, self.progress).await?;
        let ready_ms = ms_since(self.started);
        let check = self.check(ws).await?;
        let check_ms = check.as_ref().map_or(0, |c| c.duration_ms);
        let id = ws.id.clone();
        Ok(UpResult {
            attach: Some(format!("openrun shell {id}")),
            workspace: plan.workspace.clone(),
            ports: plan
                .ports
                .iter()
                .map(|&port| PortInfo {
                    port,
                    preview: format!("/v1/sandboxes/{id}/ports/{port}/"),
                })
                .collect(),
            recipe: Some(RecipeRef {
                key: key.clone(),
                path: recipe_path.map(|p| p.display().to_string()),
                devcontainer: self.devcontainer.clone(),
            }),
            sandbox_id: Some(id),
            cached,
            check,
            timings: Timings {
                total_ms: ms_since(self.started),
                ready_ms,
                setup_ms,
                check_ms,
            },
            plan: plan.clone(),
            notes,
        })
    }

    /// The caller's recipe of this key, if stored and its image still exists.
    async fn cached(&self) -> Result<Option<recipes::RecipeRow>, UpError> {
        let (tenant, key) = (self.caller.tenant.clone(), self.planned.key.clone());
        let Some(row) = self
            .s
            .db
            .call(move |c| recipes::get(c, &tenant, &key))
            .await?
        else {
            return Ok(None);
        };
        match crate::images::resolve(self.s, self.caller, &row.image).await? {
            // The caller's own image (a server-wide one of that name is not the recipe).
            Ok(stored) if stored != row.image => Ok(Some(row)),
            _ => {
                tracing::info!(
                    key = row.key,
                    image = row.image,
                    "recipe image gone: setting up again"
                );
                Ok(None)
            }
        }
    }

    /// Step `copy`: the repository's tree into the workspace, after removing `removals`
    /// (paths relative to it); owned by the plan's user.
    async fn copy(
        &self,
        ws: &setup::Workspace,
        removals: Option<Vec<recipes::Removal>>,
    ) -> Result<(), UpError> {
        let (s, caller, plan) = (self.s, self.caller, &self.planned.plan);
        let at = |e: crate::error::ApiError| UpError::from(e).at_step("copy");
        let started = Instant::now();
        self.progress
            .step("copy", None, StepStatus::Running, None, None)
            .await;
        let first_open = removals.is_none();
        let removals = removals.unwrap_or_default();
        let root = plan.workspace.trim_end_matches('/');
        // One `rm` per batch of paths (argv after `--`, never a shell line), not one agent
        // request and timeline event per file.
        for (recursive, flags) in [(true, "-rf"), (false, "-f")] {
            let paths = removals
                .iter()
                .filter(|r| r.recursive == recursive)
                .map(|r| format!("{root}/{}", r.path));
            for batch in argv_batches(&["rm", flags, "--"], paths) {
                let outcome = self.as_root(ws, batch).await?;
                if !outcome.ok() {
                    return Err(UpError::new(
                        "internal",
                        format!(
                            "cannot remove the files the new tree lacks from {}: {}",
                            plan.workspace,
                            outcome.last_lines(5)
                        ),
                    )
                    .at_step("copy"));
                }
            }
        }
        crate::archive::extract_archive(s, caller, &ws.id, &plan.workspace, self.tar)
            .await
            .map_err(at)?;
        if let Some(user) = plan.user.as_deref().filter(|u| *u != "root" && *u != "0") {
            // A first open gives the whole workspace to the user; a re-open only what the
            // tree brought (its top-level entries), not what the setup made and the
            // recipe's snapshot already has with the right owner (node_modules, .venv).
            let paths: Vec<String> = if first_open {
                vec![plan.workspace.clone()]
            } else {
                let tops: std::collections::BTreeSet<&str> = self
                    .planned
                    .files
                    .iter()
                    .filter_map(|f| f.split('/').next())
                    .filter(|t| !t.is_empty() && *t != "." && *t != "..")
                    .collect();
                tops.into_iter().map(|t| format!("{root}/{t}")).collect()
            };
            let owner = format!("{user}:");
            let mut outcome = None;
            for batch in argv_batches(&["chown", "-R", &owner, "--"], paths.into_iter()) {
                let ran = self.as_root(ws, batch).await?;
                let ok = ran.ok();
                outcome = Some(ran);
                if !ok {
                    break;
                }
            }
            if let Some(outcome) = outcome.filter(|o| !o.ok()) {
                return Err(UpError::new(
                    "invalid_config",
                    format!(
                        "cannot give the workspace {} to user {user} (remoteUser): {}",
                        plan.workspace,
                        outcome.last_lines(5)
                    ),
                )
                .at_step("copy"));
            }
        }
        self.progress
            .step("copy", None, StepStatus::Ok, Some(ms_since(started)), None)
            .await;
        Ok(())
    }

    /// A cached sandbox's workspace brought to the new tree: unchanged when the tar's digest
    /// is the recipe's.
    /// Runs `argv` in the workspace sandbox as root (its default user may be `remoteUser`),
    /// as part of step `copy`.
    async fn as_root(
        &self,
        ws: &setup::Workspace,
        argv: Vec<String>,
    ) -> Result<run::Outcome, UpError> {
        run_command(
            self.s,
            self.caller,
            &ws.id,
            "copy",
            argv,
            None,
            BTreeMap::new(),
            Some("0".into()),
            setup::STEP_TIMEOUT,
            self.progress,
        )
        .await
    }

    async fn sync(&self, ws: &setup::Workspace, row: &recipes::RecipeRow) -> Result<(), UpError> {
        if row.source_digest == self.planned.digest {
            self.progress
                .step("copy", None, StepStatus::Cached, None, None)
                .await;
            return Ok(());
        }
        let old: Vec<String> = serde_json::from_str(&row.sources_json).unwrap_or_else(|e| {
            tracing::warn!(key = row.key, error = %e, "a recipe's file list does not decode");
            Vec::new()
        });
        let removals = recipes::sync_removals(&old, &self.planned.files);
        self.copy(ws, Some(removals)).await
    }

    /// The finished setup as the caller's recipe: the snapshot `up-recipe-<key16>`, the row
    /// and the files. Returns the stored devcontainer.json's path.
    async fn store(&self, ws: &setup::Workspace) -> Result<PathBuf, UpError> {
        let (s, caller) = (self.s, self.caller);
        let image = recipes::recipe_image(&self.planned.key);
        let stored = self.store_as(ws, &image).await;
        if stored.is_err() {
            // A snapshot nothing refers to would only take space.
            if let Err(e) = recipes::remove_image(s, caller, &image).await {
                tracing::warn!(image, error = %e, "cannot remove an unstored recipe's image");
            }
        }
        stored
    }

    /// [`Open::store`] with the recipe image `image`.
    async fn store_as(&self, ws: &setup::Workspace, image: &str) -> Result<PathBuf, UpError> {
        let (s, caller, key) = (self.s, self.caller, &self.planned.key);
        let image = image.to_string();
        let at = |e: crate::error::ApiError| UpError::from(e).at_step("recipe");
        recipes::remove_image(s, caller, &image).await.map_err(at)?;
        crate::images::take_snapshot(s, caller, &ws.id, Some(image.clone()))
            .await
            .map_err(at)?;
        let now = crate::time::now_ms();
        let plan_json = serde_json::to_string(&self.planned.plan).map_err(|e| {
            at(crate::error::ApiError::internal(
                "cannot encode the plan",
                e,
            ))
        })?;
        let sources_json = serde_json::to_string(&self.planned.files).map_err(|e| {
            at(crate::error::ApiError::internal(
                "cannot encode the file list",
                e,
            ))
        })?;
        let row = recipes::RecipeRow {
            tenant: caller.tenant.clone(),
            key: key.clone(),
            repo: self.request.repo.clone(),
            name: self.request.name.clone(),
            image: image.clone(),
            devcontainer: self.devcontainer.clone(),
            plan_json,
            sources_json,
            source_digest: self.planned.digest.clone(),
            created_at: now,
            used_at: now,
        };
        let recipe_json = serde_json::to_string_pretty(&serde_json::json!({
            "key": key,
            "repo": row.repo,
            "name": row.name,
            "image": image,
            "created_at": crate::time::rfc3339(now),
            "plan": self.planned.plan,
        }))
        .map_err(|e| {
            at(crate::error::ApiError::internal(
                "cannot encode the recipe",
                e,
            ))
        })?;
        let dir = recipes::recipe_dir(s.runtime.data_dir(), &caller.tenant, key);
        let devcontainer = self.devcontainer.clone();
        let path = blocking(move || recipes::write_files(&dir, &devcontainer, &recipe_json))
            .await
            .map_err(at)?
            .map_err(|e| {
                at(crate::error::ApiError::internal(
                    "cannot write the recipe's files",
                    e,
                ))
            })?;
        s.db.call(move |c| recipes::put(c, &row))
            .await
            .map_err(|e| at(e.into()))?;
        tracing::info!(key, image, tenant = caller.tenant, "recipe stored");
        // One recipe per repository: the ones its earlier inputs made go (their images are
        // a whole environment each).
        let (tenant, repo) = (caller.tenant.clone(), self.request.repo.clone());
        let older = s.db.call(move |c| recipes::list(c, &tenant)).await?;
        for old in older.iter().filter(|r| r.repo == repo && r.key != *key) {
            match recipes::delete_recipe(s, caller, &old.key).await {
                Ok(()) => tracing::info!(key = old.key, "older recipe of the repository removed"),
                Err(e) => {
                    tracing::warn!(key = old.key, error = %e, "cannot remove an older recipe")
                }
            }
        }
        Ok(path)
    }

    /// The readiness check: the request's, else the plan's test (unless `no_check`). A
    /// failed check is a result (`passed: false`), not an error.
    async fn check(&self, ws: &setup::Workspace) -> Result<Option<CheckResult>, UpError> {
        let plan = &self.planned.plan;
        let command = match (&self.request.check, self.request.no_check) {
            (_, true) => return Ok(None),
            (Some(line), false) => openrun_recipe::Command::Shell(line.clone()),
            (None, false) => match &plan.test {
                Some(test) => test.clone(),
                None => return Ok(None),
            },
        };
        let outcome = setup::run_step_command(
            self.s,
            self.caller,
            ws,
            plan,
            "check",
            &command,
            CHECK_TIMEOUT,
            self.progress,
        )
        .await?;
        Ok(Some(CheckResult {
            command: command.to_string(),
            exit_code: outcome.exit_code,
            passed: outcome.ok(),
            duration_ms: outcome.duration_ms,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_errors_name_their_file_and_code() {
        let e = plan_error(PlanError::NoProject);
        assert_eq!(
            (e.code.as_str(), e.step.as_deref()),
            ("no_project", Some("plan"))
        );
        assert!(e.file.is_none());
        let e = plan_error(PlanError::Invalid {
            file: "package.json".into(),
            line: Some(3),
            column: Some(7),
            message: "expected ','".into(),
        });
        assert_eq!(e.code, "invalid_config");
        assert_eq!(e.file.as_deref(), Some("package.json"));
        assert!(e.message.starts_with("package.json:3:7: "), "{}", e.message);
        let e = plan_error(PlanError::Tree(
            openrun_recipe::error::TreeError::BadArchive("truncated".into()),
        ));
        assert_eq!(e.code, "invalid_repository");
    }

    #[tokio::test]
    async fn a_reader_that_left_cancels() {
        let (tx, rx) = mpsc::channel(1);
        let progress = Progress::new(tx);
        assert!(!progress.cancelled());
        drop(rx);
        assert!(progress.cancelled());
        // Sending to nobody neither fails nor waits.
        progress.step("x", None, StepStatus::Ok, None, None).await;
    }

    #[tokio::test]
    async fn opens_of_one_key_take_turns() {
        let first = turn("t", "k").await;
        let second = tokio::spawn(async { turn("t", "k").await });
        let other = turn("t", "other").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!second.is_finished(), "the same key must wait");
        drop(first);
        let _second = second.await.unwrap();
        drop(other);
    }
}

#[cfg(test)]
mod backpressure_tests {
    use super::*;

    #[test]
    fn argv_batches_split_long_lists_and_skip_empty_ones() {
        assert!(argv_batches(&["rm", "-f", "--"], std::iter::empty()).is_empty());
        let one = argv_batches(&["rm", "-f", "--"], ["/w/-a".to_string()].into_iter());
        assert_eq!(one, vec![vec!["rm", "-f", "--", "/w/-a"]]);
        let long = (0..5000).map(|i| format!("/workspaces/app/some/dir/file-{i:05}.txt"));
        let batches = argv_batches(&["rm", "-rf", "--"], long);
        assert!(batches.len() > 1);
        assert_eq!(batches.iter().map(|b| b.len() - 3).sum::<usize>(), 5000);
        for b in &batches {
            assert_eq!(&b[..3], ["rm", "-rf", "--"]);
            assert!(b[3..].iter().map(|p| p.len() + 1).sum::<usize>() <= ARGV_BATCH_BYTES + 64);
        }
    }

    #[test]
    fn a_step_failed_without_keep_says_how_to_keep_the_sandbox() {
        use openrun_recipe::{BaseImage, Command, PlanSource, Step};
        let step = |name: &str, phase| Step {
            name: name.into(),
            phase,
            commands: vec![Command::Shell("x".into())],
            file: "f".into(),
        };
        let plan = openrun_recipe::Plan {
            source: PlanSource::Detected,
            config_file: None,
            languages: vec![],
            base: BaseImage::Debian {
                suite: "bookworm".into(),
            },
            system_packages: vec![],
            env: BTreeMap::new(),
            remote_env: BTreeMap::new(),
            user: None,
            workspace: "/workspaces/a".into(),
            steps: vec![step("install", Phase::Setup), step("serve", Phase::Start)],
            test: None,
            start: None,
            ports: vec![],
            network: vec![],
            resources: Default::default(),
            inputs: vec![],
            unsupported: vec![],
            notes: vec![],
        };
        let hint = keep_hint(&plan, Some("install"));
        assert!(hint.contains("run again with --keep"), "{hint}");
        assert!(hint.contains("before this step"), "{hint}");
        assert!(keep_hint(&plan, Some("serve")).contains("as this step left it"));
    }

    fn output(n: u8) -> UpEvent {
        UpEvent::Output {
            step: "s".into(),
            stream: "stdout",
            data_b64: n.to_string(),
        }
    }

    #[tokio::test]
    async fn output_is_dropped_when_nobody_reads_and_the_open_goes_on() {
        let (tx, mut rx) = mpsc::channel(2);
        let progress = Progress::new(tx);
        for n in 0..10 {
            tokio::time::timeout(Duration::from_secs(1), progress.send(output(n)))
                .await
                .expect("output never waits for the reader");
        }
        assert!(!progress.cancelled(), "dropped output is not a reader gone");
        let first = rx.recv().await;
        assert!(matches!(first, Some(UpEvent::Output { data_b64, .. }) if data_b64 == "0"));
    }

    #[tokio::test]
    async fn a_waiting_open_says_so_and_stops_when_its_reader_leaves() {
        let holder = turn("t-wait", "k").await;
        let (tx, mut rx) = mpsc::channel(8);
        let progress = Progress::new(tx);
        let waiter = {
            let progress = progress.clone();
            tokio::spawn(async move { wait_turn("t-wait", "k", &progress).await.map(drop) })
        };
        let first = rx.recv().await;
        assert!(matches!(
            first,
            Some(UpEvent::Step { ref step, status: StepStatus::Running, .. }) if step == "wait"
        ));
        drop(rx);
        let result = tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("the wait ends when the reader leaves")
            .expect("no panic");
        assert_eq!(result.err().map(|e| e.code), Some("cancelled".to_string()));
        drop(holder);
        // A free turn is taken without a wait step.
        let (tx, mut rx) = mpsc::channel(8);
        let progress = Progress::new(tx);
        let _guard = wait_turn("t-wait", "k", &progress)
            .await
            .map_err(|e| e.code);
        drop(progress);
        assert!(rx.recv().await.is_none());
    }
}
