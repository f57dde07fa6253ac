//! `openrun snapshot`, `openrun fork` and `openrun diff` on this machine's sandboxes (with a
//! server configured, [`crate::remote::images`] sends the same verbs to its API). Both print
//! through the helpers here.

use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use openrun_image::diff::{ChangeKind, DiffOptions, DiffReport};
use openrun_image::snapshot::{self, Snapshot};
use openrun_image::Store;
use openrun_runtime::{limits, Runtime, Storage};

use crate::output;

/// `openrun snapshot`.
#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// Sandbox id (or a unique prefix).
    pub id: String,
    /// Name[:tag] of the new image (default snap-<id>-<n>).
    #[arg(short = 't', long = "tag", value_name = "NAME")]
    pub tag: Option<String>,
    /// Print the snapshot as JSON (image, layers, bytes, duration_ms, paused_ms).
    #[arg(long)]
    pub json: bool,
}

/// `openrun fork`.
#[derive(Debug, Args)]
pub struct ForkArgs {
    /// Sandbox id (or a unique prefix).
    pub id: String,
    /// Number of sandboxes to create from the snapshot (1 to 100).
    #[arg(short = 'n', long = "count", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(1..=100), value_name = "N")]
    pub count: u64,
    /// Name[:tag] of the snapshot image (default snap-<id>-<n>).
    #[arg(short = 't', long = "tag", value_name = "NAME")]
    pub tag: Option<String>,
    /// Lifetime of each fork.
    #[arg(long, value_parser = limits::parse_duration, default_value = "15m", value_name = "DURATION")]
    pub ttl: Duration,
    /// Print the forks as JSON (the server's resources, or the local records).
    #[arg(long)]
    pub json: bool,
}

/// `openrun diff`.
#[derive(Debug, Args)]
pub struct DiffArgs {
    /// Sandbox id (or a unique prefix).
    pub id: String,
    /// Only this absolute path inside the sandbox (a file, or a directory and what is below).
    pub path: Option<String>,
    /// Compare with this image (e.g. a snapshot) instead of the sandbox's own.
    #[arg(long, value_name = "IMAGE")]
    pub against: Option<String>,
    /// List the changed paths (A, M, D and the path) instead of the patch.
    #[arg(long)]
    pub name_status: bool,
    /// Print the changes and the patch as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Prints a snapshot: its image name, or the whole of it as JSON.
pub fn print_snapshot(snap: &Snapshot, json: bool) -> Result<()> {
    if json {
        output::print(&format!("{}\n", serde_json::to_string_pretty(snap)?));
    } else {
        eprintln!(
            "snapshot of {} bytes in {} ms (paused {} ms)",
            snap.bytes, snap.duration_ms, snap.paused_ms
        );
        output::print(&format!("{}\n", snap.image));
    }
    Ok(())
}

/// Prints a diff: the patch, the `--name-status` list, or JSON; says on stderr when it was cut.
pub fn print_diff(report: &DiffReport, args: &DiffArgs) -> Result<()> {
    if args.json {
        output::print(&format!("{}\n", serde_json::to_string_pretty(report)?));
        return Ok(());
    }
    if args.name_status {
        let mut text = String::new();
        for change in &report.changes {
            let letter = match change.kind {
                ChangeKind::Added => 'A',
                ChangeKind::Modified => 'M',
                ChangeKind::Deleted => 'D',
            };
            let suffix = match (&change.link_target, change.file_type.as_str()) {
                (Some(target), _) => format!(" -> {target}"),
                (None, "dir") => "/".into(),
                _ => String::new(),
            };
            text.push_str(&format!(
                "{letter}\t{}{suffix}\n",
                output::inert(&change.path)
            ));
        }
        output::print(&text);
    } else {
        output::print(&inert_patch(&report.patch));
    }
    if report.truncated {
        eprintln!("openrun: the diff was cut at its limit: name a PATH to see the rest");
    }
    Ok(())
}

/// The patch with control characters escaped but for its newlines and tabs: a sandbox's
/// files must not drive the terminal.
fn inert_patch(patch: &str) -> String {
    patch
        .split('\n')
        .map(|line| {
            line.split('\t')
                .map(output::inert)
                .collect::<Vec<_>>()
                .join("\t")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `openrun snapshot` on this machine.
pub fn snapshot(data_dir: &std::path::Path, args: SnapshotArgs) -> Result<i32> {
    let runtime = Runtime::open(data_dir)?;
    let sandbox = runtime.open_sandbox(&args.id)?;
    let store = Store::open(data_dir)?;
    let snap = snapshot::snapshot(&store, &sandbox, args.tag.as_deref())?;
    print_snapshot(&snap, args.json)?;
    Ok(0)
}

/// `openrun fork` on this machine: a snapshot, then `count` sandboxes from it, one after the
/// other (sandboxes are forked from this single-threaded process), each with the parent's
/// limits.
pub fn fork(data_dir: &std::path::Path, args: ForkArgs) -> Result<i32> {
    let runtime = Runtime::open(data_dir)?;
    let parent = runtime.open_sandbox(&args.id)?;
    let store = Store::open(data_dir)?;
    let snap = snapshot::snapshot(&store, &parent, args.tag.as_deref())?;
    eprintln!("snapshot {} ({} bytes)", snap.image, snap.bytes);
    let mut records = Vec::new();
    for _ in 0..args.count {
        let image = openrun_image::sandbox_image(data_dir, &snap.image)?;
        let mut spec = openrun_runtime::SandboxSpec::new(image.source.clone());
        image.apply(&mut spec);
        spec.storage = Storage::Disk;
        spec.limits = parent.record().limits.clone();
        spec.lifetime = Some(args.ttl);
        let sandbox = runtime
            .create(&spec)
            .with_context(|| format!("cannot create a fork from {}", snap.image))?;
        drop(image);
        records.push(sandbox.record().clone());
    }
    if args.json {
        output::print(&format!("{}\n", serde_json::to_string_pretty(&records)?));
    } else {
        let ids: Vec<String> = records.iter().map(|r| r.id.clone()).collect();
        output::print_ids(&ids, false)?;
    }
    Ok(0)
}

/// `openrun diff` on this machine.
pub fn diff(data_dir: &std::path::Path, args: DiffArgs) -> Result<i32> {
    let runtime = Runtime::open(data_dir)?;
    let sandbox = runtime.open_sandbox(&args.id)?;
    let store = args
        .against
        .as_ref()
        .map(|_| Store::open(data_dir))
        .transpose()?;
    let options = DiffOptions {
        path: args.path.clone(),
        ..DiffOptions::default()
    };
    let report =
        snapshot::diff_sandbox(store.as_ref(), &sandbox, args.against.as_deref(), &options)?;
    print_diff(&report, &args)?;
    Ok(0)
}
