//! File operations resolved inside the sandbox root only.
//!
//! The root is opened once. Every client path is then resolved with `openat2` and
//! `RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS`: `..` stops at the root, absolute paths and absolute
//! symlinks are taken relative to it, and `/proc/<pid>/root`-style magic links are refused. For
//! operations on a final name (create, remove, rename, stat) only the *parent* directory is
//! resolved that way; the final name is then handled by an `*at` syscall that does not follow a
//! symlink there. Nothing here ever passes a client path to a syscall that resolves it from the
//! agent's own root or working directory.
//!
//! Whatever a path resolves to, the descriptor it opened is checked before it is used: nothing on
//! procfs is served (`/proc/self` is the agent itself, pid 1, and `/proc/<pid>` of a sandbox
//! process is better read by a command running inside), and nothing on sysfs is written.

use std::ffi::{CStr, CString};
use std::path::Path;

use openrun_protocol::{AgentError, ErrorCode, FileKind, FileStat, MAX_DATA_LEN, MAX_HEADER_LEN};
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::fs::{AtFlags, Dir, FileType, FsWord, Mode, OFlags, ResolveFlags, Stat};
use rustix::io::Errno;

use crate::errors::errno_error;

/// Flags used for every resolution under the root.
const RESOLVE: ResolveFlags = ResolveFlags::IN_ROOT.union(ResolveFlags::NO_MAGICLINKS);
/// How often to retry a resolution the kernel aborted with `EAGAIN` (a rename or mount anywhere
/// on the machine while `..` was being resolved: on a busy host, sandboxes being created mount
/// all the time, so retries back off to let such a burst pass).
const RESOLVE_RETRIES: u32 = 64;
/// Pause after the first immediate retries, growing by this much per retry (at most ~200 ms in
/// all before giving up).
const RESOLVE_BACKOFF: std::time::Duration = std::time::Duration::from_micros(100);
/// Deepest directory tree a recursive remove descends into (one open descriptor per level).
const MAX_REMOVE_DEPTH: usize = 512;
/// Names a recursive remove reads from one directory at a time.
const REMOVE_BATCH: usize = 128;
/// Longest path accepted (the kernel's `PATH_MAX`; longer ones could never resolve).
const MAX_PATH_LEN: usize = 4096;
/// Default permission bits of a new file.
const DEFAULT_FILE_MODE: u32 = 0o644;
/// Default permission bits of a new directory.
const DEFAULT_DIR_MODE: u32 = 0o755;
/// JSON a listing's entries may take: the frame header limit, less room for the response
/// around them.
const LIST_BUDGET: usize = MAX_HEADER_LEN - 4096;
/// Entries a listing counts (without keeping them) once it is over budget, for the message.
const MAX_COUNTED_ENTRIES: usize = 10_000_000;
/// A read buffer starts at most this large and grows as data arrives (file sizes can lie or
/// change), so a small read never allocates the whole limit up front.
const INITIAL_READ_BUFFER: usize = 64 * 1024;
/// `f_type` of procfs.
const PROC_SUPER_MAGIC: FsWord = rustix::fs::PROC_SUPER_MAGIC;
/// `f_type` of sysfs.
const SYSFS_MAGIC: FsWord = 0x6265_6572;

/// What an operation does with what it opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Reads (read, list, stat).
    Read,
    /// Creates, changes or removes something.
    Write,
}

/// The sandbox root and the operations on paths below it.
#[derive(Debug)]
pub(crate) struct Files {
    root: OwnedFd,
}

/// A path split into the directory that holds the final name, and that name.
#[derive(Debug, PartialEq, Eq)]
struct SplitPath {
    parent: String,
    /// `None` when the path names the root itself or ends in `..`.
    name: Option<String>,
}

/// What [`Files::stamp`] tells about a file: any change of its contents (in place or by
/// replacing it) changes the stamp, except one within the same tick of the file system's
/// clock as the previous change (see [`FileStamp::settled`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileStamp {
    dev: u64,
    ino: u64,
    size: i64,
    mtime: (i64, i64),
    /// Set by the kernel on every change of the file (contents or metadata); unlike the
    /// modification time, no process can set it.
    ctime: (i64, i64),
}

impl FileStamp {
    /// Whether the last change is older than `margin` before `now` (seconds and nanoseconds
    /// since the epoch): a later change then gets a later change time, whatever the clock's
    /// granularity, so the stamp is a safe cache key. A change more recent than that could
    /// be followed, within the same clock tick, by another one the stamp would not show.
    pub(crate) fn settled(&self, now: std::time::Duration, margin: std::time::Duration) -> bool {
        let (sec, nsec) = self.ctime;
        let Ok(sec) = u64::try_from(sec) else {
            return false;
        };
        let changed = std::time::Duration::new(sec, nsec.clamp(0, 999_999_999) as u32);
        changed.saturating_add(margin) < now
    }
}

/// What a read returned.
#[derive(Debug)]
pub(crate) struct ReadResult {
    /// Size of the whole file.
    pub(crate) size: u64,
    /// The requested bytes.
    pub(crate) data: Vec<u8>,
}

impl Files {
    /// Opens `root` once; all later operations resolve beneath this descriptor.
    pub(crate) fn open(root: &Path) -> std::io::Result<Self> {
        let root = rustix::fs::open(
            root,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Self { root })
    }

    /// `openat2` under the root with the given resolve flags, retrying `EAGAIN`.
    fn openat2_raw(
        &self,
        path: &str,
        flags: OFlags,
        mode: Mode,
        resolve: ResolveFlags,
    ) -> Result<OwnedFd, Errno> {
        let path = if path.is_empty() { "." } else { path };
        let mut last = Errno::AGAIN;
        for attempt in 0..RESOLVE_RETRIES {
            match rustix::fs::openat2(&self.root, path, flags | OFlags::CLOEXEC, mode, resolve) {
                Err(Errno::AGAIN) => last = Errno::AGAIN,
                Err(Errno::INTR) => last = Errno::INTR,
                other => return other,
            }
            if attempt >= 4 {
                std::thread::sleep(RESOLVE_BACKOFF * (attempt - 3));
            }
        }
        Err(last)
    }

