//! Where a sandbox's files live, and the record each live sandbox leaves so any later process
//! can list sandboxes, reattach to one, or clean up after one that died.
//!
//! Runtime files are on a tmpfs (`/run/openrun`, mounted there when `/run` is not one): they are
//! small, written on every create, and must not survive a reboot (neither do the sandboxes).
//! The writable layers are on disk in the data dir.
//!
//! ```text
//! /run/openrun/idmap/<slot>                     host id range claims (host-wide)
//! /run/openrun/<data-dir key>/<id>/state.json   SandboxRecord
//! /run/openrun/<data-dir key>/<id>/agent.sock   the agent's socket
//! /run/openrun/<data-dir key>/<id>/mnt/         mount points used inside the sandbox only
//!                                               (`mnt/layer`: the sandbox's own tmpfs for a
//!                                               `Storage::Memory` layer, never on the host)
//! <data-dir>/images/host/<fingerprint>/         the built-in image's skeleton (shared)
//! <data-dir>/images/store/                      image layers and records (openrun-image)
//! <data-dir>/sandboxes/<id>/<n>                 writable layer of mount n (`Storage::Disk`)
//! <data-dir>/sandboxes/<id>/<n>.work            overlayfs work dir of mount n
//! ```

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::ids::IdRange;
use crate::limits::Limits;
use crate::spec::{ImageSource, Storage};

/// Root of openrun's runtime files on the host.
pub const RUN_ROOT: &str = "/run/openrun";

/// Paths of one sandbox.
#[derive(Debug, Clone)]
pub struct SandboxPaths {
    /// Runtime dir: `/run/openrun/<key>/<id>`.
    pub run: PathBuf,
    /// Writable layer dir (owned by the sandbox's root, 0700): `<data-dir>/sandboxes/<id>`,
    /// or `<run>/layer` for memory storage.
    pub layer: PathBuf,
    /// Where a disk layer of this id would be (cleaned up whatever the storage).
    pub disk_layer: PathBuf,
}

impl SandboxPaths {
    /// Paths for sandbox `id` given the runtime dir and the layers dir of a data dir.
    pub fn new(run_dir: &Path, layers_dir: &Path, id: &str, storage: Storage) -> Self {
        let run = run_dir.join(id);
        let disk_layer = layers_dir.join(id);
        let layer = match storage {
            Storage::Memory => run.join("mnt").join("layer"),
            Storage::Disk => disk_layer.clone(),
        };
        Self {
            run,
            layer,
            disk_layer,
        }
    }
    /// The record.
    pub fn state(&self) -> PathBuf {
        self.run.join("state.json")
    }
    /// The agent's socket.
    pub fn socket(&self) -> PathBuf {
        self.run.join("agent.sock")
    }
    /// Writable layer of mount `n`.
    pub fn upper(&self, n: usize) -> PathBuf {
        self.layer.join(n.to_string())
    }
    /// overlayfs work dir of mount `n`.
    pub fn work(&self, n: usize) -> PathBuf {
        self.layer.join(format!("{n}.work"))
    }
    /// Mount point of the new root (used inside the sandbox's mount namespace only).
    pub fn root_mount(&self) -> PathBuf {
        self.run.join("mnt").join("root")
    }
    /// Where idmapped lower `n` is attached (inside the sandbox's mount ns only); lowers are
    /// numbered across all of the sandbox's overlays.
    pub fn lower_mount(&self, n: usize) -> PathBuf {
        self.run.join("mnt").join(format!("lower{n}"))
    }
}

/// Runtime dir of a data dir: `/run/openrun/<16 hex digits of a hash of its path>`, so two
/// data dirs never see each other's sandboxes and socket paths stay short.
pub fn run_dir_for(data_dir: &Path) -> PathBuf {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data_dir.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    Path::new(RUN_ROOT).join(format!("{h:016x}"))
}

/// What a live sandbox records about itself (`state.json`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SandboxRecord {
    /// Sandbox id (also its hostname).
    pub id: String,
    /// Host pid of the agent (pid 1 inside).
    pub pid: i32,
    /// Start time of that pid in clock ticks since boot, to detect pid reuse.
    pub pid_start_ticks: u64,
    /// Host id range the sandbox's ids map to.
    pub ids: IdRange,
    /// Image description (`host`, `rootfs:/path`).
    pub image: String,
    /// Host directories used as read-only lowers, to keep them from garbage collection.
    pub lowers: Vec<PathBuf>,
    /// The image the sandbox was created from (`None` in records of older versions: see
    /// [`SandboxRecord::image_source`]).
    #[serde(default)]
    pub source: Option<ImageSource>,
    /// Its overlays, root first: where each is mounted and its lowers (the same directories
    /// as `lowers`, grouped). Empty in records of older versions: see
    /// [`SandboxRecord::mounts`].
    #[serde(default)]
    pub mounts: Vec<MountRecord>,
    /// Default user of processes that name none (`None`: root).
    #[serde(default)]
    pub user: Option<String>,
    /// Limits applied.
    pub limits: Limits,
    /// Where the writable layer lives.
    #[serde(default)]
    pub storage: Storage,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// Deadline, milliseconds since the Unix epoch, if the sandbox has a lifetime.
    pub expires_at_ms: Option<u64>,
}

/// One overlay of a sandbox's root as recorded: overlay `n` has the writable layer
/// `SandboxPaths::upper(n)`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MountRecord {
    /// Where it is mounted inside the sandbox (`/`, `/usr`).
    pub target: PathBuf,
    /// Its read-only lowers on the host, bottom to top.
    pub lowers: Vec<PathBuf>,
}

