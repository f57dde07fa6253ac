//! What changed between two stacks of overlay layers: a sandbox against its image (its
//! writable upper over the image's layers), or against another image (a snapshot).
//!
//! Each side is a list of [`Overlay`]s (one per mount: `/`, and for the `host` image `/usr`
//! and friends), each a stack of layer directories read as overlayfs merges them: the top
//! layer wins, a whiteout (character device 0:0) deletes a name, an opaque directory
//! (`user.overlay.opaque=y`) hides everything below it.
//!
//! Only names that appear in the layers the two sides do not share are compared (the layers
//! both stacks have at the same position from the bottom are identical by construction), so a
//! sandbox's diff costs what its upper holds, not what its image holds.
//!
//! The upper is written by the sandbox: every read here is relative to a directory
//! descriptor, one component at a time with `O_NOFOLLOW`; a symbolic link is reported with
//! its target and never followed; a file is read only after `fstat` on the opened descriptor
//! says it is a regular file.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use rustix::fd::OwnedFd;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat};
use rustix::io::Errno;

use crate::error::{ImageError, IoContext, Result};
use crate::layer::{open_dir_at, open_dir_path, MAX_DEPTH, OPAQUE_XATTR};

/// Largest file (each side) whose text goes into the patch.
pub const MAX_PATCH_FILE: u64 = 1 << 20;
/// Most changes listed by default.
pub const DEFAULT_MAX_CHANGES: usize = 50_000;
/// Most bytes of patch text by default.
pub const DEFAULT_MAX_PATCH: usize = 8 << 20;

/// One mount of a root filesystem: its layer directories, bottom to top.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlay {
    /// Where it is mounted (`/`, `/usr`).
    pub target: PathBuf,
    /// Layer directories, bottom to top.
    pub layers: Vec<PathBuf>,
}

/// How a path changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// Present after, not before.
    Added,
    /// Present on both sides with different content, link target, type or permissions.
    Modified,
    /// Present before, not after.
    Deleted,
}

/// One changed path.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Change {
    /// Absolute path inside the sandbox (bytes that are not UTF-8 shown as U+FFFD).
    pub path: String,
    /// Added, modified or deleted.
    pub kind: ChangeKind,
    /// `file`, `dir`, `symlink`, `fifo`, `socket`, `char_device` or `block_device` (after
    /// the change; before it for a deletion).
    #[serde(rename = "type")]
    pub file_type: String,
    /// Size in bytes (after the change; before it for a deletion).
    pub size: u64,
    /// Target of a symbolic link, as written (never followed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_target: Option<String>,
}

/// The answer of a diff.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiffReport {
    /// Changed paths, sorted.
    pub changes: Vec<Change>,
    /// Unified diff (git style) of the changed files and links: text files of at most
    /// [`MAX_PATCH_FILE`] bytes in full, other files as `Binary files ... differ`.
    pub patch: String,
    /// Whether the listing or the patch stopped at its limit (or at the depth limit).
    pub truncated: bool,
}

/// What to compare and how much to report.
#[derive(Debug, Clone)]
pub struct DiffOptions {
    /// Only this absolute path (a file, or a directory and what is below it).
    pub path: Option<String>,
    /// Most changes listed.
    pub max_changes: usize,
    /// Most bytes of patch text; `0` makes no patch.
    pub max_patch: usize,
    /// Absolute paths left out with what is below them (mount points covering the layers).
    pub hidden: Vec<String>,
}

impl Default for DiffOptions {
    fn default() -> Self {
        Self {
            path: None,
            max_changes: DEFAULT_MAX_CHANGES,
            max_patch: DEFAULT_MAX_PATCH,
            hidden: Vec::new(),
        }
    }
}

