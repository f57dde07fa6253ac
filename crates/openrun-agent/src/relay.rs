//! Raw byte pipes between agent connections and TCP connections on the sandbox's loopback.
//!
//! Two directions, one mechanism:
//! - the port relay ([`Request::ConnectPort`](openrun_protocol::Request::ConnectPort)): the
//!   host reaches a port inside (previews). The agent connects to `127.0.0.1:port` (then
//!   `[::1]:port`) and, once it has answered `Done`, the Unix connection becomes a byte pipe.
//!   Never to the egress relay's own port (it would enter the egress proxy as the sandbox).
//! - the egress relay ([`Request::RelayEgress`](openrun_protocol::Request::RelayEgress)):
//!   programs inside reach the host's egress proxy. The agent listens on the sandbox's
//!   loopback, announces each accepted connection on the relay's connection
//!   ([`AgentMessage::Incoming`]), and the host claims it on a new connection
//!   ([`Request::TakeConnection`](openrun_protocol::Request::TakeConnection)), which then
//!   becomes a byte pipe to it.
//!
//! Nothing here listens outside the sandbox's own network namespace: the host side is always
//! a Unix connection the host opened to the agent.
//!
//! Bounds: a pipe holds at most [`PIPE_BUFFER`] bytes per direction; at most [`MAX_PENDING`]
//! announced connections wait to be claimed (more are closed at once) and each waits at most
//! [`UNCLAIMED_CONNECTION_TIMEOUT_MS`].

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::rc::Rc;
use std::time::Duration;

use openrun_protocol::{
    AgentError, AgentMessage, ErrorCode, Frame, EGRESS_PROXY_PORT, UNCLAIMED_CONNECTION_TIMEOUT_MS,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::agent::Agent;
use crate::connection::{OutTx, Outbound};
use crate::errors::internal;

/// Bytes a pipe buffers per direction.
pub(crate) const PIPE_BUFFER: usize = 64 << 10;
/// Announced connections that may wait to be claimed at once.
pub(crate) const MAX_PENDING: usize = 256;
/// How long connecting to a port inside may take (a full accept queue drops SYNs).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed `accept` (e.g. out of descriptors) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The egress relay's state: the listener and the connections waiting to be claimed.
#[derive(Debug, Default)]
pub(crate) struct Relay {
    /// Id of the next announced connection.
    next_conn: Cell<u64>,
    /// Announced, not yet claimed.
    pending: RefCell<HashMap<u64, TcpStream>>,
    /// The current listener's accept task.
    listening: RefCell<Option<Listening>>,
    /// Accept tasks stopped but perhaps not yet dropped (their sockets may still be bound).
    retired: RefCell<Vec<JoinHandle<()>>>,
    /// Generation of the next listener.
    next_generation: Cell<u64>,
}

#[derive(Debug)]
struct Listening {
    generation: u64,
    /// The port it listens on.
    port: u16,
    task: JoinHandle<()>,
}

/// A listener that is bound and registered; it accepts once [`Started::start`] is called, so
/// the `Done` answer can go out before the first announcement.
pub(crate) struct Started {
    /// Identifies this listener to [`Relay::stop`].
    pub(crate) generation: u64,
    go: oneshot::Sender<()>,
}

impl Started {
    /// Lets the listener accept (and announce) connections.
    pub(crate) fn start(self) {
        let _ = self.go.send(());
    }
}

impl Relay {
    /// Stops the listener `generation` if it is still the current one (the connection that
    /// asked for it is gone).
    pub(crate) fn stop(&self, generation: u64) {
        let mut listening = self.listening.borrow_mut();
        if listening
            .as_ref()
            .is_some_and(|l| l.generation == generation)
        {
            if let Some(old) = listening.take() {
                old.task.abort();
                let mut retired = self.retired.borrow_mut();
                retired.retain(|t| !t.is_finished());
                retired.push(old.task);
            }
        }
    }

    /// Claims an announced connection.
    pub(crate) fn take(&self, conn: u64) -> Result<TcpStream, AgentError> {
        self.pending.borrow_mut().remove(&conn).ok_or_else(|| {
            AgentError::new(
                ErrorCode::NotFound,
                format!(
                    "no connection {conn} waits to be taken (never announced, already taken, \
                     or closed after {UNCLAIMED_CONNECTION_TIMEOUT_MS} ms unclaimed)"
                ),
            )
        })
    }

    /// Whether the egress relay listens on `port` now.
    fn listens_on(&self, port: u16) -> bool {
        self.listening
            .borrow()
            .as_ref()
            .is_some_and(|l| l.port == port)
    }

    /// Number of announced connections waiting to be claimed.
    fn pending_len(&self) -> usize {
        self.pending.borrow().len()
    }

    /// Keeps an accepted connection until it is claimed or its time is up; `None` when too
    /// many already wait (the connection is then closed).
    fn park(agent: &Rc<Agent>, stream: TcpStream) -> Option<u64> {
        let relay = &agent.relay;
        if relay.pending_len() >= MAX_PENDING {
            tracing::warn!(
                max = MAX_PENDING,
                "too many egress connections wait to be claimed; closing a new one"
            );
            return None;
        }
        let conn = relay.next_conn.get();
        relay.next_conn.set(conn + 1);
        relay.pending.borrow_mut().insert(conn, stream);
        let agent = agent.clone();
        tokio::task::spawn_local(async move {
            tokio::time::sleep(Duration::from_millis(UNCLAIMED_CONNECTION_TIMEOUT_MS)).await;
            if agent.relay.pending.borrow_mut().remove(&conn).is_some() {
                tracing::debug!(conn, "closing an egress connection nobody claimed");
            }
        });
        Some(conn)
    }
}

/// Listens on `port` of the sandbox's loopback for the egress relay, replacing any earlier
/// listener; announcements go to `out`. Call [`Started::start`] once the answer is queued.
pub(crate) async fn listen(
    agent: &Rc<Agent>,
    port: u16,
    out: OutTx,
) -> Result<Started, AgentError> {
    check_port(port)?;
    let relay = &agent.relay;
    // The earlier listener's sockets must be closed before the port can be bound again.
    let mut old: Vec<JoinHandle<()>> = relay.retired.borrow_mut().drain(..).collect();
    old.extend(relay.listening.borrow_mut().take().map(|l| l.task));
    for task in old {
        task.abort();
        let _ = task.await;
    }
    let v4 = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
        .await
        .map_err(|e| bind_error(port, &e))?;
    // IPv6 loopback only where the sandbox has it.
    let v6 = match TcpListener::bind(SocketAddr::from((Ipv6Addr::LOCALHOST, port))).await {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::debug!(port, error = %e, "no egress listener on [::1]");
            None
        }
    };
    let generation = relay.next_generation.get();
    relay.next_generation.set(generation + 1);
    let (go, started) = oneshot::channel();
    let task = tokio::task::spawn_local(accept_loop(agent.clone(), v4, v6, out, started));
    // Whoever replaced an earlier listener meanwhile (the awaits above) is replaced in turn.
    if let Some(prev) = relay.listening.borrow_mut().replace(Listening {
        generation,
        port,
        task,
    }) {
        prev.task.abort();
        relay.retired.borrow_mut().push(prev.task);
    }
    Ok(Started { generation, go })
}

