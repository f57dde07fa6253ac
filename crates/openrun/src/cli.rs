//! Command-line grammar. Values are validated here (limits, durations, `K=V` pairs) so the
//! commands receive a checked configuration.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use openrun_runtime::limits;

/// Exit code for openrun's own failures (as `docker run` uses 125), distinct from the
/// command's exit codes.
pub const ERROR_EXIT_CODE: i32 = 125;

/// openrun: isolated Linux sandboxes in milliseconds.
#[derive(Debug, Parser)]
#[command(name = "openrun", version, about, max_term_width = 100)]
pub struct Cli {
    /// Options of every verb.
    #[command(flatten)]
    pub globals: Globals,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Options of every verb (given before or after it).
#[derive(Debug, Args)]
pub struct Globals {
    /// Directory for sandbox state, writable layers and images.
    #[arg(
        long,
        global = true,
        env = "OPENRUN_DATA_DIR",
        default_value = "/var/lib/openrun"
    )]
    pub data_dir: PathBuf,
    /// Server to use, e.g. http://127.0.0.1:7878 (else the config file's). Without one, the
    /// verbs work on this machine's sandboxes directly; `run` always does.
    #[arg(long, global = true, env = "OPENRUN_SERVER", value_name = "URL")]
    pub server: Option<String>,
    /// API key for the server (else the config file's, else for a loopback server the one
    /// `openrun serve` wrote to <data-dir>/local.json).
    #[arg(
        long,
        global = true,
        env = "OPENRUN_API_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub api_key: Option<String>,
}

/// Verbs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a command in a new sandbox and remove the sandbox when it exits.
    Run(RunArgs),
    /// Create a sandbox that stays up (until `rm` or its --ttl) and print its id.
    Create(CreateArgs),
    /// Run a command in an existing sandbox.
    Exec(ExecArgs),
    /// Open an interactive terminal in a sandbox (server only).
    Shell(ShellArgs),
    /// List live sandboxes.
    #[command(visible_alias = "ls")]
    Ps(LsArgs),
    /// Remove sandboxes, killing everything in them.
    Rm(RmArgs),
    /// Show a sandbox as JSON (the server's resource, or the local record and host paths).
    Inspect(InspectArgs),
    /// Copy files or directories between this machine and a sandbox: one side is ID:/path
    /// (server only).
    Cp(CpArgs),
    /// Print the output of a process in a sandbox (server only).
    Logs(LogsArgs),
    /// Print a sandbox's timeline (server only).
    Events(EventsArgs),
    /// Print what a sandbox offers: OS, limits, network, tools on PATH (server only).
    Env(EnvArgs),
    /// Serve the HTTP API (prints `listening on ADDR` first).
    Serve(ServeArgs),
    /// Manage API keys of the server.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Freeze a sandbox's writable layer into a new image (the sandbox is paused for the
    /// copy); prints the image's name.
    Snapshot(crate::snapshot_cmd::SnapshotArgs),
    /// Snapshot a sandbox and create sandboxes from the snapshot; prints their ids.
    Fork(crate::snapshot_cmd::ForkArgs),
    /// Show what changed in a sandbox against its image (or another image) as a patch.
    Diff(crate::snapshot_cmd::DiffArgs),
    /// Manage the images of this machine's store (in the data dir).
    #[command(subcommand)]
    Image(ImageCommand),
    /// Open a repository (a directory here, or an http(s) git URL) in a sandbox ready to
    /// work in: its devcontainer.json, Dockerfile or detected languages are set up once (a
    /// recipe, reused by later opens) and its tests run as a readiness check. Prints the
    /// sandbox id first.
    Up(UpArgs),
    /// Serve MCP (Model Context Protocol) over stdio for local agents such as Claude Desktop
    /// and Claude Code, bridged to the server's /mcp; without a configured or running server,
    /// one is started (see docs/mcp.md).
    Mcp(McpArgs),
    /// Internal: create one sandbox from a JSON spec on stdin for a multi-threaded caller and
    /// print its record (see `Runtime::create_with_helper`).
    /// Remove what sandbox ID left once its agent and creator are gone, by its exact id: the
    /// cleaner of `openrun run` runs this when it cannot tear down itself (see
    /// `openrun_runtime`'s cleaner).
    #[command(name = "__teardown", hide = true)]
    Teardown {
        /// The sandbox's full id.
        id: String,
    },
    #[command(name = "__create", hide = true)]
    CreateHelper {
        /// Serve create requests from the caller over stdin (a socket) until it closes it,
        /// forking a worker per create (see `openrun_runtime::zygote`).
        #[arg(long)]
        serve: bool,
    },
}

