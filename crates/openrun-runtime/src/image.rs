//! Read-only root filesystems for sandboxes: the built-in `host` image and unpacked rootfs
//! directories. An image is a list of [`Layer`]s, each mounted as an overlay (read-only lower
//! plus the sandbox's writable upper) at a path of the new root.
//!
//! The `host` image is a small skeleton (top-level directories, merged-`/usr` symlinks and a
//! filtered copy of `/etc`) built once per host `/etc` fingerprint, plus the host's own `/usr`.
//! It never contains home directories, `/etc/shadow` and friends, SSH host keys, or anything from
//! the data dir.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Result, RuntimeError};
use crate::spec::ImageSource;

/// Most read-only lowers one sandbox may have (every overlay's together): each is an
/// idmapped mount handed to the init over the setup channel.
pub const MAX_LOWERS: usize = 128;

/// One read-only directory under an overlay.
#[derive(Debug, Clone)]
pub struct Lower {
    /// Host directory (for records and messages).
    pub path: PathBuf,
    /// That directory, opened once when the image is resolved: the mount is made from this
    /// descriptor, so renaming or swapping a path component afterwards changes nothing.
    pub dir: std::sync::Arc<rustix::fd::OwnedFd>,
}

impl Lower {
    /// The directory `name` of this layer, opened beneath it without following a link;
    /// `None` when the layer has no such entry. A layer that holds something else there (a
    /// file, a link, a whiteout) would replace a directory the host image mounts: refused.
    fn subdir(&self, name: &str) -> Result<Option<Self>> {
        let path = self.path.join(name);
        match rustix::fs::openat(
            &*self.dir,
            name,
            rustix::fs::OFlags::PATH
                | rustix::fs::OFlags::DIRECTORY
                | rustix::fs::OFlags::NOFOLLOW
                | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        ) {
            Ok(dir) => Ok(Some(Self {
                path,
                dir: std::sync::Arc::new(dir),
            })),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(RuntimeError::LayerNotFound {
                source: io::Error::new(
                    io::Error::from(e).kind(),
                    format!(
                        "{} is not a directory, and the host image mounts its own /{name} there",
                        path.display()
                    ),
                ),
                path,
            }),
        }
    }

    fn open(path: PathBuf, follow: bool) -> io::Result<Self> {
        let mut flags =
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC;
        if !follow {
            flags |= rustix::fs::OFlags::NOFOLLOW;
        }
        let dir = rustix::fs::open(&path, flags, rustix::fs::Mode::empty())?;
        Ok(Self {
            path,
            dir: std::sync::Arc::new(dir),
        })
    }
}

/// One overlay mount of a sandbox's root.
#[derive(Debug, Clone)]
pub struct Layer {
    /// Absolute path inside the sandbox where it is mounted (`/` first).
    pub target: &'static str,
    /// Its read-only lowers, bottom to top.
    pub lowers: Vec<Lower>,
}

impl Layer {
    fn open(target: &'static str, lower: PathBuf) -> io::Result<Self> {
        Ok(Self {
            target,
            lowers: vec![Lower::open(lower, true)?],
        })
    }
}

/// A resolved image: layers in mount order.
#[derive(Debug, Clone)]
pub struct PreparedImage {
    /// Mounts, root first.
    pub layers: Vec<Layer>,
    /// Whether the root has an `/etc` to write `hostname` and `hosts` into.
    pub has_etc: bool,
}

/// Files and directories of `/etc` never copied into the host image.
const ETC_EXCLUDED: &[&str] = &[
    "shadow",
    "shadow-",
    "gshadow",
    "gshadow-",
    "security/opasswd",
    "ssl/private",
    "machine-id",
    ".pwd.lock",
    "hostname",
    "hosts",
    "mtab",
];

