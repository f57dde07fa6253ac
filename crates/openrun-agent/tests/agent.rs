//! Integration tests: each starts a real agent process (this binary in helper mode) with a
//! temporary directory as its sandbox root and talks the agent protocol to it.

mod support;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use openrun_protocol::{
    AgentMessage, AttachRequest, ErrorCode, FileKind, ProcessState, PtySize, Request, Response,
    Stream,
};
use support::*;

fn main() {
    helper_main();
    run_tests(&[
        (
            "hello_checks_the_protocol_version",
            hello_checks_the_protocol_version,
        ),
        (
            "echo_output_and_exit_codes_arrive",
            echo_output_and_exit_codes_arrive,
        ),
        ("signals_are_reported", signals_are_reported),
        (
            "group_signal_reaches_background_jobs",
            group_signal_reaches_background_jobs,
        ),
        (
            "output_streams_before_the_exit",
            output_streams_before_the_exit,
        ),
        (
            "reattach_since_offset_returns_exactly_the_rest",
            reattach_since_offset_returns_exactly_the_rest,
        ),
        (
            "retention_drops_oldest_and_reports_dropped",
            retention_drops_oldest_and_reports_dropped,
        ),
        (
            "two_connections_follow_the_same_process",
            two_connections_follow_the_same_process,
        ),
        (
            "release_waits_for_a_follower_behind_on_the_output",
            release_waits_for_a_follower_behind_on_the_output,
        ),
        (
            "watches_that_ended_leave_the_connections_count",
            watches_that_ended_leave_the_connections_count,
        ),
        ("detach_stops_events", detach_stops_events),
        ("stdin_round_trip", stdin_round_trip),
        (
            "pty_is_a_terminal_and_resizes",
            pty_is_a_terminal_and_resizes,
        ),
        ("exec_errors_map_like_a_shell", exec_errors_map_like_a_shell),
        (
            "timeout_kills_and_marks_timed_out",
            timeout_kills_and_marks_timed_out,
        ),
        ("orphans_are_reaped", orphans_are_reaped),
        (
            "exit_is_not_held_by_a_grandchild",
            exit_is_not_held_by_a_grandchild,
        ),
        (
            "environment_is_built_not_inherited",
            environment_is_built_not_inherited,
        ),
        (
            "users_and_groups_come_from_the_root",
            users_and_groups_come_from_the_root,
        ),
        (
            "children_get_a_normal_oom_score",
            children_get_a_normal_oom_score,
        ),
        (
            "process_table_status_and_release",
            process_table_status_and_release,
        ),
        ("descriptors_do_not_leak", descriptors_do_not_leak),
        (
            "malformed_frames_do_not_crash_the_agent",
            malformed_frames_do_not_crash_the_agent,
        ),
        ("file_ops_round_trip", file_ops_round_trip),
        ("file_errors_have_codes", file_errors_have_codes),
        (
            "dotdot_and_absolute_paths_stay_in_root",
            dotdot_and_absolute_paths_stay_in_root,
        ),
        (
            "symlinks_cannot_leave_the_root",
            symlinks_cannot_leave_the_root,
        ),
        (
            "remove_does_not_follow_symlinks",
            remove_does_not_follow_symlinks,
        ),
        (
            "symlink_requests_store_the_target_as_text",
            symlink_requests_store_the_target_as_text,
        ),
        ("magic_links_are_refused", magic_links_are_refused),
        ("proc_is_not_served", proc_is_not_served),
        (
            "huge_listings_get_a_too_large_answer",
            huge_listings_get_a_too_large_answer,
        ),
        (
            "oversized_responses_are_still_answered",
            oversized_responses_are_still_answered,
        ),
        (
            "huge_user_databases_are_refused",
            huge_user_databases_are_refused,
        ),
        (
            "shutdown_kills_everything_and_exits",
            shutdown_kills_everything_and_exits,
        ),
        (
            "lifetime_deadline_ends_the_agent",
            lifetime_deadline_ends_the_agent,
        ),
        (
            "closing_control_ends_the_agent",
            closing_control_ends_the_agent,
        ),
    ]);
}

fn hello_checks_the_protocol_version() {
    let agent = TestAgent::start();
    let mut c = Client::connect(&agent.socket);
    let err = c.call_err(Request::Hello { version: 999 });
    assert_eq!(err.code, ErrorCode::VersionMismatch);
    assert!(err.message.contains("999"), "{}", err.message);
    match c.call(Request::Hello {
        version: openrun_protocol::PROTOCOL_VERSION,
    }) {
        Ok(Response::Hello(info)) => {
            assert_eq!(info.sandbox_id, SANDBOX_ID);
            assert_eq!(info.running, 0);
        }
        other => panic!("{other:?}"),
    }
    match c.call(Request::Info) {
        Ok(Response::Info(info)) => assert_eq!(info.version, openrun_protocol::PROTOCOL_VERSION),
        other => panic!("{other:?}"),
    }
}

fn echo_output_and_exit_codes_arrive() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    let out = c.run(cmd(&["echo", "hello", "world"]), vec![]);
    assert_eq!(out.stdout_str(), "hello world\n");
    assert_eq!(out.status.code, Some(0));
    assert!(out.status.success());

    let out = c.run(sh("echo out; echo err >&2; exit 3"), vec![]);
    assert_eq!(out.stdout_str(), "out\n");
    assert_eq!(out.stderr_str(), "err\n");
    assert_eq!(out.status.code, Some(3));
    assert_eq!(out.status.signal, None);

    // More than one output frame's worth, complete and in order.
    let out = c.run(sh("head -c 300000 /dev/zero | tr '\\0' x"), vec![]);
    assert_eq!(out.stdout.len(), 300_000);
    assert!(out.stdout.iter().all(|b| *b == b'x'));
    assert!(
        out.output_times.len() >= 5,
        "split into frames of at most 64 KiB"
    );
}

fn signals_are_reported() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    let out = c.run(sh("kill -TERM $$"), vec![]);
    assert_eq!(out.status.signal, Some(15));
    assert_eq!(out.status.code, None);
    assert_eq!(out.status.shell_code(), 143);

    let mut req = cmd(&["sleep", "30"]);
    req.attach = true;
    let pid = c.exec(req, vec![]);
    assert!(matches!(
        c.call(Request::Signal {
            pid,
            signal: 9,
            group: false
        }),
        Ok(Response::Done)
    ));
    let out = c.collect(pid, WAIT);
    assert_eq!(out.status.signal, Some(9));
    assert!(!out.status.timed_out);

    let err = c.call_err(Request::Signal {
        pid: 999_999,
        signal: 9,
        group: false,
    });
    assert_eq!(err.code, ErrorCode::NoSuchProcess);
    let err = c.call_err(Request::Signal {
        pid,
        signal: 99,
        group: false,
    });
    assert_eq!(err.code, ErrorCode::InvalidArgument);
}

fn group_signal_reaches_background_jobs() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    let mut req = sh("sleep 30 & echo $!; wait");
    req.attach = true;
    let pid = c.exec(req, vec![]);
    let frame = c.next_event(WAIT).expect("background pid");
    let bg: i32 = String::from_utf8_lossy(&frame.data)
        .trim()
        .parse()
        .expect("pid");
    assert!(proc_state(bg).is_some(), "background job runs");
    assert!(matches!(
        c.call(Request::Signal {
            pid,
            signal: 15,
            group: true
        }),
        Ok(Response::Done)
    ));
    // The first output chunk was consumed above; collect the rest from there.
    let out = c.collect_from(pid, frame.data.len() as u64, WAIT);
    assert_eq!(out.status.signal, Some(15));
    assert!(
        wait_gone(bg, WAIT),
        "the group signal killed the background job and it was reaped"
    );
}

