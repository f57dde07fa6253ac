//! Where an `up`'s repository comes from: a git URL cloned inside a throwaway sandbox (network
//! allowlist: the URL's host only), or a tar the client uploaded. Either way the tree ends as
//! an uncompressed tar file under `<data-dir>/up/tmp/`, removed when its [`TempFile`] drops.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use axum::body::Body;
use base64::Engine;
use futures_util::StreamExt;

use super::run::run_command;
use super::{Progress, StepStatus, UpError};
use crate::api::{Caller, CreateBody, Shared};
use crate::error::ApiError;

/// How long a clone may take.
pub(crate) const CLONE_TIMEOUT: Duration = Duration::from_secs(300);
/// Lifetime of the fetch sandbox (it is removed as soon as the clone is archived).
const FETCH_TTL: &str = "15m";
/// What git says when a shallow clone meets a dumb HTTP server.
const NO_SHALLOW: &str = "dumb http transport does not support shallow";
/// Where the clone goes inside the fetch sandbox.
const CLONE_DIR: &str = "/src";
/// An upload that sends nothing for this long is abandoned.
const UPLOAD_STALL: Duration = Duration::from_secs(60);
/// Longest git URL accepted.
const MAX_URL: usize = 2048;
/// Longest ref name accepted.
const MAX_REF: usize = 255;

/// A git repository to clone, checked by [`parse_git_url`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GitSource {
    /// The URL as given (http or https, no credentials).
    pub url: String,
    /// Its host, lowercase, without brackets or port (`example.com`, `10.0.0.1`, `::1`).
    pub host: String,
    /// The branch or tag to clone (default: the remote's HEAD).
    pub reference: Option<String>,
    /// The repository's name: the URL's last path part without `.git`.
    pub name: String,
}

impl GitSource {
    /// The egress allowlist entry of its host: the domain, or the address as a /32 or /128.
    pub(crate) fn allow_entry(&self) -> String {
        match self.host.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => format!("{ip}/32"),
            Ok(IpAddr::V6(ip)) => format!("{ip}/128"),
            Err(_) => self.host.clone(),
        }
    }

    /// The clone's argv.
    fn clone_argv(&self) -> Vec<String> {
        self.clone_argv_with(&["--depth", "1"])
    }

    /// The clone's argv for a server that cannot clone shallow (git's dumb HTTP protocol):
    /// the whole history of the one branch.
    fn full_clone_argv(&self) -> Vec<String> {
        self.clone_argv_with(&["--single-branch"])
    }

    fn clone_argv_with(&self, options: &[&str]) -> Vec<String> {
        let mut argv: Vec<String> = ["git", "-c", "advice.detachedHead=false", "clone"]
            .map(String::from)
            .to_vec();
        argv.extend(options.iter().map(|o| o.to_string()));
        if let Some(reference) = &self.reference {
            argv.extend(["--branch".into(), reference.clone()]);
        }
        argv.extend(["--".into(), self.url.clone(), CLONE_DIR.into()]);
        argv
    }
}

