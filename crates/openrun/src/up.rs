//! `openrun up PATH|GIT_URL`: a repository opened in a sandbox ready to work in, through the
//! server's `POST /v1/up` (see docs/up.md for the wire format).
//!
//! - A directory: its plan is made here first ([`openrun_recipe::plan_for`] on a
//!   [`DirTree`]), so a directory that is not a project, or whose configuration is invalid,
//!   fails without a server. Then the tree goes to the server as one tar streamed as the
//!   request body ([`list_tree`], [`write_tar`]): `.gitignore`d files left out (the `ignore`
//!   crate, ripgrep's rules: nested `.gitignore` and `.git/info/exclude`, with or without a
//!   repository, none from outside the directory, not the user's global one), hidden files
//!   and `.git` kept, symlinks kept as links when their target stays inside the directory and
//!   skipped with a warning otherwise (never followed), devices, fifos and sockets skipped;
//!   sorted, so the same tree makes the same tar; at most [`MAX_TAR`].
//! - An http(s) git URL: the server clones it.
//!
//! `--plan` prints the plan and stops (a directory's is computed here; a URL's by the server,
//! which clones it). Otherwise the server's NDJSON progress goes to stderr (plan, steps, their
//! output) and the result to stdout: the sandbox id on the first line, then how to attach,
//! the workspace, ports, the recipe, the check. The server is chosen like `openrun mcp`'s
//! ([`local_server::choose`]); one started for `up` keeps running (the result's attach line,
//! `openrun --server URL shell ID`, needs it).
//!
//! Exit codes: 0 ready; [`FAILED`] a setup step or the check failed (the repository's
//! commands); [`ERROR_EXIT_CODE`] openrun could not do it (bad arguments, no recognizable
//! project, invalid configuration, a failed clone, a refusal of the server); [`INTERRUPTED`]
//! on Ctrl-C or SIGTERM, which closes the request (the server removes what it made unless
//! `--keep`).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine;
use openrun_recipe::tree::DirTree;
use openrun_recipe::{Plan, PlanError};
use reqwest::header::CONTENT_TYPE;
use reqwest::{Method, Url};
use serde_json::{json, Value};
use tokio::signal::unix::{signal, SignalKind};

use crate::cli::{describe_error, UpArgs, ERROR_EXIT_CODE};
use crate::local_server::{self, Starting};
use crate::remote::http::{ApiError, Client};

/// Exit code of a failed setup step or check.
pub const FAILED: i32 = 1;
/// Exit code after Ctrl-C (128 + SIGINT).
pub const INTERRUPTED: i32 = 130;
/// Largest tar sent (the server's limit).
pub const MAX_TAR: u64 = 256 << 20;
/// Size of the chunks the tar is sent in.
const CHUNK: usize = 256 << 10;
/// Error codes of a failure of the repository's own commands ([`FAILED`]).
const SETUP_FAILURES: [&str; 3] = ["step_failed", "packages_failed", "base_failed"];

/// Runs `openrun up`; returns the exit code. Errors are said on stderr as `openrun up: ...`
/// (with `--json`, also as an error object on stdout).
pub fn run(
    data_dir: &Path,
    server: Option<String>,
    api_key: Option<String>,
    args: UpArgs,
) -> Result<i32> {
    let rt = crate::session::tokio_runtime()?;
    let json = args.json;
    let result = rt.block_on(up(data_dir, server, api_key, args));
    // A blocking tar writer may still be parked on its channel: do not wait for it.
    rt.shutdown_background();
    Ok(result.unwrap_or_else(|e| {
        report_error(
            json,
            &json!({"type": "error", "code": "openrun_error", "message": describe_error(&e)}),
            "openrun",
        );
        ERROR_EXIT_CODE
    }))
}

/// What `openrun up` opens.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    /// A directory on this machine (canonical).
    Dir(PathBuf),
    /// An http(s) git URL.
    Git(Url),
}

/// Tells a directory from a git URL; refuses git URLs that are not http(s).
fn parse_source(text: &str) -> Result<Source> {
    let lower = text.to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        let url = Url::parse(text).with_context(|| format!("invalid git URL {text:?}"))?;
        if url.host_str().is_none_or(str::is_empty) {
            bail!("invalid git URL {text:?}: no host");
        }
        return Ok(Source::Git(url));
    }
    let path = Path::new(text);
    let scp_like = {
        // user@host:path, as git reads it (a `:` before any `/`).
        let colon = text.find(':');
        let slash = text.find('/');
        colon.is_some_and(|c| slash.is_none_or(|s| c < s)) && !path.exists()
    };
    if lower.contains("://") || scp_like {
        bail!(
            "{text}: only http(s) git URLs are supported (e.g. https://github.com/OWNER/REPO); \
             for ssh, clone it here and run `openrun up DIR`"
        );
    }
    let meta = std::fs::metadata(path).with_context(|| format!("cannot open {text}"))?;
    if !meta.is_dir() {
        bail!(
            "{text} is not a directory (openrun up takes a repository's directory or an \
             http(s) git URL)"
        );
    }
    let dir = path
        .canonicalize()
        .with_context(|| format!("cannot resolve {text}"))?;
    Ok(Source::Dir(dir))
}

/// The repository's default name: the directory's, or the URL's last path part without `.git`.
fn default_name(source: &Source) -> String {
    let name = match source {
        Source::Dir(dir) => dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        Source::Git(url) => url
            .path_segments()
            .and_then(|mut s| s.rfind(|p| !p.is_empty()))
            .map(|s| s.strip_suffix(".git").unwrap_or(s).to_string())
            .unwrap_or_default(),
    };
    usable_name(&name)
}

/// `name` as the server takes repository names: 1 to 100 of `A-Za-z0-9._-`, not starting
/// with `.` (others become `-`; `repo` when nothing is left).
fn usable_name(name: &str) -> String {
    let mapped: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed: String = mapped.trim_start_matches('.').chars().take(100).collect();
    if trimmed.is_empty() {
        "repo".into()
    } else {
        trimmed
    }
}

