//! `openrun up`: a repository (a git URL cloned in a sandbox, or a tar the client sent) turned
//! into a ready sandbox by a plan (`openrun_recipe`), set up step by step with a snapshot
//! before each step and a rollback when one fails, and remembered as a recipe so that the next
//! open of an unchanged repository starts from the recipe's snapshot. One core call,
//! [`open_repo`]; `POST /v1/up` and MCP's `up` are its adapters.

// Removed once `open_repo` and its routes use everything here.
#![allow(dead_code)]

use serde::Serialize;
use tokio::sync::mpsc;

use crate::error::ApiError;

/// One line of the progress stream (`POST /v1/up`'s NDJSON).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum UpEvent {
    /// The plan, first.
    Plan {
        /// It.
        plan: openrun_recipe::Plan,
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

/// Where [`open_repo`] reports progress. Sending never fails the setup: a client that left
/// only stops seeing it.
#[derive(Debug, Clone)]
pub(crate) struct Progress {
    tx: Option<mpsc::Sender<UpEvent>>,
}

impl Progress {
    /// Progress to `tx`.
    pub(crate) fn new(tx: mpsc::Sender<UpEvent>) -> Self {
        Progress { tx: Some(tx) }
    }

    /// Progress nobody reads (MCP collects the result only).
    pub(crate) fn none() -> Self {
        Progress { tx: None }
    }

    /// Sends `event` (waits while the stream is full; drops it if the reader left).
    pub(crate) async fn send(&self, event: UpEvent) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(event).await;
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

impl From<ApiError> for UpError {
    fn from(e: ApiError) -> Self {
        UpError::new(e.status_and_code().1, e.to_string())
    }
}
