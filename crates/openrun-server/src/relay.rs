//! The server's ends of the agent's relays ([`openrun_agent`]'s `relay` module):
//!
//! - [`open_port`]: a raw byte pipe to a TCP port on a running sandbox's loopback, through its
//!   agent (`ConnectPort`). The preview proxy ([`crate::preview`]) speaks HTTP over it; nothing
//!   listens on the host for it.
//! - the egress supervisor ([`ensure_egress`]): one task per live sandbox keeps a
//!   `RelayEgress` connection to its agent, so programs inside find the egress proxy at
//!   `127.0.0.1:3128` ([`EGRESS_PROXY_PORT`]). Each connection they open is announced
//!   (`Incoming`), claimed on a new agent connection (`TakeConnection`) and served by
//!   [`crate::egress::serve_connection`].
//!
//! The supervisor follows the sandbox's recorded state: while it is paused its agent is frozen
//! (it cannot answer, so no new relay is attempted; the existing connection simply waits and
//! works again after the resume); when the relay connection drops while the sandbox runs
//! (the agent restarted its listener, a transient failure) it reconnects with a backoff; once
//! the sandbox is stopped, deleted or gone it ends. While no relay is up, programs inside get
//! a refused connection, never a hang.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use openrun_protocol::{AgentMessage, Request, Response, EGRESS_PROXY_PORT};
use openrun_runtime::{AgentClient, AgentStream, ClientError, RuntimeError};

use crate::api::{blocking, Shared};
use crate::db::{self, SandboxRow};
use crate::error::ApiError;

/// How long an agent may take to answer a relay request (a frozen one never does).
const AGENT_WAIT: Duration = Duration::from_secs(5);
/// How long a `ConnectPort` may take: longer than the agent's own 10 s connect timeout, so
/// a port whose accept queue is full is reported by the agent (`port_closed`).
const CONNECT_WAIT: Duration = Duration::from_secs(15);
/// First pause before the supervisor tries again.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest pause between the supervisor's attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often the supervisor looks at a sandbox that is paused or still being created.
const STATE_POLL: Duration = Duration::from_secs(1);

/// A raw byte pipe to `port` on the loopback of `row`'s sandbox. 409 when the sandbox is not
/// running (`sandbox_paused` when it is paused), 400 for port 0, 403 `forbidden` for the egress
/// relay's port ([`EGRESS_PROXY_PORT`]: a pipe there would enter the egress proxy as the
/// sandbox; refused here and by the agent), 502 `port_closed` when nothing listens on the port
/// (or accepts within 10 s), 502 `bad_gateway` when the agent is silent.
pub(crate) async fn open_port(
    s: &Shared,
    row: &SandboxRow,
    port: u16,
) -> Result<AgentStream, ApiError> {
    if port == EGRESS_PROXY_PORT {
        // Also refused by the agent; checked here for agents that started before it did.
        return Err(ApiError::Agent(openrun_protocol::AgentError::new(
            openrun_protocol::ErrorCode::PermissionDenied,
            format!(
                "port {port} is the sandbox's egress proxy relay (its HTTP_PROXY): it cannot be \
                 previewed"
            ),
        )));
    }
    let (_sandbox, client) = crate::exec::open_running(s, row).await?;
    match tokio::time::timeout(
        CONNECT_WAIT,
        client.open_pipe(Request::ConnectPort { port }),
    )
    .await
    {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(ApiError::from_client(
            &format!("cannot connect to port {port} of sandbox {}", row.id),
            e,
        )),
        Err(_) => Err(ApiError::BadGateway(format!(
            "cannot connect to port {port} of sandbox {}: its agent did not answer within {}s",
            row.id,
            CONNECT_WAIT.as_secs()
        ))),
    }
}

/// Sandboxes whose egress supervisor runs.
static SUPERVISED: Mutex<Option<HashSet<String>>> = Mutex::new(None);

/// Runs `f` on the set of supervised sandboxes.
fn supervised<T>(f: impl FnOnce(&mut HashSet<String>) -> T) -> T {
    let mut guard = SUPERVISED.lock().unwrap_or_else(|p| p.into_inner());
    f(guard.get_or_insert_with(HashSet::new))
}

/// Starts the egress supervisor of sandbox `sandbox_id` (owned by `tenant`) unless one runs:
/// after a create, and for every live sandbox when the server starts. `socket`: the agent's
/// socket of a sandbox the caller just made running, so the first relay skips reading its
/// row and opening it again (work that would compete with the sandbox's first exec).
pub(crate) fn ensure_egress(
    state: &Shared,
    sandbox_id: &str,
    tenant: &str,
    socket: Option<PathBuf>,
) {
    if !supervised(|set| set.insert(sandbox_id.to_string())) {
        return;
    }
    let (state, id, tenant) = (state.clone(), sandbox_id.to_string(), tenant.to_string());
    tokio::spawn(async move {
        supervise(&state, &id, &tenant, socket).await;
        supervised(|set| set.remove(&id));
        tracing::debug!(id, "egress relay supervisor ended");
    });
}

