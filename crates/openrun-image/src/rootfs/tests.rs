//! The merged view on real layer directories (whiteouts need root, as the store does).

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use super::*;

fn whiteout(path: &Path) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_raw_mode(0o600),
        rustix::fs::makedev(0, 0),
    )
    .unwrap();
}

fn opaque(path: &Path) {
    rustix::fs::setxattr(
        path,
        crate::layer::OPAQUE_XATTR,
        b"y",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
}

/// Two layers: a merged-/usr base and a layer that deletes, hides and replaces.
fn layers(base: &Path) -> Vec<PathBuf> {
    let (l0, l1) = (base.join("l0"), base.join("l1"));
    fs::create_dir_all(l0.join("usr/bin")).unwrap();
    fs::create_dir_all(l0.join("etc")).unwrap();
    fs::create_dir_all(l0.join("tmp")).unwrap();
    fs::set_permissions(l0.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::create_dir_all(l0.join("data/old")).unwrap();
    fs::create_dir_all(l0.join("gone")).unwrap();
    fs::write(l0.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
    fs::write(l0.join("usr/bin/tool"), "v0").unwrap();
    fs::write(l0.join("data/old/f"), "old").unwrap();
    symlink("usr/bin", l0.join("bin")).unwrap();
    symlink("/etc/passwd", l0.join("etc/link")).unwrap();
    symlink("loop2", l0.join("loop1")).unwrap();
    symlink("loop1", l0.join("loop2")).unwrap();
    symlink("../../../../etc", l0.join("usr/bin/up")).unwrap();
    fs::create_dir_all(l1.join("usr/bin")).unwrap();
    fs::create_dir_all(l1.join("data")).unwrap();
    opaque(&l1.join("data"));
    fs::write(l1.join("data/new"), "new").unwrap();
    fs::write(l1.join("usr/bin/tool"), "v1").unwrap();
    whiteout(&l1.join("gone"));
    vec![l0, l1]
}

#[test]
fn merges_like_overlayfs() {
    let base = tempfile::tempdir().unwrap();
    let view = ImageView::new(&layers(base.path())).unwrap();
    // The top layer's file wins, through the image's /bin -> usr/bin link.
    let r = view.resolve("/bin/tool", true).unwrap();
    assert_eq!(r.existing_path(), "/usr/bin/tool");
    let Some((_, Node::File { path, .. })) = &r.last else {
        panic!("{r:?}")
    };
    assert_eq!(fs::read_to_string(path).unwrap(), "v1");
    // A whiteout hides the directory below it.
    let r = view.resolve("/gone/x", true).unwrap();
    assert_eq!(r.missing, ["gone", "x"]);
    // An opaque directory hides what is below it.
    let r = view.resolve("/data/old/f", true).unwrap();
    assert_eq!(r.existing_path(), "/data");
    assert_eq!(r.missing, ["old", "f"]);
    let Some(Node::Dir { dirs, .. }) = r.deepest() else {
        panic!()
    };
    assert_eq!(dirs.len(), 1);
    // A merged directory lists both layers' copies, top first.
    let r = view.resolve("/usr/bin", true).unwrap();
    let Some(Node::Dir { dirs, meta }) = r.deepest() else {
        panic!()
    };
    assert_eq!(dirs.len(), 2);
    assert!(dirs[0].starts_with(base.path().join("l1")));
    assert_eq!(meta.uid, 0);
    let tmp = view.resolve("/tmp", true).unwrap();
    let Some(Node::Dir { meta, .. }) = tmp.deepest() else {
        panic!()
    };
    assert_eq!(meta.mode, 0o1777);
    // Absolute and relative links resolve inside the image; `..` stops at its root.
    assert_eq!(
        view.read_file("/etc/link", 1 << 20).unwrap().unwrap(),
        b"root:x:0:0::/root:/bin/sh\n"
    );
    let r = view.resolve("/bin/up/passwd", true).unwrap();
    assert_eq!(r.existing_path(), "/etc/passwd");
    // Unfollowed last link; missing file; loops; files used as directories.
    let r = view.resolve("/etc/link", false).unwrap();
    assert!(matches!(r.last, Some((_, Node::Symlink { .. }))));
    assert!(view.read_file("/etc/nothing", 10).unwrap().is_none());
    assert!(view
        .resolve("/loop1/x", true)
        .unwrap_err()
        .contains("too many levels"));
    let e = view.resolve("/etc/passwd/x", true).unwrap_err();
    assert!(e.contains("/etc/passwd is not a directory"), "{e}");
    assert_eq!(clean("/a/./b/../c//"), "/a/c");
    assert_eq!(clean("/../.."), "/");
}
