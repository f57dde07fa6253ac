//! Tests against the real kernel: they need root and a cgroup layout (v1 or v2) and fail,
//! rather than skip, without them.

use std::{
    io::Write,
    ops::Deref,
    os::unix::process::ExitStatusExt,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use super::*;

const MIB: u64 = 1 << 20;

fn manager() -> CgroupManager {
    CgroupManager::detect().expect("detect the cgroup layout")
}

/// A name no other test (or test run) uses: `test-<pid>-<tag>-<n>`.
fn unique_name(tag: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("test-{}-{tag}-{n}", std::process::id())
}

/// A cgroup that is emptied and removed when dropped, even when the test fails.
struct Scoped(Cgroup);

impl Drop for Scoped {
    fn drop(&mut self) {
        let _ = self.0.kill_all();
        let _ = self.0.remove();
    }
}

impl Deref for Scoped {
    type Target = Cgroup;
    fn deref(&self) -> &Cgroup {
        &self.0
    }
}

fn create(tag: &str, limits: Limits) -> Scoped {
    let name = unique_name(tag);
    Scoped(manager().create(&name, &limits).expect("create cgroup"))
}

/// A child process that is killed and reaped when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn spawn(command: &mut Command) -> Self {
        Self(command.spawn().expect("spawn child"))
    }

    /// `sh -c script` that waits for a line on stdin first, so it can be moved into a cgroup
    /// before it forks anything.
    fn gated(script: &str) -> Self {
        Self::spawn(
            Command::new("sh")
                .arg("-c")
                .arg(format!("read x; {script}"))
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
        )
    }

    fn pid(&self) -> i32 {
        self.0.id() as i32
    }

    /// Lets a gated script run.
    fn release(&mut self) {
        let mut stdin = self.0.stdin.take().expect("gated child has stdin");
        stdin.write_all(b"go\n").expect("release gated child");
    }
}

/// A control file of `cgroup`: on v1 in the hierarchy of `controller`.
fn control_file(cgroup: &Cgroup, controller: &str, file: &str) -> PathBuf {
    match &cgroup.dirs {
        Dirs::V2(dir) => dir.join(file),
        Dirs::V1(d) => match controller {
            "memory" => d.memory.join(file),
            "pids" => d.pids.join(file),
            "cpu" => d.cpu.join(file),
            "freezer" => d.freezer.join(file),
            other => panic!("no {other} hierarchy"),
        },
    }
}

fn read_control(cgroup: &Cgroup, controller: &str, file: &str) -> String {
    let path = control_file(cgroup, controller, file);
    fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .trim()
        .to_owned()
}

#[test]
fn detects_the_host_layout() {
    // Independent of the mount-table parsing: a v1 memory hierarchy at the usual place means
    // a hybrid or v1 host (this project's machines and CI), whose v2 tree lacks memory.
    let expected = if Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists() {
        CgroupVersion::V1
    } else {
        CgroupVersion::V2
    };
    assert_eq!(manager().version(), expected);
}

#[test]
fn create_writes_the_limits() {
    let limits = Limits {
        memory_bytes: Some(64 * MIB),
        cpu_millis: Some(1500),
        pids: Some(32),
        ..Limits::default()
    };
    let cg = create("limits", limits);
    assert_eq!(read_control(&cg, "pids", "pids.max"), "32");
    match manager().version() {
        CgroupVersion::V1 => {
            let memory = read_control(&cg, "memory", "memory.limit_in_bytes");
            assert_eq!(memory, (64 * MIB).to_string());
            if control_file(&cg, "memory", "memory.memsw.limit_in_bytes").exists() {
                let memsw = read_control(&cg, "memory", "memory.memsw.limit_in_bytes");
                assert_eq!(memsw, (64 * MIB).to_string());
            }
            assert_eq!(read_control(&cg, "cpu", "cpu.cfs_period_us"), "100000");
            assert_eq!(read_control(&cg, "cpu", "cpu.cfs_quota_us"), "150000");
        }
        CgroupVersion::V2 => {
            assert_eq!(
                read_control(&cg, "memory", "memory.max"),
                (64 * MIB).to_string()
            );
            if control_file(&cg, "memory", "memory.swap.max").exists() {
                assert_eq!(read_control(&cg, "memory", "memory.swap.max"), "0");
            }
            assert_eq!(read_control(&cg, "cpu", "cpu.max"), "150000 100000");
        }
    }
}