/// Compares `before` with `after`: the two sides must have the same mounts (targets) in the
/// same order. Paths are reported as absolute paths of the merged root.
pub fn diff(before: &[Overlay], after: &[Overlay], options: &DiffOptions) -> Result<DiffReport> {
    let same_mounts =
        before.len() == after.len() && before.iter().zip(after).all(|(b, a)| b.target == a.target);
    if !same_mounts {
        return Err(ImageError::Invalid(
            "cannot compare root filesystems with different mounts (the host image with a store image)"
                .into(),
        ));
    }
    let filter = match &options.path {
        Some(p) => Some(path_components(p)?),
        None => None,
    };
    let targets: Vec<Vec<Vec<u8>>> = before
        .iter()
        .map(|o| target_components(&o.target))
        .collect::<Result<_>>()?;
    let mut mounts = targets.clone();
    for hidden in &options.hidden {
        mounts.push(path_components(hidden)?);
    }
    let mut differ = Differ {
        options: options.clone(),
        report: DiffReport::default(),
        mounts,
        patch_full: options.max_patch == 0,
    };
    for (i, (b, a)) in before.iter().zip(after).enumerate() {
        let target = &targets[i];
        // The filter selects the mount whose target is its longest prefix; other mounts that
        // lie inside the filtered path are compared too.
        let inner_filter = match &filter {
            Some(f) if f.starts_with(target) => {
                let deeper = targets
                    .iter()
                    .any(|t| t.len() > target.len() && t.starts_with(target) && f.starts_with(t));
                if deeper {
                    continue;
                }
                Some(f[target.len()..].to_vec())
            }
            Some(f) if target.starts_with(f) => None,
            Some(_) => continue,
            None => None,
        };
        let common = b
            .layers
            .iter()
            .zip(&a.layers)
            .take_while(|(x, y)| x == y)
            .count();
        let lb = Level::root(&b.layers, common)?;
        let la = Level::root(&a.layers, common)?;
        let mut path = target.clone();
        let scope = Scope {
            base: target.len(),
            everything: false,
        };
        differ.dir((&lb, &la), &mut path, scope, inner_filter.as_deref())?;
        if differ.report.truncated && differ.report.changes.len() >= options.max_changes {
            break;
        }
    }
    Ok(differ.report)
}

/// The components of an absolute path inside the sandbox; `..` is refused.
fn path_components(path: &str) -> Result<Vec<Vec<u8>>> {
    if !path.starts_with('/') {
        return Err(ImageError::Invalid(format!(
            "path {path:?} must be absolute (inside the sandbox)"
        )));
    }
    let mut out = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                return Err(ImageError::Invalid(format!(
                    "path {path:?} must not contain `..`"
                )))
            }
            c if c.contains('\0') => {
                return Err(ImageError::Invalid(format!(
                    "path {path:?} contains a NUL byte"
                )))
            }
            c => out.push(c.as_bytes().to_vec()),
        }
    }
    Ok(out)
}

fn target_components(target: &Path) -> Result<Vec<Vec<u8>>> {
    let text = target.to_str().ok_or_else(|| {
        ImageError::Invalid(format!("mount target {} is not UTF-8", target.display()))
    })?;
    path_components(text)
}

/// One directory of a stack: for each layer (bottom to top), its descriptor of the directory
/// when the directory is there and not hidden by a layer above.
struct Level {
    dirs: Vec<Option<Rc<OwnedFd>>>,
    opaque: Vec<bool>,
    /// Layers below this index are shared with the other side.
    common: usize,
}

/// An entry found in a stack: the layer it comes from and its `lstat`.
struct Entry {
    layer: usize,
    dir: Rc<OwnedFd>,
    st: Stat,
}

fn is_opaque(dir: &OwnedFd) -> bool {
    let mut value = [0u8; 8];
    matches!(rustix::fs::fgetxattr(dir, OPAQUE_XATTR, &mut value), Ok(n) if &value[..n] == b"y")
}

fn is_whiteout(st: &Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::CharacterDevice && st.st_rdev == 0
}

fn is_dir(st: &Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::Directory
}

