//! `COPY` and `ADD`: the digest of their sources (for the cache key) and the layer they make.
//!
//! The layer is built on the host in a fresh directory of the store's `tmp/` (so nothing of
//! the image is ever written through, and no path of the image is followed on the host):
//! the destination is first resolved inside the image ([`ImageView`], its own symbolic links
//! followed as the sandbox would), then the directories leading to it are made in the new
//! tree with the image's owners and modes (new ones: 0755, owned by `--chown`'s ids), and the
//! sources are written below, every operation relative to a directory descriptor with
//! `O_NOFOLLOW`. Copied files get `--chown`'s ids (root's by default), their own mode (or
//! `--chmod`'s) and modification time.
//!
//! `ADD` extracts a local tar archive (plain, gzip or zstd) into the destination through the
//! store's safe unpacker, keeping the archive's owners; whiteout entries (`.wh.*`) are refused
//! (they would delete files of the image). Any other `ADD` source is copied like `COPY`.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, Write};
use std::path::Path;

use rustix::fd::{AsFd, OwnedFd};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps};
use rustix::io::Errno;
use sha2::{Digest as _, Sha256};

use crate::context::{Context, Entry, EntryKind, Skipped};
use crate::rootfs::{ImageView, Meta, Node, Resolved};

/// Prefix of OCI whiteout names.
const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// Largest `/etc/passwd` or `/etc/group` read to resolve `--chown` names.
const MAX_ACCOUNT_FILE: u64 = 4 << 20;

/// One `COPY` or `ADD`, with its words expanded.
#[derive(Debug)]
pub struct CopyStep<'a> {
    /// The build context.
    pub ctx: &'a Context,
    /// The image so far.
    pub view: &'a ImageView,
    /// Sources, relative to the context, globs expanded.
    pub sources: Vec<String>,
    /// Destination: an absolute image path; a trailing `/` makes it a directory.
    pub dest: String,
    /// Owner of what is copied and of new directories.
    pub owner: (u32, u32),
    /// `--chmod`.
    pub chmod: Option<u32>,
    /// `ADD` (extracts archives).
    pub add: bool,
}

/// How a local archive is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Archive {
    Tar,
    Gzip,
    Zstd,
}

