use super::*;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};

fn whiteout(path: &Path) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        FileType::CharacterDevice,
        Mode::empty(),
        rustix::fs::makedev(0, 0),
    )
    .unwrap();
}

fn opaque(path: &Path) {
    rustix::fs::setxattr(path, OPAQUE_XATTR, b"y", rustix::fs::XattrFlags::empty()).unwrap();
}

/// A lower with a few files and an upper that adds, modifies, deletes and replaces some.
fn layers() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let lower = tmp.path().join("lower");
    let upper = tmp.path().join("upper");
    for d in ["etc", "keep", "gone", "opq", "work"] {
        fs::create_dir_all(lower.join(d)).unwrap();
    }
    fs::write(lower.join("etc/conf"), "a\nb\nc\n").unwrap();
    fs::write(lower.join("etc/same"), "same\n").unwrap();
    fs::write(lower.join("etc/bin"), b"\0\x01\x02").unwrap();
    fs::write(lower.join("keep/x"), "x\n").unwrap();
    fs::write(lower.join("gone/one"), "1\n").unwrap();
    fs::write(lower.join("gone/two"), "2\n").unwrap();
    fs::write(lower.join("opq/old"), "old\n").unwrap();
    fs::write(lower.join("work/mode"), "m\n").unwrap();
    fs::create_dir_all(upper.join("etc")).unwrap();
    fs::create_dir_all(upper.join("opq")).unwrap();
    fs::create_dir_all(upper.join("new/deep")).unwrap();
    fs::create_dir_all(upper.join("work")).unwrap();
    fs::write(upper.join("etc/conf"), "a\nB\nc\n").unwrap();
    // Copied up, unchanged.
    fs::write(upper.join("etc/same"), "same\n").unwrap();
    fs::write(upper.join("etc/bin"), b"\0\x01\x03").unwrap();
    whiteout(&upper.join("gone"));
    opaque(&upper.join("opq"));
    fs::write(upper.join("opq/new"), "new\n").unwrap();
    fs::write(upper.join("new/deep/file"), "hello\n").unwrap();
    symlink("/etc/shadow", upper.join("new/link")).unwrap();
    fs::write(upper.join("work/mode"), "m\n").unwrap();
    fs::set_permissions(upper.join("work/mode"), fs::Permissions::from_mode(0o755)).unwrap();
    (tmp, lower, upper)
}

fn root(layers: Vec<PathBuf>) -> Vec<Overlay> {
    vec![Overlay {
        target: "/".into(),
        layers,
    }]
}

fn kinds(report: &DiffReport) -> Vec<(String, ChangeKind)> {
    report
        .changes
        .iter()
        .map(|c| (c.path.clone(), c.kind))
        .collect()
}

#[test]
fn an_upper_against_its_lower() {
    let (_tmp, lower, upper) = layers();
    let report = diff(
        &root(vec![lower.clone()]),
        &root(vec![lower, upper]),
        &DiffOptions::default(),
    )
    .unwrap();
    use ChangeKind::*;
    assert_eq!(
        kinds(&report),
        [
            ("/etc/bin".to_string(), Modified),
            ("/etc/conf".into(), Modified),
            ("/gone".into(), Deleted),
            ("/gone/one".into(), Deleted),
            ("/gone/two".into(), Deleted),
            ("/new".into(), Added),
            ("/new/deep".into(), Added),
            ("/new/deep/file".into(), Added),
            ("/new/link".into(), Added),
            ("/opq/new".into(), Added),
            ("/opq/old".into(), Deleted),
            ("/work/mode".into(), Modified),
        ]
    );
    let link = report
        .changes
        .iter()
        .find(|c| c.path == "/new/link")
        .unwrap();
    assert_eq!(link.file_type, "symlink");
    assert_eq!(link.link_target.as_deref(), Some("/etc/shadow"));
    assert!(!report.truncated);
    let patch = &report.patch;
    assert!(
        patch.contains("diff --git a/etc/conf b/etc/conf\n--- a/etc/conf\n+++ b/etc/conf\n@@ -1,3 +1,3 @@\n a\n-b\n+B\n c\n"),
        "{patch}"
    );
    assert!(
        patch.contains("Binary files a/etc/bin and b/etc/bin differ"),
        "{patch}"
    );
    assert!(
        patch.contains("diff --git a/gone/one b/gone/one\ndeleted file mode 100644\n--- a/gone/one\n+++ /dev/null\n@@ -1 +0,0 @@\n-1\n"),
        "{patch}"
    );
    assert!(
        patch.contains("new file mode 120000\n--- /dev/null\n+++ b/new/link\n@@ -0,0 +1 @@\n+/etc/shadow\n\\ No newline at end of file\n"),
        "{patch}"
    );
    assert!(
        patch.contains("old mode 100644\nnew mode 100755\n"),
        "{patch}"
    );
    assert!(!patch.contains("etc/same"), "{patch}");
    assert!(!patch.contains("root:"), "the link was followed: {patch}");
}