#[test]
fn unset_limits_keep_the_kernel_defaults() {
    let cg = create("nolimits", Limits::default());
    assert_eq!(read_control(&cg, "pids", "pids.max"), "max");
    match manager().version() {
        CgroupVersion::V1 => {
            let memory: u64 = read_control(&cg, "memory", "memory.limit_in_bytes")
                .parse()
                .unwrap();
            assert!(
                memory >= 1 << 62,
                "memory limit {memory} should be unlimited"
            );
            assert_eq!(read_control(&cg, "cpu", "cpu.cfs_quota_us"), "-1");
        }
        CgroupVersion::V2 => {
            assert_eq!(read_control(&cg, "memory", "memory.max"), "max");
            assert!(read_control(&cg, "cpu", "cpu.max").starts_with("max "));
        }
    }
}

#[test]
fn invalid_names_and_limits_are_rejected_before_anything_is_made() {
    let manager = manager();
    let too_long = "a".repeat(MAX_NAME_LEN + 1);
    for name in [
        "", ".", "..", "../x", "a/b", "/abs", "A", "a b", "a_b", "a.b", "é", "a\0b", &too_long,
    ] {
        let err = manager.create(name, &Limits::default()).unwrap_err();
        assert!(
            matches!(&err, CgroupError::InvalidName(n) if n == name),
            "{name:?}: {err}"
        );
        assert!(manager.open(name).is_none(), "{name:?}");
    }
    assert_eq!(
        manager
            .create("a/b", &Limits::default())
            .unwrap_err()
            .to_string(),
        r#"invalid sandbox cgroup name "a/b": expected 1 to 64 characters from a-z, 0-9 and -"#
    );
    assert!(validate_name(&"a".repeat(MAX_NAME_LEN)).is_ok());
    assert!(validate_name("0-sandbox-9").is_ok());

    let name = unique_name("badlimits");
    let tiny = Limits {
        memory_bytes: Some(MIB),
        ..Limits::default()
    };
    let err = manager.create(&name, &tiny).unwrap_err();
    assert!(matches!(err, CgroupError::Limits(_)), "{err}");
    assert!(manager.open(&name).is_none());
}

#[test]
fn existing_cgroup_is_an_error_and_partial_creation_is_undone() {
    let manager = manager();
    let name = unique_name("exists");
    let planned = manager.dirs(&name);
    let planned = Cgroup {
        name: name.clone(),
        dirs: planned,
    };
    let paths: Vec<PathBuf> = planned.paths().iter().map(|p| p.to_path_buf()).collect();
    // Make the last directory exist already: creation must fail on it after having made the
    // others (on v1), and must then remove those but not the one it did not make.
    let last = paths.last().unwrap();
    fs::create_dir_all(last).unwrap();
    let result = manager.create(&name, &Limits::default());
    let exists = last.is_dir();
    let others_left: Vec<&PathBuf> = paths[..paths.len() - 1]
        .iter()
        .filter(|p| p.exists())
        .collect();
    fs::remove_dir(last).unwrap();

    match result {
        Err(CgroupError::AlreadyExists(path)) => assert_eq!(&path, last),
        other => panic!("expected AlreadyExists, got {other:?}"),
    }
    assert!(exists, "the pre-existing cgroup was removed");
    assert!(others_left.is_empty(), "left behind: {others_left:?}");
}

#[test]
fn add_process_moves_a_real_process() {
    let cg = create("procs", Limits::default());
    let child = Proc::spawn(Command::new("sleep").arg("30"));
    cg.add_process(child.pid()).unwrap();

    assert_eq!(cg.procs().unwrap(), vec![child.pid()]);
    assert_eq!(cg.pids_current().unwrap(), 1);

    // The kernel's view of the child: /proc/<pid>/cgroup names our cgroup for every needed
    // controller (v1) or the unified hierarchy (v2).
    let expected = format!("/{PARENT}/{}", cg.name());
    let membership = fs::read_to_string(format!("/proc/{}/cgroup", child.pid())).unwrap();
    let path_of = |wanted: &str| {
        membership.lines().find_map(|line| {
            let mut fields = line.splitn(3, ':');
            let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
            let matches = match wanted {
                "" => controllers.is_empty(),
                c => controllers.split(',').any(|x| x == c),
            };
            matches.then(|| path.to_owned())
        })
    };
    let controllers: &[&str] = match manager().version() {
        CgroupVersion::V1 => &v1::CONTROLLERS,
        CgroupVersion::V2 => &[""],
    };
    for controller in controllers {
        assert_eq!(
            path_of(controller).as_deref(),
            Some(expected.as_str()),
            "{controller}: {membership}"
        );
    }
}