    /// Opens `path` inside the root (following symlinks, but only within the root), refusing
    /// what the file API does not serve there (see [`check_served`]).
    fn open_in_root(
        &self,
        path: &str,
        flags: OFlags,
        mode: Mode,
        access: Access,
    ) -> Result<OwnedFd, AgentError> {
        let fd = self
            .openat2_raw(path, flags, mode, RESOLVE)
            .map_err(|errno| self.resolve_error(path, errno))?;
        check_served(fd.as_fd(), path, access)?;
        Ok(fd)
    }

    /// Whether `path` is a directory inside the root (magic links are not followed).
    pub(crate) fn is_dir(&self, path: &str) -> bool {
        !path.contains('\0')
            && self
                .openat2_raw(
                    path,
                    OFlags::PATH | OFlags::DIRECTORY,
                    Mode::empty(),
                    RESOLVE,
                )
                .is_ok()
    }

    /// Identity and change times of the file at `path` inside the root (magic links are not
    /// followed), for caches of its contents; `None` when it cannot be looked at.
    pub(crate) fn stamp(&self, path: &str) -> Option<FileStamp> {
        if path.contains('\0') {
            return None;
        }
        let fd = self
            .openat2_raw(path, OFlags::PATH, Mode::empty(), RESOLVE)
            .ok()?;
        let st = rustix::fs::fstat(&fd).ok()?;
        Some(FileStamp {
            dev: st.st_dev as u64,
            ino: st.st_ino as u64,
            size: st.st_size as i64,
            mtime: (st.st_mtime as i64, st.st_mtime_nsec as i64),
            ctime: (st.st_ctime as i64, st.st_ctime_nsec as i64),
        })
    }

    /// Classifies a resolution failure. `EXDEV` from a scoped lookup means it tried to leave the
    /// root; `ELOOP` is either a refused magic link or a real symlink loop, which a second,
    /// harmless `O_PATH` probe without `RESOLVE_NO_MAGICLINKS` tells apart (a magic link then
    /// fails with `EXDEV`, because `RESOLVE_IN_ROOT` never follows one either).
    fn resolve_error(&self, path: &str, errno: Errno) -> AgentError {
        match errno {
            Errno::XDEV => outside(path),
            Errno::LOOP => {
                match self.openat2_raw(path, OFlags::PATH, Mode::empty(), ResolveFlags::IN_ROOT) {
                    Err(Errno::LOOP) => errno_error(Errno::LOOP, path),
                    _ => outside(path),
                }
            }
            other => errno_error(other, path),
        }
    }

    /// Opens the directory that holds `split`'s final name; `path` is the full path, named in
    /// errors.
    fn open_parent(
        &self,
        split: &SplitPath,
        path: &str,
        flags: OFlags,
        access: Access,
    ) -> Result<OwnedFd, AgentError> {
        let fd = self
            .openat2_raw(
                &split.parent,
                flags | OFlags::DIRECTORY,
                Mode::empty(),
                RESOLVE,
            )
            .map_err(|errno| self.resolve_error(&split.parent, errno))?;
        check_served(fd.as_fd(), path, access)?;
        Ok(fd)
    }

    /// Reads up to `limit` bytes (capped at [`MAX_DATA_LEN`]) from `offset`.
    pub(crate) fn read_file(
        &self,
        path: &str,
        offset: u64,
        limit: Option<u64>,
    ) -> Result<ReadResult, AgentError> {
        check_path(path)?;
        let fd = self.open_in_root(
            path,
            OFlags::RDONLY | OFlags::NOCTTY | OFlags::NONBLOCK,
            Mode::empty(),
            Access::Read,
        )?;
        let st = rustix::fs::fstat(&fd).map_err(|e| errno_error(e, path))?;
        let kind = FileType::from_raw_mode(st.st_mode);
        let max = limit
            .unwrap_or(MAX_DATA_LEN as u64)
            .min(MAX_DATA_LEN as u64) as usize;
        let size = u64::try_from(st.st_size).unwrap_or(0);
        let data = match kind {
            FileType::RegularFile => {
                let expected = usize::try_from(size.saturating_sub(offset)).unwrap_or(usize::MAX);
                pread_up_to(&fd, offset, max, expected).map_err(|e| errno_error(e, path))?
            }
            FileType::CharacterDevice if offset == 0 => {
                read_up_to(&fd, max).map_err(|e| errno_error(e, path))?
            }
            FileType::CharacterDevice => {
                return Err(AgentError::new(
                    ErrorCode::InvalidArgument,
                    format!("a device cannot be read at an offset: {path}"),
                ))
            }
            FileType::Directory => return Err(errno_error(Errno::ISDIR, path)),
            _ => {
                return Err(AgentError::new(
                    ErrorCode::InvalidArgument,
                    format!("not a regular file: {path}"),
                ))
            }
        };
        Ok(ReadResult { size, data })
    }