async fn up(
    data_dir: &Path,
    server: Option<String>,
    api_key: Option<String>,
    args: UpArgs,
) -> Result<i32> {
    let source = parse_source(&args.source)?;
    let name = args.name.clone().unwrap_or_else(|| default_name(&source));
    match &source {
        Source::Dir(dir) => {
            if args.git_ref.is_some() {
                bail!("--ref is for git URLs: {} is a directory", dir.display());
            }
            let listing = list_tree(dir)?;
            for warning in &listing.warnings {
                eprintln!("openrun up: warning: {warning}");
            }
            // Planned here first, over exactly what is sent (the server plans the same
            // files): what is not a project fails without a server.
            let tree = DirTree::open(dir)
                .map_err(|e| anyhow!(e))
                .with_context(|| format!("cannot read {}", dir.display()))?;
            let tree = ListedTree::new(tree, &listing);
            let plan = match openrun_recipe::plan_for(&tree, &name) {
                Ok(plan) => plan,
                Err(e) => {
                    report_error(args.json, &plan_error(&e), "openrun");
                    return Ok(ERROR_EXIT_CODE);
                }
            };
            if args.plan {
                print_plan(&plan, args.json)?;
                return Ok(0);
            }
            if listing.tar_size > MAX_TAR {
                bail!("{}", too_large(dir, &listing));
            }
            let (server, local) = choose(data_dir, server, api_key).await?;
            let count = listing.entries.len();
            eprintln!(
                "==> send: {} ({count} {}, {})",
                dir.display(),
                if count == 1 { "entry" } else { "entries" },
                mebibytes(listing.tar_size)
            );
            let code = send_dir(&server, &args, dir, &name, listing).await;
            local.finish(data_dir);
            code
        }
        Source::Git(url) => {
            let (server, local) = choose(data_dir, server, api_key).await?;
            let code = send_git(&server, &args, url, &name).await;
            local.finish(data_dir);
            code
        }
    }
}

/// The server `up` talks to.
struct Server {
    /// A client of it (with its key).
    client: Client,
    /// Its address.
    url: Url,
    /// How other verbs reach it: `openrun`, or `openrun --server URL` for the data dir's
    /// local server (which is not configured; the key comes from `local.json`).
    openrun: String,
}

/// The server ([`local_server::choose`]); one started for `up` is said on stderr.
async fn choose(
    data_dir: &Path,
    server: Option<String>,
    api_key: Option<String>,
) -> Result<(Server, local_server::LocalUse)> {
    let (target, local) =
        local_server::choose(data_dir, server, api_key, Starting::Detached).await?;
    let openrun = if local.is_local() {
        let url = target.url.as_str().trim_end_matches('/');
        format!("openrun --server {url}")
    } else {
        "openrun".to_string()
    };
    if let Some(started) = &local.started {
        let log = started
            .log
            .as_ref()
            .map(|l| format!(" (log: {})", l.display()))
            .unwrap_or_default();
        eprintln!(
            "openrun up: started a local openrun server at {}{log}; it keeps running (reach \
             it with `{openrun} ...`); stop it with: kill {}",
            started.url, started.pid
        );
    }
    let url = target.url.clone();
    // (Says on stderr when the key would cross the network unencrypted.)
    let client = Client::new(target)?;
    Ok((
        Server {
            client,
            url,
            openrun,
        },
        local,
    ))
}

/// A directory seen through its [`Listing`]: only what the tar holds (no `.gitignore`d
/// files, no links out of the tree), so a plan made here is the one the server makes.
struct ListedTree {
    dir: DirTree,
    /// Regular files, `/`-separated.
    files: std::collections::HashSet<String>,
    /// Directories, `/`-separated; each with its listed children's names, sorted.
    dirs: BTreeMap<String, Vec<String>>,
}

impl ListedTree {
    fn new(dir: DirTree, listing: &Listing) -> Self {
        let mut files = std::collections::HashSet::new();
        let mut dirs: BTreeMap<String, Vec<String>> = BTreeMap::new();
        dirs.insert(String::new(), Vec::new());
        for entry in &listing.entries {
            // A name that is not UTF-8 cannot be a manifest; the server refuses the tar.
            let Some(path) = entry.path.to_str() else {
                continue;
            };
            let path = path.replace(std::path::MAIN_SEPARATOR, "/");
            let (parent, name) = path.rsplit_once('/').unwrap_or(("", &path));
            dirs.entry(parent.to_string())
                .or_default()
                .push(name.to_string());
            match entry.kind {
                EntryKind::Dir => {
                    dirs.entry(path.clone()).or_default();
                }
                EntryKind::File(_) => {
                    files.insert(path.clone());
                }
                EntryKind::Symlink(_) => {}
            }
        }
        for names in dirs.values_mut() {
            names.sort();
            names.dedup();
        }
        ListedTree { dir, files, dirs }
    }

    /// `path` as the listing keys it (no `.`, empty or trailing components).
    fn key(path: &str) -> String {
        path.split('/')
            .filter(|part| !part.is_empty() && *part != ".")
            .collect::<Vec<_>>()
            .join("/")
    }
}

impl openrun_recipe::tree::RepoTree for ListedTree {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, openrun_recipe::error::TreeError> {
        if !self.is_file(path) {
            return Ok(None);
        }
        self.dir.read(path)
    }

    fn is_file(&self, path: &str) -> bool {
        self.files.contains(&ListedTree::key(path)) && self.dir.is_file(path)
    }

    fn is_dir(&self, path: &str) -> bool {
        self.dirs.contains_key(&ListedTree::key(path))
    }

    fn list(&self, path: &str) -> Vec<String> {
        self.dirs
            .get(&ListedTree::key(path))
            .cloned()
            .unwrap_or_default()
    }
}

