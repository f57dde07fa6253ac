//! Layers on disk: safe unpacking of a layer tar into a directory in overlayfs lower format, and
//! the deterministic tar of a directory tree (how a layer is made from a sandbox's writable
//! layer: the tar is hashed for the layer's id and unpacked by the same code as an import).
//!
//! Unpacking is the security boundary of the store: the archive comes from anywhere, and the
//! directory it fills is host-root-owned. Every file operation is relative to a directory
//! descriptor inside the layer, one path component at a time with `O_NOFOLLOW`, so:
//!
//! - entries with an absolute path or a `..` component are refused;
//! - an entry whose parent is a symbolic link (`link -> /etc`, then `link/passwd`) is refused
//!   rather than written through; symbolic links themselves are kept as written, since they
//!   are only ever resolved inside the sandbox;
//! - hard links must name an entry already in the layer (not a directory, not a whiteout);
//! - character and block devices are refused (the only device a layer holds is the whiteout
//!   this code makes itself);
//! - owners (numeric ids from the archive), modes (setuid included), modification times and
//!   symbolic links are kept; extended attributes in the archive are ignored.
//!
//! OCI whiteouts become overlayfs ones: `.wh.NAME` is a character device 0:0 named `NAME`, and
//! `.wh..wh..opq` marks its directory with `user.overlay.opaque=y` (the runtime mounts its
//! overlays with `userxattr`). Other `.wh..wh.` names (aufs bookkeeping) are skipped.

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;
use std::rc::Rc;

use rustix::fd::{AsFd, OwnedFd};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps};
use rustix::io::Errno;

use crate::error::{ImageError, IoContext, Result};

/// The extended attribute overlayfs (mounted with `userxattr`) reads to make a directory opaque.
pub const OPAQUE_XATTR: &str = "user.overlay.opaque";
/// Prefix of OCI whiteout names.
const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// The OCI opaque-directory marker.
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
/// Deepest path an entry may have (components): deeper trees would need more descriptors
/// than a process may hold while walking them.
pub const MAX_DEPTH: usize = 256;
/// Longest entry path, in bytes.
const MAX_PATH: usize = 4096;
/// Most bytes the tar reader may consume between two entries: headers, padding, and the GNU
/// long names, PAX records and sparse maps it holds in memory (without a bound of its own).
pub(crate) const MAX_ENTRY_META: u64 = 1 << 20;
/// Most free space an unpack keeps on the store's filesystem (less on a filesystem smaller
/// than 20 times this: 5% of it): a compressed layer may expand a thousandfold, and an
/// import stops before it fills the disk everything else on the host writes to.
const FREE_SPACE_KEPT: u64 = 1 << 30;

/// What an unpack wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UnpackStats {
    /// Archive entries applied (whiteouts and opaque markers included).
    pub entries: u64,
    /// Bytes of file contents written.
    pub bytes: u64,
}

/// Unpacks the layer tar read from `reader` into `dest`, an empty directory only this process
/// uses. `what` names the layer in errors ("layer sha256:…").
pub fn unpack(reader: impl Read, dest: &Path, what: &str) -> Result<UnpackStats> {
    let root = open_dir_path(dest).context(|| format!("cannot open {}", dest.display()))?;
    let mut unpacker = Unpacker {
        root: Rc::new(root),
        what: what.to_string(),
        cache: None,
        dirs: Vec::new(),
        stats: UnpackStats::default(),
        space_check: (0, 0),
    };
    unpacker.check_space()?;
    let budget = Rc::new(Cell::new(MAX_ENTRY_META));
    let mut archive = tar::Archive::new(Budget {
        inner: reader,
        left: budget.clone(),
    });
    let mut entries = archive
        .entries()
        .map_err(|e| ImageError::corrupt(what, e))?;
    loop {
        budget.set(MAX_ENTRY_META);
        let Some(entry) = entries.next() else { break };
        let mut entry = entry.map_err(|e| ImageError::corrupt(what, e))?;
        // The entry's contents are read below, so the next step reads only metadata.
        budget.set(u64::MAX);
        unpacker.entry(&mut entry)?;
        io::copy(&mut entry, &mut io::sink()).map_err(|e| ImageError::corrupt(what, e))?;
    }
    unpacker.finish()?;
    Ok(unpacker.stats)
}

/// A reader that fails once it has read more than the budget in `left` (which its user
/// refills): it bounds what the tar crate reads into memory for one entry's metadata.
pub(crate) struct Budget<R> {
    pub(crate) inner: R,
    pub(crate) left: Rc<Cell<u64>>,
}

impl<R: Read> Read for Budget<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.left.get();
        if left == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("an entry has more than {MAX_ENTRY_META} bytes of long names, PAX records or sparse maps"),
            ));
        }
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.left.set(left - n as u64);
        Ok(n)
    }
}

impl<R: io::Seek> io::Seek for Budget<R> {
    fn seek(&mut self, pos: io::SeekFrom) -> io::Result<u64> {
        self.inner.seek(pos)
    }
}

