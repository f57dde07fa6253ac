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
        (
            "a_deep_tree_is_refused_in_bounded_memory",
            a_deep_tree_is_refused_in_bounded_memory,
        ),
        (
            "a_wide_tree_is_watched_with_few_descriptors",
            a_wide_tree_is_watched_with_few_descriptors,
        ),
        (
            "many_new_directories_do_not_starve_file_operations",
            many_new_directories_do_not_starve_file_operations,
        ),
        (
            "a_directory_watched_again_while_its_old_watch_stops_keeps_reporting",
            a_directory_watched_again_while_its_old_watch_stops_keeps_reporting,
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
    // Far more events than the socket, the connection's queue and the watch's queue hold,
    // whatever this host's socket buffers: frames in the socket take at least their own
    // bytes of its send buffer (the agent's is the host's default, as this socket's is).
    let (probe, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let sndbuf = rustix::net::sockopt::socket_send_buffer_size(&probe).unwrap();
    let frame = Frame::new(AgentMessage::FileEvent {
        watch: 1,
        name: "00000".into(),
        kind: FileEventKind::Create,
    })
    .encode()
    .unwrap()
    .len();
    // The socket, the connection's queue of 64 frames, the watch's queue, and margin.
    let files = sndbuf / frame + 64 + 4096 + 2000;
    for i in 0..files {
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
        "no overflow after {events} events of {files} files created"
    );
    assert!(events < files, "every event was kept: {events}");
}

/// Peak memory of process `pid` in KiB (`VmHWM`).
fn peak_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in {status}"))
}

/// Makes a chain of `depth` directories named `name` below `dir` (beyond `PATH_MAX`, so
/// one at a time from the last one's descriptor); returns the first level's path.
fn make_chain(dir: &std::path::Path, depth: usize, name: &str) {
    use rustix::fs::{mkdirat, openat, Mode, OFlags};
    let mut at = openat(
        rustix::fs::CWD,
        dir,
        OFlags::DIRECTORY | OFlags::RDONLY,
        Mode::empty(),
    )
    .unwrap();
    for _ in 0..depth {
        mkdirat(&at, name, Mode::from_raw_mode(0o755)).unwrap();
        at = openat(&at, name, OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty()).unwrap();
    }
}

/// Removes a tree too deep for `std::fs::remove_dir_all` (GNU `rm` walks any depth).
fn remove_deep(dir: &std::path::Path) {
    let status = std::process::Command::new("rm")
        .arg("-rf")
        .arg(dir)
        .status()
        .unwrap();
    assert!(status.success());
}

fn a_deep_tree_is_refused_in_bounded_memory() {
    let agent = TestAgent::start();
    let deep = agent.root.join("deep");
    std::fs::create_dir(&deep).unwrap();
    // 3000 levels of 64-character names: 192,000 bytes of path at the bottom. Paths kept per
    // directory would cost 288 MB; the tree cannot be named below PATH_MAX anyway.
    let name = "d".repeat(64);
    make_chain(&deep, 3000, &name);
    let mut client = agent.client();
    let err = client.call_err(Request::Watch {
        path: "/deep".into(),
        recursive: true,
    });
    assert_eq!(err.code, ErrorCode::InvalidArgument, "{err:?}");
    assert!(err.message.contains("deeper than 4095"), "{}", err.message);
    assert!(err.message.contains("/deep"), "{}", err.message);
    // A watch below the limit, in the same tree: events flow, with the whole relative name.
    let mut shallow = String::from("/deep");
    for _ in 0..3 {
        shallow.push('/');
        shallow.push_str(&name);
    }
    let err = client.call_err(Request::Watch {
        path: shallow.clone(),
        recursive: true,
    });
    assert_eq!(err.code, ErrorCode::InvalidArgument, "{err:?}");
    let id = watch(&mut client, "/deep", false);
    std::fs::write(deep.join("top"), "x").unwrap();
    events_until(&mut client, id, |e| has(e, "top", FileEventKind::Write));
    let kib = peak_kib(agent.pid());
    assert!(
        kib < 100 * 1024,
        "the agent's peak memory is {kib} KiB after refusing a deep tree"
    );
    client.call(Request::Info).expect("the agent is alive");
    // A tree just within the limit is watched, and reports its deepest directory.
    std::fs::create_dir(agent.root.join("ok")).unwrap();
    make_chain(&agent.root.join("ok"), 40, &name);
    let id = watch(&mut client, "/ok", true);
    let mut bottom = agent.root.join("ok");
    let mut rel = String::new();
    for _ in 0..40 {
        bottom.push(&name);
        rel.push_str(&name);
        rel.push('/');
    }
    std::fs::write(bottom.join("f"), "x").unwrap();
    let want = format!("{rel}f");
    events_until(&mut client, id, |e| has(e, &want, FileEventKind::Write));
    remove_deep(&deep);
}