    /// Reads a small file whole; `None` when it does not exist. A file larger than `max` bytes
    /// is refused (not cut short: a truncated user database would be misread).
    pub(crate) fn read_small(&self, path: &str, max: usize) -> Result<Option<Vec<u8>>, AgentError> {
        let limit = (max as u64).saturating_add(1);
        match self.read_file(path, 0, Some(limit)) {
            Ok(r) if r.size > max as u64 || r.data.len() > max => Err(AgentError::new(
                ErrorCode::TooLarge,
                format!("{path} is larger than {max} bytes, the most the agent reads of it"),
            )),
            Ok(r) => Ok(Some(r.data)),
            Err(e) if e.code == ErrorCode::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes `data` to `path`: atomically (temporary file, fsync, rename) unless `append`.
    pub(crate) fn write_file(
        &self,
        path: &str,
        data: &[u8],
        mode: Option<u32>,
        parents: bool,
        append: bool,
    ) -> Result<(), AgentError> {
        check_path(path)?;
        let split = split_path(path);
        let Some(name) = split.name.as_deref() else {
            return Err(errno_error(Errno::ISDIR, path));
        };
        if parents {
            self.mkdir_all(&split.parent, None, path)?;
        }
        let new_mode = Mode::from_raw_mode(mode.unwrap_or(DEFAULT_FILE_MODE) & 0o7777);
        if append {
            return self.append_file(path, data, new_mode);
        }
        let dir = self.open_parent(&split, path, OFlags::RDONLY, Access::Write)?;

        // Keep an existing file's permissions and owner; refuse to replace a directory.
        let existing = match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => match FileType::from_raw_mode(st.st_mode) {
                FileType::Directory => return Err(errno_error(Errno::ISDIR, path)),
                FileType::RegularFile => Some(st),
                // A symlink or special file at the name is replaced by the new file.
                _ => None,
            },
            Err(Errno::NOENT) => None,
            Err(e) => return Err(errno_error(e, path)),
        };

        let (tmp_name, tmp) = create_temp(&dir, name).map_err(|e| errno_error(e, path))?;
        let result = (|| {
            write_all(&tmp, data)?;
            match &existing {
                Some(st) => {
                    rustix::fs::fchmod(&tmp, Mode::from_raw_mode(st.st_mode & 0o7777))?;
                    // Best effort: only a privileged agent can give the file away.
                    let _ = rustix::fs::fchown(
                        &tmp,
                        Some(rustix::fs::Uid::from_raw(st.st_uid)),
                        Some(rustix::fs::Gid::from_raw(st.st_gid)),
                    );
                }
                None => rustix::fs::fchmod(&tmp, new_mode)?,
            }
            rustix::fs::fsync(&tmp)?;
            rustix::fs::renameat(&dir, tmp_name.as_c_str(), &dir, name)
        })();
        if let Err(e) = result {
            let _ = rustix::fs::unlinkat(&dir, tmp_name.as_c_str(), AtFlags::empty());
            return Err(errno_error(e, path));
        }
        // Make the rename itself durable; failure here does not undo the write.
        let _ = rustix::fs::fsync(&dir);
        Ok(())
    }

    fn append_file(&self, path: &str, data: &[u8], new_mode: Mode) -> Result<(), AgentError> {
        let flags = OFlags::WRONLY | OFlags::APPEND | OFlags::NOCTTY | OFlags::NONBLOCK;
        let fd = match self.openat2_raw(
            path,
            flags | OFlags::CREATE | OFlags::EXCL,
            new_mode,
            RESOLVE,
        ) {
            Ok(fd) => {
                check_served(fd.as_fd(), path, Access::Write)?;
                // Newly created: set the exact mode, independent of the umask.
                rustix::fs::fchmod(&fd, new_mode).map_err(|e| errno_error(e, path))?;
                fd
            }
            Err(Errno::EXIST) => self.open_in_root(path, flags, Mode::empty(), Access::Write)?,
            Err(e) => return Err(self.resolve_error(path, e)),
        };
        let st = rustix::fs::fstat(&fd).map_err(|e| errno_error(e, path))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(AgentError::new(
                ErrorCode::InvalidArgument,
                format!("not a regular file: {path}"),
            ));
        }
        write_all(&fd, data).map_err(|e| errno_error(e, path))?;
        rustix::fs::fsync(&fd).map_err(|e| errno_error(e, path))
    }

    /// Lists a directory, sorted by name, without following symlinks in the entries. A listing
    /// that would not fit in one response is refused with [`ErrorCode::TooLarge`] as soon as
    /// that is clear, before it takes much memory.
    pub(crate) fn list_dir(&self, path: &str) -> Result<Vec<FileStat>, AgentError> {
        check_path(path)?;
        let fd = self.open_in_root(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY,
            Mode::empty(),
            Access::Read,
        )?;
        let mut dir = Dir::read_from(&fd).map_err(|e| errno_error(e, path))?;
        let mut entries = Vec::new();
        let mut json_len = 0usize;
        let mut over_budget = false;
        let mut count = 0usize;
        while let Some(entry) = dir.read() {
            let entry = entry.map_err(|e| errno_error(e, path))?;
            let name = entry.file_name();
            if name == c"." || name == c".." {
                continue;
            }
            count += 1;
            if over_budget {
                // Only counted, for the message.
                if count >= MAX_COUNTED_ENTRIES {
                    break;
                }
                continue;
            }
            match rustix::fs::statat(&fd, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => {
                    let display = String::from_utf8_lossy(name.to_bytes()).into_owned();
                    let stat = file_stat(display, &st, fd.as_fd(), name);
                    json_len = json_len.saturating_add(json_len_of(&stat).saturating_add(1));
                    if json_len > LIST_BUDGET {
                        over_budget = true;
                        entries = Vec::new();
                    } else {
                        entries.push(stat);
                    }
                }
                // Removed since the listing was read.
                Err(Errno::NOENT) => count -= 1,
                Err(e) => return Err(errno_error(e, path)),
            }
        }
        if over_budget {
            let more = if count >= MAX_COUNTED_ENTRIES {
                "at least "
            } else {
                ""
            };
            return Err(AgentError::new(
                ErrorCode::TooLarge,
                format!(
                    "directory has too many entries to list at once ({more}{count}): {path}; \
                     list its subdirectories or run a command such as ls instead"
                ),
            ));
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    }

    /// Opens the directory `path` (for reading its entries and opening names in it) to watch it
    /// (`crate::watch`): resolved inside the root like every path here; not on procfs.
    pub(crate) fn open_dir(&self, path: &str) -> Result<OwnedFd, AgentError> {
        check_path(path)?;
        self.open_in_root(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NONBLOCK,
            Mode::empty(),
            Access::Read,
        )
    }

    /// Stats a path without following a final symlink.
    pub(crate) fn stat(&self, path: &str) -> Result<FileStat, AgentError> {
        check_path(path)?;
        let split = split_path(path);
        match split.name.as_deref() {
            None => {
                let fd = self.open_in_root(
                    path,
                    OFlags::PATH | OFlags::DIRECTORY,
                    Mode::empty(),
                    Access::Read,
                )?;
                let st = rustix::fs::fstat(&fd).map_err(|e| errno_error(e, path))?;
                Ok(file_stat(path.to_string(), &st, fd.as_fd(), c""))
            }
            Some(name) => {
                let dir = self.open_parent(&split, path, OFlags::PATH, Access::Read)?;
                let st = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| errno_error(e, path))?;
                let cname = CString::new(name).map_err(|_| nul_in_path())?;
                Ok(file_stat(path.to_string(), &st, dir.as_fd(), &cname))
            }
        }
    }

