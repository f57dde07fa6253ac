//! API keys: `or_` + 64 hex digits of 32 random bytes (the kernel's `getrandom`), shown once at
//! creation; only their SHA-256 is stored. A key of 256 random bits needs no slow password
//! hash: nobody can search that space, so a fast hash is enough to keep a database leak from
//! revealing usable keys.

use std::path::Path;

use sha2::{Digest, Sha256};

use crate::db::{self, Db, KeyRow};
use crate::error::ServerError;

/// Prefix of every key, so a leaked one is recognisable (secret scanners, logs).
pub const KEY_PREFIX: &str = "or_";

/// Who holds a key; recorded as the actor of everything done with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActorKind {
    /// A program (an AI agent, CI).
    Agent,
    /// A person.
    Human,
}

impl ActorKind {
    /// The stored and displayed name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Agent => "agent",
            Self::Human => "human",
        }
    }
}

/// A key just created: the secret exists only here.
#[derive(Debug)]
pub struct NewKey {
    /// Key id (also its tenant, for now).
    pub id: String,
    /// The secret to hand to the client, once.
    pub secret: String,
}

/// Creates a key named `name` in the database of `data_dir` (created if missing). Each key is
/// its own tenant.
pub fn create_key(data_dir: &Path, name: &str, kind: ActorKind) -> Result<NewKey, ServerError> {
    if name.is_empty() || name.chars().count() > 64 || name.chars().any(char::is_control) {
        return Err(ServerError::InvalidKeyName(name.to_string()));
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .create(data_dir)
        .map_err(|source| crate::error::DbError::Open {
            path: data_dir.to_path_buf(),
            source,
        })?;
    let db = Db::open(&crate::database_path(data_dir))?;
    let id = hex(&random_bytes::<6>()?);
    let secret = format!("{KEY_PREFIX}{}", hex(&random_bytes::<32>()?));
    let row = KeyRow {
        id: id.clone(),
        name: name.to_string(),
        tenant: id.clone(),
        actor_kind: kind.as_str().to_string(),
        created_at: crate::time::now_ms(),
    };
    let hash = hash(&secret);
    // Called from the single-threaded CLI: a throwaway runtime drives the one statement.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(ServerError::AsyncRuntime)?;
    rt.block_on(db.call(move |conn| db::insert_key(conn, &row, &hash)))?;
    Ok(NewKey { id, secret })
}

/// SHA-256 of a key, hex: what the database stores and looks keys up by.
pub fn hash(secret: &str) -> String {
    hex(&Sha256::digest(secret.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn random_bytes<const N: usize>() -> Result<[u8; N], ServerError> {
    let mut buf = [0u8; N];
    random_fill(&mut buf).map_err(ServerError::Random)?;
    Ok(buf)
}

/// Fills `buf` from the kernel's random source (`getrandom`, retried on EINTR).
pub(crate) fn random_fill(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        match rustix::rand::getrandom(&mut buf[filled..], rustix::rand::GetRandomFlags::empty()) {
            Ok(n) => filled += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// `bytes` random bytes as lowercase hex: unguessable ids (contexts, watchers, ...).
pub(crate) fn random_hex(bytes: usize) -> std::io::Result<String> {
    let mut buf = vec![0u8; bytes];
    random_fill(&mut buf)?;
    Ok(hex(&buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_random_prefixed_and_stored_only_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let a = create_key(dir.path(), "ci", ActorKind::Agent).unwrap();
        let b = create_key(dir.path(), "ci", ActorKind::Human).unwrap();
        assert!(a.secret.starts_with(KEY_PREFIX) && a.secret.len() == 3 + 64);
        assert_ne!(a.secret, b.secret);
        assert_ne!(a.id, b.id);
        let raw = std::fs::read(crate::database_path(dir.path())).unwrap();
        let wal = std::fs::read(dir.path().join("openrun.db-wal")).unwrap_or_default();
        for bytes in [&raw, &wal] {
            let text = String::from_utf8_lossy(bytes);
            assert!(
                !text.contains(&a.secret[3..]),
                "the secret is stored in clear"
            );
        }
        assert!(matches!(
            create_key(dir.path(), "", ActorKind::Agent),
            Err(ServerError::InvalidKeyName(_))
        ));
    }

    #[test]
    fn hash_is_sha256_hex() {
        assert_eq!(
            hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
