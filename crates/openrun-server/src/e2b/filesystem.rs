//! envd's `filesystem.Filesystem/*` Connect service but watchers (fact sheet §5.2): `files.list`,
//! `exists`, `get_info`, `make_dir`, `rename`, `remove` of the SDK. Each method is a thin
//! adapter over the core calls of [`crate::files`], on behalf of the sandbox's owner.
//!
//! | method | core call | answer |
//! |---|---|---|
//! | `ListDir` `{"path","depth"}` | [`files::list_dir`] per directory, `depth` levels (0 = 1) | `{"entries":[EntryInfo]}` |
//! | `Stat` `{"path"}` | [`files::stat_path`] | `{"entry":EntryInfo}` (`not_found`: `exists()` is false) |
//! | `MakeDir` `{"path"}` | [`files::make_dir`] (parents made) | `{"entry"}`; `already_exists` when the directory exists, `invalid_argument` when something else does |
//! | `Move` `{"source","destination"}` | [`files::move_path`] (the destination's parents made) | `{"entry"}` of the destination |
//! | `Remove` `{"path"}` | [`files::remove_path`] (recursive) | `{}`, also when nothing is there (envd's `os.RemoveAll`) |
//!
//! Paths: a relative path (or `~`, `~/…`) is taken from the run-as user's home directory (the
//! user of `Authorization`, else the image's, else root), as envd does; the agent would take
//! it from `/`. `Start` takes a relative `cwd` the same way. Homes, and the owner and group names of
//! [`EntryInfo`], come from the sandbox's own `/etc/passwd` and `/etc/group`, read through
//! [`files::read_file`] and kept for [`USERS_TTL`] per sandbox ([`entry_info`] and
//! [`resolve_path`] are shared with [`super::watch`]). They are parsed and resolved by
//! [`openrun_protocol::users`], the agent's own code, so a run-as user is accepted, and has
//! the home, that the agent gives its processes.
//!
//! Gap: file operations are done by the agent as root, whatever the run-as user (envd does
//! them with that user's permissions), and the directories `MakeDir`/`Move` create belong to
//! root.
//!
//! As in envd (`packages/shared/pkg/filesystem/entry.go`), `EntryInfo.mode` holds the
//! permission bits only (`FileMode.Perm()`, e.g. `0o755` for a directory) and `permissions`
//! Go's `FileMode.String()` with its type letters (`drwxr-xr-x`, `Lrwxrwxrwx`,
//! `dtrwxrwxrwx`). A symlink has type `FILE_TYPE_SYMLINK`, `isSymlink` and `symlinkTarget`,
//! absolute (a relative link is taken from its directory, lexically).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::routing::post;
use axum::{Extension, Router};
use openrun_protocol::users::{self as user_db, GroupEntry, PasswdEntry};
use openrun_protocol::{AgentError, ErrorCode, FileKind, FileStat};
use serde::{Deserialize, Serialize};

use super::connect::{pj, ConnectError, Reply, Unary};
use super::SandboxCtx;
use crate::api::Shared;
use crate::error::ApiError;
use crate::files;

/// How long the users and groups of a sandbox are kept before they are read again.
pub(super) const USERS_TTL: Duration = Duration::from_secs(30);
/// Sandboxes whose users are kept at most (all are forgotten beyond).
const USERS_CACHE_SIZE: usize = 1024;
/// Most bytes of entries a listing holds (`resource_exhausted` beyond), counted as
/// [`EntryInfo::weight`]: the answer's size is about this too.
const MAX_LISTED_BYTES: usize = 64 << 20;
/// Most directories a recursive listing reads (each is one agent call).
const MAX_LISTED_DIRS: usize = 10_000;
/// Most bytes of `/etc/passwd` or `/etc/group` read.
const MAX_USERS_FILE: u64 = 1 << 20;