#[test]
fn add_process_reports_the_file_and_the_cause() {
    let cg = create("nopid", Limits::default());
    // Pid 4194304 is above the kernel's maximum pid, so it never exists.
    let err = cg.add_process(4_194_304).unwrap_err();
    let CgroupError::Write { path, source } = &err else {
        panic!("expected a write error, got {err:?}");
    };
    assert!(path.ends_with("cgroup.procs"), "{}", path.display());
    assert_eq!(source.raw_os_error(), Some(libc::ESRCH));
    assert_eq!(
        err.to_string(),
        format!("cannot write {}: no such process", path.display())
    );
}

#[test]
fn memory_limit_oom_kills_a_hog() {
    let cg = create(
        "oom",
        Limits {
            memory_bytes: Some(16 * MIB),
            ..Limits::default()
        },
    );
    assert_eq!(cg.oom_kills().unwrap(), 0);
    // `tail` keeps its whole input when it holds no newline: feeding it 200 MiB makes it try
    // to hold 200 MiB. It is moved into the cgroup before it has read (and allocated) anything.
    let mut hog = Proc::spawn(
        Command::new("tail")
            .stdin(Stdio::piped())
            .stdout(Stdio::null()),
    );
    cg.add_process(hog.pid()).unwrap();
    let mut stdin = hog.0.stdin.take().unwrap();
    let chunk = vec![b'x'; MIB as usize];
    for _ in 0..200 {
        if stdin.write_all(&chunk).is_err() {
            break; // the reader died: EPIPE
        }
    }
    drop(stdin);
    let status = hog.0.wait().unwrap();

    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    assert!(cg.oom_kills().unwrap() >= 1);
    let peak = cg.memory_peak_or_usage().unwrap();
    assert!(
        (8 * MIB..=16 * MIB).contains(&peak),
        "peak {peak} should be near the 16 MiB limit"
    );
}

#[test]
fn pids_limit_stops_a_fork_loop() {
    let cg = create(
        "pids",
        Limits {
            pids: Some(16),
            ..Limits::default()
        },
    );
    let mut child = Proc::gated("for i in $(seq 100); do sleep 5 2>/dev/null & done; wait");
    cg.add_process(child.pid()).unwrap();
    child.release();
    let mut stderr = String::new();
    let mut pipe = child.0.stderr.take().unwrap();
    std::io::Read::read_to_string(&mut pipe, &mut stderr).unwrap();
    let status = child.0.wait().unwrap();

    assert!(!status.success(), "the loop should fail: {stderr}");
    assert!(stderr.contains("fork"), "fork should fail: {stderr}");
    let current = cg.pids_current().unwrap();
    assert!(
        (1..=16).contains(&current),
        "{current} processes should be left in the cgroup"
    );
    let refused = keyed(&control_file(&cg, "pids", "pids.events"), "max").unwrap();
    assert!(refused >= 1, "pids.events should count refused forks");
}

#[test]
fn cpu_limit_throttles_a_busy_loop() {
    let cg = create(
        "cpu",
        Limits {
            cpu_millis: Some(100),
            ..Limits::default()
        },
    );
    let mut child = Proc::gated("while :; do :; done");
    cg.add_process(child.pid()).unwrap();
    child.release();
    thread::sleep(Duration::from_secs(1));

    // utime + stime (fields 14 and 15 of /proc/<pid>/stat, counted after the `(comm)`).
    let stat = fs::read_to_string(format!("/proc/{}/stat", child.pid())).unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<u64> = after_comm
        .split(' ')
        .skip(11)
        .take(2)
        .map(|f| f.parse().unwrap())
        .collect();
    let ticks = rustix::param::clock_ticks_per_second();
    let cpu_secs = (fields[0] + fields[1]) as f64 / ticks as f64;
    // 0.1 CPUs for 1 s of wall time: about 0.1 s; unlimited it would be about 1 s.
    assert!(
        (0.02..=0.3).contains(&cpu_secs),
        "the busy loop used {cpu_secs} s of cpu in 1 s"
    );
    let throttled = keyed(&control_file(&cg, "cpu", "cpu.stat"), "nr_throttled").unwrap();
    assert!(throttled >= 1, "cpu.stat should count throttled periods");
}

