//! Tar archives for `cp` of directories: packing a local tree, and unpacking one that came out
//! of a sandbox. The archive is the sandbox's doing, so unpacking trusts nothing in it: every
//! entry is created relative to the destination's file descriptor, one component at a time,
//! never following a symlink (so an entry cannot write through a link it planted earlier) and
//! never accepting `..` or absolute names; only files, directories, symlinks and hard links
//! within the destination are made; permission bits are kept without setuid, setgid or sticky,
//! and files belong to whoever runs `cp`.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Component, Path};

use anyhow::{Context, Result};
use rustix::fs::{AtFlags, Mode, OFlags, Timespec, Timestamps};
use rustix::io::Errno;
use tar::EntryType;

/// What an unpack or a copy made.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Copied {
    /// Regular files written.
    pub files: u64,
    /// Bytes of those files.
    pub bytes: u64,
}

/// A tar of the contents of directory `src` for a sandbox (names relative to it): directories,
/// regular files and symlinks, as links (never followed: that could carry anything on this
/// machine into the sandbox; the sandbox gets the target as text, as `docker cp` does). Sockets,
/// devices, fifos and links whose target is not UTF-8 (the sandbox file API cannot carry it)
/// are left out with a warning.
pub fn pack_dir(src: &Path, out: impl Write) -> Result<()> {
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    add_tree(&mut builder, src, Path::new(""))?;
    builder.finish().context("cannot finish the archive")
}

/// A tar holding the one file `src` under `name`.
pub fn pack_file(src: &Path, name: &str, out: impl Write) -> Result<()> {
    let mut builder = tar::Builder::new(out);
    builder
        .append_path_with_name(src, name)
        .with_context(|| format!("cannot read {}", src.display()))?;
    builder.finish().context("cannot finish the archive")
}

fn add_tree<W: Write>(builder: &mut tar::Builder<W>, dir: &Path, rel: &Path) -> Result<()> {
    let read =
        |e: io::Error| anyhow::Error::new(e).context(format!("cannot read {}", dir.display()));
    let mut entries = std::fs::read_dir(dir)
        .map_err(read)?
        .collect::<io::Result<Vec<_>>>()
        .map_err(read)?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let name = rel.join(entry.file_name());
        let kind = entry
            .file_type()
            .with_context(|| format!("cannot read {}", path.display()))?;
        let added = if kind.is_dir() {
            builder.append_dir(&name, &path)
        } else if kind.is_file() {
            builder.append_path_with_name(&path, &name)
        } else if kind.is_symlink() {
            let target = std::fs::read_link(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            if target.to_str().is_none() {
                eprintln!(
                    "openrun: skipping {}: its link target is not UTF-8",
                    path.display()
                );
                continue;
            }
            // Not followed (`follow_symlinks(false)`): stored as a link.
            builder.append_path_with_name(&path, &name)
        } else {
            eprintln!(
                "openrun: skipping {}: only files, directories and symlinks are copied into a \
                 sandbox",
                path.display()
            );
            continue;
        };
        added.with_context(|| format!("cannot add {} to the archive", path.display()))?;
        if kind.is_dir() {
            add_tree(builder, &path, &name)?;
        }
    }
    Ok(())
}

/// Opens the directory `dir` the user named (links in that path are followed: it is theirs).
pub fn open_dir(dir: &Path) -> Result<OwnedFd> {
    rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| format!("cannot open {}", dir.display()))
}

/// Opens the directory `name` in directory `dir`, making it if missing; a symlink there is
/// refused, never followed (it may have come out of a sandbox).
pub fn dir_in(dir: &Path, name: &OsStr) -> Result<OwnedFd> {
    let shown = dir.join(name);
    let parent = open_dir(dir)?;
    walk(&parent, &[name.to_os_string()], true).map_err(|e| {
        let why = match e {
            Errno::LOOP | Errno::NOTDIR => "it exists and is not a directory".to_string(),
            e => io::Error::from(e).to_string(),
        };
        anyhow::anyhow!("cannot copy into {}: {why}", shown.display())
    })
}