impl CopyStep<'_> {
    fn name(&self) -> &'static str {
        if self.add {
            "ADD"
        } else {
            "COPY"
        }
    }

    /// sha256 of every source: names, kinds, modes, sizes, link targets and contents (not
    /// modification times), plus the step's own settings.
    pub fn digest(&self) -> Result<(String, Skipped), String> {
        let mut hasher = Sha256::new();
        let mut skipped = Vec::new();
        hasher.update(
            format!(
                "{}\0{}\0{:?}\0{:?}\0",
                self.name(),
                self.dest,
                self.owner,
                self.chmod
            )
            .as_bytes(),
        );
        for source in &self.sources {
            hasher.update(format!("source\0{source}\0").as_bytes());
            let mut s = self
                .ctx
                .walk(source, &mut |e, file| {
                    let kind = match &e.kind {
                        EntryKind::Dir => "d".to_string(),
                        EntryKind::File => "f".to_string(),
                        EntryKind::Symlink(t) => format!("l{}", t.display()),
                    };
                    hasher.update(
                        format!("{}\0{kind}\0{:o}\0{}\0", e.rel, e.mode, e.size).as_bytes(),
                    );
                    if let Some(file) = file {
                        let mut w = HashWriter(&mut hasher);
                        io::copy(file, &mut w).map_err(|err| {
                            format!("cannot read {:?}: {err}", join(source, &e.rel))
                        })?;
                    }
                    Ok(())
                })
                .map_err(|e| e.0)?;
            skipped.append(&mut s);
        }
        Ok((crate::digest::hex(&hasher.finalize()), skipped))
    }

    /// Writes the step's layer into `tree` (an empty directory), using `scratch` (another
    /// empty directory on the same filesystem) to extract archives.
    pub fn write(&self, tree: &Path, scratch: &Path) -> Result<Skipped, String> {
        let many = self.sources.len() > 1;
        let dir_dest = self.dest.ends_with('/');
        if many && !dir_dest {
            return Err(format!(
                "{} with more than one source needs a destination directory ending in /: {}",
                self.name(),
                self.dest
            ));
        }
        let mut out = Tree::open(tree)?;
        let mut skipped = Vec::new();
        let new_dirs = Meta {
            mode: 0o755,
            uid: self.owner.0,
            gid: self.owner.1,
            mtime: 0,
            mtime_nsec: 0,
        };
        for (n, source) in self.sources.iter().enumerate() {
            let kind = self.ctx.kind(source).map_err(|e| e.0)?;
            let archive = if self.add && kind == FileType::RegularFile {
                let mut file = self.ctx.open_file(source).map_err(|e| e.0)?;
                archive_kind(&mut file, source)?
            } else {
                None
            };
            match (kind, archive) {
                (FileType::Directory, _) => {
                    let (dir, rel) = out.ensure(&self.resolve_dir(&self.dest)?, new_dirs)?;
                    let mut s = self.copy_tree(&mut out, source, dir, &rel)?;
                    skipped.append(&mut s);
                }
                (FileType::RegularFile, Some(archive)) => {
                    let (dir, _) = out.ensure(&self.resolve_dir(&self.dest)?, new_dirs)?;
                    let scratch = scratch.join(n.to_string());
                    std::fs::create_dir(&scratch)
                        .map_err(|e| format!("cannot create {}: {e}", scratch.display()))?;
                    self.extract(source, archive, &scratch)?;
                    let from = open_dir(&scratch)?;
                    merge(&from, &dir, source)?;
                }
                (FileType::RegularFile, None) => {
                    let base = source.rsplit('/').next().unwrap_or(source).to_string();
                    let r = self.resolve(&self.dest, true)?;
                    let into_dir = dir_dest || (r.last.is_none() && r.missing.is_empty());
                    let (parent, name) = if into_dir {
                        (self.resolve_dir(&self.dest)?, base)
                    } else {
                        split_last(r)
                    };
                    let (dir, rel) = out.ensure(&parent, new_dirs)?;
                    let mut file = self.ctx.open_file(source).map_err(|e| e.0)?;
                    let st = rustix::fs::fstat(&file)
                        .map_err(|e| format!("cannot read {source:?}: {e}"))?;
                    let meta = self.meta(
                        st.st_mode & 0o7777,
                        (st.st_mtime, i64::try_from(st.st_mtime_nsec).unwrap_or(0)),
                    );
                    out.file(&dir, &rel, &name, &mut file, meta)?;
                }
                _ => {
                    return Err(format!(
                        "{} source {source:?} is not a file or a directory",
                        self.name()
                    ))
                }
            }
        }
        out.finish()?;
        Ok(skipped)
    }

    fn meta(&self, mode: u32, mtime: (i64, i64)) -> Meta {
        Meta {
            mode: self.chmod.unwrap_or(mode),
            uid: self.owner.0,
            gid: self.owner.1,
            mtime: mtime.0,
            mtime_nsec: mtime.1,
        }
    }

    fn resolve(&self, path: &str, follow: bool) -> Result<Resolved, String> {
        self.view
            .resolve(path, follow)
            .map_err(|e| format!("{} destination {}: {e}", self.name(), self.dest))
    }

    /// `path` as a directory of the image (which must not be a file there).
    fn resolve_dir(&self, path: &str) -> Result<Resolved, String> {
        let r = self.resolve(path, true)?;
        if let Some((_, node)) = &r.last {
            let what = match node {
                Node::File { .. } => "a file",
                _ => "not a directory",
            };
            return Err(format!(
                "{} destination {}: {} is {what} in the image",
                self.name(),
                self.dest,
                r.existing_path()
            ));
        }
        Ok(r)
    }

    /// Copies the contents of the directory `source` into `dir` (tree path `rel`).
    fn copy_tree(
        &self,
        out: &mut Tree,
        source: &str,
        dir: OwnedFd,
        rel: &str,
    ) -> Result<Skipped, String> {
        // Directories being filled, from the destination down: (path below it, descriptor).
        let mut stack: Vec<(String, OwnedFd)> = vec![(String::new(), dir)];
        let skipped = self
            .ctx
            .walk(source, &mut |e: &Entry, file| {
                if e.rel.is_empty() {
                    return Ok(());
                }
                let (parent, name) = match e.rel.rsplit_once('/') {
                    Some((p, n)) => (p, n),
                    None => ("", e.rel.as_str()),
                };
                while stack.last().is_some_and(|(p, _)| p != parent) {
                    stack.pop();
                }
                let Some((_, fd)) = stack.last() else {
                    return Err(format!("internal: lost the directory of {:?}", e.rel));
                };
                let tree_rel = join(rel, parent);
                let meta = self.meta(e.mode, e.mtime);
                match (&e.kind, file) {
                    (EntryKind::Dir, _) => {
                        let sub = out.mkdir(fd, &tree_rel, name, meta, true)?;
                        stack.push((e.rel.clone(), sub));
                    }
                    (EntryKind::File, Some(file)) => out.file(fd, &tree_rel, name, file, meta)?,
                    (EntryKind::Symlink(target), _) => {
                        out.symlink(fd, &tree_rel, name, target, meta)?
                    }
                    (EntryKind::File, None) => {
                        return Err(format!("internal: no contents for {:?}", e.rel))
                    }
                }
                Ok(())
            })
            .map_err(|e| e.0)?;
        Ok(skipped)
    }

    /// Unpacks the archive `source` into `dest` (an empty directory).
    fn extract(&self, source: &str, archive: Archive, dest: &Path) -> Result<(), String> {
        let what = format!("ADD archive {source:?}");
        // First pass: no whiteouts (in a layer they would delete the image's files).
        let file = self.ctx.open_file(source).map_err(|e| e.0)?;
        let mut tar = tar::Archive::new(decompressor(file, archive, &what)?);
        let entries = tar.entries().map_err(|e| format!("{what}: {e}"))?;
        for entry in entries {
            let entry = entry.map_err(|e| format!("{what} is corrupt: {e}"))?;
            let path = entry.path_bytes();
            let base = path.rsplit(|&b| b == b'/').find(|c| !c.is_empty());
            if base.is_some_and(|b| b.starts_with(WHITEOUT_PREFIX)) {
                return Err(format!(
                    "{what} has the whiteout entry {:?}, which would delete files of the image; extract it in a RUN step instead",
                    String::from_utf8_lossy(&path)
                ));
            }
        }
        let file = self.ctx.open_file(source).map_err(|e| e.0)?;
        crate::layer::unpack(decompressor(file, archive, &what)?, dest, &what)
            .map_err(|e| e.to_string())?;
        Ok(())
    }
}

