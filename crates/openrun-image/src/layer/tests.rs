//! Unpacking and tree archives on real files (as root: owners, devices, xattrs).

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

use super::*;

/// A raw tar entry: any name (the tar crate's builder refuses `..` and absolute paths,
/// which are exactly what these tests need).
fn raw(
    tar: &mut Vec<u8>,
    name: &[u8],
    kind: tar::EntryType,
    link: &[u8],
    mode: u32,
    ids: (u64, u64),
    data: &[u8],
) {
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(ids.0);
    h.set_gid(ids.1);
    h.set_mtime(1_600_000_000);
    h.set_size(data.len() as u64);
    h.set_cksum();
    tar.extend_from_slice(h.as_bytes());
    tar.extend_from_slice(data);
    let pad = (512 - data.len() % 512) % 512;
    tar.extend(std::iter::repeat_n(0u8, pad));
}

fn file(tar: &mut Vec<u8>, name: &str, data: &[u8]) {
    raw(
        tar,
        name.as_bytes(),
        tar::EntryType::Regular,
        b"",
        0o644,
        (0, 0),
        data,
    );
}

/// One raw entry per row: name, type, link, mode, (uid, gid), data.
type Row<'a> = (&'a str, tar::EntryType, &'a str, u32, (u64, u64), &'a [u8]);

fn tar_of(rows: &[Row<'_>]) -> Vec<u8> {
    let mut t = Vec::new();
    for (name, kind, link, mode, ids, data) in rows {
        raw(
            &mut t,
            name.as_bytes(),
            *kind,
            link.as_bytes(),
            *mode,
            *ids,
            data,
        );
    }
    end(t)
}

fn end(mut tar: Vec<u8>) -> Vec<u8> {
    tar.extend(std::iter::repeat_n(0u8, 1024));
    tar
}

fn unpack_into(tar: &[u8]) -> (tempfile::TempDir, Result<UnpackStats>) {
    let dir = tempfile::tempdir().unwrap();
    let result = unpack(tar, dir.path(), "test layer");
    (dir, result)
}

fn listing(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            out.push(e.path().strip_prefix(dir).unwrap().display().to_string());
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
    }
    out.sort();
    out
}

use tar::EntryType::{Directory as D, Fifo, Link as L, Regular as F, Symlink as S};

#[test]
fn keeps_owners_modes_times_links_and_fifos() {
    let (dir, result) = unpack_into(&tar_of(&[
        ("/", D, "", 0o755, (0, 0), b""),
        ("bin/", D, "", 0o755, (0, 0), b""),
        ("bin/su", F, "", 0o4755, (0, 0), b"#!su"),
        ("home/alice/notes", F, "", 0o600, (1000, 1001), b"hi"),
        ("bin/sh", S, "/bin/busybox", 0o777, (0, 0), b""),
        ("bin/su2", L, "bin/su", 0o4755, (0, 0), b""),
        ("run/pipe", Fifo, "", 0o640, (5, 6), b""),
        ("tmp/", D, "", 0o1777, (0, 0), b""),
    ]));
    let stats = result.unwrap();
    assert_eq!(stats.bytes, 6);
    let root = dir.path();
    let su = fs::symlink_metadata(root.join("bin/su")).unwrap();
    assert_eq!(su.mode() & 0o7777, 0o4755, "setuid kept");
    assert_eq!(su.mtime(), 1_600_000_000);
    assert_eq!(su.nlink(), 2, "the hard link shares the inode");
    let notes = fs::symlink_metadata(root.join("home/alice/notes")).unwrap();
    assert_eq!(
        (notes.uid(), notes.gid(), notes.mode() & 0o777),
        (1000, 1001, 0o600)
    );
    assert_eq!(fs::read(root.join("home/alice/notes")).unwrap(), b"hi");
    assert_eq!(
        fs::read_link(root.join("bin/sh")).unwrap(),
        Path::new("/bin/busybox")
    );
    let pipe = fs::symlink_metadata(root.join("run/pipe")).unwrap();
    assert!(pipe.file_type().is_fifo());
    assert_eq!((pipe.uid(), pipe.mode() & 0o777), (5, 0o640));
    let tmp = fs::metadata(root.join("tmp")).unwrap();
    assert_eq!(tmp.mode() & 0o7777, 0o1777);
    assert_eq!(tmp.mtime(), 1_600_000_000, "directory times set last");
    // Implicit parents are plain root directories.
    let home = fs::metadata(root.join("home")).unwrap();
    assert_eq!((home.uid(), home.mode() & 0o777), (0, 0o755));
}

