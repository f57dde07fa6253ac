//! Snapshots and diffs of live sandboxes.
//!
//! A snapshot freezes a sandbox's writable layer into a new store layer: the sandbox is paused
//! (cgroup freezer) only while its upper directory is copied as it is ([`crate::freeze`]),
//! then resumed; the copy is archived with ids shifted back from the sandbox's host id range
//! into image ids (whiteouts, opaque directories and hard links kept, no link followed:
//! [`Store::stage_dir`]) into a new layer, and an image is recorded whose layers are the sandbox's image layers plus the new one and whose
//! defaults are its image's. Forks are sandboxes created from that image: they share the
//! frozen layers read-only and diverge in their own uppers.
//!
//! Only sandboxes on store images with their writable layer on disk can be snapshotted: the
//! built-in `host` image mounts the host's own `/usr` (not a store layer: recording it would
//! mean copying gigabytes, and the image would change under the snapshot with every host
//! upgrade), a `--rootfs` directory is not in the store either, and a memory layer exists only
//! inside the sandbox's mount namespace. Each is refused naming what to do instead.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use openrun_runtime::ids::RANGE_SIZE;
use openrun_runtime::{ImageSource, RuntimeError, Sandbox, SandboxRecord};

use crate::diff::{self, DiffOptions, DiffReport, Overlay};
use crate::error::ImageError;
use crate::layer::IdShift;
use crate::name::ImageRef;
use crate::store::{now, ImageConfig, ImageRecord, Store, MAX_LAYERS};

/// Why a snapshot or a diff of a sandbox failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The store failed, or a name or image was bad.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The sandbox could not be paused, resumed or found.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The sandbox cannot be snapshotted or compared this way (its image or storage).
    #[error("{0}")]
    Unsupported(String),
    /// The name asked for is taken.
    #[error(
        "image {0} already exists: choose another name, or remove it first (openrun image rm)"
    )]
    Exists(String),
}

impl SnapshotError {
    /// Whether the caller's request is at fault (a 4xx), not the host.
    pub fn is_user_error(&self) -> bool {
        match self {
            Self::Image(e) => e.is_user_error(),
            Self::Runtime(e) => e.is_user_error(),
            Self::Unsupported(_) | Self::Exists(_) => true,
        }
    }
}

/// Shorthand for results of this module.
pub type Result<T, E = SnapshotError> = std::result::Result<T, E>;

/// What a snapshot made.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    /// The image (`name:tag`).
    pub image: String,
    /// Its layer ids, bottom to top (the last is the new one).
    pub layers: Vec<String>,
    /// Bytes of the new layer (its tar).
    pub bytes: u64,
    /// Time the whole snapshot took, in milliseconds.
    pub duration_ms: u64,
    /// Time the sandbox was paused for the copy, in milliseconds (0 when it was paused
    /// already).
    pub paused_ms: u64,
}

/// Taken while a snapshot picks its name and records its image, so two snapshots of this
/// process never take the same `snap-<id>-<n>`.
static NAMING: Mutex<()> = Mutex::new(());

/// The store layer ids a sandbox's image is made of (bottom to top), or why it has none.
pub fn sandbox_layers(store: &Store, record: &SandboxRecord) -> Result<Vec<String>> {
    if record.image == crate::name::HOST {
        return Err(SnapshotError::Unsupported(format!(
            "sandbox {} runs the built-in host image, whose /usr is the host's own and not a \
             store layer: snapshots and forks need a sandbox on a store image (openrun image ls; \
             openrun image build --debian bookworm makes one)",
            record.id
        )));
    }
    let any_layer = store.layer_dir(&"0".repeat(64));
    let layers_dir = any_layer
        .parent()
        .and_then(|p| std::fs::canonicalize(p).ok())
        .ok_or_else(|| {
            ImageError::io(
                format!("cannot resolve {}", any_layer.display()),
                std::io::Error::from(std::io::ErrorKind::NotFound),
            )
        })?;
    let mut out = Vec::with_capacity(record.lowers.len());
    for lower in &record.lowers {
        let hex = lower
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|hex| crate::digest::is_hex64(hex));
        let in_store = lower
            .parent()
            .and_then(|p| std::fs::canonicalize(p).ok())
            .is_some_and(|p| p == layers_dir);
        match hex {
            Some(hex) if in_store => out.push(hex.to_string()),
            _ => {
                return Err(SnapshotError::Unsupported(format!(
                    "sandbox {} runs {}, which is not an image of this store: only sandboxes \
                     on store images can be snapshotted (import the root filesystem as an \
                     image first)",
                    record.id, record.image
                )))
            }
        }
    }
    if out.is_empty() {
        return Err(SnapshotError::Unsupported(format!(
            "sandbox {} has no image layers",
            record.id
        )));
    }
    Ok(out)
}