fn bind_error(port: u16, e: &std::io::Error) -> AgentError {
    if e.kind() == std::io::ErrorKind::AddrInUse {
        AgentError::new(
            ErrorCode::AlreadyExists,
            format!("port {port} is already in use inside the sandbox"),
        )
    } else {
        internal(&format!("cannot listen on port {port}"), e)
    }
}

async fn accept_loop(
    agent: Rc<Agent>,
    v4: TcpListener,
    v6: Option<TcpListener>,
    out: OutTx,
    started: oneshot::Receiver<()>,
) {
    if started.await.is_err() {
        return;
    }
    loop {
        let accepted = tokio::select! {
            r = v4.accept() => r,
            r = async {
                match &v6 {
                    Some(l) => l.accept().await,
                    None => std::future::pending().await,
                }
            } => r,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "egress accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Some(conn) = Relay::park(&agent, stream) else {
            continue;
        };
        let frame = Frame::new(AgentMessage::Incoming { conn });
        if out.send(Outbound::Frame(frame)).await.is_err() {
            // The relay's connection is gone; its end stops this listener too.
            agent.relay.pending.borrow_mut().remove(&conn);
            return;
        }
    }
}

fn check_port(port: u16) -> Result<(), AgentError> {
    if port == 0 {
        return Err(AgentError::new(
            ErrorCode::InvalidArgument,
            "port 0 is not a valid port: expected 1 to 65535",
        ));
    }
    Ok(())
}

/// Connects to `port` on the sandbox's loopback: `127.0.0.1`, then `[::1]` if that was
/// refused. Refused on both (or no accept within [`CONNECT_TIMEOUT`]) is
/// [`ErrorCode::ConnectionRefused`]. The egress relay's port ([`EGRESS_PROXY_PORT`], or the
/// port the relay listens on now) is [`ErrorCode::PermissionDenied`]: a connection there
/// would enter the egress proxy as this sandbox (its policy and secrets) for whoever opened it.
pub(crate) async fn connect_port(agent: &Agent, port: u16) -> Result<TcpStream, AgentError> {
    check_port(port)?;
    if port == EGRESS_PROXY_PORT || agent.relay.listens_on(port) {
        return Err(AgentError::new(
            ErrorCode::PermissionDenied,
            format!(
                "port {port} is the sandbox's egress proxy relay (its HTTP_PROXY): it cannot \
                 be connected to from outside"
            ),
        ));
    }
    let attempt = async {
        match TcpStream::connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await {
            Ok(stream) => Ok(stream),
            Err(v4) if v4.kind() == std::io::ErrorKind::ConnectionRefused => {
                TcpStream::connect(SocketAddr::from((Ipv6Addr::LOCALHOST, port)))
                    .await
                    .map_err(|_| v4)
            }
            Err(v4) => Err(v4),
        }
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Err(AgentError::new(
            ErrorCode::ConnectionRefused,
            format!("nothing listens on port {port} inside the sandbox (127.0.0.1 or [::1])"),
        )),
        Ok(Err(e)) => Err(internal(&format!("cannot connect to port {port}"), e)),
        Err(_) => Err(AgentError::new(
            ErrorCode::ConnectionRefused,
            format!(
                "nothing accepted a connection on port {port} inside the sandbox within {}s",
                CONNECT_TIMEOUT.as_secs()
            ),
        )),
    }
}

/// Copies bytes both ways until both directions have ended: the end of one side's input is
/// passed on as a half-close (`shutdown(SHUT_WR)`) of the other; an error ends both.
pub(crate) async fn pipe<A, B>(mut a: A, mut b: B)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, PIPE_BUFFER, PIPE_BUFFER).await {
        Ok((up, down)) => tracing::debug!(up, down, "relay pipe ended"),
        Err(e) => tracing::debug!(error = %e, "relay pipe failed"),
    }
}