/// Creates the regular file `name` in directory `dir` (umask applied), replacing whatever
/// file or symlink is there rather than writing through it.
pub fn file_in(dir: &Path, name: &OsStr) -> Result<File> {
    let parent = open_dir(dir)?;
    create_file(&parent, name, Mode::from_raw_mode(0o666))
        .map(File::from)
        .map_err(|e| {
            anyhow::Error::new(io::Error::from(e))
                .context(format!("cannot create {}", dir.join(name).display()))
        })
}

/// Unpacks a tar read from `reader` into the directory `root` (shown as `dest`).
pub fn unpack(reader: impl Read, root: OwnedFd, dest: &Path) -> Result<Copied> {
    let mut archive = tar::Archive::new(reader);
    let mut copied = Copied::default();
    let mut dir_modes = Vec::new();
    for entry in archive.entries().context("cannot read the archive")? {
        let mut entry = entry.context("cannot read the archive")?;
        let name = entry
            .path()
            .context("an archive entry has an invalid name")?
            .into_owned();
        let parts = components(&name)?;
        let Some((last, parents)) = parts.split_last() else {
            continue; // "." itself: the destination
        };
        let shown = dest.join(&name);
        let at = |e: Errno| {
            anyhow::Error::new(io::Error::from(e))
                .context(format!("cannot create {}", shown.display()))
        };
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            EntryType::XGlobalHeader
                | EntryType::XHeader
                | EntryType::GNULongName
                | EntryType::GNULongLink
        ) {
            continue;
        }
        let parent = walk(&root, parents, true).map_err(at)?;
        let mode = Mode::from_raw_mode(entry.header().mode().unwrap_or(0o644) & 0o777);
        match kind {
            EntryType::Directory => {
                match rustix::fs::mkdirat(&parent, last, Mode::from_raw_mode(0o700)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(at(e)),
                }
                // Checks that it is a directory and not a link to one.
                walk(&parent, std::slice::from_ref(last), false).map_err(at)?;
                dir_modes.push((parts.clone(), mode));
            }
            EntryType::Regular | EntryType::Continuous => {
                let fd = create_file(&parent, last, mode).map_err(at)?;
                rustix::fs::fchmod(&fd, mode).map_err(at)?;
                let mut file = File::from(fd);
                let bytes = io::copy(&mut entry, &mut file)
                    .with_context(|| format!("cannot write {}", shown.display()))?;
                if let Ok(mtime) = entry.header().mtime() {
                    let time = Timespec {
                        tv_sec: i64::try_from(mtime).unwrap_or(i64::MAX),
                        tv_nsec: 0,
                    };
                    let times = Timestamps {
                        last_access: time,
                        last_modification: time,
                    };
                    let _ = rustix::fs::futimens(&file, &times);
                }
                copied.files += 1;
                copied.bytes += bytes;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .context("a symlink in the archive has an invalid target")?
                    .with_context(|| format!("symlink {} has no target", name.display()))?;
                remove_non_dir(&parent, last).map_err(at)?;
                rustix::fs::symlinkat(target.as_ref(), &parent, last).map_err(at)?;
            }
            EntryType::Link => {
                let target = entry
                    .link_name()
                    .context("a hard link in the archive has an invalid target")?
                    .with_context(|| format!("hard link {} has no target", name.display()))?;
                let target_parts = components(&target)?;
                let Some((target_last, target_parents)) = target_parts.split_last() else {
                    anyhow::bail!(
                        "hard link {} points at the destination itself",
                        name.display()
                    );
                };
                let target_dir = walk(&root, target_parents, false).map_err(at)?;
                remove_non_dir(&parent, last).map_err(at)?;
                rustix::fs::linkat(&target_dir, target_last, &parent, last, AtFlags::empty())
                    .map_err(at)?;
            }
            other => {
                eprintln!(
                    "openrun: skipping {}: {other:?} entries are not copied",
                    shown.display()
                );
            }
        }
    }
    // Last, deepest first: a read-only directory must not stop its contents being written.
    for (parts, mode) in dir_modes.iter().rev() {
        if let Ok(dir) = walk(&root, parts, false) {
            let _ = rustix::fs::fchmod(&dir, *mode);
        }
    }
    Ok(copied)
}

