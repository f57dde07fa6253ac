//! A read-only view of a repository's files: [`DirTree`] for a directory on the client (for
//! `openrun up --plan PATH`), [`TarTree`] for the archive the server received. Paths are
//! relative, `/`-separated, without `.` or `..`; symbolic links are never followed (a link
//! reads as absent), so a plan never depends on anything outside the tree.

use crate::error::TreeError;

/// Largest file a plan reads (a manifest or lockfile); larger ones are an error naming them.
pub const MAX_READ: u64 = 16 * 1024 * 1024;

/// Longest entry name (bytes, after normalisation) a [`TarTree`] accepts.
pub const MAX_PATH: usize = 4096;

/// Most components in an entry name a [`TarTree`] accepts.
pub const MAX_DEPTH: usize = 256;

/// Most paths (entries and the directories they imply) a [`TarTree`] indexes.
pub const MAX_ENTRIES: usize = 500_000;

/// Most bytes of indexed path names a [`TarTree`] holds in memory.
pub const MAX_NAME_BYTES: usize = 128 * 1024 * 1024;

/// What a plan may ask of a repository.
pub trait RepoTree {
    /// The contents of the regular file at `path`, `None` if there is none (or it is a link
    /// or a directory); an error if it is larger than [`MAX_READ`] or cannot be read.
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, TreeError>;
    /// Whether a regular file is at `path`.
    fn is_file(&self, path: &str) -> bool;
    /// Whether a directory is at `path` (`""` is the root).
    fn is_dir(&self, path: &str) -> bool;
    /// Names of the entries of the directory `path` (`""` is the root), sorted; empty when
    /// it is not a directory.
    fn list(&self, path: &str) -> Vec<String>;
}

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Seek};
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use rustix::fs::{FileType, Mode, OFlags, ResolveFlags};
use sha2::{Digest, Sha256};

/// `path` as the trees key it: relative, `/`-separated, without `.` or empty components
/// (`""` is the root). `None` for a path that could leave the tree (`..`, absolute).
fn normalise(path: &str) -> Option<String> {
    if path.starts_with('/') {
        return None;
    }
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return None,
            _ => parts.push(part),
        }
    }
    Some(parts.join("/"))
}

