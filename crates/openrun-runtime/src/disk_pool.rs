//! Disk quotas of writable layers: one btrfs filesystem in a sparse file of the data dir (the
//! disk pool), loop-mounted at `<data-dir>/disk-pool`, where every sandbox with a disk quota
//! gets its writable layer as its own subvolume limited by a qgroup.
//!
//! Why this shape (see ARCHITECTURE.md, "Disk quotas"): the host's own filesystem has no
//! project quotas to use (and openrun must not reformat or remount it); this kernel has no
//! quota format for ext4 or xfs (`CONFIG_QFMT_V2`, `CONFIG_XFS_QUOTA` unset) and no tmpfs
//! quotas, but btrfs qgroups are always built in. A per-sandbox filesystem would cost a
//! `mkfs` and a loop device per create; one pool costs one `mkfs` per data dir, and a quota
//! per sandbox is a subvolume plus one ioctl (well under a millisecond). Deleting a subvolume
//! is one ioctl too, and the kernel drops its qgroup once the subvolume is gone.
//!
//! Limits are enforced on every write to the subvolume whoever writes (qgroups have no
//! capability bypass), so a full quota gives `EDQUOT` inside while the pool, the host's disk
//! and every other sandbox carry on. btrfs allocates inodes dynamically: every inode costs
//! metadata charged to the same qgroup, so creating files without end also stops at the quota.
//!
//! ```text
//! <data-dir>/disk-pool.img     sparse file holding the pool (blocks freed inside are
//!                              punched out of it again: `discard=async`)
//! <data-dir>/disk-pool.lock    flock serialising who formats and mounts it
//! <data-dir>/disk-pool/        its mount point (nosuid, nodev, noatime), mode 0711
//! <data-dir>/disk-pool/<id>/   a sandbox's writable layer: a subvolume, 0700, its root's
//! ```
//!
//! The mount does not survive a reboot (nor do the sandboxes): the next create that needs the
//! pool mounts the file again.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use rustix::fd::OwnedFd;

use crate::error::{Result, RuntimeError};

/// Smallest pool worth making: btrfs needs room for its metadata and system chunks.
pub const MIN_POOL_BYTES: u64 = 256 << 20;
/// Environment variable naming the pool's size when it is first made (`20G`, `500M`...).
pub const POOL_SIZE_ENV: &str = "OPENRUN_DISK_POOL_SIZE";

const BTRFS_SUPER_MAGIC: i64 = 0x9123_683e;
const BTRFS_IOCTL_MAGIC: u64 = 0x94;
const BTRFS_QGROUP_LIMIT_MAX_RFER: u64 = 1;
const BTRFS_QUOTA_CTL_ENABLE: u64 = 1;

/// `struct btrfs_ioctl_vol_args`.
#[repr(C)]
struct VolArgs {
    fd: i64,
    name: [u8; 4088],
}

/// `struct btrfs_ioctl_qgroup_limit_args` (with `struct btrfs_qgroup_limit` inlined).
#[repr(C)]
#[derive(Default)]
struct QgroupLimitArgs {
    qgroupid: u64,
    flags: u64,
    max_rfer: u64,
    max_excl: u64,
    rsv_rfer: u64,
    rsv_excl: u64,
}

/// `struct btrfs_ioctl_quota_ctl_args`.
#[repr(C)]
#[derive(Default)]
struct QuotaCtlArgs {
    cmd: u64,
    status: u64,
}

/// `_IOC(dir, 0x94, nr, size)` of `<linux/btrfs.h>` (dir: 1 write, 2 read, 3 both).
const fn btrfs_ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (BTRFS_IOCTL_MAGIC << 8) | nr
}
const BTRFS_IOC_SUBVOL_CREATE: u64 = btrfs_ioc(1, 14, std::mem::size_of::<VolArgs>());
const BTRFS_IOC_SNAP_DESTROY: u64 = btrfs_ioc(1, 15, std::mem::size_of::<VolArgs>());
const BTRFS_IOC_QUOTA_CTL: u64 = btrfs_ioc(3, 40, std::mem::size_of::<QuotaCtlArgs>());
// Declared `_IOR` in <linux/btrfs.h> although the kernel reads the argument.
const BTRFS_IOC_QGROUP_LIMIT: u64 = btrfs_ioc(2, 43, std::mem::size_of::<QgroupLimitArgs>());