/// The normal components of an entry name; `..`, absolute and prefixed names are refused.
fn components(name: &Path) -> Result<Vec<OsString>> {
    let mut parts = Vec::new();
    for part in name.components() {
        match part {
            Component::Normal(p) => parts.push(p.to_os_string()),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                anyhow::bail!(
                    "refusing archive entry {}: it leaves the destination",
                    name.display()
                )
            }
        }
    }
    Ok(parts)
}

/// Opens the directory `parts` below `dir`, component by component without following
/// symlinks; with `create`, makes the missing ones.
fn walk(dir: &OwnedFd, parts: &[OsString], create: bool) -> Result<OwnedFd, Errno> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut current = rustix::fs::openat(dir, ".", flags, Mode::empty())?;
    for part in parts {
        current = match rustix::fs::openat(&current, part.as_os_str(), flags, Mode::empty()) {
            Err(Errno::NOENT) if create => {
                match rustix::fs::mkdirat(&current, part.as_os_str(), Mode::from_raw_mode(0o755)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(e),
                }
                rustix::fs::openat(&current, part.as_os_str(), flags, Mode::empty())?
            }
            other => other?,
        };
    }
    Ok(current)
}

/// Creates the regular file `name` in `dir` as a new file: whatever non-directory is there
/// (a symlink, a hard link to a file elsewhere, a fifo, a device) is replaced, never written
/// through or opened, as `docker cp` replaces it.
fn create_file(dir: &OwnedFd, name: &OsStr, mode: Mode) -> Result<OwnedFd, Errno> {
    remove_non_dir(dir, name)?;
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    rustix::fs::openat(dir, name, flags, mode)
}

