//! Test support: the agent-under-test helper mode, a blocking protocol client, a fixture that
//! starts a real agent process, and a small test runner.
//!
//! `openrun_agent::run` wants a single-threaded process, so each test starts this same test
//! binary again with `OPENRUN_AGENT_TEST_SOCKET` set; `main` sees it before anything else runs
//! and becomes the agent (see [`helper_main`]). The tests themselves talk to it over the socket
//! like any client would.

#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use openrun_agent::AgentConfig;
use openrun_protocol::frame::{read_frame, write_frame};
use openrun_protocol::{
    AgentError, AgentMessage, ExecRequest, ExitStatus, Frame, FrameError, Pid, ProcessState,
    Request, RequestEnvelope, Response, Stream,
};

const ENV_SOCKET: &str = "OPENRUN_AGENT_TEST_SOCKET";
const ENV_ROOT: &str = "OPENRUN_AGENT_TEST_ROOT";
const ENV_RETENTION: &str = "OPENRUN_AGENT_TEST_RETENTION";
const ENV_LIFETIME_MS: &str = "OPENRUN_AGENT_TEST_LIFETIME_MS";
const ENV_CONTROL: &str = "OPENRUN_AGENT_TEST_CONTROL";
const ENV_MOUNT_PROC: &str = "OPENRUN_AGENT_TEST_MOUNT_PROC";
const ENV_OOM: &str = "OPENRUN_AGENT_TEST_OOM_SCORE_ADJ";
/// Set in the agent's own environment; must never reach a process it starts.
pub const ENV_LEAK: &str = "OPENRUN_AGENT_TEST_LEAK";
/// The sandbox id every test agent gets.
pub const SANDBOX_ID: &str = "test-sandbox";
/// In `<root>/etc/passwd`, so a test can tell the sandbox's file from the host's.
pub const PASSWD_MARKER: &str = "SANDBOX-PASSWD-MARKER";
/// Content of `<root>/etc/hostname`.
pub const HOSTNAME_MARKER: &str = "sandbox-hostname-marker\n";
/// Content of `<dir>/outside/secret`, a file next to (not under) the root.
pub const SECRET: &str = "HOST-SECRET-must-not-leak\n";

/// Default timeout for anything a test waits for.
pub const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Helper mode: this process becomes the agent.

/// If this process was started as an agent under test, runs it and exits; otherwise returns.
pub fn helper_main() {
    let Ok(socket) = std::env::var(ENV_SOCKET) else {
        return;
    };
    let root = PathBuf::from(std::env::var(ENV_ROOT).expect("root for the agent under test"));
    if std::env::var(ENV_MOUNT_PROC).is_ok() {
        mount_proc_under(&root);
    }
    // The host sets the real agent to -1000 when it may; use a value other than 0 here so a
    // test can check that children get the configured value rather than inheriting the
    // agent's (lowering needs CAP_SYS_RESOURCE, which this machine may not grant).
    if std::fs::write("/proc/self/oom_score_adj", "-500").is_err() {
        std::fs::write("/proc/self/oom_score_adj", "200").expect("set oom_score_adj");
    }
    let listener = UnixListener::bind(&socket).expect("bind agent socket");
    let control = std::env::var(ENV_CONTROL)
        .ok()
        .map(|path| UnixStream::connect(path).expect("connect control stream"));
    let config = AgentConfig {
        sandbox_id: SANDBOX_ID.to_string(),
        root,
        env: BTreeMap::from([("FROM_CONFIG".to_string(), "yes".to_string())]),
        cwd: None,
        user: None,
        lifetime: std::env::var(ENV_LIFETIME_MS)
            .ok()
            .map(|ms| Duration::from_millis(ms.parse().expect("lifetime ms"))),
        output_retention: std::env::var(ENV_RETENTION)
            .ok()
            .map_or(AgentConfig::DEFAULT_OUTPUT_RETENTION, |r| {
                r.parse().expect("retention")
            }),
        exit_with_control: control.is_some(),
        process_oom_score_adj: std::env::var(ENV_OOM)
            .ok()
            .map_or(0, |v| v.parse().expect("oom score")),
        // As in a sandbox: the agent sets children's scores through its own file.
        own_oom_score_adj: Some(std::sync::Arc::new(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/proc/self/oom_score_adj")
                .expect("own oom_score_adj"),
        )),
    };
    let code = match openrun_agent::run(config, listener, control) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("agent failed to start: {e}");
            3
        }
    };
    std::process::exit(code);
}

