//! Flow control of attached output: a client that streams a process's output gets every
//! byte however slowly it reads (the process waits on its pipe instead), while output nobody
//! streams stays bounded by the retention. Real agent, real processes (see tests/support).

mod support;

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use openrun_protocol::frame::{read_frame, write_frame};
use openrun_protocol::{
    AgentMessage, AttachRequest, ExecRequest, Frame, Pid, ProcessState, Request, RequestEnvelope,
    Response, Stream,
};
use support::*;

/// Retention of the agents under test: far below what the processes write.
const RETENTION: usize = 1 << 20;

fn main() {
    helper_main();
    run_tests(&[
        (
            "a_slow_attached_client_gets_every_byte_and_slows_the_process",
            a_slow_attached_client_gets_every_byte_and_slows_the_process,
        ),
        (
            "an_exit_only_follower_does_not_hold_output_back",
            an_exit_only_follower_does_not_hold_output_back,
        ),
        (
            "a_client_that_stopped_reading_does_not_keep_a_killed_process",
            a_client_that_stopped_reading_does_not_keep_a_killed_process,
        ),
        (
            "a_client_that_goes_away_stops_holding_the_process",
            a_client_that_goes_away_stops_holding_the_process,
        ),
    ]);
}

fn agent() -> TestAgent {
    TestAgent::start_with(Options {
        retention: Some(RETENTION),
        ..Default::default()
    })
}

/// A client that reads frames only when the test says so (the support client's reader thread
/// reads as fast as the agent writes).
struct Raw {
    stream: UnixStream,
    next_id: u64,
}

impl Raw {
    fn connect(agent: &TestAgent) -> Self {
        // Make sure the agent listens before connecting the raw socket.
        drop(agent.client());
        let stream = UnixStream::connect(&agent.socket).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("read timeout");
        Self { stream, next_id: 1 }
    }

    fn next(&mut self) -> AgentFrame {
        read_frame(&mut self.stream).expect("a frame from the agent")
    }

    /// Starts `req` attached; returns its pid.
    fn exec_attached(&mut self, mut req: ExecRequest) -> Pid {
        req.attach = true;
        let id = self.next_id;
        self.next_id += 1;
        let frame = Frame::new(RequestEnvelope {
            id,
            request: Request::Exec(req),
        });
        write_frame(&mut self.stream, &frame).expect("send exec");
        match self.next().header {
            AgentMessage::Response {
                id: got,
                result: Ok(Response::Started { pid }),
            } if got == id => pid,
            other => panic!("exec failed: {other:?}"),
        }
    }
}

type AgentFrame = Frame<AgentMessage>;

fn stdout_len(c: &mut Client, pid: Pid) -> (u64, bool) {
    match c.call(Request::ProcessStatus { pid }) {
        Ok(Response::Process(info)) => {
            (info.stdout_len, matches!(info.state, ProcessState::Running))
        }
        other => panic!("status failed: {other:?}"),
    }
}