/// Checks a git URL (and ref) a client gave: `http://` or `https://` only (the clone goes
/// through the egress proxy), no credentials in it (they would be recorded in events), a host
/// and a repository path. `file://`, `ssh://`, `git://`, scp-like `git@host:repo` and local
/// paths are refused with why.
pub(crate) fn parse_git_url(url: &str, reference: Option<&str>) -> Result<GitSource, ApiError> {
    let refuse = |why: &str| ApiError::InvalidArgument(format!("invalid git URL {url:?}: {why}"));
    if url.is_empty() {
        return Err(ApiError::InvalidArgument("the git URL is empty".into()));
    }
    if url.len() > MAX_URL {
        return Err(ApiError::InvalidArgument(format!(
            "the git URL is longer than {MAX_URL} characters"
        )));
    }
    if url
        .chars()
        .any(|c| c.is_control() || c.is_whitespace() || !c.is_ascii())
    {
        return Err(refuse(
            "it holds spaces, control or non-ASCII characters (percent-encode them)",
        ));
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        if url.starts_with(['/', '.', '~']) {
            return Err(refuse(
                "a path on the server is not a repository the server may read: send a local \
                 directory as a tar (openrun up PATH does), or give an http(s) URL",
            ));
        }
        if url.contains(':') {
            return Err(refuse(
                "an ssh address (user@host:path) is not supported: the server clones through \
                 its HTTP egress proxy; use the repository's https URL",
            ));
        }
        return Err(refuse("it names no scheme: use https://HOST/PATH"));
    };
    match scheme.to_ascii_lowercase().as_str() {
        "http" | "https" => {}
        "file" => {
            return Err(refuse(
                "file:// URLs are refused: the server does not read its own files for a \
                 client; send a local directory as a tar (openrun up PATH does)",
            ))
        }
        "ssh" | "git+ssh" | "ssh+git" => {
            return Err(refuse(
                "ssh is not supported: the server clones through its HTTP egress proxy; use \
                 the repository's https URL",
            ))
        }
        "git" => {
            return Err(refuse(
                "the git:// protocol is not supported (it bypasses the HTTP egress proxy); use \
                 the repository's https URL",
            ))
        }
        other => {
            return Err(refuse(&format!(
                "scheme {other:?} is not supported: use http:// or https://"
            )))
        }
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    if authority.contains('@') {
        return Err(refuse(
            "credentials in the URL are refused (they would be recorded in the sandbox's \
             events): clone a public repository, or send the directory as a tar",
        ));
    }
    let host = parse_host(authority).map_err(&refuse)?;
    let path = path.split(['?', '#']).next().unwrap_or_default();
    let last = path
        .split('/')
        .rfind(|part| !part.is_empty())
        .ok_or_else(|| refuse("it names no repository (no path after the host)"))?;
    let name = last.strip_suffix(".git").unwrap_or(last);
    if name.is_empty()
        || name == "."
        || name == ".."
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(refuse(
            "its last path part is not a repository name (letters, digits, '.', '_' and '-')",
        ));
    }
    let reference = reference.map(check_ref).transpose()?;
    Ok(GitSource {
        url: url.to_string(),
        host,
        reference,
        name: name.to_string(),
    })
}

/// The host of an authority (`host`, `host:port`, `[v6]:port`), lowercase and bare.
fn parse_host(authority: &str) -> Result<String, &'static str> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (inside, after) = rest.split_once(']').ok_or("an unclosed '[' in its host")?;
        inside
            .parse::<std::net::Ipv6Addr>()
            .map_err(|_| "its bracketed host is not an IPv6 address")?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or("junk after its IPv6 host")?),
        };
        (inside.to_ascii_lowercase(), port)
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h.to_ascii_lowercase(), Some(p)),
            None => (authority.to_ascii_lowercase(), None),
        }
    };
    if let Some(port) = port {
        if port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err("its port is not a number from 1 to 65535");
        }
    }
    if host.is_empty() {
        return Err("it names no host");
    }
    if host.parse::<IpAddr>().is_ok() {
        return Ok(host);
    }
    let valid = host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
    if !valid {
        return Err("its host is not a domain name or an IP address");
    }
    if host
        .rsplit('.')
        .next()
        .is_some_and(|last| last.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err("its host looks like an IP address but is not one");
    }
    Ok(host)
}

/// Checks a branch or tag name as `git check-ref-format` would (and no leading `-`, so it can
/// never read as an option).
fn check_ref(reference: &str) -> Result<String, ApiError> {
    let refuse =
        |why: &str| ApiError::InvalidArgument(format!("invalid git ref {reference:?}: {why}"));
    if reference.is_empty() {
        return Err(refuse("it is empty"));
    }
    if reference.len() > MAX_REF {
        return Err(refuse("longer than 255 characters"));
    }
    if reference.starts_with('-') {
        return Err(refuse("it starts with '-'"));
    }
    if reference
        .bytes()
        .any(|b| b < 0x20 || b == 0x7f || b" ~^:?*[\\".contains(&b))
    {
        return Err(refuse(
            "it holds a space, a control character or one of ~ ^ : ? * [ \\",
        ));
    }
    if reference.contains("..") || reference.contains("@{") || reference == "@" {
        return Err(refuse("it holds '..' or '@{'"));
    }
    if reference.ends_with('/') || reference.ends_with('.') || reference.ends_with(".lock") {
        return Err(refuse("it ends with '/', '.' or '.lock'"));
    }
    if reference
        .split('/')
        .any(|part| part.is_empty() || part.starts_with('.'))
    {
        return Err(refuse("a part of it is empty or starts with '.'"));
    }
    Ok(reference.to_string())
}

