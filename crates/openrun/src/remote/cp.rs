//! `openrun cp SRC DST`, one side `ID:/path`, like `docker cp`: a file is copied with the files
//! endpoints (paged reads; one write, or a one-file tar above the write limit), a directory
//! with the tar endpoints. Copying onto an existing directory copies into it; a source ending
//! in `/.` copies a directory's contents.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context, Result};
use reqwest::Method;
use serde_json::Value;

use super::archive::{self, Copied};
use super::http::{has_code, sandbox_path, Client};
use crate::cli::CpArgs;

/// `ID:/path` → (id, path). A local path with a colon can be written `./a:b`.
fn sandbox_side(arg: &str) -> Option<(&str, &str)> {
    let (id, path) = arg.split_once(':')?;
    (!id.is_empty() && !id.contains('/')).then_some((id, path))
}

/// Runs `openrun cp`.
pub async fn cp(client: &Client, args: CpArgs) -> Result<i32> {
    let copied = match (sandbox_side(&args.source), sandbox_side(&args.destination)) {
        (Some((id, path)), None) => download(client, id, path, Path::new(&args.destination)).await?,
        (None, Some((id, path))) => upload(client, Path::new(&args.source), id, path).await?,
        (Some(_), Some(_)) => anyhow::bail!(
            "cannot copy between two sandboxes: one side of cp must be a local path"
        ),
        (None, None) => anyhow::bail!(
            "one side of cp must be in a sandbox, written ID:/path (a local path with a colon: ./a:b)"
        ),
    };
    if args.json {
        crate::output::print(&format!("{}\n", serde_json::to_string_pretty(&copied)?));
    }
    Ok(0)
}

/// `file_type` of a path in the sandbox: `file`, `dir`, `symlink` or `other`.
async fn remote_kind(client: &Client, id: &str, path: &str) -> Result<String> {
    let req = client
        .request(Method::GET, &sandbox_path(id, "/files/stat"))?
        .query(&[("path", path)]);
    let stat: Value = client
        .send(req)
        .await?
        .json()
        .await
        .context("the server's stat is not JSON")?;
    Ok(stat["file_type"].as_str().unwrap_or("other").to_string())
}

/// The last component of a sandbox path (`""` for `/`).
fn remote_name(path: &str) -> &str {
    path.trim_end_matches('/').rsplit('/').next().unwrap_or("")
}

/// Copies `id:path` to `dest`. A directory the user names is used as named (links followed,
/// as by `docker cp`); a name the copy makes in it is never followed, since a sandbox may have
/// planted a link there by an earlier copy: a file replaces such a link (also a link named as
/// the destination file), a directory copy is refused.
async fn download(client: &Client, id: &str, path: &str, dest: &Path) -> Result<Copied> {
    let kind = remote_kind(client, id, path).await?;
    let name = remote_name(path);
    let dest_is_dir = dest.is_dir();
    let into = dest_is_dir && !matches!(name, "" | "." | "..");
    // The directory that is the user's, and the name to make in it.
    let (dir, made) = if into {
        (dest, Some(OsStr::new(name)))
    } else if dest_is_dir {
        (dest, None)
    } else {
        let parent = dest
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let made = dest
            .file_name()
            .with_context(|| format!("cannot copy to {}", dest.display()))?;
        (parent, Some(made))
    };
    let target = made.map_or_else(|| dir.to_path_buf(), |m| dir.join(m));
    if kind != "dir" {
        let names_a_dir = dest.as_os_str().as_encoded_bytes().ends_with(b"/");
        match made {
            Some(_) if names_a_dir && !dest_is_dir => {
                anyhow::bail!("{}: no such directory", dest.display())
            }
            Some(made) => return download_file(client, id, path, dir, made).await,
            None => anyhow::bail!("cannot copy {id}:{path} onto directory {}", dest.display()),
        }
    }
    let root = match made {
        Some(made) => archive::dir_in(dir, made)?,
        None => archive::open_dir(dir)?,
    };
    let req = client
        .request(Method::GET, &sandbox_path(id, "/files/tar"))?
        .query(&[("path", path)]);
    let mut res = client.send(req).await?;
    // The archive is unpacked while it arrives, on a blocking thread fed through a channel.
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    let shown = target.clone();
    let unpacking = tokio::task::spawn_blocking(move || {
        archive::unpack(
            ChannelReader {
                rx,
                chunk: Vec::new(),
                pos: 0,
            },
            root,
            &shown,
        )
    });
    let mut lost = None;
    loop {
        match res.chunk().await {
            Ok(Some(chunk)) => {
                if tx.send(chunk.to_vec()).await.is_err() {
                    break; // the unpack failed: its error follows
                }
            }
            Ok(None) => break,
            Err(e) => {
                lost = Some(e);
                break;
            }
        }
    }
    drop(tx);
    let unpacked = unpacking.await.context("the unpack task failed")?;
    if let Some(e) = lost {
        return Err(e).context("lost the connection to the server during the copy");
    }
    unpacked.with_context(|| format!("cannot copy {id}:{path} to {}", target.display()))
}