/// Runs a btrfs ioctl whose argument is a plain struct owned by the caller.
fn btrfs_ioctl<T>(fd: &OwnedFd, request: u64, arg: &mut T) -> io::Result<()> {
    // SAFETY: `fd` is an open descriptor, `request` is one of the btrfs ioctls above, each
    // declared with the size of `T` (checked by the tests), and `arg` is a valid, exclusively
    // borrowed `T` for the duration of the call.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), request as libc::c_ulong, arg as *mut T) };
    if ret == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn vol_args(name: &str) -> io::Result<VolArgs> {
    let mut args = VolArgs {
        fd: 0,
        name: [0; 4088],
    };
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= args.name.len() || bytes.contains(&0) {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    args.name[..bytes.len()].copy_from_slice(bytes);
    Ok(args)
}

fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        path,
        rustix::fs::OFlags::RDONLY
            | rustix::fs::OFlags::DIRECTORY
            | rustix::fs::OFlags::NOFOLLOW
            | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?)
}

/// The disk pool of one data dir.
#[derive(Debug, Clone)]
pub(crate) struct DiskPool {
    image: PathBuf,
    dir: PathBuf,
    lock: PathBuf,
}

impl DiskPool {
    /// The pool of `data_dir` (nothing is made until [`DiskPool::ensure`]).
    pub(crate) fn new(data_dir: &Path) -> Self {
        Self {
            image: data_dir.join("disk-pool.img"),
            dir: data_dir.join("disk-pool"),
            lock: data_dir.join("disk-pool.lock"),
        }
    }

