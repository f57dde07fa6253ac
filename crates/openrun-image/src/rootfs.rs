//! A read-only view, from the host, of the tree an image's layers make once merged the way
//! overlayfs merges them: the topmost entry of a name wins, a whiteout (character device 0:0)
//! hides the name below it, a directory merges only with the directories right below it and
//! an opaque one (`user.overlay.opaque=y`) with none.
//!
//! The builder uses it to find where a `COPY` destination or a `WORKDIR` really is inside the
//! image (following the image's own symbolic links, resolved inside the image as a chroot
//! would, never on the host) and with which owner and mode its directories exist, and to read
//! the image's `/etc/passwd` and `/etc/group`. Layers in the store never change, and every
//! host path it builds is made of names it checked to be real directories (`lstat`).

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::PathBuf;

/// Most symbolic links one resolution follows (as Linux's `MAXSYMLINKS`).
const MAX_LINKS: usize = 40;

/// Owner, mode and time of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits (with setuid, setgid, sticky).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds.
    pub mtime: i64,
    /// Modification time, nanoseconds.
    pub mtime_nsec: i64,
}

impl Meta {
    fn of(m: &fs::Metadata) -> Self {
        Self {
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            mtime: m.mtime(),
            mtime_nsec: m.mtime_nsec(),
        }
    }
}

/// An entry of the merged tree.
#[derive(Debug, Clone)]
pub enum Node {
    /// A directory: its metadata (from the topmost layer) and the host directories merged
    /// into it, top to bottom.
    Dir {
        /// Metadata of the topmost copy.
        meta: Meta,
        /// Host directories that make it up, top to bottom.
        dirs: Vec<PathBuf>,
    },
    /// A regular file: its topmost copy.
    File {
        /// Metadata.
        meta: Meta,
        /// Host path of the copy in its layer.
        path: PathBuf,
    },
    /// A symbolic link.
    Symlink {
        /// Its target as written.
        target: PathBuf,
    },
    /// Anything else (fifo, socket).
    Other,
}

/// The result of [`ImageView::resolve`].
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The existing directories of the path, resolved (no symbolic link among them), from
    /// the root down: each name and node. Empty for `/`.
    pub dirs: Vec<(String, Node)>,
    /// Names below the last existing directory that do not exist (lexically clean).
    pub missing: Vec<String>,
    /// The entry named by the whole path when it exists and is not a directory (a file, or
    /// a symbolic link left unfollowed).
    pub last: Option<(String, Node)>,
}

impl Resolved {
    /// The node of the deepest existing directory (`None`: the root).
    pub fn deepest(&self) -> Option<&Node> {
        self.dirs.last().map(|(_, n)| n)
    }

    /// The resolved path of the existing part (`/` joined names).
    pub fn existing_path(&self) -> String {
        let mut s = String::new();
        for (name, _) in &self.dirs {
            s.push('/');
            s.push_str(name);
        }
        if let Some((name, _)) = &self.last {
            s.push('/');
            s.push_str(name);
        }
        if s.is_empty() {
            s.push('/');
        }
        s
    }
}

/// The merged tree of some layers.
#[derive(Debug, Clone)]
pub struct ImageView {
    root: Node,
}

impl ImageView {
    /// The view of `layers` (directories, bottom to top).
    pub fn new(layers: &[PathBuf]) -> io::Result<Self> {
        let mut dirs = Vec::new();
        let mut meta = None;
        for dir in layers.iter().rev() {
            let m = fs::symlink_metadata(dir)?;
            if !m.is_dir() {
                return Err(io::Error::new(
                    io::ErrorKind::NotADirectory,
                    format!("layer {} is not a directory", dir.display()),
                ));
            }
            meta.get_or_insert(Meta::of(&m));
            dirs.push(dir.clone());
            if is_opaque(dir) {
                break;
            }
        }
        let meta = meta.unwrap_or(Meta {
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
        });
        Ok(Self {
            root: Node::Dir { meta, dirs },
        })
    }

    /// The root directory.
    pub fn root(&self) -> &Node {
        &self.root
    }

    /// The entry `name` of the merged directory made of `dirs` (top to bottom).
    pub fn child(dirs: &[PathBuf], name: &str) -> io::Result<Option<Node>> {
        let mut found: Option<(Meta, Vec<PathBuf>)> = None;
        for dir in dirs {
            let path = dir.join(name);
            let m = match fs::symlink_metadata(&path) {
                Ok(m) => m,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(e),
            };
            let kind = m.file_type();
            let whiteout = kind.is_char_device() && m.rdev() == 0;
            match &mut found {
                // Below a directory only directories merge; anything else ends it.
                Some((_, below)) => {
                    if whiteout || !kind.is_dir() {
                        break;
                    }
                    below.push(path.clone());
                    if is_opaque(&path) {
                        break;
                    }
                }
                None if whiteout => return Ok(None),
                None if kind.is_dir() => {
                    let opaque = is_opaque(&path);
                    found = Some((Meta::of(&m), vec![path]));
                    if opaque {
                        break;
                    }
                }
                None if kind.is_symlink() => {
                    return Ok(Some(Node::Symlink {
                        target: fs::read_link(&path)?,
                    }))
                }
                None if kind.is_file() => {
                    return Ok(Some(Node::File {
                        meta: Meta::of(&m),
                        path,
                    }))
                }
                None => return Ok(Some(Node::Other)),
            }
        }
        Ok(found.map(|(meta, dirs)| Node::Dir { meta, dirs }))
    }

