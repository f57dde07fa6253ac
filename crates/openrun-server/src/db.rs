//! The state database: one SQLite file (WAL, synchronous=FULL so an answered request is on
//! disk), schema by numbered migrations, and the queries the API needs.
//!
//! The connection sits behind a mutex and every statement runs on tokio's blocking pool
//! ([`Db::call`]), so the async workers never wait on SQLite; the mutex makes this the single
//! writer DESIGN.md asks for. The per-request point reads (the API key, the caller's sandbox
//! row) go through [`Db::read`]: read-only connections used on the request's own thread,
//! never waiting (a WAL reader does not wait for the writer; anything that would wait goes to
//! the blocking pool instead). Unsynced commits ([`Db::call_unsynced`]) also run on the
//! caller's thread when the writer's connection is free, with the same never-wait rule.
//! [`Db::commit_then_sync`] is such a commit followed by a sync of the WAL on the blocking
//! pool, for a record that must be on the disk before an answer but may be synced while the
//! action it records starts.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension};

use crate::error::DbError;

/// Schema migrations: `(version, SQL)`, applied in order, each once, recorded in
/// `PRAGMA user_version`. Never edit a released migration: add the next number.
const MIGRATIONS: &[(i64, &str)] = &[
    (
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
    ),
    (
        2,
        // Labels, environment and owner (the creating key's name) on every sandbox, and the
        // states `creating`, `paused` and `error` (a CHECK changes only by rebuilding the table).
        // Background processes whose exit is still to be recorded.
        "CREATE TABLE sandboxes_v2 (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        owner TEXT NOT NULL,
        image TEXT NOT NULL,
        limits_json TEXT NOT NULL,
        labels_json TEXT NOT NULL DEFAULT '{}',
        env_json TEXT NOT NULL DEFAULT '{}',
        state TEXT NOT NULL
            CHECK (state IN ('creating', 'running', 'paused', 'stopped', 'error')),
        created_at INTEGER NOT NULL,
        expires_at INTEGER,
        deleted_at INTEGER
    );
    INSERT INTO sandboxes_v2
        (id, tenant, owner, image, limits_json, state, created_at, expires_at, deleted_at)
        SELECT s.id, s.tenant,
               COALESCE((SELECT k.name FROM api_keys k WHERE k.tenant = s.tenant
                         ORDER BY k.created_at LIMIT 1), ''),
               s.image, s.limits_json, s.state, s.created_at, s.expires_at, s.deleted_at
        FROM sandboxes s;
    DROP TABLE sandboxes;
    ALTER TABLE sandboxes_v2 RENAME TO sandboxes;
    CREATE INDEX sandboxes_by_tenant ON sandboxes (tenant, created_at, id);
    CREATE INDEX sandboxes_by_expiry ON sandboxes (state, expires_at);
    CREATE TABLE background_processes (
        id INTEGER PRIMARY KEY,
        sandbox_id TEXT NOT NULL,
        tenant TEXT NOT NULL,
        actor TEXT NOT NULL,
        pid INTEGER NOT NULL,
        exited INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX background_by_sandbox ON background_processes (sandbox_id, pid);",
    ),
    (
        3,
        // Network policies (crate::egress): one row per sandbox given one, none = mode `none`.
        // The JSON holds secret values, which no API returns.
        "CREATE TABLE network_policies (
        sandbox_id TEXT PRIMARY KEY,
        policy_json TEXT NOT NULL,
        updated_at INTEGER NOT NULL
    );",
    ),
    (
        4,
        // A sandbox that ends (stopped, failed or deleted: none runs again) takes its network
        // policy, secret values included, with it.
        "CREATE TRIGGER network_policies_end_with_their_sandbox
        AFTER UPDATE OF state, deleted_at ON sandboxes
        WHEN NEW.state IN ('stopped', 'error') OR NEW.deleted_at IS NOT NULL
    BEGIN
        DELETE FROM network_policies WHERE sandbox_id = NEW.id;
    END;
    DELETE FROM network_policies WHERE sandbox_id IN (
        SELECT id FROM sandboxes WHERE state IN ('stopped', 'error') OR deleted_at IS NOT NULL
    );",
    ),
    (
        5,
        // The tenant of every image made through the API (snapshots, forks' snapshots), by
        // its name in the store (`crate::images`). Images not listed are server-wide.
        "CREATE TABLE image_owners (
        name TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        created_at INTEGER NOT NULL
    );",
    ),
    (
        6,
        // `openrun up`'s recipes (crate::up::recipes): per tenant and key, the snapshot image
        // that holds a finished setup, the generated devcontainer.json, the plan, and the
        // repository's file list and digest the snapshot was made from (to sync the next open).
        "CREATE TABLE recipes (
        tenant TEXT NOT NULL,
        key TEXT NOT NULL,
        repo TEXT NOT NULL,
        name TEXT NOT NULL,
        image TEXT NOT NULL,
        devcontainer TEXT NOT NULL,
        plan_json TEXT NOT NULL,
        sources_json TEXT NOT NULL,
        source_digest TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        used_at INTEGER NOT NULL,
        PRIMARY KEY (tenant, key)
    );",
    ),
    (
        7,
        // The warm pool (crate::pool): sandboxes made ahead of demand that no tenant owns yet.
        // A row is written before its sandbox is made and goes when the sandbox is claimed
        // (in the transaction that records it in `sandboxes`) or destroyed, so a server that
        // stops without destroying its pool finds what is left of it at the next start.
        "CREATE TABLE warm_pool (
        id TEXT PRIMARY KEY,
        created_at INTEGER NOT NULL
    );",
    ),
];

/// Read-only connections for [`Db::read`].
const READERS: usize = 2;

