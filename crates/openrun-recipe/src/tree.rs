//! A read-only view of a repository's files: [`DirTree`] for a directory on the client (for
//! `openrun up --plan PATH`), [`TarTree`] for the archive the server received. Paths are
//! relative, `/`-separated, without `.` or `..`; symbolic links are never followed (a link
//! reads as absent), so a plan never depends on anything outside the tree.

use crate::error::TreeError;

/// Largest file a plan reads (a manifest or lockfile); larger ones are an error naming them.
pub const MAX_READ: u64 = 16 * 1024 * 1024;

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
