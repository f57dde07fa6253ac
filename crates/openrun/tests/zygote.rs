//! `Runtime::create_with_helper` goes through one persistent create helper (the zygote):
//! concurrent creates share it, agents land in the caller (a subreaper), not in the zygote,
//! no sandbox inherits the zygote's control socket or a create's request socket, a zygote
//! found dead is replaced, and dropping the runtime ends it. (Alone in its test binary: it
//! makes this process a subreaper and looks at its children.)

mod common;
use common::*;

use openrun_runtime::{ImageSource, Runtime, SandboxSpec};

fn helper() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_BIN_EXE_openrun"))
}

/// This process's live children running `__create --serve`.
fn zygotes() -> Vec<i32> {
    let mut pids = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        pids.extend(
            children
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok()),
        );
    }
    pids.retain(|pid| {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = state
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
        !zombie && args.contains(&&b"__create"[..]) && args.contains(&&b"--serve"[..])
    });
    pids
}

/// `readlink` of every descriptor of `pid`: (fd, target).
fn descriptors(pid: i32) -> Vec<(i32, String)> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let fd = e.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            Some((fd, target.to_string_lossy().into_owned()))
        })
        .collect()
}

fn parent_of(pid: i32) -> i32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|p| p.trim().parse().ok())
        .unwrap()
}

fn reap(pid: i32) {
    // SAFETY: waitpid on one pid with a valid status pointer.
    unsafe {
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
    }
}

#[test]
fn creates_go_through_one_zygote_that_leaks_nothing_into_sandboxes() {
    let env = Env::new();
    // Like the server: agents whose creator exits are reparented to us.
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) takes no pointers.
    let subreaper = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(subreaper, 0);
    let runtime = Runtime::open(env.data_dir()).unwrap();
    let spec = SandboxSpec::new(ImageSource::Host);
    // Concurrent creates share one zygote (several workers at once).
    let sandboxes: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|_| s.spawn(|| runtime.create_with_helper(&spec, helper()).unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let zygote = zygotes();
    assert_eq!(zygote.len(), 1, "zygotes: {zygote:?}");
    let zygote = zygote[0];
    let control = descriptors(zygote)
        .into_iter()
        .find(|(fd, _)| *fd == 0)
        .map(|(_, target)| target)
        .unwrap();
    assert!(control.starts_with("socket:"), "zygote stdin: {control}");
    let me = std::process::id() as i32;
    for sandbox in &sandboxes {
        let agent = sandbox.record().pid;
        // The worker exited before the create returned: the agent is ours, not the zygote's.
        assert_eq!(parent_of(agent), me, "agent {agent}'s parent");
        for (fd, target) in descriptors(agent) {
            assert_ne!(
                target, control,
                "agent {agent} holds the zygote's control socket"
            );
            // The worker had its request socket on stdin and stdout only.
            if fd <= 2 {
                assert!(
                    !target.starts_with("socket:"),
                    "agent {agent} fd {fd} is {target}"
                );
            }
        }
    }
    // Only its control socket and stdio: nothing of the creates is left in the zygote.
    // (It closes a create's socket and pidfd just after writing `DONE`.)
    let mut open = Vec::new();
    for _ in 0..100 {
        open = descriptors(zygote).into_iter().map(|(fd, _)| fd).collect();
        open.sort();
        if open == [0, 1, 2] {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(open, vec![0, 1, 2], "zygote descriptors");
    for sandbox in sandboxes {
        let agent = sandbox.record().pid;
        runtime.destroy(sandbox).unwrap();
        reap(agent);
    }

    // A dead zygote is replaced by the next create, which succeeds.
    // SAFETY: kill takes no pointers.
    unsafe { libc::kill(zygote, libc::SIGKILL) };
    let sandbox = runtime.create_with_helper(&spec, helper()).unwrap();
    let fresh = zygotes();
    assert_eq!(fresh.len(), 1, "zygotes: {fresh:?}");
    assert_ne!(fresh[0], zygote);
    let agent = sandbox.record().pid;
    assert_eq!(parent_of(agent), me);
    runtime.destroy(sandbox).unwrap();
    reap(agent);
    // The killed zygote was reaped when it was replaced.
    assert!(!std::path::Path::new(&format!("/proc/{zygote}")).exists());

    // Dropping the runtime ends the zygote (EOF on its control socket) and reaps it.
    drop(runtime);
    assert!(!std::path::Path::new(&format!("/proc/{}", fresh[0])).exists());
    assert_eq!(env.leftovers(), Vec::<std::path::PathBuf>::new());
}