fn list(dir: &OwnedFd) -> io::Result<Vec<Vec<u8>>> {
    let mut names = Vec::new();
    let mut listing = rustix::fs::Dir::read_from(dir)?;
    while let Some(entry) = listing.read() {
        let n = entry?.file_name().to_bytes().to_vec();
        if n != b"." && n != b".." {
            names.push(n);
        }
    }
    Ok(names)
}

impl Level {
    /// The roots of `layers` (the layer directories are the store's or the runtime's, not a
    /// sandbox's choice; everything below them is read without following links).
    fn root(layers: &[PathBuf], common: usize) -> Result<Self> {
        let mut level = Self {
            dirs: Vec::with_capacity(layers.len()),
            opaque: vec![false; layers.len()],
            common,
        };
        for layer in layers {
            let fd = open_dir_path(layer)
                .context(|| format!("cannot open layer {}", layer.display()))?;
            level.dirs.push(Some(Rc::new(fd)));
        }
        Ok(level)
    }

    /// The topmost visible entry `name`; `None` when no layer has it or a whiteout deletes it.
    fn lookup(&self, name: &[u8], shown: &dyn Fn() -> String) -> Result<Option<Entry>> {
        for (layer, dir) in self.dirs.iter().enumerate().rev() {
            let Some(dir) = dir else { continue };
            match rustix::fs::statat(&**dir, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) if is_whiteout(&st) => return Ok(None),
                Ok(st) => {
                    return Ok(Some(Entry {
                        layer,
                        dir: dir.clone(),
                        st,
                    }))
                }
                Err(Errno::NOENT) => {}
                Err(e) => return Err(ImageError::io(format!("cannot inspect {}", shown()), e)),
            }
        }
        Ok(None)
    }

    /// The directory `name` (which the caller found to be a directory on top).
    fn child(&self, name: &[u8], shown: &dyn Fn() -> String) -> Result<Self> {
        let n = self.dirs.len();
        let mut next = Self {
            dirs: vec![None; n],
            opaque: vec![false; n],
            common: self.common,
        };
        for i in (0..n).rev() {
            let Some(dir) = &self.dirs[i] else { continue };
            match rustix::fs::statat(&**dir, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) if is_dir(&st) => {
                    let sub = match open_dir_at(&**dir, name) {
                        Ok(sub) => sub,
                        // Replaced between the two calls (a sandbox at work): not there.
                        Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => continue,
                        Err(e) => {
                            return Err(ImageError::io(format!("cannot open {}", shown()), e))
                        }
                    };
                    let opaque = is_opaque(&sub);
                    next.dirs[i] = Some(Rc::new(sub));
                    next.opaque[i] = opaque;
                    if opaque {
                        break;
                    }
                }
                // A file or a whiteout hides the directories below.
                Ok(_) => break,
                Err(Errno::NOENT) => {}
                Err(e) => return Err(ImageError::io(format!("cannot inspect {}", shown()), e)),
            }
        }
        Ok(next)
    }

    /// Whether a layer this side does not share hides everything below it here.
    fn replaced(&self) -> bool {
        self.opaque[self.common..].iter().any(|o| *o)
    }

    /// Names in the layers this side does not share (whiteouts included).
    fn own_names(&self, out: &mut BTreeSet<Vec<u8>>, shown: &dyn Fn() -> String) -> Result<()> {
        for dir in self.dirs[self.common..].iter().flatten() {
            out.extend(list(dir).context(|| format!("cannot list {}", shown()))?);
        }
        Ok(())
    }

    /// Names of the merged directory (whiteouts applied).
    fn merged_names(&self, out: &mut BTreeSet<Vec<u8>>, shown: &dyn Fn() -> String) -> Result<()> {
        let mut seen = BTreeSet::new();
        for dir in self.dirs.iter().rev().flatten() {
            for name in list(dir).context(|| format!("cannot list {}", shown()))? {
                if seen.contains(&name) {
                    continue;
                }
                let whiteout =
                    rustix::fs::statat(&**dir, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW)
                        .is_ok_and(|st| is_whiteout(&st));
                if !whiteout {
                    out.insert(name.clone());
                }
                seen.insert(name);
            }
        }
        Ok(())
    }
}