/// Makes the directory `path` of the image, and those leading to it, in `tree` (an empty
/// directory): existing ones as the image has them, missing ones owned by `owner`.
pub fn make_dirs(
    view: &ImageView,
    path: &str,
    owner: (u32, u32),
    tree: &Path,
) -> Result<(), String> {
    let r = view.resolve(path, true)?;
    let mut out = Tree::open(tree)?;
    let new = Meta {
        mode: 0o755,
        uid: owner.0,
        gid: owner.1,
        mtime: 0,
        mtime_nsec: 0,
    };
    out.ensure(&r, new)?;
    out.finish()
}

/// The directory part and last name of a resolved file destination.
fn split_last(mut r: Resolved) -> (Resolved, String) {
    if let Some((name, _)) = r.last.take() {
        return (r, name);
    }
    let name = r.missing.pop().unwrap_or_default();
    (r, name)
}

/// What kind of archive `file` is, by its first bytes (rewinding it); `None`: not one.
fn archive_kind(file: &mut File, source: &str) -> Result<Option<Archive>, String> {
    let mut head = [0u8; 512];
    let mut n = 0;
    while n < head.len() {
        match file.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("cannot read {source:?}: {e}")),
        }
    }
    file.rewind()
        .map_err(|e| format!("cannot read {source:?}: {e}"))?;
    let head = &head[..n];
    let kind = if head.starts_with(&[0x1f, 0x8b]) {
        Some(Archive::Gzip)
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Some(Archive::Zstd)
    } else if head.starts_with(b"BZh") || head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        return Err(format!(
            "ADD cannot extract {source:?}: bzip2 and xz archives are not supported; decompress it (or use gzip or zstd), or COPY it"
        ));
    } else if n == 512 && &head[257..262] == b"ustar" {
        Some(Archive::Tar)
    } else {
        None
    };
    Ok(kind)
}