/// Image and limits of a new sandbox.
#[derive(Debug, Args)]
pub struct SandboxArgs {
    /// Image to run: `name[:tag]` from the image store (`openrun image ls`), or the
    /// built-in `host` image (the host's /usr, read-only).
    #[arg(long, default_value = "host", conflicts_with = "rootfs")]
    pub image: String,
    /// An unpacked root filesystem to use instead of an image (e.g. made by debootstrap).
    #[arg(long, value_name = "DIR")]
    pub rootfs: Option<PathBuf>,
    /// Memory limit, e.g. 512M or 2G.
    #[arg(long, value_parser = limits::parse_memory, value_name = "SIZE", allow_hyphen_values = true)]
    pub memory: Option<u64>,
    /// CPU limit in CPUs, e.g. 1.5.
    #[arg(long, value_parser = limits::parse_cpus, value_name = "CPUS", allow_hyphen_values = true)]
    pub cpus: Option<u64>,
    /// Where the writable layer lives: memory (fast, counted against --memory; the default
    /// for `run`) or disk (the data dir; the default for `create`).
    #[arg(long, value_enum, value_name = "WHERE")]
    pub storage: Option<StorageArg>,
    /// Maximum number of processes and threads (default 4096).
    #[arg(long, value_parser = limits::parse_pids, value_name = "N", allow_hyphen_values = true)]
    pub pids: Option<u64>,
    /// Quota of the writable layer, e.g. 10G: writes past it fail with "disk quota exceeded"
    /// (a disk layer then lives in the data dir's disk pool).
    #[arg(long, value_parser = limits::parse_disk, value_name = "SIZE", allow_hyphen_values = true)]
    pub disk: Option<u64>,
    /// Open files per process (RLIMIT_NOFILE), 64 to 1048576 (default 65536).
    #[arg(long, value_parser = limits::parse_open_files, value_name = "N", allow_hyphen_values = true)]
    pub open_files: Option<u64>,
}

/// `--storage` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StorageArg {
    /// On the runtime tmpfs, charged to the sandbox's memory.
    Memory,
    /// In the data dir.
    Disk,
}

/// Options of the process to run.
#[derive(Debug, Args)]
pub struct ProcessArgs {
    /// Set an environment variable (repeatable).
    #[arg(short = 'e', long = "env", value_parser = parse_env, value_name = "K=V")]
    pub env: Vec<(String, String)>,
    /// Working directory inside the sandbox.
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    pub workdir: Option<String>,
    /// User to run as (name or uid[:gid]); default root of the sandbox.
    #[arg(short = 'u', long)]
    pub user: Option<String>,
    /// Keep stdin open and forward it.
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Allocate a terminal.
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Kill the command after this long (e.g. 30s, 5m); exit code 124.
    #[arg(long, value_parser = limits::parse_duration, value_name = "DURATION", allow_hyphen_values = true)]
    pub timeout: Option<Duration>,
    /// Command and arguments (for `run --image`, default: the image's entrypoint and cmd).
    #[arg(trailing_var_arg = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// `openrun run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Sandbox options.
    #[command(flatten)]
    pub sandbox: SandboxArgs,
    /// Process options.
    #[command(flatten)]
    pub process: ProcessArgs,
}