/// Removes `name` from `dir` unless it is a directory (or absent), so a link can take its place.
fn remove_non_dir(dir: &OwnedFd, name: &OsStr) -> Result<(), Errno> {
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn unpack_into(tar: &[u8], dest: &Path) -> Result<Copied> {
        unpack(tar, open_dir(dest).unwrap(), dest)
    }

    fn header(kind: EntryType, size: u64, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h
    }

    #[test]
    fn round_trip_keeps_files_modes_and_links() {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("d/e")).unwrap();
        std::fs::write(src.path().join("d/e/f.txt"), b"hello").unwrap();
        std::fs::write(src.path().join("top"), b"x").unwrap();
        std::os::unix::fs::symlink("d/e/f.txt", src.path().join("link")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            src.path().join("top"),
            std::fs::Permissions::from_mode(0o4750),
        )
        .unwrap();
        let mut tar = Vec::new();
        pack_dir(src.path(), &mut tar).unwrap();
        let dst = tempfile::tempdir().unwrap();
        let copied = unpack_into(&tar, dst.path()).unwrap();
        assert_eq!(copied, Copied { files: 2, bytes: 6 });
        assert_eq!(
            std::fs::read(dst.path().join("d/e/f.txt")).unwrap(),
            b"hello"
        );
        assert_eq!(
            std::fs::read_link(dst.path().join("link")).unwrap(),
            Path::new("d/e/f.txt"),
            "a link is packed as a link, not followed"
        );
        // Links in an archive from a sandbox are made as links.
        let tar = archive(|b| {
            let mut h = header(EntryType::Symlink, 0, 0o777);
            b.append_link(&mut h, "link", "d/e/f.txt").unwrap();
            let mut h = header(EntryType::Link, 0, 0o644);
            b.append_link(&mut h, "hard", "d/e/f.txt").unwrap();
        });
        unpack_into(&tar, dst.path()).unwrap();
        assert_eq!(
            std::fs::read_link(dst.path().join("link")).unwrap(),
            Path::new("d/e/f.txt")
        );
        assert_eq!(std::fs::read(dst.path().join("hard")).unwrap(), b"hello");
        let mode = std::fs::metadata(dst.path().join("top"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o750, "setuid is dropped, the rest kept");
    }

    #[test]
    fn entries_cannot_leave_the_destination() {
        let outside = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        // A symlink to a directory outside, then a file "through" it.
        let tar = archive(|b| {
            let mut h = header(EntryType::Symlink, 0, 0o777);
            b.append_link(&mut h, "esc", outside.path()).unwrap();
            let mut h = header(EntryType::Regular, 3, 0o644);
            b.append_data(&mut h, "esc/pwned", &b"bad"[..]).unwrap();
        });
        let err = unpack_into(&tar, dst.path()).unwrap_err();
        assert!(format!("{err:#}").contains("esc/pwned"), "{err:#}");
        assert!(!outside.path().join("pwned").exists());
        // A file written over a planted symlink replaces the link.
        let target = outside.path().join("victim");
        std::fs::write(&target, b"keep").unwrap();
        let tar = archive(|b| {
            let mut h = header(EntryType::Symlink, 0, 0o777);
            b.append_link(&mut h, "v", &target).unwrap();
            let mut h = header(EntryType::Regular, 3, 0o644);
            b.append_data(&mut h, "v", &b"new"[..]).unwrap();
        });
        unpack_into(&tar, dst.path()).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        assert_eq!(std::fs::read(dst.path().join("v")).unwrap(), b"new");
        // Names with .. are refused (written by hand: the builder refuses them too).
        let mut h = header(EntryType::Regular, 1, 0o644);
        h.as_gnu_mut().unwrap().name[..8].copy_from_slice(b"../evil\0");
        h.set_cksum();
        let mut tar = h.as_bytes().to_vec();
        tar.extend_from_slice(&[b'x'; 512][..512]);
        tar.extend_from_slice(&[0; 1024]);
        let err = unpack_into(&tar, dst.path()).unwrap_err();
        assert!(
            err.to_string().contains("leaves the destination"),
            "{err:#}"
        );
        assert!(!dst.path().parent().unwrap().join("evil").exists());
        // Devices are skipped, not made.
        let tar = archive(|b| {
            let mut h = header(EntryType::Char, 0, 0o666);
            b.append_data(&mut h, "null", io::empty()).unwrap();
        });
        unpack_into(&tar, dst.path()).unwrap();
        assert!(!dst.path().join("null").exists());
    }

    #[test]
    fn what_is_at_the_destination_is_replaced_not_written_through() {
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        let dst = tempfile::tempdir().unwrap();
        // A hard link to a file elsewhere and a fifo (opening it would block) at entry names.
        std::fs::hard_link(&victim, dst.path().join("hard")).unwrap();
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            dst.path().join("fifo"),
            Mode::from_raw_mode(0o644),
        )
        .unwrap();
        let tar = archive(|b| {
            for name in ["hard", "fifo"] {
                let mut h = header(EntryType::Regular, 3, 0o644);
                b.append_data(&mut h, name, &b"new"[..]).unwrap();
            }
        });
        unpack_into(&tar, dst.path()).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert_eq!(std::fs::read(dst.path().join("hard")).unwrap(), b"new");
        assert_eq!(std::fs::read(dst.path().join("fifo")).unwrap(), b"new");
        // The name a copy makes: a link there is replaced by a file, refused for a directory.
        std::os::unix::fs::symlink(&victim, dst.path().join("link")).unwrap();
        let mut file = file_in(dst.path(), OsStr::new("link")).unwrap();
        file.write_all(b"file").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert!(std::fs::symlink_metadata(dst.path().join("link"))
            .unwrap()
            .is_file());
        std::os::unix::fs::symlink(outside.path(), dst.path().join("dlink")).unwrap();
        let err = dir_in(dst.path(), OsStr::new("dlink")).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err:#}");
        dir_in(dst.path(), OsStr::new("new")).unwrap();
        assert!(dst.path().join("new").is_dir());
    }
}