/// What the supervisor does after looking at the sandbox.
enum Next {
    /// Relay for the sandbox whose agent socket is here.
    Relay(PathBuf),
    /// Look again later.
    Wait,
    /// The sandbox is gone: stop.
    End,
}

/// Keeps a relay up while the sandbox lives; the first relay goes to `known` when given.
async fn supervise(state: &Shared, id: &str, tenant: &str, mut known: Option<PathBuf>) {
    let mut backoff = MIN_BACKOFF;
    let mut warned = false;
    loop {
        let next = match known.take() {
            Some(socket) => Next::Relay(socket),
            None => look(state, id, tenant).await,
        };
        let socket = match next {
            Next::Relay(socket) => socket,
            Next::Wait => {
                tokio::time::sleep(STATE_POLL).await;
                continue;
            }
            Next::End => return,
        };
        match relay(state, id, tenant, &socket, &mut backoff).await {
            Ok(()) => tracing::debug!(id, "egress relay connection closed"),
            Err(e) => {
                // Logged once at warn per supervisor (a program squatting the port, say), then
                // at debug: retries would repeat it every few seconds.
                if warned {
                    tracing::debug!(id, error = %e, "egress relay failed; retrying");
                } else {
                    tracing::warn!(id, error = %e, "egress relay failed; retrying");
                    warned = true;
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// The sandbox's recorded state decides: relay while running, wait while paused or being
/// created, end otherwise (and when the runtime no longer knows it).
async fn look(state: &Shared, id: &str, tenant: &str) -> Next {
    let (t, key) = (tenant.to_string(), id.to_string());
    let row = match state.db.call(move |c| db::get_sandbox(c, &t, &key)).await {
        Ok(Some(row)) => row,
        Ok(None) => return Next::End,
        Err(e) => {
            tracing::warn!(id, error = %e, "egress relay: cannot read the sandbox record");
            return Next::Wait;
        }
    };
    match row.state.as_str() {
        "running" => {}
        "paused" | "creating" => return Next::Wait,
        _ => return Next::End,
    }
    let runtime = state.runtime.clone();
    let key = id.to_string();
    match blocking(move || runtime.open_sandbox_exact(&key)).await {
        Ok(Ok(sandbox)) => Next::Relay(sandbox.socket_path()),
        Ok(Err(RuntimeError::NoSuchSandbox(_))) => Next::End,
        Ok(Err(e)) => {
            tracing::warn!(id, error = %e, "egress relay: cannot open the sandbox");
            Next::Wait
        }
        Err(_) => Next::Wait,
    }
}

/// One relay connection: asks for the listener, then serves its announcements until the
/// connection ends. `backoff` goes back to its minimum once the relay is up.
async fn relay(
    state: &Shared,
    id: &str,
    tenant: &str,
    socket: &std::path::Path,
    backoff: &mut Duration,
) -> Result<(), ClientError> {
    let start = async {
        let mut client = AgentClient::connect(socket).await?;
        match client
            .call(Request::RelayEgress {
                port: EGRESS_PROXY_PORT,
            })
            .await?
            .header
        {
            Response::Done => Ok(client),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    };
    let client = match tokio::time::timeout(AGENT_WAIT, start).await {
        Ok(result) => result?,
        Err(_) => {
            return Err(ClientError::Unexpected(format!(
                "the agent did not answer within {AGENT_WAIT:?}"
            )))
        }
    };
    tracing::debug!(id, port = EGRESS_PROXY_PORT, "egress relay up");
    *backoff = MIN_BACKOFF;
    let (_sender, mut receiver) = client.split();
    loop {
        let frame = match receiver.next().await {
            Ok(frame) => frame,
            Err(ClientError::Frame(openrun_protocol::FrameError::Closed)) => return Ok(()),
            Err(e) => return Err(e),
        };
        if let AgentMessage::Incoming { conn } = frame.header {
            let (state, id, tenant) = (state.clone(), id.to_string(), tenant.to_string());
            let socket = socket.to_path_buf();
            tokio::spawn(async move {
                match take(&socket, conn).await {
                    Ok(stream) => {
                        crate::egress::serve_connection(state, id, tenant, stream).await;
                    }
                    Err(e) => {
                        tracing::debug!(id, conn, error = %e, "cannot take an egress connection")
                    }
                }
            });
        }
    }
}

/// Claims announced connection `conn` on a new agent connection.
async fn take(socket: &std::path::Path, conn: u64) -> Result<AgentStream, ClientError> {
    let claim = async {
        AgentClient::connect(socket)
            .await?
            .open_pipe(Request::TakeConnection { conn })
            .await
    };
    match tokio::time::timeout(AGENT_WAIT, claim).await {
        Ok(result) => result,
        Err(_) => Err(ClientError::Unexpected(format!(
            "the agent did not answer within {AGENT_WAIT:?}"
        ))),
    }
}
