//! Directory watches (`Watch`, `Unwatch`, `FileEvent`, `WatchEnded`) against a real agent
//! process: the kinds of events for file operations of the agent and of other programs,
//! recursive watches that follow new subdirectories, refusals (missing, not a directory, on
//! /proc, through a magic link), caps, and the end of a watch.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use openrun_protocol::{AgentMessage, ErrorCode, FileEventKind, Request, Response};
use support::*;

fn main() {
    helper_main();
    run_tests(&[
        (
            "file_operations_become_events",
            file_operations_become_events,
        ),
        (
            "recursive_watches_follow_new_subdirectories",
            recursive_watches_follow_new_subdirectories,
        ),
        (
            "recursive_watches_of_the_root_skip_proc_and_sys",
            recursive_watches_of_the_root_skip_proc_and_sys,
        ),
        (
            "bad_paths_are_refused_clearly",
            bad_paths_are_refused_clearly,
        ),
        (
            "unwatch_and_closing_stop_the_events",
            unwatch_and_closing_stop_the_events,
        ),
        (
            "removing_the_directory_ends_the_watch",
            removing_the_directory_ends_the_watch,
        ),
        (
            "a_reader_that_falls_behind_gets_an_overflow",
            a_reader_that_falls_behind_gets_an_overflow,
        ),
        (
            "watches_per_connection_are_capped",
            watches_per_connection_are_capped,
        ),
    ]);
}

type Event = (String, FileEventKind);

fn watch(client: &mut Client, path: &str, recursive: bool) -> u64 {
    match client.call(Request::Watch {
        path: path.into(),
        recursive,
    }) {
        Ok(Response::Watching { watch }) => watch,
        other => panic!("watch {path} failed: {other:?}"),
    }
}

/// Collects `watch`'s events until `done` holds for what was collected (panics after `WAIT`).
fn events_until(client: &mut Client, watch: u64, done: impl Fn(&[Event]) -> bool) -> Vec<Event> {
    let deadline = Instant::now() + WAIT;
    let mut got = Vec::new();
    while !done(&got) {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(frame) = client.next_event(left) else {
            panic!("timed out; events so far: {got:?}");
        };
        match frame.header {
            AgentMessage::FileEvent {
                watch: w,
                name,
                kind,
            } if w == watch => got.push((name, kind)),
            other => panic!("unexpected message {other:?} (events so far: {got:?})"),
        }
    }
    got
}

/// Events that arrive within `quiet`.
fn events_within(client: &mut Client, quiet: Duration) -> Vec<AgentMessage> {
    let mut got = Vec::new();
    while let Some(frame) = client.next_event(quiet) {
        got.push(frame.header);
    }
    got
}

fn has(events: &[Event], name: &str, kind: FileEventKind) -> bool {
    events.iter().any(|(n, k)| n == name && *k == kind)
}