/// The error object of a plan that could not be made (as the server's error line).
fn plan_error(e: &PlanError) -> Value {
    let mut error = json!({"type": "error", "code": e.code(), "message": e.to_string()});
    if let Some(file) = e.file() {
        error["file"] = json!(file);
    }
    error
}

/// `--plan`'s output: the rendering, or the plan's JSON.
fn print_plan(plan: &Plan, json: bool) -> Result<()> {
    let text = if json {
        format!("{}\n", serde_json::to_string_pretty(plan)?)
    } else {
        plan.render()
    };
    crate::output::print(&text);
    Ok(())
}

/// `local:<hostname>:<path>`: who the repository is, part of its recipe's key.
fn repo_identity(dir: &Path) -> String {
    let uname = rustix::system::uname();
    let host = uname.nodename().to_string_lossy();
    format!("local:{host}:{}", dir.display())
}

/// A duration as the API writes them (whole milliseconds, at least 1).
fn duration(d: std::time::Duration) -> String {
    format!("{}ms", d.as_millis().max(1))
}

/// `POST /v1/up` with the directory's tar.
async fn send_dir(
    server: &Server,
    args: &UpArgs,
    dir: &Path,
    name: &str,
    listing: Listing,
) -> Result<i32> {
    let mut query: Vec<(&str, String)> = vec![("name", name.into()), ("repo", repo_identity(dir))];
    if let Some(check) = &args.check {
        query.push(("check", check.clone()));
    }
    if args.no_check {
        query.push(("no_check", "true".into()));
    }
    if args.keep {
        query.push(("keep", "true".into()));
    }
    if let Some(ttl) = args.ttl {
        query.push(("ttl", duration(ttl)));
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(4);
    let root = dir.to_path_buf();
    // Why the tar could not be made, if it could not.
    let failure = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
    let failed = failure.clone();
    // Not joined: it ends when the tar is written or the request is gone.
    std::thread::spawn(move || {
        let sender = ChannelWriter { tx: tx.clone() };
        let out = std::io::BufWriter::with_capacity(CHUNK, sender);
        if let Err(e) = write_tar(&root, &listing.entries, out) {
            let text = describe_error(&e);
            *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(text.clone());
            // The body ends with an error: the request is cut off, not sent short.
            let _ = tx.blocking_send(Err(std::io::Error::other(text)));
        }
    });
    let body = reqwest::Body::wrap_stream(futures_util::stream::unfold(rx, |mut rx| async {
        rx.recv().await.map(|chunk| (chunk, rx))
    }));
    let request = server
        .client
        .request(Method::POST, "/v1/up")?
        .query(&query)
        .header(CONTENT_TYPE, "application/x-tar")
        .body(body);
    let code = stream(server, request, args).await;
    let failure = failure.lock().unwrap_or_else(|p| p.into_inner()).take();
    match failure {
        // The tar could not be made: that, rather than the cut-off request, is the error.
        Some(why) if code.as_ref().map_or(true, |c| *c != 0) => {
            bail!("cannot send {}: {why}", dir.display())
        }
        _ => code,
    }
}

/// `POST /v1/up` with a git URL.
async fn send_git(server: &Server, args: &UpArgs, url: &Url, name: &str) -> Result<i32> {
    let body = json!({
        "git": url.as_str(),
        "ref": args.git_ref,
        "check": args.check,
        "no_check": args.no_check,
        "plan_only": args.plan,
        "keep": args.keep,
        "ttl": args.ttl.map(duration),
        "name": name,
    });
    let request = server.client.request(Method::POST, "/v1/up")?.json(&body);
    stream(server, request, args).await
}

/// Sends the request (with the key) and follows its NDJSON answer to the end; Ctrl-C or
/// SIGTERM close it.
async fn stream(server: &Server, request: reqwest::RequestBuilder, args: &UpArgs) -> Result<i32> {
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let follow = follow(server, request, args);
    tokio::select! {
        code = follow => code,
        _ = interrupt.recv() => Ok(interrupted(args.keep)),
        _ = terminate.recv() => Ok(interrupted(args.keep)),
    }
}

/// Says that the request was closed; the exit code.
fn interrupted(keep: bool) -> i32 {
    let what = if keep {
        "the request is closed (--keep: what the server made so far may be kept)"
    } else {
        "the request is closed; the server removes what it made"
    };
    eprintln!("\nopenrun up: interrupted: {what}");
    INTERRUPTED
}

/// [`stream`] without the signals.
async fn follow(server: &Server, request: reqwest::RequestBuilder, args: &UpArgs) -> Result<i32> {
    let mut lines = match server.client.lines(request).await {
        Ok(lines) => lines,
        Err(e) => match e.downcast_ref::<ApiError>() {
            // A refusal before any progress (a bad name, a tar too large, no such route).
            Some(refused) => {
                let error = refusal(refused);
                report_error(args.json, &error, &server.openrun);
                return Ok(exit_code_of(&error));
            }
            None => return Err(e),
        },
    };
    let mut view = Progress::new(args.json, args.plan, server.url.clone(), &server.openrun);
    while let Some(line) = lines.next_text().await? {
        let event: Value = serde_json::from_str(&line).with_context(|| {
            format!(
                "the server sent a line that is not JSON: {}",
                truncate(&line, 200)
            )
        })?;
        if let Some(code) = view.event(&event)? {
            return Ok(code);
        }
    }
    bail!("the server's answer ended without a result")
}

/// The error object of a refusal of the server (as an error line; "no such endpoint" says
/// what it means here).
fn refusal(refused: &ApiError) -> Value {
    let mut message = refused.message.clone();
    if message == "no such endpoint" {
        message.push_str(": this server does not know POST /v1/up (older than this CLI?)");
    }
    json!({"type": "error", "code": refused.code, "message": message})
}

/// `text`, at most `n` characters.
fn truncate(text: &str, n: usize) -> String {
    text.chars().take(n).collect()
}

/// What the progress lines show, and where.
struct Progress {
    json: bool,
    plan_only: bool,
    server: Url,
    /// How other verbs reach the server (see [`Server::openrun`]).
    openrun: String,
    /// Whether the last byte written to stderr ended a line.
    at_line_start: bool,
}

impl Progress {
    fn new(json: bool, plan_only: bool, server: Url, openrun: &str) -> Self {
        Progress {
            json,
            plan_only,
            server,
            openrun: openrun.to_string(),
            at_line_start: true,
        }
    }

    /// A line on stderr, on a line of its own.
    fn say(&mut self, text: &str) {
        let mut err = std::io::stderr().lock();
        let lead = if self.at_line_start { "" } else { "\n" };
        let _ = writeln!(err, "{lead}{text}");
        let _ = err.flush();
        self.at_line_start = true;
    }

    /// Handles one NDJSON line; `Some(exit code)` at the end.
    fn event(&mut self, event: &Value) -> Result<Option<i32>> {
        match event["type"].as_str().unwrap_or("") {
            "plan" => {
                let plan: Plan = serde_json::from_value(event["plan"].clone())
                    .context("the server sent a plan this CLI cannot read")?;
                if self.plan_only {
                    print_plan(&plan, self.json)?;
                } else if !self.json {
                    let text = plan.render();
                    self.say(text.trim_end());
                }
            }
            "step" => {
                let line = step_line(event);
                self.say(&line);
            }
            "output" => {
                let data = event["data_b64"].as_str().unwrap_or("");
                if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(data) {
                    if let Some(last) = bytes.last() {
                        self.at_line_start = *last == b'\n';
                        crate::session::write_out(&mut std::io::stderr(), &bytes);
                    }
                }
            }
            "result" => {
                let result = &event["result"];
                if self.plan_only {
                    return Ok(Some(0));
                }
                if self.json {
                    crate::output::print(&format!("{}\n", serde_json::to_string_pretty(result)?));
                } else {
                    if !self.at_line_start {
                        self.say("");
                    }
                    crate::output::print(&result_text(result, &self.server, &self.openrun));
                }
                let failed = result["check"]["passed"] == json!(false);
                return Ok(Some(if failed { FAILED } else { 0 }));
            }
            "error" => {
                if !self.at_line_start {
                    self.say("");
                }
                report_error(self.json, event, &self.openrun);
                return Ok(Some(exit_code_of(event)));
            }
            other => tracing::debug!(kind = other, "an up event this CLI does not know"),
        }
        Ok(None)
    }
}

/// `==> NAME: COMMAND` when a step starts, `==> NAME ok (12.3 s)` when it ends.
fn step_line(event: &Value) -> String {
    let step = event["step"].as_str().unwrap_or("?");
    let took = event["duration_ms"]
        .as_u64()
        .map(seconds)
        .unwrap_or_default();
    match event["status"].as_str().unwrap_or("") {
        "running" => match event["command"].as_str() {
            Some(command) => format!("==> {step}: {command}"),
            None => format!("==> {step}"),
        },
        "ok" => format!("==> {step} ok{}", paren(&took)),
        "cached" => format!("==> {step} cached"),
        "failed" => {
            let exit = event["exit_code"]
                .as_i64()
                .map(|c| format!("exit {c}"))
                .unwrap_or_default();
            let detail: Vec<&str> = [exit.as_str(), took.as_str()]
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect();
            format!("==> {step} failed{}", paren(&detail.join(", ")))
        }
        "rolled_back" => format!("==> {step} rolled back"),
        other => format!("==> {step} {other}"),
    }
}

/// ` (text)`, or nothing for no text.
fn paren(text: &str) -> String {
    if text.is_empty() {
        String::new()
    } else {
        format!(" ({text})")
    }
}

/// Bytes as `4.5 MiB`.
fn mebibytes(bytes: u64) -> String {
    format!(
        "{}.{} MiB",
        bytes >> 20,
        ((bytes & ((1 << 20) - 1)) * 10) >> 20
    )
}

/// Milliseconds as `12.3 s`.
fn seconds(ms: u64) -> String {
    format!("{}.{} s", ms / 1000, (ms % 1000) / 100)
}

/// The result for a reader: the sandbox id on the first line, then one `what: value` a line.
fn result_text(result: &Value, server: &Url, openrun: &str) -> String {
    let id = result["sandbox_id"].as_str().unwrap_or("");
    let mut out = format!("{id}\n");
    let mut line =
        |key: &str, value: String| out.push_str(&format!("{:<10} {value}\n", format!("{key}:")));
    let attach = match result["attach"].as_str() {
        Some(attach) => match attach.strip_prefix("openrun ") {
            Some(rest) => format!("{openrun} {rest}"),
            None => attach.to_string(),
        },
        None => format!("{openrun} shell {id}"),
    };
    line("attach", attach);
    if let Some(workspace) = result["workspace"].as_str() {
        line("workspace", workspace.to_string());
    }
    for port in result["ports"].as_array().into_iter().flatten() {
        let number = port["port"].as_u64().unwrap_or(0);
        let preview = port["preview"]
            .as_str()
            .and_then(|p| server.join(p).ok())
            .map(|u| format!(" {u}"))
            .unwrap_or_default();
        line("port", format!("{number}{preview}"));
    }
    let cached = result["cached"].as_bool().unwrap_or(false);
    if let Some(path) = result["recipe"]["path"].as_str() {
        let how = if cached { "reused" } else { "new" };
        line("recipe", format!("{path} ({how})"));
    }
    match result.get("check").filter(|c| !c.is_null()) {
        Some(check) => {
            let command = check["command"].as_str().unwrap_or("");
            let took = check["duration_ms"]
                .as_u64()
                .map(seconds)
                .unwrap_or_default();
            let verdict = if check["passed"].as_bool().unwrap_or(false) {
                format!("passed{}", paren(&took))
            } else {
                let exit = check["exit_code"]
                    .as_i64()
                    .map(|c| format!("exit {c}"))
                    .unwrap_or_else(|| "no exit code".into());
                format!(
                    "FAILED ({exit}{})",
                    if took.is_empty() {
                        String::new()
                    } else {
                        format!(", {took}")
                    }
                )
            };
            line("check", format!("{command}: {verdict}"));
        }
        None => line("check", "none".into()),
    }
    let timings = &result["timings"];
    let mut parts = Vec::new();
    if let Some(ms) = timings["ready_ms"].as_u64() {
        let how = if cached {
            "from the recipe"
        } else {
            "first open"
        };
        parts.push(format!("ready in {} ({how})", seconds(ms)));
    }
    for (key, name) in [
        ("setup_ms", "setup"),
        ("check_ms", "check"),
        ("total_ms", "total"),
    ] {
        if let Some(ms) = timings[key].as_u64() {
            parts.push(format!("{name} {}", seconds(ms)));
        }
    }
    if !parts.is_empty() {
        line("time", parts.join(", "));
    }
    out
}

/// Says an error line on stderr (`openrun up: MESSAGE`, then step, file, command, kept
/// sandbox), and with `--json` prints it on stdout too.
fn report_error(json: bool, error: &Value, openrun: &str) {
    let message = error["message"].as_str().unwrap_or("failed");
    let code = error["code"].as_str().unwrap_or("");
    let mut text = format!("openrun up: {message}");
    if !code.is_empty() && code != "openrun_error" && !message.contains(&format!("({code})")) {
        text.push_str(&format!(" ({code})"));
    }
    for (key, name) in [
        ("step", "step"),
        ("file", "file"),
        ("command", "command"),
        ("sandbox_id", "kept sandbox"),
    ] {
        if let Some(value) = error[key].as_str() {
            text.push_str(&format!("\n  {name}: {value}"));
        }
    }
    if let Some(id) = error["sandbox_id"].as_str() {
        text.push_str(&format!("\n  look into it: {openrun} shell {id}"));
    }
    eprintln!("{text}");
    if json {
        let shown = serde_json::to_string_pretty(error).unwrap_or_else(|_| error.to_string());
        crate::output::print(&format!("{shown}\n"));
    }
}

/// [`FAILED`] for a failure of the repository's commands, else [`ERROR_EXIT_CODE`].
fn exit_code_of(error: &Value) -> i32 {
    let code = error["code"].as_str().unwrap_or("");
    if SETUP_FAILURES.contains(&code) {
        FAILED
    } else {
        ERROR_EXIT_CODE
    }
}

/// One entry of the tar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Relative to the directory.
    pub path: PathBuf,
    /// What it is.
    pub kind: EntryKind,
    /// Permission bits (no setuid, setgid or sticky bit).
    pub mode: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: u64,
}