fn output_streams_before_the_exit() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    let mut req = sh("echo one; sleep 1; echo two");
    req.attach = true;
    let started = Instant::now();
    let pid = c.exec(req, vec![]);
    let first = c.next_event(WAIT).expect("first line");
    let first_at = started.elapsed();
    assert!(matches!(
        first.header,
        AgentMessage::Output {
            stream: Stream::Stdout,
            offset: 0,
            ..
        }
    ));
    assert_eq!(first.data, b"one\n");
    assert!(
        first_at < Duration::from_millis(800),
        "first line took {first_at:?}"
    );
    let rest = c.collect_from(pid, 4, WAIT);
    assert_eq!(rest.stdout_str(), "two\n");
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(rest.status.code, Some(0));
}

fn reattach_since_offset_returns_exactly_the_rest() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    let pid = c.exec(sh("printf 0123456789; printf abcdef >&2"), vec![]);
    let status = c.wait_exited(pid);
    assert_eq!(status.code, Some(0));

    let mut other = agent.client();
    match other.call(Request::Attach(AttachRequest {
        pid,
        stdout_since: 4,
        stderr_since: 2,
        follow: false,
    })) {
        Ok(Response::Attached { process, dropped }) => {
            assert_eq!(dropped, 0);
            assert_eq!(process.stdout_len, 10);
            assert_eq!(process.stderr_len, 6);
            assert!(matches!(process.state, ProcessState::Exited { .. }));
        }
        other => panic!("{other:?}"),
    }
    let out = other.collect_from_offsets(pid, 4, 2, WAIT);
    assert_eq!(out.stdout_str(), "456789");
    assert_eq!(out.stderr_str(), "cdef");
    assert_eq!(out.status.code, Some(0));

    // Attaching at the end returns nothing but the exit.
    let out = {
        assert!(matches!(
            other.call(Request::Attach(AttachRequest {
                pid,
                stdout_since: 10,
                stderr_since: 6,
                follow: true,
            })),
            Ok(Response::Attached { dropped: 0, .. })
        ));
        other.collect_from_offsets(pid, 10, 6, WAIT)
    };
    assert!(out.stdout.is_empty() && out.stderr.is_empty());

    // An offset not reached yet: streaming starts when the output gets there.
    let pid = c.exec(sh("sleep 0.3; printf 0123456789"), vec![]);
    assert!(matches!(
        other.call(Request::Attach(AttachRequest {
            pid,
            stdout_since: 4,
            stderr_since: 0,
            follow: true,
        })),
        Ok(Response::Attached { dropped: 0, .. })
    ));
    let out = other.collect_from_offsets(pid, 4, 0, WAIT);
    assert_eq!(out.stdout_str(), "456789");
    let err = other.call_err(Request::Attach(AttachRequest {
        pid: 999_999,
        ..Default::default()
    }));
    assert_eq!(err.code, ErrorCode::NoSuchProcess);
}

fn retention_drops_oldest_and_reports_dropped() {
    let agent = TestAgent::start_with(Options {
        retention: Some(8),
        ..Default::default()
    });
    let mut c = agent.client();
    let pid = c.exec(cmd(&["printf", "0123456789abcdefghij"]), vec![]);
    c.wait_exited(pid);
    match c.call(Request::Attach(AttachRequest {
        pid,
        stdout_since: 0,
        stderr_since: 0,
        follow: false,
    })) {
        Ok(Response::Attached { process, dropped }) => {
            assert_eq!(process.stdout_len, 20);
            assert_eq!(dropped, 12);
        }
        other => panic!("{other:?}"),
    }
    let frame = c.next_event(WAIT).expect("retained output");
    assert!(matches!(
        frame.header,
        AgentMessage::Output {
            stream: Stream::Stdout,
            offset: 12,
            ..
        }
    ));
    assert_eq!(frame.data, b"cdefghij");
    assert!(matches!(
        c.next_event(WAIT).map(|f| f.header),
        Some(AgentMessage::Exit { .. })
    ));
    match c.call(Request::Attach(AttachRequest {
        pid,
        stdout_since: 15,
        stderr_since: 0,
        follow: false,
    })) {
        Ok(Response::Attached { dropped, .. }) => assert_eq!(dropped, 0),
        other => panic!("{other:?}"),
    }
    let frame = c.next_event(WAIT).expect("tail");
    assert_eq!(frame.data, b"fghij");
}

fn two_connections_follow_the_same_process() {
    let agent = TestAgent::start();
    let mut a = agent.client();
    let mut b = agent.client();
    let mut req = sh("read x; echo got-$x");
    req.stdin = true;
    req.attach = true;
    let pid = a.exec(req, vec![]);
    assert!(matches!(
        b.call(Request::Attach(AttachRequest {
            pid,
            follow: true,
            ..Default::default()
        })),
        Ok(Response::Attached { .. })
    ));
    assert!(matches!(
        b.call_data(Request::Stdin { pid, eof: false }, b"both\n".to_vec())
            .0,
        Ok(Response::Done)
    ));
    let from_a = a.collect(pid, WAIT);
    let from_b = b.collect(pid, WAIT);
    assert_eq!(from_a.stdout_str(), "got-both\n");
    assert_eq!(from_b.stdout_str(), "got-both\n");
    assert_eq!(from_a.status, from_b.status);
}

/// A connection that follows a process but reads slowly still gets all of its output and
/// its exit when another connection releases the process as soon as it exited (the E2B
/// surface does); the entry goes once that follower has its exit.
fn release_waits_for_a_follower_behind_on_the_output() {
    // Less than the agent holds for a follower (the stream's 4 MiB high-water mark, the
    // connection's queue of 64 chunks, the socket), so the process can end before its
    // follower reads anything (more would wait on its pipe for the follower: tests/backpressure.rs).
    const SIZE: usize = 6 << 20;
    let agent = TestAgent::start();
    let mut a = agent.client();
    let pid = a.exec(sh(&format!("head -c {SIZE} /dev/zero")), vec![]);
    // A follower that reads nothing yet: its stream fills the socket and the agent's queue.
    let mut slow = std::os::unix::net::UnixStream::connect(&agent.socket).expect("connect");
    openrun_protocol::frame::write_frame(
        &mut slow,
        &openrun_protocol::Frame::new(openrun_protocol::RequestEnvelope {
            id: 1,
            request: Request::Attach(AttachRequest {
                pid,
                follow: true,
                ..Default::default()
            }),
        }),
    )
    .expect("attach");
    let status = a.wait_exited(pid);
    assert_eq!(status.code, Some(0));
    std::thread::sleep(Duration::from_millis(200));
    assert!(matches!(
        a.call(Request::Release { pid }),
        Ok(Response::Done)
    ));
    let mut b = Client::from_stream(slow);
    match b.wait_response(1, WAIT) {
        Some((Ok(Response::Attached { .. }), _)) => {}
        other => panic!("attach failed: {other:?}"),
    }
    let got = b.collect(pid, WAIT);
    assert_eq!(got.stdout.len(), SIZE, "all of the output");
    assert_eq!(got.status.code, Some(0));
    assert_eq!(
        a.call_err(Request::ProcessStatus { pid }).code,
        ErrorCode::NoSuchProcess,
        "released once its last follower had the exit"
    );
}

/// Watches that ended by themselves (their directory was removed) no longer count toward the
/// connection's cap: a connection that reached it can watch again once they ended.
fn watches_that_ended_leave_the_connections_count() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    let mut started = 0;
    let cap = loop {
        let dir = format!("w{started}");
        std::fs::create_dir(agent.root.join(&dir)).unwrap();
        match c.call(Request::Watch {
            path: format!("/{dir}"),
            recursive: false,
        }) {
            Ok(Response::Watching { .. }) => started += 1,
            Err(e) if e.code == ErrorCode::TooLarge => break started,
            other => panic!("{other:?}"),
        }
        assert!(started <= 1000, "no cap per connection");
    };
    for i in 0..=cap {
        std::fs::remove_dir(agent.root.join(format!("w{i}"))).unwrap();
    }
    let mut ended = 0;
    while ended < cap {
        match c.next_event(WAIT).map(|f| f.header) {
            Some(AgentMessage::WatchEnded { .. }) => ended += 1,
            Some(AgentMessage::FileEvent { .. }) => {}
            other => panic!("waiting for the watches to end: {other:?}"),
        }
    }
    std::fs::create_dir(agent.root.join("again")).unwrap();
    assert!(matches!(
        c.call(Request::Watch {
            path: "/again".into(),
            recursive: false,
        }),
        Ok(Response::Watching { .. })
    ));
}