/// Fails when the filesystem of `fd` has less free space (or fewer free inodes) than an
/// unpack keeps: see [`FREE_SPACE_KEPT`]. `what` names the work in the error. Returns how
/// many bytes may be written before the next check.
pub(crate) fn check_free_space(fd: impl AsFd, what: &str) -> Result<u64> {
    let st = rustix::fs::fstatvfs(fd)
        .context(|| format!("cannot read the free space of the image store ({what})"))?;
    let size = st.f_blocks.saturating_mul(st.f_frsize);
    let kept = FREE_SPACE_KEPT.min(size / 20);
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    let low_inodes = st.f_files > 0 && st.f_favail < st.f_files / 20;
    if free < kept || low_inodes {
        return Err(ImageError::io(
            format!(
                "stopped {what}: the image store's filesystem is nearly full ({} MiB and {} inodes free; an import keeps {} MiB and 5% of inodes free)",
                free >> 20,
                st.f_favail,
                kept >> 20
            ),
            io::Error::from_raw_os_error(Errno::NOSPC.raw_os_error()),
        ));
    }
    // Half the margin, so the next check comes before it is used up.
    Ok((kept / 2).clamp(1 << 20, 64 << 20))
}

/// Host ids of a tree made by a sandbox and the range they shift back into: host id
/// `base + n` is id `n` of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdShift {
    /// First host id of the range (the sandbox's root).
    pub base: u32,
    /// Number of ids in the range.
    pub size: u32,
}

impl IdShift {
    fn apply(&self, id: u32, what: &str, path: &str) -> Result<u32> {
        match id.checked_sub(self.base) {
            Some(n) if n < self.size => Ok(n),
            _ => Err(ImageError::unsafe_entry(
                path,
                format!(
                    "its {what} is host id {id}, outside the range {}..{} it should shift from",
                    self.base,
                    u64::from(self.base) + u64::from(self.size)
                ),
            )),
        }
    }
}

/// Writes a deterministic tar of the tree at `dir` (not including `dir` itself) to `out`:
/// names sorted bytewise, numeric owners shifted by `shift` (when given), modes, modification
/// times (seconds), symbolic links, hard links within the tree, whiteouts as `.wh.NAME` and
/// opaque directories as `.wh..wh..opq`; no user or group names, access or change times.
/// The walk never follows a symbolic link. Sockets are skipped; devices other than whiteouts
/// are refused. Returns the number of entries written.
pub fn write_tree(dir: &Path, shift: Option<IdShift>, out: impl Write) -> Result<u64> {
    let root = open_dir_path(dir).context(|| format!("cannot open {}", dir.display()))?;
    let mut writer = TreeWriter {
        builder: tar::Builder::new(out),
        shift,
        links: HashMap::new(),
        entries: 0,
    };
    writer.dir(&root, &mut Vec::new())?;
    writer
        .builder
        .finish()
        .context(|| "cannot write the layer archive".to_string())?;
    Ok(writer.entries)
}

/// What [`Unpacker::make_room`] found where a new entry goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Room {
    /// Nothing (or something removed).
    Free,
    /// A directory, kept for a directory entry.
    KeptDir,
    /// A whiteout of this layer, removed.
    FreedWhiteout,
}

/// Whether `st` is an overlayfs whiteout (a character device 0:0).
fn is_whiteout(st: &rustix::fs::Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::CharacterDevice && st.st_rdev == 0
}

/// Marks the directory `fd` opaque for overlayfs: nothing of lower layers shows through it.
fn set_opaque(fd: &OwnedFd, shown: &str) -> Result<()> {
    rustix::fs::fsetxattr(fd, OPAQUE_XATTR, b"y", rustix::fs::XattrFlags::empty()).context(|| {
        format!("cannot mark {shown} opaque (does the store's filesystem support user extended attributes?)")
    })
}

/// Opens a directory by host path, refusing a symbolic link as its last component (shared by
/// every walk of a layer or a sandbox's upper: unpack, archive, freeze copy, diff).
pub(crate) fn open_dir_path(path: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Opens the directory `name` of `dir` without following a link (`ENOTDIR` or `ELOOP` when
/// `name` is not a directory or is a link).
pub(crate) fn open_dir_at(dir: impl AsFd, name: &[u8]) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

fn show(components: &[Vec<u8>]) -> String {
    String::from_utf8_lossy(&components.join(&b'/')).into_owned()
}

/// Splits an archive path into its components, dropping empty ones and `.`; refuses absolute
/// paths, `..`, NUL bytes, and paths too long or too deep. The root directory written as
/// `/` alone (as umoci writes it) names the root, like `./`.
fn components(raw: &[u8], shown: &str) -> Result<Vec<Vec<u8>>> {
    let names_root = raw.split(|b| *b == b'/').all(|c| c.is_empty() || c == b".");
    if raw.starts_with(b"/") && !names_root {
        return Err(ImageError::unsafe_entry(
            shown,
            "absolute path (entries must be relative to the layer)",
        ));
    }
    if raw.contains(&0) {
        return Err(ImageError::unsafe_entry(
            shown,
            "the name contains a NUL byte",
        ));
    }
    if raw.len() > MAX_PATH {
        return Err(ImageError::unsafe_entry(
            shown,
            format!("the path is longer than {MAX_PATH} bytes"),
        ));
    }
    let mut out = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                return Err(ImageError::unsafe_entry(
                    shown,
                    "a `..` component (entries must stay inside the layer)",
                ))
            }
            c => out.push(c.to_vec()),
        }
    }
    if out.len() > MAX_DEPTH {
        return Err(ImageError::unsafe_entry(
            shown,
            format!("deeper than {MAX_DEPTH} directories"),
        ));
    }
    Ok(out)
}

