//! Host id ranges: each live sandbox owns 65,536 host uids/gids, so uid 0 inside is an
//! unprivileged host uid and two sandboxes never share an id.
//!
//! A range is claimed by creating `<slot>` exclusively in a host-wide directory
//! (`/run/openrun/idmap`, shared by every data dir since ids are a host resource, and on a
//! tmpfs so claims cannot outlive a reboot); the file holds the owner's sandbox id.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Ids per sandbox.
pub const RANGE_SIZE: u32 = 65_536;
/// First host id handed to sandboxes (well above normal users and the usual subuid ranges).
pub const FIRST_ID: u32 = 1 << 30;
/// Number of ranges in the pool.
pub const SLOTS: u32 = 16_384;

/// A claimed range of host ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IdRange {
    /// Index of the range in the pool.
    pub slot: u32,
}

impl IdRange {
    /// Host id that uid/gid 0 inside the sandbox maps to.
    pub fn host_base(&self) -> u32 {
        FIRST_ID + self.slot * RANGE_SIZE
    }

    /// Line for `/proc/<pid>/uid_map` and `gid_map`.
    pub fn map_line(&self) -> String {
        format!("0 {} {}\n", self.host_base(), RANGE_SIZE)
    }
}

/// The host-wide pool of id ranges.
#[derive(Debug, Clone)]
pub struct IdPool {
    dir: PathBuf,
}

impl IdPool {
    /// Opens (creating) the pool directory.
    pub fn open(dir: impl Into<PathBuf>) -> io::Result<Self> {
        let dir = dir.into();
        if !fs::metadata(&dir).is_ok_and(|m| m.is_dir()) {
            fs::create_dir_all(&dir)?;
        }
        Ok(Self { dir })
    }

    fn slot_path(&self, slot: u32) -> PathBuf {
        self.dir.join(slot.to_string())
    }

    /// Claims a free range for `owner`, starting the search at a position derived from it so
    /// concurrent creators rarely collide.
    pub fn claim(&self, owner: &str) -> io::Result<IdRange> {
        let start = owner
            .bytes()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32))
            % SLOTS;
        for i in 0..SLOTS {
            let slot = (start + i) % SLOTS;
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(self.slot_path(slot))
            {
                Ok(mut f) => {
                    f.write_all(owner.as_bytes())?;
                    return Ok(IdRange { slot });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::other(format!(
            "all {SLOTS} host id ranges are in use"
        )))
    }

    /// Releases a range if `owner` still holds it.
    pub fn release(&self, range: IdRange, owner: &str) -> io::Result<()> {
        let path = self.slot_path(range.slot);
        match fs::read_to_string(&path) {
            Ok(holder) if holder == owner => remove_if_exists(&path),
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Releases whatever range `owner` holds (used when its record is lost).
    pub fn release_owner(&self, owner: &str) -> io::Result<()> {
        for entry in fs::read_dir(&self.dir)?.flatten() {
            if fs::read_to_string(entry.path()).is_ok_and(|holder| holder == owner) {
                remove_if_exists(&entry.path())?;
            }
        }
        Ok(())
    }

    /// Directory holding the claims.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_never_overlap_and_stay_in_u32() {
        let last = IdRange { slot: SLOTS - 1 };
        assert!(u64::from(last.host_base()) + u64::from(RANGE_SIZE) < u64::from(u32::MAX));
        assert_eq!(
            IdRange { slot: 1 }.host_base() - IdRange { slot: 0 }.host_base(),
            RANGE_SIZE
        );
        assert_eq!(
            IdRange { slot: 0 }.map_line(),
            format!("0 {FIRST_ID} 65536\n")
        );
    }

    #[test]
    fn claims_are_exclusive_and_released_only_by_owner() {
        let dir = tempfile::tempdir().unwrap();
        let pool = IdPool::open(dir.path()).unwrap();
        let a = pool.claim("same").unwrap();
        let b = pool.claim("same").unwrap();
        assert_ne!(a, b, "the same start slot must probe to a new range");
        pool.release(a, "someone-else").unwrap();
        assert!(dir.path().join(a.slot.to_string()).exists());
        pool.release(a, "same").unwrap();
        assert!(!dir.path().join(a.slot.to_string()).exists());
        pool.release(a, "same").unwrap();
        let c = pool.claim("lost-record").unwrap();
        pool.release_owner("lost-record").unwrap();
        assert!(!dir.path().join(c.slot.to_string()).exists());
        assert!(dir.path().join(b.slot.to_string()).exists());
    }
}