fn detach_stops_events() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    let mut req = sh("while true; do echo tick; sleep 0.05; done");
    req.attach = true;
    let pid = c.exec(req, vec![]);
    assert!(c.next_event(WAIT).is_some(), "output while attached");
    assert!(matches!(
        c.call(Request::Detach { pid }),
        Ok(Response::Done)
    ));
    // Whatever was queued before the detach may still arrive; then nothing.
    while c.next_event(Duration::from_millis(200)).is_some() {}
    assert!(
        c.next_event(Duration::from_millis(400)).is_none(),
        "no events after detach"
    );
    // The process kept running.
    match c.call(Request::ProcessStatus { pid }) {
        Ok(Response::Process(info)) => {
            assert_eq!(info.state, ProcessState::Running);
            assert!(info.stdout_len >= 10);
        }
        other => panic!("{other:?}"),
    }
    let err = c.call_err(Request::Detach { pid: 999_999 });
    assert_eq!(err.code, ErrorCode::NoSuchProcess);
}

fn stdin_round_trip() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    let mut req = cmd(&["cat"]);
    req.stdin = true;
    req.attach = true;
    let pid = c.exec(req, b"first\n".to_vec());
    assert!(matches!(
        c.call_data(Request::Stdin { pid, eof: true }, b"second\n".to_vec())
            .0,
        Ok(Response::Done)
    ));
    let out = c.collect(pid, WAIT);
    assert_eq!(out.stdout_str(), "first\nsecond\n");
    assert_eq!(out.status.code, Some(0));

    // Exec data without `stdin`: written, then EOF.
    let out = c.run(cmd(&["cat"]), b"abc".to_vec());
    assert_eq!(out.stdout_str(), "abc");
    assert_eq!(out.status.code, Some(0));

    // Without stdin, the process reads /dev/null.
    let out = c.run(sh("cat; echo end"), vec![]);
    assert_eq!(out.stdout_str(), "end\n");

    let pid = c.exec(cmd(&["sleep", "5"]), vec![]);
    let err = c
        .call_data(Request::Stdin { pid, eof: false }, b"x".to_vec())
        .0
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::NotSupported);
}

fn pty_is_a_terminal_and_resizes() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    let mut req = sh("test -t 0 && test -t 1 && echo is-a-tty; echo term=$TERM");
    req.pty = Some(PtySize { rows: 24, cols: 80 });
    let out = c.run(req, vec![]);
    let text = out.stdout_str();
    assert!(text.contains("is-a-tty"), "{text:?}");
    assert!(text.contains("term=xterm-256color"), "{text:?}");
    assert!(out.stderr.is_empty());

    let mut req = sh("stty size; read line; stty size");
    req.pty = Some(PtySize { rows: 24, cols: 80 });
    req.attach = true;
    let pid = c.exec(req, vec![]);
    let mut seen = String::new();
    let deadline = Instant::now() + WAIT;
    while !seen.contains("24 80") {
        assert!(Instant::now() < deadline, "no size printed: {seen:?}");
        if let Some(f) = c.next_event(WAIT) {
            seen.push_str(&String::from_utf8_lossy(&f.data));
        }
    }
    assert!(matches!(
        c.call(Request::Resize {
            pid,
            size: PtySize {
                rows: 40,
                cols: 100
            }
        }),
        Ok(Response::Done)
    ));
    assert!(matches!(
        c.call_data(Request::Stdin { pid, eof: false }, b"\n".to_vec())
            .0,
        Ok(Response::Done)
    ));
    let rest = c.collect_from(pid, seen.len() as u64, WAIT);
    assert!(
        rest.stdout_str().contains("40 100"),
        "{:?}",
        rest.stdout_str()
    );
    assert_eq!(rest.status.code, Some(0));

    let pid = c.exec(cmd(&["sleep", "5"]), vec![]);
    let err = c.call_err(Request::Resize {
        pid,
        size: PtySize { rows: 1, cols: 1 },
    });
    assert_eq!(err.code, ErrorCode::NotSupported);
}

fn exec_errors_map_like_a_shell() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    let err = c
        .call(Request::Exec(cmd(&["definitely-not-a-command-xyz"])))
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::CommandNotFound);
    assert_eq!(
        err.message,
        "definitely-not-a-command-xyz: command not found"
    );

    let script = agent.outside.join("not-executable.sh");
    std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    let path = script.to_str().unwrap();
    let err = c.call(Request::Exec(cmd(&[path]))).unwrap_err();
    assert_eq!(err.code, ErrorCode::PermissionDenied);
    assert!(err.message.contains("permission denied"), "{}", err.message);

    // A script without `#!` runs with /bin/sh, like execvp does.
    let plain = agent.outside.join("plain.sh");
    std::fs::write(&plain, "echo from-plain-script\n").unwrap();
    std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = c.run(cmd(&[plain.to_str().unwrap()]), vec![]);
    assert_eq!(out.stdout_str(), "from-plain-script\n");

    let mut req = cmd(&["true"]);
    req.cwd = Some("/nonexistent-dir-xyz".into());
    let err = c.call(Request::Exec(req)).unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
    assert!(
        err.message.contains("/nonexistent-dir-xyz"),
        "{}",
        err.message
    );

    let err = c.call(Request::Exec(cmd(&[]))).unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidArgument);

    let mut req = cmd(&["pwd"]);
    req.cwd = Some(agent.outside.to_str().unwrap().to_string());
    let out = c.run(req, vec![]);
    assert_eq!(out.stdout_str().trim(), agent.outside.to_str().unwrap());
}

fn timeout_kills_and_marks_timed_out() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    let mut req = cmd(&["sleep", "30"]);
    req.timeout_ms = Some(300);
    let started = Instant::now();
    let out = c.run(req, vec![]);
    assert!(out.status.timed_out);
    assert_eq!(out.status.signal, Some(9));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(5),
        "{took:?}"
    );
    // A process that ends in time is not marked.
    let mut req = cmd(&["true"]);
    req.timeout_ms = Some(5_000);
    let out = c.run(req, vec![]);
    assert!(!out.status.timed_out);
    assert_eq!(out.status.code, Some(0));
}

fn orphans_are_reaped() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    let out = c.run(sh("sleep 0.5 & echo $!; exit 0"), vec![]);
    assert_eq!(out.status.code, Some(0));
    let orphan: i32 = out.stdout_str().trim().parse().expect("orphan pid");
    let (state, ppid) = proc_state(orphan).expect("orphan still sleeping");
    assert_ne!(state, 'Z');
    assert_eq!(
        ppid,
        agent.pid(),
        "orphan reparented to the agent (subreaper)"
    );
    assert!(
        wait_gone(orphan, WAIT),
        "orphan was reaped, not left as a zombie"
    );
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", agent.pid()))
        .unwrap_or_default();
    for child in children.split_whitespace() {
        let pid: i32 = child.parse().unwrap();
        assert_ne!(
            proc_state(pid).map(|s| s.0),
            Some('Z'),
            "zombie child {pid}"
        );
    }
}

fn exit_is_not_held_by_a_grandchild() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    let started = Instant::now();
    let out = c.run(sh("sleep 3 & echo started"), vec![]);
    let took = started.elapsed();
    assert_eq!(out.stdout_str(), "started\n");
    assert_eq!(out.status.code, Some(0));
    assert!(
        took < Duration::from_millis(1500),
        "exit waited for the grandchild: {took:?}"
    );
}

