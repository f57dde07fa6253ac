//! `GET|PUT /v1/sandboxes/{id}/files/tar?path=/dir`: a directory as a tar archive, built from
//! and extracted through the agent's file operations (so every path resolves inside the
//! sandbox, as for the other file endpoints).
//!
//! Download (`application/x-tar`): the tree under `path` is listed first (`ListDir`), so a
//! missing directory or a name the file API cannot carry is a 4xx before any byte is sent;
//! then each file is read in chunks (`ReadFile` with offset and limit) while the archive
//! streams out. Entries are named relative to `path`; directories, regular files and symlinks
//! (as symlinks) keep their mode, owner ids (as seen inside the sandbox) and modification
//! time; device nodes, fifos and sockets are left out. A file that shrinks while it is read is
//! padded with zeros and one that grows is cut at its listed size, as GNU tar does.
//!
//! Upload (a tar body, at most [`MAX_UPLOAD`] bytes, streamed; or a host file the server
//! wrote, [`extract_archive`]): `path` is created if missing, then every entry is extracted in
//! order: directories with `Mkdir` (mode kept when it creates them; a symlink at the name is
//! removed first, as GNU tar does), regular files with `WriteFile` in chunks (what is at the
//! name is removed first, a link never followed, so the archive's mode applies), symlinks with
//! `Symlink` (likewise replacing what is there; the target is text the agent stores as is, and
//! whatever later follows the link still resolves inside the sandbox). No entry is extracted
//! through a symlink the same archive made (`link -> /etc` then `link/x`): such an entry is
//! refused. Entries with an absolute path or a `..` component, names or link targets that are
//! not UTF-8, hard links, devices and fifos are refused with a 400 naming the entry; entries
//! before it stay extracted. The answer is `{"files":N,"bytes":M}` (regular files) and the
//! timeline gets one `file.write` event with the same counts.
//!
//! The `tar` crate reads and writes synchronously, so each transfer runs on one blocking-pool
//! thread that drives its agent calls (and the request body) with [`Handle::block_on`]. That
//! pool also runs every database statement, so no client may hold its threads: transfers are
//! limited ([`MAX_TRANSFERS`], [`MAX_TENANT_TRANSFERS`] per key; beyond them 429
//! `too_many_requests`), and one whose client, body or agent stalls for [`IDLE`] is abandoned.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io::{self, Read, Write};
use std::path::Path as HostPath;
use std::sync::Mutex;
use std::time::Duration;