/// The routes of this module.
pub(super) fn routes() -> Router<Shared> {
    Router::new()
        .route("/filesystem.Filesystem/ListDir", post(list_dir))
        .route("/filesystem.Filesystem/Stat", post(stat))
        .route("/filesystem.Filesystem/MakeDir", post(make_dir))
        .route("/filesystem.Filesystem/Move", post(move_entry))
        .route("/filesystem.Filesystem/Remove", post(remove))
        .route_layer(axum::middleware::from_fn(super::connect::unary_deadline))
}

/// `filesystem.EntryInfo`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct EntryInfo {
    /// Final name.
    pub name: String,
    /// `FILE_TYPE_FILE`, `FILE_TYPE_DIRECTORY`, `FILE_TYPE_SYMLINK` or
    /// `FILE_TYPE_UNSPECIFIED` (anything else: the SDK skips it in listings).
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Absolute path.
    pub path: String,
    /// Size in bytes (a decimal string, proto3's `int64`).
    #[serde(with = "pj::int64")]
    pub size: i64,
    /// Permission bits (`0o755`): envd's `os.FileMode.Perm()`.
    pub mode: u32,
    /// Go's `os.FileMode.String()`, e.g. `drwxr-xr-x`.
    pub permissions: String,
    /// Owner's name (its uid when the sandbox has no name for it).
    pub owner: String,
    /// Group's name (its gid when the sandbox has no name for it).
    pub group: String,
    /// Modification time, RFC 3339.
    pub modified_time: String,
    /// A symlink's target, absolute.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub symlink_target: Option<String>,
    /// Whether it is a symlink.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub is_symlink: bool,
}

/// A request naming one path (`Stat`, `MakeDir`, `Remove`).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PathRequest {
    path: String,
}

/// `filesystem.ListDirRequest`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ListDirRequest {
    path: String,
    #[serde(with = "pj::uint32")]
    depth: u32,
}

/// `filesystem.MoveRequest`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct MoveRequest {
    source: String,
    destination: String,
}

/// An answer with one entry.
#[derive(Debug, Serialize)]
struct EntryResponse {
    entry: EntryInfo,
}

/// `filesystem.ListDirResponse`.
#[derive(Debug, Serialize)]
struct ListDirResponse {
    entries: Vec<EntryInfo>,
}

/// An empty answer (`{}`).
#[derive(Debug, Serialize)]
struct Empty {}

/// The users and groups of one sandbox, from its `/etc/passwd` and `/etc/group`, parsed and
/// resolved by [`openrun_protocol::users`] (the agent's own rules: a run-as user the server
/// accepts is one the agent runs as, with the same home), and the user its commands run as by
/// default (its image's).
#[derive(Debug, Default)]
pub(super) struct Users {
    passwd: Vec<PasswdEntry>,
    groups: Vec<GroupEntry>,
    /// The first name of each uid and gid, for [`EntryInfo`]'s owner and group.
    user_names: HashMap<u32, String>,
    group_names: HashMap<u32, String>,
    default_user: Option<String>,
}

impl Users {
    /// Parses the two files (malformed lines are skipped).
    fn parse(passwd: &str, group: &str) -> Self {
        let passwd = user_db::parse_passwd(passwd);
        let groups = user_db::parse_group(group);
        let mut user_names = HashMap::new();
        for entry in &passwd {
            user_names
                .entry(entry.uid)
                .or_insert_with(|| entry.name.clone());
        }
        let mut group_names = HashMap::new();
        for entry in &groups {
            group_names
                .entry(entry.gid)
                .or_insert_with(|| entry.name.clone());
        }
        Self {
            passwd,
            groups,
            user_names,
            group_names,
            default_user: None,
        }
    }

    /// Whether the agent would run a process as `user` (a name, uid, `uid:gid`, `name:group`).
    fn knows(&self, user: &str) -> bool {
        user_db::resolve_user(Some(user), &self.passwd, &self.groups).is_ok()
    }