fn env_of(c: &mut Client, mut req: openrun_protocol::ExecRequest) -> BTreeMap<String, String> {
    req.argv = vec!["env".into()];
    let out = c.run(req, vec![]);
    assert_eq!(out.status.code, Some(0));
    out.stdout_str()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn environment_is_built_not_inherited() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    let env = env_of(&mut c, cmd(&[]));
    assert_eq!(env.get("FROM_CONFIG").map(String::as_str), Some("yes"));
    assert_eq!(env.get("HOSTNAME").map(String::as_str), Some(SANDBOX_ID));
    assert_eq!(
        env.get("PATH").map(String::as_str),
        Some("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    );
    assert_eq!(env.get("HOME").map(String::as_str), Some("/root"));
    assert_eq!(env.get("USER").map(String::as_str), Some("root"));
    assert!(!env.contains_key(ENV_LEAK), "agent environment leaked");
    assert!(!env.contains_key("TERM"));

    let mut req = cmd(&[]);
    req.env = BTreeMap::from([
        ("FROM_CONFIG".to_string(), "overridden".to_string()),
        ("EXTRA".to_string(), "1".to_string()),
    ]);
    let env = env_of(&mut c, req);
    assert_eq!(
        env.get("FROM_CONFIG").map(String::as_str),
        Some("overridden")
    );
    assert_eq!(env.get("EXTRA").map(String::as_str), Some("1"));

    // PATH lookup uses the process's PATH, not the agent's.
    let bin = agent.outside.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let tool = bin.join("only-in-custom-path");
    std::fs::write(&tool, "#!/bin/sh\necho custom-tool\n").unwrap();
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut req = cmd(&["only-in-custom-path"]);
    req.env = BTreeMap::from([(
        "PATH".to_string(),
        format!("/nonexistent:{}:/usr/bin:/bin", bin.display()),
    )]);
    let out = c.run(req, vec![]);
    assert_eq!(out.stdout_str(), "custom-tool\n");
}

fn users_and_groups_come_from_the_root() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    let mut req = sh("id -u; id -g; id -G; pwd; echo $HOME $USER");
    req.user = Some("tester".into());
    let out = c.run(req, vec![]);
    assert_eq!(out.status.code, Some(0), "{}", out.stderr_str());
    let lines: Vec<String> = out.stdout_str().lines().map(str::to_string).collect();
    assert_eq!(lines[0], "1234");
    assert_eq!(lines[1], "1234");
    let groups: Vec<&str> = lines[2].split_whitespace().collect();
    assert!(
        groups.contains(&"1234") && groups.contains(&"5555"),
        "{groups:?}"
    );
    assert!(!groups.contains(&"0"), "root's group kept: {groups:?}");
    // The home from the sandbox's passwd does not exist, so the cwd falls back to /.
    assert_eq!(lines[3], "/");
    assert_eq!(lines[4], "/nonexistent-home tester");

    let mut req = sh("id -u; id -g; id -G");
    req.user = Some("4321:4322".into());
    let out = c.run(req, vec![]);
    assert_eq!(out.stdout_str(), "4321\n4322\n4322\n");

    // A home outside the root is not looked up on the host: the cwd falls back to / even
    // though the path exists there.
    let passwd = std::fs::read_to_string(agent.root.join("etc/passwd")).unwrap();
    std::fs::write(
        agent.root.join("etc/passwd"),
        format!(
            "{passwd}outsider:x:4444:4444::{}:/bin/sh\n",
            agent.outside.display()
        ),
    )
    .unwrap();
    let mut req = cmd(&["pwd"]);
    req.user = Some("outsider".into());
    let out = c.run(req, vec![]);
    assert_eq!(out.stdout_str(), "/\n", "{}", out.stderr_str());

    let mut req = cmd(&["true"]);
    req.user = Some("no-such-user".into());
    let err = c.call(Request::Exec(req)).unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
    assert!(err.message.contains("no-such-user"), "{}", err.message);

    // The dropped user cannot enter a directory only root may enter.
    let private = agent.outside.join("private");
    std::fs::create_dir_all(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut req = cmd(&["true"]);
    req.user = Some("tester".into());
    req.cwd = Some(private.to_str().unwrap().to_string());
    let err = c.call(Request::Exec(req)).unwrap_err();
    assert_eq!(err.code, ErrorCode::PermissionDenied);
}

fn children_get_a_normal_oom_score() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    let agent_score =
        std::fs::read_to_string(format!("/proc/{}/oom_score_adj", agent.pid())).unwrap();
    assert_ne!(
        agent_score.trim(),
        "0",
        "the helper agent runs with a non-zero score"
    );
    let out = c.run(cmd(&["cat", "/proc/self/oom_score_adj"]), vec![]);
    assert_eq!(out.stdout_str().trim(), "0");
    // Ignored signals in the agent (SIGPIPE) are reset for children.
    let out = c.run(sh("grep SigIgn /proc/self/status"), vec![]);
    assert!(
        out.stdout_str().contains("0000000000000000"),
        "{}",
        out.stdout_str()
    );

    // Where the agent cannot be protected, processes are made the OOM killer's first choice.
    let agent = TestAgent::start_with(Options {
        oom_score_adj: Some(500),
        ..Default::default()
    });
    let mut c = agent.client();
    let out = c.run(cmd(&["cat", "/proc/self/oom_score_adj"]), vec![]);
    assert_eq!(out.stdout_str().trim(), "500");
}

fn process_table_status_and_release() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    let mut req = cmd(&["sleep", "30"]);
    req.tag = Some("sleeper".into());
    let pid = c.exec(req, vec![]);
    match c.call(Request::ListProcesses) {
        Ok(Response::Processes { processes }) => {
            let p = processes.iter().find(|p| p.pid == pid).expect("listed");
            assert_eq!(p.state, ProcessState::Running);
            assert_eq!(p.tag.as_deref(), Some("sleeper"));
            assert_eq!(p.argv, ["sleep", "30"]);
            assert!(!p.pty);
        }
        other => panic!("{other:?}"),
    }
    match c.call(Request::Info) {
        Ok(Response::Info(info)) => assert_eq!(info.running, 1),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        c.call_err(Request::Release { pid }).code,
        ErrorCode::StillRunning
    );
    c.call(Request::Signal {
        pid,
        signal: 9,
        group: false,
    })
    .unwrap();
    let status = c.wait_exited(pid);
    assert_eq!(status.signal, Some(9));
    assert!(matches!(
        c.call(Request::Release { pid }),
        Ok(Response::Done)
    ));
    assert_eq!(
        c.call_err(Request::ProcessStatus { pid }).code,
        ErrorCode::NoSuchProcess
    );
    assert_eq!(
        c.call_err(Request::Release { pid }).code,
        ErrorCode::NoSuchProcess
    );
    match c.call(Request::ListProcesses) {
        Ok(Response::Processes { processes }) => assert!(processes.iter().all(|p| p.pid != pid)),
        other => panic!("{other:?}"),
    }
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn descriptors_do_not_leak() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    // Children see only their standard streams (plus the one `ls` opens to list the dir).
    let out = c.run(cmd(&["ls", "/proc/self/fd"]), vec![]);
    let fds: Vec<u32> = out
        .stdout_str()
        .split_whitespace()
        .map(|f| f.parse().unwrap())
        .collect();
    assert!(
        fds.iter().all(|fd| *fd <= 3),
        "inherited descriptors: {fds:?}"
    );
    let mut req = sh("ls /proc/$$/fd");
    req.pty = Some(PtySize { rows: 5, cols: 40 });
    req.stdin = true;
    let out = c.run(req, vec![]);
    let fds: Vec<String> = out
        .stdout_str()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert!(
        fds.iter()
            .all(|fd| ["0", "1", "2", "10"].contains(&fd.as_str())),
        "inherited descriptors under a pty: {fds:?}"
    );

    // The agent closes what it opened for finished processes.
    let before = open_fds(agent.pid());
    for i in 0..20 {
        let mut req = if i % 2 == 0 {
            cmd(&["cat"])
        } else {
            sh("echo x; echo y >&2")
        };
        req.pty = (i % 3 == 0).then_some(PtySize { rows: 5, cols: 20 });
        req.stdin = i % 4 == 0 || req.pty.is_some();
        req.timeout_ms = Some(5_000);
        let pid = c.exec(req.clone(), b"data\n".to_vec());
        if req.stdin {
            // May race with a process that already ended; either answer is fine here.
            let _ = c.call_data(Request::Stdin { pid, eof: true }, vec![]);
        }
        c.wait_exited(pid);
        assert!(matches!(
            c.call(Request::Release { pid }),
            Ok(Response::Done)
        ));
    }
    let after = open_fds(agent.pid());
    assert!(
        after <= before,
        "descriptors leaked: {before} before, {after} after"
    );
}

