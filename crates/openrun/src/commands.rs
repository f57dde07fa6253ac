//! The verbs: each turns checked arguments into runtime calls.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use openrun_protocol::{ExecRequest, ExitStatus};
use openrun_runtime::{ImageSource, Limits, Runtime, RuntimeError, Sandbox, SandboxSpec, Storage};

use crate::cli::{
    Cli, Command, CreateArgs, ExecArgs, KeyCommand, KeyCreateArgs, LsArgs, ProcessArgs, RmArgs,
    RunArgs, SandboxArgs, ServeArgs, StorageArg,
};
use crate::session::{self, Outcome};
use crate::{output, remote, terminal};

/// Runs the parsed command line; returns the process exit code. The sandbox verbs go to a
/// server when one is configured ([`remote::Target::resolve`]), else work on this machine's
/// sandboxes; `run`, `serve`, `key` and the create helper are always local.
pub fn dispatch(cli: Cli) -> Result<i32> {
    let data_dir = cli.globals.data_dir.as_path();
    let command = match cli.command {
        Command::Run(args) => return run(data_dir, args),
        Command::Serve(args) => return serve(data_dir, args),
        Command::Key(KeyCommand::Create(args)) => return key_create(data_dir, args),
        Command::Image(command) => return crate::image_cmd::dispatch(data_dir, command),
        Command::Mcp(args) => {
            return crate::mcp::run(data_dir, cli.globals.server, cli.globals.api_key, args)
        }
        Command::Up(args) => {
            return crate::up::run(data_dir, cli.globals.server, cli.globals.api_key, args)
        }
        Command::Teardown { id } => {
            let runtime = Runtime::open(data_dir)?;
            runtime.discard(&id, std::time::Duration::ZERO)?;
            return Ok(0);
        }
        Command::CreateHelper { serve: true } => {
            return Ok(openrun_runtime::zygote::serve(data_dir))
        }
        Command::CreateHelper { serve: false } => {
            return Ok(i32::from(!Runtime::serve_helper_request(
                data_dir,
                &mut std::io::stdin().lock(),
                &mut std::io::stdout().lock(),
            )))
        }
        other => other,
    };
    if let Some(target) =
        remote::Target::resolve(cli.globals.server, cli.globals.api_key, data_dir)?
    {
        return remote::dispatch(target, command);
    }
    match command {
        Command::Create(args) => create(data_dir, args),
        Command::Exec(args) => exec(data_dir, args),
        Command::Ps(args) => ps(data_dir, args),
        Command::Rm(args) => rm(data_dir, args),
        Command::Inspect(args) => inspect(data_dir, &args.id),
        Command::Snapshot(args) => crate::snapshot_cmd::snapshot(data_dir, args),
        Command::Fork(args) => crate::snapshot_cmd::fork(data_dir, args),
        Command::Diff(args) => crate::snapshot_cmd::diff(data_dir, args),
        Command::Shell(_) => Err(remote::needs_server("shell")),
        Command::Cp(_) => Err(remote::needs_server("cp")),
        Command::Logs(_) => Err(remote::needs_server("logs")),
        Command::Events(_) => Err(remote::needs_server("events")),
        Command::Env(_) => Err(remote::needs_server("env")),
        Command::Run(_)
        | Command::Serve(_)
        | Command::Key(_)
        | Command::Image(_)
        | Command::Mcp(_)
        | Command::Up(_)
        | Command::CreateHelper { .. }
        | Command::Teardown { .. } => {
            unreachable!("handled above")
        }
    }
}

/// The spec of a new local sandbox, and the image it runs (whose lease must be held until
/// the sandbox exists; `None` for `--rootfs`).
fn spec_from(
    data_dir: &std::path::Path,
    args: &SandboxArgs,
    default_storage: Storage,
) -> Result<(SandboxSpec, Option<openrun_image::SandboxImage>)> {
    let mut spec = SandboxSpec::new(ImageSource::Host);
    let image = match &args.rootfs {
        Some(dir) => {
            spec.image = ImageSource::Rootfs(dir.clone());
            None
        }
        None => {
            let image = openrun_image::sandbox_image(data_dir, &args.image)?;
            image.apply(&mut spec);
            Some(image)
        }
    };
    spec.storage = match args.storage {
        Some(StorageArg::Memory) => Storage::Memory,
        Some(StorageArg::Disk) => Storage::Disk,
        None => default_storage,
    };
    spec.limits = Limits {
        memory_bytes: args.memory,
        cpu_millis: args.cpus,
        pids: args.pids.or(spec.limits.pids),
        disk_bytes: args.disk,
        open_files: args.open_files,
    };
    Ok((spec, image))
}