/// Shared handle to the database.
#[derive(Clone)]
pub struct Db {
    conn: Arc<Mutex<Connection>>,
    /// Read-only connections, each used by one thread at a time ([`Db::read`]).
    readers: Arc<[Mutex<Connection>]>,
    /// Bumped after every call that changed a row, so followers of the timeline re-read it.
    changes: Arc<tokio::sync::watch::Sender<u64>>,
    /// The WAL, synced on its own after a commit made unsynced ([`Db::commit_then_sync`]).
    wal: Arc<WalFile>,
}

impl Db {
    /// Opens (creating, mode 0600) the database at `path` and applies pending migrations.
    pub fn open(path: &Path) -> Result<Self, DbError> {
        let open_err = |source| DbError::Open {
            path: path.to_path_buf(),
            source,
        };
        // Created owner-only: the timeline holds commands and the key table their hashes.
        // Only when it does not exist yet: closing any descriptor of the file drops every POSIX
        // lock this process holds on it, so opening and closing it here while another
        // connection of this process (the server's) is open would let another process (`openrun
        // key create`) think the database unused, checkpoint and delete the WAL under the
        // server: the server would go on with a stale index, not see later writes, and lose
        // them at its next checkpoint.
        if std::fs::symlink_metadata(path).is_err() {
            OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(path)
                .map_err(open_err)?;
        }
        let mut conn =
            Connection::open(path).map_err(|e| open_err(std::io::Error::other(e.to_string())))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        // Deleted rows (a network policy's secret values, erased when its sandbox ends) are
        // overwritten with zeros rather than left in free pages of the file.
        conn.pragma_update(None, "secure_delete", "ON")?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        migrate(&mut conn)?;
        let readers = (0..READERS)
            .map(|_| open_reader(path).map(Mutex::new))
            .collect::<Result<Vec<_>, _>>()?;
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            readers: readers.into(),
            changes: Arc::new(tokio::sync::watch::channel(0).0),
            wal: Arc::new(WalFile {
                path: wal.into(),
                file: Mutex::new(None),
            }),
        })
    }

    /// Changes whenever a call wrote to the database (the value counts such calls).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Runs `f` with the connection on the blocking pool.
    pub async fn call<T, F>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, DbError> + Send + 'static,
    {
        let conn = self.conn.clone();
        let changes = self.changes.clone();
        tokio::task::spawn_blocking(move || {
            // A panic while holding the lock cannot leave a transaction half-applied (it rolls
            // back on drop), so a poisoned lock still guards a consistent connection.
            let mut guard = conn.lock().unwrap_or_else(|p| p.into_inner());
            let before = guard.total_changes();
            let result = f(&mut guard);
            if guard.total_changes() != before {
                changes.send_modify(|n| *n = n.wrapping_add(1));
            }
            result
        })
        .await
        .map_err(DbError::Task)?
    }
}

impl Db {
    /// Runs the read-only `f` at once on this thread with a free read-only connection: a
    /// point read by an index takes a few microseconds, less than a hop to the blocking pool.
    /// It never waits: with every reader in use, or when SQLite would have to wait for a lock
    /// (`SQLITE_BUSY`: a WAL recovery, a checkpoint restarting the log), `f` runs like
    /// [`Db::call`] instead. A read sees every commit made before it, this process's and
    /// other processes' (`openrun key create`), like any new read transaction: nothing is
    /// cached between reads.
    pub async fn read<T, F>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: Fn(&Connection) -> Result<T, DbError> + Send + 'static,
    {
        for reader in self.readers.iter() {
            let Ok(conn) = reader.try_lock() else {
                continue;
            };
            match f(&conn) {
                Err(DbError::Sqlite(e)) if is_busy(&e) => break,
                done => return done,
            }
        }
        self.call(move |c| f(c)).await
    }
}

/// Whether SQLite refused because it would have had to wait for a lock.
fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// A read-only connection to the (already migrated) database at `path` that never waits for
/// a lock (`busy_timeout` 0: [`Db::read`] then falls back to the writer's connection).
fn open_reader(path: &Path) -> Result<Connection, DbError> {
    use rusqlite::OpenFlags;
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| DbError::Open {
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })?;
    conn.busy_timeout(std::time::Duration::ZERO)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

/// Pages of WAL after which a (synced) commit checkpoints: SQLite's default.
const WAL_AUTOCHECKPOINT: i64 = 1000;

impl Db {
    /// Runs `f` like [`Db::call`], its writes committed without waiting for the disk
    /// (`synchronous = OFF`): only for rows that matter while this host keeps running and
    /// are worthless after a power loss, which ends every sandbox (the warm pool's rows, the
    /// rows of started processes whose exit is still owed, and `process.exit` itself: what a
    /// sandbox reports, not what a caller did). Such a commit survives a crash of
    /// this process (the kernel holds it); a power loss may lose it, but never a later synced
    /// commit without it: WAL frames are appended in order, recovery keeps a prefix of them,
    /// and the next synced commit flushes the earlier frames with its own. Checkpoints are
    /// held off meanwhile, so the database file is only ever written from the WAL by a
    /// synced commit (with the syncs `synchronous = FULL` makes around a checkpoint).
    ///
    /// When the connection is free it runs at once on this thread, never waiting
    /// (`busy_timeout` 0: an unsynced commit is a few writes to the page cache, less than a
    /// hop to the blocking pool); if SQLite would have to wait for a lock (another process
    /// writing), nothing was written and `f` runs again on the blocking pool.
    pub async fn call_unsynced<T, F>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: Fn(&mut Connection) -> Result<T, DbError> + Send + 'static,
    {
        if let Ok(mut conn) = self.conn.try_lock() {
            let before = conn.total_changes();
            let result = unsynced(&mut conn, std::time::Duration::ZERO, &f);
            if conn.total_changes() != before {
                self.changes.send_modify(|n| *n = n.wrapping_add(1));
            }
            match result {
                Err(DbError::Sqlite(e)) if is_busy(&e) => {}
                done => return done,
            }
        }
        self.call(move |c| unsynced(c, BUSY_TIMEOUT, &f)).await
    }
}

