//! What a caller asks for when creating a sandbox.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::limits::Limits;

/// Where the sandbox's read-only root filesystem comes from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageSource {
    /// The built-in `host` image: the host's `/usr` and a filtered copy of `/etc`, read-only,
    /// without home directories, `/etc/shadow` or anything from the data dir.
    Host,
    /// An unpacked root filesystem (for example made by `debootstrap`).
    Rootfs(PathBuf),
    /// An image of the store: its layer directories, bottom to top, stacked as the lowers of
    /// one root overlay (each idmapped, so files keep their owners inside). Whiteouts
    /// (character devices 0:0) and opaque directories (`user.overlay.opaque=y`) of upper
    /// layers hide what is below them.
    Layers {
        /// The image's name, as the caller gave it (shown in listings and records).
        name: String,
        /// Layer directories, bottom to top.
        layers: Vec<PathBuf>,
    },
    /// An image of the store made on the built-in `host` image (a snapshot of a host
    /// sandbox): the host image's mounts, each with the layers stacked on top (bottom to
    /// top). A layer holds a tree of the whole root: it is stacked over the skeleton at `/`,
    /// and its `usr/` subtree (and, on hosts without merged `/usr`, `bin/`, `lib/`...) over
    /// the host's `/usr` (the lowest lower of that mount), so what a sandbox changed there is
    /// seen again.
    HostLayers {
        /// The image's name, as the caller gave it (shown in listings and records).
        name: String,
        /// Layer directories, bottom to top.
        layers: Vec<PathBuf>,
    },
}

impl ImageSource {
    /// Resolves an image name given on the command line or the API.
    pub fn from_name(name: &str) -> Option<Self> {
        (name == "host").then_some(Self::Host)
    }

    /// Short description for listings.
    pub fn describe(&self) -> String {
        match self {
            Self::Host => "host".to_string(),
            Self::Rootfs(p) => format!("rootfs:{}", p.display()),
            Self::Layers { name, .. } | Self::HostLayers { name, .. } => name.clone(),
        }
    }
}

/// Where a sandbox's writable layer lives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Storage {
    /// On the runtime tmpfs: fastest to create and remove, charged to the sandbox's memory
    /// limit page by page (so a memory-limited sandbox cannot fill the host's RAM). For
    /// short-lived sandboxes (`openrun run`).
    Memory,
    /// In the data dir on disk: for long-lived sandboxes and large writes.
    #[default]
    Disk,
}

/// A sandbox to create.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SandboxSpec {
    /// Root filesystem.
    pub image: ImageSource,
    /// cgroup limits.
    pub limits: Limits,
    /// Where the writable layer lives.
    pub storage: Storage,
    /// The sandbox dies after this long (enforced by its agent, so it holds without a server).
    pub lifetime: Option<Duration>,
    /// Environment of every process (before per-exec variables).
    pub env: BTreeMap<String, String>,
    /// Default working directory (of processes that name none).
    pub cwd: Option<String>,
    /// Default user of processes that name none (`name`, `uid`, `uid:gid`; root when
    /// `None`), applied by the agent.
    #[serde(default)]
    pub user: Option<String>,
    /// Kill the sandbox when the creating process exits or closes its control connection.
    pub exit_with_creator: bool,
    /// The id to give the sandbox (a fresh random one when `None`), so a caller can record it
    /// before the sandbox exists. It must be valid and unused.
    #[serde(default)]
    pub id: Option<String>,
}

impl SandboxSpec {
    /// A sandbox on `image` with no limits and no lifetime.
    pub fn new(image: ImageSource) -> Self {
        Self {
            image,
            limits: Limits {
                pids: Some(crate::limits::DEFAULT_PIDS),
                ..Limits::default()
            },
            storage: Storage::default(),
            lifetime: None,
            env: BTreeMap::new(),
            cwd: None,
            user: None,
            exit_with_creator: false,
            id: None,
        }
    }
}
