//! File operations through the agent stay inside the sandbox: `..`, absolute paths, symlinks
//! and /proc magic links cannot reach host files.

mod common;
use common::*;

use openrun_protocol::{ErrorCode, ExecRequest, Request, Response};
use openrun_runtime::{AgentClient, ClientError};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn read(client: &mut AgentClient, path: &str) -> Result<Vec<u8>, ClientError> {
    client
        .call(Request::ReadFile {
            path: path.into(),
            offset: 0,
            limit: None,
        })
        .await
        .map(|f| f.data)
}

async fn sh(client: &mut AgentClient, script: &str) {
    let r = client
        .call(Request::Exec(ExecRequest {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            attach: true,
            ..Default::default()
        }))
        .await
        .unwrap();
    let Response::Started { pid } = r.header else {
        panic!("{r:?}")
    };
    loop {
        if let openrun_protocol::AgentMessage::Exit { pid: p, status } =
            client.next_event().await.unwrap().header
        {
            if p == pid {
                assert_eq!(status.code, Some(0), "{script}");
                return;
            }
        }
    }
}

#[test]
fn escapes_through_paths_symlinks_and_proc_are_refused() {
    let env = Env::new();
    let id = env.create(&[]);
    let secret = format!("/tmp/openrun-host-secret-{}", std::process::id());
    std::fs::write(&secret, "HOST-SECRET").unwrap();
    let host_victim_dir = tempfile::tempdir_in("/tmp").unwrap();
    std::fs::write(host_victim_dir.path().join("keep"), "keep").unwrap();
    let victim = host_victim_dir.path().display().to_string();
    runtime().block_on(async {
        let mut c = AgentClient::connect(&env.socket(&id)).await.unwrap();
        // `..` cannot climb above the sandbox root: this is the sandbox's own hostname file.
        let hostname = read(&mut c, "../../../../etc/hostname").await.unwrap();
        assert_eq!(String::from_utf8_lossy(&hostname).trim(), id);
        // Absolute paths are sandbox paths.
        assert!(read(&mut c, &secret).await.is_err(), "host /tmp reachable");
        // Symlinks made inside pointing at host paths resolve inside.
        sh(&mut c, &format!("ln -s {secret} /tmp/link; ln -s ../../../../..{secret} /tmp/rel; ln -s / /tmp/rootlink; ln -s {victim} /tmp/victim")).await;
        for path in ["/tmp/link", "/tmp/rel", &format!("/tmp/rootlink{secret}")] {
            if let Ok(data) = read(&mut c, path).await {
                assert_ne!(data, b"HOST-SECRET", "{path} reached the host");
            }
        }
        // /proc magic links (the agent's exe and root) are refused.
        for path in ["/proc/1/exe", "/proc/self/root/etc/hostname", "/proc/1/fd/0"] {
            let err = read(&mut c, path).await.expect_err(path);
            assert!(
                matches!(&err, ClientError::Agent(e) if matches!(e.code, ErrorCode::OutsideSandbox | ErrorCode::PermissionDenied | ErrorCode::NotFound)),
                "{path}: {err}"
            );
        }
        // Writing through a symlink never writes the host file.
        let _ = c
            .call_with_data(
                Request::WriteFile { path: "/tmp/link".into(), mode: None, parents: true, append: false },
                b"overwritten".to_vec(),
            )
            .await;
        // Removing a symlink to a host dir removes the link only.
        let _ = c.call(Request::Remove { path: "/tmp/victim".into(), recursive: true }).await;
        // Renaming onto a host path lands inside.
        let _ = c.call(Request::Rename { from: "/tmp/rel".into(), to: format!("{victim}/moved") }).await;
    });
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "HOST-SECRET");
    assert_eq!(
        std::fs::read_to_string(host_victim_dir.path().join("keep")).unwrap(),
        "keep"
    );
    assert!(!host_victim_dir.path().join("moved").exists());
    std::fs::remove_file(&secret).unwrap();
}

#[test]
fn file_operations_round_trip() {
    let env = Env::new();
    let id = env.create(&[]);
    runtime().block_on(async {
        let mut c = AgentClient::connect(&env.socket(&id)).await.unwrap();
        c.call(Request::Mkdir {
            path: "/work/a/b".into(),
            parents: true,
            mode: None,
        })
        .await
        .unwrap();
        c.call_with_data(
            Request::WriteFile {
                path: "/work/a/b/f.txt".into(),
                mode: Some(0o600),
                parents: false,
                append: false,
            },
            b"content".to_vec(),
        )
        .await
        .unwrap();
        assert_eq!(read(&mut c, "/work/a/b/f.txt").await.unwrap(), b"content");
        let stat = c
            .call(Request::Stat {
                path: "/work/a/b/f.txt".into(),
            })
            .await
            .unwrap();
        let Response::Stat(st) = stat.header else {
            panic!()
        };
        assert_eq!((st.size, st.mode & 0o777, st.uid), (7, 0o600, 0));
        c.call(Request::Rename {
            from: "/work/a/b/f.txt".into(),
            to: "/work/g.txt".into(),
        })
        .await
        .unwrap();
        let list = c
            .call(Request::ListDir {
                path: "/work".into(),
            })
            .await
            .unwrap();
        let Response::Entries { entries } = list.header else {
            panic!()
        };
        let names: Vec<_> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["a", "g.txt"]);
        c.call(Request::Remove {
            path: "/work/a".into(),
            recursive: true,
        })
        .await
        .unwrap();
        let err = read(&mut c, "/work/a/b/f.txt").await.unwrap_err();
        assert!(
            matches!(err, ClientError::Agent(ref e) if e.code == ErrorCode::NotFound),
            "{err}"
        );
    });
    // The written file is visible to processes too, and in the writable layer on the host.
    let out = env.output(["exec", &id, "--", "cat", "/work/g.txt"]);
    assert_ok(&out);
    assert_eq!(stdout(&out), "content");
    assert!(env.upper_dir(&id).join("work/g.txt").exists());
}