/// The first 100 bytes of `name` (on a character boundary), for an error message.
fn truncated(name: &str) -> &str {
    let mut end = name.len().min(100);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// A directory on this machine. Every open resolves beneath the root with no symbolic link
/// followed (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`), so a link (to anywhere)
/// reads as absent and nothing outside the directory is ever read.
#[derive(Debug)]
pub struct DirTree {
    root: OwnedFd,
}

/// What an open beneath a [`DirTree`]'s root found.
enum Found {
    /// A regular file (opened `O_PATH`) and its size.
    File(u64),
    /// A directory.
    Dir,
    /// A device, fifo or socket.
    Other,
}

/// `openat2`'s resolution for every open of a [`DirTree`].
fn beneath() -> ResolveFlags {
    ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS
}

impl DirTree {
    /// The directory at `path` (`path` itself may be reached through a link; nothing inside
    /// it is).
    pub fn open(path: &Path) -> Result<DirTree, TreeError> {
        let root = rustix::fs::open(
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| TreeError::Io {
            path: path.display().to_string(),
            source: e.into(),
        })?;
        Ok(DirTree { root })
    }

    /// Opens `path` beneath the root with `flags`, following no link; `Ok(None)` when nothing
    /// is there that can be reached without a link or a `..`.
    fn open_beneath(&self, path: &str, flags: OFlags) -> io::Result<Option<OwnedFd>> {
        let Some(path) = normalise(path) else {
            return Ok(None);
        };
        let target = if path.is_empty() { "." } else { path.as_str() };
        // openat2 refuses flags O_PATH ignores (EINVAL), O_NOCTTY among them.
        let flags = if flags.contains(OFlags::PATH) {
            flags | OFlags::CLOEXEC | OFlags::NOFOLLOW
        } else {
            flags | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NOCTTY
        };
        match rustix::fs::openat2(&self.root, target, flags, Mode::empty(), beneath()) {
            Ok(fd) => Ok(Some(fd)),
            // Absent, a link on the way or at the end (ELOOP), an escape (EXDEV), a file
            // where a directory was expected (ENOTDIR): nothing reachable.
            Err(
                rustix::io::Errno::NOENT
                | rustix::io::Errno::LOOP
                | rustix::io::Errno::XDEV
                | rustix::io::Errno::NOTDIR,
            ) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// What is at `path`, looked at without opening it for reading (`O_PATH`: a fifo or a
    /// device is never opened).
    fn find(&self, path: &str) -> io::Result<Option<Found>> {
        let Some(fd) = self.open_beneath(path, OFlags::PATH)? else {
            return Ok(None);
        };
        Ok(Some(kind(&fd)?))
    }
}

/// The kind of the open file `fd`.
fn kind(fd: &OwnedFd) -> io::Result<Found> {
    let stat = rustix::fs::fstat(fd)?;
    Ok(match FileType::from_raw_mode(stat.st_mode) {
        FileType::RegularFile => Found::File(u64::try_from(stat.st_size).unwrap_or(0)),
        FileType::Directory => Found::Dir,
        _ => Found::Other,
    })
}

impl RepoTree for DirTree {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, TreeError> {
        let io_error = |source| TreeError::Io {
            path: path.to_string(),
            source,
        };
        // Looked at first through O_PATH, so a fifo is never opened for reading (it would
        // block) nor a device (it could have effects).
        match self.find(path).map_err(io_error)? {
            Some(Found::File(size)) if size > MAX_READ => {
                return Err(TreeError::TooLarge {
                    path: path.to_string(),
                    limit: MAX_READ,
                });
            }
            Some(Found::File(_)) => {}
            _ => return Ok(None),
        }
        let Some(fd) = self
            .open_beneath(path, OFlags::RDONLY | OFlags::NONBLOCK)
            .map_err(io_error)?
        else {
            return Ok(None);
        };
        // Replaced between the two opens: look again at what was opened.
        if !matches!(kind(&fd).map_err(io_error)?, Found::File(_)) {
            return Ok(None);
        }
        let mut data = Vec::new();
        File::from(fd)
            .take(MAX_READ + 1)
            .read_to_end(&mut data)
            .map_err(io_error)?;
        if data.len() as u64 > MAX_READ {
            return Err(TreeError::TooLarge {
                path: path.to_string(),
                limit: MAX_READ,
            });
        }
        Ok(Some(data))
    }

    fn is_file(&self, path: &str) -> bool {
        matches!(self.find(path), Ok(Some(Found::File(_))))
    }

    fn is_dir(&self, path: &str) -> bool {
        matches!(self.find(path), Ok(Some(Found::Dir)))
    }

    fn list(&self, path: &str) -> Vec<String> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY;
        let Ok(Some(fd)) = self.open_beneath(path, flags) else {
            return Vec::new();
        };
        let Ok(dir) = rustix::fs::Dir::new(fd) else {
            return Vec::new();
        };
        let mut names: Vec<String> = dir
            .filter_map(Result::ok)
            .filter_map(|entry| entry.file_name().to_str().ok().map(str::to_string))
            .filter(|name| name != "." && name != "..")
            .collect();
        names.sort();
        names
    }
}

/// What a tar entry is, as far as a plan is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A regular file: where its data starts in the archive, and its size.
    File { offset: u64, size: u64 },
    /// A directory (an entry of its own or implied by a path below it).
    Dir,
    /// A symbolic or hard link: reads as absent, but is part of the workspace.
    Link,
    /// A hard link, device, fifo...: reads as absent.
    Other,
}

/// An uncompressed tar file on disk (what the server received or cloned), indexed once at
/// [`TarTree::open`]; reads go to the file at the recorded offsets. Links (symbolic or hard)
/// read as absent.
#[derive(Debug)]
pub struct TarTree {
    file: File,
    entries: BTreeMap<String, Kind>,
    digest: String,
}

impl TarTree {
    /// Indexes the tar at `path` and computes its digest. An entry whose name is absolute,
    /// contains `..` or is not UTF-8 makes the whole archive invalid.
    pub fn open(path: &Path) -> Result<TarTree, TreeError> {
        TarTree::open_limited(path, MAX_ENTRIES)
    }

    /// [`TarTree::open`] with at most `max_entries` paths indexed.
    fn open_limited(path: &Path, max_entries: usize) -> Result<TarTree, TreeError> {
        let io_error = |source| TreeError::Io {
            path: path.display().to_string(),
            source,
        };
        let mut file = File::open(path).map_err(io_error)?;
        let mut hasher = Sha256::new();
        io::copy(&mut file, &mut hasher).map_err(io_error)?;
        let digest = hex(&hasher.finalize());
        file.rewind().map_err(io_error)?;

        let bad = |e: io::Error| TreeError::BadArchive(e.to_string());
        let mut entries = BTreeMap::new();
        let mut name_bytes = 0usize;
        let mut archive = tar::Archive::new(&file);
        for entry in archive.entries_with_seek().map_err(bad)? {
            let entry = entry.map_err(bad)?;
            let raw = entry.path_bytes();
            let name = std::str::from_utf8(&raw).map_err(|_| {
                TreeError::BadArchive(format!(
                    "an entry's name is not UTF-8: {}",
                    String::from_utf8_lossy(&raw)
                ))
            })?;
            let entry_type = entry.header().entry_type();
            if entry_type.is_pax_global_extensions() {
                continue;
            }
            let Some(key) = normalise(name) else {
                return Err(TreeError::BadArchive(format!(
                    "entry {name:?} leaves the archive's root (absolute or with ..)"
                )));
            };
            if key.is_empty() {
                continue;
            }
            if key.len() > MAX_PATH {
                return Err(TreeError::BadArchive(format!(
                    "an entry's name is longer than {MAX_PATH} bytes: {}...",
                    truncated(&key)
                )));
            }
            if key.split('/').count() > MAX_DEPTH {
                return Err(TreeError::BadArchive(format!(
                    "an entry's name is deeper than {MAX_DEPTH} directories: {}...",
                    truncated(&key)
                )));
            }
            let kind = if entry_type.is_file() || entry_type.is_contiguous() {
                Kind::File {
                    offset: entry.raw_file_position(),
                    size: entry.size(),
                }
            } else if entry_type.is_dir() {
                Kind::Dir
            } else if entry_type.is_symlink() || entry_type.is_hard_link() {
                Kind::Link
            } else {
                Kind::Other
            };
            // Every parent is a directory, listed or not. Parents are added from the nearest
            // up and the walk stops at the first one already a directory: its own parents were
            // recorded with it, so indexing stays linear in the names' total length.
            let mut parent = key.as_str();
            while let Some((up, _)) = parent.rsplit_once('/') {
                match entries.get_mut(up) {
                    Some(Kind::Dir) => break,
                    Some(other) => *other = Kind::Dir,
                    None => {
                        name_bytes += up.len();
                        entries.insert(up.to_string(), Kind::Dir);
                    }
                }
                parent = up;
            }
            // A later entry of the same name replaces an earlier one, as extraction does.
            if !entries.contains_key(&key) {
                name_bytes += key.len();
            }
            entries.insert(key, kind);
            if entries.len() > max_entries {
                return Err(TreeError::BadArchive(format!(
                    "more than {max_entries} entries (files and directories)"
                )));
            }
            if name_bytes > MAX_NAME_BYTES {
                return Err(TreeError::BadArchive(format!(
                    "entry names add up to more than {MAX_NAME_BYTES} bytes"
                )));
            }
        }
        Ok(TarTree {
            file,
            entries,
            digest,
        })
    }

    /// The paths of its regular files and links (symbolic and hard), sorted: what a workspace
    /// extracted from it holds besides directories.
    pub fn files(&self) -> Vec<String> {
        self.entries
            .iter()
            .filter(|(_, kind)| matches!(kind, Kind::File { .. } | Kind::Link))
            .map(|(path, _)| path.clone())
            .collect()
    }

    /// SHA-256 of the whole tar file, lower-case hex.
    pub fn digest(&self) -> String {
        self.digest.clone()
    }

    fn kind(&self, path: &str) -> Option<Kind> {
        let key = normalise(path)?;
        if key.is_empty() {
            return Some(Kind::Dir);
        }
        self.entries.get(&key).copied()
    }
}

impl RepoTree for TarTree {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, TreeError> {
        let Some(Kind::File { offset, size }) = self.kind(path) else {
            return Ok(None);
        };
        if size > MAX_READ {
            return Err(TreeError::TooLarge {
                path: path.to_string(),
                limit: MAX_READ,
            });
        }
        let mut data = vec![0; usize::try_from(size).unwrap_or(0)];
        self.file
            .read_exact_at(&mut data, offset)
            .map_err(|source| TreeError::Io {
                path: path.to_string(),
                source,
            })?;
        Ok(Some(data))
    }

    fn is_file(&self, path: &str) -> bool {
        matches!(self.kind(path), Some(Kind::File { .. }))
    }

    fn is_dir(&self, path: &str) -> bool {
        matches!(self.kind(path), Some(Kind::Dir))
    }

    fn list(&self, path: &str) -> Vec<String> {
        if !self.is_dir(path) {
            return Vec::new();
        }
        let Some(key) = normalise(path) else {
            return Vec::new();
        };
        let prefix = if key.is_empty() {
            String::new()
        } else {
            format!("{key}/")
        };
        // Keys are sorted, so a directory's descendants are one range starting at its prefix.
        self.entries
            .range(prefix.clone()..)
            .take_while(|(name, _)| name.starts_with(&prefix))
            .filter_map(|(name, _)| {
                let rest = &name[prefix.len()..];
                (!rest.contains('/')).then(|| rest.to_string())
            })
            .collect()
    }
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn dir_tree_reads_files_and_never_follows_links() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "outside").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("src/sub")).unwrap();
        std::fs::write(root.join("Cargo.toml"), "[package]").unwrap();
        std::fs::write(root.join("src/main.rs"), "fn main() {}").unwrap();
        symlink(outside.path().join("secret"), root.join("escape")).unwrap();
        symlink("Cargo.toml", root.join("inside-link")).unwrap();
        symlink(outside.path(), root.join("outdir")).unwrap();
        symlink("src", root.join("srclink")).unwrap();

        let tree = DirTree::open(root).unwrap();
        assert_eq!(tree.read("Cargo.toml").unwrap().unwrap(), b"[package]");
        assert_eq!(
            tree.read("./src//main.rs").unwrap().unwrap(),
            b"fn main() {}"
        );
        assert!(tree.read("escape").unwrap().is_none());
        assert!(tree.read("inside-link").unwrap().is_none());
        assert!(tree.read("outdir/secret").unwrap().is_none());
        assert!(tree.read("srclink/main.rs").unwrap().is_none());
        assert!(tree.read("src/../Cargo.toml").unwrap().is_none());
        assert!(tree.read("/etc/passwd").unwrap().is_none());
        assert!(tree.read("missing").unwrap().is_none());
        assert!(tree.read("src").unwrap().is_none());
        assert!(tree.is_file("Cargo.toml") && !tree.is_file("escape"));
        assert!(tree.is_dir("") && tree.is_dir("src/sub") && !tree.is_dir("srclink"));
        assert!(tree.list("outdir").is_empty());
        assert_eq!(
            tree.list(""),
            [
                "Cargo.toml",
                "escape",
                "inside-link",
                "outdir",
                "src",
                "srclink"
            ]
        );
        assert_eq!(tree.list("src"), ["main.rs", "sub"]);
        assert!(tree.list("Cargo.toml").is_empty());
    }

    #[test]
    fn dir_tree_does_not_open_a_fifo() {
        let dir = tempfile::tempdir().unwrap();
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            dir.path().join("fifo"),
            Mode::from_raw_mode(0o600),
        )
        .unwrap();
        let tree = DirTree::open(dir.path()).unwrap();
        assert!(tree.read("fifo").unwrap().is_none());
        assert!(!tree.is_file("fifo") && !tree.is_dir("fifo"));
    }

    #[test]
    fn dir_tree_refuses_files_over_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let big = File::create(dir.path().join("big")).unwrap();
        big.set_len(MAX_READ + 1).unwrap();
        let tree = DirTree::open(dir.path()).unwrap();
        assert!(matches!(tree.read("big"), Err(TreeError::TooLarge { .. })));
    }

    /// A tar with `entries` (name, type, data), names written raw (so `..` can be tested).
    fn tar_file(entries: &[(&str, tar::EntryType, &[u8])]) -> tempfile::NamedTempFile {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, entry_type, data) in entries {
            let mut header = tar::Header::new_gnu();
            let raw = &mut header.as_old_mut().name;
            raw[..name.len()].copy_from_slice(name.as_bytes());
            header.set_entry_type(*entry_type);
            header.set_mode(0o644);
            header.set_size(data.len() as u64);
            if entry_type.is_symlink() || entry_type.is_hard_link() {
                header.set_link_name("package.json").unwrap();
            }
            header.set_cksum();
            builder.append(&header, *data).unwrap();
        }
        let bytes = builder.into_inner().unwrap();
        let mut file = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut file, &bytes).unwrap();
        file
    }

    #[test]
    fn tar_tree_indexes_files_directories_and_links() {
        use tar::EntryType as T;
        let file = tar_file(&[
            ("./", T::Directory, b""),
            ("./package.json", T::Regular, b"{\"name\":\"x\"}"),
            ("src/index.js", T::Regular, b"console.log(1)"),
            ("src/lib/", T::Directory, b""),
            ("link", T::Symlink, b""),
            ("hard", T::Link, b""),
            ("src/a-b", T::Regular, b"x"),
            ("package.json", T::Regular, b"{}"),
        ]);
        let tree = TarTree::open(file.path()).unwrap();
        assert_eq!(tree.read("package.json").unwrap().unwrap(), b"{}");
        assert_eq!(
            tree.read("src/index.js").unwrap().unwrap(),
            b"console.log(1)"
        );
        assert!(tree.read("link").unwrap().is_none());
        assert!(tree.read("hard").unwrap().is_none());
        assert!(tree.read("src").unwrap().is_none());
        assert!(tree.read("../package.json").unwrap().is_none());
        assert!(tree.is_dir("") && tree.is_dir("src") && tree.is_dir("src/lib"));
        assert!(!tree.is_file("link") && !tree.is_dir("link"));
        assert_eq!(tree.list(""), ["hard", "link", "package.json", "src"]);
        assert_eq!(tree.list("src"), ["a-b", "index.js", "lib"]);
        assert_eq!(
            tree.files(),
            ["hard", "link", "package.json", "src/a-b", "src/index.js"]
        );
        let whole = std::fs::read(file.path()).unwrap();
        assert_eq!(tree.digest(), hex(&Sha256::digest(&whole)));
    }

    #[test]
    fn tar_tree_reads_long_names_and_pax_entries() {
        let long = format!("{}/Cargo.toml", "d".repeat(150));
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(3);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        builder
            .append_data(&mut header, &long, &b"abc"[..])
            .unwrap();
        builder
            .append_pax_extensions([("path", "pax/é.txt".as_bytes())])
            .unwrap();
        let mut header = tar::Header::new_ustar();
        header.set_path("short").unwrap();
        header.set_size(2);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        builder.append(&header, &b"hi"[..]).unwrap();
        let mut file = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut file, &builder.into_inner().unwrap()).unwrap();
        let tree = TarTree::open(file.path()).unwrap();
        assert_eq!(tree.read(&long).unwrap().unwrap(), b"abc");
        assert_eq!(tree.read("pax/é.txt").unwrap().unwrap(), b"hi");
        assert!(tree.is_dir("pax") && !tree.is_file("short"));
    }

    #[test]
    fn tar_tree_refuses_names_leaving_the_root() {
        use tar::EntryType as T;
        for name in ["../evil", "a/../../evil", "/etc/passwd"] {
            let file = tar_file(&[("ok", T::Regular, b"1"), (name, T::Regular, b"x")]);
            let err = TarTree::open(file.path()).unwrap_err();
            assert!(matches!(err, TreeError::BadArchive(_)), "{name}: {err}");
        }
        let mut raw = tar_file(&[("x", T::Regular, b"1")]).into_temp_path();
        let mut bytes = std::fs::read(&raw).unwrap();
        bytes[0] = 0xff;
        // Checksum no longer matches: the archive is refused too.
        std::fs::write(&raw, &bytes).unwrap();
        assert!(TarTree::open(&raw).is_err());
        raw.close().unwrap();
        raw = tar_file(&[]).into_temp_path();
        assert!(TarTree::open(&raw).unwrap().files().is_empty());
    }

    /// A tar of one regular file per name (GNU long names as needed).
    fn tar_of_names(names: impl IntoIterator<Item = String>) -> tempfile::NamedTempFile {
        let mut builder = tar::Builder::new(Vec::new());
        for name in names {
            let mut header = tar::Header::new_gnu();
            header.set_size(0);
            header.set_mode(0o644);
            header.set_entry_type(tar::EntryType::Regular);
            builder.append_data(&mut header, &name, &b""[..]).unwrap();
        }
        let mut file = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut file, &builder.into_inner().unwrap()).unwrap();
        file
    }

    #[test]
    fn tar_tree_indexes_deep_paths_linearly() {
        // 200 files each 250 directories deep under the same directories: with every parent
        // recorded again for every file this is quadratic; stopping at a known parent it is not.
        let deep = "d/".repeat(250);
        let file = tar_of_names((0..200).map(|i| format!("{deep}f{i}")));
        let started = std::time::Instant::now();
        let tree = TarTree::open(file.path()).unwrap();
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        assert_eq!(tree.entries.len(), 250 + 200);
        assert!(tree.is_dir("d/d") && tree.is_file(&format!("{deep}f7")));
        // A file that a later entry shows to be a directory becomes one, parents and all.
        let file = tar_of_names(["a".to_string(), "a/b/c".to_string()]);
        let tree = TarTree::open(file.path()).unwrap();
        assert!(tree.is_dir("a") && tree.is_dir("a/b") && tree.is_file("a/b/c"));
    }

    #[test]
    fn tar_tree_refuses_too_long_too_deep_and_too_many_names() {
        let file = tar_of_names([format!("{}/f", "x".repeat(MAX_PATH))]);
        let err = TarTree::open(file.path()).unwrap_err().to_string();
        assert!(err.contains("longer than 4096 bytes"), "{err}");
        let file = tar_of_names([format!("{}f", "d/".repeat(MAX_DEPTH))]);
        let err = TarTree::open(file.path()).unwrap_err().to_string();
        assert!(err.contains("deeper than 256"), "{err}");
        let file = tar_of_names([format!("{}f", "d/".repeat(MAX_DEPTH - 1))]);
        assert!(TarTree::open(file.path()).is_ok());
        // Directories implied by the names count too.
        let file = tar_of_names((0..50).map(|i| format!("d{i}/f")));
        let err = TarTree::open_limited(file.path(), 99)
            .unwrap_err()
            .to_string();
        assert!(err.contains("more than 99 entries"), "{err}");
        assert!(TarTree::open_limited(file.path(), 100).is_ok());
    }

    #[test]
    fn tar_tree_refuses_names_that_are_not_utf8() {
        let mut header = tar::Header::new_gnu();
        header.as_old_mut().name[..3].copy_from_slice(b"a\xffb");
        header.set_size(0);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        let mut builder = tar::Builder::new(Vec::new());
        builder.append(&header, &b""[..]).unwrap();
        let mut file = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut file, &builder.into_inner().unwrap()).unwrap();
        assert!(matches!(
            TarTree::open(file.path()),
            Err(TreeError::BadArchive(_))
        ));
    }
}

