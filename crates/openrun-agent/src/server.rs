//! The agent's main loop: accept connections, serve the control stream, reap children, and
//! stop on `Shutdown`, at the end of the sandbox's lifetime, or when the control stream
//! closes (with `exit_with_control`).

use std::future::pending;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};

use crate::agent::Agent;
use crate::connection::serve_connection;
use crate::files::Files;
use crate::{AgentConfig, AgentStartError};

/// How long the agent waits for killed processes to be reaped before it returns.
const KILL_WAIT: Duration = Duration::from_secs(2);
/// Pause after a failed `accept` (e.g. out of descriptors) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// How long an agent that ends with its creator's stream (`openrun run`) serves before it sets
/// up process starts ahead of use (see [`crate::vfork::prepare`]): one that runs a single
/// short command (`openrun run -- true`) is gone before then and never makes the watchdog
/// thread at all. Other agents (the server's warm pool, API creates) set up at once: they are
/// made ahead of use, and a pooled one may be handed out within milliseconds of its warm-up.
const PREPARE_AFTER: Duration = Duration::from_millis(50);

/// Why the agent stopped.
#[derive(Debug, Clone, Copy)]
enum StopReason {
    Shutdown,
    Lifetime,
    ControlClosed,
}

/// Serves until a stop condition; returns the exit code.
pub(crate) async fn serve(
    config: AgentConfig,
    listener: UnixListener,
    control: Option<UnixStream>,
) -> Result<i32, AgentStartError> {
    let files = Files::open(&config.root).map_err(|source| AgentStartError::Root {
        path: config.root.clone(),
        source,
    })?;
    // SIGCHLD must be handled before the first process is started.
    let sigchld = signal(SignalKind::child()).map_err(AgentStartError::Setup)?;
    listener
        .set_nonblocking(true)
        .map_err(AgentStartError::Setup)?;
    let listener = tokio::net::UnixListener::from_std(listener).map_err(AgentStartError::Setup)?;
    let control = match control {
        Some(stream) => {
            stream
                .set_nonblocking(true)
                .map_err(AgentStartError::Setup)?;
            Some(tokio::net::UnixStream::from_std(stream).map_err(AgentStartError::Setup)?)
        }
        None => None,
    };

    let exit_with_control = config.exit_with_control;
    let agent = Agent::new(config, files);
    tracing::info!(sandbox = %agent.config.sandbox_id, "agent serving");
    tokio::task::spawn_local(crate::reaper::run(agent.clone(), sigchld));

    let control_task =
        control.map(|stream| tokio::task::spawn_local(serve_connection(agent.clone(), stream)));
    // Set up process starts (the watchdog thread, the child stack) ahead of use. For
    // `openrun run` only after a while, not now: a task spawned now runs before the control
    // stream's first request (its socket's readiness is only known after the runtime's next
    // poll), and would make the thread on the path of that request's exec, which needs none
    // (the first start of pid 1, see `vfork`). A start that needs the watchdog before then
    // makes it itself.
    tokio::task::spawn_local(async move {
        if exit_with_control {
            tokio::time::sleep(PREPARE_AFTER).await;
        }
        crate::vfork::prepare()
    });
    let control_closed = async move {
        match control_task {
            Some(task) if exit_with_control => {
                let _ = task.await;
            }
            _ => pending::<()>().await,
        }
    };
    // The lifetime can be changed by a client (`SetLifetime`): wait for the current deadline,
    // starting over whenever it changes.
    let mut deadlines = agent.deadline();
    let deadline = async move {
        loop {
            let current = *deadlines.borrow_and_update();
            let passed = async {
                match current {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => pending::<()>().await,
                }
            };
            tokio::select! {
                () = passed => return,
                changed = deadlines.changed() => {
                    if changed.is_err() {
                        pending::<()>().await;
                    }
                }
            }
        }
    };
    tokio::pin!(control_closed, deadline);
    let mut shutdown = agent.shutdown_requested();

    let reason = loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::task::spawn_local(serve_connection(agent.clone(), stream));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            _ = shutdown.wait_for(|requested| *requested) => break StopReason::Shutdown,
            () = &mut deadline => break StopReason::Lifetime,
            () = &mut control_closed => break StopReason::ControlClosed,
        }
    };
    tracing::info!(?reason, "agent stopping; killing every process");
    agent.kill_all();
    agent.wait_for_exits(KILL_WAIT).await;
    Ok(0)
}