/// Gives the agent under test a private mount namespace with the host's /proc mounted at
/// `<root>/proc`, so magic links like `/proc/self/root` exist inside its root, and the host's
/// /sys at `<root>/sys`.
fn mount_proc_under(root: &Path) {
    let target = root.join("proc");
    std::fs::create_dir_all(&target).expect("create <root>/proc");
    let target = std::ffi::CString::new(target.as_os_str().as_encoded_bytes()).unwrap();
    let sys = root.join("sys");
    std::fs::create_dir_all(&sys).expect("create <root>/sys");
    let sys = std::ffi::CString::new(sys.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: plain syscalls on NUL-terminated strings that outlive the calls; this process is
    // single-threaded here (nothing has been started yet).
    unsafe {
        assert_eq!(libc::unshare(libc::CLONE_NEWNS), 0, "unshare(CLONE_NEWNS)");
        assert_eq!(
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null()
            ),
            0,
            "make / private"
        );
        assert_eq!(
            libc::mount(
                c"/proc".as_ptr(),
                target.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null()
            ),
            0,
            "bind /proc"
        );
        assert_eq!(
            libc::mount(
                c"/sys".as_ptr(),
                sys.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null()
            ),
            0,
            "bind /sys"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Fixture: a running agent process.

/// How to start the agent under test.
#[derive(Default, Clone)]
pub struct Options {
    pub retention: Option<usize>,
    pub lifetime: Option<Duration>,
    pub control: Option<PathBuf>,
    /// Bind the host's /proc and /sys into the root (in a private mount namespace).
    pub mount_proc: bool,
    /// `AgentConfig::process_oom_score_adj` (default 0).
    pub oom_score_adj: Option<i32>,
}

/// A real agent in its own process, with a temporary sandbox root.
pub struct TestAgent {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
    pub outside: PathBuf,
    pub socket: PathBuf,
}

impl TestAgent {
    /// Starts an agent with default options.
    pub fn start() -> Self {
        Self::start_with(Options::default())
    }

    /// Starts an agent; returns once its socket exists (connections retry until it listens).
    pub fn start_with(options: Options) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(
            root.join("etc/passwd"),
            format!(
                "root:x:0:0:root:/root:/bin/sh\n\
                 tester:x:1234:1234:Tester:/nonexistent-home:/bin/sh\n\
                 # {PASSWD_MARKER}\n"
            ),
        )
        .unwrap();
        std::fs::write(
            root.join("etc/group"),
            "root:x:0:\ntester:x:1234:\nextra:x:5555:tester,someone\n",
        )
        .unwrap();
        std::fs::write(root.join("etc/hostname"), HOSTNAME_MARKER).unwrap();
        std::fs::write(outside.join("secret"), SECRET).unwrap();
        let socket = dir.path().join("agent.sock");

        let mut cmd = Command::new(std::env::current_exe().expect("current exe"));
        cmd.env(ENV_SOCKET, &socket)
            .env(ENV_ROOT, &root)
            .env(ENV_LEAK, "leaked")
            .env_remove(ENV_RETENTION)
            .env_remove(ENV_LIFETIME_MS)
            .env_remove(ENV_CONTROL)
            .env_remove(ENV_MOUNT_PROC)
            .env_remove(ENV_OOM);
        if let Some(r) = options.retention {
            cmd.env(ENV_RETENTION, r.to_string());
        }
        if let Some(l) = options.lifetime {
            cmd.env(ENV_LIFETIME_MS, l.as_millis().to_string());
        }
        if let Some(c) = &options.control {
            cmd.env(ENV_CONTROL, c);
        }
        if let Some(score) = options.oom_score_adj {
            cmd.env(ENV_OOM, score.to_string());
        }
        if options.mount_proc {
            cmd.env(ENV_MOUNT_PROC, "1");
        }
        let child = cmd.spawn().expect("start the agent under test");
        Self {
            child: Some(child),
            dir,
            root,
            outside,
            socket,
        }
    }

    /// The agent's pid (on the host).
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// A new connection, after `Hello`.
    pub fn client(&self) -> Client {
        let mut client = Client::connect(&self.socket);
        match client.call(Request::Hello {
            version: openrun_protocol::PROTOCOL_VERSION,
        }) {
            Ok(Response::Hello(info)) => assert_eq!(info.sandbox_id, SANDBOX_ID),
            other => panic!("hello failed: {other:?}"),
        }
        client
    }

    /// Waits for the agent process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // Ask nicely first so the processes it started are killed too.
        if let Ok(mut client) = Client::try_connect(&self.socket, Duration::from_millis(500)) {
            let _ = client.try_call(Request::Shutdown, Vec::new(), Duration::from_secs(3));
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Client.

type Incoming = Result<Frame<AgentMessage>, String>;

/// A blocking client; a reader thread turns incoming frames into a channel so waits can time
/// out without cutting a frame in half.
pub struct Client {
    stream: UnixStream,
    incoming: mpsc::Receiver<Incoming>,
    next_id: u64,
    /// Output and exit events that arrived while waiting for a response.
    events: VecDeque<Frame<AgentMessage>>,
}

/// Everything a process produced, from `Exec` with `attach` to its `Exit`.
#[derive(Debug, Default)]
pub struct Collected {
    pub pid: Pid,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: ExitStatus,
    /// When each output chunk arrived, and when the exit did.
    pub output_times: Vec<Instant>,
    pub exit_time: Option<Instant>,
}

impl Collected {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

impl Client {
    /// Connects, retrying while the agent is still starting.
    pub fn connect(path: &Path) -> Self {
        Self::try_connect(path, WAIT).unwrap_or_else(|e| panic!("connect to agent: {e}"))
    }

    pub fn try_connect(path: &Path, timeout: Duration) -> Result<Self, std::io::Error> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        Ok(Self::from_stream(stream))
    }

    /// Wraps an already-connected stream.
    pub fn from_stream(stream: UnixStream) -> Self {
        let mut read_half = stream.try_clone().expect("clone stream");
        let (tx, incoming) = mpsc::channel();
        std::thread::spawn(move || loop {
            let item = read_frame::<AgentMessage>(&mut read_half);
            let stop = item.is_err();
            if tx.send(item.map_err(|e| format_frame_error(&e))).is_err() || stop {
                break;
            }
        });
        Self {
            stream,
            incoming,
            next_id: 1,
            events: VecDeque::new(),
        }
    }

    /// Writes raw bytes to the socket (for malformed-frame tests).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("raw write");
    }

    /// Sends a request; returns its id.
    pub fn send(&mut self, request: Request, data: Vec<u8>) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        write_frame(
            &mut self.stream,
            &Frame::with_data(RequestEnvelope { id, request }, data),
        )
        .expect("send request");
        id
    }

    /// Next frame from the agent, or `None` on timeout. Panics if the connection broke.
    fn next_frame(&mut self, timeout: Duration) -> Option<Frame<AgentMessage>> {
        match self.incoming.recv_timeout(timeout) {
            Ok(Ok(frame)) => Some(frame),
            Ok(Err(e)) => panic!("connection to agent failed: {e}"),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("connection to agent closed"),
        }
    }

    /// Whether the agent closed this connection within `timeout`.
    pub fn closed_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.incoming.recv_timeout(left) {
                Ok(Ok(frame)) => self.events.push_back(frame),
                Ok(Err(_)) | Err(mpsc::RecvTimeoutError::Disconnected) => return true,
                Err(mpsc::RecvTimeoutError::Timeout) => return false,
            }
        }
    }

    /// Waits for the response to `id`, keeping events that arrive meanwhile.
    pub fn wait_response(
        &mut self,
        id: u64,
        timeout: Duration,
    ) -> Option<(Result<Response, AgentError>, Vec<u8>)> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = self.next_frame(left)?;
            match frame.header {
                AgentMessage::Response { id: got, result } => {
                    assert_eq!(got, id, "responses must come in request order here");
                    return Some((result, frame.data));
                }
                _ => self.events.push_back(frame),
            }
        }
    }

    pub fn try_call(
        &mut self,
        request: Request,
        data: Vec<u8>,
        timeout: Duration,
    ) -> Option<(Result<Response, AgentError>, Vec<u8>)> {
        let id = self.send(request, data);
        self.wait_response(id, timeout)
    }

    /// A request with a data part; returns the result and the response's data part.
    pub fn call_data(
        &mut self,
        request: Request,
        data: Vec<u8>,
    ) -> (Result<Response, AgentError>, Vec<u8>) {
        let what = format!("{request:?}");
        self.try_call(request, data, WAIT)
            .unwrap_or_else(|| panic!("no response to {what}"))
    }

    /// A request without data.
    pub fn call(&mut self, request: Request) -> Result<Response, AgentError> {
        self.call_data(request, Vec::new()).0
    }

    /// A request expected to fail; returns the error.
    pub fn call_err(&mut self, request: Request) -> AgentError {
        match self.call(request) {
            Err(e) => e,
            Ok(resp) => panic!("expected an error, got {resp:?}"),
        }
    }

    /// Starts a process; returns its pid.
    pub fn exec(&mut self, req: ExecRequest, data: Vec<u8>) -> Pid {
        match self.call_data(Request::Exec(req), data).0 {
            Ok(Response::Started { pid }) => pid,
            other => panic!("exec failed: {other:?}"),
        }
    }

    /// The next output/exit event, or `None` on timeout.
    pub fn next_event(&mut self, timeout: Duration) -> Option<Frame<AgentMessage>> {
        if let Some(e) = self.events.pop_front() {
            return Some(e);
        }
        let frame = self.next_frame(timeout)?;
        match frame.header {
            AgentMessage::Response { .. } => panic!("unexpected response {:?}", frame.header),
            _ => Some(frame),
        }
    }

    /// Collects `pid`'s events until its exit, checking offsets are contiguous from 0.
    pub fn collect(&mut self, pid: Pid, timeout: Duration) -> Collected {
        self.collect_from_offsets(pid, 0, 0, timeout)
    }

    /// Like [`Client::collect`], when stdout output up to `stdout_from` was already consumed.
    pub fn collect_from(&mut self, pid: Pid, stdout_from: u64, timeout: Duration) -> Collected {
        self.collect_from_offsets(pid, stdout_from, 0, timeout)
    }

    /// Collects `pid`'s events until its exit, expecting output to continue exactly at the
    /// given offsets.
    pub fn collect_from_offsets(
        &mut self,
        pid: Pid,
        stdout_from: u64,
        stderr_from: u64,
        timeout: Duration,
    ) -> Collected {
        let deadline = Instant::now() + timeout;
        let mut out = Collected {
            pid,
            ..Default::default()
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(frame) = self.next_event(left) else {
                panic!(
                    "process {pid} did not exit in time; stdout so far {:?}",
                    out.stdout_str()
                );
            };
            match frame.header {
                AgentMessage::Output {
                    pid: p,
                    stream,
                    offset,
                } if p == pid => {
                    let (buf, base) = match stream {
                        Stream::Stdout => (&mut out.stdout, stdout_from),
                        Stream::Stderr => (&mut out.stderr, stderr_from),
                    };
                    assert_eq!(
                        offset,
                        base + buf.len() as u64,
                        "output offsets must be contiguous"
                    );
                    assert!(
                        frame.data.len() <= 64 * 1024,
                        "output frames are at most 64 KiB"
                    );
                    buf.extend_from_slice(&frame.data);
                    out.output_times.push(Instant::now());
                }
                AgentMessage::Exit { pid: p, status } if p == pid => {
                    out.status = status;
                    out.exit_time = Some(Instant::now());
                    return out;
                }
                other => self.events.push_back(Frame::with_data(other, frame.data)),
            }
        }
    }

    /// Runs a command attached and collects everything it produced.
    pub fn run(&mut self, mut req: ExecRequest, data: Vec<u8>) -> Collected {
        req.attach = true;
        let pid = self.exec(req, data);
        self.collect(pid, WAIT)
    }

    /// Polls `ProcessStatus` until the process has exited.
    pub fn wait_exited(&mut self, pid: Pid) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            match self.call(Request::ProcessStatus { pid }) {
                Ok(Response::Process(info)) => {
                    if let ProcessState::Exited { status } = info.state {
                        return status;
                    }
                }
                other => panic!("status failed: {other:?}"),
            }
            assert!(Instant::now() < deadline, "process {pid} did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // The reader thread holds a clone of the socket: shut it down so the agent sees EOF.
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

fn format_frame_error(e: &FrameError) -> String {
    match e {
        FrameError::Closed => "closed".to_string(),
        other => other.to_string(),
    }
}

/// An exec request for `argv`.
pub fn cmd(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// `sh -c script`.
pub fn sh(script: &str) -> ExecRequest {
    cmd(&["sh", "-c", script])
}

/// Process state letter from /proc/<pid>/stat (`None` if the pid does not exist).
pub fn proc_state(pid: i32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // pid (comm) S ppid ...; comm may contain spaces, so split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Waits until `pid` no longer exists (not even as a zombie).
pub fn wait_gone(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if proc_state(pid).is_none() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

// ---------------------------------------------------------------------------------------------
// Runner.

/// A named test.
pub type Test = (&'static str, fn());

/// Runs the tests matching the command-line filters in parallel and prints a libtest-style
/// summary; exits non-zero if any failed.
pub fn run_tests(tests: &[Test]) {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        for (name, _) in tests {
            println!("{name}: test");
        }
        return;
    }
    let exact = args.iter().any(|a| a == "--exact");
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let selected: Vec<Test> = tests
        .iter()
        .copied()
        .filter(|(name, _)| {
            filters.is_empty()
                || filters.iter().any(|f| {
                    if exact {
                        name == f
                    } else {
                        name.contains(f.as_str())
                    }
                })
        })
        .collect();
    let filtered_out = tests.len() - selected.len();
    println!("\nrunning {} tests", selected.len());
    let started = Instant::now();
    let queue = std::sync::Mutex::new(selected.into_iter().collect::<VecDeque<Test>>());
    let results = std::sync::Mutex::new(Vec::<(&'static str, Result<(), String>)>::new());
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(2, 4);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let Some((name, test)) = queue.lock().unwrap().pop_front() else {
                    break;
                };
                let outcome = std::thread::Builder::new()
                    .name(name.to_string())
                    .spawn(test)
                    .expect("spawn test thread")
                    .join()
                    .map_err(|panic| {
                        panic
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_else(|| "test panicked".to_string())
                    });
                println!(
                    "test {name} ... {}",
                    if outcome.is_ok() { "ok" } else { "FAILED" }
                );
                results.lock().unwrap().push((name, outcome));
            });
        }
    });
    let results = results.into_inner().unwrap();
    let failed: Vec<_> = results.iter().filter(|(_, r)| r.is_err()).collect();
    if !failed.is_empty() {
        println!("\nfailures:");
        for (name, r) in &failed {
            if let Err(msg) = r {
                println!("    {name}: {msg}");
            }
        }
    }
    println!(
        "\ntest result: {}. {} passed; {} failed; 0 ignored; 0 measured; {} filtered out; finished in {:.2}s\n",
        if failed.is_empty() { "ok" } else { "FAILED" },
        results.len() - failed.len(),
        failed.len(),
        filtered_out,
        started.elapsed().as_secs_f64()
    );
    if !failed.is_empty() {
        std::process::exit(101);
    }
}
