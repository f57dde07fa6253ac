//! Errors of the image store. Each message names the problem (the entry, the digest, the media
//! type, the image) and, where the user can act, what to do; lower case, no trailing period.

use std::io;

use openrun_runtime::RuntimeError;

/// Anything that can go wrong in the image store or an import.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// An image name or tag that cannot be valid.
    #[error("invalid image name {name:?}: {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No image with this name and tag is in the store.
    #[error("image {0:?} not found (see `openrun image ls`)")]
    NotFound(String),
    /// A tar entry that would escape the layer, write through a link, or make a device.
    #[error("unsafe archive entry {entry:?}: {reason}")]
    UnsafeEntry {
        /// The entry's path as written in the archive.
        entry: String,
        /// Why it is refused.
        reason: String,
    },
    /// A truncated or otherwise unreadable archive, manifest or layer.
    #[error("corrupt {what}: {message}")]
    Corrupt {
        /// What was being read (a layer's digest, `index.json`, ...).
        what: String,
        /// What is wrong.
        message: String,
    },
    /// Content whose digest is not the one it was announced with.
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch {
        /// What was checked (a blob, a layer's diff id).
        what: String,
        /// The announced digest.
        expected: String,
        /// The digest of what was read.
        actual: String,
    },
    /// A manifest or layer of a media type this importer does not know.
    #[error("unsupported media type {media_type:?} for {what}")]
    UnsupportedMediaType {
        /// The media type.
        media_type: String,
        /// Where it appeared.
        what: String,
    },
    /// Input that is well-formed but not something the store can take (no manifest, too many
    /// images in one archive, an image without layers, ...).
    #[error("{0}")]
    Invalid(String),
    /// Layers an image names are not in the store (removed by a prune, or never added).
    #[error("layers missing from the image store: {}", .0.join(", "))]
    MissingLayers(Vec<String>),
    /// A host-side file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// The runtime (listing live sandboxes for prune) failed.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

impl ImageError {
    /// Whether this is a write into a pipe whose reader has gone (`EPIPE`).
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, Self::Io { source, .. } if source.kind() == io::ErrorKind::BrokenPipe)
    }

    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: impl Into<io::Error>) -> Self {
        Self::Io {
            context: context.into(),
            source: source.into(),
        }
    }

    /// A [`ImageError::Corrupt`] for `what`.
    pub fn corrupt(what: impl Into<String>, message: impl std::fmt::Display) -> Self {
        Self::Corrupt {
            what: what.into(),
            message: message.to_string(),
        }
    }

    /// An [`ImageError::UnsafeEntry`] for the entry `entry`.
    pub fn unsafe_entry(entry: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::UnsafeEntry {
            entry: entry.into(),
            reason: reason.into(),
        }
    }

    /// Whether the error comes from the caller's input (a bad name, a missing image, a bad
    /// archive) rather than the host; API layers map it to a 4xx.
    pub fn is_user_error(&self) -> bool {
        match self {
            Self::Io { .. } | Self::MissingLayers(_) => false,
            Self::Runtime(e) => e.is_user_error(),
            _ => true,
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = ImageError> = std::result::Result<T, E>;

/// Adds context to I/O results.
pub(crate) trait IoContext<T> {
    /// Attaches `context` (evaluated only on error).
    fn context(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: Into<io::Error>> IoContext<T> for std::result::Result<T, E> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| ImageError::io(context(), e))
    }
}
