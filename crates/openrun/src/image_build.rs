//! `openrun image build`: a Dockerfile build, or (`--debian SUITE`) a minimal Debian base made
//! with debootstrap. Always local (the store of this machine's data dir), like `run`: the
//! `RUN` steps are sandboxes forked from this process, which is single-threaded here.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use openrun_image::build::{BuildEvent, BuildOptions, BuildReport};
use openrun_image::debian::{DebianEvent, DebianOptions, DEFAULT_MIRROR};
use openrun_image::{ImageRef, Store};
use openrun_runtime::{limits, Limits, Runtime};

use crate::output;

/// `openrun image build`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  openrun image build -t app .\n  openrun image build -f build/Dockerfile --build-arg VERSION=2 -t app:2 .\n  openrun image build --debian bookworm"
)]
pub struct ImageBuildArgs {
    /// The build context: the directory COPY and ADD read from.
    #[arg(
        value_name = "DIR",
        required_unless_present = "debian",
        conflicts_with = "debian"
    )]
    pub context: Option<PathBuf>,
    /// The Dockerfile (default: DIR/Dockerfile).
    #[arg(short = 'f', long = "file", value_name = "DOCKERFILE")]
    pub file: Option<PathBuf>,
    /// Name[:tag] to give the image (`--debian`: default debian:SUITE).
    #[arg(short = 't', long = "tag", value_name = "NAME")]
    pub tag: Option<String>,
    /// A value for an ARG of the Dockerfile.
    #[arg(long = "build-arg", value_name = "KEY=VALUE", value_parser = parse_build_arg)]
    pub build_args: Vec<(String, String)>,
    /// Run every step (or debootstrap) again instead of using the build cache.
    #[arg(long)]
    pub no_cache: bool,
    /// Make a minimal Debian image of this suite (bookworm, trixie, ...) with debootstrap,
    /// with bash, coreutils, ca-certificates, git and python3.
    #[arg(long, value_name = "SUITE", conflicts_with_all = ["file", "build_args"])]
    pub debian: Option<String>,
    /// With --debian: the Debian archive to download from.
    #[arg(long, value_name = "URL", requires = "debian", default_value = DEFAULT_MIRROR)]
    pub mirror: String,
    /// Print the build's report (steps, cache hits, the image) as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Memory limit of every RUN step's sandbox (hidden: what the server passes for builds
    /// a repository asks for).
    #[arg(long, hide = true, value_parser = limits::parse_memory, value_name = "SIZE", conflicts_with = "debian")]
    pub memory: Option<u64>,
    /// CPU limit of every RUN step's sandbox, in CPUs.
    #[arg(long, hide = true, value_parser = limits::parse_cpus, value_name = "CPUS", conflicts_with = "debian")]
    pub cpus: Option<u64>,
    /// Process limit of every RUN step's sandbox.
    #[arg(long, hide = true, value_parser = limits::parse_pids, value_name = "N", conflicts_with = "debian")]
    pub pids: Option<u64>,
    /// Disk quota of every RUN step's writable layer.
    #[arg(long, hide = true, value_parser = limits::parse_disk, value_name = "SIZE", conflicts_with = "debian")]
    pub disk: Option<u64>,
}

fn parse_build_arg(s: &str) -> Result<(String, String), String> {
    crate::cli::parse_pair("build argument", s)
}

/// Runs `openrun image build`; returns the exit code.
pub fn build(data_dir: &Path, store: &Store, args: ImageBuildArgs) -> Result<i32> {
    if let Some(suite) = &args.debian {
        return debian(store, suite, &args);
    }
    let Some(context) = &args.context else {
        anyhow::bail!("openrun image build needs a build context directory (or --debian SUITE)");
    };
    let Some(tag) = &args.tag else {
        anyhow::bail!("a Dockerfile build needs a name for its image: -t NAME[:TAG]");
    };
    let tag = ImageRef::parse(tag)?;
    let file = args
        .file
        .clone()
        .unwrap_or_else(|| context.join("Dockerfile"));
    let bytes = std::fs::read(&file)
        .with_context(|| format!("cannot read the Dockerfile {}", file.display()))?;
    let text = String::from_utf8(bytes)
        .map_err(|_| anyhow::anyhow!("the Dockerfile {} is not UTF-8", file.display()))?;
    let dockerfile = openrun_image::dockerfile::parse(&text)?;
    let options = BuildOptions {
        tag,
        context: context.clone(),
        dockerfile: std::path::absolute(&file).unwrap_or(file),
        build_args: args.build_args.iter().cloned().collect(),
        no_cache: args.no_cache,
        limits: Limits {
            memory_bytes: args.memory,
            cpu_millis: args.cpus,
            pids: args.pids,
            disk_bytes: args.disk,
            open_files: None,
        },
    };
    let runtime = Runtime::open(data_dir)?;
    let mut printer = StepPrinter::default();
    let report = openrun_image::build::build(store, &runtime, &dockerfile, &options, &mut |e| {
        printer.event(e)
    });
    printer.end_line();
    let report = report?;
    print_report(&report, args.json)
}