impl Db {
    /// Runs `f` like [`Db::call_unsynced`] (its commit visible to every reader at once, and
    /// surviving a crash of this process) and starts making it durable on the blocking pool:
    /// the returned [`Durable`] resolves once the WAL holding the commit is on the disk, as a
    /// synced commit's would be. For a record that must exist before an action starts and be
    /// on the disk before anyone is told the action started (`process.exec`): the sync then
    /// overlaps the action's start instead of delaying it.
    ///
    /// Syncing the WAL file after the commit gives what `synchronous = FULL` gives (which
    /// syncs the same file at the end of the commit): the commit's frames are written to the
    /// WAL in order and checkpoints are held off while a commit goes unsynced, so the database
    /// file never holds anything the WAL did not hold first.
    pub async fn commit_then_sync<T, F>(&self, f: F) -> Result<(T, Durable), DbError>
    where
        T: Send + 'static,
        F: Fn(&mut Connection) -> Result<T, DbError> + Send + 'static,
    {
        let value = self.call_unsynced(f).await?;
        let wal = self.wal.clone();
        let sync = tokio::task::spawn_blocking(move || wal.sync());
        Ok((value, Durable(sync)))
    }
}

/// A commit of [`Db::commit_then_sync`] on its way to the disk.
#[must_use = "a commit is durable only once its Durable resolved"]
pub struct Durable(tokio::task::JoinHandle<std::io::Result<()>>);

impl Durable {
    /// Waits until the commit is on the disk.
    pub async fn wait(self) -> Result<(), DbError> {
        match self.0.await {
            Ok(synced) => synced.map_err(DbError::Sync),
            Err(e) => Err(DbError::Task(e)),
        }
    }
}

/// The database's write-ahead log (`<db>-wal`), opened on its first sync and kept open.
struct WalFile {
    path: std::path::PathBuf,
    file: Mutex<Option<std::fs::File>>,
}

impl WalFile {
    /// `fdatasync` of the WAL. It is opened again when its path names another file than the
    /// one held: SQLite deletes the WAL only when the last connection to the database closes,
    /// which this server's open connections prevent, but syncing a deleted file would leave a
    /// commit unsynced without a word, so that is checked rather than assumed.
    fn sync(&self) -> std::io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let mut held = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::fs::metadata(&self.path)?;
        let same = match held.as_ref() {
            Some(file) => {
                let meta = file.metadata()?;
                (meta.dev(), meta.ino()) == (now.dev(), now.ino())
            }
            None => false,
        };
        if !same {
            *held = Some(std::fs::File::open(&self.path)?);
            // A WAL made since the last sync must also be found after a power loss: its
            // directory entry is synced once (SQLite does so on its first sync of a new WAL).
            if let Some(dir) = self.path.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
        }
        match held.as_ref() {
            Some(file) => file.sync_data(),
            None => Ok(()),
        }
    }
}

/// How long a statement on the writer's connection waits for another process's lock.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs `f` with commits unsynced and checkpoints held off (see [`Db::call_unsynced`]),
/// waiting at most `busy` for a lock, then puts the connection back as it was.
fn unsynced<T>(
    c: &mut Connection,
    busy: std::time::Duration,
    f: &impl Fn(&mut Connection) -> Result<T, DbError>,
) -> Result<T, DbError> {
    let set = c
        .busy_timeout(busy)
        .and_then(|()| c.execute_batch("PRAGMA wal_autocheckpoint = 0; PRAGMA synchronous = OFF"));
    let result = match set {
        Ok(()) => f(c),
        Err(e) => Err(e.into()),
    };
    let restored = c
        .execute_batch(&format!(
            "PRAGMA synchronous = FULL; PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT}"
        ))
        .and_then(|()| c.busy_timeout(BUSY_TIMEOUT));
    if let Err(e) = restored {
        // Every later commit would go unsynced: a connection that cannot be put back
        // must not be used. Its writes so far are committed; nothing is lost by
        // failing here rather than later.
        tracing::error!(error = %e, "cannot restore synchronous = FULL");
        return Err(e.into());
    }
    result
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
    /// Name of the API key that created it.
    pub owner: String,
    /// Image description (`host`, `rootfs:/path`).
    pub image: String,
    /// `openrun_runtime::Limits` as JSON.
    pub limits_json: String,
    /// Labels given at creation.
    pub labels: BTreeMap<String, String>,
    /// Environment given at creation.
    pub env: BTreeMap<String, String>,
    /// `creating`, `running`, `paused`, `stopped` or `error`.
    pub state: String,
    /// Creation time (ms).
    pub created_at: i64,
    /// Deadline (ms).
    pub expires_at: Option<i64>,
}

/// Which of a tenant's sandboxes [`list_sandboxes`] returns.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Labels that must all be present with these values.
    pub labels: Vec<(String, String)>,
    /// Only sandboxes in this state.
    pub state: Option<String>,
    /// Only sandboxes after this `(created_at, id)` position.
    pub after: Option<(i64, String)>,
    /// At most this many rows.
    pub limit: u32,
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
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
#[schema(as = Event)]
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
    pub time: String,
}

/// Statements each connection keeps parsed ([`execute`], [`query_row`]): more than the
/// distinct statements of the requests on the hot paths (exec, create, delete, auth).
const STATEMENT_CACHE: usize = 64;

/// Runs `sql` through the connection's statement cache: parsed once per connection, not on
/// every call (parsing was a tenth of the server's CPU on an exec).
pub(crate) fn execute(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute(params)
}