    /// Creates a directory; with `parents`, every missing ancestor too, succeeding if it exists.
    pub(crate) fn mkdir(
        &self,
        path: &str,
        parents: bool,
        mode: Option<u32>,
    ) -> Result<(), AgentError> {
        check_path(path)?;
        let mode = mode.map(|m| m & 0o7777);
        if parents {
            return self.mkdir_all(path, mode, path);
        }
        let split = split_path(path);
        let Some(name) = split.name.as_deref() else {
            return Err(errno_error(Errno::EXIST, path));
        };
        let dir = self.open_parent(&split, path, OFlags::PATH, Access::Write)?;
        let create_mode = Mode::from_raw_mode(mode.unwrap_or(DEFAULT_DIR_MODE));
        rustix::fs::mkdirat(&dir, name, create_mode).map_err(|e| errno_error(e, path))?;
        if let Some(mode) = mode {
            chmod_new_dir(&dir, name, mode).map_err(|e| errno_error(e, path))?;
        }
        Ok(())
    }

    /// `mkdir -p`: walks the path from the root, creating what is missing. Each prefix is
    /// resolved from the root again, so symlinked ancestors behave as they do for every other
    /// operation (followed, but only inside the root). `mode` applies to the final directory
    /// when it is created here; `report` is the path named in errors.
    fn mkdir_all(&self, path: &str, mode: Option<u32>, report: &str) -> Result<(), AgentError> {
        let comps = components(path);
        for i in 0..comps.len() {
            let prefix = join(&comps[..=i]);
            let is_last = i + 1 == comps.len();
            match self.openat2_raw(
                &prefix,
                OFlags::PATH | OFlags::DIRECTORY,
                Mode::empty(),
                RESOLVE,
            ) {
                Ok(_) => continue,
                Err(Errno::NOENT) => {}
                Err(Errno::NOTDIR) if is_last => {
                    return Err(AgentError::new(
                        ErrorCode::AlreadyExists,
                        format!("already exists and is not a directory: {report}"),
                    ))
                }
                Err(Errno::NOTDIR) => return Err(errno_error(Errno::NOTDIR, report)),
                Err(e) => return Err(self.resolve_error(report, e)),
            }
            let parent = self.open_in_root(
                &join(&comps[..i]),
                OFlags::PATH | OFlags::DIRECTORY,
                Mode::empty(),
                Access::Write,
            )?;
            let name = comps[i];
            let create_mode = match (is_last, mode) {
                (true, Some(m)) => m,
                _ => DEFAULT_DIR_MODE,
            };
            match rustix::fs::mkdirat(&parent, name, Mode::from_raw_mode(create_mode)) {
                Ok(()) => {
                    if let (true, Some(m)) = (is_last, mode) {
                        chmod_new_dir(&parent, name, m).map_err(|e| errno_error(e, report))?;
                    }
                }
                // Created concurrently: fine if it is a directory.
                Err(Errno::EXIST) => {
                    self.openat2_raw(
                        &prefix,
                        OFlags::PATH | OFlags::DIRECTORY,
                        Mode::empty(),
                        RESOLVE,
                    )
                    .map_err(|_| {
                        AgentError::new(
                            ErrorCode::AlreadyExists,
                            format!("already exists and is not a directory: {report}"),
                        )
                    })?;
                }
                Err(e) => return Err(errno_error(e, report)),
            }
        }
        Ok(())
    }

