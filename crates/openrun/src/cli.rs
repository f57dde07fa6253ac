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
    /// Directory for sandbox state, writable layers and images.
    #[arg(
        long,
        global = true,
        env = "OPENRUN_DATA_DIR",
        default_value = "/var/lib/openrun"
    )]
    pub data_dir: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
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
    /// List live sandboxes.
    #[command(alias = "ls")]
    Ps,
    /// Remove sandboxes, killing everything in them.
    Rm(RmArgs),
    /// Show a sandbox's record and host paths as JSON.
    Inspect(InspectArgs),
    /// Serve the HTTP API (prints `listening on ADDR` first).
    Serve(ServeArgs),
    /// Manage API keys of the server.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Internal: create one sandbox from a JSON spec on stdin for a multi-threaded caller and
    /// print its record (see `Runtime::create_with_helper`).
    #[command(name = "__create", hide = true)]
    CreateHelper,
}

/// Image and limits of a new sandbox.
#[derive(Debug, Args)]
pub struct SandboxArgs {
    /// Image to run: the built-in `host` image (the host's /usr, read-only).
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
    /// Command and arguments.
    #[arg(required = true, trailing_var_arg = true, value_name = "CMD")]
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
}

/// `openrun exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Sandbox id (or a unique prefix).
    pub id: String,
    /// Process options.
    #[command(flatten)]
    pub process: ProcessArgs,
}

/// `openrun inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Sandbox id (or a unique prefix).
    pub id: String,
}

/// `openrun rm`.
#[derive(Debug, Args)]
pub struct RmArgs {
    /// Sandbox ids (or unique prefixes).
    #[arg(required = true)]
    pub ids: Vec<String>,
}

/// `openrun serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address and port to listen on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:7878", value_name = "ADDR")]
    pub listen: std::net::SocketAddr,
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

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !k.contains('\0') && !v.contains('\0') => {
            Ok((k.to_string(), v.to_string()))
        }
        _ => Err(format!(
            "invalid environment variable {s:?}: expected KEY=VALUE"
        )),
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
    fn bad_limits_are_rejected_at_parse_time() {
        let err =
            Cli::try_parse_from(["openrun", "run", "--memory", "lots", "--", "true"]).unwrap_err();
        assert!(err.to_string().contains("lots"), "{err}");
    }
}