#[test]
fn a_path_narrows_the_diff_and_limits_truncate() {
    let (_tmp, lower, upper) = layers();
    let before = root(vec![lower.clone()]);
    let after = root(vec![lower, upper]);
    let only = |path: &str| DiffOptions {
        path: Some(path.into()),
        ..DiffOptions::default()
    };
    let report = diff(&before, &after, &only("/etc/conf")).unwrap();
    assert_eq!(
        kinds(&report),
        [("/etc/conf".to_string(), ChangeKind::Modified)]
    );
    let report = diff(&before, &after, &only("/new/deep")).unwrap();
    assert_eq!(
        kinds(&report),
        [
            ("/new/deep".to_string(), ChangeKind::Added),
            ("/new/deep/file".into(), ChangeKind::Added)
        ]
    );
    let hidden = DiffOptions {
        hidden: vec!["/etc/conf".into(), "/new".into()],
        ..DiffOptions::default()
    };
    let got = kinds(&diff(&before, &after, &hidden).unwrap());
    assert!(
        !got.iter()
            .any(|(p, _)| p == "/etc/conf" || p.starts_with("/new")),
        "{got:?}"
    );
    assert!(got.iter().any(|(p, _)| p == "/etc/bin"), "{got:?}");
    let report = diff(&before, &after, &only("/keep")).unwrap();
    assert!(report.changes.is_empty());
    assert!(diff(&before, &after, &only("relative")).is_err());
    assert!(diff(&before, &after, &only("/a/../b")).is_err());
    let report = diff(
        &before,
        &after,
        &DiffOptions {
            max_changes: 3,
            max_patch: 0,
            ..DiffOptions::default()
        },
    )
    .unwrap();
    assert_eq!(report.changes.len(), 3);
    assert!(report.truncated && report.patch.is_empty());
}

#[test]
fn against_another_stack_compares_only_what_differs() {
    let (tmp, lower, upper) = layers();
    // A snapshot of the upper at some point, then more work in a new upper.
    let snap = tmp.path().join("snap");
    fs::create_dir_all(snap.join("etc")).unwrap();
    fs::write(snap.join("etc/conf"), "a\nB\nc\n").unwrap();
    fs::write(snap.join("later"), "gone later\n").unwrap();
    let before = root(vec![lower.clone(), snap]);
    let after = root(vec![lower, upper]);
    let report = diff(&before, &after, &DiffOptions::default()).unwrap();
    let got = kinds(&report);
    assert!(
        got.contains(&("/later".to_string(), ChangeKind::Deleted)),
        "{got:?}"
    );
    assert!(!got.iter().any(|(p, _)| p == "/etc/conf"), "{got:?}");
    assert!(
        got.contains(&("/gone/one".to_string(), ChangeKind::Deleted)),
        "{got:?}"
    );
}

#[test]
fn mounts_are_compared_each_under_its_target() {
    let (tmp, lower, upper) = layers();
    let usr = tmp.path().join("usr");
    let usr_upper = tmp.path().join("usr_upper");
    fs::create_dir_all(usr.join("bin")).unwrap();
    fs::create_dir_all(usr_upper.join("bin")).unwrap();
    fs::write(usr_upper.join("bin/tool"), "#!/bin/sh\n").unwrap();
    // The root upper's `usr` is hidden by the mount: never reported.
    fs::create_dir_all(upper.join("usr")).unwrap();
    fs::write(upper.join("usr/hidden"), "x").unwrap();
    let before = vec![
        Overlay {
            target: "/".into(),
            layers: vec![lower.clone()],
        },
        Overlay {
            target: "/usr".into(),
            layers: vec![usr.clone()],
        },
    ];
    let after = vec![
        Overlay {
            target: "/".into(),
            layers: vec![lower, upper],
        },
        Overlay {
            target: "/usr".into(),
            layers: vec![usr, usr_upper],
        },
    ];
    let report = diff(&before, &after, &DiffOptions::default()).unwrap();
    let got = kinds(&report);
    assert!(
        got.contains(&("/usr/bin/tool".to_string(), ChangeKind::Added)),
        "{got:?}"
    );
    assert!(
        !got.iter()
            .any(|(p, _)| p.starts_with("/usr/hidden") || p == "/usr"),
        "{got:?}"
    );
    let only = DiffOptions {
        path: Some("/usr/bin".into()),
        ..DiffOptions::default()
    };
    let report = diff(&before, &after, &only).unwrap();
    assert_eq!(
        kinds(&report),
        [("/usr/bin/tool".to_string(), ChangeKind::Added)]
    );
}