/// A file or directory under `<data-dir>/up/tmp/`, removed when dropped.
#[derive(Debug)]
pub(crate) struct TempFile {
    path: PathBuf,
    dir: bool,
}

impl TempFile {
    /// A new unique path under `<data-dir>/up/tmp/` ending in `suffix` (nothing created at
    /// it yet; the directories are made, mode 0700).
    pub(crate) fn new(s: &Shared, suffix: &str) -> Result<Self, ApiError> {
        let path = Self::fresh_path(s, suffix)?;
        Ok(TempFile { path, dir: false })
    }

    /// A new empty directory (mode 0700) under `<data-dir>/up/tmp/`.
    pub(crate) fn new_dir(s: &Shared, suffix: &str) -> Result<Self, ApiError> {
        use std::os::unix::fs::DirBuilderExt;
        let path = Self::fresh_path(s, suffix)?;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| {
                ApiError::internal(
                    "cannot make a temporary directory",
                    format!("{}: {e}", path.display()),
                )
            })?;
        Ok(TempFile { path, dir: true })
    }

    fn fresh_path(s: &Shared, suffix: &str) -> Result<PathBuf, ApiError> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = tmp_dir(s.runtime.data_dir());
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| {
                ApiError::internal(
                    "cannot make the up directory",
                    format!("{}: {e}", dir.display()),
                )
            })?;
        clean_stale(&dir);
        let id = crate::keys::random_hex(12)
            .map_err(|e| ApiError::internal("cannot name a temporary file", e))?;
        Ok(dir.join(format!("{id}{suffix}")))
    }

    /// Its path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let result = if self.dir {
            std::fs::remove_dir_all(&self.path)
        } else {
            std::fs::remove_file(&self.path)
        };
        if let Err(e) = result {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove a temporary file");
            }
        }
    }
}

/// Entries of `<data-dir>/up/tmp` older than this are left from a server that stopped
/// mid-`up` (no `up` runs this long).
const STALE: Duration = Duration::from_secs(24 * 3600);

/// Removes stale entries of `dir`, once per process (the first temporary file made).
fn clean_stale(dir: &Path) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > STALE);
            if !old {
                continue;
            }
            let path = entry.path();
            let removed = match entry.file_type() {
                Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
                _ => std::fs::remove_file(&path),
            };
            if let Err(e) = removed {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove a stale temporary file");
            }
        }
    });
}

/// `<data-dir>/up/tmp`.
pub(crate) fn tmp_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("up").join("tmp")
}

/// Writes a request body to `dest` (created, mode 0600; it must not exist): 413 beyond
/// `limit` bytes, 400 when the client stops sending for a minute. Returns the bytes written.
pub(crate) async fn receive_upload(body: Body, dest: &Path, limit: u64) -> Result<u64, ApiError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dest.to_path_buf();
    let write_error = move |e: std::io::Error| {
        ApiError::internal(
            "cannot store the upload",
            format!("{}: {e}", path.display()),
        )
    };
    let opened = {
        let dest = dest.to_path_buf();
        crate::api::blocking(move || {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(dest)
        })
        .await?
    };
    let mut file = opened.map_err(write_error.clone())?;
    let mut stream = body.into_data_stream();
    let mut written: u64 = 0;
    let mut buffer: Vec<u8> = Vec::with_capacity(WRITE_BATCH);
    loop {
        let next = match tokio::time::timeout(UPLOAD_STALL, stream.next()).await {
            Ok(Some(Ok(chunk))) => Some(chunk),
            Ok(Some(Err(e))) => {
                // axum's body limit (and a client that broke off) end here.
                let text = e.to_string();
                if text.contains("length limit") {
                    return Err(too_large(limit));
                }
                return Err(ApiError::InvalidArgument(format!(
                    "cannot read the uploaded tar: {text}"
                )));
            }
            Ok(None) => None,
            Err(_) => {
                return Err(ApiError::InvalidArgument(format!(
                    "the upload stalled: nothing arrived for {} s",
                    UPLOAD_STALL.as_secs()
                )))
            }
        };
        let end = next.is_none();
        if let Some(chunk) = next {
            written += chunk.len() as u64;
            if written > limit {
                return Err(too_large(limit));
            }
            buffer.extend_from_slice(&chunk);
        }
        if buffer.len() >= WRITE_BATCH || (end && !buffer.is_empty()) {
            let data = std::mem::replace(&mut buffer, Vec::with_capacity(WRITE_BATCH));
            let (back, result) = crate::api::blocking(move || {
                use std::io::Write;
                let result = file.write_all(&data);
                (file, result)
            })
            .await?;
            file = back;
            result.map_err(write_error.clone())?;
        }
        if end {
            break;
        }
    }
    Ok(written)
}