/// Sets the owner (`ids`: uid, gid) and `times` of `name` in `dir` without following it
/// (links, fifos); on failure, which of the two (`"owner"` or `"time"`) failed and why.
pub(crate) fn set_owner_time_at(
    dir: impl AsFd,
    name: &[u8],
    (uid, gid): (u32, u32),
    times: &Timestamps,
) -> std::result::Result<(), (&'static str, Errno)> {
    let nofollow = AtFlags::SYMLINK_NOFOLLOW;
    let (uid, gid) = (
        rustix::process::Uid::from_raw(uid),
        rustix::process::Gid::from_raw(gid),
    );
    rustix::fs::chownat(&dir, name, Some(uid), Some(gid), nofollow).map_err(|e| ("owner", e))?;
    rustix::fs::utimensat(&dir, name, times, nofollow).map_err(|e| ("time", e))
}

/// [`set_owner_time_at`], its error naming `shown`.
pub(crate) fn owner_time_at(
    dir: impl AsFd,
    name: &[u8],
    ids: (u32, u32),
    times: &Timestamps,
    shown: &str,
) -> Result<()> {
    set_owner_time_at(dir, name, ids, times)
        .map_err(|(what, e)| ImageError::io(format!("cannot set the {what} of {shown}"), e))
}

/// Owner, mode and time of an entry.
#[derive(Debug, Clone, Copy)]
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
}

impl Meta {
    fn of<R: Read>(entry: &mut tar::Entry<'_, R>, what: &str, shown: &str) -> Result<Self> {
        let bad = |field: &str, e: &dyn std::fmt::Display| {
            ImageError::corrupt(what, format!("entry {shown:?} has a bad {field}: {e}"))
        };
        let header = entry.header();
        let old = header.as_old();
        // An empty numeric field (all NUL or spaces, as some writers leave them) is 0.
        let field = |value: io::Result<u64>, raw: &[u8], name: &str| match value {
            Ok(v) => Ok(v),
            Err(_) if raw.iter().all(|b| *b == 0 || *b == b' ') => Ok(0),
            Err(e) => Err(bad(name, &e)),
        };
        let mode = field(header.mode().map(u64::from), &old.mode, "mode")? as u32 & 0o7777;
        let mut uid = field(header.uid(), &old.uid, "uid")?;
        let mut gid = field(header.gid(), &old.gid, "gid")?;
        let mtime = field(header.mtime(), &old.mtime, "mtime")?;
        // PAX records override the header's (numeric ids beyond the header's range).
        if let Some(pax) = entry.pax_extensions().map_err(|e| bad("pax header", &e))? {
            for ext in pax {
                let ext = ext.map_err(|e| bad("pax header", &e))?;
                let value = || -> Result<u64> {
                    ext.value()
                        .ok()
                        .and_then(|v| v.trim().parse().ok())
                        .ok_or_else(|| bad(ext.key().unwrap_or("pax"), &"not a number"))
                };
                match ext.key_bytes() {
                    b"uid" => uid = value()?,
                    b"gid" => gid = value()?,
                    _ => {}
                }
            }
        }
        // -1 means "leave unchanged" to chown: no entry may own a file as it.
        let id = |v: u64, field: &str| {
            u32::try_from(v)
                .ok()
                .filter(|v| *v != u32::MAX)
                .ok_or_else(|| bad(field, &v))
        };
        Ok(Self {
            mode,
            uid: id(uid, "uid")?,
            gid: id(gid, "gid")?,
            mtime: i64::try_from(mtime).unwrap_or(i64::MAX),
        })
    }

    fn times(&self) -> Timestamps {
        let t = Timespec {
            // Past year 9999 filesystems refuse the time; before 1970 is not worth keeping.
            tv_sec: self.mtime.clamp(0, 253_402_300_799),
            tv_nsec: 0,
        };
        Timestamps {
            last_access: t,
            last_modification: t,
        }
    }
}

struct Unpacker {
    root: Rc<OwnedFd>,
    what: String,
    /// The last parent directory opened, by its components.
    cache: Option<(Vec<Vec<u8>>, Rc<OwnedFd>)>,
    /// Directories made or updated, with their modification times (set at the end: creating
    /// entries inside a directory changes its time).
    dirs: Vec<(Vec<Vec<u8>>, Meta)>,
    stats: UnpackStats,
    /// When to look at the free space again: bytes written, entries made.
    space_check: (u64, u64),
}