use axum::body::{Body, BodyDataStream, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures_util::StreamExt;
use openrun_protocol::{
    AgentError, ErrorCode, FileKind, FileStat, Request, Response as AgentResponse,
};
use openrun_runtime::{AgentClient, ClientError};
use tokio::runtime::Handle;
use tokio::sync::mpsc;

use crate::api::{blocking, find, Caller, Shared};
use crate::error::ApiError;
use crate::exec::open_running;
use crate::files::record;
use crate::openapi::ErrorAnswers;
use crate::query::Query;

/// Largest archive accepted for extraction.
pub const MAX_UPLOAD: u64 = 256 << 20;
/// Bytes read from or written to a file per agent request.
const CHUNK: u64 = 1 << 20;
/// Most entries one download lists (their metadata is held until the archive is sent).
const MAX_ENTRIES: usize = 200_000;
/// Most bytes of names (relative paths, as held) and symlink targets one download lists.
const MAX_LISTED_BYTES: usize = 32 << 20;
/// Archive bytes collected before they are handed to the response.
const SEND_BUFFER: usize = 64 * 1024;
/// Buffers queued between the archive thread and a slow client.
const SEND_QUEUE: usize = 16;
/// What the agent's listing puts in place of bytes that are not UTF-8.
const REPLACEMENT: char = char::REPLACEMENT_CHARACTER;
/// Longest wait of a transfer's thread for the client, the request body or the agent.
const IDLE: Duration = Duration::from_secs(60);
/// Transfers running at once (each holds a blocking-pool thread).
pub const MAX_TRANSFERS: usize = 64;
/// Transfers running at once for one key's tenant.
pub const MAX_TENANT_TRANSFERS: usize = 8;
/// `Retry-After` of a transfer refused for capacity.
const RETRY_AFTER_SECS: u64 = 5;

/// Running transfers: in all, and per tenant.
static TRANSFERS: Mutex<(usize, Option<HashMap<String, usize>>)> = Mutex::new((0, None));

/// A running transfer's place, given back when dropped.
struct Slot {
    tenant: String,
}

impl Slot {
    /// A place for a transfer of `tenant`, or 429 when it or the server has none left.
    fn take(tenant: &str) -> Result<Self, ApiError> {
        let mut guard = TRANSFERS.lock().unwrap_or_else(|p| p.into_inner());
        let (total, per_tenant) = &mut *guard;
        let mine = per_tenant.get_or_insert_with(HashMap::new);
        let running = mine.get(tenant).copied().unwrap_or(0);
        if *total >= MAX_TRANSFERS || running >= MAX_TENANT_TRANSFERS {
            return Err(ApiError::TooManyRequests {
                message: format!(
                    "too many tar transfers at once (at most {MAX_TENANT_TRANSFERS} per key, \
                     {MAX_TRANSFERS} in all): retry after {RETRY_AFTER_SECS} s"
                ),
                retry_after_secs: RETRY_AFTER_SECS,
            });
        }
        *total += 1;
        mine.insert(tenant.to_string(), running + 1);
        Ok(Self {
            tenant: tenant.to_string(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut guard = TRANSFERS.lock().unwrap_or_else(|p| p.into_inner());
        let (total, per_tenant) = &mut *guard;
        *total = total.saturating_sub(1);
        if let Some(map) = per_tenant {
            match map.get_mut(&self.tenant) {
                Some(n) if *n > 1 => *n -= 1,
                _ => {
                    map.remove(&self.tenant);
                }
            }
        }
    }
}

/// Waits on `handle` for `future`, from a transfer's thread, at most [`IDLE`].
fn within<F: Future>(handle: &Handle, what: &str, future: F) -> io::Result<F::Output> {
    handle
        .block_on(tokio::time::timeout(IDLE, future))
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{what} stalled for {} s", IDLE.as_secs()),
            )
        })
}

/// An answer the agent should not have given to this request.
fn unexpected(other: AgentResponse) -> ApiError {
    ApiError::internal(
        "the sandbox agent failed",
        format!("unexpected answer: {other:?}"),
    )
}

/// `dir/name` (for `dir` with or without a trailing slash).
fn join(dir: &str, name: &str) -> String {
    format!("{}/{name}", dir.trim_end_matches('/'))
}

/// One request to the agent on an open connection.
async fn call(
    client: &mut AgentClient,
    request: Request,
    data: Vec<u8>,
) -> Result<AgentResponse, ClientError> {
    Ok(client.call_with_data(request, data).await?.header)
}

/// `GET /v1/sandboxes/{id}/files/tar?path=/dir`.
#[utoipa::path(get, operation_id = "download_tar",
    path = "/v1/sandboxes/{id}/files/tar",
    tag = "files",
    params(("id" = String, Path, description = "Sandbox id"), ("path" = String, Query, description = "Directory inside the sandbox")),
    responses((status = 200, description = "A tar archive of the directory's contents (names relative to it): directories, files and symlinks with their modes", content_type = "application/x-tar", body = Vec<u8>), ErrorAnswers))]