/// What an [`Entry`] is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A directory.
    Dir,
    /// A regular file of this size.
    File(u64),
    /// A symlink to this target (inside the tree).
    Symlink(PathBuf),
}

/// What [`list_tree`] found.
#[derive(Debug, Default)]
pub struct Listing {
    /// The entries, in tar order (sorted by name, depth first).
    pub entries: Vec<Entry>,
    /// What was left out and why (links out of the tree, special files, unreadable ones).
    pub warnings: Vec<String>,
    /// The size of the tar [`write_tar`] makes of it.
    pub tar_size: u64,
}

/// The entries of the tree at `root` (see the module documentation).
pub fn list_tree(root: &Path) -> Result<Listing> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let walker = ignore::WalkBuilder::new(root)
        .standard_filters(false)
        .hidden(false)
        .parents(false)
        .ignore(false)
        .git_ignore(true)
        .git_exclude(true)
        .git_global(false)
        .require_git(false)
        .follow_links(false)
        .sort_by_file_name(|a, b| a.cmp(b))
        .build();
    let mut listing = Listing {
        tar_size: 1024,
        ..Listing::default()
    };
    for item in walker {
        let entry = match item {
            Ok(entry) => entry,
            Err(e) => {
                listing.warnings.push(format!("skipped: {e}"));
                continue;
            }
        };
        if entry.depth() == 0 {
            continue;
        }
        let path = entry.path();
        let Ok(rel) = path.strip_prefix(root) else {
            continue;
        };
        let rel = rel.to_path_buf();
        let meta = match std::fs::symlink_metadata(path) {
            Ok(meta) => meta,
            Err(e) => {
                listing
                    .warnings
                    .push(format!("skipped {}: {e}", rel.display()));
                continue;
            }
        };
        let file_type = meta.file_type();
        let kind = if file_type.is_dir() {
            EntryKind::Dir
        } else if file_type.is_file() {
            EntryKind::File(meta.len())
        } else if file_type.is_symlink() {
            let target = match std::fs::read_link(path) {
                Ok(target) => target,
                Err(e) => {
                    listing
                        .warnings
                        .push(format!("skipped {}: {e}", rel.display()));
                    continue;
                }
            };
            if !stays_inside(&rel, &target) {
                listing.warnings.push(format!(
                    "skipped the symlink {} -> {}: it leads out of the directory",
                    rel.display(),
                    target.display()
                ));
                continue;
            }
            EntryKind::Symlink(target)
        } else {
            let what = if file_type.is_fifo() {
                "a fifo"
            } else if file_type.is_socket() {
                "a socket"
            } else if file_type.is_block_device() || file_type.is_char_device() {
                "a device"
            } else {
                "not a file, directory or symlink"
            };
            listing
                .warnings
                .push(format!("skipped {}: {what}", rel.display()));
            continue;
        };
        let entry = Entry {
            path: rel,
            kind,
            mode: meta.mode() & 0o777,
            mtime: u64::try_from(meta.mtime()).unwrap_or(0),
        };
        listing.tar_size += tar_size(&entry);
        listing.entries.push(entry);
    }
    Ok(listing)
}