/// Top-level directories of the skeleton and their modes.
const SKELETON_DIRS: &[(&str, u32)] = &[
    ("dev", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("tmp", 0o1777),
    ("run", 0o755),
    ("var", 0o755),
    ("var/tmp", 0o1777),
    ("var/lib", 0o755),
    ("var/cache", 0o755),
    ("var/log", 0o755),
    ("root", 0o700),
    ("home", 0o755),
    ("mnt", 0o755),
    ("opt", 0o755),
    ("srv", 0o755),
    ("media", 0o755),
    ("usr", 0o755),
];

/// Top-level directories that merged-`/usr` hosts make symlinks into `/usr`.
const USR_ALIASES: &[&str] = &["bin", "sbin", "lib", "lib32", "lib64", "libx32"];

/// Resolves `source` to mountable layers, building the host skeleton under `images_dir` if
/// needed.
pub fn prepare(source: &ImageSource, images_dir: &Path) -> Result<PreparedImage> {
    match source {
        ImageSource::Rootfs(dir) => {
            let meta = fs::metadata(dir).map_err(|source| RuntimeError::RootfsNotFound {
                path: dir.clone(),
                source,
            })?;
            if !meta.is_dir() {
                return Err(RuntimeError::RootfsNotFound {
                    path: dir.clone(),
                    source: io::Error::from(io::ErrorKind::NotADirectory),
                });
            }
            let lower = fs::canonicalize(dir).map_err(|source| RuntimeError::RootfsNotFound {
                path: dir.clone(),
                source,
            })?;
            Ok(PreparedImage {
                has_etc: lower.join("etc").is_dir(),
                layers: vec![Layer::open("/", lower.clone()).map_err(|source| {
                    RuntimeError::RootfsNotFound {
                        path: lower,
                        source,
                    }
                })?],
            })
        }
        ImageSource::Layers { name, layers } => {
            let lowers = open_store_layers(name, layers)?;
            Ok(PreparedImage {
                has_etc: layers_have_etc(layers).unwrap_or(false),
                layers: vec![Layer {
                    target: "/",
                    lowers,
                }],
            })
        }
        ImageSource::HostLayers { name, layers } => {
            let store = open_store_layers(name, layers)?;
            let mut mounts = host_mounts(images_dir)?;
            // Each layer is a tree of the whole root: on top of `/`, and its subtree at each
            // other mount's target on top of that mount (the host's `/usr` stays lowest).
            for layer in &store {
                for mount in &mut mounts {
                    match mount.target.strip_prefix('/').filter(|t| !t.is_empty()) {
                        None => mount.lowers.push(layer.clone()),
                        Some(sub) => mount.lowers.extend(layer.subdir(sub)?),
                    }
                }
            }
            Ok(PreparedImage {
                has_etc: layers_have_etc(layers).unwrap_or(true),
                layers: mounts,
            })
        }
        ImageSource::Host => Ok(PreparedImage {
            layers: host_mounts(images_dir)?,
            has_etc: true,
        }),
    }
}

/// Opens the store layers of image `name` (bottom to top) as lowers, each once.
fn open_store_layers(name: &str, layers: &[PathBuf]) -> Result<Vec<Lower>> {
    if layers.is_empty() || layers.len() > MAX_LOWERS {
        return Err(RuntimeError::TooManyLayers {
            name: name.to_string(),
            count: layers.len(),
            max: MAX_LOWERS,
        });
    }
    // overlayfs refuses a directory twice among its lowers (ELOOP), and images may repeat a
    // layer (old Docker images repeat the empty one). Keeping only the topmost copy changes
    // nothing: whatever the lower copy shows, the upper one shows again above everything
    // between them.
    let mut seen = std::collections::HashSet::new();
    let mut unique: Vec<&PathBuf> = layers.iter().rev().filter(|p| seen.insert(*p)).collect();
    unique.reverse();
    unique
        .into_iter()
        .map(|path| {
            Lower::open(path.clone(), false).map_err(|source| RuntimeError::LayerNotFound {
                path: path.clone(),
                source,
            })
        })
        .collect()
}

/// Whether the root of `layers` has an `/etc` directory: the topmost layer that has an `etc`
/// entry decides (a whiteout or a file there hides the directories below); `None` when no
/// layer has one.
fn layers_have_etc(layers: &[PathBuf]) -> Option<bool> {
    layers
        .iter()
        .rev()
        .find_map(|l| fs::symlink_metadata(l.join("etc")).ok())
        .map(|m| m.is_dir())
}

/// The built-in host image's mounts: the skeleton at `/`, the host's `/usr` at `/usr`, and on
/// hosts without merged `/usr` their real `/bin`, `/lib`... directories.
fn host_mounts(images_dir: &Path) -> Result<Vec<Layer>> {
    let skeleton = host_skeleton(images_dir)?;
    let host_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RuntimeError::HostImage { path, source }
    };
    let mut layers = vec![
        Layer::open("/", skeleton.clone()).map_err(host_err(&skeleton))?,
        Layer::open("/usr", PathBuf::from("/usr")).map_err(host_err(Path::new("/usr")))?,
    ];
    for alias in USR_ALIASES {
        let host = Path::new("/").join(alias);
        if fs::symlink_metadata(&host).is_ok_and(|m| m.is_dir()) {
            layers.push(Layer::open(leak_target(alias), host.clone()).map_err(host_err(&host))?);
        }
    }
    Ok(layers)
}