pub async fn download(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    query: Query,
) -> Result<Response, ApiError> {
    query.only(&["path"])?;
    let root = query.path("path")?;
    let Listed {
        mut client,
        slot,
        entries,
    } = listed(&s, &caller, &id, &root).await?;
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(SEND_QUEUE);
    let handle = Handle::current();
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        let mut sink = Sink {
            handle: handle.clone(),
            tx: tx.clone(),
            buf: Vec::with_capacity(SEND_BUFFER),
        };
        if let Err(e) = write_archive(&handle, &mut client, &root, &entries, &mut sink) {
            tracing::warn!(error = %e, path = root, "a tar download broke off");
            // The client sees the body end with an error, not a short archive.
            let _ = within(&handle, "the client", tx.send(Err(e)));
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-tar")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// Writes the tar archive of the directory `root` in the caller's sandbox `id` to the host
/// file `dest` (created or truncated), exactly as `GET .../files/tar` sends it; returns the
/// archive's size in bytes. With a `limit`, an archive that would be larger stops there with
/// [`ApiError::TooLarge`]. A failure part way leaves `dest` partly written: the caller
/// removes it.
pub(crate) async fn archive_to_file(
    s: &Shared,
    caller: &Caller,
    id: &str,
    root: &str,
    dest: &HostPath,
    limit: Option<u64>,
) -> Result<u64, ApiError> {
    check_root(root)?;
    let Listed {
        mut client,
        slot,
        entries,
    } = listed(s, caller, id, root).await?;
    let file = std::fs::File::create(dest).map_err(|e| {
        ApiError::internal(
            "cannot write the archive",
            format!("{}: {e}", dest.display()),
        )
    })?;
    let handle = Handle::current();
    let root = root.to_string();
    let shown_dest = dest.display().to_string();
    blocking(move || {
        let _slot = slot;
        let mut sink = Counted {
            inner: io::BufWriter::new(file),
            written: 0,
            limit,
        };
        write_archive(&handle, &mut client, &root, &entries, &mut sink)?;
        sink.inner
            .into_inner()
            .map_err(|e| e.into_error())?
            .sync_all()?;
        Ok::<u64, io::Error>(sink.written)
    })
    .await?
    .map_err(|e| match (e.kind(), limit) {
        (io::ErrorKind::FileTooLarge, Some(limit)) => ApiError::TooLarge {
            limit: usize::try_from(limit).unwrap_or(usize::MAX),
        },
        _ => ApiError::internal("a tar archive broke off", format!("{shown_dest}: {e}")),
    })
}

/// Refuses a directory path the file API would refuse.
fn check_root(root: &str) -> Result<(), ApiError> {
    if root.is_empty() || root.contains('\0') {
        return Err(ApiError::InvalidArgument(
            "path must be a non-empty path without NUL".into(),
        ));
    }
    Ok(())
}

/// What an archive of a sandbox directory starts from: the agent connection, the transfer's
/// place and the tree's entries.
struct Listed {
    client: AgentClient,
    slot: Slot,
    entries: Vec<Entry>,
}

/// Finds the caller's running sandbox `id`, takes a transfer place and lists `root`: the
/// shared first half of [`download`] and [`archive_to_file`].
async fn listed(s: &Shared, caller: &Caller, id: &str, root: &str) -> Result<Listed, ApiError> {
    let row = find(s, caller, id).await?;
    let (_sandbox, mut client) = open_running(s, &row).await?;
    let slot = Slot::take(&caller.tenant)?;
    let entries = walk(&mut client, root).await?;
    Ok(Listed {
        client,
        slot,
        entries,
    })
}

/// A writer counting the bytes it passes on; past `limit`, writes fail with
/// [`io::ErrorKind::FileTooLarge`].
struct Counted<W> {
    inner: W,
    written: u64,
    limit: Option<u64>,
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if let Some(limit) = self.limit {
            if self.written.saturating_add(data.len() as u64) > limit {
                return Err(io::Error::new(
                    io::ErrorKind::FileTooLarge,
                    format!("the archive is larger than {limit} bytes"),
                ));
            }
        }
        let n = self.inner.write(data)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// One entry of a download: its name relative to the root, and its metadata.
struct Entry {
    name: String,
    stat: FileStat,
}

/// Lists the tree under `root` depth first (each directory before its contents, names
/// sorted), without following symlinks and without device nodes, fifos and sockets.
async fn walk(client: &mut AgentClient, root: &str) -> Result<Vec<Entry>, ApiError> {
    let mut entries = Vec::new();
    // Directories still being listed: their relative name and remaining entries.
    let mut stack: Vec<(String, std::vec::IntoIter<FileStat>)> = Vec::new();
    // Bytes of names and targets held, in listings and in entries: a sandbox chooses them
    // (deep paths repeat their parents in every entry's name).
    let mut listed = 0usize;
    let too_large = |why: String| {
        ApiError::Agent(AgentError::new(
            ErrorCode::TooLarge,
            format!(
                "{root} {why}, the most one archive takes: download its subdirectories \
                 separately"
            ),
        ))
    };
    let first = list(client, root).await?;
    listed += listed_bytes(&first);
    stack.push((String::new(), first.into_iter()));
    while let Some((dir, rest)) = stack.last_mut() {
        let Some(stat) = rest.next() else {
            stack.pop();
            continue;
        };
        let name = if dir.is_empty() {
            stat.name.clone()
        } else {
            format!("{dir}/{}", stat.name)
        };
        check_representable(client, root, &name, &stat).await?;
        if entries.len() >= MAX_ENTRIES {
            return Err(too_large(format!("holds more than {MAX_ENTRIES} entries")));
        }
        listed += name.len();
        if listed > MAX_LISTED_BYTES {
            return Err(too_large(format!(
                "holds more than {} MiB of names and link targets",
                MAX_LISTED_BYTES >> 20
            )));
        }
        match stat.kind {
            FileKind::Dir => {
                let inside = list(client, &join(root, &name)).await?;
                listed += listed_bytes(&inside);
                entries.push(Entry {
                    name: name.clone(),
                    stat,
                });
                stack.push((name, inside.into_iter()));
            }
            FileKind::File | FileKind::Symlink => entries.push(Entry { name, stat }),
            FileKind::Other => tracing::debug!(name, "tar download leaves out a special file"),
        }
    }
    Ok(entries)
}

/// Bytes of the names and symlink targets of a listing.
fn listed_bytes(entries: &[FileStat]) -> usize {
    entries
        .iter()
        .map(|e| e.name.len() + e.symlink_target.as_ref().map_or(0, String::len))
        .sum()
}

/// A directory's entries. Two with the same name can only be names that are not UTF-8 and
/// differ in the bytes the listing replaced: refused, as the file API cannot tell them apart.
async fn list(client: &mut AgentClient, path: &str) -> Result<Vec<FileStat>, ApiError> {
    let entries = match call(client, Request::ListDir { path: path.into() }, Vec::new())
        .await
        .map_err(|e| ApiError::from_client("the sandbox agent failed", e))?
    {
        AgentResponse::Entries { entries } => entries,
        other => return Err(unexpected(other)),
    };
    if let Some(pair) = entries.windows(2).find(|w| w[0].name == w[1].name) {
        return Err(ApiError::InvalidArgument(format!(
            "cannot archive {}: names in it are not UTF-8, which the sandbox file API cannot carry",
            join(path, &pair[0].name)
        )));
    }
    Ok(entries)
}

/// Refuses an entry the file API cannot name: the agent lists a name that is not UTF-8 with
/// U+FFFD in place of the bad bytes, and that name then does not exist.
async fn check_representable(
    client: &mut AgentClient,
    root: &str,
    name: &str,
    stat: &FileStat,
) -> Result<(), ApiError> {
    let refuse = |what: &str| {
        ApiError::InvalidArgument(format!(
            "cannot archive {}: its {what} is not UTF-8, which the sandbox file API cannot carry",
            join(root, name)
        ))
    };
    if stat
        .symlink_target
        .as_deref()
        .is_some_and(|t| t.contains(REPLACEMENT))
    {
        return Err(refuse("symlink target"));
    }
    if !stat.name.contains(REPLACEMENT) {
        return Ok(());
    }
    // A real U+FFFD in a name stats fine; a replaced byte does not.
    match call(
        client,
        Request::Stat {
            path: join(root, name),
        },
        Vec::new(),
    )
    .await
    {
        Ok(AgentResponse::Stat(found)) if found.kind == stat.kind => Ok(()),
        Ok(_) | Err(ClientError::Agent(_)) => Err(refuse("name")),
        Err(e) => Err(ApiError::from_client("the sandbox agent failed", e)),
    }
}

/// Writes the archive of `entries` into `sink`.
fn write_archive(
    handle: &Handle,
    client: &mut AgentClient,
    root: &str,
    entries: &[Entry],
    sink: &mut impl Write,
) -> io::Result<()> {
    let mut builder = tar::Builder::new(&mut *sink);
    for Entry { name, stat } in entries {
        let mut header = tar::Header::new_gnu();
        header.set_mode(stat.mode);
        header.set_uid(u64::from(stat.uid));
        header.set_gid(u64::from(stat.gid));
        header.set_mtime(u64::try_from(stat.modified_ms / 1000).unwrap_or(0));
        match stat.kind {
            FileKind::Dir => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_size(0);
                builder.append_data(&mut header, format!("{name}/"), io::empty())?;
            }
            FileKind::Symlink => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_size(0);
                let target = stat.symlink_target.as_deref().unwrap_or_default();
                builder.append_link(&mut header, name, target)?;
            }
            FileKind::File => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_size(stat.size);
                let reader = FileReader {
                    handle,
                    client: &mut *client,
                    path: join(root, name),
                    size: stat.size,
                    position: 0,
                    chunk: Vec::new(),
                    used: 0,
                };
                builder.append_data(&mut header, name, reader)?;
            }
            FileKind::Other => {}
        }
    }
    builder.finish()?;
    drop(builder);
    sink.flush()
}

