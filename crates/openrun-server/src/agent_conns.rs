//! Idle connections to sandbox agents, kept per sandbox for the next attached exec.
//!
//! Opening a sandbox (its runtime record, pidfd and cgroup) and connecting to its agent with a
//! `Hello` cost about a quarter of a millisecond per exec. An exec's driver parks its
//! connection here once the command's exit has come and nothing else is owed on it (no input
//! was forwarded, every answer and event was read: see [`AgentClient::into_idle`]), and the next
//! exec in the same sandbox takes it back. What the agent binds to a connection is only what was
//! started or followed through it (attached processes' pumps, watches, the egress listener,
//! relays); an exec's connection has none of these left once its exit was read, and the agent
//! keeps a process's status and output whatever happens to the connection that started it.
//!
//! A parked connection is reused only if a non-blocking peek finds it open and silent, so a
//! connection whose agent went away is dropped, not used. Connections go when their sandbox
//! is paused (a frozen agent answers nothing), stopped, vanished or destroyed, and after
//! [`IDLE_FOR`] unused (the [`crate::maintenance`] tick sweeps them), so an idle sandbox's agent
//! holds no connection task for long. At most [`MAX_IDLE`] per sandbox.
//!
//! Security: an entry is keyed by sandbox id and taken only after the caller's tenant was
//! checked for that id ([`crate::api::find`]) and its row said `running`; the connection
//! carries no tenant state of its own (the agent serves one sandbox).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use openrun_runtime::client::IdleAgent;
use openrun_runtime::{AgentClient, Sandbox};

/// Idle connections kept per sandbox.
pub(crate) const MAX_IDLE: usize = 2;
/// How long an unused connection is kept.
pub(crate) const IDLE_FOR: Duration = Duration::from_secs(30);

/// The idle connections of every sandbox, and the opened sandbox they belong to.
#[derive(Default)]
pub struct AgentConns {
    entries: Mutex<HashMap<String, Entry>>,
}

struct Entry {
    sandbox: Arc<Sandbox>,
    idle: Vec<(IdleAgent, Instant)>,
}

/// What [`AgentConns::take`] found for a sandbox.
pub(crate) struct Taken {
    /// The sandbox, opened by an earlier exec.
    pub sandbox: Arc<Sandbox>,
    /// An idle connection to its agent that is still open and silent, if one was kept.
    pub client: Option<AgentClient>,
}

impl AgentConns {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        // Nothing here is left half-changed by a panic: a poisoned map is still consistent.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The opened sandbox `id` and an idle connection to its agent, when an earlier exec left
    /// them. Connections that are no longer usable are dropped on the way; with none left the
    /// entry goes too (its agent may be gone: the caller opens the sandbox afresh).
    pub(crate) fn take(&self, id: &str) -> Option<Taken> {
        let mut entries = self.lock();
        let entry = entries.get_mut(id)?;
        while let Some((idle, _)) = entry.idle.pop() {
            if let Some(client) = idle.reuse() {
                return Some(Taken {
                    sandbox: entry.sandbox.clone(),
                    client: Some(client),
                });
            }
        }
        entries.remove(id);
        None
    }

    /// Keeps `client` (a connection to `sandbox`'s agent with nothing in flight: see
    /// [`AgentClient::into_idle`]) for the next exec in sandbox `id`, unless it is not quiet
    /// or [`MAX_IDLE`] are kept already.
    pub(crate) fn put(&self, id: &str, sandbox: Arc<Sandbox>, client: AgentClient) {
        let Some(idle) = client.into_idle() else {
            return;
        };
        let mut entries = self.lock();
        let entry = entries.entry(id.to_string()).or_insert_with(|| Entry {
            sandbox,
            idle: Vec::new(),
        });
        if entry.idle.len() < MAX_IDLE {
            entry.idle.push((idle, Instant::now()));
        }
    }

    /// Drops everything kept for sandbox `id` (it is pausing, stopping or gone).
    pub(crate) fn forget(&self, id: &str) {
        let removed = self.lock().remove(id);
        drop(removed);
    }

    /// Drops connections unused for [`IDLE_FOR`], and sandboxes left with none.
    pub(crate) fn sweep(&self) {
        let now = Instant::now();
        let mut entries = self.lock();
        entries.retain(|_, entry| {
            entry
                .idle
                .retain(|(_, since)| now.duration_since(*since) < IDLE_FOR);
            !entry.idle.is_empty()
        });
    }
}