    /// Where the pool is mounted.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where sandbox `id`'s writable layer is when it has a disk quota.
    pub(crate) fn layer(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// Whether the pool is mounted: a btrfs on another device than the data dir.
    pub(crate) fn is_mounted(&self) -> bool {
        let on_btrfs = rustix::fs::statfs(&self.dir).is_ok_and(|s| s.f_type == BTRFS_SUPER_MAGIC);
        let (Ok(dir), Some(Ok(parent))) =
            (fs::metadata(&self.dir), self.dir.parent().map(fs::metadata))
        else {
            return false;
        };
        on_btrfs && dir.dev() != parent.dev()
    }

    /// Mounts the pool, first making it (a sparse file of `size` bytes, or half the free space
    /// of the data dir's filesystem) when it does not exist. Safe to call from several
    /// processes at once.
    pub(crate) fn ensure(&self, size: Option<u64>) -> Result<()> {
        if self.is_mounted() {
            return Ok(());
        }
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.lock)
            .map_err(|e| unavailable(format!("cannot create {}: {e}", self.lock.display())))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| unavailable(format!("cannot lock {}: {e}", self.lock.display())))?;
        if self.is_mounted() {
            return Ok(());
        }
        if !Path::new("/dev/loop-control").exists() {
            return Err(unavailable(
                "this host has no loop devices (/dev/loop-control is missing; load the loop \
                 module or give the container access to it)"
                    .into(),
            ));
        }
        fs::DirBuilder::new()
            .mode(0o711)
            .create(&self.dir)
            .or_else(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => Ok(()),
                _ => Err(e),
            })
            .map_err(|e| unavailable(format!("cannot create {}: {e}", self.dir.display())))?;
        if !self.image.exists() {
            self.format(size)?;
        }
        run(
            Command::new(tool("mount")?)
                .args(["-t", "btrfs", "-o"])
                .arg("loop,nosuid,nodev,noatime,discard=async")
                .arg(&self.image)
                .arg(&self.dir),
            "mounting the disk pool",
        )?;
        let root = open_dir(&self.dir)
            .map_err(|e| unavailable(format!("cannot open {}: {e}", self.dir.display())))?;
        // Enabling quotas on a pool that has them is a no-op (a rescan is not started).
        let mut ctl = QuotaCtlArgs {
            cmd: BTRFS_QUOTA_CTL_ENABLE,
            status: 0,
        };
        btrfs_ioctl(&root, BTRFS_IOC_QUOTA_CTL, &mut ctl)
            .map_err(|e| unavailable(format!("cannot enable quotas on the disk pool: {e}")))?;
        // Sandboxes' inits run as their own ids and reach their layer by path.
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o711)).map_err(|e| {
            unavailable(format!(
                "cannot set the mode of {}: {e}",
                self.dir.display()
            ))
        })?;
        tracing::info!(pool = %self.image.display(), "disk pool mounted");
        Ok(())
    }

    /// Makes the sparse file and its btrfs.
    fn format(&self, size: Option<u64>) -> Result<()> {
        let size = match size {
            Some(size) => size,
            None => default_size(self.dir.parent().unwrap_or(Path::new("/")))?,
        };
        if size < MIN_POOL_BYTES {
            return Err(unavailable(format!(
                "a disk pool of {size} bytes is too small (at least 256 MiB; set {POOL_SIZE_ENV})"
            )));
        }
        let tmp = self.image.with_extension("img.tmp");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&tmp)
            .map_err(|e| unavailable(format!("cannot create {}: {e}", tmp.display())))?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))
            .and_then(|()| file.set_len(size))
            .map_err(|e| unavailable(format!("cannot size {}: {e}", tmp.display())))?;
        drop(file);
        // One device: duplicating metadata on it protects nothing.
        let formatted = run(
            Command::new(tool("mkfs.btrfs")?)
                .args([
                    "-q",
                    "-f",
                    "-L",
                    "openrun-pool",
                    "-m",
                    "single",
                    "-d",
                    "single",
                ])
                .arg(&tmp),
            "formatting the disk pool",
        );
        if let Err(e) = formatted {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        fs::rename(&tmp, &self.image)
            .map_err(|e| unavailable(format!("cannot create {}: {e}", self.image.display())))?;
        tracing::info!(pool = %self.image.display(), size, "disk pool created");
        Ok(())
    }

    /// Makes sandbox `id`'s writable layer: a subvolume owned by `owner` (mode 0700) whose
    /// data and metadata may take at most `bytes`.
    pub(crate) fn create_layer(&self, id: &str, bytes: u64, owner: u32) -> Result<PathBuf> {
        let fail = |what: &str, e: io::Error| {
            RuntimeError::io(format!("cannot {what} the disk-quota layer of {id}"), e)
        };
        let root = open_dir(&self.dir).map_err(|e| fail("reach", e))?;
        let mut args = vol_args(id).map_err(|e| fail("name", e))?;
        btrfs_ioctl(&root, BTRFS_IOC_SUBVOL_CREATE, &mut args).map_err(|e| fail("create", e))?;
        let layer = self.layer(id);
        let limited = (|| {
            let dir = open_dir(&layer)?;
            // qgroup 0 = the subvolume `dir` is in.
            let mut limit = QgroupLimitArgs {
                flags: BTRFS_QGROUP_LIMIT_MAX_RFER,
                max_rfer: bytes,
                ..QgroupLimitArgs::default()
            };
            btrfs_ioctl(&dir, BTRFS_IOC_QGROUP_LIMIT, &mut limit)?;
            rustix::fs::fchown(
                &dir,
                Some(rustix::fs::Uid::from_raw(owner)),
                Some(rustix::fs::Gid::from_raw(owner)),
            )?;
            rustix::fs::fchmod(&dir, rustix::fs::Mode::from_raw_mode(0o700))?;
            Ok::<_, io::Error>(())
        })();
        if let Err(e) = limited {
            let _ = self.remove_layer(id);
            return Err(fail("limit", e));
        }
        Ok(layer)
    }

    /// Deletes sandbox `id`'s layer (a missing one is not an error). The subvolume goes at
    /// once; the kernel frees its blocks, and then its qgroup, in the background.
    pub(crate) fn remove_layer(&self, id: &str) -> Result<()> {
        let layer = self.layer(id);
        if fs::symlink_metadata(&layer).is_err() {
            return Ok(());
        }
        let root = open_dir(&self.dir)
            .map_err(|e| RuntimeError::io(format!("cannot open {}", self.dir.display()), e))?;
        let mut args = vol_args(id)
            .map_err(|e| RuntimeError::io(format!("cannot name the layer of {id}"), e))?;
        match btrfs_ioctl(&root, BTRFS_IOC_SNAP_DESTROY, &mut args) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            // Not a subvolume (made by hand?): remove it as a tree.
            Err(e) => {
                tracing::debug!(id, error = %e, "layer is not a subvolume");
                match fs::remove_dir_all(&layer) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(RuntimeError::io(
                        format!("cannot remove {}", layer.display()),
                        e,
                    )),
                }
            }
        }
    }

    /// Ids of the layers in the pool (empty when it is not mounted).
    pub(crate) fn layer_ids(&self) -> Vec<String> {
        if !self.is_mounted() {
            return Vec::new();
        }
        fs::read_dir(&self.dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                    .filter(|id| crate::state::valid_id(id))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Half the free space of the filesystem holding `dir`, at least [`MIN_POOL_BYTES`]: the pool
/// is sparse and never takes more than it holds, and half leaves the host room for
/// everything else even when the pool fills.
fn default_size(dir: &Path) -> Result<u64> {
    let st = rustix::fs::statvfs(dir).map_err(|e| {
        unavailable(format!(
            "cannot measure the free space of {}: {e}",
            dir.display()
        ))
    })?;
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    Ok((free / 2).max(MIN_POOL_BYTES) & !((1 << 20) - 1))
}

fn unavailable(reason: String) -> RuntimeError {
    RuntimeError::DiskPool { reason }
}

/// Finds a system tool without relying on `PATH` (the create helper runs with an empty
/// environment).
fn tool(name: &str) -> Result<PathBuf> {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
        .ok_or_else(|| {
            unavailable(format!(
                "{name} is not installed (Debian: apt-get install {})",
                if name == "mkfs.btrfs" {
                    "btrfs-progs"
                } else {
                    "mount"
                }
            ))
        })
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output()
        .map_err(|e| unavailable(format!("{what}: {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    Err(unavailable(format!(
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_linux_btrfs_h() {
        // Values from <linux/btrfs.h> as compiled for x86_64 and aarch64.
        assert_eq!(BTRFS_IOC_SUBVOL_CREATE, 0x5000_940e);
        assert_eq!(BTRFS_IOC_SNAP_DESTROY, 0x5000_940f);
        assert_eq!(BTRFS_IOC_QUOTA_CTL, 0xc010_9428);
        assert_eq!(BTRFS_IOC_QGROUP_LIMIT, 0x8030_942b);
    }

    #[test]
    fn layer_names_must_fit_and_hold_no_nul() {
        assert!(vol_args("0123abcd4567").is_ok());
        assert!(vol_args("").is_err());
        assert!(vol_args("a\0b").is_err());
        assert!(vol_args(&"a".repeat(4088)).is_err());
    }

    #[test]
    fn an_unmounted_pool_has_no_layers() {
        let dir = tempfile::tempdir().unwrap();
        let pool = DiskPool::new(dir.path());
        assert!(!pool.is_mounted());
        assert!(pool.layer_ids().is_empty());
        assert_eq!(pool.layer("abc"), dir.path().join("disk-pool/abc"));
        assert!(default_size(dir.path()).unwrap() >= MIN_POOL_BYTES);
    }
}
