//! `<data-dir>/local.json`: the address and a key of a server listening on loopback, so the
//! CLI on the same machine needs no key of its own.
//!
//! On the first start on a loopback address the server creates a human key named `local`
//! and writes `{"server":"http://ADDR","api_key":"or_..."}` (mode 0600, written to a temporary
//! file and renamed into place without replacing one that appeared meanwhile). Later starts
//! keep the key and only rewrite `server` when the address changed. A server on any other
//! address leaves the file alone: a non-loopback server is meant for remote clients with
//! keys of their own.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustix::fs::{OFlags, RenameFlags, CWD};

use crate::error::ServerError;
use crate::keys::{create_key, ActorKind};

/// File name inside the data dir.
pub const FILE_NAME: &str = "local.json";

/// Name of the key created for the file.
pub const KEY_NAME: &str = "local";

/// Why the local key file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum LocalKeyError {
    /// Reading, writing or renaming the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The existing file is not the JSON object the server writes; it is left alone.
    #[error("{path} is not a JSON object with a string api_key: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The key could not be created.
    #[error("cannot create the local key: {0}")]
    Key(#[source] Box<ServerError>),
}

/// What [`ensure`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Not a loopback address: nothing written.
    NotLoopback,
    /// A new key was created and the file written.
    Created {
        /// The key written.
        api_key: String,
    },
    /// The file existed; its `server` was rewritten if `addr` differed.
    Kept {
        /// The key it holds.
        api_key: String,
    },
}

/// Creates or updates `<data_dir>/local.json` for a server bound to `addr`. Blocking (it
/// opens the database to create the key): call it outside the async runtime's workers.
pub fn ensure(data_dir: &Path, addr: SocketAddr) -> Result<Outcome, LocalKeyError> {
    if !addr.ip().is_loopback() {
        return Ok(Outcome::NotLoopback);
    }
    let path = data_dir.join(FILE_NAME);
    let server = format!("http://{addr}");
    if let Some(api_key) = update(&path, &server)? {
        return Ok(Outcome::Kept { api_key });
    }
    let key = create_key(data_dir, KEY_NAME, ActorKind::Human)
        .map_err(|e| LocalKeyError::Key(Box::new(e)))?;
    let body = serde_json::json!({ "server": server, "api_key": key.secret });
    if write_new(&path, &body)? {
        tracing::info!(path = %path.display(), key = key.id, "wrote the local key file");
        return Ok(Outcome::Created {
            api_key: key.secret,
        });
    }
    // Another process wrote it first: keep its key (ours was never shown to anyone).
    update(&path, &server)?
        .map(|api_key| Outcome::Kept { api_key })
        .ok_or_else(|| LocalKeyError::Malformed {
            path: path.clone(),
            reason: "it vanished while being written".into(),
        })
}

/// Rewrites `server` in an existing file if it differs; its key, or `None` without a file.
fn update(path: &Path, server: &str) -> Result<Option<String>, LocalKeyError> {
    let io = |source| LocalKeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let text = match read_no_follow(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    let malformed = |reason: String| LocalKeyError::Malformed {
        path: path.to_path_buf(),
        reason,
    };
    let mut value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| malformed(e.to_string()))?;
    let object = value
        .as_object_mut()
        .ok_or_else(|| malformed("not an object".into()))?;
    let api_key = object
        .get("api_key")
        .and_then(|k| k.as_str())
        .ok_or_else(|| malformed("no api_key".into()))?
        .to_string();
    if object.get("server").and_then(|s| s.as_str()) != Some(server) {
        object.insert("server".into(), server.into());
        write_replacing(path, &value)?;
        tracing::info!(path = %path.display(), server, "updated the local key file's address");
    }
    Ok(Some(api_key))
}

fn read_no_follow(path: &Path) -> std::io::Result<String> {
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(OFlags::NOFOLLOW.bits() as i32)
        .open(path)?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut file, &mut text)?;
    Ok(text)
}

/// Writes `value` to a fresh 0600 temporary file next to `path`, synced; returns its path.
fn write_temp(path: &Path, value: &serde_json::Value) -> Result<PathBuf, LocalKeyError> {
    let tmp = path.with_file_name(format!(".{FILE_NAME}.{}.tmp", std::process::id()));
    let io = |source| LocalKeyError::Io {
        path: tmp.clone(),
        source,
    };
    // A stale one of an earlier process with our pid cannot be in use.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
        _ => {}
    }
    let mut text = serde_json::to_string_pretty(value).map_err(|e| io(e.into()))?;
    text.push('\n');
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    file.write_all(text.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok(tmp)
}

/// Writes `path` atomically unless it exists; `false` if it did (nothing changed then).
fn write_new(path: &Path, value: &serde_json::Value) -> Result<bool, LocalKeyError> {
    let tmp = write_temp(path, value)?;
    let renamed = rustix::fs::renameat_with(CWD, &tmp, CWD, path, RenameFlags::NOREPLACE);
    match renamed {
        Ok(()) => {
            sync_dir(path);
            Ok(true)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            if e == rustix::io::Errno::EXIST {
                Ok(false)
            } else {
                Err(LocalKeyError::Io {
                    path: path.to_path_buf(),
                    source: e.into(),
                })
            }
        }
    }
}

/// Replaces `path` atomically with `value`.
fn write_replacing(path: &Path, value: &serde_json::Value) -> Result<(), LocalKeyError> {
    let tmp = write_temp(path, value)?;
    if let Err(source) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(LocalKeyError::Io {
            path: path.to_path_buf(),
            source,
        });
    }
    sync_dir(path);
    Ok(())
}

/// Makes a rename durable (best effort: the file itself is already synced).
fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent() {
        if let Ok(dir) = std::fs::File::open(dir) {
            let _ = dir.sync_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn read(path: &Path) -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn created_once_then_only_the_address_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let a: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let Outcome::Created { api_key } = ensure(dir.path(), a).unwrap() else {
            panic!("not created")
        };
        assert!(api_key.starts_with(crate::keys::KEY_PREFIX));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(read(&path)["server"], "http://127.0.0.1:4000");

        let b: SocketAddr = "[::1]:4001".parse().unwrap();
        assert_eq!(
            ensure(dir.path(), b).unwrap(),
            Outcome::Kept {
                api_key: api_key.clone()
            }
        );
        let written = read(&path);
        assert_eq!(written["server"], "http://[::1]:4001");
        assert_eq!(written["api_key"], api_key.as_str());
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn other_addresses_and_foreign_files_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let public: SocketAddr = "0.0.0.0:4000".parse().unwrap();
        assert_eq!(ensure(dir.path(), public).unwrap(), Outcome::NotLoopback);
        assert!(!path.exists());

        std::fs::write(&path, "not json").unwrap();
        let local: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        assert!(matches!(
            ensure(dir.path(), local),
            Err(LocalKeyError::Malformed { .. })
        ));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "not json");
    }

    #[test]
    fn a_file_written_first_by_another_process_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let theirs = serde_json::json!({"server": "http://127.0.0.1:1", "api_key": "or_theirs"});
        std::fs::write(&path, theirs.to_string()).unwrap();
        assert!(!write_new(&path, &serde_json::json!({"api_key": "or_ours"})).unwrap());
        assert_eq!(read(&path)["api_key"], "or_theirs");
    }
}