#[test]
fn whiteouts_become_overlay_whiteouts_and_opaque_dirs() {
    let mut t = Vec::new();
    file(&mut t, ".wh.gone", b"");
    file(&mut t, "dir/.wh..wh..opq", b"");
    file(&mut t, "dir/kept", b"k");
    file(&mut t, ".wh..wh.plnk", b"");
    // A whiteout next to an entry of the same layer leaves the entry.
    file(&mut t, "both", b"b");
    file(&mut t, ".wh.both", b"");
    let (dir, result) = unpack_into(&end(t));
    result.unwrap();
    let root = dir.path();
    let wh = fs::symlink_metadata(root.join("gone")).unwrap();
    assert!(wh.file_type().is_char_device());
    assert_eq!(wh.rdev(), 0);
    let fd = open_dir_path(&root.join("dir")).unwrap();
    let mut value = [0u8; 4];
    let n = rustix::fs::fgetxattr(&fd, OPAQUE_XATTR, &mut value).unwrap();
    assert_eq!(&value[..n], b"y");
    assert_eq!(fs::read(root.join("both")).unwrap(), b"b");
    assert_eq!(listing(root), ["both", "dir", "dir/kept", "gone"]);
}

/// Found by the tar_unpack fuzz target (unpack -> write_tree was not a fixed point): a
/// whiteout took the clock's time, so the archive of a layer changed with the second it was
/// unpacked in. It now keeps its entry's owner and time, like every other entry.
#[test]
fn whiteouts_keep_their_entrys_owner_and_time() {
    let t = tar_of(&[
        (".wh.gone", tar::EntryType::Regular, "", 0o644, (5, 6), b""),
        ("d/.wh.x", tar::EntryType::Regular, "", 0o644, (7, 8), b""),
    ]);
    let (dir, result) = unpack_into(&t);
    result.unwrap();
    for (path, ids) in [("gone", (5, 6)), ("d/x", (7, 8))] {
        let wh = fs::symlink_metadata(dir.path().join(path)).unwrap();
        assert!(wh.file_type().is_char_device(), "{path}");
        assert_eq!((wh.uid(), wh.gid()), ids, "{path}");
        assert_eq!(wh.mtime(), 1_600_000_000, "{path}");
    }
    // So the layer archives the same whenever it is unpacked.
    let mut first = Vec::new();
    write_tree(dir.path(), None, &mut first).unwrap();
    let again = tempfile::tempdir().unwrap();
    unpack(first.as_slice(), again.path(), "again").unwrap();
    let mut second = Vec::new();
    write_tree(again.path(), None, &mut second).unwrap();
    assert!(first == second, "the archive changed");
}

/// Found by the tar_unpack fuzz target (unpack -> write_tree was not a fixed point):
/// `.wh.foo/bar` made a directory `.wh.foo`, which the layer's archive then held as the
/// whiteout of `foo`. A whiteout name is refused as a parent.
#[test]
fn whiteout_names_are_refused_as_directories() {
    for name in [".wh.foo/bar", "a/.wh..wh..opq/b", "a/.wh.x/y/z"] {
        let t = tar_of(&[(name, tar::EntryType::Regular, "", 0o644, (0, 0), b"x")]);
        let (dir, result) = unpack_into(&t);
        let err = result.unwrap_err().to_string();
        assert!(err.contains("named like a whiteout"), "{name}: {err}");
        assert!(!dir.path().join(".wh.foo").exists());
    }
}

fn is_opaque(dir: &Path) -> bool {
    let fd = open_dir_path(dir).unwrap();
    let mut value = [0u8; 4];
    rustix::fs::fgetxattr(&fd, OPAQUE_XATTR, &mut value).is_ok_and(|n| &value[..n] == b"y")
}

