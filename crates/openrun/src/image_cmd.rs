//! `openrun image …`: the image store of this machine's data dir (always local, like `run`).

use std::io::IsTerminal;
use std::path::Path;

use anyhow::Result;
use openrun_image::{ImageError, ImageRecord, ImageRef, ImportProgress, Store};
use openrun_runtime::Runtime;
use serde_json::{json, Value};

use crate::cli::{
    ImageCommand, ImageImportArgs, ImageInspectArgs, ImageLsArgs, ImagePruneArgs, ImageRmArgs,
};
use crate::output;

/// Runs one `image` verb; returns the exit code.
pub fn dispatch(data_dir: &Path, command: ImageCommand) -> Result<i32> {
    let store = Store::open(data_dir)?;
    match command {
        ImageCommand::Ls(args) => ls(&store, args),
        ImageCommand::Inspect(args) => inspect(&store, args),
        ImageCommand::Import(args) => import(&store, args),
        ImageCommand::Build(args) => crate::image_build::build(data_dir, &store, args),
        ImageCommand::Rm(args) => rm(&store, args),
        ImageCommand::Prune(args) => prune(data_dir, &store, args),
    }
}

/// Sum of the sizes the store recorded for `layers` (unknown ones count 0).
fn layers_size(store: &Store, layers: &[String]) -> u64 {
    layers
        .iter()
        .filter_map(|l| store.layer_info(l).ok())
        .map(|i| i.size)
        .sum()
}

/// An image as `ls --json` and `inspect --json` print it.
fn image_json(store: &Store, r: &ImageRef, record: &ImageRecord) -> Value {
    let layers: Vec<Value> = record
        .layers
        .iter()
        .map(|l| match store.layer_info(l) {
            Ok(info) => json!({"id": format!("sha256:{l}"), "size": info.size, "created_at": info.created_at, "source": info.source}),
            Err(_) => json!({"id": format!("sha256:{l}"), "size": null}),
        })
        .collect();
    json!({
        "image": r.to_string(),
        "name": r.name,
        "tag": r.tag,
        "size": layers_size(store, &record.layers),
        "created_at": record.created_at,
        "source": record.source,
        "parent": record.parent,
        "base": record.base.map(|b| b.as_str()),
        "config": record.config,
        "layers": layers,
    })
}

/// What the image's layers sit on: `host`, or `-` (they are the whole root).
fn base(record: &ImageRecord) -> &'static str {
    record.base.map_or("-", |b| b.as_str())
}

/// `1.5 MB`-style sizes (powers of 1000, as `docker images`).
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `1 layer`, `2 layers`.
fn layers(n: usize) -> String {
    format!("{n} layer{}", if n == 1 { "" } else { "s" })
}

/// `3m5s ago` for an RFC 3339 time.
fn age(created_at: &str) -> String {
    match output::parse_rfc3339(created_at) {
        Some(t) => {
            let now = openrun_runtime::state::now_ms();
            format!("{} ago", output::format_ms(now.saturating_sub(t)))
        }
        None => created_at.to_string(),
    }
}