/// Exactly `size` bytes of a sandbox file, read through the agent a chunk at a time.
struct FileReader<'a> {
    handle: &'a Handle,
    client: &'a mut AgentClient,
    path: String,
    size: u64,
    position: u64,
    chunk: Vec<u8>,
    used: usize,
}

impl Read for FileReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.position >= self.size || buf.is_empty() {
            return Ok(0);
        }
        if self.used == self.chunk.len() {
            self.fetch()?;
        }
        let n = buf.len().min(self.chunk.len() - self.used);
        buf[..n].copy_from_slice(&self.chunk[self.used..self.used + n]);
        self.used += n;
        self.position += n as u64;
        Ok(n)
    }
}

impl FileReader<'_> {
    /// Reads the next chunk; past the file's current end (it shrank or went away), zeros.
    fn fetch(&mut self) -> io::Result<()> {
        let want = (self.size - self.position).min(CHUNK);
        let request = Request::ReadFile {
            path: self.path.clone(),
            offset: self.position,
            limit: Some(want),
        };
        let answer = within(
            self.handle,
            "the sandbox agent",
            self.client.call_with_data(request, Vec::new()),
        )?;
        let data = match answer {
            Ok(frame) => frame.data,
            Err(ClientError::Agent(e)) => {
                tracing::warn!(path = self.path, error = %e, "file changed during a tar download");
                Vec::new()
            }
            Err(e) => return Err(io::Error::other(e)),
        };
        self.chunk = if data.is_empty() {
            tracing::warn!(
                path = self.path,
                "file shrank during a tar download: padding with zeros"
            );
            vec![0; usize::try_from(want).unwrap_or(0)]
        } else {
            data
        };
        self.chunk
            .truncate(usize::try_from(want).unwrap_or(usize::MAX));
        self.used = 0;
        Ok(())
    }
}