/// Bytes of an upload written to its file at a time.
const WRITE_BATCH: usize = 1 << 20;

fn too_large(limit: u64) -> ApiError {
    ApiError::TooLarge {
        limit: usize::try_from(limit).unwrap_or(usize::MAX),
    }
}

/// A sandbox made for a part of an `up` (the clone, the package install), removed when
/// dropped (in a spawned task: also when the `up` is cancelled or fails) unless
/// [`SandboxGuard::remove`] removed it first or [`SandboxGuard::keep`] kept it.
pub(crate) struct SandboxGuard {
    s: Shared,
    caller: Caller,
    id: Option<String>,
}

impl SandboxGuard {
    /// Guards the caller's sandbox `id`.
    pub(crate) fn new(s: &Shared, caller: &Caller, id: &str) -> Self {
        SandboxGuard {
            s: s.clone(),
            caller: caller.clone(),
            id: Some(id.to_string()),
        }
    }

    /// The sandbox's id.
    pub(crate) fn id(&self) -> &str {
        self.id.as_deref().unwrap_or_default()
    }

    /// Removes it now (errors are logged: it is a throwaway).
    pub(crate) async fn remove(mut self) {
        if let Some(id) = self.id.take() {
            remove_sandbox(&self.s, &self.caller, &id).await;
        }
    }
}

impl Drop for SandboxGuard {
    fn drop(&mut self) {
        let Some(id) = self.id.take() else { return };
        let (s, caller) = (self.s.clone(), self.caller.clone());
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move { remove_sandbox(&s, &caller, &id).await });
            }
            Err(_) => {
                tracing::warn!(id, "no runtime to remove a throwaway sandbox: its TTL will");
            }
        }
    }
}

/// Removes the caller's sandbox `id`, logging a failure.
async fn remove_sandbox(s: &Shared, caller: &Caller, id: &str) {
    let result = async {
        let row = crate::api::find(s, caller, id).await?;
        crate::api::remove(s, caller, row).await
    }
    .await;
    match result {
        Ok(()) => tracing::debug!(id, "throwaway sandbox removed"),
        Err(ApiError::NotFound(_)) => {}
        Err(e) => tracing::warn!(id, error = %e, "cannot remove a throwaway sandbox"),
    }
}

/// Clones `git` in a throwaway sandbox on the `host` image (network: the URL's host only)
/// and writes the tree (`.git` included) to `dest` as a tar. Step `fetch`; a clone that fails
/// is `fetch_failed` with git's last lines.
pub(crate) async fn clone_repo(
    s: &Shared,
    caller: &Caller,
    git: &GitSource,
    dest: &Path,
    progress: &Progress,
) -> Result<(), UpError> {
    const STEP: &str = "fetch";
    let started = Instant::now();
    let argv = git.clone_argv();
    let command = openrun_recipe::Command::Exec(argv.clone()).to_string();
    progress
        .step(STEP, Some(command.clone()), StepStatus::Running, None, None)
        .await;
    let mut exit_code = None;
    let result = clone_inner(
        s,
        caller,
        git,
        dest,
        argv,
        &command,
        progress,
        &mut exit_code,
    )
    .await;
    let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(0);
    match &result {
        Ok(()) => {
            progress
                .step(STEP, Some(command), StepStatus::Ok, Some(ms), Some(0))
                .await
        }
        Err(_) => {
            progress
                .step(STEP, Some(command), StepStatus::Failed, Some(ms), exit_code)
                .await
        }
    }
    result.map_err(|mut e| {
        e.sandbox_id = None;
        e.step = Some(STEP.into());
        e
    })
}

