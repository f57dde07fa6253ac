//! The build cache: `<store>/cache/<key>.json`, one file per build step (or Debian base)
//! whose key is the sha256 of everything its result depends on. An entry names the layer the
//! step made (or none, for a step that only changes the config); it counts only while that
//! layer is still in the store, so a prune simply turns its entries into misses.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;

use crate::digest::{is_hex64, sha256_of};
use crate::error::{ImageError, IoContext, Result};
use crate::Store;

/// What a cached step produced.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CacheEntry {
    /// The layer it added (hex sha256), if any.
    pub layer: Option<String>,
    /// When it was recorded (RFC 3339).
    pub created_at: String,
}

/// The cache of one store.
#[derive(Debug)]
pub struct Cache<'a> {
    store: &'a Store,
    dir: PathBuf,
}

/// The cache key of `value`: sha256 of its JSON.
pub fn key_of(value: &serde_json::Value) -> String {
    sha256_of(value.to_string().as_bytes())
}

impl<'a> Cache<'a> {
    /// The cache of `store` (its directory is made on first use).
    pub fn new(store: &'a Store) -> Self {
        Self {
            store,
            dir: store.root().join("cache"),
        }
    }

    /// The entry for `key`, if there is one whose layer is still in the store.
    pub fn get(&self, key: &str) -> Option<CacheEntry> {
        if !is_hex64(key) {
            return None;
        }
        let bytes = fs::read(self.dir.join(format!("{key}.json"))).ok()?;
        let entry: CacheEntry = serde_json::from_slice(&bytes).ok()?;
        match &entry.layer {
            Some(layer) if !self.store.has_layer(layer) => None,
            _ => Some(entry),
        }
    }

    /// Records that `key` produced `layer` (already committed to the store).
    pub fn put(&self, key: &str, layer: Option<&str>) -> Result<()> {
        if !is_hex64(key) {
            return Err(ImageError::Invalid(format!("malformed cache key {key:?}")));
        }
        match fs::DirBuilder::new().mode(0o700).create(&self.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(ImageError::io(
                    format!("cannot create {}", self.dir.display()),
                    e,
                ))
            }
        }
        let entry = CacheEntry {
            layer: layer.map(str::to_string),
            created_at: crate::now(),
        };
        let bytes = serde_json::to_vec(&entry)
            .map_err(io::Error::other)
            .context(|| "cannot encode a cache entry".to_string())?;
        // Written in a work dir and renamed, so a reader never sees half an entry.
        let work = self.store.work_dir()?;
        let tmp = work.path().join("cache.json");
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .context(|| format!("cannot create {}", tmp.display()))?;
        file.write_all(&bytes)
            .context(|| format!("cannot write {}", tmp.display()))?;
        let path = self.dir.join(format!("{key}.json"));
        fs::rename(&tmp, &path).context(|| format!("cannot write {}", path.display()))
    }
}