fn type_name(st: &Stat) -> &'static str {
    match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile => "file",
        FileType::Directory => "dir",
        FileType::Symlink => "symlink",
        FileType::Fifo => "fifo",
        FileType::Socket => "socket",
        FileType::CharacterDevice => "char_device",
        FileType::BlockDevice => "block_device",
        FileType::Unknown => "unknown",
    }
}

fn git_mode(st: &Stat) -> String {
    match FileType::from_raw_mode(st.st_mode) {
        FileType::Symlink => "120000".into(),
        _ if st.st_mode & 0o111 != 0 => "100755".into(),
        _ => "100644".into(),
    }
}

fn show(path: &[Vec<u8>]) -> String {
    let mut s = String::new();
    for c in path {
        s.push('/');
        s.push_str(&String::from_utf8_lossy(c));
    }
    if s.is_empty() {
        s.push('/');
    }
    s
}

/// A regular file of a layer, opened without following links; `None` when it is no longer a
/// regular file (a sandbox replaced it meanwhile).
fn open_file(entry: &Entry, name: &[u8], shown: &str) -> Result<Option<File>> {
    let fd = match rustix::fs::openat(
        &*entry.dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NOCTTY | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::NOENT | Errno::LOOP | Errno::NXIO) => return Ok(None),
        Err(e) => return Err(ImageError::io(format!("cannot open {shown}"), e)),
    };
    let st = rustix::fs::fstat(&fd).context(|| format!("cannot inspect {shown}"))?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Ok(None);
    }
    Ok(Some(File::from(fd)))
}

/// Reads up to `limit` bytes.
fn read_limited(file: Option<File>, limit: u64, shown: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    if let Some(file) = file {
        file.take(limit)
            .read_to_end(&mut out)
            .context(|| format!("cannot read {shown}"))?;
    }
    Ok(out)
}

/// Whether two regular files hold the same bytes (read in chunks, stopping at the first
/// difference).
fn same_content(a: &Entry, b: &Entry, name: &[u8], shown: &str) -> Result<bool> {
    if a.st.st_size != b.st.st_size {
        return Ok(false);
    }
    if (a.st.st_dev, a.st.st_ino) == (b.st.st_dev, b.st.st_ino) {
        return Ok(true);
    }
    let (Some(mut fa), Some(mut fb)) = (open_file(a, name, shown)?, open_file(b, name, shown)?)
    else {
        return Ok(false);
    };
    let mut ba = vec![0u8; 64 << 10];
    let mut bb = vec![0u8; 64 << 10];
    loop {
        let na = read_full(&mut fa, &mut ba).context(|| format!("cannot read {shown}"))?;
        let nb = read_full(&mut fb, &mut bb).context(|| format!("cannot read {shown}"))?;
        if na != nb || ba[..na] != bb[..nb] {
            return Ok(false);
        }
        if na == 0 {
            return Ok(true);
        }
    }
}