/// What a walk to a parent found.
enum Parent {
    Dir(Rc<OwnedFd>),
    Missing,
}

impl Unpacker {
    /// Checks the free space of the layer's filesystem (see [`check_free_space`]) and sets
    /// when to check next.
    fn check_space(&mut self) -> Result<()> {
        let step = check_free_space(&*self.root, &format!("unpacking {}", self.what))?;
        self.space_check = (self.stats.bytes + step, self.stats.entries + 4096);
        Ok(())
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<()> {
        let kind = entry.header().entry_type();
        // A PAX global header carries defaults, not a file.
        if kind == tar::EntryType::XGlobalHeader {
            return Ok(());
        }
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let comps = components(&raw, &shown)?;
        self.stats.entries += 1;
        if self.stats.entries >= self.space_check.1 {
            self.check_space()?;
        }
        let Some((name, parent)) = comps.split_last() else {
            // The layer's root itself (`./`).
            return match kind {
                tar::EntryType::Directory => {
                    let meta = Meta::of(entry, &self.what, &shown)?;
                    let root = self.root.clone();
                    self.set_owner_mode(&root, meta, &shown)?;
                    self.dirs.push((Vec::new(), meta));
                    Ok(())
                }
                _ => Err(ImageError::unsafe_entry(
                    shown,
                    "a non-directory entry naming the layer root",
                )),
            };
        };
        // In a layer `.wh.NAME` means a whiteout: a directory of that name could not be
        // archived again as what it is (`write_tree` would write it as a whiteout).
        if let Some(c) = parent.iter().find(|c| c.starts_with(WHITEOUT_PREFIX)) {
            return Err(ImageError::unsafe_entry(
                shown,
                format!(
                    "its parent {:?} is named like a whiteout (.wh.), which layers use for deletions",
                    String::from_utf8_lossy(c)
                ),
            ));
        }
        if name.as_slice() == OPAQUE_MARKER {
            let dir = self.parent_dir(parent, &shown)?;
            return set_opaque(&dir, &shown);
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.starts_with(WHITEOUT_PREFIX) {
                tracing::debug!(entry = shown, "skipping aufs metadata");
                return Ok(());
            }
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(ImageError::unsafe_entry(
                    shown,
                    "a whiteout that names no file",
                ));
            }
            // The whiteout keeps the entry's owner and time, as any entry does: with the
            // clock's time, the layer's archive would change with the time it was unpacked.
            let meta = Meta::of(entry, &self.what, &shown)?;
            return self.whiteout(parent, hidden, meta, &shown);
        }
        if matches!(kind, tar::EntryType::Char | tar::EntryType::Block) {
            return Err(ImageError::unsafe_entry(
                shown,
                "a device node (images may not contain character or block devices)",
            ));
        }
        let meta = Meta::of(entry, &self.what, &shown)?;
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                self.file(entry, parent, name, meta, &shown)
            }
            tar::EntryType::Directory => self.dir(&comps, meta, &shown),
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| {
                        ImageError::corrupt(
                            &self.what,
                            format!("symbolic link {shown:?} has no target"),
                        )
                    })?;
                self.symlink(parent, name, &target, meta, &shown)
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                self.hardlink(&comps, &target, &shown)
            }
            tar::EntryType::Fifo => self.fifo(parent, name, meta, &shown),
            other => Err(ImageError::Invalid(format!(
                "archive entry {shown:?} has an unsupported type ({:?})",
                other
            ))),
        }
    }

    /// Opens (with `create`, making missing directories 0755 root) the directory `comps`
    /// below the root, one component at a time without following links.
    fn parent(&mut self, comps: &[Vec<u8>], shown: &str, create: bool) -> Result<Parent> {
        if comps.is_empty() {
            return Ok(Parent::Dir(self.root.clone()));
        }
        let (mut dir, start) = match &self.cache {
            Some((path, fd)) if comps.starts_with(path) => (fd.clone(), path.len()),
            _ => (self.root.clone(), 0),
        };
        for (i, name) in comps.iter().enumerate().skip(start) {
            let next = match open_dir_at(&*dir, name) {
                Ok(fd) => fd,
                Err(Errno::NOENT) if !create => return Ok(Parent::Missing),
                Err(Errno::NOENT) => {
                    rustix::fs::mkdirat(&*dir, name.as_slice(), Mode::from_raw_mode(0o755))
                        .context(|| {
                            format!("cannot create the directory {}", show(&comps[..=i]))
                        })?;
                    open_dir_at(&*dir, name)
                        .context(|| format!("cannot open {}", show(&comps[..=i])))?
                }
                Err(Errno::LOOP | Errno::NOTDIR) => {
                    let prefix = show(&comps[..=i]);
                    let st = rustix::fs::statat(&*dir, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW)
                        .context(|| format!("cannot inspect {prefix}"))?;
                    if create && is_whiteout(&st) {
                        // Deleted below and made again in this layer: a new, opaque directory.
                        rustix::fs::unlinkat(&*dir, name.as_slice(), AtFlags::empty())
                            .context(|| format!("cannot replace {prefix}"))?;
                        rustix::fs::mkdirat(&*dir, name.as_slice(), Mode::from_raw_mode(0o755))
                            .context(|| format!("cannot create the directory {prefix}"))?;
                        let fd =
                            open_dir_at(&*dir, name).context(|| format!("cannot open {prefix}"))?;
                        set_opaque(&fd, &prefix)?;
                        dir = Rc::new(fd);
                        continue;
                    }
                    let is_link = FileType::from_raw_mode(st.st_mode) == FileType::Symlink;
                    return Err(ImageError::unsafe_entry(
                        shown,
                        if is_link {
                            format!("its parent {prefix} is a symbolic link; writing through it could leave the layer")
                        } else {
                            format!("its parent {prefix} is not a directory")
                        },
                    ));
                }
                Err(e) => {
                    return Err(ImageError::io(
                        format!("cannot open {}", show(&comps[..=i])),
                        e,
                    ))
                }
            };
            dir = Rc::new(next);
        }
        self.cache = Some((comps.to_vec(), dir.clone()));
        Ok(Parent::Dir(dir))
    }

    fn parent_dir(&mut self, comps: &[Vec<u8>], shown: &str) -> Result<Rc<OwnedFd>> {
        match self.parent(comps, shown, true)? {
            Parent::Dir(d) => Ok(d),
            // Only a walk without `create` finds a parent missing.
            Parent::Missing => Err(ImageError::io(
                format!("cannot create the parents of {shown}"),
                io::Error::from(io::ErrorKind::NotFound),
            )),
        }
    }

    /// Makes room for a new entry `name` in `dir`: removes what is there (a later entry
    /// replaces an earlier one), except a directory when `keep_dir`.
    fn make_room(
        &mut self,
        dir: &OwnedFd,
        name: &[u8],
        keep_dir: bool,
        shown: &str,
    ) -> Result<Room> {
        match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Err(Errno::NOENT) => Ok(Room::Free),
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                if keep_dir {
                    return Ok(Room::KeptDir);
                }
                remove_tree_at(dir, name, 0).context(|| format!("cannot replace {shown}"))?;
                // A cached parent may have been inside what was removed.
                self.cache = None;
                Ok(Room::Free)
            }
            Ok(st) => {
                rustix::fs::unlinkat(dir, name, AtFlags::empty())
                    .context(|| format!("cannot replace {shown}"))?;
                Ok(if is_whiteout(&st) {
                    Room::FreedWhiteout
                } else {
                    Room::Free
                })
            }
            Err(e) => Err(ImageError::io(format!("cannot inspect {shown}"), e)),
        }
    }

    fn set_owner_mode(&self, fd: &OwnedFd, meta: Meta, shown: &str) -> Result<()> {
        // Owner first: chown clears setuid and setgid bits, the mode sets them again.
        rustix::fs::fchown(
            fd,
            Some(rustix::process::Uid::from_raw(meta.uid)),
            Some(rustix::process::Gid::from_raw(meta.gid)),
        )
        .context(|| format!("cannot set the owner of {shown}"))?;
        rustix::fs::fchmod(fd, Mode::from_raw_mode(meta.mode))
            .context(|| format!("cannot set the mode of {shown}"))
    }

    fn file<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        parent: &[Vec<u8>],
        name: &[u8],
        meta: Meta,
        shown: &str,
    ) -> Result<()> {
        let dir = self.parent_dir(parent, shown)?;
        self.make_room(&dir, name, false, shown)?;
        let fd = rustix::fs::openat(
            &*dir,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .context(|| format!("cannot create {shown}"))?;
        let mut file = File::from(fd);
        let mut buf = vec![0u8; 128 << 10];
        loop {
            let n = match entry.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(ImageError::corrupt(
                        &self.what,
                        format!("cannot read {shown}: {e}"),
                    ))
                }
            };
            file.write_all(&buf[..n])
                .context(|| format!("cannot write {shown}"))?;
            self.stats.bytes += n as u64;
            if self.stats.bytes >= self.space_check.0 {
                self.check_space()?;
            }
        }
        let fd = OwnedFd::from(file);
        self.set_owner_mode(&fd, meta, shown)?;
        rustix::fs::futimens(&fd, &meta.times())
            .context(|| format!("cannot set the time of {shown}"))
    }

    fn dir(&mut self, comps: &[Vec<u8>], meta: Meta, shown: &str) -> Result<()> {
        let Some((name, parent)) = comps.split_last() else {
            return Err(ImageError::unsafe_entry(
                shown,
                "a directory entry naming the layer root",
            ));
        };
        let dir = self.parent_dir(parent, shown)?;
        let room = self.make_room(&dir, name, true, shown)?;
        if room != Room::KeptDir {
            rustix::fs::mkdirat(&*dir, name.as_slice(), Mode::from_raw_mode(0o700))
                .context(|| format!("cannot create {shown}"))?;
        }
        let fd = open_dir_at(&*dir, name).context(|| format!("cannot open {shown}"))?;
        if room == Room::FreedWhiteout {
            // Deleted below and made again in this layer: nothing below may show through.
            set_opaque(&fd, shown)?;
        }
        self.set_owner_mode(&fd, meta, shown)?;
        self.dirs.push((comps.to_vec(), meta));
        Ok(())
    }

    fn symlink(
        &mut self,
        parent: &[Vec<u8>],
        name: &[u8],
        target: &[u8],
        meta: Meta,
        shown: &str,
    ) -> Result<()> {
        let dir = self.parent_dir(parent, shown)?;
        self.make_room(&dir, name, false, shown)?;
        let target = CString::new(target)
            .map_err(|_| ImageError::unsafe_entry(shown, "the link target contains a NUL byte"))?;
        rustix::fs::symlinkat(target.as_c_str(), &*dir, name)
            .context(|| format!("cannot create the symbolic link {shown}"))?;
        owner_time_at(&dir, name, (meta.uid, meta.gid), &meta.times(), shown)
    }

    fn fifo(&mut self, parent: &[Vec<u8>], name: &[u8], meta: Meta, shown: &str) -> Result<()> {
        let dir = self.parent_dir(parent, shown)?;
        self.make_room(&dir, name, false, shown)?;
        rustix::fs::mknodat(&*dir, name, FileType::Fifo, Mode::from_raw_mode(0o600), 0)
            .context(|| format!("cannot create the fifo {shown}"))?;
        owner_time_at(&dir, name, (meta.uid, meta.gid), &meta.times(), shown)?;
        // The name was just made as a fifo in a directory only this process writes to.
        rustix::fs::chmodat(
            &*dir,
            name,
            Mode::from_raw_mode(meta.mode),
            AtFlags::empty(),
        )
        .context(|| format!("cannot set the mode of {shown}"))
    }

    fn whiteout(
        &mut self,
        parent: &[Vec<u8>],
        hidden: &[u8],
        meta: Meta,
        shown: &str,
    ) -> Result<()> {
        let dir = self.parent_dir(parent, shown)?;
        match rustix::fs::statat(&*dir, hidden, AtFlags::SYMLINK_NOFOLLOW) {
            // A directory of this same layer stays, and hides the lower one's contents.
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                let fd = open_dir_at(&*dir, hidden).context(|| format!("cannot open {shown}"))?;
                return set_opaque(&fd, shown);
            }
            // Any other entry of this same layer hides the lower one already.
            Ok(_) => return Ok(()),
            Err(Errno::NOENT) => {}
            Err(e) => return Err(ImageError::io(format!("cannot inspect {shown}"), e)),
        }
        rustix::fs::mknodat(
            &*dir,
            hidden,
            FileType::CharacterDevice,
            Mode::empty(),
            rustix::fs::makedev(0, 0),
        )
        .context(|| format!("cannot create the whiteout for {shown}"))?;
        owner_time_at(&dir, hidden, (meta.uid, meta.gid), &meta.times(), shown)
    }

    fn hardlink(&mut self, comps: &[Vec<u8>], target: &[u8], shown: &str) -> Result<()> {
        let outside = || {
            ImageError::unsafe_entry(
                shown,
                format!(
                    "a hard link to {:?}, which points outside the layer",
                    String::from_utf8_lossy(target)
                ),
            )
        };
        let missing = || {
            ImageError::unsafe_entry(
                shown,
                format!(
                    "a hard link to {:?}, which is not in the layer",
                    String::from_utf8_lossy(target)
                ),
            )
        };
        let tcomps = components(target, shown).map_err(|_| outside())?;
        let Some((tname, tparent)) = tcomps.split_last() else {
            return Err(outside());
        };
        if tcomps == comps {
            return Ok(());
        }
        let tdir = match self.parent(tparent, shown, false) {
            Ok(Parent::Dir(d)) => d,
            Ok(Parent::Missing) => return Err(missing()),
            Err(e) => return Err(e),
        };
        match rustix::fs::statat(&*tdir, tname.as_slice(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => match FileType::from_raw_mode(st.st_mode) {
                FileType::Directory => {
                    return Err(ImageError::unsafe_entry(
                        shown,
                        "a hard link to a directory",
                    ))
                }
                FileType::CharacterDevice | FileType::BlockDevice => {
                    return Err(ImageError::unsafe_entry(shown, "a hard link to a whiteout"))
                }
                _ => {}
            },
            Err(Errno::NOENT) => return Err(missing()),
            Err(e) => {
                return Err(ImageError::io(
                    format!("cannot inspect the target of {shown}"),
                    e,
                ))
            }
        }
        let Some((name, parent)) = comps.split_last() else {
            return Err(ImageError::unsafe_entry(
                shown,
                "a hard link naming the layer root",
            ));
        };
        let dir = self.parent_dir(parent, shown)?;
        self.make_room(&dir, name, false, shown)?;
        match rustix::fs::linkat(
            &*tdir,
            tname.as_slice(),
            &*dir,
            name.as_slice(),
            AtFlags::empty(),
        ) {
            Ok(()) => Ok(()),
            // Replacing this entry removed the target (it was inside it).
            Err(Errno::NOENT) => Err(missing()),
            Err(e) => Err(ImageError::io(
                format!("cannot create the hard link {shown}"),
                e,
            )),
        }
    }

    /// Sets the directories' modification times, deepest first.
    fn finish(&mut self) -> Result<()> {
        let mut dirs = std::mem::take(&mut self.dirs);
        dirs.sort_by_key(|(comps, _)| std::cmp::Reverse(comps.len()));
        self.cache = None;
        for (comps, meta) in dirs {
            let shown = show(&comps);
            let fd = match comps.split_last() {
                None => self.root.clone(),
                Some((name, parent)) => {
                    let dir = match self.parent(parent, &shown, false) {
                        Ok(Parent::Dir(dir)) => dir,
                        // A later entry replaced a parent with a link or a file, or removed
                        // it: nothing of this directory is left to date.
                        Ok(Parent::Missing) | Err(ImageError::UnsafeEntry { .. }) => continue,
                        Err(e) => return Err(e),
                    };
                    match open_dir_at(&*dir, name) {
                        Ok(fd) => Rc::new(fd),
                        // Replaced by a later entry: that one's time stands.
                        Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => continue,
                        Err(e) => return Err(ImageError::io(format!("cannot open {shown}"), e)),
                    }
                }
            };
            rustix::fs::futimens(&*fd, &meta.times())
                .context(|| format!("cannot set the time of {shown}"))?;
        }
        Ok(())
    }
}

