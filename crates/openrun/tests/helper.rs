//! Multi-threaded callers (the coming server) create sandboxes through the helper process.

mod common;
use common::*;

use openrun_protocol::{AgentMessage, ExecRequest, Request, Response, Stream};
use openrun_runtime::{ImageSource, Runtime, RuntimeError, SandboxSpec};

fn helper() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_BIN_EXE_openrun"))
}

#[test]
fn a_multi_threaded_process_creates_through_the_helper() {
    let env = Env::new();
    let runtime = Runtime::open(env.data_dir()).unwrap();
    // This test process has several threads: forking here would be unsafe, and is refused.
    let _busy = std::thread::spawn(|| std::thread::sleep(std::time::Duration::from_secs(2)));
    let spec = SandboxSpec::new(ImageSource::Host);
    let err = runtime.create(&spec).unwrap_err();
    assert!(err.to_string().contains("single-threaded"), "{err}");

    let sandbox = runtime.create_with_helper(&spec, helper()).unwrap();
    assert!(env.live_ids().contains(&sandbox.id().to_string()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let out = rt.block_on(async {
        let mut client = sandbox.connect().await.unwrap();
        let started = client
            .call(Request::Exec(ExecRequest {
                argv: vec!["sh".into(), "-c".into(), "echo from $HOSTNAME".into()],
                attach: true,
                ..Default::default()
            }))
            .await
            .unwrap();
        let Response::Started { pid } = started.header else {
            panic!("{started:?}")
        };
        let mut out = Vec::new();
        loop {
            let frame = client.next_event().await.unwrap();
            match frame.header {
                AgentMessage::Output {
                    stream: Stream::Stdout,
                    ..
                } => out.extend(frame.data),
                AgentMessage::Exit { pid: p, .. } if p == pid => break,
                _ => {}
            }
        }
        String::from_utf8(out).unwrap()
    });
    assert_eq!(out, format!("from {}\n", sandbox.id()));
    let id = sandbox.id().to_string();
    runtime.destroy(sandbox).unwrap();
    assert!(!env.live_ids().contains(&id));
}

#[test]
fn helper_errors_keep_their_message_and_class() {
    let env = Env::new();
    let runtime = Runtime::open(env.data_dir()).unwrap();
    let spec = SandboxSpec::new(ImageSource::Rootfs("/nonexistent/rootfs".into()));
    let err = runtime.create_with_helper(&spec, helper()).unwrap_err();
    assert!(
        matches!(
            err,
            RuntimeError::Helper {
                user_error: true,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("/nonexistent/rootfs"), "{err}");
    assert!(err.is_user_error());
    assert_eq!(env.leftovers(), Vec::<std::path::PathBuf>::new());
}