#[test]
fn freeze_stops_processes_and_thaw_resumes_them() {
    let cg = create("freeze", Limits::default());
    let mut child = Proc::spawn(Command::new("sleep").arg("0.3"));
    cg.add_process(child.pid()).unwrap();

    cg.freeze().unwrap();
    let frozen = match manager().version() {
        CgroupVersion::V1 => read_control(&cg, "freezer", "freezer.state") == "FROZEN",
        CgroupVersion::V2 => keyed(&control_file(&cg, "", "cgroup.events"), "frozen").unwrap() == 1,
    };
    assert!(frozen, "the kernel should report the cgroup frozen");
    assert!(cg.is_frozen().unwrap());
    // A 0.3 s sleep cannot finish while frozen.
    thread::sleep(Duration::from_millis(600));
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "a frozen process exited"
    );
    cg.freeze().unwrap(); // freezing a frozen cgroup is fine

    cg.thaw().unwrap();
    assert!(!cg.is_frozen().unwrap());
    let status = child.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
    if manager().version() == CgroupVersion::V1 {
        assert_eq!(read_control(&cg, "freezer", "freezer.state"), "THAWED");
    }
}

#[test]
fn a_frozen_cgroup_is_killed_and_removed() {
    let cg = create("frozen-kill", Limits::default());
    let mut child = Proc::gated("sleep 100 & exec sleep 100");
    cg.add_process(child.pid()).unwrap();
    child.release();
    assert!(wait_until(Duration::from_secs(2), || Ok(cg.procs()?.len() == 2)).unwrap());
    cg.freeze().unwrap();
    cg.kill_all().unwrap();
    assert!(cg.procs().unwrap().is_empty());
    assert!(
        !cg.is_frozen().unwrap(),
        "kill_all leaves the cgroup thawed"
    );
    let status = child.0.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "{status:?}");
    cg.remove().unwrap();
    assert!(!cg.is_frozen().unwrap(), "a removed cgroup is not frozen");
}

/// Whether `pid` is gone or a zombie (dead, waiting to be reaped).
fn is_dead(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat[stat.rfind(')').unwrap() + 2..].starts_with('Z'),
        Err(_) => true,
    }
}

/// A gated shell whose two background sleeps become orphans when it execs the third sleep;
/// returns it once all three are in the cgroup.
fn three_sleeps(cg: &Cgroup) -> (Proc, Vec<i32>) {
    let mut child = Proc::gated("sleep 100 & sleep 100 & exec sleep 100");
    cg.add_process(child.pid()).unwrap();
    child.release();
    let three = wait_until(WAIT, || Ok(cg.procs()?.len() == 3)).unwrap();
    assert!(three, "expected 3 processes, got {:?}", cg.procs());
    let pids = cg.procs().unwrap();
    (child, pids)
}

#[test]
fn kill_all_empties_the_cgroup_including_orphans() {
    let cg = create("killall", Limits::default());
    let (mut child, pids) = three_sleeps(&cg);

    cg.kill_all().unwrap();
    assert_eq!(cg.procs().unwrap(), Vec::<i32>::new());
    for pid in pids {
        assert!(is_dead(pid), "process {pid} survived kill_all");
    }
    let status = child.0.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    cg.kill_all().unwrap(); // nothing left to kill is fine

    // The cgroup is usable afterwards (not left frozen): a new process runs to completion.
    let mut next = Proc::gated("exit 7");
    cg.add_process(next.pid()).unwrap();
    next.release();
    assert_eq!(next.0.wait().unwrap().code(), Some(7));
}

#[test]
fn kill_all_stops_a_fork_bomb() {
    let cg = create(
        "bomb",
        Limits {
            pids: Some(64),
            ..Limits::default()
        },
    );
    // Every process forks two more, forever; the pids limit keeps it at 64.
    let mut child = Proc::gated("b() { b 2>/dev/null & b 2>/dev/null & wait; }; b");
    cg.add_process(child.pid()).unwrap();
    child.release();
    let busy = wait_until(WAIT, || Ok(cg.pids_current()? >= 32)).unwrap();
    assert!(busy, "the bomb did not start: {:?}", cg.pids_current());

    cg.kill_all().unwrap();
    assert_eq!(cg.procs().unwrap(), Vec::<i32>::new());
    assert_eq!(child.0.wait().unwrap().signal(), Some(libc::SIGKILL));
}