fn print_report(report: &BuildReport, json: bool) -> Result<i32> {
    let (hits, cacheable) = report.cache_hits();
    eprintln!(
        "Successfully built {} ({hits} of {cacheable} steps from the cache)",
        report.digest
    );
    if json {
        output::print(&format!("{}\n", serde_json::to_string_pretty(report)?));
    } else {
        output::print(&format!("{} {}\n", report.image, report.digest));
    }
    Ok(0)
}

/// Writes build events to stderr, Docker-style: `Step 3/7 : RUN ...`, the command's output,
/// then ` ---> Using cache` or ` ---> <layer> (1.2s)`.
#[derive(Default)]
struct StepPrinter {
    /// Whether the last byte written was not a newline.
    open_line: bool,
}

impl StepPrinter {
    fn event(&mut self, event: BuildEvent<'_>) {
        let mut err = std::io::stderr().lock();
        match event {
            BuildEvent::Step {
                number,
                total,
                text,
                ..
            } => {
                self.end_line_in(&mut err);
                let _ = writeln!(err, "Step {number}/{total} : {text}");
            }
            BuildEvent::Output(bytes) => {
                let _ = err.write_all(bytes);
                if let Some(last) = bytes.last() {
                    self.open_line = *last != b'\n';
                }
            }
            BuildEvent::Cached { layer } => {
                self.end_line_in(&mut err);
                let layer = layer.map(|l| format!(" {}", short(l))).unwrap_or_default();
                let _ = writeln!(err, " ---> Using cache{layer}");
            }
            BuildEvent::Done { layer, elapsed } => {
                self.end_line_in(&mut err);
                let what = layer.map_or("no layer".to_string(), short);
                let _ = writeln!(err, " ---> {what} ({:.1}s)", elapsed.as_secs_f64());
            }
            BuildEvent::Warning(message) => {
                self.end_line_in(&mut err);
                let _ = writeln!(err, "warning: {message}");
            }
        }
        let _ = err.flush();
    }

    fn end_line(&mut self) {
        self.end_line_in(&mut std::io::stderr().lock());
    }

    fn end_line_in(&mut self, err: &mut impl Write) {
        if self.open_line {
            let _ = writeln!(err);
            self.open_line = false;
        }
    }
}

fn short(layer: &str) -> String {
    format!("sha256:{}", layer.get(..12).unwrap_or(layer))
}

/// `--debian SUITE`: a progress bar on a terminal, phase lines otherwise.
fn debian(store: &Store, suite: &str, args: &ImageBuildArgs) -> Result<i32> {
    let mut options = DebianOptions::new(suite)?;
    if let Some(tag) = &args.tag {
        options.tag = ImageRef::parse(tag)?;
    }
    options.mirror = args.mirror.clone();
    options.no_cache = args.no_cache;
    let terminal = std::io::stderr().is_terminal();
    let bar = terminal.then(|| {
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(1000),
            indicatif::ProgressDrawTarget::stderr(),
        );
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "debian {prefix} [{bar:30}] {percent:>3}% {msg}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_prefix(suite.to_string());
        bar
    });
    let mut last_phase = String::new();
    let report = openrun_image::debian::build_debian(store, &options, &mut |e| match e {
        DebianEvent::Installing(command) => {
            let line = format!("debootstrap is not installed: running {command}");
            match &bar {
                Some(bar) => bar.println(line),
                None => eprintln!("{line}"),
            }
        }
        DebianEvent::Phase(phase) => {
            match &bar {
                Some(bar) => bar.set_message(phase.to_string()),
                None if phase != last_phase => eprintln!("debian {suite}: {phase}"),
                None => {}
            }
            last_phase = phase.to_string();
        }
        DebianEvent::Progress(fraction) => {
            if let Some(bar) = &bar {
                bar.set_position((fraction * 1000.0) as u64);
            }
        }
        DebianEvent::Info(text) => {
            if let Some(bar) = &bar {
                bar.set_message(format!("{last_phase}: {text}"));
            }
        }
        DebianEvent::Warning(text) => match &bar {
            Some(bar) => bar.println(format!("warning: {text}")),
            None => eprintln!("warning: {text}"),
        },
        DebianEvent::Storing => match &bar {
            Some(bar) => bar.set_message("adding the tree to the image store"),
            None => eprintln!("debian {suite}: adding the tree to the image store"),
        },
    });
    if let Some(bar) = &bar {
        match &report {
            Ok(_) => bar.finish_with_message("done"),
            Err(_) => bar.abandon(),
        }
    }
    let report = report?;
    if report.cached {
        eprintln!("{} from the cache (sha256:{})", report.image, report.layer);
    }
    if args.json {
        output::print(&format!("{}\n", serde_json::to_string_pretty(&report)?));
    } else {
        output::print(&format!("{} sha256:{}\n", report.image, report.layer));
    }
    Ok(0)
}