    /// Removes a file, symlink or empty directory; with `recursive`, a whole tree. Symlinks are
    /// unlinked, never followed, and the walk does not cross into other mounts.
    pub(crate) fn remove(&self, path: &str, recursive: bool) -> Result<(), AgentError> {
        check_path(path)?;
        let split = split_path(path);
        let Some(name) = split.name.as_deref() else {
            return Err(AgentError::new(
                ErrorCode::InvalidArgument,
                format!("refusing to remove the sandbox root or a path ending in '..': {path}"),
            ));
        };
        let dir = self.open_parent(&split, path, OFlags::PATH, Access::Write)?;
        let st = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| errno_error(e, path))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
            return rustix::fs::unlinkat(&dir, name, AtFlags::empty())
                .map_err(|e| errno_error(e, path));
        }
        if recursive {
            let sub = open_subdir(&dir, name).map_err(|e| errno_error(e, path))?;
            check_served(sub.as_fd(), path, Access::Write)?;
            let sub = Dir::new(sub).map_err(|e| errno_error(e, path))?;
            let mut walk = path.trim_end_matches('/').to_string();
            remove_contents(sub, st.st_dev, &mut walk, 0)?;
        }
        rustix::fs::unlinkat(&dir, name, AtFlags::REMOVEDIR).map_err(|e| errno_error(e, path))
    }

    /// Creates a symbolic link at `path` holding `target`. Only the parent of `path` is
    /// resolved (inside the root); `target` is text, never resolved here. An existing name
    /// (even a dangling link) is [`ErrorCode::AlreadyExists`]: nothing is replaced or followed.
    pub(crate) fn symlink(
        &self,
        target: &str,
        path: &str,
        parents: bool,
    ) -> Result<(), AgentError> {
        check_path(path)?;
        if target.is_empty() {
            return Err(AgentError::new(
                ErrorCode::InvalidArgument,
                "symlink target is empty",
            ));
        }
        if target.contains('\0') {
            return Err(AgentError::new(
                ErrorCode::InvalidArgument,
                "symlink target contains a nul byte",
            ));
        }
        if target.len() > MAX_PATH_LEN {
            return Err(AgentError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "symlink target is too long ({} bytes; the limit is {MAX_PATH_LEN})",
                    target.len()
                ),
            ));
        }
        let split = split_path(path);
        let Some(name) = split.name.as_deref() else {
            return Err(errno_error(Errno::EXIST, path));
        };
        if parents {
            self.mkdir_all(&split.parent, None, path)?;
        }
        let dir = self.open_parent(&split, path, OFlags::PATH, Access::Write)?;
        rustix::fs::symlinkat(target, &dir, name).map_err(|e| errno_error(e, path))
    }

    /// Renames `from` to `to`; neither final name is followed if it is a symlink.
    pub(crate) fn rename(&self, from: &str, to: &str) -> Result<(), AgentError> {
        check_path(from)?;
        check_path(to)?;
        let (src, dst) = (split_path(from), split_path(to));
        let (Some(src_name), Some(dst_name)) = (src.name.as_deref(), dst.name.as_deref()) else {
            return Err(AgentError::new(
                ErrorCode::InvalidArgument,
                format!("cannot rename the sandbox root or a path ending in '..': {from} -> {to}"),
            ));
        };
        let src_dir = self.open_parent(&src, from, OFlags::PATH, Access::Write)?;
        let dst_dir = self.open_parent(&dst, to, OFlags::PATH, Access::Write)?;
        match rustix::fs::renameat(&src_dir, src_name, &dst_dir, dst_name) {
            Ok(()) => Ok(()),
            Err(Errno::XDEV) => Err(AgentError::new(
                ErrorCode::InvalidArgument,
                format!("cannot rename across file systems: {from} -> {to}"),
            )),
            Err(e @ (Errno::EXIST | Errno::NOTEMPTY | Errno::ISDIR | Errno::NOTDIR)) => {
                Err(errno_error(e, to))
            }
            Err(e) => Err(errno_error(e, from)),
        }
    }
}

fn outside(path: &str) -> AgentError {
    AgentError::new(
        ErrorCode::OutsideSandbox,
        format!("path leaves the sandbox root: {path}"),
    )
}

/// Whether a recursive watch descends into the directory `fd` (`crate::watch`): not into
/// procfs or sysfs (thousands of entries that are not files anybody edits; procfs is not
/// served at all).
pub(crate) fn watchable_subdir(fd: BorrowedFd<'_>) -> bool {
    rustix::fs::fstatfs(fd).is_ok_and(|fs| !matches!(fs.f_type, PROC_SUPER_MAGIC | SYSFS_MAGIC))
}

/// Refuses a descriptor on a file system the file API does not serve: procfs for anything
/// (`/proc/self` is the agent, pid 1: its memory map, environment, descriptors), sysfs for
/// writes. Reads of sysfs are harmless and allowed.
fn check_served(fd: BorrowedFd<'_>, path: &str, access: Access) -> Result<(), AgentError> {
    let fs = rustix::fs::fstatfs(fd).map_err(|e| errno_error(e, path))?;
    refuse_file_system(fs.f_type, path, access)
}

fn refuse_file_system(f_type: FsWord, path: &str, access: Access) -> Result<(), AgentError> {
    match f_type {
        PROC_SUPER_MAGIC => Err(AgentError::new(
            ErrorCode::PermissionDenied,
            format!("{path} is on /proc, which the file API does not serve; run a command instead"),
        )),
        SYSFS_MAGIC if access == Access::Write => Err(AgentError::new(
            ErrorCode::PermissionDenied,
            format!(
                "{path} is on /sys, which the file API does not write to; run a command instead"
            ),
        )),
        _ => Ok(()),
    }
}

/// Length of an entry as JSON, without building the text.
fn json_len_of(value: &FileStat) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 = self.0.saturating_add(buf.len());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    match serde_json::to_writer(&mut count, value) {
        Ok(()) => count.0,
        // Cannot happen for a `FileStat`; count it as too large to send.
        Err(_) => usize::MAX,
    }
}

fn nul_in_path() -> AgentError {
    AgentError::new(ErrorCode::InvalidArgument, "path contains a nul byte")
}

fn check_path(path: &str) -> Result<(), AgentError> {
    if path.is_empty() {
        return Err(AgentError::new(ErrorCode::InvalidArgument, "path is empty"));
    }
    if path.contains('\0') {
        return Err(nul_in_path());
    }
    if path.len() > MAX_PATH_LEN {
        return Err(AgentError::new(
            ErrorCode::InvalidArgument,
            format!(
                "path is too long ({} bytes; the limit is {MAX_PATH_LEN})",
                path.len()
            ),
        ));
    }
    Ok(())
}

/// The non-empty, non-`.` components of `path`.
fn components(path: &str) -> Vec<&str> {
    path.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect()
}