impl SandboxRecord {
    /// The image the sandbox was created from. Records written before it was kept say only
    /// the image's name and its lowers: `host`, `rootfs:DIR`, or a store image's layers.
    pub fn image_source(&self) -> ImageSource {
        if let Some(source) = &self.source {
            return source.clone();
        }
        match self.image.strip_prefix("rootfs:") {
            _ if self.image == "host" => ImageSource::Host,
            Some(dir) => ImageSource::Rootfs(PathBuf::from(dir)),
            None => ImageSource::Layers {
                name: self.image.clone(),
                layers: self.lowers.clone(),
            },
        }
    }

    /// The sandbox's overlays, root first. For records written before they were kept: the
    /// host image's lowers are one per mount (the skeleton at `/`, then directories mounted
    /// where they are on the host), any other image's all at `/`.
    pub fn mounts(&self) -> Vec<MountRecord> {
        if !self.mounts.is_empty() {
            return self.mounts.clone();
        }
        if self.image != "host" {
            return vec![MountRecord {
                target: PathBuf::from("/"),
                lowers: self.lowers.clone(),
            }];
        }
        self.lowers
            .iter()
            .enumerate()
            .map(|(n, lower)| MountRecord {
                target: if n == 0 {
                    PathBuf::from("/")
                } else {
                    lower.clone()
                },
                lowers: vec![lower.clone()],
            })
            .collect()
    }

    /// Writes the record atomically.
    pub fn save(&self, paths: &SandboxPaths) -> io::Result<()> {
        let tmp = paths.run.join("state.json.tmp");
        fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        fs::rename(tmp, paths.state())
    }

    /// Reads a record.
    pub fn load(paths: &SandboxPaths) -> io::Result<Self> {
        let bytes = fs::read(paths.state())?;
        serde_json::from_slice(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Whether the sandbox is more than 5 s past its deadline (its agent should have ended it).
    pub fn is_overdue(&self, now_ms: u64) -> bool {
        self.expires_at_ms
            .is_some_and(|t| now_ms > t.saturating_add(5_000))
    }

    /// Whether the recorded agent process still runs: same pid, same start time, and not a
    /// zombie waiting to be reaped by whoever inherited it.
    pub fn is_alive(&self) -> bool {
        process_stat(self.pid)
            .is_ok_and(|(state, t)| t == self.pid_start_ticks && state != 'Z' && state != 'X')
    }
}

/// Start time of a host process in clock ticks since boot (field 22 of `/proc/<pid>/stat`).
pub fn process_start_ticks(pid: i32) -> io::Result<u64> {
    process_stat(pid).map(|(_, ticks)| ticks)
}

/// State letter (field 3) and start time (field 22) of a host process.
fn process_stat(pid: i32) -> io::Result<(char, u64)> {
    let stat = crate::sys::read_kernel_file(format!("/proc/{pid}/stat"))?;
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    // The command name (field 2) is in parentheses and may contain spaces: split after it.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| bad("malformed stat"))?;
    // `rest` starts at field 3 (state); field 22 is index 19 from here.
    let mut fields = rest.split_whitespace();
    let state = fields
        .next()
        .and_then(|f| f.chars().next())
        .ok_or_else(|| bad("short stat"))?;
    let ticks = fields
        .nth(18)
        .ok_or_else(|| bad("short stat"))?
        .parse()
        .map_err(|_| bad("bad start time"))?;
    Ok((state, ticks))
}

/// Checks that `id` is safe to use as a path component, hostname and cgroup name.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 32
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-')
}

/// A new random sandbox id: 12 lowercase hex digits.
pub fn new_id() -> String {
    let mut bytes = [0u8; 6];
    let mut filled = 0;
    while filled < bytes.len() {
        match rustix::rand::getrandom(&mut bytes[filled..], rustix::rand::GetRandomFlags::empty()) {
            Ok(n) => filled += n,
            Err(rustix::io::Errno::INTR) => continue,
            // getrandom cannot fail after boot on Linux; fall back to time and pid entropy.
            Err(_) => {
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0)
                    ^ u128::from(std::process::id());
                bytes.copy_from_slice(&t.to_le_bytes()[..6]);
                break;
            }
        }
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `ms` since the Unix epoch as RFC 3339 UTC with milliseconds, e.g. `2023-11-14T22:13:20.000Z`.
pub fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let milli = ms.rem_euclid(1000);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{milli:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339(1_709_251_199_999), "2024-02-29T23:59:59.999Z");
    }

    #[test]
    fn run_dirs_differ_per_data_dir_and_stay_short() {
        let a = run_dir_for(Path::new("/var/lib/openrun"));
        let b = run_dir_for(Path::new("/var/lib/openrun2"));
        assert_ne!(a, b);
        assert!(a.starts_with(RUN_ROOT));
        let socket = SandboxPaths::new(&a, Path::new("/x"), &new_id(), Storage::Disk).socket();
        assert!(socket.as_os_str().len() < 100, "{}", socket.display());
    }

    #[test]
    fn ids_are_valid_and_distinct() {
        let a = new_id();
        let b = new_id();
        assert_eq!(a.len(), 12);
        assert!(valid_id(&a));
        assert_ne!(a, b);
    }

    #[test]
    fn id_validation_rejects_path_tricks() {
        for bad in ["", "../x", "a/b", "A", "-x", &"a".repeat(33), "a b", "a\0"] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn start_ticks_of_self_are_stable_and_dead_pids_fail() {
        let me = std::process::id() as i32;
        assert_eq!(
            process_start_ticks(me).unwrap(),
            process_start_ticks(me).unwrap()
        );
        assert!(process_start_ticks(i32::MAX).is_err());
    }
}