fn raw_frame(header: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&(header.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&0u32.to_le_bytes());
    bytes.extend_from_slice(header);
    bytes
}

fn malformed_frames_do_not_crash_the_agent() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    // Valid JSON with an id but an unknown op: an error response with that id.
    c.send_raw(&raw_frame(br#"{"id": 77, "request": {"op": "bogus"}}"#));
    let (result, _) = c.wait_response(77, WAIT).expect("error response");
    let err = result.unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidArgument);
    assert!(err.message.contains("malformed request"), "{}", err.message);
    // The connection still works.
    assert!(matches!(c.call(Request::Info), Ok(Response::Info(_))));

    // Not JSON at all: the connection is closed.
    c.send_raw(&raw_frame(b"{not json"));
    assert!(c.closed_within(WAIT), "connection closed after garbage");

    // An oversized length prefix: closed too, before allocating anything.
    let mut c = agent.client();
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&u32::MAX.to_le_bytes());
    bytes.extend_from_slice(&u32::MAX.to_le_bytes());
    c.send_raw(&bytes);
    assert!(
        c.closed_within(WAIT),
        "connection closed after a huge prefix"
    );

    // The agent itself is fine.
    let mut c = agent.client();
    let out = c.run(cmd(&["echo", "still-alive"]), vec![]);
    assert_eq!(out.stdout_str(), "still-alive\n");
}

fn file_ops_round_trip() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    let ok = |r: Result<Response, openrun_protocol::AgentError>| match r {
        Ok(Response::Done) => {}
        other => panic!("{other:?}"),
    };
    // Write with parents, read back whole and in parts.
    let (r, _) = c.call_data(
        Request::WriteFile {
            path: "/work/dir/hello.txt".into(),
            mode: Some(0o600),
            parents: true,
            append: false,
        },
        b"hello, sandbox".to_vec(),
    );
    ok(r);
    assert_eq!(
        std::fs::read(agent.root.join("work/dir/hello.txt")).unwrap(),
        b"hello, sandbox"
    );
    let (r, data) = c.call_data(
        Request::ReadFile {
            path: "/work/dir/hello.txt".into(),
            offset: 0,
            limit: None,
        },
        vec![],
    );
    assert!(matches!(
        r,
        Ok(Response::FileData {
            size: 14,
            offset: 0
        })
    ));
    assert_eq!(data, b"hello, sandbox");
    let (r, data) = c.call_data(
        Request::ReadFile {
            path: "work/dir/hello.txt".into(),
            offset: 7,
            limit: Some(4),
        },
        vec![],
    );
    assert!(matches!(
        r,
        Ok(Response::FileData {
            size: 14,
            offset: 7
        })
    ));
    assert_eq!(data, b"sand");

    match c.call(Request::Stat { path: "/".into() }) {
        Ok(Response::Stat(st)) => assert_eq!(st.kind, FileKind::Dir),
        other => panic!("{other:?}"),
    }
    // Stat: mode as written, lstat semantics.
    match c.call(Request::Stat {
        path: "/work/dir/hello.txt".into(),
    }) {
        Ok(Response::Stat(st)) => {
            assert_eq!(st.kind, FileKind::File);
            assert_eq!(st.size, 14);
            assert_eq!(st.mode, 0o600);
            assert_eq!(st.name, "/work/dir/hello.txt");
        }
        other => panic!("{other:?}"),
    }

    // Overwrite keeps the mode; append appends.
    ok(c.call_data(
        Request::WriteFile {
            path: "/work/dir/hello.txt".into(),
            mode: Some(0o777),
            parents: false,
            append: false,
        },
        b"v2".to_vec(),
    )
    .0);
    ok(c.call_data(
        Request::WriteFile {
            path: "/work/dir/hello.txt".into(),
            mode: None,
            parents: false,
            append: true,
        },
        b"+more".to_vec(),
    )
    .0);
    let path = agent.root.join("work/dir/hello.txt");
    assert_eq!(std::fs::read(&path).unwrap(), b"v2+more");
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
        0o600
    );
    // No temporary files are left behind.
    let names: Vec<String> = std::fs::read_dir(agent.root.join("work/dir"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["hello.txt"]);

    // Mkdir, with and without parents; listing is sorted and does not follow symlinks.
    ok(c.call(Request::Mkdir {
        path: "/work/dir/sub".into(),
        parents: false,
        mode: Some(0o750),
    }));
    assert_eq!(
        c.call_err(Request::Mkdir {
            path: "/work/dir/sub".into(),
            parents: false,
            mode: None
        })
        .code,
        ErrorCode::AlreadyExists
    );
    ok(c.call(Request::Mkdir {
        path: "/work/dir/sub".into(),
        parents: true,
        mode: None,
    }));
    ok(c.call(Request::Mkdir {
        path: "/a/b/c".into(),
        parents: true,
        mode: None,
    }));
    assert!(agent.root.join("a/b/c").is_dir());
    assert_eq!(
        std::fs::metadata(agent.root.join("work/dir/sub"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o750
    );
    std::os::unix::fs::symlink("hello.txt", agent.root.join("work/dir/link")).unwrap();
    match c.call(Request::ListDir {
        path: "/work/dir".into(),
    }) {
        Ok(Response::Entries { entries }) => {
            let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
            assert_eq!(names, ["hello.txt", "link", "sub"]);
            assert_eq!(entries[1].kind, FileKind::Symlink);
            assert_eq!(entries[1].symlink_target.as_deref(), Some("hello.txt"));
            assert_eq!(entries[2].kind, FileKind::Dir);
        }
        other => panic!("{other:?}"),
    }
    match c.call(Request::Stat {
        path: "/work/dir/link".into(),
    }) {
        Ok(Response::Stat(st)) => {
            assert_eq!(st.kind, FileKind::Symlink);
            assert_eq!(st.symlink_target.as_deref(), Some("hello.txt"));
        }
        other => panic!("{other:?}"),
    }

    // Rename, then recursive remove.
    ok(c.call(Request::Rename {
        from: "/work/dir/hello.txt".into(),
        to: "/a/b/moved.txt".into(),
    }));
    assert!(agent.root.join("a/b/moved.txt").is_file());
    assert!(!agent.root.join("work/dir/hello.txt").exists());
    assert_eq!(
        c.call_err(Request::Remove {
            path: "/a".into(),
            recursive: false
        })
        .code,
        ErrorCode::DirectoryNotEmpty
    );
    ok(c.call(Request::Remove {
        path: "/a".into(),
        recursive: true,
    }));
    assert!(!agent.root.join("a").exists());
    ok(c.call(Request::Remove {
        path: "/work/dir/link".into(),
        recursive: false,
    }));
    assert!(!agent.root.join("work/dir/link").exists());
}

fn file_errors_have_codes() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    let err = c.call_err(Request::ReadFile {
        path: "/x/y".into(),
        offset: 0,
        limit: None,
    });
    assert_eq!(err.code, ErrorCode::NotFound);
    assert_eq!(err.message, "no such file or directory: /x/y");
    assert_eq!(
        c.call_err(Request::ReadFile {
            path: "/etc".into(),
            offset: 0,
            limit: None
        })
        .code,
        ErrorCode::IsADirectory
    );
    assert_eq!(
        c.call_err(Request::ListDir {
            path: "/etc/passwd".into()
        })
        .code,
        ErrorCode::NotADirectory
    );
    assert_eq!(
        c.call_data(
            Request::WriteFile {
                path: "/missing/parent/file".into(),
                mode: None,
                parents: false,
                append: false
            },
            b"x".to_vec()
        )
        .0
        .unwrap_err()
        .code,
        ErrorCode::NotFound
    );
    assert_eq!(
        c.call_data(
            Request::WriteFile {
                path: "/etc".into(),
                mode: None,
                parents: false,
                append: false
            },
            b"x".to_vec()
        )
        .0
        .unwrap_err()
        .code,
        ErrorCode::IsADirectory
    );
    assert_eq!(
        c.call_err(Request::Mkdir {
            path: "/etc/passwd/sub".into(),
            parents: true,
            mode: None
        })
        .code,
        ErrorCode::NotADirectory
    );
    assert_eq!(
        c.call_err(Request::Mkdir {
            path: "/etc/passwd".into(),
            parents: true,
            mode: None
        })
        .code,
        ErrorCode::AlreadyExists
    );
    assert_eq!(
        c.call_err(Request::Remove {
            path: "/".into(),
            recursive: true
        })
        .code,
        ErrorCode::InvalidArgument
    );
    assert!(agent.root.join("etc/passwd").exists());
    assert_eq!(
        c.call_err(Request::Stat { path: "".into() }).code,
        ErrorCode::InvalidArgument
    );
}

fn read(c: &mut Client, path: &str) -> Result<Vec<u8>, openrun_protocol::AgentError> {
    let (r, data) = c.call_data(
        Request::ReadFile {
            path: path.into(),
            offset: 0,
            limit: None,
        },
        vec![],
    );
    r.map(|_| data)
}

fn dotdot_and_absolute_paths_stay_in_root() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    // `..` stops at the root: this is <root>/etc/passwd, with the marker, not the host's.
    let data = read(&mut c, "../../../../../../etc/passwd").expect("read");
    assert!(String::from_utf8_lossy(&data).contains(PASSWD_MARKER));
    let data = read(&mut c, "/etc/../../etc/passwd").expect("read");
    assert!(String::from_utf8_lossy(&data).contains(PASSWD_MARKER));
    // Absolute paths are relative to the root.
    assert_eq!(
        read(&mut c, "/etc/hostname").unwrap(),
        HOSTNAME_MARKER.as_bytes()
    );
    // The directory next to the root is unreachable by `..`.
    let err = read(&mut c, "../outside/secret").unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
    // The host path of the outside file is just a path inside the root.
    let host_path = agent.outside.join("secret");
    let err = read(&mut c, host_path.to_str().unwrap()).unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
    // Writes through `..` land inside the root.
    let (r, _) = c.call_data(
        Request::WriteFile {
            path: "../outside/written".into(),
            mode: None,
            parents: true,
            append: false,
        },
        b"inside".to_vec(),
    );
    assert!(matches!(r, Ok(Response::Done)), "{r:?}");
    assert!(
        !agent.outside.join("written").exists(),
        "wrote outside the root"
    );
    assert!(agent.root.join("outside/written").exists());
    // Listing `..` of the root lists the root.
    match c.call(Request::ListDir { path: "/..".into() }) {
        Ok(Response::Entries { entries }) => {
            assert!(entries.iter().any(|e| e.name == "etc"));
            assert!(entries.iter().all(|e| e.name != "agent.sock"));
        }
        other => panic!("{other:?}"),
    }
}