/// Reads the chunks a channel delivers (from a blocking thread).
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
    chunk: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos >= self.chunk.len() {
            match self.rx.blocking_recv() {
                Some(chunk) => {
                    self.chunk = chunk;
                    self.pos = 0;
                }
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.chunk.len() - self.pos);
        out[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Copies one file out, page by page (a read answers at most the agent's limit, with the
/// whole size in `X-File-Size`).
async fn download_file(
    client: &Client,
    id: &str,
    path: &str,
    dir: &Path,
    name: &OsStr,
) -> Result<Copied> {
    let target = dir.join(name);
    let mut file: Option<std::fs::File> = None;
    let mut offset = 0u64;
    loop {
        let req = client
            .request(Method::GET, &sandbox_path(id, "/files"))?
            .query(&[("path", path.to_string()), ("offset", offset.to_string())]);
        let mut res = client.send(req).await?;
        let size = res
            .headers()
            .get("x-file-size")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        // Created once the sandbox answered, so a failed copy leaves no empty file behind.
        let out = match &mut file {
            Some(f) => f,
            None => file.insert(archive::file_in(dir, name)?),
        };
        let mut got = 0u64;
        while let Some(chunk) = res
            .chunk()
            .await
            .context("lost the connection to the server during the copy")?
        {
            out.write_all(&chunk)
                .with_context(|| format!("cannot write {}", target.display()))?;
            got += chunk.len() as u64;
        }
        offset += got;
        if got == 0 || size.is_none_or(|s| offset >= s) {
            break;
        }
    }
    Ok(Copied {
        files: 1,
        bytes: offset,
    })
}

async fn upload(client: &Client, src: &Path, id: &str, path: &str) -> Result<Copied> {
    let meta = std::fs::metadata(src).with_context(|| format!("cannot read {}", src.display()))?;
    if !meta.is_file() && !meta.is_dir() {
        // A device or fifo would be read without end (/dev/zero) or block (a fifo).
        anyhow::bail!(
            "cannot copy {}: only files and directories are copied into a sandbox",
            src.display()
        );
    }
    let kind = match remote_kind(client, id, path).await {
        Ok(kind) => Some(kind),
        // A missing sandbox is also not_found: the upload itself then reports it.
        Err(e) if has_code(&e, "not_found") => None,
        Err(e) => return Err(e),
    };
    let contents_only = src.as_os_str().as_encoded_bytes().ends_with(b"/.");
    let name = src
        .file_name()
        .map(|n| {
            n.to_str()
                .with_context(|| format!("{} is not a UTF-8 name", src.display()))
        })
        .transpose()?;
    let target = match (kind.as_deref(), name) {
        (Some("dir"), Some(name)) if !contents_only => {
            format!("{}/{name}", path.trim_end_matches('/'))
        }
        _ => path.to_string(),
    };
    if meta.is_dir() {
        if kind.as_deref().is_some_and(|k| k != "dir") && target == path {
            anyhow::bail!(
                "cannot copy directory {} onto file {id}:{path}",
                src.display()
            );
        }
        let dir = src.to_path_buf();
        return put_tar(client, id, target, move |out| archive::pack_dir(&dir, out)).await;
    }
    let mode = format!("{:o}", meta.permissions().mode() & 0o777);
    if meta.len() > openrun_protocol::MAX_DATA_LEN as u64 {
        // Above the write limit: a tar of the one file, unpacked into its directory.
        let (dir, file_name) = match target.rsplit_once('/') {
            Some(("", n)) => ("/".to_string(), n.to_string()),
            Some((d, n)) => (d.to_string(), n.to_string()),
            None => anyhow::bail!("{id}:{target}: the path in the sandbox must be absolute"),
        };
        let file = src.to_path_buf();
        let pack = move |out: &mut ChannelWriter| archive::pack_file(&file, &file_name, out);
        return put_tar(client, id, dir, pack).await;
    }
    let data = std::fs::read(src).with_context(|| format!("cannot read {}", src.display()))?;
    let bytes = data.len() as u64;
    let req = client
        .request(Method::PUT, &sandbox_path(id, "/files"))?
        .query(&[("path", target), ("mode", mode)])
        .body(data);
    client.send(req).await?;
    Ok(Copied { files: 1, bytes })
}

/// How packing an upload went: its result, and whether the request stopped taking the body
/// first (then the request's own error says why).
type Packing = tokio::task::JoinHandle<(Result<()>, bool)>;

/// A request body written by `pack` on a blocking thread while it is sent (so an archive is
/// never held whole in memory), and the thread's outcome. A failed `pack` fails the body too,
/// so the server never takes a cut archive for a whole one.
fn streamed(
    pack: impl FnOnce(&mut ChannelWriter) -> Result<()> + Send + 'static,
) -> (reqwest::Body, Packing) {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(16);
    let packing = tokio::task::spawn_blocking(move || {
        let mut out = ChannelWriter {
            tx,
            buf: Vec::with_capacity(CHUNK),
            closed: false,
        };
        let result = pack(&mut out).and_then(|()| out.flush().map_err(Into::into));
        if let Err(e) = &result {
            let failed = std::io::Error::other(format!("{e:#}"));
            let _ = out.tx.blocking_send(Err(failed));
        }
        (result, out.closed)
    });
    let chunks = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    });
    (reqwest::Body::wrap_stream(chunks), packing)
}

/// Bytes handed to the request body in chunks.
const CHUNK: usize = 256 << 10;

/// Writes into a channel, `CHUNK` bytes at a time (from a blocking thread).
struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<std::io::Result<Vec<u8>>>,
    buf: Vec<u8>,
    /// The request stopped reading.
    closed: bool,
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx.blocking_send(Ok(chunk)).map_err(|_| {
            self.closed = true;
            std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the upload ended")
        })
    }
}