fn exec_request(args: &ProcessArgs) -> ExecRequest {
    ExecRequest {
        argv: args.command.clone(),
        env: args.env.iter().cloned().collect::<BTreeMap<_, _>>(),
        cwd: args.workdir.clone(),
        user: args.user.clone(),
        pty: args.tty.then(terminal::size),
        timeout_ms: args.timeout.map(|d| d.as_millis() as u64),
        ..Default::default()
    }
}

fn run(data_dir: &std::path::Path, mut args: RunArgs) -> Result<i32> {
    let (mut spec, image) = spec_from(data_dir, &args.sandbox, Storage::Memory)?;
    spec.exit_with_creator = true;
    if args.process.command.is_empty() {
        // No command: the image's entrypoint and cmd.
        args.process.command = image
            .as_ref()
            .map(|i| i.config.default_command())
            .unwrap_or_default();
        if args.process.command.is_empty() {
            anyhow::bail!(
                "no command given and image {} has no entrypoint or cmd: openrun run [OPTIONS] -- CMD [ARGS...]",
                args.sandbox.image
            );
        }
    }
    let runtime = Runtime::open(data_dir)?;
    // The exec goes out with the create: the agent finds it queued when it starts serving.
    let request = exec_request(&args.process);
    let tty = request.pty.is_some();
    let first = session::presend_exec(request, args.process.interactive)?;
    // A background process tears the sandbox down once it ends: this one only runs the
    // command, and ends through `exit_process` (main), handing it its memory.
    let (mut sandbox, cleaner) =
        runtime.create_with_cleaner(&spec, &first, std::path::Path::new("/proc/self/exe"))?;
    // The sandbox's record now keeps its layers from prune.
    drop(image);
    let control = sandbox
        .take_control()
        .context("the new sandbox has no control stream")?;
    tracing::debug!("sandbox ready");
    let rt = session::tokio_runtime()?;
    let outcome = rt.block_on(async {
        control.set_nonblocking(true)?;
        let stream = tokio::net::UnixStream::from_std(control)?;
        let client = openrun_runtime::AgentClient::from_stream(stream);
        session::attached_presend_exec(client, tty, args.process.interactive).await
    });
    rt.shutdown_background();
    tracing::debug!("command ended");
    let code = report(&sandbox, 0, &args.process, outcome);
    // With a cleaner, the sandbox ends with this process: the cleaner kills its agent once
    // this process is gone, off the path to our exit.
    if !cleaner {
        runtime.destroy_in_background(sandbox)?;
    }
    code
}

fn create(data_dir: &std::path::Path, args: CreateArgs) -> Result<i32> {
    if !args.labels.is_empty() {
        return Err(remote::needs_server("create --label"));
    }
    let (mut spec, image) = spec_from(data_dir, &args.sandbox, Storage::Disk)?;
    spec.lifetime = Some(args.ttl);
    spec.env.extend(args.env);
    let runtime = Runtime::open(data_dir)?;
    let sandbox = runtime.create(&spec)?;
    drop(image);
    if args.json {
        println!("{}", serde_json::to_string_pretty(sandbox.record())?);
    } else {
        println!("{}", sandbox.id());
    }
    Ok(0)
}

fn exec(data_dir: &std::path::Path, args: ExecArgs) -> Result<i32> {
    if args.json {
        return Err(remote::needs_server("exec --json"));
    }
    let runtime = Runtime::open(data_dir)?;
    let sandbox = runtime.open_sandbox(&args.id)?;
    let request = exec_request(&args.process);
    let oom_before = sandbox.oom_kills();
    let rt = session::tokio_runtime()?;
    let outcome = rt.block_on(async {
        let client = sandbox.connect().await?;
        session::attached_exec(client, request, args.process.interactive).await
    });
    rt.shutdown_background();
    report(&sandbox, oom_before, &args.process, outcome)
}

/// Turns how the process ended into our exit code (see [`session::exit_code`]).
fn report(
    sandbox: &Sandbox,
    oom_before: u64,
    args: &ProcessArgs,
    outcome: Result<Outcome>,
) -> Result<i32> {
    let mut outcome = outcome?;
    if let Outcome::Exited(status) = &mut outcome {
        annotate_oom(sandbox, oom_before, status);
    }
    let limit = sandbox.record().limits.memory_bytes;
    Ok(session::exit_code(
        &args.command,
        args.timeout,
        outcome,
        limit,
    ))
}

/// A SIGKILL (or a shell reporting one, 137) while the sandbox's memory cgroup recorded new
/// OOM kills during the command is an OOM kill.
fn annotate_oom(sandbox: &Sandbox, oom_before: u64, status: &mut ExitStatus) {
    let killed = status.signal == Some(9) || status.code == Some(137);
    if killed && sandbox.oom_kills() > oom_before {
        status.oom_killed = true;
    }
}