fn file_operations_become_events() {
    let agent = TestAgent::start();
    std::fs::create_dir(agent.root.join("w")).unwrap();
    let mut client = agent.client();
    let mut ops = agent.client();
    let id = watch(&mut client, "/w", false);

    // The agent's atomic write: create then write of the name, never its temporary file.
    ops.call_data(
        Request::WriteFile {
            path: "/w/a.txt".into(),
            mode: None,
            parents: false,
            append: false,
        },
        b"hello".to_vec(),
    )
    .0
    .expect("write");
    let got = events_until(&mut client, id, |e| has(e, "a.txt", FileEventKind::Write));
    assert_eq!(
        got,
        [
            ("a.txt".into(), FileEventKind::Create),
            ("a.txt".into(), FileEventKind::Write)
        ],
        "no temporary file may show"
    );

    // Another program's write and chmod.
    std::fs::write(agent.root.join("w/b.txt"), "x").unwrap();
    let got = events_until(&mut client, id, |e| has(e, "b.txt", FileEventKind::Write));
    assert_eq!(got[0], ("b.txt".into(), FileEventKind::Create));
    std::fs::set_permissions(
        agent.root.join("w/b.txt"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    events_until(&mut client, id, |e| has(e, "b.txt", FileEventKind::Chmod));

    // Rename: the old name is renamed, the new one created.
    ops.call(Request::Rename {
        from: "/w/a.txt".into(),
        to: "/w/c.txt".into(),
    })
    .expect("rename");
    let got = events_until(&mut client, id, |e| has(e, "c.txt", FileEventKind::Create));
    assert_eq!(got[0], ("a.txt".into(), FileEventKind::Rename), "{got:?}");

    // Remove, and a directory's creation.
    ops.call(Request::Remove {
        path: "/w/c.txt".into(),
        recursive: false,
    })
    .expect("remove");
    events_until(&mut client, id, |e| has(e, "c.txt", FileEventKind::Remove));
    ops.call(Request::Mkdir {
        path: "/w/d".into(),
        parents: false,
        mode: None,
    })
    .expect("mkdir");
    events_until(&mut client, id, |e| has(e, "d", FileEventKind::Create));

    // Not recursive: a change inside the subdirectory is not reported.
    std::fs::write(agent.root.join("w/d/inner"), "x").unwrap();
    let late = events_within(&mut client, Duration::from_millis(300));
    assert!(late.is_empty(), "a non-recursive watch saw {late:?}");
}

fn recursive_watches_follow_new_subdirectories() {
    let agent = TestAgent::start();
    std::fs::create_dir_all(agent.root.join("r/old/deeper")).unwrap();
    let mut client = agent.client();
    let id = watch(&mut client, "/r", true);

    // Directories that existed when the watch started.
    std::fs::write(agent.root.join("r/old/deeper/f"), "1").unwrap();
    events_until(&mut client, id, |e| {
        has(e, "old/deeper/f", FileEventKind::Write)
    });

    // A directory made later is watched once it appears (retried: its watch is added right
    // after its creation is seen).
    std::fs::create_dir(agent.root.join("r/new")).unwrap();
    events_until(&mut client, id, |e| has(e, "new", FileEventKind::Create));
    let deadline = Instant::now() + WAIT;
    let mut n = 0;
    loop {
        n += 1;
        let name = format!("f{n}");
        std::fs::write(agent.root.join("r/new").join(&name), "x").unwrap();
        let got = events_within(&mut client, Duration::from_millis(200));
        let seen = got.iter().any(|m| {
            matches!(m, AgentMessage::FileEvent { name: got, kind: FileEventKind::Create, .. } if got.starts_with("new/f"))
        });
        if seen {
            break;
        }
        assert!(Instant::now() < deadline, "new/ is never watched: {got:?}");
    }

    // A subdirectory moved away is no longer reported under its old name.
    std::fs::rename(agent.root.join("r/old"), agent.root.join("moved")).unwrap();
    events_until(&mut client, id, |e| has(e, "old", FileEventKind::Rename));
    std::fs::write(agent.root.join("moved/deeper/g"), "x").unwrap();
    let late = events_within(&mut client, Duration::from_millis(300));
    assert!(
        late.is_empty(),
        "a moved-away directory still reports: {late:?}"
    );
}

fn recursive_watches_of_the_root_skip_proc_and_sys() {
    let agent = TestAgent::start_with(Options {
        mount_proc: true,
        ..Options::default()
    });
    let mut client = agent.client();
    let id = watch(&mut client, "/", true);
    std::fs::write(agent.root.join("etc/marker"), "x").unwrap();
    events_until(&mut client, id, |e| {
        has(e, "etc/marker", FileEventKind::Write)
    });
    // The host's /proc changes all the time (this very test's threads): none of it shows.
    std::thread::sleep(Duration::from_millis(300));
    let late = events_within(&mut client, Duration::from_millis(300));
    for m in &late {
        if let AgentMessage::FileEvent { name, .. } = m {
            assert!(
                !name.starts_with("proc/") && !name.starts_with("sys/"),
                "a recursive watch descended into {name}"
            );
        }
    }
}

fn bad_paths_are_refused_clearly() {
    let agent = TestAgent::start_with(Options {
        mount_proc: true,
        ..Options::default()
    });
    std::fs::write(agent.root.join("file"), "x").unwrap();
    std::os::unix::fs::symlink("/../../outside", agent.root.join("escape")).unwrap();
    let mut client = agent.client();
    let err = client.call_err(Request::Watch {
        path: "/missing".into(),
        recursive: false,
    });
    assert_eq!(err.code, ErrorCode::NotFound, "{err:?}");
    assert!(err.message.contains("/missing"), "{}", err.message);
    let err = client.call_err(Request::Watch {
        path: "/file".into(),
        recursive: false,
    });
    assert_eq!(err.code, ErrorCode::NotADirectory, "{err:?}");
    // A magic link out of the root.
    let err = client.call_err(Request::Watch {
        path: "/proc/self/root".into(),
        recursive: true,
    });
    assert_eq!(err.code, ErrorCode::OutsideSandbox, "{err:?}");
    let err = client.call_err(Request::Watch {
        path: "/proc".into(),
        recursive: false,
    });
    assert_eq!(err.code, ErrorCode::PermissionDenied, "{err:?}");
    // An absolute symlink stays in the root: the host's directory of that name is not watched.
    let err = client.call_err(Request::Watch {
        path: "/escape".into(),
        recursive: false,
    });
    assert_eq!(err.code, ErrorCode::NotFound, "{err:?}");
    let err = client.call_err(Request::Unwatch { watch: 999 });
    assert_eq!(err.code, ErrorCode::NotFound, "{err:?}");
    // The connection still works.
    std::fs::create_dir(agent.root.join("ok")).unwrap();
    watch(&mut client, "/ok", false);
}

fn unwatch_and_closing_stop_the_events() {
    let agent = TestAgent::start();
    std::fs::create_dir(agent.root.join("u")).unwrap();
    let mut client = agent.client();
    let first = watch(&mut client, "/u", false);
    let second = watch(&mut client, "/u", false);
    assert_ne!(first, second);
    std::fs::write(agent.root.join("u/one"), "1").unwrap();
    let mut seen = std::collections::HashSet::new();
    let deadline = Instant::now() + WAIT;
    while seen.len() < 2 {
        match client.next_event(deadline.saturating_duration_since(Instant::now())) {
            Some(frame) => match frame.header {
                AgentMessage::FileEvent { watch, name, .. } if name == "one" => {
                    seen.insert(watch);
                }
                other => panic!("unexpected {other:?}"),
            },
            None => panic!("both watches of one directory must report; saw {seen:?}"),
        }
    }
    let _ = events_within(&mut client, Duration::from_millis(200));
    client
        .call(Request::Unwatch { watch: first })
        .expect("unwatch");
    std::fs::write(agent.root.join("u/two"), "2").unwrap();
    let got = events_within(&mut client, Duration::from_millis(300));
    assert!(
        !got.is_empty(),
        "the other watch of the directory must go on"
    );
    for m in &got {
        assert!(
            matches!(m, AgentMessage::FileEvent { watch, .. } if *watch == second),
            "an event of a stopped watch: {m:?}"
        );
    }
    drop(client);
    // A new connection's watch on the same directory works after the other one closed.
    let mut again = agent.client();
    let third = watch(&mut again, "/u", false);
    std::fs::write(agent.root.join("u/three"), "3").unwrap();
    events_until(&mut again, third, |e| {
        has(e, "three", FileEventKind::Create)
    });
}

fn removing_the_directory_ends_the_watch() {
    let agent = TestAgent::start();
    std::fs::create_dir(agent.root.join("gone")).unwrap();
    let mut client = agent.client();
    let id = watch(&mut client, "/gone", false);
    std::fs::remove_dir(agent.root.join("gone")).unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let frame = client
            .next_event(deadline.saturating_duration_since(Instant::now()))
            .expect("the watch must end");
        match frame.header {
            AgentMessage::WatchEnded { watch, reason } => {
                assert_eq!(watch, id);
                assert!(reason.contains("removed"), "{reason}");
                break;
            }
            AgentMessage::FileEvent { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let err = client.call_err(Request::Unwatch { watch: id });
    assert_eq!(err.code, ErrorCode::NotFound, "{err:?}");
}

fn watches_per_connection_are_capped() {
    let agent = TestAgent::start();
    std::fs::create_dir(agent.root.join("c")).unwrap();
    let mut client = agent.client();
    let mut n = 0;
    let err = loop {
        match client.call(Request::Watch {
            path: "/c".into(),
            recursive: false,
        }) {
            Ok(_) => n += 1,
            Err(e) => break e,
        }
        assert!(n <= 1000, "no cap on watches per connection");
    };
    assert_eq!(err.code, ErrorCode::TooLarge, "{err:?}");
    assert!(err.message.contains("watches"), "{}", err.message);
    assert!(n >= 16, "the cap is too low to be useful: {n}");
    // Another connection is not affected.
    let mut other = agent.client();
    watch(&mut other, "/c", false);
}

fn a_reader_that_falls_behind_gets_an_overflow() {
    use openrun_protocol::frame::{read_frame, write_frame};
    use openrun_protocol::{Frame, RequestEnvelope, PROTOCOL_VERSION};
    let agent = TestAgent::start();
    std::fs::create_dir(agent.root.join("flood")).unwrap();
    // A raw connection that stops reading after the answer to its watch.
    let deadline = Instant::now() + WAIT;
    let mut stream = loop {
        match std::os::unix::net::UnixStream::connect(&agent.socket) {
            Ok(stream) => break stream,
            Err(e) if Instant::now() > deadline => panic!("connect: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    for (id, request) in [
        (
            1,
            Request::Hello {
                version: PROTOCOL_VERSION,
            },
        ),
        (
            2,
            Request::Watch {
                path: "/flood".into(),
                recursive: false,
            },
        ),
    ] {
        write_frame(&mut stream, &Frame::new(RequestEnvelope { id, request })).unwrap();
    }
    for _ in 0..2 {
        let answer: Frame<AgentMessage> = read_frame(&mut stream).unwrap();
        assert!(
            matches!(answer.header, AgentMessage::Response { result: Ok(_), .. }),
            "{:?}",
            answer.header
        );
    }
    // Far more events than the socket, the connection's queue and the watch's queue hold.
    for i in 0..15_000 {
        std::fs::write(agent.root.join(format!("flood/{i:05}")), "").unwrap();
    }
    // Meanwhile the agent serves others.
    let mut other = agent.client();
    other
        .call(Request::Info)
        .expect("the agent stays responsive");
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let (mut events, mut overflow) = (0usize, false);
    while let Ok(frame) = read_frame::<AgentMessage>(&mut stream) {
        match frame.header {
            AgentMessage::FileEvent {
                kind: FileEventKind::Overflow,
                name,
                ..
            } => {
                assert!(name.is_empty());
                overflow = true;
            }
            AgentMessage::FileEvent { .. } => events += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        overflow,
        "no overflow after {events} events of 15,000 files created"
    );
    assert!(events < 15_000, "every event was kept: {events}");
}
