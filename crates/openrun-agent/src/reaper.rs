//! Reaping: the agent is pid 1 (or a child subreaper in tests), so every process in the
//! sandbox whose parent died becomes its child and must be waited for, or it stays a zombie.
//!
//! `tokio::process` is not used: it reaps only its own children and would race with a
//! `waitpid(-1)` loop. Instead every SIGCHLD drains all exited children with
//! `waitpid(-1, WNOHANG)`: known pids get their exit status recorded, orphans are just reaped.

use std::rc::Rc;

use rustix::io::Errno;
use rustix::process::WaitOptions;
use tokio::signal::unix::Signal;

use crate::agent::Agent;
use crate::process::exit_status_from_wait;

/// Reaps on every SIGCHLD until the signal stream ends.
pub(crate) async fn run(agent: Rc<Agent>, mut sigchld: Signal) {
    loop {
        // Also runs once before the first signal: children may have exited before the handler
        // was installed.
        reap_all(&agent);
        if sigchld.recv().await.is_none() {
            break;
        }
    }
}

/// Collects every child that has exited, without blocking.
pub(crate) fn reap_all(agent: &Rc<Agent>) {
    loop {
        match rustix::process::wait(WaitOptions::NOHANG) {
            Ok(Some((pid, status))) => {
                agent.on_reaped(
                    pid.as_raw_nonzero().get(),
                    exit_status_from_wait(status.as_raw()),
                );
            }
            Ok(None) | Err(Errno::CHILD) => break,
            Err(Errno::INTR) => {}
            Err(e) => {
                tracing::warn!(error = %e, "waitpid failed");
                break;
            }
        }
    }
}
