//! File operations resolved inside the sandbox root only.
//!
//! The root is opened once. Every client path is then resolved with `openat2` and
//! `RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS`: `..` stops at the root, absolute paths and absolute
//! symlinks are taken relative to it, and `/proc/<pid>/root`-style magic links are refused. For
//! operations on a final name (create, remove, rename, stat) only the *parent* directory is
//! resolved that way; the final name is then handled by an `*at` syscall that does not follow a
//! symlink there. Nothing here ever passes a client path to a syscall that resolves it from the
//! agent's own root or working directory.

use std::ffi::{CStr, CString};
use std::path::Path;

use openrun_protocol::{AgentError, ErrorCode, FileKind, FileStat, MAX_DATA_LEN};
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags, ResolveFlags, Stat};
use rustix::io::Errno;

use crate::errors::errno_error;

/// Flags used for every resolution under the root.
const RESOLVE: ResolveFlags = ResolveFlags::IN_ROOT.union(ResolveFlags::NO_MAGICLINKS);
/// How often to retry a resolution the kernel aborted with `EAGAIN` (a concurrent rename or
/// mount moved something while `..` was being resolved).
const RESOLVE_RETRIES: usize = 32;
/// Deepest directory tree a recursive remove descends into (one open descriptor per level).
const MAX_REMOVE_DEPTH: usize = 512;
/// Default permission bits of a new file.
const DEFAULT_FILE_MODE: u32 = 0o644;
/// Default permission bits of a new directory.
const DEFAULT_DIR_MODE: u32 = 0o755;

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
        for _ in 0..RESOLVE_RETRIES {
            match rustix::fs::openat2(&self.root, path, flags | OFlags::CLOEXEC, mode, resolve) {
                Err(Errno::AGAIN) => last = Errno::AGAIN,
                Err(Errno::INTR) => last = Errno::INTR,
                other => return other,
            }
        }
        Err(last)
    }

    /// Opens `path` inside the root (following symlinks, but only within the root).
    fn open_in_root(&self, path: &str, flags: OFlags, mode: Mode) -> Result<OwnedFd, AgentError> {
        self.openat2_raw(path, flags, mode, RESOLVE)
            .map_err(|errno| self.resolve_error(path, errno))
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

    /// Opens the directory that holds `split`'s final name.
    fn open_parent(&self, split: &SplitPath, flags: OFlags) -> Result<OwnedFd, AgentError> {
        self.open_in_root(&split.parent, flags | OFlags::DIRECTORY, Mode::empty())
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
        )?;
        let st = rustix::fs::fstat(&fd).map_err(|e| errno_error(e, path))?;
        let kind = FileType::from_raw_mode(st.st_mode);
        let max = limit
            .unwrap_or(MAX_DATA_LEN as u64)
            .min(MAX_DATA_LEN as u64) as usize;
        let data = match kind {
            FileType::RegularFile => {
                pread_up_to(&fd, offset, max).map_err(|e| errno_error(e, path))?
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
        Ok(ReadResult {
            size: st.st_size.max(0) as u64,
            data,
        })
    }

    /// Reads a small file whole; `None` when it does not exist.
    pub(crate) fn read_small(&self, path: &str, max: usize) -> Result<Option<Vec<u8>>, AgentError> {
        match self.read_file(path, 0, Some(max as u64)) {
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
        let dir = self.open_parent(&split, OFlags::RDONLY)?;

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
                // Newly created: set the exact mode, independent of the umask.
                rustix::fs::fchmod(&fd, new_mode).map_err(|e| errno_error(e, path))?;
                fd
            }
            Err(Errno::EXIST) => self.open_in_root(path, flags, Mode::empty())?,
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

    /// Lists a directory, sorted by name, without following symlinks in the entries.
    pub(crate) fn list_dir(&self, path: &str) -> Result<Vec<FileStat>, AgentError> {
        check_path(path)?;
        let fd = self.open_in_root(path, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())?;
        let names = read_names(&fd).map_err(|e| errno_error(e, path))?;
        let mut entries = Vec::with_capacity(names.len());
        for name in names {
            match rustix::fs::statat(&fd, name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => {
                    let display = String::from_utf8_lossy(name.as_bytes()).into_owned();
                    entries.push(file_stat(display, &st, fd.as_fd(), name.as_c_str()));
                }
                // Removed since the listing was read.
                Err(Errno::NOENT) => {}
                Err(e) => return Err(errno_error(e, path)),
            }
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    }

    /// Stats a path without following a final symlink.
    pub(crate) fn stat(&self, path: &str) -> Result<FileStat, AgentError> {
        check_path(path)?;
        let split = split_path(path);
        match split.name.as_deref() {
            None => {
                let fd =
                    self.open_in_root(path, OFlags::PATH | OFlags::DIRECTORY, Mode::empty())?;
                let st = rustix::fs::fstat(&fd).map_err(|e| errno_error(e, path))?;
                Ok(file_stat(path.to_string(), &st, fd.as_fd(), c""))
            }
            Some(name) => {
                let dir = self.open_parent(&split, OFlags::PATH)?;
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
        let dir = self.open_parent(&split, OFlags::PATH)?;
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
                    self.open_in_root(&prefix, OFlags::PATH | OFlags::DIRECTORY, Mode::empty())
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
        let dir = self.open_parent(&split, OFlags::PATH)?;
        let st = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| errno_error(e, path))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
            return rustix::fs::unlinkat(&dir, name, AtFlags::empty())
                .map_err(|e| errno_error(e, path));
        }
        if recursive {
            let sub = open_subdir(&dir, name).map_err(|e| errno_error(e, path))?;
            remove_contents(&sub, st.st_dev, path, 0)?;
        }
        rustix::fs::unlinkat(&dir, name, AtFlags::REMOVEDIR).map_err(|e| errno_error(e, path))
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
        let src_dir = self.open_parent(&src, OFlags::PATH)?;
        let dst_dir = self.open_parent(&dst, OFlags::PATH)?;
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

fn open_subdir(dir: &OwnedFd, name: impl rustix::path::Arg) -> Result<OwnedFd, Errno> {
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

/// Entry names of a directory, without `.` and `..`.
fn read_names(fd: &OwnedFd) -> Result<Vec<CString>, Errno> {
    let mut dir = Dir::read_from(fd)?;
    let mut names = Vec::new();
    while let Some(entry) = dir.read() {
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
/// during the walk) is never entered.
fn remove_contents(dir: &OwnedFd, dev: u64, path: &str, depth: usize) -> Result<(), AgentError> {
    if depth >= MAX_REMOVE_DEPTH {
        return Err(AgentError::new(
            ErrorCode::TooLarge,
            format!("directory tree too deep to remove: {path}"),
        ));
    }
    for name in read_names(dir).map_err(|e| errno_error(e, path))? {
        let child_path = format!("{}/{}", path.trim_end_matches('/'), name.to_string_lossy());
        let st = match rustix::fs::statat(dir, name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => continue,
            Err(e) => return Err(errno_error(e, &child_path)),
        };
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            if st.st_dev != dev {
                return Err(AgentError::new(
                    ErrorCode::PermissionDenied,
                    format!("refusing to remove across a mount point: {child_path}"),
                ));
            }
            let sub = open_subdir(dir, name.as_c_str()).map_err(|e| errno_error(e, &child_path))?;
            remove_contents(&sub, dev, &child_path, depth + 1)?;
            drop(sub);
            match rustix::fs::unlinkat(dir, name.as_c_str(), AtFlags::REMOVEDIR) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(e) => return Err(errno_error(e, &child_path)),
            }
        } else {
            match rustix::fs::unlinkat(dir, name.as_c_str(), AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(e) => return Err(errno_error(e, &child_path)),
            }
        }
    }
    Ok(())
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
            CString::new(format!(".{stem}.openrun-tmp-{tag:016x}")).map_err(|_| Errno::INVAL)?;
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

fn pread_up_to(fd: &OwnedFd, offset: u64, max: usize) -> Result<Vec<u8>, Errno> {
    let mut buf = vec![0u8; max];
    let mut filled = 0;
    while filled < max {
        match rustix::io::pread(fd, &mut buf[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(filled);
    Ok(buf)
}

fn read_up_to(fd: &OwnedFd, max: usize) -> Result<Vec<u8>, Errno> {
    let mut buf = vec![0u8; max];
    let mut filled = 0;
    while filled < max {
        match rustix::io::read(fd, &mut buf[filled..]) {
            Ok(0) | Err(Errno::AGAIN) => break,
            Ok(n) => filled += n,
            Err(Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(filled);
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
        size: st.st_size.max(0) as u64,
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        modified_ms: st.st_mtime.saturating_mul(1000) + (st.st_mtime_nsec / 1_000_000) as i64,
        symlink_target,
    }
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
    fn bad_paths_are_invalid_arguments() {
        assert_eq!(check_path("").unwrap_err().code, ErrorCode::InvalidArgument);
        assert_eq!(
            check_path("a\0b").unwrap_err().code,
            ErrorCode::InvalidArgument
        );
        assert!(check_path("/ok").is_ok());
    }
}