/// `n` rounded up to whole 512-byte tar blocks.
fn blocks(n: u64) -> u64 {
    n.div_ceil(512) * 512
}

/// The bytes an entry takes in the tar: its header, GNU long-name records for a path or link
/// target over 100 bytes, its data.
fn tar_size(entry: &Entry) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let long = |len: usize| {
        if len > 100 {
            512 + blocks(len as u64 + 1)
        } else {
            0
        }
    };
    let mut size = 512 + long(entry.path.as_os_str().as_bytes().len());
    match &entry.kind {
        EntryKind::Dir => {}
        EntryKind::File(len) => size += blocks(*len),
        EntryKind::Symlink(target) => size += long(target.as_os_str().as_bytes().len()),
    }
    size
}

/// Whether a link at `link` (relative to the root) to `target` resolves, lexically from the
/// link's directory, to a path inside the root. Absolute targets never do.
fn stays_inside(link: &Path, target: &Path) -> bool {
    if target.as_os_str().is_empty() {
        return false;
    }
    let mut depth: usize = link
        .parent()
        .map(|p| {
            p.components()
                .filter(|c| matches!(c, Component::Normal(_)))
                .count()
        })
        .unwrap_or(0);
    for component in target.components() {
        match component {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => match depth.checked_sub(1) {
                Some(d) => depth = d,
                None => return false,
            },
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

/// Writes the tar of `entries` (from [`list_tree`] of `root`) to `out`. A file that changed
/// size since it was listed is sent at its listed size (cut, or padded with zeros; a warning
/// says so).
pub fn write_tar<W: Write>(root: &Path, entries: &[Entry], out: W) -> Result<()> {
    let mut tar = tar::Builder::new(out);
    for entry in entries {
        let mut header = tar::Header::new_gnu();
        header.set_mode(entry.mode);
        header.set_mtime(entry.mtime);
        header.set_uid(0);
        header.set_gid(0);
        let shown = entry.path.display();
        match &entry.kind {
            EntryKind::Dir => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_size(0);
                tar.append_data(&mut header, &entry.path, std::io::empty())
                    .with_context(|| format!("cannot add {shown}"))?;
            }
            EntryKind::File(size) => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_size(*size);
                let path = root.join(&entry.path);
                let file = open_no_follow(&path).with_context(|| format!("cannot read {shown}"))?;
                let mut data = Exactly::new(file, *size);
                tar.append_data(&mut header, &entry.path, &mut data)
                    .with_context(|| format!("cannot add {shown}"))?;
                if data.changed {
                    eprintln!(
                        "openrun up: warning: {shown} changed while it was sent (sent as \
                         {size} bytes)"
                    );
                }
            }
            EntryKind::Symlink(target) => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_size(0);
                tar.append_link(&mut header, &entry.path, target)
                    .with_context(|| format!("cannot add {shown}"))?;
            }
        }
    }
    tar.into_inner()
        .and_then(|mut out| out.flush())
        .context("cannot finish the tar")?;
    Ok(())
}