fn symlinks_cannot_leave_the_root() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    let link = |target: &str, name: &str| {
        std::os::unix::fs::symlink(target, agent.root.join(name)).unwrap();
    };
    // An absolute symlink to the host's /etc/passwd reads the sandbox's.
    link("/etc/passwd", "abs-passwd");
    let data = read(&mut c, "/abs-passwd").expect("read via symlink");
    assert!(String::from_utf8_lossy(&data).contains(PASSWD_MARKER));
    // An absolute symlink to the real host path of the secret resolves inside the root.
    link(agent.outside.join("secret").to_str().unwrap(), "abs-secret");
    let err = read(&mut c, "/abs-secret").unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
    // Relative symlinks climbing out stop at the root.
    link("../outside/secret", "rel-secret");
    assert_eq!(
        read(&mut c, "/rel-secret").unwrap_err().code,
        ErrorCode::NotFound
    );
    link("..", "up");
    assert_eq!(
        read(&mut c, "/up/outside/secret").unwrap_err().code,
        ErrorCode::NotFound
    );
    let data = read(&mut c, "/up/up/etc/passwd").expect("read through up");
    assert!(String::from_utf8_lossy(&data).contains(PASSWD_MARKER));
    match c.call(Request::ListDir { path: "/up".into() }) {
        Ok(Response::Entries { entries }) => {
            assert!(
                entries.iter().any(|e| e.name == "abs-passwd"),
                "lists the root"
            );
        }
        other => panic!("{other:?}"),
    }
    // A symlinked directory that points at the outside directory's host path resolves inside
    // the root: dangling there, so creating below it fails (like `mkdir -p` would) ...
    link(agent.outside.to_str().unwrap(), "outdir");
    let (r, _) = c.call_data(
        Request::WriteFile {
            path: "/outdir/planted".into(),
            mode: None,
            parents: true,
            append: false,
        },
        b"x".to_vec(),
    );
    assert_eq!(r.unwrap_err().code, ErrorCode::AlreadyExists);
    assert!(
        !agent.outside.join("planted").exists(),
        "wrote outside the root"
    );
    // ... and once that path exists inside the root, the write lands there.
    let mirror = agent.root.join(agent.outside.strip_prefix("/").unwrap());
    std::fs::create_dir_all(&mirror).unwrap();
    let (r, _) = c.call_data(
        Request::WriteFile {
            path: "/outdir/planted".into(),
            mode: None,
            parents: false,
            append: false,
        },
        b"x".to_vec(),
    );
    assert!(matches!(r, Ok(Response::Done)), "{r:?}");
    assert!(mirror.join("planted").exists());
    assert!(
        !agent.outside.join("planted").exists(),
        "wrote outside the root"
    );
    // Stat of the symlink itself reports the link, not the host file.
    match c.call(Request::Stat {
        path: "/abs-secret".into(),
    }) {
        Ok(Response::Stat(st)) => assert_eq!(st.kind, FileKind::Symlink),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        std::fs::read_to_string(agent.outside.join("secret")).unwrap(),
        SECRET
    );
}

fn symlink_requests_store_the_target_as_text() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    let symlink = |c: &mut Client, target: &str, path: &str, parents: bool| {
        c.call(Request::Symlink {
            target: target.into(),
            path: path.into(),
            parents,
        })
    };
    // Created with the exact text, parents made on request.
    assert!(matches!(
        symlink(&mut c, "../../../etc/passwd", "/w/deep/up", true),
        Ok(Response::Done)
    ));
    assert_eq!(
        std::fs::read_link(agent.root.join("w/deep/up")).unwrap(),
        std::path::Path::new("../../../etc/passwd")
    );
    match c.call(Request::Stat {
        path: "/w/deep/up".into(),
    }) {
        Ok(Response::Stat(st)) => {
            assert_eq!(st.kind, FileKind::Symlink);
            assert_eq!(st.symlink_target.as_deref(), Some("../../../etc/passwd"));
        }
        other => panic!("{other:?}"),
    }
    // Reading through a link that climbs out stops at the root: the sandbox's passwd.
    let data = read(&mut c, "/w/deep/up").expect("read through the link");
    assert!(String::from_utf8_lossy(&data).contains(PASSWD_MARKER));
    // Absolute targets, even the host path of a file outside, resolve inside the root.
    assert!(matches!(
        symlink(&mut c, "/etc/shadow", "/w/shadow", false),
        Ok(Response::Done)
    ));
    assert_eq!(
        std::fs::read_link(agent.root.join("w/shadow")).unwrap(),
        std::path::Path::new("/etc/shadow")
    );
    assert_eq!(
        read(&mut c, "/w/shadow").unwrap_err().code,
        ErrorCode::NotFound
    );
    let host_secret = agent.outside.join("secret");
    assert!(matches!(
        symlink(&mut c, host_secret.to_str().unwrap(), "/w/secret", false),
        Ok(Response::Done)
    ));
    assert_eq!(
        read(&mut c, "/w/secret").unwrap_err().code,
        ErrorCode::NotFound
    );
    // A write through a link to the host's directory lands inside the root, never outside.
    assert!(matches!(
        symlink(&mut c, agent.outside.to_str().unwrap(), "/w/out", false),
        Ok(Response::Done)
    ));
    let (r, _) = c.call_data(
        Request::WriteFile {
            path: "/w/out/planted".into(),
            mode: None,
            parents: true,
            append: false,
        },
        b"x".to_vec(),
    );
    assert!(r.is_err(), "{r:?}");
    assert!(!agent.outside.join("planted").exists(), "wrote outside");
    // A link whose parent is a link to the outside directory is made inside the root (where
    // that directory does not exist), never next to the secret.
    let err = symlink(&mut c, "x", "/w/out/link", false).unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound, "{err:?}");
    assert!(std::fs::symlink_metadata(agent.outside.join("link")).is_err());
    // An existing name is never replaced or followed, even a dangling link.
    assert!(matches!(
        symlink(&mut c, "nowhere", "/w/dangling", false),
        Ok(Response::Done)
    ));
    for existing in ["/w/dangling", "/w/deep/up", "/w/deep", "/etc/passwd"] {
        let err = symlink(&mut c, "other", existing, false).unwrap_err();
        assert_eq!(err.code, ErrorCode::AlreadyExists, "{existing}: {err:?}");
    }
    assert_eq!(
        std::fs::read_link(agent.root.join("w/dangling")).unwrap(),
        std::path::Path::new("nowhere")
    );
    assert!(agent.root.join("etc/passwd").is_file());
    // Bad requests.
    for (target, path) in [("", "/w/empty"), ("a\0b", "/w/nul"), ("x", "/"), ("x", "")] {
        assert!(
            symlink(&mut c, target, path, false).is_err(),
            "{target:?} at {path:?}"
        );
    }
    assert_eq!(
        symlink(&mut c, "", "/w/empty", false).unwrap_err().code,
        ErrorCode::InvalidArgument
    );
    assert!(std::fs::symlink_metadata(agent.root.join("w/empty")).is_err());
    assert_eq!(
        std::fs::read_to_string(agent.outside.join("secret")).unwrap(),
        SECRET
    );
}