    /// The home of `user`, as the agent finds it (`/root` for root without an entry, `/` for
    /// a uid without one); `None` for an unknown name.
    fn home(&self, user: &str) -> Option<String> {
        user_db::resolve_user(Some(user), &self.passwd, &self.groups)
            .ok()
            .map(|resolved| resolved.home)
    }
}

/// The users of every sandbox seen lately: when they were read, and what.
type UsersCache = Mutex<HashMap<String, (Instant, Arc<Users>)>>;

fn users_cache() -> &'static UsersCache {
    static CACHE: OnceLock<UsersCache> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// A text file of the sandbox, empty if it cannot be read.
async fn read_text(s: &Shared, ctx: &SandboxCtx, path: &str) -> Result<String, ApiError> {
    match files::read_file(
        s,
        &ctx.caller,
        &ctx.sandbox_id,
        path.to_string(),
        0,
        Some(MAX_USERS_FILE),
    )
    .await
    {
        Ok(file) => Ok(String::from_utf8_lossy(&file.data).into_owned()),
        Err(ApiError::Agent(e)) if e.code != ErrorCode::Internal => Ok(String::new()),
        Err(e) => Err(e),
    }
}

/// The users and groups of the sandbox (read at most every [`USERS_TTL`]).
pub(super) async fn users(s: &Shared, ctx: &SandboxCtx) -> Result<Arc<Users>, ApiError> {
    load_users(s, ctx, USERS_TTL).await
}

/// The users and groups of the sandbox, read again when older than `max_age`.
async fn load_users(
    s: &Shared,
    ctx: &SandboxCtx,
    max_age: Duration,
) -> Result<Arc<Users>, ApiError> {
    let now = Instant::now();
    if let Ok(cache) = users_cache().lock() {
        if let Some((at, users)) = cache.get(&ctx.sandbox_id) {
            if now.duration_since(*at) < max_age {
                return Ok(users.clone());
            }
        }
    }
    let passwd = read_text(s, ctx, "/etc/passwd").await?;
    let group = read_text(s, ctx, "/etc/group").await?;
    let mut users = Users::parse(&passwd, &group);
    users.default_user = default_user(s, &ctx.sandbox_id).await;
    let users = Arc::new(users);
    if let Ok(mut cache) = users_cache().lock() {
        if cache.len() >= USERS_CACHE_SIZE {
            cache.clear();
        }
        cache.insert(ctx.sandbox_id.clone(), (now, users.clone()));
    }
    Ok(users)
}

/// Refuses a run-as user (`Authorization`) the sandbox does not know, as envd does
/// (`unauthenticated`, "invalid username"); root and numeric ids are always accepted. The
/// users are read again before a name is refused (it may have been added just now).
pub(super) async fn check_user(s: &Shared, ctx: &SandboxCtx) -> Result<(), ConnectError> {
    let Some(user) = ctx.user.as_deref() else {
        return Ok(());
    };
    if user == "root"
        || users(s, ctx).await?.knows(user)
        || load_users(s, ctx, Duration::ZERO).await?.knows(user)
    {
        return Ok(());
    }
    Err(ConnectError::new(
        super::connect::Code::Unauthenticated,
        format!("invalid username: '{user}'"),
    ))
}

/// The user the sandbox's commands run as when none is named (its image's; `None`: root).
async fn default_user(s: &Shared, id: &str) -> Option<String> {
    let runtime = s.runtime.clone();
    let id = id.to_string();
    match crate::api::blocking(move || runtime.open_sandbox_exact(&id)).await {
        Ok(Ok(sandbox)) => sandbox.record().user.clone(),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "cannot open a sandbox for its default user");
            None
        }
        Err(_) => None,
    }
}