fn join(comps: &[&str]) -> String {
    format!("/{}", comps.join("/"))
}

/// Splits `path` lexically into parent and final name (trailing slashes and `.` ignored).
fn split_path(path: &str) -> SplitPath {
    let comps = components(path);
    match comps.split_last() {
        Some((last, rest)) if *last != ".." => SplitPath {
            parent: join(rest),
            name: Some((*last).to_string()),
        },
        _ => SplitPath {
            parent: path.to_string(),
            name: None,
        },
    }
}

pub(crate) fn open_subdir(dir: impl AsFd, name: impl rustix::path::Arg) -> Result<OwnedFd, Errno> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

fn chmod_new_dir(parent: &OwnedFd, name: &str, mode: u32) -> Result<(), Errno> {
    let fd = open_subdir(parent, name)?;
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))
}

/// Up to `max` more entry names from `dir`, without `.` and `..`; empty at the end.
fn read_batch(dir: &mut Dir, max: usize) -> Result<Vec<CString>, Errno> {
    let mut names = Vec::new();
    while names.len() < max {
        let Some(entry) = dir.read() else {
            break;
        };
        let entry = entry?;
        let name = entry.file_name();
        if name == c"." || name == c".." {
            continue;
        }
        names.push(name.to_owned());
    }
    Ok(names)
}

/// Empties the directory `dir` (on device `dev`) depth-first. Every descent opens the child
/// with `O_NOFOLLOW | O_DIRECTORY` relative to its parent, so a symlink (even one swapped in
/// during the walk) is never entered. Names are read [`REMOVE_BATCH`] at a time and one path
/// buffer (`path`, for messages) serves the whole walk, so a huge or deep tree the sandbox built
/// costs little memory.
fn remove_contents(
    mut dir: Dir,
    dev: u64,
    path: &mut String,
    depth: usize,
) -> Result<(), AgentError> {
    if depth >= MAX_REMOVE_DEPTH {
        return Err(AgentError::new(
            ErrorCode::TooLarge,
            format!("directory tree too deep to remove: {path}"),
        ));
    }
    loop {
        let batch = read_batch(&mut dir, REMOVE_BATCH).map_err(|e| errno_error(e, path))?;
        if batch.is_empty() {
            return Ok(());
        }
        // Only `*at` calls use the stream's descriptor: they do not move its position.
        let fd = dir.fd().map_err(|e| errno_error(e, path))?;
        for name in &batch {
            let len = path.len();
            path.push('/');
            path.push_str(&name.to_string_lossy());
            let result = remove_entry(fd, name, dev, path, depth);
            path.truncate(len);
            result?;
        }
    }
}

/// Removes `name` from `dir` (recursively, for a directory); `path` names it in messages.
fn remove_entry(
    dir: BorrowedFd<'_>,
    name: &CStr,
    dev: u64,
    path: &mut String,
    depth: usize,
) -> Result<(), AgentError> {
    let st = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(errno_error(e, path)),
    };
    let flags = if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
        if st.st_dev != dev {
            return Err(AgentError::new(
                ErrorCode::PermissionDenied,
                format!("refusing to remove across a mount point: {path}"),
            ));
        }
        let sub = open_subdir(dir, name).map_err(|e| errno_error(e, path))?;
        let sub = Dir::new(sub).map_err(|e| errno_error(e, path))?;
        remove_contents(sub, dev, path, depth + 1)?;
        AtFlags::REMOVEDIR
    } else {
        AtFlags::empty()
    };
    match rustix::fs::unlinkat(dir, name, flags) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(errno_error(e, path)),
    }
}

/// Marks the temporary files of atomic writes: `.{stem}{TEMP_MARK}{16 hex digits}`.
const TEMP_MARK: &str = ".openrun-tmp-";