/// A repository in memory, for tests.
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct MemTree(pub(crate) BTreeMap<String, Vec<u8>>);

#[cfg(test)]
impl MemTree {
    /// A tree of `files` (path, contents).
    pub(crate) fn new(files: &[(&str, &str)]) -> Self {
        MemTree(
            files
                .iter()
                .map(|(p, c)| (p.to_string(), c.as_bytes().to_vec()))
                .collect(),
        )
    }
}

#[cfg(test)]
impl RepoTree for MemTree {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, TreeError> {
        Ok(normalise(path).and_then(|p| self.0.get(&p).cloned()))
    }
    fn is_file(&self, path: &str) -> bool {
        normalise(path).is_some_and(|p| self.0.contains_key(&p))
    }
    fn is_dir(&self, path: &str) -> bool {
        normalise(path)
            .is_some_and(|p| p.is_empty() || self.0.keys().any(|k| k.starts_with(&format!("{p}/"))))
    }
    fn list(&self, path: &str) -> Vec<String> {
        let Some(p) = normalise(path) else {
            return Vec::new();
        };
        let prefix = if p.is_empty() { p } else { format!("{p}/") };
        let mut names: Vec<String> = self
            .0
            .keys()
            .filter_map(|k| k.strip_prefix(&prefix))
            .map(|rest| rest.split('/').next().unwrap_or(rest).to_string())
            .collect();
        names.dedup();
        names
    }
}
