//! Regression tests for escapes found in review: each attack must keep failing.

mod common;
use common::*;
use std::os::unix::process::CommandExt;

#[test]
fn the_host_session_keyring_is_not_inherited() {
    let env = Env::new();
    let desc = format!("openrun-test-secret-{}", std::process::id());
    let desc_c = std::ffi::CString::new(desc.clone()).unwrap();
    let mut cmd = env.cmd(["run", "--", "cat", "/proc/keys"]);
    // In the child, before exec: join a fresh session keyring and put a secret in it, as a
    // host user's login session would hold one.
    // SAFETY: keyctl and add_key are plain syscalls on memory owned by this closure; nothing
    // here allocates or takes locks.
    unsafe {
        cmd.pre_exec(move || {
            if libc::syscall(libc::SYS_keyctl, 1 as libc::c_long, std::ptr::null::<u8>()) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            let payload = b"TOPSECRET";
            let ty = c"user";
            if libc::syscall(
                libc::SYS_add_key,
                ty.as_ptr(),
                desc_c.as_ptr(),
                payload.as_ptr(),
                payload.len(),
                -3 as libc::c_long, // KEY_SPEC_SESSION_KEYRING
            ) == -1
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    assert_ok(&out);
    assert!(
        !stdout(&out).contains(&desc),
        "host key visible: {}",
        stdout(&out)
    );
    // The sandbox joins a session keyring of its own (init.rs), and then cannot look at keys
    // at all: `/proc/keys` is masked and the keyring system calls are refused (attacks.rs).
    assert_eq!(stdout(&out), "", "/proc/keys is not masked");
}

#[test]
fn the_creators_environment_and_command_line_are_wiped_from_pid_1() {
    let env = Env::new();
    let id = env.create(&[]);
    let out = env
        .cmd([
            "exec",
            &id,
            "--",
            "sh",
            "-c",
            "tr '\\0' '\\n' < /proc/1/cmdline | grep -c . ; echo ok",
        ])
        .env("OPENRUN_TEST_HOST_SECRET", "hunter2")
        .output()
        .unwrap();
    assert_ok(&out);
    assert_eq!(stdout(&out), "0\nok\n");
    // The agent of a sandbox created with a secret in its environment holds none of it.
    let id2 = {
        let out = env
            .cmd(["create"])
            .env("OPENRUN_TEST_HOST_SECRET", "hunter2")
            .output()
            .unwrap();
        assert_ok(&out);
        stdout(&out).trim().to_string()
    };
    let pid = env.inspect(&id2)["pid"].as_i64().unwrap();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(!String::from_utf8_lossy(&environ).contains("hunter2"));
    assert!(environ.iter().all(|b| *b == 0), "environment not wiped");
}

#[test]
fn a_hostile_rootfs_cannot_make_the_init_write_on_the_host() {
    let env = Env::new();
    let rootfs = tempfile::tempdir_in("/tmp").unwrap();
    let target = tempfile::tempdir_in("/tmp").unwrap();
    std::os::unix::fs::symlink(target.path(), rootfs.path().join("etc")).unwrap();
    let out = env.output([
        "run",
        "--rootfs",
        rootfs.path().to_str().unwrap(),
        "--",
        "/nothing",
    ]);
    // The command does not exist in this empty rootfs; what matters is the host dir.
    assert_eq!(out.status.code(), Some(127), "{}", stderr(&out));
    let planted: Vec<_> = std::fs::read_dir(target.path()).unwrap().collect();
    assert!(
        planted.is_empty(),
        "the init wrote through the image's /etc symlink"
    );
}

#[test]
fn a_memory_layer_is_the_sandbox_s_own_and_bounded() {
    let env = Env::new();
    let before = rustix::fs::statvfs("/run/openrun").unwrap();
    // Writing 64 MiB into /etc/hosts (bound from the layer) of a 32 MiB sandbox: the tmpfs
    // is full, or the pages charged to the sandbox get it OOM-killed; never the host's tmpfs.
    let out = env.output([
        "run",
        "--memory",
        "32M",
        "--",
        "sh",
        "-c",
        "head -c 64M /dev/zero > /etc/hosts",
    ]);
    assert_ne!(
        out.status.code(),
        Some(0),
        "a 64 MiB write fit in a 32 MiB sandbox"
    );
    let after = rustix::fs::statvfs("/run/openrun").unwrap();
    let grown = (before.f_bfree.saturating_sub(after.f_bfree)) * before.f_frsize;
    assert!(
        grown < 8 << 20,
        "the shared runtime tmpfs grew by {grown} bytes"
    );
    assert_eq!(env.sh("echo still fine"), "still fine\n");
}

#[test]
fn the_agent_has_no_controlling_terminal_of_the_host() {
    let env = Env::new();
    // `script` gives the openrun process a terminal; the sandbox's pid 1 must not keep it.
    let cmdline = format!(
        "{} --data-dir {} run -- cut -d' ' -f7 /proc/1/stat",
        env!("CARGO_BIN_EXE_openrun"),
        env.data_dir().display()
    );
    let out = std::process::Command::new("script")
        .args(["-qec", &cmdline, "/dev/null"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out).trim(),
        "0",
        "pid 1 has tty_nr {}",
        stdout(&out)
    );
}

#[test]
fn sandboxes_get_a_pids_limit_by_default() {
    let env = Env::new();
    let id = env.create(&[]);
    let max = std::fs::read_to_string(cgroup_dir("pids", &id).join("pids.max")).unwrap();
    assert_eq!(max.trim(), "4096");
}

#[test]
fn a_very_deep_tree_in_a_disk_layer_is_still_removed() {
    let env = Env::new();
    let id = env.create(&[]);
    // Deeper than a recursive walk has descriptors for (the test's limit is lowered below).
    let out = env.output([
        "exec", &id, "--", "sh", "-c",
        "cd /root && i=0; while [ $i -lt 1500 ]; do mkdir d && cd d || exit 1; i=$((i+1)); done; echo built",
    ]);
    assert_ok(&out);
    let layer = env.layer_dir(&id);
    let mut rm = env.cmd(["rm", &id]);
    // SAFETY: setrlimit is a plain syscall on a local struct.
    unsafe {
        use std::os::unix::process::CommandExt;
        rm.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 256,
                rlim_max: 256,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = rm.output().unwrap();
    assert_ok(&out);
    assert!(!layer.exists(), "the deep layer was left behind");
}