    /// Resolves the absolute image path `path` as a process inside would (symbolic links of
    /// the image followed inside it, `..` stopping at the root), following a final symbolic
    /// link only with `follow_last`. A missing component ends the walk: the rest is
    /// returned as [`Resolved::missing`]. Errors name a component that is not a directory,
    /// or a loop of links.
    pub fn resolve(&self, path: &str, follow_last: bool) -> Result<Resolved, String> {
        let mut todo: std::collections::VecDeque<String> = components(path).collect();
        let mut dirs: Vec<(String, Node)> = Vec::new();
        let mut links = 0;
        while let Some(name) = todo.pop_front() {
            if name == ".." {
                dirs.pop();
                continue;
            }
            let parent = dirs.last().map_or(&self.root, |(_, n)| n);
            let Node::Dir { dirs: layers, .. } = parent else {
                return Err(format!("{} is not a directory", show(&dirs)));
            };
            let node = Self::child(layers, &name)
                .map_err(|e| format!("cannot read {}/{name} in the image: {e}", show(&dirs)))?;
            match node {
                None => {
                    if todo.iter().any(|c| c == "..") {
                        return Err(format!(
                            "cannot resolve {path}: a symbolic link leads through the missing {}/{name} and back with ..",
                            show(&dirs).trim_end_matches('/')
                        ));
                    }
                    let missing = std::iter::once(name).chain(todo).collect();
                    return Ok(Resolved {
                        dirs,
                        missing,
                        last: None,
                    });
                }
                Some(Node::Symlink { target }) if follow_last || !todo.is_empty() => {
                    links += 1;
                    if links > MAX_LINKS {
                        return Err(format!("{path}: too many levels of symbolic links"));
                    }
                    let target = target.to_string_lossy().into_owned();
                    if target.starts_with('/') {
                        dirs.clear();
                    }
                    for c in target
                        .split('/')
                        .filter(|c| !c.is_empty() && *c != ".")
                        .rev()
                    {
                        todo.push_front(c.to_string());
                    }
                }
                Some(node @ Node::Dir { .. }) => dirs.push((name, node)),
                Some(node) if todo.is_empty() => {
                    return Ok(Resolved {
                        dirs,
                        missing: Vec::new(),
                        last: Some((name, node)),
                    })
                }
                Some(_) => {
                    return Err(format!(
                        "{}/{name} is not a directory in the image",
                        show(&dirs).trim_end_matches('/')
                    ))
                }
            }
        }
        Ok(Resolved {
            dirs,
            missing: Vec::new(),
            last: None,
        })
    }

    /// The contents of the regular file at `path` (symbolic links followed inside the
    /// image), at most `limit` bytes; `None` when there is no such file.
    pub fn read_file(&self, path: &str, limit: u64) -> Result<Option<Vec<u8>>, String> {
        let resolved = match self.resolve(path, true) {
            Ok(r) => r,
            Err(_) => return Ok(None),
        };
        let Some((_, Node::File { path: host, .. })) = resolved.last else {
            return Ok(None);
        };
        use std::io::Read;
        let file = fs::OpenOptions::new()
            .read(true)
            .custom_flags_nofollow()
            .open(&host)
            .map_err(|e| format!("cannot read {path} of the image: {e}"))?;
        let mut bytes = Vec::new();
        file.take(limit)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("cannot read {path} of the image: {e}"))?;
        Ok(Some(bytes))
    }
}

/// `O_NOFOLLOW` for [`fs::OpenOptions`].
trait NoFollow {
    fn custom_flags_nofollow(&mut self) -> &mut Self;
}

impl NoFollow for fs::OpenOptions {
    fn custom_flags_nofollow(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
    }
}

/// The components of a path, without empty ones and `.`.
pub fn components(path: &str) -> impl Iterator<Item = String> + '_ {
    path.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .map(str::to_string)
}

/// Lexically cleans an absolute path: `.` and empty components dropped, `..` applied
/// (stopping at the root). Returns `/` for the root.
pub fn clean(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    format!("/{}", out.join("/"))
}

fn show(dirs: &[(String, Node)]) -> String {
    let mut s = String::new();
    for (name, _) in dirs {
        s.push('/');
        s.push_str(name);
    }
    if s.is_empty() {
        s.push('/');
    }
    s
}

fn is_opaque(path: &std::path::Path) -> bool {
    let mut value = [0u8; 4];
    for name in [crate::layer::OPAQUE_XATTR, "trusted.overlay.opaque"] {
        if let Ok(n) = rustix::fs::lgetxattr(path, name, &mut value) {
            if value[..n] == *b"y" {
                return true;
            }
        }
    }
    false
}

#[cfg(test)]
mod tests;