fn remove_does_not_follow_symlinks() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    std::fs::write(agent.outside.join("keep"), "keep").unwrap();
    std::os::unix::fs::symlink(&agent.outside, agent.root.join("evil")).unwrap();
    // A directory inside the root that contains a symlink to the outside directory.
    std::fs::create_dir_all(agent.root.join("tree/deeper")).unwrap();
    std::fs::write(agent.root.join("tree/deeper/file"), "f").unwrap();
    std::os::unix::fs::symlink(&agent.outside, agent.root.join("tree/deeper/evil-inner")).unwrap();

    assert!(matches!(
        c.call(Request::Remove {
            path: "/tree".into(),
            recursive: true
        }),
        Ok(Response::Done)
    ));
    assert!(!agent.root.join("tree").exists());
    assert!(matches!(
        c.call(Request::Remove {
            path: "/evil".into(),
            recursive: true
        }),
        Ok(Response::Done)
    ));
    assert!(
        std::fs::symlink_metadata(agent.root.join("evil")).is_err(),
        "link removed"
    );
    assert!(
        agent.outside.join("keep").exists(),
        "outside contents untouched"
    );
    assert!(
        agent.outside.join("secret").exists(),
        "outside contents untouched"
    );
    // Removing a path through the (now recreated) link resolves inside the root.
    std::os::unix::fs::symlink(&agent.outside, agent.root.join("evil")).unwrap();
    let err = c.call_err(Request::Remove {
        path: "/evil/secret".into(),
        recursive: false,
    });
    assert_eq!(err.code, ErrorCode::NotFound);
    assert!(agent.outside.join("secret").exists());
    // Renaming through it cannot move the outside file either.
    let err = c.call_err(Request::Rename {
        from: "/evil/secret".into(),
        to: "/stolen".into(),
    });
    assert_eq!(err.code, ErrorCode::NotFound);
    assert!(agent.outside.join("secret").exists());
}

fn magic_links_are_refused() {
    let agent = TestAgent::start_with(Options {
        mount_proc: true,
        ..Default::default()
    });
    let mut c = agent.client();
    // /proc is mounted inside the root (in the agent's private mount namespace only); it is
    // not served at all (see `proc_is_not_served`), but magic links are refused before that.
    // /proc/self/root is the agent's real root: following it would escape.
    let secret = agent.outside.join("secret");
    let through_magic = format!("/proc/self/root{}", secret.display());
    let err = read(&mut c, &through_magic).unwrap_err();
    assert_eq!(err.code, ErrorCode::OutsideSandbox, "{}", err.message);
    let err = read(&mut c, "/proc/self/root/etc/hostname").unwrap_err();
    assert_eq!(err.code, ErrorCode::OutsideSandbox);
    // Another process's root: refused, either by the resolver or by /proc's own access check.
    let err = read(&mut c, "/proc/1/root/etc/hostname").unwrap_err();
    assert!(
        matches!(
            err.code,
            ErrorCode::OutsideSandbox | ErrorCode::PermissionDenied
        ),
        "{err:?}"
    );
    // A symlink inside the root pointing at the magic link is refused too.
    std::os::unix::fs::symlink("/proc/self/root", agent.root.join("magic")).unwrap();
    let err = read(&mut c, &format!("/magic{}", secret.display())).unwrap_err();
    assert_eq!(err.code, ErrorCode::OutsideSandbox);
    let err = c.call_err(Request::ListDir {
        path: "/proc/self/cwd".into(),
    });
    assert_eq!(err.code, ErrorCode::OutsideSandbox);
    let (r, _) = c.call_data(
        Request::WriteFile {
            path: format!("/proc/self/root{}", agent.outside.join("planted").display()),
            mode: None,
            parents: false,
            append: false,
        },
        b"x".to_vec(),
    );
    assert_eq!(r.unwrap_err().code, ErrorCode::OutsideSandbox);
    assert!(!agent.outside.join("planted").exists());
    // A real symlink loop is not mistaken for an escape.
    std::os::unix::fs::symlink("loop-b", agent.root.join("loop-a")).unwrap();
    std::os::unix::fs::symlink("loop-a", agent.root.join("loop-b")).unwrap();
    let err = read(&mut c, "/loop-a").unwrap_err();
    assert_eq!(err.code, ErrorCode::Internal);
    assert!(err.message.contains("symbolic links"), "{}", err.message);
}

fn oom_score_adj(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj"))
        .unwrap()
        .trim()
        .to_string()
}

