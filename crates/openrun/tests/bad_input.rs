//! Bad input gets one clear line, a non-zero exit code, and leaves nothing behind.

mod common;
use common::*;

fn assert_clean(env: &Env) {
    assert_eq!(
        env.leftovers(),
        Vec::<std::path::PathBuf>::new(),
        "a failed create left files"
    );
}

#[test]
fn a_missing_rootfs_is_named() {
    let env = Env::new();
    let before = openrun_cgroups();
    let out = env.output(["run", "--rootfs", "/nonexistent/rootfs", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("/nonexistent/rootfs") && err.contains("not found"),
        "{err}"
    );
    assert_clean(&env);
    assert_eq!(openrun_cgroups(), before);
}

#[test]
fn an_unknown_image_is_named() {
    let env = Env::new();
    let out = env.output(["run", "--image", "nosuch", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        stderr(&out).contains("\"nosuch\" not found"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bad_limit_syntax_is_named() {
    let env = Env::new();
    for (flag, value) in [
        ("--memory", "12Q"),
        ("--cpus", "-1"),
        ("--pids", "many"),
        ("--timeout", "soon"),
    ] {
        let out = env.output(["run", flag, value, "--", "true"]);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}");
        let err = stderr(&out);
        assert!(err.contains(value) && err.contains(flag), "{flag}: {err}");
    }
    assert_clean(&env);
}

#[test]
fn an_unwritable_data_dir_is_named() {
    let file = tempfile::NamedTempFile::new_in("/tmp").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_openrun"))
        .args(["--data-dir"])
        .arg(file.path())
        .args(["run", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    let err = stderr(&out);
    assert!(
        err.contains(&file.path().display().to_string()) && err.contains("--data-dir"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn a_rootfs_that_is_a_file_is_named() {
    let env = Env::new();
    let file = tempfile::NamedTempFile::new_in("/tmp").unwrap();
    let out = env.output([
        "run",
        "--rootfs",
        file.path().to_str().unwrap(),
        "--",
        "true",
    ]);
    assert_eq!(out.status.code(), Some(125));
    assert!(stderr(&out).contains("not a directory"), "{}", stderr(&out));
    assert_clean(&env);
}

#[test]
fn a_run_whose_setup_fails_leaves_nothing_behind() {
    let env = Env::new();
    // The init cannot bind the sandbox's /etc/hostname over a directory: it fails after the
    // host has handed it its layers, when `run` has already started the sandbox's cleaner.
    let rootfs = tempfile::tempdir_in("/tmp").unwrap();
    std::fs::create_dir_all(rootfs.path().join("etc/hostname")).unwrap();
    let out = env.output([
        "run",
        "--rootfs",
        rootfs.path().to_str().unwrap(),
        "--",
        "/true",
    ]);
    assert_eq!(out.status.code(), Some(125));
    let err = stderr(&out);
    assert!(err.contains("binding /etc files"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_clean(&env);
    // The cleaner heard that the sandbox was never made, and left it to the failed create.
    let start = std::time::Instant::now();
    while !env.processes_naming_data_dir().is_empty() {
        assert!(
            start.elapsed().as_secs() < 5,
            "processes left: {:?}",
            env.processes_naming_data_dir()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_clean(&env);
    // The data dir still works.
    assert_eq!(env.sh("echo ok").trim(), "ok");
}

#[test]
fn a_private_data_dir_is_opened_up_and_a_private_parent_is_named() {
    use std::os::unix::fs::PermissionsExt;
    let parent = tempfile::tempdir_in("/tmp").unwrap();
    std::fs::set_permissions(parent.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let data = parent.path().join("d");
    let run = |dir: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_openrun"))
            .arg("--data-dir")
            .arg(dir)
            .args(["run", "--", "true"])
            .output()
            .unwrap()
    };
    let out = run(&data);
    assert_eq!(out.status.code(), Some(125));
    let err = stderr(&out);
    assert!(
        err.contains(&parent.path().display().to_string()) && err.contains("not searchable"),
        "{err}"
    );
    // A 0700 data dir of its own is fine: openrun adds search permission for the sandboxes.
    std::fs::set_permissions(parent.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    let out = run(&data);
    assert!(out.status.success(), "{}", stderr(&out));
}