fn ps(data_dir: &std::path::Path, args: LsArgs) -> Result<i32> {
    if !args.labels.is_empty() {
        return Err(remote::needs_server("ls --label"));
    }
    let runtime = Runtime::open(data_dir)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&runtime.list()?)?);
        return Ok(0);
    }
    let now = openrun_runtime::state::now_ms();
    println!(
        "{:<14} {:<24} {:>8} {:>10} {:>10}",
        "ID", "IMAGE", "PID", "AGE", "EXPIRES"
    );
    for record in runtime.list()? {
        let age = output::format_ms(now.saturating_sub(record.created_at_ms));
        let expires = output::expires_in(record.expires_at_ms, now);
        println!(
            "{:<14} {:<24} {:>8} {:>10} {:>10}",
            record.id, record.image, record.pid, age, expires
        );
    }
    Ok(0)
}

fn inspect(data_dir: &std::path::Path, id: &str) -> Result<i32> {
    let runtime = Runtime::open(data_dir)?;
    let sandbox = runtime.open_sandbox(id)?;
    let mut json = serde_json::to_value(sandbox.record())?;
    if let Some(obj) = json.as_object_mut() {
        obj.insert(
            "upper_dir".into(),
            sandbox.upper_dir().map(|p| p.display().to_string()).into(),
        );
        obj.insert(
            "run_dir".into(),
            sandbox.run_dir().display().to_string().into(),
        );
        obj.insert(
            "socket".into(),
            sandbox.socket_path().display().to_string().into(),
        );
    }
    println!("{}", serde_json::to_string_pretty(&json)?);
    Ok(0)
}

fn rm(data_dir: &std::path::Path, args: RmArgs) -> Result<i32> {
    let runtime = Runtime::open(data_dir)?;
    let mut code = 0;
    let mut removed = Vec::new();
    for id in &args.ids {
        match runtime.open_sandbox(id).and_then(|s| runtime.destroy(s)) {
            Ok(()) => removed.push(id.clone()),
            Err(RuntimeError::NoSuchSandbox(_)) if args.force => {}
            Err(e) => {
                eprintln!("openrun: {e}");
                code = crate::cli::ERROR_EXIT_CODE;
            }
        }
    }
    output::print_ids(&removed, args.json)?;
    Ok(code)
}

fn serve(data_dir: &std::path::Path, args: ServeArgs) -> Result<i32> {
    if args.new_session {
        rustix::process::setsid().context("cannot start a new session")?;
    }
    // Sandbox agents are forked by the create helper, which exits at once: as a subreaper
    // this process inherits (and reaps) them instead of init. Set before any thread starts.
    rustix::process::set_child_subreaper(Some(rustix::process::getpid()))
        .context("cannot become a child subreaper")?;
    let config = openrun_server::Config {
        listen: args.listen,
        data_dir: data_dir.to_path_buf(),
        helper: std::env::current_exe().context("cannot find the openrun binary")?,
        max_creating: args
            .max_creating
            .map_or_else(openrun_server::default_max_creating, |n| n as usize),
        create_queue: args.create_queue as usize,
        default_limits: {
            let mut limits = openrun_server::default_limits();
            let pick = |given: Option<crate::cli::Unlimited>, default: Option<u64>| {
                given.map_or(default, |u| u.0)
            };
            limits.memory_bytes = pick(args.default_memory, limits.memory_bytes);
            limits.disk_bytes = pick(args.default_disk, limits.disk_bytes);
            limits.cpu_millis = pick(args.default_cpus, limits.cpu_millis);
            limits
        },
        disk_pool_size: args.disk_pool_size,
        egress: openrun_server::EgressOptions {
            resolve: args.egress_resolve,
            ca_file: args.egress_ca_file,
            allow_open_network: args.allow_open_network,
        },
        preview_domain: args.preview_domain,
        warm_pool: args.warm_pool as usize,
    };
    openrun_server::run(config, |addr| {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on {addr}");
        let _ = out.flush();
    })?;
    Ok(0)
}

fn key_create(data_dir: &std::path::Path, args: KeyCreateArgs) -> Result<i32> {
    let kind = if args.human {
        openrun_server::ActorKind::Human
    } else {
        openrun_server::ActorKind::Agent
    };
    let key = openrun_server::create_key(data_dir, &args.name, kind)?;
    eprintln!(
        "created key {} ({}); it is shown only this once:",
        key.id,
        kind.as_str()
    );
    println!("{}", key.secret);
    Ok(0)
}