/// Whether `name` (a final component) is one of [`create_temp`]'s temporary files, which
/// directory watches hide (`crate::watch`).
pub(crate) fn is_temp_name(name: &[u8]) -> bool {
    let Some(tag) = name.len().checked_sub(16).map(|at| &name[at..]) else {
        return false;
    };
    let head = &name[..name.len() - 16];
    name.first() == Some(&b'.')
        && head.ends_with(TEMP_MARK.as_bytes())
        && tag
            .iter()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// Creates a fresh temporary file next to `name` in `dir` (never following a symlink).
fn create_temp(dir: &OwnedFd, name: &str) -> Result<(CString, OwnedFd), Errno> {
    // Keep the temporary name well below NAME_MAX whatever the original's length.
    let mut stem = String::new();
    for c in name.chars() {
        if stem.len() + c.len_utf8() > 64 {
            break;
        }
        stem.push(c);
    }
    let mut last = Errno::EXIST;
    for _ in 0..16 {
        let mut rnd = [0u8; 8];
        rustix::rand::getrandom(&mut rnd, rustix::rand::GetRandomFlags::empty())?;
        let tag = u64::from_le_bytes(rnd);
        let tmp =
            CString::new(format!(".{stem}{TEMP_MARK}{tag:016x}")).map_err(|_| Errno::INVAL)?;
        match rustix::fs::openat(
            dir,
            tmp.as_c_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        ) {
            Ok(fd) => return Ok((tmp, fd)),
            Err(Errno::EXIST) => last = Errno::EXIST,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

fn write_all(fd: &OwnedFd, mut data: &[u8]) -> Result<(), Errno> {
    while !data.is_empty() {
        match rustix::io::write(fd, data) {
            Ok(0) => return Err(Errno::IO),
            Ok(n) => data = &data[n..],
            Err(Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads up to `max` bytes from `offset`. `expected` (what the file size promises) only sizes
/// the first allocation; the buffer grows as data actually arrives, up to `max`.
fn pread_up_to(fd: &OwnedFd, offset: u64, max: usize, expected: usize) -> Result<Vec<u8>, Errno> {
    let initial = expected.saturating_add(1).clamp(1, INITIAL_READ_BUFFER);
    fill_up_to(max, initial, |buf, filled| {
        rustix::io::pread(fd, buf, offset.saturating_add(filled as u64))
    })
}

/// Reads up to `max` bytes from the current position of a (non-blocking) descriptor; no data
/// available yet counts as the end.
fn read_up_to(fd: &OwnedFd, max: usize) -> Result<Vec<u8>, Errno> {
    fill_up_to(max, INITIAL_READ_BUFFER, |buf, _| {
        match rustix::io::read(fd, buf) {
            Err(Errno::AGAIN) => Ok(0),
            other => other,
        }
    })
}

/// The loop both readers share: `read(buf, bytes_so_far)` until it returns 0 or `max` bytes
/// are in. The buffer starts at `initial` and doubles as data arrives, never beyond `max`, so
/// a large `max` costs nothing for a small file.
fn fill_up_to(
    max: usize,
    initial: usize,
    mut read: impl FnMut(&mut [u8], usize) -> Result<usize, Errno>,
) -> Result<Vec<u8>, Errno> {
    let mut buf = Vec::new();
    let mut initial = initial;
    while buf.len() < max {
        if buf.len() == buf.capacity() {
            let grow = initial.max(buf.len()).min(max - buf.len());
            initial = 0;
            buf.reserve_exact(grow);
        }
        let filled = buf.len();
        let room = (buf.capacity() - filled).min(max - filled);
        buf.resize(filled + room, 0);
        match read(&mut buf[filled..], filled) {
            Ok(0) => {
                buf.truncate(filled);
                break;
            }
            Ok(n) => buf.truncate(filled + n),
            Err(Errno::INTR) => buf.truncate(filled),
            Err(e) => return Err(e),
        }
    }
    Ok(buf)
}

fn file_stat(name: String, st: &Stat, dir: BorrowedFd<'_>, entry: &CStr) -> FileStat {
    let kind = match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile => FileKind::File,
        FileType::Directory => FileKind::Dir,
        FileType::Symlink => FileKind::Symlink,
        _ => FileKind::Other,
    };
    let symlink_target = (kind == FileKind::Symlink)
        .then(|| rustix::fs::readlinkat(dir, entry, Vec::new()).ok())
        .flatten()
        .map(|t| String::from_utf8_lossy(t.as_bytes()).into_owned());
    FileStat {
        name,
        kind,
        size: u64::try_from(st.st_size).unwrap_or(0),
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        modified_ms: modified_ms(st.st_mtime, i64::try_from(st.st_mtime_nsec).unwrap_or(0)),
        symlink_target,
    }
}

/// Milliseconds since the epoch of a timestamp the sandbox chose: any value, so saturating.
fn modified_ms(secs: i64, nsecs: i64) -> i64 {
    secs.saturating_mul(1000).saturating_add(nsecs / 1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_takes_the_last_real_component() {
        assert_eq!(
            split_path("/a/b/c"),
            SplitPath {
                parent: "/a/b".into(),
                name: Some("c".into())
            }
        );
        assert_eq!(
            split_path("a//b/./"),
            SplitPath {
                parent: "/a".into(),
                name: Some("b".into())
            }
        );
        assert_eq!(split_path("/").name, None);
        assert_eq!(split_path("a/..").name, None);
        assert_eq!(split_path("x").parent, "/");
        assert_eq!(
            split_path("../../etc/passwd"),
            SplitPath {
                parent: "/../../etc".into(),
                name: Some("passwd".into())
            }
        );
    }

    #[test]
    fn extreme_mtimes_saturate() {
        assert_eq!(modified_ms(1 << 62, 999_999_999), i64::MAX);
        assert_eq!(modified_ms(i64::MAX, 999_999_999), i64::MAX);
        assert_eq!(modified_ms(i64::MIN, 0), i64::MIN);
        assert_eq!(modified_ms(i64::MIN / 1000, -999_999_999), i64::MIN);
        assert_eq!(modified_ms(1_700_000_000, 123_456_789), 1_700_000_000_123);
        // Through `file_stat`, as a listing or stat would convert it.
        // SAFETY: `Stat` is a plain C struct; all-zero bytes are a valid value.
        let mut st: Stat = unsafe { std::mem::zeroed() };
        st.st_mode = libc::S_IFREG | 0o644;
        st.st_mtime = 1 << 62;
        st.st_mtime_nsec = 999_999_999;
        st.st_size = -1;
        let fs = file_stat("f".into(), &st, rustix::fs::CWD, c"f");
        assert_eq!(fs.modified_ms, i64::MAX);
        assert_eq!(fs.size, 0);
    }

    #[test]
    fn proc_is_refused_and_sys_is_read_only() {
        for access in [Access::Read, Access::Write] {
            let err = refuse_file_system(PROC_SUPER_MAGIC, "/p", access).unwrap_err();
            assert_eq!(err.code, ErrorCode::PermissionDenied);
            assert_eq!(
                err.message,
                "/p is on /proc, which the file API does not serve; run a command instead"
            );
        }
        assert!(refuse_file_system(SYSFS_MAGIC, "/s", Access::Read).is_ok());
        let err = refuse_file_system(SYSFS_MAGIC, "/s", Access::Write).unwrap_err();
        assert_eq!(err.code, ErrorCode::PermissionDenied);
        assert!(err.message.starts_with("/s is on /sys"), "{}", err.message);
        assert!(refuse_file_system(0xEF53, "/e", Access::Write).is_ok());
        // A real descriptor on procfs.
        let proc_fd = rustix::fs::open(c"/proc/self", OFlags::PATH, Mode::empty()).unwrap();
        assert!(check_served(proc_fd.as_fd(), "/proc/self", Access::Read).is_err());
    }

    fn files_in(dir: &tempfile::TempDir) -> Files {
        Files::open(dir.path()).unwrap()
    }

    #[test]
    fn small_reads_refuse_files_above_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let files = files_in(&dir);
        std::fs::write(dir.path().join("ok"), vec![b'a'; 100]).unwrap();
        std::fs::write(dir.path().join("big"), vec![b'a'; 101]).unwrap();
        assert_eq!(files.read_small("/ok", 100).unwrap().unwrap().len(), 100);
        assert_eq!(files.read_small("/missing", 100).unwrap(), None);
        let err = files.read_small("/big", 100).unwrap_err();
        assert_eq!(err.code, ErrorCode::TooLarge);
        assert_eq!(
            err.message,
            "/big is larger than 100 bytes, the most the agent reads of it"
        );
    }

    #[test]
    fn reads_grow_past_the_initial_buffer_and_respect_limits() {
        let dir = tempfile::tempdir().unwrap();
        let files = files_in(&dir);
        let content: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.path().join("f"), &content).unwrap();
        let r = files.read_file("/f", 0, None).unwrap();
        assert_eq!((r.size, r.data.len()), (300_000, 300_000));
        assert_eq!(r.data, content);
        let r = files.read_file("/f", 1000, Some(70_000)).unwrap();
        assert_eq!(r.data, content[1000..71_000]);
        let r = files.read_file("/f", 299_990, Some(100)).unwrap();
        assert_eq!(r.data, content[299_990..]);
        // Offsets far out (any u64 a client sends) are errors or empty reads, never a panic.
        assert!(files.read_file("/f", u64::MAX, None).is_err());
        assert!(files.read_file("/f", i64::MAX as u64, None).is_err());
        assert!(files
            .read_file("/f", 1 << 40, None)
            .unwrap()
            .data
            .is_empty());
        // The size hint is only a hint: a file that grew is still read in full.
        let fd = rustix::fs::open(
            dir.path().join("f").as_path(),
            OFlags::RDONLY,
            Mode::empty(),
        )
        .unwrap();
        assert_eq!(pread_up_to(&fd, 0, 1 << 20, 10).unwrap(), content);
        assert_eq!(pread_up_to(&fd, 0, 5, 1 << 20).unwrap(), content[..5]);
    }

    #[test]
    fn recursive_remove_walks_wide_and_deep_trees_in_batches() {
        let dir = tempfile::tempdir().unwrap();
        let files = files_in(&dir);
        let top = dir.path().join("top");
        // Wider than a batch at two levels, and a few levels deep.
        for sub in ["", "a", "a/b", "a/b/c", "d"] {
            let d = top.join(sub);
            std::fs::create_dir_all(&d).unwrap();
            for i in 0..(REMOVE_BATCH * 2 + 7) {
                std::fs::write(d.join(format!("f{i}")), b"x").unwrap();
            }
        }
        std::os::unix::fs::symlink(dir.path(), top.join("a/link")).unwrap();
        files.remove("/top/", true).unwrap();
        assert!(!top.exists());
        assert!(dir.path().exists(), "the symlink was followed");
        // Too deep: refused with the path of the level where it stopped.
        let mut deep = dir.path().join("deep");
        for _ in 0..=MAX_REMOVE_DEPTH {
            deep.push("d");
        }
        std::fs::create_dir_all(&deep).unwrap();
        let err = files.remove("/deep", true).unwrap_err();
        assert_eq!(err.code, ErrorCode::TooLarge);
        let expected = format!("/deep{}", "/d".repeat(MAX_REMOVE_DEPTH));
        assert_eq!(
            err.message,
            format!("directory tree too deep to remove: {expected}")
        );
    }

    #[test]
    fn home_lookups_stay_in_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let files = files_in(&dir);
        std::fs::create_dir(dir.path().join("home")).unwrap();
        assert!(files.is_dir("/home"));
        assert!(files.is_dir("/../home"));
        assert!(!files.is_dir("/missing"));
        assert!(!files.is_dir("/ho\0me"));
        // A host directory is not a directory of the root.
        assert!(!files.is_dir("/usr/bin"));
        std::os::unix::fs::symlink("/proc/self/root/usr", dir.path().join("magic")).unwrap();
        assert!(!files.is_dir("/magic"));
    }

    #[test]
    fn temporary_names_are_recognised() {
        let dir = tempfile::tempdir().unwrap();
        let root = Files::open(dir.path()).unwrap();
        let (tmp, _fd) = create_temp(&root.root, "hello.txt").unwrap();
        assert!(is_temp_name(tmp.as_bytes()), "{tmp:?}");
        for name in [
            "hello.txt",
            ".hello.txt.openrun-tmp-",
            "x.openrun-tmp-0123456789abcdef",
            ".x.openrun-tmp-0123456789ABCDEF",
            ".x.openrun-tmp-0123456789abcdeg",
        ] {
            assert!(!is_temp_name(name.as_bytes()), "{name}");
        }
    }

    #[test]
    fn overlong_paths_are_invalid_arguments() {
        let long = format!("/{}", "a/".repeat(MAX_PATH_LEN));
        let err = check_path(&long).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidArgument);
        assert!(
            err.message.starts_with("path is too long"),
            "{}",
            err.message
        );
        assert!(check_path(&"a".repeat(MAX_PATH_LEN)).is_ok());
    }

    #[test]
    fn bad_paths_are_invalid_arguments() {
        assert_eq!(check_path("").unwrap_err().code, ErrorCode::InvalidArgument);
        assert_eq!(
            check_path("a\0b").unwrap_err().code,
            ErrorCode::InvalidArgument
        );
        assert!(check_path("/ok").is_ok());
    }
}