fn read_full(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// What one side of a change holds, for the patch.
struct Side {
    mode: String,
    /// The text (file contents or link target), `None` when it is binary or too large.
    text: Option<String>,
    /// Too large to show.
    large: bool,
}

/// Where a comparison stands: the depth of its mount's target, and whether every name of
/// both merged directories is compared (one side does not have the directory at all).
#[derive(Debug, Clone, Copy)]
struct Scope {
    base: usize,
    everything: bool,
}

impl Scope {
    fn everything(self) -> Self {
        Self {
            everything: true,
            ..self
        }
    }
}

struct Differ {
    options: DiffOptions,
    report: DiffReport,
    /// Mount targets (and hidden paths): a directory of one mount that is another's target
    /// is left to it.
    mounts: Vec<Vec<Vec<u8>>>,
    patch_full: bool,
}

impl Differ {
    fn full(&self) -> bool {
        self.report.changes.len() >= self.options.max_changes
    }

    /// Compares directory `path` of both sides; `filter` holds the remaining components of the
    /// path asked for.
    fn dir(
        &mut self,
        (before, after): (&Level, &Level),
        path: &mut Vec<Vec<u8>>,
        scope: Scope,
        filter: Option<&[Vec<u8>]>,
    ) -> Result<()> {
        let filter = filter.filter(|f| !f.is_empty());
        if path.len() > MAX_DEPTH {
            self.report.truncated = true;
            return Ok(());
        }
        let shown = || show(path);
        let mut names = BTreeSet::new();
        match filter.and_then(|f| f.first()) {
            Some(first) => {
                names.insert(first.clone());
            }
            None if scope.everything || before.replaced() || after.replaced() => {
                before.merged_names(&mut names, &shown)?;
                after.merged_names(&mut names, &shown)?;
            }
            None => {
                before.own_names(&mut names, &shown)?;
                after.own_names(&mut names, &shown)?;
            }
        }
        for name in names {
            if self.full() {
                self.report.truncated = true;
                return Ok(());
            }
            path.push(name);
            let result = self.entry((before, after), path, scope, filter.map(|f| &f[1..]));
            path.pop();
            result?;
        }
        Ok(())
    }

    fn entry(
        &mut self,
        (before, after): (&Level, &Level),
        path: &mut Vec<Vec<u8>>,
        scope: Scope,
        filter: Option<&[Vec<u8>]>,
    ) -> Result<()> {
        let Scope { base, everything } = scope;
        // Another mount's target is compared there.
        if path.len() > base && self.mounts.iter().any(|m| m.len() > base && m == path) {
            return Ok(());
        }
        let Some(name) = path.last().cloned() else {
            return Ok(());
        };
        let shown_path = show(path);
        let shown = || shown_path.clone();
        let b = before.lookup(&name, &shown)?;
        let a = after.lookup(&name, &shown)?;
        // An entry both sides take from the same shared layer is the same.
        if let (Some(b), Some(a)) = (&b, &a) {
            if b.layer == a.layer && b.layer < before.common && a.layer < after.common {
                return Ok(());
            }
        }
        let filter = filter.filter(|f| !f.is_empty());
        match (b, a) {
            (None, None) => Ok(()),
            // A path asked for below a directory only one side has.
            (None, Some(a)) if filter.is_some() && is_dir(&a.st) => {
                let ca = after.child(&name, &shown)?;
                self.dir((&ca.empty(), &ca), path, scope.everything(), filter)
            }
            (Some(b), None) if filter.is_some() && is_dir(&b.st) => {
                let cb = before.child(&name, &shown)?;
                self.dir((&cb, &cb.empty()), path, scope.everything(), filter)
            }
            (None, Some(a)) => self.whole(after, &a, path, ChangeKind::Added),
            (Some(b), None) => self.whole(before, &b, path, ChangeKind::Deleted),
            (Some(b), Some(a)) if is_dir(&b.st) && is_dir(&a.st) => {
                if !everything && filter.is_none() && !before.child_touched(&name, after, &shown)? {
                    return Ok(());
                }
                let (cb, ca) = (before.child(&name, &shown)?, after.child(&name, &shown)?);
                self.dir((&cb, &ca), path, scope, filter)
            }
            (Some(b), Some(a)) if is_dir(&b.st) || is_dir(&a.st) => {
                self.whole(before, &b, path, ChangeKind::Deleted)?;
                self.whole(after, &a, path, ChangeKind::Added)
            }
            (Some(b), Some(a)) => {
                if filter.is_some() {
                    return Ok(());
                }
                self.compare(&b, &a, &name, path)
            }
        }
    }

    /// Reports `entry` (and, for a directory, everything in it) as added or deleted.
    fn whole(
        &mut self,
        level: &Level,
        entry: &Entry,
        path: &mut Vec<Vec<u8>>,
        kind: ChangeKind,
    ) -> Result<()> {
        let Some(name) = path.last().cloned() else {
            return Ok(());
        };
        if self.full() {
            self.report.truncated = true;
            return Ok(());
        }
        let shown = show(path);
        let link = self.link_target(entry, &name, &shown)?;
        self.report.changes.push(Change {
            path: shown.clone(),
            kind,
            file_type: type_name(&entry.st).into(),
            size: u64::try_from(entry.st.st_size).unwrap_or(0),
            link_target: link.clone(),
        });
        if is_dir(&entry.st) {
            if path.len() > MAX_DEPTH {
                self.report.truncated = true;
                return Ok(());
            }
            let shown_fn = || shown.clone();
            let child = level.child(&name, &shown_fn)?;
            let mut names = BTreeSet::new();
            child.merged_names(&mut names, &shown_fn)?;
            for n in names {
                path.push(n.clone());
                let found = child.lookup(&n, &|| show(path))?;
                let result = match found {
                    Some(e) => self.whole(&child, &e, path, kind),
                    None => Ok(()),
                };
                path.pop();
                result?;
            }
            return Ok(());
        }
        let side = self.side(entry, &name, &shown, link)?;
        match kind {
            ChangeKind::Added => self.patch(&shown, None, side),
            _ => self.patch(&shown, side, None),
        }
    }

    fn link_target(&self, entry: &Entry, name: &[u8], shown: &str) -> Result<Option<String>> {
        if FileType::from_raw_mode(entry.st.st_mode) != FileType::Symlink {
            return Ok(None);
        }
        match rustix::fs::readlinkat(&*entry.dir, name, Vec::new()) {
            Ok(t) => Ok(Some(String::from_utf8_lossy(t.as_bytes()).into_owned())),
            Err(Errno::NOENT | Errno::INVAL) => Ok(None),
            Err(e) => Err(ImageError::io(format!("cannot read the link {shown}"), e)),
        }
    }

    /// The patch side of a file or link (`None` for other types).
    fn side(
        &self,
        entry: &Entry,
        name: &[u8],
        shown: &str,
        link: Option<String>,
    ) -> Result<Option<Side>> {
        if self.patch_full {
            return Ok(None);
        }
        match FileType::from_raw_mode(entry.st.st_mode) {
            FileType::Symlink => Ok(Some(Side {
                mode: git_mode(&entry.st),
                text: link,
                large: false,
            })),
            FileType::RegularFile => {
                let size = u64::try_from(entry.st.st_size).unwrap_or(0);
                if size > MAX_PATCH_FILE {
                    return Ok(Some(Side {
                        mode: git_mode(&entry.st),
                        text: None,
                        large: true,
                    }));
                }
                let bytes = read_limited(open_file(entry, name, shown)?, MAX_PATCH_FILE, shown)?;
                let text = if bytes.contains(&0) {
                    None
                } else {
                    String::from_utf8(bytes).ok()
                };
                Ok(Some(Side {
                    mode: git_mode(&entry.st),
                    text,
                    large: false,
                }))
            }
            _ => Ok(None),
        }
    }

    /// Two non-directories at the same path.
    fn compare(&mut self, b: &Entry, a: &Entry, name: &[u8], path: &[Vec<u8>]) -> Result<()> {
        let shown = show(path);
        let (tb, ta) = (
            FileType::from_raw_mode(b.st.st_mode),
            FileType::from_raw_mode(a.st.st_mode),
        );
        let perms_differ = (b.st.st_mode & 0o7777) != (a.st.st_mode & 0o7777);
        let (lb, la) = (
            self.link_target(b, name, &shown)?,
            self.link_target(a, name, &shown)?,
        );
        let changed = if tb != ta {
            true
        } else {
            match ta {
                FileType::RegularFile => perms_differ || !same_content(b, a, name, &shown)?,
                FileType::Symlink => lb != la,
                FileType::CharacterDevice | FileType::BlockDevice => {
                    perms_differ || b.st.st_rdev != a.st.st_rdev
                }
                _ => perms_differ,
            }
        };
        if !changed {
            return Ok(());
        }
        self.report.changes.push(Change {
            path: shown.clone(),
            kind: ChangeKind::Modified,
            file_type: type_name(&a.st).into(),
            size: u64::try_from(a.st.st_size).unwrap_or(0),
            link_target: la.clone(),
        });
        let before = self.side(b, name, &shown, lb)?;
        let after = self.side(a, name, &shown, la)?;
        self.patch(&shown, before, after)
    }

    /// Appends the git-style patch of one path (nothing when neither side is a file or link).
    fn patch(&mut self, path: &str, before: Option<Side>, after: Option<Side>) -> Result<()> {
        if self.patch_full || (before.is_none() && after.is_none()) {
            return Ok(());
        }
        let rel = path.trim_start_matches('/');
        let mut out = format!("diff --git a/{rel} b/{rel}\n");
        match (&before, &after) {
            (None, Some(a)) => {
                let _ = writeln!(out, "new file mode {}", a.mode);
            }
            (Some(b), None) => {
                let _ = writeln!(out, "deleted file mode {}", b.mode);
            }
            (Some(b), Some(a)) if b.mode != a.mode => {
                let _ = writeln!(out, "old mode {}\nnew mode {}", b.mode, a.mode);
            }
            _ => {}
        }
        let old_name = if before.is_some() {
            format!("a/{rel}")
        } else {
            "/dev/null".into()
        };
        let new_name = if after.is_some() {
            format!("b/{rel}")
        } else {
            "/dev/null".into()
        };
        let texts = (
            before.as_ref().map(|s| s.text.as_deref()),
            after.as_ref().map(|s| s.text.as_deref()),
        );
        let large =
            before.as_ref().is_some_and(|s| s.large) || after.as_ref().is_some_and(|s| s.large);
        match texts {
            (Some(None), _) | (_, Some(None)) if large => {
                let _ = writeln!(
                    out,
                    "Files {old_name} and {new_name} differ (larger than {} KiB: no text shown)",
                    MAX_PATCH_FILE >> 10
                );
            }
            (Some(None), _) | (_, Some(None)) => {
                let _ = writeln!(out, "Binary files {old_name} and {new_name} differ");
            }
            (old, new) => {
                let old = old.flatten().unwrap_or("");
                let new = new.flatten().unwrap_or("");
                if old != new {
                    let _ = writeln!(out, "--- {old_name}\n+++ {new_name}");
                    let diff = similar::TextDiff::from_lines(old, new);
                    for hunk in diff.unified_diff().context_radius(3).iter_hunks() {
                        let _ = write!(out, "{hunk}");
                    }
                }
            }
        }
        if self.report.patch.len() + out.len() > self.options.max_patch {
            self.patch_full = true;
            self.report.truncated = true;
            return Ok(());
        }
        self.report.patch.push_str(&out);
        Ok(())
    }
}

impl Level {
    /// A directory no layer has (the side of a path only the other side has).
    fn empty(&self) -> Self {
        Self {
            dirs: vec![None; self.dirs.len()],
            opaque: vec![false; self.dirs.len()],
            common: self.common,
        }
    }

    /// Whether a layer not shared by one of the sides has the directory `name`: only then
    /// can it differ.
    fn child_touched(
        &self,
        name: &[u8],
        other: &Level,
        shown: &dyn Fn() -> String,
    ) -> Result<bool> {
        for level in [self, other] {
            for dir in level.dirs[level.common..].iter().flatten() {
                match rustix::fs::statat(&**dir, name, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(_) => return Ok(true),
                    Err(Errno::NOENT) => {}
                    Err(e) => return Err(ImageError::io(format!("cannot inspect {}", shown()), e)),
                }
            }
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests;
