//! Errors of the namespace backend. Each message names the problem and, where the user can act,
//! what to do; lower case, no trailing period.

use std::io;
use std::path::PathBuf;

use crate::cgroup::CgroupError;
use crate::client::ClientError;

/// Anything that can go wrong while creating, finding or destroying a sandbox.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The runtime needs host root for id maps, idmapped mounts and cgroups.
    #[error("openrun needs to run as root (it maps sandbox ids, mounts images and sets cgroup limits); try again with sudo")]
    NotRoot,
    /// The data directory cannot be created or written.
    #[error("data dir {path} is not usable: {source}; pass a writable directory with --data-dir")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// `--rootfs` names something that is not a directory.
    #[error("rootfs {path} not found or not a directory: {source}")]
    RootfsNotFound {
        /// The path given.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// An image name the runtime does not know.
    #[error("image {0:?} not found: the built-in image is \"host\"; use --rootfs DIR for an unpacked root filesystem")]
    ImageNotFound(String),
    /// An image has no layers, or more than one sandbox can stack.
    #[error("image {name:?} has {count} layers; a sandbox can stack 1 to {max}")]
    TooManyLayers {
        /// The image.
        name: String,
        /// Its layers.
        count: usize,
        /// The most supported.
        max: usize,
    },
    /// A layer directory of an image is missing.
    #[error("image layer {path} cannot be opened: {source}")]
    LayerNotFound {
        /// The layer directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The built-in host image could not be prepared.
    #[error("cannot prepare the host image in {path}: {source}")]
    HostImage {
        /// Where it was being built.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// cgroups are missing or refused a write.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// The kernel refused to create a user namespace.
    #[error("this kernel does not allow user namespaces ({0}); enable them (sysctl user.max_user_namespaces > 0, kernel.unprivileged_userns_clone=1) or use a kernel built with CONFIG_USER_NS")]
    NoUserNamespaces(#[source] io::Error),
    /// The kernel has no overlayfs.
    #[error("this kernel has no overlay filesystem ({0}); use a kernel with CONFIG_OVERLAY_FS")]
    NoOverlayfs(#[source] io::Error),
    /// The filesystem holding an image does not support idmapped mounts.
    #[error("the filesystem of {path} does not support idmapped mounts ({source}); keep images on ext4, xfs, btrfs or tmpfs (kernel 5.12 or later)")]
    NoIdmappedMounts {
        /// The layer directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A step of building the sandbox failed inside the new namespaces.
    #[error("sandbox setup failed while {stage}: {message}")]
    Setup {
        /// What the child was doing.
        stage: String,
        /// The error it reported.
        message: String,
    },
    /// A limit out of range (for specs built directly rather than parsed).
    #[error(transparent)]
    InvalidLimits(#[from] crate::limits::LimitParseError),
    /// A disk quota was asked for and the disk pool that enforces it cannot be used.
    #[error("disk quotas are unavailable: {reason}; create sandboxes without a disk quota (no --disk; a server: --default-disk none) or fix the cause")]
    DiskPool {
        /// Why.
        reason: String,
    },
    /// Changing a sandbox's network failed (its `open` mode: pasta).
    #[error("cannot change the network of sandbox {id}: {reason}")]
    Network {
        /// The sandbox.
        id: String,
        /// Why.
        reason: String,
    },
    /// No sandbox with this id exists.
    #[error("no such sandbox: {0}")]
    NoSuchSandbox(String),
    /// A sandbox id that cannot be valid.
    #[error("invalid sandbox id {0:?}: expected 1 to 32 characters of a-z, 0-9 and -")]
    InvalidId(String),
    /// Talking to the agent failed.
    #[error(transparent)]
    Agent(#[from] ClientError),
    /// The helper process that created the sandbox for a multi-threaded caller failed; its
    /// error, as it reported it.
    #[error("{message}")]
    Helper {
        /// The helper's error message.
        message: String,
        /// Whether the helper classified it as the caller's input error.
        user_error: bool,
    },
    /// A host-side filesystem or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
}

impl RuntimeError {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: impl Into<io::Error>) -> Self {
        Self::Io {
            context: context.into(),
            source: source.into(),
        }
    }

    /// Whether the error comes from the caller's input (bad image, id, rootfs) rather than the
    /// host or the kernel; API layers map it to a 4xx.
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            Self::RootfsNotFound { .. }
                | Self::ImageNotFound(_)
                | Self::TooManyLayers { .. }
                | Self::NoSuchSandbox(_)
                | Self::InvalidId(_)
                | Self::InvalidLimits(_)
                | Self::Helper {
                    user_error: true,
                    ..
                }
        )
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

/// Adds context to I/O results.
pub(crate) trait IoContext<T> {
    /// Attaches `context` (evaluated only on error).
    fn context(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: Into<io::Error>> IoContext<T> for std::result::Result<T, E> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| RuntimeError::io(context(), e))
    }
}