/// Removes the directory `name` of `dir` and everything in it, without following links.
pub(crate) fn remove_tree_at(dir: &OwnedFd, name: &[u8], depth: usize) -> io::Result<()> {
    if depth > MAX_DEPTH + 1 {
        return Err(io::Error::other("directory tree too deep"));
    }
    let sub = open_dir_at(dir, name)?;
    let mut names = Vec::new();
    let mut listing = rustix::fs::Dir::read_from(&sub)?;
    while let Some(entry) = listing.read() {
        let entry = entry?;
        let n = entry.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push((n.to_vec(), entry.file_type()));
        }
    }
    for (n, kind) in names {
        let is_dir = match kind {
            FileType::Directory => true,
            FileType::Unknown => rustix::fs::statat(&sub, n.as_slice(), AtFlags::SYMLINK_NOFOLLOW)
                .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory),
            _ => false,
        };
        if is_dir {
            remove_tree_at(&sub, &n, depth + 1)?;
        } else {
            rustix::fs::unlinkat(&sub, n.as_slice(), AtFlags::empty())?;
        }
    }
    rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)?;
    Ok(())
}

struct TreeWriter<W: Write> {
    builder: tar::Builder<W>,
    shift: Option<IdShift>,
    /// Files with several links already written, by (device, inode): later names become hard
    /// links to the first.
    links: HashMap<(u64, u64), Vec<u8>>,
    entries: u64,
}