/// `openrun create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Sandbox options.
    #[command(flatten)]
    pub sandbox: SandboxArgs,
    /// Sandbox lifetime; it is killed after this long.
    #[arg(long, value_parser = limits::parse_duration, default_value = "15m", value_name = "DURATION")]
    pub ttl: Duration,
    /// Default environment for every command in the sandbox (repeatable).
    #[arg(short = 'e', long = "env", value_parser = parse_env, value_name = "K=V")]
    pub env: Vec<(String, String)>,
    /// Label the sandbox (repeatable; server only), e.g. --label team=ml.
    #[arg(long = "label", value_parser = parse_label, value_name = "K=V")]
    pub labels: Vec<(String, String)>,
    /// Print the whole sandbox resource as JSON instead of its id.
    #[arg(long)]
    pub json: bool,
}

/// `openrun exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Sandbox id (or a unique prefix).
    pub id: String,
    /// Print the server's NDJSON exec lines instead of the output (server only).
    #[arg(long)]
    pub json: bool,
    /// Process options.
    #[command(flatten)]
    pub process: ProcessArgs,
}

/// `openrun shell`.
#[derive(Debug, Args)]
pub struct ShellArgs {
    /// Sandbox id.
    pub id: String,
    /// Command to run on the terminal instead of the sandbox's shell; needed when stdin is
    /// not a terminal.
    #[arg(trailing_var_arg = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// `openrun ps` / `openrun ls`.
#[derive(Debug, Args)]
pub struct LsArgs {
    /// Only sandboxes with this label (repeatable: all must match; server only).
    #[arg(long = "label", value_parser = parse_label, value_name = "K=V")]
    pub labels: Vec<(String, String)>,
    /// Print a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `openrun inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Sandbox id (or a unique prefix).
    pub id: String,
    /// JSON output (the only format of inspect; accepted for uniformity).
    #[arg(long)]
    pub json: bool,
}

/// `openrun rm`.
#[derive(Debug, Args)]
pub struct RmArgs {
    /// Sandbox ids (or unique prefixes).
    #[arg(required = true)]
    pub ids: Vec<String>,
    /// Do not fail on sandboxes that do not exist.
    #[arg(short = 'f', long)]
    pub force: bool,
    /// Print a JSON array of the removed ids.
    #[arg(long)]
    pub json: bool,
}

/// `openrun cp`.
#[derive(Debug, Args)]
pub struct CpArgs {
    /// What to copy: a local path, or ID:/path in a sandbox.
    pub source: String,
    /// Where to: a local path, or ID:/path in a sandbox (into it when it is a directory).
    pub destination: String,
    /// Print what was copied as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `openrun logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Sandbox id.
    pub id: String,
    /// Process id inside the sandbox (from `exec`'s `started` line or the process list).
    pub pid: u32,
    /// Keep printing output until the process exits.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Print the server's NDJSON lines instead of the output.
    #[arg(long)]
    pub json: bool,
}

/// `openrun events`.
#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Sandbox id.
    pub id: String,
    /// Keep printing new events until the sandbox ends or you interrupt.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Print JSON (an array, or one object a line with --follow) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `openrun env`.
#[derive(Debug, Args)]
pub struct EnvArgs {
    /// Sandbox id.
    pub id: String,
    /// Print the server's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `openrun mcp`.
#[derive(Debug, Args)]
pub struct McpArgs {
    /// Fail instead of starting `openrun serve` when no server is configured and none runs
    /// on this machine.
    #[arg(long)]
    pub no_start: bool,
}

/// `openrun up`.
#[derive(Debug, Args)]
#[command(after_help = UP_HELP)]
pub struct UpArgs {
    /// A directory on this machine (sent as a tar, .gitignore'd files left out), or an
    /// http(s) git URL the server clones.
    #[arg(value_name = "PATH|GIT_URL")]
    pub source: String,
    /// Readiness check to run instead of the detected test suite (a shell command, run in
    /// the workspace).
    #[arg(long, value_name = "CMD", conflicts_with = "no_check")]
    pub check: Option<String>,
    /// Run no readiness check.
    #[arg(long)]
    pub no_check: bool,
    /// Only print the plan (base, packages, steps, test, ports); nothing is made. For a
    /// directory it is computed here, without a server.
    #[arg(long)]
    pub plan: bool,
    /// Print the result (or the error, or with --plan the plan) as one JSON document on
    /// stdout; progress stays on stderr.
    #[arg(long)]
    pub json: bool,
    /// Keep the sandbox when a step fails (rolled back to before the failed step) and when
    /// interrupted, to look into it.
    #[arg(long)]
    pub keep: bool,
    /// Lifetime of the sandbox (default: the server's).
    #[arg(long, value_parser = limits::parse_duration, value_name = "DURATION")]
    pub ttl: Option<Duration>,
    /// Branch or tag to clone (git URLs only).
    #[arg(long = "ref", value_name = "REF")]
    pub git_ref: Option<String>,
    /// Name of the repository (default: the directory's or the URL's last part); the
    /// workspace is /workspaces/NAME unless its devcontainer.json says otherwise.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
}

/// The end of `openrun up --help`.
const UP_HELP: &str = "\
Server: the configured one (--server, OPENRUN_SERVER, the config file), else the one \
<data-dir>/local.json names, else one is started in the background (log: <data-dir>/serve.log) \
and left running for `openrun shell ID`.

Output: progress on stderr; on stdout the sandbox id first, then how to attach, the \
workspace, ports, the recipe and the check's result.

Exit codes: 0 ready (check passed or none); 1 a setup step or the check failed; 125 openrun \
could not do it (bad arguments, no recognizable project, invalid configuration, clone \
failed, server refused or unreachable); 130 interrupted.";

/// `openrun serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address and port to listen on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:7878", value_name = "ADDR")]
    pub listen: std::net::SocketAddr,
    /// Sandbox creates run at once (default: twice the number of CPUs).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_creating: Option<u32>,
    /// Creates that may wait for a slot; any more are refused with 429 and Retry-After.
    #[arg(long, value_name = "N", default_value_t = openrun_server::DEFAULT_CREATE_QUEUE as u32)]
    pub create_queue: u32,
    /// Sandboxes kept ready for creates that ask for nothing beyond the defaults (labels
    /// and ttl allowed): such a create takes one instead of forking a new one. Refilled in
    /// the background, in a create slot, when no other create runs; destroyed when the
    /// server stops. 0 turns the pool off.
    #[arg(long, value_name = "N", default_value_t = openrun_server::DEFAULT_WARM_POOL as u32)]
    pub warm_pool: u32,
    /// Memory limit of creates that give none, or `none` (default: 2G, at most half the
    /// host's memory).
    #[arg(long, value_name = "SIZE|none", value_parser = parse_default_memory, allow_hyphen_values = true)]
    pub default_memory: Option<Unlimited>,
    /// Disk quota of creates that give none, or `none` (default: 10G).
    #[arg(long, value_name = "SIZE|none", value_parser = parse_default_disk, allow_hyphen_values = true)]
    pub default_disk: Option<Unlimited>,
    /// CPU limit of creates that give none, or `none` (the default).
    #[arg(long, value_name = "CPUS|none", value_parser = parse_default_cpus, allow_hyphen_values = true)]
    pub default_cpus: Option<Unlimited>,
    /// Size of the disk pool holding sandboxes with a disk quota, when it is first made
    /// (default: $OPENRUN_DISK_POOL_SIZE, else half the data dir's free space).
    #[arg(long, value_name = "SIZE", value_parser = limits::parse_disk, allow_hyphen_values = true)]
    pub disk_pool_size: Option<u64>,
    /// Resolve NAME to IP in the egress proxy without DNS, like curl's --resolve (repeatable);
    /// the address is taken as given, loopback included.
    #[arg(long, value_name = "NAME:IP", value_parser = openrun_server::parse_egress_resolve)]
    pub egress_resolve: Vec<(String, std::net::IpAddr)>,
    /// PEM file of extra CA certificates the egress proxy trusts for hosts bound to a secret.
    #[arg(long, value_name = "PATH")]
    pub egress_ca_file: Option<std::path::PathBuf>,
    /// Let API keys ask for network mode `open`: the sandbox's namespace is connected to the
    /// host's network (pasta) and reaches everything the host reaches, cloud metadata services
    /// (169.254.169.254), private networks and the host's own services included. Only on
    /// hosts where that is acceptable, or behind a host firewall. Off by default: `open` is
    /// refused with 403 `open_network_disabled`.
    #[arg(long)]
    pub allow_open_network: bool,
    /// Serve port previews by host too: `<port>-<id>.DOMAIN` (point a wildcard DNS record at
    /// the server), e.g. preview.example.com. Previews by path need nothing.
    #[arg(long, value_name = "DOMAIN", value_parser = openrun_server::check_preview_domain)]
    pub preview_domain: Option<String>,
    /// Internal: start a new session first (setsid), away from the terminal of the verb that
    /// started this server (`openrun up` leaves the server it starts running).
    #[arg(long, hide = true)]
    pub new_session: bool,
}

/// A limit given as a value or `none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unlimited(pub Option<u64>);

fn parse_none_or(
    s: &str,
    parse: fn(&str) -> Result<u64, limits::LimitParseError>,
) -> Result<Unlimited, limits::LimitParseError> {
    if s.trim().eq_ignore_ascii_case("none") {
        return Ok(Unlimited(None));
    }
    parse(s).map(|v| Unlimited(Some(v)))
}

fn parse_default_memory(s: &str) -> Result<Unlimited, limits::LimitParseError> {
    parse_none_or(s, limits::parse_memory)
}

fn parse_default_disk(s: &str) -> Result<Unlimited, limits::LimitParseError> {
    parse_none_or(s, limits::parse_disk)
}

fn parse_default_cpus(s: &str) -> Result<Unlimited, limits::LimitParseError> {
    parse_none_or(s, limits::parse_cpus)
}

/// `openrun image …`.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// List images: NAME TAG LAYERS SIZE CREATED SOURCE.
    #[command(visible_alias = "list")]
    Ls(ImageLsArgs),
    /// Show an image: layers, environment, working dir, user, entrypoint, cmd, labels.
    Inspect(ImageInspectArgs),
    /// Import an OCI image layout (directory or tar) or a `docker save` archive.
    Import(ImageImportArgs),
    /// Build an image from a Dockerfile, or a minimal Debian one (`--debian SUITE`).
    Build(crate::image_build::ImageBuildArgs),
    /// Remove images (their layers stay until `prune` finds them unused).
    #[command(visible_alias = "remove")]
    Rm(ImageRmArgs),
    /// Remove layers no image names and no live sandbox uses.
    Prune(ImagePruneArgs),
}