fn a_wide_tree_is_watched_with_few_descriptors() {
    let agent = TestAgent::start();
    let wide = agent.root.join("wide");
    for i in 0..300 {
        std::fs::create_dir_all(wide.join(format!("d{i:03}/sub"))).unwrap();
    }
    // The sandbox's smallest open-files limit: a walk that kept a descriptor per waiting
    // directory would run out, and skip directories without a word.
    let pid = rustix::process::Pid::from_raw(agent.pid()).unwrap();
    rustix::process::prlimit(
        Some(pid),
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: Some(64),
            maximum: Some(64),
        },
    )
    .unwrap();
    let mut client = agent.client();
    let id = watch(&mut client, "/wide", true);
    for i in 0..300 {
        std::fs::write(wide.join(format!("d{i:03}/sub/f")), "x").unwrap();
    }
    let got = events_until(&mut client, id, |e| {
        (0..300).all(|i| has(e, &format!("d{i:03}/sub/f"), FileEventKind::Write))
    });
    assert!(!got.iter().any(|(_, k)| *k == FileEventKind::Overflow));
}

fn many_new_directories_do_not_starve_file_operations() {
    let agent = TestAgent::start();
    std::fs::create_dir(agent.root.join("grow")).unwrap();
    std::fs::write(agent.root.join("file"), "content").unwrap();
    let mut client = agent.client();
    let id = watch(&mut client, "/grow", true);
    let root = agent.root.clone();
    let maker = std::thread::spawn(move || {
        for i in 0..1000 {
            std::fs::create_dir_all(root.join(format!("grow/a{i}/b/c"))).unwrap();
        }
    });
    // File operations answer while the watch follows 3000 new directories.
    let mut ops = agent.client();
    let mut reads = 0;
    while !maker.is_finished() || reads < 5 {
        let (result, data) = ops.call_data(
            Request::ReadFile {
                path: "/file".into(),
                offset: 0,
                limit: None,
            },
            Vec::new(),
        );
        result.expect("read");
        assert_eq!(data, b"content");
        reads += 1;
    }
    maker.join().unwrap();
    // And the newest directories are watched (or the loss is reported).
    let deadline = Instant::now() + WAIT;
    let mut n = 0;
    loop {
        n += 1;
        std::fs::write(agent.root.join(format!("grow/a999/b/c/f{n}")), "x").unwrap();
        let got = events_within(&mut client, Duration::from_millis(300));
        let seen = got.iter().any(|m| {
            matches!(m, AgentMessage::FileEvent { watch, name, .. }
                if *watch == id && name.starts_with("a999/b/c/f"))
        });
        if seen {
            break;
        }
        assert!(Instant::now() < deadline, "a999/b/c is never watched");
    }
}

fn a_directory_watched_again_while_its_old_watch_stops_keeps_reporting() {
    let agent = TestAgent::start();
    // Many subdirectories: a recursive watch takes a while to add, and shares every kernel
    // watch with the old one.
    for i in 0..1000 {
        std::fs::create_dir_all(agent.root.join(format!("same/d{i}"))).unwrap();
    }
    let mut old = agent.client();
    watch(&mut old, "/same", true);
    for round in 0..40 {
        // The new watch is asked for, then the old one's connection closes (the SDK's stop()
        // then watch_dir()): the two meet in the agent.
        let mut new = agent.client();
        let request = new.send(
            Request::Watch {
                path: "/same".into(),
                recursive: true,
            },
            Vec::new(),
        );
        drop(old);
        let id = match new.wait_response(request, WAIT) {
            Some((Ok(Response::Watching { watch }), _)) => watch,
            other => panic!("watch failed: {other:?}"),
        };
        let name = format!("f{round}");
        std::fs::write(agent.root.join("same").join(&name), "x").unwrap();
        events_until(&mut new, id, |e| has(e, &name, FileEventKind::Write));
        old = new;
    }
}
