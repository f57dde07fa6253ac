//! The copy a snapshot makes while its sandbox is frozen: the writable upper directory copied
//! as it is (owners, modes, modification times, whiteouts, opaque markers, hard links within
//! it), file contents with `copy_file_range` (in the kernel, no hashing, no archive), so the
//! freeze lasts as long as copying bytes takes. The layer is then made from this private copy
//! ([`crate::Store::stage_dir`]: archive, hash, ids shifted back) after the sandbox runs again.
//!
//! The upper is the sandbox's: every entry is opened relative to its parent's descriptor with
//! `O_NOFOLLOW`, a file is copied from the descriptor `fstat` checked, links are copied as
//! links, and devices other than whiteouts are refused.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::rc::Rc;

use rustix::fd::{AsFd, OwnedFd};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat, Timespec, Timestamps};

use crate::error::{ImageError, IoContext, Result};
use crate::layer::{open_dir_at, open_dir_path, owner_time_at, MAX_DEPTH, OPAQUE_XATTR};

/// What [`copy_tree`] copied.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CopyStats {
    /// Entries copied.
    pub entries: u64,
    /// Bytes of file contents copied.
    pub bytes: u64,
}

/// Copies the tree at `src` into `dst`, a directory that must not exist yet.
pub fn copy_tree(src: &Path, dst: &Path) -> Result<CopyStats> {
    let from = open_dir_path(src).context(|| format!("cannot open {}", src.display()))?;
    let st = rustix::fs::fstat(&from).context(|| format!("cannot inspect {}", src.display()))?;
    rustix::fs::mkdir(dst, Mode::from_raw_mode(0o700))
        .context(|| format!("cannot create {}", dst.display()))?;
    let to = open_dir_path(dst).context(|| format!("cannot open {}", dst.display()))?;
    let mut copier = Copier {
        links: HashMap::new(),
        dirs: Vec::new(),
        stats: CopyStats::default(),
    };
    let to = Rc::new(to);
    copier.dir(&from, &to, &st, "", 0)?;
    // Directory times last: creating entries in a directory changes its time.
    for (dir, st) in copier.dirs.iter().rev() {
        rustix::fs::futimens(&**dir, &times(st)).context(|| "cannot set a time".to_string())?;
    }
    Ok(copier.stats)
}

fn times(st: &Stat) -> Timestamps {
    Timestamps {
        last_access: Timespec {
            tv_sec: st.st_atime,
            tv_nsec: st.st_atime_nsec as _,
        },
        last_modification: Timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec as _,
        },
    }
}

struct Copier {
    /// Files with several links copied so far, by (device, inode): the directory and name of
    /// their copy.
    links: HashMap<(u64, u64), (Rc<OwnedFd>, Vec<u8>)>,
    /// Directories copied, with their source's times (set at the end).
    dirs: Vec<(Rc<OwnedFd>, Stat)>,
    stats: CopyStats,
}

impl Copier {
    /// Copies the owner, mode and opaque marker of directory `from` to `to`, then its entries.
    fn dir(
        &mut self,
        from: &OwnedFd,
        to: &Rc<OwnedFd>,
        st: &Stat,
        shown: &str,
        depth: usize,
    ) -> Result<()> {
        if depth > MAX_DEPTH {
            return Err(ImageError::unsafe_entry(
                shown,
                format!("deeper than {MAX_DEPTH} directories"),
            ));
        }
        let mut value = [0u8; 8];
        if let Ok(n) = rustix::fs::fgetxattr(from, OPAQUE_XATTR, &mut value) {
            if &value[..n] == b"y" {
                rustix::fs::fsetxattr(&**to, OPAQUE_XATTR, b"y", rustix::fs::XattrFlags::empty())
                    .context(|| format!("cannot mark {shown}/ opaque"))?;
            }
        }
        owner_mode(&**to, st).context(|| format!("cannot set the owner of {shown}/"))?;
        self.dirs.push((to.clone(), *st));
        let mut names = Vec::new();
        let mut listing =
            rustix::fs::Dir::read_from(from).context(|| format!("cannot list {shown}/"))?;
        while let Some(entry) = listing.read() {
            let entry = entry.context(|| format!("cannot list {shown}/"))?;
            let n = entry.file_name().to_bytes();
            if n != b"." && n != b".." {
                names.push(n.to_vec());
            }
        }
        for name in names {
            let path = format!("{shown}/{}", String::from_utf8_lossy(&name));
            self.entry(from, to, &name, &path, depth)?;
        }
        Ok(())
    }