#[test]
fn remove_right_after_kill_all_succeeds() {
    let cg = create("killrm", Limits::default());
    // The killed processes may still be unreaped zombies when remove runs: rmdir must not
    // wait for their parents to reap them.
    let (_child, _) = three_sleeps(&cg);
    cg.kill_all().unwrap();
    cg.remove().unwrap();
    assert!(cg.paths().iter().all(|p| !p.exists()));
}

#[test]
fn remove_is_idempotent_and_list_tracks_names() {
    let manager = manager();
    let (a, b) = (unique_name("list"), unique_name("list"));
    let cg_a = Scoped(manager.create(&a, &Limits::default()).unwrap());
    let cg_b = Scoped(manager.create(&b, &Limits::default()).unwrap());
    let listed = manager.list().unwrap();
    assert!(listed.contains(&a) && listed.contains(&b), "{listed:?}");
    assert_eq!(
        manager.open(&a).map(|c| c.name().to_owned()),
        Some(a.clone())
    );

    cg_a.remove().unwrap();
    cg_a.remove().unwrap();
    assert_eq!(cg_a.procs().unwrap(), Vec::<i32>::new());
    cg_a.kill_all().unwrap();
    assert!(cg_a.paths().iter().all(|p| !p.exists()));
    assert!(manager.open(&a).is_none());
    let listed = manager.list().unwrap();
    assert!(!listed.contains(&a) && listed.contains(&b), "{listed:?}");

    cg_b.remove().unwrap();
    assert!(!manager.list().unwrap().contains(&b));
}

#[test]
fn remove_refuses_a_populated_cgroup() {
    let cg = create("busy", Limits::default());
    let child = Proc::spawn(Command::new("sleep").arg("30"));
    cg.add_process(child.pid()).unwrap();

    let err = cg.remove().unwrap_err();
    let CgroupError::Remove { source, .. } = &err else {
        panic!("expected a remove error, got {err:?}");
    };
    assert_eq!(source.kind(), io::ErrorKind::ResourceBusy);
    assert_eq!(
        cg.procs().unwrap(),
        vec![child.pid()],
        "remove must not kill"
    );
    drop(child);
    cg.remove().unwrap();
}

#[test]
fn remove_if_empty_leaves_a_populated_cgroup_and_removes_an_empty_one() {
    let cg = create("ifempty", Limits::default());
    let child = Proc::spawn(Command::new("sleep").arg("30"));
    cg.add_process(child.pid()).unwrap();

    assert!(!cg.remove_if_empty(), "a cgroup with a task is not empty");
    assert_eq!(cg.procs().unwrap(), vec![child.pid()], "nothing is killed");
    assert!(cg.paths().iter().any(|p| p.exists()));
    drop(child);
    cg.kill_all().unwrap();
    assert!(cg.remove_if_empty());
    assert!(cg.paths().iter().all(|p| !p.exists()));
    assert!(cg.remove_if_empty(), "already removed is removed");
}

#[test]
fn os_errors_read_in_the_crate_style() {
    let denied = io::Error::from_raw_os_error(libc::EACCES);
    assert_eq!(describe(&denied), "permission denied");
    let custom = io::Error::other("Odd (thing)");
    assert_eq!(describe(&custom), "odd (thing)");
    let err = CgroupError::Write {
        path: "/sys/fs/cgroup/memory/openrun/x/memory.limit_in_bytes".into(),
        source: denied,
    };
    assert_eq!(
        err.to_string(),
        "cannot write /sys/fs/cgroup/memory/openrun/x/memory.limit_in_bytes: permission denied"
    );
}

#[test]
fn keyed_files_match_whole_keys() {
    let dir = std::env::temp_dir().join(unique_name("keyed"));
    fs::create_dir(&dir).unwrap();
    let path = dir.join("memory.oom_control");
    fs::write(&path, "oom_kill_disable 1\nunder_oom 0\noom_kill 3\n").unwrap();
    let found = keyed(&path, "oom_kill");
    let missing = keyed(&path, "oom");
    fs::remove_dir_all(&dir).unwrap();

    assert_eq!(found.unwrap(), 3);
    assert!(matches!(missing, Err(CgroupError::Malformed { .. })));
}