impl<W: Write> TreeWriter<W> {
    fn dir(&mut self, dir: &OwnedFd, path: &mut Vec<Vec<u8>>) -> Result<()> {
        if path.len() > MAX_DEPTH {
            return Err(ImageError::unsafe_entry(
                show(path),
                format!("deeper than {MAX_DEPTH} directories"),
            ));
        }
        let mut names = Vec::new();
        let mut listing =
            rustix::fs::Dir::read_from(dir).context(|| format!("cannot list {}", show(path)))?;
        while let Some(entry) = listing.read() {
            let entry = entry.context(|| format!("cannot list {}", show(path)))?;
            let n = entry.file_name().to_bytes();
            if n != b"." && n != b".." {
                names.push(n.to_vec());
            }
        }
        names.sort();
        for name in names {
            path.push(name);
            let result = self.entry(dir, path);
            path.pop();
            result?;
        }
        Ok(())
    }

    fn header(
        &self,
        st: &rustix::fs::Stat,
        kind: tar::EntryType,
        shown: &str,
    ) -> Result<tar::Header> {
        let (uid, gid) = match &self.shift {
            Some(shift) => (
                shift.apply(st.st_uid, "owner", shown)?,
                shift.apply(st.st_gid, "group", shown)?,
            ),
            None => (st.st_uid, st.st_gid),
        };
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(st.st_mode & 0o7777);
        h.set_uid(u64::from(uid));
        h.set_gid(u64::from(gid));
        h.set_mtime(u64::try_from(st.st_mtime).unwrap_or(0));
        h.set_size(0);
        Ok(h)
    }