fn decompressor(file: File, archive: Archive, what: &str) -> Result<Box<dyn Read>, String> {
    let file = BufReader::with_capacity(256 << 10, file);
    Ok(match archive {
        Archive::Tar => Box::new(file),
        Archive::Gzip => Box::new(flate2::read::MultiGzDecoder::new(file)),
        Archive::Zstd => Box::new(
            ruzstd::decoding::StreamingDecoder::new(file)
                .map_err(|e| format!("{what} is not valid zstd: {e}"))?,
        ),
    })
}

/// Moves everything in `from` into `into`, merging directories (what `from` has wins).
fn merge(from: &OwnedFd, into: &OwnedFd, what: &str) -> Result<(), String> {
    let names = names(from).map_err(|e| format!("cannot read the extracted {what:?}: {e}"))?;
    for name in names {
        let src = rustix::fs::statat(from, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| format!("cannot read the extracted {what:?}: {e}"))?;
        let existing = match rustix::fs::statat(into, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Some(FileType::from_raw_mode(st.st_mode)),
            Err(Errno::NOENT) => None,
            Err(e) => return Err(format!("cannot extract {what:?}: {e}")),
        };
        let src_dir = FileType::from_raw_mode(src.st_mode) == FileType::Directory;
        let shown = String::from_utf8_lossy(&name).into_owned();
        match existing {
            Some(FileType::Directory) if src_dir => {
                let a = open_child(from, &name)?;
                let b = open_child(into, &name)?;
                merge(&a, &b, what)?;
                continue;
            }
            Some(FileType::Directory) => {
                return Err(format!(
                    "cannot extract {what:?}: {shown:?} would replace a directory with a file"
                ))
            }
            Some(_) => rustix::fs::unlinkat(into, name.as_slice(), AtFlags::empty())
                .map_err(|e| format!("cannot extract {what:?}: {e}"))?,
            None => {}
        }
        rustix::fs::renameat(from, name.as_slice(), into, name.as_slice())
            .map_err(|e| format!("cannot extract {what:?}: {e}"))?;
    }
    Ok(())
}

fn names(dir: &OwnedFd) -> io::Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for entry in rustix::fs::Dir::read_from(dir.as_fd())? {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            out.push(name.to_vec());
        }
    }
    Ok(out)
}

fn open_dir(path: &Path) -> Result<OwnedFd, String> {
    rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("cannot open {}: {e}", path.display()))
}

fn open_child(dir: &OwnedFd, name: &[u8]) -> Result<OwnedFd, String> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("cannot open {:?}: {e}", String::from_utf8_lossy(name)))
}

fn join(a: &str, b: &str) -> String {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_string(),
        (_, true) => a.to_string(),
        _ => format!("{a}/{b}"),
    }
}