/// A whiteout and an entry of the same name in one layer: the entry stays, and a directory
/// hides what lower layers hold under that name (the whiteout deleted it).
#[test]
fn whiteouts_beside_entries_of_the_same_layer_make_directories_opaque() {
    let (dir, result) = unpack_into(&tar_of(&[
        (".wh.d", F, "", 0o644, (0, 0), b""),
        ("d/x", F, "", 0o644, (0, 0), b"x"),
        (".wh.e", F, "", 0o644, (0, 0), b""),
        ("e/", D, "", 0o750, (0, 0), b""),
        ("f/", D, "", 0o755, (0, 0), b""),
        ("f/y", F, "", 0o644, (0, 0), b"y"),
        (".wh.f", F, "", 0o644, (0, 0), b""),
        ("g", F, "", 0o644, (0, 0), b"g"),
        (".wh.g", F, "", 0o644, (0, 0), b""),
        ("plain/", D, "", 0o755, (0, 0), b""),
    ]));
    result.unwrap();
    let root = dir.path();
    for (d, opaque) in [("d", true), ("e", true), ("f", true), ("plain", false)] {
        assert!(root.join(d).is_dir(), "{d}");
        assert_eq!(is_opaque(&root.join(d)), opaque, "{d}");
    }
    assert_eq!(fs::read(root.join("d/x")).unwrap(), b"x");
    assert_eq!(fs::read(root.join("f/y")).unwrap(), b"y");
    assert_eq!(fs::read(root.join("g")).unwrap(), b"g");
    assert_eq!(fs::metadata(root.join("e")).unwrap().mode() & 0o777, 0o750);
}

#[test]
fn later_entries_replace_earlier_ones() {
    let t = tar_of(&[
        ("a", F, "", 0o644, (0, 0), b"file"),
        ("a/", D, "", 0o700, (0, 0), b""),
        ("a/inner", F, "", 0o644, (0, 0), b"x"),
        ("b", F, "", 0o644, (0, 0), b"one"),
        ("b", F, "", 0o644, (0, 0), b"two"),
        ("c/", D, "", 0o755, (0, 0), b""),
        ("c/x", F, "", 0o644, (0, 0), b"x"),
        ("c", F, "", 0o644, (0, 0), b"now a file"),
    ]);
    let (dir, result) = unpack_into(&t);
    result.unwrap();
    let root = dir.path();
    assert_eq!(fs::read(root.join("a/inner")).unwrap(), b"x");
    assert_eq!(fs::read(root.join("b")).unwrap(), b"two");
    assert_eq!(fs::read(root.join("c")).unwrap(), b"now a file");
}

