//! The agent's relays: `ConnectPort` (a raw pipe to a TCP port), `RelayEgress` +
//! `TakeConnection` (connections accepted on a loopback port, announced and claimed), against a
//! real agent process. The agent under test shares the host's network namespace, so ports are
//! picked free on the host's loopback.

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use openrun_protocol::frame::read_frame;
use openrun_protocol::{
    AgentError, AgentMessage, ErrorCode, Frame, Request, RequestEnvelope, Response,
    EGRESS_PROXY_PORT, UNCLAIMED_CONNECTION_TIMEOUT_MS,
};
use support::*;

fn main() {
    helper_main();
    run_tests(&[
        (
            "connect_port_pipes_bytes_with_half_closes",
            connect_port_pipes_bytes_with_half_closes,
        ),
        (
            "the_server_side_closing_first_is_passed_on",
            the_server_side_closing_first_is_passed_on,
        ),
        (
            "a_closed_port_is_refused_and_stays_framed",
            a_closed_port_is_refused_and_stays_framed,
        ),
        (
            "egress_connections_are_announced_and_taken",
            egress_connections_are_announced_and_taken,
        ),
        (
            "unclaimed_connections_close_after_the_timeout",
            unclaimed_connections_close_after_the_timeout,
        ),
        (
            "closing_the_relay_connection_closes_the_listener",
            closing_the_relay_connection_closes_the_listener,
        ),
        (
            "a_new_relay_replaces_the_previous_one",
            a_new_relay_replaces_the_previous_one,
        ),
        (
            "pending_connections_are_capped",
            pending_connections_are_capped,
        ),
        (
            "the_egress_relay_port_is_never_connected_to",
            the_egress_relay_port_is_never_connected_to,
        ),
    ]);
}

/// A port on the host's loopback that nothing listens on (right now).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// Sends `request` (plus `extra` raw bytes right behind it, in the same write) on a new
/// connection and reads exactly one frame back: the raw pipe on `Done`, the refusal otherwise.
fn open_pipe(socket: &Path, request: Request, extra: &[u8]) -> Result<UnixStream, AgentError> {
    let deadline = Instant::now() + WAIT;
    // Retried while the agent is still starting.
    let mut stream = loop {
        match UnixStream::connect(socket) {
            Ok(stream) => break stream,
            Err(e) if Instant::now() > deadline => panic!("connect to the agent: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    let mut bytes = Frame::new(RequestEnvelope { id: 1, request })
        .encode()
        .unwrap();
    bytes.extend_from_slice(extra);
    stream.write_all(&bytes).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let frame: Frame<AgentMessage> = read_frame(&mut stream).expect("an answer");
    match frame.header {
        AgentMessage::Response { id: 1, result } => result.map(|r| {
            assert_eq!(r, Response::Done);
            stream
        }),
        other => panic!("unexpected {other:?}"),
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 256) as u8).collect()
}

fn connect_port_pipes_bytes_with_half_closes() {
    let agent = TestAgent::start();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // The far end reads everything until the half-close, then answers with a digest and
    // closes: the answer can only come if the client's shutdown(SHUT_WR) got through.
    let server = std::thread::spawn(move || {
        let (mut tcp, _) = listener.accept().unwrap();
        let mut got = Vec::new();
        tcp.read_to_end(&mut got).unwrap();
        let mut answer = format!("{} bytes\n", got.len()).into_bytes();
        answer.extend_from_slice(&got);
        tcp.write_all(&answer).unwrap();
        got
    });
    let body = pattern(3 << 20);
    // The first bytes travel in the same write as the request: they must not be taken for
    // (or lost behind) the frame.
    let mut pipe = open_pipe(&agent.socket, Request::ConnectPort { port }, &body[..1000])
        .expect("connect to the port");
    pipe.write_all(&body[1000..]).unwrap();
    pipe.shutdown(Shutdown::Write).unwrap();
    let mut answer = Vec::new();
    pipe.read_to_end(&mut answer).unwrap();
    let got = server.join().unwrap();
    assert_eq!(got.len(), body.len());
    assert!(got == body, "the bytes arrive unchanged and in order");
    let header = format!("{} bytes\n", body.len());
    assert_eq!(&answer[..header.len()], header.as_bytes());
    assert!(
        answer[header.len()..] == body[..],
        "the answer comes back whole"
    );
}

fn the_server_side_closing_first_is_passed_on() {
    let agent = TestAgent::start();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut tcp, _) = listener.accept().unwrap();
        tcp.write_all(b"banner\n").unwrap();
        tcp.shutdown(Shutdown::Write).unwrap();
        // Still reading after its own half-close.
        let mut got = Vec::new();
        tcp.read_to_end(&mut got).unwrap();
        got
    });
    let mut pipe =
        open_pipe(&agent.socket, Request::ConnectPort { port }, b"").expect("connect to the port");
    let mut banner = Vec::new();
    pipe.read_to_end(&mut banner).unwrap();
    assert_eq!(
        banner, b"banner\n",
        "end of stream after the far end's half-close"
    );
    pipe.write_all(b"still open this way").unwrap();
    pipe.shutdown(Shutdown::Write).unwrap();
    assert_eq!(server.join().unwrap(), b"still open this way");
}