/// Hands archive bytes to the response in buffers of [`SEND_BUFFER`].
struct Sink {
    handle: Handle,
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: Vec<u8>,
}

impl Write for Sink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= SEND_BUFFER {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let full = std::mem::replace(&mut self.buf, Vec::with_capacity(SEND_BUFFER));
        within(
            &self.handle,
            "the client",
            self.tx.send(Ok(Bytes::from(full))),
        )?
        .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client went away"))
    }
}

/// Answer of an upload.
#[derive(Debug, Default, Clone, Copy, serde::Serialize, utoipa::ToSchema)]
pub struct Extracted {
    /// Regular files written.
    pub(crate) files: u64,
    /// Bytes written to them.
    pub(crate) bytes: u64,
}

/// `PUT /v1/sandboxes/{id}/files/tar?path=/dir` with a tar body.
#[utoipa::path(put, operation_id = "upload_tar",
    path = "/v1/sandboxes/{id}/files/tar",
    tag = "files",
    params(("id" = String, Path, description = "Sandbox id"), ("path" = String, Query, description = "Directory to extract into (created if missing)")),
    request_body(content = Vec<u8>, content_type = "application/x-tar", description = "A tar archive (up to 256 MiB): directories, regular files and symlinks, relative names"),
    responses((status = 200, description = "Extracted", body = Extracted), ErrorAnswers))]
pub async fn upload(
    State(s): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    query: Query,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Extracted>, ApiError> {
    query.only(&["path"])?;
    let root = query.path("path")?;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_UPLOAD) {
        return Err(ApiError::TooLarge {
            limit: MAX_UPLOAD as usize,
        });
    }
    let body = BodyReader {
        handle: Handle::current(),
        stream: body.into_data_stream(),
        chunk: Bytes::new(),
        total: 0,
        failure: None,
    };
    extract(&s, &caller, &id, &root, body).await.map(Json)
}

/// Extracts the tar file `file` on the host (one the server wrote) into the directory `root`
/// of the caller's sandbox `id` (created if missing), exactly as `PUT .../files/tar` extracts
/// a body: the same checks per entry, agent requests and `file.write` event. The archive's
/// size is not limited (the server made it; the sandbox's disk quota still applies).
pub(crate) async fn extract_archive(
    s: &Shared,
    caller: &Caller,
    id: &str,
    root: &str,
    file: &HostPath,
) -> Result<Extracted, ApiError> {
    check_root(root)?;
    let opened = std::fs::File::open(file).map_err(|e| {
        ApiError::internal(
            "cannot read the archive",
            format!("{}: {e}", file.display()),
        )
    })?;
    let source = HostFile {
        file: io::BufReader::new(opened),
        failure: None,
    };
    extract(s, caller, id, root, source).await
}