fn leak_target(alias: &str) -> &'static str {
    match alias {
        "bin" => "/bin",
        "sbin" => "/sbin",
        "lib" => "/lib",
        "lib32" => "/lib32",
        "lib64" => "/lib64",
        _ => "/libx32",
    }
}

/// Fingerprint of the host's `/etc`: changes when files that matter are edited.
fn etc_fingerprint() -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut mix = |v: u64| {
        h ^= v;
        h = h.wrapping_mul(0x0100_0000_01b3);
    };
    for name in [
        "",
        "passwd",
        "group",
        "resolv.conf",
        "ld.so.cache",
        "alternatives",
        "nsswitch.conf",
        "os-release",
        "ssl/certs",
    ] {
        if let Ok(m) = fs::metadata(Path::new("/etc").join(name)) {
            mix(m.mtime() as u64);
            mix(m.mtime_nsec() as u64);
            mix(m.size());
            mix(m.ino());
        }
    }
    mix(u64::from(env_version()));
    h
}

/// Bumped when the skeleton's layout changes, so old skeletons are rebuilt.
const fn env_version() -> u32 {
    3
}

/// Returns the skeleton directory for the current `/etc`, building it if needed.
fn host_skeleton(images_dir: &Path) -> Result<PathBuf> {
    let base = images_dir.join("host");
    let dir = base.join(format!("{:016x}", etc_fingerprint()));
    if dir.is_dir() {
        return Ok(dir);
    }
    let err = |source| RuntimeError::HostImage {
        path: base.clone(),
        source,
    };
    fs::create_dir_all(&base).map_err(err)?;
    let tmp = base.join(format!(".build-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    build_skeleton(&tmp).map_err(err)?;
    match fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        // Another creator finished first: use theirs.
        Err(_) if dir.is_dir() => {
            let _ = fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            Err(err(e))
        }
    }
}

fn build_skeleton(dst: &Path) -> io::Result<()> {
    fs::DirBuilder::new().mode(0o755).create(dst)?;
    for (dir, mode) in SKELETON_DIRS {
        let path = dst.join(dir);
        fs::create_dir_all(&path)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(*mode))?;
    }
    for alias in USR_ALIASES {
        let host = Path::new("/").join(alias);
        match fs::symlink_metadata(&host) {
            Ok(m) if m.file_type().is_symlink() => {
                std::os::unix::fs::symlink(fs::read_link(&host)?, dst.join(alias))?;
            }
            Ok(m) if m.is_dir() => fs::create_dir(dst.join(alias))?,
            _ => {}
        }
    }
    copy_tree(Path::new("/etc"), &dst.join("etc"), Path::new(""))?;
    std::os::unix::fs::symlink("../proc/self/mounts", dst.join("etc/mtab"))?;
    // Placeholders: every sandbox binds its own hostname and hosts over them, so neither the
    // image nor the writable layer holds per-sandbox files.
    for name in ["hostname", "hosts"] {
        fs::write(dst.join("etc").join(name), b"")?;
    }
    Ok(())
}

/// Copies `src` to `dst` keeping modes, owners and symlinks, skipping excluded and special files.
fn copy_tree(src: &Path, dst: &Path, rel: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(src)?;
    fs::DirBuilder::new()
        .mode(meta.mode() & 0o7777)
        .create(dst)?;
    for entry in fs::read_dir(src)? {
        let entry = entry?;
        let name = entry.file_name();
        let rel_child = rel.join(&name);
        if is_excluded(&rel_child) {
            continue;
        }
        let from = entry.path();
        let to = dst.join(&name);
        let m = fs::symlink_metadata(&from)?;
        let ft = m.file_type();
        if ft.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&from)?, &to)?;
        } else if !is_public(&m) {
            // Only what every host user may read goes into the image: idmapping makes host
            // root's files sandbox root's, so a root-only file (a key, a password) would
            // otherwise become readable inside.
            continue;
        } else if ft.is_dir() {
            copy_tree(&from, &to, &rel_child)?;
        } else if ft.is_file() {
            match fs::copy(&from, &to) {
                Ok(_) => {}
                // Unreadable host files are simply not part of the image.
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => continue,
                Err(e) => return Err(e),
            }
            fs::set_permissions(&to, fs::Permissions::from_mode(m.mode() & 0o7777))?;
        } else {
            continue;
        }
        std::os::unix::fs::lchown(&to, Some(m.uid()), Some(m.gid()))?;
    }
    fs::set_permissions(dst, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    std::os::unix::fs::lchown(dst, Some(meta.uid()), Some(meta.gid()))?;
    Ok(())
}