fn times(meta: &Meta) -> Timestamps {
    let t = Timespec {
        tv_sec: meta.mtime,
        tv_nsec: meta.mtime_nsec,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

/// A layer being written: every operation relative to a directory descriptor, no link
/// followed. Directory times are set last (writing into a directory changes its time).
struct Tree {
    root: OwnedFd,
    /// Directories made or updated, with the time to give them (tree-relative paths).
    dir_times: Vec<(String, Meta)>,
}

impl Tree {
    fn open(path: &Path) -> Result<Self, String> {
        Ok(Self {
            root: open_dir(path)?,
            dir_times: Vec::new(),
        })
    }

    /// Makes the directories of `path` (resolved in the image) in the tree: existing ones
    /// with the image's owner, mode and time, missing ones with `new`. Returns the last one
    /// and its tree path.
    fn ensure(&mut self, path: &Resolved, new: Meta) -> Result<(OwnedFd, String), String> {
        let mut fd = rustix::fs::openat(
            &self.root,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| format!("cannot open the layer: {e}"))?;
        let mut rel = String::new();
        let now = {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            Meta {
                mtime: i64::try_from(t.as_secs()).unwrap_or(0),
                mtime_nsec: i64::from(t.subsec_nanos()),
                ..new
            }
        };
        let existing = path.dirs.iter().map(|(name, node)| {
            let meta = match node {
                Node::Dir { meta, .. } => *meta,
                _ => now,
            };
            (name.as_str(), meta)
        });
        let missing = path.missing.iter().map(|n| (n.as_str(), now));
        for (name, meta) in existing.chain(missing) {
            let sub = self.mkdir(&fd, &rel, name, meta, false)?;
            rel = join(&rel, name);
            fd = sub;
        }
        Ok((fd, rel))
    }

    /// Makes (or, with `update`, also re-owns an existing) directory `name` in `dir`.
    fn mkdir(
        &mut self,
        dir: &OwnedFd,
        dir_rel: &str,
        name: &str,
        meta: Meta,
        update: bool,
    ) -> Result<OwnedFd, String> {
        let rel = join(dir_rel, name);
        let fail = |e: Errno| format!("cannot create {rel:?} in the layer: {e}");
        let made = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => false,
            Ok(_) => {
                rustix::fs::unlinkat(dir, name, AtFlags::empty()).map_err(fail)?;
                rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o700)).map_err(fail)?;
                true
            }
            Err(Errno::NOENT) => {
                rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o700)).map_err(fail)?;
                true
            }
            Err(e) => return Err(fail(e)),
        };
        let fd = rustix::fs::openat(
            dir,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(fail)?;
        if made || update {
            set_owner_mode(&fd, meta).map_err(fail)?;
            self.dir_times.push((rel, meta));
        }
        Ok(fd)
    }

    /// Removes a non-directory `name` of `dir` (what a later source replaces).
    fn clear(dir: &OwnedFd, rel: &str, name: &str) -> Result<(), String> {
        match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                Err(format!("cannot replace the directory {rel:?} with a file"))
            }
            Ok(_) => rustix::fs::unlinkat(dir, name, AtFlags::empty())
                .map_err(|e| format!("cannot replace {rel:?}: {e}")),
            Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(format!("cannot create {rel:?}: {e}")),
        }
    }

    fn file(
        &mut self,
        dir: &OwnedFd,
        dir_rel: &str,
        name: &str,
        contents: &mut File,
        meta: Meta,
    ) -> Result<(), String> {
        let rel = join(dir_rel, name);
        Self::clear(dir, &rel, name)?;
        let fail = |e: io::Error| format!("cannot write {rel:?} in the layer: {e}");
        let fd = rustix::fs::openat(
            dir,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| fail(e.into()))?;
        let mut out = File::from(fd);
        io::copy(contents, &mut out).map_err(fail)?;
        set_owner_mode(&out, meta).map_err(|e| fail(e.into()))?;
        rustix::fs::futimens(&out, &times(&meta)).map_err(|e| fail(e.into()))?;
        Ok(())
    }

    fn symlink(
        &mut self,
        dir: &OwnedFd,
        dir_rel: &str,
        name: &str,
        target: &Path,
        meta: Meta,
    ) -> Result<(), String> {
        let rel = join(dir_rel, name);
        Self::clear(dir, &rel, name)?;
        let fail = |e: Errno| format!("cannot create the link {rel:?} in the layer: {e}");
        rustix::fs::symlinkat(target, dir, name).map_err(fail)?;
        crate::layer::set_owner_time_at(dir, name.as_bytes(), (meta.uid, meta.gid), &times(&meta))
            .map_err(|(_, e)| fail(e))
    }

    /// Sets the directories' times, deepest first.
    fn finish(mut self) -> Result<(), String> {
        self.dir_times
            .sort_by_key(|(rel, _)| std::cmp::Reverse(rel.matches('/').count()));
        for (rel, meta) in &self.dir_times {
            let fd = rustix::fs::openat2(
                &self.root,
                rel.as_str(),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
                rustix::fs::ResolveFlags::BENEATH | rustix::fs::ResolveFlags::NO_SYMLINKS,
            )
            .map_err(|e| format!("cannot open {rel:?} in the layer: {e}"))?;
            rustix::fs::futimens(&fd, &times(meta))
                .map_err(|e| format!("cannot set the time of {rel:?}: {e}"))?;
        }
        Ok(())
    }
}

