//! The workspace sandbox and its transactional setup: before a setup step the sandbox is
//! snapshotted (a tenant image `up-<key16>-<n>`); when the step's command fails, the sandbox
//! is destroyed and made again from that snapshot (same environment, limits, network, labels
//! and lifetime) and the step's next alternative runs from the same clean state. A step whose
//! every alternative failed ends the setup with `step_failed`, naming the step, the file it
//! came from, the command and its exit code, with the end of its output.

use std::collections::BTreeMap;
use std::time::Duration;

use openrun_recipe::{Command, Phase, Plan, Step};

use super::recipes;
use super::run::{run_command, Outcome};
use super::{Progress, StepStatus, UpError};
use crate::api::{self, Caller, CreateBody, Shared};

/// Longest a setup or start step's command may run.
pub(crate) const STEP_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Lifetime of a workspace sandbox when the request gives none.
pub(crate) const DEFAULT_TTL: &str = "1h";

/// Label every workspace sandbox carries, with the repository's name.
pub(crate) const LABEL: &str = "openrun.up";

/// How a workspace sandbox is made (again, after a rollback, with the same options).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct WorkspaceSpec {
    /// Environment of every process (the plan's `env`).
    pub env: BTreeMap<String, String>,
    /// Memory limit.
    pub memory: Option<String>,
    /// CPU limit.
    pub cpus: Option<String>,
    /// Writable layer's quota.
    pub disk: Option<String>,
    /// Lifetime.
    pub ttl: String,
    /// Labels (`openrun.up=<name>`).
    pub labels: BTreeMap<String, String>,
    /// The network policy (an allowlist of the plan's hosts, or mode `none`).
    pub network: serde_json::Value,
    /// The default working directory: the workspace, so shells and commands start there.
    pub workdir: String,
    /// The default user (`remoteUser`), if the plan names one.
    pub user: Option<String>,
}

impl WorkspaceSpec {
    /// The sandbox `plan` asks for, named `name`, living `ttl` (default [`DEFAULT_TTL`]).
    pub(crate) fn new(plan: &Plan, name: &str, ttl: Option<&str>) -> Self {
        let network = if plan.network.is_empty() {
            serde_json::json!({ "mode": "none" })
        } else {
            serde_json::json!({ "mode": "allowlist", "allow": plan.network })
        };
        WorkspaceSpec {
            env: plan.env.clone(),
            memory: plan.resources.memory.clone(),
            cpus: plan.resources.cpus.clone(),
            disk: plan.resources.disk.clone(),
            ttl: ttl.unwrap_or(DEFAULT_TTL).to_string(),
            labels: BTreeMap::from([(LABEL.to_string(), name.to_string())]),
            network,
            workdir: plan.workspace.clone(),
            user: plan.user.clone(),
        }
    }

    /// The create body of a sandbox on `image`.
    pub(crate) fn body(&self, image: &str) -> CreateBody {
        CreateBody {
            image: Some(image.to_string()),
            memory: self.memory.clone(),
            cpus: self.cpus.clone(),
            disk: self.disk.clone(),
            ttl: Some(self.ttl.clone()),
            env: self.env.clone(),
            labels: self.labels.clone(),
            network: Some(self.network.clone()),
            workdir: Some(self.workdir.clone()),
            user: self.user.clone(),
            ..Default::default()
        }
    }
}

/// Creates a workspace sandbox on `image` under create admission (a slot, or the queue, or
/// `too_many_requests`, like every create); its id.
pub(crate) async fn create(
    s: &Shared,
    caller: &Caller,
    spec: &WorkspaceSpec,
    image: &str,
) -> Result<String, UpError> {
    let (state, who, body) = (s.clone(), caller.clone(), spec.body(image));
    let create = async move { api::create_sandbox(&state, &who, body).await };
    let resource = crate::admission::admitted(s, create, Result::is_ok).await??;
    Ok(resource.id().to_string())
}

/// Removes the caller's sandbox `id` (logged, never failing: this is cleanup).
pub(crate) async fn discard(s: &Shared, caller: &Caller, id: &str) {
    let removed = match api::find(s, caller, id).await {
        Ok(row) => api::remove(s, caller, row).await,
        Err(crate::error::ApiError::NotFound(_)) => Ok(()),
        Err(e) => Err(e),
    };
    if let Err(e) = removed {
        tracing::warn!(id, error = %e, "cannot remove an up sandbox");
    }
}

/// The `step_failed` error of `step`, whose last command `command` ended as `outcome`.
pub(crate) fn step_failed(step: &Step, command: &Command, outcome: &Outcome) -> UpError {
    let tail = outcome.last_lines(20);
    let output = if tail.is_empty() {
        String::from("(no output)")
    } else {
        tail
    };
    let tried = if step.commands.len() > 1 {
        format!(
            " (all {} alternatives failed; the last was `{command}`)",
            step.commands.len()
        )
    } else {
        String::new()
    };
    let mut e = UpError::new(
        "step_failed",
        format!(
            "step {} (from {}) failed with exit code {}{tried}: {output}",
            step.name, step.file, outcome.exit_code
        ),
    )
    .at_step(&step.name);
    e.file = Some(step.file.clone());
    e.command = Some(command.to_string());
    e
}