/// `openrun image ls`.
#[derive(Debug, Args)]
pub struct ImageLsArgs {
    /// Print a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `openrun image inspect`.
#[derive(Debug, Args)]
pub struct ImageInspectArgs {
    /// Image name[:tag].
    pub name: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `openrun image import`.
#[derive(Debug, Args)]
pub struct ImageImportArgs {
    /// An OCI image layout directory, a tar of one, or a `docker save` archive (tars may be
    /// gzip- or zstd-compressed).
    pub path: PathBuf,
    /// Name[:tag] to give the image.
    #[arg(short = 't', long = "tag", value_name = "NAME")]
    pub tag: String,
    /// Print the imported image as JSON (as `image inspect --json`).
    #[arg(long)]
    pub json: bool,
}

/// `openrun image rm`.
#[derive(Debug, Args)]
pub struct ImageRmArgs {
    /// Image names[:tag].
    #[arg(required = true)]
    pub names: Vec<String>,
    /// Do not fail on images that do not exist.
    #[arg(short = 'f', long)]
    pub force: bool,
    /// Print a JSON array of the removed names.
    #[arg(long)]
    pub json: bool,
}

/// `openrun image prune`.
#[derive(Debug, Args)]
pub struct ImagePruneArgs {
    /// Print what was removed as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `openrun key …`.
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create an API key and print it (once: only its hash is stored).
    Create(KeyCreateArgs),
}

/// `openrun key create`.
#[derive(Debug, Args)]
pub struct KeyCreateArgs {
    /// Name of the key (who or what uses it).
    #[arg(long)]
    pub name: String,
    /// The key is used by a person (the timeline's actor is `human`, not `agent`).
    #[arg(long)]
    pub human: bool,
}

impl Cli {
    /// Parses the command line, exiting with a usage error for what clap cannot express: `exec`
    /// needs a command (`run` may take its image's).
    pub fn parse_checked() -> Self {
        let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
        if let Some(cli) = Self::parse_run(&args) {
            return cli;
        }
        let cli = Self::parse_from(args);
        if let Command::Exec(args) = &cli.command {
            if args.process.command.is_empty() {
                use clap::CommandFactory;
                Self::command()
                    .error(
                        clap::error::ErrorKind::MissingRequiredArgument,
                        "exec needs a command: openrun exec ID -- CMD [ARGS...]",
                    )
                    .exit();
            }
        }
        cli
    }
}

impl Cli {
    /// `openrun [OPTIONS] run ...` parsed with the grammar of `run` alone: building every
    /// verb's arguments costs clap ~0.1-0.3 ms, on the path of the one verb whose start-up
    /// time is the product. `None` when the verb is not `run` or the line does not parse
    /// (also `--help` and `--version`): then the whole grammar decides, with its own messages.
    fn parse_run(args: &[std::ffi::OsString]) -> Option<Self> {
        if verb(args)? != "run" {
            return None;
        }
        use clap::FromArgMatches;
        let grammar = Globals::augment_args(clap::Command::new("openrun"))
            .subcommand(RunArgs::augment_args(clap::Command::new("run")));
        let matches = grammar.try_get_matches_from(args).ok()?;
        let (_, run) = matches.subcommand()?;
        let cli = Self {
            globals: Globals::from_arg_matches(&matches).ok()?,
            command: Command::Run(RunArgs::from_arg_matches(run).ok()?),
        };
        Some(cli)
    }
}

/// The verb of a command line: its first word after the global options (`None` when another
/// option comes first).
fn verb(args: &[std::ffi::OsString]) -> Option<&str> {
    const WITH_VALUE: [&str; 3] = ["--data-dir", "--server", "--api-key"];
    let mut words = args.iter().skip(1).map(|a| a.to_str());
    let with_inline_value = |word: &str| {
        WITH_VALUE
            .iter()
            .any(|o| word.strip_prefix(o).is_some_and(|r| r.starts_with('=')))
    };
    while let Some(word) = words.next() {
        let word = word?;
        if WITH_VALUE.contains(&word) {
            words.next()?;
        } else if !with_inline_value(word) {
            return (!word.starts_with('-')).then_some(word);
        }
    }
    None
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    parse_pair("environment variable", s)
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    parse_pair("label", s)
}

/// A `KEY=VALUE` pair with a non-empty key and no NUL bytes.
pub(crate) fn parse_pair(what: &str, s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !k.contains('\0') && !v.contains('\0') => {
            Ok((k.to_string(), v.to_string()))
        }
        _ => Err(format!("invalid {what} {s:?}: expected KEY=VALUE")),
    }
}

/// One line for an error chain: the outermost message, with causes not already included.
pub fn describe_error(err: &anyhow::Error) -> String {
    let mut text = err.to_string();
    for cause in err.chain().skip(1) {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn grammar_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_alone_parses_as_the_whole_grammar_does() {
        let lines: &[&[&str]] = &[
            &["run", "--", "true"],
            &["--data-dir", "/d", "run", "true"],
            &[
                "--data-dir=/d",
                "--server",
                "h:1",
                "run",
                "-i",
                "-t",
                "--",
                "sh",
                "-c",
                "x",
            ],
            &[
                "run",
                "--data-dir",
                "/d",
                "--api-key=k",
                "--memory",
                "64M",
                "-e",
                "A=b",
                "ls",
            ],
            &[
                "run", "--image", "img:1", "--cpus", "1.5", "--pids", "9", "-w", "/x", "-u", "u",
            ],
            &[
                "run",
                "--storage",
                "disk",
                "--disk",
                "1G",
                "--open-files",
                "100",
                "--timeout",
                "5s",
            ],
            &["run", "--rootfs", "/r", "--", "--weird", "-x"],
            &["run"],
        ];
        for line in lines {
            let args: Vec<std::ffi::OsString> = std::iter::once("openrun")
                .chain(line.iter().copied())
                .map(Into::into)
                .collect();
            let fast = Cli::parse_run(&args).expect("parses as run");
            let full = Cli::try_parse_from(&args).unwrap();
            assert_eq!(format!("{fast:?}"), format!("{full:?}"), "{line:?}");
        }
        // Not `run`, or not valid: left to the whole grammar (and its messages).
        let refused: &[&[&str]] = &[
            &["exec", "x", "--", "true"],
            &["--help"],
            &["run", "--help"],
            &["--version"],
            &["-h", "run"],
            &["run", "--memory", "lots"],
            &["run", "--image", "a", "--rootfs", "b"],
            &["--data-dir"],
            &["--bogus", "run"],
            &["runx"],
        ];
        for line in refused {
            let args: Vec<std::ffi::OsString> = std::iter::once("openrun")
                .chain(line.iter().copied())
                .map(Into::into)
                .collect();
            assert!(Cli::parse_run(&args).is_none(), "{line:?}");
        }
    }

    #[test]
    fn env_pairs_need_a_key_and_equals() {
        assert_eq!(parse_env("A=b=c").unwrap(), ("A".into(), "b=c".into()));
        assert_eq!(parse_env("A=").unwrap(), ("A".into(), String::new()));
        assert!(parse_env("A").is_err());
        assert!(parse_env("=x").is_err());
    }

    #[test]
    fn run_parses_limits_and_trailing_command() {
        let cli = Cli::try_parse_from([
            "openrun",
            "run",
            "--memory",
            "64M",
            "--pids",
            "32",
            "-e",
            "X=1",
            "--",
            "sh",
            "-c",
            "echo -n hi",
        ])
        .unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.sandbox.memory, Some(64 << 20));
        assert_eq!(run.process.command, ["sh", "-c", "echo -n hi"]);
    }

    #[test]
    fn serve_and_key_create_parse() {
        let cli = Cli::try_parse_from(["openrun", "serve", "--listen", "127.0.0.1:0"]).unwrap();
        let Command::Serve(serve) = cli.command else {
            panic!("not serve")
        };
        assert_eq!(serve.listen.port(), 0);
        assert!(Cli::try_parse_from(["openrun", "serve", "--listen", "nowhere"]).is_err());
        let cli =
            Cli::try_parse_from(["openrun", "key", "create", "--name", "me", "--human"]).unwrap();
        let Command::Key(KeyCommand::Create(key)) = cli.command else {
            panic!("not key create")
        };
        assert!(key.human && key.name == "me");
    }

    #[test]
    fn client_verbs_parse() {
        let cli = Cli::try_parse_from([
            "openrun", "ls", "--label", "a=b", "--label", "c=", "--json", "--server", "h:1",
        ])
        .unwrap();
        assert_eq!(cli.globals.server.as_deref(), Some("h:1"));
        let Command::Ps(ls) = cli.command else {
            panic!("not ls")
        };
        assert!(ls.json);
        assert_eq!(
            ls.labels,
            [("a".into(), "b".into()), ("c".into(), String::new())]
        );
        assert!(Cli::try_parse_from(["openrun", "ls", "--label", "nokey"]).is_err());
        let cli = Cli::try_parse_from(["openrun", "shell", "abc", "--", "sh", "-c", "stty size"])
            .unwrap();
        let Command::Shell(shell) = cli.command else {
            panic!("not shell")
        };
        assert_eq!(shell.command, ["sh", "-c", "stty size"]);
        let cli = Cli::try_parse_from(["openrun", "rm", "-f", "a", "b"]).unwrap();
        let Command::Rm(rm) = cli.command else {
            panic!("not rm")
        };
        assert!(rm.force && rm.ids == ["a", "b"]);
        assert!(Cli::try_parse_from(["openrun", "logs", "abc", "-1"]).is_err());
    }

    #[test]
    fn bad_limits_are_rejected_at_parse_time() {
        let err =
            Cli::try_parse_from(["openrun", "run", "--memory", "lots", "--", "true"]).unwrap_err();
        assert!(err.to_string().contains("lots"), "{err}");
    }
}