/// Opens a regular file without following a link put in its place since it was listed.
fn open_no_follow(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
}

/// A reader of exactly `size` bytes of `inner`: cut if it has more, padded with zeros if it
/// has fewer (`changed` then says so).
struct Exactly<R> {
    inner: R,
    left: u64,
    changed: bool,
    /// The inner reader ended.
    ended: bool,
}

impl<R: Read> Exactly<R> {
    fn new(inner: R, size: u64) -> Self {
        Exactly {
            inner,
            left: size,
            changed: false,
            ended: false,
        }
    }
}

impl<R: Read> Read for Exactly<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            if !self.ended && !self.changed {
                // More than listed?
                let mut probe = [0u8; 1];
                if self.inner.read(&mut probe)? > 0 {
                    self.changed = true;
                }
                self.ended = true;
            }
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = if self.ended {
            0
        } else {
            self.inner.read(&mut buf[..want])?
        };
        let n = if n == 0 {
            self.ended = true;
            self.changed = true;
            buf[..want].fill(0);
            want
        } else {
            n
        };
        self.left -= n as u64;
        Ok(n)
    }
}

/// The message of a tree over [`MAX_TAR`], naming its largest parts.
fn too_large(dir: &Path, listing: &Listing) -> String {
    let mut by_top: BTreeMap<PathBuf, u64> = BTreeMap::new();
    for entry in &listing.entries {
        let top = entry
            .path
            .components()
            .next()
            .map(|c| PathBuf::from(c.as_os_str()))
            .unwrap_or_default();
        *by_top.entry(top).or_default() += tar_size(entry);
    }
    let mut tops: Vec<(PathBuf, u64)> = by_top.into_iter().collect();
    tops.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let largest: Vec<String> = tops
        .iter()
        .take(5)
        .map(|(path, size)| format!("{} ({} MiB)", path.display(), size >> 20))
        .collect();
    format!(
        "{} is {} MiB as a tar, over the {} MiB openrun up sends; the largest parts: {}. Leave \
         out what the sandbox does not need (build output, data) with .gitignore",
        dir.display(),
        listing.tar_size >> 20,
        MAX_TAR >> 20,
        largest.join(", ")
    )
}