/// Owner first: a change of owner clears setuid and setgid bits, which the mode then sets.
fn set_owner_mode(fd: impl AsFd, meta: Meta) -> Result<(), Errno> {
    rustix::fs::fchown(
        &fd,
        Some(rustix::process::Uid::from_raw(meta.uid)),
        Some(rustix::process::Gid::from_raw(meta.gid)),
    )?;
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(meta.mode))
}

struct HashWriter<'a>(&'a mut Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The ids `--chown=user[:group]` names: numbers, or names from the image's `/etc/passwd`
/// and `/etc/group`. A user given without a group gets its own primary group (a number:
/// the same number).
pub fn resolve_owner(view: &ImageView, spec: &str) -> Result<(u32, u32), String> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user.is_empty() || group.is_some_and(str::is_empty) {
        return Err(format!("--chown={spec}: expected user[:group]"));
    }
    let read = |path: &str| -> Result<String, String> {
        match view.read_file(path, MAX_ACCOUNT_FILE)? {
            Some(bytes) => Ok(String::from_utf8_lossy(&bytes).into_owned()),
            None => Ok(String::new()),
        }
    };
    let (uid, primary) = match user.parse::<u32>() {
        Ok(uid) => (uid, uid),
        Err(_) => {
            let passwd = read("/etc/passwd")?;
            let found = passwd.lines().find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.len() >= 4 && f[0] == user)
                    .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
            });
            found.ok_or_else(|| {
                format!("--chown={spec}: no user {user:?} in the image's /etc/passwd")
            })?
        }
    };
    let gid = match group {
        None => primary,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                let groups = read("/etc/group")?;
                groups
                    .lines()
                    .find_map(|l| {
                        let f: Vec<&str> = l.split(':').collect();
                        (f.len() >= 3 && f[0] == g).then(|| f[2].parse().ok())?
                    })
                    .ok_or_else(|| {
                        format!("--chown={spec}: no group {g:?} in the image's /etc/group")
                    })?
            }
        },
    };
    Ok((uid, gid))
}

/// Parses `--chmod=MODE` (octal, at most 7777).
pub fn parse_chmod(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o7777 && !s.is_empty())
        .ok_or_else(|| format!("--chmod={s}: expected an octal mode such as 0644"))
}