fn a_slow_attached_client_gets_every_byte_and_slows_the_process() {
    const TOTAL: u64 = 20_000_000;
    let agent = agent();
    let mut other = agent.client();
    let mut raw = Raw::connect(&agent);
    let pid = raw.exec_attached(cmd(&["head", "-c", &TOTAL.to_string(), "/dev/zero"]));

    // Not reading: the process gets no further than what the agent holds for the client (the
    // stream's limit, the connection's queue, the socket) and waits on its pipe.
    std::thread::sleep(Duration::from_millis(1000));
    let (written, running) = stdout_len(&mut other, pid);
    assert!(running, "the process must be waiting on its pipe");
    assert!(
        written < 10 << 20,
        "{written} bytes read from the pipe for a client that reads nothing"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        stdout_len(&mut other, pid).0,
        written,
        "the reader must wait"
    );

    // Reading slowly at first, then at full speed: every byte, in order.
    let mut received = 0u64;
    let mut frames = 0u64;
    let started = Instant::now();
    let status = loop {
        let frame = raw.next();
        match frame.header {
            AgentMessage::Output {
                pid: p,
                stream: Stream::Stdout,
                offset,
            } if p == pid => {
                assert_eq!(offset, received, "output must be contiguous");
                assert!(frame.data.iter().all(|b| *b == 0));
                received += frame.data.len() as u64;
                frames += 1;
                if frames.is_multiple_of(8) && started.elapsed() < Duration::from_secs(1) {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            AgentMessage::Exit { pid: p, status } if p == pid => break status,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(received, TOTAL);
    assert_eq!(status.code, Some(0));
}

fn an_exit_only_follower_does_not_hold_output_back() {
    const TOTAL: u64 = 5_000_000;
    let agent = agent();
    let mut c = agent.client();
    let mut watcher = agent.client();
    let pid = c.exec(
        sh(&format!("sleep 0.3; head -c {TOTAL} /dev/zero")),
        Vec::new(),
    );
    // The server's background watcher: offsets past any output, only the exit comes.
    assert!(matches!(
        watcher.call(Request::Attach(AttachRequest {
            pid,
            stdout_since: u64::MAX,
            stderr_since: u64::MAX,
            follow: true,
        })),
        Ok(Response::Attached { dropped: 0, .. })
    ));
    match watcher.next_event(WAIT).map(|f| f.header) {
        Some(AgentMessage::Exit { status, .. }) => assert_eq!(status.code, Some(0)),
        other => panic!("expected only the exit: {other:?}"),
    }
    // Nobody streamed it: the oldest bytes went, and a reattach learns how many.
    match c.call(Request::Attach(AttachRequest {
        pid,
        stdout_since: 0,
        stderr_since: 0,
        follow: false,
    })) {
        Ok(Response::Attached { process, dropped }) => {
            assert_eq!(process.stdout_len, TOTAL);
            assert_eq!(dropped, TOTAL - RETENTION as u64);
        }
        other => panic!("{other:?}"),
    }
    let out = c.collect_from(pid, TOTAL - RETENTION as u64, WAIT);
    assert_eq!(out.stdout.len(), RETENTION);
}

fn a_client_that_stopped_reading_does_not_keep_a_killed_process() {
    let agent = agent();
    let mut other = agent.client();
    let mut stuck = Raw::connect(&agent);

    // Its timeout kills it; the exit is reported although the client reads nothing.
    let mut req = cmd(&["head", "-c", "100000000", "/dev/zero"]);
    req.timeout_ms = Some(800);
    let started = Instant::now();
    let timed = stuck.exec_attached(req);
    let status = other.wait_exited(timed);
    assert!(status.timed_out, "{status:?}");
    assert_eq!(status.signal, Some(9));
    assert!(started.elapsed() < Duration::from_secs(5));

    // Killed by a client: the same.
    let mut stuck2 = Raw::connect(&agent);
    let killed = stuck2.exec_attached(cmd(&["head", "-c", "100000000", "/dev/zero"]));
    std::thread::sleep(Duration::from_millis(300));
    assert!(stdout_len(&mut other, killed).1, "waiting on its pipe");
    assert!(matches!(
        other.call(Request::Signal {
            pid: killed,
            signal: 9,
            group: false,
        }),
        Ok(Response::Done)
    ));
    assert_eq!(other.wait_exited(killed).signal, Some(9));
}

fn a_client_that_goes_away_stops_holding_the_process() {
    const TOTAL: u64 = 50_000_000;
    let agent = agent();
    let mut other = agent.client();
    let mut raw = Raw::connect(&agent);
    let pid = raw.exec_attached(cmd(&["head", "-c", &TOTAL.to_string(), "/dev/zero"]));
    std::thread::sleep(Duration::from_millis(300));
    let (written, running) = stdout_len(&mut other, pid);
    assert!(running && written < TOTAL);
    drop(raw);
    assert_eq!(other.wait_exited(pid).code, Some(0));
    assert_eq!(stdout_len(&mut other, pid).0, TOTAL);
}