/// The absolute path of a client's `path`: a relative one (or `~`, `~/…`) is taken from the
/// run-as user's home directory. An unknown run-as user is refused ([`check_user`]).
pub(super) async fn resolve_path(
    s: &Shared,
    ctx: &SandboxCtx,
    path: &str,
) -> Result<String, ConnectError> {
    if path.is_empty() || path.contains('\0') {
        return Err(ConnectError::invalid(
            "path must be a non-empty path without NUL",
        ));
    }
    check_user(s, ctx).await?;
    if path.starts_with('/') {
        return Ok(crate::files::normalize_path(path));
    }
    let rest = match path.strip_prefix('~') {
        Some("") => "",
        Some(rest) if rest.starts_with('/') => rest,
        _ => path,
    };
    let home = match ctx.user.as_deref() {
        Some("root") => "/root".to_string(),
        Some(user) => home_of(&*users(s, ctx).await?, user)?,
        None => {
            let users = users(s, ctx).await?;
            match users.default_user.as_deref() {
                None | Some("root") => "/root".to_string(),
                Some(user) => home_of(&users, user)?,
            }
        }
    };
    Ok(crate::files::normalize_path(&format!("{home}/{rest}")))
}

/// The home directory of `user`, from the sandbox's `/etc/passwd`.
fn home_of(users: &Users, user: &str) -> Result<String, ConnectError> {
    users.home(user).ok_or_else(|| {
        ConnectError::invalid(format!(
            "user {user:?} has no home directory in the sandbox's /etc/passwd: give an absolute path"
        ))
    })
}

impl EntryInfo {
    /// About how many bytes the entry takes in memory (and in the answer).
    fn weight(&self) -> usize {
        const FIXED: usize = 160;
        FIXED
            + self.name.len()
            + self.path.len()
            + self.permissions.len()
            + self.owner.len()
            + self.group.len()
            + self.modified_time.len()
            + self.symlink_target.as_ref().map_or(0, String::len)
    }
}

/// Go's `os.FileMode` of a stat: type bits and permission bits.
fn go_mode(stat: &FileStat) -> u32 {
    const DIR: u32 = 1 << 31;
    const SYMLINK: u32 = 1 << 27;
    const SETUID: u32 = 1 << 23;
    const SETGID: u32 = 1 << 22;
    const STICKY: u32 = 1 << 20;
    const IRREGULAR: u32 = 1 << 19;
    let mut mode = stat.mode & 0o777;
    mode |= match stat.kind {
        FileKind::File => 0,
        FileKind::Dir => DIR,
        FileKind::Symlink => SYMLINK,
        FileKind::Other => IRREGULAR,
    };
    for (unix, go) in [(0o4000, SETUID), (0o2000, SETGID), (0o1000, STICKY)] {
        if stat.mode & unix != 0 {
            mode |= go;
        }
    }
    mode
}

/// Go's `os.FileMode.String()`: type letters (`-` when none), then `rwxrwxrwx`.
fn go_mode_string(mode: u32) -> String {
    const LETTERS: &[u8] = b"dalTLDpSugct?";
    let mut out = String::new();
    for (i, letter) in LETTERS.iter().enumerate() {
        if mode & (1 << (31 - i)) != 0 {
            out.push(char::from(*letter));
        }
    }
    if out.is_empty() {
        out.push('-');
    }
    for (i, letter) in b"rwxrwxrwx".iter().enumerate() {
        out.push(if mode & (1 << (8 - i)) != 0 {
            char::from(*letter)
        } else {
            '-'
        });
    }
    out
}

