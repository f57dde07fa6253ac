//! The state database: one SQLite file (WAL, synchronous=FULL so an answered request is on
//! disk), schema by numbered migrations, and the queries the API needs.
//!
//! The connection sits behind a mutex and every statement runs on tokio's blocking pool
//! ([`Db::call`]), so the async workers never wait on SQLite; the mutex makes this the single
//! writer DESIGN.md asks for.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension};

use crate::error::DbError;

/// Schema migrations: `(version, SQL)`, applied in order, each once, recorded in
/// `PRAGMA user_version`. Never edit a released migration: add the next number.
const MIGRATIONS: &[(i64, &str)] = &[(
    1,
    "CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        tenant TEXT NOT NULL,
        actor_kind TEXT NOT NULL CHECK (actor_kind IN ('agent', 'human')),
        hash TEXT NOT NULL UNIQUE,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE sandboxes (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        image TEXT NOT NULL,
        limits_json TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('running', 'stopped')),
        created_at INTEGER NOT NULL,
        expires_at INTEGER,
        deleted_at INTEGER
    );
    CREATE INDEX sandboxes_by_tenant ON sandboxes (tenant, created_at);
    CREATE INDEX sandboxes_by_expiry ON sandboxes (state, expires_at);
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY,
        sandbox_id TEXT NOT NULL,
        tenant TEXT NOT NULL,
        actor TEXT NOT NULL,
        kind TEXT NOT NULL,
        payload_json TEXT NOT NULL,
        at INTEGER NOT NULL
    );
    CREATE INDEX events_by_sandbox ON events (sandbox_id, seq);",
)];

/// Shared handle to the database.
#[derive(Clone)]
pub struct Db {
    conn: Arc<Mutex<Connection>>,
}