fn a_closed_port_is_refused_and_stays_framed() {
    let agent = TestAgent::start();
    let port = free_port();
    let err = open_pipe(&agent.socket, Request::ConnectPort { port }, b"").unwrap_err();
    assert_eq!(err.code, ErrorCode::ConnectionRefused);
    assert!(err.message.contains(&port.to_string()), "{}", err.message);
    let mut c = agent.client();
    let err = c.call_err(Request::ConnectPort { port });
    assert_eq!(err.code, ErrorCode::ConnectionRefused);
    assert!(
        matches!(c.call(Request::Info), Ok(Response::Info(_))),
        "the connection stays framed after a refusal"
    );
    let err = c.call_err(Request::ConnectPort { port: 0 });
    assert_eq!(err.code, ErrorCode::InvalidArgument);
    let err = c.call_err(Request::TakeConnection { conn: 12345 });
    assert_eq!(err.code, ErrorCode::NotFound);
}

/// Starts an egress relay on `port` on a framed client.
fn relay(agent: &TestAgent, port: u16) -> Client {
    let mut c = agent.client();
    assert!(matches!(
        c.call(Request::RelayEgress { port }),
        Ok(Response::Done)
    ));
    c
}

/// The id of the next `Incoming` on `c`.
fn incoming(c: &mut Client) -> u64 {
    match c.next_event(WAIT).map(|f| f.header) {
        Some(AgentMessage::Incoming { conn }) => conn,
        other => panic!("expected an incoming connection, got {other:?}"),
    }
}

fn egress_connections_are_announced_and_taken() {
    let agent = TestAgent::start();
    let port = free_port();
    let mut control = relay(&agent, port);
    let mut inside = TcpStream::connect(("127.0.0.1", port)).unwrap();
    inside.write_all(b"CONNECT example.com:443").unwrap();
    let conn = incoming(&mut control);
    let mut second = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let conn2 = incoming(&mut control);
    assert_ne!(conn, conn2, "each connection has its own id");

    let mut pipe = open_pipe(&agent.socket, Request::TakeConnection { conn }, b"")
        .expect("take the connection");
    let mut buf = [0u8; 23];
    pipe.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"CONNECT example.com:443");
    pipe.write_all(b"HTTP/1.1 403 Forbidden\r\n\r\n").unwrap();
    pipe.shutdown(Shutdown::Write).unwrap();
    let mut answer = Vec::new();
    inside.read_to_end(&mut answer).unwrap();
    assert_eq!(answer, b"HTTP/1.1 403 Forbidden\r\n\r\n");
    inside.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    pipe.read_to_end(&mut rest).unwrap();
    assert!(
        rest.is_empty(),
        "the inside's half-close ends the pipe's input"
    );

    let err = open_pipe(&agent.socket, Request::TakeConnection { conn }, b"").unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound, "a connection is taken once");
    let mut pipe2 = open_pipe(&agent.socket, Request::TakeConnection { conn: conn2 }, b"")
        .expect("take the second connection");
    second.write_all(b"x").unwrap();
    let mut one = [0u8; 1];
    pipe2.read_exact(&mut one).unwrap();
    assert_eq!(&one, b"x");
}