/// A writer that sends what it is given as chunks on a channel (the request body).
struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<std::io::Result<Vec<u8>>>,
}

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tx.blocking_send(Ok(buf.to_vec())).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the request was closed")
        })?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(listing: &Listing) -> Vec<String> {
        listing
            .entries
            .iter()
            .map(|e| e.path.display().to_string())
            .collect()
    }

    fn tar_of(root: &Path) -> (Listing, Vec<u8>) {
        let listing = list_tree(root).unwrap();
        let mut out = Vec::new();
        write_tar(root, &listing.entries, &mut out).unwrap();
        (listing, out)
    }

    #[test]
    fn gitignore_is_respected_and_git_and_hidden_files_kept() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join(".git/objects")).unwrap();
        std::fs::write(root.join(".git/HEAD"), "ref: refs/heads/main\n").unwrap();
        std::fs::write(root.join(".git/info"), "").unwrap();
        std::fs::write(root.join(".gitignore"), "target/\n*.log\n").unwrap();
        std::fs::write(root.join(".env.example"), "A=1\n").unwrap();
        std::fs::create_dir_all(root.join("target/debug")).unwrap();
        std::fs::write(root.join("target/debug/big"), "x").unwrap();
        std::fs::write(root.join("run.log"), "x").unwrap();
        std::fs::create_dir_all(root.join("src/gen")).unwrap();
        std::fs::write(root.join("src/main.rs"), "fn main() {}\n").unwrap();
        std::fs::write(root.join("src/.gitignore"), "gen/\n").unwrap();
        std::fs::write(root.join("src/gen/out.rs"), "").unwrap();
        let (listing, tar) = tar_of(root);
        assert_eq!(
            names(&listing),
            [
                ".env.example",
                ".git",
                ".git/HEAD",
                ".git/info",
                ".git/objects",
                ".gitignore",
                "src",
                "src/.gitignore",
                "src/main.rs"
            ]
        );
        assert!(listing.warnings.is_empty(), "{:?}", listing.warnings);
        assert_eq!(tar.len() as u64, listing.tar_size);
        // The same tree makes the same tar.
        assert_eq!(tar_of(root).1, tar);
        let mut archive = tar::Archive::new(&tar[..]);
        let mut found = BTreeMap::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let mut text = String::new();
            entry.read_to_string(&mut text).unwrap();
            found.insert(entry.path().unwrap().display().to_string(), text);
        }
        assert_eq!(found["src/main.rs"], "fn main() {}\n");
        assert_eq!(found[".git/HEAD"], "ref: refs/heads/main\n");
    }

    #[test]
    fn no_gitignore_from_outside_the_tree() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(".gitignore"), "*\n").unwrap();
        std::fs::create_dir(dir.path().join("repo")).unwrap();
        std::fs::write(dir.path().join("repo/a.txt"), "a").unwrap();
        let listing = list_tree(&dir.path().join("repo")).unwrap();
        assert_eq!(names(&listing), ["a.txt"]);
    }

    #[test]
    fn links_inside_are_kept_links_out_skipped_special_files_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("sub")).unwrap();
        std::fs::write(root.join("a.txt"), "a").unwrap();
        std::os::unix::fs::symlink("../a.txt", root.join("sub/up")).unwrap();
        std::os::unix::fs::symlink("sub", root.join("dirlink")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../etc", root.join("sub/escape")).unwrap();
        std::os::unix::fs::symlink("nowhere", root.join("dangling")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            root.join("fifo"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        let (listing, tar) = tar_of(root);
        assert_eq!(
            names(&listing),
            ["a.txt", "dangling", "dirlink", "sub", "sub/up"]
        );
        let warnings = listing.warnings.join("\n");
        assert!(warnings.contains("abs -> /etc/passwd"), "{warnings}");
        assert!(warnings.contains("sub/escape -> ../../etc"), "{warnings}");
        assert!(warnings.contains("fifo: a fifo"), "{warnings}");
        assert_eq!(tar.len() as u64, listing.tar_size);
        let mut archive = tar::Archive::new(&tar[..]);
        let links: Vec<(String, String)> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.header().entry_type() == tar::EntryType::Symlink)
            .map(|e| {
                (
                    e.path().unwrap().display().to_string(),
                    e.link_name().unwrap().unwrap().display().to_string(),
                )
            })
            .collect();
        assert_eq!(
            links,
            [
                ("dangling".into(), "nowhere".into()),
                ("dirlink".into(), "sub".into()),
                ("sub/up".into(), "../a.txt".into())
            ]
        );
    }

    #[test]
    fn links_are_judged_lexically_from_their_directory() {
        assert!(stays_inside(Path::new("a/b/l"), Path::new("../../x")));
        assert!(!stays_inside(Path::new("a/b/l"), Path::new("../../../x")));
        assert!(stays_inside(Path::new("l"), Path::new("./x/../y")));
        assert!(!stays_inside(Path::new("l"), Path::new("x/../../y")));
        assert!(!stays_inside(Path::new("l"), Path::new("/abs")));
        assert!(!stays_inside(Path::new("l"), Path::new("")));
    }

    #[test]
    fn long_names_are_sized_right() {
        let dir = tempfile::tempdir().unwrap();
        let long = "d".repeat(90);
        let deep = dir.path().join(&long).join(&long);
        std::fs::create_dir_all(&deep).unwrap();
        std::fs::write(deep.join("f".repeat(120)), vec![7u8; 1000]).unwrap();
        std::os::unix::fs::symlink(format!("{}/{}", ".", "x".repeat(150)), deep.join("l")).unwrap();
        let (listing, tar) = tar_of(dir.path());
        assert_eq!(tar.len() as u64, listing.tar_size);
    }

    #[test]
    fn a_file_that_shrank_is_padded_and_one_that_grew_cut() {
        let mut short = Exactly::new(&b"abc"[..], 5);
        let mut out = Vec::new();
        short.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"abc\0\0");
        assert!(short.changed);
        let mut long = Exactly::new(&b"abcdef"[..], 4);
        let mut out = Vec::new();
        long.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"abcd");
        assert!(long.changed);
        let mut same = Exactly::new(&b"abcd"[..], 4);
        let mut out = Vec::new();
        same.read_to_end(&mut out).unwrap();
        assert!(!same.changed);
    }

    #[test]
    fn a_tree_over_the_limit_names_its_largest_parts() {
        let file = |path: &str, size: u64| Entry {
            path: PathBuf::from(path),
            kind: EntryKind::File(size),
            mode: 0o644,
            mtime: 0,
        };
        let entries = vec![
            file("data/a.bin", 200 << 20),
            file("data/b.bin", 100 << 20),
            file("target/x", 10 << 20),
            file("README", 10),
        ];
        let listing = Listing {
            tar_size: entries.iter().map(tar_size).sum::<u64>() + 1024,
            entries,
            warnings: Vec::new(),
        };
        assert!(listing.tar_size > MAX_TAR);
        let text = too_large(Path::new("/src/app"), &listing);
        assert!(
            text.starts_with("/src/app is 310 MiB as a tar, over the 256 MiB"),
            "{text}"
        );
        assert!(
            text.contains("the largest parts: data (300 MiB), target (10 MiB), README (0 MiB)"),
            "{text}"
        );
    }

    #[test]
    fn sources_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        assert_eq!(
            parse_source(d).unwrap(),
            Source::Dir(dir.path().canonicalize().unwrap())
        );
        assert_eq!(usable_name(".tmpAb9"), "tmpAb9");
        assert_eq!(usable_name("my project (2)"), "my-project--2-");
        assert_eq!(usable_name("..."), "repo");
        assert_eq!(usable_name("é"), "-");
        assert_eq!(usable_name(&"x".repeat(150)).len(), 100);
        let git = parse_source("https://example.org/a/b.git").unwrap();
        assert_eq!(default_name(&git), "b");
        assert_eq!(
            default_name(&parse_source("http://example.org/a/repo/").unwrap()),
            "repo"
        );
        for ssh in [
            "git@github.com:a/b.git",
            "ssh://git@github.com/a/b",
            "git://example.org/x",
            "file:///srv/x",
        ] {
            let e = parse_source(ssh).unwrap_err().to_string();
            assert!(e.contains("only http(s) git URLs"), "{ssh}: {e}");
        }
        let e = parse_source("/no/such/dir").unwrap_err();
        assert!(describe_error(&e).contains("/no/such/dir"), "{e:#}");
        let file = dir.path().join("f");
        std::fs::write(&file, "").unwrap();
        let e = parse_source(file.to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not a directory"), "{e}");
    }

    #[test]
    fn progress_lines() {
        let line = |v: Value| step_line(&v);
        assert_eq!(
            line(json!({"step":"packages","status":"running","command":"apt-get install -y g++"})),
            "==> packages: apt-get install -y g++"
        );
        assert_eq!(
            line(json!({"step":"packages","status":"ok","duration_ms":12345})),
            "==> packages ok (12.3 s)"
        );
        assert_eq!(
            line(json!({"step":"base","status":"cached"})),
            "==> base cached"
        );
        assert_eq!(mebibytes(4 << 20 | 512 << 10), "4.5 MiB");
        assert_eq!(mebibytes(1024), "0.0 MiB");
        assert_eq!(
            line(json!({"step":"install","status":"failed","exit_code":1,"duration_ms":800})),
            "==> install failed (exit 1, 0.8 s)"
        );
        assert_eq!(
            line(json!({"step":"install","status":"rolled_back"})),
            "==> install rolled back"
        );
    }

    #[test]
    fn results_start_with_the_id() {
        let server = Url::parse("http://127.0.0.1:7878").unwrap();
        let text = result_text(
            &json!({
                "sandbox_id": "0123abcd4567", "attach": "openrun shell 0123abcd4567",
                "workspace": "/workspaces/app",
                "ports": [{"port": 3000, "preview": "/v1/sandboxes/0123abcd4567/ports/3000/"}],
                "recipe": {"key": "k", "path": "/var/lib/openrun/recipes/t/k/devcontainer.json"},
                "cached": true,
                "check": {"command": "npm test", "exit_code": 1, "passed": false,
                          "duration_ms": 2100},
                "timings": {"total_ms": 4000, "ready_ms": 1200, "setup_ms": 0, "check_ms": 2100}
            }),
            &server,
            "openrun --server http://127.0.0.1:7878",
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "0123abcd4567");
        assert_eq!(
            lines[1],
            "attach:    openrun --server http://127.0.0.1:7878 shell 0123abcd4567"
        );
        assert!(
            text.contains(
                "port:      3000 http://127.0.0.1:7878/v1/sandboxes/0123abcd4567/ports/3000/\n"
            ),
            "{text}"
        );
        assert!(text.contains("(reused)"), "{text}");
        assert!(
            text.contains("check:     npm test: FAILED (exit 1, 2.1 s)\n"),
            "{text}"
        );
        assert!(text.contains("ready in 1.2 s (from the recipe)"), "{text}");
    }

    #[test]
    fn error_codes_choose_the_exit_code() {
        assert_eq!(exit_code_of(&json!({"code": "step_failed"})), FAILED);
        assert_eq!(
            exit_code_of(&json!({"code": "no_project"})),
            ERROR_EXIT_CODE
        );
        assert_eq!(
            exit_code_of(&json!({"code": "fetch_failed"})),
            ERROR_EXIT_CODE
        );
    }

    #[test]
    fn refusals_become_error_objects() {
        let refused = |code: &str, message: &str| ApiError {
            status: 400,
            code: code.into(),
            message: message.into(),
        };
        assert_eq!(
            refusal(&refused("invalid_argument", "bad name")),
            json!({"type": "error", "code": "invalid_argument", "message": "bad name"})
        );
        let e = refusal(&refused("not_found", "no such endpoint"));
        assert!(
            e["message"].as_str().unwrap().contains("POST /v1/up"),
            "{e}"
        );
        assert_eq!(exit_code_of(&e), ERROR_EXIT_CODE);
    }
}
