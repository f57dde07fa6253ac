//! Pausing and resuming sandboxes through the cgroup freezer, destroying paused ones, and
//! changing a live sandbox's lifetime (runtime and agent, without the server).

mod common;
use common::*;

use std::path::Path;
use std::time::{Duration, Instant};

use openrun_protocol::{ExecRequest, Request, Response};
use openrun_runtime::{ImageSource, Runtime, Sandbox, SandboxSpec};

fn helper() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_openrun"))
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Sends one request to the sandbox's agent and returns the answer.
fn call(sandbox: &Sandbox, request: Request) -> Response {
    rt().block_on(async {
        let mut client = sandbox.connect().await.unwrap();
        client.call(request).await.unwrap().header
    })
}

/// How far the loop got: the size of the file it appends to, read from the host side of the
/// writable layer.
fn counter(sandbox: &Sandbox) -> u64 {
    let path = sandbox.upper_dir().expect("disk layer").join("counter");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match std::fs::metadata(&path) {
            Ok(meta) if meta.len() > 0 => return meta.len(),
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "no counter at {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_paused_sandbox_makes_no_progress_until_resumed() {
    let env = Env::new();
    let runtime = Runtime::open(env.data_dir()).unwrap();
    let sandbox = runtime
        .create_with_helper(&SandboxSpec::new(ImageSource::Host), helper())
        .unwrap();
    let started = call(
        &sandbox,
        Request::Exec(ExecRequest {
            argv: vec![
                "sh".into(),
                "-c".into(),
                "while :; do echo x >> /counter; done".into(),
            ],
            ..Default::default()
        }),
    );
    assert!(matches!(started, Response::Started { .. }), "{started:?}");
    let first = counter(&sandbox);
    std::thread::sleep(Duration::from_millis(200));
    assert!(counter(&sandbox) > first, "the loop does not run");

    assert!(!sandbox.is_paused().unwrap());
    sandbox.pause().unwrap();
    assert!(sandbox.is_paused().unwrap());
    sandbox.pause().unwrap(); // pausing a paused sandbox is a no-op
    let frozen = counter(&sandbox);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(counter(&sandbox), frozen, "a paused sandbox kept counting");
    // Another process sees the same state (it is the cgroup's, not this handle's).
    let reopened = runtime.open_sandbox_exact(sandbox.id()).unwrap();
    assert!(reopened.is_paused().unwrap());

    sandbox.resume().unwrap();
    assert!(!sandbox.is_paused().unwrap());
    std::thread::sleep(Duration::from_millis(200));
    assert!(counter(&sandbox) > frozen, "the loop did not resume");
    // The agent answers again.
    assert!(matches!(call(&sandbox, Request::Info), Response::Info(_)));

    // A paused sandbox is destroyed like any other, everything in it gone.
    sandbox.pause().unwrap();
    let id = sandbox.id().to_string();
    let pid = sandbox.record().pid;
    let started = Instant::now();
    runtime.destroy(reopened).unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "destroying a paused sandbox took {:?}",
        started.elapsed()
    );
    assert!(!env.live_ids().contains(&id));
    assert!(!Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid));
    assert!(runtime.cgroups().open(&id).is_none(), "its cgroup is left");
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
        .unwrap_or(true)
}

#[test]
fn a_sandbox_lifetime_can_be_extended_and_shortened() {
    let env = Env::new();
    let runtime = Runtime::open(env.data_dir()).unwrap();
    let mut spec = SandboxSpec::new(ImageSource::Host);
    spec.lifetime = Some(Duration::from_secs(2));
    let mut sandbox = runtime.create_with_helper(&spec, helper()).unwrap();
    let id = sandbox.id().to_string();
    // Extended well past the first deadline, in the agent and in the record.
    let answer = call(
        &sandbox,
        Request::SetLifetime {
            remaining_ms: Some(60_000),
        },
    );
    assert_eq!(answer, Response::Done);
    let later = openrun_runtime::state::now_ms() + 60_000;
    runtime.set_expiry(&mut sandbox, Some(later)).unwrap();
    std::thread::sleep(Duration::from_millis(3_000));
    assert!(env.live_ids().contains(&id), "ended at its first deadline");
    assert_eq!(
        runtime
            .open_sandbox_exact(&id)
            .unwrap()
            .record()
            .expires_at_ms,
        Some(later)
    );
    // Shortened: the agent ends it at the new deadline.
    let answer = call(
        &sandbox,
        Request::SetLifetime {
            remaining_ms: Some(300),
        },
    );
    assert_eq!(answer, Response::Done);
    let deadline = Instant::now() + Duration::from_secs(5);
    while env.live_ids().contains(&id) {
        assert!(
            Instant::now() < deadline,
            "still alive past its new lifetime"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