fn unclaimed_connections_close_after_the_timeout() {
    let agent = TestAgent::start();
    let port = free_port();
    let mut control = relay(&agent, port);
    let started = Instant::now();
    let mut inside = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let conn = incoming(&mut control);
    inside
        .set_read_timeout(Some(
            Duration::from_millis(UNCLAIMED_CONNECTION_TIMEOUT_MS) + WAIT,
        ))
        .unwrap();
    let mut buf = [0u8; 1];
    let n = inside.read(&mut buf).expect("closed, not timed out");
    let waited = started.elapsed();
    assert_eq!(n, 0, "the agent closes it");
    assert!(
        waited >= Duration::from_millis(UNCLAIMED_CONNECTION_TIMEOUT_MS - 500),
        "closed after {waited:?}, before the timeout"
    );
    let err = open_pipe(&agent.socket, Request::TakeConnection { conn }, b"").unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
    assert!(err.message.contains("unclaimed"), "{}", err.message);
}

/// Waits until connecting to `port` is refused.
fn refused_within(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        match TcpStream::connect(("127.0.0.1", port)) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return true,
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    false
}

fn closing_the_relay_connection_closes_the_listener() {
    let agent = TestAgent::start();
    let port = free_port();
    let control = relay(&agent, port);
    assert!(TcpStream::connect(("127.0.0.1", port)).is_ok());
    drop(control);
    assert!(
        refused_within(port, Duration::from_secs(3)),
        "programs get a refusal once the relay is gone"
    );
    // And the port can be relayed again.
    let mut again = relay(&agent, port);
    let _inside = TcpStream::connect(("127.0.0.1", port)).unwrap();
    incoming(&mut again);
}

fn a_new_relay_replaces_the_previous_one() {
    let agent = TestAgent::start();
    let port = free_port();
    let mut first = relay(&agent, port);
    let mut second = relay(&agent, port);
    let _inside = TcpStream::connect(("127.0.0.1", port)).unwrap();
    incoming(&mut second);
    assert!(
        first.next_event(Duration::from_millis(300)).is_none(),
        "the replaced relay announces nothing"
    );
    // Closing the replaced relay's connection leaves the new listener alone.
    drop(first);
    std::thread::sleep(Duration::from_millis(100));
    let _inside2 = TcpStream::connect(("127.0.0.1", port)).expect("still listening");
    incoming(&mut second);
}

fn pending_connections_are_capped() {
    let agent = TestAgent::start();
    let port = free_port();
    let mut control = relay(&agent, port);
    let mut clients = Vec::new();
    for _ in 0..300 {
        clients.push(TcpStream::connect(("127.0.0.1", port)).unwrap());
    }
    let mut announced = 0;
    while control.next_event(Duration::from_millis(500)).is_some() {
        announced += 1;
    }
    assert_eq!(announced, 256, "at most 256 wait to be claimed");
    // The rest were closed at once.
    // The rest were closed at once (end of stream); the parked ones stay open (no data).
    let mut closed = 0;
    for c in &mut clients {
        // Non-blocking: the parked ones would each wait out a read timeout, and all together
        // outlast the unclaimed timeout.
        c.set_nonblocking(true).unwrap();
        if matches!(c.read(&mut [0u8; 1]), Ok(0)) {
            closed += 1;
        }
    }
    assert_eq!(closed, 300 - 256);
}

/// `ConnectPort` never reaches the egress relay (a preview would enter the egress proxy as the
/// sandbox): not its well-known port, not the port a relay listens on now.
fn the_egress_relay_port_is_never_connected_to() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    let err = c.call_err(Request::ConnectPort {
        port: EGRESS_PROXY_PORT,
    });
    assert_eq!(err.code, ErrorCode::PermissionDenied);
    assert!(
        err.message.contains(&EGRESS_PROXY_PORT.to_string()) && err.message.contains("egress"),
        "{}",
        err.message
    );
    let port = free_port();
    let _relay = relay(&agent, port);
    let err = open_pipe(&agent.socket, Request::ConnectPort { port }, b"").unwrap_err();
    assert_eq!(err.code, ErrorCode::PermissionDenied);
    assert!(err.message.contains(&port.to_string()), "{}", err.message);
    // Other ports still connect.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let other = listener.local_addr().unwrap().port();
    open_pipe(&agent.socket, Request::ConnectPort { port: other }, b"").expect("another port");
}