/// The [`EntryInfo`] of `stat`, found at the absolute `path`.
fn to_entry(stat: FileStat, path: String, users: &Users) -> EntryInfo {
    let mode = go_mode(&stat);
    let name = path.rsplit('/').next().unwrap_or("").to_string();
    // envd's EvalSymlinks, lexically: a relative target is taken from the link's directory.
    let symlink_target = stat
        .symlink_target
        .map(|target| match target.starts_with('/') {
            true => crate::files::normalize_path(&target),
            false => crate::files::normalize_path(&format!("{}/{target}", parent(&path))),
        });
    let (kind, is_symlink) = match stat.kind {
        FileKind::File => ("FILE_TYPE_FILE", false),
        FileKind::Dir => ("FILE_TYPE_DIRECTORY", false),
        FileKind::Symlink => ("FILE_TYPE_SYMLINK", true),
        FileKind::Other => ("FILE_TYPE_UNSPECIFIED", false),
    };
    EntryInfo {
        name: if name.is_empty() { "/".into() } else { name },
        kind,
        path,
        size: i64::try_from(stat.size).unwrap_or(i64::MAX),
        mode: mode & 0o777,
        permissions: go_mode_string(mode),
        owner: users
            .user_names
            .get(&stat.uid)
            .cloned()
            .unwrap_or_else(|| stat.uid.to_string()),
        group: users
            .group_names
            .get(&stat.gid)
            .cloned()
            .unwrap_or_else(|| stat.gid.to_string()),
        modified_time: crate::time::rfc3339(stat.modified_ms),
        symlink_target,
        is_symlink,
    }
}

/// The [`EntryInfo`] of the absolute `path` (a final symlink is not followed).
pub(super) async fn entry_info(
    s: &Shared,
    ctx: &SandboxCtx,
    path: String,
) -> Result<EntryInfo, ConnectError> {
    let stat = files::stat_path(s, &ctx.caller, &ctx.sandbox_id, path.clone()).await?;
    let users = users(s, ctx).await?;
    Ok(to_entry(stat, path, &users))
}

/// The directory of the absolute, normalized `path` (`/` for `/x`).
fn parent(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) | None => "/",
        Some(i) => &path[..i],
    }
}