impl Db {
    /// Opens (creating, mode 0600) the database at `path` and applies pending migrations.
    pub fn open(path: &Path) -> Result<Self, DbError> {
        let open_err = |source| DbError::Open {
            path: path.to_path_buf(),
            source,
        };
        // Created owner-only: the timeline holds commands and the key table their hashes.
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(open_err)?;
        let mut conn =
            Connection::open(path).map_err(|e| open_err(std::io::Error::other(e.to_string())))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrate(&mut conn)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` with the connection on the blocking pool.
    pub async fn call<T, F>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, DbError> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            // A panic while holding the lock cannot leave a transaction half-applied (it rolls
            // back on drop), so a poisoned lock still guards a consistent connection.
            let mut guard = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut guard)
        })
        .await
        .map_err(DbError::Task)?
    }
}

/// Applies every migration newer than the database's `user_version`, each in a transaction.
fn migrate(conn: &mut Connection) -> Result<(), DbError> {
    let current: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    for &(version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", version)?;
        tx.commit()?;
        tracing::info!(version, "database migrated");
    }
    Ok(())
}

/// A stored API key (without its hash).
#[derive(Debug, Clone)]
pub struct KeyRow {
    /// Key id.
    pub id: String,
    /// Name given at creation.
    pub name: String,
    /// Tenant its sandboxes belong to.
    pub tenant: String,
    /// `agent` or `human`: the actor recorded in the timeline.
    pub actor_kind: String,
    /// Creation time (ms).
    pub created_at: i64,
}

/// A sandbox row.
#[derive(Debug, Clone)]
pub struct SandboxRow {
    /// Runtime id.
    pub id: String,
    /// Owning tenant.
    pub tenant: String,
    /// Image description (`host`, `rootfs:/path`).
    pub image: String,
    /// `openrun_runtime::Limits` as JSON.
    pub limits_json: String,
    /// `running` or `stopped`.
    pub state: String,
    /// Creation time (ms).
    pub created_at: i64,
    /// Deadline (ms).
    pub expires_at: Option<i64>,
}

/// A timeline entry to append.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// Sandbox it is about.
    pub sandbox_id: String,
    /// Its tenant.
    pub tenant: String,
    /// `agent`, `human` or `system`.
    pub actor: String,
    /// What happened, e.g. `sandbox.create`.
    pub kind: &'static str,
    /// Details.
    pub payload: serde_json::Value,
}

/// A stored timeline entry.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EventRow {
    /// Position in the timeline (ascending).
    pub seq: i64,
    /// Who did it.
    pub actor: String,
    /// What happened.
    pub kind: String,
    /// Details.
    pub payload: serde_json::Value,
    /// When (RFC 3339).
    pub at: String,
}

/// Stores a key.
pub fn insert_key(conn: &Connection, key: &KeyRow, hash: &str) -> Result<(), DbError> {
    conn.execute(
        "INSERT INTO api_keys (id, name, tenant, actor_kind, hash, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            key.id,
            key.name,
            key.tenant,
            key.actor_kind,
            hash,
            key.created_at
        ],
    )?;
    Ok(())
}

/// The key with this hash.
pub fn key_by_hash(conn: &Connection, hash: &str) -> Result<Option<KeyRow>, DbError> {
    Ok(conn
        .query_row(
            "SELECT id, name, tenant, actor_kind, created_at FROM api_keys WHERE hash = ?1",
            [hash],
            |r| {
                Ok(KeyRow {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    tenant: r.get(2)?,
                    actor_kind: r.get(3)?,
                    created_at: r.get(4)?,
                })
            },
        )
        .optional()?)
}

/// Appends an event.
pub fn append_event(conn: &Connection, event: &NewEvent) -> Result<(), DbError> {
    conn.execute(
        "INSERT INTO events (sandbox_id, tenant, actor, kind, payload_json, at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            event.sandbox_id,
            event.tenant,
            event.actor,
            event.kind,
            event.payload.to_string(),
            crate::time::now_ms()
        ],
    )?;
    Ok(())
}

/// Records a new sandbox and its creation event in one transaction.
pub fn insert_sandbox(
    conn: &mut Connection,
    row: &SandboxRow,
    event: &NewEvent,
) -> Result<(), DbError> {
    let tx = conn.transaction()?;
    tx.execute(
        "INSERT INTO sandboxes (id, tenant, image, limits_json, state, created_at, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            row.id,
            row.tenant,
            row.image,
            row.limits_json,
            row.state,
            row.created_at,
            row.expires_at
        ],
    )?;
    append_event(&tx, event)?;
    tx.commit()?;
    Ok(())
}

/// Marks a sandbox stopped (and deleted, when `deleted`) and appends `event`, in one
/// transaction.
pub fn stop_sandbox(
    conn: &mut Connection,
    id: &str,
    deleted: bool,
    event: &NewEvent,
) -> Result<(), DbError> {
    let tx = conn.transaction()?;
    let now = crate::time::now_ms();
    tx.execute(
        "UPDATE sandboxes SET state = 'stopped',
                deleted_at = CASE WHEN ?2 THEN COALESCE(deleted_at, ?3) ELSE deleted_at END
         WHERE id = ?1",
        params![id, deleted, now],
    )?;
    append_event(&tx, event)?;
    tx.commit()?;
    Ok(())
}

const SANDBOX_COLUMNS: &str = "id, tenant, image, limits_json, state, created_at, expires_at";

fn sandbox_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SandboxRow> {
    Ok(SandboxRow {
        id: r.get(0)?,
        tenant: r.get(1)?,
        image: r.get(2)?,
        limits_json: r.get(3)?,
        state: r.get(4)?,
        created_at: r.get(5)?,
        expires_at: r.get(6)?,
    })
}

/// A tenant's sandbox that has not been deleted.
pub fn get_sandbox(
    conn: &Connection,
    tenant: &str,
    id: &str,
) -> Result<Option<SandboxRow>, DbError> {
    Ok(conn
        .query_row(
            &format!(
                "SELECT {SANDBOX_COLUMNS} FROM sandboxes
                 WHERE tenant = ?1 AND id = ?2 AND deleted_at IS NULL"
            ),
            [tenant, id],
            sandbox_row,
        )
        .optional()?)
}

/// A tenant's sandboxes that have not been deleted, oldest first.
pub fn list_sandboxes(conn: &Connection, tenant: &str) -> Result<Vec<SandboxRow>, DbError> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {SANDBOX_COLUMNS} FROM sandboxes
         WHERE tenant = ?1 AND deleted_at IS NULL ORDER BY created_at, id"
    ))?;
    let rows = stmt.query_map([tenant], sandbox_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Sandboxes recorded as running: `(id, tenant)`; only those past `expires_before` when given.
pub fn running_sandboxes(
    conn: &Connection,
    expires_before: Option<i64>,
) -> Result<Vec<(String, String)>, DbError> {
    let mut stmt = conn.prepare(
        "SELECT id, tenant FROM sandboxes WHERE state = 'running'
         AND (?1 IS NULL OR (expires_at IS NOT NULL AND expires_at <= ?1))",
    )?;
    let rows = stmt.query_map([expires_before], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The timeline of a tenant's sandbox (deleted ones included: the history stays), or `None`
/// when the tenant has no such sandbox.
pub fn events(conn: &Connection, tenant: &str, id: &str) -> Result<Option<Vec<EventRow>>, DbError> {
    let exists: Option<i64> = conn
        .query_row(
            "SELECT 1 FROM sandboxes WHERE tenant = ?1 AND id = ?2",
            [tenant, id],
            |r| r.get(0),
        )
        .optional()?;
    if exists.is_none() {
        return Ok(None);
    }
    let mut stmt = conn.prepare(
        "SELECT seq, actor, kind, payload_json, at FROM events
         WHERE sandbox_id = ?1 AND tenant = ?2 ORDER BY seq",
    )?;
    let rows = stmt.query_map([id, tenant], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, i64>(4)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (seq, actor, kind, payload, at) = row?;
        let payload = serde_json::from_str(&payload)
            .map_err(|e| DbError::Corrupt(format!("payload of event {seq}: {e}")))?;
        out.push(EventRow {
            seq,
            actor,
            kind,
            payload,
            at: crate::time::rfc3339(at),
        });
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_versions_are_unique_and_ascending() {
        assert!(!MIGRATIONS.is_empty());
        assert_eq!(MIGRATIONS[0].0, 1, "migrations start at 1");
        for pair in MIGRATIONS.windows(2) {
            assert!(
                pair[1].0 > pair[0].0,
                "migration {} follows {}: versions must be unique and ascending",
                pair[1].0,
                pair[0].0
            );
        }
    }

    #[test]
    fn migrations_apply_once_and_reopen_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("openrun.db");
        drop(Db::open(&path).unwrap());
        // A second open must skip the applied migrations (re-running CREATE TABLE would fail).
        let db = Db::open(&path).unwrap();
        let conn = db.conn.lock().unwrap();
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS[MIGRATIONS.len() - 1].0);
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        use std::os::unix::fs::PermissionsExt;
        let perms = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(perms & 0o777, 0o600);
    }

    #[test]
    fn stopping_keeps_history_and_hides_deleted_rows() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("openrun.db")).unwrap();
        let mut conn = db.conn.lock().unwrap();
        let row = SandboxRow {
            id: "abc".into(),
            tenant: "t1".into(),
            image: "host".into(),
            limits_json: "{}".into(),
            state: "running".into(),
            created_at: 1,
            expires_at: Some(10),
        };
        let event = |kind| NewEvent {
            sandbox_id: "abc".into(),
            tenant: "t1".into(),
            actor: "agent".into(),
            kind,
            payload: serde_json::json!({}),
        };
        insert_sandbox(&mut conn, &row, &event("sandbox.create")).unwrap();
        assert!(get_sandbox(&conn, "t2", "abc").unwrap().is_none());
        assert_eq!(running_sandboxes(&conn, Some(9)).unwrap().len(), 0);
        assert_eq!(running_sandboxes(&conn, Some(10)).unwrap().len(), 1);
        stop_sandbox(&mut conn, "abc", true, &event("sandbox.delete")).unwrap();
        assert!(get_sandbox(&conn, "t1", "abc").unwrap().is_none());
        assert!(list_sandboxes(&conn, "t1").unwrap().is_empty());
        let kinds: Vec<_> = events(&conn, "t1", "abc")
            .unwrap()
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect();
        assert_eq!(kinds, ["sandbox.create", "sandbox.delete"]);
        assert!(events(&conn, "t2", "abc").unwrap().is_none());
    }
}