/// Extracts the archive read from `source` into `root` of the caller's sandbox `id` and
/// records the `file.write` event: the one implementation of [`upload`] and
/// [`extract_archive`].
async fn extract(
    s: &Shared,
    caller: &Caller,
    id: &str,
    root: &str,
    source: impl Source + Send + 'static,
) -> Result<Extracted, ApiError> {
    let row = find(s, caller, id).await?;
    let (_sandbox, mut client) = open_running(s, &row).await?;
    let slot = Slot::take(&caller.tenant)?;
    let mkdir = Request::Mkdir {
        path: root.to_string(),
        parents: true,
        mode: None,
    };
    match call(&mut client, mkdir, Vec::new())
        .await
        .map_err(|e| ApiError::from_client("the sandbox agent failed", e))?
    {
        AgentResponse::Done => {}
        other => return Err(unexpected(other)),
    }
    let handle = Handle::current();
    let target = root.to_string();
    let (done, result) = blocking(move || {
        let _slot = slot;
        let mut extraction = Extraction {
            handle,
            client,
            root: target,
            done: Extracted::default(),
            links: HashSet::new(),
        };
        let result = extraction.run(source);
        (extraction.done, result)
    })
    .await?;
    // Recorded even when it broke off: what was extracted before stays in the sandbox.
    let payload = serde_json::json!({
        "path": root,
        "archive": "tar",
        "files": done.files,
        "bytes": done.bytes,
        "complete": result.is_ok(),
    });
    record(s, caller, &row, "file.write", payload).await?;
    result.map(|()| done)
}

/// Where an archive being extracted is read from.
trait Source: Read {
    /// Why reading stopped, when it was not the archive's fault (taken once).
    fn failure(&mut self) -> Option<ApiError>;
}

/// A tar file on the host.
struct HostFile {
    file: io::BufReader<std::fs::File>,
    failure: Option<ApiError>,
}

impl Read for HostFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf).inspect_err(|e| {
            self.failure = Some(ApiError::internal("cannot read the archive", e.to_string()));
        })
    }
}

impl Source for HostFile {
    fn failure(&mut self) -> Option<ApiError> {
        self.failure.take()
    }
}

/// The request body as a [`Read`], refusing more than [`MAX_UPLOAD`] bytes.
struct BodyReader {
    handle: Handle,
    stream: BodyDataStream,
    chunk: Bytes,
    total: u64,
    /// Why reading stopped, when it was not the archive's fault.
    failure: Option<ApiError>,
}

impl Read for BodyReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            let next =
                within(&self.handle, "the request body", self.stream.next()).inspect_err(|e| {
                    self.failure = Some(ApiError::InvalidArgument(e.to_string()));
                })?;
            match next {
                None => return Ok(0),
                Some(Ok(chunk)) => {
                    self.total += chunk.len() as u64;
                    if self.total > MAX_UPLOAD {
                        self.failure = Some(ApiError::TooLarge {
                            limit: MAX_UPLOAD as usize,
                        });
                        return Err(io::Error::other("the archive is too large"));
                    }
                    self.chunk = chunk;
                }
                Some(Err(e)) => {
                    self.failure = Some(ApiError::InvalidArgument(format!(
                        "cannot read the request body: {e}"
                    )));
                    return Err(io::Error::other("the request body broke off"));
                }
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        Ok(n)
    }
}

impl Source for BodyReader {
    fn failure(&mut self) -> Option<ApiError> {
        self.failure.take()
    }
}

/// One upload in progress.
struct Extraction {
    handle: Handle,
    client: AgentClient,
    root: String,
    done: Extracted,
    /// Symlinks this archive made (relative paths): no later entry is extracted through one.
    links: HashSet<String>,
}

/// The one of `links` (relative paths) that `rel` is below, if any.
fn link_above<'a>(links: &HashSet<String>, rel: &'a str) -> Option<&'a str> {
    rel.match_indices('/')
        .map(|(at, _)| &rel[..at])
        .find(|dir| links.contains(*dir))
}