fn proc_is_not_served() {
    let agent = TestAgent::start_with(Options {
        mount_proc: true,
        ..Default::default()
    });
    let mut c = agent.client();
    let refused = |err: openrun_protocol::AgentError, path: &str| {
        assert_eq!(err.code, ErrorCode::PermissionDenied, "{}", err.message);
        assert_eq!(
            err.message,
            format!("{path} is on /proc, which the file API does not serve; run a command instead")
        );
    };
    // /proc/self is the agent: its memory map must not be readable, directly or through a
    // symlink a sandbox process planted.
    std::os::unix::fs::symlink("/proc/self/maps", agent.root.join("maps")).unwrap();
    refused(read(&mut c, "/maps").unwrap_err(), "/maps");
    refused(
        read(&mut c, "/proc/self/maps").unwrap_err(),
        "/proc/self/maps",
    );
    refused(
        read(&mut c, "/proc/self/environ").unwrap_err(),
        "/proc/self/environ",
    );
    for path in ["/proc", "/proc/self/fd", "/proc/self"] {
        refused(c.call_err(Request::ListDir { path: path.into() }), path);
    }
    refused(
        c.call_err(Request::Stat {
            path: "/proc/self/maps".into(),
        }),
        "/proc/self/maps",
    );
    // The mount point itself is an entry of the root's own directory.
    match c.call(Request::Stat {
        path: "/proc".into(),
    }) {
        Ok(Response::Stat(st)) => assert_eq!(st.kind, FileKind::Dir),
        other => panic!("{other:?}"),
    }
    // Writing to the agent's own /proc files (here: its OOM score) is refused.
    std::os::unix::fs::symlink("/proc/self/oom_score_adj", agent.root.join("oom")).unwrap();
    let before = oom_score_adj(agent.pid());
    let write = |c: &mut Client, path: &str, append: bool| {
        c.call_data(
            Request::WriteFile {
                path: path.into(),
                mode: None,
                parents: false,
                append,
            },
            b"900\n".to_vec(),
        )
        .0
    };
    refused(write(&mut c, "/oom", true).unwrap_err(), "/oom");
    refused(
        write(&mut c, "/proc/self/oom_score_adj", false).unwrap_err(),
        "/proc/self/oom_score_adj",
    );
    refused(
        write(&mut c, "/proc/self/oom_score_adj", true).unwrap_err(),
        "/proc/self/oom_score_adj",
    );
    assert_eq!(oom_score_adj(agent.pid()), before);
    // A whole-file write replaces the symlink itself (it is in the root's own directory).
    assert!(matches!(write(&mut c, "/oom", false), Ok(Response::Done)));
    assert_eq!(std::fs::read(agent.root.join("oom")).unwrap(), b"900\n");
    assert_eq!(oom_score_adj(agent.pid()), before);

    // sysfs: reading is harmless, writing is refused.
    if std::path::Path::new("/sys/kernel/uevent_seqnum").exists() {
        let data = read(&mut c, "/sys/kernel/uevent_seqnum").expect("sysfs read");
        assert!(!data.is_empty());
    }
    let (r, _) = c.call_data(
        Request::WriteFile {
            path: "/sys/kernel/openrun-test-file".into(),
            mode: None,
            parents: false,
            append: false,
        },
        b"x".to_vec(),
    );
    let err = r.unwrap_err();
    assert_eq!(err.code, ErrorCode::PermissionDenied);
    assert_eq!(
        err.message,
        "/sys/kernel/openrun-test-file is on /sys, which the file API does not write to; run a \
         command instead"
    );
    let err = c.call_err(Request::Mkdir {
        path: "/sys/kernel/openrun-test-dir".into(),
        parents: false,
        mode: None,
    });
    assert_eq!(err.code, ErrorCode::PermissionDenied);
    assert!(err.message.contains("is on /sys"), "{}", err.message);
    // The connection still works.
    assert!(matches!(c.call(Request::Info), Ok(Response::Info(_))));
}

fn huge_listings_get_a_too_large_answer() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    // ~12,000 entries of ~200-byte names: about 4 MB of JSON, far above the 1 MiB header limit.
    let big = agent.root.join("big");
    std::fs::create_dir(&big).unwrap();
    let long = "n".repeat(190);
    for i in 0..12_000 {
        std::fs::File::create(big.join(format!("{long}-{i:05}"))).unwrap();
    }
    let (r, _) = c
        .try_call(
            Request::ListDir {
                path: "/big".into(),
            },
            vec![],
            Duration::from_secs(30),
        )
        .expect("a huge listing must still be answered");
    let err = r.unwrap_err();
    assert_eq!(err.code, ErrorCode::TooLarge, "{}", err.message);
    assert!(
        err.message
            .starts_with("directory has too many entries to list at once (12000): /big"),
        "{}",
        err.message
    );
    // The connection goes on, and a listing that fits is still served whole.
    let small = agent.root.join("small");
    std::fs::create_dir(&small).unwrap();
    for i in 0..2_000 {
        std::fs::File::create(small.join(format!("{long}-{i:05}"))).unwrap();
    }
    match c.call(Request::ListDir {
        path: "/small".into(),
    }) {
        Ok(Response::Entries { entries }) => {
            assert_eq!(entries.len(), 2_000);
            assert!(entries.windows(2).all(|w| w[0].name < w[1].name));
        }
        other => panic!("{other:?}"),
    }
}

fn oversized_responses_are_still_answered() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    // Each entry's tag fits in a request, but two of them do not fit in one response.
    let mut pids = Vec::new();
    for i in 0..2 {
        let mut req = cmd(&["sleep", "30"]);
        req.tag = Some(format!("{i}{}", "t".repeat(600 * 1024)));
        pids.push(c.exec(req, vec![]));
    }
    let (r, _) = c
        .try_call(Request::ListProcesses, vec![], WAIT)
        .expect("an oversized response must still be answered");
    let err = r.unwrap_err();
    assert_eq!(err.code, ErrorCode::TooLarge, "{}", err.message);
    assert!(
        err.message
            .starts_with("the process table is too large to send at once (2 processes)"),
        "{}",
        err.message
    );
    // One entry at a time still works.
    match c.call(Request::ProcessStatus { pid: pids[0] }) {
        Ok(Response::Process(info)) => assert_eq!(info.pid, pids[0]),
        other => panic!("{other:?}"),
    }
}

fn huge_user_databases_are_refused() {
    let agent = TestAgent::start();
    let mut c = agent.client();
    // A valid passwd, padded beyond the 4 MiB the agent reads: cutting it short could turn a
    // line into a different entry, so the exec is refused instead.
    let mut passwd = String::from("root:x:0:0:root:/root:/bin/sh\n");
    let pad = format!("#{}\n", "p".repeat(1022));
    while passwd.len() <= 4 << 20 {
        passwd.push_str(&pad);
    }
    std::fs::write(agent.root.join("etc/passwd"), &passwd).unwrap();
    let err = c.call(Request::Exec(cmd(&["true"]))).unwrap_err();
    assert_eq!(err.code, ErrorCode::TooLarge, "{}", err.message);
    assert_eq!(
        err.message,
        "/etc/passwd is larger than 4194304 bytes, the most the agent reads of it"
    );
    // Back to a normal size, the same exec works.
    std::fs::write(
        agent.root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\n",
    )
    .unwrap();
    let out = c.run(cmd(&["true"]), vec![]);
    assert_eq!(out.status.code, Some(0));
}

fn shutdown_kills_everything_and_exits() {
    let mut agent = TestAgent::start();
    let mut c = agent.client();
    let sleeper = c.exec(cmd(&["sleep", "60"]), vec![]);
    let out = c.run(sh("setsid sleep 60 & echo $!"), vec![]);
    let detached: i32 = out.stdout_str().trim().parse().expect("pid");
    assert!(proc_state(sleeper).is_some() && proc_state(detached).is_some());
    assert!(matches!(c.call(Request::Shutdown), Ok(Response::Done)));
    let status = agent.wait_exit(WAIT).expect("agent exited");
    assert_eq!(status.code(), Some(0));
    assert!(wait_gone(sleeper, WAIT), "started process killed");
    assert!(
        wait_gone(detached, WAIT),
        "orphan in its own session killed"
    );
}

fn lifetime_deadline_ends_the_agent() {
    let mut agent = TestAgent::start_with(Options {
        lifetime: Some(Duration::from_millis(1500)),
        ..Default::default()
    });
    let mut c = agent.client();
    let sleeper = c.exec(cmd(&["sleep", "60"]), vec![]);
    let started = Instant::now();
    let status = agent.wait_exit(WAIT).expect("agent exited at its deadline");
    assert_eq!(status.code(), Some(0));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(wait_gone(sleeper, WAIT), "process killed at the deadline");
}

fn closing_control_ends_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let control_path = dir.path().join("control.sock");
    let listener = std::os::unix::net::UnixListener::bind(&control_path).unwrap();
    let mut agent = TestAgent::start_with(Options {
        control: Some(control_path),
        ..Default::default()
    });
    let (stream, _) = listener
        .accept()
        .expect("agent connects its control stream");
    let mut control = Client::from_stream(stream);
    // The control stream is served like any connection.
    match control.call(Request::Info) {
        Ok(Response::Info(info)) => assert_eq!(info.sandbox_id, SANDBOX_ID),
        other => panic!("{other:?}"),
    }
    let sleeper = control.exec(cmd(&["sleep", "60"]), vec![]);
    // Other connections do not keep it alive.
    let _other = agent.client();
    assert!(agent.wait_exit(Duration::from_millis(300)).is_none());
    drop(control);
    let status = agent
        .wait_exit(WAIT)
        .expect("agent exited with its control stream");
    assert_eq!(status.code(), Some(0));
    assert!(wait_gone(sleeper, WAIT));
}