/// Each refused entry, with what its error must name; nothing may appear outside the layer.
#[test]
fn unsafe_entries_are_refused_by_name() {
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim");
    fs::write(&victim, b"original").unwrap();
    let victim_path = victim.to_str().unwrap().to_string();
    let outside_path = outside.path().to_str().unwrap().to_string();
    let ok: Row<'_> = ("ok", F, "", 0o644, (0, 0), b"ok");
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            tar_of(&[ok, ("../escape", F, "", 0o644, (0, 0), b"x")]),
            "../escape",
        ),
        (
            tar_of(&[ok, (&victim_path, F, "", 0o644, (0, 0), b"pwned")]),
            "absolute",
        ),
        (
            tar_of(&[ok, ("link", L, &victim_path, 0o644, (0, 0), b"")]),
            "outside the layer",
        ),
        (
            tar_of(&[ok, ("link", L, "../../etc/passwd", 0o644, (0, 0), b"")]),
            "outside the layer",
        ),
        (
            tar_of(&[ok, ("link", L, "not/there", 0o644, (0, 0), b"")]),
            "not in the layer",
        ),
        (
            {
                let mut h = tar::Header::new_gnu();
                h.set_path("dev/null").unwrap();
                h.set_entry_type(tar::EntryType::Char);
                h.set_device_major(1).unwrap();
                h.set_device_minor(3).unwrap();
                h.set_size(0);
                h.set_cksum();
                end(h.as_bytes().to_vec())
            },
            "device node",
        ),
        (
            tar_of(&[
                ("out", S, &outside_path, 0o777, (0, 0), b""),
                ("out/victim", F, "", 0o644, (0, 0), b"pwned"),
            ]),
            "symbolic link",
        ),
        (
            tar_of(&[
                ("d/", D, "", 0o755, (0, 0), b""),
                ("hl", L, "d", 0o644, (0, 0), b""),
            ]),
            "hard link to a directory",
        ),
    ];
    for (tar, expected) in cases {
        let (dir, result) = unpack_into(&tar);
        let err = result.unwrap_err();
        assert!(matches!(err, ImageError::UnsafeEntry { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains(expected), "{text} (expected {expected:?})");
        assert!(err.is_user_error());
        assert_eq!(fs::read(&victim).unwrap(), b"original");
        assert_eq!(listing(outside.path()), ["victim"]);
        drop(dir);
    }
}

#[test]
fn truncated_archives_are_corrupt() {
    let mut t = Vec::new();
    file(&mut t, "big", &vec![7u8; 5000]);
    let t = end(t);
    let (_, result) = unpack_into(&t[..2000]);
    let err = result.unwrap_err();
    assert!(matches!(err, ImageError::Corrupt { .. }), "{err:?}");
    assert!(err.to_string().contains("test layer"), "{err}");
}

#[test]
fn tree_archives_shift_ids_keep_whiteouts_and_are_deterministic() {
    let base = 1 << 30;
    let shift = IdShift { base, size: 65_536 };
    let src = tempfile::tempdir().unwrap();
    let root = src.path();
    fs::create_dir_all(root.join("etc/opaque")).unwrap();
    fs::write(root.join("etc/opaque/new"), b"n").unwrap();
    fs::write(root.join("etc/app.conf"), b"conf").unwrap();
    fs::hard_link(root.join("etc/app.conf"), root.join("etc/app2.conf")).unwrap();
    std::os::unix::fs::symlink("../etc/app.conf", root.join("link")).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        root.join("deleted"),
        FileType::CharacterDevice,
        Mode::empty(),
        rustix::fs::makedev(0, 0),
    )
    .unwrap();
    let opaque = open_dir_path(&root.join("etc/opaque")).unwrap();
    rustix::fs::fsetxattr(&opaque, OPAQUE_XATTR, b"y", rustix::fs::XattrFlags::empty()).unwrap();
    fs::set_permissions(
        root.join("etc/app.conf"),
        fs::Permissions::from_mode(0o4750),
    )
    .unwrap();
    for p in [
        "etc",
        "etc/opaque",
        "etc/opaque/new",
        "etc/app.conf",
        "link",
        "deleted",
    ] {
        std::os::unix::fs::lchown(root.join(p), Some(base + 7), Some(base + 8)).unwrap();
    }
    fs::set_permissions(
        root.join("etc/app.conf"),
        fs::Permissions::from_mode(0o4750),
    )
    .unwrap();

    let mut first = Vec::new();
    write_tree(root, Some(shift), &mut first).unwrap();
    let mut second = Vec::new();
    write_tree(root, Some(shift), &mut second).unwrap();
    assert_eq!(first, second, "the same tree makes the same archive");

    let (out, result) = unpack_into(&first);
    result.unwrap();
    let out = out.path();
    let conf = fs::symlink_metadata(out.join("etc/app.conf")).unwrap();
    assert_eq!((conf.uid(), conf.gid()), (7, 8), "ids shifted back");
    assert_eq!(conf.mode() & 0o7777, 0o4750);
    assert_eq!(conf.nlink(), 2);
    assert_eq!(
        fs::read_link(out.join("link")).unwrap(),
        Path::new("../etc/app.conf")
    );
    let wh = fs::symlink_metadata(out.join("deleted")).unwrap();
    assert!(wh.file_type().is_char_device() && wh.rdev() == 0);
    let fd = open_dir_path(&out.join("etc/opaque")).unwrap();
    let mut value = [0u8; 4];
    let n = rustix::fs::fgetxattr(&fd, OPAQUE_XATTR, &mut value).unwrap();
    assert_eq!(&value[..n], b"y");
    assert_eq!(fs::read(out.join("etc/opaque/new")).unwrap(), b"n");

    // An id outside the range is refused, naming the file.
    std::os::unix::fs::lchown(root.join("link"), Some(5), None).unwrap();
    let err = write_tree(root, Some(shift), &mut Vec::new()).unwrap_err();
    assert!(
        err.to_string().contains("link") && err.to_string().contains("host id 5"),
        "{err}"
    );
    // A real device in the tree is refused.
    std::os::unix::fs::lchown(root.join("link"), Some(base), None).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        root.join("null"),
        FileType::CharacterDevice,
        Mode::from_raw_mode(0o666),
        rustix::fs::makedev(1, 3),
    )
    .unwrap();
    std::os::unix::fs::lchown(root.join("null"), Some(base), Some(base)).unwrap();
    let err = write_tree(root, Some(shift), &mut Vec::new()).unwrap_err();
    assert!(
        err.to_string().contains("null") && err.to_string().contains("device"),
        "{err}"
    );
}