/// An entry name for messages: its bytes, escaped where they are not printable ASCII.
fn shown(raw: &[u8]) -> String {
    raw.escape_ascii().to_string()
}

/// The checked relative path of an entry (`None` for the root itself), or why it is refused.
fn relative_path(raw: &[u8]) -> Result<Option<String>, &'static str> {
    let text = std::str::from_utf8(raw).map_err(|_| "has a name that is not UTF-8")?;
    if text.starts_with('/') {
        return Err("has an absolute path");
    }
    let parts: Vec<&str> = text
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    if parts.contains(&"..") {
        return Err("has a .. component");
    }
    Ok((!parts.is_empty()).then(|| parts.join("/")))
}

impl Extraction {
    /// Extracts every entry of the archive read from `source`.
    fn run(&mut self, source: impl Source) -> Result<(), ApiError> {
        let mut archive = tar::Archive::new(source);
        let result = self.entries(&mut archive);
        match archive.into_inner().failure() {
            Some(failure) => Err(failure),
            None => result,
        }
    }

    fn entries(&mut self, archive: &mut tar::Archive<impl Read>) -> Result<(), ApiError> {
        let bad = |e: io::Error| ApiError::InvalidArgument(format!("invalid tar archive: {e}"));
        for entry in archive.entries().map_err(bad)? {
            let mut entry = entry.map_err(bad)?;
            let raw = entry.path_bytes().into_owned();
            let kind = entry.header().entry_type();
            let refuse = |why: &str| {
                ApiError::InvalidArgument(format!("tar entry \"{}\" {why}", shown(&raw)))
            };
            if kind.is_pax_global_extensions() {
                continue;
            }
            let Some(rel) = relative_path(&raw).map_err(refuse)? else {
                continue;
            };
            if let Some(link) = link_above(&self.links, &rel) {
                return Err(refuse(&format!(
                    "is inside \"{link}\", a symbolic link made by the same archive: \
                     it is not extracted through the link"
                )));
            }
            let path = join(&self.root, &rel);
            let mode = entry.header().mode().map_err(bad)? & 0o7777;
            if kind.is_dir() {
                // A symlink there is replaced by the directory, as GNU tar does by default.
                self.remove_symlink(&path)?;
                self.links.remove(&rel);
                let request = Request::Mkdir {
                    path,
                    parents: true,
                    mode: Some(mode),
                };
                self.call(request, Vec::new())?;
            } else if kind.is_file() || kind.is_contiguous() || kind.is_gnu_sparse() {
                self.links.remove(&rel);
                self.write_file(&mut entry, path, mode)?;
            } else if kind.is_symlink() {
                let target = entry.link_name_bytes().unwrap_or_default();
                if target.is_empty() {
                    return Err(refuse("is a symbolic link without a target"));
                }
                let target = std::str::from_utf8(&target)
                    .map_err(|_| refuse("is a symbolic link whose target is not UTF-8"))?
                    .to_string();
                self.make_symlink(target, path)?;
                self.links.insert(rel);
            } else if kind.is_hard_link() {
                return Err(refuse(
                    "is a hard link: hard links are not extracted (the sandbox file API cannot \
                     create them)",
                ));
            } else {
                return Err(refuse(
                    "is a device, fifo or other special file, which is not extracted",
                ));
            }
        }
        Ok(())
    }