/// Joins a directory and an entry's name.
fn join(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

/// `ListDir`: the entries of a directory, and of its subdirectories down to `depth` levels
/// (symlinks to directories are not descended into).
async fn list_dir(
    State(s): State<Shared>,
    Extension(ctx): Extension<SandboxCtx>,
    Unary(request): Unary<ListDirRequest>,
) -> Result<Reply<ListDirResponse>, ConnectError> {
    let root = resolve_path(&s, &ctx, &request.path).await?;
    let depth = request.depth.max(1);
    let users = users(&s, &ctx).await?;
    let mut entries = Vec::new();
    let mut bytes = 0usize;
    let mut dirs = 0usize;
    let mut level = vec![root];
    for current in 1..=depth {
        let mut next = Vec::new();
        for dir in level {
            dirs += 1;
            if dirs > MAX_LISTED_DIRS {
                return Err(ConnectError::new(
                    super::connect::Code::ResourceExhausted,
                    format!(
                        "the listing spans more than {MAX_LISTED_DIRS} directories: ask for less depth"
                    ),
                ));
            }
            let listed = match files::list_dir(&s, &ctx.caller, &ctx.sandbox_id, dir.clone()).await
            {
                Ok(listed) => listed,
                // A subdirectory removed or made unreadable while we walk: skip it.
                Err(ApiError::Agent(_)) if current > 1 => continue,
                Err(e) => return Err(e.into()),
            };
            for stat in listed {
                let path = join(&dir, &stat.name);
                if stat.kind == FileKind::Dir && current < depth {
                    next.push(path.clone());
                }
                let entry = to_entry(stat, path, &users);
                bytes += entry.weight();
                if bytes > MAX_LISTED_BYTES {
                    return Err(ConnectError::new(
                        super::connect::Code::ResourceExhausted,
                        format!(
                            "the listing is larger than {} MiB ({} entries so far): ask for less depth",
                            MAX_LISTED_BYTES >> 20,
                            entries.len()
                        ),
                    ));
                }
                entries.push(entry);
            }
        }
        level = next;
        if level.is_empty() {
            break;
        }
    }
    Ok(Reply(ListDirResponse { entries }))
}

/// `Stat`: one entry (`not_found` when missing).
async fn stat(
    State(s): State<Shared>,
    Extension(ctx): Extension<SandboxCtx>,
    Unary(request): Unary<PathRequest>,
) -> Result<Reply<EntryResponse>, ConnectError> {
    let path = resolve_path(&s, &ctx, &request.path).await?;
    Ok(Reply(EntryResponse {
        entry: entry_info(&s, &ctx, path).await?,
    }))
}

/// `MakeDir`: creates the directory and missing parents; `already_exists` when it exists.
async fn make_dir(
    State(s): State<Shared>,
    Extension(ctx): Extension<SandboxCtx>,
    Unary(request): Unary<PathRequest>,
) -> Result<Reply<EntryResponse>, ConnectError> {
    let path = resolve_path(&s, &ctx, &request.path).await?;
    let (caller, id) = (&ctx.caller, ctx.sandbox_id.as_str());
    // Without parents first, so that an existing directory is told apart atomically.
    match files::make_dir(&s, caller, id, path.clone(), false).await {
        Ok(()) => {}
        Err(ApiError::Agent(e)) if e.code == ErrorCode::AlreadyExists => {
            let existing = files::stat_path(&s, caller, id, path.clone()).await?;
            return Err(if existing.kind == FileKind::Dir {
                ConnectError::new(
                    super::connect::Code::AlreadyExists,
                    format!("directory already exists: {path}"),
                )
            } else {
                ConnectError::invalid(format!(
                    "path already exists but it is not a directory: {path}"
                ))
            });
        }
        Err(ApiError::Agent(e)) if e.code == ErrorCode::NotFound => {
            files::make_dir(&s, caller, id, path.clone(), true).await?;
        }
        Err(e) => return Err(e.into()),
    }
    Ok(Reply(EntryResponse {
        entry: entry_info(&s, &ctx, path).await?,
    }))
}

/// `Move`: renames `source` to `destination`; answers the destination's entry.
async fn move_entry(
    State(s): State<Shared>,
    Extension(ctx): Extension<SandboxCtx>,
    Unary(request): Unary<MoveRequest>,
) -> Result<Reply<EntryResponse>, ConnectError> {
    let source = resolve_path(&s, &ctx, &request.source).await?;
    let destination = resolve_path(&s, &ctx, &request.destination).await?;
    let (caller, id) = (&ctx.caller, ctx.sandbox_id.as_str());
    match files::move_path(&s, caller, id, source.clone(), destination.clone()).await {
        Ok(()) => {}
        // Like envd, the destination's missing parents are made (once the source is known
        // to exist, so that a failed move leaves nothing behind).
        Err(ApiError::Agent(e)) if e.code == ErrorCode::NotFound => {
            files::stat_path(&s, caller, id, source.clone()).await?;
            files::make_dir(&s, caller, id, parent(&destination).to_string(), true).await?;
            files::move_path(&s, caller, id, source, destination.clone()).await?;
        }
        Err(e) => return Err(e.into()),
    }
    Ok(Reply(EntryResponse {
        entry: entry_info(&s, &ctx, destination).await?,
    }))
}

/// `Remove`: removes a file, or a directory with everything in it.
async fn remove(
    State(s): State<Shared>,
    Extension(ctx): Extension<SandboxCtx>,
    Unary(request): Unary<PathRequest>,
) -> Result<Reply<Empty>, ConnectError> {
    let path = resolve_path(&s, &ctx, &request.path).await?;
    match files::remove_path(&s, &ctx.caller, &ctx.sandbox_id, path, true).await {
        // envd's os.RemoveAll: nothing there is nothing to do.
        Ok(())
        | Err(ApiError::Agent(AgentError {
            code: ErrorCode::NotFound,
            ..
        })) => Ok(Reply(Empty {})),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(kind: FileKind, mode: u32) -> FileStat {
        FileStat {
            name: "x".into(),
            kind,
            size: 9,
            mode,
            uid: 1000,
            gid: 5,
            modified_ms: 0,
            symlink_target: None,
        }
    }

    #[test]
    fn modes_are_go_file_modes() {
        let dir = go_mode(&stat(FileKind::Dir, 0o755));
        assert_eq!(dir, 0x8000_0000 | 0o755);
        assert_eq!(go_mode_string(dir), "drwxr-xr-x");
        let file = go_mode(&stat(FileKind::File, 0o644));
        assert_eq!((file, go_mode_string(file).as_str()), (420, "-rw-r--r--"));
        let link = go_mode(&stat(FileKind::Symlink, 0o777));
        assert_eq!(link, 0x0800_0000 | 0o777);
        assert_eq!(go_mode_string(link), "Lrwxrwxrwx");
        let tmp = go_mode(&stat(FileKind::Dir, 0o1777));
        assert_eq!(go_mode_string(tmp), "dtrwxrwxrwx");
    }

    #[test]
    fn entries_name_owners_and_paths() {
        let users = Users::parse(
            "root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000::/home/user:/bin/bash\n",
            "root:x:0:\ntty:x:5:\n",
        );
        let entry = to_entry(
            stat(FileKind::File, 0o600),
            "/home/user/a.txt".into(),
            &users,
        );
        let json = serde_json::to_value(&entry).unwrap();
        assert_eq!(json["name"], "a.txt");
        assert_eq!(json["type"], "FILE_TYPE_FILE");
        assert_eq!(json["size"], "9");
        assert_eq!(json["owner"], "user");
        assert_eq!(json["group"], "tty");
        assert_eq!(json["modifiedTime"], "1970-01-01T00:00:00.000Z");
        assert!(json.get("isSymlink").is_none());
        assert_eq!(users.home("user").as_deref(), Some("/home/user"));
        assert_eq!(users.home("1000").as_deref(), Some("/home/user"));
        assert_eq!(users.home("nobody"), None);
        // The agent's rules, from the one shared parser: a uid without an entry runs in `/`,
        // root without one in `/root`, a pair's group must exist.
        assert_eq!(users.home("4242").as_deref(), Some("/"));
        assert_eq!(Users::default().home("0").as_deref(), Some("/root"));
        assert!(users.knows("user:tty") && users.knows("1000:5") && users.knows("4242"));
        assert!(!users.knows("user:nogroup") && !users.knows("nobody") && !users.knows("1000:"));
        let dir = to_entry(stat(FileKind::Dir, 0o755), "/tmp/d".into(), &users);
        assert_eq!((dir.mode, dir.permissions.as_str()), (0o755, "drwxr-xr-x"));
        for (target, resolved) in [
            ("a", "/tmp/x/a"),
            ("../b", "/tmp/b"),
            ("/etc//passwd", "/etc/passwd"),
        ] {
            let mut link = stat(FileKind::Symlink, 0o777);
            link.symlink_target = Some(target.into());
            let entry = to_entry(link, "/tmp/x/link".into(), &users);
            assert_eq!(entry.symlink_target.as_deref(), Some(resolved));
            assert!(entry.is_symlink);
            assert_eq!(entry.permissions, "Lrwxrwxrwx");
        }
        assert_eq!(parent("/x"), "/");
        let unknown = to_entry(stat(FileKind::File, 0o600), "/x".into(), &Users::default());
        assert_eq!(
            (unknown.owner.as_str(), unknown.group.as_str()),
            ("1000", "5")
        );
    }

    #[test]
    fn paths_are_normalized() {
        assert_eq!(crate::files::normalize_path("/a//b/./c/../d/"), "/a/b/d");
        assert_eq!(crate::files::normalize_path("/../.."), "/");
        assert_eq!(join("/", "etc"), "/etc");
        assert_eq!(join("/etc", "passwd"), "/etc/passwd");
    }
}