/// Uploads the tar that `pack` writes (while it writes it) to be unpacked into directory
/// `dir` of the sandbox; the server answers what it unpacked. A packing failure is reported
/// rather than the cut request it caused, unless the request ended first.
async fn put_tar(
    client: &Client,
    id: &str,
    dir: String,
    pack: impl FnOnce(&mut ChannelWriter) -> Result<()> + Send + 'static,
) -> Result<Copied> {
    let (body, packing) = streamed(pack);
    let req = client
        .request(Method::PUT, &sandbox_path(id, "/files/tar"))?
        .query(&[("path", dir)])
        .body(body);
    let sent = client.send(req).await;
    let (packed, request_ended) = packing.await.context("the pack task failed")?;
    let res = match (sent, packed) {
        (Ok(res), Ok(())) => res,
        (Err(e), _) if request_ended => return Err(e),
        (_, Err(e)) | (Err(e), Ok(())) => return Err(e),
    };
    let answer: Value = res
        .json()
        .await
        .context("the server's answer to the upload is not JSON")?;
    Ok(Copied {
        files: answer["files"].as_u64().unwrap_or(0),
        bytes: answer["bytes"].as_u64().unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sides_and_names() {
        assert_eq!(sandbox_side("abc:/tmp/x"), Some(("abc", "/tmp/x")));
        assert_eq!(sandbox_side("./a:b"), None);
        assert_eq!(sandbox_side("/abs/a:b"), None);
        assert_eq!(sandbox_side(":x"), None);
        assert_eq!(sandbox_side("local"), None);
        assert_eq!(remote_name("/a/b/"), "b");
        assert_eq!(remote_name("/"), "");
        assert_eq!(remote_name("/a/."), ".");
    }
}