fn ls(store: &Store, args: ImageLsArgs) -> Result<i32> {
    let images = store.list()?;
    if args.json {
        let all: Vec<Value> = images
            .iter()
            .map(|(r, rec)| image_json(store, r, rec))
            .collect();
        output::print(&format!("{}\n", serde_json::to_string_pretty(&all)?));
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = images
        .iter()
        .map(|(r, rec)| {
            vec![
                r.name.clone(),
                r.tag.clone(),
                base(rec).to_string(),
                rec.layers.len().to_string(),
                human_bytes(layers_size(store, &rec.layers)),
                age(&rec.created_at),
                rec.source.clone(),
            ]
        })
        .collect();
    output::print(&output::table(
        &["NAME", "TAG", "BASE", "LAYERS", "SIZE", "CREATED", "SOURCE"],
        &rows,
    ));
    Ok(0)
}

fn inspect(store: &Store, args: ImageInspectArgs) -> Result<i32> {
    let r = ImageRef::parse(&args.name)?;
    let record = store.get(&r)?;
    if args.json {
        let value = image_json(store, &r, &record);
        output::print(&format!("{}\n", serde_json::to_string_pretty(&value)?));
        return Ok(0);
    }
    print_summary(store, &r, &record);
    Ok(0)
}

/// The readable form of `inspect`: one field a line, then the layers.
fn print_summary(store: &Store, r: &ImageRef, record: &ImageRecord) {
    let c = &record.config;
    let words = |v: &[String]| {
        if v.is_empty() {
            "-".to_string()
        } else {
            serde_json::to_string(v).unwrap_or_default()
        }
    };
    let mut rows = vec![
        vec!["Image".to_string(), r.to_string()],
        vec!["Created".to_string(), record.created_at.clone()],
        vec!["Source".to_string(), record.source.clone()],
        vec![
            "Parent".to_string(),
            record.parent.clone().unwrap_or_else(|| "-".into()),
        ],
        vec!["Base".to_string(), base(record).to_string()],
        vec![
            "Size".to_string(),
            human_bytes(layers_size(store, &record.layers)),
        ],
        vec![
            "WorkingDir".to_string(),
            c.working_dir.clone().unwrap_or_else(|| "-".into()),
        ],
        vec![
            "User".to_string(),
            c.user.clone().unwrap_or_else(|| "-".into()),
        ],
        vec!["Entrypoint".to_string(), words(&c.entrypoint)],
        vec!["Cmd".to_string(), words(&c.cmd)],
    ];
    rows.extend(c.env.iter().map(|e| vec!["Env".to_string(), e.clone()]));
    rows.extend(
        c.labels
            .iter()
            .map(|(k, v)| vec!["Label".to_string(), format!("{k}={v}")]),
    );
    rows.extend(record.layers.iter().map(|l| {
        let size = store
            .layer_info(l)
            .map(|i| human_bytes(i.size))
            .unwrap_or_else(|_| "?".into());
        vec!["Layer".to_string(), format!("sha256:{l}  {size}")]
    }));
    output::print(&output::table(&["FIELD", "VALUE"], &rows));
}

/// Per-layer progress bars on stderr (indicatif: redraws in place, rate and size shown).
struct Bars {
    bar: Option<indicatif::ProgressBar>,
}

impl ImportProgress for Bars {
    fn layer_started(&mut self, index: usize, count: usize, digest: &str, size: u64) {
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(size),
            indicatif::ProgressDrawTarget::stderr(),
        );
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_prefix(format!(
            "layer {}/{count} {}",
            index + 1,
            digest.get(..12).unwrap_or(digest)
        ));
        self.bar = Some(bar);
    }

    fn layer_progress(&mut self, read: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(read);
        }
    }

    fn layer_finished(&mut self, reused: bool) {
        if let Some(bar) = self.bar.take() {
            if reused {
                bar.abandon_with_message("already in the store");
            } else {
                bar.finish_with_message("done");
            }
        }
    }
}

fn import(store: &Store, args: ImageImportArgs) -> Result<i32> {
    let r = ImageRef::parse(&args.tag)?;
    let report = if std::io::stderr().is_terminal() {
        openrun_image::import(store, &args.path, &r, &mut Bars { bar: None })?
    } else {
        openrun_image::import(store, &args.path, &r, &mut ())?
    };
    if args.json {
        let value = image_json(store, &r, &report.record);
        output::print(&format!("{}\n", serde_json::to_string_pretty(&value)?));
    } else {
        output::print(&format!(
            "imported {} from {} ({}: {} new, {} already in the store)\n",
            report.image,
            report.format,
            layers(report.record.layers.len()),
            report.layers_added,
            report.layers_reused
        ));
    }
    Ok(0)
}

fn rm(store: &Store, args: ImageRmArgs) -> Result<i32> {
    let mut code = 0;
    let mut removed = Vec::new();
    for name in &args.names {
        match ImageRef::parse(name).and_then(|r| store.remove(&r).map(|()| r)) {
            Ok(r) => removed.push(r.to_string()),
            Err(ImageError::NotFound(_)) if args.force => {}
            Err(e) => {
                eprintln!("openrun: {e}");
                code = crate::cli::ERROR_EXIT_CODE;
            }
        }
    }
    output::print_ids(&removed, args.json)?;
    Ok(code)
}

fn prune(data_dir: &Path, store: &Store, args: ImagePruneArgs) -> Result<i32> {
    let runtime = Runtime::open(data_dir)?;
    let report = store.prune(&runtime)?;
    if args.json {
        output::print(&format!("{}\n", serde_json::to_string_pretty(&report)?));
    } else {
        output::print(&format!(
            "removed {} ({})\n",
            layers(report.layers.len()),
            human_bytes(report.bytes)
        ));
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_docker_images() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(1_500_000), "1.5 MB");
        assert_eq!(human_bytes(2_000_000_000), "2.0 GB");
    }
}