    fn entry(
        &mut self,
        from: &OwnedFd,
        to: &Rc<OwnedFd>,
        name: &[u8],
        shown: &str,
        depth: usize,
    ) -> Result<()> {
        let st = match rustix::fs::statat(from, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            // Listed, then gone: nothing to copy.
            Err(rustix::io::Errno::NOENT) => return Ok(()),
            Err(e) => return Err(ImageError::io(format!("cannot inspect {shown}"), e)),
        };
        self.stats.entries += 1;
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => {
                rustix::fs::mkdirat(&**to, name, Mode::from_raw_mode(0o700))
                    .context(|| format!("cannot create {shown}"))?;
                let open = |dir: &OwnedFd| {
                    open_dir_at(dir, name).context(|| format!("cannot open {shown}"))
                };
                let sub_from = open(from)?;
                let sub_to = Rc::new(open(to)?);
                self.dir(&sub_from, &sub_to, &st, shown, depth + 1)
            }
            FileType::RegularFile => {
                if st.st_nlink > 1 {
                    if let Some((dir, first)) = self.links.get(&(st.st_dev, st.st_ino)) {
                        return rustix::fs::linkat(
                            &**dir,
                            first.as_slice(),
                            &**to,
                            name,
                            AtFlags::empty(),
                        )
                        .context(|| format!("cannot link {shown}"));
                    }
                    self.links
                        .insert((st.st_dev, st.st_ino), (to.clone(), name.to_vec()));
                }
                self.file(from, to, name, &st, shown)
            }
            FileType::Symlink => {
                let target = rustix::fs::readlinkat(from, name, Vec::new())
                    .context(|| format!("cannot read the link {shown}"))?;
                rustix::fs::symlinkat(target.as_c_str(), &**to, name)
                    .context(|| format!("cannot create the link {shown}"))?;
                owner_time_at(to, name, (st.st_uid, st.st_gid), &times(&st), shown)
            }
            FileType::CharacterDevice if st.st_rdev == 0 => {
                rustix::fs::mknodat(
                    &**to,
                    name,
                    FileType::CharacterDevice,
                    Mode::empty(),
                    rustix::fs::makedev(0, 0),
                )
                .context(|| format!("cannot create the whiteout {shown}"))?;
                owner_time_at(to, name, (st.st_uid, st.st_gid), &times(&st), shown)
            }
            FileType::Fifo => {
                rustix::fs::mknodat(&**to, name, FileType::Fifo, Mode::from_raw_mode(0o600), 0)
                    .context(|| format!("cannot create the fifo {shown}"))?;
                owner_time_at(to, name, (st.st_uid, st.st_gid), &times(&st), shown)?;
                rustix::fs::chmodat(
                    &**to,
                    name,
                    Mode::from_raw_mode(st.st_mode & 0o7777),
                    AtFlags::empty(),
                )
                .context(|| format!("cannot set the mode of {shown}"))
            }
            FileType::CharacterDevice | FileType::BlockDevice => Err(ImageError::unsafe_entry(
                shown,
                "a device node (layers may not contain character or block devices)",
            )),
            // Sockets mean nothing without their process (and cannot be archived).
            _ => Ok(()),
        }
    }

    /// Copies the contents, owner, mode and times of the regular file `name`.
    fn file(
        &mut self,
        from: &OwnedFd,
        to: &OwnedFd,
        name: &[u8],
        st: &Stat,
        shown: &str,
    ) -> Result<()> {
        let src = rustix::fs::openat(
            from,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NOCTTY | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .context(|| format!("cannot open {shown}"))?;
        let now = rustix::fs::fstat(&src).context(|| format!("cannot inspect {shown}"))?;
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) {
            return Err(ImageError::Invalid(format!(
                "{shown} was replaced while the sandbox was frozen"
            )));
        }
        let dst = rustix::fs::openat(
            to,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .context(|| format!("cannot create {shown}"))?;
        let (mut src, mut dst) = (File::from(src), File::from(dst));
        // copy_file_range: the kernel moves the bytes.
        self.stats.bytes +=
            std::io::copy(&mut src, &mut dst).context(|| format!("cannot copy {shown}"))?;
        owner_mode(&dst, st).context(|| format!("cannot set the owner of {shown}"))?;
        rustix::fs::futimens(&dst, &times(st)).context(|| format!("cannot set the time of {shown}"))
    }
}

fn uid(st: &Stat) -> Option<rustix::process::Uid> {
    Some(rustix::process::Uid::from_raw(st.st_uid))
}

fn gid(st: &Stat) -> Option<rustix::process::Gid> {
    Some(rustix::process::Gid::from_raw(st.st_gid))
}

/// Owner, then mode (a change of owner clears setuid bits).
fn owner_mode(fd: impl AsFd, st: &Stat) -> rustix::io::Result<()> {
    rustix::fs::fchown(&fd, uid(st), gid(st))?;
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(st.st_mode & 0o7777))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn the_copy_archives_like_the_original() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir_all(src.join("d/e")).unwrap();
        fs::write(src.join("d/file"), b"contents").unwrap();
        fs::set_permissions(src.join("d/file"), fs::Permissions::from_mode(0o4755)).unwrap();
        fs::hard_link(src.join("d/file"), src.join("hard")).unwrap();
        std::os::unix::fs::symlink("/etc/shadow", src.join("link")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            src.join("gone").as_path(),
            FileType::CharacterDevice,
            Mode::empty(),
            rustix::fs::makedev(0, 0),
        )
        .unwrap();
        rustix::fs::setxattr(
            src.join("d/e").as_path(),
            OPAQUE_XATTR,
            b"y",
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
        std::os::unix::fs::lchown(src.join("d/file"), Some(1_000_005), Some(1_000_007)).unwrap();
        fs::set_permissions(src.join("d/file"), fs::Permissions::from_mode(0o4755)).unwrap();
        let dst = tmp.path().join("dst");
        let stats = copy_tree(&src, &dst).unwrap();
        assert_eq!(stats.bytes, 8);
        let tar = |dir: &Path| {
            let mut out = Vec::new();
            crate::layer::write_tree(dir, None, &mut out).unwrap();
            out
        };
        assert_eq!(tar(&src), tar(&dst), "the copy archives differently");
        let meta = fs::metadata(dst.join("d/file")).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o7777),
            (1_000_005, 1_000_007, 0o4755)
        );
        assert_eq!(meta.ino(), fs::metadata(dst.join("hard")).unwrap().ino());
        assert_eq!(
            fs::read_link(dst.join("link")).unwrap(),
            Path::new("/etc/shadow")
        );
        assert!(
            copy_tree(&src, &dst).is_err(),
            "an existing destination is refused"
        );
    }
}