    /// Removes `path` when it is a symlink (the link itself, never what it points to).
    fn remove_symlink(&mut self, path: &str) -> Result<(), ApiError> {
        let stat = Request::Stat {
            path: path.to_string(),
        };
        match self.ask(stat, Vec::new()) {
            Ok(AgentResponse::Stat(found)) if found.kind == FileKind::Symlink => {}
            Ok(AgentResponse::Stat(_)) => return Ok(()),
            Ok(other) => return Err(unexpected(other)),
            Err(ApiError::Agent(e)) if e.code == ErrorCode::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
        self.remove_existing(path)
    }

    /// Removes what is at `path` (a file, a symlink (not followed) or an empty directory),
    /// if anything.
    fn remove_existing(&mut self, path: &str) -> Result<(), ApiError> {
        let remove = Request::Remove {
            path: path.to_string(),
            recursive: false,
        };
        match self.call(remove, Vec::new()) {
            Ok(()) => Ok(()),
            Err(ApiError::Agent(e)) if e.code == ErrorCode::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Replaces `path` with a symlink holding `target` (text the agent stores as is).
    fn make_symlink(&mut self, target: String, path: String) -> Result<(), ApiError> {
        self.remove_existing(&path)?;
        let request = Request::Symlink {
            target,
            path: path.clone(),
            parents: true,
        };
        match self.call(request, Vec::new()) {
            // An agent started before `Symlink` existed cannot decode it.
            Err(ApiError::Agent(e))
                if e.code == ErrorCode::InvalidArgument
                    && e.message.starts_with("malformed request") =>
            {
                Err(ApiError::InvalidArgument(format!(
                    "cannot make the symlink {path}: this sandbox's agent predates symlink \
                     support (a sandbox created by this server version can)"
                )))
            }
            other => other,
        }
    }

    /// Replaces `path` with the entry's content, a chunk per request.
    fn write_file(
        &mut self,
        entry: &mut impl Read,
        path: String,
        mode: u32,
    ) -> Result<(), ApiError> {
        let bad = |e: io::Error| ApiError::InvalidArgument(format!("invalid tar archive: {e}"));
        // A file already there keeps its mode when rewritten: remove it so the archive's applies.
        self.remove_existing(&path)?;
        let mut first = true;
        loop {
            let mut data = Vec::new();
            entry
                .by_ref()
                .take(CHUNK)
                .read_to_end(&mut data)
                .map_err(bad)?;
            if data.is_empty() && !first {
                break;
            }
            let len = data.len() as u64;
            let request = Request::WriteFile {
                path: path.clone(),
                mode: Some(mode),
                parents: true,
                append: !first,
            };
            self.call(request, data)?;
            self.done.bytes += len;
            first = false;
            if len < CHUNK {
                break;
            }
        }
        self.done.files += 1;
        Ok(())
    }

    /// One agent request answered by `Done`.
    fn call(&mut self, request: Request, data: Vec<u8>) -> Result<(), ApiError> {
        match self.ask(request, data)? {
            AgentResponse::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// One agent request, and its answer.
    fn ask(&mut self, request: Request, data: Vec<u8>) -> Result<AgentResponse, ApiError> {
        let answer = within(
            &self.handle,
            "the sandbox agent",
            call(&mut self.client, request, data),
        )
        .map_err(|e| ApiError::internal("the sandbox agent failed", e))?;
        answer.map_err(|e| ApiError::from_client("the sandbox agent failed", e))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn counted_stops_past_its_limit() {
        use std::io::Write as _;
        let mut sink = super::Counted {
            inner: Vec::new(),
            written: 0,
            limit: Some(10),
        };
        sink.write_all(b"0123456789").unwrap();
        let e = sink.write_all(b"x").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::FileTooLarge);
        assert_eq!(sink.inner.len(), 10);
    }

    use super::*;

    #[test]
    fn entry_paths_stay_relative() {
        assert_eq!(relative_path(b"a/b.txt"), Ok(Some("a/b.txt".into())));
        assert_eq!(relative_path(b"./a//b/"), Ok(Some("a/b".into())));
        assert_eq!(relative_path(b"./"), Ok(None));
        assert_eq!(relative_path(b"/etc/passwd"), Err("has an absolute path"));
        assert_eq!(relative_path(b"a/../../x"), Err("has a .. component"));
        assert_eq!(relative_path(b".."), Err("has a .. component"));
        assert_eq!(
            relative_path(b"caf\xe9"),
            Err("has a name that is not UTF-8")
        );
        assert_eq!(
            relative_path("a..b/..c".as_bytes()),
            Ok(Some("a..b/..c".into()))
        );
        assert_eq!(shown(b"caf\xe9"), "caf\\xe9");
        assert_eq!(join("/", "a"), "/a");
        assert_eq!(join("/d/", "a"), "/d/a");
    }

    #[test]
    fn entries_below_links_of_the_archive_are_found() {
        let links: HashSet<String> = ["l".into(), "a/b".into()].into();
        assert_eq!(link_above(&links, "l/x"), Some("l"));
        assert_eq!(link_above(&links, "a/b/c/d"), Some("a/b"));
        assert_eq!(
            link_above(&links, "l"),
            None,
            "the link's own name is replaced"
        );
        assert_eq!(link_above(&links, "a/bc/d"), None);
        assert_eq!(link_above(&links, "ll/x"), None);
        assert_eq!(link_above(&links, "a/x"), None);
    }
}