    fn append_empty(&mut self, mut header: tar::Header, name: &[u8]) -> Result<()> {
        let shown = String::from_utf8_lossy(name).into_owned();
        self.builder
            .append_data(&mut header, bytes_path(name), io::empty())
            .context(|| format!("cannot add {shown} to the layer archive"))?;
        self.entries += 1;
        Ok(())
    }

    fn entry(&mut self, dir: &OwnedFd, path: &[Vec<u8>]) -> Result<()> {
        let Some(name) = path.last() else {
            return Ok(());
        };
        let joined = path.join(&b'/');
        let shown = String::from_utf8_lossy(&joined).into_owned();
        let st = rustix::fs::statat(dir, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW)
            .context(|| format!("cannot inspect {shown}"))?;
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => {
                let header = self.header(&st, tar::EntryType::Directory, &shown)?;
                let mut dirname = joined.clone();
                dirname.push(b'/');
                self.append_empty(header.clone(), &dirname)?;
                let sub = open_dir_at(dir, name).context(|| format!("cannot open {shown}"))?;
                let mut value = [0u8; 8];
                if let Ok(n) = rustix::fs::fgetxattr(&sub, OPAQUE_XATTR, &mut value) {
                    if &value[..n] == b"y" {
                        let mut marker = header;
                        marker.set_entry_type(tar::EntryType::Regular);
                        marker.set_mode(0o644);
                        let mut name = dirname.clone();
                        name.extend_from_slice(OPAQUE_MARKER);
                        self.append_empty(marker, &name)?;
                    }
                }
                let mut path = path.to_vec();
                self.dir(&sub, &mut path)
            }
            FileType::RegularFile => {
                let mut header = self.header(&st, tar::EntryType::Regular, &shown)?;
                let key = (st.st_dev, st.st_ino);
                if st.st_nlink > 1 {
                    if let Some(first) = self.links.get(&key) {
                        header.set_entry_type(tar::EntryType::Link);
                        let first = first.clone();
                        self.builder
                            .append_link(&mut header, bytes_path(&joined), bytes_path(&first))
                            .context(|| format!("cannot add {shown} to the layer archive"))?;
                        self.entries += 1;
                        return Ok(());
                    }
                    self.links.insert(key, joined.clone());
                }
                let fd = rustix::fs::openat(
                    dir,
                    name.as_slice(),
                    OFlags::RDONLY
                        | OFlags::NOFOLLOW
                        | OFlags::NOCTTY
                        | OFlags::NONBLOCK
                        | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .context(|| format!("cannot open {shown}"))?;
                let now = rustix::fs::fstat(&fd).context(|| format!("cannot inspect {shown}"))?;
                if (now.st_dev, now.st_ino) != key {
                    return Err(ImageError::Invalid(format!(
                        "{shown} was replaced while the layer was being made"
                    )));
                }
                let size = u64::try_from(now.st_size).unwrap_or(0);
                header.set_size(size);
                let reader = Exact {
                    inner: File::from(fd).take(size),
                    left: size,
                    shown: shown.clone(),
                };
                self.builder
                    .append_data(&mut header, bytes_path(&joined), reader)
                    .context(|| format!("cannot add {shown} to the layer archive"))?;
                self.entries += 1;
                Ok(())
            }
            FileType::Symlink => {
                let mut header = self.header(&st, tar::EntryType::Symlink, &shown)?;
                let target = rustix::fs::readlinkat(dir, name.as_slice(), Vec::new())
                    .context(|| format!("cannot read the link {shown}"))?;
                self.builder
                    .append_link(
                        &mut header,
                        bytes_path(&joined),
                        bytes_path(target.as_bytes()),
                    )
                    .context(|| format!("cannot add {shown} to the layer archive"))?;
                self.entries += 1;
                Ok(())
            }
            FileType::CharacterDevice if st.st_rdev == 0 => {
                let mut header = self.header(&st, tar::EntryType::Regular, &shown)?;
                header.set_mode(0o644);
                let mut wh = path[..path.len() - 1].join(&b'/');
                if !wh.is_empty() {
                    wh.push(b'/');
                }
                wh.extend_from_slice(WHITEOUT_PREFIX);
                wh.extend_from_slice(name);
                self.append_empty(header, &wh)
            }
            FileType::CharacterDevice | FileType::BlockDevice => Err(ImageError::unsafe_entry(
                shown,
                "a device node (layers may not contain character or block devices)",
            )),
            FileType::Fifo => {
                let header = self.header(&st, tar::EntryType::Fifo, &shown)?;
                self.append_empty(header, &joined)
            }
            // Sockets cannot be archived (nor used without their process).
            _ => Ok(()),
        }
    }
}

fn bytes_path(bytes: &[u8]) -> &Path {
    use std::os::unix::ffi::OsStrExt;
    Path::new(std::ffi::OsStr::from_bytes(bytes))
}

/// A reader of exactly `left` bytes: a file that shrank while being archived is an error,
/// not a short entry.
struct Exact<R> {
    inner: R,
    left: u64,
    shown: String,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.left > 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} shrank while the layer was being made", self.shown),
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests;