/// The `step_failed` error of `step` whose rollback (re-creating the sandbox from the
/// snapshot) failed with `error` after `command` ended as `outcome`: no sandbox is left.
pub(crate) fn rollback_failed(
    step: &Step,
    command: &Command,
    outcome: &Outcome,
    error: &UpError,
) -> UpError {
    let mut e = step_failed(step, command, outcome);
    e.message.push_str(&format!(
        "\n(rolling the sandbox back to before the step failed: {}: {}; no sandbox is left)",
        error.code, error.message
    ));
    e
}

/// Whether a setup step needs a snapshot before it: to roll back to when an alternative
/// follows a failure, or to leave the sandbox as it was before the step (`keep`). A step
/// with one command in a sandbox that is removed on failure needs none.
pub(crate) fn needs_snapshot(step: &Step, keep: bool) -> bool {
    keep || step.commands.len() > 1
}

/// The running workspace sandbox and what the setup made along the way.
#[derive(Debug)]
pub(crate) struct Workspace {
    /// Its current id (a rollback replaces it).
    pub id: String,
    /// How it is made.
    pub spec: WorkspaceSpec,
    /// The step snapshots taken (tenant image names), removed at the end.
    pub snapshots: Vec<String>,
}

/// Runs `command` of step `name` in the workspace (its directory, `remote_env`, the plan's
/// user, killed after `timeout`), with running/ok/failed events.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run_step_command(
    s: &Shared,
    caller: &Caller,
    ws: &Workspace,
    plan: &Plan,
    name: &str,
    command: &Command,
    timeout: Duration,
    progress: &Progress,
) -> Result<Outcome, UpError> {
    progress
        .step(
            name,
            Some(command.to_string()),
            StepStatus::Running,
            None,
            None,
        )
        .await;
    let outcome = run_command(
        s,
        caller,
        &ws.id,
        name,
        command.argv(),
        Some(plan.workspace.clone()),
        plan.remote_env.clone(),
        plan.user.clone(),
        timeout,
        progress,
    )
    .await?;
    let status = if outcome.ok() {
        StepStatus::Ok
    } else {
        StepStatus::Failed
    };
    progress
        .step(
            name,
            Some(command.to_string()),
            status,
            Some(outcome.duration_ms),
            Some(outcome.exit_code),
        )
        .await;
    Ok(outcome)
}

/// Runs the plan's setup steps in order (see the module's documentation). On `step_failed`
/// the workspace is the one rolled back to before the failed step (when a snapshot was
/// taken) or the one the step failed in; the caller removes it unless `keep`.
pub(crate) async fn run_setup(
    s: &Shared,
    caller: &Caller,
    ws: &mut Workspace,
    plan: &Plan,
    key: &str,
    keep: bool,
    progress: &Progress,
) -> Result<(), UpError> {
    let setup = plan.steps.iter().filter(|step| step.phase == Phase::Setup);
    for (n, step) in setup.enumerate() {
        if progress.cancelled() {
            return Err(super::cancelled(&step.name));
        }
        let snapshot = if needs_snapshot(step, keep) {
            let name = recipes::step_image(key, n + 1);
            // A leftover of an earlier open that did not finish.
            recipes::remove_image(s, caller, &name).await?;
            crate::images::take_snapshot(s, caller, &ws.id, Some(name.clone()))
                .await
                .map_err(|e| UpError::from(e).at_step(&step.name))?;
            ws.snapshots.push(name.clone());
            Some(name)
        } else {
            None
        };
        let mut failure = None;
        for (i, command) in step.commands.iter().enumerate() {
            let outcome = run_step_command(
                s,
                caller,
                ws,
                plan,
                &step.name,
                command,
                STEP_TIMEOUT,
                progress,
            )
            .await?;
            if outcome.ok() {
                failure = None;
                break;
            }
            let more = i + 1 < step.commands.len();
            if let Some(image) = &snapshot {
                if more || keep {
                    let old = std::mem::take(&mut ws.id);
                    discard(s, caller, &old).await;
                    ws.id = match create(s, caller, &ws.spec, image).await {
                        Ok(id) => id,
                        // The step's own failure stays the error (its command, exit and
                        // output); the failed rollback is added to it.
                        Err(e) => return Err(rollback_failed(step, command, &outcome, &e)),
                    };
                    progress
                        .step(
                            &step.name,
                            Some(command.to_string()),
                            StepStatus::RolledBack,
                            None,
                            None,
                        )
                        .await;
                }
            }
            failure = Some((command, outcome));
            if more && progress.cancelled() {
                return Err(super::cancelled(&step.name));
            }
        }
        if let Some((command, outcome)) = failure {
            return Err(step_failed(step, command, &outcome));
        }
    }
    Ok(())
}