/// World-readable (and, for directories, world-searchable).
fn is_public(meta: &fs::Metadata) -> bool {
    let mode = meta.mode();
    if meta.is_dir() {
        mode & 0o005 == 0o005
    } else {
        mode & 0o004 != 0
    }
}

fn is_excluded(rel: &Path) -> bool {
    let Some(s) = rel.to_str() else { return true };
    if ETC_EXCLUDED.contains(&s) {
        return true;
    }
    // SSH host private keys: keep only the public halves.
    s.starts_with("ssh/ssh_host_") && !s.ends_with(".pub")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_excluded() {
        for p in [
            "shadow",
            "gshadow",
            "ssh/ssh_host_ed25519_key",
            "ssl/private",
        ] {
            assert!(is_excluded(Path::new(p)), "{p}");
        }
        for p in [
            "passwd",
            "group",
            "ssh/ssh_host_ed25519_key.pub",
            "ssl/certs",
        ] {
            assert!(!is_excluded(Path::new(p)), "{p}");
        }
    }

    #[test]
    fn host_skeleton_has_no_secrets_or_homes() {
        let dir = tempfile::tempdir().unwrap();
        let image = prepare(&ImageSource::Host, dir.path()).unwrap();
        let root = &image.layers[0].lowers[0].path;
        assert!(root.join("etc/passwd").is_file());
        assert!(!root.join("etc/shadow").exists());
        // Nothing in the copy is more private on the host than world-readable.
        let mut stack = vec![root.join("etc")];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir).unwrap() {
                let entry = entry.unwrap();
                let host =
                    Path::new("/etc").join(entry.path().strip_prefix(root.join("etc")).unwrap());
                let Ok(meta) = fs::symlink_metadata(&host) else {
                    continue;
                };
                if meta.file_type().is_symlink() {
                    continue;
                }
                assert!(
                    is_public(&meta),
                    "{} is not public on the host",
                    host.display()
                );
                if meta.is_dir() {
                    stack.push(entry.path());
                }
            }
        }
        assert!(fs::read_dir(root.join("home")).unwrap().next().is_none());
        assert!(fs::read_dir(root.join("root")).unwrap().next().is_none());
        assert_eq!(image.layers[1].lowers[0].path, Path::new("/usr"));
        // A second call reuses the same skeleton.
        let again = prepare(&ImageSource::Host, dir.path()).unwrap();
        assert_eq!(&again.layers[0].lowers[0].path, root);
    }

    #[test]
    fn host_layers_stack_over_every_host_mount() {
        let dir = tempfile::tempdir().unwrap();
        let with_usr = dir.path().join("a");
        fs::create_dir_all(with_usr.join("usr/local/bin")).unwrap();
        fs::create_dir_all(with_usr.join("root")).unwrap();
        let without = dir.path().join("b");
        fs::create_dir_all(without.join("etc")).unwrap();
        let source = ImageSource::HostLayers {
            name: "snap".into(),
            layers: vec![with_usr.clone(), without.clone()],
        };
        let image = prepare(&source, dir.path()).unwrap();
        let host = prepare(&ImageSource::Host, dir.path()).unwrap();
        assert_eq!(image.layers.len(), host.layers.len());
        let paths = |l: &Layer| l.lowers.iter().map(|l| l.path.clone()).collect::<Vec<_>>();
        let skeleton = host.layers[0].lowers[0].path.clone();
        assert_eq!(image.layers[0].target, "/");
        assert_eq!(
            paths(&image.layers[0]),
            [skeleton, with_usr.clone(), without.clone()]
        );
        assert_eq!(image.layers[1].target, "/usr");
        assert_eq!(
            paths(&image.layers[1]),
            [PathBuf::from("/usr"), with_usr.join("usr")]
        );
        assert!(image.has_etc);
        // A layer replacing /usr with a link is refused, never followed.
        let linked = dir.path().join("c");
        fs::create_dir_all(&linked).unwrap();
        std::os::unix::fs::symlink("/etc", linked.join("usr")).unwrap();
        let err = prepare(
            &ImageSource::HostLayers {
                name: "bad".into(),
                layers: vec![linked],
            },
            dir.path(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("mounts its own /usr"), "{err}");
        let none = ImageSource::HostLayers {
            name: "empty".into(),
            layers: Vec::new(),
        };
        assert!(prepare(&none, dir.path()).unwrap_err().is_user_error());
    }

    #[test]
    fn missing_rootfs_is_a_user_error() {
        let err = prepare(
            &ImageSource::Rootfs("/nonexistent/rootfs".into()),
            Path::new("/tmp"),
        )
        .unwrap_err();
        assert!(err.is_user_error());
        assert!(err.to_string().contains("/nonexistent/rootfs"), "{err}");
    }
}