#[allow(clippy::too_many_arguments)]
async fn clone_inner(
    s: &Shared,
    caller: &Caller,
    git: &GitSource,
    dest: &Path,
    argv: Vec<String>,
    command: &str,
    progress: &Progress,
    exit_code: &mut Option<i32>,
) -> Result<(), UpError> {
    let body = CreateBody {
        ttl: Some(FETCH_TTL.into()),
        labels: BTreeMap::from([("openrun.up.fetch".to_string(), git.name.clone())]),
        network: Some(serde_json::json!({
            "mode": "allowlist",
            "allow": [git.allow_entry()],
        })),
        ..Default::default()
    };
    let created = crate::api::create_sandbox(s, caller, body).await?;
    let guard = SandboxGuard::new(s, caller, created.id());
    // The sandbox's NO_PROXY names its loopback: for a URL on the server's own loopback, git
    // would go there directly instead of through the proxy.
    let env = BTreeMap::from([
        ("NO_PROXY".to_string(), String::new()),
        ("no_proxy".to_string(), String::new()),
        ("GIT_TERMINAL_PROMPT".to_string(), "0".to_string()),
    ]);
    let clone = |argv: Vec<String>| {
        run_command(
            s,
            caller,
            guard.id(),
            "fetch",
            argv,
            Some("/".into()),
            env.clone(),
            None,
            CLONE_TIMEOUT,
            progress,
        )
    };
    let mut outcome = clone(argv).await?;
    if !outcome.ok() && outcome.tail.contains(NO_SHALLOW) {
        // A static (dumb HTTP) git server: the whole branch then (git removed what it made).
        let note = "[openrun: this server speaks git's dumb HTTP protocol, which cannot clone \
                    shallow: cloning the whole branch]\n";
        progress
            .send(super::UpEvent::Output {
                step: "fetch".into(),
                stream: "stderr",
                data_b64: base64::engine::general_purpose::STANDARD.encode(note),
            })
            .await;
        outcome = clone(git.full_clone_argv()).await?;
    }
    *exit_code = Some(outcome.exit_code);
    if !outcome.ok() {
        let mut e = UpError::new(
            "fetch_failed",
            format!("cannot clone {}: {}", git.url, git_said(&outcome.tail)),
        );
        e.command = Some(command.to_string());
        guard.remove().await;
        return Err(e);
    }
    let limit = super::routes::MAX_TAR;
    let archived =
        crate::archive::archive_to_file(s, caller, guard.id(), CLONE_DIR, dest, Some(limit)).await;
    guard.remove().await;
    match archived {
        Ok(_) => Ok(()),
        Err(ApiError::TooLarge { .. }) => Err(too_large_clone(&git.url, limit)),
        Err(e) => Err(e.into()),
    }
}

/// The error of a clone whose tree is larger as a tar than an upload may be.
fn too_large_clone(url: &str, limit: u64) -> UpError {
    UpError::new(
        "fetch_failed",
        format!(
            "cannot use {url}: its tree is larger than {} MiB as a tar, the limit of a \
             repository (the same as an upload's)",
            limit >> 20
        ),
    )
}