/// [`execute`] for a query of one row (`QueryReturnedNoRows` when there is none).
pub(crate) fn query_row<T>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    f: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    conn.prepare_cached(sql)?.query_row(params, f)
}

/// Stores a key.
pub fn insert_key(conn: &Connection, key: &KeyRow, hash: &str) -> Result<(), DbError> {
    execute(
        conn,
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
    Ok(query_row(
        conn,
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
    execute(
        conn,
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

/// Records a new sandbox (as `creating`: [`finish_create`] records its creation).
pub fn insert_sandbox(conn: &Connection, row: &SandboxRow) -> Result<(), DbError> {
    execute(
        conn,
        "INSERT INTO sandboxes (id, tenant, owner, image, limits_json, labels_json, env_json,
                                state, created_at, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        params![
            row.id,
            row.tenant,
            row.owner,
            row.image,
            row.limits_json,
            encode(&row.labels)?,
            encode(&row.env)?,
            row.state,
            row.created_at,
            row.expires_at
        ],
    )?;
    Ok(())
}

/// A `creating` sandbox now exists: it becomes `running` with its actual deadline and gets its
/// creation `event`, in one transaction. `false` (nothing changed) when it is no longer
/// `creating`, e.g. deleted meanwhile.
pub fn finish_create(
    conn: &mut Connection,
    id: &str,
    expires_at: Option<i64>,
    event: &NewEvent,
) -> Result<bool, DbError> {
    update_with_event(conn, event, false, |tx| {
        execute(
            tx,
            "UPDATE sandboxes SET state = 'running', expires_at = ?2
             WHERE id = ?1 AND state = 'creating' AND deleted_at IS NULL",
            params![id, expires_at],
        )
    })
}

/// A `creating` sandbox could not be made: it becomes `error` (and deleted when `hide`), with
/// `event`, in one transaction. `false` when it was not `creating`.
pub fn fail_create(
    conn: &mut Connection,
    id: &str,
    hide: bool,
    event: &NewEvent,
) -> Result<bool, DbError> {
    update_with_event(conn, event, false, |tx| {
        execute(
            tx,
            "UPDATE sandboxes SET state = 'error',
                    deleted_at = CASE WHEN ?2 THEN ?3 ELSE deleted_at END
             WHERE id = ?1 AND state = 'creating'",
            params![id, hide, crate::time::now_ms()],
        )
    })
}

/// Runs `update` and appends `event` when it changed a row (always, with `always`), in one
/// transaction; returns whether `update` changed anything.
fn update_with_event(
    conn: &mut Connection,
    event: &NewEvent,
    always: bool,
    update: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<usize>,
) -> Result<bool, DbError> {
    let tx = conn.transaction()?;
    let changed = update(&tx)? > 0;
    if changed || always {
        append_event(&tx, event)?;
        tx.commit()?;
    }
    Ok(changed)
}

fn encode(map: &BTreeMap<String, String>) -> Result<String, DbError> {
    serde_json::to_string(map).map_err(|e| DbError::Corrupt(format!("cannot encode a map: {e}")))
}

/// Marks a sandbox stopped (and deleted, when `deleted`) and appends `event`, in one
/// transaction.
pub fn stop_sandbox(
    conn: &mut Connection,
    id: &str,
    deleted: bool,
    event: &NewEvent,
) -> Result<(), DbError> {
    update_with_event(conn, event, true, |tx| {
        execute(
            tx,
            "UPDATE sandboxes SET state = CASE WHEN state = 'error' THEN 'error' ELSE 'stopped' END,
                    deleted_at = CASE WHEN ?2 THEN COALESCE(deleted_at, ?3) ELSE deleted_at END
             WHERE id = ?1",
            params![id, deleted, crate::time::now_ms()],
        )
    })?;
    Ok(())
}

/// Moves a sandbox that is not deleted from one of the states `from` to `to` and appends
/// `event`, in one transaction; `false` (and no event) when it was in none of them.
pub fn set_state(
    conn: &mut Connection,
    id: &str,
    from: &[&str],
    to: &str,
    event: &NewEvent,
) -> Result<bool, DbError> {
    update_with_event(conn, event, false, |tx| {
        let mut changed = 0;
        for state in from {
            changed += execute(
                tx,
                "UPDATE sandboxes SET state = ?3
                 WHERE id = ?1 AND state = ?2 AND deleted_at IS NULL",
                params![id, state, to],
            )?;
        }
        Ok(changed)
    })
}

/// Sets a sandbox's deadline and appends `event`, in one transaction.
pub fn set_expiry(
    conn: &mut Connection,
    id: &str,
    expires_at: i64,
    event: &NewEvent,
) -> Result<(), DbError> {
    update_with_event(conn, event, true, |tx| {
        execute(
            tx,
            "UPDATE sandboxes SET expires_at = ?2 WHERE id = ?1",
            params![id, expires_at],
        )
    })?;
    Ok(())
}

const SANDBOX_COLUMNS: &str =
    "id, tenant, owner, image, limits_json, labels_json, env_json, state, created_at, expires_at";

fn sandbox_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SandboxRow> {
    let map = |i: usize| -> rusqlite::Result<BTreeMap<String, String>> {
        let text: String = r.get(i)?;
        serde_json::from_str(&text).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
        })
    };
    Ok(SandboxRow {
        id: r.get(0)?,
        tenant: r.get(1)?,
        owner: r.get(2)?,
        image: r.get(3)?,
        limits_json: r.get(4)?,
        labels: map(5)?,
        env: map(6)?,
        state: r.get(7)?,
        created_at: r.get(8)?,
        expires_at: r.get(9)?,
    })
}

/// A tenant's sandbox that has not been deleted.
pub fn get_sandbox(
    conn: &Connection,
    tenant: &str,
    id: &str,
) -> Result<Option<SandboxRow>, DbError> {
    Ok(query_row(
        conn,
        &format!(
            "SELECT {SANDBOX_COLUMNS} FROM sandboxes
                 WHERE tenant = ?1 AND id = ?2 AND deleted_at IS NULL"
        ),
        [tenant, id],
        sandbox_row,
    )
    .optional()?)
}

/// A tenant's sandboxes that have not been deleted and match `filter`, oldest first (by
/// creation time, then id).
pub fn list_sandboxes(
    conn: &Connection,
    tenant: &str,
    filter: &ListFilter,
) -> Result<Vec<SandboxRow>, DbError> {
    let mut sql =
        format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE tenant = ? AND deleted_at IS NULL");
    let mut values: Vec<rusqlite::types::Value> = vec![tenant.to_string().into()];
    for (key, value) in &filter.labels {
        sql.push_str(
            " AND EXISTS (SELECT 1 FROM json_each(labels_json) l WHERE l.key = ? AND l.value = ?)",
        );
        values.push(key.clone().into());
        values.push(value.clone().into());
    }
    if let Some(state) = &filter.state {
        sql.push_str(" AND state = ?");
        values.push(state.clone().into());
    }
    if let Some((created_at, id)) = &filter.after {
        sql.push_str(" AND (created_at, id) > (?, ?)");
        values.push((*created_at).into());
        values.push(id.clone().into());
    }
    sql.push_str(" ORDER BY created_at, id LIMIT ?");
    values.push(i64::from(filter.limit).into());
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map(rusqlite::params_from_iter(values), sandbox_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Sandboxes that should have a live sandbox behind them (`running` or `paused`), with
/// their state; only those past `expires_before` when given.
pub fn live_sandboxes(
    conn: &Connection,
    expires_before: Option<i64>,
) -> Result<Vec<SandboxRow>, DbError> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE state IN ('running', 'paused')
         AND (?1 IS NULL OR (expires_at IS NOT NULL AND expires_at <= ?1))"
    ))?;
    let rows = stmt.query_map([expires_before], sandbox_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Sandboxes left in `creating` (by a server that stopped mid-create).
pub fn creating_sandboxes(conn: &Connection) -> Result<Vec<SandboxRow>, DbError> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE state = 'creating'"
    ))?;
    let rows = stmt.query_map([], sandbox_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// A sandbox's timeline from some point on, and whether the sandbox has ended.
#[derive(Debug, Clone)]
pub struct Timeline {
    /// Events after the requested sequence number, oldest first.
    pub events: Vec<EventRow>,
    /// The sandbox is deleted, stopped or failed: its timeline gets no new sandbox events.
    pub ended: bool,
}

/// The timeline of a tenant's sandbox after event `since` (0: all of it; deleted sandboxes
/// included: the history stays), or `None` when the tenant has no such sandbox.
pub fn events(
    conn: &Connection,
    tenant: &str,
    id: &str,
    since: i64,
) -> Result<Option<Timeline>, DbError> {
    let ended: Option<bool> = query_row(
        conn,
        "SELECT deleted_at IS NOT NULL OR state IN ('stopped', 'error') FROM sandboxes
             WHERE tenant = ?1 AND id = ?2",
        [tenant, id],
        |r| r.get(0),
    )
    .optional()?;
    let Some(ended) = ended else {
        return Ok(None);
    };
    let mut stmt = conn.prepare_cached(
        "SELECT seq, actor, kind, payload_json, at FROM events
         WHERE sandbox_id = ?1 AND tenant = ?2 AND seq > ?3 ORDER BY seq",
    )?;
    let rows = stmt.query_map(params![id, tenant, since], |r| {
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
            time: crate::time::rfc3339(at),
        });
    }
    Ok(Some(Timeline { events: out, ended }))
}

/// Records a started process whose exit the timeline is owed (a background one, or an
/// attached one whose driver could die with the server); returns its row id. An older
/// row for the same pid whose exit was never recorded is closed: the agent reuses a pid only
/// after the old process was released, so that one has ended.
pub fn insert_background(
    conn: &mut Connection,
    sandbox_id: &str,
    tenant: &str,
    actor: &str,
    pid: i32,
) -> Result<i64, DbError> {
    let tx = conn.transaction()?;
    execute(
        &tx,
        "UPDATE background_processes SET exited = 1 WHERE sandbox_id = ?1 AND pid = ?2",
        params![sandbox_id, pid],
    )?;
    execute(
        &tx,
        "INSERT INTO background_processes (sandbox_id, tenant, actor, pid) VALUES (?1, ?2, ?3, ?4)",
        params![sandbox_id, tenant, actor, pid],
    )?;
    let id = tx.last_insert_rowid();
    tx.commit()?;
    Ok(id)
}

/// A background process whose exit is not recorded yet.
#[derive(Debug, Clone)]
pub struct BackgroundRow {
    /// Row id.
    pub id: i64,
    /// Its sandbox.
    pub sandbox_id: String,
    /// The sandbox's tenant.
    pub tenant: String,
    /// Who started it (the actor of its exit event).
    pub actor: String,
    /// Pid inside the sandbox.
    pub pid: i32,
}

/// Background processes of `running` sandboxes (of `sandbox_id` only, when given) whose exit
/// is not recorded yet.
pub fn pending_background(
    conn: &Connection,
    sandbox_id: Option<&str>,
) -> Result<Vec<BackgroundRow>, DbError> {
    let mut stmt = conn.prepare_cached(
        "SELECT b.id, b.sandbox_id, b.tenant, b.actor, b.pid FROM background_processes b
         JOIN sandboxes s ON s.id = b.sandbox_id
         WHERE b.exited = 0 AND s.state = 'running' AND s.deleted_at IS NULL
           AND (?1 IS NULL OR b.sandbox_id = ?1)
         ORDER BY b.id",
    )?;
    let rows = stmt.query_map([sandbox_id], |r| {
        Ok(BackgroundRow {
            id: r.get(0)?,
            sandbox_id: r.get(1)?,
            tenant: r.get(2)?,
            actor: r.get(3)?,
            pid: r.get(4)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Stops waiting for a background process's exit without recording one (the agent no longer
/// knows the process).
pub fn close_background(conn: &Connection, row_id: i64) -> Result<(), DbError> {
    execute(
        conn,
        "UPDATE background_processes SET exited = 1 WHERE id = ?1",
        [row_id],
    )?;
    Ok(())
}

/// Records a background process's exit: marks its row and appends `event`, in one
/// transaction, unless it was recorded already (then `false` and no event): each exit is
/// recorded once, however many watchers saw it.
pub fn record_background_exit(
    conn: &mut Connection,
    row_id: i64,
    event: &NewEvent,
) -> Result<bool, DbError> {
    update_with_event(conn, event, false, |tx| {
        execute(
            tx,
            "UPDATE background_processes SET exited = 1 WHERE id = ?1 AND exited = 0",
            [row_id],
        )
    })
}

/// Records a warm-pool sandbox about to be made (see [`claim_pooled`]).
pub fn insert_pooled(conn: &Connection, id: &str) -> Result<(), DbError> {
    execute(
        conn,
        "INSERT INTO warm_pool (id, created_at) VALUES (?1, ?2)",
        params![id, crate::time::now_ms()],
    )?;
    Ok(())
}

/// Forgets a warm-pool sandbox that was destroyed (or never made).
pub fn remove_pooled(conn: &Connection, id: &str) -> Result<(), DbError> {
    execute(conn, "DELETE FROM warm_pool WHERE id = ?1", [id])?;
    Ok(())
}

/// Every warm-pool sandbox recorded (at start: what a previous server left).
pub fn pooled(conn: &Connection) -> Result<Vec<String>, DbError> {
    let mut stmt = conn.prepare("SELECT id FROM warm_pool ORDER BY created_at, id")?;
    let rows = stmt.query_map([], |r| r.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// A warm-pool sandbox becomes `row` (a tenant's, normally `running`) with its creation
/// `event`, in one transaction: it leaves the pool exactly when it gets its owner, so a crash
/// leaves it either in the pool (destroyed at the next start) or recorded. `false` (nothing
/// changed) when it was not in the pool.
pub fn claim_pooled(
    conn: &mut Connection,
    row: &SandboxRow,
    event: &NewEvent,
) -> Result<bool, DbError> {
    let tx = conn.transaction()?;
    if execute(&tx, "DELETE FROM warm_pool WHERE id = ?1", [&row.id])? == 0 {
        return Ok(false);
    }
    insert_sandbox(&tx, row)?;
    append_event(&tx, event)?;
    tx.commit()?;
    Ok(true)
}

/// Records `tenant` as the owner of the store image `name` (`name:tag`), replacing an
/// earlier record of that name (an image removed and made again).
pub fn set_image_owner(conn: &Connection, name: &str, tenant: &str) -> Result<(), DbError> {
    execute(
        conn,
        "INSERT INTO image_owners (name, tenant, created_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (name) DO UPDATE SET tenant = excluded.tenant,
                                          created_at = excluded.created_at",
        params![name, tenant, crate::time::now_ms()],
    )?;
    Ok(())
}

/// The tenant owning the store image `name` (`name:tag`), if one does.
pub fn image_owner(conn: &Connection, name: &str) -> Result<Option<String>, DbError> {
    Ok(query_row(
        conn,
        "SELECT tenant FROM image_owners WHERE name = ?1",
        [name],
        |r| r.get(0),
    )
    .optional()?)
}

/// The tenant of sandbox `id`, deleted or not (the owner of the snapshots made of it before
/// owners were recorded).
pub fn sandbox_tenant(conn: &Connection, id: &str) -> Result<Option<String>, DbError> {
    Ok(query_row(
        conn,
        "SELECT tenant FROM sandboxes WHERE id = ?1",
        [id],
        |r| r.get(0),
    )
    .optional()?)
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

    /// `Db::read` sees every commit at once: the server's own and another process's (the CLI
    /// adds keys to the same file), and a key gone is gone for the next read; with every read
    /// connection taken it still answers (on the writer's connection).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_see_every_commit_and_never_need_a_free_reader() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("openrun.db");
        let db = Db::open(&path).unwrap();
        let key = |id: &str| KeyRow {
            id: id.into(),
            name: id.into(),
            tenant: "t".into(),
            actor_kind: "agent".into(),
            created_at: 0,
        };
        let lookup = |hash: &'static str| move |c: &Connection| key_by_hash(c, hash);
        assert!(db.read(lookup("h1")).await.unwrap().is_none());
        db.call(move |c| insert_key(c, &key("k1"), "h1"))
            .await
            .unwrap();
        assert_eq!(db.read(lookup("h1")).await.unwrap().unwrap().id, "k1");
        // Another connection, as `openrun key create` in another process.
        let other = Connection::open(&path).unwrap();
        insert_key(&other, &key("k2"), "h2").unwrap();
        assert_eq!(db.read(lookup("h2")).await.unwrap().unwrap().id, "k2");
        other
            .execute("DELETE FROM api_keys WHERE id = 'k2'", [])
            .unwrap();
        assert!(db.read(lookup("h2")).await.unwrap().is_none());
        let held: Vec<_> = db.readers.iter().map(|r| r.lock().unwrap()).collect();
        let db2 = db.clone();
        let answer = tokio::spawn(async move { db2.read(lookup("h1")).await })
            .await
            .unwrap();
        assert_eq!(answer.unwrap().unwrap().id, "k1");
        drop(held);
    }

    /// An unsynced write that finds another process writing does not wait on the caller's
    /// thread: it is written once the lock is free, and the connection is synced again after.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unsynced_writes_wait_for_another_writer_off_the_callers_thread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("openrun.db");
        let db = Db::open(&path).unwrap();
        db.call_unsynced(|c| insert_pooled(c, "a")).await.unwrap();
        let other = Connection::open(&path).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            other.execute_batch("COMMIT").unwrap();
        });
        let started = std::time::Instant::now();
        db.call_unsynced(|c| insert_pooled(c, "b")).await.unwrap();
        assert!(started.elapsed() >= std::time::Duration::from_millis(250));
        release.join().unwrap();
        assert_eq!(db.call(|c| pooled(c)).await.unwrap(), ["a", "b"]);
        let sync: i64 = db
            .call(|c| Ok(c.pragma_query_value(None, "synchronous", |r| r.get(0))?))
            .await
            .unwrap();
        assert_eq!(sync, 2, "synchronous = FULL again");
    }

    /// A commit of `commit_then_sync` is seen by readers before its sync is awaited, and the
    /// sync is of the WAL file the path names now: a file put in its place is opened anew,
    /// and a WAL that is gone is an error, never a sync that silently did nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_is_visible_before_its_sync_and_the_sync_follows_the_wal_file() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("openrun.db");
        let db = Db::open(&path).unwrap();
        let ((), durable) = db
            .commit_then_sync(|c| insert_pooled(c, "a"))
            .await
            .unwrap();
        assert_eq!(db.read(pooled).await.unwrap(), ["a"]);
        durable.wait().await.unwrap();
        let sync: i64 = db
            .call(|c| Ok(c.pragma_query_value(None, "synchronous", |r| r.get(0))?))
            .await
            .unwrap();
        assert_eq!(sync, 2, "synchronous = FULL again");
        let held_ino = |db: &Db| {
            let held = db.wal.file.lock().unwrap();
            held.as_ref().map(|f| f.metadata().unwrap().ino())
        };
        let wal = dir.path().join("openrun.db-wal");
        assert_eq!(held_ino(&db), Some(fs_ino(&wal)));
        // Another file in its place (not something SQLite does while connections are open).
        let copy = dir.path().join("copy");
        std::fs::copy(&wal, &copy).unwrap();
        std::fs::rename(&copy, &wal).unwrap();
        db.wal.sync().unwrap();
        assert_eq!(held_ino(&db), Some(fs_ino(&wal)));
        std::fs::remove_file(&wal).unwrap();
        let gone = db.wal.sync().unwrap_err();
        assert_eq!(gone.kind(), std::io::ErrorKind::NotFound);
    }

    fn fs_ino(path: &std::path::Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).unwrap().ino()
    }

    #[test]
    fn deleted_rows_are_overwritten_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("openrun.db")).unwrap();
        let conn = db.conn.lock().unwrap();
        let on: i64 = conn
            .pragma_query_value(None, "secure_delete", |row| row.get(0))
            .unwrap();
        assert_eq!(on, 1);
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

    fn row(id: &str, tenant: &str, created_at: i64, labels: &[(&str, &str)]) -> SandboxRow {
        SandboxRow {
            id: id.into(),
            tenant: tenant.into(),
            owner: "ci".into(),
            image: "host".into(),
            limits_json: "{}".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            env: BTreeMap::from([("A".to_string(), "1".to_string())]),
            state: "running".into(),
            created_at,
            expires_at: Some(10),
        }
    }

    fn event(id: &str, kind: &'static str) -> NewEvent {
        NewEvent {
            sandbox_id: id.into(),
            tenant: "t1".into(),
            actor: "agent".into(),
            kind,
            payload: serde_json::json!({}),
        }
    }

    /// Inserts a sandbox and finishes its creation.
    fn insert_running(conn: &mut Connection, row: &SandboxRow, id: &str) {
        let mut creating = row.clone();
        creating.state = "creating".into();
        insert_sandbox(conn, &creating).unwrap();
        let event = NewEvent {
            sandbox_id: row.id.clone(),
            ..event(id, "sandbox.create")
        };
        assert!(finish_create(conn, &row.id, row.expires_at, &event).unwrap());
        assert!(!finish_create(conn, &row.id, row.expires_at, &event).unwrap());
    }

    fn open() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("openrun.db")).unwrap();
        (dir, db)
    }

    #[test]
    fn stopping_keeps_history_and_hides_deleted_rows() {
        let (_dir, db) = open();
        let mut conn = db.conn.lock().unwrap();
        insert_running(&mut conn, &row("abc", "t1", 1, &[]), "abc");
        assert!(get_sandbox(&conn, "t2", "abc").unwrap().is_none());
        let stored = get_sandbox(&conn, "t1", "abc").unwrap().unwrap();
        assert_eq!(
            (stored.owner.as_str(), stored.env["A"].as_str()),
            ("ci", "1")
        );
        assert_eq!(live_sandboxes(&conn, Some(9)).unwrap().len(), 0);
        assert_eq!(live_sandboxes(&conn, Some(10)).unwrap().len(), 1);
        stop_sandbox(&mut conn, "abc", true, &event("abc", "sandbox.delete")).unwrap();
        assert!(get_sandbox(&conn, "t1", "abc").unwrap().is_none());
        let all = ListFilter {
            limit: 100,
            ..ListFilter::default()
        };
        assert!(list_sandboxes(&conn, "t1", &all).unwrap().is_empty());
        let timeline = events(&conn, "t1", "abc", 0).unwrap().unwrap();
        assert!(timeline.ended);
        let kinds: Vec<_> = timeline.events.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["sandbox.create", "sandbox.delete"]);
        let first = timeline.events[0].seq;
        let later = events(&conn, "t1", "abc", first).unwrap().unwrap();
        assert_eq!(later.events.len(), 1);
        assert_eq!(later.events[0].kind, "sandbox.delete");
        assert!(events(&conn, "t2", "abc", 0).unwrap().is_none());
    }

    #[test]
    fn lists_filter_by_labels_and_state_and_page_in_order() {
        let (_dir, db) = open();
        let mut conn = db.conn.lock().unwrap();
        for (n, labels) in [
            (1, &[("team", "a"), ("env", "ci")][..]),
            (2, &[("team", "b")][..]),
            (2, &[("team", "a")][..]),
            (3, &[("team", "a"), ("env", "dev")][..]),
        ]
        .iter()
        .enumerate()
        {
            let id = format!("s{}", 4 - n);
            insert_running(&mut conn, &row(&id, "t1", labels.0, labels.1), "x");
        }
        insert_running(&mut conn, &row("other", "t2", 0, &[]), "x");
        fn ids(conn: &Connection, filter: &ListFilter) -> Vec<String> {
            list_sandboxes(conn, "t1", filter)
                .unwrap()
                .into_iter()
                .map(|r| r.id)
                .collect()
        }
        let mut filter = ListFilter {
            limit: 100,
            ..ListFilter::default()
        };
        // Oldest first; equal creation times by id.
        assert_eq!(ids(&conn, &filter), ["s4", "s2", "s3", "s1"]);
        filter.labels = vec![("team".into(), "a".into())];
        assert_eq!(ids(&conn, &filter), ["s4", "s2", "s1"]);
        filter.labels.push(("env".into(), "dev".into()));
        assert_eq!(ids(&conn, &filter), ["s1"]);
        filter.labels = vec![("team".into(), "a".into())];
        filter.limit = 2;
        assert_eq!(ids(&conn, &filter), ["s4", "s2"]);
        filter.after = Some((2, "s2".into()));
        assert_eq!(ids(&conn, &filter), ["s1"]);
        assert!(set_state(
            &mut conn,
            "s1",
            &["running"],
            "paused",
            &event("s1", "sandbox.pause")
        )
        .unwrap());
        assert!(!set_state(
            &mut conn,
            "s1",
            &["running"],
            "paused",
            &event("s1", "sandbox.pause")
        )
        .unwrap());
        let filter = ListFilter {
            state: Some("paused".into()),
            limit: 100,
            ..ListFilter::default()
        };
        assert_eq!(ids(&conn, &filter), ["s1"]);
        assert_eq!(
            live_sandboxes(&conn, None).unwrap().len(),
            5,
            "paused ones are live"
        );
    }

    #[test]
    fn image_owners_are_recorded_and_replaced() {
        let (_dir, db) = open();
        let conn = db.conn.lock().unwrap();
        assert_eq!(image_owner(&conn, "a:latest").unwrap(), None);
        set_image_owner(&conn, "a:latest", "t1").unwrap();
        assert_eq!(
            image_owner(&conn, "a:latest").unwrap().as_deref(),
            Some("t1")
        );
        set_image_owner(&conn, "a:latest", "t2").unwrap();
        assert_eq!(
            image_owner(&conn, "a:latest").unwrap().as_deref(),
            Some("t2")
        );
        assert_eq!(image_owner(&conn, "a:v1").unwrap(), None);
        insert_sandbox(&conn, &row("sb1", "t3", 1, &[])).unwrap();
        assert_eq!(sandbox_tenant(&conn, "sb1").unwrap().as_deref(), Some("t3"));
        assert_eq!(sandbox_tenant(&conn, "sb2").unwrap(), None);
    }

    #[test]
    fn a_background_exit_is_recorded_once() {
        let (_dir, db) = open();
        let mut conn = db.conn.lock().unwrap();
        insert_running(&mut conn, &row("abc", "t1", 1, &[]), "abc");
        let first = insert_background(&mut conn, "abc", "t1", "agent", 7).unwrap();
        assert_eq!(pending_background(&conn, Some("abc")).unwrap().len(), 1);
        assert!(record_background_exit(&mut conn, first, &event("abc", "process.exit")).unwrap());
        assert!(!record_background_exit(&mut conn, first, &event("abc", "process.exit")).unwrap());
        let timeline = events(&conn, "t1", "abc", 0).unwrap().unwrap();
        let exits = timeline
            .events
            .iter()
            .filter(|e| e.kind == "process.exit")
            .count();
        assert_eq!(exits, 1);
        // The pid is reused after a release: the new process is pending, the old one closed.
        let second = insert_background(&mut conn, "abc", "t1", "agent", 7).unwrap();
        let pending = pending_background(&conn, None).unwrap();
        assert_eq!(pending.iter().map(|b| b.id).collect::<Vec<_>>(), [second]);
    }

    #[test]
    fn a_version_1_database_migrates_with_owners_filled_in() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("openrun.db");
        {
            let mut conn = Connection::open(&path).unwrap();
            let tx = conn.transaction().unwrap();
            tx.execute_batch(MIGRATIONS[0].1).unwrap();
            tx.pragma_update(None, "user_version", 1).unwrap();
            tx.execute_batch(
                "INSERT INTO api_keys VALUES ('k1', 'ci', 'k1', 'agent', 'h', 1);
                 INSERT INTO sandboxes (id, tenant, image, limits_json, state, created_at)
                 VALUES ('abc', 'k1', 'host', '{}', 'running', 5);",
            )
            .unwrap();
            tx.commit().unwrap();
        }
        let db = Db::open(&path).unwrap();
        let conn = db.conn.lock().unwrap();
        let row = get_sandbox(&conn, "k1", "abc").unwrap().unwrap();
        assert_eq!(row.owner, "ci");
        assert!(row.labels.is_empty() && row.env.is_empty());
        assert_eq!(row.state, "running");
    }
}