/// The layers a sandbox stacks for an image's: a layer named twice only once, at its topmost
/// place (as the runtime mounts them).
fn stacked(layers: &[String]) -> Vec<&String> {
    let mut seen = std::collections::HashSet::new();
    let mut out: Vec<&String> = layers.iter().rev().filter(|l| seen.insert(*l)).collect();
    out.reverse();
    out
}

/// The defaults of the image a sandbox runs: its image's record when it still names the same
/// layers, else those of any image with these layers, else none but its user.
fn sandbox_config(store: &Store, record: &SandboxRecord, layers: &[String]) -> ImageConfig {
    let runs = |image: &ImageRecord| stacked(&image.layers) == layers.iter().collect::<Vec<_>>();
    if let Ok(r) = ImageRef::parse(&record.image) {
        if let Ok(image) = store.get(&r) {
            if runs(&image) {
                return image.config;
            }
        }
    }
    if let Ok(images) = store.list() {
        if let Some((_, image)) = images.into_iter().find(|(_, i)| runs(i)) {
            return image.config;
        }
    }
    ImageConfig {
        user: record.user.clone(),
        ..ImageConfig::default()
    }
}

/// The first free `snap-<id>-<n>` (n from 1).
fn next_name(store: &Store, id: &str) -> Result<ImageRef> {
    let mut n = 1u64;
    loop {
        let r = ImageRef::parse(&format!("snap-{id}-{n}"))?;
        match store.get(&r) {
            Err(ImageError::NotFound(_)) => return Ok(r),
            Ok(_) => n += 1,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Snapshots `sandbox` into an image named `name` (default `snap-<id>-<n>`). A running
/// sandbox is paused for the copy and resumed; a paused one stays paused.
pub fn snapshot(store: &Store, sandbox: &Sandbox, name: Option<&str>) -> Result<Snapshot> {
    let started = Instant::now();
    let record = sandbox.record();
    let upper = sandbox.upper_dir().ok_or_else(|| {
        SnapshotError::Unsupported(format!(
            "sandbox {} keeps its writable layer in memory (openrun run): snapshots need one on \
             disk (openrun create, or --storage disk)",
            record.id
        ))
    })?;
    let mut layers = sandbox_layers(store, record)?;
    if layers.len() >= MAX_LAYERS {
        return Err(SnapshotError::Unsupported(format!(
            "sandbox {} already stacks {} layers, the most a sandbox can: a snapshot would add \
             one more",
            record.id,
            layers.len()
        )));
    }
    let given = name.map(ImageRef::parse).transpose()?;
    if let Some(r) = &given {
        if r.is_host() {
            return Err(ImageError::InvalidName {
                name: r.to_string(),
                reason: "\"host\" is the built-in image".into(),
            }
            .into());
        }
        if store.get(r).is_ok() {
            return Err(SnapshotError::Exists(r.to_string()));
        }
    }
    let config = sandbox_config(store, record, &layers);
    let shift = IdShift {
        base: record.ids.host_base(),
        size: RANGE_SIZE,
    };
    // Frozen only for a plain copy of the upper (the kernel copies the bytes); the layer is
    // archived, hashed and unpacked from the copy once the sandbox runs again.
    let work = store.work_dir()?;
    let copy = work.path().join("upper");
    let was_paused = sandbox.is_paused()?;
    if !was_paused {
        sandbox.pause()?;
    }
    let frozen = Instant::now();
    let copied = crate::freeze::copy_tree(&upper, &copy);
    let paused = if was_paused {
        Duration::ZERO
    } else {
        let paused = frozen.elapsed();
        sandbox.resume()?;
        paused
    };
    copied?;
    let staged = store.stage_dir(&copy, Some(shift), &format!("snapshot:{}", record.id))?;
    drop(work);
    tracing::info!(
        id = record.id,
        bytes = staged.size,
        paused_ms = paused.as_millis() as u64,
        "sandbox layer copied"
    );
    let bytes = staged.size;
    layers.push(staged.digest.clone());
    let image = ImageRecord {
        layers: layers.clone(),
        config,
        created_at: now(),
        source: format!("snapshot:{}", record.id),
        parent: Some(record.image.clone()),
    };
    let _naming = NAMING.lock().unwrap_or_else(|p| p.into_inner());
    let r = match given {
        Some(r) if store.get(&r).is_ok() => return Err(SnapshotError::Exists(r.to_string())),
        Some(r) => r,
        None => next_name(store, &record.id)?,
    };
    store.commit(vec![staged], Some((&r, &image)))?;
    Ok(Snapshot {
        image: r.to_string(),
        layers,
        bytes,
        duration_ms: started.elapsed().as_millis() as u64,
        paused_ms: paused.as_millis() as u64,
    })
}

/// The mounts of a live sandbox: for each, its target, its image lowers and its writable
/// upper (the `host` image mounts its skeleton at `/` and the host's `/usr` (and, without
/// merged `/usr`, `/bin` and friends) each with its own upper; store images and `--rootfs`
/// one overlay at `/`).
fn sandbox_mounts(sandbox: &Sandbox) -> Result<Vec<(PathBuf, Vec<PathBuf>, PathBuf)>> {
    let record = sandbox.record();
    let upper = sandbox.upper_dir().ok_or_else(|| {
        SnapshotError::Unsupported(format!(
            "sandbox {} keeps its writable layer in memory (openrun run), out of the host's \
             reach: diffs need one on disk (openrun create, or --storage disk)",
            record.id
        ))
    })?;
    let layer_dir = upper.parent().map(Path::to_path_buf).ok_or_else(|| {
        SnapshotError::Unsupported(format!("sandbox {} has no layer directory", record.id))
    })?;
    if record.image != crate::name::HOST {
        return Ok(vec![("/".into(), record.lowers.clone(), upper)]);
    }
    Ok(record
        .lowers
        .iter()
        .enumerate()
        .map(|(n, lower)| {
            let target = if n == 0 {
                PathBuf::from("/")
            } else {
                lower.clone()
            };
            (target, vec![lower.clone()], layer_dir.join(n.to_string()))
        })
        .collect())
}

/// What the runtime mounts over every sandbox's root: the layers' entries there (mount points
/// it creates) are never seen inside, and are left out of diffs.
pub const RUNTIME_MOUNTS: [&str; 6] = [
    "/proc",
    "/dev",
    "/sys",
    "/tmp",
    "/etc/hostname",
    "/etc/hosts",
];

/// What changed in `sandbox`: against its image (its writable layer), or against the image
/// `against` (for example an earlier snapshot of it, or the snapshot it was forked from).
pub fn diff_sandbox(
    store: Option<&Store>,
    sandbox: &Sandbox,
    against: Option<&str>,
    options: &DiffOptions,
) -> Result<DiffReport> {
    let mounts = sandbox_mounts(sandbox)?;
    let mut options = options.clone();
    options
        .hidden
        .extend(RUNTIME_MOUNTS.iter().map(|m| m.to_string()));
    let options = &options;
    let after: Vec<Overlay> = mounts
        .iter()
        .map(|(target, lowers, upper)| Overlay {
            target: target.clone(),
            layers: lowers.iter().cloned().chain([upper.clone()]).collect(),
        })
        .collect();
    let Some(against) = against else {
        let before: Vec<Overlay> = mounts
            .into_iter()
            .map(|(target, layers, _)| Overlay { target, layers })
            .collect();
        return Ok(diff::diff(&before, &after, options)?);
    };
    let r = ImageRef::parse(against)?;
    if r.is_host() || mounts.len() != 1 {
        return Err(SnapshotError::Unsupported(format!(
            "cannot compare sandbox {} with {against}: a diff against an image needs a store \
             image on both sides (the host image mounts the host's /usr)",
            sandbox.id()
        )));
    }
    let store = store.ok_or_else(|| {
        SnapshotError::Unsupported("no image store to compare against".to_string())
    })?;
    // Its lease keeps the image's layers from prune until the walk is done.
    let image = store.sandbox_image(against)?;
    let ImageSource::Layers { layers, .. } = &image.source else {
        return Err(SnapshotError::Unsupported(format!(
            "cannot compare sandbox {} with {against}: not an image of the store",
            sandbox.id()
        )));
    };
    let layers = layers.clone();
    let before = [Overlay {
        target: "/".into(),
        layers,
    }];
    Ok(diff::diff(&before, &after, options)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_layer_is_stacked_once_at_its_topmost_place() {
        let l = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let layers = l(&["a", "b", "a", "c"]);
        assert_eq!(stacked(&layers), [&layers[1], &layers[2], &layers[3]]);
        assert_eq!(stacked(&l(&["a"])).len(), 1);
    }
}