/// The last lines git wrote, without its `Cloning into` banner.
fn git_said(tail: &str) -> String {
    let lines: Vec<&str> = tail
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty() && !l.starts_with("Cloning into "))
        .collect();
    if lines.is_empty() {
        return "git failed without saying why".into();
    }
    lines[lines.len().saturating_sub(6)..].join("\n")
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_too_large_clone_is_fetch_failed_saying_why() {
        let e = too_large_clone("https://example.com/r.git", 256 << 20);
        assert_eq!(e.code, "fetch_failed");
        assert!(
            e.message.contains("https://example.com/r.git") && e.message.contains("256 MiB"),
            "{}",
            e.message
        );
    }

    use super::*;

    fn ok(url: &str) -> GitSource {
        parse_git_url(url, None).unwrap_or_else(|e| panic!("{url}: {e}"))
    }

    fn refused(url: &str) -> String {
        match parse_git_url(url, None) {
            Ok(g) => panic!("{url} accepted: {g:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn https_and_http_urls_are_accepted() {
        let g = ok("https://github.com/rust-lang/regex.git");
        assert_eq!((g.host.as_str(), g.name.as_str()), ("github.com", "regex"));
        assert_eq!(g.allow_entry(), "github.com");
        let g = ok("http://127.0.0.1:8080/repos/app/");
        assert_eq!((g.host.as_str(), g.name.as_str()), ("127.0.0.1", "app"));
        assert_eq!(g.allow_entry(), "127.0.0.1/32");
        let g = ok("HTTP://[::1]:9000/x/y.git?foo=bar#frag");
        assert_eq!((g.host.as_str(), g.name.as_str()), ("::1", "y"));
        assert_eq!(g.allow_entry(), "::1/128");
        let g = ok("https://Git.Example.COM/a/b-c_d.e");
        assert_eq!(
            (g.host.as_str(), g.name.as_str()),
            ("git.example.com", "b-c_d.e")
        );
    }

    #[test]
    fn other_forms_are_refused_with_why() {
        assert!(refused("file:///etc").contains("file://"));
        assert!(refused("/srv/repo").contains("path on the server"));
        assert!(refused("./repo").contains("path on the server"));
        assert!(refused("git@github.com:a/b.git").contains("ssh address"));
        assert!(refused("ssh://git@github.com/a/b").contains("ssh is not supported"));
        assert!(refused("git://example.com/a").contains("git://"));
        assert!(refused("ftp://example.com/a").contains("scheme"));
        assert!(refused("https://user:pw@example.com/a").contains("credentials"));
        assert!(refused("https://token@example.com/a").contains("credentials"));
        assert!(refused("https://example.com").contains("no repository"));
        assert!(refused("https://example.com/").contains("no repository"));
        assert!(refused("https://example.com/..").contains("repository name"));
        assert!(refused("https://exa mple.com/a").contains("spaces"));
        assert!(refused("https://ex_ample.com/a").contains("host"));
        assert!(refused("https://example.com:0/a").contains("port"));
        assert!(refused("https://example.com:99999/a").contains("port"));
        assert!(refused("https://999.1.1.1/a").contains("IP"));
        assert!(refused("https:///a").contains("no host"));
        assert!(refused("example.com/a").contains("no scheme"));
        assert!(refused("").contains("empty"));
    }

    #[test]
    fn refs_must_be_plausible() {
        let url = "https://example.com/a.git";
        for good in ["main", "v1.2.3", "release/2024-01", "feature_x"] {
            let g = parse_git_url(url, Some(good)).unwrap();
            assert_eq!(g.reference.as_deref(), Some(good));
        }
        for bad in [
            "",
            "-b",
            "--upload-pack=x",
            "a..b",
            "a b",
            "a:b",
            "a~1",
            "x^",
            "a/",
            "a.lock",
            ".a",
            "a//b",
            "@",
            "a@{1}",
            "a\\b",
            "a*",
            "a\nb",
        ] {
            assert!(parse_git_url(url, Some(bad)).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn the_clone_puts_the_url_after_double_dash() {
        let g = parse_git_url("https://example.com/a.git", Some("v1")).unwrap();
        let argv = g.clone_argv();
        let dash = argv.iter().position(|a| a == "--").unwrap();
        assert_eq!(&argv[dash + 1..], ["https://example.com/a.git", "/src"]);
        assert!(argv.windows(2).any(|w| w == ["--branch", "v1"]));
        let full = g.full_clone_argv();
        assert!(!full.iter().any(|a| a == "--depth"));
        assert!(full.iter().any(|a| a == "--single-branch"));
        assert!(full.windows(2).any(|w| w == ["--branch", "v1"]));
        assert_eq!(full.last().map(String::as_str), Some("/src"));
    }
}