/// Runs the plan's start steps (every open, cached ones too): the first alternative that
/// succeeds ends a step; none succeeding is `step_failed`. No snapshots: nothing is rolled
/// back.
pub(crate) async fn run_start(
    s: &Shared,
    caller: &Caller,
    ws: &Workspace,
    plan: &Plan,
    progress: &Progress,
) -> Result<(), UpError> {
    for step in plan.steps.iter().filter(|step| step.phase == Phase::Start) {
        let mut failure = None;
        for command in &step.commands {
            let outcome = run_step_command(
                s,
                caller,
                ws,
                plan,
                &step.name,
                command,
                STEP_TIMEOUT,
                progress,
            )
            .await?;
            if outcome.ok() {
                failure = None;
                break;
            }
            failure = Some((command, outcome));
        }
        if let Some((command, outcome)) = failure {
            return Err(step_failed(step, command, &outcome));
        }
    }
    Ok(())
}

/// Removes the step snapshots `ws` took (logged, never failing).
pub(crate) async fn remove_snapshots(s: &Shared, caller: &Caller, ws: &mut Workspace) {
    for name in std::mem::take(&mut ws.snapshots) {
        if let Err(e) = recipes::remove_image(s, caller, &name).await {
            tracing::warn!(image = name, error = %e, "cannot remove an up step snapshot");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openrun_recipe::{BaseImage, PlanSource, Resources};

    fn plan() -> Plan {
        Plan {
            source: PlanSource::Detected,
            config_file: None,
            languages: vec!["node".into()],
            base: BaseImage::Debian {
                suite: "bookworm".into(),
            },
            system_packages: vec![],
            env: BTreeMap::from([("A".to_string(), "1".to_string())]),
            remote_env: BTreeMap::new(),
            user: None,
            workspace: "/workspaces/app".into(),
            steps: vec![],
            test: None,
            start: None,
            ports: vec![],
            network: vec![],
            resources: Resources {
                memory: Some("2G".into()),
                ..Default::default()
            },
            inputs: vec![],
            unsupported: vec![],
            notes: vec![],
        }
    }

    #[test]
    fn the_workspace_spec_follows_the_plan() {
        let mut p = plan();
        let spec = WorkspaceSpec::new(&p, "app", None);
        assert_eq!(spec.network, serde_json::json!({"mode": "none"}));
        assert_eq!(spec.ttl, "1h");
        assert_eq!(spec.labels.get(LABEL).map(String::as_str), Some("app"));
        let body = spec.body("up-recipe-x");
        assert_eq!(body.image.as_deref(), Some("up-recipe-x"));
        assert_eq!(body.memory.as_deref(), Some("2G"));
        assert_eq!(body.env.get("A").map(String::as_str), Some("1"));
        p.network = vec!["registry.npmjs.org".into()];
        let spec = WorkspaceSpec::new(&p, "app", Some("10m"));
        assert_eq!(
            spec.network,
            serde_json::json!({"mode": "allowlist", "allow": ["registry.npmjs.org"]})
        );
        assert_eq!(spec.ttl, "10m");
        // The body is what POST /v1/sandboxes accepts.
        assert!(api::spec_from(spec.body("host")).is_ok());
    }

    #[test]
    fn snapshots_only_where_a_rollback_can_be_used() {
        let step = |n: usize| Step {
            name: "install".into(),
            phase: Phase::Setup,
            commands: (0..n).map(|i| Command::Shell(format!("c{i}"))).collect(),
            file: "package.json".into(),
        };
        assert!(!needs_snapshot(&step(1), false));
        assert!(needs_snapshot(&step(1), true));
        assert!(needs_snapshot(&step(2), false));
    }

    #[test]
    fn a_failed_step_names_its_file_command_and_exit() {
        let step = Step {
            name: "install".into(),
            phase: Phase::Setup,
            commands: vec![Command::Shell("npm ci".into())],
            file: "package-lock.json".into(),
        };
        let outcome = Outcome {
            exit_code: 1,
            duration_ms: 5,
            tail: "npm ERR! missing\n".into(),
        };
        let e = step_failed(&step, &step.commands[0], &outcome);
        assert_eq!(e.code, "step_failed");
        assert_eq!(e.step.as_deref(), Some("install"));
        assert_eq!(e.file.as_deref(), Some("package-lock.json"));
        assert_eq!(e.command.as_deref(), Some("npm ci"));
        assert!(
            e.message
                .starts_with("step install (from package-lock.json) failed with exit code 1"),
            "{}",
            e.message
        );
        assert!(e.message.contains("npm ERR! missing"));
        let create = UpError::new("too_many_requests", "too many requests");
        let e = rollback_failed(&step, &step.commands[0], &outcome, &create);
        assert_eq!(e.code, "step_failed");
        assert_eq!(e.command.as_deref(), Some("npm ci"));
        assert!(e.message.contains("npm ERR! missing"), "{}", e.message);
        assert!(e.message.contains("too_many_requests"), "{}", e.message);
    }
}