/// GNU long names and PAX records are read into memory by the tar crate: past
/// [`MAX_ENTRY_META`] the archive is refused as corrupt before more is read.
#[test]
fn oversized_entry_metadata_is_refused_before_it_is_held() {
    let huge = vec![b'a'; (MAX_ENTRY_META as usize) * 2];
    for kind in [tar::EntryType::GNULongName, tar::EntryType::XHeader] {
        let mut t = Vec::new();
        let data: Vec<u8> = if kind == tar::EntryType::XHeader {
            let record = format!("{} path=", huge.len() + 100);
            let mut r = record.into_bytes();
            r.extend_from_slice(&huge);
            r.push(b'\n');
            r
        } else {
            huge.clone()
        };
        raw(&mut t, b"././@LongLink", kind, b"", 0o644, (0, 0), &data);
        file(&mut t, "victim", b"x");
        let (dir, result) = unpack_into(&end(t));
        let err = result.unwrap_err();
        assert!(
            matches!(err, ImageError::Corrupt { .. }),
            "{kind:?}: {err:?}"
        );
        assert!(
            err.to_string().contains("long names, PAX records"),
            "{kind:?}: {err}"
        );
        assert!(listing(dir.path()).is_empty());
    }
    // A long name within the bound is fine.
    let mut t = Vec::new();
    let name = format!("{}/f", "d".repeat(200));
    raw(
        &mut t,
        b"././@LongLink",
        tar::EntryType::GNULongName,
        b"",
        0o644,
        (0, 0),
        name.as_bytes(),
    );
    file(&mut t, "short", b"x");
    let (dir, result) = unpack_into(&end(t));
    result.unwrap();
    assert_eq!(fs::read(dir.path().join(&name)).unwrap(), b"x");
}

/// A directory whose parent a later entry turns into a symbolic link is simply gone: the
/// unpack succeeds (it used to fail dating it, calling the link unsafe).
#[test]
fn a_directory_under_a_parent_replaced_later_is_not_an_error() {
    let (dir, result) = unpack_into(&tar_of(&[
        ("a/", D, "", 0o755, (0, 0), b""),
        ("a/b/", D, "", 0o755, (0, 0), b""),
        ("a", S, "/elsewhere", 0o777, (0, 0), b""),
    ]));
    result.unwrap();
    let link = fs::symlink_metadata(dir.path().join("a")).unwrap();
    assert!(link.file_type().is_symlink());
}

/// A layer that would fill the store's filesystem (a compressed one may expand a
/// thousandfold) stops while some space is left, naming the layer.
#[test]
fn an_unpack_stops_before_the_filesystem_is_full() {
    std::thread::spawn(|| {
        // SAFETY: this thread only; it shares no descriptor table or cwd-dependent state the
        // rest of the test harness relies on, and ends with the namespace.
        unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNS) }.unwrap();
        rustix::mount::mount_change(
            "/",
            rustix::mount::MountPropagationFlags::PRIVATE
                | rustix::mount::MountPropagationFlags::REC,
        )
        .unwrap();
        let fs_dir = tempfile::tempdir().unwrap();
        rustix::mount::mount(
            "tmpfs",
            fs_dir.path(),
            "tmpfs",
            rustix::mount::MountFlags::empty(),
            Some(c"size=64m"),
        )
        .unwrap();
        let dest = fs_dir.path().join("layer");
        fs::create_dir(&dest).unwrap();
        // 80 MiB of zeros, streamed.
        let size: u64 = 80 << 20;
        let mut h = tar::Header::new_gnu();
        h.set_path("zeros").unwrap();
        h.set_mode(0o644);
        h.set_size(size);
        h.set_cksum();
        let tar = h
            .as_bytes()
            .chain(io::repeat(0).take(size))
            .chain(&[0u8; 1024][..]);
        let err = unpack(tar, &dest, "layer sha256:big").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("nearly full"), "{text}");
        assert!(text.contains("layer sha256:big"), "{text}");
        let st = rustix::fs::statvfs(fs_dir.path()).unwrap();
        assert!(st.f_bavail > 0, "stopped before the filesystem was full");
        rustix::mount::unmount(fs_dir.path(), rustix::mount::UnmountFlags::DETACH).unwrap();
    })
    .join()
    .unwrap();
}
